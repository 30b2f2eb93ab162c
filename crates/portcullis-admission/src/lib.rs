//! Admission control: per-endpoint capacity, strict FIFO queue, 504 on queue timeout, 503
//! when unhealthy — as tower layers.
//!
//! Reference behaviour: fastapi-balancer's middleware. For every request to a watched
//! endpoint: backend unhealthy → 503; a slot free → admit, release on completion; slots full
//! → wait in a FIFO queue; waited longer than `queue_timeout` → 504. Unwatched paths pass
//! through unchanged. No request is silently dropped.
//!
//! # Pieces
//!
//! * [`CapacitySource`] ([`source`]): where slots come from — counting, the FIFO queue of
//!   waiters, RAII permits, runtime capacity. [`LocalCapacity`] is the in-process source
//!   (a fair tokio semaphore: one compare-and-swap when a slot is free); the Redis-shared
//!   source lives in `portcullis-redis`.
//! * [`adaptive`]: [`AdaptiveCapacity`](adaptive::AdaptiveCapacity), a source wrapper whose
//!   limit follows the backend at run time (gradient or AIMD controller over each window's
//!   latency and overload signals), inside `[min_capacity, max_capacity]`.
//! * [`Limiter`]: one endpoint's source, `queue_timeout`, `max_queue` and counters, shared by
//!   every connection.
//! * [`Admission`] / [`AdmissionLayer`]: the generic form (any request type), failing with
//!   the downcastable marker errors [`QueueTimeout`], [`QueueFull`], [`Unhealthy`],
//!   [`StorageUnavailable`] (all [`IntoRejection`](portcullis_core::IntoRejection)).
//! * [`HttpAdmission`] / [`HttpAdmissionLayer`]: the HTTP form, with per-endpoint settings
//!   ([`Endpoints`]: exact path or `/*` prefix pattern, + optional method; see
//!   [below](#which-endpoint-a-request-belongs-to)), refusals rendered by
//!   [`Rejection::to_response`](portcullis_core::Rejection::to_response) (JSON, or gRPC
//!   trailers-only), and the slot held by the response body ([`AdmissionBody`]).
//! * [`AdmissionStats`] / [`EndpointStats`]: live, I/O-free, serde-serializable stats in the
//!   `/balancer/stats` shape (capacity, active, available), with queue depth, counters and a
//!   queue-wait histogram.
//! * [`Config`] / [`EndpointConfig`]: the serde configuration.
//!
//! # Which endpoint a request belongs to
//!
//! An endpoint key is an exact path (`/predict`) or a prefix pattern ending in `/*`
//! (`/v1/models/*`). A pattern matches its prefix itself (`/v1/models`) and every path
//! under it on a `/` boundary (`/v1/models/a`, `/v1/models/a/b`, but not `/v1/modelsX`),
//! and is one endpoint: one limiter whose capacity and queue every matched path shares,
//! with stats under the pattern key. For each request the exact key is tried first (one
//! hash lookup, which is all an exact-only configuration ever pays), then the patterns,
//! longest prefix first, without allocating; the first key whose `method` filter accepts
//! the request applies. Details in [`Endpoints`].
//!
//! # How a request is admitted
//!
//! Unlike tower's `ConcurrencyLimit`, which pushes back through `poll_ready`, these layers
//! accept every call and make the *response future* wait for a slot:
//!
//! 1. `call` asks the health source ([`HealthSource`](portcullis_core::HealthSource)); when
//!    nothing can serve, the request is refused at once (503 `backend_unhealthy`,
//!    `Retry-After`) without touching the backend.
//! 2. `call` tries to take a free slot ([`CapacitySource::try_acquire`]: one atomic
//!    operation for [`LocalCapacity`]); on success the inner service is called right away.
//! 3. Otherwise the response future joins the source's FIFO queue and waits, up to
//!    `queue_timeout`, then fails with 504 `queue_timeout`. With `max_queue` set, a request
//!    that finds the queue full is refused at once (503 `queue_full`).
//! 4. The slot is an RAII permit: the generic form releases it when the inner response
//!    future completes; the HTTP form moves it into the response body and releases it when
//!    the body ends or is dropped.
//!
//! ## Why the slot is taken in `call`, never in `poll_ready`
//!
//! hyper drives one service per connection and calls `poll_ready` *before a request
//! exists* — as soon as the connection is ready to read the next request. A limiter that
//! reserves its permit in `poll_ready` (as `tower::limit::ConcurrencyLimit` does) therefore
//! has its permits held by idle keep-alive connections: eight idle connections can starve a
//! capacity-8 endpoint while the backend does nothing, and a connection that never sends
//! another request never gives its permit back. Taking the slot in the response future ties
//! it to a real request, whose lifetime (including a client disconnect) the future's drop
//! observes. `poll_ready` here only forwards the inner service's readiness.
//!
//! ## Cancellation and panics
//!
//! Every slot is an RAII guard and every wait is a future the caller may drop: a client
//! that disconnects while queued leaves the queue at once (its position is not held, no
//! slot is granted to it); one that disconnects while admitted drops the response future or
//! body, which releases the slot. A panic in the inner service unwinds through the future
//! that owns the permit and releases it the same way.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Full};
//! use portcullis_admission::{Config, HttpAdmissionLayer};
//! use std::time::Duration;
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let config: Config = serde_json::from_value(serde_json::json!({
//!     "queue_timeout": 1.0,
//!     "endpoints": {"/work": {"capacity": 1}}
//! })).unwrap();
//! let layer = HttpAdmissionLayer::from_config(&config, 1).unwrap();
//! let svc = layer.layer(service_fn(|_req: Request<()>| async {
//!     tokio::time::sleep(Duration::from_secs(5)).await;
//!     Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("done"))))
//! }));
//!
//! let first = tokio::spawn(svc.clone().oneshot(Request::get("/work").body(()).unwrap()));
//! tokio::task::yield_now().await;
//! // The only slot is taken: the second request waits 1 s, then gets 504.
//! let resp = svc.clone().oneshot(Request::get("/work").body(()).unwrap()).await.unwrap();
//! assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
//! let body = resp.into_body().collect().await.unwrap().to_bytes();
//! assert!(body.starts_with(br#"{"error":"queue_timeout""#));
//!
//! let stats = layer.endpoints().stats();
//! assert_eq!((stats.endpoints["/work"].active_requests, stats.endpoints["/work"].timed_out_504), (1, 1));
//! assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
//! # }
//! ```

#![forbid(unsafe_code)]

pub mod adaptive;
pub mod admission;
mod admit;
pub mod config;
pub mod deadline;
mod error;
pub mod hold;
pub mod http;
mod limiter;
pub mod local;
mod pattern;
pub mod source;
mod stats;
mod sync;

pub use crate::admit::AdmissionSlot;
pub use crate::hold::{
    HeldSlot, HoldBody, HoldFuture, HoldOnCancel, HoldOnCancelLayer, HoldableBody, OnClientCancel,
};
pub use crate::http::{AdmissionBody, Endpoints, HttpAdmission, HttpAdmissionLayer};
pub use admission::{Admission, AdmissionLayer};
pub use config::{Config, EndpointConfig};
pub use deadline::DeadlineExceeded;
pub use error::{rejection_of, QueueFull, QueueTimeout, StorageUnavailable, Unhealthy};
pub use limiter::{Limiter, DEFAULT_QUEUE_TIMEOUT};
pub use local::{LocalAcquire, LocalCapacity, LocalPermit};
pub use source::{AcquireError, CapacitySource, Outcome};
pub use stats::{
    AdaptiveStats, AdmissionStats, EndpointStats, QueueWaitHistogram, WaitBucket,
    QUEUE_WAIT_BUCKETS,
};
