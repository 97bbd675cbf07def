//! What a measure records: one latency per successful operation, errors counted by their code (the gRPC code
//! name, or the Kafka error), and the wall time, turned into throughput and percentiles.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

/// Collects the outcome of every operation of one measure.
#[derive(Debug, Clone)]
pub struct Recorder {
    name: String,
    started: Instant,
    finished: Option<Instant>,
    latencies: Vec<Duration>,
    errors: BTreeMap<String, u64>,
}

impl Recorder {
    /// Starts the clock now.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            started: Instant::now(),
            finished: None,
            latencies: Vec::new(),
            errors: BTreeMap::new(),
        }
    }

    /// Restarts the clock (after a warm-up), keeping nothing recorded so far.
    pub fn restart(&mut self) {
        self.started = Instant::now();
        self.finished = None;
        self.latencies.clear();
        self.errors.clear();
    }

    pub fn ok(&mut self, latency: Duration) {
        self.latencies.push(latency);
    }

    /// Counts one failed operation under `code` (e.g. `Unavailable`, `kafka:QueueFull`).
    pub fn error(&mut self, code: impl Into<String>) {
        *self.errors.entry(code.into()).or_default() += 1;
    }

    /// Stops the clock (the last operation's end); later calls keep the first stop.
    pub fn stop(&mut self) {
        self.finished.get_or_insert_with(Instant::now);
    }

    /// Stops the clock at a known instant (e.g. the arrival of the last record).
    pub fn stop_at(&mut self, at: Instant) {
        self.finished.get_or_insert(at);
    }

    /// Folds another recorder's operations into this one (per-task recorders of one measure).
    pub fn merge(&mut self, other: Recorder) {
        self.latencies.extend(other.latencies);
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
    }

    pub fn summary(&self) -> Summary {
        let elapsed = self
            .finished
            .unwrap_or_else(Instant::now)
            .saturating_duration_since(self.started);
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        let ok = sorted.len() as u64;
        let secs = elapsed.as_secs_f64();
        Summary {
            name: self.name.clone(),
            ok,
            errors: self.errors.clone(),
            elapsed,
            throughput: if secs > 0.0 { ok as f64 / secs } else { 0.0 },
            p50: percentile(&sorted, 0.50),
            p90: percentile(&sorted, 0.90),
            p99: percentile(&sorted, 0.99),
            max: sorted.last().copied().unwrap_or_default(),
        }
    }
}

/// The nearest-rank percentile of sorted samples (zero when there are none).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The figures of one measure.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub name: String,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub elapsed: Duration,
    /// Successful operations per second of wall time.
    pub throughput: f64,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Summary {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<34} {:>8} ok in {:>7.2} s = {:>9.1}/s   p50 {:>8.3} ms  p90 {:>8.3} ms  p99 {:>8.3} ms  max {:>8.3} ms",
            self.name,
            self.ok,
            self.elapsed.as_secs_f64(),
            self.throughput,
            ms(self.p50),
            ms(self.p90),
            ms(self.p99),
            ms(self.max),
        )?;
        if self.errors.is_empty() {
            write!(f, "   errors: none")
        } else {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(code, n)| format!("{code}={n}"))
                .collect();
            write!(f, "   errors: {}", list.join(", "))
        }
    }
}

/// One figure against its reference, with the target it is held to.
#[derive(Debug, Clone, PartialEq)]
pub struct Ratio {
    pub label: String,
    pub measured: f64,
    pub reference: f64,
    /// The ratio the issue asks for (measured / reference ≥ target).
    pub target: f64,
}

impl Ratio {
    pub fn value(&self) -> f64 {
        if self.reference > 0.0 {
            self.measured / self.reference
        } else {
            0.0
        }
    }

    pub fn met(&self) -> bool {
        self.value() >= self.target
    }
}

impl fmt::Display for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RATIO {}: {:.1} / {:.1} = {:.3} (target >= {:.2}: {})",
            self.label,
            self.measured,
            self.reference,
            self.value(),
            self.target,
            if self.met() { "met" } else { "MISSED" }
        )
    }
}

/// A latency figure against its ceiling.
pub fn verdict(label: &str, measured: Duration, ceiling: Duration) -> String {
    format!(
        "TARGET {label}: {:.3} ms (target < {:.0} ms: {})",
        ms(measured),
        ms(ceiling),
        if measured < ceiling { "met" } else { "MISSED" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn millis(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|m| Duration::from_millis(*m)).collect()
    }

    #[test]
    fn nearest_rank_percentiles() {
        let sorted = millis(&(1..=100).collect::<Vec<_>>());
        assert_eq!(percentile(&sorted, 0.50), Duration::from_millis(50));
        assert_eq!(percentile(&sorted, 0.90), Duration::from_millis(90));
        assert_eq!(percentile(&sorted, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&sorted, 1.0), Duration::from_millis(100));
        assert_eq!(percentile(&millis(&[7]), 0.99), Duration::from_millis(7));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }

    #[test]
    fn summary_counts_errors_by_code_and_merges_tasks() {
        let mut a = Recorder::new("x");
        a.ok(Duration::from_millis(2));
        a.error("Unavailable");
        let mut b = Recorder::new("x");
        b.ok(Duration::from_millis(4));
        b.error("Unavailable");
        b.error("DeadlineExceeded");
        a.merge(b);
        a.stop();
        let s = a.summary();
        assert_eq!(s.ok, 2);
        assert_eq!(s.errors.get("Unavailable"), Some(&2));
        assert_eq!(s.errors.get("DeadlineExceeded"), Some(&1));
        assert_eq!(s.error_count(), 3);
        assert_eq!(s.p50, Duration::from_millis(2));
        assert_eq!(s.max, Duration::from_millis(4));
        assert!(s.to_string().contains("Unavailable=2"));
    }

    #[test]
    fn ratios_compare_with_their_target() {
        let r = Ratio {
            label: "a/b".into(),
            measured: 70.0,
            reference: 100.0,
            target: 0.7,
        };
        assert!(r.met());
        assert!((r.value() - 0.7).abs() < 1e-9);
        let missed = Ratio {
            measured: 69.0,
            ..r
        };
        assert!(!missed.met());
        assert!(missed.to_string().contains("MISSED"));
    }
}
