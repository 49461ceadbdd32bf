//! Benchmark: rebuilding the watcher's Redis state from its changelog at utility scale.
//!
//!     cargo run --release -p forfall-e2e --bin rebuild-throughput -- 1000000
//!
//! N open invoices (one per customer, realistic sizes) are written the way the watcher writes
//! them: each journey's value on `forfall.watcher.changelog.v1`, then Redis (journey, timer,
//! the debtor's open invoices). Redis' memory is measured. Then Redis loses the watcher's keys
//! and `forfall rebuild`'s code replays the changelog into it. Reported: the rebuild's time and
//! records/s, Redis' memory after against before, and as the baseline of the same run, the same
//! changelog read end to end without applying anything (the broker and client's own speed).
//! The rebuilt state is checked: every journey and every timer is back. Last, N/10 closed
//! (paid) invoices are written and what one costs in Redis until its retention is reported.

use std::time::Instant;

use forfall_domain::journey::TimerChange;
use forfall_domain::policy;
use forfall_e2e::*;
use forfall_platform::changelog;
use forfall_platform::clock::ManualClock;
use forfall_watcher::store::{Save, Stored};

/// How many journeys and timers Redis holds under `prefix`.
async fn count(redis: &mut redis::aio::ConnectionManager, prefix: &str, partitions: i32) -> anyhow::Result<(u64, u64)> {
    let mut journeys = 0u64;
    let mut scan = KeyScan::new(format!("{prefix}journeys:*"), 10_000);
    while let Some(keys) = scan.next(redis).await? {
        let mut pipe = redis::pipe();
        for k in &keys {
            pipe.hlen(k);
        }
        let lens: Vec<u64> = pipe.query_async(redis).await?;
        journeys += lens.iter().sum::<u64>();
    }
    let mut timers = 0u64;
    for p in 0..partitions {
        let n: u64 = redis::cmd("ZCARD")
            .arg(format!("{prefix}timers:{p}"))
            .query_async(redis)
            .await?;
        timers += n;
    }
    Ok((journeys, timers))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n = bench_arg(1, 1_000_000.0)? as usize;
    let due = chrono::NaiveDate::from_ymd_opt(2026, 11, 2).ok_or_else(|| anyhow::anyhow!("date"))?;
    let mut config = base_config();
    config.log.level = "warn".into();
    let stack = LocalStack::start(config, ManualClock::new(at("2026-11-02T06:00:00Z"))).await?;
    let prefix = stack.rt.config.redis.key_prefix.clone();
    let partitions = stack.rt.config.kafka.partitions;
    let (store, producer) = watcher_store(&stack).await?;
    let mut redis = stack.redis();
    let law = forfall_domain::law::LawBook::builtin()?;
    let policy = policy::load(policy::DEFAULT_POLICY, &law, due)?;

    // The watcher's state for N open invoices, on the changelog and in Redis.
    let before = used_memory(&mut redis).await?;
    let started = Instant::now();
    let mut i = 0;
    while i < n {
        let end = (i + 4000).min(n);
        let mut saves = Vec::with_capacity(end - i);
        for k in i..end {
            let snapshot = household_invoice("", k, due)?;
            let partition = partition_of(&snapshot.debtor_id, partitions);
            let d = opened_new_customer(&policy, snapshot, due);
            anyhow::ensure!(matches!(d.timer, TimerChange::Schedule { .. }), "a timer per journey");
            saves.push(Save {
                expected: None,
                stored: Stored {
                    journey: d.journey,
                    partition,
                    pending_step: None,
                    pending_fire_ms: None,
                    trace: None,
                },
                timer: d.timer,
                fired_step: None,
                stops_contact: false,
            });
        }
        write_journeys(&store, &producer, saves).await?;
        i = end;
    }
    let written_in = started.elapsed();
    let after_writing = used_memory(&mut redis).await?;
    let (journeys, timers) = count(&mut redis, &prefix, partitions).await?;
    anyhow::ensure!(
        journeys == n as u64 && timers == n as u64,
        "written: {journeys} journeys, {timers} timers"
    );
    println!(
        "state: {n} open invoices written in {:.1} s; Redis {:.1} MB, {:.0} bytes per open invoice",
        written_in.as_secs_f64(),
        (after_writing - before) as f64 / 1e6,
        (after_writing - before) as f64 / n as f64
    );

    // Baseline: the changelog read to its end, nothing applied.
    let topic = store.changelog().topic.clone();
    let all: Vec<(i32, i64)> = (0..partitions).map(|p| (p, 0)).collect();
    let baseline = changelog::replay(
        &stack.rt.config.kafka,
        &topic,
        &all,
        forfall_watcher::rebuild::BATCH,
        &mut DiscardChanges,
        |_| {},
    )
    .await?;
    println!("baseline (read only): {baseline}");

    // Redis loses the watcher's state; the rebuild puts it back.
    remove_keys(&mut redis, &prefix).await?;
    let emptied = used_memory(&mut redis).await?;
    let rebuilt = forfall_watcher::rebuild::rebuild(
        &stack.rt.config.kafka,
        &topic,
        &store,
        stack.redis(),
        &(0..partitions).collect::<Vec<_>>(),
        |p| eprintln!("rebuilding: {p}"),
    )
    .await?;
    let after_rebuild = used_memory(&mut redis).await?;
    let (journeys, timers) = count(&mut redis, &prefix, partitions).await?;
    anyhow::ensure!(
        journeys == n as u64 && timers == n as u64,
        "rebuilt: {journeys} journeys and {timers} timers of {n}"
    );
    println!("rebuild: {rebuilt}");
    println!(
        "rebuild: {n} journeys and {n} timers back in {:.1} s ({:.0} records/s, {:.2}x the read-only baseline's rate); Redis {:.1} MB after against {:.1} MB before the loss",
        rebuilt.elapsed.as_secs_f64(),
        rebuilt.records_per_second(),
        rebuilt.records_per_second() / baseline.records_per_second().max(1e-9),
        (after_rebuild - emptied) as f64 / 1e6,
        (after_writing - before) as f64 / 1e6,
    );

    // Closed invoices (paid in full), kept until their retention: what one costs.
    let closed = (n / 10).max(1);
    let before_closed = used_memory(&mut redis).await?;
    let mut i = 0;
    while i < closed {
        let end = (i + 4000).min(closed);
        let mut saves = Vec::with_capacity(end - i);
        for k in i..end {
            let snapshot = household_invoice("paid-", k, due)?;
            let partition = partition_of(&snapshot.debtor_id, partitions);
            let amount = snapshot.amount;
            let opened = forfall_domain::journey::on_invoice(None, snapshot, &forfall_domain::journey::Plan::builtin());
            let paid = forfall_domain::journey::on_payment(opened.journey, &format!("pay-{k}"), amount)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            saves.push(Save {
                expected: None,
                stored: Stored {
                    journey: paid.journey,
                    partition,
                    pending_step: None,
                    pending_fire_ms: None,
                    trace: None,
                },
                timer: paid.timer,
                fired_step: None,
                stops_contact: false,
            });
        }
        write_journeys(&store, &producer, saves).await?;
        i = end;
    }
    let after_closed = used_memory(&mut redis).await?;
    println!(
        "closed: {closed} paid invoices kept until their retention: {:.0} bytes per closed invoice",
        (after_closed - before_closed) as f64 / closed as f64
    );
    remove_keys(&mut redis, &prefix).await?;
    stack.shutdown().await;
    Ok(())
}
