//! Circuit-breaker fallback layer: primary -> fallback after N failures, probed recovery.
//!
//! A primary/fallback router as a tower layer: recovery checks retried with back-off, a
//! minimum fallback duration and an N-consecutive-success recovery gate, asynchronous and
//! lock-free on the request path.
//!
//! # State machine
//!
//! * **NORMAL** — all traffic goes to the primary. Each outcome is classified (HTTP form:
//!   tower-http [`classify`](tower_http::classify), 5xx and errors by default; generic form:
//!   a [`ClassifyOutcome`]). `failure_threshold` consecutive failures engage the fallback;
//!   a success resets the streak.
//! * **FALLBACK** — all traffic goes to the fallback. The owned background prober (one task
//!   per [`Breaker`], never inside a client request, so at most one probe in flight) probes
//!   the primary (`<primary><health_endpoint>` with the pooled
//!   [`HttpProbe`](portcullis_health::HttpProbe)) every `recheck_interval`; each probe
//!   retries up to `probe_max_retries` times after `probe_backoff_base × 2^n` (0.5, 1, 2 s)
//!   and fails only when every attempt failed. Traffic returns to the primary only when
//!   BOTH gates hold: `min_fallback_duration` has passed since the fallback engaged, and
//!   `recovery_success_threshold` consecutive probes succeeded (a failed probe resets the
//!   count). Optionally a half-open trickle of live requests — one in
//!   `half_open.one_in`, at most one at a time, only after the hold — tests the primary too.
//! * **PRIMARY_UNHEALTHY** — the primary tripped but no fallback is configured: the breaker
//!   logs it once and keeps routing to the primary; a live success or the probe gates clear
//!   it.
//!
//! If the fallback fails while engaged, the HTTP form answers `fallback_unavailable` (502,
//! or 503 when the fallback said 503); the generic form returns [`FallbackUnavailable`].
//! Every wait is bounded: probe attempts by `probe_timeout`, retries by their count.
//!
//! [`Breaker::status_snapshot`] reads the state without I/O;
//! [`Breaker::force_health_check`] probes both sides now. Transitions are logged once each
//! with their reason and counted ([`Counters`]). [`Breaker`] implements
//! [`HealthSource`](portcullis_core::HealthSource) for the admission layer.
//!
//! # Cost on the NORMAL path
//!
//! Routing is one atomic load in `call`; a success is one atomic load (a store only if the
//! streak was non-zero); a failure is one `fetch_add`. No lock, no allocation. `poll_ready`
//! makes both sides ready (the primary alone when no fallback is configured), so that the
//! route is chosen when the request is sent, not when its connection became ready: a request
//! that waited in an admission queue meanwhile follows the breaker's state of that moment.
//! See `BENCHMARKS.md`.
//!
//! # Example
//!
//! ```
//! use portcullis_breaker::{Breaker, BreakerState, Config, FallbackLayer};
//! use portcullis_health::{Probe, ProbeFuture, ProbeResult};
//! use std::time::Duration;
//! use tower::{service_fn, Layer, Service, ServiceExt};
//!
//! struct AlwaysDown;
//! impl Probe for AlwaysDown {
//!     fn probe(&self, _target: &str) -> ProbeFuture {
//!         Box::pin(async { ProbeResult::unhealthy(Duration::ZERO, "down") })
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), portcullis_core::BoxError> {
//! let config = Config { failure_threshold: 2, url: Some("backup".into()), ..Config::default() };
//! let breaker = Breaker::builder(config).primary_target("main").probe(AlwaysDown).build();
//!
//! let primary = service_fn(|_: u32| async { Err::<&str, _>("primary down") });
//! let fallback = service_fn(|_: u32| async { Ok::<_, std::convert::Infallible>("from fallback") });
//! let mut svc = FallbackLayer::new(fallback, breaker.clone()).layer(primary);
//!
//! assert!(svc.ready().await?.call(1).await.is_err()); // failure 1
//! assert!(svc.ready().await?.call(2).await.is_err()); // failure 2: the fallback engages
//! assert_eq!(breaker.state(), BreakerState::Fallback);
//! assert_eq!(svc.ready().await?.call(3).await?, "from fallback");
//! assert_eq!(breaker.status_snapshot().counters.fallback_engaged, 1);
//! # Ok(())
//! # }
//! ```
//!
//! # HTTP form
//!
//! [`HttpFallback`] / [`HttpFallbackLayer`]: the primary is the service the gateway supplies
//! (the health-gated balance over the upstreams), the fallback another service (a proxy to
//! `fallback.url`); build the breaker with [`Breaker::http`]. Both bodies stream through in
//! one [`FallbackBody`].

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

mod breaker;
mod classify;
mod config;
mod error;
pub mod fallback;
pub mod http;
mod prober;
mod snapshot;

pub use crate::http::{
    DefaultClassifier, FallbackBody, HttpFallback, HttpFallbackLayer, HttpResponseFuture,
};
pub use breaker::{Breaker, BreakerBuilder};
pub use classify::{classify_fn, ClassifyFn, ClassifyOutcome, ErrorsAsFailures};
pub use config::{Config, HalfOpenConfig};
pub use error::FallbackUnavailable;
pub use fallback::{Fallback, FallbackLayer, ResponseFuture};
pub use snapshot::{BreakerState, Counters, HealthReport, ProbeReport, Side, StatusSnapshot};
