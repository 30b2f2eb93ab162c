//! [`EndpointShared`]: one endpoint's state, shared by its source, its permits and its
//! task; the endpoint's script calls; and [`Slot`], the RAII slot a permit holds.

use crate::capacity_cell::CapacityCell;
use crate::config::OnError;
use crate::error::StorageError;
use crate::process::Process;
use crate::scripts::{self, Keys, ScriptReply};
use crate::slots::Slots;
use portcullis_admission::{AcquireError, CapacitySource, LocalCapacity};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;

/// Lifetime of a process's entry in an endpoint's cross-process queue, renewed by each of
/// its retries (at least every [`POLL_INTERVAL`](crate::POLL_INTERVAL) while it has
/// waiters). A process that dies while queued holds back one free slot for at most this long.
pub(crate) const QUEUE_TTL: Duration = Duration::from_millis(500);

/// [`EndpointShared::sources`] after the task stopped: the endpoint cannot be reopened.
const STOPPED: usize = usize::MAX;

/// A waiter sent to the endpoint's task.
pub(crate) struct Waiter {
    pub(crate) tx: oneshot::Sender<Result<Slot, AcquireError>>,
    /// `max_queue` was reached: answer `QueueFull` instead of queueing.
    pub(crate) no_wait: bool,
}

/// A message to the endpoint's task.
pub(crate) enum Cmd {
    /// A permit ended.
    Release,
    /// A capacity was set locally: store it.
    SetCapacity,
    /// A permit was granted outside Redis while Redis is available (the end of an outage):
    /// register it.
    Sync,
    /// Renew this endpoint's lease, registering the absolute slot count.
    Heartbeat {
        reply: oneshot::Sender<Result<(), StorageError>>,
    },
}

/// One endpoint's state, shared by its source, permits and task.
pub(crate) struct EndpointShared {
    pub(crate) keys: Keys,
    pub(crate) endpoint: String,
    pub(crate) process: Arc<Process>,
    capacity: CapacityCell,
    pub(crate) slots: Slots,
    /// Acquire futures waiting for the task.
    pub(crate) queued: AtomicUsize,
    pub(crate) wake: Notify,
    /// Live sources of this endpoint, or [`STOPPED`] once its task has stopped.
    sources: AtomicUsize,
    pub(crate) req_tx: mpsc::UnboundedSender<Waiter>,
    pub(crate) cmd_tx: mpsc::UnboundedSender<Cmd>,
    /// The outage fallback (`on_error: local`).
    pub(crate) fallback: LocalCapacity,
}

/// The receiving ends of an endpoint's channels, for its task.
pub(crate) struct Mailbox {
    pub(crate) waiters: mpsc::UnboundedReceiver<Waiter>,
    pub(crate) cmds: mpsc::UnboundedReceiver<Cmd>,
}

impl EndpointShared {
    /// A new endpoint with one source, and the mailbox of its task.
    pub(crate) fn new(
        process: Arc<Process>,
        endpoint: &str,
        keys: Keys,
        capacity: usize,
    ) -> (Arc<Self>, Mailbox) {
        let (req_tx, waiters) = mpsc::unbounded_channel();
        let (cmd_tx, cmds) = mpsc::unbounded_channel();
        let shared = Arc::new(Self {
            keys,
            endpoint: endpoint.to_owned(),
            // Closed until an outage (see `fit_fallback`; `capacity_source` fits it once the
            // endpoint is registered, in case the storage is in an outage already).
            fallback: LocalCapacity::new(0),
            process,
            capacity: CapacityCell::new(capacity),
            slots: Slots::new(),
            queued: AtomicUsize::new(0),
            wake: Notify::new(),
            sources: AtomicUsize::new(1),
            req_tx,
            cmd_tx,
        });
        (shared, Mailbox { waiters, cmds })
    }

    pub(crate) fn on_error(&self) -> OnError {
        self.process.config.on_error
    }

    /// The capacity as last learnt from Redis or set locally.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity.get()
    }

    /// This process's share of the capacity during an outage.
    pub(crate) fn outage_share(&self) -> usize {
        self.process.config.local_limit(self.capacity())
    }

    fn observe(&self, r: &ScriptReply) {
        self.slots.observe_global(r.count);
        if self.capacity.learned(r.capacity) {
            self.fit_fallback();
        }
    }

    /// Applies a capacity learnt from Redis (or set locally): cache and fallback limit.
    pub(crate) fn apply_capacity(&self, capacity: usize) {
        self.capacity.apply(capacity);
        self.fit_fallback();
    }

    /// A capacity set locally: stored in Redis by the task, Redis's value ignored until then.
    pub(crate) fn set_capacity(&self, capacity: usize) {
        self.capacity.set_local(capacity);
        self.fit_fallback();
        let _ = self.cmd_tx.send(Cmd::SetCapacity);
        self.wake.notify_one();
    }

    /// Stores the capacity set locally (unless in an outage: then after it). `Ok(true)`
    /// when it was stored.
    pub(crate) async fn store_capacity(&self) -> Result<bool, StorageError> {
        if self.process.is_degraded() {
            return Ok(false);
        }
        let c = self.capacity.to_store();
        self.process
            .redis
            .invoke::<i64>(
                scripts::SET_CAPACITY_SCRIPT
                    .key(&self.keys.capacity)
                    .arg(c)
                    .arg(&self.keys.channel),
            )
            .await?;
        self.capacity.stored(c);
        Ok(true)
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
            .arg(&self.process.instance)
            .arg(self.capacity());
        inv
    }

    /// The acquire script: this process now holds `mine` slots (`None`: only read the
    /// count) and asks for `want` more. Registers the result.
    pub(crate) async fn acquire_script(
        &self,
        mine: Option<usize>,
        want: usize,
    ) -> Result<ScriptReply, StorageError> {
        let mut inv = self.endpoint_script(&scripts::ACQUIRE);
        inv.arg(want)
            .arg(self.process.config.lease_ttl.as_millis() as u64)
            .arg(QUEUE_TTL.as_millis() as u64)
            .arg(&self.keys.channel);
        match mine {
            Some(m) => inv.arg(m),
            None => inv.arg("-"),
        };
        let r = self.process.redis.run_script(&inv).await;
        match (mine, &r) {
            (Some(m), Ok(r)) => self.slots.acquire_answered(m, want, r.n, r.count),
            (Some(_), Err(_)) => {
                self.slots.forget_registered();
            }
            (None, Ok(r)) => self.slots.read_answered(r.count),
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
        let held = self.slots.held_seqcst();
        let before = self.slots.forget_registered();
        let mut inv = self.endpoint_script(&scripts::SYNC);
        inv.arg(held)
            .arg(self.process.config.lease_ttl.as_millis() as u64)
            .arg(&self.keys.channel)
            .arg(if queued { "1" } else { "0" });
        let r = self.process.redis.run_script(&inv).await?;
        self.slots.confirmed(held, r.count);
        if r.n == 0 && before > 0 && before != crate::slots::UNKNOWN {
            tracing::warn!(
                endpoint = %self.endpoint,
                slots = held,
                "this process's slot lease had expired in redis; registered again"
            );
        }
        self.observe(&r);
        Ok(())
    }

    /// After an outage: store a capacity changed meanwhile, wake the task.
    pub(crate) fn after_recovery(&self) {
        if self.capacity.is_pending() {
            let _ = self.cmd_tx.send(Cmd::SetCapacity);
        }
        self.wake.notify_one();
    }

    /// A slot granted by Redis at `granted` (already counted in `held` and `from_redis`).
    pub(crate) fn redis_slot(self: &Arc<Self>, granted: Instant) -> Slot {
        Slot {
            shared: Arc::clone(self),
            from_redis: Some(granted),
        }
    }

    /// A slot granted without Redis during an outage.
    pub(crate) fn outage_slot(self: &Arc<Self>) -> Slot {
        // SeqCst with the check below and the outage end: either the recovery (which wakes
        // the task after it) sees this slot in `held`, or this sees the outage over and
        // asks the task to register it.
        self.slots.add_outage_permit();
        if !self.process.is_degraded() {
            let _ = self.cmd_tx.send(Cmd::Sync);
        }
        Slot {
            shared: Arc::clone(self),
            from_redis: None,
        }
    }

    /// Sets the limit of the outage fallback. During an `on_error: local` outage it is the
    /// process's share, `ceil(capacity / expected_workers)`, fitted to the permits Redis
    /// granted before the outage and to what the others held
    /// ([`fallback_limit`](crate::slots::fallback_limit)). Outside an outage the limit is 0:
    /// a waiter still on its way out of the fallback when the outage ends must not get a
    /// slot there next to the slots the task now takes from Redis. Called as an outage
    /// starts and ends, when the capacity changes, and as each of those permits ends during
    /// an outage.
    pub(crate) fn fit_fallback(&self) {
        // SeqCst with the outage start and `redis_released`: either the outage start sees a
        // release, or the release sees the outage and fits again.
        let since = self.process.outage.degraded_since_seqcst();
        let limit = match since {
            Some(since) if self.on_error() == OnError::Local => {
                self.slots
                    .fallback_limit(self.outage_share(), self.capacity(), since)
            }
            _ => 0,
        };
        self.fallback.set_capacity(limit);
    }

    /// `n` permits granted by Redis are gone: during an outage, the fallback may grow.
    pub(crate) fn redis_released(&self, n: usize) {
        self.slots.redis_released(n);
        if self.on_error() == OnError::Local && self.process.degraded_seqcst() {
            self.fit_fallback();
        }
    }

    /// Always through the task, even during an outage (it then skips the Redis call): the
    /// task stops only once `held` is 0, so it must see every release.
    fn release_one(&self) {
        if self.cmd_tx.send(Cmd::Release).is_err() {
            // The task is gone (it stops only once `held` is 0): nothing to give back.
            self.slots.release(1);
        }
    }

    /// One more source; `false` once the task has stopped (the endpoint cannot reopen).
    pub(crate) fn add_source(&self) -> bool {
        self.sources
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n != STOPPED).then_some(n + 1)
            })
            .is_ok()
    }

    /// A source is gone; the task re-checks whether it can stop.
    pub(crate) fn remove_source(&self) {
        if self.sources.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.wake.notify_one();
        }
    }

    /// The task's exit test: no source, acquire future or permit left. Once it returns
    /// `true`, [`add_source`](Self::add_source) fails, so no new user can appear.
    pub(crate) fn try_stop(&self) -> bool {
        self.slots.held() == 0
            && self
                .sources
                .compare_exchange(0, STOPPED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }
}

/// One slot this process holds for an endpoint (counted in `held`, and in `from_redis`
/// when Redis granted it). Dropping it releases the slot through the endpoint's task.
pub(crate) struct Slot {
    shared: Arc<EndpointShared>,
    /// When Redis granted it (`None`: granted by the outage policy).
    from_redis: Option<Instant>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(granted) = self.from_redis {
            self.shared.slots.hold_ended(granted.elapsed());
            self.shared.redis_released(1);
        }
        self.shared.release_one();
    }
}
