//! `simulate`: a built-in handler with a configurable latency distribution and failure
//! rates, so the engine runs (demo, tests, benchmarks) with no external service.

use std::sync::Mutex;
use std::time::Duration;

use super::{BoxFuture, Handler, HandlerError, TaskInput};
use crate::domain::ErrorClass;

/// How the simulated receiver behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct SimulateConfig {
    /// Median latency of one delivery; zero makes the handler a no-op.
    pub latency_median: Duration,
    /// Log-normal spread (sigma); 0 makes every call take exactly the median.
    pub latency_sigma: f64,
    /// Probability that an attempt fails with a retryable NetworkError.
    pub transient_failure_rate: f64,
    /// Probability that an attempt fails with a permanent ValidationError.
    pub permanent_failure_rate: f64,
    /// Seed for reproducible runs; `None` seeds from the OS.
    pub seed: Option<u64>,
}

impl Default for SimulateConfig {
    fn default() -> Self {
        Self {
            latency_median: Duration::from_millis(20),
            latency_sigma: 0.5,
            transient_failure_rate: 0.0,
            permanent_failure_rate: 0.0,
            seed: None,
        }
    }
}

/// The simulate handler.
#[derive(Debug)]
pub struct Simulate {
    config: SimulateConfig,
    rng: Mutex<fastrand::Rng>,
}

impl Simulate {
    pub fn new(config: SimulateConfig) -> Self {
        let rng = config
            .seed
            .map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed);
        Self {
            config,
            rng: Mutex::new(rng),
        }
    }

    /// Draws (latency, failure) for one attempt.
    fn draw(&self) -> (Duration, Option<HandlerError>) {
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        let c = &self.config;
        let latency = if c.latency_median.is_zero() {
            Duration::ZERO
        } else {
            // Box-Muller: a standard normal from two uniforms; capped at 20x the median.
            let (u1, u2) = (rng.f64().max(f64::MIN_POSITIVE), rng.f64());
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            c.latency_median
                .mul_f64((c.latency_sigma * z).exp().min(20.0))
        };
        let roll = rng.f64();
        let failure = if roll < c.permanent_failure_rate {
            Some(HandlerError::new(
                ErrorClass::ValidationError,
                "simulated permanent failure",
            ))
        } else if roll < c.permanent_failure_rate + c.transient_failure_rate {
            Some(HandlerError::new(
                ErrorClass::NetworkError,
                "simulated transient failure",
            ))
        } else {
            None
        };
        (latency, failure)
    }
}

impl Handler for Simulate {
    fn deliver<'a>(&'a self, task: &'a TaskInput) -> BoxFuture<'a, Result<u32, HandlerError>> {
        let (latency, failure) = self.draw();
        Box::pin(async move {
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            match failure {
                Some(e) => Err(e),
                None => Ok(task.quantity),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> TaskInput {
        TaskInput {
            order_id: uuid::Uuid::nil(),
            task_id: 1,
            seq: 0,
            kind: "simulate".into(),
            target: "t".into(),
            quantity: 7,
            attempt: 1,
            idempotency_key: "k".into(),
            trace_context: None,
        }
    }

    #[tokio::test]
    async fn no_failures_delivers_everything() {
        let h = Simulate::new(SimulateConfig {
            latency_median: Duration::ZERO,
            seed: Some(1),
            ..Default::default()
        });
        for _ in 0..100 {
            assert_eq!(h.deliver(&input()).await, Ok(7));
        }
    }

    #[tokio::test]
    async fn failure_rates_are_honoured() {
        let h = Simulate::new(SimulateConfig {
            latency_median: Duration::ZERO,
            transient_failure_rate: 0.3,
            permanent_failure_rate: 0.1,
            seed: Some(7),
            ..Default::default()
        });
        let (mut transient, mut permanent) = (0, 0);
        for _ in 0..10_000 {
            match h.deliver(&input()).await {
                Err(e) if e.class == ErrorClass::NetworkError => transient += 1,
                Err(e) if e.class == ErrorClass::ValidationError => permanent += 1,
                Err(e) => panic!("unexpected {e}"),
                Ok(_) => {}
            }
        }
        assert!((2700..3300).contains(&transient), "transient {transient}");
        assert!((800..1200).contains(&permanent), "permanent {permanent}");
    }

    #[test]
    fn latency_follows_the_median() {
        let h = Simulate::new(SimulateConfig {
            latency_median: Duration::from_millis(100),
            latency_sigma: 0.5,
            seed: Some(3),
            ..Default::default()
        });
        let mut v: Vec<Duration> = (0..2001).map(|_| h.draw().0).collect();
        v.sort();
        let median = v[1000].as_secs_f64();
        assert!((0.09..0.11).contains(&median), "median {median}");
        assert!(v.iter().all(|d| *d <= Duration::from_secs(2)));
    }
}
