//! Restart delays for the supervisor.

use std::time::Duration;

/// Exponential backoff between `min` and `max`, validated at construction so `min <= d <= max`
/// holds for every attempt.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    min: Duration,
    max: Duration,
}

/// Invalid backoff bounds.
#[derive(Debug, thiserror::Error)]
#[error("backoff bounds are invalid: min {min:?} must be > 0 and <= max {max:?}")]
pub struct BackoffError {
    min: Duration,
    max: Duration,
}

impl Backoff {
    /// Delays start at `min` and double up to `max`.
    pub fn try_new(min: Duration, max: Duration) -> Result<Self, BackoffError> {
        if min.is_zero() || min > max {
            return Err(BackoffError { min, max });
        }
        Ok(Self { min, max })
    }

    /// Delay before restart number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        self.min
            .checked_mul(1 << doublings)
            .unwrap_or(self.max)
            .min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_within_bounds_for_any_attempt() {
        for (min_ms, max_ms) in [
            (1, 1),
            (1, 10),
            (250, 10_000),
            (500, 499_999),
            (7, 7_000_000),
        ] {
            let b = Backoff::try_new(Duration::from_millis(min_ms), Duration::from_millis(max_ms))
                .unwrap();
            let mut previous = Duration::ZERO;
            for attempt in [0, 1, 2, 3, 10, 31, 32, 64, u32::MAX] {
                let d = b.delay(attempt);
                assert!(d >= b.min && d <= b.max, "{d:?} for attempt {attempt}");
                assert!(d >= previous, "delays never shrink");
                previous = d;
            }
        }
    }

    #[test]
    fn invalid_bounds_are_rejected() {
        assert!(Backoff::try_new(Duration::ZERO, Duration::from_secs(1)).is_err());
        assert!(Backoff::try_new(Duration::from_secs(2), Duration::from_secs(1)).is_err());
    }
}
