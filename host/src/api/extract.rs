//! Request extractors that fail with problem documents: the verified caller,
//! JSON bodies (415 for a wrong content type, 413 over the limit, 400 for
//! malformed JSON, with the position), query pairs and write preconditions.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::app_state::SharedState;
use crate::auth::Principal;
use crate::error::ApiError;
pub use crate::storage::records::Precondition;

impl FromRequestParts<SharedState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, ApiError> {
        let value = parts.headers.get(header::AUTHORIZATION).ok_or_else(|| {
            ApiError::Unauthorized("missing Authorization: Bearer <token>".into())
        })?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::Unauthorized("the Authorization header must be 'Bearer <token>'".into())
            })?;
        let principal = match state.tokens.get(token) {
            Some(known) => known,
            None => {
                let claims = state.auth.verify(token).await?;
                let exp = claims.exp;
                let principal = Principal::from_claims(claims)?;
                state.tokens.put(token, &principal, exp);
                principal
            }
        };
        if let Some(tenant) = &principal.tenant {
            tracing::Span::current().record("tenant", tenant.as_str());
        }
        state.gate.admit(state, &principal, parts).await?;
        Ok(principal)
    }
}

/// A JSON body as a `serde_json::Value`. Accepts `application/json` and any
/// `application/*+json` type (such as `application/merge-patch+json`).
#[derive(Debug)]
pub struct JsonDocument(pub Value);

impl<S: Send + Sync> FromRequest<S> for JsonDocument {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        check_json_content_type(req.headers())?;
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge("the request body is larger than the limit".into())
            } else {
                ApiError::bad_request(format!("could not read the request body: {e}"))
            }
        })?;
        let value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
        refuse_nul(&value)?;
        Ok(Self(value))
    }
}

/// Refuses a document with U+0000 in any string or key (PostgreSQL cannot
/// store it), naming the first place as a JSON Pointer.
pub fn refuse_nul(value: &Value) -> Result<(), ApiError> {
    match nul_path(value) {
        None => Ok(()),
        Some(path) => Err(ApiError::unprocessable(
            "the body contains the character U+0000, which cannot be stored; remove it",
            vec![crate::error::FieldError::request(
                if path.is_empty() { "/" } else { &path },
                "contains U+0000 (\\u0000)",
            )],
        )),
    }
}

/// The JSON Pointer of the first string or key holding U+0000.
fn nul_path(value: &Value) -> Option<String> {
    let escape = |k: &str| k.replace('~', "~0").replace('/', "~1");
    match value {
        Value::String(s) => s.contains('\0').then(String::new),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| nul_path(v).map(|p| format!("/{i}{p}"))),
        Value::Object(map) => map.iter().find_map(|(k, v)| {
            if k.contains('\0') {
                Some(format!("/{}", escape(k).replace('\0', "\\u0000")))
            } else {
                nul_path(v).map(|p| format!("/{}{p}", escape(k)))
            }
        }),
        _ => None,
    }
}

/// A JSON body deserialized into `T`; a well-formed body of the wrong shape
/// is a 422 naming the problem.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let JsonDocument(value) = JsonDocument::from_request(req, state).await?;
        serde_json::from_value(value).map(JsonBody).map_err(|e| {
            ApiError::unprocessable(
                format!("the body does not have the expected shape: {e}"),
                vec![],
            )
        })
    }
}

fn check_json_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let mime = ct
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json")) {
        Ok(())
    } else if ct.is_empty() {
        Err(ApiError::UnsupportedMediaType(
            "send the body with Content-Type: application/json".into(),
        ))
    } else {
        Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type {ct:?} is not accepted here; use application/json"
        )))
    }
}

/// The query string as ordered key/value pairs.
#[derive(Debug)]
pub struct QueryPairs(pub Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for QueryPairs {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let q = parts.uri.query().unwrap_or_default();
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(q)
            .map_err(|e| ApiError::bad_request(format!("malformed query string: {e}")))?;
        if let Some((k, _)) = pairs
            .iter()
            .find(|(k, v)| k.contains('\0') || v.contains('\0'))
        {
            return Err(ApiError::bad_request(format!(
                "the query parameter {:?} contains U+0000 (%00), which cannot be used; remove it",
                k.replace('\0', "\\u0000")
            )));
        }
        Ok(QueryPairs(pairs))
    }
}

/// The preconditions of a write (RFC 9110 §13.1.1–13.1.2): `If-Match`
/// with `*` (any current record) or a strong ETag (a weak one never
/// matches: writes compare strongly), and `If-None-Match: *` (no current
/// record: on PUT, create only). `If-None-Match` with ETags is for reads
/// (304); a write ignores it.
pub fn preconditions(headers: &HeaderMap) -> Result<Precondition, ApiError> {
    let if_match = header_text(headers, header::IF_MATCH)?
        .map(parse_if_match)
        .transpose()?;
    let absent = header_text(headers, header::IF_NONE_MATCH)?.is_some_and(|v| v.trim() == "*");
    Ok(match (if_match, absent) {
        // If-Match needs a current record and If-None-Match: * none.
        (Some(_), true) => Precondition::Never,
        (Some(condition), false) => condition,
        (None, true) => Precondition::Absent,
        (None, false) => Precondition::None,
    })
}

/// A precondition header's value; an empty one (an empty list) counts as
/// absent, as clients and proxies send it.
fn header_text(headers: &HeaderMap, name: header::HeaderName) -> Result<Option<&str>, ApiError> {
    let value = headers
        .get(&name)
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::bad_request(format!("{name} must be ASCII ETags or *")))
        })
        .transpose()?;
    Ok(value.filter(|v| !v.trim().is_empty()))
}

fn parse_if_match(value: &str) -> Result<Precondition, ApiError> {
    if value.trim() == "*" {
        return Ok(Precondition::Exists);
    }
    let malformed = || {
        ApiError::bad_request(
            "If-Match must be * or an ETag as returned by the API, e.g. \"3\" (a list of them separated by commas)",
        )
    };
    // entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE, in a comma-separated
    // list (a comma may also sit inside a tag).
    let mut versions = Vec::new();
    let mut rest = value.trim();
    while !rest.is_empty() {
        let (weak, tag) = match rest.strip_prefix("W/") {
            Some(r) => (true, r),
            None => (false, rest),
        };
        let tag = tag.strip_prefix('"').ok_or_else(malformed)?;
        let end = tag.find('"').ok_or_else(malformed)?;
        // A weak tag, or one this API never issues ("03" is not "3":
        // tags compare character by character), cannot match.
        let opaque = &tag[..end];
        if let (false, Ok(v)) = (weak, opaque.parse::<i64>())
            && v.to_string() == opaque
        {
            versions.push(v);
        }
        rest = tag[end + 1..].trim_start();
        if !rest.is_empty() {
            rest = rest.strip_prefix(',').ok_or_else(malformed)?.trim_start();
        }
    }
    versions.sort_unstable();
    versions.dedup();
    match versions[..] {
        [] => Ok(Precondition::Never),
        [v] => Ok(Precondition::Version(v)),
        _ => Err(ApiError::bad_request(
            "If-Match lists several versions of the record; send the one you hold",
        )),
    }
}

/// The ETag of a record version.
pub fn etag(version: i64) -> String {
    format!("\"{version}\"")
}
