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
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    // A second init (tests start several apps) is a no-op.
    let _ = if format == "pretty" {
        // Colour only for a terminal: a file or a pipe gets plain text.
        use std::io::IsTerminal;
        builder
            .with_ansi(std::io::stdout().is_terminal())
            .try_init()
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init()
    };
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
