//! The HTTP form: tower-http response classification, `fallback_unavailable` responses and
//! one response body type for both sides.

mod body;
mod future;
mod layer;
mod service;

pub use body::FallbackBody;
pub use future::HttpResponseFuture;
pub use layer::HttpFallbackLayer;
pub use service::{DefaultClassifier, HttpFallback};
