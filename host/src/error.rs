//! The one place errors become HTTP responses: RFC 9457 problem documents
//! (`application/problem+json`) with an explicit status per variant. Internal
//! errors are logged with their cause and answered with a generic message, so
//! nothing about the database or the host leaks to clients.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// One thing to fix: where (a JSON Pointer into the request body), what, and
/// which check said so (`schema` or `plugin:<name>`).
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
    pub source: String,
    /// The stored record concerned, when the error is about stored data
    /// (a schema change refused because of existing records).
    #[serde(rename = "recordId", skip_serializing_if = "Option::is_none")]
    pub record_id: Option<String>,
    /// A stable code for the error, when its source has one (a plugin's
    /// violation code; the limit a failing plugin hit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

impl FieldError {
    pub fn schema(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
            source: "schema".into(),
            record_id: None,
            code: None,
        }
    }

    pub fn request(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
            source: "request".into(),
            record_id: None,
            code: None,
        }
    }
}

/// An RFC 9457 problem document as served.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

impl Problem {
    /// A problem document for a status no handler chose (axum's own
    /// rejections, 405, 408), with `slug` naming its type.
    pub fn of_status(status: StatusCode, slug: &str, detail: impl Into<String>) -> Self {
        Self {
            kind: format!("https://business-store.dev/problems/{slug}"),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            errors: vec![],
        }
    }
}

impl IntoResponse for Problem {
    /// The problem as a response (`application/problem+json`), with its status.
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = (status, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        response
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{detail}")]
    BadRequest {
        detail: String,
        errors: Vec<FieldError>,
    },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{detail}")]
    Conflict {
        detail: String,
        errors: Vec<FieldError>,
    },
    #[error("{0}")]
    PreconditionFailed(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{detail}")]
    Unprocessable {
        detail: String,
        errors: Vec<FieldError>,
    },
    /// A tenant's plugin failed (a limit, a trap): the write is refused.
    #[error("{detail}")]
    PluginFailed {
        detail: String,
        errors: Vec<FieldError>,
    },
    /// The tenant is over one of its rate limits: `Retry-After` says when to
    /// try again; `RateLimit-Policy` and `RateLimit` (IETF httpapi
    /// ratelimit-headers draft) carry the quota and what is left of it.
    #[error("{detail}")]
    RateLimited {
        detail: String,
        retry_after_secs: u64,
        policy: String,
        limit: String,
    },
    #[error("{detail}")]
    Unavailable {
        detail: String,
        retry_after_secs: u64,
    },
    #[error("internal error: {0:#}")]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::BadRequest {
            detail: detail.into(),
            errors: vec![],
        }
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::NotFound(detail.into())
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::Conflict {
            detail: detail.into(),
            errors: vec![],
        }
    }

    pub fn unprocessable(detail: impl Into<String>, errors: Vec<FieldError>) -> Self {
        Self::Unprocessable {
            detail: detail.into(),
            errors,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Unprocessable { .. } | Self::PluginFailed { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            Self::BadRequest { .. } => "bad-request",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::NotFound(_) => "not-found",
            Self::Conflict { .. } => "conflict",
            Self::PreconditionFailed(_) => "precondition-failed",
            Self::PayloadTooLarge(_) => "payload-too-large",
            Self::UnsupportedMediaType(_) => "unsupported-media-type",
            Self::Unprocessable { .. } => "validation-failed",
            Self::PluginFailed { .. } => "plugin-failed",
            Self::RateLimited { .. } => "rate-limited",
            Self::Unavailable { .. } => "dependency-unavailable",
            Self::Internal(_) => "internal",
        }
    }

    pub fn to_problem(&self) -> Problem {
        let status = self.status();
        let (detail, errors) = match self {
            Self::BadRequest { detail, errors }
            | Self::Conflict { detail, errors }
            | Self::Unprocessable { detail, errors }
            | Self::PluginFailed { detail, errors } => (detail.clone(), errors.clone()),
            Self::Internal(_) => (
                "the server failed to handle this request; it has been logged".to_owned(),
                vec![],
            ),
            other => (other.to_string(), vec![]),
        };
        Problem {
            kind: format!("https://business-store.dev/problems/{}", self.slug()),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail,
            errors,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(e) = &self {
            tracing::error!(error = format!("{e:#}"), "internal error");
        }
        let mut response = self.to_problem().into_response();
        let headers = response.headers_mut();
        if let Self::Unavailable {
            retry_after_secs, ..
        } = self
        {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        if let Self::RateLimited {
            retry_after_secs,
            policy,
            limit,
            ..
        } = &self
        {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            // A limit without a quota (none said) sends no empty header.
            for (name, value) in [("ratelimit-policy", policy), ("ratelimit", limit)] {
                if value.is_empty() {
                    continue;
                }
                if let Ok(value) = HeaderValue::from_str(value) {
                    headers.insert(name, value);
                }
            }
        }
        if matches!(self, Self::Unauthorized(_)) {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<crate::domain::ids::InvalidId> for ApiError {
    fn from(e: crate::domain::ids::InvalidId) -> Self {
        Self::bad_request(e.0)
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
