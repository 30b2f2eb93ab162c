use super::{DefaultClassifier, HttpBalance};
use crate::registry::ReplicaRegistry;
use std::fmt;
use tower_http::classify::{ServerErrorsAsFailures, SharedClassifier};
use tower_layer::Layer;

/// Wraps the shared proxy service `P: Service<(T, http::Request<B>)>` into an
/// [`HttpBalance`] over `registry`.
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
