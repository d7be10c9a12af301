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
    metrics: Arc<ModelMetrics>,
    started: Instant,
    endpoint: Option<Arc<str>>,
    status: u16,
    /// The request's admission slots, released when the record goes (the last byte, or the
    /// client leaving).
    _permit: Option<Arc<Permit>>,
    _slot: Option<ModelSlot>,
    /// The tenant's token charge, settled from the answer's usage when it has one.
    charge: Option<TokenCharge>,
}

impl RequestRecord {
    pub fn begin(metrics: &Arc<ModelMetrics>, started: Instant) -> RequestRecord {
        metrics.in_flight.inc();
        RequestRecord {
            metrics: metrics.clone(),
            started,
            endpoint: None,
            status: 0,
            _permit: None,
            _slot: None,
            charge: None,
        }
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

    pub fn metrics(&self) -> &Arc<ModelMetrics> {
        &self.metrics
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

    pub fn answered(&mut self, endpoint: Option<Arc<str>>, status: u16, first_byte: Instant) {
        self.endpoint = endpoint;
        self.status = status;
        self.metrics.ttfb.observe((first_byte - self.started).as_secs_f64());
    }

    /// Counts the request; `end` is when its last byte went out (None when the client left).
    pub fn finish(self, end: Option<Instant>) {
        let endpoint = self.endpoint.as_deref().unwrap_or("none");
        let status = if end.is_none() && self.status == 200 { 499 } else { self.status };
        let mut buf = itoa_buf();
        self.metrics
            .requests
            .with_label_values(&[self.metrics.model.as_str(), endpoint, status_str(status, &mut buf)])
            .inc();
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
