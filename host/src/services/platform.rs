//! The platform services plugins may reach through the host's `forward`
//! function: `validation` (the Validation Service) and `task` (the Task
//! Execution Service). Each goes through the resilient client of its service
//! when its URL is configured; otherwise a built-in stand-in answers, so a
//! local installation behaves like a platform with permissive peers.
//!
//! A plugin reaches only the paths its service serves to plugins
//! ([`PLUGIN_PATHS`]); anything else is refused here, before any network
//! call, so a plugin cannot probe a peer's other endpoints. Each tenant's
//! calls have their own breaker (see [`ServiceClient`]), and the errors a
//! plugin sees (and may put in a violation) are worded by the host.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::tasks::TaskQueue;

use super::{CallError, ServiceClient};

/// The paths each service serves to plugins. (`/api/validation/validateSchema`
/// is the host's own, for schema changes.)
pub const PLUGIN_PATHS: [(&str, &[&str]); 2] = [
    ("validation", &["/api/validation/validateRecord"]),
    ("task", &["/api/task/schedule"]),
];

/// The services a plugin can be granted: those of [`PLUGIN_PATHS`].
pub const SERVICES: [&str; PLUGIN_PATHS.len()] = {
    let mut names = [""; PLUGIN_PATHS.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = PLUGIN_PATHS[i].0;
        i += 1;
    }
    names
};

#[derive(Debug)]
pub struct PlatformServices {
    validation: Option<ServiceClient>,
    task: Option<ServiceClient>,
    /// Where enrichers' tasks go (see [`crate::tasks`]).
    queue: Option<Arc<TaskQueue>>,
}

impl PlatformServices {
    pub fn new(validation: Option<ServiceClient>, task: Option<ServiceClient>) -> Self {
        Self {
            validation,
            task,
            queue: None,
        }
    }

    /// Where enrichers' `POST /api/task/schedule` calls are queued (see
    /// [`crate::tasks::PluginTask`]).
    pub fn with_queue(mut self, queue: Arc<TaskQueue>) -> Self {
        self.queue = Some(queue);
        self
    }

    pub fn task_queue(&self) -> Option<&Arc<TaskQueue>> {
        self.queue.as_ref()
    }

    /// Calls `path` of `service` with a JSON body on behalf of `tenant`.
    /// The error is a message for the plugin (it never
    /// names hosts).
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
        check_path(service, path)?;
        match remote {
            Some(client) => client
                .call_for(path, Some(body), Some(tenant))
                .await
                .map_err(|e| for_plugin(service, e)),
            None => stand_in(service, path, tenant, body),
        }
    }
}

/// Refuses a path the service does not serve to plugins.
fn check_path(service: &str, path: &str) -> Result<(), String> {
    let served = PLUGIN_PATHS
        .iter()
        .find(|(s, _)| *s == service)
        .map_or(&[][..], |(_, paths)| *paths);
    if served.contains(&path) {
        return Ok(());
    }
    Err(format!(
        "the {service} service does not serve {path:?} to plugins; it serves {}",
        served.join(", ")
    ))
}

/// The plugin's view of a failed call: never a peer's body or address.
fn for_plugin(service: &str, e: CallError) -> String {
    match e {
        CallError::CircuitOpen { retry_after, .. } => format!(
            "the {service} service is failing; this tenant's calls are paused for {} s",
            retry_after.as_secs().max(1)
        ),
        CallError::Unavailable { reason, .. } => {
            format!("the {service} service is unavailable: {reason}")
        }
        CallError::Rejected { reason, .. } => {
            format!("the {service} service refused the request ({reason})")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugins_reach_only_the_paths_a_service_serves() {
        assert!(check_path("validation", "/api/validation/validateRecord").is_ok());
        assert!(check_path("task", "/api/task/schedule").is_ok());
        let refused = check_path("validation", "/api/validation/validateSchema");
        assert!(refused.is_err_and(|e| e.contains("serves /api/validation/validateRecord")));
        assert!(check_path("task", "/api/validation/validateRecord").is_err());
        assert!(check_path("validation", "/").is_err());
        assert_eq!(SERVICES, ["validation", "task"]);
    }
}
