//! Where a tenant's data-encryption keys come from. With an Auth Service,
//! `GET /api/auth/tenants/{tenantId}/keys/data-encryption-key` answers
//! `{"keyId": "...", "key": "<base64 of 32 bytes>", "expiresAt": "<RFC 3339>"?}`
//! (the current key; `?keyId=<id>` asks for an older one still needed to
//! read old values); answers are cached per tenant and key id for
//! `key_cache_secs` (or until `expiresAt`, if sooner) and at most
//! [`MAX_CACHED`] keys are kept. Without one, a built-in keyring derives
//! each tenant's key from the master key (HKDF-SHA256), key id `local-1`.
//! Keys are never logged: [`DataKey`]'s `Debug` shows only its id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use hkdf::Hkdf;
use serde_json::Value;
use sha2::Sha256;

use sqlx::PgPool;

use super::CryptoError;
use crate::config::Settings;
use crate::services::ServiceClient;
use crate::services::http_client::CallError;
use crate::storage::StorageError;
use crate::storage::tasks::{self, NewTask, Queued};

/// Most keys cached (tenant × key id): the current and a few older keys of
/// each of 10,000 tenants (an entry is about 150 bytes). Past it, the
/// expired entries go, then the soonest-expiring tenth at once, so a full
/// cache does not scan itself on every insert.
pub const MAX_CACHED: usize = 50_000;
/// The built-in keyring's key id.
pub const LOCAL_KEY_ID: &str = "local-1";
/// How long a derived key of the built-in keyring is kept (deriving is
/// cheap, but not free on every write).
const LOCAL_KEY_CACHE: Duration = Duration::from_secs(3600);
/// A cached key is refreshed this long before the Auth Service says it expires.
const EXPIRY_MARGIN: Duration = Duration::from_secs(30);

/// One tenant's key, by id.
pub struct DataKey {
    pub id: String,
    pub(super) bytes: [u8; 32],
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

enum Source {
    /// `versions`: where each tenant's current key number is kept
    /// (`bss.tenants.key_version`); without it, always `local-1`.
    Local {
        master: [u8; 32],
        versions: Option<PgPool>,
    },
    Auth(Box<ServiceClient>),
}

/// A cached key: until when it may be used, and from when the current key
/// is asked for again (by one caller; the others keep using this one).
#[derive(Clone)]
struct Cached {
    key: Arc<DataKey>,
    until: Instant,
    refresh_at: Instant,
}

/// Cache entries: key `(tenant, key id)`; `(tenant, "")` is the current key.
type Cache = HashMap<(String, String), Cached>;

/// Held while a key is fetched.
type Gate = Arc<tokio::sync::Mutex<()>>;

/// A tenant whose current key changed, and the new key id.
pub type Rotation = (String, String);

pub struct Keyring {
    source: Source,
    cache: Mutex<Cache>,
    /// Slots being fetched: one fetch per slot at a time.
    fetching: Mutex<HashMap<(String, String), Gate>>,
    ttl: Duration,
    rotations: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<Rotation>>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.source {
            Source::Local { .. } => "local",
            Source::Auth(_) => "auth-service",
        };
        f.debug_struct("Keyring")
            .field("source", &kind)
            .finish_non_exhaustive()
    }
}

/// What a rotation did.
#[derive(Debug, Clone)]
pub struct Rotated {
    /// The key new values are sealed with from now on.
    pub key_id: String,
    /// The re-encryption job that moves the stored values to it.
    pub task: Queued,
}

impl Keyring {
    /// The Auth Service's client, when keys come from it.
    pub fn service(&self) -> Option<&ServiceClient> {
        match &self.source {
            Source::Auth(client) => Some(client),
            _ => None,
        }
    }

    /// The Auth Service's keys when `AUTH_SERVICE_URL` is set, else the
    /// built-in keyring (master key resolved, generated if need be), whose
    /// key versions are kept in `pool`.
    pub fn from_settings(settings: &Settings, pool: Option<PgPool>) -> anyhow::Result<Self> {
        let source = match &settings.auth_service_url {
            Some(url) => Source::Auth(Box::new(ServiceClient::new("auth", url, settings)?)),
            None => Source::Local {
                master: super::master_key::resolve(settings)?,
                versions: pool,
            },
        };
        Ok(Self::with_source(
            source,
            Duration::from_secs(settings.key_cache_secs),
        ))
    }

    /// A built-in keyring on this master key, always `local-1` (tests, tools).
    pub fn local(master: [u8; 32]) -> Self {
        Self::with_source(
            Source::Local {
                master,
                versions: None,
            },
            Duration::ZERO,
        )
    }

    fn with_source(source: Source, ttl: Duration) -> Self {
        Self {
            source,
            cache: Mutex::default(),
            fetching: Mutex::default(),
            ttl,
            rotations: std::sync::OnceLock::new(),
        }
    }

    /// Where to report the current key ids this replica is given (the first
    /// of each tenant, and each change): the task worker queues the
    /// tenant's re-encryption when one differs from the recorded one.
    pub fn report_rotations(&self, to: tokio::sync::mpsc::UnboundedSender<Rotation>) {
        let _ = self.rotations.set(to);
    }

    /// The key new values of this tenant are sealed with.
    pub async fn current(&self, tenant: &str) -> Result<Arc<DataKey>, CryptoError> {
        self.key(tenant, None).await
    }

    /// The key with this id (to open values sealed with it).
    pub async fn by_id(&self, tenant: &str, id: &str) -> Result<Arc<DataKey>, CryptoError> {
        self.key(tenant, Some(id)).await
    }

    /// Rotates a tenant's key: the built-in keyring moves to its next key
    /// (`local-<n+1>`); with the Auth Service, its current key is asked for
    /// again at once (rotate it there first). Either way the tenant's
    /// re-encryption job is queued (once per key id) in `tx`'s transaction.
    pub async fn rotate(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        tenant: &str,
        max_pending: i64,
    ) -> Result<Option<Rotated>, RotateError> {
        let key_id = match &self.source {
            Source::Local {
                versions: Some(_), ..
            } => {
                let version: Option<i32> = sqlx::query_scalar(
                    "UPDATE bss.tenants SET key_version = key_version + 1
                      WHERE id = $1 AND status = 'active' RETURNING key_version",
                )
                .bind(tenant)
                .fetch_optional(&mut **tx)
                .await?;
                let Some(version) = version else {
                    return Ok(None);
                };
                format!("local-{version}")
            }
            Source::Local { versions: None, .. } => LOCAL_KEY_ID.to_owned(),
            Source::Auth(_) => {
                self.forget_current(tenant);
                self.current(tenant).await?.id.clone()
            }
        };
        let task = queue_reseal(&mut **tx, tenant, &key_id, "key-rotation", max_pending).await?;
        announce_rotation(&mut **tx, tenant).await?;
        Ok(Some(Rotated { key_id, task }))
    }

    /// Drops every cached current key (the rotations announced while this
    /// replica was not listening are unknown).
    pub fn forget_all_current(&self) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.retain(|(_, id), _| !id.is_empty());
        }
    }

    /// Drops the cached current key of a tenant (after its transaction
    /// committed a rotation): the next write asks again.
    pub fn forget_current(&self, tenant: &str) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.remove(&(tenant.to_owned(), String::new()));
        }
    }

    async fn key(&self, tenant: &str, id: Option<&str>) -> Result<Arc<DataKey>, CryptoError> {
        let slot = (tenant.to_owned(), id.unwrap_or_default().to_owned());
        let now = Instant::now();
        let hit = self.cached(&slot).filter(|c| now < c.until);
        if let Some(c) = &hit
            && now < c.refresh_at
        {
            return Ok(c.key.clone());
        }
        // One fetch per slot at a time; a caller finding the fetch taken
        // keeps a still-valid key, or waits for the fetch and takes its key.
        let gate = self.gate(&slot);
        let _turn = match (gate.try_lock(), &hit) {
            (Ok(turn), _) => turn,
            (Err(_), Some(c)) => return Ok(c.key.clone()),
            (Err(_), None) => gate.lock().await,
        };
        if let Some(c) = self.cached(&slot).filter(|c| Instant::now() < c.refresh_at) {
            return Ok(c.key.clone());
        }
        let fetched = {
            // Released even when the caller is dropped mid-fetch.
            let _release = Release(self, &slot);
            self.fetch_key(tenant, id).await
        };
        match (fetched, hit) {
            (Ok((key, valid)), _) => {
                self.keep(tenant, id, key.clone(), valid);
                Ok(key)
            }
            // Refreshing ahead failed: the cached key is still good.
            (Err(_), Some(c)) => Ok(c.key),
            (Err(e), None) => Err(e),
        }
    }

    /// Asks the source for a key; returns it and how long it may be cached.
    async fn fetch_key(
        &self,
        tenant: &str,
        id: Option<&str>,
    ) -> Result<(Arc<DataKey>, Duration), CryptoError> {
        match &self.source {
            Source::Local { master, versions } => {
                let asked_current = id.is_none();
                let id = match (id, versions) {
                    (Some(id), _) => id.to_owned(),
                    (None, Some(pool)) => format!("local-{}", local_version(pool, tenant).await?),
                    (None, None) => LOCAL_KEY_ID.to_owned(),
                };
                // Old keys never change; the current one may be rotated on
                // another replica, so it is asked for again after the TTL.
                let valid = if versions.is_some() && asked_current {
                    self.ttl
                } else {
                    LOCAL_KEY_CACHE
                };
                Ok((derive(master, tenant, &id)?, valid.min(LOCAL_KEY_CACHE)))
            }
            Source::Auth(client) => {
                let (key, expires) = fetch(client, tenant, id).await?;
                if id.is_some_and(|id| id != key.id) {
                    return Err(unavailable("the Auth Service answered another key id", 5));
                }
                Ok((Arc::new(key), self.ttl.min(expires.unwrap_or(self.ttl))))
            }
        }
    }

    /// Caches a fetched key; a current key also opens the values sealed
    /// with it. A current key with a new id is reported as a rotation.
    fn keep(&self, tenant: &str, id: Option<&str>, key: Arc<DataKey>, valid: Duration) {
        let now = Instant::now();
        let entry = Cached {
            key: key.clone(),
            until: now + valid,
            // Asked for again in the last fifth of its life.
            refresh_at: now + valid.mul_f64(0.8),
        };
        let current = (tenant.to_owned(), String::new());
        let previous = self.cached(&current).map(|c| c.key.id.clone());
        self.remember(
            (tenant.to_owned(), id.unwrap_or_default().to_owned()),
            entry.clone(),
        );
        if id.is_some() {
            return;
        }
        self.remember((tenant.to_owned(), key.id.clone()), entry);
        // The first current key this replica sees for a tenant, and every
        // change, go to the task worker, which compares it with the one the
        // database last recorded (so a rotation while every replica was down
        // is noticed too).
        if previous.as_deref() != Some(key.id.as_str())
            && let Some(report) = self.rotations.get()
        {
            let _ = report.send((tenant.to_owned(), key.id.clone()));
        }
    }

    fn gate(&self, slot: &(String, String)) -> Gate {
        let mut fetching = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
        fetching.entry(slot.clone()).or_default().clone()
    }

    fn release_gate(&self, slot: &(String, String)) {
        let mut fetching = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
        // Only the fetcher and this map hold it: nobody waits any more.
        if fetching
            .get(slot)
            .is_some_and(|g| Arc::strong_count(g) <= 2)
        {
            fetching.remove(slot);
        }
    }

    fn cached(&self, slot: &(String, String)) -> Option<Cached> {
        let cache = self.cache.lock().ok()?;
        cache.get(slot).cloned()
    }

    fn remember(&self, slot: (String, String), entry: Cached) {
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        if !cache.contains_key(&slot) {
            make_room(&mut cache, MAX_CACHED);
        }
        cache.insert(slot, entry);
    }
}

/// Leaves room for one more entry under `max`: drops the expired entries,
/// then, if that is not enough, the soonest-expiring tenth.
fn make_room(cache: &mut Cache, max: usize) {
    if cache.len() < max {
        return;
    }
    let now = Instant::now();
    cache.retain(|_, c| c.until > now);
    if cache.len() < max {
        return;
    }
    let mut untils: Vec<Instant> = cache.values().map(|c| c.until).collect();
    let tenth = untils.len() / 10;
    let (_, cut, _) = untils.select_nth_unstable(tenth);
    let cut = *cut;
    cache.retain(|_, c| c.until > cut);
}

/// Forgets a slot's fetch gate when dropped.
struct Release<'a>(&'a Keyring, &'a (String, String));

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.release_gate(self.1);
    }
}

/// Why a rotation failed.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error(transparent)]
    Key(#[from] CryptoError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<RotateError> for crate::error::ApiError {
    fn from(e: RotateError) -> Self {
        match e {
            RotateError::Key(e) => e.into(),
            RotateError::Storage(e) => e.into(),
        }
    }
}

impl From<sqlx::Error> for RotateError {
    fn from(e: sqlx::Error) -> Self {
        Self::Storage(e.into())
    }
}

/// Queues a tenant's re-encryption job (once per `reason`), in the
/// transaction of `exec`: each stored value moves to the tenant's current
/// key, into or out of its sealed form as the current schemas say.
pub async fn queue_reseal<'e>(
    exec: impl sqlx::PgExecutor<'e>,
    tenant: &str,
    reason: &str,
    source: &str,
    max_pending: i64,
) -> Result<Queued, StorageError> {
    let key = format!("reseal:{reason}");
    let payload = serde_json::json!({ "reason": reason });
    let task = NewTask {
        id: None,
        tenant,
        kind: "reseal",
        name: "re-encrypt",
        key: &key,
        source,
        payload: &payload,
    };
    tasks::enqueue(exec, task, max_pending).await
}

/// Tells every replica, when `exec`'s transaction commits, to ask for the
/// tenant's current key again (`NOTIFY bss_keys`; see
/// `tasks::follow_rotations`).
pub async fn announce_rotation<'e>(
    exec: impl sqlx::PgExecutor<'e>,
    tenant: &str,
) -> Result<(), StorageError> {
    sqlx::query("SELECT pg_notify('bss_keys', $1)")
        .bind(tenant)
        .execute(exec)
        .await?;
    Ok(())
}

/// A tenant's current key number in the built-in keyring.
async fn local_version(pool: &PgPool, tenant: &str) -> Result<i32, CryptoError> {
    let version: Option<i32> =
        sqlx::query_scalar("SELECT key_version FROM bss.tenants WHERE id = $1")
            .bind(tenant)
            .fetch_optional(pool)
            .await
            .map_err(|_| unavailable("the tenant's key version could not be read", 2))?;
    Ok(version.unwrap_or(1))
}

/// HKDF-SHA256 of the master key, bound to tenant and key id.
fn derive(master: &[u8; 32], tenant: &str, id: &str) -> Result<Arc<DataKey>, CryptoError> {
    if !id.starts_with("local-") {
        return Err(unavailable(
            "the value was sealed with a key of the Auth Service, which is not configured",
            60,
        ));
    }
    let hk = Hkdf::<Sha256>::new(Some(b"bss data-encryption key v1"), master);
    let mut bytes = [0u8; 32];
    let info = format!("tenant={tenant}\0kid={id}");
    hk.expand(info.as_bytes(), &mut bytes)
        .map_err(|_| unavailable("the key could not be derived", 60))?;
    Ok(Arc::new(DataKey {
        id: id.to_owned(),
        bytes,
    }))
}

/// Asks the Auth Service for a key; returns it and how long it is valid.
async fn fetch(
    client: &ServiceClient,
    tenant: &str,
    id: Option<&str>,
) -> Result<(DataKey, Option<Duration>), CryptoError> {
    let mut path = format!("/api/auth/tenants/{tenant}/keys/data-encryption-key");
    if let Some(id) = id {
        let query = serde_urlencoded::to_string([("keyId", id)]).unwrap_or_default();
        path = format!("{path}?{query}");
    }
    let answer = client
        .call_for(&path, None, Some(tenant))
        .await
        .map_err(|e| match e {
            CallError::CircuitOpen { retry_after, .. } => {
                unavailable("the Auth Service is failing", retry_after.as_secs())
            }
            other => unavailable(&other.to_string(), 2),
        })?;
    parse_answer(&answer).ok_or_else(|| unavailable("the Auth Service answered no usable key", 5))
}

fn parse_answer(answer: &Value) -> Option<(DataKey, Option<Duration>)> {
    let id = answer
        .get("keyId")?
        .as_str()
        .filter(|s| !s.is_empty() && s.len() <= 200)?;
    let bytes = STANDARD.decode(answer.get("key")?.as_str()?).ok()?;
    let bytes = <[u8; 32]>::try_from(bytes.as_slice()).ok()?;
    let valid = match answer.get("expiresAt").and_then(Value::as_str) {
        None => None,
        Some(at) => {
            let at = DateTime::parse_from_rfc3339(at).ok()?.with_timezone(&Utc);
            let left = (at - Utc::now()).to_std().unwrap_or_default();
            Some(left.saturating_sub(EXPIRY_MARGIN))
        }
    };
    let key = DataKey {
        id: id.to_owned(),
        bytes,
    };
    Some((key, valid))
}

fn unavailable(reason: &str, retry_after_secs: u64) -> CryptoError {
    CryptoError::KeyUnavailable {
        reason: reason.to_owned(),
        retry_after_secs,
    }
}

#[cfg(test)]
mod cache_tests {
    use super::*;

    fn entry(until: Instant) -> Cached {
        Cached {
            key: Arc::new(DataKey {
                id: "k".into(),
                bytes: [0; 32],
            }),
            until,
            refresh_at: until,
        }
    }

    #[test]
    fn a_full_cache_drops_the_expired_then_the_soonest_expiring_tenth() {
        let now = Instant::now();
        let mut cache = Cache::new();
        for i in 0..100u64 {
            let until = now + Duration::from_secs(60 + i);
            cache.insert((format!("t{i}"), String::new()), entry(until));
        }
        make_room(&mut cache, 100);
        assert_eq!(cache.len(), 89, "the ten soonest and the cut itself");
        assert!(!cache.contains_key(&("t0".into(), String::new())));
        assert!(cache.contains_key(&("t99".into(), String::new())));
        // Expired entries go first, and are enough when they are many.
        cache.insert(("gone".into(), String::new()), entry(now));
        make_room(&mut cache, 90);
        assert_eq!(cache.len(), 89);
        assert!(!cache.contains_key(&("gone".into(), String::new())));
        make_room(&mut cache, 1_000);
        assert_eq!(cache.len(), 89, "room enough: nothing dropped");
    }
}
