//! A validation hook that sleeps for a minute, for the sandbox tests: a
//! wait inside a host call must still end at the call's deadline.

use bss_plugin::serde_json::Value;
use bss_plugin::{Context, ValidationHook, Violation};

/// The hook.
pub struct Sleeper;

impl ValidationHook for Sleeper {
    fn validate(
        _ctx: &Context,
        _record: &Value,
        _prev: Option<&Value>,
    ) -> Result<(), Vec<Violation>> {
        std::thread::sleep(std::time::Duration::from_secs(60));
        Ok(())
    }
}

bss_plugin::export_validation_hook!(Sleeper);
