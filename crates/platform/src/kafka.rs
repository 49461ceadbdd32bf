//! Kafka plumbing: client settings, topic creation, an idempotent producer, and the consume
//! loop every service runs.
//!
//! The loop's contract, which the guarantees in DESIGN.md rest on:
//! - a record's offset is stored for commit only after every record its handling produced
//!   (outputs, or its rejection) is acknowledged by the broker, in order per partition;
//! - a handler's transient failure (registry, Redis, broker away) is retried with backoff and
//!   never turns into a rejection; a permanent one goes to the rejected topic with its reason;
//! - on shutdown the loop stops taking records, waits for outstanding acknowledgements,
//!   commits synchronously and returns.
//!
//! Delivery is at-least-once (tansu does not complete transactions, and no transaction could
//! cover Redis or a provider anyway): every handler must be idempotent.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::stream::{FuturesOrdered, StreamExt};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::admin::Readiness;
use crate::avro::Codec;
use crate::config::KafkaConfig;
use crate::metrics::Metrics;
use crate::records::{Rejected, new_event_id};
use crate::telemetry::{TRACEPARENT, TraceContext};

fn base(config: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers);
    // Tansu listens on IPv4 only; resolving "localhost" to ::1 first would stall connects.
    c.set("broker.address.family", "v4");
    c
}

pub fn producer(config: &KafkaConfig) -> Result<FutureProducer, KafkaError> {
    base(config)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // Murmur2 like the Java client, so that upstream producers and Forfall agree on which
        // partition a debtor's key belongs to.
        .set("partitioner", "murmur2_random")
        .set("linger.ms", config.linger_ms.to_string())
        .set("queue.buffering.max.messages", "200000")
        .create()
}

pub fn consumer(config: &KafkaConfig, group: &str, topics: &[String]) -> Result<StreamConsumer, KafkaError> {
    let consumer: StreamConsumer = base(config)
        .set("group.id", format!("{}.{group}", config.group_prefix))
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        // Offsets are stored by the loop only after the outputs are acknowledged.
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", config.session_timeout_ms.to_string())
        .set("heartbeat.interval.ms", config.heartbeat_interval_ms.to_string())
        .set("topic.metadata.refresh.interval.ms", "5000")
        .set("fetch.wait.max.ms", config.fetch_wait_max_ms.to_string())
        .create()?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names)?;
    Ok(consumer)
}

/// Creates the topics that are missing; existing ones are left as they are.
pub async fn ensure_topics(config: &KafkaConfig, topics: &[String]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = base(config).create()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, config.partitions, TopicReplication::Fixed(config.replication_factor)))
        .collect();
    let results = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("cannot create topic '{topic}': {code}"),
        }
    }
    Ok(())
}

/// A record to produce.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub topic: String,
    pub key: String,
    pub payload: Vec<u8>,
    pub trace: TraceContext,
}

/// The shared, idempotent producer.
#[derive(Clone)]
pub struct Producer {
    inner: FutureProducer,
    metrics: Metrics,
}

pub type Ack = futures::future::BoxFuture<'static, Result<(), String>>;

impl Producer {
    pub fn new(config: &KafkaConfig, metrics: Metrics) -> Result<Self, KafkaError> {
        Ok(Self {
            inner: producer(config)?,
            metrics,
        })
    }

    /// Enqueues one record and returns a future of its acknowledgement. Waits while the
    /// client's local queue is full rather than failing.
    pub async fn send(&self, out: &Outbound) -> Ack {
        let header = out.trace.header();
        loop {
            let record = FutureRecord::to(&out.topic)
                .key(out.key.as_bytes())
                .payload(&out.payload)
                .headers(OwnedHeaders::new().insert(Header {
                    key: TRACEPARENT,
                    value: Some(header.as_bytes()),
                }));
            match self.inner.send_result(record) {
                Ok(delivery) => {
                    self.metrics.produced.with_label_values(&[&out.topic]).inc();
                    let topic = out.topic.clone();
                    return async move {
                        match delivery.await {
                            Ok(Ok(_)) => Ok(()),
                            Ok(Err((e, _))) => Err(format!("produce to '{topic}' failed: {e}")),
                            Err(_) => Err(format!("produce to '{topic}' cancelled")),
                        }
                    }
                    .boxed();
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => {
                    let topic = out.topic.clone();
                    return futures::future::ready(Err(format!("produce to '{topic}' refused: {e}"))).boxed();
                }
            }
        }
    }

    /// Produces all records and waits until each is acknowledged.
    pub async fn send_all(&self, outs: &[Outbound]) -> Result<(), String> {
        let mut acks = Vec::with_capacity(outs.len());
        for out in outs {
            acks.push(self.send(out).await);
        }
        for ack in futures::future::join_all(acks).await {
            ack?;
        }
        Ok(())
    }

    pub async fn flush(&self, timeout: Duration) {
        let inner = self.inner.clone();
        let _ = tokio::task::spawn_blocking(move || rdkafka::producer::Producer::flush(&inner, timeout)).await;
    }
}

/// One consumed record, detached from the client's buffers.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// The producer's trace context, or a new root when the record carried none.
    pub trace: TraceContext,
}

impl Inbound {
    fn from_message(m: &OwnedMessage) -> Self {
        let trace = m
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == TRACEPARENT).and_then(|h| h.value))
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(TraceContext::parse)
            .unwrap_or_else(TraceContext::new_root);
        Self {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            trace,
        }
    }

    pub fn key_str(&self) -> Option<String> {
        self.key.as_deref().map(|k| String::from_utf8_lossy(k).into_owned())
    }
}

/// Why a record could not be applied.
#[derive(Debug)]
pub enum Failure {
    /// Permanent: the record goes to the rejected topic with this reason, and is counted.
    Reject {
        code: &'static str,
        detail: String,
        tenant: Option<String>,
        debtor_id: Option<String>,
    },
    /// Something we depend on is away: retry the same record after a backoff.
    Transient(anyhow::Error),
    /// A bug or misconfiguration: stop the service without committing the record.
    Fatal(anyhow::Error),
}

impl Failure {
    pub fn reject(code: &'static str, detail: impl Into<String>) -> Self {
        Failure::Reject {
            code,
            detail: detail.into(),
            tenant: None,
            debtor_id: None,
        }
    }

    pub fn transient(e: impl Into<anyhow::Error>) -> Self {
        Failure::Transient(e.into())
    }
}

impl From<crate::avro::DecodeError> for Failure {
    fn from(e: crate::avro::DecodeError) -> Self {
        if e.is_transient() {
            Failure::Transient(e.into())
        } else {
            Failure::reject(e.reason_code(), e.to_string())
        }
    }
}

impl From<crate::avro::EncodeError> for Failure {
    fn from(e: crate::avro::EncodeError) -> Self {
        if e.is_transient() {
            Failure::Transient(e.into())
        } else {
            Failure::Fatal(e.into())
        }
    }
}

impl From<redis::RedisError> for Failure {
    fn from(e: redis::RedisError) -> Self {
        // Connection loss, timeouts and cluster moves resolve by themselves; anything else
        // (a script error, a wrong type) is a bug that retrying will not fix.
        if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
            Failure::Transient(e.into())
        } else {
            Failure::Fatal(e.into())
        }
    }
}

/// The body of a consume loop: decides what one record becomes.
pub trait Handler: Send + Sync {
    fn handle(&self, record: &Inbound) -> impl Future<Output = Result<Vec<Outbound>, Failure>> + Send;
}

/// What a consume loop needs besides its consumer and handler.
#[derive(Clone)]
pub struct LoopContext {
    pub service: &'static str,
    pub producer: Producer,
    pub codec: Arc<Codec>,
    pub metrics: Metrics,
    pub rejected_topic: String,
    pub readiness: Readiness,
    pub shutdown: CancellationToken,
    pub max_in_flight: usize,
    /// Records of different keys handled at once (1 = one at a time). Records of one key are
    /// always handled in order, each after the previous one's outputs were acknowledged.
    pub key_concurrency: usize,
    /// Which records must wait for each other (same lane): by default those with the same key.
    pub lane: Option<LaneOf>,
}

/// Which lane a record belongs to; records of one lane are handled one after another.
pub type LaneOf = Arc<dyn Fn(&Inbound) -> u64 + Send + Sync>;

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Exponential backoff with full jitter.
pub fn backoff(attempt: u32) -> Duration {
    let cap = BACKOFF_START.saturating_mul(1u32 << attempt.min(16)).min(BACKOFF_MAX);
    cap.mul_f64(rand::random::<f64>().max(0.1))
}

impl LoopContext {
    async fn rejection(
        &self,
        record: &Inbound,
        code: &str,
        detail: String,
        tenant: Option<String>,
        debtor_id: Option<String>,
    ) -> Result<Outbound, Failure> {
        let rejected = Rejected {
            event_id: new_event_id(),
            tenant,
            debtor_id: debtor_id.or_else(|| record.key_str()),
            occurred_at: chrono::Utc::now().timestamp_millis(),
            service: self.service.to_owned(),
            source_topic: record.topic.clone(),
            source_partition: record.partition,
            source_offset: record.offset,
            reason_code: code.to_owned(),
            detail,
            raw_key: record.key.clone(),
            raw_value: record.payload.clone(),
        };
        let key = rejected.debtor_id.clone().unwrap_or_default();
        Ok(self
            .codec
            .outbound(&self.rejected_topic, &key, &rejected, record.trace)
            .await?)
    }

    /// Handles one record until it is applied or rejected, retrying transient failures.
    /// `None` means shutdown interrupted the retries: the record stays uncommitted.
    async fn outputs_for(&self, handler: &impl Handler, record: &Inbound) -> anyhow::Result<Option<Vec<Outbound>>> {
        let mut attempt = 0u32;
        loop {
            let started = Instant::now();
            let result = handler.handle(record).await;
            self.metrics
                .handle_seconds
                .with_label_values(&[&record.topic])
                .observe(started.elapsed().as_secs_f64());
            let failure = match result {
                Ok(outs) => {
                    self.metrics
                        .messages
                        .with_label_values(&[&record.topic, "applied"])
                        .inc();
                    return Ok(Some(outs));
                }
                Err(Failure::Reject {
                    code,
                    detail,
                    tenant,
                    debtor_id,
                }) => {
                    tracing::warn!(reason = code, %detail, "record rejected");
                    self.metrics
                        .messages
                        .with_label_values(&[&record.topic, "rejected"])
                        .inc();
                    self.metrics.rejected.with_label_values(&[code]).inc();
                    match self.rejection(record, code, detail, tenant, debtor_id).await {
                        Ok(out) => return Ok(Some(vec![out])),
                        Err(f) => f,
                    }
                }
                Err(f) => f,
            };
            match failure {
                Failure::Fatal(e) => {
                    return Err(e.context(format!(
                        "handling {}[{}]@{}",
                        record.topic, record.partition, record.offset
                    )));
                }
                Failure::Transient(e) => {
                    self.metrics.retries.with_label_values(&["handle"]).inc();
                    let wait = backoff(attempt);
                    tracing::warn!(error = %e, attempt, wait_ms = wait.as_millis() as u64, "transient failure, retrying");
                    attempt = attempt.saturating_add(1);
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                Failure::Reject { .. } => unreachable!("rejections are turned into outputs above"),
            }
        }
    }
}

/// Samples lag per assigned partition (high watermark minus position) on a blocking thread,
/// so that the broker round trips never hold up the consume loop.
fn record_lag(consumer: &Arc<StreamConsumer>, metrics: &Metrics) {
    let (consumer, metrics) = (consumer.clone(), metrics.clone());
    tokio::task::spawn_blocking(move || {
        let Ok(positions) = consumer.position() else { return };
        for element in positions.elements() {
            let rdkafka::Offset::Offset(position) = element.offset() else {
                continue;
            };
            if let Ok((_, high)) =
                consumer.fetch_watermarks(element.topic(), element.partition(), Duration::from_secs(1))
            {
                metrics
                    .consumer_lag
                    .with_label_values(&[element.topic(), &element.partition().to_string()])
                    .set((high - position).max(0));
            }
        }
    });
}

/// How one record's handling ended, in the keyed loop.
#[derive(Clone)]
enum Settled {
    /// Outputs acknowledged: the offset may be stored.
    Done,
    /// Shutdown came while retrying: leave the record uncommitted.
    Interrupted,
    Failed(String),
}

/// Lanes a keyed loop spreads records over.
const LANES: u64 = 4096;

fn lane_hash(bytes: &Option<Vec<u8>>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish() % LANES
}

/// The default lane: records with the same key wait for each other.
pub fn key_lane(record: &Inbound) -> u64 {
    lane_hash(&record.key)
}

/// A lane by content, for feeds whose key says nothing (one key for all): only identical
/// records (a redelivery) wait for each other.
pub fn payload_lane(record: &Inbound) -> u64 {
    lane_hash(&record.payload)
}

/// A received message, or `None` after counting, logging and pausing on a consume error.
async fn received_or_pause(
    received: Result<rdkafka::message::BorrowedMessage<'_>, KafkaError>,
    metrics: &Metrics,
) -> Option<rdkafka::message::OwnedMessage> {
    match received {
        Ok(m) => Some(m.detach()),
        Err(e) => {
            metrics.retries.with_label_values(&["consume"]).inc();
            tracing::warn!(error = %e, "consume error");
            tokio::time::sleep(Duration::from_millis(200)).await;
            None
        }
    }
}

/// After a loop ends: not ready any more, and what was stored is committed.
fn final_commit(consumer: &StreamConsumer, ctx: &LoopContext) {
    ctx.readiness.set_ready(false);
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => {}
        // Nothing stored since the last auto-commit.
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => tracing::warn!(error = %e, "final commit failed"),
    }
}

/// The consume loop with records of different keys handled concurrently. A record waits for the
/// previous record of its key (same lane) to be fully handled, so per-key order is what it is on
/// the partition; offsets are still stored strictly in arrival order, after acknowledgements.
async fn run_consumer_by_key(
    consumer: Arc<StreamConsumer>,
    handler: impl Handler,
    ctx: LoopContext,
) -> anyhow::Result<()> {
    type Shared<'a> = futures::future::Shared<futures::future::BoxFuture<'a, (String, i32, i64, Settled)>>;
    let mut pending: FuturesOrdered<Shared<'_>> = FuturesOrdered::new();
    let mut lanes: std::collections::HashMap<u64, Shared<'_>> = std::collections::HashMap::new();
    let mut readiness_tick = tokio::time::interval(Duration::from_millis(250));
    let mut lag_tick = tokio::time::interval(Duration::from_secs(5));
    // Handlers run `key_concurrency` at once; records whose outputs await acknowledgement do not
    // count against that (an acknowledgement can take tens of milliseconds, and holding a
    // handler slot for it would cap throughput at slots / ack latency).
    let limit = ctx.max_in_flight.max(1);
    let handlers = Arc::new(tokio::sync::Semaphore::new(ctx.key_concurrency.max(1)));
    let (handler, ctx_ref) = (&handler, &ctx);
    let result: anyhow::Result<()> = async {
        loop {
            tokio::select! {
                biased;
                Some((topic, partition, offset, settled)) = pending.next(), if !pending.is_empty() => {
                    match settled {
                        Settled::Done => consumer.store_offset(&topic, partition, offset)?,
                        Settled::Interrupted => return Ok(()),
                        Settled::Failed(e) => anyhow::bail!(e),
                    }
                }
                _ = ctx.shutdown.cancelled() => return Ok(()),
                _ = lag_tick.tick() => record_lag(&consumer, &ctx.metrics),
                _ = readiness_tick.tick(), if !ctx.readiness.is_ready() => {
                    if consumer.assignment().map(|a| a.count() > 0).unwrap_or(false) {
                        ctx.readiness.set_ready(true);
                    }
                }
                received = consumer.recv(), if pending.len() < limit => {
                    let Some(message) = received_or_pause(received, &ctx.metrics).await else {
                        continue;
                    };
                    ctx.readiness.set_ready(true);
                    let record = Inbound::from_message(&message);
                    let lane = ctx.lane.as_ref().map_or_else(|| key_lane(&record), |f| f(&record) % LANES);
                    let before = lanes.get(&lane).cloned();
                    let handlers = handlers.clone();
                    let work = async move {
                        if let Some(before) = before {
                            before.await;
                        }
                        let permit = handlers.acquire_owned().await;
                        let span = tracing::info_span!("handle", service = ctx_ref.service, topic = %record.topic,
                            partition = record.partition, offset = record.offset, trace_id = %record.trace.trace_id_hex());
                        let handled = ctx_ref.outputs_for(handler, &record).instrument(span).await;
                        drop(permit);
                        let settled = match handled {
                            Ok(Some(outs)) => {
                                let mut acks = Vec::with_capacity(outs.len());
                                for out in &outs {
                                    acks.push(ctx_ref.producer.send(out).await);
                                }
                                match futures::future::join_all(acks).await.into_iter().collect::<Result<Vec<()>, String>>() {
                                    Ok(_) => Settled::Done,
                                    Err(e) => Settled::Failed(e),
                                }
                            }
                            Ok(None) => Settled::Interrupted,
                            Err(e) => Settled::Failed(format!("{e:#}")),
                        };
                        (record.topic, record.partition, record.offset, settled)
                    }
                    .boxed()
                    .shared();
                    lanes.insert(lane, work.clone());
                    pending.push_back(work);
                }
            }
        }
    }
    .await;
    while let Some((topic, partition, offset, settled)) = pending.next().await {
        if matches!(settled, Settled::Done) {
            let _ = consumer.store_offset(&topic, partition, offset);
        } else {
            break;
        }
    }
    drop(lanes);
    final_commit(&consumer, &ctx);
    result
}

type Pending = futures::future::BoxFuture<'static, (String, i32, i64, Result<(), String>)>;

/// Runs the consume loop until shutdown (returns `Ok`) or a fatal error.
pub async fn run_consumer(
    consumer: Arc<StreamConsumer>,
    handler: impl Handler,
    ctx: LoopContext,
) -> anyhow::Result<()> {
    if ctx.key_concurrency > 1 {
        return run_consumer_by_key(consumer, handler, ctx).await;
    }
    let mut pending: FuturesOrdered<Pending> = FuturesOrdered::new();
    let mut readiness_tick = tokio::time::interval(Duration::from_millis(250));
    let mut lag_tick = tokio::time::interval(Duration::from_secs(5));
    let result: anyhow::Result<()> = async {
        loop {
            tokio::select! {
                biased;
                Some((topic, partition, offset, acked)) = pending.next(), if !pending.is_empty() => {
                    acked.map_err(|e| anyhow::anyhow!(e))?;
                    consumer.store_offset(&topic, partition, offset)?;
                }
                _ = ctx.shutdown.cancelled() => return Ok(()),
                _ = lag_tick.tick() => record_lag(&consumer, &ctx.metrics),
                _ = readiness_tick.tick(), if !ctx.readiness.is_ready() => {
                    if consumer.assignment().map(|a| a.count() > 0).unwrap_or(false) {
                        ctx.readiness.set_ready(true);
                    }
                }
                received = consumer.recv(), if pending.len() < ctx.max_in_flight => {
                    let Some(message) = received_or_pause(received, &ctx.metrics).await else {
                        continue;
                    };
                    ctx.readiness.set_ready(true);
                    let record = Inbound::from_message(&message);
                    let span = tracing::info_span!("handle", service = ctx.service, topic = %record.topic,
                        partition = record.partition, offset = record.offset, trace_id = %record.trace.trace_id_hex());
                    let Some(outs) = ctx.outputs_for(&handler, &record).instrument(span).await? else {
                        return Ok(());
                    };
                    let mut acks = Vec::with_capacity(outs.len());
                    for out in &outs {
                        acks.push(ctx.producer.send(out).await);
                    }
                    let (topic, partition, offset) = (record.topic, record.partition, record.offset);
                    pending.push_back(async move {
                        let acked = futures::future::join_all(acks).await.into_iter().collect::<Result<Vec<()>, String>>().map(|_| ());
                        (topic, partition, offset, acked)
                    }.boxed());
                }
            }
        }
    }
    .await;
    // Whatever happened, settle what is in flight so that acknowledged work is committed.
    while let Some((topic, partition, offset, acked)) = pending.next().await {
        if acked.is_ok() {
            let _ = consumer.store_offset(&topic, partition, offset);
        }
    }
    final_commit(&consumer, &ctx);
    result
}
