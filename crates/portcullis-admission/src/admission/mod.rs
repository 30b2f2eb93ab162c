//! The generic admission middleware: any request type, typed errors.
//!
//! [`Admission`] accepts every call (`poll_ready` only forwards the inner service's
//! readiness) and makes the response future wait, in strict FIFO order, for a slot of its
//! [`Limiter`](crate::Limiter), up to `queue_timeout`. It fails with the marker errors
//! [`QueueTimeout`](crate::QueueTimeout), [`QueueFull`](crate::QueueFull),
//! [`Unhealthy`](crate::Unhealthy) or [`StorageUnavailable`](crate::StorageUnavailable)
//! (downcast the `BoxError`). The slot is released when the inner response future
//! completes (or is dropped); use [`HttpAdmission`](crate::HttpAdmission) to hold it until
//! an HTTP response body ends.

mod future;
mod layer;
mod service;

pub use future::ResponseFuture;
pub use layer::AdmissionLayer;
pub use service::Admission;
