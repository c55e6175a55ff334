//! Everything that talks SQL. Tenant data lives in one Postgres schema per
//! tenant; every statement names its schema explicitly (schema-qualified,
//! quoted identifiers derived from validated newtypes), so a pooled
//! connection carries no tenant state between requests.

pub mod coalesce;
pub mod database;
pub mod lanes;
pub mod local_postgres;
pub mod plugins;
pub mod query;
pub mod records;
pub mod schemas;
pub mod tasks;
pub mod tenants;
pub mod webhooks;

pub use database::{Database, pg_code};

/// Errors of the storage layer; the API maps each to a status.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The tenant does not exist or is archived.
    #[error("tenant not found")]
    TenantNotFound,
    #[error("{0}")]
    NotFound(String),
    /// The request named values the database could not accept.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    /// If-Match did not match the stored version.
    #[error("{0}")]
    PreconditionFailed(String),
    /// The resource's schema changed while the write was prepared; the caller
    /// revalidates against the new version and retries.
    #[error("schema version changed")]
    SchemaChanged,
    /// The resource row is locked (a schema change is checking its
    /// records) and the statement asked not to wait (`NOWAIT`).
    #[error("the resource is locked by a schema change")]
    Locked,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

impl StorageError {
    /// Maps "schema/table does not exist" to tenant-not-found: an archived
    /// tenant's schema is renamed, so its queries fail this way.
    pub fn from_tenant_query(e: sqlx::Error) -> Self {
        match pg_code(&e).as_deref() {
            // A missing schema, or a missing table inside a schema that is gone.
            Some("3F000") | Some("42P01") => Self::TenantNotFound,
            _ => Self::Db(e),
        }
    }
}

impl From<StorageError> for crate::error::ApiError {
    fn from(e: StorageError) -> Self {
        use crate::error::ApiError;
        match e {
            StorageError::TenantNotFound => ApiError::not_found("tenant not found"),
            StorageError::NotFound(m) => ApiError::not_found(m),
            StorageError::BadRequest(m) => ApiError::bad_request(m),
            StorageError::Conflict(m) => ApiError::conflict(m),
            StorageError::PreconditionFailed(m) => ApiError::PreconditionFailed(m),
            StorageError::Locked => ApiError::Unavailable {
                detail: "the resource's schema is being changed; send the write again".into(),
                retry_after_secs: 5,
            },
            StorageError::SchemaChanged => ApiError::conflict(
                "the resource's schema changed while the write was in progress; retry",
            ),
            StorageError::Db(e) => ApiError::Internal(e.into()),
        }
    }
}
