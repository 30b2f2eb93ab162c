//! [`Gradient`]: the gradient controller.
//!
//! Each window, with `min_rtt` the no-load latency and `sample_rtt` the window's latency:
//!
//! ```text
//! gradient  = clamp((min_rtt × (1 + buffer)) / sample_rtt, 0.5, 2.0)
//! proposed  = gradient × limit + √(gradient × limit)          (√ headroom)
//! proposed  = min(proposed, backoff × limit)   if the window had an overload signal
//! proposed  = limit                            if it would grow while in flight < limit / 2
//!                                              and nobody queued (the limit is not what
//!                                              holds traffic back: growing it says nothing)
//! limit     = (1 − smoothing) × limit + smoothing × proposed   (no smoothing on an overload)
//! ```
//!
//! While latency stays within `buffer` of `min_rtt` the gradient is above 1 and the limit
//! grows by up to `buffer` (15 % by default) plus √limit per window; once requests queue
//! inside the backend the latency rises, the gradient falls below 1 and the limit shrinks until the two
//! balance. The √limit headroom keeps a little queueing at the backend, so that it stays
//! busy, and lets a limit that is too low grow without waiting for latency to fall. The
//! clamp bounds one window's change to a halving or a doubling.
//!
//! This is the shape of Envoy's adaptive concurrency filter (gradient of a min-RTT to a
//! sampled RTT, √limit headroom, min-RTT re-measured periodically at a pinned low
//! concurrency with jitter) combined with two ideas of Netflix's concurrency-limits
//! `Gradient2Limit`: exponential smoothing of the new limit, and no growth while the
//! in-flight count is far below the limit.

use super::controller::Phase;
use super::window::Observation;
use super::AdaptiveConfig;
use std::time::Duration;

/// The gradient controller's parameters (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gradient {
    /// Tolerated latency above `min_rtt`, as a fraction of it.
    pub buffer: f64,
    /// Weight of the proposed limit against the current one, in (0, 1].
    pub smoothing: f64,
    /// Factor applied on an overload signal, in (0, 1).
    pub backoff: f64,
}

impl Gradient {
    /// The parameters of `config` (`buffer`, `smoothing`, `backoff`).
    pub fn from_config(config: &AdaptiveConfig) -> Self {
        Self {
            buffer: config.buffer,
            smoothing: config.smoothing,
            backoff: config.backoff,
        }
    }

    /// The next limit after a window observed `obs`, from `limit`, and why.
    pub fn next(&self, limit: f64, min_rtt: Duration, obs: &Observation) -> (f64, Phase) {
        let target = min_rtt.as_secs_f64() * (1.0 + self.buffer);
        let sample = obs.sample_rtt.as_secs_f64().max(1e-9);
        let gradient = (target / sample).clamp(0.5, 2.0);
        let proposed = gradient * limit + (gradient * limit).sqrt();
        if obs.overloaded > 0 {
            return (proposed.min(limit * self.backoff), Phase::Overloaded);
        }
        if proposed > limit && app_limited(limit, obs) {
            return (limit, Phase::Holding);
        }
        let next = (1.0 - self.smoothing) * limit + self.smoothing * proposed;
        (next, Phase::of_change(limit, next))
    }
}

/// Traffic, not the limit, is what holds the in-flight count down: fewer than half the
/// slots were used on average and nobody waited.
pub(crate) fn app_limited(limit: f64, obs: &Observation) -> bool {
    obs.queued == 0 && obs.inflight < limit / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Gradient = Gradient {
        buffer: 0.25,
        smoothing: 1.0,
        backoff: 0.9,
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn grows_at_min_rtt_and_shrinks_when_latency_rises() {
        // At min_rtt: ×1.25 plus √(1.25 × 16) headroom.
        let (l, p) = G.next(16.0, ms(20), &Observation::uniform(ms(20), 50, 16.0));
        assert!((l - (20.0 + 20f64.sqrt())).abs() < 1e-9, "{l}");
        assert_eq!(p, Phase::Increasing);
        // Twice min_rtt: gradient 0.625, 20 × 0.625 = 12.5 + √12.5.
        let (l, p) = G.next(20.0, ms(20), &Observation::uniform(ms(40), 50, 20.0));
        assert!((l - (12.5 + 12.5f64.sqrt())).abs() < 1e-9, "{l}");
        assert_eq!(p, Phase::Decreasing);
        // Ten times: clamped to a halving.
        let (l, _) = G.next(20.0, ms(20), &Observation::uniform(ms(200), 50, 20.0));
        assert!((l - (10.0 + 10f64.sqrt())).abs() < 1e-9, "{l}");
    }

    #[test]
    fn smoothing_overload_and_app_limited() {
        let g = Gradient {
            smoothing: 0.5,
            ..G
        };
        let (l, _) = g.next(20.0, ms(20), &Observation::uniform(ms(40), 50, 20.0));
        let full = 12.5 + 12.5f64.sqrt();
        assert!((l - (10.0 + full / 2.0)).abs() < 1e-9, "{l}");
        // Fast 5xx answers: never above backoff × limit, not smoothed.
        let (l, p) = g.next(
            20.0,
            ms(20),
            &Observation::uniform(ms(1), 50, 20.0).with_overloaded(3),
        );
        assert!((l - 18.0).abs() < 1e-9 && p == Phase::Overloaded, "{l}");
        // 3 in flight of 20 and no queue: no growth...
        let idle = Observation::uniform(ms(20), 50, 3.0);
        assert_eq!(g.next(20.0, ms(20), &idle), (20.0, Phase::Holding));
        // ... but a waiter means the limit is what holds traffic back.
        assert_eq!(
            g.next(20.0, ms(20), &idle.with_queued(1)).1,
            Phase::Increasing
        );
        // Shrinking is allowed when app-limited.
        assert_eq!(
            g.next(20.0, ms(20), &Observation::uniform(ms(80), 50, 3.0))
                .1,
            Phase::Decreasing
        );
    }

    /// The fixed point on a backend whose latency is 20 ms up to K in flight and 5 ms more
    /// per request above: a little above K, by the headroom.
    #[test]
    fn settles_just_above_the_knee() {
        for (k, lo, hi) in [(16.0, 16.0, 21.0), (6.0, 6.0, 10.0), (40.0, 40.0, 46.0)] {
            let g = Gradient {
                smoothing: 0.5,
                ..G
            };
            let mut limit: f64 = 8.0;
            for _ in 0..200 {
                let rtt = 20.0 + 5.0 * (limit - k).max(0.0);
                let obs = Observation::uniform(Duration::from_secs_f64(rtt / 1e3), 50, limit);
                limit = g.next(limit, ms(20), &obs).0;
            }
            assert!((lo..=hi).contains(&limit), "K={k}: {limit}");
        }
    }
}
