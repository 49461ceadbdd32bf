//! The agency talks back: its signed events on a case become hand-off outcomes; an unsigned,
//! forged or stale one is refused and writes nothing.

use forfall::devstack::AGENCY_SIGNING_SECRET;
use forfall_e2e::*;
use forfall_platform::clock::ManualClock;
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
