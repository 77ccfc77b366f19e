//! A log-bucket latency histogram in the spirit of HdrHistogram: values in nanoseconds, 7 bits of
//! mantissa per power of two, so every recorded value is kept within 1 % (0.8 %) of its truth, over
//! the full `u64` range, in a fixed 30 KB table. Recording is one shift and one increment.

use serde_json::{json, Value};

const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS; // 128 exact values below the first shift
const HALF: u64 = SUB / 2;
const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * HALF as usize + HALF as usize;

#[derive(Clone)]
pub struct Hist {
    counts: Vec<u64>,
    total: u64,
    max: u64,
    min: u64,
    sum: u128,
}

impl Default for Hist {
    fn default() -> Self {
        Self::new()
    }
}

impl Hist {
    pub fn new() -> Self {
        Hist { counts: vec![0; BUCKETS], total: 0, max: 0, min: u64::MAX, sum: 0 }
    }

    fn index(v: u64) -> usize {
        if v < SUB {
            return v as usize;
        }
        let e = (64 - v.leading_zeros()) - SUB_BITS; // >= 1; v >> e is in [64, 128)
        (e as u64 * HALF + (v >> e)) as usize
    }

    /// Midpoint of the bucket `i` covers.
    fn value_at(i: usize) -> u64 {
        let i = i as u64;
        if i < SUB {
            return i;
        }
        let e = i / HALF - 1;
        let m = i - e * HALF;
        (m << e) + ((1u64 << e) >> 1)
    }

    pub fn record(&mut self, nanos: u64) {
        self.counts[Self::index(nanos)] += 1;
        self.total += 1;
        self.sum += nanos as u128;
        self.max = self.max.max(nanos);
        self.min = self.min.min(nanos);
    }

    pub fn merge(&mut self, other: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += *b;
        }
        self.total += other.total;
        self.sum += other.sum;
        self.max = self.max.max(other.max);
        self.min = self.min.min(other.min);
    }

    #[allow(dead_code)]
    pub fn count(&self) -> u64 {
        self.total
    }

    /// Value at quantile `q` in [0, 1], in nanoseconds (0 when empty).
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::value_at(i).min(self.max).max(self.min);
            }
        }
        self.max
    }

    /// Percentiles in milliseconds, for JSON and the report.
    pub fn summary_ms(&self) -> Value {
        let ms = |ns: u64| (ns as f64 / 1e6 * 1000.0).round() / 1000.0;
        json!({
            "count": self.total,
            "mean_ms": if self.total == 0 { 0.0 } else { ms((self.sum / self.total as u128) as u64) },
            "p50_ms": ms(self.quantile(0.50)),
            "p75_ms": ms(self.quantile(0.75)),
            "p90_ms": ms(self.quantile(0.90)),
            "p95_ms": ms(self.quantile(0.95)),
            "p99_ms": ms(self.quantile(0.99)),
            "p999_ms": ms(self.quantile(0.999)),
            "p9999_ms": ms(self.quantile(0.9999)),
            "max_ms": ms(if self.total == 0 { 0 } else { self.max }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_continuous_and_precise() {
        for v in [0u64, 1, 127, 128, 129, 1000, 123_456, 9_999_999, u64::MAX / 3] {
            let i = Hist::index(v);
            assert!(i < BUCKETS);
            let back = Hist::value_at(i);
            let err = (back as f64 - v as f64).abs() / (v.max(1) as f64);
            assert!(err < 0.01, "{v} -> {back}");
        }
        let mut prev = 0;
        for v in 0..100_000u64 {
            let i = Hist::index(v);
            assert!(i == prev || i == prev + 1);
            prev = i;
        }
    }

    #[test]
    fn quantiles() {
        let mut h = Hist::new();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5) as f64;
        assert!((p50 - 500_000.0).abs() / 500_000.0 < 0.01);
        assert_eq!(h.count(), 1000);
    }
}
