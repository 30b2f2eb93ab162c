//! [`Dispatcher`]: the task of one endpoint (see the [`capacity`](crate::capacity) docs):
//! the FIFO of waiters, batched releases, capacity changes and this endpoint's heartbeat.
//!
//! Being the only task that talks to Redis for this endpoint, it never has two calls in
//! flight and is the only writer of this process's slot count, which it always writes as
//! an absolute count (`held`). Its main loop waits for one event (the outage mode changed,
//! a command, a waiter, a wake-up, the poll), records it, then serves: it runs the pending
//! commands, answers every waiter with the outage policy during an outage, registers what
//! changed, and asks Redis for as many slots as it has waiters. It stops once no source,
//! acquire future or permit is left (it is not aborted with the source: releases still
//! queued must reach Redis).

use crate::config::OnError;
use crate::endpoint::{Cmd, EndpointShared, Mailbox, Slot, Waiter};
use crate::error::StorageError;
use crate::slots::recovery_want;
use portcullis_admission::AcquireError;
use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How often a process with queued waiters re-tries Redis when no release notification
/// arrives (the safety net under pub/sub): at most 20 attempts per second per endpoint.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The task of one endpoint (see the [module docs](self)).
pub(crate) struct Dispatcher {
    shared: Arc<EndpointShared>,
    mailbox: Mailbox,
    /// The outage mode (`true` while in an outage).
    mode: watch::Receiver<bool>,
    /// The local FIFO of waiters.
    queue: VecDeque<Waiter>,
    /// Commands received and not run yet.
    cmds: Vec<Cmd>,
    /// Redis granted fewer slots than asked: new waiters queue without a round trip until
    /// a wake-up, or [`next_poll`](Self::next_poll).
    blocked: bool,
    /// This process has an entry in the endpoint's cross-process queue in Redis.
    enqueued: bool,
    /// When a blocked dispatcher with waiters retries without a wake-up.
    next_poll: Instant,
}

impl Dispatcher {
    /// The task of `shared`, reading `mailbox`.
    pub(crate) fn new(shared: Arc<EndpointShared>, mailbox: Mailbox) -> Self {
        let mode = shared.process.outage.subscribe();
        Self {
            shared,
            mailbox,
            mode,
            queue: VecDeque::new(),
            cmds: Vec::new(),
            blocked: false,
            enqueued: false,
            next_poll: Instant::now(),
        }
    }

    /// Runs until no source, acquire future or permit is left.
    pub(crate) async fn run(mut self) {
        // Learn the stored capacity (and restore it if Redis has none) right away.
        if let Err(e) = self.shared.sync(false).await {
            self.shared.process.enter_outage(&e);
        }
        loop {
            let polling = self.blocked && !self.queue.is_empty();
            tokio::select! {
                biased;
                changed = self.mode.changed() => if changed.is_err() { return },
                c = self.mailbox.cmds.recv() => match c {
                    Some(c) => self.on_command(c),
                    None => return,
                },
                w = self.mailbox.waiters.recv() => match w {
                    Some(w) => self.on_waiter(w),
                    None => return,
                },
                _ = self.shared.wake.notified() => self.on_wake(),
                _ = tokio::time::sleep_until(self.next_poll), if polling => self.on_wake(),
            }
            if self.serve().await.is_break() {
                return;
            }
        }
    }

    fn on_command(&mut self, c: Cmd) {
        self.cmds.push(c);
    }

    fn on_waiter(&mut self, w: Waiter) {
        self.queue.push_back(w);
    }

    /// A release notification, a local release or the poll: a retry may now succeed.
    fn on_wake(&mut self) {
        self.blocked = false;
    }

    /// Serves what the events brought; `Break` once the task can stop.
    async fn serve(&mut self) -> ControlFlow<()> {
        while let Ok(w) = self.mailbox.waiters.try_recv() {
            self.queue.push_back(w);
        }
        while let Ok(c) = self.mailbox.cmds.try_recv() {
            self.cmds.push(c);
        }
        self.queue.retain(|w| !w.tx.is_closed());
        if !self.cmds.is_empty() {
            self.run_commands().await;
        }
        if *self.mode.borrow_and_update() || self.shared.process.degraded_seqcst() {
            // Outage: every waiter gets the outage policy's answer. Redis lost or will
            // expire this process's queue entry.
            self.let_go();
            return self.stop_if_idle();
        }
        self.queue.retain(|w| !w.tx.is_closed());
        if self.blocked {
            self.reject_no_wait();
        }
        let acquiring = !self.queue.is_empty() && !self.blocked;
        if !acquiring {
            self.register().await;
        }
        self.stop_if_idle()?;
        if acquiring {
            self.acquire().await;
        }
        ControlFlow::Continue(())
    }

    fn stop_if_idle(&self) -> ControlFlow<()> {
        if self.shared.try_stop() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }

    /// Runs the pending releases (bookkeeping only: the next call registers the absolute
    /// count), capacity change and heartbeats. A release or a stored capacity unblocks (a
    /// retry may now succeed); a failed call starts an outage.
    async fn run_commands(&mut self) {
        // This process still has waiters in the cross-process queue.
        let queued = self.enqueued && !self.queue.is_empty();
        let (mut releases, mut set_capacity) = (0usize, false);
        let mut beats = Vec::new();
        for c in self.cmds.drain(..) {
            match c {
                Cmd::Release => releases += 1,
                Cmd::SetCapacity => set_capacity = true,
                Cmd::Sync => {}
                Cmd::Heartbeat { reply } => beats.push(reply),
            }
        }
        let shared = &self.shared;
        let mut unblock = releases > 0;
        let mut failed = false;
        shared.slots.release(releases);
        if set_capacity {
            match shared.store_capacity().await {
                Ok(stored) => unblock |= stored,
                Err(e) => {
                    failed = true;
                    shared.process.enter_outage(&e);
                }
            }
        }
        let mut left = false;
        if !beats.is_empty() {
            // Also during an outage: the recovery's re-register is this call.
            let r = shared.sync(queued).await;
            left = !queued;
            failed |= r.is_err();
            let copy = |r: &Result<(), StorageError>| match r {
                Ok(()) => Ok(()),
                Err(e) => Err(StorageError::Redis(e.to_string())),
            };
            for reply in beats {
                let _ = reply.send(copy(&r));
            }
        }
        if failed {
            self.enqueued = false;
        } else {
            self.blocked &= !unblock;
            self.enqueued &= !left;
        }
    }

    /// Registers the releases (and permits counted during an outage) not registered yet, or
    /// takes this process out of the cross-process queue when no waiter is left behind its
    /// entry. (With waiters to serve, the acquire registers the releases in the same call.)
    async fn register(&mut self) {
        let leave = self.enqueued && self.queue.is_empty();
        if !(self.shared.slots.out_of_sync() || leave) {
            return;
        }
        match self.shared.sync(!leave && self.enqueued).await {
            Ok(()) => self.enqueued &= !leave,
            Err(e) => {
                self.enqueued = false;
                self.shared.process.enter_outage(&e);
            }
        }
    }

    /// Asks Redis for a slot for each waiter (fewer just after an outage) and hands out
    /// the grant.
    async fn acquire(&mut self) {
        let Some(want) = self.wanted() else {
            return;
        };
        let shared = Arc::clone(&self.shared);
        let mine = shared.slots.reserve(want);
        match shared.acquire_script(Some(mine), want).await {
            Ok(r) => self.on_granted(want, r.n.min(want)),
            Err(e) => {
                shared.slots.unreserve(want);
                self.enqueued = false;
                shared.process.enter_outage(&e);
                self.let_go();
            }
        }
    }

    /// How many slots to ask for: one per waiter, but just after an outage no more than
    /// this process's share (see `Process::recovery_grace`); `None` (and blocked until the
    /// next poll) when the share is used up.
    fn wanted(&mut self) -> Option<usize> {
        let want = self.queue.len();
        let Some(left) = self.shared.process.recovery_grace() else {
            return Some(want);
        };
        let want = recovery_want(
            want,
            self.shared.outage_share(),
            self.shared.slots.held_seqcst(),
        );
        if want == 0 {
            self.blocked = true;
            self.next_poll = Instant::now() + POLL_INTERVAL.min(left);
            return None;
        }
        Some(want)
    }

    /// Redis granted `granted` of the `want` slots asked for.
    fn on_granted(&mut self, want: usize, granted: usize) {
        let shared = Arc::clone(&self.shared);
        self.enqueued = granted < want;
        // SeqCst with the outage start: either the outage's fallback limit counts these
        // permits, or they are not handed out.
        shared.slots.granted(want, granted);
        if shared.process.degraded_seqcst() {
            // The outage began meanwhile: its policy serves the waiters; the slots are given
            // back by the re-register when Redis answers again.
            shared.redis_released(granted);
            shared.slots.release(granted);
            self.let_go();
            return;
        }
        self.hand_out(granted);
        if granted < want || self.queue.iter().any(|w| !w.tx.is_closed()) {
            self.blocked = true;
            self.next_poll = Instant::now() + POLL_INTERVAL;
            self.reject_no_wait();
        }
    }

    /// Gives `granted` slots to the oldest waiters; a slot whose waiter left meanwhile goes
    /// to the next one, and what no waiter takes is released.
    fn hand_out(&mut self, granted: usize) {
        let mut spare = granted;
        let mut recycled: Option<Slot> = None;
        let now = Instant::now();
        while spare > 0 {
            let Some(w) = self.queue.pop_front() else {
                break;
            };
            let slot = recycled
                .take()
                .unwrap_or_else(|| self.shared.redis_slot(now));
            match w.tx.send(Ok(slot)) {
                Ok(()) => spare -= 1,
                // The waiter left meanwhile: the slot goes to the next one.
                Err(Ok(slot)) => recycled = Some(slot),
                Err(Err(_)) => unreachable!("only slots are sent here"),
            }
        }
        if let Some(slot) = recycled.take() {
            spare -= 1;
            drop(slot);
        }
        for _ in 0..spare {
            drop(self.shared.redis_slot(now));
        }
    }

    /// The storage is in an outage: every queued waiter gets the outage policy's answer
    /// from the task itself (`reject`: storage unavailable, `allow`: admitted), or is let
    /// go to re-route to the fallback (`local`). Never only dropped in `reject`/`allow`
    /// mode: a waiter that re-checks the mode before it changed would queue again for a
    /// Redis whose replies are all discarded, and wait for its whole queue timeout.
    fn let_go(&mut self) {
        match self.shared.on_error() {
            OnError::Reject => {
                for w in self.queue.drain(..) {
                    let _ = w.tx.send(Err(AcquireError::storage_unavailable(
                        StorageError::Unavailable,
                    )));
                }
            }
            OnError::Allow => {
                for w in self.queue.drain(..) {
                    if !w.tx.is_closed() {
                        // A waiter gone meanwhile drops the slot (released again).
                        let _ = w.tx.send(Ok(self.shared.outage_slot()));
                    }
                }
            }
            OnError::Local => self.queue.clear(),
        }
        self.blocked = false;
        self.enqueued = false;
    }

    /// Answers `QueueFull` to the waiters that came over `max_queue`.
    fn reject_no_wait(&mut self) {
        if self.queue.iter().any(|w| w.no_wait) {
            let mut keep = VecDeque::with_capacity(self.queue.len());
            for w in self.queue.drain(..) {
                if w.no_wait {
                    let _ = w.tx.send(Err(AcquireError::QueueFull));
                } else {
                    keep.push_back(w);
                }
            }
            self.queue = keep;
        }
    }
}
