//! Rebuilding dispatch's Redis state from the topics that hold its facts:
//! - each (action, channel) claim's settled state from dispatch's own outcomes
//!   (`forfall.dispatch.outcomes.v1`): `SENT`/`DELIVERED` → sent, `SUPPRESSED` → suppressed,
//!   `FAILED`/`BOUNCED` → failed, `DUPLICATE` → delivery unknown; a redelivered action then
//!   reports the same outcome again and sends nothing. Each claim lives out what is left of
//!   `dispatch.idempotency_ttl_days` since its outcome.
//! - the messages held for contact hours and the sent messages that delivery receipts look up,
//!   from dispatch's changelog (`forfall.dispatch.changelog.v1`, compacted).
//!
//! The one claim no topic holds is `sending`: an attempt stopped while the provider was being
//! called, and no outcome yet. Losing Redis at that moment as well as the process is the one
//! case in which a redelivered action can reach the provider a second time.

use std::sync::Arc;

use forfall_platform::avro::Codec;
use forfall_platform::changelog::{Change, Progress, Restore};
use forfall_platform::config::KafkaConfig;
use forfall_platform::derived_state::{Rebuild, remaining_ttl};
use forfall_platform::kafka::Failure;
use forfall_platform::rebuild_resume::Resume;
use forfall_platform::records::{DispatchOutcome, DispatchStatus, Record};
use forfall_platform::redis_store::Keys;
use redis::aio::ConnectionManager;

use crate::deferral::{Held, actions_key, due_key};
use crate::{claim_key, sent_key};

/// Records per Redis round trip.
const BATCH: usize = 2000;

/// Replays dispatch's outcomes and changelog into its keys.
pub struct DispatchRebuild {
    pub kafka: KafkaConfig,
    pub outcomes_topic: String,
    pub changelog_topic: String,
    pub codec: Arc<Codec>,
    pub redis: ConnectionManager,
    pub keys: Keys,
    pub idempotency_ttl_secs: u64,
    pub remember_sent_secs: u64,
}

/// The claim state an outcome settles (as [`crate::Dispatch`] writes it).
pub fn claim_state(o: &DispatchOutcome) -> String {
    let reason = o.reason.clone().unwrap_or_default();
    match o.status {
        DispatchStatus::Sent | DispatchStatus::Delivered => {
            let sent = crate::Sent {
                message_id: o.provider_message_id.clone().unwrap_or_default(),
                content_sha256: o.content_sha256.clone().unwrap_or_default(),
            };
            format!("sent:{}", sent.claim_value())
        }
        DispatchStatus::Suppressed => format!("suppressed:{reason}"),
        DispatchStatus::Failed | DispatchStatus::Bounced => format!("failed:{reason}"),
        DispatchStatus::Duplicate => format!("unknown:{reason}"),
    }
}

/// The changelog key of a sent message (for its receipt).
pub fn sent_changelog_key(provider: &str, message_id: &str) -> String {
    format!("s/{provider}/{message_id}")
}

/// The changelog key of a message handed to its provider whose outcome may not be on its
/// topic yet (see `Attempt::commit`).
pub fn sending_changelog_key(action_id: &str, channel: &str) -> String {
    format!("c/{action_id}/{channel}")
}

impl Rebuild for DispatchRebuild {
    async fn rebuild(&self, resume: &Resume, report: &(dyn Fn(&Progress) + Send + Sync)) -> anyhow::Result<Progress> {
        let mut total = Progress::default();
        let mut restore = Restorer {
            rebuild: self,
            from_changelog: false,
            skipped: 0,
        };
        for (topic, from_changelog) in [(&self.outcomes_topic, false), (&self.changelog_topic, true)] {
            restore.from_changelog = from_changelog;
            // Both are written batch by batch: resumable.
            total.add(&resume.replay(&self.kafka, topic, BATCH, &mut restore, report).await?);
        }
        if restore.skipped > 0 {
            tracing::error!(
                skipped = restore.skipped,
                "records dispatch cannot read were left out of the rebuild"
            );
        }
        Ok(total)
    }
}

struct Restorer<'a> {
    rebuild: &'a DispatchRebuild,
    /// Replaying the changelog (else the outcomes).
    from_changelog: bool,
    skipped: u64,
}

impl Restorer<'_> {
    async fn outcome(&mut self, pipe: &mut redis::Pipeline, c: &Change, now_ms: i64) -> Result<(), Failure> {
        let Some(value) = &c.value else { return Ok(()) };
        let decoded = match self.rebuild.codec.decode(Some(value)).await {
            Ok(d) if d.name == DispatchOutcome::FULL_NAME => d.to::<DispatchOutcome>(),
            Ok(d) => {
                self.skip(c, &format!("record type '{}' on the outcomes topic", d.name));
                return Ok(());
            }
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(e) => Err(e),
        };
        match decoded {
            Ok(o) => {
                let Some(ttl) = remaining_ttl(self.rebuild.idempotency_ttl_secs, c.timestamp_ms, now_ms) else {
                    return Ok(());
                };
                pipe.cmd("SET")
                    .arg(claim_key(&self.rebuild.keys, &o.action_id, &o.channel))
                    .arg(claim_state(&o))
                    .arg("EX")
                    .arg(ttl)
                    .ignore();
            }
            Err(e) => self.skip(c, &e.to_string()),
        }
        Ok(())
    }

    fn changelog(&mut self, pipe: &mut redis::Pipeline, c: &Change, now_ms: i64) {
        let keys = &self.rebuild.keys;
        let key = String::from_utf8_lossy(&c.key);
        if let Some(event_id) = key.strip_prefix("h/") {
            match &c.value {
                Some(v) => match serde_json::from_slice::<Held>(v) {
                    Ok(held) => {
                        pipe.hset(actions_key(keys), event_id, v.as_slice())
                            .ignore()
                            .zadd(due_key(keys), event_id, held.until_ms)
                            .ignore();
                    }
                    Err(e) => self.skip(c, &format!("held action: {e}")),
                },
                None => {
                    pipe.hdel(actions_key(keys), event_id)
                        .ignore()
                        .zrem(due_key(keys), event_id)
                        .ignore();
                }
            }
        } else if let Some((provider, message_id)) = key.strip_prefix("s/").and_then(|k| k.split_once('/')) {
            let redis_key = sent_key(keys, provider, message_id);
            match (
                &c.value,
                remaining_ttl(self.rebuild.remember_sent_secs, c.timestamp_ms, now_ms),
            ) {
                (Some(v), Some(ttl)) => {
                    pipe.cmd("SET")
                        .arg(redis_key)
                        .arg(v.as_slice())
                        .arg("EX")
                        .arg(ttl)
                        .ignore();
                }
                _ => {
                    pipe.del(redis_key).ignore();
                }
            }
        } else if let Some((action_id, channel)) = key.strip_prefix("c/").and_then(|k| k.rsplit_once('/')) {
            // A message handed to its provider: `sending` unless its outcome (replayed before
            // the changelog) already says what became of it. A tombstone changes nothing.
            if let (Some(v), Some(ttl)) = (
                &c.value,
                remaining_ttl(self.rebuild.idempotency_ttl_secs, c.timestamp_ms, now_ms),
            ) {
                pipe.cmd("SET")
                    .arg(claim_key(keys, action_id, channel))
                    .arg(v.as_slice())
                    .arg("NX")
                    .arg("EX")
                    .arg(ttl)
                    .ignore();
            }
        } else {
            self.skip(c, "a changelog key dispatch does not know");
        }
    }

    fn skip(&mut self, c: &Change, why: &str) {
        self.skipped += 1;
        tracing::error!(
            partition = c.partition,
            offset = c.offset,
            why,
            "record left out of the rebuild"
        );
    }
}

impl Restore for Restorer<'_> {
    async fn apply(&mut self, _partition: i32, changes: Vec<Change>) -> Result<(), Failure> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut pipe = redis::pipe();
        for c in &changes {
            if self.from_changelog {
                self.changelog(&mut pipe, c, now_ms);
            } else {
                self.outcome(&mut pipe, c, now_ms).await?;
            }
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
