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
