//! `bss plugin …`: a plugin author's path, in the service's own binary.
//! `new` scaffolds a standalone crate, `build` and `test` drive cargo,
//! `run` calls the built component in the real sandbox under the
//! manifest's limits, `push` uploads it with its manifest.

mod local;
mod scaffold;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use serde_json::Value;

pub use local::{LocalPlugin, RunInput};
pub use scaffold::{install_sdk, new_plugin, sdk_version};

use crate::plugins::Kind;

pub const USAGE: &str = "usage:
  bss plugin new --kind validation-hook|event-enricher|webhook-transformer NAME [--dir PARENT] [--sdk PATH]
  bss plugin build [--dir CRATE]
  bss plugin test [--dir CRATE]
  bss plugin run [WASM] (--record FILE [--previous FILE] | --event FILE [--request FILE])
                 [--config FILE] [--manifest plugin.toml] [--resource NAME] [--operation OP] [--json]
  bss plugin push [--dir CRATE] [--url URL] [--token TOKEN] [--no-build | --wasm FILE]
                 [--trial shadow | --trial canary --percent N]   on trial beside the active version
  bss plugin logs [NAME] [--follow] [--url URL] [--token TOKEN]
  bss plugin calls [NAME] [--url URL] [--token TOKEN]      the recorded calls (manifest `record`)
  bss plugin replay CALL_ID [--name NAME] [--dir CRATE] [--no-build | --wasm FILE] [--json]
                 runs a recorded call against the local build, beside what it did in the service
The API URL and token default to BSS_URL (else http://127.0.0.1:8080) and BSS_TOKEN.";

/// Flags and positional arguments of one command.
struct Args {
    positional: Vec<String>,
    flags: Vec<(String, Option<String>)>,
}

/// Flags that take no value.
const SWITCHES: [&str; 3] = ["--json", "--no-build", "--follow"];

impl Args {
    fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut out = Self {
            positional: Vec::new(),
            flags: Vec::new(),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if SWITCHES.contains(&a.as_str()) {
                out.flags.push((a.clone(), None));
            } else if a.starts_with("--") {
                let v = it
                    .next()
                    .with_context(|| format!("{a} needs a value\n{USAGE}"))?;
                out.flags.push((a.clone(), Some(v.clone())));
            } else {
                out.positional.push(a.clone());
            }
        }
        Ok(out)
    }

    fn value(&self, name: &str) -> Option<&str> {
        self.flags
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }

    fn has(&self, name: &str) -> bool {
        self.flags.iter().any(|(k, _)| k == name)
    }

    /// Refuses flags the command does not know.
    fn only(&self, known: &[&str]) -> anyhow::Result<()> {
        match self
            .flags
            .iter()
            .find(|(k, _)| !known.contains(&k.as_str()))
        {
            Some((k, _)) => bail!("unknown option {k}\n{USAGE}"),
            None => Ok(()),
        }
    }

    fn crate_dir(&self) -> PathBuf {
        PathBuf::from(self.value("--dir").unwrap_or("."))
    }
}

/// Runs `bss plugin <args>`.
pub async fn command(args: &[String]) -> anyhow::Result<()> {
    let (sub, rest) = args.split_first().with_context(|| USAGE.to_owned())?;
    let a = Args::parse(rest)?;
    match sub.as_str() {
        "new" => {
            a.only(&["--kind", "--dir", "--sdk"])?;
            let [name] = a.positional.as_slice() else {
                bail!("name the plugin\n{USAGE}");
            };
            let kind = a.value("--kind").context("say which --kind of plugin")?;
            let kind = Kind::parse(kind).with_context(|| {
                format!(
                    "{kind:?} is not a kind: validation-hook, event-enricher or webhook-transformer"
                )
            })?;
            let parent = PathBuf::from(a.value("--dir").unwrap_or("."));
            let dir = new_plugin(&parent, name, kind, a.value("--sdk").map(Path::new))?;
            println!(
                "created {} ({}), a crate of its own:",
                dir.display(),
                kind.as_str()
            );
            println!(
                "  cd {} && bss plugin test && bss plugin build",
                dir.display()
            );
            Ok(())
        }
        "build" => {
            a.only(&["--dir"])?;
            let wasm = build(&a.crate_dir())?;
            let size = std::fs::metadata(&wasm)?.len();
            println!("built {} ({:.1} KiB)", wasm.display(), size as f64 / 1024.0);
            Ok(())
        }
        "test" => {
            a.only(&["--dir"])?;
            cargo(&a.crate_dir(), &["test"])
        }
        "run" => run(&a).await,
        "push" => {
            a.only(&[
                "--dir",
                "--url",
                "--token",
                "--no-build",
                "--wasm",
                "--trial",
                "--percent",
            ])?;
            push(&a).await
        }
        "logs" => {
            a.only(&["--dir", "--url", "--token", "--follow"])?;
            logs(&a).await
        }
        "calls" => {
            a.only(&["--dir", "--url", "--token"])?;
            list_calls(&a).await
        }
        "replay" => {
            a.only(&[
                "--dir",
                "--url",
                "--token",
                "--no-build",
                "--wasm",
                "--name",
                "--json",
            ])?;
            replay(&a).await
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown plugin command {other:?}\n{USAGE}"),
    }
}

/// Runs cargo in a plugin crate, its output going to the terminal.
fn cargo(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let manifest = dir.join("Cargo.toml");
    if !manifest.exists() {
        bail!(
            "{} has no Cargo.toml: run this in a plugin crate, or say --dir",
            dir.display()
        );
    }
    let status = Command::new(cargo_program())
        .args(args)
        .arg("--manifest-path")
        .arg(&manifest)
        .status()
        .context("cannot run cargo (is Rust installed? https://rustup.rs)")?;
    if !status.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    Ok(())
}

fn cargo_program() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

const TARGET: &str = "wasm32-wasip2";

/// Adds the wasm32-wasip2 target when rustup manages the toolchain and
/// lacks it.
fn ensure_target(dir: &Path) -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .current_dir(dir)
        .output();
    let Ok(installed) = installed else {
        return Ok(()); // no rustup: cargo says what is missing
    };
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == TARGET)
    {
        return Ok(());
    }
    eprintln!("adding the {TARGET} target (rustup target add {TARGET})");
    let status = Command::new("rustup")
        .args(["target", "add", TARGET])
        .current_dir(dir)
        .status()?;
    if !status.success() {
        bail!("rustup target add {TARGET} failed");
    }
    Ok(())
}

/// Builds the crate's component (release, wasm32-wasip2); its path.
pub fn build(dir: &Path) -> anyhow::Result<PathBuf> {
    ensure_target(dir)?;
    cargo(dir, &["build", "--release", "--target", TARGET])?;
    component_path(dir)
}

/// Where cargo puts the crate's component.
fn component_path(dir: &Path) -> anyhow::Result<PathBuf> {
    let out = Command::new(cargo_program())
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--manifest-path",
        ])
        .arg(dir.join("Cargo.toml"))
        .output()
        .context("cannot run cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: Value = serde_json::from_slice(&out.stdout)?;
    let target = meta["target_directory"]
        .as_str()
        .context("cargo metadata names no target directory")?;
    let package = meta["packages"][0]["name"]
        .as_str()
        .context("cargo metadata names no package")?;
    Ok(Path::new(target)
        .join(TARGET)
        .join("release")
        .join(format!("{}.wasm", package.replace('-', "_"))))
}

async fn run(a: &Args) -> anyhow::Result<()> {
    a.only(&[
        "--record",
        "--previous",
        "--event",
        "--request",
        "--config",
        "--manifest",
        "--resource",
        "--operation",
        "--json",
        "--kind",
    ])?;
    let inferred = if a.has("--record") {
        Some(Kind::ValidationHook)
    } else if a.has("--request") {
        Some(Kind::WebhookTransformer)
    } else if a.has("--event") {
        Some(Kind::EventEnricher)
    } else {
        None
    };
    let asked = a
        .value("--kind")
        .map(|k| Kind::parse(k).with_context(|| format!("{k:?} is not a kind")))
        .transpose()?;
    let manifest = local::read_manifest(a.value("--manifest").map(Path::new), asked.or(inferred))?
        .context("say what to run it on: --record FILE (validation hook) or --event FILE")?;
    let wasm = match a.positional.as_slice() {
        [w] => PathBuf::from(w),
        [] => component_path(Path::new("."))?,
        _ => bail!("run takes one component\n{USAGE}"),
    };
    let checked = local::check(manifest)?;
    let plugin = std::sync::Arc::new(LocalPlugin::load(&wasm, checked)?);
    let file = |k: &str| a.value(k).map(local::json_file).transpose();
    let input = RunInput {
        record: file("--record")?,
        previous: file("--previous")?,
        event: file("--event")?,
        request: file("--request")?,
        config: file("--config")?,
        resource: a.value("--resource").map(str::to_owned),
        operation: a.value("--operation").map(str::to_owned),
    };
    let (outcome, report) = plugin.call(input).await?;
    if a.has("--json") {
        let mut out = local::outcome_json(&outcome, &report, &plugin.checked);
        out["loadMs"] = serde_json::json!(plugin.load_ms);
        println!("{out}");
    } else {
        println!(
            "{} {} ({}; loaded in {:.1} ms)",
            plugin.kind.as_str(),
            plugin.checked.manifest.name,
            wasm.display(),
            plugin.load_ms
        );
        print!(
            "{}",
            local::outcome_text(&outcome, &report, &plugin.checked)
        );
    }
    if outcome.verdict == "failed" {
        bail!("the plugin failed");
    }
    Ok(())
}

/// The API to talk to and the token to show it.
fn api(a: &Args) -> anyhow::Result<(String, String)> {
    let url = a
        .value("--url")
        .map(str::to_owned)
        .or_else(|| std::env::var("BSS_URL").ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let token = a
        .value("--token")
        .map(str::to_owned)
        .or_else(|| std::env::var("BSS_TOKEN").ok().filter(|t| !t.is_empty()))
        .context("give a tenant admin's token: --token or BSS_TOKEN (`bss token --tenant ID` mints one locally)")?;
    Ok((url.trim_end_matches('/').to_owned(), token))
}

/// What a refused request said (its problem document), for a person.
async fn refusal(response: reqwest::Response) -> anyhow::Error {
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let mut text = format!(
        "the service answered {status}: {}",
        body["detail"]
            .as_str()
            .or(body["title"].as_str())
            .unwrap_or("(no detail)")
    );
    for e in body["errors"].as_array().into_iter().flatten() {
        text.push_str(&format!(
            "\n  {}: {}",
            e["path"].as_str().unwrap_or_default(),
            e["message"].as_str().unwrap_or_default()
        ));
    }
    anyhow::anyhow!(text)
}

async fn push(a: &Args) -> anyhow::Result<()> {
    let dir = a.crate_dir();
    let (url, token) = api(a)?;
    let manifest = local::read_manifest(Some(&dir.join("plugin.toml")), None)?
        .context("the crate has no plugin.toml")?;
    let checked = local::check(manifest)?;
    let wasm = if let Some(w) = a.value("--wasm") {
        PathBuf::from(w)
    } else if a.has("--no-build") {
        component_path(&dir)?
    } else {
        build(&dir)?
    };
    let module = std::fs::read(&wasm).with_context(|| {
        format!(
            "cannot read {} (build it with `bss plugin build`)",
            wasm.display()
        )
    })?;
    let size = module.len();
    let form = reqwest::multipart::Form::new()
        .part(
            "manifest",
            reqwest::multipart::Part::text(serde_json::to_string(&checked.manifest)?)
                .mime_str("application/json")?,
        )
        .part(
            "module",
            reqwest::multipart::Part::bytes(module)
                .file_name("plugin.wasm")
                .mime_str("application/wasm")?,
        );
    let mut query = Vec::new();
    if let Some(t) = a.value("--trial") {
        query.push(("trial", t));
    }
    if let Some(p) = a.value("--percent") {
        query.push(("percent", p));
    }
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/plugins"))
        .query(&query)
        .bearer_auth(token)
        .multipart(form)
        .send()
        .await
        .with_context(|| format!("cannot reach the service at {url}"))?;
    if !response.status().is_success() {
        return Err(refusal(response).await);
    }
    let answer: Value = response.json().await?;
    println!(
        "pushed {} version {} ({:.1} KiB, sha256 {}){}",
        answer["name"].as_str().unwrap_or_default(),
        answer["version"],
        size as f64 / 1024.0,
        answer["sha256"].as_str().unwrap_or_default(),
        match answer["trial"].as_str() {
            Some(t) => format!(", on trial as a {t} beside the active version"),
            None if answer["active"] == true => ", active".into(),
            None => String::new(),
        }
    );
    Ok(())
}

/// The plugin a command is about: its argument (or `--name`), else the
/// crate's `plugin.toml`.
fn plugin_named(a: &Args, given: Option<&str>) -> anyhow::Result<String> {
    if let Some(n) = given.or(a.value("--name")) {
        return Ok(n.to_owned());
    }
    let manifest = local::read_manifest(Some(&a.crate_dir().join("plugin.toml")), None)?
        .context("name the plugin (or run this in its crate)")?;
    Ok(manifest.name)
}

/// GETs `path` from the API as JSON.
async fn get_json(url: &str, token: &str, path: &str) -> anyhow::Result<Value> {
    let response = reqwest::Client::new()
        .get(format!("{url}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("cannot reach the service at {url}"))?;
    if !response.status().is_success() {
        return Err(refusal(response).await);
    }
    Ok(response.json().await?)
}

async fn logs(a: &Args) -> anyhow::Result<()> {
    let (url, token) = api(a)?;
    let name = plugin_named(a, a.positional.first().map(String::as_str))?;
    let mut after = 0i64;
    loop {
        let page = get_json(
            &url,
            &token,
            &format!("/v1/plugins/{name}/logs?after={after}&limit=1000"),
        )
        .await?;
        let items = page["items"].as_array().cloned().unwrap_or_default();
        for l in &items {
            println!(
                "{} v{} {:<5} [{}] {}",
                l["at"].as_str().unwrap_or_default(),
                l["version"],
                l["level"].as_str().unwrap_or_default(),
                l["requestId"].as_str().unwrap_or_default(),
                l["message"].as_str().unwrap_or_default()
            );
        }
        after = page["next"].as_i64().unwrap_or(after);
        if items.len() < 1000 {
            if !a.has("--follow") {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }
}

async fn list_calls(a: &Args) -> anyhow::Result<()> {
    let (url, token) = api(a)?;
    let name = plugin_named(a, a.positional.first().map(String::as_str))?;
    let page = get_json(&url, &token, &format!("/v1/plugins/{name}/calls")).await?;
    let items = page["items"].as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        println!(
            "no recorded calls (the manifest's `record` says which calls are: \"failures\", \"all\" or a share)"
        );
    }
    for c in items {
        println!(
            "{}  {}  v{}  {:<11} {:>8.3} ms  {}",
            c["id"].as_str().unwrap_or_default(),
            c["at"].as_str().unwrap_or_default(),
            c["version"],
            c["verdict"].as_str().unwrap_or_default(),
            c["tookUs"].as_f64().unwrap_or_default() / 1e3,
            short(&c["outcome"], 60)
        );
    }
    Ok(())
}

/// A JSON value on one line, cut to `max` characters.
fn short(v: &Value, max: usize) -> String {
    let text = match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if text.chars().count() <= max {
        text
    } else {
        format!("{}…", text.chars().take(max).collect::<String>())
    }
}

async fn replay(a: &Args) -> anyhow::Result<()> {
    let [id] = a.positional.as_slice() else {
        bail!("name the recorded call to replay (bss plugin calls lists them)\n{USAGE}");
    };
    let (url, token) = api(a)?;
    let name = plugin_named(a, None)?;
    let call = get_json(&url, &token, &format!("/v1/plugins/{name}/calls/{id}")).await?;
    let dir = a.crate_dir();
    let wasm = if let Some(w) = a.value("--wasm") {
        PathBuf::from(w)
    } else if a.has("--no-build") {
        component_path(&dir)?
    } else {
        build(&dir)?
    };
    let manifest = local::read_manifest(Some(&dir.join("plugin.toml")), None)?
        .context("the crate has no plugin.toml")?;
    let recorded_kind = call["kind"].as_str().unwrap_or_default();
    if manifest.kind.as_str() != recorded_kind {
        bail!(
            "call {id} is of a {recorded_kind}, but this crate builds a {}",
            manifest.kind.as_str()
        );
    }
    let checked = local::check(manifest)?;
    let plugin = std::sync::Arc::new(LocalPlugin::load(&wasm, checked)?);
    let (input, context) = (&call["input"], &call["context"]);
    let some = |v: &Value| (!v.is_null()).then(|| v.clone());
    let run = RunInput {
        record: some(&input["record"]),
        previous: some(&input["previous"]),
        event: some(&input["event"]),
        request: some(&input["request"]),
        config: some(&context["config"]),
        resource: context["resource"].as_str().map(str::to_owned),
        operation: context["operation"].as_str().map(str::to_owned),
    };
    let (now, report) = plugin.call(run).await?;
    let same = now.verdict == call["verdict"] && now.detail == call["outcome"];
    if a.has("--json") {
        let mut local = local::outcome_json(&now, &report, &plugin.checked);
        local["loadMs"] = serde_json::json!(plugin.load_ms);
        println!(
            "{}",
            serde_json::json!({"recorded": call, "local": local, "same": same})
        );
        return Ok(());
    }
    println!(
        "call {id}: {} {name} version {}, {}, request {}",
        recorded_kind,
        call["version"],
        call["at"].as_str().unwrap_or_default(),
        call["requestId"].as_str().unwrap_or_default()
    );
    let row = |what: &str, then: String, now: String| println!("{what:<9} {then:<48} {now}");
    row(
        "",
        "in the service".into(),
        format!("local build ({})", wasm.display()),
    );
    row(
        "verdict",
        call["verdict"].as_str().unwrap_or_default().into(),
        now.verdict.into(),
    );
    row(
        "outcome",
        short(&call["outcome"], 46),
        short(&now.detail, 80),
    );
    row(
        "took",
        format!(
            "{:.3} ms",
            call["tookUs"].as_f64().unwrap_or_default() / 1e3
        ),
        format!("{:.3} ms", report.took.as_secs_f64() * 1e3),
    );
    row(
        "fuel",
        call["fuelUsed"].to_string(),
        report.fuel_used.to_string(),
    );
    row(
        "stderr",
        short(&call["stderr"], 46),
        short(&Value::String(report.stderr.clone()), 80),
    );
    println!(
        "{}",
        if same {
            "same outcome"
        } else {
            "the outcome changed"
        }
    );
    Ok(())
}
