//! Group commit of creates. Concurrent creates are queued here and written
//! by a few workers: each takes what is waiting (up to [`MAX_ROWS`]), puts
//! the creates of one resource (same tenant, resource and schema version)
//! in one multi-row statement, and several resources' statements in one
//! transaction, so a burst of writes shares statements, commits and WAL
//! flushes instead of paying one of each per record. Every create is
//! answered only after the transaction holding it committed.
//!
//! One write's failure never fails another's: when a statement fails, the
//! transaction is rolled back and every resource's creates are written
//! again alone; a statement of several creates that fails (a document the
//! database refuses, an id that exists) is written again one create at a
//! time, so only the create at fault fails.
//!
//! No tenant's resource can hold the writers, nor the pool: their
//! statements lock the resource row `NOWAIT`, and the creates of a resource
//! whose schema is being changed (the row locked while its records are
//! checked) are handed back to their requests, which queue them again after
//! a pause, holding no connection meanwhile, for up to [`LOCKED_WAIT`]
//! (then 503 with `Retry-After`).
//!
//! An idle worker takes a create at once, so under light load nothing
//! waits for company; the queue is bounded (`QUEUE` creates), so callers
//! wait for room under overload as they would for a connection.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::records::{Record, Target, Wait, insert_rows};
use super::{StorageError, pg_code};
use crate::domain::{RecordId, ResourceName, TenantId};
use crate::events::outbox::RecordEvents;

/// Most creates one worker writes at once (in one transaction).
pub const MAX_ROWS: usize = 64;
/// Creates that may wait for a worker.
const QUEUE: usize = 4096;
/// How long a create waits for a schema change of its resource to end.
pub const LOCKED_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// What the rows of one statement share.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Group {
    tenant: TenantId,
    resource: ResourceName,
    schema_version: i32,
    full: bool,
    hidden: Vec<Vec<String>>,
}

/// One create: its row, its event template, and who waits for it.
struct Job {
    group: Group,
    id: RecordId,
    data: Value,
    template: Value,
    /// The record, or `None`: not written, the resource is locked.
    reply: oneshot::Sender<Result<Option<Record>, StorageError>>,
}

#[derive(Debug, Clone)]
pub struct Coalescer {
    queue: mpsc::Sender<JobBox>,
}

/// A job behind a pointer (the channel moves only that).
struct JobBox(Box<Job>);

impl std::fmt::Debug for JobBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("id", &self.0.id).finish()
    }
}

impl Coalescer {
    /// Starts `workers` writers on the pool.
    pub fn start(pool: PgPool, workers: usize) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..workers.max(1) {
            tokio::spawn(work(pool.clone(), rx.clone()));
        }
        Self { queue }
    }

    /// Creates one record (no idempotency key: those take their own
    /// transaction); answers once it is durable.
    pub async fn create(
        &self,
        t: Target<'_>,
        events: &RecordEvents,
        id: &RecordId,
        data: &Value,
    ) -> Result<Record, StorageError> {
        let deadline = tokio::time::Instant::now() + LOCKED_WAIT;
        let mut pause = std::time::Duration::from_millis(20);
        loop {
            if let Some(record) = self.queued(t, events, id, data).await? {
                return Ok(record);
            }
            // The resource is locked by a schema change: try again after a
            // pause, holding nothing while it lasts.
            if tokio::time::Instant::now() + pause > deadline {
                return Err(StorageError::Locked);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_millis(500));
        }
    }

    /// One pass through a writer: the record, or `None` when its resource
    /// was locked.
    async fn queued(
        &self,
        t: Target<'_>,
        events: &RecordEvents,
        id: &RecordId,
        data: &Value,
    ) -> Result<Option<Record>, StorageError> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            group: Group {
                tenant: t.tenant.clone(),
                resource: t.resource.clone(),
                schema_version: t.schema_version,
                full: events.full,
                hidden: events.hidden.clone(),
            },
            id: id.clone(),
            data: data.clone(),
            template: events.template.clone(),
            reply,
        };
        self.queue
            .send(JobBox(Box::new(job)))
            .await
            .map_err(|_| StorageError::Db(sqlx::Error::PoolClosed))?;
        answer
            .await
            .map_err(|_| StorageError::Db(sqlx::Error::PoolClosed))?
    }
}

async fn work(pool: PgPool, rx: Arc<Mutex<mpsc::Receiver<JobBox>>>) {
    loop {
        let mut jobs = Vec::new();
        {
            let mut rx = rx.lock().await;
            match rx.recv().await {
                Some(JobBox(job)) => jobs.push(*job),
                None => return,
            }
            while jobs.len() < MAX_ROWS {
                match rx.try_recv() {
                    Ok(JobBox(job)) => jobs.push(*job),
                    Err(_) => break,
                }
            }
        }
        write(&pool, jobs).await;
    }
}

/// The creates of one statement.
type Rows = Vec<Job>;

fn grouped(jobs: Vec<Job>) -> Vec<Rows> {
    let mut order: Vec<Group> = Vec::new();
    let mut by: HashMap<Group, Rows> = HashMap::new();
    for job in jobs {
        if !by.contains_key(&job.group) {
            order.push(job.group.clone());
        }
        by.entry(job.group.clone()).or_default().push(job);
    }
    order.iter().filter_map(|g| by.remove(g)).collect()
}

async fn write(pool: &PgPool, jobs: Vec<Job>) {
    let mut groups = grouped(jobs);
    if groups.len() == 1 {
        if let Some(rows) = groups.pop() {
            alone(pool, rows).await;
        }
        return;
    }
    let mut tx = match pool.begin().await {
        Ok(tx) => tx,
        Err(e) => {
            let e = StorageError::Db(e);
            for rows in groups {
                fail(rows, &e);
            }
            return;
        }
    };
    let mut written = Vec::with_capacity(groups.len());
    for rows in &groups {
        match statement(&mut *tx, rows).await {
            Ok(records) => written.push(records),
            Err(_) => {
                // One statement failed and took the transaction with it:
                // every group again, each alone.
                let _ = tx.rollback().await;
                for rows in groups {
                    alone(pool, rows).await;
                }
                return;
            }
        }
    }
    match tx.commit().await {
        Ok(()) => {
            for (rows, records) in groups.into_iter().zip(written) {
                answer(rows, records);
            }
        }
        Err(e) => {
            let e = StorageError::Db(e);
            for rows in groups {
                fail(rows, &e);
            }
        }
    }
}

/// One group in its own statement (autocommit); when a statement of
/// several fails for something one of them holds, each create alone.
async fn alone(pool: &PgPool, rows: Rows) {
    match statement(pool, &rows).await {
        Ok(records) => answer(rows, records),
        Err(StorageError::Locked) => hand_back(rows),
        Err(e) if rows.len() > 1 && row_specific(&e) => {
            for job in rows {
                let one = vec![job];
                match statement(pool, &one).await {
                    Ok(records) => answer(one, records),
                    Err(StorageError::Locked) => hand_back(one),
                    Err(e) => fail(one, &e),
                }
            }
        }
        Err(e) => fail(rows, &e),
    }
}

async fn statement<'e, E: sqlx::PgExecutor<'e>>(
    exec: E,
    rows: &Rows,
) -> Result<Vec<Record>, StorageError> {
    let Some(first) = rows.first() else {
        return Ok(Vec::new());
    };
    let g = &first.group;
    let t = Target {
        tenant: &g.tenant,
        resource: &g.resource,
        schema_version: g.schema_version,
    };
    let items: Vec<(&RecordId, &Value, &Value)> =
        rows.iter().map(|j| (&j.id, &j.data, &j.template)).collect();
    insert_rows(exec, t, g.full, &g.hidden, &items, Wait::No).await
}

/// A failure one create of a statement may be alone to blame for: a value
/// the database refuses (SQLSTATE class 22) or a constraint it breaks
/// (class 23, an id that exists among them). Anything else (the tenant
/// gone, the database unreachable) fails the statement's creates together
/// rather than once per create.
fn row_specific(e: &StorageError) -> bool {
    match e {
        StorageError::Conflict(_) | StorageError::BadRequest(_) => true,
        StorageError::Db(db) => {
            pg_code(db).is_some_and(|c| c.starts_with("22") || c.starts_with("23"))
        }
        _ => false,
    }
}

/// Creates not written because their resource is locked: their requests
/// write them themselves.
fn hand_back(rows: Rows) {
    for job in rows {
        let _ = job.reply.send(Ok(None));
    }
}

/// Answers each create with its row; a create whose row is missing found
/// the schema moved on.
fn answer(rows: Rows, records: Vec<Record>) {
    let mut by_id: HashMap<String, Record> =
        records.into_iter().map(|r| (r.id.clone(), r)).collect();
    for job in rows {
        let out = by_id
            .remove(job.id.as_str())
            .map(Some)
            .ok_or(StorageError::SchemaChanged);
        let _ = job.reply.send(out);
    }
}

fn fail(rows: Rows, e: &StorageError) {
    for job in rows {
        let _ = job.reply.send(Err(copy(e)));
    }
}

/// The same error again, for each create it failed.
fn copy(e: &StorageError) -> StorageError {
    match e {
        StorageError::TenantNotFound => StorageError::TenantNotFound,
        StorageError::NotFound(m) => StorageError::NotFound(m.clone()),
        StorageError::BadRequest(m) => StorageError::BadRequest(m.clone()),
        StorageError::Conflict(m) => StorageError::Conflict(m.clone()),
        StorageError::PreconditionFailed(m) => StorageError::PreconditionFailed(m.clone()),
        StorageError::SchemaChanged => StorageError::SchemaChanged,
        StorageError::Locked => StorageError::Locked,
        StorageError::Db(sqlx::Error::PoolTimedOut) => StorageError::Db(sqlx::Error::PoolTimedOut),
        StorageError::Db(sqlx::Error::PoolClosed) => StorageError::Db(sqlx::Error::PoolClosed),
        StorageError::Db(e) => StorageError::Db(sqlx::Error::Protocol(format!(
            "the write failed{}: {e}",
            pg_code(e).map(|c| format!(" ({c})")).unwrap_or_default()
        ))),
    }
}
