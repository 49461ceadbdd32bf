//! Payments through faults: nothing the matcher or the watcher changes in Redis gets ahead of
//! the records that tell the rest of the pipeline about it, or else the change is idempotent on
//! redelivery.
//!
//! The crash windows are opened deterministically: a service is started with one output topic
//! renamed to a name the Kafka client refuses at once (longer than librdkafka's 512 bytes), so
//! that what it produces there is never acknowledged; it is killed once it provably reached the
//! window, and restarted with the real topic.

use forfall_domain::matching::structured_reference;
use forfall_domain::reference::{self, ReferenceKind, normalise};
use forfall_e2e::*;
use forfall_platform::Topics;
use forfall_platform::clock::ManualClock;
use forfall_platform::records::{PaymentMatched, PaymentUnmatched, Rejected};
use serde_json::{Value, json};

/// A topic name no Kafka client accepts (librdkafka refuses names over 512 bytes before
/// anything is sent): a record produced to it is never acknowledged.
fn unacknowledged_topic() -> String {
    "never-acknowledged-".to_owned() + &"x".repeat(600)
}

/// Starts `service` with the topics `refuse` changes (and without creating topics); services
/// started afterwards, and restarts, get the stack's real configuration.
fn start_refusing(stack: &mut LocalStack, service: &'static str, refuse: impl FnOnce(&mut Topics)) {
    let real = stack.rt.config.clone();
    refuse(&mut stack.rt.config.topics);
    stack.rt.config.kafka.create_topics = false;
    stack.start_service(service);
    stack.rt.config = real;
}

/// Stops `service` gracefully (everything it handled is committed, so nothing of it is
/// redelivered), then starts it again with `refuse` (see [`start_refusing`]).
async fn restart_refusing(
    stack: &mut LocalStack,
    service: &'static str,
    refuse: impl FnOnce(&mut Topics),
) -> anyhow::Result<()> {
    stack.stop_service(service).await?;
    // As `LocalStack::restart_service`: tansu may never complete a join that overlaps a leave.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    start_refusing(stack, service, refuse);
    stack.wait_ready(&[service], WAIT).await
}

/// A Redis key of this stack's matcher (`kind` and id under the tenant's hash tag).
fn matcher_key(stack: &LocalStack, kind: &str, tenant: &str, id: &str) -> String {
    format!("{}matcher:{kind}:{{{tenant}}}:{id}", stack.rt.config.redis.key_prefix)
}

/// The key a payment quoting `raw` waits under while no invoice has that reference (as the
/// matcher derives it).
fn kept_key(stack: &LocalStack, tenant: &str, raw: &str) -> String {
    let reference = structured_reference(raw)
        .map(|r| r.value)
        .unwrap_or_else(|_| normalise(raw));
    matcher_key(stack, "kept", tenant, &reference)
}

/// The matcher's booked decision for a payment, as stored (JSON), if any.
async fn decision(stack: &LocalStack, tenant: &str, payment_id: &str) -> anyhow::Result<Option<Value>> {
    let raw: Option<String> = redis::cmd("GET")
        .arg(matcher_key(stack, "payment", tenant, payment_id))
        .query_async(&mut stack.redis())
        .await?;
    Ok(raw.map(|r| serde_json::from_str::<Value>(&r)).transpose()?)
}

async fn is_member(stack: &LocalStack, key: &str, member: &str) -> anyhow::Result<bool> {
    let yes: bool = redis::cmd("SISMEMBER")
        .arg(key)
        .arg(member)
        .query_async(&mut stack.redis())
        .await?;
    Ok(yes)
}

/// Whether the service retried a record's handling or the production of its outputs.
async fn retried(stack: &LocalStack, service: &str) -> anyhow::Result<bool> {
    let m = stack.metrics(service).await.unwrap_or_default();
    Ok(["handle", "produce"].iter().any(|op| {
        let label = format!("operation=\"{op}\"");
        metric_value(&m, "forfall_retries_total", &[label.as_str()]).is_some_and(|n| n >= 1.0)
    }))
}

async fn matched_for(stack: &LocalStack, payment_id: &str) -> anyhow::Result<Vec<PaymentMatched>> {
    Ok(stack
        .read::<PaymentMatched>(&stack.topic(&stack.topics().payments_matched))
        .await?
        .into_iter()
        .filter(|m| m.payment_id == payment_id)
        .collect())
}

async fn unmatched_listed(stack: &LocalStack, tenant: &str) -> anyhow::Result<Vec<String>> {
    let addr = stack.rt.admin_addr("matcher").expect("the matcher serves HTTP");
    let listed: Value = reqwest::Client::new()
        .get(format!("http://{addr}/v1/payments/unmatched?tenant={tenant}"))
        .send()
        .await?
        .json()
        .await?;
    Ok(listed["unmatched"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter_map(|r| r["payment_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

async fn match_by_hand(
    stack: &LocalStack,
    tenant: &str,
    payment_id: &str,
    invoices: &[&str],
) -> anyhow::Result<(u16, Value)> {
    let addr = stack.rt.admin_addr("matcher").expect("the matcher serves HTTP");
    let r = reqwest::Client::new()
        .post(format!("http://{addr}/v1/payments/{payment_id}/match"))
        .json(&json!({"tenant": tenant, "invoices": invoices, "by": "kari@ops"}))
        .send()
        .await?;
    Ok((r.status().as_u16(), r.json().await?))
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn norwegian(invoice_id: &'static str, kid: &'static str, email: &'static str) -> Sample<'static> {
    Sample {
        tenant: "nordkraft",
        invoice_id,
        number: invoice_id,
        due: day(2026, 3, 2),
        amount_minor: 125_000,
        currency: "NOK",
        jurisdiction: "NO",
        email,
        reference: kid,
        language: "nb",
    }
}

/// An unmatched payment without reference or invoice number: only a person can match it.
fn anonymous_payment(
    s: &Sample<'_>,
    payment_id: &str,
    amount_minor: i64,
) -> forfall_platform::records::PaymentReceived {
    let mut p = s.payment(payment_id, amount_minor, "");
    p.reference = None;
    p.remittance_text = Some("takk for sist".into());
    p
}

async fn unmatched_event(stack: &LocalStack, payment_id: &str) -> anyhow::Result<PaymentUnmatched> {
    eventually(&format!("payment {payment_id} unmatched"), WAIT, || async move {
        Ok(stack
            .read::<PaymentUnmatched>(&stack.topic(&stack.topics().payments_unmatched))
            .await?
            .into_iter()
            .find(|u| u.payment_id == payment_id))
    })
    .await
}

/// A payment that arrived before its invoice is kept; when the invoice comes, the matcher
/// books the match. A crash after booking and before `PaymentMatched` is acknowledged must not
/// lose the payment: it stays kept until then, and the redelivered invoice sends the match.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kept_payment_stays_kept_until_its_match_is_acknowledged() -> anyhow::Result<()> {
    let mut stack = LocalStack::start(base_config(), ManualClock::new(at("2026-03-01T08:00:00Z"))).await?;
    for service in ["ingest", "matcher", "watcher"] {
        stack.start_service(service);
    }
    let s = danish("inv-kept", "INV-7001", day(2026, 3, 20), "kept@example.test");
    let kept = kept_key(&stack, s.tenant, s.reference);

    // The payment comes first: nothing has its reference yet, so it is kept.
    stack
        .produce(
            &stack.topic(&stack.topics().payments),
            "bank",
            &s.payment("kept-1", s.amount_minor, s.reference),
        )
        .await?;
    unmatched_event(&stack, "kept-1").await?;
    assert!(
        is_member(&stack, &kept, "kept-1").await?,
        "an unmatched payment with a reference is kept"
    );
    // From now on the matcher's PaymentMatched cannot be acknowledged (the payment itself is
    // committed by the graceful stop: only the invoice can bring the payment back).
    restart_refusing(&mut stack, "matcher", |t| t.payments_matched = unacknowledged_topic()).await?;

    // The invoice arrives: the match is booked, and its PaymentMatched is never acknowledged.
    issue_invoice(&stack, &s).await?;
    eventually("the match booked and the matcher at its produce", WAIT, || async {
        let booked = decision(&stack, s.tenant, "kept-1")
            .await?
            .is_some_and(|d| d["decision"]["outcome"] == "matched");
        // Past the booking, either the payment left the kept set (before the acknowledgement:
        // the fault) or the matcher is retrying the produce that cannot be acknowledged.
        let at_produce = !is_member(&stack, &kept, "kept-1").await? || retried(&stack, "matcher").await?;
        Ok((booked && at_produce).then_some(()))
    })
    .await?;
    // A crash now: nothing of the matcher's is committed after this.
    stack.kill_service("matcher").await;
    assert!(
        is_member(&stack, &kept, "kept-1").await?,
        "the payment left the kept set before its PaymentMatched was acknowledged"
    );
    assert!(matched_for(&stack, "kept-1").await?.is_empty());

    // Restarted with the real topic: the redelivered invoice sends the booked match.
    stack.restart_service("matcher").await;
    let matched = eventually("the kept payment's PaymentMatched", WAIT, || async {
        Ok(Some(matched_for(&stack, "kept-1").await?).filter(|m| !m.is_empty()))
    })
    .await?;
    assert!(
        matched
            .iter()
            .all(|m| m.invoice_id == "inv-kept" && m.amount_minor == s.amount_minor && m.rule == "exact_reference"),
        "{matched:?}"
    );
    eventually("the payment to leave the kept set", WAIT, || async {
        Ok((!is_member(&stack, &kept, "kept-1").await?).then_some(()))
    })
    .await?;
    status_is(&stack, s.tenant, s.invoice_id, "closed:paid").await?;
    stack.shutdown().await;
    Ok(())
}

/// An operator looks at the unmatched payments; before they match one by hand, another payment
/// pays part of the invoice. The manual match is decided on what the invoice owes when it is
/// booked, booked, and its events are exactly the booked decision's: the payment is no longer
/// unmatched, cannot be matched again, and the invoice ends paid with the surplus as credit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_manual_match_on_an_invoice_paid_in_part_meanwhile_is_booked_as_announced() -> anyhow::Result<()> {
    let stack = LocalStack::start(base_config(), ManualClock::new(at("2026-03-01T08:00:00Z"))).await?;
    for service in ["ingest", "matcher", "watcher"] {
        stack.start_service(service);
    }
    let billing = stack.topic(&stack.topics().billing_invoice_events);
    let payments = stack.topic(&stack.topics().payments);
    let kid_a = leak(reference::generate(ReferenceKind::KidMod10, "8300001")?.value);
    let kid_b = leak(reference::generate(ReferenceKind::KidMod10, "8300002")?.value);
    let a = norwegian("no-pp-a", kid_a, "pp@example.test");
    let b = norwegian("no-pp-b", kid_b, "pp@example.test");
    for s in [&a, &b] {
        stack.produce(&billing, &s.debtor_id(), &s.issued()).await?;
        status_is(&stack, s.tenant, s.invoice_id, "open").await?;
    }
    stack
        .produce(&payments, "bank", &anonymous_payment(&a, "pp-hand", 125_000))
        .await?;
    unmatched_event(&stack, "pp-hand").await?;
    // The operator's look: the payment is unmatched and invoice A owes 1,250.00.
    assert_eq!(unmatched_listed(&stack, a.tenant).await?, ["pp-hand"]);

    // Meanwhile 400.00 of invoice A is paid (booked before its PaymentMatched is produced).
    stack
        .produce(&payments, "bank", &a.payment("pp-part", 40_000, kid_a))
        .await?;
    eventually("the part payment matched", WAIT, || async {
        Ok(Some(matched_for(&stack, "pp-part").await?).filter(|m| !m.is_empty()))
    })
    .await?;

    let (status, body) = match_by_hand(&stack, a.tenant, "pp-hand", &["no-pp-a"]).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (
            body["allocations"][0]["invoice_id"].as_str(),
            body["allocations"][0]["amount_minor"].as_i64(),
            body["overpayment_minor"].as_i64(),
        ),
        (Some("no-pp-a"), Some(85_000), Some(40_000)),
        "decided on what the invoice owed when booked: {body}"
    );
    // Booked: no longer unmatched, and never matched twice.
    assert!(
        unmatched_listed(&stack, a.tenant).await?.is_empty(),
        "the manual match was not booked"
    );
    let (again, body) = match_by_hand(&stack, a.tenant, "pp-hand", &["no-pp-b"]).await?;
    assert_eq!(again, 409, "a booked payment is matched again: {body}");
    assert!(
        body["detail"].as_str().unwrap_or("").contains("already matched"),
        "{body}"
    );

    // A mark: a later payment, handled after everything above.
    stack
        .produce(&payments, "bank", &b.payment("pp-mark", 10_000, kid_b))
        .await?;
    eventually("the mark payment matched", WAIT, || async {
        Ok(Some(matched_for(&stack, "pp-mark").await?).filter(|m| !m.is_empty()))
    })
    .await?;
    let by_hand = matched_for(&stack, "pp-hand").await?;
    assert!(!by_hand.is_empty());
    assert!(
        by_hand.iter().all(|m| m.event_id == by_hand[0].event_id
            && m.invoice_id == "no-pp-a"
            && m.amount_minor == 125_000
            && m.rule == "manual"
            && m.matched_by.as_deref() == Some("kari@ops")),
        "only the booked decision is announced: {by_hand:?}"
    );
    assert!(
        !stack
            .read::<PaymentMatched>(&stack.topic(&stack.topics().payments_matched))
            .await?
            .iter()
            .any(|m| m.payment_id == "pp-hand" && m.invoice_id == "no-pp-b"),
        "the refused second match went out"
    );
    status_is(&stack, a.tenant, a.invoice_id, "closed:paid").await?;
    status_is(&stack, b.tenant, b.invoice_id, "open").await?;
    let credit = journey_event(&stack, "no-pp-a", "the credit balance", |e| e.kind == "credit_balance").await?;
    assert!(
        credit
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("overpaid by 400.00 NOK"),
        "{credit:?}"
    );
    stack.shutdown().await;
    Ok(())
}

/// A manual match is booked, and the broker does not acknowledge its events (then the matcher
/// crashes): the operator is told it is booked with its events pending, and the restarted
/// matcher sends them, so the booking and the events agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_manual_match_booked_while_its_events_cannot_go_out_sends_them_after_a_restart() -> anyhow::Result<()> {
    let mut stack = LocalStack::start(base_config(), ManualClock::new(at("2026-03-01T08:00:00Z"))).await?;
    for service in ["ingest", "matcher", "watcher"] {
        stack.start_service(service);
    }
    let kid = leak(reference::generate(ReferenceKind::KidMod10, "8300011")?.value);
    let a = norwegian("no-pend", kid, "pend@example.test");
    issue_invoice(&stack, &a).await?;
    status_is(&stack, a.tenant, a.invoice_id, "open").await?;
    let indexed = matcher_key(&stack, "inv", a.tenant, a.invoice_id);
    eventually("the invoice indexed by the matcher", WAIT, || async {
        let n: i64 = redis::cmd("EXISTS")
            .arg(&indexed)
            .query_async(&mut stack.redis())
            .await?;
        Ok((n == 1).then_some(()))
    })
    .await?;
    stack
        .produce(
            &stack.topic(&stack.topics().payments),
            "bank",
            &anonymous_payment(&a, "pend-hand", 125_000),
        )
        .await?;
    unmatched_event(&stack, "pend-hand").await?;
    // From now on the matcher's PaymentMatched cannot be acknowledged. The graceful stop
    // commits the payment and the invoice: nothing but the booking can bring the match back.
    restart_refusing(&mut stack, "matcher", |t| t.payments_matched = unacknowledged_topic()).await?;

    let (status, body) = match_by_hand(&stack, a.tenant, "pend-hand", &["no-pend"]).await?;
    assert_eq!(status, 202, "booked, its events not acknowledged: {body}");
    assert_eq!(body["events"], "pending", "{body}");
    assert_eq!(body["allocations"][0]["amount_minor"].as_i64(), Some(125_000), "{body}");
    assert!(
        unmatched_listed(&stack, a.tenant).await?.is_empty(),
        "the match is booked"
    );
    stack.kill_service("matcher").await;
    assert!(matched_for(&stack, "pend-hand").await?.is_empty());

    stack.restart_service("matcher").await;
    let matched = eventually("the booked manual match's events", WAIT, || async {
        Ok(Some(matched_for(&stack, "pend-hand").await?).filter(|m| !m.is_empty()))
    })
    .await?;
    assert!(
        matched.iter().all(|m| m.invoice_id == "no-pend"
            && m.amount_minor == 125_000
            && m.rule == "manual"
            && m.matched_by.as_deref() == Some("kari@ops")),
        "{matched:?}"
    );
    status_is(&stack, a.tenant, a.invoice_id, "closed:paid").await?;
    let pending = matcher_key(&stack, "manual-pending", a.tenant, "all");
    eventually("nothing pending any more", WAIT, || async {
        Ok((!is_member(&stack, &pending, "pend-hand").await?).then_some(()))
    })
    .await?;
    stack.shutdown().await;
    Ok(())
}

/// Two payments reach the watcher before their invoice and are parked: one in the invoice's
/// currency, one in another. When the invoice arrives, the first is applied and the second is
/// refused: it lands on the rejected topic with its reason and its own record, and is counted.
/// Neither leaves the parked list before what it produced is acknowledged: a watcher that
/// crashes while its outputs cannot be acknowledged still has both parked after the crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_parked_payment_the_invoice_refuses_is_rejected_with_its_reason() -> anyhow::Result<()> {
    let mut stack = LocalStack::start(base_config(), ManualClock::new(at("2026-03-01T08:00:00Z"))).await?;
    start_refusing(&mut stack, "watcher", |t| t.rejected = unacknowledged_topic());
    stack.start_service("ingest");
    let s = danish("inv-park", "INV-8001", day(2026, 3, 20), "park@example.test");
    let matched_topic = stack.topic(&stack.topics().payments_matched);
    let payment = |payment_id: &str, amount_minor: i64, currency: &str| s.matched(payment_id, amount_minor, currency);
    stack
        .produce(&matched_topic, &s.debtor_id(), &payment("park-eur", 10_000, "EUR"))
        .await?;
    stack
        .produce(&matched_topic, &s.debtor_id(), &payment("park-dkk", 50_000, "DKK"))
        .await?;
    let parked_key = format!(
        "{}parked:{{{}:{}}}",
        stack.rt.config.redis.key_prefix, s.tenant, s.invoice_id
    );
    let parked = |stack: &LocalStack| {
        let key = parked_key.clone();
        let mut redis = stack.redis();
        async move {
            let n: i64 = redis::cmd("HLEN").arg(key).query_async(&mut redis).await?;
            anyhow::Ok(n)
        }
    };
    eventually("both payments parked", WAIT, || async {
        Ok((parked(&stack).await? == 2).then_some(()))
    })
    .await?;

    // The invoice arrives while the watcher's rejections cannot be acknowledged.
    issue_invoice(&stack, &s).await?;
    eventually("the watcher done with the invoice, or retrying it", WAIT, || async {
        // Done: the parked list was cleared. Retrying: its outputs cannot be acknowledged.
        Ok((parked(&stack).await? == 0 || retried(&stack, "watcher").await?).then_some(()))
    })
    .await?;
    stack.kill_service("watcher").await;
    assert_eq!(
        parked(&stack).await?,
        2,
        "a parked payment left the list before what it produced was acknowledged"
    );

    // Restarted with the real topics.
    stack.restart_service("watcher").await;
    let rejected_topic = stack.topic(&stack.topics().rejected);
    let rejected = eventually("the refused parked payment rejected", WAIT, || async {
        Ok(stack
            .read::<Rejected>(&rejected_topic)
            .await?
            .into_iter()
            .find(|r| r.service == "watcher" && r.detail.contains("park-eur")))
    })
    .await?;
    assert_eq!(rejected.reason_code, "payment_not_applicable", "{rejected:?}");
    assert!(
        rejected.detail.contains("inv-park") && rejected.detail.contains("EUR"),
        "says which payment, which invoice and why: {rejected:?}"
    );
    assert_eq!(rejected.tenant.as_deref(), Some(s.tenant));
    assert_eq!(rejected.source_topic, matched_topic, "cites the payment's own record");
    let raw = rejected.raw_value.clone().expect("the payment's raw record");
    let original: PaymentMatched = stack.rt.codec.decode(Some(raw.as_slice())).await?.to()?;
    assert_eq!(
        (original.payment_id.as_str(), original.currency.as_str()),
        ("park-eur", "EUR")
    );

    // The payment in the invoice's currency is applied; the list is cleared; the rejection counted.
    journey_event(&stack, "inv-park", "the parked DKK payment applied", |e| {
        e.kind == "partly_paid" && e.open_minor == 73_450
    })
    .await?;
    eventually("the parked list cleared", WAIT, || async {
        Ok((parked(&stack).await? == 0).then_some(()))
    })
    .await?;
    let m = stack.metrics("watcher").await?;
    assert!(
        metric_value(&m, "forfall_rejected_total", &["reason=\"payment_not_applicable\""]).is_some_and(|n| n >= 1.0),
        "{m}"
    );
    assert!(
        !stack
            .read::<Rejected>(&rejected_topic)
            .await?
            .iter()
            .any(|r| r.detail.contains("park-dkk")),
        "the applicable payment is not rejected"
    );
    stack.shutdown().await;
    Ok(())
}
