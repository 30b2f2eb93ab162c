//! Why a probe gave no capacity.

use crate::measure::LevelMeasurement;

/// A probe that could not produce a capacity.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProbeError {
    /// The target cannot be turned into a request (bad URL, method, header or body).
    #[error("invalid probe target: {0}")]
    InvalidTarget(String),
    /// Concurrency 1 already fails: the endpoint is down or misconfigured. Nothing above
    /// level 1 was sent.
    #[error(
        "{target} already fails at concurrency 1 ({reason}); responses seen: {seen}. \
         Is the endpoint down or misconfigured?"
    )]
    FirstLevelFailed {
        /// The endpoint (`METHOD url`).
        target: String,
        /// Which thresholds level 1 exceeded (`"error rate 100.0% > 5.0%"`).
        reason: String,
        /// The outcome histogram (`"503 x32"`, `"connect error x32"`).
        seen: String,
        /// The full level-1 measurement.
        measurement: Box<LevelMeasurement>,
    },
}

impl ProbeError {
    /// The level-1 measurement when the endpoint failed at concurrency 1.
    pub fn measurement(&self) -> Option<&LevelMeasurement> {
        match self {
            ProbeError::FirstLevelFailed { measurement, .. } => Some(measurement),
            ProbeError::InvalidTarget(_) => None,
        }
    }
}
