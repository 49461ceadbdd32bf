//! The service processes under supervision, and the faults played on them and on the stack.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use forfall_devsinks::sms::AfterAccept;

use super::SERVICES;
use super::infra::{Fleet, Infra, signal};

/// Starts, stops and kills service instances, and notices the ones that end on their own.
pub struct Supervisor {
    pub infra: Arc<Infra>,
    fleet: Mutex<Fleet>,
    generation: AtomicU32,
    http: reqwest::Client,
    /// Faults played, by kind.
    pub played: Mutex<BTreeMap<&'static str, u32>>,
    /// Instances that ended without being told to (a service must wait faults out, not exit).
    pub unexpected_exits: Mutex<Vec<String>>,
    /// Instances that did not stop within their drain deadline after SIGTERM.
    pub slow_stops: Mutex<Vec<String>>,
}

impl Supervisor {
    pub fn new(infra: Arc<Infra>) -> Self {
        Self {
            infra,
            fleet: Mutex::new(Fleet::new()),
            generation: AtomicU32::new(0),
            http: reqwest::Client::new(),
            played: Mutex::default(),
            unexpected_exits: Mutex::default(),
            slow_stops: Mutex::default(),
        }
    }

    pub async fn count(&self, kind: &'static str) {
        *self.played.lock().await.entry(kind).or_default() += 1;
    }

    pub async fn start(&self, service: &'static str, slot: u16) -> anyhow::Result<()> {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst);
        let process = self.infra.spawn(service, slot, generation)?;
        tracing::info!(service, slot, pid = process.pid(), "chaos: started");
        self.fleet.lock().await.insert((service, slot), process);
        Ok(())
    }

    pub async fn is_running(&self, service: &'static str, slot: u16) -> bool {
        self.fleet.lock().await.contains_key(&(service, slot))
    }

    /// Waits, up to `patience`, until every running instance of `service` is ready (joined
    /// its group): a member leaving while another is still joining is what tansu 0.6.0 may
    /// never complete, after which no instance of the service is ever assigned partitions
    /// again. A real Kafka completes such rebalances; the faults still come, one at a time.
    pub async fn settled(&self, service: &'static str, patience: Duration) {
        let deadline = tokio::time::Instant::now() + patience;
        while tokio::time::Instant::now() < deadline {
            let mut all_ready = true;
            {
                let fleet = self.fleet.lock().await;
                for (key, p) in fleet.iter() {
                    if key.0 == service && !p.ready(&self.http).await {
                        all_ready = false;
                        break;
                    }
                }
            }
            if all_ready {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tracing::warn!(service, "chaos: not settled; the next fault comes anyway");
    }

    /// `kill -9`: nothing is drained or committed.
    pub async fn kill9(&self, service: &'static str, slot: u16) {
        if let Some(mut p) = self.fleet.lock().await.remove(&(service, slot)) {
            tracing::info!(service, slot, pid = p.pid(), "chaos: kill -9");
            let _ = p.child.start_kill();
            let _ = p.child.wait().await;
        }
    }

    /// SIGTERM, then waits for the exit (status 0 expected); past `patience` it is killed.
    pub async fn stop(&self, service: &'static str, slot: u16, patience: Duration) {
        let Some(mut p) = self.fleet.lock().await.remove(&(service, slot)) else {
            return;
        };
        tracing::info!(service, slot, pid = p.pid(), "chaos: SIGTERM");
        signal(p.pid(), "TERM");
        match tokio::time::timeout(patience, p.child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(status) => self
                .unexpected_exits
                .lock()
                .await
                .push(format!("{service}#{slot} ended with {status:?} after SIGTERM")),
            Err(_) => {
                self.slow_stops
                    .lock()
                    .await
                    .push(format!("{service}#{slot} still running {patience:?} after SIGTERM"));
                let _ = p.child.start_kill();
                let _ = p.child.wait().await;
            }
        }
    }

    /// Records and restarts instances that ended on their own.
    pub async fn reap(&self) -> anyhow::Result<()> {
        let mut ended = Vec::new();
        {
            let mut fleet = self.fleet.lock().await;
            for (key, p) in fleet.iter_mut() {
                if let Ok(Some(status)) = p.child.try_wait() {
                    ended.push((*key, status));
                }
            }
            for (key, _) in &ended {
                fleet.remove(key);
            }
        }
        for ((service, slot), status) in ended {
            self.unexpected_exits
                .lock()
                .await
                .push(format!("{service}#{slot} ended by itself with {status}"));
            if slot == 0 {
                self.start(service, 0).await?;
            }
        }
        Ok(())
    }

    /// After the faults: the stack thawed, one instance of each service, each ready.
    pub async fn heal(&self) -> anyhow::Result<()> {
        signal(self.infra.broker.pid(), "CONT");
        signal(self.infra.redis.pid(), "CONT");
        let _ = self
            .http
            .delete(format!("{}/_emulator/fault", self.infra.registry_url))
            .send()
            .await;
        for service in SERVICES {
            if self.is_running(service, 1).await {
                // Not while another instance is joining: when the group's leader leaves then,
                // tansu 0.6.0 keeps the gone member as the leader for good, and no instance is
                // assigned partitions again (seen in its coordinator's log: every join answered
                // with the old leader, every sync with REBALANCE_IN_PROGRESS).
                self.settled(service, Duration::from_secs(60)).await;
                self.stop(service, 1, Duration::from_secs(20)).await;
            }
        }
        // The groups settle without the leavers before anyone joins again.
        tokio::time::sleep(Duration::from_millis(3_000)).await;
        self.reap().await?;
        for service in SERVICES {
            if !self.is_running(service, 0).await {
                self.start(service, 0).await?;
            }
        }
        self.wait_ready(Duration::from_secs(180)).await
    }

    /// Waits until every running instance answers `/readyz`; an instance that stays unready is
    /// restarted as an orchestrator's liveness probe would (tansu 0.6.0 can leave a member's
    /// join unanswered when it overlaps another member's leave).
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.reap().await?;
            let mut unready = Vec::new();
            {
                let fleet = self.fleet.lock().await;
                for (key, p) in fleet.iter() {
                    if let Err(why) = p.readiness(&self.http).await {
                        unready.push((*key, p.started.elapsed(), why));
                    }
                }
            }
            if unready.is_empty() {
                return Ok(());
            }
            for ((service, slot), age, why) in &unready {
                if *age > Duration::from_secs(20) {
                    let group = self.infra.describe_group(service).await;
                    tracing::warn!(service, slot, why, group, "chaos: not ready after 20 s, restarting it");
                    self.count("restarted_unready").await;
                    self.kill9(service, *slot).await;
                    // Not before the killed member's session ran out: tansu 0.6.0 may never
                    // complete a join that overlaps a member's leaving, and a join that comes
                    // while the dead member still counts wedges the group again.
                    tokio::time::sleep(self.session_ran_out()).await;
                    self.start(service, *slot).await?;
                }
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "services not ready within {timeout:?}: {unready:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// How long a member killed without leaving still counts in its group, and a moment more.
    fn session_ran_out(&self) -> Duration {
        Duration::from_millis(u64::from(self.infra.config.kafka.session_timeout_ms) + 1_500)
    }

    pub async fn stop_all(&self) {
        let keys: Vec<(&'static str, u16)> = self.fleet.lock().await.keys().copied().collect();
        for (service, slot) in keys {
            self.stop(service, slot, Duration::from_secs(20)).await;
        }
    }
}

/// Plays faults until `stop`: one every 2 to 5 seconds, chosen by the seeded generator.
pub async fn play(supervisor: Arc<Supervisor>, seed: u64, stop: CancellationToken) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x00fa_u64.rotate_left(40));
    let infra = supervisor.infra.clone();
    let http = reqwest::Client::new();
    loop {
        let pause = Duration::from_millis(rng.random_range(2_000..5_000));
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(pause) => {}
        }
        supervisor.reap().await?;
        match rng.random_range(0..10) {
            0 => {
                let service = SERVICES[rng.random_range(0..SERVICES.len())];
                supervisor.settled(service, Duration::from_secs(30)).await;
                supervisor.count("kill_9").await;
                supervisor.kill9(service, 0).await;
                // A killed member is evicted after the session timeout; a join before that can
                // overlap its leaving, which tansu 0.6.0 may never complete.
                tokio::time::sleep(Duration::from_millis(3_000)).await;
                supervisor.start(service, 0).await?;
            }
            1 => {
                let service = ["watcher", "dispatch", "matcher"][rng.random_range(0..3)];
                supervisor.settled(service, Duration::from_secs(30)).await;
                if supervisor.is_running(service, 1).await {
                    supervisor.count("second_instance_leaves").await;
                    supervisor.stop(service, 1, Duration::from_secs(20)).await;
                } else {
                    supervisor.count("second_instance_joins").await;
                    supervisor.start(service, 1).await?;
                }
            }
            2 => {
                supervisor.count("broker_frozen_7s").await;
                signal(infra.broker.pid(), "STOP");
                tokio::time::sleep(Duration::from_secs(7)).await;
                signal(infra.broker.pid(), "CONT");
            }
            3 => {
                supervisor.count("redis_frozen_5s").await;
                signal(infra.redis.pid(), "STOP");
                tokio::time::sleep(Duration::from_secs(5)).await;
                signal(infra.redis.pid(), "CONT");
            }
            4 => {
                supervisor.count("registry_500_for_5s").await;
                let fault = format!("{}/_emulator/fault", infra.registry_url);
                http.put(&fault)
                    .json(&serde_json::json!({"status": 500}))
                    .send()
                    .await?;
                tokio::time::sleep(Duration::from_secs(5)).await;
                http.delete(&fault).send().await?;
            }
            5 => {
                let service = SERVICES[rng.random_range(0..SERVICES.len())];
                supervisor.settled(service, Duration::from_secs(30)).await;
                supervisor.count("sigterm_while_redis_frozen").await;
                signal(infra.redis.pid(), "STOP");
                tokio::time::sleep(Duration::from_secs(1)).await;
                let stopping = {
                    let supervisor = supervisor.clone();
                    tokio::spawn(async move { supervisor.stop(service, 0, Duration::from_secs(20)).await })
                };
                tokio::time::sleep(Duration::from_secs(3)).await;
                signal(infra.redis.pid(), "CONT");
                let _ = stopping.await;
                tokio::time::sleep(Duration::from_millis(2_500)).await;
                supervisor.start(service, 0).await?;
            }
            6 => {
                // Longer than dispatch's HTTP timeout (10 s): GatewayAPI took the SMS, the
                // sender cannot know.
                supervisor.count("sms_accepts_then_times_out").await;
                infra
                    .sms
                    .after_accepting_next(&[AfterAccept::Delay(Duration::from_secs(12))]);
            }
            7 => {
                // Redis loses the watcher's state alone: the watchers rebuild the partitions
                // they own from their changelog, the other services carry on.
                supervisor.count("watcher_state_lost").await;
                crate::lose_watcher_state(&infra.config).await?;
            }
            8 => {
                // Redis is flushed (or fails over to an empty replica): every service finds its
                // state missing and rebuilds it from the topics before acting again.
                supervisor.count("redis_flushed").await;
                infra.flush_redis().await?;
            }
            _ => {
                // Longer than dispatch's SMTP timeout (10 s): the server has the message, the
                // sender cannot know.
                supervisor.count("smtp_accepts_then_times_out").await;
                infra.mail.stall_reply_after_next_message(Duration::from_secs(12));
            }
        }
    }
}
