//! An event enricher that is slow but succeeds, for the fairness tests: it
//! sleeps `config.sleepMs` (default 900 ms, under the 1 s deadline ceiling)
//! and marks the event `slow: true`. Its tenant's events wait for it; no
//! other tenant's may.

use bss_plugin::{Context, Event, EventEnricher};

/// The enricher.
pub struct SlowEnricher;

impl EventEnricher for SlowEnricher {
    fn enrich(ctx: &Context, mut event: Event) -> Option<Event> {
        let ms = ctx.config["sleepMs"].as_u64().unwrap_or(900);
        std::thread::sleep(std::time::Duration::from_millis(ms));
        event.set_extension("slow", true);
        Some(event)
    }
}

bss_plugin::export_event_enricher!(SlowEnricher);

#[cfg(test)]
mod tests {
    use super::*;
    use bss_plugin::ChangeKind;
    use bss_plugin::serde_json::json;

    #[test]
    fn marks_the_event_after_its_sleep() {
        let ctx = Context::for_test(json!({"sleepMs": 1}));
        let out = SlowEnricher::enrich(&ctx, Event::for_test(ChangeKind::Created, "a", "1", None));
        assert_eq!(
            out.and_then(|e| e.extension("slow").cloned()),
            Some(json!(true))
        );
    }
}
