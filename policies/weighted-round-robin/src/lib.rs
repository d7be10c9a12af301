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
        // Failover order: the others by how much they are owed (ties by index).
        order.extend((0..endpoints.len() as u32).filter(|&i| i as usize != best && available(&endpoints[i as usize])));
        let current = &self.current;
        order[1..].sort_unstable_by_key(|&i| (std::cmp::Reverse(current[i as usize]), i));
        order
    }
}

#[cfg(target_arch = "wasm32")]
export_policy!(WeightedRoundRobin);

#[cfg(test)]
mod tests {
    use super::*;

    fn topology(weights: &[u32]) -> Topology {
        Topology {
            model: "m".into(),
            endpoints: weights
                .iter()
                .enumerate()
                .map(|(i, &weight)| EndpointInfo {
                    name: format!("e{i}"),
                    region: 0,
                    version: 0,
                    weight,
                    labels: vec![],
                })
                .collect(),
            regions: vec![],
            local_region: 0,
            versions: vec![],
            fallback_models: vec![],
        }
    }

    fn state(healthy: bool) -> EndpointState {
        EndpointState { healthy, circuit: CircuitState::Closed, in_flight: 0, ewma_latency_us: 0, error_rate_ppm: 0 }
    }

    fn request() -> Request {
        Request { tenant: 0, client_region: u32::MAX, prefix_hash: 0, streaming: false, attempt: 0, prompt_tokens: 1 }
    }

    #[test]
    fn interleaves_by_weight_and_orders_the_rest_by_what_they_are_owed() {
        let mut p = WeightedRoundRobin::new("{}").unwrap();
        p.set_topology(topology(&[5, 1, 1]));
        let eps = [state(true), state(true), state(true)];
        let mut firsts = Vec::new();
        for _ in 0..7 {
            let order = p.balance(&request(), &eps);
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, [0, 1, 2], "every available endpoint once: {order:?}");
            // The failover candidates come most-owed first, as the state stands after the pick.
            let owed: Vec<i64> = order[1..].iter().map(|&i| p.current[i as usize]).collect();
            assert!(owed.windows(2).all(|w| w[0] >= w[1]), "{order:?} owed {owed:?}");
            firsts.push(order[0]);
        }
        assert_eq!(firsts, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn skips_unavailable_endpoints() {
        let mut p = WeightedRoundRobin::new("{}").unwrap();
        p.set_topology(topology(&[1, 3, 1]));
        let eps = [state(true), state(false), state(true)];
        for _ in 0..6 {
            let order = p.balance(&request(), &eps);
            assert_eq!(order.len(), 2);
            assert!(!order.contains(&1));
        }
        assert!(p.balance(&request(), &[state(false), state(false), state(false)]).is_empty());
    }
}
