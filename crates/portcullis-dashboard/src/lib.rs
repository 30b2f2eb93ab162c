//! Operator routes: `/healthz`, `/readyz`, `/balancer/stats`, `/metrics` and the
//! `/balancer/ui` dashboard.
//!
//! [`router`] builds one axum [`Router`] with every operator route, given the `ui:` config
//! ([`UiConfig`]), a [`StatsSource`] that the gateway implements over its admission,
//! balance and breaker snapshots, and the [`HealthRegistry`] of its components:
//!
//! | route | answers | auth |
//! |---|---|---|
//! | `GET /healthz` | `200 {"status":"ok"}` / `503 {"status":"wedged","failing":[..]}` | never |
//! | `GET /readyz` | `200 {"status":"ok"}` / `503 {"status":"not_ready","failing":[..]}` | never |
//! | `GET /balancer/stats` | the [`Stats`] JSON document (schema: `docs/stats.schema.json`) | Basic, when configured |
//! | `GET /balancer/stats/history` | each endpoint's active, queue depth and capacity over the last minute ([`history`]) | Basic, when configured |
//! | `GET /metrics` | Prometheus / OpenMetrics text ([`metrics`]) | Basic, when configured |
//! | `GET <ui.path>` (default `/balancer/ui`) | the dashboard page, unless `ui.enable: false` | Basic, when configured |
//!
//! Every answer is built from cached state (atomics and snapshots): no I/O per request.
//!
//! The routes mount one by one too: [`stats_route`], [`history_route`], [`metrics_route`],
//! [`ui_route`] and [`health_routes`] (no auth of their own; [`router`] adds it). For your own
//! axum app with admission control, [`router_for`] is the whole set in one line, fed by
//! the limiters of your [`Endpoints`] ([`AdmissionSource`]):
//!
//! ```
//! use axum::{routing::post, Router};
//! use portcullis_admission::{Endpoints, HttpAdmissionLayer, Limiter};
//! use std::sync::Arc;
//!
//! let endpoints = Endpoints::new().watch("/predict", None, Arc::new(Limiter::local(8)));
//! let app: Router = Router::new()
//!     .route("/predict", post(|| async { "scored" }))
//!     .layer(HttpAdmissionLayer::new(endpoints.clone()))
//!     .merge(portcullis_dashboard::router_for(&endpoints)); // stats, metrics, UI, health
//! ```
//!
//! The dashboard is one self-contained HTML page embedded in the binary (hand-written CSS,
//! JS and a canvas chart; no build step, no CDN). It polls `/balancer/stats` every 2 s and
//! shows, per endpoint, capacity, active, available and utilization (green, yellow at
//! ≥ 80 %, red at 100 %), a queue-depth badge and a 60-second chart of active requests and
//! queue depth (seeded from `/balancer/stats/history` when the page opens, so the chart
//! starts full); the upstream table; the fallback with its hold time and recovery progress.
//!
//! ```
//! use portcullis_dashboard::{router, Stats, EndpointStats, UiConfig};
//! use portcullis_health::HealthRegistry;
//! use std::time::{Duration, Instant};
//!
//! let started = Instant::now();
//! let stats = move || {
//!     let mut s = Stats::new(env!("CARGO_PKG_VERSION"), started.elapsed());
//!     s.endpoints.insert("/work".into(), EndpointStats { capacity: 8, ..Default::default() });
//!     s
//! };
//! let ui = UiConfig::default();
//! portcullis_dashboard::log_auth_mode(&ui);
//! let app: axum::Router = router(&ui, stats, &HealthRegistry::new());
//! ```

#![forbid(unsafe_code)]

pub mod auth;
mod config;
pub mod history;
pub mod metrics;
pub mod stats;
#[cfg(feature = "testing")]
pub mod testing;

pub use auth::{BasicAuthLayer, Credentials};
pub use config::{UiConfig, DEFAULT_UI_PATH};
pub use stats::{
    AdmissionSource, Bucket, EndpointStats, FallbackStats, HealthSummary, Histogram, PoolStats,
    ReloadStats, RetryStats, Stats, StatsSource, StorageStats, Tier, UpstreamStats,
};

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use portcullis_admission::{CapacitySource, Endpoints};
use portcullis_health::HealthRegistry;
use std::sync::Arc;

/// The path of the stats document.
pub const STATS_PATH: &str = "/balancer/stats";
/// The path of the last minute of each endpoint's load ([`history`]).
pub const HISTORY_PATH: &str = "/balancer/stats/history";
/// The path of the Prometheus exposition.
pub const METRICS_PATH: &str = "/metrics";

/// The dashboard page, with `{{STATS_PATH}}` still to fill.
const DASHBOARD_HTML: &str = include_str!("ui/dashboard.html");

/// Whether the operator routes require credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// No credentials configured: the routes are open.
    Open,
    /// HTTP Basic credentials required.
    Basic,
}

/// The auth mode `config` results in.
pub fn auth_mode(config: &UiConfig) -> AuthMode {
    if config.credentials().is_some() {
        AuthMode::Basic
    } else {
        AuthMode::Open
    }
}

/// Logs, once at startup, whether the operator routes are protected (never the
/// credentials themselves), and returns the mode.
pub fn log_auth_mode(config: &UiConfig) -> AuthMode {
    let mode = auth_mode(config);
    let ui = if config.enable {
        config.normalized_path()
    } else {
        "(disabled)".to_owned()
    };
    match mode {
        AuthMode::Basic => tracing::info!(
            ui = %ui,
            "operator routes ({STATS_PATH}, {METRICS_PATH}, dashboard) require HTTP Basic auth"
        ),
        AuthMode::Open => {
            if config.username.is_some() != config.password.is_some() {
                tracing::warn!(
                    "ui: only one of username/password is set; both are needed for auth"
                );
            }
            tracing::warn!(
                ui = %ui,
                "operator routes ({STATS_PATH}, {METRICS_PATH}, dashboard) are open: set ui.username and ui.password to protect them"
            );
        }
    }
    mode
}

/// A [`StatsSource`] whose documents carry the liveness and readiness of a
/// [`HealthRegistry`] (the `health` field), as [`router`] serves them ([`with_health`]).
pub struct WithHealth<S> {
    source: S,
    health: HealthRegistry,
}

impl<S> std::fmt::Debug for WithHealth<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WithHealth").finish_non_exhaustive()
    }
}

/// Fills the `health` field of `source`'s documents from `health` (what `/healthz` and
/// `/readyz` answer), for the routes mounted one by one ([`stats_route`],
/// [`metrics_route`]); [`router`] does it itself.
pub fn with_health<S: StatsSource>(source: S, health: &HealthRegistry) -> WithHealth<S> {
    WithHealth {
        source,
        health: health.clone(),
    }
}

impl<S: StatsSource> StatsSource for WithHealth<S> {
    fn stats(&self) -> Stats {
        let mut s = self.source.stats();
        let live = self.health.liveness();
        let ready = self.health.readiness();
        let mut failing = ready.failing;
        for f in live.failing {
            if !failing.contains(&f) {
                failing.push(f);
            }
        }
        s.health = Some(HealthSummary {
            live: live.status == "ok",
            ready: ready.status == "ok",
            failing,
        });
        s
    }
}

/// The state of the history route: the source it samples and the last minute.
struct HistoryState {
    source: Box<dyn StatsSource>,
    history: history::History,
    /// The history sampler, aborted with the route's state.
    sampler: std::sync::OnceLock<tokio_util::task::AbortOnDropHandle<()>>,
}

/// Samples the endpoints every [`HISTORY_INTERVAL`](history::HISTORY_INTERVAL) until the
/// route is dropped.
async fn sample_history(state: std::sync::Weak<HistoryState>) {
    let mut tick = tokio::time::interval(history::HISTORY_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(s) = state.upgrade() else { return };
        let points = s
            .source
            .stats()
            .endpoints
            .into_iter()
            .map(|(path, e)| {
                let point = history::Point {
                    active: e.active_requests,
                    queue_depth: e.queue_depth,
                    capacity: e.capacity,
                };
                (path, point)
            })
            .collect();
        s.history.record(points);
    }
}

fn no_store(content_type: &'static str, body: impl IntoResponse) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        body,
    )
        .into_response()
}

/// The dashboard page served at `ui.path` (the stats URL filled in).
pub fn dashboard_html() -> String {
    DASHBOARD_HTML.replace("{{STATS_PATH}}", STATS_PATH)
}

/// `GET /balancer/stats` ([`STATS_PATH`]): the [`Stats`] document of `stats`, as JSON.
///
/// No auth of its own (add a [`BasicAuthLayer`] with `route_layer`), no health summary
/// unless the source gives one ([`with_health`]).
///
/// ```
/// use portcullis_admission::{Endpoints, Limiter};
/// use portcullis_dashboard::{stats_route, AdmissionSource};
/// use std::sync::Arc;
///
/// let endpoints = Endpoints::new().watch("/predict", None, Arc::new(Limiter::local(8)));
/// let app: axum::Router = axum::Router::new()
///     .route("/predict", axum::routing::post(|| async { "scored" }))
///     .merge(stats_route(AdmissionSource::new(&endpoints)));
/// ```
pub fn stats_route(stats: impl StatsSource) -> Router {
    get_route(STATS_PATH, stats, "application/json", |s| {
        serde_json::to_vec(s).unwrap_or_else(|_| b"{}".to_vec())
    })
}

/// `GET /metrics` ([`METRICS_PATH`]): the Prometheus text of `stats` ([`metrics`]). No auth
/// of its own.
pub fn metrics_route(stats: impl StatsSource) -> Router {
    get_route(METRICS_PATH, stats, metrics::CONTENT_TYPE, |s| {
        metrics::render(s).into_bytes()
    })
}

/// One `GET` route answering `render(stats.stats())` with `content_type`, uncached.
fn get_route(
    path: &str,
    stats: impl StatsSource,
    content_type: &'static str,
    render: fn(&Stats) -> Vec<u8>,
) -> Router {
    let stats = Arc::new(stats);
    Router::new().route(
        path,
        get(move || std::future::ready(no_store(content_type, render(&stats.stats())))),
    )
}

/// `GET /balancer/stats/history` ([`HISTORY_PATH`]): each endpoint of `stats` sampled every
/// 2 s over the last minute ([`history`]). The sampler task runs on the current Tokio
/// runtime and stops when the route is dropped; built outside a runtime, the route answers
/// an empty history. No auth of its own.
pub fn history_route(stats: impl StatsSource) -> Router {
    let state = Arc::new(HistoryState {
        source: Box::new(stats),
        history: history::History::new(),
        sampler: std::sync::OnceLock::new(),
    });
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        let task = rt.spawn(sample_history(Arc::downgrade(&state)));
        let _ = state
            .sampler
            .set(tokio_util::task::AbortOnDropHandle::new(task));
    }
    Router::new().route(
        HISTORY_PATH,
        get(move || std::future::ready(no_store("application/json", state.history.to_json()))),
    )
}

/// `GET /healthz` and `GET /readyz` over `health` (cached flags, never behind auth).
pub fn health_routes(health: &HealthRegistry) -> Router {
    health.routes()
}

/// The dashboard page at `config.path` (default `/balancer/ui`), with its security
/// headers; an empty router with `ui.enable: false`. No auth of its own. The page polls
/// [`STATS_PATH`] and [`HISTORY_PATH`], so mount [`stats_route`] and [`history_route`] too.
pub fn ui_route(config: &UiConfig) -> Router {
    if !config.enable {
        return Router::new();
    }
    let page = bytes::Bytes::from(dashboard_html());
    Router::new().route(
        &config.normalized_path(),
        get(move || {
            let page = page.clone();
            async move {
                let mut resp = no_store("text/html; charset=utf-8", page);
                let h = resp.headers_mut();
                h.insert(
                    header::CONTENT_SECURITY_POLICY,
                    HeaderValue::from_static(
                        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'",
                    ),
                );
                h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
                h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
                resp
            }
        }),
    )
}

/// Every operator route in one router, to merge into the gateway's
/// (`app.merge(portcullis_dashboard::router(&cfg.ui, source, &registry))`): [`stats_route`],
/// [`history_route`], [`metrics_route`] and [`ui_route`], behind Basic auth when `config`
/// has credentials, with the `health` summary filled in ([`with_health`]), plus
/// [`health_routes`].
///
/// `/healthz` and `/readyz` are never behind auth (orchestrators probe them without
/// credentials). The router has no fallback, so merging it is always allowed.
///
/// ```
/// use portcullis_dashboard::{router, Stats, UiConfig};
/// use portcullis_health::HealthRegistry;
/// use tower::ServiceExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let health = HealthRegistry::new();
/// let ui = UiConfig { username: Some("ops".into()), password: Some("s3cret".into()), ..UiConfig::default() };
/// let app: axum::Router = router(&ui, || Stats::new("1.0.0", Default::default()), &health);
///
/// let get = |path: &str| http::Request::get(path).body(axum::body::Body::empty()).unwrap();
/// let stats = app.clone().oneshot(get("/balancer/stats")).await.unwrap();
/// assert_eq!(stats.status(), 401); // credentials required
/// let ready = app.oneshot(get("/readyz")).await.unwrap();
/// assert_eq!(ready.status(), 200); // never behind auth
/// # }
/// ```
pub fn router(config: &UiConfig, stats: impl StatsSource, health: &HealthRegistry) -> Router {
    let source: Arc<dyn StatsSource> = Arc::new(with_health(stats, health));
    let mut operator = stats_route(source.clone())
        .merge(history_route(source.clone()))
        .merge(metrics_route(source))
        .merge(ui_route(config));
    if let Some((user, pass)) = config.credentials() {
        operator = operator.route_layer(BasicAuthLayer::new(Credentials::new(user, pass)));
    }
    operator.merge(health_routes(health))
}

/// Every operator route for an application with admission control only: [`router`] with
/// the default `ui:` config (open, page at `/balancer/ui`), the endpoints of `endpoints`
/// ([`AdmissionSource`]) and a health registry of its own (live and ready; use [`router`]
/// with your [`HealthRegistry`] to report your components).
///
/// ```
/// use axum::{routing::post, Router};
/// use portcullis_admission::{Endpoints, HttpAdmissionLayer, Limiter};
/// use std::sync::Arc;
///
/// let endpoints = Endpoints::new().watch("/predict", None, Arc::new(Limiter::local(8)));
/// let app: Router = Router::new()
///     .route("/predict", post(|| async { "scored" }))
///     .layer(HttpAdmissionLayer::new(endpoints.clone()))
///     .merge(portcullis_dashboard::router_for(&endpoints));
/// ```
pub fn router_for<C: CapacitySource>(endpoints: &Endpoints<C>) -> Router {
    router(
        &UiConfig::default(),
        AdmissionSource::new(endpoints),
        &HealthRegistry::new(),
    )
}
