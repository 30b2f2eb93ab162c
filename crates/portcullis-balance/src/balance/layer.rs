use super::Balance;
use crate::registry::ReplicaRegistry;
use std::fmt;
use tower_layer::Layer;

/// Wraps a dispatch service `P: Service<(T, Req)>` into a [`Balance`] over `registry`.
pub struct BalanceLayer<T> {
    registry: ReplicaRegistry<T>,
}

impl<T> BalanceLayer<T> {
    /// A layer balancing over `registry`.
    pub const fn new(registry: ReplicaRegistry<T>) -> Self {
        Self { registry }
    }
}

impl<T> Clone for BalanceLayer<T> {
    fn clone(&self) -> Self {
        Self {
            registry: self.registry.clone(),
        }
    }
}

impl<T> fmt::Debug for BalanceLayer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalanceLayer")
            .field("registry", &self.registry)
            .finish()
    }
}

impl<P, T> Layer<P> for BalanceLayer<T> {
    type Service = Balance<P, T>;

    fn layer(&self, inner: P) -> Self::Service {
        Balance::with_dispatch(inner, self.registry.clone())
    }
}
