//! A native test harness: call your hook in a plain `cargo test`, decide
//! what `forward` answers, and see what was logged. Per thread, so tests
//! running in parallel do not see each other's fakes.
//!
//! ```
//! use bss_plugin::serde_json::{Value, json};
//! use bss_plugin::{Context, Level, ValidationHook, Violation, forward, log, testing};
//!
//! struct AsksTheTaskService;
//! impl ValidationHook for AsksTheTaskService {
//!     fn validate(_: &Context, record: &Value, _: Option<&Value>) -> Result<(), Vec<Violation>> {
//!         let answer = forward("task", "/api/task/schedule", record)
//!             .map_err(|e| vec![Violation::new("", e)])?;
//!         log(Level::Info, &format!("scheduled: {answer}"));
//!         Ok(())
//!     }
//! }
//!
//! testing::on_forward(|service, path, _body| {
//!     assert_eq!((service, path), ("task", "/api/task/schedule"));
//!     Ok(json!({"scheduled": true}))
//! });
//! let outcome = AsksTheTaskService::validate(&Context::for_test(json!({})), &json!({"total": 1}), None);
//! assert!(outcome.is_ok());
//! assert_eq!(testing::logs(), vec![(Level::Info, r#"scheduled: {"scheduled":true}"#.to_owned())]);
//! ```

use std::cell::RefCell;

use serde_json::Value;

use crate::Level;

type ForwardFn = Box<dyn Fn(&str, &str, &Value) -> Result<Value, String>>;

thread_local! {
    static FORWARD: RefCell<Option<ForwardFn>> = const { RefCell::new(None) };
    static LOGS: RefCell<Vec<(Level, String)>> = const { RefCell::new(Vec::new()) };
}

/// Sets what `forward` answers in this thread's tests.
pub fn on_forward(f: impl Fn(&str, &str, &Value) -> Result<Value, String> + 'static) {
    FORWARD.with(|cell| *cell.borrow_mut() = Some(Box::new(f)));
}

/// What was logged in this thread so far (and clears it).
pub fn logs() -> Vec<(Level, String)> {
    LOGS.with(|cell| std::mem::take(&mut *cell.borrow_mut()))
}

pub(crate) fn record_log(level: Level, message: &str) {
    LOGS.with(|cell| cell.borrow_mut().push((level, message.to_owned())));
}

pub(crate) fn fake_forward(service: &str, path: &str, body: &Value) -> Result<Value, String> {
    FORWARD.with(|cell| match &*cell.borrow() {
        Some(f) => f(service, path, body),
        None => Err(format!(
            "forward({service}, {path}) called in a test without testing::on_forward"
        )),
    })
}
