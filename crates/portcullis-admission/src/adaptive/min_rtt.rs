//! [`MinRtt`]: the no-load latency a controller compares windows against, measured again
//! every `min_rtt_interval` (± jitter) so that it cannot drift.

use std::time::Duration;
use tokio::time::Instant;

/// The no-load latency estimate and its measurement schedule.
///
/// A measurement takes one window during which the limit is held at `min_capacity`: the
/// backend then serves at (or near) its lowest concurrency and the window's `sample_rtt`
/// is its no-load latency. The new value *replaces* the old one, so a backend that became
/// slower for good (a bigger model) is seen as such instead of as overloaded forever.
/// Between measurements any window faster than the estimate lowers it at once.
///
/// The first measurement is due at the first window; the next ones `interval × (1 ± jitter)`
/// after the previous one ended, so that processes and endpoints started together do not
/// all shrink their limits at the same moment.
#[derive(Debug, Clone)]
pub struct MinRtt {
    value: Option<Duration>,
    next: Option<Instant>,
    interval: Duration,
    jitter: f64,
    rng: u64,
    /// `Some(limit to restore)` while a measurement window runs.
    measuring: Option<f64>,
}

impl MinRtt {
    /// No estimate yet; a measurement is due at once. `seed` drives the jitter.
    pub fn new(interval: Duration, jitter: f64, seed: u64) -> Self {
        Self {
            value: None,
            next: None,
            interval,
            jitter,
            rng: seed | 1,
            measuring: None,
        }
    }

    /// The current estimate.
    pub fn value(&self) -> Option<Duration> {
        self.value
    }

    /// A measurement window is running.
    pub fn is_measuring(&self) -> bool {
        self.measuring.is_some()
    }

    /// When the next measurement starts (`None`: at the next window).
    pub fn next_measurement(&self) -> Option<Instant> {
        self.next
    }

    /// Whether a measurement should start now.
    pub fn is_due(&self, now: Instant) -> bool {
        !self.is_measuring() && self.next.is_none_or(|at| now >= at)
    }

    /// Starts a measurement window; `limit` is restored when it ends.
    pub fn start(&mut self, limit: f64) {
        self.measuring = Some(limit);
    }

    /// Ends a measurement window whose latency was `rtt` at `now`: `rtt` is the new
    /// estimate. Returns the limit to restore.
    pub fn finish(&mut self, now: Instant, rtt: Duration) -> Option<f64> {
        let limit = self.measuring.take()?;
        self.value = Some(rtt);
        self.next = Some(now + self.jittered());
        Some(limit)
    }

    /// A window outside a measurement: lowers the estimate when `rtt` is below it (or sets
    /// it when there is none). Returns the estimate.
    pub fn offer(&mut self, rtt: Duration) -> Duration {
        let v = self.value.map_or(rtt, |v| v.min(rtt));
        self.value = Some(v);
        v
    }

    /// `interval × (1 + jitter × u)` with `u` uniform in [-1, 1] (xorshift64).
    fn jittered(&mut self) -> Duration {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let u = (self.rng >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
        self.interval.mul_f64((1.0 + self.jitter * u).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn measures_first_then_every_interval_with_jitter() {
        let ms = Duration::from_millis;
        let mut m = MinRtt::new(Duration::from_secs(30), 0.15, 7);
        let now = Instant::now();
        assert!(m.is_due(now));
        m.start(18.0);
        assert!(m.is_measuring() && !m.is_due(now));
        assert_eq!(m.finish(now, ms(20)), Some(18.0));
        assert_eq!(m.value(), Some(ms(20)));
        // Faster windows lower it, slower ones do not raise it.
        assert_eq!(m.offer(ms(25)), ms(20));
        assert_eq!(m.offer(ms(19)), ms(19));
        let mut nexts = Vec::new();
        for _ in 0..50 {
            let next = m.next_measurement().unwrap();
            let after = next - now;
            assert!(
                after >= Duration::from_millis(25_500) && after <= Duration::from_millis(34_500),
                "{after:?}"
            );
            assert!(!m.is_due(next - ms(1)) && m.is_due(next));
            nexts.push(after);
            m.start(10.0);
            m.finish(now, ms(40));
        }
        // A slower backend is learnt at the next measurement, not ignored.
        assert_eq!(m.value(), Some(ms(40)));
        nexts.sort();
        nexts.dedup();
        assert!(nexts.len() > 40, "jittered: {nexts:?}");
    }
}
