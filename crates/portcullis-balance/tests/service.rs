//! The generic tower service: typed error, outcome recording, cancellation releases the
//! in-flight slot.

use portcullis_balance::{
    Balance, BalanceLayer, Config, NoHealthyReplica, ReplicaRegistry, RoutingStrategy, Status, Tier,
};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tower::{service_fn, BoxError, Layer, Service, ServiceExt};

type Replica = tower::util::BoxCloneSyncService<u32, &'static str, BoxError>;

fn replica(name: &'static str, mode: &'static str) -> Replica {
    tower::util::BoxCloneSyncService::new(service_fn(move |_req: u32| async move {
        match mode {
            "hang" => std::future::pending::<Result<&'static str, BoxError>>().await,
            "fail" => Err::<&'static str, BoxError>("boom".into()),
            _ => Ok(name),
        }
    }))
}

#[tokio::test]
async fn no_replica_is_a_typed_error() {
    let r: ReplicaRegistry<Replica> = ReplicaRegistry::new(&Config::default());
    let mut svc = Balance::new(r);
    let err = svc.ready().await.unwrap().call(1).await.unwrap_err();
    assert!(err.is::<NoHealthyReplica>());
    let rej = portcullis_core::IntoRejection::to_rejection(&NoHealthyReplica);
    assert_eq!(rej.code(), "no_healthy_upstream");
}

#[tokio::test]
async fn a_cancelled_request_releases_its_inflight_slot() {
    let r = ReplicaRegistry::new(&Config::default());
    r.add("hang", Tier::Primary, replica("hang", "hang"));
    let mut svc = Balance::new(r.clone());
    let fut = svc.ready().await.unwrap().call(1);
    let mut fut: Pin<Box<dyn Future<Output = _>>> = Box::pin(fut);
    assert!(tokio::time::timeout(Duration::from_millis(20), &mut fut)
        .await
        .is_err());
    assert_eq!(r.snapshot().replicas[0].inflight, 1);
    drop(fut);
    assert_eq!(r.snapshot().replicas[0].inflight, 0);
    // The call alone (never polled) holds the slot too, and dropping it releases it.
    let fut = svc.ready().await.unwrap().call(2);
    assert_eq!(r.get("hang").unwrap().inflight(), 1);
    drop(fut);
    assert_eq!(r.get("hang").unwrap().inflight(), 0);
}

#[tokio::test]
async fn errors_eject_and_traffic_moves_on() {
    let r = ReplicaRegistry::new(&Config {
        routing_strategy: RoutingStrategy::FirstHealthy,
        eject_after: 2,
        ..Config::default()
    });
    r.add("bad", Tier::Primary, replica("bad", "fail"));
    r.add("good", Tier::Primary, replica("good", "ok"));
    let mut svc = Balance::new(r.clone());
    for _ in 0..2 {
        assert!(svc.ready().await.unwrap().call(1).await.is_err());
    }
    assert_eq!(r.get("bad").unwrap().health().status(), Status::Ejected);
    for _ in 0..5 {
        assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), "good");
    }
    assert_eq!(
        r.snapshot()
            .replicas
            .iter()
            .map(|x| x.inflight)
            .sum::<usize>(),
        0
    );
}

#[tokio::test]
async fn layer_hands_the_chosen_payload_to_the_dispatch_service() {
    let r = ReplicaRegistry::new(&Config {
        routing_strategy: RoutingStrategy::RoundRobin,
        ..Config::default()
    });
    r.add("http://a", Tier::Primary, 1u8);
    r.add("http://b", Tier::Primary, 2u8);
    let dispatch = service_fn(|(target, req): (u8, &'static str)| async move {
        Ok::<_, Infallible>(format!("{req}->{target}"))
    });
    let mut svc = BalanceLayer::new(r).layer(dispatch);
    let a = svc.ready().await.unwrap().call("x").await.unwrap();
    let b = svc.ready().await.unwrap().call("y").await.unwrap();
    assert_eq!((a.as_str(), b.as_str()), ("x->1", "y->2"));
}
