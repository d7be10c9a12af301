//! Geo: serve each request from the nearest region (PoP) that can take it.
//!
//! Regions are ranked by great-circle distance from the client's region; the first that is
//! healthy and not saturated serves the request: here when it is this router's region,
//! otherwise the request is forwarded to that region's router. When none qualifies the
//! request is served here rather than failed. The rankings are computed once per topology,
//! so a decision is a short scan without allocation. Settings (JSON from
//! `[plugins.settings.geo]`):
//!
//! - `max_load_permille` (default 900): a region at or above this load is saturated and
//!   skipped;
//! - `unknown_client` (default "local"): where clients of unknown region start, "local"
//!   (this router's region) or a region name; an unknown name falls back to "local".

use serde::Deserialize;
use switchyard_policy::*;

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Settings {
    max_load_permille: u32,
    unknown_client: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { max_load_permille: 900, unknown_client: "local".into() }
    }
}

/// The `unknown_client` value naming this router's region.
const LOCAL: &str = "local";

pub struct Geo {
    settings: Settings,
    /// Number of regions in the topology.
    regions: usize,
    /// `regions` rows of `regions` indices: row `r` lists every region by distance from
    /// region `r`, nearest (`r` itself) first.
    preferences: Vec<u32>,
    /// This router's region (`topology.local_region`).
    local: u32,
    /// Row for clients of unknown region; `None` when it does not exist (serve here).
    unknown_row: Option<usize>,
}

impl Geo {
    /// Whether region `i` may serve: healthy and below the load limit.
    fn qualifies(&self, regions: &[RegionState], i: u32) -> bool {
        regions.get(i as usize).is_some_and(|r| r.healthy && r.load_permille < self.settings.max_load_permille)
    }
}

impl Policy for Geo {
    const NAME: &'static str = "geo";
    const VERSION: &'static str = "1.0.0";
    const STAGES: &'static [Stage] = &[Stage::Geo];

    fn new(config: &str) -> Result<Self, String> {
        let settings: Settings = serde_json::from_str(config).map_err(|e| format!("geo settings: {e}"))?;
        if settings.max_load_permille == 0 {
            return Err("geo settings: max_load_permille must be at least 1 (0 would skip every region)".into());
        }
        if settings.unknown_client.is_empty() {
            return Err(format!("geo settings: unknown_client must be \"{LOCAL}\" or a region name"));
        }
        Ok(Geo { settings, regions: 0, preferences: Vec::new(), local: 0, unknown_row: None })
    }

    fn set_topology(&mut self, topology: Topology) {
        let regions = &topology.regions;
        let n = regions.len();
        self.regions = n;
        self.local = topology.local_region;
        self.preferences.clear();
        self.preferences.reserve(n * n);
        let mut row: Vec<(f64, u32)> = Vec::with_capacity(n);
        for (own, from) in regions.iter().enumerate() {
            row.clear();
            row.extend(
                regions
                    .iter()
                    .enumerate()
                    .map(|(i, to)| (haversine_km(from.latitude, from.longitude, to.latitude, to.longitude), i as u32)),
            );
            // Nearest first; among regions at the same place the client's own, then by index.
            let own = own as u32;
            row.sort_by(|a, b| a.0.total_cmp(&b.0).then((a.1 != own).cmp(&(b.1 != own))).then(a.1.cmp(&b.1)));
            self.preferences.extend(row.iter().map(|&(_, i)| i));
        }
        let local = (self.local as usize) < n;
        self.unknown_row = if self.settings.unknown_client == LOCAL {
            local.then_some(self.local as usize)
        } else if let Some(i) = regions.iter().position(|r| r.name == self.settings.unknown_client) {
            Some(i)
        } else {
            log(
                LogLevel::Warn,
                &format!(
                    "geo: unknown_client region {:?} is not in the topology; using the local region",
                    self.settings.unknown_client
                ),
            );
            local.then_some(self.local as usize)
        };
    }

    fn geo(&mut self, req: &Request, regions: &[RegionState]) -> GeoDecision {
        let n = self.regions;
        let client = req.client_region as usize;
        let Some(row) = (if client < n { Some(client) } else { self.unknown_row }) else {
            return GeoDecision::Local;
        };
        for &i in &self.preferences[row * n..(row + 1) * n] {
            if self.qualifies(regions, i) {
                return if i == self.local { GeoDecision::Local } else { GeoDecision::Forward(i) };
            }
        }
        GeoDecision::Local
    }
}

#[cfg(target_arch = "wasm32")]
export_policy!(Geo);

#[cfg(test)]
mod tests {
    use super::*;

    const US_EAST: u32 = 0;
    const US_WEST: u32 = 1;
    const EU_WEST: u32 = 2;
    const EU_CENTRAL: u32 = 3;
    const AP_SOUTH: u32 = 4;

    fn topology(local_region: u32) -> Topology {
        let region = |name: &str, latitude, longitude| RegionInfo { name: name.into(), latitude, longitude };
        Topology {
            model: "m".into(),
            endpoints: vec![],
            regions: vec![
                region("us-east", 40.71, -74.01),  // New York
                region("us-west", 37.77, -122.42), // San Francisco
                region("eu-west", 51.51, -0.13),   // London
                region("eu-central", 50.11, 8.68), // Frankfurt
                region("ap-south", 19.08, 72.88),  // Mumbai
            ],
            local_region,
            versions: vec![],
            fallback_models: vec![],
        }
    }

    fn policy(config: &str) -> Geo {
        let mut p = Geo::new(config).unwrap();
        p.set_topology(topology(US_EAST));
        p
    }

    fn req(client_region: u32) -> Request {
        Request { tenant: 1, client_region, prefix_hash: 0, streaming: false, attempt: 0, prompt_tokens: 8 }
    }

    impl Geo {
        /// The decision as the region forwarded to, `None` for local.
        fn decide(&mut self, req: &Request, regions: &[RegionState]) -> Option<u32> {
            match self.geo(req, regions) {
                GeoDecision::Local => None,
                GeoDecision::Forward(i) => Some(i),
            }
        }
    }

    fn all_up() -> Vec<RegionState> {
        vec![RegionState { healthy: true, load_permille: 100 }; 5]
    }

    #[test]
    fn nearest_region_is_chosen() {
        let mut p = policy("{}");
        let regions = all_up();
        assert_eq!(p.decide(&req(EU_WEST), &regions), Some(EU_WEST));
        assert_eq!(p.decide(&req(AP_SOUTH), &regions), Some(AP_SOUTH));
        assert_eq!(p.decide(&req(US_EAST), &regions), None);
        // Rankings as the crow flies: from London, Frankfurt (~640 km) before New York.
        let row = &p.preferences[EU_WEST as usize * 5..][..5];
        assert_eq!(row, [EU_WEST, EU_CENTRAL, US_EAST, AP_SOUTH, US_WEST]);
    }

    #[test]
    fn region_down_goes_to_the_next_nearest() {
        let mut p = policy("{}");
        let mut regions = all_up();
        regions[EU_WEST as usize].healthy = false;
        assert_eq!(p.decide(&req(EU_WEST), &regions), Some(EU_CENTRAL));
        regions[EU_CENTRAL as usize].healthy = false;
        assert_eq!(p.decide(&req(EU_WEST), &regions), None);
        regions[US_EAST as usize].healthy = false;
        assert_eq!(p.decide(&req(EU_WEST), &regions), Some(AP_SOUTH));
    }

    #[test]
    fn saturated_region_is_skipped() {
        let mut p = policy("{}");
        let mut regions = all_up();
        regions[EU_WEST as usize].load_permille = 899;
        assert_eq!(p.decide(&req(EU_WEST), &regions), Some(EU_WEST));
        regions[EU_WEST as usize].load_permille = 900;
        assert_eq!(p.decide(&req(EU_WEST), &regions), Some(EU_CENTRAL));
        let mut p = policy(r#"{"max_load_permille": 950}"#);
        assert_eq!(p.decide(&req(EU_WEST), &regions), Some(EU_WEST));
    }

    #[test]
    fn recovery_returns_to_the_nearest() {
        let mut p = policy("{}");
        let mut regions = all_up();
        regions[US_WEST as usize].healthy = false;
        assert_eq!(p.decide(&req(US_WEST), &regions), None);
        regions[US_WEST as usize].healthy = true;
        assert_eq!(p.decide(&req(US_WEST), &regions), Some(US_WEST));
    }

    #[test]
    fn unknown_client_starts_from_the_local_region() {
        let mut p = policy("{}");
        let mut regions = all_up();
        assert_eq!(p.decide(&req(NO_REGION), &regions), None);
        assert_eq!(p.decide(&req(99), &regions), None, "out of range: unknown");
        regions[US_EAST as usize].healthy = false;
        assert_eq!(p.decide(&req(NO_REGION), &regions), Some(US_WEST));

        let mut p = policy(r#"{"unknown_client": "eu-central"}"#);
        assert_eq!(p.decide(&req(NO_REGION), &regions), Some(EU_CENTRAL));
        // A name the topology lacks: the local region's ranking.
        let mut p = policy(r#"{"unknown_client": "mars"}"#);
        assert_eq!(p.decide(&req(NO_REGION), &all_up()), None);
    }

    #[test]
    fn another_local_region_is_served_here() {
        let mut p = Geo::new("{}").unwrap();
        p.set_topology(topology(EU_CENTRAL));
        let regions = all_up();
        assert_eq!(p.decide(&req(EU_CENTRAL), &regions), None);
        assert_eq!(p.decide(&req(NO_REGION), &regions), None);
        assert_eq!(p.decide(&req(US_EAST), &regions), Some(US_EAST));
    }

    #[test]
    fn all_down_serves_locally() {
        let mut p = policy("{}");
        let down = vec![RegionState { healthy: false, load_permille: 0 }; 5];
        assert_eq!(p.decide(&req(EU_WEST), &down), None);
        assert_eq!(p.decide(&req(NO_REGION), &down), None);
        // Regions without a live state are skipped; no regions at all: serve here.
        assert_eq!(p.decide(&req(EU_WEST), &all_up()[..2]), None);
        assert_eq!(p.decide(&req(US_WEST), &all_up()[..2]), Some(US_WEST));
        let mut empty = Geo::new("{}").unwrap();
        empty.set_topology(Topology { regions: vec![], ..topology(0) });
        assert_eq!(empty.decide(&req(0), &[]), None);
    }

    #[test]
    fn settings_are_validated() {
        for (config, message) in [
            (r#"{"max_load_permille": 0}"#, "max_load_permille must be at least 1"),
            (r#"{"unknown_client": ""}"#, "unknown_client must be"),
            (r#"{"bogus": 1}"#, "unknown field"),
        ] {
            let err = Geo::new(config).err().unwrap_or_else(|| panic!("{config} accepted"));
            assert!(err.starts_with("geo settings: ") && err.contains(message), "{config}: {err}");
        }
    }
}
