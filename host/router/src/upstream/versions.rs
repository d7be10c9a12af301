//! Per-version statistics of a model (endpoints labelled `version = "..."`), kept for
//! canary decisions: requests and server-side failures since start, and the p99 latency
//! of the recent window.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use prometheus::IntCounter;

use super::state::Outcome;
use crate::metrics::Metrics;
use crate::plugin::runtime::wit;

/// Latency histogram buckets: 4 per power of two of microseconds, up to 2^40 µs.
const BUCKETS: usize = 160;

/// p99 covers the current window and the one before it, so it never rests on a handful of
/// samples right after a rotation.
const WINDOW_MS: u64 = 30_000;

pub struct VersionStats {
    pub name: String,
    requests: AtomicU64,
    errors: AtomicU64,
    latency: Mutex<Window>,
    requests_metric: IntCounter,
    errors_metric: IntCounter,
    /// Requests the canary stage sent to this version.
    pub routed: IntCounter,
}

struct Window {
    started_ms: u64,
    current: [u32; BUCKETS],
    previous: [u32; BUCKETS],
}

/// Log-linear bucket of a latency: 4 sub-buckets per octave.
fn bucket(us: u64) -> usize {
    if us < 4 {
        return us as usize;
    }
    let octave = 63 - us.leading_zeros() as usize; // ≥ 2
    let sub = ((us >> (octave - 2)) & 3) as usize;
    (octave * 4 + sub - 4).min(BUCKETS - 1)
}

/// Upper bound of a bucket, in microseconds.
fn bucket_upper(b: usize) -> u64 {
    if b < 4 {
        return b as u64;
    }
    let octave = (b + 4) / 4;
    let sub = ((b + 4) % 4) as u64;
    ((4 + sub + 1) << (octave - 2)) - 1
}

impl VersionStats {
    pub fn new(metrics: &Metrics, model: &str, name: &str) -> VersionStats {
        VersionStats {
            name: name.to_string(),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: Mutex::new(Window { started_ms: 0, current: [0; BUCKETS], previous: [0; BUCKETS] }),
            requests_metric: metrics.version_requests.with_label_values(&[model, name]),
            errors_metric: metrics.version_errors.with_label_values(&[model, name]),
            routed: metrics.canary_routed.with_label_values(&[model, name]),
        }
    }

    /// Counts one finished attempt. Cancelled attempts say nothing about the version.
    pub fn record(&self, now_ms: u64, outcome: Outcome, latency: Duration) {
        if outcome == Outcome::Cancelled {
            return;
        }
        self.requests.fetch_add(1, Relaxed);
        self.requests_metric.inc();
        if outcome == Outcome::ServerFailure {
            self.errors.fetch_add(1, Relaxed);
            self.errors_metric.inc();
        }
        let b = bucket(latency.as_micros().min(u64::MAX as u128) as u64);
        let mut w = self.latency.lock().unwrap();
        w.rotate(now_ms);
        w.current[b] = w.current[b].saturating_add(1);
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Relaxed)
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Relaxed)
    }

    /// p99 latency of the recent window in microseconds (0 without samples).
    pub fn p99_us(&self, now_ms: u64) -> u32 {
        let mut w = self.latency.lock().unwrap();
        w.rotate(now_ms);
        let total: u64 = w.current.iter().chain(&w.previous).map(|&c| c as u64).sum();
        if total == 0 {
            return 0;
        }
        let rank = total - total / 100; // the sample at the 99th percentile, 1-based
        let mut seen = 0u64;
        for b in 0..BUCKETS {
            seen += w.current[b] as u64 + w.previous[b] as u64;
            if seen >= rank {
                return bucket_upper(b).min(u32::MAX as u64) as u32;
            }
        }
        u32::MAX
    }

    pub fn wit(&self, now_ms: u64) -> wit::VersionStats {
        wit::VersionStats { requests: self.requests(), errors: self.errors(), p99_latency_us: self.p99_us(now_ms) }
    }
}

impl Window {
    fn rotate(&mut self, now_ms: u64) {
        if now_ms >= self.started_ms + WINDOW_MS {
            // A long quiet spell forgets both windows.
            self.previous = if now_ms >= self.started_ms + 2 * WINDOW_MS { [0; BUCKETS] } else { self.current };
            self.current = [0; BUCKETS];
            self.started_ms = now_ms;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_bound_their_values_within_a_quarter_octave() {
        for us in [0u64, 1, 3, 4, 5, 7, 8, 100, 999, 1_000, 250_000, 10_000_000] {
            let b = bucket(us);
            assert!(bucket_upper(b) >= us, "{us} in bucket {b} bounded by {}", bucket_upper(b));
            if us >= 4 {
                assert!(bucket_upper(b) as f64 <= us as f64 * 1.25 + 1.0, "{us}: bound {}", bucket_upper(b));
                assert!(b == 0 || bucket_upper(b - 1) < us);
            }
        }
    }

    #[test]
    fn p99_follows_the_slow_tail_and_forgets_old_windows() {
        let m = Metrics::new();
        let v = VersionStats::new(&m, "m", "v1");
        for _ in 0..990 {
            v.record(1_000, Outcome::Success, Duration::from_millis(10));
        }
        for _ in 0..10 {
            v.record(1_000, Outcome::ServerFailure, Duration::from_millis(800));
        }
        let p99 = v.p99_us(1_000);
        assert!((10_000..=12_500).contains(&p99), "p99 {p99} µs: 1% slow is the 99th percentile's edge");
        for _ in 0..30 {
            v.record(2_000, Outcome::Success, Duration::from_millis(900));
        }
        assert!(v.p99_us(2_000) >= 800_000, "3% slow samples put p99 in the slow bucket");
        assert_eq!((v.requests(), v.errors()), (1030, 10));
        v.record(2_000, Outcome::Cancelled, Duration::from_secs(5));
        assert_eq!(v.requests(), 1030, "cancelled attempts are not counted");
        assert_eq!(v.p99_us(2_000 + 2 * WINDOW_MS), 0, "a quiet minute forgets the latency window");
    }
}
