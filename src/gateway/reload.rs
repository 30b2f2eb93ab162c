//! Config reload: `SIGHUP` (installed by the process, see the example gateway) and
//! `POST /balancer/reload` re-read the config file and apply it without dropping a request.
//!
//! A reload is all or nothing. The new file is read and checked exactly as `--check` does
//! (the same field-naming error); a config that fails is refused as a whole, the old one
//! keeps serving, the error is logged, the route answers 400 `invalid_config` with it, and
//! `reloads_failed` counts it. A valid config builds a new generation of the data path and
//! the operator routes next to the running one, and then the two are swapped in one step
//! ([`App::swap`](super::front::App::swap)): requests already dispatched finish on the
//! generation they started in, every later one (on open connections too) gets the new one.
//! What carries over between generations, so that nothing in flight is lost:
//!
//! * the upstream pool, when only its `upstreams` changed: removed replicas leave it (their
//!   in-flight requests finish, see `ReplicaRegistry::remove`), added ones join awaiting their
//!   first good health check (or healthy at once, when no healthy replica would remain
//!   otherwise), and the others keep their health, ejection and in-flight state. When
//!   another balance setting changed (strategy, thresholds, health checks, ejection), a new
//!   pool is built with the same replicas, each starting healthy if it was healthy, and its
//!   health checker restarts with the new settings;
//! * every watched endpoint that stays (with the same `adaptive:` block) keeps its limiter:
//!   its in-flight requests, its queue and the place of every waiter in it. Its new
//!   `queue_timeout` and `max_queue` apply at once, and a configured `capacity` that
//!   changed replaces the one in force. New endpoints start at their `capacity` (else
//!   `default_capacity`: the startup probe runs only at start); removed ones stop being
//!   watched (their queued requests still finish under their old limit);
//! * the breaker, unless its `fallback:` section or the pool changed;
//! * all of this pool by pool: each pool of `pools:` (and `default`) is matched by its name
//!   and kept, rebuilt or updated on its own as above (a named pool whose `http2` changed
//!   is rebuilt, its replicas with new proxies and counters); a pool that is new starts as
//!   at start, one that is gone stops (its health checker with it) once the requests it
//!   serves have ended; the routes are rebuilt from the new config;
//! * the listener's certificate: with `tls:`, both files are re-read on every reload
//!   (before anything is applied: a bad file refuses the reload naming `tls.cert_file`).
//!
//! Fields that are read once at start ([`RESTART_FIELDS`]: the listeners, the worker
//! count, the storage, the access log, the connection limits and the upstream connection
//! settings, `http2` among them) are never half-applied: a change to one is kept out of the applied config,
//! reported in the answer and in `last_reload.needs_restart`, and logged.
//!
//! Reloads run one at a time on one owned task; the route waits for its outcome at most
//! [`RELOAD_WAIT`].

use super::config::{ConfigError, GatewayConfig};
use arc_swap::ArcSwapOption;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use http::StatusCode;
use portcullis_core::{codes, Rejection};
use portcullis_dashboard::ReloadStats;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

/// The path of the reload route.
pub const RELOAD_PATH: &str = "/balancer/reload";

/// How long `POST /balancer/reload` waits for its reload to finish (it goes on after).
pub const RELOAD_WAIT: Duration = Duration::from_secs(30);

/// The fields read once at start, by their config names: a reload that changes one reports
/// it as needing a restart and keeps the running value.
pub const RESTART_FIELDS: &[&str] = &[
    "listen",
    "workers",
    "storage",
    "admin",
    "tls",
    "health_server",
    "access_log",
    "drain_timeout",
    "max_connections",
    "client_header_timeout",
    "client_idle_timeout",
    "upstream_timeout",
    "connect_timeout",
    "client_body_timeout",
    "upstream_body_timeout",
    "upstream_max_idle",
    "upstream_idle_timeout",
    "upstream_tls",
    "http2",
    "grpc_failure_codes",
    "probe",
];

/// `new` with every field of [`RESTART_FIELDS`] that differs from `old` set back to its
/// running value, and the names of those fields.
pub(super) fn keep_restart_fields(
    old: &GatewayConfig,
    mut new: GatewayConfig,
) -> (GatewayConfig, Vec<String>) {
    let mut changed = Vec::new();
    macro_rules! keep {
        ($name:literal, $($field:ident).+) => {
            if new.$($field).+ != old.$($field).+ {
                changed.push($name.to_owned());
                new.$($field).+ = old.$($field).+.clone();
            }
        };
    }
    keep!("listen", listen);
    keep!("workers", workers);
    keep!("storage", storage);
    keep!("admin", admin);
    keep!("tls", tls);
    keep!("health_server", health_server);
    keep!("access_log", access_log);
    keep!("drain_timeout", drain_timeout);
    keep!("max_connections", max_connections);
    keep!("client_header_timeout", client_header_timeout);
    keep!("client_idle_timeout", client_idle_timeout);
    keep!("upstream_timeout", upstream_timeout);
    keep!("connect_timeout", connect_timeout);
    keep!("client_body_timeout", client_body_timeout);
    keep!("upstream_body_timeout", upstream_body_timeout);
    keep!("upstream_max_idle", upstream_max_idle);
    keep!("upstream_idle_timeout", upstream_idle_timeout);
    keep!("upstream_tls", upstream_tls);
    keep!("http2", http2);
    keep!("grpc_failure_codes", balance.grpc_failure_codes);
    keep!("probe", probe);
    (new, changed)
}

/// What an applied reload did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReloadReport {
    /// The generation now in force.
    pub config_generation: u64,
    /// The top-level sections that changed and were applied.
    pub applied: Vec<String>,
    /// Fields that changed but need a restart, so were not applied.
    pub needs_restart: Vec<String>,
}

/// Why a reload was refused. The old config keeps running in every case.
#[derive(Debug, Clone)]
pub enum ReloadError {
    /// The new config is invalid (400 `invalid_config`), naming the field.
    Invalid(ConfigError),
    /// The gateway was not started from a config file (409 `reload_unavailable`).
    NoConfigFile,
    /// The config is valid but could not be applied (500 `reload_failed`).
    Failed(String),
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Invalid(e) => write!(f, "{e}"),
            Self::NoConfigFile => f.write_str(
                "this gateway was not started from a config file: there is nothing to re-read",
            ),
            Self::Failed(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ReloadError {}

impl ReloadError {
    /// The JSON refusal of the reload route for this error.
    fn to_response(&self) -> Response {
        let (status, code) = match self {
            Self::Invalid(_) => (StatusCode::BAD_REQUEST, codes::INVALID_CONFIG),
            Self::NoConfigFile => (StatusCode::CONFLICT, codes::RELOAD_UNAVAILABLE),
            Self::Failed(_) => (StatusCode::INTERNAL_SERVER_ERROR, codes::RELOAD_FAILED),
        };
        Rejection::new(status, code, self.to_string())
            .to_json_response::<Body>()
            .into_response()
    }
}

/// The generation counter and the last outcome, read by the stats.
#[derive(Debug)]
pub struct ReloadStatus {
    generation: AtomicU64,
    failed: AtomicU64,
    last: ArcSwapOption<ReloadStats>,
}

impl Default for ReloadStatus {
    fn default() -> Self {
        Self {
            generation: AtomicU64::new(1),
            failed: AtomicU64::new(0),
            last: ArcSwapOption::empty(),
        }
    }
}

impl ReloadStatus {
    /// The generation in force (1 at start).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Reloads refused so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// The outcome of the last reload, if any.
    pub fn last(&self) -> Option<ReloadStats> {
        self.last.load_full().map(|l| (*l).clone())
    }

    /// Records an applied reload; returns the new generation.
    pub(super) fn applied(&self, needs_restart: Vec<String>) -> u64 {
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.last.store(Some(Arc::new(ReloadStats {
            time: unix_now(),
            ok: true,
            error: None,
            needs_restart,
        })));
        generation
    }

    /// Records a refused reload.
    pub(super) fn refused(&self, error: &ReloadError) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.last.store(Some(Arc::new(ReloadStats {
            time: unix_now(),
            ok: false,
            error: Some(error.to_string()),
            needs_restart: Vec::new(),
        })));
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// What a reload applies.
#[derive(Debug)]
pub(super) enum ReloadSource {
    /// The config file the gateway was started from, read again.
    File,
    /// A config given in code (already read and validated).
    Config(Box<GatewayConfig>),
}

pub(super) type ReloadReply = oneshot::Sender<Result<ReloadReport, ReloadError>>;

/// Asks the gateway's reload task for a reload (cheap to clone). Held by the reload route
/// and by whatever the process wires to `SIGHUP`.
#[derive(Debug, Clone)]
pub struct ReloadHandle {
    tx: mpsc::Sender<(ReloadSource, ReloadReply)>,
}

impl ReloadHandle {
    pub(super) fn channel() -> (Self, mpsc::Receiver<(ReloadSource, ReloadReply)>) {
        // Reloads queue up behind the running one; a burst of signals waits its turn.
        let (tx, rx) = mpsc::channel(16);
        (Self { tx }, rx)
    }

    /// Re-reads the config file the gateway was started from and applies it (see the
    /// [module docs](self)).
    pub async fn reload_from_file(&self) -> Result<ReloadReport, ReloadError> {
        self.request(ReloadSource::File).await
    }

    /// Applies `config` (read and validated by the caller, as for `Gateway::build`).
    pub async fn reload(&self, config: GatewayConfig) -> Result<ReloadReport, ReloadError> {
        self.request(ReloadSource::Config(Box::new(config))).await
    }

    async fn request(&self, source: ReloadSource) -> Result<ReloadReport, ReloadError> {
        let (reply, answer) = oneshot::channel();
        let gone = || ReloadError::Failed("the gateway is shutting down".into());
        self.tx.send((source, reply)).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// The config file a gateway re-reads, set once by the process.
pub(super) type ConfigFile = std::sync::OnceLock<PathBuf>;

/// `POST /balancer/reload`: re-reads the config file and applies it; 200 with the
/// [`ReloadReport`], or the refusal of [`ReloadError`]. Mounted, like the other
/// state-changing operator routes, behind the operator's credentials (see
/// `app::operator_actions`) and [`same_site_json`](super::admin::same_site_json).
pub(super) fn route(handle: ReloadHandle) -> Router {
    Router::new()
        .route(
            RELOAD_PATH,
            axum::routing::post(move || {
                let handle = handle.clone();
                async move {
                    match tokio::time::timeout(RELOAD_WAIT, handle.reload_from_file()).await {
                        Ok(Ok(report)) => Json(report).into_response(),
                        Ok(Err(e)) => e.to_response(),
                        Err(_) => ReloadError::Failed(format!(
                            "the reload did not finish within {}s; it goes on, see the log and \
                             last_reload in /balancer/stats",
                            RELOAD_WAIT.as_secs()
                        ))
                        .to_response(),
                    }
                }
            }),
        )
        .route_layer(axum::middleware::from_fn(super::admin::same_site_json))
}

/// Every balance setting of a pool but its upstream list: what a reload compares to decide
/// whether the running pool can stay.
pub(super) fn pool_settings(balance: &portcullis_balance::Config) -> portcullis_balance::Config {
    let mut balance = balance.clone();
    balance.upstreams.clear();
    balance
}

/// The parts of the config that differ between `old` and `new` and that a reload applies
/// (for the report and the log; names only, never values).
pub(super) fn changed_sections(old: &GatewayConfig, new: &GatewayConfig) -> Vec<String> {
    [
        ("upstreams", old.balance.upstreams != new.balance.upstreams),
        (
            "balance",
            pool_settings(&old.balance) != pool_settings(&new.balance),
        ),
        ("pools", old.pools != new.pools),
        ("routes", old.routes != new.routes),
        ("endpoints", old.admission != new.admission),
        (
            "default_capacity",
            old.default_capacity != new.default_capacity,
        ),
        ("fallback", old.fallback != new.fallback),
        ("retry", old.retry != new.retry),
        ("ui", old.ui != new.ui),
        (
            "upstream_admin",
            old.upstream_admin != new.upstream_admin
                || old.upstream_admin_allow != new.upstream_admin_allow,
        ),
        (
            "on_client_cancel",
            old.on_client_cancel != new.on_client_cancel
                || old.client_cancel_hold_timeout != new.client_cancel_hold_timeout,
        ),
        ("log_level", old.log_level != new.log_level),
    ]
    .into_iter()
    .filter(|(_, differs)| *differs)
    .map(|(name, _)| name.to_owned())
    .collect()
}
