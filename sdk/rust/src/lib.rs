//! Rust SDK for Switchyard routing policies.
//!
//! A policy is one type implementing [`Policy`] plus one line, `export_policy!(MyType);`.
//! Build the crate as a `cdylib` for `wasm32-unknown-unknown` and turn the module into a
//! component with `switchyard plugin componentize`; the result imports nothing outside the
//! contract in `sdk/wit/policy.wit`.
//!
//! ```ignore
//! use switchyard_policy::*;
//!
//! struct First;
//! impl Policy for First {
//!     const NAME: &'static str = "first";
//!     const VERSION: &'static str = "1.0.0";
//!     fn new(_config: &str) -> Result<Self, String> { Ok(First) }
//!     fn balance(&mut self, _req: &Request, endpoints: &[EndpointState]) -> Vec<u32> {
//!         (0..endpoints.len() as u32).collect()
//!     }
//! }
//! export_policy!(First);
//! ```

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "policy",
        pub_export_macro: true,
        default_bindings_module: "switchyard_policy::bindings",
        // `endpoint-state` documents the packed `balance` argument; generate it anyway.
        generate_unused_types: true,
    });
}

pub use bindings::switchyard::policy::types::{
    CanaryPhase, CanaryStatus, CircuitState, EndpointInfo, EndpointState, Failure, FailureKind, FallbackDecision,
    GeoDecision, OperatorAction, PluginInfo, RegionInfo, RegionState, Request, Stage, Topology, VersionStats,
};

/// Client region value meaning "unknown".
pub const NO_REGION: u32 = u32::MAX;

/// A routing policy. Only the stages listed in `STAGES` are ever called; the defaults
/// of the others are never used by the router.
pub trait Policy: Sized + 'static {
    const NAME: &'static str;
    const VERSION: &'static str;
    const STAGES: &'static [Stage] = &[Stage::Balance];

    /// Builds the policy from its config section (JSON text, "{}" when absent).
    fn new(config: &str) -> Result<Self, String>;

    /// The endpoint set, regions and versions changed (also called right after `new`).
    fn set_topology(&mut self, _topology: Topology) {}

    /// Endpoint indices, most preferred first.
    fn balance(&mut self, _req: &Request, endpoints: &[EndpointState]) -> Vec<u32> {
        (0..endpoints.len() as u32).collect()
    }

    /// Index of the version that serves this request.
    fn canary(&mut self, _req: &Request, _versions: &[VersionStats]) -> u32 {
        0
    }

    fn geo(&mut self, _req: &Request, _regions: &[RegionState]) -> GeoDecision {
        GeoDecision::Local
    }

    fn fallback(&mut self, _req: &Request, _failure: &Failure) -> FallbackDecision {
        FallbackDecision::GiveUp
    }
}

/// Logs through the router's log (shows up with the plugin's name).
pub fn log(level: LogLevel, message: &str) {
    #[cfg(target_arch = "wasm32")]
    bindings::switchyard::policy::host::log(level, message);
    #[cfg(not(target_arch = "wasm32"))]
    let _ = (level, message);
}

pub use bindings::switchyard::policy::host::LogLevel;

/// Monotonic milliseconds from the host (natively, for tests and benchmarks, what
/// `set_now_ms_for_test` set on this thread, 0 until then).
pub fn now_ms() -> u64 {
    #[cfg(target_arch = "wasm32")]
    return bindings::switchyard::policy::host::now_ms();
    #[cfg(not(target_arch = "wasm32"))]
    native::NOW_MS.get()
}

/// A random number from the host (a fixed seed when compiled natively).
pub fn random() -> u64 {
    #[cfg(target_arch = "wasm32")]
    return bindings::switchyard::policy::host::random();
    #[cfg(not(target_arch = "wasm32"))]
    0x9e37_79b9_7f4a_7c15
}

/// Number of shared slots the host keeps per model and stage (see [`slot_get`]).
pub const SLOTS: u32 = 64;

/// Reads shared slot `slot`: state every instance of the policy (one per worker thread)
/// sees, kept per model and stage, surviving a hot swap. Unset slots and indices past 63
/// read 0. Natively the slots are per thread, so one test's policy values share them.
pub fn slot_get(slot: u32) -> u64 {
    #[cfg(target_arch = "wasm32")]
    return bindings::switchyard::policy::host::slot_get(slot);
    #[cfg(not(target_arch = "wasm32"))]
    native::SLOTS.with_borrow(|s| s.get(slot as usize).copied().unwrap_or(0))
}

/// Writes shared slot `slot` (indices past 63 are ignored).
pub fn slot_set(slot: u32, value: u64) {
    #[cfg(target_arch = "wasm32")]
    bindings::switchyard::policy::host::slot_set(slot, value);
    #[cfg(not(target_arch = "wasm32"))]
    native::SLOTS.with_borrow_mut(|s| {
        if let Some(v) = s.get_mut(slot as usize) {
            *v = value;
        }
    })
}

/// Sets shared slot `slot` to `new` if it holds `current`, atomically across instances;
/// whether it did. The building block for race-free transitions of shared state.
pub fn slot_swap(slot: u32, current: u64, new: u64) -> bool {
    #[cfg(target_arch = "wasm32")]
    return bindings::switchyard::policy::host::slot_swap(slot, current, new);
    #[cfg(not(target_arch = "wasm32"))]
    native::SLOTS.with_borrow_mut(|s| match s.get_mut(slot as usize) {
        Some(v) if *v == current => {
            *v = new;
            true
        }
        _ => false,
    })
}

/// Canary policies: the operator action waiting to be applied (from the admin API), handed
/// out once. Natively, what `set_operator_action_for_test` queued on this thread.
pub fn take_operator_action() -> Option<OperatorAction> {
    #[cfg(target_arch = "wasm32")]
    return bindings::switchyard::policy::host::take_operator_action();
    #[cfg(not(target_arch = "wasm32"))]
    native::OPERATOR_ACTION.take()
}

/// Canary policies: publishes the rollout state (admin API and metrics). Call it when the
/// state changes, not per request. Natively, kept per thread for `last_canary_report`.
pub fn report_canary(status: &CanaryStatus) {
    #[cfg(target_arch = "wasm32")]
    bindings::switchyard::policy::host::report_canary(status);
    #[cfg(not(target_arch = "wasm32"))]
    native::CANARY_REPORT.set(Some(status.clone()));
}

/// Native tests: sets what [`now_ms`] returns on this thread.
#[doc(hidden)]
#[cfg(not(target_arch = "wasm32"))]
pub fn set_now_ms_for_test(ms: u64) {
    native::NOW_MS.set(ms);
}

/// Native tests: queues the action the next [`take_operator_action`] on this thread hands out.
#[doc(hidden)]
#[cfg(not(target_arch = "wasm32"))]
pub fn set_operator_action_for_test(action: OperatorAction) {
    native::OPERATOR_ACTION.set(Some(action));
}

/// Native tests: the last status passed to [`report_canary`] on this thread.
#[doc(hidden)]
#[cfg(not(target_arch = "wasm32"))]
pub fn last_canary_report() -> Option<CanaryStatus> {
    native::CANARY_REPORT.with_borrow(|r| r.clone())
}

/// Native tests: clears this thread's slots, clock, pending operator action and report
/// (a test harness may run several tests on one thread).
#[doc(hidden)]
#[cfg(not(target_arch = "wasm32"))]
pub fn reset_host_for_test() {
    native::SLOTS.set([0; SLOTS as usize]);
    native::NOW_MS.set(0);
    native::OPERATOR_ACTION.set(None);
    native::CANARY_REPORT.set(None);
}

/// The host imports' stand-ins when compiled natively: per-thread, for unit tests.
#[cfg(not(target_arch = "wasm32"))]
mod native {
    use super::{CanaryStatus, OperatorAction, SLOTS as COUNT};
    use std::cell::{Cell, RefCell};

    std::thread_local! {
        pub static SLOTS: RefCell<[u64; COUNT as usize]> = const { RefCell::new([0; COUNT as usize]) };
        pub static NOW_MS: Cell<u64> = const { Cell::new(0) };
        pub static OPERATOR_ACTION: Cell<Option<OperatorAction>> = const { Cell::new(None) };
        pub static CANARY_REPORT: RefCell<Option<CanaryStatus>> = const { RefCell::new(None) };
    }
}

/// A small fast PRNG (xorshift64*) for policies that draw per decision without a host call.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u32) -> u32 {
        (((self.next_u64() >> 32) * n as u64) >> 32) as u32
    }
}

/// 64-bit FNV-1a followed by a finaliser: a stable hash for names and keys.
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix64(h)
}

/// splitmix64's finaliser: spreads the bits of a 64-bit value.
pub fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Mean Earth radius used by [`haversine_km`], kilometres.
pub const EARTH_RADIUS_KM: f64 = 6371.0;

/// Great-circle distance in kilometres between two points given as latitude and longitude
/// in degrees (haversine formula on a sphere of radius [`EARTH_RADIUS_KM`]).
pub fn haversine_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (phi1, phi2) = (lat1.to_radians(), lat2.to_radians());
    let d_phi = (lat2 - lat1).to_radians();
    let d_lambda = (lon2 - lon1).to_radians();
    let a = (d_phi / 2.0).sin().powi(2) + phi1.cos() * phi2.cos() * (d_lambda / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * a.sqrt().min(1.0).asin()
}

/// Whether an endpoint may take traffic: healthy and its circuit not open.
pub fn available(e: &EndpointState) -> bool {
    e.healthy && e.circuit != CircuitState::Open
}

/// Words per endpoint in the packed `balance` argument.
pub const STATE_WORDS: usize = 4;

/// Unpacks `balance`'s endpoint states (layout documented in `policy.wit`).
pub fn unpack_states(words: &[u32]) -> Vec<EndpointState> {
    let mut out = Vec::with_capacity(words.len() / STATE_WORDS);
    unpack_states_into(words, &mut out);
    out
}

/// Like [`unpack_states`], into a vector the caller reuses: the exported `balance` keeps
/// one per instance, so a decision costs no allocation for its arguments.
pub fn unpack_states_into(words: &[u32], out: &mut Vec<EndpointState>) {
    out.clear();
    out.extend(words.chunks_exact(STATE_WORDS).map(|w| EndpointState {
        healthy: w[0] & 1 != 0,
        circuit: match (w[0] >> 1) & 3 {
            0 => CircuitState::Closed,
            1 => CircuitState::HalfOpen,
            _ => CircuitState::Open,
        },
        in_flight: w[1],
        ewma_latency_us: w[2],
        error_rate_ppm: w[3],
    }));
}

/// Exports a [`Policy`] type as the component's `plugin` interface.
#[macro_export]
macro_rules! export_policy {
    ($policy:ty) => {
        const _: () = {
            use ::std::cell::RefCell;
            use $crate::Policy as _;
            use $crate::bindings::exports::switchyard::policy::plugin::Guest;

            ::std::thread_local! {
                static STATE: RefCell<Option<$policy>> = const { RefCell::new(None) };
                static ENDPOINTS: RefCell<Vec<$crate::EndpointState>> = const { RefCell::new(Vec::new()) };
            }

            fn with<R>(f: impl FnOnce(&mut $policy) -> R) -> R {
                STATE.with(|s| f(s.borrow_mut().as_mut().expect("switchyard called the policy before init")))
            }

            struct Adapter;

            impl Guest for Adapter {
                fn info() -> $crate::PluginInfo {
                    $crate::PluginInfo {
                        name: <$policy>::NAME.to_string(),
                        version: <$policy>::VERSION.to_string(),
                        stages: <$policy>::STAGES.to_vec(),
                    }
                }
                fn init(config: String) -> Result<(), String> {
                    let p = <$policy>::new(&config)?;
                    STATE.with(|s| *s.borrow_mut() = Some(p));
                    Ok(())
                }
                fn set_topology(t: $crate::Topology) {
                    with(|p| p.set_topology(t))
                }
                fn balance(req: $crate::Request, packed: Vec<u32>) -> Vec<u32> {
                    ENDPOINTS.with(|e| {
                        let mut endpoints = e.borrow_mut();
                        $crate::unpack_states_into(&packed, &mut endpoints);
                        with(|p| p.balance(&req, &endpoints))
                    })
                }
                fn canary(req: $crate::Request, versions: Vec<$crate::VersionStats>) -> u32 {
                    with(|p| p.canary(&req, &versions))
                }
                fn geo(req: $crate::Request, regions: Vec<$crate::RegionState>) -> $crate::GeoDecision {
                    with(|p| p.geo(&req, &regions))
                }
                fn fallback(req: $crate::Request, failure: $crate::Failure) -> $crate::FallbackDecision {
                    with(|p| p.fallback(&req, &failure))
                }
            }

    $crate::bindings::export!(Adapter with_types_in $crate::bindings);
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn haversine_matches_known_distances() {
        // London - Paris about 344 km, New York - London about 5570 km.
        let london_paris = haversine_km(51.5074, -0.1278, 48.8566, 2.3522);
        assert!((london_paris - 343.5).abs() < 1.0, "{london_paris}");
        let ny_london = haversine_km(40.7128, -74.0060, 51.5074, -0.1278);
        assert!((ny_london - 5570.0).abs() < 5.0, "{ny_london}");
        assert_eq!(haversine_km(10.0, 20.0, 10.0, 20.0), 0.0);
        // Antipodes: half the circumference.
        let half = haversine_km(0.0, 0.0, 0.0, 180.0);
        assert!((half - std::f64::consts::PI * EARTH_RADIUS_KM).abs() < 1e-6, "{half}");
    }

    #[test]
    fn native_host_stand_ins() {
        reset_host_for_test();
        assert_eq!(slot_get(3), 0);
        slot_set(3, 7);
        slot_set(64, 9);
        assert_eq!((slot_get(3), slot_get(64)), (7, 0));
        assert!(!slot_swap(3, 6, 8));
        assert!(slot_swap(3, 7, 8));
        assert_eq!(slot_get(3), 8);
        assert!(!slot_swap(99, 0, 1));

        set_now_ms_for_test(1234);
        assert_eq!(now_ms(), 1234);

        set_operator_action_for_test(OperatorAction::Pause);
        assert_eq!(take_operator_action(), Some(OperatorAction::Pause));
        assert_eq!(take_operator_action(), None);

        let status = CanaryStatus { share_permille: 50, step: 0, phase: CanaryPhase::Ramping, reason: "x".into() };
        report_canary(&status);
        assert_eq!(last_canary_report().map(|s| s.share_permille), Some(50));

        reset_host_for_test();
        assert_eq!((slot_get(3), now_ms()), (0, 0));
        assert!(last_canary_report().is_none());
    }
}
