//! The HTTP form: 503 `no_healthy_upstream` responses, response classification with
//! tower-http's `classify`, and the in-flight slot held until the response body ends.
//!
//! For gRPC, give the balancer [`ProtocolClassifier`] (what the gateway uses: the
//! configurable `grpc_failure_codes` for `content-type: application/grpc*`, 5xx for the rest;
//! [`Config::classifier`](crate::Config::classifier) builds it from the config) or
//! [`GrpcFailures`] with [`HttpBalance::with_classifier`]: a failed call's `grpc-status`,
//! in the headers or in the trailers at the end of the body, then counts towards
//! `eject_after`.
//!
//! [`RetryingHttpBalance`] is the same balancer with retries: a request the proxy could not
//! send, or a buffered idempotent one after a 502/503, goes to another replica within the
//! pool's budget (see [`crate::retry`]).

mod body;
mod future;
mod layer;
mod retry;
mod service;

pub use body::BalanceBody;
pub use future::HttpResponseFuture;
pub use layer::HttpBalanceLayer;
pub use portcullis_core::classify::{GrpcCodeSet, GrpcFailures, ProtocolClassifier};
pub use retry::{RetryResponseFuture, RetryingHttpBalance, RetryingResponse};
pub use service::{DefaultClassifier, HttpBalance};
