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

use super::CryptoError;
use crate::config::Settings;
use crate::services::ServiceClient;
use crate::services::http_client::CallError;

/// Most keys cached (tenant × key id); past it, expired and then the
/// soonest-expiring entries are dropped.
pub const MAX_CACHED: usize = 10_000;
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
    Local { master: [u8; 32] },
    Auth(Box<ServiceClient>),
}

/// Cache entries: key `(tenant, key id)`; `(tenant, "")` is the current key.
type Cache = HashMap<(String, String), (Arc<DataKey>, Instant)>;

pub struct Keyring {
    source: Source,
    cache: Mutex<Cache>,
    ttl: Duration,
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

impl Keyring {
    /// The Auth Service's keys when `AUTH_SERVICE_URL` is set, else the
    /// built-in keyring (master key resolved, generated if need be).
    pub fn from_settings(settings: &Settings) -> anyhow::Result<Self> {
        let source = match &settings.auth_service_url {
            Some(url) => Source::Auth(Box::new(ServiceClient::new("auth", url, settings)?)),
            None => Source::Local {
                master: super::master_key::resolve(settings)?,
            },
        };
        Ok(Self {
            source,
            cache: Mutex::default(),
            ttl: Duration::from_secs(settings.key_cache_secs),
        })
    }

    /// A built-in keyring on this master key (tests, tools).
    pub fn local(master: [u8; 32]) -> Self {
        Self {
            source: Source::Local { master },
            cache: Mutex::default(),
            ttl: Duration::ZERO,
        }
    }

    /// The key new values of this tenant are sealed with.
    pub async fn current(&self, tenant: &str) -> Result<Arc<DataKey>, CryptoError> {
        self.key(tenant, None).await
    }

    /// The key with this id (to open values sealed with it).
    pub async fn by_id(&self, tenant: &str, id: &str) -> Result<Arc<DataKey>, CryptoError> {
        self.key(tenant, Some(id)).await
    }

    async fn key(&self, tenant: &str, id: Option<&str>) -> Result<Arc<DataKey>, CryptoError> {
        let slot = (tenant.to_owned(), id.unwrap_or_default().to_owned());
        if let Some(key) = self.cached(&slot) {
            return Ok(key);
        }
        let client = match &self.source {
            Source::Local { master } => {
                let key = derive(master, tenant, id.unwrap_or(LOCAL_KEY_ID))?;
                self.remember(slot, key.clone(), Instant::now() + LOCAL_KEY_CACHE);
                return Ok(key);
            }
            Source::Auth(client) => client,
        };
        let (key, expires) = fetch(client, tenant, id).await?;
        if id.is_some_and(|id| id != key.id) {
            return Err(unavailable("the Auth Service answered another key id", 5));
        }
        let key = Arc::new(key);
        let until = Instant::now() + self.ttl.min(expires.unwrap_or(self.ttl));
        self.remember(slot, key.clone(), until);
        if id.is_none() {
            // The current key also opens the values sealed with it.
            self.remember((tenant.to_owned(), key.id.clone()), key.clone(), until);
        }
        Ok(key)
    }

    fn cached(&self, slot: &(String, String)) -> Option<Arc<DataKey>> {
        let cache = self.cache.lock().ok()?;
        let (key, until) = cache.get(slot)?;
        (Instant::now() < *until).then(|| key.clone())
    }

    fn remember(&self, slot: (String, String), key: Arc<DataKey>, until: Instant) {
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        if cache.len() >= MAX_CACHED && !cache.contains_key(&slot) {
            let now = Instant::now();
            cache.retain(|_, (_, until)| *until > now);
            while cache.len() >= MAX_CACHED {
                let soonest = cache
                    .iter()
                    .min_by_key(|(_, (_, u))| *u)
                    .map(|(k, _)| k.clone());
                match soonest {
                    Some(k) => cache.remove(&k),
                    None => break,
                };
            }
        }
        cache.insert(slot, (key, until));
    }
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
