//! The router's configuration: one TOML file, deserialised into typed structs.
//! Unknown keys are rejected, and every error names the file, the line and the reason,
//! so `switchyard check-config` can be wired into an operator's deploy pipeline.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// A configuration error, already carrying its location.
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        write!(f, ": {}", self.reason)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    #[serde(default)]
    pub plugins: PluginsConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub admission: AdmissionConfig,
    #[serde(default)]
    pub degraded: DegradedConfig,
    #[serde(default)]
    pub geo: Option<GeoConfig>,
}

/// Multi-region routing: this router's region, the other regions (PoPs) with their
/// coordinates and routers, and how a client's region is found.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeoConfig {
    /// This router's region; must be one of `regions`.
    pub region: Spanned<String>,
    /// Request header naming the client's region (checked before `client_networks`).
    #[serde(default = "default_region_header")]
    pub client_region_header: String,
    /// How often the other regions' routers are probed (`GET /readyz`).
    #[serde(default = "one_sec", with = "humantime_serde")]
    pub probe_interval: Duration,
    /// A probe slower than this counts as a failure.
    #[serde(default = "one_sec", with = "humantime_serde")]
    pub probe_timeout: Duration,
    /// Consecutive failed probes before a region counts as down (and successes before up).
    #[serde(default = "two")]
    pub unhealthy_after: u32,
    #[serde(default = "two")]
    pub healthy_after: u32,
    /// Time a forwarded request may take to its first response byte.
    #[serde(default = "thirty_secs", with = "humantime_serde")]
    pub forward_timeout: Duration,
    pub regions: Spanned<Vec<RegionConfig>>,
    /// Client address ranges → region, for clients that do not send the header.
    #[serde(default)]
    pub client_networks: Vec<ClientNetwork>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    pub name: String,
    pub latitude: f64,
    pub longitude: f64,
    /// The region's router (required for every region but this one).
    pub router: Option<UpstreamUrl>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientNetwork {
    pub cidr: Spanned<String>,
    pub region: String,
}

fn default_region_header() -> String {
    "x-switchyard-client-region".into()
}

fn one_sec() -> Duration {
    Duration::from_secs(1)
}

fn thirty_secs() -> Duration {
    Duration::from_secs(30)
}

fn two() -> u32 {
    2
}

/// An IP network in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, p) = s.split_once('/').ok_or_else(|| format!("{s:?} is not in CIDR form (address/prefix)"))?;
        let addr: std::net::IpAddr = a.trim().parse().map_err(|_| format!("{a:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 =
            p.trim().parse().ok().filter(|&p| p <= max).ok_or_else(|| format!("prefix {p:?} must be 0..={max}"))?;
        Ok(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::*;
        // IPv4 clients reached over an IPv6 socket appear as ::ffff:a.b.c.d.
        let ip = match ip {
            V6(v6) => v6.to_ipv4_mapped().map_or(ip, V4),
            v4 => v4,
        };
        let (a, b, bits) = match (self.addr, ip) {
            (V4(a), V4(b)) => (u32::from(a) as u128, u32::from(b) as u128, 32),
            (V6(a), V6(b)) => (u128::from(a), u128::from(b), 128),
            _ => return false,
        };
        let shift = bits - self.prefix as u32;
        shift >= bits || (a >> shift) == (b >> shift)
    }
}

/// The rule-based responder: the last step of a fallback chain (see `degraded.rs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DegradedConfig {
    /// The answer when no rule matches.
    pub default_answer: String,
    /// Tried in order; the first rule whose keyword (case-insensitive substring) or regex
    /// matches the user's last message answers.
    pub rules: Vec<RuleConfig>,
}

impl Default for DegradedConfig {
    fn default() -> Self {
        DegradedConfig {
            default_answer: "The assistant is temporarily running in a degraded mode and cannot answer this \
                             request fully. Please try again in a few minutes."
                .into(),
            rules: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    #[serde(default)]
    pub keywords: Vec<String>,
    pub regex: Option<Spanned<String>>,
    pub answer: String,
}

/// A model's degradation chain: the primary (this model) gets `primary_timeout`, then
/// each fallback model in turn gets what remains of `budget`, then — with `rule_based` —
/// the rule-based responder answers. The fallback stage plugin, when bound, decides each
/// step instead of this fixed order.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackConfig {
    /// Models (by name, defined in this file) tried in order after this one.
    #[serde(default)]
    pub models: Vec<String>,
    /// The primary's share of the budget (the seed design uses 5 s).
    #[serde(default = "five_secs", with = "humantime_serde")]
    pub primary_timeout: Duration,
    /// The whole request's time budget; fallback models answer within what remains.
    #[serde(default = "fifteen_secs", with = "humantime_serde")]
    pub budget: Duration,
    /// End the chain with the rule-based responder (else with the last model's error).
    #[serde(default = "yes")]
    pub rule_based: bool,
}

fn five_secs() -> Duration {
    Duration::from_secs(5)
}
fn fifteen_secs() -> Duration {
    Duration::from_secs(15)
}

/// Load shedding and per-tenant limits (see `ratelimit.rs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionConfig {
    /// Requests the router serves at once; beyond it new ones get 503 before their body is
    /// read (0: no limit).
    pub max_in_flight: u32,
    /// Limits for every tenant (API key of `Authorization: Bearer`; requests without a key
    /// share one anonymous tenant). Unset fields do not limit.
    pub tenant: TenantLimits,
    /// Per-key overrides, by API key.
    pub tenants: BTreeMap<String, TenantLimits>,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig { max_in_flight: 10_000, tenant: TenantLimits::default(), tenants: BTreeMap::new() }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantLimits {
    /// Sustained requests per second (0: no limit).
    pub requests_per_second: f64,
    /// Requests allowed at once above the rate; default: one second's worth.
    pub burst: Option<u32>,
    /// Prompt plus completion tokens per minute, estimated at admission and corrected from
    /// the answer's `usage` (0: no limit).
    pub tokens_per_minute: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub enabled: bool,
    /// The admin API's own listener; loopback by default so it is not exposed by accident.
    pub addr: SocketAddr,
    /// When set, every admin request needs `Authorization: Bearer <token>`. Required when
    /// `addr` is not a loopback address.
    pub token: Option<String>,
    /// Read the token from this environment variable instead (keeps it out of the file).
    pub token_env: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            addr: "127.0.0.1:9901".parse().expect("valid address"),
            token: None,
            token_env: None,
        }
    }
}

impl AdminConfig {
    /// The configured token, from the file or the environment.
    pub fn resolved_token(&self) -> Option<String> {
        self.token
            .clone()
            .or_else(|| self.token_env.as_ref().and_then(|v| std::env::var(v).ok()))
            .filter(|t| !t.is_empty())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// The watched drop folder; relative paths are resolved against the config file.
    pub dir: PathBuf,
    /// Compiled artifacts by content hash; default `<dir>/.cache`.
    pub cache_dir: Option<PathBuf>,
    /// Linear memory cap per plugin instance, in bytes.
    pub memory_limit: usize,
    /// Longest a single decision may run before it is interrupted (and the native policy decides).
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// Faults within `quarantine_window` that take a version out of service.
    pub quarantine_after: u32,
    #[serde(with = "humantime_serde")]
    pub quarantine_window: Duration,
    /// Quiet time after the last change in the folder before it is rescanned.
    #[serde(with = "humantime_serde")]
    pub debounce: Duration,
    /// Periodic rescan, in case a file-system event was missed.
    #[serde(with = "humantime_serde")]
    pub rescan_interval: Duration,
    /// Instance slots in the pooling allocator (worker threads × bound plugins, with room to swap).
    pub max_instances: u32,
    /// Per-plugin configuration, by plugin name, handed to the plugin's `init` as JSON.
    pub settings: BTreeMap<String, toml::Value>,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            dir: PathBuf::from("plugins"),
            cache_dir: None,
            memory_limit: 16 << 20,
            deadline: Duration::from_millis(5),
            quarantine_after: 5,
            quarantine_window: Duration::from_secs(10),
            debounce: Duration::from_millis(50),
            rescan_interval: Duration::from_secs(5),
            max_instances: 256,
            settings: BTreeMap::new(),
        }
    }
}

impl PluginsConfig {
    pub fn cache_dir(&self) -> PathBuf {
        self.cache_dir.clone().unwrap_or_else(|| self.dir.join(".cache"))
    }

    pub fn settings_json(&self, plugin: &str) -> String {
        match self.settings.get(plugin) {
            Some(v) => serde_json::to_string(v).unwrap_or_else(|_| "{}".into()),
            None => "{}".into(),
        }
    }
}

/// Which plugin runs each policy stage of a model (by plugin name = file stem in
/// `plugins.dir`). An unset stage, or a plugin that is missing or faulting, uses the
/// native policy.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyBinding {
    pub balance: Option<String>,
    pub canary: Option<String>,
    pub geo: Option<String>,
    pub fallback: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `host:port`; port 0 asks the OS for a free port (the bound address is printed).
    pub addr: SocketAddr,
    pub tls: Option<TlsConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain; relative paths are resolved against the config file.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest accepted request body; larger bodies get 413.
    pub max_body_bytes: usize,
    /// Largest non-streaming upstream response the router buffers (to be able to retry it).
    pub max_response_bytes: usize,
    /// A client must finish sending its request headers within this time.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A client must finish sending its request body within this time.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// On SIGTERM/SIGINT, in-flight requests and streams get this long to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 4 << 20,
            max_response_bytes: 16 << 20,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: Spanned<String>,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub health_check: HealthCheckConfig,
    #[serde(default)]
    pub circuit_breaker: BreakerConfig,
    #[serde(default)]
    pub outlier: OutlierConfig,
    #[serde(default)]
    pub policy: PolicyBinding,
    /// Requests this model serves at once; beyond it a request degrades to the model's
    /// fallback, or gets 503 when it has none (0: no limit).
    #[serde(default)]
    pub max_in_flight: u32,
    /// Graceful degradation when this model fails (see `FallbackConfig`).
    pub fallback: Option<FallbackConfig>,
    /// Replicas of this model that the router runs on this host and supervises.
    pub local: Option<LocalReplicas>,
    #[serde(default = "no_endpoints")]
    pub endpoints: Spanned<Vec<EndpointConfig>>,
}

fn no_endpoints() -> Spanned<Vec<EndpointConfig>> {
    Spanned::new(0..0, Vec::new())
}

/// "N replicas of this model, S shard processes each, on this host."
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalReplicas {
    pub replicas: u32,
    #[serde(default = "one")]
    pub shards: u32,
    /// GGUF file; relative paths are resolved against the config file.
    pub model: PathBuf,
    /// Fetch the default model into `model`'s folder when the file is missing.
    #[serde(default = "yes")]
    pub fetch: bool,
    /// Transformer layers of the model (SmolLM2-135M: 30), split evenly across shards.
    #[serde(default = "default_layers")]
    pub layers: u32,
    /// First port; replica r uses `base_port + r * shards + i` for its process i.
    pub base_port: u16,
    /// The shard server executable; default: `switchyard-shard` beside `switchyard`.
    pub binary: Option<PathBuf>,
    /// CPU threads per shard process; default: cores / replicas, at least 1 (the stages of a
    /// replica compute in turn).
    pub threads: Option<u32>,
    /// Extra arguments for every shard process.
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default = "default_backoff", with = "humantime_serde")]
    pub restart_backoff: Duration,
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_restart_backoff: Duration,
}

fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}
fn default_layers() -> u32 {
    30
}
fn default_backoff() -> Duration {
    Duration::from_millis(500)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// TCP connect to an endpoint.
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// A non-streaming attempt must be answered in full within this time.
    #[serde(with = "humantime_serde")]
    pub request: Duration,
    /// A streaming attempt must deliver its first chunk within this time.
    #[serde(with = "humantime_serde")]
    pub first_byte: Duration,
    /// Longest silence between two chunks of a stream.
    #[serde(with = "humantime_serde")]
    pub idle: Duration,
    /// How long a kept-alive connection to an endpoint may sit idle in the pool. Set it
    /// below the model server's own keep-alive timeout (uvicorn's is 5 s) so that the
    /// router, not the server, closes idle connections: then no request is ever written
    /// into a connection the server is closing.
    #[serde(with = "humantime_serde")]
    pub pool_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(1),
            request: Duration::from_secs(60),
            first_byte: Duration::from_secs(30),
            idle: Duration::from_secs(30),
            pool_idle: Duration::from_secs(90),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts per request, the first included (1 disables retries).
    pub max_attempts: u32,
    /// Retries may add at most this share of the model's traffic (Finagle-style budget).
    pub budget_ratio: f64,
    /// Retries always allowed per second, so a quiet model can still fail over.
    pub min_retries_per_sec: u32,
    /// Continue a stream whose upstream fails after tokens were sent on another endpoint
    /// (the partial answer is sent along as a continuation prefix); at most
    /// `max_attempts - 1` times per stream.
    pub resume_streams: bool,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig { max_attempts: 3, budget_ratio: 0.2, min_retries_per_sec: 10, resume_streams: true }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    pub enabled: bool,
    pub path: String,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// A check slower than this counts as failed (the seed design uses 2 s).
    #[serde(with = "humantime_serde")]
    pub max_latency: Duration,
    /// Consecutive failed checks before an endpoint is marked unhealthy.
    pub unhealthy_after: u32,
    /// Consecutive passed checks before an unhealthy endpoint is healthy again.
    pub healthy_after: u32,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            enabled: true,
            path: "/health".into(),
            interval: Duration::from_secs(2),
            max_latency: Duration::from_secs(2),
            unhealthy_after: 2,
            healthy_after: 2,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Rolling window over which the server-side failure ratio is computed.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Requests the window must hold before the ratio may open the circuit.
    pub min_requests: u32,
    /// Share of server-side failures (5xx, resets, timeouts; never 4xx) that opens it.
    pub failure_ratio: f64,
    /// How long an open circuit rejects traffic before half-open probes.
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
    /// Concurrent probes let through while half-open.
    pub half_open_probes: u32,
    /// Successful probes that close the circuit again.
    pub close_after: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window: Duration::from_secs(10),
            min_requests: 20,
            failure_ratio: 0.5,
            open_for: Duration::from_secs(10),
            half_open_probes: 1,
            close_after: 2,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// Consecutive server-side failures that eject an endpoint (0 disables ejection).
    pub consecutive_failures: u32,
    /// First ejection time; each further ejection doubles it, up to `max_ejection`.
    #[serde(with = "humantime_serde")]
    pub base_ejection: Duration,
    #[serde(with = "humantime_serde")]
    pub max_ejection: Duration,
    /// Never eject more than this share of a model's endpoints at once.
    pub max_ejected_share: f64,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(300),
            max_ejected_share: 0.5,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// Base URL of the model server, e.g. `http://127.0.0.1:9001`.
    pub url: UpstreamUrl,
    /// Display name in metrics and headers; defaults to `host:port`.
    pub name: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Free-form labels, e.g. `version = "v2"` for canary rollout.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Health path for this endpoint, overriding the model's `health_check.path`.
    pub health_path: Option<String>,
    /// Not healthy until its first passed check (set for supervised local replicas, which
    /// take a while to load their model).
    #[serde(skip)]
    pub start_unready: bool,
}

fn default_region() -> String {
    "local".into()
}

fn default_weight() -> u32 {
    1
}

/// An upstream base URL, validated while deserialising so the error points at it.
#[derive(Debug, Clone)]
pub struct UpstreamUrl {
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
    /// Path prefix without a trailing slash ("" for none).
    pub prefix: String,
}

impl<'de> Deserialize<'de> for UpstreamUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let s = String::deserialize(d)?;
        let uri: http::Uri = s.parse().map_err(|e| D::Error::custom(format!("invalid url {s:?}: {e}")))?;
        let scheme =
            uri.scheme().cloned().ok_or_else(|| D::Error::custom(format!("url {s:?} needs a scheme (http://)")))?;
        if scheme != http::uri::Scheme::HTTP {
            return Err(D::Error::custom(format!(
                "url {s:?}: only http:// upstreams are supported (model servers run on the same host or a trusted network)"
            )));
        }
        let authority = uri.authority().cloned().ok_or_else(|| D::Error::custom(format!("url {s:?} has no host")))?;
        if authority.port_u16().is_none() {
            return Err(D::Error::custom(format!("url {s:?} needs an explicit port")));
        }
        if uri.query().is_some() {
            return Err(D::Error::custom(format!("url {s:?} must not carry a query")));
        }
        let prefix = uri.path().trim_end_matches('/').to_string();
        Ok(UpstreamUrl { scheme, authority, prefix })
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.prefix)
    }
}

impl Config {
    /// Reads, parses and validates a config file. Relative TLS paths are made absolute.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            column: None,
            reason: format!("cannot read: {e}"),
        })?;
        let mut cfg = Config::parse(path, &text)?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.plugins.dir = base.join(&cfg.plugins.dir);
        for m in &mut cfg.models {
            if let Some(l) = &mut m.local {
                l.model = base.join(&l.model);
                if let Some(b) = &mut l.binary
                    && b.components().count() > 1
                {
                    *b = base.join(&*b);
                }
            }
            crate::supervisor::add_local_endpoints(m);
        }
        if let Some(c) = &mut cfg.plugins.cache_dir {
            *c = base.join(&*c);
        }
        for l in &mut cfg.listeners {
            if let Some(tls) = &mut l.tls {
                tls.cert = base.join(&tls.cert);
                tls.key = base.join(&tls.key);
            }
        }
        Ok(cfg)
    }

    /// Parses and validates TOML text; `path` only labels errors.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let err_at = |span: Option<std::ops::Range<usize>>, reason: String| {
            let (line, column) = match span {
                Some(s) => {
                    let (l, c) = line_col(text, s.start);
                    (Some(l), Some(c))
                }
                None => (None, None),
            };
            ConfigError { file: path.to_path_buf(), line, column, reason }
        };
        let cfg: Config = toml::from_str(text).map_err(|e| err_at(e.span(), e.message().trim().to_string()))?;

        if cfg.plugins.deadline.is_zero() || cfg.plugins.memory_limit < (1 << 16) || cfg.plugins.max_instances == 0 {
            return Err(err_at(
                None,
                "[plugins]: deadline must be positive, memory_limit at least 65536 bytes, max_instances at least 1"
                    .into(),
            ));
        }
        if cfg.admin.enabled && !cfg.admin.addr.ip().is_loopback() && cfg.admin.resolved_token().is_none() {
            return Err(err_at(
                None,
                format!(
                    "[admin]: addr {} is not loopback, so a token (or token_env naming a set variable) is required",
                    cfg.admin.addr
                ),
            ));
        }
        for (who, l) in std::iter::once(("admission.tenant", &cfg.admission.tenant))
            .chain(cfg.admission.tenants.values().map(|l| ("admission.tenants", l)))
        {
            if !(l.requests_per_second >= 0.0 && l.requests_per_second.is_finite()) || l.burst == Some(0) {
                return Err(err_at(
                    None,
                    format!("[{who}]: requests_per_second must be a finite number ≥ 0 and burst at least 1"),
                ));
            }
        }
        for r in &cfg.degraded.rules {
            if let Some(re) = &r.regex
                && let Err(e) = regex::Regex::new(re.get_ref())
            {
                return Err(err_at(Some(re.span()), format!("invalid regex: {e}")));
            }
            if r.keywords.is_empty() && r.regex.is_none() {
                return Err(err_at(None, "[[degraded.rules]]: each rule needs keywords or a regex".into()));
            }
        }
        if let Some(g) = &cfg.geo {
            let regions = g.regions.get_ref();
            let rspan = Some(g.regions.span());
            if !regions.iter().any(|r| &r.name == g.region.get_ref()) {
                return Err(err_at(
                    Some(g.region.span()),
                    format!("[geo]: region {:?} is not one of [[geo.regions]]", g.region.get_ref()),
                ));
            }
            let mut seen = HashSet::new();
            for r in regions {
                if !seen.insert(&r.name) {
                    return Err(err_at(rspan.clone(), format!("[[geo.regions]]: {:?} is listed twice", r.name)));
                }
                if !(-90.0..=90.0).contains(&r.latitude) || !(-180.0..=180.0).contains(&r.longitude) {
                    return Err(err_at(
                        rspan.clone(),
                        format!("[[geo.regions]] {:?}: latitude must be within ±90 and longitude within ±180", r.name),
                    ));
                }
                if &r.name != g.region.get_ref() && r.router.is_none() {
                    return Err(err_at(
                        rspan.clone(),
                        format!("[[geo.regions]] {:?}: needs the router url of that region", r.name),
                    ));
                }
            }
            if http::HeaderName::from_bytes(g.client_region_header.as_bytes()).is_err() {
                return Err(err_at(None, format!("[geo]: {:?} is not a valid header name", g.client_region_header)));
            }
            for n in &g.client_networks {
                if let Err(e) = Cidr::parse(n.cidr.get_ref()) {
                    return Err(err_at(Some(n.cidr.span()), format!("[[geo.client_networks]]: {e}")));
                }
                if !regions.iter().any(|r| r.name == n.region) {
                    return Err(err_at(
                        Some(n.cidr.span()),
                        format!("[[geo.client_networks]]: region {:?} is not one of [[geo.regions]]", n.region),
                    ));
                }
            }
        }
        if cfg.listeners.is_empty() {
            return Err(err_at(None, "at least one [[listeners]] entry is required".into()));
        }
        let mut names = HashSet::new();
        for m in &cfg.models {
            let span = Some(m.name.span());
            let name = m.name.get_ref();
            if name.is_empty() {
                return Err(err_at(span, "model name must not be empty".into()));
            }
            if !names.insert(name.clone()) {
                return Err(err_at(span, format!("model {name:?} is defined twice")));
            }
            if m.endpoints.get_ref().is_empty() && m.local.is_none() {
                return Err(err_at(
                    span.clone(),
                    format!("model {name:?} needs at least one endpoint or a [models.local] section"),
                ));
            }
            if let Some(l) = &m.local
                && (l.replicas == 0 || l.shards == 0 || l.shards > l.layers || l.base_port == 0)
            {
                return Err(err_at(
                    span.clone(),
                    format!("model {name:?}: local needs replicas ≥ 1, 1 ≤ shards ≤ layers, and a base_port"),
                ));
            }
            let check = |ok: bool, what: &str| {
                if ok { Ok(()) } else { Err(err_at(span.clone(), format!("model {name:?}: {what}"))) }
            };
            check(m.retry.max_attempts >= 1, "retry.max_attempts must be at least 1")?;
            check((0.0..=1.0).contains(&m.retry.budget_ratio), "retry.budget_ratio must be within 0..=1")?;
            check(
                m.circuit_breaker.failure_ratio > 0.0 && m.circuit_breaker.failure_ratio <= 1.0,
                "circuit_breaker.failure_ratio must be within (0, 1]",
            )?;
            check(m.circuit_breaker.half_open_probes >= 1, "circuit_breaker.half_open_probes must be at least 1")?;
            check(m.circuit_breaker.close_after >= 1, "circuit_breaker.close_after must be at least 1")?;
            check(!m.circuit_breaker.window.is_zero(), "circuit_breaker.window must be positive")?;
            check(
                (0.0..=1.0).contains(&m.outlier.max_ejected_share),
                "outlier.max_ejected_share must be within 0..=1",
            )?;
            check(!m.health_check.interval.is_zero(), "health_check.interval must be positive")?;
            check(m.health_check.path.starts_with('/'), "health_check.path must start with '/'")?;
            check(
                m.health_check.unhealthy_after >= 1 && m.health_check.healthy_after >= 1,
                "health_check thresholds must be at least 1",
            )?;
            if m.policy.geo.is_some() && cfg.geo.is_none() {
                return Err(err_at(span.clone(), format!("model {name:?}: a geo policy needs a [geo] section")));
            }
            if let Some(f) = &m.fallback {
                for fb in &f.models {
                    check(fb != name, "fallback.models must not name the model itself")?;
                    check(
                        cfg.models.iter().any(|o| o.name.get_ref() == fb),
                        &format!("fallback model {fb:?} is not defined in this file"),
                    )?;
                }
                check(
                    !f.primary_timeout.is_zero() && f.primary_timeout <= f.budget,
                    "fallback.primary_timeout must be positive and within fallback.budget",
                )?;
            }
            let mut seen = HashSet::new();
            for ep in m.endpoints.get_ref() {
                check(ep.weight >= 1, "endpoint weight must be at least 1")?;
                let ep_name = ep.display_name();
                if !seen.insert(ep_name.clone()) {
                    return Err(err_at(
                        Some(m.endpoints.span()),
                        format!("model {name:?}: endpoint {ep_name:?} is listed twice"),
                    ));
                }
            }
        }
        Ok(cfg)
    }
}

/// Position of `v` in `list`, appending it when absent.
fn index_in(list: &mut Vec<String>, v: &str) -> u32 {
    match list.iter().position(|x| x == v) {
        Some(i) => i as u32,
        None => {
            list.push(v.to_string());
            list.len() as u32 - 1
        }
    }
}

impl ModelConfig {
    /// The model's versions (endpoint label `version`; "" when unlabelled) in order of
    /// first appearance, and each endpoint's index into them. Policies and the per-version
    /// statistics use the same numbering.
    pub fn versions(&self) -> (Vec<String>, Vec<u32>) {
        let mut versions = Vec::new();
        let of = self
            .endpoints
            .get_ref()
            .iter()
            .map(|e| index_in(&mut versions, e.labels.get("version").map(String::as_str).unwrap_or("")))
            .collect();
        (versions, of)
    }

    /// The regions a policy of this model sees: the `[geo]` regions first (so a region
    /// index means the same for every model), then endpoint regions not listed there.
    /// Returns (name, latitude, longitude) per region, each endpoint's region index, and
    /// the index of this router's region.
    pub fn regions(&self, geo: Option<&GeoConfig>) -> (Vec<(String, f64, f64)>, Vec<u32>, u32) {
        let mut names: Vec<String> =
            geo.map(|g| g.regions.get_ref().iter().map(|r| r.name.clone()).collect()).unwrap_or_default();
        let of = self.endpoints.get_ref().iter().map(|e| index_in(&mut names, &e.region)).collect();
        let local = geo.map_or(0, |g| index_in(&mut names, g.region.get_ref()));
        let coords = |n: &str| {
            geo.and_then(|g| g.regions.get_ref().iter().find(|r| r.name == n))
                .map_or((0.0, 0.0), |r| (r.latitude, r.longitude))
        };
        let regions = names
            .into_iter()
            .map(|n| {
                let (lat, lon) = coords(&n);
                (n, lat, lon)
            })
            .collect();
        (regions, of, local)
    }
}

impl EndpointConfig {
    pub fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.url.authority.to_string())
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(before.len(), |nl| before.len() - nl - 1) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text)
    }

    const GOOD: &str = r#"
[[listeners]]
addr = "127.0.0.1:0"

[[models]]
name = "m"
[[models.endpoints]]
url = "http://127.0.0.1:9001"
"#;

    #[test]
    fn accepts_a_minimal_file_with_defaults() {
        let cfg = parse(GOOD).unwrap();
        assert_eq!(cfg.models[0].retry.max_attempts, 3);
        assert_eq!(cfg.models[0].health_check.max_latency, Duration::from_secs(2));
        assert_eq!(cfg.models[0].endpoints.get_ref()[0].display_name(), "127.0.0.1:9001");
    }

    #[test]
    fn the_pool_idle_timeout_defaults_to_90s_and_can_be_set() {
        assert_eq!(parse(GOOD).unwrap().models[0].timeouts.pool_idle, Duration::from_secs(90));
        let text = GOOD.replace("name = \"m\"", "name = \"m\"\ntimeouts = { pool_idle = \"4s\" }");
        let cfg = parse(&text).unwrap();
        assert_eq!(cfg.models[0].timeouts.pool_idle, Duration::from_secs(4));
        assert_eq!(cfg.models[0].timeouts.connect, Duration::from_secs(1), "the others keep their defaults");
    }

    #[test]
    fn unknown_key_names_its_line() {
        let text = GOOD.replace("name = \"m\"", "name = \"m\"\nbogus = 1");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.line, Some(7), "{err}");
        assert!(err.reason.contains("bogus"), "{err}");
    }

    #[test]
    fn bad_url_names_its_line() {
        let text = GOOD.replace("http://127.0.0.1:9001", "ftp://x:1");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.line, Some(8), "{err}");
        assert!(err.to_string().starts_with("test.toml:8:"), "{err}");
    }

    const GEO: &str = r#"
[geo]
region = "eu"
[[geo.regions]]
name = "eu"
latitude = 50.1
longitude = 8.7
[[geo.regions]]
name = "us"
latitude = 40.7
longitude = -74.0
router = "http://127.0.0.1:9100"
[[geo.client_networks]]
cidr = "10.0.0.0/8"
region = "us"
"#;

    #[test]
    fn geo_regions_networks_and_their_errors() {
        let cfg = parse(&format!("{GEO}{GOOD}")).unwrap();
        let (regions, _, local) = cfg.models[0].regions(cfg.geo.as_ref());
        assert_eq!(local, 0);
        assert_eq!(regions[1], ("us".to_string(), 40.7, -74.0));
        assert_eq!(regions.len(), 3, "the endpoint's default region is appended");
        let err = parse(&format!("{}{GOOD}", GEO.replace("10.0.0.0/8", "10.0.0.0/40"))).unwrap_err();
        assert_eq!(err.line, Some(14), "{err}");
        assert!(err.reason.contains("prefix"), "{err}");
        let err = parse(&format!("{}{GOOD}", GEO.replace(r#"region = "eu""#, r#"region = "asia""#))).unwrap_err();
        assert_eq!(err.line, Some(3), "{err}");
        let err = parse(&format!("{}{GOOD}", GEO.replace(r#"router = "http://127.0.0.1:9100""#, ""))).unwrap_err();
        assert!(err.reason.contains("router url"), "{err}");
        let err = parse(&GOOD.replace(r#"name = "m""#, "name = \"m\"\npolicy = { geo = \"geo\" }")).unwrap_err();
        assert!(err.reason.contains("[geo]"), "{err}");
    }

    #[test]
    fn cidr_matching() {
        let net = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()), "IPv4-mapped clients match IPv4 networks");
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("192.0.2.1".parse().unwrap()));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains("2001:db8:1::1".parse().unwrap()));
        assert!(!v6.contains("10.1.0.1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.1").is_err() && Cidr::parse("nope/8").is_err());
    }

    #[test]
    fn exposed_admin_needs_a_token_and_bad_regex_names_its_line() {
        let err = parse(&format!("[admin]\naddr = \"0.0.0.0:9901\"\n{GOOD}")).unwrap_err();
        assert!(err.reason.contains("token"), "{err}");
        parse(&format!("[admin]\naddr = \"0.0.0.0:9901\"\ntoken = \"t\"\n{GOOD}")).unwrap();
        let err = parse(&format!("{GOOD}\n[[degraded.rules]]\nregex = \"(unclosed\"\nanswer = \"x\"\n")).unwrap_err();
        assert_eq!(err.line, Some(11), "{err}");
        assert!(err.reason.contains("regex"), "{err}");
        let err = parse(&GOOD.replace("name = \"m\"", "name = \"m\"\nfallback = { models = [\"nope\"] }")).unwrap_err();
        assert!(err.reason.contains("nope"), "{err}");
    }

    #[test]
    fn duplicate_model_is_rejected_at_second_definition() {
        let text = format!("{GOOD}\n[[models]]\nname = \"m\"\n[[models.endpoints]]\nurl = \"http://127.0.0.1:9002\"\n");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.line, Some(11), "{err}");
        assert!(err.reason.contains("defined twice"));
    }
}
