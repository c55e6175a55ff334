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
//! waits for company; each worker's queue is bounded (its share of `QUEUE`
//! creates), so callers wait for room under overload as they would for a
//! connection.
//!
//! No tenant's burst delays another's creates: the queue keeps each
//! tenant's creates apart and a worker takes them in turns, one create of
//! each waiting tenant at a time, so a create of a quiet tenant goes in the
//! next transaction however many a busy tenant has queued; and a tenant may
//! hold at most a quarter of its worker's queue, so it alone never fills
//! it and another tenant's create never waits for room.
//!
//! Each writer has a connection of its own and the creates of a fixed
//! part of the tenants (a lane, see [`super::lanes`]), so a tenant's
//! inserts always reach the same PostgreSQL backend, its catalog entries
//! and prepared statements already there.
//!
//! [`Coalescer::stop`] lets the workers finish what they took and ends
//! them; creates queued after it fail as the closed pool would fail them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

use super::records::{Record, Target, Wait, insert_rows};
use super::{StorageError, pg_code};
use crate::domain::{RecordId, ResourceName, TenantId};
use crate::events::outbox::RecordEvents;

/// Most creates one worker writes at once (in one transaction).
pub const MAX_ROWS: usize = 64;
/// Creates that may wait for the writers, all together.
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
    audit: Value,
    /// The record, or `None`: not written, the resource is locked.
    reply: oneshot::Sender<Result<Option<Record>, StorageError>>,
}

#[derive(Debug, Clone)]
pub struct Coalescer {
    /// One queue per writer; a tenant's creates always wait in the same one.
    queues: Arc<[Arc<Queue>]>,
    workers: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

/// The creates waiting for one writer, apart per tenant.
struct Queue {
    /// Creates that may wait here; a tenant may hold a quarter of them.
    room: usize,
    waiting: Mutex<Waiting>,
    /// A create was queued, or the queue closed: for workers.
    queued: Notify,
    /// Creates were taken: for callers waiting for room.
    taken: Notify,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("len", &self.lock().len)
            .finish()
    }
}

#[derive(Default)]
struct Waiting {
    by_tenant: HashMap<TenantId, VecDeque<Job>>,
    /// The tenants with creates waiting, in the order of their turns.
    turns: VecDeque<TenantId>,
    len: usize,
    closed: bool,
}

/// What pushing a create found.
enum Pushed {
    Queued,
    Full(Box<Job>),
    Closed,
}

impl Queue {
    fn with_room(room: usize) -> Self {
        Self {
            room,
            waiting: Mutex::default(),
            queued: Notify::new(),
            taken: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a create, waiting while the queue or the tenant's part of it
    /// is full; false once the queue is closed.
    async fn push(&self, job: Job) -> bool {
        let mut job = Box::new(job);
        loop {
            // Registered before looking, so no room made meanwhile is missed.
            let room = self.taken.notified();
            match self.try_push(job) {
                Pushed::Queued => {
                    self.queued.notify_one();
                    return true;
                }
                Pushed::Closed => return false,
                Pushed::Full(back) => job = back,
            }
            room.await;
        }
    }

    fn try_push(&self, job: Box<Job>) -> Pushed {
        let mut w = self.lock();
        if w.closed {
            return Pushed::Closed;
        }
        let tenant = &job.group.tenant;
        let mine = w.by_tenant.get(tenant).map_or(0, VecDeque::len);
        if w.len >= self.room || mine >= self.room / 4 {
            return Pushed::Full(job);
        }
        if mine == 0 {
            w.turns.push_back(tenant.clone());
        }
        w.len += 1;
        w.by_tenant
            .entry(tenant.clone())
            .or_default()
            .push_back(*job);
        Pushed::Queued
    }

    /// Waits for creates and takes up to [`MAX_ROWS`] of them, one of each
    /// waiting tenant in turn; `None` once the queue is closed and empty.
    async fn take(&self) -> Option<Vec<Job>> {
        loop {
            let queued = self.queued.notified();
            {
                let mut w = self.lock();
                if w.len > 0 {
                    let jobs = w.take_turns();
                    let left = w.len > 0;
                    drop(w);
                    self.taken.notify_waiters();
                    if left {
                        // Another worker may take what is left.
                        self.queued.notify_one();
                    }
                    return Some(jobs);
                }
                if w.closed {
                    return None;
                }
            }
            queued.await;
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.queued.notify_waiters();
        self.taken.notify_waiters();
    }
}

impl Waiting {
    fn take_turns(&mut self) -> Vec<Job> {
        let mut jobs = Vec::new();
        while jobs.len() < MAX_ROWS {
            let Some(tenant) = self.turns.pop_front() else {
                break;
            };
            let Some(queue) = self.by_tenant.get_mut(&tenant) else {
                continue;
            };
            if let Some(job) = queue.pop_front() {
                jobs.push(job);
                self.len -= 1;
            }
            if queue.is_empty() {
                self.by_tenant.remove(&tenant);
            } else {
                self.turns.push_back(tenant);
            }
        }
        jobs
    }
}

impl Coalescer {
    /// Starts one writer per pool: each pool is the writer's own connection
    /// (a lane, see [`super::lanes::pools`]).
    pub fn start(pools: Vec<PgPool>) -> Self {
        // Every tenant needs a writer to be hashed to.
        assert!(!pools.is_empty(), "creates need at least one writer");
        let room = (QUEUE / pools.len()).max(4 * MAX_ROWS);
        let queues: Vec<Arc<Queue>> = pools
            .iter()
            .map(|_| Arc::new(Queue::with_room(room)))
            .collect();
        let workers = pools
            .into_iter()
            .zip(&queues)
            .map(|(pool, queue)| tokio::spawn(work(pool, queue.clone())))
            .collect();
        Self {
            queues: queues.into(),
            workers: Arc::new(Mutex::new(workers)),
        }
    }

    /// The queue of the writer that writes this tenant's creates.
    fn queue_of(&self, tenant: &TenantId) -> &Queue {
        &self.queues[super::lanes::lane_of(tenant, self.queues.len())]
    }

    /// Closes the queues and waits (at most `wait`) for the workers to write
    /// what was queued before.
    pub async fn stop(&self, wait: std::time::Duration) {
        for queue in self.queues.iter() {
            queue.close();
        }
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|e| e.into_inner()));
        let joined = futures_util::future::join_all(workers);
        if tokio::time::timeout(wait, joined).await.is_err() {
            tracing::warn!("the writers of coalesced creates did not finish in time");
        }
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
            audit: events.audit.clone(),
            reply,
        };
        if !self.queue_of(t.tenant).push(job).await {
            return Err(StorageError::Db(sqlx::Error::PoolClosed));
        }
        answer
            .await
            .map_err(|_| StorageError::Db(sqlx::Error::PoolClosed))?
    }
}

async fn work(pool: PgPool, queue: Arc<Queue>) {
    while let Some(jobs) = queue.take().await {
        write(&pool, jobs).await;
    }
    pool.close().await;
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
    let items: Vec<(&RecordId, &Value, &Value, &Value)> = rows
        .iter()
        .map(|j| (&j.id, &j.data, &j.template, &j.audit))
        .collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn job(tenant: &str, n: usize) -> Job {
        let (reply, _) = oneshot::channel();
        Job {
            group: Group {
                tenant: TenantId::parse(tenant).unwrap(),
                resource: ResourceName::parse("invoices").unwrap(),
                schema_version: 1,
                full: false,
                hidden: Vec::new(),
            },
            id: RecordId::parse(&format!("r{n}")).unwrap(),
            data: Value::Null,
            template: Value::Null,
            audit: Value::Null,
            reply,
        }
    }

    fn tenants(jobs: &[Job]) -> Vec<&str> {
        jobs.iter().map(|j| j.group.tenant.as_str()).collect()
    }

    #[test]
    fn a_quiet_tenants_create_goes_in_the_next_transaction_whatever_a_busy_one_queued() {
        let queue = Queue::with_room(QUEUE);
        for n in 0..500 {
            assert!(matches!(
                queue.try_push(Box::new(job("busy", n))),
                Pushed::Queued
            ));
        }
        assert!(matches!(
            queue.try_push(Box::new(job("quiet", 0))),
            Pushed::Queued
        ));
        let first = queue.lock().take_turns();
        assert_eq!(first.len(), MAX_ROWS);
        assert_eq!(tenants(&first).iter().filter(|t| **t == "quiet").count(), 1);
        // The busy tenant's creates keep their order.
        let busy: Vec<&str> = first
            .iter()
            .filter(|j| j.group.tenant.as_str() == "busy")
            .map(|j| j.id.as_str())
            .collect();
        let expected: Vec<String> = (0..MAX_ROWS - 1).map(|n| format!("r{n}")).collect();
        assert_eq!(busy, expected);
        assert_eq!(queue.lock().len, 500 - (MAX_ROWS - 1));
    }

    #[test]
    fn one_tenant_holds_at_most_its_part_of_the_queue() {
        let queue = Queue::with_room(QUEUE);
        let mine = QUEUE / 4;
        for n in 0..mine {
            assert!(matches!(
                queue.try_push(Box::new(job("busy", n))),
                Pushed::Queued
            ));
        }
        assert!(matches!(
            queue.try_push(Box::new(job("busy", mine))),
            Pushed::Full(_)
        ));
        assert!(matches!(
            queue.try_push(Box::new(job("quiet", 0))),
            Pushed::Queued
        ));
        queue.close();
        assert!(matches!(
            queue.try_push(Box::new(job("quiet", 1))),
            Pushed::Closed
        ));
    }
}
