//! Running policy components: typed bindings generated from `sdk/wit`, the host imports
//! (log, clock, random), warm instances kept per worker thread, and the rule that a call
//! which traps, overruns its deadline, hits the memory cap or answers nonsense is a
//! *fault*: the caller falls back to the native policy and the instance is discarded.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::{Store, StoreLimits, StoreLimitsBuilder};

use super::engine::PluginEngine;

wasmtime::component::bindgen!({
    path: "../../sdk/wit",
    world: "policy",
});

pub use self::switchyard::policy::types as wit;
pub use exports::switchyard::policy::plugin as abi;

/// What a store carries: its limits, the plugin's name for log lines, and the state the
/// host keeps for the plugin's model and stage.
pub struct StoreState {
    limits: StoreLimits,
    plugin: Arc<str>,
    shared: Arc<Shared>,
}

/// Host slots per model and stage (`host.slot-*` in the contract).
pub const SLOTS: usize = 64;

/// State the host keeps for one model's stage, whichever policy version serves it: the
/// shared slots every worker's instance reads and writes, the operator action waiting to
/// be applied, and the last canary status the policy reported.
pub struct Shared {
    slots: [AtomicU64; SLOTS],
    pending: Mutex<Option<wit::OperatorAction>>,
    canary: Mutex<Option<CanaryReport>>,
    /// Called with each canary report (metrics).
    on_report: Option<ReportHook>,
}

/// What the host does with a canary report besides keeping it (metrics).
pub type ReportHook = Box<dyn Fn(&wit::CanaryStatus) + Send + Sync>;

/// A canary status as reported, and when (`now_ms` clock).
#[derive(Clone)]
pub struct CanaryReport {
    pub status: wit::CanaryStatus,
    pub at_ms: u64,
}

impl Shared {
    pub fn new(on_report: Option<ReportHook>) -> Arc<Shared> {
        Arc::new(Shared {
            slots: std::array::from_fn(|_| AtomicU64::new(0)),
            pending: Mutex::new(None),
            canary: Mutex::new(None),
            on_report,
        })
    }

    /// Queues an operator action; the policy takes it on its next decision.
    pub fn queue_action(&self, action: wit::OperatorAction) {
        *self.pending.lock().unwrap() = Some(action);
    }

    pub fn pending_action(&self) -> Option<wit::OperatorAction> {
        *self.pending.lock().unwrap()
    }

    pub fn canary_report(&self) -> Option<CanaryReport> {
        self.canary.lock().unwrap().clone()
    }
}

impl self::switchyard::policy::host::Host for StoreState {
    fn log(&mut self, level: self::switchyard::policy::host::LogLevel, message: String) {
        use self::switchyard::policy::host::LogLevel as L;
        // Plugins may be chatty or hostile: cap what reaches the log.
        let msg: String = message.chars().take(512).collect();
        let plugin = &*self.plugin;
        match level {
            L::Debug => tracing::debug!(plugin, "{msg}"),
            L::Info => tracing::info!(plugin, "{msg}"),
            L::Warn => tracing::warn!(plugin, "{msg}"),
            L::Error => tracing::error!(plugin, "{msg}"),
        }
    }

    fn now_ms(&mut self) -> u64 {
        crate::upstream::now_ms()
    }

    fn random(&mut self) -> u64 {
        fastrand::u64(..)
    }

    fn slot_get(&mut self, slot: u32) -> u64 {
        self.shared.slots.get(slot as usize).map_or(0, |s| s.load(SeqCst))
    }

    fn slot_set(&mut self, slot: u32, value: u64) {
        if let Some(s) = self.shared.slots.get(slot as usize) {
            s.store(value, SeqCst);
        }
    }

    fn slot_swap(&mut self, slot: u32, current: u64, new: u64) -> bool {
        self.shared.slots.get(slot as usize).is_some_and(|s| s.compare_exchange(current, new, SeqCst, SeqCst).is_ok())
    }

    fn take_operator_action(&mut self) -> Option<wit::OperatorAction> {
        self.shared.pending.lock().unwrap().take()
    }

    fn report_canary(&mut self, mut status: wit::CanaryStatus) {
        status.reason = status.reason.chars().take(512).collect();
        status.share_permille = status.share_permille.min(1000);
        tracing::info!(
            plugin = &*self.plugin,
            share_percent = status.share_permille as f64 / 10.0,
            step = status.step,
            phase = ?status.phase,
            "canary: {}",
            status.reason
        );
        if let Some(f) = &self.shared.on_report {
            f(&status);
        }
        *self.shared.canary.lock().unwrap() = Some(CanaryReport { status, at_ms: crate::upstream::now_ms() });
    }
}

impl self::switchyard::policy::types::Host for StoreState {}

/// Interfaces a policy may import; anything else is refused at load.
pub const ALLOWED_IMPORTS: [&str; 2] = ["switchyard:policy/host@0.1.0", "switchyard:policy/types@0.1.0"];

pub fn linker(engine: &PluginEngine) -> anyhow::Result<Linker<StoreState>> {
    let mut linker = Linker::new(&engine.engine);
    self::switchyard::policy::host::add_to_linker::<StoreState, wasmtime::component::HasSelf<StoreState>>(
        &mut linker,
        |s| s,
    )
    .map_err(super::engine::wt)?;
    Ok(linker)
}

/// Every import of `component` that is not part of the contract.
pub fn foreign_imports(engine: &PluginEngine, component: &Component) -> Vec<String> {
    component
        .component_type()
        .imports(&engine.engine)
        .map(|(name, _)| name.to_string())
        .filter(|name| !ALLOWED_IMPORTS.contains(&name.as_str()))
        .collect()
}

/// A store plus a live instance, ready for calls.
pub struct Live {
    store: Store<StoreState>,
    policy: Policy,
    /// Keeps deadlines enforced while this instance exists.
    ticker: super::engine::TickerGuard,
}

/// Why a call did not produce a usable decision.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Trap, deadline or memory cap (wasmtime reports them all as traps).
    Trap(String),
    /// The answer broke the contract (index out of range, nothing chosen though
    /// something was available, ...).
    Invalid(String),
    /// `init` refused its config or could not run.
    Init(String),
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Trap(e) => write!(f, "trap: {e}"),
            Fault::Invalid(e) => write!(f, "invalid decision: {e}"),
            Fault::Init(e) => write!(f, "init failed: {e}"),
        }
    }
}

impl Fault {
    pub fn reason(&self) -> &'static str {
        match self {
            Fault::Trap(_) => "trap",
            Fault::Invalid(_) => "invalid",
            Fault::Init(_) => "init",
        }
    }
}

fn trap(e: wasmtime::Error) -> Fault {
    let mut s = e.to_string();
    if let Some(t) = e.downcast_ref::<wasmtime::Trap>() {
        s = match t {
            wasmtime::Trap::Interrupt => "deadline exceeded".to_string(),
            other => other.to_string(),
        };
    }
    Fault::Trap(s)
}

impl Live {
    /// A fresh instance: instantiate, `init(config)`, `set-topology`.
    pub fn start(
        engine: &PluginEngine,
        pre: &InstancePre<StoreState>,
        name: &Arc<str>,
        shared: &Arc<Shared>,
        config_json: &str,
        topology: &wit::Topology,
        init_deadline: Duration,
    ) -> Result<Live, Fault> {
        let ticker = engine.ticker_guard();
        let limits =
            StoreLimitsBuilder::new().memory_size(engine.memory_limit).instances(4).trap_on_grow_failure(true).build();
        let mut store = Store::new(&engine.engine, StoreState { limits, plugin: name.clone(), shared: shared.clone() });
        store.limiter(|s| &mut s.limits);
        let call = ticker.begin_call(&mut store, PluginEngine::ticks(init_deadline));
        let policy = PolicyPre::new(pre.clone()).and_then(|p| p.instantiate(&mut store)).map_err(trap)?;
        let api = policy.switchyard_policy_plugin();
        api.call_init(&mut store, config_json).map_err(trap)?.map_err(Fault::Init)?;
        api.call_set_topology(&mut store, topology).map_err(trap)?;
        drop(call);
        Ok(Live { store, policy, ticker })
    }

    /// Runs one export under a deadline of `ticks`; a trap of any kind becomes a fault.
    fn call<R>(
        &mut self,
        ticks: u64,
        f: impl FnOnce(&mut Store<StoreState>, &abi::Guest) -> wasmtime::Result<R>,
    ) -> Result<R, Fault> {
        let Live { store, policy, ticker } = self;
        let _call = ticker.begin_call(store, ticks);
        f(store, policy.switchyard_policy_plugin()).map_err(trap)
    }

    pub fn info(&mut self, deadline: Duration) -> Result<wit::PluginInfo, Fault> {
        self.call(PluginEngine::ticks(deadline), |s, p| p.call_info(s))
    }

    pub fn balance(&mut self, deadline_ticks: u64, req: wit::Request, packed: &[u32]) -> Result<Vec<u32>, Fault> {
        self.call(deadline_ticks, |s, p| p.call_balance(s, req, packed))
    }

    pub fn canary(
        &mut self,
        deadline_ticks: u64,
        req: wit::Request,
        versions: &[wit::VersionStats],
    ) -> Result<u32, Fault> {
        self.call(deadline_ticks, |s, p| p.call_canary(s, req, versions))
    }

    pub fn geo(
        &mut self,
        deadline_ticks: u64,
        req: wit::Request,
        regions: &[wit::RegionState],
    ) -> Result<wit::GeoDecision, Fault> {
        self.call(deadline_ticks, |s, p| p.call_geo(s, req, regions))
    }

    pub fn fallback(
        &mut self,
        deadline_ticks: u64,
        req: wit::Request,
        failure: wit::Failure,
    ) -> Result<wit::FallbackDecision, Fault> {
        self.call(deadline_ticks, |s, p| p.call_fallback(s, req, failure))
    }
}

/// Words per endpoint in `balance`'s packed argument (layout in `sdk/wit/policy.wit`).
pub const STATE_WORDS: usize = 4;

/// Appends one endpoint's state in the packed layout.
pub fn pack_state(out: &mut Vec<u32>, s: &wit::EndpointState) {
    let circuit = match s.circuit {
        wit::CircuitState::Closed => 0,
        wit::CircuitState::HalfOpen => 1,
        wit::CircuitState::Open => 2,
    };
    out.extend_from_slice(&[s.healthy as u32 | circuit << 1, s.in_flight, s.ewma_latency_us, s.error_rate_ppm]);
}

/// One plugin version bound to one model: the unit that owns warm instances.
pub struct Binding {
    pub uid: u64,
    pub engine: Arc<PluginEngine>,
    pub pre: InstancePre<StoreState>,
    pub name: Arc<str>,
    pub sha256: String,
    pub config_json: String,
    pub topology: wit::Topology,
    pub deadline: Duration,
    pub deadline_ticks: u64,
    pub stats: Arc<PluginStats>,
    /// The host state of the model and stage this binding serves.
    pub shared: Arc<Shared>,
}

/// Counters shared by every binding of one plugin version.
#[derive(Default)]
pub struct PluginStats {
    pub calls: AtomicU64,
    pub faults: AtomicU64,
    pub last_fault: Mutex<Option<String>>,
    /// The current quarantine window: (start ms, calls at start, faults since start).
    pub window: Mutex<(u64, u64, u32)>,
}

thread_local! {
    /// Warm instances of this worker thread, with the uid of their binding. A `Store`
    /// cannot cross threads, so each worker keeps its own. A thread holds a handful (one
    /// per model and stage with a plugin), so a linear scan beats hashing.
    static WARM: RefCell<Vec<(u64, Weak<Binding>, Live)>> = const { RefCell::new(Vec::new()) };
}

impl Binding {
    /// Runs `f` on this thread's warm instance (starting one if needed). A fault drops the
    /// instance, so the next call starts from a clean one.
    fn with_live<R>(self: &Arc<Self>, f: impl FnOnce(&mut Live) -> Result<R, Fault>) -> Result<R, Fault> {
        WARM.with(|warm| {
            let mut warm = warm.borrow_mut();
            let at = match warm.iter().position(|w| w.0 == self.uid) {
                Some(at) => at,
                None => {
                    // Forget instances whose binding was unpublished.
                    warm.retain(|w| w.1.strong_count() > 0);
                    let live = Live::start(
                        &self.engine,
                        &self.pre,
                        &self.name,
                        &self.shared,
                        &self.config_json,
                        &self.topology,
                        self.deadline.max(Duration::from_millis(50)),
                    )?;
                    warm.push((self.uid, Arc::downgrade(self), live));
                    warm.len() - 1
                }
            };
            let result = f(&mut warm[at].2);
            if result.is_err() {
                warm.swap_remove(at);
            }
            result
        })
    }

    /// Asks the policy to rank endpoints (`packed`: see `pack_state`). `Err` means: use
    /// the native policy.
    pub fn balance(self: &Arc<Self>, req: wit::Request, packed: &[u32]) -> Result<Vec<u32>, Fault> {
        self.stats.calls.fetch_add(1, Relaxed);
        let ticks = self.deadline_ticks;
        let ranked = self.with_live(|live| live.balance(ticks, req, packed))?;
        let n = (packed.len() / STATE_WORDS) as u32;
        if let Some(bad) = ranked.iter().find(|&&i| i >= n) {
            return Err(Fault::Invalid(format!("endpoint index {bad} out of range (there are {n})")));
        }
        let any_available = packed.chunks_exact(STATE_WORDS).any(|w| w[0] & 1 != 0 && (w[0] >> 1) & 3 != 2);
        if ranked.is_empty() && any_available {
            return Err(Fault::Invalid("chose no endpoint although some are available".into()));
        }
        Ok(ranked)
    }

    /// Asks the policy which version serves the request (an index into the topology's
    /// versions). `Err` means: no preference.
    pub fn canary(self: &Arc<Self>, req: wit::Request, versions: &[wit::VersionStats]) -> Result<u32, Fault> {
        self.stats.calls.fetch_add(1, Relaxed);
        let ticks = self.deadline_ticks;
        let v = self.with_live(|live| live.canary(ticks, req, versions))?;
        if v as usize >= versions.len() {
            return Err(Fault::Invalid(format!("version {v} out of range (there are {})", versions.len())));
        }
        Ok(v)
    }

    /// Asks the policy which region serves the request. `Err` means: serve locally.
    pub fn geo(self: &Arc<Self>, req: wit::Request, regions: &[wit::RegionState]) -> Result<wit::GeoDecision, Fault> {
        self.stats.calls.fetch_add(1, Relaxed);
        let ticks = self.deadline_ticks;
        let d = self.with_live(|live| live.geo(ticks, req, regions))?;
        if let wit::GeoDecision::Forward(i) = d
            && i as usize >= regions.len()
        {
            return Err(Fault::Invalid(format!("region {i} out of range (there are {})", regions.len())));
        }
        Ok(d)
    }

    /// Asks the policy what to do after a model of the request's chain failed. `Err` means:
    /// use the native order (next model, then rules).
    pub fn fallback(
        self: &Arc<Self>,
        req: wit::Request,
        failure: wit::Failure,
    ) -> Result<wit::FallbackDecision, Fault> {
        self.stats.calls.fetch_add(1, Relaxed);
        let ticks = self.deadline_ticks;
        let decision = self.with_live(|live| live.fallback(ticks, req, failure))?;
        if let wit::FallbackDecision::FallbackModel(i) = decision
            && i as usize >= self.topology.fallback_models.len()
        {
            return Err(Fault::Invalid(format!(
                "fallback model {i} out of range (the chain has {})",
                self.topology.fallback_models.len()
            )));
        }
        Ok(decision)
    }
}
