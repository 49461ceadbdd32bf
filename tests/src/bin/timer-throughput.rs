//! Benchmark: the watcher's timers at utility scale.
//!
//!     cargo run --release -p forfall-e2e --bin timer-throughput -- 1000000 5000 20
//!
//! (invoices due at one instant, steady timers per second, seconds of the steady phase)
//!
//! Phase 1, a billing run: N open invoices, one per customer, all due at 09:00 on one day, are
//! written to Redis with the watcher's own store (the journey and timer each would have after
//! `forfall.invoices.v1`), and Redis' memory is measured before and after. The clock is moved
//! past the moment and the watcher started: the time to its first fire, the time to fire all N
//! (each fire produces its journey events and the nudge action to Kafka, acknowledged, and
//! writes the journey), and fires per second are reported.
//!
//! The baseline, in the same run: the plumbing of those N fires without any journey logic (the
//! same number of pipelined Redis claims, reads and writes, and acknowledged produces of
//! records the size of the watcher's), so that the drain is reported as a ratio to what this
//! machine's Redis and broker allow today.
//!
//! Phase 2, steady: on a fresh stack, timers fall due at a steady rate while the clock runs in
//! real time; each action's lateness is its production time (the watcher's clock) minus the
//! moment its timer fell due, read back from the actions topic. Then the watcher is stopped
//! (its consume loop aborted; its timer loop gives its partition locks up), more timers fall
//! due, and the time from its restart to its first fire is reported. (After a crash the locks
//! are not given up: a restart waits for them to expire, `watcher.timer_lock_ms`, 10 s.)

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use forfall_domain::journey::TimerChange;
use forfall_domain::policy;
use forfall_e2e::*;
use forfall_platform::clock::{Clock, ManualClock};
use forfall_platform::kafka::Producer;
use forfall_platform::records::JourneyAction;
use forfall_watcher::store::Store;

/// Writes `count` journeys starting at `from` as the watcher would have them after their
/// invoices arrived, each timer at `fire_at(i)` (or the plan's own moment); returns the rate.
async fn schedule(
    store: &Store,
    producer: &Producer,
    partitions: usize,
    prefix: &str,
    range: std::ops::Range<usize>,
    due: chrono::NaiveDate,
    fire_at: impl Fn(usize) -> Option<DateTime<Utc>>,
) -> anyhow::Result<f64> {
    let law = forfall_domain::law::LawBook::builtin()?;
    let policy = policy::load(policy::DEFAULT_POLICY, &law, due)?;
    let started = Instant::now();
    let count = range.len();
    let chunk = 2000;
    let mut i = range.start;
    while i < range.end {
        let end = (i + chunk).min(range.end);
        let mut saves = Vec::with_capacity(end - i);
        for k in i..end {
            let snapshot = household_invoice(prefix, k, due)?;
            let d = opened_new_customer(&policy, snapshot, due);
            let timer = match (d.timer, fire_at(k)) {
                (TimerChange::Schedule { step_index, .. }, Some(at)) => TimerChange::Schedule {
                    step_index,
                    fire_at: at,
                },
                (t, _) => t,
            };
            let partition = (k % partitions.max(1)) as i32;
            saves.push(new_journey_save(d.journey, partition, timer));
        }
        write_journeys(store, producer, saves).await?;
        i = end;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Bytes of a stored journey, a journey event and a nudge action, roughly as the watcher's are.
const JOURNEY_BYTES: usize = 450;
const EVENT_BYTES: usize = 250;
const ACTION_BYTES: usize = 600;

/// The plumbing of `n` fires without any journey logic, on `partitions` partitions at once as
/// the watcher fires them: per claim of `batch` due timers (a sorted set read as the watcher
/// claims), one pipelined read of their journeys, three acknowledged produces per fire (its
/// event, its action, its changelog record), and one pipelined write of each journey with its
/// timer removed. Returns fires per second.
async fn plumbing_baseline(
    stack: &LocalStack,
    producer: &Producer,
    n: usize,
    batch: usize,
    partitions: usize,
) -> anyhow::Result<f64> {
    use forfall_platform::kafka::Outbound;
    let prefix = format!("{}baseline:", stack.rt.config.redis.key_prefix);
    let topic = stack.topic("bench.baseline");
    forfall_platform::kafka::ensure_topics(&stack.rt.config.kafka, std::slice::from_ref(&topic)).await?;
    let mut redis = stack.redis();
    let journey = vec![b'j'; JOURNEY_BYTES];
    for chunk in (0..n).collect::<Vec<_>>().chunks(2000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            pipe.set(format!("{prefix}j:{i}"), &journey).ignore();
            pipe.zadd(format!("{prefix}timers:{}", i % partitions), i.to_string(), 0)
                .ignore();
        }
        let _: () = pipe.query_async(&mut redis).await?;
    }
    let started = Instant::now();
    let drains = (0..partitions).map(|p| {
        let (mut redis, prefix, topic) = (stack.redis(), prefix.clone(), topic.clone());
        async move {
            let timers = format!("{prefix}timers:{p}");
            loop {
                let due: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                    .arg(&timers)
                    .arg("-inf")
                    .arg(1)
                    .arg("LIMIT")
                    .arg(0)
                    .arg(batch)
                    .query_async(&mut redis)
                    .await?;
                if due.is_empty() {
                    return anyhow::Ok(());
                }
                let mut read = redis::pipe();
                for m in &due {
                    read.get(format!("{prefix}j:{m}"));
                }
                let journeys: Vec<Vec<u8>> = read.query_async(&mut redis).await?;
                let mut outs = Vec::with_capacity(due.len() * 3);
                for (m, j) in due.iter().zip(&journeys) {
                    for payload in [vec![b'e'; EVENT_BYTES], vec![b'a'; ACTION_BYTES], j.clone()] {
                        outs.push(Outbound {
                            topic: topic.clone(),
                            key: m.clone(),
                            payload,
                            trace: forfall_platform::telemetry::TraceContext::new_root(),
                            partition: None,
                        });
                    }
                }
                producer.send_all(&outs).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
                let mut write = redis::pipe();
                for (m, j) in due.iter().zip(&journeys) {
                    write.set(format!("{prefix}j:{m}"), j).ignore();
                    write.zrem(&timers, m).ignore();
                }
                let _: () = write.query_async(&mut redis).await?;
            }
        }
    });
    for drained in futures::future::join_all(drains).await {
        drained?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

async fn fired(stack: &LocalStack, service: &str) -> f64 {
    let m = stack.metrics(service).await.unwrap_or_default();
    metric_value(&m, "forfall_watcher_steps_fired_total", &["step=\"nudge\""]).unwrap_or(0.0)
}

/// The watcher's settings a run may change, by variable: both phases' stacks take them.
const SETTINGS: &[(&str, &str)] = &[
    ("WATCHER_BATCH", "watcher.batch"),
    ("WATCHER_TICK_MS", "watcher.tick_ms"),
    ("WATCHER_TIMER_LINGER_MS", "watcher.timer_linger_ms"),
];

fn config() -> anyhow::Result<forfall_platform::config::CommonConfig> {
    let mut c = base_config();
    c.log.level = "warn".into();
    // The shared producer's linger, for a comparison with the timer rounds' own.
    if let Ok(linger) = std::env::var("KAFKA_LINGER_MS") {
        c.kafka.linger_ms = linger
            .parse()
            .map_err(|e| anyhow::anyhow!("KAFKA_LINGER_MS={linger:?} is not a number of milliseconds: {e}"))?;
    }
    Ok(c)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n = bench_arg(1, 1_000_000.0)? as usize;
    let rate = bench_arg(2, 5_000.0)?;
    let steady_secs = bench_arg(3, 20.0)?;
    // Monday 2 November 2026: the nudge is at 09:00 in Copenhagen (CET) = 08:00 UTC.
    let due = chrono::NaiveDate::from_ymd_opt(2026, 11, 2).ok_or_else(|| anyhow::anyhow!("date"))?;
    let moment = at("2026-11-02T08:00:00Z");

    // Phase 1: a billing run falls due at once.
    let clock = ManualClock::new(at("2026-11-02T06:00:00Z"));
    let mut stack = LocalStack::start(config()?, clock.clone()).await?;
    counts_from_env(&mut stack, SETTINGS)?;
    let stack = stack;
    let mut redis = stack.redis();
    let listpack: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("hash-max-ziplist-value")
        .query_async(&mut redis)
        .await?;
    let (store, producer) = watcher_store(&stack).await?;
    let before = used_memory(&mut redis).await?;
    let scheduled_per_s = schedule(
        &store,
        &producer,
        stack.rt.config.kafka.partitions as usize,
        "",
        0..n,
        due,
        |_| None,
    )
    .await?;
    let after = used_memory(&mut redis).await?;
    let per_invoice = (after - before) as f64 / n as f64;
    println!(
        "phase 1: {n} invoices due at {moment} scheduled at {scheduled_per_s:.0}/s; Redis memory {:.1} MB, {per_invoice:.0} bytes per open invoice (hash-max-listpack-value {})",
        (after - before) as f64 / 1e6,
        listpack.get(1).map(String::as_str).unwrap_or("?")
    );
    for (kind, keys, bytes) in memory_by_kind(&mut redis, &stack.rt.config.redis.key_prefix).await? {
        println!(
            "  {kind}: {keys} keys, {:.0} bytes per open invoice (MEMORY USAGE)",
            bytes as f64 / n as f64
        );
    }
    clock.set(moment + chrono::Duration::seconds(1));
    let started = Instant::now();
    stack.start_service("watcher");
    let mut first = None;
    loop {
        let done = fired(&stack, "watcher").await;
        if done > 0.0 && first.is_none() {
            first = Some(started.elapsed());
        }
        if done as usize >= n {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(1800),
            "only {done} of {n} fired in 30 minutes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all = started.elapsed();
    let first = first.unwrap_or(all);
    let drain = all - first;
    println!(
        "phase 1: start to first fire {:.2} s; {n} fired in {:.1} s after the first ({:.0} fires/s; {:.1} s from start)",
        first.as_secs_f64(),
        drain.as_secs_f64(),
        n as f64 / drain.as_secs_f64().max(1e-9),
        all.as_secs_f64()
    );
    stack.shutdown().await;
    remove_keys(&mut redis, &stack.rt.config.redis.key_prefix).await?;
    let watcher_rate = n as f64 / drain.as_secs_f64().max(1e-9);
    let batch = match std::env::var("WATCHER_BATCH") {
        Ok(b) => b.parse::<usize>()?,
        Err(_) => forfall_watcher::WatcherSettings::default().batch,
    };
    let baseline = plumbing_baseline(&stack, &producer, n, batch, stack.rt.config.kafka.partitions as usize).await?;
    remove_keys(&mut redis, &stack.rt.config.redis.key_prefix).await?;
    println!(
        "phase 1 baseline: the same {n} fires' plumbing without journey logic (claims of {batch}, pipelined reads and writes, three acknowledged produces each) at {baseline:.0}/s; the watcher's drain is {:.2}x the baseline",
        watcher_rate / baseline.max(1e-9)
    );

    // Phase 2: timers fall due at a steady rate, the clock running in real time.
    let steady = (rate * steady_secs) as usize;
    let start_at = at("2026-11-02T10:00:00Z");
    let clock = ManualClock::new(start_at - chrono::Duration::seconds(1));
    let mut stack = LocalStack::start(config()?, clock.clone()).await?;
    counts_from_env(&mut stack, SETTINGS)?;
    let stack = stack;
    let (store, producer) = watcher_store(&stack).await?;
    // Two seconds of head start after the clock starts, so the first timers are not due yet.
    let lead = chrono::Duration::seconds(2);
    let fire_at = |i: usize| start_at + lead + chrono::Duration::microseconds((i as f64 * 1e6 / rate) as i64);
    schedule(
        &store,
        &producer,
        stack.rt.config.kafka.partitions as usize,
        "s",
        0..steady,
        due,
        |i| Some(fire_at(i)),
    )
    .await?;
    stack.start_service("watcher");
    stack.wait_ready(&["watcher"], WAIT).await?;
    tokio::time::sleep(Duration::from_secs(3)).await; // the group settles
    let real_start = Instant::now();
    let ticking = {
        let clock = clock.clone();
        tokio::spawn(async move {
            loop {
                let elapsed = chrono::Duration::from_std(real_start.elapsed()).unwrap_or_default();
                clock.set(start_at + elapsed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    eventually(
        "the steady phase to keep up",
        Duration::from_secs_f64(steady_secs * 4.0 + 120.0),
        || async { Ok((fired(&stack, "watcher").await as usize >= steady).then_some(())) },
    )
    .await?;
    let actions = stack
        .read::<JourneyAction>(&stack.topic(&stack.topics().journey_actions))
        .await?;
    let mut lateness: Vec<f64> = actions
        .iter()
        .filter_map(|a| {
            let i: usize = a.invoice_id.strip_prefix("sinv-")?.parse().ok()?;
            Some((a.occurred_at - fire_at(i).timestamp_millis()) as f64)
        })
        .collect();
    lateness.sort_by(f64::total_cmp);
    println!(
        "phase 2: {} timers due at {rate:.0}/s over {steady_secs:.0} s: lateness p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        lateness.len(),
        percentile(&lateness, 0.5),
        percentile(&lateness, 0.99),
        lateness.last().copied().unwrap_or(f64::NAN)
    );

    // A stop and a restart with timers due.
    stack.stop_service("watcher").await?;
    let now = clock.now();
    schedule(
        &store,
        &producer,
        stack.rt.config.kafka.partitions as usize,
        "r",
        0..10_000,
        due,
        |_| Some(now),
    )
    .await?;
    let restarted = Instant::now();
    stack.start_service("watcher");
    eventually("a fire after the restart", Duration::from_secs(300), || async {
        Ok((fired(&stack, "watcher").await > 0.0).then_some(()))
    })
    .await?;
    println!(
        "restart: stopped and restarted with 10000 timers due: first fire after {:.2} s",
        restarted.elapsed().as_secs_f64()
    );
    ticking.abort();
    stack.shutdown().await;
    remove_keys(&mut redis, &stack.rt.config.redis.key_prefix).await?;
    Ok(())
}
