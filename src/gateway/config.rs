//! The gateway's YAML configuration.
//!
//! Field names follow the Python fastapi-balancer's `balancer.yml` where they overlap, so its
//! users can bring their file. Durations are seconds (integer or float). Every field is
//! documented in the README's config reference.
//!
//! Loading never panics: a bad file is reported as a [`ConfigError`] that names the file, the
//! field and, where the parser knows it, the line. The gateway exits with status 2 on it.

use super::proxy::Upstream;
use super::upstream_url::{parse_cidr, validate_upstream_url, AdminAllowlist};
use portcullis_probe::ProbeConfig;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A configuration error: which file, which field, which line, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the config came from (`<embedded>` for the built-in default).
    pub file: PathBuf,
    /// The offending field, as a path (`upstreams[1].url`), when known.
    pub field: Option<String>,
    /// 1-based line in the file, when known.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid config {}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, " (line {line})")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field `{field}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

pub use portcullis_admission::OnClientCancel;
pub use portcullis_balance::RoutingStrategy;

/// One upstream replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL, `http://host:port[/prefix]`.
    pub url: String,
    /// Primary tier (preferred while any primary is healthy).
    #[serde(default)]
    pub primary: bool,
}

pub use portcullis_breaker::Config as FallbackConfig;
pub use portcullis_dashboard::UiConfig;
pub use portcullis_health::HealthServerConfig;
pub use portcullis_redis::{OnError, StorageConfig, StorageType};

/// One watched endpoint under `endpoints`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// Only requests with this method are admitted through the queue (others pass through).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Maximum concurrent requests; absent means "probe it" (or the default capacity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<i64>,
    /// Overrides the global `queue_timeout` for this endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_timeout: Option<f64>,
    /// Headers sent by the prober.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// JSON body sent by the prober.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
    /// The path the prober sends to (default: the endpoint's key). Required to probe a
    /// prefix pattern (`/v1/models/*`) that has no `capacity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_path: Option<String>,
}

impl EndpointConfig {
    /// The path probed for the endpoint under `key`: `probe_path`, else `key` itself;
    /// `None` for a prefix pattern without `probe_path`.
    pub fn probe_path<'a>(&'a self, key: &'a str) -> Option<&'a str> {
        match &self.probe_path {
            Some(p) => Some(p),
            None if key.ends_with("/*") => None,
            None => Some(key),
        }
    }
}

/// The whole gateway configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Address to listen on.
    pub listen: String,
    /// Seconds allowed for an upstream's response headers (504 after).
    pub upstream_timeout: f64,
    /// Seconds allowed to open a connection to an upstream (502 after).
    pub connect_timeout: f64,
    /// Seconds in-flight requests get to finish on SIGINT/SIGTERM.
    pub drain_timeout: f64,
    /// Serving threads, each with its own runtime and `SO_REUSEPORT` listener (0 = one per
    /// core).
    pub workers: usize,
    /// Where admission counters live.
    pub storage: StorageConfig,
    /// The replicas.
    pub upstreams: Vec<UpstreamConfig>,
    /// `p2c` | `round-robin` | `first-healthy`.
    pub routing_strategy: RoutingStrategy,
    /// Path probed on every upstream.
    pub health_endpoint: String,
    /// Seconds between health-check cycles.
    pub health_check_interval: f64,
    /// Seconds a health probe may take.
    pub health_check_timeout: f64,
    /// Consecutive failed probes that mark a replica unhealthy.
    pub failure_threshold: u32,
    /// Consecutive good probes that mark it healthy again.
    pub recovery_threshold: u32,
    /// Seconds of random jitter added to each health-check cycle.
    pub health_check_jitter: f64,
    /// Consecutive failed live responses that eject a replica (0 = passive ejection off).
    pub eject_after: u32,
    /// Seconds a replica stays ejected the first time.
    pub eject_for: f64,
    /// Upper bound, in seconds, of the growing ejection time.
    pub eject_max: f64,
    /// Below this percentage of healthy replicas, route to all of them (0 = off).
    pub panic_threshold: f64,
    /// Seconds a request may wait in an admission queue (504 after).
    pub queue_timeout: f64,
    /// Bound of each admission queue (503 `queue_full` beyond); absent = unbounded.
    pub max_queue: Option<i64>,
    /// Capacity of a watched endpoint with no `capacity` while it is not probed.
    pub default_capacity: i64,
    /// Watched paths: admission control applies to these.
    pub endpoints: BTreeMap<String, EndpointConfig>,
    /// Probe watched endpoints without a manual `capacity` before admitting traffic.
    pub probe_on_startup: bool,
    /// Probe again at startup even when a capacity is stored (Redis storage).
    pub force_reprobe: bool,
    /// A probe level fails above this fraction of failed requests.
    pub error_threshold: f64,
    /// A probe level fails when its p99 latency exceeds this many milliseconds.
    pub latency_threshold_ms: f64,
    /// Upper bound of the probed concurrency.
    pub max_probe_concurrency: usize,
    /// Minimum requests per probe level.
    pub probe_min_requests: usize,
    /// Circuit-breaker fallback (absent: no breaker).
    pub fallback: Option<FallbackConfig>,
    /// The dashboard page and operator-route credentials.
    pub ui: UiConfig,
    /// The standalone liveness/readiness server.
    pub health_server: HealthServerConfig,
    /// Serve `GET`/`POST`/`DELETE /balancer/upstreams` to change the pool at runtime.
    pub upstream_admin: bool,
    /// CIDRs an admin-added upstream must resolve into (every address it resolves to);
    /// absent = any address.
    pub upstream_admin_allow: Option<Vec<String>>,
    /// Seconds a client may pause between two reads of its request body (408
    /// `client_timeout` after it).
    pub client_body_timeout: f64,
    /// Seconds an upstream may pause between two reads of its response body (the body is cut
    /// off after it and the slots it held are freed).
    pub upstream_body_timeout: f64,
    /// Idle keep-alive connections kept per upstream (per serving thread).
    pub upstream_max_idle: usize,
    /// Seconds an idle upstream keep-alive connection is kept.
    pub upstream_idle_timeout: f64,
    /// Seconds a client has to send a complete HTTP/1 request head, counted from the
    /// connection's accept or from its first byte after an idle keep-alive pause (408
    /// `client_timeout` and close after it).
    pub client_header_timeout: f64,
    /// Seconds a client connection may stay open with no request in flight (HTTP/1 keep-alive
    /// or HTTP/2 with no open stream) before the gateway closes it.
    pub client_idle_timeout: f64,
    /// Client connections served at once by this process (0 = unlimited); beyond it the
    /// gateway stops accepting and new connections wait in the kernel's accept backlog.
    pub max_connections: usize,
    /// `hold` (default): a watched request whose client goes away keeps its slot while its
    /// upstream request runs to its end in the background; `release`: free the slot at once.
    pub on_client_cancel: OnClientCancel,
    /// Seconds a held request may run on after its client went away before it is dropped
    /// and its slot freed; absent = `connect_timeout + upstream_timeout +
    /// upstream_body_timeout`.
    pub client_cancel_hold_timeout: Option<f64>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        let probe = ProbeConfig::default();
        Self {
            listen: "127.0.0.1:8080".into(),
            upstream_timeout: 30.0,
            connect_timeout: 5.0,
            drain_timeout: 30.0,
            workers: 0,
            storage: StorageConfig::default(),
            upstreams: Vec::new(),
            routing_strategy: RoutingStrategy::P2c,
            health_endpoint: "/healthz".into(),
            health_check_interval: 1.0,
            health_check_timeout: 1.0,
            failure_threshold: 3,
            recovery_threshold: 2,
            health_check_jitter: 0.0,
            eject_after: 5,
            eject_for: 30.0,
            eject_max: 300.0,
            panic_threshold: 0.0,
            queue_timeout: 30.0,
            max_queue: None,
            default_capacity: 64,
            endpoints: BTreeMap::new(),
            probe_on_startup: probe.probe_on_startup,
            force_reprobe: probe.force_reprobe,
            error_threshold: probe.error_threshold,
            latency_threshold_ms: probe.latency_threshold_ms,
            max_probe_concurrency: probe.max_probe_concurrency,
            probe_min_requests: probe.probe_min_requests,
            fallback: None,
            ui: UiConfig::default(),
            health_server: HealthServerConfig::default(),
            upstream_admin: false,
            upstream_admin_allow: None,
            client_body_timeout: 60.0,
            upstream_body_timeout: 60.0,
            upstream_max_idle: 64,
            upstream_idle_timeout: 60.0,
            client_header_timeout: 10.0,
            client_idle_timeout: 75.0,
            max_connections: 10_000,
            on_client_cancel: OnClientCancel::Hold,
            client_cancel_hold_timeout: None,
        }
    }
}

/// The config the gateway runs with no `--config`: two demo backends started in-process.
/// `{demo1}` and `{demo2}` stand for their ports; see [`embedded_default`].
pub const EMBEDDED_DEFAULT: &str = r#"# Built-in demo config: two in-process demo backends.
listen: 127.0.0.1:8080
upstream_timeout: 30
storage: {type: memory}
upstreams:
  - {url: "http://127.0.0.1:{demo1}", primary: true}
  - {url: "http://127.0.0.1:{demo2}"}
routing_strategy: p2c
health_endpoint: /healthz
health_check_interval: 1
health_check_timeout: 1
failure_threshold: 3
recovery_threshold: 2
queue_timeout: 5
endpoints:
  /work: {method: POST, capacity: 8, queue_timeout: 5}
"#;

/// The embedded default config text with the demo backends' ports filled in.
pub fn embedded_default(demo_ports: [u16; 2]) -> String {
    EMBEDDED_DEFAULT
        .replace("{demo1}", &demo_ports[0].to_string())
        .replace("{demo2}", &demo_ports[1].to_string())
}

impl GatewayConfig {
    /// Reads and validates a YAML file.
    ///
    /// At most [`MAX_CONFIG_BYTES`] are read (a bounded read: `/dev/zero` or a huge file is
    /// refused after 16 MiB, not read to the end).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read_bounded(path, MAX_CONFIG_BYTES).map_err(|message| ConfigError {
            file: path.to_path_buf(),
            field: None,
            line: None,
            message,
        })?;
        Self::from_yaml(&text, path)
    }

    /// Parses and validates YAML text; `file` is only used in error messages.
    ///
    /// Text over [`MAX_CONFIG_BYTES`] or nested deeper than [`MAX_CONFIG_DEPTH`] is refused
    /// before it reaches the YAML parser (whose cost grows faster than linearly with the
    /// depth of flow collections: 80,000 `[` took over 30 s).
    pub fn from_yaml(text: &str, file: &Path) -> Result<Self, ConfigError> {
        let refuse = |line: Option<usize>, message: String| ConfigError {
            file: file.to_path_buf(),
            field: None,
            line,
            message,
        };
        if text.len() > MAX_CONFIG_BYTES {
            return Err(refuse(
                None,
                format!(
                    "the config is {} bytes; at most {MAX_CONFIG_BYTES} (16 MiB) are allowed",
                    text.len()
                ),
            ));
        }
        if let Some(line) = nesting_exceeds(text, MAX_CONFIG_DEPTH) {
            return Err(refuse(
                Some(line),
                format!("the YAML is nested more than {MAX_CONFIG_DEPTH} levels deep"),
            ));
        }
        let cfg: GatewayConfig = if text.trim().is_empty() {
            GatewayConfig::default()
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| yaml_error(e, text, file))?
        };
        cfg.validate(text, file)?;
        Ok(cfg)
    }

    /// The listen address.
    pub fn listen_addr(&self) -> SocketAddr {
        // Validated in `validate`.
        self.listen
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 8080)))
    }

    /// The parsed upstreams.
    pub fn parsed_upstreams(&self) -> Vec<(Upstream, bool)> {
        self.upstreams
            .iter()
            .filter_map(|u| Upstream::parse(&u.url).ok().map(|p| (p, u.primary)))
            .collect()
    }

    /// The balancer's settings (upstreams, policy, health checks, ejection).
    pub fn balance_config(&self) -> portcullis_balance::Config {
        portcullis_balance::Config {
            upstreams: self
                .upstreams
                .iter()
                .map(|u| portcullis_balance::UpstreamConfig {
                    url: u.url.clone(),
                    primary: u.primary,
                })
                .collect(),
            routing_strategy: self.routing_strategy,
            health_endpoint: self.health_endpoint.clone(),
            health_check_interval: self.health_check_interval,
            health_check_timeout: self.health_check_timeout,
            failure_threshold: self.failure_threshold,
            recovery_threshold: self.recovery_threshold,
            health_check_jitter: self.health_check_jitter,
            eject_after: self.eject_after,
            eject_for: self.eject_for,
            eject_max: self.eject_max,
            panic_threshold: self.panic_threshold,
        }
    }

    /// The admission settings (`queue_timeout`, `max_queue`, `endpoints`).
    pub fn admission_config(&self) -> portcullis_admission::Config {
        portcullis_admission::Config {
            queue_timeout: Duration::from_secs_f64(self.queue_timeout),
            max_queue: self.max_queue.map(|q| q.max(0) as usize),
            endpoints: self
                .endpoints
                .iter()
                .map(|(path, e)| {
                    let ep = portcullis_admission::EndpointConfig {
                        method: e.method.clone(),
                        capacity: e.capacity.map(|c| c.max(1) as usize),
                        queue_timeout: e.queue_timeout.map(Duration::from_secs_f64),
                        headers: (!e.headers.is_empty()).then(|| e.headers.clone()),
                        body: e.body.clone(),
                    };
                    (path.clone(), ep)
                })
                .collect(),
        }
    }

    /// The number of serving threads: `workers`, or one per core when 0.
    pub fn worker_threads(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map_or(1, usize::from)
        }
    }

    /// The probe settings (`probe_on_startup`, thresholds, limits).
    pub fn probe_config(&self) -> ProbeConfig {
        ProbeConfig {
            probe_on_startup: self.probe_on_startup,
            force_reprobe: self.force_reprobe,
            error_threshold: self.error_threshold,
            latency_threshold_ms: self.latency_threshold_ms,
            max_probe_concurrency: self.max_probe_concurrency,
            probe_min_requests: self.probe_min_requests,
        }
    }

    /// The `upstream_admin_allow` allowlist, when set (validated in `validate`).
    pub fn admin_allowlist(&self) -> Option<AdminAllowlist> {
        self.upstream_admin_allow.as_ref().map(|list| {
            AdminAllowlist::new(list.iter().filter_map(|c| parse_cidr(c).ok()).collect())
        })
    }

    /// How long a request held after its client went away may run on
    /// (`client_cancel_hold_timeout`, or the sum of the upstream timeouts).
    pub fn client_cancel_hold_limit(&self) -> Duration {
        Duration::from_secs_f64(
            self.client_cancel_hold_timeout.unwrap_or(
                self.connect_timeout + self.upstream_timeout + self.upstream_body_timeout,
            ),
        )
    }

    /// `upstream_timeout` as a duration.
    pub fn upstream_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.upstream_timeout)
    }

    fn validate(&self, text: &str, file: &Path) -> Result<(), ConfigError> {
        let err = |field: &str, key: &str, message: String| ConfigError {
            file: file.to_path_buf(),
            field: Some(field.to_string()),
            line: find_line(text, key),
            message,
        };
        if self.listen.parse::<SocketAddr>().is_err() {
            return Err(err(
                "listen",
                "listen",
                format!("`{}` is not an address like 127.0.0.1:8080", self.listen),
            ));
        }
        let positive = [
            ("upstream_timeout", self.upstream_timeout),
            ("connect_timeout", self.connect_timeout),
            ("drain_timeout", self.drain_timeout),
            ("health_check_interval", self.health_check_interval),
            ("health_check_timeout", self.health_check_timeout),
            ("eject_for", self.eject_for),
            ("eject_max", self.eject_max),
            ("queue_timeout", self.queue_timeout),
            ("client_body_timeout", self.client_body_timeout),
            ("upstream_body_timeout", self.upstream_body_timeout),
            ("upstream_idle_timeout", self.upstream_idle_timeout),
            ("client_header_timeout", self.client_header_timeout),
            ("client_idle_timeout", self.client_idle_timeout),
        ];
        for (name, v) in positive {
            check_seconds(v).map_err(|m| err(name, name, m))?;
        }
        if let Some(v) = self.client_cancel_hold_timeout {
            check_seconds(v).map_err(|m| {
                err(
                    "client_cancel_hold_timeout",
                    "client_cancel_hold_timeout",
                    m,
                )
            })?;
        }
        if !(self.health_check_jitter.is_finite() && self.health_check_jitter >= 0.0) {
            return Err(err(
                "health_check_jitter",
                "health_check_jitter",
                "must be zero or a positive number of seconds".into(),
            ));
        }
        if self.health_check_interval < MIN_CHECK_INTERVAL {
            return Err(err(
                "health_check_interval",
                "health_check_interval",
                format!(
                    "must be at least {MIN_CHECK_INTERVAL} s (10 ms), got {}",
                    self.health_check_interval
                ),
            ));
        }
        if self.health_check_jitter > self.health_check_interval {
            return Err(err(
                "health_check_jitter",
                "health_check_jitter",
                format!(
                    "must not exceed health_check_interval ({} s), got {}",
                    self.health_check_interval, self.health_check_jitter
                ),
            ));
        }
        if self.workers > MAX_WORKERS {
            return Err(err(
                "workers",
                "workers",
                format!(
                    "must be 0 (one per core) or 1..={MAX_WORKERS}, got {}",
                    self.workers
                ),
            ));
        }
        if self.upstream_admin && self.ui.credentials().is_none() {
            return Err(err(
                "upstream_admin",
                "upstream_admin",
                "needs ui.username and ui.password: without them anyone who reaches the gateway could change where its traffic goes".into(),
            ));
        }
        if let Some(list) = &self.upstream_admin_allow {
            for (i, cidr) in list.iter().enumerate() {
                parse_cidr(cidr)
                    .map_err(|m| err(&format!("upstream_admin_allow[{i}]"), cidr, m))?;
            }
        }
        if !(0.0..=100.0).contains(&self.panic_threshold) {
            return Err(err(
                "panic_threshold",
                "panic_threshold",
                "must be a percentage between 0 and 100".into(),
            ));
        }
        for (name, v) in [
            ("failure_threshold", self.failure_threshold),
            ("recovery_threshold", self.recovery_threshold),
        ] {
            if v == 0 {
                return Err(err(name, name, "must be at least 1".into()));
            }
        }
        if let Some(q) = self.max_queue {
            if q < 0 {
                return Err(err(
                    "max_queue",
                    "max_queue",
                    format!("must be zero or positive, got {q}"),
                ));
            }
        }
        if self.default_capacity <= 0 {
            return Err(err(
                "default_capacity",
                "default_capacity",
                format!("must be at least 1, got {}", self.default_capacity),
            ));
        }
        if !self.health_endpoint.starts_with('/') {
            return Err(err(
                "health_endpoint",
                "health_endpoint",
                "must be a path starting with `/`".into(),
            ));
        }
        let mut seen = HashSet::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            let field = format!("upstreams[{i}].url");
            let parsed = Upstream::parse(&u.url).map_err(|e| err(&field, &u.url, e.0))?;
            validate_upstream_url(&u.url).map_err(|e| err(&field, &u.url, e.0))?;
            if !seen.insert(parsed.url().to_string()) {
                return Err(err(
                    &field,
                    &u.url,
                    format!("duplicate upstream `{}`", parsed.url()),
                ));
            }
        }
        for (path, ep) in &self.endpoints {
            let field = format!("endpoints.{path}");
            if !path.starts_with('/') {
                return Err(err(
                    &field,
                    path,
                    "an endpoint must be a path starting with `/`".into(),
                ));
            }
            if let Some(c) = ep.capacity {
                if c <= 0 {
                    return Err(err(
                        &format!("{field}.capacity"),
                        path,
                        format!("must be at least 1, got {c}"),
                    ));
                }
            }
            if let Some(p) = &ep.probe_path {
                if !p.starts_with('/') || p.contains('*') {
                    return Err(err(
                        &format!("{field}.probe_path"),
                        path,
                        "must be a concrete path starting with `/`".into(),
                    ));
                }
            }
            if ep.capacity.is_none() && self.probe_on_startup && ep.probe_path(path).is_none() {
                return Err(err(
                    &format!("{field}.probe_path"),
                    path,
                    "a prefix pattern without `capacity` needs `probe_path` (a concrete path under it) to be probed at startup".into(),
                ));
            }
            if let Some(t) = ep.queue_timeout {
                check_seconds(t).map_err(|m| err(&format!("{field}.queue_timeout"), path, m))?;
            }
            if let Some(m) = &ep.method {
                if http::Method::from_bytes(m.to_ascii_uppercase().as_bytes()).is_err() {
                    return Err(err(
                        &format!("{field}.method"),
                        path,
                        format!("`{m}` is not an HTTP method"),
                    ));
                }
            }
        }
        let nested = [
            ("endpoints", self.admission_config().validate()),
            ("storage", self.storage.validate()),
            (
                "fallback",
                self.fallback.as_ref().map_or(Ok(()), |f| f.validate()),
            ),
        ];
        for (section, res) in nested {
            if let Err(m) = res {
                let (field, message) = match m.split_once(": ") {
                    Some((f, rest)) if f.starts_with(section) => (f.to_string(), rest.to_string()),
                    _ => (section.to_string(), m.clone()),
                };
                let key = field.rsplit('.').next().unwrap_or(section).to_string();
                return Err(err(&field, &key, message));
            }
        }
        if let Some(f) = &self.fallback {
            if let Some(url) = &f.url {
                Upstream::parse(url).map_err(|e| err("fallback.url", "url", e.0))?;
                validate_upstream_url(url).map_err(|e| err("fallback.url", "url", e.0))?;
            }
        }
        self.probe_config()
            .validate()
            .map_err(|e| err(e.field, e.field, e.message))?;
        Ok(())
    }
}

/// The largest config file read, in bytes (16 MiB).
pub const MAX_CONFIG_BYTES: usize = 16 << 20;

/// The deepest YAML nesting accepted (collections inside collections).
pub const MAX_CONFIG_DEPTH: usize = 128;

/// The shortest `health_check_interval`, in seconds: 10 ms (`storage.ping_interval` has
/// the same floor, checked by `portcullis_redis`).
pub const MIN_CHECK_INTERVAL: f64 = 0.010;

/// The most serving threads `workers` may ask for.
pub const MAX_WORKERS: usize = 1024;

/// Reads `path` as UTF-8, at most `limit` bytes: one byte more is refused without reading
/// the rest (a bounded `Read::take`, so `/dev/zero` stops at `limit + 1`).
fn read_bounded(path: &Path, limit: usize) -> Result<String, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read the file: {e}"))?;
    let mut bytes = Vec::new();
    file.take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read the file: {e}"))?;
    if bytes.len() > limit {
        return Err(format!(
            "the file is larger than {limit} bytes (16 MiB), the most a config may be"
        ));
    }
    String::from_utf8(bytes).map_err(|e| format!("the file is not UTF-8 text: {e}"))
}

/// The first line at which `text` nests collections more than `max` deep, by a linear scan
/// before any parsing; `None` when it stays within `max`.
///
/// Depth counts both kinds of YAML nesting:
/// * flow collections: each unquoted `[` / `{` opens a level until its `]` / `}`;
/// * block collections: one level per enclosing indentation step, plus one for each
///   compact `- ` sequence entry that starts a line (`- - - x` is three levels).
///
/// Quoted strings, comments and the lines of block scalars (`|`, `>`) are skipped. It is an
/// estimate that never counts less than the parser would nest, so a file it accepts is no
/// deeper than `max`.
fn nesting_exceeds(text: &str, max: usize) -> Option<usize> {
    // Indentation columns of the enclosing block collections.
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    // Inside a block scalar: lines indented more than this column belong to it.
    let mut scalar_of: Option<usize> = None;
    // Inside a quoted scalar that spans lines: its quote character.
    let mut quote: Option<u8> = None;
    for (i, line) in text.lines().enumerate() {
        let bytes = line.as_bytes();
        let indent = bytes.iter().take_while(|b| **b == b' ').count();
        let blank = bytes[indent..].iter().all(|b| b.is_ascii_whitespace());
        if let Some(col) = scalar_of {
            if blank || indent > col {
                continue;
            }
            scalar_of = None;
        }
        if blank && quote.is_none() {
            continue;
        }
        let mut pos = 0;
        if quote.is_none() && flow == 0 {
            if bytes[indent] == b'#' {
                continue;
            }
            while indents.last().is_some_and(|c| *c > indent) {
                indents.pop();
            }
            if indents.last() != Some(&indent) {
                indents.push(indent);
            }
            pos = indent;
            // Compact nested sequences: `- - - x`.
            let mut dashes = 0;
            while bytes.get(pos) == Some(&b'-')
                && bytes.get(pos + 1).is_none_or(|b| *b == b' ' || *b == b'\t')
            {
                dashes += 1;
                pos += 1;
                while bytes.get(pos).is_some_and(|b| *b == b' ' || *b == b'\t') {
                    pos += 1;
                }
            }
            if indents.len() + dashes > max {
                return Some(i + 1);
            }
        }
        // The rest of the line: quotes, flow brackets, comments, a block scalar indicator.
        let mut last_token = 0u8;
        while pos < bytes.len() {
            let b = bytes[pos];
            match quote {
                Some(q) => {
                    if b == q {
                        // '' inside a single-quoted scalar is an escaped quote.
                        if q == b'\'' && bytes.get(pos + 1) == Some(&b'\'') {
                            pos += 1;
                        } else {
                            quote = None;
                        }
                    } else if q == b'"' && b == b'\\' {
                        pos += 1;
                    }
                }
                None => match b {
                    b'"' | b'\'' if starts_token(bytes, pos, flow) => quote = Some(b),
                    b'#' if pos == 0 || bytes[pos - 1] == b' ' || bytes[pos - 1] == b'\t' => break,
                    b'[' | b'{' if flow > 0 || starts_token(bytes, pos, flow) => {
                        flow += 1;
                        if indents.len() + flow > max {
                            return Some(i + 1);
                        }
                    }
                    b']' | b'}' if flow > 0 => flow -= 1,
                    _ => {}
                },
            }
            if !b.is_ascii_whitespace() {
                last_token = b;
            }
            pos += 1;
        }
        // `key: |` / `key: >-` / `- |2`: the next, more indented lines are the scalar's.
        if quote.is_none() && flow == 0 && last_token != 0 {
            let t = line.split(" #").next().unwrap_or(line).trim_end();
            let indicator = t
                .trim_end_matches(|c: char| c.is_ascii_digit() || c == '-' || c == '+')
                .trim_end();
            if (indicator.ends_with('|') || indicator.ends_with('>'))
                && (indicator.len() == 1
                    || indicator[..indicator.len() - 1].ends_with([' ', ':', '-']))
            {
                scalar_of = Some(indent);
            }
        }
    }
    None
}

/// `true` when the character at `pos` begins a YAML token (after indentation, `: `, `- `,
/// `? `, or inside a flow collection after `[`, `{`, `,` or a space), so a quote or a
/// bracket there opens a quoted scalar or a flow collection, not plain text.
fn starts_token(bytes: &[u8], pos: usize, flow: usize) -> bool {
    let before = bytes[..pos]
        .iter()
        .rev()
        .find(|b| **b != b' ' && **b != b'\t');
    match before {
        None => true,
        Some(b':' | b'-' | b'?') => pos > 0 && (bytes[pos - 1] == b' ' || bytes[pos - 1] == b'\t'),
        // Only inside a flow collection do these separate tokens.
        Some(b'[' | b'{' | b',') => flow > 0,
        _ => false,
    }
}

fn check_seconds(v: f64) -> Result<(), String> {
    if !v.is_finite() || v <= 0.0 {
        Err(format!("must be a positive number of seconds, got {v}"))
    } else if v > 1.0e9 {
        Err(format!("{v} seconds is too large"))
    } else {
        Ok(())
    }
}

/// The first line where `key` appears as a YAML key or value, for error messages.
fn find_line(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let t = l.trim_start().trim_start_matches("- ");
            t.starts_with(&format!("{key}:")) || l.contains(key)
        })
        .map(|i| i + 1)
}

fn yaml_error(e: serde_yaml_ng::Error, text: &str, file: &Path) -> ConfigError {
    let line = e.location().map(|l| l.line());
    let msg = e.to_string();
    // serde_yaml_ng prefixes the path of the offending field ("upstreams[0]: ...").
    let (mut field, rest) = match msg.split_once(": ") {
        Some((path, rest)) if !path.contains(' ') && !path.is_empty() => {
            (Some(path.to_string()), rest.to_string())
        }
        _ => (None, msg.clone()),
    };
    // Unknown fields: name the field itself.
    if let Some(start) = rest.find("unknown field `") {
        let tail = &rest[start + "unknown field `".len()..];
        if let Some(end) = tail.find('`') {
            let name = &tail[..end];
            field = Some(match field {
                Some(p) if p != "." => format!("{p}.{name}"),
                _ => name.to_string(),
            });
        }
    }
    let line = line.or_else(|| {
        field
            .as_deref()
            .and_then(|f| find_line(text, f.rsplit('.').next().unwrap_or(f)))
    });
    // Strip the trailing " at line N column M" the parser adds; we print the line ourselves.
    let message = match rest.find(" at line ") {
        Some(i) => rest[..i].to_string(),
        None => rest,
    };
    ConfigError {
        file: file.to_path_buf(),
        field,
        line,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<GatewayConfig, ConfigError> {
        GatewayConfig::from_yaml(text, Path::new("test.yml"))
    }

    #[test]
    fn nesting_is_measured_before_parsing() {
        let flow = |n: usize| format!("listen: {}{}\n", "[".repeat(n), "]".repeat(n));
        assert_eq!(nesting_exceeds(&flow(100), MAX_CONFIG_DEPTH), None);
        assert_eq!(nesting_exceeds(&flow(200), MAX_CONFIG_DEPTH), Some(1));
        let dashes = format!("upstreams:\n{}x\n", "- ".repeat(200));
        assert_eq!(nesting_exceeds(&dashes, MAX_CONFIG_DEPTH), Some(2));
        let mut block = String::new();
        for i in 0..200 {
            block.push_str(&format!("{}k{i}:\n", " ".repeat(i)));
        }
        assert!(nesting_exceeds(&block, MAX_CONFIG_DEPTH).is_some());
        // Brackets in quotes, comments, plain text and block scalars are not nesting.
        let text = format!(
            "a: \"{0}\"\nb: '{0}'\n# {0}\nc: x{0}\nd: |\n  {0}\n  {{{{{{\ne: >-\n   {0}\nf: [1, {{g: \"]]\"}}]\n",
            "[".repeat(300)
        );
        assert_eq!(nesting_exceeds(&text, MAX_CONFIG_DEPTH), None, "{text}");
        // The embedded default and a realistic config are shallow.
        assert_eq!(nesting_exceeds(EMBEDDED_DEFAULT, 4), None);
        // An 80,000-deep file is refused at once, before the parser sees it.
        let started = std::time::Instant::now();
        let e = load(&flow(80_000)).unwrap_err();
        assert!(e.message.contains("nested more than 128"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let e = load(&"#".repeat(MAX_CONFIG_BYTES + 1)).unwrap_err();
        assert!(e.message.contains("16 MiB"), "{e}");
    }

    #[test]
    fn limits_name_the_field() {
        let cases = [
            ("workers: 1025\n", "workers"),
            ("health_check_interval: 0.005\n", "health_check_interval"),
            (
                "health_check_interval: 1\nhealth_check_jitter: 1.5\n",
                "health_check_jitter",
            ),
            ("storage: {ping_interval: 0.001}\n", "storage.ping_interval"),
            ("upstream_admin: true\n", "upstream_admin"),
            (
                "upstream_admin_allow: [10.0.0.0/8, nope]\n",
                "upstream_admin_allow[1]",
            ),
            (
                "upstreams:\n  - {url: \"http://127.0.0.1:99999\"}\n",
                "upstreams[0].url",
            ),
            (
                "upstreams:\n  - {url: \"http://u:p@127.0.0.1:1\"}\n",
                "upstreams[0].url",
            ),
            ("fallback: {url: \"http://127.0.0.1:0\"}\n", "fallback.url"),
        ];
        for (text, field) in cases {
            let e = load(text).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field), "{text:?} -> {e}");
        }
        let ok = load(
            "workers: 1024\nhealth_check_interval: 0.01\nhealth_check_jitter: 0.01\nupstream_admin: true\nui: {username: a, password: b}\nupstream_admin_allow: [10.0.0.0/8, \"::1\", 127.0.0.1]\n",
        )
        .unwrap();
        let allow = ok.admin_allowlist().unwrap();
        assert!(allow.contains("127.0.0.1".parse().unwrap()));
        assert!(!allow.contains("127.0.0.2".parse().unwrap()));
    }

    #[test]
    fn embedded_default_loads() {
        let cfg = load(&embedded_default([9001, 9002])).unwrap();
        assert_eq!(cfg.upstreams.len(), 2);
        assert_eq!(cfg.endpoints["/work"].capacity, Some(8));
    }

    #[test]
    fn issue_example_loads() {
        let text = "listen: 127.0.0.1:8080\nupstream_timeout: 30\nstorage: {type: redis, url: redis://127.0.0.1:6379}\nupstreams:\n  - {url: http://127.0.0.1:9001, primary: true}\n  - {url: http://127.0.0.1:9002}\nrouting_strategy: p2c\nhealth_endpoint: /healthz\nhealth_check_interval: 1\nhealth_check_timeout: 1\nfailure_threshold: 3\nrecovery_threshold: 2\nqueue_timeout: 30\nendpoints:\n  /work: {method: POST, capacity: 8, queue_timeout: 5}\n";
        let cfg = load(text).unwrap();
        assert_eq!(cfg.storage.kind, StorageType::Redis);
        assert_eq!(cfg.routing_strategy, RoutingStrategy::P2c);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cases = [
            ("listen: 127.0.0.1:8080\nbogus: 1\n", "bogus", Some(2)),
            ("upstream_timeout: fast\n", "upstream_timeout", Some(1)),
            (
                "upstreams:\n  - {url: \"not a url\"}\n",
                "upstreams[0].url",
                Some(2),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\n  - {url: http://a:1/}\n",
                "upstreams[1].url",
                Some(3),
            ),
            (
                "endpoints:\n  /w: {capacity: 0}\n",
                "endpoints./w.capacity",
                Some(2),
            ),
            (
                "endpoints:\n  /w: {capacity: -3}\n",
                "endpoints./w.capacity",
                Some(2),
            ),
            (
                "health_check_interval: 0\n",
                "health_check_interval",
                Some(1),
            ),
            ("queue_timeout: -1\n", "queue_timeout", Some(1)),
            (
                "upstreams:\n  - {url: http://a:1}\non_client_cancel: sometimes\n",
                "on_client_cancel",
                Some(3),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\nclient_cancel_hold_timeout: 0\n",
                "client_cancel_hold_timeout",
                Some(3),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\nclient_body_timeout: 0\n",
                "client_body_timeout",
                Some(3),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\nupstream_body_timeout: -2\n",
                "upstream_body_timeout",
                Some(3),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\nupstream_idle_timeout: .nan\n",
                "upstream_idle_timeout",
                Some(3),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\nupstream_max_idle: -1\n",
                "upstream_max_idle",
                Some(3),
            ),
            (
                "upstreams:\n  - {url: http://a:1, weight: 3}\n",
                "upstreams[0].weight",
                Some(2),
            ),
        ];
        for (text, field, line) in cases {
            let e = load(text).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field), "{text:?} -> {e}");
            assert_eq!(e.line, line, "{text:?} -> {e}");
            assert!(e.to_string().contains("test.yml"), "{e}");
        }
        let e = load("listen: [\n").unwrap_err();
        assert!(e.line.is_some(), "{e}");
    }
}
