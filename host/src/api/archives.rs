//! Tenant export and import over the API, for platform admins: the same
//! archive as `bss tenant export|import` (see `crate::archive`), made and
//! read by jobs (`crate::archive::jobs`) whose progress any replica shows.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app_state::SharedState;
use crate::archive::export::{self, hex};
use crate::archive::import;
use crate::archive::jobs::{self, Job, NotStarted};
use crate::auth::Principal;
use crate::domain::TenantId;
use crate::error::{ApiError, ApiResult, Problem};

/// The path of the upload, which has its own body limits.
pub const IMPORT_PATH: &str = "/v1/tenants/import";

pub fn router() -> OpenApiRouter<SharedState> {
    OpenApiRouter::new()
        .routes(routes!(export_tenant))
        .routes(routes!(import_tenant))
        .routes(routes!(get_job))
        .routes(routes!(download))
}

/// A tenant archive (a zstd-compressed tar), for the OpenAPI document.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
struct Archive(Vec<u8>);

/// What goes into an export besides what always does.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct ExportRequest {
    /// The tenant's event log too, as far as it is kept (default false).
    with_events: bool,
    /// Leave webhook endpoints' secrets out (default false): an import
    /// disables each endpoint until its secret is rotated.
    without_webhook_secrets: bool,
}

fn job_location(job: &Job) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Ok(at) = HeaderValue::from_str(&format!("/v1/archive-jobs/{}", job.id)) {
        headers.insert(header::LOCATION, at);
    }
    headers
}

impl From<NotStarted> for ApiError {
    fn from(e: NotStarted) -> Self {
        match e {
            NotStarted::Busy => ApiError::RateLimited {
                detail: e.to_string(),
                retry_after_secs: 5,
                policy: String::new(),
                limit: String::new(),
            },
            NotStarted::Failed(e) => ApiError::Internal(e),
        }
    }
}

/// Export a tenant: starts a job that writes the tenant's whole state
/// (from one snapshot, while writes go on) into an archive; follow it at
/// `Location`, then download it from `…/archive`.
#[utoipa::path(post, path = "/v1/tenants/{id}/export", tag = "tenants", params(("id" = String, Path)),
    request_body(content = ExportRequest, description = "optional"),
    responses((status = 202, body = Job, headers(("Location" = String))), (status = 404, body = Problem),
        (status = 409, body = Problem), (status = 429, body = Problem)),
    security(("bearer" = [])))]
async fn export_tenant(
    State(state): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, HeaderMap, Json<Job>)> {
    principal.require_platform_admin()?;
    let id = TenantId::parse(&id).map_err(|_| ApiError::not_found("tenant not found"))?;
    match crate::storage::tenants::get(&state.pool, &id).await? {
        Some(t) if t.status == "active" => {}
        Some(t) => {
            return Err(ApiError::conflict(format!(
                "tenant {id} is {}: only an active tenant is exported",
                t.status
            )));
        }
        None => return Err(ApiError::not_found(format!("tenant {id} not found"))),
    }
    // The body is optional.
    let asked: ExportRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ExportRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("the body is not an export request: {e}")))?
    };
    let options = export::Options {
        webhook_secrets: !asked.without_webhook_secrets,
        events: asked.with_events,
    };
    let job = jobs::start_export(&state, id, options, &principal.actor()).await?;
    Ok((StatusCode::ACCEPTED, job_location(&job), Json(job)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
struct ImportParams {
    /// Import under this tenant id instead of the archive's.
    #[serde(rename = "as")]
    #[param(pattern = r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")]
    as_id: Option<String>,
    /// Skip validating records against their schemas (an archive this
    /// product wrote; checksums are still verified).
    #[serde(default)]
    trust: bool,
}

/// Import a tenant: the body is an archive as an export wrote it (any
/// content type; `application/zstd` or `application/octet-stream`). Once it is uploaded, a job puts it in, all or
/// nothing; follow it at `Location`. The upload may take as long as it
/// needs while bytes keep coming (a pause longer than the body timeout
/// ends it) and is at most `BSS_IMPORT_MAX_BYTES`.
#[utoipa::path(post, path = "/v1/tenants/import", tag = "tenants", params(ImportParams),
    request_body(content = Archive, content_type = "application/octet-stream",
        description = "the archive as an export wrote it (sent as application/zstd or application/octet-stream)"),
    responses((status = 202, body = Job, headers(("Location" = String))), (status = 409, body = Problem),
        (status = 413, body = Problem), (status = 422, body = Problem), (status = 429, body = Problem)),
    security(("bearer" = [])))]
async fn import_tenant(
    State(state): State<SharedState>,
    principal: Principal,
    Query(params): Query<ImportParams>,
    body: Body,
) -> ApiResult<(StatusCode, HeaderMap, Json<Job>)> {
    principal.require_platform_admin()?;
    let as_id = params
        .as_id
        .as_deref()
        .map(TenantId::parse)
        .transpose()
        .map_err(|_| ApiError::bad_request("as: not a tenant id"))?;
    let file = jobs::upload_file(&state)?;
    let result: ApiResult<Job> = async {
        let upload = receive(&state, body, &file).await?;
        // Not a tenant archive this build reads: refused before any job.
        let input =
            std::io::BufReader::new(std::fs::File::open(&file).map_err(anyhow::Error::from)?);
        let exported_as = import::tenant_of(input).map_err(|e| {
            ApiError::unprocessable(format!("the upload is refused: {e:#}"), vec![])
        })?;
        let tenant = as_id.clone().unwrap_or(exported_as);
        if let Some(why) = tenant.reserved() {
            return Err(ApiError::unprocessable(
                format!("{why}; import it under another id (?as=…)"),
                vec![],
            ));
        }
        if crate::storage::tenants::get(&state.pool, &tenant)
            .await?
            .is_some()
        {
            return Err(ApiError::conflict(format!(
                "tenant {tenant} exists here; import under another id (?as=…) or delete it and wait until it is dropped"
            )));
        }
        let options = import::Options {
            as_id: as_id.clone(),
            trust: params.trust,
        };
        Ok(jobs::start_import(&state, file.clone(), upload, tenant, options, &principal.actor()).await?)
    }
    .await;
    match result {
        Ok(job) => Ok((StatusCode::ACCEPTED, job_location(&job), Json(job))),
        Err(e) => {
            let _ = tokio::fs::remove_file(&file).await;
            Err(e)
        }
    }
}

/// The request body into `file`, within the import's limits: its size and
/// SHA-256.
async fn receive(
    state: &SharedState,
    body: Body,
    file: &std::path::Path,
) -> ApiResult<(u64, String)> {
    let limit = state.settings.import_max_bytes;
    let idle = std::time::Duration::from_millis(state.settings.http_body_timeout_ms);
    let mut out = tokio::fs::File::create(file)
        .await
        .map_err(anyhow::Error::from)?;
    let (mut bytes, mut hash) = (0u64, Sha256::new());
    let mut stream = body.into_data_stream();
    loop {
        let next = tokio::time::timeout(idle, stream.next())
            .await
            .map_err(|_| {
                ApiError::bad_request(format!(
                    "the upload paused for more than {} ms",
                    idle.as_millis()
                ))
            })?;
        let Some(chunk) = next else { break };
        let chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("the upload broke off: {e}")))?;
        bytes += chunk.len() as u64;
        if bytes > limit {
            return Err(ApiError::PayloadTooLarge(format!(
                "an archive upload is at most {limit} bytes (BSS_IMPORT_MAX_BYTES)"
            )));
        }
        hash.update(&chunk);
        out.write_all(&chunk).await.map_err(anyhow::Error::from)?;
    }
    out.sync_all().await.map_err(anyhow::Error::from)?;
    if bytes == 0 {
        return Err(ApiError::unprocessable(
            "the upload is refused: it is empty, not a tenant archive",
            vec![],
        ));
    }
    Ok((bytes, hex(&hash.finalize())))
}

/// An export or import job: status, progress (records done of all), and
/// when done what the archive holds or what was imported.
#[utoipa::path(get, path = "/v1/archive-jobs/{id}", tag = "tenants", params(("id" = String, Path)),
    responses((status = 200, body = Job), (status = 404, body = Problem)),
    security(("bearer" = [])))]
async fn get_job(
    State(state): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<Job>> {
    principal.require_platform_admin()?;
    Ok(Json(job(&state, &id).await?))
}

async fn job(state: &SharedState, id: &str) -> ApiResult<Job> {
    let missing = || ApiError::not_found(format!("no archive job {id}"));
    let id = uuid::Uuid::parse_str(id).map_err(|_| missing())?;
    jobs::get(&state.pool, id)
        .await
        .map_err(anyhow::Error::from)?
        .ok_or_else(missing)
}

/// The archive a finished export wrote (`application/zstd`; its SHA-256
/// is the `ETag` and the job's `sha256`).
#[utoipa::path(get, path = "/v1/archive-jobs/{id}/archive", tag = "tenants", params(("id" = String, Path)),
    responses((status = 200, content_type = "application/zstd", body = Archive), (status = 404, body = Problem),
        (status = 409, body = Problem)),
    security(("bearer" = [])))]
async fn download(
    State(state): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    principal.require_platform_admin()?;
    let job = job(&state, &id).await?;
    if job.kind != "export" {
        return Err(ApiError::not_found(
            "an import job has no archive to download",
        ));
    }
    match job.status.as_str() {
        "done" => {}
        "running" => {
            return Err(ApiError::conflict(format!(
                "the export is running ({} of {} records); download it when it is done",
                job.records_done,
                job.records_total
                    .map_or_else(|| "?".to_owned(), |n| n.to_string())
            )));
        }
        _ => {
            return Err(ApiError::conflict(format!(
                "the export failed: {}",
                job.error.unwrap_or_default()
            )));
        }
    }
    // Part by part: one part in memory at a time.
    let pool = state.pool.clone();
    let parts = futures_util::stream::unfold(Some(1), move |next| {
        let pool = pool.clone();
        async move {
            let n = next?;
            match jobs::part(&pool, job.id, n).await {
                Ok(Some(bytes)) => Some((Ok(bytes), Some(n + 1))),
                Ok(None) => None,
                Err(e) => Some((Err(e), None)),
            }
        }
    });
    let sha256 = job.sha256.unwrap_or_default();
    let mut response = Body::from_stream(parts).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/zstd"),
    );
    if let Some(bytes) = job.bytes {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes));
    }
    for (name, value) in [
        (header::ETAG, format!("\"{sha256}\"")),
        (
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{}.tenant.tar.zst\"", job.tenant),
        ),
    ] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    Ok(response)
}
