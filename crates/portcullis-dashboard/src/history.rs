//! The last minute of each endpoint's load, kept by the server so that a dashboard opened
//! now starts with a full chart (`GET /balancer/stats/history`).
//!
//! A background task samples the [`StatsSource`](crate::StatsSource) every
//! [`HISTORY_INTERVAL`] and keeps the samples of the last [`HISTORY_WINDOW`]. It is owned by
//! the router: it stops when the router's last clone is dropped. Readers take the current
//! snapshot (an `Arc`) without waiting for the sampler; the sampler publishes a new one.
//!
//! The document carries ages, not timestamps, so the page needs no clock in common with the
//! server:
//!
//! ```json
//! {"interval_seconds": 2.0, "window_seconds": 60.0,
//!  "samples": [{"age_seconds": 4.0, "endpoints": {"/work": {"active": 8, "queue_depth": 3, "capacity": 8}}}]}
//! ```

use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often the history is sampled (the dashboard polls at the same pace).
pub const HISTORY_INTERVAL: Duration = Duration::from_secs(2);
/// How much history is kept.
pub const HISTORY_WINDOW: Duration = Duration::from_secs(60);

/// One endpoint in one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Point {
    /// Requests holding a slot.
    pub active: u64,
    /// Requests waiting for one.
    pub queue_depth: u64,
    /// The endpoint's capacity.
    pub capacity: u64,
}

#[derive(Debug)]
struct Sample {
    at: Instant,
    endpoints: BTreeMap<String, Point>,
}

/// The samples, newest last (each shared between successive snapshots, never copied).
#[derive(Debug)]
pub(crate) struct History {
    tx: watch::Sender<Arc<VecDeque<Arc<Sample>>>>,
}

/// One sample of the history document.
#[derive(Debug, Serialize)]
pub struct SampleDoc<'a> {
    /// Seconds between this sample and the document.
    pub age_seconds: f64,
    /// Per endpoint.
    pub endpoints: &'a BTreeMap<String, Point>,
}

/// The history document.
#[derive(Debug, Serialize)]
pub struct HistoryDoc<'a> {
    /// [`HISTORY_INTERVAL`] in seconds.
    pub interval_seconds: f64,
    /// [`HISTORY_WINDOW`] in seconds.
    pub window_seconds: f64,
    /// Oldest first.
    pub samples: Vec<SampleDoc<'a>>,
}

impl History {
    pub(crate) fn new() -> Self {
        Self {
            tx: watch::channel(Arc::new(VecDeque::new())).0,
        }
    }

    /// Adds a sample taken now and drops the ones older than [`HISTORY_WINDOW`].
    pub(crate) fn record(&self, endpoints: BTreeMap<String, Point>) {
        let now = Instant::now();
        let old = self.tx.borrow().clone();
        let mut samples: VecDeque<Arc<Sample>> = old
            .iter()
            .filter(|s| now.duration_since(s.at) < HISTORY_WINDOW)
            .cloned()
            .collect();
        samples.push_back(Arc::new(Sample { at: now, endpoints }));
        self.tx.send_replace(Arc::new(samples));
    }

    /// The history document as JSON.
    pub(crate) fn to_json(&self) -> Vec<u8> {
        let samples = self.tx.borrow().clone();
        let now = Instant::now();
        let doc = HistoryDoc {
            interval_seconds: HISTORY_INTERVAL.as_secs_f64(),
            window_seconds: HISTORY_WINDOW.as_secs_f64(),
            samples: samples
                .iter()
                .filter(|s| now.duration_since(s.at) < HISTORY_WINDOW)
                .map(|s| SampleDoc {
                    age_seconds: now.duration_since(s.at).as_secs_f64(),
                    endpoints: &s.endpoints,
                })
                .collect(),
        };
        serde_json::to_vec(&doc).unwrap_or_else(|_| b"{}".to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(active: u64) -> BTreeMap<String, Point> {
        BTreeMap::from([(
            "/work".to_owned(),
            Point {
                active,
                queue_depth: 0,
                capacity: 8,
            },
        )])
    }

    #[test]
    fn keeps_samples_in_order_with_ages() {
        let h = History::new();
        h.record(point(1));
        h.record(point(2));
        let doc: serde_json::Value = serde_json::from_slice(&h.to_json()).unwrap();
        let samples = doc["samples"].as_array().unwrap();
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0]["endpoints"]["/work"]["active"], 1);
        assert_eq!(samples[1]["endpoints"]["/work"]["active"], 2);
        assert!(
            samples[0]["age_seconds"].as_f64().unwrap()
                >= samples[1]["age_seconds"].as_f64().unwrap()
        );
        assert_eq!(doc["interval_seconds"], 2.0);
        assert_eq!(doc["window_seconds"], 60.0);
    }
}
