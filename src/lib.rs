//! Portcullis: composable [`tower`] layers that keep backends from being overwhelmed, or hit
//! while sick.
//!
//! This facade crate re-exports the layer crates behind cargo features (all on by default
//! through the `gateway` feature):
//!
//! | feature | module | what |
//! |---|---|---|
//! | `health` | [`health`] | probes, health state machine, `/healthz` + `/readyz`, `HealthServer` |
//! | `balance` | [`balance`] | health-gated load balancing (p2c, round-robin, first-healthy, ejection) |
//! | `breaker` | [`breaker`] | circuit-breaker fallback |
//! | `admission` | [`admission`] | capacity, FIFO queue, 504 on queue timeout, 503 when unhealthy |
//! | `redis` | [`redis`] | the Redis-shared in-flight counter and capacity store |
//! | `probe` | [`probe`] | throughput probing (finds an endpoint's capacity) |
//! | `dashboard` | [`dashboard`] | `/balancer/stats`, `/metrics`, the `/balancer/ui` page |
//! | `gateway` | [`gateway`] | the example gateway's config, reverse proxy and assembly |
//!
//! Each feature works alone and brings what its API names: `balance`, `breaker` and
//! `dashboard` bring `health` (the probe and registry types they take), `dashboard` and
//! `redis` bring `admission`; `balance` brings [`client::UpstreamClient`], the HTTP client
//! [`HttpBalance`](balance::HttpBalance) sends through. [`prelude`] has the types a user
//! names every time, [`ServiceBuilderExt`] the layers as `ServiceBuilder` methods. The
//! guide is `docs/library.md`: which layer for which problem, their order, what each needs
//! and costs.

#![forbid(unsafe_code)]
#![doc = ""]
#![doc = "# README"]
#![doc = ""]
#![cfg_attr(feature = "admission", doc = include_str!("../README.md"))]

pub use portcullis_core as core;
pub use portcullis_core::{codes, Rejection};

#[cfg(feature = "admission")]
pub use portcullis_admission as admission;
#[cfg(feature = "balance")]
pub use portcullis_balance as balance;
#[cfg(feature = "breaker")]
pub use portcullis_breaker as breaker;
#[cfg(feature = "dashboard")]
pub use portcullis_dashboard as dashboard;
#[cfg(feature = "health")]
pub use portcullis_health as health;
#[cfg(feature = "probe")]
pub use portcullis_probe as probe;
#[cfg(feature = "redis")]
pub use portcullis_redis as redis;

#[cfg(feature = "balance")]
pub mod client;
#[cfg(any(feature = "admission", feature = "balance", feature = "breaker"))]
pub mod ext;
#[cfg(feature = "gateway")]
pub mod gateway;
pub mod prelude;

#[cfg(any(feature = "admission", feature = "balance", feature = "breaker"))]
pub use ext::ServiceBuilderExt;
