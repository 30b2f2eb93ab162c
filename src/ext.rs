//! [`ServiceBuilderExt`]: the Portcullis layers as methods of tower's [`ServiceBuilder`], so a
//! stack reads in one chain, outermost first.
//!
//! ```
//! use axum::{routing::get, Router};
//! use portcullis::prelude::*;
//! use std::sync::Arc;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // Two in-process "replicas" on 127.0.0.1: the primary pool and an in-process fallback.
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let url = format!("http://{}", listener.local_addr().unwrap());
//! let app = Router::new().route("/work", get(|| async { "replica" }));
//! tokio::spawn(async move { axum::serve(listener, app).await });
//! let fallback = Router::new().route("/work", get(|| async { "fallback" }));
//!
//! let registry = ReplicaRegistry::new(&BalanceConfig::default());
//! registry.add(url.as_str(), Tier::Primary, url.clone());
//! let breaker = Breaker::builder(BreakerConfig::default()).build();
//! let endpoints = Endpoints::new().watch("/work", None, Arc::new(Limiter::local(4)));
//!
//! // Outermost first: admission, then the breaker, then the balancer over the client.
//! let client = ServiceBuilder::new()
//!     .admission(endpoints)
//!     .fallback(fallback, breaker)
//!     .balance(registry)
//!     .service(UpstreamClient::new());
//!
//! let req = http::Request::get("/work").body(axum::body::Body::empty()).unwrap();
//! let resp = client.oneshot(req).await.unwrap();
//! assert_eq!(resp.status(), 200);
//! # }
//! ```

use tower::layer::util::Stack;
use tower::ServiceBuilder;

/// Extension methods for [`ServiceBuilder`] adding the Portcullis HTTP layers (tower-http
/// style). Each is `.layer(XLayer::new(..))`; the methods present depend on the cargo
/// features (`admission`, `balance`, `breaker`).
pub trait ServiceBuilderExt<L>: sealed::Sealed {
    /// Admission control over `endpoints`:
    /// [`HttpAdmissionLayer::new`](crate::admission::HttpAdmissionLayer::new) (capacity, FIFO
    /// queue, 504 `queue_timeout`, 503 when unhealthy; the slot is held until the response
    /// body ends). For a health gate or `hold_on_client_cancel`, build the layer yourself and
    /// pass it to `.layer(..)`.
    #[cfg(feature = "admission")]
    fn admission<C: crate::admission::CapacitySource>(
        self,
        endpoints: crate::admission::Endpoints<C>,
    ) -> ServiceBuilder<Stack<crate::admission::HttpAdmissionLayer<C>, L>>;

    /// Health-gated balancing over `registry`:
    /// [`HttpBalanceLayer::new`](crate::balance::HttpBalanceLayer::new). The service under it
    /// gets `(payload, request)`; for replicas keyed by base URL that is
    /// [`UpstreamClient`](crate::client::UpstreamClient).
    #[cfg(feature = "balance")]
    fn balance<T>(
        self,
        registry: crate::balance::ReplicaRegistry<T>,
    ) -> ServiceBuilder<Stack<crate::balance::HttpBalanceLayer<T>, L>>;

    /// The circuit breaker: the service under it is the primary, `fallback` takes the traffic
    /// while `breaker` is tripped
    /// ([`HttpFallbackLayer::new`](crate::breaker::HttpFallbackLayer::new); an in-process
    /// fallback needs no `url`).
    #[cfg(feature = "breaker")]
    fn fallback<F>(
        self,
        fallback: F,
        breaker: crate::breaker::Breaker,
    ) -> ServiceBuilder<Stack<crate::breaker::HttpFallbackLayer<F>, L>>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    #[cfg(feature = "admission")]
    fn admission<C: crate::admission::CapacitySource>(
        self,
        endpoints: crate::admission::Endpoints<C>,
    ) -> ServiceBuilder<Stack<crate::admission::HttpAdmissionLayer<C>, L>> {
        self.layer(crate::admission::HttpAdmissionLayer::new(endpoints))
    }

    #[cfg(feature = "balance")]
    fn balance<T>(
        self,
        registry: crate::balance::ReplicaRegistry<T>,
    ) -> ServiceBuilder<Stack<crate::balance::HttpBalanceLayer<T>, L>> {
        self.layer(crate::balance::HttpBalanceLayer::new(registry))
    }

    #[cfg(feature = "breaker")]
    fn fallback<F>(
        self,
        fallback: F,
        breaker: crate::breaker::Breaker,
    ) -> ServiceBuilder<Stack<crate::breaker::HttpFallbackLayer<F>, L>> {
        self.layer(crate::breaker::HttpFallbackLayer::new(fallback, breaker))
    }
}

mod sealed {
    pub trait Sealed {}
    impl<L> Sealed for tower::ServiceBuilder<L> {}
}
