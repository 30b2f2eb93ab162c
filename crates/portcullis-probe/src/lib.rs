//! Throughput probing: finds how many concurrent requests an endpoint can take.
//!
//! The [`Prober`] steps the concurrency up, measures each level's error rate, latency and
//! requests/s, stops at the first level exceeding `error_threshold` or
//! `latency_threshold_ms`, and settles between the last passing and the first failing level.
//! The result is the endpoint's `max_concurrency`, used as its admission `capacity`. Level 1
//! is the baseline (up to `probe_min_requests` requests, one at a time; the gentle schedule
//! stops it once 8 agree): when it already fails, the
//! endpoint is down or misconfigured and the probe aborts with
//! [`ProbeError::FirstLevelFailed`], listing the status codes and errors seen.
//!
//! Three schedules (see [`Schedule`] and the `prober` module docs):
//!
//! * [`Schedule::Gentle`] (the default) sends every level as one wave of `level` requests and
//!   grows by at most `probe_growth` (1.5) times the previous level's near-baseline answers
//!   (1, 2, 3, 4, 6, 9, 13, ...), so a backend with a knee at K never has more than 1.5 x K
//!   requests in flight; the failing wave's own successes estimate the knee, which usually
//!   ends the search there. Its latency statistic is the p99 from 100 samples up and the
//!   second-worst sample below, so one slow response does not fail a level, and a level whose
//!   failure rests on one error is measured once more. About half the requests of the others.
//! * [`Schedule::Adaptive`] (the default before) and [`Schedule::Plain`] follow the
//!   throughput-probing scheme of `fastapi-balancer` (the project's reference behaviour):
//!   1, 2, 4, 8, ... with `max(probe_min_requests, 2 x level)` requests per level, then an
//!   adaptive (estimate, geometric bisection, 10% tolerance) or plain binary search.
//!
//! `BENCHMARKS.md` compares them.
//!
//! Probing never exceeds `max_probe_concurrency` requests in flight, applies the request
//! timeout (the gateway's `upstream_timeout`) to every request, uses one pooled `hyper-util`
//! client, and is cancel-safe: dropping the probe future drops every in-flight request.
//! [`ProbeEvent`]s report progress (level, requests/s, p99, error rate) for a progress bar.
//!
//! ```
//! use portcullis_probe::{ProbeConfig, ProbeTarget, Prober};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // A tiny backend that answers everything at once.
//! let app = axum::Router::new().route("/work", axum::routing::post(|| async { "done" }));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let base = format!("http://{}", listener.local_addr().unwrap());
//! tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
//!
//! let config = ProbeConfig {
//!     max_probe_concurrency: 8,
//!     probe_min_requests: 8,
//!     ..ProbeConfig::default()
//! };
//! let prober = Prober::new(config).with_request_timeout(Duration::from_secs(5));
//! let target = ProbeTarget::new(base, "/work").with_json_body(serde_json::json!({"x": 1}));
//! let report = prober.probe(&target).await.unwrap();
//! // Nothing failed up to the cap, so the cap bounds the result.
//! assert_eq!(report.max_concurrency, 8);
//! assert_eq!(report.bound, portcullis_probe::ProbeBound::MaxConcurrency);
//! println!("{}", report.table());
//! # }
//! ```

#![forbid(unsafe_code)]

mod config;
mod error;
mod measure;
mod prober;
mod target;

pub use config::{InvalidProbeConfig, ProbeConfig, MAX_PROBE_CONCURRENCY, MAX_PROBE_MIN_REQUESTS};
pub use error::ProbeError;
pub use measure::{LevelMeasurement, Phase};
pub use prober::{ProbeBound, ProbeEvent, ProbeReport, Prober, Schedule};
pub use target::{
    HttpTransport, PrepareFuture, ProbeTarget, ProbeTransport, RequestOutcome, SendFuture,
};

#[cfg(test)]
mod sim_tests;
