//! The HTTP form: 503 `no_healthy_upstream` responses, response classification with
//! tower-http's `classify`, and the in-flight slot held until the response body ends.

mod body;
mod future;
mod layer;
mod service;

pub use body::BalanceBody;
pub use future::HttpResponseFuture;
pub use layer::HttpBalanceLayer;
pub use service::{DefaultClassifier, HttpBalance};
