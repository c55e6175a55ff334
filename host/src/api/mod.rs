//! The HTTP API: one router per area, assembled with the OpenAPI document
//! (generated from the same handlers, so it cannot drift) and the
//! middleware every request goes through (request id, trace, metrics, body
//! limit and deadline, panic guard). Operational endpoints move to their own
//! router when a separate listener is configured (`ops_addr`).

pub mod archives;
pub mod asyncapi;
pub mod broker;
pub mod events;
pub mod extract;
pub mod openapi;
pub mod operations;
pub mod plugins;
pub mod records;
pub mod schemas;
pub mod tasks;
pub mod tenant_gate;
pub mod tenants;
pub mod webhooks;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;

use crate::app_state::SharedState;
use crate::error::{ApiError, Problem};

#[derive(OpenApi)]
#[openapi(
    info(title = "Business Store", description = "Multi-tenant business data service"),
    modifiers(&BearerAuth),
    tags((name = "tenants"), (name = "schemas"), (name = "records"), (name = "events"), (name = "plugins"), (name = "tasks"), (name = "webhooks"), (name = "operations"))
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

/// The largest page a `limit` query parameter may ask for.
pub(crate) const MAX_PAGE: i64 = 1000;

/// A page size from a `limit` query parameter: 1 to 1000, default 100.
pub(crate) fn page_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    let limit = limit.unwrap_or(100);
    if (1..=MAX_PAGE).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::bad_request(format!(
            "limit must be from 1 to {MAX_PAGE}"
        )))
    }
}

/// The routes and their OpenAPI document; `/metrics` is among them unless
/// operational endpoints have their own listener (`with_metrics`).
pub fn routes(with_metrics: bool) -> (Router<SharedState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(tenants::router())
        .merge(archives::router())
        .merge(schemas::router())
        .merge(records::router())
        .merge(events::router())
        .merge(plugins::router())
        .merge(tasks::router())
        .merge(webhooks::router())
        .merge(broker::router())
        .merge(operations::router(with_metrics))
        .split_for_parts()
}

/// The operational endpoints alone (liveness, readiness, metrics), as the
/// separate listener serves them.
pub fn ops_app(state: SharedState) -> Router {
    let (router, _) = OpenApiRouter::new()
        .merge(operations::router(true))
        .split_for_parts();
    router
        .fallback(unmatched)
        .layer(middleware::from_fn(problem_documents))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::Internal(anyhow::anyhow!("handler panicked")).into_response()
        }))
        .with_state(state)
}

/// The whole application, as the binary serves it and the tests drive it.
pub fn app(state: SharedState) -> Router {
    let (router, openapi) = routes(state.settings.ops_addr.is_none());
    let openapi = json_document(&openapi::complete(&openapi));
    let asyncapi = json_document(&asyncapi::document(
        &state.settings.kafka_dead_letter_topic,
        state.settings.kafka_record_topic.as_deref(),
    ));
    let x_request_id = HeaderName::from_static("x-request-id");
    let body_timeout = Duration::from_millis(state.settings.http_body_timeout_ms);
    router
        .route("/openapi.json", openapi)
        .route("/asyncapi.json", asyncapi)
        .route_layer(middleware::from_fn(track_metrics))
        .route_layer(middleware::from_fn(trace_context))
        .route_layer(middleware::from_fn(tenant_gate::rate_limit_headers))
        .fallback(unmatched)
        .layer(middleware::from_fn(problem_documents))
        .layer(middleware::from_fn_with_state(body_timeout, body_deadline))
        .layer(DefaultBodyLimit::max(state.settings.max_body_bytes))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::Internal(anyhow::anyhow!("handler panicked")).into_response()
        }))
        .layer(PropagateRequestIdLayer::new(x_request_id.clone()))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request| {
                    let id = req
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default();
                    let route = req
                        .extensions()
                        .get::<MatchedPath>()
                        .map_or("unmatched", |p| p.as_str());
                    let span = tracing::info_span!(
                        "request",
                        method = %req.method(),
                        route,
                        uri = %req.uri().path(),
                        request_id = %id,
                        tenant = tracing::field::Empty,
                    );
                    crate::telemetry::continue_trace(&span, req.headers());
                    span
                })
                .on_request(())
                .on_response(access_log)
                // A failure is in the access line (and an internal error
                // logs its cause): no second line.
                .on_failure(()),
        )
        .layer(SetRequestIdLayer::new(x_request_id, MakeRequestUuid))
        .with_state(state)
}

/// A fixed JSON document, serialized once and served as it is.
fn json_document(doc: &serde_json::Value) -> axum::routing::MethodRouter<SharedState> {
    let body = Bytes::from(serde_json::to_vec(doc).unwrap_or_default());
    get(move || async move { ([(header::CONTENT_TYPE, "application/json")], body) })
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
        traceparent: crate::services::identity::event_traceparent(),
    }
}

/// Serves the request inside its trace context, so that the peer calls
/// it makes carry its `x-request-id` and continue its `traceparent`.
async fn trace_context(req: Request, next: Next) -> Response {
    let trace = {
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
        crate::services::identity::RequestTrace::of(
            header("x-request-id").unwrap_or_default(),
            header("traceparent"),
        )
    };
    crate::services::identity::TRACE
        .scope(trace, next.run(req))
        .await
}

/// The access log: one line per request, in the request's span (method,
/// route template, path, request id, tenant once the token names one).
fn access_log(response: &Response, latency: Duration, _: &tracing::Span) {
    tracing::info!(
        status = response.status().as_u16(),
        duration_ms = latency.as_secs_f64() * 1000.0,
        "request answered"
    );
}

/// What answers a path no route has: 404, counted under one route label
/// (`unmatched`), never the path itself.
async fn unmatched(method: axum::http::Method) -> ApiError {
    let labels = [
        ("method", method_label(&method).to_owned()),
        ("route", "unmatched".to_owned()),
        ("status", "404".to_owned()),
    ];
    metrics::counter!("http_requests_total", &labels).increment(1);
    ApiError::not_found("no such endpoint")
}

/// A request method as a metric label: the standard ones by name, any
/// other as `other` (a client must not grow the label set).
fn method_label(method: &axum::http::Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

/// Request count and latency per route template (never the raw path, so
/// the label set stays bounded whatever ids appear in URLs) and status.
async fn track_metrics(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = method_label(req.method()).to_owned();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    let labels = [("method", method), ("route", route), ("status", status)];
    metrics::counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!("http_request_duration_seconds", &labels)
        .record(start.elapsed().as_secs_f64());
    response
}

/// Gives the whole request body `limit` from the request's start: a client
/// that sends its body too slowly gets 408 and the connection is closed
/// (a per-read timeout would let one byte every few seconds hold it).
async fn body_deadline(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    // An archive upload may take longer; it bounds its pauses instead.
    if req.uri().path() == archives::IMPORT_PATH {
        return next.run(req).await;
    }
    let expired = Arc::new(AtomicBool::new(false));
    let deadline = tokio::time::Instant::now() + limit;
    let req = req.map(|inner| {
        Body::new(DeadlineBody {
            inner,
            deadline,
            sleep: None,
            expired: expired.clone(),
        })
    });
    let response = next.run(req).await;
    if !expired.load(Ordering::Acquire) {
        return response;
    }
    request_timeout(limit)
}

/// 408, as a problem document, closing the connection.
fn request_timeout(limit: Duration) -> Response {
    let status = StatusCode::REQUEST_TIMEOUT;
    let detail = format!(
        "the request body did not arrive within {} ms; send it at once",
        limit.as_millis()
    );
    let mut response = Problem::of_status(status, "request-timeout", detail).into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Makes every error an RFC 9457 problem document: what axum answers by
/// itself (405 with an empty body; its extractors' rejections of a
/// malformed query, path or multipart body, in `text/plain`) becomes one,
/// its text the detail, its headers (`Allow`) kept.
async fn problem_documents(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let response = next.run(req).await;
    let status = response.status();
    // Only what has no body or plain text: a handler's own JSON (a problem,
    // or readiness' report) stays as it is.
    let plain = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_none_or(|v| v.as_bytes().starts_with(b"text/plain"));
    if !(status.is_client_error() || status.is_server_error()) || !plain {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let (slug, detail) = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            // axum adds `Allow` outside this layer (it wraps each route),
            // so the header is seldom here yet; the response carries it.
            let allow = parts
                .headers
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .filter(|a| !a.is_empty())
                .map_or_else(
                    || "the Allow header lists the methods it has".to_owned(),
                    |a| format!("it allows {a}"),
                );
            (
                "method-not-allowed",
                format!("{method} is not allowed on this path; {allow}"),
            )
        }
        StatusCode::BAD_REQUEST => ("bad-request", text),
        StatusCode::PAYLOAD_TOO_LARGE => ("payload-too-large", text),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported-media-type", text),
        StatusCode::UNPROCESSABLE_ENTITY => ("validation-failed", text),
        _ => ("http-error", text),
    };
    let detail = if detail.is_empty() {
        status.canonical_reason().unwrap_or("Error").to_owned()
    } else {
        detail
    };
    let problem = Problem::of_status(status, slug, detail).into_response();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    let (_, body) = problem.into_parts();
    Response::from_parts(parts, body)
}

/// A request body that fails once its deadline has passed.
struct DeadlineBody {
    inner: Body,
    deadline: tokio::time::Instant,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    expired: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
struct BodyTimedOut;

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        ready!(sleep.as_mut().poll(cx));
        this.expired.store(true, Ordering::Release);
        Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
