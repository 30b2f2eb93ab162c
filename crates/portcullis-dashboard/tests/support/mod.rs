//! Shared fixtures of the dashboard tests: a realistic stats document and a real server.
#![allow(dead_code, unreachable_pub)]

use portcullis_dashboard::{
    EndpointStats, FallbackStats, Histogram, Stats, StorageStats, Tier, UpstreamStats,
};
use std::net::SocketAddr;
use std::time::Duration;

/// The admission crate's queue-wait bounds.
pub const WAIT_BOUNDS: [f64; 14] = [
    0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A stats document like a loaded gateway's: `/work` at 6 of 8 with 3 queued, one
/// ejected replica, a fallback in recovery, Redis storage.
pub fn sample_stats(active: u64, queue: u64) -> Stats {
    let mut s = Stats::new("0.1.0", Duration::from_secs(3725));
    let mut waits = [0u64; 15];
    waits[0] = 120;
    waits[4] = 30;
    waits[7] = 6;
    waits[14] = 1;
    s.endpoints.insert(
        "/work".into(),
        EndpointStats {
            capacity: 8,
            active_requests: active,
            available_slots: 8u64.saturating_sub(active),
            queue_depth: queue,
            queue_timeout: 30.0,
            max_queue: Some(256),
            method: Some("POST".into()),
            admitted: 157,
            rejected_503: 2,
            timed_out_504: 1,
            deadline_exceeded: 0,
            cancelled: 0,
            local_active: active,
            held_after_cancel: 3,
            held_cut: 0,
            queue_wait: Histogram::from_counts(&WAIT_BOUNDS, &waits, 42.5),
            adaptive: None,
        },
    );
    s.endpoints.insert(
        "/score".into(),
        EndpointStats {
            capacity: 4,
            active_requests: 4,
            available_slots: 0,
            queue_depth: 0,
            queue_timeout: 5.0,
            max_queue: None,
            method: None,
            admitted: 12,
            queue_wait: Histogram::from_counts(&WAIT_BOUNDS, &[12], 0.0),
            ..Default::default()
        },
    );
    let lat = Histogram::from_counts(&[0.01, 0.05, 0.25, 1.0], &[10, 80, 60, 3, 1], 14.2);
    s.upstreams = vec![
        UpstreamStats {
            url: "http://10.0.0.11:8000".into(),
            tier: Tier::Primary,
            status: "healthy".into(),
            healthy: true,
            ejected: false,
            inflight: active.saturating_sub(1),
            last_probe_latency_ms: Some(3.2),
            requests: 150,
            failures: 1,
            client_closed: 0,
            latency: Some(lat.clone()),
            ..Default::default()
        },
        UpstreamStats {
            url: "http://10.0.0.12:8000".into(),
            tier: Tier::Primary,
            status: "ejected".into(),
            healthy: false,
            ejected: true,
            inflight: 0,
            last_probe_latency_ms: Some(812.0),
            consecutive_failures: 2,
            ejections: 1,
            ejected_for_seconds: 21.5,
            requests: 19,
            failures: 6,
            client_closed: 2,
            latency: Some(lat),
        },
        UpstreamStats {
            url: "http://10.0.1.20:8000".into(),
            tier: Tier::Secondary,
            status: "healthy".into(),
            healthy: true,
            ejected: false,
            inflight: 1,
            last_probe_latency_ms: None,
            ..Default::default()
        },
    ];
    s.fallback = Some(FallbackStats {
        url: "http://fallback.internal:9000".into(),
        engaged: true,
        state: "half_open".into(),
        consecutive_failures: 5,
        failure_threshold: 5,
        engaged_for_seconds: 42.0,
        hold_seconds: 30.0,
        recovery_successes: 2,
        recovery_threshold: 3,
        trips: 1,
        fallback_requests: 88,
    });
    s.storage = StorageStats {
        kind: "redis".into(),
        healthy: true,
        last_ping_latency_ms: Some(0.41),
        consecutive_failures: 0,
        error: None,
    };
    s
}

/// Serves `app` on 127.0.0.1 (ephemeral port) until the returned handle is aborted/dropped
/// with the runtime.
pub async fn serve(app: axum::Router) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, task)
}
