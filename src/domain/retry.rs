//! The retry delay: `delay(attempt) = min(cap, base × multiplier^(attempt−1))`, jittered.
//!
//! Jitter only ever shortens the delay ("equal jitter" downwards): the result lies in
//! `[raw × (1 − jitter), raw]`. With `jitter ≤ 1 − 1/multiplier` the jittered delay is
//! still monotone in the attempt number up to the cap, which [`Backoff::new`] enforces,
//! so a later attempt never waits less than an earlier one.
//! The random draw is a parameter, so the function stays pure and testable.

use std::time::Duration;

/// A validated exponential backoff policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    base: Duration,
    multiplier: f64,
    cap: Duration,
    jitter: f64,
}

/// Why a backoff policy is invalid; names the offending parameter.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackoffError {
    #[error("backoff base must be greater than 0 s and at most the cap")]
    Base,
    #[error("backoff multiplier must be between 1 and 10, got {0}")]
    Multiplier(f64),
    #[error("backoff jitter must be between 0 and {max} (1 - 1/multiplier), got {got}")]
    Jitter { got: f64, max: f64 },
}

impl Backoff {
    /// Runbook defaults: base 5 s, multiplier 2, cap 1 h, 20 % jitter.
    pub const DEFAULT: Backoff = Backoff {
        base: Duration::from_secs(5),
        multiplier: 2.0,
        cap: Duration::from_secs(3600),
        jitter: 0.2,
    };

    pub fn new(
        base: Duration,
        multiplier: f64,
        cap: Duration,
        jitter: f64,
    ) -> Result<Self, BackoffError> {
        if base.is_zero() || base > cap {
            return Err(BackoffError::Base);
        }
        if !(1.0..=10.0).contains(&multiplier) {
            return Err(BackoffError::Multiplier(multiplier));
        }
        let max = 1.0 - 1.0 / multiplier;
        if !(0.0..=max).contains(&jitter) || jitter.is_nan() {
            return Err(BackoffError::Jitter { got: jitter, max });
        }
        Ok(Self {
            base,
            multiplier,
            cap,
            jitter,
        })
    }

    /// The delay before the retry that follows failed attempt `attempt` (1-based), without jitter.
    pub fn raw(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(1024) as i32;
        let secs = self.base.as_secs_f64() * self.multiplier.powi(exp);
        if !secs.is_finite() || secs >= self.cap.as_secs_f64() {
            self.cap
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The jittered delay; `draw` is a uniform random number in `[0, 1)`.
    pub fn delay(&self, attempt: u32, draw: f64) -> Duration {
        let draw = draw.clamp(0.0, 1.0);
        self.raw(attempt).mul_f64(1.0 - self.jitter * draw)
    }

    /// The bounds `delay(attempt, _)` stays within.
    pub fn bounds(&self, attempt: u32) -> (Duration, Duration) {
        let raw = self.raw(attempt);
        (raw.mul_f64(1.0 - self.jitter), raw)
    }

    pub fn jitter(&self) -> f64 {
        self.jitter
    }

    pub fn base(&self) -> Duration {
        self.base
    }
    pub fn cap(&self) -> Duration {
        self.cap
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn runbook_defaults_double_from_five_seconds() {
        let b = Backoff::DEFAULT;
        assert_eq!(b.raw(1), Duration::from_secs(5));
        assert_eq!(b.raw(2), Duration::from_secs(10));
        assert_eq!(b.raw(3), Duration::from_secs(20));
        assert_eq!(b.raw(40), Duration::from_secs(3600));
        assert_eq!(b.delay(1, 0.0), Duration::from_secs(5));
        assert_eq!(b.delay(1, 0.5), Duration::from_millis(4500));
    }

    #[test]
    fn invalid_policies_name_the_parameter() {
        let s = Duration::from_secs(1);
        assert_eq!(
            Backoff::new(Duration::ZERO, 2.0, s, 0.1),
            Err(BackoffError::Base)
        );
        assert!(matches!(
            Backoff::new(s, 0.5, s * 10, 0.1),
            Err(BackoffError::Multiplier(_))
        ));
        let err = Backoff::new(s, 2.0, s * 10, 0.9).unwrap_err();
        assert!(err.to_string().contains("jitter"));
    }

    fn policy() -> impl Strategy<Value = Backoff> {
        (1u64..=60_000, 1.0f64..=10.0, 1u64..=86_400, 0.0f64..=1.0).prop_filter_map(
            "valid policy",
            |(base_ms, mult, cap_s, j)| {
                let max_j = 1.0 - 1.0 / mult;
                Backoff::new(
                    Duration::from_millis(base_ms),
                    mult,
                    Duration::from_secs(cap_s).max(Duration::from_millis(base_ms)),
                    j * max_j,
                )
                .ok()
            },
        )
    }

    proptest! {
        #[test]
        fn delay_stays_within_jitter_bounds(b in policy(), attempt in 1u32..=200, draw in 0.0f64..1.0) {
            let d = b.delay(attempt, draw);
            let (lo, hi) = b.bounds(attempt);
            prop_assert!(d >= lo && d <= hi, "{d:?} not in [{lo:?}, {hi:?}]");
            prop_assert!(hi <= b.cap());
        }

        #[test]
        fn raw_delay_is_monotone_up_to_the_cap(b in policy(), attempt in 1u32..=200) {
            prop_assert!(b.raw(attempt + 1) >= b.raw(attempt));
            prop_assert!(b.raw(attempt) >= b.base().min(b.cap()));
        }

        #[test]
        fn jittered_delay_never_shrinks_below_the_cap(
            b in policy(), attempt in 1u32..=8, d1 in 0.0f64..1.0, d2 in 0.0f64..1.0,
        ) {
            prop_assume!(b.raw(attempt + 1) < b.cap());
            // Any draw for the later attempt waits at least as long as any draw for the earlier
            // one (1 µs slack for f64 rounding).
            prop_assert!(b.delay(attempt + 1, d2) + Duration::from_micros(1) >= b.delay(attempt, d1));
        }
    }
}
