//! The selection seam: a selector gets the request facts and an endpoint snapshot and
//! returns endpoints in the order they should be tried. The native default lives here;
//! WebAssembly policies plug in behind the same trait.

use crate::plugin::runtime::Fault;
use crate::upstream::EndpointSnapshot;

/// What routing may know about a request. Numbers and borrowed strings only: this struct
/// is built per request and must cost nothing.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    pub model: &'a str,
    pub stream: bool,
    pub user: Option<&'a str>,
    /// Hash of the API key (0 for anonymous requests).
    pub tenant: u64,
    /// Hash of the start of the prompt, for cache-affinity policies.
    pub prefix_hash: u64,
    /// Rough prompt size in tokens (bytes / 4).
    pub prompt_tokens: u32,
    /// Attempts already made for this request (0 on the first selection).
    pub attempt: u32,
    /// The client's region (index into the policies' region list), or `u32::MAX`.
    pub client_region: u32,
}

impl<'a> RequestFacts<'a> {
    /// A request of which nothing is known but its model: anonymous, no prompt, no region
    /// (for decisions the router makes on its own behalf).
    pub const fn anonymous(model: &'a str) -> RequestFacts<'a> {
        RequestFacts {
            model,
            stream: false,
            user: None,
            tenant: 0,
            prefix_hash: 0,
            prompt_tokens: 0,
            attempt: 0,
            client_region: u32::MAX,
        }
    }
}

pub trait Selector: Send + Sync {
    /// Fills `ranked` with endpoint indices, most preferred first. Indices not in
    /// `endpoints`, duplicates and unavailable endpoints are dropped by the caller.
    /// `Err` means the selector failed; the caller decides with the native default.
    fn select(
        &self,
        facts: &RequestFacts<'_>,
        endpoints: &[EndpointSnapshot],
        ranked: &mut Vec<u32>,
    ) -> Result<(), Fault>;

    fn name(&self) -> &str;
}

/// Least-in-flight with power-of-two choices, weighted by EWMA latency: two random
/// available endpoints, the cheaper wins; the loser and then the rest (cheapest first)
/// follow as failover order.
#[derive(Debug, Default)]
pub struct PowerOfTwoChoices;

/// Cost of sending one more request: expected queueing behind in-flight work times
/// observed latency, divided by weight. Unmeasured endpoints get a small default latency
/// so they are tried early rather than starved.
fn cost(e: &EndpointSnapshot) -> f64 {
    const UNMEASURED_US: f64 = 1_000.0;
    let latency = if e.ewma_latency_us > 0.0 { e.ewma_latency_us } else { UNMEASURED_US };
    (e.in_flight as f64 + 1.0) * latency / e.weight.max(1) as f64
}

impl Selector for PowerOfTwoChoices {
    fn select(
        &self,
        _facts: &RequestFacts<'_>,
        endpoints: &[EndpointSnapshot],
        ranked: &mut Vec<u32>,
    ) -> Result<(), Fault> {
        ranked.clear();
        ranked.extend(endpoints.iter().filter(|e| e.available).map(|e| e.index));
        let n = ranked.len();
        if n < 2 {
            return Ok(());
        }
        let by_index = |i: u32| &endpoints[i as usize];
        let a = fastrand::usize(..n);
        let mut b = fastrand::usize(..n - 1);
        if b >= a {
            b += 1;
        }
        let (win, lose) = if cost(by_index(ranked[a])) <= cost(by_index(ranked[b])) { (a, b) } else { (b, a) };
        let (w, l) = (ranked[win], ranked[lose]);
        ranked.retain(|&i| i != w && i != l);
        ranked.sort_by(|&x, &y| cost(by_index(x)).total_cmp(&cost(by_index(y))));
        ranked.insert(0, l);
        ranked.insert(0, w);
        Ok(())
    }

    fn name(&self) -> &str {
        "native:p2c-ewma"
    }
}

/// Keeps the first occurrence of each valid, available index: a selector (in particular a
/// plugin) cannot send traffic to an endpoint that is down or does not exist.
pub fn sanitize(ranked: &mut Vec<u32>, endpoints: &[EndpointSnapshot]) {
    let mut seen = 0u128;
    ranked.retain(|&i| {
        let ok = endpoints.get(i as usize).is_some_and(|e| e.available);
        let bit = 1u128.checked_shl(i).unwrap_or(0);
        let fresh = bit == 0 || seen & bit == 0;
        seen |= bit;
        ok && fresh
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::Circuit;

    fn ep(index: u32, in_flight: u32, ewma: f64, available: bool) -> EndpointSnapshot {
        EndpointSnapshot {
            index,
            available,
            healthy: available,
            circuit: Circuit::Closed,
            in_flight,
            ewma_latency_us: ewma,
            error_rate: 0.0,
            weight: 1,
        }
    }

    const FACTS: RequestFacts<'static> = RequestFacts::anonymous("m");

    #[test]
    fn never_picks_unavailable_and_ranks_every_available_once() {
        let eps = [ep(0, 0, 100.0, true), ep(1, 0, 100.0, false), ep(2, 5, 100.0, true), ep(3, 1, 50.0, true)];
        let mut out = Vec::new();
        for _ in 0..200 {
            PowerOfTwoChoices.select(&FACTS, &eps, &mut out).unwrap();
            let mut sorted = out.clone();
            sorted.sort();
            assert_eq!(sorted, vec![0, 2, 3]);
        }
    }

    #[test]
    fn busy_or_slow_endpoint_rarely_wins() {
        let eps = [ep(0, 0, 1_000.0, true), ep(1, 20, 1_000.0, true), ep(2, 0, 50_000.0, true)];
        let mut out = Vec::new();
        let mut first = [0; 3];
        for _ in 0..3000 {
            PowerOfTwoChoices.select(&FACTS, &eps, &mut out).unwrap();
            first[out[0] as usize] += 1;
        }
        // Endpoint 0 wins every pair it is in (2/3 of draws); the other two split the rest.
        assert!(first[0] > 1_800, "{first:?}");
        assert!(first[1] < 1_300 && first[2] < 1_300, "{first:?}");
    }

    #[test]
    fn sanitize_drops_out_of_range_duplicates_and_unavailable() {
        let eps = [ep(0, 0, 1.0, true), ep(1, 0, 1.0, false), ep(2, 0, 1.0, true)];
        let mut ranked = vec![7, 2, 2, 1, 0, 2];
        sanitize(&mut ranked, &eps);
        assert_eq!(ranked, vec![2, 0]);
    }
}
