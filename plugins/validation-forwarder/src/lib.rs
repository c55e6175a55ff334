//! Default plugin: a validation hook that forwards each record to the
//! Validation Service (`POST /api/validation/validateRecord` with
//! `{tenantId, resource, operation, record}`, answered by `{valid, errors:
//! [{path, message, code?}]}`) and refuses what it refuses. When the service
//! cannot be reached the write is refused (`"failOpen": true` in the config
//! accepts it instead). Config `"path"` changes the service path.
//! The manifest must grant the `validation` service.

use bss_plugin::serde_json::{Value, json};
use bss_plugin::{Context, Level, ValidationHook, Violation, forward, log};

/// The hook.
pub struct ValidationForwarder;

impl ValidationHook for ValidationForwarder {
    fn validate(
        ctx: &Context,
        record: &Value,
        _previous: Option<&Value>,
    ) -> Result<(), Vec<Violation>> {
        let path = ctx.config["path"]
            .as_str()
            .unwrap_or("/api/validation/validateRecord");
        let request = json!({
            "tenantId": ctx.tenant_id,
            "resource": ctx.resource,
            "operation": ctx.operation,
            "record": record,
        });
        let answer = match forward("validation", path, &request) {
            Ok(a) => a,
            Err(e) if ctx.config["failOpen"] == true => {
                log(
                    Level::Warn,
                    &format!("validation service unreachable, accepting: {e}"),
                );
                return Ok(());
            }
            Err(e) => {
                return Err(vec![
                    Violation::new(
                        "",
                        format!("the Validation Service could not check the record: {e}"),
                    )
                    .with_code("validation-service-unavailable"),
                ]);
            }
        };
        if answer["valid"] != false {
            return Ok(());
        }
        let errors: Vec<Violation> = answer["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                let v = Violation::new(
                    e["path"].as_str().unwrap_or_default(),
                    e["message"]
                        .as_str()
                        .unwrap_or("refused by the Validation Service"),
                );
                match e["code"].as_str() {
                    Some(code) => v.with_code(code),
                    None => v,
                }
            })
            .collect();
        if errors.is_empty() {
            Err(vec![Violation::new(
                "",
                "refused by the Validation Service",
            )])
        } else {
            Err(errors)
        }
    }
}

bss_plugin::export_validation_hook!(ValidationForwarder);

#[cfg(test)]
mod tests {
    use super::*;
    use bss_plugin::testing;

    #[test]
    fn the_services_errors_become_violations() {
        testing::on_forward(|service, path, body| {
            assert_eq!(
                (service, path),
                ("validation", "/api/validation/validateRecord")
            );
            assert_eq!(body["record"]["total"], -1);
            Ok(
                json!({"valid": false, "errors": [{"path": "/total", "message": "too low", "code": "min"}]}),
            )
        });
        let errors = ValidationForwarder::validate(
            &Context::for_test(json!({})),
            &json!({"total": -1}),
            None,
        )
        .unwrap_err();
        assert_eq!(
            errors,
            vec![Violation::new("/total", "too low").with_code("min")]
        );
    }

    #[test]
    fn unreachable_refuses_unless_fail_open() {
        testing::on_forward(|_, _, _| Err("down".into()));
        assert!(
            ValidationForwarder::validate(&Context::for_test(json!({})), &json!({}), None).is_err()
        );
        assert!(
            ValidationForwarder::validate(
                &Context::for_test(json!({"failOpen": true})),
                &json!({}),
                None
            )
            .is_ok()
        );
    }

    #[test]
    fn valid_records_pass() {
        testing::on_forward(|_, _, _| Ok(json!({"valid": true, "errors": []})));
        assert!(
            ValidationForwarder::validate(&Context::for_test(json!({})), &json!({}), None).is_ok()
        );
    }
}
