//! Rebuilding the watcher's Redis state from its changelog (`forfall.watcher.changelog.v1`):
//! journeys, their timers, each debtor's open invoices, the late history, each debtor's history
//! of invoices and parked payments.
//!
//! A partition's state carries a marker in Redis: `ready:<offset>` (every change up to that
//! changelog offset is in Redis), `rebuilding:<offset>` while a rebuild runs, nothing when
//! Redis lost it. The watcher decides nothing for a partition whose marker is not ready, and
//! writes refuse it too (the save script checks the marker), so an invoice's next revision
//! never restarts its journey on an empty Redis. A rebuild replays the partition's changelog
//! from the offset after the marker's (from the start when there is none): after a flush that
//! is everything, after a restart from an older snapshot only what the snapshot is missing, and
//! after an interrupted rebuild what it had not reached, so a rebuild resumes where it stopped.

use std::collections::HashMap;

use forfall_platform::changelog::{self, Change, Progress, Restore};
use forfall_platform::config::KafkaConfig;
use forfall_platform::kafka::Failure;
use redis::aio::ConnectionManager;

use crate::store::{ChangeKey, StateMarker, Store, Stored, decode_value};

/// Changes applied per Redis round trip.
pub const BATCH: usize = 4000;

/// Applies changelog records to Redis.
///
/// Each batch moves its partition's marker on (`rebuilding:<offset>`, at the end
/// `ready:<offset>`) only from the value this rebuild last saw there: should Redis lose the
/// state while it is rebuilt (a flush, a failover), the marker is gone and the rebuild stops
/// instead of declaring done what was lost; the next one starts over.
pub struct WatcherRestore<'a> {
    store: &'a Store,
    redis: ConnectionManager,
    /// Each partition's marker as this rebuild last saw or wrote it.
    marks: HashMap<i32, Option<String>>,
    /// A marker had moved under this rebuild (lost, or advanced by another rebuilder).
    moved: bool,
}

impl<'a> WatcherRestore<'a> {
    pub fn new(store: &'a Store, redis: ConnectionManager, marks: HashMap<i32, Option<String>>) -> Self {
        Self {
            store,
            redis,
            marks,
            moved: false,
        }
    }

    /// Moves a partition's marker from what this rebuild last saw to `to`.
    async fn advance(&mut self, partition: i32, to: String) -> Result<(), Failure> {
        static ADVANCE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                r"local v = redis.call('GET', KEYS[1]) or ''
                  if v ~= ARGV[1] then return 0 end
                  redis.call('SET', KEYS[1], ARGV[2])
                  return 1",
            )
        });
        let seen = self.marks.get(&partition).cloned().flatten().unwrap_or_default();
        let moved: i32 = ADVANCE
            .key(self.store.state_key(partition))
            .arg(&seen)
            .arg(&to)
            .invoke_async(&mut self.redis)
            .await?;
        if moved != 1 {
            self.moved = true;
            return Err(Failure::Fatal(anyhow::anyhow!(
                "the journey state of partition {partition} changed while it was rebuilt (lost again?): the rebuild starts over"
            )));
        }
        self.marks.insert(partition, Some(to));
        Ok(())
    }
}

impl Restore for WatcherRestore<'_> {
    async fn apply(&mut self, partition: i32, changes: Vec<Change>) -> Result<(), Failure> {
        let parsed: Vec<(Option<ChangeKey>, &Change)> = changes.iter().map(|c| (ChangeKey::parse(&c.key), c)).collect();
        let mut journeys: Vec<(String, String)> = parsed
            .iter()
            .filter_map(|(k, _)| match k {
                Some(ChangeKey::Journey { tenant, invoice_id }) => Some((tenant.clone(), invoice_id.clone())),
                _ => None,
            })
            .collect();
        journeys.sort();
        journeys.dedup();
        let mut current: HashMap<(String, String), Stored> = journeys
            .iter()
            .cloned()
            .zip(self.store.read_journeys(&journeys).await?)
            .filter_map(|(pair, loaded)| Some((pair, loaded?.stored)))
            .collect();
        let mut pipe = redis::pipe();
        let mut last = None;
        for (key, change) in parsed {
            last = Some(change.offset);
            match key {
                Some(ChangeKey::Journey { tenant, invoice_id }) => {
                    let pair = (tenant, invoice_id);
                    let next = match &change.value {
                        Some(v) => Some((v.as_slice(), decode_value(v)?.stored)),
                        None => None,
                    };
                    let before = current.get(&pair);
                    if before.is_none() && next.is_none() {
                        continue;
                    }
                    self.store.add_restore(
                        &mut pipe,
                        &pair.0,
                        &pair.1,
                        before,
                        next.as_ref().map(|(v, s)| (*v, s)),
                        change.timestamp_ms,
                    );
                    match next {
                        Some((_, stored)) => current.insert(pair, stored),
                        None => current.remove(&pair),
                    };
                }
                Some(ChangeKey::Late {
                    tenant,
                    debtor_id,
                    invoice_id,
                }) => {
                    let key = self.store.late_key(&tenant, &debtor_id);
                    let index = self.store.late_index_key(partition);
                    let when = change
                        .value
                        .as_deref()
                        .and_then(|v| std::str::from_utf8(v).ok())
                        .and_then(|v| v.parse::<i64>().ok());
                    let member = change.key.as_slice();
                    match when {
                        Some(ms) => pipe.zadd(key, invoice_id, ms).ignore().zadd(index, member, ms).ignore(),
                        None => pipe.zrem(key, invoice_id).ignore().zrem(index, member).ignore(),
                    };
                }
                Some(ChangeKey::History {
                    tenant,
                    debtor_id,
                    invoice_id,
                }) => {
                    let key = self.store.history_key(&tenant, &debtor_id);
                    match &change.value {
                        Some(v) => pipe.hset(key, invoice_id, v.as_slice()).ignore(),
                        None => pipe.hdel(key, invoice_id).ignore(),
                    };
                }
                Some(ChangeKey::Parked {
                    tenant,
                    invoice_id,
                    payment_id,
                }) => {
                    let key = self.store.parked_key(&tenant, &invoice_id);
                    let index = self.store.parked_index_key(partition);
                    let member = change.key.as_slice();
                    match &change.value {
                        Some(v) => pipe
                            .hset(key, payment_id, v.as_slice())
                            .ignore()
                            .zadd(index, member, change.timestamp_ms)
                            .ignore(),
                        None => pipe.hdel(key, payment_id).ignore().zrem(index, member).ignore(),
                    };
                }
                None => {
                    tracing::error!(
                        partition,
                        offset = change.offset,
                        "changelog record with a key this watcher does not know; skipped"
                    );
                }
            }
        }
        if !pipe.is_empty() {
            match pipe.query_async::<()>(&mut self.redis).await {
                Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                    self.store.prepare_scripts().await?;
                    pipe.query_async::<()>(&mut self.redis).await?;
                }
                other => other?,
            }
        }
        if let Some(offset) = last {
            self.advance(partition, format!("rebuilding:{offset}")).await?;
        }
        Ok(())
    }

    async fn finish(&mut self, partition: i32, end: i64) -> Result<(), Failure> {
        let checkpoint = end - 1;
        self.advance(partition, format!("ready:{checkpoint}")).await?;
        self.store.saw_checkpoint(partition, checkpoint);
        Ok(())
    }
}

/// Each partition's marker as Redis holds it now.
async fn markers(
    store: &Store,
    redis: &mut ConnectionManager,
    partitions: &[i32],
) -> Result<HashMap<i32, Option<String>>, Failure> {
    let mut pipe = redis::pipe();
    for p in partitions {
        pipe.get(store.state_key(*p));
    }
    let markers: Vec<Option<String>> = pipe.query_async(redis).await?;
    Ok(partitions.iter().copied().zip(markers).collect())
}

/// Where each partition's replay starts: after its marker's offset, or from the start.
fn starts(partitions: &[i32], marks: &HashMap<i32, Option<String>>) -> Vec<(i32, i64)> {
    partitions
        .iter()
        .map(|p| {
            let marker = marks.get(p).cloned().flatten();
            let from = match Store::parse_state(marker.as_deref()) {
                StateMarker::Missing => 0,
                StateMarker::Ready(at) | StateMarker::Rebuilding(at) => at + 1,
            };
            (*p, from)
        })
        .collect()
}

/// Rebuilds `partitions` from the changelog `topic`, each from where its marker says.
pub async fn rebuild(
    kafka: &KafkaConfig,
    topic: &str,
    store: &Store,
    redis: ConnectionManager,
    partitions: &[i32],
    report: impl FnMut(&Progress),
) -> anyhow::Result<Progress> {
    store
        .prepare_scripts()
        .await
        .map_err(|e| anyhow::anyhow!("loading the journey scripts into Redis: {e:?}"))?;
    let mut conn = redis.clone();
    let mut report = report;
    // A marker that moves under the rebuild was lost again (start over) or advanced by another
    // rebuilder of the same partition (a running watcher while `forfall rebuild` runs): either
    // way the rebuild reads the markers again and goes on from them.
    let mut attempts = 0;
    loop {
        let marks = markers(store, &mut conn, partitions)
            .await
            .map_err(|e| anyhow::anyhow!("reading the partitions' state markers: {e:?}"))?;
        let from = starts(partitions, &marks);
        let mut restore = WatcherRestore::new(store, redis.clone(), marks);
        match changelog::replay(kafka, topic, &from, BATCH, &mut restore, &mut report).await {
            Err(e) if restore.moved && attempts < 20 => {
                attempts += 1;
                tracing::info!(error = %e, "a partition's marker moved during the rebuild; reading it again");
            }
            other => return other,
        }
    }
}

/// What `forfall rebuild` is asked to do for the watcher.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// Only these partitions (all of the changelog's when `None`).
    pub partitions: Option<Vec<i32>>,
    /// Forget the markers first: replay every partition from the start of its changelog.
    pub from_start: bool,
    /// Only forget the markers, so that the running watchers rebuild the partitions they own
    /// at their next read (and are not ready meanwhile).
    pub ask_running: bool,
}

/// `forfall rebuild` for the watcher: replays its changelog into Redis with progress, for a
/// Redis that was lost or restored from an older copy, while the watchers are stopped (running
/// watchers rebuild their own partitions when they find them missing; `ask_running` makes them).
pub async fn rebuild_deployment(
    config: &forfall_platform::config::CommonConfig,
    request: &Request,
    report: impl FnMut(&Progress),
) -> anyhow::Result<Progress> {
    let topic = config.topics.name(&config.topics.watcher_changelog);
    let count = changelog::partition_count(&config.kafka, &topic).await?;
    anyhow::ensure!(
        count > 0,
        "no changelog topic '{topic}': the watcher has not run against these brokers, so there is nothing to rebuild from"
    );
    let partitions: Vec<i32> = match &request.partitions {
        Some(ps) => {
            if let Some(p) = ps.iter().find(|p| **p < 0 || **p >= count) {
                anyhow::bail!(
                    "partition {p} does not exist: '{topic}' has partitions 0..{}",
                    count - 1
                );
            }
            ps.clone()
        }
        None => (0..count).collect(),
    };
    let redis = forfall_platform::redis_store::connect(&config.redis).await?;
    let store = Store::new(
        redis.clone(),
        forfall_platform::redis_store::Keys::new(&config.redis.key_prefix),
        changelog::Changelog::new(topic.clone()),
    );
    if request.from_start || request.ask_running {
        let mut pipe = redis::pipe();
        for p in &partitions {
            pipe.del(store.state_key(*p)).ignore();
        }
        let _: () = pipe.query_async(&mut redis.clone()).await?;
    }
    if request.ask_running {
        return Ok(Progress {
            partitions: partitions.len(),
            ..Progress::default()
        });
    }
    rebuild(&config.kafka, &topic, &store, redis, &partitions, report).await
}
