//! An archive into the database as a tenant, in one transaction: all of it
//! or nothing.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;

use anyhow::{Context, anyhow, bail};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Postgres, Transaction};

use super::export::{Progress, hex};
use super::{
    Counts, EventLine, FORMAT, FORMAT_VERSION, Header, MAX_MEMBER_BYTES, Manifest, Member,
    PluginLine, PluginVersionLine, RecordLine, SchemaLine, TenantRow, WebhookLine, copy_escape,
};
use crate::catalog::CompiledSchema;
use crate::crypto::{self, Keyring, Scope, fields};
use crate::domain::{RecordId, ResourceName, TenantId};
use crate::events::envelope::{self, EventContext};
use crate::events::outbox;
use crate::storage::{schemas, tenants};

/// The event an import writes (one, whatever it holds).
pub const TENANT_IMPORTED: &str = "business_store.tenant.imported";

pub struct Options {
    /// Import under this id instead of the archive's.
    pub as_id: Option<TenantId>,
    /// Skip validating records against their schema (an archive this
    /// product wrote; its checksums are still verified).
    pub trust: bool,
}

/// What an import did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Imported {
    pub tenant: String,
    pub from: String,
    #[serde(flatten)]
    pub counts: Counts,
    /// Endpoints imported without their secret: disabled until rotated.
    pub webhooks_without_secret: u64,
}

/// What the import needs of the installation.
pub struct Target<'a> {
    pub pool: &'a PgPool,
    /// Compiles each module as an upload is (the component for its kind's
    /// world, imports the host provides), into the plugin cache.
    pub plugins: &'a crate::plugins::Runtime,
    pub keyring: &'a Keyring,
    pub analytics_role: &'a str,
    pub events: EventContext,
}

/// State while the members go by.
struct Run<'a> {
    target: &'a Target<'a>,
    options: &'a Options,
    tx: Transaction<'static, Postgres>,
    tenant: Option<TenantId>,
    /// Each resource's current (last) schema, compiled.
    current: BTreeMap<String, CompiledSchema>,
    /// Key ids whose values were opened once here (the keys exist).
    keys_checked: HashSet<String>,
    versions: BTreeMap<(String, i32), PluginVersionLine>,
    /// Plugins whose active and trial versions are set once all are in.
    pending_plugins: Vec<PluginLine>,
    done: Imported,
    read: Vec<Member>,
}

/// Imports the archive read from `input`. Refuses a newer format, a
/// corrupt or truncated archive, and a tenant id that is taken here,
/// leaving nothing behind.
pub async fn import<R: Read>(
    target: &Target<'_>,
    input: R,
    options: &Options,
    progress: &mut dyn FnMut(Progress),
) -> anyhow::Result<Imported> {
    let zstd = zstd::Decoder::new(input).context("the file is not a zstd stream")?;
    let mut archive = tar::Archive::new(zstd);
    let entries = archive
        .entries()
        .context("the file is not a tenant archive (tar)")?;
    let mut run = Run {
        target,
        options,
        tx: target.pool.begin().await?,
        tenant: None,
        current: BTreeMap::new(),
        keys_checked: HashSet::new(),
        versions: BTreeMap::new(),
        pending_plugins: Vec::new(),
        done: Imported {
            tenant: String::new(),
            from: String::new(),
            counts: Counts::default(),
            webhooks_without_secret: 0,
        },
        read: Vec::new(),
    };
    let mut manifest = None;
    for entry in entries {
        let mut entry = entry.map_err(truncated)?;
        let name = entry
            .path()
            .map_err(truncated)?
            .to_string_lossy()
            .into_owned();
        if manifest.is_some() {
            bail!("the archive is corrupt: {name} follows manifest.json, which must be last");
        }
        let size = entry.header().size().map_err(truncated)?;
        if size > MAX_MEMBER_BYTES {
            bail!("the archive is corrupt: {name} is {size} bytes, more than any member holds");
        }
        let mut bytes = Vec::with_capacity(size as usize);
        entry.read_to_end(&mut bytes).map_err(truncated)?;
        if bytes.len() as u64 != size {
            bail!("the archive is truncated inside {name}");
        }
        if name == "manifest.json" {
            manifest = Some(
                serde_json::from_slice::<Manifest>(&bytes)
                    .context("the archive is corrupt: manifest.json")?,
            );
            continue;
        }
        if run.read.is_empty() && name != "format.json" {
            bail!("not a tenant archive: it starts with {name}, not format.json");
        }
        let sha256 = hex(&Sha256::digest(&bytes));
        run.member(&name, &bytes, &sha256, progress)
            .await
            .with_context(|| format!("importing {name}"))?;
        run.read.push(Member {
            name,
            bytes: size,
            sha256,
        });
    }
    let Some(manifest) = manifest else {
        bail!("the archive is truncated: it ends before its manifest.json");
    };
    // To the end of the compressed stream: a cut in what follows the last
    // member (or in the stream's own checksum) is found too.
    std::io::copy(&mut archive.into_inner(), &mut std::io::sink()).map_err(truncated)?;
    run.check(&manifest)?;
    run.finish().await
}

/// `format.json`, if it is a tenant archive's that this build reads.
fn header(bytes: &[u8]) -> anyhow::Result<Header> {
    let header: Header =
        serde_json::from_slice(bytes).context("not a tenant archive: format.json is not one")?;
    if header.format != FORMAT {
        bail!("not a tenant archive: its format is {:?}", header.format);
    }
    if header.format_version > FORMAT_VERSION {
        bail!(
            "the archive is format version {}, newer than this build reads ({FORMAT_VERSION}); \
             import it with the version that wrote it ({}) or a newer one",
            header.format_version,
            header.written_by
        );
    }
    Ok(header)
}

/// The tenant an archive holds, from its first member (`format.json`);
/// what is not a tenant archive this build reads is refused.
pub fn tenant_of<R: Read>(input: R) -> anyhow::Result<TenantId> {
    let zstd = zstd::Decoder::new(input).context("the file is not a zstd stream")?;
    let mut archive = tar::Archive::new(zstd);
    let mut entries = archive
        .entries()
        .context("the file is not a tenant archive (tar)")?;
    let mut first = entries
        .next()
        .context("the archive is empty")?
        .map_err(truncated)?;
    if first.path().map_err(truncated)?.as_os_str() != "format.json" {
        bail!("not a tenant archive: it does not start with format.json");
    }
    let size = first.header().size().map_err(truncated)?;
    // A header is a few hundred bytes: nothing larger is read to find out.
    if size > 64 * 1024 {
        bail!("not a tenant archive: its format.json is {size} bytes");
    }
    let mut bytes = Vec::new();
    first.read_to_end(&mut bytes).map_err(truncated)?;
    let tenant = header(&bytes)?.tenant;
    TenantId::parse(&tenant)
        .map_err(|_| anyhow!("the archive's tenant {tenant:?} is not a tenant id"))
}

fn truncated(e: std::io::Error) -> anyhow::Error {
    anyhow!("the archive is truncated or corrupt: {e}")
}

impl Run<'_> {
    fn tenant(&self) -> anyhow::Result<&TenantId> {
        self.tenant
            .as_ref()
            .ok_or_else(|| anyhow!("the archive is corrupt: tenant.json is missing"))
    }

    /// One member, whose SHA-256 is `sha256`.
    async fn member(
        &mut self,
        name: &str,
        bytes: &[u8],
        sha256: &str,
        progress: &mut dyn FnMut(Progress),
    ) -> anyhow::Result<()> {
        match name {
            "format.json" => {
                progress(Progress::Total(header(bytes)?.records));
                Ok(())
            }
            "tenant.json" => self.tenant_row(serde_json::from_slice(bytes)?).await,
            "schemas.ndjson" => self.schemas(bytes).await,
            "plugins.ndjson" => self.plugins(bytes).await,
            "webhooks.ndjson" => self.webhooks(bytes).await,
            "plugin_versions.ndjson" => self.plugin_versions(bytes),
            _ if name.starts_with("records/") => {
                let resource = name
                    .split('/')
                    .nth(1)
                    .ok_or_else(|| anyhow!("the archive is corrupt: member {name}"))?;
                let n = self.records(resource, bytes).await?;
                progress(Progress::Records(n));
                Ok(())
            }
            _ if name.starts_with("events/") && name.ends_with(".ndjson") => {
                self.events(bytes).await
            }
            _ if name.starts_with("plugins/") && name.ends_with(".wasm") => {
                self.module(name, bytes, sha256).await
            }
            _ => bail!("the archive holds {name}, which this format version does not know"),
        }
    }

    async fn tenant_row(&mut self, row: TenantRow) -> anyhow::Result<()> {
        let id = match &self.options.as_id {
            Some(id) => id.clone(),
            None => TenantId::parse(&row.id)
                .map_err(|_| anyhow!("the archive's tenant id {:?} is not valid", row.id))?,
        };
        if let Some(why) = id.reserved() {
            bail!("{why}; import it under another id (--as)");
        }
        let fresh = self.options.as_id.is_some() && id.as_str() != row.id;
        let inserted = sqlx::query(
            "INSERT INTO bss.tenants (id, name, schema_name, created_at, rate_limits,
                                      plugin_ceilings, key_version, key_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
        )
        .bind(id.as_str())
        .bind(&row.name)
        .bind(id.schema_name())
        .bind(row.created_at)
        .bind(&row.rate_limits)
        .bind(&row.plugin_ceilings)
        // Under a new id, the values are sealed again with its first key.
        .bind(if fresh { 1 } else { row.key_version })
        .bind(if fresh { None } else { row.key_id.clone() })
        .execute(&mut *self.tx)
        .await?;
        if inserted.rows_affected() == 0 {
            bail!(
                "tenant {id} exists here (or existed: its id is kept while archived); \
                 import under another id with --as <id>"
            );
        }
        for statement in tenants::schema_ddl(&id, self.target.analytics_role) {
            sqlx::query(&statement).execute(&mut *self.tx).await?;
        }
        self.done.tenant = id.as_str().to_owned();
        self.done.from = row.id;
        self.tenant = Some(id);
        Ok(())
    }

    /// Every schema version in order; each resource's table is made with
    /// its first, its indexes once the records are in.
    async fn schemas(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let tenant = self.tenant()?.clone();
        let s = tenant.schema_ident();
        let mut all: Vec<SchemaLine> = lines(bytes)
            .map(serde_json::from_slice)
            .collect::<Result<_, _>>()?;
        all.sort_by(|a, b| (&a.resource, a.version).cmp(&(&b.resource, b.version)));
        for line in all {
            let resource = ResourceName::parse(&line.resource)
                .map_err(|_| anyhow!("resource name {:?} is not valid", line.resource))?;
            let expected = self
                .current
                .get(resource.as_str())
                .map_or(1, |c| c.version + 1);
            if line.version != expected {
                bail!(
                    "the archive is corrupt: {resource} has schema version {} where {expected} belongs",
                    line.version
                );
            }
            let compiled = CompiledSchema::compile(
                line.schema.clone(),
                line.version,
                line.created_at,
                line.created_by.clone(),
            )
            .map_err(|errors| {
                anyhow!(
                    "schema {resource} version {} is not valid here: {}",
                    line.version,
                    errors
                        .iter()
                        .map(|e| format!("{} {}", e.path, e.message))
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            })?;
            if line.version == 1 {
                schemas::create_resource_table(&mut self.tx, &tenant, &resource).await?;
                self.done.counts.resources += 1;
            } else {
                sqlx::query(&format!(
                    "UPDATE {s}._resources SET current_version = $2 WHERE resource = $1"
                ))
                .bind(resource.as_str())
                .bind(line.version)
                .execute(&mut *self.tx)
                .await?;
            }
            sqlx::query(&format!(
                "INSERT INTO {s}._schemas (resource, version, schema, created_at, created_by)
                 VALUES ($1, $2, $3, $4, $5)"
            ))
            .bind(resource.as_str())
            .bind(line.version)
            .bind(&line.schema)
            .bind(line.created_at)
            .bind(&line.created_by)
            .execute(&mut *self.tx)
            .await?;
            self.done.counts.schema_versions += 1;
            self.current.insert(resource.as_str().to_owned(), compiled);
        }
        Ok(())
    }

    /// One member of records, by COPY; each checked against its resource's
    /// schema unless trusted, and sealed again under a new id.
    async fn records(&mut self, resource: &str, bytes: &[u8]) -> anyhow::Result<u64> {
        let tenant = self.tenant()?.clone();
        let name = ResourceName::parse(resource)
            .map_err(|_| anyhow!("resource name {resource:?} is not valid"))?;
        let Run {
            tx,
            target,
            options,
            current,
            keys_checked,
            done,
            ..
        } = self;
        let Some(compiled) = current.get(resource) else {
            bail!("the archive is corrupt: records of {resource}, which has no schema");
        };
        let mut checker = Checker {
            ring: target.keyring,
            trust: options.trust,
            from: &done.from,
            to: &tenant,
            resource,
            compiled,
            keys_checked,
        };
        let mut copy = CopyIn::start(
            tx,
            &format!(
                "COPY {} (id, data, audit, version, created_at, updated_at) FROM STDIN",
                name.table_in(&tenant)
            ),
        )
        .await?;
        let sent: anyhow::Result<()> = async {
            for line in lines(bytes) {
                let record: RecordLine<'_> = serde_json::from_slice(line)
                    .with_context(|| format!("record {} of the member", copy.rows + 1))?;
                RecordId::parse(&record.id)
                    .map_err(|_| anyhow!("record id {:?} is not valid", record.id))?;
                let data = checker
                    .checked(&record)
                    .await
                    .with_context(|| format!("record {resource}/{}", record.id))?;
                let row = &mut copy.buf;
                copy_escape(&record.id, row);
                row.push(b'\t');
                copy_escape(data.as_deref().unwrap_or(record.data.get()), row);
                row.push(b'\t');
                match record.audit.map(|a| a.get()) {
                    Some(a) if a != "null" => copy_escape(a, row),
                    _ => row.extend_from_slice(b"\\N"),
                }
                row.extend_from_slice(format!("\t{}\t", record.version).as_bytes());
                copy_escape(&record.created_at, row);
                row.push(b'\t');
                copy_escape(&record.updated_at, row);
                copy.end_row().await?;
            }
            Ok(())
        }
        .await;
        let n = copy.finish(sent).await?;
        done.counts.records += n;
        Ok(n)
    }

    /// One member of the event log, by COPY: in the tenant's log for
    /// reading and replay, marked imported (never published to the broker
    /// again nor matched against webhook endpoints). Under a new tenant id
    /// each event gets a new id and says the new tenant.
    async fn events(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let tenant = self.tenant()?.clone();
        let renamed = self.done.from != tenant.as_str();
        let mut copy = CopyIn::start(
            &mut self.tx,
            "COPY bss.outbox (event_id, tenant_id, resource, type, kafka_key, created_at, envelope,
                              enriched, imported) FROM STDIN",
        )
        .await?;
        let sent: anyhow::Result<()> = async {
            for line in lines(bytes) {
                let event: EventLine<'_> = serde_json::from_slice(line)
                    .with_context(|| format!("event {} of the member", copy.rows + 1))?;
                let (id, envelope) = if renamed {
                    let mut envelope: Value = serde_json::from_str(event.envelope.get())?;
                    let id = envelope::new_event_id();
                    envelope["id"] = id.to_string().into();
                    envelope["tenantid"] = tenant.as_str().into();
                    (id, std::borrow::Cow::Owned(envelope.to_string()))
                } else {
                    (event.event_id, event.envelope.get().into())
                };
                let row = &mut copy.buf;
                row.extend_from_slice(format!("{id}\t").as_bytes());
                for field in [
                    tenant.as_str(),
                    &event.resource,
                    &event.kind,
                    &event.kafka_key,
                    &event.created_at,
                    &envelope,
                ] {
                    copy_escape(field, row);
                    row.push(b'\t');
                }
                row.extend_from_slice(b"t\tt");
                copy.end_row().await?;
            }
            Ok(())
        }
        .await;
        self.done.counts.events += copy.finish(sent).await?;
        Ok(())
    }

    async fn plugins(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let tenant = self.tenant()?.clone();
        for line in lines(bytes) {
            let p: PluginLine = serde_json::from_slice(line)?;
            if !crate::plugins::manifest::valid_name(&p.name) {
                bail!("plugin name {:?} is not valid", p.name);
            }
            // Versions come later: the active and trial ones are set then.
            sqlx::query(
                "INSERT INTO bss.plugins (tenant_id, name, kind, created_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(tenant.as_str())
            .bind(&p.name)
            .bind(&p.kind)
            .bind(p.created_at)
            .execute(&mut *self.tx)
            .await?;
            self.pending_plugins.push(p);
            self.done.counts.plugins += 1;
        }
        Ok(())
    }

    /// The versions whose modules follow (each checked as the service
    /// will load it: refused now, not at its first call).
    fn plugin_versions(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        for line in lines(bytes) {
            let v: PluginVersionLine = serde_json::from_slice(line)?;
            serde_json::from_value::<crate::plugins::manifest::Manifest>(v.manifest.clone())
                .with_context(|| {
                    format!(
                        "plugin {} version {}: its manifest is not valid",
                        v.name, v.version
                    )
                })?;
            self.versions.insert((v.name.clone(), v.version), v);
        }
        Ok(())
    }

    /// `plugins/<name>/<version>.wasm`, stored with its version's row.
    async fn module(&mut self, name: &str, bytes: &[u8], sha256: &str) -> anyhow::Result<()> {
        let tenant = self.tenant()?.clone();
        let corrupt = || anyhow!("the archive is corrupt: {name} belongs to no plugin version");
        let (plugin, version) = name
            .strip_prefix("plugins/")
            .and_then(|n| n.strip_suffix(".wasm"))
            .and_then(|n| n.rsplit_once('/'))
            .ok_or_else(corrupt)?;
        let version: i32 = version.parse().map_err(|_| corrupt())?;
        let v = self
            .versions
            .get(&(plugin.to_owned(), version))
            .ok_or_else(corrupt)?;
        if sha256 != v.sha256 {
            bail!("the archive is corrupt: {name} is not the module its version names");
        }
        // Compiled here, as an upload is: a module this build cannot run is
        // refused now, and the service's first call finds it in the cache.
        if self.target.plugins.cached(sha256).is_none() {
            let manifest: crate::plugins::manifest::Manifest =
                serde_json::from_value(v.manifest.clone())?;
            self.target
                .plugins
                .compile_upload(bytes, manifest.kind)
                .map_err(|e| anyhow!("plugin {plugin} version {version}: {e}"))?;
        }
        sqlx::query(
            "INSERT INTO bss.plugin_versions (tenant_id, name, version, manifest, sha256, size, module,
                                              created_at, created_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(tenant.as_str())
        .bind(&v.name)
        .bind(v.version)
        .bind(&v.manifest)
        .bind(&v.sha256)
        .bind(v.size)
        .bind(bytes)
        .bind(v.created_at)
        .bind(&v.created_by)
        .execute(&mut *self.tx)
        .await?;
        self.done.counts.plugin_versions += 1;
        Ok(())
    }

    /// The webhook endpoints: under a new tenant id, with new endpoint ids
    /// and their secrets sealed again for it; without their secrets, with
    /// a new one each and disabled until it is rotated.
    async fn webhooks(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let tenant = self.tenant()?.clone();
        let reseal = self.done.from != tenant.as_str();
        let ring = self.target.keyring;
        for line in lines(bytes) {
            let mut hook: WebhookLine = serde_json::from_slice(line)?;
            let was = hook.id;
            if reseal {
                hook.id = uuid::Uuid::now_v7();
            }
            let id = hook.id.to_string();
            let to = Scope {
                tenant: tenant.as_str(),
                resource: crate::storage::webhooks::RESOURCE,
                record: &id,
            };
            let secrets = match hook.secrets.take() {
                Some(sealed) => {
                    let mut secrets = sealed.clone();
                    let old = was.to_string();
                    let from = Scope {
                        tenant: &self.done.from,
                        resource: crate::storage::webhooks::RESOURCE,
                        record: &old,
                    };
                    crypto::open_document(ring, &from, &mut secrets).await.map_err(|e| {
                        anyhow!(
                            "webhook {was}: its secrets cannot be opened here ({e}): import into an \
                             installation with the same master key or Auth Service, or export \
                             --without-webhook-secrets"
                        )
                    })?;
                    if reseal {
                        let paths: Vec<Vec<String>> = ["current", "previous"]
                            .into_iter()
                            .filter(|k| secrets.get(k).is_some())
                            .map(|k| vec![k.to_owned()])
                            .collect();
                        crypto::seal_document(ring, &paths, &to, &secrets)
                            .await?
                            .into_owned()
                    } else {
                        // Opened only to prove the keys are here: kept as sealed.
                        sealed
                    }
                }
                None => {
                    hook.enabled = false;
                    hook.disabled_reason = Some(
                        "imported without its secret: rotate it (POST /v1/webhooks/{id}/secret/rotate), \
                         give the receiver the new one, then enable the endpoint"
                            .into(),
                    );
                    self.done.webhooks_without_secret += 1;
                    let secret = crate::webhooks::sign::new_secret();
                    let doc = serde_json::json!({ "current": secret });
                    let paths = [vec!["current".to_owned()]];
                    crypto::seal_document(ring, &paths, &to, &doc)
                        .await?
                        .into_owned()
                }
            };
            sqlx::query(
                "INSERT INTO bss.webhooks (id, tenant_id, url, events, resources, transformer,
                        description, fifo, rate_limit_per_sec, enabled, disabled_reason, secrets,
                        failing_since, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
            )
            .bind(hook.id)
            .bind(tenant.as_str())
            .bind(&hook.url)
            .bind(&hook.events)
            .bind(&hook.resources)
            .bind(&hook.transformer)
            .bind(&hook.description)
            .bind(hook.fifo)
            .bind(hook.rate_limit_per_sec)
            .bind(hook.enabled)
            .bind(&hook.disabled_reason)
            .bind(&secrets)
            .bind(hook.failing_since)
            .bind(hook.created_at)
            .bind(hook.updated_at)
            .execute(&mut *self.tx)
            .await
            .with_context(|| format!("webhook {was}"))?;
            self.done.counts.webhooks += 1;
        }
        Ok(())
    }

    /// Every member read is the one the manifest names, and all are there.
    fn check(&self, manifest: &Manifest) -> anyhow::Result<()> {
        for (i, want) in manifest.members.iter().enumerate() {
            let Some(got) = self.read.get(i) else {
                bail!("the archive is truncated: {} is missing", want.name);
            };
            if got.name != want.name {
                bail!(
                    "the archive is corrupt: {} where {} belongs",
                    got.name,
                    want.name
                );
            }
            if got.bytes != want.bytes || got.sha256 != want.sha256 {
                bail!(
                    "the archive is corrupt: {} does not match its checksum",
                    got.name
                );
            }
        }
        if let Some(extra) = self.read.get(manifest.members.len()) {
            bail!(
                "the archive is corrupt: {} is not in its manifest",
                extra.name
            );
        }
        if manifest.counts != self.done.counts {
            bail!("the archive is corrupt: its counts are not what it holds");
        }
        Ok(())
    }

    /// Indexes, plugins' active and trial versions, the one event; commit.
    async fn finish(mut self) -> anyhow::Result<Imported> {
        let tenant = self.tenant()?.clone();
        for (resource, compiled) in &self.current {
            let name = ResourceName::parse(resource)
                .map_err(|_| anyhow!("resource name {resource:?} is not valid"))?;
            // Built once, over all the records (a duplicate id fails here).
            schemas::create_resource_keys(&mut self.tx, &tenant, &name)
                .await
                .with_context(|| format!("{resource}: its record ids must be unique"))?;
            schemas::sync_indexes(&mut self.tx, &tenant, &name, compiled).await?;
        }
        for p in std::mem::take(&mut self.pending_plugins) {
            sqlx::query(
                "UPDATE bss.plugins SET active_version = $3, trial_version = $4, trial_mode = $5,
                        trial_percent = $6, updated_at = $7
                  WHERE tenant_id = $1 AND name = $2",
            )
            .bind(tenant.as_str())
            .bind(&p.name)
            .bind(p.active_version)
            .bind(p.trial_version)
            .bind(&p.trial_mode)
            .bind(p.trial_percent)
            .bind(p.updated_at)
            .execute(&mut *self.tx)
            .await
            .with_context(|| {
                format!("plugin {}: its active or trial version is missing", p.name)
            })?;
        }
        let event_id = envelope::new_event_id();
        let mut data = serde_json::to_value(&self.done.counts)?;
        data["tenantId"] = tenant.as_str().into();
        data["exportedAs"] = self.done.from.as_str().into();
        let event = envelope::complete(
            &self.target.events,
            &tenant,
            event_id,
            TENANT_IMPORTED,
            "tenant",
            data,
        );
        outbox::insert(
            &mut *self.tx,
            event_id,
            tenant.as_str(),
            "_tenant",
            TENANT_IMPORTED,
            tenant.as_str(),
            &event,
        )
        .await?;
        self.tx.commit().await?;
        Ok(self.done)
    }
}

/// Bytes of COPY data sent at a time.
const SEND_BYTES: usize = 256 * 1024;

/// Rows into a `COPY … FROM STDIN`, sent in pieces as they are made (the
/// database stores one while the next is made).
struct CopyIn<'c> {
    sink: sqlx::postgres::PgCopyIn<&'c mut sqlx::PgConnection>,
    /// The row being made goes at the end of this.
    buf: Vec<u8>,
    rows: u64,
}

impl<'c> CopyIn<'c> {
    async fn start(conn: &'c mut sqlx::PgConnection, sql: &str) -> anyhow::Result<Self> {
        Ok(Self {
            sink: conn.copy_in_raw(sql).await?,
            buf: Vec::with_capacity(SEND_BYTES + 64 * 1024),
            rows: 0,
        })
    }

    /// Ends the row made in `buf`.
    async fn end_row(&mut self) -> anyhow::Result<()> {
        self.buf.push(b'\n');
        self.rows += 1;
        if self.buf.len() >= SEND_BYTES {
            self.sink.send(self.buf.as_slice()).await?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Ends the copy when the rows were all made (`made`), else aborts it;
    /// returns how many rows were stored.
    async fn finish(mut self, made: anyhow::Result<()>) -> anyhow::Result<u64> {
        if let Err(e) = made {
            // The transaction is lost anyway; this leaves the connection usable.
            let _ = self.sink.abort("the import failed").await;
            return Err(e);
        }
        if !self.buf.is_empty() {
            self.sink.send(self.buf.as_slice()).await?;
        }
        let stored = self.sink.finish().await?;
        if stored != self.rows {
            bail!("{} rows sent, {stored} stored", self.rows);
        }
        Ok(stored)
    }
}

/// Checks records of one resource on their way in.
struct Checker<'a> {
    ring: &'a Keyring,
    trust: bool,
    /// The tenant the archive was exported as, and the one it becomes.
    from: &'a str,
    to: &'a TenantId,
    resource: &'a str,
    compiled: &'a CompiledSchema,
    /// Key ids whose values were opened once here (the keys exist).
    keys_checked: &'a mut HashSet<String>,
}

impl Checker<'_> {
    /// The document to store when it is not the archive's as is (sealed
    /// again for a new id); checks it against the schema unless trusted
    /// and that the keys its sealed values name open them here.
    async fn checked(&mut self, record: &RecordLine<'_>) -> anyhow::Result<Option<String>> {
        let text = record.data.get();
        let sealed = text.contains("\"$enc\"");
        if self.trust && !sealed {
            return Ok(None);
        }
        let mut doc: Value = serde_json::from_str(text)?;
        if !sealed {
            validate(self.compiled, &doc)?;
            return Ok(None);
        }
        let reseal = self.from != self.to.as_str();
        let ids = fields::key_ids(&doc);
        if !reseal && self.trust && ids.iter().all(|id| self.keys_checked.contains(id)) {
            return Ok(None);
        }
        let from = Scope {
            tenant: self.from,
            resource: self.resource,
            record: &record.id,
        };
        crypto::open_document(self.ring, &from, &mut doc).await.map_err(|e| {
            anyhow!(
                "its sealed values cannot be opened here ({e}): import into an installation \
                 with the same master key (BSS_MASTER_KEY) or Auth Service as the one that exported it"
            )
        })?;
        self.keys_checked.extend(ids);
        if !self.trust {
            validate(self.compiled, &doc)?;
        }
        if !reseal {
            return Ok(None);
        }
        let to = Scope {
            tenant: self.to.as_str(),
            resource: self.resource,
            record: &record.id,
        };
        let paths = self.compiled.encrypted_paths();
        let stored = crypto::seal_document(self.ring, paths, &to, &doc).await?;
        Ok(Some(stored.to_string()))
    }
}

/// A record against its resource's schema (values still sealed are not
/// judged: they were checked in clear when written).
fn validate(compiled: &CompiledSchema, doc: &Value) -> anyhow::Result<()> {
    let Err(errors) = compiled.validate(doc) else {
        return Ok(());
    };
    let errors: Vec<String> = errors
        .into_iter()
        .filter(|e| !fields::sealed_at(doc, &e.path))
        .map(|e| format!("{}: {}", e.path, e.message))
        .collect();
    if errors.is_empty() {
        return Ok(());
    }
    bail!(
        "it does not match its schema: {}; fix the archive's record or import with --trust",
        errors.join("; ")
    )
}

fn lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
}
