//! Test support shared by the Portcullis crates: bounded waits for a condition.
//!
//! Integration tests often have to wait for something that happens in the background (a
//! connection closing, a health check flipping, a counter in Redis going back to zero). The
//! functions here poll the condition every [`POLL_INTERVAL`] on the tokio clock, so under a
//! paused clock (`#[tokio::test(start_paused = true)]`) they advance virtual time instead of
//! sleeping, and every wait is bounded by the limit the caller gives.
//!
//! ```
//! use portcullis_testkit::eventually;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let polls = AtomicUsize::new(0);
//! let held = eventually(Duration::from_secs(1), || {
//!     polls.fetch_add(1, Ordering::Relaxed) >= 3
//! })
//! .await;
//! assert!(held);
//! assert!(!eventually(Duration::from_millis(20), || false).await);
//! # }
//! ```
#![forbid(unsafe_code)]

use std::time::Duration;
use tokio::time::Instant;

/// How long the waits sleep between two checks of the condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Checks `cond` every [`POLL_INTERVAL`] until it holds or `within` has passed on the tokio
/// clock; returns whether it held.
///
/// The condition is checked once more after the limit has passed, so a condition that
/// becomes true during the last sleep still counts.
pub async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    eventually_async(within, async || cond()).await
}

/// [`eventually`] for a condition that has to await (an HTTP request, a Redis command).
///
/// The time a check itself takes counts against `within`; a check that is still running when
/// the limit passes is awaited to its end.
pub async fn eventually_async(within: Duration, mut cond: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[tokio::test(start_paused = true)]
    async fn a_condition_that_becomes_true_in_time_is_reported() {
        let start = Instant::now();
        let held = eventually(Duration::from_secs(1), || {
            start.elapsed() >= Duration::from_millis(300)
        })
        .await;
        assert!(held);
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_condition_that_never_holds_times_out_at_the_limit() {
        let start = Instant::now();
        let checks = Cell::new(0u32);
        let held = eventually(Duration::from_millis(100), || {
            checks.set(checks.get() + 1);
            false
        })
        .await;
        assert!(!held);
        assert!(start.elapsed() >= Duration::from_millis(100));
        assert!(start.elapsed() < Duration::from_millis(100) + 2 * POLL_INTERVAL);
        // Checked at the start, after every sleep, and once past the limit.
        assert_eq!(checks.get(), 11);
    }

    #[tokio::test(start_paused = true)]
    async fn an_async_condition_is_awaited_on_each_check() {
        let start = Instant::now();
        let checks = Cell::new(0u32);
        let held = eventually_async(Duration::from_secs(1), async || {
            tokio::time::sleep(Duration::from_millis(1)).await;
            checks.set(checks.get() + 1);
            checks.get() == 5
        })
        .await;
        assert!(held);
        assert_eq!(checks.get(), 5);
        assert!(start.elapsed() < Duration::from_secs(1));
        assert!(!eventually_async(Duration::from_millis(50), async || false).await);
    }
}
