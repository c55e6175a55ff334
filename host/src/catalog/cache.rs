//! The per-process cache of compiled schemas, keyed by tenant and resource.
//!
//! It may be stale when another replica applies a schema; writes are safe
//! anyway because every write checks, in its own statement, that the stored
//! current version is the one it validated against, and reloads on mismatch.
//!
//! It is bounded, so no number of tenants or resources grows it without
//! end: at most [`MAX_ENTRIES`] schemas and [`MAX_SOURCE_BYTES`] of their
//! source. Past either, a sweep gives each schema used since the last sweep
//! a second chance and drops the others (and, if that is not enough, any,
//! down to nine tenths of the bound); a dropped schema is compiled again
//! from the database on its next use.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use dashmap::DashMap;
use sqlx::PgPool;

use super::CompiledSchema;
use crate::domain::{ResourceName, TenantId};
use crate::storage::{StorageError, schemas};

/// Most schemas kept: two resources for each of 10,000 tenants, and more.
pub const MAX_ENTRIES: usize = 50_000;
/// Most schema source kept (the compiled validators are a few times that).
pub const MAX_SOURCE_BYTES: usize = 64 << 20;

type Key = (TenantId, ResourceName);

#[derive(Debug)]
struct Entry {
    schema: Arc<CompiledSchema>,
    bytes: usize,
    used: AtomicBool,
}

#[derive(Debug)]
pub struct SchemaCache {
    current: DashMap<Key, Entry>,
    bytes: AtomicUsize,
    max_entries: usize,
    max_bytes: usize,
}

impl Default for SchemaCache {
    fn default() -> Self {
        Self::bounded(MAX_ENTRIES, MAX_SOURCE_BYTES)
    }
}

impl SchemaCache {
    pub fn bounded(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            current: DashMap::new(),
            bytes: AtomicUsize::new(0),
            max_entries: max_entries.max(1),
            max_bytes,
        }
    }

    /// The current schema of a resource, or `None` if it has none.
    pub async fn current(
        &self,
        pool: &PgPool,
        tenant: &TenantId,
        resource: &ResourceName,
    ) -> Result<Option<Arc<CompiledSchema>>, StorageError> {
        if let Some(hit) = self.current.get(&(tenant.clone(), resource.clone())) {
            if !hit.used.load(Ordering::Relaxed) {
                hit.used.store(true, Ordering::Relaxed);
            }
            return Ok(Some(hit.schema.clone()));
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
        let Some(stored) = schemas::current(pool, tenant, resource).await? else {
            self.remove(&(tenant.clone(), resource.clone()));
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
        self.put(tenant, resource, compiled.clone());
        Ok(Some(compiled))
    }

    /// Puts a freshly applied version in place.
    pub fn put(&self, tenant: &TenantId, resource: &ResourceName, schema: Arc<CompiledSchema>) {
        let bytes = source_bytes(&schema);
        let (count, held) = (self.current.len(), self.bytes.load(Ordering::Relaxed));
        if over(count + 1, held + bytes, self.max_entries, self.max_bytes) {
            self.sweep();
        }
        // A new schema is kept past the next sweep only if it is used
        // again before it: one-off uses (a scan over every tenant) go first.
        let entry = Entry {
            schema,
            bytes,
            used: AtomicBool::new(false),
        };
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Some(old) = self
            .current
            .insert((tenant.clone(), resource.clone()), entry)
        {
            self.bytes.fetch_sub(old.bytes, Ordering::Relaxed);
        }
    }

    /// Forgets everything about a tenant (archived).
    pub fn forget_tenant(&self, tenant: &TenantId) {
        self.current.retain(|(t, _), e| {
            let keep = t != tenant;
            if !keep {
                self.bytes.fetch_sub(e.bytes, Ordering::Relaxed);
            }
            keep
        });
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.current.len()
    }

    fn remove(&self, key: &Key) {
        if let Some((_, old)) = self.current.remove(key) {
            self.bytes.fetch_sub(old.bytes, Ordering::Relaxed);
        }
    }

    /// Drops the schemas not used since the last sweep, then, while still
    /// above nine tenths of the bound, any. (The map's own length cannot be
    /// read while `retain` holds a shard: the sweep counts for itself.)
    fn sweep(&self) {
        let max_entries = self.max_entries - self.max_entries / 10;
        let max_bytes = self.max_bytes - self.max_bytes / 10;
        let mut count = self.current.len();
        self.current.retain(|_, e| {
            if e.used.swap(false, Ordering::Relaxed) {
                return true;
            }
            self.bytes.fetch_sub(e.bytes, Ordering::Relaxed);
            count = count.saturating_sub(1);
            false
        });
        self.current.retain(|_, e| {
            if !over(
                count,
                self.bytes.load(Ordering::Relaxed),
                max_entries,
                max_bytes,
            ) {
                return true;
            }
            self.bytes.fetch_sub(e.bytes, Ordering::Relaxed);
            count = count.saturating_sub(1);
            false
        });
    }
}

fn over(count: usize, bytes: usize, max_entries: usize, max_bytes: usize) -> bool {
    count > max_entries || bytes > max_bytes
}

/// What a schema weighs: the length of its source.
fn source_bytes(schema: &CompiledSchema) -> usize {
    serde_json::to_vec(&schema.schema).map_or(0, |v| v.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema(padding: usize) -> Arc<CompiledSchema> {
        let s = json!({"type": "object", "description": "x".repeat(padding)});
        Arc::new(CompiledSchema::compile(s, 1, chrono::Utc::now(), "t".into()).unwrap())
    }

    fn key(n: usize) -> (TenantId, ResourceName) {
        (
            TenantId::parse(&format!("t{n}")).unwrap(),
            ResourceName::parse("invoices").unwrap(),
        )
    }

    #[test]
    fn the_cache_stays_within_its_count_and_keeps_what_is_used() {
        let cache = SchemaCache::bounded(100, usize::MAX);
        let (t0, r0) = key(0);
        cache.put(&t0, &r0, schema(0));
        for n in 1..1000 {
            // Tenant 0's schema is used all along.
            cache
                .current
                .get(&key(0))
                .unwrap()
                .used
                .store(true, Ordering::Relaxed);
            let (t, r) = key(n);
            cache.put(&t, &r, schema(0));
            assert!(cache.len() <= 100);
        }
        assert!(cache.current.contains_key(&key(0)), "used all along");
        assert!(cache.current.contains_key(&key(999)), "the one just put");
    }

    #[test]
    fn the_cache_stays_within_its_bytes() {
        let cache = SchemaCache::bounded(usize::MAX, 100_000);
        for n in 0..100 {
            let (t, r) = key(n);
            cache.put(&t, &r, schema(10_000));
            assert!(cache.bytes.load(Ordering::Relaxed) <= 100_000);
        }
        let (t, r) = key(7);
        cache.forget_tenant(&t);
        let left: usize = cache.current.iter().map(|e| e.bytes).sum();
        assert_eq!(cache.bytes.load(Ordering::Relaxed), left);
        let _ = r;
    }
}
