//! A retry budget: retries may add at most a fixed share of load over a sliding window.
//!
//! Every original request *deposits* into the budget and every retry *withdraws* from it. A
//! retry is allowed while the retries of the last `window` stay below `ratio` times the
//! requests of the same window, plus `min_per_second × window` so that a quiet service can
//! still retry a lone failure. Under an outage every request fails, every request wants a
//! retry, and the budget caps the extra load at `ratio` (20% by default) instead of letting
//! retries multiply it by `max_attempts`.
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

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

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
