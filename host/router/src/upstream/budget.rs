//! The retry budget: retries may add at most `ratio` of a model's traffic, plus a small
//! per-second allowance, so failover cannot amplify an outage into a retry storm.

use std::sync::Mutex;

use crate::config::RetryConfig;

#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    per_sec: f64,
    /// Retries that may be spent right now, capped at `cap`.
    state: Mutex<(f64, u64)>, // (tokens, last refill ms)
    cap: f64,
}

impl RetryBudget {
    pub fn new(cfg: &RetryConfig) -> RetryBudget {
        let per_sec = cfg.min_retries_per_sec as f64;
        // A burst of up to ten seconds of the floor, or 100 deposits, whichever is larger.
        let cap = (per_sec * 10.0).max(100.0 * cfg.ratio_or_zero());
        RetryBudget { ratio: cfg.budget_ratio, per_sec, state: Mutex::new((per_sec.min(cap), 0)), cap }
    }

    /// Every first attempt deposits `ratio` of a retry.
    pub fn deposit(&self, now_ms: u64) {
        let mut s = self.state.lock().unwrap();
        Self::refill(&mut s, now_ms, self.per_sec, self.cap);
        s.0 = (s.0 + self.ratio).min(self.cap);
    }

    /// Takes one retry from the budget, if there is one.
    pub fn try_withdraw(&self, now_ms: u64) -> bool {
        let mut s = self.state.lock().unwrap();
        Self::refill(&mut s, now_ms, self.per_sec, self.cap);
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }

    fn refill(s: &mut (f64, u64), now_ms: u64, per_sec: f64, cap: f64) {
        if now_ms > s.1 {
            s.0 = (s.0 + (now_ms - s.1) as f64 * per_sec / 1000.0).min(cap);
            s.1 = now_ms;
        }
    }
}

impl RetryConfig {
    fn ratio_or_zero(&self) -> f64 {
        self.budget_ratio.max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_bounded_by_ratio_of_traffic() {
        let b = RetryBudget::new(&RetryConfig {
            max_attempts: 3,
            budget_ratio: 0.2,
            min_retries_per_sec: 0,
            ..RetryConfig::default()
        });
        let mut granted = 0;
        for _ in 0..1000 {
            b.deposit(0);
            if b.try_withdraw(0) {
                granted += 1;
            }
        }
        assert!((195..=200).contains(&granted), "granted {granted}");
    }

    #[test]
    fn floor_refills_over_time() {
        let b = RetryBudget::new(&RetryConfig {
            max_attempts: 3,
            budget_ratio: 0.0,
            min_retries_per_sec: 5,
            ..RetryConfig::default()
        });
        while b.try_withdraw(0) {}
        assert!(!b.try_withdraw(100));
        assert!(b.try_withdraw(1_000));
    }
}
