//! The wall clock as it read at each moment of a run.
//!
//! Kafka stamps each record with the wall clock of the process that wrote it; the stand-in
//! providers note an `Instant` when they take a message. Turning those `Instant`s into wall
//! time with the clock as it reads at the end is wrong when the clock was stepped during the
//! run (a virtual machine's clock is corrected from its host's): every earlier moment moves by
//! the step, and messages sent seconds before a payment look sent after it. The trail samples
//! both clocks while the run goes and converts each moment with the offset of its time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often both clocks are read.
const EVERY: Duration = Duration::from_millis(10);
/// A change of offset between two readings larger than this is a step, not scheduling noise.
const STEP_MS: i64 = 20;

pub struct WallTrail {
    samples: Arc<Mutex<Vec<(Instant, i64)>>>,
    stop: Arc<AtomicBool>,
}

fn wall_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl WallTrail {
    pub fn start() -> Self {
        let samples = Arc::new(Mutex::new(vec![(Instant::now(), wall_now_ms())]));
        let stop = Arc::new(AtomicBool::new(false));
        let (into, stopped) = (samples.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                std::thread::sleep(EVERY);
                let sample = (Instant::now(), wall_now_ms());
                into.lock().unwrap_or_else(|p| p.into_inner()).push(sample);
            }
        });
        Self { samples, stop }
    }

    /// The wall clock's reading (ms since the epoch) at `at`, as it read then.
    pub fn wall_ms(&self, at: Instant) -> i64 {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        // The last reading at or before `at`, or the first one for a moment before the trail.
        let i = samples.partition_point(|(mono, _)| *mono <= at).saturating_sub(1);
        let (mono, wall) = samples[i];
        if at >= mono {
            wall + at.duration_since(mono).as_millis() as i64
        } else {
            wall - mono.duration_since(at).as_millis() as i64
        }
    }

    /// Each step of the wall clock seen so far: when (wall ms, after it) and by how much (ms).
    pub fn steps(&self) -> Vec<(i64, i64)> {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        samples
            .windows(2)
            .filter_map(|pair| {
                let [(mono_a, wall_a), (mono_b, wall_b)] = [pair[0], pair[1]];
                let expected = wall_a + mono_b.duration_since(mono_a).as_millis() as i64;
                let step = wall_b - expected;
                (step.abs() > STEP_MS).then_some((wall_b, step))
            })
            .collect()
    }
}

impl Drop for WallTrail {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_moment_is_converted_with_the_offset_of_its_time() {
        let t0 = Instant::now();
        let trail = WallTrail {
            samples: Arc::new(Mutex::new(vec![
                (t0, 1_000_000),
                (t0 + Duration::from_millis(100), 1_000_100),
                // The clock is stepped forward by 9 s here.
                (t0 + Duration::from_millis(200), 1_009_200),
            ])),
            stop: Arc::new(AtomicBool::new(true)),
        };
        assert_eq!(trail.wall_ms(t0 + Duration::from_millis(150)), 1_000_150);
        assert_eq!(trail.wall_ms(t0 + Duration::from_millis(250)), 1_009_250);
        assert_eq!(trail.steps(), vec![(1_009_200, 9_000)]);
    }
}
