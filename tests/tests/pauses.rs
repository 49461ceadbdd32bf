//! Debtor requests on the dev stack: disputes, postponements and instalment plans pause and
//! resume the journey.

use forfall_domain::invoice::epoch_days;
use forfall_e2e::*;
use forfall_platform::clock::ManualClock;
use forfall_platform::records::{DebtorRequest, Instalment, JourneyEvent, new_event_id};

async fn mails(stack: &LocalStack, s: &Sample<'_>, n: usize) -> anyhow::Result<()> {
    eventually(&format!("{n} e-mails"), WAIT, || async move {
        Ok((stack.mail.to(s.email).len() == n).then_some(()))
    })
    .await
}

fn request(s: &Sample<'_>, kind: &str) -> DebtorRequest {
    DebtorRequest {
        event_id: new_event_id(),
        tenant: s.tenant.into(),
        debtor_id: s.debtor_id(),
        occurred_at: 0,
        invoice_id: s.invoice_id.into(),
        kind: kind.into(),
        new_due_date: None,
        promise_date: None,
        instalments: Vec::new(),
        reason: None,
        source: "portal".into(),
    }
}

async fn ask(stack: &LocalStack, s: &Sample<'_>, r: &DebtorRequest) -> anyhow::Result<()> {
    stack
        .produce(&stack.topic(&stack.topics().debtor_requests), &s.debtor_id(), r)
        .await
}

async fn issue(stack: &LocalStack, s: &Sample<'_>) -> anyhow::Result<()> {
    stack
        .produce(
            &stack.topic(&stack.topics().billing_invoice_events),
            &s.debtor_id(),
            &s.issued(),
        )
        .await?;
    status_is(stack, s.tenant, s.invoice_id, "open").await
}

async fn kinds(stack: &LocalStack, s: &Sample<'_>) -> anyhow::Result<Vec<String>> {
    let all = stack
        .read::<JourneyEvent>(&stack.topic(&stack.topics().journey_events))
        .await?;
    Ok(all
        .into_iter()
        .filter(|e| e.invoice_id == s.invoice_id)
        .map(|e| e.kind)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dispute_pauses_the_reminder_and_its_resolution_resumes_it() -> anyhow::Result<()> {
    let clock = ManualClock::new(at("2026-09-01T06:00:00Z"));
    let stack = LocalStack::start(base_config(), clock.clone()).await?;
    stack.start_all();
    let s = danish("inv-disp", "D-1", day(2026, 9, 2), "disp@example.test");
    issue(&stack, &s).await?;
    clock.set(at("2026-09-02T07:00:01Z"));
    mails(&stack, &s, 1).await?;
    let mut dispute = request(&s, "dispute");
    dispute.reason = Some("I cancelled this contract in July".into());
    ask(&stack, &s, &dispute).await?;
    status_is(&stack, s.tenant, s.invoice_id, "paused:dispute").await?;
    // The reminder's time comes and goes: nothing is sent while the dispute is open.
    let mark = issue_timer_mark(&stack, &s, day(2026, 9, 15)).await?;
    clock.set(at("2026-09-16T07:00:01Z"));
    timer_mark_fired(&stack, &mark).await?;
    dispatch_caught_up(&stack, &s).await?;
    assert_eq!(stack.mail.to(s.email).len(), 1, "no reminder during a dispute");
    let mut resolved = request(&s, "dispute_resolved");
    resolved.reason = Some("contract ran to 31 August".into());
    ask(&stack, &s, &resolved).await?;
    mails(&stack, &s, 2).await?;
    status_is(&stack, s.tenant, s.invoice_id, "reminded-1").await?;
    let k = kinds(&stack, &s).await?;
    for expected in ["disputed", "dispute_resolved"] {
        assert!(k.iter().any(|x| x == expected), "timeline has {expected}: {k:?}");
    }
    stack.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postponement_moves_the_nudge_and_a_second_one_is_refused() -> anyhow::Result<()> {
    let clock = ManualClock::new(at("2026-09-01T06:00:00Z"));
    let stack = LocalStack::start(base_config(), clock.clone()).await?;
    stack.start_all();
    let s = danish("inv-post", "P-1", day(2026, 9, 2), "post@example.test");
    issue(&stack, &s).await?;
    let mut postpone = request(&s, "postpone");
    postpone.new_due_date = Some(epoch_days(day(2026, 9, 20)));
    ask(&stack, &s, &postpone).await?;
    eventually("the postponement", WAIT, || async {
        Ok(kinds(&stack, &s).await?.contains(&"postponed".to_owned()).then_some(()))
    })
    .await?;
    let mut again = request(&s, "postpone");
    again.new_due_date = Some(epoch_days(day(2026, 9, 25)));
    ask(&stack, &s, &again).await?;
    eventually("the second postponement refused", WAIT, || async {
        Ok(kinds(&stack, &s)
            .await?
            .contains(&"request_refused".to_owned())
            .then_some(()))
    })
    .await?;
    let mark = issue_timer_mark(&stack, &s, day(2026, 9, 2)).await?;
    clock.set(at("2026-09-02T07:00:01Z"));
    timer_mark_fired(&stack, &mark).await?;
    dispatch_caught_up(&stack, &s).await?;
    assert!(stack.mail.to(s.email).is_empty(), "no nudge on the original due date");
    // 20 September 2026 is a Sunday: the new due date counts from Monday the 21st.
    clock.set(at("2026-09-21T07:00:01Z"));
    mails(&stack, &s, 1).await?;
    stack.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instalments_hold_the_journey_until_one_is_missed() -> anyhow::Result<()> {
    let clock = ManualClock::new(at("2026-09-01T06:00:00Z"));
    let stack = LocalStack::start(base_config(), clock.clone()).await?;
    stack.start_all();
    let s = danish("inv-inst", "I-1", day(2026, 9, 2), "inst@example.test");
    issue(&stack, &s).await?;
    clock.set(at("2026-09-02T07:00:01Z"));
    mails(&stack, &s, 1).await?;
    let mut plan = request(&s, "instalment_plan");
    plan.instalments = vec![
        Instalment {
            due_date: epoch_days(day(2026, 9, 10)),
            amount_minor: 60_000,
        },
        Instalment {
            due_date: epoch_days(day(2026, 10, 9)),
            amount_minor: 63_450,
        },
    ];
    ask(&stack, &s, &plan).await?;
    status_is(&stack, s.tenant, s.invoice_id, "paused:instalments").await?;
    stack
        .produce(
            &stack.topic(&stack.topics().payments),
            "bank",
            &s.payment("bank-i1", 60_000, s.reference),
        )
        .await?;
    eventually("the first instalment", WAIT, || async {
        Ok(kinds(&stack, &s)
            .await?
            .contains(&"partly_paid".to_owned())
            .then_some(()))
    })
    .await?;
    // The reminder's own time passes while the plan is kept.
    let mark = issue_timer_mark(&stack, &s, day(2026, 9, 15)).await?;
    clock.set(at("2026-09-16T07:00:01Z"));
    timer_mark_fired(&stack, &mark).await?;
    dispatch_caught_up(&stack, &s).await?;
    assert_eq!(
        stack.mail.to(s.email).len(),
        1,
        "no reminder while instalments are paid"
    );
    assert_eq!(
        stack.journey_status(s.tenant, s.invoice_id).await?.as_deref(),
        Some("paused:instalments")
    );
    // The second instalment (9 October) is missed: checked after three days' grace.
    clock.set(at("2026-10-13T07:00:01Z"));
    mails(&stack, &s, 2).await?;
    status_is(&stack, s.tenant, s.invoice_id, "reminded-1").await?;
    let k = kinds(&stack, &s).await?;
    assert!(
        k.contains(&"instalment_plan_agreed".to_owned()) && k.contains(&"resumed".to_owned()),
        "{k:?}"
    );
    stack.shutdown().await;
    Ok(())
}
