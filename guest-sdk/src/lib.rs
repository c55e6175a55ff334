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
//! A plugin crate is a `cdylib` that enables the SDK feature of its world
//! (exactly one: `validation-hook`, `event-enricher` or
//! `webhook-transformer`), implements the world's trait and calls its export
//! macro once. See [`ValidationHook`], [`EventEnricher`] and
//! [`WebhookTransformer`] for a complete example each; the `plugins/`
//! folder of the repository has crates to copy.
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib", "rlib"]
//!
//! [dependencies]
//! bss-plugin-sdk = { version = "0.1", features = ["validation-hook"] }
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

mod event;
mod host_calls;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

pub use event::{ChangeKind, Event, RecordChange};
pub use host_calls::{Level, forward, log};

#[cfg(all(
    target_arch = "wasm32",
    not(any(
        feature = "validation-hook",
        feature = "event-enricher",
        feature = "webhook-transformer"
    ))
))]
compile_error!(
    "enable the bss-plugin-sdk feature of your plugin's world: validation-hook, event-enricher or webhook-transformer"
);

#[doc(hidden)]
#[cfg(feature = "validation-hook")]
pub mod validation_hook {
    wit_bindgen::generate!({
        path: "wit",
        world: "validation-hook",
        pub_export_macro: true,
        export_macro_name: "__export_validation_hook",
        default_bindings_module: "bss_plugin::validation_hook",
    });
}

#[doc(hidden)]
#[cfg(feature = "event-enricher")]
pub mod event_enricher {
    wit_bindgen::generate!({
        path: "wit",
        world: "event-enricher",
        pub_export_macro: true,
        export_macro_name: "__export_event_enricher",
        default_bindings_module: "bss_plugin::event_enricher",
    });
}

#[doc(hidden)]
#[cfg(feature = "webhook-transformer")]
pub mod webhook_transformer {
    wit_bindgen::generate!({
        path: "wit",
        world: "webhook-transformer",
        pub_export_macro: true,
        export_macro_name: "__export_webhook_transformer",
        default_bindings_module: "bss_plugin::webhook_transformer",
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

/// A validation hook: runs in the write path after JSON Schema validation,
/// for the resources its manifest binds; refusing a record answers the
/// client 422 with the violations (`source: "plugin:<name>"`).
///
/// Feature `validation-hook`. A complete plugin:
///
/// ```
/// use bss_plugin::serde_json::{Value, json};
/// use bss_plugin::{Context, ValidationHook, Violation};
///
/// /// Refuses invoices whose lines do not add up to the total.
/// pub struct TotalsAddUp;
///
/// impl ValidationHook for TotalsAddUp {
///     fn validate(_ctx: &Context, record: &Value, _previous: Option<&Value>) -> Result<(), Vec<Violation>> {
///         let lines: f64 = record["lines"].as_array().into_iter().flatten()
///             .filter_map(|l| l["amount"].as_f64()).sum();
///         match record["total"].as_f64() {
///             Some(total) if (total - lines).abs() > 0.005 => Err(vec![
///                 Violation::new("/total", format!("the lines add up to {lines}, not {total}"))
///                     .with_code("total-mismatch"),
///             ]),
///             _ => Ok(()),
///         }
///     }
/// }
///
/// bss_plugin::export_validation_hook!(TotalsAddUp);
///
/// // A native test:
/// let ctx = Context::for_test(json!({}));
/// assert!(TotalsAddUp::validate(&ctx, &json!({"total": 3, "lines": [{"amount": 1}, {"amount": 2}]}), None).is_ok());
/// assert!(TotalsAddUp::validate(&ctx, &json!({"total": 4, "lines": [{"amount": 1}]}), None).is_err());
/// ```
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

#[cfg(feature = "validation-hook")]
fn parse(what: &str, text: &str) -> Result<Value, Vec<Violation>> {
    serde_json::from_str(text).map_err(|e| {
        vec![Violation::new(
            "",
            format!("the host sent {what} that is not JSON: {e}"),
        )]
    })
}

/// The SDK's context from the bindings' (any world: same fields).
#[allow(unused_macros)]
macro_rules! context_from {
    ($ctx:expr) => {{
        let ctx = $ctx;
        Context {
            config: serde_json::from_str(&ctx.config).unwrap_or(Value::Null),
            tenant_id: ctx.tenant_id,
            resource: ctx.resource,
            operation: ctx.operation,
            actor: ctx.actor,
            request_id: ctx.request_id,
        }
    }};
}

#[cfg(feature = "validation-hook")]
impl<T: ValidationHook> validation_hook::Guest for ValidationHookExport<T> {
    fn validate(
        ctx: validation_hook::bss::plugin::types::Context,
        record: String,
        previous: Option<String>,
    ) -> Result<(), Vec<validation_hook::bss::plugin::types::Violation>> {
        let run = || -> Result<(), Vec<Violation>> {
            let ctx = context_from!(ctx);
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

/// An event enricher: runs in the relay before an event is published, for
/// the resources its manifest binds. It may add to the event's `data` and
/// add extension attributes (the host restores `id`, `type`, `source`,
/// `specversion`, `subject`, `tenantid` and `time`), or drop the event by
/// returning `None`. If it fails, the original event is published.
///
/// Feature `event-enricher`. The event is typed ([`Event`], its `data` a
/// [`RecordChange`] for record events); the record is in it only when the
/// resource's schema says `"x-event-payload": "full"`. A complete plugin:
///
/// ```
/// use bss_plugin::serde_json::json;
/// use bss_plugin::{ChangeKind, Context, Event, EventEnricher};
///
/// /// Marks large invoices, and drops events of draft invoices.
/// pub struct LargeInvoices;
///
/// impl EventEnricher for LargeInvoices {
///     fn enrich(ctx: &Context, mut event: Event) -> Option<Event> {
///         let record = event.record().cloned().unwrap_or_default();
///         if record["status"] == "draft" {
///             return None;
///         }
///         let threshold = ctx.config["threshold"].as_f64().unwrap_or(10_000.0);
///         let large = record["total"].as_f64().is_some_and(|t| t >= threshold);
///         event.set_extension("large", large);
///         Some(event)
///     }
/// }
///
/// bss_plugin::export_event_enricher!(LargeInvoices);
///
/// let ctx = Context::for_test(json!({"threshold": 100}));
/// let event = |record| Event::for_test(ChangeKind::Created, "invoices", "1", Some(record));
/// let out = LargeInvoices::enrich(&ctx, event(json!({"total": 150}))).unwrap();
/// assert_eq!(out.extension("large"), Some(&json!(true)));
/// assert!(LargeInvoices::enrich(&ctx, event(json!({"status": "draft"}))).is_none());
/// ```
pub trait EventEnricher {
    /// The event to publish (changed or not), or `None` to drop it.
    fn enrich(ctx: &Context, event: Event) -> Option<Event>;
}

/// Adapts an [`EventEnricher`] to the generated bindings.
#[doc(hidden)]
pub struct EventEnricherExport<T>(PhantomData<T>);

#[cfg(feature = "event-enricher")]
impl<T: EventEnricher> event_enricher::Guest for EventEnricherExport<T> {
    fn enrich(ctx: event_enricher::bss::plugin::types::Context, event: String) -> Option<String> {
        let ctx = context_from!(ctx);
        // An unreadable event goes on unchanged.
        let Ok(typed) = serde_json::from_str::<Event>(&event) else {
            return Some(event);
        };
        T::enrich(&ctx, typed).map(|e| serde_json::to_string(&e).unwrap_or(event))
    }
}

/// Exports an [`EventEnricher`] as the component's `enrich`.
#[macro_export]
macro_rules! export_event_enricher {
    ($enricher:ty) => {
        #[cfg(target_arch = "wasm32")]
        type __BssEventEnricher = $crate::EventEnricherExport<$enricher>;
        #[cfg(target_arch = "wasm32")]
        $crate::event_enricher::__export_event_enricher!(__BssEventEnricher with_types_in $crate::event_enricher);
    };
}

/// A webhook delivery as a transformer sees it. The target host is not part
/// of it: a transformer cannot redirect a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookRequest {
    /// `POST` unless a transformer changes it.
    pub method: String,
    /// Path and query on the registered endpoint.
    pub path: String,
    /// Headers to send (the host adds the signature headers after).
    pub headers: Vec<(String, String)>,
    /// The body to send.
    pub body: String,
}

/// A webhook transformer: runs before a webhook delivery; may rewrite
/// method, path, headers and body, or cancel the delivery with `None`.
///
/// Feature `webhook-transformer`. A complete plugin:
///
/// ```
/// use bss_plugin::serde_json::json;
/// use bss_plugin::{ChangeKind, Context, Event, WebhookRequest, WebhookTransformer};
///
/// /// Sends a chat-style message instead of the raw event.
/// pub struct ChatMessage;
///
/// impl WebhookTransformer for ChatMessage {
///     fn transform(_ctx: &Context, event: &Event, mut request: WebhookRequest) -> Option<WebhookRequest> {
///         let text = format!("{} {}", event.event_type, event.subject.as_deref()?);
///         request.body = json!({"text": text}).to_string();
///         request.headers.push(("content-type".into(), "application/json".into()));
///         Some(request)
///     }
/// }
///
/// bss_plugin::export_webhook_transformer!(ChatMessage);
///
/// let request = WebhookRequest { method: "POST".into(), path: "/hook".into(), headers: vec![], body: String::new() };
/// let event = Event::for_test(ChangeKind::Created, "invoices", "1", None);
/// let out = ChatMessage::transform(&Context::for_test(json!({})), &event, request).unwrap();
/// assert_eq!(out.body, r#"{"text":"business_store.data.created invoices/1"}"#);
/// ```
pub trait WebhookTransformer {
    /// The request to send, or `None` to cancel the delivery.
    fn transform(ctx: &Context, event: &Event, request: WebhookRequest) -> Option<WebhookRequest>;
}

/// Adapts a [`WebhookTransformer`] to the generated bindings.
#[doc(hidden)]
pub struct WebhookTransformerExport<T>(PhantomData<T>);

#[cfg(feature = "webhook-transformer")]
impl<T: WebhookTransformer> webhook_transformer::Guest for WebhookTransformerExport<T> {
    fn transform(
        ctx: webhook_transformer::bss::plugin::types::Context,
        event: String,
        request: webhook_transformer::bss::plugin::types::WebhookRequest,
    ) -> Option<webhook_transformer::bss::plugin::types::WebhookRequest> {
        let ctx = context_from!(ctx);
        let event = serde_json::from_str::<Event>(&event).unwrap_or_default();
        let request = WebhookRequest {
            method: request.method,
            path: request.path,
            headers: request.headers,
            body: request.body,
        };
        T::transform(&ctx, &event, request).map(|r| {
            webhook_transformer::bss::plugin::types::WebhookRequest {
                method: r.method,
                path: r.path,
                headers: r.headers,
                body: r.body,
            }
        })
    }
}

/// Exports a [`WebhookTransformer`] as the component's `transform`.
#[macro_export]
macro_rules! export_webhook_transformer {
    ($transformer:ty) => {
        #[cfg(target_arch = "wasm32")]
        type __BssWebhookTransformer = $crate::WebhookTransformerExport<$transformer>;
        #[cfg(target_arch = "wasm32")]
        $crate::webhook_transformer::__export_webhook_transformer!(__BssWebhookTransformer with_types_in $crate::webhook_transformer);
    };
}
