//! Tenant lifecycle: provisioning creates the tenant's Postgres schema with
//! the service's own tables and the analytics grants, in one transaction;
//! archiving renames the schema at once (so no query can reach it) and the
//! reaper drops it after the grace period.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use utoipa::ToSchema;

use super::{StorageError, pg_code};
use crate::domain::TenantId;
use crate::domain::ids::quote_ident;

#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct Tenant {
    pub id: String,
    pub name: String,
    /// `active` or `archived`.
    pub status: String,
    pub created_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop_after: Option<DateTime<Utc>>,
}

/// Creates the tenant and its schema. `Ok(None)` when the id is taken.
pub async fn create(
    pool: &PgPool,
    id: &TenantId,
    name: &str,
    analytics_role: &str,
) -> Result<Option<Tenant>, StorageError> {
    let mut tx = pool.begin().await?;
    let inserted = sqlx::query_as::<_, Tenant>(
        "INSERT INTO bss.tenants (id, name, schema_name) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING
         RETURNING id, name, status, created_at, drop_after",
    )
    .bind(id.as_str())
    .bind(name)
    .bind(id.schema_name())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(tenant) = inserted else {
        return Ok(None);
    };
    for statement in schema_ddl(id, analytics_role) {
        sqlx::query(&statement).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    tracing::info!(tenant = %id, schema = %id.schema_name(), "tenant provisioned");
    Ok(Some(tenant))
}

/// Names a tenant that was provisioned under its id (its name was not
/// known yet); a name set meanwhile is kept.
pub async fn name_if_unnamed(
    pool: &PgPool,
    id: &TenantId,
    name: &str,
) -> Result<bool, StorageError> {
    let done = sqlx::query("UPDATE bss.tenants SET name = $2 WHERE id = $1 AND name = $1")
        .bind(id.as_str())
        .bind(name)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// The DDL of a new tenant schema.
pub(crate) fn schema_ddl(id: &TenantId, analytics_role: &str) -> Vec<String> {
    let s = id.schema_ident();
    let role = quote_ident(analytics_role);
    vec![
        format!("CREATE SCHEMA {s}"),
        // One row per resource: its current schema version. Writers lock the
        // row FOR KEY SHARE and schema changes FOR UPDATE, so no record is
        // written against a version that is being replaced.
        format!(
            "CREATE TABLE {s}._resources (
                resource text PRIMARY KEY,
                current_version integer NOT NULL,
                updated_at timestamptz NOT NULL DEFAULT now())"
        ),
        format!(
            "CREATE TABLE {s}._schemas (
                resource text NOT NULL REFERENCES {s}._resources (resource),
                version integer NOT NULL,
                schema jsonb NOT NULL,
                created_at timestamptz NOT NULL DEFAULT now(),
                created_by text NOT NULL,
                PRIMARY KEY (resource, version))"
        ),
        format!(
            "CREATE TABLE {s}._idempotency (
                key text PRIMARY KEY,
                request_hash text NOT NULL,
                status smallint,
                response jsonb,
                created_at timestamptz NOT NULL DEFAULT now())"
        ),
        format!("GRANT USAGE ON SCHEMA {s} TO {role}"),
        format!("GRANT SELECT ON ALL TABLES IN SCHEMA {s} TO {role}"),
        format!("ALTER DEFAULT PRIVILEGES IN SCHEMA {s} GRANT SELECT ON TABLES TO {role}"),
        // Idempotency rows hash whole request bodies (x-encrypted values
        // included): a hash of a short secret can be guessed offline.
        format!("REVOKE SELECT ON {s}._idempotency FROM {role}"),
    ]
}

pub async fn get(pool: &PgPool, id: &TenantId) -> Result<Option<Tenant>, StorageError> {
    Ok(sqlx::query_as::<_, Tenant>(
        "SELECT id, name, status, created_at, drop_after FROM bss.tenants WHERE id = $1",
    )
    .bind(id.as_str())
    .fetch_optional(pool)
    .await?)
}

/// Archives an active tenant: its schema is renamed at once so that every
/// request for it answers 404, and it is dropped after `grace_secs`.
/// Returns false when there is no active tenant with this id.
pub async fn archive(pool: &PgPool, id: &TenantId, grace_secs: u64) -> Result<bool, StorageError> {
    let mut tx = pool.begin().await?;
    let archived_schema = format!("a_{}", uuid::Uuid::now_v7().simple());
    let row: Option<(String,)> = sqlx::query_as(
        "UPDATE bss.tenants
            SET status = 'archived', archived_at = now(), archived_schema = $2,
                drop_after = now() + make_interval(secs => $3)
          WHERE id = $1 AND status = 'active'
          RETURNING schema_name",
    )
    .bind(id.as_str())
    .bind(&archived_schema)
    .bind(grace_secs as f64)
    .fetch_optional(&mut *tx)
    .await?;
    if row.is_none() {
        return Ok(false);
    }
    sqlx::query(&format!(
        "ALTER SCHEMA {} RENAME TO {}",
        id.schema_ident(),
        quote_ident(&archived_schema)
    ))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(tenant = %id, grace_secs, "tenant archived; its data is dropped after the grace period");
    Ok(true)
}

/// Drops archived tenants whose grace period has passed; returns how many.
/// Safe to run on every replica at once (`SKIP LOCKED`).
pub async fn reap(pool: &PgPool) -> Result<u64, StorageError> {
    let mut dropped = 0;
    loop {
        let mut tx = pool.begin().await?;
        let due: Option<(String, String)> = sqlx::query_as(
            "SELECT id, archived_schema FROM bss.tenants
              WHERE status = 'archived' AND drop_after <= now()
              ORDER BY drop_after LIMIT 1 FOR UPDATE SKIP LOCKED",
        )
        .fetch_optional(&mut *tx)
        .await?;
        let Some((id, schema)) = due else {
            return Ok(dropped);
        };
        match sqlx::query(&format!("DROP SCHEMA {} CASCADE", quote_ident(&schema)))
            .execute(&mut *tx)
            .await
        {
            Ok(_) => {}
            Err(e) if pg_code(&e).as_deref() == Some("3F000") => {}
            Err(e) => return Err(e.into()),
        }
        crate::events::outbox::forget_tenant(&mut *tx, &id).await?;
        sqlx::query("DELETE FROM bss.tenants WHERE id = $1")
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(tenant = %id, "dropped archived tenant");
        dropped += 1;
    }
}

/// An active tenant's own rate limits (`{}`: the installation's); `None`
/// when there is no active tenant with this id. The gate's one query.
pub async fn rate_limits(
    pool: &PgPool,
    id: &str,
) -> Result<Option<serde_json::Value>, StorageError> {
    Ok(sqlx::query_scalar(
        "SELECT rate_limits FROM bss.tenants WHERE id = $1 AND status = 'active'",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?)
}

/// Replaces an active tenant's own rate limits; false when there is no
/// active tenant with this id.
pub async fn set_rate_limits(
    pool: &PgPool,
    id: &str,
    limits: &serde_json::Value,
) -> Result<bool, StorageError> {
    let done =
        sqlx::query("UPDATE bss.tenants SET rate_limits = $2 WHERE id = $1 AND status = 'active'")
            .bind(id)
            .bind(limits)
            .execute(pool)
            .await?;
    Ok(done.rows_affected() == 1)
}
