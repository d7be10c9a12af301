//! Prometheus metrics of a replica (exposed by the head on `GET /metrics`).

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub tokens_generated: IntCounter,
    pub prompt_tokens: IntCounter,
    pub requests: IntCounterVec,
    pub ttft: Histogram,
    pub tokens_per_second: Gauge,
    pub queue_depth: IntGauge,
    pub active: IntGauge,
    pub batch_size: Histogram,
    pub step_seconds: Histogram,
    pub ready: IntGauge,
    pub stages_connected: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let tokens_generated =
            IntCounter::new("switchyard_shard_tokens_generated_total", "Completion tokens generated").unwrap();
        let prompt_tokens = IntCounter::new("switchyard_shard_prompt_tokens_total", "Prompt tokens processed").unwrap();
        let requests = IntCounterVec::new(
            Opts::new("switchyard_shard_requests_total", "Generation requests by outcome"),
            &["outcome"],
        )
        .unwrap();
        let ttft = Histogram::with_opts(
            HistogramOpts::new("switchyard_shard_time_to_first_token_seconds", "Time from arrival to first token")
                .buckets(vec![0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        )
        .unwrap();
        let tokens_per_second = Gauge::new(
            "switchyard_shard_tokens_per_second",
            "Aggregate generated tokens per second over the last few seconds",
        )
        .unwrap();
        let queue_depth = IntGauge::new("switchyard_shard_queue_depth", "Requests waiting to join the batch").unwrap();
        let active = IntGauge::new("switchyard_shard_active_sequences", "Sequences in the running batch").unwrap();
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("switchyard_shard_batch_size", "Sequences per forward step")
                .buckets(vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0]),
        )
        .unwrap();
        let step_seconds = Histogram::with_opts(
            HistogramOpts::new("switchyard_shard_step_seconds", "Duration of one forward step through the pipeline")
                .buckets(prometheus::exponential_buckets(0.005, 2.0, 12).unwrap()),
        )
        .unwrap();
        let ready = IntGauge::new("switchyard_shard_ready", "1 while the replica is ready").unwrap();
        let stages_connected =
            IntGauge::new("switchyard_shard_stages_connected", "Downstream pipeline stages connected").unwrap();
        for c in [
            Box::new(tokens_generated.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(prompt_tokens.clone()),
            Box::new(requests.clone()),
            Box::new(ttft.clone()),
            Box::new(tokens_per_second.clone()),
            Box::new(queue_depth.clone()),
            Box::new(active.clone()),
            Box::new(batch_size.clone()),
            Box::new(step_seconds.clone()),
            Box::new(ready.clone()),
            Box::new(stages_connected.clone()),
        ] {
            registry.register(c).unwrap();
        }
        Self {
            registry,
            tokens_generated,
            prompt_tokens,
            requests,
            ttft,
            tokens_per_second,
            queue_depth,
            active,
            batch_size,
            step_seconds,
            ready,
            stages_connected,
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).unwrap();
        String::from_utf8(buf).unwrap()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
