//! The re-encryption job of one tenant: every stored record is brought to
//! what its resource's current schema and the tenant's current key want
//! (values at `x-encrypted` paths sealed with the current key, nothing
//! sealed elsewhere). Queued by a key rotation (once per new key id) and by
//! a schema change that adds or removes `x-encrypted` (once per version).
//!
//! It walks resources in name order and records in id order, a batch
//! (`reseal_batch` records, at most [`BATCH_BYTES`]) per transaction; the
//! batch's updates, its progress and the renewal of the job's lease commit
//! together, so a job whose replica was killed resumes after the last
//! committed batch once its lease lapses (`task_lease_secs`). Records are
//! replaced only if unchanged since read (a concurrent write seals with the
//! current key anyway), keep their version and timestamps, and cause no
//! event. Reads work throughout: every sealed value names its key.
//! Progress: `GET /v1/tasks/{id}` (`progress`), and in `/metrics`
//! `reseal_records_scanned_total`, `reseal_records_moved_total`,
//! `reseal_jobs_running`.

use serde::{Deserialize, Serialize};

use crate::app_state::SharedState;
use crate::crypto::{CryptoError, Scope, fields};
use crate::domain::{ResourceName, TenantId};
use crate::storage::StorageError;
use crate::storage::records;
use crate::storage::tasks::{self, Claimed, Outcome};

/// Stored bytes one batch reads, about.
const BATCH_BYTES: i64 = 8 << 20;

/// Where a job is, saved with each batch.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Progress {
    /// The resource being walked (absent: not started).
    pub resource: Option<String>,
    /// The last record id done in it.
    pub after: Option<String>,
    pub scanned: u64,
    /// Records whose stored form was replaced.
    pub moved: u64,
    /// Records left as they were because a value in them does not open
    /// (altered in the database); reads of them fail the same way.
    pub undecryptable: u64,
    /// Resources done, of `resources`.
    pub resources_done: usize,
    pub resources: usize,
}

/// Why a job stopped before its end.
enum Stop {
    /// The lease passed to another replica: it carries on.
    LeaseLost,
    Key(CryptoError),
    Storage(StorageError),
}

impl From<StorageError> for Stop {
    fn from(e: StorageError) -> Self {
        Self::Storage(e)
    }
}

impl From<sqlx::Error> for Stop {
    fn from(e: sqlx::Error) -> Self {
        Self::Storage(e.into())
    }
}

/// Runs a claimed job to its end, or until it must stop; records the outcome.
pub async fn run_job(state: SharedState, job: Claimed) {
    metrics::gauge!("reseal_jobs_running").increment(1.0);
    let result = walk(&state, &job).await;
    metrics::gauge!("reseal_jobs_running").decrement(1.0);
    let max = state.settings.task_max_attempts;
    let retry_in = super::backoff(job.attempts, state.settings.task_retry_max_secs);
    // A key source that is down is not the job's failure: the claim's
    // attempt is given back, and the job waits for the source.
    let (outcome, attempts) = match result {
        Ok(progress) => {
            tracing::info!(tenant = %job.tenant_id, task = %job.id, moved = progress.moved,
                scanned = progress.scanned, "re-encryption done");
            (Outcome::Done, 0)
        }
        Err(Stop::LeaseLost) => {
            tracing::warn!(task = %job.id, "re-encryption job taken over by another replica");
            return;
        }
        Err(Stop::Key(e)) => {
            let (retry_in_secs, attempts) = match &e {
                CryptoError::KeyUnavailable {
                    retry_after_secs, ..
                } => ((*retry_after_secs).max(1) as f64, -1),
                CryptoError::Undecryptable { .. } => (retry_in, 0),
            };
            let error = e.to_string();
            (
                Outcome::Failed {
                    error,
                    retry_in_secs,
                },
                attempts,
            )
        }
        Err(Stop::Storage(e)) => {
            tracing::warn!(task = %job.id, error = %e, "re-encryption job failed");
            let error = "a database error stopped the job; it will be resumed".into();
            (
                Outcome::Failed {
                    error,
                    retry_in_secs: retry_in,
                },
                0,
            )
        }
    };
    if let Err(e) = tasks::finish(&state.pool, &job, &outcome, max, attempts).await {
        tracing::warn!(task = %job.id, error = %e, "recording a job's end failed");
    }
}

async fn walk(state: &SharedState, job: &Claimed) -> Result<Progress, Stop> {
    let tenant = TenantId::parse(&job.tenant_id)
        .map_err(|e| Stop::Storage(StorageError::BadRequest(e.to_string())))?;
    let mut progress: Progress = serde_json::from_value(job.progress.clone()).unwrap_or_default();
    let all = records::resources(&state.pool, &tenant).await?;
    progress.resources = all.len();
    let start = progress.resource.clone();
    for name in all {
        if start.as_ref().is_some_and(|s| name < *s) {
            continue;
        }
        if progress.resource.as_ref() != Some(&name) {
            progress.resource = Some(name.clone());
            progress.after = None;
        }
        let resource = ResourceName::parse(&name)
            .map_err(|e| Stop::Storage(StorageError::BadRequest(e.to_string())))?;
        walk_resource(state, job, &tenant, &resource, &mut progress).await?;
        progress.resources_done += 1;
    }
    Ok(progress)
}

async fn walk_resource(
    state: &SharedState,
    job: &Claimed,
    tenant: &TenantId,
    resource: &ResourceName,
    progress: &mut Progress,
) -> Result<(), Stop> {
    let settings = &state.settings;
    let lease = settings.task_lease_secs as f64;
    loop {
        // The schema and the current key are read again for each batch:
        // a change during the job is followed at once (and queues a job of
        // its own, which runs after this one and catches what this one saw
        // too late).
        let Some(schema) = state.schemas.reload(&state.pool, tenant, resource).await? else {
            return Ok(());
        };
        let paths = schema.encrypted_paths();
        let page = records::stored_page(
            &state.pool,
            tenant,
            resource,
            progress.after.as_deref(),
            settings.reseal_batch,
            BATCH_BYTES,
        )
        .await?;
        let Some((last, _)) = page.last() else {
            return Ok(());
        };
        let last = last.clone();
        state.keyring.forget_current(tenant.as_str());
        let key = state
            .keyring
            .current(tenant.as_str())
            .await
            .map_err(Stop::Key)?;
        let mut moves = Vec::new();
        for (id, stored) in &page {
            if fields::settled(stored, paths, &key.id) {
                continue;
            }
            let scope = Scope {
                tenant: tenant.as_str(),
                resource: resource.as_str(),
                record: id,
            };
            let mut doc = stored.clone();
            match crate::crypto::open_document(&state.keyring, &scope, &mut doc).await {
                Ok(()) => {}
                Err(CryptoError::Undecryptable { .. }) => {
                    progress.undecryptable += 1;
                    continue;
                }
                Err(e) => return Err(Stop::Key(e)),
            }
            fields::seal(&mut doc, paths, &key, &scope).map_err(Stop::Key)?;
            moves.push((id, stored, doc));
        }
        let mut tx = state.pool.begin().await?;
        let mut moved = 0;
        for (id, read, doc) in &moves {
            if records::replace_stored(&mut tx, tenant, resource, id, read, doc).await? {
                moved += 1;
            }
        }
        let scanned = page.len() as u64;
        let mut next = progress.clone();
        next.after = Some(last);
        next.scanned += scanned;
        next.moved += moved;
        let saved = serde_json::to_value(&next).unwrap_or_default();
        if !tasks::save_progress(&mut *tx, job, &saved, lease).await? {
            return Err(Stop::LeaseLost);
        }
        tx.commit().await?;
        *progress = next;
        metrics::counter!("reseal_records_scanned_total").increment(scanned);
        metrics::counter!("reseal_records_moved_total").increment(moved);
        tokio::time::sleep(std::time::Duration::from_millis(settings.reseal_pause_ms)).await;
    }
}
