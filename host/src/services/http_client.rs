//! One resilient JSON-over-HTTP client per peer service: timeout per attempt,
//! retries with exponential backoff and full jitter on transport errors, 5xx
//! and 429, a circuit breaker around it all, and an error counter
//! (`<service>_service_errors_total`).

use std::time::Duration;

use rand::Rng;
use serde_json::Value;

use super::CircuitBreaker;
use crate::config::Settings;

/// Why a call to a peer service produced no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The breaker is open; retry after the given time.
    #[error("{service} service circuit is open")]
    CircuitOpen {
        service: &'static str,
        retry_after: Duration,
    },
    /// All attempts failed (timeout, connection, 5xx).
    #[error("{service} service unavailable: {reason}")]
    Unavailable {
        service: &'static str,
        reason: String,
    },
    /// The service answered with a client error or an unreadable body.
    #[error("{service} service refused the request: {reason}")]
    Rejected {
        service: &'static str,
        reason: String,
    },
}

#[derive(Debug)]
pub struct ServiceClient {
    name: &'static str,
    base_url: String,
    http: reqwest::Client,
    attempts: u32,
    pub breaker: CircuitBreaker,
}

impl ServiceClient {
    pub fn new(name: &'static str, base_url: &str, settings: &Settings) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(settings.service_timeout())
            .connect_timeout(settings.service_timeout())
            .build()?;
        Ok(Self {
            name,
            base_url: base_url.trim_end_matches('/').to_owned(),
            http,
            attempts: settings.service_attempts.max(1),
            breaker: CircuitBreaker::new(
                settings.breaker_failure_threshold,
                Duration::from_secs(settings.breaker_open_secs),
            ),
        })
    }

    fn count_error(&self, kind: &'static str) {
        metrics::counter!(format!("{}_service_errors_total", self.name), "kind" => kind)
            .increment(1);
    }

    /// POSTs JSON to `path` and returns the JSON answer (`GET` when `body` is None).
    pub async fn call(&self, path: &str, body: Option<&Value>) -> Result<Value, CallError> {
        self.call_for(path, body, None).await
    }

    /// Like [`call`](Self::call), on behalf of a tenant (`x-tenant-id`).
    pub async fn call_for(
        &self,
        path: &str,
        body: Option<&Value>,
        tenant: Option<&str>,
    ) -> Result<Value, CallError> {
        if let Err(retry_after) = self.breaker.try_acquire() {
            self.count_error("circuit_open");
            return Err(CallError::CircuitOpen {
                service: self.name,
                retry_after,
            });
        }
        let url = format!("{}{path}", self.base_url);
        let mut last = String::new();
        for attempt in 0..self.attempts {
            if attempt > 0 {
                tokio::time::sleep(backoff(attempt)).await;
            }
            let mut request = match body {
                Some(b) => self.http.post(&url).json(b),
                None => self.http.get(&url),
            };
            if let Some(t) = tenant {
                request = request.header("x-tenant-id", t);
            }
            match request.send().await {
                Ok(resp) if resp.status().is_success() => {
                    return match resp.json::<Value>().await {
                        Ok(v) => {
                            self.breaker.on_success();
                            Ok(v)
                        }
                        Err(e) => {
                            self.breaker.on_failure();
                            self.count_error("bad_response");
                            Err(CallError::Rejected {
                                service: self.name,
                                reason: format!("unreadable answer: {e}"),
                            })
                        }
                    };
                }
                Ok(resp) if resp.status().is_server_error() || resp.status().as_u16() == 429 => {
                    self.count_error("status");
                    last = format!("HTTP {}", resp.status());
                }
                Ok(resp) => {
                    // A 4xx says the request is wrong, not that the service is down.
                    self.breaker.on_success();
                    self.count_error("status");
                    let status = resp.status();
                    let text = resp.text().await.unwrap_or_default();
                    return Err(CallError::Rejected {
                        service: self.name,
                        reason: format!("HTTP {status}: {}", truncate(&text, 300)),
                    });
                }
                Err(e) => {
                    self.count_error(if e.is_timeout() {
                        "timeout"
                    } else {
                        "transport"
                    });
                    last = if e.is_timeout() {
                        "timed out".to_owned()
                    } else {
                        format!("{e}")
                    };
                }
            }
        }
        self.breaker.on_failure();
        Err(CallError::Unavailable {
            service: self.name,
            reason: last,
        })
    }
}

/// Exponential backoff (100 ms, 200 ms, 400 ms… capped at 1 s) with full jitter.
fn backoff(attempt: u32) -> Duration {
    let cap = 100u64.saturating_mul(1 << attempt.min(4)).min(1000);
    Duration::from_millis(rand::rng().random_range(cap / 2..=cap))
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
