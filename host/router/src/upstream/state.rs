//! The per-endpoint failure state machine: a rolling outcome window, the circuit breaker
//! (closed → open → half-open → closed) and passive outlier ejection with growing back-off.
//! Pure logic over explicit millisecond timestamps, so it is tested without sleeping.

use crate::config::{BreakerConfig, OutlierConfig};

/// Circuit state as exported in metrics (0, 1, 2) and snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Circuit {
    Closed = 0,
    HalfOpen = 1,
    Open = 2,
}

impl Circuit {
    pub fn from_u8(v: u8) -> Circuit {
        match v {
            0 => Circuit::Closed,
            1 => Circuit::HalfOpen,
            _ => Circuit::Open,
        }
    }
}

/// How an attempt ended, as the breaker and the ejector see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx/3xx.
    Success,
    /// 4xx: the request was bad, the endpoint is fine.
    ClientError,
    /// Connect error, reset, 5xx or timeout.
    ServerFailure,
    /// The client went away; says nothing about the endpoint.
    Cancelled,
}

const BUCKETS: usize = 10;

/// Success/failure counts over a rolling window, in `BUCKETS` slices.
#[derive(Debug)]
struct Window {
    slice_ms: u64,
    slots: [(u64, u32, u32); BUCKETS], // (slice number, total, failures)
}

impl Window {
    fn new(window_ms: u64) -> Window {
        Window { slice_ms: (window_ms / BUCKETS as u64).max(1), slots: [(u64::MAX, 0, 0); BUCKETS] }
    }

    fn add(&mut self, now_ms: u64, failed: bool) {
        let slice = now_ms / self.slice_ms;
        let slot = &mut self.slots[(slice % BUCKETS as u64) as usize];
        if slot.0 != slice {
            *slot = (slice, 0, 0);
        }
        slot.1 += 1;
        slot.2 += failed as u32;
    }

    fn totals(&self, now_ms: u64) -> (u32, u32) {
        let current = now_ms / self.slice_ms;
        self.slots
            .iter()
            .filter(|s| s.0 != u64::MAX && s.0 + BUCKETS as u64 > current)
            .fold((0, 0), |(t, f), s| (t + s.1, f + s.2))
    }

    fn clear(&mut self) {
        self.slots = [(u64::MAX, 0, 0); BUCKETS];
    }
}

/// What a recorded outcome changed, so the caller can update metrics and apply
/// model-wide rules (the ejection cap).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Effect {
    pub opened: bool,
    pub closed: bool,
    pub wants_ejection: bool,
}

#[derive(Debug)]
pub struct FailureState {
    breaker: BreakerConfig,
    outlier: OutlierConfig,
    window: Window,
    pub circuit: Circuit,
    pub open_until_ms: u64,
    probes_in_flight: u32,
    probe_successes: u32,
    consecutive_failures: u32,
    consecutive_successes: u32,
    /// How many ejections in a row; each doubles the next ejection time.
    ejection_level: u32,
    pub ejected_until_ms: u64,
}

/// Successes in a row that forgive one level of ejection back-off.
const SUCCESSES_TO_FORGIVE: u32 = 20;

impl FailureState {
    pub fn new(breaker: BreakerConfig, outlier: OutlierConfig) -> FailureState {
        FailureState {
            window: Window::new(breaker.window.as_millis() as u64),
            breaker,
            outlier,
            circuit: Circuit::Closed,
            open_until_ms: 0,
            probes_in_flight: 0,
            probe_successes: 0,
            consecutive_failures: 0,
            consecutive_successes: 0,
            ejection_level: 0,
            ejected_until_ms: 0,
        }
    }

    /// May an attempt start now? `Some(true)` is a half-open probe.
    pub fn admit(&mut self, now_ms: u64) -> Option<bool> {
        match self.circuit {
            Circuit::Closed => Some(false),
            Circuit::Open if now_ms < self.open_until_ms => None,
            Circuit::Open => {
                self.circuit = Circuit::HalfOpen;
                self.probes_in_flight = 1;
                self.probe_successes = 0;
                Some(true)
            }
            Circuit::HalfOpen if self.probes_in_flight < self.breaker.half_open_probes => {
                self.probes_in_flight += 1;
                Some(true)
            }
            Circuit::HalfOpen => None,
        }
    }

    pub fn record(&mut self, now_ms: u64, outcome: Outcome, probe: bool) -> Effect {
        let mut effect = Effect::default();
        if probe {
            self.probes_in_flight = self.probes_in_flight.saturating_sub(1);
        }
        let failed = match outcome {
            Outcome::Cancelled => return effect,
            Outcome::ServerFailure => true,
            Outcome::Success | Outcome::ClientError => false,
        };
        self.window.add(now_ms, failed);

        match (self.circuit, probe, failed) {
            (Circuit::HalfOpen, true, true) => {
                self.trip(now_ms);
                effect.opened = true;
            }
            (Circuit::HalfOpen, true, false) => {
                self.probe_successes += 1;
                if self.probe_successes >= self.breaker.close_after {
                    self.circuit = Circuit::Closed;
                    self.window.clear();
                    effect.closed = true;
                }
            }
            (Circuit::Closed, _, true) => {
                let (total, failures) = self.window.totals(now_ms);
                if total >= self.breaker.min_requests && failures as f64 >= self.breaker.failure_ratio * total as f64 {
                    self.trip(now_ms);
                    effect.opened = true;
                }
            }
            _ => {}
        }

        if failed {
            self.consecutive_successes = 0;
            self.consecutive_failures += 1;
            let threshold = self.outlier.consecutive_failures;
            if threshold > 0 && self.consecutive_failures >= threshold && now_ms >= self.ejected_until_ms {
                effect.wants_ejection = true;
            }
        } else {
            self.consecutive_failures = 0;
            self.consecutive_successes += 1;
            if self.ejection_level > 0 && self.consecutive_successes >= SUCCESSES_TO_FORGIVE {
                self.ejection_level -= 1;
                self.consecutive_successes = 0;
            }
        }
        effect
    }

    fn trip(&mut self, now_ms: u64) {
        self.circuit = Circuit::Open;
        self.open_until_ms = now_ms + self.breaker.open_for.as_millis() as u64;
        self.probe_successes = 0;
    }

    /// Ejects the endpoint; returns until when.
    pub fn eject(&mut self, now_ms: u64) -> u64 {
        let base = self.outlier.base_ejection.as_millis() as u64;
        let max = self.outlier.max_ejection.as_millis() as u64;
        let time = base.saturating_mul(1u64 << self.ejection_level.min(20)).min(max.max(base));
        self.ejection_level += 1;
        self.consecutive_failures = 0;
        self.ejected_until_ms = now_ms + time;
        self.ejected_until_ms
    }

    /// Forgets every failure: what a restarted endpoint starts from.
    pub fn reset(&mut self) {
        *self = FailureState::new(self.breaker.clone(), self.outlier.clone());
    }

    /// Failure share over the rolling window (0 when empty).
    pub fn error_rate(&self, now_ms: u64) -> f32 {
        let (total, failures) = self.window.totals(now_ms);
        if total == 0 { 0.0 } else { failures as f32 / total as f32 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn state(min_requests: u32, consecutive: u32) -> FailureState {
        FailureState::new(
            BreakerConfig {
                window: Duration::from_secs(10),
                min_requests,
                failure_ratio: 0.5,
                open_for: Duration::from_secs(5),
                half_open_probes: 1,
                close_after: 2,
            },
            OutlierConfig {
                consecutive_failures: consecutive,
                base_ejection: Duration::from_secs(1),
                max_ejection: Duration::from_secs(4),
                max_ejected_share: 0.5,
            },
        )
    }

    #[test]
    fn client_errors_never_open_the_circuit() {
        let mut s = state(4, 0);
        for t in 0..100 {
            assert_eq!(s.admit(t), Some(false));
            assert!(!s.record(t, Outcome::ClientError, false).opened);
        }
        assert_eq!(s.circuit, Circuit::Closed);
    }

    #[test]
    fn server_failures_open_then_half_open_probe_closes() {
        let mut s = state(4, 0);
        let mut opened = false;
        for t in 0..4 {
            s.admit(t);
            opened |= s.record(t, Outcome::ServerFailure, false).opened;
        }
        assert!(opened);
        assert_eq!(s.admit(100), None, "open circuit rejects");
        assert_eq!(s.admit(5_003), Some(true), "first probe after open_for");
        assert_eq!(s.admit(5_004), None, "only one probe at a time");
        assert!(!s.record(5_010, Outcome::Success, true).closed);
        assert_eq!(s.admit(5_011), Some(true));
        assert!(s.record(5_012, Outcome::Success, true).closed);
        assert_eq!(s.circuit, Circuit::Closed);
    }

    #[test]
    fn failed_probe_reopens() {
        let mut s = state(1, 0);
        s.admit(0);
        s.record(0, Outcome::ServerFailure, false);
        assert_eq!(s.admit(6_000), Some(true));
        assert!(s.record(6_001, Outcome::ServerFailure, true).opened);
        assert_eq!(s.admit(6_002), None);
        assert_eq!(s.open_until_ms, 11_001);
    }

    #[test]
    fn old_failures_leave_the_window() {
        let mut s = state(4, 0);
        for t in 0..3 {
            s.record(t, Outcome::ServerFailure, false);
        }
        // 20 s later the three failures are gone; one more does not reach min_requests.
        assert!(!s.record(20_000, Outcome::ServerFailure, false).opened);
        assert_eq!(s.error_rate(20_000), 1.0);
    }

    #[test]
    fn reset_forgets_ejections_and_the_open_circuit() {
        let mut f = state(2, 2);
        for _ in 0..4 {
            f.record(0, Outcome::ServerFailure, false);
        }
        assert_eq!(f.circuit, Circuit::Open);
        f.eject(0);
        f.eject(0);
        f.reset();
        assert_eq!(f.circuit, Circuit::Closed);
        assert_eq!((f.ejected_until_ms, f.consecutive_failures), (0, 0));
        assert_eq!(f.error_rate(0), 0.0);
        // Back-off starts again at its base.
        let base = f.outlier.base_ejection.as_millis() as u64;
        assert_eq!(f.eject(1_000), 1_000 + base);
    }

    #[test]
    fn ejection_backoff_doubles_and_is_capped() {
        let mut s = state(1000, 2);
        assert!(!s.record(0, Outcome::ServerFailure, false).wants_ejection);
        assert!(s.record(1, Outcome::ServerFailure, false).wants_ejection);
        assert_eq!(s.eject(1), 1_001);
        s.record(2_000, Outcome::ServerFailure, false);
        assert!(s.record(2_001, Outcome::ServerFailure, false).wants_ejection);
        assert_eq!(s.eject(2_001), 4_001);
        s.record(5_000, Outcome::ServerFailure, false);
        s.record(5_001, Outcome::ServerFailure, false);
        assert_eq!(s.eject(5_001), 9_001, "capped at max_ejection");
    }
}
