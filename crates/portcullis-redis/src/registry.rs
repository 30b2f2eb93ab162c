//! [`Registry`]: the live endpoint sources of a storage, by pub/sub channel, held weakly
//! (the gateway owns the sources).

use crate::capacity::{RedisCapacity, SourceParts};
use crate::endpoint::{Cmd, EndpointShared};
use crate::error::StorageError;
use crate::process::{EndpointSet, TaskSet};
use arc_swap::ArcSwap;
use futures_util::future::join_all;
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::mpsc;

/// A registered endpoint source, held weakly.
#[derive(Clone)]
pub(crate) struct Registered {
    shared: Weak<EndpointShared>,
    source: Weak<SourceParts>,
}

impl Registered {
    fn new(cap: &RedisCapacity) -> Self {
        Self {
            shared: Arc::downgrade(cap.shared()),
            source: cap.parts_weak(),
        }
    }

    /// The endpoint's task still runs (a source, or a permit that outlives it, is alive).
    fn is_live(&self) -> bool {
        self.shared.strong_count() > 0
    }

    /// A clone of the live source.
    pub(crate) fn upgrade(&self) -> Option<RedisCapacity> {
        self.source.upgrade().map(RedisCapacity::from_parts)
    }

    /// A new source over the same state, when every clone is gone but permits are still out.
    pub(crate) fn reopen(&self, tasks: &Arc<TaskSet>) -> Option<RedisCapacity> {
        RedisCapacity::reopen(Arc::clone(tasks), self.shared.upgrade()?)
    }
}

/// The live endpoint sources of a storage, read without a lock (`ArcSwap`), and the
/// channels the pub/sub listener is to subscribe to.
pub(crate) struct Registry {
    endpoints: ArcSwap<HashMap<String, Registered>>,
    /// Unbounded: one message per endpoint of the process, sent once when its source is
    /// built. Lives as long as the registry, so the listener's receiver never closes while a
    /// source (and so the tasks) is alive.
    subscribe: mpsc::UnboundedSender<String>,
}

impl Registry {
    /// An empty registry, and the receiver of the pub/sub listener.
    pub(crate) fn new() -> (Self, mpsc::UnboundedReceiver<String>) {
        let (subscribe, subscriptions) = mpsc::unbounded_channel();
        let registry = Self {
            endpoints: ArcSwap::from_pointee(HashMap::new()),
            subscribe,
        };
        (registry, subscriptions)
    }

    /// Asks the pub/sub listener to subscribe to `channel`.
    pub(crate) fn subscribe(&self, channel: String) {
        // Fails only once the listener is gone with the storage's tasks.
        let _ = self.subscribe.send(channel);
    }

    /// The source registered on `channel`, if any.
    pub(crate) fn get(&self, channel: &str) -> Option<Registered> {
        self.endpoints.load().get(channel).cloned()
    }

    /// Registers `cap` (replacing an entry of the same channel) and drops dead entries.
    pub(crate) fn register(&self, cap: &RedisCapacity) {
        let channel = cap.shared().keys.channel.clone();
        let entry = Registered::new(cap);
        self.endpoints.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.retain(|_, r| r.is_live());
            m.insert(channel.clone(), entry.clone());
            m
        });
    }

    /// The endpoint of `channel`, while its task runs.
    pub(crate) fn by_channel(&self, channel: &str) -> Option<Arc<EndpointShared>> {
        self.endpoints
            .load()
            .get(channel)
            .and_then(|r| r.shared.upgrade())
    }

    /// Every endpoint whose task runs.
    pub(crate) fn live(&self) -> Vec<Arc<EndpointShared>> {
        self.endpoints
            .load()
            .values()
            .filter_map(|r| r.shared.upgrade())
            .collect()
    }

    /// One heartbeat of every live endpoint (it registers the absolute slot count), run by
    /// each endpoint's task; each bounded by `timeout`.
    pub(crate) async fn heartbeat_all(&self, timeout: Duration) -> Result<(), StorageError> {
        let eps = self.live();
        let results = join_all(eps.iter().map(|ep| async move {
            let (reply, rx) = tokio::sync::oneshot::channel();
            if ep.cmd_tx.send(Cmd::Heartbeat { reply }).is_err() {
                return Ok(()); // the source is gone
            }
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Ok(()),
                Err(_) => Err(StorageError::Timeout(timeout)),
            }
        }))
        .await;
        results.into_iter().collect()
    }
}

impl EndpointSet for Registry {
    fn fit_fallbacks(&self) {
        for ep in self.live() {
            ep.fit_fallback();
        }
    }
}
