//! The fault suite (`make chaos`, and a short run inside `make test`): the real service binaries
//! as separate processes on a private broker and Redis, a customer base living through a month
//! of simulated time (some pay before the due date, some after the nudge, some in two parts,
//! some dispute, some are credited, some never pay; payments as events and as camt.054 files),
//! while faults are played: `kill -9` of any service, second instances joining and leaving,
//! the broker and Redis frozen longer than the timeouts, the registry answering 500s, SIGTERM
//! while Redis is frozen, an SMTP server that takes a message and answers too late. The same
//! workload runs once without faults, for the throughput ratio. A history checker then reads
//! everything and counts what must never happen.
//!
//! Each run's seed is printed; `--seed N` replays it.

mod faults;
mod history;
mod infra;
mod wall_clock;
mod workload;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{Datelike, NaiveDate, TimeZone, Utc, Weekday};
use forfall_platform::avro::Codec;
use forfall_platform::config::CommonConfig;
use forfall_platform::records::Record;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

pub use history::{Findings, read_all};
pub use infra::{Helper, binaries_dir, signal};

use faults::Supervisor;
use infra::Infra;
use workload::{Happening, Route, Workload};

/// The services, each its own binary.
pub const SERVICES: [&str; 5] = ["ingest", "watcher", "dispatch", "matcher", "handoff"];
/// The tenant of the simulated customer base.
pub const TENANT: &str = "chaos";

#[derive(Debug, Clone)]
pub struct Settings {
    pub seed: u64,
    pub debtors: usize,
    /// Play faults (false: the baseline run the throughput is compared with).
    pub faults: bool,
}

/// What one run did and found.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub seed: u64,
    pub debtors: usize,
    pub faults: bool,
    pub seconds: f64,
    pub faults_played: BTreeMap<&'static str, u32>,
    pub unexpected_exits: Vec<String>,
    pub slow_stops: Vec<String>,
    pub findings: Findings,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.findings.clean() && self.unexpected_exits.is_empty()
    }
}

/// Runs the workload once, with or without faults, and checks its history.
pub async fn run(settings: Settings) -> anyhow::Result<Report> {
    let run_id = format!("{}{}", settings.seed, if settings.faults { "f" } else { "b" });
    let infra = Arc::new(Infra::start(&format!("{run_id}{}", &uuid::Uuid::new_v4().simple().to_string()[..6])).await?);
    tracing::info!(dir = %infra.dir.display(), seed = settings.seed, faults = settings.faults, "chaos: run started");
    let first_day = NaiveDate::from_ymd_opt(2026, 3, 2).unwrap_or_default();
    let workload = Workload::new(settings.seed, settings.debtors, first_day)?;
    let client = redis::Client::open(infra.config.redis.url.as_str())?;
    let mut redis = client.get_connection_manager().await?;
    infra.set_clock(&mut redis, at_ten(first_day)).await?;

    let supervisor = Arc::new(Supervisor::new(infra.clone()));
    for service in SERVICES {
        supervisor.start(service, 0).await?;
    }
    supervisor.wait_ready(Duration::from_secs(90)).await?;

    let started = Instant::now();
    let stop_faults = CancellationToken::new();
    let fault_player = settings
        .faults
        .then(|| tokio::spawn(faults::play(supervisor.clone(), settings.seed, stop_faults.clone())));
    let driven = drive(&infra, &supervisor, &workload, &mut redis, settings.faults).await;
    stop_faults.cancel();
    if let Some(player) = fault_player {
        player.await??;
    }
    driven?;
    supervisor.heal().await?;
    settle(&infra.config).await?;
    let seconds = started.elapsed().as_secs_f64();
    let findings = history::check(&infra, &workload).await?;
    supervisor.stop_all().await;
    Ok(Report {
        seed: settings.seed,
        debtors: settings.debtors,
        faults: settings.faults,
        seconds,
        faults_played: supervisor.played.lock().await.clone(),
        unexpected_exits: supervisor.unexpected_exits.lock().await.clone(),
        slow_stops: supervisor.slow_stops.lock().await.clone(),
        findings,
    })
}

/// 10:00 UTC: within every Nordic jurisdiction's contact hours on a weekday.
fn at_ten(day: NaiveDate) -> chrono::DateTime<Utc> {
    Utc.from_utc_datetime(&day.and_hms_opt(10, 0, 0).unwrap_or_default())
}

/// Day by day: move the clock, feed the day's happenings, wait until the pipeline caught up.
async fn drive(
    infra: &Infra,
    supervisor: &Supervisor,
    workload: &Workload,
    redis: &mut redis::aio::ConnectionManager,
    faults: bool,
) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &infra.config.kafka.brokers)
        .set("broker.address.family", "v4")
        .set("partitioner", "murmur2_random")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()?;
    let codec = Codec::new(&infra.config.registry.url, true);
    let http = reqwest::Client::new();
    let topics = &infra.config.topics;
    let (billing, payments, requests) = (
        topics.name(&topics.billing_invoice_events),
        topics.name(&topics.payments),
        topics.name(&topics.debtor_requests),
    );
    // Messages held for contact hours go out on a weekday: the run ends on one.
    let mut last = workload.last_day;
    while matches!(last.weekday(), Weekday::Sat | Weekday::Sun | Weekday::Mon) {
        last = last.succ_opt().unwrap_or(last);
    }
    let mut day = workload.first_day;
    while day <= last {
        tracing::info!(%day, "chaos: a new day");
        infra.set_clock(redis, at_ten(day)).await?;
        let mut camt = Vec::new();
        for happening in workload.on(day) {
            match happening {
                Happening::Issue(i) => produce(&producer, &codec, &billing, &i.debtor_id.clone(), &*i).await?,
                Happening::Credit(c) => produce(&producer, &codec, &billing, &c.debtor_id.clone(), &c).await?,
                Happening::Dispute(r) => produce(&producer, &codec, &requests, &r.debtor_id.clone(), &r).await?,
                Happening::Pay {
                    payment,
                    route: Route::Event,
                } => produce(&producer, &codec, &payments, "bank", &payment).await?,
                Happening::Pay {
                    payment,
                    route: Route::Camt054,
                } => camt.push(payment),
            }
        }
        if !camt.is_empty() {
            import_camt054(infra, &http, day, &camt).await?;
        }
        // Without faults a day takes a second or two; with them, a frozen broker and restarts.
        let patience = Duration::from_secs(if faults { 120 } else { 30 });
        caught_up(&infra.config, patience).await?;
        supervisor.reap().await?;
        day = day.succ_opt().unwrap_or(day);
    }
    Ok(())
}

async fn produce<T: Record>(
    producer: &FutureProducer,
    codec: &Codec,
    topic: &str,
    key: &str,
    value: &T,
) -> anyhow::Result<()> {
    // An upstream system waits out the registry and the broker as Forfall does.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let attempt = async {
            let payload = codec.encode(topic, value).await?;
            producer
                .send(
                    FutureRecord::to(topic).key(key).payload(&payload),
                    Duration::from_secs(15),
                )
                .await
                .map_err(|(e, _)| anyhow::anyhow!("produce to {topic}: {e}"))?;
            anyhow::Ok(())
        };
        match attempt.await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "chaos: upstream produce retried");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The bank's file of the day, posted to the matcher as an upload would be, retried until taken.
async fn import_camt054(
    infra: &Infra,
    http: &reqwest::Client,
    day: NaiveDate,
    payments: &[forfall_platform::records::PaymentReceived],
) -> anyhow::Result<()> {
    let amounts: Vec<String> = payments
        .iter()
        .map(|p| format!("{}.{:02}", p.amount_minor / 100, p.amount_minor % 100))
        .collect();
    let date = day.to_string();
    let credits: Vec<crate::CamtCredit<'_>> = payments
        .iter()
        .zip(&amounts)
        .map(|(p, amount)| crate::CamtCredit {
            transaction_id: &p.payment_id,
            amount,
            currency: &p.currency,
            reference: p.reference.as_deref(),
            text: None,
            payer_account: None,
            date: &date,
        })
        .collect();
    let file = crate::camt054(&format!("chaos-{day}"), &credits);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let url = format!(
            "http://127.0.0.1:{}/v1/payments/camt054?tenant={TENANT}",
            infra.admin_port("matcher", 0)
        );
        let answer = http
            .post(url)
            .timeout(Duration::from_secs(10))
            .body(file.clone())
            .send()
            .await;
        match answer {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) if r.status().is_client_error() => {
                anyhow::bail!(
                    "the matcher refused the day's camt.054: {} {}",
                    r.status(),
                    r.text().await?
                )
            }
            other => {
                anyhow::ensure!(Instant::now() < deadline, "camt.054 import kept failing: {other:?}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Each consumer group and the topics it reads.
fn groups(config: &CommonConfig) -> Vec<(String, Vec<String>)> {
    let t = &config.topics;
    let name = |n: &String| t.name(n);
    let group = |s: &str| format!("{}.{s}", config.kafka.group_prefix);
    vec![
        (group("ingest"), vec![name(&t.billing_invoice_events)]),
        (
            group("watcher"),
            vec![name(&t.invoices), name(&t.payments_matched), name(&t.debtor_requests)],
        ),
        (group("dispatch"), vec![name(&t.journey_actions)]),
        (group("matcher"), vec![name(&t.payments), name(&t.invoices)]),
        (group("handoff"), vec![name(&t.handoff_cases)]),
    ]
}

/// Whether every group has committed up to `end` on each partition it reads; if not, where not.
async fn all_committed(config: &CommonConfig, end: impl Fn(&str, i32) -> i64) -> anyhow::Result<Result<(), String>> {
    for (group, topics) in groups(config) {
        let done = crate::committed_offsets(config, &group, &topics).await?;
        for topic in &topics {
            for p in 0..config.kafka.partitions {
                let (at, want) = (
                    done.get(&(topic.clone(), p)).copied().flatten().unwrap_or(0),
                    end(topic, p),
                );
                if at < want {
                    return Ok(Err(format!("{group} at {at} of {want} on {topic}[{p}]")));
                }
            }
        }
    }
    Ok(Ok(()))
}

/// Paces the days: every group has committed up to what the broker reports as each partition's
/// end, twice in a row a moment apart (timers fire shortly after the clock moves).
async fn caught_up(config: &CommonConfig, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut in_a_row = 0;
    let mut behind = String::new();
    tokio::time::sleep(Duration::from_millis(200)).await;
    while in_a_row < 2 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the pipeline did not catch up within {timeout:?}: {behind}"
        );
        let highs = watermarks(config).await;
        let ok = match highs {
            Ok(highs) => {
                match all_committed(config, |t, p| highs.get(&(t.to_owned(), p)).copied().unwrap_or(0)).await {
                    Ok(Ok(())) => true,
                    Ok(Err(where_)) => {
                        behind = where_;
                        false
                    }
                    Err(e) => {
                        behind = e.to_string();
                        false
                    }
                }
            }
            Err(e) => {
                behind = e.to_string();
                false
            }
        };
        in_a_row = if ok { in_a_row + 1 } else { 0 };
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

async fn watermarks(config: &CommonConfig) -> anyhow::Result<HashMap<(String, i32), i64>> {
    let (brokers, partitions) = (config.kafka.brokers.clone(), config.kafka.partitions);
    let topics: Vec<String> = groups(config).into_iter().flat_map(|(_, t)| t).collect();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("broker.address.family", "v4")
            .create()?;
        let mut out = HashMap::new();
        for topic in topics {
            for p in 0..partitions {
                let (_, high) = consumer.fetch_watermarks(&topic, p, Duration::from_secs(5))?;
                out.insert((topic.clone(), p), high);
            }
        }
        Ok(out)
    })
    .await?
}

/// The mark the checker starts from: every group has committed the true end of every topic it
/// reads (read record by record, not the reported watermark), and the ends no longer move.
async fn settle(config: &CommonConfig) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(180);
    let topics: Vec<String> = {
        let mut all: Vec<String> = groups(config).into_iter().flat_map(|(_, t)| t).collect();
        all.sort();
        all.dedup();
        all
    };
    let mut previous: Option<HashMap<(String, i32), i64>> = None;
    loop {
        anyhow::ensure!(Instant::now() < deadline, "the pipeline did not settle within 180 s");
        let mut ends = HashMap::new();
        for topic in &topics {
            for (p, end) in history::ends(config, topic).await? {
                ends.insert((topic.clone(), p), end);
            }
        }
        let committed = all_committed(config, |t, p| ends.get(&(t.to_owned(), p)).copied().unwrap_or(0)).await?;
        if committed.is_ok() && previous.as_ref() == Some(&ends) {
            return Ok(());
        }
        previous = Some(ends);
        tokio::time::sleep(Duration::from_millis(1_500)).await;
    }
}

/// A baseline run and a fault run of the same seed; the figures and findings of both.
pub async fn baseline_and_faults(seed: u64, debtors: usize) -> anyhow::Result<(Report, Report)> {
    let baseline = run(Settings {
        seed,
        debtors,
        faults: false,
    })
    .await?;
    let faulty = run(Settings {
        seed,
        debtors,
        faults: true,
    })
    .await?;
    Ok((baseline, faulty))
}

/// The report a person reads.
pub fn describe(baseline: &Report, faulty: &Report) -> String {
    let f = &faulty.findings;
    let mut out = format!(
        "chaos seed {} ({} debtors; replay with --seed {}):\n\
         \x20 faults played: {:?}\n\
         \x20 invoices lost: {}\n\
         \x20 records neither applied nor rejected: {}\n\
         \x20 messages twice per (invoice, step, channel): {}\n\
         \x20 messages sent after a last look that came after the watcher recorded the settling payment: {}\n\
         \x20 (messages in flight while the payment was matched, before the watcher recorded it: {}, longest {} ms)\n\
         \x20 cases twice: {}\n\
         \x20 records rejected (the workload sends nothing invalid): {}\n\
         \x20 services that exited by themselves: {} {:?}\n\
         \x20 services slow to stop on SIGTERM: {:?}\n\
         \x20 throughput under faults: {:.2} of the same workload without faults ({:.1} s vs {:.1} s)\n\
         \x20 seen: {:?}\n\
         \x20 wall clock steps during the runs (ms): {:?} with faults, {:?} without\n",
        faulty.seed,
        faulty.debtors,
        faulty.seed,
        faulty.faults_played,
        f.invoices_lost,
        f.records_neither_applied_nor_rejected,
        f.messages_twice,
        f.messages_after_payment,
        f.messages_racing_payment,
        f.longest_race_ms,
        f.cases_twice,
        f.records_rejected,
        faulty.unexpected_exits.len(),
        faulty.unexpected_exits,
        faulty.slow_stops,
        baseline.seconds / faulty.seconds,
        faulty.seconds,
        baseline.seconds,
        f.seen,
        f.wall_clock_steps_ms,
        baseline.findings.wall_clock_steps_ms,
    );
    for e in f.examples.iter().chain(&baseline.findings.examples) {
        out.push_str(&format!("    {e}\n"));
    }
    if !baseline.passed() {
        out.push_str(&format!(
            "  the BASELINE run (no faults) failed too: {:?}\n",
            baseline.findings
        ));
    }
    out
}
