//! `/v1/schemas…`: resource schemas, versioned. A change is checked by the
//! Validation Service (or the local meta-schema check), compiled, checked
//! against every stored record, then applied as the next version.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::JsonBody;
use crate::app_state::SharedState;
use crate::auth::{Principal, Role};
use crate::catalog::CompiledSchema;
use crate::domain::ResourceName;
use crate::error::{ApiError, ApiResult, Problem};
use crate::services::SchemaCheck;
use crate::storage::schemas::{self, Applied, SchemaVersion};

pub fn router() -> OpenApiRouter<SharedState> {
    OpenApiRouter::new()
        .routes(routes!(list_schemas))
        .routes(routes!(get_schema, put_schema))
        .routes(routes!(list_versions))
        .routes(routes!(get_version))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PutSchema {
    /// A JSON Schema (draft 2020-12) with `"type": "object"`.
    #[schema(value_type = Object)]
    schema: Value,
}

#[derive(Debug, Serialize, ToSchema)]
struct SchemaList {
    items: Vec<SchemaVersion>,
}

/// Define or change a resource's schema (a new version).
#[utoipa::path(put, path = "/v1/schemas/{resource}", tag = "schemas",
    params(("resource" = String, Path, description = "^[a-z][a-z0-9_]{0,62}$")),
    request_body = PutSchema,
    responses((status = 201, body = SchemaVersion, description = "new version"),
              (status = 200, body = SchemaVersion, description = "unchanged"),
              (status = 409, body = Problem, description = "stored records would break"),
              (status = 422, body = Problem), (status = 503, body = Problem)),
    security(("bearer" = [])))]
async fn put_schema(
    State(state): State<SharedState>,
    principal: Principal,
    Path(resource): Path<String>,
    headers: axum::http::HeaderMap,
    JsonBody(body): JsonBody<PutSchema>,
) -> ApiResult<(StatusCode, Json<SchemaVersion>)> {
    let tenant = principal.tenant_with(Role::Admin)?;
    let resource = ResourceName::parse(&resource)?;
    match state
        .validation
        .check_schema_for(tenant.as_str(), resource.as_str(), &body.schema)
        .await
    {
        SchemaCheck::Valid => {}
        SchemaCheck::Invalid(errors) => {
            return Err(ApiError::unprocessable("the schema is not valid", errors));
        }
        SchemaCheck::Unavailable {
            reason,
            retry_after,
        } => {
            return Err(ApiError::Unavailable {
                detail: format!("the schema could not be validated: {reason}; try again later"),
                retry_after_secs: retry_after.as_secs().max(1),
            });
        }
    }
    let compiled = CompiledSchema::compile(body.schema, 0, Utc::now(), principal.actor())
        .map_err(|errors| ApiError::unprocessable("the schema is not valid", errors))?;
    let events = super::event_context(&state, &headers);
    let actor = principal.actor();
    let max_pending = state.tasks.max_pending();
    let applied = schemas::apply(
        &state.pool,
        tenant,
        &resource,
        &compiled,
        &actor,
        &events,
        max_pending,
    )
    .await?;
    match applied {
        Applied::Created(v) => {
            state.event_log.written(1);
            state.tasks.wake();
            let fresh = CompiledSchema::compile(
                v.schema.clone(),
                v.version,
                v.created_at,
                v.created_by.clone(),
            )
            .map_err(|e| {
                ApiError::Internal(anyhow::anyhow!("applied schema does not compile: {e:?}"))
            })?;
            state.schemas.put(tenant, &resource, Arc::new(fresh));
            Ok((StatusCode::CREATED, Json(v)))
        }
        Applied::Unchanged(v) => Ok((StatusCode::OK, Json(v))),
        Applied::Incompatible(errors) => {
            let records: std::collections::BTreeSet<_> =
                errors.iter().filter_map(|e| e.record_id.clone()).collect();
            Err(ApiError::Conflict {
                detail: format!(
                    "the change would make stored records invalid ({}); fix or delete them first, or relax the schema",
                    records.into_iter().collect::<Vec<_>>().join(", ")
                ),
                errors,
            })
        }
    }
}

/// The current version of every resource's schema.
#[utoipa::path(get, path = "/v1/schemas", tag = "schemas",
    responses((status = 200, body = SchemaList)), security(("bearer" = [])))]
async fn list_schemas(
    State(state): State<SharedState>,
    principal: Principal,
) -> ApiResult<Json<SchemaList>> {
    let tenant = principal.tenant_with(Role::Reader)?;
    Ok(Json(SchemaList {
        items: schemas::list_current(&state.pool, tenant).await?,
    }))
}

/// The current version of a resource's schema.
#[utoipa::path(get, path = "/v1/schemas/{resource}", tag = "schemas",
    params(("resource" = String, Path)),
    responses((status = 200, body = SchemaVersion), (status = 404, body = Problem)),
    security(("bearer" = [])))]
async fn get_schema(
    State(state): State<SharedState>,
    principal: Principal,
    Path(resource): Path<String>,
) -> ApiResult<Json<SchemaVersion>> {
    let tenant = principal.tenant_with(Role::Reader)?;
    let resource = ResourceName::parse(&resource)?;
    schemas::current(&state.pool, tenant, &resource)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no schema for {resource}")))
}

/// Every version of a resource's schema, oldest first.
#[utoipa::path(get, path = "/v1/schemas/{resource}/versions", tag = "schemas",
    params(("resource" = String, Path)),
    responses((status = 200, body = SchemaList), (status = 404, body = Problem)),
    security(("bearer" = [])))]
async fn list_versions(
    State(state): State<SharedState>,
    principal: Principal,
    Path(resource): Path<String>,
) -> ApiResult<Json<SchemaList>> {
    let tenant = principal.tenant_with(Role::Reader)?;
    let resource = ResourceName::parse(&resource)?;
    let items = schemas::versions(&state.pool, tenant, &resource).await?;
    if items.is_empty() {
        return Err(ApiError::not_found(format!("no schema for {resource}")));
    }
    Ok(Json(SchemaList { items }))
}

/// One version of a resource's schema.
#[utoipa::path(get, path = "/v1/schemas/{resource}/versions/{version}", tag = "schemas",
    params(("resource" = String, Path), ("version" = i32, Path)),
    responses((status = 200, body = SchemaVersion), (status = 404, body = Problem)),
    security(("bearer" = [])))]
async fn get_version(
    State(state): State<SharedState>,
    principal: Principal,
    Path((resource, version)): Path<(String, String)>,
) -> ApiResult<Json<SchemaVersion>> {
    let tenant = principal.tenant_with(Role::Reader)?;
    let resource = ResourceName::parse(&resource)?;
    let version: i32 = version
        .parse()
        .map_err(|_| ApiError::bad_request("the version must be a whole number"))?;
    schemas::version(&state.pool, tenant, &resource, version)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("{resource} has no schema version {version}")))
}
