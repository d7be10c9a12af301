//! Fallback: the degradation chain of the seed design — primary model → smaller fallback
//! model → rule-based answer — decided per failure.
//!
//! The router asks this policy each time a model in a request's chain fails (`req.attempt`
//! is the number of fallback steps already taken; `fallback-models` in the topology lists
//! the chain the operator configured). Settings (JSON from `[plugins.settings.fallback]`):
//!
//! - `budget_ms` (default 15000): the request's whole time budget;
//! - `min_model_ms` (default 1000): below this much remaining budget, skip the remaining
//!   models and answer from the rules at once;
//! - `overload` (`"next-model"` (default) or `"rule-based"`): what an overloaded model
//!   leads to — under overload the cheapest answer protects the fleet;
//! - `rule_based` (default true): whether the chain ends in the rule-based answer or in
//!   the error of the last model.

use serde::Deserialize;
use switchyard_policy::*;

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Settings {
    budget_ms: u32,
    min_model_ms: u32,
    overload: OnOverload,
    rule_based: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum OnOverload {
    NextModel,
    RuleBased,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { budget_ms: 15_000, min_model_ms: 1_000, overload: OnOverload::NextModel, rule_based: true }
    }
}

pub struct Fallback {
    settings: Settings,
    chain: u32,
}

impl Fallback {
    fn last_resort(&self) -> FallbackDecision {
        if self.settings.rule_based { FallbackDecision::RuleBased } else { FallbackDecision::GiveUp }
    }
}

impl Policy for Fallback {
    const NAME: &'static str = "fallback";
    const VERSION: &'static str = "1.0.0";
    const STAGES: &'static [Stage] = &[Stage::Fallback];

    fn new(config: &str) -> Result<Self, String> {
        let settings: Settings = serde_json::from_str(config).map_err(|e| format!("fallback settings: {e}"))?;
        Ok(Fallback { settings, chain: 0 })
    }

    fn set_topology(&mut self, topology: Topology) {
        self.chain = topology.fallback_models.len() as u32;
    }

    fn fallback(&mut self, req: &Request, failure: &Failure) -> FallbackDecision {
        if failure.kind == FailureKind::Overload && self.settings.overload == OnOverload::RuleBased {
            return self.last_resort();
        }
        let remaining = self.settings.budget_ms.saturating_sub(failure.elapsed_ms);
        if req.attempt < self.chain && remaining >= self.settings.min_model_ms {
            FallbackDecision::FallbackModel(req.attempt)
        } else {
            self.last_resort()
        }
    }
}

#[cfg(target_arch = "wasm32")]
export_policy!(Fallback);

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(config: &str, chain: usize) -> Fallback {
        let mut p = Fallback::new(config).unwrap();
        p.set_topology(Topology {
            model: "m".into(),
            endpoints: vec![],
            regions: vec![],
            local_region: 0,
            versions: vec![],
            fallback_models: (0..chain).map(|i| format!("fb{i}")).collect(),
        });
        p
    }

    fn req(attempt: u32) -> Request {
        Request { tenant: 1, client_region: NO_REGION, prefix_hash: 0, streaming: false, attempt, prompt_tokens: 8 }
    }

    fn failure(kind: FailureKind, elapsed_ms: u32) -> Failure {
        Failure { kind, attempts: 1, elapsed_ms }
    }

    #[test]
    fn walks_the_chain_then_answers_from_rules() {
        let mut p = policy("{}", 2);
        let f = failure(FailureKind::Timeout, 5_000);
        assert!(matches!(p.fallback(&req(0), &f), FallbackDecision::FallbackModel(0)));
        assert!(matches!(p.fallback(&req(1), &f), FallbackDecision::FallbackModel(1)));
        assert!(matches!(p.fallback(&req(2), &f), FallbackDecision::RuleBased));
    }

    #[test]
    fn little_budget_left_or_overload_go_straight_to_rules() {
        let mut p = policy(r#"{"overload": "rule-based", "budget_ms": 6000}"#, 1);
        assert!(matches!(p.fallback(&req(0), &failure(FailureKind::Overload, 0)), FallbackDecision::RuleBased));
        assert!(matches!(p.fallback(&req(0), &failure(FailureKind::ServerError, 5_500)), FallbackDecision::RuleBased));
        assert!(matches!(
            p.fallback(&req(0), &failure(FailureKind::ServerError, 100)),
            FallbackDecision::FallbackModel(0)
        ));
    }

    #[test]
    fn without_rules_the_chain_ends_in_the_error() {
        let mut p = policy(r#"{"rule_based": false}"#, 0);
        assert!(matches!(p.fallback(&req(0), &failure(FailureKind::Connect, 0)), FallbackDecision::GiveUp));
        assert!(Fallback::new(r#"{"bogus": 1}"#).is_err());
    }
}
