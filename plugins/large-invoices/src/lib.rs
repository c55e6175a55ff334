//! Example event enricher, and the template to copy for enrichers: adds
//! `large: true|false` to events of invoices (by `config.threshold`,
//! default 10,000; the resource must publish full events, `x-event-payload:
//! full`, for the total to be there), and drops the events of draft
//! invoices.

use bss_plugin::{Context, Event, EventEnricher};

/// The enricher.
pub struct LargeInvoices;

impl EventEnricher for LargeInvoices {
    fn enrich(ctx: &Context, mut event: Event) -> Option<Event> {
        let record = event.record().cloned().unwrap_or_default();
        if record["status"] == "draft" {
            return None;
        }
        let threshold = ctx.config["threshold"].as_f64().unwrap_or(10_000.0);
        let large = record["total"].as_f64().is_some_and(|t| t >= threshold);
        event.set_extension("large", large);
        Some(event)
    }
}

bss_plugin::export_event_enricher!(LargeInvoices);

#[cfg(test)]
mod tests {
    use super::*;
    use bss_plugin::ChangeKind;
    use bss_plugin::serde_json::json;

    #[test]
    fn marks_large_invoices_and_drops_drafts() {
        let ctx = Context::for_test(json!({"threshold": 100}));
        let event = |total: i64, status: &str| {
            let record = json!({"total": total, "status": status});
            Event::for_test(ChangeKind::Created, "invoices", "1", Some(record))
        };
        let large = |e: Option<Event>| e.unwrap().extension("large").cloned();
        assert_eq!(
            large(LargeInvoices::enrich(&ctx, event(150, "open"))),
            Some(json!(true))
        );
        assert_eq!(
            large(LargeInvoices::enrich(&ctx, event(50, "open"))),
            Some(json!(false))
        );
        assert!(LargeInvoices::enrich(&ctx, event(150, "draft")).is_none());
    }
}
