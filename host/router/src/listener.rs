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

use crate::config::{Config, ListenerConfig, TlsConfig};
use crate::router::{Peer, Router};

struct Bound {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    admin: bool,
}

/// Binds every configured listener, prints each bound address on stdout (one line each,
/// `listening on http://ADDR` or `https://`), then serves until a shutdown signal.
pub async fn serve(cfg: &Config, router: Arc<Router>) -> anyhow::Result<()> {
    let mut bound = Vec::new();
    if cfg.admin.enabled {
        let listener = TcpListener::bind(cfg.admin.addr)
            .await
            .with_context(|| format!("cannot listen on {} (admin)", cfg.admin.addr))?;
        println!("admin listening on http://{}", listener.local_addr()?);
        bound.push(Bound { listener, tls: None, admin: true });
    }
    for l in &cfg.listeners {
        bound.push(bind(l).await?);
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let graceful = Arc::new(GracefulShutdown::new());
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(cfg.limits.header_read_timeout).keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .max_concurrent_streams(1024);
    let builder = Arc::new(builder);

    let mut accept_tasks = Vec::new();
    for b in bound {
        let (router, builder, graceful, mut stop) =
            (router.clone(), builder.clone(), graceful.clone(), shutdown_rx.clone());
        let handshake_timeout = cfg.limits.header_read_timeout;
        accept_tasks.push(tokio::spawn(async move {
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
                    router: router.clone(),
                    builder: builder.clone(),
                    watcher: graceful.watcher(),
                    tls: b.tls.clone(),
                    admin: b.admin,
                    handshake_timeout,
                };
                tokio::spawn(conn.run(stream, addr));
            }
            // Dropping the listener here closes the socket: new connections are refused.
        }));
    }

    wait_for_signal().await;
    tracing::info!("shutdown signal: draining");
    router.begin_drain();
    let _ = shutdown_tx.send(true);
    for t in accept_tasks {
        let _ = t.await;
    }
    let graceful = Arc::into_inner(graceful).context("listener tasks still hold the shutdown handle")?;
    let grace = cfg.limits.shutdown_grace;
    match tokio::time::timeout(grace, graceful.shutdown()).await {
        Ok(()) => tracing::info!("all connections finished"),
        Err(_) => tracing::warn!(?grace, "grace period over; closing remaining connections"),
    }
    Ok(())
}

struct Connection {
    router: Arc<Router>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: Watcher,
    tls: Option<TlsAcceptor>,
    admin: bool,
    handshake_timeout: Duration,
}

impl Connection {
    async fn run(self, stream: TcpStream, addr: SocketAddr) {
        let peer = Peer { addr: Some(addr), tls: self.tls.is_some() };
        let router = self.router.clone();
        let admin = self.admin;
        let svc = service_fn(move |req| {
            let router = router.clone();
            async move {
                let res = if admin { router.handle_admin(req, peer).await } else { router.handle(req, peer).await };
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

async fn bind(l: &ListenerConfig) -> anyhow::Result<Bound> {
    let listener = TcpListener::bind(l.addr).await.with_context(|| format!("cannot listen on {}", l.addr))?;
    let local = listener.local_addr()?;
    let tls = match &l.tls {
        Some(t) => Some(TlsAcceptor::from(Arc::new(tls_config(t)?))),
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    // Tests and scripts read this line to learn the port when `addr` asks for port 0.
    println!("listening on {scheme}://{local}");
    tracing::info!(addr = %local, tls = tls.is_some(), "listening");
    Ok(Bound { listener, tls, admin: false })
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
