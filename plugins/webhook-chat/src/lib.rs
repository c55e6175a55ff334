//! Example webhook transformer: posts `{"text": "<type> <subject>"}` instead
//! of the raw event, and cancels deliveries of the event types listed in
//! `config.skip`.

use bss_plugin::serde_json::{Value, json};
use bss_plugin::{Context, WebhookRequest, WebhookTransformer};

/// The transformer.
pub struct WebhookChat;

impl WebhookTransformer for WebhookChat {
    fn transform(
        ctx: &Context,
        event: &Value,
        mut request: WebhookRequest,
    ) -> Option<WebhookRequest> {
        let kind = event["type"].as_str().unwrap_or_default();
        if ctx.config["skip"]
            .as_array()
            .is_some_and(|skip| skip.iter().any(|s| s.as_str() == Some(kind)))
        {
            return None;
        }
        let subject = event["subject"].as_str().unwrap_or_default();
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
        let event = json!({"type": "business_store.data.created", "subject": "invoices/7"});
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
    }
}
