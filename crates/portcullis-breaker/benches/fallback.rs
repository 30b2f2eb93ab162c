//! Per-request overhead of the breaker in NORMAL state, side by side with a bare service call
//! and with tower's `Either`-based routing.
//!
//! `cargo bench -p portcullis-breaker --bench fallback -- --warm-up-time 1 --measurement-time 3`
//!
//! Every variant does `poll_ready` + `call` + poll the (immediately ready) response future,
//! without a runtime in the loop (`now_or_never`), so only the routing cost is measured.

use criterion::{criterion_main, Criterion};
use futures_util::FutureExt;
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use portcullis_breaker::{Breaker, Config, Fallback, HttpFallback};
use std::convert::Infallible;
use std::future::{ready, Ready};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::util::Either;
use tower::Service;

/// Always ready; answers `req + 1` at once.
#[derive(Clone)]
struct Echo;

impl Service<u64> for Echo {
    type Response = u64;
    type Error = Infallible;
    type Future = Ready<Result<u64, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: u64) -> Self::Future {
        ready(Ok(req + 1))
    }
}

/// Always ready; answers 200 with an empty body.
#[derive(Clone)]
struct Http;

impl Service<Request<()>> for Http {
    type Response = Response<Empty<bytes::Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<()>) -> Self::Future {
        let mut r = Response::new(Empty::new());
        *r.status_mut() = StatusCode::OK;
        ready(Ok(r))
    }
}

/// The smallest breaker-shaped router built from tower's `Either`: an atomic flag picks
/// `Either::Left(primary)` or `Either::Right(fallback)`, and tower's `Either` service does
/// the dispatch (its `EitherResponseFuture` unifies the futures). No classification, no
/// recording.
#[derive(Clone)]
struct EitherRouter<P, F> {
    primary: Either<P, F>,
    fallback: Either<P, F>,
    use_fallback: Arc<AtomicBool>,
    chose_fallback: bool,
}

impl<P, F> EitherRouter<P, F> {
    fn new(primary: P, fallback: F) -> Self {
        Self {
            primary: Either::Left(primary),
            fallback: Either::Right(fallback),
            use_fallback: Arc::new(AtomicBool::new(false)),
            chose_fallback: false,
        }
    }
}

impl<P, F, Req> Service<Req> for EitherRouter<P, F>
where
    Either<P, F>: Service<Req>,
{
    type Response = <Either<P, F> as Service<Req>>::Response;
    type Error = <Either<P, F> as Service<Req>>::Error;
    type Future = <Either<P, F> as Service<Req>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.chose_fallback = self.use_fallback.load(Ordering::Acquire);
        if self.chose_fallback {
            self.fallback.poll_ready(cx)
        } else {
            self.primary.poll_ready(cx)
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        if self.chose_fallback {
            self.fallback.call(req)
        } else {
            self.primary.call(req)
        }
    }
}

fn once<S: Service<R>, R>(svc: &mut S, req: R) -> S::Response
where
    S::Error: std::fmt::Debug,
{
    let waker = futures_util::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    match svc.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        _ => panic!("not ready"),
    }
    svc.call(req)
        .now_or_never()
        .expect("ready future")
        .expect("ok")
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _enter = rt.enter();
    let config = Config {
        url: Some("fallback".into()),
        ..Config::default()
    };
    let breaker = Breaker::builder(config).build();

    let mut g = c.benchmark_group("normal_path_u64");
    let mut bare = Echo;
    g.bench_function("bare", |b| b.iter(|| once(&mut bare, black_box(1))));
    let mut either_left: Either<Echo, Echo> = Either::Left(Echo);
    g.bench_function("tower_either_left", |b| {
        b.iter(|| once(&mut either_left, black_box(1)))
    });
    let mut router = EitherRouter::new(Echo, Echo);
    g.bench_function("either_router_atomic_flag", |b| {
        b.iter(|| once(&mut router, black_box(1)))
    });
    let mut fallback = Fallback::new(Echo, Echo, breaker.clone());
    g.bench_function("fallback_layer", |b| {
        b.iter(|| once(&mut fallback, black_box(1)))
    });
    g.finish();

    let mut g = c.benchmark_group("normal_path_http");
    let mut bare = Http;
    g.bench_function("bare", |b| b.iter(|| once(&mut bare, Request::new(()))));
    let mut router = EitherRouter::new(Http, Http);
    g.bench_function("either_router_atomic_flag", |b| {
        b.iter(|| once(&mut router, Request::new(())))
    });
    let mut http = HttpFallback::new(Http, Http, breaker.clone());
    g.bench_function("http_fallback_layer", |b| {
        b.iter(|| once(&mut http, Request::new(())))
    });
    g.finish();
    assert_eq!(breaker.state(), portcullis_breaker::BreakerState::Normal);
}

#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::bench);
}
use group::benches;
criterion_main!(benches);
