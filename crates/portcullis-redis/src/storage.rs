//! [`RedisStorage`]: one process's connection to the shared storage, with its background
//! tasks (lease heartbeat and outage recovery, readiness PING loop, pub/sub listener).

use crate::capacity::{EndpointShared, RedisCapacity};
use crate::config::{OnError, StorageConfig, StorageType};
use crate::error::{scrub, StorageError};
use crate::readiness::{Readiness, ReadyState};
use crate::scripts::{self, Keys};
use arc_swap::ArcSwap;
use futures_util::future::join_all;
use futures_util::StreamExt;
use portcullis_core::backoff::Backoff;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, ScriptInvocation, Value};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

/// How often a process with queued waiters re-tries Redis when no release notification
/// arrives (the safety net under pub/sub): at most 20 attempts per second per endpoint.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Lifetime of a process's entry in an endpoint's cross-process queue, renewed by each of
/// its retries (at least every [`POLL_INTERVAL`] while it has waiters). A process that dies
/// while queued holds back one free slot for at most this long.
pub(crate) const QUEUE_TTL: Duration = Duration::from_millis(500);
/// The probe lock's TTL; the owner extends it every third of it while probing.
pub(crate) const PROBE_LOCK_TTL: Duration = Duration::from_secs(5);

/// A connection to a single Redis node (reconnecting by itself) or to a Redis Cluster.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// The process-wide state shared by the storage handle, its sources and its tasks.
pub(crate) struct Inner {
    pub(crate) config: StorageConfig,
    conn: Conn,
    pubsub_client: redis::Client,
    pub(crate) instance: String,
    secret: Option<String>,
    cluster: bool,
    degraded: AtomicBool,
    /// `true` while in an outage; waiters watch it to switch to the fallback and back.
    pub(crate) mode: watch::Sender<bool>,
    recover_kick: Notify,
    /// When the last outage ended (ms after `base`, plus 1; 0: never). See
    /// [`recovery_grace`](Inner::recovery_grace).
    recovered_at: AtomicU64,
    base: std::time::Instant,
    /// Held across each outage start and end (the `degraded` swap and the `mode` send), so
    /// that a start racing an end cannot leave `mode` saying the opposite of `degraded`
    /// (requests then queued for Redis while every reply was discarded as an outage's).
    transition: std::sync::Mutex<()>,
    /// Live endpoint sources by pub/sub channel name.
    endpoints: ArcSwap<HashMap<String, Registered>>,
    subscribe: mpsc::UnboundedSender<String>,
    ready: Arc<ReadyState>,
    /// Tests: once set, the next recovery stops between its re-register and the end of the
    /// outage (signals the first, waits for the second).
    #[cfg(test)]
    pub(crate) recovery_pause: std::sync::Mutex<
        Option<(
            tokio::sync::oneshot::Sender<()>,
            tokio::sync::oneshot::Receiver<()>,
        )>,
    >,
}

/// The result of the acquire, release and heartbeat scripts: `{n, count, capacity}`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScriptReply {
    pub(crate) n: usize,
    pub(crate) count: usize,
    pub(crate) capacity: usize,
}

impl Inner {
    pub(crate) fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    /// [`is_degraded`](Self::is_degraded), sequentially consistent with the outage's start
    /// and end (for the hand-over checks of the endpoint tasks and permits).
    pub(crate) fn degraded_seqcst(&self) -> bool {
        self.degraded.load(Ordering::SeqCst)
    }

    fn redacted(&self, e: impl fmt::Display) -> String {
        scrub(e.to_string(), self.secret.as_deref())
    }

    /// Runs one Redis call bounded by `storage.timeout`.
    pub(crate) async fn call<T>(
        &self,
        f: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StorageError> {
        match tokio::time::timeout(self.config.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StorageError::Redis(self.redacted(e))),
            Err(_) => Err(StorageError::Timeout(self.config.timeout)),
        }
    }

    /// Invokes a script (EVALSHA, re-loaded on NOSCRIPT by the redis crate) with a timeout.
    pub(crate) async fn invoke<T: FromRedisValue>(
        &self,
        inv: &ScriptInvocation<'_>,
    ) -> Result<T, StorageError> {
        let mut conn = self.conn.clone();
        self.call(inv.invoke_async(&mut conn)).await
    }

    /// Runs a plain command with a timeout.
    pub(crate) async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StorageError> {
        let mut conn = self.conn.clone();
        self.call(cmd.query_async(&mut conn)).await
    }

    pub(crate) async fn run_script(
        &self,
        inv: &ScriptInvocation<'_>,
    ) -> Result<ScriptReply, StorageError> {
        let (n, count, capacity): (i64, i64, i64) = self.invoke(inv).await?;
        Ok(ScriptReply {
            n: n.max(0) as usize,
            count: count.max(0) as usize,
            capacity: capacity.max(0) as usize,
        })
    }

    /// Enters an outage (once; warns once per outage) and wakes the recovery loop.
    pub(crate) fn enter_outage(&self, err: &StorageError) {
        let _transition = self.transition.lock().unwrap_or_else(|e| e.into_inner());
        if !self.degraded.swap(true, Ordering::SeqCst) {
            match self.config.on_error {
                OnError::Local => tracing::warn!(
                    error = %err,
                    expected_workers = self.config.expected_workers,
                    "redis storage unavailable; serving with a per-process limit (on_error: local) until it is back"
                ),
                OnError::Reject => tracing::warn!(
                    error = %err,
                    "redis storage unavailable; refusing admission-controlled requests with 503 storage_unavailable (on_error: reject)"
                ),
                OnError::Allow => tracing::warn!(
                    error = %err,
                    "redis storage unavailable; admitting every request without a limit (on_error: allow)"
                ),
            }
            if self.config.on_error == OnError::Local {
                // Before any request is routed to the fallback: the requests Redis admitted
                // still run and take their place in the per-process limit.
                for ep in self.live_endpoints() {
                    ep.fit_fallback();
                }
            }
            self.mode.send_replace(true);
            self.recover_kick.notify_one();
        }
    }

    /// How long a live process may take to notice that Redis is back and re-register its
    /// slots: `lease_ttl` (the time within which a live process renews its leases), and at
    /// least two of the longest retry intervals of any process's recovery loop
    /// ([`RECOVERY_BACKOFF_CAP`]; the first retry after Redis returns may still fail on the
    /// old connection) plus one call.
    pub(crate) fn recovery_window(&self) -> Duration {
        self.config
            .lease_ttl
            .max(RECOVERY_BACKOFF_CAP * 2 + self.config.timeout)
    }

    /// With `on_error: local`, during [`recovery_window`](Self::recovery_window) after an
    /// outage: the time left. Other processes may still be serving on their local share,
    /// unknown to Redis (which may have lost everything), so this process keeps to its own
    /// share until they have all re-registered; otherwise the backend would see up to
    /// `capacity` plus the others' shares.
    pub(crate) fn recovery_grace(&self) -> Option<Duration> {
        if self.config.on_error != OnError::Local {
            return None;
        }
        let at = self.recovered_at.load(Ordering::Acquire);
        if at == 0 {
            return None;
        }
        let since = self
            .base
            .elapsed()
            .saturating_sub(Duration::from_millis(at - 1));
        self.recovery_window()
            .checked_sub(since)
            .filter(|d| !d.is_zero())
    }

    fn leave_outage(&self) {
        let _transition = self.transition.lock().unwrap_or_else(|e| e.into_inner());
        if self.degraded.swap(false, Ordering::SeqCst) {
            let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
            self.recovered_at.store(ms + 1, Ordering::Release);
            tracing::info!("redis storage available again; live leases re-registered");
            self.mode.send_replace(false);
            for ep in self.live_endpoints() {
                ep.fit_fallback();
            }
        }
    }

    fn endpoint_by_channel(&self, channel: &str) -> Option<Arc<EndpointShared>> {
        self.endpoints
            .load()
            .get(channel)
            .and_then(|r| r.shared.upgrade())
    }

    fn live_endpoints(&self) -> Vec<Arc<EndpointShared>> {
        self.endpoints
            .load()
            .values()
            .filter_map(|r| r.shared.upgrade())
            .collect()
    }

    /// One heartbeat of every live endpoint of this process (it registers the absolute slot
    /// count), run by each endpoint's task.
    async fn heartbeat_all(&self) -> Result<(), StorageError> {
        let eps = self.live_endpoints();
        let results = join_all(eps.iter().map(|ep| async move {
            let (reply, rx) = tokio::sync::oneshot::channel();
            if ep
                .cmd_tx
                .send(crate::capacity::Cmd::Heartbeat { reply })
                .is_err()
            {
                return Ok(()); // the source is gone
            }
            match tokio::time::timeout(self.config.timeout * 4, rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Ok(()),
                Err(_) => Err(StorageError::Timeout(self.config.timeout * 4)),
            }
        }))
        .await;
        results.into_iter().collect()
    }
}

/// A registered endpoint source, held weakly (the gateway owns the sources).
#[derive(Clone)]
pub(crate) struct Registered {
    shared: Weak<EndpointShared>,
    source: Weak<crate::capacity::SourceParts>,
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

    fn upgrade(&self) -> Option<RedisCapacity> {
        self.source.upgrade().map(RedisCapacity::from_parts)
    }

    /// A new source over the same state, when every clone is gone but permits are still out.
    fn reopen(&self, storage: &RedisStorage) -> Option<RedisCapacity> {
        RedisCapacity::reopen(storage.clone(), self.shared.upgrade()?)
    }
}

/// Owns background tasks; aborts them when dropped.
pub(crate) struct TaskSet(Vec<JoinHandle<()>>);

impl TaskSet {
    pub(crate) fn new(tasks: Vec<JoinHandle<()>>) -> Self {
        Self(tasks)
    }
}

impl Drop for TaskSet {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

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
    pub(crate) inner: Arc<Inner>,
    pub(crate) tasks: Arc<TaskSet>,
}

impl fmt::Debug for RedisStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStorage")
            .field("config", &self.inner.config)
            .field("instance", &self.inner.instance)
            .field("cluster", &self.inner.cluster)
            .field("degraded", &self.inner.is_degraded())
            .field("ready", &self.inner.ready.is_ready())
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
        if config.kind != StorageType::Redis {
            return Err(StorageError::Config(
                "storage.type: must be redis for a RedisStorage".into(),
            ));
        }
        config.validate().map_err(StorageError::Config)?;
        let urls: Vec<String> = config
            .url
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(|u| u.trim().to_owned())
            .collect();
        let redact = |e: redis::RedisError| StorageError::Config(crate::redact_url(&e.to_string()));
        let tls = tls_certificates(config)?;
        if urls.iter().any(|u| u.starts_with("rediss://")) {
            install_crypto_provider();
        }
        let first = match &tls {
            Some(certs) => redis::Client::build_with_tls(urls[0].as_str(), certs.clone()),
            None => redis::Client::open(urls[0].as_str()),
        }
        .map_err(redact)?;
        let secret = first
            .get_connection_info()
            .redis_settings()
            .password()
            .map(str::to_owned);
        let t = config.timeout;

        let mut cluster = urls.len() > 1;
        if !cluster {
            // Detect a cluster-enabled node; an unreachable node is treated as a single node.
            let probe = async {
                let mut c = first.get_multiplexed_async_connection().await?;
                redis::cmd("INFO")
                    .arg("cluster")
                    .query_async::<String>(&mut c)
                    .await
            };
            if let Ok(Ok(info)) = tokio::time::timeout(t, probe).await {
                cluster = info.contains("cluster_enabled:1");
            }
        }
        let conn = if cluster {
            let mut builder = redis::cluster::ClusterClient::builder(urls.clone())
                .connection_timeout(t)
                .response_timeout(t)
                .retries(1);
            if let Some(certs) = tls {
                builder = builder.certs(certs);
            }
            let client = builder.build().map_err(redact)?;
            let c = tokio::time::timeout(t * 4, client.get_async_connection())
                .await
                .map_err(|_| StorageError::Timeout(t * 4))?
                .map_err(|e| StorageError::Redis(scrub(e.to_string(), secret.as_deref())))?;
            Conn::Cluster(c)
        } else {
            let cfg = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(t))
                .set_response_timeout(Some(t))
                .set_number_of_retries(1)
                .set_min_delay(Duration::from_millis(20))
                .set_max_delay(Duration::from_millis(500));
            Conn::Single(
                ConnectionManager::new_lazy_with_config(first.clone(), cfg).map_err(redact)?,
            )
        };

        let (subscribe, sub_rx) = mpsc::unbounded_channel();
        let ready = Arc::new(ReadyState::new(config.failure_threshold));
        let inner = Arc::new(Inner {
            config: config.clone(),
            conn,
            pubsub_client: first,
            instance: format!("{}-{:016x}", std::process::id(), rand::random::<u64>()),
            secret,
            cluster,
            degraded: AtomicBool::new(false),
            mode: watch::channel(false).0,
            recover_kick: Notify::new(),
            recovered_at: AtomicU64::new(0),
            base: std::time::Instant::now(),
            transition: std::sync::Mutex::new(()),
            endpoints: ArcSwap::from_pointee(HashMap::new()),
            subscribe,
            ready,
            #[cfg(test)]
            recovery_pause: std::sync::Mutex::new(None),
        });
        let tasks = TaskSet::new(vec![
            tokio::spawn(heartbeat_loop(Arc::clone(&inner))),
            tokio::spawn(ping_loop(Arc::clone(&inner))),
            tokio::spawn(pubsub_loop(Arc::clone(&inner), sub_rx)),
        ]);
        tracing::info!(
            url = %config.redacted_url().unwrap_or_default(),
            cluster,
            instance = %inner.instance,
            "redis storage configured"
        );
        Ok(Self {
            inner,
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
        let keys = Keys::new(&self.inner.config.key_prefix, endpoint);
        // One source per endpoint and process: its slots are one entry of this instance.
        let registered = self.inner.endpoints.load().get(&keys.channel).cloned();
        if let Some(r) = registered {
            if let Some(existing) = r.upgrade() {
                return existing;
            }
            if let Some(reopened) = r.reopen(self) {
                self.register(&reopened);
                return reopened;
            }
        }
        let cap = RedisCapacity::build(self.clone(), endpoint, keys, capacity);
        self.register(&cap);
        // After `register`: an outage starting meanwhile either fits it or is seen here.
        cap.shared().fit_fallback();
        let _ = self.inner.subscribe.send(cap.shared().keys.channel.clone());
        cap
    }

    fn register(&self, cap: &RedisCapacity) {
        let channel = cap.shared().keys.channel.clone();
        let entry = Registered::new(cap);
        self.inner.endpoints.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.retain(|_, r| r.is_live());
            m.insert(channel.clone(), entry.clone());
            m
        });
    }

    /// The cached readiness (no I/O): false only after `failure_threshold` consecutive
    /// failed PINGs, true again on the first success.
    pub fn readiness(&self) -> Readiness {
        Readiness::new(Arc::clone(&self.inner.ready), self.tasks.clone())
    }

    /// `true` while the storage is in an outage (`on_error` applies).
    pub fn is_degraded(&self) -> bool {
        self.inner.is_degraded()
    }

    /// This process's instance id (the owner of its slot leases).
    pub fn instance_id(&self) -> &str {
        &self.inner.instance
    }

    /// The configuration (its `Debug` redacts the password).
    pub fn config(&self) -> &StorageConfig {
        &self.inner.config
    }

    /// `true` when connected to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.inner.cluster
    }

    /// The capacity stored in Redis for `endpoint`, if any (a stored 0 means "unknown" and
    /// reads as `None`).
    pub async fn stored_capacity(&self, endpoint: &str) -> Result<Option<usize>, StorageError> {
        let keys = Keys::new(&self.inner.config.key_prefix, endpoint);
        self.inner
            .query::<Option<usize>>(redis::cmd("GET").arg(&keys.capacity))
            .await
            .map(|c| c.filter(|&c| c > 0))
    }

    /// Stores `capacity` for `endpoint` and tells every process (their sources apply it).
    pub async fn store_capacity(
        &self,
        endpoint: &str,
        capacity: usize,
    ) -> Result<(), StorageError> {
        let keys = Keys::new(&self.inner.config.key_prefix, endpoint);
        self.inner
            .invoke::<i64>(
                scripts::SET_CAPACITY_SCRIPT
                    .key(&keys.capacity)
                    .arg(capacity)
                    .arg(&keys.channel),
            )
            .await
            .map(drop)
    }

    /// The capacity of `endpoint`, probed at most once across all processes.
    ///
    /// * A stored capacity is reused as is (unless `force_reprobe`).
    /// * Otherwise the first process takes a short lock (`SET NX PX`, extended while it
    ///   probes), runs `probe`, stores the result and tells every process; the others wait
    ///   for the lock to go and reuse the stored result. If the prober dies, its lock expires
    ///   and a waiter takes over.
    /// * `force_reprobe: true` probes again even when a capacity is stored, unless another
    ///   process is probing right now (then its fresh result is reused).
    pub async fn get_or_probe<F, Fut, E>(
        &self,
        endpoint: &str,
        force_reprobe: bool,
        probe: F,
    ) -> Result<usize, StorageError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<usize, E>>,
        E: Into<portcullis_core::BoxError>,
    {
        let inner = &self.inner;
        let keys = Keys::new(&inner.config.key_prefix, endpoint);
        let lock_ms = PROBE_LOCK_TTL.as_millis() as u64;
        let mut force = force_reprobe;
        let mut probe = Some(probe);
        loop {
            if !force {
                if let Some(c) = self.stored_capacity(endpoint).await? {
                    return Ok(c);
                }
            }
            let won: Option<String> = inner
                .query(
                    redis::cmd("SET")
                        .arg(&keys.probe_lock)
                        .arg(&inner.instance)
                        .arg("NX")
                        .arg("PX")
                        .arg(lock_ms),
                )
                .await?;
            if won.is_some() {
                let probe = probe.take().expect("the probe runs at most once");
                let result = {
                    let run = probe();
                    tokio::pin!(run);
                    let mut tick = tokio::time::interval(PROBE_LOCK_TTL / 3);
                    tick.tick().await;
                    loop {
                        tokio::select! {
                            r = &mut run => break r,
                            _ = tick.tick() => {
                                let _ = inner.invoke::<i64>(
                                    scripts::EXTEND_SCRIPT.key(&keys.probe_lock).arg(&inner.instance).arg(lock_ms),
                                ).await;
                            }
                        }
                    }
                };
                let stored = match result {
                    Ok(c) => self.store_capacity(endpoint, c).await.map(|()| c),
                    Err(e) => Err(StorageError::Probe(e.into())),
                };
                let _ = inner
                    .invoke::<i64>(
                        scripts::UNLOCK_SCRIPT
                            .key(&keys.probe_lock)
                            .arg(&inner.instance),
                    )
                    .await;
                return stored;
            }
            // Someone else is probing: wait for the lock to go, then reuse the result.
            force = false;
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let held: bool = inner
                    .query(redis::cmd("EXISTS").arg(&keys.probe_lock))
                    .await?;
                if !held {
                    break;
                }
            }
        }
    }
}

/// The `tls_*` files of `config` read for the redis crate, or `None` when none is set (the
/// system trust store, no client certificate).
fn tls_certificates(
    config: &StorageConfig,
) -> Result<Option<redis::TlsCertificates>, StorageError> {
    let read = |field: &str, path: &Option<std::path::PathBuf>| {
        path.as_ref()
            .map(|p| {
                std::fs::read(p).map_err(|e| {
                    StorageError::Config(format!(
                        "storage.{field}: cannot read `{}`: {e}",
                        p.display()
                    ))
                })
            })
            .transpose()
    };
    let root_cert = read("tls_ca_file", &config.tls_ca_file)?;
    let client_cert = read("tls_cert_file", &config.tls_cert_file)?;
    let client_key = read("tls_key_file", &config.tls_key_file)?;
    let client_tls = match (client_cert, client_key) {
        (Some(client_cert), Some(client_key)) => Some(redis::ClientTlsConfig {
            client_cert,
            client_key,
        }),
        _ => None,
    };
    Ok(
        (root_cert.is_some() || client_tls.is_some()).then_some(redis::TlsCertificates {
            client_tls,
            root_cert,
        }),
    )
}

/// The redis crate runs TLS on rustls without choosing its crypto provider; without one the
/// first `rediss://` connection panics. Installs *ring* as the process default unless the
/// application installed one already.
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race to another installer is fine: a provider is installed either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// The longest wait between two recovery attempts of any process during an outage.
pub(crate) const RECOVERY_BACKOFF_CAP: Duration = Duration::from_secs(1);

/// The first wait between two recovery attempts.
const RECOVERY_BACKOFF_INITIAL: Duration = Duration::from_millis(100);

/// The waits between two recovery attempts of this process: from 100 ms, doubling up to a
/// third of `lease_ttl`, itself between 100 ms and [`RECOVERY_BACKOFF_CAP`].
fn recovery_backoff(config: &StorageConfig) -> Backoff {
    let max = (config.lease_ttl / 3).clamp(RECOVERY_BACKOFF_INITIAL, RECOVERY_BACKOFF_CAP);
    Backoff::new(RECOVERY_BACKOFF_INITIAL, max, 2.0).expect("100 ms <= max, factor 2")
}

/// The waits between two pub/sub reconnection attempts: from 50 ms, doubling up to 1 s.
fn pubsub_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(50), Duration::from_secs(1), 2.0)
        .expect("50 ms <= 1 s, factor 2")
}

/// Heartbeat and outage recovery.
async fn heartbeat_loop(inner: Arc<Inner>) {
    let interval = inner.config.lease_ttl / 3;
    let mut backoff = recovery_backoff(&inner.config).delays();
    loop {
        if inner.is_degraded() {
            let wait = backoff.next_delay();
            // A successful readiness PING cuts the wait short.
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = inner.recover_kick.notified() => {}
            }
            match inner.heartbeat_all().await {
                Ok(()) => {
                    backoff.reset();
                    #[cfg(test)]
                    {
                        let pause = inner.recovery_pause.lock().unwrap().take();
                        if let Some((reached, resume)) = pause {
                            let _ = reached.send(());
                            let _ = resume.await;
                        }
                    }
                    inner.leave_outage();
                    for ep in inner.live_endpoints() {
                        ep.after_recovery();
                    }
                }
                Err(e) => tracing::debug!(error = %e, "redis storage still unavailable"),
            }
        } else {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = inner.recover_kick.notified() => continue,
            }
            if let Err(e) = inner.heartbeat_all().await {
                inner.enter_outage(&e);
            }
        }
    }
}

/// Readiness: PING every `ping_interval`, cached.
async fn ping_loop(inner: Arc<Inner>) {
    loop {
        let sent = std::time::Instant::now();
        let ok = inner
            .query::<String>(&redis::cmd("PING"))
            .await
            .is_ok_and(|pong| pong == "PONG");
        if ok {
            inner.ready.record_latency(sent.elapsed());
        }
        inner.ready.record(ok);
        if ok && inner.is_degraded() {
            inner.recover_kick.notify_one();
        }
        tokio::time::sleep(inner.config.ping_interval).await;
    }
}

/// Pub/sub listener: release and capacity notifications, reconnecting by itself.
async fn pubsub_loop(inner: Arc<Inner>, mut sub_rx: mpsc::UnboundedReceiver<String>) {
    let mut channels: Vec<String> = Vec::new();
    let mut backoff = pubsub_backoff().delays();
    loop {
        while let Ok(ch) = sub_rx.try_recv() {
            channels.push(ch);
        }
        let connected = inner
            .call(async {
                let (mut sink, stream) = inner.pubsub_client.get_async_pubsub().await?.split();
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
        for ep in inner.live_endpoints() {
            ep.wake.notify_one();
        }
        loop {
            tokio::select! {
                ch = sub_rx.recv() => match ch {
                    Some(ch) => {
                        let r = inner.call(sink.subscribe(&ch)).await;
                        channels.push(ch);
                        if r.is_err() {
                            break;
                        }
                    }
                    None => return,
                },
                msg = stream.next() => match msg {
                    Some(msg) => on_message(&inner, &msg),
                    None => break,
                },
            }
        }
    }
}

fn on_message(inner: &Inner, msg: &redis::Msg) {
    let Some(ep) = inner.endpoint_by_channel(msg.get_channel_name()) else {
        return;
    };
    let payload = msg.get_payload_bytes();
    if let Some(ids) = payload.strip_prefix(b"w:") {
        // `w:<id>,<id>…`: slots are free for these queued processes; only they retry.
        if ids
            .split(|&b| b == b',')
            .any(|id| id == inner.instance.as_bytes())
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
