//! The agency talks back: its signed events on a case become hand-off outcomes; an unsigned,
//! forged or stale one is refused and writes nothing. Its answers move the journey.

use forfall::devstack::AGENCY_SIGNING_SECRET;
use forfall_e2e::*;
use forfall_platform::clock::ManualClock;
use std::time::Duration;

use forfall_platform::records::{HandoffOutcome, HandoffStatus, derived_id};
use forfall_platform::signing;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_agencys_signed_events_become_outcomes_and_a_forged_one_changes_nothing() -> anyhow::Result<()> {
    let clock = ManualClock::new(at("2026-04-20T08:00:00Z"));
    let stack = LocalStack::start(base_config(), clock).await?;
    stack.start_service("handoff");
    let addr = eventually("hand-off to listen", WAIT, || async {
        Ok(stack.rt.admin_addr("handoff"))
    })
    .await?;
    let url = format!("http://{addr}/v1/agency/events");
    let event = |id: &str, status: &str, extra: serde_json::Value| {
        let mut body = serde_json::json!({
            "event_id": id,
            "case_id": derived_id("case", &["nordkraft", "no-1"]),
            "tenant": "nordkraft",
            "debtor_id": "nordkraft:kari",
            "invoice_id": "no-1",
            "status": status,
            "reference": "NI-7",
        });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        serde_json::to_vec(&body).unwrap_or_default()
    };
    let http = reqwest::Client::new();
    let send = |body: Vec<u8>, timestamp: i64, secret: &str| {
        let signature = signing::sign(secret, timestamp, &body);
        http.post(&url)
            .header(signing::TIMESTAMP_HEADER, timestamp.to_string())
            .header(signing::SIGNATURE_HEADER, signature)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let now = chrono::Utc::now().timestamp();

    // Refused, and nothing written: unsigned, signed with another secret, stale, not our case.
    let paid = event(
        "ag-9",
        "paid",
        serde_json::json!({"collected_minor": 94_848, "currency": "NOK"}),
    );
    let unsigned = http.post(&url).body(paid.clone()).send().await?;
    assert_eq!(unsigned.status().as_u16(), 401);
    assert_eq!(send(paid.clone(), now, "a guess").await?.status().as_u16(), 401);
    assert_eq!(
        send(paid.clone(), now - 600, AGENCY_SIGNING_SECRET)
            .await?
            .status()
            .as_u16(),
        401
    );
    let mut other: serde_json::Value = serde_json::from_slice(&paid)?;
    other["invoice_id"] = "no-2".into();
    let answer = send(serde_json::to_vec(&other)?, now, AGENCY_SIGNING_SECRET).await?;
    assert_eq!(answer.status().as_u16(), 422);
    assert!(answer.text().await?.contains("not the case Forfall sent"));

    // Taken: in collection, a part collected, then rejected with its reason (twice: one record).
    for body in [
        event("ag-1", "in_collection", serde_json::json!({})),
        event(
            "ag-2",
            "partly_paid",
            serde_json::json!({"collected_minor": 30_000, "currency": "NOK"}),
        ),
        event(
            "ag-3",
            "rejected",
            serde_json::json!({"reason": "the debtor is under debt settlement"}),
        ),
        event(
            "ag-3",
            "rejected",
            serde_json::json!({"reason": "the debtor is under debt settlement"}),
        ),
    ] {
        let answer = send(body, now, AGENCY_SIGNING_SECRET).await?;
        assert_eq!(answer.status().as_u16(), 200, "{}", answer.text().await?);
    }
    // Each 200 came after its record was acknowledged: what the topic holds now is all.
    let outcomes = stack
        .read::<HandoffOutcome>(&stack.topic(&stack.topics().handoff_outcomes))
        .await?;
    let said: Vec<(HandoffStatus, Option<i64>, Option<&str>)> = outcomes
        .iter()
        .map(|o| (o.status, o.collected_minor, o.detail.as_deref()))
        .collect();
    assert_eq!(
        said,
        vec![
            (HandoffStatus::InCollection, None, None),
            (HandoffStatus::PartlyPaid, Some(30_000), None),
            (
                HandoffStatus::Rejected,
                None,
                Some("the debtor is under debt settlement")
            ),
            (
                HandoffStatus::Rejected,
                None,
                Some("the debtor is under debt settlement")
            ),
        ],
        "nothing of the refused ones"
    );
    assert_eq!(
        outcomes[2].event_id, outcomes[3].event_id,
        "the same event, the same record"
    );
    assert!(
        outcomes
            .iter()
            .all(|o| o.debtor_id == "nordkraft:kari" && o.invoice_id == "no-1")
    );
    let metrics = stack.metrics("handoff").await?;
    assert_eq!(
        metric_value(
            &metrics,
            "forfall_handoff_agency_events_total",
            &["result=\"unsigned\""]
        ),
        Some(3.0)
    );
    stack.shutdown().await;
    Ok(())
}

/// The agency's answers move the journey. Its bad hour first (two 5xx, then an answer slower
/// than hand-off waits, though it took the case): the case is still one case. A case it
/// refuses waits for a person, counted; the one it took shows on the timeline, and its "paid"
/// closes the invoice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_agencys_answers_move_the_journey_and_a_retried_case_is_one_case() -> anyhow::Result<()> {
    let clock = ManualClock::new(at("2026-09-01T06:00:00Z"));
    let stack = LocalStack::start(base_config(), clock.clone()).await?;
    stack.start_all();
    let kept = danish("inv-kept", "INV-5001", day(2026, 9, 2), "kept@example.test");
    let refused = danish("inv-refused", "INV-5002", day(2026, 9, 2), "refused@example.test");
    for s in [&kept, &refused] {
        stack
            .produce(
                &stack.topic(&stack.topics().billing_invoice_events),
                &s.debtor_id(),
                &s.issued(),
            )
            .await?;
        status_is(&stack, s.tenant, s.invoice_id, "open").await?;
    }
    stack
        .agency
        .refuse_debtor(&refused.debtor_id(), "the debtor is under debt restructuring");
    // Hand-off waits 3 s for an answer (the dev stack's handoff.timeout_ms).
    stack.agency.fail_next(&[503, 502]);
    stack.agency.stall_next(1, Duration::from_secs(4));
    for (time, state) in [
        ("2026-09-02T07:00:01Z", "nudged"),
        ("2026-09-16T07:00:01Z", "reminded-1"),
    ] {
        clock.set(at(time));
        for s in [&kept, &refused] {
            status_is(&stack, s.tenant, s.invoice_id, state).await?;
        }
    }
    clock.set(at("2026-09-30T07:00:01Z"));
    status_is(&stack, refused.tenant, refused.invoice_id, "needs_person").await?;
    let event =
        |invoice: &'static str, kind: &'static str| journey_event(&stack, invoice, kind, move |e| e.kind == kind);
    let rejected = event("inv-refused", "handoff_rejected").await?;
    assert_eq!(
        (rejected.from_state.as_str(), rejected.to_state.as_str()),
        ("handed_over", "needs_person")
    );
    assert_eq!(
        rejected.reason.as_deref(),
        Some("the agency refused the case: the debtor is under debt restructuring")
    );
    let watcher = stack.metrics("watcher").await?;
    assert_eq!(
        metric_value(
            &watcher,
            "forfall_watcher_transitions_total",
            &["kind=\"handoff_rejected\""]
        ),
        Some(1.0),
        "counted, for the alert"
    );

    let accepted = event("inv-kept", "handoff_accepted").await?;
    assert_eq!(accepted.to_state, "handed_over");
    let cases = stack.agency.cases();
    assert_eq!(cases.len(), 1, "one case, whatever the retries: {cases:?}");
    let case_id = cases[0]["case_id"].as_str().unwrap_or_default().to_owned();
    let posts: Vec<_> = stack
        .agency
        .requests()
        .into_iter()
        .filter(|r| r.path == "/cases")
        .collect();
    assert!(
        posts.len() >= 5,
        "two cases, two 5xx and a timeout were tried again: {} posts",
        posts.len()
    );
    for post in posts.iter().filter(|p| p.json()["invoice_id"] == "inv-kept") {
        assert_eq!(post.header("idempotency-key"), Some(case_id.as_str()));
    }
    assert_eq!(accepted.reason.as_deref(), Some("the agency took the case as AG-1"));

    // The agency collects, then reports the claim paid.
    let addr = stack.rt.admin_addr("handoff").expect("hand-off listens");
    let url = format!("http://{addr}/v1/agency/events");
    let agency_event = |id: &str, status: &str, collected: i64| {
        serde_json::json!({
            "event_id": id, "case_id": case_id, "tenant": kept.tenant, "debtor_id": kept.debtor_id(),
            "invoice_id": kept.invoice_id, "status": status, "reference": "AG-1",
            "collected_minor": collected, "currency": "DKK",
        })
    };
    assert_eq!(
        stack
            .agency
            .send_event(&url, &agency_event("ag-1", "partly_paid", 50_000))
            .await?,
        200
    );
    let part = event("inv-kept", "agency_collected_part").await?;
    assert_eq!(part.to_state, "handed_over");
    assert!(
        part.reason
            .as_deref()
            .is_some_and(|r| r.starts_with("the agency has collected") && r.contains("500")),
        "{:?}",
        part.reason
    );
    assert_eq!(
        stack
            .agency
            .send_event(&url, &agency_event("ag-2", "paid", 131_450))
            .await?,
        200
    );
    status_is(&stack, kept.tenant, kept.invoice_id, "closed:paid").await?;
    let paid = event("inv-kept", "paid_at_agency").await?;
    assert_eq!(paid.open_minor, 0, "nothing more is owed the creditor");
    stack.shutdown().await;
    Ok(())
}
