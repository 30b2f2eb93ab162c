use portcullis_core::{IntoRejection, Rejection};
use std::fmt;

/// No replica can take the request: none is healthy (or all were removed), and panic mode
/// is off or the pool is empty.
///
/// The generic [`Balance`](crate::Balance) service fails with this error (boxed; find it with
/// `err.is::<NoHealthyReplica>()`); the HTTP form answers 503 `no_healthy_upstream` instead.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoHealthyReplica;

impl fmt::Display for NoHealthyReplica {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no healthy replica")
    }
}

impl std::error::Error for NoHealthyReplica {}

impl IntoRejection for NoHealthyReplica {
    fn to_rejection(&self) -> Rejection {
        Rejection::no_healthy_upstream()
    }
}
