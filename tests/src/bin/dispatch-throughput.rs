//! Benchmark: messages per second from dispatch to the local SMTP server with the idempotency
//! machinery (claim, last look, commit point, sent record) and without it (the benchmark-only
//! `dispatch.idempotency = false`), same actions, same concurrency, measured in the same run;
//! and the latency from a payment event to the moment its invoice's journey says `closed:paid`
//! (from which every last look suppresses), at a steady rate through ingest, matcher and watcher.
//!
//!     cargo run --release -p forfall-e2e --bin dispatch-throughput -- 5000 2000 500
//!
//! Arguments: actions per run, payments, payments per second, `dispatch.concurrency` (its
//! default when not given).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use forfall_domain::reference::{self, ReferenceKind};
use forfall_e2e::*;
use forfall_platform::clock::ManualClock;
use forfall_platform::journey_state;
use forfall_platform::records::JourneyAction;
use forfall_platform::redis_store::Keys;

fn action(i: usize, tenant: &str) -> JourneyAction {
    JourneyAction {
        debtor_id: format!("{tenant}:d{i}"),
        invoice_number: format!("B-{i}"),
        policy_version: "bench".into(),
        ..nudge_action(tenant, &format!("b-{i}"), &format!("d{i}@example.test"))
    }
}

/// Messages per second for `n` actions through one dispatch, with or without idempotency.
async fn messages_per_second(n: usize, idempotency: bool, concurrency: usize) -> anyhow::Result<f64> {
    let mut config = base_config();
    config.log.level = "warn".into();
    // Wednesday 09:00 in Copenhagen: inside contact hours.
    let mut stack = LocalStack::start(config, ManualClock::new(at("2026-09-02T07:00:00Z"))).await?;
    stack.set("dispatch.idempotency", idempotency);
    stack.set("dispatch.concurrency", concurrency);
    let tenant = "acme-energy";
    let actions: Vec<JourneyAction> = (0..n).map(|i| action(i, tenant)).collect();
    journeys_after(&stack, &actions, |_, _| "nudged").await?;
    let topic = stack.topic(&stack.topics().journey_actions);
    for chunk in actions.chunks(1000) {
        futures::future::try_join_all(chunk.iter().map(|a| stack.produce(&topic, &a.debtor_id, a))).await?;
    }
    stack.start_service("dispatch");
    // From the first message to the last: the group join is not the thing measured. Polled by
    // count: copying every message received on each look cost the process more CPU than
    // dispatch's own work by the end of a run.
    eventually("every message", Duration::from_secs(600), || async {
        Ok((stack.mail.count() >= n).then_some(()))
    })
    .await?;
    let times = stack.mail.received_times();
    let (first, last) = (times.iter().min().copied(), times.iter().max().copied());
    let (Some(first), Some(last)) = (first, last) else {
        anyhow::bail!("no message received");
    };
    stack.shutdown().await;
    // Left behind, the keys would slow every test that scans the shared dev Redis.
    remove_keys(&mut stack.redis(), &stack.rt.config.redis.key_prefix).await?;
    Ok((n - 1) as f64 / last.duration_since(first).as_secs_f64())
}

/// Payment event → journey `closed:paid`, per payment, at `rate` per second.
async fn payment_to_suppression(payments: usize, rate: f64) -> anyhow::Result<Vec<f64>> {
    let mut config = base_config();
    config.log.level = "warn".into();
    let clock = ManualClock::new(at("2026-09-01T07:00:00Z"));
    let stack = LocalStack::start(config, clock).await?;
    for s in ["ingest", "matcher", "watcher"] {
        stack.start_service(s);
    }
    stack
        .wait_ready(&["ingest", "matcher", "watcher"], Duration::from_secs(60))
        .await?;
    let billing = stack.topic(&stack.topics().billing_invoice_events);
    let ids: Vec<&'static str> = (0..payments)
        .map(|i| &*Box::leak(format!("p-{i}").into_boxed_str()))
        .collect();
    let emails: Vec<&'static str> = (0..payments)
        .map(|i| &*Box::leak(format!("p{i}@example.test").into_boxed_str()))
        .collect();
    let samples: Vec<Sample<'static>> = (0..payments)
        .map(|i| {
            let mut s = danish(ids[i], ids[i], day(2026, 9, 15), emails[i]);
            let fik = reference::generate(ReferenceKind::Fik71, &format!("{:014}", 1_000_000 + i))?.value;
            s.reference = Box::leak(fik.into_boxed_str());
            anyhow::Ok(s)
        })
        .collect::<anyhow::Result<_>>()?;
    let issued: Vec<(String, forfall_platform::records::InvoiceIssued)> =
        samples.iter().map(|s| (s.debtor_id(), s.issued())).collect();
    for chunk in issued.chunks(500) {
        futures::future::try_join_all(chunk.iter().map(|(debtor, inv)| stack.produce(&billing, debtor, inv))).await?;
    }
    let keys = Keys::new(&stack.rt.config.redis.key_prefix);
    let mut redis = stack.redis();
    let statuses = |redis: &mut redis::aio::ConnectionManager, ids: Vec<String>| {
        let mut pipe = redis::pipe();
        for id in &ids {
            let at = journey_state::location(&keys, "acme-energy", id);
            pipe.hget(at.key, at.field);
        }
        let mut redis = redis.clone();
        async move {
            let got: Vec<Option<Vec<u8>>> = pipe.query_async(&mut redis).await?;
            let statuses = got.iter().map(|v| journey_state::status_of(v.as_deref()));
            anyhow::Ok(ids.into_iter().zip(statuses).collect::<Vec<_>>())
        }
    };
    eventually("every invoice open", Duration::from_secs(120), || {
        let all: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        let fut = statuses(&mut redis, all);
        async move {
            Ok(fut
                .await?
                .iter()
                .all(|(_, s)| s.as_deref() == Some("open"))
                .then_some(()))
        }
    })
    .await?;
    let payments_topic = stack.topic(&stack.topics().payments);
    // Sent without waiting for each acknowledgement (as the importer does), so that a slow
    // acknowledgement neither lowers the rate nor delays the look at what has flipped.
    let producer: rdkafka::producer::FutureProducer = bench_client(&stack.rt.config.kafka.brokers)
        .set("linger.ms", stack.rt.config.kafka.linger_ms.to_string())
        .create()?;
    let mut acks = Vec::with_capacity(payments);
    let mut sent_at: HashMap<String, Instant> = HashMap::new();
    let mut latencies = Vec::new();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let started = Instant::now();
    let mut next = 0;
    while latencies.len() < payments {
        // Produce what is due by now at the steady rate, then look at what has flipped.
        while next < payments && started + interval * next as u32 <= Instant::now() {
            let s = &samples[next];
            let payment = s.payment(&format!("bank-{next}"), s.amount_minor, s.reference);
            let payload = stack.rt.codec.encode(&payments_topic, &payment).await?;
            sent_at.insert(ids[next].to_string(), Instant::now());
            acks.push(
                producer
                    .send_result(
                        rdkafka::producer::FutureRecord::to(&payments_topic)
                            .key("bank")
                            .payload(&payload),
                    )
                    .map_err(|(e, _)| e)?,
            );
            next += 1;
        }
        let pending: Vec<String> = sent_at.keys().cloned().collect();
        if !pending.is_empty() {
            for (id, status) in statuses(&mut redis, pending).await? {
                if status.as_deref() == Some("closed:paid")
                    && let Some(at) = sent_at.remove(&id)
                {
                    latencies.push(at.elapsed().as_secs_f64() * 1000.0);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        anyhow::ensure!(started.elapsed() < Duration::from_secs(600), "payments did not settle");
    }
    for a in futures::future::join_all(acks).await {
        a?.map_err(|(e, _)| e)?;
    }
    stack.shutdown().await;
    // Left behind, the keys would slow every test that scans the shared dev Redis.
    remove_keys(&mut stack.redis(), &stack.rt.config.redis.key_prefix).await?;
    latencies.sort_by(f64::total_cmp);
    Ok(latencies)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n = bench_arg(1, 5000.0)? as usize;
    let payments = bench_arg(2, 2000.0)? as usize;
    let rate = bench_arg(3, 500.0)?;
    // `dispatch.concurrency` (its default when not given).
    let concurrency = bench_arg(4, forfall_dispatch::DispatchSettings::default().concurrency as f64)? as usize;
    // Alternating runs, so that neither side always runs on a fresher broker; medians.
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        without.push(messages_per_second(n, false, concurrency).await?);
        with.push(messages_per_second(n, true, concurrency).await?);
    }
    with.sort_by(f64::total_cmp);
    without.sort_by(f64::total_cmp);
    let show = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ");
    println!("dispatch to SMTP, {n} messages per run, concurrency {concurrency}, 3 alternating runs each:");
    println!(
        "  with idempotency (claim, last look, commit, sent record): median {:.0} messages/s ({})",
        with[1],
        show(&with)
    );
    println!(
        "  without (benchmark-only switch):                           median {:.0} messages/s ({})",
        without[1],
        show(&without)
    );
    println!("  ratio of medians with/without: {:.2}", with[1] / without[1]);
    let latencies = payment_to_suppression(payments, rate).await?;
    println!("payment event -> journey closed:paid (suppresses from then on), {payments} payments at {rate:.0}/s:");
    println!(
        "  p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(f64::NAN)
    );
    Ok(())
}
