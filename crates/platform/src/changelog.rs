//! Changelogs: a service's Redis state, kept on a compacted topic so that Redis can be lost
//! and rebuilt (the way Kafka Streams backs its state stores).
//!
//! A service writes a key's new value to its changelog in the same acknowledged produce as the
//! outputs of the decision that made it, and only then writes Redis: Redis is never ahead of
//! the changelog. The changelog is partitioned like the service's input (a change of input
//! partition `p` goes to changelog partition `p`), so one partition's state can be rebuilt on
//! its own when it is assigned. Compaction keeps each key's latest value; an empty value is a
//! tombstone (the key was dropped, by retention or because it is final).
//!
//! The values are the service's own encoding (what it stores in Redis), not Avro: a changelog
//! is the service's internal state, not a contract between services. Facts other services use
//! are on the event topics.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::kafka::topics::{self, Attempt};
use crate::kafka::{Failure, Outbound};
use crate::telemetry::TraceContext;

/// A service's changelog topic.
#[derive(Debug, Clone)]
pub struct Changelog {
    pub topic: String,
}

impl Changelog {
    pub fn new(topic: impl Into<String>) -> Self {
        Self { topic: topic.into() }
    }

    /// `key`'s new value, on the partition of the input it came from.
    pub fn put(&self, partition: i32, key: String, value: Vec<u8>) -> Outbound {
        Outbound {
            topic: self.topic.clone(),
            key,
            payload: value,
            trace: TraceContext::new_root(),
            partition: Some(partition),
        }
    }

    /// `key` is gone: compaction drops it and a rebuild forgets it.
    pub fn delete(&self, partition: i32, key: String) -> Outbound {
        self.put(partition, key, Vec::new())
    }

    /// `key`'s new value, on the partition its key hashes to: for state a service rebuilds
    /// whole rather than by input partition.
    pub fn put_keyed(&self, key: String, value: Vec<u8>) -> Outbound {
        Outbound {
            partition: None,
            ..self.put(0, key, value)
        }
    }

    /// [`Changelog::delete`] for a key written with [`Changelog::put_keyed`].
    pub fn delete_keyed(&self, key: String) -> Outbound {
        self.put_keyed(key, Vec::new())
    }
}

/// Creates a changelog topic (compacted, with `partitions` partitions: those of the input it
/// follows) when missing, and refuses one whose partitions do not match: a change would land
/// in a partition whose rebuild never reads it.
///
/// A broker that does not answer (away, or busy with a rebalance) is waited out, each attempt
/// bounded, as [`crate::kafka::ensure_topics`] waits it out; only a mismatch is refused at once.
pub async fn ensure(config: &KafkaConfig, topic: &str, partitions: i32) -> anyhow::Result<()> {
    topics::patiently(&format!("checking changelog topic '{topic}'"), || {
        ensure_once(config, topic, partitions)
    })
    .await
}

async fn ensure_once(config: &KafkaConfig, topic: &str, partitions: i32) -> Result<(), Attempt> {
    // Read first: every start of every instance comes here, and a CreateTopics for a topic
    // that exists is work for the controller (and, on some brokers, a wait) for nothing.
    let mut found = partition_count(config, topic).await.map_err(Attempt::Unanswered)?;
    if found == 0 {
        let compacted = [("cleanup.policy", "compact")];
        topics::create_once(config, &[topic.to_owned()], partitions, &compacted).await?;
        found = partition_count(config, topic).await.map_err(Attempt::Unanswered)?;
    }
    if found != partitions {
        return Err(Attempt::Refused(anyhow::anyhow!(
            "changelog topic '{topic}' has {found} partitions but its input has {partitions}: \
             they must match (recreate the changelog, then run `forfall rebuild`)"
        )));
    }
    Ok(())
}

/// How many partitions `topic` has.
pub async fn partition_count(config: &KafkaConfig, topic: &str) -> anyhow::Result<i32> {
    let client = crate::kafka::base_config(config);
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || -> anyhow::Result<i32> {
        let consumer: BaseConsumer = client.create()?;
        let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let count = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map_or(0, |t| t.partitions().len());
        Ok(i32::try_from(count)?)
    })
    .await?
}

/// [`replay`] of every partition of `topic` from its start: for state rebuilt whole.
pub async fn replay_whole<R: Restore>(
    config: &KafkaConfig,
    topic: &str,
    batch: usize,
    restore: &mut R,
    report: impl FnMut(&Progress),
) -> anyhow::Result<Progress> {
    let count = partition_count(config, topic).await?;
    let partitions: Vec<(i32, i64)> = (0..count).map(|p| (p, 0)).collect();
    replay(config, topic, &partitions, batch, restore, report).await
}

/// One replayed change.
#[derive(Debug, Clone)]
pub struct Change {
    pub partition: i32,
    pub offset: i64,
    /// When the change was written (the record's timestamp), in ms since the epoch.
    pub timestamp_ms: i64,
    pub key: Vec<u8>,
    /// `None` for a tombstone.
    pub value: Option<Vec<u8>>,
}

/// What a service does with its changelog's records when it rebuilds.
pub trait Restore {
    /// Applies changes of one partition, in their order.
    fn apply(
        &mut self,
        partition: i32,
        changes: Vec<Change>,
    ) -> impl std::future::Future<Output = Result<(), Failure>> + Send;
    /// Every change of `partition` up to `end` (the next offset) has been applied.
    fn finish(&mut self, partition: i32, end: i64) -> impl std::future::Future<Output = Result<(), Failure>> + Send;
}

/// How far a replay has come.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub records: u64,
    pub bytes: u64,
    pub partitions_done: usize,
    pub partitions: usize,
    pub elapsed: Duration,
}

impl Progress {
    /// Adds another replay's figures (a rebuild that replays several topics).
    pub fn add(&mut self, other: &Progress) {
        self.records += other.records;
        self.bytes += other.bytes;
        self.partitions_done += other.partitions_done;
        self.partitions += other.partitions;
        self.elapsed += other.elapsed;
    }

    pub fn records_per_second(&self) -> f64 {
        self.records as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} records ({:.1} MB) in {:.1} s, {:.0} records/s, {}/{} partitions done",
            self.records,
            self.bytes as f64 / 1e6,
            self.elapsed.as_secs_f64(),
            self.records_per_second(),
            self.partitions_done,
            self.partitions
        )
    }
}

/// Reads `partitions` of `topic`, each from its given offset (or its start, when compaction
/// removed that offset) to its end, and hands the records to `restore` in batches of up to
/// `batch`, calling `report` about once a second.
///
/// The end is where the partition was when the replay began, read record by record (tansu
/// 0.6.0 under-reports the high watermark of multi-record batches): the service does not write
/// a partition it is rebuilding, so the end does not move.
pub async fn replay<R: Restore>(
    config: &KafkaConfig,
    topic: &str,
    partitions: &[(i32, i64)],
    batch: usize,
    restore: &mut R,
    mut report: impl FnMut(&Progress),
) -> anyhow::Result<Progress> {
    let started = Instant::now();
    let mut progress = Progress {
        partitions: partitions.len(),
        ..Progress::default()
    };
    if partitions.is_empty() {
        return Ok(progress);
    }
    let consumer: BaseConsumer<EndIsNoError> = crate::kafka::base_config(config)
        .set("group.id", format!("{}.rebuild", config.group_prefix))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .set("fetch.max.bytes", "52428800")
        .set("max.partition.fetch.bytes", "10485760")
        .set("queued.max.messages.kbytes", "262144")
        .create_with_context(EndIsNoError)?;
    let consumer = std::sync::Arc::new(consumer);
    let mut tpl = TopicPartitionList::new();
    let mut open: HashSet<i32> = HashSet::new();
    for &(p, from) in partitions {
        tpl.add_partition_offset(topic, p, Offset::Offset(from.max(0)))?;
        open.insert(p);
    }
    consumer.assign(&tpl)?;
    let mut next: HashMap<i32, i64> = partitions.iter().copied().collect();
    let mut pending: HashMap<i32, Vec<Change>> = HashMap::new();
    let mut last_report = Instant::now();
    while !open.is_empty() {
        let polled = {
            let consumer = consumer.clone();
            tokio::task::spawn_blocking(move || {
                let mut out = Vec::new();
                let mut eofs = Vec::new();
                // Up to a batch's worth per trip to the blocking pool.
                while out.len() < 4096 {
                    let wait = if out.is_empty() && eofs.is_empty() {
                        Duration::from_millis(200)
                    } else {
                        Duration::ZERO
                    };
                    match consumer.poll(wait) {
                        None => break,
                        Some(Ok(m)) => out.push(Change {
                            partition: m.partition(),
                            offset: m.offset(),
                            timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
                            key: m.key().unwrap_or_default().to_vec(),
                            value: m.payload().filter(|v| !v.is_empty()).map(<[u8]>::to_vec),
                        }),
                        Some(Err(KafkaError::PartitionEOF(p))) => eofs.push(p),
                        Some(Err(e)) => return Err(e),
                    }
                }
                Ok((out, eofs))
            })
            .await??
        };
        let (changes, eofs) = polled;
        for change in changes {
            progress.records += 1;
            progress.bytes += (change.key.len() + change.value.as_ref().map_or(0, Vec::len)) as u64;
            next.insert(change.partition, change.offset + 1);
            let p = change.partition;
            let buffer = pending.entry(p).or_default();
            buffer.push(change);
            if buffer.len() >= batch {
                let full = std::mem::take(buffer);
                apply_waiting_out(restore, p, full).await?;
            }
        }
        for p in eofs {
            if open.remove(&p) {
                if let Some(rest) = pending.remove(&p).filter(|r| !r.is_empty()) {
                    apply_waiting_out(restore, p, rest).await?;
                }
                let end = next.get(&p).copied().unwrap_or(0);
                finish_waiting_out(restore, p, end).await?;
                progress.partitions_done += 1;
            }
        }
        progress.elapsed = started.elapsed();
        if last_report.elapsed() >= Duration::from_secs(1) {
            report(&progress);
            last_report = Instant::now();
        }
    }
    progress.elapsed = started.elapsed();
    report(&progress);
    Ok(progress)
}

/// The replay's client context: reaching a partition's end is how a replay knows it is done,
/// not an error to log (librdkafka reports it through the error callback too).
struct EndIsNoError;

impl ClientContext for EndIsNoError {
    fn error(&self, error: KafkaError, reason: &str) {
        let end = matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        );
        if !end {
            tracing::error!(%error, reason, "changelog replay: client error");
        }
    }
}

impl ConsumerContext for EndIsNoError {}

/// Redis away is waited out here as everywhere; anything else ends the rebuild.
async fn apply_waiting_out<R: Restore>(restore: &mut R, partition: i32, changes: Vec<Change>) -> anyhow::Result<()> {
    let mut attempt = 0u32;
    loop {
        match restore.apply(partition, changes.clone()).await {
            Ok(()) => return Ok(()),
            Err(Failure::Transient(e)) => {
                tracing::warn!(error = %e, partition, "rebuild: applying changes failed, retrying");
                tokio::time::sleep(crate::kafka::backoff(attempt)).await;
                attempt += 1;
            }
            Err(other) => anyhow::bail!("rebuilding partition {partition}: {other:?}"),
        }
    }
}

async fn finish_waiting_out<R: Restore>(restore: &mut R, partition: i32, end: i64) -> anyhow::Result<()> {
    let mut attempt = 0u32;
    loop {
        match restore.finish(partition, end).await {
            Ok(()) => return Ok(()),
            Err(Failure::Transient(e)) => {
                tracing::warn!(error = %e, partition, "rebuild: finishing a partition failed, retrying");
                tokio::time::sleep(crate::kafka::backoff(attempt)).await;
                attempt += 1;
            }
            Err(other) => anyhow::bail!("rebuilding partition {partition}: {other:?}"),
        }
    }
}
