//! A token bucket per provider: `rate` sends per second on average, `burst` at once. Callers
//! wait for a token instead of being refused, so a burst of due messages is spread out rather
//! than bounced by the provider.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: f64) -> Self {
        let rate = if rate > 0.0 { rate } else { f64::INFINITY };
        let burst = burst.max(1.0);
        Self {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes a token now, or says how long until one is available.
    fn try_take(&self, now: Instant) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = *state;
        let refilled = (tokens + now.saturating_duration_since(last).as_secs_f64() * self.rate).min(self.burst);
        if refilled >= 1.0 {
            *state = (refilled - 1.0, now);
            Ok(())
        } else {
            *state = (refilled, now);
            Err(Duration::from_secs_f64((1.0 - refilled) / self.rate))
        }
    }

    /// Waits until a token is available and takes it.
    pub async fn acquire(&self) {
        while let Err(wait) = self.try_take(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_the_burst_then_one_token_per_interval() {
        let bucket = TokenBucket::new(10.0, 3.0);
        let start = Instant::now();
        for _ in 0..3 {
            assert!(bucket.try_take(start).is_ok());
        }
        let wait = bucket.try_take(start).expect_err("empty");
        assert!(
            wait <= Duration::from_millis(100) && wait > Duration::from_millis(90),
            "{wait:?}"
        );
        assert!(bucket.try_take(start + Duration::from_millis(100)).is_ok());
        assert!(bucket.try_take(start + Duration::from_millis(150)).is_err());
        // Never more than the burst, however long it was idle.
        let later = start + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(bucket.try_take(later).is_ok());
        }
        assert!(bucket.try_take(later).is_err());
    }
}
