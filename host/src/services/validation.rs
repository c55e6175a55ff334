//! Schema checks before a schema is applied: by the Validation Service
//! (`POST /api/validation/validateSchema`) when `VALIDATION_SERVICE_URL` is
//! set, else by the built-in meta-schema check. When the service is
//! unavailable the change is refused (503) unless the local fallback is
//! enabled, as the design notes require.
//!
//! The whole check fits in one budget (`service_timeout_ms`): with the
//! fallback on, the remote call gets the budget less a small reserve for the
//! local check, so a slow service never makes a schema change wait longer.

use std::time::Duration;

use serde_json::{Value, json};

use super::{CallError, ServiceClient};
use crate::catalog::compiled::check_document;
use crate::error::FieldError;

/// What the check concluded.
#[derive(Debug)]
pub enum SchemaCheck {
    Valid,
    Invalid(Vec<FieldError>),
    /// The service could not answer and no fallback is allowed.
    Unavailable {
        reason: String,
        retry_after: Duration,
    },
}

#[derive(Debug)]
pub struct ValidationService {
    remote: Option<ServiceClient>,
    fallback: bool,
}

impl ValidationService {
    pub fn new(remote: Option<ServiceClient>, fallback: bool) -> Self {
        Self { remote, fallback }
    }

    pub fn client(&self) -> Option<&ServiceClient> {
        self.remote.as_ref()
    }

    /// Checks a schema for `tenant`: only that tenant's failures pause its
    /// schema changes.
    pub async fn check_schema_for(
        &self,
        tenant: &str,
        resource: &str,
        schema: &Value,
    ) -> SchemaCheck {
        self.check(Some(tenant), resource, schema).await
    }

    async fn check(&self, tenant: Option<&str>, resource: &str, schema: &Value) -> SchemaCheck {
        let Some(remote) = &self.remote else {
            return local(schema);
        };
        let body = json!({"resource": resource, "schema": schema});
        let budget = if self.fallback {
            remote
                .budget()
                .saturating_sub(FALLBACK_RESERVE.min(remote.budget() / 10))
        } else {
            remote.budget()
        };
        let answer = remote
            .call_within(
                "/api/validation/validateSchema",
                Some(&body),
                tenant,
                budget,
            )
            .await;
        match answer {
            Ok(answer) => interpret(&answer),
            Err(e) if self.fallback => {
                tracing::warn!(error = %e, "validation service unavailable; using the local meta-schema check");
                local(schema)
            }
            Err(CallError::CircuitOpen { retry_after, .. }) => SchemaCheck::Unavailable {
                reason: "the Validation Service is failing; schema changes are paused".into(),
                retry_after,
            },
            Err(e) => SchemaCheck::Unavailable {
                reason: e.to_string(),
                retry_after: Duration::from_secs(5),
            },
        }
    }
}

/// Time kept from the remote call's budget for the local check (at most a
/// tenth of the budget).
const FALLBACK_RESERVE: Duration = Duration::from_millis(200);

fn local(schema: &Value) -> SchemaCheck {
    match check_document(schema) {
        Ok(()) => SchemaCheck::Valid,
        Err(errors) => SchemaCheck::Invalid(errors),
    }
}

/// Reads `{"valid": bool, "errors": [{"path", "message"}]}`.
fn interpret(answer: &Value) -> SchemaCheck {
    if answer.get("valid").and_then(Value::as_bool) == Some(true) {
        return SchemaCheck::Valid;
    }
    let errors: Vec<FieldError> = answer
        .get("errors")
        .and_then(Value::as_array)
        .map(|errs| {
            errs.iter()
                .map(|e| FieldError {
                    path: format!(
                        "/schema{}",
                        e.get("path").and_then(Value::as_str).unwrap_or_default()
                    ),
                    message: e
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("invalid")
                        .to_owned(),
                    source: "validation-service".into(),
                    code: None,
                    record_id: None,
                })
                .collect()
        })
        .unwrap_or_default();
    if errors.is_empty() {
        SchemaCheck::Invalid(vec![FieldError::schema(
            "/schema",
            "the Validation Service rejected the schema",
        )])
    } else {
        SchemaCheck::Invalid(errors)
    }
}
