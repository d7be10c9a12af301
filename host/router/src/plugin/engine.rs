//! The one place the wasmtime `Engine` is configured, and the only `unsafe` in the router.
//!
//! Pooling allocator (instances are cheap to create and recycle), epoch interruption (a
//! call that overruns its deadline traps; a 1 ms ticker thread advances the epoch while any
//! instance exists, and sleeps otherwise), a memory cap per instance, and no WASI anywhere.
#![allow(unsafe_code)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use wasmtime::component::Component;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often the epoch advances: the resolution of plugin deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

pub struct PluginEngine {
    pub engine: Engine,
    pub memory_limit: usize,
    /// Instances alive now; the ticker runs only while there are some. A router with no
    /// plugin loaded must not pay a thousand wake-ups a second on its cores.
    live: Arc<AtomicUsize>,
    ticker: std::thread::Thread,
}

/// Keeps the epoch ticker running while it lives (one per instance).
pub struct TickerGuard(Arc<AtomicUsize>);

impl Drop for TickerGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl PluginEngine {
    pub fn new(memory_limit: usize, max_instances: u32) -> anyhow::Result<Arc<PluginEngine>> {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(max_instances)
            .total_core_instances(max_instances)
            .total_memories(max_instances)
            .total_tables(max_instances)
            .max_memory_size(memory_limit)
            // Reset memories lazily but keep a little resident to make re-instantiation cheap.
            .linear_memory_keep_resident(64 * 1024);
        let mut cfg = Config::new();
        cfg.wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .cranelift_opt_level(wasmtime::OptLevel::Speed)
            // Policies are tiny; a modest reservation keeps virtual memory use sane.
            .memory_reservation(memory_limit as u64 + (64 << 20))
            .memory_guard_size(64 << 10)
            .wasm_backtrace_max_frames(None);
        let engine = Engine::new(&cfg).map_err(wt)?;
        let weak = engine.weak();
        let live = Arc::new(AtomicUsize::new(0));
        let users = live.clone();
        let ticker = std::thread::Builder::new().name("wasm-epoch".into()).spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                if users.load(Ordering::SeqCst) == 0 {
                    // Woken by the next instance; the timeout lets the thread notice that
                    // the engine is gone.
                    std::thread::park_timeout(Duration::from_secs(1));
                } else {
                    std::thread::sleep(EPOCH_TICK);
                }
            }
        })?;
        Ok(Arc::new(PluginEngine { engine, memory_limit, live, ticker: ticker.thread().clone() }))
    }

    /// Called for each new instance: the ticker runs until every guard is dropped.
    pub fn ticker_guard(&self) -> TickerGuard {
        if self.live.fetch_add(1, Ordering::SeqCst) == 0 {
            self.ticker.unpark();
        }
        TickerGuard(self.live.clone())
    }

    /// Deadline in epoch ticks for a call allowed to run `d`.
    pub fn ticks(d: Duration) -> u64 {
        (d.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64 + 1
    }

    /// Loads a compiled artifact this engine wrote earlier into the cache.
    ///
    /// Safety: `Component::deserialize_file` trusts the bytes to be wasmtime's own output.
    /// The cache folder is written only by `Loader::compile` (to a temporary name, then
    /// renamed), keyed by the SHA-256 of the source component; wasmtime also rejects
    /// artifacts from another version or configuration.
    pub fn load_cached(&self, path: &Path) -> anyhow::Result<Component> {
        // SAFETY: see above — the file is an artifact serialized by this engine's config.
        unsafe { Component::deserialize_file(&self.engine, path) }.map_err(wt)
    }
}

/// wasmtime's error type is its own; carry its full message into anyhow.
pub fn wt(e: wasmtime::Error) -> anyhow::Error {
    anyhow::anyhow!("{e:#}")
}
