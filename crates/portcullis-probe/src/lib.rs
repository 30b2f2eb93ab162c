//! Throughput probing: finds how many concurrent requests an endpoint can take.
//!
//! The [`Prober`] follows the throughput-probing scheme of `fastapi-balancer` (the project's
//! reference behaviour): it steps the concurrency up 1, 2, 4, 8, ... up to
//! `max_probe_concurrency`, measures each level's error rate, p99 latency and requests/s, stops
//! at the first level exceeding `error_threshold` or `latency_threshold_ms`, and searches
//! between the last passing and the first failing level. The highest passing level is the
//! endpoint's `max_concurrency`, used as its admission `capacity`.
//!
//! A level `L` sends at least `probe_min_requests` requests and at least two rounds of
//! itself, keeping `L` requests in flight continuously (see [`LevelMeasurement`]). Level 1 is
//! the baseline: when it already fails, the endpoint is down or misconfigured and the probe
//! aborts with [`ProbeError::FirstLevelFailed`], listing the status codes and errors seen.
//!
//! Two schedules (see [`Schedule`]): [`Schedule::Plain`] is the reference doubling-then-bisect
//! search to an exact answer; [`Schedule::Adaptive`] (the default) reaches a result within
//! 10% of the knee with fewer requests and less wall time, by stopping failing levels as soon
//! as their verdict is certain, probing a knee estimate taken from the latency growth relative
//! to level 1, and bisecting geometrically. `BENCHMARKS.md` compares them.
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
pub use target::{HttpTransport, ProbeTarget, ProbeTransport, RequestOutcome, SendFuture};

#[cfg(test)]
mod sim_tests;
