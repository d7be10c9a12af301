//! Local replicas: shard-server processes the router starts, watches and restarts on this
//! host. A replica of S shards is S processes — stages 1..S-1, then the head, which serves
//! HTTP and connects to the stages. The router routes to a replica only once its head
//! answers `GET /ready` (the endpoint starts unready), restarts any process that exits with
//! a growing back-off (reset after a minute of steady running), and on shutdown stops them
//! after the listeners have drained.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{IntCounterVec, Opts};
use tokio::process::Command;
use tokio::sync::watch;

use crate::config::{Config, EndpointConfig, LocalReplicas, ModelConfig, UpstreamUrl};

/// Endpoint name of local replica `r`.
pub fn replica_name(model: &str, r: u32) -> String {
    format!("{model}-local-{r}")
}

fn head_port(l: &LocalReplicas, r: u32) -> u16 {
    l.base_port + (r * l.shards) as u16
}

/// Adds one endpoint per local replica (its head), gated on `/ready`.
pub fn add_local_endpoints(m: &mut ModelConfig) {
    let Some(l) = m.local.clone() else { return };
    let model = m.name.get_ref().clone();
    let eps = m.endpoints.get_mut();
    for r in 0..l.replicas {
        let port = head_port(&l, r);
        eps.push(EndpointConfig {
            url: UpstreamUrl {
                scheme: http::uri::Scheme::HTTP,
                authority: format!("127.0.0.1:{port}").parse().expect("valid authority"),
                prefix: String::new(),
            },
            name: Some(replica_name(&model, r)),
            region: "local".into(),
            weight: 1,
            labels: Default::default(),
            health_path: Some("/ready".into()),
            start_unready: true,
        });
    }
}

/// One supervised process, as `GET /admin/replicas` shows it.
pub struct Process {
    pub model: String,
    pub replica: u32,
    pub shard: u32,
    pub role: &'static str,
    pub args: Vec<String>,
    pub pid: AtomicU32,
    pub restarts: AtomicU64,
    pub last_exit: Mutex<Option<String>>,
    backoff: Duration,
    max_backoff: Duration,
    /// One of several stages of a replica (they take turns on the same cores).
    staged: bool,
}

pub struct Supervisor {
    pub processes: Vec<Arc<Process>>,
    binary: PathBuf,
    stop: watch::Sender<bool>,
    restarts: IntCounterVec,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Supervisor {
    /// Plans the processes of every `[models.local]`; starts nothing yet.
    pub fn new(cfg: &Config, registry: &prometheus::Registry) -> anyhow::Result<Arc<Supervisor>> {
        let restarts = IntCounterVec::new(
            Opts::new("switchyard_local_restarts_total", "Restarts of supervised shard processes"),
            &["model", "replica", "shard"],
        )?;
        registry.register(Box::new(restarts.clone()))?;
        let mut processes = Vec::new();
        let mut binary = None;
        for m in &cfg.models {
            let Some(l) = &m.local else { continue };
            binary = Some(l.binary.clone().unwrap_or_else(default_binary));
            let model = m.name.get_ref().clone();
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
            // The stages of one replica compute one after the other (the head drives them in
            // turn), so each gets the replica's share of the cores; replicas run side by side.
            let threads = l.threads.unwrap_or((cores / l.replicas).max(1));
            for r in 0..l.replicas {
                let base = head_port(l, r);
                let split = |i: u32| i * l.layers / l.shards;
                let model_path = l.model.display().to_string();
                let common = |mut a: Vec<String>| {
                    a.extend(["--threads".into(), threads.to_string()]);
                    a.extend(l.args.iter().cloned());
                    a
                };
                for i in 1..l.shards {
                    let args = common(vec![
                        "stage".into(),
                        "--model".into(),
                        model_path.clone(),
                        "--layers".into(),
                        format!("{}..{}", split(i), split(i + 1)),
                        "--listen".into(),
                        format!("127.0.0.1:{}", base + i as u16),
                        "--index".into(),
                        i.to_string(),
                    ]);
                    processes.push(Arc::new(Process::new(&model, r, i, "stage", args, l)));
                }
                let mut head = vec![
                    "serve".into(),
                    "--model".into(),
                    model_path.clone(),
                    "--model-name".into(),
                    model.clone(),
                    "--listen".into(),
                    format!("127.0.0.1:{base}"),
                ];
                if l.shards > 1 {
                    head.extend(["--layers".into(), format!("0..{}", split(1))]);
                    for i in 1..l.shards {
                        head.extend(["--stage".into(), format!("127.0.0.1:{}", base + i as u16)]);
                    }
                }
                processes.push(Arc::new(Process::new(&model, r, 0, "head", common(head), l)));
            }
        }
        let (stop, _) = watch::channel(false);
        Ok(Arc::new(Supervisor {
            processes,
            binary: binary.unwrap_or_else(default_binary),
            stop,
            restarts,
            tasks: Mutex::new(Vec::new()),
        }))
    }

    /// Fetches missing models, then starts every process under watch.
    pub async fn start(self: &Arc<Self>, cfg: &Config) -> anyhow::Result<()> {
        if self.processes.is_empty() {
            return Ok(());
        }
        for m in &cfg.models {
            if let Some(l) = &m.local
                && l.fetch
                && !l.model.exists()
            {
                self.fetch(&l.model).await?;
            }
        }
        for p in &self.processes {
            let (me, p) = (self.clone(), p.clone());
            let task = tokio::spawn(async move { me.watch(p).await });
            self.tasks.lock().unwrap().push(task);
        }
        Ok(())
    }

    async fn fetch(&self, model: &Path) -> anyhow::Result<()> {
        let dest = model.parent().unwrap_or(Path::new("."));
        tracing::info!(model = %model.display(), "model file missing; fetching it");
        let status = Command::new(&self.binary)
            .arg("fetch")
            .arg("--dest")
            .arg(dest)
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .status()
            .await
            .map_err(|e| {
                anyhow::anyhow!("{}: cannot run the shard server to fetch the model: {e}", self.binary.display())
            })?;
        anyhow::ensure!(status.success(), "fetching the model into {} failed ({status})", dest.display());
        anyhow::ensure!(model.exists(), "{}: still missing after the fetch", model.display());
        Ok(())
    }

    /// Runs one process for as long as the router runs, restarting it when it exits.
    async fn watch(&self, p: Arc<Process>) {
        let mut stop = self.stop.subscribe();
        let mut backoff = p.backoff_initial();
        loop {
            if *stop.borrow() {
                return;
            }
            let mut cmd = Command::new(&self.binary);
            cmd.args(&p.args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::inherit()).kill_on_drop(true);
            // If the router dies without stopping it (SIGKILL, a crash), the shard exits too
            // rather than hold its port against the next router.
            cmd.env("SWITCHYARD_EXIT_WITH_PARENT", "1");
            if p.staged && std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
                // Stages of a replica take turns on the same cores: an idle stage's thread
                // pool must park soon instead of spinning on a core the busy stage needs.
                cmd.env("CANDLE_BARRIER_POOL_SPIN_LIMIT", "2000");
            }
            let started = Instant::now();
            let mut child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(binary = %self.binary.display(), "cannot start shard process: {e}");
                    *p.last_exit.lock().unwrap() = Some(format!("spawn failed: {e}"));
                    if sleep_or_stop(&mut stop, backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(p.max_backoff);
                    continue;
                }
            };
            p.pid.store(child.id().unwrap_or(0), Relaxed);
            tracing::info!(model = %p.model, replica = p.replica, shard = p.shard, role = p.role, pid = child.id(), "shard process started");
            let exit = tokio::select! {
                st = child.wait() => st,
                _ = stop.changed() => {
                    terminate(&mut child).await;
                    p.pid.store(0, Relaxed);
                    return;
                }
            };
            p.pid.store(0, Relaxed);
            let why = match exit {
                Ok(st) => st.to_string(),
                Err(e) => e.to_string(),
            };
            tracing::warn!(model = %p.model, replica = p.replica, shard = p.shard, "shard process exited ({why}); restarting in {backoff:?}");
            *p.last_exit.lock().unwrap() = Some(why);
            if started.elapsed() > STEADY {
                backoff = p.backoff_initial();
            }
            if sleep_or_stop(&mut stop, backoff).await {
                return;
            }
            backoff = (backoff * 2).min(p.max_backoff);
            p.restarts.fetch_add(1, Relaxed);
            self.restarts.with_label_values(&[&p.model, &p.replica.to_string(), &p.shard.to_string()]).inc();
        }
    }

    /// Stops every process (SIGTERM, then SIGKILL after a grace period).
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let tasks: Vec<_> = self.tasks.lock().unwrap().drain(..).collect();
        for t in tasks {
            let _ = t.await;
        }
    }

    pub fn status_json(&self) -> serde_json::Value {
        let list: Vec<_> = self
            .processes
            .iter()
            .map(|p| {
                let pid = p.pid.load(Relaxed);
                serde_json::json!({
                    "model": p.model, "replica": p.replica, "shard": p.shard, "role": p.role,
                    "pid": if pid == 0 { None } else { Some(pid) },
                    "restarts": p.restarts.load(Relaxed),
                    "last_exit": p.last_exit.lock().unwrap().clone(),
                    "command": std::iter::once(self.binary.display().to_string()).chain(p.args.iter().cloned()).collect::<Vec<_>>(),
                })
            })
            .collect();
        serde_json::json!({ "processes": list })
    }
}

/// Running this long counts as steady: the next crash restarts without accumulated back-off.
const STEADY: Duration = Duration::from_secs(60);

impl Process {
    fn new(model: &str, replica: u32, shard: u32, role: &'static str, args: Vec<String>, l: &LocalReplicas) -> Process {
        Process {
            backoff: l.restart_backoff,
            max_backoff: l.max_restart_backoff,
            model: model.to_string(),
            replica,
            shard,
            role,
            args,
            pid: AtomicU32::new(0),
            restarts: AtomicU64::new(0),
            last_exit: Mutex::new(None),
            staged: l.shards > 1,
        }
    }

    fn backoff_initial(&self) -> Duration {
        self.backoff
    }
}

async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

async fn terminate(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        // SIGTERM first so the shard can finish cleanly; no libc dependency for one signal.
        let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        if tokio::time::timeout(Duration::from_secs(5), child.wait()).await.is_ok() {
            return;
        }
    }
    let _ = child.kill().await;
}

fn default_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("switchyard-shard")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("switchyard-shard"))
}
