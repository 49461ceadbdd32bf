//! The consume runtime every service runs: one loop for all of them, with a single lane of
//! handling as the serial case.
//!
//! **Offsets.** An offset is stored only for the contiguous prefix of a partition's records that
//! are applied or rejected and whose outputs the broker acknowledged ([`super::offsets`]). A
//! record that fails or is interrupted stops storing for its partition; it is redelivered (after
//! a restart, or to the partition's next owner), never skipped.
//!
//! **Order.** Records of one lane (by default: one key, so one debtor) are handled one after
//! another, each after the previous one's outputs were acknowledged; records of different lanes
//! are handled up to `key_concurrency` at once. A record whose predecessor did not finish is
//! not handled either (it is redelivered with it).
//!
//! **Faults.** What a handler reports as transient (registry, Redis, broker away) is retried with
//! backoff while `/readyz` says the service waits; a permanent failure rejects the record to
//! the rejected topic with a reason and the raw bytes (cut to [`RAW_BYTES_KEPT`]); an output the
//! broker can never take (too large) rejects the record it came from; a broker away longer than
//! the producer's timeout is waited out by producing again; only what an operator must fix
//! (a bug, authorisation, a broken producer) ends the loop, with the record uncommitted.
//!
//! **Rebalances** are handled in [`super::rebalance`]. **Shutdown**: the loop stops taking
//! records, lets those in hand finish within `kafka.drain_timeout_ms` (retries stop at once),
//! commits what is settled and returns.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::offsets::{Settlement, Ticket};
use super::rebalance::Ownership;
use super::{Inbound, KafkaConsumer, Outbound, ProduceError, Producer};
use crate::admin::{FaultGuard, Readiness};
use crate::avro::Codec;
use crate::metrics::Metrics;
use crate::records::{Rejected, new_event_id};

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

/// Redis error codes that say "not now" rather than "never": a replica loading its data set or
/// promoted meanwhile, a cluster slot moving, a long script, memory full until eviction or an
/// operator frees some.
const REDIS_TRANSIENT_CODES: &[&str] = &[
    "LOADING",
    "READONLY",
    "TRYAGAIN",
    "BUSY",
    "OOM",
    "MASTERDOWN",
    "CLUSTERDOWN",
    "NOREPLICAS",
    "MISCONF",
];

impl From<redis::RedisError> for Failure {
    fn from(e: redis::RedisError) -> Self {
        // Connection loss, timeouts, failovers and memory pressure resolve by themselves (or by
        // an operator while we wait); anything else (a script error, a wrong type) is a bug that
        // retrying will not fix.
        let code_is_transient = e.code().is_some_and(|code| REDIS_TRANSIENT_CODES.contains(&code));
        if code_is_transient
            || e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
        {
            Failure::Transient(e.into())
        } else {
            Failure::Fatal(e.into())
        }
    }
}

impl From<ProduceError> for Failure {
    fn from(e: ProduceError) -> Self {
        match e {
            ProduceError::Transient { .. } => Failure::Transient(e.into()),
            ProduceError::TooLarge { .. } => Failure::reject("output_too_large", e.to_string()),
            ProduceError::Fatal { .. } => Failure::Fatal(e.into()),
        }
    }
}

/// The body of a consume loop: decides what one record becomes.
pub trait Handler: Send + Sync {
    fn handle(&self, record: &Inbound) -> impl Future<Output = Result<Vec<Outbound>, Failure>> + Send;

    /// Decides records of different lanes together, one result each and in order, for a
    /// handler that shares their round trips (`LoopContext::batch` > 1). A transient failure
    /// of one is retried on its own, through [`Handler::handle`]. By default one after another.
    fn handle_batch(&self, records: &[Inbound]) -> impl Future<Output = Vec<Result<Vec<Outbound>, Failure>>> + Send {
        async move {
            let mut results = Vec::with_capacity(records.len());
            for record in records {
                results.push(self.handle(record).await);
            }
            results
        }
    }
}

/// A batch handler's results (see [`Handler::handle_batch`]) from its outcomes by record's
/// place: a record left without one is a bug, and stops the loop as such.
pub fn every_record_decided(
    results: Vec<Option<Result<Vec<Outbound>, Failure>>>,
) -> Vec<Result<Vec<Outbound>, Failure>> {
    results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(Failure::Fatal(anyhow::anyhow!(
                    "a record of the batch was left undecided"
                )))
            })
        })
        .collect()
}

/// A batch handler's results when what the whole batch needs is away (its state, Redis): each
/// record fails as transient with `why`, and is then retried on its own.
pub fn each_retried_alone(records: usize, why: &str) -> Vec<Result<Vec<Outbound>, Failure>> {
    (0..records)
        .map(|_| Err(Failure::Transient(anyhow::anyhow!("{why}"))))
        .collect()
}

/// A batch handler's results when one failure fails `records` of its records together (a
/// round trip they shared): each fails as it did, a transient failure then retried on its own,
/// any other stopping the loop as fatal.
pub fn each_failed_as(records: usize, failure: &Failure) -> Vec<Result<Vec<Outbound>, Failure>> {
    if matches!(failure, Failure::Transient(_)) {
        return each_retried_alone(records, &format!("{failure:?}"));
    }
    (0..records)
        .map(|_| Err(Failure::Fatal(anyhow::anyhow!("{failure:?}"))))
        .collect()
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
    /// Most records taken and not yet settled; beyond it the loop pauses its partitions.
    pub max_in_flight: usize,
    /// Records of different lanes handled at once (1 = one at a time). Records of one lane are
    /// always handled in order, each after the previous one's outputs were acknowledged.
    pub key_concurrency: usize,
    /// Which records must wait for each other (same lane): by default those with the same key.
    pub lane: Option<LaneOf>,
    /// Most records taken together (those the consumer has at hand, of different lanes) and
    /// decided by one [`Handler::handle_batch`]; 1 takes them one at a time.
    pub batch: usize,
    /// How long records in hand may take to finish on shutdown.
    pub drain_timeout: Duration,
}

/// Which lane a record belongs to; records of one lane are handled one after another.
pub type LaneOf = Arc<dyn Fn(&Inbound) -> u64 + Send + Sync>;

/// How much of a rejected record's raw key and value the rejection carries: enough to see what
/// it was, never so much that the rejection itself is too large for the broker.
pub const RAW_BYTES_KEPT: usize = 64 * 1024;
/// How much of a rejection's detail is kept.
const DETAIL_KEPT: usize = 2048;
/// How much of a rejected record's tenant and debtor id is kept.
const IDENTIFIER_KEPT: usize = 256;

/// How long the loop stays full before it pauses its partitions (see `run_consumer`).
const FULL_BEFORE_PAUSE: Duration = Duration::from_secs(1);

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Exponential backoff with full jitter.
pub fn backoff(attempt: u32) -> Duration {
    let cap = BACKOFF_START.saturating_mul(1u32 << attempt.min(16)).min(BACKOFF_MAX);
    cap.mul_f64(rand::random::<f64>().max(0.1))
}

/// Lanes remembered before the finished ones are forgotten.
const LANES_KEPT: usize = 16_384;

/// A record's lane: the hash of its key (or content). Lanes are not folded into a few buckets:
/// two debtors sharing one would wait for each other's acknowledgements for nothing, and a
/// billing run's batches would chain on them.
fn lane_hash(bytes: &Option<Vec<u8>>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
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

/// `bytes` cut to `limit`, and what was cut, for the rejection's detail.
fn kept(bytes: &Option<Vec<u8>>, limit: usize, what: &str) -> (Option<Vec<u8>>, Option<String>) {
    match bytes {
        Some(b) if b.len() > limit => (
            Some(b[..limit].to_vec()),
            Some(format!("{what} cut to its first {limit} of {} bytes", b.len())),
        ),
        other => (other.clone(), None),
    }
}

/// `text` cut to at most `limit` bytes (at a character boundary), marked when cut.
fn cut_to(mut text: String, limit: usize) -> String {
    if text.len() > limit {
        let mut end = limit;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

fn cut_detail(detail: String) -> String {
    cut_to(detail, DETAIL_KEPT)
}

/// A record's handling ended for good (applied or rejected) or not.
enum Handled {
    Outputs(Vec<Outbound>),
    Interrupted,
}

impl LoopContext {
    /// The rejection of `record`, its raw bytes cut to [`RAW_BYTES_KEPT`].
    pub async fn rejection(
        &self,
        record: &Inbound,
        code: &str,
        detail: String,
        tenant: Option<String>,
        debtor_id: Option<String>,
    ) -> Result<Outbound, Failure> {
        let (raw_key, key_cut) = kept(&record.key, RAW_BYTES_KEPT, "raw key");
        let (raw_value, value_cut) = kept(&record.payload, RAW_BYTES_KEPT, "raw value");
        let mut detail = cut_detail(detail);
        for note in [key_cut, value_cut].into_iter().flatten() {
            detail.push_str(" (");
            detail.push_str(&note);
            detail.push(')');
        }
        // Identifiers come from the record and may be what made it too large.
        let short = |s: String| cut_to(s, IDENTIFIER_KEPT);
        let rejected = Rejected {
            event_id: new_event_id(),
            tenant: tenant.map(short),
            debtor_id: debtor_id.or_else(|| record.key_str()).map(short),
            occurred_at: chrono::Utc::now().timestamp_millis(),
            service: self.service.to_owned(),
            source_topic: record.topic.clone(),
            source_partition: record.partition,
            source_offset: record.offset,
            reason_code: code.to_owned(),
            detail,
            raw_key,
            raw_value,
        };
        let key = rejected.debtor_id.clone().unwrap_or_default();
        Ok(self
            .codec
            .outbound(&self.rejected_topic, &key, &rejected, record.trace)
            .await?)
    }

    fn count_rejection(&self, record: &Inbound, code: &str, detail: &str) {
        tracing::warn!(reason = code, detail = %cut_detail(detail.to_owned()), "record rejected");
        self.metrics
            .messages
            .with_label_values(&[&record.topic, "rejected"])
            .inc();
        self.metrics.rejected.with_label_values(&[code]).inc();
    }

    /// Waits out a transient fault: `false` when shutdown came first, or the record's partition
    /// was taken away meanwhile (its next owner redelivers it).
    async fn wait_out(
        &self,
        operation: &str,
        error: &(dyn std::fmt::Display + Sync),
        attempt: &mut u32,
        still_ours: &(dyn Fn() -> bool + Send + Sync),
    ) -> bool {
        if !still_ours() {
            return false;
        }
        self.metrics.retries.with_label_values(&[operation]).inc();
        let wait = backoff(*attempt);
        let error = error.to_string();
        tracing::warn!(%error, operation, attempt = *attempt, wait_ms = wait.as_millis() as u64, "transient failure, retrying");
        *attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = self.shutdown.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }

    /// What a handler's result for `record` (decided in `seconds`) becomes: its outputs when
    /// applied, its rejection when refused, or the failure to wait out or stop on (a rejection
    /// that cannot be encoded is retried or fatal; handling again gives the same rejection).
    async fn outcome(
        &self,
        record: &Inbound,
        result: Result<Vec<Outbound>, Failure>,
        seconds: f64,
    ) -> Result<Handled, Failure> {
        self.metrics
            .handle_seconds
            .with_label_values(&[&record.topic])
            .observe(seconds);
        match result {
            Ok(outs) => {
                self.metrics
                    .messages
                    .with_label_values(&[&record.topic, "applied"])
                    .inc();
                Ok(Handled::Outputs(outs))
            }
            Err(Failure::Reject {
                code,
                detail,
                tenant,
                debtor_id,
            }) => {
                self.count_rejection(record, code, &detail);
                let rejection = self.rejection(record, code, detail, tenant, debtor_id).await?;
                Ok(Handled::Outputs(vec![rejection]))
            }
            Err(f) => Err(f),
        }
    }

    /// Handles one record until it is applied or rejected, retrying transient failures.
    async fn outputs_for(
        &self,
        handler: &impl Handler,
        record: &Inbound,
        still_ours: &(dyn Fn() -> bool + Send + Sync),
    ) -> anyhow::Result<Handled> {
        let mut attempt = 0u32;
        let mut fault: Option<FaultGuard> = None;
        loop {
            let started = Instant::now();
            let result = handler.handle(record).await;
            let failure = match self.outcome(record, result, started.elapsed().as_secs_f64()).await {
                Ok(handled) => return Ok(handled),
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
                    fault.get_or_insert_with(|| self.readiness.waiting_out_fault());
                    if !self.wait_out("handle", &e, &mut attempt, still_ours).await {
                        return Ok(Handled::Interrupted);
                    }
                }
                Failure::Reject { code, detail, .. } => {
                    return Err(anyhow::anyhow!(
                        "a rejection cannot be encoded ({code}: {detail}) for {}[{}]@{}",
                        record.topic,
                        record.partition,
                        record.offset
                    ));
                }
            }
        }
    }

    /// Produces a record's outputs until the broker acknowledged them all. A broker away is
    /// waited out by producing again (consumers are idempotent, so an output acknowledged on an
    /// earlier attempt may arrive twice); an output the broker can never take turns into the
    /// record's rejection.
    async fn deliver(
        &self,
        record: &Inbound,
        mut outs: Vec<Outbound>,
        still_ours: &(dyn Fn() -> bool + Send + Sync),
    ) -> anyhow::Result<Settlement> {
        let mut attempt = 0u32;
        let mut fault: Option<FaultGuard> = None;
        let mut rejected_for_size = false;
        loop {
            let error = match self.producer.send_all(&outs).await {
                Ok(()) => return Ok(Settlement::Done),
                Err(error) => error,
            };
            match error {
                ProduceError::Transient { .. } => {
                    fault.get_or_insert_with(|| self.readiness.waiting_out_fault());
                    if !self.wait_out("produce", &error, &mut attempt, still_ours).await {
                        return Ok(Settlement::Unfinished);
                    }
                }
                ProduceError::TooLarge { .. } if !rejected_for_size => {
                    rejected_for_size = true;
                    let (code, detail) = ("output_too_large", error.to_string());
                    self.count_rejection(record, code, &detail);
                    outs = loop {
                        match self.rejection(record, code, detail.clone(), None, None).await {
                            Ok(out) => break vec![out],
                            Err(Failure::Transient(e)) => {
                                if !self.wait_out("encode", &e, &mut attempt, still_ours).await {
                                    return Ok(Settlement::Unfinished);
                                }
                            }
                            Err(other) => anyhow::bail!("cannot encode a rejection: {other:?}"),
                        }
                    };
                }
                _ => {
                    return Err(anyhow::Error::new(error).context(format!(
                        "producing the outputs of {}[{}]@{}",
                        record.topic, record.partition, record.offset
                    )));
                }
            }
        }
    }
}

/// Samples lag per assigned partition (high watermark minus position, and how long ago the
/// record at the position was written) on a blocking thread, so that the broker round trips
/// never hold up the consume loop.
fn record_lag(consumer: &Arc<KafkaConsumer>, metrics: &Metrics) {
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
                let lag = (high - position).max(0);
                metrics.record_lag(
                    element.topic(),
                    element.partition(),
                    lag,
                    chrono::Utc::now().timestamp_millis(),
                );
            }
        }
    });
}

/// Resolves when a record has settled: `true` if it was done.
type Settled = Shared<BoxFuture<'static, bool>>;

/// One record in hand and what its task needs.
struct Job<H> {
    part: Part,
    shared: TaskShared<H>,
}

impl<H: Handler + 'static> Job<H> {
    async fn run(self) -> anyhow::Result<()> {
        let Job {
            part:
                Part {
                    mut record,
                    ticket,
                    before,
                    done,
                },
            shared:
                TaskShared {
                    handler,
                    ctx,
                    consumer,
                    ownership,
                    handlers,
                },
        } = self;
        let span = record_span(&mut record, ctx.service);
        let result: anyhow::Result<Settlement> = async {
            // A predecessor that did not finish blocks its partition's offsets until it is
            // redelivered, and this record with it (it is redelivered too, in order). One of
            // another partition, or of an earlier assignment, says nothing about this record.
            if let Some((previous, settled)) = before
                && !settled.await
                && previous.same_assignment(&ticket)
            {
                return Ok(Settlement::Unfinished);
            }
            if !ownership.may_start(&ticket) {
                return Ok(Settlement::Unfinished);
            }
            let permit = handlers.acquire_owned().await?;
            if !ownership.may_start(&ticket) || ctx.shutdown.is_cancelled() {
                return Ok(Settlement::Unfinished);
            }
            let still_ours = || ownership.may_start(&ticket);
            // Boxed: a task waiting for its lane or a slot holds a pointer, not the handler's
            // whole state machine (thousands wait at once in a billing run).
            let outs = match Box::pin(ctx.outputs_for(&*handler, &record, &still_ours)).await? {
                Handled::Outputs(outs) => outs,
                Handled::Interrupted => return Ok(Settlement::Unfinished),
            };
            // The handler slot is free while the outputs await their acknowledgement (tens of
            // milliseconds that would otherwise cap throughput at slots / ack latency).
            drop(permit);
            ctx.deliver(&record, outs, &still_ours).await
        }
        .instrument(span)
        .await;
        let settlement = *result.as_ref().unwrap_or(&Settlement::Unfinished);
        ownership.settle(&consumer, &ticket, settlement);
        let _ = done.send(settlement == Settlement::Done);
        result.map(|_| ())
    }
}

/// A record in hand: the record, its place, and its lane's previous record.
struct Part {
    record: Inbound,
    ticket: Ticket,
    /// The previous record of its lane.
    before: Option<(Ticket, Settled)>,
    done: oneshot::Sender<bool>,
}

/// Records of different lanes taken together and decided by one [`Handler::handle_batch`].
/// Each keeps its own order, retries, rejection, acknowledgement and settlement, as a [`Job`].
struct BatchJob<H> {
    parts: Vec<Part>,
    shared: TaskShared<H>,
}

impl<H: Handler + 'static> BatchJob<H> {
    async fn run(self) -> anyhow::Result<()> {
        let BatchJob { parts, shared } = self;
        let (handler, ctx, ownership) = (&shared.handler, &shared.ctx, &shared.ownership);
        let settle = |ticket: &Ticket, done: oneshot::Sender<bool>, settlement: Settlement| {
            ownership.settle(&shared.consumer, ticket, settlement);
            let _ = done.send(settlement == Settlement::Done);
        };
        // Those whose predecessor finished (or says nothing of them) go on; the others are
        // redelivered with it, as in a `Job`.
        let mut ready = Vec::with_capacity(parts.len());
        for mut part in parts {
            if let Some((previous, settled)) = part.before.take()
                && !settled.await
                && previous.same_assignment(&part.ticket)
            {
                settle(&part.ticket, part.done, Settlement::Unfinished);
                continue;
            }
            ready.push(part);
        }
        let permit = shared.handlers.clone().acquire_owned().await?;
        let (mut records, mut rest) = (Vec::with_capacity(ready.len()), Vec::with_capacity(ready.len()));
        let mut spans = Vec::with_capacity(ready.len());
        for mut part in ready {
            if !ownership.may_start(&part.ticket) || ctx.shutdown.is_cancelled() {
                settle(&part.ticket, part.done, Settlement::Unfinished);
                continue;
            }
            spans.push(record_span(&mut part.record, ctx.service));
            records.push(part.record);
            rest.push((part.ticket, part.done));
        }
        if records.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let batch_span = tracing::info_span!("process batch", service = ctx.service, records = records.len());
        let results = handler.handle_batch(&records).instrument(batch_span).await;
        let each = started.elapsed().as_secs_f64() / records.len() as f64;
        anyhow::ensure!(
            results.len() == records.len(),
            "a batch handler gave {} results for {} records",
            results.len(),
            records.len()
        );
        // Each record's way to its outputs: decided, rejected, or retried on its own (at once,
        // so that one record waiting out a fault holds up no other).
        let handled = futures::future::join_all(records.iter().zip(results).zip(&rest).zip(&spans).map(
            |(((record, result), (ticket, _)), span)| {
                async move {
                    let still_ours = || ownership.may_start(ticket);
                    match ctx.outcome(record, result, each).await {
                        Ok(handled) => Ok(handled),
                        Err(Failure::Fatal(e)) => Err(e.context(format!(
                            "handling {}[{}]@{}",
                            record.topic, record.partition, record.offset
                        ))),
                        // Decided again on its own, waiting out the fault.
                        Err(_) => Box::pin(ctx.outputs_for(&**handler, record, &still_ours)).await,
                    }
                }
                .instrument(span.clone())
            },
        ))
        .await;
        let mut outputs = Vec::with_capacity(records.len());
        let mut failure = None;
        for h in handled {
            match h {
                Ok(h) => outputs.push(h),
                Err(e) => {
                    // Records after a fatal one are not delivered: they are redelivered with it.
                    failure = Some(e);
                    break;
                }
            }
        }
        drop(permit);
        let delivered = futures::future::join_all(records.iter().zip(outputs).zip(&rest).zip(&spans).map(
            |(((record, handled), (ticket, _)), span)| async move {
                let still_ours = || ownership.may_start(ticket);
                match handled {
                    Handled::Outputs(outs) => ctx.deliver(record, outs, &still_ours).instrument(span.clone()).await,
                    Handled::Interrupted => Ok(Settlement::Unfinished),
                }
            },
        ))
        .await;
        let mut delivered = delivered.into_iter();
        for (ticket, done) in rest {
            let settlement = match delivered.next() {
                Some(Ok(s)) => s,
                Some(Err(e)) => {
                    failure.get_or_insert(e);
                    Settlement::Unfinished
                }
                // Not handled: the batch stopped at a fatal error before it.
                None => Settlement::Unfinished,
            };
            settle(&ticket, done, settlement);
        }
        failure.map_or(Ok(()), Err)
    }
}

/// One consumer span per record, by OpenTelemetry's messaging conventions, a child of the span
/// that produced the record; the record's trace becomes the span's, for its outputs.
fn record_span(record: &mut Inbound, service: &'static str) -> tracing::Span {
    let span = tracing::info_span!(
        "process",
        "otel.name" = %format!("process {}", record.topic),
        "otel.kind" = "consumer",
        "messaging.system" = "kafka",
        "messaging.operation.type" = "process",
        "messaging.destination.name" = %record.topic,
        "messaging.destination.partition.id" = %record.partition,
        "messaging.kafka.offset" = record.offset,
        "messaging.kafka.message.key" = %record.key_str().unwrap_or_default(),
        service = service,
        trace_id = tracing::field::Empty,
    );
    if let Some(parent) = &record.parent {
        crate::telemetry::set_parent(&span, parent);
    }
    if let Some(own) = crate::telemetry::context_of(&span) {
        record.trace = own;
    }
    span.record("trace_id", record.trace.trace_id_hex());
    span
}

/// What every record's task shares.
struct TaskShared<H> {
    handler: Arc<H>,
    ctx: LoopContext,
    consumer: Arc<KafkaConsumer>,
    ownership: Arc<Ownership>,
    /// Slots for records (or batches) being decided: `key_concurrency`.
    handlers: Arc<Semaphore>,
}

impl<H> Clone for TaskShared<H> {
    fn clone(&self) -> Self {
        Self {
            handler: self.handler.clone(),
            ctx: self.ctx.clone(),
            consumer: self.consumer.clone(),
            ownership: self.ownership.clone(),
            handlers: self.handlers.clone(),
        }
    }
}

/// Tasks of records in hand, each ending with its records' count and result.
type Tasks = JoinSet<(usize, anyhow::Result<()>)>;

/// Spawns the task of `batch`: one record's [`Job`] without batching, else one [`BatchJob`].
/// Returns how many records it took.
fn spawn_batch<H: Handler + 'static>(tasks: &mut Tasks, mut batch: Vec<Part>, shared: &TaskShared<H>) -> usize {
    let records = batch.len();
    if records == 0 {
        return 0;
    }
    if shared.ctx.batch <= 1 && records == 1 {
        if let Some(part) = batch.pop() {
            let job = Job {
                part,
                shared: shared.clone(),
            };
            tasks.spawn(async move { (1, job.run().await) });
        }
        return records;
    }
    let job = BatchJob {
        parts: batch,
        shared: shared.clone(),
    };
    tasks.spawn(async move { (records, job.run().await) });
    records
}

/// Runs the consume runtime until shutdown (returns `Ok`) or a fatal error.
pub async fn run_consumer<H: Handler + 'static>(
    consumer: Arc<KafkaConsumer>,
    handler: H,
    ctx: LoopContext,
) -> anyhow::Result<()> {
    let handler = Arc::new(handler);
    let ownership = consumer.context().ownership.clone();
    // However the loop ends (returned, or dropped when its task is aborted), a later revoke (the
    // consumer closing) must not wait for records that nobody will settle any more.
    let _closing = CloseOnDrop(ownership.clone());
    // Records in hand watch this token: cancelled on shutdown, and when the loop ends early.
    let stop = ctx.shutdown.child_token();
    let task_ctx = LoopContext {
        shutdown: stop.clone(),
        ..ctx.clone()
    };
    let handlers = Arc::new(Semaphore::new(ctx.key_concurrency.max(1)));
    let batch_size = ctx.batch.max(1);
    // Records in hand, counted one by one whatever the batches they went in: most wait for
    // their outputs' acknowledgement, and a limit on tasks of a few records each would keep
    // only a few hundred records in flight and the loop paused most of the time.
    let limit = ctx.max_in_flight.max(1);
    let mut in_hand = 0usize;
    let shared = TaskShared {
        handler: handler.clone(),
        ctx: task_ctx.clone(),
        consumer: consumer.clone(),
        ownership: ownership.clone(),
        handlers: handlers.clone(),
    };
    let mut tasks = Tasks::new();
    let mut lanes: HashMap<u64, (Ticket, Settled)> = HashMap::new();
    let mut lanes_kept = LANES_KEPT;
    let mut paused = false;
    // Since when the loop has had `limit` records in hand.
    let mut full_since: Option<Instant> = None;
    let mut readiness_tick = tokio::time::interval(Duration::from_millis(250));
    let mut lag_tick = tokio::time::interval(Duration::from_secs(5));
    let mut failure: Option<anyhow::Error> = None;

    loop {
        tokio::select! {
            biased;
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                let joined = joined.map(|(records, result)| {
                    in_hand = in_hand.saturating_sub(records);
                    result
                });
                if let Some(error) = task_error(joined) {
                    failure = Some(error);
                    break;
                }
                if in_hand < limit {
                    full_since = None;
                }
                if paused && in_hand <= limit / 2 {
                    paused = !set_paused(&consumer, false);
                }
            }
            _ = ctx.shutdown.cancelled() => break,
            _ = lag_tick.tick() => record_lag(&consumer, &ctx.metrics),
            // Consuming means owning partitions. After a revoke (a rebalance, or a session lost
            // while the broker was away) the service is not ready until the group assigns it
            // partitions again, so whoever watches `/readyz` (an orchestrator rolling the
            // deployment, the fault suite) does not take a member away mid-rebalance.
            _ = readiness_tick.tick() => {
                if !paused && full_since.is_some_and(|since| since.elapsed() >= FULL_BEFORE_PAUSE) {
                    paused = set_paused(&consumer, true);
                }
                let owns = consumer.assignment().map(|a| a.count() > 0).unwrap_or(false);
                if owns != ctx.readiness.has_joined() {
                    ctx.readiness.set_ready(owns);
                }
            }
            // Full, the loop leaves the records to the client, which stops fetching when its
            // own queue is full, and takes them as soon as records in hand finish. Full for
            // longer (a fault waited out), it pauses its partitions and polls again: rebalances
            // are served inside `recv`, and a member that stops polling is put out of the
            // group. Not at once: a paused partition's fetched records are dropped, and on
            // resume the client takes up to a second to fetch again.
            received = consumer.recv(), if paused || in_hand < limit => {
                let message = match received {
                    Ok(m) => m.detach(),
                    Err(e) => {
                        ctx.metrics.retries.with_label_values(&["consume"]).inc();
                        tracing::warn!(error = %e, "consume error");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                // Records the consumer already has join this one, up to a batch of different
                // lanes; one at a time without batching.
                let mut batch: Vec<Part> = Vec::new();
                let mut batch_lanes: HashSet<u64> = HashSet::new();
                let mut next = Some(message);
                while let Some(message) = next.take() {
                    let record = Inbound::from_message(&message);
                    if let Some(written_ms) = rdkafka::Message::timestamp(&message).to_millis() {
                        ctx.metrics.polled(&record.topic, record.partition, written_ms);
                    }
                    if let Some(ticket) = ownership.take(&record.topic, record.partition, record.offset) {
                        let lane = ctx.lane.as_ref().map_or_else(|| key_lane(&record), |f| f(&record));
                        if !batch_lanes.insert(lane) {
                            // A lane's records are decided one after another: the next batch.
                            in_hand += spawn_batch(&mut tasks, std::mem::take(&mut batch), &shared);
                            batch_lanes = HashSet::from([lane]);
                        }
                        let (done, settled) = oneshot::channel::<bool>();
                        let settled: Settled = settled.map(|r| r.unwrap_or(false)).boxed().shared();
                        let before = lanes.insert(lane, (ticket.clone(), settled));
                        if lanes.len() > lanes_kept {
                            // Lanes whose last record is done say nothing to a next one; those
                            // in hand or unfinished (it must not overtake them) stay. Polled
                            // here: a lane without a next record is never polled elsewhere, and
                            // `Shared::peek` only sees what some clone has polled.
                            lanes.retain(|_, (_, settled)| settled.clone().now_or_never() != Some(true));
                            lanes_kept = (2 * lanes.len()).max(LANES_KEPT);
                        }
                        batch.push(Part { record, ticket, before, done });
                    } else {
                        tracing::debug!(topic = %record.topic, partition = record.partition, offset = record.offset,
                            "record of a partition no longer owned, left to its owner");
                    }
                    if batch.len() >= batch_size {
                        in_hand += spawn_batch(&mut tasks, std::mem::take(&mut batch), &shared);
                        batch_lanes.clear();
                    }
                    if batch_size > 1 && in_hand + batch.len() < limit {
                        next = consumer.recv().now_or_never().and_then(Result::ok).map(|m| m.detach());
                    }
                }
                in_hand += spawn_batch(&mut tasks, batch, &shared);
                // Paused again on each record past the limit: a rebalance may have brought
                // partitions that are not paused yet.
                if in_hand >= limit {
                    full_since.get_or_insert_with(Instant::now);
                }
                if paused && in_hand >= limit {
                    paused = set_paused(&consumer, true) || paused;
                }
            }
        }
    }

    // Stop taking records; let those in hand finish (retries stop at the shutdown signal).
    stop.cancel();
    let drained = tokio::time::timeout(ctx.drain_timeout, async {
        while let Some(joined) = tasks.join_next().await {
            if let Some(error) = task_error(joined.map(|(_, result)| result)) {
                tracing::error!(error = format!("{error:#}"), "record failed while draining");
                failure.get_or_insert(error);
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            unfinished = tasks.len(),
            "drain deadline passed; unfinished records stay uncommitted and are redelivered"
        );
        tasks.abort_all();
    }
    ctx.readiness.set_ready(false);
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => tracing::warn!(error = %e, "final commit failed"),
    }
    failure.map_or(Ok(()), Err)
}

struct CloseOnDrop(Arc<Ownership>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// A task's fatal error, or a panic as one.
fn task_error(joined: Result<anyhow::Result<()>, tokio::task::JoinError>) -> Option<anyhow::Error> {
    match joined {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(error),
        Err(join) if join.is_cancelled() => None,
        Err(join) => Some(anyhow::anyhow!("a record's handling panicked: {join}")),
    }
}

/// Pauses or resumes every assigned partition; whether it took effect.
fn set_paused(consumer: &KafkaConsumer, pause: bool) -> bool {
    let Ok(assignment) = consumer.assignment() else {
        return false;
    };
    let result = if pause {
        consumer.pause(&assignment)
    } else {
        consumer.resume(&assignment)
    };
    match result {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(%error, pause, "cannot pause or resume partitions");
            false
        }
    }
}
