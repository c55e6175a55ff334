//! Operations endpoints, without auth: liveness, readiness, Prometheus
//! metrics and the OpenAPI document.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde_json::{Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app_state::SharedState;

pub fn router() -> OpenApiRouter<SharedState> {
    OpenApiRouter::new()
        .routes(routes!(live))
        .routes(routes!(ready))
        .routes(routes!(metrics))
}

/// The process is up.
#[utoipa::path(get, path = "/health/live", tag = "operations",
    responses((status = 200, body = Object)))]
async fn live() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Ready to serve: the database answers. Peer-service breaker states are
/// reported (an open breaker degrades schema changes, not reads and writes).
#[utoipa::path(get, path = "/health/ready", tag = "operations",
    responses((status = 200, body = Object), (status = 503, body = Object)))]
async fn ready(State(state): State<SharedState>) -> impl IntoResponse {
    let db = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&state.pool),
    )
    .await;
    let db_ok = matches!(db, Ok(Ok(1)));
    let validation = match state.validation.client() {
        Some(c) => c.breaker.state().as_str(),
        None => "local",
    };
    let status = if db_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "status": if db_ok { "ready" } else { "unavailable" },
            "checks": {
                "database": if db_ok { "up" } else { "down" },
                "validationService": validation,
            }
        })),
    )
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, content_type = "text/plain", body = String)))]
async fn metrics(State(state): State<SharedState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
