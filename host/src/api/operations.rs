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
/// Reported beside: the broker (`up`, `failing` when the last batch was not
/// acknowledged, `unknown` on a replica that has not published), and each
/// configured peer service's breaker (open when it cannot be reached; that
/// degrades what needs it, not reads and writes), with how many tenants'
/// own breakers are open, never which. Neither makes the replica unready:
/// writes go on into the outbox.
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
                "broker": {"kind": state.broker.name(), "state": state.broker.state()},
                "validationService": validation,
                "validationServicePausedTenants": paused_tenants,
                "breakers": breakers(&state),
            }
        })),
    )
}

/// The circuit breakers of the configured peer services: each one's
/// service-wide state and how many tenants' own breakers are open (never
/// which).
fn breakers(state: &SharedState) -> Value {
    let clients = [
        ("validationService", state.validation.client()),
        (
            "authServiceTokens",
            state.auth.service().map(|c| c.as_ref()),
        ),
        ("authServiceKeys", state.keyring.service()),
        ("taskService", state.tasks.service()),
    ];
    let mut out = serde_json::Map::new();
    out.insert("plugins".into(), json!({"open": state.plugins.tripped()}));
    for (name, client) in clients {
        if let Some(c) = client {
            out.insert(
                name.into(),
                json!({"state": c.breaker.state().as_str(), "pausedTenants": c.breaker.paused_tenants()}),
            );
        }
    }
    Value::Object(out)
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
