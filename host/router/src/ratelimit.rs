//! Admission control: shed load before doing work.
//!
//! Three gates, checked in this order on every inference request:
//! 1. the router's own capacity (`admission.max_in_flight`): over it → 503 + `Retry-After`,
//!    decided from the headers alone, before the body is read;
//! 2. the tenant's request rate (token bucket per API key): over it → 429 + `Retry-After`,
//!    also before the body is read;
//! 3. the tenant's tokens per minute, estimated at admission from the body (prompt bytes / 4
//!    plus the requested `max_tokens`) and corrected from the answer's `usage` when it comes
//!    back: over it → 429 + `Retry-After`.
//!
//! A model's concurrency limit (`max_in_flight` on the model) is the fourth gate; the router
//! checks it once it knows the model (see `router.rs`), so an overloaded model can degrade to
//! its fallback instead of failing.
//!
//! Tenant state is sharded by tenant hash behind short mutexes: every worker thread shares
//! it, and a check is one lock, two bucket refills and no allocation after a tenant's first
//! request.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use prometheus::{IntCounterVec, Opts, Registry};

use crate::admission::hash64;
use crate::config::{AdmissionConfig, TenantLimits};
use crate::error::ApiError;
use crate::upstream::now_ms;

const SHARDS: usize = 16;
/// Tenants idle this long are forgotten (their buckets would be full again anyway).
const IDLE_FORGET_MS: u64 = 10 * 60 * 1000;

/// A token bucket. `level` may go below zero: token charges are settled after the fact, and
/// a request that used more than estimated leaves a debt the tenant pays off over time.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    level: f64,
    at_ms: u64,
}

impl Bucket {
    fn full(cap: f64, now: u64) -> Bucket {
        Bucket { level: cap, at_ms: now }
    }

    fn refill(&mut self, now: u64, per_ms: f64, cap: f64) {
        if now > self.at_ms {
            self.level = (self.level + (now - self.at_ms) as f64 * per_ms).min(cap);
            self.at_ms = now;
        }
    }

    /// Milliseconds until the level reaches `need`.
    fn wait_ms(&self, need: f64, per_ms: f64) -> u64 {
        if per_ms <= 0.0 { u64::MAX } else { ((need - self.level).max(0.0) / per_ms).ceil() as u64 }
    }
}

#[derive(Debug)]
struct TenantState {
    requests: Bucket,
    tokens: Bucket,
    last_ms: u64,
}

/// Limits resolved for fast use: rates per millisecond and capacities.
#[derive(Debug, Clone, Copy, Default)]
struct Rates {
    req_per_ms: f64,
    req_cap: f64,
    tok_per_ms: f64,
    tok_cap: f64,
}

impl Rates {
    fn of(l: &TenantLimits) -> Rates {
        let burst = l.burst.map(f64::from).unwrap_or(l.requests_per_second.max(1.0));
        Rates {
            req_per_ms: l.requests_per_second / 1000.0,
            req_cap: if l.requests_per_second > 0.0 { burst } else { 0.0 },
            tok_per_ms: l.tokens_per_minute as f64 / 60_000.0,
            tok_cap: l.tokens_per_minute as f64,
        }
    }

    fn limits_requests(&self) -> bool {
        self.req_per_ms > 0.0
    }

    fn limits_tokens(&self) -> bool {
        self.tok_per_ms > 0.0
    }
}

/// Why a request was turned away, as counted in `switchyard_admission_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Overloaded,
    TenantRequests,
    TenantTokens,
    ModelConcurrency,
}

impl Rejection {
    fn label(self) -> &'static str {
        match self {
            Rejection::Overloaded => "router_overloaded",
            Rejection::TenantRequests => "tenant_requests",
            Rejection::TenantTokens => "tenant_tokens",
            Rejection::ModelConcurrency => "model_concurrency",
        }
    }
}

pub struct Admission {
    max_in_flight: usize,
    in_flight: Arc<AtomicUsize>,
    default: Rates,
    overrides: HashMap<u64, Rates>,
    shards: Vec<Mutex<HashMap<u64, TenantState>>>,
    rejected: IntCounterVec,
}

/// Holds a slot of the router's capacity; released on drop.
pub struct Permit {
    router: Option<Arc<AtomicUsize>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(c) = &self.router {
            c.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Holds a slot of one model's concurrency limit; released on drop.
pub struct ModelSlot(Arc<AtomicU32>);

/// The model is at its concurrency limit.
#[derive(Debug)]
pub struct AtCapacity;

impl ModelSlot {
    /// A slot of `counter` under `limit` (0: unlimited, no slot needed); `Err` when full.
    pub fn take(counter: &Arc<AtomicU32>, limit: u32) -> Result<Option<ModelSlot>, AtCapacity> {
        if limit == 0 {
            return Ok(None);
        }
        if counter.fetch_add(1, Ordering::Relaxed) >= limit {
            counter.fetch_sub(1, Ordering::Relaxed);
            return Err(AtCapacity);
        }
        Ok(Some(ModelSlot(counter.clone())))
    }
}

impl Drop for ModelSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A token charge taken at admission, to be settled against the answer's real usage.
pub struct TokenCharge {
    admission: Arc<Admission>,
    tenant: u64,
    prompt: u32,
    completion: u32,
}

impl TokenCharge {
    /// Corrects the tenant's bucket from the estimate to what the answer says it used.
    pub fn settle(self, used: u32) {
        let estimate = self.prompt as f64 + self.completion as f64;
        self.admission.adjust_tokens(self.tenant, estimate - used as f64);
    }

    /// Corrects the completion part only, for answers that say how much they generated but
    /// not the total (a stream counted event by event).
    pub fn settle_completion(self, generated: u32) {
        let prompt = self.prompt;
        self.settle(prompt.saturating_add(generated));
    }
}

impl Admission {
    pub fn new(cfg: &AdmissionConfig, registry: &Registry) -> Arc<Admission> {
        let rejected = IntCounterVec::new(
            Opts::new("switchyard_admission_rejected_total", "Requests shed at admission, by reason"),
            &["reason"],
        )
        .expect("valid metric");
        registry.register(Box::new(rejected.clone())).expect("metric registered once");
        for r in
            [Rejection::Overloaded, Rejection::TenantRequests, Rejection::TenantTokens, Rejection::ModelConcurrency]
        {
            rejected.with_label_values(&[r.label()]);
        }
        Arc::new(Admission {
            max_in_flight: cfg.max_in_flight as usize,
            in_flight: Arc::new(AtomicUsize::new(0)),
            default: Rates::of(&cfg.tenant),
            overrides: cfg.tenants.iter().map(|(key, l)| (key_hash(key), Rates::of(l))).collect(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            rejected,
        })
    }

    /// The router's load against its capacity (`max_in_flight`), 0..=1000; 0 without a limit.
    pub fn load_permille(&self) -> u32 {
        if self.max_in_flight == 0 {
            return 0;
        }
        (self.in_flight.load(Ordering::Relaxed) * 1000 / self.max_in_flight).min(1000) as u32
    }

    pub fn count(&self, why: Rejection) {
        self.rejected.with_label_values(&[why.label()]).inc();
    }

    fn rates(&self, tenant: u64) -> Rates {
        self.overrides.get(&tenant).copied().unwrap_or(self.default)
    }

    /// Gates 1 and 2: router capacity, then the tenant's request rate.
    pub fn admit(&self, tenant: u64) -> Result<Permit, ApiError> {
        let router = if self.max_in_flight > 0 {
            if self.in_flight.fetch_add(1, Ordering::Relaxed) >= self.max_in_flight {
                self.in_flight.fetch_sub(1, Ordering::Relaxed);
                self.count(Rejection::Overloaded);
                return Err(ApiError::overloaded("the router is over capacity", 1));
            }
            Some(self.in_flight.clone())
        } else {
            None
        };
        let permit = Permit { router };
        let rates = self.rates(tenant);
        if !rates.limits_requests() {
            return Ok(permit);
        }
        let now = now_ms();
        let wait = self.with_tenant(tenant, rates, now, |t| {
            t.requests.refill(now, rates.req_per_ms, rates.req_cap);
            if t.requests.level >= 1.0 {
                t.requests.level -= 1.0;
                None
            } else {
                Some(t.requests.wait_ms(1.0, rates.req_per_ms))
            }
        });
        match wait {
            None => Ok(permit),
            Some(ms) => {
                self.count(Rejection::TenantRequests);
                Err(ApiError::rate_limited("requests per second", secs(ms)))
            }
        }
    }

    /// Gate 3: the tenant's tokens per minute. A tenant with tokens left may start a request
    /// that costs more than it has (the bucket goes into debt); one in debt waits.
    pub fn charge_tokens(
        self: &Arc<Self>,
        tenant: u64,
        prompt: u32,
        completion: u32,
    ) -> Result<Option<TokenCharge>, ApiError> {
        let estimate = prompt.saturating_add(completion);
        let rates = self.rates(tenant);
        if !rates.limits_tokens() {
            return Ok(None);
        }
        let now = now_ms();
        let wait = self.with_tenant(tenant, rates, now, |t| {
            t.tokens.refill(now, rates.tok_per_ms, rates.tok_cap);
            if t.tokens.level > 0.0 {
                t.tokens.level -= estimate as f64;
                None
            } else {
                Some(t.tokens.wait_ms(1.0, rates.tok_per_ms))
            }
        });
        match wait {
            None => Ok(Some(TokenCharge { admission: self.clone(), tenant, prompt, completion })),
            Some(ms) => {
                self.count(Rejection::TenantTokens);
                Err(ApiError::rate_limited("tokens per minute", secs(ms)))
            }
        }
    }

    fn adjust_tokens(&self, tenant: u64, delta: f64) {
        let rates = self.rates(tenant);
        let now = now_ms();
        self.with_tenant(tenant, rates, now, |t| {
            t.tokens.refill(now, rates.tok_per_ms, rates.tok_cap);
            t.tokens.level = (t.tokens.level + delta).min(rates.tok_cap);
        });
    }

    fn with_tenant<R>(&self, tenant: u64, rates: Rates, now: u64, f: impl FnOnce(&mut TenantState) -> R) -> R {
        let mut shard = self.shards[(tenant as usize) % SHARDS].lock().unwrap_or_else(|p| p.into_inner());
        if shard.len() > 4096 && !shard.contains_key(&tenant) {
            shard.retain(|_, t| now.saturating_sub(t.last_ms) < IDLE_FORGET_MS);
        }
        let t = shard.entry(tenant).or_insert_with(|| TenantState {
            requests: Bucket::full(rates.req_cap, now),
            tokens: Bucket::full(rates.tok_cap, now),
            last_ms: now,
        });
        t.last_ms = now;
        f(t)
    }
}

fn secs(ms: u64) -> u64 {
    ms.div_ceil(1000).clamp(1, 3600)
}

/// `usage.total_tokens` of an OpenAI answer, if it has one.
pub fn usage_total_tokens(body: &[u8]) -> Option<u32> {
    #[derive(serde::Deserialize)]
    struct Usage {
        total_tokens: u32,
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        usage: Option<Usage>,
    }
    serde_json::from_slice::<Answer>(body).ok()?.usage.map(|u| u.total_tokens)
}

/// Key for a per-key override, the same hash the request path computes.
pub fn key_hash(key: &str) -> u64 {
    hash64(key.trim().as_bytes()) | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(rps: f64, burst: u32, tpm: u64) -> AdmissionConfig {
        AdmissionConfig {
            tenant: TenantLimits { requests_per_second: rps, burst: Some(burst), tokens_per_minute: tpm },
            ..AdmissionConfig::default()
        }
    }

    #[test]
    fn request_bucket_allows_the_burst_then_refuses_with_retry_after() {
        let a = Admission::new(&cfg(1.0, 3, 0), &Registry::new());
        for _ in 0..3 {
            a.admit(7).unwrap();
        }
        let e = a.admit(7).err().expect("fourth request within a second is refused");
        assert_eq!(e.status, 429);
        assert_eq!(e.retry_after_secs, Some(1));
        // Another tenant has its own bucket.
        a.admit(9).unwrap();
    }

    #[test]
    fn token_debt_blocks_until_settled() {
        let a = Admission::new(&cfg(0.0, 1, 600), &Registry::new());
        let c = a.charge_tokens(5, 200, 800).unwrap().expect("limited");
        // In debt: the next request waits.
        assert_eq!(a.charge_tokens(5, 2, 8).err().unwrap().status, 429);
        // The answer used far fewer tokens than estimated: the refund clears the debt.
        c.settle(100);
        assert!(a.charge_tokens(5, 2, 8).unwrap().is_some());
    }

    #[test]
    fn router_capacity_is_released_with_the_permit() {
        let c = AdmissionConfig { max_in_flight: 1, ..AdmissionConfig::default() };
        let a = Admission::new(&c, &Registry::new());
        let p = a.admit(0).unwrap();
        assert_eq!(a.admit(0).err().unwrap().status, 503);
        drop(p);
        a.admit(0).unwrap();
    }
}
