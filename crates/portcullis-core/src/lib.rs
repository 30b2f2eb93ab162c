//! Shared building blocks for the Portcullis layers.
//!
//! Every refusal any Portcullis layer makes — a request that waited too long in the admission
//! queue, a pool with no healthy replica, an unreachable fallback — is described by one type,
//! [`Rejection`]. It carries the HTTP status, a stable machine-readable `error` code, a
//! human message and an optional `Retry-After`. It renders itself:
//!
//! * for plain HTTP as a JSON body `{"error": "<code>", "message": "..."}`;
//! * for gRPC requests (`content-type: application/grpc*`) as a *trailers-only* response whose
//!   `grpc-status` matches the HTTP status (`UNAVAILABLE` for 502/503, `DEADLINE_EXCEEDED`
//!   for 504), so tonic clients see a proper status instead of a protocol error.
//!
//! The crate also defines [`HealthSource`], the question "can anything serve right now?" that
//! the admission layer asks the balancer or the fallback before it queues a request, and
//! [`RejectionBody`], the response body type of the HTTP forms of the layers (either the inner
//! service's body or a small rejection body). [`ConfigError`] and [`seconds`] are the config
//! contract every crate shares: the typed error of each `validate()`, and durations written
//! as seconds. [`classify`] says which responses are failures for gRPC (`grpc-status` in
//! headers or trailers, a configurable set of codes) and picks the gRPC or the HTTP
//! classifier per request.
//!
//! ```
//! use portcullis_core::{Rejection, codes};
//! use std::time::Duration;
//!
//! let r = Rejection::queue_timeout(Duration::from_secs(5));
//! assert_eq!(r.status(), http::StatusCode::GATEWAY_TIMEOUT);
//! assert_eq!(r.code(), codes::QUEUE_TIMEOUT);
//! let resp = r.to_response::<()>(&http::HeaderMap::new());
//! assert_eq!(resp.headers()["content-type"], "application/json");
//! ```

#![forbid(unsafe_code)]

pub mod backoff;
mod body;
pub mod classify;
pub mod codes;
mod config;
mod grpc;
mod health;
mod rejection;

pub use body::RejectionBody;
pub use config::{seconds, ConfigError};
pub use grpc::{grpc_status_for, is_grpc_request, GrpcCode};
pub use health::{AlwaysHealthy, HealthSource};
pub use rejection::{IntoRejection, Rejection};

/// A boxed, thread-safe error, as used across the tower ecosystem.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
