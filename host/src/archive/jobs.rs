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
use tokio::io::AsyncReadExt;

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

/// A job's row with a running job whose heartbeat stopped shown as failed.
const JOB_COLUMNS: &str = "id, kind, tenant_id, options, records_done, records_total, bytes,
    sha256, result, created_by, created_at, updated_at, finished_at,
    CASE WHEN status = 'running' AND updated_at < now() - make_interval(secs => $2)
         THEN 'failed' ELSE status END AS status,
    CASE WHEN status = 'running' AND updated_at < now() - make_interval(secs => $2)
         THEN 'interrupted: the replica running it stopped' ELSE error END AS error";

pub async fn get(pool: &PgPool, id: uuid::Uuid) -> sqlx::Result<Option<Job>> {
    sqlx::query_as(&format!(
        "SELECT {JOB_COLUMNS} FROM bss.archive_jobs WHERE id = $1"
    ))
    .bind(id)
    .bind(STALE.as_secs_f64())
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

/// A new job's row, unless [`RUNNING`] are running; old jobs go first.
async fn create(
    pool: &PgPool,
    kind: &str,
    tenant: &TenantId,
    options: &Value,
    by: &str,
) -> Result<Job, NotStarted> {
    let mut tx = pool.begin().await.map_err(anyhow::Error::from)?;
    // One job starts at a time, so the count below stays true.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('bss.archive_jobs'))")
        .execute(&mut *tx)
        .await
        .map_err(anyhow::Error::from)?;
    sqlx::query(
        "DELETE FROM bss.archive_jobs
          WHERE created_at < now() - make_interval(secs => $1)
            AND (status <> 'running' OR updated_at < now() - make_interval(secs => $2))",
    )
    .bind(KEPT.as_secs_f64())
    .bind(STALE.as_secs_f64())
    .execute(&mut *tx)
    .await
    .map_err(anyhow::Error::from)?;
    let (running,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM bss.archive_jobs
          WHERE status = 'running' AND updated_at >= now() - make_interval(secs => $1)",
    )
    .bind(STALE.as_secs_f64())
    .fetch_one(&mut *tx)
    .await
    .map_err(anyhow::Error::from)?;
    if running >= RUNNING {
        return Err(NotStarted::Busy);
    }
    let id = uuid::Uuid::now_v7();
    sqlx::query(
        "INSERT INTO bss.archive_jobs (id, kind, tenant_id, options, created_by)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(kind)
    .bind(tenant.as_str())
    .bind(options)
    .bind(by)
    .execute(&mut *tx)
    .await
    .map_err(anyhow::Error::from)?;
    tx.commit().await.map_err(anyhow::Error::from)?;
    Ok(get(pool, id)
        .await
        .map_err(anyhow::Error::from)?
        .context("the job just made is gone")?)
}

/// Where a job keeps its file while it runs.
fn job_file(state: &SharedState, id: uuid::Uuid) -> anyhow::Result<PathBuf> {
    let dir = state.settings.data_dir.join("archive-jobs");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir.join(format!("{id}.tar.zst")))
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
fn run<W, F>(state: SharedState, id: uuid::Uuid, counter: Arc<Counter>, work: W, cleanup: PathBuf)
where
    W: FnOnce() -> F + Send + 'static,
    F: std::future::Future<Output = anyhow::Result<Ended>>,
{
    let runtime = tokio::runtime::Handle::current();
    let pool = state.pool.clone();
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
                Ok(ended) => sqlx::query(
                    "UPDATE bss.archive_jobs SET status = 'done', result = $2, bytes = $3,
                            sha256 = $4, records_done = $5, records_total = $6,
                            updated_at = now(), finished_at = now()
                      WHERE id = $1",
                )
                .bind(id)
                .bind(&ended.result)
                .bind(ended.bytes as i64)
                .bind(&ended.sha256)
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
    bytes: u64,
    sha256: String,
}

/// Starts exporting `tenant`: the archive is written to a file of the
/// data directory, then stored in parts.
pub async fn start_export(
    state: &SharedState,
    tenant: TenantId,
    options: export::Options,
    by: &str,
) -> Result<Job, NotStarted> {
    let asked = serde_json::json!({
        "withEvents": options.events,
        "webhookSecrets": options.webhook_secrets,
    });
    let job = create(&state.pool, "export", &tenant, &asked, by).await?;
    let id = job.id;
    let file = job_file(state, id)?;
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
            let (bytes, sha256) = store_parts(&state.pool, id, &file).await?;
            Ok(Ended {
                result: serde_json::to_value(&manifest.counts)?,
                bytes,
                sha256,
            })
        }
    };
    run(state.clone(), id, counter, work, file);
    Ok(job)
}

/// The archive at `file` into the job's parts; its size and SHA-256.
async fn store_parts(pool: &PgPool, id: uuid::Uuid, file: &Path) -> anyhow::Result<(u64, String)> {
    let mut input = tokio::fs::File::open(file).await?;
    let (mut bytes, mut hash) = (0u64, Sha256::new());
    let mut part = 0i32;
    loop {
        let mut buf = Vec::with_capacity(PART_BYTES);
        while buf.len() < PART_BYTES {
            let read = (&mut input)
                .take((PART_BYTES - buf.len()) as u64)
                .read_to_end(&mut buf)
                .await?;
            if read == 0 {
                break;
            }
        }
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
    job_file(state, uuid::Uuid::now_v7()).map(|f| f.with_extension("upload"))
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
    let asked = serde_json::json!({
        "as": options.as_id.as_ref().map(TenantId::as_str),
        "trust": options.trust,
    });
    let job = create(&state.pool, "import", &tenant, &asked, by).await?;
    let id = job.id;
    sqlx::query("UPDATE bss.archive_jobs SET bytes = $2, sha256 = $3 WHERE id = $1")
        .bind(id)
        .bind(upload.0 as i64)
        .bind(&upload.1)
        .execute(&state.pool)
        .await
        .map_err(anyhow::Error::from)?;
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
                bytes: upload.0,
                sha256: upload.1,
            })
        }
    };
    run(state.clone(), id, counter, work, file);
    Ok(job)
}
