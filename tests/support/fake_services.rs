//! Small fake peer services on random ports: a Validation Service whose
//! behaviour a test picks (for schema checks, and per tenant for records:
//! failing, slow, huge or refusing answers), and an Auth Service serving a
//! JWKS.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

/// How the fake Validation Service answers.
#[derive(Debug, Clone, Copy)]
pub enum Behaviour {
    Valid,
    Invalid,
    Failing,
    Slow(Duration),
    /// A 200 whose body never ends before 400 MB (streamed, no length).
    Huge,
    /// A 400 whose body holds [`PEER_SECRET`].
    Refusing,
}

/// Text the fake puts in the bodies of `Huge` and `Refusing` answers: it
/// must never reach a tenant.
pub const PEER_SECRET: &str = "peer-internal-detail-at-10.9.8.7";

/// Size of a `Huge` answer.
const HUGE_BYTES: usize = 400 * 1024 * 1024;

/// A fake service; `calls` counts requests it received (the Validation
/// Service: `validateSchema` only; `requests` counts every path).
pub struct Fake {
    pub url: String,
    pub calls: Arc<AtomicUsize>,
    pub requests: Arc<AtomicUsize>,
    /// Bytes of `Huge` bodies handed to the server to send.
    pub sent: Arc<AtomicUsize>,
    /// `validateRecord` answers for these tenants (`x-tenant-id`); others
    /// get the credit-limit check.
    records: Arc<Mutex<HashMap<String, Behaviour>>>,
}

impl Fake {
    fn new(url: String, calls: Arc<AtomicUsize>) -> Self {
        Self {
            url,
            calls,
            requests: Arc::default(),
            sent: Arc::default(),
            records: Arc::default(),
        }
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn sent(&self) -> usize {
        self.sent.load(Ordering::SeqCst)
    }

    /// From now on `validateRecord` answers `tenant` this way.
    pub fn records_of(&self, tenant: &str, behaviour: Behaviour) {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.to_owned(), behaviour);
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

/// The answer of `behaviour`; `ok` is the body of a valid verdict.
async fn answer(behaviour: Behaviour, ok: Value, sent: Arc<AtomicUsize>) -> Response {
    match behaviour {
        Behaviour::Valid => Json(ok).into_response(),
        Behaviour::Invalid => Json(json!({"valid": false, "errors": [
            {"path": "/properties/total", "message": "totals must declare a currency"}
        ]}))
        .into_response(),
        Behaviour::Failing => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        Behaviour::Slow(d) => {
            tokio::time::sleep(d).await;
            Json(ok).into_response()
        }
        Behaviour::Huge => huge(sent).into_response(),
        Behaviour::Refusing => (
            StatusCode::BAD_REQUEST,
            format!("{{\"error\": \"{PEER_SECRET}\"}}"),
        )
            .into_response(),
    }
}

/// 400 MB of JSON that never closes, produced only as fast as it is sent.
fn huge(sent: Arc<AtomicUsize>) -> Body {
    const CHUNK: usize = 64 * 1024;
    let head = format!("{{\"valid\": true, \"note\": \"{PEER_SECRET}");
    let chunks = std::iter::once(Bytes::from(head))
        .chain((0..HUGE_BYTES / CHUNK).map(|_| Bytes::from(vec![b'x'; CHUNK])));
    Body::from_stream(futures::stream::iter(chunks.map(move |chunk| {
        sent.fetch_add(chunk.len(), Ordering::SeqCst);
        Ok::<_, std::convert::Infallible>(chunk)
    })))
}

/// The verdict on a record for tenants with no set behaviour: totals over
/// 100 are refused (the default validation-forwarder plugin asks).
fn credit_check(body: &Value) -> Value {
    if body["record"]["total"].as_f64().is_some_and(|t| t > 100.0) {
        json!({"valid": false, "errors": [
            {"path": "/total", "message": "over the customer's credit limit", "code": "credit"}
        ]})
    } else {
        json!({"valid": true, "errors": []})
    }
}

pub async fn validation_service(behaviour: Behaviour) -> Fake {
    let mut fake = Fake::new(String::new(), Arc::new(AtomicUsize::new(0)));
    let (requests, records, sent) = (
        fake.requests.clone(),
        fake.records.clone(),
        fake.sent.clone(),
    );
    let record = post(
        move |headers: HeaderMap, Json(body): Json<Value>| async move {
            requests.fetch_add(1, Ordering::SeqCst);
            let tenant = headers.get("x-tenant-id").and_then(|t| t.to_str().ok());
            let set = tenant.and_then(|t| {
                records
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(t)
                    .copied()
            });
            match set {
                Some(b) => answer(b, json!({"valid": true, "errors": []}), sent).await,
                None => Json(credit_check(&body)).into_response(),
            }
        },
    );
    let (counter, requests, sent) = (fake.calls.clone(), fake.requests.clone(), fake.sent.clone());
    let schema = post(move |Json(_body): Json<Value>| async move {
        counter.fetch_add(1, Ordering::SeqCst);
        requests.fetch_add(1, Ordering::SeqCst);
        answer(behaviour, json!({"valid": true}), sent).await
    });
    let requests = fake.requests.clone();
    let router = Router::new()
        .route("/api/validation/validateRecord", record)
        .route("/api/validation/validateSchema", schema)
        .fallback(move || async move {
            requests.fetch_add(1, Ordering::SeqCst);
            Json(json!({"valid": true}))
        });
    fake.url = serve(router).await;
    fake
}

/// An Auth Service serving `jwks` at `/.well-known/jwks.json`.
pub async fn auth_service(jwks: Value) -> Fake {
    auth_service_with_tenants(jwks).await.0
}

/// Tenant names a fake Auth Service knows; it answers 503 for the others.
pub type TenantNames = Arc<Mutex<HashMap<String, String>>>;

/// An Auth Service serving `jwks` and `GET /api/auth/tenants/{id}`
/// (`{"id", "name"}` for the tenants in the returned map).
pub async fn auth_service_with_tenants(jwks: Value) -> (Fake, TenantNames) {
    let calls = Arc::new(AtomicUsize::new(0));
    let names = TenantNames::default();
    let (counter, known) = (calls.clone(), names.clone());
    let router = Router::new()
        .route(
            "/.well-known/jwks.json",
            get(move || {
                let (counter, jwks) = (counter.clone(), jwks.clone());
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    Json(jwks)
                }
            }),
        )
        .route(
            "/api/auth/tenants/{id}",
            get(
                move |axum::extract::Path(id): axum::extract::Path<String>| {
                    let name = known
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&id)
                        .cloned();
                    async move {
                        match name {
                            Some(name) => Json(json!({"id": id, "name": name})).into_response(),
                            None => StatusCode::SERVICE_UNAVAILABLE.into_response(),
                        }
                    }
                },
            ),
        );
    (Fake::new(serve(router).await, calls), names)
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
    (Fake::new(serve(router).await, calls), seen)
}

/// How a [`KeyedTasks`] service answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskMode {
    /// 503 to everything.
    Down,
    /// Schedules the task, then answers 500 (as if the answer were lost):
    /// once per key; the next request with that key is answered normally.
    LosesAnswers,
    Up,
}

/// A Task Execution Service that schedules once per `Idempotency-Key`.
pub struct KeyedTasks {
    pub url: String,
    pub mode: Arc<Mutex<TaskMode>>,
    /// Per key: the body first scheduled, and how many requests carried it.
    pub scheduled: Arc<Mutex<HashMap<String, (Value, usize)>>>,
    /// Requests without an idempotency key.
    pub unkeyed: Arc<AtomicUsize>,
    pub requests: Arc<AtomicUsize>,
}

impl KeyedTasks {
    pub fn set(&self, mode: TaskMode) {
        *self.mode.lock().unwrap_or_else(|p| p.into_inner()) = mode;
    }

    /// Keys scheduled, with the requests that carried each.
    pub fn keys(&self) -> HashMap<String, usize> {
        let scheduled = self.scheduled.lock().unwrap_or_else(|p| p.into_inner());
        scheduled
            .iter()
            .map(|(k, (_, n))| (k.clone(), *n))
            .collect()
    }
}

pub async fn keyed_task_service(mode: TaskMode) -> KeyedTasks {
    let fake = KeyedTasks {
        url: String::new(),
        mode: Arc::new(Mutex::new(mode)),
        scheduled: Arc::default(),
        unkeyed: Arc::default(),
        requests: Arc::default(),
    };
    let (mode, scheduled, unkeyed, requests) = (
        fake.mode.clone(),
        fake.scheduled.clone(),
        fake.unkeyed.clone(),
        fake.requests.clone(),
    );
    let schedule = post(move |headers: HeaderMap, Json(body): Json<Value>| {
        let (mode, scheduled, unkeyed, requests) = (
            mode.clone(),
            scheduled.clone(),
            unkeyed.clone(),
            requests.clone(),
        );
        async move {
            requests.fetch_add(1, Ordering::SeqCst);
            let mode = *mode.lock().unwrap_or_else(|p| p.into_inner());
            if mode == TaskMode::Down {
                return StatusCode::SERVICE_UNAVAILABLE.into_response();
            }
            let Some(key) = headers
                .get("idempotency-key")
                .and_then(|k| k.to_str().ok())
                .map(str::to_owned)
            else {
                unkeyed.fetch_add(1, Ordering::SeqCst);
                return StatusCode::BAD_REQUEST.into_response();
            };
            let mut scheduled = scheduled.lock().unwrap_or_else(|p| p.into_inner());
            let first = !scheduled.contains_key(&key);
            let entry = scheduled.entry(key.clone()).or_insert((body, 0));
            entry.1 += 1;
            if first && mode == TaskMode::LosesAnswers {
                return StatusCode::INTERNAL_SERVER_ERROR.into_response();
            }
            Json(json!({"taskId": format!("remote-{key}")})).into_response()
        }
    });
    let router = Router::new().route("/api/task/schedule", schedule);
    KeyedTasks {
        url: serve(router).await,
        ..fake
    }
}
