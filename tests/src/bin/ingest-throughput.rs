//! Benchmark: invoices per second through the ingest service, next to a plain rdkafka
//! consume-and-produce relay of the same bytes, measured in the same run on the same broker
//! (the machine is shared and noisy, so the ratio is the figure to compare).
//!
//!     make bench                    # or: cargo run --release -p forfall-e2e --bin ingest-throughput -- 300000 [DEBTORS [CONCURRENCY]]
//!
//! Both sides start on an already-filled topic with their own consumer group; each is timed
//! from its first record to its last acknowledged output, so group joins are not counted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use forfall_e2e::*;
use forfall_platform::clock::SystemClock;
use rdkafka::producer::FutureProducer;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(300_000);
    // A billing run bills each customer once: most debtors have one invoice in it. Fewer
    // debtors than invoices puts several invoices of a debtor in a row, which ingest handles
    // one after another (each after the previous one's output is acknowledged).
    let debtors: usize = std::env::args()
        .nth(2)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(n)
        .max(1);
    // Ingest's `ingest.concurrency` (its default when not given).
    let concurrency: Option<usize> = std::env::args().nth(3).map(|a| a.parse()).transpose()?;
    let mut config = base_config();
    config.log.level = "warn".into();
    let mut stack = LocalStack::start(config, Arc::new(SystemClock)).await?;
    if let Some(c) = concurrency {
        stack.set("ingest.concurrency", c);
    }
    let billing = stack.topic(&stack.topics().billing_invoice_events);
    let brokers = stack.rt.config.kafka.brokers.clone();

    // The input: n distinct invoices of `debtors` debtors, encoded once.
    let template = danish("x", "x", day(2026, 3, 15), "x@example.test").issued();
    let producer: FutureProducer = bench_client(&brokers).set("linger.ms", "5").create()?;
    let mut publisher = Publisher::new(producer, &billing);
    for i in 0..n {
        let mut e = template.clone();
        e.invoice_id = format!("inv-{i}");
        e.invoice_number = format!("{}", 1_000_000 + i);
        e.debtor_id = format!("acme-energy:c-{}", i % debtors);
        let payload = stack.rt.codec.encode(&billing, &e).await?;
        publisher.send(e.debtor_id, payload).await?;
    }
    let bytes = publisher.finish().await?;
    println!(
        "input: {n} InvoiceIssued records of {debtors} debtors, {} bytes on average, {} partitions",
        bytes / n.max(1),
        stack.rt.config.kafka.partitions
    );

    // Baseline: the same bytes through a plain rdkafka relay.
    let relay_topic = format!("{}.bench.relay", stack.prefix);
    forfall_platform::kafka::ensure_topics(&stack.rt.config.kafka, std::slice::from_ref(&relay_topic)).await?;
    let relay = plain_relay(&brokers, &format!("{}.relay", stack.prefix), &billing, &relay_topic, n).await?;
    let relay_rate = n as f64 / relay.as_secs_f64();
    println!(
        "plain rdkafka relay:  {n} records in {:>7.2} s = {:>9.0} records/s",
        relay.as_secs_f64(),
        relay_rate
    );

    // Ingest: validate, de-duplicate in Redis, normalise, re-encode, produce, commit after ack.
    stack.start_service("ingest");
    let mut started = None;
    loop {
        let m = stack.metrics("ingest").await.unwrap_or_default();
        let applied = metric_value(&m, "forfall_messages_total", &["outcome=\"applied\""]).unwrap_or(0.0) as usize;
        if applied > 0 && started.is_none() {
            started = Some(Instant::now());
        }
        if applied >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ingest = started.map(|s| s.elapsed()).unwrap_or_default();
    let ingest_rate = n as f64 / ingest.as_secs_f64();
    println!(
        "ingest service:       {n} invoices in {:>7.2} s = {:>9.0} invoices/s",
        ingest.as_secs_f64(),
        ingest_rate
    );
    println!("ratio ingest / relay: {:.3}", ingest_rate / relay_rate);
    let m = stack.metrics("ingest").await.unwrap_or_default();
    let sum = metric_value(&m, "forfall_handle_seconds_sum", &[]).unwrap_or(0.0);
    let count = metric_value(&m, "forfall_handle_seconds_count", &[]).unwrap_or(0.0);
    println!(
        "ingest's handler: {:.2} ms a record on average, {:.1} records in the handler at once on average",
        1000.0 * sum / count.max(1.0),
        sum / ingest.as_secs_f64()
    );
    stack.shutdown().await;
    // 50,000 snapshots kept 400 days would stay in the shared dev Redis, and every test that
    // scans its keys would slow down with them.
    remove_keys(&mut stack.redis(), &stack.rt.config.redis.key_prefix).await?;
    Ok(())
}
