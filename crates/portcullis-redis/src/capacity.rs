//! [`RedisCapacity`]: the Redis-shared [`CapacitySource`] of one endpoint.
//!
//! # Algorithm
//!
//! * **Global count.** Redis holds, per endpoint, how many slots each gateway process
//!   (instance) holds, and a lease deadline per instance (see [`scripts`](crate::scripts)).
//!   Acquire and release are Lua scripts run with `EVALSHA`: one round trip each, atomic on
//!   the server, no client-side read-modify-write.
//! * **Local FIFO.** Each process keeps its own queue of waiters, owned by one dispatcher
//!   task per endpoint: `acquire` sends the waiter to the dispatcher and awaits a oneshot.
//!   The dispatcher asks Redis for as many slots as it has live waiters in one script call
//!   (so a burst costs one round trip) and hands the granted slots to the oldest waiters.
//!   When Redis grants fewer than asked, the dispatcher is *blocked*: new arrivals queue
//!   without a round trip until a wake-up.
//! * **Cross-process wake-up.** A failed acquire sets a short-lived `waiting` flag; a
//!   release while the flag is set publishes `r` on the endpoint's channel, and every
//!   process's pub/sub listener wakes its dispatcher, which retries at once. A release in
//!   this process wakes its own dispatcher directly. As a safety net against lost messages,
//!   a blocked dispatcher with waiters retries every [`POLL_INTERVAL`](crate::POLL_INTERVAL)
//!   (50 ms: a bounded 20 attempts per second per endpoint per process).
//! * **Releases** never block: dropping a permit sends one message to the endpoint's
//!   task, which batches all pending releases into one script call. The same task runs the
//!   endpoint's heartbeat, so it never has two calls in flight and the slot count a
//!   heartbeat registers is exact.
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
//!   Every permit granted meanwhile is still counted by the process; when Redis answers
//!   again the heartbeat re-registers the absolute count of live permits, and the source
//!   returns to the shared limit.
//!
//! Inspired by distributed semaphores with leases (Redisson's `RPermitExpirableSemaphore`,
//! the Redis `SET NX PX` lock pattern); the FIFO is per process, so across processes the
//! order is the order in which their retries reach Redis.

use crate::error::StorageError;
use crate::scripts::{self, Keys};
use crate::storage::{Inner, RedisStorage, ScriptReply, POLL_INTERVAL, WAITING_TTL};
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
    /// Renew this endpoint's lease (`set`: register the absolute slot count).
    Heartbeat {
        set: bool,
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
    /// Slots this process holds in Redis as far as it knows: live permits of every kind plus
    /// slots requested by an acquire call in flight (counted optimistically).
    held: AtomicUsize,
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
        self.fallback
            .set_capacity(self.inner.config.local_limit(capacity));
    }

    fn fallback_capacity(&self) -> usize {
        self.capacity.load(Ordering::Acquire)
    }

    async fn acquire_script(&self, want: usize) -> Result<ScriptReply, StorageError> {
        let k = &self.keys;
        let r = self
            .inner
            .run_script(
                scripts::ACQUIRE
                    .key(&k.holders)
                    .key(&k.leases)
                    .key(&k.capacity)
                    .key(&k.waiting)
                    .arg(&self.inner.instance)
                    .arg(self.fallback_capacity())
                    .arg(want)
                    .arg(self.inner.config.lease_ttl.as_millis() as u64)
                    .arg(WAITING_TTL.as_millis() as u64)
                    .arg(&k.channel),
            )
            .await?;
        self.observe(&r);
        Ok(r)
    }

    async fn release_script(&self, n: usize) -> Result<ScriptReply, StorageError> {
        let k = &self.keys;
        let r = self
            .inner
            .run_script(
                scripts::RELEASE
                    .key(&k.holders)
                    .key(&k.leases)
                    .key(&k.capacity)
                    .key(&k.waiting)
                    .arg(&self.inner.instance)
                    .arg(self.fallback_capacity())
                    .arg(n)
                    .arg(&k.channel),
            )
            .await?;
        self.observe(&r);
        Ok(r)
    }

    /// Renews this process's lease (`set`: registers the absolute count of live slots).
    pub(crate) async fn heartbeat(&self, set: bool) -> Result<(), StorageError> {
        let k = &self.keys;
        let held = self.held.load(Ordering::Acquire);
        let r = self
            .inner
            .run_script(
                scripts::HEARTBEAT
                    .key(&k.holders)
                    .key(&k.leases)
                    .key(&k.capacity)
                    .key(&k.waiting)
                    .arg(&self.inner.instance)
                    .arg(self.fallback_capacity())
                    .arg(held)
                    .arg(self.inner.config.lease_ttl.as_millis() as u64)
                    .arg(&k.channel)
                    .arg(if set { "set" } else { "renew" }),
            )
            .await?;
        if !set && r.n == 0 && held > 0 {
            tracing::warn!(
                endpoint = %self.endpoint,
                slots = held,
                "this process's slot lease had expired in redis; registered again"
            );
        }
        self.observe(&r);
        Ok(())
    }

    /// After an outage: store a capacity changed meanwhile, wake the dispatcher.
    pub(crate) fn after_recovery(&self) {
        if self.capacity_dirty.load(Ordering::Acquire) {
            let _ = self.cmd_tx.send(Cmd::SetCapacity);
        }
        self.wake.notify_one();
    }

    fn permit(self: &Arc<Self>, local: Option<LocalPermit>) -> RedisPermit {
        RedisPermit {
            shared: Some(Arc::clone(self)),
            _local: local,
        }
    }

    /// A permit granted without Redis during an outage.
    fn outage_permit(self: &Arc<Self>, local: Option<LocalPermit>) -> RedisPermit {
        self.held.fetch_add(1, Ordering::AcqRel);
        self.permit(local)
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
            fallback: LocalCapacity::new(inner.config.local_limit(capacity)),
            inner,
            capacity: AtomicUsize::new(capacity),
            global_active: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
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
        self.parts.shared.acquire_script(0).await.map(|r| r.count)
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
    _local: Option<LocalPermit>,
}

impl Drop for RedisPermit {
    fn drop(&mut self) {
        if let Some(s) = self.shared.take() {
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
/// for this endpoint, it never has two calls in flight, so the slot count a heartbeat
/// registers is exact. It stops once no source, acquire future or permit is left (it is not
/// aborted with the source: releases still queued must reach Redis).
async fn dispatcher(
    shared: Arc<EndpointShared>,
    mut req_rx: mpsc::UnboundedReceiver<Waiter>,
    mut cmd_rx: mpsc::UnboundedReceiver<Cmd>,
) {
    let mut mode = shared.inner.mode.subscribe();
    let mut queue: VecDeque<Waiter> = VecDeque::new();
    let mut blocked = false;
    let mut next_poll = Instant::now();
    // Learn the stored capacity (and restore it if Redis has none) right away.
    if let Err(e) = shared.heartbeat(false).await {
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
        if !cmds.is_empty() && run_commands(&shared, &mut cmds).await {
            blocked = false;
        }
        if shared.try_stop() {
            return;
        }
        if *mode.borrow_and_update() {
            // Outage: let every waiter go; each re-routes to the outage policy.
            queue.clear();
            blocked = false;
            continue;
        }
        queue.retain(|w| !w.tx.is_closed());
        if queue.is_empty() {
            continue;
        }
        if blocked {
            reject_no_wait(&mut queue);
            continue;
        }
        let want = queue.len();
        shared.held.fetch_add(want, Ordering::AcqRel);
        match shared.acquire_script(want).await {
            Ok(r) => {
                let granted = r.n.min(want);
                sub_sat(&shared.held, want - granted);
                let mut spare = granted;
                let mut recycled: Option<RedisPermit> = None;
                while spare > 0 {
                    let Some(w) = queue.pop_front() else { break };
                    let p = recycled.take().unwrap_or_else(|| shared.permit(None));
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
                    drop(shared.permit(None));
                }
                if granted < want {
                    blocked = true;
                    next_poll = Instant::now() + POLL_INTERVAL;
                    reject_no_wait(&mut queue);
                }
            }
            Err(e) => {
                sub_sat(&shared.held, want);
                shared.inner.enter_outage(&e);
                queue.clear();
                blocked = false;
            }
        }
    }
}

/// Runs the pending releases (one batched script call), capacity change and heartbeats.
/// Returns `true` when slots were released (a retry may now succeed).
async fn run_commands(shared: &Arc<EndpointShared>, cmds: &mut Vec<Cmd>) -> bool {
    let (mut releases, mut set_cap) = (0usize, false);
    let mut beats = Vec::new();
    for c in cmds.drain(..) {
        match c {
            Cmd::Release => releases += 1,
            Cmd::SetCapacity => set_cap = true,
            Cmd::Heartbeat { set, reply } => beats.push((set, reply)),
        }
    }
    let mut released = false;
    if releases > 0 {
        sub_sat(&shared.held, releases);
        if !shared.inner.is_degraded() {
            match shared.release_script(releases).await {
                Ok(_) => released = true,
                Err(e) => shared.inner.enter_outage(&e),
            }
        }
    }
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
                released = true;
            }
            Err(e) => shared.inner.enter_outage(&e),
        }
    }
    for (set, reply) in beats {
        let _ = reply.send(shared.heartbeat(set).await);
    }
    released
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
