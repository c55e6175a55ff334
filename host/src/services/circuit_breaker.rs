//! Consecutive-failure circuit breakers: after `threshold` failures in a row
//! a breaker opens and refuses calls for `open_for`, then lets one trial call
//! through (half-open); a success closes it, a failure opens it again.
//! A tenant's breaker is consulted before the service's, so a tenant that is
//! paused never takes (and strands) the service's half-open trial.
//!
//! [`CircuitBreaker`] is one breaker (a plugin's). [`TenantBreakers`] is a
//! peer service's: one breaker per tenant, so a tenant whose calls fail (a
//! hostile body, a path the service chokes on) pauses only its own calls, and
//! a service-wide breaker fed only by failures no tenant can cause (the
//! service cannot be reached at all) and closed only by a real answer.
//! Readiness shows only the service-wide state and how many tenants are
//! paused, never which. Only breakers with failures are kept, and their
//! number is capped, so 10,000 tenants cost little memory.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most tenants whose breakers (with failures) one service keeps at once.
const MAX_TRACKED_TENANTS: usize = 20_000;

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

/// One breaker's state, without its lock or settings.
#[derive(Debug, Default, Clone)]
struct Core {
    failures: u32,
    opened_at: Option<Instant>,
    /// When the half-open trial call started: a trial whose outcome never
    /// came (its caller was cancelled) stops blocking after `open_for`.
    trial_since: Option<Instant>,
}

impl Core {
    fn state(&self, open_for: Duration) -> BreakerState {
        match self.opened_at {
            None => BreakerState::Closed,
            Some(at) if at.elapsed() < open_for => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    fn try_acquire(&mut self, open_for: Duration) -> Result<(), Duration> {
        match self.opened_at {
            None => Ok(()),
            Some(at) if at.elapsed() < open_for => Err(open_for - at.elapsed()),
            Some(_) if self.trial_since.is_some_and(|t| t.elapsed() < open_for) => {
                Err(Duration::from_secs(1))
            }
            Some(_) => {
                self.trial_since = Some(Instant::now());
                Ok(())
            }
        }
    }

    fn on_failure(&mut self, threshold: u32) {
        self.failures = self.failures.saturating_add(1);
        if self.trial_since.is_some() || self.failures >= threshold {
            self.opened_at = Some(Instant::now());
        }
        self.trial_since = None;
    }
}

#[derive(Debug)]
pub struct CircuitBreaker {
    threshold: u32,
    open_for: Duration,
    inner: Mutex<Core>,
}

impl CircuitBreaker {
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            open_for,
            inner: Mutex::new(Core::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Core> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> BreakerState {
        self.lock().state(self.open_for)
    }

    /// Whether a call may go ahead now; `Err` carries the time until the
    /// breaker lets a trial call through.
    pub fn try_acquire(&self) -> Result<(), Duration> {
        self.lock().try_acquire(self.open_for)
    }

    pub fn on_success(&self) {
        *self.lock() = Core::default();
    }

    pub fn on_failure(&self) {
        self.lock().on_failure(self.threshold);
    }

    /// The call was neither a success nor a failure of this breaker: a
    /// half-open trial it held is given back (the next call is the trial).
    fn release_trial(&self) {
        self.lock().trial_since = None;
    }
}

/// A peer service's breakers: one per tenant (`""` for the host's own
/// calls) and one for the service as a whole.
#[derive(Debug)]
pub struct TenantBreakers {
    threshold: u32,
    open_for: Duration,
    tenants: Mutex<HashMap<String, Core>>,
    /// Opened only by failures to reach the service at all.
    service: CircuitBreaker,
}

impl TenantBreakers {
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            open_for,
            tenants: Mutex::new(HashMap::new()),
            service: CircuitBreaker::new(threshold, open_for),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Core>> {
        self.tenants.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The service-wide state (readiness): open only when the service
    /// cannot be reached. A tenant's breaker is nobody else's business.
    pub fn state(&self) -> BreakerState {
        self.service.state()
    }

    /// How many tenants' breakers are open or half-open now (which ones is
    /// not told).
    pub fn paused_tenants(&self) -> usize {
        self.lock()
            .values()
            .filter(|c| c.opened_at.is_some())
            .count()
    }

    /// The state of one tenant's breaker.
    #[cfg(test)]
    fn tenant_state(&self, tenant: &str) -> BreakerState {
        self.lock()
            .get(tenant)
            .map_or(BreakerState::Closed, |c| c.state(self.open_for))
    }

    /// Whether `tenant` may call now: its own breaker first (without taking
    /// its trial), then the service's, then the tenant's trial if any. A
    /// paused tenant thus never takes the service's half-open trial.
    pub fn try_acquire(&self, tenant: &str) -> Result<(), Duration> {
        let mut tenants = self.lock();
        if let Some(core) = tenants.get(tenant) {
            // A copy: only a time-based reopening can change it meanwhile,
            // and that only turns a refusal into a grant.
            core.clone().try_acquire(self.open_for)?;
        }
        self.service.try_acquire()?;
        match tenants.get_mut(tenant) {
            Some(core) => core.try_acquire(self.open_for),
            None => Ok(()),
        }
    }

    /// The service answered (even a refusal): it can be reached.
    pub fn on_success(&self, tenant: &str) {
        self.service.on_success();
        self.lock().remove(tenant);
    }

    /// A call of `tenant` failed; `unreachable` when the service could not
    /// be reached at all (no tenant can cause that). Any other failure
    /// neither opens nor closes the service's breaker (the call may have
    /// started before it opened); it only gives back a trial it held.
    pub fn on_failure(&self, tenant: &str, unreachable: bool) {
        if unreachable {
            self.service.on_failure();
        } else {
            self.service.release_trial();
        }
        let mut tenants = self.lock();
        if !tenants.contains_key(tenant) && !make_room(&mut tenants, self.open_for) {
            return;
        }
        tenants
            .entry(tenant.to_owned())
            .or_default()
            .on_failure(self.threshold);
    }

    /// How many tenants' breakers are kept now.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.lock().len()
    }
}

/// Makes room for one more tenant: drops breakers that are not open first,
/// then open ones whose pause is over. `false` when every kept breaker is
/// still open (the newcomer is not tracked; its calls stay allowed).
fn make_room(tenants: &mut HashMap<String, Core>, open_for: Duration) -> bool {
    if tenants.len() < MAX_TRACKED_TENANTS {
        return true;
    }
    tenants.retain(|_, c| c.opened_at.is_some());
    if tenants.len() < MAX_TRACKED_TENANTS {
        return true;
    }
    tenants.retain(|_, c| c.state(open_for) == BreakerState::Open);
    tenants.len() < MAX_TRACKED_TENANTS
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

    #[test]
    fn a_trial_that_never_reports_stops_blocking() {
        let b = CircuitBreaker::new(1, Duration::from_millis(10));
        b.on_failure();
        std::thread::sleep(Duration::from_millis(15));
        assert!(
            b.try_acquire().is_ok(),
            "the trial (its caller is then cancelled)"
        );
        std::thread::sleep(Duration::from_millis(15));
        assert!(b.try_acquire().is_ok(), "another trial after open_for");
    }

    #[test]
    fn one_tenants_failures_open_only_its_own_breaker() {
        let b = TenantBreakers::new(2, Duration::from_secs(30));
        b.on_failure("a", false);
        b.on_failure("a", false);
        assert!(b.try_acquire("a").is_err());
        assert!(b.try_acquire("b").is_ok());
        assert_eq!(b.tenant_state("a"), BreakerState::Open);
        assert_eq!(b.tenant_state("b"), BreakerState::Closed);
        assert_eq!(b.state(), BreakerState::Closed, "readiness names no tenant");
        assert_eq!(b.paused_tenants(), 1);
    }

    #[test]
    fn a_paused_tenant_does_not_strand_the_services_trial() {
        let b = TenantBreakers::new(1, Duration::from_millis(30));
        b.on_failure("x", true);
        std::thread::sleep(Duration::from_millis(40));
        let open = Core {
            failures: 1,
            opened_at: Some(Instant::now()),
            trial_since: None,
        };
        b.lock().insert("a".into(), open);
        assert!(b.try_acquire("a").is_err(), "a is paused");
        assert!(b.try_acquire("b").is_ok(), "the service's trial is free");
        b.on_success("b");
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn a_paused_service_does_not_strand_a_tenants_trial() {
        let b = TenantBreakers::new(1, Duration::from_millis(30));
        b.on_failure("a", false);
        std::thread::sleep(Duration::from_millis(40));
        b.on_failure("x", true);
        assert!(b.try_acquire("a").is_err(), "the service is paused");
        assert_eq!(b.tenant_state("a"), BreakerState::HalfOpen);
        assert!(b.lock().get("a").is_some_and(|c| c.trial_since.is_none()));
    }

    #[test]
    fn only_a_real_answer_closes_the_service_breaker() {
        let b = TenantBreakers::new(1, Duration::from_millis(30));
        b.on_failure("a", true);
        b.on_failure("b", false);
        assert_eq!(b.state(), BreakerState::Open, "a reached-but-failed call");
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.try_acquire("c").is_ok(), "the trial");
        b.on_failure("c", false);
        assert!(b.try_acquire("d").is_ok(), "the trial was given back");
        b.on_success("d");
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn an_unreachable_service_opens_for_everyone() {
        let b = TenantBreakers::new(2, Duration::from_secs(30));
        b.on_failure("a", true);
        b.on_failure("b", true);
        assert!(b.try_acquire("c").is_err());
    }

    #[test]
    fn successes_forget_tenants_and_the_map_stays_bounded() {
        let b = TenantBreakers::new(3, Duration::from_secs(30));
        b.on_failure("a", false);
        b.on_success("a");
        assert_eq!(b.tracked(), 0);
        for i in 0..MAX_TRACKED_TENANTS + 50 {
            b.on_failure(&format!("t{i}"), false);
        }
        assert!(b.tracked() <= MAX_TRACKED_TENANTS);
    }
}
