//! Per-plugin call statistics (this replica's), its circuit breaker, and
//! the metrics: `plugin_calls_total{outcome}`, `plugin_failures_total{kind}`
//! and `plugin_call_duration_seconds`.
//!
//! The metrics name no tenant and no plugin: with 10,000 tenants, labels
//! per tenant and plugin would grow the exposition without bound and tell
//! whoever can read `/metrics` which tenants exist and what they run. Their
//! labels are closed sets (`outcome`: ok, rejected, failed; `kind`: the
//! failure kinds of `Failure::kind`). Per-plugin figures are in each
//! tenant's own `GET /v1/plugins/{name}` (this `Stats`).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;
use serde::Serialize;
use utoipa::ToSchema;

use super::Failure;
use crate::services::{BreakerState, CircuitBreaker};

#[derive(Debug)]
pub struct Stats {
    calls: AtomicU64,
    rejections: AtomicU64,
    inner: Mutex<Inner>,
    pub breaker: CircuitBreaker,
    tenant: String,
    plugin: String,
}

#[derive(Debug)]
struct Inner {
    /// Call time in microseconds.
    latency: Option<Histogram<u64>>,
    failures: BTreeMap<&'static str, u64>,
    last_error: Option<LastError>,
    /// The last failure of the plugin itself (not a refusal because it was
    /// tripped or busy): what a tripped plugin's 503 names.
    last_failure: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastError {
    pub at: DateTime<Utc>,
    pub kind: String,
    pub message: String,
}

/// Stats as the API shows them.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatsView {
    pub calls: u64,
    /// Calls that refused a record (validation hooks).
    pub rejections: u64,
    pub failures: u64,
    pub failures_by_kind: BTreeMap<String, u64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub last_error: Option<LastError>,
    /// `closed`, `open` (tripped: calls are refused) or `half-open`.
    pub breaker: String,
}

impl Stats {
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Self {
            calls: AtomicU64::new(0),
            rejections: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                latency: Histogram::new_with_bounds(1, 60_000_000, 2).ok(),
                failures: BTreeMap::new(),
                last_error: None,
                last_failure: None,
            }),
            breaker: CircuitBreaker::new(threshold, open_for),
            tenant: String::new(),
            plugin: String::new(),
        }
    }

    /// Whose stats these are (for the log line when the breaker trips).
    pub fn named(mut self, tenant: &str, plugin: &str) -> Self {
        self.tenant = tenant.to_owned();
        self.plugin = plugin.to_owned();
        self
    }

    /// The tenant these stats are of.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn timed(&self, took: Duration, outcome: &'static str) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("plugin_calls_total", "outcome" => outcome).increment(1);
        if !took.is_zero() {
            metrics::histogram!("plugin_call_duration_seconds").record(took.as_secs_f64());
            if let Some(h) = self.lock().latency.as_mut() {
                let _ = h.record((took.as_micros() as u64).max(1));
            }
        }
    }

    /// A call that answered (`rejected`: a hook refused the record).
    pub fn succeeded(&self, took: Duration, rejected: bool) {
        self.breaker.on_success();
        if rejected {
            self.rejections.fetch_add(1, Ordering::Relaxed);
        }
        self.timed(took, if rejected { "rejected" } else { "ok" });
    }

    /// A call that failed (a limit, a trap, a tripped breaker).
    pub fn failed(&self, failure: &Failure, took: Duration) {
        // Refused calls (tripped, no free slot) say nothing of the plugin.
        if !matches!(failure, Failure::Tripped(_) | Failure::Busy) {
            let was_open = self.breaker.state() == BreakerState::Open;
            self.breaker.on_failure();
            if !was_open && self.breaker.state() == BreakerState::Open {
                tracing::warn!(
                    tenant = %self.tenant,
                    plugin = %self.plugin,
                    failure = %failure,
                    "plugin breaker tripped after repeated failures: its calls are refused for a while"
                );
            }
        }
        metrics::counter!("plugin_failures_total", "kind" => failure.kind()).increment(1);
        {
            let mut inner = self.lock();
            *inner.failures.entry(failure.kind()).or_default() += 1;
            if !matches!(failure, Failure::Tripped(_) | Failure::Busy) {
                inner.last_failure = Some(failure.to_string());
            }
            inner.last_error = Some(LastError {
                at: Utc::now(),
                kind: failure.kind().to_owned(),
                message: failure.to_string(),
            });
        }
        self.timed(took, "failed");
    }

    /// The plugin's own last failure, if any.
    pub fn last_failure(&self) -> Option<String> {
        self.lock().last_failure.clone()
    }

    pub fn view(&self) -> StatsView {
        let inner = self.lock();
        let ms = |q: f64| {
            inner
                .latency
                .as_ref()
                .filter(|h| !h.is_empty())
                .map(|h| h.value_at_quantile(q) as f64 / 1000.0)
        };
        StatsView {
            calls: self.calls.load(Ordering::Relaxed),
            rejections: self.rejections.load(Ordering::Relaxed),
            failures: inner.failures.values().sum(),
            failures_by_kind: inner
                .failures
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            last_error: inner.last_error.clone(),
            breaker: self.breaker.state().as_str().to_owned(),
        }
    }
}
