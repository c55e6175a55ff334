//! Operations endpoints, without auth: liveness, readiness and Prometheus
//! metrics. With `ops_addr` set, `/metrics` is served only on that
//! listener (keep it off the public network); health stays on both so load
//! balancers can probe the API port.
//!
//! What the metric labels reveal, and why they stay bounded: see
//! `crate::telemetry`.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde_json::{Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app_state::SharedState;

/// Liveness and readiness, and `/metrics` when `with_metrics` (it moves to
/// the operations listener when one is configured).
pub fn router(with_metrics: bool) -> OpenApiRouter<SharedState> {
    let router = OpenApiRouter::new()
        .routes(routes!(live))
        .routes(routes!(ready));
    if with_metrics {
        router.routes(routes!(metrics))
    } else {
        router
    }
}

/// The process is up.
#[utoipa::path(get, path = "/health/live", tag = "operations",
    responses((status = 200, body = Object)))]
async fn live() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Ready to serve: the database answers and the service is not shutting
/// down (503 `draining` then, so load balancers stop sending requests).
/// The Validation Service's service-wide breaker state is reported (open
/// when it cannot be reached; that degrades schema changes, not reads and
/// writes), with how many tenants' own breakers are open, never which.
#[utoipa::path(get, path = "/health/ready", tag = "operations",
    responses((status = 200, body = Object), (status = 503, body = Object)))]
async fn ready(State(state): State<SharedState>) -> impl IntoResponse {
    let db = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&state.pool),
    )
    .await;
    let db_ok = matches!(db, Ok(Ok(1)));
    let (validation, paused_tenants) = match state.validation.client() {
        Some(c) => (c.breaker.state().as_str(), c.breaker.paused_tenants()),
        None => ("local", 0),
    };
    let draining = *state.shutdown.borrow();
    let status = if db_ok && !draining {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "status": match (draining, db_ok) {
                (true, _) => "draining",
                (false, true) => "ready",
                (false, false) => "unavailable",
            },
            "checks": {
                "database": if db_ok { "up" } else { "down" },
                "validationService": validation,
                "validationServicePausedTenants": paused_tenants,
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
