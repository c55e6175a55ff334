//! The per-process cache of compiled schemas, keyed by tenant and resource.
//!
//! It may be stale when another replica applies a schema; writes are safe
//! anyway because every write checks, in its own statement, that the stored
//! current version is the one it validated against, and reloads on mismatch.

use std::sync::Arc;

use dashmap::DashMap;
use sqlx::PgPool;

use super::CompiledSchema;
use crate::domain::{ResourceName, TenantId};
use crate::storage::{StorageError, schemas};

#[derive(Debug, Default)]
pub struct SchemaCache {
    current: DashMap<(TenantId, ResourceName), Arc<CompiledSchema>>,
}

impl SchemaCache {
    /// The current schema of a resource, or `None` if it has none.
    pub async fn current(
        &self,
        pool: &PgPool,
        tenant: &TenantId,
        resource: &ResourceName,
    ) -> Result<Option<Arc<CompiledSchema>>, StorageError> {
        if let Some(hit) = self.current.get(&(tenant.clone(), resource.clone())) {
            return Ok(Some(hit.clone()));
        }
        self.reload(pool, tenant, resource).await
    }

    /// Reads the current version from the database and caches it.
    pub async fn reload(
        &self,
        pool: &PgPool,
        tenant: &TenantId,
        resource: &ResourceName,
    ) -> Result<Option<Arc<CompiledSchema>>, StorageError> {
        let key = (tenant.clone(), resource.clone());
        let Some(stored) = schemas::current(pool, tenant, resource).await? else {
            self.current.remove(&key);
            return Ok(None);
        };
        let compiled = CompiledSchema::compile(
            stored.schema,
            stored.version,
            stored.created_at,
            stored.created_by,
        )
        .map_err(|e| {
            StorageError::Db(sqlx::Error::Protocol(format!(
                "stored schema {tenant}/{resource} v{} no longer compiles: {e:?}",
                stored.version
            )))
        })?;
        let compiled = Arc::new(compiled);
        self.current.insert(key, compiled.clone());
        Ok(Some(compiled))
    }

    /// Puts a freshly applied version in place.
    pub fn put(&self, tenant: &TenantId, resource: &ResourceName, schema: Arc<CompiledSchema>) {
        self.current
            .insert((tenant.clone(), resource.clone()), schema);
    }

    /// Forgets everything about a tenant (archived).
    pub fn forget_tenant(&self, tenant: &TenantId) {
        self.current.retain(|(t, _), _| t != tenant);
    }
}
