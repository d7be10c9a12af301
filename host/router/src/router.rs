//! The router's request dispatch: which path does what, and the per-model state the
//! request path uses. The flow for inference calls is
//! `admission::read_body` → `admission::parse_head` → `forward::forward` (select, attempt,
//! relay) → `outcome` (metrics), with endpoint state updated by `upstream::Attempt`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use tokio::sync::watch;

use crate::admission;
use crate::body::{ResBody, boxed_full};
use crate::config::{Config, FallbackConfig, Limits, RetryConfig, Timeouts};
use crate::degraded::{self, Responder};
use crate::error::ApiError;
use crate::forward::{self, FailKind, Forwarded, Outbound, UpstreamClient};
use crate::geo::{self, Geo};
use crate::metrics::Metrics;
use crate::outcome::{ModelMetrics, RequestRecord};
use crate::plugin::PluginHost;
use crate::plugin::runtime::wit;
use crate::ratelimit::{Admission, ModelSlot, Permit, Rejection, TokenCharge};
use crate::select::RequestFacts;
use crate::supervisor::Supervisor;
use crate::upstream::{Pool, health, now_ms};

/// Everything the router knows about one model.
pub struct Model {
    /// Position in the config, and in every `PluginSet`.
    pub index: usize,
    pub pool: Arc<Pool>,
    pub timeouts: Timeouts,
    pub retry: RetryConfig,
    /// One pooled client per data-plane worker (plus one for the control plane), so an
    /// upstream connection lives on the thread of the requests it serves.
    clients: Vec<UpstreamClient>,
    pub metrics: Arc<ModelMetrics>,
    pub plugins: Arc<PluginHost>,
    /// Concurrency limit (0: none) and the requests holding a slot of it.
    pub max_in_flight: u32,
    pub concurrency: Arc<std::sync::atomic::AtomicU32>,
    /// The degradation chain, when configured.
    pub fallback: Option<FallbackConfig>,
}

impl Model {
    pub fn client(&self) -> &UpstreamClient {
        let i = crate::listener::worker_index().unwrap_or(usize::MAX).min(self.clients.len() - 1);
        &self.clients[i]
    }
}

pub struct Router {
    pub models: HashMap<String, Arc<Model>>,
    pub plugins: Arc<PluginHost>,
    pub supervisor: Arc<Supervisor>,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    pub admission: Arc<Admission>,
    /// Multi-region routing, when `[geo]` is configured.
    pub geo: Option<Arc<Geo>>,
    responder: Responder,
    admin_token: Option<String>,
    models_json: Bytes,
    draining: AtomicBool,
    stop_tx: watch::Sender<bool>,
}

/// Where a request came from, as the listener saw it.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    pub tls: bool,
}

impl Router {
    /// Builds the router and starts its background tasks (health checks, plugin folder).
    pub async fn start(cfg: &Config, workers: usize) -> anyhow::Result<Arc<Router>> {
        let metrics = Arc::new(Metrics::new());
        let plugins = PluginHost::new(cfg, &metrics.registry)?;
        plugins.start().await?;
        let supervisor = Supervisor::new(cfg, &metrics.registry)?;
        supervisor.start(cfg).await?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let geo = cfg.geo.as_ref().map(|g| Geo::new(g, &metrics, workers));
        if let Some(g) = &geo {
            g.spawn_probes(stop_rx.clone());
        }
        let mut models = HashMap::new();
        for (index, m) in cfg.models.iter().enumerate() {
            let name = m.name.get_ref().clone();
            let pool = Arc::new(Pool::new(m, &metrics));
            let clients: Vec<_> =
                (0..=workers).map(|_| forward::client(m.timeouts.connect, m.timeouts.pool_idle)).collect();
            health::spawn(pool.clone(), m.health_check.clone(), clients[workers].clone(), stop_rx.clone());
            let model = Model {
                index,
                plugins: plugins.clone(),
                pool,
                timeouts: m.timeouts.clone(),
                retry: m.retry.clone(),
                clients,
                metrics: Arc::new(ModelMetrics::new(&metrics, &name)),
                max_in_flight: m.max_in_flight,
                concurrency: Default::default(),
                fallback: m.fallback.clone(),
            };
            models.insert(name, Arc::new(model));
        }
        let mut names: Vec<&String> = models.keys().collect();
        names.sort();
        let data: Vec<_> = names
            .iter()
            .map(|n| serde_json::json!({"id": n, "object": "model", "created": 0, "owned_by": "switchyard"}))
            .collect();
        let models_json =
            Bytes::from(serde_json::to_vec(&serde_json::json!({"object": "list", "data": data})).unwrap());
        Ok(Arc::new(Router {
            models,
            plugins,
            supervisor,
            limits: cfg.limits.clone(),
            admission: Admission::new(&cfg.admission, &metrics.registry),
            geo,
            responder: Responder::new(&cfg.degraded)?,
            admin_token: cfg.admin.resolved_token(),
            metrics,
            models_json,
            draining: AtomicBool::new(false),
            stop_tx,
        }))
    }

    /// Marks the router as draining: `/readyz` fails so load balancers move away, and
    /// background tasks stop. Requests keep being served until the listener closes.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        let _ = self.stop_tx.send(true);
    }

    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::SeqCst) && {
            let now = now_ms();
            self.models.is_empty() || self.models.values().any(|m| m.pool.any_available(now))
        }
    }

    /// The admin API, served on its own (loopback by default) listener.
    pub async fn handle_admin(&'static self, req: Request<Incoming>, _peer: Peer) -> Response<ResBody> {
        if let Some(token) = &self.admin_token
            && !bearer_matches(req.headers(), token)
        {
            let mut res = ApiError::unauthorized().into_response();
            res.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"switchyard-admin\""));
            return res;
        }
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/admin/plugins") => {
                json(StatusCode::OK, Bytes::from(serde_json::to_vec_pretty(&self.plugins.status_json()).unwrap()))
            }
            (&Method::POST, "/admin/plugins/rescan") => {
                let plugins = self.plugins.clone();
                let _ = tokio::task::spawn_blocking(move || plugins.scan()).await;
                json(StatusCode::OK, Bytes::from(serde_json::to_vec_pretty(&self.plugins.status_json()).unwrap()))
            }
            (&Method::GET, "/admin/replicas") => {
                json(StatusCode::OK, Bytes::from(serde_json::to_vec_pretty(&self.supervisor.status_json()).unwrap()))
            }
            (&Method::GET, "/admin/endpoints") => json(StatusCode::OK, Bytes::from(self.endpoints_json())),
            (&Method::GET, "/admin/canary") => {
                let list: Vec<_> = self.sorted_models().filter_map(|m| self.canary_json(m)).collect();
                json(
                    StatusCode::OK,
                    Bytes::from(serde_json::to_vec_pretty(&serde_json::json!({ "canaries": list })).unwrap()),
                )
            }
            (&Method::POST, p) if p.starts_with("/admin/canary/") => match self.canary_action(p).await {
                Ok(v) => json(StatusCode::OK, Bytes::from(serde_json::to_vec_pretty(&v).unwrap())),
                Err(e) => e.into_response(),
            },
            (&Method::GET, "/metrics") => self.metrics_response(),
            (_, p) => ApiError::not_found(p).into_response(),
        }
    }

    fn sorted_models(&self) -> impl Iterator<Item = &Arc<Model>> {
        let mut models: Vec<&Arc<Model>> = self.models.values().collect();
        models.sort_by_key(|m| m.index);
        models.into_iter()
    }

    /// A model's canary rollout as `GET /admin/canary` shows it: what the policy last
    /// reported, the action waiting for it, and the host's per-version statistics.
    fn canary_json(&self, m: &Model) -> Option<serde_json::Value> {
        let plugin = self.plugins.canary_plugin(m.index)?;
        let shared = self.plugins.canary_shared(m.index)?;
        let now = now_ms();
        let report = shared.canary_report();
        let versions: Vec<_> = m
            .pool
            .versions
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let (requests, errors) = (v.requests(), v.errors());
                serde_json::json!({
                    "version": v.name,
                    "endpoints": m.pool.version_of.iter().filter(|&&x| x as usize == i).count(),
                    "requests": requests,
                    "errors": errors,
                    "error_rate": if requests > 0 { errors as f64 / requests as f64 } else { 0.0 },
                    "p99_ms": v.p99_us(now) as f64 / 1000.0,
                    "routed": v.routed.get(),
                })
            })
            .collect();
        Some(serde_json::json!({
            "model": m.pool.model,
            "plugin": plugin,
            "active": self.plugins.current().canary(m.index).is_some(),
            "share_percent": report.as_ref().map(|r| r.status.share_permille as f64 / 10.0),
            "step": report.as_ref().map(|r| r.status.step),
            "phase": report.as_ref().map(|r| crate::plugin::canary_phase_name(r.status.phase)),
            "reason": report.as_ref().map(|r| r.status.reason.clone()),
            "updated_ms_ago": report.as_ref().map(|r| now.saturating_sub(r.at_ms)),
            "pending_action": shared.pending_action().map(|a| format!("{a:?}").to_lowercase()),
            "versions": versions,
        }))
    }

    /// `POST /admin/canary/{model}/{promote|pause|resume|rollback}`: queues the action for
    /// the model's canary policy and lets it take effect at once with one decision made
    /// here (its answer is discarded), then returns the new state.
    async fn canary_action(&self, path: &str) -> Result<serde_json::Value, ApiError> {
        let rest = &path["/admin/canary/".len()..];
        let (name, action) = rest.rsplit_once('/').ok_or_else(|| {
            ApiError::admin(StatusCode::NOT_FOUND, "use /admin/canary/{model}/{promote|pause|resume|rollback}")
        })?;
        let model = self
            .models
            .get(name)
            .ok_or_else(|| ApiError::admin(StatusCode::NOT_FOUND, format!("unknown model {name:?}")))?
            .clone();
        let action = match action {
            "promote" => wit::OperatorAction::Promote,
            "pause" => wit::OperatorAction::Pause,
            "resume" => wit::OperatorAction::Resume,
            "rollback" => wit::OperatorAction::Rollback,
            other => {
                return Err(ApiError::admin(
                    StatusCode::BAD_REQUEST,
                    format!("unknown action {other:?}: use promote, pause, resume or rollback"),
                ));
            }
        };
        let binding = self.plugins.current().canary(model.index).cloned().ok_or_else(|| {
            ApiError::admin(StatusCode::CONFLICT, format!("model {name:?} has no active canary policy"))
        })?;
        binding.shared.queue_action(action);
        tracing::info!(model = %name, ?action, "canary: operator action");
        let plugins = self.plugins.clone();
        let m = model.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let facts = RequestFacts::anonymous(&m.pool.model);
            if let Err(fault) = binding.canary(crate::plugin::wit_request(&facts), &m.pool.version_stats(now_ms())) {
                plugins.record_fault(&m.pool.model, "canary", &binding, &fault);
            }
        })
        .await;
        Ok(self.canary_json(&model).unwrap_or_default())
    }

    fn endpoints_json(&self) -> Vec<u8> {
        let now = now_ms();
        let mut names: Vec<&String> = self.models.keys().collect();
        names.sort();
        let models: Vec<_> = names
            .into_iter()
            .map(|name| {
                let m = &self.models[name];
                let mut snap = Vec::new();
                m.pool.snapshot_into(now, &mut snap);
                let eps: Vec<_> = m
                    .pool
                    .endpoints
                    .iter()
                    .zip(&snap)
                    .map(|(e, s)| {
                        serde_json::json!({
                            "name": e.name, "url": e.url.to_string(), "region": e.region, "weight": e.weight,
                            "labels": e.labels, "available": s.available, "healthy": s.healthy,
                            "ejected": e.is_ejected(now),
                            "circuit": format!("{:?}", s.circuit).to_lowercase(), "in_flight": s.in_flight,
                            "ewma_latency_ms": s.ewma_latency_us / 1000.0, "error_rate": s.error_rate,
                        })
                    })
                    .collect();
                serde_json::json!({"model": name, "endpoints": eps})
            })
            .collect();
        serde_json::to_vec_pretty(&serde_json::json!({ "models": models })).unwrap()
    }

    fn metrics_response(&self) -> Response<ResBody> {
        let mut res = Response::new(boxed_full(self.metrics.render()));
        res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
        res
    }

    pub async fn handle(&'static self, req: Request<Incoming>, peer: Peer) -> Response<ResBody> {
        let path = req.uri().path();
        match (req.method(), path) {
            (&Method::POST, "/v1/chat/completions" | "/v1/completions") => self.infer(req, peer).await,
            (&Method::GET, "/v1/models") => json(StatusCode::OK, self.models_json.clone()),
            (&Method::GET, "/healthz") => json(StatusCode::OK, Bytes::from_static(b"{\"status\":\"ok\"}")),
            (&Method::GET, "/readyz") => {
                if self.is_ready() {
                    // Other regions' routers read the load when they probe this one.
                    let load = self.admission.load_permille();
                    json(StatusCode::OK, Bytes::from(format!("{{\"status\":\"ready\",\"load_permille\":{load}}}")))
                } else {
                    ApiError::not_ready().into_response()
                }
            }
            (&Method::GET, "/metrics") => {
                let mut res = Response::new(boxed_full(self.metrics.render()));
                res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
                res
            }
            (
                m,
                p @ ("/v1/chat/completions" | "/v1/completions" | "/v1/models" | "/healthz" | "/readyz" | "/metrics"),
            ) => ApiError::method_not_allowed(m, p).into_response(),
            (_, p) => ApiError::not_found(p).into_response(),
        }
    }

    async fn infer(&'static self, req: Request<Incoming>, peer: Peer) -> Response<ResBody> {
        let started = Instant::now();
        let (parts, body) = req.into_parts();
        // Shed before doing any work: router capacity and the tenant's request rate are
        // decided from the headers alone.
        let tenant = admission::tenant_of(&parts.headers);
        let permit = match self.admission.admit(tenant) {
            Ok(p) => p,
            Err(e) => return e.into_response(),
        };
        let body =
            match admission::read_body(&parts.headers, body, self.limits.max_body_bytes, self.limits.body_read_timeout)
                .await
            {
                Ok(b) => b,
                Err(e) => return e.into_response(),
            };
        let head = match admission::parse_head(&body) {
            Ok(h) => h,
            Err(e) => return e.into_response(),
        };
        let Some(model_name) = head.model.as_deref() else {
            return ApiError::model_missing().into_response();
        };
        let Some(model) = self.models.get(model_name) else {
            return ApiError::model_unknown(model_name).into_response();
        };
        let client_region = self.geo.as_ref().map_or(geo::NO_REGION, |g| g.client_region(&parts.headers, peer.addr));
        let facts = RequestFacts {
            model: model_name,
            stream: head.stream.unwrap_or(false),
            user: head.user.as_deref(),
            tenant,
            prefix_hash: head.prefix_hash(),
            prompt_tokens: head.prompt_tokens(),
            attempt: 0,
            client_region,
        };
        // The geo stage: another region may serve this request (never one that was
        // already forwarded here).
        if let Some(geo) = &self.geo
            && !parts.headers.contains_key(geo::HOP_HEADER)
            && let Some(res) = self.route_geo(geo, model, &facts, &parts, &body, peer).await
        {
            return res;
        }
        let (prompt_estimate, completion_estimate) = head.token_estimate();
        let charge = match self.admission.charge_tokens(tenant, prompt_estimate, completion_estimate) {
            Ok(c) => c,
            Err(e) => return e.into_response(),
        };
        let permit = Arc::new(permit);
        if model.fallback.is_none() {
            // The common case: one model, no degradation chain.
            let Ok(slot) = ModelSlot::take(&model.concurrency, model.max_in_flight) else {
                self.admission.count(Rejection::ModelConcurrency);
                return ApiError::overloaded(&format!("model {model_name:?} is at its concurrency limit"), 1)
                    .into_response();
            };
            let record = RequestRecord::begin(&model.metrics, started).with_admission(permit, slot, charge);
            let out = Outbound { parts: &parts, body: body.clone(), client_addr: peer.addr, tls: peer.tls };
            let res = forward::forward(model, facts, out, record, self.limits.max_response_bytes, None).await.response;
            return self.stamp_region(res);
        }
        let res = self.degrade(model, facts, &parts, &body, peer, started, permit, charge).await;
        self.stamp_region(res)
    }

    /// Names this router's region on a locally served response, when geo is configured.
    fn stamp_region(&self, mut res: Response<ResBody>) -> Response<ResBody> {
        if let Some(g) = &self.geo {
            res.headers_mut().entry(geo::REGION_HEADER).or_insert_with(|| g.local_name().clone());
        }
        res
    }

    /// Asks the model's geo policy where the request should be served; forwards it when
    /// another region is chosen. `None`: serve here (no policy, a fault, a local decision,
    /// or a forward that failed — a request never fails because another PoP did).
    async fn route_geo(
        &self,
        geo: &Geo,
        model: &Model,
        facts: &RequestFacts<'_>,
        parts: &http::request::Parts,
        body: &Bytes,
        peer: Peer,
    ) -> Option<Response<ResBody>> {
        let set = self.plugins.current();
        let binding = set.geo(model.index)?;
        let states = geo.region_states(model, self.plugins.region_count(model.index));
        let region = match binding.geo(crate::plugin::wit_request(facts), &states) {
            Ok(wit::GeoDecision::Forward(r)) if r != geo.local => r,
            Ok(_) => return None,
            Err(fault) => {
                self.plugins.record_fault(&model.pool.model, "geo", binding, &fault);
                return None;
            }
        };
        drop(set);
        let name = geo.region_name(region);
        match geo.forward(region, parts, body.clone(), facts.client_region, peer.addr, peer.tls).await {
            Ok(res) => {
                self.metrics.geo_routed.with_label_values(&[&model.pool.model, name, "forwarded"]).inc();
                Some(res)
            }
            Err(e) => {
                tracing::warn!(model = %model.pool.model, region = name, "forward to region failed, serving here: {}", e.0);
                self.metrics.geo_routed.with_label_values(&[&model.pool.model, name, "forward-failed"]).inc();
                None
            }
        }
    }

    /// The degradation chain of the seed design: the primary within its share of the budget,
    /// then fallback models within what remains, then the rule-based answer. The fallback
    /// stage plugin (or, without one, the configured order) decides each step.
    #[allow(clippy::too_many_arguments)]
    async fn degrade(
        &'static self,
        primary: &'static Arc<Model>,
        facts: RequestFacts<'_>,
        parts: &http::request::Parts,
        body: &Bytes,
        peer: Peer,
        started: Instant,
        permit: Arc<Permit>,
        charge: Option<TokenCharge>,
    ) -> Response<ResBody> {
        let chain = primary.fallback.as_ref().expect("called for models with a fallback chain");
        let budget_end = started + chain.budget;
        let mut target: &'static Arc<Model> = primary;
        let mut target_body = body.clone();
        let mut charge = charge;
        let mut step = 0u32;
        let mut retried = false;
        // Each model once, one retry, and the rules: the loop cannot run away.
        for _ in 0..chain.models.len() + 3 {
            let limit = if step == 0 { started + chain.primary_timeout } else { budget_end };
            let facts = RequestFacts { model: &target.pool.model, attempt: step, ..facts };
            let Forwarded { mut response, failed } = match ModelSlot::take(&target.concurrency, target.max_in_flight) {
                Err(_) => {
                    self.admission.count(Rejection::ModelConcurrency);
                    let e =
                        ApiError::overloaded(&format!("model {:?} is at its concurrency limit", target.pool.model), 1);
                    Forwarded { response: e.into_response(), failed: Some(FailKind::Overload) }
                }
                Ok(slot) => {
                    let record = RequestRecord::begin(&target.metrics, Instant::now()).with_admission(
                        permit.clone(),
                        slot,
                        charge.take(),
                    );
                    let out = Outbound { parts, body: target_body.clone(), client_addr: peer.addr, tls: peer.tls };
                    forward::forward(target, facts, out, record, self.limits.max_response_bytes, Some(limit)).await
                }
            };
            let Some(kind) = failed else {
                if step > 0 {
                    response.headers_mut().insert(degraded::HEADER, HeaderValue::from_static("fallback-model"));
                    self.metrics.degraded.with_label_values(&[&primary.pool.model, "fallback-model"]).inc();
                }
                return response;
            };
            let elapsed = started.elapsed();
            let decision = self.fallback_decision(primary, chain, &facts, kind, step, elapsed);
            tracing::debug!(model = %primary.pool.model, step, ?kind, ?decision, "fallback decision");
            match decision {
                wit::FallbackDecision::Retry if !retried => retried = true,
                wit::FallbackDecision::FallbackModel(i) => {
                    let name = &chain.models[i as usize];
                    let Some(next) = self.models.get(name) else { return response };
                    target = next;
                    target_body = with_model(body, name);
                    step += 1;
                }
                wit::FallbackDecision::RuleBased => return self.rule_based(primary, parts, body, facts.stream),
                wit::FallbackDecision::Retry | wit::FallbackDecision::GiveUp => return response,
            }
        }
        self.rule_based(primary, parts, body, facts.stream)
    }

    fn rule_based(
        &self,
        primary: &Model,
        parts: &http::request::Parts,
        body: &[u8],
        stream: bool,
    ) -> Response<ResBody> {
        self.metrics.degraded.with_label_values(&[&primary.pool.model, "rule-based"]).inc();
        self.responder.respond(parts.uri.path(), body, stream)
    }

    /// The fallback stage: the model's plugin when one is bound (a fault falls back to the
    /// native order), else the configured chain in order, then the rules.
    fn fallback_decision(
        &self,
        primary: &Model,
        chain: &FallbackConfig,
        facts: &RequestFacts<'_>,
        kind: FailKind,
        step: u32,
        elapsed: std::time::Duration,
    ) -> wit::FallbackDecision {
        let set = self.plugins.current();
        if let Some(binding) = set.fallback(primary.index) {
            let failure = wit::Failure {
                kind: match kind {
                    FailKind::Connect => wit::FailureKind::Connect,
                    FailKind::Timeout => wit::FailureKind::Timeout,
                    FailKind::ServerError => wit::FailureKind::ServerError,
                    FailKind::Unavailable => wit::FailureKind::CircuitOpen,
                    FailKind::Overload => wit::FailureKind::Overload,
                },
                attempts: step + 1,
                elapsed_ms: elapsed.as_millis().min(u32::MAX as u128) as u32,
            };
            match binding.fallback(crate::plugin::wit_request(facts), failure) {
                Ok(d) => return d,
                Err(fault) => self.plugins.record_fault(&primary.pool.model, "fallback", binding, &fault),
            }
        }
        if (step as usize) < chain.models.len() && elapsed < chain.budget {
            wit::FallbackDecision::FallbackModel(step)
        } else if chain.rule_based {
            wit::FallbackDecision::RuleBased
        } else {
            wit::FallbackDecision::GiveUp
        }
    }
}

/// The request body with its `model` replaced, for a fallback model's endpoints.
fn with_model(body: &Bytes, model: &str) -> Bytes {
    match serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body) {
        Ok(mut v) => {
            v.insert("model".into(), serde_json::Value::String(model.to_string()));
            Bytes::from(serde_json::to_vec(&v).expect("json value serialises"))
        }
        Err(_) => body.clone(),
    }
}

/// `Authorization: Bearer <token>`, compared in constant time.
fn bearer_matches(headers: &http::HeaderMap, token: &str) -> bool {
    let Some(given) = admission::bearer(headers) else { return false };
    let (a, b) = (given.as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn json(status: StatusCode, body: Bytes) -> Response<ResBody> {
    let mut res = Response::new(boxed_full(body));
    *res.status_mut() = status;
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}
