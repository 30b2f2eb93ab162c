//! The generic form: any request type, the primary and the fallback are tower services.

mod future;
mod layer;
mod service;

pub use future::ResponseFuture;
pub use layer::FallbackLayer;
pub use service::Fallback;
