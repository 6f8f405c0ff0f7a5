//! A lock-free latency histogram with fixed buckets, cheap enough to observe
//! on every call (one relaxed add per bucket and one for the sum).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{MetricEncoder, NoLabelSet};

/// Upper bounds of the buckets, in microseconds (100 µs to 10 s; a last
/// bucket takes the rest).
const LATENCY_BOUNDS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// Per-bucket counts; the encoder makes them cumulative.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl LatencyHistogram {
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = LATENCY_BOUNDS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    pub(crate) fn encode(&self, enc: &mut MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut buckets = [(0.0, 0u64); LATENCY_BOUNDS_US.len() + 1];
        for (i, b) in buckets.iter_mut().enumerate() {
            let bound = LATENCY_BOUNDS_US
                .get(i)
                .map_or(f64::INFINITY, |&us| us as f64 / 1e6);
            *b = (bound, self.buckets[i].load(Ordering::Relaxed));
        }
        let count = buckets.iter().map(|b| b.1).sum();
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        enc.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_sum() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        assert_eq!(h.count(), 4);
        assert_eq!(h.buckets[0].load(Ordering::Relaxed), 2, "<= 100 µs");
        assert_eq!(h.buckets[5].load(Ordering::Relaxed), 1, "<= 5 ms");
        assert_eq!(h.buckets[16].load(Ordering::Relaxed), 1, "+Inf");
    }
}
