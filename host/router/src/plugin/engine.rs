//! The one place the wasmtime `Engine` is configured, and the only `unsafe` in the router.
//!
//! Pooling allocator (instances are cheap to create and recycle), epoch interruption (a
//! call that overruns its deadline traps; a watchdog thread advances the epoch every 1 ms
//! while a call runs, every 4 ms while instances exist, and sleeps otherwise), a memory
//! cap per instance, and no WASI anywhere.
#![allow(unsafe_code)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use wasmtime::component::Component;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// The resolution of plugin deadlines: the epoch advances this often while a call runs.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// How often the epoch advances while instances exist but no call is running. A call
/// that starts in between is noticed at the next wake-up, so deadlines of at least this
/// long keep `EPOCH_TICK` resolution; a policy decision takes about a microsecond, so
/// almost every wake-up finds nothing running, and this costs a fifth of the wake-ups of
/// ticking every millisecond.
pub const IDLE_TICK: Duration = Duration::from_millis(4);

pub struct PluginEngine {
    pub engine: Engine,
    pub memory_limit: usize,
    clock: Arc<EpochClock>,
}

/// The epoch as a clock: epoch `e` means `e` milliseconds since the engine started, as
/// of the watchdog's last wake-up.
struct EpochClock {
    start: Instant,
    /// Milliseconds since `start` that the engine's epoch has been (or is being) advanced
    /// to. Written before the epoch moves, so a call that reads it can only be late.
    epoch_ms: AtomicU64,
    /// Instances alive now; the watchdog sleeps while there are none, so a router with no
    /// plugin loaded does not pay wake-ups on its cores.
    live: AtomicUsize,
    /// Calls running now: the watchdog ticks every `EPOCH_TICK` while there are some.
    calls: AtomicUsize,
    thread: std::sync::OnceLock<std::thread::Thread>,
}

impl EpochClock {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

/// Keeps the epoch watchdog running while it lives (one per instance).
pub struct TickerGuard(Arc<EpochClock>);

impl Drop for TickerGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

impl TickerGuard {
    /// Arms `store` for one call allowed `ticks` (see [`PluginEngine::ticks`]) and counts
    /// the call as running until the returned guard drops.
    pub fn begin_call<T>(&self, store: &mut wasmtime::Store<T>, ticks: u64) -> CallGuard<'_> {
        let clock = &*self.0;
        clock.calls.fetch_add(1, Ordering::SeqCst);
        // The engine's epoch may lag real time by up to `IDLE_TICK`: add the lag, so the
        // deadline counts from now.
        let lag = clock.now_ms().saturating_sub(clock.epoch_ms.load(Ordering::SeqCst));
        store.set_epoch_deadline(ticks + lag);
        CallGuard(clock)
    }
}

/// A call in progress (see [`TickerGuard::begin_call`]).
pub struct CallGuard<'a>(&'a EpochClock);

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        self.0.calls.fetch_sub(1, Ordering::SeqCst);
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
            // A full 4 GiB reservation plus a 2 GiB guard lets cranelift drop the bounds
            // check on every guest load and store (any 32-bit address lands in the
            // reservation or the guard). It is address space only: nothing is committed
            // beyond what the guest grows into, and the cap above still applies.
            .memory_reservation(4 << 30)
            .memory_guard_size(2 << 30)
            .wasm_backtrace_max_frames(None);
        let engine = Engine::new(&cfg).map_err(wt)?;
        let clock = Arc::new(EpochClock {
            start: Instant::now(),
            epoch_ms: AtomicU64::new(0),
            live: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
            thread: std::sync::OnceLock::new(),
        });
        let weak = engine.weak();
        let c = clock.clone();
        let watchdog = std::thread::Builder::new().name("wasm-epoch".into()).spawn(move || {
            while let Some(engine) = weak.upgrade() {
                let now = c.now_ms();
                let before = c.epoch_ms.swap(now, Ordering::SeqCst);
                for _ in before..now {
                    engine.increment_epoch();
                }
                drop(engine);
                if c.live.load(Ordering::SeqCst) == 0 {
                    // Woken by the next instance; the timeout lets the thread notice that
                    // the engine is gone.
                    std::thread::park_timeout(Duration::from_secs(1));
                } else if c.calls.load(Ordering::SeqCst) > 0 {
                    std::thread::sleep(EPOCH_TICK);
                } else {
                    std::thread::sleep(IDLE_TICK);
                }
            }
        })?;
        let _ = clock.thread.set(watchdog.thread().clone());
        Ok(Arc::new(PluginEngine { engine, memory_limit, clock }))
    }

    /// Called for each new instance: the watchdog runs until every guard is dropped.
    pub fn ticker_guard(&self) -> TickerGuard {
        if self.clock.live.fetch_add(1, Ordering::SeqCst) == 0
            && let Some(t) = self.clock.thread.get()
        {
            t.unpark();
        }
        TickerGuard(self.clock.clone())
    }

    /// Deadline in epoch ticks for a call allowed to run `d`: the epoch may move just
    /// after the call starts, so one tick more than `d` holds.
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A core module exporting `spin`, a function that loops forever:
    /// `(module (func (export "spin") (loop (br 0))))`.
    const SPIN: &[u8] = &[
        0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version
        0x01, 0x04, 0x01, 0x60, 0x00, 0x00, // types: [] -> []
        0x03, 0x02, 0x01, 0x00, // functions: one of type 0
        0x07, 0x08, 0x01, 0x04, b's', b'p', b'i', b'n', 0x00, 0x00, // export "spin"
        0x0a, 0x09, 0x01, 0x07, 0x00, 0x03, 0x40, 0x0c, 0x00, 0x0b, 0x0b, // loop { br 0 }
    ];

    #[test]
    fn a_runaway_call_is_stopped_after_its_deadline_and_never_before() {
        let engine = PluginEngine::new(1 << 20, 4).unwrap();
        let module = wasmtime::Module::new(&engine.engine, SPIN).unwrap();
        let guard = engine.ticker_guard();
        let mut store = wasmtime::Store::new(&engine.engine, ());
        let instance = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
        let spin = instance.get_typed_func::<(), ()>(&mut store, "spin").unwrap();
        // Calls start at different points between the watchdog's idle wake-ups, when the
        // engine's epoch is up to `IDLE_TICK` behind the clock: the deadline must still
        // count from the start of the call.
        for (i, d) in [2u64, 3, 5, 7, 2, 3, 5, 7].into_iter().enumerate() {
            let d = Duration::from_millis(d);
            std::thread::sleep(IDLE_TICK * 2 + Duration::from_micros(700 * i as u64));
            let t = Instant::now();
            let call = guard.begin_call(&mut store, PluginEngine::ticks(d));
            let err = spin.call(&mut store, ()).unwrap_err();
            drop(call);
            let took = t.elapsed();
            assert_eq!(err.downcast_ref::<wasmtime::Trap>(), Some(&wasmtime::Trap::Interrupt), "{err:?}");
            assert!(took >= d, "call {i} with a {d:?} deadline was stopped after {took:?}");
            // Stopped, not left spinning (the bound is loose: this machine may be shared).
            assert!(took < d + Duration::from_secs(1), "call {i} ran {took:?} past a {d:?} deadline");
        }
    }
}
