//! The file adapter on the dev stack: cases and recalls from the topics reach the agency's
//! directory as one JSON and one CSV file per day, each once, and each answer names the file.

use forfall_e2e::*;
use forfall_platform::clock::ManualClock;
use forfall_platform::records::{HandoffCase, HandoffOutcome, HandoffRecall, HandoffStatus};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cases_and_recalls_reach_the_agencys_daily_files_once_each() -> anyhow::Result<()> {
    let clock = ManualClock::new(at("2026-04-20T08:00:00Z"));
    let mut stack = LocalStack::start(base_config(), clock).await?;
    let dir = std::env::temp_dir().join(format!("{}-agency-files", stack.prefix));
    stack.set("handoff.adapter", "file");
    stack.set("handoff.export_dir", dir.display().to_string());
    stack.set("handoff.agency_name", "nordinkasso");
    stack.start_service("handoff");
    let case = |id: &str, total: i64| -> anyhow::Result<HandoffCase> {
        Ok(serde_json::from_value(serde_json::json!({
            "event_id": format!("e-{id}"), "tenant": "nordkraft", "debtor_id": "nordkraft:kari",
            "occurred_at": 0, "case_id": id, "invoice_id": format!("inv-{id}"), "invoice_number": "70001",
            "issue_date": 20_500, "due_date": 20_514, "principal_minor": total, "fees_minor": 0,
            "currency": "NOK", "jurisdiction": "NO", "debtor_kind": "consumer", "payment_reference": null,
            "steps_taken": ["nudge"], "policy_version": "p", "debtor_name": "Kari Nordmann",
            "email": null, "phone": null, "language": null,
            "claim_date": 20_563, "original_principal_minor": total, "paid_minor": 0, "total_minor": total,
        }))?)
    };
    let cases = stack.topic(&stack.topics().handoff_cases);
    let (first, second) = (case("case-1", 89_900)?, case("case-2", 12_000)?);
    stack.produce(&cases, &first.debtor_id, &first).await?;
    stack.produce(&cases, &first.debtor_id, &first).await?; // delivered again
    stack.produce(&cases, &second.debtor_id, &second).await?;
    let recall = HandoffRecall {
        event_id: "recall-1".into(),
        tenant: "nordkraft".into(),
        debtor_id: "nordkraft:kari".into(),
        occurred_at: at("2026-04-21T09:00:00Z").timestamp_millis(),
        case_id: "case-1".into(),
        invoice_id: "inv-case-1".into(),
        payment_id: "bank-77".into(),
        amount_minor: 89_900,
        currency: "NOK".into(),
        reason: "paid in full to the creditor".into(),
        remaining_minor: Some(0),
    };
    stack.produce(&cases, &recall.debtor_id, &recall).await?;
    let part = HandoffRecall {
        event_id: "payment-1".into(),
        case_id: "case-2".into(),
        invoice_id: "inv-case-2".into(),
        payment_id: "bank-78".into(),
        amount_minor: 2_000,
        reason: "part paid to the creditor".into(),
        remaining_minor: Some(10_000),
        ..recall.clone()
    };
    stack.produce(&cases, &part.debtor_id, &part).await?;

    let outcomes_topic = stack.topic(&stack.topics().handoff_outcomes);
    let outcomes = eventually("five answers", WAIT, || async {
        let all = stack.read::<HandoffOutcome>(&outcomes_topic).await?;
        Ok(Some(all).filter(|a| a.len() >= 5))
    })
    .await?;
    assert!(
        outcomes.iter().all(|o| o.status == HandoffStatus::Accepted),
        "{outcomes:?}"
    );
    let references: Vec<Option<&str>> = outcomes.iter().map(|o| o.agency_reference.as_deref()).collect();
    assert_eq!(references[0], Some("nordinkasso-2026-04-20.json"), "{references:?}");
    assert!(
        references.contains(&Some("nordinkasso-2026-04-21-recalls.json")),
        "{references:?}"
    );

    let exported: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(dir.join("nordinkasso-2026-04-20.json"))?)?;
    assert_eq!(exported.len(), 2, "each case once: {exported:?}");
    assert_eq!(exported[0], serde_json::to_value(&first)?);
    assert_eq!(exported[1]["case_id"], "case-2");
    let csv = std::fs::read_to_string(dir.join("nordinkasso-2026-04-20.csv"))?;
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "a header and two rows:\n{csv}");
    assert!(lines[0].starts_with("case_id,tenant,debtor_id,"), "{csv}");
    assert!(lines[1].starts_with("case-1,nordkraft,nordkraft:kari,"), "{csv}");
    assert!(lines[1].contains(",2026-04-20,NOK,89900,"), "{csv}");
    let recalls: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(dir.join("nordinkasso-2026-04-21-recalls.json"))?)?;
    assert_eq!(
        recalls,
        vec![serde_json::to_value(&recall)?, serde_json::to_value(&part)?]
    );
    let csv = std::fs::read_to_string(dir.join("nordinkasso-2026-04-21-recalls.csv"))?;
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[0].ends_with(",remaining_minor,kind"), "{csv}");
    assert!(
        lines[1].starts_with("recall-1,") && lines[1].ends_with(",0,recall"),
        "{csv}"
    );
    assert!(
        lines[2].starts_with("payment-1,") && lines[2].ends_with(",10000,payment_on_case"),
        "a part payment is booked on the case, not recalled:\n{csv}"
    );
    let regarding: Vec<Option<&str>> = outcomes.iter().map(|o| o.regarding.as_deref()).collect();
    assert!(
        regarding.contains(&Some("recall")) && regarding.contains(&Some("payment_on_case")),
        "{regarding:?}"
    );
    let leftovers: Vec<String> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "nothing half-written stays: {leftovers:?}");
    stack.shutdown().await;
    Ok(())
}
