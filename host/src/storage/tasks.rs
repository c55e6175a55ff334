//! The durable task queue (`bss.tasks`, see `migrations/0007_tasks.sql`):
//! written with the change that causes a task, taken by replicas under a
//! lease, finished once per (tenant, idempotency key).

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgExecutor, PgPool};
use utoipa::ToSchema;
use uuid::Uuid;

use super::StorageError;

/// A task as its tenant sees it.
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct Task {
    #[schema(value_type = String)]
    pub id: Uuid,
    /// `remote` (handed to the Task Execution Service) or `reseal` (the
    /// built-in re-encryption job).
    pub kind: String,
    pub name: String,
    /// One task per key and tenant: asking again returns this task.
    pub idempotency_key: String,
    /// What asked for it: `plugin:<name>`, `key-rotation`, `schema:<resource>`.
    pub source: String,
    pub payload: Value,
    /// `pending`, `running`, `scheduled` (accepted by the Task Execution
    /// Service), `done` or `failed` (parked; `POST /v1/tasks/{id}/retry`).
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: Option<String>,
    /// The Task Execution Service's id for it, once accepted.
    pub remote_id: Option<String>,
    pub progress: Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const COLUMNS: &str = "id, kind, name, idempotency_key, source, payload, status, attempts, \
     next_attempt_at, last_error, remote_id, progress, created_at, updated_at";

/// A task to queue.
#[derive(Debug, Clone, Copy)]
pub struct NewTask<'a> {
    /// Its id when the caller chose one (else a new UUIDv7).
    pub id: Option<Uuid>,
    pub tenant: &'a str,
    pub kind: &'a str,
    pub name: &'a str,
    pub key: &'a str,
    pub source: &'a str,
    pub payload: &'a Value,
}

/// What queuing did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    New(Uuid),
    /// A task with this key was already queued (or done): that one.
    Existing(Uuid),
    /// The tenant has `max_pending` tasks waiting.
    Full,
}

/// Queues a task unless one with the same key exists, in whatever
/// transaction `exec` is (so a task is stored with its cause or not at all).
pub async fn enqueue<'e>(
    exec: impl PgExecutor<'e>,
    task: NewTask<'_>,
    max_pending: i64,
) -> Result<Queued, StorageError> {
    let row: Option<(Uuid, bool)> = sqlx::query_as(
        "WITH waiting AS (
             SELECT count(*) AS n FROM bss.tasks
              WHERE tenant_id = $1 AND kind = 'remote' AND status = 'pending'
                AND $3 = 'remote'),
         added AS (
             INSERT INTO bss.tasks (id, tenant_id, kind, name, idempotency_key, source, payload)
             SELECT $2, $1, $3, $4, $5, $6, $7 FROM waiting WHERE n < $8
             ON CONFLICT (tenant_id, idempotency_key) DO NOTHING
             RETURNING id)
         SELECT id, true FROM added
         UNION ALL
         SELECT id, false FROM bss.tasks WHERE tenant_id = $1 AND idempotency_key = $5",
    )
    .bind(task.tenant)
    .bind(task.id.unwrap_or_else(Uuid::now_v7))
    .bind(task.kind)
    .bind(task.name)
    .bind(task.key)
    .bind(task.source)
    .bind(task.payload)
    .bind(max_pending)
    .fetch_optional(exec)
    .await?;
    Ok(match row {
        Some((id, true)) => Queued::New(id),
        Some((id, false)) => Queued::Existing(id),
        // Over the cap, or a concurrent insert of the same key that this
        // statement's snapshot cannot see: the caller asks again.
        None => Queued::Full,
    })
}

/// The task queued under a key, if any (after a `Full` answer).
pub async fn by_key(pool: &PgPool, tenant: &str, key: &str) -> Result<Option<Uuid>, StorageError> {
    Ok(
        sqlx::query_scalar(
            "SELECT id FROM bss.tasks WHERE tenant_id = $1 AND idempotency_key = $2",
        )
        .bind(tenant)
        .bind(key)
        .fetch_optional(pool)
        .await?,
    )
}

/// A tenant's tasks, newest first, optionally of one status; `before` is
/// the id of the last task of the previous page.
pub async fn list(
    pool: &PgPool,
    tenant: &str,
    status: Option<&str>,
    before: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Task>, StorageError> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM bss.tasks
          WHERE tenant_id = $1 AND ($2::text IS NULL OR status = $2)
            AND ($3::uuid IS NULL OR id < $3)
          ORDER BY id DESC LIMIT $4"
    ))
    .bind(tenant)
    .bind(status)
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

pub async fn get(pool: &PgPool, tenant: &str, id: Uuid) -> Result<Option<Task>, StorageError> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM bss.tasks WHERE tenant_id = $1 AND id = $2"
    ))
    .bind(tenant)
    .bind(id)
    .fetch_optional(pool)
    .await?)
}

/// Puts a parked task back in the queue with its attempts reset; `None`
/// when the tenant has no failed task with this id.
pub async fn retry(pool: &PgPool, tenant: &str, id: Uuid) -> Result<Option<Task>, StorageError> {
    Ok(sqlx::query_as(&format!(
        "UPDATE bss.tasks SET status = 'pending', attempts = 0, next_attempt_at = now(),
                leased_until = NULL, updated_at = now()
          WHERE tenant_id = $1 AND id = $2 AND status = 'failed'
          RETURNING {COLUMNS}"
    ))
    .bind(tenant)
    .bind(id)
    .fetch_optional(pool)
    .await?)
}

/// A task a replica has taken.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    pub id: Uuid,
    pub tenant_id: String,
    pub name: String,
    pub payload: Value,
    pub attempts: i32,
    pub progress: Value,
    /// Proves the lease is still this replica's.
    pub lease: Uuid,
}

/// Takes up to `limit` due remote tasks, at most `per_tenant` of each
/// tenant (tenants take turns), leased for `lease_secs`.
pub async fn claim_remote(
    pool: &PgPool,
    limit: i64,
    per_tenant: i64,
    lease_secs: f64,
) -> Result<Vec<Claimed>, StorageError> {
    Ok(sqlx::query_as(
        "UPDATE bss.tasks t
            SET leased_until = now() + make_interval(secs => $3), lease = picked.lease,
                updated_at = now()
           FROM (SELECT id, gen_random_uuid() AS lease FROM (
                   SELECT id, next_attempt_at,
                          row_number() OVER (PARTITION BY tenant_id ORDER BY next_attempt_at) AS turn
                     FROM bss.tasks
                    WHERE kind = 'remote' AND status = 'pending' AND next_attempt_at <= now()
                      AND (leased_until IS NULL OR leased_until < now())
                      AND tenant_id IN (SELECT id FROM bss.tenants WHERE status = 'active')) due
                  WHERE turn <= $2 ORDER BY turn, next_attempt_at LIMIT $1) picked
          WHERE t.id = picked.id AND t.status = 'pending'
            AND (t.leased_until IS NULL OR t.leased_until < now())
          RETURNING t.id, t.tenant_id, t.name, t.payload, t.attempts, t.progress, picked.lease",
    )
    .bind(limit)
    .bind(per_tenant)
    .bind(lease_secs)
    .fetch_all(pool)
    .await?)
}

/// Takes one due re-encryption job (pending, or running under a lease that
/// lapsed: its replica died), unless its tenant has one running.
pub async fn claim_job(pool: &PgPool, lease_secs: f64) -> Result<Option<Claimed>, StorageError> {
    Ok(sqlx::query_as(
        "UPDATE bss.tasks t
            SET status = 'running', attempts = attempts + 1, lease = gen_random_uuid(),
                leased_until = now() + make_interval(secs => $1), updated_at = now()
          WHERE t.id = (
                SELECT id FROM bss.tasks c
                 WHERE kind = 'reseal' AND status IN ('pending', 'running')
                   AND next_attempt_at <= now()
                   AND (leased_until IS NULL OR leased_until < now())
                   AND tenant_id IN (SELECT id FROM bss.tenants WHERE status = 'active')
                   AND NOT EXISTS (SELECT 1 FROM bss.tasks o
                                    WHERE o.tenant_id = c.tenant_id AND o.kind = 'reseal'
                                      AND o.status = 'running' AND o.id <> c.id
                                      AND o.leased_until >= now())
                 ORDER BY status = 'running' DESC, next_attempt_at LIMIT 1
                 FOR UPDATE SKIP LOCKED)
          RETURNING t.id, t.tenant_id, t.name, t.payload, t.attempts, t.progress, t.lease",
    )
    .bind(lease_secs)
    .fetch_optional(pool)
    .await?)
}

/// Saves a job's progress and renews its lease, in the transaction of the
/// batch it finished; false when the lease is no longer this replica's.
pub async fn save_progress<'e>(
    exec: impl PgExecutor<'e>,
    task: &Claimed,
    progress: &Value,
    lease_secs: f64,
) -> Result<bool, StorageError> {
    let done = sqlx::query(
        "UPDATE bss.tasks SET progress = $3, leased_until = now() + make_interval(secs => $4),
                updated_at = now()
          WHERE id = $1 AND lease = $2 AND status = 'running'",
    )
    .bind(task.id)
    .bind(task.lease)
    .bind(progress)
    .bind(lease_secs)
    .execute(exec)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// How an attempt ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Accepted by the Task Execution Service under this id.
    Scheduled(String),
    /// A job finished.
    Done,
    /// Failed; tried again after `retry_in` unless attempts are used up.
    Failed { error: String, retry_in_secs: f64 },
    /// Failed in a way another attempt cannot mend: parked at once.
    Refused(String),
}

/// Records how an attempt ended (only while the lease is this replica's);
/// `attempts` is added to the task's attempts (-1 gives back the one a
/// job's claim took, when the failure was not the job's). Returns the
/// task's new status.
pub async fn finish(
    pool: &PgPool,
    task: &Claimed,
    outcome: &Outcome,
    max_attempts: i32,
    attempts: i32,
) -> Result<Option<String>, StorageError> {
    let (status, remote, error, retry_in) = match outcome {
        Outcome::Scheduled(remote) => ("scheduled", Some(remote.as_str()), None, 0.0),
        Outcome::Done => ("done", None, None, 0.0),
        Outcome::Failed {
            error,
            retry_in_secs,
        } => ("pending", None, Some(error.as_str()), *retry_in_secs),
        Outcome::Refused(error) => ("failed", None, Some(error.as_str()), 0.0),
    };
    let bump = attempts;
    Ok(sqlx::query_scalar(
        "UPDATE bss.tasks
            SET attempts = attempts + $3,
                status = CASE WHEN $4 = 'pending' AND attempts + $3 >= $7 THEN 'failed' ELSE $4 END,
                remote_id = COALESCE($5, remote_id), last_error = COALESCE($6, last_error),
                next_attempt_at = now() + make_interval(secs => $8),
                leased_until = NULL, lease = NULL, updated_at = now()
          WHERE id = $1 AND lease = $2
          RETURNING status",
    )
    .bind(task.id)
    .bind(task.lease)
    .bind(bump)
    .bind(status)
    .bind(remote)
    .bind(error)
    .bind(max_attempts)
    .bind(retry_in)
    .fetch_optional(pool)
    .await?)
}

/// Deletes up to `limit` scheduled or done tasks last changed more than
/// `retention_secs` ago; returns how many.
pub async fn forget_finished(
    pool: &PgPool,
    retention_secs: f64,
    limit: i64,
) -> Result<u64, StorageError> {
    let done = sqlx::query(
        "DELETE FROM bss.tasks WHERE id IN (
             SELECT id FROM bss.tasks
              WHERE status IN ('scheduled', 'done')
                AND updated_at < now() - make_interval(secs => $1)
              LIMIT $2)",
    )
    .bind(retention_secs)
    .bind(limit)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// How many tasks wait, run or are parked (for `/metrics`).
pub async fn counts(pool: &PgPool) -> Result<Vec<(String, i64)>, StorageError> {
    Ok(sqlx::query_as(
        "SELECT status, count(*) FROM bss.tasks
          WHERE status IN ('pending', 'running', 'failed') GROUP BY status",
    )
    .fetch_all(pool)
    .await?)
}

/// Records the current key id a replica was given for a tenant; returns the
/// one recorded before when it differs (`Some(None)`: none was), in
/// `exec`'s transaction.
pub async fn note_key_id<'e>(
    exec: impl PgExecutor<'e>,
    tenant: &str,
    key_id: &str,
) -> Result<Option<Option<String>>, StorageError> {
    Ok(sqlx::query_scalar(
        "UPDATE bss.tenants t SET key_id = $2
           FROM (SELECT id, key_id AS before FROM bss.tenants WHERE id = $1 FOR UPDATE) old
          WHERE t.id = old.id AND t.key_id IS DISTINCT FROM $2
          RETURNING old.before",
    )
    .bind(tenant)
    .bind(key_id)
    .fetch_optional(exec)
    .await?)
}
