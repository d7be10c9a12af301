//! Turning a file into a servable plugin version, off the request path: compile (or load
//! the cached artifact for the same content hash), refuse imports outside the contract,
//! instantiate, `init` with the plugin's config, and a self-test decision on a synthetic
//! endpoint set. Any failure is reported with its reason and nothing is published.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, InstancePre, Linker};

use super::engine::PluginEngine;
use super::runtime::{self, Binding, Live, PluginStats, Shared, StoreState, wit};

pub struct Loader {
    engine: Arc<PluginEngine>,
    linker: Linker<StoreState>,
    cache_dir: PathBuf,
    deadline: Duration,
}

/// A validated plugin version.
pub struct Loaded {
    pub name: Arc<str>,
    pub version: String,
    pub sha256: String,
    pub stages: Vec<wit::Stage>,
    pub pre: InstancePre<StoreState>,
    pub config_json: String,
    pub stats: Arc<PluginStats>,
    /// Whether the compiled artifact came from the cache (no compile on this load).
    pub from_cache: bool,
    engine: Arc<PluginEngine>,
}

impl Loaded {
    pub fn bind(&self, uid: u64, topology: wit::Topology, deadline: Duration, shared: Arc<Shared>) -> Binding {
        Binding {
            uid,
            engine: self.engine.clone(),
            pre: self.pre.clone(),
            name: self.name.clone(),
            sha256: self.sha256.clone(),
            config_json: self.config_json.clone(),
            topology,
            deadline,
            deadline_ticks: PluginEngine::ticks(deadline),
            stats: self.stats.clone(),
            shared,
        }
    }

    pub fn stage_names(&self) -> Vec<&'static str> {
        self.stages.iter().map(|s| super::STAGES[*s as usize]).collect()
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Least deadline for a self-test decision.
const SELF_TEST_MIN_DEADLINE: Duration = Duration::from_millis(100);

/// Time `init` and the self-test may take (generous: a big guest may set up tables).
const INIT_DEADLINE: Duration = Duration::from_secs(1);

impl Loader {
    pub fn new(engine: Arc<PluginEngine>, cache_dir: PathBuf, deadline: Duration) -> anyhow::Result<Loader> {
        let linker = runtime::linker(&engine)?;
        Ok(Loader { engine, linker, cache_dir, deadline })
    }

    pub fn engine(&self) -> &Arc<PluginEngine> {
        &self.engine
    }

    /// Compiles `bytes`, or loads the artifact cached for `sha` (then the flag is true).
    pub fn compile(&self, bytes: &[u8], sha: &str) -> Result<(Component, bool), String> {
        let cached = self.cache_dir.join(format!("{sha}.cwasm"));
        if cached.exists() {
            match self.engine.load_cached(&cached) {
                Ok(c) => return Ok((c, true)),
                Err(e) => tracing::info!("cached artifact {} unusable ({e}); recompiling", cached.display()),
            }
        }
        let component = Component::new(&self.engine.engine, bytes).map_err(|e| {
            // The first line says it all ("failed to parse WebAssembly module", ...).
            format!("not a valid WebAssembly component: {}", e.to_string().lines().next().unwrap_or(""))
        })?;
        if let Ok(serialized) = component.serialize() {
            let _ = std::fs::create_dir_all(&self.cache_dir);
            let tmp = self.cache_dir.join(format!(".{sha}.tmp{}", std::process::id()));
            if std::fs::write(&tmp, serialized).is_ok() {
                let _ = std::fs::rename(&tmp, &cached);
            }
        }
        Ok((component, false))
    }

    /// The whole validation pipeline. `Err` carries a reason fit for an operator.
    pub fn load(&self, name: &str, bytes: &[u8], sha: &str, config_json: &str, _uid: u64) -> Result<Loaded, String> {
        let (component, from_cache) = self.compile(bytes, sha)?;
        let foreign = runtime::foreign_imports(&self.engine, &component);
        if let Some(first) = foreign.first() {
            return Err(format!(
                "imports `{first}`, which is outside the policy contract (only `switchyard:policy/host` may be imported){}",
                if foreign.len() > 1 { format!(" (and {} more)", foreign.len() - 1) } else { String::new() }
            ));
        }
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| format!("does not match the policy contract: {}", first_line(&e.to_string())))?;
        let name: Arc<str> = Arc::from(name);
        let topology = synthetic_topology();
        // The self-test gets scratch host state: it must not move a live rollout.
        let scratch = Shared::new(None);
        let mut live = Live::start(&self.engine, &pre, &name, &scratch, config_json, &topology, INIT_DEADLINE)
            .map_err(|f| format!("failed to start: {f}"))?;
        let info = live.info(INIT_DEADLINE).map_err(|f| format!("info() failed: {f}"))?;
        if info.stages.is_empty() {
            return Err("info() lists no stages".into());
        }
        if info.stages.contains(&wit::Stage::Balance) {
            // Generous against preemption on a busy host; a runaway loop still fails it.
            self_test_balance(&mut live, (self.deadline * 10).max(SELF_TEST_MIN_DEADLINE))?;
        }
        if info.stages.contains(&wit::Stage::Fallback) {
            self_test_fallback(&mut live, (self.deadline * 10).max(SELF_TEST_MIN_DEADLINE))?;
        }
        if info.stages.contains(&wit::Stage::Canary) || info.stages.contains(&wit::Stage::Geo) {
            self_test_canary_geo(&mut live, &info.stages, (self.deadline * 10).max(SELF_TEST_MIN_DEADLINE))?;
        }
        Ok(Loaded {
            name,
            version: info.version,
            sha256: sha.to_string(),
            stages: info.stages,
            pre,
            config_json: config_json.to_string(),
            stats: Arc::new(PluginStats::default()),
            from_cache,
            engine: self.engine.clone(),
        })
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

fn synthetic_topology() -> wit::Topology {
    wit::Topology {
        model: "self-test".into(),
        endpoints: (0..4)
            .map(|i| wit::EndpointInfo {
                name: format!("self-test-{i}"),
                region: 0,
                version: 0,
                weight: 1 + i % 2,
                labels: Vec::new(),
            })
            .collect(),
        regions: vec![
            wit::RegionInfo { name: "local".into(), latitude: 0.0, longitude: 0.0 },
            wit::RegionInfo { name: "remote".into(), latitude: 10.0, longitude: 10.0 },
        ],
        local_region: 0,
        versions: vec!["v1".into(), "v2".into()],
        fallback_models: vec!["self-test-fallback".into()],
    }
}

fn self_test_request(k: u32) -> wit::Request {
    wit::Request {
        tenant: k as u64 + 1,
        client_region: if k % 3 == 2 { u32::MAX } else { k % 2 },
        prefix_hash: 0x9e37_79b9 * (k as u64 + 1),
        streaming: k.is_multiple_of(2),
        attempt: 0,
        prompt_tokens: 16,
    }
}

/// Canary and geo decisions on the synthetic topology (two versions, two regions).
fn self_test_canary_geo(live: &mut Live, stages: &[wit::Stage], deadline: Duration) -> Result<(), String> {
    let ticks = PluginEngine::ticks(deadline);
    for k in 0..8u32 {
        if stages.contains(&wit::Stage::Canary) {
            let versions = [
                wit::VersionStats { requests: 100 * k as u64, errors: k as u64, p99_latency_us: 200_000 },
                wit::VersionStats { requests: 10 * k as u64, errors: 0, p99_latency_us: 210_000 },
            ];
            let v = live
                .canary(ticks, self_test_request(k), &versions)
                .map_err(|f| format!("self-test canary decision failed: {f}"))?;
            if v >= 2 {
                return Err(format!("self-test canary decision chose version {v}, but only 2 exist"));
            }
        }
        if stages.contains(&wit::Stage::Geo) {
            let regions = [
                wit::RegionState { healthy: k % 4 != 1, load_permille: 100 * k },
                wit::RegionState { healthy: true, load_permille: 0 },
            ];
            let d = live
                .geo(ticks, self_test_request(k), &regions)
                .map_err(|f| format!("self-test geo decision failed: {f}"))?;
            if let wit::GeoDecision::Forward(i) = d
                && i >= 2
            {
                return Err(format!("self-test geo decision chose region {i}, but only 2 exist"));
            }
        }
    }
    Ok(())
}

/// Fallback decisions for each failure kind, at the start of the chain and past its end.
fn self_test_fallback(live: &mut Live, deadline: Duration) -> Result<(), String> {
    let ticks = PluginEngine::ticks(deadline);
    let kinds = [
        wit::FailureKind::Connect,
        wit::FailureKind::Timeout,
        wit::FailureKind::ServerError,
        wit::FailureKind::CircuitOpen,
        wit::FailureKind::Overload,
    ];
    for (k, kind) in kinds.into_iter().enumerate() {
        for attempt in 0..2u32 {
            let req = wit::Request {
                tenant: k as u64,
                client_region: u32::MAX,
                prefix_hash: 0,
                streaming: false,
                attempt,
                prompt_tokens: 16,
            };
            let failure = wit::Failure { kind, attempts: 1, elapsed_ms: 100 };
            let d =
                live.fallback(ticks, req, failure).map_err(|f| format!("self-test fallback decision failed: {f}"))?;
            if let wit::FallbackDecision::FallbackModel(i) = d
                && i >= 1
            {
                return Err(format!("self-test fallback chose model {i}, but the chain has 1"));
            }
        }
    }
    Ok(())
}

/// A few decisions on a synthetic endpoint set, under the real per-call deadline.
fn self_test_balance(live: &mut Live, deadline: Duration) -> Result<(), String> {
    let ticks = PluginEngine::ticks(deadline);
    let state = |healthy: bool, in_flight: u32| wit::EndpointState {
        healthy,
        circuit: if healthy { wit::CircuitState::Closed } else { wit::CircuitState::Open },
        in_flight,
        ewma_latency_us: 1_000 + in_flight * 100,
        error_rate_ppm: 0,
    };
    let cases = [
        vec![state(true, 0), state(true, 1), state(true, 2), state(true, 3)],
        vec![state(false, 0), state(true, 5), state(false, 0), state(true, 1)],
    ];
    for (round, states) in cases.iter().enumerate() {
        let mut endpoints = Vec::new();
        for s in states {
            runtime::pack_state(&mut endpoints, s);
        }
        let n = states.len();
        for k in 0..8u32 {
            let req = wit::Request {
                tenant: k as u64,
                client_region: u32::MAX,
                prefix_hash: 0x9e37_79b9 * (k as u64 + 1),
                streaming: k % 2 == 0,
                attempt: 0,
                prompt_tokens: 16,
            };
            let ranked = live.balance(ticks, req, &endpoints).map_err(|f| format!("self-test decision failed: {f}"))?;
            if let Some(bad) = ranked.iter().find(|&&i| i as usize >= n) {
                return Err(format!("self-test decision chose endpoint {bad}, but only {n} exist (round {round})"));
            }
            if ranked.is_empty() {
                return Err(format!("self-test decision chose no endpoint although some are healthy (round {round})"));
            }
        }
    }
    Ok(())
}
