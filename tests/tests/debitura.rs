//! Hand-off through Debitura's Customer API, met by a strict stand-in written from Debitura's
//! published documentation: a dry run, then the case from claim lines; a debtor no partner
//! covers is refused with Debitura's reason and waits for a person; Debitura's signed webhooks
//! (a payment collected, the case closed as paid) move the journey, and a forged one does not.

use base64::Engine;
use forfall_devsinks::debitura::DebituraApi;
use forfall_domain::invoice::epoch_days;
use forfall_e2e::*;
use forfall_platform::clock::ManualClock;
use forfall_platform::records::{CaseDispute, DebtorRequest, HandoffCase, new_event_id};
use forfall_platform::records::{DebtorDetails, HandoffOutcome, HandoffStatus, PostalAddress, derived_id};

const API_KEY: &str = "debitura-api-key-for-tests";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn debitura_takes_the_case_from_claim_lines_and_its_webhooks_move_the_journey() -> anyhow::Result<()> {
    let clock = ManualClock::new(at("2026-09-01T06:00:00Z"));
    let mut stack = LocalStack::start(base_config(), clock.clone()).await?;
    let webhook_secret = base64::engine::general_purpose::STANDARD.encode(b"debitura-webhook-key-for-tests");
    let debitura = DebituraApi::start(API_KEY, &webhook_secret).await?;
    stack.set("handoff.adapter", "debitura");
    stack.set("handoff.debitura.base_url", debitura.url());
    stack.set("handoff.debitura.api_key", API_KEY);
    stack.set("handoff.debitura.webhook_secret", &webhook_secret);
    stack.set("handoff.debitura.is_test", true);
    stack.set("handoff.debitura.user_email", "credit@acme.example");
    stack.start_all();
    // A Danish claim against a debtor living in Germany, where no partner of Debitura's works.
    debitura.uncovered("DE", "No collection partner covers DE for this creditor");
    let kept = danish("inv-db-1", "INV-7001", day(2026, 9, 2), "kept@example.test");
    let abroad = danish("inv-db-2", "INV-7002", day(2026, 9, 2), "abroad@example.test");
    let billing = stack.topic(&stack.topics().billing_invoice_events);
    issue_invoice(&stack, &kept).await?;
    let mut moved = abroad.issued();
    moved.debtor_details = Some(DebtorDetails {
        address: Some(PostalAddress {
            lines: vec!["Hauptstraße 5".into()],
            postal_code: "10115".into(),
            city: "Berlin".into(),
            country: "DE".into(),
        }),
        national_id: None,
        company_id: None,
    });
    stack.produce(&billing, &abroad.debtor_id(), &moved).await?;
    for s in [&kept, &abroad] {
        status_is(&stack, s.tenant, s.invoice_id, "open").await?;
    }
    // Debitura has a bad minute: the first preview answers 503.
    debitura.fail_next(&[503]);
    clock.set(at("2026-09-02T07:00:01Z"));
    status_is(&stack, kept.tenant, kept.invoice_id, "nudged").await?;
    // The debtor disputes the invoice, and the dispute is settled before the reminder is due:
    // the agency is told of both.
    let requests = stack.topic(&stack.topics().debtor_requests);
    for (time, kind, words, state) in [
        (
            "2026-09-03T08:00:00Z",
            "dispute",
            "the meter was read wrong",
            "paused:dispute",
        ),
        (
            "2026-09-04T08:00:00Z",
            "dispute_resolved",
            "the reading was confirmed",
            "nudged",
        ),
    ] {
        clock.set(at(time));
        let request = DebtorRequest {
            event_id: new_event_id(),
            tenant: kept.tenant.into(),
            debtor_id: kept.debtor_id(),
            occurred_at: 0,
            invoice_id: kept.invoice_id.into(),
            kind: kind.into(),
            new_due_date: None,
            promise_date: None,
            instalments: Vec::new(),
            reason: Some(words.into()),
            source: "agent".into(),
        };
        stack.produce(&requests, &kept.debtor_id(), &request).await?;
        status_is(&stack, kept.tenant, kept.invoice_id, state).await?;
    }
    for (time, state) in [
        ("2026-09-16T07:00:01Z", "reminded-1"),
        ("2026-09-30T07:00:01Z", "handed_over"),
    ] {
        clock.set(at(time));
        status_is(&stack, kept.tenant, kept.invoice_id, state).await?;
    }
    status_is(&stack, abroad.tenant, abroad.invoice_id, "needs_person").await?;
    let event =
        |invoice: &'static str, kind: &'static str| journey_event(&stack, invoice, kind, move |e| e.kind == kind);
    let refused = event("inv-db-2", "handoff_rejected").await?;
    assert_eq!(
        refused.reason.as_deref(),
        Some(
            "the agency refused the case: Debitura would not take the case: No collection partner covers DE for this creditor"
        )
    );

    // One case, as Debitura holds it: claim lines adding up to the claim, the debtor, the rest
    // described; every request with the API key, the case with its idempotency key.
    let cases = debitura.cases();
    assert_eq!(cases.len(), 1, "{cases:?}");
    let case = &cases[0];
    let sent = &case["request"];
    let case_id = derived_id("case", &[kept.tenant, kept.invoice_id]);
    assert_eq!(sent["creditorReference"], case_id.as_str());
    assert_eq!(sent["currencyCode"], "DKK");
    assert_eq!(sent["isTest"], true);
    assert_eq!(sent["debtor"]["type"], "Private");
    assert_eq!(sent["debtor"]["name"], "Anna Jensen");
    assert_eq!(sent["debtor"]["countryAlpha2"], "DK");
    let lines = sent["claimLines"].as_array().cloned().unwrap_or_default();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["reference"], "INV-7001");
    assert_eq!(lines[0]["dueDate"], "2026-09-02T00:00:00Z");
    let outcome = eventually("Debitura's answer", WAIT, || async {
        Ok(stack
            .read::<HandoffOutcome>(&stack.topic(&stack.topics().handoff_outcomes))
            .await?
            .into_iter()
            .find(|o| o.invoice_id == kept.invoice_id && o.status == HandoffStatus::Accepted))
    })
    .await?;
    let debitura_id = case["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(outcome.agency_reference.as_deref(), Some(debitura_id.as_str()));
    let line_amount = lines[0]["amount"].as_f64().unwrap_or_default();
    assert!(line_amount >= 1_234.50, "the principal at least: {line_amount}");
    let description = sent["claimDescription"].as_str().unwrap_or_default();
    assert!(
        description.contains(&case_id) && description.contains("message(s) sent"),
        "{description}"
    );
    assert!(
        description.contains("Invoice INV-7001: disputed on 2026-09-03 ('the meter was read wrong'), resolved on 2026-09-04 ('the reading was confirmed')."),
        "{description}"
    );
    let handed = stack
        .read::<HandoffCase>(&stack.topic(&stack.topics().handoff_cases))
        .await?;
    let ours = handed
        .iter()
        .find(|c| c.case_id == case_id)
        .expect("the case on its topic");
    assert_eq!(
        ours.disputes,
        vec![CaseDispute {
            opened: epoch_days(day(2026, 9, 3)),
            reason: Some("the meter was read wrong".into()),
            resolved: Some(epoch_days(day(2026, 9, 4))),
            resolution: Some("the reading was confirmed".into()),
        }]
    );
    let requests = debitura.requests();
    assert!(requests.iter().all(|r| r.header("xapikey") == Some(API_KEY)));
    let creates: Vec<_> = requests.iter().filter(|r| r.path == "/cases").collect();
    assert!(
        creates
            .iter()
            .all(|r| r.header("idempotency-key") == Some(case_id.as_str())),
        "{creates:?}"
    );
    assert!(
        requests.iter().filter(|r| r.path == "/cases/preview").count() >= 3,
        "a dry run for each case, one retried after the 503"
    );

    // Debitura's webhooks: a forged one changes nothing; a payment collected, then paid.
    let handoff = stack.rt.admin_addr("handoff").expect("hand-off listens");
    let url = format!("http://{handoff}/v1/agency/debitura");
    let forged = reqwest::Client::new()
        .post(&url)
        .header("X-Debitura-Signature", "t=1,v1=00")
        .body(r#"{"id":"evt_x","event":"case.closed","data":{}}"#)
        .send()
        .await?;
    assert_eq!(forged.status().as_u16(), 401);
    let data = |extra: serde_json::Value| {
        let mut d = serde_json::json!({"caseId": debitura_id, "reference": case["reference"]});
        if let (Some(d), Some(e)) = (d.as_object_mut(), extra.as_object()) {
            d.extend(e.clone());
        }
        d
    };
    assert_eq!(
        debitura
            .send_webhook(
                &url,
                "evt_1",
                "payment.created",
                data(serde_json::json!({"amount": 500.0, "currency": "DKK"}))
            )
            .await?,
        200
    );
    let part = event("inv-db-1", "agency_collected_part").await?;
    assert_eq!(part.to_state, "handed_over");
    assert_eq!(
        debitura
            .send_webhook(
                &url,
                "evt_2",
                "case.closed",
                data(serde_json::json!({"closeCode": "Paid"}))
            )
            .await?,
        200
    );
    status_is(&stack, kept.tenant, kept.invoice_id, "closed:paid").await?;
    let unknown = debitura
        .send_webhook(
            &url,
            "evt_3",
            "case.updated",
            serde_json::json!({"caseId": "not-ours", "status": "Active"}),
        )
        .await?;
    assert_eq!(unknown, 422, "a case Forfall did not hand over");
    stack.shutdown().await;
    Ok(())
}
