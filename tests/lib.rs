//! Test harness for the end-to-end suite: starts the real `switchyard` binary with a
//! generated config, scripted upstreams on real sockets, and small HTTP clients.
//! Lives in a library so every test file shares one copy.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

// ---------------------------------------------------------------------------------------
// The router process

/// Path of the router binary, built once per test run so tests never run a stale one.
pub fn router_bin() -> PathBuf {
    static BUILD: Once = Once::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    BUILD.call_once(|| {
        cargo(&["build", "-q", "-p", "switchyard", "--bin", "switchyard"]);
    });
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    target.join("debug").join("switchyard")
}

/// A unique scratch folder, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "switchyard-e2e-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Router {
    pub child: tokio::process::Child,
    /// Bound addresses in config order, with their scheme.
    pub addrs: Vec<(String, SocketAddr)>,
    /// The admin listener, when the config enables one on port 0.
    pub admin: Option<SocketAddr>,
    pub dir: TempDir,
    log: PathBuf,
}

impl Router {
    /// Starts the router with `config` (TOML) and waits until every listener is bound.
    pub async fn start(config: &str) -> Router {
        Router::start_in(TempDir::new(), config).await
    }

    pub async fn start_in(dir: TempDir, config: &str) -> Router {
        let cfg_path = dir.0.join("switchyard.toml");
        std::fs::write(&cfg_path, config).unwrap();
        let log = dir.0.join("router.log");
        let mut child = tokio::process::Command::new(router_bin())
            .arg("serve")
            .arg("--config")
            .arg(&cfg_path)
            .arg("--workers")
            .arg("2")
            .env("SWITCHYARD_LOG", "info,switchyard=debug")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("start router");
        let listeners = config.matches("[[listeners]]").count();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut addrs = Vec::new();
        let mut admin = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        while addrs.len() < listeners {
            let line = tokio::time::timeout_at(deadline.into(), lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("router did not bind in time; log:\n{}", read(&log)))
                .unwrap();
            let Some(line) = line else { panic!("router exited early; log:\n{}", read(&log)) };
            if let Some(rest) = line.strip_prefix("admin listening on http://") {
                admin = Some(rest.parse().unwrap());
            } else if let Some(rest) = line.strip_prefix("listening on ") {
                let (scheme, addr) = rest.split_once("://").unwrap();
                addrs.push((scheme.to_string(), addr.parse().unwrap()));
            }
        }
        // Keep draining stdout so the router never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Router { child, addrs, admin, dir, log }
    }

    /// Kills the router and starts it again on the same folder and config (new ports).
    pub async fn restart(mut self) -> Router {
        let cfg = std::fs::read_to_string(self.dir.0.join("switchyard.toml")).unwrap();
        self.child.kill().await.unwrap();
        let dir = std::mem::replace(&mut self.dir, TempDir(PathBuf::new()));
        drop(self);
        Router::start_in(dir, &cfg).await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs[0].1
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr(), path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin.expect("admin listener"), path)
    }

    /// `GET /admin/plugins`, the entry for `name`.
    pub async fn plugin_status(&self, name: &str) -> serde_json::Value {
        let (status, _, body) = get(&self.admin_url("/admin/plugins")).await;
        assert_eq!(status, 200);
        json(&body)["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    }

    /// The plugin folder the router watches (`plugins/` beside its config).
    pub fn plugin_dir(&self) -> PathBuf {
        self.dir.0.join("plugins")
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("router is running")
    }

    pub fn signal(&self, sig: &str) {
        let ok =
            std::process::Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status().unwrap();
        assert!(ok.success());
    }

    pub fn log(&self) -> String {
        read(&self.log)
    }

    /// Current value of a metric sample whose line starts with `name{` and contains
    /// every `label="value"` pair given.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let (status, _, body) = get(&self.url("/metrics")).await;
        assert_eq!(status, 200);
        let text = String::from_utf8(body.to_vec()).unwrap();
        metric_in(&text, name, labels)
    }

    /// Polls a metric until `pred` holds (or panics after `within`).
    pub async fn wait_metric(&self, name: &str, labels: &[(&str, &str)], within: Duration, pred: impl Fn(f64) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(v) = self.metric(name, labels).await
                && pred(v)
            {
                return;
            }
            assert!(Instant::now() < deadline, "metric {name}{labels:?} never matched; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- router log ({}) ----\n{}", self.log.display(), read(&self.log));
        }
    }
}

pub fn metric_in(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// Scripted upstreams

/// What a scripted upstream does; changed live by the test.
#[derive(Clone, Debug)]
pub struct Script {
    pub status: u16,
    /// Wait before answering an inference request.
    pub delay: Duration,
    pub health_status: u16,
    pub health_delay: Duration,
    /// For `"stream": true` requests: number of SSE chunks and the gap between them.
    pub chunks: usize,
    pub chunk_gap: Duration,
    /// `usage.total_tokens` reported in non-streaming answers (none when unset).
    pub usage_tokens: Option<u32>,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            status: 200,
            delay: Duration::ZERO,
            health_status: 200,
            health_delay: Duration::ZERO,
            chunks: 3,
            chunk_gap: Duration::from_millis(10),
            usage_tokens: None,
        }
    }
}

struct UpstreamState {
    name: String,
    script: Mutex<Script>,
    hits: AtomicU64,
    health_hits: AtomicU64,
    last_body: Mutex<Option<Bytes>>,
    conns: Mutex<Vec<AbortHandle>>,
}

/// An OpenAI-ish model server the test scripts: status, delays, streaming cadence.
pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<UpstreamState>,
    accept: AbortHandle,
}

impl Upstream {
    pub async fn start(name: &str) -> Upstream {
        Upstream::start_with(name, Script::default(), "127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_with(name: &str, script: Script, addr: SocketAddr) -> Upstream {
        let listener = TcpListener::bind(addr).await.expect("bind upstream");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(UpstreamState {
            name: name.to_string(),
            script: Mutex::new(script),
            hits: AtomicU64::new(0),
            health_hits: AtomicU64::new(0),
            last_body: Mutex::new(None),
            conns: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let st2 = st.clone();
                let task = tokio::spawn(async move {
                    let svc = service_fn(move |req| serve(st2.clone(), req));
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
                st.conns.lock().unwrap().push(task.abort_handle());
            }
        })
        .abort_handle();
        Upstream { addr, state, accept }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    pub fn hits(&self) -> u64 {
        self.state.hits.load(Ordering::SeqCst)
    }

    pub fn health_hits(&self) -> u64 {
        self.state.health_hits.load(Ordering::SeqCst)
    }

    pub fn reset_hits(&self) {
        self.state.hits.store(0, Ordering::SeqCst);
    }

    pub fn last_body(&self) -> Option<Bytes> {
        self.state.last_body.lock().unwrap().clone()
    }

    pub fn script(&self, f: impl FnOnce(&mut Script)) {
        f(&mut self.state.script.lock().unwrap());
    }

    /// Dies like a crashed process: the port closes and every open connection drops,
    /// including requests being answered.
    pub fn kill(&self) {
        self.accept.abort();
        for c in self.state.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill();
    }
}

type UpBody = http_body_util::Either<Full<Bytes>, ChannelBody>;

async fn serve(st: Arc<UpstreamState>, req: Request<Incoming>) -> Result<Response<UpBody>, Infallible> {
    let script = st.script.lock().unwrap().clone();
    if req.uri().path() == "/health" {
        st.health_hits.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(script.health_delay).await;
        let mut res =
            Response::new(http_body_util::Either::Left(Full::new(Bytes::from_static(b"{\"status\":\"ok\"}"))));
        *res.status_mut() = StatusCode::from_u16(script.health_status).unwrap();
        return Ok(res);
    }
    st.hits.fetch_add(1, Ordering::SeqCst);
    let body = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    *st.last_body.lock().unwrap() = Some(body.clone());
    let parsed = serde_json::from_slice::<serde_json::Value>(&body).ok();
    let stream = parsed.as_ref().and_then(|v| v.get("stream").and_then(|s| s.as_bool())).unwrap_or(false);
    // Like real servers, answer in the name of the model that was asked for.
    let model_name = parsed.as_ref().and_then(|v| v.get("model").and_then(|s| s.as_str())).unwrap_or("m").to_string();
    tokio::time::sleep(script.delay).await;
    if script.status != 200 {
        let msg = format!(
            "{{\"error\":{{\"message\":\"scripted {} from {}\",\"type\":\"scripted\",\"code\":null}}}}",
            script.status, st.name
        );
        let mut res = Response::new(http_body_util::Either::Left(Full::new(Bytes::from(msg))));
        *res.status_mut() = StatusCode::from_u16(script.status).unwrap();
        return Ok(res);
    }
    if stream {
        let (tx, rx) = mpsc::channel(16);
        let name = st.name.clone();
        let model_name = model_name.clone();
        tokio::spawn(async move {
            for i in 0..script.chunks {
                if i > 0 {
                    tokio::time::sleep(script.chunk_gap).await;
                }
                let chunk = format!(
                    "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"{model_name}\",\"served_by\":\"{name}\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}}}}]}}\n\n"
                );
                if tx.send(Bytes::from(chunk)).await.is_err() {
                    return;
                }
            }
            let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
        });
        let mut res = Response::new(http_body_util::Either::Right(ChannelBody(rx)));
        res.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
        return Ok(res);
    }
    let usage = script
        .usage_tokens
        .map(|n| format!(",\"usage\":{{\"prompt_tokens\":1,\"completion_tokens\":{},\"total_tokens\":{n}}}", n - 1))
        .unwrap_or_default();
    let answer = format!(
        "{{\"id\":\"x\",\"object\":\"chat.completion\",\"model\":\"{model_name}\",\"served_by\":\"{}\",\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":\"hello\"}},\"finish_reason\":\"stop\"}}]{usage}}}",
        st.name
    );
    let mut res = Response::new(http_body_util::Either::Left(Full::new(Bytes::from(answer))));
    res.headers_mut().insert("content-type", "application/json".parse().unwrap());
    Ok(res)
}

/// A body fed by a channel: each message is one frame, sent when it is produced.
pub struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

// ---------------------------------------------------------------------------------------
// Clients

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub async fn get(url: &str) -> (StatusCode, http::HeaderMap, Bytes) {
    let req = Request::get(url).body(Full::new(Bytes::new())).unwrap();
    send(&client(), req).await.expect("GET")
}

pub fn chat_body(model: &str, stream: bool) -> String {
    format!("{{\"model\":\"{model}\",\"stream\":{stream},\"messages\":[{{\"role\":\"user\",\"content\":\"hello\"}}]}}")
}

pub fn post_req(url: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::post(url).header("content-type", "application/json").body(Full::new(body.into())).unwrap()
}

pub async fn send(c: &HttpClient, req: Request<Full<Bytes>>) -> Result<(StatusCode, http::HeaderMap, Bytes), String> {
    let res = c.request(req).await.map_err(|e| format!("{e:?}"))?;
    let (parts, body) = res.into_parts();
    let body = body.collect().await.map_err(|e| format!("{e:?}"))?.to_bytes();
    Ok((parts.status, parts.headers, body))
}

/// A POST carrying `Authorization: Bearer KEY` (the key names the tenant).
pub async fn post_as(key: &str, url: &str, body: impl Into<Bytes>) -> (StatusCode, http::HeaderMap, Bytes) {
    let mut req = post_req(url, body);
    req.headers_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
    send(&client(), req).await.expect("POST")
}

pub async fn post(url: &str, body: impl Into<Bytes>) -> (StatusCode, http::HeaderMap, Bytes) {
    send(&client(), post_req(url, body)).await.expect("POST")
}

/// Sends a streaming request; returns the status and each body frame with its arrival time.
pub async fn post_stream(url: &str, body: impl Into<Bytes>) -> (StatusCode, Vec<(Instant, Bytes)>, Result<(), String>) {
    let res = client().request(post_req(url, body)).await.expect("stream request");
    let status = res.status();
    let mut body = res.into_body();
    let mut frames = Vec::new();
    loop {
        match body.frame().await {
            None => return (status, frames, Ok(())),
            Some(Err(e)) => return (status, frames, Err(format!("{e:?}"))),
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    frames.push((Instant::now(), d));
                }
            }
        }
    }
}

pub fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// A config with one plaintext listener on a free port, followed by `models`.
pub fn config(models: &str) -> String {
    format!("[admin]\naddr = \"127.0.0.1:0\"\n\n[[listeners]]\naddr = \"127.0.0.1:0\"\n\n{models}")
}

/// A `[[models]]` block for `name` over `upstreams`, with fast health checks and
/// `extra` TOML lines placed in the model table.
pub fn model(name: &str, upstreams: &[&Upstream], extra: &str) -> String {
    let mut s = format!("[[models]]\nname = \"{name}\"\n{extra}\n");
    for u in upstreams {
        s.push_str(&format!("[[models.endpoints]]\nurl = \"{}\"\nname = \"{}\"\n", u.url(), u.name()));
    }
    s
}

// ---------------------------------------------------------------------------------------
// Policy components

/// Standard policies shipped in `policies/`.
pub const STANDARD_POLICIES: [&str; 7] =
    ["round-robin", "weighted-round-robin", "least-request", "consistent-hash", "fallback", "canary", "geo"];

/// Test-kit behaviours (cargo features of `tests/policies/testkit`).
pub const TESTKIT_MODES: [&str; 7] =
    ["pin0", "pin2", "infinite-loop", "memory-bomb", "trap", "out-of-range", "time-bomb"];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn clean_cargo(cmd: &mut std::process::Command) {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if (k.starts_with("CARGO_") && k != "CARGO_HOME" && k != "CARGO_TARGET_DIR") || k == "OUT_DIR" {
            cmd.env_remove(&*k);
        }
    }
}

/// Runs cargo in the workspace. The variables cargo sets for this test binary would
/// otherwise reach build scripts (ring watches some) and force a rebuild on every run.
fn cargo(args: &[&str]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(args).current_dir(workspace_root());
    clean_cargo(&mut cmd);
    let status = cmd.status().expect("run cargo");
    assert!(status.success(), "cargo {args:?} failed");
}

/// Builds every standard policy and every test-kit behaviour into components, once per
/// test run, and returns the folder holding `NAME.wasm` for each (test-kit ones are
/// `testkit-MODE.wasm`, plus `testkit-wasi.wasm`, which imports WASI).
pub fn policy_dir() -> PathBuf {
    static BUILD: Once = Once::new();
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"));
    let out = target.join("test-policies");
    BUILD.call_once(|| {
        std::fs::create_dir_all(&out).unwrap();
        // The toolchain file lists both targets, but a toolchain installed before it
        // may lack them; adding an installed target is a no-op.
        let _ = std::process::Command::new("rustup")
            .args(["target", "add", "wasm32-unknown-unknown", "wasm32-wasip2"])
            .current_dir(workspace_root())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let router = router_bin();
        let componentize = |module: &Path, dest: &Path| {
            let st = std::process::Command::new(&router)
                .args(["plugin", "componentize"])
                .arg(module)
                .arg("-o")
                .arg(dest)
                .status()
                .unwrap();
            assert!(st.success(), "componentize {}", module.display());
        };
        let wasm = target.join("wasm32-unknown-unknown").join("release");
        let mut args = vec!["build", "-q", "--release", "--target", "wasm32-unknown-unknown"];
        let pkgs: Vec<String> = STANDARD_POLICIES.iter().map(|p| format!("policy-{p}")).collect();
        for p in &pkgs {
            args.push("-p");
            args.push(p);
        }
        cargo(&args);
        for p in STANDARD_POLICIES {
            componentize(&wasm.join(format!("policy_{}.wasm", p.replace('-', "_"))), &out.join(format!("{p}.wasm")));
        }
        for mode in TESTKIT_MODES {
            cargo(&[
                "build",
                "-q",
                "--release",
                "--target",
                "wasm32-unknown-unknown",
                "-p",
                "policy-testkit",
                "--features",
                mode,
            ]);
            componentize(&wasm.join("policy_testkit.wasm"), &out.join(format!("testkit-{mode}.wasm")));
        }
        // Built for WASI, so the component imports wasi:cli and friends.
        cargo(&["build", "-q", "--release", "--target", "wasm32-wasip2", "-p", "policy-testkit", "--features", "wasi"]);
        std::fs::copy(target.join("wasm32-wasip2/release/policy_testkit.wasm"), out.join("testkit-wasi.wasm")).unwrap();
    });
    out
}

pub fn policy(name: &str) -> PathBuf {
    policy_dir().join(format!("{name}.wasm"))
}

/// Publishes `src` as `dir/NAME.wasm` the documented way: write a hidden temp file, rename.
pub fn publish_plugin(dir: &Path, name: &str, src: &Path) {
    let tmp = dir.join(format!(".{name}.wasm.tmp"));
    std::fs::copy(src, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join(format!("{name}.wasm"))).unwrap();
}

// ---------------------------------------------------------------------------------------
// Shard servers (the real model)

/// The shard server binary (debug build), built once per run.
pub fn shard_bin() -> PathBuf {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| cargo(&["build", "-q", "-p", "switchyard-shard", "--bin", "switchyard-shard"]));
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"));
    target.join("debug").join("switchyard-shard")
}

/// The default model, fetched (and hash-checked) into `<workspace>/models` if missing.
pub fn model_file() -> PathBuf {
    static FETCH: Once = Once::new();
    let dir = workspace_root().join("models");
    FETCH.call_once(|| {
        let st = std::process::Command::new(shard_bin()).arg("fetch").arg("--dest").arg(&dir).status().unwrap();
        assert!(st.success(), "fetching the model failed");
    });
    dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// A base port with `n` consecutive free ports after it.
pub fn free_port_range(n: u16) -> u16 {
    for _ in 0..200 {
        let base = 20_000 + (std::process::id() as u16 % 97) * 100 + fastish_random() % 9_000;
        if (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no free port range");
}

fn fastish_random() -> u16 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    (nanos / 1000 % 9_000) as u16
}
