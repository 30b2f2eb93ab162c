use crate::config::{Config, EndpointConfig};
use crate::limiter::Limiter;
use crate::local::LocalCapacity;
use crate::source::CapacitySource;
use crate::stats::AdmissionStats;
use http::Method;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// The watched endpoints of an [`HttpAdmission`](super::HttpAdmission): exact path →
/// method filter and [`Limiter`]. Cheap to clone (one `Arc`); every clone sees the same
/// limiters, so a handle kept by the gateway can read stats and change capacities while
/// the layer serves.
pub struct Endpoints<C = LocalCapacity> {
    map: Arc<HashMap<String, Watched<C>>>,
}

pub(crate) struct Watched<C> {
    pub(crate) method: Option<Method>,
    pub(crate) limiter: Arc<Limiter<C>>,
}

impl<C> Clone for Watched<C> {
    fn clone(&self) -> Self {
        Self {
            method: self.method.clone(),
            limiter: Arc::clone(&self.limiter),
        }
    }
}

impl<C> Clone for Endpoints<C> {
    fn clone(&self) -> Self {
        Self {
            map: Arc::clone(&self.map),
        }
    }
}

impl<C> Default for Endpoints<C> {
    fn default() -> Self {
        Self {
            map: Arc::default(),
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
        mut make_source: impl FnMut(&str, &EndpointConfig) -> C,
    ) -> Result<Self, String> {
        config.validate()?;
        let mut eps = Self::new();
        for (path, ep) in &config.endpoints {
            let method = ep.parsed_method()?;
            let limiter = Limiter::new(make_source(path, ep))
                .with_queue_timeout(config.queue_timeout_for(ep))
                .with_max_queue(config.max_queue);
            eps = eps.watch(path.clone(), method, Arc::new(limiter));
        }
        Ok(eps)
    }

    /// Adds (or replaces) a watched path (builder form). `method`: only requests with this
    /// method are admission-controlled; `None` means every method.
    pub fn watch(
        mut self,
        path: impl Into<String>,
        method: Option<Method>,
        limiter: Arc<Limiter<C>>,
    ) -> Self {
        Arc::make_mut(&mut self.map).insert(path.into(), Watched { method, limiter });
        self
    }

    /// The limiter watching `path`.
    pub fn get(&self, path: &str) -> Option<&Arc<Limiter<C>>> {
        self.map.get(path).map(|w| &w.limiter)
    }

    /// The limiter that applies to a request, if any.
    pub(crate) fn lookup(&self, path: &str, method: &Method) -> Option<&Arc<Limiter<C>>> {
        match self.map.get(path) {
            Some(w) if w.method.as_ref().is_none_or(|m| m == method) => Some(&w.limiter),
            _ => None,
        }
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

    /// The watched paths, in no particular order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    /// A snapshot of every watched endpoint (no I/O): `{"endpoints": {"/work": {...}}}`.
    pub fn stats(&self) -> AdmissionStats {
        let endpoints = self
            .map
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
        for (path, w) in self.map.iter() {
            m.entry(path, &(&w.method, &w.limiter));
        }
        m.finish()
    }
}
