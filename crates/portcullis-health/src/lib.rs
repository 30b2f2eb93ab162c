//! Health checking for Portcullis.
//!
//! * [`probe`]: the [`Probe`] trait (one health check of one target) and [`HttpProbe`], the
//!   real HTTP implementation on one shared pooled client.
//! * [`grpc_probe`]: [`GrpcHealthProbe`], the gRPC health checking protocol
//!   (`grpc.health.v1.Health/Check`) as a [`Probe`].
//! * [`state`]: [`HealthState`], the per-replica state machine driven by active probes
//!   (consecutive `failure_threshold` / `recovery_threshold`) and passive outlier ejection
//!   (`eject_after`, `eject_for`, single-probe recovery lease).
//! * [`checker`]: [`HealthChecker`], the owned background task probing every target
//!   concurrently each `health_check_interval`.
//! * [`readiness`]: [`HealthRegistry`] of named components with cached flags, and the
//!   `GET /healthz` / `GET /readyz` routes over it (no I/O per request).
//! * [`checks`]: the pluggable [`Check`] trait ([`check_fn`] for closures) and [`CheckSet`],
//!   owned background loops with a consecutive-failure threshold.
//! * [`server`]: [`HealthServer`], the standalone probe server (`health_server:` config).
//!
//! ```
//! use portcullis_health::{HealthPolicy, HealthState, Status};
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! let state = HealthState::new(Arc::new(HealthPolicy { failure_threshold: 2, ..Default::default() }));
//! state.record_probe(false, Duration::from_millis(3));
//! assert!(state.is_healthy());
//! state.record_probe(false, Duration::from_millis(3));
//! assert_eq!(state.status(), Status::Unhealthy);
//! ```

#![forbid(unsafe_code)]

pub mod checker;
pub mod checks;
pub mod grpc_probe;
pub mod probe;
pub mod readiness;
pub mod server;
pub mod state;
mod sync;

pub use checker::{CheckerConfig, CheckerHandle, HealthChecker, ProbeTarget, ProbeTargets};
pub use checks::{check_fn, Check, CheckFuture, CheckPolicy, CheckSet, ChecksHandle, FnCheck};
pub use grpc_probe::{GrpcHealthProbe, GRPC_HEALTH_CHECK_PATH};
pub use probe::{HttpProbe, Probe, ProbeFuture, ProbeResult};
pub use readiness::{routes, Component, HealthRegistry, ProbeStatus, HEALTHZ_PATH, READYZ_PATH};
pub use server::{HealthServer, HealthServerConfig, DEFAULT_HEALTH_PORT};
pub use state::{HealthCounters, HealthPolicy, HealthState, Status, Transition};
