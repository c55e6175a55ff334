//! Webhooks: tenants' endpoints as event subscribers.
//!
//! Every replica runs [`run`]: a dispatcher that follows the event log and
//! writes one delivery per (event, matching endpoint) (one replica at a
//! time, see `storage::webhooks::dispatch`), and a sender that leases due
//! deliveries (bounded per endpoint and per tenant in the replica) and
//! attempts them: the CloudEvent, or what the endpoint's transformer made
//! of it, signed per Standard Webhooks 1.0 (`webhook-id` is the event id,
//! the same on every attempt and replay), sent through the SSRF guard
//! without following redirects. A failed attempt is retried on the
//! schedule (`BSS_WEBHOOK_RETRY_SCHEDULE`, with jitter; `Retry-After`
//! honoured up to a bound on 429/502/503/504); after the last one the
//! delivery is `failed` and `business_store.webhook.failed` is written to
//! the tenant's log. 410 Gone, or failing for `BSS_WEBHOOK_DISABLE_AFTER_SECS`
//! without a success, disables the endpoint (`business_store.webhook.disabled`).
//! A replica that dies mid-attempt loses nothing: its lease runs out and
//! another replica sends the delivery again (same `webhook-id`).

pub mod guard;
pub mod send;
pub mod sign;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use dashmap::DashMap;
use rand::Rng;
use reqwest::header::HeaderValue;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::app_state::SharedState;
use crate::crypto::{CryptoError, Keyring, Scope};
use crate::events::relay::AbortOnDrop;
use crate::plugins::WebhookRequest;
use crate::storage::webhooks::{self as store, Attempt, ClaimLimits, Claimed, Next, Recorder};
pub use guard::Guard;
use send::{Answer, SendError};

/// Events matched per dispatch statement.
const DISPATCH_BATCH: i64 = 1000;
/// How often the backlog gauges are refreshed and old deliveries pruned.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(5);
/// Tenants whose backlog is in `/metrics` (the largest ones).
const TENANTS_REPORTED: usize = 20;
/// Successful attempts recorded per statement, at most.
const RECORD_BATCH: usize = 256;
/// Under load, the sender waits this long after an attempt ends for others
/// to end too, and claims for all of them at once.
const CLAIM_COALESCE: Duration = Duration::from_millis(2);
/// Finished deliveries deleted per housekeeping pass.
const PRUNE_PER_PASS: i64 = 10_000;
/// A lease outlives the longest attempt (transformer and request) by this.
const LEASE_SLACK_SECS: f64 = 10.0;
/// What an attempt may spend before its request (the secrets' key, loading
/// the transformer, waiting for a plugin call slot), beyond the
/// transformer's own deadline. An attempt is cut off at its budget, so it
/// is always recorded while its lease holds.
const PREPARE_SECS: f64 = 20.0;
/// How long the previous secret keeps signing after a rotation.
pub const ROTATION_OVERLAP_SECS: i64 = 24 * 3600;

/// How webhooks are sent (from the settings).
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub timeout: Duration,
    /// Seconds before each attempt, the first included (0: at once).
    pub schedule: Vec<f64>,
    pub retry_after_max_secs: f64,
    pub max_in_flight: usize,
    pub per_tenant: i64,
    pub per_endpoint: i64,
    pub poll: Duration,
    pub retention_secs: u64,
    pub disable_after_secs: u64,
    pub max_per_tenant: i64,
    /// The longest a transformer may run (the plugins' deadline ceiling).
    pub transformer_deadline: Duration,
}

/// Parses a retry schedule: comma-separated seconds, the first 0.
pub fn parse_schedule(text: &str) -> anyhow::Result<Vec<f64>> {
    let schedule = text
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| {
                    anyhow::anyhow!("BSS_WEBHOOK_RETRY_SCHEDULE: {s:?} is not a number of seconds")
                })
        })
        .collect::<anyhow::Result<Vec<f64>>>()?;
    match schedule.first() {
        Some(first) if *first == 0.0 => Ok(schedule),
        _ => anyhow::bail!(
            "BSS_WEBHOOK_RETRY_SCHEDULE must start with 0 (the first attempt is immediate)"
        ),
    }
}

/// The sender's shared parts.
#[derive(Debug)]
pub struct Webhooks {
    pub guard: Arc<Guard>,
    pub settings: WebhookSettings,
    client: reqwest::Client,
    wake: Notify,
    /// Per rate-limited endpoint: when its next attempt may start.
    next_slot: DashMap<Uuid, Instant>,
    /// Tenants whose backlog gauges were last set (zeroed when done).
    reported: std::sync::Mutex<HashSet<String>>,
    /// Deliveries this replica holds, per endpoint and per tenant.
    in_flight: std::sync::Mutex<InFlight>,
}

#[derive(Debug, Default)]
struct InFlight {
    endpoints: HashMap<Uuid, i64>,
    tenants: HashMap<String, i64>,
}

/// A claimed delivery's place in the replica's in-flight counts, given
/// back when dropped (after its attempt is recorded or it is released).
#[derive(Debug)]
struct Held {
    hooks: Arc<Webhooks>,
    endpoint: Uuid,
    tenant: String,
}

impl Drop for Held {
    fn drop(&mut self) {
        fn down<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, i64>, key: &K) {
            if let Some(n) = counts.get_mut(key) {
                *n -= 1;
                if *n <= 0 {
                    counts.remove(key);
                }
            }
        }
        let mut f = self.hooks.lock_in_flight();
        down(&mut f.endpoints, &self.endpoint);
        down(&mut f.tenants, &self.tenant);
    }
}

impl Webhooks {
    pub fn new(guard: Guard, settings: WebhookSettings) -> anyhow::Result<Self> {
        let guard = Arc::new(guard);
        Ok(Self {
            client: send::client(guard.clone(), settings.timeout)?,
            guard,
            settings,
            wake: Notify::new(),
            next_slot: DashMap::new(),
            reported: Default::default(),
            in_flight: Default::default(),
        })
    }

    fn lock_in_flight(&self) -> std::sync::MutexGuard<'_, InFlight> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a claimed delivery in flight until the guard is dropped.
    fn hold(self: &Arc<Self>, c: &Claimed) -> Held {
        let mut f = self.lock_in_flight();
        *f.endpoints.entry(c.webhook_id).or_default() += 1;
        *f.tenants.entry(c.tenant_id.clone()).or_default() += 1;
        Held {
            hooks: self.clone(),
            endpoint: c.webhook_id,
            tenant: c.tenant_id.clone(),
        }
    }

    /// What a claim may take now.
    fn claim_limits(&self, take: usize) -> ClaimLimits {
        let f = self.lock_in_flight();
        ClaimLimits {
            take: take as i64,
            per_endpoint: self.settings.per_endpoint,
            per_tenant: self.settings.per_tenant,
            lease_secs: self.lease_secs(),
            busy_endpoints: f.endpoints.iter().map(|(k, v)| (*k, *v)).unzip(),
            busy_tenants: f.tenants.iter().map(|(k, v)| (k.clone(), *v)).unzip(),
        }
    }

    /// Tells this replica's sender there are deliveries due now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// A start within the endpoint's rate limit, or how long to wait for one.
    fn rate_slot(&self, endpoint: Uuid, per_sec: i32) -> Result<(), Duration> {
        let now = Instant::now();
        let interval = Duration::from_secs_f64(1.0 / f64::from(per_sec.max(1)));
        let mut next = self.next_slot.entry(endpoint).or_insert(now);
        if *next > now {
            return Err(*next - now);
        }
        *next = now + interval;
        Ok(())
    }

    /// The most one attempt may take, request and all.
    fn attempt_budget(&self) -> Duration {
        self.settings.timeout
            + self.settings.transformer_deadline
            + Duration::from_secs_f64(PREPARE_SECS)
    }

    fn lease_secs(&self) -> f64 {
        self.attempt_budget().as_secs_f64() + LEASE_SLACK_SECS
    }
}

/// Where an endpoint's secrets are bound (the associated data of their seal).
fn scope<'a>(tenant: &'a str, record: &'a str) -> Scope<'a> {
    Scope {
        tenant,
        resource: store::RESOURCE,
        record,
    }
}

/// The stored form of an endpoint's secrets: `current` and, during a
/// rotation, `previous` until `previousUntil`, sealed with the tenant's key.
pub async fn seal_secrets(
    ring: &Keyring,
    tenant: &str,
    endpoint: Uuid,
    current: &str,
    previous: Option<(&str, chrono::DateTime<Utc>)>,
) -> Result<Value, CryptoError> {
    let mut doc = json!({ "current": current });
    let mut paths = vec![vec!["current".to_owned()]];
    if let Some((secret, until)) = previous {
        doc["previous"] = json!(secret);
        doc["previousUntil"] = json!(until);
        paths.push(vec!["previous".to_owned()]);
    }
    let id = endpoint.to_string();
    let sealed = crate::crypto::seal_document(ring, &paths, &scope(tenant, &id), &doc).await?;
    Ok(sealed.into_owned())
}

/// The secrets that sign now: the current one, and the previous one while
/// its overlap lasts.
pub async fn open_secrets(
    ring: &Keyring,
    tenant: &str,
    endpoint: Uuid,
    stored: &Value,
) -> Result<Vec<String>, CryptoError> {
    let mut doc = stored.clone();
    let id = endpoint.to_string();
    crate::crypto::open_document(ring, &scope(tenant, &id), &mut doc).await?;
    let mut secrets: Vec<String> = doc["current"]
        .as_str()
        .map(str::to_owned)
        .into_iter()
        .collect();
    let overlapping = doc["previousUntil"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .is_some_and(|until| until > Utc::now());
    if overlapping && let Some(p) = doc["previous"].as_str() {
        secrets.push(p.to_owned());
    }
    Ok(secrets)
}

/// The dispatcher and the sender of this replica (for as long as it runs).
pub async fn run(state: SharedState) {
    let (succeeded, successes) = tokio::sync::mpsc::channel(RECORD_BATCH * 4);
    let _helpers = AbortOnDrop(vec![
        tokio::spawn(dispatch_loop(state.clone())),
        tokio::spawn(housekeeping_loop(state.clone())),
        tokio::spawn(record_successes(state.clone(), successes)),
    ]);
    let hooks = state.webhooks.clone();
    let mut attempts = JoinSet::new();
    loop {
        while attempts.try_join_next().is_some() {}
        let free = hooks.settings.max_in_flight.saturating_sub(attempts.len());
        if free > 0 {
            match store::claim(&state.pool, &hooks.claim_limits(free)).await {
                Ok(claimed) => {
                    for c in claimed {
                        let held = hooks.hold(&c);
                        attempts.spawn(attempt(state.clone(), c, held, succeeded.clone()));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "taking webhook deliveries failed"),
            }
        }
        // The sender claims again when woken (new deliveries, slots given
        // back by recorded attempts), when an attempt ends, or on a poll
        // (retries come due, other replicas' deliveries).
        tokio::select! {
            () = hooks.wake.notified() => {}
            () = tokio::time::sleep(hooks.settings.poll) => {}
            Some(_) = attempts.join_next(), if !attempts.is_empty() => {
                // Others ending about now are claimed for together.
                tokio::time::sleep(CLAIM_COALESCE).await;
            }
        }
    }
}

/// Matches new events of the log against the endpoints, as the log grows.
async fn dispatch_loop(state: SharedState) {
    let mut head = state.event_log.follow();
    loop {
        let mut wrote = 0;
        loop {
            match store::dispatch(&state.pool, DISPATCH_BATCH).await {
                Ok((read, written)) => {
                    wrote += written;
                    if read < DISPATCH_BATCH {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "matching events to webhooks failed; retrying");
                    break;
                }
            }
        }
        if wrote > 0 {
            metrics::counter!("webhook_deliveries_created_total").increment(wrote as u64);
            state.webhooks.wake();
        }
        tokio::select! {
            changed = head.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep(state.webhooks.settings.poll) => {}
        }
    }
}

/// A successful attempt on its way to [`record_successes`].
type Success = (Claimed, Attempt);
type Successes = tokio::sync::mpsc::Sender<Success>;

/// Records successful attempts in batches (as many as waited while the
/// previous batch was written, up to [`RECORD_BATCH`]).
async fn record_successes(state: SharedState, mut successes: tokio::sync::mpsc::Receiver<Success>) {
    let mut batch: Vec<Success> = Vec::with_capacity(RECORD_BATCH);
    while successes.recv_many(&mut batch, RECORD_BATCH).await > 0 {
        let done: Vec<(&Claimed, &Attempt)> = batch.iter().map(|(c, a)| (c, a)).collect();
        match store::record_successes(&state.pool, &done).await {
            Ok(n) => {
                metrics::counter!("webhook_deliveries_total", "outcome" => "succeeded")
                    .increment(n);
                if (n as usize) < batch.len() {
                    tracing::info!(
                        lost = batch.len() - n as usize,
                        "webhook deliveries' leases ran out during their attempts; other replicas have them"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, deliveries = batch.len(), "recording webhook deliveries failed; they are sent again when their leases end");
            }
        }
        batch.clear();
        // A fifo endpoint's next delivery may now be claimed.
        state.webhooks.wake();
    }
}

/// How an attempt went, before it is recorded.
enum Outcome {
    Answered(Answer),
    Cancelled,
    Failed(SendError),
}

/// One attempt of a leased delivery, recorded with what it leads to.
async fn attempt(state: SharedState, c: Claimed, held: Held, succeeded: Successes) {
    let hooks = &state.webhooks;
    if let Some(per_sec) = c.rate_limit_per_sec
        && let Err(wait) = hooks.rate_slot(c.webhook_id, per_sec)
    {
        if let Err(e) = store::release(&state.pool, &c, wait.as_secs_f64()).await {
            tracing::warn!(delivery = %c.id, error = %e, "giving back a rate-limited delivery failed");
        }
        return;
    }
    let at = Utc::now();
    let started = Instant::now();
    let budget = hooks.attempt_budget();
    let outcome = tokio::time::timeout(budget, deliver(&state, &c))
        .await
        .unwrap_or_else(|_| {
            Outcome::Failed(SendError::new(
                "timeout",
                format!(
                    "the attempt (transformer and request) took more than {} s",
                    budget.as_secs()
                ),
            ))
        });
    let took = started.elapsed();
    metrics::histogram!("webhook_attempt_duration_seconds").record(took.as_secs_f64());
    let (attempt, next) = judge(&hooks.settings, &c, outcome, at, took);
    metrics::counter!("webhook_attempts_total", "result" => attempt_label(&attempt, next))
        .increment(1);
    if next == Next::Succeeded {
        // The request is over: its slot is free at once (the delivery's
        // lease, held until it is recorded, keeps it from being claimed
        // again). Recorded with others in one statement; if the recorder is
        // gone (shutting down) the lease runs out and it is sent again.
        drop(held);
        let _ = succeeded.send((c, attempt)).await;
        return;
    }
    let source = format!("/business-store/{}", state.settings.instance_id);
    let by = Recorder {
        source: &source,
        disable_after_secs: hooks.settings.disable_after_secs as f64,
    };
    match store::record(&state.pool, &c, &attempt, next, by).await {
        Ok(Some(recorded)) => {
            if recorded.status != "pending" {
                metrics::counter!("webhook_deliveries_total", "outcome" => recorded.status.clone())
                    .increment(1);
            }
            if recorded.status == "failed" {
                tracing::warn!(tenant = %c.tenant_id, webhook = %c.webhook_id, delivery = %c.id,
                    error = attempt.error.as_deref().unwrap_or_default(),
                    "webhook delivery failed after its last attempt");
            }
            if let Some(reason) = &recorded.disabled {
                metrics::counter!("webhook_endpoints_disabled_total").increment(1);
                tracing::warn!(tenant = %c.tenant_id, webhook = %c.webhook_id, reason, "webhook endpoint disabled");
            }
            if recorded.events > 0 {
                state.event_log.written(recorded.events);
            }
        }
        Ok(None) => {
            tracing::info!(delivery = %c.id, "a webhook delivery's lease ran out during its attempt; another replica has it");
        }
        Err(e) => {
            tracing::warn!(delivery = %c.id, error = %e, "recording a webhook attempt failed; the delivery is tried again when its lease ends");
        }
    }
    // Its slot is free: the sender may claim again.
    drop(held);
    hooks.wake();
}

fn attempt_label(a: &Attempt, next: Next) -> &'static str {
    match (next, a.status_code) {
        (Next::Succeeded, _) => "succeeded",
        (Next::Cancelled, _) => "cancelled",
        (_, Some(_)) => "status",
        _ => a.error_kind.unwrap_or("error"),
    }
}

/// Text PostgreSQL can store (`text` and `jsonb` refuse NUL).
fn storable(mut s: String) -> String {
    if s.contains('\0') {
        s = s.replace('\0', "\u{fffd}");
    }
    s
}

/// What an attempt's outcome means: its record, and what comes next.
fn judge(
    settings: &WebhookSettings,
    c: &Claimed,
    outcome: Outcome,
    at: chrono::DateTime<Utc>,
    took: Duration,
) -> (Attempt, Next) {
    let mut attempt = Attempt {
        at,
        duration_ms: i32::try_from(took.as_millis()).unwrap_or(i32::MAX),
        status_code: None,
        response: None,
        error_kind: None,
        error: None,
    };
    let retry = |after: Option<f64>| {
        let step = usize::try_from(c.step).unwrap_or(0) + 1;
        match (settings.schedule.get(step), after) {
            (None, _) => Next::Failed,
            (Some(_), Some(secs)) => Next::Retry(secs.min(settings.retry_after_max_secs)),
            (Some(secs), None) => Next::Retry(secs * rand::rng().random_range(0.9..=1.1)),
        }
    };
    let next = match outcome {
        Outcome::Cancelled => Next::Cancelled,
        Outcome::Failed(e) => {
            attempt.error_kind = Some(e.kind);
            attempt.error = Some(storable(e.message));
            if e.kind == "event-gone" {
                Next::Failed
            } else {
                retry(None)
            }
        }
        Outcome::Answered(a) => {
            attempt.status_code = Some(i32::from(a.status));
            attempt.response = Some(storable(a.body));
            match a.status {
                200..=299 => Next::Succeeded,
                410 => {
                    attempt.error_kind = Some("status");
                    attempt.error = Some("the endpoint answered 410 Gone".into());
                    Next::Gone
                }
                300..=399 => {
                    attempt.error_kind = Some("redirect");
                    attempt.error = Some(format!(
                        "the endpoint answered {} (a redirect); redirects are not followed",
                        a.status
                    ));
                    retry(None)
                }
                status => {
                    attempt.error_kind = Some("status");
                    attempt.error = Some(format!("the endpoint answered {status}"));
                    let honoured = matches!(status, 429 | 502 | 503 | 504);
                    retry(a.retry_after.filter(|_| honoured))
                }
            }
        }
    };
    (attempt, next)
}

/// Builds, signs and sends one attempt.
async fn deliver(state: &SharedState, c: &Claimed) -> Outcome {
    let hooks = &state.webhooks;
    let Some(envelope) = &c.envelope else {
        return Outcome::Failed(SendError::new(
            "event-gone",
            "the event left the log (retention) before it could be delivered",
        ));
    };
    let url = match hooks.guard.check_url(&c.url) {
        Ok(u) => u,
        Err(e) => return Outcome::Failed(SendError::new("refused-address", e.to_string())),
    };
    let secrets = match open_secrets(&state.keyring, &c.tenant_id, c.webhook_id, &c.secrets).await {
        Ok(s) => s,
        Err(e) => return Outcome::Failed(SendError::new("secret", e.to_string())),
    };
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    };
    let mut request = WebhookRequest {
        method: "POST".into(),
        path,
        headers: vec![("content-type".into(), "application/json".into())],
        body: envelope.to_string(),
    };
    if let Some(name) = &c.transformer {
        match state
            .plugins
            .transform(
                &c.tenant_id,
                name,
                c.resource.as_deref().unwrap_or_default(),
                envelope,
                request,
            )
            .await
        {
            Ok(Some(r)) => request = r,
            Ok(None) => {
                metrics::counter!("webhook_transformer_cancelled_total").increment(1);
                return Outcome::Cancelled;
            }
            Err(e) => {
                return Outcome::Failed(SendError::new(
                    "transformer",
                    format!("the transformer {name:?} {e}"),
                ));
            }
        }
    }
    let mut target = match send::target(&url, request) {
        Ok(t) => t,
        Err(e) => return Outcome::Failed(e),
    };
    // The event's trace continues into the endpoint's.
    if let Some(traceparent) = envelope["traceparent"].as_str()
        && let Ok(v) = HeaderValue::from_str(traceparent)
    {
        target.headers.insert("traceparent", v);
    }
    let id = c.event_id.to_string();
    let timestamp = Utc::now().timestamp();
    let signature = sign::header(&secrets, &id, timestamp, target.body.as_bytes());
    for (name, value) in [
        ("webhook-id", id),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", signature),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            target.headers.insert(name, v);
        }
    }
    match send::send(&hooks.client, target).await {
        Ok(answer) => Outcome::Answered(answer),
        Err(e) => Outcome::Failed(e),
    }
}

/// Prunes old deliveries and refreshes the gauges, beside the sender (a
/// slow count never holds up sending).
async fn housekeeping_loop(state: SharedState) {
    loop {
        housekeeping(&state).await;
        tokio::time::sleep(HOUSEKEEPING_EVERY).await;
    }
}

async fn housekeeping(state: &SharedState) {
    let hooks = &state.webhooks;
    let retention = hooks.settings.retention_secs as f64;
    match store::prune(&state.pool, retention, PRUNE_PER_PASS).await {
        Ok(0) => {}
        Ok(n) => tracing::debug!(
            deleted = n,
            "webhook deliveries past their retention deleted"
        ),
        Err(e) => tracing::warn!(error = %e, "deleting old webhook deliveries failed"),
    }
    let now = Instant::now();
    hooks
        .next_slot
        .retain(|_, at| *at + Duration::from_secs(60) > now);
    if let Ok(mut backlog) = store::backlog(&state.pool).await {
        let total: i64 = backlog.iter().map(|(_, n, _)| n).sum();
        let oldest = backlog.iter().map(|(_, _, age)| *age).fold(0.0, f64::max);
        metrics::gauge!("webhook_backlog").set(total as f64);
        metrics::gauge!("webhook_backlog_oldest_seconds").set(oldest);
        // Per tenant for the largest backlogs only: the label set stays
        // bounded however many tenants there are.
        backlog.sort_by_key(|b| std::cmp::Reverse(b.1));
        backlog.truncate(TENANTS_REPORTED);
        let mut seen = HashSet::new();
        for (tenant, n, oldest) in backlog {
            metrics::gauge!("webhook_tenant_backlog", "tenant" => tenant.clone()).set(n as f64);
            metrics::gauge!("webhook_tenant_backlog_oldest_seconds", "tenant" => tenant.clone())
                .set(oldest);
            seen.insert(tenant);
        }
        let mut reported = hooks.reported.lock().unwrap_or_else(|e| e.into_inner());
        for gone in reported.difference(&seen) {
            metrics::gauge!("webhook_tenant_backlog", "tenant" => gone.clone()).set(0.0);
            metrics::gauge!("webhook_tenant_backlog_oldest_seconds", "tenant" => gone.clone())
                .set(0.0);
        }
        *reported = seen;
    }
    if let Ok((enabled, disabled)) = store::endpoint_counts(&state.pool).await {
        metrics::gauge!("webhook_endpoints", "state" => "enabled").set(enabled as f64);
        metrics::gauge!("webhook_endpoints", "state" => "disabled").set(disabled as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        assert_eq!(
            parse_schedule("0, 5,300").unwrap_or_default(),
            vec![0.0, 5.0, 300.0]
        );
        assert!(parse_schedule("5,10").is_err());
        assert!(parse_schedule("0,x").is_err());
        assert!(parse_schedule("0,-1").is_err());
    }
}
