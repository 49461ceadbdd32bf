//! Where an interrupted rebuild of a service's derived state got to, so that the next one goes
//! on from there instead of replaying everything again.
//!
//! Per topic and partition, the offset to go on from, in one Redis hash beside the state it
//! describes (`<prefix><service>:rebuild-progress`): whatever loses or restores the state (a
//! flush, a failover, a restore) does the same to the progress. It is recorded after each
//! batch is applied, so a batch is applied at least once (the rebuilds' writes are
//! idempotent), kept only while the marker says a rebuild is under way, and cleared when one
//! finishes (see [`crate::derived_state`]).

use redis::aio::ConnectionManager;

use crate::changelog::{self, Change, Progress, Restore};
use crate::config::KafkaConfig;
use crate::kafka::Failure;
use crate::redis_store::Keys;

/// The progress of one service's rebuild.
#[derive(Clone)]
pub struct Resume {
    redis: ConnectionManager,
    key: String,
}

impl Resume {
    pub fn new(redis: ConnectionManager, keys: &Keys, service: &str) -> Self {
        Self {
            redis,
            key: keys.key(&[service, "rebuild-progress"]),
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// Forgets the progress: the next rebuild replays everything.
    pub async fn clear(&self) -> redis::RedisResult<()> {
        redis::cmd("DEL")
            .arg(&self.key)
            .query_async(&mut self.redis.clone())
            .await
    }

    /// Where each partition of `topic` goes on from (0 for one not reached).
    pub async fn starts(&self, config: &KafkaConfig, topic: &str) -> anyhow::Result<Vec<(i32, i64)>> {
        let count = changelog::partition_count(config, topic).await?;
        if count == 0 {
            return Ok(Vec::new());
        }
        let mut hmget = redis::cmd("HMGET");
        hmget.arg(&self.key);
        for p in 0..count {
            hmget.arg(field(topic, p));
        }
        let offsets: Vec<Option<i64>> = hmget.query_async(&mut self.redis.clone()).await?;
        Ok((0..count).zip(offsets).map(|(p, o)| (p, o.unwrap_or(0))).collect())
    }

    /// [`changelog::replay`] of every partition of `topic`, from where an interrupted rebuild
    /// stopped, recording how far it gets. For topics whose records the rebuild applies batch
    /// by batch; one it sums up in memory across the whole topic must be replayed whole.
    pub async fn replay<R: Restore + Send>(
        &self,
        config: &KafkaConfig,
        topic: &str,
        batch: usize,
        restore: &mut R,
        report: impl FnMut(&Progress),
    ) -> anyhow::Result<Progress> {
        let starts = self.starts(config, topic).await?;
        let mut recording = Recording {
            inner: restore,
            resume: self,
            topic,
        };
        changelog::replay(config, topic, &starts, batch, &mut recording, report).await
    }

    async fn record(&self, topic: &str, partition: i32, next: i64) -> Result<(), Failure> {
        let _: () = redis::cmd("HSET")
            .arg(&self.key)
            .arg(field(topic, partition))
            .arg(next)
            .query_async(&mut self.redis.clone())
            .await?;
        Ok(())
    }
}

fn field(topic: &str, partition: i32) -> String {
    format!("{topic}:{partition}")
}

/// A [`Restore`] that records each applied batch's end.
struct Recording<'a, R> {
    inner: &'a mut R,
    resume: &'a Resume,
    topic: &'a str,
}

impl<R: Restore + Send> Restore for Recording<'_, R> {
    async fn apply(&mut self, partition: i32, changes: Vec<Change>) -> Result<(), Failure> {
        let next = changes.iter().map(|c| c.offset + 1).max();
        self.inner.apply(partition, changes).await?;
        if let Some(next) = next {
            self.resume.record(self.topic, partition, next).await?;
        }
        Ok(())
    }

    async fn finish(&mut self, partition: i32, end: i64) -> Result<(), Failure> {
        self.inner.finish(partition, end).await?;
        self.resume.record(self.topic, partition, end).await
    }
}
