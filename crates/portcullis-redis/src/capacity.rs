//! [`RedisCapacity`]: the Redis-shared [`CapacitySource`] of one endpoint.
//!
//! # Algorithm
//!
//! * **Global count.** Redis holds, per endpoint, how many slots each gateway process
//!   (instance) holds, and a lease deadline per instance (see [`scripts`]).
//!   Acquire and release are Lua scripts run with `EVALSHA`: at most one round trip each
//!   (a release is usually carried by the next acquire), atomic on the server, no
//!   client-side read-modify-write.
//! * **Local FIFO.** Each process keeps its own queue of waiters, owned by one dispatcher
//!   task per endpoint: `acquire` sends the waiter to the dispatcher and awaits a oneshot.
//!   The dispatcher asks Redis for as many slots as it has live waiters in one script call
//!   (so a burst costs one round trip) and hands the granted slots to the oldest waiters.
//!   When Redis grants fewer than asked, the dispatcher is *blocked*: new arrivals queue
//!   without a round trip until a wake-up.
//! * **Cross-process FIFO and wake-up.** A process that got fewer slots than it asked for
//!   joins the endpoint's queue in Redis; an acquire leaves one free slot for each process
//!   queued ahead of the caller, and a process served in part goes to the back, so a busy
//!   process cannot starve a quiet one (see [`scripts`]). Whenever slots are
//!   free while processes are queued, the script publishes `w:<ids>` naming the first of
//!   them: only those processes' dispatchers retry, at once. A release in this process wakes
//!   its own dispatcher directly. As a safety net against lost messages, a blocked
//!   dispatcher with waiters retries every [`POLL_INTERVAL`](crate::POLL_INTERVAL) (50 ms: a
//!   bounded 20 attempts per second per endpoint per process), which also renews its queue
//!   entry; an entry not renewed for [`QUEUE_TTL`](crate::QUEUE_TTL) (a dead process) is
//!   dropped, and a process whose last waiter left takes itself out.
//! * **Releases** never block: dropping a permit sends one message to the endpoint's
//!   task, which batches all pending releases into one call: the next acquire when waiters
//!   are queued (one call releases and acquires), a sync otherwise. The same task runs the
//!   endpoint's heartbeat, so it never has two calls in flight, and it is the only writer
//!   of this process's slot count in Redis, which every call sets to the *absolute* count
//!   of slots the process holds (never an increment). The task also remembers the count
//!   Redis last confirmed and registers again whenever the two differ (a release or a
//!   fallback grant while an outage ends, a reply lost to a timeout), so the global count
//!   is exact again after any outage.
//! * **Cancel safety.** A dropped acquire future drops its oneshot receiver; the dispatcher
//!   sees the closed channel, skips the waiter, and gives a slot granted to it to the next
//!   waiter (or back to Redis). No slot is ever kept by a dead waiter.
//! * **Shutdown.** The task stops once the source's last clone and last acquire future are
//!   gone *and* every permit it granted has been released: a permit that outlives its source
//!   (the end of a process's last request, an endpoint dropped by a reload) still gives its
//!   slot back to Redis at once, instead of leaving it counted for every process until the
//!   lease expires. Asking for the endpoint's source again meanwhile reopens the same one.
//! * **Crash safety.** Slots are leases of the process instance: the process heartbeat
//!   renews them all (one call per endpoint every `lease_ttl / 3`), and any script call
//!   reclaims the slots of instances whose deadline (server `TIME`) passed.
//! * **Outages** (`storage.on_error`): a failed or timed-out call puts the whole storage in an
//!   outage: queued waiters are re-routed and new requests are served by the per-process
//!   fallback (`local`: a [`LocalCapacity`] of `ceil(capacity / expected_workers)`), refused
//!   (`reject`: 503 `storage_unavailable`) or admitted (`allow`), without touching Redis.
//!   With `local`, the permits Redis granted before the outage still take their place in
//!   that per-process limit (the fallback's limit is the share minus those permits, and
//!   grows as each ends), so the process never runs more than its share. And for a while
//!   after the outage (`lease_ttl`, at least 2.5 s) the process still keeps to its share:
//!   Redis may have lost every count, and the other processes, still serving their own
//!   shares, may not have re-registered yet. Every permit granted meanwhile is still counted by the process; when Redis
//!   answers again the heartbeat re-registers the absolute count of live permits, and the
//!   source returns to the shared limit.
//!
//! Inspired by distributed semaphores with leases (Redisson's `RPermitExpirableSemaphore`,
//! the Redis `SET NX PX` lock pattern). The FIFO is exact within a process; across
//! processes it is by turns (a process's turn begins when it starts waiting, or when it was
//! last served in part).

use crate::error::StorageError;
use crate::scripts::{self, Keys};
use crate::storage::{Inner, RedisStorage, ScriptReply, POLL_INTERVAL, QUEUE_TTL};
use crate::OnError;
use portcullis_admission::{AcquireError, CapacitySource, LocalCapacity, LocalPermit};
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;

/// A waiter sent to the dispatcher.
struct Waiter {
    tx: oneshot::Sender<Result<RedisPermit, AcquireError>>,
    /// `max_queue` was reached: answer `QueueFull` instead of queueing.
    no_wait: bool,
}

pub(crate) enum Cmd {
    Release,
    SetCapacity,
    /// A permit was granted outside Redis while Redis is available (the end of an outage):
    /// register it.
    Sync,
    /// Renew this endpoint's lease, registering the absolute slot count.
    Heartbeat {
        reply: oneshot::Sender<Result<(), StorageError>>,
    },
}

/// One endpoint's state, shared by its source, permits and tasks.
pub(crate) struct EndpointShared {
    pub(crate) keys: Keys,
    endpoint: String,
    inner: Arc<Inner>,
    capacity: AtomicUsize,
    global_active: AtomicUsize,
    /// Slots the *other* processes held as of the last reply that carried this process's
    /// own count (see [`fit_fallback`](Self::fit_fallback)).
    others_active: AtomicUsize,
    /// Slots this process holds: live permits of every kind (whether Redis knows about them
    /// or not) plus slots requested by an acquire call in flight (counted optimistically).
    held: AtomicUsize,
    /// This process's slot count in Redis as of the last reply ([`UNKNOWN`] after a failed
    /// call). Written by the endpoint's task only; when it differs from `held` while Redis is
    /// available, the task registers `held` (the absolute count).
    registered: AtomicUsize,
    /// Live permits granted by Redis (not by the outage policy).
    from_redis: AtomicUsize,
    queued: AtomicUsize,
    /// A local `set_capacity` not yet stored in Redis (while set, Redis's value is ignored).
    capacity_dirty: AtomicBool,
    /// The capacity last set locally, to store.
    desired_capacity: AtomicUsize,
    pub(crate) wake: Notify,
    /// Live [`SourceParts`] of this endpoint, or [`STOPPED`] once its task has stopped.
    sources: AtomicUsize,
    req_tx: mpsc::UnboundedSender<Waiter>,
    pub(crate) cmd_tx: mpsc::UnboundedSender<Cmd>,
    fallback: LocalCapacity,
}

/// [`EndpointShared::sources`] after the task stopped: the endpoint cannot be reopened.
const STOPPED: usize = usize::MAX;

/// [`EndpointShared::registered`] after a failed call: the script may or may not have run.
const UNKNOWN: usize = usize::MAX;

fn sub_sat(a: &AtomicUsize, n: usize) {
    let _ = a.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
        Some(v.saturating_sub(n))
    });
}

impl EndpointShared {
    fn on_error(&self) -> OnError {
        self.inner.config.on_error
    }

    fn observe(&self, r: &ScriptReply) {
        self.global_active.store(r.count, Ordering::Release);
        if !self.capacity_dirty.load(Ordering::Acquire)
            && r.capacity != self.capacity.load(Ordering::Acquire)
        {
            self.apply_capacity(r.capacity);
        }
    }

    /// Applies a capacity learnt from Redis (or set locally): cache and fallback limit.
    pub(crate) fn apply_capacity(&self, capacity: usize) {
        self.capacity.store(capacity, Ordering::Release);
        self.fit_fallback();
    }

    fn fallback_capacity(&self) -> usize {
        self.capacity.load(Ordering::Acquire)
    }

    /// A call of one of the endpoint's scripts with what every one of them takes (see the
    /// scripts' prologue): the five keys, then this instance and the fallback capacity.
    fn endpoint_script(&self, script: &'static redis::Script) -> redis::ScriptInvocation<'static> {
        let k = &self.keys;
        let mut inv = script.prepare_invoke();
        inv.key(&k.holders)
            .key(&k.leases)
            .key(&k.capacity)
            .key(&k.queue)
            .key(&k.queue_ttl)
            .arg(&self.inner.instance)
            .arg(self.fallback_capacity());
        inv
    }

    /// Redis confirmed that this process holds `mine` slots out of `count`.
    fn confirmed(&self, mine: usize, count: usize) {
        self.registered.store(mine, Ordering::Release);
        self.others_active
            .store(count.saturating_sub(mine), Ordering::Release);
    }

    /// The acquire script: this process now holds `mine` slots (`None`: only read the
    /// count) and asks for `want` more. Registers the result.
    async fn acquire_script(
        &self,
        mine: Option<usize>,
        want: usize,
    ) -> Result<ScriptReply, StorageError> {
        let mut inv = self.endpoint_script(&scripts::ACQUIRE);
        inv.arg(want)
            .arg(self.inner.config.lease_ttl.as_millis() as u64)
            .arg(QUEUE_TTL.as_millis() as u64)
            .arg(&self.keys.channel);
        match mine {
            Some(m) => inv.arg(m),
            None => inv.arg("-"),
        };
        let r = self.inner.run_script(&inv).await;
        match (mine, &r) {
            (Some(m), Ok(r)) => self.confirmed(m + r.n.min(want), r.count),
            (Some(_), Err(_)) => self.registered.store(UNKNOWN, Ordering::Release),
            (None, Ok(r)) => {
                let m = self.registered.load(Ordering::Acquire);
                if m != UNKNOWN {
                    self.confirmed(m, r.count);
                }
            }
            (None, Err(_)) => {}
        }
        let r = r?;
        self.observe(&r);
        Ok(r)
    }

    /// Registers this process's absolute slot count (`held`) and renews its lease: the
    /// release, the heartbeat and the re-register after an outage. `queued: false` also
    /// takes this process out of the cross-process queue (it has no waiter left).
    pub(crate) async fn sync(&self, queued: bool) -> Result<(), StorageError> {
        let held = self.held.load(Ordering::SeqCst);
        let before = self.registered.swap(UNKNOWN, Ordering::AcqRel);
        let mut inv = self.endpoint_script(&scripts::SYNC);
        inv.arg(held)
            .arg(self.inner.config.lease_ttl.as_millis() as u64)
            .arg(&self.keys.channel)
            .arg(if queued { "1" } else { "0" });
        let r = self.inner.run_script(&inv).await?;
        self.confirmed(held, r.count);
        if r.n == 0 && before > 0 && before != UNKNOWN {
            tracing::warn!(
                endpoint = %self.endpoint,
                slots = held,
                "this process's slot lease had expired in redis; registered again"
            );
        }
        self.observe(&r);
        Ok(())
    }

    /// `true` when Redis may not have this process's true slot count.
    fn out_of_sync(&self) -> bool {
        self.registered.load(Ordering::Acquire) != self.held.load(Ordering::SeqCst)
    }

    /// After an outage: store a capacity changed meanwhile, wake the dispatcher.
    pub(crate) fn after_recovery(&self) {
        if self.capacity_dirty.load(Ordering::Acquire) {
            let _ = self.cmd_tx.send(Cmd::SetCapacity);
        }
        self.wake.notify_one();
    }

    /// A permit granted by Redis (already counted in `held` and `from_redis`).
    fn redis_permit(self: &Arc<Self>) -> RedisPermit {
        RedisPermit {
            shared: Some(Arc::clone(self)),
            from_redis: true,
            _local: None,
        }
    }

    /// A permit granted without Redis during an outage.
    fn outage_permit(self: &Arc<Self>, local: Option<LocalPermit>) -> RedisPermit {
        // SeqCst with the check below and `leave_outage`'s swap: either the recovery (which
        // wakes the task after it) sees this permit in `held`, or this sees the outage over
        // and asks the task to register it.
        self.held.fetch_add(1, Ordering::SeqCst);
        if !self.inner.is_degraded() {
            let _ = self.cmd_tx.send(Cmd::Sync);
        }
        RedisPermit {
            shared: Some(Arc::clone(self)),
            from_redis: false,
            _local: local,
        }
    }

    /// Sets the limit of the outage fallback. During an `on_error: local` outage it is the
    /// process's share, `ceil(capacity / expected_workers)`, minus the live permits Redis
    /// granted before the outage (those requests still run, so they take their place in the
    /// share). While such permits are still running, the share is also capped by what the
    /// other processes left free at the last reply: a process that held more than its share
    /// when Redis went away still runs those requests, and its peers must not add their
    /// whole share on top. Once this process's own pre-outage requests have ended, the
    /// others' (same endpoint, same backend) are taken to have ended too, and the cap goes.
    /// Outside an outage the limit is 0: a waiter still on its way out of the fallback when
    /// the outage ends must not get a slot there next to the slots the task now takes from
    /// Redis. Called as an outage starts and ends, when the capacity changes, and as each
    /// of those permits ends during an outage.
    pub(crate) fn fit_fallback(&self) {
        // SeqCst with `enter_outage`'s swap and `redis_released`'s decrement: either the
        // outage start sees a release, or the release sees the outage and fits again.
        let limit = if self.on_error() == OnError::Local && self.inner.degraded_seqcst() {
            let capacity = self.capacity.load(Ordering::Acquire);
            let mut share = self.inner.config.local_limit(capacity);
            let from_redis = self.from_redis.load(Ordering::SeqCst);
            if from_redis > 0 {
                let others = self.others_active.load(Ordering::Acquire);
                share = share.min(capacity.saturating_sub(others));
            }
            share.saturating_sub(from_redis)
        } else {
            0
        };
        self.fallback.set_capacity(limit);
    }

    /// `n` permits granted by Redis are gone: during an outage, the fallback may grow.
    fn redis_released(&self, n: usize) {
        sub_sat(&self.from_redis, n);
        if self.on_error() == OnError::Local && self.inner.degraded_seqcst() {
            self.fit_fallback();
        }
    }

    /// Always through the task, even during an outage (it then skips the Redis call): the
    /// task stops only once `held` is 0, so it must see every release.
    fn release_one(&self) {
        if self.cmd_tx.send(Cmd::Release).is_err() {
            // The task is gone (it stops only once `held` is 0): nothing to give back.
            sub_sat(&self.held, 1);
        }
    }

    /// The task's exit test: no source, acquire future or permit left. Once it returns
    /// `true`, [`RedisCapacity::reopen`] fails, so no new user can appear.
    fn try_stop(&self) -> bool {
        self.held.load(Ordering::Acquire) == 0
            && self
                .sources
                .compare_exchange(0, STOPPED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }
}

/// The Redis-shared capacity source of one endpoint: one global limit shared by every
/// gateway process, a local FIFO queue of waiters per process. See the
/// [module documentation](self) for the algorithm.
///
/// Built by [`RedisStorage::capacity_source`]. Cheap to clone; clones share the slots. Its
/// task stops once the last clone and the last acquire future are dropped and every permit
/// is released (a permit may outlive the source: its slot still goes back to Redis).
#[derive(Clone)]
pub struct RedisCapacity {
    parts: Arc<SourceParts>,
}

/// What a source owns: its shared state and the storage (keeps the process tasks running).
/// Counted in [`EndpointShared::sources`]: the endpoint's task stops once none is left and
/// every permit is released.
pub(crate) struct SourceParts {
    shared: Arc<EndpointShared>,
    _storage: RedisStorage,
}

impl Drop for SourceParts {
    fn drop(&mut self) {
        if self.shared.sources.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The task re-checks whether it can stop.
            self.shared.wake.notify_one();
        }
    }
}

impl RedisCapacity {
    pub(crate) fn build(
        storage: RedisStorage,
        endpoint: &str,
        keys: Keys,
        capacity: usize,
    ) -> Self {
        let inner = Arc::clone(&storage.inner);
        let (req_tx, req_rx) = mpsc::unbounded_channel();
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(EndpointShared {
            keys,
            endpoint: endpoint.to_owned(),
            // Closed until an outage (see `fit_fallback`; `capacity_source` fits it once the
            // endpoint is registered, in case the storage is in an outage already).
            fallback: LocalCapacity::new(0),
            inner,
            capacity: AtomicUsize::new(capacity),
            global_active: AtomicUsize::new(0),
            others_active: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
            registered: AtomicUsize::new(UNKNOWN),
            from_redis: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            capacity_dirty: AtomicBool::new(false),
            desired_capacity: AtomicUsize::new(capacity),
            wake: Notify::new(),
            sources: AtomicUsize::new(1),
            req_tx,
            cmd_tx,
        });
        // Owned by the source's clones, acquire futures and permits: it stops by itself once
        // all are gone (see `try_stop`).
        drop(tokio::spawn(dispatcher(
            Arc::clone(&shared),
            req_rx,
            cmd_rx,
        )));
        Self {
            parts: Arc::new(SourceParts {
                shared,
                _storage: storage,
            }),
        }
    }

    /// A new source over the state of one whose clones are all gone but whose task still
    /// runs (permits are still out); `None` once the task has stopped.
    pub(crate) fn reopen(storage: RedisStorage, shared: Arc<EndpointShared>) -> Option<Self> {
        shared
            .sources
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n != STOPPED).then_some(n + 1)
            })
            .ok()?;
        Some(Self {
            parts: Arc::new(SourceParts {
                shared,
                _storage: storage,
            }),
        })
    }

    pub(crate) fn shared(&self) -> &Arc<EndpointShared> {
        &self.parts.shared
    }

    pub(crate) fn parts_weak(&self) -> std::sync::Weak<SourceParts> {
        Arc::downgrade(&self.parts)
    }

    pub(crate) fn from_parts(parts: Arc<SourceParts>) -> Self {
        Self { parts }
    }

    /// The endpoint (path) this source limits.
    pub fn endpoint(&self) -> &str {
        &self.parts.shared.endpoint
    }

    /// The number of slots this process holds (its share of [`active`](CapacitySource::active)).
    pub fn held_locally(&self) -> usize {
        self.parts.shared.held.load(Ordering::Acquire)
    }

    /// `true` while the storage is in an outage and `storage.on_error` applies.
    pub fn is_degraded(&self) -> bool {
        self.parts.shared.inner.is_degraded()
    }

    /// Reads the global count from Redis now (one round trip), updating the cached
    /// [`active`](CapacitySource::active). Holds no slot.
    pub async fn refresh(&self) -> Result<usize, StorageError> {
        self.parts
            .shared
            .acquire_script(None, 0)
            .await
            .map(|r| r.count)
    }
}

impl fmt::Debug for RedisCapacity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCapacity")
            .field("endpoint", &self.parts.shared.endpoint)
            .field("capacity", &self.capacity())
            .field("active", &self.active())
            .field("held_locally", &self.held_locally())
            .field("queue_depth", &self.queue_depth())
            .field("degraded", &self.is_degraded())
            .finish()
    }
}

/// The acquire future of [`RedisCapacity`]: cancel-safe (see the [module docs](self)).
pub type RedisAcquire = Pin<Box<dyn Future<Output = Result<RedisPermit, AcquireError>> + Send>>;

struct QueuedGuard<'a>(&'a AtomicUsize);

impl<'a> QueuedGuard<'a> {
    fn new(a: &'a AtomicUsize) -> Self {
        a.fetch_add(1, Ordering::AcqRel);
        Self(a)
    }
}

impl Drop for QueuedGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl CapacitySource for RedisCapacity {
    type Permit = RedisPermit;
    type Acquire = RedisAcquire;

    fn acquire(&self, max_queue: Option<usize>) -> Self::Acquire {
        // The future keeps the source open: the task serves it until it is dropped.
        let parts = Arc::clone(&self.parts);
        let mut mode: watch::Receiver<bool> = parts.shared.inner.mode.subscribe();
        Box::pin(async move {
            let shared = &parts.shared;
            loop {
                let degraded = *mode.borrow_and_update();
                if degraded {
                    match shared.on_error() {
                        OnError::Reject => {
                            return Err(AcquireError::storage_unavailable(
                                StorageError::Unavailable,
                            ))
                        }
                        OnError::Allow => return Ok(shared.outage_permit(None)),
                        OnError::Local => {
                            let fallback = shared.fallback.acquire(max_queue);
                            tokio::select! {
                                r = fallback => return r.map(|p| shared.outage_permit(Some(p))),
                                changed = mode.changed() => {
                                    if changed.is_err() {
                                        return Err(AcquireError::storage_unavailable(StorageError::Unavailable));
                                    }
                                    continue;
                                }
                            }
                        }
                    }
                }
                let (tx, rx) = oneshot::channel();
                let queued = QueuedGuard::new(&shared.queued);
                let no_wait = max_queue.is_some_and(|m| shared.queued.load(Ordering::Acquire) > m);
                if shared.req_tx.send(Waiter { tx, no_wait }).is_err() {
                    return Err(AcquireError::storage_unavailable(StorageError::Unavailable));
                }
                let r = rx.await;
                drop(queued);
                match r {
                    Ok(r) => return r,
                    // The dispatcher let the waiter go: the storage entered an outage.
                    Err(_) => continue,
                }
            }
        })
    }

    fn set_capacity(&self, capacity: usize) {
        let s = &self.parts.shared;
        s.desired_capacity.store(capacity, Ordering::Release);
        s.capacity_dirty.store(true, Ordering::Release);
        s.apply_capacity(capacity);
        let _ = s.cmd_tx.send(Cmd::SetCapacity);
        s.wake.notify_one();
    }

    fn capacity(&self) -> usize {
        self.parts.shared.capacity.load(Ordering::Acquire)
    }

    /// The global count of slots held by every process, as of this process's last round
    /// trip (refreshed at least every heartbeat). During an outage, this process's own
    /// count.
    fn active(&self) -> usize {
        if self.parts.shared.inner.is_degraded() {
            self.parts.shared.held.load(Ordering::Acquire)
        } else {
            self.parts.shared.global_active.load(Ordering::Acquire)
        }
    }

    fn queue_depth(&self) -> usize {
        self.parts.shared.queued.load(Ordering::Acquire) + self.parts.shared.fallback.queue_depth()
    }
}

/// A slot of a [`RedisCapacity`]; dropping it releases the slot (in the background: the
/// drop never blocks).
pub struct RedisPermit {
    shared: Option<Arc<EndpointShared>>,
    /// Granted by Redis (not by the outage policy).
    from_redis: bool,
    _local: Option<LocalPermit>,
}

impl Drop for RedisPermit {
    fn drop(&mut self) {
        if let Some(s) = self.shared.take() {
            if self.from_redis {
                s.redis_released(1);
            }
            s.release_one();
        }
    }
}

impl fmt::Debug for RedisPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisPermit")
            .field("fallback", &self._local.is_some())
            .finish()
    }
}

/// The per-endpoint task (see the module docs): the FIFO of waiters, batched releases,
/// capacity changes and this endpoint's heartbeat. Being the only task that talks to Redis
/// for this endpoint, it never has two calls in flight and is the only writer of this
/// process's slot count, which it always writes as an absolute count (`held`). It stops
/// once no source, acquire future or permit is left (it is not aborted with the source:
/// releases still queued must reach Redis).
async fn dispatcher(
    shared: Arc<EndpointShared>,
    mut req_rx: mpsc::UnboundedReceiver<Waiter>,
    mut cmd_rx: mpsc::UnboundedReceiver<Cmd>,
) {
    let mut mode = shared.inner.mode.subscribe();
    let mut queue: VecDeque<Waiter> = VecDeque::new();
    let mut blocked = false;
    // This process has an entry in the endpoint's cross-process queue in Redis.
    let mut enqueued = false;
    let mut next_poll = Instant::now();
    // Learn the stored capacity (and restore it if Redis has none) right away.
    if let Err(e) = shared.sync(false).await {
        shared.inner.enter_outage(&e);
    }
    let mut cmds: Vec<Cmd> = Vec::new();
    loop {
        tokio::select! {
            biased;
            changed = mode.changed() => if changed.is_err() { return },
            c = cmd_rx.recv() => match c {
                Some(c) => cmds.push(c),
                None => return,
            },
            w = req_rx.recv() => match w {
                Some(w) => queue.push_back(w),
                None => return,
            },
            _ = shared.wake.notified() => blocked = false,
            _ = tokio::time::sleep_until(next_poll), if blocked && !queue.is_empty() => blocked = false,
        }
        while let Ok(w) = req_rx.try_recv() {
            queue.push_back(w);
        }
        while let Ok(c) = cmd_rx.try_recv() {
            cmds.push(c);
        }
        queue.retain(|w| !w.tx.is_closed());
        if !cmds.is_empty() {
            match run_commands(&shared, &mut cmds, enqueued && !queue.is_empty()).await {
                Some(Synced { released, left }) => {
                    blocked &= !released;
                    enqueued &= !left;
                }
                None => enqueued = false,
            }
        }
        if *mode.borrow_and_update() || shared.inner.degraded_seqcst() {
            // Outage: every waiter gets the outage policy's answer. Redis lost or will
            // expire this process's queue entry.
            let_go(&shared, &mut queue);
            blocked = false;
            enqueued = false;
            if shared.try_stop() {
                return;
            }
            continue;
        }
        queue.retain(|w| !w.tx.is_closed());
        if blocked {
            reject_no_wait(&mut queue);
        }
        let acquiring = !queue.is_empty() && !blocked;
        // Releases (and permits counted during an outage) not registered yet, or a queue
        // entry with no waiter left behind it; with waiters to serve, the acquire below
        // registers the releases in the same call.
        let leave = enqueued && queue.is_empty();
        if !acquiring && (shared.out_of_sync() || leave) {
            match shared.sync(!leave && enqueued).await {
                Ok(()) => enqueued &= !leave,
                Err(e) => {
                    enqueued = false;
                    shared.inner.enter_outage(&e);
                }
            }
        }
        if shared.try_stop() {
            return;
        }
        if !acquiring {
            continue;
        }
        let mut want = queue.len();
        if let Some(left) = shared.inner.recovery_grace() {
            // Just after an outage: keep to this process's share until every process has
            // re-registered the slots it took meanwhile (see `Inner::recovery_grace`).
            let share = shared
                .inner
                .config
                .local_limit(shared.capacity.load(Ordering::Acquire));
            want = want.min(share.saturating_sub(shared.held.load(Ordering::SeqCst)));
            if want == 0 {
                blocked = true;
                next_poll = Instant::now() + POLL_INTERVAL.min(left);
                continue;
            }
        }
        let mine = shared.held.fetch_add(want, Ordering::SeqCst);
        match shared.acquire_script(Some(mine), want).await {
            Ok(r) => {
                let granted = r.n.min(want);
                enqueued = granted < want;
                sub_sat(&shared.held, want - granted);
                // SeqCst with `enter_outage`'s swap: either the outage's fallback limit
                // counts these permits, or they are not handed out.
                shared.from_redis.fetch_add(granted, Ordering::SeqCst);
                if shared.inner.degraded_seqcst() {
                    // The outage began meanwhile: its policy serves the waiters; the slots
                    // are given back by the re-register when Redis answers again.
                    shared.redis_released(granted);
                    sub_sat(&shared.held, granted);
                    let_go(&shared, &mut queue);
                    blocked = false;
                    enqueued = false;
                    continue;
                }
                let mut spare = granted;
                let mut recycled: Option<RedisPermit> = None;
                while spare > 0 {
                    let Some(w) = queue.pop_front() else { break };
                    let p = recycled.take().unwrap_or_else(|| shared.redis_permit());
                    match w.tx.send(Ok(p)) {
                        Ok(()) => spare -= 1,
                        // The waiter left meanwhile: the slot goes to the next one.
                        Err(Ok(p)) => recycled = Some(p),
                        Err(Err(_)) => unreachable!("only permits are sent here"),
                    }
                }
                if let Some(p) = recycled.take() {
                    spare -= 1;
                    drop(p);
                }
                for _ in 0..spare {
                    drop(shared.redis_permit());
                }
                if granted < want || queue.iter().any(|w| !w.tx.is_closed()) {
                    blocked = true;
                    next_poll = Instant::now() + POLL_INTERVAL;
                    reject_no_wait(&mut queue);
                }
            }
            Err(e) => {
                sub_sat(&shared.held, want);
                enqueued = false;
                shared.inner.enter_outage(&e);
                let_go(&shared, &mut queue);
                blocked = false;
            }
        }
    }
}

/// What [`run_commands`] did: `released` when slots were released or the capacity changed
/// (a retry may now succeed), `left` when a heartbeat took this process out of the queue.
struct Synced {
    released: bool,
    left: bool,
}

/// Runs the pending releases (bookkeeping only: the next call registers the absolute
/// count), capacity change and heartbeats (`queued`: this process still has waiters in the
/// cross-process queue). `None` when a call failed (the storage entered an outage).
async fn run_commands(
    shared: &Arc<EndpointShared>,
    cmds: &mut Vec<Cmd>,
    queued: bool,
) -> Option<Synced> {
    let (mut releases, mut set_cap) = (0usize, false);
    let mut beats = Vec::new();
    for c in cmds.drain(..) {
        match c {
            Cmd::Release => releases += 1,
            Cmd::SetCapacity => set_cap = true,
            Cmd::Sync => {}
            Cmd::Heartbeat { reply } => beats.push(reply),
        }
    }
    let mut done = Synced {
        released: releases > 0,
        left: false,
    };
    let mut ok = true;
    sub_sat(&shared.held, releases);
    if set_cap && !shared.inner.is_degraded() {
        let c = shared.desired_capacity.load(Ordering::Acquire);
        let r = shared
            .inner
            .invoke::<i64>(
                scripts::SET_CAPACITY_SCRIPT
                    .key(&shared.keys.capacity)
                    .arg(c)
                    .arg(&shared.keys.channel),
            )
            .await;
        match r {
            Ok(_) => {
                // A newer set_capacity keeps the flag (and is stored next).
                if shared.desired_capacity.load(Ordering::Acquire) == c {
                    shared.capacity_dirty.store(false, Ordering::Release);
                }
                done.released = true;
            }
            Err(e) => {
                ok = false;
                shared.inner.enter_outage(&e);
            }
        }
    }
    if !beats.is_empty() {
        // Also during an outage: the recovery's re-register is this call.
        let r = shared.sync(queued).await;
        done.left = !queued;
        ok &= r.is_ok();
        let copy = |r: &Result<(), StorageError>| match r {
            Ok(()) => Ok(()),
            Err(e) => Err(StorageError::Redis(e.to_string())),
        };
        for reply in beats {
            let _ = reply.send(copy(&r));
        }
    }
    ok.then_some(done)
}

/// The storage is in an outage: every queued waiter gets the outage policy's answer from
/// the task itself (`reject`: storage unavailable, `allow`: admitted), or is let go to
/// re-route to the fallback (`local`). Never only dropped in `reject`/`allow` mode: a waiter
/// that re-checks the mode before it changed would queue again for a Redis whose replies
/// are all discarded, and wait for its whole queue timeout.
fn let_go(shared: &Arc<EndpointShared>, queue: &mut VecDeque<Waiter>) {
    match shared.on_error() {
        OnError::Reject => {
            for w in queue.drain(..) {
                let _ = w.tx.send(Err(AcquireError::storage_unavailable(
                    StorageError::Unavailable,
                )));
            }
        }
        OnError::Allow => {
            for w in queue.drain(..) {
                if !w.tx.is_closed() {
                    // A waiter gone meanwhile drops the permit (released again).
                    let _ = w.tx.send(Ok(shared.outage_permit(None)));
                }
            }
        }
        OnError::Local => queue.clear(),
    }
}

fn reject_no_wait(queue: &mut VecDeque<Waiter>) {
    if queue.iter().any(|w| w.no_wait) {
        let mut keep = VecDeque::with_capacity(queue.len());
        for w in queue.drain(..) {
            if w.no_wait {
                let _ = w.tx.send(Err(AcquireError::QueueFull));
            } else {
                keep.push_back(w);
            }
        }
        *queue = keep;
    }
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use super::*;
    use crate::testing::RedisServer;
    use crate::StorageConfig;
    use std::time::Duration;

    fn holders(server: &RedisServer, endpoint: &str) -> usize {
        let out = server.cli(&["HVALS", &format!("{{portcullis:{endpoint}}}:holders")]);
        out.lines()
            .filter_map(|l| l.trim().parse::<usize>().ok())
            .sum()
    }

    async fn eventually(mut f: impl FnMut() -> bool) -> bool {
        for _ in 0..200 {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        f()
    }

    /// Runs `during` inside the window between the recovery's re-register and the end of an
    /// (induced) outage, then checks that Redis ends with this process's exact count.
    async fn in_recovery_window(
        server: &RedisServer,
        storage: &RedisStorage,
        src: &RedisCapacity,
        during: impl std::future::Future<Output = ()>,
    ) {
        let (reached_tx, reached) = oneshot::channel();
        let (resume, resume_rx) = oneshot::channel();
        *storage.inner.recovery_pause.lock().unwrap() = Some((reached_tx, resume_rx));
        storage.inner.enter_outage(&StorageError::Unavailable);
        tokio::time::timeout(Duration::from_secs(5), reached)
            .await
            .expect("recovery re-registered")
            .unwrap();
        assert!(src.is_degraded());
        during.await;
        resume.send(()).unwrap();
        assert!(eventually(|| !src.is_degraded()).await);
        let endpoint = src.endpoint().to_owned();
        assert!(
            eventually(|| holders(server, &endpoint) == src.held_locally()).await,
            "redis counts {} slots, this process holds {}",
            holders(server, &endpoint),
            src.held_locally()
        );
    }

    /// A release, then a fallback grant, each between the recovery's re-register and the end
    /// of the outage: Redis ends with the exact count both times, and 0 once all is released.
    ///
    /// Regression: the release skipped Redis (one slot counted for as long as the process
    /// lived), and the fallback permit was never registered (its release under-counted).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn count_is_exact_after_changes_while_the_outage_ends() {
        let Some(server) = RedisServer::start("count_is_exact_after_changes_while_the_outage_ends")
        else {
            return;
        };
        let mut config = StorageConfig::redis(server.url());
        config.on_error = OnError::Local;
        config.timeout = Duration::from_secs(2);
        let storage = RedisStorage::connect(&config).await.unwrap();
        let src = storage.capacity_source("/window", 4);
        let p1 = src.acquire(None).await.unwrap();
        let p2 = src.acquire(None).await.unwrap();
        assert_eq!(holders(&server, "/window"), 2);

        // (a) A release in the window.
        let settled = Arc::clone(src.shared());
        in_recovery_window(&server, &storage, &src, async move {
            drop(p1);
            assert!(eventually(|| settled.held.load(Ordering::Acquire) == 1).await);
        })
        .await;
        assert_eq!(holders(&server, "/window"), 1);

        // (b) A fallback grant in the window.
        let (tx, rx) = oneshot::channel();
        in_recovery_window(&server, &storage, &src, async {
            let p3 = src.acquire(None).await.unwrap();
            assert_eq!(src.held_locally(), 2);
            tx.send(p3).unwrap();
        })
        .await;
        let p3 = rx.await.unwrap();
        assert_eq!(holders(&server, "/window"), 2);

        drop((p2, p3));
        assert!(eventually(|| holders(&server, "/window") == 0).await);
        assert_eq!(src.held_locally(), 0);
    }
}
