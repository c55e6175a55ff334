//! Example event enricher, and the template to copy for enrichers: adds
//! `large: true|false` to events of invoices (by `config.threshold`,
//! default 10,000; the resource must publish full events, `x-event-payload:
//! full`, for the total to be there), and drops the events of draft
//! invoices.

use bss_plugin::serde_json::{Value, json};
use bss_plugin::{Context, EventEnricher};

/// The enricher.
pub struct LargeInvoices;

impl EventEnricher for LargeInvoices {
    fn enrich(ctx: &Context, mut event: Value) -> Option<Value> {
        let record = &event["data"]["data"];
        if record["status"] == "draft" {
            return None;
        }
        let threshold = ctx.config["threshold"].as_f64().unwrap_or(10_000.0);
        let large = record["total"].as_f64().is_some_and(|t| t >= threshold);
        event["large"] = json!(large);
        Some(event)
    }
}

bss_plugin::export_event_enricher!(LargeInvoices);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_large_invoices_and_drops_drafts() {
        let ctx = Context::for_test(json!({"threshold": 100}));
        let event = |total: i64, status: &str| json!({"data": {"data": {"total": total, "status": status}}});
        assert_eq!(
            LargeInvoices::enrich(&ctx, event(150, "open")).unwrap()["large"],
            true
        );
        assert_eq!(
            LargeInvoices::enrich(&ctx, event(50, "open")).unwrap()["large"],
            false
        );
        assert!(LargeInvoices::enrich(&ctx, event(150, "draft")).is_none());
    }
}
