//! Counters and latency histograms shared by the worker tasks of one run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use hyper::StatusCode;

/// Highest latency the histograms track exactly (larger values are clamped): 60 s in µs.
const MAX_US: u64 = 60_000_000;
/// Distinct error messages kept for the report.
const KEEP_ERRORS: usize = 3;

pub struct Stats {
    /// Latency of 2xx responses, µs.
    pub latency: Histogram<u64>,
    /// Responses by status that were not 2xx.
    pub non_2xx: BTreeMap<u16, u64>,
    /// Transport failures: refused or reset connections, timeouts, malformed responses.
    pub errors: u64,
    pub error_samples: Vec<String>,
    /// Completed responses of any status.
    pub responses: u64,
    /// When the last recorded response completed.
    pub last_done: Option<Instant>,
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            latency: histogram(),
            non_2xx: BTreeMap::new(),
            errors: 0,
            error_samples: Vec::new(),
            responses: 0,
            last_done: None,
        }
    }

    pub fn record(&mut self, result: &anyhow::Result<StatusCode>, latency: Duration, done: Instant) {
        match result {
            Ok(status) => {
                self.responses += 1;
                if status.is_success() {
                    self.latency.saturating_record(micros(latency));
                } else {
                    *self.non_2xx.entry(status.as_u16()).or_default() += 1;
                }
            }
            Err(e) => {
                self.errors += 1;
                let msg = format!("{e:#}");
                if self.error_samples.len() < KEEP_ERRORS && !self.error_samples.contains(&msg) {
                    self.error_samples.push(msg);
                }
            }
        }
        self.last_done = Some(self.last_done.map_or(done, |d| d.max(done)));
    }

    pub fn non_2xx_total(&self) -> u64 {
        self.non_2xx.values().sum()
    }

    pub fn ok(&self) -> u64 {
        self.latency.len()
    }

    /// Human-readable breakdown of non-2xx statuses and error samples (empty when clean).
    pub fn problems(&self) -> String {
        let mut s = String::new();
        for (code, n) in &self.non_2xx {
            let _ = writeln!(s, "  status {code}: {n}");
        }
        for e in &self.error_samples {
            let _ = writeln!(s, "  error: {e}");
        }
        s
    }
}

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds")
}

pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Percentile of a histogram, 0 when it is empty.
pub fn pct(h: &Histogram<u64>, p: f64) -> u64 {
    if h.is_empty() { 0 } else { h.value_at_quantile(p / 100.0) }
}

/// Escapes a string for a JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `{"404":3,"502":1}`
pub fn json_status_map(m: &BTreeMap<u16, u64>) -> String {
    let inner: Vec<String> = m.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
    format!("{{{}}}", inner.join(","))
}

pub fn json_str_list(v: &[String]) -> String {
    let inner: Vec<String> = v.iter().map(|s| json_str(s)).collect();
    format!("[{}]", inner.join(","))
}
