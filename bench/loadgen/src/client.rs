//! One keep-alive HTTP/1.1 client connection, on hyper's low-level `client::conn::http1`
//! (no pool, no per-request lookup: each worker task owns exactly one connection).

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The request every benchmark sends: the smallest valid chat completion.
pub const REQUEST_BODY: &[u8] = br#"{"model":"bench","messages":[{"role":"user","content":"hi"}]}"#;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where requests go.
#[derive(Clone, Debug)]
pub struct Target {
    pub url: String,
    host: String,
    port: u16,
    host_header: HeaderValue,
    path: Uri,
}

impl Target {
    pub fn parse(url: &str) -> anyhow::Result<Target> {
        let uri: Uri = url.parse().with_context(|| format!("invalid url {url:?}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => bail!("url {url:?}: only http:// is supported, not {other}://"),
            None => bail!("url {url:?} needs a scheme (http://)"),
        }
        let authority = uri.authority().with_context(|| format!("url {url:?} has no host"))?;
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
        let port = authority.port_u16().unwrap_or(80);
        let path = match uri.path_and_query().map(|p| p.as_str()) {
            None | Some("") | Some("/") => "/v1/chat/completions",
            Some(p) => p,
        };
        Ok(Target {
            url: url.to_string(),
            host,
            port,
            host_header: HeaderValue::from_str(authority.as_str())?,
            path: path.parse()?,
        })
    }

    fn request(&self) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(Bytes::from_static(REQUEST_BODY)));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.path.clone();
        let h = req.headers_mut();
        h.insert(HOST, self.host_header.clone());
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        req
    }
}

/// A connection that reconnects on demand: when the server closed it (e.g. nginx's
/// `keepalive_requests`) or when a request on it failed.
pub struct Conn {
    target: Target,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Conn {
    pub fn new(target: Target) -> Conn {
        Conn { target, sender: None }
    }

    /// Opens the connection now, so that connection setup is not part of the measurement.
    pub async fn connect(&mut self) -> anyhow::Result<()> {
        let url = self.target.url.clone();
        self.sender().await.with_context(|| format!("connecting to {url}"))?;
        Ok(())
    }

    async fn sender(&mut self) -> anyhow::Result<&mut SendRequest<Full<Bytes>>> {
        let usable = match self.sender.as_mut() {
            Some(s) => s.ready().await.is_ok(),
            None => false,
        };
        if !usable {
            self.sender = None;
            let stream = tokio::time::timeout(
                CONNECT_TIMEOUT,
                TcpStream::connect((self.target.host.as_str(), self.target.port)),
            )
            .await
            .context("connect timed out")??;
            stream.set_nodelay(true)?;
            let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            sender.ready().await?;
            self.sender = Some(sender);
        }
        Ok(self.sender.as_mut().expect("just set"))
    }

    /// Sends one request and reads the whole response; returns its status.
    pub async fn send(&mut self) -> anyhow::Result<StatusCode> {
        let result = tokio::time::timeout(REQUEST_TIMEOUT, self.send_inner()).await;
        match result {
            Ok(Ok(status)) => Ok(status),
            Ok(Err(e)) => {
                self.sender = None;
                Err(e)
            }
            Err(_) => {
                self.sender = None;
                bail!("request timed out after {REQUEST_TIMEOUT:?}")
            }
        }
    }

    async fn send_inner(&mut self) -> anyhow::Result<StatusCode> {
        let req = self.target.request();
        let sender = self.sender().await?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        // Read the body to its end: the response is complete only then, and the
        // connection can only be reused after it.
        resp.into_body().collect().await?;
        Ok(status)
    }
}
