//! A consecutive-failure circuit breaker: after `threshold` failures in a row
//! it opens and refuses calls for `open_for`, then lets one trial call
//! through (half-open); a success closes it, a failure opens it again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half-open",
        }
    }
}

#[derive(Debug)]
struct Inner {
    failures: u32,
    opened_at: Option<Instant>,
    trial_in_flight: bool,
}

#[derive(Debug)]
pub struct CircuitBreaker {
    threshold: u32,
    open_for: Duration,
    inner: Mutex<Inner>,
}

impl CircuitBreaker {
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            open_for,
            inner: Mutex::new(Inner {
                failures: 0,
                opened_at: None,
                trial_in_flight: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> BreakerState {
        let inner = self.lock();
        match inner.opened_at {
            None => BreakerState::Closed,
            Some(at) if at.elapsed() < self.open_for => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// Whether a call may go ahead now; `Err` carries the time until the
    /// breaker lets a trial call through.
    pub fn try_acquire(&self) -> Result<(), Duration> {
        let mut inner = self.lock();
        match inner.opened_at {
            None => Ok(()),
            Some(at) if at.elapsed() < self.open_for => Err(self.open_for - at.elapsed()),
            Some(_) if inner.trial_in_flight => Err(Duration::from_secs(1)),
            Some(_) => {
                inner.trial_in_flight = true;
                Ok(())
            }
        }
    }

    pub fn on_success(&self) {
        let mut inner = self.lock();
        inner.failures = 0;
        inner.opened_at = None;
        inner.trial_in_flight = false;
    }

    pub fn on_failure(&self) {
        let mut inner = self.lock();
        inner.failures = inner.failures.saturating_add(1);
        if inner.trial_in_flight || inner.failures >= self.threshold {
            inner.opened_at = Some(Instant::now());
        }
        inner.trial_in_flight = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_recovers_after_a_successful_trial() {
        let b = CircuitBreaker::new(2, Duration::from_millis(30));
        b.on_failure();
        assert_eq!(b.state(), BreakerState::Closed);
        b.on_failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.try_acquire().is_err());
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.try_acquire().is_ok(), "one trial call");
        assert!(b.try_acquire().is_err(), "only one trial at a time");
        b.on_success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn a_failed_trial_reopens() {
        let b = CircuitBreaker::new(1, Duration::from_millis(10));
        b.on_failure();
        std::thread::sleep(Duration::from_millis(15));
        assert!(b.try_acquire().is_ok());
        b.on_failure();
        assert_eq!(b.state(), BreakerState::Open);
    }
}
