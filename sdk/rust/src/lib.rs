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
    CircuitState, EndpointInfo, EndpointState, Failure, FailureKind, FallbackDecision, GeoDecision, PluginInfo,
    RegionInfo, RegionState, Request, Stage, Topology, VersionStats,
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

/// Monotonic milliseconds from the host (0 when compiled natively, for benchmarks).
pub fn now_ms() -> u64 {
    #[cfg(target_arch = "wasm32")]
    return bindings::switchyard::policy::host::now_ms();
    #[cfg(not(target_arch = "wasm32"))]
    0
}

/// A random number from the host (a fixed seed when compiled natively).
pub fn random() -> u64 {
    #[cfg(target_arch = "wasm32")]
    return bindings::switchyard::policy::host::random();
    #[cfg(not(target_arch = "wasm32"))]
    0x9e37_79b9_7f4a_7c15
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
        ((self.next_u64() >> 32) * n as u64 >> 32) as u32
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

/// Whether an endpoint may take traffic: healthy and its circuit not open.
pub fn available(e: &EndpointState) -> bool {
    e.healthy && e.circuit != CircuitState::Open
}

/// Words per endpoint in the packed `balance` argument.
pub const STATE_WORDS: usize = 4;

/// Unpacks `balance`'s endpoint states (layout documented in `policy.wit`).
pub fn unpack_states(words: &[u32]) -> Vec<EndpointState> {
    words
        .chunks_exact(STATE_WORDS)
        .map(|w| EndpointState {
            healthy: w[0] & 1 != 0,
            circuit: match (w[0] >> 1) & 3 {
                0 => CircuitState::Closed,
                1 => CircuitState::HalfOpen,
                _ => CircuitState::Open,
            },
            in_flight: w[1],
            ewma_latency_us: w[2],
            error_rate_ppm: w[3],
        })
        .collect()
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
                    let endpoints = $crate::unpack_states(&packed);
                    with(|p| p.balance(&req, &endpoints))
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
