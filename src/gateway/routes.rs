//! The route table: which pool serves a request, matched in order, first match wins.
//!
//! A route matches on the path (`prefix:` a string prefix, or `path:` the exact path, never
//! both), optionally on the method and on the host (the `Host` header or the URI's
//! authority, compared case-insensitively, without its port). A request that matches no
//! route goes to the pool `default`. With `strip_prefix: true` the matched prefix, less a
//! trailing `/`, is removed before the request goes upstream: prefix `/api/` sends
//! `/api/users?id=1` as `/users?id=1` and `/api/` as `/`.
//!
//! Matching is a scan of the routes with byte comparisons and no allocation; the table is
//! built once from the config, its pool names already resolved to indexes.
//!
//! On the data path ([`PoolRouter`]) each route has a branch of its own, the whole chain
//! from the admission layer down to its pool's balancer, and a last branch serves the
//! requests no route matched. The admission layers of every branch share one set of
//! watched endpoints (one limiter per endpoint path), so a watched endpoint is counted
//! once, whatever pool serves it, and a request holds one slot; each branch's health gate
//! asks its own pool, and a request waits on the readiness of its own branch only (see
//! [`PoolRouter`]). [`StripPrefix`] sits under the admission layer, so admission sees
//! the path the client sent and the upstream the stripped one. With no route configured
//! there is one branch and no router at all: a single-pool gateway serves exactly as
//! before.

use axum::body::Body;
use http::{Method, Request, Uri};
use pin_project_lite::pin_project;
use portcullis_core::ConfigError;
use serde::Deserialize;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use tower::util::Oneshot;
use tower::{Service, ServiceExt};

/// One entry of `routes:` as written in the config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The path starts with this string.
    #[serde(default)]
    pub prefix: Option<String>,
    /// The path is exactly this string.
    #[serde(default)]
    pub path: Option<String>,
    /// Only this method (any method when absent).
    #[serde(default)]
    pub method: Option<String>,
    /// Only this host, without port (any host when absent).
    #[serde(default)]
    pub host: Option<String>,
    /// The pool that serves the matched requests.
    pub pool: String,
    /// Remove the matched prefix before forwarding (only with `prefix`).
    #[serde(default)]
    pub strip_prefix: bool,
}

/// How a route compares the path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PathMatch {
    Prefix(String),
    Exact(String),
}

/// A validated route, its pool resolved.
#[derive(Debug, Clone)]
struct Route {
    path: PathMatch,
    method: Option<Method>,
    host: Option<String>,
    pool: usize,
    /// Bytes of the path to remove (0: none).
    strip: usize,
}

/// What a matched route says about a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteMatch {
    /// Index of the pool, in the order given to [`RouteTable::new`].
    pub pool: usize,
    /// How many leading bytes of the path to remove before forwarding (0: forward as is).
    pub strip: usize,
}

/// The routes of a gateway (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<Route>,
    default_pool: usize,
}

impl RouteTable {
    /// Validates `routes` against the pools named in `pools` (`default` among them) and
    /// builds the table. Errors name the field from the top of the config
    /// (`routes[1].pool`).
    pub fn new(routes: &[RouteConfig], pools: &[&str]) -> Result<Self, ConfigError> {
        let default_pool = pools.iter().position(|p| *p == "default").ok_or_else(|| {
            ConfigError::new(
                "pools",
                "there is no `default` pool (the top-level `upstreams`)",
            )
        })?;
        let routes = routes
            .iter()
            .enumerate()
            .map(|(i, r)| Route::new(r, pools).map_err(|e| e.within(&format!("routes[{i}]"))))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            routes,
            default_pool,
        })
    }

    /// The route of a request: the first route that matches, else the `default` pool with
    /// nothing stripped.
    #[inline]
    pub fn route(&self, method: &Method, uri: &Uri, host: Option<&str>) -> RouteMatch {
        match self.position(method, uri, host) {
            Some(i) => self.routes[i].target(),
            None => self.fallthrough(),
        }
    }

    /// The index of the first route that matches a request, `None` when none does.
    #[inline]
    pub fn position(&self, method: &Method, uri: &Uri, host: Option<&str>) -> Option<usize> {
        let path = uri.path();
        self.routes
            .iter()
            .position(|r| r.matches(method, path, uri, host))
    }

    /// What each route says, in order.
    pub fn targets(&self) -> impl ExactSizeIterator<Item = RouteMatch> + '_ {
        self.routes.iter().map(Route::target)
    }

    /// Where a request that matches no route goes: the pool `default`, nothing stripped.
    pub fn fallthrough(&self) -> RouteMatch {
        RouteMatch {
            pool: self.default_pool,
            strip: 0,
        }
    }

    /// The number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// `true` when no route is configured (every request goes to `default`).
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

impl Route {
    fn new(r: &RouteConfig, pools: &[&str]) -> Result<Self, ConfigError> {
        let path = match (&r.prefix, &r.path) {
            (Some(p), None) => PathMatch::Prefix(p.clone()),
            (None, Some(p)) => PathMatch::Exact(p.clone()),
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "path",
                    "give `prefix` or `path`, not both",
                ))
            }
            (None, None) => {
                return Err(ConfigError::new(
                    "prefix",
                    "a route needs a `prefix` or a `path`",
                ))
            }
        };
        let (field, text) = match &path {
            PathMatch::Prefix(p) => ("prefix", p),
            PathMatch::Exact(p) => ("path", p),
        };
        if !text.starts_with('/') {
            return Err(ConfigError::new(
                field,
                format!("`{text}` must start with `/`"),
            ));
        }
        let method = r
            .method
            .as_deref()
            .map(|m| {
                Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                    .map_err(|_| ConfigError::new("method", format!("`{m}` is not an HTTP method")))
            })
            .transpose()?;
        let host = r.host.as_ref().map(|h| h.to_ascii_lowercase());
        if host.as_deref().is_some_and(str::is_empty) {
            return Err(ConfigError::new("host", "must not be empty"));
        }
        let pool = pools.iter().position(|p| *p == r.pool).ok_or_else(|| {
            ConfigError::new(
                "pool",
                format!("no pool named `{}` (pools: {})", r.pool, pools.join(", ")),
            )
        })?;
        let strip = match (&path, r.strip_prefix) {
            (_, false) => 0,
            (PathMatch::Prefix(p), true) => p.trim_end_matches('/').len(),
            (PathMatch::Exact(_), true) => {
                return Err(ConfigError::new(
                    "strip_prefix",
                    "needs a `prefix` route (an exact `path` has no prefix to strip)",
                ))
            }
        };
        Ok(Self {
            path,
            method,
            host,
            pool,
            strip,
        })
    }

    fn target(&self) -> RouteMatch {
        RouteMatch {
            pool: self.pool,
            strip: self.strip,
        }
    }

    #[inline]
    fn matches(&self, method: &Method, path: &str, uri: &Uri, host: Option<&str>) -> bool {
        let path_ok = match &self.path {
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Exact(p) => path == p,
        };
        path_ok
            && self.method.as_ref().is_none_or(|m| m == method)
            && self.host.as_deref().is_none_or(|want| {
                host.or_else(|| uri.authority().map(|a| a.as_str()))
                    .is_some_and(|h| host_eq(h, want))
            })
    }
}

/// `have` (a `Host` value, maybe with a port) names the host `want` (lowercase, no port).
fn host_eq(have: &str, want: &str) -> bool {
    let name = match have.rsplit_once(':') {
        // A port after the last `:` (and not inside an IPv6 literal's brackets).
        Some((name, port)) if !port.contains(']') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => have,
    };
    name.eq_ignore_ascii_case(want)
}

/// `path_and_query` with the first `strip` bytes of its path removed, `/` when nothing is
/// left of the path.
pub fn strip_path(path_and_query: &str, strip: usize) -> String {
    let rest = path_and_query.get(strip..).unwrap_or("");
    if rest.is_empty() || rest.starts_with('?') {
        format!("/{rest}")
    } else {
        rest.to_owned()
    }
}

/// The data path over routes: one branch per route, in the table's order, then the
/// branch of the requests that match none (see the [module docs](self)).
///
/// A request waits on the readiness of its own branch only. Unlike tower's `Steer`, which
/// is ready when every branch is (the branch is chosen in `call`, from the request, so
/// `poll_ready` cannot know it), the router is always ready, and `call` asks the chosen
/// branch: ready at once (every branch of the gateway is), the request is called there
/// and then; not ready, that branch instance goes into the [`ResponseFuture`], which
/// drives it to ready and then calls it, and a clone takes its place for the next
/// requests. So a request for pool A never waits on pool B, and nothing is boxed or
/// locked. Dropping the future before the branch was ready drops the request unsent.
#[derive(Debug, Clone)]
pub struct PoolRouter<S> {
    table: Arc<RouteTable>,
    branches: Box<[S]>,
}

impl<S> PoolRouter<S> {
    /// Routes over `table` to `branches`: one per route, then the fallthrough branch.
    ///
    /// # Panics
    ///
    /// When there is not one branch more than the table has routes.
    pub fn new(table: Arc<RouteTable>, branches: Vec<S>) -> Self {
        assert_eq!(
            branches.len(),
            table.len() + 1,
            "one branch per route, then the fallthrough"
        );
        Self {
            table,
            branches: branches.into_boxed_slice(),
        }
    }

    /// The branch a request goes to.
    #[inline]
    fn branch(&self, req: &Request<Body>) -> usize {
        let host = req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok());
        self.table
            .position(req.method(), req.uri(), host)
            .unwrap_or(self.branches.len() - 1)
    }
}

impl<S> Service<Request<Body>> for PoolRouter<S>
where
    S: Service<Request<Body>> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S>;

    /// Always ready: readiness is the chosen branch's, asked in `call`.
    #[inline]
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> ResponseFuture<S> {
        let i = self.branch(&req);
        let branch = &mut self.branches[i];
        // Asked without a waker: a branch that is not ready is polled again, with the
        // request's own waker, by the response future.
        let mut cx = Context::from_waker(Waker::noop());
        let state = match branch.poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => State::Called {
                fut: branch.call(req),
            },
            Poll::Ready(Err(e)) => State::Failed { error: Some(e) },
            Poll::Pending => {
                // Whatever this instance's poll_ready took stays with it, in the future;
                // a fresh clone serves the next requests.
                let fresh = branch.clone();
                State::Waiting {
                    fut: std::mem::replace(branch, fresh).oneshot(req),
                }
            }
        };
        ResponseFuture { state }
    }
}

pin_project! {
    /// The response future of [`PoolRouter`]: the chosen branch's own, or that branch
    /// driven to ready and then called (see [`PoolRouter`]).
    pub struct ResponseFuture<S: Service<Request<Body>>> {
        #[pin]
        state: State<S>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S: Service<Request<Body>>> {
        /// The branch was ready: its response future.
        Called { #[pin] fut: S::Future },
        /// The branch was not ready: it is driven to ready, then called.
        Waiting { #[pin] fut: Oneshot<S, Request<Body>> },
        /// The branch failed its readiness (taken once).
        Failed { error: Option<S::Error> },
    }
}

impl<S: Service<Request<Body>>> std::fmt::Debug for ResponseFuture<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Called { .. } => "called",
            State::Waiting { .. } => "waiting for its branch",
            State::Failed { .. } => "failed",
        };
        f.debug_tuple("ResponseFuture").field(&state).finish()
    }
}

impl<S: Service<Request<Body>>> Future for ResponseFuture<S> {
    type Output = Result<S::Response, S::Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Called { fut } => fut.poll(cx),
            StateProj::Waiting { fut } => fut.poll(cx),
            StateProj::Failed { error } => match error.take() {
                Some(e) => Poll::Ready(Err(e)),
                None => panic!("ResponseFuture polled after it completed"),
            },
        }
    }
}

/// Removes the first `strip` bytes of the request's path (a route's `strip_prefix`)
/// before `inner` sees it; `0` passes the request as it is.
#[derive(Debug, Clone)]
pub struct StripPrefix<S> {
    inner: S,
    strip: usize,
}

impl<S> StripPrefix<S> {
    /// Strips `strip` bytes (see [`RouteMatch::strip`]).
    pub fn new(inner: S, strip: usize) -> Self {
        Self { inner, strip }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S> Service<Request<Body>> for StripPrefix<S>
where
    S: Service<Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> S::Future {
        if self.strip > 0 {
            *req.uri_mut() = stripped_uri(req.uri(), self.strip);
        }
        self.inner.call(req)
    }
}

/// `uri` with the first `strip` bytes of its path removed (scheme and authority kept).
fn stripped_uri(uri: &Uri, strip: usize) -> Uri {
    let pq = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut parts = uri.clone().into_parts();
    // A valid path and query less a prefix of its path is still valid.
    match strip_path(pq, strip).parse() {
        Ok(pq) => parts.path_and_query = Some(pq),
        Err(_) => return uri.clone(),
    }
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(yaml: &str) -> Vec<RouteConfig> {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    const POOLS: &[&str] = &["default", "gpu", "cpu"];

    fn table() -> RouteTable {
        RouteTable::new(
            &routes(
                "- {prefix: /v1/chat/, pool: gpu}\n\
                 - {path: /v1/embed, method: POST, pool: cpu}\n\
                 - {prefix: /api/, pool: cpu, strip_prefix: true}\n\
                 - {prefix: /, host: Admin.Example, pool: gpu}\n",
            ),
            POOLS,
        )
        .unwrap()
    }

    fn route(t: &RouteTable, method: Method, uri: &str, host: Option<&str>) -> RouteMatch {
        t.route(&method, &uri.parse().unwrap(), host)
    }

    #[test]
    fn first_match_wins_and_the_rest_goes_to_default() {
        let t = table();
        let m = |pool, strip| RouteMatch { pool, strip };
        assert_eq!(
            route(&t, Method::GET, "/v1/chat/completions", None),
            m(1, 0)
        );
        assert_eq!(route(&t, Method::POST, "/v1/embed", None), m(2, 0));
        assert_eq!(route(&t, Method::GET, "/v1/embed", None), m(0, 0), "method");
        assert_eq!(
            route(&t, Method::POST, "/v1/embed/x", None),
            m(0, 0),
            "exact path"
        );
        assert_eq!(route(&t, Method::GET, "/api/users?id=1", None), m(2, 4));
        assert_eq!(
            route(&t, Method::GET, "/v1/chat", None),
            m(0, 0),
            "prefix is a string"
        );
        assert_eq!(
            route(&t, Method::GET, "/other", Some("admin.example:8080")),
            m(1, 0)
        );
        assert_eq!(
            route(&t, Method::GET, "/other", Some("ADMIN.example")),
            m(1, 0)
        );
        assert_eq!(
            route(&t, Method::GET, "/other", Some("other.example")),
            m(0, 0)
        );
        assert_eq!(
            route(&t, Method::GET, "http://admin.example/x", None),
            m(1, 0)
        );
        assert_eq!(
            t.targets().collect::<Vec<_>>(),
            [m(1, 0), m(2, 0), m(2, 4), m(1, 0)]
        );
        assert_eq!(
            t.position(&Method::GET, &"/none".parse().unwrap(), None),
            None
        );
        assert_eq!(t.fallthrough(), m(0, 0));
    }

    #[tokio::test]
    async fn the_router_sends_each_request_to_its_routes_branch() {
        use tower::ServiceExt;
        let t = Arc::new(table());
        let branches = (0..=t.len())
            .map(|i| {
                tower::service_fn(move |req: Request<Body>| async move {
                    Ok::<_, std::convert::Infallible>(format!("{i} {}", req.uri()))
                })
            })
            .collect();
        let router = PoolRouter::new(t, branches);
        let send = |method: Method, uri: &str, host: Option<&str>| {
            let mut req = Request::builder().method(method).uri(uri);
            if let Some(h) = host {
                req = req.header("host", h);
            }
            router.clone().oneshot(req.body(Body::empty()).unwrap())
        };
        assert_eq!(
            send(Method::GET, "/v1/chat/x", None).await.unwrap(),
            "0 /v1/chat/x"
        );
        assert_eq!(
            send(Method::POST, "/v1/embed", None).await.unwrap(),
            "1 /v1/embed"
        );
        assert_eq!(send(Method::GET, "/api/u", None).await.unwrap(), "2 /api/u");
        assert_eq!(
            send(Method::GET, "/x", Some("admin.example"))
                .await
                .unwrap(),
            "3 /x"
        );
        assert_eq!(send(Method::GET, "/x", None).await.unwrap(), "4 /x");
        let strip = StripPrefix::new(
            tower::service_fn(|req: Request<Body>| async move {
                Ok::<_, std::convert::Infallible>(req.uri().to_string())
            }),
            4,
        );
        let req = Request::get("/api/users?id=1").body(Body::empty()).unwrap();
        assert_eq!(strip.oneshot(req).await.unwrap(), "/users?id=1");
    }

    /// A branch that is not ready until `open` is set, and wakes the request waiting on it
    /// then; it answers its name.
    #[derive(Clone)]
    struct Gate {
        name: &'static str,
        open: Arc<std::sync::atomic::AtomicBool>,
        waiter: Arc<std::sync::Mutex<Option<Waker>>>,
        polls: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Gate {
        fn new(name: &'static str, open: bool) -> Self {
            Self {
                name,
                open: Arc::new(open.into()),
                waiter: Arc::default(),
                polls: Arc::default(),
            }
        }

        fn open(&self) {
            self.open.store(true, std::sync::atomic::Ordering::SeqCst);
            if let Some(w) = self.waiter.lock().unwrap().take() {
                w.wake();
            }
        }
    }

    impl Service<Request<Body>> for Gate {
        type Response = &'static str;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<&'static str, Self::Error>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            self.polls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self.open.load(std::sync::atomic::Ordering::SeqCst) {
                return Poll::Ready(Ok(()));
            }
            *self.waiter.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }

        fn call(&mut self, _req: Request<Body>) -> Self::Future {
            std::future::ready(Ok(self.name))
        }
    }

    #[tokio::test]
    async fn a_request_waits_on_its_own_branch_only() {
        use futures_util::FutureExt;
        let t =
            Arc::new(RouteTable::new(&routes("- {prefix: /gpu/, pool: gpu}\n"), POOLS).unwrap());
        let (gpu, web) = (Gate::new("gpu", false), Gate::new("web", true));
        let mut router = PoolRouter::new(t, vec![gpu.clone(), web.clone()]);
        let get = |path: &str| Request::get(path).body(Body::empty()).unwrap();

        // The router is ready although the pool gpu's branch is not.
        assert!(router.ready().now_or_never().is_some());
        let mut waiting = router.call(get("/gpu/x"));
        assert!((&mut waiting).now_or_never().is_none(), "gpu is not ready");
        // Requests to the ready pool are served at once, on the same router, while the
        // gpu request waits; the web branch is polled once per request, never gpu's.
        let gpu_polls = gpu.polls.load(std::sync::atomic::Ordering::SeqCst);
        for _ in 0..3 {
            assert!(router.ready().now_or_never().is_some());
            let answer = router.call(get("/other")).now_or_never();
            assert_eq!(answer.map(Result::unwrap), Some("web"));
        }
        assert_eq!(
            gpu.polls.load(std::sync::atomic::Ordering::SeqCst),
            gpu_polls
        );
        assert_eq!(web.polls.load(std::sync::atomic::Ordering::SeqCst), 3);

        // Once gpu is ready, its waiting request is woken and served.
        let opener = gpu.clone();
        tokio::spawn(async move { opener.open() });
        let answer = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the gpu request is woken");
        assert_eq!(answer.unwrap(), "gpu");
        assert_eq!(router.call(get("/gpu/y")).await.unwrap(), "gpu");
    }

    #[test]
    fn strip_prefix_keeps_a_leading_slash_and_the_query() {
        let uri: Uri = "http://h:1/api/users?id=1".parse().unwrap();
        assert_eq!(stripped_uri(&uri, 4), "http://h:1/users?id=1");
        let uri: Uri = "/api".parse().unwrap();
        assert_eq!(stripped_uri(&uri, 4), "/");
        assert_eq!(strip_path("/api/users?id=1", 4), "/users?id=1");
        assert_eq!(strip_path("/api/", 4), "/");
        assert_eq!(strip_path("/api", 4), "/");
        assert_eq!(strip_path("/api?x=1", 4), "/?x=1");
    }

    #[test]
    fn bad_routes_name_their_field() {
        let err = |yaml: &str| RouteTable::new(&routes(yaml), POOLS).unwrap_err().field;
        assert_eq!(
            err("- {prefix: /a, pool: gpu}\n- {prefix: /b, pool: tpu}\n"),
            "routes[1].pool"
        );
        assert_eq!(err("- {pool: gpu}\n"), "routes[0].prefix");
        assert_eq!(
            err("- {prefix: /a, path: /b, pool: gpu}\n"),
            "routes[0].path"
        );
        assert_eq!(err("- {prefix: a, pool: gpu}\n"), "routes[0].prefix");
        assert_eq!(
            err("- {path: /a, method: 'G T', pool: gpu}\n"),
            "routes[0].method"
        );
        assert_eq!(
            err("- {path: /a, strip_prefix: true, pool: gpu}\n"),
            "routes[0].strip_prefix"
        );
        assert_eq!(
            err("- {prefix: /a, host: '', pool: gpu}\n"),
            "routes[0].host"
        );
        assert!(
            serde_yaml_ng::from_str::<Vec<RouteConfig>>("- {prefix: /a, pool: x, to: y}\n")
                .is_err()
        );
        assert_eq!(
            RouteTable::new(&[], &["gpu"]).unwrap_err().field,
            "pools",
            "the top-level upstreams are the pool `default`"
        );
    }
}
