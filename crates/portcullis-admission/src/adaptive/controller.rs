//! [`Controller`]: one endpoint's limit, moved window by window by its algorithm, kept
//! inside its bounds, with `min_rtt` measured on schedule. Pure: time and samples come in
//! as arguments, so it is tested on a paused clock with made-up windows.

use super::{AdaptiveConfig, Aimd, Algorithm, Gradient, MinRtt, Observation};
use serde::Serialize;
use std::time::Duration;
use tokio::time::Instant;

/// What the controller did with the last window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// No window has closed yet: the initial limit is in force.
    Initial,
    /// The limit is held at `min_capacity` for one window to measure `min_rtt`.
    MeasuringMinRtt,
    /// The limit went up.
    Increasing,
    /// The limit went down (latency rose).
    Decreasing,
    /// The limit stayed (traffic used less than half of it, or it sits at a bound).
    Holding,
    /// The window had overload signals (5xx, 429, transport errors): the limit backed off.
    Overloaded,
    /// Another process computes the limit (shared storage); this one applies it.
    Following,
}

impl Phase {
    /// `Increasing`, `Decreasing` or `Holding`, from the change `from → to`.
    pub fn of_change(from: f64, to: f64) -> Self {
        match to.partial_cmp(&from) {
            Some(std::cmp::Ordering::Greater) => Self::Increasing,
            Some(std::cmp::Ordering::Less) => Self::Decreasing,
            _ => Self::Holding,
        }
    }
}

/// A snapshot of a controller, for stats.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ControllerState {
    /// The limit in force.
    pub limit: usize,
    /// What the last window did.
    pub phase: Phase,
    /// The `min_rtt` estimate.
    pub min_rtt: Option<Duration>,
    /// The last window's `sample_rtt`.
    pub sample_rtt: Option<Duration>,
}

#[derive(Debug, Clone, Copy)]
enum Rule {
    Gradient(Gradient),
    Aimd(Aimd),
}

/// One endpoint's adaptive limit, moved window by window by its algorithm ([`Gradient`] or
/// [`Aimd`]), kept inside its bounds, with `min_rtt` measured on schedule ([`MinRtt`]).
/// Pure: time and samples come in as arguments.
#[derive(Debug, Clone)]
pub struct Controller {
    rule: Rule,
    min: f64,
    max: f64,
    /// The estimate, kept in `[min, max]`; what is in force unless `min_rtt` is measured.
    limit: f64,
    min_rtt: MinRtt,
    phase: Phase,
    sample_rtt: Option<Duration>,
}

impl Controller {
    /// A controller for `config` starting at `initial` (clamped to the bounds); `seed`
    /// drives the jitter of the `min_rtt` schedule.
    pub fn new(config: &AdaptiveConfig, initial: usize, seed: u64) -> Self {
        let rule = match config.algorithm {
            Algorithm::Gradient => Rule::Gradient(Gradient::from_config(config)),
            Algorithm::Aimd => Rule::Aimd(Aimd::from_config(config)),
        };
        Self {
            rule,
            min: config.min_capacity as f64,
            max: config.max_capacity.max(config.min_capacity) as f64,
            limit: config.clamp(initial) as f64,
            min_rtt: MinRtt::new(config.min_rtt_interval, config.min_rtt_jitter, seed),
            phase: Phase::Initial,
            sample_rtt: None,
        }
    }

    /// The limit in force: `min_capacity` while `min_rtt` is measured, the estimate
    /// (rounded) otherwise. Always inside the bounds.
    pub fn limit(&self) -> usize {
        let l = if self.min_rtt.is_measuring() {
            self.min
        } else {
            self.limit
        };
        l.round().clamp(self.min, self.max) as usize
    }

    /// Takes the window that closed at `now` into account and returns the limit in force
    /// from now on.
    pub fn update(&mut self, now: Instant, obs: &Observation) -> usize {
        self.sample_rtt = Some(obs.sample_rtt);
        if self.min_rtt.is_measuring() {
            if let Some(limit) = self.min_rtt.finish(now, obs.sample_rtt) {
                self.limit = limit;
            }
            self.phase = Phase::Holding;
            return self.limit();
        }
        if self.min_rtt.is_due(now) {
            self.min_rtt.start(self.limit);
            self.phase = Phase::MeasuringMinRtt;
            return self.limit();
        }
        let min_rtt = self.min_rtt.offer(obs.sample_rtt);
        let (next, phase) = match self.rule {
            Rule::Gradient(g) => g.next(self.limit, min_rtt, obs),
            Rule::Aimd(a) => a.next(self.limit, min_rtt, obs),
        };
        let clamped = next.clamp(self.min, self.max);
        self.phase = match phase {
            // Pinned at a bound: nothing moved.
            Phase::Increasing | Phase::Decreasing if clamped == self.limit => Phase::Holding,
            p => p,
        };
        self.limit = clamped;
        self.limit()
    }

    /// Adopts a limit computed elsewhere (by the process that holds the shared lease),
    /// so that this controller continues from it if it takes over.
    pub fn follow(&mut self, limit: usize) {
        self.limit = (limit as f64).clamp(self.min, self.max);
        self.phase = Phase::Following;
    }

    /// A snapshot for stats.
    pub fn state(&self) -> ControllerState {
        ControllerState {
            limit: self.limit(),
            phase: self.phase,
            min_rtt: self.min_rtt.value(),
            sample_rtt: self.sample_rtt,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: f64) -> Duration {
        Duration::from_secs_f64(n / 1e3)
    }

    fn config(v: serde_json::Value) -> AdaptiveConfig {
        let c: AdaptiveConfig = serde_json::from_value(v).unwrap();
        c.validate().unwrap();
        c
    }

    /// Runs `windows` windows of a knee backend (20 ms, +5 ms per request above `knee`)
    /// under a controller, with `demand` requests always wanting in.
    fn drive(c: &mut Controller, knee: usize, demand: usize, windows: usize) -> Vec<usize> {
        let mut seen = Vec::new();
        for _ in 0..windows {
            let inflight = c.limit().min(demand);
            let rtt = 20.0 + 5.0 * inflight.saturating_sub(knee) as f64;
            let queued = demand.saturating_sub(inflight);
            let obs = Observation::uniform(ms(rtt), 50, inflight as f64).with_queued(queued);
            seen.push(c.update(Instant::now(), &obs));
        }
        seen
    }

    #[tokio::test(start_paused = true)]
    async fn measures_min_rtt_at_min_capacity_then_restores_the_limit() {
        let mut c = Controller::new(
            &config(serde_json::json!({"min_capacity": 2, "max_capacity": 100})),
            30,
            1,
        );
        assert_eq!((c.limit(), c.state().phase), (30, Phase::Initial));
        // First window: a measurement is due.
        let busy = Observation::uniform(ms(60.0), 50, 30.0).with_queued(10);
        assert_eq!(c.update(Instant::now(), &busy), 2);
        assert_eq!(c.state().phase, Phase::MeasuringMinRtt);
        let quiet = Observation::uniform(ms(20.0), 50, 2.0).with_queued(30);
        assert_eq!(c.update(Instant::now(), &quiet), 30, "restored");
        assert_eq!(c.state().min_rtt, Some(ms(20.0)));
        // Later windows are compared with 20 ms: 60 ms shrinks the limit.
        assert!(c.update(Instant::now(), &busy) < 30);
        // 30 s ± 15 % later the limit is pinned again for one window.
        tokio::time::advance(Duration::from_secs(25)).await;
        assert_ne!(c.update(Instant::now(), &busy), 2);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(c.update(Instant::now(), &busy), 2);
        // The backend got slower for good (40 ms unloaded): the new min_rtt says so.
        c.update(
            Instant::now(),
            &Observation::uniform(ms(40.0), 50, 2.0).with_queued(30),
        );
        assert_eq!(c.state().min_rtt, Some(ms(40.0)));
    }

    #[tokio::test(start_paused = true)]
    async fn gradient_converges_and_follows_a_moving_knee() {
        let mut c = Controller::new(
            &config(serde_json::json!({"min_capacity": 2, "max_capacity": 200})),
            8,
            1,
        );
        let tail = |v: &[usize]| v[v.len() - 20..].iter().copied().minmax();
        let seen = drive(&mut c, 16, 48, 40);
        let (lo, hi) = tail(&seen);
        assert!(lo >= 12 && hi <= 24, "{seen:?}");
        let seen = drive(&mut c, 6, 48, 40);
        let (lo, hi) = tail(&seen);
        assert!(lo >= 4 && hi <= 10, "{seen:?}");
        let seen = drive(&mut c, 40, 48, 60);
        let (lo, hi) = tail(&seen);
        assert!(lo >= 30 && hi <= 48, "{seen:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn aimd_converges_and_bounds_hold() {
        let mut c = Controller::new(
            &config(
                serde_json::json!({"algorithm": "aimd", "min_capacity": 2, "max_capacity": 10}),
            ),
            4,
            1,
        );
        let seen = drive(&mut c, 40, 48, 60);
        assert!(seen.iter().all(|&l| l <= 10), "{seen:?}");
        assert_eq!(*seen.last().unwrap(), 10);
        assert_eq!(c.state().phase, Phase::Holding, "at max_capacity");
        // A backend failing everything, fast: down to min_capacity, never below.
        let mut c = Controller::new(
            &config(serde_json::json!({"min_capacity": 4, "max_capacity": 64})),
            32,
            1,
        );
        for _ in 0..100 {
            let obs = Observation::uniform(ms(1.0), 50, 4.0).with_overloaded(50);
            assert!(c.update(Instant::now(), &obs) >= 4);
        }
        assert_eq!(c.limit(), 4);
    }

    #[test]
    fn follow_adopts_a_shared_limit_inside_the_bounds() {
        let mut c = Controller::new(
            &config(serde_json::json!({"min_capacity": 2, "max_capacity": 10})),
            4,
            1,
        );
        c.follow(50);
        assert_eq!((c.limit(), c.state().phase), (10, Phase::Following));
    }

    trait MinMax {
        fn minmax(self) -> (usize, usize);
    }
    impl<I: Iterator<Item = usize>> MinMax for I {
        fn minmax(self) -> (usize, usize) {
            self.fold((usize::MAX, 0), |(lo, hi), v| (lo.min(v), hi.max(v)))
        }
    }
}
