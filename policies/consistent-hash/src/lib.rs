//! Consistent hashing on the prompt-prefix hash, for KV-cache affinity: the same prefix
//! goes to the same endpoint while it is available. Each endpoint owns many points on a
//! ring (in proportion to its weight); a key belongs to the first point clockwise. When an
//! endpoint is down its points are skipped, so only its keys move, and they come back
//! when it recovers.

use switchyard_policy::*;

pub struct ConsistentHash {
    /// (point, endpoint index), sorted by point.
    ring: Vec<(u64, u32)>,
    points_per_weight: u32,
    /// How many distinct endpoints a decision lists (the first, then failover candidates).
    candidates: usize,
    /// Endpoint count the ring was built for.
    built_for: usize,
}

impl ConsistentHash {
    fn build(&mut self, names: &[(String, u32)]) {
        self.ring.clear();
        for (i, (name, weight)) in names.iter().enumerate() {
            for v in 0..self.points_per_weight * (*weight).max(1) {
                let point = hash64(format!("{name}#{v}").as_bytes());
                self.ring.push((point, i as u32));
            }
        }
        self.ring.sort_unstable();
        self.built_for = names.len();
    }
}

impl Policy for ConsistentHash {
    const NAME: &'static str = "consistent-hash";
    const VERSION: &'static str = "1.0.0";

    fn new(_config: &str) -> Result<Self, String> {
        Ok(ConsistentHash { ring: Vec::new(), points_per_weight: 160, candidates: 3, built_for: 0 })
    }

    fn set_topology(&mut self, t: Topology) {
        let names: Vec<(String, u32)> = t.endpoints.iter().map(|e| (e.name.clone(), e.weight)).collect();
        self.build(&names);
    }

    fn balance(&mut self, req: &Request, endpoints: &[EndpointState]) -> Vec<u32> {
        if self.ring.is_empty() || self.built_for != endpoints.len() {
            let names: Vec<(String, u32)> = (0..endpoints.len()).map(|i| (format!("endpoint-{i}"), 1)).collect();
            self.build(&names);
        }
        let want = self.candidates.min(endpoints.iter().filter(|e| available(e)).count());
        let mut out = Vec::with_capacity(want);
        if want == 0 {
            return out;
        }
        let key = mix64(req.prefix_hash);
        let start = self.ring.partition_point(|&(p, _)| p < key);
        let len = self.ring.len();
        for k in 0..len {
            let (_, i) = self.ring[(start + k) % len];
            if available(&endpoints[i as usize]) && !out.contains(&i) {
                out.push(i);
                if out.len() == want {
                    break;
                }
            }
        }
        out
    }
}

#[cfg(target_arch = "wasm32")]
export_policy!(ConsistentHash);
