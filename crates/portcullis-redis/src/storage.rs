//! [`RedisStorage`]: one process's handle on the shared storage: its connection, endpoint
//! sources, readiness and background tasks.

use crate::capacity::RedisCapacity;
use crate::config::{StorageConfig, StorageType};
use crate::connection::RedisClient;
use crate::error::StorageError;
use crate::process::{Process, TaskSet};
use crate::readiness::{Readiness, ReadyState};
use crate::registry::Registry;
use crate::scripts::Keys;
use crate::tasks::{self, RecoveryHook};
use std::fmt;
use std::sync::Arc;

/// One process's handle on the shared Redis storage.
///
/// It owns the connection (a reconnecting `ConnectionManager`, or a Cluster connection),
/// the process instance id that owns its slot leases, and three background tasks that stop
/// when the last clone of the storage *and* of every [`RedisCapacity`] built from it is
/// dropped:
///
/// * the **heartbeat**, every `lease_ttl / 3`: one script call per endpoint renews all of
///   this process's leases of that endpoint and sets their absolute count (not one call per
///   request); during an outage it retries every 100 ms–1 s and, once Redis answers,
///   re-registers the live slots so the global count is true again, then leaves the outage
///   (each endpoint's task registers again whatever changed in between);
/// * the **readiness loop**: PING every `ping_interval`, cached in [`Readiness`];
/// * the **pub/sub listener**: release and capacity-change notifications of every endpoint,
///   reconnecting by itself.
///
/// Cheap to clone.
#[derive(Clone)]
pub struct RedisStorage {
    pub(crate) process: Arc<Process>,
    registry: Arc<Registry>,
    ready: Arc<ReadyState>,
    tasks: Arc<TaskSet>,
}

impl fmt::Debug for RedisStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStorage")
            .field("config", &self.process.config)
            .field("instance", &self.process.instance)
            .field("cluster", &self.is_cluster())
            .field("degraded", &self.is_degraded())
            .field("ready", &self.ready.is_ready())
            .finish()
    }
}

impl RedisStorage {
    /// Connects to the Redis of `config` (`type: redis`) and starts the background tasks.
    ///
    /// A single node is connected lazily: if it is down at start, the storage starts in an
    /// outage (`on_error` applies) and recovers by itself. A Cluster (several URLs, or one
    /// URL of a cluster-enabled node) must answer within `storage.timeout`. Fails only on a
    /// bad configuration or an unreachable Cluster.
    pub async fn connect(config: &StorageConfig) -> Result<Self, StorageError> {
        Self::connect_with(config, RecoveryHook::default()).await
    }

    /// [`connect`](Self::connect), with the recovery held at `hook` (tests).
    pub(crate) async fn connect_with(
        config: &StorageConfig,
        hook: RecoveryHook,
    ) -> Result<Self, StorageError> {
        if config.kind != StorageType::Redis {
            return Err(StorageError::Config(
                "storage.type: must be redis for a RedisStorage".into(),
            ));
        }
        config
            .validate()
            .map_err(|e| StorageError::Config(e.to_string()))?;
        let redis = RedisClient::connect(config).await?;
        let cluster = redis.is_cluster();
        let (registry, subscriptions) = Registry::new();
        let registry = Arc::new(registry);
        let process = Arc::new(Process::new(config.clone(), redis, registry.clone()));
        let ready = Arc::new(ReadyState::new(config.failure_threshold));
        let tasks = tasks::spawn(&process, &registry, &ready, subscriptions, hook);
        tracing::info!(
            url = %config.redacted_url().unwrap_or_default(),
            cluster,
            instance = %process.instance,
            "redis storage configured"
        );
        Ok(Self {
            process,
            registry,
            ready,
            tasks: Arc::new(tasks),
        })
    }

    /// The shared capacity source of `endpoint` (a path such as `/work`). `capacity` is
    /// used until the stored global capacity is read (within one round trip) and as the
    /// stored value if Redis has none. Registers the endpoint with the heartbeat and the
    /// pub/sub listener. A process has one source per endpoint: while one is alive, calling
    /// this again for the same endpoint returns a clone of it (`capacity` is then ignored);
    /// so does calling it after the last clone was dropped while its permits are still out.
    pub fn capacity_source(&self, endpoint: &str, capacity: usize) -> RedisCapacity {
        let keys = Keys::new(&self.process.config.key_prefix, endpoint);
        // One source per endpoint and process: its slots are one entry of this instance.
        if let Some(r) = self.registry.get(&keys.channel) {
            if let Some(existing) = r.upgrade() {
                return existing;
            }
            if let Some(reopened) = r.reopen(&self.tasks) {
                self.registry.register(&reopened);
                return reopened;
            }
        }
        let channel = keys.channel.clone();
        let cap = RedisCapacity::build(
            Arc::clone(&self.process),
            Arc::clone(&self.tasks),
            endpoint,
            keys,
            capacity,
        );
        self.registry.register(&cap);
        // After `register`: an outage starting meanwhile either fits it or is seen here.
        cap.shared().fit_fallback();
        self.registry.subscribe(channel);
        cap
    }

    /// The cached readiness (no I/O): false only after `failure_threshold` consecutive
    /// failed PINGs, true again on the first success.
    pub fn readiness(&self) -> Readiness {
        Readiness::new(Arc::clone(&self.ready), Arc::clone(&self.tasks))
    }

    /// `true` while the storage is in an outage (`on_error` applies).
    pub fn is_degraded(&self) -> bool {
        self.process.is_degraded()
    }

    /// This process's instance id (the owner of its slot leases).
    pub fn instance_id(&self) -> &str {
        &self.process.instance
    }

    /// The configuration (its `Debug` redacts the password).
    pub fn config(&self) -> &StorageConfig {
        &self.process.config
    }

    /// `true` when connected to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.process.redis.is_cluster()
    }
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use super::*;
    use crate::config::OnError;
    use crate::testing::RedisServer;
    use portcullis_admission::CapacitySource;
    use portcullis_testkit::eventually;
    use std::time::Duration;

    fn holders(server: &RedisServer, endpoint: &str) -> usize {
        let out = server.cli(&["HVALS", &format!("{{portcullis:{endpoint}}}:holders")]);
        out.lines()
            .filter_map(|l| l.trim().parse::<usize>().ok())
            .sum()
    }

    /// Runs `during` inside the window between the recovery's re-register and the end of an
    /// (induced) outage, then checks that Redis ends with this process's exact count.
    async fn in_recovery_window(
        server: &RedisServer,
        storage: &RedisStorage,
        hook: &RecoveryHook,
        src: &RedisCapacity,
        during: impl std::future::Future<Output = ()>,
    ) {
        let (reached, resume) = hook.pause_next();
        storage.process.enter_outage(&StorageError::Unavailable);
        tokio::time::timeout(Duration::from_secs(5), reached)
            .await
            .expect("recovery re-registered")
            .unwrap();
        assert!(src.is_degraded());
        during.await;
        resume.send(()).unwrap();
        assert!(eventually(Duration::from_secs(2), || !src.is_degraded()).await);
        let endpoint = src.endpoint().to_owned();
        assert!(
            eventually(Duration::from_secs(2), || holders(server, &endpoint)
                == src.held_locally())
            .await,
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
        let hook = RecoveryHook::default();
        let storage = RedisStorage::connect_with(&config, hook.clone())
            .await
            .unwrap();
        let src = storage.capacity_source("/window", 4);
        let p1 = src.acquire(None).await.unwrap();
        let p2 = src.acquire(None).await.unwrap();
        assert_eq!(holders(&server, "/window"), 2);

        // (a) A release in the window.
        let settled = Arc::clone(src.shared());
        in_recovery_window(&server, &storage, &hook, &src, async move {
            drop(p1);
            assert!(eventually(Duration::from_secs(2), || settled.slots.held() == 1).await);
        })
        .await;
        assert_eq!(holders(&server, "/window"), 1);

        // (b) A fallback grant in the window.
        let (tx, rx) = tokio::sync::oneshot::channel();
        in_recovery_window(&server, &storage, &hook, &src, async {
            let p3 = src.acquire(None).await.unwrap();
            assert_eq!(src.held_locally(), 2);
            tx.send(p3).unwrap();
        })
        .await;
        let p3 = rx.await.unwrap();
        assert_eq!(holders(&server, "/window"), 2);

        drop((p2, p3));
        assert!(eventually(Duration::from_secs(2), || holders(&server, "/window") == 0).await);
        assert_eq!(src.held_locally(), 0);
    }
}
