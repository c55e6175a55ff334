//! The platform services plugins may reach through the host's `forward`
//! function: `validation` (the Validation Service) and `task` (the Task
//! Execution Service). Each goes through the resilient client of its service
//! when its URL is configured; otherwise a built-in stand-in answers, so a
//! local installation behaves like a platform with permissive peers.

use serde_json::{Value, json};

use super::{CallError, ServiceClient};

/// The services a plugin can be granted.
pub const SERVICES: [&str; 2] = ["validation", "task"];

#[derive(Debug)]
pub struct PlatformServices {
    validation: Option<ServiceClient>,
    task: Option<ServiceClient>,
}

impl PlatformServices {
    pub fn new(validation: Option<ServiceClient>, task: Option<ServiceClient>) -> Self {
        Self { validation, task }
    }

    /// Calls `path` of `service` with a JSON body on behalf of `tenant`.
    /// The error is a message for the plugin (it never names hosts).
    pub async fn forward(
        &self,
        service: &str,
        path: &str,
        tenant: &str,
        body: &Value,
    ) -> Result<Value, String> {
        let remote = match service {
            "validation" => self.validation.as_ref(),
            "task" => self.task.as_ref(),
            other => return Err(format!("no platform service named {other:?}")),
        };
        match remote {
            Some(client) => client
                .call_for(path, Some(body), Some(tenant))
                .await
                .map_err(|e| match e {
                    CallError::CircuitOpen { retry_after, .. } => format!(
                        "the {service} service is failing; calls are paused for {} s",
                        retry_after.as_secs().max(1)
                    ),
                    // Transport errors name internal addresses: not for plugins.
                    CallError::Unavailable { .. } => {
                        format!("the {service} service is unavailable")
                    }
                    rejected @ CallError::Rejected { .. } => rejected.to_string(),
                }),
            None => stand_in(service, path, tenant, body),
        }
    }
}

/// The built-in stand-ins of unconfigured services.
fn stand_in(service: &str, path: &str, tenant: &str, body: &Value) -> Result<Value, String> {
    match (service, path) {
        // No rules beyond the JSON Schema the record already passed.
        ("validation", "/api/validation/validateRecord") => {
            Ok(json!({"valid": true, "errors": []}))
        }
        ("task", "/api/task/schedule") => {
            let id = uuid::Uuid::now_v7().to_string();
            metrics::counter!("task_service_local_scheduled_total").increment(1);
            tracing::info!(tenant, task_id = %id, task = %body, "task scheduled (built-in Task Execution stand-in)");
            Ok(json!({"taskId": id, "status": "scheduled"}))
        }
        _ => Err(format!(
            "the built-in {service} service does not serve {path}; configure its URL to reach the real one"
        )),
    }
}
