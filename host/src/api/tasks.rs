//! `/v1/tasks…`: the tenant's durable tasks (what enrichers asked the Task
//! Execution Service for, re-encryption jobs), parked ones retried; and
//! `/v1/encryption/rotate`, which rotates the tenant's data-encryption key
//! and queues the re-encryption of its stored values.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::app_state::SharedState;
use crate::auth::{Principal, Role};
use crate::error::{ApiError, ApiResult, Problem};
use crate::storage::tasks::{self, Queued, Task};

const STATUSES: [&str; 5] = ["pending", "running", "scheduled", "done", "failed"];

pub fn router() -> OpenApiRouter<SharedState> {
    OpenApiRouter::new()
        .routes(routes!(list_tasks))
        .routes(routes!(get_task))
        .routes(routes!(retry_task))
        .routes(routes!(rotate_key))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct TaskQuery {
    /// Only tasks in this status: pending, running, scheduled, done, failed.
    status: Option<String>,
    /// 1-1000, default 100.
    limit: Option<i64>,
    /// The `nextCursor` of the previous page.
    after: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct TaskPage {
    /// Newest first.
    items: Vec<Task>,
    /// Pass as `after` for the next page; null when this page was not full.
    next_cursor: Option<String>,
}

fn task_id(id: &str) -> ApiResult<Uuid> {
    id.parse()
        .map_err(|_| ApiError::not_found(format!("no task {id:?}")))
}

/// The tenant's tasks, newest first.
#[utoipa::path(get, path = "/v1/tasks", tag = "tasks", params(TaskQuery),
    responses((status = 200, body = TaskPage), (status = 400, body = Problem)),
    security(("bearer" = [])))]
async fn list_tasks(
    State(state): State<SharedState>,
    principal: Principal,
    Query(q): Query<TaskQuery>,
) -> ApiResult<Json<TaskPage>> {
    let tenant = principal.tenant_with(Role::Reader)?;
    let status = q.status.as_deref();
    if let Some(s) = status.filter(|s| !STATUSES.contains(s)) {
        return Err(ApiError::bad_request(format!(
            "unknown status {s:?}; one of {}",
            STATUSES.join(", ")
        )));
    }
    let limit = super::page_limit(q.limit)?;
    let before = match &q.after {
        Some(a) => Some(a.parse::<Uuid>().map_err(|_| {
            ApiError::bad_request("after must be the nextCursor of a previous page")
        })?),
        None => None,
    };
    let items = tasks::list(&state.pool, tenant.as_str(), status, before, limit).await?;
    let next_cursor = (items.len() as i64 == limit)
        .then(|| items.last().map(|t| t.id.to_string()))
        .flatten();
    Ok(Json(TaskPage { items, next_cursor }))
}

/// One task, with its progress.
#[utoipa::path(get, path = "/v1/tasks/{id}", tag = "tasks", params(("id" = String, Path)),
    responses((status = 200, body = Task), (status = 404, body = Problem)),
    security(("bearer" = [])))]
async fn get_task(
    State(state): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<Task>> {
    let tenant = principal.tenant_with(Role::Reader)?;
    tasks::get(&state.pool, tenant.as_str(), task_id(&id)?)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no task {id:?}")))
}

/// Puts a parked (`failed`) task back in the queue, its attempts reset.
#[utoipa::path(post, path = "/v1/tasks/{id}/retry", tag = "tasks", params(("id" = String, Path)),
    responses((status = 202, body = Task), (status = 404, body = Problem),
              (status = 409, body = Problem, description = "the task is not parked")),
    security(("bearer" = [])))]
async fn retry_task(
    State(state): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Task>)> {
    let tenant = principal.tenant_with(Role::Admin)?;
    let uuid = task_id(&id)?;
    if let Some(task) = tasks::retry(&state.pool, tenant.as_str(), uuid).await? {
        state.tasks.wake();
        return Ok((StatusCode::ACCEPTED, Json(task)));
    }
    match tasks::get(&state.pool, tenant.as_str(), uuid).await? {
        Some(t) => Err(ApiError::conflict(format!(
            "task {id} is {}; only failed tasks are retried",
            t.status
        ))),
        None => Err(ApiError::not_found(format!("no task {id:?}"))),
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct Rotation {
    /// The key new values are sealed with from now on.
    key_id: String,
    /// The re-encryption job moving stored values to it (one per key id).
    #[schema(value_type = String)]
    task_id: Uuid,
}

/// Rotates the tenant's data-encryption key. The built-in keyring moves to
/// its next key; with an Auth Service, rotate the key there first: this
/// asks it for the current key at once (instead of when the cached one
/// expires). New writes use the new key at once; stored values move to it
/// in the background (`GET /v1/tasks/{taskId}`), readable throughout.
#[utoipa::path(post, path = "/v1/encryption/rotate", tag = "tasks",
    responses((status = 202, body = Rotation), (status = 503, body = Problem)),
    security(("bearer" = [])))]
async fn rotate_key(
    State(state): State<SharedState>,
    principal: Principal,
) -> ApiResult<(StatusCode, Json<Rotation>)> {
    let tenant = principal.tenant_with(Role::Admin)?;
    let mut tx = state
        .pool
        .begin()
        .await
        .map_err(|e| ApiError::Internal(e.into()))?;
    let rotated = state
        .keyring
        .rotate(&mut tx, tenant.as_str(), state.tasks.max_pending())
        .await?
        .ok_or_else(|| ApiError::not_found("tenant not found"))?;
    let task_id = match rotated.task {
        Queued::New(id) | Queued::Existing(id) => id,
        Queued::Full => {
            return Err(ApiError::Unavailable {
                detail: "the tenant has too many tasks waiting to queue the re-encryption; \
                         nothing was rotated, try again later"
                    .into(),
                retry_after_secs: 60,
            });
        }
    };
    tx.commit()
        .await
        .map_err(|e| ApiError::Internal(e.into()))?;
    state.keyring.forget_current(tenant.as_str());
    state.tasks.wake();
    Ok((
        StatusCode::ACCEPTED,
        Json(Rotation {
            key_id: rotated.key_id,
            task_id,
        }),
    ))
}
