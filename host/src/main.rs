//! The `bss` binary: `bss serve` runs the service; `bss token` mints a local
//! token signed with `BSS_JWT_SECRET`, or else with the secret the service
//! generated in its data directory (`BSS_DATA_DIR`). `bss token` only reads
//! that secret: one it generated itself would sign tokens the service
//! refuses, so without a secret it fails and says what to do.
//! `bss dev-services` runs local stand-ins of the Validation, Auth and Task
//! Execution services (see `bss::dev_services`). `bss plugin …` are a
//! plugin author's tools (see `bss::plugin_cli`).

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bss::auth::{Claims, LocalSecret, jwt};
use bss::config::Settings;
use bss::startup::{Application, shutdown_signal};

const USAGE: &str = "usage:
  bss serve
  bss token [--tenant ID] [--roles reader,writer,admin,platform-admin] [--sub NAME] [--ttl SECONDS]
  bss dev-services [--addr 127.0.0.1:7070]     local stand-ins of the Validation, Auth and Task services
  bss dev-services token [--tenant ID] [--roles ...] [--sub NAME] [--ttl SECONDS] [--addr 127.0.0.1:7070]
  bss plugin new|build|test|run|push ...       a plugin author's tools (`bss plugin help`)
  bss tenant export ID [--out FILE]            one tenant's whole state into an archive
  bss tenant import [--as ID] [--trust] FILE   an archive into this installation, all or nothing";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // An author's tools need no service settings.
    if args.first().map(String::as_str) == Some("plugin") {
        return bss::plugin_cli::command(&args[1..]).await;
    }
    let settings = Settings::load()?;
    match args.first().map(String::as_str) {
        None | Some("serve") => {
            bss::telemetry::init_logs(&settings.log_format);
            // Before the database is touched (a private cluster takes seconds).
            bss::auth::local_secret::refuse_public_address(&settings)?;
            let app = Application::build(settings).await?;
            let served = app.run_until(shutdown_signal()).await;
            bss::telemetry::flush_traces();
            served
        }
        Some("token") => {
            println!("{}", token(&settings, &args[1..])?);
            Ok(())
        }
        Some("dev-services") => bss::dev_services::command(&settings, &args[1..]).await,
        // No log lines: an archive may be going to stdout.
        Some("tenant") => bss::archive::cli::command(&settings, &args[1..]).await,
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown command {other:?}\n{USAGE}"),
    }
}

fn token(settings: &Settings, args: &[String]) -> anyhow::Result<String> {
    let mut claims = Claims {
        sub: "dev".into(),
        tenant_id: None,
        roles: vec!["admin".into()],
        exp: 0,
        iss: settings.jwt_issuer.clone(),
        aud: settings.jwt_audience.clone(),
    };
    let mut ttl = 3600u64;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--tenant" => claims.tenant_id = Some(value.clone()),
            "--roles" => claims.roles = value.split(',').map(str::to_owned).collect(),
            "--sub" => claims.sub = value.clone(),
            "--ttl" => ttl = value.parse().context("--ttl takes seconds")?,
            other => bail!("unknown option {other}\n{USAGE}"),
        }
    }
    claims.exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + ttl;
    if settings.auth_service_url.is_some() {
        eprintln!(
            "note: AUTH_SERVICE_URL is set, so the service verifies tokens with its JWKS, not this one"
        );
    }
    jwt::mint(LocalSecret::existing(settings)?.as_str(), &claims)
}
