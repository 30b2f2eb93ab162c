//! Health checking for Portcullis.
//!
//! * [`probe`]: the [`Probe`] trait (one health check of one target) and [`HttpProbe`], the
//!   real HTTP implementation on one shared pooled client.
//!
//! (More modules land with the balance and operator-surface work.)

#![forbid(unsafe_code)]

pub mod probe;

pub use probe::{HttpProbe, Probe, ProbeFuture, ProbeResult};
