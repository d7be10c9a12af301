//! The upstream HTTP/1.1 client: keep-alive connections to model servers, pooled per host.
//!
//! Each data-plane worker owns one client per model (see `Model::client`), so a pooled
//! connection, its connection task and the request that uses it all live on one thread and
//! the pool's lock is never contended. Compared with a general-purpose client it does less
//! per request: a checkout is a lock, a scan of that host's idle connections and a pop; a
//! connection goes back to the pool the moment its response body ends ([`PooledBody`]); no
//! task is spawned per request.
//!
//! Behaviour a proxy relies on:
//! - **Failure classes.** [`ClientError::Connect`] when no connection could be made (DNS,
//!   refused, the connect timeout): nothing reached the server. [`ClientError::Broken`] for
//!   everything after (reset, closed mid-answer, malformed answer).
//! - **Stale connections.** A server may close an idle keep-alive connection at any time. A
//!   pooled connection whose close has been seen is never handed out, and a request that
//!   finds its connection closed before any byte of it was written is sent again on another
//!   one. A request written into a connection the server closed at that very moment fails
//!   as `Broken` (it may have reached the server); the forwarder's retry takes it from there.
//! - **Cancellation.** Dropping a request's future (a timeout) closes that connection; it
//!   never returns to the pool. So does dropping a response body before its end.
//! - **Idle limits.** A connection idle longer than `idle_timeout` is closed when a checkout
//!   meets it or when any connection of this client comes back; at most
//!   `max_idle_per_host` idle connections are kept per host. A body that ends before it
//!   starts (204, `content-length: 0`) returns its connection at once, polled or not.
//! - **Connect.** One timeout covers resolving and connecting; a name's addresses are tried
//!   in turn, each with its share of it. `TCP_NODELAY` on; keep-alive probes on at the
//!   kernel's interval (idle pooled connections are closed long before they matter, and a
//!   stalled stream is cut by the forwarder's idle timeout).
//!
//! The request path sends to a prepared [`Target`] (`send`, origin-form requests); other
//! callers may pass an absolute URI (`request`, `http://host:port/path`): the client
//! connects to its authority, sends the path in origin form and sets `Host`.

use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery};
use http::{HeaderValue, Request, Response, Uri, header};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

type Sender = SendRequest<Full<Bytes>>;

/// How many times a request is moved to another connection when the one it was given
/// turned out closed before the request was written.
const STALE_RETRIES: usize = 3;

/// A pooled keep-alive HTTP/1.1 client; cheap to clone (the clones share the pool).
#[derive(Clone)]
pub struct UpstreamClient {
    inner: Arc<Inner>,
}

struct Inner {
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle_per_host: usize,
    /// Idle connections per host, most recently used last. Few hosts per client (a model's
    /// endpoints), so a scan beats hashing.
    idle: Mutex<Vec<Host>>,
}

struct Host {
    authority: Authority,
    conns: Vec<Idle>,
}

struct Idle {
    sender: Sender,
    since: Instant,
}

/// Where one endpoint's requests go: its authority and `Host` value, worked out once.
///
/// Both are built over process-lifetime strings ([`Target::for_process`]; endpoints are
/// fixed when the router starts), so copying them per request writes no reference count
/// that the other worker threads write too, and the pool finds the target's connections by
/// address before comparing names.
#[derive(Clone, Debug)]
pub struct Target {
    authority: Authority,
    host: HeaderValue,
}

impl Target {
    /// Builds the target of `authority`, keeping its text for the rest of the process:
    /// meant for the router's endpoints, a fixed set, never for per-request values.
    pub fn for_process(authority: &Authority) -> Target {
        let text: &'static str = Box::leak(authority.as_str().to_owned().into_boxed_str());
        let host = host_of(text);
        Target {
            authority: Authority::from_maybe_shared(Bytes::from_static(text.as_bytes()))
                .expect("a parsed authority stays valid"),
            host: HeaderValue::from_maybe_shared(Bytes::from_static(host.as_bytes()))
                .expect("an authority is a valid header value"),
        }
    }

    pub fn authority(&self) -> &Authority {
        &self.authority
    }
}

/// The `Host` value of an authority: without the URL's `user:pass@`.
fn host_of(authority: &str) -> &str {
    authority.rsplit_once('@').map_or(authority, |(_, host)| host)
}

/// Same authority: the same process-lifetime text (a [`Target`]'s), or equal text.
fn same_authority(a: &Authority, b: &Authority) -> bool {
    std::ptr::eq(a.as_str(), b.as_str()) || a == b
}

/// Why a request got no response.
#[derive(Debug)]
pub enum ClientError {
    /// No connection: nothing was sent.
    Connect(String),
    /// The connection failed after the request was (or may have been) sent.
    Broken(String),
}

impl ClientError {
    pub fn is_connect(&self) -> bool {
        matches!(self, ClientError::Connect(_))
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect(e) => write!(f, "connect: {e}"),
            ClientError::Broken(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for ClientError {}

impl UpstreamClient {
    pub fn new(connect_timeout: Duration, idle_timeout: Duration, max_idle_per_host: usize) -> Self {
        UpstreamClient {
            inner: Arc::new(Inner { connect_timeout, idle_timeout, max_idle_per_host, idle: Mutex::new(Vec::new()) }),
        }
    }

    /// Sends `req` (origin-form URI, no `Host` needed) to `target`: the request path's way
    /// in, with the target's authority and `Host` worked out once instead of per request.
    pub async fn send(
        &self,
        target: &Target,
        mut req: Request<Full<Bytes>>,
    ) -> Result<Response<PooledBody>, ClientError> {
        req.headers_mut().insert(header::HOST, target.host.clone());
        self.send_origin(target.authority.clone(), req).await
    }

    /// Sends `req` (absolute URI, `http` scheme) and returns the response head; the body
    /// streams from the connection, which returns to the pool when the body ends.
    pub async fn request(&self, mut req: Request<Full<Bytes>>) -> Result<Response<PooledBody>, ClientError> {
        let uri = req.uri();
        if uri.scheme().is_some_and(|s| s != &http::uri::Scheme::HTTP) {
            return Err(ClientError::Connect(format!("unsupported scheme in {uri}")));
        }
        let Some(authority) = uri.authority().cloned() else {
            return Err(ClientError::Connect(format!("no host in {uri}")));
        };
        let origin = uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(origin);
        if !req.headers().contains_key(header::HOST) {
            let host = HeaderValue::from_str(host_of(authority.as_str()))
                .map_err(|_| ClientError::Connect(format!("invalid host {authority}")))?;
            req.headers_mut().insert(header::HOST, host);
        }
        self.send_origin(authority, req).await
    }

    async fn send_origin(
        &self,
        authority: Authority,
        mut req: Request<Full<Bytes>>,
    ) -> Result<Response<PooledBody>, ClientError> {
        // Pooled connections first; after `STALE_RETRIES` stale ones, a fresh one decides.
        for tries in 0.. {
            let pooled = if tries < STALE_RETRIES { self.inner.checkout(&authority) } else { None };
            let reused = pooled.is_some();
            let mut sender = match pooled {
                Some(s) => s,
                // Boxed: the connect path is cold and its future large; every request's
                // future would carry it otherwise.
                None => Box::pin(self.connect(&authority)).await?,
            };
            match sender.try_send_request(req).await {
                Ok(res) => return Ok(self.lend(res, authority, sender)),
                Err(mut e) => match e.take_message() {
                    // Never written: the pooled connection had closed. Try another.
                    Some(back) if reused => req = back,
                    _ => return Err(ClientError::Broken(error_chain(e.error()))),
                },
            }
        }
        unreachable!("the loop returns")
    }

    /// The response, its body holding the connection until it ends.
    fn lend(&self, res: Response<Incoming>, authority: Authority, sender: Sender) -> Response<PooledBody> {
        let lease = Lease { pool: self.inner.clone(), authority, sender };
        res.map(|body| {
            let mut body = PooledBody { inner: body, lease: Some(lease) };
            // A body that is over before it starts (204, HEAD, `content-length: 0`) may never
            // be polled (hyper's server skips it): its connection goes back now.
            if body.inner.is_end_stream() {
                body.release();
            }
            body
        })
    }

    /// Opens a connection within the connect timeout and starts its connection task on
    /// this thread's runtime.
    async fn connect(&self, authority: &Authority) -> Result<Sender, ClientError> {
        let timeout = self.inner.connect_timeout;
        let io = match tokio::time::timeout(timeout, open(authority, timeout)).await {
            Err(_) => return Err(ClientError::Connect(format!("{authority}: timed out after {timeout:?}"))),
            Ok(Err(e)) => return Err(ClientError::Connect(format!("{authority}: {e}"))),
            Ok(Ok(io)) => io,
        };
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| ClientError::Connect(format!("{authority}: {}", error_chain(&e))))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::trace!("upstream connection ended: {e}");
            }
        });
        Ok(sender)
    }

    /// Idle connections in the pool (tests).
    pub fn idle_count(&self) -> usize {
        self.inner.idle.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|h| h.conns.len()).sum()
    }
}

impl Inner {
    /// The most recently used live idle connection to `authority`; closed and expired ones
    /// met on the way are dropped.
    fn checkout(&self, authority: &Authority) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let host = idle.iter_mut().find(|h| same_authority(&h.authority, authority))?;
        while let Some(c) = host.conns.pop() {
            if c.since.elapsed() <= self.idle_timeout && c.sender.is_ready() {
                return Some(c.sender);
            }
        }
        None
    }

    fn checkin(&self, authority: Authority, sender: Sender) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let i = match idle.iter().position(|h| same_authority(&h.authority, &authority)) {
            Some(i) => i,
            None => {
                idle.push(Host { authority, conns: Vec::new() });
                idle.len() - 1
            }
        };
        // The oldest are at the front: those idle too long are closed here, for every host
        // (a client serves a model's few endpoints), so neither a burst's connections behind
        // the few that steady traffic reuses, nor those of an endpoint traffic left (ejected,
        // drained), stay open.
        let now = Instant::now();
        for host in idle.iter_mut() {
            let expired = host.conns.iter().take_while(|c| now.duration_since(c.since) > self.idle_timeout).count();
            host.conns.drain(..expired);
        }
        if self.max_idle_per_host == 0 {
            return;
        }
        let conns = &mut idle[i].conns;
        if conns.len() >= self.max_idle_per_host {
            // The oldest goes (it is the likeliest to be closed by the server).
            conns.remove(0);
        }
        conns.push(Idle { sender, since: now });
    }
}

/// A connected socket to `authority` (an IP literal, or a name resolved here), with
/// `TCP_NODELAY` and keep-alive probes on. A name's addresses are tried in turn, each with
/// its share of `timeout`: one that silently drops the attempt (a stale address, a family
/// without a route) cannot use up the time the next one needs.
async fn open(authority: &Authority, timeout: Duration) -> std::io::Result<tokio::net::TcpStream> {
    let port = authority.port_u16().unwrap_or(80);
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = match host.parse::<std::net::IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((host, port)).await?.collect(),
    };
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, format!("no address for {host}"));
    let share = timeout / addrs.len().max(1) as u32;
    for addr in addrs {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_nodelay(true)?;
        socket.set_keepalive(true)?;
        match tokio::time::timeout(share, socket.connect(addr)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last = e,
            Err(_) => last = std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{addr}: timed out")),
        }
    }
    Err(last)
}

/// `e` and its sources, joined by `: `.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// A connection on loan to one response: back to the pool when the body has ended.
struct Lease {
    pool: Arc<Inner>,
    authority: Authority,
    sender: Sender,
}

impl Lease {
    fn release(self) {
        let Lease { pool, authority, mut sender } = self;
        if sender.is_ready() {
            pool.checkin(authority, sender);
        } else if !sender.is_closed() {
            // The connection task has not taken up the next request yet (it does so on its
            // next poll, on this thread). The wait is bounded: a server that answered before
            // reading all of the request and then neither reads nor closes would otherwise
            // hold this task and its socket forever.
            tokio::spawn(async move {
                if let Ok(Ok(())) = tokio::time::timeout(pool.idle_timeout, sender.ready()).await {
                    pool.checkin(authority, sender);
                }
            });
        }
    }
}

/// An upstream response body. Its connection returns to the pool when the last frame has
/// been read; dropped earlier, the connection closes with it.
pub struct PooledBody {
    inner: Incoming,
    lease: Option<Lease>,
}

impl fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledBody").field("pooled", &self.lease.is_some()).finish_non_exhaustive()
    }
}

impl PooledBody {
    fn release(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.release();
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            None => self.release(),
            Some(Ok(_)) if self.inner.is_end_stream() => self.release(),
            // A failed body leaves the connection in an unknown state.
            Some(Err(_)) => self.lease = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// How the scripted server answers each request on a connection.
    #[derive(Clone, Copy)]
    enum Script {
        /// `200 ok`, keep-alive.
        KeepAlive,
        /// `200 ok` without `Connection: close`; 10 ms later the server closes the connection
        /// (an idle timeout).
        CloseAfterAnswer,
        /// A chunked body whose end is never sent.
        EndlessChunks,
        /// `204 No Content`, keep-alive.
        NoContent,
    }

    struct Server {
        addr: SocketAddr,
        connections: Arc<AtomicUsize>,
        heads: Arc<Mutex<Vec<String>>>,
    }

    async fn server(script: Script) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (c, h) = (connections.clone(), heads.clone());
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                c.fetch_add(1, Ordering::SeqCst);
                let h = h.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let mut chunk = [0u8; 4096];
                        let n = s.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
                        h.lock().unwrap().push(String::from_utf8_lossy(&buf[..end]).into_owned());
                        buf.drain(..end + 4);
                        match script {
                            Script::KeepAlive | Script::CloseAfterAnswer => {
                                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.unwrap();
                                if matches!(script, Script::CloseAfterAnswer) {
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                    return;
                                }
                            }
                            Script::NoContent => {
                                s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await.unwrap();
                            }
                            Script::EndlessChunks => {
                                s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n")
                                    .await
                                    .unwrap();
                            }
                        }
                    }
                });
            }
        });
        Server { addr, connections, heads }
    }

    fn client() -> UpstreamClient {
        UpstreamClient::new(Duration::from_secs(2), Duration::from_secs(90), 16)
    }

    fn get(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
        Request::get(format!("http://{addr}{path}")).body(Full::new(Bytes::new())).unwrap()
    }

    async fn text(c: &UpstreamClient, req: Request<Full<Bytes>>) -> String {
        let res = c.request(req).await.unwrap();
        assert_eq!(res.status(), 200);
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn keeps_one_connection_alive_for_sequential_requests() {
        let s = server(Script::KeepAlive).await;
        let c = client();
        for _ in 0..5 {
            assert_eq!(text(&c, get(s.addr, "/v1/models")).await, "ok");
        }
        assert_eq!(s.connections.load(Ordering::SeqCst), 1);
        assert_eq!(c.idle_count(), 1);
    }

    #[tokio::test]
    async fn sends_origin_form_with_the_host_header() {
        let s = server(Script::KeepAlive).await;
        text(&client(), get(s.addr, "/health?deep=1")).await;
        let head = s.heads.lock().unwrap()[0].to_lowercase();
        assert!(head.starts_with("get /health?deep=1 http/1.1\r\n"), "{head}");
        assert!(head.contains(&format!("\r\nhost: {}", s.addr)), "{head}");
    }

    #[tokio::test]
    async fn a_prepared_target_sets_host_and_shares_the_pool_with_absolute_uris() {
        let s = server(Script::KeepAlive).await;
        let c = client();
        let authority: Authority = s.addr.to_string().parse().unwrap();
        let target = Target::for_process(&authority);
        assert_eq!(target.authority(), &authority);
        for i in 0..3 {
            // Origin form, and a client `Host` that must not reach the upstream.
            let req = Request::post("/v1/chat/completions?x=1")
                .header(header::HOST, "router.example")
                // Empty: the scripted server reads heads only.
                .body(Full::new(Bytes::new()))
                .unwrap();
            let res = c.send(&target, req).await.unwrap();
            assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "ok", "request {i}");
        }
        // The same endpoint named by an absolute URI (a health check) finds the same
        // pooled connection: the pool matches the text, not only the target's address.
        assert_eq!(text(&c, get(s.addr, "/health")).await, "ok");
        assert_eq!(s.connections.load(Ordering::SeqCst), 1);
        let heads = s.heads.lock().unwrap().clone();
        assert_eq!(heads.len(), 4);
        for head in &heads[..3] {
            let head = head.to_lowercase();
            assert!(head.starts_with("post /v1/chat/completions?x=1 http/1.1\r\n"), "{head}");
            assert!(head.contains(&format!("\r\nhost: {}", s.addr)), "{head}");
            assert!(!head.contains("router.example"), "{head}");
        }
    }

    #[test]
    fn a_target_keeps_userinfo_out_of_host() {
        let target = Target::for_process(&"user:pw@10.0.0.1:9000".parse().unwrap());
        assert_eq!(target.host, "10.0.0.1:9000");
        assert_eq!(target.authority().as_str(), "user:pw@10.0.0.1:9000");
        // Equal text at another address is the same authority; other text is not.
        let same: Authority = "user:pw@10.0.0.1:9000".parse().unwrap();
        assert!(same_authority(target.authority(), &same));
        assert!(same_authority(target.authority(), target.authority()));
        assert!(!same_authority(target.authority(), &"10.0.0.1:9000".parse().unwrap()));
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_not_reused() {
        let s = server(Script::CloseAfterAnswer).await;
        let c = client();
        for i in 0..5 {
            assert_eq!(text(&c, get(s.addr, "/")).await, "ok", "request {i}");
            // The server closes the connection while it is idle in the pool: it must not
            // be used again.
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        assert_eq!(s.connections.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_takes_its_connection_with_it() {
        let s = server(Script::EndlessChunks).await;
        let c = client();
        for _ in 0..2 {
            let mut body = c.request(get(s.addr, "/")).await.unwrap().into_body();
            let first = body.frame().await.unwrap().unwrap();
            assert_eq!(first.data_ref().unwrap(), &Bytes::from_static(b"hi"));
            drop(body);
            assert_eq!(c.idle_count(), 0);
        }
        assert_eq!(s.connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_bursts_connections_close_once_idle_too_long() {
        let s = server(Script::KeepAlive).await;
        let c = UpstreamClient::new(Duration::from_secs(2), Duration::from_millis(500), 16);
        // Three at once: three connections, all pooled afterwards.
        let (a, b, d) =
            tokio::join!(text(&c, get(s.addr, "/")), text(&c, get(s.addr, "/")), text(&c, get(s.addr, "/")));
        assert_eq!((a.as_str(), b.as_str(), d.as_str()), ("ok", "ok", "ok"));
        assert_eq!(c.idle_count(), 3);
        // Steady traffic then reuses the most recent one only; the other two outlive the
        // idle timeout behind it and are closed when it comes back.
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(60)).await;
            text(&c, get(s.addr, "/")).await;
        }
        assert_eq!(s.connections.load(Ordering::SeqCst), 3);
        assert_eq!(c.idle_count(), 1);
    }

    #[tokio::test]
    async fn an_answer_without_a_body_returns_its_connection_unread() {
        let s = server(Script::NoContent).await;
        let c = client();
        for _ in 0..3 {
            let res = c.request(get(s.addr, "/")).await.unwrap();
            assert_eq!(res.status(), 204);
            drop(res); // never polled, as hyper's server does with an empty body
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert_eq!(c.idle_count(), 1);
        }
        assert_eq!(s.connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_host_traffic_left_has_its_idle_connections_closed() {
        let (a, b) = (server(Script::KeepAlive).await, server(Script::KeepAlive).await);
        let c = UpstreamClient::new(Duration::from_secs(2), Duration::from_millis(50), 16);
        text(&c, get(a.addr, "/")).await;
        tokio::time::sleep(Duration::from_millis(120)).await;
        // Only `b` gets traffic now: its connection coming back closes `a`'s stale one.
        text(&c, get(b.addr, "/")).await;
        assert_eq!(c.idle_count(), 1);
    }

    #[tokio::test]
    async fn a_pool_of_size_zero_keeps_nothing() {
        let s = server(Script::KeepAlive).await;
        let c = UpstreamClient::new(Duration::from_secs(2), Duration::from_secs(90), 0);
        for _ in 0..2 {
            assert_eq!(text(&c, get(s.addr, "/")).await, "ok");
        }
        assert_eq!(c.idle_count(), 0);
        assert_eq!(s.connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn the_host_header_leaves_out_credentials() {
        let s = server(Script::KeepAlive).await;
        let req = Request::get(format!("http://user:secret@{}/", s.addr)).body(Full::new(Bytes::new())).unwrap();
        text(&client(), req).await;
        let head = s.heads.lock().unwrap()[0].to_lowercase();
        assert!(head.contains(&format!("\r\nhost: {}", s.addr)), "{head}");
        assert!(!head.contains("secret"), "{head}");
    }

    #[tokio::test]
    async fn a_host_name_is_resolved() {
        let s = server(Script::KeepAlive).await;
        let req = Request::get(format!("http://localhost:{}/", s.addr.port())).body(Full::new(Bytes::new())).unwrap();
        assert_eq!(text(&client(), req).await, "ok");
        let head = s.heads.lock().unwrap()[0].to_lowercase();
        assert!(head.contains(&format!("\r\nhost: localhost:{}", s.addr.port())), "{head}");
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let e = client().request(get(addr, "/")).await.unwrap_err();
        assert!(e.is_connect(), "{e}");
    }

    #[tokio::test]
    async fn an_idle_connection_past_its_timeout_is_not_reused() {
        let s = server(Script::KeepAlive).await;
        let c = UpstreamClient::new(Duration::from_secs(2), Duration::from_millis(50), 16);
        text(&c, get(s.addr, "/")).await;
        tokio::time::sleep(Duration::from_millis(120)).await;
        text(&c, get(s.addr, "/")).await;
        assert_eq!(s.connections.load(Ordering::SeqCst), 2);
    }
}
