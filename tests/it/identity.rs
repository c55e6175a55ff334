//! Service identity on outbound calls: every call to a peer carries the
//! host's credential, the caller's `x-request-id` and its trace.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::post;
use bss_tests::{TestApp, send};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

const SERVICE_KEY: &str = "service-key-0123456789-0123456789-abc";

/// A Validation Service that accepts every schema and keeps the headers of
/// each call.
async fn recording_validation_service() -> (String, Arc<Mutex<Vec<HeaderMap>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let router = Router::new().route(
        "/api/validation/validateSchema",
        post(move |headers: HeaderMap| {
            let log = log.clone();
            async move {
                log.lock().unwrap().push(headers);
                axum::Json(json!({"valid": true}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, seen)
}

async fn put_schema_traced(app: &TestApp, token: &str) {
    let resp = send(
        app.request(reqwest::Method::PUT, "/v1/schemas/notes", Some(token))
            .header("x-request-id", "req-identity-1")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .json(&json!({"schema": {"type": "object"}})),
    )
    .await;
    assert_eq!(resp.status(), 201);
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

#[tokio::test]
async fn peer_calls_carry_a_signed_service_token_the_request_id_and_the_trace() {
    let (url, seen) = recording_validation_service().await;
    let app = TestApp::spawn_with(|s| {
        s.validation_service_url = Some(url);
        s.service_key = Some(SERVICE_KEY.into());
    })
    .await;
    let (_, token) = app.tenant().await;
    put_schema_traced(&app, &token).await;
    let calls = seen.lock().unwrap().clone();
    let h = calls.last().expect("the Validation Service was called");
    assert_eq!(header(h, "x-request-id"), "req-identity-1");
    let parent: Vec<&str> = header(h, "traceparent").split('-').collect();
    assert_eq!(parent.len(), 4, "{parent:?}");
    assert_eq!(
        parent[1], "4bf92f3577b34da6a3ce929d0e0e4736",
        "the caller's trace"
    );
    assert_ne!(parent[2], "00f067aa0ba902b7", "a span of its own");
    let bearer = header(h, "authorization").trim_start_matches("Bearer ");
    let mut v = Validation::new(Algorithm::HS256);
    v.set_audience(&["validation"]);
    v.set_issuer(&["business-store"]);
    let claims = jsonwebtoken::decode::<Value>(
        bearer,
        &DecodingKey::from_secret(SERVICE_KEY.as_bytes()),
        &v,
    )
    .expect("a service token signed with BSS_SERVICE_KEY")
    .claims;
    let lifetime = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
    assert!(lifetime <= 60, "short-lived: {lifetime} s");
}

#[tokio::test]
async fn a_static_service_token_is_sent_as_is_and_no_credential_without_one() {
    let (url, seen) = recording_validation_service().await;
    let app = TestApp::spawn_with(|s| {
        s.validation_service_url = Some(url.clone());
        s.service_token = Some("static-token-1".into());
    })
    .await;
    let (_, token) = app.tenant().await;
    put_schema_traced(&app, &token).await;
    let last = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(header(&last, "authorization"), "Bearer static-token-1");

    let bare = TestApp::spawn_with(|s| s.validation_service_url = Some(url)).await;
    let (_, token) = bare.tenant().await;
    put_schema_traced(&bare, &token).await;
    let last = seen.lock().unwrap().last().cloned().unwrap();
    assert!(last.get("authorization").is_none());
    assert_eq!(header(&last, "x-request-id"), "req-identity-1");
}
