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
        Ok(LeastRequest { rng: Rng::new(random()), peak_us: Vec::new(), weights: Vec::new(), decay })
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
        let mut live: Vec<u32> = (0..n as u32).filter(|&i| available(&endpoints[i as usize])).collect();
        if live.len() < 2 {
            return live;
        }
        let a = self.rng.below(live.len() as u32) as usize;
        let mut b = self.rng.below(live.len() as u32 - 1) as usize;
        if b >= a {
            b += 1;
        }
        let (ia, ib) = (live[a] as usize, live[b] as usize);
        let (win, lose) =
            if self.cost(ia, &endpoints[ia]) <= self.cost(ib, &endpoints[ib]) { (ia, ib) } else { (ib, ia) };
        live.retain(|&i| i as usize != win && i as usize != lose);
        live.sort_by(|&x, &y| {
            self.cost(x as usize, &endpoints[x as usize]).total_cmp(&self.cost(y as usize, &endpoints[y as usize]))
        });
        live.insert(0, lose as u32);
        live.insert(0, win as u32);
        live
    }
}

#[cfg(target_arch = "wasm32")]
export_policy!(LeastRequest);
