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
        builder.try_init()
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
                Ok(handle) => handle,
                // Another recorder is installed already: serve an empty one.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}
