//! Benchmark: rebuilding ingest's, the matcher's and dispatch's Redis state from the topics at
//! utility scale.
//!
//!     cargo run --release -p forfall-e2e --bin derived-rebuild-throughput -- 1000000
//!
//! N invoice snapshots (one per customer, realistic sizes) on `forfall.invoices.v1`, N/2
//! payments matched on `forfall.payments.matched.v1` and N/2 dispatch outcomes on
//! `forfall.dispatch.outcomes.v1`, as the services write them. Then each service's rebuild
//! replays its topics into an empty Redis, timed; as the baseline of the same run, the same
//! topics read end to end without applying anything (the broker and client's own speed). The
//! rebuilt state is checked by counting its keys.

use std::time::Instant;

use forfall_e2e::*;
use forfall_platform::changelog::{self, Progress};
use forfall_platform::clock::ManualClock;
use forfall_platform::derived_state::Rebuild;
use forfall_platform::rebuild_resume::Resume;
use forfall_platform::records::{DispatchOutcome, DispatchStatus, InvoiceChange, PaymentMatched, Record, new_event_id};
use rdkafka::producer::{FutureProducer, FutureRecord};

async fn keys_matching(redis: &mut redis::aio::ConnectionManager, pattern: &str) -> anyhow::Result<u64> {
    let mut n = 0u64;
    let mut scan = KeyScan::new(pattern.to_owned(), 10_000);
    while let Some(keys) = scan.next(redis).await? {
        n += keys.len() as u64;
    }
    Ok(n)
}

async fn produce_all<T: Record>(
    stack: &LocalStack,
    producer: &FutureProducer,
    topic: &str,
    records: impl Iterator<Item = (String, T)>,
) -> anyhow::Result<()> {
    let mut acks = Vec::new();
    for (key, record) in records {
        let payload = stack.rt.codec.encode(topic, &record).await?;
        acks.push(
            producer
                .send_result(FutureRecord::to(topic).key(&key).payload(&payload))
                .map_err(|(e, _)| e)?,
        );
        if acks.len() >= 50_000 {
            for a in futures::future::join_all(acks.drain(..)).await {
                a?.map_err(|(e, _)| e)?;
            }
        }
    }
    for a in futures::future::join_all(acks).await {
        a?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

async fn baseline(stack: &LocalStack, topics: &[String]) -> anyhow::Result<Progress> {
    let mut total = Progress::default();
    for topic in topics {
        total.add(&changelog::replay_whole(&stack.rt.config.kafka, topic, 2000, &mut DiscardChanges, |_| {}).await?);
    }
    Ok(total)
}

fn report(service: &str, rebuilt: &Progress, base: &Progress, memory: (i64, i64), per: (usize, &str)) {
    println!(
        "{service}: {} records rebuilt in {:.1} s ({:.0} records/s, {:.2}x the read-only baseline's {:.0} records/s); Redis +{:.1} MB, {:.0} bytes per {}",
        rebuilt.records,
        rebuilt.elapsed.as_secs_f64(),
        rebuilt.records_per_second(),
        rebuilt.records_per_second() / base.records_per_second().max(1e-9),
        base.records_per_second(),
        (memory.1 - memory.0) as f64 / 1e6,
        (memory.1 - memory.0) as f64 / per.0.max(1) as f64,
        per.1
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n = bench_arg(1, 1_000_000.0)? as usize;
    let due = chrono::NaiveDate::from_ymd_opt(2026, 11, 2).ok_or_else(|| anyhow::anyhow!("date"))?;
    let mut config = base_config();
    config.log.level = "warn".into();
    let stack = LocalStack::start(config, ManualClock::new(at("2026-11-02T06:00:00Z"))).await?;
    let prefix = stack.rt.config.redis.key_prefix.clone();
    let topics = stack.topics();
    let (invoices, matched, outcomes) = (
        stack.topic(&topics.invoices),
        stack.topic(&topics.payments_matched),
        stack.topic(&topics.dispatch_outcomes),
    );
    let producer: FutureProducer = bench_client(&stack.rt.config.kafka.brokers)
        .set("linger.ms", "20")
        .create()?;

    let started = Instant::now();
    let mut snapshots = Vec::with_capacity(n);
    for i in 0..n {
        snapshots.push(household_invoice("", i, due)?);
    }
    produce_all(
        &stack,
        &producer,
        &invoices,
        snapshots.iter().map(|s| {
            let source = forfall_ingest::Source {
                event_id: &s.invoice_id,
                occurred_at: 0,
                credit_note_id: None,
            };
            (
                s.debtor_id.clone(),
                forfall_ingest::invoice_record(s, InvoiceChange::Issued, source),
            )
        }),
    )
    .await?;
    produce_all(
        &stack,
        &producer,
        &matched,
        snapshots.iter().step_by(2).map(|s| {
            (
                s.debtor_id.clone(),
                PaymentMatched {
                    event_id: new_event_id(),
                    tenant: s.tenant.clone(),
                    debtor_id: s.debtor_id.clone(),
                    occurred_at: 0,
                    payment_id: format!("pay-{}", s.invoice_id),
                    invoice_id: s.invoice_id.clone(),
                    amount_minor: s.amount.minor,
                    currency: "DKK".into(),
                    rule: "exact_reference".into(),
                    reference: s.payment_reference.clone(),
                    value_date: forfall_domain::invoice::epoch_days(due),
                    matched_by: None,
                },
            )
        }),
    )
    .await?;
    produce_all(
        &stack,
        &producer,
        &outcomes,
        snapshots.iter().skip(1).step_by(2).map(|s| {
            (
                s.debtor_id.clone(),
                DispatchOutcome {
                    event_id: new_event_id(),
                    tenant: s.tenant.clone(),
                    debtor_id: s.debtor_id.clone(),
                    occurred_at: 0,
                    action_id: format!("action-{}", s.invoice_id),
                    invoice_id: s.invoice_id.clone(),
                    step: "nudge".into(),
                    channel: "email".into(),
                    status: DispatchStatus::Sent,
                    reason: None,
                    provider_message_id: Some(format!("<{}@forfall.invalid>", s.invoice_id)),
                    content_sha256: None,
                    covered_invoice_ids: Vec::new(),
                },
            )
        }),
    )
    .await?;
    println!(
        "topics: {n} invoices, {} matched payments, {} dispatch outcomes written in {:.1} s",
        n.div_ceil(2),
        n / 2,
        started.elapsed().as_secs_f64()
    );

    let redis = stack.redis();
    let mut conn = stack.redis();

    let base = baseline(&stack, std::slice::from_ref(&invoices)).await?;
    let before = used_memory(&mut conn).await?;
    let ingest = forfall_ingest::rebuilder(&stack.rt, redis.clone())?
        .rebuild(&fresh(&redis, &stack, "ingest").await?, &|p| eprintln!("ingest: {p}"))
        .await?;
    let stored = keys_matching(&mut conn, &format!("{prefix}ingest:invoice:*")).await?;
    anyhow::ensure!(stored == n as u64, "ingest rebuilt {stored} of {n} snapshots");
    report(
        "ingest",
        &ingest,
        &base,
        (before, used_memory(&mut conn).await?),
        (n, "invoice"),
    );

    let base = baseline(
        &stack,
        &[
            invoices.clone(),
            matched.clone(),
            stack.topic(&topics.payments_unmatched),
        ],
    )
    .await?;
    let before = used_memory(&mut conn).await?;
    let matcher = forfall_matcher::rebuilder(&stack.rt, &forfall_matcher::MatcherSettings::default(), redis.clone())
        .rebuild(&fresh(&redis, &stack, "matcher").await?, &|p| eprintln!("matcher: {p}"))
        .await?;
    let indexed = keys_matching(&mut conn, &format!("{prefix}matcher:inv:*")).await?;
    let decided = keys_matching(&mut conn, &format!("{prefix}matcher:payment:*")).await?;
    anyhow::ensure!(
        indexed == n as u64 && decided == n.div_ceil(2) as u64,
        "matcher rebuilt {indexed} of {n} invoices, {decided} of {} payments",
        n.div_ceil(2)
    );
    report(
        "matcher",
        &matcher,
        &base,
        (before, used_memory(&mut conn).await?),
        (n, "invoice (its index, and every other one paid)"),
    );

    let changelog_topic = stack.topic(&topics.dispatch_changelog);
    changelog::ensure(
        &stack.rt.config.kafka,
        &changelog_topic,
        stack.rt.config.kafka.partitions,
    )
    .await?;
    let base = baseline(&stack, &[outcomes.clone(), changelog_topic]).await?;
    let before = used_memory(&mut conn).await?;
    let settings = forfall_dispatch::DispatchSettings::default();
    let dispatch = forfall_dispatch::rebuilder(&stack.rt, &settings, redis.clone())
        .rebuild(&fresh(&redis, &stack, "dispatch").await?, &|p| {
            eprintln!("dispatch: {p}")
        })
        .await?;
    let claims = keys_matching(&mut conn, &format!("{prefix}dispatch:claim:*")).await?;
    anyhow::ensure!(
        claims == (n / 2) as u64,
        "dispatch rebuilt {claims} of {} claims",
        n / 2
    );
    report(
        "dispatch",
        &dispatch,
        &base,
        (before, used_memory(&mut conn).await?),
        (n / 2, "message claim"),
    );

    remove_keys(&mut conn, &prefix).await?;
    stack.shutdown().await;
    Ok(())
}

/// No progress of an earlier rebuild: the whole replay is measured.
async fn fresh(redis: &redis::aio::ConnectionManager, stack: &LocalStack, service: &str) -> anyhow::Result<Resume> {
    let resume = Resume::new(redis.clone(), &stack.rt.keys(), service);
    resume.clear().await?;
    Ok(resume)
}
