//! Canary: a stepped rollout of a new version, judged by its own numbers against stable's.
//!
//! The canary version starts with a small share of requests; each step is judged on the
//! requests served since it started. A healthy step raises the share to the next one
//! (100% promotes the canary); an unhealthy one rolls back to 0%. Tenants are bucketed by
//! the hash of their key, so a tenant stays on one version, and one that is on the canary
//! stays there while the share rises. Settings (JSON from `[plugins.settings.canary]`):
//!
//! - `stable` (default "stable") and `canary` (default "canary"): the version names, as in
//!   `topology.versions`. When either is missing every request goes to stable (or to the
//!   first version when stable is missing too) and nothing is evaluated;
//! - `steps_percent` (default `[5, 25, 50, 100]`): the canary's share at each step, strictly
//!   increasing, from 1 to 100, the last one 100;
//! - `min_requests` (default 100): canary requests a step needs before it is judged;
//! - `min_step_ms` (default 0): how long a step lasts at least before its share is raised
//!   (a rollback does not wait for it);
//! - `max_error_rate` (default 0.01) and `error_rate_ratio` (default 2.0): the canary is
//!   unhealthy when its error rate over the step exceeds `stable rate × error_rate_ratio +
//!   max_error_rate` (stable's rate over the same window, or its cumulative rate when stable
//!   served nothing in the window). Errors alone may roll back before `min_requests`, once
//!   there are already more than the limit allows for `min_requests` requests;
//! - `p99_ratio` (default 1.5) and `p99_slack_ms` (default 50): unhealthy when the canary's
//!   p99 latency exceeds `stable p99 × p99_ratio + p99_slack_ms` (skipped while either is
//!   unknown);
//! - `seed` (default 0): salt for the tenant buckets (anonymous requests draw at random).
//!
//! The router runs one instance per worker thread, so the rollout lives in the host's
//! shared slots, never in the instance:
//!
//! | slot | content |
//! |------|---------|
//! | 0 | state word; 0 until the first request starts the rollout |
//! | 1 | the state word the baselines below belong to |
//! | 2, 3 | stable's requests and errors when the step started |
//! | 4, 5 | the canary's requests and errors when the step started |
//! | 6 | when the step started, host milliseconds |
//!
//! The state word packs the share in ‰ (bits 0-15), the step (16-23), the phase (24-25:
//! ramping, paused, promoted, rolled back), a started flag (31) and a 16-bit generation
//! (32-47).
//!
//! Every transition (start, step, promotion, rollback, operator action) is one `slot-swap`
//! of the state word with the generation raised, so of several instances judging the same
//! step only one moves it. The winner then writes the new baselines and, last, slot 1; an
//! instance that finds slot 1 different from the state word does not judge. Every
//! transition is published with `report-canary`.
//!
//! Operator actions from the admin API are applied at the start of the next request (they
//! wait while the versions are not both in the topology): `promote` serves everything from
//! the canary; `pause` (while ramping) holds the share and stops judging; `resume` continues
//! a paused rollout at its step, judged from then on, and restarts a promoted or rolled-back
//! one at the first step; `rollback` takes the canary to 0%. Other combinations are ignored.

use serde::Deserialize;
use switchyard_policy::*;

/// Slot of the packed rollout state.
const STATE: u32 = 0;
/// Slot naming (by state word) the transition the baselines were written for.
const TAG: u32 = 1;
const BASE_STABLE_REQUESTS: u32 = 2;
const BASE_STABLE_ERRORS: u32 = 3;
const BASE_CANARY_REQUESTS: u32 = 4;
const BASE_CANARY_ERRORS: u32 = 5;
const BASE_START_MS: u32 = 6;

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Settings {
    stable: String,
    canary: String,
    steps_percent: Vec<u32>,
    min_requests: u64,
    min_step_ms: u64,
    max_error_rate: f64,
    error_rate_ratio: f64,
    p99_ratio: f64,
    p99_slack_ms: f64,
    seed: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            stable: "stable".into(),
            canary: "canary".into(),
            steps_percent: vec![5, 25, 50, 100],
            min_requests: 100,
            min_step_ms: 0,
            max_error_rate: 0.01,
            error_rate_ratio: 2.0,
            p99_ratio: 1.5,
            p99_slack_ms: 50.0,
            seed: 0,
        }
    }
}

impl Settings {
    fn validate(&self) -> Result<(), String> {
        let steps = &self.steps_percent;
        if steps.is_empty() {
            return Err("steps_percent must not be empty".into());
        }
        if let Some(bad) = steps.iter().find(|&&p| !(1..=100).contains(&p)) {
            return Err(format!("steps_percent: {bad} is not a share from 1 to 100"));
        }
        if let Some(w) = steps.windows(2).find(|w| w[0] >= w[1]) {
            return Err(format!("steps_percent must be strictly increasing ({} then {})", w[0], w[1]));
        }
        if steps.last() != Some(&100) {
            return Err("steps_percent must end with 100".into());
        }
        if self.min_requests == 0 {
            return Err("min_requests must be at least 1".into());
        }
        for (name, v) in [
            ("max_error_rate", self.max_error_rate),
            ("error_rate_ratio", self.error_rate_ratio),
            ("p99_ratio", self.p99_ratio),
            ("p99_slack_ms", self.p99_slack_ms),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(format!("{name} must be a non-negative number, not {v}"));
            }
        }
        if self.stable == self.canary {
            return Err(format!("stable and canary name the same version {:?}", self.stable));
        }
        Ok(())
    }
}

/// The rollout state, as packed into slot 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    phase: CanaryPhase,
    step: u32,
    /// Canary share, parts per thousand.
    share: u32,
    /// Raised on every transition.
    generation: u16,
}

/// Set in every packed state, so a started rollout never reads as 0.
const STARTED: u64 = 1 << 31;

impl State {
    fn pack(self) -> u64 {
        let phase = match self.phase {
            CanaryPhase::Ramping => 0,
            CanaryPhase::Paused => 1,
            CanaryPhase::Promoted => 2,
            CanaryPhase::RolledBack => 3,
        };
        (self.share.min(0xffff) as u64)
            | (self.step.min(0xff) as u64) << 16
            | phase << 24
            | STARTED
            | (self.generation as u64) << 32
    }

    /// `None` for 0: the rollout has not started.
    fn unpack(word: u64) -> Option<State> {
        if word == 0 {
            return None;
        }
        let phase = match (word >> 24) & 3 {
            0 => CanaryPhase::Ramping,
            1 => CanaryPhase::Paused,
            2 => CanaryPhase::Promoted,
            _ => CanaryPhase::RolledBack,
        };
        Some(State {
            phase,
            step: ((word >> 16) & 0xff) as u32,
            share: (word & 0xffff) as u32,
            generation: (word >> 32) as u16,
        })
    }
}

/// Counters at the start of the current step (slots 2-6).
#[derive(Debug, Clone, Copy)]
struct Baseline {
    stable_requests: u64,
    stable_errors: u64,
    canary_requests: u64,
    canary_errors: u64,
    start_ms: u64,
}

impl Baseline {
    fn read() -> Baseline {
        Baseline {
            stable_requests: slot_get(BASE_STABLE_REQUESTS),
            stable_errors: slot_get(BASE_STABLE_ERRORS),
            canary_requests: slot_get(BASE_CANARY_REQUESTS),
            canary_errors: slot_get(BASE_CANARY_ERRORS),
            start_ms: slot_get(BASE_START_MS),
        }
    }
}

/// A transition an instance wants to make from the state it read.
#[derive(Debug)]
struct Move {
    from: State,
    phase: CanaryPhase,
    step: u32,
    share: u32,
    reason: String,
}

/// Growth of a cumulative counter since `base`; a counter that went backwards was reset,
/// so all of it is new.
fn since(now: u64, base: u64) -> u64 {
    if now >= base { now - base } else { now }
}

fn rate(errors: u64, requests: u64) -> f64 {
    if requests == 0 { 0.0 } else { errors as f64 / requests as f64 }
}

fn pct(rate: f64) -> String {
    format!("{:.1}%", rate * 100.0)
}

/// "1 request", "2 requests".
fn count(n: u64, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

fn ms(us: f64) -> String {
    format!("{:.0} ms", us / 1000.0)
}

pub struct Canary {
    settings: Settings,
    /// Indices of (stable, canary) in `topology.versions`, when both exist.
    pair: Option<(usize, usize)>,
    /// Where requests go when `pair` is incomplete: stable if it exists, else 0.
    fallback: u32,
    /// Whether this instance already warned about the incomplete pair.
    warned: bool,
}

impl Canary {
    fn permille(&self, step: u32) -> u32 {
        let steps = &self.settings.steps_percent;
        steps[(step as usize).min(steps.len() - 1)] * 10
    }

    fn last_step(&self) -> u32 {
        self.settings.steps_percent.len() as u32 - 1
    }

    /// The current state, starting the rollout if nobody has yet.
    fn state_or_start(&self, versions: &[VersionStats]) -> State {
        loop {
            let word = slot_get(STATE);
            if let Some(state) = State::unpack(word) {
                return state;
            }
            let first = State { phase: CanaryPhase::Ramping, step: 0, share: self.permille(0), generation: 1 };
            if slot_swap(STATE, 0, first.pack()) {
                self.write_baselines(first, versions);
                self.report(first, format!("started at {}%", self.settings.steps_percent[0]));
                return first;
            }
        }
    }

    /// Makes `mv` if the state is still the one it was judged from; the new state if so.
    fn commit(&self, mv: Move, versions: &[VersionStats]) -> Option<State> {
        let to =
            State { phase: mv.phase, step: mv.step, share: mv.share, generation: mv.from.generation.wrapping_add(1) };
        if !slot_swap(STATE, mv.from.pack(), to.pack()) {
            return None;
        }
        self.write_baselines(to, versions);
        self.report(to, mv.reason);
        Some(to)
    }

    /// The winner of a transition records where the new step starts, then tags it.
    fn write_baselines(&self, state: State, versions: &[VersionStats]) {
        let Some((si, ci)) = self.pair else { return };
        let (stable, canary) = (&versions[si], &versions[ci]);
        slot_set(BASE_STABLE_REQUESTS, stable.requests);
        slot_set(BASE_STABLE_ERRORS, stable.errors);
        slot_set(BASE_CANARY_REQUESTS, canary.requests);
        slot_set(BASE_CANARY_ERRORS, canary.errors);
        slot_set(BASE_START_MS, now_ms());
        slot_set(TAG, state.pack());
    }

    fn report(&self, state: State, reason: String) {
        log(LogLevel::Info, &format!("rollout of version {:?}: {reason}", self.settings.canary));
        report_canary(&CanaryStatus { share_permille: state.share, step: state.step, phase: state.phase, reason });
    }

    /// Applies an operator action, retrying while other instances move the state.
    fn apply(&self, action: OperatorAction, versions: &[VersionStats]) -> State {
        let name = match action {
            OperatorAction::Promote => "promote",
            OperatorAction::Pause => "pause",
            OperatorAction::Resume => "resume",
            OperatorAction::Rollback => "rollback",
        };
        loop {
            let from = self.state_or_start(versions);
            let target = match (action, from.phase) {
                (OperatorAction::Promote, CanaryPhase::Promoted) => None,
                (OperatorAction::Promote, _) => Some((CanaryPhase::Promoted, self.last_step(), 1000)),
                (OperatorAction::Pause, CanaryPhase::Ramping) => Some((CanaryPhase::Paused, from.step, from.share)),
                (OperatorAction::Pause, _) => None,
                (OperatorAction::Resume, CanaryPhase::Paused) => {
                    Some((CanaryPhase::Ramping, from.step, self.permille(from.step)))
                }
                (OperatorAction::Resume, CanaryPhase::Ramping) => None,
                (OperatorAction::Resume, _) => Some((CanaryPhase::Ramping, 0, self.permille(0))),
                (OperatorAction::Rollback, CanaryPhase::RolledBack) => None,
                (OperatorAction::Rollback, _) => Some((CanaryPhase::RolledBack, from.step, 0)),
            };
            let Some((phase, step, share)) = target else {
                log(LogLevel::Info, &format!("canary: operator {name} ignored while {:?}", from.phase));
                return from;
            };
            let reason = if action == OperatorAction::Resume && from.phase != CanaryPhase::Paused {
                format!("operator: resume (restarted at {}%)", self.settings.steps_percent[0])
            } else {
                format!("operator: {name}")
            };
            if let Some(to) = self.commit(Move { from, phase, step, share, reason }, versions) {
                return to;
            }
        }
    }

    /// Judges the current step of a ramping rollout; the transition it calls for, if any.
    fn evaluate(&self, state: State, versions: &[VersionStats]) -> Option<Move> {
        let (si, ci) = self.pair?;
        if state.phase != CanaryPhase::Ramping || slot_get(TAG) != state.pack() {
            // Not ramping, or the baselines belong to another state (the winner of the last
            // transition is still writing them): nothing to judge.
            return None;
        }
        let base = Baseline::read();
        let s = &self.settings;
        let (stable, canary) = (&versions[si], &versions[ci]);
        let canary_requests = since(canary.requests, base.canary_requests);
        let canary_errors = since(canary.errors, base.canary_errors);
        let stable_requests = since(stable.requests, base.stable_requests);
        let stable_rate = if stable_requests > 0 {
            rate(since(stable.errors, base.stable_errors), stable_requests)
        } else {
            rate(stable.errors, stable.requests)
        };
        let limit = stable_rate * s.error_rate_ratio + s.max_error_rate;
        let rollback =
            |reason: String| Move { from: state, phase: CanaryPhase::RolledBack, step: state.step, share: 0, reason };

        if canary_requests < s.min_requests {
            // Too early to judge, unless the errors so far already rule out a healthy verdict.
            if canary_errors as f64 > limit * s.min_requests as f64 {
                return Some(rollback(format!(
                    "rolled back: {} in {} already exceed limit {} for {} requests (stable {})",
                    count(canary_errors, "canary error"),
                    count(canary_requests, "request"),
                    pct(limit),
                    s.min_requests,
                    pct(stable_rate)
                )));
            }
            return None;
        }
        let canary_rate = rate(canary_errors, canary_requests);
        if canary_rate > limit {
            return Some(rollback(format!(
                "rolled back: canary error rate {} > limit {} (stable {}) over {canary_requests} requests",
                pct(canary_rate),
                pct(limit),
                pct(stable_rate)
            )));
        }
        let (canary_p99, stable_p99) = (canary.p99_latency_us as f64, stable.p99_latency_us as f64);
        let p99_known = canary_p99 > 0.0 && stable_p99 > 0.0;
        let p99_limit = stable_p99 * s.p99_ratio + s.p99_slack_ms * 1000.0;
        if p99_known && canary_p99 > p99_limit {
            return Some(rollback(format!(
                "rolled back: canary p99 {} > limit {} (stable {}) over {canary_requests} requests",
                ms(canary_p99),
                ms(p99_limit),
                ms(stable_p99)
            )));
        }
        if since(now_ms(), base.start_ms) < s.min_step_ms {
            return None;
        }
        let step = (state.step + 1).min(self.last_step());
        let share = self.permille(step);
        let phase = if share >= 1000 { CanaryPhase::Promoted } else { CanaryPhase::Ramping };
        let latency = if p99_known {
            format!("p99 {} vs {} (limit {})", ms(canary_p99), ms(stable_p99), ms(p99_limit))
        } else {
            "p99 unknown".to_string()
        };
        Some(Move {
            from: state,
            phase,
            step,
            share,
            reason: format!(
                "{}step {step} → {}%: canary errors {} vs stable {} (limit {}), {latency} over {canary_requests} \
                 requests",
                if phase == CanaryPhase::Promoted { "promoted, " } else { "" },
                share / 10,
                pct(canary_rate),
                pct(stable_rate),
                pct(limit)
            ),
        })
    }

    /// Whether this request goes to the canary under `state`.
    fn on_canary(&self, req: &Request, state: State) -> bool {
        match state.phase {
            CanaryPhase::RolledBack => false,
            CanaryPhase::Promoted => true,
            CanaryPhase::Ramping | CanaryPhase::Paused => {
                let draw = if req.tenant == 0 { random() } else { mix64(req.tenant ^ self.settings.seed) };
                ((draw % 1000) as u32) < state.share
            }
        }
    }
}

impl Policy for Canary {
    const NAME: &'static str = "canary";
    const VERSION: &'static str = "1.0.0";
    const STAGES: &'static [Stage] = &[Stage::Canary];

    fn new(config: &str) -> Result<Self, String> {
        let settings: Settings = serde_json::from_str(config).map_err(|e| format!("canary settings: {e}"))?;
        settings.validate().map_err(|e| format!("canary settings: {e}"))?;
        Ok(Canary { settings, pair: None, fallback: 0, warned: false })
    }

    fn set_topology(&mut self, topology: Topology) {
        let find = |name: &str| topology.versions.iter().position(|v| v == name);
        let (stable, canary) = (find(&self.settings.stable), find(&self.settings.canary));
        self.fallback = stable.unwrap_or(0) as u32;
        self.pair = stable.zip(canary);
        if self.pair.is_some() {
            self.warned = false;
        } else if !self.warned {
            self.warned = true;
            log(
                LogLevel::Warn,
                &format!(
                    "canary: versions {:?} and {:?} are not both in the topology ({:?}); serving version {} only",
                    self.settings.stable, self.settings.canary, topology.versions, self.fallback
                ),
            );
        }
    }

    fn canary(&mut self, req: &Request, versions: &[VersionStats]) -> u32 {
        let Some((si, ci)) = self.pair.filter(|&(s, c)| s.max(c) < versions.len()) else {
            return self.fallback;
        };
        let action = take_operator_action();
        let mut state = self.state_or_start(versions);
        if let Some(action) = action {
            state = self.apply(action, versions);
        }
        if let Some(mv) = self.evaluate(state, versions) {
            // Losing the swap means another instance moved first: use what it wrote.
            state = self.commit(mv, versions).unwrap_or_else(|| self.state_or_start(versions));
        }
        if self.on_canary(req, state) { ci as u32 } else { si as u32 }
    }
}

#[cfg(target_arch = "wasm32")]
export_policy!(Canary);

#[cfg(test)]
mod tests {
    use super::*;

    fn topology(versions: &[&str]) -> Topology {
        Topology {
            model: "m".into(),
            endpoints: vec![],
            regions: vec![],
            local_region: 0,
            versions: versions.iter().map(|v| v.to_string()).collect(),
            fallback_models: vec![],
        }
    }

    /// A fresh host (slots, clock, actions) and a policy over versions [stable, canary].
    fn policy(config: &str) -> Canary {
        reset_host_for_test();
        instance(config)
    }

    /// Another instance on the same (thread-local) host.
    fn instance(config: &str) -> Canary {
        let mut p = Canary::new(config).unwrap();
        p.set_topology(topology(&["stable", "canary"]));
        p
    }

    fn req(tenant: u64) -> Request {
        Request { tenant, client_region: NO_REGION, prefix_hash: 0, streaming: false, attempt: 0, prompt_tokens: 8 }
    }

    fn tenant(i: u64) -> u64 {
        mix64(i + 1) | 1
    }

    fn stats(requests: u64, errors: u64, p99_ms: u32) -> VersionStats {
        VersionStats { requests, errors, p99_latency_us: p99_ms * 1000 }
    }

    fn state() -> State {
        State::unpack(slot_get(STATE)).expect("rollout started")
    }

    /// Host-side counters fed by the policy's own decisions.
    struct Sim {
        versions: Vec<VersionStats>,
        next_tenant: u64,
        /// One error every `n` requests per version (0: none).
        error_every: [u64; 2],
    }

    impl Sim {
        fn new(stable_error_every: u64, canary_error_every: u64) -> Sim {
            Sim {
                versions: vec![stats(0, 0, 200), stats(0, 0, 210)],
                next_tenant: 0,
                error_every: [stable_error_every, canary_error_every],
            }
        }

        /// Serves `n` requests from distinct tenants; how many went to the canary.
        fn serve(&mut self, p: &mut Canary, n: u64) -> u64 {
            let mut on_canary = 0;
            for _ in 0..n {
                let v = p.canary(&req(tenant(self.next_tenant)), &self.versions) as usize;
                self.next_tenant += 1;
                on_canary += v as u64;
                let s = &mut self.versions[v];
                s.requests += 1;
                if self.error_every[v] > 0 && s.requests.is_multiple_of(self.error_every[v]) {
                    s.errors += 1;
                }
            }
            on_canary
        }

        /// Serves one request at a time until `done` holds for the rollout state.
        fn serve_until(&mut self, p: &mut Canary, done: impl Fn(State) -> bool) {
            for _ in 0..1_000_000 {
                self.serve(p, 1);
                if done(state()) {
                    return;
                }
            }
            panic!("the rollout never got there: {:?}", state());
        }
    }

    #[test]
    fn state_word_round_trips() {
        for phase in [CanaryPhase::Ramping, CanaryPhase::Paused, CanaryPhase::Promoted, CanaryPhase::RolledBack] {
            let s = State { phase, step: 3, share: 1000, generation: 65535 };
            assert_ne!(s.pack(), 0);
            assert_eq!(State::unpack(s.pack()), Some(s));
        }
        assert_eq!(State::unpack(0), None);
    }

    #[test]
    fn initial_share_is_about_five_percent() {
        let mut p = policy("{}");
        let versions = [stats(0, 0, 0), stats(0, 0, 0)];
        let on_canary = (0..20_000).filter(|&i| p.canary(&req(tenant(i)), &versions) == 1).count();
        assert!((800..1200).contains(&on_canary), "{on_canary} of 20000 on the canary");
        let report = last_canary_report().unwrap();
        assert_eq!((report.share_permille, report.step, report.phase), (50, 0, CanaryPhase::Ramping));
        assert_eq!(report.reason, "started at 5%");
    }

    #[test]
    fn tenants_are_sticky_and_stay_on_the_canary_as_it_grows() {
        let mut p = policy(r#"{"min_requests": 50}"#);
        let versions = [stats(0, 0, 0), stats(0, 0, 0)];
        let first: Vec<u32> = (0..2000).map(|i| p.canary(&req(tenant(i)), &versions)).collect();
        let again: Vec<u32> = (0..2000).map(|i| p.canary(&req(tenant(i)), &versions)).collect();
        assert_eq!(first, again);

        let mut sim = Sim::new(0, 0);
        sim.serve_until(&mut p, |s| s.step == 2);
        let later: Vec<u32> = (0..2000).map(|i| p.canary(&req(tenant(i)), &sim.versions)).collect();
        assert!(first.iter().zip(&later).all(|(&a, &b)| a <= b), "a canary tenant went back to stable");
        assert!(later.iter().filter(|&&v| v == 1).count() > first.iter().filter(|&&v| v == 1).count());
    }

    #[test]
    fn promotes_through_all_steps_when_healthy() {
        let mut p = policy("{}");
        let mut sim = Sim::new(500, 1000);
        let mut shares = vec![];
        for _ in 0..200 {
            sim.serve(&mut p, 100);
            let s = state();
            if shares.last() != Some(&s.share) {
                shares.push(s.share);
            }
            if s.phase == CanaryPhase::Promoted {
                break;
            }
        }
        assert_eq!(shares, [50, 250, 500, 1000]);
        let report = last_canary_report().unwrap();
        assert_eq!((report.share_permille, report.step, report.phase), (1000, 3, CanaryPhase::Promoted));
        assert!(report.reason.starts_with("promoted, step 3 → 100%: canary errors"), "{}", report.reason);
        assert!(report.reason.contains("p99 210 ms vs 200 ms (limit 350 ms) over 100 requests"), "{}", report.reason);
        assert_eq!(sim.serve(&mut p, 500), 500);
    }

    #[test]
    fn min_step_ms_holds_a_healthy_step() {
        let mut p = policy(r#"{"min_step_ms": 60000, "min_requests": 10}"#);
        set_now_ms_for_test(1_000);
        let mut sim = Sim::new(0, 0);
        sim.serve(&mut p, 2_000);
        assert_eq!((state().step, state().share), (0, 50));
        set_now_ms_for_test(61_000);
        sim.serve(&mut p, 1);
        assert_eq!((state().step, state().share), (1, 250));
        // A fresh step, a fresh clock.
        sim.serve(&mut p, 2_000);
        assert_eq!(state().step, 1);
    }

    #[test]
    fn rolls_back_when_canary_errors_are_high() {
        let mut p = policy(r#"{"min_requests": 100}"#);
        let mut sim = Sim::new(0, 2);
        for _ in 0..100 {
            sim.serve(&mut p, 100);
        }
        let s = state();
        assert_eq!((s.phase, s.share), (CanaryPhase::RolledBack, 0));
        let report = last_canary_report().unwrap();
        assert_eq!((report.phase, report.share_permille), (CanaryPhase::RolledBack, 0));
        assert!(report.reason.starts_with("rolled back: "), "{}", report.reason);
        assert_eq!(sim.serve(&mut p, 1000), 0, "a rolled-back canary serves nothing");
    }

    #[test]
    fn error_limit_follows_stable() {
        // ~2.9% canary errors against 1% stable: limit 1% × 2 + 1% = 3%, healthy.
        let mut p = policy(r#"{"min_requests": 200}"#);
        let mut sim = Sim::new(100, 34);
        sim.serve_until(&mut p, |s| s.step == 1);
        assert_eq!(state().phase, CanaryPhase::Ramping);
        let report = last_canary_report().unwrap();
        assert!(
            report.reason.starts_with("step 1 → 25%: canary errors 2.5% vs stable 1.0% (limit 3.0%)"),
            "{}",
            report.reason
        );
    }

    #[test]
    fn judges_the_error_rate_over_the_whole_step() {
        // Healthy for long while the step's minimum time runs, then failing: judged on the rate.
        let mut p = policy(r#"{"min_step_ms": 60000}"#);
        let mut sim = Sim::new(0, 0);
        while sim.versions[1].requests < 1000 {
            sim.serve(&mut p, 100);
        }
        assert_eq!(state().step, 0);
        sim.error_every[1] = 2;
        sim.serve_until(&mut p, |s| s.phase != CanaryPhase::Ramping);
        let report = last_canary_report().unwrap();
        assert_eq!((report.phase, report.step), (CanaryPhase::RolledBack, 0));
        assert!(report.reason.starts_with("rolled back: canary error rate 1."), "{}", report.reason);
        assert!(report.reason.contains("% > limit 1.0% (stable 0.0%) over 10"), "{}", report.reason);
    }

    #[test]
    fn rolls_back_early_when_errors_already_decide() {
        let mut p = policy("{}");
        let versions = [stats(1000, 0, 0), stats(0, 0, 0)];
        p.canary(&req(1), &versions);
        // 2 errors in 5 requests: over 1% of 100 already, whatever the next 95 do.
        p.canary(&req(1), &[stats(1000, 0, 0), stats(5, 2, 0)]);
        let report = last_canary_report().unwrap();
        assert_eq!(report.phase, CanaryPhase::RolledBack);
        assert_eq!(
            report.reason,
            "rolled back: 2 canary errors in 5 requests already exceed limit 1.0% for 100 requests (stable 0.0%)"
        );
    }

    #[test]
    fn p99_regression_rolls_back() {
        let mut p = policy("{}");
        p.canary(&req(1), &[stats(0, 0, 0), stats(0, 0, 0)]);
        // Unknown p99 on one side: not judged on latency, the step goes up.
        p.canary(&req(1), &[stats(1000, 0, 300), stats(100, 0, 0)]);
        assert_eq!(state().step, 1);
        p.canary(&req(1), &[stats(2000, 0, 290), stats(300, 0, 500)]);
        let report = last_canary_report().unwrap();
        assert_eq!(report.phase, CanaryPhase::RolledBack);
        assert_eq!(report.reason, "rolled back: canary p99 500 ms > limit 485 ms (stable 290 ms) over 200 requests");
    }

    #[test]
    fn operator_actions() {
        let mut p = policy(r#"{"min_requests": 10}"#);
        let mut sim = Sim::new(0, 0);
        sim.serve_until(&mut p, |s| s.step == 1);
        // Pause: the share holds and healthy traffic no longer raises it.
        set_operator_action_for_test(OperatorAction::Pause);
        sim.serve(&mut p, 1);
        assert_eq!((state().phase, state().step, state().share), (CanaryPhase::Paused, 1, 250));
        assert_eq!(last_canary_report().unwrap().reason, "operator: pause");
        let on_canary = sim.serve(&mut p, 4_000);
        assert_eq!((state().phase, state().share), (CanaryPhase::Paused, 250));
        assert!((800..1200).contains(&on_canary), "{on_canary} of 4000 on the canary while paused at 25%");

        // Resume: the same step, judged on fresh baselines.
        set_operator_action_for_test(OperatorAction::Resume);
        let canary_requests = sim.versions[1].requests;
        sim.serve(&mut p, 1);
        assert_eq!((state().phase, state().step, state().share), (CanaryPhase::Ramping, 1, 250));
        assert_eq!(slot_get(BASE_CANARY_REQUESTS), canary_requests);

        // Rollback, then resume restarts from the first step.
        set_operator_action_for_test(OperatorAction::Rollback);
        assert_eq!(sim.serve(&mut p, 500), 0);
        assert_eq!((state().phase, state().share), (CanaryPhase::RolledBack, 0));
        set_operator_action_for_test(OperatorAction::Resume);
        sim.serve(&mut p, 1);
        assert_eq!((state().phase, state().step, state().share), (CanaryPhase::Ramping, 0, 50));
        assert_eq!(last_canary_report().unwrap().reason, "operator: resume (restarted at 5%)");

        // Promote: everything on the canary, nothing judged any more.
        set_operator_action_for_test(OperatorAction::Promote);
        assert_eq!(sim.serve(&mut p, 500), 500);
        let report = last_canary_report().unwrap();
        assert_eq!(
            (report.phase, report.share_permille, report.reason.as_str()),
            (CanaryPhase::Promoted, 1000, "operator: promote")
        );
        // Pausing a promoted rollout changes nothing.
        let generation = state().generation;
        set_operator_action_for_test(OperatorAction::Pause);
        sim.serve(&mut p, 1);
        assert_eq!((state().phase, state().generation), (CanaryPhase::Promoted, generation));
    }

    #[test]
    fn settings_are_validated() {
        assert!(Canary::new("{}").is_ok());
        for (config, message) in [
            (r#"{"steps_percent": []}"#, "must not be empty"),
            (r#"{"steps_percent": [0, 100]}"#, "0 is not a share from 1 to 100"),
            (r#"{"steps_percent": [5, 150]}"#, "150 is not a share"),
            (r#"{"steps_percent": [5, 5, 100]}"#, "strictly increasing (5 then 5)"),
            (r#"{"steps_percent": [5, 50]}"#, "must end with 100"),
            (r#"{"min_requests": 0}"#, "min_requests must be at least 1"),
            (r#"{"max_error_rate": -0.1}"#, "max_error_rate must be a non-negative number"),
            (r#"{"canary": "stable"}"#, "same version"),
            (r#"{"bogus": 1}"#, "unknown field"),
        ] {
            let err = Canary::new(config).err().unwrap_or_else(|| panic!("{config} accepted"));
            assert!(err.starts_with("canary settings: ") && err.contains(message), "{config}: {err}");
        }
    }

    #[test]
    fn missing_versions_serve_stable_without_a_rollout() {
        reset_host_for_test();
        let mut p = Canary::new("{}").unwrap();
        p.set_topology(topology(&["v0", "stable"]));
        let versions = [stats(0, 0, 0), stats(0, 0, 0)];
        assert!((0..1000).all(|i| p.canary(&req(tenant(i)), &versions) == 1));
        p.set_topology(topology(&["v0", "v1"]));
        assert!((0..1000).all(|i| p.canary(&req(tenant(i)), &versions) == 0));
        assert_eq!(slot_get(STATE), 0);
        assert!(last_canary_report().is_none());
        // Named versions in another order work once both exist.
        p.set_topology(topology(&["canary", "stable"]));
        p.canary(&req(1), &versions);
        assert_eq!(state().share, 50);
    }

    #[test]
    fn two_instances_do_not_double_advance() {
        let mut a = policy("{}");
        let mut b = instance("{}");
        let start = [stats(0, 0, 0), stats(0, 0, 0)];
        a.canary(&req(1), &start);
        b.canary(&req(1), &start);
        assert_eq!(state().generation, 1, "started once");

        // Both judge the same healthy step from the same snapshot: one move wins.
        let healthy = [stats(2000, 0, 0), stats(100, 0, 0)];
        let from = state();
        let (ma, mb) = (a.evaluate(from, &healthy).unwrap(), b.evaluate(from, &healthy).unwrap());
        assert!(a.commit(ma, &healthy).is_some());
        assert!(b.commit(mb, &healthy).is_none());
        assert_eq!((state().step, state().generation), (1, 2));

        // One after the other: the second sees the new step's empty window.
        let more = [stats(4000, 0, 0), stats(300, 0, 0)];
        a.canary(&req(1), &more);
        b.canary(&req(1), &more);
        assert_eq!((state().step, state().generation), (2, 3));

        // Baselines still being written for the current state: nobody judges.
        slot_set(TAG, 0);
        assert!(a.evaluate(state(), &[stats(9000, 0, 0), stats(9000, 0, 0)]).is_none());
    }
}
