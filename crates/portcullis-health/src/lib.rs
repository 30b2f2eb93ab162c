//! Health checking for Portcullis.
//!
//! * [`probe`]: the [`Probe`] trait (one health check of one target) and [`HttpProbe`], the
//!   real HTTP implementation on one shared pooled client.
//! * [`state`]: [`HealthState`], the per-replica state machine driven by active probes
//!   (consecutive `failure_threshold` / `recovery_threshold`) and passive outlier ejection
//!   (`eject_after`, `eject_for`, single-probe recovery lease).
//! * [`checker`]: [`HealthChecker`], the owned background task probing every target
//!   concurrently each `health_check_interval`.
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
pub mod probe;
pub mod state;

pub use checker::{CheckerConfig, CheckerHandle, HealthChecker, ProbeTarget, ProbeTargets};
pub use probe::{HttpProbe, Probe, ProbeFuture, ProbeResult};
pub use state::{HealthCounters, HealthPolicy, HealthState, Status, Transition};
