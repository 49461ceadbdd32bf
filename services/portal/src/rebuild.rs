//! Rebuilding the portal's read model from the topics it follows, with the same changes the
//! running service applies (see [`crate::view`]): each is idempotent, so the topics are
//! replayed batch by batch and an interrupted rebuild goes on where it stopped.

use std::sync::Arc;

use forfall_platform::avro::Codec;
use forfall_platform::changelog::{Change, Progress, Restore};
use forfall_platform::config::KafkaConfig;
use forfall_platform::derived_state::Rebuild;
use forfall_platform::kafka::Failure;
use forfall_platform::rebuild_resume::Resume;
use redis::aio::ConnectionManager;

use crate::payments::ATTEMPT_TTL_SECS;
use crate::view::{self, APPLY_REBUILDING, ViewKeys};

/// Records per Redis round trip.
const BATCH: usize = 2000;

pub struct PortalRebuild {
    pub kafka: KafkaConfig,
    pub topics: Vec<String>,
    pub codec: Arc<Codec>,
    pub redis: ConnectionManager,
    pub keys: ViewKeys,
    pub retention_secs: u64,
    /// The portal's changelog: payments under way at providers, withdrawn links.
    pub changelog: String,
    /// How long a link lives (a withdrawal is kept as long).
    pub link_ttl_secs: i64,
}

impl Rebuild for PortalRebuild {
    async fn rebuild(&self, resume: &Resume, report: &(dyn Fn(&Progress) + Send + Sync)) -> anyhow::Result<Progress> {
        let mut total = Progress::default();
        let mut restore = Restorer {
            rebuild: self,
            skipped: 0,
        };
        for topic in &self.topics {
            total.add(&resume.replay(&self.kafka, topic, BATCH, &mut restore, report).await?);
        }
        let mut attempts = Attempts { rebuild: self };
        total.add(
            &resume
                .replay(&self.kafka, &self.changelog, BATCH, &mut attempts, report)
                .await?,
        );
        if restore.skipped > 0 {
            tracing::error!(
                skipped = restore.skipped,
                "records the portal cannot read were left out of the rebuild"
            );
        }
        Ok(total)
    }
}

struct Restorer<'a> {
    rebuild: &'a PortalRebuild,
    skipped: u64,
}

impl Restore for Restorer<'_> {
    async fn apply(&mut self, partition: i32, changes: Vec<Change>) -> Result<(), Failure> {
        let mut pipe = redis::pipe();
        pipe.load_script(&APPLY_REBUILDING).ignore();
        let mut queued = 0;
        for c in &changes {
            let Some(value) = &c.value else { continue };
            let decoded = match self.rebuild.codec.decode(Some(value)).await {
                Ok(d) => d,
                Err(e) if e.is_transient() => return Err(e.into()),
                Err(e) => {
                    self.skipped += 1;
                    tracing::error!(partition, offset = c.offset, error = %e, "unreadable record; skipped in the rebuild");
                    continue;
                }
            };
            let applied = match view::changes_of(&decoded.name, &decoded, c.offset) {
                Ok(applied) => applied,
                Err(e) => {
                    self.skipped += 1;
                    tracing::error!(partition, offset = c.offset, error = %e, "record left out of the rebuild");
                    continue;
                }
            };
            for (tenant, invoice_id, change) in &applied {
                let hash = self.rebuild.keys.invoice(tenant, invoice_id);
                // The unguarded script reads no marker; its slot is filled with the hash itself.
                let call = view::invocation(
                    &APPLY_REBUILDING,
                    &hash,
                    &hash,
                    (0, 0),
                    change,
                    self.rebuild.retention_secs,
                );
                pipe.invoke_script(&call).ignore();
                queued += 1;
            }
        }
        if queued > 0 {
            pipe.query_async::<()>(&mut self.rebuild.redis.clone()).await?;
        }
        Ok(())
    }

    async fn finish(&mut self, _partition: i32, _end: i64) -> Result<(), Failure> {
        Ok(())
    }
}

/// Puts back a debtor's withdrawal of links for what is left of its time (as long as a link
/// lives, from when it was made).
fn restore_revocation(pipe: &mut redis::Pipeline, rebuild: &PortalRebuild, c: &Change, now_ms: i64) {
    let Some(revocation) = c
        .value
        .as_deref()
        .and_then(|v| serde_json::from_slice::<crate::revocation::Revocation>(v).ok())
    else {
        return;
    };
    let key = rebuild.keys.revoked(&revocation.tenant, &revocation.debtor_id);
    restore_for_what_is_left(pipe, &key, c, rebuild.link_ttl_secs, now_ms);
}

/// Puts a changelog record's value back under `key` for what is left of `ttl_secs`, counted
/// from when it was written (the record's time, on the same clock as `now_ms`); removes it
/// when nothing is left or the record is a tombstone.
fn restore_for_what_is_left(pipe: &mut redis::Pipeline, key: &str, c: &Change, ttl_secs: i64, now_ms: i64) {
    let left_ms = ttl_secs * 1000 - (now_ms - c.timestamp_ms);
    match &c.value {
        Some(value) if left_ms > 0 => {
            pipe.cmd("SET").arg(key).arg(value).arg("PX").arg(left_ms).ignore();
        }
        _ => {
            pipe.del(key).ignore();
        }
    }
}

/// Puts back the payments under way and the withdrawn links, each for what is left of its time.
struct Attempts<'a> {
    rebuild: &'a PortalRebuild,
}

impl Restore for Attempts<'_> {
    async fn apply(&mut self, _partition: i32, changes: Vec<Change>) -> Result<(), Failure> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut pipe = redis::pipe();
        for c in &changes {
            let key = std::str::from_utf8(&c.key).unwrap_or_default();
            if key.starts_with(crate::revocation::CHANGELOG_PREFIX) {
                restore_revocation(&mut pipe, self.rebuild, c, now_ms);
                continue;
            }
            let Some(reference) = key.strip_prefix("pay/") else {
                continue;
            };
            let key = self.rebuild.keys.attempt(reference);
            restore_for_what_is_left(&mut pipe, &key, c, ATTEMPT_TTL_SECS as i64, now_ms);
        }
        if !pipe.is_empty() {
            pipe.query_async::<()>(&mut self.rebuild.redis.clone()).await?;
        }
        Ok(())
    }

    async fn finish(&mut self, _partition: i32, _end: i64) -> Result<(), Failure> {
        Ok(())
    }
}
