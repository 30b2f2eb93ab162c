//! [`Outage`]: whether this process is in a Redis outage, and the recovery window after one.
//!
//! The state machine ([`OutageState`]):
//!
//! ```text
//!              call fails                     heartbeat re-registered
//!  Available ─────────────▶ Degraded { since } ───────────────────────▶ Recovering { until }
//!      ▲                        ▲                                            │   │
//!      │                        └──────────────── call fails ────────────────┘   │
//!      └─────────────────────────────── `until` passed ──────────────────────────┘
//! ```
//!
//! * **Degraded**: a Redis call failed or timed out; `storage.on_error` serves every
//!   endpoint until the heartbeat reaches Redis again and re-registers this process's slots.
//! * **Recovering**: Redis answers again, but other processes may still be serving on their
//!   outage share without having re-registered it; until `until` (the recovery window, see
//!   [`Process::recovery_window`](crate::process::Process::recovery_window)) this process
//!   keeps to its own share. The state turns `Available` by itself once `until` passes.
//!
//! [`Outage`] holds the state in one atomic word, so the request path and the endpoint
//! tasks read it without a lock; only the two transitions take a (never contended on the
//! request path) mutex, which keeps the state and the `mode` watch that waiters follow in
//! step.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Where this process stands with Redis (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutageState {
    /// Redis answers, no recovery window is running.
    Available,
    /// In an outage since `since`: `on_error` applies.
    Degraded {
        /// When the outage began.
        since: Instant,
    },
    /// The outage ended; until `until` this process keeps to its outage share.
    Recovering {
        /// When the recovery window closes.
        until: Instant,
    },
}

impl OutageState {
    /// `true` while in an outage.
    pub(crate) fn is_degraded(self) -> bool {
        matches!(self, Self::Degraded { .. })
    }

    /// A call failed at `now`: the outage state, or `None` when already in an outage.
    pub(crate) fn start(self, now: Instant) -> Option<Self> {
        (!self.is_degraded()).then_some(Self::Degraded { since: now })
    }

    /// Redis answered again at `now`: the recovery state, whose window lasts `window`, and
    /// how long the outage lasted; `None` when not in an outage.
    pub(crate) fn end(self, now: Instant, window: Duration) -> Option<(Self, Duration)> {
        match self {
            Self::Degraded { since } => Some((
                Self::Recovering {
                    until: now + window,
                },
                now.saturating_duration_since(since),
            )),
            _ => None,
        }
    }

    /// The state at `now`: a recovery window that has closed is `Available`.
    pub(crate) fn at(self, now: Instant) -> Self {
        match self {
            Self::Recovering { until } if until <= now => Self::Available,
            s => s,
        }
    }

    /// The time left in the recovery window at `now` (`None` outside one).
    pub(crate) fn recovery_left(self, now: Instant) -> Option<Duration> {
        match self.at(now) {
            Self::Recovering { until } => Some(until - now),
            _ => None,
        }
    }
}

/// [`Outage::word`]'s flag of the `Degraded` state (the rest is its `since`).
const DEGRADED: u64 = 1 << 63;

/// The process's [`OutageState`], readable without a lock, and the `mode` watch (`true`
/// while in an outage) that waiters follow to switch to the fallback and back.
pub(crate) struct Outage {
    /// The state: 0 `Available`, [`DEGRADED`] | ms of `since`, or ms of `until` + 1
    /// `Recovering` (milliseconds after `base`).
    word: AtomicU64,
    base: Instant,
    /// Held across each transition (the state change and the `mode` send), so that a start
    /// racing an end cannot leave `mode` saying the opposite of the state (requests then
    /// queued for Redis while every reply was discarded as an outage's).
    transition: std::sync::Mutex<()>,
    mode: watch::Sender<bool>,
}

impl Outage {
    /// Starts `Available`.
    pub(crate) fn new() -> Self {
        Self {
            word: AtomicU64::new(0),
            base: Instant::now(),
            transition: std::sync::Mutex::new(()),
            mode: watch::channel(false).0,
        }
    }

    fn ms(&self, t: Instant) -> u64 {
        let ms = t.saturating_duration_since(self.base).as_millis();
        u64::try_from(ms).unwrap_or(u64::MAX).min(DEGRADED - 2)
    }

    fn encode(&self, s: OutageState) -> u64 {
        match s {
            OutageState::Available => 0,
            OutageState::Degraded { since } => DEGRADED | self.ms(since),
            OutageState::Recovering { until } => self.ms(until) + 1,
        }
    }

    fn decode(&self, word: u64) -> OutageState {
        let at = |ms: u64| self.base + Duration::from_millis(ms);
        match word {
            0 => OutageState::Available,
            w if w & DEGRADED != 0 => OutageState::Degraded {
                since: at(w & !DEGRADED),
            },
            w => OutageState::Recovering { until: at(w - 1) },
        }
    }

    /// The current state.
    pub(crate) fn state(&self) -> OutageState {
        self.decode(self.word.load(Ordering::Acquire))
            .at(Instant::now())
    }

    /// `true` while in an outage.
    pub(crate) fn is_degraded(&self) -> bool {
        self.word.load(Ordering::Acquire) & DEGRADED != 0
    }

    /// [`is_degraded`](Self::is_degraded), sequentially consistent with the transitions
    /// (for the hand-over checks of the endpoint tasks and permits).
    pub(crate) fn is_degraded_seqcst(&self) -> bool {
        self.word.load(Ordering::SeqCst) & DEGRADED != 0
    }

    /// When the current outage began (`None` outside one), sequentially consistent with
    /// the transitions like [`is_degraded_seqcst`](Self::is_degraded_seqcst).
    pub(crate) fn degraded_since_seqcst(&self) -> Option<Instant> {
        match self.decode(self.word.load(Ordering::SeqCst)) {
            OutageState::Degraded { since } => Some(since),
            _ => None,
        }
    }

    /// Follows the outage: `true` while in one.
    pub(crate) fn subscribe(&self) -> watch::Receiver<bool> {
        self.mode.subscribe()
    }

    /// The time left in the recovery window (`None` outside one).
    pub(crate) fn recovery_left(&self) -> Option<Duration> {
        self.decode(self.word.load(Ordering::Acquire))
            .recovery_left(Instant::now())
    }

    /// Enters an outage unless in one: sets the state, runs `before_announce` (while
    /// nothing follows the outage yet), then tells the `mode` watchers. `true` when this call
    /// started the outage.
    pub(crate) fn start(&self, before_announce: impl FnOnce()) -> bool {
        let _transition = self.transition.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let Some(next) = self.state().start(now) else {
            return false;
        };
        self.word.store(self.encode(next), Ordering::SeqCst);
        before_announce();
        self.mode.send_replace(true);
        true
    }

    /// Leaves an outage, opening a recovery window of `window`: sets the state, tells the
    /// `mode` watchers, then runs `after_announce` with how long the outage lasted. `true`
    /// when this call ended the outage.
    pub(crate) fn end(&self, window: Duration, after_announce: impl FnOnce(Duration)) -> bool {
        let _transition = self.transition.lock().unwrap_or_else(|e| e.into_inner());
        let Some((next, lasted)) = self.state().end(Instant::now(), window) else {
            return false;
        };
        self.word.store(self.encode(next), Ordering::SeqCst);
        self.mode.send_replace(false);
        after_announce(lasted);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    const WINDOW: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn states_record_when_they_began_and_the_window_closes_by_itself() {
        let t0 = Instant::now();
        let s = OutageState::Available;
        assert_eq!(s.end(t0, WINDOW), None, "no outage to end");
        let s = s.start(t0).expect("an outage starts");
        assert_eq!(s, OutageState::Degraded { since: t0 });
        assert!(s.is_degraded());
        assert_eq!(s.start(t0 + WINDOW), None, "already in an outage");
        assert_eq!(s.recovery_left(t0), None);

        let t1 = t0 + Duration::from_secs(3);
        let (s, lasted) = s.end(t1, WINDOW).expect("the outage ends");
        assert_eq!(lasted, Duration::from_secs(3));
        assert_eq!(s, OutageState::Recovering { until: t1 + WINDOW });
        assert!(!s.is_degraded());
        assert_eq!(
            s.recovery_left(t1 + Duration::from_secs(4)),
            Some(Duration::from_secs(6))
        );
        assert_eq!(s.at(t1 + WINDOW), OutageState::Available);
        assert_eq!(s.recovery_left(t1 + WINDOW), None);

        // A new outage inside the window cancels it.
        let s = s
            .start(t1 + Duration::from_secs(1))
            .expect("a second outage");
        assert_eq!(s.recovery_left(t1 + Duration::from_secs(2)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn transitions_keep_the_mode_watch_in_step() {
        let outage = Outage::new();
        let mode = outage.subscribe();
        assert_eq!(outage.state(), OutageState::Available);

        advance(Duration::from_millis(1500)).await;
        let started = outage.start(|| {
            assert!(outage.is_degraded_seqcst(), "the state is set first");
            assert!(!*mode.borrow(), "nothing follows the outage yet");
        });
        assert!(started);
        assert!(*mode.borrow());
        let since = Instant::now();
        assert_eq!(outage.state(), OutageState::Degraded { since });
        assert!(!outage.start(|| panic!("not a new outage")));

        advance(Duration::from_secs(2)).await;
        let mut lasted = None;
        assert!(outage.end(WINDOW, |d| {
            assert!(!*mode.borrow(), "the watchers are told first");
            lasted = Some(d);
        }));
        assert_eq!(lasted, Some(Duration::from_secs(2)));
        assert!(!outage.is_degraded());
        assert_eq!(outage.recovery_left(), Some(WINDOW));
        assert!(!outage.end(WINDOW, |_| panic!("no outage to end")));

        advance(WINDOW - Duration::from_millis(1)).await;
        assert_eq!(outage.recovery_left(), Some(Duration::from_millis(1)));
        advance(Duration::from_millis(1)).await;
        assert_eq!(outage.recovery_left(), None);
        assert_eq!(outage.state(), OutageState::Available);
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_during_the_window_ends_it() {
        let outage = Outage::new();
        assert!(outage.start(|| {}));
        assert!(outage.end(WINDOW, |_| {}));
        advance(Duration::from_secs(1)).await;
        assert!(outage.start(|| {}));
        assert_eq!(outage.recovery_left(), None);
        advance(Duration::from_secs(1)).await;
        assert!(outage.end(WINDOW, |d| assert_eq!(d, Duration::from_secs(1))));
        assert_eq!(outage.recovery_left(), Some(WINDOW), "a fresh window");
    }
}
