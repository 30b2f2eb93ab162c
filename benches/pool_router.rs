//! Per-request cost of [`PoolRouter`] (issue 16), side by side with calling the branch
//! service directly: five routes, the request matching only the last (as the loadbench's
//! `gateway-routes` target has them), and, for scale, the first.
//!
//! `cargo bench -p portcullis --bench pool_router -- --warm-up-time 1 --measurement-time 3`
//!
//! Every variant does `poll_ready` + `call` + poll the (immediately ready) response future,
//! without a runtime in the loop (`now_or_never`); the request is built and dropped outside
//! the timed part (`iter_batched`, the branch hands it back), so only the routing cost is
//! measured.

use axum::body::Body;
use criterion::{criterion_main, BatchSize, Criterion};
use futures_util::FutureExt;
use http::Request;
use portcullis::gateway::routes::{PoolRouter, RouteConfig, RouteTable};
use std::convert::Infallible;
use std::future::{ready, Ready};
use std::hint::black_box;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::Service;

/// A branch: always ready, answers at once with the request itself (so that the request
/// is dropped with the output, outside the timed part).
#[derive(Clone)]
struct Branch;

impl Service<Request<Body>> for Branch {
    type Response = Request<Body>;
    type Error = Infallible;
    type Future = Ready<Result<Request<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        ready(Ok(black_box(req)))
    }
}

/// The loadbench's five routes: the four before the last fail on `/bench` (one only by its
/// method, one only by its host).
const ROUTES: &str = "\
- {prefix: /v1/chat/, pool: bench}
- {path: /v1/embed, method: POST, pool: bench}
- {prefix: /api/, pool: bench, strip_prefix: true}
- {prefix: /bench, host: other.example, pool: bench}
- {prefix: /bench, pool: bench}
";

fn request(path: &'static str) -> Request<Body> {
    Request::get(path)
        .header(http::header::HOST, "gateway.example:8080")
        .body(Body::empty())
        .unwrap()
}

/// `poll_ready`, `call`, and the response future polled once (it is ready).
#[inline]
fn one<S>(svc: &mut S, req: Request<Body>) -> Request<Body>
where
    S: Service<Request<Body>, Response = Request<Body>, Error = Infallible>,
{
    let mut cx = Context::from_waker(std::task::Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_ready());
    match svc.call(req).now_or_never() {
        Some(Ok(r)) => r,
        _ => unreachable!("the branch answers at once"),
    }
}

fn pool_router(c: &mut Criterion) {
    let routes: Vec<RouteConfig> = serde_yaml_ng::from_str(ROUTES).unwrap();
    let table = Arc::new(RouteTable::new(&routes, &["default", "bench"]).unwrap());
    let mut router = PoolRouter::new(Arc::clone(&table), vec![Branch; table.len() + 1]);
    let mut direct = Branch;

    let mut g = c.benchmark_group("pool_router");
    g.bench_function("branch called directly", |b| {
        b.iter_batched(
            || request("/bench"),
            |req| one(&mut direct, req),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("PoolRouter, 5 routes, match on the last", |b| {
        b.iter_batched(
            || request("/bench"),
            |req| one(&mut router, req),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("PoolRouter, 5 routes, match on the first", |b| {
        b.iter_batched(
            || request("/v1/chat/completions"),
            |req| one(&mut router, req),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::pool_router);
}
use group::benches;
criterion_main!(benches);
