//! Field encryption: `x-encrypted` values are stored AES-256-GCM sealed
//! under a per-tenant data-encryption key, so PostgreSQL (and whoever reads
//! it: backups, the analytics role) never holds them in clear.
//!
//! `keyring` says where keys come from (the Auth Service, or a built-in
//! keyring derived from a master key), `fields` seals and opens the values
//! inside a document. Each sealed value names its key id, so keys can be
//! rotated while old values stay readable.

pub mod fields;
pub mod keyring;
mod master_key;

pub use fields::Scope;
pub use keyring::{DataKey, Keyring};

use crate::error::ApiError;

/// Why a value could not be sealed or opened. The texts are safe to show a
/// tenant: they never contain key material or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// No key could be had now (Auth Service down, refused, malformed).
    #[error("the data-encryption key is unavailable: {reason}")]
    KeyUnavailable {
        reason: String,
        retry_after_secs: u64,
    },
    /// A stored value does not open with its key and place: it was copied
    /// from another record or field, or altered.
    #[error(
        "the stored value at {pointer} cannot be decrypted: it was not written for this record \
         and field, or it was altered"
    )]
    Undecryptable { pointer: String },
}

impl From<CryptoError> for ApiError {
    fn from(e: CryptoError) -> Self {
        match e {
            CryptoError::KeyUnavailable {
                retry_after_secs, ..
            } => ApiError::Unavailable {
                detail: format!("{e}; nothing was stored or revealed, try again later"),
                retry_after_secs: retry_after_secs.max(1),
            },
            CryptoError::Undecryptable { .. } => ApiError::conflict(e.to_string()),
        }
    }
}

/// The stored form of a validated document: its `x-encrypted` fields
/// (`paths`) sealed with the tenant's current key. Borrowed as is when the
/// schema encrypts nothing; fails closed when no key can be had.
pub async fn seal_document<'a>(
    ring: &Keyring,
    paths: &[Vec<String>],
    scope: &Scope<'_>,
    doc: &'a serde_json::Value,
) -> Result<std::borrow::Cow<'a, serde_json::Value>, CryptoError> {
    if paths.is_empty() {
        return Ok(std::borrow::Cow::Borrowed(doc));
    }
    let key = ring.current(scope.tenant).await?;
    let mut sealed = doc.clone();
    fields::seal(&mut sealed, paths, &key, scope)?;
    Ok(std::borrow::Cow::Owned(sealed))
}

/// Opens, in place, every sealed value of a stored document, fetching the
/// keys it names (by id: old keys still open old values).
pub async fn open_document(
    ring: &Keyring,
    scope: &Scope<'_>,
    doc: &mut serde_json::Value,
) -> Result<(), CryptoError> {
    let ids = fields::key_ids(doc);
    if ids.is_empty() {
        return Ok(());
    }
    let mut keys = std::collections::HashMap::new();
    for id in ids {
        let key = ring.by_id(scope.tenant, &id).await?;
        keys.insert(id, key);
    }
    fields::open(doc, &keys, scope)
}
