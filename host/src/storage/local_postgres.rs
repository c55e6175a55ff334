//! Zero-configuration PostgreSQL: with no `DATABASE_URL`, use the server on
//! 127.0.0.1:5432 if one answers, else start a private cluster from the
//! PostgreSQL binaries installed on the machine, under the data directory,
//! and stop it when the service stops.
//!
//! PostgreSQL refuses to run as root, so when the service runs as root the
//! cluster is created and run as the `postgres` system user.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use sqlx::ConnectOptions;
use sqlx::postgres::PgConnectOptions;

/// Where the service's PostgreSQL server is, and the cluster to stop, if we
/// started one.
#[derive(Debug)]
pub struct LocalServer {
    pub url: String,
    pub cluster: Option<PrivateCluster>,
}

/// Finds or starts a PostgreSQL server. `mode` is `auto` or `private`.
pub async fn locate(mode: &str, data_dir: &Path) -> anyhow::Result<LocalServer> {
    let shared = "postgres://postgres@127.0.0.1:5432/postgres";
    if mode != "private" && answers(shared).await {
        tracing::info!("using the local PostgreSQL server on 127.0.0.1:5432");
        return Ok(LocalServer {
            url: shared.to_owned(),
            cluster: None,
        });
    }
    let dir = std::path::absolute(data_dir.join("pg")).context("resolving the data directory")?;
    let cluster = tokio::task::spawn_blocking(move || PrivateCluster::start(dir))
        .await
        .context("starting the private PostgreSQL cluster")??;
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port);
    Ok(LocalServer {
        url,
        cluster: Some(cluster),
    })
}

async fn answers(url: &str) -> bool {
    let Ok(options) = url.parse::<PgConnectOptions>() else {
        return false;
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), options.connect()).await,
        Ok(Ok(_))
    )
}

/// A PostgreSQL cluster this process started; stopped on drop.
#[derive(Debug)]
pub struct PrivateCluster {
    bin_dir: PathBuf,
    data_dir: PathBuf,
    pub port: u16,
    run_as: Option<(u32, u32)>,
}

impl PrivateCluster {
    fn start(data_dir: PathBuf) -> anyhow::Result<Self> {
        let bin_dir = find_bin_dir()?;
        let run_as = if is_root() {
            Some(postgres_user().context("running as root needs a 'postgres' system user")?)
        } else {
            None
        };
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&data_dir, Some(uid), Some(gid))
                .with_context(|| format!("giving {} to the postgres user", data_dir.display()))?;
        }
        let cluster = Self {
            bin_dir,
            port: free_port()?,
            data_dir,
            run_as,
        };
        if !cluster.data_dir.join("PG_VERSION").exists() {
            cluster.run(
                "initdb",
                &[
                    "-D",
                    path_str(&cluster.data_dir)?,
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                ],
            )?;
        }
        // A cluster left running by an earlier process is stopped first so
        // that it restarts on the port chosen now.
        let _ = cluster.run(
            "pg_ctl",
            &["-D", path_str(&cluster.data_dir)?, "-m", "fast", "stop"],
        );
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            cluster.port,
            path_str(&cluster.data_dir)?
        );
        let log = cluster.data_dir.join("server.log");
        cluster.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&cluster.data_dir)?,
                "-o",
                &options,
                "-l",
                path_str(&log)?,
                "-w",
                "start",
            ],
        )?;
        tracing::info!(port = cluster.port, dir = %cluster.data_dir.display(), "started a private PostgreSQL cluster");
        Ok(cluster)
    }

    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let mut cmd = Command::new(self.bin_dir.join(program));
        cmd.args(args).current_dir(&self.data_dir);
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        let out = cmd.output().with_context(|| format!("running {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Stops the cluster (fast shutdown); idempotent.
    pub fn stop(&self) {
        if let Ok(dir) = path_str(&self.data_dir) {
            match self.run("pg_ctl", &["-D", dir, "-m", "fast", "-w", "stop"]) {
                Ok(()) => tracing::info!("stopped the private PostgreSQL cluster"),
                Err(e) => tracing::debug!(error = %e, "private cluster already stopped"),
            }
        }
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("path {} is not UTF-8", p.display()))
}

fn find_bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    candidates.sort();
    candidates
        .pop()
        .context("no PostgreSQL server binaries (initdb, pg_ctl) found; install PostgreSQL or set DATABASE_URL")
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn postgres_user() -> anyhow::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() > 3 && f[0] == "postgres" {
            return Ok((f[2].parse()?, f[3].parse()?));
        }
    }
    bail!("no 'postgres' user in /etc/passwd")
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
