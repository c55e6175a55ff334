//! Connecting to PostgreSQL: find or start the server, create the service's
//! database if it is missing, run the control-plane migrations and make sure
//! the analytics role exists.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

use super::local_postgres::{self, PrivateCluster};
use crate::config::Settings;
use crate::domain::ids::quote_ident;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// The pool and, when the service started one, the private cluster under it.
#[derive(Debug)]
pub struct Database {
    pub pool: PgPool,
    /// How to open a connection outside the pool (the relay's leader lock).
    pub options: PgConnectOptions,
    pub cluster: Option<PrivateCluster>,
}

impl Database {
    pub async fn connect(settings: &Settings) -> anyhow::Result<Self> {
        let (options, cluster) = match &settings.database_url {
            Some(url) => (
                PgConnectOptions::from_str(url).context("parsing DATABASE_URL")?,
                None,
            ),
            None => {
                let server =
                    local_postgres::locate(&settings.local_postgres, &settings.data_dir).await?;
                let options =
                    PgConnectOptions::from_str(&server.url)?.database(&settings.database_name);
                (options, server.cluster)
            }
        };
        ensure_database(&options).await?;
        let options = options.log_statements(tracing::log::LevelFilter::Debug);
        let pool = PgPoolOptions::new()
            .max_connections(settings.db_max_connections)
            .acquire_timeout(Duration::from_secs(10))
            // No ping per checkout: a broken connection fails its query and is
            // replaced; the ping would double the round trips of every request.
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await
            .context("connecting to PostgreSQL")?;
        MIGRATOR
            .run(&pool)
            .await
            .context("running the control-plane migrations")?;
        ensure_role(&pool, &settings.analytics_role).await?;
        Ok(Self {
            pool,
            options,
            cluster,
        })
    }
}

/// Creates the target database when it does not exist yet.
async fn ensure_database(options: &PgConnectOptions) -> anyhow::Result<()> {
    let name = options.get_database().unwrap_or("postgres").to_owned();
    let admin = options.clone().database("postgres");
    let mut conn = admin
        .connect()
        .await
        .context("connecting to the PostgreSQL server")?;
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(&name)
        .fetch_optional(&mut conn)
        .await?;
    if exists.is_none() {
        let sql = format!("CREATE DATABASE {}", quote_ident(&name));
        match sqlx::query(&sql).execute(&mut conn).await {
            Ok(_) => tracing::info!(database = %name, "created the database"),
            // Another replica created it at the same moment.
            Err(e) if pg_code(&e).as_deref() == Some("42P04") => {}
            Err(e) => return Err(e).context("creating the database"),
        }
    }
    Ok(())
}

/// The read-only analytics role; roles are cluster-wide, so replicas (and
/// test databases) may race to create it.
async fn ensure_role(pool: &PgPool, role: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        regex::Regex::new(r"^[a-z_][a-z0-9_]{0,62}$")?.is_match(role),
        "BSS_ANALYTICS_ROLE {role:?} must match ^[a-z_][a-z0-9_]{{0,62}}$"
    );
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_roles WHERE rolname = $1")
        .bind(role)
        .fetch_optional(pool)
        .await?;
    if exists.is_none() {
        let sql = format!("CREATE ROLE {} NOLOGIN", quote_ident(role));
        match sqlx::query(&sql).execute(pool).await {
            Ok(_) => {}
            Err(e) if matches!(pg_code(&e).as_deref(), Some("42710") | Some("23505")) => {}
            Err(e) => return Err(e).context("creating the analytics role"),
        }
    }
    Ok(())
}

/// The SQLSTATE of a database error, if it is one.
pub fn pg_code(e: &sqlx::Error) -> Option<String> {
    e.as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.into_owned())
}
