//! `/v1/tenants…`: tenant lifecycle, for platform admins.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::JsonBody;
use super::tenant_gate::{RateLimitOverrides, RateLimits, check_overrides};
use crate::app_state::SharedState;
use crate::auth::Principal;
use crate::domain::TenantId;
use crate::error::{ApiError, ApiResult, Problem};
use crate::plugins::TenantCeilings;
use crate::storage::tenants::{self, Tenant};

pub fn router() -> OpenApiRouter<SharedState> {
    OpenApiRouter::new()
        .routes(routes!(create_tenant))
        .routes(routes!(get_tenant, delete_tenant))
        .routes(routes!(get_plugin_ceilings, put_plugin_ceilings))
        .routes(routes!(get_rate_limits, put_rate_limits))
}

/// A tenant's rate limits as they apply.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct RateLimitsView {
    /// What was set for the tenant (absent: the installation's).
    own: RateLimitOverrides,
    #[serde(flatten)]
    applied: RateLimits,
}

async fn rate_limits_view(state: &SharedState, id: &TenantId) -> ApiResult<RateLimitsView> {
    let own = tenants::rate_limits(&state.pool, id.as_str())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no active tenant {id}")))?;
    let own: RateLimitOverrides = serde_json::from_value(own).unwrap_or_default();
    Ok(RateLimitsView {
        own,
        applied: state.gate.defaults().with(&own),
    })
}

/// The rate limits the tenant's requests and plugin uploads are held to.
#[utoipa::path(get, path = "/v1/tenants/{id}/rate-limits", tag = "tenants", params(("id" = String, Path)),
    responses((status = 200, body = RateLimitsView), (status = 404, body = Problem)),
    security(("bearer" = [])))]
async fn get_rate_limits(
    State(state): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<RateLimitsView>> {
    principal.require_platform_admin()?;
    let id = TenantId::parse(&id).map_err(|_| ApiError::not_found("tenant not found"))?;
    Ok(Json(rate_limits_view(&state, &id).await?))
}

/// Set the tenant's own rate limits, replacing those set before (an absent
/// one is the installation's; a rate of 0 is no limit). Applies within a
/// second on every replica.
#[utoipa::path(put, path = "/v1/tenants/{id}/rate-limits", tag = "tenants", params(("id" = String, Path)),
    request_body = RateLimitOverrides,
    responses((status = 200, body = RateLimitsView), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
async fn put_rate_limits(
    State(state): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<RateLimitOverrides>,
) -> ApiResult<Json<RateLimitsView>> {
    principal.require_platform_admin()?;
    let id = TenantId::parse(&id).map_err(|_| ApiError::not_found("tenant not found"))?;
    check_overrides(state.gate.defaults(), &body)
        .map_err(|errors| ApiError::unprocessable("the rate limits are not valid", errors))?;
    let value = serde_json::to_value(body).map_err(anyhow::Error::from)?;
    if !tenants::set_rate_limits(&state.pool, id.as_str(), &value).await? {
        return Err(ApiError::not_found(format!("no active tenant {id}")));
    }
    state.gate.refresh(id.as_str());
    Ok(Json(rate_limits_view(&state, &id).await?))
}

/// A tenant's plugin ceilings as they apply.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct PluginCeilings {
    /// What was set for the tenant (absent: the installation's).
    own: TenantCeilings,
    deadline_ms: u64,
    fuel: u64,
    memory_mib: u64,
}

async fn ceilings_view(state: &SharedState, id: &TenantId) -> ApiResult<PluginCeilings> {
    let own = crate::storage::plugins::ceilings(&state.pool, id.as_str())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no active tenant {id}")))?;
    let own: TenantCeilings = serde_json::from_value(own).unwrap_or_default();
    let applied = state.plugins.settings().ceilings.for_tenant(&own);
    Ok(PluginCeilings {
        own,
        deadline_ms: applied.deadline_ms,
        fuel: applied.fuel,
        memory_mib: applied.memory_mib,
    })
}

/// The ceilings the tenant's plugin manifests are held to.
#[utoipa::path(get, path = "/v1/tenants/{id}/plugin-ceilings", tag = "tenants", params(("id" = String, Path)),
    responses((status = 200, body = PluginCeilings), (status = 404, body = Problem)),
    security(("bearer" = [])))]
async fn get_plugin_ceilings(
    State(state): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<PluginCeilings>> {
    principal.require_platform_admin()?;
    let id = TenantId::parse(&id).map_err(|_| ApiError::not_found("tenant not found"))?;
    Ok(Json(ceilings_view(&state, &id).await?))
}

/// Set the tenant's own plugin ceilings (each at most the installation's).
/// Active plugins above them are held to them at once.
#[utoipa::path(put, path = "/v1/tenants/{id}/plugin-ceilings", tag = "tenants", params(("id" = String, Path)),
    request_body = TenantCeilings,
    responses((status = 200, body = PluginCeilings), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
async fn put_plugin_ceilings(
    State(state): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<TenantCeilings>,
) -> ApiResult<Json<PluginCeilings>> {
    principal.require_platform_admin()?;
    let id = TenantId::parse(&id).map_err(|_| ApiError::not_found("tenant not found"))?;
    state
        .plugins
        .settings()
        .ceilings
        .admit(&body)
        .map_err(|errors| ApiError::unprocessable("the ceilings are not valid", errors))?;
    let value = serde_json::to_value(body).map_err(anyhow::Error::from)?;
    if !crate::storage::plugins::set_ceilings(&state.pool, id.as_str(), &value).await? {
        return Err(ApiError::not_found(format!("no active tenant {id}")));
    }
    state.plugins.invalidate(id.as_str());
    Ok(Json(ceilings_view(&state, &id).await?))
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
    if let Some(why) = id.reserved() {
        return Err(ApiError::bad_request(why));
    }
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
    state.gate.reset(id.as_str());
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
    state.gate.forget(id.as_str());
    let tenant = tenants::get(&state.pool, &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("tenant {id} not found")))?;
    Ok((StatusCode::ACCEPTED, Json(tenant)))
}
