//! An example validation hook, and the template to copy: refuses a record
//! whose `total` is negative, or above `max_total` when the plugin's config
//! sets one.

use bss_plugin::serde_json::Value;
use bss_plugin::{Context, Level, ValidationHook, Violation, log};

/// The hook.
pub struct NoNegativeTotals;

impl ValidationHook for NoNegativeTotals {
    fn validate(
        ctx: &Context,
        record: &Value,
        _previous: Option<&Value>,
    ) -> Result<(), Vec<Violation>> {
        let Some(total) = record.get("total").and_then(Value::as_f64) else {
            return Ok(());
        };
        if total < 0.0 {
            log(Level::Info, "refused a negative total");
            return Err(vec![
                Violation::new("/total", "a total cannot be negative").with_code("negative-total"),
            ]);
        }
        match ctx.config.get("max_total").and_then(Value::as_f64) {
            Some(max) if total > max => Err(vec![Violation::new(
                "/total",
                format!("a total cannot exceed {max} for {}", ctx.tenant_id),
            )]),
            _ => Ok(()),
        }
    }
}

bss_plugin::export_validation_hook!(NoNegativeTotals);

#[cfg(test)]
mod tests {
    use super::*;
    use bss_plugin::serde_json::json;
    use bss_plugin::testing;

    #[test]
    fn a_negative_total_is_refused_with_its_path_and_logged() {
        let ctx = Context::for_test(json!({}));
        let errors = NoNegativeTotals::validate(&ctx, &json!({"total": -1}), None).unwrap_err();
        assert_eq!(errors[0].path, "/total");
        assert_eq!(errors[0].code.as_deref(), Some("negative-total"));
        assert_eq!(
            testing::logs(),
            vec![(Level::Info, "refused a negative total".to_owned())]
        );
    }

    #[test]
    fn the_configured_maximum_applies() {
        let ctx = Context::for_test(json!({"max_total": 100}));
        assert!(NoNegativeTotals::validate(&ctx, &json!({"total": 100}), None).is_ok());
        assert!(NoNegativeTotals::validate(&ctx, &json!({"total": 101}), None).is_err());
        assert!(NoNegativeTotals::validate(&ctx, &json!({"name": "no total"}), None).is_ok());
    }
}
