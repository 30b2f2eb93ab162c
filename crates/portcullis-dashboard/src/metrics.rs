//! `GET /metrics`: the [`Stats`] document as Prometheus / OpenMetrics text.
//!
//! Rendered with `prometheus-client` from the same snapshot as `/balancer/stats`, on each
//! scrape (a small [`Collector`] encodes the families directly, so histograms keep the
//! exact bucket counts of the snapshot). Names are stable and prefixed `portcullis_`:
//!
//! Every upstream and fallback series carries the `pool` it belongs to (`pool="default"` for
//! the top-level `upstreams`), so a replica in two pools is two series; a query that
//! selects on `upstream` and `tier` alone still matches.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `portcullis_build_info` | gauge (1) | `version` |
//! | `portcullis_uptime_seconds` | gauge | |
//! | `portcullis_live`, `portcullis_ready` | gauge (0/1) | |
//! | `portcullis_endpoint_capacity` | gauge | `endpoint` |
//! | `portcullis_endpoint_active_requests` | gauge | `endpoint` |
//! | `portcullis_endpoint_local_active` | gauge | `endpoint` |
//! | `portcullis_endpoint_available_slots` | gauge | `endpoint` |
//! | `portcullis_endpoint_queue_depth` | gauge | `endpoint` |
//! | `portcullis_endpoint_queue_timeout_seconds` | gauge | `endpoint` |
//! | `portcullis_endpoint_admitted_total` | counter | `endpoint` |
//! | `portcullis_endpoint_rejected_503_total` | counter | `endpoint` |
//! | `portcullis_endpoint_timed_out_504_total` | counter | `endpoint` |
//! | `portcullis_endpoint_deadline_exceeded_total` | counter | `endpoint` |
//! | `portcullis_endpoint_cancelled_total` | counter | `endpoint` |
//! | `portcullis_endpoint_held_after_cancel_total`, `portcullis_endpoint_held_cut_total` | counter | `endpoint` |
//! | `portcullis_endpoint_queue_wait_seconds` | histogram | `endpoint` |
//! | `portcullis_endpoint_capacity_min`, `portcullis_endpoint_capacity_max` | gauge | `endpoint` (adaptive endpoints) |
//! | `portcullis_endpoint_min_rtt_seconds`, `portcullis_endpoint_sample_rtt_seconds` | gauge | `endpoint` (adaptive endpoints) |
//! | `portcullis_endpoint_adaptive_state` | gauge (1) | `endpoint`, `state` (adaptive endpoints) |
//! | `portcullis_endpoint_capacity_changes_total` | counter | `endpoint` (adaptive endpoints) |
//! | `portcullis_upstream_healthy`, `portcullis_upstream_ejected` | gauge (0/1) | `upstream`, `tier`, `pool` |
//! | `portcullis_upstream_inflight` | gauge | `upstream`, `tier`, `pool` |
//! | `portcullis_upstream_probe_latency_seconds` | gauge | `upstream`, `tier`, `pool` |
//! | `portcullis_upstream_requests_total`, `portcullis_upstream_failures_total`, `portcullis_upstream_client_closed_total` | counter | `upstream`, `tier`, `pool` |
//! | `portcullis_upstream_request_duration_seconds` | histogram | `upstream`, `tier`, `pool` |
//! | `portcullis_fallback_engaged` | gauge (0/1) | `fallback`, `pool` |
//! | `portcullis_fallback_engaged_seconds` | gauge | `fallback`, `pool` |
//! | `portcullis_fallback_trips_total`, `portcullis_fallback_requests_total` | counter | `fallback`, `pool` |
//! | `portcullis_storage_healthy` | gauge (0/1) | `kind` |
//! | `portcullis_tls_handshakes_failed_total` | counter | |
//! | `portcullis_access_log_dropped_total` | counter | |
//! | `portcullis_retries_total`, `portcullis_retries_budget_exhausted_total` | counter | `pool` |
//! | `portcullis_config_generation` | gauge | |
//! | `portcullis_reloads_failed_total` | counter | |
//! | `portcullis_last_reload_timestamp_seconds`, `portcullis_last_reload_success` (0/1) | gauge | (absent before the first reload) |

use crate::stats::{Histogram, Stats, Tier};

/// The pool of a source's top-level `upstreams` and `fallback`.
const DEFAULT_POOL: &str = "default";
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::fmt;

/// The content type of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Renders `stats` as OpenMetrics text (what `GET /metrics` answers).
pub fn render(stats: &Stats) -> String {
    let mut registry = Registry::with_prefix("portcullis");
    registry.register_collector(Box::new(StatsCollector(stats.clone())));
    let mut out = String::with_capacity(4096);
    // Writing into a `String` cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

#[derive(Debug)]
struct StatsCollector(Stats);

type Labels<'a> = Vec<(&'static str, &'a str)>;

fn tier(t: Tier) -> &'static str {
    match t {
        Tier::Primary => "primary",
        Tier::Secondary => "secondary",
    }
}

fn bool_gauge(b: bool) -> i64 {
    i64::from(b)
}

/// One family: a descriptor and one sample per label set.
fn family<'v, T>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: impl IntoIterator<Item = (Labels<'v>, T)>,
    mut write: impl FnMut(&mut MetricEncoder<'_>, T) -> fmt::Result,
) -> fmt::Result {
    let mut rows = rows.into_iter().peekable();
    if rows.peek().is_none() {
        return Ok(());
    }
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in rows {
        if labels.is_empty() {
            write(&mut m, v)?;
        } else {
            let mut sample = m.encode_family(&labels)?;
            write(&mut sample, v)?;
        }
    }
    Ok(())
}

fn gauge_f64<'v>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels<'v>, f64)>,
) -> fmt::Result {
    family(enc, name, help, MetricType::Gauge, rows, |m, v| {
        m.encode_gauge(&v)
    })
}

fn gauge_i64<'v>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels<'v>, i64)>,
) -> fmt::Result {
    family(enc, name, help, MetricType::Gauge, rows, |m, v| {
        m.encode_gauge(&v)
    })
}

fn counter<'v>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels<'v>, u64)>,
) -> fmt::Result {
    family(enc, name, help, MetricType::Counter, rows, |m, v| {
        m.encode_counter::<Labels<'_>, _, f64>(&v, None)
    })
}

fn histogram<'v>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels<'v>, &'v Histogram)>,
) -> fmt::Result {
    family(enc, name, help, MetricType::Histogram, rows, |m, h| {
        let mut buckets: Vec<(f64, u64)> = h
            .buckets
            .iter()
            .map(|b| (b.le.unwrap_or(f64::MAX), b.count))
            .collect();
        // The exposition needs a `+Inf` bucket equal to `_count`.
        let in_buckets: u64 = buckets.iter().map(|b| b.1).sum();
        if buckets.last().map(|b| b.0) != Some(f64::MAX) {
            buckets.push((f64::MAX, h.count.saturating_sub(in_buckets)));
        }
        let count = h.count.max(in_buckets);
        m.encode_histogram::<Labels<'_>>(h.sum_seconds, count, &buckets, None)
    })
}

/// The adaptive limits: bounds, latencies, state and changes, one row per adaptive endpoint.
fn adaptive_families(e: &mut DescriptorEncoder, s: &Stats) -> fmt::Result {
    let adaptive = || {
        s.endpoints
            .iter()
            .filter_map(|(path, st)| Some((path.as_str(), st.adaptive.as_ref()?)))
    };
    type Gauge = fn(&portcullis_admission::AdaptiveStats) -> Option<f64>;
    let gauges: [(&str, &str, Gauge); 4] = [
        ("endpoint_capacity_min", "Lowest adaptive limit.", |a| {
            Some(a.min_capacity as f64)
        }),
        ("endpoint_capacity_max", "Highest adaptive limit.", |a| {
            Some(a.max_capacity as f64)
        }),
        (
            "endpoint_min_rtt_seconds",
            "No-load latency estimate of the adaptive limit.",
            |a| a.min_rtt_ms.map(|ms| ms / 1e3),
        ),
        (
            "endpoint_sample_rtt_seconds",
            "Latency of the adaptive limit's last window.",
            |a| a.sample_rtt_ms.map(|ms| ms / 1e3),
        ),
    ];
    for (name, help, f) in gauges {
        let rows = adaptive().filter_map(|(path, a)| Some((vec![("endpoint", path)], f(a)?)));
        gauge_f64(e, name, help, rows)?;
    }
    let rows =
        adaptive().map(|(path, a)| (vec![("endpoint", path), ("state", a.state.as_str())], 1i64));
    gauge_i64(
        e,
        "endpoint_adaptive_state",
        "What the adaptive controller did with its last window (1 for the state).",
        rows,
    )?;
    let rows = adaptive().map(|(path, a)| (vec![("endpoint", path)], a.changes));
    counter(
        e,
        "endpoint_capacity_changes",
        "Changes of the adaptive limit.",
        rows,
    )
}

impl Collector for StatsCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let s = &self.0;
        let e = &mut enc;
        family(
            e,
            "build_info",
            "Portcullis build information.",
            MetricType::Gauge,
            [(vec![("version", s.version.as_str())], 1i64)],
            |m, v| m.encode_gauge(&v),
        )?;
        gauge_f64(
            e,
            "uptime_seconds",
            "Seconds since the gateway started.",
            [(vec![], s.uptime_seconds)],
        )?;
        if let Some(h) = &s.health {
            gauge_i64(
                e,
                "live",
                "1 while /healthz answers 200.",
                [(vec![], bool_gauge(h.live))],
            )?;
            gauge_i64(
                e,
                "ready",
                "1 while /readyz answers 200.",
                [(vec![], bool_gauge(h.ready))],
            )?;
        }

        type Gauge = fn(&crate::EndpointStats) -> f64;
        let gauges: [(&str, &str, Gauge); 6] = [
            (
                "endpoint_capacity",
                "Maximum concurrent requests of the endpoint.",
                |x| x.capacity as f64,
            ),
            (
                "endpoint_active_requests",
                "Requests holding a slot.",
                |x| x.active_requests as f64,
            ),
            (
                "endpoint_local_active",
                "Slots held by this process (the global count is endpoint_active_requests).",
                |x| x.local_active as f64,
            ),
            ("endpoint_available_slots", "Free slots.", |x| {
                x.available_slots as f64
            }),
            (
                "endpoint_queue_depth",
                "Requests waiting for a slot.",
                |x| x.queue_depth as f64,
            ),
            (
                "endpoint_queue_timeout_seconds",
                "How long a request may wait before a 504.",
                |x| x.queue_timeout,
            ),
        ];
        for (name, help, f) in gauges {
            let rows = s
                .endpoints
                .iter()
                .map(|(path, st)| (vec![("endpoint", path.as_str())], f(st)));
            gauge_f64(e, name, help, rows)?;
        }
        type Count = fn(&crate::EndpointStats) -> u64;
        let counters: [(&str, &str, Count); 7] = [
            ("endpoint_admitted", "Requests admitted.", |x| x.admitted),
            ("endpoint_rejected_503", "Requests refused with 503.", |x| {
                x.rejected_503
            }),
            (
                "endpoint_timed_out_504",
                "Requests that waited queue_timeout and got 504.",
                |x| x.timed_out_504,
            ),
            (
                "endpoint_deadline_exceeded",
                "Queued requests whose own deadline passed first (504 deadline_exceeded).",
                |x| x.deadline_exceeded,
            ),
            (
                "endpoint_cancelled",
                "Requests whose client left while queued.",
                |x| x.cancelled,
            ),
            (
                "endpoint_held_after_cancel",
                "Admitted requests held to their end after their client left.",
                |x| x.held_after_cancel,
            ),
            (
                "endpoint_held_cut",
                "Held requests cut off at the hold time limit.",
                |x| x.held_cut,
            ),
        ];
        for (name, help, f) in counters {
            let rows = s
                .endpoints
                .iter()
                .map(|(path, st)| (vec![("endpoint", path.as_str())], f(st)));
            counter(e, name, help, rows)?;
        }
        adaptive_families(e, s)?;
        histogram(
            e,
            "endpoint_queue_wait_seconds",
            "Time admitted requests waited for a slot.",
            s.endpoints
                .iter()
                .map(|(path, st)| (vec![("endpoint", path.as_str())], &st.queue_wait)),
        )?;

        // Every upstream of every pool, labelled with its pool (`default` for a source
        // without pools: its `upstreams` are the pool `default`).
        fn up<'a>((pool, u): &(&'a str, &'a crate::UpstreamStats)) -> Labels<'a> {
            vec![
                ("upstream", u.url.as_str()),
                ("tier", tier(u.tier)),
                ("pool", pool),
            ]
        }
        let ups: Vec<(&str, &crate::UpstreamStats)> = if s.pools.is_empty() {
            s.upstreams.iter().map(|u| (DEFAULT_POOL, u)).collect()
        } else {
            s.pools
                .iter()
                .flat_map(|(name, p)| p.upstreams.iter().map(move |u| (name.as_str(), u)))
                .collect()
        };
        gauge_i64(
            e,
            "upstream_healthy",
            "1 while the replica is healthy.",
            ups.iter().map(|u| (up(u), bool_gauge(u.1.healthy))),
        )?;
        gauge_i64(
            e,
            "upstream_ejected",
            "1 while the replica is ejected.",
            ups.iter().map(|u| (up(u), bool_gauge(u.1.ejected))),
        )?;
        gauge_f64(
            e,
            "upstream_inflight",
            "Requests in flight to the replica.",
            ups.iter().map(|u| (up(u), u.1.inflight as f64)),
        )?;
        gauge_f64(
            e,
            "upstream_probe_latency_seconds",
            "Latency of the last active health probe.",
            ups.iter()
                .filter_map(|u| u.1.last_probe_latency_ms.map(|ms| (up(u), ms / 1000.0))),
        )?;
        counter(
            e,
            "upstream_requests",
            "Requests sent to the replica.",
            ups.iter().map(|u| (up(u), u.1.requests)),
        )?;
        counter(
            e,
            "upstream_failures",
            "Failed requests to the replica.",
            ups.iter().map(|u| (up(u), u.1.failures)),
        )?;
        counter(
            e,
            "upstream_client_closed",
            "Requests to the replica whose client went away before its request body was complete.",
            ups.iter().map(|u| (up(u), u.1.client_closed)),
        )?;
        histogram(
            e,
            "upstream_request_duration_seconds",
            "Latency of requests proxied to the replica.",
            ups.iter()
                .filter_map(|u| u.1.latency.as_ref().map(|h| (up(u), h))),
        )?;

        // Each pool's fallback, labelled with its pool.
        let fallbacks: Vec<(&str, &crate::FallbackStats)> = if s.pools.is_empty() {
            s.fallback.iter().map(|f| (DEFAULT_POOL, f)).collect()
        } else {
            s.pools
                .iter()
                .filter_map(|(name, p)| Some((name.as_str(), p.fallback.as_ref()?)))
                .collect()
        };
        fn fb<'a>((pool, f): &(&'a str, &'a crate::FallbackStats)) -> Labels<'a> {
            vec![("fallback", f.url.as_str()), ("pool", pool)]
        }
        gauge_i64(
            e,
            "fallback_engaged",
            "1 while traffic goes to the fallback.",
            fallbacks.iter().map(|f| (fb(f), bool_gauge(f.1.engaged))),
        )?;
        gauge_f64(
            e,
            "fallback_engaged_seconds",
            "How long the fallback has been engaged.",
            fallbacks.iter().map(|f| (fb(f), f.1.engaged_for_seconds)),
        )?;
        counter(
            e,
            "fallback_trips",
            "Times the breaker tripped to the fallback.",
            fallbacks.iter().map(|f| (fb(f), f.1.trips)),
        )?;
        counter(
            e,
            "fallback_requests",
            "Requests served by the fallback.",
            fallbacks.iter().map(|f| (fb(f), f.1.fallback_requests)),
        )?;
        gauge_i64(
            e,
            "storage_healthy",
            "1 while the admission storage answers.",
            [(
                vec![("kind", s.storage.kind.as_str())],
                bool_gauge(s.storage.healthy),
            )],
        )?;
        counter(
            e,
            "tls_handshakes_failed",
            "TLS handshakes on the listener that failed or timed out.",
            [(vec![], s.tls_handshakes_failed)],
        )?;
        counter(
            e,
            "access_log_dropped",
            "Access log lines dropped because the log writer fell behind.",
            [(vec![], s.access_log_dropped)],
        )?;
        counter(
            e,
            "retries",
            "Requests retried on another replica of the pool.",
            s.retry
                .iter()
                .map(|(pool, r)| (vec![("pool", pool.as_str())], r.retries)),
        )?;
        counter(
            e,
            "retries_budget_exhausted",
            "Retries refused because the pool's retry budget was spent.",
            s.retry
                .iter()
                .map(|(pool, r)| (vec![("pool", pool.as_str())], r.retries_budget_exhausted)),
        )?;
        gauge_i64(
            e,
            "config_generation",
            "Generation of the config in force (1 at start, +1 per applied reload).",
            [(
                vec![],
                i64::try_from(s.config_generation).unwrap_or(i64::MAX),
            )],
        )?;
        counter(
            e,
            "reloads_failed",
            "Config reloads refused (invalid, or not applicable).",
            [(vec![], s.reloads_failed)],
        )?;
        if let Some(r) = &s.last_reload {
            gauge_f64(
                e,
                "last_reload_timestamp_seconds",
                "When the last config reload ended (Unix time).",
                [(vec![], r.time)],
            )?;
            gauge_i64(
                e,
                "last_reload_success",
                "1 when the last config reload was applied, 0 when it was refused.",
                [(vec![], bool_gauge(r.ok))],
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::RetryStats;

    #[test]
    fn retries_are_counters_per_pool() {
        let mut stats = Stats::default();
        stats.retry.insert(
            "default".into(),
            RetryStats {
                retries: 7,
                retries_budget_exhausted: 2,
            },
        );
        let text = render(&stats);
        assert!(text.contains("# TYPE portcullis_retries counter"), "{text}");
        assert!(
            text.contains("portcullis_retries_total{pool=\"default\"} 7"),
            "{text}"
        );
        assert!(
            text.contains("portcullis_retries_budget_exhausted_total{pool=\"default\"} 2"),
            "{text}"
        );
        // A source without retries has no rows (the families may be declared empty).
        let text = render(&Stats::default());
        assert!(!text.contains("portcullis_retries_total{"), "{text}");
    }

    #[test]
    fn upstreams_carry_their_pool() {
        let up = |url: &str, requests| crate::UpstreamStats {
            url: url.into(),
            requests,
            ..Default::default()
        };
        // A source without pools: its upstreams are the pool `default`.
        let mut stats = Stats {
            upstreams: vec![up("http://a:1", 3)],
            ..Stats::default()
        };
        let text = render(&stats);
        assert!(
            text.contains(
                "portcullis_upstream_requests_total{upstream=\"http://a:1\",tier=\"primary\",pool=\"default\"} 3"
            ),
            "{text}"
        );
        // With pools, each replica under its own pool, one in two pools twice.
        for (name, requests) in [("default", 3), ("gpu", 5)] {
            stats.pools.insert(
                name.into(),
                crate::PoolStats {
                    upstreams: vec![up("http://a:1", requests)],
                    ..Default::default()
                },
            );
        }
        let text = render(&stats);
        for (pool, n) in [("default", 3), ("gpu", 5)] {
            let series = format!(
                "portcullis_upstream_requests_total{{upstream=\"http://a:1\",tier=\"primary\",pool=\"{pool}\"}} {n}"
            );
            assert!(text.contains(&series), "{series}: {text}");
        }
        assert_eq!(
            text.matches("portcullis_upstream_requests_total{").count(),
            2
        );
    }
}
