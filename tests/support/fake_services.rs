//! Small fake peer services on random ports: a Validation Service whose
//! behaviour a test picks, and an Auth Service serving a JWKS.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use serde_json::{Value, json};

/// How the fake Validation Service answers.
#[derive(Debug, Clone, Copy)]
pub enum Behaviour {
    Valid,
    Invalid,
    Failing,
    Slow(Duration),
}

/// A fake service; `calls` counts requests it received.
pub struct Fake {
    pub url: String,
    pub calls: Arc<AtomicUsize>,
}

impl Fake {
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// A listener on a free loopback port, and its URL.
async fn bind_local() -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let url = format!(
        "http://{}",
        listener.local_addr().unwrap_or_else(|e| panic!("{e}"))
    );
    (listener, url)
}

async fn serve(router: Router) -> String {
    let (listener, url) = bind_local().await;
    tokio::spawn(async move { axum::serve(listener, router).await });
    url
}

pub async fn validation_service(behaviour: Behaviour) -> Fake {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let router = Router::new()
        .route(
            "/api/validation/validateRecord",
            // Refuses totals over 100 (the default validation-forwarder plugin asks).
            post(|Json(body): Json<Value>| async move {
                if body["record"]["total"].as_f64().is_some_and(|t| t > 100.0) {
                    Json(json!({"valid": false, "errors": [
                        {"path": "/total", "message": "over the customer's credit limit", "code": "credit"}
                    ]}))
                } else {
                    Json(json!({"valid": true, "errors": []}))
                }
            }),
        )
        .route(
        "/api/validation/validateSchema",
        post(move |Json(_body): Json<Value>| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                match behaviour {
                    Behaviour::Valid => Json(json!({"valid": true})).into_response(),
                    Behaviour::Invalid => Json(json!({"valid": false, "errors": [
                        {"path": "/properties/total", "message": "totals must declare a currency"}
                    ]}))
                    .into_response(),
                    Behaviour::Failing => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                    Behaviour::Slow(d) => {
                        tokio::time::sleep(d).await;
                        Json(json!({"valid": true})).into_response()
                    }
                }
            }
        }),
    );
    Fake {
        url: serve(router).await,
        calls,
    }
}

/// An Auth Service serving `jwks` at `/.well-known/jwks.json`.
pub async fn auth_service(jwks: Value) -> Fake {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let router = Router::new().route(
        "/.well-known/jwks.json",
        get(move || {
            let (counter, jwks) = (counter.clone(), jwks.clone());
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                Json(jwks)
            }
        }),
    );
    Fake {
        url: serve(router).await,
        calls,
    }
}

/// A URL where nothing listens.
pub async fn nothing_listening() -> String {
    bind_local().await.1
}

/// A service that accepts connections and never answers.
pub async fn hanging_service() -> String {
    let router = Router::new().fallback(|| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        StatusCode::OK
    });
    serve(router).await
}

/// A Task Execution Service that records what it was asked to schedule.
pub async fn task_service() -> (Fake, Arc<std::sync::Mutex<Vec<Value>>>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (counter, log) = (calls.clone(), seen.clone());
    let router = Router::new().route(
        "/api/task/schedule",
        post(move |Json(body): Json<Value>| {
            let (counter, log) = (counter.clone(), log.clone());
            async move {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                log.lock().unwrap_or_else(|p| p.into_inner()).push(body);
                Json(json!({"taskId": format!("task-{n}")}))
            }
        }),
    );
    (
        Fake {
            url: serve(router).await,
            calls,
        },
        seen,
    )
}
