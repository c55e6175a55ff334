//! Sealing and opening `x-encrypted` values inside a record document. A
//! sealed value is replaced by
//! `{"$enc": 1, "kid": "<key id>", "n": "<base64 nonce>", "c": "<base64 ciphertext>"}`:
//! AES-256-GCM of the value's JSON text under a random 96-bit nonce, with
//! associated data binding tenant, resource, record id and the value's JSON
//! Pointer, so a ciphertext copied to another record or field does not open.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rand::RngCore;
use serde_json::{Value, json};

use super::{CryptoError, DataKey};

/// Whose value it is: what the associated data binds besides the pointer.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    pub tenant: &'a str,
    pub resource: &'a str,
    pub record: &'a str,
}

impl Scope<'_> {
    fn aad(&self, pointer: &str) -> Vec<u8> {
        let parts = [
            "bss-field-v1",
            self.tenant,
            self.resource,
            self.record,
            pointer,
        ];
        parts.join("\0").into_bytes()
    }
}

fn cipher(key: &DataKey) -> Aes256Gcm {
    Aes256Gcm::new(&key.bytes.into())
}

/// Seals, in place, the value at each path (object keys from the root)
/// that the document holds.
pub fn seal(
    doc: &mut Value,
    paths: &[Vec<String>],
    key: &DataKey,
    scope: &Scope<'_>,
) -> Result<(), CryptoError> {
    if paths.is_empty() {
        return Ok(());
    }
    let cipher = cipher(key);
    for path in paths {
        let Some(slot) = path.iter().try_fold(&mut *doc, |v, k| v.get_mut(k)) else {
            continue;
        };
        let pointer = pointer_of(path.iter().map(String::as_str));
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        let plain = slot.to_string();
        let aad = scope.aad(&pointer);
        let payload = Payload {
            msg: plain.as_bytes(),
            aad: &aad,
        };
        let sealed = cipher.encrypt(&Nonce::from(nonce), payload).map_err(|_| {
            CryptoError::KeyUnavailable {
                reason: "the value could not be sealed".into(),
                retry_after_secs: 60,
            }
        })?;
        *slot = json!({"$enc": 1, "kid": key.id, "n": STANDARD.encode(nonce), "c": STANDARD.encode(sealed)});
    }
    Ok(())
}

/// Puts back, in the stored form of a document just written, the clear
/// values of `plain` at `paths`: what opening it would give, without the
/// work (write responses).
pub fn restore(stored: &mut Value, plain: &Value, paths: &[Vec<String>]) {
    for path in paths {
        let clear = path.iter().try_fold(plain, |v, k| v.get(k));
        let slot = path.iter().try_fold(&mut *stored, |v, k| v.get_mut(k));
        if let (Some(clear), Some(slot)) = (clear, slot) {
            *slot = clear.clone();
        }
    }
}

/// Whether a value is a sealed one.
pub fn is_sealed(v: &Value) -> bool {
    let Value::Object(m) = v else { return false };
    m.len() == 4
        && m.get("$enc") == Some(&json!(1))
        && ["kid", "n", "c"]
            .iter()
            .all(|k| m.get(*k).is_some_and(Value::is_string))
}

/// The key ids of every sealed value in the document.
pub fn key_ids(doc: &Value) -> BTreeSet<String> {
    fn walk(v: &Value, out: &mut BTreeSet<String>) {
        match v {
            v if is_sealed(v) => {
                if let Some(kid) = v.get("kid").and_then(Value::as_str) {
                    out.insert(kid.to_owned());
                }
            }
            Value::Object(m) => m.values().for_each(|c| walk(c, out)),
            Value::Array(items) => items.iter().for_each(|c| walk(c, out)),
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    walk(doc, &mut out);
    out
}

/// Whether a stored document is as its schema and the tenant's current key
/// want it: the value at each of `paths` (where present) sealed with key
/// `current`, and nothing sealed anywhere else. The re-encryption job moves
/// the documents that are not.
pub fn settled(doc: &Value, paths: &[Vec<String>], current: &str) -> bool {
    fn sealed_count(v: &Value) -> usize {
        match v {
            v if is_sealed(v) => 1,
            Value::Object(m) => m.values().map(sealed_count).sum(),
            Value::Array(items) => items.iter().map(sealed_count).sum(),
            _ => 0,
        }
    }
    let mut at_paths = 0;
    for path in paths {
        let Some(v) = path.iter().try_fold(doc, |v, k| v.get(k)) else {
            continue;
        };
        if !is_sealed(v) || v.get("kid").and_then(Value::as_str) != Some(current) {
            return false;
        }
        at_paths += 1;
    }
    sealed_count(doc) == at_paths
}

/// Opens, in place, every sealed value of the document with `keys` (by id).
pub fn open(
    doc: &mut Value,
    keys: &HashMap<String, Arc<DataKey>>,
    scope: &Scope<'_>,
) -> Result<(), CryptoError> {
    let mut pointer = String::new();
    open_at(doc, keys, scope, &mut pointer)
}

fn open_at(
    v: &mut Value,
    keys: &HashMap<String, Arc<DataKey>>,
    scope: &Scope<'_>,
    pointer: &mut String,
) -> Result<(), CryptoError> {
    if is_sealed(v) {
        *v = open_one(v, keys, scope, pointer)?;
        return Ok(());
    }
    let len = pointer.len();
    match v {
        Value::Object(m) => {
            for (k, child) in m.iter_mut() {
                push_segment(pointer, k);
                open_at(child, keys, scope, pointer)?;
                pointer.truncate(len);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter_mut().enumerate() {
                push_segment(pointer, &i.to_string());
                open_at(child, keys, scope, pointer)?;
                pointer.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

fn open_one(
    sealed: &Value,
    keys: &HashMap<String, Arc<DataKey>>,
    scope: &Scope<'_>,
    pointer: &str,
) -> Result<Value, CryptoError> {
    let undecryptable = || CryptoError::Undecryptable {
        pointer: if pointer.is_empty() {
            "/".into()
        } else {
            pointer.to_owned()
        },
    };
    let text = |k: &str| sealed.get(k).and_then(Value::as_str).unwrap_or_default();
    let key = keys.get(text("kid")).ok_or_else(undecryptable)?;
    let nonce = STANDARD.decode(text("n")).map_err(|_| undecryptable())?;
    let data = STANDARD.decode(text("c")).map_err(|_| undecryptable())?;
    let nonce = <[u8; 12]>::try_from(nonce.as_slice()).map_err(|_| undecryptable())?;
    let aad = scope.aad(pointer);
    let payload = Payload {
        msg: &data,
        aad: &aad,
    };
    let plain = cipher(key)
        .decrypt(&Nonce::from(nonce), payload)
        .map_err(|_| undecryptable())?;
    serde_json::from_slice(&plain).map_err(|_| undecryptable())
}

/// Whether the value at `pointer`, or one above it, is sealed (an error
/// about it concerns the sealed form, not the value).
pub fn sealed_at(doc: &Value, pointer: &str) -> bool {
    let mut at = String::new();
    if is_sealed(doc) {
        return true;
    }
    pointer.split('/').skip(1).any(|segment| {
        at.push('/');
        at.push_str(segment);
        doc.pointer(&at).is_some_and(is_sealed)
    })
}

/// An RFC 6901 JSON Pointer of object keys.
pub fn pointer_of<'a>(keys: impl Iterator<Item = &'a str>) -> String {
    let mut out = String::new();
    keys.for_each(|k| push_segment(&mut out, k));
    out
}

fn push_segment(pointer: &mut String, key: &str) {
    pointer.push('/');
    pointer.push_str(&key.replace('~', "~0").replace('/', "~1"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Keyring;

    fn scope(record: &str) -> Scope<'_> {
        Scope {
            tenant: "acme",
            resource: "people",
            record,
        }
    }

    #[tokio::test]
    async fn sealed_values_open_only_in_their_place() {
        let ring = Keyring::local([7; 32]);
        let Ok(key) = ring.current("acme").await else {
            panic!("no key")
        };
        let paths = vec![vec!["ssn".to_owned()], vec!["card".into(), "pan".into()]];
        let plain = json!({"ssn": "123", "card": {"pan": [4, 1], "brand": "v"}, "n": 1});
        let mut doc = plain.clone();
        assert!(seal(&mut doc, &paths, &key, &scope("r1")).is_ok());
        assert!(is_sealed(&doc["ssn"]) && is_sealed(&doc["card"]["pan"]));
        assert!(!doc.to_string().contains("123"));
        let keys = HashMap::from([(key.id.clone(), key.clone())]);
        let mut opened = doc.clone();
        assert!(open(&mut opened, &keys, &scope("r1")).is_ok());
        assert_eq!(opened, plain);
        let mut elsewhere = doc.clone();
        assert!(open(&mut elsewhere, &keys, &scope("r2")).is_err());
        let mut moved = doc.clone();
        moved["card"]["brand"] = doc["ssn"].clone();
        assert!(open(&mut moved, &keys, &scope("r1")).is_err());
        assert!(sealed_at(&doc, "/card/pan/0") && !sealed_at(&doc, "/card/brand"));
        assert!(settled(&doc, &paths, &key.id));
        assert!(!settled(&doc, &paths, "local-2"), "sealed with an old key");
        assert!(
            !settled(&doc, &paths[..1], &key.id),
            "sealed where nothing is encrypted"
        );
        assert!(
            !settled(&plain, &paths, &key.id),
            "clear where a value is encrypted"
        );
        assert!(
            settled(&json!({"n": 1}), &paths, &key.id),
            "absent values need nothing"
        );
    }
}
