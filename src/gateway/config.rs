//! The gateway's YAML configuration.
//!
//! Field names follow the Python fastapi-balancer's `balancer.yml` where they overlap, so its
//! users can bring their file. Durations are seconds (integer or float). Every field is
//! documented in the README's config reference.
//!
//! [`GatewayConfig`] composes the crates' own configs, flattened into one flat YAML mapping:
//! [`portcullis_balance::Config`] (`upstreams`, `routing_strategy`, health checks, ejection),
//! [`portcullis_admission::Config`] (`queue_timeout`, `max_queue`, `endpoints`) and
//! [`ProbeConfig`] (`probe_on_startup`, the probe's thresholds); `storage` and `fallback` are
//! the Redis and breaker crates' sections. Each crate validates its own config; the gateway
//! adds the rules that span them and names the field by its path from the top.
//!
//! Loading never panics: a bad file is reported as a [`ConfigError`] that names the file, the
//! field and, where the parser knows it, the line. The gateway exits with status 2 on it.

mod compat;
mod env;
mod operate;
mod pools;
mod sections;

pub use env::{Environment, IGNORED_VARIABLES};

pub use operate::{AccessLogConfig, AccessLogFormat, AdminConfig, TlsConfig, UpstreamTlsConfig};

pub use pools::{PoolConfig, DEFAULT_POOL};

pub use super::routes::RouteConfig;

use super::proxy::Upstream;
use super::upstream_url::{parse_cidr, AdminAllowlist};
use portcullis_core::ConfigError as FieldError;
use portcullis_probe::ProbeConfig;
use serde::Deserialize;
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

impl ConfigError {
    /// The error of `file` for a field refused by a check that has no text to look the
    /// line up in ([`GatewayConfig::check_servable`]).
    pub fn from_field(file: &Path, e: FieldError) -> Self {
        Self {
            file: file.to_path_buf(),
            field: Some(e.field),
            line: None,
            message: e.message,
        }
    }

    /// The error for a field refused by a `validate()` of `text`, read from `file`: the line
    /// is where the text shows the field's path.
    fn at_field(e: FieldError, text: &str, file: &Path) -> Self {
        Self {
            file: file.to_path_buf(),
            line: find_path_line(text, &e.field),
            field: Some(e.field),
            message: e.message,
        }
    }
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

pub use portcullis_admission::{EndpointConfig, OnClientCancel};
pub use portcullis_balance::{RetryConfig, RetryOn, RoutingStrategy, UpstreamConfig};
pub use portcullis_breaker::Config as FallbackConfig;
pub use portcullis_dashboard::UiConfig;
pub use portcullis_health::HealthServerConfig;
pub use portcullis_redis::{OnError, StorageConfig, StorageType};

/// The whole gateway configuration: its own settings, and the crates' configs flattened
/// into the same top-level mapping (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Address to listen on.
    pub listen: String,
    /// Time allowed for an upstream's response headers (504 after).
    #[serde(with = "portcullis_core::seconds")]
    pub upstream_timeout: Duration,
    /// Time allowed to open a connection to an upstream (502 after).
    #[serde(with = "portcullis_core::seconds")]
    pub connect_timeout: Duration,
    /// Time in-flight requests get to finish on SIGINT/SIGTERM.
    #[serde(with = "portcullis_core::seconds")]
    pub drain_timeout: Duration,
    /// Serving threads, each with its own runtime and `SO_REUSEPORT` listener (0 = one per
    /// core).
    pub workers: usize,
    /// Where admission counters live.
    pub storage: StorageConfig,
    /// The balancer: `upstreams`, `routing_strategy`, the health checks and passive
    /// ejection (top-level keys).
    #[serde(flatten)]
    pub balance: portcullis_balance::Config,
    /// Admission control: `queue_timeout`, `max_queue` and the watched `endpoints`
    /// (top-level keys).
    #[serde(flatten)]
    pub admission: portcullis_admission::Config,
    /// Capacity of a watched endpoint with no `capacity` while it is not probed.
    pub default_capacity: i64,
    /// Capacity probing: `probe_on_startup`, `force_reprobe` and the probe's thresholds
    /// (top-level keys).
    #[serde(flatten)]
    pub probe: ProbeConfig,
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
    /// Time a client may pause between two reads of its request body (408
    /// `client_timeout` after it).
    #[serde(with = "portcullis_core::seconds")]
    pub client_body_timeout: Duration,
    /// Time an upstream may pause between two reads of its response body (the body is cut
    /// off after it and the slots it held are freed).
    #[serde(with = "portcullis_core::seconds")]
    pub upstream_body_timeout: Duration,
    /// Idle keep-alive connections kept per upstream (per serving thread).
    pub upstream_max_idle: usize,
    /// Time an idle upstream keep-alive connection is kept.
    #[serde(with = "portcullis_core::seconds")]
    pub upstream_idle_timeout: Duration,
    /// Time a client has to send a complete HTTP/1 request head, counted from the
    /// connection's accept or from its first byte after an idle keep-alive pause (408
    /// `client_timeout` and close after it).
    #[serde(with = "portcullis_core::seconds")]
    pub client_header_timeout: Duration,
    /// Time a client connection may stay open with no request in flight (HTTP/1 keep-alive
    /// or HTTP/2 with no open stream) before the gateway closes it.
    #[serde(with = "portcullis_core::seconds")]
    pub client_idle_timeout: Duration,
    /// Client connections served at once by this process (0 = unlimited); beyond it the
    /// gateway stops accepting and new connections wait in the kernel's accept backlog.
    pub max_connections: usize,
    /// `hold` (default): a watched request whose client goes away keeps its slot while its
    /// upstream request runs to its end in the background; `release`: free the slot at once.
    pub on_client_cancel: OnClientCancel,
    /// How long a held request may run on after its client went away before it is dropped
    /// and its slot freed; absent = `connect_timeout + upstream_timeout +
    /// upstream_body_timeout`.
    #[serde(with = "portcullis_core::seconds::option")]
    pub client_cancel_hold_timeout: Option<Duration>,
    /// The admin listener: the operator routes on an address of their own.
    pub admin: AdminConfig,
    /// TLS termination on the listener (absent: plain HTTP).
    pub tls: Option<TlsConfig>,
    /// How `https://` upstreams are reached (absent: the system roots, no client
    /// certificate, the URL's host as the server name).
    pub upstream_tls: Option<UpstreamTlsConfig>,
    /// Reach the upstreams over HTTP/2 with prior knowledge (h2c) for every proxied
    /// request, HTTP/1.1 or HTTP/2 from the client, and run the HTTP health check over h2c
    /// too; `false` (default): HTTP/1.1. gRPC requests go over h2c either way. `http://`
    /// upstreams only: an `https://` upstream with `http2: true` is refused.
    pub http2: bool,
    /// One line per request (off by default).
    pub access_log: AccessLogConfig,
    /// The log filter, as `RUST_LOG` takes it (`info`, `warn,portcullis=debug`); absent:
    /// `RUST_LOG`, else `info`. A reload applies a change at once (through the hook the
    /// process installed with [`Gateway::set_log_filter_hook`](super::Gateway::set_log_filter_hook)).
    pub log_level: Option<String>,
    /// Retries on another replica: of requests that were never sent (always), and of
    /// buffered idempotent requests after a 502/503 (`on: [5xx]`), within a budget.
    pub retry: RetryConfig,
    /// Named upstream pools besides `default` (the top-level `upstreams` and settings), by
    /// name (lowercase letters, digits, `-`, `_`).
    pub pools: BTreeMap<String, PoolConfig>,
    /// Which pool serves a request: matched in order, first match wins; a request that
    /// matches none goes to `default`.
    pub routes: Vec<RouteConfig>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            upstream_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(30),
            workers: 0,
            storage: StorageConfig::default(),
            balance: portcullis_balance::Config::default(),
            admission: portcullis_admission::Config::default(),
            default_capacity: 64,
            probe: ProbeConfig::default(),
            fallback: None,
            ui: UiConfig::default(),
            health_server: HealthServerConfig::default(),
            upstream_admin: false,
            upstream_admin_allow: None,
            client_body_timeout: Duration::from_secs(60),
            upstream_body_timeout: Duration::from_secs(60),
            upstream_max_idle: 64,
            upstream_idle_timeout: Duration::from_secs(60),
            client_header_timeout: Duration::from_secs(10),
            client_idle_timeout: Duration::from_secs(75),
            max_connections: 10_000,
            on_client_cancel: OnClientCancel::Hold,
            client_cancel_hold_timeout: None,
            admin: AdminConfig::default(),
            tls: None,
            upstream_tls: None,
            http2: false,
            access_log: AccessLogConfig::default(),
            log_level: None,
            retry: RetryConfig::default(),
            pools: BTreeMap::new(),
            routes: Vec::new(),
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
    ///
    /// A config without upstreams is valid here (the `bench` command needs none); whether
    /// the gateway can serve it is [`check_servable`](Self::check_servable).
    ///
    /// The process's environment applies: `${VAR}` expansion and `PORTCULLIS_*` overrides
    /// (see [`from_yaml_with_env`](Self::from_yaml_with_env)).
    pub fn from_yaml(text: &str, file: &Path) -> Result<Self, ConfigError> {
        Self::from_yaml_with_env(text, file, &Environment::from_process())
    }

    /// [`from_yaml`](Self::from_yaml) with the variables of `env` instead of the process's:
    /// `${VAR}` and `${VAR:-default}` in the text are expanded, the older schema's field
    /// names are read as deprecated aliases (a warning is logged for each), and each
    /// `PORTCULLIS_<FIELD>` variable overrides its field (`__` between nested keys) before
    /// the typed read and the checks, so an override is refused like a bad field, naming
    /// the variable. Secrets (`ui.password`, the password of `storage.url`) are masked in
    /// every error message.
    pub fn from_yaml_with_env(
        text: &str,
        file: &Path,
        env: &Environment,
    ) -> Result<Self, ConfigError> {
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
        let prepared = env::prepare(text, env, file)?;
        let read = &*prepared.text;
        let cfg: GatewayConfig = if read.trim().is_empty() {
            GatewayConfig::default()
        } else {
            sections::from_yaml(read)
                .map_err(|e| prepared.locate(yaml_error(e, read, file), text))?
        };
        cfg.validate()
            .map_err(|e| prepared.locate(ConfigError::at_field(e, text, file), text))?;
        Ok(cfg)
    }

    /// What [`Gateway::build`](super::Gateway::build) refuses beyond [`from_yaml`]'s
    /// checks: a config with no upstreams (an empty file is one). `--check` runs it too.
    ///
    /// [`from_yaml`]: Self::from_yaml
    pub fn check_servable(&self) -> Result<(), FieldError> {
        if self.balance.upstreams.is_empty() {
            return Err(FieldError::new(
                "upstreams",
                "at least one upstream is needed to serve (upstreams: [{url: \"http://host:port\"}])",
            ));
        }
        Ok(())
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
        self.balance
            .upstreams
            .iter()
            .filter_map(|u| Upstream::parse(&u.url).ok().map(|p| (p, u.primary)))
            .collect()
    }

    /// The number of serving threads: `workers`, or one per core when 0.
    pub fn worker_threads(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map_or(1, usize::from)
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
        self.client_cancel_hold_timeout
            .unwrap_or(self.connect_timeout + self.upstream_timeout + self.upstream_body_timeout)
    }

    /// `upstream_timeout`.
    pub fn upstream_timeout(&self) -> Duration {
        self.upstream_timeout
    }

    /// Checks the gateway's own fields, each crate's config (its errors prefixed with the
    /// section it sits under) and the rules that span them. Field paths are from the top.
    fn validate(&self) -> Result<(), FieldError> {
        if self.listen.parse::<SocketAddr>().is_err() {
            return Err(FieldError::new(
                "listen",
                format!("`{}` is not an address like 127.0.0.1:8080", self.listen),
            ));
        }
        let positive = [
            ("upstream_timeout", self.upstream_timeout),
            ("connect_timeout", self.connect_timeout),
            ("drain_timeout", self.drain_timeout),
            ("client_body_timeout", self.client_body_timeout),
            ("upstream_body_timeout", self.upstream_body_timeout),
            ("upstream_idle_timeout", self.upstream_idle_timeout),
            ("client_header_timeout", self.client_header_timeout),
            ("client_idle_timeout", self.client_idle_timeout),
        ];
        for (name, v) in positive {
            FieldError::require_positive(name, v)?;
        }
        if let Some(v) = self.client_cancel_hold_timeout {
            FieldError::require_positive("client_cancel_hold_timeout", v)?;
        }
        if self.workers > MAX_WORKERS {
            return Err(FieldError::new(
                "workers",
                format!(
                    "must be 0 (one per core) or 1..={MAX_WORKERS}, got {}",
                    self.workers
                ),
            ));
        }
        if self.upstream_admin && self.ui.credentials().is_none() {
            return Err(FieldError::new(
                "upstream_admin",
                "needs ui.username and ui.password: without them anyone who reaches the gateway could change where its traffic goes",
            ));
        }
        for (i, cidr) in self.upstream_admin_allow.iter().flatten().enumerate() {
            parse_cidr(cidr)
                .map_err(|m| FieldError::new(format!("upstream_admin_allow[{i}]"), m))?;
        }
        if self.default_capacity <= 0 {
            return Err(FieldError::new(
                "default_capacity",
                format!("must be at least 1, got {}", self.default_capacity),
            ));
        }
        check_pool("", &self.balance, self.fallback.as_ref(), self.http2)?;
        self.check_pools()?;
        self.admission.validate()?;
        // `default_capacity` is the initial limit of the adaptive endpoints without one.
        for (path, ep) in &self.admission.endpoints {
            if let (None, Some(a)) = (ep.capacity, self.admission.adaptive_for(ep)) {
                portcullis_admission::config::check_within_bounds(
                    "default_capacity",
                    self.default_capacity as usize,
                    a,
                )
                .map_err(|e| {
                    FieldError::new(e.field, format!("{} (endpoint {path})", e.message))
                })?;
            }
        }
        for (path, ep) in &self.admission.endpoints {
            if ep.capacity.is_none() && self.probe.probe_on_startup && ep.probe_path(path).is_none()
            {
                return Err(FieldError::new(
                    format!("endpoints.{path}.probe_path"),
                    "a prefix pattern without `capacity` needs `probe_path` (a concrete path under it) to be probed at startup",
                ));
            }
        }
        self.storage.validate().map_err(|e| e.within("storage"))?;
        self.admin.validate(
            &self.listen,
            &self.state_changing_routes(),
            self.ui.credentials().is_some(),
        )?;
        if let Some(tls) = &self.tls {
            tls.validate()?;
        }
        if let Some(tls) = &self.upstream_tls {
            tls.validate()?;
        }
        self.access_log.validate()?;
        if let Some(level) = &self.log_level {
            tracing_subscriber::EnvFilter::try_new(level).map_err(|e| {
                FieldError::new(
                    "log_level",
                    format!(
                        "`{level}` is not a log filter like `info` or `warn,portcullis=debug`: {e}"
                    ),
                )
            })?;
        }
        self.retry.validate().map_err(|e| e.within("retry"))?;
        self.probe.validate()
    }

    /// The named pools (`pools:`) and the routes to them: each pool checked like the
    /// top-level one, its fields named `pools.<name>.<field>`; each route names a pool that
    /// exists (`routes[1].pool`).
    fn check_pools(&self) -> Result<(), FieldError> {
        if self.pools.contains_key(DEFAULT_POOL) {
            return Err(FieldError::new(
                format!("pools.{DEFAULT_POOL}"),
                "`default` is the pool of the top-level `upstreams` and settings: set them at the top level, or give this pool another name",
            ));
        }
        for (name, pool) in &self.pools {
            let at = format!("pools.{name}");
            if !pools::is_pool_name(name) {
                return Err(FieldError::new(
                    at,
                    format!("`{name}` is not a pool name: lowercase letters, digits, `-` and `_`, starting with a letter or digit"),
                ));
            }
            if pool.balance.upstreams.is_empty() {
                return Err(FieldError::new(
                    format!("{at}.upstreams"),
                    "a pool needs at least one upstream (upstreams: [{url: \"http://host:port\"}])",
                ));
            }
            check_pool(&at, &pool.balance, pool.fallback.as_ref(), pool.http2)?;
            if let Some(retry) = &pool.retry {
                retry
                    .validate()
                    .map_err(|e| e.within(&format!("{at}.retry")))?;
            }
        }
        super::routes::RouteTable::new(&self.routes, &self.pool_names())?;
        Ok(())
    }

    /// The pool names, `default` first, then the named pools in name order: the order of
    /// [`pool_configs`](Self::pool_configs).
    pub fn pool_names(&self) -> Vec<&str> {
        std::iter::once(DEFAULT_POOL)
            .chain(self.pools.keys().map(String::as_str))
            .collect()
    }

    /// Every pool with its settings resolved, in the order of
    /// [`pool_names`](Self::pool_names): `default` from the top-level fields, then each
    /// named pool, its `retry` the top-level one unless it has its own, its
    /// `grpc_failure_codes` the top-level one.
    pub fn pool_configs(&self) -> Vec<(String, PoolConfig)> {
        let default = PoolConfig {
            balance: self.balance.clone(),
            fallback: self.fallback.clone(),
            http2: self.http2,
            retry: Some(self.retry.clone()),
        };
        std::iter::once((DEFAULT_POOL.to_owned(), default))
            .chain(self.pools.iter().map(|(name, pool)| {
                let mut pool = pool.clone();
                pool.balance.grpc_failure_codes = self.balance.grpc_failure_codes;
                pool.retry.get_or_insert_with(|| self.retry.clone());
                (name.clone(), pool)
            }))
            .collect()
    }

    /// The route table of `routes` over [`pool_names`](Self::pool_names) (validated at
    /// load; a config built in code that skipped validation gets its error here).
    pub fn route_table(&self) -> Result<super::routes::RouteTable, FieldError> {
        super::routes::RouteTable::new(&self.routes, &self.pool_names())
    }

    /// The state-changing operator routes this config serves.
    fn state_changing_routes(&self) -> Vec<&'static str> {
        let mut routes = Vec::new();
        // Any pool's breaker can be checked (`?pool=`).
        if self.fallback.is_some() || self.pools.values().any(|p| p.fallback.is_some()) {
            routes.push("POST /balancer/fallback/check");
        }
        if self.upstream_admin {
            routes.push("POST/DELETE /balancer/upstreams");
        }
        routes
    }
}

/// Checks one pool's balancer, upstream URLs and fallback; `at` is where the pool sits
/// (`pools.gpu`, or empty for the top-level pool `default`), and prefixes every field.
fn check_pool(
    at: &str,
    balance: &portcullis_balance::Config,
    fallback: Option<&FallbackConfig>,
    http2: bool,
) -> Result<(), FieldError> {
    let within = |e: FieldError| match at {
        "" => e,
        at => e.within(at),
    };
    balance.validate().map_err(within)?;
    let mut seen = HashSet::new();
    for (i, u) in balance.upstreams.iter().enumerate() {
        let field = format!("upstreams[{i}].url");
        let parsed = Upstream::parse(&u.url).map_err(|e| within(FieldError::new(&field, e.0)))?;
        if parsed.url().starts_with("https://")
            && balance.health_check.kind == portcullis_balance::HealthCheckKind::Grpc
        {
            return Err(within(FieldError::new(
                field,
                "an https:// upstream with `health_check: {kind: grpc}`: the gRPC health check and gRPC proxying speak h2c (cleartext HTTP/2) only",
            )));
        }
        if http2 && parsed.url().starts_with("https://") {
            return Err(within(FieldError::new(
                "http2",
                format!(
                    "`http2: true` with the https:// upstream `{}` (upstreams[{i}]): HTTP/2 to the upstreams is h2c (cleartext, prior knowledge) only, not h2 over TLS",
                    parsed.url()
                ),
            )));
        }
        if !seen.insert(parsed.url().to_string()) {
            return Err(within(FieldError::new(
                field,
                format!("duplicate upstream `{}`", parsed.url()),
            )));
        }
    }
    if let Some(f) = fallback {
        f.validate().map_err(|e| within(e.within("fallback")))?;
        if let Some(url) = &f.url {
            let parsed =
                Upstream::parse(url).map_err(|e| within(FieldError::new("fallback.url", e.0)))?;
            if http2 && parsed.url().starts_with("https://") {
                return Err(within(FieldError::new(
                    "http2",
                    format!(
                        "`http2: true` with the https:// fallback `{}`: HTTP/2 to the upstreams is h2c (cleartext, prior knowledge) only, not h2 over TLS",
                        parsed.url()
                    ),
                )));
            }
        }
    }
    Ok(())
}

/// The largest config file read, in bytes (16 MiB).
pub const MAX_CONFIG_BYTES: usize = 16 << 20;

/// The deepest YAML nesting accepted (collections inside collections).
pub const MAX_CONFIG_DEPTH: usize = 128;

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

/// The line of the field at `path` (`upstreams[1].url`, `endpoints./w.capacity`,
/// `storage.url`), for error messages: the first key at the top level (else the first line
/// that shows it), each later key on or after its parent's line, each `[i]` the i-th `- `
/// entry after its parent. A part the text does not show (a default, a flow sequence)
/// leaves the parent's line.
fn find_path_line(text: &str, path: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut at: Option<usize> = None;
    let mut rest = path;
    while !rest.is_empty() {
        let (part, index, tail) = split_path(rest);
        rest = tail;
        if !part.is_empty() {
            let from = at.unwrap_or(0);
            let top_level = |l: &&str| {
                l.strip_prefix(part)
                    .is_some_and(|r| r.trim_start().starts_with(':'))
            };
            let hit = match at {
                None => lines.iter().position(top_level),
                Some(_) => None,
            }
            .or_else(|| {
                lines[from..]
                    .iter()
                    .position(|l| l.contains(part))
                    .map(|i| from + i)
            });
            if hit.is_some() {
                at = hit;
            }
        }
        if let (Some(i), Some(from)) = (index, at) {
            let entry = lines[from + 1..]
                .iter()
                .enumerate()
                .filter(|(_, l)| l.trim_start().starts_with("- ") || l.trim() == "-")
                .nth(i);
            if let Some((offset, _)) = entry {
                at = Some(from + 1 + offset);
            }
        }
    }
    at.map(|i| i + 1)
}

/// The first part of a field path: its key, the index that follows it (`upstreams[1]`)
/// and the rest after the next `.`.
fn split_path(path: &str) -> (&str, Option<usize>, &str) {
    let end = path.find(['.', '[']).unwrap_or(path.len());
    let key = &path[..end];
    let mut rest = &path[end..];
    let mut index = None;
    if let Some(inner) = rest.strip_prefix('[') {
        if let Some(close) = inner.find(']') {
            index = inner[..close].parse().ok();
            rest = &inner[close + 1..];
        }
    }
    (key, index, rest.strip_prefix('.').unwrap_or(rest))
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
    let mut unknown_key = false;
    if let Some(start) = rest.find("unknown field `") {
        let tail = &rest[start + "unknown field `".len()..];
        if let Some(end) = tail.find('`') {
            let name = &tail[..end];
            unknown_key = true;
            field = Some(match field {
                Some(p) if p != "." => format!("{p}.{name}"),
                _ => name.to_string(),
            });
        }
    }
    // An unknown key is reported at the position of its mapping (a top-level one once the
    // whole mapping was read, since the sections are flattened; a pool's once the pool's
    // mapping was): look the key up instead.
    let line = match unknown_key {
        true => field
            .as_deref()
            .and_then(|f| find_path_line(text, f))
            .or(line),
        false => line.or_else(|| field.as_deref().and_then(|f| find_path_line(text, f))),
    };
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
    fn field_paths_find_their_line() {
        let text = "listen: 127.0.0.1:1\nupstreams:\n  - url: http://a:1\n  - url: http://b:1\nfallback:\n  failure_threshold: 2\nfailure_threshold: 0\nendpoints:\n  /a: {}\n  /b:\n    capacity: 0\n";
        for (path, line) in [
            ("listen", 1),
            ("upstreams[0].url", 3),
            ("upstreams[1].url", 4),
            ("fallback.failure_threshold", 6),
            ("failure_threshold", 7),
            ("endpoints./b.capacity", 11),
            ("upstream_admin_allow[1]", 0),
        ] {
            assert_eq!(find_path_line(text, path).unwrap_or(0), line, "{path}");
        }
        assert_eq!(split_path("a[2].b.c"), ("a", Some(2), "b.c"));
        assert_eq!(
            split_path("endpoints./v1/*.probe_path"),
            ("endpoints", None, "/v1/*.probe_path")
        );
    }

    #[test]
    fn embedded_default_loads() {
        let cfg = load(&embedded_default([9001, 9002])).unwrap();
        assert_eq!(cfg.balance.upstreams.len(), 2);
        assert_eq!(cfg.admission.endpoints["/work"].capacity, Some(8));
    }

    #[test]
    fn hold_and_uneject_settings_load() {
        let base = "upstreams:\n  - {url: http://a:1}\n";
        let cfg = load(base).unwrap();
        assert!(!cfg.balance.uneject_on_active_check);
        assert_eq!(cfg.on_client_cancel, OnClientCancel::Hold);
        let cfg = load(&format!(
            "{base}uneject_on_active_check: true\non_client_cancel: release\n"
        ))
        .unwrap();
        assert!(cfg.balance.uneject_on_active_check);
        assert_eq!(cfg.on_client_cancel, OnClientCancel::Release);
    }

    #[test]
    fn environment_overrides_and_expansion() {
        let with = |text: &str, pairs: &[(&str, &str)]| {
            let env = Environment::from_pairs(pairs.iter().copied());
            GatewayConfig::from_yaml_with_env(text, Path::new("t.yml"), &env)
        };
        let text =
            "upstreams:\n  - {url: \"http://${HOST}:1\"}\nendpoints:\n  /work: {capacity: 8}\n";
        let cfg = with(
            text,
            &[
                ("HOST", "127.0.0.1"),
                ("PORTCULLIS_UPSTREAM_TIMEOUT", "7"),
                ("PORTCULLIS_ENDPOINTS__/work__CAPACITY", "3"),
                ("PORTCULLIS_STRATEGY", "weighted"),
            ],
        )
        .unwrap();
        assert_eq!(cfg.balance.upstreams[0].url, "http://127.0.0.1:1");
        assert_eq!(cfg.upstream_timeout, Duration::from_secs(7));
        assert_eq!(cfg.admission.endpoints["/work"].capacity, Some(3));
        assert_eq!(cfg.balance.routing_strategy, RoutingStrategy::Weighted);
        // A refused override names the variable and no line of the file.
        let e = with(
            text,
            &[("HOST", "h"), ("PORTCULLIS_UPSTREAM_TIMEOUT", "soon")],
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("upstream_timeout"), "{e}");
        assert!(e.message.contains("PORTCULLIS_UPSTREAM_TIMEOUT"), "{e}");
        assert_eq!(e.line, None, "{e}");
        // Other errors keep the field's line in the file, though the text was rewritten.
        let e = with(
            "upstreams: []\nfailure_threshold: 0\n",
            &[("PORTCULLIS_LISTEN", "127.0.0.1:9")],
        )
        .unwrap_err();
        assert_eq!(
            (e.field.as_deref(), e.line),
            (Some("failure_threshold"), Some(2))
        );
        let e = with("listen: 127.0.0.1:1\nstrategy: fastest\n", &[]).unwrap_err();
        assert_eq!(
            (e.field.as_deref(), e.line),
            (Some("strategy"), Some(2)),
            "{e}"
        );
        // Secrets are masked wherever they show.
        let e = with(
            "ui: {username: a, password: \"${PW}\"}\nlisten: \"${PW}\"\n",
            &[("PW", "hunter2")],
        )
        .unwrap_err();
        assert!(
            !e.to_string().contains("hunter2") && e.message.contains("***"),
            "{e}"
        );
        // No environment: the text is read as it is.
        assert_eq!(
            with(text, &[("HOST", "h")]).unwrap().upstream_timeout,
            Duration::from_secs(30)
        );
    }

    #[test]
    fn pools_and_routes_load_and_take_overrides() {
        let text = "upstreams:\n  - {url: http://a:1}\nretry: {max_attempts: 3}\ngrpc_failure_codes: [internal]\npools:\n  gpu:\n    upstreams: [{url: \"http://g:1\"}]\n    routing_strategy: least-connections\n    http2: true\n  cpu:\n    upstreams: [{url: \"http://c:1\"}]\n    retry: {max_attempts: 1}\nroutes:\n  - {prefix: /v1/chat/, pool: gpu}\n  - {path: /v1/embed, method: POST, pool: cpu}\n";
        let cfg = load(text).unwrap();
        assert_eq!(cfg.pool_names(), ["default", "cpu", "gpu"]);
        let pools = cfg.pool_configs();
        let (name, gpu) = &pools[2];
        assert_eq!(name, "gpu");
        assert!(gpu.http2);
        assert_eq!(
            gpu.balance.routing_strategy,
            RoutingStrategy::LeastConnections
        );
        assert_eq!(
            gpu.retry.as_ref().unwrap().max_attempts,
            3,
            "the top-level retry"
        );
        assert_eq!(
            gpu.balance.grpc_failure_codes, cfg.balance.grpc_failure_codes,
            "one set of codes for every pool"
        );
        assert_eq!(pools[1].1.retry.as_ref().unwrap().max_attempts, 1);
        assert_eq!(pools[0].1.balance.upstreams[0].url, "http://a:1");
        assert_eq!(cfg.route_table().unwrap().len(), 2);
        // Overrides reach a pool's fields, and a route's, as any nested field.
        let env = Environment::from_pairs([
            ("PORTCULLIS_POOLS__GPU__ROUTING_STRATEGY", "round-robin"),
            ("PORTCULLIS_ROUTES__1__POOL", "gpu"),
        ]);
        let cfg = GatewayConfig::from_yaml_with_env(text, Path::new("t.yml"), &env).unwrap();
        assert_eq!(
            cfg.pools["gpu"].balance.routing_strategy,
            RoutingStrategy::RoundRobin
        );
        assert_eq!(cfg.routes[1].pool, "gpu");
        let env = Environment::from_pairs([("PORTCULLIS_ROUTES__1__POOL", "tpu")]);
        let e = GatewayConfig::from_yaml_with_env(text, Path::new("t.yml"), &env).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("routes[1].pool"), "{e}");
        // No pools and no routes: the one pool `default`, as before.
        let cfg = load("upstreams:\n  - {url: http://a:1}\n").unwrap();
        assert_eq!(cfg.pool_names(), ["default"]);
        assert!(cfg.route_table().unwrap().is_empty());
    }

    #[test]
    fn storage_shorthands_load() {
        for (text, kind, url) in [
            ("storage: memory\n", StorageType::Memory, None),
            ("storage: null\n", StorageType::Memory, None),
            ("storage:\n", StorageType::Memory, None),
            (
                "storage: redis://127.0.0.1:6379\n",
                StorageType::Redis,
                Some("redis://127.0.0.1:6379"),
            ),
            (
                "storage: \"rediss://:pw@h:6380\"\n",
                StorageType::Redis,
                Some("rediss://:pw@h:6380"),
            ),
        ] {
            let cfg = load(text).unwrap();
            assert_eq!(cfg.storage.kind, kind, "{text}");
            assert_eq!(cfg.storage.url.as_deref(), url, "{text}");
        }
    }

    #[test]
    fn issue_example_loads() {
        let text = "listen: 127.0.0.1:8080\nupstream_timeout: 30\nstorage: {type: redis, url: redis://127.0.0.1:6379}\nupstreams:\n  - {url: http://127.0.0.1:9001, primary: true}\n  - {url: http://127.0.0.1:9002}\nrouting_strategy: p2c\nhealth_endpoint: /healthz\nhealth_check_interval: 1\nhealth_check_timeout: 1\nfailure_threshold: 3\nrecovery_threshold: 2\nqueue_timeout: 30\nendpoints:\n  /work: {method: POST, capacity: 8, queue_timeout: 5}\n";
        let cfg = load(text).unwrap();
        assert_eq!(cfg.storage.kind, StorageType::Redis);
        assert_eq!(cfg.balance.routing_strategy, RoutingStrategy::P2c);
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
                "upstreams:\n  - {url: http://a:1}\nuneject_on_active_check: maybe\n",
                "uneject_on_active_check",
                Some(3),
            ),
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
                "upstreams:\n  - {url: http://a:1, weight: 0}\n",
                "upstreams[0].weight",
                Some(2),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\n  - {url: http://b:1, weight: -1}\n",
                "upstreams[1].weight",
                Some(3),
            ),
            (
                "endpoints:\n  /w: {capacity: 50}\nadaptive: {max_capacity: 20}\n",
                "endpoints./w.capacity",
                Some(2),
            ),
            (
                "endpoints:\n  /w: {adaptive: {min_capacity: 0}}\n",
                "endpoints./w.adaptive.min_capacity",
                Some(2),
            ),
            ("adaptive: {algorithm: vegas}\n", "adaptive.algorithm", Some(1)),
            (
                "adaptive: {min_capacity: 8, max_capacity: 4}\n",
                "adaptive.max_capacity",
                Some(1),
            ),
            ("adaptive: {smoothing: 0}\n", "adaptive.smoothing", Some(1)),
            (
                "default_capacity: 64\nendpoints:\n  /w: {}\nadaptive: {max_capacity: 32}\n",
                "default_capacity",
                Some(1),
            ),
            ("upstreams: []\nrouting_strategy: fastest\n", "routing_strategy", Some(2)),
            (
                "upstreams: []\ngrpc_failure_codes: [UNAVAILABLE, BROKEN]\n",
                "grpc_failure_codes",
                Some(2),
            ),
            (
                "upstreams: []\ngrpc_failure_codes: [ok]\n",
                "grpc_failure_codes",
                Some(2),
            ),
            ("grpc_failure_codes: unavailable\n", "grpc_failure_codes", Some(1)),
            (
                "upstreams: []\nhonor_request_timeout: sometimes\n",
                "honor_request_timeout",
                Some(2),
            ),
            (
                "upstreams: []\nhealth_check: {kind: tcp}\n",
                "health_check.kind",
                Some(2),
            ),
            (
                "upstreams: []\nhealth_check: {service: pkg.Svc}\n",
                "health_check.service",
                Some(2),
            ),
            ("listen: 127.0.0.1:1\nstorage: redis\n", "storage", Some(2)),
            ("storage: \"http://h:1\"\n", "storage", Some(1)),
            ("storage: {type: redis, urll: \"redis://h:1\"}\n", "storage.urll", Some(1)),
            ("storage: \"redis://h:99999\"\n", "storage.url", Some(1)),
            (
                "listen: 127.0.0.1:1\nstrategy: p2c\nrouting_strategy: weighted\n",
                "strategy",
                Some(2),
            ),
            ("upstreams: []\nstrategy: fastest\n", "strategy", Some(2)),
            (
                "ui_username: a\nui: {username: b}\n",
                "ui_username",
                Some(1),
            ),
            (
                "ui: {password: x}\nui_password: y\n",
                "ui_password",
                Some(2),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\n  - {url: \"https://b:1\"}\nhealth_check: {kind: grpc}\n",
                "upstreams[1].url",
                Some(3),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\n  - {url: \"https://b:1\"}\nhttp2: true\n",
                "http2",
                Some(4),
            ),
            ("upstreams: []\nhttp2: yes please\n", "http2", Some(2)),
            (
                "upstreams:\n  - {url: http://a:1}\naccess_log: {enable: true, format: xml}\n",
                "access_log.format",
                Some(3),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\naccess_log: {path: /nonexistent/dir/a.log}\n",
                "access_log.path",
                Some(3),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\nlog_level: \"info,portcullis=loud\"\n",
                "log_level",
                Some(3),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\nadmin: {listen: \"127.0.0.1:99999\"}\n",
                "admin.listen",
                Some(3),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\ntls:\n  cert_file: /nonexistent/c.pem\n  key_file: /nonexistent/k.pem\n",
                "tls.cert_file",
                Some(4),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\ntls: {cert_file: c.pem}\n",
                "tls",
                Some(3),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\nupstream_tls:\n  ca_file: /nonexistent/ca.pem\n",
                "upstream_tls.ca_file",
                Some(4),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\nupstream_tls: {cert_file: c.pem}\n",
                "upstream_tls.key_file",
                Some(3),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\nupstream_tls: {server_name: \"not a name\"}\n",
                "upstream_tls.server_name",
                Some(3),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\nretry: {max_attempts: 0}\n",
                "retry.max_attempts",
                Some(3),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\nretry: {max_attempts: 11}\n",
                "retry.max_attempts",
                Some(3),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\nretry: {max_attempts: -1}\n",
                "retry.max_attempts",
                Some(3),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\nretry: {budget_percent: 150}\n",
                "retry.budget_percent",
                Some(3),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\nretry: {budget_percent: .nan}\n",
                "retry.budget_percent",
                Some(3),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\nretry:\n  min_retries_per_second: -1\n",
                "retry.min_retries_per_second",
                Some(4),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\nretry: {buffer_limit: 99999999999}\n",
                "retry.buffer_limit",
                Some(3),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\nretry: {on: [4xx]}\n",
                "retry.on[0]",
                Some(3),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\nretry: {on: [5xx, 5xx]}\n",
                "retry.on[1]",
                Some(3),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\nretry: {attempts: 3}\n",
                "retry.attempts",
                Some(3),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\npools:\n  gpu:\n    upstreams: [{url: \"http://g:1\"}]\nroutes:\n  - {prefix: /a, pool: gpu}\n  - {prefix: /b, pool: tpu}\n",
                "routes[1].pool",
                Some(8),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\nroutes:\n  - {path: /a, pool: default, strip_prefix: true}\n",
                "routes[0].strip_prefix",
                Some(4),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\nroutes:\n  - {prefix: a, pool: default}\n",
                "routes[0].prefix",
                Some(4),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\npools:\n  default:\n    upstreams: [{url: \"http://g:1\"}]\n",
                "pools.default",
                Some(4),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\npools:\n  GPU:\n    upstreams: [{url: \"http://g:1\"}]\n",
                "pools.GPU",
                Some(4),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\npools:\n  gpu: {upstreams: []}\n",
                "pools.gpu.upstreams",
                Some(4),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\npools:\n  gpu:\n    upstreams: [{url: \"http://g:1\"}]\n    routing_strategy: fastest\n",
                "pools.gpu.routing_strategy",
                Some(6),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\npools:\n  gpu:\n    upstreams: [{url: \"http://g:1\"}]\n    bogus: 1\n",
                "pools.gpu.bogus",
                Some(6),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\npools:\n  gpu:\n    upstreams: [{url: \"http://g:1\"}]\n    failure_threshold: 0\n",
                "pools.gpu.failure_threshold",
                Some(6),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\npools:\n  gpu:\n    upstreams:\n      - {url: \"http://g:1\"}\n      - {url: \"http://g:1/\"}\n",
                "pools.gpu.upstreams[1].url",
                Some(7),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\npools:\n  gpu:\n    upstreams:\n      - {url: \"https://g:1\"}\n    http2: true\n",
                "pools.gpu.http2",
                Some(7),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\npools:\n  gpu:\n    upstreams: [{url: \"http://g:1\"}]\n    fallback: {url: \"ftp://f:1\"}\n",
                "pools.gpu.fallback.url",
                Some(6),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\npools:\n  gpu:\n    upstreams: [{url: \"http://g:1\"}]\n    retry: {max_attempts: 0}\n",
                "pools.gpu.retry.max_attempts",
                Some(6),
            ),
            (
                "upstreams:\n  - {url: http://a:1}\npools:\n  gpu:\n    upstreams: [{url: \"http://g:1\"}]\n    grpc_failure_codes: []\n",
                "pools.gpu.grpc_failure_codes",
                Some(6),
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
