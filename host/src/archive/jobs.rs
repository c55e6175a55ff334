//! Exports and imports asked for over the API run as jobs. A job's row in
//! `bss.archive_jobs` is its state and progress, which every replica
//! serves; its `updated_at` is a heartbeat, so a job whose replica stopped
//! is reported failed once it is [`STALE`]. An export's archive is kept in
//! the database in parts of [`PART_BYTES`] (`bss.archive_parts`), so any
//! replica serves its download, until the job is [`KEPT`] old.
//!
//! A job runs on a thread of the blocking pool (the archive's compression,
//! checksums and record checks are CPU work that must not hold a worker
//! that serves requests), driving its database calls through the runtime;
//! at most [`RUNNING`] jobs run at once in the installation.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use super::export::{self, Progress, hex};
use super::import;
use crate::app_state::SharedState;
use crate::domain::TenantId;

/// Bytes of an archive in one row of `bss.archive_parts`.
pub const PART_BYTES: usize = 4 << 20;
/// A running job not heard of for this long has stopped with its replica.
pub const STALE: Duration = Duration::from_secs(60);
/// How often a running job says it is alive (and how far it got).
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Jobs (and exports' archives) older than this are deleted.
pub const KEPT: Duration = Duration::from_secs(24 * 3600);
/// Jobs running at once in the installation.
pub const RUNNING: i64 = 2;

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    #[schema(value_type = String)]
    pub id: uuid::Uuid,
    /// `export` or `import`.
    pub kind: String,
    /// The tenant exported, or imported as.
    #[sqlx(rename = "tenant_id")]
    pub tenant: String,
    /// `running`, `done` or `failed`.
    pub status: String,
    /// What was asked (`withEvents`, `webhookSecrets`; `as`, `trust`).
    #[schema(value_type = Object)]
    pub options: Value,
    /// Records exported or imported so far.
    pub records_done: i64,
    /// Records in all (known once the job has looked).
    pub records_total: Option<i64>,
    /// The archive's size: the export's, or the upload's.
    pub bytes: Option<i64>,
    /// The archive's SHA-256 (hex).
    pub sha256: Option<String>,
    /// When done: what the archive holds (export) or what was imported.
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    /// Why it failed.
    pub error: Option<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A running job whose heartbeat stopped (SQL).
fn stalled() -> String {
    format!(
        "(status = 'running' AND updated_at < now() - interval '{} seconds')",
        STALE.as_secs()
    )
}

/// A job's row, a running job whose heartbeat stopped shown as failed.
pub async fn get(pool: &PgPool, id: uuid::Uuid) -> sqlx::Result<Option<Job>> {
    let stalled = stalled();
    sqlx::query_as(&format!(
        "SELECT id, kind, tenant_id, options, records_done, records_total, bytes, sha256,
                result, created_by, created_at, updated_at, finished_at,
                CASE WHEN {stalled} THEN 'failed' ELSE status END AS status,
                CASE WHEN {stalled} THEN 'interrupted: the replica running it stopped'
                     ELSE error END AS error
           FROM bss.archive_jobs WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// Why a job was not started.
#[derive(Debug, thiserror::Error)]
pub enum NotStarted {
    #[error("{RUNNING} exports or imports are running already; try again when one is done")]
    Busy,
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl From<sqlx::Error> for NotStarted {
    fn from(e: sqlx::Error) -> Self {
        Self::Failed(e.into())
    }
}

/// A job about to start.
struct NewJob<'a> {
    kind: &'a str,
    tenant: &'a TenantId,
    /// What was asked, as the job shows it.
    options: Value,
    by: &'a str,
    /// An import's upload: its size and SHA-256.
    upload: Option<&'a (u64, String)>,
}

/// A new job's row, unless [`RUNNING`] are running; old jobs go first.
async fn create(pool: &PgPool, new: NewJob<'_>) -> Result<Job, NotStarted> {
    let stalled = stalled();
    let mut tx = pool.begin().await?;
    // One job starts at a time, so the count below stays true.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('bss.archive_jobs'))")
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!(
        "DELETE FROM bss.archive_jobs
          WHERE created_at < now() - make_interval(secs => $1)
            AND (status <> 'running' OR {stalled})"
    ))
    .bind(KEPT.as_secs_f64())
    .execute(&mut *tx)
    .await?;
    let (running,): (i64,) = sqlx::query_as(&format!(
        "SELECT count(*) FROM bss.archive_jobs WHERE status = 'running' AND NOT {stalled}"
    ))
    .fetch_one(&mut *tx)
    .await?;
    if running >= RUNNING {
        return Err(NotStarted::Busy);
    }
    let id = uuid::Uuid::now_v7();
    sqlx::query(
        "INSERT INTO bss.archive_jobs (id, kind, tenant_id, options, created_by, bytes, sha256)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(id)
    .bind(new.kind)
    .bind(new.tenant.as_str())
    .bind(&new.options)
    .bind(new.by)
    .bind(new.upload.map(|(bytes, _)| *bytes as i64))
    .bind(new.upload.map(|(_, sha256)| sha256))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(get(pool, id).await?.context("the job just made is gone")?)
}

/// The directory where jobs keep their files while they run.
pub fn job_dir(state: &SharedState) -> anyhow::Result<PathBuf> {
    let dir = state.settings.data_dir.join("archive-jobs");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Records done and in all, as the job's progress callback sees them.
#[derive(Default)]
struct Counter {
    done: AtomicU64,
    total: AtomicU64,
}

impl Counter {
    fn track(&self) -> impl FnMut(Progress) + '_ {
        move |p| match p {
            Progress::Total(n) => self.total.store(n, Ordering::Relaxed),
            Progress::Records(n) => {
                self.done.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

/// Runs the future `work` makes on the blocking pool with a heartbeat
/// writing its progress, then records how it ended; the file `cleanup` is
/// deleted whatever happened.
fn run<W, F>(pool: PgPool, id: uuid::Uuid, counter: Arc<Counter>, work: W, cleanup: PathBuf)
where
    W: FnOnce() -> F + Send + 'static,
    F: std::future::Future<Output = anyhow::Result<Ended>>,
{
    let runtime = tokio::runtime::Handle::current();
    let beat = {
        let (pool, counter) = (pool.clone(), counter.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(HEARTBEAT);
            loop {
                every.tick().await;
                let total = counter.total.load(Ordering::Relaxed);
                let _ = sqlx::query(
                    "UPDATE bss.archive_jobs SET records_done = $2, records_total = $3,
                            updated_at = now()
                      WHERE id = $1 AND status = 'running'",
                )
                .bind(id)
                .bind(counter.done.load(Ordering::Relaxed) as i64)
                .bind((total > 0).then_some(total as i64))
                .execute(&pool)
                .await;
            }
        })
    };
    tokio::task::spawn_blocking(move || {
        // Whatever happens (a panic too), the heartbeat stops and the job
        // ends recorded: a job never looks alive when it is not.
        let beat = AbortOnDrop(beat);
        let ended =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runtime.block_on(work())))
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the job failed unexpectedly (a panic)")));
        drop(beat);
        let _ = std::fs::remove_file(&cleanup);
        let done = counter.done.load(Ordering::Relaxed) as i64;
        let total = counter.total.load(Ordering::Relaxed) as i64;
        let saved = runtime.block_on(async {
            let query = match &ended {
                // An import's archive (the upload) was recorded at its start.
                Ok(ended) => sqlx::query(
                    "UPDATE bss.archive_jobs SET status = 'done', result = $2,
                            bytes = coalesce($3, bytes), sha256 = coalesce($4, sha256),
                            records_done = $5, records_total = $6,
                            updated_at = now(), finished_at = now()
                      WHERE id = $1",
                )
                .bind(id)
                .bind(&ended.result)
                .bind(ended.archive.as_ref().map(|(bytes, _)| *bytes as i64))
                .bind(ended.archive.as_ref().map(|(_, sha256)| sha256))
                .bind(done)
                .bind(total),
                Err(e) => {
                    tracing::warn!(job = %id, error = %format!("{e:#}"), "archive job failed");
                    sqlx::query(
                        "UPDATE bss.archive_jobs SET status = 'failed', error = $2,
                                records_done = $3, updated_at = now(), finished_at = now()
                          WHERE id = $1",
                    )
                    .bind(id)
                    .bind(format!("{e:#}"))
                    .bind(done)
                }
            };
            let mut tx = pool.begin().await?;
            if ended.is_err() {
                sqlx::query("DELETE FROM bss.archive_parts WHERE job_id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            query.execute(&mut *tx).await?;
            tx.commit().await
        });
        if let Err(e) = saved {
            tracing::error!(job = %id, error = %e, "an archive job's end was not recorded");
        }
    });
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How a job ended well.
struct Ended {
    result: Value,
    /// The archive an export wrote: its size and SHA-256.
    archive: Option<(u64, String)>,
}

/// Starts exporting `tenant`: the archive is written to a file of the
/// data directory, then stored in parts.
pub async fn start_export(
    state: &SharedState,
    tenant: TenantId,
    options: export::Options,
    by: &str,
) -> Result<Job, NotStarted> {
    let dir = job_dir(state)?;
    let new = NewJob {
        kind: "export",
        tenant: &tenant,
        options: serde_json::json!({
            "withEvents": options.events,
            "webhookSecrets": options.webhook_secrets,
        }),
        by,
        upload: None,
    };
    let job = create(&state.pool, new).await?;
    let id = job.id;
    let file = dir.join(format!("{id}.tar.zst"));
    let counter = Arc::new(Counter::default());
    let work = {
        let (state, counter, file) = (state.clone(), counter.clone(), file.clone());
        move || async move {
            let out = std::io::BufWriter::new(
                std::fs::File::create(&file)
                    .with_context(|| format!("creating {}", file.display()))?,
            );
            let (out, manifest) =
                export::export(&state.pool, &tenant, out, options, &mut counter.track()).await?;
            out.into_inner()
                .map_err(|e| e.into_error())?
                .sync_all()
                .context("writing the archive")?;
            let archive = store_parts(&state.pool, id, &file).await?;
            Ok(Ended {
                result: serde_json::to_value(&manifest.counts)?,
                archive: Some(archive),
            })
        }
    };
    run(state.pool.clone(), id, counter, work, file);
    Ok(job)
}

/// The archive at `file` into the job's parts; its size and SHA-256. (On
/// the job's own thread: the file is read as a plain file.)
async fn store_parts(pool: &PgPool, id: uuid::Uuid, file: &Path) -> anyhow::Result<(u64, String)> {
    let mut input = std::fs::File::open(file)?;
    let (mut bytes, mut hash) = (0u64, Sha256::new());
    let mut part = 0i32;
    loop {
        let mut buf = Vec::with_capacity(PART_BYTES);
        (&mut input).take(PART_BYTES as u64).read_to_end(&mut buf)?;
        if buf.is_empty() {
            break;
        }
        hash.update(&buf);
        bytes += buf.len() as u64;
        part += 1;
        sqlx::query("INSERT INTO bss.archive_parts (job_id, part, bytes) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(part)
            .bind(&buf)
            .execute(pool)
            .await?;
    }
    Ok((bytes, hex(&hash.finalize())))
}

/// One part of an export's archive (numbered from 1), if there is one.
pub async fn part(pool: &PgPool, id: uuid::Uuid, part: i32) -> sqlx::Result<Option<Vec<u8>>> {
    let row: Option<(Vec<u8>,)> =
        sqlx::query_as("SELECT bytes FROM bss.archive_parts WHERE job_id = $1 AND part = $2")
            .bind(id)
            .bind(part)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(|(b,)| b))
}

/// Where an upload is kept until its import job takes it.
pub fn upload_file(state: &SharedState) -> anyhow::Result<PathBuf> {
    Ok(job_dir(state)?.join(format!("{}.upload", uuid::Uuid::now_v7())))
}

/// Starts importing the archive uploaded to `file` (its size and SHA-256)
/// as `tenant`; the job deletes the file when it ends.
pub async fn start_import(
    state: &SharedState,
    file: PathBuf,
    upload: (u64, String),
    tenant: TenantId,
    options: import::Options,
    by: &str,
) -> Result<Job, NotStarted> {
    let new = NewJob {
        kind: "import",
        tenant: &tenant,
        options: serde_json::json!({
            "as": options.as_id.as_ref().map(TenantId::as_str),
            "trust": options.trust,
        }),
        by,
        upload: Some(&upload),
    };
    let job = create(&state.pool, new).await?;
    let id = job.id;
    let counter = Arc::new(Counter::default());
    let work = {
        let (state, counter, file) = (state.clone(), counter.clone(), file.clone());
        move || async move {
            let target = import::Target {
                pool: &state.pool,
                plugins: state.plugins.runtime(),
                keyring: &state.keyring,
                analytics_role: &state.settings.analytics_role,
                events: crate::events::EventContext {
                    source: format!("/business-store/{}", state.settings.instance_id),
                    correlation_id: format!("import-{id}"),
                    traceparent: None,
                },
            };
            let input = std::io::BufReader::new(std::fs::File::open(&file)?);
            let done = import::import(&target, input, &options, &mut counter.track()).await?;
            // As for a tenant provisioned here: nothing cached of an earlier one.
            if let Ok(tenant) = TenantId::parse(&done.tenant) {
                state.schemas.forget_tenant(&tenant);
                state.gate.reset(tenant.as_str());
            }
            Ok(Ended {
                result: serde_json::to_value(&done)?,
                archive: None,
            })
        }
    };
    run(state.pool.clone(), id, counter, work, file);
    Ok(job)
}
