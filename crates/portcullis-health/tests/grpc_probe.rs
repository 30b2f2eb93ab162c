//! `GrpcHealthProbe` against a real `tonic-health` server on 127.0.0.1.
//!
//! * `SERVING` is healthy; `NOT_SERVING`, an unknown service name, a server without the
//!   health service and a closed port are failures.
//! * Through the state machine: `NOT_SERVING` makes the target unhealthy after exactly
//!   `failure_threshold` checks, `SERVING` brings it back after exactly `recovery_threshold`;
//!   and the background `HealthChecker` does the same on its own.
//!
//! Run: `cargo test -p portcullis-health --test grpc_probe`

use portcullis_health::{
    CheckerConfig, GrpcHealthProbe, HealthChecker, HealthPolicy, HealthState, Probe, ProbeTarget,
    ProbeTargets, Status,
};
use portcullis_testkit::eventually;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

const SERVICE: &str = "portcullis.test.Greeter";

/// A tonic server with the health service only; aborted on drop.
struct HealthServer {
    addr: SocketAddr,
    reporter: HealthReporter,
    task: JoinHandle<()>,
}

impl HealthServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status(SERVICE, ServingStatus::Serving)
            .await;
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpIncoming::from(listener))
                .await;
        });
        Self {
            addr,
            reporter,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn set(&self, status: ServingStatus) {
        self.reporter.set_service_status(SERVICE, status).await;
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn probe(service: &str) -> GrpcHealthProbe {
    GrpcHealthProbe::new(service, Duration::from_secs(2))
}

#[tokio::test]
async fn serving_is_healthy_and_everything_else_is_not() {
    let server = HealthServer::start().await;
    let url = server.url();

    let r = probe(SERVICE).probe(&url).await;
    assert!(r.healthy, "{r:?}");
    assert_eq!(r.detail, "SERVING");
    // The whole server (`""`).
    assert!(probe("").probe(&url).await.healthy);

    server.set(ServingStatus::NotServing).await;
    let r = probe(SERVICE).probe(&url).await;
    assert!(!r.healthy, "{r:?}");
    assert_eq!(r.detail, "NOT_SERVING");

    // tonic-health answers NOT_FOUND for a service it does not know.
    let r = probe("no.such.Service").probe(&url).await;
    assert!(!r.healthy, "{r:?}");
    assert!(r.detail.contains("grpc-status 5"), "{r:?}");

    server.set(ServingStatus::Serving).await;
    assert!(probe(SERVICE).probe(&url).await.healthy);

    // Nothing listening.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let r = probe(SERVICE).probe(&format!("http://{closed}")).await;
    assert!(!r.healthy, "{r:?}");
    assert_eq!(r.detail, "connect error");
}

#[tokio::test]
async fn a_server_without_the_health_service_fails_the_check() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // A gRPC server with no service at all: every method is UNIMPLEMENTED.
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_routes(tonic::service::Routes::default())
            .serve_with_incoming(TcpIncoming::from(listener))
            .await;
    });
    let r = probe(SERVICE).probe(&format!("http://{addr}")).await;
    assert!(!r.healthy, "{r:?}");
    assert!(r.detail.contains("grpc-status 12"), "{r:?}");
    task.abort();
}

#[tokio::test]
async fn thresholds_count_real_checks() {
    let server = HealthServer::start().await;
    let url = server.url();
    let policy = Arc::new(HealthPolicy {
        failure_threshold: 3,
        recovery_threshold: 2,
        ..HealthPolicy::default()
    });
    let state = HealthState::new(policy);
    let p = probe(SERVICE);
    let check = async || {
        let r = p.probe(&url).await;
        state.record_probe(r.healthy, r.latency);
    };

    check().await;
    assert!(state.is_healthy());
    server.set(ServingStatus::NotServing).await;
    for n in 1..=3 {
        check().await;
        assert_eq!(state.is_healthy(), n < 3, "after {n} NOT_SERVING checks");
    }
    assert_eq!(state.status(), Status::Unhealthy);
    server.set(ServingStatus::Serving).await;
    for n in 1..=2 {
        check().await;
        assert_eq!(state.is_healthy(), n == 2, "after {n} SERVING checks");
    }
}

/// One fixed target.
struct One(ProbeTarget);

impl ProbeTargets for One {
    fn probe_targets(&self) -> Vec<ProbeTarget> {
        vec![ProbeTarget {
            key: self.0.key.clone(),
            state: self.0.state.clone(),
        }]
    }
}

#[tokio::test]
async fn the_background_checker_follows_the_serving_status() {
    let server = HealthServer::start().await;
    let state = Arc::new(HealthState::new(Arc::new(HealthPolicy {
        failure_threshold: 2,
        recovery_threshold: 2,
        ..HealthPolicy::default()
    })));
    let target = ProbeTarget {
        key: server.url().into(),
        state: state.clone(),
    };
    let _checker = HealthChecker::spawn(
        One(target),
        probe(SERVICE),
        CheckerConfig {
            interval: Duration::from_millis(50),
            timeout: Duration::from_secs(1),
            jitter: Duration::ZERO,
        },
    );
    server.set(ServingStatus::NotServing).await;
    assert!(eventually(Duration::from_secs(10), || !state.is_healthy()).await);
    server.set(ServingStatus::Serving).await;
    assert!(eventually(Duration::from_secs(10), || state.is_healthy()).await);
}
