//! Logs and metrics, installed once per process: JSON logs (or pretty ones
//! for a terminal) filtered by `RUST_LOG`, and the Prometheus recorder.
//!
//! `/metrics` is unauthenticated (serve it on `ops_addr`, off the public
//! network), so its labels are chosen to reveal nothing about tenants and to
//! stay bounded with 10,000 of them. What they do reveal:
//! - `http_requests_total`, `http_request_duration_seconds`: method, route
//!   template (`/v1/data/{resource}/{id}`, never the raw path) and status;
//!   the traffic mix and error rates of the whole replica.
//! - `<service>_service_errors_total`: peer service (a fixed set) and error
//!   kind.
//! - `plugin_calls_total`, `plugin_failures_total`,
//!   `plugin_call_duration_seconds`, `plugin_log_dropped_total`: outcome or
//!   failure kind only; no tenant and no plugin name.
//! - `events_*`, `outbox_backlog`, `event_publish_latency_seconds`: totals.
//! - `consumer_messages_total`, `consumer_errors_total`, `consumer_lag`: the
//!   consumed topics (a fixed list), partition, outcome or error kind.
//!
//! Tenant ids, resource names, record ids and plugin names never appear in
//! a label; per-tenant figures are in the tenant's own API.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

pub fn init_logs(format: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=info"));
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(otlp_layer());
    // A second init (tests start several apps) is a no-op.
    let _ = if format == "pretty" {
        // Colour only for a terminal: a file or a pipe gets plain text.
        use std::io::IsTerminal;
        registry
            .with(tracing_subscriber::fmt::layer().with_ansi(std::io::stdout().is_terminal()))
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true),
            )
            .try_init()
    };
}

/// The OpenTelemetry tracer provider, when spans are exported.
static OTLP: OnceLock<opentelemetry_sdk::trace::SdkTracerProvider> = OnceLock::new();

/// Exports spans (each request's, with what it causes inside it) over
/// OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set; the exporter reads
/// the other standard `OTEL_*` variables itself (headers, timeout, batch
/// delay). `OTEL_SERVICE_NAME` defaults to `business-store`.
fn otlp_layer<S>() -> Option<impl tracing_subscriber::Layer<S>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use opentelemetry::trace::TracerProvider as _;
    std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|e| !e.trim().is_empty())?;
    // The blocking HTTP client may not be built on an async worker.
    let exporter = std::thread::spawn(|| {
        opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
    })
    .join()
    .ok()?;
    let exporter = match exporter {
        Ok(e) => e,
        Err(e) => {
            eprintln!("OpenTelemetry export is off: {e}");
            return None;
        }
    };
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "business-store".into());
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build(),
        )
        .build();
    let tracer = provider.tracer("business-store");
    let _ = OTLP.set(provider);
    Some(tracing_opentelemetry::layer().with_tracer(tracer))
}

/// Makes `span` continue the trace of an incoming W3C `traceparent` in
/// what is exported (nothing to do when spans are not exported).
pub fn continue_trace(span: &tracing::Span, headers: &axum::http::HeaderMap) {
    use opentelemetry::propagation::TextMapPropagator;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if OTLP.get().is_none() || !headers.contains_key("traceparent") {
        return;
    }
    let parent =
        opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&Headers(headers));
    let _ = span.set_parent(parent);
}

/// The current span as a W3C `traceparent`, when spans are exported: what
/// the service passes on (peer calls, events, webhooks) then names a span
/// the collector has.
pub fn current_traceparent() -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    OTLP.get()?;
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// How long shutdown waits for the last spans to reach the collector.
const FLUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Exports the spans not sent yet (at shutdown), waiting at most
/// [`FLUSH_WAIT`]: a collector that hangs does not hold the exit.
pub fn flush_traces() {
    let Some(provider) = OTLP.get() else {
        return;
    };
    let (done, flushed) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = provider.force_flush();
        let _ = done.send(());
    });
    let _ = flushed.recv_timeout(FLUSH_WAIT);
}

struct Headers<'a>(&'a axum::http::HeaderMap);

impl opentelemetry::propagation::Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The process-wide Prometheus recorder.
pub fn metrics() -> PrometheusHandle {
    METRICS
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".into()),
                    &[
                        0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
                        0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    ],
                )
                .unwrap_or_else(|_| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(handle) => {
                    describe_metrics();
                    handle
                }
                // Another recorder is installed already: serve an empty one.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// `# HELP` for every family this process may export (Prometheus'
/// exposition format: a family without one fails `promtool check metrics`).
fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    let counters: &[(&'static str, &'static str)] = &[
        (
            "http_requests_total",
            "HTTP requests answered, by method, route template (unmatched for paths no route has) and status",
        ),
        (
            "consumer_messages_total",
            "Messages the event consumer handled, by topic and outcome",
        ),
        (
            "consumer_errors_total",
            "Errors of the event consumer, by kind (transient, permanent, client)",
        ),
        ("events_written_total", "Events written to the outbox"),
        ("events_published_total", "Events published to the broker"),
        (
            "events_publish_errors_total",
            "Failed attempts to publish a batch of events",
        ),
        (
            "events_dropped_by_plugins_total",
            "Events an enricher plugin dropped",
        ),
        ("plugin_calls_total", "Plugin calls, by outcome"),
        (
            "plugin_failures_total",
            "Plugin calls that failed, by kind (trap, fuel, memory, deadline...)",
        ),
        (
            "plugin_log_dropped_total",
            "Plugin log lines dropped over the per-call bound",
        ),
        (
            "reseal_records_scanned_total",
            "Records a key-rotation reseal job read",
        ),
        (
            "reseal_records_moved_total",
            "Records a key-rotation reseal job re-encrypted",
        ),
        ("tasks_queued_total", "Tasks queued"),
        ("tasks_scheduled_total", "Tasks handed to the Task Service"),
        (
            "tasks_parked_total",
            "Tasks parked after their last attempt",
        ),
        (
            "task_attempts_failed_total",
            "Attempts to hand a task to the Task Service that failed",
        ),
        (
            "task_service_local_scheduled_total",
            "Tasks scheduled by the built-in stand-in for the Task Service",
        ),
        (
            "webhook_deliveries_created_total",
            "Webhook deliveries created from the event log",
        ),
        (
            "webhook_deliveries_total",
            "Webhook deliveries finished, by outcome",
        ),
        (
            "webhook_attempts_total",
            "Webhook delivery attempts, by result",
        ),
        (
            "webhook_endpoints_disabled_total",
            "Webhook endpoints disabled (410 Gone, or failing too long)",
        ),
        (
            "webhook_transformer_cancelled_total",
            "Webhook deliveries a transformer plugin cancelled",
        ),
        (
            "auth_service_errors_total",
            "Failed calls to the Auth Service, by kind",
        ),
        (
            "validation_service_errors_total",
            "Failed calls to the Validation Service, by kind",
        ),
        (
            "task_service_errors_total",
            "Failed calls to the Task Service, by kind",
        ),
    ];
    for (name, help) in counters {
        describe_counter!(*name, *help);
    }
    let gauges: &[(&'static str, &'static str)] = &[
        (
            "consumer_lag",
            "Messages of a consumed topic partition not consumed yet",
        ),
        ("outbox_backlog", "Events in the outbox not published yet"),
        (
            "reseal_jobs_running",
            "Key-rotation reseal jobs running on this replica",
        ),
        ("tasks", "Tasks in the queue, by status"),
        ("webhook_backlog", "Webhook deliveries pending"),
        (
            "webhook_backlog_oldest_seconds",
            "Age of the oldest pending webhook delivery, in seconds",
        ),
        (
            "webhook_tenant_backlog",
            "Pending webhook deliveries of the tenants with the largest backlogs",
        ),
        (
            "webhook_tenant_backlog_oldest_seconds",
            "Age of the oldest pending delivery of the tenants with the largest backlogs, in seconds",
        ),
        ("webhook_endpoints", "Webhook endpoints, by state"),
    ];
    for (name, help) in gauges {
        describe_gauge!(*name, *help);
    }
    let histograms: &[(&'static str, &'static str)] = &[
        (
            "http_request_duration_seconds",
            "Time to answer an HTTP request, by method, route template and status",
        ),
        (
            "event_publish_latency_seconds",
            "Time from an event's commit to its publication",
        ),
        ("plugin_call_duration_seconds", "Duration of a plugin call"),
        (
            "webhook_attempt_duration_seconds",
            "Duration of a webhook delivery attempt",
        ),
    ];
    for (name, help) in histograms {
        describe_histogram!(*name, Unit::Seconds, *help);
    }
}
