//! Admission overhead vs `tower::limit::ConcurrencyLimit` on the same inner service, queue
//! hand-off latency (release -> next waiter runs), and the HTTP form's endpoint matching
//! (exact path vs `/*` prefix pattern vs unwatched path), and the adaptive capacity
//! source's overhead against `LocalCapacity` (`adaptive_` groups).
//!
//! Run: `cargo bench -p portcullis-admission --bench admission -- --warm-up-time 1 --measurement-time 3`
//! (append `http_` to run only the endpoint-matching groups).

#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, Criterion};
use http::{Method, Request, Response, Uri};
use portcullis_admission::adaptive::{AdaptiveCapacity, AdaptiveConfig, SampleClock};
use portcullis_admission::{
    AdmissionLayer, CapacitySource, Endpoints, HttpAdmissionLayer, Limiter, LocalCapacity, Outcome,
};
use std::convert::Infallible;
use std::future::{ready, Ready};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;
use tower::limit::ConcurrencyLimitLayer;
use tower::{service_fn, Layer, Service, ServiceExt};

fn inner(
) -> impl Service<u64, Response = u64, Error = Infallible, Future = Ready<Result<u64, Infallible>>> + Clone
{
    service_fn(|x: u64| ready(Ok::<_, Infallible>(x.wrapping_add(1))))
}

fn current_thread() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn two_threads() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn one<S>(svc: &mut S, x: u64) -> u64
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    svc.ready().await.unwrap().call(x).await.unwrap()
}

/// One task issuing `iters` requests back to back (ready + call + await).
fn run_one<S>(rt: &Runtime, mut svc: S, iters: u64) -> Duration
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    rt.block_on(async move {
        let start = Instant::now();
        for i in 0..iters {
            black_box(one(&mut svc, black_box(i)).await);
        }
        start.elapsed()
    })
}

fn uncontended(c: &mut Criterion) {
    let rt = current_thread();
    let mut g = c.benchmark_group("uncontended");
    g.bench_function("inner_only", |b| {
        b.iter_custom(|iters| run_one(&rt, inner(), iters))
    });
    g.bench_function("tower_concurrency_limit", |b| {
        b.iter_custom(|iters| run_one(&rt, ConcurrencyLimitLayer::new(1024).layer(inner()), iters))
    });
    g.bench_function("admission", |b| {
        b.iter_custom(|iters| run_one(&rt, AdmissionLayer::new(1024).layer(inner()), iters))
    });
    g.finish();
}

/// Two tasks on two worker threads, each issuing `iters / 2` requests back to back.
fn run_two<S>(rt: &Runtime, svc: S, iters: u64) -> Duration
where
    S: Service<u64, Response = u64> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
{
    rt.block_on(async move {
        let start = Instant::now();
        let tasks: Vec<_> = (0..2)
            .map(|_| {
                let mut svc = svc.clone();
                tokio::spawn(async move {
                    for i in 0..iters.div_ceil(2) {
                        black_box(one(&mut svc, i).await);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        start.elapsed()
    })
}

fn two_threads_at_capacity(c: &mut Criterion) {
    let rt = two_threads();
    for cap in [2usize, 1] {
        let mut g = c.benchmark_group(format!("two_threads_capacity_{cap}"));
        g.bench_function("tower_concurrency_limit", |b| {
            b.iter_custom(|iters| {
                run_two(&rt, ConcurrencyLimitLayer::new(cap).layer(inner()), iters)
            })
        });
        g.bench_function("admission", |b| {
            b.iter_custom(|iters| run_two(&rt, AdmissionLayer::new(cap).layer(inner()), iters))
        });
        g.finish();
    }
}

/// Waits until the waiter task runs and has had time to park on its acquire future.
async fn settle(started: &AtomicBool) {
    while !started.load(Ordering::SeqCst) {
        tokio::task::yield_now().await;
    }
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// Time from dropping the held permit to the queued waiter's task running with its slot.
fn handoff(c: &mut Criterion) {
    let mut g = c.benchmark_group("handoff");
    for (name, rt) in [
        ("multi_thread", two_threads()),
        ("current_thread", current_thread()),
    ] {
        g.bench_function(format!("local_capacity/{name}"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let src = LocalCapacity::new(1);
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let held = src.acquire(None).await.unwrap();
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        let waiter = src.acquire(None); // queued now (FIFO position taken)
                        let started = Arc::new(AtomicBool::new(false));
                        let st = Arc::clone(&started);
                        tokio::spawn(async move {
                            st.store(true, Ordering::SeqCst);
                            let p = waiter.await.unwrap();
                            let t = Instant::now();
                            drop(p);
                            let _ = tx.send(t);
                        });
                        settle(&started).await;
                        let t0 = Instant::now();
                        drop(held);
                        total += rx.await.unwrap() - t0;
                    }
                    total
                })
            })
        });
        g.bench_function(format!("tokio_semaphore/{name}"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let sem = Arc::new(tokio::sync::Semaphore::new(1));
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let held = Arc::clone(&sem).acquire_owned().await.unwrap();
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        let s2 = Arc::clone(&sem);
                        let started = Arc::new(AtomicBool::new(false));
                        let st = Arc::clone(&started);
                        tokio::spawn(async move {
                            st.store(true, Ordering::SeqCst);
                            let p = s2.acquire_owned().await.unwrap();
                            let t = Instant::now();
                            drop(p);
                            let _ = tx.send(t);
                        });
                        while sem.available_permits() != 0 {
                            tokio::task::yield_now().await;
                        }
                        settle(&started).await;
                        let t0 = Instant::now();
                        drop(held);
                        total += rx.await.unwrap() - t0;
                    }
                    total
                })
            })
        });
    }
    g.finish();
}

/// A gateway-like table: exact keys, and (unless `exact_only`) four `/*` patterns, the
/// matching one not the first tried.
fn endpoints(exact_only: bool) -> Endpoints {
    let mut keys = vec!["/predict", "/embed", "/v1/models/list", "/v1/completions"];
    if !exact_only {
        keys.extend([
            "/v1/models/large/*",
            "/v1/models/*",
            "/v1/chat/*",
            "/admin/*",
        ]);
    }
    keys.into_iter().fold(Endpoints::new(), |eps, key| {
        eps.watch(key, None, Arc::new(Limiter::local(1024)))
    })
}

/// The request paths: an exact key, a path only a pattern matches, a path nothing matches.
const PATHS: [(&str, &str); 3] = [
    ("exact", "/predict"),
    ("pattern", "/v1/models/small/weights"),
    ("unwatched", "/healthz/live"),
];

/// `Endpoints::lookup` alone: what matching costs per request.
fn http_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("http_lookup");
    for (table, exact_only) in [("exact_only_table", true), ("with_patterns", false)] {
        let eps = endpoints(exact_only);
        for (name, path) in PATHS {
            if exact_only && name == "pattern" {
                continue;
            }
            g.bench_function(format!("{table}/{name}"), |b| {
                b.iter(|| black_box(eps.lookup(black_box(path), black_box(&Method::GET))).is_some())
            });
        }
    }
    g.finish();
}

/// One task issuing `iters` requests for `uri` back to back (build the request, ready +
/// call + await, drop the response: for a watched path, that releases the slot).
fn run_http<S>(rt: &Runtime, mut svc: S, uri: &Uri, iters: u64) -> Duration
where
    S: Service<Request<()>>,
    S::Error: std::fmt::Debug,
{
    rt.block_on(async move {
        let start = Instant::now();
        for _ in 0..iters {
            let mut req = Request::new(());
            *req.uri_mut() = uri.clone();
            black_box(svc.ready().await.unwrap().call(req).await.unwrap());
        }
        start.elapsed()
    })
}

/// The whole `HttpAdmission` per request on a current-thread runtime, capacity 1024 (never
/// queues), next to the bare inner service with the same request building.
fn http_admission(c: &mut Criterion) {
    let rt = current_thread();
    let mut g = c.benchmark_group("http_admission");
    let inner = service_fn(|_: Request<()>| ready(Ok::<_, Infallible>(Response::new(()))));
    for (name, path) in PATHS {
        let uri = Uri::from_static(path);
        g.bench_function(format!("inner_only/{name}"), |b| {
            b.iter_custom(|iters| run_http(&rt, inner, &uri, iters))
        });
        let layer = HttpAdmissionLayer::new(endpoints(false));
        g.bench_function(format!("admission/{name}"), |b| {
            b.iter_custom(|iters| run_http(&rt, layer.layer(inner), &uri, iters))
        });
    }
    g.finish();
}

// Adaptive capacity: per-request overhead against `LocalCapacity`.

/// The runtime of the adaptive source's task (it closes windows and sets the sampling rate
/// while the bench runs on the main thread).
fn background() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// An adaptive source over 1024 slots timing its samples with `clock`; when `rt` is idle
/// its task never runs, so every slot is sampled (the cost of a quiet endpoint); otherwise
/// its task runs on `rt` and samples about 100 slots per window (the cost of a busy one).
/// `SampleClock::Tokio` is the clock before the TSC one: two `Instant::now()` per sample.
fn adaptive(rt: &Runtime, clock: SampleClock) -> AdaptiveCapacity {
    let _enter = rt.enter();
    let config = AdaptiveConfig {
        min_capacity: 1,
        max_capacity: 4096,
        ..Default::default()
    };
    AdaptiveCapacity::with_clock(LocalCapacity::new(1024), &config, "/bench", clock)
}

/// One slot: take, report, release.
fn cycle<C: CapacitySource>(source: &C) {
    let permit = source.try_acquire().unwrap();
    C::record_outcome(&permit, Outcome::Success);
    drop(black_box(permit));
}

/// The source alone: take a slot, report its outcome, release it.
fn adaptive_source(c: &mut Criterion) {
    let idle = current_thread();
    let busy = background();
    let mut g = c.benchmark_group("adaptive_source");
    let local = LocalCapacity::new(1024);
    g.bench_function("local_capacity", |b| b.iter(|| cycle(&local)));
    let fixed = AdaptiveCapacity::fixed(LocalCapacity::new(1024));
    g.bench_function("adaptive_fixed", |b| b.iter(|| cycle(&fixed)));
    let every = adaptive(&idle, SampleClock::Tsc);
    g.bench_function("adaptive_gradient_every_slot", |b| b.iter(|| cycle(&every)));
    let every = adaptive(&idle, SampleClock::Tokio);
    g.bench_function("adaptive_gradient_every_slot_tokio_clock", |b| {
        b.iter(|| cycle(&every))
    });
    let sampled = adaptive(&busy, SampleClock::Tsc);
    g.bench_function("adaptive_gradient_sampled", |b| b.iter(|| cycle(&sampled)));
    g.finish();
}

/// The whole `HttpAdmission` per request over one watched endpoint: `LocalCapacity` vs
/// the adaptive source sampling every slot (quiet endpoint) or about 100 per window (busy).
fn adaptive_http(c: &mut Criterion) {
    let rt = current_thread();
    let mut g = c.benchmark_group("adaptive_http");
    let inner = service_fn(|_: Request<()>| ready(Ok::<_, Infallible>(Response::new(()))));
    let uri = Uri::from_static("/predict");
    let local = Endpoints::new().watch("/predict", None, Arc::new(Limiter::local(1024)));
    let layer = HttpAdmissionLayer::new(local);
    g.bench_function("local_capacity", |b| {
        b.iter_custom(|iters| run_http(&rt, layer.layer(inner), &uri, iters))
    });
    let busy = background();
    let mut paired = Vec::new();
    for (name, task_rt, clock) in [
        ("every_slot", &rt, SampleClock::Tsc),
        ("every_slot_tokio_clock", &rt, SampleClock::Tokio),
        ("sampled", &busy, SampleClock::Tsc),
    ] {
        let source = adaptive(task_rt, clock);
        let eps = Endpoints::new().watch("/predict", None, Arc::new(Limiter::new(source)));
        let adaptive = HttpAdmissionLayer::new(eps);
        g.bench_function(format!("adaptive_gradient_{name}"), |b| {
            b.iter_custom(|iters| run_http(&rt, adaptive.layer(inner), &uri, iters))
        });
        // The same two stacks interleaved in chunks of 64 requests, so that the load of a
        // shared machine hits both alike; the ratio of the totals is printed below.
        let (mut local_total, mut adaptive_total, mut n) = (Duration::ZERO, Duration::ZERO, 0);
        g.bench_function(format!("paired_{name}"), |b| {
            b.iter_custom(|iters| {
                let (mut l, mut a) = (Duration::ZERO, Duration::ZERO);
                let mut left = iters;
                while left > 0 {
                    let chunk = left.min(64);
                    l += run_http(&rt, layer.layer(inner), &uri, chunk);
                    a += run_http(&rt, adaptive.layer(inner), &uri, chunk);
                    left -= chunk;
                }
                (local_total, adaptive_total, n) = (local_total + l, adaptive_total + a, n + iters);
                (l + a) / 2
            })
        });
        paired.push((name, local_total, adaptive_total, n));
    }
    g.finish();
    for (name, local, adaptive, n) in paired {
        let per = |d: Duration| d.as_nanos() as f64 / n.max(1) as f64;
        println!(
            "adaptive_http/paired_{name}: LocalCapacity {:.1} ns, adaptive {:.1} ns per request \
             over {n} interleaved requests: {:.2}x",
            per(local),
            per(adaptive),
            per(adaptive) / per(local)
        );
    }
}

criterion_group!(
    benches,
    uncontended,
    two_threads_at_capacity,
    handoff,
    http_lookup,
    http_admission,
    adaptive_source,
    adaptive_http
);
criterion_main!(benches);
