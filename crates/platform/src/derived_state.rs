//! A service's Redis state as derived state: rebuilt from the topics that hold its facts when
//! Redis lost it (a flush, a failover to an empty replica, a restore of an older snapshot), and
//! never acted on while missing.
//!
//! One marker per service (`<prefix>:<service>:state`) says whether Redis holds the state:
//! `ready:<epoch>:<writes>` (the epoch is when the state was last rebuilt, the count grows
//! with every write), `rebuilding:<token>` while one instance rebuilds it, nothing when Redis
//! lost it. Every write a service decides on checks the marker in the same script (see
//! [`guard_lua`]) and is refused without it, so a decision is never booked on an empty Redis;
//! reads that could decide alone (a rejection for a missing key) read the marker in the same
//! round trip. Each instance remembers the highest marker it has seen: a marker lower than
//! that is a Redis restored from an older copy (or restarted having lost its last writes),
//! behind the topics, and is rebuilt like a lost one. A missing marker makes the instance rebuild: one instance at
//! a time (a lease in Redis), the others wait and are not ready meanwhile. A fresh deployment
//! finds no marker either, and its rebuild of empty topics takes a moment.
//!
//! A rebuild interrupted (a crash, a failing broker) goes on where it stopped the next time
//! (see [`crate::rebuild_resume`]); any other rebuild starts from the beginning.
//!
//! The watcher has its own partition-scoped markers (its state is large and partitioned like
//! its input); the services here keep state by tenant or by key that a partition does not
//! bound, and replay their topics whole.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::ConnectionManager;

use crate::admin::Readiness;
use crate::changelog::Progress;
use crate::kafka::Failure;
use crate::rebuild_resume::Resume;
use crate::redis_store::Keys;

/// What a marker says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    /// Redis holds the state: (epoch, writes).
    Ready(i64, i64),
    /// Being rebuilt, or lost.
    NotReady,
}

impl Marker {
    pub fn parse(value: Option<&str>) -> Marker {
        let parsed = value.and_then(|v| v.strip_prefix("ready:")).and_then(|v| {
            let (epoch, writes) = v.split_once(':')?;
            Some(Marker::Ready(epoch.parse().ok()?, writes.parse().ok()?))
        });
        parsed.unwrap_or(Marker::NotReady)
    }
}

/// The Lua that starts every write script of a service's derived state: it returns -2 (the
/// service then calls [`DerivedState::missing`]) when the marker (`marker`, a `KEYS[..]`
/// expression) is not ready or is lower than what the instance has seen (`seen_epoch`,
/// `seen_writes`: `ARGV[..]` expressions given [`DerivedState::seen`]), and counts the write.
pub fn guard_lua(marker: &str, seen_epoch: &str, seen_writes: &str) -> String {
    format!(
        r"local marker = redis.call('GET', {marker})
if not marker then return -2 end
local epoch_text, writes_text = string.match(marker, '^ready:(%d+):(%d+)$')
if not epoch_text then return -2 end
local epoch, writes = tonumber(epoch_text), tonumber(writes_text)
local seen_epoch, seen_writes = tonumber({seen_epoch}), tonumber({seen_writes})
if epoch < seen_epoch or (epoch == seen_epoch and writes < seen_writes) then return -2 end
redis.call('SET', {marker}, 'ready:' .. epoch_text .. ':' .. string.format('%d', writes + 1))
"
    )
}

/// What is left of `ttl_secs` for a key written at `written_ms` (a record's timestamp), so that
/// a rebuilt key expires when the lost one would have; `None` when it has run out.
pub fn remaining_ttl(ttl_secs: u64, written_ms: i64, now_ms: i64) -> Option<u64> {
    let age = u64::try_from((now_ms - written_ms).max(0) / 1000).unwrap_or(0);
    ttl_secs.checked_sub(age).filter(|left| *left > 0)
}

/// How a service rebuilds its state from its topics.
pub trait Rebuild: Send + Sync + 'static {
    /// Replays the service's topics into Redis (idempotent: replaying twice is harmless),
    /// going on from `resume` where it can, calling `report` about once a second.
    fn rebuild(
        &self,
        resume: &Resume,
        report: &(dyn Fn(&Progress) + Send + Sync),
    ) -> impl Future<Output = anyhow::Result<Progress>> + Send;
}

/// The marker of one service's derived state, and the rebuild that restores it.
pub struct DerivedState<R> {
    service: &'static str,
    marker: String,
    lease: String,
    /// How far an interrupted rebuild got.
    resume: Resume,
    redis: ConnectionManager,
    readiness: Readiness,
    rebuilder: R,
    /// This instance saw the marker ready and has not seen it missing since.
    known_ready: AtomicBool,
    /// The highest ready marker this instance has seen (epoch, writes).
    seen: std::sync::Mutex<(i64, i64)>,
    one_at_a_time: tokio::sync::Mutex<()>,
}

/// What an instance had seen of the marker before a read; see [`DerivedState::read_floor`].
#[derive(Debug, Clone, Copy)]
pub struct ReadFloor((i64, i64));

/// The marker key of `service`'s state.
pub fn marker_key(keys: &Keys, service: &str) -> String {
    keys.key(&[service, "state"])
}

/// Forgets `service`'s marker: its running instances rebuild their state at their next write
/// (or within `watch`'s period), and are not ready meanwhile.
pub async fn ask_rebuild(redis: &mut ConnectionManager, keys: &Keys, service: &str) -> redis::RedisResult<()> {
    redis::cmd("DEL")
        .arg(marker_key(keys, service))
        .query_async(redis)
        .await
}

impl<R: Rebuild> DerivedState<R> {
    pub fn new(
        keys: &Keys,
        service: &'static str,
        redis: ConnectionManager,
        readiness: Readiness,
        rebuilder: R,
    ) -> Self {
        Self {
            service,
            marker: marker_key(keys, service),
            lease: keys.key(&[service, "rebuild-lease"]),
            resume: Resume::new(redis.clone(), keys, service),
            redis,
            readiness,
            rebuilder,
            known_ready: AtomicBool::new(false),
            seen: std::sync::Mutex::new((0, 0)),
            one_at_a_time: tokio::sync::Mutex::new(()),
        }
    }

    /// The marker key, for the scripts that refuse to write without it ([`guard_lua`]).
    pub fn marker_key(&self) -> &str {
        &self.marker
    }

    /// The highest marker this instance has seen, for [`guard_lua`]'s arguments.
    pub fn seen(&self) -> (i64, i64) {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What this instance has seen, taken before it reads the marker: the read must not return
    /// less. (Not what it has seen once the read returns: reads handled at once return in any
    /// order, and one sent before another's write may come back after a later read raised it.)
    pub fn read_floor(&self) -> ReadFloor {
        ReadFloor(self.seen())
    }

    /// Whether a marker read is ready and not behind `floor` (what this instance had seen when
    /// it sent the read: every write acknowledged by then is in what Redis returns, unless
    /// Redis lost it). What it has seen is raised to the marker.
    fn observe(&self, marker: Marker, floor: ReadFloor) -> bool {
        let Marker::Ready(epoch, writes) = marker else {
            return false;
        };
        if (epoch, writes) < floor.0 {
            tracing::warn!(
                service = self.service,
                marker_epoch = epoch,
                marker_writes = writes,
                seen_epoch = floor.0.0,
                seen_writes = floor.0.1,
                "Redis holds an older state than this instance has seen (restored from an older copy?)"
            );
            return false;
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        *seen = (*seen).max((epoch, writes));
        true
    }

    /// What a write refused for a missing marker becomes: a transient failure (the record is
    /// handled again once the state is rebuilt), and this instance stops trusting the state.
    pub fn missing(&self) -> Failure {
        self.known_ready.store(false, Ordering::SeqCst);
        tracing::warn!(
            service = self.service,
            "state missing in Redis; it is rebuilt from the topics before going on"
        );
        Failure::Transient(anyhow::anyhow!(
            "the {} state is missing in Redis (flushed, failed over or restored); rebuilding it from the topics",
            self.service
        ))
    }

    /// A marker value read together with other keys (sent after `floor` was taken): `Err`
    /// when it is not ready or behind.
    pub fn check(&self, marker: Option<&str>, floor: ReadFloor) -> Result<(), Failure> {
        if self.observe(Marker::parse(marker), floor) {
            Ok(())
        } else {
            Err(self.missing())
        }
    }

    /// Makes sure Redis holds the state: returns at once when this instance knows it does,
    /// rebuilds it when the marker is missing, and waits (transient failure) while another
    /// instance rebuilds it.
    pub async fn ensure_ready(&self) -> Result<(), Failure> {
        if self.known_ready.load(Ordering::SeqCst) {
            return Ok(());
        }
        let _one = self.one_at_a_time.lock().await;
        let floor = self.read_floor();
        let marker: Option<String> = redis::cmd("GET")
            .arg(&self.marker)
            .query_async(&mut self.redis.clone())
            .await?;
        // A rebuild that did not finish left its own marker: the next goes on from its progress.
        let interrupted = marker.as_deref().is_some_and(|m| m.starts_with("rebuilding:"));
        let marker = Marker::parse(marker.as_deref());
        if self.observe(marker, floor) {
            self.known_ready.store(true, Ordering::SeqCst);
            return Ok(());
        }
        let _not_ready = self.readiness.rebuilding_state();
        let token = uuid::Uuid::new_v4().simple().to_string();
        let leased: Option<String> = redis::cmd("SET")
            .arg(&self.lease)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(LEASE.as_millis() as u64)
            .query_async(&mut self.redis.clone())
            .await?;
        if leased.is_none() {
            return Err(Failure::Transient(anyhow::anyhow!(
                "another {} instance is rebuilding the state from the topics; waiting for it",
                self.service
            )));
        }
        if !interrupted {
            self.resume.clear().await?;
        }
        let rebuilding = format!("rebuilding:{token}");
        let _: () = redis::cmd("SET")
            .arg(&self.marker)
            .arg(&rebuilding)
            .query_async(&mut self.redis.clone())
            .await?;
        let span = tracing::info_span!("rebuild", service = self.service);
        let service = self.service;
        let report = move |p: &Progress| tracing::info!(parent: &span, service, progress = %p, "rebuilding state from the topics");
        let rebuilt = tokio::select! {
            rebuilt = self.rebuilder.rebuild(&self.resume, &report) => rebuilt,
            never = self.keep_lease(&token) => match never {},
        };
        let progress = match rebuilt {
            Ok(p) => p,
            Err(e) => {
                self.release(&token).await;
                return Err(Failure::Transient(anyhow::anyhow!(
                    "rebuilding the {} state: {e:#}",
                    self.service
                )));
            }
        };
        // Ready only if nothing lost the state again while it was rebuilt.
        static FINISH: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                r"if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
                  redis.call('SET', KEYS[1], ARGV[2])
                  return 1",
            )
        });
        // A new epoch, later than any before it: instances that saw the old state accept it.
        let previous = match marker {
            Marker::Ready(epoch, _) => epoch,
            Marker::NotReady => 0,
        };
        let epoch = chrono::Utc::now()
            .timestamp_millis()
            .max(previous + 1)
            .max(self.seen().0 + 1);
        let finished: i32 = FINISH
            .key(&self.marker)
            .arg(&rebuilding)
            .arg(format!("ready:{epoch}:0"))
            .invoke_async(&mut self.redis.clone())
            .await?;
        self.release(&token).await;
        if finished != 1 {
            return Err(self.missing());
        }
        if let Err(e) = self.resume.clear().await {
            // Harmless: the next rebuild that is not a resumed one clears it first.
            tracing::warn!(service = self.service, error = %e, "cannot clear the finished rebuild's progress");
        }
        tracing::info!(service = self.service, progress = %progress, "state rebuilt from the topics");
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = (epoch, 0);
        self.known_ready.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Checks the marker every `every` and rebuilds when it is gone, so that a flush is noticed
    /// (and readiness tells) without waiting for the next write. Runs until aborted.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let floor = self.read_floor();
            let marker: redis::RedisResult<Option<String>> = redis::cmd("GET")
                .arg(&self.marker)
                .query_async(&mut self.redis.clone())
                .await;
            match marker {
                Ok(m) if self.observe(Marker::parse(m.as_deref()), floor) => continue,
                Ok(_) => {
                    self.known_ready.store(false, Ordering::SeqCst);
                    if let Err(e) = self.ensure_ready().await {
                        tracing::debug!(service = self.service, error = ?e, "state not ready yet");
                    }
                }
                Err(e) => tracing::debug!(service = self.service, error = %e, "cannot read the state marker"),
            }
        }
    }

    async fn keep_lease(&self, token: &str) -> std::convert::Infallible {
        static RENEW: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
                  return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0",
            )
        });
        loop {
            tokio::time::sleep(LEASE / 3).await;
            let renewed: redis::RedisResult<i32> = RENEW
                .key(&self.lease)
                .arg(token)
                .arg(LEASE.as_millis() as u64)
                .invoke_async(&mut self.redis.clone())
                .await;
            if let Err(e) = renewed {
                tracing::warn!(error = %e, "cannot renew the rebuild lease; trying again");
            }
        }
    }

    async fn release(&self, token: &str) {
        static RELEASE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
                  return 0",
            )
        });
        let released: redis::RedisResult<i32> = RELEASE
            .key(&self.lease)
            .arg(token)
            .invoke_async(&mut self.redis.clone())
            .await;
        if let Err(e) = released {
            tracing::warn!(error = %e, "cannot release the rebuild lease; it runs out by itself");
        }
    }

    /// Rebuilds now, whatever the marker says (`forfall rebuild`): forgets it, then rebuilds.
    /// An interrupted rebuild's marker is kept, so that this one goes on from its progress.
    pub async fn rebuild_now(&self) -> Result<(), Failure> {
        static FORGET_UNLESS_INTERRUPTED: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                r"local m = redis.call('GET', KEYS[1])
                  if m and string.sub(m, 1, 11) == 'rebuilding:' then return 0 end
                  return redis.call('DEL', KEYS[1])",
            )
        });
        let _: i64 = FORGET_UNLESS_INTERRUPTED
            .key(&self.marker)
            .invoke_async(&mut self.redis.clone())
            .await?;
        self.known_ready.store(false, Ordering::SeqCst);
        self.ensure_ready().await
    }

    pub fn rebuilder(&self) -> &R {
        &self.rebuilder
    }
}

/// How long a rebuilding instance holds the lease without renewing it (renewed every third).
const LEASE: Duration = Duration::from_secs(30);
