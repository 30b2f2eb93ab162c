//! Retries: the `retry:` config, a pool's run-time [`Retries`] policy, and the
//! [`RetryBudget`] that bounds them.
//!
//! # What is retried
//!
//! * A request the proxy could not send at all ([`NotSent`]: the connection to the replica
//!   failed before any byte was written: refused, reset on connect, connect timeout) is
//!   sent again to another healthy replica, whatever its method: the upstream never saw it,
//!   and its body was never read, so it is handed back whole (no buffering).
//! * With `retry.on: [5xx]`, an idempotent request (GET, HEAD, OPTIONS, PUT, DELETE) whose
//!   body the caller buffered ([`ReplayBody`]) is also sent again after a 502 or 503. A
//!   POST is never retried once its bytes reached the upstream.
//!
//! Each retry goes to a replica not yet tried, takes one unit of the budget and counts in
//! [`RetryCounts::retries`]; a retry the budget refused counts in
//! [`RetryCounts::retries_budget_exhausted`]. `max_attempts` counts the first attempt.
//!
//! # The budget
//!
//! Every original request *deposits* into the budget and every retry *withdraws* from it. A
//! retry is allowed while the retries of the last `window` stay below `ratio` times the
//! requests of the same window, plus `min_per_second × window` so that a quiet service can
//! still retry a lone failure (linkerd's retry budget, Envoy's `retry_budget`). Under an
//! outage every request fails, every request wants a retry, and the budget caps the extra
//! load at `ratio` (20% by default) instead of letting retries multiply it by
//! `max_attempts`.
//!
//! The window is a ring of one-second buckets, each tagged with the second it counts. A
//! bucket found tagged with an older second is reset by whoever reaches it first. Deposits
//! and withdrawals are single atomic adds, so the budget takes no lock; two retries racing
//! for the last unit of budget can both pass, overshooting by at most the number of
//! concurrent withdrawals, which is accepted (the bound is what matters under an outage, not
//! the last retry).
//!
//! Written here rather than taken from `tower::retry::budget::TpsBudget` because that
//! budget keeps its deposits as a token balance with a leaky ttl, which cannot report the
//! requests and retries of the window (the operator's stats), and it takes a `Mutex` to
//! rotate its slots.

use bytes::Bytes;
use http::Request;
use portcullis_core::{BoxError, ConfigError};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// The window of a pool's retry budget: the requests and retries of the last 10 seconds.
pub const RETRY_BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// The most attempts `retry.max_attempts` may allow (the first one included).
pub const MAX_RETRY_ATTEMPTS: u32 = 10;

/// The largest `retry.buffer_limit`: 16 MiB.
pub const MAX_RETRY_BUFFER: usize = 16 << 20;

/// A response class after which a buffered idempotent request is retried (`retry.on`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RetryOn {
    /// `5xx`: a 502 or 503 from the upstream (a 500 is the application's own answer, a 504
    /// took too long to be worth repeating).
    #[serde(rename = "5xx")]
    ServerErrors,
}

/// The `retry:` section (part of the gateway's YAML contract).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Retries may add at most this share, in percent, of the requests of the last 10 s
    /// (default 20).
    pub budget_percent: f64,
    /// Retries allowed per second on top of `budget_percent`, so that a quiet pool can still
    /// retry a lone failure (default 10, as linkerd's).
    pub min_retries_per_second: f64,
    /// Attempts per request, the first one included (default 2; 1 turns retries off).
    pub max_attempts: u32,
    /// The responses after which a buffered idempotent request is retried (default none:
    /// only requests that were never sent are retried).
    pub on: Vec<RetryOn>,
    /// The largest request body buffered for a retry after a 5xx, in bytes (default 64 KiB);
    /// a longer body, or one of unknown length, is streamed and not retried after a 5xx.
    pub buffer_limit: usize,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            budget_percent: 20.0,
            min_retries_per_second: 10.0,
            max_attempts: 2,
            on: Vec::new(),
            buffer_limit: 64 << 10,
        }
    }
}

impl RetryConfig {
    /// Checks every field; an error names it relative to the section (`max_attempts`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.budget_percent.is_finite() && (0.0..=100.0).contains(&self.budget_percent)) {
            return Err(ConfigError::new(
                "budget_percent",
                format!(
                    "must be a percentage from 0 to 100, got {}",
                    self.budget_percent
                ),
            ));
        }
        if !(self.min_retries_per_second.is_finite() && self.min_retries_per_second >= 0.0) {
            return Err(ConfigError::new(
                "min_retries_per_second",
                format!(
                    "must be a number of retries per second, zero or more, got {}",
                    self.min_retries_per_second
                ),
            ));
        }
        if !(1..=MAX_RETRY_ATTEMPTS).contains(&self.max_attempts) {
            return Err(ConfigError::new(
                "max_attempts",
                format!(
                    "must be 1 (no retries) to {MAX_RETRY_ATTEMPTS}, counting the first attempt, got {}",
                    self.max_attempts
                ),
            ));
        }
        if self.buffer_limit > MAX_RETRY_BUFFER {
            return Err(ConfigError::new(
                "buffer_limit",
                format!(
                    "must be at most {MAX_RETRY_BUFFER} bytes (16 MiB), got {}",
                    self.buffer_limit
                ),
            ));
        }
        for (i, on) in self.on.iter().enumerate() {
            if self.on[..i].contains(on) {
                return Err(ConfigError::new(format!("on[{i}]"), "listed twice"));
            }
        }
        Ok(())
    }
}

/// What a pool's retries counted since start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RetryCounts {
    /// Retries sent (each attempt after the first).
    pub retries: u64,
    /// Retries wanted and refused because the budget was spent.
    pub retries_budget_exhausted: u64,
}

/// The retry policy of one pool at run time: its limits, its [`RetryBudget`] and its
/// counters. Shared by every request of the pool (behind an `Arc`); atomics only.
#[derive(Debug)]
pub struct Retries {
    max_attempts: u32,
    on_server_errors: bool,
    buffer_limit: usize,
    budget: RetryBudget,
    retries: AtomicU64,
    budget_exhausted: AtomicU64,
}

impl Retries {
    /// The policy of a (validated) `retry:` section, with a budget over
    /// [`RETRY_BUDGET_WINDOW`].
    pub fn new(config: &RetryConfig) -> Self {
        Self {
            max_attempts: config.max_attempts.max(1),
            on_server_errors: config.on.contains(&RetryOn::ServerErrors),
            buffer_limit: config.buffer_limit,
            budget: RetryBudget::new(
                config.budget_percent / 100.0,
                config.min_retries_per_second,
                RETRY_BUDGET_WINDOW,
            ),
            retries: AtomicU64::new(0),
            budget_exhausted: AtomicU64::new(0),
        }
    }

    /// A policy that never retries (`max_attempts: 1`).
    pub fn disabled() -> Self {
        Self::new(&RetryConfig {
            max_attempts: 1,
            ..RetryConfig::default()
        })
    }

    /// Attempts per request, the first one included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// `true` when buffered idempotent requests are retried after a 502/503 (`on: [5xx]`
    /// and more than one attempt).
    pub fn on_server_errors(&self) -> bool {
        self.on_server_errors && self.max_attempts > 1
    }

    /// The largest request body buffered for a retry after a 5xx, in bytes.
    pub fn buffer_limit(&self) -> usize {
        self.buffer_limit
    }

    /// Counts an original request in the budget (once per request, not per attempt).
    pub fn deposit(&self) {
        if self.max_attempts > 1 {
            self.budget.deposit();
        }
    }

    /// Takes one retry from the budget: `true` (counted in `retries`) when it may be sent,
    /// `false` (counted in `retries_budget_exhausted`) when the budget is spent.
    pub fn try_withdraw(&self) -> bool {
        if self.budget.try_withdraw() {
            self.retries.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            self.budget_exhausted.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// The counters since start.
    pub fn counts(&self) -> RetryCounts {
        RetryCounts {
            retries: self.retries.load(Ordering::Relaxed),
            retries_budget_exhausted: self.budget_exhausted.load(Ordering::Relaxed),
        }
    }

    /// The budget's requests and retries over its window.
    pub fn budget_counts(&self) -> RetryBudgetCounts {
        self.budget.counts()
    }
}

/// `true` for the methods a request may be repeated with (RFC 9110 §9.2.2, less TRACE):
/// GET, HEAD, OPTIONS, PUT, DELETE.
pub fn is_idempotent(method: &http::Method) -> bool {
    matches!(
        *method,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::OPTIONS
            | http::Method::PUT
            | http::Method::DELETE
    )
}

/// A request the proxy did not send: nothing of it reached the replica (the connection
/// failed before any byte was written), so it is handed back whole, body unread, to be sent
/// to another replica ([`RetryingHttpBalance`](crate::http::RetryingHttpBalance)).
pub struct NotSent<B> {
    request: Request<B>,
    reason: BoxError,
}

impl<B> NotSent<B> {
    /// `request` was not sent, because of `reason` (a connect error).
    pub fn new(request: Request<B>, reason: impl Into<BoxError>) -> Self {
        Self {
            request,
            reason: reason.into(),
        }
    }

    /// Why the request was not sent.
    pub fn reason(&self) -> &BoxError {
        &self.reason
    }

    /// The request, as it was given to the proxy.
    pub fn into_request(self) -> Request<B> {
        self.request
    }
}

impl<B> fmt::Debug for NotSent<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NotSent")
            .field("method", self.request.method())
            .field("uri", self.request.uri())
            .field("reason", &self.reason)
            .finish()
    }
}

impl<B> fmt::Display for NotSent<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request not sent: {}", self.reason)
    }
}

impl<B> std::error::Error for NotSent<B> {}

/// A request extension holding a copy of the whole request body, so that the balancer may
/// send the request again after a 5xx (`retry.on: [5xx]`). Whoever buffered the body inserts
/// it; [`RetryingHttpBalance`](crate::http::RetryingHttpBalance) reads it.
#[derive(Debug, Clone)]
pub struct ReplayBody(pub Bytes);

/// Buckets of one second each; windows longer than this are rounded down to it.
const MAX_BUCKETS: usize = 60;

/// The retry budget of one pool (see the [module docs](self)). Shared by reference.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_window: f64,
    start: Instant,
    buckets: Box<[Bucket]>,
}

#[derive(Debug, Default)]
struct Bucket {
    /// The second (since `start`) this bucket counts, plus one; 0 = never used.
    second: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

/// What a [`RetryBudget`] counted over its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetryBudgetCounts {
    /// Original requests deposited.
    pub requests: u64,
    /// Retries withdrawn.
    pub retries: u64,
}

impl RetryBudget {
    /// A budget allowing retries up to `ratio` (0.2 = 20%) of the requests of the last
    /// `window` (whole seconds, 1 to 60), plus `min_per_second` retries per second. A
    /// `ratio` or `min_per_second` that is negative or not finite counts as 0.
    pub fn new(ratio: f64, min_per_second: f64, window: Duration) -> Self {
        let clean = |x: f64| if x.is_finite() && x > 0.0 { x } else { 0.0 };
        let n = (window.as_secs() as usize).clamp(1, MAX_BUCKETS);
        Self {
            ratio: clean(ratio),
            min_per_window: clean(min_per_second) * n as f64,
            start: Instant::now(),
            buckets: (0..n).map(|_| Bucket::default()).collect(),
        }
    }

    /// The current second's bucket, reset first if it still counts an older second.
    fn current(&self) -> (&Bucket, u64) {
        let tag = self.start.elapsed().as_secs() + 1;
        let bucket = &self.buckets[(tag % self.buckets.len() as u64) as usize];
        let seen = bucket.second.load(Ordering::Acquire);
        if seen != tag
            && bucket
                .second
                .compare_exchange(seen, tag, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // This caller moved the bucket to the new second: forget the old one's counts.
            // A deposit that lands between the tag swap and these stores is lost, which
            // only makes the budget slightly stricter for one second.
            bucket.requests.store(0, Ordering::Release);
            bucket.retries.store(0, Ordering::Release);
        }
        (bucket, tag)
    }

    /// Counts an original request (call once per request, not per attempt).
    pub fn deposit(&self) {
        self.current().0.requests.fetch_add(1, Ordering::AcqRel);
    }

    /// Takes one retry from the budget: `true` when the retry may be sent (and is counted),
    /// `false` when the budget is exhausted.
    pub fn try_withdraw(&self) -> bool {
        let (bucket, tag) = self.current();
        let counts = self.counts_at(tag);
        let allowed = self.ratio * counts.requests as f64 + self.min_per_window;
        if (counts.retries as f64) < allowed {
            bucket.retries.fetch_add(1, Ordering::AcqRel);
            true
        } else {
            false
        }
    }

    /// The requests and retries of the window ending now.
    pub fn counts(&self) -> RetryBudgetCounts {
        let tag = self.start.elapsed().as_secs() + 1;
        self.counts_at(tag)
    }

    fn counts_at(&self, tag: u64) -> RetryBudgetCounts {
        let oldest = tag.saturating_sub(self.buckets.len() as u64 - 1);
        let mut c = RetryBudgetCounts::default();
        for b in self.buckets.iter() {
            let second = b.second.load(Ordering::Acquire);
            if second >= oldest && second <= tag {
                c.requests += b.requests.load(Ordering::Acquire);
                c.retries += b.retries.load(Ordering::Acquire);
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_stay_within_the_ratio_plus_the_minimum() {
        let b = RetryBudget::new(0.2, 1.0, Duration::from_secs(10));
        for _ in 0..1000 {
            b.deposit();
        }
        let granted = (0..1000).filter(|_| b.try_withdraw()).count();
        // 20% of 1,000 plus 1/s over the 10 s window.
        assert_eq!(granted, 200 + 10);
        assert_eq!(
            b.counts(),
            RetryBudgetCounts {
                requests: 1000,
                retries: 210
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_service_may_still_retry_at_the_minimum_rate() {
        let b = RetryBudget::new(0.2, 1.0, Duration::from_secs(10));
        b.deposit();
        assert!(
            b.try_withdraw(),
            "one retry is within the per-second minimum"
        );
        let more = (0..100).filter(|_| b.try_withdraw()).count();
        // 10 from the minimum (1/s over the 10 s window) plus 20% of the one request: the
        // 11th retry is still under 10.2, the 12th is not.
        assert_eq!(more, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_slides_old_seconds_out() {
        let b = RetryBudget::new(0.5, 0.0, Duration::from_secs(3));
        for _ in 0..10 {
            b.deposit();
        }
        assert_eq!((0..100).filter(|_| b.try_withdraw()).count(), 5);
        tokio::time::advance(Duration::from_secs(2)).await;
        // Still inside the 3 s window: nothing more to take.
        assert!(!b.try_withdraw());
        tokio::time::advance(Duration::from_secs(1)).await;
        // The first second left the window, its requests and retries with it.
        assert_eq!(b.counts(), RetryBudgetCounts::default());
        assert!(
            !b.try_withdraw(),
            "no request in the window, no minimum: no retry"
        );
        b.deposit();
        b.deposit();
        assert!(b.try_withdraw());
        assert!(!b.try_withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn a_reused_bucket_forgets_its_old_second() {
        let b = RetryBudget::new(1.0, 0.0, Duration::from_secs(2));
        for _ in 0..4 {
            b.deposit();
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        // Same bucket index (second 3 vs 1 of a 2-bucket ring): reset, not added to.
        b.deposit();
        assert_eq!(
            b.counts(),
            RetryBudgetCounts {
                requests: 1,
                retries: 0
            }
        );
    }

    #[test]
    fn bad_parameters_mean_no_budget_rather_than_a_panic() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let b = RetryBudget::new(f64::NAN, -3.0, Duration::ZERO);
            b.deposit();
            assert!(!b.try_withdraw());
        });
    }
}
