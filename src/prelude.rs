//! The types a user of the layers names every time: `use portcullis::prelude::*;`.
//!
//! What is here depends on the cargo features; the configuration types are renamed by crate
//! (`BalanceConfig`, `BreakerConfig`, `AdmissionConfig`).

pub use portcullis_core::{BoxError, Rejection};

#[cfg(any(feature = "admission", feature = "balance", feature = "breaker"))]
pub use crate::ext::ServiceBuilderExt;

#[cfg(feature = "admission")]
pub use portcullis_admission::{
    CapacitySource, Config as AdmissionConfig, Endpoints, HttpAdmissionLayer, Limiter,
    LocalCapacity,
};

#[cfg(feature = "balance")]
pub use crate::client::UpstreamClient;
#[cfg(feature = "balance")]
pub use portcullis_balance::{
    Config as BalanceConfig, HttpBalance, HttpBalanceLayer, ReplicaRegistry, RoutingStrategy, Tier,
};

#[cfg(feature = "breaker")]
pub use portcullis_breaker::{
    Breaker, BreakerState, Config as BreakerConfig, HttpFallback, HttpFallbackLayer,
};

#[cfg(feature = "health")]
pub use portcullis_health::{HealthRegistry, HttpProbe, Probe, ProbeFuture, ProbeResult};

#[cfg(feature = "dashboard")]
pub use portcullis_dashboard::{router_for, AdmissionSource, Stats, StatsSource, UiConfig};
