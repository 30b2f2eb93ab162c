//! [`SampleClock`]: what times a sampled slot, from its grant to its outcome.
//!
//! A sampled slot reads the clock twice (at the grant and at the outcome), and on a quiet
//! endpoint every slot is sampled, so the clock is most of the adaptive source's cost per
//! request. `Instant::now()` is a `clock_gettime` through the vDSO: 22 ns on an idle core of
//! the project's VM, 58 ns under build load (BENCHMARKS.md). The default clock reads the
//! CPU's time-stamp counter instead, through the [`quanta`] crate (9 ns on the same VM),
//! and converts a difference of two reads to nanoseconds with the ratio `quanta`
//! calibrated once against the OS clock. Where the counter is not usable (no invariant
//! TSC, another architecture) `quanta` falls back to the OS monotonic clock on its own.
//!
//! The TSC does not follow tokio's paused test clock, so a test that drives the latency of
//! its requests with `tokio::time::sleep` on a paused runtime times the samples with
//! [`SampleClock::Tokio`] (see
//! [`AdaptiveCapacity::with_clock`](super::AdaptiveCapacity::with_clock)).
//! The controller's own schedule (windows, the `min_rtt` interval) always runs on tokio's
//! clock: it reads it once per window, off the request path.

use std::fmt;
use tokio::time::Instant;

/// Which clock times the adaptive source's samples, from a slot's grant to its outcome.
///
/// A sampled slot reads it twice, and on a quiet endpoint every slot is sampled, so the
/// clock is most of the adaptive source's cost per request. The controller's own schedule
/// (windows, the `min_rtt` interval) always runs on tokio's clock, off the request path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SampleClock {
    /// The CPU's time-stamp counter, through the `quanta` crate (the OS monotonic clock
    /// where the counter is not invariant, or on other architectures), converted to
    /// nanoseconds with the ratio `quanta` calibrates once against the OS clock. The
    /// default: about 9 ns a read where `Instant::now()` costs 22–58 ns on the project's VM.
    /// It does not follow tokio's paused clock.
    #[default]
    Tsc,
    /// tokio's [`Instant`]: follows a paused test clock (`tokio::time::pause`,
    /// `#[tokio::test(start_paused = true)]`).
    Tokio,
}

/// A [`SampleClock`] ready to read: a stamp is a `u64` whose unit only this value knows
/// (TSC ticks or nanoseconds), counted from the timer's creation, so that it stays far below
/// `2^62` (a sample keeps it in 62 bits).
#[derive(Clone)]
pub(crate) enum Timer {
    /// The clock and its raw count at the timer's creation.
    Tsc(quanta::Clock, u64),
    Tokio(Instant),
}

impl fmt::Debug for Timer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tsc(..) => "Timer::Tsc",
            Self::Tokio(_) => "Timer::Tokio",
        })
    }
}

impl Timer {
    /// A timer for `clock` (the first TSC timer of the process calibrates `quanta`, once).
    pub(crate) fn new(clock: SampleClock) -> Self {
        match clock {
            SampleClock::Tsc => {
                let clock = quanta::Clock::new();
                let base = clock.raw();
                Self::Tsc(clock, base)
            }
            SampleClock::Tokio => Self::Tokio(Instant::now()),
        }
    }

    /// The time now, as a stamp of this timer. Stamps only increase (a TSC read on another
    /// core that lags is treated by [`nanos`](Self::nanos) as no time passed).
    #[inline]
    pub(crate) fn now(&self) -> u64 {
        match self {
            Self::Tsc(clock, base) => clock.raw().saturating_sub(*base),
            Self::Tokio(base) => base.elapsed().as_nanos() as u64,
        }
    }

    /// Nanoseconds from stamp `start` to stamp `end` (0 when `end` is not after `start`).
    #[inline]
    pub(crate) fn nanos(&self, start: u64, end: u64) -> u64 {
        match self {
            Self::Tsc(clock, _) => clock.delta_as_nanos(start, end),
            Self::Tokio(_) => end.saturating_sub(start),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn tokio_timer_follows_the_paused_clock() {
        let t = Timer::new(SampleClock::Tokio);
        let a = t.now();
        tokio::time::advance(Duration::from_millis(20)).await;
        let b = t.now();
        assert_eq!(t.nanos(a, b), 20_000_000);
        assert_eq!(t.nanos(b, a), 0);
    }

    #[test]
    fn tsc_timer_measures_real_time() {
        let t = Timer::new(SampleClock::Tsc);
        let (a, started) = (t.now(), std::time::Instant::now());
        std::thread::sleep(Duration::from_millis(20));
        let (b, real) = (t.now(), started.elapsed());
        let nanos = t.nanos(a, b) as f64;
        // Within 10% of the OS clock's measurement of the same interval.
        let real = real.as_nanos() as f64;
        assert!((nanos - real).abs() < real * 0.1, "{nanos} vs {real}");
        assert_eq!(t.nanos(b, a), 0);
    }
}
