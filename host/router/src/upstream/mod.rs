//! Upstream endpoints and their live state: in-flight count, EWMA latency, active health,
//! circuit breaker and outlier ejection. The hot path reads atomics only; a mutex guards the
//! failure state machine, which changes once per finished attempt.

pub mod budget;
pub mod health;
pub mod state;
pub mod versions;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::config::{EndpointConfig, ModelConfig, UpstreamUrl};
use crate::metrics::{EndpointMetrics, Metrics};
use budget::RetryBudget;
use state::FailureState;
pub use state::{Circuit, Outcome};
use versions::VersionStats;

/// Milliseconds since the router started: the clock of every timestamp kept in atomics.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// EWMA smoothing for latency samples.
const EWMA_ALPHA: f64 = 0.2;

/// Half-life of a latency estimate that receives no new samples.
const EWMA_HALF_LIFE_MS: f64 = 2_000.0;

pub struct Endpoint {
    pub index: usize,
    /// Endpoints are fixed at start, so the name is kept for the process: per-request
    /// records copy it without writing a shared reference count.
    pub name: &'static str,
    /// The name as the `x-switchyard-endpoint` header value (over the same text).
    pub header_value: http::HeaderValue,
    pub url: UpstreamUrl,
    /// Where the client sends this endpoint's requests.
    pub target: crate::client::Target,
    pub region: String,
    pub weight: u32,
    pub labels: BTreeMap<String, String>,
    /// Active health check path (the model's, unless the endpoint overrides it).
    pub health_path: Option<String>,
    in_flight: AtomicU32,
    /// f64 bits, microseconds.
    ewma_us: AtomicU64,
    /// When `ewma_us` last took a sample (ms, `now_ms` clock).
    ewma_at_ms: AtomicU64,
    /// f32 bits.
    error_rate: AtomicU32,
    healthy: AtomicBool,
    circuit: AtomicU8,
    ejected_until_ms: AtomicU64,
    failure: Mutex<FailureState>,
    pub metrics: EndpointMetrics,
}

/// What a selector sees of one endpoint: plain numbers, cheap to copy and to hand to a plugin.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EndpointSnapshot {
    pub index: u32,
    /// Healthy, circuit not open (or due for a probe), and not ejected.
    pub available: bool,
    pub healthy: bool,
    pub circuit: Circuit,
    pub in_flight: u32,
    pub ewma_latency_us: f64,
    pub error_rate: f32,
    pub weight: u32,
}

/// A started attempt. Dropping it without `finish` counts as cancelled.
pub struct Attempt {
    // Pools live as long as the router, which lives as long as the process: borrowing them
    // for `'static` writes no reference count per attempt (cloning an `Arc` would, on a
    // cache line every worker writes).
    endpoint: &'static Endpoint,
    pool: &'static Pool,
    probe: bool,
    started: Instant,
    done: bool,
}

impl Attempt {
    pub fn endpoint(&self) -> &'static Endpoint {
        self.endpoint
    }

    /// Records how the attempt went. `latency` overrides the measured time (streams report
    /// their time to first byte, which says more about the endpoint than stream length).
    pub fn finish(mut self, outcome: Outcome, latency: Option<Duration>) {
        self.done = true;
        let latency = latency.unwrap_or_else(|| self.started.elapsed());
        self.pool.record(self.endpoint, outcome, self.probe, latency);
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Relaxed);
        self.endpoint.metrics.in_flight.dec();
        if !self.done {
            self.pool.record(self.endpoint, Outcome::Cancelled, self.probe, Duration::ZERO);
        }
    }
}

impl Endpoint {
    fn new(index: usize, model: &str, cfg: &EndpointConfig, m: &ModelConfig, metrics: &Metrics) -> Endpoint {
        let name: &'static str = Box::leak(cfg.display_name().into_boxed_str());
        let em = metrics.endpoint(model, name);
        em.healthy.set(!cfg.start_unready as i64);
        Endpoint {
            index,
            url: cfg.url.clone(),
            region: cfg.region.clone(),
            weight: cfg.weight,
            labels: cfg.labels.clone(),
            health_path: cfg.health_path.clone(),
            in_flight: AtomicU32::new(0),
            ewma_us: AtomicU64::new(0f64.to_bits()),
            ewma_at_ms: AtomicU64::new(0),
            error_rate: AtomicU32::new(0f32.to_bits()),
            // Optimistic until the first check says otherwise: a restarted router serves at once.
            healthy: AtomicBool::new(!cfg.start_unready),
            circuit: AtomicU8::new(Circuit::Closed as u8),
            ejected_until_ms: AtomicU64::new(0),
            failure: Mutex::new(FailureState::new(m.circuit_breaker.clone(), m.outlier.clone())),
            metrics: em,
            header_value: http::HeaderValue::from_maybe_shared(bytes::Bytes::from_static(name.as_bytes()))
                .unwrap_or_else(|_| http::HeaderValue::from_static("invalid-name")),
            target: crate::client::Target::for_process(&cfg.url.authority),
            name,
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Relaxed)
    }

    pub fn circuit(&self) -> Circuit {
        Circuit::from_u8(self.circuit.load(Relaxed))
    }

    pub fn is_ejected(&self, now_ms: u64) -> bool {
        now_ms < self.ejected_until_ms.load(Relaxed)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }

    pub fn ewma_latency_us(&self) -> f64 {
        f64::from_bits(self.ewma_us.load(Relaxed))
    }

    /// The EWMA as selection sees it: a stale estimate fades (half-life `EWMA_HALF_LIFE_MS`)
    /// so an endpoint that once looked slow, and so got no traffic to correct that, is
    /// tried again instead of being starved.
    fn ewma_for_selection(&self, now_ms: u64) -> f64 {
        let age = now_ms.saturating_sub(self.ewma_at_ms.load(Relaxed)) as f64;
        self.ewma_latency_us() * (-age * std::f64::consts::LN_2 / EWMA_HALF_LIFE_MS).exp()
    }

    pub(crate) fn set_healthy(&self, healthy: bool) {
        if self.healthy.swap(healthy, Relaxed) != healthy {
            self.metrics.healthy.set(healthy as i64);
            tracing::warn!(endpoint = %self.name, healthy, "endpoint health changed");
            if healthy {
                self.forgive();
            }
        }
    }

    /// An endpoint that the active checks saw go down and come back (typically a process
    /// that crashed and was restarted) starts over: not ejected, circuit closed, failure
    /// window empty, ejection back-off at its base, latency unmeasured. Without this, a
    /// restarted replica would sit out the back-off its predecessor earned, up to
    /// `max_ejection`. An endpoint that fails requests while passing its checks never goes
    /// down here, so passive ejection and the breaker still contain it.
    fn forgive(&self) {
        let mut f = self.failure.lock().unwrap();
        f.reset();
        self.circuit.store(f.circuit as u8, Relaxed);
        self.metrics.circuit.set(f.circuit as i64);
        self.ejected_until_ms.store(0, Relaxed);
        self.metrics.ejected.set(0);
        self.error_rate.store(0f32.to_bits(), Relaxed);
        // Its latency estimate was inflated by the failures: unmeasured again.
        self.ewma_us.store(0f64.to_bits(), Relaxed);
    }

    fn snapshot(&self, now_ms: u64) -> EndpointSnapshot {
        let healthy = self.is_healthy();
        let circuit = self.circuit();
        let circuit_ok = match circuit {
            Circuit::Closed | Circuit::HalfOpen => true,
            // An open circuit whose time is up is worth a probe.
            Circuit::Open => now_ms >= self.failure.lock().unwrap().open_until_ms,
        };
        EndpointSnapshot {
            index: self.index as u32,
            available: healthy && circuit_ok && !self.is_ejected(now_ms),
            healthy,
            circuit,
            in_flight: self.in_flight(),
            ewma_latency_us: self.ewma_for_selection(now_ms),
            error_rate: f32::from_bits(self.error_rate.load(Relaxed)),
            weight: self.weight,
        }
    }

    /// Milliseconds until this endpoint may take traffic again (for `Retry-After`).
    fn recovers_in_ms(&self, now_ms: u64) -> u64 {
        let ejected = self.ejected_until_ms.load(Relaxed).saturating_sub(now_ms);
        let open = match self.circuit() {
            Circuit::Open => self.failure.lock().unwrap().open_until_ms.saturating_sub(now_ms),
            _ => 0,
        };
        ejected.max(open)
    }
}

/// One model's endpoints plus the model-wide pieces: retry budget and ejection cap.
pub struct Pool {
    pub model: String,
    pub endpoints: Vec<Arc<Endpoint>>,
    pub budget: RetryBudget,
    /// Statistics per version (numbered as the policies number them) and each endpoint's
    /// version.
    pub versions: Vec<VersionStats>,
    pub version_of: Vec<u32>,
    max_ejected_share: f64,
}

impl Pool {
    pub fn new(cfg: &ModelConfig, metrics: &Metrics) -> Pool {
        let model = cfg.name.get_ref().clone();
        let endpoints = cfg
            .endpoints
            .get_ref()
            .iter()
            .enumerate()
            .map(|(i, e)| Arc::new(Endpoint::new(i, &model, e, cfg, metrics)))
            .collect();
        let (names, version_of) = cfg.versions();
        Pool {
            versions: names.iter().map(|v| VersionStats::new(metrics, &model, v)).collect(),
            version_of,
            model,
            endpoints,
            budget: RetryBudget::new(&cfg.retry),
            max_ejected_share: cfg.outlier.max_ejected_share,
        }
    }

    pub fn snapshot_into(&self, now_ms: u64, out: &mut Vec<EndpointSnapshot>) {
        out.clear();
        out.extend(self.endpoints.iter().map(|e| e.snapshot(now_ms)));
    }

    /// Per-version statistics as the canary stage receives them.
    pub fn version_stats(&self, now_ms: u64) -> Vec<crate::plugin::runtime::wit::VersionStats> {
        self.versions.iter().map(|v| v.wit(now_ms)).collect()
    }

    pub fn any_available(&self, now_ms: u64) -> bool {
        self.endpoints.iter().any(|e| e.snapshot(now_ms).available)
    }

    /// Seconds a client should wait before retrying when nothing is available (1..=30).
    pub fn retry_after_secs(&self, now_ms: u64) -> u64 {
        let soonest = self.endpoints.iter().map(|e| e.recovers_in_ms(now_ms)).min().unwrap_or(0);
        soonest.div_ceil(1000).clamp(1, 30)
    }

    /// Starts an attempt on `endpoint` if its circuit lets it (half-open allows few probes).
    pub fn start(&'static self, endpoint: &'static Endpoint) -> Option<Attempt> {
        let probe = if endpoint.circuit() == Circuit::Closed {
            false
        } else {
            let now = now_ms();
            let mut f = endpoint.failure.lock().unwrap();
            let probe = f.admit(now)?;
            endpoint.circuit.store(f.circuit as u8, Relaxed);
            endpoint.metrics.circuit.set(f.circuit as i64);
            probe
        };
        endpoint.in_flight.fetch_add(1, Relaxed);
        endpoint.metrics.in_flight.inc();
        Some(Attempt { endpoint, pool: self, probe, started: Instant::now(), done: false })
    }

    fn record(&self, ep: &Endpoint, outcome: Outcome, probe: bool, latency: Duration) {
        let now = now_ms();
        let sample = latency.as_secs_f64() * 1e6;
        let mut f = ep.failure.lock().unwrap();
        let effect = f.record(now, outcome, probe);
        if let Some(v) = self.version_of.get(ep.index).and_then(|&v| self.versions.get(v as usize)) {
            v.record(now, outcome, latency);
        }
        ep.error_rate.store(f.error_rate(now).to_bits(), Relaxed);
        if outcome != Outcome::Cancelled {
            let old = ep.ewma_for_selection(now);
            // A failure that came back fast (connection refused) must not make the endpoint
            // look attractive: it costs at least twice the current estimate.
            let sample = if outcome == Outcome::ServerFailure { sample.max(old * 2.0) } else { sample };
            let new = if old == 0.0 { sample } else { old + EWMA_ALPHA * (sample - old) };
            ep.ewma_us.store(new.to_bits(), Relaxed);
            ep.ewma_at_ms.store(now, Relaxed);
        }
        if effect.opened || effect.closed {
            ep.circuit.store(f.circuit as u8, Relaxed);
            ep.metrics.circuit.set(f.circuit as i64);
            if effect.opened {
                ep.metrics.circuit_opened.inc();
                tracing::warn!(model = %self.model, endpoint = %ep.name, "circuit opened");
            } else {
                tracing::info!(model = %self.model, endpoint = %ep.name, "circuit closed");
            }
        }
        if effect.wants_ejection {
            let ejected = self.endpoints.iter().filter(|e| e.index != ep.index && e.is_ejected(now)).count();
            let allowed = (self.max_ejected_share * self.endpoints.len() as f64).floor() as usize;
            if ejected < allowed {
                let until = f.eject(now);
                ep.ejected_until_ms.store(until, Relaxed);
                ep.metrics.ejections.inc();
                ep.metrics.ejected.set(1);
                tracing::warn!(model = %self.model, endpoint = %ep.name, for_ms = until - now, "endpoint ejected");
            }
        }
    }

    /// Keeps the ejected gauge honest once ejections expire (called by the health loop).
    pub(crate) fn refresh_gauges(&self, now_ms: u64) {
        for e in &self.endpoints {
            e.metrics.ejected.set(e.is_ejected(now_ms) as i64);
        }
    }
}
