//! Redis is derived state: the watcher's journeys, timers, debtors' open invoices, late history
//! and parked payments come back from its changelog when Redis loses them (a flush, a failover
//! to an empty replica) or goes back in time (a restart from an older snapshot), and the
//! debtors see nothing of it: no journey restarted, no message twice, none after payment, every
//! journey ending where it would have.

use forfall_domain::reference::{ReferenceKind, generate};
use forfall_e2e::servers::RedisServer;
use forfall_e2e::*;
use forfall_platform::clock::ManualClock;
use forfall_platform::records::{HandoffCase, JourneyEvent};

/// A copy of the watcher's keys, as a snapshot of Redis holds them.
async fn snapshot(stack: &LocalStack) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut redis = stack.redis();
    let mut out = Vec::new();
    for key in watcher_keys(&stack.rt.config).await? {
        let dumped: Option<Vec<u8>> = redis::cmd("DUMP").arg(&key).query_async(&mut redis).await?;
        out.extend(dumped.map(|d| (key, d)));
    }
    Ok(out)
}

/// Redis as an older snapshot had it: the watcher's keys replaced by the copy.
async fn restore_snapshot(stack: &LocalStack, copy: &[(String, Vec<u8>)]) -> anyhow::Result<()> {
    lose_watcher_state(&stack.rt.config).await?;
    let mut pipe = redis::pipe();
    for (key, dumped) in copy {
        pipe.cmd("RESTORE").arg(key).arg(0).arg(dumped.as_slice()).ignore();
    }
    let _: () = pipe.query_async(&mut stack.redis()).await?;
    Ok(())
}

/// Twelve invoices of eight debtors (four with two), due on Monday 7 September 2026, each with
/// a reference of its own.
fn workload() -> Vec<Sample<'static>> {
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    (0..12)
        .map(|i| {
            let debtor = i % 8;
            let reference = generate(ReferenceKind::Rf, &format!("4711{i:04}")).expect("an RF reference");
            Sample {
                reference: leak(reference.value),
                amount_minor: 50_000 + i as i64 * 1_000,
                ..danish(
                    leak(format!("inv-{i:02}")),
                    leak(format!("N-{i:02}")),
                    day(2026, 9, 7),
                    leak(format!("debtor-{debtor}@example.test")),
                )
            }
        })
        .collect()
}

type Started = (std::sync::Arc<ManualClock>, LocalStack, Vec<Sample<'static>>);

async fn start(start: &str) -> anyhow::Result<Started> {
    start_on(base_config(), start).await
}

/// The workload issued and nudged on a stack with `config`.
async fn start_on(config: forfall_platform::config::CommonConfig, start: &str) -> anyhow::Result<Started> {
    let clock = ManualClock::new(at(start));
    let stack = LocalStack::start(config, clock.clone()).await?;
    stack.start_all();
    let invoices = workload();
    for s in &invoices {
        issue_invoice(&stack, s).await?;
    }
    for s in &invoices {
        status_is(&stack, s.tenant, s.invoice_id, "open").await?;
    }
    // The due date's nudges.
    clock.set(at("2026-09-07T07:00:01Z"));
    for s in &invoices {
        status_is(&stack, s.tenant, s.invoice_id, "nudged").await?;
    }
    Ok((clock, stack, invoices))
}

async fn pay(stack: &LocalStack, s: &Sample<'_>) -> anyhow::Result<()> {
    let payment = s.payment(&format!("pay-{}", s.invoice_id), s.amount_minor, s.reference);
    stack
        .produce(&stack.topic(&stack.topics().payments), "bank", &payment)
        .await
}

/// Runs the clock on until every unpaid invoice is with the agency, then checks what the
/// debtors and the agency got: one nudge each; a reminder for each unpaid invoice and none for
/// a paid one; each unpaid invoice handed over once; no journey opened twice.
async fn finish_and_check(
    stack: &LocalStack,
    clock: &ManualClock,
    invoices: &[Sample<'static>],
    paid: &[&str],
    paid_before_nudge: &[&str],
) -> anyhow::Result<()> {
    let unpaid: Vec<&Sample<'static>> = invoices.iter().filter(|s| !paid.contains(&s.invoice_id)).collect();
    for s in &unpaid {
        advance_until_status(stack, clock, &s.debtor_id(), s.tenant, s.invoice_id, "handed_over", 60).await?;
    }
    for s in invoices.iter().filter(|s| paid.contains(&s.invoice_id)) {
        status_is(stack, s.tenant, s.invoice_id, "closed:paid").await?;
    }
    let topics = stack.topics();
    consumed_to_end(stack, "dispatch", &[stack.topic(&topics.journey_actions)]).await?;
    consumed_to_end(stack, "handoff", &[stack.topic(&topics.handoff_cases)]).await?;
    let events = stack.read::<JourneyEvent>(&stack.topic(&topics.journey_events)).await?;
    let cases = stack.read::<HandoffCase>(&stack.topic(&topics.handoff_cases)).await?;
    for s in invoices {
        // A redelivered event carries its first delivery's id: counted once.
        let mut seen = std::collections::HashSet::new();
        let mine: Vec<&JourneyEvent> = events
            .iter()
            .filter(|e| e.invoice_id == s.invoice_id && seen.insert(e.event_id.clone()))
            .collect();
        let opened = mine.iter().filter(|e| e.kind == "opened").count();
        assert_eq!(opened, 1, "{} opened once, never restarted: {mine:?}", s.invoice_id);
        let steps: Vec<&str> = mine
            .iter()
            .filter(|e| e.kind == "step_sent")
            .filter_map(|e| e.step.as_deref())
            .collect();
        let want: &[&str] = if paid_before_nudge.contains(&s.invoice_id) {
            &[]
        } else if paid.contains(&s.invoice_id) {
            &["nudge"]
        } else {
            &["nudge", "reminder-1"]
        };
        assert_eq!(steps, want, "{}: each step once", s.invoice_id);
        let handed = cases.iter().filter(|c| c.invoice_id == s.invoice_id).count();
        assert_eq!(
            handed,
            usize::from(!paid.contains(&s.invoice_id)),
            "{} handed over once if unpaid, never if paid",
            s.invoice_id
        );
    }
    // What reached the mail provider: each (invoice, step) at most once, and for a paid
    // invoice nothing after its nudge. (A reminder held for contact hours may end suppressed when
    // the hand-off overtakes it, as the clock runs in half days here.)
    let mut sent = std::collections::HashMap::<(String, String), usize>::new();
    let mut outcome_ids = std::collections::HashSet::new();
    for o in dispatch_outcomes(stack).await? {
        // A redelivered action's outcome is the same event again (same id): counted once.
        if o.status == forfall_platform::records::DispatchStatus::Sent && outcome_ids.insert(o.event_id.clone()) {
            *sent.entry((o.invoice_id.clone(), o.step.clone())).or_default() += 1;
        }
    }
    for ((invoice, step), n) in &sent {
        assert_eq!(*n, 1, "{invoice} {step} sent {n} times");
        assert!(
            !(paid_before_nudge.contains(&invoice.as_str()) || paid.contains(&invoice.as_str()) && step != "nudge"),
            "{invoice} {step} sent after its payment"
        );
    }
    let mails: usize = (0..8)
        .map(|d| stack.mail.to(&format!("debtor-{d}@example.test")).len())
        .sum();
    assert_eq!(mails, sent.len(), "every mail is one sent outcome");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watcher_whose_redis_state_is_lost_mid_journey_rebuilds_it_and_nobody_notices() -> anyhow::Result<()> {
    let (clock, stack, invoices) = start("2026-09-01T06:00:00Z").await?;
    // Four are paid before Redis loses the state; one after.
    let paid = ["inv-00", "inv-03", "inv-05", "inv-09", "inv-10"];
    for s in invoices.iter().filter(|s| paid[..4].contains(&s.invoice_id)) {
        pay(&stack, s).await?;
        status_is(&stack, s.tenant, s.invoice_id, "closed:paid").await?;
    }

    // Eight open, all nudged: what the open-invoice gauge reads.
    let open = open_invoice_counts(&stack.rt.config).await?;
    let nudged = format!("nudged|{}", invoices[0].tenant);
    assert_eq!(open, [(nudged.clone(), 8)].into(), "{open:?}");

    lose_watcher_state(&stack.rt.config).await?;
    // Noticed without any record arriving: the journeys come back as they were.
    for s in &invoices {
        let want = if paid[..4].contains(&s.invoice_id) {
            "closed:paid"
        } else {
            "nudged"
        };
        status_is(&stack, s.tenant, s.invoice_id, want).await?;
    }
    // And the counts with them, each journey counted once.
    assert_eq!(open_invoice_counts(&stack.rt.config).await?, open);
    // Lost again, and this time a record is what finds it: a revision of an unpaid invoice
    // (its amount credited down) must continue its journey, not open it anew at step 0.
    lose_watcher_state(&stack.rt.config).await?;
    let revised = &invoices[1];
    let mut revision = revised.issued();
    revision.revision = 2;
    revision.amount_minor -= 1_000;
    stack
        .produce(
            &stack.topic(&stack.topics().billing_invoice_events),
            &revised.debtor_id(),
            &revision,
        )
        .await?;
    journey_event(&stack, revised.invoice_id, "the revision applied", |e| {
        e.open_minor == revised.amount_minor - 1_000
    })
    .await?;
    status_is(&stack, revised.tenant, revised.invoice_id, "nudged").await?;
    let last = invoices
        .iter()
        .find(|s| s.invoice_id == paid[4])
        .expect("in the workload");
    pay(&stack, last).await?;
    status_is(&stack, last.tenant, last.invoice_id, "closed:paid").await?;

    finish_and_check(&stack, &clock, &invoices, &paid, &[]).await?;
    stack.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restored_from_an_older_snapshot_is_brought_up_to_date_from_the_changelog() -> anyhow::Result<()> {
    let (clock, stack, invoices) = start("2026-09-01T06:00:00Z").await?;
    let older = snapshot(&stack).await?;
    // After the snapshot: payments settle three invoices.
    let paid = ["inv-02", "inv-06", "inv-11"];
    for s in invoices.iter().filter(|s| paid.contains(&s.invoice_id)) {
        pay(&stack, s).await?;
        status_is(&stack, s.tenant, s.invoice_id, "closed:paid").await?;
    }
    // Redis comes back from the snapshot: those invoices read "nudged" again there, until the
    // watcher notices its state went back and replays what the snapshot is missing.
    restore_snapshot(&stack, &older).await?;
    for s in invoices.iter().filter(|s| paid.contains(&s.invoice_id)) {
        status_is(&stack, s.tenant, s.invoice_id, "closed:paid").await?;
    }
    // The snapshot counted twelve open; brought up to date, the counts say nine.
    let nudged = format!("nudged|{}", invoices[0].tenant);
    assert_eq!(open_invoice_counts(&stack.rt.config).await?, [(nudged, 9)].into());
    finish_and_check(&stack, &clock, &invoices, &paid, &[]).await?;
    stack.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_closed_journey_and_old_late_history_leave_after_their_retention_and_an_open_journey_stays()
-> anyhow::Result<()> {
    let clock = ManualClock::new(at("2026-09-01T06:00:00Z"));
    let mut stack = LocalStack::start(base_config(), clock.clone()).await?;
    stack.set("watcher.closed_retention_days", 3);
    stack.set("watcher.retention_sweep_secs", 1);
    stack.start_all();
    // Two invoices of one debtor (so of one partition): one is paid, one stays open.
    let invoices = workload();
    let (paid, open) = (&invoices[0], &invoices[8]);
    assert_eq!(paid.email, open.email);
    for s in [paid, open] {
        issue_invoice(&stack, s).await?;
        status_is(&stack, s.tenant, s.invoice_id, "open").await?;
    }
    pay(&stack, paid).await?;
    status_is(&stack, paid.tenant, paid.invoice_id, "closed:paid").await?;

    clock.advance(chrono::Duration::days(4));
    eventually(
        "the paid invoice's journey removed after its retention",
        WAIT,
        || async {
            Ok(stack
                .journey_status(paid.tenant, paid.invoice_id)
                .await?
                .is_none()
                .then_some(()))
        },
    )
    .await?;
    assert!(
        stack.journey_status(open.tenant, open.invoice_id).await?.is_some(),
        "an open journey never expires"
    );
    // It left the changelog too: a rebuild brings the open one back and not the removed one.
    lose_watcher_state(&stack.rt.config).await?;
    let partition = partition_of(&open.debtor_id(), stack.rt.config.kafka.partitions);
    let marker = format!("{}state:{partition}", stack.rt.config.redis.key_prefix);
    eventually("the partition rebuilt", WAIT, || async {
        let m: Option<String> = redis::cmd("GET").arg(&marker).query_async(&mut stack.redis()).await?;
        Ok(m.filter(|m| m.starts_with("ready:")).map(|_| ()))
    })
    .await?;
    assert!(
        stack.journey_status(open.tenant, open.invoice_id).await?.is_some(),
        "the open journey is rebuilt"
    );
    assert_eq!(
        stack.journey_status(paid.tenant, paid.invoice_id).await?,
        None,
        "the removed journey is not rebuilt"
    );

    // The open invoice goes late: the debtor's late history has it for 12 months, then not.
    advance_until_status(
        &stack,
        &clock,
        &open.debtor_id(),
        open.tenant,
        open.invoice_id,
        "reminded-1",
        40,
    )
    .await?;
    let late_key = format!(
        "{}late:{{{}:{}}}",
        stack.rt.config.redis.key_prefix,
        open.tenant,
        open.debtor_id()
    );
    let late = || async {
        let n: u64 = redis::cmd("ZCARD")
            .arg(&late_key)
            .query_async(&mut stack.redis())
            .await?;
        anyhow::Ok(n)
    };
    assert_eq!(late().await?, 1, "the reminded invoice counts as late");
    clock.advance(chrono::Duration::days(366));
    eventually("the late history past 12 months removed", WAIT, || async {
        Ok((late().await? == 0).then_some(()))
    })
    .await?;
    stack.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_payment_for_an_invoice_that_never_arrives_is_refused_after_waiting_for_it() -> anyhow::Result<()> {
    use forfall_platform::records::{PaymentMatched, Rejected, new_event_id};
    let clock = ManualClock::new(at("2026-09-01T06:00:00Z"));
    let mut stack = LocalStack::start(base_config(), clock.clone()).await?;
    stack.set("watcher.parked_retention_days", 5);
    stack.set("watcher.retention_sweep_secs", 1);
    stack.start_all();
    let s = danish("inv-never", "N-9001", day(2026, 9, 7), "never@example.test");
    let matched_topic = stack.topic(&stack.topics().payments_matched);
    let payment = PaymentMatched {
        event_id: new_event_id(),
        tenant: s.tenant.into(),
        debtor_id: s.debtor_id(),
        occurred_at: 0,
        payment_id: "pay-for-nothing".into(),
        invoice_id: s.invoice_id.into(),
        amount_minor: 10_000,
        currency: "DKK".into(),
        rule: "exact_reference".into(),
        reference: Some(s.reference.into()),
        value_date: forfall_domain::invoice::epoch_days(s.due),
        matched_by: None,
    };
    stack.produce(&matched_topic, &s.debtor_id(), &payment).await?;
    let parked_key = format!(
        "{}parked:{{{}:{}}}",
        stack.rt.config.redis.key_prefix, s.tenant, s.invoice_id
    );
    let parked = || async {
        let n: u64 = redis::cmd("HLEN")
            .arg(&parked_key)
            .query_async(&mut stack.redis())
            .await?;
        anyhow::Ok(n)
    };
    eventually("the payment parked", WAIT, || async {
        Ok((parked().await? == 1).then_some(()))
    })
    .await?;

    clock.advance(chrono::Duration::days(6));
    let rejected_topic = stack.topic(&stack.topics().rejected);
    let rejected = eventually("the long-parked payment refused", WAIT, || async {
        Ok(stack
            .read::<Rejected>(&rejected_topic)
            .await?
            .into_iter()
            .find(|r| r.reason_code == "invoice_never_arrived"))
    })
    .await?;
    assert!(
        rejected.detail.contains("pay-for-nothing") && rejected.detail.contains("inv-never"),
        "says which payment and which invoice: {rejected:?}"
    );
    assert_eq!(rejected.source_topic, matched_topic, "cites the payment's own record");
    let original: PaymentMatched = stack.rt.codec.decode(rejected.raw_value.as_deref()).await?.to()?;
    assert_eq!(original.payment_id, "pay-for-nothing");
    eventually("the parked payment gone", WAIT, || async {
        Ok((parked().await? == 0).then_some(()))
    })
    .await?;
    stack.shutdown().await;
    Ok(())
}

/// A credit note billing sends for `s`.
fn credit_note(s: &Sample<'_>, credit_note_id: &str, amount_minor: i64) -> forfall_platform::records::InvoiceCredited {
    forfall_platform::records::InvoiceCredited {
        event_id: forfall_platform::records::new_event_id(),
        tenant: s.tenant.into(),
        debtor_id: s.debtor_id(),
        occurred_at: 0,
        invoice_id: s.invoice_id.into(),
        credit_note_id: credit_note_id.into(),
        amount_minor,
        currency: s.currency.into(),
    }
}

/// Billing credits `s` and the watcher applies it (its open amount goes down by `amount_minor`).
async fn credit_and_wait(
    stack: &LocalStack,
    s: &Sample<'_>,
    credit_note_id: &str,
    amount_minor: i64,
) -> anyhow::Result<()> {
    let billing = stack.topic(&stack.topics().billing_invoice_events);
    stack
        .produce(&billing, &s.debtor_id(), &credit_note(s, credit_note_id, amount_minor))
        .await?;
    journey_event(stack, s.invoice_id, "the credit note", |e| {
        e.open_minor == s.amount_minor - amount_minor
    })
    .await?;
    Ok(())
}

/// The newest snapshot ingest published for `invoice_id`.
async fn latest_snapshot(stack: &LocalStack, invoice_id: &str) -> anyhow::Result<forfall_platform::records::Invoice> {
    stack
        .read::<forfall_platform::records::Invoice>(&stack.topic(&stack.topics().invoices))
        .await?
        .into_iter()
        .rfind(|i| i.invoice_id == invoice_id)
        .ok_or_else(|| anyhow::anyhow!("no snapshot of {invoice_id}"))
}

/// How the matcher keeps an invoice in its index: the time to live (seconds; -1 never
/// expires, -2 gone) of its entry and of its reference, and whether its debtor's set lists it.
async fn matcher_index(stack: &LocalStack, s: &Sample<'_>) -> anyhow::Result<(i64, i64, bool)> {
    let key = |kind: &str, id: &str| {
        format!(
            "{}matcher:{kind}:{{{}}}:{id}",
            stack.rt.config.redis.key_prefix, s.tenant
        )
    };
    let reference = forfall_domain::matching::structured_reference(s.reference)?.value;
    let (entry, reference, listed): (i64, i64, bool) = redis::pipe()
        .ttl(key("inv", s.invoice_id))
        .ttl(key("ref", &reference))
        .sismember(key("debtor", &s.debtor_id()), s.invoice_id)
        .query_async(&mut stack.redis())
        .await?;
    Ok((entry, reference, listed))
}

/// An invoice paid in full leaves its debtor's set at once and the rest of the matcher's index
/// after `matcher.retention_days` (400); an open one stays for good.
async fn index_keeps_open_and_expires_paid(
    stack: &LocalStack,
    open: &Sample<'_>,
    paid: &Sample<'_>,
) -> anyhow::Result<()> {
    let year = 400 * 86_400;
    let (entry, reference, listed) = matcher_index(stack, paid).await?;
    assert!(
        (year - 600..=year).contains(&entry) && (year - 600..=year).contains(&reference) && !listed,
        "a paid invoice leaves the index after 400 days: entry TTL {entry}, reference TTL {reference}, listed {listed}"
    );
    assert_eq!(
        matcher_index(stack, open).await?,
        (-1, -1, true),
        "an open invoice stays in the index for good"
    );
    Ok(())
}

/// `forfall rebuild` for every service, as an operator runs it.
async fn forfall_rebuild(stack: &LocalStack) -> anyhow::Result<()> {
    let args = forfall::tools::RebuildArgs {
        services: ["watcher", "ingest", "matcher", "dispatch", "portal"]
            .map(String::from)
            .to_vec(),
        partitions: None,
        from_start: false,
        ask_running: false,
    };
    forfall::tools::rebuild(&stack.rt, args).await
}

/// The thirteenth invoice: not issued when its payment arrives.
fn late_invoice() -> Sample<'static> {
    let reference = generate(ReferenceKind::Rf, "47110012").expect("an RF reference");
    Sample {
        reference: Box::leak(reference.value.into_boxed_str()),
        amount_minor: 62_000,
        ..danish("inv-12", "N-12", day(2026, 9, 21), "debtor-4@example.test")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flushed_redis_is_rebuilt_for_every_service_and_the_debtors_notice_nothing() -> anyhow::Result<()> {
    let (clock, stack, invoices) = start("2026-09-01T06:00:00Z").await?;
    let billing = stack.topic(&stack.topics().billing_invoice_events);
    let by_id = |id: &str| invoices.iter().find(|s| s.invoice_id == id).expect("in the workload");
    // Before the flush: three invoices paid (the matcher's index, allocations and decisions),
    // a credit note applied (ingest's snapshot), a payment kept for an invoice not issued yet
    // (the matcher's kept payments), every nudge mailed (dispatch's claims).
    let paid = ["inv-01", "inv-05", "inv-08", "inv-10", "inv-11", "inv-12"];
    for id in &paid[..3] {
        pay(&stack, by_id(id)).await?;
        status_is(&stack, "acme-energy", id, "closed:paid").await?;
    }
    let credited = by_id("inv-07");
    credit_and_wait(&stack, credited, "CN-7", 5_000).await?;
    let late = late_invoice();
    pay(&stack, &late).await?;
    let unmatched = stack.topic(&stack.topics().payments_unmatched);
    eventually("the early payment kept", WAIT, || async {
        Ok(stack
            .read::<forfall_platform::records::PaymentUnmatched>(&unmatched)
            .await?
            .into_iter()
            .find(|u| u.payment_id == "pay-inv-12"))
    })
    .await?;
    consumed_to_end(&stack, "dispatch", &[stack.topic(&stack.topics().journey_actions)]).await?;
    index_keeps_open_and_expires_paid(&stack, by_id("inv-02"), by_id("inv-01")).await?;

    let lost = flush_stack_state(&stack.rt.config).await?;
    assert!(lost > 50, "the flush removed the services' state ({lost} keys)");
    forfall_rebuild(&stack).await?;
    index_keeps_open_and_expires_paid(&stack, by_id("inv-02"), by_id("inv-01")).await?;

    // Ingest: the credit note sent again is not applied twice; a new one for an invoice issued
    // before the flush is applied (not refused as an unknown invoice).
    stack
        .produce(&billing, &credited.debtor_id(), &credit_note(credited, "CN-7", 5_000))
        .await?;
    credit_and_wait(&stack, by_id("inv-02"), "CN-2", 2_000).await?;
    consumed_to_end(&stack, "ingest", std::slice::from_ref(&billing)).await?;
    assert_eq!(
        latest_snapshot(&stack, credited.invoice_id).await?.credited_minor,
        5_000,
        "a credit note repeated after the flush is applied once"
    );
    // Dispatch: a nudge delivered again after the flush is not mailed again.
    let actions = stack.topic(&stack.topics().journey_actions);
    let nudge = stack
        .read::<forfall_platform::records::JourneyAction>(&actions)
        .await?
        .into_iter()
        .find(|a| a.invoice_id == "inv-06" && a.step == "nudge")
        .ok_or_else(|| anyhow::anyhow!("no nudge for inv-06"))?;
    let mails_before = stack.mail.to(by_id("inv-06").email).len();
    stack.produce(&actions, &nudge.debtor_id, &nudge).await?;
    consumed_to_end(&stack, "dispatch", std::slice::from_ref(&actions)).await?;
    assert_eq!(
        stack.mail.to(by_id("inv-06").email).len(),
        mails_before,
        "the redelivered nudge was not mailed again"
    );
    // The matcher: payments for invoices indexed before the flush still find them, and the
    // payment kept before the flush pays its invoice when it is issued.
    for id in &paid[3..5] {
        pay(&stack, by_id(id)).await?;
        status_is(&stack, "acme-energy", id, "closed:paid").await?;
    }
    issue_invoice(&stack, &late).await?;
    status_is(&stack, late.tenant, late.invoice_id, "closed:paid").await?;

    let mut all = invoices.clone();
    all.push(late);
    finish_and_check(&stack, &clock, &all, &paid, &["inv-12"]).await?;
    stack.shutdown().await;
    Ok(())
}

/// How Redis goes back to an older state.
enum GoingBack {
    /// The services' keys copied (`DUMP`) and later put back (`RESTORE`) on the shared Redis.
    Copied(Vec<(String, Vec<u8>, i64)>),
    /// A Redis of the test's own that crashes and starts again from its last RDB snapshot.
    Restarted(RedisServer),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_service_notices_a_redis_restored_from_an_older_snapshot_and_rebuilds() -> anyhow::Result<()> {
    services_notice_an_older_redis(GoingBack::Copied(Vec::new())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_service_notices_a_redis_restarted_from_its_last_rdb_snapshot_and_rebuilds() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!(
        "forfall-rdb-{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
    ));
    let redis = RedisServer::start(&dir).await?;
    let outcome = services_notice_an_older_redis(GoingBack::Restarted(redis)).await;
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

/// The workload runs; Redis goes back to a state from before two payments, a credit note and
/// an invoice; the services notice it by themselves (nobody runs `forfall rebuild`), rebuild,
/// and the debtors see nothing of it.
async fn services_notice_an_older_redis(mut back: GoingBack) -> anyhow::Result<()> {
    let mut config = base_config();
    if let GoingBack::Restarted(redis) = &back {
        config.redis.url = redis.url();
    }
    let (clock, stack, invoices) = start_on(config, "2026-09-01T06:00:00Z").await?;
    let billing = stack.topic(&stack.topics().billing_invoice_events);
    let by_id = |id: &str| invoices.iter().find(|s| s.invoice_id == id).expect("in the workload");
    match &mut back {
        GoingBack::Copied(older) => *older = snapshot_stack_state(&stack.rt.config).await?,
        GoingBack::Restarted(redis) => redis.save().await?,
    }
    // After the snapshot: two payments, a credit note and the thirteenth invoice.
    let paid = ["inv-02", "inv-06", "inv-09", "inv-12"];
    for id in &paid[..2] {
        pay(&stack, by_id(id)).await?;
        status_is(&stack, "acme-energy", id, "closed:paid").await?;
    }
    let credited = by_id("inv-03");
    credit_and_wait(&stack, credited, "CN-3", 4_000).await?;
    let late = late_invoice();
    issue_invoice(&stack, &late).await?;
    status_is(&stack, late.tenant, late.invoice_id, "open").await?;

    // Redis comes back from the snapshot, without anyone running `forfall rebuild`.
    match &mut back {
        GoingBack::Copied(older) => restore_stack_state(&stack.rt.config, older).await?,
        GoingBack::Restarted(redis) => {
            redis.crash_and_restart().await?;
            // The test's own connection meets the crash once (a broken pipe), then reconnects.
            eventually("the test's connection to Redis back", WAIT, || async {
                Ok(redis::cmd("PING").query_async::<String>(&mut stack.redis()).await.ok())
            })
            .await?;
        }
    }
    // A second credit note: ingest's snapshot has the first again, so both count.
    stack
        .produce(&billing, &credited.debtor_id(), &credit_note(credited, "CN-3b", 1_000))
        .await?;
    consumed_to_end(&stack, "ingest", std::slice::from_ref(&billing)).await?;
    assert_eq!(
        latest_snapshot(&stack, credited.invoice_id).await?.credited_minor,
        5_000,
        "the credit note applied after the snapshot still counts"
    );
    // A payment for the invoice indexed after the snapshot finds it; another one too.
    for id in ["inv-09"] {
        pay(&stack, by_id(id)).await?;
        status_is(&stack, "acme-energy", id, "closed:paid").await?;
    }
    pay(&stack, &late).await?;
    status_is(&stack, late.tenant, late.invoice_id, "closed:paid").await?;

    let mut all = invoices.clone();
    all.push(late);
    finish_and_check(&stack, &clock, &all, &paid, &["inv-12"]).await?;
    stack.shutdown().await;
    Ok(())
}

/// Keeps what a replay hands over.
#[derive(Default)]
struct Collected {
    changes: Vec<forfall_platform::changelog::Change>,
    end: i64,
}

impl forfall_platform::changelog::Restore for Collected {
    async fn apply(
        &mut self,
        _partition: i32,
        changes: Vec<forfall_platform::changelog::Change>,
    ) -> Result<(), forfall_platform::kafka::Failure> {
        self.changes.extend(changes);
        Ok(())
    }

    async fn finish(&mut self, _partition: i32, end: i64) -> Result<(), forfall_platform::kafka::Failure> {
        self.end = end;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_during_which_redis_loses_the_state_again_is_not_taken_for_done() -> anyhow::Result<()> {
    use forfall_platform::changelog::{self, Changelog, Restore};
    let (_clock, stack, _invoices) = start("2026-09-01T06:00:00Z").await?;
    stack.stop_service("watcher").await?;
    let topic = stack.topic(&stack.topics().watcher_changelog);
    let store = forfall_watcher::store::Store::new(stack.redis(), stack.rt.keys(), Changelog::new(topic.clone()));
    // Partition 0's changelog, as a rebuild reads it.
    let mut partition = Collected::default();
    changelog::replay(
        &stack.rt.config.kafka,
        &topic,
        &[(0, 0)],
        100_000,
        &mut partition,
        |_| {},
    )
    .await?;
    anyhow::ensure!(
        !partition.changes.is_empty(),
        "the workload wrote partition 0's changelog"
    );

    lose_watcher_state(&stack.rt.config).await?;
    let mut rebuild = forfall_watcher::rebuild::WatcherRestore::new(
        &store,
        stack.redis(),
        std::collections::HashMap::from([(0, None)]),
    );
    rebuild
        .apply(0, partition.changes.clone())
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    // Redis loses the state again before the rebuild finishes.
    lose_watcher_state(&stack.rt.config).await?;
    assert!(
        rebuild.finish(0, partition.end).await.is_err(),
        "the rebuild notices that what it wrote is gone"
    );
    let marker: Option<String> = redis::cmd("GET")
        .arg(store.state_key(0))
        .query_async(&mut stack.redis())
        .await?;
    assert_eq!(
        marker, None,
        "the partition is not declared rebuilt: the next rebuild starts over"
    );
    stack.shutdown().await;
    Ok(())
}

/// Hundreds of the watcher's own writes at once (a billing run's burst) are never taken for a
/// Redis gone back in time: a read of the state marker sent before a later write was
/// acknowledged is compared with what the instance had written when it sent the read, not with
/// what it wrote by the time the answer came (which made a needless rebuild, holding the whole
/// partition for a second or two, for one record in forty of a 20,000-invoice billing run).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_watchers_own_writes_at_once_are_never_taken_for_lost_state() -> anyhow::Result<()> {
    use forfall_domain::journey::TimerChange;
    use std::sync::Arc;
    let stack = LocalStack::start(base_config(), Arc::new(forfall_platform::clock::SystemClock)).await?;
    let (store, producer) = watcher_store(&stack).await?;
    let store = Arc::new(store);
    let due = day(2026, 11, 2);
    let law = forfall_domain::law::LawBook::builtin()?;
    let policy = Arc::new(forfall_domain::policy::load(
        forfall_domain::policy::DEFAULT_POLICY,
        &law,
        due,
    )?);
    let _: () = redis::cmd("SET")
        .arg(store.state_key(0))
        .arg("ready:-1")
        .query_async(&mut stack.redis())
        .await?;
    let (writers, each) = (200, 10);
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let (store, producer, policy) = (store.clone(), producer.clone(), policy.clone());
            tokio::spawn(async move {
                let mut missing = Vec::new();
                for k in 0..each {
                    let i = w * each + k;
                    let d = opened_new_customer(&policy, household_invoice("race", i, due)?, due);
                    let timer = match d.timer {
                        t @ TimerChange::Schedule { .. } => t,
                        other => anyhow::bail!("a new journey schedules its first step, not {other:?}"),
                    };
                    let save = new_journey_save(d.journey, 0, timer);
                    let prepared = store
                        .prepare(save, chrono::Utc::now().timestamp_millis())
                        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    let delivered = producer.send_all_delivered(&[store.change(&prepared)]).await?;
                    let written = store
                        .save_many(0, &[prepared], &[delivered[0].offset])
                        .await
                        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    anyhow::ensure!(written == [forfall_watcher::store::Written::Yes], "journey {i} written");
                    // Another writer's journey, read while the others write.
                    let other = format!("raceinv-{:09}", (i * 7_919) % (writers * each));
                    if let Err(e) = store.load(0, "acme-energy", &other).await {
                        missing.push(format!("{e:?}").lines().next().unwrap_or_default().to_owned());
                    }
                }
                anyhow::Ok(missing)
            })
        })
        .collect();
    let mut missing = Vec::new();
    for h in handles {
        missing.extend(h.await??);
    }
    remove_keys(&mut stack.redis(), &stack.rt.config.redis.key_prefix).await?;
    assert!(
        missing.is_empty(),
        "{} of {} reads took the watcher's own writes for lost state, e.g. {:?}",
        missing.len(),
        writers * each,
        missing.first()
    );
    Ok(())
}

/// A timer round's hundreds of journeys go to Redis in one round trip: each gets its own
/// answer, in its place (a stale version is a conflict, left as it was; the others are written
/// with their timers moved).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journeys_written_together_each_get_their_own_answer_in_place() -> anyhow::Result<()> {
    use forfall_domain::journey::TimerChange;
    use forfall_watcher::store::{Save, Written};
    let stack = LocalStack::start(base_config(), std::sync::Arc::new(forfall_platform::clock::SystemClock)).await?;
    let (store, producer) = watcher_store(&stack).await?;
    let due = day(2026, 11, 2);
    let law = forfall_domain::law::LawBook::builtin()?;
    let policy = forfall_domain::policy::load(forfall_domain::policy::DEFAULT_POLICY, &law, due)?;
    let n = 700;
    let opened = (0..n)
        .map(|i| {
            let d = opened_new_customer(&policy, household_invoice("many", i, due)?, due);
            Ok(new_journey_save(d.journey, 0, d.timer))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    write_journeys(&store, &producer, opened).await?;

    // Every seventh write carries a version nobody wrote: a conflict, wherever it falls.
    let stale = |i: usize| i % 7 == 3;
    let next_at = |i: usize| at("2026-11-20T08:00:00Z") + chrono::Duration::seconds(i as i64);
    let now_ms = chrono::Utc::now().timestamp_millis();
    let mut prepared = Vec::with_capacity(n);
    let journey = |i: usize| {
        let (store, invoice) = (&store, format!("manyinv-{i:09}"));
        async move {
            let loaded = store.load(0, "acme-energy", &invoice).await;
            let loaded = loaded.map_err(|e| anyhow::anyhow!("{e:?}"))?;
            loaded.ok_or_else(|| anyhow::anyhow!("{invoice} is missing"))
        }
    };
    for i in 0..n {
        let loaded = journey(i).await?;
        assert_eq!(loaded.version, 1, "journey {i}");
        let save = Save {
            expected: Some(if stale(i) { 5 } else { loaded.version }),
            stored: loaded.stored,
            timer: TimerChange::Schedule {
                step_index: 1,
                fire_at: next_at(i),
            },
            fired_step: None,
            stops_contact: false,
        };
        prepared.push(store.prepare(save, now_ms).map_err(|e| anyhow::anyhow!("{e:?}"))?);
    }
    let outs: Vec<_> = prepared.iter().map(|p| store.change(p)).collect();
    let offsets: Vec<i64> = producer
        .send_all_delivered(&outs)
        .await?
        .iter()
        .map(|d| d.offset)
        .collect();
    let written = store
        .save_many(0, &prepared, &offsets)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let expected: Vec<Written> = (0..n)
        .map(|i| if stale(i) { Written::Conflict } else { Written::Yes })
        .collect();
    assert_eq!(written, expected);

    let mut redis = stack.redis();
    for i in 0..n {
        let invoice = format!("manyinv-{i:09}");
        let loaded = journey(i).await?;
        let moved: Option<f64> = redis::cmd("ZSCORE")
            .arg(store.timers_key(0))
            .arg(forfall_watcher::store::member("acme-energy", &invoice, 1))
            .query_async(&mut redis)
            .await?;
        if stale(i) {
            assert_eq!((loaded.version, moved), (1, None), "{invoice} left as it was");
        } else {
            assert_eq!(
                (loaded.version, moved),
                (2, Some(next_at(i).timestamp_millis() as f64)),
                "{invoice} written, its timer moved"
            );
        }
    }
    Ok(())
}
