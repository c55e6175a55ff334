//! A tenant out of the database into an archive, from one snapshot.

use std::io::Write;

use anyhow::{Context, bail};
use chrono::Utc;
use futures_util::TryStreamExt;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use super::{
    CHUNK_BYTES, Counts, FORMAT, FORMAT_VERSION, Header, Manifest, Member, PluginLine,
    PluginVersionLine, SchemaLine, TenantRow, WebhookLine, copy_unescape, module_member,
};
use crate::domain::ids::quote_ident;
use crate::domain::{ResourceName, TenantId};

/// Writes members into the compressed tar, noting each one for the manifest.
struct Writer<W: Write> {
    tar: tar::Builder<zstd::Encoder<'static, W>>,
    members: Vec<Member>,
    mtime: u64,
}

impl<W: Write> Writer<W> {
    fn new(out: W) -> anyhow::Result<Self> {
        let zstd = zstd::Encoder::new(out, 3).context("starting the zstd stream")?;
        Ok(Self {
            tar: tar::Builder::new(zstd),
            members: Vec::new(),
            mtime: Utc::now().timestamp().max(0) as u64,
        })
    }

    fn add(&mut self, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(self.mtime);
        self.tar
            .append_data(&mut header, name, bytes)
            .with_context(|| format!("writing {name}"))?;
        self.members.push(Member {
            name: name.to_owned(),
            bytes: bytes.len() as u64,
            sha256: hex(&Sha256::digest(bytes)),
        });
        Ok(())
    }

    fn add_json(&mut self, name: &str, value: &impl Serialize) -> anyhow::Result<()> {
        let mut bytes = serde_json::to_vec_pretty(value)?;
        bytes.push(b'\n');
        self.add(name, &bytes)
    }

    fn add_lines<T: Serialize>(&mut self, name: &str, items: &[T]) -> anyhow::Result<()> {
        let mut bytes = Vec::new();
        for item in items {
            serde_json::to_writer(&mut bytes, item)?;
            bytes.push(b'\n');
        }
        self.add(name, &bytes)
    }

    /// Writes the manifest and ends the archive; returns the output.
    fn finish(mut self, counts: Counts) -> anyhow::Result<(W, Manifest)> {
        let manifest = Manifest {
            members: std::mem::take(&mut self.members),
            counts,
        };
        self.add_json("manifest.json", &manifest)?;
        let zstd = self.tar.into_inner().context("ending the tar")?;
        let out = zstd.finish().context("ending the zstd stream")?;
        Ok((out, manifest))
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What goes into an export besides what always does.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Webhook endpoints' secrets (sealed as stored); without them an
    /// import disables each endpoint until its secret is rotated.
    pub webhook_secrets: bool,
    /// The tenant's event log (`events/*.ndjson`), as far as it is kept.
    pub events: bool,
}

/// Exports the tenant into `out`; `progress` is told of every record
/// written and gets the total first. Returns the output and the manifest.
pub async fn export<W: Write>(
    pool: &PgPool,
    tenant: &TenantId,
    out: W,
    options: Options,
    progress: &mut dyn FnMut(Progress),
) -> anyhow::Result<(W, Manifest)> {
    let mut tx = pool.begin().await?;
    // One snapshot for everything read below, while writes go on.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    // Timestamps as `COPY` writes them: ISO, in UTC.
    for set in ["SET LOCAL DateStyle = 'ISO'", "SET LOCAL TimeZone = 'UTC'"] {
        sqlx::query(set).execute(&mut *tx).await?;
    }
    let row: Option<(String,)> = sqlx::query_as("SELECT status FROM bss.tenants WHERE id = $1")
        .bind(tenant.as_str())
        .fetch_optional(&mut *tx)
        .await?;
    match row.as_ref().map(|(s,)| s.as_str()) {
        None => bail!("there is no tenant {tenant} here"),
        Some("active") => {}
        Some(status) => bail!("tenant {tenant} is {status}: only an active tenant is exported"),
    }
    let tenant_row: TenantRow = sqlx::query_as(
        "SELECT id, name, created_at, rate_limits, plugin_ceilings, key_version, key_id
           FROM bss.tenants WHERE id = $1",
    )
    .bind(tenant.as_str())
    .fetch_one(&mut *tx)
    .await?;
    let s = tenant.schema_ident();
    let schemas: Vec<SchemaLine> = sqlx::query_as(&format!(
        "SELECT resource, version, schema, created_at, created_by FROM {s}._schemas
          ORDER BY resource, version"
    ))
    .fetch_all(&mut *tx)
    .await?;
    let resources: Vec<(String,)> = sqlx::query_as(&format!(
        "SELECT resource FROM {s}._resources ORDER BY resource"
    ))
    .fetch_all(&mut *tx)
    .await?;
    let mut counts = Counts {
        resources: resources.len() as u64,
        schema_versions: schemas.len() as u64,
        ..Counts::default()
    };
    // Counted in the same snapshot, for the progress bar's total.
    let mut total = 0i64;
    for (resource,) in &resources {
        let table = format!("{s}.{}", quote_ident(resource));
        let (n,): (i64,) = sqlx::query_as(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&mut *tx)
            .await?;
        total += n;
    }
    progress(Progress::Total(total as u64));

    let mut w = Writer::new(out)?;
    w.add_json(
        "format.json",
        &Header {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            tenant: tenant.as_str().to_owned(),
            exported_at: Utc::now(),
            written_by: format!("business-store {}", env!("CARGO_PKG_VERSION")),
            records: total as u64,
        },
    )?;
    w.add_json("tenant.json", &tenant_row)?;
    w.add_lines("schemas.ndjson", &schemas)?;

    for (resource,) in &resources {
        let name = ResourceName::parse(resource)
            .map_err(|_| anyhow::anyhow!("stored resource name {resource:?} is not valid"))?;
        // The columns as stored (a JSON object built by the database would
        // cost it more than the export itself); each row becomes a line.
        let sql = format!(
            "COPY (SELECT id, version, created_at, updated_at, data, audit FROM {} ORDER BY id)
               TO STDOUT",
            name.table_in(tenant)
        );
        counts.records += copy_members(
            &mut tx,
            &mut w,
            &sql,
            |part| records_member(resource, part),
            record_line,
            &mut |n| progress(Progress::Records(n)),
        )
        .await
        .with_context(|| format!("exporting the records of {resource}"))?;
    }

    let plugins: Vec<PluginLine> = sqlx::query_as(
        "SELECT name, kind, active_version, trial_version, trial_mode, trial_percent, created_at,
                updated_at
           FROM bss.plugins WHERE tenant_id = $1 ORDER BY name",
    )
    .bind(tenant.as_str())
    .fetch_all(&mut *tx)
    .await?;
    let versions: Vec<PluginVersionLine> = sqlx::query_as(
        "SELECT name, version, manifest, sha256, size, created_at, created_by
           FROM bss.plugin_versions WHERE tenant_id = $1 ORDER BY name, version",
    )
    .bind(tenant.as_str())
    .fetch_all(&mut *tx)
    .await?;
    counts.plugins = plugins.len() as u64;
    counts.plugin_versions = versions.len() as u64;
    w.add_lines("plugins.ndjson", &plugins)?;
    w.add_lines("plugin_versions.ndjson", &versions)?;
    for v in &versions {
        // One module in memory at a time.
        let (module,): (Vec<u8>,) = sqlx::query_as(
            "SELECT module FROM bss.plugin_versions WHERE tenant_id = $1 AND name = $2 AND version = $3",
        )
        .bind(tenant.as_str())
        .bind(&v.name)
        .bind(v.version)
        .fetch_one(&mut *tx)
        .await?;
        w.add(&module_member(&v.name, v.version), &module)?;
    }
    let mut webhooks: Vec<WebhookLine> = sqlx::query_as(
        "SELECT id, url, events, resources, transformer, description, fifo, rate_limit_per_sec,
                enabled, disabled_reason, secrets, failing_since, created_at, updated_at
           FROM bss.webhooks WHERE tenant_id = $1 ORDER BY id",
    )
    .bind(tenant.as_str())
    .fetch_all(&mut *tx)
    .await?;
    if !options.webhook_secrets {
        for hook in &mut webhooks {
            hook.secrets = None;
        }
    }
    counts.webhooks = webhooks.len() as u64;
    w.add_lines("webhooks.ndjson", &webhooks)?;
    if options.events {
        // The log in its order; events not yet sequenced after, in theirs.
        let sql = format!(
            "COPY (SELECT event_id, resource, type, kafka_key, created_at, envelope
                     FROM bss.outbox WHERE tenant_id = {} ORDER BY seq NULLS LAST, id)
               TO STDOUT",
            quote_literal(tenant.as_str())
        );
        counts.events = copy_members(
            &mut tx,
            &mut w,
            &sql,
            events_member,
            event_line,
            &mut |_| {},
        )
        .await
        .context("exporting the event log")?;
    }
    tx.commit().await?;
    w.finish(counts)
}

/// Turns a row of `COPY`'s text format into a line of JSON at the end of
/// the first buffer (the second is scratch).
type LineMaker = fn(&[u8], &mut Vec<u8>, &mut Vec<u8>) -> anyhow::Result<()>;

/// Streams `sql` (a `COPY … TO STDOUT`) into members named by `member`
/// (numbered from 1), each row turned into a line by `line`, each member at
/// most about [`CHUNK_BYTES`]; `done` is told the lines of each member.
/// At least one member is written. Returns the lines written.
async fn copy_members<W: Write>(
    tx: &mut sqlx::PgConnection,
    w: &mut Writer<W>,
    sql: &str,
    member: impl Fn(u32) -> String,
    line: LineMaker,
    done: &mut dyn FnMut(u64),
) -> anyhow::Result<u64> {
    let mut stream = tx.copy_out_raw(sql).await?;
    let mut chunk = Vec::with_capacity(CHUNK_BYTES + 64 * 1024);
    let mut field = Vec::new();
    let (mut total, mut lines, mut part, mut pending) = (0u64, 0u64, 0u32, Vec::new());
    while let Some(bytes) = stream.try_next().await? {
        pending.extend_from_slice(&bytes);
        // Whole lines only; the rest waits for the next piece.
        let Some(end) = pending.iter().rposition(|b| *b == b'\n') else {
            continue;
        };
        for row in pending[..end].split(|b| *b == b'\n') {
            line(row, &mut chunk, &mut field)?;
            lines += 1;
        }
        pending.drain(..=end);
        if chunk.len() >= CHUNK_BYTES {
            part += 1;
            w.add(&member(part), &chunk)?;
            done(lines);
            (total, lines) = (total + lines, 0);
            chunk.clear();
        }
    }
    drop(stream);
    if !pending.is_empty() {
        bail!("the copy ended inside a line");
    }
    if lines > 0 || part == 0 {
        part += 1;
        w.add(&member(part), &chunk)?;
        total += lines;
        done(lines);
    }
    Ok(total)
}

/// A row of `COPY`'s text format (event_id, resource, type, kafka_key,
/// created_at, envelope) of the outbox as a line of JSON: `{"eventId",
/// "resource", "type", "kafkaKey", "createdAt", "envelope"}`.
fn event_line(row: &[u8], out: &mut Vec<u8>, field: &mut Vec<u8>) -> anyhow::Result<()> {
    let [id, resource, kind, key, created, envelope] = columns(
        row,
        [
            "event_id",
            "resource",
            "type",
            "kafka_key",
            "created_at",
            "envelope",
        ],
    )?;
    out.push(b'{');
    for (name, value) in [
        ("eventId", id),
        ("resource", resource),
        ("type", kind),
        ("kafkaKey", key),
    ] {
        field.clear();
        copy_unescape(value, field);
        out.extend_from_slice(format!("\"{name}\":").as_bytes());
        serde_json::to_writer(&mut *out, std::str::from_utf8(field)?)?;
        out.push(b',');
    }
    timestamp("createdAt", created, out)?;
    out.extend_from_slice(b",\"envelope\":");
    copy_unescape(envelope, out);
    out.extend_from_slice(b"}\n");
    Ok(())
}

/// The fields of a row of `COPY`'s text format, named for the error when
/// one is missing.
fn columns<'r, const N: usize>(row: &'r [u8], names: [&str; N]) -> anyhow::Result<[&'r [u8]; N]> {
    let mut cols = row.split(|b| *b == b'\t');
    let mut out = [&[][..]; N];
    for (field, name) in out.iter_mut().zip(names) {
        *field = cols
            .next()
            .ok_or_else(|| anyhow::anyhow!("a row of the export has no {name}"))?;
    }
    Ok(out)
}

/// `"key":"<RFC 3339>"` from a timestamp as `COPY` writes it in UTC:
/// `2026-12-07 22:04:17.123456+00` → `2026-12-07T22:04:17.123456+00:00`.
fn timestamp(key: &str, at: &[u8], out: &mut Vec<u8>) -> anyhow::Result<()> {
    out.extend_from_slice(format!("\"{key}\":\"").as_bytes());
    let at = std::str::from_utf8(at)?;
    out.extend_from_slice(at.replacen(' ', "T", 1).as_bytes());
    out.extend_from_slice(b":00\"");
    Ok(())
}

/// A SQL string literal (for `COPY`, which takes no parameters).
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A row of `COPY`'s text format (id, version, created_at, updated_at,
/// data, audit) as a line of JSON: `{"id", "version", "createdAt",
/// "updatedAt", "data", "audit"}`, timestamps in RFC 3339.
fn record_line(row: &[u8], out: &mut Vec<u8>, field: &mut Vec<u8>) -> anyhow::Result<()> {
    let [id, version, created, updated, data, audit] = columns(
        row,
        ["id", "version", "created_at", "updated_at", "data", "audit"],
    )?;
    field.clear();
    copy_unescape(id, field);
    out.extend_from_slice(b"{\"id\":");
    serde_json::to_writer(&mut *out, std::str::from_utf8(field)?)?;
    out.extend_from_slice(b",\"version\":");
    out.extend_from_slice(version);
    for (key, at) in [("createdAt", created), ("updatedAt", updated)] {
        out.push(b',');
        timestamp(key, at, out)?;
    }
    out.extend_from_slice(b",\"data\":");
    copy_unescape(data, out);
    out.extend_from_slice(b",\"audit\":");
    if audit == b"\\N" {
        out.extend_from_slice(b"null");
    } else {
        copy_unescape(audit, out);
    }
    out.extend_from_slice(b"}\n");
    Ok(())
}

/// What an export or import tells its progress bar.
#[derive(Debug, Clone, Copy)]
pub enum Progress {
    /// How many records there are in all.
    Total(u64),
    /// This many more records are done.
    Records(u64),
}

pub fn records_member(resource: &str, part: u32) -> String {
    format!("records/{resource}/{part:06}.ndjson")
}

pub fn events_member(part: u32) -> String {
    format!("events/{part:06}.ndjson")
}
