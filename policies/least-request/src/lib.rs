//! Least-request with power-of-two choices on peak-EWMA latency: draw two available
//! endpoints, send to the one with the lower (in-flight + 1) × peak latency / weight.
//! Peak-EWMA rises at once to a slower reading and decays back gradually, so an endpoint
//! that just got slow is avoided immediately and trusted again slowly.

use switchyard_policy::*;

pub struct LeastRequest {
    rng: Rng,
    peak_us: Vec<f64>,
    weights: Vec<f64>,
    /// Share of the gap to the host's EWMA closed per decision when latency falls.
    decay: f64,
    /// Scratch for one decision: (cost, index) of each available endpoint.
    live: Vec<(f64, u32)>,
}

/// Latency assumed for an endpoint with no measurement yet (µs).
const UNMEASURED_US: f64 = 1_000.0;

impl LeastRequest {
    fn cost(&self, i: usize, e: &EndpointState) -> f64 {
        let peak = if self.peak_us[i] > 0.0 { self.peak_us[i] } else { UNMEASURED_US };
        (e.in_flight as f64 + 1.0) * peak / self.weights[i]
    }
}

impl Policy for LeastRequest {
    const NAME: &'static str = "least-request";
    const VERSION: &'static str = "1.0.0";

    fn new(config: &str) -> Result<Self, String> {
        // Optional config: {"decay": 0.05}
        let decay = match config.split("\"decay\"").nth(1) {
            None => 0.05,
            Some(rest) => rest
                .trim_start_matches([' ', ':'])
                .split(|c: char| c == ',' || c == '}' || c.is_whitespace())
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|d| *d > 0.0 && *d <= 1.0)
                .ok_or_else(|| "decay must be a number in (0, 1]".to_string())?,
        };
        Ok(LeastRequest { rng: Rng::new(random()), peak_us: Vec::new(), weights: Vec::new(), decay, live: Vec::new() })
    }

    fn set_topology(&mut self, t: Topology) {
        self.weights = t.endpoints.iter().map(|e| e.weight.max(1) as f64).collect();
        self.peak_us = vec![0.0; t.endpoints.len()];
    }

    fn balance(&mut self, _req: &Request, endpoints: &[EndpointState]) -> Vec<u32> {
        let n = endpoints.len();
        if self.peak_us.len() != n {
            self.peak_us = vec![0.0; n];
            self.weights = vec![1.0; n];
        }
        for (i, e) in endpoints.iter().enumerate() {
            let sample = e.ewma_latency_us as f64;
            let p = &mut self.peak_us[i];
            *p = if sample >= *p { sample } else { *p - (*p - sample) * self.decay };
        }
        let mut live = std::mem::take(&mut self.live);
        live.clear();
        live.extend(
            endpoints.iter().enumerate().filter(|(_, e)| available(e)).map(|(i, e)| (self.cost(i, e), i as u32)),
        );
        let order = if live.len() < 2 {
            live.iter().map(|&(_, i)| i).collect()
        } else {
            let a = self.rng.below(live.len() as u32) as usize;
            let mut b = self.rng.below(live.len() as u32 - 1) as usize;
            if b >= a {
                b += 1;
            }
            let (win, lose) = if live[a].0 <= live[b].0 { (live[a].1, live[b].1) } else { (live[b].1, live[a].1) };
            // Failover order after the two drawn: the rest, cheapest first (ties by index).
            live.sort_unstable_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
            let mut order = Vec::with_capacity(live.len());
            order.extend([win, lose]);
            order.extend(live.iter().map(|&(_, i)| i).filter(|&i| i != win && i != lose));
            order
        };
        self.live = live;
        order
    }
}

#[cfg(target_arch = "wasm32")]
export_policy!(LeastRequest);

#[cfg(test)]
mod tests {
    use super::*;

    fn state(healthy: bool, in_flight: u32, ewma_latency_us: u32) -> EndpointState {
        EndpointState { healthy, circuit: CircuitState::Closed, in_flight, ewma_latency_us, error_rate_ppm: 0 }
    }

    fn request() -> Request {
        Request { tenant: 0, client_region: u32::MAX, prefix_hash: 0, streaming: false, attempt: 0, prompt_tokens: 1 }
    }

    #[test]
    fn the_cheaper_of_two_draws_leads_and_the_rest_follow_cheapest_first() {
        reset_host_for_test();
        let mut p = LeastRequest::new("{}").unwrap();
        // Costs (in-flight + 1) × latency: 1000, 6000, 2000, 10000, unavailable, 3000.
        let eps = [
            state(true, 0, 1000),
            state(true, 5, 1000),
            state(true, 1, 1000),
            state(true, 9, 1000),
            state(false, 0, 1),
            state(true, 2, 1000),
        ];
        let cost = |i: u32| (eps[i as usize].in_flight + 1) * eps[i as usize].ewma_latency_us;
        let mut leaders = std::collections::HashSet::new();
        for _ in 0..200 {
            let order = p.balance(&request(), &eps);
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, [0, 1, 2, 3, 5], "every available endpoint once: {order:?}");
            assert!(cost(order[0]) <= cost(order[1]), "{order:?}");
            let rest: Vec<u32> = order[2..].iter().map(|&i| cost(i)).collect();
            assert!(rest.windows(2).all(|w| w[0] <= w[1]), "{order:?}");
            leaders.insert(order[0]);
        }
        // The most loaded endpoint loses every draw it is in.
        assert!(!leaders.contains(&3), "{leaders:?}");
        assert!(leaders.contains(&0) && leaders.len() >= 3, "draws are random: {leaders:?}");
    }

    #[test]
    fn fewer_than_two_available_are_returned_as_they_are() {
        reset_host_for_test();
        let mut p = LeastRequest::new("{}").unwrap();
        assert_eq!(p.balance(&request(), &[state(false, 0, 1), state(true, 3, 10)]), [1]);
        assert!(p.balance(&request(), &[state(false, 0, 1)]).is_empty());
    }
}
