//! A token bucket: a tenant may spend up to `burst` at once, refilled at a
//! steady rate. It keeps two numbers per tenant and per kind of work, needs
//! no timer (it refills lazily on each take), and tells the caller how long
//! to wait when empty, which becomes `Retry-After`.

use std::time::Instant;

/// A steady rate and the burst above it. A rate of 0 means no limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_sec: f64,
    pub burst: u32,
}

impl Rate {
    pub fn is_off(&self) -> bool {
        self.per_sec <= 0.0
    }

    /// Seconds for an empty bucket to fill: the window of the quota.
    pub fn window_secs(&self) -> u64 {
        ceil_secs(f64::from(self.burst) / self.per_sec)
    }
}

/// What one take found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Take {
    pub allowed: bool,
    /// Whole tokens left after this take.
    pub remaining: u32,
    /// Seconds until the next token (when refused) or until the bucket is
    /// full again (when allowed).
    pub reset_secs: u64,
}

#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub fn full(rate: Rate, now: Instant) -> Self {
        Self {
            tokens: f64::from(rate.burst),
            at: now,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, rate: Rate, now: Instant) -> Take {
        let burst = f64::from(rate.burst);
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_sec).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Take {
                allowed: true,
                remaining: self.tokens.floor() as u32,
                reset_secs: ceil_secs((burst - self.tokens) / rate.per_sec),
            }
        } else {
            Take {
                allowed: false,
                remaining: 0,
                reset_secs: ceil_secs((1.0 - self.tokens) / rate.per_sec).max(1),
            }
        }
    }
}

fn ceil_secs(secs: f64) -> u64 {
    if secs.is_finite() && secs > 0.0 {
        secs.ceil() as u64
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refuses_until_it_refills() {
        let rate = Rate {
            per_sec: 2.0,
            burst: 3,
        };
        let start = Instant::now();
        let mut bucket = Bucket::full(rate, start);
        let takes: Vec<bool> = (0..4).map(|_| bucket.take(rate, start).allowed).collect();
        assert_eq!(takes, [true, true, true, false]);
        assert_eq!(bucket.take(rate, start).reset_secs, 1);
        let later = start + Duration::from_millis(600);
        let take = bucket.take(rate, later);
        assert!(take.allowed);
        assert_eq!(take.remaining, 0);
        assert_eq!(rate.window_secs(), 2);
    }
}
