//! DEV AND TEST ONLY: a whole Forfall on one machine, isolated from any other on the same
//! broker and Redis. It starts the schema registry emulator, a real SMTP sink and a recording
//! agency endpoint on loopback, gives this stack its own topic prefix, Redis key prefix and
//! consumer groups, and runs services in-process where each can be stopped, killed and
//! restarted. `forfall demo` and the end-to-end tests both stand on it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use figment::Figment;
use figment::providers::Serialized;
use forfall_devsinks::MailSink;
use forfall_devsinks::agency::AgencyApi;
use forfall_platform::clock::SharedClock;
use forfall_platform::config::CommonConfig;
use forfall_platform::journey_state;
use forfall_platform::kafka;
use forfall_platform::records::Record;
use forfall_platform::redis_store::{self, Keys};
use forfall_platform::service::Runtime;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

struct Running {
    token: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
}

pub struct LocalStack {
    pub prefix: String,
    pub rt: Runtime,
    pub mail: MailSink,
    pub agency: AgencyApi,
    pub registry_url: String,
    producer: FutureProducer,
    redis: redis::aio::ConnectionManager,
    services: Mutex<HashMap<&'static str, Running>>,
    /// One client for the admin endpoints: a new one loads the system's CA store each time,
    /// which under a benchmark's polling costs more CPU than the service being measured.
    http: reqwest::Client,
}

/// Settings for a stack on the local dev stack: short consumer-group timings (a group on
/// tansu joins after about half the session timeout), two partitions, free admin ports.
pub fn local_config(base: CommonConfig, prefix: &str, registry_url: &str) -> CommonConfig {
    let mut c = base;
    c.topics.prefix = format!("{prefix}.");
    c.redis.key_prefix = format!("{prefix}:");
    c.kafka.group_prefix = prefix.to_owned();
    c.kafka.session_timeout_ms = 2000;
    c.kafka.heartbeat_interval_ms = 300;
    c.kafka.partitions = 2;
    c.admin.base_port = 0;
    c.registry.url = registry_url.to_owned();
    c
}

/// DEV AND TEST ONLY: the secret the dev stack's agency stand-in and hand-off sign with.
pub const AGENCY_SIGNING_SECRET: &str = "forfall-dev-agency-signing-secret";

impl LocalStack {
    pub async fn start(base: CommonConfig, clock: SharedClock) -> anyhow::Result<Self> {
        forfall_platform::telemetry::init(&base.log, &base.traces, "forfall")?;
        let prefix = format!("ff{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let registry = forfall_schema_registry_emulator::spawn("127.0.0.1:0").await?;
        let registry_url = format!("http://{registry}");
        let mail = MailSink::start()?;
        let agency = AgencyApi::start(Some(AGENCY_SIGNING_SECRET)).await?;
        let config = local_config(base, &prefix, &registry_url);
        let figment = Figment::from(Serialized::defaults(&config))
            .merge(Serialized::default("dispatch.smtp.port", mail.addr.port()))
            .merge(Serialized::default("handoff.agency_url", agency.url("/cases")))
            .merge(Serialized::default("handoff.agency_recall_url", agency.url("/recalls")))
            .merge(Serialized::default(
                "handoff.agency_payments_url",
                agency.url("/payments"),
            ))
            .merge(Serialized::default(
                "handoff.agency_signing_secret",
                AGENCY_SIGNING_SECRET,
            ))
            .merge(Serialized::default("handoff.timeout_ms", 3000))
            .merge(Serialized::default("watcher.tick_ms", 50));
        kafka::ensure_topics(&config.kafka, &config.topics.all()).await?;
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &config.kafka.brokers)
            .set("broker.address.family", "v4")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "1")
            .create()?;
        let redis = redis_store::connect(&config.redis).await?;
        let rt = Runtime::new(config, figment, clock, CancellationToken::new())?;
        Ok(Self {
            prefix,
            rt,
            mail,
            agency,
            registry_url,
            producer,
            redis,
            services: Mutex::new(HashMap::new()),
            http: reqwest::Client::new(),
        })
    }

    pub fn topic(&self, base: &str) -> String {
        self.rt.topic(base)
    }

    /// Sets a service setting (`section.key`) for services started from now on.
    pub fn set<T: serde::Serialize>(&mut self, key: &str, value: T) {
        self.rt.figment = self.rt.figment.clone().merge(Serialized::default(key, value));
    }

    pub fn topics(&self) -> &forfall_platform::Topics {
        &self.rt.config.topics
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<&'static str, Running>> {
        self.services.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a service after a stop or kill of the same group's member: waits a moment first,
    /// because tansu 0.6.0 may never complete a join that overlaps a member's leaving (the new
    /// member then stays without partitions). A real Kafka needs no pause.
    pub async fn restart_service(&self, name: &'static str) {
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        self.start_service(name);
    }

    /// Starts a service in this process (again, after a stop or kill).
    pub fn start_service(&self, name: &'static str) {
        self.start_instance(name, name);
    }

    /// Starts another instance of a service (same consumer group), known as `instance`.
    pub fn start_instance(&self, name: &'static str, instance: &'static str) {
        let token = self.rt.shutdown.child_token();
        let mut rt = self.rt.clone();
        rt.shutdown = token.clone();
        rt.instance = Some(instance);
        // A previous incarnation's address must not answer for this one.
        self.rt
            .admin_addrs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(instance);
        let handle = tokio::spawn(async move {
            let result = crate::run_target(rt, name).await;
            if let Err(e) = &result {
                tracing::error!(
                    service = name,
                    error = format!("{e:#}"),
                    "service stopped with an error"
                );
            }
            result
        });
        self.running().insert(instance, Running { token, handle });
    }

    pub fn start_all(&self) {
        for t in crate::TARGETS {
            self.start_service(t);
        }
    }

    /// Graceful stop: in-flight work finishes and offsets are committed.
    pub async fn stop_service(&self, name: &str) -> anyhow::Result<()> {
        let running = self.running().remove(name);
        if let Some(r) = running {
            r.token.cancel();
            r.handle.await??;
        }
        Ok(())
    }

    /// A crash: the service's tasks are dropped wherever they are; nothing is committed.
    pub async fn kill_service(&self, name: &str) {
        let running = self.running().remove(name);
        if let Some(r) = running {
            r.handle.abort();
            let _ = r.handle.await;
            // Dropping the aborted task drops its consumer, which leaves the group.
            r.token.cancel();
        }
    }

    pub async fn shutdown(&self) {
        self.rt.shutdown.cancel();
        let all: Vec<Running> = self.running().drain().map(|(_, r)| r).collect();
        for r in all {
            let _ = r.handle.await;
        }
    }

    /// Waits until every named service reports ready on `/readyz`.
    pub async fn wait_ready(&self, names: &[&str], timeout: Duration) -> anyhow::Result<()> {
        let client = &self.http;
        let deadline = Instant::now() + timeout;
        for name in names {
            loop {
                if let Some(addr) = self.rt.admin_addr(name) {
                    let ok = client
                        .get(format!("http://{addr}/readyz"))
                        .send()
                        .await
                        .map(|r| r.status().is_success())
                        .unwrap_or(false);
                    if ok {
                        break;
                    }
                }
                anyhow::ensure!(Instant::now() < deadline, "{name} not ready within {timeout:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// The Prometheus text of one service.
    pub async fn metrics(&self, name: &str) -> anyhow::Result<String> {
        let addr = self
            .rt
            .admin_addr(name)
            .ok_or_else(|| anyhow::anyhow!("{name} has no admin address"))?;
        Ok(self
            .http
            .get(format!("http://{addr}/metrics"))
            .send()
            .await?
            .text()
            .await?)
    }

    /// Produces one Avro record, as an upstream system would.
    pub async fn produce<T: Record>(&self, topic: &str, key: &str, value: &T) -> anyhow::Result<()> {
        let payload = self.rt.codec.encode(topic, value).await?;
        self.produce_raw(topic, key, &payload).await
    }

    pub async fn produce_raw(&self, topic: &str, key: &str, payload: &[u8]) -> anyhow::Result<()> {
        self.producer
            .send(
                FutureRecord::to(topic).key(key).payload(payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| anyhow::anyhow!("produce to {topic}: {e}"))?;
        Ok(())
    }

    /// Every record of type `T` on `topic` so far, in partition order.
    pub async fn read<T: Record>(&self, topic: &str) -> anyhow::Result<Vec<T>> {
        let raw = self.read_raw(topic).await?;
        let mut out = Vec::new();
        for payload in raw {
            let decoded = self.rt.codec.decode(Some(&payload)).await?;
            if decoded.name == T::FULL_NAME {
                out.push(decoded.to::<T>()?);
            }
        }
        Ok(out)
    }

    /// Every payload on `topic` so far (all partitions, from the beginning).
    pub async fn read_raw(&self, topic: &str) -> anyhow::Result<Vec<Vec<u8>>> {
        let brokers = self.rt.config.kafka.brokers.clone();
        let partitions = self.rt.config.kafka.partitions;
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Vec<u8>>> {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("broker.address.family", "v4")
                .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
                .set("enable.auto.commit", "false")
                .create()?;
            // Assign every partition at once and track each one's position: reading partitions
            // one after another would mix in records prefetched for the previous one. The
            // reported high watermark is only a floor: tansu 0.6.0 counts a multi-record batch as
            // one offset in ListOffsets (Fetch delivers every record), so reading goes on past it
            // until the topic has been quiet for a moment.
            let mut tpl = TopicPartitionList::new();
            let mut remaining: HashMap<i32, (i64, i64)> = HashMap::new();
            for p in 0..partitions {
                let (low, high) = consumer.fetch_watermarks(&topic, p, Duration::from_secs(5))?;
                tpl.add_partition_offset(&topic, p, Offset::Offset(low))?;
                remaining.insert(p, (low, high));
            }
            let mut by_partition: HashMap<i32, Vec<Vec<u8>>> = HashMap::new();
            consumer.assign(&tpl)?;
            let deadline = Instant::now() + Duration::from_secs(10);
            let quiet = Duration::from_millis(300);
            let mut last_seen = Instant::now();
            loop {
                let behind = remaining.values().any(|(next, high)| next < high);
                // A topic still being written to is never quiet: past the watermarks, what was
                // read by the deadline is the snapshot.
                if !behind && (last_seen.elapsed() >= quiet || Instant::now() >= deadline) {
                    break;
                }
                anyhow::ensure!(Instant::now() < deadline, "timed out reading {topic}");
                if let Some(m) = consumer.poll(Duration::from_millis(50)) {
                    let m = m?;
                    if let Some((next, _)) = remaining.get_mut(&m.partition()) {
                        if m.offset() >= *next {
                            *next = m.offset() + 1;
                            last_seen = Instant::now();
                            by_partition
                                .entry(m.partition())
                                .or_default()
                                .push(m.payload().unwrap_or_default().to_vec());
                        }
                    }
                }
            }
            let mut out = Vec::new();
            for p in 0..partitions {
                out.extend(by_partition.remove(&p).unwrap_or_default());
            }
            Ok(out)
        })
        .await?
    }

    /// Whether the watcher has a timer due by `now` on any partition (one it has yet to fire:
    /// a fired timer leaves only after its outputs are acknowledged and its journey written).
    pub async fn timers_due(&self, now: chrono::DateTime<chrono::Utc>) -> anyhow::Result<bool> {
        let keys = Keys::new(&self.rt.config.redis.key_prefix);
        let mut redis = self.redis.clone();
        for p in 0..self.rt.config.kafka.partitions {
            let due: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(keys.key(&["timers", &p.to_string()]))
                .arg("-inf")
                .arg(now.timestamp_millis())
                .arg("LIMIT")
                .arg(0)
                .arg(1)
                .query_async(&mut redis)
                .await?;
            if !due.is_empty() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// A reader of `topic` from its start; each [`TopicTail::next`] returns what was written
    /// since the last.
    pub async fn tail(&self, topic: &str) -> anyhow::Result<TopicTail> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.rt.config.kafka.brokers)
            .set("broker.address.family", "v4")
            .set("group.id", format!("tail-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            // Read as soon as written: a fetch waiting for more would hold each day back.
            .set("fetch.wait.max.ms", "10")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.rt.config.kafka.partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        Ok(TopicTail {
            consumer: std::sync::Arc::new(consumer),
            topic: topic.to_owned(),
            partitions: self.rt.config.kafka.partitions,
            next: HashMap::new(),
            codec: self.rt.codec.clone(),
        })
    }

    /// A Redis connection to this stack's Redis (keys under its own prefix).
    pub fn redis(&self) -> redis::aio::ConnectionManager {
        self.redis.clone()
    }

    /// The watcher's journey status label of an invoice (what dispatch's last look reads).
    pub async fn journey_status(&self, tenant: &str, invoice_id: &str) -> anyhow::Result<Option<String>> {
        let keys = Keys::new(&self.rt.config.redis.key_prefix);
        Ok(journey_state::read_status(&mut self.redis.clone(), &keys, tenant, invoice_id).await?)
    }
}

/// DEV AND TEST ONLY: a topic read as it grows (see [`LocalStack::tail`]).
pub struct TopicTail {
    consumer: std::sync::Arc<BaseConsumer>,
    topic: String,
    partitions: i32,
    /// The next offset to read on each partition.
    next: HashMap<i32, i64>,
    codec: std::sync::Arc<forfall_platform::avro::Codec>,
}

impl TopicTail {
    /// Every record of type `T` written since the last call, up to each partition's end as the
    /// broker reports it now (records acknowledged before this call are among them), in
    /// partition order.
    pub async fn next<T: Record>(&mut self) -> anyhow::Result<Vec<T>> {
        let consumer = self.consumer.clone();
        let (topic, partitions, mut next) = (self.topic.clone(), self.partitions, self.next.clone());
        let (payloads, next) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let mut high = HashMap::new();
            for p in 0..partitions {
                high.insert(p, consumer.fetch_watermarks(&topic, p, Duration::from_secs(5))?.1);
            }
            let mut by_partition: HashMap<i32, Vec<Vec<u8>>> = HashMap::new();
            let deadline = Instant::now() + Duration::from_secs(30);
            // The reported high watermark is a floor (tansu 0.6.0 counts a multi-record batch as
            // one offset); a fetch delivers whole batches, so once past it, what is left of the
            // last batch is already here: drained until a poll finds nothing.
            loop {
                let behind = high.iter().any(|(p, h)| next.get(p).copied().unwrap_or(0) < *h);
                let wait = if behind { 100 } else { 20 };
                match consumer.poll(Duration::from_millis(wait)) {
                    Some(m) => {
                        let m = m?;
                        let at = next.entry(m.partition()).or_insert(0);
                        if m.offset() >= *at {
                            *at = m.offset() + 1;
                            by_partition
                                .entry(m.partition())
                                .or_default()
                                .push(m.payload().unwrap_or_default().to_vec());
                        }
                    }
                    None if !behind => break,
                    None => anyhow::ensure!(Instant::now() < deadline, "timed out reading {topic} to its end"),
                }
            }
            let mut out = Vec::new();
            for p in 0..partitions {
                out.extend(by_partition.remove(&p).unwrap_or_default());
            }
            Ok((out, next))
        })
        .await??;
        self.next = next;
        let mut out = Vec::new();
        for payload in payloads {
            let decoded = self.codec.decode(Some(&payload)).await?;
            if decoded.name == T::FULL_NAME {
                out.push(decoded.to::<T>()?);
            }
        }
        Ok(out)
    }
}

/// Polls `check` until it returns `Some`, or fails after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
