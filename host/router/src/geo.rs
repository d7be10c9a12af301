//! Multi-region routing (the seed design's multi-region deployment): which region a client
//! is in, the live state of every region, and forwarding a request to another region's
//! router. The geo stage policy decides; this module supplies its facts and carries out a
//! `forward` decision.
//!
//! A forwarded request carries `x-switchyard-hop` (the region it came from); a router
//! never forwards a request that already has it, so two PoPs with different views of the
//! world cannot bounce a request between them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use prometheus::IntGauge;
use tokio::sync::watch;

use crate::body::ResBody;
use crate::config::{Cidr, GeoConfig, UpstreamUrl};
use crate::forward::{self, UpstreamClient};
use crate::metrics::Metrics;
use crate::plugin::runtime::wit;
use crate::router::Model;
use crate::upstream::now_ms;

/// Marks a request forwarded by another region's router; its value is that region.
pub const HOP_HEADER: &str = "x-switchyard-hop";
/// On responses: the region whose router served the request (set when geo is configured).
pub const REGION_HEADER: &str = "x-switchyard-region";

/// Index meaning "the client's region is unknown".
pub const NO_REGION: u32 = u32::MAX;

pub struct Geo {
    /// This router's region (index into `names`).
    pub local: u32,
    names: Vec<String>,
    /// Region names as response header values.
    header_values: Vec<HeaderValue>,
    client_header: HeaderName,
    networks: Vec<(Cidr, u32)>,
    /// Per region: its router and probe state (`None` for this router's region).
    remotes: Vec<Option<Remote>>,
    /// One pooled client per data-plane worker, plus one for the probes.
    clients: Vec<UpstreamClient>,
    forward_timeout: Duration,
    probe_interval: Duration,
    probe_timeout: Duration,
    unhealthy_after: u32,
    healthy_after: u32,
}

struct Remote {
    url: UpstreamUrl,
    up: AtomicBool,
    load_permille: AtomicU32,
    gauge: IntGauge,
}

/// Why a forward did not produce the other region's answer.
#[derive(Debug)]
pub struct ForwardError(pub String);

impl Geo {
    pub fn new(cfg: &GeoConfig, metrics: &Metrics, workers: usize) -> Arc<Geo> {
        let regions = cfg.regions.get_ref();
        let names: Vec<String> = regions.iter().map(|r| r.name.clone()).collect();
        let index = |n: &str| names.iter().position(|x| x == n).expect("validated: region is listed") as u32;
        let local = index(cfg.region.get_ref());
        let remotes = regions
            .iter()
            .enumerate()
            .map(|(i, r)| {
                (i as u32 != local).then(|| {
                    let gauge = metrics.region_up.with_label_values(&[&r.name]);
                    // Optimistic until probed, like endpoints: a restarted router serves at once.
                    gauge.set(1);
                    Remote {
                        url: r.router.clone().expect("validated: every other region has a router"),
                        up: AtomicBool::new(true),
                        load_permille: AtomicU32::new(0),
                        gauge,
                    }
                })
            })
            .collect();
        Arc::new(Geo {
            local,
            header_values: names
                .iter()
                .map(|n| HeaderValue::try_from(n.as_str()).unwrap_or(HeaderValue::from_static("invalid-region")))
                .collect(),
            networks: cfg
                .client_networks
                .iter()
                .map(|n| (Cidr::parse(n.cidr.get_ref()).expect("validated"), index(&n.region)))
                .collect(),
            names,
            client_header: HeaderName::from_bytes(cfg.client_region_header.as_bytes()).expect("validated"),
            remotes,
            clients: (0..=workers)
                .map(|_| forward::client(cfg.probe_timeout, crate::config::Timeouts::default().pool_idle))
                .collect(),
            forward_timeout: cfg.forward_timeout,
            probe_interval: cfg.probe_interval,
            probe_timeout: cfg.probe_timeout,
            unhealthy_after: cfg.unhealthy_after.max(1),
            healthy_after: cfg.healthy_after.max(1),
        })
    }

    pub fn local_name(&self) -> &HeaderValue {
        &self.header_values[self.local as usize]
    }

    /// The client's region: the configured header (a region name), else the first client
    /// network containing the peer address, else `NO_REGION`.
    pub fn client_region(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> u32 {
        if let Some(name) = headers.get(&self.client_header).and_then(|v| v.to_str().ok())
            && let Some(i) = self.names.iter().position(|n| n.eq_ignore_ascii_case(name.trim()))
        {
            return i as u32;
        }
        peer.and_then(|p| self.networks.iter().find(|(c, _)| c.contains(p.ip())).map(|&(_, r)| r)).unwrap_or(NO_REGION)
    }

    /// The live state of each of `count` regions as a model's geo policy sees them. This
    /// region is up while the model has an available endpoint; its load is the model's
    /// concurrency against its limit. Regions known only from endpoint labels have no
    /// router to forward to and are reported down.
    pub fn region_states(&self, model: &Model, count: usize) -> Vec<wit::RegionState> {
        (0..count)
            .map(|i| {
                if i as u32 == self.local {
                    let load = if model.max_in_flight > 0 {
                        (model.concurrency.load(Relaxed) as u64 * 1000 / model.max_in_flight as u64).min(1000) as u32
                    } else {
                        0
                    };
                    wit::RegionState { healthy: model.pool.any_available(now_ms()), load_permille: load }
                } else {
                    match self.remotes.get(i).and_then(Option::as_ref) {
                        Some(r) => wit::RegionState {
                            healthy: r.up.load(Relaxed),
                            load_permille: r.load_permille.load(Relaxed),
                        },
                        None => wit::RegionState { healthy: false, load_permille: 1000 },
                    }
                }
            })
            .collect()
    }

    /// Sends the request to `region`'s router and returns its answer, streamed through.
    /// A connect error, a timeout before the answer's head, or a 502/503/504 (the other
    /// PoP could not serve either) is an error: the caller serves the request here.
    pub async fn forward(
        &self,
        region: u32,
        parts: &http::request::Parts,
        body: Bytes,
        client_region: u32,
        peer: Option<SocketAddr>,
        tls: bool,
    ) -> Result<Response<ResBody>, ForwardError> {
        let remote = self
            .remotes
            .get(region as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| ForwardError(format!("region {region} has no router")))?;
        let out = forward::Outbound { parts, body: body.clone(), client_addr: peer, tls };
        let mut headers = forward::upstream_headers(&out);
        headers.insert(HeaderName::from_static(HOP_HEADER), self.local_name().clone());
        // The client's region travels along, however it was found here.
        if let Some(v) = self.header_values.get(client_region as usize) {
            headers.insert(self.client_header.clone(), v.clone());
        }
        let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = forward::uri_for(&remote.url, pq);
        *req.headers_mut() = headers;
        let client = &self.clients[crate::listener::worker_index().unwrap_or(usize::MAX).min(self.clients.len() - 1)];
        let res = match tokio::time::timeout(self.forward_timeout, client.request(req)).await {
            Err(_) => return Err(ForwardError("timed out waiting for the region's router".into())),
            Ok(Err(e)) => {
                remote.mark(false, self);
                return Err(ForwardError(format!("cannot reach the region's router: {e}")));
            }
            Ok(Ok(res)) => res,
        };
        if matches!(
            res.status(),
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
        ) {
            return Err(ForwardError(format!("the region's router answered {}", res.status())));
        }
        let (mut head, body) = res.into_parts();
        forward::strip_hop_by_hop(&mut head.headers);
        head.headers.entry(REGION_HEADER).or_insert_with(|| self.header_values[region as usize].clone());
        Ok(Response::from_parts(head, body.map_err(|e| Box::new(e) as crate::body::BoxError).boxed_unsync()))
    }

    pub fn region_name(&self, i: u32) -> &str {
        self.names.get(i as usize).map_or("unknown", String::as_str)
    }

    /// Probes every other region's router (`GET /readyz`) until `stop`.
    pub fn spawn_probes(self: &Arc<Self>, stop: watch::Receiver<bool>) {
        for i in 0..self.remotes.len() {
            if self.remotes[i].is_none() {
                continue;
            }
            let geo = self.clone();
            let mut stop = stop.clone();
            tokio::spawn(async move {
                let remote = geo.remotes[i].as_ref().expect("checked above");
                let client = geo.clients.last().expect("one client per worker plus one").clone();
                let uri = forward::uri_for(&remote.url, "/readyz");
                let (mut fails, mut oks) = (0u32, 0u32);
                loop {
                    let probe = async {
                        let req = Request::get(uri.clone()).body(Full::new(Bytes::new())).expect("valid request");
                        let res = client.request(req).await.ok()?;
                        let ok = res.status() == StatusCode::OK;
                        let body = res.into_body().collect().await.ok()?.to_bytes();
                        ok.then(|| {
                            serde_json::from_slice::<serde_json::Value>(&body)
                                .ok()
                                .and_then(|v| v["load_permille"].as_u64())
                                .unwrap_or(0)
                                .min(1000) as u32
                        })
                    };
                    match tokio::time::timeout(geo.probe_timeout, probe).await.ok().flatten() {
                        Some(load) => {
                            remote.load_permille.store(load, Relaxed);
                            (fails, oks) = (0, oks + 1);
                            if oks >= geo.healthy_after {
                                remote.mark(true, &geo);
                            }
                        }
                        None => {
                            (fails, oks) = (fails + 1, 0);
                            if fails >= geo.unhealthy_after {
                                remote.mark(false, &geo);
                            }
                        }
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(geo.probe_interval) => {}
                        _ = stop.changed() => return,
                    }
                }
            });
        }
    }
}

impl Remote {
    fn mark(&self, up: bool, geo: &Geo) {
        if self.up.swap(up, Relaxed) != up {
            let name = geo.remotes.iter().position(|r| r.as_ref().is_some_and(|r| std::ptr::eq(r, self)));
            let name = name.map_or("?", |i| geo.names[i].as_str());
            if up {
                tracing::info!(region = name, "region is up");
            } else {
                tracing::warn!(region = name, "region is down");
            }
        }
        self.gauge.set(up as i64);
    }
}
