//! Who the host is when it calls a peer service, and which request a call
//! belongs to. Every outbound call carries a service credential (a static
//! bearer token, `BSS_SERVICE_TOKEN`, or a JWT of one minute signed with
//! `BSS_SERVICE_KEY`, audience the service's name), a W3C `traceparent`
//! continuing the caller's trace, and the `x-request-id` of the request that
//! caused it. Peers can thus tell the host from anyone else, and logs on
//! both sides line up.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use serde::Serialize;

use crate::config::Settings;

/// The issuer (and subject prefix) of service tokens.
pub const ISSUER: &str = "business-store";
/// How long a signed service token lives, in seconds.
const TOKEN_TTL_SECS: u64 = 60;

/// The credential outbound calls present.
#[derive(Clone)]
pub enum ServiceIdentity {
    None,
    Static(String),
    Signed { key: EncodingKey, subject: String },
}

impl std::fmt::Debug for ServiceIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "ServiceIdentity::None",
            Self::Static(_) => "ServiceIdentity::Static(..)",
            Self::Signed { .. } => "ServiceIdentity::Signed(..)",
        })
    }
}

#[derive(Serialize)]
struct ServiceClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

impl ServiceIdentity {
    /// A static token wins over a signing key; neither: no credential.
    pub fn from_settings(settings: &Settings) -> Self {
        match (&settings.service_token, &settings.service_key) {
            (Some(token), _) => Self::Static(token.clone()),
            (None, Some(key)) => Self::Signed {
                key: EncodingKey::from_secret(key.as_bytes()),
                subject: format!("{ISSUER}/{}", settings.instance_id),
            },
            (None, None) => Self::None,
        }
    }

    /// The `Authorization` value for a call to `service`.
    pub fn authorization(&self, service: &str) -> Option<String> {
        match self {
            Self::None => None,
            Self::Static(token) => Some(format!("Bearer {token}")),
            Self::Signed { key, subject } => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or_default();
                let claims = ServiceClaims {
                    iss: ISSUER,
                    sub: subject,
                    aud: service,
                    iat: now,
                    exp: now + TOKEN_TTL_SECS,
                };
                match jsonwebtoken::encode(&Header::default(), &claims, key) {
                    Ok(token) => Some(format!("Bearer {token}")),
                    Err(e) => {
                        tracing::error!(error = %e, "signing a service token failed");
                        None
                    }
                }
            }
        }
    }
}

/// The request an outbound call is made for.
#[derive(Debug, Clone)]
pub struct RequestTrace {
    pub request_id: String,
    /// The caller's trace (32 lowercase hex digits), when it sent a valid
    /// `traceparent`; else each call starts a trace of its own.
    pub trace_id: Option<String>,
}

tokio::task_local! {
    /// The request being served by this task, set by the API's middleware.
    pub static TRACE: RequestTrace;
}

impl RequestTrace {
    /// A request's trace, continued from its `traceparent` when that is
    /// well-formed. Cheap: nothing is generated until a peer call needs it.
    pub fn of(request_id: &str, traceparent: Option<&str>) -> Self {
        let trace_id = traceparent.and_then(|t| {
            let parts: Vec<&str> = t.split('-').collect();
            match parts.as_slice() {
                [_, trace, span, _]
                    if is_hex(trace, 32)
                        && is_hex(span, 16)
                        && trace.bytes().any(|b| b != b'0') =>
                {
                    Some((*trace).to_owned())
                }
                _ => None,
            }
        });
        Self {
            request_id: request_id.chars().take(128).collect(),
            trace_id,
        }
    }
}

/// The headers that tie a call to its request: `traceparent` (a new span
/// in the caller's trace, or in a new trace) and `x-request-id` when there
/// is a request.
pub fn trace_headers() -> (String, Option<String>) {
    let trace = TRACE.try_with(Clone::clone).ok();
    let parent = crate::telemetry::current_traceparent().unwrap_or_else(|| {
        let trace_id = trace.as_ref().and_then(|t| t.trace_id.clone());
        span_in(&trace_id.unwrap_or_else(|| random_hex(16)))
    });
    (
        parent,
        trace.map(|t| t.request_id).filter(|r| !r.is_empty()),
    )
}

/// The `traceparent` of an event a request causes: the request's exported
/// span, or, when spans are not exported, a span of its own in the
/// caller's trace; none when neither exists.
pub fn event_traceparent() -> Option<String> {
    crate::telemetry::current_traceparent().or_else(|| {
        let trace_id = TRACE.try_with(|t| t.trace_id.clone()).ok().flatten()?;
        Some(span_in(&trace_id))
    })
}

/// A `traceparent` naming a new span in trace `trace_id`.
fn span_in(trace_id: &str) -> String {
    format!("00-{trace_id}-{}-01", random_hex(8))
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn random_hex(bytes: usize) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes * 2);
    for _ in 0..bytes {
        let _ = write!(out, "{:02x}", rand::random::<u8>());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_is_continued_and_a_bad_one_replaced() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = RequestTrace::of("r-1", Some(good));
        assert_eq!(
            t.trace_id.as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        let t = RequestTrace::of("r-1", Some("00-XYZ-00f067aa0ba902b7-01"));
        assert_eq!(t.trace_id, None, "a new trace per call");
    }

    #[test]
    fn a_signed_identity_names_the_service_as_audience() {
        let s = Settings {
            service_key: Some("k".repeat(32)),
            ..Settings::default()
        };
        let auth = ServiceIdentity::from_settings(&s)
            .authorization("validation")
            .unwrap_or_default();
        let token = auth.trim_start_matches("Bearer ");
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        v.set_audience(&["validation"]);
        v.set_issuer(&[ISSUER]);
        let decoded = jsonwebtoken::decode::<serde_json::Value>(
            token,
            &jsonwebtoken::DecodingKey::from_secret("k".repeat(32).as_bytes()),
            &v,
        );
        assert!(decoded.is_ok(), "{decoded:?}");
    }
}
