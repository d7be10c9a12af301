//! Smooth weighted round-robin: over any window each endpoint is chosen in proportion to
//! its weight, interleaved rather than in bursts (weights 5,1,1 give a a b a c a a, not
//! a a a a a b c). Only available endpoints take part.

use switchyard_policy::*;

pub struct WeightedRoundRobin {
    weights: Vec<i64>,
    current: Vec<i64>,
}

impl Policy for WeightedRoundRobin {
    const NAME: &'static str = "weighted-round-robin";
    const VERSION: &'static str = "1.0.0";

    fn new(_config: &str) -> Result<Self, String> {
        Ok(WeightedRoundRobin { weights: Vec::new(), current: Vec::new() })
    }

    fn set_topology(&mut self, t: Topology) {
        self.weights = t.endpoints.iter().map(|e| e.weight.max(1) as i64).collect();
        self.current = vec![0; self.weights.len()];
    }

    fn balance(&mut self, _req: &Request, endpoints: &[EndpointState]) -> Vec<u32> {
        if self.weights.len() != endpoints.len() {
            // Topology not known yet: equal weights.
            self.weights = vec![1; endpoints.len()];
            self.current = vec![0; endpoints.len()];
        }
        let mut total = 0;
        let mut best: Option<usize> = None;
        for (i, e) in endpoints.iter().enumerate() {
            if !available(e) {
                continue;
            }
            self.current[i] += self.weights[i];
            total += self.weights[i];
            if best.is_none_or(|b| self.current[i] > self.current[b]) {
                best = Some(i);
            }
        }
        let Some(best) = best else { return Vec::new() };
        self.current[best] -= total;
        let mut order: Vec<u32> = Vec::with_capacity(endpoints.len());
        order.push(best as u32);
        // Failover order: the others by how much they are owed.
        let mut rest: Vec<u32> =
            (0..endpoints.len() as u32).filter(|&i| i as usize != best && available(&endpoints[i as usize])).collect();
        rest.sort_by_key(|&i| std::cmp::Reverse(self.current[i as usize]));
        order.extend(rest);
        order
    }
}

#[cfg(target_arch = "wasm32")]
export_policy!(WeightedRoundRobin);
