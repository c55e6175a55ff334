//! Default plugin: an event enricher that schedules work on the Task
//! Execution Service (`POST /api/task/schedule`) for each event it sees,
//! e.g. regenerating embeddings when a record changes, and records the
//! scheduled task on the event (extension attribute `scheduledtask`, and
//! `data.task`). If the service cannot be reached the event goes on
//! unchanged, with the reason in `schedulingerror`.
//!
//! Config: `{"task": "regenerate-embeddings"}` (the task name; that is the
//! default), optionally `"types"`: event types to act on (default all).
//! The manifest must grant the `task` service.

use bss_plugin::serde_json::json;
use bss_plugin::{Context, Event, EventEnricher, Level, forward, log};

/// The enricher.
pub struct TaskScheduler;

impl EventEnricher for TaskScheduler {
    fn enrich(ctx: &Context, mut event: Event) -> Option<Event> {
        if let Some(types) = ctx.config["types"].as_array()
            && !types
                .iter()
                .any(|t| t.as_str() == Some(ctx.operation.as_str()))
        {
            return Some(event);
        }
        let task = ctx.config["task"]
            .as_str()
            .unwrap_or("regenerate-embeddings");
        let request = json!({
            "task": task,
            "tenantId": ctx.tenant_id,
            "resource": ctx.resource,
            "event": {"id": event.id, "type": event.event_type, "subject": event.subject},
        });
        match forward("task", "/api/task/schedule", &request) {
            Ok(answer) => {
                let id = answer["taskId"].clone();
                event.set_extension("scheduledtask", id.clone());
                if let Some(data) = event.data.as_object_mut() {
                    data.insert("task".into(), json!({"name": task, "id": id}));
                }
            }
            Err(e) => {
                log(Level::Warn, &format!("scheduling {task} failed: {e}"));
                event.set_extension("schedulingerror", e);
            }
        }
        Some(event)
    }
}

bss_plugin::export_event_enricher!(TaskScheduler);

#[cfg(test)]
mod tests {
    use super::*;
    use bss_plugin::testing;

    fn event() -> Event {
        Event::for_test(bss_plugin::ChangeKind::Created, "invoices", "1", None)
    }

    #[test]
    fn schedules_the_task_and_records_it_on_the_event() {
        testing::on_forward(|service, path, body| {
            assert_eq!((service, path), ("task", "/api/task/schedule"));
            assert_eq!(body["task"], "reindex");
            Ok(json!({"taskId": "t-1"}))
        });
        let mut ctx = Context::for_test(json!({"task": "reindex"}));
        ctx.operation = "business_store.data.created".into();
        let out = TaskScheduler::enrich(&ctx, event()).unwrap();
        assert_eq!(out.extension("scheduledtask"), Some(&json!("t-1")));
        assert_eq!(out.data["task"], json!({"name": "reindex", "id": "t-1"}));
    }

    #[test]
    fn a_failing_service_leaves_the_event_with_the_reason() {
        testing::on_forward(|_, _, _| Err("unavailable".into()));
        let out = TaskScheduler::enrich(&Context::for_test(json!({})), event()).unwrap();
        assert_eq!(
            out.extension("schedulingerror"),
            Some(&json!("unavailable"))
        );
        assert_eq!(testing::logs().len(), 1);
    }

    #[test]
    fn other_types_pass_through() {
        let ctx = Context::for_test(json!({"types": ["business_store.data.deleted"]}));
        assert_eq!(TaskScheduler::enrich(&ctx, event()).unwrap(), event());
    }
}
