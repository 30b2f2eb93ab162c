//! The HTTP form: per-endpoint admission for `http::Request<B>`, rejections rendered as
//! responses, the slot held until the response body ends.
//!
//! [`HttpAdmission`] looks the request path up in its [`Endpoints`]: the exact key first
//! (one hash lookup), then the `/*` prefix patterns, longest prefix first (see
//! [`Endpoints`] for the matching rule). A path that no key matches, or only keys whose
//! `method` filter the request does not match, passes straight to the inner service: no slot, no counting, the body untouched (only
//! wrapped). A watched request goes through the endpoint's [`Limiter`](crate::Limiter)
//! like in [`Admission`](crate::Admission), but refusals become responses built with
//! [`Rejection::to_response`](portcullis_core::Rejection::to_response): JSON
//! `{"error": "queue_timeout", "message": ...}` with 504, `queue_full` /
//! `backend_unhealthy` / `storage_unavailable` with 503 and `Retry-After`; gRPC requests
//! get a trailers-only response with the matching `grpc-status`.
//!
//! The response body is wrapped in an [`AdmissionBody`] that keeps the slot until the
//! last frame has been produced or the body is dropped: a streamed answer is load on the
//! backend until it ends.

mod body;
mod endpoints;
mod future;
mod layer;
mod service;

pub(crate) use body::ends_body;
pub use body::AdmissionBody;
pub use endpoints::Endpoints;
pub use future::ResponseFuture;
pub use layer::HttpAdmissionLayer;
pub use service::HttpAdmission;
