//! Policy plugins: WebAssembly components, loaded from the watched `plugins/` folder,
//! validated off the request path and published atomically.
//!
//! - `engine`: the one wasmtime configuration (and the only `unsafe`).
//! - `runtime`: bindings, host imports, warm per-thread instances, faults.
//! - `loader`: compile (with a content-hash cache), check imports, self-test.
//! - this module: the registry of plugin versions, the published `PluginSet`, the folder
//!   watcher and quarantine.

pub mod componentize;
pub mod engine;
pub mod loader;
pub mod runtime;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts};
use tokio::sync::mpsc;

use crate::config::{Config, PluginsConfig};
use crate::select::{RequestFacts, Selector};
use crate::upstream::{Circuit, EndpointSnapshot, now_ms};
use engine::PluginEngine;
use loader::{Loaded, Loader};
use runtime::{Binding, Fault, Shared, wit};

/// Share of a window's calls that must have faulted for quarantine.
const QUARANTINE_RATIO: f64 = 0.5;

/// Stage names as configured and reported.
pub const STAGES: [&str; 4] = ["balance", "canary", "geo", "fallback"];

/// The plugins in force for each model, published as one unit: a request sees either
/// the old set or the new one, never half of each.
#[derive(Default)]
pub struct PluginSet {
    /// Balance-stage binding by model index.
    balance: Vec<Option<Arc<Binding>>>,
    canary: Vec<Option<Arc<Binding>>>,
    geo: Vec<Option<Arc<Binding>>>,
    /// Fallback-stage binding by model index.
    fallback: Vec<Option<Arc<Binding>>>,
}

impl PluginSet {
    pub fn canary(&self, model: usize) -> Option<&Arc<Binding>> {
        self.canary.get(model).and_then(|b| b.as_ref())
    }

    pub fn geo(&self, model: usize) -> Option<&Arc<Binding>> {
        self.geo.get(model).and_then(|b| b.as_ref())
    }

    pub fn balancer(&self, model: usize) -> Option<&Arc<Binding>> {
        self.balance.get(model).and_then(|b| b.as_ref())
    }

    pub fn fallback(&self, model: usize) -> Option<&Arc<Binding>> {
        self.fallback.get(model).and_then(|b| b.as_ref())
    }
}

/// How one model uses plugins, fixed by the config.
struct ModelBinding {
    model: String,
    /// Plugin name per stage (index into `STAGES`).
    stages: [Option<String>; 4],
    topology: wit::Topology,
    /// Host state per stage, kept across plugin versions.
    shared: [Arc<Shared>; 4],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryState {
    Active,
    /// Its last file failed validation; an older good version may still be active.
    Rejected,
    /// Faulted too often while serving; the previous good version was restored.
    Quarantined,
    /// The file was deleted.
    Removed,
}

struct Entry {
    active: Option<Arc<Loaded>>,
    previous: Option<Arc<Loaded>>,
    state: EntryState,
    last_error: Option<String>,
    /// Files already judged (by sha256), so a bad file is reported once, not every scan.
    rejected_sha: Option<String>,
    quarantined_sha: Option<String>,
    /// (mtime, len) at the last scan, to skip unchanged files cheaply.
    seen: Option<(SystemTime, u64)>,
    attempts: u64,
}

impl Entry {
    fn new() -> Entry {
        Entry {
            active: None,
            previous: None,
            state: EntryState::Removed,
            last_error: None,
            rejected_sha: None,
            quarantined_sha: None,
            seen: None,
            attempts: 0,
        }
    }
}

struct PluginMetrics {
    loads: IntCounterVec,
    faults: IntCounterVec,
    fallbacks: IntCounterVec,
    quarantines: IntCounterVec,
    scans: IntCounter,
    active: IntGaugeVec,
}

pub struct PluginHost {
    loader: Loader,
    cfg: PluginsConfig,
    models: Vec<ModelBinding>,
    current: ArcSwap<PluginSet>,
    entries: Mutex<BTreeMap<String, Entry>>,
    next_uid: AtomicU64,
    quarantine_tx: mpsc::UnboundedSender<(String, String)>,
    quarantine_rx: Mutex<Option<mpsc::UnboundedReceiver<(String, String)>>>,
    metrics: PluginMetrics,
    /// Serialises scans (watcher, periodic rescan, quarantine).
    scan_lock: Mutex<()>,
}

impl PluginHost {
    pub fn new(cfg: &Config, registry: &prometheus::Registry) -> anyhow::Result<Arc<PluginHost>> {
        let pc = cfg.plugins.clone();
        let engine = PluginEngine::new(pc.memory_limit, pc.max_instances)?;
        let loader = Loader::new(engine, pc.cache_dir(), pc.deadline)?;
        let share = IntGaugeVec::new(
            Opts::new(
                "switchyard_canary_share_permille",
                "Share of requests the canary version serves, as reported by the canary policy",
            ),
            &["model"],
        )?;
        registry.register(Box::new(share.clone()))?;
        let transitions = IntCounterVec::new(
            Opts::new("switchyard_canary_transitions_total", "Canary rollout state changes, by the phase entered"),
            &["model", "phase"],
        )?;
        registry.register(Box::new(transitions.clone()))?;
        let models = cfg
            .models
            .iter()
            .map(|m| ModelBinding {
                shared: std::array::from_fn(|stage| {
                    let on_report = (stage == 1).then(|| {
                        let share = share.with_label_values(&[m.name.get_ref()]);
                        let transitions = transitions.clone();
                        let model = m.name.get_ref().clone();
                        Box::new(move |s: &wit::CanaryStatus| {
                            share.set(s.share_permille as i64);
                            transitions.with_label_values(&[&model, canary_phase_name(s.phase)]).inc();
                        }) as runtime::ReportHook
                    });
                    Shared::new(on_report)
                }),
                model: m.name.get_ref().clone(),
                stages: [
                    m.policy.balance.clone(),
                    m.policy.canary.clone(),
                    m.policy.geo.clone(),
                    m.policy.fallback.clone(),
                ],
                topology: topology_of(m, cfg.geo.as_ref()),
            })
            .collect();
        let counter = |name: &str, help: &str, labels: &[&str]| -> anyhow::Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let active = IntGaugeVec::new(
            Opts::new("switchyard_plugin_active", "1 while a version of the plugin is published"),
            &["plugin"],
        )?;
        registry.register(Box::new(active.clone()))?;
        let metrics = PluginMetrics {
            loads: counter(
                "switchyard_plugin_loads_total",
                "Plugin files validated, by result",
                &["plugin", "result"],
            )?,
            faults: counter(
                "switchyard_plugin_faults_total",
                "Plugin calls that faulted, by reason",
                &["plugin", "reason"],
            )?,
            fallbacks: counter(
                "switchyard_plugin_fallbacks_total",
                "Decisions taken by the native policy because a plugin faulted",
                &["model", "stage"],
            )?,
            quarantines: counter("switchyard_plugin_quarantines_total", "Plugin versions quarantined", &["plugin"])?,
            scans: {
                let c = IntCounter::new("switchyard_plugin_scans_total", "Scans of the plugin folder")?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            active,
        };
        let (quarantine_tx, quarantine_rx) = mpsc::unbounded_channel();
        Ok(Arc::new(PluginHost {
            loader,
            cfg: pc,
            models,
            current: ArcSwap::from_pointee(PluginSet::default()),
            entries: Mutex::new(BTreeMap::new()),
            next_uid: AtomicU64::new(1),
            quarantine_tx,
            quarantine_rx: Mutex::new(Some(quarantine_rx)),
            metrics,
            scan_lock: Mutex::new(()),
        }))
    }

    pub fn current(&self) -> arc_swap::Guard<Arc<PluginSet>> {
        self.current.load()
    }

    pub fn dir(&self) -> &Path {
        &self.cfg.dir
    }

    /// Loads what is in the folder now, then watches it. Call from inside the runtime.
    pub async fn start(self: &Arc<Self>) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.cfg.dir)
            .map_err(|e| anyhow::anyhow!("{}: cannot create plugin folder: {e}", self.cfg.dir.display()))?;
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.scan()).await?;
        self.clone().watch()?;
        let me = self.clone();
        let mut rx = self.quarantine_rx.lock().unwrap().take().expect("start is called once");
        tokio::spawn(async move {
            while let Some((name, sha)) = rx.recv().await {
                let me = me.clone();
                let _ = tokio::task::spawn_blocking(move || me.quarantine(&name, &sha)).await;
            }
        });
        Ok(())
    }

    fn watch(self: Arc<Self>) -> anyhow::Result<()> {
        use notify::{RecursiveMode, Watcher};
        let (tx, mut rx) = mpsc::unbounded_channel::<()>();
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if ev.is_ok_and(|ev| changes_folder(&ev.kind)) {
                let _ = tx.send(());
            }
        })?;
        watcher.watch(&self.cfg.dir, RecursiveMode::NonRecursive)?;
        let debounce = self.cfg.debounce;
        let rescan = self.cfg.rescan_interval;
        tokio::spawn(async move {
            let _watcher = watcher; // lives as long as this task
            loop {
                // An event, or the periodic rescan that covers anything notify missed.
                let woke = tokio::time::timeout(rescan, rx.recv()).await;
                if let Ok(None) = woke {
                    return;
                }
                // Debounce: wait for the folder to be quiet.
                while let Ok(Some(())) = tokio::time::timeout(debounce, rx.recv()).await {}
                let me = self.clone();
                let _ = tokio::task::spawn_blocking(move || me.scan()).await;
            }
        });
        Ok(())
    }

    /// Brings the registry in line with the folder, then publishes.
    pub fn scan(&self) {
        let _scan = self.scan_lock.lock().unwrap();
        self.metrics.scans.inc();
        let files = list_components(&self.cfg.dir);
        let mut changed = false;
        for (name, path) in &files {
            let meta = match std::fs::metadata(path) {
                Ok(m) => m,
                Err(_) => continue,
            };
            let stamp = (meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len());
            {
                let entries = self.entries.lock().unwrap();
                if entries.get(name).is_some_and(|e| e.seen == Some(stamp)) {
                    continue;
                }
            }
            let Ok(bytes) = std::fs::read(path) else { continue };
            let sha = loader::sha256_hex(&bytes);
            {
                let mut entries = self.entries.lock().unwrap();
                let e = entries.entry(name.clone()).or_insert_with(Entry::new);
                e.seen = Some(stamp);
                let same_active = e.active.as_ref().is_some_and(|a| a.sha256 == sha) && e.state == EntryState::Active;
                if same_active || e.rejected_sha.as_deref() == Some(&sha) || e.quarantined_sha.as_deref() == Some(&sha)
                {
                    continue;
                }
                e.attempts += 1;
            }
            let config_json = self.cfg.settings_json(name);
            let uid = self.next_uid.fetch_add(1, Relaxed);
            let result = self.loader.load(name, &bytes, &sha, &config_json, uid);
            let mut entries = self.entries.lock().unwrap();
            let e = entries.get_mut(name).expect("inserted above");
            match result {
                Ok(loaded) => {
                    tracing::info!(plugin = %name, version = %loaded.version, sha256 = %&sha[..12], "plugin loaded");
                    self.metrics.loads.with_label_values(&[name, "ok"]).inc();
                    if let Some(old) = e.active.take() {
                        e.previous = Some(old);
                    }
                    e.active = Some(Arc::new(loaded));
                    e.state = EntryState::Active;
                    e.last_error = None;
                    e.rejected_sha = None;
                    changed = true;
                }
                Err(reason) => {
                    tracing::warn!(plugin = %name, sha256 = %&sha[..12], "plugin rejected: {reason}");
                    self.metrics.loads.with_label_values(&[name, "rejected"]).inc();
                    e.last_error = Some(reason);
                    e.rejected_sha = Some(sha);
                    // Any working version stays active; the entry remembers the failure.
                    e.state = EntryState::Rejected;
                }
            }
        }
        // Deleted files unload; their stage falls back to the native policy.
        {
            let mut entries = self.entries.lock().unwrap();
            for (name, e) in entries.iter_mut() {
                if !files.iter().any(|(n, _)| n == name) && e.state != EntryState::Removed {
                    tracing::info!(plugin = %name, "plugin file removed; unloading");
                    e.active = None;
                    e.previous = None;
                    e.state = EntryState::Removed;
                    e.seen = None;
                    e.rejected_sha = None;
                    e.quarantined_sha = None;
                    changed = true;
                }
            }
        }
        if changed {
            self.publish();
        }
    }

    /// Builds the plugin set from the active versions and swaps it in.
    fn publish(&self) {
        let entries = self.entries.lock().unwrap();
        let bind = |m: &ModelBinding, index: usize, stage: wit::Stage| {
            m.stages[index].as_ref().and_then(|name| {
                let loaded = entries.get(name)?.active.as_ref()?;
                if !loaded.stages.contains(&stage) {
                    tracing::warn!(plugin = %name, model = %m.model, "plugin does not serve the {} stage", STAGES[index]);
                    return None;
                }
                Some(Arc::new(loaded.bind(
                    self.next_uid.fetch_add(1, Relaxed),
                    m.topology.clone(),
                    self.cfg.deadline,
                    m.shared[index].clone(),
                )))
            })
        };
        let balance = self.models.iter().map(|m| bind(m, 0, wit::Stage::Balance)).collect();
        let canary = self.models.iter().map(|m| bind(m, 1, wit::Stage::Canary)).collect();
        let geo = self.models.iter().map(|m| bind(m, 2, wit::Stage::Geo)).collect();
        let fallback = self.models.iter().map(|m| bind(m, 3, wit::Stage::Fallback)).collect();
        for (name, e) in entries.iter() {
            self.metrics.active.with_label_values(&[name]).set(e.active.is_some() as i64);
        }
        self.current.store(Arc::new(PluginSet { balance, canary, geo, fallback }));
    }

    /// Takes a faulting version out and restores the one before it.
    fn quarantine(&self, name: &str, sha: &str) {
        let _scan = self.scan_lock.lock().unwrap();
        {
            let mut entries = self.entries.lock().unwrap();
            let Some(e) = entries.get_mut(name) else { return };
            if e.active.as_ref().is_none_or(|a| a.sha256 != sha) {
                return;
            }
            let bad = e.active.take().expect("checked above");
            e.active = e.previous.take();
            e.state = EntryState::Quarantined;
            e.quarantined_sha = Some(sha.to_string());
            let last = bad.stats.last_fault.lock().unwrap().clone().unwrap_or_default();
            e.last_error = Some(format!("quarantined after repeated faults: {last}"));
            self.metrics.quarantines.with_label_values(&[name]).inc();
            tracing::error!(
                plugin = %name,
                sha256 = %&sha[..12],
                restored = e.active.as_ref().map(|a| a.version.as_str()).unwrap_or("native"),
                "plugin quarantined"
            );
        }
        self.publish();
    }

    /// Called on the request path when a plugin call faulted.
    pub fn record_fault(&self, model: &str, stage: &str, binding: &Binding, fault: &Fault) {
        self.metrics.faults.with_label_values(&[&binding.name, fault.reason()]).inc();
        self.metrics.fallbacks.with_label_values(&[model, stage]).inc();
        let stats = &binding.stats;
        stats.faults.fetch_add(1, Relaxed);
        *stats.last_fault.lock().unwrap() = Some(fault.to_string());
        tracing::debug!(plugin = %binding.name, "plugin fault, native policy used: {fault}");
        // Quarantine needs many faults *and* a high fault ratio: a sound plugin whose thread
        // was descheduled past its deadline on a busy host must not be taken out.
        let now = now_ms();
        let calls = stats.calls.load(Relaxed);
        let mut w = stats.window.lock().unwrap();
        if now >= w.0 + self.cfg.quarantine_window.as_millis() as u64 {
            *w = (now, calls.saturating_sub(1), 0);
        }
        w.2 += 1;
        let calls_in_window = calls.saturating_sub(w.1).max(1);
        if w.2 >= self.cfg.quarantine_after && w.2 as f64 >= QUARANTINE_RATIO * calls_in_window as f64 {
            *w = (now, calls, 0);
            let _ = self.quarantine_tx.send((binding.name.to_string(), binding.sha256.clone()));
        }
    }

    /// The host state of `model`'s canary stage (`None` for an unknown model).
    pub fn canary_shared(&self, model: usize) -> Option<&Arc<Shared>> {
        self.models.get(model).map(|m| &m.shared[1])
    }

    /// The name of the plugin configured for `model`'s canary stage.
    pub fn canary_plugin(&self, model: usize) -> Option<&str> {
        self.models.get(model).and_then(|m| m.stages[1].as_deref())
    }

    /// How many regions `model`'s policies see.
    pub fn region_count(&self, model: usize) -> usize {
        self.models.get(model).map_or(0, |m| m.topology.regions.len())
    }

    /// The versions as `model`'s policies number them.
    pub fn versions(&self, model: usize) -> &[String] {
        self.models.get(model).map_or(&[], |m| &m.topology.versions)
    }

    /// The registry as `GET /admin/plugins` shows it.
    pub fn status_json(&self) -> serde_json::Value {
        let entries = self.entries.lock().unwrap();
        let mut bound: HashMap<&str, Vec<String>> = HashMap::new();
        for m in &self.models {
            for (i, s) in m.stages.iter().enumerate() {
                if let Some(name) = s {
                    bound.entry(name.as_str()).or_default().push(format!("{}/{}", m.model, STAGES[i]));
                }
            }
        }
        let list: Vec<_> = entries
            .iter()
            .map(|(name, e)| {
                let state = match e.state {
                    EntryState::Active => "active",
                    EntryState::Rejected if e.active.is_some() => "active (last update rejected)",
                    EntryState::Rejected => "rejected",
                    EntryState::Quarantined => "quarantined",
                    EntryState::Removed => "removed",
                };
                let a = e.active.as_ref();
                serde_json::json!({
                    "name": name,
                    "state": state,
                    "version": a.map(|a| a.version.clone()),
                    "sha256": a.map(|a| a.sha256.clone()),
                    "stages": a.map(|a| a.stage_names()).unwrap_or_default(),
                    "bound_to": bound.get(name.as_str()).cloned().unwrap_or_default(),
                    "calls": a.map(|a| a.stats.calls.load(Relaxed)).unwrap_or(0),
                    "faults": a.map(|a| a.stats.faults.load(Relaxed)).unwrap_or(0),
                    "last_error": e.last_error,
                    "previous_version": e.previous.as_ref().map(|p| p.version.clone()),
                    "compiled": a.map(|a| if a.from_cache { "cache" } else { "fresh" }),
                    "load_attempts": e.attempts,
                })
            })
            .collect();
        serde_json::json!({ "dir": self.cfg.dir.display().to_string(), "plugins": list })
    }
}

/// `*.wasm` files in `dir` by plugin name (the file stem). Hidden files and other
/// extensions are ignored: publishing is "write `.name.wasm.tmp`, then rename".
/// Whether a watcher event can change what the folder holds. notify also reports opens
/// and read-only closes, and every scan opens the folder: counting those would make each
/// scan schedule the next one.
fn changes_folder(kind: &notify::EventKind) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode};
    match kind {
        // A writer closing its file: the moment a copied-in component is complete.
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

fn list_components(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<(String, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                return None;
            }
            let stem = name.strip_suffix(".wasm")?;
            Some((stem.to_string(), e.path()))
        })
        .collect();
    out.sort();
    out
}

fn topology_of(m: &crate::config::ModelConfig, geo: Option<&crate::config::GeoConfig>) -> wit::Topology {
    let (versions, version_of) = m.versions();
    let (regions, region_of, local_region) = m.regions(geo);
    let endpoints = m
        .endpoints
        .get_ref()
        .iter()
        .enumerate()
        .map(|(i, e)| wit::EndpointInfo {
            name: e.display_name(),
            region: region_of[i],
            version: version_of[i],
            weight: e.weight,
            labels: e.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        })
        .collect();
    wit::Topology {
        model: m.name.get_ref().clone(),
        endpoints,
        regions: regions
            .into_iter()
            .map(|(name, latitude, longitude)| wit::RegionInfo { name, latitude, longitude })
            .collect(),
        local_region,
        versions,
        fallback_models: m.fallback.as_ref().map(|f| f.models.clone()).unwrap_or_default(),
    }
}

pub fn canary_phase_name(p: wit::CanaryPhase) -> &'static str {
    match p {
        wit::CanaryPhase::Ramping => "ramping",
        wit::CanaryPhase::Paused => "paused",
        wit::CanaryPhase::Promoted => "promoted",
        wit::CanaryPhase::RolledBack => "rolled-back",
    }
}

/// The request as a policy sees it.
pub fn wit_request(facts: &RequestFacts<'_>) -> wit::Request {
    wit::Request {
        tenant: facts.tenant,
        client_region: facts.client_region,
        prefix_hash: facts.prefix_hash,
        streaming: facts.stream,
        attempt: facts.attempt,
        prompt_tokens: facts.prompt_tokens,
    }
}

pub fn wit_state(e: &EndpointSnapshot) -> wit::EndpointState {
    let circuit = match e.circuit {
        Circuit::Closed => wit::CircuitState::Closed,
        Circuit::HalfOpen => wit::CircuitState::HalfOpen,
        // An open circuit that is due for a probe is offered as half-open.
        Circuit::Open if e.available => wit::CircuitState::HalfOpen,
        Circuit::Open => wit::CircuitState::Open,
    };
    wit::EndpointState {
        // "healthy" to a policy means: may take traffic as far as health and ejection go.
        healthy: e.available,
        circuit,
        in_flight: e.in_flight,
        ewma_latency_us: e.ewma_latency_us.min(u32::MAX as f64) as u32,
        error_rate_ppm: (e.error_rate * 1e6) as u32,
    }
}

impl Selector for Arc<Binding> {
    fn select(
        &self,
        facts: &RequestFacts<'_>,
        endpoints: &[EndpointSnapshot],
        ranked: &mut Vec<u32>,
    ) -> Result<(), Fault> {
        let mut packed = Vec::with_capacity(endpoints.len() * runtime::STATE_WORDS);
        for e in endpoints {
            runtime::pack_state(&mut packed, &wit_state(e));
        }
        *ranked = self.balance(wit_request(facts), &packed)?;
        Ok(())
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// `switchyard plugin check`: the load pipeline without a router. Returns a summary.
pub fn check_offline(name: &str, bytes: &[u8], config_json: &str) -> Result<String, String> {
    let cfg = PluginsConfig::default();
    let engine = PluginEngine::new(cfg.memory_limit, 4).map_err(|e| e.to_string())?;
    let cache = std::env::temp_dir().join(format!("switchyard-check-{}", std::process::id()));
    let loader = Loader::new(engine, cache.clone(), cfg.deadline).map_err(|e| e.to_string())?;
    let sha = loader::sha256_hex(bytes);
    let result = loader.load(name, bytes, &sha, config_json, 0);
    let _ = std::fs::remove_dir_all(&cache);
    let loaded = result?;
    Ok(format!(
        "{} {} (stages: {}; sha256 {})",
        loaded.name,
        loaded.version,
        loaded.stage_names().join(", "),
        &loaded.sha256[..16]
    ))
}
