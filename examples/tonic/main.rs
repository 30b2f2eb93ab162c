//! gRPC with tonic on both sides: servers with admission control and the gRPC health
//! service, and a client that balances over them with a circuit breaker.
//!
//! * Three tonic servers (`a`, `b`, `c`) start in this process on 127.0.0.1. Each has
//!   `HttpAdmissionLayer` on `Server::builder().layer(..)` watching one method,
//!   `/portcullis.example.Greeter/SayHello` (2 at a time, `queue_timeout` 1 s: a refused
//!   call reaches the client as `DEADLINE_EXCEEDED`, a full queue as `RESOURCE_EXHAUSTED`),
//!   and serves `grpc.health.v1` through `tonic-health`. A fourth server is the fallback.
//! * The client is `HttpFallback` (breaker) over `HttpBalance` (p2c) whose replicas are
//!   tonic `Channel`s, checked with `GrpcHealthProbe` and classified by `grpc-status`
//!   (`ProtocolClassifier`).
//! * Half-way, `a` is drained: it reports `NOT_SERVING`, the client's health check takes it
//!   out of rotation, then it stops. No call fails.
//!
//! ```sh
//! cargo run --example tonic              # prints who served each call
//! cargo run --example tonic -- --smoke   # the same, quietly; exits 0 when every call succeeded
//! ```

mod greeter;

use greeter::{say_hello, GreeterServer, SAY_HELLO, SERVICE};
use http::{Request, Response};
use portcullis::admission::{Endpoints, HttpAdmissionLayer, Limiter};
use portcullis::balance::{Config, HttpBalance, ReplicaRegistry, Tier};
use portcullis::breaker::{Breaker, HttpFallback};
use portcullis::core::BoxError;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tower::util::Oneshot;
use tower::{Service, ServiceExt};

/// A running server: its URL, its health reporter and its stop switch.
struct Server {
    url: String,
    health: HealthReporter,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

/// Starts a greeter named `name`; with `admission`, `SayHello` takes 2 calls at a time.
async fn start(name: &'static str, admission: bool) -> Result<Server, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(SERVICE, ServingStatus::Serving)
        .await;
    let limiter = Limiter::local(2).with_queue_timeout(Duration::from_secs(1));
    let endpoints = if admission {
        Endpoints::new().watch(SAY_HELLO, None, Arc::new(limiter))
    } else {
        Endpoints::new()
    };
    let greeter = GreeterServer {
        name,
        work: Duration::from_millis(20),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .layer(HttpAdmissionLayer::new(endpoints))
            .add_service(health_service)
            .add_service(greeter)
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                let _ = stopped.await;
            })
            .await;
        if let Err(e) = served {
            eprintln!("server {name}: {e}");
        }
    });
    Ok(Server {
        url,
        health,
        stop: Some(stop),
        task,
    })
}

/// The balancer's dispatch: sends the call on the picked replica's channel.
#[derive(Debug, Clone, Copy)]
struct Dispatch;

impl Service<(Channel, Request<tonic::body::Body>)> for Dispatch {
    type Response = Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = Oneshot<Channel, Request<tonic::body::Body>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (channel, req): (Channel, Request<tonic::body::Body>)) -> Self::Future {
        channel.oneshot(req)
    }
}

fn channel(url: &str) -> Result<Channel, BoxError> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(5))
        .connect_lazy())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let mut servers = Vec::new();
    for name in ["a", "b", "c"] {
        servers.push(start(name, true).await?);
    }
    let fallback = start("fallback", false).await?;

    // The client: health-checked over gRPC every 100 ms, failures by grpc-status.
    let config: Config = serde_json::from_value(serde_json::json!({
        "health_check_interval": 0.1,
        "failure_threshold": 1,
        "recovery_threshold": 1,
        "health_check": {"kind": "grpc", "service": SERVICE},
    }))?;
    config.validate()?;
    let registry: ReplicaRegistry<Channel> = ReplicaRegistry::new(&config);
    for s in &servers {
        registry.add(s.url.clone(), Tier::Primary, channel(&s.url)?);
    }
    let _checker = registry.spawn_checker(
        config
            .grpc_health_probe()
            .ok_or("health_check.kind is grpc")?,
        config.checker_config(),
    );
    let breaker = Breaker::builder(portcullis::breaker::Config::default()).build();
    let client = HttpFallback::new(
        HttpBalance::new(Dispatch, registry.clone()).with_classifier(config.classifier()),
        channel(&fallback.url)?,
        breaker,
    )
    .with_classifier(config.classifier());

    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    let mut failed = 0;
    let mut call =
        async |round: &str, i: usize| match say_hello(client.clone(), &format!("{round}{i}")).await
        {
            Ok(reply) => {
                if !smoke {
                    println!("{reply}");
                }
                let by = reply.rsplit(' ').next().unwrap_or_default().to_owned();
                *served.entry(format!("{round}: {by}")).or_default() += 1;
            }
            Err(status) => {
                eprintln!("call {round}{i} failed: {status:?}");
                failed += 1;
            }
        };
    for i in 0..12 {
        call("before", i).await;
    }

    // Drain `a`: NOT_SERVING first, out of rotation at the next check, then stop it.
    let a = &mut servers[0];
    a.health
        .set_service_status(SERVICE, ServingStatus::NotServing)
        .await;
    let a_url = a.url.clone();
    let drained = async {
        loop {
            let snap = registry.snapshot();
            if snap.replicas.iter().any(|r| r.url == a_url && !r.healthy) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), drained)
        .await
        .map_err(|_| "a was not taken out of rotation")?;
    if let Some(stop) = a.stop.take() {
        let _ = stop.send(());
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), &mut a.task).await;
    println!("-- a drained and stopped");

    for i in 0..12 {
        call("after", i).await;
    }
    for (who, n) in &served {
        println!("{who}: {n} calls");
    }
    let a_after = served.get("after: a").copied().unwrap_or(0);
    if failed > 0 || a_after > 0 {
        eprintln!("{failed} calls failed, {a_after} reached a after it was drained");
        std::process::exit(1);
    }
    println!("every call succeeded");
    Ok(())
}
