//! Time as a dependency. Services never read the system clock directly, so that tests and the
//! demo can run a 60-day journey in seconds.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

use chrono::{DateTime, Duration, Utc};

pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> DateTime<Utc>;
}

pub type SharedClock = Arc<dyn Clock>;

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that only moves when told to (tests).
#[derive(Debug)]
pub struct ManualClock {
    millis: AtomicI64,
}

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> Arc<Self> {
        Arc::new(Self {
            millis: AtomicI64::new(start.timestamp_millis()),
        })
    }

    pub fn set(&self, to: DateTime<Utc>) {
        self.millis.store(to.timestamp_millis(), Ordering::SeqCst);
    }

    pub fn advance(&self, by: Duration) {
        self.millis.fetch_add(by.num_milliseconds(), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.millis.load(Ordering::SeqCst)).unwrap_or_default()
    }
}

/// Simulated time that runs `speed` times faster than real time from `start` (the demo).
#[derive(Debug)]
pub struct AcceleratedClock {
    start: DateTime<Utc>,
    real_start: Instant,
    speed: f64,
}

impl AcceleratedClock {
    pub fn new(start: DateTime<Utc>, speed: f64) -> Arc<Self> {
        Arc::new(Self {
            start,
            real_start: Instant::now(),
            speed,
        })
    }
}

impl Clock for AcceleratedClock {
    fn now(&self) -> DateTime<Utc> {
        let elapsed = self.real_start.elapsed().as_secs_f64() * self.speed;
        // Millisecond resolution is all any rule needs.
        self.start + Duration::milliseconds((elapsed * 1000.0) as i64)
    }
}

/// DEV AND TEST ONLY: simulated time shared by separate processes. The instant (milliseconds since
/// the epoch) is a Redis key that a test driver moves; each process reads it every 20 ms. The
/// fault suite uses it to run a month-long journey through real service binaries in minutes.
/// Configured with `clock.shared_redis_key`; production never sets it.
#[derive(Debug)]
pub struct SharedRedisClock {
    millis: Arc<AtomicI64>,
}

impl SharedRedisClock {
    /// Reads the key once (it must be set) and keeps following it until `stop`.
    pub async fn follow(
        redis_url: &str,
        key: &str,
        stop: tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let client = redis::Client::open(redis_url)?;
        let read = |v: Option<i64>| v.ok_or_else(|| anyhow::anyhow!("the shared clock's key '{key}' is not set"));
        // A process started while the driver's Redis is paused, or before the driver set the
        // key, waits for it rather than failing.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let (mut redis, first) = loop {
            let attempt: anyhow::Result<_> = async {
                let mut redis = client.get_connection_manager().await?;
                let first: Option<i64> = redis::cmd("GET").arg(key).query_async(&mut redis).await?;
                Ok((redis, first))
            }
            .await;
            match attempt {
                Ok((redis, Some(first))) => break (redis, Some(first)),
                Ok((redis, None)) if std::time::Instant::now() > deadline => break (redis, None),
                Err(e) if std::time::Instant::now() > deadline => return Err(e),
                _ => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        };
        let millis = Arc::new(AtomicI64::new(read(first)?));
        let (follower, key) = (millis.clone(), key.to_owned());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                // While Redis is away the clock stands still, as everything else that reads Redis does.
                if let Ok(Some(now)) = redis::cmd("GET").arg(&key).query_async::<Option<i64>>(&mut redis).await {
                    follower.fetch_max(now, Ordering::SeqCst);
                }
            }
        });
        Ok(Arc::new(Self { millis }))
    }
}

impl Clock for SharedRedisClock {
    fn now(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.millis.load(Ordering::SeqCst)).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let c = ManualClock::new(t0);
        assert_eq!(c.now(), t0);
        c.advance(Duration::days(30));
        assert_eq!(c.now(), t0 + Duration::days(30));
    }
}
