//! One request through the balancer to a replica that answers at once, side by side with
//! `tower::balance::p2c::Balance` (PendingRequests load) over the same replicas, at 3 and
//! 1,000 replicas, for each routing strategy (`least-connections` and `weighted` scan every
//! candidate, so their 1,000-replica cost shows the O(n) pass).
//!
//! Run: `cargo bench -p portcullis-balance --bench balance -- --warm-up-time 1 --measurement-time 3`

#![allow(missing_docs)] // criterion_group! generates an undocumented fn

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use portcullis_balance::{Balance, Config, ReplicaRegistry, RoutingStrategy, Tier};
use std::convert::Infallible;
use std::time::{Duration, Instant};
use tower::balance::p2c::Balance as TowerBalance;
use tower::discover::ServiceList;
use tower::load::{CompleteOnResponse, PendingRequestsDiscover};
use tower::{service_fn, Service, ServiceExt};

fn replica(
    i: u64,
) -> impl Service<
    u64,
    Response = u64,
    Error = Infallible,
    Future = std::future::Ready<Result<u64, Infallible>>,
> + Clone {
    service_fn(move |req: u64| std::future::ready(Ok::<_, Infallible>(req ^ i)))
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("one_request");
    group.warm_up_time(Duration::from_secs(1));
    for n in [3u64, 1000] {
        group.bench_with_input(
            BenchmarkId::new("tower_p2c_pending_requests", n),
            &n,
            |b, &n| {
                let list = ServiceList::new((0..n).map(replica).collect::<Vec<_>>());
                let discover = PendingRequestsDiscover::new(list, CompleteOnResponse::default());
                let mut svc = TowerBalance::new(discover);
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        for i in 0..iters {
                            let r = svc.ready().await.unwrap().call(i).await.unwrap();
                            std::hint::black_box(r);
                        }
                        start.elapsed()
                    })
                })
            },
        );
        for strategy in [
            RoutingStrategy::P2c,
            RoutingStrategy::RoundRobin,
            RoutingStrategy::LeastConnections,
            RoutingStrategy::Weighted,
        ] {
            let name = match strategy {
                RoutingStrategy::P2c => "portcullis_p2c",
                RoutingStrategy::RoundRobin => "portcullis_round_robin",
                RoutingStrategy::FirstHealthy => "portcullis_first_healthy",
                RoutingStrategy::LeastConnections => "portcullis_least_connections",
                RoutingStrategy::Weighted => "portcullis_weighted",
            };
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, &n| {
                let registry = ReplicaRegistry::new(&Config {
                    routing_strategy: strategy,
                    ..Config::default()
                });
                for i in 0..n {
                    // Weights 1, 2, 3, 1, 2, 3, ... (ignored by all but `weighted`).
                    let weight = (i % 3) as u32 + 1;
                    registry.add_weighted(format!("r{i}"), Tier::Primary, weight, replica(i));
                }
                let mut svc = Balance::new(registry);
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        for i in 0..iters {
                            let r = svc.ready().await.unwrap().call(i).await.unwrap();
                            std::hint::black_box(r);
                        }
                        start.elapsed()
                    })
                })
            });
        }
        group.bench_with_input(BenchmarkId::new("portcullis_pick_only", n), &n, |b, &n| {
            let registry = ReplicaRegistry::new(&Config::default());
            for i in 0..n {
                registry.add(format!("r{i}"), Tier::Primary, i);
            }
            b.iter(|| {
                let g = registry.pick().unwrap();
                std::hint::black_box(g.target());
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
