use super::{BasicAuth, Credentials};
use std::sync::Arc;
use tower_layer::Layer;

/// Requires HTTP Basic credentials on the wrapped service (see the [module docs](super)).
#[derive(Debug, Clone)]
pub struct BasicAuthLayer {
    credentials: Arc<Credentials>,
}

impl BasicAuthLayer {
    /// A layer requiring `credentials`.
    pub fn new(credentials: Credentials) -> Self {
        Self {
            credentials: Arc::new(credentials),
        }
    }
}

impl<S> Layer<S> for BasicAuthLayer {
    type Service = BasicAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BasicAuth::new(inner, Arc::clone(&self.credentials))
    }
}
