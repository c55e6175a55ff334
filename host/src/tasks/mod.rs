//! Durable tasks. Work that must happen because of a change (a task an
//! enricher asks the Task Execution Service for, re-encrypting a tenant's
//! values after a key rotation or a schema change) is written to
//! `bss.tasks` with its cause, then carried out by every replica's worker
//! ([`run`]) until done:
//!
//! - `remote` tasks are sent to `POST {TASK_SERVICE_URL}/api/task/schedule`
//!   with `Idempotency-Key: <task id>` (the same on every attempt, so a
//!   retry never schedules twice; a 409 answer counts as scheduled),
//!   retried with backoff (1 s doubling to `task_retry_max_secs`) through
//!   each tenant's breaker, and parked as `failed` after
//!   `task_max_attempts`. Without a Task Service the built-in stand-in
//!   accepts them (and logs them).
//! - `reseal` jobs run here, whether or not a Task Service is configured
//!   (see [`reseal`]): leased, batch by batch, progress saved with each
//!   batch, taken over when a replica dies.
//!
//! Tenants take turns: a pass takes at most [`PER_TENANT`] tasks of each.
//! Scheduled and done tasks are deleted after `task_retention_secs`.

pub mod reseal;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::StreamExt;
use rand::Rng;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::app_state::SharedState;
use crate::crypto::keyring::{Rotation, announce_rotation, queue_reseal};
use crate::services::{CallError, ServiceClient};
use crate::storage::tasks::{self, Claimed, NewTask, Outcome, Queued};

/// Remote tasks one pass takes.
const BATCH: i64 = 64;
/// Remote tasks of one tenant one pass takes.
const PER_TENANT: i64 = 8;
/// Remote tasks sent at once.
const IN_FLIGHT: usize = 16;
/// Re-encryption jobs one replica runs at once.
const JOBS: usize = 2;
/// How often the task counts in `/metrics` are refreshed.
const GAUGES_EVERY: Duration = Duration::from_secs(5);
/// Finished tasks deleted per pass (every [`GAUGES_EVERY`]).
const FORGET_PER_PASS: i64 = 10_000;
/// Longest idempotency key a plugin may give.
const MAX_KEY_LEN: usize = 200;
/// The Task Execution Service's path.
pub const SCHEDULE_PATH: &str = "/api/task/schedule";

/// The queue's handle: where tasks are written, and the worker's bell.
#[derive(Debug)]
pub struct TaskQueue {
    pool: sqlx::PgPool,
    max_pending: i64,
    wake: Notify,
    /// The Task Execution Service, when configured.
    client: Option<ServiceClient>,
}

impl TaskQueue {
    pub fn new(pool: sqlx::PgPool, max_pending: i64, client: Option<ServiceClient>) -> Self {
        Self {
            pool,
            max_pending,
            wake: Notify::new(),
            client,
        }
    }

    /// The Task Execution Service's client, when one is configured.
    pub fn service(&self) -> Option<&ServiceClient> {
        self.client.as_ref()
    }

    pub fn max_pending(&self) -> i64 {
        self.max_pending
    }

    /// Tells this replica's worker there is new work.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Writes the tasks an enricher's calls asked for (after the calls,
    /// with their event): once per id, so an enrichment run again queues
    /// nothing twice. An error (or a full queue) means the event waits for
    /// the next pass.
    pub async fn enqueue_plugin_tasks(&self, tasks: &[PluginTask]) -> Result<(), String> {
        for t in tasks {
            let source = format!("plugin:{}", t.plugin);
            let task = NewTask {
                id: Some(t.id),
                tenant: &t.tenant,
                kind: "remote",
                name: &t.name,
                key: &t.key,
                source: &source,
                payload: &t.payload,
            };
            match tasks::enqueue(&self.pool, task, self.max_pending).await {
                Ok(Queued::New(_)) => metrics::counter!("tasks_queued_total").increment(1),
                Ok(Queued::Existing(_)) => {}
                Ok(Queued::Full) => {
                    if !matches!(
                        tasks::by_key(&self.pool, &t.tenant, &t.key).await,
                        Ok(Some(_))
                    ) {
                        return Err(format!(
                            "tenant {} has {} tasks waiting",
                            t.tenant, self.max_pending
                        ));
                    }
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        if !tasks.is_empty() {
            self.wake();
        }
        Ok(())
    }
}

/// A task an enricher asked for with `forward("task", "/api/task/schedule",
/// body)`. The call is answered at once with `{"taskId", "status":
/// "queued"}`; the host writes the task after the call, with the event
/// ([`TaskQueue::enqueue_plugin_tasks`]), so the write never runs inside the
/// plugin's deadline. One task per idempotency key (the body's
/// `idempotencyKey`, else a digest of the body, which names the event); its
/// id is derived from tenant and key, so asking again gives the same id.
#[derive(Debug, Clone)]
pub struct PluginTask {
    pub tenant: String,
    pub plugin: String,
    pub id: uuid::Uuid,
    pub key: String,
    pub name: String,
    pub payload: Value,
}

impl PluginTask {
    pub fn new(tenant: &str, plugin: &str, body: &Value) -> Result<Self, String> {
        let key = match body.get("idempotencyKey") {
            None => format!(
                "plugin:{plugin}:{}",
                URL_SAFE_NO_PAD.encode(Sha256::digest(body.to_string()))
            ),
            Some(Value::String(k)) if !k.is_empty() && k.len() <= MAX_KEY_LEN => {
                format!("plugin:{plugin}:{k}")
            }
            Some(_) => {
                return Err(format!(
                    "idempotencyKey must be a string of 1 to {MAX_KEY_LEN} characters"
                ));
            }
        };
        let name = body
            .get("task")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty() && n.len() <= MAX_KEY_LEN)
            .unwrap_or("task")
            .to_owned();
        let digest = Sha256::new()
            .chain_update(tenant)
            .chain_update([0])
            .chain_update(&key)
            .finalize();
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        let id = uuid::Builder::from_custom_bytes(bytes).into_uuid();
        Ok(Self {
            tenant: tenant.to_owned(),
            plugin: plugin.to_owned(),
            id,
            key,
            name,
            payload: body.clone(),
        })
    }

    /// What the plugin's `forward` answers.
    pub fn answer(&self) -> Value {
        json!({"taskId": self.id, "status": "queued"})
    }
}

/// The worker: sends due remote tasks, runs due jobs, queues the
/// re-encryption of tenants whose key the Auth Service rotated, and keeps
/// the task gauges. Runs on every replica (tasks are leased).
pub async fn run(state: SharedState, mut rotations: UnboundedReceiver<Rotation>) {
    let poll = Duration::from_millis(state.settings.task_poll_ms);
    let mut jobs = tokio::task::JoinSet::new();
    let mut gauges_at = tokio::time::Instant::now();
    loop {
        while let Ok((tenant, key_id)) = rotations.try_recv() {
            queue_rotation(&state, &tenant, &key_id).await;
        }
        let sent = match dispatch(&state).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "sending tasks failed");
                0
            }
        };
        while jobs.try_join_next().is_some() {}
        while jobs.len() < JOBS {
            match tasks::claim_job(&state.pool, lease_secs(&state)).await {
                Ok(Some(job)) => {
                    jobs.spawn(reseal::run_job(state.clone(), job));
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "taking a job failed");
                    break;
                }
            }
        }
        if tokio::time::Instant::now() >= gauges_at {
            update_gauges(&state).await;
            forget_finished(&state).await;
            gauges_at = tokio::time::Instant::now() + GAUGES_EVERY;
        }
        if sent == 0 {
            tokio::select! {
                () = state.tasks.wake.notified() => {}
                () = tokio::time::sleep(poll) => {}
                Some((tenant, key_id)) = rotations.recv() => {
                    queue_rotation(&state, &tenant, &key_id).await;
                }
                Some(_) = jobs.join_next(), if !jobs.is_empty() => {}
            }
        }
    }
}

fn lease_secs(state: &SharedState) -> f64 {
    state.settings.task_lease_secs as f64
}

/// A replica was given `key_id` as a tenant's current key: if the database
/// recorded another one, the tenant's re-encryption is queued in the same
/// transaction as the new id (so a failure leaves it to the next report).
async fn queue_rotation(state: &SharedState, tenant: &str, key_id: &str) {
    let queued = async {
        let mut tx = state.pool.begin().await?;
        let before = tasks::note_key_id(&mut *tx, tenant, key_id).await?;
        let mut task = None;
        if let Some(Some(before)) = &before {
            let max = state.tasks.max_pending;
            let q = queue_reseal(&mut *tx, tenant, key_id, "key-rotation", max).await?;
            announce_rotation(&mut *tx, tenant).await?;
            task = Some((before.clone(), q));
        }
        tx.commit().await?;
        Ok::<_, crate::storage::StorageError>(task)
    };
    match queued.await {
        Ok(Some((before, Queued::New(id)))) => {
            tracing::info!(tenant, before, key_id, task = %id, "key rotated: re-encryption queued");
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(tenant, error = %e, "recording a key id failed; it is tried again");
            state.keyring.forget_current(tenant);
        }
    }
}

/// One pass over due remote tasks; returns how many were sent.
async fn dispatch(state: &SharedState) -> Result<usize, crate::storage::StorageError> {
    // Long enough for the last of a pass's tasks to be sent (the pass
    // sends IN_FLIGHT at a time, each within one budget).
    let rounds = (BATCH as usize).div_ceil(IN_FLIGHT) as f64 + 1.0;
    let lease = state
        .tasks
        .client
        .as_ref()
        .map_or(Duration::from_secs(5), ServiceClient::budget)
        .as_secs_f64()
        * rounds
        + lease_secs(state);
    let claimed = tasks::claim_remote(&state.pool, BATCH, PER_TENANT, lease).await?;
    let n = claimed.len();
    futures_util::stream::iter(claimed)
        .for_each_concurrent(IN_FLIGHT, |task| send(state, task))
        .await;
    Ok(n)
}

async fn send(state: &SharedState, task: Claimed) {
    let (outcome, attempted) = match &state.tasks.client {
        None => {
            let id = format!("local-{}", task.id);
            metrics::counter!("task_service_local_scheduled_total").increment(1);
            tracing::info!(tenant = %task.tenant_id, task_id = %task.id, task = %task.name,
                "task scheduled (built-in Task Execution stand-in)");
            (Outcome::Scheduled(id), true)
        }
        Some(client) => {
            let key = task.id.to_string();
            let answer = client
                .call_idempotent(SCHEDULE_PATH, &task.payload, &task.tenant_id, &key)
                .await;
            outcome_of(answer, task.attempts, &state.settings)
        }
    };
    let max = state.settings.task_max_attempts;
    match tasks::finish(&state.pool, &task, &outcome, max, i32::from(attempted)).await {
        Ok(Some(status)) => count(&task, &status, &outcome),
        Ok(None) => {}
        Err(e) => tracing::warn!(task = %task.id, error = %e, "recording a task's attempt failed"),
    }
}

/// What the Task Execution Service's answer means for the task, and
/// whether it counts as an attempt (an open breaker sent nothing).
fn outcome_of(
    answer: Result<Value, CallError>,
    attempts: i32,
    settings: &crate::config::Settings,
) -> (Outcome, bool) {
    let retry_in_secs = backoff(attempts, settings.task_retry_max_secs);
    match answer {
        Ok(answer) => {
            let remote = match &answer["taskId"] {
                Value::String(s) => s.chars().take(MAX_KEY_LEN).collect(),
                Value::Number(n) => n.to_string(),
                _ => String::new(),
            };
            (Outcome::Scheduled(remote), true)
        }
        // Already scheduled under this key (an earlier answer was lost).
        Err(CallError::Rejected { reason, .. }) if reason == "HTTP 409" => {
            (Outcome::Scheduled(String::new()), true)
        }
        // Refusals another attempt may mend: credentials, timeouts, locks.
        Err(CallError::Rejected { reason, .. })
            if ["HTTP 401", "HTTP 403", "HTTP 408", "HTTP 423", "HTTP 425"]
                .contains(&reason.as_str()) =>
        {
            (
                Outcome::Failed {
                    error: format!("the Task Execution Service refused the task ({reason})"),
                    retry_in_secs,
                },
                true,
            )
        }
        Err(CallError::Rejected { reason, .. }) => (
            Outcome::Refused(format!(
                "the Task Execution Service refused the task ({reason})"
            )),
            true,
        ),
        Err(CallError::CircuitOpen { retry_after, .. }) => (
            Outcome::Failed {
                error: "the Task Execution Service is failing; sending is paused".into(),
                retry_in_secs: retry_after.as_secs_f64().max(1.0),
            },
            false,
        ),
        Err(e @ CallError::Unavailable { .. }) => (
            Outcome::Failed {
                error: e.to_string(),
                retry_in_secs,
            },
            true,
        ),
    }
}

/// Seconds before attempt `attempts + 1`: 1 s doubling up to `max`, with
/// jitter (half to all of it).
pub(crate) fn backoff(attempts: i32, max: u64) -> f64 {
    let exp = 2f64.powi(attempts.clamp(0, 30)).min(max.max(1) as f64);
    exp * rand::rng().random_range(0.5..=1.0)
}

fn count(task: &Claimed, status: &str, outcome: &Outcome) {
    match (status, outcome) {
        ("scheduled", _) => metrics::counter!("tasks_scheduled_total").increment(1),
        ("failed", _) => {
            metrics::counter!("tasks_parked_total").increment(1);
            tracing::warn!(tenant = %task.tenant_id, task = %task.id, "task parked after its last attempt");
        }
        (_, Outcome::Failed { .. }) => {
            metrics::counter!("task_attempts_failed_total").increment(1);
        }
        _ => {}
    }
}

/// Deletes finished tasks past their retention, a bounded number a pass.
async fn forget_finished(state: &SharedState) {
    let retention = state.settings.task_retention_secs as f64;
    match tasks::forget_finished(&state.pool, retention, FORGET_PER_PASS).await {
        Ok(0) => {}
        Ok(n) => tracing::debug!(deleted = n, "finished tasks past their retention deleted"),
        Err(e) => tracing::warn!(error = %e, "deleting finished tasks failed"),
    }
}

async fn update_gauges(state: &SharedState) {
    let Ok(counts) = tasks::counts(&state.pool).await else {
        return;
    };
    for status in ["pending", "running", "failed"] {
        let n = counts
            .iter()
            .find(|(s, _)| s == status)
            .map_or(0, |(_, n)| *n);
        metrics::gauge!("tasks", "status" => status).set(n as f64);
    }
}

/// Drops a tenant's cached current key when any replica announces its
/// rotation (`NOTIFY bss_keys`), so new writes everywhere use the new key at
/// once; every cached current key when the listener (re)connects.
pub async fn follow_rotations(state: SharedState) {
    loop {
        let result: Result<(), sqlx::Error> = async {
            let mut listener = sqlx::postgres::PgListener::connect_with(&state.pool).await?;
            listener.listen("bss_keys").await?;
            state.keyring.forget_all_current();
            loop {
                match listener.try_recv().await? {
                    Some(n) => state.keyring.forget_current(n.payload()),
                    None => state.keyring.forget_all_current(),
                }
            }
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "following key rotations failed; retrying");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
