//! The atomics of this crate's lock-free state, swappable for loom's.
//!
//! A normal build uses `std::sync::atomic`; a `--cfg portcullis_loom` build uses
//! `loom::sync::atomic`, so the loom models in `tests/loom_*.rs` explore every interleaving
//! (and every weak-memory read loom models) of the real code. Only the loom models may run a
//! `--cfg portcullis_loom` build: loom's atomics panic outside `loom::model`. (Not `--cfg
//! loom`: tokio reads that one and drops `tokio::net`, which hyper-util needs.)

#[cfg(portcullis_loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(portcullis_loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
