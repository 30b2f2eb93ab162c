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
    Bucket, EndpointStats, FallbackStats, HealthSummary, Histogram, Stats, StatsSource,
    StorageStats, Tier, UpstreamStats,
};

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
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

struct Shared {
    source: Box<dyn StatsSource>,
    health: HealthRegistry,
    history: history::History,
    /// The history sampler, aborted with the router's shared state.
    sampler: std::sync::OnceLock<tokio_util::task::AbortOnDropHandle<()>>,
}

/// Samples the endpoints every [`HISTORY_INTERVAL`](history::HISTORY_INTERVAL) until the
/// router is dropped.
async fn sample_history(shared: std::sync::Weak<Shared>) {
    let mut tick = tokio::time::interval(history::HISTORY_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(s) = shared.upgrade() else { return };
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

impl Shared {
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

/// Every operator route in one router, to merge into the gateway's
/// (`app.merge(portcullis_dashboard::router(&cfg.ui, source, &registry))`).
///
/// `/healthz` and `/readyz` are never behind auth (orchestrators probe them without
/// credentials). The router has no fallback, so merging it is always allowed.
pub fn router(config: &UiConfig, stats: impl StatsSource, health: &HealthRegistry) -> Router {
    let shared = Arc::new(Shared {
        source: Box::new(stats),
        health: health.clone(),
        history: history::History::new(),
        sampler: std::sync::OnceLock::new(),
    });
    // Outside a runtime (a router built for a test of its routes only) there is no history.
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        let task = rt.spawn(sample_history(Arc::downgrade(&shared)));
        let _ = shared
            .sampler
            .set(tokio_util::task::AbortOnDropHandle::new(task));
    }

    let s = Arc::clone(&shared);
    let mut operator = Router::new()
        .route(
            STATS_PATH,
            get(move || {
                let body = serde_json::to_vec(&s.stats()).unwrap_or_else(|_| b"{}".to_vec());
                std::future::ready(no_store("application/json", body))
            }),
        )
        .route(HISTORY_PATH, {
            let s = Arc::clone(&shared);
            get(move || std::future::ready(no_store("application/json", s.history.to_json())))
        })
        .route(
            METRICS_PATH,
            get(move || {
                let text = metrics::render(&shared.stats());
                std::future::ready(no_store(metrics::CONTENT_TYPE, text))
            }),
        );

    if config.enable {
        let page = bytes::Bytes::from(dashboard_html());
        operator = operator.route(
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
        );
    }

    if let Some((user, pass)) = config.credentials() {
        operator = operator.route_layer(BasicAuthLayer::new(Credentials::new(user, pass)));
    }
    operator.merge(health.routes())
}
