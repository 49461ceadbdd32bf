//! Late never means a burst, end to end: a watcher stopped for 30 simulated days sends the
//! debtor one message when it is back, not every overdue step, and the rest of the journey keeps
//! its spacing from that day.

use forfall_e2e::*;
use forfall_platform::clock::ManualClock;
use forfall_platform::records::JourneyEvent;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watcher_stopped_for_30_days_sends_one_message_when_it_is_back() -> anyhow::Result<()> {
    let clock = ManualClock::new(at("2026-09-01T06:00:00Z"));
    let stack = LocalStack::start(base_config(), clock.clone()).await?;
    stack.start_all();
    let s = danish("inv-asleep", "N-7001", day(2026, 9, 7), "asleep@example.test");
    issue_invoice(&stack, &s).await?;
    status_is(&stack, s.tenant, s.invoice_id, "open").await?;

    // The watcher is away from before the due date until 30 days after it: the nudge (due
    // date), the reminder (10 banking days) and the hand-off (20) are all overdue on its return.
    stack.kill_service("watcher").await;
    clock.set(at("2026-10-07T08:00:00Z"));
    stack.restart_service("watcher").await;
    status_is(&stack, s.tenant, s.invoice_id, "nudged").await?;
    timers_settled(&stack, &clock, &s.debtor_id()).await?;
    dispatch_caught_up(&stack, &s).await?;
    assert_eq!(
        stack.mail.to(s.email).len(),
        1,
        "one message for the catch-up, not the nudge, the reminder and the hand-off at once"
    );
    assert_eq!(
        stack.journey_status(s.tenant, s.invoice_id).await?.as_deref(),
        Some("nudged"),
        "the later steps wait for their spacing"
    );
    // What became of the message is on the invoice's timeline too.
    let sent = journey_event(&stack, s.invoice_id, "the nudge's outcome on the timeline", |e| {
        e.kind == "message_sent" && e.step.as_deref() == Some("nudge")
    })
    .await?;
    assert_eq!(sent.to_state, "nudged");
    assert!(
        sent.reason.as_deref().is_some_and(|r| r.starts_with("email sent")),
        "{sent:?}"
    );

    // The rest follows at the plan's distances, counted from the day it woke.
    advance_until_status(
        &stack,
        &clock,
        &s.debtor_id(),
        s.tenant,
        s.invoice_id,
        "handed_over",
        60,
    )
    .await?;
    let topic = stack.topic(&stack.topics().journey_events);
    let mut seen = std::collections::HashSet::new();
    let sent: Vec<JourneyEvent> = stack
        .read::<JourneyEvent>(&topic)
        .await?
        .into_iter()
        .filter(|e| e.invoice_id == s.invoice_id && e.kind == "step_sent" && seen.insert(e.event_id.clone()))
        .collect();
    let steps: Vec<&str> = sent.iter().filter_map(|e| e.step.as_deref()).collect();
    assert_eq!(steps, ["nudge", "reminder-1"]);
    assert!(
        sent[0].reason.as_deref().is_some_and(|r| r.contains("taken late")),
        "the late step says so: {:?}",
        sent[0].reason
    );
    let days_between = (sent[1].occurred_at - sent[0].occurred_at) / 86_400_000;
    assert!(
        days_between >= 14,
        "ten banking days from the late nudge to the reminder, not at once: {days_between} days"
    );
    stack.shutdown().await;
    Ok(())
}
