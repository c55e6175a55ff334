//! A plugin author's path, driven as an author drives it: `bss plugin new`
//! in a folder outside the repository, the native test, the build, a local
//! run in the real sandbox, a push to the real service, a broken version
//! and what the author sees of it (locally and from the service), the fix.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use bss_tests::*;
use serde_json::{Value, json};

/// Where scaffolded crates build: one folder kept across runs, so only the
/// first run compiles the SDK's dependencies.
fn author_target() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("plugin-author")
}

/// Runs `bss args…` in `dir`, as the author's shell would.
fn bss(dir: &Path, sdk_home: &Path, args: &[&str]) -> Output {
    Command::new(bss_binary())
        .args(args)
        .current_dir(dir)
        .env("BSS_SDK_HOME", sdk_home)
        .env("CARGO_TARGET_DIR", author_target())
        .output()
        .unwrap_or_else(|e| panic!("running bss {args:?}: {e}"))
}

fn ok(out: Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn run_json(dir: &Path, sdk: &Path, record: &Value) -> (bool, Value) {
    std::fs::write(dir.join("input.json"), record.to_string()).unwrap();
    let out = bss(
        dir,
        sdk,
        &["plugin", "run", "--record", "input.json", "--json"],
    );
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "run printed no JSON ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), report)
}

fn edit(file: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    assert!(text.contains(from), "{} has no {from:?}", file.display());
    std::fs::write(file, text.replace(from, to)).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_author_scaffolds_tests_runs_pushes_breaks_and_fixes_a_hook() {
    let work = TempDir::new("bss-author");
    std::fs::create_dir_all(&work.0).unwrap();
    let sdk = work.0.join("sdk-home");

    // Scaffold: a crate of its own, with its manifest, a sample and a test.
    let said = ok(
        bss(
            &work.0,
            &sdk,
            &["plugin", "new", "--kind", "validation-hook", "totals"],
        ),
        "bss plugin new",
    );
    assert!(said.contains("totals"), "{said}");
    let dir = work.0.join("totals");
    for file in [
        "Cargo.toml",
        "plugin.toml",
        "src/lib.rs",
        "README.md",
        "samples/record.json",
    ] {
        assert!(dir.join(file).exists(), "{file} scaffolded");
    }
    assert!(
        sdk.join("bss-plugin-sdk-0.1.0/wit/plugin.wit").exists(),
        "the SDK is written out"
    );
    let refused_twice = bss(
        &work.0,
        &sdk,
        &["plugin", "new", "--kind", "validation-hook", "totals"],
    );
    assert!(
        !refused_twice.status.success(),
        "an existing folder is never overwritten"
    );
    let bad = bss(
        &work.0,
        &sdk,
        &["plugin", "new", "--kind", "validation-hook", "Totals!"],
    );
    assert!(String::from_utf8_lossy(&bad.stderr).contains("cannot be a plugin name"));

    // The native test, then the component.
    let tested = bss(&dir, &sdk, &["plugin", "test"]);
    let tested_out = String::from_utf8_lossy(&tested.stdout).into_owned();
    assert!(
        tested.status.success(),
        "{tested_out}\n{}",
        String::from_utf8_lossy(&tested.stderr)
    );
    assert!(
        tested_out.contains("refuses_negative_totals_only ... ok"),
        "{tested_out}"
    );
    let built = ok(bss(&dir, &sdk, &["plugin", "build"]), "bss plugin build");
    assert!(
        built.contains("totals.wasm") && built.contains("KiB"),
        "{built}"
    );

    // Run locally, in the real sandbox, under plugin.toml's limits.
    let sample = ok(
        bss(
            &dir,
            &sdk,
            &["plugin", "run", "--record", "samples/record.json"],
        ),
        "bss plugin run",
    );
    assert!(sample.contains("verdict   refused"), "{sample}");
    assert!(
        sample.contains("/total  a total cannot be negative  [negative-total]"),
        "{sample}"
    );
    let (_, refused) = run_json(&dir, &sdk, &json!({"total": -1}));
    assert_eq!(refused["verdict"], "refused");
    assert_eq!(refused["detail"]["violations"][0]["path"], "/total");
    assert!(refused["fuelUsed"].as_u64().unwrap() > 0, "{refused}");
    assert!(
        refused["memoryPeakBytes"].as_u64().unwrap() > 0,
        "{refused}"
    );
    assert_eq!(refused["limits"]["deadlineMs"], 50);
    let (_, accepted) = run_json(&dir, &sdk, &json!({"total": 10}));
    assert_eq!(accepted["verdict"], "accepted");

    // Push to the service; writes meet the hook.
    let app = TestApp::spawn().await;
    let (_tenant, token) = app.tenant().await;
    let schema = json!({"type": "object", "properties": {
        "total": {"type": "number"}, "iban": {"type": "string", "x-encrypted": true}}});
    assert_eq!(
        app.put_schema("invoices", &token, schema).await.status(),
        201
    );
    // Failed calls are recorded, for replay.
    edit(
        &dir.join("plugin.toml"),
        "onDelete = false",
        "onDelete = false\nrecord = \"failures\"",
    );
    let push = |dir: &Path| {
        ok(
            bss(
                dir,
                &sdk,
                &["plugin", "push", "--url", &app.base, "--token", &token],
            ),
            "bss plugin push",
        )
    };
    let pushed = push(&dir);
    assert!(pushed.contains("pushed totals version 1"), "{pushed}");
    let write = |total: i64| {
        let doc = json!({"total": total, "iban": "DE89 3704"});
        let req = app.request(reqwest::Method::POST, "/v1/data/invoices", Some(&token));
        send(req.json(&doc))
    };
    let refused = write(-5).await;
    assert_eq!(refused.status(), 422);
    assert_eq!(body(refused).await["errors"][0]["source"], "plugin:totals");
    assert_eq!(write(5000).await.status(), 201);

    // Break it: totals over 1000 panic. The service names the panic and
    // its line; a local run of the same input says the same.
    let lib = dir.join("src/lib.rs");
    edit(
        &lib,
        "            _ => Ok(()),",
        "            Some(total) if total > 1000.0 => panic!(\"totals over 1000 are not handled yet: {total}\"),\n            _ => Ok(()),",
    );
    let pushed = push(&dir);
    assert!(pushed.contains("pushed totals version 2"), "{pushed}");
    let broken = write(5000).await;
    assert_eq!(broken.status(), 422);
    let problem = body(broken).await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("plugin totals (version 2)"), "{detail}");
    assert!(
        detail.contains("totals over 1000 are not handled yet: 5000"),
        "{detail}"
    );
    assert!(
        detail.contains("src/lib.rs:"),
        "the panic's place: {detail}"
    );
    let (succeeded, failed) = run_json(&dir, &sdk, &json!({"total": 5000}));
    assert!(!succeeded, "a failed run exits non-zero");
    assert_eq!(failed["verdict"], "failed");
    assert_eq!(failed["detail"]["kind"], "trap");
    assert!(
        failed["stderr"]
            .as_str()
            .unwrap()
            .contains("totals over 1000 are not handled yet")
    );

    // The service recorded the failed call (refusals are not failures),
    // its encrypted field redacted.
    let calls = wait_for_calls(&app, &token, 1).await;
    let call = &calls[0];
    assert_eq!(call["verdict"], "failed");
    assert_eq!(call["version"], 2);
    assert_eq!(call["outcome"]["kind"], "trap");
    assert_eq!(call["input"]["record"]["total"], 5000);
    assert_eq!(call["input"]["record"]["iban"], "[redacted: x-encrypted]");
    assert!(
        call["stderr"].as_str().unwrap().contains("not handled yet"),
        "{call}"
    );
    let id = call["id"].as_str().unwrap();
    let listed = ok(
        bss(
            &dir,
            &sdk,
            &["plugin", "calls", "--url", &app.base, "--token", &token],
        ),
        "bss plugin calls",
    );
    assert!(listed.contains(id) && listed.contains("failed"), "{listed}");

    // Fix it (and log what it checks), replay the failed call against the
    // local build, then push.
    edit(
        &lib,
        "panic!(\"totals over 1000 are not handled yet: {total}\")",
        "Err(vec![Violation::new(\"/total\", format!(\"{total} is over 1000\"))])",
    );
    edit(
        &lib,
        "        match record[\"total\"].as_f64() {",
        "        bss_plugin::log(bss_plugin::Level::Info, &format!(\"checking total {}\", record[\"total\"]));\n        match record[\"total\"].as_f64() {",
    );
    let replayed = ok(
        bss(
            &dir,
            &sdk,
            &[
                "plugin", "replay", id, "--url", &app.base, "--token", &token,
            ],
        ),
        "bss plugin replay",
    );
    assert!(
        replayed.contains("in the service") && replayed.contains("local build"),
        "{replayed}"
    );
    assert!(replayed.contains("the outcome changed"), "{replayed}");
    assert!(replayed.contains("5000 is over 1000"), "{replayed}");
    let pushed = push(&dir);
    assert!(pushed.contains("pushed totals version 3"), "{pushed}");
    let refused = write(5000).await;
    assert_eq!(refused.status(), 422);
    assert_eq!(
        body(refused).await["errors"][0]["message"],
        "5000 is over 1000"
    );
    assert_eq!(write(500).await.status(), 201);

    // What it logged, with the version and request id of each line.
    let mut logged = String::new();
    for _ in 0..50 {
        logged = ok(
            bss(
                &dir,
                &sdk,
                &[
                    "plugin", "logs", "totals", "--url", &app.base, "--token", &token,
                ],
            ),
            "bss plugin logs",
        );
        if logged.contains("checking total 500") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(logged.contains("v3 info  ["), "{logged}");
    assert!(
        logged.contains("checking total 5000") && logged.contains("checking total 500"),
        "{logged}"
    );
}

async fn wait_for_calls(app: &TestApp, token: &str, n: usize) -> Vec<Value> {
    for _ in 0..50 {
        let page = body(app.get("/v1/plugins/totals/calls", token).await).await;
        let items = page["items"].as_array().cloned().unwrap_or_default();
        if items.len() >= n {
            return items;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    panic!("no {n} recorded calls");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_push_with_a_bad_token_or_manifest_says_why() {
    let work = TempDir::new("bss-author-refused");
    std::fs::create_dir_all(&work.0).unwrap();
    let sdk = work.0.join("sdk-home");
    ok(
        bss(
            &work.0,
            &sdk,
            &["plugin", "new", "--kind", "event-enricher", "marks"],
        ),
        "bss plugin new",
    );
    let dir = work.0.join("marks");
    edit(
        &dir.join("plugin.toml"),
        "deadlineMs = 50",
        "deadlineMs = 60000",
    );
    std::fs::write(dir.join("marks.wasm"), b"\0asm").unwrap();
    let out = bss(
        &dir,
        &sdk,
        &["plugin", "push", "--wasm", "marks.wasm", "--token", "x"],
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(said.contains("/manifest/limits/deadlineMs"), "{said}");

    let app = TestApp::spawn().await;
    edit(
        &dir.join("plugin.toml"),
        "deadlineMs = 60000",
        "deadlineMs = 50",
    );
    let out = bss(
        &dir,
        &sdk,
        &[
            "plugin",
            "push",
            "--wasm",
            "marks.wasm",
            "--url",
            &app.base,
            "--token",
            "not-a-token",
        ],
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(said.contains("401"), "{said}");
}
