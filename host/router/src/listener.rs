//! The listener: accepts TCP (optionally TLS) connections and serves HTTP/1.1 and HTTP/2 on
//! them with hyper. On SIGTERM/SIGINT it stops accepting, lets in-flight requests and
//! streams finish within the grace period, then returns.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, TlsConfig};
use crate::router::{Peer, Router};

struct Bound {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    admin: bool,
}

std::thread_local! {
    /// Which data-plane worker this thread is (`usize::MAX` off the data plane).
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

/// The data-plane worker running on this thread, if any.
pub fn worker_index() -> Option<usize> {
    let w = WORKER.with(|w| w.get());
    (w != usize::MAX).then_some(w)
}

/// Serves until a shutdown signal, thread-per-core: `workers` threads, each with its own
/// single-threaded runtime, its own `SO_REUSEPORT` socket per listener, and its own upstream
/// connection pool, so a request and the upstream connection serving it stay on one thread
/// (no cross-thread wake-ups on the hot path, as in nginx). The calling runtime keeps the
/// control plane: admin API, health checks, the plugin watcher, the supervisor, signals.
///
/// Prints one line per listener on stdout once every worker listens:
/// `listening on http://ADDR` (or `https://`), and `admin listening on http://ADDR`.
pub async fn serve(cfg: &Config, router: Arc<Router>, workers: usize) -> anyhow::Result<()> {
    // The router lives until the process exits. Held by `'static` reference, a request
    // writes no reference count that every worker writes too (as cloning an `Arc` would).
    let router: &'static Router = Box::leak(Box::new(router));
    let (stop_tx, stop_rx) = watch::channel(false);
    let builder = Arc::new(http_builder(cfg));
    let handshake_timeout = cfg.limits.header_read_timeout;
    let grace = cfg.limits.shutdown_grace;

    // The admin API runs on the control runtime.
    let mut control = Vec::new();
    let admin_graceful = Arc::new(GracefulShutdown::new());
    if cfg.admin.enabled {
        let listener = TcpListener::bind(cfg.admin.addr)
            .await
            .with_context(|| format!("cannot listen on {} (admin)", cfg.admin.addr))?;
        println!("admin listening on http://{}", listener.local_addr()?);
        let b = Bound { listener, tls: None, admin: true };
        control.push(tokio::spawn(accept_loop(
            b,
            router,
            builder.clone(),
            admin_graceful.clone(),
            stop_rx.clone(),
            handshake_timeout,
        )));
    }

    // Resolve each listener's address once (port 0 becomes a real port) so every worker
    // binds the same one.
    let mut plans = Vec::new();
    let mut first_sockets = Vec::new();
    for l in &cfg.listeners {
        let tls = match &l.tls {
            Some(t) => Some(TlsAcceptor::from(Arc::new(tls_config(t)?))),
            None => None,
        };
        let first = reuseport_listener(l.addr).with_context(|| format!("cannot listen on {}", l.addr))?;
        let addr = first.local_addr()?;
        plans.push((addr, tls));
        first_sockets.push(first.into_std()?);
    }

    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    let mut threads = Vec::new();
    let mut first_sockets = Some(first_sockets);
    for w in 0..workers {
        let (builder, plans, mut stop) = (builder.clone(), plans.clone(), stop_rx.clone());
        let ready_tx = ready_tx.clone();
        let firsts = if w == 0 { first_sockets.take() } else { None };
        threads.push(std::thread::Builder::new().name(format!("worker-{w}")).spawn(move || {
            WORKER.with(|c| c.set(w));
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
            };
            rt.block_on(async move {
                let graceful = Arc::new(GracefulShutdown::new());
                let mut tasks = Vec::new();
                for (i, (addr, tls)) in plans.into_iter().enumerate() {
                    let listener = match &firsts {
                        Some(f) => {
                            f[i].try_clone().map_err(anyhow::Error::from).and_then(|s| Ok(TcpListener::from_std(s)?))
                        }
                        None => reuseport_listener(addr).map_err(anyhow::Error::from),
                    };
                    let listener = match listener {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.context(format!("worker {w}: cannot listen on {addr}"))));
                            return;
                        }
                    };
                    let b = Bound { listener, tls, admin: false };
                    let (builder, graceful, stop) = (builder.clone(), graceful.clone(), stop.clone());
                    tasks.push(tokio::spawn(accept_loop(b, router, builder, graceful, stop, handshake_timeout)));
                }
                drop(firsts);
                let _ = ready_tx.send(Ok(()));
                let _ = stop.wait_for(|s| *s).await;
                for t in tasks {
                    let _ = t.await;
                }
                drain(graceful, grace, w).await;
            });
        })?);
    }
    drop(ready_tx);
    for _ in 0..workers {
        ready_rx.recv().context("a worker thread died while starting")??;
    }
    for (addr, tls) in &plans {
        // Tests and scripts read this line to learn the port when `addr` asks for port 0.
        println!("listening on {}://{addr}", if tls.is_some() { "https" } else { "http" });
        tracing::info!(%addr, tls = tls.is_some(), workers, "listening");
    }

    wait_for_signal().await;
    tracing::info!("shutdown signal: draining");
    router.begin_drain();
    let _ = stop_tx.send(true);
    for t in control {
        let _ = t.await;
    }
    let joined = tokio::task::spawn_blocking(move || {
        for t in threads {
            let _ = t.join();
        }
    });
    let _ = joined.await;
    drain(admin_graceful, grace, usize::MAX).await;
    // Model servers go last: they were answering the requests drained above.
    router.supervisor.shutdown().await;
    Ok(())
}

fn http_builder(cfg: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(cfg.limits.header_read_timeout).keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .max_concurrent_streams(1024);
    builder
}

fn reuseport_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept_loop(
    b: Bound,
    router: &'static Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    graceful: Arc<GracefulShutdown>,
    mut stop: watch::Receiver<bool>,
    handshake_timeout: Duration,
) {
    loop {
        let (stream, addr) = tokio::select! {
            r = b.listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let conn = Connection {
            router,
            builder: builder.clone(),
            watcher: graceful.watcher(),
            tls: b.tls.clone(),
            admin: b.admin,
            handshake_timeout,
        };
        tokio::spawn(conn.run(stream, addr));
    }
    // Dropping the listener here closes the socket: new connections are refused.
}

/// Waits for this runtime's connections to finish, up to the grace period.
async fn drain(graceful: Arc<GracefulShutdown>, grace: Duration, worker: usize) {
    let Some(graceful) = Arc::into_inner(graceful) else {
        tracing::warn!(worker, "connections still referenced; not waiting for them");
        return;
    };
    match tokio::time::timeout(grace, graceful.shutdown()).await {
        Ok(()) => tracing::debug!(worker, "connections finished"),
        Err(_) => tracing::warn!(worker, ?grace, "grace period over; closing remaining connections"),
    }
}

struct Connection {
    router: &'static Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: Watcher,
    tls: Option<TlsAcceptor>,
    admin: bool,
    handshake_timeout: Duration,
}

impl Connection {
    async fn run(self, stream: TcpStream, addr: SocketAddr) {
        let peer = Peer { addr: Some(addr), tls: self.tls.is_some() };
        let router = self.router;
        let admin = self.admin;
        let svc = service_fn(move |req| {
            async move {
                // The request's future is a few KB and hyper moves the service future on its
                // way into the connection task: on the heap it is written once.
                let res =
                    if admin { router.handle_admin(req, peer).await } else { Box::pin(router.handle(req, peer)).await };
                Ok::<_, std::convert::Infallible>(res)
            }
        });
        match &self.tls {
            None => {
                let conn = self.builder.serve_connection(TokioIo::new(stream), svc);
                let _ = self.watcher.watch(conn.into_owned()).await;
            }
            Some(acceptor) => {
                let tls = match tokio::time::timeout(self.handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%addr, "TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => return,
                };
                let conn = self.builder.serve_connection(TokioIo::new(tls), svc);
                let _ = self.watcher.watch(conn.into_owned()).await;
            }
        }
    }
}

pub fn tls_config(t: &TlsConfig) -> anyhow::Result<ServerConfig> {
    let certs = read_certs(&t.cert)?;
    let key = PrivateKeyDer::from_pem_file(&t.key)
        .with_context(|| format!("{}: cannot read a PEM private key", t.key.display()))?;
    let mut cfg = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!("{} / {}: certificate and key do not form a valid pair", t.cert.display(), t.key.display())
        })?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("{}: cannot read certificate file", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: invalid PEM certificate", path.display()))?;
    if certs.is_empty() {
        bail!("{}: no certificate found", path.display());
    }
    Ok(certs)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
