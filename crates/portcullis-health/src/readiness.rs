//! Liveness and readiness: a registry of named components with cached flags, and the
//! `GET /healthz` / `GET /readyz` routes that read them.
//!
//! This is the Kubernetes probe model (liveness: "restart me", readiness: "send me traffic")
//! with cached flags: nothing is checked while a probe request is answered. Components (the balancer, the storage, the startup prober, ...)
//! push their state into a [`Component`] handle when it changes — or a
//! [`Check`](crate::Check) loop does it for them — and a probe request only loads a few
//! atomics. A probe can therefore never hammer Redis or a backend, and it answers as long
//! as the runtime answers, which is exactly what liveness should measure.
//!
//! * `GET /healthz`: `200 {"status":"ok"}` while no component reports itself *wedged*;
//!   `503 {"status":"wedged","failing":["..."]}` otherwise.
//! * `GET /readyz`: `200 {"status":"ok"}` when every component is ready (and none wedged);
//!   `503 {"status":"not_ready","failing":["storage"]}` otherwise.
//!
//! The component list is an [`ArcSwap`] snapshot: registering is rare (startup) and
//! copy-on-write, reading is lock-free.

use arc_swap::{ArcSwap, ArcSwapOption};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use portcullis_core::HealthSource;
use serde::Serialize;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

/// The path of the liveness route.
pub const HEALTHZ_PATH: &str = "/healthz";
/// The path of the readiness route.
pub const READYZ_PATH: &str = "/readyz";

/// The cached state of one named component.
#[derive(Debug)]
struct ComponentState {
    name: Arc<str>,
    ready: AtomicBool,
    wedged: AtomicBool,
    consecutive_failures: AtomicU32,
    detail: ArcSwapOption<String>,
}

/// A handle on one component of a [`HealthRegistry`]: the component writes its state
/// through it, the probe routes read it. Cloning is cheap; clones share the state.
#[derive(Clone)]
pub struct Component {
    state: Arc<ComponentState>,
}

impl fmt::Debug for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Component")
            .field("name", &self.state.name)
            .field("ready", &self.is_ready())
            .field("wedged", &self.is_wedged())
            .finish()
    }
}

impl Component {
    /// The component's name (as listed in `failing`).
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// Marks the component ready (`true`) or not ready (`false`).
    pub fn set_ready(&self, ready: bool) {
        self.state.ready.store(ready, Ordering::Release);
    }

    /// Marks the component wedged (`true`: `/healthz` answers 503 so that the orchestrator
    /// restarts the process) or not.
    pub fn set_wedged(&self, wedged: bool) {
        self.state.wedged.store(wedged, Ordering::Release);
    }

    /// `true` when the component is ready.
    pub fn is_ready(&self) -> bool {
        self.state.ready.load(Ordering::Acquire)
    }

    /// `true` when the component reported itself wedged.
    pub fn is_wedged(&self) -> bool {
        self.state.wedged.load(Ordering::Acquire)
    }

    /// Sets a short human description of the last outcome (e.g. the last check error);
    /// `None` clears it.
    pub fn set_detail(&self, detail: Option<String>) {
        self.state.detail.store(detail.map(Arc::new));
    }

    /// The last detail set with [`set_detail`](Self::set_detail).
    pub fn detail(&self) -> Option<Arc<String>> {
        self.state.detail.load_full()
    }

    /// Consecutive failed checks, as recorded by a [`Check`](crate::Check) loop.
    pub fn consecutive_failures(&self) -> u32 {
        self.state.consecutive_failures.load(Ordering::Acquire)
    }

    pub(crate) fn set_consecutive_failures(&self, n: u32) {
        self.state.consecutive_failures.store(n, Ordering::Release);
    }
}

/// The named components whose cached flags `/healthz` and `/readyz` report.
///
/// Cheap to clone (one `Arc`); clones share the components.
///
/// ```
/// use portcullis_health::HealthRegistry;
///
/// let registry = HealthRegistry::new();
/// let storage = registry.register("storage"); // starts not ready
/// assert!(!registry.is_ready());
/// assert_eq!(registry.readiness().failing, ["storage"]);
/// storage.set_ready(true);
/// assert!(registry.is_ready() && registry.is_live());
/// ```
#[derive(Clone, Default)]
pub struct HealthRegistry {
    components: Arc<ArcSwap<Vec<Component>>>,
}

impl fmt::Debug for HealthRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.components.load().iter())
            .finish()
    }
}

/// The answer of a probe: overall status and the names of the failing components.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProbeStatus {
    /// `"ok"`, `"not_ready"` (readiness) or `"wedged"` (liveness).
    pub status: &'static str,
    /// The components that made the probe fail (omitted from JSON when empty).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failing: Vec<String>,
}

impl ProbeStatus {
    /// `true` when `status` is `"ok"`.
    pub fn is_ok(&self) -> bool {
        self.failing.is_empty()
    }

    /// The HTTP status of this answer: 200 or 503.
    pub fn http_status(&self) -> StatusCode {
        if self.is_ok() {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

impl IntoResponse for ProbeStatus {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self).unwrap_or_else(|_| b"{}".to_vec());
        (
            self.http_status(),
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                ),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            ],
            body,
        )
            .into_response()
    }
}

impl HealthRegistry {
    /// An empty registry: live and ready.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a component that starts **not ready** (e.g. startup probing, which becomes
    /// ready when it finishes). Registering a name twice returns the existing component.
    pub fn register(&self, name: impl Into<String>) -> Component {
        self.register_with(name.into(), false)
    }

    /// Registers a component that starts **ready** (e.g. a storage whose ping loop only
    /// turns it not ready after several failures). Registering a name twice
    /// returns the existing component, unchanged.
    pub fn register_ready(&self, name: impl Into<String>) -> Component {
        self.register_with(name.into(), true)
    }

    fn register_with(&self, name: String, ready: bool) -> Component {
        let mut out = None;
        self.components.rcu(|current| {
            if let Some(c) = current.iter().find(|c| c.name() == name) {
                out = Some(c.clone());
                return Arc::clone(current);
            }
            let c = Component {
                state: Arc::new(ComponentState {
                    name: name.as_str().into(),
                    ready: AtomicBool::new(ready),
                    wedged: AtomicBool::new(false),
                    consecutive_failures: AtomicU32::new(0),
                    detail: ArcSwapOption::empty(),
                }),
            };
            out = Some(c.clone());
            let mut next = Vec::with_capacity(current.len() + 1);
            next.extend(current.iter().cloned());
            next.push(c);
            Arc::new(next)
        });
        // `rcu` ran the closure at least once, so `out` is set.
        out.unwrap_or_else(|| unreachable_component(&name))
    }

    /// Removes the component named `name` (it no longer counts); `true` if it existed.
    pub fn remove(&self, name: &str) -> bool {
        let mut found = false;
        self.components.rcu(|current| {
            found = current.iter().any(|c| c.name() == name);
            Arc::new(
                current
                    .iter()
                    .filter(|c| c.name() != name)
                    .cloned()
                    .collect::<Vec<_>>(),
            )
        });
        found
    }

    /// The component named `name`, if registered.
    pub fn get(&self, name: &str) -> Option<Component> {
        self.components
            .load()
            .iter()
            .find(|c| c.name() == name)
            .cloned()
    }

    /// Every registered component, in registration order.
    pub fn components(&self) -> Vec<Component> {
        self.components.load().as_ref().clone()
    }

    /// The liveness answer: failing lists the wedged components.
    pub fn liveness(&self) -> ProbeStatus {
        let failing: Vec<String> = self
            .components
            .load()
            .iter()
            .filter(|c| c.is_wedged())
            .map(|c| c.name().to_owned())
            .collect();
        let status = if failing.is_empty() { "ok" } else { "wedged" };
        ProbeStatus { status, failing }
    }

    /// The readiness answer: failing lists the components not ready (or wedged).
    pub fn readiness(&self) -> ProbeStatus {
        let failing: Vec<String> = self
            .components
            .load()
            .iter()
            .filter(|c| !c.is_ready() || c.is_wedged())
            .map(|c| c.name().to_owned())
            .collect();
        let status = if failing.is_empty() {
            "ok"
        } else {
            "not_ready"
        };
        ProbeStatus { status, failing }
    }

    /// `true` when no component is wedged.
    pub fn is_live(&self) -> bool {
        self.components.load().iter().all(|c| !c.is_wedged())
    }

    /// `true` when every component is ready and none is wedged.
    pub fn is_ready(&self) -> bool {
        self.components
            .load()
            .iter()
            .all(|c| c.is_ready() && !c.is_wedged())
    }

    /// The `GET /healthz` and `GET /readyz` routes over this registry, to merge into any
    /// axum router (`app.merge(registry.routes())`). `HEAD` is answered too.
    pub fn routes(&self) -> Router {
        let live = self.clone();
        let ready = self.clone();
        Router::new()
            .route(
                HEALTHZ_PATH,
                get(move || std::future::ready(live.liveness())),
            )
            .route(
                READYZ_PATH,
                get(move || std::future::ready(ready.readiness())),
            )
    }
}

/// The `GET /healthz` and `GET /readyz` routes over `registry` (see
/// [`HealthRegistry::routes`]).
pub fn routes(registry: &HealthRegistry) -> Router {
    registry.routes()
}

#[cold]
fn unreachable_component(name: &str) -> Component {
    // Not reachable: `ArcSwap::rcu` always runs its closure. Kept panic-free anyway.
    Component {
        state: Arc::new(ComponentState {
            name: name.into(),
            ready: AtomicBool::new(false),
            wedged: AtomicBool::new(false),
            consecutive_failures: AtomicU32::new(0),
            detail: ArcSwapOption::empty(),
        }),
    }
}

/// The registry is ready: the admission layer may use it as its health source.
impl HealthSource for HealthRegistry {
    fn can_serve(&self) -> bool {
        self.is_ready()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_lists_failing_components_in_order() {
        let r = HealthRegistry::new();
        let a = r.register("startup");
        let b = r.register_ready("storage");
        assert_eq!(r.readiness().failing, ["startup"]);
        a.set_ready(true);
        b.set_ready(false);
        assert_eq!(r.readiness().status, "not_ready");
        assert_eq!(r.readiness().failing, ["storage"]);
        b.set_ready(true);
        assert_eq!(
            r.readiness(),
            ProbeStatus {
                status: "ok",
                failing: vec![]
            }
        );
    }

    #[test]
    fn wedged_fails_both_probes() {
        let r = HealthRegistry::new();
        let c = r.register_ready("event_loop");
        assert!(r.is_live());
        c.set_wedged(true);
        assert_eq!(r.liveness().status, "wedged");
        assert_eq!(r.liveness().failing, ["event_loop"]);
        assert!(!r.is_ready());
        assert!(!r.can_serve());
    }

    #[test]
    fn registering_twice_returns_the_same_component() {
        let r = HealthRegistry::new();
        let a = r.register("x");
        let b = r.register_ready("x");
        assert!(!b.is_ready(), "the existing component is unchanged");
        a.set_ready(true);
        assert!(b.is_ready());
        assert_eq!(r.components().len(), 1);
        assert!(r.remove("x"));
        assert!(!r.remove("x"));
        assert!(r.is_ready());
    }

    #[test]
    fn ok_body_has_no_failing_field() {
        let body = serde_json::to_string(&HealthRegistry::new().readiness()).unwrap();
        assert_eq!(body, r#"{"status":"ok"}"#);
    }
}
