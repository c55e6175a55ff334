//! Plugin call slots, shared fairly among tenants. A replica runs at most
//! `total` calls at once (the pooling allocator has that many instance
//! slots); each tenant that is busy (running or waiting) gets an equal
//! share, `total / busy tenants` (at least one), so tenants that flood the
//! pool with slow calls shrink to their share as soon as a quiet tenant
//! shows up, and the quiet tenant's calls get the next free slot. A tenant
//! may go over its share while slots are free and no waiting tenant is
//! below its own, so the pool is never left idle while calls are refused. A
//! call waits (bounded) for a slot before it is refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Debug)]
pub struct CallSlots {
    total: usize,
    state: Mutex<State>,
    /// Signalled when a change can let a waiter in: a slot freed or a
    /// tenant no longer busy or no longer waiting, while calls wait.
    freed: Notify,
}

#[derive(Debug, Default)]
struct State {
    running: usize,
    /// Calls waiting, over all tenants.
    waiting: usize,
    /// Busy tenants only: an entry goes when it runs and waits for nothing.
    tenants: HashMap<String, Busy>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Busy {
    running: usize,
    waiting: usize,
}

/// A held call slot; freed when dropped.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<CallSlots>,
    tenant: String,
}

/// A call waiting for a slot; stops counting as waiting when dropped
/// (also when the waiting request is abandoned).
struct Waiter<'a> {
    slots: &'a CallSlots,
    tenant: &'a str,
}

impl CallSlots {
    pub fn new(total: usize) -> Arc<Self> {
        Arc::new(Self {
            total: total.max(1),
            state: Mutex::new(State::default()),
            freed: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a slot for `tenant` if the pool and its share allow.
    fn try_take(&self, state: &mut State, tenant: &str) -> bool {
        let busy = state.tenants.len() + usize::from(!state.tenants.contains_key(tenant));
        let share = (self.total / busy.max(1)).max(1);
        let running = state.running;
        let others_need = || {
            state
                .tenants
                .iter()
                .any(|(t, b)| t != tenant && b.waiting > 0 && b.running < share)
        };
        let under_share = state.tenants.get(tenant).map_or(0, |b| b.running) < share;
        let allowed = running < self.total && (under_share || !others_need());
        let own = state.tenants.entry(tenant.to_owned()).or_default();
        if allowed {
            own.running += 1;
            state.running += 1;
            true
        } else {
            if own.running == 0 && own.waiting == 0 {
                state.tenants.remove(tenant);
            }
            false
        }
    }

    /// A slot for one of `tenant`'s calls, waiting at most `wait` for one.
    pub async fn acquire(self: &Arc<Self>, tenant: &str, wait: Duration) -> Option<Slot> {
        let slot = || Slot {
            slots: self.clone(),
            tenant: tenant.to_owned(),
        };
        if self.try_take(&mut self.lock(), tenant) {
            return Some(slot());
        }
        if wait.is_zero() {
            return None;
        }
        let deadline = tokio::time::Instant::now() + wait;
        {
            let mut state = self.lock();
            state.waiting += 1;
            state.tenants.entry(tenant.to_owned()).or_default().waiting += 1;
        }
        // Counts as busy from here: the others' shares shrink at once.
        let _waiter = Waiter {
            slots: self,
            tenant,
        };
        loop {
            let notified = self.freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.try_take(&mut self.lock(), tenant) {
                return Some(slot());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// Calls running now (for tests and stats).
    pub fn running(&self) -> usize {
        self.lock().running
    }

    /// Frees a slot (`running`) or a wait, waking the waiters only when
    /// that can let one of them in.
    fn release(&self, tenant: &str, running: bool) {
        let wake = {
            let mut state = self.lock();
            if running {
                state.running = state.running.saturating_sub(1);
            } else {
                state.waiting = state.waiting.saturating_sub(1);
            }
            let mut changed = running;
            if let Some(own) = state.tenants.get_mut(tenant) {
                if running {
                    own.running = own.running.saturating_sub(1);
                } else {
                    own.waiting = own.waiting.saturating_sub(1);
                    // Others may now borrow over their share.
                    changed |= own.waiting == 0;
                }
                if own.running == 0 && own.waiting == 0 {
                    // One busy tenant fewer: the others' shares grow.
                    state.tenants.remove(tenant);
                }
            }
            changed && state.waiting > 0
        };
        if wake {
            self.freed.notify_waiters();
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.release(&self.tenant, true);
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.slots.release(self.tenant, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_quiet_tenant_gets_a_slot_while_others_flood_the_pool() {
        let slots = CallSlots::new(8);
        let mut held = Vec::new();
        while let Some(s) = slots.acquire("a", Duration::ZERO).await {
            held.push(s);
        }
        assert_eq!(held.len(), 8, "alone, a tenant may use the whole pool");
        // The quiet tenant waits; a's share drops to 4, so the next slot
        // a frees goes to b, not to a's own waiting call.
        let (s2, b) = (slots.clone(), slots.clone());
        let quiet = tokio::spawn(async move { b.acquire("b", Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let greedy = tokio::spawn(async move { s2.acquire("a", Duration::from_millis(300)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        held.pop();
        let quiet = quiet.await.unwrap();
        assert!(quiet.is_some());
        assert!(greedy.await.unwrap().is_none(), "a is over its share");
    }

    #[tokio::test]
    async fn a_busy_tenant_borrows_idle_slots_when_nobody_below_its_share_waits() {
        let slots = CallSlots::new(4);
        let mut held = Vec::new();
        for tenant in ["a", "b", "c"] {
            held.push(slots.acquire(tenant, Duration::ZERO).await);
        }
        // Three busy tenants: a share of 1 each, yet one slot is idle.
        let borrowed = slots.acquire("a", Duration::ZERO).await;
        assert!(borrowed.is_some(), "an idle slot is lent over the share");
        assert!(slots.acquire("b", Duration::ZERO).await.is_none(), "full");
        // While d waits below its share, a cannot borrow a freed slot.
        let (d, a) = (slots.clone(), slots.clone());
        let quiet = tokio::spawn(async move { d.acquire("d", Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let greedy = tokio::spawn(async move { a.acquire("a", Duration::from_millis(300)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        held.pop();
        let quiet = quiet.await.unwrap();
        assert!(quiet.is_some());
        assert!(greedy.await.unwrap().is_none(), "the freed slot went to d");
        drop(borrowed);
    }

    #[tokio::test]
    async fn abandoned_waits_and_dropped_slots_leave_nothing_behind() {
        let slots = CallSlots::new(1);
        let held = slots.acquire("a", Duration::ZERO).await;
        assert!(
            slots
                .acquire("b", Duration::from_millis(10))
                .await
                .is_none()
        );
        drop(held);
        assert_eq!(slots.running(), 0);
        assert!(slots.lock().tenants.is_empty());
    }
}
