//! Resource schema versions, kept in the tenant's `_schemas` table. Applying
//! a version locks the resource, checks every stored record against the new
//! schema, creates the resource table on first use and keeps `x-index`
//! indexes in step, all in one transaction.

use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgPool, Postgres, Transaction};
use utoipa::ToSchema;

use super::tasks::Queued;
use super::{StorageError, pg_code};
use crate::catalog::compiled::encrypted_paths_of;
use crate::catalog::{CompiledSchema, FieldType};
use crate::crypto::keyring::queue_reseal;
use crate::domain::ids::quote_ident;
use crate::domain::{ResourceName, TenantId};
use crate::error::FieldError;
use crate::events::envelope::{self, EventContext, SCHEMA_UPDATED};
use crate::events::outbox;

/// Records named at most in one refusal.
const MAX_OFFENDING_RECORDS: usize = 20;

#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct SchemaVersion {
    pub resource: String,
    pub version: i32,
    pub schema: Value,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
}

/// What applying a schema did.
#[derive(Debug)]
pub enum Applied {
    Created(SchemaVersion),
    Unchanged(SchemaVersion),
    /// Stored records that the new schema would reject.
    Incompatible(Vec<FieldError>),
}

fn select_versions(tenant: &TenantId) -> String {
    format!(
        "SELECT resource, version, schema, created_at, created_by FROM {}._schemas",
        tenant.schema_ident()
    )
}

pub async fn current(
    pool: &PgPool,
    tenant: &TenantId,
    resource: &ResourceName,
) -> Result<Option<SchemaVersion>, StorageError> {
    let sql = format!(
        "{} s WHERE resource = $1 AND version = (SELECT current_version FROM {}._resources WHERE resource = $1)",
        select_versions(tenant),
        tenant.schema_ident()
    );
    sqlx::query_as(&sql)
        .bind(resource.as_str())
        .fetch_optional(pool)
        .await
        .map_err(StorageError::from_tenant_query)
}

/// The names of the tenant's resources (those with a schema).
pub async fn resource_names(pool: &PgPool, tenant: &TenantId) -> Result<Vec<String>, StorageError> {
    let sql = format!(
        "SELECT resource FROM {}._resources ORDER BY resource",
        tenant.schema_ident()
    );
    sqlx::query_scalar(&sql)
        .fetch_all(pool)
        .await
        .map_err(StorageError::from_tenant_query)
}

pub async fn list_current(
    pool: &PgPool,
    tenant: &TenantId,
) -> Result<Vec<SchemaVersion>, StorageError> {
    let sql = format!(
        "{} s WHERE (resource, version) IN (SELECT resource, current_version FROM {}._resources) ORDER BY resource",
        select_versions(tenant),
        tenant.schema_ident()
    );
    sqlx::query_as(&sql)
        .fetch_all(pool)
        .await
        .map_err(StorageError::from_tenant_query)
}

pub async fn versions(
    pool: &PgPool,
    tenant: &TenantId,
    resource: &ResourceName,
) -> Result<Vec<SchemaVersion>, StorageError> {
    let sql = format!(
        "{} WHERE resource = $1 ORDER BY version",
        select_versions(tenant)
    );
    sqlx::query_as(&sql)
        .bind(resource.as_str())
        .fetch_all(pool)
        .await
        .map_err(StorageError::from_tenant_query)
}

pub async fn version(
    pool: &PgPool,
    tenant: &TenantId,
    resource: &ResourceName,
    version: i32,
) -> Result<Option<SchemaVersion>, StorageError> {
    let sql = format!(
        "{} WHERE resource = $1 AND version = $2",
        select_versions(tenant)
    );
    sqlx::query_as(&sql)
        .bind(resource.as_str())
        .bind(version)
        .fetch_optional(pool)
        .await
        .map_err(StorageError::from_tenant_query)
}

/// Applies `schema` as the resource's next version. `compiled` is the same
/// document compiled (its version number is ignored). A version that adds
/// or removes `x-encrypted` on a field queues the tenant's re-encryption
/// job in the same transaction (refused when the tenant has `max_pending`
/// tasks waiting).
pub async fn apply(
    pool: &PgPool,
    tenant: &TenantId,
    resource: &ResourceName,
    compiled: &CompiledSchema,
    actor: &str,
    events: &EventContext,
    max_pending: i64,
) -> Result<Applied, StorageError> {
    let s = tenant.schema_ident();
    let mut tx = pool.begin().await?;
    let current: Option<(i32,)> = sqlx::query_as(&format!(
        "SELECT current_version FROM {s}._resources WHERE resource = $1 FOR UPDATE"
    ))
    .bind(resource.as_str())
    .fetch_optional(&mut *tx)
    .await
    .map_err(StorageError::from_tenant_query)?;

    let next = match current {
        Some((v,)) => {
            let stored: (Value,) = sqlx::query_as(&format!(
                "SELECT schema FROM {s}._schemas WHERE resource = $1 AND version = $2"
            ))
            .bind(resource.as_str())
            .bind(v)
            .fetch_one(&mut *tx)
            .await?;
            if stored.0 == compiled.schema {
                let same = version_row(&mut tx, tenant, resource, v).await?;
                return Ok(Applied::Unchanged(same));
            }
            let offending = check_records(&mut tx, tenant, resource, compiled).await?;
            if !offending.is_empty() {
                return Ok(Applied::Incompatible(offending));
            }
            if encrypted_paths_of(&stored.0) != compiled.encrypted_paths() {
                let reason = format!("schema:{resource}:v{}", v + 1);
                let source = format!("schema:{resource}");
                let queued =
                    queue_reseal(&mut *tx, tenant.as_str(), &reason, &source, max_pending).await?;
                if queued == Queued::Full {
                    return Err(StorageError::Conflict(
                        "the tenant has too many tasks waiting to re-encrypt the stored values; \
                         try the change again later"
                            .into(),
                    ));
                }
            }
            sqlx::query(&format!(
                "UPDATE {s}._resources SET current_version = $2, updated_at = now() WHERE resource = $1"
            ))
            .bind(resource.as_str())
            .bind(v + 1)
            .execute(&mut *tx)
            .await?;
            v + 1
        }
        None => {
            create_resource(&mut tx, tenant, resource).await?;
            1
        }
    };
    sqlx::query(&format!(
        "INSERT INTO {s}._schemas (resource, version, schema, created_by) VALUES ($1, $2, $3, $4)"
    ))
    .bind(resource.as_str())
    .bind(next)
    .bind(&compiled.schema)
    .bind(actor)
    .execute(&mut *tx)
    .await?;
    sync_indexes(&mut tx, tenant, resource, compiled).await?;
    let created = version_row(&mut tx, tenant, resource, next).await?;
    let event_id = envelope::new_event_id();
    let event = envelope::complete(
        events,
        tenant,
        event_id,
        SCHEMA_UPDATED,
        resource.as_str(),
        serde_json::json!({
            "tenantId": tenant.as_str(),
            "resource": resource.as_str(),
            "version": next,
            "timestamp": created.created_at,
            "initiator": actor,
        }),
    );
    let key = format!("{tenant}/{resource}");
    outbox::insert(
        &mut *tx,
        event_id,
        tenant.as_str(),
        resource.as_str(),
        SCHEMA_UPDATED,
        &key,
        &event,
    )
    .await?;
    tx.commit().await?;
    tracing::info!(
        tenant = %tenant,
        resource = %resource,
        version = compiled.version,
        actor,
        "schema applied"
    );
    Ok(Applied::Created(created))
}

async fn version_row(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &TenantId,
    resource: &ResourceName,
    version: i32,
) -> Result<SchemaVersion, StorageError> {
    let sql = format!(
        "{} WHERE resource = $1 AND version = $2",
        select_versions(tenant)
    );
    Ok(sqlx::query_as(&sql)
        .bind(resource.as_str())
        .bind(version)
        .fetch_one(&mut **tx)
        .await?)
}

async fn create_resource(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &TenantId,
    resource: &ResourceName,
) -> Result<(), StorageError> {
    create_resource_table(tx, tenant, resource).await?;
    create_resource_keys(tx, tenant, resource).await
}

/// A new resource: its `_resources` row and its table, without the
/// table's primary key and indexes (an import adds those once its records
/// are in, with [`create_resource_keys`]).
pub(crate) async fn create_resource_table(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &TenantId,
    resource: &ResourceName,
) -> Result<(), StorageError> {
    let s = tenant.schema_ident();
    let table = resource.table_in(tenant);
    let inserted = sqlx::query(&format!(
        "INSERT INTO {s}._resources (resource, current_version) VALUES ($1, 1)"
    ))
    .bind(resource.as_str())
    .execute(&mut **tx)
    .await;
    if let Err(e) = inserted {
        return Err(match pg_code(&e).as_deref() {
            Some("23505") => StorageError::Conflict(format!(
                "resource {resource} was created concurrently; retry"
            )),
            _ => e.into(),
        });
    }
    sqlx::query(&format!(
        "CREATE TABLE {table} (
            id text NOT NULL,
            data jsonb NOT NULL,
            audit jsonb,
            version bigint NOT NULL DEFAULT 1,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now())"
    ))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A resource table's primary key (`id`) and its index in creation order.
pub(crate) async fn create_resource_keys(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &TenantId,
    resource: &ResourceName,
) -> Result<(), StorageError> {
    let table = resource.table_in(tenant);
    sqlx::query(&format!("ALTER TABLE {table} ADD PRIMARY KEY (id)"))
        .execute(&mut **tx)
        .await?;
    let created_idx = quote_ident(&format!("{}created", index_prefix(resource)));
    sqlx::query(&format!(
        "CREATE INDEX {created_idx} ON {table} (created_at, id)"
    ))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Every stored record the new schema rejects (up to a limit), as errors
/// naming the record and the field.
async fn check_records(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &TenantId,
    resource: &ResourceName,
    compiled: &CompiledSchema,
) -> Result<Vec<FieldError>, StorageError> {
    let sql = format!(
        "SELECT id, data FROM {} ORDER BY id",
        resource.table_in(tenant)
    );
    let mut rows = sqlx::query_as::<_, (String, Value)>(&sql).fetch(&mut **tx);
    let mut offending = Vec::new();
    let mut records = 0;
    let mut ran = std::time::Instant::now();
    while let Some((id, data)) = rows.try_next().await? {
        // Checking many records is CPU work on an async worker: give other
        // requests their turn every couple of milliseconds.
        if ran.elapsed() > std::time::Duration::from_millis(2) {
            tokio::task::yield_now().await;
            ran = std::time::Instant::now();
        }
        // Sealed (`x-encrypted`) values are checked when written, in
        // clear; here only their sealed form is seen, so it is not judged.
        let errors = compiled.validate(&data).err().map(|errors| {
            errors
                .into_iter()
                .filter(|e| !crate::crypto::fields::sealed_at(&data, &e.path))
                .collect::<Vec<_>>()
        });
        if let Some(errors) = errors.filter(|e| !e.is_empty()) {
            records += 1;
            offending.extend(errors.into_iter().map(|e| FieldError {
                message: format!("stored record {id} would be invalid: {}", e.message),
                record_id: Some(id.clone()),
                ..e
            }));
            if records >= MAX_OFFENDING_RECORDS {
                break;
            }
        }
    }
    Ok(offending)
}

/// The SQL expression of a data field, as used by filters, sorts and
/// `x-index` indexes alike (the same text, so that indexes are used).
pub fn field_expr(path: &[String], kind: FieldType) -> String {
    let mut expr = String::from("data");
    for (i, seg) in path.iter().enumerate() {
        let op = if i + 1 == path.len() { "->>" } else { "->" };
        expr.push_str(&format!(" {op} {}", quote_literal(seg)));
    }
    match kind {
        FieldType::Numeric => format!("(({expr})::numeric)"),
        FieldType::Boolean => format!("(({expr})::boolean)"),
        FieldType::Text | FieldType::Other => format!("({expr})"),
    }
}

/// Quotes an SQL string literal. Field names are also restricted to
/// `[A-Za-z0-9_-]` before they get here; this is the second fence.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn truncate(s: &str, n: usize) -> &str {
    &s[..s.len().min(n)]
}

/// The start of every index name generated for a resource. Resource (and
/// so table) names begin with a letter, and these with `_ix_`, so an index
/// never takes a table's name; the hash of the whole resource name keeps two
/// resources with a common prefix apart. At most 48 characters, leaving room
/// for a suffix within PostgreSQL's 63.
fn index_prefix(resource: &ResourceName) -> String {
    use sha2::{Digest, Sha256};
    let hash = Sha256::digest(resource.as_str().as_bytes());
    let hex: String = hash[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("_ix_{}_{hex}_", truncate(resource.as_str(), 30))
}

/// Creates an index per `x-index` field and drops those no longer marked.
pub(crate) async fn sync_indexes(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &TenantId,
    resource: &ResourceName,
    compiled: &CompiledSchema,
) -> Result<(), StorageError> {
    use sha2::{Digest, Sha256};
    let prefix = format!("{}x", index_prefix(resource));
    // Names of releases before collision-free names, dropped when unmarked.
    let legacy = format!("xi_{}_", truncate(resource.as_str(), 40));
    let mut wanted = Vec::new();
    for field in compiled.indexed_fields() {
        let expr = field_expr(&field.path, field.kind);
        let hash = Sha256::digest(expr.as_bytes());
        let name = format!(
            "{prefix}{:02x}{:02x}{:02x}{:02x}",
            hash[0], hash[1], hash[2], hash[3]
        );
        sqlx::query(&format!(
            "CREATE INDEX IF NOT EXISTS {} ON {} ({expr})",
            quote_ident(&name),
            resource.table_in(tenant)
        ))
        .execute(&mut **tx)
        .await?;
        wanted.push(name);
    }
    let existing: Vec<(String,)> = sqlx::query_as(
        "SELECT indexname FROM pg_indexes WHERE schemaname = $1 AND tablename = $2
            AND (starts_with(indexname, $3) OR starts_with(indexname, $4))",
    )
    .bind(tenant.schema_name())
    .bind(resource.as_str())
    .bind(&prefix)
    .bind(&legacy)
    .fetch_all(&mut **tx)
    .await?;
    for (name,) in existing.into_iter().filter(|(n,)| !wanted.contains(n)) {
        sqlx::query(&format!(
            "DROP INDEX {}.{}",
            tenant.schema_ident(),
            quote_ident(&name)
        ))
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}
