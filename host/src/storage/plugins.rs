//! Plugins and their versions (`bss.plugins`, `bss.plugin_versions`).
//! Every statement is scoped by the tenant; a change notifies the other
//! replicas (`bss_plugins`, payload the tenant id) so they reload.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;

use super::StorageError;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PluginRow {
    pub name: String,
    pub kind: String,
    pub active_version: Option<i32>,
    pub trial_version: Option<i32>,
    pub trial_mode: Option<String>,
    pub trial_percent: Option<i16>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct VersionRow {
    pub name: String,
    pub version: i32,
    pub manifest: Value,
    pub sha256: String,
    pub size: i32,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
}

/// An active version, as the registry loads it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ActiveRow {
    pub name: String,
    pub kind: String,
    pub version: i32,
    pub manifest: Value,
    pub sha256: String,
}

pub struct NewVersion<'a> {
    pub tenant: &'a str,
    pub name: &'a str,
    pub kind: &'a str,
    pub manifest: &'a Value,
    pub sha256: &'a str,
    pub module: &'a [u8],
    pub actor: &'a str,
    /// Versions kept: older ones (never the active one) are pruned.
    pub keep: u32,
    /// Plugins the tenant may have: a new name beyond them is refused.
    pub max_plugins: u32,
    /// None: the new version becomes active; else it goes on trial.
    pub trial: Option<Trial>,
}

/// A version on trial beside the active one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trial {
    /// Runs on real calls; compared, never applied.
    Shadow,
    /// Answers this percent of calls (1-100).
    Canary(i16),
}

impl Trial {
    pub fn mode(&self) -> &'static str {
        match self {
            Self::Shadow => "shadow",
            Self::Canary(_) => "canary",
        }
    }

    pub fn percent(&self) -> Option<i16> {
        match self {
            Self::Shadow => None,
            Self::Canary(p) => Some(*p),
        }
    }
}

async fn notify(tx: &mut sqlx::PgConnection, tenant: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify('bss_plugins', $1)")
        .bind(tenant)
        .execute(tx)
        .await?;
    Ok(())
}

/// Commits a change that touched `rows` rows and tells the other replicas;
/// false (rolled back) when it touched none.
async fn finish(
    mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    rows: u64,
    tenant: &str,
) -> Result<bool, StorageError> {
    if rows == 0 {
        return Ok(false);
    }
    notify(&mut tx, tenant).await?;
    tx.commit().await?;
    Ok(true)
}

/// A stored version and what pruning freed.
#[derive(Debug)]
pub struct Created {
    pub version: i32,
    /// Modules (sha256) of pruned versions that no stored version uses any
    /// more: their compiled artifacts can go.
    pub unused: Vec<String>,
}

/// Stores the next version of a plugin (creating the plugin), makes it
/// active and prunes the versions beyond `keep`.
pub async fn create_version(pool: &PgPool, v: NewVersion<'_>) -> Result<Created, StorageError> {
    let mut tx = pool.begin().await?;
    // The tenant's row locked against the tenant's other uploads: the count
    // of its plugins below holds until this one is stored.
    let active: Option<(String,)> = sqlx::query_as(
        "SELECT id FROM bss.tenants WHERE id = $1 AND status = 'active' FOR NO KEY UPDATE",
    )
    .bind(v.tenant)
    .fetch_optional(&mut *tx)
    .await?;
    if active.is_none() {
        return Err(StorageError::TenantNotFound);
    }
    within_plugin_cap(&mut tx, v.tenant, v.name, v.max_plugins).await?;
    let (kind,): (String,) = sqlx::query_as(
        "INSERT INTO bss.plugins (tenant_id, name, kind) VALUES ($1, $2, $3)
         ON CONFLICT (tenant_id, name) DO UPDATE SET updated_at = now()
         RETURNING kind",
    )
    .bind(v.tenant)
    .bind(v.name)
    .bind(v.kind)
    .fetch_one(&mut *tx)
    .await?;
    if kind != v.kind {
        return Err(StorageError::Conflict(format!(
            "plugin {} is a {kind}; a {} needs another name (or delete this plugin first)",
            v.name, v.kind
        )));
    }
    let (version,): (i32,) = sqlx::query_as(
        "INSERT INTO bss.plugin_versions (tenant_id, name, version, manifest, sha256, size, module, created_by)
         SELECT $1, $2, COALESCE(max(version), 0) + 1, $3, $4, $5, $6, $7
           FROM bss.plugin_versions WHERE tenant_id = $1 AND name = $2
         RETURNING version",
    )
    .bind(v.tenant)
    .bind(v.name)
    .bind(v.manifest)
    .bind(v.sha256)
    .bind(v.module.len() as i32)
    .bind(v.module)
    .bind(v.actor)
    .fetch_one(&mut *tx)
    .await?;
    match v.trial {
        // A new active version ends any trial.
        None => sqlx::query(
            "UPDATE bss.plugins SET active_version = $3, trial_version = NULL, trial_mode = NULL,
                    trial_percent = NULL
              WHERE tenant_id = $1 AND name = $2",
        )
        .bind(v.tenant)
        .bind(v.name)
        .bind(version)
        .execute(&mut *tx)
        .await?,
        Some(trial) => {
            let on_trial = sqlx::query(
                "UPDATE bss.plugins SET trial_version = $3, trial_mode = $4, trial_percent = $5
                  WHERE tenant_id = $1 AND name = $2 AND active_version IS NOT NULL",
            )
            .bind(v.tenant)
            .bind(v.name)
            .bind(version)
            .bind(trial.mode())
            .bind(trial.percent())
            .execute(&mut *tx)
            .await?;
            if on_trial.rows_affected() == 0 {
                return Err(StorageError::Conflict(format!(
                    "plugin {} has no active version for a {} to run beside; upload it without `as`",
                    v.name,
                    trial.mode()
                )));
            }
            on_trial
        }
    };
    let pruned = prune(&mut tx, v.tenant, v.name, v.keep).await?;
    let unused = unused(&mut tx, pruned).await?;
    notify(&mut tx, v.tenant).await?;
    tx.commit().await?;
    Ok(Created { version, unused })
}

/// Refuses a new plugin name when the tenant has `max` plugins already
/// (a new version of an existing one is always fine).
async fn within_plugin_cap(
    tx: &mut sqlx::PgConnection,
    tenant: &str,
    name: &str,
    max: u32,
) -> Result<(), StorageError> {
    let (count, exists): (i64, bool) = sqlx::query_as(
        "SELECT count(*), COALESCE(bool_or(name = $2), false)
           FROM bss.plugins WHERE tenant_id = $1",
    )
    .bind(tenant)
    .bind(name)
    .fetch_one(tx)
    .await?;
    if exists || count < i64::from(max) {
        return Ok(());
    }
    Err(StorageError::Conflict(format!(
        "the tenant has {count} plugins, the most it may have ({max}); \
         delete one or upload a new version of an existing plugin instead"
    )))
}

/// Those of `shas` that no stored version (of any tenant) uses.
async fn unused(
    tx: &mut sqlx::PgConnection,
    mut shas: Vec<String>,
) -> Result<Vec<String>, StorageError> {
    shas.sort();
    shas.dedup();
    if shas.is_empty() {
        return Ok(shas);
    }
    let used: Vec<(String,)> =
        sqlx::query_as("SELECT DISTINCT sha256 FROM bss.plugin_versions WHERE sha256 = ANY($1)")
            .bind(&shas)
            .fetch_all(tx)
            .await?;
    shas.retain(|s| !used.iter().any(|(u,)| u == s));
    Ok(shas)
}

/// Deletes the plugin's versions beyond the newest `keep`, except the
/// active one: uploads cannot grow a tenant's stored modules without bound.
/// Returns the pruned versions' sha256.
async fn prune(
    tx: &mut sqlx::PgConnection,
    tenant: &str,
    name: &str,
    keep: u32,
) -> Result<Vec<String>, StorageError> {
    let pruned: Vec<(String,)> = sqlx::query_as(
        "DELETE FROM bss.plugin_versions v
          WHERE v.tenant_id = $1 AND v.name = $2
            AND v.version NOT IN (SELECT unnest(array_remove(ARRAY[active_version, trial_version], NULL))
                                    FROM bss.plugins WHERE tenant_id = $1 AND name = $2)
            AND v.version NOT IN (SELECT version FROM bss.plugin_versions
                                   WHERE tenant_id = $1 AND name = $2
                                   ORDER BY version DESC LIMIT $3)
          RETURNING v.sha256",
    )
    .bind(tenant)
    .bind(name)
    .bind(i64::from(keep.max(1)))
    .fetch_all(&mut *tx)
    .await?;
    Ok(pruned.into_iter().map(|(s,)| s).collect())
}

pub async fn list(pool: &PgPool, tenant: &str) -> Result<Vec<PluginRow>, StorageError> {
    Ok(sqlx::query_as(
        "SELECT name, kind, active_version, trial_version, trial_mode, trial_percent,
                created_at, updated_at FROM bss.plugins
          WHERE tenant_id = $1 ORDER BY name",
    )
    .bind(tenant)
    .fetch_all(pool)
    .await?)
}

pub async fn get(
    pool: &PgPool,
    tenant: &str,
    name: &str,
) -> Result<Option<(PluginRow, Vec<VersionRow>)>, StorageError> {
    let plugin: Option<PluginRow> = sqlx::query_as(
        "SELECT name, kind, active_version, trial_version, trial_mode, trial_percent,
                created_at, updated_at FROM bss.plugins
          WHERE tenant_id = $1 AND name = $2",
    )
    .bind(tenant)
    .bind(name)
    .fetch_optional(pool)
    .await?;
    let Some(plugin) = plugin else {
        return Ok(None);
    };
    let versions = sqlx::query_as(
        "SELECT name, version, manifest, sha256, size, created_at, created_by
           FROM bss.plugin_versions WHERE tenant_id = $1 AND name = $2 ORDER BY version",
    )
    .bind(tenant)
    .bind(name)
    .fetch_all(pool)
    .await?;
    Ok(Some((plugin, versions)))
}

/// Locks the plugin's row, then says whether it has `version`. An upload
/// pruning versions holds that row (it sets the active version), so the
/// version found cannot be pruned before the caller commits.
async fn lock_version(
    tx: &mut sqlx::PgConnection,
    tenant: &str,
    name: &str,
    version: i32,
) -> Result<bool, StorageError> {
    let locked: Option<(String,)> = sqlx::query_as(
        "SELECT name FROM bss.plugins WHERE tenant_id = $1 AND name = $2 FOR UPDATE",
    )
    .bind(tenant)
    .bind(name)
    .fetch_optional(&mut *tx)
    .await?;
    if locked.is_none() {
        return Ok(false);
    }
    // A statement of its own: it sees what a pruning upload committed.
    let exists: Option<(i32,)> = sqlx::query_as(
        "SELECT version FROM bss.plugin_versions
          WHERE tenant_id = $1 AND name = $2 AND version = $3",
    )
    .bind(tenant)
    .bind(name)
    .bind(version)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(exists.is_some())
}

/// Makes `version` the active one; false if the plugin has no such version.
pub async fn activate(
    pool: &PgPool,
    tenant: &str,
    name: &str,
    version: i32,
) -> Result<bool, StorageError> {
    let mut tx = pool.begin().await?;
    if !lock_version(&mut tx, tenant, name, version).await? {
        return Ok(false);
    }
    let done = sqlx::query(
        "UPDATE bss.plugins SET active_version = $3, updated_at = now(),
                trial_mode = CASE WHEN trial_version = $3 THEN NULL ELSE trial_mode END,
                trial_percent = CASE WHEN trial_version = $3 THEN NULL ELSE trial_percent END,
                trial_version = NULLIF(trial_version, $3)
          WHERE tenant_id = $1 AND name = $2",
    )
    .bind(tenant)
    .bind(name)
    .bind(version)
    .execute(&mut *tx)
    .await?;
    finish(tx, done.rows_affected(), tenant).await
}

/// Deletes a plugin and all its versions; None if there was none, else
/// the modules (sha256) no stored version uses any more.
pub async fn delete(
    pool: &PgPool,
    tenant: &str,
    name: &str,
) -> Result<Option<Vec<String>>, StorageError> {
    let mut tx = pool.begin().await?;
    let versions: Vec<(String,)> = sqlx::query_as(
        "DELETE FROM bss.plugin_versions WHERE tenant_id = $1 AND name = $2 RETURNING sha256",
    )
    .bind(tenant)
    .bind(name)
    .fetch_all(&mut *tx)
    .await?;
    let done = sqlx::query("DELETE FROM bss.plugins WHERE tenant_id = $1 AND name = $2")
        .bind(tenant)
        .bind(name)
        .execute(&mut *tx)
        .await?;
    // Its logs and recorded calls go with it (a plugin uploaded later under
    // the same name starts with none).
    for table in ["bss.plugin_logs", "bss.plugin_calls"] {
        sqlx::query(&format!(
            "DELETE FROM {table} WHERE tenant_id = $1 AND plugin = $2"
        ))
        .bind(tenant)
        .bind(name)
        .execute(&mut *tx)
        .await?;
    }
    let unused = unused(&mut tx, versions.into_iter().map(|(s,)| s).collect()).await?;
    Ok(finish(tx, done.rows_affected(), tenant)
        .await?
        .then_some(unused))
}

/// The active version of each of the tenant's plugins (active tenants only).
pub async fn active(pool: &PgPool, tenant: &str) -> Result<Vec<ActiveRow>, StorageError> {
    Ok(sqlx::query_as(
        "SELECT p.name, p.kind, v.version, v.manifest, v.sha256
           FROM bss.plugins p
           JOIN bss.tenants t ON t.id = p.tenant_id AND t.status = 'active'
           JOIN bss.plugin_versions v
             ON v.tenant_id = p.tenant_id AND v.name = p.name AND v.version = p.active_version
          WHERE p.tenant_id = $1
          ORDER BY p.name",
    )
    .bind(tenant)
    .fetch_all(pool)
    .await?)
}

/// The uploaded module of a version.
pub async fn module(
    pool: &PgPool,
    tenant: &str,
    name: &str,
    version: i32,
) -> Result<Vec<u8>, StorageError> {
    let row: Option<(Vec<u8>,)> = sqlx::query_as(
        "SELECT module FROM bss.plugin_versions WHERE tenant_id = $1 AND name = $2 AND version = $3",
    )
    .bind(tenant)
    .bind(name)
    .bind(version)
    .fetch_optional(pool)
    .await?;
    row.map(|(m,)| m)
        .ok_or_else(|| StorageError::NotFound(format!("plugin {name} version {version}")))
}

/// A tenant's own plugin ceilings (`{}` when none were set); None when
/// there is no active tenant with this id.
pub async fn ceilings(pool: &PgPool, tenant: &str) -> Result<Option<Value>, StorageError> {
    let row: Option<(Value,)> = sqlx::query_as(
        "SELECT plugin_ceilings FROM bss.tenants WHERE id = $1 AND status = 'active'",
    )
    .bind(tenant)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(v,)| v))
}

/// Sets a tenant's own plugin ceilings; false when there is no active tenant.
pub async fn set_ceilings(
    pool: &PgPool,
    tenant: &str,
    ceilings: &Value,
) -> Result<bool, StorageError> {
    let mut tx = pool.begin().await?;
    let done = sqlx::query(
        "UPDATE bss.tenants SET plugin_ceilings = $2 WHERE id = $1 AND status = 'active'",
    )
    .bind(tenant)
    .bind(ceilings)
    .execute(&mut *tx)
    .await?;
    finish(tx, done.rows_affected(), tenant).await
}

/// Puts an existing version on trial (replacing any trial); false when the
/// plugin has no such version, or no active version to run beside.
pub async fn start_trial(
    pool: &PgPool,
    tenant: &str,
    name: &str,
    version: i32,
    trial: Trial,
) -> Result<bool, StorageError> {
    let mut tx = pool.begin().await?;
    if !lock_version(&mut tx, tenant, name, version).await? {
        return Ok(false);
    }
    let done = sqlx::query(
        "UPDATE bss.plugins SET trial_version = $3, trial_mode = $4, trial_percent = $5,
                updated_at = now()
          WHERE tenant_id = $1 AND name = $2 AND active_version IS NOT NULL
            AND active_version <> $3",
    )
    .bind(tenant)
    .bind(name)
    .bind(version)
    .bind(trial.mode())
    .bind(trial.percent())
    .execute(&mut *tx)
    .await?;
    finish(tx, done.rows_affected(), tenant).await
}

/// Ends the plugin's trial (the active version stays); false when there
/// was none. With `promote`, the version on trial becomes the active one.
pub async fn end_trial(
    pool: &PgPool,
    tenant: &str,
    name: &str,
    promote: bool,
) -> Result<Option<i32>, StorageError> {
    let mut tx = pool.begin().await?;
    let ended: Option<(i32,)> = sqlx::query_as(
        "UPDATE bss.plugins
            SET active_version = CASE WHEN $3 THEN trial_version ELSE active_version END,
                trial_version = NULL, trial_mode = NULL, trial_percent = NULL, updated_at = now()
          WHERE tenant_id = $1 AND name = $2 AND trial_version IS NOT NULL
         RETURNING active_version",
    )
    .bind(tenant)
    .bind(name)
    .bind(promote)
    .fetch_optional(&mut *tx)
    .await?;
    let touched = u64::from(ended.is_some());
    Ok(finish(tx, touched, tenant)
        .await?
        .then_some(ended.map(|(v,)| v))
        .flatten())
}

/// The version on trial of each of the tenant's plugins that has one.
pub async fn trials(pool: &PgPool, tenant: &str) -> Result<Vec<TrialRow>, StorageError> {
    Ok(sqlx::query_as(
        "SELECT p.name, v.version, p.trial_mode, p.trial_percent, v.manifest, v.sha256
           FROM bss.plugins p
           JOIN bss.plugin_versions v
             ON v.tenant_id = p.tenant_id AND v.name = p.name AND v.version = p.trial_version
          WHERE p.tenant_id = $1",
    )
    .bind(tenant)
    .fetch_all(pool)
    .await?)
}

/// A version on trial, as the registry loads it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TrialRow {
    pub name: String,
    pub version: i32,
    pub trial_mode: String,
    pub trial_percent: Option<i16>,
    pub manifest: Value,
    pub sha256: String,
}
