//! A webhook receiver on loopback for the tests: it records every request
//! and answers by path:
//! `/ok`; `/fail/<n>` (500 for the first n requests of each `webhook-id`);
//! `/status/<code>` (with `Retry-After: 1` on 429 and 503); `/slow/<ms>`;
//! `/hang` (never answers); `/gone` (410); `/redirect` (302 to a private
//! address); `/big` (200 with a 20 MB body); `/nul` (200, a NUL byte in
//! the body).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// One request as received.
#[derive(Debug, Clone)]
pub struct Hit {
    pub method: String,
    /// Path and query.
    pub path: String,
    pub headers: HeaderMap,
    pub body: String,
    pub at: Instant,
}

impl Hit {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    pub fn id(&self) -> &str {
        self.header("webhook-id")
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

#[derive(Default)]
struct Inner {
    hits: Vec<Hit>,
    failures: HashMap<(String, String), u32>,
}

#[derive(Clone)]
pub struct Receiver {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    inner: Arc<Mutex<Inner>>,
}

impl Receiver {
    pub async fn start() -> Self {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Router::new().fallback(answer).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("binding the receiver: {e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            base: format!("http://127.0.0.1:{port}"),
            inner,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Requests received so far on paths starting with `prefix`.
    pub fn hits(&self, prefix: &str) -> Vec<Hit> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .hits
            .iter()
            .filter(|h| h.path.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// Waits (at most `within`) until `n` requests arrived on `prefix`.
    pub async fn wait_for(&self, prefix: &str, n: usize, within: Duration) -> Vec<Hit> {
        let until = Instant::now() + within;
        loop {
            let hits = self.hits(prefix);
            if hits.len() >= n || Instant::now() >= until {
                return hits;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn answer(State(inner): State<Arc<Mutex<Inner>>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let hit = Hit {
        method: parts.method.to_string(),
        path: path.clone(),
        headers: parts.headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
        at: Instant::now(),
    };
    let id = hit.id().to_owned();
    let failures_so_far = {
        let mut inner = inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.hits.push(hit);
        let seen = inner.failures.entry((path.clone(), id)).or_insert(0);
        *seen += 1;
        *seen - 1
    };
    let segments: Vec<&str> = parts
        .uri
        .path()
        .trim_start_matches('/')
        .split('/')
        .collect();
    let number = |i: usize| {
        segments
            .get(i)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
    };
    match segments.first().copied().unwrap_or_default() {
        "fail" if u64::from(failures_so_far) < number(1) => {
            (StatusCode::INTERNAL_SERVER_ERROR, "not yet").into_response()
        }
        "status" => {
            let code = StatusCode::from_u16(u16::try_from(number(1)).unwrap_or(500))
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut resp = (code, format!("answered {code}")).into_response();
            if matches!(code.as_u16(), 429 | 503) {
                resp.headers_mut()
                    .insert("retry-after", axum::http::HeaderValue::from_static("1"));
            }
            resp
        }
        "slow" => {
            tokio::time::sleep(Duration::from_millis(number(1))).await;
            "ok".into_response()
        }
        "hang" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            "too late".into_response()
        }
        "gone" => (StatusCode::GONE, "gone").into_response(),
        "nul" => (StatusCode::OK, "binary\0answer").into_response(),
        "redirect" => (
            StatusCode::FOUND,
            [("location", "http://10.0.0.1/internal")],
            "moved",
        )
            .into_response(),
        "big" => {
            let chunk = Bytes::from(vec![b'x'; 1 << 20]);
            let stream = futures::stream::iter(
                (0..20).map(move |_| Ok::<_, std::convert::Infallible>(chunk.clone())),
            );
            Body::from_stream(stream).into_response()
        }
        _ => (StatusCode::OK, json!({"received": true}).to_string()).into_response(),
    }
}

/// Checks each request's signature with the Standard Webhooks reference
/// library (Python `standardwebhooks`, in the interpreter `BSS_TEST_PYTHON`
/// that `scripts/test` prepares): "ok" or why it refused, per request.
pub fn verify(secret: &str, hits: &[Hit]) -> Vec<String> {
    let input: Vec<Value> = hits
        .iter()
        .map(|h| {
            json!({
                "secret": secret,
                "body": h.body,
                "headers": {
                    "webhook-id": h.id(),
                    "webhook-timestamp": h.header("webhook-timestamp"),
                    "webhook-signature": h.header("webhook-signature"),
                },
            })
        })
        .collect();
    serde_json::from_value(crate::python_tool(
        "verify_webhooks.py",
        &Value::Array(input),
    ))
    .unwrap_or_else(|e| panic!("the verifier's answer: {e}"))
}
