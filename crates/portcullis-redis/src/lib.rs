//! Redis-shared in-flight counter, capacity store and readiness check.
//!
//! Several gateway processes, on one host or many, share **one** admission limit per
//! endpoint through Redis (reference: fastapi-balancer's multi-worker deployment, where the
//! first worker probes and the others reuse the stored capacity; its readiness is a cached
//! Redis PING loop as in the Stargazer `HealthServer`). Unlike the reference, slots are
//! *leases* of a process instance: a worker killed mid-request does not leak its slots, they
//! are reclaimed within `lease_ttl`.
//!
//! # Pieces
//!
//! * [`RedisStorage`]: one per process; the connection (reconnecting by itself; a Redis
//!   Cluster is detected), the instance id, the heartbeat / PING / pub/sub tasks, and the
//!   capacity store ([`get_or_probe`](RedisStorage::get_or_probe),
//!   [`store_capacity`](RedisStorage::store_capacity)).
//! * [`RedisCapacity`]: the [`CapacitySource`](portcullis_admission::CapacitySource) of one
//!   endpoint for `portcullis-admission`'s layers (see [`capacity`] for the algorithm).
//! * [`Readiness`]: the cached PING result, for `/readyz` (a
//!   [`HealthSource`](portcullis_core::HealthSource)).
//! * [`StorageConfig`]: the serde `storage:` section.
//! * [`scripts`]: the key layout and the Lua scripts.
//! * `testing` (feature `testing`): private `redis-server` and Redis Cluster processes for
//!   tests.
//!
//! # Files
//!
//! Bottom to top (each file uses only those above it): `config`, `error`, [`scripts`],
//! `slots` (an endpoint's slot accounting, pure), `capacity_cell` (an endpoint's capacity
//! and a local change not stored yet), `outage` (the outage state machine),
//! `connection` (connection and TLS setup, bounded calls), `process` (the process-wide
//! state and the outage's start and end), `endpoint` (one endpoint's state and script
//! calls), `dispatcher` (one endpoint's task), [`capacity`] (the source and its permit),
//! `registry` (the live sources), `readiness`, `tasks` (heartbeat, PING, pub/sub),
//! `storage` (the handle) and `capacity_store` (`get_or_probe`).
//!
//! # Example
//!
//! ```no_run
//! use portcullis_admission::{CapacitySource, Config, HttpAdmissionLayer, Endpoints};
//! use portcullis_redis::{RedisStorage, StorageConfig};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let storage = RedisStorage::connect(&StorageConfig::redis("redis://127.0.0.1:6379")).await?;
//! // The first process probes (here: a fixed 8), the others reuse the stored value.
//! let capacity = storage.get_or_probe("/work", false, || async { Ok::<_, std::io::Error>(8) }).await?;
//! let config: Config = serde_json::from_str(r#"{"endpoints": {"/work": {}}}"#)?;
//! let endpoints = Endpoints::from_config_with(&config, |path, _| {
//!     storage.capacity_source(path, capacity)
//! })?;
//! let layer = HttpAdmissionLayer::new(endpoints);
//! let ready = storage.readiness(); // `/readyz`: ready.is_ready()
//! # let _ = (layer, ready); Ok(()) }
//! ```
//!
//! A runnable end-to-end use (needs a local `redis-server`) is in `tests/shared.rs`.

#![forbid(unsafe_code)]

mod adaptive_lease;
pub mod capacity;
mod capacity_cell;
mod capacity_store;
mod config;
mod connection;
mod dispatcher;
mod endpoint;
mod error;
mod outage;
mod process;
mod readiness;
mod registry;
pub mod scripts;
mod slots;
mod storage;
mod tasks;
#[cfg(feature = "testing")]
pub mod testing;

pub use adaptive_lease::{AdaptiveLease, LEASE_WINDOWS};
pub use capacity::{RedisAcquire, RedisCapacity, RedisPermit};
pub use config::{
    redact_url, OnError, StorageConfig, StorageType, DEFAULT_FAILURE_THRESHOLD, DEFAULT_KEY_PREFIX,
    DEFAULT_LEASE_TTL, DEFAULT_PING_INTERVAL, DEFAULT_TIMEOUT,
};
pub use error::StorageError;
pub use readiness::Readiness;
pub use storage::RedisStorage;

/// How often a process with queued waiters re-tries Redis without a notification.
pub const POLL_INTERVAL: std::time::Duration = dispatcher::POLL_INTERVAL;

/// How long a process's entry in an endpoint's cross-process queue lives without a retry
/// (a process that dies while queued holds back one free slot for at most this long).
pub const QUEUE_TTL: std::time::Duration = endpoint::QUEUE_TTL;
