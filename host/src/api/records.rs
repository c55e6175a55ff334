//! `/v1/data/{resource}…`: records. Every write is validated against the
//! resource's current compiled schema and stored with a check that the
//! schema did not move on meanwhile (if it did, the write is revalidated
//! against the new version and retried).

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::{JsonBody, JsonDocument, Precondition, QueryPairs, etag, preconditions};
use crate::app_state::SharedState;
use crate::auth::{Principal, Role};
use crate::catalog::CompiledSchema;
use crate::catalog::compiled::{HEAVY_DOCUMENT, document_weight};
use crate::crypto::{self, Scope};
use crate::domain::{RecordId, ResourceName, TenantId};
use crate::error::{ApiError, ApiResult, FieldError, Problem};
use crate::events::envelope;
use crate::events::outbox::RecordEvents;
use crate::plugins::{Passed, WriteCall, WriteDoc};
use crate::storage::StorageError;
use crate::storage::query::{ListQuery, project};
use crate::storage::records::{self, Created, Idempotency, Patch, Record, Target};

/// Most items in one batch write.
pub const MAX_BATCH: usize = 1000;
/// Most schema errors reported for one batch.
const MAX_BATCH_ERRORS: usize = 1000;
/// Times a write is retried when the schema changes under it.
const SCHEMA_RETRIES: usize = 3;

pub fn router() -> OpenApiRouter<SharedState> {
    OpenApiRouter::new()
        .routes(routes!(create_record, list_records))
        .routes(routes!(get_record, put_record, patch_record, delete_record))
        .routes(routes!(create_batch))
}

/// Resolves the resource's current schema; 404 if it has none.
async fn schema_of(
    state: &SharedState,
    tenant: &TenantId,
    resource: &ResourceName,
    reload: bool,
) -> ApiResult<Arc<CompiledSchema>> {
    let found = if reload {
        state.schemas.reload(&state.pool, tenant, resource).await?
    } else {
        state.schemas.current(&state.pool, tenant, resource).await?
    };
    found.ok_or_else(|| {
        ApiError::not_found(format!(
            "no resource named {resource}; define it with PUT /v1/schemas/{resource}"
        ))
    })
}

/// Runs a write against the current schema, again against a newer one if
/// the schema changed while it ran.
async fn with_schema<T, F, Fut>(
    state: &SharedState,
    tenant: &TenantId,
    resource: &ResourceName,
    mut write: F,
) -> ApiResult<T>
where
    F: FnMut(Arc<CompiledSchema>) -> Fut,
    Fut: Future<Output = ApiResult<Result<T, StorageError>>>,
{
    let mut reload = false;
    for _ in 0..SCHEMA_RETRIES {
        let schema = schema_of(state, tenant, resource, reload).await?;
        match write(schema).await? {
            Err(StorageError::SchemaChanged) => reload = true,
            other => return other.map_err(ApiError::from),
        }
    }
    Err(StorageError::SchemaChanged.into())
}

/// Validates a document against the schema; a heavy document is validated
/// on a blocking thread, so no tenant's document occupies an async worker.
async fn validate(
    schema: &Arc<CompiledSchema>,
    resource: &ResourceName,
    doc: &Value,
) -> ApiResult<()> {
    refuse_sealed_lookalikes(doc, "")?;
    let checked = if document_weight(doc) > HEAVY_DOCUMENT {
        let (schema, doc) = (schema.clone(), doc.clone());
        off_worker(move || schema.validate(&doc)).await?
    } else {
        schema.validate(doc)
    };
    checked.map_err(|errors| {
        ApiError::unprocessable(
            format!(
                "the record does not match the schema of {resource} (version {})",
                schema.version
            ),
            errors,
        )
    })
}

/// Refuses a document holding an object shaped like a sealed value
/// (`{"$enc": 1, "kid", "n", "c"}`): reads would try to open it, and fail,
/// so one writer could make a record (and every list page with it)
/// unreadable for everyone.
fn refuse_sealed_lookalikes(doc: &Value, at: &str) -> ApiResult<()> {
    if crate::crypto::fields::key_ids(doc).is_empty() {
        return Ok(());
    }
    Err(ApiError::unprocessable(
        "the record holds an object shaped like a sealed value ({\"$enc\": 1, \"kid\", \"n\", \"c\"}); \
         such objects are reserved for x-encrypted fields",
        vec![FieldError::request(
            if at.is_empty() { "/" } else { at },
            "reserved shape",
        )],
    ))
}

/// Validates every item of a batch; errors point at `/items/<i>/…`.
async fn validate_batch(
    schema: &Arc<CompiledSchema>,
    items: &[(RecordId, Value)],
) -> ApiResult<Vec<FieldError>> {
    fn check(schema: &CompiledSchema, docs: &[&Value]) -> Vec<FieldError> {
        docs.iter()
            .enumerate()
            .filter_map(|(i, doc)| schema.validate(doc).err().map(|e| (i, e)))
            .flat_map(|(i, errs)| {
                errs.into_iter().map(move |e| FieldError {
                    path: format!("/items/{i}{}", e.path),
                    ..e
                })
            })
            .take(MAX_BATCH_ERRORS)
            .collect()
    }
    for (i, (_, doc)) in items.iter().enumerate() {
        refuse_sealed_lookalikes(doc, &format!("/items/{i}"))?;
    }
    let weight: usize = items.iter().map(|(_, d)| document_weight(d)).sum();
    if weight <= HEAVY_DOCUMENT {
        return Ok(check(
            schema,
            &items.iter().map(|(_, d)| d).collect::<Vec<_>>(),
        ));
    }
    let schema = schema.clone();
    let docs: Vec<Value> = items.iter().map(|(_, d)| d.clone()).collect();
    off_worker(move || check(&schema, &docs.iter().collect::<Vec<_>>())).await
}

/// Runs CPU-bound work on a blocking thread.
async fn off_worker<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("validation did not finish: {e}")))
}

/// Who asks the validation hooks about a write, and about what.
fn write_call<'a>(
    state: &SharedState,
    principal: &Principal,
    headers: &HeaderMap,
    tenant: &'a TenantId,
    resource: &'a ResourceName,
    operation: &'static str,
) -> WriteCall<'a> {
    WriteCall {
        tenant,
        resource: resource.as_str(),
        operation,
        actor: principal.actor(),
        request_id: super::event_context(state, headers).correlation_id,
        hidden: Arc::from([]),
    }
}

fn one_doc(record: &Value, previous: Option<&Value>) -> Vec<WriteDoc> {
    vec![WriteDoc {
        path: String::new(),
        record: record.to_string(),
        previous: previous.map(Value::to_string),
    }]
}

fn target<'a>(t: &'a TenantId, r: &'a ResourceName, s: &CompiledSchema) -> Target<'a> {
    Target {
        tenant: t,
        resource: r,
        schema_version: s.version,
    }
}

/// How the change events of a write to this resource look.
fn record_events(
    state: &SharedState,
    headers: &HeaderMap,
    tenant: &TenantId,
    schema: &CompiledSchema,
) -> RecordEvents {
    RecordEvents {
        template: envelope::template(&super::event_context(state, headers), tenant),
        full: schema.full_events(),
        hidden: schema.encrypted_paths().to_vec(),
        audit: Value::Null,
    }
}

/// The stored form of a validated document: its `x-encrypted` fields
/// sealed (every write stores through here). Fails closed (503) when the
/// tenant's key cannot be had.
async fn sealed<'a>(
    state: &SharedState,
    t: Target<'_>,
    schema: &CompiledSchema,
    id: &RecordId,
    doc: &'a Value,
) -> ApiResult<Cow<'a, Value>> {
    let scope = Scope {
        tenant: t.tenant.as_str(),
        resource: t.resource.as_str(),
        record: id.as_str(),
    };
    let paths = schema.encrypted_paths();
    Ok(crypto::seal_document(&state.keyring, paths, &scope, doc).await?)
}

/// The stored forms of a batch's documents (borrowed when nothing is sealed).
async fn sealed_batch<'a>(
    state: &SharedState,
    t: Target<'_>,
    schema: &CompiledSchema,
    items: &'a [(RecordId, Value)],
) -> ApiResult<Cow<'a, [(RecordId, Value)]>> {
    if schema.encrypted_paths().is_empty() {
        return Ok(Cow::Borrowed(items));
    }
    let mut stored = Vec::with_capacity(items.len());
    for (id, doc) in items {
        let doc = sealed(state, t, schema, id, doc).await?.into_owned();
        stored.push((id.clone(), doc));
    }
    Ok(Cow::Owned(stored))
}

/// Opens the sealed values of a stored document of record `id` (every read
/// answers through here): 503 when a key cannot be had, 409 when a value
/// does not open in its place.
async fn reveal_data(
    state: &SharedState,
    tenant: &TenantId,
    resource: &str,
    id: &str,
    data: &mut Value,
) -> ApiResult<()> {
    let scope = Scope {
        tenant: tenant.as_str(),
        resource,
        record: id,
    };
    Ok(crypto::open_document(&state.keyring, &scope, data).await?)
}

/// A record just written, answered in clear: its sealed values are put
/// back from the document written (what opening them would give).
fn in_clear(mut record: Record, schema: &CompiledSchema, doc: &Value) -> Record {
    crypto::fields::restore(&mut record.data, doc, schema.encrypted_paths());
    record
}

async fn reveal(state: &SharedState, tenant: &TenantId, record: &mut Record) -> ApiResult<()> {
    reveal_data(
        state,
        tenant,
        &record.resource,
        &record.id,
        &mut record.data,
    )
    .await
}

/// A record answered: its JSON, with its `ETag` (and `Location` when created).
trait Answered {
    fn version(&self) -> i64;
    fn location(&self) -> String;
    fn body(&self) -> Result<Vec<u8>, serde_json::Error>;
}

impl Answered for Record {
    fn version(&self) -> i64 {
        self.version
    }
    fn location(&self) -> String {
        format!("/v1/data/{}/{}", self.resource, self.id)
    }
    fn body(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }
}

impl Answered for records::RawRecord {
    fn version(&self) -> i64 {
        self.version
    }
    fn location(&self) -> String {
        format!("/v1/data/{}/{}", self.resource, self.id)
    }
    fn body(&self) -> Result<Vec<u8>, serde_json::Error> {
        self.to_json()
    }
}

fn record_response(status: StatusCode, record: &impl Answered) -> Response {
    let mut resp = match record.body() {
        Ok(body) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        Err(e) => ApiError::Internal(anyhow::anyhow!("writing a record: {e}")).into_response(),
    };
    if let Ok(v) = HeaderValue::from_str(&etag(record.version())) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    if status == StatusCode::CREATED
        && let Ok(v) = HeaderValue::from_str(&record.location())
    {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match v.to_str() {
        Ok(k) if !k.is_empty() && k.len() <= 255 => Ok(Some(k.to_owned())),
        _ => Err(ApiError::bad_request(
            "Idempotency-Key must be 1-255 visible ASCII characters",
        )),
    }
}

/// Create a record.
#[utoipa::path(post, path = "/v1/data/{resource}", tag = "records",
    params(("resource" = String, Path, description = "Resource name"),
           ("Idempotency-Key" = Option<String>, Header, description = "Same key and body within 24 h returns the first result")),
    request_body(content = Object, description = "The document, validated by the resource's schema"),
    responses((status = 201, body = Record), (status = 422, body = Problem), (status = 404, body = Problem),
              (status = 409, body = Problem, description = "the Idempotency-Key was used with another request, or that request is still in progress")),
    security(("bearer" = [])))]
async fn create_record(
    State(state): State<SharedState>,
    principal: Principal,
    Path(resource): Path<String>,
    headers: HeaderMap,
    JsonDocument(doc): JsonDocument,
) -> ApiResult<Response> {
    let tenant = principal.tenant_with(Role::Writer)?;
    let resource = ResourceName::parse(&resource)?;
    let idem = idempotency_key(&headers)?.map(|key| {
        let digest = Sha256::new()
            .chain_update(resource.as_str())
            .chain_update([0])
            .chain_update(doc.to_string())
            .finalize();
        let hash = digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        (key, hash)
    });
    let change = Change::Create {
        id: RecordId::generate(),
        doc,
        idem,
    };
    let writer = Writer::new(&state, &principal, &headers, tenant, &resource);
    let Done::Created(created) = writer.write(&change).await? else {
        return Err(other_verb());
    };
    Ok(match created {
        Created::New(record) => record_response(StatusCode::CREATED, &record),
        Created::Replayed {
            status,
            mut response,
        } => {
            // Stored as answered, sealed values included: opened for the replay.
            let id = response
                .get("id")
                .and_then(Value::as_str)
                .map(str::to_owned);
            if let (Some(id), Some(data)) = (id, response.get_mut("data")) {
                reveal_data(&state, tenant, resource.as_str(), &id, data).await?;
            }
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::CREATED);
            let mut resp = (status, Json(&response)).into_response();
            let h = resp.headers_mut();
            h.insert("idempotent-replayed", HeaderValue::from_static("true"));
            if let (Some(v), Some(id)) = (
                response.get("version").and_then(Value::as_i64),
                response.get("id").and_then(Value::as_str),
            ) {
                if let Ok(e) = HeaderValue::from_str(&etag(v)) {
                    h.insert(header::ETAG, e);
                }
                if let Ok(l) = HeaderValue::from_str(&format!("/v1/data/{resource}/{id}")) {
                    h.insert(header::LOCATION, l);
                }
            }
            resp
        }
    })
}

/// Read a record; with `include=audit`, also what its version keeps of
/// the write that made it (actor, request, hook versions that passed it).
#[utoipa::path(get, path = "/v1/data/{resource}/{id}", tag = "records",
    params(("resource" = String, Path), ("id" = String, Path),
           ("include" = Option<String>, Query, description = "audit: add the version's audit")),
    responses((status = 200, body = Record), (status = 304), (status = 400, body = Problem),
              (status = 404, body = Problem)),
    security(("bearer" = [])))]
async fn get_record(
    State(state): State<SharedState>,
    principal: Principal,
    Path((resource, id)): Path<(String, String)>,
    QueryPairs(params): QueryPairs,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let tenant = principal.tenant_with(Role::Reader)?;
    let resource = ResourceName::parse(&resource)?;
    let id = RecordId::parse(&id).map_err(|_| ApiError::not_found("record not found"))?;
    let with_audit = includes_audit(&params)?;
    let schema = schema_of(&state, tenant, &resource, false).await?;
    let raw = {
        // The tenant's lane (see `storage::lanes`), given back at once.
        let mut conn = state
            .reads
            .acquire(tenant)
            .await
            .map_err(StorageError::Db)?;
        records::get_raw(
            &mut *conn,
            target(tenant, &resource, &schema),
            &id,
            with_audit,
        )
        .await?
    }
    .ok_or_else(|| ApiError::not_found(format!("record {id} not found")))?;
    let tag = etag(raw.version);
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag))
    {
        let mut resp = StatusCode::NOT_MODIFIED.into_response();
        if let Ok(v) = HeaderValue::from_str(&tag) {
            resp.headers_mut().insert(header::ETAG, v);
        }
        return Ok(resp);
    }
    if !raw.sealed() {
        return Ok(record_response(StatusCode::OK, &raw));
    }
    let mut record = raw
        .parsed()
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("stored record {id}: {e}")))?;
    reveal(&state, tenant, &mut record).await?;
    Ok(record_response(StatusCode::OK, &record))
}

/// Whether `include` asks for the audit (the only thing it can name).
fn includes_audit(params: &[(String, String)]) -> ApiResult<bool> {
    let mut audit = false;
    for (_, value) in params.iter().filter(|(k, _)| k == "include") {
        for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "audit" => audit = true,
                other => {
                    return Err(ApiError::bad_request(format!(
                        "include={other} is not known; a record can include: audit"
                    )));
                }
            }
        }
    }
    Ok(audit)
}

/// Replace a record, or create it with this id.
#[utoipa::path(put, path = "/v1/data/{resource}/{id}", tag = "records",
    params(("resource" = String, Path), ("id" = String, Path),
           ("If-Match" = Option<String>, Header, description = "Replace only at this ETag (strong), or only an existing record (*); weak tags never match"),
           ("If-None-Match" = Option<String>, Header, description = "*: create only, 412 if the record exists (ETags here are ignored: they are for reads)")),
    request_body(content = Object),
    responses((status = 200, body = Record), (status = 201, body = Record),
              (status = 412, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
async fn put_record(
    State(state): State<SharedState>,
    principal: Principal,
    Path((resource, id)): Path<(String, String)>,
    headers: HeaderMap,
    JsonDocument(doc): JsonDocument,
) -> ApiResult<Response> {
    let tenant = principal.tenant_with(Role::Writer)?;
    let resource = ResourceName::parse(&resource)?;
    let change = Change::Replace {
        id: RecordId::parse(&id)?,
        doc,
        expected: preconditions(&headers)?,
    };
    let writer = Writer::new(&state, &principal, &headers, tenant, &resource);
    let Done::Replaced(record, created) = writer.write(&change).await? else {
        return Err(other_verb());
    };
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(record_response(status, &record))
}

/// Merge-patch a record (RFC 7396).
#[utoipa::path(patch, path = "/v1/data/{resource}/{id}", tag = "records",
    params(("resource" = String, Path), ("id" = String, Path),
           ("If-Match" = Option<String>, Header, description = "Patch only at this ETag (strong), or * for any current record; weak tags never match")),
    request_body(content = Object, content_type = "application/merge-patch+json"),
    responses((status = 200, body = Record), (status = 404, body = Problem),
              (status = 412, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
async fn patch_record(
    State(state): State<SharedState>,
    principal: Principal,
    Path((resource, id)): Path<(String, String)>,
    headers: HeaderMap,
    JsonDocument(patch): JsonDocument,
) -> ApiResult<Response> {
    let tenant = principal.tenant_with(Role::Writer)?;
    let resource = ResourceName::parse(&resource)?;
    let id = RecordId::parse(&id).map_err(|_| ApiError::not_found("record not found"))?;
    let expected = preconditions(&headers)?;
    if !patch.is_object() {
        return Err(ApiError::bad_request("a merge patch must be a JSON object"));
    }
    let change = Change::Patch {
        id,
        patch,
        expected,
    };
    let writer = Writer::new(&state, &principal, &headers, tenant, &resource);
    let Done::Patched(record) = writer.write(&change).await? else {
        return Err(other_verb());
    };
    Ok(record_response(StatusCode::OK, &record))
}

/// Delete a record.
#[utoipa::path(delete, path = "/v1/data/{resource}/{id}", tag = "records",
    params(("resource" = String, Path), ("id" = String, Path),
           ("If-Match" = Option<String>, Header, description = "Delete only at this ETag (strong), or * (412 when there is no record); weak tags never match")),
    responses((status = 204), (status = 404, body = Problem), (status = 412, body = Problem)),
    security(("bearer" = [])))]
async fn delete_record(
    State(state): State<SharedState>,
    principal: Principal,
    Path((resource, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    let tenant = principal.tenant_with(Role::Writer)?;
    let resource = ResourceName::parse(&resource)?;
    let change = Change::Delete {
        id: RecordId::parse(&id).map_err(|_| ApiError::not_found("record not found"))?,
        expected: preconditions(&headers)?,
    };
    let writer = Writer::new(&state, &principal, &headers, tenant, &resource);
    writer.write(&change).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// One write, as a verb or the batch endpoint asks for it.
enum Change {
    Create {
        id: RecordId,
        doc: Value,
        /// Idempotency key and request hash.
        idem: Option<(String, String)>,
    },
    Replace {
        id: RecordId,
        doc: Value,
        expected: Precondition,
    },
    Patch {
        id: RecordId,
        patch: Value,
        expected: Precondition,
    },
    Delete {
        id: RecordId,
        expected: Precondition,
    },
    Batch {
        items: Vec<(RecordId, Value)>,
    },
}

impl Change {
    /// The operation the validation hooks are told.
    fn operation(&self) -> &'static str {
        match self {
            Self::Create { .. } => "create",
            Self::Replace { .. } => "replace",
            Self::Patch { .. } => "patch",
            Self::Delete { .. } => "delete",
            Self::Batch { .. } => "batch",
        }
    }
}

/// What a write did.
enum Done {
    Created(Created),
    /// The record, and whether it was created.
    Replaced(Record, bool),
    Patched(Record),
    Deleted,
    Batch(Vec<Record>),
}

impl Done {
    /// Records changed (each wrote one event).
    fn changed(&self) -> u64 {
        match self {
            Self::Created(Created::Replayed { .. }) => 0,
            Self::Batch(rows) => rows.len() as u64,
            _ => 1,
        }
    }
}

fn other_verb() -> ApiError {
    ApiError::Internal(anyhow::anyhow!("a write answered for another verb"))
}

/// Who writes to which resource: the one write path of every verb.
struct Writer<'a> {
    state: &'a SharedState,
    principal: &'a Principal,
    headers: &'a HeaderMap,
    tenant: &'a TenantId,
    resource: &'a ResourceName,
}

impl<'a> Writer<'a> {
    fn new(
        state: &'a SharedState,
        principal: &'a Principal,
        headers: &'a HeaderMap,
        tenant: &'a TenantId,
        resource: &'a ResourceName,
    ) -> Self {
        Self {
            state,
            principal,
            headers,
            tenant,
            resource,
        }
    }

    /// Against the resource's current schema (and again against a newer
    /// one if it moves on meanwhile): validate, ask the validation hooks,
    /// seal the `x-encrypted` values, store with the change events.
    async fn write(&self, change: &Change) -> ApiResult<Done> {
        // A condition that cannot hold fails before any work is done.
        if let Change::Replace { id, expected, .. }
        | Change::Patch { id, expected, .. }
        | Change::Delete { id, expected } = change
            && *expected == Precondition::Never
        {
            return Err(expected.failure(id).into());
        }
        let done = with_schema(
            self.state,
            self.tenant,
            self.resource,
            |schema| async move {
                self.validate(&schema, change).await?;
                let (seen, hooks) = self.ask_hooks(&schema, change).await?;
                self.store(&schema, change, seen, &hooks).await
            },
        )
        .await?;
        self.state.event_log.written(done.changed());
        Ok(done)
    }

    fn target(&self, schema: &CompiledSchema) -> Target<'a> {
        target(self.tenant, self.resource, schema)
    }

    /// The documents that will be stored, against the schema. A patch is
    /// validated once merged onto the record it changes; a delete stores
    /// no document.
    async fn validate(&self, schema: &Arc<CompiledSchema>, change: &Change) -> ApiResult<()> {
        match change {
            Change::Create { doc, .. } | Change::Replace { doc, .. } => {
                validate(schema, self.resource, doc).await
            }
            Change::Batch { items } => {
                let errors = validate_batch(schema, items).await?;
                if errors.is_empty() {
                    Ok(())
                } else {
                    Err(ApiError::unprocessable(
                        "some items do not match the schema; nothing was stored",
                        errors,
                    ))
                }
            }
            Change::Patch { .. } | Change::Delete { .. } => Ok(()),
        }
    }

    /// Asks the tenant's validation hooks, if any are bound. Returns the
    /// version of the record they judged, for a patch (applied only to it),
    /// and the hook versions that passed the write.
    async fn ask_hooks(
        &self,
        schema: &Arc<CompiledSchema>,
        change: &Change,
    ) -> ApiResult<(Option<i64>, Passed)> {
        let state = self.state;
        let on_delete = matches!(change, Change::Delete { .. });
        let Some(hooks) = state
            .plugins
            .hooks(self.tenant, self.resource.as_str(), on_delete)
            .await?
        else {
            return Ok((None, Passed::default()));
        };
        let mut seen = None;
        let docs = match change {
            Change::Create { doc, idem, .. } => {
                // A replay answers the first result without asking the hooks again.
                if let Some((key, _)) = idem
                    && records::replays(&state.pool, self.tenant, key).await?
                {
                    return Ok((None, Passed::default()));
                }
                one_doc(doc, None)
            }
            Change::Replace { id, doc, .. } => {
                // The stored record as read just before the write.
                let previous = self.current(schema, id).await?.map(|r| r.data);
                one_doc(doc, previous.as_ref())
            }
            Change::Patch {
                id,
                patch,
                expected,
            } => {
                // Hooks run before the row is locked (they may take up to
                // their deadline), on the version read here; the write then
                // applies only to that version.
                let current = self.existing(schema, id, *expected).await?;
                let mut doc = current.data.clone();
                json_patch::merge(&mut doc, patch);
                validate(schema, self.resource, &doc).await?;
                seen = Some(current.version);
                one_doc(&doc, Some(&current.data))
            }
            Change::Delete { id, expected } => {
                let current = self.existing(schema, id, *expected).await?;
                one_doc(&current.data, Some(&current.data))
            }
            Change::Batch { items } => items
                .iter()
                .enumerate()
                .map(|(i, (_, doc))| WriteDoc {
                    path: format!("/items/{i}"),
                    record: doc.to_string(),
                    previous: None,
                })
                .collect(),
        };
        let mut call = write_call(
            state,
            self.principal,
            self.headers,
            self.tenant,
            self.resource,
            change.operation(),
        );
        call.hidden = schema.encrypted_paths().into();
        let passed = state.plugins.check_write(hooks, call, docs).await?;
        Ok((seen, passed))
    }

    /// The stored record, its sealed values opened (what hooks see).
    async fn current(&self, schema: &CompiledSchema, id: &RecordId) -> ApiResult<Option<Record>> {
        match records::get(&self.state.pool, self.target(schema), id).await? {
            Some(mut r) => {
                reveal(self.state, self.tenant, &mut r).await?;
                Ok(Some(r))
            }
            None => Ok(None),
        }
    }

    /// The record a PATCH or DELETE applies to; when there is none, 412 if
    /// the request asked for a current one (`If-Match: *`), else 404.
    async fn existing(
        &self,
        schema: &CompiledSchema,
        id: &RecordId,
        expected: Precondition,
    ) -> ApiResult<Record> {
        match self.current(schema, id).await? {
            Some(record) => Ok(record),
            None if expected == Precondition::Exists => Err(expected.failure(id).into()),
            None => Err(ApiError::not_found(format!("record {id} not found"))),
        }
    }

    /// Seals and stores, with the change events, in one statement or
    /// transaction. Creates without an idempotency key share statements
    /// and commits with concurrent ones (`storage::coalesce`).
    async fn store(
        &self,
        schema: &Arc<CompiledSchema>,
        change: &Change,
        seen: Option<i64>,
        hooks: &Passed,
    ) -> ApiResult<Result<Done, StorageError>> {
        let state = self.state;
        let t = self.target(schema);
        let mut events = record_events(state, self.headers, self.tenant, schema);
        // Audit: the hook versions that passed this write, on its events and
        // on the record version it stores, with who wrote it and in which
        // request.
        if !hooks.is_empty() {
            events.template[crate::plugins::HOOKS_ATTRIBUTE] = Value::String(hooks.attribute());
        }
        events.audit = json!({
            "operation": change.operation(),
            "actor": self.principal.actor(),
            "requestId": events.template["correlationid"],
            "hooks": hooks.to_json(),
        });
        Ok(match change {
            Change::Create { id, doc, idem } => {
                let stored = sealed(state, t, schema, id, doc).await?;
                let created = match idem {
                    Some((key, request_hash)) => {
                        let idem = Idempotency { key, request_hash };
                        records::create(&state.pool, t, &events, id, &stored, Some(idem)).await
                    }
                    None => state
                        .writes
                        .create(t, &events, id, &stored)
                        .await
                        .map(Created::New),
                };
                created.map(|c| match c {
                    Created::New(r) => Done::Created(Created::New(in_clear(r, schema, doc))),
                    replayed => Done::Created(replayed),
                })
            }
            Change::Replace { id, doc, expected } => {
                let stored = sealed(state, t, schema, id, doc).await?;
                records::put(&state.pool, t, &events, id, &stored, *expected)
                    .await
                    .map(|(r, created)| Done::Replaced(in_clear(r, schema, doc), created))
            }
            Change::Patch {
                id,
                patch,
                expected,
            } => {
                return self
                    .patch(schema, &events, id, patch, *expected, seen)
                    .await;
            }
            Change::Delete { id, expected } => {
                records::delete(&state.pool, t, &events, id, *expected)
                    .await
                    .map(|_| Done::Deleted)
            }
            Change::Batch { items } => {
                let stored = sealed_batch(state, t, schema, items).await?;
                records::create_batch(&state.pool, t, &events, &stored)
                    .await
                    .map(|rows| {
                        let docs = items.iter().map(|(_, doc)| doc);
                        let rows = rows.into_iter().zip(docs);
                        Done::Batch(rows.map(|(r, doc)| in_clear(r, schema, doc)).collect())
                    })
            }
        })
    }

    /// A merge patch under the record's row lock, on the version the hooks
    /// judged (if they did).
    async fn patch(
        &self,
        schema: &Arc<CompiledSchema>,
        events: &RecordEvents,
        id: &RecordId,
        patch: &Value,
        expected: Precondition,
        seen: Option<i64>,
    ) -> ApiResult<Result<Done, StorageError>> {
        let state = self.state;
        if !schema.encrypted_paths().is_empty() {
            // The key the write seals with is fetched before the row is
            // locked: a call to the Auth Service does not hold the lock.
            state.keyring.current(self.tenant.as_str()).await?;
        }
        let tx = match Patch::begin(&state.pool, self.target(schema), id).await {
            Ok(tx) => tx,
            Err(StorageError::NotFound(_)) if expected == Precondition::Exists => {
                return Ok(Err(expected.failure(id)));
            }
            Err(e) => return Ok(Err(e)),
        };
        let current = tx.current.version;
        match expected {
            Precondition::Version(v) if v != current => {
                return Err(ApiError::PreconditionFailed(format!(
                    "record {id} is at version {current}, not {v}"
                )));
            }
            Precondition::Never | Precondition::Absent => return Ok(Err(expected.failure(id))),
            _ => {}
        }
        if let Some(v) = seen
            && v != tx.current.version
        {
            return Err(ApiError::conflict(format!(
                "record {id} changed while its plugins checked the patch; send it again"
            )));
        }
        let mut doc = tx.current.data.clone();
        reveal_data(
            state,
            self.tenant,
            self.resource.as_str(),
            id.as_str(),
            &mut doc,
        )
        .await?;
        json_patch::merge(&mut doc, patch);
        validate(schema, self.resource, &doc).await?;
        let stored = sealed(state, self.target(schema), schema, id, &doc).await?;
        let committed = tx.commit(&stored, events).await;
        Ok(committed.map(|r| Done::Patched(in_clear(r, schema, &doc))))
    }
}

#[derive(Debug, Deserialize, ToSchema)]
struct BatchRequest {
    /// Documents to create, all or none (1 to `MAX_BATCH`).
    #[schema(value_type = Vec<Object>, min_items = 1, max_items = 1000)]
    items: Vec<Value>,
}

#[derive(Debug, Serialize, ToSchema)]
struct BatchResponse {
    items: Vec<Record>,
}

/// Create up to 1000 records, all or nothing.
#[utoipa::path(post, path = "/v1/data/{resource}/batch", tag = "records",
    params(("resource" = String, Path)),
    request_body = BatchRequest,
    responses((status = 201, body = BatchResponse), (status = 422, body = Problem)),
    security(("bearer" = [])))]
async fn create_batch(
    State(state): State<SharedState>,
    principal: Principal,
    Path(resource): Path<String>,
    headers: HeaderMap,
    JsonBody(batch): JsonBody<BatchRequest>,
) -> ApiResult<Response> {
    let tenant = principal.tenant_with(Role::Writer)?;
    let resource = ResourceName::parse(&resource)?;
    if batch.items.is_empty() || batch.items.len() > MAX_BATCH {
        return Err(ApiError::unprocessable(
            format!(
                "a batch holds 1 to {MAX_BATCH} items, not {}",
                batch.items.len()
            ),
            vec![FieldError::request("/items", "wrong number of items")],
        ));
    }
    let items = batch
        .items
        .into_iter()
        .map(|doc| (RecordId::generate(), doc))
        .collect();
    let change = Change::Batch { items };
    let writer = Writer::new(&state, &principal, &headers, tenant, &resource);
    let Done::Batch(created) = writer.write(&change).await? else {
        return Err(other_verb());
    };
    Ok((StatusCode::CREATED, Json(BatchResponse { items: created })).into_response())
}

/// A page of records (for the OpenAPI document: the handler writes the
/// page as JSON, projecting each record when `select` asks).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
struct RecordPage {
    /// The records in the asked order; with `select`, only the asked
    /// fields of each.
    items: Vec<ListedRecord>,
    /// Pass as `cursor` for the next page; null on the last page.
    next_cursor: Option<String>,
    /// With `count=exact`: how many records match the filters.
    total: Option<i64>,
}

/// A record in a list: every field, or those `select` named.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
struct ListedRecord {
    id: Option<String>,
    resource: Option<String>,
    version: Option<i64>,
    created_at: Option<chrono::DateTime<chrono::Utc>>,
    updated_at: Option<chrono::DateTime<chrono::Utc>>,
    #[schema(value_type = Option<Object>)]
    data: Option<Value>,
}

/// List records with filters, order, cursor pagination, projection and count.
#[utoipa::path(get, path = "/v1/data/{resource}", tag = "records",
    params(("resource" = String, Path),
           ("order" = Option<String>, Query, description = "e.g. amount.desc,createdAt.asc"),
           ("limit" = Option<i64>, Query, description = "1-1000, default 50"),
           ("cursor" = Option<String>, Query, description = "nextCursor of the previous page"),
           ("select" = Option<String>, Query, description = "e.g. id,data.amount"),
           ("count" = Option<String>, Query, description = "exact: add total")),
    responses((status = 200, body = RecordPage),
              (status = 400, body = Problem)),
    security(("bearer" = [])))]
async fn list_records(
    State(state): State<SharedState>,
    principal: Principal,
    Path(resource): Path<String>,
    QueryPairs(params): QueryPairs,
) -> ApiResult<Json<Value>> {
    let tenant = principal.tenant_with(Role::Reader)?;
    let resource = ResourceName::parse(&resource)?;
    let schema = schema_of(&state, tenant, &resource, false).await?;
    let query = ListQuery::parse(&params, &schema).map_err(|e| ApiError::bad_request(e.0))?;
    let mut page = query
        .run(&state.pool, target(tenant, &resource, &schema))
        .await?;
    for record in &mut page.items {
        reveal(&state, tenant, record).await?;
    }
    let items: Vec<Value> = page
        .items
        .iter()
        .map(|r| {
            let v = serde_json::to_value(r).unwrap_or(Value::Null);
            match &query.select {
                Some(fields) => project(&v, fields),
                None => v,
            }
        })
        .collect();
    let mut body = json!({"items": items, "nextCursor": page.next_cursor});
    if let Some(total) = page.total {
        body["total"] = json!(total);
    }
    Ok(Json(body))
}
