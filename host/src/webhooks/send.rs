//! One HTTP attempt: the request as the transformer left it, checked
//! (it may change method, path, headers and body, never the host or the
//! signature headers), sent without following redirects, its answer read
//! up to [`RESPONSE_KEPT`] bytes.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use url::Url;

use super::guard::{Guard, GuardedResolver, Refused};
use crate::plugins::WebhookRequest;

/// The part of an answer's body that is kept (the rest is not read).
pub const RESPONSE_KEPT: usize = 20_000;
/// Headers a transformer cannot set: the host's own (signature, identity,
/// framing).
const FIXED_HEADERS: [&str; 9] = [
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "user-agent",
    "te",
];
const METHODS: [&str; 5] = ["POST", "PUT", "PATCH", "GET", "DELETE"];

/// The sender's HTTP client: no redirects, no proxies, every address
/// through the guard.
pub fn client(guard: Arc<Guard>, timeout: Duration) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(Arc::new(GuardedResolver(guard)))
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(8)
        .user_agent(concat!(
            "BusinessStore-Webhooks/",
            env!("CARGO_PKG_VERSION"),
            " (+https://business-store.dev/webhooks)"
        ))
        .build()?)
}

/// What was sent where.
#[derive(Debug)]
pub struct Target {
    pub method: reqwest::Method,
    pub url: Url,
    pub headers: HeaderMap,
    pub body: String,
}

/// An attempt that did not get an answer, or got one that is not usable.
#[derive(Debug, Clone)]
pub struct SendError {
    /// `timeout`, `connect`, `refused-address`, `request`, `body`,
    /// `transformer`.
    pub kind: &'static str,
    pub message: String,
}

impl SendError {
    pub fn new(kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// The request to send to the registered endpoint `base`: its origin
/// stays; method, path, headers and body are checked.
pub fn target(base: &Url, req: WebhookRequest) -> Result<Target, SendError> {
    let bad = |m: String| SendError::new("transformer", m);
    let method = req.method.to_ascii_uppercase();
    if !METHODS.contains(&method.as_str()) {
        return Err(bad(format!(
            "the method {:?} is not one of {}",
            req.method,
            METHODS.join(", ")
        )));
    }
    if !req.path.starts_with('/') || req.path.starts_with("//") || req.path.contains('#') {
        return Err(bad(format!(
            "the path {:?} must start with a single / (the host cannot change)",
            req.path
        )));
    }
    let url = base
        .join(&req.path)
        .map_err(|e| bad(format!("the path {:?} is not valid: {e}", req.path)))?;
    if url.origin() != base.origin() {
        return Err(bad("the path may not change the host".into()));
    }
    let mut headers = HeaderMap::new();
    for (name, value) in &req.headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| bad(format!("{name:?} is not a header name")))?;
        if FIXED_HEADERS.contains(&name.as_str()) {
            continue;
        }
        let value = HeaderValue::from_str(value)
            .map_err(|_| bad(format!("the value of {name} is not a header value")))?;
        headers.append(name, value);
    }
    Ok(Target {
        method: method
            .parse()
            .map_err(|_| bad(format!("the method {method:?} is not valid")))?,
        url,
        headers,
        body: req.body,
    })
}

/// An answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// Its first [`RESPONSE_KEPT`] bytes (lossy UTF-8).
    pub body: String,
    /// `Retry-After`, in seconds from now.
    pub retry_after: Option<f64>,
}

/// Sends the request (the signature headers are in `t.headers`).
pub async fn send(client: &reqwest::Client, t: Target) -> Result<Answer, SendError> {
    let mut resp = client
        .request(t.method, t.url)
        .headers(t.headers)
        .body(t.body)
        .send()
        .await
        .map_err(classify)?;
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(retry_after_secs);
    let mut kept = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                let room = RESPONSE_KEPT - kept.len();
                kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if kept.len() >= RESPONSE_KEPT {
                    // The rest is never read: dropping the answer closes
                    // the connection.
                    break;
                }
            }
            Ok(None) => break,
            // An answer whose body fails after its status line: the status
            // decides, with what came.
            Err(_) => break,
        }
    }
    Ok(Answer {
        status,
        body: String::from_utf8_lossy(&kept).into_owned(),
        retry_after,
    })
}

/// `Retry-After`: seconds, or an HTTP date.
fn retry_after_secs(v: &str) -> Option<f64> {
    if let Ok(secs) = v.trim().parse::<u64>() {
        return Some(secs as f64);
    }
    let at = httpdate::parse_http_date(v.trim()).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
            .as_secs_f64(),
    )
}

/// Why a request got no answer, in words a tenant can act on.
fn classify(e: reqwest::Error) -> SendError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(s) = source {
        if let Some(refused) = s.downcast_ref::<Refused>() {
            return SendError::new("refused-address", refused.to_string());
        }
        source = s.source();
    }
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        "request"
    };
    let e = e.without_url();
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message = format!("{message}: {s}");
        source = s.source();
    }
    SendError::new(kind, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str, headers: &[(&str, &str)]) -> WebhookRequest {
        WebhookRequest {
            method: method.into(),
            path: path.into(),
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            body: "{}".into(),
        }
    }

    #[test]
    fn a_transformer_cannot_move_or_resign_a_delivery() {
        let base = Url::parse("https://hooks.example.com/in?x=1").unwrap();
        let t = target(&base, req("put", "/other?y=2", &[("x-a", "1")])).unwrap();
        assert_eq!(t.url.as_str(), "https://hooks.example.com/other?y=2");
        assert_eq!(t.method, reqwest::Method::PUT);
        for path in ["//evil.example/x", "https://evil.example/", "x", "/a#b"] {
            assert!(target(&base, req("POST", path, &[])).is_err(), "{path}");
        }
        assert!(target(&base, req("CONNECT", "/", &[])).is_err());
        let t = target(
            &base,
            req(
                "POST",
                "/",
                &[
                    ("webhook-signature", "v1,forged"),
                    ("Host", "evil"),
                    ("x-b", "2"),
                ],
            ),
        )
        .unwrap();
        assert!(t.headers.get("webhook-signature").is_none());
        assert!(t.headers.get("host").is_none());
        assert_eq!(
            t.headers.get("x-b").and_then(|v| v.to_str().ok()),
            Some("2")
        );
        assert!(target(&base, req("POST", "/", &[("bad name", "v")])).is_err());
    }

    #[test]
    fn retry_after_in_seconds_or_a_date() {
        assert_eq!(retry_after_secs("120"), Some(120.0));
        assert_eq!(retry_after_secs("Wed, 21 Oct 2015 07:28:00 GMT"), Some(0.0));
        assert_eq!(retry_after_secs("soon"), None);
    }
}
