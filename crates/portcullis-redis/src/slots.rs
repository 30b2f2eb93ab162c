//! [`Slots`]: one endpoint's slot accounting in this process, without any I/O.
//!
//! Three counts and two observations:
//!
//! * **held**: the slots this process holds: live permits of every kind (whether Redis
//!   knows about them or not) plus the slots an acquire call in flight asked for (counted
//!   optimistically, so the absolute count the call registers already includes them).
//! * **registered**: this process's count in Redis as of the last reply, or
//!   [`UNKNOWN`] after a failed call (the script may or may not have run). Whenever it
//!   differs from `held` while Redis is available, the endpoint's task registers `held`.
//! * **from_redis**: the live permits Redis granted (not the outage policy). During an
//!   `on_error: local` outage they still run, so they take their place in the fallback
//!   share ([`fallback_limit`]).
//! * **global** and **others**: the endpoint's global count, and the part of it the other
//!   processes held, as of the last reply that carried them.
//!
//! The orderings that hand a slot over between the endpoint's task, its permits and the
//! outage transitions are `SeqCst` (each method says which side of the hand-over it is).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// The span of one [`RecentMax`] epoch: a long request is forgotten one to two epochs
/// after it ended.
const HOLD_EPOCH: Duration = Duration::from_secs(10);

/// The largest value recorded in the current or the previous epoch, without a lock.
///
/// `current` packs the epoch's index (high 32 bits) and its maximum (low 32 bits);
/// `previous` is the maximum of the epoch before it. Racing records may lose a value of
/// the epoch that is just ending, never one of the current epoch.
#[derive(Debug, Default)]
struct RecentMax {
    current: AtomicU64,
    previous: AtomicU64,
}

impl RecentMax {
    fn split(word: u64) -> (u64, u64) {
        (word >> 32, word & u64::from(u32::MAX))
    }

    /// Records `value` (clamped to 32 bits) in epoch `epoch`.
    fn record(&self, epoch: u64, value: u64) {
        let value = value.min(u64::from(u32::MAX));
        let mut word = self.current.load(Ordering::Acquire);
        loop {
            let (e, max) = Self::split(word);
            if e > epoch || (e == epoch && max >= value) {
                return;
            }
            let next = (epoch << 32) | value;
            match self.current.compare_exchange_weak(
                word,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    if e < epoch {
                        let carried = if e + 1 == epoch { max } else { 0 };
                        self.previous.store(carried, Ordering::Release);
                    }
                    return;
                }
                Err(w) => word = w,
            }
        }
    }

    /// The largest value of epoch `epoch` and the one before it.
    fn get(&self, epoch: u64) -> u64 {
        let (e, max) = Self::split(self.current.load(Ordering::Acquire));
        if e == epoch {
            max.max(self.previous.load(Ordering::Acquire))
        } else if e + 1 == epoch {
            max
        } else {
            0
        }
    }
}

/// [`Slots::registered`] after a failed call: the script may or may not have run.
pub(crate) const UNKNOWN: usize = usize::MAX;

/// The limit of the outage fallback of a process whose outage share is `share`, the
/// endpoint's capacity `capacity`, while `from_redis` permits Redis granted before the
/// outage still run and the other processes held `others` slots at the last reply.
///
/// The permits from Redis take their place in the share. While any of them runs, or while
/// `peers_may_run` (the others' pre-outage requests may still run: the outage began less
/// than the longest recent request ago, see [`Slots::longest_recent_hold`]), the share is
/// also capped by what the others left free: a process that held more than its share when
/// Redis went away still runs those requests, and its peers must not add their whole share
/// on top. This process's own requests ending first is not enough to lift the cap: a peer
/// may have been granted its last ones later.
pub(crate) fn fallback_limit(
    share: usize,
    capacity: usize,
    from_redis: usize,
    others: usize,
    peers_may_run: bool,
) -> usize {
    let share = if from_redis > 0 || peers_may_run {
        share.min(capacity.saturating_sub(others))
    } else {
        share
    };
    share.saturating_sub(from_redis)
}

/// How many of `want` waiters a process may ask Redis for during the recovery window after
/// an outage, holding `held` slots with an outage share of `share`: it keeps to its share
/// until every process has re-registered what it took meanwhile.
pub(crate) fn recovery_want(want: usize, share: usize, held: usize) -> usize {
    want.min(share.saturating_sub(held))
}

fn sub_sat(a: &AtomicUsize, n: usize) {
    let _ = a.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
        Some(v.saturating_sub(n))
    });
}

/// The slot accounting of one endpoint in this process (see the [module docs](self)).
#[derive(Debug)]
pub(crate) struct Slots {
    held: AtomicUsize,
    registered: AtomicUsize,
    from_redis: AtomicUsize,
    global: AtomicUsize,
    others: AtomicUsize,
    /// How long the permits from Redis lasted lately, in ms.
    holds: RecentMax,
    /// The origin of the [`holds`](Self::holds) epochs.
    origin: Instant,
}

impl Slots {
    /// Nothing held; the count in Redis is not known yet.
    pub(crate) fn new() -> Self {
        Self {
            held: AtomicUsize::new(0),
            registered: AtomicUsize::new(UNKNOWN),
            from_redis: AtomicUsize::new(0),
            global: AtomicUsize::new(0),
            others: AtomicUsize::new(0),
            holds: RecentMax::default(),
            origin: Instant::now(),
        }
    }

    /// The slots this process holds.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// [`held`](Self::held), sequentially consistent with the hand-overs (the count a
    /// call registers, the outage transitions).
    pub(crate) fn held_seqcst(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// The live permits Redis granted.
    #[cfg(test)]
    pub(crate) fn granted_by_redis(&self) -> usize {
        self.from_redis.load(Ordering::SeqCst)
    }

    /// The endpoint's global count as of the last reply.
    pub(crate) fn global(&self) -> usize {
        self.global.load(Ordering::Acquire)
    }

    /// The endpoint's global count from a reply.
    pub(crate) fn observe_global(&self, count: usize) {
        self.global.store(count, Ordering::Release);
    }

    /// An acquire call asks for `want` more slots: they count as held at once. Returns the
    /// count held before them (what the call registers besides the grant).
    pub(crate) fn reserve(&self, want: usize) -> usize {
        self.held.fetch_add(want, Ordering::SeqCst)
    }

    /// The call of [`reserve`](Self::reserve) failed: none of the `want` slots is held.
    pub(crate) fn unreserve(&self, want: usize) {
        sub_sat(&self.held, want);
    }

    /// Redis granted `granted` of the `want` reserved slots: the rest is not held, the
    /// grant counts as permits from Redis (`SeqCst` with the outage start: either the
    /// fallback limit counts them, or the task sees the outage and does not hand them out).
    pub(crate) fn granted(&self, want: usize, granted: usize) {
        sub_sat(&self.held, want.saturating_sub(granted));
        self.from_redis.fetch_add(granted, Ordering::SeqCst);
    }

    /// A permit granted without Redis (the outage policy): held at once (`SeqCst` with the
    /// outage end: either the recovery sees it in `held`, or its grantor sees the outage
    /// over and asks the task to register it).
    pub(crate) fn add_outage_permit(&self) {
        self.held.fetch_add(1, Ordering::SeqCst);
    }

    /// `n` slots of any kind are no longer held.
    pub(crate) fn release(&self, n: usize) {
        sub_sat(&self.held, n);
    }

    /// `n` permits granted by Redis have ended (besides [`release`](Self::release)).
    pub(crate) fn redis_released(&self, n: usize) {
        sub_sat(&self.from_redis, n);
    }

    /// Redis confirmed that this process holds `mine` slots out of `count`.
    pub(crate) fn confirmed(&self, mine: usize, count: usize) {
        self.registered.store(mine, Ordering::Release);
        self.others
            .store(count.saturating_sub(mine), Ordering::Release);
    }

    /// An acquire call that registered `mine + grant` answered with the global `count`.
    pub(crate) fn acquire_answered(&self, mine: usize, want: usize, granted: usize, count: usize) {
        self.confirmed(mine + granted.min(want), count);
    }

    /// A read-only call answered with the global `count`: the others' part follows it if
    /// this process's own count is known.
    pub(crate) fn read_answered(&self, count: usize) {
        let mine = self.registered.load(Ordering::Acquire);
        if mine != UNKNOWN {
            self.confirmed(mine, count);
        }
    }

    /// A call that registers this process's count is about to run (or failed): until a
    /// reply confirms it, the count in Redis is unknown. Returns the count registered
    /// before.
    pub(crate) fn forget_registered(&self) -> usize {
        self.registered.swap(UNKNOWN, Ordering::AcqRel)
    }

    /// `true` when Redis may not have this process's true slot count.
    pub(crate) fn out_of_sync(&self) -> bool {
        self.registered.load(Ordering::Acquire) != self.held.load(Ordering::SeqCst)
    }

    /// The fallback limit during an `on_error: local` outage ([`fallback_limit`]) for an
    /// outage share `share` of `capacity`, in an outage that began at `since` (`SeqCst`
    /// with the outage start and the end of a permit from Redis: either the start sees the
    /// end, or the end sees the outage and fits the limit again).
    pub(crate) fn fallback_limit(&self, share: usize, capacity: usize, since: Instant) -> usize {
        let from_redis = self.from_redis.load(Ordering::SeqCst);
        let others = self.others.load(Ordering::Acquire);
        let now = Instant::now();
        let peers_may_run = now < since + self.longest_recent_hold(now);
        fallback_limit(share, capacity, from_redis, others, peers_may_run)
    }

    fn epoch(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs() / HOLD_EPOCH.as_secs()
    }

    /// A permit from Redis ended after `held` (what [`longest_recent_hold`] follows).
    ///
    /// [`longest_recent_hold`]: Self::longest_recent_hold
    pub(crate) fn hold_ended(&self, held: Duration) {
        let ms = u64::try_from(held.as_millis()).unwrap_or(u64::MAX);
        self.holds.record(self.epoch(Instant::now()), ms);
    }

    /// The longest a permit from Redis lasted in the last 10 to 20 s: how long the
    /// requests every process was granted before an outage may still run after it began
    /// (the others' requests go to the same backend as this process's).
    pub(crate) fn longest_recent_hold(&self, now: Instant) -> Duration {
        Duration::from_millis(self.holds.get(self.epoch(now)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_share_counts_the_permits_from_redis_and_the_others() {
        // No permit from Redis: the whole share, whatever the others held.
        assert_eq!(fallback_limit(5, 10, 0, 10, false), 5);
        // Two of this process's requests still run: they take their place in the share.
        assert_eq!(fallback_limit(5, 10, 2, 0, false), 3);
        // The others held 7 of 10: only 3 were free, and 2 of those are this process's.
        assert_eq!(fallback_limit(5, 10, 2, 7, false), 1);
        // More than the share still runs: the fallback stays closed.
        assert_eq!(fallback_limit(5, 10, 6, 0, false), 0);
        assert_eq!(fallback_limit(5, 10, 1, 12, false), 0);
        // This process's own requests have ended, but the others' may still run: they
        // held 7, so only 3 are free.
        assert_eq!(fallback_limit(5, 10, 0, 7, true), 3);
        assert_eq!(fallback_limit(5, 10, 0, 12, true), 0);
    }

    #[test]
    fn recent_max_keeps_two_epochs() {
        let m = RecentMax::default();
        assert_eq!(m.get(0), 0);
        m.record(0, 40);
        m.record(0, 30);
        assert_eq!(m.get(0), 40);
        m.record(1, 10);
        assert_eq!(m.get(1), 40, "the previous epoch still counts");
        assert_eq!(m.get(2), 10, "only the last epoch recorded");
        assert_eq!(m.get(3), 0, "forgotten");
        m.record(0, 99);
        assert_eq!(m.get(1), 40, "a late record of an old epoch is dropped");
        m.record(5, 7);
        assert_eq!(m.get(5), 7, "an epoch after a gap carries nothing over");
    }

    #[tokio::test(start_paused = true)]
    async fn the_cap_lasts_the_longest_recent_request_after_the_outage_began() {
        let s = Slots::new();
        s.confirmed(0, 7);
        s.hold_ended(Duration::from_millis(300));
        let since = Instant::now();
        assert_eq!(s.longest_recent_hold(since), Duration::from_millis(300));
        assert_eq!(
            s.fallback_limit(5, 10, since),
            3,
            "the others may still run 7"
        );
        tokio::time::advance(Duration::from_millis(300)).await;
        assert_eq!(
            s.fallback_limit(5, 10, since),
            5,
            "their requests have ended"
        );
        tokio::time::advance(HOLD_EPOCH * 2).await;
        assert_eq!(s.longest_recent_hold(Instant::now()), Duration::ZERO);
    }

    #[test]
    fn recovery_keeps_to_the_share() {
        assert_eq!(recovery_want(4, 3, 0), 3);
        assert_eq!(recovery_want(4, 3, 2), 1);
        assert_eq!(recovery_want(4, 3, 5), 0);
        assert_eq!(recovery_want(1, 3, 0), 1);
    }

    #[test]
    fn an_acquire_registers_the_absolute_count() {
        let s = Slots::new();
        assert!(s.out_of_sync(), "unknown until the first reply");
        s.confirmed(0, 3);
        assert!(!s.out_of_sync());

        // Ask for 4, get 3 of them; the others held 3.
        let mine = s.reserve(4);
        assert_eq!((mine, s.held()), (0, 4));
        s.granted(4, 3);
        s.acquire_answered(mine, 4, 3, 6);
        assert_eq!((s.held(), s.granted_by_redis()), (3, 3));
        assert!(!s.out_of_sync());

        // One permit ends: held drops at once, Redis learns it at the next call.
        s.release(1);
        s.redis_released(1);
        assert_eq!((s.held(), s.granted_by_redis()), (2, 2));
        assert!(s.out_of_sync());
        assert_eq!(s.forget_registered(), 3);
        s.confirmed(s.held(), 5);
        assert!(!s.out_of_sync());
        // The others' part follows a read: 3 held elsewhere.
        let since = Instant::now();
        assert_eq!(
            s.fallback_limit(10, 10, since),
            fallback_limit(10, 10, 2, 3, false)
        );
        s.read_answered(9);
        assert_eq!(
            s.fallback_limit(10, 10, since),
            fallback_limit(10, 10, 2, 7, false)
        );
    }

    #[test]
    fn a_failed_call_leaves_the_count_unknown() {
        let s = Slots::new();
        s.confirmed(0, 0);
        let mine = s.reserve(2);
        s.forget_registered();
        s.unreserve(2);
        assert_eq!((mine, s.held()), (0, 0));
        assert!(s.out_of_sync(), "unknown, even though nothing is held");
        // A read does not confirm an unknown count.
        s.read_answered(4);
        assert!(s.out_of_sync());
        s.confirmed(0, 4);
        assert!(!s.out_of_sync());
    }

    #[test]
    fn outage_permits_are_held_but_not_from_redis() {
        let s = Slots::new();
        s.confirmed(0, 0);
        s.add_outage_permit();
        s.add_outage_permit();
        assert_eq!((s.held(), s.granted_by_redis()), (2, 0));
        assert!(s.out_of_sync(), "registered when Redis is back");
        s.release(5);
        assert_eq!(s.held(), 0, "never below zero");
    }
}
