//! `/v1/tenants…`: tenant lifecycle, for platform admins.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::JsonBody;
use crate::app_state::SharedState;
use crate::auth::Principal;
use crate::domain::TenantId;
use crate::error::{ApiError, ApiResult, Problem};
use crate::storage::tenants::{self, Tenant};

pub fn router() -> OpenApiRouter<SharedState> {
    OpenApiRouter::new()
        .routes(routes!(create_tenant))
        .routes(routes!(get_tenant, delete_tenant))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateTenant {
    /// `^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$`
    id: String,
    name: Option<String>,
}

/// Provision a tenant: its Postgres schema is created at once.
#[utoipa::path(post, path = "/v1/tenants", tag = "tenants", request_body = CreateTenant,
    responses((status = 201, body = Tenant), (status = 409, body = Problem), (status = 400, body = Problem)),
    security(("bearer" = [])))]
async fn create_tenant(
    State(state): State<SharedState>,
    principal: Principal,
    JsonBody(body): JsonBody<CreateTenant>,
) -> ApiResult<(StatusCode, Json<Tenant>)> {
    principal.require_platform_admin()?;
    let id = TenantId::parse(&body.id)?;
    let name = body.name.unwrap_or_else(|| body.id.clone());
    if name.len() > 200 {
        return Err(ApiError::bad_request(
            "a tenant name has at most 200 characters",
        ));
    }
    let tenant = tenants::create(&state.pool, &id, &name, &state.settings.analytics_role)
        .await?
        .ok_or_else(|| ApiError::conflict(format!("tenant {id} already exists")))?;
    state.schemas.forget_tenant(&id);
    Ok((StatusCode::CREATED, Json(tenant)))
}

/// A tenant and its status (`active` or `archived`).
#[utoipa::path(get, path = "/v1/tenants/{id}", tag = "tenants", params(("id" = String, Path)),
    responses((status = 200, body = Tenant), (status = 404, body = Problem)),
    security(("bearer" = [])))]
async fn get_tenant(
    State(state): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<Tenant>> {
    principal.require_platform_admin()?;
    let id = TenantId::parse(&id).map_err(|_| ApiError::not_found("tenant not found"))?;
    tenants::get(&state.pool, &id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("tenant {id} not found")))
}

/// Archive a tenant at once; its data is dropped after the grace period.
#[utoipa::path(delete, path = "/v1/tenants/{id}", tag = "tenants", params(("id" = String, Path)),
    responses((status = 202, body = Tenant), (status = 404, body = Problem)),
    security(("bearer" = [])))]
async fn delete_tenant(
    State(state): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Tenant>)> {
    principal.require_platform_admin()?;
    let id = TenantId::parse(&id).map_err(|_| ApiError::not_found("tenant not found"))?;
    if !tenants::archive(&state.pool, &id, state.settings.tenant_grace_secs).await? {
        return Err(ApiError::not_found(format!("no active tenant {id}")));
    }
    state.schemas.forget_tenant(&id);
    let tenant = tenants::get(&state.pool, &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("tenant {id} not found")))?;
    Ok((StatusCode::ACCEPTED, Json(tenant)))
}
