use super::{DefaultClassifier, HttpBalance};
use crate::registry::ReplicaRegistry;
use std::fmt;
use tower_http::classify::{ServerErrorsAsFailures, SharedClassifier};
use tower_layer::Layer;

/// Wraps the shared proxy service `P: Service<(T, http::Request<B>)>` into an
/// [`HttpBalance`] over `registry`.
///
/// # Example
///
/// ```
/// use http::{Request, Response};
/// use portcullis_balance::{Config, HttpBalanceLayer, ReplicaRegistry, RoutingStrategy, Tier};
/// use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), std::convert::Infallible> {
/// let config = Config {
///     routing_strategy: RoutingStrategy::RoundRobin,
///     eject_after: 2,
///     ..Config::default()
/// };
/// let registry = ReplicaRegistry::new(&config);
/// registry.add("a", Tier::Primary, 1u32);
/// registry.add("b", Tier::Primary, 2u32);
/// let mut client = ServiceBuilder::new()
///     .layer(HttpBalanceLayer::new(registry.clone()))
///     .service(service_fn(|(replica, _req): (u32, Request<String>)| async move {
///         // 500 from replica 2: a failure, counted towards its passive ejection.
///         let status = if replica == 2 { 500 } else { 200 };
///         let mut resp = Response::new(String::new());
///         *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
///         Ok::<_, std::convert::Infallible>(resp)
///     }));
/// for _ in 0..4 {
///     let _ = client.ready().await?.call(Request::new(String::new())).await?;
/// }
/// // Two consecutive 500s: replica 2 is ejected, replica 1 serves on.
/// let snapshot = registry.snapshot();
/// assert!(snapshot.replicas.iter().any(|r| r.url == "b" && r.ejected));
/// assert!(snapshot.replicas.iter().any(|r| r.url == "a" && !r.ejected));
/// # Ok(())
/// # }
/// ```
pub struct HttpBalanceLayer<T, M = DefaultClassifier> {
    registry: ReplicaRegistry<T>,
    classifier: M,
}

impl<T> HttpBalanceLayer<T> {
    /// A layer balancing over `registry`; 5xx responses and errors count as failures.
    pub fn new(registry: ReplicaRegistry<T>) -> Self {
        Self {
            registry,
            classifier: SharedClassifier::new(ServerErrorsAsFailures::new()),
        }
    }
}

impl<T, M> HttpBalanceLayer<T, M> {
    /// Uses `classifier` to decide which responses are failures (e.g.
    /// `GrpcErrorsAsFailures::make_classifier()`, or `StatusInRangeAsFailures`).
    pub fn with_classifier<M2>(self, classifier: M2) -> HttpBalanceLayer<T, M2> {
        HttpBalanceLayer {
            registry: self.registry,
            classifier,
        }
    }
}

impl<T, M: Clone> Clone for HttpBalanceLayer<T, M> {
    fn clone(&self) -> Self {
        Self {
            registry: self.registry.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

impl<T, M: fmt::Debug> fmt::Debug for HttpBalanceLayer<T, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpBalanceLayer")
            .field("registry", &self.registry)
            .field("classifier", &self.classifier)
            .finish()
    }
}

impl<P, T, M: Clone> Layer<P> for HttpBalanceLayer<T, M> {
    type Service = HttpBalance<P, T, M>;

    fn layer(&self, inner: P) -> Self::Service {
        HttpBalance::new(inner, self.registry.clone()).with_classifier(self.classifier.clone())
    }
}
