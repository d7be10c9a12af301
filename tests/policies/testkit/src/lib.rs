//! Test policies, one behaviour per cargo feature. The pins are well-behaved and easy
//! to observe (all traffic to one endpoint); the rest misbehave on purpose so the tests
//! can show that none of them fails a request or replaces a working plugin.

use switchyard_policy::*;

pub struct TestKit {
    #[allow(dead_code)]
    hoard: Vec<Vec<u8>>,
}

fn version() -> &'static str {
    if cfg!(feature = "pin0") {
        "pin0"
    } else if cfg!(feature = "pin2") {
        "pin2"
    } else {
        "broken"
    }
}

impl Policy for TestKit {
    const NAME: &'static str = "testkit";
    const VERSION: &'static str = "0.0.1";

    fn new(_config: &str) -> Result<Self, String> {
        log(LogLevel::Info, version());
        Ok(TestKit { hoard: Vec::new() })
    }

    #[allow(unreachable_code, unused_variables)]
    fn balance(&mut self, req: &Request, endpoints: &[EndpointState]) -> Vec<u32> {
        let n = endpoints.len() as u32;
        #[cfg(feature = "pin0")]
        return vec![0];
        #[cfg(feature = "pin2")]
        return vec![2.min(n.saturating_sub(1))];
        #[cfg(feature = "infinite-loop")]
        loop {
            self.hoard.clear();
            std::hint::black_box(&mut self.hoard);
        }
        #[cfg(feature = "memory-bomb")]
        loop {
            self.hoard.push(vec![1u8; 1 << 20]);
        }
        #[cfg(feature = "trap")]
        core::arch::wasm32::unreachable();
        #[cfg(feature = "out-of-range")]
        return vec![n + 7];
        #[cfg(feature = "wasi")]
        {
            let home = std::env::var("HOME").unwrap_or_default();
            return vec![home.len() as u32 % n.max(1)];
        }
        #[cfg(feature = "time-bomb")]
        {
            // Passes the router's self-test (4 endpoints), then traps on real traffic.
            if n == 4 {
                return vec![0];
            }
            core::arch::wasm32::unreachable();
        }
        (0..n).collect()
    }
}

#[cfg(target_arch = "wasm32")]
export_policy!(TestKit);
