//! The Business Store plugin SDK: write a validation hook, an event enricher
//! or a webhook transformer as a plain Rust trait implementation, test it
//! natively with `cargo test`, and build it to a component with
//! `cargo build --target wasm32-wasip2 --release`.
//!
//! ```
//! use bss_plugin::{Context, ValidationHook, Violation, serde_json::Value};
//!
//! struct NoNegativeTotals;
//!
//! impl ValidationHook for NoNegativeTotals {
//!     fn validate(_ctx: &Context, record: &Value, _previous: Option<&Value>) -> Result<(), Vec<Violation>> {
//!         match record["total"].as_f64() {
//!             Some(t) if t < 0.0 => Err(vec![Violation::new("/total", "a total cannot be negative")]),
//!             _ => Ok(()),
//!         }
//!     }
//! }
//!
//! bss_plugin::export_validation_hook!(NoNegativeTotals);
//! ```
//!
//! The SDK hides the generated WIT bindings: plugin code sees only the types
//! of this crate. In a native build (tests) the host functions are served by
//! [`testing`], where a test sets what `forward` answers and reads what was
//! logged.
#![deny(missing_docs)]

use std::marker::PhantomData;

pub use serde_json;
use serde_json::Value;

mod host_calls;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

pub use host_calls::{Level, forward, log};

#[doc(hidden)]
pub mod validation_hook {
    wit_bindgen::generate!({
        path: "../wit",
        world: "validation-hook",
        pub_export_macro: true,
        export_macro_name: "__export_validation_hook",
        default_bindings_module: "bss_plugin::validation_hook",
    });
}

/// What a call is about.
#[derive(Debug, Clone, PartialEq)]
pub struct Context {
    /// The tenant whose data this is.
    pub tenant_id: String,
    /// The resource (`invoices`).
    pub resource: String,
    /// `create`, `replace`, `patch`, `delete` or `batch` (validation hooks);
    /// the event type (enrichers, transformers).
    pub operation: String,
    /// Who caused the call (`user:<sub>`).
    pub actor: String,
    /// The request id, for logs.
    pub request_id: String,
    /// The plugin's configuration from its manifest (`{}` when none).
    pub config: Value,
}

impl Context {
    /// A context for tests: tenant `test`, resource `records`, operation `create`.
    pub fn for_test(config: Value) -> Self {
        Self {
            tenant_id: "test".into(),
            resource: "records".into(),
            operation: "create".into(),
            actor: "user:test".into(),
            request_id: "test-request".into(),
            config,
        }
    }
}

/// Why a record is refused: where and what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// A JSON Pointer into the record (`/total`); empty for the whole record.
    pub path: String,
    /// What the client should fix.
    pub message: String,
    /// A stable machine-readable code, if any.
    pub code: Option<String>,
}

impl Violation {
    /// A violation at `path` with `message`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
            code: None,
        }
    }

    /// The same violation with a machine-readable code.
    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }
}

/// A validation hook: runs in the write path after JSON Schema validation.
pub trait ValidationHook {
    /// Accepts the record, or refuses it with what to fix. `previous` is the
    /// stored record on replace, patch and delete.
    fn validate(
        ctx: &Context,
        record: &Value,
        previous: Option<&Value>,
    ) -> Result<(), Vec<Violation>>;
}

/// Adapts a [`ValidationHook`] to the generated bindings (used by
/// [`export_validation_hook!`]).
#[doc(hidden)]
pub struct ValidationHookExport<T>(PhantomData<T>);

fn parse(what: &str, text: &str) -> Result<Value, Vec<Violation>> {
    serde_json::from_str(text).map_err(|e| {
        vec![Violation::new(
            "",
            format!("the host sent {what} that is not JSON: {e}"),
        )]
    })
}

impl<T: ValidationHook> validation_hook::Guest for ValidationHookExport<T> {
    fn validate(
        ctx: validation_hook::bss::plugin::types::Context,
        record: String,
        previous: Option<String>,
    ) -> Result<(), Vec<validation_hook::bss::plugin::types::Violation>> {
        let run = || -> Result<(), Vec<Violation>> {
            let ctx = Context {
                config: serde_json::from_str(&ctx.config).unwrap_or(Value::Null),
                tenant_id: ctx.tenant_id,
                resource: ctx.resource,
                operation: ctx.operation,
                actor: ctx.actor,
                request_id: ctx.request_id,
            };
            let record = parse("a record", &record)?;
            let previous = previous
                .as_deref()
                .map(|p| parse("a previous record", p))
                .transpose()?;
            T::validate(&ctx, &record, previous.as_ref())
        };
        run().map_err(|vs| {
            vs.into_iter()
                .map(|v| validation_hook::bss::plugin::types::Violation {
                    path: v.path,
                    message: v.message,
                    code: v.code,
                })
                .collect()
        })
    }
}

/// Exports a [`ValidationHook`] as the component's `validate` (call it once,
/// at the crate root of a `cdylib` plugin).
#[macro_export]
macro_rules! export_validation_hook {
    ($hook:ty) => {
        #[cfg(target_arch = "wasm32")]
        type __BssValidationHook = $crate::ValidationHookExport<$hook>;
        #[cfg(target_arch = "wasm32")]
        $crate::validation_hook::__export_validation_hook!(__BssValidationHook with_types_in $crate::validation_hook);
    };
}
