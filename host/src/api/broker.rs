//! `/v1/broker/topics/{topic}/messages`: the built-in broker's door for the
//! events the service consumes (`auth.tenant.created`, `auth.tenant.deleted`)
//! when no Kafka is configured. The same handlers as the Kafka consumer.

use axum::Json;
use axum::extract::{Path, State};
use serde_json::{Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::JsonDocument;
use crate::app_state::SharedState;
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, FieldError, Problem};
use crate::events::consumer::{self, CONSUMED_TOPICS, Outcome};

pub fn router() -> OpenApiRouter<SharedState> {
    OpenApiRouter::new().routes(routes!(deliver))
}

/// Deliver one message to the service's consumer of `topic` (platform-admin).
#[utoipa::path(post, path = "/v1/broker/topics/{topic}/messages", tag = "events",
    params(("topic" = String, Path, description = "auth.tenant.created or auth.tenant.deleted")),
    request_body(content = Object, description = "{\"tenantId\", \"name\"?}, bare or as a CloudEvent's data"),
    responses((status = 200, body = Object, description = "{\"outcome\"}"),
              (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
async fn deliver(
    State(state): State<SharedState>,
    principal: Principal,
    Path(topic): Path<String>,
    JsonDocument(message): JsonDocument,
) -> ApiResult<Json<Value>> {
    principal.require_platform_admin()?;
    if !CONSUMED_TOPICS.contains(&topic.as_str()) {
        return Err(ApiError::not_found(format!(
            "no consumer for topic {topic:?}; consumed topics: {}",
            CONSUMED_TOPICS.join(", ")
        )));
    }
    let payload = serde_json::to_vec(&message).unwrap_or_default();
    match consumer::handle_until_done(&state, &topic, &payload).await {
        Outcome::Malformed(reason) => Err(ApiError::unprocessable(
            "the message was not applied (it would be dead-lettered)",
            vec![FieldError::request("", reason)],
        )),
        outcome => Ok(Json(json!({"outcome": outcome.label()}))),
    }
}
