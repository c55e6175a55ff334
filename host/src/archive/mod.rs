//! One tenant's whole state as one file, and back: `bss tenant export` and
//! `bss tenant import` (operator tools talking to the database directly).
//!
//! The archive is a tar, compressed with zstd, of these members in this
//! order (format [`FORMAT`] version [`FORMAT_VERSION`]):
//! - `format.json` — [`Header`]: format, version, tenant, when, by what;
//! - `tenant.json` — [`TenantRow`]: name, settings, key version;
//! - `schemas.ndjson` — every schema version, by resource and version;
//! - `records/<resource>/<nnnnnn>.ndjson` — every record (id, version,
//!   timestamps, stored document, audit), in id order, in members of at
//!   most [`CHUNK_BYTES`]; `x-encrypted` values stay sealed (key id inside);
//! - `plugins.ndjson`, `plugin_versions.ndjson` and
//!   `plugins/<name>/<version>.wasm` — every plugin version with its module;
//! - `webhooks.ndjson` — the webhook endpoints, their secrets sealed as
//!   stored (or left out: `--without-webhook-secrets`);
//! - `events/<nnnnnn>.ndjson` — with `--with-events` only: the tenant's
//!   event log as far as it is kept, in log order ([`EventLine`]);
//! - `manifest.json` — [`Manifest`]: every member before it with its size,
//!   line count and SHA-256, and the counts.
//!
//! The export reads one snapshot (`REPEATABLE READ`, read only) while
//! writes go on, streaming (records leave PostgreSQL by `COPY`), so memory
//! stays flat. The import is one transaction: all or nothing.

pub mod cli;
pub mod export;
pub mod import;
pub mod jobs;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The archive format's name, in `format.json`.
pub const FORMAT: &str = "business-store-tenant";
/// The format version this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Most bytes of records in one member (a member is held in memory while
/// written or read).
pub const CHUNK_BYTES: usize = 8 << 20;
/// Most bytes of any member an import accepts.
pub const MAX_MEMBER_BYTES: u64 = 64 << 20;

/// `format.json`, the archive's first member.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Header {
    pub format: String,
    pub format_version: u32,
    pub tenant: String,
    pub exported_at: DateTime<Utc>,
    /// The product version that wrote it.
    pub written_by: String,
    /// How many records it holds (for an import's progress).
    pub records: u64,
}

/// `tenant.json`: the tenant and its settings.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct TenantRow {
    pub id: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub rate_limits: Value,
    pub plugin_ceilings: Value,
    /// The built-in keyring's current key number (`local-<n>`).
    pub key_version: i32,
    /// The Auth Service's current key id, when one is used.
    pub key_id: Option<String>,
}

/// A line of `schemas.ndjson`.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct SchemaLine {
    pub resource: String,
    pub version: i32,
    pub schema: Value,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
}

/// A line of `records/<resource>/*.ndjson` (the document borrowed as
/// written: an import of trusted records never parses it).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordLine<'a> {
    pub id: String,
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
    #[serde(borrow)]
    pub data: &'a serde_json::value::RawValue,
    #[serde(borrow)]
    pub audit: Option<&'a serde_json::value::RawValue>,
}

/// A line of `events/*.ndjson`: an event of the log, its envelope as
/// published (borrowed: an import under the same id never parses it).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventLine<'a> {
    pub event_id: uuid::Uuid,
    pub resource: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub kafka_key: String,
    pub created_at: String,
    #[serde(borrow)]
    pub envelope: &'a serde_json::value::RawValue,
}

/// A line of `plugins.ndjson`.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct PluginLine {
    pub name: String,
    pub kind: String,
    pub active_version: Option<i32>,
    pub trial_version: Option<i32>,
    pub trial_mode: Option<String>,
    pub trial_percent: Option<i16>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A line of `plugin_versions.ndjson` (its module is the member
/// `plugins/<name>/<version>.wasm`).
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct PluginVersionLine {
    pub name: String,
    pub version: i32,
    pub manifest: Value,
    pub sha256: String,
    pub size: i32,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
}

/// A line of `webhooks.ndjson`: an endpoint, its secrets sealed as stored
/// (null when left out of the archive).
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct WebhookLine {
    pub id: uuid::Uuid,
    pub url: String,
    pub events: Vec<String>,
    pub resources: Option<Vec<String>>,
    pub transformer: Option<String>,
    pub description: String,
    pub fifo: bool,
    pub rate_limit_per_sec: Option<i32>,
    pub enabled: bool,
    pub disabled_reason: Option<String>,
    pub secrets: Option<Value>,
    pub failing_since: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One member as written: its name, size and SHA-256 (hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// What the archive holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Counts {
    pub resources: u64,
    pub schema_versions: u64,
    pub records: u64,
    pub plugins: u64,
    pub plugin_versions: u64,
    pub webhooks: u64,
    /// Events of the log (only in archives made with `--with-events`).
    #[serde(skip_serializing_if = "is_zero")]
    pub events: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// `manifest.json`, the archive's last member.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub members: Vec<Member>,
    pub counts: Counts,
}

/// The member holding a module.
pub fn module_member(name: &str, version: i32) -> String {
    format!("plugins/{name}/{version}.wasm")
}

/// PostgreSQL's COPY text format: a field's escapes undone (`\\`, `\n`,
/// `\r`, `\t`, `\b`, `\f`, `\v`).
pub fn copy_unescape(field: &[u8], out: &mut Vec<u8>) {
    let mut bytes = field.iter();
    while let Some(&b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next() {
            Some(b'n') => out.push(b'\n'),
            Some(b'r') => out.push(b'\r'),
            Some(b't') => out.push(b'\t'),
            Some(b'b') => out.push(8),
            Some(b'f') => out.push(12),
            Some(b'v') => out.push(11),
            Some(&other) => out.push(other),
            None => out.push(b'\\'),
        }
    }
}

/// A field for PostgreSQL's COPY text format.
pub fn copy_escape(field: &str, out: &mut Vec<u8>) {
    for &b in field.as_bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => out.push(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_escapes_round_trip() {
        let text = "a\\b\tc\nd\re \"q\" \\u0000";
        let mut escaped = Vec::new();
        copy_escape(text, &mut escaped);
        assert!(!escaped.contains(&b'\t') && !escaped.contains(&b'\n'));
        let mut back = Vec::new();
        copy_unescape(&escaped, &mut back);
        assert_eq!(String::from_utf8(back).unwrap_or_default(), text);
    }
}
