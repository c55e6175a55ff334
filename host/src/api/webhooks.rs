//! `/v1/webhooks…` (admin): a tenant's endpoints, their secrets, their
//! delivery log, retries and replays. See `crate::webhooks` for sending.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::extract::JsonBody;
use crate::app_state::SharedState;
use crate::auth::{Principal, Role};
use crate::domain::{ResourceName, TenantId};
use crate::error::{ApiError, ApiResult, FieldError, Problem};
use crate::storage::webhooks::{
    self as store, AttemptRow, Delivery, DeliveryFilter, Endpoint, Fields,
};
use crate::webhooks::{self as hooks, sign};

const STATUSES: [&str; 4] = ["pending", "succeeded", "failed", "cancelled"];
const MAX_URL: usize = 2048;
const MAX_TYPES: usize = 50;
const MAX_DESCRIPTION: usize = 1000;
const MAX_RATE: i32 = 10_000;
/// Events one replay reads; more: replay again from `continueFrom`.
const REPLAY_MAX: i64 = 10_000;

pub fn router() -> OpenApiRouter<SharedState> {
    OpenApiRouter::new()
        .routes(routes!(create_webhook, list_webhooks))
        .routes(routes!(get_webhook, patch_webhook, delete_webhook))
        .routes(routes!(rotate_secret))
        .routes(routes!(list_deliveries))
        .routes(routes!(get_delivery))
        .routes(routes!(retry_delivery))
        .routes(routes!(replay))
}

/// An endpoint as registered or changed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WebhookInput {
    /// https (http only where the operator allows it); refused when it or
    /// an address its host resolves to is not public.
    url: String,
    /// Event types: exact (`business_store.data.created`), a prefix
    /// (`business_store.data.*`) or `*`.
    events: Vec<String>,
    /// Only events of these resources (all when absent or null).
    #[serde(default)]
    resources: Option<Vec<String>>,
    /// A `webhook-transformer` plugin of the tenant, run before each attempt.
    #[serde(default)]
    transformer: Option<String>,
    #[serde(default)]
    description: Option<String>,
    /// One delivery at a time, in log order (a failing one holds the rest).
    #[serde(default)]
    fifo: Option<bool>,
    /// Attempts started per second, at most (per replica).
    #[serde(default)]
    rate_limit_per_sec: Option<i32>,
    /// Disabled endpoints get no deliveries (default true).
    #[serde(default)]
    enabled: Option<bool>,
}

/// An endpoint as its tenant sees it (never its secrets, but once).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct WebhookView {
    #[schema(value_type = String)]
    id: Uuid,
    url: String,
    events: Vec<String>,
    resources: Option<Vec<String>>,
    transformer: Option<String>,
    description: String,
    fifo: bool,
    rate_limit_per_sec: Option<i32>,
    enabled: bool,
    /// Why it was disabled (410 Gone, failing too long), if it was.
    disabled_reason: Option<String>,
    /// Since when every attempt has failed.
    failing_since: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    /// The signing secret: in the answer to the creation only.
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
}

impl From<Endpoint> for WebhookView {
    fn from(e: Endpoint) -> Self {
        Self {
            id: e.id,
            url: e.url,
            events: e.events,
            resources: e.resources,
            transformer: e.transformer,
            description: e.description,
            fifo: e.fifo,
            rate_limit_per_sec: e.rate_limit_per_sec,
            enabled: e.enabled,
            disabled_reason: e.disabled_reason,
            failing_since: e.failing_since,
            created_at: e.created_at,
            updated_at: e.updated_at,
            secret: None,
        }
    }
}

fn input_of(e: &Endpoint) -> WebhookInput {
    WebhookInput {
        url: e.url.clone(),
        events: e.events.clone(),
        resources: e.resources.clone(),
        transformer: e.transformer.clone(),
        description: Some(e.description.clone()),
        fifo: Some(e.fifo),
        rate_limit_per_sec: e.rate_limit_per_sec,
        enabled: Some(e.enabled),
    }
}

fn valid_type(t: &str) -> bool {
    let name = t.strip_suffix(".*").unwrap_or(t);
    t == "*"
        || (!name.is_empty()
            && t.len() <= 200
            && name.split('.').all(|part| {
                !part.is_empty()
                    && part.chars().all(|c| {
                        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-'
                    })
            }))
}

/// Checks an endpoint's fields, every problem at once.
/// A change checks again only what it changes (a paused endpoint whose
/// host no longer resolves can still be paused).
async fn validate(
    state: &SharedState,
    tenant: &TenantId,
    input: WebhookInput,
    before: Option<&Endpoint>,
) -> ApiResult<Fields> {
    let mut errors = Vec::new();
    if input.url.len() > MAX_URL {
        errors.push(FieldError::request(
            "/url",
            format!("at most {MAX_URL} characters"),
        ));
    } else if before.is_none_or(|b| b.url != input.url)
        && let Err(e) = state.webhooks.guard.check_registration(&input.url).await
    {
        errors.push(FieldError::request("/url", e.to_string()));
    }
    if input.events.is_empty() || input.events.len() > MAX_TYPES {
        errors.push(FieldError::request(
            "/events",
            format!("from 1 to {MAX_TYPES} event types (`*` for all)"),
        ));
    }
    for (i, t) in input.events.iter().enumerate() {
        if !valid_type(t) {
            errors.push(FieldError::request(
                format!("/events/{i}"),
                format!("{t:?} is not an event type, a prefix ending in `.*`, or `*`"),
            ));
        }
    }
    if let Some(resources) = &input.resources {
        if resources.is_empty() || resources.len() > MAX_TYPES {
            errors.push(FieldError::request(
                "/resources",
                format!("from 1 to {MAX_TYPES} resources, or null for all"),
            ));
        }
        for (i, r) in resources.iter().enumerate() {
            if r != store::RESOURCE && ResourceName::parse(r).is_err() {
                errors.push(FieldError::request(
                    format!("/resources/{i}"),
                    format!("{r:?} is not a resource name"),
                ));
            }
        }
    }
    if let Some(name) = &input.transformer
        && before.is_none_or(|b| b.transformer.as_ref() != Some(name))
        && !store::transformer_exists(&state.pool, tenant.as_str(), name).await?
    {
        errors.push(FieldError::request(
            "/transformer",
            format!("the tenant has no webhook-transformer plugin named {name:?}"),
        ));
    }
    let description = input.description.unwrap_or_default();
    if description.chars().count() > MAX_DESCRIPTION {
        errors.push(FieldError::request(
            "/description",
            format!("at most {MAX_DESCRIPTION} characters"),
        ));
    }
    if let Some(rate) = input.rate_limit_per_sec
        && !(1..=MAX_RATE).contains(&rate)
    {
        errors.push(FieldError::request(
            "/rateLimitPerSec",
            format!("from 1 to {MAX_RATE}, or null for none"),
        ));
    }
    if !errors.is_empty() {
        return Err(ApiError::unprocessable(
            "the webhook endpoint is not valid",
            errors,
        ));
    }
    Ok(Fields {
        url: input.url,
        events: input.events,
        resources: input.resources,
        transformer: input.transformer,
        description,
        fifo: input.fifo.unwrap_or(false),
        rate_limit_per_sec: input.rate_limit_per_sec,
        enabled: input.enabled.unwrap_or(true),
    })
}

fn webhook_id(id: &str) -> ApiResult<Uuid> {
    id.parse()
        .map_err(|_| ApiError::not_found(format!("no webhook {id:?}")))
}

async fn endpoint(state: &SharedState, tenant: &TenantId, id: &str) -> ApiResult<Endpoint> {
    store::get(&state.pool, tenant.as_str(), webhook_id(id)?)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no webhook {id:?}")))
}

/// Registers an endpoint. The answer carries its signing secret, once.
#[utoipa::path(post, path = "/v1/webhooks", tag = "webhooks", request_body = WebhookInput,
    responses((status = 201, body = WebhookView), (status = 409, body = Problem),
              (status = 422, body = Problem, description = "a field is not valid; the URL's problem says why it is refused")),
    security(("bearer" = [])))]
async fn create_webhook(
    State(state): State<SharedState>,
    principal: Principal,
    JsonBody(input): JsonBody<WebhookInput>,
) -> ApiResult<(StatusCode, Json<WebhookView>)> {
    let tenant = principal.tenant_with(Role::Admin)?;
    let fields = validate(&state, tenant, input, None).await?;
    let id = Uuid::now_v7();
    let secret = sign::new_secret();
    let sealed = hooks::seal_secrets(&state.keyring, tenant.as_str(), id, &secret, None).await?;
    let max = state.webhooks.settings.max_per_tenant;
    let created = store::insert(&state.pool, tenant.as_str(), id, &fields, &sealed, max)
        .await?
        .ok_or_else(|| {
            ApiError::conflict(format!(
                "the tenant has {max} webhook endpoints, the most it may have"
            ))
        })?;
    let mut view = WebhookView::from(created);
    view.secret = Some(secret);
    Ok((StatusCode::CREATED, Json(view)))
}

#[derive(Debug, Serialize, ToSchema)]
struct WebhookList {
    items: Vec<WebhookView>,
}

/// The tenant's endpoints, oldest first.
#[utoipa::path(get, path = "/v1/webhooks", tag = "webhooks",
    responses((status = 200, body = WebhookList)), security(("bearer" = [])))]
async fn list_webhooks(
    State(state): State<SharedState>,
    principal: Principal,
) -> ApiResult<Json<WebhookList>> {
    let tenant = principal.tenant_with(Role::Admin)?;
    let items = store::list(&state.pool, tenant.as_str()).await?;
    Ok(Json(WebhookList {
        items: items.into_iter().map(WebhookView::from).collect(),
    }))
}

#[utoipa::path(get, path = "/v1/webhooks/{id}", tag = "webhooks", params(("id" = String, Path)),
    responses((status = 200, body = WebhookView), (status = 404, body = Problem)),
    security(("bearer" = [])))]
async fn get_webhook(
    State(state): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<WebhookView>> {
    let tenant = principal.tenant_with(Role::Admin)?;
    Ok(Json(endpoint(&state, tenant, &id).await?.into()))
}

/// Changes an endpoint (a JSON merge patch of its fields); `{"enabled":
/// false}` pauses it, `{"enabled": true}` resumes it and clears why it was
/// disabled.
#[utoipa::path(patch, path = "/v1/webhooks/{id}", tag = "webhooks", params(("id" = String, Path)),
    request_body(content = Object, content_type = "application/merge-patch+json"),
    responses((status = 200, body = WebhookView), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
async fn patch_webhook(
    State(state): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
    JsonBody(patch): JsonBody<Value>,
) -> ApiResult<Json<WebhookView>> {
    let tenant = principal.tenant_with(Role::Admin)?;
    let current = endpoint(&state, tenant, &id).await?;
    if !patch.is_object() {
        return Err(ApiError::bad_request("the patch must be a JSON object"));
    }
    let mut doc =
        serde_json::to_value(input_of(&current)).map_err(|e| ApiError::Internal(e.into()))?;
    json_patch::merge(&mut doc, &patch);
    let input: WebhookInput = serde_json::from_value(doc)
        .map_err(|e| ApiError::bad_request(format!("the patched endpoint is not valid: {e}")))?;
    let fields = validate(&state, tenant, input, Some(&current)).await?;
    let updated = store::update(&state.pool, tenant.as_str(), current.id, &fields)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no webhook {id:?}")))?;
    state.webhooks.wake();
    Ok(Json(updated.into()))
}

/// Deletes an endpoint with its delivery log.
#[utoipa::path(delete, path = "/v1/webhooks/{id}", tag = "webhooks", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = Problem)), security(("bearer" = [])))]
async fn delete_webhook(
    State(state): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let tenant = principal.tenant_with(Role::Admin)?;
    if store::delete(&state.pool, tenant.as_str(), webhook_id(&id)?).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("no webhook {id:?}")))
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct RotatedSecret {
    /// The new signing secret, shown once.
    secret: String,
    /// Until then the previous secret signs too (a second signature).
    previous_valid_until: DateTime<Utc>,
}

/// Gives the endpoint a new secret; for 24 hours the old one keeps signing
/// too, as a second signature, so receivers can switch without a gap.
#[utoipa::path(post, path = "/v1/webhooks/{id}/secret/rotate", tag = "webhooks",
    params(("id" = String, Path)),
    responses((status = 200, body = RotatedSecret), (status = 404, body = Problem)),
    security(("bearer" = [])))]
async fn rotate_secret(
    State(state): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<RotatedSecret>> {
    let tenant = principal.tenant_with(Role::Admin)?;
    let current = endpoint(&state, tenant, &id).await?;
    let open = hooks::open_secrets(
        &state.keyring,
        tenant.as_str(),
        current.id,
        &current.secrets,
    )
    .await?;
    let old = open.first().cloned().ok_or_else(|| {
        ApiError::Internal(anyhow::anyhow!("webhook {} has no secret", current.id))
    })?;
    let secret = sign::new_secret();
    let until = Utc::now() + chrono::Duration::seconds(hooks::ROTATION_OVERLAP_SECS);
    let sealed = hooks::seal_secrets(
        &state.keyring,
        tenant.as_str(),
        current.id,
        &secret,
        Some((old.as_str(), until)),
    )
    .await?;
    if !store::set_secrets(
        &state.pool,
        tenant.as_str(),
        current.id,
        &current.secrets,
        &sealed,
    )
    .await?
    {
        return Err(ApiError::conflict(format!(
            "webhook {id} changed while its secret was rotated (another rotation, or it was \
             deleted); nothing was rotated by this request"
        )));
    }
    Ok(Json(RotatedSecret {
        secret,
        previous_valid_until: until,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
struct DeliveryQuery {
    /// pending, succeeded, failed or cancelled.
    status: Option<String>,
    event_type: Option<String>,
    /// Events from this time (RFC 3339)…
    since: Option<DateTime<Utc>>,
    /// …to this one (excluded).
    until: Option<DateTime<Utc>>,
    /// 1-1000, default 100.
    limit: Option<i64>,
    /// The `nextCursor` of the previous page.
    after: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct AttemptView {
    n: i32,
    at: DateTime<Utc>,
    duration_ms: i32,
    status_code: Option<i32>,
    /// The start of the answer (at most 20 kB).
    response: Option<String>,
    /// timeout, connect, refused-address, redirect, status, transformer,
    /// secret, request, event-gone.
    error_kind: Option<String>,
    error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct DeliveryView {
    #[schema(value_type = String)]
    id: Uuid,
    #[schema(value_type = String)]
    webhook_id: Uuid,
    /// Also the `webhook-id` header of every attempt.
    #[schema(value_type = String)]
    event_id: Uuid,
    event_type: String,
    event_time: DateTime<Utc>,
    status: String,
    attempts: i32,
    /// When it is tried next (pending ones).
    next_attempt_at: Option<DateTime<Utc>>,
    last_status_code: Option<i32>,
    last_error: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    /// The attempts, oldest first (the last 50).
    attempt_log: Vec<AttemptView>,
}

fn delivery_view((d, attempts): (Delivery, Vec<AttemptRow>)) -> DeliveryView {
    DeliveryView {
        id: d.id,
        webhook_id: d.webhook_id,
        event_id: d.event_id,
        event_type: d.event_type,
        event_time: d.event_time,
        next_attempt_at: (d.status == "pending").then_some(d.next_attempt_at),
        status: d.status,
        attempts: d.attempts,
        last_status_code: d.last_status_code,
        last_error: d.last_error,
        created_at: d.created_at,
        updated_at: d.updated_at,
        attempt_log: attempts
            .into_iter()
            .map(|a| AttemptView {
                n: a.n,
                at: a.at,
                duration_ms: a.duration_ms,
                status_code: a.status_code,
                response: a.response,
                error_kind: a.error_kind,
                error: a.error,
            })
            .collect(),
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct DeliveryPage {
    /// Newest event first.
    items: Vec<DeliveryView>,
    next_cursor: Option<String>,
}

/// The endpoint's deliveries, newest event first, each with its attempts.
#[utoipa::path(get, path = "/v1/webhooks/{id}/deliveries", tag = "webhooks",
    params(("id" = String, Path), DeliveryQuery),
    responses((status = 200, body = DeliveryPage), (status = 400, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = [])))]
async fn list_deliveries(
    State(state): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
    Query(q): Query<DeliveryQuery>,
) -> ApiResult<Json<DeliveryPage>> {
    let tenant = principal.tenant_with(Role::Admin)?;
    let e = endpoint(&state, tenant, &id).await?;
    if let Some(s) = q.status.as_deref().filter(|s| !STATUSES.contains(s)) {
        return Err(ApiError::bad_request(format!(
            "unknown status {s:?}; one of {}",
            STATUSES.join(", ")
        )));
    }
    let limit = super::page_limit(q.limit)?;
    let before_seq = match &q.after {
        Some(a) => Some(a.parse::<i64>().map_err(|_| {
            ApiError::bad_request("after must be the nextCursor of a previous page")
        })?),
        None => None,
    };
    let filter = DeliveryFilter {
        status: q.status,
        event_type: q.event_type,
        since: q.since,
        until: q.until,
        before_seq,
        limit,
    };
    let rows = store::deliveries(&state.pool, tenant.as_str(), e.id, &filter).await?;
    let next_cursor = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|(d, _)| d.event_seq.to_string()))
        .flatten();
    Ok(Json(DeliveryPage {
        items: rows.into_iter().map(delivery_view).collect(),
        next_cursor,
    }))
}

fn delivery_id(id: &str) -> ApiResult<Uuid> {
    id.parse()
        .map_err(|_| ApiError::not_found(format!("no delivery {id:?}")))
}

#[utoipa::path(get, path = "/v1/webhooks/{id}/deliveries/{deliveryId}", tag = "webhooks",
    params(("id" = String, Path), ("deliveryId" = String, Path)),
    responses((status = 200, body = DeliveryView), (status = 404, body = Problem)),
    security(("bearer" = [])))]
async fn get_delivery(
    State(state): State<SharedState>,
    principal: Principal,
    Path((id, delivery)): Path<(String, String)>,
) -> ApiResult<Json<DeliveryView>> {
    let tenant = principal.tenant_with(Role::Admin)?;
    let e = endpoint(&state, tenant, &id).await?;
    store::delivery(&state.pool, tenant.as_str(), e.id, delivery_id(&delivery)?)
        .await?
        .map(|d| Json(delivery_view(d)))
        .ok_or_else(|| ApiError::not_found(format!("no delivery {delivery:?}")))
}

/// Sends a finished delivery again now (same `webhook-id`), from the start
/// of the retry schedule.
#[utoipa::path(post, path = "/v1/webhooks/{id}/deliveries/{deliveryId}/retry", tag = "webhooks",
    params(("id" = String, Path), ("deliveryId" = String, Path)),
    responses((status = 202, body = DeliveryView), (status = 404, body = Problem),
              (status = 409, body = Problem, description = "the delivery is still pending")),
    security(("bearer" = [])))]
async fn retry_delivery(
    State(state): State<SharedState>,
    principal: Principal,
    Path((id, delivery)): Path<(String, String)>,
) -> ApiResult<(StatusCode, Json<DeliveryView>)> {
    let tenant = principal.tenant_with(Role::Admin)?;
    let e = endpoint(&state, tenant, &id).await?;
    let did = delivery_id(&delivery)?;
    if let Some(d) = store::retry(&state.pool, tenant.as_str(), e.id, did).await? {
        state.webhooks.wake();
        return Ok((StatusCode::ACCEPTED, Json(delivery_view((d, vec![])))));
    }
    match store::delivery(&state.pool, tenant.as_str(), e.id, did).await? {
        Some(_) => Err(ApiError::conflict(format!(
            "delivery {delivery} is still pending; it is retried on its schedule"
        ))),
        None => Err(ApiError::not_found(format!("no delivery {delivery:?}"))),
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ReplayInput {
    /// Events from this time (RFC 3339)…
    since: DateTime<Utc>,
    /// …to this one (excluded; default: now).
    #[serde(default)]
    until: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct ReplayView {
    /// Deliveries queued (the range's events the endpoint matches).
    queued: i64,
    /// The range held more than 10,000 events: replay again from
    /// `continueFrom` (the first event left out) for the rest.
    more: bool,
    continue_from: Option<DateTime<Utc>>,
}

/// Sends again the events of a time range of the tenant's log that the
/// endpoint matches, with their original `webhook-id`s (receivers dedupe
/// on it): new attempts of the same deliveries.
#[utoipa::path(post, path = "/v1/webhooks/{id}/replay", tag = "webhooks",
    params(("id" = String, Path)), request_body = ReplayInput,
    responses((status = 202, body = ReplayView), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
async fn replay(
    State(state): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
    JsonBody(input): JsonBody<ReplayInput>,
) -> ApiResult<(StatusCode, Json<ReplayView>)> {
    let tenant = principal.tenant_with(Role::Admin)?;
    let e = endpoint(&state, tenant, &id).await?;
    if input.until.is_some_and(|u| u <= input.since) {
        return Err(ApiError::unprocessable(
            "the range is empty",
            vec![FieldError::request("/until", "must be after since")],
        ));
    }
    let done = store::replay(&state.pool, &e, input.since, input.until, REPLAY_MAX).await?;
    state.webhooks.wake();
    Ok((
        StatusCode::ACCEPTED,
        Json(ReplayView {
            queued: done.queued,
            more: done.more,
            continue_from: if done.more { done.continue_from } else { None },
        }),
    ))
}
