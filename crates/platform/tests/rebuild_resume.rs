//! An interrupted rebuild goes on where it stopped; any other rebuild starts from the
//! beginning. Against the dev stack's broker and Redis, with a topic and keys of the test's own.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use forfall_platform::admin::Readiness;
use forfall_platform::changelog::{Change, Progress, Restore};
use forfall_platform::config::{self, KafkaConfig};
use forfall_platform::derived_state::{DerivedState, Rebuild};
use forfall_platform::kafka::{self, Failure};
use forfall_platform::rebuild_resume::Resume;
use forfall_platform::redis_store::Keys;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

const RECORDS: i64 = 3_000;

/// Replays the test's topic, recording every offset it applies; the attempt given stops after
/// its second batch, as a rebuild does when its process is killed.
struct Recorded {
    kafka: KafkaConfig,
    topic: String,
    applied: Mutex<Vec<(i32, i64)>>,
    attempts: AtomicUsize,
    failing_attempt: usize,
}

struct Applying<'a> {
    rebuild: &'a Recorded,
    batches: usize,
    fail: bool,
}

impl Restore for Applying<'_> {
    async fn apply(&mut self, partition: i32, changes: Vec<Change>) -> Result<(), Failure> {
        if self.fail && self.batches == 2 {
            // Not a fault to wait out: the rebuild stops here, as with a crash.
            return Err(Failure::Fatal(anyhow::anyhow!("the rebuilding process stopped")));
        }
        self.batches += 1;
        let mut applied = self.rebuild.applied.lock().unwrap_or_else(|p| p.into_inner());
        applied.extend(changes.iter().map(|c| (partition, c.offset)));
        Ok(())
    }

    async fn finish(&mut self, _partition: i32, _end: i64) -> Result<(), Failure> {
        Ok(())
    }
}

impl Rebuild for Recorded {
    async fn rebuild(&self, resume: &Resume, report: &(dyn Fn(&Progress) + Send + Sync)) -> anyhow::Result<Progress> {
        let attempt = self.attempts.fetch_add(1, Ordering::SeqCst);
        let mut restore = Applying {
            rebuild: self,
            batches: 0,
            fail: attempt == self.failing_attempt,
        };
        resume.replay(&self.kafka, &self.topic, 250, &mut restore, report).await
    }
}

impl Recorded {
    fn take(&self) -> Vec<(i32, i64)> {
        std::mem::take(&mut *self.applied.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_rebuild_goes_on_where_it_stopped_and_a_new_one_starts_over() -> anyhow::Result<()> {
    let common = config::common(&config::figment(Some(std::path::Path::new(
        "/nonexistent/forfall.toml",
    ))))?;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut kafka = common.kafka.clone();
    kafka.group_prefix = format!("resume-{run}");
    let topic = format!("resume-{run}");
    kafka::ensure_topics(&kafka, std::slice::from_ref(&topic)).await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("broker.address.family", "v4")
        .set("linger.ms", "5")
        .create()?;
    let sends = (0..RECORDS).map(|i| {
        let (producer, topic) = (&producer, &topic);
        async move {
            let key = format!("k{i}");
            producer
                .send(FutureRecord::to(topic).key(&key).payload(&key), Duration::from_secs(30))
                .await
                .map_err(|(e, _)| e)
        }
    });
    for sent in futures::future::join_all(sends).await {
        sent?;
    }

    let redis = forfall_platform::redis_store::connect(&common.redis).await?;
    let keys = Keys::new(&format!("resume{run}:"));
    let state = DerivedState::new(
        &keys,
        "resumer",
        redis.clone(),
        Readiness::default(),
        Recorded {
            kafka,
            topic,
            applied: Mutex::default(),
            attempts: AtomicUsize::new(0),
            failing_attempt: 0,
        },
    );
    // The first rebuild stops after two batches: not ready, its progress kept.
    assert!(state.ensure_ready().await.is_err(), "a failed rebuild is not ready");
    let first = state.rebuilder().take();
    assert!(
        !first.is_empty() && (first.len() as i64) < RECORDS,
        "two batches applied before the stop: {}",
        first.len()
    );
    let progress: std::collections::HashMap<String, i64> = redis::cmd("HGETALL")
        .arg(keys.key(&["resumer", "rebuild-progress"]))
        .query_async(&mut redis.clone())
        .await?;
    assert!(
        !progress.is_empty(),
        "the progress is kept while the rebuild is unfinished"
    );

    // The next goes on from there: together they apply every record, the second not all.
    state.ensure_ready().await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let second = state.rebuilder().take();
    let mut both: Vec<(i32, i64)> = first.iter().chain(&second).copied().collect();
    both.sort();
    both.dedup();
    assert_eq!(
        both.len() as i64,
        RECORDS,
        "every record applied once the rebuild finished"
    );
    assert_eq!(
        second.len() as i64,
        RECORDS - first.len() as i64,
        "the second attempt applied only what the first had not"
    );
    let left: i64 = redis::cmd("EXISTS")
        .arg(keys.key(&["resumer", "rebuild-progress"]))
        .query_async(&mut redis.clone())
        .await?;
    assert_eq!(left, 0, "a finished rebuild's progress is cleared");

    // A rebuild asked for later (the state lost again) replays everything.
    state.rebuild_now().await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert_eq!(
        state.rebuilder().take().len() as i64,
        RECORDS,
        "a new rebuild starts from the beginning"
    );
    let _: () = redis::cmd("DEL")
        .arg(keys.key(&["resumer", "state"]))
        .query_async(&mut redis.clone())
        .await?;
    Ok(())
}
