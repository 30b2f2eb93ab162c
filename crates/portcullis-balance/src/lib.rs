//! Health-gated load balancing over replicas: tiers, first-healthy / round-robin / p2c /
//! least-connections / weighted, active health checks and passive outlier ejection, as a
//! tower layer.
//!
//! # Pieces
//!
//! * [`ReplicaRegistry`]: the replicas of one pool — key (base URL or any id), [`Tier`]
//!   (primary / secondary, insertion-ordered), a
//!   [`HealthState`](portcullis_health::HealthState), an in-flight count — with runtime
//!   [`add`](ReplicaRegistry::add) / [`remove`](ReplicaRegistry::remove) and a create-once
//!   [`ensure`](ReplicaRegistry::ensure). Selection reads an `ArcSwap` view and atomics: no
//!   lock, no allocation, O(1) for every policy.
//! * Active health checks: [`ReplicaRegistry::spawn_http_checker`] starts the
//!   [`HealthChecker`](portcullis_health::HealthChecker) (all probes of a cycle concurrent on
//!   one pooled client; HAProxy-style `failure_threshold` / `recovery_threshold`).
//! * Passive outlier ejection (Envoy's `consecutive_5xx`): `eject_after` consecutive failed
//!   responses eject a replica for `eject_for` (growing up to `eject_max` on each consecutive
//!   re-ejection); after the cooldown exactly one request is leased to it as a probe. Active
//!   and passive signals drive one state machine per replica.
//! * Policies ([`RoutingStrategy`]): `p2c` (default; power of two choices on in-flight
//!   count), `round-robin`, `first-healthy`, `least-connections` (the exact minimum of
//!   in-flight), `weighted` (smooth weighted round robin by
//!   [`ReplicaRegistry::add_weighted`]'s weight) — always over the healthy replicas of the
//!   best tier with a healthy member. Panic mode (`panic_threshold`, Envoy's) routes to every
//!   replica when too few are healthy.
//! * Services: [`Balance`] (generic, any request type; replicas are tower services, or any
//!   payload handed to a dispatch service; fails with [`NoHealthyReplica`]) and
//!   [`HttpBalance`] (answers 503 `no_healthy_upstream` with `Retry-After`, classifies
//!   responses with tower-http's `classify`, and holds the in-flight slot until the response
//!   body ends).
//! * [`ReplicaRegistry::snapshot`] for `/balancer/stats`, and a
//!   [`HealthSource`](portcullis_core::HealthSource) impl for the admission layer.
//!
//! Unlike `tower::balance::p2c::Balance`, this balancer is shared by every connection (one
//! registry, no per-connection `Discover` state), never indexes replicas (requests hold an
//! `Arc` to their replica, so removal cannot misroute), and gates on health.
//!
//! # Example
//!
//! ```
//! use portcullis_balance::{Balance, Config, NoHealthyReplica, ReplicaRegistry, Tier};
//! use tower::{service_fn, Service, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), portcullis_core::BoxError> {
//! let registry = ReplicaRegistry::new(&Config::default());
//! for name in ["a", "b"] {
//!     let replica = service_fn(move |req: u32| async move { Ok::<_, std::convert::Infallible>((name, req)) });
//!     registry.add(name, Tier::Primary, replica);
//! }
//! let mut balance = Balance::new(registry.clone());
//! let (served_by, _) = balance.ready().await?.call(7).await?;
//! assert!(served_by == "a" || served_by == "b");
//!
//! registry.remove("a");
//! registry.remove("b");
//! let err = balance.ready().await?.call(8).await.unwrap_err();
//! assert!(err.is::<NoHealthyReplica>());
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

pub mod balance;
mod config;
mod error;
mod guard;
pub mod http;
pub mod registry;
mod replica;
pub mod retry;
mod selection;
mod snapshot;
mod sync;

pub use balance::{Balance, BalanceLayer, CallReplica};
pub use config::{Config, HealthCheckConfig, HealthCheckKind, RoutingStrategy, UpstreamConfig};
pub use error::NoHealthyReplica;
pub use guard::InflightGuard;
pub use http::{HttpBalance, HttpBalanceLayer, RetryingHttpBalance};
pub use portcullis_health::{CheckerConfig, CheckerHandle, GrpcHealthProbe, HealthPolicy, Status};
pub use registry::{RegistryTargets, ReplicaRegistry};
pub use replica::{Replica, Tier};
pub use retry::{
    NotSent, ReplayBody, Retries, RetryBudget, RetryBudgetCounts, RetryConfig, RetryCounts, RetryOn,
};
pub use snapshot::{ReplicaSnapshot, Snapshot};
