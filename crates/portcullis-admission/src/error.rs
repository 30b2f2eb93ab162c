//! The typed errors of the generic [`Admission`](crate::Admission) service.
//!
//! Small marker errors, found in a `BoxError` with `err.is::<QueueTimeout>()` (or
//! `downcast_ref`), each convertible to the [`Rejection`] the HTTP form renders
//! ([`IntoRejection`]).

use portcullis_core::{BoxError, IntoRejection, Rejection};
use std::fmt;
use std::time::Duration;

/// The request waited in the admission queue for `queue_timeout` without getting a slot
/// (HTTP: 504 `queue_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueTimeout {
    waited: Duration,
}

impl QueueTimeout {
    /// A queue timeout after waiting `waited`.
    pub const fn new(waited: Duration) -> Self {
        Self { waited }
    }

    /// How long the request waited before giving up.
    pub const fn waited(&self) -> Duration {
        self.waited
    }
}

impl fmt::Display for QueueTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "waited {:.3}s in the admission queue without a slot",
            self.waited.as_secs_f64()
        )
    }
}

impl std::error::Error for QueueTimeout {}

impl IntoRejection for QueueTimeout {
    fn to_rejection(&self) -> Rejection {
        Rejection::queue_timeout(self.waited)
    }
}

/// No slot was free and the queue already held `max_queue` requests (HTTP: 503
/// `queue_full`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueFull(());

impl QueueFull {
    /// A new `QueueFull` error.
    pub const fn new() -> Self {
        Self(())
    }
}

impl fmt::Display for QueueFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("admission queue is full")
    }
}

impl std::error::Error for QueueFull {}

impl IntoRejection for QueueFull {
    fn to_rejection(&self) -> Rejection {
        Rejection::queue_full()
    }
}

/// The health source said nothing can serve the request, so it was refused before queueing
/// (HTTP: 503 `backend_unhealthy` with `Retry-After`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unhealthy(());

impl Unhealthy {
    /// A new `Unhealthy` error.
    pub const fn new() -> Self {
        Self(())
    }
}

impl fmt::Display for Unhealthy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("backend unhealthy")
    }
}

impl std::error::Error for Unhealthy {}

impl IntoRejection for Unhealthy {
    fn to_rejection(&self) -> Rejection {
        Rejection::backend_unhealthy()
    }
}

/// The capacity source's shared storage is unreachable and its policy is to reject (HTTP:
/// 503 `storage_unavailable`). The cause is the error's `source()`.
#[derive(Debug)]
pub struct StorageUnavailable {
    cause: BoxError,
}

impl StorageUnavailable {
    /// Wraps the storage error.
    pub fn new(cause: impl Into<BoxError>) -> Self {
        Self {
            cause: cause.into(),
        }
    }
}

impl fmt::Display for StorageUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("capacity storage unavailable")
    }
}

impl std::error::Error for StorageUnavailable {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.cause.as_ref())
    }
}

impl IntoRejection for StorageUnavailable {
    fn to_rejection(&self) -> Rejection {
        Rejection::storage_unavailable()
    }
}

/// Finds one of this crate's errors in `err` and returns its [`Rejection`].
pub fn rejection_of(err: &BoxError) -> Option<Rejection> {
    if let Some(e) = err.downcast_ref::<QueueTimeout>() {
        return Some(e.to_rejection());
    }
    if let Some(e) = err.downcast_ref::<QueueFull>() {
        return Some(e.to_rejection());
    }
    if let Some(e) = err.downcast_ref::<Unhealthy>() {
        return Some(e.to_rejection());
    }
    if let Some(e) = err.downcast_ref::<StorageUnavailable>() {
        return Some(e.to_rejection());
    }
    if let Some(e) = err.downcast_ref::<crate::DeadlineExceeded>() {
        return Some(e.to_rejection());
    }
    None
}
