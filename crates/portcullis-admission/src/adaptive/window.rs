//! One sampling window: the latencies and overload signals of the requests that ended in
//! it, recorded lock-free, and the [`Observation`] a controller reads when it closes.
//!
//! Latencies go into a log-linear histogram of atomic counters (16 buckets per power of
//! two of microseconds: every bucket is at most 6.25 % wide), so recording a sample is one
//! `fetch_add` and a window's quantile is read without sorting or allocating per sample.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Buckets per power of two.
const SUB: usize = 16;
const SUB_BITS: u32 = 4;
/// Powers of two covered: up to 2^40 µs (about 12 days); longer samples share the last.
const OCTAVES: usize = 40;
const BUCKETS: usize = SUB + (OCTAVES - SUB_BITS as usize) * SUB;

/// What a controller learns from one closed window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// The window's latency at the configured quantile (`sample_rtt`).
    pub sample_rtt: Duration,
    /// The smallest latency in the window.
    pub fastest: Duration,
    /// Samples in the window.
    pub samples: u64,
    /// Of those, the ones that ended in an overload signal (5xx, 429, transport error).
    pub overloaded: u64,
    /// The mean number of requests in flight during the window (Little's law: the sum of
    /// the samples' latencies over the window's length).
    pub inflight: f64,
    /// Requests waiting for a slot when the window closed.
    pub queued: usize,
}

impl Observation {
    /// An observation of `samples` requests that all took `rtt`, none overloaded, with
    /// `inflight` in flight on average and nobody queued (for tests and examples).
    pub fn uniform(rtt: Duration, samples: u64, inflight: f64) -> Self {
        Self {
            sample_rtt: rtt,
            fastest: rtt,
            samples,
            overloaded: 0,
            inflight,
            queued: 0,
        }
    }

    /// The same observation with `n` overload signals.
    pub fn with_overloaded(mut self, n: u64) -> Self {
        self.overloaded = n;
        self
    }

    /// The same observation with `n` requests queued.
    pub fn with_queued(mut self, n: usize) -> Self {
        self.queued = n;
        self
    }
}

/// The samples of the window in progress.
pub(crate) struct LatencyWindow {
    buckets: Box<[AtomicU64]>,
    overloaded: AtomicU64,
}

impl std::fmt::Debug for LatencyWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyWindow").finish_non_exhaustive()
    }
}

fn bucket_of(micros: u64) -> usize {
    if micros < SUB as u64 {
        return micros as usize;
    }
    let msb = 63 - micros.leading_zeros();
    let sub = ((micros >> (msb - SUB_BITS)) as usize) & (SUB - 1);
    ((msb - SUB_BITS + 1) as usize * SUB + sub).min(BUCKETS - 1)
}

/// The lowest latency (µs) of bucket `i` and its width.
fn bucket_range(i: usize) -> (f64, f64) {
    if i < SUB {
        return (i as f64, 1.0);
    }
    let octave = (i / SUB) as u32 + SUB_BITS - 1;
    let width = (1u64 << (octave - SUB_BITS)) as f64;
    let low = (1u64 << octave) as f64 + (i % SUB) as f64 * width;
    (low, width)
}

impl LatencyWindow {
    pub(crate) fn new() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            overloaded: AtomicU64::new(0),
        }
    }

    /// Records one request: one atomic add (two for an overloaded one).
    #[cfg(test)]
    pub(crate) fn record(&self, latency: Duration, overloaded: bool) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.record_micros(micros, overloaded);
    }

    /// Records one request that took `micros` µs.
    #[inline]
    pub(crate) fn record_micros(&self, micros: u64, overloaded: bool) {
        self.buckets[bucket_of(micros)].fetch_add(1, Ordering::Relaxed);
        if overloaded {
            self.overloaded.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The samples so far, without taking them.
    pub(crate) fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// Takes the window's samples (the counters restart at 0) and summarises them over a
    /// window that lasted `length`, with `queued` waiters at its end. `None` when it is
    /// empty. A sample recorded while this runs lands in this window or the next, never
    /// in both.
    pub(crate) fn close(
        &self,
        quantile: f64,
        length: Duration,
        queued: usize,
    ) -> Option<Observation> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.swap(0, Ordering::Relaxed))
            .collect();
        let overloaded = self.overloaded.swap(0, Ordering::Relaxed);
        summarise(&counts, overloaded, quantile, length, queued)
    }
}

fn summarise(
    counts: &[u64],
    overloaded: u64,
    quantile: f64,
    length: Duration,
    queued: usize,
) -> Option<Observation> {
    let samples: u64 = counts.iter().sum();
    if samples == 0 {
        return None;
    }
    let rank = (quantile * samples as f64).max(1.0);
    let (mut seen, mut sample_rtt, mut fastest, mut busy) = (0u64, None, None, 0.0f64);
    for (i, &n) in counts.iter().enumerate().filter(|(_, &n)| n > 0) {
        let (low, width) = bucket_range(i);
        fastest.get_or_insert(low);
        busy += n as f64 * (low + width / 2.0);
        if sample_rtt.is_none() && (seen + n) as f64 >= rank {
            // Interpolated inside the bucket.
            let into = (rank - seen as f64) / n as f64;
            sample_rtt = Some(low + width * into);
        }
        seen += n;
    }
    let micros = |us: f64| Duration::from_secs_f64(us / 1e6);
    let length = length.as_secs_f64().max(1e-6);
    Some(Observation {
        sample_rtt: micros(sample_rtt.unwrap_or(0.0)),
        fastest: micros(fastest.unwrap_or(0.0)),
        samples,
        overloaded: overloaded.min(samples),
        inflight: busy / 1e6 / length,
        queued,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_narrow() {
        let mut last = 0;
        for us in [
            0u64,
            1,
            15,
            16,
            17,
            31,
            32,
            100,
            1000,
            20_000,
            1 << 30,
            u64::MAX,
        ] {
            let b = bucket_of(us);
            assert!(b >= last, "{us}");
            last = b;
            let (low, width) = bucket_range(b);
            if us < 1 << 39 {
                assert!(
                    low <= us as f64 && (us as f64) < low + width,
                    "{us}: {low} {width}"
                );
                assert!(width <= (low * 0.0625).max(1.0), "{us}");
            }
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantile_fastest_and_littles_law() {
        let w = LatencyWindow::new();
        for ms in 1..=100u64 {
            w.record(Duration::from_millis(ms), ms > 95);
        }
        assert_eq!(w.count(), 100);
        let o = w.close(0.5, Duration::from_secs(1), 3).unwrap();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        assert!((ms(o.sample_rtt) - 50.0).abs() < 50.0 * 0.07, "{o:?}");
        assert!((ms(o.fastest) - 1.0).abs() < 0.07, "{o:?}");
        assert_eq!((o.samples, o.overloaded, o.queued), (100, 5, 3));
        // 5.05 s of work in a 1 s window: 5.05 in flight on average.
        assert!((o.inflight - 5.05).abs() < 0.2, "{o:?}");
        assert!(w.close(0.5, Duration::from_secs(1), 0).is_none(), "taken");
        let o = summarise(
            &{
                let mut c = vec![0; BUCKETS];
                c[bucket_of(20_000)] = 9;
                c[bucket_of(900_000)] = 1;
                c
            },
            0,
            0.9,
            Duration::from_secs(1),
            0,
        )
        .unwrap();
        assert!(
            ms(o.sample_rtt) < 21.5,
            "p90 of 9×20 ms + 1×900 ms is 20 ms: {o:?}"
        );
    }
}
