//! Round-robin: each request starts one endpoint further along; the rest follow in ring
//! order as failover candidates. Unavailable endpoints are skipped.

use switchyard_policy::*;

pub struct RoundRobin {
    next: u32,
}

impl Policy for RoundRobin {
    const NAME: &'static str = "round-robin";
    const VERSION: &'static str = "1.0.0";

    fn new(_config: &str) -> Result<Self, String> {
        // Start at a random point so a fleet of routers does not move in lockstep.
        Ok(RoundRobin { next: random() as u32 })
    }

    fn balance(&mut self, _req: &Request, endpoints: &[EndpointState]) -> Vec<u32> {
        let n = endpoints.len() as u32;
        if n == 0 {
            return Vec::new();
        }
        let start = self.next % n;
        self.next = self.next.wrapping_add(1);
        let mut order = Vec::with_capacity(n as usize);
        order.extend((start..n).chain(0..start).filter(|&i| available(&endpoints[i as usize])));
        order
    }
}

#[cfg(target_arch = "wasm32")]
export_policy!(RoundRobin);
