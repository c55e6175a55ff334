//! `/v1/plugins…` (admin): upload a plugin version (multipart: `manifest`
//! JSON + `module` component), list, inspect with stats, switch the active
//! version (rollback), delete.

use axum::Json;
use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::JsonBody;
use crate::app_state::SharedState;
use crate::auth::{Principal, Role};
use crate::error::{ApiError, ApiResult, FieldError, Problem};
use crate::plugins::calls::{self, CallRow, LogRow};
use crate::plugins::manifest::valid_name;
use crate::plugins::{Kind, Manifest, StatsView};
use crate::storage::StorageError;
use crate::storage::plugins as store;

/// Largest manifest part.
const MANIFEST_MAX: usize = 256 * 1024;

pub fn router() -> OpenApiRouter<SharedState> {
    OpenApiRouter::new()
        // Uploads are read part by part, each against its own limit (the
        // module's is a setting), instead of the general body limit.
        .routes(routes!(upload_plugin, list_plugins))
        .layer(DefaultBodyLimit::disable())
        .routes(routes!(get_plugin, delete_plugin))
        .routes(routes!(activate_plugin))
        .routes(routes!(plugin_logs))
        .routes(routes!(plugin_calls))
        .routes(routes!(plugin_call))
        .routes(routes!(start_trial, end_trial))
        .routes(routes!(promote_trial))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct UploadQuery {
    /// Upload the version on trial beside the active one instead of
    /// making it active: `shadow` or `canary`.
    trial: Option<TrialMode>,
    /// A canary's share of calls (writes, events or deliveries), 1-100.
    #[param(minimum = 1, maximum = 100)]
    percent: Option<i16>,
}

/// How a version is tried beside the active one.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum TrialMode {
    /// Runs on every call after the active version; compared, never applied.
    Shadow,
    /// Answers `percent` percent of calls.
    Canary,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct TrialRequest {
    #[schema(minimum = 1)]
    version: i32,
    mode: TrialMode,
    /// A canary's share of calls, 1-100 (a shadow takes none).
    #[schema(minimum = 1, maximum = 100)]
    percent: Option<i16>,
}

/// The trial a request asks for, or a 422 saying why it cannot be.
fn trial_of(mode: Option<TrialMode>, percent: Option<i16>) -> ApiResult<Option<store::Trial>> {
    let refuse = |path: &str, message: &str| {
        Err(ApiError::unprocessable(
            message.to_owned(),
            vec![FieldError::request(path, message)],
        ))
    };
    match (mode, percent) {
        (None, None) => Ok(None),
        (None, Some(_)) => refuse("/percent", "percent goes with a canary trial"),
        (Some(TrialMode::Shadow), None) => Ok(Some(store::Trial::Shadow)),
        (Some(TrialMode::Shadow), Some(_)) => refuse(
            "/percent",
            "a shadow runs on every call and applies none: it takes no percent",
        ),
        (Some(TrialMode::Canary), Some(p)) if (1..=100).contains(&p) => {
            Ok(Some(store::Trial::Canary(p)))
        }
        (Some(TrialMode::Canary), _) => refuse(
            "/percent",
            "a canary needs the percent of calls it answers, from 1 to 100",
        ),
    }
}

/// Put a version on trial beside the active one: a `shadow` runs on every
/// call after the active version (a hook's writes, an enricher's events, a
/// transformer's deliveries; never changing them) and what it answers is
/// compared and counted; a `canary` answers `percent` percent of calls.
/// One trial per plugin.
#[utoipa::path(put, path = "/v1/plugins/{name}/trial", tag = "plugins",
    params(("name" = String, Path)),
    request_body = TrialRequest,
    responses((status = 200, body = PluginDetail), (status = 404, body = Problem)),
    security(("bearer" = [])))]
async fn start_trial(
    State(state): State<SharedState>,
    principal: Principal,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<TrialRequest>,
) -> ApiResult<Json<PluginDetail>> {
    let tenant = principal.tenant_with(Role::Admin)?;
    let name = plugin_name(&name)?;
    let trial = trial_of(Some(body.mode), body.percent)?.unwrap_or(store::Trial::Shadow);
    if !store::start_trial(&state.pool, tenant.as_str(), name, body.version, trial).await? {
        return Err(ApiError::not_found(format!(
            "plugin {name} has no version {} to try beside another active version",
            body.version
        )));
    }
    state.plugins.forget_trials(tenant.as_str(), name);
    state.plugins.changed(tenant.as_str(), name);
    tracing::info!(tenant = %tenant, plugin = %name, version = body.version, mode = trial.mode(), "plugin version on trial");
    Ok(Json(detail(&state, tenant.as_str(), name).await?))
}

/// End the trial (roll it back): the active version answers every call.
#[utoipa::path(delete, path = "/v1/plugins/{name}/trial", tag = "plugins",
    params(("name" = String, Path)),
    responses((status = 200, body = PluginDetail), (status = 404, body = Problem)),
    security(("bearer" = [])))]
async fn end_trial(
    State(state): State<SharedState>,
    principal: Principal,
    Path(name): Path<String>,
) -> ApiResult<Json<PluginDetail>> {
    finish_trial(state, principal, name, false).await
}

/// Promote the version on trial: it becomes the active version.
#[utoipa::path(post, path = "/v1/plugins/{name}/trial/promote", tag = "plugins",
    params(("name" = String, Path)),
    responses((status = 200, body = PluginDetail), (status = 404, body = Problem)),
    security(("bearer" = [])))]
async fn promote_trial(
    State(state): State<SharedState>,
    principal: Principal,
    Path(name): Path<String>,
) -> ApiResult<Json<PluginDetail>> {
    finish_trial(state, principal, name, true).await
}

async fn finish_trial(
    state: SharedState,
    principal: Principal,
    name: String,
    promote: bool,
) -> ApiResult<Json<PluginDetail>> {
    let tenant = principal.tenant_with(Role::Admin)?;
    let name = plugin_name(&name)?;
    let Some(active) = store::end_trial(&state.pool, tenant.as_str(), name, promote).await? else {
        return Err(ApiError::not_found(format!(
            "plugin {name} has no version on trial"
        )));
    };
    // The detail shows what the trial did until now; then it is forgotten.
    let shown = detail(&state, tenant.as_str(), name).await?;
    state.plugins.forget_trials(tenant.as_str(), name);
    state.plugins.changed(tenant.as_str(), name);
    tracing::info!(tenant = %tenant, plugin = %name, active, promote, "plugin trial ended");
    Ok(Json(shown))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct LogsQuery {
    /// Lines after this id (the `next` of the previous page; 0 from the start).
    #[param(minimum = 0)]
    after: Option<i64>,
    /// 1-1000, default 100.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
struct LogPage {
    /// Oldest first.
    items: Vec<LogRow>,
    /// Pass as `after` to read on (also to follow: lines logged later).
    next: i64,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct CallsQuery {
    /// The `nextCursor` of the previous page.
    after: Option<String>,
    /// 1-1000, default 100.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct CallPage {
    /// Newest first.
    items: Vec<CallRow>,
    /// Pass as `after` for the next page; null when this page was not full.
    next_cursor: Option<String>,
}

/// What the plugin logged (its newest 1,000 lines, of the last 3 days),
/// oldest first, with the version and request id of each line.
#[utoipa::path(get, path = "/v1/plugins/{name}/logs", tag = "plugins",
    params(("name" = String, Path), LogsQuery),
    responses((status = 200, body = LogPage), (status = 404, body = Problem)),
    security(("bearer" = [])))]
async fn plugin_logs(
    State(state): State<SharedState>,
    principal: Principal,
    Path(name): Path<String>,
    Query(q): Query<LogsQuery>,
) -> ApiResult<Json<LogPage>> {
    let tenant = principal.tenant_with(Role::Admin)?;
    let name = known_plugin(&state, tenant.as_str(), &name).await?;
    let limit = super::page_limit(q.limit)?;
    let after = q.after.unwrap_or(0).max(0);
    let items = calls::read_logs(&state.pool, tenant.as_str(), name, after, limit)
        .await
        .map_err(StorageError::Db)?;
    let next = items.last().map_or(after, |l| l.id);
    Ok(Json(LogPage { items, next }))
}

/// The plugin's recorded calls, newest first: the manifest's `record`
/// (`"failures"`, `"all"` or a share of calls) says which; the newest 200
/// of the last 7 days are kept, `x-encrypted` values redacted.
#[utoipa::path(get, path = "/v1/plugins/{name}/calls", tag = "plugins",
    params(("name" = String, Path), CallsQuery),
    responses((status = 200, body = CallPage), (status = 404, body = Problem)),
    security(("bearer" = [])))]
async fn plugin_calls(
    State(state): State<SharedState>,
    principal: Principal,
    Path(name): Path<String>,
    Query(q): Query<CallsQuery>,
) -> ApiResult<Json<CallPage>> {
    let tenant = principal.tenant_with(Role::Admin)?;
    let name = known_plugin(&state, tenant.as_str(), &name).await?;
    let limit = super::page_limit(q.limit)?;
    let before = match &q.after {
        Some(a) => Some(a.parse::<uuid::Uuid>().map_err(|_| {
            ApiError::bad_request("after must be the nextCursor of a previous page")
        })?),
        None => None,
    };
    let items = calls::read_calls(&state.pool, tenant.as_str(), name, before, limit)
        .await
        .map_err(StorageError::Db)?;
    let next_cursor = (items.len() as i64 == limit)
        .then(|| items.last().map(|c| c.id.to_string()))
        .flatten();
    Ok(Json(CallPage { items, next_cursor }))
}

/// One recorded call: what `bss plugin replay` runs again.
#[utoipa::path(get, path = "/v1/plugins/{name}/calls/{id}", tag = "plugins",
    params(("name" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = CallRow), (status = 404, body = Problem)),
    security(("bearer" = [])))]
async fn plugin_call(
    State(state): State<SharedState>,
    principal: Principal,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Json<CallRow>> {
    let tenant = principal.tenant_with(Role::Admin)?;
    let name = plugin_name(&name)?;
    let missing = || ApiError::not_found(format!("plugin {name} has no recorded call {id:?}"));
    let id = id.parse::<uuid::Uuid>().map_err(|_| missing())?;
    calls::read_call(&state.pool, tenant.as_str(), name, id)
        .await
        .map_err(StorageError::Db)?
        .map(Json)
        .ok_or_else(missing)
}

/// A plugin of the tenant's, or 404.
async fn known_plugin<'a>(state: &SharedState, tenant: &str, name: &'a str) -> ApiResult<&'a str> {
    let name = plugin_name(name)?;
    store::get(&state.pool, tenant, name)
        .await?
        .map(|_| name)
        .ok_or_else(|| ApiError::not_found(format!("no plugin named {name}")))
}

#[derive(Debug, Serialize, ToSchema)]
struct Uploaded {
    name: String,
    version: i32,
    kind: Kind,
    sha256: String,
    active: bool,
    /// `shadow` or `canary` when uploaded on trial.
    #[serde(skip_serializing_if = "Option::is_none")]
    trial: Option<&'static str>,
}

/// A version on trial and what it did so far (this replica).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct TrialView {
    version: i32,
    mode: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    percent: Option<i16>,
    stats: crate::plugins::trial::TrialStatsView,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct PluginSummary {
    name: String,
    kind: String,
    active_version: Option<i32>,
    /// A version on trial beside the active one.
    #[serde(skip_serializing_if = "Option::is_none")]
    trial: Option<TrialView>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    stats: StatsView,
}

#[derive(Debug, Serialize, ToSchema)]
struct PluginList {
    items: Vec<PluginSummary>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct VersionView {
    version: i32,
    sha256: String,
    size: i32,
    #[schema(value_type = Object)]
    manifest: Value,
    created_at: DateTime<Utc>,
    created_by: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct PluginDetail {
    #[serde(flatten)]
    summary: PluginSummary,
    versions: Vec<VersionView>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Activate {
    version: i32,
}

/// The multipart upload, for the OpenAPI document: these two parts only.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct UploadForm {
    /// The manifest (JSON).
    manifest: Manifest,
    /// The component (`application/wasm`).
    #[schema(value_type = String, format = Binary)]
    module: Vec<u8>,
}

fn multipart_error(e: MultipartError) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::PayloadTooLarge(format!("the upload is larger than the limit: {e}"));
    }
    ApiError::bad_request(format!("could not read the multipart upload: {e}"))
}

/// The upload's form, or why there is none: 415 for a body that is not
/// `multipart/form-data`, 400 for one without its boundary.
fn upload_form(
    headers: &HeaderMap,
    form: Result<Multipart, MultipartRejection>,
) -> ApiResult<Multipart> {
    let mime = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let is_form = mime
        .split(';')
        .next()
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("multipart/form-data"));
    if !is_form {
        return Err(ApiError::UnsupportedMediaType(format!(
            "send the plugin as multipart/form-data with the parts 'manifest' (JSON) and 'module' (the component), not {}",
            if mime.is_empty() {
                "a body without Content-Type"
            } else {
                mime
            }
        )));
    }
    form.map_err(|e| {
        ApiError::bad_request(format!(
            "the multipart/form-data upload cannot be read ({e}); its Content-Type needs a boundary, as HTTP clients set it for a form"
        ))
    })
}

/// Reads one part, refusing it (422, naming the limit) past `max` bytes.
async fn read_part(
    mut field: axum::extract::multipart::Field<'_>,
    part: &str,
    max: usize,
) -> ApiResult<Vec<u8>> {
    let mut bytes = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
        if bytes.len() + chunk.len() > max {
            return Err(ApiError::unprocessable(
                format!("the {part} is larger than the limit of {max} bytes"),
                vec![FieldError::request(
                    format!("/{part}"),
                    format!("over {max} bytes"),
                )],
            ));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// Upload a plugin: its next version, which becomes active (or goes on
/// trial beside the active one: `?trial=shadow`, `?trial=canary&percent=N`).
#[utoipa::path(post, path = "/v1/plugins", tag = "plugins", params(UploadQuery),
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    responses((status = 201, body = Uploaded),
              (status = 422, body = Problem, description = "not a component, wrong world, too large, limits above the ceiling"),
              (status = 409, body = Problem, description = "the name belongs to a plugin of another kind, or a new name would exceed the plugins a tenant may have")),
    security(("bearer" = [])))]
async fn upload_plugin(
    State(state): State<SharedState>,
    principal: Principal,
    headers: HeaderMap,
    Query(q): Query<UploadQuery>,
    form: Result<Multipart, MultipartRejection>,
) -> ApiResult<(StatusCode, Json<Uploaded>)> {
    let tenant = principal.tenant_with(Role::Admin)?;
    let trial = trial_of(q.trial, q.percent)?;
    let mut form = upload_form(&headers, form)?;
    let (mut manifest, mut module) = (None, None);
    while let Some(field) = form.next_field().await.map_err(multipart_error)? {
        match field.name() {
            Some("manifest") => {
                let bytes = read_part(field, "manifest", MANIFEST_MAX).await?;
                let parsed: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
                    ApiError::unprocessable(
                        format!("the manifest is not valid: {e}"),
                        vec![FieldError::request("/manifest", e.to_string())],
                    )
                })?;
                manifest = Some(parsed);
            }
            Some("module") => {
                let max = state.plugins.settings().max_module_bytes;
                module = Some(read_part(field, "module", max).await?);
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unexpected part {:?}; an upload has the parts `manifest` and `module`",
                    other.unwrap_or_default()
                )));
            }
        }
    }
    let missing = |part: &str| {
        ApiError::unprocessable(
            format!("the upload has no `{part}` part"),
            vec![FieldError::request(format!("/{part}"), "missing")],
        )
    };
    let manifest = manifest.ok_or_else(|| missing("manifest"))?;
    let module = module.ok_or_else(|| missing("module"))?;
    check_bound_resources(&state, tenant, &manifest).await?;
    let kind = manifest.kind;
    let (name, version, sha256) = state
        .plugins
        .upload(tenant, &principal.actor(), manifest, module, trial)
        .await?;
    if trial.is_some() {
        state.plugins.forget_trials(tenant.as_str(), &name);
    }
    tracing::info!(tenant = %tenant, plugin = %name, version, kind = ?kind, sha256 = %sha256,
        trial = trial.map(|t| t.mode()), "plugin uploaded");
    Ok((
        StatusCode::CREATED,
        Json(Uploaded {
            name,
            version,
            kind,
            sha256,
            active: trial.is_none(),
            trial: trial.map(|t| t.mode()),
        }),
    ))
}

/// A hook or enricher bound to a resource without a schema would never run
/// (a typo such as `order` for `orders`): refused, naming the tenant's
/// resources, unless the manifest says `allowMissingResources`.
async fn check_bound_resources(
    state: &SharedState,
    tenant: &crate::domain::TenantId,
    manifest: &Manifest,
) -> ApiResult<()> {
    let bound = matches!(manifest.kind, Kind::ValidationHook | Kind::EventEnricher);
    if !bound || manifest.allow_missing_resources {
        return Ok(());
    }
    let named: Vec<&String> = manifest
        .resources
        .iter()
        .filter(|r| r.as_str() != "*" && !r.starts_with('_'))
        .collect();
    if named.is_empty() {
        return Ok(());
    }
    let existing = crate::storage::schemas::resource_names(&state.pool, tenant).await?;
    let errors: Vec<FieldError> = manifest
        .resources
        .iter()
        .enumerate()
        .filter(|(_, r)| named.contains(r) && !existing.contains(r))
        .map(|(i, r)| {
            FieldError::request(
                format!("/manifest/resources/{i}"),
                format!("the tenant has no resource {r:?}"),
            )
        })
        .collect();
    if errors.is_empty() {
        return Ok(());
    }
    Err(ApiError::unprocessable(
        format!(
            "the plugin is bound to resources without a schema, so it would never run; the tenant's resources: {}; \
             set \"allowMissingResources\": true in the manifest to bind to resources created later",
            if existing.is_empty() {
                "none yet".to_owned()
            } else {
                existing.join(", ")
            }
        ),
        errors,
    ))
}

fn summary(state: &SharedState, tenant: &str, row: store::PluginRow) -> PluginSummary {
    PluginSummary {
        stats: state.plugins.stats_of(tenant, &row.name).view(),
        trial: row.trial_version.map(|version| TrialView {
            version,
            mode: row.trial_mode.clone().unwrap_or_default(),
            percent: row.trial_percent,
            stats: state
                .plugins
                .trial_stats_of(tenant, &row.name, version)
                .view(),
        }),
        name: row.name,
        kind: row.kind,
        active_version: row.active_version,
        created_at: row.created_at,
        updated_at: row.updated_at,
    }
}

/// List the tenant's plugins with their stats.
#[utoipa::path(get, path = "/v1/plugins", tag = "plugins",
    responses((status = 200, body = PluginList)),
    security(("bearer" = [])))]
async fn list_plugins(
    State(state): State<SharedState>,
    principal: Principal,
) -> ApiResult<Json<PluginList>> {
    let tenant = principal.tenant_with(Role::Admin)?;
    let rows = store::list(&state.pool, tenant.as_str()).await?;
    Ok(Json(PluginList {
        items: rows
            .into_iter()
            .map(|r| summary(&state, tenant.as_str(), r))
            .collect(),
    }))
}

fn plugin_name(name: &str) -> ApiResult<&str> {
    if valid_name(name) {
        Ok(name)
    } else {
        Err(ApiError::not_found("no such plugin"))
    }
}

async fn detail(state: &SharedState, tenant: &str, name: &str) -> ApiResult<PluginDetail> {
    let (row, versions) = store::get(&state.pool, tenant, name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no plugin named {name}")))?;
    Ok(PluginDetail {
        summary: summary(state, tenant, row),
        versions: versions
            .into_iter()
            .map(|v| VersionView {
                version: v.version,
                sha256: v.sha256,
                size: v.size,
                manifest: v.manifest,
                created_at: v.created_at,
                created_by: v.created_by,
            })
            .collect(),
    })
}

/// A plugin: its versions, the active one, and its stats (calls, failures
/// by kind, p50/p99 time, last error, circuit breaker).
#[utoipa::path(get, path = "/v1/plugins/{name}", tag = "plugins",
    params(("name" = String, Path)),
    responses((status = 200, body = PluginDetail), (status = 404, body = Problem)),
    security(("bearer" = [])))]
async fn get_plugin(
    State(state): State<SharedState>,
    principal: Principal,
    Path(name): Path<String>,
) -> ApiResult<Json<PluginDetail>> {
    let tenant = principal.tenant_with(Role::Admin)?;
    let name = plugin_name(&name)?;
    Ok(Json(detail(&state, tenant.as_str(), name).await?))
}

/// Make another version active (rollback or roll forward).
#[utoipa::path(put, path = "/v1/plugins/{name}/active", tag = "plugins",
    params(("name" = String, Path)),
    request_body = Activate,
    responses((status = 200, body = PluginDetail), (status = 404, body = Problem)),
    security(("bearer" = [])))]
async fn activate_plugin(
    State(state): State<SharedState>,
    principal: Principal,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<Activate>,
) -> ApiResult<Json<PluginDetail>> {
    let tenant = principal.tenant_with(Role::Admin)?;
    let name = plugin_name(&name)?;
    if !store::activate(&state.pool, tenant.as_str(), name, body.version).await? {
        return Err(ApiError::not_found(format!(
            "plugin {name} has no version {}",
            body.version
        )));
    }
    state.plugins.changed(tenant.as_str(), name);
    tracing::info!(tenant = %tenant, plugin = %name, version = body.version, "plugin version activated");
    Ok(Json(detail(&state, tenant.as_str(), name).await?))
}

/// Delete a plugin and all its versions.
#[utoipa::path(delete, path = "/v1/plugins/{name}", tag = "plugins",
    params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = Problem)),
    security(("bearer" = [])))]
async fn delete_plugin(
    State(state): State<SharedState>,
    principal: Principal,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let tenant = principal.tenant_with(Role::Admin)?;
    let name = plugin_name(&name)?;
    let Some(unused) = store::delete(&state.pool, tenant.as_str(), name).await? else {
        return Err(ApiError::not_found(format!("no plugin named {name}")));
    };
    state.plugins.forget(tenant.as_str(), name, unused).await;
    Ok(StatusCode::NO_CONTENT)
}
