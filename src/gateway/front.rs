//! The first decision about a request: an operator route, or the data path.
//!
//! The operator routes (`/healthz`, `/readyz`, `/metrics`, `/balancer/...`, the dashboard)
//! live in an axum [`Router`]; proxied requests do not need one. [`App`] therefore looks at
//! the path once: a path that starts with one of the operator prefixes goes to the router
//! (whose fallback is the data path, so a path that only looks like an operator route, such
//! as `/balancer-x` or `/healthz/deep`, still reaches the upstream exactly as before), and
//! every other path goes straight to the data-path service, with no route lookup, no
//! per-request clone of a boxed service and no second boxed future.
//!
//! Every request, operator or data path, also gets its request id here, and its access log
//! line and span when those are on (see [`super::access_log`]).
//!
//! A config reload swaps the router and the data path as a whole ([`App::swap`]): every
//! clone of the app, and every open connection, serves its next request with the new pair
//! (a connection notices the swap by one atomic load per request), while requests already
//! dispatched finish on the pair they started with.
//!
//! The per-connection half (`AppConn`) keeps one clone of the data-path service (until the
//! next swap) and calls it in place: `poll_ready` then `call` on the same instance, as
//! tower's contract asks (the breaker decides a request's route in `poll_ready`). Should that
//! `poll_ready` ever not be ready at once, the request waits on a fresh clone instead
//! (`oneshot`), as the router would.

use super::access_log::{self, AccessLog, Pending};
use super::app::GatewayService;
use super::tls::TlsTerminator;
use arc_swap::ArcSwap;
use axum::body::Body;
use axum::Router;
use http::{Request, Response};
use pin_project_lite::pin_project;
use std::cell::RefCell;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use tower::util::Oneshot;
use tower::{Service, ServiceExt};

/// What a server serves: an axum router, or the gateway's router plus its data path behind
/// one path check (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct App {
    live: Arc<Live>,
    tls: Option<TlsTerminator>,
    access_log: Option<AccessLog>,
}

/// The router and data path in force, shared by every clone of an [`App`].
#[derive(Debug)]
struct Live {
    /// Bumped after every swap of `parts`: a connection compares it with the generation
    /// it cached to know when to reload its clones.
    generation: AtomicU64,
    parts: ArcSwap<Parts>,
}

/// What one config builds: the router and the data path.
#[derive(Debug, Clone)]
struct Parts {
    router: Router,
    data: Option<DataPath>,
}

impl Live {
    fn new(parts: Parts) -> Arc<Self> {
        Arc::new(Self {
            generation: AtomicU64::new(0),
            parts: ArcSwap::from_pointee(parts),
        })
    }
}

#[derive(Debug, Clone)]
struct DataPath {
    service: GatewayService,
    /// A path starting with one of these may be an operator route.
    operator_prefixes: Arc<[Box<str>]>,
}

impl From<Router> for App {
    /// Every request goes through `router`.
    fn from(router: Router) -> Self {
        Self {
            live: Live::new(Parts { router, data: None }),
            tls: None,
            access_log: None,
        }
    }
}

impl App {
    /// `router` for the paths that start with one of `operator_prefixes`, `data` for every
    /// other. `router` must send what it does not match to `data` (its fallback), and the
    /// prefixes must cover every route of `router`.
    pub fn with_data_path(
        router: Router,
        data: GatewayService,
        operator_prefixes: impl IntoIterator<Item = String>,
    ) -> Self {
        Self {
            live: Live::new(Parts::new(router, data, operator_prefixes)),
            tls: None,
            access_log: None,
        }
    }

    /// Serves `router` and `data` (as [`with_data_path`](Self::with_data_path) takes them)
    /// from now on, in every clone of this app and on every open connection, from its next
    /// request. Requests already dispatched finish where they started. The TLS
    /// termination and the access log stay.
    pub fn swap(
        &self,
        router: Router,
        data: GatewayService,
        operator_prefixes: impl IntoIterator<Item = String>,
    ) {
        self.live
            .parts
            .store(Arc::new(Parts::new(router, data, operator_prefixes)));
        self.live.generation.fetch_add(1, Ordering::Release);
    }

    /// The same app with an access log line for every request.
    pub fn with_access_log(mut self, log: AccessLog) -> Self {
        self.access_log = Some(log);
        self
    }

    /// The access log, when `access_log.enable` is set.
    pub fn access_log(&self) -> Option<&AccessLog> {
        self.access_log.as_ref()
    }

    /// The same app served over TLS: the servers run `tls`'s handshake on every accepted
    /// connection first.
    pub fn with_tls(mut self, tls: TlsTerminator) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The TLS termination of the listener, when `tls:` is configured.
    pub fn tls(&self) -> Option<&TlsTerminator> {
        self.tls.as_ref()
    }

    /// Serves `router` for every request from now on (an app without a data path, such as
    /// the admin listener's), as [`swap`](Self::swap) does.
    pub fn swap_router(&self, router: Router) {
        self.live
            .parts
            .store(Arc::new(Parts { router, data: None }));
        self.live.generation.fetch_add(1, Ordering::Release);
    }

    /// The router in force (operator routes, with the data path as its fallback).
    pub fn router(&self) -> Router {
        self.live.parts.load().router.clone()
    }

    /// The state one connection serves its requests with.
    pub(crate) fn connection(&self) -> AppConn {
        AppConn {
            access_log: self.access_log.as_ref().map(AccessLog::for_connection),
            live: Arc::clone(&self.live),
            parts: RefCell::new(ConnParts::current(&self.live)),
        }
    }
}

impl Parts {
    fn new(
        router: Router,
        data: GatewayService,
        operator_prefixes: impl IntoIterator<Item = String>,
    ) -> Self {
        let prefixes: Vec<Box<str>> = operator_prefixes.into_iter().map(Into::into).collect();
        Self {
            router,
            data: Some(DataPath {
                service: data,
                operator_prefixes: prefixes.into(),
            }),
        }
    }
}

/// One connection's [`App`].
#[derive(Debug)]
pub(crate) struct AppConn {
    live: Arc<Live>,
    /// Borrowed only inside `call`, never across an await.
    parts: RefCell<ConnParts>,
    access_log: Option<AccessLog>,
}

/// A connection's clones of the [`Parts`] of one generation.
#[derive(Debug)]
struct ConnParts {
    generation: u64,
    router: Router,
    data: Option<ConnData>,
}

#[derive(Debug)]
struct ConnData {
    service: GatewayService,
    operator_prefixes: Arc<[Box<str>]>,
}

impl ConnParts {
    /// Clones of the parts in force. The generation is read first: a swap that lands in
    /// between is seen again at the next request, never missed.
    fn current(live: &Live) -> Self {
        let generation = live.generation.load(Ordering::Acquire);
        let parts = live.parts.load();
        Self {
            generation,
            router: parts.router.clone(),
            data: parts.data.as_ref().map(|d| ConnData {
                service: d.service.clone(),
                operator_prefixes: Arc::clone(&d.operator_prefixes),
            }),
        }
    }
}

impl AppConn {
    /// Dispatches `req`, with its request id (and its access log record, when on).
    pub(crate) fn call(&self, mut req: Request<Body>) -> AppFuture {
        let request_id = access_log::request_id(&mut req);
        let pending = Pending::start(self.access_log.as_ref(), &mut req, &request_id);
        AppFuture {
            inner: self.dispatch(req),
            request_id,
            pending,
        }
    }

    fn dispatch(&self, req: Request<Body>) -> Dispatch {
        let mut parts = self.parts.borrow_mut();
        if parts.generation != self.live.generation.load(Ordering::Acquire) {
            *parts = ConnParts::current(&self.live);
        }
        let parts = &mut *parts;
        let data = match &mut parts.data {
            Some(d) if !d.is_operator_path(req.uri().path()) => d,
            _ => {
                return Dispatch::Router {
                    fut: parts.router.clone().call(req),
                }
            }
        };
        let service = &mut data.service;
        let mut cx = Context::from_waker(Waker::noop());
        match service.poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => Dispatch::Data {
                fut: service.call(req),
            },
            Poll::Ready(Err(never)) => match never {},
            Poll::Pending => {
                // Not ready at once: leave this instance (and any state its poll_ready
                // took) for a fresh clone, and wait on one of our own.
                let fresh = service.clone();
                let waiting = std::mem::replace(service, fresh);
                Dispatch::Waiting {
                    fut: waiting.oneshot(req),
                }
            }
        }
    }
}

impl ConnData {
    fn is_operator_path(&self, path: &str) -> bool {
        self.operator_prefixes
            .iter()
            .any(|p| path.starts_with(&**p))
    }
}

type DataFuture = <GatewayService as Service<Request<Body>>>::Future;

pin_project! {
    /// Where [`AppConn::call`] sent the request.
    #[project = DispatchProj]
    enum Dispatch {
        Router { #[pin] fut: axum::routing::future::RouteFuture<Infallible> },
        Data { fut: DataFuture },
        Waiting { #[pin] fut: Oneshot<GatewayService, Request<Body>> },
    }
}

impl Future for Dispatch {
    type Output = Response<Body>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response<Body>> {
        let out = match self.project() {
            DispatchProj::Router { fut } => ready!(fut.poll(cx)),
            DispatchProj::Data { fut } => ready!(fut.as_mut().poll(cx)),
            DispatchProj::Waiting { fut } => ready!(fut.poll(cx)),
        };
        Poll::Ready(match out {
            Ok(r) => r,
            Err(never) => match never {},
        })
    }
}

pin_project! {
    /// The response future of [`AppConn::call`]: the response gets the request id (and a
    /// rejection's body its `request_id`); with the access log or the span on, it runs in
    /// the request's span and its body writes the line when it ends.
    pub(crate) struct AppFuture {
        #[pin]
        inner: Dispatch,
        request_id: http::HeaderValue,
        pending: Option<Pending>,
    }

    impl PinnedDrop for AppFuture {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before the response: the client went away.
            if let Some(pending) = this.project().pending.take() {
                pending.abandoned();
            }
        }
    }
}

impl Future for AppFuture {
    type Output = Response<Body>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response<Body>> {
        let this = self.project();
        let mut resp = {
            let _entered = this
                .pending
                .as_ref()
                .and_then(Pending::span)
                .map(tracing::Span::enter);
            ready!(this.inner.poll(cx))
        };
        let error = access_log::stamp_response(&mut resp, this.request_id);
        Poll::Ready(match this.pending.take() {
            Some(pending) => pending.respond(resp, error),
            None => resp,
        })
    }
}
