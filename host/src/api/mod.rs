//! The HTTP API: one router per area, assembled with the OpenAPI document
//! (generated from the same handlers, so it cannot drift) and the
//! middleware every request goes through (request id, trace, metrics, body
//! limit, panic guard).

pub mod broker;
pub mod events;
pub mod extract;
pub mod operations;
pub mod plugins;
pub mod records;
pub mod schemas;
pub mod tenants;

use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::HeaderName;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;

use crate::app_state::SharedState;
use crate::error::ApiError;

#[derive(OpenApi)]
#[openapi(
    info(title = "Business Store", description = "Multi-tenant business data service"),
    modifiers(&BearerAuth),
    tags((name = "tenants"), (name = "schemas"), (name = "records"), (name = "events"), (name = "plugins"), (name = "operations"))
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// The routes and their OpenAPI document.
pub fn routes() -> (Router<SharedState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(tenants::router())
        .merge(schemas::router())
        .merge(records::router())
        .merge(events::router())
        .merge(plugins::router())
        .merge(broker::router())
        .merge(operations::router())
        .split_for_parts()
}

/// The whole application, as the binary serves it and the tests drive it.
pub fn app(state: SharedState) -> Router {
    let (router, openapi) = routes();
    let x_request_id = HeaderName::from_static("x-request-id");
    router
        .route("/openapi.json", get(move || async move { Json(openapi) }))
        .route_layer(middleware::from_fn(track_metrics))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(DefaultBodyLimit::max(state.settings.max_body_bytes))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::Internal(anyhow::anyhow!("handler panicked")).into_response()
        }))
        .layer(PropagateRequestIdLayer::new(x_request_id.clone()))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            tracing::info_span!("request", method = %req.method(), uri = %req.uri().path(), request_id = %id)
        }))
        .layer(SetRequestIdLayer::new(x_request_id, MakeRequestUuid))
        .with_state(state)
}

/// The event context of a request: this replica as `source`, the request
/// id as `correlationid`.
pub fn event_context(
    state: &SharedState,
    headers: &axum::http::HeaderMap,
) -> crate::events::EventContext {
    crate::events::EventContext {
        source: format!("/business-store/{}", state.settings.instance_id),
        // A caller-chosen request id is kept, within reason.
        correlation_id: headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .chars()
            .take(128)
            .collect(),
    }
}

/// Request count and latency per route and status.
async fn track_metrics(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    let labels = [("method", method), ("route", route), ("status", status)];
    metrics::counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!("http_request_duration_seconds", &labels)
        .record(start.elapsed().as_secs_f64());
    response
}
