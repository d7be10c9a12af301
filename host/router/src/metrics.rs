//! Prometheus metrics: one registry per router, families declared here, handles that the
//! hot path touches resolved once per endpoint (label lookups are not free).

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub ttfb: HistogramVec,
    pub in_flight: IntGaugeVec,
    pub endpoint_in_flight: IntGaugeVec,
    pub endpoint_healthy: IntGaugeVec,
    pub endpoint_circuit: IntGaugeVec,
    pub endpoint_ejected: IntGaugeVec,
    pub retries: IntCounterVec,
    pub retry_budget_exhausted: IntCounterVec,
    pub ejections: IntCounterVec,
    pub circuit_opened: IntCounterVec,
    pub health_checks: IntCounterVec,
    pub degraded: IntCounterVec,
    pub stream_resumes: IntCounterVec,
    pub version_requests: IntCounterVec,
    pub version_errors: IntCounterVec,
    pub canary_routed: IntCounterVec,
    pub geo_routed: IntCounterVec,
    pub region_up: IntGaugeVec,
}

/// Latency buckets from 0.5 ms to 2 minutes: LLM calls span local fast paths to long generations.
const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()), &["model"])
                .expect("valid metric");
            registry.register(Box::new(h.clone())).expect("unique metric");
            h
        };
        Metrics {
            requests: counter(
                "switchyard_requests_total",
                "Requests answered, by model, serving endpoint and HTTP status",
                &["model", "endpoint", "status"],
            ),
            duration: histogram(
                "switchyard_request_duration_seconds",
                "Time from request to the last byte of the response",
            ),
            ttfb: histogram(
                "switchyard_time_to_first_byte_seconds",
                "Time from request to the first body byte sent to the client",
            ),
            in_flight: gauge("switchyard_in_flight_requests", "Requests being served, by model", &["model"]),
            endpoint_in_flight: gauge(
                "switchyard_endpoint_in_flight_requests",
                "Requests outstanding at each endpoint",
                &["model", "endpoint"],
            ),
            endpoint_healthy: gauge(
                "switchyard_endpoint_healthy",
                "1 when the endpoint passes active health checks",
                &["model", "endpoint"],
            ),
            endpoint_circuit: gauge(
                "switchyard_endpoint_circuit_state",
                "Circuit breaker state: 0 closed, 1 half-open, 2 open",
                &["model", "endpoint"],
            ),
            endpoint_ejected: gauge(
                "switchyard_endpoint_ejected",
                "1 while passive outlier detection has ejected the endpoint",
                &["model", "endpoint"],
            ),
            retries: counter("switchyard_retries_total", "Attempts beyond the first, by model", &["model"]),
            retry_budget_exhausted: counter(
                "switchyard_retry_budget_exhausted_total",
                "Retries refused because the retry budget was spent",
                &["model"],
            ),
            ejections: counter(
                "switchyard_endpoint_ejections_total",
                "Outlier ejections after consecutive server-side failures",
                &["model", "endpoint"],
            ),
            circuit_opened: counter(
                "switchyard_circuit_opened_total",
                "Times a circuit breaker opened",
                &["model", "endpoint"],
            ),
            health_checks: counter(
                "switchyard_health_checks_total",
                "Active health checks by result",
                &["model", "endpoint", "result"],
            ),
            degraded: counter(
                "switchyard_degraded_total",
                "Requests answered in degraded mode, by requested model and how (fallback-model, rule-based)",
                &["model", "mode"],
            ),
            stream_resumes: counter(
                "switchyard_stream_resumes_total",
                "Streams continued on another endpoint after their upstream failed mid-stream",
                &["model"],
            ),
            version_requests: counter(
                "switchyard_version_requests_total",
                "Attempts answered by endpoints of each version (label `version`), for canary decisions",
                &["model", "version"],
            ),
            version_errors: counter(
                "switchyard_version_errors_total",
                "Server-side failures of endpoints of each version",
                &["model", "version"],
            ),
            canary_routed: counter(
                "switchyard_canary_routed_total",
                "Requests the canary stage assigned to each version",
                &["model", "version"],
            ),
            geo_routed: counter(
                "switchyard_geo_routed_total",
                "Requests by the region that served them (local or forwarded) and the outcome of forwarding",
                &["model", "region", "result"],
            ),
            region_up: gauge(
                "switchyard_region_up",
                "1 while another region's router answers its probes as ready",
                &["region"],
            ),
            registry,
        }
    }

    pub fn endpoint(&self, model: &str, endpoint: &str) -> EndpointMetrics {
        let l = &[model, endpoint];
        EndpointMetrics {
            in_flight: self.endpoint_in_flight.with_label_values(l),
            healthy: self.endpoint_healthy.with_label_values(l),
            circuit: self.endpoint_circuit.with_label_values(l),
            ejected: self.endpoint_ejected.with_label_values(l),
            ejections: self.ejections.with_label_values(l),
            circuit_opened: self.circuit_opened.with_label_values(l),
            check_ok: self.health_checks.with_label_values(&[model, endpoint, "ok"]),
            check_failed: self.health_checks.with_label_values(&[model, endpoint, "failed"]),
        }
    }

    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Per-endpoint handles, resolved once.
pub struct EndpointMetrics {
    pub in_flight: IntGauge,
    pub healthy: IntGauge,
    pub circuit: IntGauge,
    pub ejected: IntGauge,
    pub ejections: IntCounter,
    pub circuit_opened: IntCounter,
    pub check_ok: IntCounter,
    pub check_failed: IntCounter,
}
