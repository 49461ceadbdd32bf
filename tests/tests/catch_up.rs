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

/// A billing run falls due at once on every partition: the watcher fires the partitions'
/// batches at the same time, and an invoice a batch wants while another holds its lock is fired
/// in a later round. Every invoice's nudge goes out once, and a debtor's two invoices due
/// together still go as one message, however the batches met.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invoices_due_together_on_every_partition_go_once_each_and_a_debtors_as_one_message() -> anyhow::Result<()> {
    use forfall_platform::records::JourneyAction;
    let due = day(2026, 11, 2);
    let clock = ManualClock::new(at("2026-11-02T06:00:00Z"));
    let mut stack = LocalStack::start(base_config(), clock.clone()).await?;
    // Small claims, so that each partition fires several batches while the others fire theirs,
    // and few locks, so that they often want the same one.
    stack.set("watcher.batch", 300);
    stack.set("watcher.lock_stripes", 64);
    let stack = stack;
    let (store, producer) = watcher_store(&stack).await?;
    let law = forfall_domain::law::LawBook::builtin()?;
    let policy = forfall_domain::policy::load(forfall_domain::policy::DEFAULT_POLICY, &law, due)?;
    let partitions = stack.rt.config.kafka.partitions;
    let debtors = 1_500;
    let mut invoices = Vec::new();
    let mut saves = Vec::new();
    for d in 0..debtors {
        for k in 0..2 {
            let mut snapshot = household_invoice("together-", 2 * d + k, due)?;
            snapshot.debtor_id = format!("acme-energy:together-c-{d:06}");
            invoices.push((snapshot.debtor_id.clone(), snapshot.invoice_id.clone()));
            let partition = partition_of(&snapshot.debtor_id, partitions);
            let opened = opened_new_customer(&policy, snapshot, due);
            saves.push(new_journey_save(opened.journey, partition, opened.timer));
        }
        if saves.len() >= 1_000 || d + 1 == debtors {
            write_journeys(&store, &producer, std::mem::take(&mut saves)).await?;
        }
    }

    // 09:00 in Copenhagen: every nudge is due.
    clock.set(at("2026-11-02T08:00:01Z"));
    stack.start_service("watcher");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    for (_, invoice) in &invoices {
        while stack.journey_status("acme-energy", invoice).await?.as_deref() != Some("nudged") {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "{invoice} not nudged within 3 minutes"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    // Every journey is written, and its actions were acknowledged before it: all are on the topic.
    let actions: Vec<JourneyAction> = stack.read(&stack.topic(&stack.topics().journey_actions)).await?;
    let mut by_debtor: std::collections::HashMap<&str, Vec<&JourneyAction>> = std::collections::HashMap::new();
    for a in &actions {
        by_debtor.entry(a.debtor_id.as_str()).or_default().push(a);
    }
    let mut told = std::collections::HashMap::new();
    let each_debtor: std::collections::BTreeSet<&String> = invoices.iter().map(|(d, _)| d).collect();
    for debtor in each_debtor {
        let mine = by_debtor.get(debtor.as_str()).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(
            mine.len(),
            1,
            "{debtor}: one message for both invoices due together, got {mine:?}"
        );
        for a in mine {
            *told.entry(a.invoice_id.clone()).or_insert(0) += 1;
            for c in &a.covers {
                *told.entry(c.invoice_id.clone()).or_insert(0) += 1;
            }
        }
    }
    for (_, invoice) in &invoices {
        assert_eq!(told.get(invoice), Some(&1), "{invoice} in exactly one message");
    }
    assert_eq!(actions.len(), debtors, "no other action");
    Ok(())
}
