use crate::config::{Config, EndpointConfig};
use crate::limiter::Limiter;
use crate::local::LocalCapacity;
use crate::pattern::{pattern_prefix, under};
use crate::source::CapacitySource;
use crate::stats::AdmissionStats;
use http::Method;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// The watched endpoints of an [`HttpAdmission`](super::HttpAdmission): key → method
/// filter and [`Limiter`]. Cheap to clone (one `Arc`); every clone sees the same limiters,
/// so a handle kept by the gateway can read stats and change capacities while the layer
/// serves.
///
/// # Keys: exact paths and prefix patterns
///
/// A key is either an exact path (`/predict`) or a prefix pattern: a key ending in `/*`
/// (`/v1/models/*`). A pattern matches its prefix itself and every path under it —
/// `/v1/models`, `/v1/models/`, `/v1/models/a`, `/v1/models/a/b` — but only on a `/`
/// boundary: `/v1/modelsX` does not match. A pattern is *one* endpoint: one limiter,
/// one capacity, one queue, shared by every path it matches, and its stats are reported
/// under the pattern key (`"/v1/models/*"`).
///
/// A request is matched in this order, and the first key whose method filter accepts the
/// request's method applies:
///
/// 1. the exact key equal to the path (one hash lookup — the only cost when no pattern is
///    configured);
/// 2. the patterns matching the path, longest prefix first.
///
/// So an exact key wins over a pattern, and `/v1/models/large/*` wins over `/v1/models/*`.
/// A key whose method filter rejects the request does not hide the next one: with
/// `/v1/models/a` watched for `POST` only and `/v1/models/*` for every method, a `GET
/// /v1/models/a` is counted by the pattern. A path no key accepts passes through
/// uncounted. Matching compares bytes of the raw path (no percent-decoding, no
/// normalisation of `//` or `..`) and never allocates.
///
/// ```
/// use portcullis_admission::{Endpoints, Limiter};
/// use std::sync::Arc;
///
/// let eps = Endpoints::new()
///     .watch("/v1/models/*", None, Arc::new(Limiter::local(8)))
///     .watch("/v1/models/large/*", None, Arc::new(Limiter::local(2)))
///     .watch("/v1/models/list", None, Arc::new(Limiter::local(64)));
/// let capacity = |path: &str| eps.lookup(path, &http::Method::GET).map(|l| l.stats().capacity);
/// assert_eq!(capacity("/v1/models/list"), Some(64)); // exact key
/// assert_eq!(capacity("/v1/models/large/x"), Some(2)); // longest pattern
/// assert_eq!(capacity("/v1/models/small/x"), Some(8));
/// assert_eq!(capacity("/v1/models"), Some(8)); // the prefix itself
/// assert_eq!(capacity("/v1/modelsX"), None); // not on a `/` boundary
/// // One limiter per pattern, found by its key:
/// assert!(Arc::ptr_eq(
///     eps.get("/v1/models/*").unwrap(),
///     eps.lookup("/v1/models/a/b", &http::Method::POST).unwrap(),
/// ));
/// ```
///
/// [`watch`](Endpoints::watch) does not validate keys (a `*` anywhere else is part of an
/// exact path); [`from_config`](Endpoints::from_config) does, through
/// [`Config::validate`].
pub struct Endpoints<C = LocalCapacity> {
    table: Arc<Table<C>>,
}

/// What [`Endpoints`] shares between its clones.
struct Table<C> {
    /// Every key (exact paths and patterns, the latter under their `/*` key): for `get`,
    /// `set_capacity`, `stats`, and the exact step of `lookup`.
    keys: HashMap<String, Watched<C>>,
    /// The patterns, longest prefix first (two prefixes of the same length that match the
    /// same path are equal, so the order among them does not matter).
    patterns: Vec<Pattern<C>>,
}

/// A prefix pattern: `prefix` is the key without its trailing `/*`.
struct Pattern<C> {
    prefix: String,
    watched: Watched<C>,
}

pub(crate) struct Watched<C> {
    pub(crate) method: Option<Method>,
    pub(crate) limiter: Arc<Limiter<C>>,
}

impl<C> Watched<C> {
    fn accepts(&self, method: &Method) -> bool {
        self.method.as_ref().is_none_or(|m| m == method)
    }
}

impl<C> Clone for Watched<C> {
    fn clone(&self) -> Self {
        Self {
            method: self.method.clone(),
            limiter: Arc::clone(&self.limiter),
        }
    }
}

impl<C> Clone for Table<C> {
    fn clone(&self) -> Self {
        Self {
            keys: self.keys.clone(),
            patterns: self
                .patterns
                .iter()
                .map(|p| Pattern {
                    prefix: p.prefix.clone(),
                    watched: p.watched.clone(),
                })
                .collect(),
        }
    }
}

impl<C> Default for Table<C> {
    fn default() -> Self {
        Self {
            keys: HashMap::new(),
            patterns: Vec::new(),
        }
    }
}

impl<C> Clone for Endpoints<C> {
    fn clone(&self) -> Self {
        Self {
            table: Arc::clone(&self.table),
        }
    }
}

impl<C> Default for Endpoints<C> {
    fn default() -> Self {
        Self {
            table: Arc::default(),
        }
    }
}

impl Endpoints<LocalCapacity> {
    /// In-process limiters for every endpoint of `config`. An endpoint without `capacity`
    /// (to be probed) starts with `default_capacity` until
    /// [`set_capacity`](Endpoints::set_capacity) is called.
    ///
    /// Fails with a message naming the field when [`Config::validate`] does.
    pub fn from_config(config: &Config, default_capacity: usize) -> Result<Self, String> {
        Self::from_config_with(config, |_, ep| {
            LocalCapacity::new(ep.capacity.unwrap_or(default_capacity))
        })
    }
}

impl<C: CapacitySource> Endpoints<C> {
    /// No watched endpoint.
    pub fn new() -> Self {
        Self::default()
    }

    /// Limiters for every endpoint of `config`, each over the source `make_source(path,
    /// endpoint)` returns (for example a Redis-shared source per endpoint), with the
    /// endpoint's `queue_timeout` (or the global one) and the global `max_queue`.
    pub fn from_config_with(
        config: &Config,
        make_source: impl FnMut(&str, &EndpointConfig) -> C,
    ) -> Result<Self, String> {
        Self::new().reconfigure(config, |_, _| false, make_source)
    }

    /// The endpoints of a new `config`, for a live config change: every key of `config`
    /// that is watched here and for which `keep(path, endpoint)` says so keeps its limiter
    /// (so its in-flight requests, its queue and the place of each waiter in it carry
    /// over), with the new `queue_timeout` and `max_queue` applied to it and the new method
    /// filter; every other key gets a new limiter over `make_source(path, endpoint)`. Keys
    /// that are not in `config` are left out: their in-flight and queued requests finish
    /// under the limiter they already hold, and no new request reaches it.
    ///
    /// The capacity of a kept limiter is not touched (the caller decides whether a
    /// configured capacity replaces the one in force, which may have been probed or
    /// adapted). `self` is not changed: serve the returned table in its place.
    ///
    /// Fails with a message naming the field when [`Config::validate`] does.
    pub fn reconfigure(
        &self,
        config: &Config,
        mut keep: impl FnMut(&str, &EndpointConfig) -> bool,
        mut make_source: impl FnMut(&str, &EndpointConfig) -> C,
    ) -> Result<Self, String> {
        config.validate().map_err(|e| e.to_string())?;
        let mut eps = Self::new();
        for (path, ep) in &config.endpoints {
            let method = ep.parsed_method()?;
            let limiter = match self.get(path) {
                Some(old) if keep(path, ep) => {
                    old.set_queue_timeout(config.queue_timeout_for(ep));
                    old.set_max_queue(config.max_queue);
                    Arc::clone(old)
                }
                _ => Arc::new(
                    Limiter::new(make_source(path, ep))
                        .with_queue_timeout(config.queue_timeout_for(ep))
                        .with_max_queue(config.max_queue),
                ),
            };
            eps = eps.watch(path.clone(), method, limiter);
        }
        Ok(eps)
    }

    /// Adds (or replaces) a watched key (builder form): an exact path, or a prefix pattern
    /// when it ends in `/*` (see [matching](Endpoints#keys-exact-paths-and-prefix-patterns)).
    /// `method`: only requests with this method are admission-controlled; `None` means
    /// every method.
    pub fn watch(
        mut self,
        path: impl Into<String>,
        method: Option<Method>,
        limiter: Arc<Limiter<C>>,
    ) -> Self {
        let key = path.into();
        let watched = Watched { method, limiter };
        let table = Arc::make_mut(&mut self.table);
        if let Some(prefix) = pattern_prefix(&key) {
            table.patterns.retain(|p| p.prefix != prefix);
            table.patterns.push(Pattern {
                prefix: prefix.to_owned(),
                watched: watched.clone(),
            });
            // Stable: longest prefix first.
            table
                .patterns
                .sort_by_key(|p| std::cmp::Reverse(p.prefix.len()));
        }
        table.keys.insert(key, watched);
        self
    }

    /// The limiter watching the key `path` (an exact path, or a pattern by its `/*` key).
    /// For the limiter a request to `path` would use, see [`lookup`](Self::lookup).
    pub fn get(&self, path: &str) -> Option<&Arc<Limiter<C>>> {
        self.table.keys.get(path).map(|w| &w.limiter)
    }

    /// The limiter that applies to a request for `path` with `method`, if any: the exact
    /// key, else the longest matching pattern, whose method filter accepts `method`.
    /// One hash lookup when the exact key applies or no pattern is configured; otherwise
    /// one prefix comparison per pattern, longest first. Never allocates.
    pub fn lookup(&self, path: &str, method: &Method) -> Option<&Arc<Limiter<C>>> {
        if let Some(w) = self.table.keys.get(path) {
            if w.accepts(method) {
                return Some(&w.limiter);
            }
        }
        self.table
            .patterns
            .iter()
            .find(|p| under(path, &p.prefix) && p.watched.accepts(method))
            .map(|p| &p.watched.limiter)
    }

    /// Changes the capacity of the endpoint watching `path` at runtime (queued requests
    /// stay queued). Returns `false` when `path` is not watched.
    pub fn set_capacity(&self, path: &str, capacity: usize) -> bool {
        match self.get(path) {
            Some(l) => {
                l.set_capacity(capacity);
                true
            }
            None => false,
        }
    }

    /// The watched keys (exact paths and `/*` patterns), in no particular order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.table.keys.keys().map(String::as_str)
    }

    /// A snapshot of every watched endpoint (no I/O): `{"endpoints": {"/work": {...}}}`.
    /// A pattern is reported once, under its key (`"/v1/models/*"`), for every path it
    /// matched.
    pub fn stats(&self) -> AdmissionStats {
        let endpoints = self
            .table
            .keys
            .iter()
            .map(|(path, w)| {
                let mut s = w.limiter.stats();
                s.method = w.method.as_ref().map(|m| m.to_string());
                (path.clone(), s)
            })
            .collect();
        AdmissionStats { endpoints }
    }
}

impl<C: CapacitySource + fmt::Debug> fmt::Debug for Endpoints<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        for (path, w) in self.table.keys.iter() {
            m.entry(path, &(&w.method, &w.limiter));
        }
        m.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    /// Each key gets a limiter of a distinct capacity, so a lookup says which key matched.
    fn watching(keys: &[(&str, Option<Method>, usize)]) -> Endpoints {
        keys.iter()
            .fold(Endpoints::new(), |eps, (key, method, cap)| {
                eps.watch(*key, method.clone(), Arc::new(Limiter::local(*cap)))
            })
    }

    fn hit(eps: &Endpoints, path: &str, method: Method) -> Option<usize> {
        eps.lookup(path, &method).map(|l| l.stats().capacity)
    }

    fn config(yaml: serde_json::Value) -> Config {
        serde_json::from_value(yaml).unwrap()
    }

    #[test]
    fn reconfigure_keeps_the_limiters_it_is_told_to_and_applies_the_new_settings() {
        let old = Endpoints::from_config(
            &config(serde_json::json!({
                "queue_timeout": 5,
                "endpoints": {"/a": {"capacity": 2}, "/b": {"capacity": 3}, "/gone": {"capacity": 1}}
            })),
            8,
        )
        .unwrap();
        let next = config(serde_json::json!({
            "queue_timeout": 9,
            "max_queue": 4,
            "endpoints": {"/a": {"capacity": 20, "method": "POST"}, "/b": {}, "/new": {}}
        }));
        let made = std::cell::RefCell::new(Vec::new());
        let eps = old
            .reconfigure(
                &next,
                |path, _| path == "/a",
                |path, _| {
                    made.borrow_mut().push(path.to_owned());
                    LocalCapacity::new(7)
                },
            )
            .unwrap();
        // `/a` is the same limiter, with its capacity untouched and the new settings.
        assert!(Arc::ptr_eq(eps.get("/a").unwrap(), old.get("/a").unwrap()));
        let a = eps.get("/a").unwrap();
        assert_eq!(a.stats().capacity, 2);
        assert_eq!(a.queue_timeout(), std::time::Duration::from_secs(9));
        assert_eq!(a.max_queue(), Some(4));
        assert_eq!(hit(&eps, "/a", Method::GET), None, "the new method filter");
        assert_eq!(hit(&eps, "/a", Method::POST), Some(2));
        // `/b` was not kept, `/new` is new: fresh limiters; `/gone` is no longer watched.
        assert!(!Arc::ptr_eq(eps.get("/b").unwrap(), old.get("/b").unwrap()));
        assert_eq!(hit(&eps, "/b", Method::GET), Some(7));
        assert_eq!(hit(&eps, "/new", Method::GET), Some(7));
        assert!(eps.get("/gone").is_none());
        made.borrow_mut().sort();
        assert_eq!(*made.borrow(), ["/b", "/new"]);
        // The old table is unchanged.
        assert!(old.get("/gone").is_some());
        // An invalid config is refused whole.
        let bad = config(serde_json::json!({"endpoints": {"/a": {"capacity": 0}}}));
        assert!(old
            .reconfigure(&bad, |_, _| true, |_, _| LocalCapacity::new(1))
            .is_err());
    }

    #[test]
    fn a_pattern_matches_its_prefix_and_paths_under_it_on_a_slash_boundary() {
        let eps = watching(&[("/v1/models/*", None, 1)]);
        for path in [
            "/v1/models",
            "/v1/models/",
            "/v1/models/a",
            "/v1/models/a/b",
            "/v1/models/*",
        ] {
            assert_eq!(hit(&eps, path, Method::GET), Some(1), "{path}");
        }
        for path in [
            "/v1/modelsX",
            "/v1/modelsX/a",
            "/v1/model",
            "/v1",
            "/",
            "/v2/models/a",
        ] {
            assert_eq!(hit(&eps, path, Method::GET), None, "{path}");
        }
        // One limiter for the whole pattern, reachable by its key.
        let l = eps.get("/v1/models/*").unwrap();
        assert!(Arc::ptr_eq(
            l,
            eps.lookup("/v1/models/a", &Method::GET).unwrap()
        ));
        assert!(Arc::ptr_eq(
            l,
            eps.lookup("/v1/models/b/c", &Method::POST).unwrap()
        ));
        assert!(eps.get("/v1/models/a").is_none());
        assert!(eps.set_capacity("/v1/models/*", 7));
        assert_eq!(hit(&eps, "/v1/models/z", Method::GET), Some(7));
        assert_eq!(
            eps.stats().endpoints.keys().collect::<Vec<_>>(),
            ["/v1/models/*"]
        );
    }

    #[test]
    fn exact_beats_pattern_and_the_longest_pattern_wins() {
        let eps = watching(&[
            ("/v1/*", None, 1),
            ("/v1/models/*", None, 2),
            ("/v1/models/large/*", None, 3),
            ("/v1/models/large/x", None, 4),
            ("/v1/models", None, 5),
        ]);
        assert_eq!(hit(&eps, "/v1/embed", Method::GET), Some(1));
        assert_eq!(hit(&eps, "/v1/models/small", Method::GET), Some(2));
        assert_eq!(hit(&eps, "/v1/models/larger", Method::GET), Some(2));
        assert_eq!(hit(&eps, "/v1/models/large", Method::GET), Some(3));
        assert_eq!(hit(&eps, "/v1/models/large/y/z", Method::GET), Some(3));
        assert_eq!(hit(&eps, "/v1/models/large/x", Method::GET), Some(4));
        assert_eq!(hit(&eps, "/v1/models/large/x/y", Method::GET), Some(3));
        assert_eq!(hit(&eps, "/v1/models", Method::GET), Some(5));
        assert_eq!(hit(&eps, "/v2", Method::GET), None);
    }

    #[test]
    fn insertion_order_does_not_matter_and_rewatching_replaces() {
        let a = watching(&[("/a/*", None, 1), ("/a/b/*", None, 2)]);
        let b = watching(&[("/a/b/*", None, 2), ("/a/*", None, 1)]);
        for eps in [&a, &b] {
            assert_eq!(hit(eps, "/a/b/c", Method::GET), Some(2));
            assert_eq!(hit(eps, "/a/c", Method::GET), Some(1));
        }
        let a = a.watch("/a/b/*", None, Arc::new(Limiter::local(9)));
        assert_eq!(hit(&a, "/a/b/c", Method::GET), Some(9));
        assert_eq!(a.table.patterns.len(), 2);
        assert_eq!(a.stats().endpoints.len(), 2);
    }

    #[test]
    fn the_method_filter_applies_to_patterns_and_a_rejecting_key_does_not_hide_the_next() {
        let eps = watching(&[
            ("/v1/*", None, 1),
            ("/v1/models/*", Some(Method::POST), 2),
            ("/v1/models/a", Some(Method::PUT), 3),
        ]);
        assert_eq!(hit(&eps, "/v1/models/b", Method::POST), Some(2));
        assert_eq!(hit(&eps, "/v1/models/b", Method::GET), Some(1));
        assert_eq!(hit(&eps, "/v1/models/a", Method::PUT), Some(3));
        assert_eq!(hit(&eps, "/v1/models/a", Method::POST), Some(2));
        assert_eq!(hit(&eps, "/v1/models/a", Method::GET), Some(1));

        let only_post = watching(&[("/p/*", Some(Method::POST), 1)]);
        assert_eq!(hit(&only_post, "/p/x", Method::POST), Some(1));
        assert_eq!(hit(&only_post, "/p/x", Method::GET), None);
        assert_eq!(
            only_post.stats().endpoints["/p/*"].method.as_deref(),
            Some("POST")
        );
    }

    #[test]
    fn from_config_builds_patterns_and_refuses_malformed_ones() {
        let config: Config = serde_json::from_value(serde_json::json!({
            "endpoints": {"/v1/models/*": {"capacity": 3}, "/v1/models/list": {"capacity": 9}}
        }))
        .unwrap();
        let eps = Endpoints::from_config(&config, 1).unwrap();
        assert_eq!(hit(&eps, "/v1/models/a/b", Method::GET), Some(3));
        assert_eq!(hit(&eps, "/v1/models/list", Method::GET), Some(9));
        let config: Config =
            serde_json::from_value(serde_json::json!({"endpoints": {"/a*b": {}}})).unwrap();
        let e = Endpoints::from_config(&config, 1).unwrap_err();
        assert!(e.starts_with("endpoints./a*b: "), "{e}");
    }
}
