//! Adaptive capacity: a limit that follows the backend at run time.
//!
//! A probed or configured capacity is true when it was measured; a model server changes
//! under it (a new model version, longer prompts, a neighbour on the same GPU, a lost
//! replica). [`AdaptiveCapacity`] wraps a [`CapacitySource`](crate::CapacitySource) and
//! moves its limit from what the admitted requests show:
//!
//! * **latency**: from the grant of the slot to the response head, or to the end of the
//!   body ([`LatencyMode`]), as a quantile of each window's samples ([`Observation`]);
//! * **outcome**: a 5xx or 429 answer or a transport error is an overload signal
//!   ([`Outcome`](crate::Outcome)).
//!
//! Once per window (250 ms by default, longer until it has `min_samples` samples) a
//! [`Controller`] computes the next limit, which is always inside `[min_capacity,
//! max_capacity]`, and applies it with the inner source's `set_capacity`: queued requests
//! keep their place, admitted ones their slot.
//!
//! # The controllers
//!
//! * [`Gradient`] (default): `limit × (min_rtt × (1 + buffer)) / sample_rtt`, the ratio
//!   clamped to [0.5, 2], plus √limit headroom, smoothed, with no growth while the
//!   in-flight count is far below the limit, and an overload backing the limit off. See
//!   [`gradient`] for the formulas.
//! * [`Aimd`]: +`increase` per window, ×`backoff` on an overload or a latency above
//!   `tolerance × min_rtt`. See [`aimd`].
//!
//! Both compare against `min_rtt`, the backend's no-load latency ([`MinRtt`]): measured
//! at start and again every `min_rtt_interval` (± `min_rtt_jitter`) during one window
//! held at `min_capacity`, so the estimate follows a backend that became slower for good
//! instead of drifting; any faster window lowers it at once.
//!
//! Sources: Envoy's adaptive concurrency filter (the gradient of a min-RTT to a sampled
//! RTT, √limit headroom, periodic min-RTT re-measurement at a low pinned concurrency with
//! jitter) and Netflix's concurrency-limits (`Gradient2Limit`'s smoothing and "no growth
//! while app-limited", `AIMDLimit`).
//!
//! # When the backend is down
//!
//! Failing answers are overload signals: the limit backs off to `min_capacity` and stays
//! there (it never goes lower) while the backend fails, and grows again once it answers.
//! No answers at all (every request queued or timed out) means no samples: the limit stays
//! where it is. The health gate in front refuses requests (503) while nothing can serve.
//!
//! # Several processes
//!
//! With shared storage, [`AdaptiveCapacity::shared`] takes a [`LimitLease`]: one process
//! at a time computes the limit from its samples and stores it for all (the Redis source
//! tells every process at once); the others apply it. See [`LimitLease`] for why and how
//! a dead holder is replaced.
//!
//! # Cost
//!
//! A sampled slot takes the time (one clock read) and one reference count; its outcome is
//! one more clock read and one atomic add into the window's histogram
//! (16 buckets per power of two). The clock is the CPU's time-stamp counter
//! ([`SampleClock`]): about 9 ns a read where `Instant::now()` costs 22–58 ns. On a busy
//! endpoint only about 100 slots per window are sampled; the others pay one relaxed load
//! and a thread-local counter. The controller runs in the source's own task, off the
//! request path.

pub mod aimd;
mod clock;
mod config;
mod controller;
pub mod gradient;
mod min_rtt;
mod source;
mod window;

pub use aimd::Aimd;
pub use clock::SampleClock;
pub use config::{AdaptiveConfig, Algorithm, LatencyMode};
pub use controller::{Controller, ControllerState, Phase};
pub use gradient::Gradient;
pub use min_rtt::MinRtt;
pub use source::{AdaptiveAcquire, AdaptiveCapacity, AdaptivePermit, LimitLease};
pub use window::Observation;
