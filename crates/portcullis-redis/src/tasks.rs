//! The three background tasks of a storage: the lease heartbeat with the outage recovery,
//! the readiness PING loop, and the pub/sub listener.

use crate::process::{Process, TaskSet};
use crate::readiness::ReadyState;
use crate::registry::Registry;
use futures_util::StreamExt;
use portcullis_core::backoff::Backoff;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

/// Where a recovery may be held between its re-register and the end of the outage. A
/// no-op outside the crate's own tests, which stop the recovery there to act inside that
/// window.
#[derive(Clone, Default)]
pub(crate) struct RecoveryHook {
    #[cfg(test)]
    pause: Arc<std::sync::Mutex<Option<RecoveryPause>>>,
}

/// Tests: signals the first sender once the recovery re-registered, then waits for the
/// second before the outage ends.
#[cfg(test)]
type RecoveryPause = (
    tokio::sync::oneshot::Sender<()>,
    tokio::sync::oneshot::Receiver<()>,
);

impl RecoveryHook {
    /// Tests: holds the next recovery after its re-register. Returns the signal that it got
    /// there, and the sender that lets it go on.
    #[cfg(test)]
    pub(crate) fn pause_next(
        &self,
    ) -> (
        tokio::sync::oneshot::Receiver<()>,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let (reached_tx, reached) = tokio::sync::oneshot::channel();
        let (resume, resume_rx) = tokio::sync::oneshot::channel();
        *self.pause.lock().unwrap() = Some((reached_tx, resume_rx));
        (reached, resume)
    }

    async fn before_leaving_outage(&self) {
        #[cfg(test)]
        {
            let pause = self.pause.lock().unwrap().take();
            if let Some((reached, resume)) = pause {
                let _ = reached.send(());
                let _ = resume.await;
            }
        }
    }
}

/// Starts the tasks; they stop when the returned set is dropped.
pub(crate) fn spawn(
    process: &Arc<Process>,
    registry: &Arc<Registry>,
    ready: &Arc<ReadyState>,
    subscriptions: mpsc::UnboundedReceiver<String>,
    hook: RecoveryHook,
) -> TaskSet {
    vec![
        AbortOnDropHandle::new(tokio::spawn(heartbeat_loop(
            Arc::clone(process),
            Arc::clone(registry),
            hook,
        ))),
        AbortOnDropHandle::new(tokio::spawn(ping_loop(
            Arc::clone(process),
            Arc::clone(ready),
        ))),
        AbortOnDropHandle::new(tokio::spawn(pubsub_loop(
            Arc::clone(process),
            Arc::clone(registry),
            subscriptions,
        ))),
    ]
}

/// Heartbeat and outage recovery: every `lease_ttl / 3` one heartbeat per endpoint; in an
/// outage, a retry after each back-off wait (or a successful PING) until Redis answers, then
/// the end of the outage.
async fn heartbeat_loop(process: Arc<Process>, registry: Arc<Registry>, hook: RecoveryHook) {
    let interval = process.config.lease_ttl / 3;
    let beat_timeout = process.heartbeat_timeout();
    let mut backoff = process.recovery_backoff().delays();
    loop {
        if process.is_degraded() {
            // A successful readiness PING cuts the wait short.
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = process.recover_kick.notified() => {}
            }
            match registry.heartbeat_all(beat_timeout).await {
                Ok(()) => {
                    backoff.reset();
                    hook.before_leaving_outage().await;
                    process.leave_outage();
                    for ep in registry.live() {
                        ep.after_recovery();
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "redis storage still unavailable");
                    process.refit_fallbacks();
                }
            }
        } else {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = process.recover_kick.notified() => continue,
            }
            if let Err(e) = registry.heartbeat_all(beat_timeout).await {
                process.enter_outage(&e);
            }
        }
    }
}

/// Readiness: PING every `ping_interval`, cached.
async fn ping_loop(process: Arc<Process>, ready: Arc<ReadyState>) {
    loop {
        let sent = std::time::Instant::now();
        let ok = process
            .redis
            .query::<String>(&redis::cmd("PING"))
            .await
            .is_ok_and(|pong| pong == "PONG");
        if ok {
            ready.record_latency(sent.elapsed());
        }
        ready.record(ok);
        if ok && process.is_degraded() {
            process.recover_kick.notify_one();
        }
        tokio::time::sleep(process.config.ping_interval).await;
    }
}

/// The waits between two pub/sub reconnection attempts: from 50 ms, doubling up to 1 s.
fn pubsub_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(50), Duration::from_secs(1), 2.0)
        .expect("50 ms <= 1 s, factor 2")
}

/// Pub/sub listener: release and capacity notifications, reconnecting by itself.
async fn pubsub_loop(
    process: Arc<Process>,
    registry: Arc<Registry>,
    mut sub_rx: mpsc::UnboundedReceiver<String>,
) {
    let redis = &process.redis;
    let mut channels: Vec<String> = Vec::new();
    let mut backoff = pubsub_backoff().delays();
    loop {
        while let Ok(ch) = sub_rx.try_recv() {
            channels.push(ch);
        }
        let connected = redis
            .call(async {
                let (mut sink, stream) = redis.pubsub_client().get_async_pubsub().await?.split();
                if !channels.is_empty() {
                    sink.subscribe(&channels).await?;
                }
                Ok((sink, stream))
            })
            .await;
        let (mut sink, mut stream) = match connected {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "redis pub/sub unavailable; polling until it is back");
                let sleep = tokio::time::sleep(backoff.next_delay());
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        _ = &mut sleep => break,
                        ch = sub_rx.recv() => match ch {
                            Some(ch) => channels.push(ch),
                            None => return,
                        },
                    }
                }
                continue;
            }
        };
        backoff.reset();
        // Notifications may have been missed while disconnected.
        for ep in registry.live() {
            ep.wake.notify_one();
        }
        loop {
            tokio::select! {
                ch = sub_rx.recv() => match ch {
                    Some(ch) => {
                        let r = redis.call(sink.subscribe(&ch)).await;
                        channels.push(ch);
                        if r.is_err() {
                            break;
                        }
                    }
                    None => return,
                },
                msg = stream.next() => match msg {
                    Some(msg) => on_message(&process, &registry, &msg),
                    None => break,
                },
            }
        }
    }
}

fn on_message(process: &Process, registry: &Registry, msg: &redis::Msg) {
    let Some(ep) = registry.by_channel(msg.get_channel_name()) else {
        return;
    };
    let payload = msg.get_payload_bytes();
    if let Some(ids) = payload.strip_prefix(b"w:") {
        // `w:<id>,<id>…`: slots are free for these queued processes; only they retry.
        if ids
            .split(|&b| b == b',')
            .any(|id| id == process.instance.as_bytes())
        {
            ep.wake.notify_one();
        }
        return;
    }
    if let Some(cap) = payload.strip_prefix(b"c:") {
        if let Some(c) = std::str::from_utf8(cap).ok().and_then(|s| s.parse().ok()) {
            ep.apply_capacity(c);
        }
    }
    ep.wake.notify_one();
}
