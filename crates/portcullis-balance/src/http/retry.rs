//! [`RetryingHttpBalance`]: the HTTP balancer that sends a failed attempt again to another
//! replica of the same pool (see [`crate::retry`] for what is retried and the budget).
//!
//! ```text
//! call ─ deposit in the budget ─ pick ─ send ──┬─ response ──────────────────────────── done
//!                                              ├─ 502/503, replayable, retry allowed ─┐
//!                                              └─ NotSent, retry allowed ─────────────┤
//!                       pick another replica (not tried), withdraw from the budget ◀──┘
//! ```
//!
//! A failed attempt's outcome is recorded on its replica first (passive ejection counts a
//! connect failure like any other), and its in-flight slot is released before the next
//! replica is picked. Everything happens inside one response future, so the layers above
//! (admission) see one request: a retried request holds one admission slot.

use super::BalanceBody;
use crate::guard::InflightGuard;
use crate::registry::ReplicaRegistry;
use crate::replica::Replica;
use crate::retry::{is_idempotent, NotSent, ReplayBody, Retries};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use portcullis_core::{Rejection, RejectionBody};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tower_http::classify::{
    ClassifiedResponse, ClassifyResponse, MakeClassifier, ServerErrorsAsFailures, SharedClassifier,
};
use tower_service::Service;

/// An [`HttpBalance`](super::HttpBalance) that retries.
///
/// The proxy `P: Service<(T, Request<B>)>` answers every failure that reached the upstream
/// as a response (502, 504, ...) and fails with [`NotSent`], which hands the request back,
/// only when nothing of the request was sent. Such a request is sent to another healthy
/// replica, whatever its method; a request carrying a [`ReplayBody`] with an idempotent
/// method is also sent again after a 502/503 when [`Retries::on_server_errors`]. Each retry
/// goes to a replica not yet tried, within `max_attempts` and the pool's budget. When no
/// retry is possible a `NotSent` is answered 502 `bad_gateway` (JSON, or gRPC
/// trailers-only for a gRPC request) and a 5xx is passed on as it came.
///
/// With no usable replica at all it answers 503 `no_healthy_upstream`, as `HttpBalance`.
///
/// # Example
///
/// ```
/// use bytes::Bytes;
/// use http::{Request, Response, StatusCode};
/// use portcullis_balance::retry::{NotSent, Retries, RetryConfig};
/// use portcullis_balance::{Config, ReplicaRegistry, RetryingHttpBalance, Tier};
/// use std::sync::Arc;
/// use tower::{service_fn, Service, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let config = Config {
///     routing_strategy: portcullis_balance::RoutingStrategy::FirstHealthy,
///     ..Config::default()
/// };
/// let registry = ReplicaRegistry::new(&config);
/// registry.add("down", Tier::Primary, "down");
/// registry.add("up", Tier::Primary, "up");
/// // "down" refuses every connection: the request comes back unsent.
/// let proxy = service_fn(|(name, req): (&'static str, Request<Bytes>)| async move {
///     if name == "down" {
///         return Err(NotSent::new(req, "connection refused"));
///     }
///     Ok(Response::new(format!("served by {name}")))
/// });
/// let retries = Arc::new(Retries::new(&RetryConfig::default()));
/// let mut balance = RetryingHttpBalance::new(proxy, registry, retries.clone());
/// let resp = balance.ready().await.unwrap().call(Request::new(Bytes::new())).await.unwrap();
/// assert_eq!(resp.status(), StatusCode::OK);
/// assert_eq!(retries.counts().retries, 1);
/// # }
/// ```
pub struct RetryingHttpBalance<P, T, M = SharedClassifier<ServerErrorsAsFailures>> {
    proxy: P,
    registry: ReplicaRegistry<T>,
    classifier: M,
    retries: Arc<Retries>,
}

impl<P, T> RetryingHttpBalance<P, T> {
    /// Balances over `registry` through `proxy`, retrying by `retries` (the pool's policy,
    /// budget and counters); 5xx responses and errors count as failures.
    pub fn new(proxy: P, registry: ReplicaRegistry<T>, retries: Arc<Retries>) -> Self {
        Self {
            proxy,
            registry,
            classifier: SharedClassifier::new(ServerErrorsAsFailures::new()),
            retries,
        }
    }
}

impl<P, T, M> RetryingHttpBalance<P, T, M> {
    /// Uses `classifier` to decide which responses are failures (passive ejection).
    pub fn with_classifier<M2>(self, classifier: M2) -> RetryingHttpBalance<P, T, M2> {
        RetryingHttpBalance {
            proxy: self.proxy,
            registry: self.registry,
            classifier,
            retries: self.retries,
        }
    }

    /// The registry.
    pub fn registry(&self) -> &ReplicaRegistry<T> {
        &self.registry
    }

    /// The pool's retry policy and counters.
    pub fn retries(&self) -> &Arc<Retries> {
        &self.retries
    }

    /// The inner proxy service.
    pub fn get_ref(&self) -> &P {
        &self.proxy
    }

    /// The inner proxy service, mutably.
    pub fn get_mut(&mut self) -> &mut P {
        &mut self.proxy
    }

    /// Consumes the balancer and returns the inner proxy service.
    pub fn into_inner(self) -> P {
        self.proxy
    }
}

impl<P: Clone, T, M: Clone> Clone for RetryingHttpBalance<P, T, M> {
    fn clone(&self) -> Self {
        Self {
            proxy: self.proxy.clone(),
            registry: self.registry.clone(),
            classifier: self.classifier.clone(),
            retries: Arc::clone(&self.retries),
        }
    }
}

impl<P: fmt::Debug, T, M: fmt::Debug> fmt::Debug for RetryingHttpBalance<P, T, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryingHttpBalance")
            .field("proxy", &self.proxy)
            .field("registry", &self.registry)
            .field("classifier", &self.classifier)
            .field("retries", &self.retries)
            .finish()
    }
}

/// The response of a [`RetryingHttpBalance`] (the same body type as `HttpBalance`'s).
pub type RetryingResponse<ResB, Eos, T> = Response<RejectionBody<BalanceBody<ResB, Eos, T>>>;

impl<P, T, M, B, ResB> Service<Request<B>> for RetryingHttpBalance<P, T, M>
where
    P: Service<(T, Request<B>), Response = Response<ResB>, Error = NotSent<B>> + Clone,
    M: MakeClassifier + Clone,
    T: Clone,
    B: From<Bytes>,
{
    type Response = RetryingResponse<ResB, M::ClassifyEos, T>;
    type Error = Infallible;
    type Future = RetryResponseFuture<P, P::Future, M, M::Classifier, M::ClassifyEos, T, B, ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // A proxy that cannot take requests fails each of them with `NotSent` instead: the
        // readiness error has no request to hand back.
        let _ = ready!(self.proxy.poll_ready(cx));
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        self.retries.deposit();
        let replay = Replay::of(&req, &self.retries);
        let attempts = Attempts {
            registry: self.registry.clone(),
            retries: Arc::clone(&self.retries),
            tried: Vec::new(),
            sent: 1,
            replay,
        };
        let state = match self.registry.pick() {
            Ok(guard) => State::Sending {
                classifier: Some(self.classifier.make_classifier(&req)),
                future: self.proxy.call((guard.target().clone(), req)),
                guard: Some(guard),
            },
            Err(_) => {
                tracing::debug!(uri = %req.uri(), "no healthy upstream");
                let rejection =
                    Rejection::no_healthy_upstream().with_retry_after(self.registry.retry_after());
                State::Done {
                    response: Some(rejection.to_response(req.headers())),
                }
            }
        };
        // The clone sends the retries; `self.proxy` was made ready for this call only.
        let proxy = self.proxy.clone();
        RetryResponseFuture {
            state,
            proxy,
            make_classifier: self.classifier.clone(),
            attempts,
        }
    }
}

/// What a request needs to be sent again after a 5xx: its head and its buffered body.
struct Replay {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
    extensions: http::Extensions,
    body: Bytes,
}

impl Replay {
    /// The replay copy of `req`: only with `on: [5xx]`, an idempotent method and a
    /// [`ReplayBody`] (the caller buffered the body).
    fn of<B>(req: &Request<B>, retries: &Retries) -> Option<Box<Self>> {
        if !retries.on_server_errors() || !is_idempotent(req.method()) {
            return None;
        }
        let ReplayBody(body) = req.extensions().get::<ReplayBody>()?;
        Some(Box::new(Self {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
            extensions: req.extensions().clone(),
            body: body.clone(),
        }))
    }

    fn request<B: From<Bytes>>(&self) -> Request<B> {
        let mut req = Request::new(B::from(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        *req.extensions_mut() = self.extensions.clone();
        req
    }
}

/// The attempts of one request: the replicas tried, how many were sent, the replay copy.
struct Attempts<T> {
    registry: ReplicaRegistry<T>,
    retries: Arc<Retries>,
    tried: Vec<Arc<Replica<T>>>,
    sent: u32,
    /// Boxed: most requests have none, and the response future stays small.
    replay: Option<Box<Replay>>,
}

impl<T> Attempts<T> {
    /// The replica of the next attempt after `failed` (whose outcome is already recorded;
    /// its slot is released here), or `None`: attempts used up, no other healthy replica,
    /// or the budget spent (counted).
    fn next(&mut self, failed: InflightGuard<T>) -> Option<InflightGuard<T>> {
        self.tried.push(Arc::clone(failed.replica()));
        drop(failed);
        if self.sent >= self.retries.max_attempts() {
            return None;
        }
        let next = self.registry.pick_excluding(&self.tried).ok()?;
        if !self.retries.try_withdraw() {
            tracing::debug!("retry budget exhausted");
            return None;
        }
        self.sent += 1;
        Some(next)
    }
}

/// A status after which a replayable request is sent again (`retry.on: [5xx]`).
fn is_retryable_status(status: StatusCode) -> bool {
    status == StatusCode::BAD_GATEWAY || status == StatusCode::SERVICE_UNAVAILABLE
}

pin_project! {
    /// The response future of [`RetryingHttpBalance`]: every attempt of one request.
    ///
    /// Dropping it drops the attempt in flight (and its replica's slot); a retry is only
    /// decided when an attempt has ended, so cancelling never leaves a retry behind.
    pub struct RetryResponseFuture<P, F, M, C, Eos, T, B, ResB> {
        #[pin]
        state: State<F, C, Eos, T, B, ResB>,
        proxy: P,
        make_classifier: M,
        attempts: Attempts<T>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, C, Eos, T, B, ResB> {
        /// An attempt is in flight on `guard`'s replica.
        Sending {
            #[pin]
            future: F,
            classifier: Option<C>,
            guard: Option<InflightGuard<T>>,
        },
        /// A retry waits for the proxy to be ready.
        Resending {
            request: Option<Request<B>>,
            guard: Option<InflightGuard<T>>,
        },
        /// The answer is known.
        Done {
            response: Option<RetryingResponse<ResB, Eos, T>>,
        },
    }
}

impl<P, F, M, C, Eos, T, B, ResB> fmt::Debug for RetryResponseFuture<P, F, M, C, Eos, T, B, ResB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryResponseFuture")
            .field("sent", &self.attempts.sent)
            .finish_non_exhaustive()
    }
}

const POLLED_AFTER_COMPLETION: &str = "RetryResponseFuture polled after completion";

impl<P, M, T, B, ResB> Future
    for RetryResponseFuture<P, P::Future, M, M::Classifier, M::ClassifyEos, T, B, ResB>
where
    P: Service<(T, Request<B>), Response = Response<ResB>, Error = NotSent<B>>,
    M: MakeClassifier,
    T: Clone,
    B: From<Bytes>,
{
    type Output = Result<RetryingResponse<ResB, M::ClassifyEos, T>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let next = match this.state.as_mut().project() {
                StateProj::Done { response } => {
                    return Poll::Ready(Ok(response.take().expect(POLLED_AFTER_COMPLETION)));
                }
                StateProj::Resending { request, guard } => {
                    let ready = ready!(this.proxy.poll_ready(cx));
                    let req = request.take().expect(POLLED_AFTER_COMPLETION);
                    let guard = guard.take().expect(POLLED_AFTER_COMPLETION);
                    match ready {
                        Ok(()) => State::Sending {
                            classifier: Some(this.make_classifier.make_classifier(&req)),
                            future: this.proxy.call((guard.target().clone(), req)),
                            guard: Some(guard),
                        },
                        Err(_) => State::Done {
                            response: Some(Rejection::bad_gateway().to_response(req.headers())),
                        },
                    }
                }
                StateProj::Sending {
                    future,
                    classifier,
                    guard,
                } => {
                    let out = ready!(future.poll(cx));
                    let classifier = classifier.take().expect(POLLED_AFTER_COMPLETION);
                    let mut guard = guard.take().expect(POLLED_AFTER_COMPLETION);
                    match out {
                        Ok(resp) => {
                            if is_retryable_status(resp.status()) {
                                if let Some(request) =
                                    this.attempts.replay.as_deref().map(Replay::request)
                                {
                                    guard.record(false);
                                    match this.attempts.next(guard) {
                                        Some(next) => {
                                            tracing::debug!(status = %resp.status(), "retrying after a 5xx");
                                            drop(resp);
                                            this.state.set(State::Resending {
                                                request: Some(request),
                                                guard: Some(next),
                                            });
                                            continue;
                                        }
                                        // The failure is recorded; the body no longer holds
                                        // the tried replica's slot.
                                        None => {
                                            return Poll::Ready(Ok(pass_on(resp, classifier, None)))
                                        }
                                    }
                                }
                            }
                            return Poll::Ready(Ok(pass_on(resp, classifier, Some(guard))));
                        }
                        Err(not_sent) => {
                            tracing::debug!(error = %not_sent, "upstream connect failed");
                            let req = not_sent.into_request();
                            guard.record(false);
                            match this.attempts.next(guard) {
                                Some(next) => State::Resending {
                                    request: Some(req),
                                    guard: Some(next),
                                },
                                None => State::Done {
                                    response: Some(
                                        Rejection::bad_gateway().to_response(req.headers()),
                                    ),
                                },
                            }
                        }
                    }
                }
            };
            this.state.set(next);
        }
    }
}

/// The response as `HttpBalance` passes it on: classified, its body holding `guard`'s slot
/// until it ends. Without a guard (its outcome already recorded) the body is passed through.
fn pass_on<ResB, C: ClassifyResponse, T>(
    resp: Response<ResB>,
    classifier: C,
    guard: Option<InflightGuard<T>>,
) -> RetryingResponse<ResB, C::ClassifyEos, T> {
    match guard {
        Some(mut guard) => {
            let eos = match classifier.classify_response(&resp) {
                ClassifiedResponse::Ready(class) => {
                    guard.record(class.is_ok());
                    None
                }
                ClassifiedResponse::RequiresEos(eos) => Some(eos),
            };
            resp.map(|b| RejectionBody::inner(BalanceBody::new(b, guard, eos)))
        }
        None => resp.map(|b| RejectionBody::inner(BalanceBody::unguarded(b))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retry::RetryConfig;
    use crate::{Config, RoutingStrategy, Tier};
    use http_body_util::Full;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tower::{service_fn, ServiceExt};

    /// Replicas "down" (refuses: `NotSent`), "busy" (503) and "up" (200), first-healthy in
    /// that order; each call is counted per replica.
    fn pool(
        names: &[&'static str],
        eject_after: u32,
    ) -> (ReplicaRegistry<&'static str>, Arc<[AtomicU32; 3]>) {
        let registry = ReplicaRegistry::new(&Config {
            routing_strategy: RoutingStrategy::FirstHealthy,
            eject_after,
            ..Config::default()
        });
        for n in names {
            registry.add(*n, Tier::Primary, *n);
        }
        (registry, Arc::new(Default::default()))
    }

    type Proxy = tower::util::BoxCloneService<
        (&'static str, Request<Bytes>),
        Response<Full<Bytes>>,
        NotSent<Bytes>,
    >;

    fn proxy(calls: Arc<[AtomicU32; 3]>) -> Proxy {
        tower::util::BoxCloneService::new(service_fn(
            move |(name, req): (&'static str, Request<Bytes>)| {
                let calls = Arc::clone(&calls);
                async move {
                    let i = ["down", "busy", "up"]
                        .iter()
                        .position(|n| *n == name)
                        .unwrap();
                    calls[i].fetch_add(1, Ordering::SeqCst);
                    match name {
                        "down" => Err(NotSent::new(req, "connection refused")),
                        "busy" => Ok(Response::builder()
                            .status(503)
                            .body(Full::new(Bytes::new()))
                            .unwrap()),
                        _ => Ok(Response::new(Full::new(req.into_body()))),
                    }
                }
            },
        ))
    }

    fn retries(config: RetryConfig) -> Arc<Retries> {
        Arc::new(Retries::new(&config))
    }

    fn calls(c: &[AtomicU32; 3]) -> [u32; 3] {
        [0, 1, 2].map(|i| c[i].load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn a_request_not_sent_goes_to_the_next_replica_and_the_failure_counts() {
        let (registry, c) = pool(&["down", "up"], 1);
        let r = retries(RetryConfig::default());
        let svc = RetryingHttpBalance::new(proxy(Arc::clone(&c)), registry.clone(), r.clone());
        let resp = svc
            .oneshot(Request::new(Bytes::from("body")))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap();
        assert_eq!(body.to_bytes(), "body", "the request came back whole");
        assert_eq!(calls(&c), [1, 0, 1]);
        assert_eq!(r.counts().retries, 1);
        // `eject_after: 1`: the connect failure ejected "down".
        let snap = registry.snapshot();
        assert!(snap.replicas.iter().any(|s| s.url == "down" && s.ejected));
    }

    #[tokio::test]
    async fn without_budget_or_another_replica_a_request_not_sent_answers_502() {
        let (registry, c) = pool(&["down", "up"], 0);
        let r = retries(RetryConfig {
            budget_percent: 0.0,
            min_retries_per_second: 0.0,
            ..RetryConfig::default()
        });
        let svc = RetryingHttpBalance::new(proxy(Arc::clone(&c)), registry, r.clone());
        let resp = svc.oneshot(Request::new(Bytes::new())).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(calls(&c), [1, 0, 0]);
        assert_eq!(r.counts().retries, 0);
        assert_eq!(r.counts().retries_budget_exhausted, 1);

        // Alone in the pool: no replica to retry on, which is not the budget's doing.
        let (registry, c) = pool(&["down"], 0);
        let r = retries(RetryConfig::default());
        let svc = RetryingHttpBalance::new(proxy(Arc::clone(&c)), registry, r.clone());
        let resp = svc.oneshot(Request::new(Bytes::new())).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(r.counts(), Default::default());
    }

    #[tokio::test]
    async fn max_attempts_counts_the_first_attempt() {
        let (registry, c) = pool(&["down", "busy", "up"], 0);
        // Two attempts: "down" then "busy" (first-healthy, less the tried), never "up".
        let r = retries(RetryConfig {
            on: vec![crate::RetryOn::ServerErrors],
            ..RetryConfig::default()
        });
        let svc = RetryingHttpBalance::new(proxy(Arc::clone(&c)), registry, r.clone());
        let mut req = Request::new(Bytes::new());
        req.extensions_mut().insert(ReplayBody(Bytes::new()));
        let resp = svc.oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(calls(&c), [1, 1, 0]);
    }

    #[tokio::test]
    async fn only_a_replayable_idempotent_request_is_retried_after_a_503() {
        let on_5xx = RetryConfig {
            on: vec![crate::RetryOn::ServerErrors],
            ..RetryConfig::default()
        };
        let replayable = |method: http::Method, body: &'static str| {
            let mut req = Request::new(Bytes::from(body));
            *req.method_mut() = method;
            req.extensions_mut().insert(ReplayBody(Bytes::from(body)));
            req
        };
        let cases = [
            (
                replayable(http::Method::PUT, "put"),
                on_5xx.clone(),
                200,
                [0, 1, 1],
            ),
            (
                replayable(http::Method::POST, "post"),
                on_5xx.clone(),
                503,
                [0, 1, 0],
            ),
            (Request::new(Bytes::new()), on_5xx.clone(), 503, [0, 1, 0]),
            (
                replayable(http::Method::GET, ""),
                RetryConfig::default(),
                503,
                [0, 1, 0],
            ),
        ];
        for (req, config, status, expected) in cases {
            let what = format!("{} {:?}", req.method(), config.on);
            let (registry, c) = pool(&["busy", "up"], 0);
            let svc = RetryingHttpBalance::new(proxy(Arc::clone(&c)), registry, retries(config));
            let resp = svc.oneshot(req).await.unwrap();
            assert_eq!(resp.status().as_u16(), status, "{what}");
            assert_eq!(calls(&c), expected, "{what}");
            if status == 200 {
                let body = http_body_util::BodyExt::collect(resp.into_body())
                    .await
                    .unwrap();
                assert_eq!(body.to_bytes(), "put", "the replayed body");
            }
        }
    }

    #[test]
    fn retry_config_fields_are_validated_by_name() {
        assert!(RetryConfig::default().validate().is_ok());
        let bad = [
            (
                RetryConfig {
                    max_attempts: 0,
                    ..Default::default()
                },
                "max_attempts",
            ),
            (
                RetryConfig {
                    max_attempts: 11,
                    ..Default::default()
                },
                "max_attempts",
            ),
            (
                RetryConfig {
                    budget_percent: 100.5,
                    ..Default::default()
                },
                "budget_percent",
            ),
            (
                RetryConfig {
                    budget_percent: f64::NAN,
                    ..Default::default()
                },
                "budget_percent",
            ),
            (
                RetryConfig {
                    min_retries_per_second: -1.0,
                    ..Default::default()
                },
                "min_retries_per_second",
            ),
            (
                RetryConfig {
                    buffer_limit: (16 << 20) + 1,
                    ..Default::default()
                },
                "buffer_limit",
            ),
            (
                RetryConfig {
                    on: vec![crate::RetryOn::ServerErrors; 2],
                    ..Default::default()
                },
                "on[1]",
            ),
        ];
        for (config, field) in bad {
            assert_eq!(config.validate().unwrap_err().field, field, "{config:?}");
        }
    }
}
