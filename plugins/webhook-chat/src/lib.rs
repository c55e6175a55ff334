//! Example webhook transformer: posts `{"text": "<type> <subject>"}` instead
//! of the raw event (to `config.path` when set), cancels deliveries of the
//! event types listed in `config.skip`, and traps on those in
//! `config.trapOn` (to show what a failing transformer does).

use bss_plugin::serde_json::json;
use bss_plugin::{Context, Event, WebhookRequest, WebhookTransformer};

/// The transformer.
pub struct WebhookChat;

impl WebhookTransformer for WebhookChat {
    fn transform(
        ctx: &Context,
        event: &Event,
        mut request: WebhookRequest,
    ) -> Option<WebhookRequest> {
        let kind = event.event_type.as_str();
        let listed = |key: &str| {
            ctx.config[key]
                .as_array()
                .is_some_and(|types| types.iter().any(|s| s.as_str() == Some(kind)))
        };
        if listed("trapOn") {
            panic!("webhook-chat was asked to trap on {kind}");
        }
        if listed("skip") {
            return None;
        }
        if let Some(path) = ctx.config["path"].as_str() {
            request.path = path.to_owned();
        }
        let subject = event.subject.as_deref().unwrap_or_default();
        request.body = json!({"text": format!("{kind} {subject}")}).to_string();
        request
            .headers
            .retain(|(k, _)| !k.eq_ignore_ascii_case("content-type"));
        request
            .headers
            .push(("content-type".into(), "application/json".into()));
        Some(request)
    }
}

bss_plugin::export_webhook_transformer!(WebhookChat);

#[cfg(test)]
mod tests {
    use super::*;
    use bss_plugin::ChangeKind;

    fn request() -> WebhookRequest {
        WebhookRequest {
            method: "POST".into(),
            path: "/hooks/1".into(),
            headers: vec![("content-type".into(), "application/cloudevents+json".into())],
            body: "{}".into(),
        }
    }

    #[test]
    fn rewrites_the_body_and_cancels_skipped_types() {
        let event = Event::for_test(ChangeKind::Created, "invoices", "7", None);
        let out = WebhookChat::transform(&Context::for_test(json!({})), &event, request()).unwrap();
        assert_eq!(
            out.body,
            r#"{"text":"business_store.data.created invoices/7"}"#
        );
        assert_eq!(
            out.headers,
            vec![("content-type".to_owned(), "application/json".to_owned())]
        );
        let skip = Context::for_test(json!({"skip": ["business_store.data.created"]}));
        assert!(WebhookChat::transform(&skip, &event, request()).is_none());
        let moved = Context::for_test(json!({"path": "/chat?room=1"}));
        let out = WebhookChat::transform(&moved, &event, request()).unwrap();
        assert_eq!(out.path, "/chat?room=1");
    }

    #[test]
    #[should_panic(expected = "asked to trap")]
    fn traps_on_the_listed_types() {
        let event = Event::for_test(ChangeKind::Updated, "invoices", "7", None);
        let trap = Context::for_test(json!({"trapOn": ["business_store.data.updated"]}));
        WebhookChat::transform(&trap, &event, request());
    }
}
