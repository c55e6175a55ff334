//! `bss tenant export <id> [--out FILE]` and `bss tenant import [--as ID]
//! [--trust] FILE`: operator tools on the database the service uses (its
//! settings: `DATABASE_URL` or the local PostgreSQL, `BSS_MASTER_KEY` or
//! the data directory's master key). A progress bar on a terminal (quiet
//! otherwise) and a summary at the end.

use std::io::{BufReader, BufWriter, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};

use super::export::{self, Progress};
use super::import::{self, Options};
use crate::config::Settings;
use crate::crypto::Keyring;
use crate::domain::TenantId;
use crate::events::envelope::EventContext;
use crate::storage::database::Database;

pub const USAGE: &str = "usage:
  bss tenant export ID [--out FILE] [--with-events] [--without-webhook-secrets]
                                               one tenant's whole state into FILE (default ID.tenant.tar.zst; - for stdout);
                                               --with-events: its event log too (imported for reading and replay, not published again)
  bss tenant import [--as ID] [--trust] FILE   an exported tenant into this installation, all or nothing (- for stdin);
                                               --as: under another id; --trust: skip validating records (checksums still checked)";

pub async fn command(settings: &Settings, args: &[String]) -> anyhow::Result<()> {
    match args.first().map(String::as_str) {
        Some("export") => export_command(settings, &args[1..]).await,
        Some("import") => import_command(settings, &args[1..]).await,
        Some("-h" | "--help" | "help") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown command tenant {other:?}\n{USAGE}"),
    }
}

/// A bar of records done, drawn only on a terminal.
fn bar(verb: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{verb} {{bar:30}} {{pos}}/{{len}} records, {{per_sec}}, ETA {{eta}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn track(bar: &ProgressBar) -> impl FnMut(Progress) + '_ {
    move |p| match p {
        Progress::Total(n) => bar.set_length(n),
        Progress::Records(n) => bar.inc(n),
    }
}

async fn export_command(settings: &Settings, args: &[String]) -> anyhow::Result<()> {
    let (mut id, mut out) = (None, None);
    let mut options = export::Options {
        webhook_secrets: true,
        events: false,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--out" => out = Some(it.next().context("--out needs a file")?.clone()),
            "--without-webhook-secrets" => options.webhook_secrets = false,
            "--with-events" => options.events = true,
            flag if flag.starts_with("--") => bail!("unknown option {flag}\n{USAGE}"),
            _ if id.is_none() => id = Some(arg.clone()),
            extra => bail!("unexpected argument {extra:?}\n{USAGE}"),
        }
    }
    let id = id.context(format!("which tenant?\n{USAGE}"))?;
    let tenant = TenantId::parse(&id).map_err(|_| anyhow::anyhow!("{id:?} is not a tenant id"))?;
    let db = Database::connect(settings).await?;
    let bar = bar("exporting");
    let start = Instant::now();
    let out = out.unwrap_or_else(|| format!("{id}.tenant.tar.zst"));
    let (manifest, bytes) = if out == "-" {
        let stdout = BufWriter::new(std::io::stdout().lock());
        let (mut w, manifest) =
            export::export(&db.pool, &tenant, stdout, options, &mut track(&bar)).await?;
        w.flush()?;
        (manifest, None)
    } else {
        // Written aside and renamed when whole: a failed export leaves no
        // half archive under the asked name.
        let path = PathBuf::from(&out);
        let partial = path.with_extension("partial");
        let file = std::fs::File::create(&partial)
            .with_context(|| format!("creating {}", partial.display()))?;
        let file = BufWriter::new(file);
        let result = export::export(&db.pool, &tenant, file, options, &mut track(&bar)).await;
        let (w, manifest) = match result {
            Ok(done) => done,
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return Err(e);
            }
        };
        w.into_inner()
            .map_err(|e| e.into_error())?
            .sync_all()
            .context("writing the archive")?;
        std::fs::rename(&partial, &path)?;
        (manifest, Some(std::fs::metadata(&path)?.len()))
    };
    bar.finish_and_clear();
    eprintln!(
        "exported tenant {id}: {}{} in {:.1?}",
        said(&manifest.counts),
        bytes
            .map(|b| format!(", {b} bytes to {out}"))
            .unwrap_or_default(),
        start.elapsed()
    );
    Ok(())
}

/// What an archive holds, in words.
pub fn said(c: &super::Counts) -> String {
    let mut said = format!(
        "{} resources, {} schema versions, {} records, {} plugins ({} versions), {} webhooks",
        c.resources, c.schema_versions, c.records, c.plugins, c.plugin_versions, c.webhooks
    );
    if c.events > 0 {
        said.push_str(&format!(", {} events", c.events));
    }
    said
}

async fn import_command(settings: &Settings, args: &[String]) -> anyhow::Result<()> {
    let (mut file, mut as_id, mut trust) = (None, None, false);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--as" => {
                let id = it.next().context("--as needs a tenant id")?;
                as_id = Some(
                    TenantId::parse(id)
                        .map_err(|_| anyhow::anyhow!("{id:?} is not a tenant id"))?,
                );
            }
            "--trust" => trust = true,
            flag if flag.starts_with("--") => bail!("unknown option {flag}\n{USAGE}"),
            _ if file.is_none() => file = Some(arg.clone()),
            extra => bail!("unexpected argument {extra:?}\n{USAGE}"),
        }
    }
    let file = file.context(format!("which archive?\n{USAGE}"))?;
    let db = Database::connect(settings).await?;
    let keyring = Keyring::from_settings(settings, Some(db.pool.clone()))?;
    let plugin_settings = settings.plugin_settings();
    let plugins = crate::plugins::Runtime::with_bounds(
        &settings.plugin_cache_dir(),
        None,
        plugin_settings.runtime_bounds(),
    )?;
    let target = import::Target {
        pool: &db.pool,
        plugins: &plugins,
        keyring: &keyring,
        analytics_role: &settings.analytics_role,
        events: EventContext {
            source: format!("/business-store/{}", settings.instance_id),
            correlation_id: format!("import-{}", uuid::Uuid::now_v7()),
            traceparent: None,
        },
    };
    let options = Options { as_id, trust };
    let bar = bar("importing");
    let start = Instant::now();
    let done = if file == "-" {
        let stdin = BufReader::new(std::io::stdin().lock());
        import::import(&target, stdin, &options, &mut track(&bar)).await
    } else {
        let input = std::fs::File::open(&file).with_context(|| format!("opening {file}"))?;
        import::import(&target, BufReader::new(input), &options, &mut track(&bar)).await
    };
    bar.finish_and_clear();
    let done = done.context("nothing was imported")?;
    eprintln!(
        "imported tenant {}{}: {}{} in {:.1?}",
        done.tenant,
        if done.from != done.tenant {
            format!(" (exported as {})", done.from)
        } else {
            String::new()
        },
        said(&done.counts),
        if done.webhooks_without_secret > 0 {
            format!(
                " ({} without their secret: disabled until rotated)",
                done.webhooks_without_secret
            )
        } else {
            String::new()
        },
        start.elapsed()
    );
    Ok(())
}
