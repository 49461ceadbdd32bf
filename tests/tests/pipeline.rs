//! One invoice through every service, on the real dev stack (tansu, Redis, SMTP, HTTP),
//! with simulated time.

use std::time::Duration;

use chrono::Duration as Days;
use forfall_e2e::*;
use forfall_platform::clock::ManualClock;
use forfall_platform::records::{
    DispatchOutcome, DispatchStatus, HandoffOutcome, HandoffStatus, JourneyAction, JourneyEvent,
};

/// The whole pipeline on a manual clock set to `start`.
async fn pipeline(start: &str) -> anyhow::Result<(std::sync::Arc<ManualClock>, LocalStack)> {
    let clock = ManualClock::new(at(start));
    let mut stack = LocalStack::start(base_config(), clock.clone()).await?;
    stack.set("watcher.open_invoices_refresh_ms", 100);
    stack.start_all();
    Ok((clock, stack))
}

/// Billing issues the sample invoice; returns once the watcher has opened its journey.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nudge_is_mailed_then_payment_closes_the_invoice_and_silences_it() -> anyhow::Result<()> {
    let (clock, stack) = pipeline("2026-03-10T08:00:00Z").await?;
    let s = danish("inv-1", "INV-1001", day(2026, 3, 12), "anna@example.test");
    issue(&stack, &s).await?;
    assert!(stack.mail.messages().is_empty(), "nothing is sent before the due date");

    // 09:00 in Copenhagen on the due date (CET, UTC+1).
    clock.set(at("2026-03-12T08:00:01Z"));
    let mails = eventually("the nudge e-mail", WAIT, || async {
        Ok(Some(stack.mail.to("anna@example.test")).filter(|m| !m.is_empty()))
    })
    .await?;
    let mail = &mails[0];
    let subject = mail.header("Subject").unwrap_or_default();
    assert!(subject.contains("INV-1001"), "subject names the invoice: {subject}");
    let body = mail.body();
    assert!(body.contains("INV-1001"), "{body}");
    assert!(
        body.contains("1.234,50\u{a0}kr."),
        "body states the amount as Danes write it: {body}"
    );
    assert!(body.contains("12.03.2026"), "and the due date: {body}");
    assert!(
        body.contains("RF18539007547034"),
        "body carries the payment reference: {body}"
    );

    // An SRE sees it open after its nudge, and the nudge among the messages of its segment
    // (outside any experiment).
    let tenant = format!("tenant=\"{}\"", s.tenant);
    eventually("the invoice counted open after its nudge", WAIT, || async {
        let m = stack.metrics("watcher").await?;
        let open = metric_value(
            &m,
            "forfall_watcher_open_invoices{",
            &[&tenant, "stage=\"after_nudge\""],
        );
        Ok((open == Some(1.0)).then_some(()))
    })
    .await?;
    let m = stack.metrics("dispatch").await?;
    let nudges = metric_value(
        &m,
        "forfall_dispatch_messages_total{",
        &[
            "step=\"nudge\"",
            "channel=\"email\"",
            "experiment=\"none\"",
            "variant=\"none\"",
        ],
    );
    assert_eq!(nudges, Some(1.0), "{m}");

    // The bank quotes the reference with spaces, as printed.
    let payment = s.payment("bank-tx-1", 123_450, "RF18 5390 0754 7034");
    stack
        .produce(&stack.topic(&stack.topics().payments), "bank", &payment)
        .await?;
    status_is(&stack, s.tenant, s.invoice_id, "closed:paid").await?;
    // Credit control sees where it was paid: after the nudge, before any reminder.
    let watcher = stack.rt.admin_addr("watcher").expect("the watcher serves HTTP");
    let metrics = reqwest::get(format!("http://{watcher}/metrics")).await?.text().await?;
    // Every stage is there from the start (at zero), so a rate sees the first settlement.
    let settled: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("forfall_watcher_settlements_total{") && !l.ends_with(" 0"))
        .collect();
    assert_eq!(settled.len(), 1, "{metrics}");
    assert!(
        settled[0].contains("stage=\"after_nudge\"") && settled[0].ends_with(" 1"),
        "{settled:?}"
    );
    assert!(
        metric_value(
            &metrics,
            "forfall_watcher_settlements_total{",
            &["stage=\"before_any_message\""]
        ) == Some(0.0),
        "{metrics}"
    );
    // How long the paid debtor could still have been messaged: one payment measured.
    assert_eq!(
        metric_value(&metrics, "forfall_watcher_payment_to_stop_seconds_count", &[]),
        Some(1.0),
        "{metrics}"
    );
    // Paid: no longer open in any stage.
    eventually("the paid invoice no longer counted open", WAIT, || async {
        let m = stack.metrics("watcher").await?;
        let open = metric_value(&m, "forfall_watcher_open_invoices{", &[&tenant]);
        Ok(open.is_none_or(|n| n == 0.0).then_some(()))
    })
    .await?;

    // Past the reminder and the hand-off dates: nothing more happens.
    let mark = issue_timer_mark(&stack, &s, day(2026, 4, 20)).await?;
    clock.advance(Days::days(40));
    timer_mark_fired(&stack, &mark).await?;
    dispatch_caught_up(&stack, &s).await?;
    assert_eq!(stack.mail.to("anna@example.test").len(), 1, "no e-mail after payment");
    assert!(stack.agency.requests().is_empty(), "no hand-off after payment");
    let kinds: Vec<String> = stack
        .read::<JourneyEvent>(&stack.topic(&stack.topics().journey_events))
        .await?
        .into_iter()
        .map(|e| e.kind)
        .collect();
    for k in ["opened", "step_sent", "paid"] {
        assert!(kinds.iter().any(|x| x == k), "timeline has '{k}': {kinds:?}");
    }
    stack.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invoice_paid_before_its_due_date_gets_no_message_at_all() -> anyhow::Result<()> {
    let (clock, stack) = pipeline("2026-05-04T08:00:00Z").await?;
    let s = danish("inv-early", "INV-2001", day(2026, 5, 8), "early@example.test");
    stack
        .produce(
            &stack.topic(&stack.topics().billing_invoice_events),
            &s.debtor_id(),
            &s.issued(),
        )
        .await?;
    stack
        .produce(
            &stack.topic(&stack.topics().payments),
            "bank",
            &s.payment("bank-tx-9", 123_450, "RF18539007547034"),
        )
        .await?;
    status_is(&stack, s.tenant, s.invoice_id, "closed:paid").await?;
    // A mark: another debtor's invoice on the same partition, due after this one, that goes the
    // whole way to the agency. Once it is handed over, every timer of the partition due by then
    // has fired; once dispatch and hand-off have handled everything on their topics, whatever the
    // paid invoice could have caused would be on record.
    let mark = issue_timer_mark(&stack, &s, day(2026, 5, 11)).await?;
    advance_until_status(
        &stack,
        &clock,
        &mark.debtor_id(),
        mark.tenant,
        mark.invoice_id,
        "handed_over",
        60,
    )
    .await?;
    let topics = stack.topics();
    consumed_to_end(&stack, "dispatch", &[stack.topic(&topics.journey_actions)]).await?;
    consumed_to_end(&stack, "handoff", &[stack.topic(&topics.handoff_cases)]).await?;
    assert!(stack.mail.to(s.email).is_empty(), "no e-mail for an invoice paid early");
    assert!(
        !stack
            .read::<JourneyAction>(&stack.topic(&topics.journey_actions))
            .await?
            .iter()
            .any(|a| a.invoice_id == s.invoice_id || a.covers.iter().any(|c| c.invoice_id == s.invoice_id)),
        "no journey action at all for it"
    );
    let requests = stack.agency.requests();
    assert!(!requests.is_empty(), "the mark reached the agency");
    // The default plan sends no påkrav: the case tells the agency that it must (inkassoloven
    // § 10, 10 days) before collecting.
    let mark_case = requests
        .iter()
        .map(|r| r.json())
        .find(|c| c["invoice_id"] == mark.invoice_id)
        .expect("the mark's case");
    assert_eq!(mark_case["collection_warning"]["given"], false, "{mark_case}");
    assert_eq!(mark_case["collection_warning"]["required_days"], 10);
    assert_eq!(mark_case["collection_warning"]["citation"], "inkassoloven § 10");
    assert!(
        !requests.iter().any(|r| r.json()["invoice_id"] == s.invoice_id),
        "the paid invoice never reached the agency"
    );
    stack.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redelivered_action_and_a_crashed_dispatch_still_send_exactly_one_email() -> anyhow::Result<()> {
    let (clock, stack) = pipeline("2026-06-01T06:00:00Z").await?;
    let s = danish("inv-dup", "INV-3001", day(2026, 6, 1), "dup@example.test");
    issue(&stack, &s).await?;
    clock.set(at("2026-06-01T07:00:01Z")); // 09:00 CEST
    eventually("the nudge e-mail", WAIT, || async {
        Ok((stack.mail.messages().len() == 1).then_some(()))
    })
    .await?;

    // A crash right after sending: dispatch is killed before it could commit, then restarted.
    stack.kill_service("dispatch").await;
    // And the same action is delivered twice more (an upstream retry).
    let actions_topic = stack.topic(&stack.topics().journey_actions);
    let raw = stack.read_raw(&actions_topic).await?;
    assert_eq!(raw.len(), 1, "one action for the one step");
    stack.produce_raw(&actions_topic, &s.debtor_id(), &raw[0]).await?;
    stack.produce_raw(&actions_topic, &s.debtor_id(), &raw[0]).await?;
    stack.restart_service("dispatch").await;

    // The restarted dispatch reports both redeliveries (and the first delivery, when the kill
    // came before its commit) as duplicates, and sends nothing.
    eventually("two redeliveries seen as duplicates", WAIT, || async {
        let m = stack.metrics("dispatch").await.unwrap_or_default();
        Ok(
            (metric_value(&m, "forfall_dispatch_outcomes_total", &["status=\"duplicate\""]).is_some_and(|n| n >= 2.0))
                .then_some(()),
        )
    })
    .await?;
    let outcomes = stack
        .read::<DispatchOutcome>(&stack.topic(&stack.topics().dispatch_outcomes))
        .await?;
    // The send is on record even when the kill came before its outcome was produced: every
    // redelivery reports the same SENT outcome (one event id, one Message-ID). The one window
    // left by design (a kill between the SMTP server's acceptance and recording it) shows as
    // DUPLICATE "delivery unknown" instead, and still sends nothing again.
    let sent: Vec<&DispatchOutcome> = outcomes.iter().filter(|o| o.status == DispatchStatus::Sent).collect();
    let unconfirmed = |o: &&DispatchOutcome| {
        o.status == DispatchStatus::Duplicate && o.reason.as_deref().unwrap_or("").contains("delivery unknown")
    };
    assert!(
        !sent.is_empty() || outcomes.iter().any(|o| unconfirmed(&o)),
        "{outcomes:?}"
    );
    assert!(
        sent.iter()
            .all(|o| o.event_id == sent[0].event_id && o.provider_message_id == sent[0].provider_message_id),
        "{outcomes:?}"
    );
    assert!(
        outcomes
            .iter()
            .all(|o| o.status == DispatchStatus::Sent || unconfirmed(&o)),
        "{outcomes:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        stack.mail.messages().len(),
        1,
        "exactly one e-mail reached the SMTP server"
    );
    let message_id = stack.mail.messages()[0].header("Message-ID").unwrap_or_default();
    assert!(
        message_id.contains(&outcomes[0].action_id),
        "Message-ID derives from the action: {message_id}"
    );
    stack.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unpaid_invoice_reaches_the_agency_as_one_case_once() -> anyhow::Result<()> {
    let (clock, stack) = pipeline("2026-09-01T06:00:00Z").await?;
    let s = danish("inv-unpaid", "INV-4001", day(2026, 9, 2), "late@example.test");
    issue(&stack, &s).await?;
    let mails = |n: usize| {
        let stack = &stack;
        async move {
            eventually(&format!("{n} e-mails"), WAIT, || async move {
                Ok((stack.mail.to("late@example.test").len() == n).then_some(()))
            })
            .await
        }
    };
    clock.set(at("2026-09-02T07:00:01Z"));
    status_is(&stack, s.tenant, s.invoice_id, "nudged").await?;
    mails(1).await?;
    clock.set(at("2026-09-16T07:00:01Z"));
    status_is(&stack, s.tenant, s.invoice_id, "reminded-1").await?;
    mails(2).await?;
    clock.set(at("2026-09-30T07:00:01Z"));
    status_is(&stack, s.tenant, s.invoice_id, "handed_over").await?;

    let outcomes_topic = stack.topic(&stack.topics().handoff_outcomes);
    let outcome = eventually("the agency's answer", WAIT, || async {
        Ok(stack.read::<HandoffOutcome>(&outcomes_topic).await?.into_iter().next())
    })
    .await?;
    assert_eq!(outcome.status, HandoffStatus::Accepted);
    assert_eq!(outcome.agency_reference.as_deref(), Some("AG-1"));
    // Remembered for `handoff.remember_days` (400), not forever.
    let remembered: i64 = redis::cmd("TTL")
        .arg(format!(
            "{}handoff:accepted:{}",
            stack.rt.config.redis.key_prefix, outcome.case_id
        ))
        .query_async(&mut stack.redis())
        .await?;
    assert!(
        remembered > 399 * 86_400 && remembered <= 400 * 86_400,
        "the acceptance expires after 400 days (TTL {remembered} s)"
    );
    let mark = issue_timer_mark(&stack, &s, day(2026, 10, 29)).await?;
    clock.advance(Days::days(30));
    timer_mark_fired(&stack, &mark).await?;
    dispatch_caught_up(&stack, &s).await?;
    // Hand-off's mark: the case again, for the same debtor (handled after any case the watcher
    // produced before it), recognised as a duplicate and not posted again.
    let cases_topic = stack.topic(&stack.topics().handoff_cases);
    let duplicates = || async {
        let m = stack.metrics("handoff").await.unwrap_or_default();
        metric_value(&m, "forfall_handoff_cases_total", &["result=\"duplicate\""]).unwrap_or(0.0)
    };
    let before = duplicates().await;
    let case = stack
        .read_raw(&cases_topic)
        .await?
        .into_iter()
        .next()
        .expect("the case");
    stack.produce_raw(&cases_topic, &s.debtor_id(), &case).await?;
    eventually("hand-off's mark", WAIT, || async {
        Ok((duplicates().await > before).then_some(()))
    })
    .await?;
    let requests = stack.agency.requests();
    assert_eq!(requests.len(), 1, "one case, once");
    let case = requests[0].json();
    assert_eq!(case["invoice_number"], "INV-4001");
    assert_eq!(case["principal_minor"], 123_450);
    assert_eq!(
        case["steps_taken"],
        serde_json::json!(["nudge", "reminder-1", "handoff"])
    );
    assert_eq!(requests[0].header("idempotency-key"), Some(outcome.case_id.as_str()));
    // Signed as the agency API documents it: the body with its timestamp, under the shared secret.
    let (timestamp, signature) = (
        requests[0].header("x-forfall-timestamp").unwrap_or_default(),
        requests[0].header("x-forfall-signature").unwrap_or_default(),
    );
    let now = chrono::Utc::now().timestamp();
    assert!(
        forfall_platform::signing::verify(
            forfall::devstack::AGENCY_SIGNING_SECRET,
            timestamp,
            signature,
            &requests[0].body,
            now
        ),
        "signed: {timestamp} {signature}"
    );
    assert!(!forfall_platform::signing::verify(
        "another secret",
        timestamp,
        signature,
        &requests[0].body,
        now
    ));
    assert_eq!(stack.mail.to("late@example.test").len(), 2, "nudge and reminder");
    stack.shutdown().await;
    Ok(())
}

/// Dispatch's last look judges a journey that already includes the action's own step: while
/// the watcher's write lags the action, dispatch waits instead of acting on the older state.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_last_look_waits_for_the_journey_to_include_the_action() -> anyhow::Result<()> {
    use forfall_platform::records::{JourneyAction, derived_id, new_event_id};
    use forfall_platform::redis_store::Keys;
    let stack = LocalStack::start(base_config(), ManualClock::new(at("2026-10-13T07:00:00Z"))).await?;
    stack.start_service("dispatch");
    let keys = Keys::new(&stack.rt.config.redis.key_prefix);
    let mut redis = stack.redis();
    // As the watcher left it before resuming: paused, the reminder (step 1) not yet recorded.
    let _: () = journey_header(&keys, "acme-energy", "lag-1", "paused:instalments", Some(1))
        .query_async(&mut redis)
        .await?;
    let action = JourneyAction {
        event_id: new_event_id(),
        tenant: "acme-energy".into(),
        debtor_id: "acme-energy:lag@example.test".into(),
        occurred_at: 0,
        action_id: derived_id("action", &["acme-energy", "lag-1", "reminder-1"]),
        invoice_id: "lag-1".into(),
        invoice_number: "L-1".into(),
        step: "reminder-1".into(),
        step_index: 1,
        tone: "reminder".into(),
        channels: vec!["email".into()],
        send_at: 0,
        open_minor: 63_450,
        fee_minor: 0,
        currency: "DKK".into(),
        due_date: 20_000,
        pay_by: None,
        payment_reference: None,
        policy_version: "p".into(),
        jurisdiction: "DK".into(),
        debtor_name: None,
        email: Some("lag@example.test".into()),
        phone: None,
        language: Some("da".into()),
        description: None,
        interest_minor: 0,
        interest_rate_bp: None,
        compensation_minor: 0,
        covers: Vec::new(),
        segment: None,
        experiment: None,
    };
    stack
        .produce(
            &stack.topic(&stack.topics().journey_actions),
            &action.debtor_id,
            &action,
        )
        .await?;
    // Dispatch has judged the action at least twice and waited each time (its handling failed
    // as transient, to be retried): a send on the older state would have left no retry.
    eventually("dispatch to wait on the action twice", WAIT, || async {
        let m = stack.metrics("dispatch").await.unwrap_or_default();
        Ok(
            (metric_value(&m, "forfall_retries_total", &["operation=\"handle\""]).is_some_and(|n| n >= 2.0))
                .then_some(()),
        )
    })
    .await?;
    assert!(
        stack.mail.messages().is_empty(),
        "not sent on a state that does not include the step"
    );
    assert!(
        stack
            .read_raw(&stack.topic(&stack.topics().dispatch_outcomes))
            .await?
            .is_empty(),
        "and not suppressed either: it waits"
    );
    // The watcher's write lands: the journey resumed and recorded the reminder.
    let _: () = journey_header(&keys, "acme-energy", "lag-1", "reminded-1", Some(2))
        .query_async(&mut redis)
        .await?;
    eventually("the reminder", WAIT, || async {
        Ok((stack.mail.to("lag@example.test").len() == 1).then_some(()))
    })
    .await?;
    stack.shutdown().await;
    Ok(())
}
