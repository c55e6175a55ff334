//! Records of one resource, in the resource's table inside the tenant schema.
//!
//! Every write checks, in the same statement or transaction, that the
//! resource's current schema version is the one the document was validated
//! against (`_resources` row locked `FOR KEY SHARE`; schema changes lock it
//! `FOR UPDATE`), so no record is ever stored against a superseded schema.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgPool, Postgres, Transaction};
use utoipa::ToSchema;

use sqlx::postgres::PgArguments;
use sqlx::query::QueryAs;
use sqlx::types::Json;

use super::{StorageError, pg_code};
use crate::domain::{RecordId, ResourceName, TenantId};
use crate::events::envelope::new_event_id;
use crate::events::outbox::{RecordEvents, record_events_cte};

/// A stored record as the API serves it.
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub id: String,
    #[sqlx(skip)]
    pub resource: String,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub data: Value,
    /// With `?include=audit`: what the version keeps of the write that
    /// made it (null for versions written before audits were kept).
    #[sqlx(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Audit>)]
    pub audit: Option<Value>,
}

/// What a record version keeps of the write that made it (stored as JSON
/// with the version; described here for the API document).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub struct Audit {
    /// create, replace, patch or batch.
    operation: String,
    /// Who wrote it: `user:<token subject>`.
    actor: String,
    /// The request's id (`X-Request-Id`, the events' `correlationid`).
    request_id: String,
    /// The validation hook versions that passed it, in the order they ran
    /// (a canary's version when the canary answered); empty when none ran.
    hooks: Vec<AuditHook>,
}

/// A validation hook version that passed a write.
#[derive(Debug, Serialize, ToSchema)]
#[allow(dead_code)]
pub struct AuditHook {
    plugin: String,
    version: i32,
}

/// A stored record with its document as the database sent it (JSON text):
/// passed through to the response without being parsed into a tree and
/// written out again (reads of records without sealed values).
#[derive(Debug, sqlx::FromRow)]
pub struct RawRecord {
    pub id: String,
    #[sqlx(skip)]
    pub resource: String,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub data: String,
    /// The version's audit as JSON text, when asked for (`null` when the
    /// version has none).
    #[sqlx(default)]
    pub audit: Option<String>,
}

impl RawRecord {
    /// Whether the document holds sealed (`x-encrypted`) values, which a
    /// reader gets only opened: then it is read as a [`Record`].
    pub fn sealed(&self) -> bool {
        self.data.contains("\"$enc\"")
    }

    pub fn parsed(self) -> Result<Record, serde_json::Error> {
        Ok(Record {
            data: serde_json::from_str(&self.data)?,
            audit: self
                .audit
                .as_deref()
                .map(serde_json::from_str)
                .transpose()?,
            id: self.id,
            resource: self.resource,
            version: self.version,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }

    /// The record as [`Record`] serializes, its document copied in as is.
    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Head<'a> {
            id: &'a str,
            resource: &'a str,
            version: i64,
            created_at: &'a DateTime<Utc>,
            updated_at: &'a DateTime<Utc>,
        }
        let audit = self.audit.as_deref().map_or(0, |a| a.len() + 10);
        let mut out = Vec::with_capacity(160 + self.data.len() + audit);
        serde_json::to_writer(
            &mut out,
            &Head {
                id: &self.id,
                resource: &self.resource,
                version: self.version,
                created_at: &self.created_at,
                updated_at: &self.updated_at,
            },
        )?;
        out.pop(); // the closing brace
        out.extend_from_slice(b",\"data\":");
        out.extend_from_slice(self.data.as_bytes());
        if let Some(audit) = &self.audit {
            out.extend_from_slice(b",\"audit\":");
            out.extend_from_slice(audit.as_bytes());
        }
        out.push(b'}');
        Ok(out)
    }
}

const RETURNING: &str = "RETURNING id, version, created_at, updated_at, data";

/// A write's audit as bound: SQL NULL when the caller kept none.
fn audit(v: &Value) -> Option<Json<&Value>> {
    (!v.is_null()).then_some(Json(v))
}

/// Where a resource's records are: tenant, resource and the schema version
/// the caller validated against.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub tenant: &'a TenantId,
    pub resource: &'a ResourceName,
    pub schema_version: i32,
}

/// Binds the parameters of [`record_events_cte`]: one event per record id,
/// all from the same envelope template.
fn bind_events<'q, O>(
    q: QueryAs<'q, Postgres, O, PgArguments>,
    t: Target<'q>,
    events: &'q RecordEvents,
    ids: Vec<String>,
) -> QueryAs<'q, Postgres, O, PgArguments> {
    let templates = vec![Json(&events.template); ids.len()];
    bind_row_events(q, t, events.full, &events.hidden, ids, templates)
}

/// Binds the parameters of [`record_events_cte`], each event with its own
/// envelope template (the writes of several requests in one statement).
fn bind_row_events<'q, O>(
    q: QueryAs<'q, Postgres, O, PgArguments>,
    t: Target<'q>,
    full: bool,
    hidden: &'q [Vec<String>],
    ids: Vec<String>,
    templates: Vec<Json<&'q Value>>,
) -> QueryAs<'q, Postgres, O, PgArguments> {
    let event_ids: Vec<uuid::Uuid> = ids.iter().map(|_| new_event_id()).collect();
    q.bind(t.tenant.as_str())
        .bind(t.resource.as_str())
        .bind(templates)
        .bind(full)
        .bind(Json(hidden))
        .bind(ids)
        .bind(event_ids)
}

/// Whether a write waits for a schema change holding the resource row
/// (`No`: it fails at once with [`StorageError::Locked`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    Yes,
    No,
}

impl Target<'_> {
    fn table(&self) -> String {
        self.resource.table_in(self.tenant)
    }

    /// A CTE that locks the resource row and yields its current version.
    fn version_cte(&self) -> String {
        self.version_cte_with(Wait::Yes)
    }

    fn version_cte_with(&self, wait: Wait) -> String {
        format!(
            "WITH cur AS (SELECT current_version FROM {}._resources WHERE resource = {} FOR KEY SHARE{})",
            self.tenant.schema_ident(),
            super::schemas::quote_literal(self.resource.as_str()),
            match wait {
                Wait::Yes => "",
                Wait::No => " NOWAIT",
            }
        )
    }

    fn with_resource(&self, mut r: Record) -> Record {
        r.resource = self.resource.as_str().to_owned();
        r
    }

    /// After a write matched nothing: was it the schema version?
    async fn schema_moved(&self, pool: &PgPool) -> Result<bool, StorageError> {
        let v: Option<(i32,)> = sqlx::query_as(&format!(
            "SELECT current_version FROM {}._resources WHERE resource = $1",
            self.tenant.schema_ident()
        ))
        .bind(self.resource.as_str())
        .fetch_optional(pool)
        .await
        .map_err(StorageError::from_tenant_query)?;
        Ok(v.map(|(v,)| v) != Some(self.schema_version))
    }
}

fn map_err(e: sqlx::Error) -> StorageError {
    match pg_code(&e).as_deref() {
        Some("42P01") => StorageError::NotFound("resource not found".into()),
        Some("55P03") => StorageError::Locked,
        // PostgreSQL's jsonb holds no U+0000 in strings.
        Some("22P05") => StorageError::BadRequest(
            "a string in the document holds \\u0000, which cannot be stored".into(),
        ),
        _ => StorageError::from_tenant_query(e),
    }
}

/// The outcome of a create with an idempotency key.
#[derive(Debug)]
pub enum Created {
    New(Record),
    /// The same key was used before: its first result.
    Replayed {
        status: u16,
        response: Value,
    },
}

/// An idempotency key and the hash of the request it came with.
#[derive(Debug, Clone, Copy)]
pub struct Idempotency<'a> {
    pub key: &'a str,
    pub request_hash: &'a str,
}

/// Inserts a new record; 409 if the id exists.
pub async fn create(
    pool: &PgPool,
    t: Target<'_>,
    events: &RecordEvents,
    id: &RecordId,
    data: &Value,
    idempotency: Option<Idempotency<'_>>,
) -> Result<Created, StorageError> {
    let Some(key) = idempotency else {
        let row = insert(pool, t, events, id, data).await?;
        return Ok(Created::New(row));
    };
    let mut tx = pool.begin().await.map_err(map_err)?;
    if let Some(replay) = claim_key(&mut tx, t.tenant, key).await? {
        return Ok(replay);
    }
    let row = insert(&mut *tx, t, events, id, data).await?;
    sqlx::query(&format!(
        "UPDATE {}._idempotency SET status = 201, response = $2 WHERE key = $1",
        t.tenant.schema_ident()
    ))
    .bind(key.key)
    .bind(serde_json::to_value(&row).unwrap_or(Value::Null))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Created::New(row))
}

async fn insert<'e, E>(
    exec: E,
    t: Target<'_>,
    events: &RecordEvents,
    id: &RecordId,
    data: &Value,
) -> Result<Record, StorageError>
where
    E: sqlx::PgExecutor<'e>,
{
    let rows = [(id, data, &events.template, &events.audit)];
    let row = insert_rows(exec, t, events.full, &events.hidden, &rows, Wait::Yes).await?;
    row.into_iter().next().ok_or(StorageError::SchemaChanged)
}

/// Inserts records of one resource in one statement, each with its change
/// event (from its own envelope template) and its audit: `(id, stored
/// document, template, audit)`. Returns the rows written, none when the schema version moved
/// on; an id that exists fails the statement (409).
pub async fn insert_rows<'e, E>(
    exec: E,
    t: Target<'_>,
    full: bool,
    hidden: &[Vec<String>],
    items: &[(&RecordId, &Value, &Value, &Value)],
    wait: Wait,
) -> Result<Vec<Record>, StorageError>
where
    E: sqlx::PgExecutor<'e>,
{
    let sql = format!(
        "{}, ins AS (INSERT INTO {} (id, data, audit)
            SELECT u.id, u.data, u.audit FROM cur, unnest($1::text[], $2::jsonb[], $4::jsonb[]) AS u(id, data, audit)
             WHERE cur.current_version = $3 {RETURNING}, 'created'::text AS kind), {}
         SELECT id, version, created_at, updated_at, data FROM ins",
        t.version_cte_with(wait),
        t.table(),
        record_events_cte(5, hidden.len())
    );
    let ids: Vec<String> = items
        .iter()
        .map(|(id, ..)| id.as_str().to_owned())
        .collect();
    let docs: Vec<Json<&Value>> = items.iter().map(|(_, d, ..)| Json(*d)).collect();
    let templates: Vec<Json<&Value>> = items.iter().map(|(_, _, tpl, _)| Json(*tpl)).collect();
    let audits: Vec<Option<Json<&Value>>> = items.iter().map(|(.., a)| audit(a)).collect();
    let q = sqlx::query_as(&sql)
        .bind(ids.clone())
        .bind(docs)
        .bind(t.schema_version)
        .bind(audits);
    let rows: Vec<Record> = match bind_row_events(q, t, full, hidden, ids, templates)
        .fetch_all(exec)
        .await
    {
        Err(e) if pg_code(&e).as_deref() == Some("23505") => {
            return Err(StorageError::Conflict(match items {
                [(id, ..)] => format!("a record with id {id} already exists"),
                _ => "a record id in the batch already exists".into(),
            }));
        }
        other => other.map_err(map_err)?,
    };
    Ok(rows.into_iter().map(|r| t.with_resource(r)).collect())
}

/// Whether a create with this idempotency key already finished within 24 h
/// (so a new create with it replays that result).
pub async fn replays(pool: &PgPool, tenant: &TenantId, key: &str) -> Result<bool, StorageError> {
    let s = tenant.schema_ident();
    let row: Option<(i32,)> = sqlx::query_as(&format!(
        "SELECT 1 FROM {s}._idempotency
          WHERE key = $1 AND status IS NOT NULL AND created_at >= now() - interval '24 hours'"
    ))
    .bind(key)
    .fetch_optional(pool)
    .await
    .map_err(StorageError::from_tenant_query)?;
    Ok(row.is_some())
}

/// Claims an idempotency key inside `tx`; returns the earlier outcome when
/// the key was already used (within 24 h) with the same request.
async fn claim_key(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &TenantId,
    key: Idempotency<'_>,
) -> Result<Option<Created>, StorageError> {
    let s = tenant.schema_ident();
    let claimed: Option<(String,)> = sqlx::query_as(&format!(
        "INSERT INTO {s}._idempotency AS k (key, request_hash) VALUES ($1, $2)
         ON CONFLICT (key) DO UPDATE
            SET request_hash = EXCLUDED.request_hash, status = NULL, response = NULL, created_at = now()
          WHERE k.created_at < now() - interval '24 hours'
         RETURNING key"
    ))
    .bind(key.key)
    .bind(key.request_hash)
    .fetch_optional(&mut **tx)
    .await
    .map_err(map_err)?;
    if claimed.is_some() {
        return Ok(None);
    }
    let (hash, status, response): (String, Option<i16>, Option<Value>) = sqlx::query_as(&format!(
        "SELECT request_hash, status, response FROM {s}._idempotency WHERE key = $1"
    ))
    .bind(key.key)
    .fetch_one(&mut **tx)
    .await?;
    if hash != key.request_hash {
        return Err(StorageError::Conflict(format!(
            "Idempotency-Key {:?} was already used with a different request",
            key.key
        )));
    }
    match (status, response) {
        (Some(status), Some(response)) => Ok(Some(Created::Replayed {
            status: status as u16,
            response,
        })),
        _ => Err(StorageError::Conflict(format!(
            "a request with Idempotency-Key {:?} is still in progress",
            key.key
        ))),
    }
}

/// What a write asks of the record's current state (`If-Match`,
/// `If-None-Match`), checked in the statement that writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// Nothing asked.
    None,
    /// Any current record (`If-Match: *`).
    Exists,
    /// The record at this version (`If-Match: "<version>"`).
    Version(i64),
    /// No current record (`If-None-Match: *`: create only).
    Absent,
    /// A condition that cannot hold (`If-Match` with weak tags only).
    Never,
}

impl Precondition {
    /// The version the statement compares with, if any.
    fn version(self) -> Option<i64> {
        match self {
            Self::Version(v) => Some(v),
            _ => None,
        }
    }

    /// Why the write was refused, for a record `id` the statement did not
    /// find in the asked state.
    pub fn failure(self, id: &RecordId) -> StorageError {
        StorageError::PreconditionFailed(match self {
            Self::Version(v) => format!("record {id} is not at version {v}"),
            Self::Exists => format!("record {id} does not exist (If-Match: *)"),
            Self::Absent => format!("record {id} already exists (If-None-Match: *)"),
            Self::Never | Self::None => format!(
                "the preconditions on record {id} cannot hold: a weak ETag never matches a write \
                 (RFC 9110 strong comparison) and If-Match excludes If-None-Match: *; \
                 send the ETag as returned"
            ),
        })
    }
}

/// PUT: replace, or create with this id. Returns the record and whether it
/// was created. `If-Match` replaces only an existing record (at that
/// version); `If-None-Match: *` only creates.
pub async fn put(
    pool: &PgPool,
    t: Target<'_>,
    events: &RecordEvents,
    id: &RecordId,
    data: &Value,
    condition: Precondition,
) -> Result<(Record, bool), StorageError> {
    let (cte, table) = (t.version_cte(), t.table());
    let write = match condition {
        Precondition::Never => return Err(condition.failure(id)),
        Precondition::None => format!(
            "INSERT INTO {table} AS r (id, data, audit) SELECT $1, $2, $5 FROM cur WHERE cur.current_version = $3
             ON CONFLICT (id) DO UPDATE SET data = EXCLUDED.data, audit = EXCLUDED.audit,
                version = r.version + 1, updated_at = now()
             RETURNING id, version, created_at, updated_at, data,
                       CASE WHEN xmax = 0 THEN 'created' ELSE 'updated' END AS kind"
        ),
        Precondition::Absent => format!(
            "INSERT INTO {table} AS r (id, data, audit) SELECT $1, $2, $5 FROM cur
              WHERE cur.current_version = $3 AND $4::bigint IS NULL
             ON CONFLICT (id) DO NOTHING
             RETURNING id, version, created_at, updated_at, data, 'created'::text AS kind"
        ),
        Precondition::Exists | Precondition::Version(_) => format!(
            "UPDATE {table} AS r SET data = $2, audit = $5, version = r.version + 1, updated_at = now()
             FROM cur WHERE r.id = $1 AND ($4::bigint IS NULL OR r.version = $4)
              AND cur.current_version = $3
             RETURNING r.id, r.version, r.created_at, r.updated_at, r.data, 'updated'::text AS kind"
        ),
    };
    let sql = format!(
        "{cte}, ins AS ({write}), {}
         SELECT id, version, created_at, updated_at, data, kind = 'created' AS inserted FROM ins",
        record_events_cte(6, events.hidden.len())
    );
    let q = sqlx::query_as::<_, RecordWithFlag>(&sql)
        .bind(id.as_str())
        .bind(data)
        .bind(t.schema_version)
        .bind(condition.version())
        .bind(audit(&events.audit));
    let row: Option<(Record, bool)> = bind_events(q, t, events, vec![id.as_str().to_owned()])
        .fetch_optional(pool)
        .await
        .map_err(map_err)?
        .map(RecordWithFlag::split);
    match row {
        Some((r, created)) => Ok((t.with_resource(r), created)),
        None if t.schema_moved(pool).await? => Err(StorageError::SchemaChanged),
        None => Err(condition.failure(id)),
    }
}

#[derive(sqlx::FromRow)]
struct RecordWithFlag {
    #[sqlx(flatten)]
    record: Record,
    inserted: bool,
}

impl RecordWithFlag {
    fn split(self) -> (Record, bool) {
        (self.record, self.inserted)
    }
}

/// A record as stored, its document unparsed; with its audit (JSON text,
/// `null` when it has none) when `with_audit`.
pub async fn get_raw<'e>(
    exec: impl sqlx::PgExecutor<'e>,
    t: Target<'_>,
    id: &RecordId,
    with_audit: bool,
) -> Result<Option<RawRecord>, StorageError> {
    let audit = if with_audit {
        "COALESCE(audit::text, 'null')"
    } else {
        "NULL::text"
    };
    let sql = format!(
        "SELECT id, version, created_at, updated_at, data::text AS data, {audit} AS audit
           FROM {} WHERE id = $1",
        t.table()
    );
    let row: Option<RawRecord> = sqlx::query_as(&sql)
        .bind(id.as_str())
        .fetch_optional(exec)
        .await
        .map_err(map_err)?;
    Ok(row.map(|mut r| {
        r.resource = t.resource.as_str().to_owned();
        r
    }))
}

pub async fn get(
    pool: &PgPool,
    t: Target<'_>,
    id: &RecordId,
) -> Result<Option<Record>, StorageError> {
    let Some(raw) = get_raw(pool, t, id, false).await? else {
        return Ok(None);
    };
    let record = raw.parsed().map_err(|e| {
        StorageError::Db(sqlx::Error::Decode(
            format!("stored record {id}: {e}").into(),
        ))
    })?;
    Ok(Some(record))
}

/// Deletes a record (if it meets `condition`); returns the deleted version.
pub async fn delete(
    pool: &PgPool,
    t: Target<'_>,
    events: &RecordEvents,
    id: &RecordId,
    condition: Precondition,
) -> Result<i64, StorageError> {
    match condition {
        Precondition::Never => return Err(condition.failure(id)),
        // If-None-Match: * — only a missing record, which cannot be deleted.
        Precondition::Absent if get(pool, t, id).await?.is_some() => {
            return Err(condition.failure(id));
        }
        Precondition::Absent => {
            return Err(StorageError::NotFound(format!("record {id} not found")));
        }
        _ => {}
    }
    let sql = format!(
        "WITH ins AS (DELETE FROM {} WHERE id = $1 AND ($2::bigint IS NULL OR version = $2)
            RETURNING id, version, data, 'deleted'::text AS kind), {}
         SELECT version FROM ins",
        t.table(),
        record_events_cte(3, events.hidden.len())
    );
    let q = sqlx::query_as(&sql)
        .bind(id.as_str())
        .bind(condition.version());
    let deleted: Option<(i64,)> = bind_events(q, t, events, vec![id.as_str().to_owned()])
        .fetch_optional(pool)
        .await
        .map_err(map_err)?;
    match (deleted, condition) {
        (Some((v,)), _) => Ok(v),
        (None, Precondition::Exists) => Err(condition.failure(id)),
        (None, Precondition::Version(_)) if get(pool, t, id).await?.is_some() => {
            Err(condition.failure(id))
        }
        (None, _) => Err(StorageError::NotFound(format!("record {id} not found"))),
    }
}

/// A read-modify-write of one record (merge-patch): the record is locked
/// for the transaction and the schema version pinned.
pub struct Patch<'a> {
    tx: Transaction<'static, Postgres>,
    t: Target<'a>,
    pub current: Record,
}

impl std::fmt::Debug for Patch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Patch")
            .field("current", &self.current)
            .finish()
    }
}

impl<'a> Patch<'a> {
    /// Locks the record; `SchemaChanged` if the schema moved on.
    pub async fn begin(pool: &PgPool, t: Target<'a>, id: &RecordId) -> Result<Self, StorageError> {
        let mut tx = pool.begin().await?;
        let v: Option<(i32,)> = sqlx::query_as(&format!(
            "SELECT current_version FROM {}._resources WHERE resource = $1 FOR KEY SHARE",
            t.tenant.schema_ident()
        ))
        .bind(t.resource.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        if v.map(|(v,)| v) != Some(t.schema_version) {
            return Err(StorageError::SchemaChanged);
        }
        let sql = format!(
            "SELECT id, version, created_at, updated_at, data FROM {} WHERE id = $1 FOR UPDATE",
            t.table()
        );
        let current: Option<Record> = sqlx::query_as(&sql)
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?;
        let current = current
            .map(|r| t.with_resource(r))
            .ok_or_else(|| StorageError::NotFound(format!("record {id} not found")))?;
        Ok(Self { tx, t, current })
    }

    /// Writes the new document and commits.
    pub async fn commit(
        mut self,
        data: &Value,
        events: &RecordEvents,
    ) -> Result<Record, StorageError> {
        let sql = format!(
            "WITH ins AS (UPDATE {} SET data = $2, audit = $3, version = version + 1, updated_at = now()
                WHERE id = $1 {RETURNING}, 'updated'::text AS kind), {}
             SELECT id, version, created_at, updated_at, data FROM ins",
            self.t.table(),
            record_events_cte(4, events.hidden.len())
        );
        let q = sqlx::query_as(&sql)
            .bind(self.current.id.clone())
            .bind(data)
            .bind(audit(&events.audit));
        let row: Record = bind_events(q, self.t, events, vec![self.current.id.clone()])
            .fetch_one(&mut *self.tx)
            .await?;
        self.tx.commit().await?;
        Ok(self.t.with_resource(row))
    }
}

/// Inserts all documents or none.
pub async fn create_batch(
    pool: &PgPool,
    t: Target<'_>,
    events: &RecordEvents,
    items: &[(RecordId, Value)],
) -> Result<Vec<Record>, StorageError> {
    let rows: Vec<(&RecordId, &Value, &Value, &Value)> = items
        .iter()
        .map(|(id, doc)| (id, doc, &events.template, &events.audit))
        .collect();
    let written = insert_rows(pool, t, events.full, &events.hidden, &rows, Wait::Yes).await?;
    if written.len() != items.len() {
        return Err(StorageError::SchemaChanged);
    }
    let mut by_id: std::collections::HashMap<String, Record> =
        written.into_iter().map(|r| (r.id.clone(), r)).collect();
    Ok(items
        .iter()
        .filter_map(|(id, _)| by_id.remove(id.as_str()))
        .collect())
}

/// A tenant's resources, in name order (the re-encryption job's walk).
pub async fn resources(pool: &PgPool, tenant: &TenantId) -> Result<Vec<String>, StorageError> {
    let s = tenant.schema_ident();
    sqlx::query_scalar(&format!(
        "SELECT resource FROM {s}._resources ORDER BY resource"
    ))
    .fetch_all(pool)
    .await
    .map_err(StorageError::from_tenant_query)
}

/// The next records after `after` (id order), at most `limit` of them and
/// about `max_bytes` of stored documents (at least one): the stored form,
/// sealed values and all.
pub async fn stored_page(
    pool: &PgPool,
    tenant: &TenantId,
    resource: &ResourceName,
    after: Option<&str>,
    limit: i64,
    max_bytes: i64,
) -> Result<Vec<(String, Value)>, StorageError> {
    let table = resource.table_in(tenant);
    sqlx::query_as(&format!(
        "SELECT id, data FROM (
             SELECT id, data,
                    sum(pg_column_size(data)) OVER (ORDER BY id) - pg_column_size(data) AS before
               FROM (SELECT id, data FROM {table}
                      WHERE $1::text IS NULL OR id > $1 ORDER BY id LIMIT $2) page) sized
          WHERE before < $3 ORDER BY id"
    ))
    .bind(after)
    .bind(limit)
    .bind(max_bytes)
    .fetch_all(pool)
    .await
    .map_err(StorageError::from_tenant_query)
}

/// Replaces a record's stored form by another of the same content (its
/// values sealed differently), unless it changed since it was read. The
/// record's version and timestamps stay: nothing a reader sees changed.
pub async fn replace_stored(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &TenantId,
    resource: &ResourceName,
    id: &str,
    read: &Value,
    stored: &Value,
) -> Result<bool, StorageError> {
    let table = resource.table_in(tenant);
    let done = sqlx::query(&format!(
        "UPDATE {table} SET data = $3 WHERE id = $1 AND data = $2"
    ))
    .bind(id)
    .bind(read)
    .bind(stored)
    .execute(&mut **tx)
    .await
    .map_err(StorageError::from_tenant_query)?;
    Ok(done.rows_affected() == 1)
}
