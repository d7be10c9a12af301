//! Forwarding: try the selected endpoints in order, within the retry budget, and relay
//! the answer. Non-streaming answers are read in full before the client sees them, so a
//! failure anywhere in them can still move to another endpoint. Streams are held back
//! until their first chunk arrives, so a stream is retried exactly while nothing has
//! been sent to the client; after that it is relayed chunk by chunk.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, Limited};

use crate::body::{CollectError, RelayBody, ResBody, Resumable, boxed_full};
use crate::client::error_chain;
use crate::error::ApiError;
use crate::outcome::RequestRecord;
use crate::plugin::{PluginSet, wit_request};
use crate::resume::ResumeContext;
use crate::router::Model;
use crate::select::{PowerOfTwoChoices, RequestFacts, Selector, sanitize};
use crate::upstream::{Attempt, Endpoint, EndpointSnapshot, Outcome, now_ms};

pub use crate::client::UpstreamClient;

/// A pooled keep-alive client for one model's endpoints.
pub fn client(connect_timeout: Duration, pool_idle: Duration) -> UpstreamClient {
    UpstreamClient::new(connect_timeout, pool_idle, 1024)
}

/// Why an attempt failed. Every variant is a server-side failure and may be retried.
enum Failure {
    Connect(String),
    Broken(String),
    Timeout,
    /// A 5xx answer, kept whole in case it is the last one: then the client gets it as is.
    Status(http::response::Parts, Bytes, &'static str),
}

/// The parts of the client's request that every attempt reuses.
pub struct Outbound<'a> {
    pub parts: &'a http::request::Parts,
    pub body: Bytes,
    pub client_addr: Option<std::net::SocketAddr>,
    pub tls: bool,
}

/// Why a request got no answer from a model: what the fallback stage decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailKind {
    Connect,
    Timeout,
    ServerError,
    /// No endpoint may take traffic (health, ejection, open circuits).
    Unavailable,
    /// The model is at its concurrency limit.
    Overload,
}

/// What `forward` produced: the response for the client, and why it is not an answer when
/// it is not one (then a fallback may replace it).
pub struct Forwarded {
    pub response: Response<ResBody>,
    pub failed: Option<FailKind>,
}

impl Forwarded {
    fn failed(response: Response<ResBody>, kind: FailKind) -> Forwarded {
        Forwarded { response, failed: Some(kind) }
    }
}

/// Tries the model's endpoints for one request. `deadline` bounds every attempt (the
/// primary's share of a fallback budget); `None` leaves only the model's own timeouts.
pub async fn forward(
    model: &'static Model,
    facts: RequestFacts<'_>,
    out: Outbound<'_>,
    record: RequestRecord,
    max_response_bytes: usize,
    deadline: Option<Instant>,
) -> Forwarded {
    let pool = &model.pool;
    let now = now_ms();
    let mut snapshot = Vec::with_capacity(pool.endpoints.len());
    pool.snapshot_into(now, &mut snapshot);
    let mut ranked = Vec::with_capacity(pool.endpoints.len());
    choose(model, &facts, &snapshot, &mut ranked);
    if ranked.is_empty() {
        let e = ApiError::no_healthy_endpoint(&pool.model, pool.retry_after_secs(now));
        return Forwarded::failed(reply_error(record, e), FailKind::Unavailable);
    }
    pool.budget.deposit(now);

    // The first attempt takes these; a retry (rare) builds them again rather than every
    // request paying a copy.
    let mut headers = Some(upstream_headers(&out));
    let mut resume_ctx =
        (facts.stream && model.retry.resume_streams && model.retry.max_attempts > 1).then(|| ResumeContext {
            model,
            path_and_query: out.parts.uri.path_and_query().map_or("/", |pq| pq.as_str()).to_string(),
            headers: headers.clone().unwrap_or_default(),
            body: out.body.clone(),
            chat: out.parts.uri.path().ends_with("/chat/completions"),
            tried: Vec::new(),
            left: model.retry.max_attempts - 1,
        });
    let mut attempts = 0u32;
    let mut last: Option<Failure> = None;
    let mut record = record;
    for &index in ranked.iter() {
        if attempts >= model.retry.max_attempts {
            break;
        }
        if attempts > 0 {
            if !pool.budget.try_withdraw(now_ms()) {
                model.metrics.budget_exhausted.inc();
                break;
            }
            model.metrics.retries.inc();
        }
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if left.is_some_and(|l| l.is_zero()) {
            last = Some(Failure::Timeout);
            break;
        }
        let endpoint = &pool.endpoints[index as usize];
        let Some(attempt) = pool.start(endpoint) else {
            continue;
        };
        attempts += 1;
        let req = upstream_request(endpoint, &out, headers.take().unwrap_or_else(|| upstream_headers(&out)));
        let result = if facts.stream {
            let limit = left.map_or(model.timeouts.first_byte, |l| l.min(model.timeouts.first_byte));
            try_stream(model, req, attempt, record, attempts, limit, &mut resume_ctx).await
        } else {
            let limit = left.map_or(model.timeouts.request, |l| l.min(model.timeouts.request));
            try_whole(model, req, attempt, record, attempts, max_response_bytes, limit).await
        };
        match result {
            Ok(res) => return Forwarded { response: res, failed: None },
            Err((failure, r)) => {
                record = r;
                tracing::debug!(model = %pool.model, endpoint = %endpoint.name, attempt = attempts, "attempt failed: {}", failure.describe());
                last = Some(failure);
            }
        }
    }

    match last {
        Some(Failure::Status(parts, body, endpoint)) => {
            finish_record(record, Some(endpoint), parts.status);
            Forwarded::failed(Response::from_parts(parts, boxed_full(body)), FailKind::ServerError)
        }
        Some(Failure::Timeout) => {
            Forwarded::failed(reply_error(record, ApiError::upstream_timeout(&pool.model)), FailKind::Timeout)
        }
        Some(f @ Failure::Connect(_)) => Forwarded::failed(
            reply_error(record, ApiError::upstream_failed(&pool.model, f.describe())),
            FailKind::Connect,
        ),
        Some(f @ Failure::Broken(_)) => Forwarded::failed(
            reply_error(record, ApiError::upstream_failed(&pool.model, f.describe())),
            FailKind::ServerError,
        ),
        // Every candidate was a half-open circuit already busy with its probe.
        None => Forwarded::failed(
            reply_error(record, ApiError::no_healthy_endpoint(&pool.model, pool.retry_after_secs(now_ms()))),
            FailKind::Unavailable,
        ),
    }
}

/// The canary stage, then the balance stage. The balance stage is the model's plugin if
/// one is published, else (or when it faults) the native default; whatever a plugin
/// answers is sanitised before use. A canary decision moves the chosen version's
/// endpoints to the front and keeps the others behind them as failover, so a failing
/// canary costs a retry, never a failed request.
fn choose(model: &Model, facts: &RequestFacts<'_>, snapshot: &[EndpointSnapshot], ranked: &mut Vec<u32>) {
    let set = model.plugins.current();
    let version = canary_version(model, &set, facts);
    balance(model, &set, facts, snapshot, ranked);
    if let Some(v) = version {
        let of = &model.pool.version_of;
        ranked.sort_by_key(|&i| of.get(i as usize) != Some(&v));
    }
}

fn balance(
    model: &Model,
    set: &PluginSet,
    facts: &RequestFacts<'_>,
    snapshot: &[EndpointSnapshot],
    ranked: &mut Vec<u32>,
) {
    if let Some(binding) = set.balancer(model.index) {
        match binding.select(facts, snapshot, ranked) {
            Ok(()) => {
                sanitize(ranked, snapshot);
                if !ranked.is_empty() || !snapshot.iter().any(|e| e.available) {
                    return;
                }
            }
            Err(fault) => model.plugins.record_fault(&model.pool.model, "balance", binding, &fault),
        }
    }
    let _ = PowerOfTwoChoices.select(facts, snapshot, ranked);
    sanitize(ranked, snapshot);
}

/// The version the canary policy picks for this request, if the model has one bound and
/// more than one version.
fn canary_version(model: &Model, set: &PluginSet, facts: &RequestFacts<'_>) -> Option<u32> {
    let binding = set.canary(model.index)?;
    let pool = &model.pool;
    if pool.versions.len() < 2 {
        return None;
    }
    match binding.canary(wit_request(facts), &pool.version_stats(now_ms())) {
        Ok(v) => {
            pool.versions[v as usize].routed.inc();
            Some(v)
        }
        Err(fault) => {
            model.plugins.record_fault(&pool.model, "canary", binding, &fault);
            None
        }
    }
}

fn reply_error(record: RequestRecord, err: ApiError) -> Response<ResBody> {
    finish_record(record, None, err.status);
    err.into_response()
}

impl Failure {
    fn describe(&self) -> String {
        match self {
            Failure::Connect(e) => format!("connect: {e}"),
            Failure::Broken(e) => format!("connection broken: {e}"),
            Failure::Timeout => "timed out".into(),
            Failure::Status(p, _, _) => format!("status {}", p.status),
        }
    }
}

fn classify(e: crate::client::ClientError) -> Failure {
    match e {
        crate::client::ClientError::Connect(e) => Failure::Connect(e),
        crate::client::ClientError::Broken(e) => Failure::Broken(e),
    }
}

/// A non-streaming attempt: the whole answer within `timeouts.request`.
async fn try_whole(
    model: &Model,
    req: Request<Full<Bytes>>,
    attempt: Attempt,
    record: RequestRecord,
    attempts: u32,
    max_response_bytes: usize,
    limit: Duration,
) -> Result<Response<ResBody>, (Failure, RequestRecord)> {
    let exchange = async {
        let res = model.client().send(&attempt.endpoint().target, req).await.map_err(classify)?;
        let (parts, body) = res.into_parts();
        let bytes = crate::body::collect_limited(body, max_response_bytes).await.map_err(|e| match e {
            CollectError::TooLarge => Failure::Broken(format!("answer over {max_response_bytes} bytes")),
            CollectError::Body(e) => Failure::Broken(error_chain(&e)),
        })?;
        Ok((parts, bytes))
    };
    let result = match tokio::time::timeout(limit, exchange).await {
        Err(_) => Err(Failure::Timeout),
        Ok(r) => r,
    };
    let (mut parts, bytes) = match result {
        Ok(answer) => answer,
        Err(f) => {
            attempt.finish(Outcome::ServerFailure, None);
            return Err((f, record));
        }
    };
    response_headers(&mut parts.headers, attempt.endpoint(), attempts);
    if parts.status.is_server_error() {
        let endpoint = attempt.endpoint().name;
        attempt.finish(Outcome::ServerFailure, None);
        return Err((Failure::Status(parts, bytes, endpoint), record));
    }
    let outcome = if parts.status.is_client_error() { Outcome::ClientError } else { Outcome::Success };
    let endpoint = attempt.endpoint().name;
    attempt.finish(outcome, None);
    let mut record = record;
    if record.counts_tokens() {
        // A 4xx used nothing; an answer without usage keeps the estimate.
        if parts.status.is_client_error() {
            record.settle_tokens(0);
        } else if let Some(used) = crate::ratelimit::usage_total_tokens(&bytes) {
            record.settle_tokens(used);
        }
    }
    // The body is already here: as far as the router's work goes the request is complete.
    finish_record(record, Some(endpoint), parts.status);
    Ok(Response::from_parts(parts, boxed_full(bytes)))
}

fn finish_record(mut record: RequestRecord, endpoint: Option<&'static str>, status: StatusCode) {
    if status.is_server_error() {
        // Nothing was generated for the tenant: give its tokens back.
        record.settle_tokens(0);
    }
    let now = Instant::now();
    record.answered(endpoint, status.as_u16(), now);
    record.finish(Some(now));
}

/// A streaming attempt: headers and first chunk within `timeouts.first_byte`, then relayed.
async fn try_stream(
    model: &Model,
    req: Request<Full<Bytes>>,
    attempt: Attempt,
    mut record: RequestRecord,
    attempts: u32,
    first_byte: Duration,
    resume_ctx: &mut Option<ResumeContext>,
) -> Result<Response<ResBody>, (Failure, RequestRecord)> {
    let started = Instant::now();
    let head = async {
        let res = model.client().send(&attempt.endpoint().target, req).await.map_err(classify)?;
        let (parts, mut body) = res.into_parts();
        if parts.status.is_server_error() {
            let bytes = Limited::new(body, 64 * 1024).collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            return Err(Failure::Status(parts, bytes, attempt.endpoint().name));
        }
        // Wait for the first data frame: until then the client has seen nothing.
        let first = loop {
            match body.frame().await {
                None => break None,
                Some(Err(e)) => return Err(Failure::Broken(error_chain(&e))),
                Some(Ok(f)) if f.data_ref().is_some_and(|d| d.is_empty()) => continue,
                Some(Ok(f)) => break Some(f),
            }
        };
        Ok((parts, body, first))
    };
    let head = match tokio::time::timeout(first_byte, head).await {
        Err(_) => Err(Failure::Timeout),
        Ok(r) => r,
    };
    let (mut parts, body, first) = match head {
        Ok(h) => h,
        Err(mut f) => {
            if let Failure::Status(parts, _, _) = &mut f {
                response_headers(&mut parts.headers, attempt.endpoint(), attempts);
            }
            attempt.finish(Outcome::ServerFailure, None);
            return Err((f, record));
        }
    };
    response_headers(&mut parts.headers, attempt.endpoint(), attempts);
    let ttfb = started.elapsed();
    let outcome = if parts.status.is_client_error() { Outcome::ClientError } else { Outcome::Success };
    let Some(first) = first else {
        let endpoint = attempt.endpoint().name;
        attempt.finish(outcome, Some(ttfb));
        finish_record(record, Some(endpoint), parts.status);
        return Ok(Response::from_parts(parts, boxed_full(Bytes::new())));
    };
    record.answered(Some(attempt.endpoint().name), parts.status.as_u16(), Instant::now());
    parts.headers.remove(header::CONTENT_LENGTH);
    let resume = resume_ctx.take().filter(|_| parts.status.is_success()).map(|mut ctx| {
        ctx.tried.push(attempt.endpoint().index as u32);
        Resumable::new(ctx, model.timeouts.first_byte)
    });
    let body = RelayBody::new(first, body, model.timeouts.idle, attempt, record, ttfb, outcome, resume);
    Ok(Response::from_parts(parts, body.boxed_unsync()))
}

const X_ENDPOINT: &str = "x-switchyard-endpoint";
const X_ATTEMPTS: &str = "x-switchyard-attempts";

/// Headers that describe one hop and must not be forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.iter().any(|h| h == name)
}

/// The header names a message's `Connection` header lists.
fn connection_named(h: &HeaderMap) -> Vec<HeaderName> {
    h.get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::try_from(n.trim()).ok())
        .collect()
}

pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most messages carry none: comparing the few names decides without hashing any.
    if !h.keys().any(is_hop_by_hop) {
        return;
    }
    // Headers named in `Connection` are hop-by-hop too.
    let named = connection_named(h);
    for n in named.iter().chain(HOP_BY_HOP.iter()) {
        h.remove(n);
    }
}

/// The client's headers as every attempt sends them.
pub(crate) fn upstream_headers(out: &Outbound<'_>) -> HeaderMap {
    let src = &out.parts.headers;
    // Headers that `Connection` names are hop-by-hop too; rare, so looked for only then.
    let named = if src.keys().any(|n| n == header::CONNECTION) { connection_named(src) } else { Vec::new() };
    // Built in one pass rather than copied and trimmed: the copy's removals hash, and a
    // copy has no room left, so the forwarded headers and the endpoint's `Host` (set by the
    // client) would grow it.
    let mut h = HeaderMap::with_capacity(src.len() + 3);
    let mut forwarded_for: Option<&HeaderValue> = None;
    for (name, value) in src {
        // `Host` is the endpoint's; the length is the body's own.
        if name == header::HOST || name == header::CONTENT_LENGTH || is_hop_by_hop(name) || named.contains(name) {
            continue;
        }
        if name == X_FORWARDED_FOR && out.client_addr.is_some() {
            forwarded_for.get_or_insert(value);
            continue;
        }
        h.append(name.clone(), value.clone());
    }
    if let Some(addr) = out.client_addr {
        let value = match forwarded_for.and_then(|v| v.to_str().ok()) {
            Some(prev) => HeaderValue::try_from(format!("{prev}, {}", addr.ip())).ok(),
            None => ip_header(addr.ip()),
        };
        if let Some(v) = value {
            h.insert(X_FORWARDED_FOR, v);
        }
    }
    h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(if out.tls { "https" } else { "http" }));
    h
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// `ip` as a header value. The last one is remembered per thread: the requests of a
/// keep-alive connection, and every connection of a load balancer in front, share it, and
/// formatting an address was ~3% of the router's CPU per request.
fn ip_header(ip: std::net::IpAddr) -> Option<HeaderValue> {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(std::net::IpAddr, HeaderValue)>> = const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if let Some((seen, v)) = &*last
            && *seen == ip
        {
            return Some(v.clone());
        }
        let v = HeaderValue::try_from(ip.to_string()).ok()?;
        *last = Some((ip, v.clone()));
        Some(v)
    })
}

/// `url` (scheme, authority and path prefix) joined with a request's path and query.
pub(crate) fn uri_for(url: &crate::config::UpstreamUrl, pq: &str) -> http::Uri {
    let b = http::Uri::builder().scheme(url.scheme.clone()).authority(url.authority.clone());
    if url.prefix.is_empty() { b.path_and_query(pq) } else { b.path_and_query(format!("{}{pq}", url.prefix)) }
        .build()
        .expect("upstream url and request path were validated")
}

/// The request for one attempt, in origin form (the client adds `Host` from the endpoint's
/// target). Without a path prefix the client's path and query are reused as parsed.
fn upstream_request(ep: &Endpoint, out: &Outbound<'_>, headers: HeaderMap) -> Request<Full<Bytes>> {
    let pq = out.parts.uri.path_and_query();
    let uri = match pq {
        Some(pq) if ep.url.prefix.is_empty() => http::Uri::from(pq.clone()),
        _ => {
            let pq = pq.map_or("/", |pq| pq.as_str());
            http::Uri::try_from(format!("{}{pq}", ep.url.prefix)).expect("prefix and request path were validated")
        }
    };
    let mut req = Request::new(Full::new(out.body.clone()));
    *req.method_mut() = out.parts.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    req
}

fn response_headers(h: &mut HeaderMap, ep: &Endpoint, attempts: u32) {
    strip_hop_by_hop(h);
    h.insert(X_ENDPOINT, ep.header_value.clone());
    if attempts > 1 {
        h.insert(X_ATTEMPTS, HeaderValue::from(attempts));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbound<'a>(parts: &'a http::request::Parts, addr: &str, tls: bool) -> Outbound<'a> {
        Outbound { parts, body: Bytes::new(), client_addr: Some(addr.parse().unwrap()), tls }
    }

    #[test]
    fn upstream_headers_name_the_client_and_drop_this_hop() {
        let req = Request::post("/v1/chat/completions")
            .header("host", "router.example")
            .header("connection", "keep-alive, x-hop")
            .header("x-hop", "1")
            .header("authorization", "Bearer sk-1")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        for (addr, want) in
            [("10.0.0.7:5000", "10.0.0.7"), ("10.0.0.8:5001", "10.0.0.8"), ("10.0.0.7:5002", "10.0.0.7")]
        {
            let h = upstream_headers(&outbound(&parts, addr, false));
            assert_eq!(h["x-forwarded-for"], want, "each request names its own client");
            assert_eq!(h["x-forwarded-proto"], "http");
            assert_eq!(h["authorization"], "Bearer sk-1");
            for gone in ["host", "connection", "x-hop"] {
                assert!(!h.contains_key(gone), "{gone} must not be forwarded");
            }
        }
        let h = upstream_headers(&outbound(&parts, "[2001:db8::1]:443", true));
        assert_eq!(h["x-forwarded-for"], "2001:db8::1");
        assert_eq!(h["x-forwarded-proto"], "https");
    }

    #[test]
    fn the_client_length_is_dropped_and_headers_without_hop_by_hop_ones_are_kept_whole() {
        let req = Request::post("/v1/completions")
            .header("host", "router.example")
            .header("content-length", "2")
            .header("content-type", "application/json")
            .header("x-request-id", "r1")
            .header("accept", "text/event-stream")
            .header("accept", "application/json")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let h = upstream_headers(&outbound(&parts, "10.0.0.7:5000", false));
        assert!(!h.contains_key("content-length") && !h.contains_key("host"));
        let accept: Vec<_> = h.get_all("accept").iter().collect();
        assert_eq!(accept, ["text/event-stream", "application/json"], "every value of a repeated header");
        // Room is left for what the client adds (`Host`): no regrowth per request.
        assert!(h.capacity() > h.len());
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["x-request-id"], "r1");

        // An answer: nothing hop-by-hop stays as it was; `Keep-Alive`, `Transfer-Encoding`
        // and what `Connection` names go.
        let mut plain = HeaderMap::new();
        plain.insert("content-type", HeaderValue::from_static("text/event-stream"));
        plain.append("x-a", HeaderValue::from_static("1"));
        plain.append("x-a", HeaderValue::from_static("2"));
        let before = plain.clone();
        strip_hop_by_hop(&mut plain);
        assert_eq!(plain, before);
        let mut hop = before.clone();
        hop.insert("connection", HeaderValue::from_static("x-a"));
        hop.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        hop.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        strip_hop_by_hop(&mut hop);
        let mut want = before;
        want.remove("x-a");
        assert_eq!(hop, want);
    }

    #[test]
    fn an_existing_forwarded_for_chain_is_extended() {
        let req = Request::post("/").header("x-forwarded-for", "203.0.113.9").body(()).unwrap();
        let (parts, ()) = req.into_parts();
        let h = upstream_headers(&outbound(&parts, "10.0.0.7:5000", false));
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 10.0.0.7");
    }
}
