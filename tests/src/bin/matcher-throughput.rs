//! Benchmark: payments matched per second, and the latency from a payment event to the
//! invoice's journey state being updated, at a steady 5,000 payments/s, next to a plain
//! rdkafka relay of the same payment bytes measured in the same run.
//!
//!     cargo run --release -p forfall-e2e --bin matcher-throughput -- 20000 5000 [CONCURRENCY]
//!
//! (invoices, steady payments per second, payments (or batches of them) the matcher decides at
//! once: by default the matcher's own default; `MATCHER_BATCH=N` sets `matcher.batch`,
//! `WATCHER_CONSUME_BATCH=N` `watcher.consume_batch`, `WATCHER_CONCURRENCY=N`
//! `watcher.concurrency`)
//!
//! N invoices are indexed first (matcher and watcher both consume them); then N/2 payments are
//! produced at 5,000/s and each one's latency is taken from its production to the watcher's
//! `paid` event for its invoice (the event is acknowledged just before the state is written);
//! then the other N/2 are produced at once to measure payments matched per second.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use forfall_domain::invoice::epoch_days;
use forfall_domain::reference::{self, ReferenceKind};
use forfall_e2e::*;
use forfall_platform::clock::SystemClock;
use forfall_platform::records::{self, InvoiceChange, InvoiceStatus, JourneyEvent, PaymentReceived, new_event_id};
use futures::StreamExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};

async fn counter(stack: &LocalStack, service: &str, name: &str, parts: &[&str]) -> f64 {
    let m = stack.metrics(service).await.unwrap_or_default();
    metric_value(&m, name, parts).unwrap_or(0.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(20_000);
    let rate: f64 = std::env::args()
        .nth(2)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(5_000.0);
    let mut config = base_config();
    config.log.level = "warn".into();
    let concurrency: usize = std::env::args()
        .nth(3)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or_else(|| forfall_matcher::MatcherSettings::default().concurrency);
    let mut stack = LocalStack::start(config, Arc::new(SystemClock)).await?;
    stack.set("matcher.concurrency", concurrency);
    counts_from_env(
        &mut stack,
        &[
            ("MATCHER_BATCH", "matcher.batch"),
            ("WATCHER_CONSUME_BATCH", "watcher.consume_batch"),
            ("WATCHER_CONCURRENCY", "watcher.concurrency"),
        ],
    )?;
    let stack = stack;
    let brokers = stack.rt.config.kafka.brokers.clone();
    let invoices_topic = stack.topic(&stack.topics().invoices);
    let payments_topic = stack.topic(&stack.topics().payments);
    // Payments reach Forfall through its own importer (camt.054, HTTP), whose producer batches
    // as every Forfall producer does: the same linger here.
    let producer: FutureProducer = bench_client(&brokers)
        .set("linger.ms", stack.rt.config.kafka.linger_ms.to_string())
        .set("partitioner", "murmur2_random")
        .create()?;

    // N open invoices, each with its own KID, from 2 000 debtors.
    let due = chrono::Utc::now().date_naive() + chrono::Duration::days(20);
    let mut kids = Vec::with_capacity(n);
    let mut acks = Vec::new();
    for i in 0..n {
        let kid = reference::generate(ReferenceKind::KidMod10, &format!("{}", 1_000_000 + i))?.value;
        let debtor = format!("bench:c-{}", i % 2000);
        let inv = records::Invoice {
            event_id: new_event_id(),
            tenant: "bench".into(),
            debtor_id: debtor.clone(),
            occurred_at: 0,
            invoice_id: format!("b-{i}"),
            revision: 1,
            change: InvoiceChange::Issued,
            source_event_id: new_event_id(),
            invoice_number: format!("{}", 1_000_000 + i),
            issue_date: epoch_days(due) - 14,
            due_date: epoch_days(due),
            amount_minor: 49_900,
            credited_minor: 0,
            open_minor: 49_900,
            currency: "NOK".into(),
            jurisdiction: "NO".into(),
            debtor_kind: "consumer".into(),
            status: InvoiceStatus::Open,
            payment_reference: Some(kid.clone()),
            description: None,
            debtor_name: None,
            email: None,
            phone: None,
            language: None,
            preferred_channels: Vec::new(),
            declined_channels: Vec::new(),
            credit_note_id: None,
            debtor_details: None,
            reminder_fee_agreed: None,
        };
        let payload = stack.rt.codec.encode(&invoices_topic, &inv).await?;
        acks.push(
            producer
                .send_result(FutureRecord::to(&invoices_topic).key(&debtor).payload(&payload))
                .map_err(|(e, _)| e)?,
        );
        kids.push(kid);
    }
    for a in futures::future::join_all(acks).await {
        a?.map_err(|(e, _)| e)?;
    }
    stack.start_service("matcher");
    stack.start_service("watcher");
    let started = Instant::now();
    loop {
        let indexed = counter(
            &stack,
            "matcher",
            "forfall_messages_total",
            &[&format!("topic=\"{invoices_topic}\""), "outcome=\"applied\""],
        )
        .await;
        let opened = counter(
            &stack,
            "watcher",
            "forfall_watcher_transitions_total",
            &["kind=\"opened\""],
        )
        .await;
        if indexed as usize >= n && opened as usize >= n {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "indexing {n} invoices took over 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "setup: {n} invoices indexed by the matcher and opened by the watcher in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let payment = |i: usize| PaymentReceived {
        event_id: new_event_id(),
        tenant: "bench".into(),
        debtor_id: None,
        occurred_at: chrono::Utc::now().timestamp_millis(),
        payment_id: format!("tx-{i}"),
        amount_minor: 49_900,
        currency: "NOK".into(),
        reference: Some(kids[i].clone()),
        remittance_text: None,
        payer_name: None,
        payer_account: None,
        booking_date: epoch_days(due),
        value_date: epoch_days(due),
    };

    // Phase 1: a steady rate; latency per payment to its invoice's `paid` event.
    let steady = n / 2;
    let mut sent_at: HashMap<String, i64> = HashMap::with_capacity(steady);
    let mut acks = Vec::with_capacity(steady);
    let phase_start = Instant::now();
    for i in 0..steady {
        let target = phase_start + Duration::from_secs_f64(i as f64 / rate);
        if let Some(wait) = target.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        let p = payment(i);
        sent_at.insert(format!("b-{i}"), p.occurred_at);
        let payload = stack.rt.codec.encode(&payments_topic, &p).await?;
        acks.push(
            producer
                .send_result(FutureRecord::to(&payments_topic).key("bench").payload(&payload))
                .map_err(|(e, _)| e)?,
        );
    }
    let offered = steady as f64 / phase_start.elapsed().as_secs_f64();
    for a in futures::future::join_all(acks).await {
        a?.map_err(|(e, _)| e)?;
    }
    let events_topic = stack.topic(&stack.topics().journey_events);
    let paid_count = || async {
        counter(
            &stack,
            "watcher",
            "forfall_watcher_transitions_total",
            &["kind=\"paid\""],
        )
        .await as usize
    };
    while paid_count().await < steady {
        anyhow::ensure!(
            phase_start.elapsed() < Duration::from_secs(600),
            "steady phase did not drain"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events = stack.read::<JourneyEvent>(&events_topic).await?;
    let mut latencies: Vec<f64> = events
        .iter()
        .filter(|e| e.kind == "paid")
        .filter_map(|e| sent_at.get(&e.invoice_id).map(|sent| (e.occurred_at - sent) as f64))
        .collect();
    latencies.sort_by(|a, b| a.total_cmp(b));
    // The first hop: payment produced -> the matcher's decision (its PaymentMatched record).
    let matched = stack
        .read::<records::PaymentMatched>(&stack.topic(&stack.topics().payments_matched))
        .await?;
    let mut to_matcher: Vec<f64> = matched
        .iter()
        .filter_map(|m| sent_at.get(&m.invoice_id).map(|sent| (m.occurred_at - sent) as f64))
        .collect();
    to_matcher.sort_by(|a, b| a.total_cmp(b));
    if std::env::var_os("BENCH_DEBUG").is_some() {
        // Latency by when the payment was sent, in 250 ms slices: a backlog or a stall shows.
        let first = sent_at.values().min().copied().unwrap_or(0);
        let mut slices: std::collections::BTreeMap<i64, Vec<f64>> = Default::default();
        for m in &matched {
            if let Some(sent) = sent_at.get(&m.invoice_id) {
                slices
                    .entry((sent - first) / 250)
                    .or_default()
                    .push((m.occurred_at - sent) as f64);
            }
        }
        for (slice, mut l) in slices {
            l.sort_by(|a, b| a.total_cmp(b));
            eprintln!(
                "  sent +{} ms: {} payments, to matcher p50 {:.0} max {:.0}",
                slice * 250,
                l.len(),
                percentile(&l, 0.5),
                l.last().copied().unwrap_or(0.0)
            );
        }
    }

    // Phase 2: the rest at once; matched per second from first to last decision.
    let burst = n - steady;
    let mut acks = Vec::with_capacity(burst);
    let before = counter(
        &stack,
        "matcher",
        "forfall_matcher_payments_total",
        &["result=\"exact_reference\""],
    )
    .await as usize;
    for i in steady..n {
        let payload = stack.rt.codec.encode(&payments_topic, &payment(i)).await?;
        acks.push(
            producer
                .send_result(FutureRecord::to(&payments_topic).key("bench").payload(&payload))
                .map_err(|(e, _)| e)?,
        );
    }
    for a in futures::future::join_all(acks).await {
        a?.map_err(|(e, _)| e)?;
    }
    let burst_start = Instant::now();
    loop {
        let matched = counter(
            &stack,
            "matcher",
            "forfall_matcher_payments_total",
            &["result=\"exact_reference\""],
        )
        .await as usize;
        if matched >= before + burst {
            break;
        }
        anyhow::ensure!(
            burst_start.elapsed() < Duration::from_secs(600),
            "burst phase did not drain"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let burst_secs = burst_start.elapsed().as_secs_f64();
    if std::env::var_os("BENCH_DEBUG").is_some() {
        for line in stack.metrics("matcher").await?.lines() {
            if line.contains("payments_total")
                || line.contains("handle_seconds_sum")
                || line.contains("handle_seconds_count")
                || line.contains("retries")
            {
                eprintln!("{line}");
            }
        }
    }

    // Baseline: a plain rdkafka consume-and-produce relay of the same payment bytes.
    let relay_topic = format!("{}.bench.relay", stack.prefix);
    forfall_platform::kafka::ensure_topics(&stack.rt.config.kafka, std::slice::from_ref(&relay_topic)).await?;
    let consumer: StreamConsumer = bench_client(&brokers)
        .set("group.id", format!("{}.relay", stack.prefix))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "2000")
        .set("heartbeat.interval.ms", "300")
        .create()?;
    consumer.subscribe(&[payments_topic.as_str()])?;
    let mut stream = consumer.stream();
    let mut relay_started = None;
    let mut relay_acks = Vec::with_capacity(n);
    for _ in 0..n {
        let m = stream.next().await.ok_or_else(|| anyhow::anyhow!("relay ended"))??;
        relay_started.get_or_insert_with(Instant::now);
        relay_acks.push(
            producer
                .send_result(
                    FutureRecord::to(&relay_topic)
                        .key(m.key().unwrap_or_default())
                        .payload(m.payload().unwrap_or_default()),
                )
                .map_err(|(e, _)| e)?,
        );
    }
    for a in futures::future::join_all(relay_acks).await {
        a?.map_err(|(e, _)| e)?;
    }
    let relay_rate = n as f64 / relay_started.map(|s| s.elapsed().as_secs_f64()).unwrap_or(f64::NAN);

    println!(
        "steady phase: {steady} payments offered at {offered:.0}/s; payment -> invoice state (paid event) latency:"
    );
    println!(
        "  p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms  ({} samples)",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.9),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(f64::NAN),
        latencies.len()
    );
    println!(
        "  of which payment -> matcher's decision: p50 {:.1} ms  p99 {:.1} ms",
        percentile(&to_matcher, 0.5),
        percentile(&to_matcher, 0.99),
    );
    println!(
        "burst phase: {burst} payments matched in {burst_secs:.2} s = {:.0} payments/s",
        burst as f64 / burst_secs
    );
    println!(
        "plain rdkafka relay of the same payment bytes: {relay_rate:.0} records/s; ratio matcher / relay: {:.3}",
        (burst as f64 / burst_secs) / relay_rate
    );
    stack.shutdown().await;
    // Left behind, the keys would slow every test that scans the shared dev Redis.
    remove_keys(&mut stack.redis(), &stack.rt.config.redis.key_prefix).await?;
    Ok(())
}
