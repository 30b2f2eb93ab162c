//! [`Backoff`]: the one exponential back-off policy of every Portcullis retry loop.
//!
//! A policy is a small `Copy` value checked once when it is built: the first delay
//! (`initial`), the cap (`max`), the growth per attempt (`factor`) and an optional `jitter`.
//! A retry loop takes its own [`Delays`] from it, an endless iterator of waits:
//!
//! * the *base* delay starts at `initial`, is multiplied by `factor` after each wait and
//!   never exceeds `max` (so it never decreases either);
//! * with a jitter `j` (between 0 and 1), each wait is drawn uniformly from
//!   `[base × (1 − j), base]`: jitter only shortens a wait, so `max` stays a hard bound
//!   and processes that failed together spread their retries;
//! * [`Delays::reset`] starts again from `initial`, after a success.
//!
//! The shape follows the common exponential back-off with jitter (AWS architecture blog,
//! "Exponential Backoff And Jitter"; linkerd's `exp-backoff`).
//!
//! ```
//! use portcullis_core::backoff::Backoff;
//! use std::time::Duration;
//!
//! let policy = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 2.0)?;
//! let mut delays = policy.delays();
//! let waits: Vec<_> = delays.by_ref().take(5).map(|d| d.as_millis()).collect();
//! assert_eq!(waits, [100, 200, 400, 800, 1000]);
//! delays.reset();
//! assert_eq!(delays.next(), Some(Duration::from_millis(100)));
//!
//! assert!(Backoff::new(Duration::from_secs(2), Duration::from_secs(1), 2.0).is_err());
//! # Ok::<(), portcullis_core::backoff::InvalidBackoff>(())
//! ```

use std::fmt;
use std::time::Duration;

/// An exponential back-off policy: `initial`, then × `factor` per attempt, capped at `max`,
/// optionally shortened by a random `jitter`. Built by [`Backoff::new`], which refuses
/// inconsistent bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    factor: f64,
    jitter: f64,
}

/// Why a [`Backoff`] was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidBackoff {
    /// `initial` is zero: the loop would retry without waiting.
    ZeroInitial,
    /// `max` is below `initial`.
    MaxBelowInitial,
    /// `factor` is below 1 or not a finite number: the delay would shrink or be undefined.
    Factor,
    /// `jitter` is outside `0..=1` or not a number.
    Jitter,
}

impl fmt::Display for InvalidBackoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ZeroInitial => "backoff initial delay must be above zero",
            Self::MaxBelowInitial => "backoff max delay must be at least the initial delay",
            Self::Factor => "backoff factor must be a finite number of at least 1",
            Self::Jitter => "backoff jitter must be between 0 and 1",
        })
    }
}

impl std::error::Error for InvalidBackoff {}

impl Backoff {
    /// A policy without jitter: waits of `initial`, `initial × factor`, … up to `max`.
    ///
    /// Refuses a zero `initial`, a `max` below `initial` and a `factor` below 1 (or NaN or
    /// infinite). `initial == max` is a constant delay, `factor == 1` too.
    pub fn new(initial: Duration, max: Duration, factor: f64) -> Result<Self, InvalidBackoff> {
        if initial.is_zero() {
            return Err(InvalidBackoff::ZeroInitial);
        }
        if max < initial {
            return Err(InvalidBackoff::MaxBelowInitial);
        }
        if !(factor.is_finite() && factor >= 1.0) {
            return Err(InvalidBackoff::Factor);
        }
        Ok(Self {
            initial,
            max,
            factor,
            jitter: 0.0,
        })
    }

    /// The same policy with each wait drawn from `[base × (1 − jitter), base]`; `jitter`
    /// must be within `0..=1` (0: no jitter).
    pub fn with_jitter(self, jitter: f64) -> Result<Self, InvalidBackoff> {
        if !(0.0..=1.0).contains(&jitter) {
            return Err(InvalidBackoff::Jitter);
        }
        Ok(Self { jitter, ..self })
    }

    /// The first delay.
    pub fn initial(&self) -> Duration {
        self.initial
    }

    /// The longest delay.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The growth of the base delay per attempt.
    pub fn factor(&self) -> f64 {
        self.factor
    }

    /// The share of each wait that may be cut off at random (0: none).
    pub fn jitter(&self) -> f64 {
        self.jitter
    }

    /// The waits of one retry loop, starting at `initial`.
    pub fn delays(&self) -> Delays {
        Delays {
            policy: *self,
            base: self.initial,
        }
    }

    /// The base delay after `base`: × `factor`, capped at `max`, never below `base`.
    fn grow(&self, base: Duration) -> Duration {
        Duration::try_from_secs_f64(base.as_secs_f64() * self.factor)
            .unwrap_or(self.max)
            .clamp(base, self.max)
    }

    /// `base` shortened by the jitter, `unit` being a uniform draw from `[0, 1)`.
    fn jittered(&self, base: Duration, unit: f64) -> Duration {
        if self.jitter == 0.0 {
            return base;
        }
        let share = (self.jitter * unit).clamp(0.0, 1.0);
        let cut = Duration::try_from_secs_f64(base.as_secs_f64() * share).unwrap_or(base);
        base.saturating_sub(cut)
    }
}

/// The waits of one retry loop of a [`Backoff`] (an endless iterator). Call
/// [`reset`](Delays::reset) after a success.
#[derive(Debug, Clone)]
pub struct Delays {
    policy: Backoff,
    base: Duration,
}

impl Delays {
    /// Starts again from the policy's `initial` delay.
    pub fn reset(&mut self) {
        self.base = self.policy.initial;
    }

    /// The base delay of the next wait (before jitter).
    pub fn peek(&self) -> Duration {
        self.base
    }

    /// The policy these delays follow.
    pub fn policy(&self) -> &Backoff {
        &self.policy
    }

    /// The next wait (the iterator's `next`, which never ends, without the `Option`).
    pub fn next_delay(&mut self) -> Duration {
        let unit = if self.policy.jitter == 0.0 {
            0.0
        } else {
            rand::random::<f64>()
        };
        self.next_with(unit)
    }

    fn next_with(&mut self, unit: f64) -> Duration {
        let base = self.base;
        self.base = self.policy.grow(base);
        self.policy.jittered(base, unit)
    }
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.next_delay())
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (usize::MAX, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn refuses_zero_and_inverted_bounds() {
        assert_eq!(
            Backoff::new(Duration::ZERO, ms(10), 2.0),
            Err(InvalidBackoff::ZeroInitial)
        );
        assert_eq!(
            Backoff::new(ms(20), ms(10), 2.0),
            Err(InvalidBackoff::MaxBelowInitial)
        );
        for factor in [0.5, 0.0, -2.0, f64::NAN, f64::INFINITY] {
            assert_eq!(
                Backoff::new(ms(10), ms(20), factor),
                Err(InvalidBackoff::Factor),
                "factor {factor}"
            );
        }
        let ok = Backoff::new(ms(10), ms(10), 1.0).expect("a constant delay is valid");
        for jitter in [-0.1, 1.5, f64::NAN] {
            assert_eq!(ok.with_jitter(jitter), Err(InvalidBackoff::Jitter));
        }
        assert_eq!(ok.with_jitter(1.0).map(|b| b.jitter()), Ok(1.0));
        assert_eq!(
            InvalidBackoff::MaxBelowInitial.to_string(),
            "backoff max delay must be at least the initial delay"
        );
    }

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut d = Backoff::new(ms(50), ms(1000), 2.0).unwrap().delays();
        let waits: Vec<u128> = d.by_ref().take(7).map(|d| d.as_millis()).collect();
        assert_eq!(waits, [50, 100, 200, 400, 800, 1000, 1000]);
        d.reset();
        assert_eq!(d.next(), Some(ms(50)));
    }

    #[test]
    fn huge_bounds_do_not_overflow() {
        let mut d = Backoff::new(Duration::from_secs(u64::MAX / 4), Duration::MAX, 1e300)
            .unwrap()
            .delays();
        assert_eq!(d.next(), Some(Duration::from_secs(u64::MAX / 4)));
        assert_eq!(d.next(), Some(Duration::MAX));
        assert_eq!(d.next(), Some(Duration::MAX));
    }

    fn policy() -> impl Strategy<Value = Backoff> {
        (
            1u64..10_000_000,
            0u64..10_000_000_000,
            1.0f64..16.0,
            0.0f64..=1.0,
        )
            .prop_map(|(initial_us, extra_us, factor, jitter)| {
                let initial = Duration::from_micros(initial_us);
                Backoff::new(initial, initial + Duration::from_micros(extra_us), factor)
                    .and_then(|b| b.with_jitter(jitter))
                    .expect("the strategy builds valid policies")
            })
    }

    proptest! {
        /// The base delay starts at `initial`, never decreases and never exceeds `max`.
        #[test]
        fn base_is_monotone_up_to_the_cap(policy in policy(), units in prop::collection::vec(0.0f64..1.0, 1..80)) {
            let mut d = policy.delays();
            prop_assert_eq!(d.peek(), policy.initial());
            let mut prev = d.peek();
            for unit in units {
                d.next_with(unit);
                let base = d.peek();
                prop_assert!(base >= prev, "{:?} after {:?}", base, prev);
                prop_assert!(base <= policy.max());
                prev = base;
            }
        }

        /// Every wait, jitter included, is within `[base × (1 − jitter), base]` and so never
        /// above `max`.
        #[test]
        fn waits_never_exceed_max(policy in policy(), units in prop::collection::vec(0.0f64..1.0, 1..80)) {
            let mut d = policy.delays();
            for unit in units {
                let base = d.peek();
                let wait = d.next_with(unit);
                prop_assert!(wait <= base && wait <= policy.max());
                let floor = base.mul_f64(1.0 - policy.jitter());
                prop_assert!(wait + Duration::from_nanos(1) >= floor, "{:?} below {:?}", wait, floor);
            }
            // The iterator's own random draws obey the bound too.
            for wait in policy.delays().take(40) {
                prop_assert!(wait <= policy.max());
            }
        }

        /// After `reset`, the waits repeat from `initial` exactly as a fresh iterator's.
        #[test]
        fn reset_starts_again(policy in policy(), before in 0usize..40, units in prop::collection::vec(0.0f64..1.0, 1..20)) {
            let mut used = policy.delays();
            for _ in 0..before {
                used.next_with(0.5);
            }
            used.reset();
            let mut fresh = policy.delays();
            for unit in units {
                prop_assert_eq!(used.next_with(unit), fresh.next_with(unit));
            }
        }
    }
}
