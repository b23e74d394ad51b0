//! Latency samples, percentiles and the printed or JSON report.
use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// Samples per operation name.
#[derive(Default, Clone)]
pub struct Samples {
    pub by_op: BTreeMap<&'static str, Vec<Duration>>,
}

impl Samples {
    pub fn add(&mut self, op: &'static str, d: Duration) {
        self.by_op.entry(op).or_default().push(d);
    }

    pub fn merge(&mut self, other: Samples) {
        for (k, mut v) in other.by_op {
            self.by_op.entry(k).or_default().append(&mut v);
        }
    }

    pub fn summary(&self) -> Vec<OpSummary> {
        self.by_op
            .iter()
            .map(|(op, v)| OpSummary::of(op, v))
            .collect()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct OpSummary {
    pub op: String,
    pub count: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl OpSummary {
    pub fn of(op: &str, v: &[Duration]) -> OpSummary {
        let mut s = v.to_vec();
        s.sort();
        OpSummary {
            op: op.to_string(),
            count: s.len(),
            p50_ms: ms(percentile(&s, 50.0)),
            p90_ms: ms(percentile(&s, 90.0)),
            p99_ms: ms(percentile(&s, 99.0)),
            max_ms: ms(s.last().copied().unwrap_or_default()),
        }
    }
}

pub fn print_table(rows: &[OpSummary]) {
    println!(
        "{:<28} {:>8} {:>10} {:>10} {:>10} {:>10}",
        "operation", "count", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    for r in rows {
        println!(
            "{:<28} {:>8} {:>10.3} {:>10.3} {:>10.3} {:>10.3}",
            r.op, r.count, r.p50_ms, r.p90_ms, r.p99_ms, r.max_ms
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&v, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&v, 100.0), Duration::from_millis(100));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
        let s = OpSummary::of("x", &[Duration::from_micros(1500)]);
        assert_eq!((s.count, s.p50_ms, s.max_ms), (1, 1.5, 1.5));
    }
}
