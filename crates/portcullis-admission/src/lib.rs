//! Admission control: per-endpoint capacity, FIFO queue, 504 on queue timeout, 503 when unhealthy.
//!
//! (Under construction: the capacity-source trait and the in-process source are ready.)

#![forbid(unsafe_code)]

mod error;
mod local;
pub mod source;

pub use error::{rejection_of, QueueFull, QueueTimeout, StorageUnavailable, Unhealthy};
pub use local::{LocalAcquire, LocalCapacity, LocalPermit};
pub use source::{AcquireError, CapacitySource};
