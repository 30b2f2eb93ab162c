//! [`RedisCapacity`]: the Redis-shared [`CapacitySource`] of one endpoint.
//!
//! # Algorithm
//!
//! * **Global count.** Redis holds, per endpoint, how many slots each gateway process
//!   (instance) holds, and a lease deadline per instance (see [`scripts`](crate::scripts)).
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
//!   process cannot starve a quiet one (see [`scripts`](crate::scripts)). Whenever slots are
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
//!   fallback (`local`: a [`LocalCapacity`](portcullis_admission::LocalCapacity) of `ceil(capacity / expected_workers)`), refused
//!   (`reject`: 503 `storage_unavailable`) or admitted (`allow`), without touching Redis.
//!   With `local`, the permits Redis granted before the outage still take their place in
//!   that per-process limit (the fallback's limit is the share minus those permits, and
//!   grows as each ends), so the process never runs more than its share. Until the
//!   others' pre-outage requests may have ended too (the longest recent request after the
//!   outage began), the share is also capped by what the others left free. And for a while
//!   after the outage (`lease_ttl`, and at least two recovery tries of any process:
//!   `2 × (1 s + 4 × timeout) + 0.5 s`) the process still keeps to its share: Redis may
//!   have lost every count, and the other processes, still serving their own shares, may
//!   not have re-registered yet. Every permit granted meanwhile is still counted by the process; when Redis
//!   answers again the heartbeat re-registers the absolute count of live permits, and the
//!   source returns to the shared limit.
//!
//! Inspired by distributed semaphores with leases (Redisson's `RPermitExpirableSemaphore`,
//! the Redis `SET NX PX` lock pattern). The FIFO is exact within a process; across
//! processes it is by turns (a process's turn begins when it starts waiting, or when it was
//! last served in part).
//!
//! # Where each part lives
//!
//! This file holds the source and its permit. The endpoint's state and script calls are in
//! `endpoint.rs`, its slot accounting (pure, no I/O) in `slots.rs`, its task in
//! `dispatcher.rs`, and the process-wide outage state machine in `outage.rs`.

use crate::config::OnError;
use crate::dispatcher::Dispatcher;
use crate::endpoint::{EndpointShared, Slot, Waiter};
use crate::error::StorageError;
use crate::process::{Process, TaskSet};
use crate::scripts::Keys;
use portcullis_admission::{AcquireError, CapacitySource, LocalPermit};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use tokio::sync::{oneshot, watch};

/// The Redis-shared capacity source of one endpoint: one global limit shared by every
/// gateway process, a local FIFO queue of waiters per process. See the
/// [module documentation](self) for the algorithm.
///
/// Built by [`RedisStorage::capacity_source`](crate::RedisStorage::capacity_source). Cheap
/// to clone; clones share the slots. Its task stops once the last clone and the last acquire
/// future are dropped and every permit is released (a permit may outlive the source: its
/// slot still goes back to Redis).
#[derive(Clone)]
pub struct RedisCapacity {
    parts: Arc<SourceParts>,
}

/// What a source owns: its shared state and the storage's tasks (kept running while a
/// source is alive). Counted in the endpoint's sources: its task stops once none is left
/// and every permit is released.
pub(crate) struct SourceParts {
    shared: Arc<EndpointShared>,
    _tasks: Arc<TaskSet>,
}

impl Drop for SourceParts {
    fn drop(&mut self) {
        self.shared.remove_source();
    }
}

impl RedisCapacity {
    /// A new source of `endpoint` and its task.
    pub(crate) fn build(
        process: Arc<Process>,
        tasks: Arc<TaskSet>,
        endpoint: &str,
        keys: Keys,
        capacity: usize,
    ) -> Self {
        let (shared, mailbox) = EndpointShared::new(process, endpoint, keys, capacity);
        // Owned by the source's clones, acquire futures and permits: it stops by itself once
        // all are gone (see `EndpointShared::try_stop`).
        drop(tokio::spawn(
            Dispatcher::new(Arc::clone(&shared), mailbox).run(),
        ));
        Self {
            parts: Arc::new(SourceParts {
                shared,
                _tasks: tasks,
            }),
        }
    }

    /// A new source over the state of one whose clones are all gone but whose task still
    /// runs (permits are still out); `None` once the task has stopped.
    pub(crate) fn reopen(tasks: Arc<TaskSet>, shared: Arc<EndpointShared>) -> Option<Self> {
        shared.add_source().then(|| Self {
            parts: Arc::new(SourceParts {
                shared,
                _tasks: tasks,
            }),
        })
    }

    pub(crate) fn shared(&self) -> &Arc<EndpointShared> {
        &self.parts.shared
    }

    pub(crate) fn parts_weak(&self) -> Weak<SourceParts> {
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
        self.parts.shared.slots.held()
    }

    /// `true` while the storage is in an outage and `storage.on_error` applies.
    pub fn is_degraded(&self) -> bool {
        self.parts.shared.process.is_degraded()
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
        let mut mode: watch::Receiver<bool> = parts.shared.process.outage.subscribe();
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
                        OnError::Allow => return Ok(RedisPermit::new(shared.outage_slot(), None)),
                        OnError::Local => {
                            let fallback = shared.fallback.acquire(max_queue);
                            tokio::select! {
                                r = fallback => return r.map(|p| RedisPermit::new(shared.outage_slot(), Some(p))),
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
                    Ok(r) => return r.map(|slot| RedisPermit::new(slot, None)),
                    // The task let the waiter go: the storage entered an outage.
                    Err(_) => continue,
                }
            }
        })
    }

    fn set_capacity(&self, capacity: usize) {
        self.parts.shared.set_capacity(capacity);
    }

    fn capacity(&self) -> usize {
        self.parts.shared.capacity()
    }

    /// The global count of slots held by every process, as of this process's last round
    /// trip (refreshed at least every heartbeat). During an outage, this process's own
    /// count.
    fn active(&self) -> usize {
        let shared = &self.parts.shared;
        if shared.process.is_degraded() {
            shared.slots.held()
        } else {
            shared.slots.global()
        }
    }

    /// The slots this process holds (its share of `active`).
    fn local_active(&self) -> usize {
        self.held_locally()
    }

    fn queue_depth(&self) -> usize {
        self.parts.shared.queued.load(Ordering::Acquire) + self.parts.shared.fallback.queue_depth()
    }
}

/// A slot of a [`RedisCapacity`]; dropping it releases the slot (in the background: the
/// drop never blocks).
pub struct RedisPermit {
    // Dropped first: the slot is given back before the fallback's permit (if any).
    _slot: Slot,
    _local: Option<LocalPermit>,
}

impl RedisPermit {
    fn new(slot: Slot, local: Option<LocalPermit>) -> Self {
        Self {
            _slot: slot,
            _local: local,
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
