//! Builds the application from settings (database, clients, state, router)
//! and runs it until a shutdown signal, with the background tasks it owns.
//! Shutdown is bounded: streams are told to end, requests get
//! `shutdown_drain_secs` to finish (a second signal cuts that short), then
//! the writers of coalesced creates write what was queued and the
//! background tasks stop, before the pool closes.

mod http_server;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal as unix_signal};

use crate::api;
use crate::app_state::{AppState, SharedState};
use crate::auth::Authenticator;
use crate::catalog::SchemaCache;
use crate::config::Settings;
use crate::events::broker::Broker;
use crate::events::kafka::{self, KafkaConfig, KafkaPublisher};
use crate::events::relay::{self, EventLog, RelayConfig};
use crate::plugins::{Plugins, Runtime};
use crate::services::{PlatformServices, ServiceClient, ValidationService};
use crate::storage::{Database, tenants};
use http_server::{Limits, Server};

/// Connections the operations listener serves at once.
const OPS_MAX_CONNECTIONS: usize = 64;

#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    ops_listener: Option<TcpListener>,
    state: SharedState,
    database: Database,
    kafka: Option<(KafkaConfig, Arc<KafkaPublisher>)>,
}

/// Kafka's configuration, when a broker is set.
pub fn kafka_config(s: &Settings) -> Option<KafkaConfig> {
    Some(KafkaConfig {
        brokers: s.kafka_brokers.clone()?,
        topic_per_resource: s.kafka_topic_per_resource,
        create_topics: s.kafka_create_topics,
        structured: s.kafka_structured,
        record_topic: s.kafka_record_topic.clone(),
        partitions: s.kafka_partitions,
        replication: s.kafka_replication,
        group_id: s.kafka_group.clone(),
        dead_letter_topic: s.kafka_dead_letter_topic.clone(),
    })
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        if let Some(remotes) = &settings.schema_remotes {
            crate::catalog::remotes::allow(&crate::catalog::remotes::parse(remotes)?);
        }
        let database = Database::connect(&settings).await?;
        let validation = match &settings.validation_service_url {
            Some(url) => Some(ServiceClient::new("validation", url, &settings)?),
            None => None,
        };
        let auth = Authenticator::new(&settings)?;
        let client = |name: &'static str, url: &Option<String>| {
            url.as_deref()
                .map(|u| ServiceClient::new(name, u, &settings))
                .transpose()
        };
        let tasks = Arc::new(crate::tasks::TaskQueue::new(
            database.pool.clone(),
            settings.task_max_pending_per_tenant,
            client("task", &settings.task_service_url)?,
        ));
        let services = PlatformServices::new(
            client("validation", &settings.validation_service_url)?,
            client("task", &settings.task_service_url)?,
        )
        .with_queue(tasks.clone());
        let plugin_settings = settings.plugin_settings();
        let runtime = Runtime::with_bounds(
            &settings.plugin_cache_dir(),
            Some(Arc::new(services)),
            plugin_settings.runtime_bounds(),
        )?;
        let plugins = Arc::new(Plugins::new(
            Arc::new(runtime),
            database.pool.clone(),
            plugin_settings,
        ));
        let kafka = kafka_config(&settings)
            .map(|c| KafkaPublisher::new(c.clone()).map(|p| (c, Arc::new(p))))
            .transpose()?;
        let broker = match &kafka {
            Some((_, publisher)) => Broker::Kafka(publisher.clone()),
            None => Broker::built_in(),
        };
        let listener = TcpListener::bind(settings.http_addr)
            .await
            .with_context(|| format!("binding {}", settings.http_addr))?;
        let ops_listener = match settings.ops_addr {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding the operations listener {addr}"))?,
            ),
            None => None,
        };
        let state = Arc::new(AppState {
            auth,
            tokens: Default::default(),
            validation: ValidationService::new(validation, settings.validation_fallback),
            keyring: crate::crypto::Keyring::from_settings(&settings, Some(database.pool.clone()))?,
            tasks,
            pool: database.pool.clone(),
            writes: crate::storage::coalesce::Coalescer::start(crate::storage::lanes::pools(
                &database.options,
                settings.write_workers.max(1),
            )),
            reads: crate::storage::lanes::Lanes::new(
                database.pool.clone(),
                crate::storage::lanes::pools(
                    &database.options,
                    crate::storage::lanes::read_lanes(
                        settings.read_lanes,
                        settings.db_max_connections,
                    ),
                ),
            ),
            schemas: SchemaCache::default(),
            metrics: crate::telemetry::metrics(),
            broker: Arc::new(broker),
            event_log: EventLog::default(),
            plugins,
            webhooks: Arc::new(crate::webhooks::Webhooks::new(
                settings.webhook_guard()?,
                settings.webhook_settings()?,
            )?),
            gate: crate::api::tenant_gate::TenantGate::new(&settings),
            shutdown: tokio::sync::watch::Sender::new(false),
            streams: Default::default(),
            settings,
        });
        Ok(Self {
            listener,
            ops_listener,
            state,
            database,
            kafka,
        })
    }

    pub fn port(&self) -> u16 {
        self.listener
            .local_addr()
            .map(|a| a.port())
            .unwrap_or_default()
    }

    /// The operations listener's port, when one is configured.
    pub fn ops_port(&self) -> Option<u16> {
        let addr = self.ops_listener.as_ref()?.local_addr().ok()?;
        Some(addr.port())
    }

    pub fn state(&self) -> SharedState {
        self.state.clone()
    }

    /// Serves until `shutdown` resolves, then drains requests (at most
    /// `shutdown_drain_secs`, less on a second SIGINT/SIGTERM), stops the
    /// background tasks and, if it started one, the private PostgreSQL.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let background = self.spawn_background();
        let Self {
            listener,
            ops_listener,
            state,
            database,
            ..
        } = self;
        let servers = serve(&state, listener, ops_listener)?;
        shutdown.await;
        drain(&state, &servers).await;
        // Creates queued by requests that were cut short are written (or
        // fail) before the pool closes.
        state.writes.stop(Duration::from_secs(10)).await;
        for task in &background {
            task.abort();
        }
        for task in background {
            let _ = task.await;
        }
        // Connections a dropped request still holds are closed, not awaited.
        let closed = async { tokio::join!(state.pool.close(), state.reads.close()) };
        let _ = tokio::time::timeout(Duration::from_secs(2), closed).await;
        if let Some(cluster) = &database.cluster {
            cluster.stop();
        }
        tracing::info!("stopped");
        Ok(())
    }

    /// Starts the tasks that live as long as the service.
    fn spawn_background(&self) -> Vec<tokio::task::JoinHandle<()>> {
        let state = &self.state;
        let mut tasks = vec![
            tokio::spawn(reap_archived_tenants(state.clone())),
            tokio::spawn(state.plugins.clone().follow_changes()),
            tokio::spawn(relay::run(
                state.pool.clone(),
                state.broker.clone(),
                state.event_log.clone(),
                state.plugins.clone(),
                RelayConfig {
                    database_url_options: self.database.options.clone(),
                    retention_secs: state.settings.event_retention_secs,
                },
            )),
        ];
        let (rotated, rotations) = tokio::sync::mpsc::unbounded_channel();
        state.keyring.report_rotations(rotated);
        tasks.push(tokio::spawn(crate::tasks::run(state.clone(), rotations)));
        tasks.push(tokio::spawn(crate::tasks::follow_rotations(state.clone())));
        tasks.push(tokio::spawn(crate::webhooks::run(state.clone())));
        if let Some((config, publisher)) = self.kafka.clone() {
            tasks.push(tokio::spawn(kafka::consume(
                state.clone(),
                config,
                publisher,
            )));
        }
        tasks
    }
}

/// Tells streams to end and waits for open requests, at most
/// `shutdown_drain_secs` or until a second signal; then closes the rest.
async fn drain(state: &SharedState, servers: &[Arc<Server>]) {
    let drain_for = Duration::from_secs(state.settings.shutdown_drain_secs);
    tracing::info!(
        drain_secs = drain_for.as_secs(),
        "draining requests and streams"
    );
    state.shutdown.send_replace(true);
    let until = tokio::time::Instant::now() + drain_for;
    let mut drained = true;
    for server in servers {
        drained &= server.shutdown(until, interrupted()).await;
    }
    if !drained {
        tracing::warn!("connections still open after the drain were closed");
    }
}

/// Starts accepting on the API listener and, when configured, the
/// operations listener.
fn serve(
    state: &SharedState,
    listener: TcpListener,
    ops_listener: Option<TcpListener>,
) -> anyhow::Result<Vec<Arc<Server>>> {
    let settings = &state.settings;
    let limits = Limits {
        header: Duration::from_millis(settings.http_header_timeout_ms),
        idle: Duration::from_secs(settings.http_idle_timeout_secs),
        max_connections: settings.http_max_connections,
    };
    let api = Server::new(limits);
    tracing::info!(addr = %listener.local_addr()?, "serving");
    tokio::spawn(api.clone().serve(listener, api::app(state.clone())));
    let mut servers = vec![api];
    if let Some(listener) = ops_listener {
        let ops = Server::new(Limits {
            max_connections: OPS_MAX_CONNECTIONS,
            ..limits
        });
        tracing::info!(addr = %listener.local_addr()?, "serving operational endpoints");
        tokio::spawn(ops.clone().serve(listener, api::ops_app(state.clone())));
        servers.push(ops);
    }
    Ok(servers)
}

/// Drops archived tenants once their grace period has passed.
async fn reap_archived_tenants(state: SharedState) {
    let every = Duration::from_secs(state.settings.reaper_interval_secs.max(1));
    loop {
        match tenants::reap(&state.pool).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(dropped = n, "reaped archived tenants"),
            Err(e) => tracing::warn!(error = %e, "reaping archived tenants failed"),
        }
        tokio::time::sleep(every).await;
    }
}

/// Rung by a second SIGINT or SIGTERM: stop draining.
static INTERRUPTED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Resolves when a second signal cuts the drain short.
async fn interrupted() {
    INTERRUPTED.notified().await;
    // Wake the next waiter too (one drain per listener).
    INTERRUPTED.notify_one();
}

/// Resolves on SIGINT or SIGTERM; a second one then interrupts the drain
/// (`run_until` stops at once).
pub async fn shutdown_signal() {
    // Both kinds are listened to from the start, so no signal is missed.
    let mut signals = Signals::new();
    signals.next().await;
    tracing::info!("shutdown signal received; a second one stops at once");
    tokio::spawn(async move {
        signals.next().await;
        tracing::warn!("second shutdown signal: not waiting for open requests");
        INTERRUPTED.notify_one();
    });
}

/// SIGINT and SIGTERM.
struct Signals {
    interrupt: Option<Signal>,
    terminate: Option<Signal>,
}

impl Signals {
    fn new() -> Self {
        Self {
            interrupt: unix_signal(SignalKind::interrupt()).ok(),
            terminate: unix_signal(SignalKind::terminate()).ok(),
        }
    }

    async fn next(&mut self) {
        async fn recv(signal: &mut Option<Signal>) {
            match signal {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        tokio::select! {
            () = recv(&mut self.interrupt) => {},
            () = recv(&mut self.terminate) => {},
        }
    }
}
