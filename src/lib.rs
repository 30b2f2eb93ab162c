//! Portcullis: composable [`tower`] layers that keep backends from being overwhelmed, or hit
//! while sick.
//!
//! This facade crate re-exports the layer crates behind cargo features. (Under construction.)

#![forbid(unsafe_code)]

pub use portcullis_core as core;
pub use portcullis_core::{codes, Rejection};

#[cfg(feature = "gateway")]
pub mod gateway;
