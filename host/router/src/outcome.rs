//! The last step of the request path: what a request's answer was, fed to the metrics.
//! (An attempt's outcome at its endpoint — health, breaker, EWMA — is recorded by
//! `upstream::Attempt::finish`.)

use std::sync::Arc;
use std::time::Instant;

use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge};

use crate::metrics::Metrics;
use crate::ratelimit::{ModelSlot, Permit, TokenCharge};

/// Per-model metric handles, resolved once at start.
pub struct ModelMetrics {
    pub model: String,
    /// Tells this model's entries apart in the per-thread counter cache.
    id: u64,
    pub requests: IntCounterVec,
    pub in_flight: IntGauge,
    pub duration: Histogram,
    pub ttfb: Histogram,
    pub retries: IntCounter,
    pub budget_exhausted: IntCounter,
    /// Streams continued on another endpoint after their upstream failed mid-stream.
    pub resumes: IntCounter,
}

impl ModelMetrics {
    pub fn new(m: &Metrics, model: &str) -> ModelMetrics {
        ModelMetrics {
            model: model.to_string(),
            id: {
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            },
            requests: m.requests.clone(),
            in_flight: m.in_flight.with_label_values(&[model]),
            duration: m.duration.with_label_values(&[model]),
            ttfb: m.ttfb.with_label_values(&[model]),
            retries: m.retries.with_label_values(&[model]),
            budget_exhausted: m.retry_budget_exhausted.with_label_values(&[model]),
            resumes: m.stream_resumes.with_label_values(&[model]),
        }
    }
}

/// One request's metrics, from admission to the last byte. In-flight while it lives.
pub struct RequestRecord {
    // The model's metrics live as long as the router (the process): no reference count.
    metrics: &'static ModelMetrics,
    started: Instant,
    endpoint: Option<&'static str>,
    status: u16,
    /// The request's admission slots, released when the record goes (the last byte, or the
    /// client leaving).
    _permit: Option<Arc<Permit>>,
    _slot: Option<ModelSlot>,
    /// The tenant's token charge, settled from the answer's usage when it has one.
    charge: Option<TokenCharge>,
}

impl RequestRecord {
    pub fn begin(metrics: &'static ModelMetrics, started: Instant) -> RequestRecord {
        metrics.in_flight.inc();
        RequestRecord { metrics, started, endpoint: None, status: 0, _permit: None, _slot: None, charge: None }
    }

    /// Holds the request's admission slots (and token charge) for as long as the record lives.
    pub fn with_admission(
        mut self,
        permit: Arc<Permit>,
        slot: Option<ModelSlot>,
        charge: Option<TokenCharge>,
    ) -> RequestRecord {
        self._permit = Some(permit);
        self._slot = slot;
        self.charge = charge;
        self
    }

    pub fn metrics(&self) -> &'static ModelMetrics {
        self.metrics
    }

    /// Whether the tenant's tokens are being counted (then the answer's usage is worth reading).
    pub fn counts_tokens(&self) -> bool {
        self.charge.is_some()
    }

    /// Replaces the admission estimate with the tokens the answer reports.
    pub fn settle_tokens(&mut self, used: u32) {
        if let Some(c) = self.charge.take() {
            c.settle(used);
        }
    }

    /// Corrects the charge from a stream: its reported usage when the upstream sent one,
    /// else the prompt estimate plus the content events relayed (one token each).
    pub fn settle_stream(&mut self, usage_total: Option<u32>, content_events: u32) {
        if let Some(c) = self.charge.take() {
            match usage_total {
                Some(used) => c.settle(used),
                None => c.settle_completion(content_events),
            }
        }
    }

    pub fn answered(&mut self, endpoint: Option<&'static str>, status: u16, first_byte: Instant) {
        self.endpoint = endpoint;
        self.status = status;
        self.metrics.ttfb.observe((first_byte - self.started).as_secs_f64());
    }

    /// Counts the request; `end` is when its last byte went out (None when the client left).
    pub fn finish(self, end: Option<Instant>) {
        let endpoint = self.endpoint.unwrap_or("none");
        let status = if end.is_none() && self.status == 200 { 499 } else { self.status };
        count_request(self.metrics, endpoint, status);
        if let Some(end) = end {
            self.metrics.duration.observe((end - self.started).as_secs_f64());
        }
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
    }
}

/// `switchyard_requests_total{model, endpoint, status}` += 1. Resolving the labels hashes
/// three strings and takes the vector's lock, so each worker thread keeps the counters it
/// has resolved; endpoint names live for the process, so their address identifies them.
fn count_request(metrics: &ModelMetrics, endpoint: &'static str, status: u16) {
    type Key = (u64, *const u8, u16);
    /// More distinct (model, endpoint, status) triples than this are counted uncached.
    const MAX_CACHED: usize = 256;
    thread_local! {
        static CACHE: std::cell::RefCell<Vec<(Key, IntCounter)>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let key: Key = (metrics.id, endpoint.as_ptr(), status);
    let resolve = || {
        let mut buf = itoa_buf();
        metrics.requests.with_label_values(&[metrics.model.as_str(), endpoint, status_str(status, &mut buf)])
    };
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some((_, c)) = cache.iter().find(|(k, _)| *k == key) {
            c.inc();
            return;
        }
        let c = resolve();
        c.inc();
        if cache.len() < MAX_CACHED {
            cache.push((key, c));
        }
    });
}

fn itoa_buf() -> [u8; 3] {
    [b'0'; 3]
}

fn status_str(status: u16, buf: &mut [u8; 3]) -> &str {
    let s = status.min(999);
    buf[0] = b'0' + (s / 100) as u8;
    buf[1] = b'0' + (s / 10 % 10) as u8;
    buf[2] = b'0' + (s % 10) as u8;
    std::str::from_utf8(buf).expect("ascii digits")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requests(m: &Metrics, model: &str, endpoint: &str, status: &str) -> u64 {
        m.requests.with_label_values(&[model, endpoint, status]).get()
    }

    #[test]
    fn the_per_thread_counter_cache_keeps_models_endpoints_and_statuses_apart() {
        // Two routers' worth of metrics in one thread, the same endpoint name and status:
        // a cache keyed on the name and status alone would count both in the first.
        let (m1, m2) = (Metrics::new(), Metrics::new());
        let (a, b): (&'static ModelMetrics, &'static ModelMetrics) =
            (Box::leak(Box::new(ModelMetrics::new(&m1, "m"))), Box::leak(Box::new(ModelMetrics::new(&m2, "m"))));
        let (ep1, ep2): (&'static str, &'static str) = ("e1", "e2");
        for _ in 0..3 {
            count_request(a, ep1, 200);
        }
        count_request(a, ep1, 503);
        count_request(a, ep2, 200);
        count_request(b, ep1, 200);
        assert_eq!(requests(&m1, "m", "e1", "200"), 3);
        assert_eq!(requests(&m1, "m", "e1", "503"), 1);
        assert_eq!(requests(&m1, "m", "e2", "200"), 1);
        assert_eq!(requests(&m2, "m", "e1", "200"), 1);
        assert_eq!(requests(&m2, "m", "e1", "503"), 0);
    }

    #[test]
    fn a_request_left_by_its_client_counts_as_499_and_frees_its_in_flight_slot() {
        let m = Metrics::new();
        let mm: &'static ModelMetrics = Box::leak(Box::new(ModelMetrics::new(&m, "m")));
        let mut record = RequestRecord::begin(mm, Instant::now());
        assert_eq!(mm.in_flight.get(), 1);
        record.answered(Some("e1"), 200, Instant::now());
        record.finish(None);
        assert_eq!(mm.in_flight.get(), 0);
        assert_eq!(requests(&m, "m", "e1", "499"), 1);
        assert_eq!(requests(&m, "m", "e1", "200"), 0);
    }
}
