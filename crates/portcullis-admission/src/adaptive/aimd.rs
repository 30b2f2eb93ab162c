//! [`Aimd`]: additive increase, multiplicative decrease.
//!
//! Each window:
//!
//! ```text
//! congested = an overload signal (5xx, 429, transport error) in the window
//!             or sample_rtt > tolerance × min_rtt
//! limit     = backoff × limit       if congested
//!           = limit                 else if in flight < limit / 2 and nobody queued
//!           = limit + increase      otherwise
//! ```
//!
//! The loss-based rule of TCP congestion control, as Netflix's concurrency-limits
//! `AIMDLimit` applies it to request concurrency (there per sample, with a drop or a
//! timeout as the loss signal). Here it runs once per window, and a latency above
//! `tolerance × min_rtt` also counts as a loss, so that a backend that slows down instead
//! of failing is seen too. It reacts to failures more directly than the gradient and
//! probes upward more slowly (one `increase` per window).

use super::controller::Phase;
use super::gradient::app_limited;
use super::window::Observation;
use super::AdaptiveConfig;
use std::time::Duration;

/// AIMD's parameters (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Aimd {
    /// Slots added per window without congestion.
    pub increase: f64,
    /// Factor applied on congestion, in (0, 1).
    pub backoff: f64,
    /// A window slower than `tolerance × min_rtt` is congested (more than 1).
    pub tolerance: f64,
}

impl Aimd {
    /// The parameters of `config` (`increase`, `backoff`, `tolerance`).
    pub fn from_config(config: &AdaptiveConfig) -> Self {
        Self {
            increase: config.increase as f64,
            backoff: config.backoff,
            tolerance: config.tolerance,
        }
    }

    /// The next limit after a window observed `obs`, from `limit`, and why.
    pub fn next(&self, limit: f64, min_rtt: Duration, obs: &Observation) -> (f64, Phase) {
        if obs.overloaded > 0 {
            return (limit * self.backoff, Phase::Overloaded);
        }
        if obs.sample_rtt.as_secs_f64() > min_rtt.as_secs_f64() * self.tolerance {
            return (limit * self.backoff, Phase::Decreasing);
        }
        if app_limited(limit, obs) {
            return (limit, Phase::Holding);
        }
        (limit + self.increase, Phase::Increasing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Aimd = Aimd {
        increase: 1.0,
        backoff: 0.9,
        tolerance: 1.5,
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn adds_one_and_multiplies_down() {
        let ok = Observation::uniform(ms(25), 50, 10.0);
        assert_eq!(A.next(10.0, ms(20), &ok), (11.0, Phase::Increasing));
        let slow = Observation::uniform(ms(31), 50, 10.0);
        assert_eq!(A.next(10.0, ms(20), &slow), (9.0, Phase::Decreasing));
        assert_eq!(
            A.next(10.0, ms(20), &ok.with_overloaded(1)),
            (9.0, Phase::Overloaded)
        );
        let idle = Observation::uniform(ms(20), 50, 4.0);
        assert_eq!(A.next(10.0, ms(20), &idle), (10.0, Phase::Holding));
        assert_eq!(
            A.next(10.0, ms(20), &idle.with_queued(2)).1,
            Phase::Increasing
        );
    }

    #[test]
    fn oscillates_around_the_knee() {
        let k = 16.0;
        let mut limit: f64 = 4.0;
        let (mut lo, mut hi) = (f64::MAX, 0.0f64);
        for i in 0..400 {
            let rtt = 20.0 + 5.0 * (limit.round() - k).max(0.0);
            let obs = Observation::uniform(Duration::from_secs_f64(rtt / 1e3), 50, limit);
            limit = A.next(limit, ms(20), &obs).0;
            if i > 100 {
                lo = lo.min(limit);
                hi = hi.max(limit);
            }
        }
        assert!(lo >= 14.0 && hi <= 19.5, "[{lo}, {hi}]");
    }
}
