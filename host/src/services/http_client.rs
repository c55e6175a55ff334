//! One resilient JSON-over-HTTP client per peer service.
//!
//! A call has one deadline (`service_timeout_ms`), which covers every attempt
//! and the backoff between them, so a slow peer costs a request at most that
//! budget. Transport errors, 5xx and 429 are retried (exponential backoff,
//! full jitter) while the budget allows. Connecting has a short timeout of
//! its own (a quarter of the budget, at most 500 ms), and no attempt starts
//! without that much time left, so a peer that never answers a connection is
//! recognised as unreachable rather than slow. An answer is read up to
//! `service_max_response_bytes` and no further: a peer cannot grow the host.
//! Breakers are per tenant ([`TenantBreakers`]) and count only failures of
//! the service (a 4xx is the service working). What a caller gets back is
//! worded by the host: never a peer's body, never an internal address; the
//! details go to the log. Errors are counted in `<service>_service_errors_total`.

use std::time::Duration;

use rand::Rng;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::time::Instant;

use super::TenantBreakers;
use super::identity::{ServiceIdentity, trace_headers};
use crate::config::Settings;

/// The longest a connection may take to open.
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Why a call to a peer service produced no usable answer. The texts are
/// safe to show a tenant.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The breaker is open; retry after the given time.
    #[error("{service} service circuit is open")]
    CircuitOpen {
        service: &'static str,
        retry_after: Duration,
    },
    /// No usable answer within the budget (timeout, connection, 5xx, an
    /// oversized or unreadable answer).
    #[error("{service} service unavailable: {reason}")]
    Unavailable {
        service: &'static str,
        reason: String,
    },
    /// The service refused the request (a 4xx); its body is not kept.
    #[error("{service} service refused the request: {reason}")]
    Rejected {
        service: &'static str,
        reason: String,
    },
}

/// What one attempt, or the whole call, ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The service could not be reached at all.
    Unreachable,
    TimedOut,
    /// Reached, but the exchange broke off.
    Broken,
    Status(StatusCode),
    TooLarge(usize),
    Unreadable,
}

impl Failure {
    fn retryable(self) -> bool {
        matches!(self, Self::Unreachable | Self::Broken | Self::Status(_))
    }

    fn kind(self) -> &'static str {
        match self {
            Self::Unreachable | Self::Broken => "transport",
            Self::TimedOut => "timeout",
            Self::Status(_) => "status",
            Self::TooLarge(_) => "too_large",
            Self::Unreadable => "bad_response",
        }
    }

    fn reason(self) -> String {
        match self {
            Self::Unreachable => "it could not be reached".into(),
            Self::TimedOut => "it did not answer in time".into(),
            Self::Broken => "the connection broke off".into(),
            Self::Status(s) => format!("it answered HTTP {}", s.as_u16()),
            Self::TooLarge(max) => format!("its answer exceeded {max} bytes"),
            Self::Unreadable => "its answer is not JSON".into(),
        }
    }
}

/// A usable answer: JSON, or the service's refusal (4xx).
enum Answer {
    Json(Value),
    Refused(StatusCode),
}

/// One call's request, the same on every attempt.
struct Call<'a> {
    url: &'a str,
    body: Option<&'a Value>,
    tenant: Option<&'a str>,
    idempotency_key: Option<&'a str>,
}

#[derive(Debug)]
pub struct ServiceClient {
    name: &'static str,
    base_url: String,
    http: reqwest::Client,
    attempts: u32,
    budget: Duration,
    connect_timeout: Duration,
    max_body: usize,
    identity: ServiceIdentity,
    pub breaker: TenantBreakers,
}

impl ServiceClient {
    pub fn new(name: &'static str, base_url: &str, settings: &Settings) -> anyhow::Result<Self> {
        let budget = settings.service_timeout();
        let connect_timeout = (budget / 4).min(MAX_CONNECT_TIMEOUT);
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .build()?;
        Ok(Self {
            name,
            base_url: base_url.trim_end_matches('/').to_owned(),
            http,
            attempts: settings.service_attempts.max(1),
            budget,
            connect_timeout,
            max_body: settings.service_max_response_bytes,
            identity: ServiceIdentity::from_settings(settings),
            breaker: TenantBreakers::new(
                settings.breaker_failure_threshold,
                Duration::from_secs(settings.breaker_open_secs),
            ),
        })
    }

    /// The whole budget of one call, retries included.
    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// POSTs JSON to `path` and returns the JSON answer (`GET` when `body`
    /// is None), for the host itself.
    pub async fn call(&self, path: &str, body: Option<&Value>) -> Result<Value, CallError> {
        self.call_for(path, body, None).await
    }

    /// Like [`call`](Self::call), on behalf of a tenant (`x-tenant-id`; the
    /// tenant's own breaker).
    pub async fn call_for(
        &self,
        path: &str,
        body: Option<&Value>,
        tenant: Option<&str>,
    ) -> Result<Value, CallError> {
        self.call_within(path, body, tenant, self.budget).await
    }

    /// Like [`call_for`](Self::call_for), within `budget` (at most the
    /// client's own).
    pub async fn call_within(
        &self,
        path: &str,
        body: Option<&Value>,
        tenant: Option<&str>,
        budget: Duration,
    ) -> Result<Value, CallError> {
        self.call_keyed(path, body, tenant, budget, None).await
    }

    /// Like [`call_for`](Self::call_for), with an `Idempotency-Key` header
    /// (the same on every attempt): the peer does the work once per key.
    pub async fn call_idempotent(
        &self,
        path: &str,
        body: &Value,
        tenant: &str,
        idempotency_key: &str,
    ) -> Result<Value, CallError> {
        let budget = self.budget;
        self.call_keyed(
            path,
            Some(body),
            Some(tenant),
            budget,
            Some(idempotency_key),
        )
        .await
    }

    async fn call_keyed(
        &self,
        path: &str,
        body: Option<&Value>,
        tenant: Option<&str>,
        budget: Duration,
        idempotency_key: Option<&str>,
    ) -> Result<Value, CallError> {
        let key = tenant.unwrap_or("");
        if let Err(retry_after) = self.breaker.try_acquire(key) {
            self.count_error("circuit_open");
            return Err(CallError::CircuitOpen {
                service: self.name,
                retry_after,
            });
        }
        let deadline = Instant::now() + budget.min(self.budget);
        let url = format!("{}{path}", self.base_url);
        let call = Call {
            url: &url,
            body,
            tenant,
            idempotency_key,
        };
        let all = self.attempt_all(&call, deadline);
        let outcome = match tokio::time::timeout_at(deadline, all).await {
            Ok(outcome) => outcome,
            Err(_) => {
                self.count_error(Failure::TimedOut.kind());
                Err(Failure::TimedOut)
            }
        };
        self.settle(key, outcome)
    }

    /// Attempts until an answer, a failure not worth retrying, the last
    /// attempt, or too little time left for another (one that could not
    /// finish connecting would end as a timeout, hiding an unreachable peer).
    async fn attempt_all(&self, call: &Call<'_>, deadline: Instant) -> Result<Answer, Failure> {
        let mut last = Failure::TimedOut;
        for attempt in 0..self.attempts {
            if attempt > 0 {
                let pause = backoff(attempt);
                // With slack: a busy machine fires timers late, and an
                // attempt cut by the deadline would read as a timeout.
                let needs = pause + self.connect_timeout + self.connect_timeout / 2;
                if Instant::now() + needs >= deadline {
                    break;
                }
                tokio::time::sleep(pause).await;
            }
            match self.attempt(call, deadline).await {
                Err(failure) => {
                    self.count_error(failure.kind());
                    last = failure;
                    if !failure.retryable() {
                        break;
                    }
                }
                answer => return answer,
            }
        }
        Err(last)
    }

    async fn attempt(&self, call: &Call<'_>, deadline: Instant) -> Result<Answer, Failure> {
        let request = match call.body {
            Some(b) => self.http.post(call.url).json(b),
            None => self.http.get(call.url),
        };
        let mut request = request.timeout(deadline.saturating_duration_since(Instant::now()));
        if let Some(t) = call.tenant {
            request = request.header("x-tenant-id", t);
        }
        if let Some(k) = call.idempotency_key {
            request = request.header("idempotency-key", k);
        }
        if let Some(credential) = self.identity.authorization(self.name) {
            request = request.header(reqwest::header::AUTHORIZATION, credential);
        }
        let (traceparent, request_id) = trace_headers();
        request = request.header("traceparent", traceparent);
        if let Some(id) = request_id {
            request = request.header("x-request-id", id);
        }
        let resp = request.send().await.map_err(|e| self.transport(&e))?;
        let status = resp.status();
        if status.is_success() {
            return read_json(resp, self.max_body, self.name)
                .await
                .map(Answer::Json);
        }
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            return Err(Failure::Status(status));
        }
        // Dropped unread: a 4xx body is never shown to anyone.
        Ok(Answer::Refused(status))
    }

    fn transport(&self, e: &reqwest::Error) -> Failure {
        tracing::debug!(service = self.name, error = %e, "peer call attempt failed");
        if e.is_connect() {
            Failure::Unreachable
        } else if e.is_timeout() {
            Failure::TimedOut
        } else {
            Failure::Broken
        }
    }

    /// Tells the tenant's breaker, and words the outcome for the caller.
    fn settle(&self, key: &str, outcome: Result<Answer, Failure>) -> Result<Value, CallError> {
        let service = self.name;
        match outcome {
            Ok(answer) => {
                self.breaker.on_success(key);
                match answer {
                    Answer::Json(value) => Ok(value),
                    Answer::Refused(status) => {
                        self.count_error("rejected");
                        let reason = format!("HTTP {}", status.as_u16());
                        Err(CallError::Rejected { service, reason })
                    }
                }
            }
            Err(failure) => {
                tracing::warn!(service, tenant = key, failure = ?failure, "peer call failed");
                self.breaker
                    .on_failure(key, failure == Failure::Unreachable);
                let reason = failure.reason();
                Err(CallError::Unavailable { service, reason })
            }
        }
    }

    fn count_error(&self, kind: &'static str) {
        metrics::counter!(format!("{}_service_errors_total", self.name), "kind" => kind)
            .increment(1);
    }
}

/// Reads a JSON answer of at most `max` bytes; stops reading (and drops the
/// connection) as soon as it is clear the answer is larger.
async fn read_json(
    mut resp: reqwest::Response,
    max: usize,
    service: &str,
) -> Result<Value, Failure> {
    if resp
        .content_length()
        .is_some_and(|n| n > u64::try_from(max).unwrap_or(u64::MAX))
    {
        return Err(Failure::TooLarge(max));
    }
    let mut bytes = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) if bytes.len() + chunk.len() > max => {
                return Err(Failure::TooLarge(max));
            }
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            Ok(None) => break,
            Err(e) if e.is_timeout() => return Err(Failure::TimedOut),
            Err(e) => {
                tracing::debug!(service, error = %e, "reading a peer's answer failed");
                return Err(Failure::Broken);
            }
        }
    }
    serde_json::from_slice(&bytes).map_err(|_| Failure::Unreadable)
}

/// Exponential backoff (100 ms, 200 ms, 400 ms… capped at 1 s) with full jitter.
fn backoff(attempt: u32) -> Duration {
    let cap = 100u64.saturating_mul(1 << attempt.min(4)).min(1000);
    Duration::from_millis(rand::rng().random_range(cap / 2..=cap))
}
