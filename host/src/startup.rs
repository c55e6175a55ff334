//! Builds the application from settings (database, clients, state, router)
//! and runs it until a shutdown signal, with the background tasks it owns.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::api;
use crate::app_state::{AppState, SharedState};
use crate::auth::Authenticator;
use crate::catalog::SchemaCache;
use crate::config::{DEV_JWT_SECRET, Settings};
use crate::events::broker::Broker;
use crate::events::kafka::{self, KafkaConfig, KafkaPublisher};
use crate::events::relay::{self, EventLog, RelayConfig};
use crate::plugins::{Plugins, Runtime};
use crate::services::{PlatformServices, ServiceClient, ValidationService};
use crate::storage::{Database, tenants};

#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    state: SharedState,
    database: Database,
    kafka: Option<(KafkaConfig, Arc<KafkaPublisher>)>,
}

fn kafka_config(s: &Settings) -> Option<KafkaConfig> {
    Some(KafkaConfig {
        brokers: s.kafka_brokers.clone()?,
        topic_per_resource: s.kafka_topic_per_resource,
        create_topics: s.kafka_create_topics,
        partitions: s.kafka_partitions,
        replication: s.kafka_replication,
        group_id: s.kafka_group.clone(),
        dead_letter_topic: s.kafka_dead_letter_topic.clone(),
    })
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let database = Database::connect(&settings).await?;
        let validation = match &settings.validation_service_url {
            Some(url) => Some(ServiceClient::new("validation", url, &settings)?),
            None => None,
        };
        let auth_client = match &settings.auth_service_url {
            Some(url) => Some(Arc::new(ServiceClient::new("auth", url, &settings)?)),
            None => {
                if settings.jwt_secret == DEV_JWT_SECRET {
                    tracing::warn!("BSS_JWT_SECRET is not set: using the local development secret");
                }
                None
            }
        };
        let client = |name: &'static str, url: &Option<String>| {
            url.as_deref()
                .map(|u| ServiceClient::new(name, u, &settings))
                .transpose()
        };
        let services = PlatformServices::new(
            client("validation", &settings.validation_service_url)?,
            client("task", &settings.task_service_url)?,
        );
        let runtime = Runtime::new(&settings.plugin_cache_dir(), Some(Arc::new(services)))?;
        let plugins = Arc::new(Plugins::new(
            Arc::new(runtime),
            database.pool.clone(),
            settings.plugin_settings(),
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
        let state = Arc::new(AppState {
            auth: Authenticator::new(&settings, auth_client),
            validation: ValidationService::new(validation, settings.validation_fallback),
            pool: database.pool.clone(),
            schemas: SchemaCache::default(),
            metrics: crate::telemetry::metrics(),
            broker: Arc::new(broker),
            event_log: EventLog::default(),
            plugins,
            settings,
        });
        Ok(Self {
            listener,
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

    pub fn state(&self) -> SharedState {
        self.state.clone()
    }

    /// Serves until `shutdown` resolves, then drains requests, stops the
    /// background tasks and, if it started one, the private PostgreSQL.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let reaper = tokio::spawn(reap_archived_tenants(self.state.clone()));
        let plugin_changes = tokio::spawn(self.state.plugins.clone().follow_changes());
        let relay = tokio::spawn(relay::run(
            self.state.pool.clone(),
            self.state.broker.clone(),
            self.state.event_log.clone(),
            self.state.plugins.clone(),
            RelayConfig {
                database_url_options: self.database.options.clone(),
                retention_secs: self.state.settings.event_retention_secs,
            },
        ));
        let consumer = self.kafka.clone().map(|(config, publisher)| {
            tokio::spawn(kafka::consume(self.state.clone(), config, publisher))
        });
        tracing::info!(addr = %self.listener.local_addr()?, "serving");
        let app = api::app(self.state.clone());
        axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .context("serving HTTP")?;
        reaper.abort();
        relay.abort();
        plugin_changes.abort();
        if let Some(c) = consumer {
            c.abort();
        }
        self.state.pool.close().await;
        if let Some(cluster) = &self.database.cluster {
            cluster.stop();
        }
        tracing::info!("stopped");
        Ok(())
    }
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

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received");
}
