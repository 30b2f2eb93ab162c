//! The generic balancer: any request type, replicas as tower services (or any payload).

mod future;
mod layer;
mod service;

pub use future::ResponseFuture;
pub use layer::BalanceLayer;
pub use service::{Balance, CallReplica};
