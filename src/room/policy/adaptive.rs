//! Adaptive rate: an AIMD controller fed by origin probes. Trouble (error, timeout, latency
//! over target) halves the rate at once; a healthy probe adds a twentieth of the range. The
//! rate always stays within [min, max]. A failed probe can only lower the rate.

use super::Adaptive;

/// Multiplicative decrease on trouble: halving reacts within one probe.
const DECREASE: f64 = 0.5;
/// Additive increase per healthy probe, as a fraction of (max − min): ~20 probes from min to max.
const INCREASE_FRACTION: f64 = 0.05;
/// Weight of a new healthy sample in the latency baseline.
const BASELINE_WEIGHT: f64 = 0.2;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ProbeResult {
    Ok { latency_ms: f64, status: u16 },
    Failed,
}

#[derive(Debug, Clone)]
pub struct Controller {
    pub rate: f64,
    /// Moving average of healthy probe latency.
    pub baseline_ms: Option<f64>,
    pub last_latency_ms: Option<f64>,
}

impl Controller {
    /// Starts at `initial` (the room's configured rate) clamped into range.
    pub fn new(initial: f64, policy: &Adaptive) -> Self {
        Self { rate: initial.clamp(policy.min_per_minute, policy.max_per_minute), baseline_ms: None, last_latency_ms: None }
    }

    pub fn on_probe(&mut self, result: ProbeResult, policy: &Adaptive) -> f64 {
        let healthy = match result {
            ProbeResult::Ok { latency_ms, status } => {
                self.last_latency_ms = Some(latency_ms);
                let ok = status < 500 && latency_ms <= policy.target_latency_ms as f64;
                if ok {
                    self.baseline_ms = Some(match self.baseline_ms {
                        Some(b) => b + BASELINE_WEIGHT * (latency_ms - b),
                        None => latency_ms,
                    });
                }
                ok
            }
            ProbeResult::Failed => {
                self.last_latency_ms = None;
                false
            }
        };
        let range = policy.max_per_minute - policy.min_per_minute;
        self.rate = if healthy { self.rate + INCREASE_FRACTION * range.max(1.0) } else { self.rate * DECREASE };
        self.rate = self.rate.clamp(policy.min_per_minute, policy.max_per_minute);
        self.rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Adaptive {
        Adaptive { probe_url: "http://o/health".into(), interval_seconds: 5, target_latency_ms: 200, min_per_minute: 10.0, max_per_minute: 1000.0 }
    }

    #[test]
    fn cuts_on_trouble_restores_slowly_stays_in_bounds() {
        let p = policy();
        let mut c = Controller::new(1000.0, &p);
        assert_eq!(c.on_probe(ProbeResult::Ok { latency_ms: 500.0, status: 200 }, &p), 500.0);
        assert_eq!(c.on_probe(ProbeResult::Failed, &p), 250.0);
        assert_eq!(c.on_probe(ProbeResult::Ok { latency_ms: 10.0, status: 503 }, &p), 125.0);
        for _ in 0..100 {
            c.on_probe(ProbeResult::Failed, &p);
        }
        assert_eq!(c.rate, 10.0, "never below min");
        let r1 = c.on_probe(ProbeResult::Ok { latency_ms: 50.0, status: 200 }, &p);
        assert!((r1 - 59.5).abs() < 1e-9, "additive increase: {r1}");
        for _ in 0..100 {
            c.on_probe(ProbeResult::Ok { latency_ms: 50.0, status: 200 }, &p);
        }
        assert_eq!(c.rate, 1000.0, "never above max");
        assert_eq!(c.baseline_ms, Some(50.0));
    }

    #[test]
    fn unreachable_origin_never_raises_the_rate() {
        let p = policy();
        let mut c = Controller::new(20.0, &p);
        let mut last = c.rate;
        for _ in 0..50 {
            let r = c.on_probe(ProbeResult::Failed, &p);
            assert!(r <= last);
            last = r;
        }
    }
}
