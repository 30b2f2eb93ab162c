//! The replica registry: the replicas of one pool, their tiers, health and in-flight counts.
//!
//! Layout (pingora's `ArcSwap` health snapshot, livery's per-endpoint atomics):
//!
//! * Each [`Replica`] is an `Arc` holding its key (base URL or any id), [`Tier`], the
//!   user's payload `T` (a tower service, an upstream address, ...), a
//!   [`HealthState`] and an in-flight counter. Requests hold
//!   an `Arc` to the replica itself, never an index, so removing a replica can never make a
//!   request land on another one (tower's p2c stale-index bug), and releasing the slot of a
//!   removed replica touches only that replica's counter: a no-op for the pool.
//! * A *view* is rebuilt (off the common path) whenever membership or a replica's category
//!   changes: the healthy replicas of each tier in insertion order, the ejected ones
//!   (recovery candidates), everything (for panic mode). It is published with `ArcSwap`, so
//!   a request reads it with one atomic load and picks in O(1): no lock, no allocation, no
//!   round trip through a task.
//! * A pick re-checks the chosen replica's status and `removed` flag after taking its
//!   in-flight slot, so a replica removed (or marked down) a moment ago is skipped even
//!   through a view that is a moment old.

use crate::config::{Config, RoutingStrategy, UpstreamConfig};
use crate::error::NoHealthyReplica;
use crate::guard::InflightGuard;
use crate::replica::{changes_category, RefreshView};
pub use crate::replica::{Replica, Tier};
use crate::selection;
use crate::snapshot::{ReplicaSnapshot, Snapshot};
use crate::sync::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use arc_swap::ArcSwap;
use portcullis_core::HealthSource;
use portcullis_health::{
    CheckerConfig, CheckerHandle, HealthChecker, HealthPolicy, HealthState, HttpProbe, Probe,
    ProbeTarget, ProbeTargets, Transition,
};
use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::time::Instant;

/// What a request sees: the precomputed candidate sets.
struct View<T> {
    /// Healthy replicas per tier (primary, secondary), insertion order.
    healthy: [Vec<Arc<Replica<T>>>; 2],
    /// Ejected (or probing) replicas, primaries first: recovery-lease candidates.
    ejected: Vec<Arc<Replica<T>>>,
    /// How many of `ejected` are primaries.
    ejected_primaries: usize,
    /// Every replica, primaries first, insertion order (panic mode).
    all: Vec<Arc<Replica<T>>>,
    /// Fewer than `panic_threshold` % healthy: route to `all`.
    panic: bool,
}

impl<T> View<T> {
    fn empty() -> Self {
        Self {
            healthy: [Vec::new(), Vec::new()],
            ejected: Vec::new(),
            ejected_primaries: 0,
            all: Vec::new(),
            panic: false,
        }
    }

    fn build(members: &[Arc<Replica<T>>], panic_threshold: f64) -> Self {
        let mut v = Self::empty();
        for tier in [Tier::Primary, Tier::Secondary] {
            for r in members.iter().filter(|r| r.tier == tier) {
                if r.is_removed() {
                    continue;
                }
                let status = r.health.status();
                if status.is_healthy() {
                    v.healthy[tier.index()].push(r.clone());
                } else if status.is_ejected() {
                    v.ejected.push(r.clone());
                    v.ejected_primaries += usize::from(tier == Tier::Primary);
                }
                v.all.push(r.clone());
            }
        }
        let healthy = v.healthy[0].len() + v.healthy[1].len();
        v.panic = panic_threshold > 0.0
            && !v.all.is_empty()
            && (healthy as f64) * 100.0 < panic_threshold * v.all.len() as f64;
        v
    }

    /// The ejected replicas a request may be leased to: those of the tier that would be
    /// selected or a better one. While a primary is healthy (and no panic), only ejected
    /// primaries: a secondary is not probed with live traffic that the primaries serve.
    #[inline]
    fn leasable(&self) -> &[Arc<Replica<T>>] {
        if !self.panic && !self.healthy[0].is_empty() {
            &self.ejected[..self.ejected_primaries]
        } else {
            &self.ejected
        }
    }

    #[inline]
    fn candidates(&self) -> &[Arc<Replica<T>>] {
        if self.panic {
            &self.all
        } else if !self.healthy[0].is_empty() {
            &self.healthy[0]
        } else {
            &self.healthy[1]
        }
    }
}

pub(crate) struct Inner<T> {
    members: ArcSwap<Vec<Arc<Replica<T>>>>,
    view: ArcSwap<View<T>>,
    /// Serialises add/remove (the admin path only; never taken by a request).
    admin: Mutex<()>,
    dirty: AtomicU64,
    rebuilding: AtomicBool,
    seeded: AtomicBool,
    /// Given to every replica's [`HealthState`] (see
    /// [`ReplicaRegistry::set_uneject_on_active_check`]).
    uneject_on_active_check: AtomicBool,
    rr: AtomicUsize,
    strategy: RoutingStrategy,
    panic_threshold: f64,
    policy: Arc<HealthPolicy>,
    retry_after: Duration,
}

impl<T: Send + Sync> RefreshView for Inner<T> {
    fn refresh(&self) {
        Inner::refresh(self);
    }
}

impl<T> Inner<T> {
    /// Rebuilds the view; concurrent callers combine (one rebuilds until nothing changed).
    fn refresh(&self) {
        // All four accesses are SeqCst: with a Release store of `rebuilding` the rebuilder's
        // re-read of `dirty` could miss a caller's increment while that caller's CAS still saw
        // `rebuilding == true` (the store-buffering pattern), and both would leave the view
        // stale.
        self.dirty.fetch_add(1, Ordering::SeqCst);
        while self
            .rebuilding
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            let seen = self.dirty.load(Ordering::SeqCst);
            let view = View::build(&self.members.load(), self.panic_threshold);
            self.view.store(Arc::new(view));
            self.rebuilding.store(false, Ordering::SeqCst);
            if self.dirty.load(Ordering::SeqCst) == seen {
                break;
            }
        }
    }
}

/// The replicas of one pool (see the [module docs](self)). Clones share the pool.
pub struct ReplicaRegistry<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Clone for ReplicaRegistry<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<T> fmt::Debug for ReplicaRegistry<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicaRegistry")
            .field("strategy", &self.inner.strategy)
            .field("replicas", &**self.inner.members.load())
            .finish()
    }
}

impl<T> ReplicaRegistry<T> {
    /// An empty pool with the strategy, thresholds, panic mode and
    /// `uneject_on_active_check` of `config` (its `upstreams` are not added: the caller adds
    /// them with their payload).
    pub fn new(config: &Config) -> Self {
        Self::with_policy(
            config.routing_strategy,
            config.health_policy(),
            config.panic_threshold,
            config.checker_config().interval,
        )
        .with_uneject_on_active_check(config.uneject_on_active_check)
    }

    /// An empty pool; `retry_after` is the `Retry-After` hint of "no healthy replica".
    pub fn with_policy(
        strategy: RoutingStrategy,
        policy: HealthPolicy,
        panic_threshold: f64,
        retry_after: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                members: ArcSwap::from_pointee(Vec::new()),
                view: ArcSwap::from_pointee(View::empty()),
                admin: Mutex::new(()),
                dirty: AtomicU64::new(0),
                rebuilding: AtomicBool::new(false),
                seeded: AtomicBool::new(false),
                uneject_on_active_check: AtomicBool::new(false),
                rr: AtomicUsize::new(0),
                strategy,
                panic_threshold,
                policy: Arc::new(policy),
                retry_after: retry_after.max(Duration::from_secs(1)),
            }),
        }
    }

    /// The routing strategy.
    pub fn strategy(&self) -> RoutingStrategy {
        self.inner.strategy
    }

    /// The `Retry-After` hint for "no healthy replica" (the check interval, at least 1 s).
    pub fn retry_after(&self) -> Duration {
        self.inner.retry_after
    }

    fn admin(&self) -> std::sync::MutexGuard<'_, ()> {
        self.inner.admin.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// With `true`, `recovery_threshold` good active health checks also end a passive
    /// ejection, as Envoy's `successful_active_health_check_uneject_host` does; with `false`
    /// (the default) an ejected replica stays out until its cooldown ends and the one live
    /// request leased to it succeeds (see
    /// [`HealthState::set_uneject_on_active_check`]). Applies to every replica, present and
    /// added later.
    pub fn set_uneject_on_active_check(&self, on: bool) {
        let _g = self.admin();
        self.inner
            .uneject_on_active_check
            .store(on, Ordering::SeqCst);
        for r in self.inner.members.load().iter() {
            r.health.set_uneject_on_active_check(on);
        }
    }

    /// [`set_uneject_on_active_check`](Self::set_uneject_on_active_check), builder style.
    pub fn with_uneject_on_active_check(self, on: bool) -> Self {
        self.set_uneject_on_active_check(on);
        self
    }
}

/// Adding replicas: a replica reports to its registry through a `dyn` handle, hence the
/// `'static` bound.
impl<T: Send + Sync + 'static> ReplicaRegistry<T> {
    /// Adds a healthy replica, last of its tier (the configured replicas at start, whose
    /// traffic should not wait for a check). Returns `false` (and changes nothing) when
    /// `key` is already present. Marks the pool as seeded (see [`ensure`](Self::ensure)).
    pub fn add(&self, key: impl Into<Arc<str>>, tier: Tier, target: T) -> bool {
        self.insert(key.into(), tier, 1, target, HealthState::new)
    }

    /// [`add`](Self::add) with a weight: the replica's share of the traffic under
    /// [`RoutingStrategy::Weighted`] (`upstreams[].weight`; 0 counts as 1). The other
    /// strategies ignore it.
    pub fn add_weighted(
        &self,
        key: impl Into<Arc<str>>,
        tier: Tier,
        weight: u32,
        target: T,
    ) -> bool {
        self.insert(key.into(), tier, weight, target, HealthState::new)
    }

    /// A pool as [`new`](ReplicaRegistry::new) makes it, with `config.upstreams` added in
    /// their order: each healthy, in its tier (`primary`), with its `weight`, keyed by its
    /// `url`, and with `target(upstream)` as its payload (the base URL itself for
    /// `portcullis::client::UpstreamClient`, a per-replica client, ...).
    ///
    /// ```
    /// use portcullis_balance::{Config, ReplicaRegistry, Tier, UpstreamConfig};
    ///
    /// let config: Config = serde_json::from_value(serde_json::json!({
    ///     "upstreams": [{"url": "http://10.0.0.1:8000", "primary": true}, {"url": "http://10.0.0.2:8000"}]
    /// })).unwrap();
    /// let registry = ReplicaRegistry::from_config(&config, |u: &UpstreamConfig| u.url.clone());
    /// assert_eq!(registry.len(), 2);
    /// let backup = registry.get("http://10.0.0.2:8000").unwrap();
    /// assert_eq!(backup.tier(), Tier::Secondary);
    /// assert_eq!(backup.target(), "http://10.0.0.2:8000");
    /// ```
    pub fn from_config(config: &Config, mut target: impl FnMut(&UpstreamConfig) -> T) -> Self {
        let registry = Self::new(config);
        for u in &config.upstreams {
            let tier = if u.primary {
                Tier::Primary
            } else {
                Tier::Secondary
            };
            registry.add_weighted(u.url.as_str(), tier, u.weight, target(u));
        }
        registry
    }

    /// Adds a replica at run time that is not checked yet
    /// ([`Status::Unknown`](portcullis_health::Status::Unknown), last of its
    /// tier): it gets no traffic, except in panic mode, until its first good health check
    /// makes it healthy, so a replica still starting up (or a mistyped URL) never sees a
    /// live request. Returns `false` (and changes nothing) when `key` is already present.
    pub fn add_awaiting_check(&self, key: impl Into<Arc<str>>, tier: Tier, target: T) -> bool {
        self.insert(key.into(), tier, 1, target, HealthState::new_unknown)
    }

    /// [`add_awaiting_check`](Self::add_awaiting_check) with a weight (see
    /// [`add_weighted`](Self::add_weighted)): a replica added by a config reload.
    pub fn add_weighted_awaiting_check(
        &self,
        key: impl Into<Arc<str>>,
        tier: Tier,
        weight: u32,
        target: T,
    ) -> bool {
        self.insert(key.into(), tier, weight, target, HealthState::new_unknown)
    }

    fn insert(
        &self,
        key: Arc<str>,
        tier: Tier,
        weight: u32,
        target: T,
        state: fn(Arc<HealthPolicy>) -> HealthState,
    ) -> bool {
        let _g = self.admin();
        self.inner.seeded.store(true, Ordering::SeqCst);
        let members = self.inner.members.load_full();
        if members.iter().any(|r| r.key == key) {
            return false;
        }
        let health = state(self.inner.policy.clone());
        health
            .set_uneject_on_active_check(self.inner.uneject_on_active_check.load(Ordering::SeqCst));
        let mut next = Vec::with_capacity(members.len() + 1);
        next.extend(members.iter().cloned());
        let registry: Weak<dyn RefreshView> = Arc::downgrade(&self.inner) as Weak<Inner<T>>;
        next.push(Arc::new(
            Replica::new(key, tier, target, Arc::new(health), registry).with_weight(weight),
        ));
        self.inner.members.store(Arc::new(next));
        self.inner.refresh();
        true
    }

    /// Seeds the pool once: adds `replicas` if the pool was never seeded (by `ensure` or
    /// [`add`](Self::add)), and is a no-op afterwards, so a lazy call on a later request
    /// never re-adds a replica that was removed at runtime. Returns `true` when it seeded.
    pub fn ensure<K, I>(&self, replicas: I) -> bool
    where
        K: Into<Arc<str>>,
        I: IntoIterator<Item = (K, Tier, T)>,
    {
        // The cheap check runs without the admin lock.
        if self.inner.seeded.load(Ordering::Acquire) {
            return false;
        }
        {
            let _g = self.admin();
            if self.inner.seeded.swap(true, Ordering::SeqCst) {
                return false;
            }
        }
        for (k, tier, t) in replicas {
            self.add(k, tier, t);
        }
        true
    }
}

impl<T> ReplicaRegistry<T> {
    /// Removes a replica at runtime. Requests already sent to it complete normally; their
    /// release and outcome are no-ops. From the moment this returns, no pick chooses it.
    pub fn remove(&self, key: &str) -> bool {
        let _g = self.admin();
        let members = self.inner.members.load_full();
        let Some(gone) = members.iter().find(|r| &*r.key == key) else {
            return false;
        };
        gone.removed.store(true, Ordering::SeqCst);
        let next: Vec<_> = members.iter().filter(|r| &*r.key != key).cloned().collect();
        self.inner.members.store(Arc::new(next));
        self.inner.refresh();
        true
    }

    /// Number of replicas.
    pub fn len(&self) -> usize {
        self.inner.members.load().len()
    }

    /// `true` when the pool has no replica.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The replicas, in insertion order.
    pub fn replicas(&self) -> Vec<Arc<Replica<T>>> {
        self.inner.members.load().to_vec()
    }

    /// The replica with this key.
    pub fn get(&self, key: &str) -> Option<Arc<Replica<T>>> {
        self.inner
            .members
            .load()
            .iter()
            .find(|r| &*r.key == key)
            .cloned()
    }

    /// Picks a replica for one request and takes its in-flight slot.
    ///
    /// An ejected replica whose cooldown expired is leased first, to exactly one caller
    /// (compare-and-swap), if its tier could serve this request: a primary always, a
    /// secondary only while no primary is healthy (until then it stays ejected, and is leased
    /// once its tier is selected). Otherwise the routing strategy chooses among the healthy
    /// replicas of the best tier with a healthy member (all replicas in panic mode). The slot is
    /// released when the guard drops; report the outcome with
    /// [`InflightGuard::record`] to feed passive ejection.
    pub fn pick(&self) -> Result<InflightGuard<T>, NoHealthyReplica> {
        let inner = &*self.inner;
        for _ in 0..4 {
            let view = inner.view.load();
            let leasable = view.leasable();
            if !leasable.is_empty() {
                let now = Instant::now();
                for r in leasable {
                    if r.health.try_lease(now) {
                        if r.acquire() {
                            return Ok(InflightGuard::new(r.clone(), true));
                        }
                        r.health.abandon_lease();
                    }
                }
            }
            let candidates = view.candidates();
            if candidates.is_empty() {
                return Err(NoHealthyReplica);
            }
            let r = selection::select(inner.strategy, candidates, &inner.rr);
            if !view.panic && !r.health.is_healthy() {
                // The view is a moment old: rebuild it and try again.
                inner.refresh();
                continue;
            }
            if !r.acquire() {
                inner.refresh();
                continue;
            }
            return Ok(InflightGuard::new(r.clone(), false));
        }
        self.any_candidate(|_| false)
    }

    /// The last resort of a pick whose tries all met a stale view (replicas removed or
    /// turned unhealthy while another thread was still rebuilding it, so `refresh` returned
    /// at once): the first candidate of the latest view that can still serve, outside
    /// `skip`. Without it a request arriving in the middle of a membership change (a config
    /// reload removing a replica) could be refused with healthy replicas in the pool.
    fn any_candidate(
        &self,
        skip: impl Fn(&Arc<Replica<T>>) -> bool,
    ) -> Result<InflightGuard<T>, NoHealthyReplica> {
        let view = self.inner.view.load();
        for r in view.candidates() {
            if !skip(r) && (view.panic || r.health.is_healthy()) && r.acquire() {
                return Ok(InflightGuard::new(r.clone(), false));
            }
        }
        Err(NoHealthyReplica)
    }

    /// Picks a healthy replica other than those in `tried` for a retry, and takes its
    /// in-flight slot: the routing strategy chooses among the candidates [`pick`](Self::pick)
    /// would choose from, less `tried`. No ejected replica is leased: a retry goes where a
    /// request is expected to succeed, not to a recovery probe.
    ///
    /// `NoHealthyReplica` when every candidate was tried. Allocates only when a tried replica
    /// is among the candidates (the retry path, not the common one).
    pub fn pick_excluding(
        &self,
        tried: &[Arc<Replica<T>>],
    ) -> Result<InflightGuard<T>, NoHealthyReplica> {
        let inner = &*self.inner;
        let was_tried = |r: &Arc<Replica<T>>| tried.iter().any(|t| Arc::ptr_eq(t, r));
        for _ in 0..4 {
            let view = inner.view.load();
            let candidates = view.candidates();
            let others: Vec<Arc<Replica<T>>>;
            let candidates = if candidates.iter().any(was_tried) {
                others = candidates
                    .iter()
                    .filter(|r| !was_tried(r))
                    .cloned()
                    .collect();
                &others[..]
            } else {
                candidates
            };
            if candidates.is_empty() {
                return Err(NoHealthyReplica);
            }
            // A retry does not move the pool's rotation: the next first attempt goes where
            // it would have gone without this retry.
            let rr = AtomicUsize::new(inner.rr.load(Ordering::Relaxed));
            let r = selection::select(inner.strategy, candidates, &rr);
            if (!view.panic && !r.health.is_healthy()) || !r.acquire() {
                // The view is a moment old: rebuild it and try again.
                inner.refresh();
                continue;
            }
            return Ok(InflightGuard::new(r.clone(), false));
        }
        self.any_candidate(was_tried)
    }

    /// A point-in-time copy of every replica's state (no I/O, no lock on the request path).
    pub fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        let view = self.inner.view.load();
        let replicas: Vec<ReplicaSnapshot> = self
            .inner
            .members
            .load()
            .iter()
            .map(|r| {
                let counters = r.health.counters(now);
                ReplicaSnapshot {
                    url: r.key.to_string(),
                    tier: r.tier,
                    primary: r.tier == Tier::Primary,
                    healthy: counters.status.is_healthy(),
                    ejected: counters.status.is_ejected(),
                    inflight: r.inflight(),
                    counters,
                }
            })
            .collect();
        Snapshot {
            strategy: self.inner.strategy,
            panic: view.panic,
            healthy: replicas.iter().filter(|r| r.healthy).count(),
            total: replicas.len(),
            replicas,
        }
    }

    /// `true` when a request arriving now could be routed (some replica is healthy, panic
    /// mode routes anyway, or an ejected replica may be probed).
    pub fn can_serve(&self) -> bool {
        let view = self.inner.view.load();
        if !view.candidates().is_empty() {
            return true;
        }
        let now = Instant::now();
        view.ejected.iter().any(|r| r.health.lease_available(now))
    }
}

impl<T: Send + Sync + 'static> ReplicaRegistry<T> {
    /// The [`ProbeTargets`] of this pool (every replica, keyed by its URL), for a
    /// [`HealthChecker`]; status changes refresh the pool's view.
    pub fn probe_targets(&self) -> RegistryTargets<T> {
        RegistryTargets {
            inner: self.inner.clone(),
        }
    }

    /// Starts the active health checker over this pool with `probe`. Dropping the handle
    /// stops it.
    pub fn spawn_checker<P: Probe>(&self, probe: P, config: CheckerConfig) -> CheckerHandle {
        HealthChecker::spawn(self.probe_targets(), probe, config)
    }

    /// Starts the active HTTP health checker of `config`: `GET <url><health_endpoint>`
    /// every `health_check_interval` on one shared pooled client.
    ///
    /// ```
    /// use portcullis_balance::{Config, ReplicaRegistry, Tier};
    /// use std::time::Duration;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// // A replica whose health endpoint answers 503.
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    /// let url = format!("http://{}", listener.local_addr().unwrap());
    /// let app = axum::Router::new()
    ///     .route("/health", axum::routing::get(|| async { http::StatusCode::SERVICE_UNAVAILABLE }));
    /// tokio::spawn(async move { axum::serve(listener, app).await });
    ///
    /// let config = Config {
    ///     health_endpoint: "/health".into(),
    ///     health_check_interval: Duration::from_millis(20),
    ///     failure_threshold: 2,
    ///     ..Config::default()
    /// };
    /// let registry = ReplicaRegistry::new(&config);
    /// registry.add(url.clone(), Tier::Primary, url);
    /// let _checker = registry.spawn_http_checker(&config); // dropping it stops the checks
    /// for _ in 0..250 {
    ///     if registry.snapshot().healthy == 0 {
    ///         break;
    ///     }
    ///     tokio::time::sleep(Duration::from_millis(20)).await;
    /// }
    /// assert_eq!(registry.snapshot().healthy, 0, "two failed checks mark it unhealthy");
    /// # }
    /// ```
    pub fn spawn_http_checker(&self, config: &Config) -> CheckerHandle {
        let checker = config.checker_config();
        let probe = HttpProbe::new(config.health_endpoint.clone(), checker.timeout);
        self.spawn_checker(probe, checker)
    }
}

/// The [`ProbeTargets`] view of a [`ReplicaRegistry`] (see
/// [`ReplicaRegistry::probe_targets`]).
pub struct RegistryTargets<T> {
    inner: Arc<Inner<T>>,
}

impl<T> fmt::Debug for RegistryTargets<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryTargets").finish_non_exhaustive()
    }
}

impl<T: Send + Sync + 'static> ProbeTargets for RegistryTargets<T> {
    fn probe_targets(&self) -> Vec<ProbeTarget> {
        self.inner
            .members
            .load()
            .iter()
            .map(|r| ProbeTarget {
                key: r.key.clone(),
                state: r.health.clone(),
            })
            .collect()
    }

    fn health_changed(&self, _key: &str, t: Transition) {
        if changes_category(t) {
            self.inner.refresh();
        }
    }
}

impl<T: Send + Sync + 'static> HealthSource for ReplicaRegistry<T> {
    fn can_serve(&self) -> bool {
        ReplicaRegistry::can_serve(self)
    }
}
