//! What the service does with the events it consumes: `auth.tenant.created`
//! provisions the tenant, `auth.tenant.deleted` archives it; both are
//! idempotent. A malformed message is reported (the caller dead-letters and
//! skips it); a transient failure (database down) is retried, never skipped.

use std::time::Duration;

use serde_json::Value;

use crate::app_state::SharedState;
use crate::domain::TenantId;
use crate::storage::{StorageError, tenants};

pub const TENANT_CREATED: &str = "auth.tenant.created";
pub const TENANT_DELETED: &str = "auth.tenant.deleted";
pub const CONSUMED_TOPICS: &[&str] = &[TENANT_CREATED, TENANT_DELETED];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Provisioned,
    AlreadyExisted,
    Archived,
    AlreadyGone,
    /// Not a message we can act on; the reason says why.
    Malformed(String),
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Provisioned => "provisioned",
            Self::AlreadyExisted => "already_existed",
            Self::Archived => "archived",
            Self::AlreadyGone => "already_gone",
            Self::Malformed(_) => "malformed",
        }
    }
}

/// Reads `{"tenantId", "name"?}`, bare or as the `data` of a CloudEvent.
fn parse(payload: &[u8]) -> Result<(TenantId, Option<String>), String> {
    let v: Value = serde_json::from_slice(payload).map_err(|e| format!("not JSON: {e}"))?;
    let body = match v.get("data") {
        Some(d) if d.is_object() => d,
        _ => &v,
    };
    let id = body
        .get("tenantId")
        .and_then(Value::as_str)
        .ok_or("no string tenantId")?;
    let id = TenantId::parse(id).map_err(|e| e.0)?;
    let name = body.get("name").and_then(Value::as_str).map(str::to_owned);
    if name.as_deref().is_some_and(|n| n.contains('\0')) {
        return Err("the name contains U+0000, which cannot be stored".into());
    }
    Ok((id, name))
}

/// Applies one message once.
pub async fn handle(
    state: &SharedState,
    topic: &str,
    payload: &[u8],
) -> Result<Outcome, StorageError> {
    let (tenant, name) = match parse(payload) {
        Ok(p) => p,
        Err(reason) => return Ok(Outcome::Malformed(reason)),
    };
    match topic {
        TENANT_CREATED => {
            if let Some(why) = tenant.reserved() {
                return Ok(Outcome::Malformed(why));
            }
            let name = match name {
                Some(n) => Some(n),
                None => name_from_auth(state, &tenant).await,
            };
            let named = name.is_some();
            let name = name.unwrap_or_else(|| tenant.as_str().to_owned());
            match tenants::create(&state.pool, &tenant, &name, &state.settings.analytics_role)
                .await?
            {
                Some(_) => {
                    if !named && state.auth.service().is_some() {
                        tokio::spawn(name_later(state.clone(), tenant.clone()));
                    }
                    state.schemas.forget_tenant(&tenant);
                    state.gate.reset(tenant.as_str());
                    Ok(Outcome::Provisioned)
                }
                None => Ok(Outcome::AlreadyExisted),
            }
        }
        TENANT_DELETED => {
            if tenants::archive(&state.pool, &tenant, state.settings.tenant_grace_secs).await? {
                state.schemas.forget_tenant(&tenant);
                state.gate.forget(tenant.as_str());
                Ok(Outcome::Archived)
            } else {
                Ok(Outcome::AlreadyGone)
            }
        }
        other => Ok(Outcome::Malformed(format!("no handler for topic {other}"))),
    }
}

/// The tenant's name as the Auth Service knows it (`GET
/// /api/auth/tenants/{id}` → `{"name"}`), when tokens come from it.
async fn name_from_auth(state: &SharedState, tenant: &TenantId) -> Option<String> {
    let client = state.auth.service()?;
    let path = format!("/api/auth/tenants/{}", tenant.as_str());
    match client.call(&path, None).await {
        Ok(answer) => answer
            .get("name")
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|n| !n.is_empty() && n.len() <= 200 && !n.contains('\0'))
            .map(str::to_owned),
        Err(e) => {
            tracing::info!(tenant = tenant.as_str(), error = %e, "no tenant name from the Auth Service yet");
            None
        }
    }
}

/// Asks the Auth Service again for the name of a tenant provisioned under
/// its id, with backoff (1 s to 32 s, six times): provisioning never waits
/// for it.
async fn name_later(state: SharedState, tenant: TenantId) {
    let mut pause = Duration::from_secs(1);
    for _ in 0..6 {
        tokio::time::sleep(pause).await;
        if let Some(name) = name_from_auth(&state, &tenant).await {
            if let Err(e) = tenants::name_if_unnamed(&state.pool, &tenant, &name).await {
                tracing::warn!(tenant = tenant.as_str(), error = %e, "naming the tenant failed");
            }
            return;
        }
        pause *= 2;
    }
}

/// Whether a failure will pass if the message is tried again: the database
/// unreachable or busy, not a message it refuses (bad data, constraint).
fn transient(e: &StorageError) -> bool {
    let StorageError::Db(e) = e else {
        return false;
    };
    match crate::storage::database::pg_code(e) {
        // Data exceptions, integrity constraints, syntax or access rules:
        // the same message fails the same way every time.
        Some(code) => !matches!(&code[..2], "22" | "23" | "42" | "2B" | "44"),
        None => true,
    }
}

/// Applies a message, retrying transient failures until it is done. A
/// message the database refuses for what it says is not retried: it is
/// reported as malformed (dead-lettered by the caller).
pub async fn handle_until_done(state: &SharedState, topic: &str, payload: &[u8]) -> Outcome {
    let mut backoff = Duration::from_millis(200);
    loop {
        let result = match handle(state, topic, payload).await {
            Err(e) if !transient(&e) => {
                metrics::counter!("consumer_errors_total", "kind" => "permanent").increment(1);
                Ok(Outcome::Malformed(format!("cannot be applied: {e}")))
            }
            other => other,
        };
        match result {
            Ok(outcome) => {
                metrics::counter!("consumer_messages_total", "topic" => topic.to_owned(), "outcome" => outcome.label())
                    .increment(1);
                if let Outcome::Malformed(reason) = &outcome {
                    tracing::warn!(topic, reason, "skipping a malformed message");
                }
                return outcome;
            }
            Err(e) => {
                metrics::counter!("consumer_errors_total", "kind" => "transient").increment(1);
                tracing::warn!(topic, error = %e, "applying a consumed message failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_read_bare_or_as_cloudevents() {
        let (id, name) =
            parse(br#"{"tenantId": "abc-1", "name": "ABC"}"#).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((id.as_str(), name.as_deref()), ("abc-1", Some("ABC")));
        let (id, _) = parse(br#"{"specversion": "1.0", "data": {"tenantId": "x"}}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(id.as_str(), "x");
        assert!(parse(b"nope").is_err());
        assert!(parse(br#"{"tenantId": "Bad_Id"}"#).is_err());
        assert!(parse(br#"{"tenant": "x"}"#).is_err());
        assert!(parse(br#"{"tenantId": "x", "name": "a\u0000b"}"#).is_err());
    }
}
