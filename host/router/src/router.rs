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
use crate::config::{Config, Limits, RetryConfig, Timeouts};
use crate::error::ApiError;
use crate::forward::{self, Outbound, UpstreamClient};
use crate::metrics::Metrics;
use crate::outcome::{ModelMetrics, RequestRecord};
use crate::plugin::PluginHost;
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
        let mut models = HashMap::new();
        for (index, m) in cfg.models.iter().enumerate() {
            let name = m.name.get_ref().clone();
            let pool = Arc::new(Pool::new(m, &metrics));
            let clients: Vec<_> = (0..=workers).map(|_| forward::client(m.timeouts.connect)).collect();
            health::spawn(pool.clone(), m.health_check.clone(), clients[workers].clone(), stop_rx.clone());
            let model = Model {
                index,
                plugins: plugins.clone(),
                pool,
                timeouts: m.timeouts.clone(),
                retry: m.retry.clone(),
                clients,
                metrics: Arc::new(ModelMetrics::new(&metrics, &name)),
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
    pub async fn handle_admin(self: Arc<Self>, req: Request<Incoming>, _peer: Peer) -> Response<ResBody> {
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
            (&Method::GET, "/metrics") => self.metrics_response(),
            (_, p) => ApiError::not_found(p).into_response(),
        }
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

    pub async fn handle(self: Arc<Self>, req: Request<Incoming>, peer: Peer) -> Response<ResBody> {
        let path = req.uri().path();
        match (req.method(), path) {
            (&Method::POST, "/v1/chat/completions" | "/v1/completions") => self.infer(req, peer).await,
            (&Method::GET, "/v1/models") => json(StatusCode::OK, self.models_json.clone()),
            (&Method::GET, "/healthz") => json(StatusCode::OK, Bytes::from_static(b"{\"status\":\"ok\"}")),
            (&Method::GET, "/readyz") => {
                if self.is_ready() {
                    json(StatusCode::OK, Bytes::from_static(b"{\"status\":\"ready\"}"))
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

    async fn infer(self: Arc<Self>, req: Request<Incoming>, peer: Peer) -> Response<ResBody> {
        let started = Instant::now();
        let (parts, body) = req.into_parts();
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
        let facts = RequestFacts {
            model: model_name,
            stream: head.stream.unwrap_or(false),
            user: head.user.as_deref(),
            tenant: admission::tenant_of(&parts.headers),
            prefix_hash: head.prefix_hash(),
            prompt_tokens: head.prompt_tokens(),
            attempt: 0,
        };
        let record = RequestRecord::begin(&model.metrics, started);
        let out = Outbound { parts: &parts, body: body.clone(), client_addr: peer.addr, tls: peer.tls };
        forward::forward(model, facts, out, record, self.limits.max_response_bytes).await
    }
}

fn json(status: StatusCode, body: Bytes) -> Response<ResBody> {
    let mut res = Response::new(boxed_full(body));
    *res.status_mut() = status;
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}
