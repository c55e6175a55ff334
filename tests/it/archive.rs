//! `bss tenant export` / `bss tenant import`: a tenant taken out of one
//! database and put into another answers every read the same; a taken id,
//! a newer format, a corrupt or truncated archive are refused and leave
//! nothing behind.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bss_tests::*;
use serde_json::{Value, json};
use sha2::Digest;

/// One master key for both installations (sealed values move as they are).
const MASTER_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

async fn installation() -> TestApp {
    TestApp::spawn_with(|s| {
        s.master_key = Some(MASTER_KEY.into());
        s.webhook_allow = "127.0.0.1/32".into();
        s.webhook_allow_http = true;
    })
    .await
}

/// Runs `bss tenant …` against the installation's database.
fn tenant_cli(app: &TestApp, args: &[&str]) -> (bool, String) {
    let data = TempDir::new("bss-archive-data");
    std::fs::create_dir_all(&data.0).unwrap();
    let out = Command::new(bss_binary())
        .arg("tenant")
        .args(args)
        .env("DATABASE_URL", &app.database_url)
        .env("BSS_MASTER_KEY", MASTER_KEY)
        .env("BSS_DATA_DIR", &data.0)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A tenant with two resources, schema history, sealed values, records
/// at several versions and a plugin with two versions.
async fn busy_tenant(app: &TestApp) -> (String, String) {
    let (tenant, token) = app.tenant_with_invoices().await;
    let mut v2 = invoice_schema();
    v2["properties"]["note"] = json!({"type": "string"});
    assert_eq!(app.put_schema("invoices", &token, v2).await.status(), 201);
    let customers = json!({"type": "object", "required": ["name"],
        "properties": {"name": {"type": "string", "x-index": true}, "tier": {"type": "integer"}}});
    assert_eq!(
        app.put_schema("customers", &token, customers)
            .await
            .status(),
        201
    );
    let hook = |max: u64| {
        json!({"name": "no-negative-totals", "kind": "validation-hook",
               "resources": ["invoices"], "config": {"max_total": max}})
    };
    app.install_plugin(&token, hook(100_000), "no_negative_totals")
        .await;
    app.install_plugin(&token, hook(1_000), "no_negative_totals")
        .await;
    for n in 0..60u64 {
        let doc = json!({"number": format!("N-{n:03}"), "total": n * 7 % 500, "iban": format!("DE{n:020}"),
                         "customer": {"name": format!("c{}", n % 5)}, "note": "tab\there \"quoted\" \\ back"});
        let created = app.post("/v1/data/invoices", &token, &doc).await;
        assert_eq!(created.status(), 201);
        if n % 4 == 0 {
            let id = body(created).await["id"].as_str().unwrap().to_owned();
            let resp = app
                .patch(
                    &format!("/v1/data/invoices/{id}"),
                    &token,
                    &json!({"status": "paid"}),
                )
                .await;
            assert_eq!(resp.status(), 200);
        }
    }
    // An endpoint for an event the tests never cause (so its state stays).
    let hook = json!({"url": "http://127.0.0.1:9/hook", "events": ["business_store.data.deleted"],
                      "description": "deletions"});
    let resp = app.post("/v1/webhooks", &token, &hook).await;
    assert_eq!(resp.status(), 201, "{:#}", body(resp).await);
    let batch: Vec<Value> = (0..40)
        .map(|n| json!({"name": format!("cust {n}"), "tier": n % 3}))
        .collect();
    let resp = app
        .post("/v1/data/customers/batch", &token, &json!({"items": batch}))
        .await;
    assert_eq!(resp.status(), 201);
    (tenant, token)
}

/// Every read a client of the tenant would make, as answered.
async fn answers(app: &TestApp, token: &str) -> Vec<(String, u16, Option<String>, Value)> {
    let mut paths: Vec<String> = [
        "/v1/schemas",
        "/v1/schemas/invoices",
        "/v1/schemas/invoices/versions",
        "/v1/schemas/customers",
        "/v1/data/invoices?limit=1000&order=total.desc,createdAt.asc&count=exact",
        "/v1/data/invoices?total=gte.200&select=id,data.total,data.iban&limit=1000",
        "/v1/data/customers?order=name.asc&limit=7",
        "/v1/plugins",
        "/v1/plugins/no-negative-totals",
        "/v1/webhooks",
    ]
    .map(str::to_owned)
    .to_vec();
    for resource in ["invoices", "customers"] {
        let page = body(
            app.get(&format!("/v1/data/{resource}?limit=1000"), token)
                .await,
        )
        .await;
        for item in page["items"].as_array().unwrap() {
            let id = item["id"].as_str().unwrap();
            paths.push(format!("/v1/data/{resource}/{id}?include=audit"));
        }
    }
    let mut out = Vec::new();
    for path in paths {
        let resp = app.get(&path, token).await;
        let status = resp.status().as_u16();
        let etag = resp
            .headers()
            .get("etag")
            .map(|v| v.to_str().unwrap().to_owned());
        let mut answer = body(resp).await;
        // What says where it runs, not what the tenant holds.
        if let Some(stats) = answer.get_mut("stats") {
            *stats = Value::Null;
        }
        if let Some(items) = answer.get_mut("items").and_then(Value::as_array_mut) {
            for item in items {
                if let Some(stats) = item.get_mut("stats") {
                    *stats = Value::Null;
                }
            }
        }
        out.push((path, status, etag, answer));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_moved_to_a_fresh_database_answers_every_read_the_same() {
    let source = installation().await;
    let (tenant, token) = busy_tenant(&source).await;

    // Another tenant writes all along, export included.
    let load = Load::start(&source).await;
    let dir = TempDir::new("bss-archive");
    std::fs::create_dir_all(&dir.0).unwrap();
    let file = dir.0.join("t.tar.zst");
    let file = file.to_str().unwrap();
    let (ok, said) = tenant_cli(&source, &["export", &tenant, "--out", file]);
    assert!(ok, "{said}");
    assert!(said.contains("100 records"), "{said}");
    assert!(load.stop().await > 0);

    let target = installation().await;
    let (ok, said) = tenant_cli(&target, &["import", file]);
    assert!(ok, "{said}");
    assert!(said.contains("imported tenant"), "{said}");

    let before = answers(&source, &token).await;
    let after = answers(&target, &token).await;
    assert_eq!(before.len(), 10 + 100, "every record read one by one");
    assert_eq!(before.len(), after.len());
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b, a, "{} answers differently after the move", b.0);
    }
    // Sealed values open on the target; the plugin works there.
    let some = body(target.get("/v1/data/invoices?limit=1", &token).await).await;
    assert!(
        some["items"][0]["data"]["iban"]
            .as_str()
            .unwrap()
            .starts_with("DE")
    );
    let refused = target
        .post(
            "/v1/data/invoices",
            &token,
            &json!({"number": "big", "total": 5000}),
        )
        .await;
    assert_eq!(refused.status(), 422, "version 2 of the hook answers");
    let created = target
        .post(
            "/v1/data/invoices",
            &token,
            &json!({"number": "new", "total": 5}),
        )
        .await;
    assert_eq!(created.status(), 201);
    // One event says so, not one per record.
    let log = wait_for_events(&target, &token, 2).await;
    let kinds: Vec<&str> = log.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds[0], "business_store.tenant.imported", "{kinds:?}");
    assert_eq!(log[0]["data"]["records"], 100);
    assert_eq!(log[0]["data"]["tenantId"], log[0]["data"]["exportedAs"]);
    assert!(!kinds.contains(&"business_store.data.updated"), "{kinds:?}");
}

/// Creates of another tenant, one after another, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    async fn start(app: &TestApp) -> Self {
        let (_, other) = app.tenant_with_invoices().await;
        let (stop, written) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let task = {
            let (stop, written) = (stop.clone(), written.clone());
            let (base, client) = (app.base.clone(), app.client.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let resp = client
                        .post(format!("{base}/v1/data/invoices"))
                        .bearer_auth(&other)
                        .json(&json!({"number": "load", "total": 1}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(resp.status(), 201);
                    written.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        Self {
            stop,
            written,
            task,
        }
    }

    /// Stops it: how many it wrote.
    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        self.written.load(Ordering::Relaxed)
    }
}

/// Follows an archive job until it is no longer running.
async fn finished(app: &TestApp, location: &str) -> Value {
    let admin = platform_token();
    for _ in 0..600 {
        let resp = app.get(location, &admin).await;
        assert_eq!(resp.status(), 200);
        let job = body(resp).await;
        if job["status"] != "running" {
            return job;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the job at {location} is still running after a minute");
}

/// Uploads an archive to `POST /v1/tenants/import{query}`.
async fn upload(app: &TestApp, query: &str, archive: Vec<u8>) -> reqwest::Response {
    app.request(
        reqwest::Method::POST,
        &format!("/v1/tenants/import{query}"),
        Some(&platform_token()),
    )
    .header("content-type", "application/zstd")
    .body(archive)
    .send()
    .await
    .unwrap()
}

/// The same move over the API, the event log with it: an export job
/// (progress, then its archive to download) while another tenant writes,
/// the archive uploaded to a fresh installation and imported by a job.
#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_moved_over_the_api_with_its_event_log_answers_the_same() {
    let source = installation().await;
    let (tenant, token) = busy_tenant(&source).await;
    let admin = platform_token();
    let export = format!("/v1/tenants/{tenant}/export");
    // For platform admins only, of a tenant that is here.
    let resp = source.post(&export, &token, &json!({})).await;
    assert_eq!(resp.status(), 403);
    let resp = source
        .post("/v1/tenants/nobody/export", &admin, &json!({}))
        .await;
    assert_eq!(resp.status(), 404);

    let load = Load::start(&source).await;
    let resp = source
        .post(&export, &admin, &json!({"withEvents": true}))
        .await;
    assert_eq!(resp.status(), 202);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let job = finished(&source, &location).await;
    assert!(load.stop().await > 0);
    assert_eq!(job["status"], "done", "{job:#}");
    assert_eq!(job["kind"], "export");
    assert_eq!(
        (job["recordsDone"].as_u64(), job["recordsTotal"].as_u64()),
        (Some(100), Some(100))
    );
    assert_eq!(job["result"]["records"], 100);
    let events = job["result"]["events"].as_u64().unwrap() as usize;
    // Every event the tenant's writes made (60 invoices, 15 patches, the
    // batch's 40 customers), schema changes and plugin and webhook ones.
    assert!(events > 115, "{job:#}");
    let source_log = wait_for_events(&source, &token, events).await;
    assert_eq!(source_log.len(), events);

    let resp = source.get(&format!("{location}/archive"), &admin).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/zstd");
    let etag = resp.headers()["etag"].to_str().unwrap().to_owned();
    let archive = resp.bytes().await.unwrap().to_vec();
    let sha256 = bss::archive::export::hex(&sha2::Sha256::digest(&archive));
    assert_eq!(job["sha256"], sha256.as_str());
    assert_eq!(etag, format!("\"{sha256}\""));
    assert_eq!(job["bytes"], archive.len());

    let target = installation().await;
    // What is not an archive is refused before any job starts.
    let resp = upload(&target, "", b"not an archive".to_vec()).await;
    assert_eq!(resp.status(), 422);
    let resp = upload(&target, "", archive.clone()).await;
    assert_eq!(resp.status(), 202);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let job = finished(&target, &location).await;
    assert_eq!(job["status"], "done", "{job:#}");
    assert_eq!(
        (job["kind"].as_str(), job["tenant"].as_str()),
        (Some("import"), Some(tenant.as_str()))
    );
    assert_eq!(job["result"]["records"], 100);
    assert_eq!(job["result"]["events"], events);
    // An import job has nothing to download.
    let resp = target.get(&format!("{location}/archive"), &admin).await;
    assert_eq!(resp.status(), 404);

    let before = answers(&source, &token).await;
    let after = answers(&target, &token).await;
    assert_eq!(before.len(), after.len());
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b, a, "{} answers differently after the move", b.0);
    }
    // The log: the tenant's events as they were, in their order, then the
    // import's one.
    let target_log = wait_for_events(&target, &token, events + 1).await;
    assert_eq!(target_log.len(), events + 1);
    for (b, a) in source_log.iter().zip(&target_log) {
        for field in ["id", "type", "subject", "time", "data", "tenantid"] {
            assert_eq!(b[field], a[field], "{field} of {b:#}");
        }
    }
    let last = &target_log[events];
    assert_eq!(last["type"], "business_store.tenant.imported");
    assert_eq!(last["data"]["events"], events);
    // They were published where they were written: here the relay leaves
    // none of them pending (the backlog counts what it still owes).
    let mut db = target.db().await;
    let mut left = -1i64;
    for _ in 0..100 {
        (left,) = sqlx::query_as(bss::events::outbox::BACKLOG_SQL)
            .fetch_one(&mut db)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(left, 0, "imported events wait to be published");

    // The id is taken now; under another one, each event has a new id and
    // names the new tenant.
    let resp = upload(&target, "", archive.clone()).await;
    assert_eq!(resp.status(), 409);
    let resp = upload(&target, "?as=moved-copy", archive).await;
    assert_eq!(resp.status(), 202);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let job = finished(&target, &location).await;
    assert_eq!(job["status"], "done", "{job:#}");
    let copy = bss_tests::token("moved-copy", &["admin"]);
    let copy_log = wait_for_events(&target, &copy, events + 1).await;
    for (b, a) in source_log.iter().zip(&copy_log) {
        assert_ne!(b["id"], a["id"]);
        assert_eq!(a["tenantid"], "moved-copy");
        assert_eq!((&b["type"], &b["data"]), (&a["type"], &a["data"]));
    }
}

/// Two jobs running (as another replica's would be) hold the installation's
/// places: a third is 429 with Retry-After. A job whose heartbeat stopped
/// (its replica died) reads as failed and holds no place.
#[tokio::test]
async fn two_running_jobs_hold_the_places_and_a_stalled_one_reads_as_interrupted() {
    let app = installation().await;
    let (tenant, _) = app.tenant_with_invoices().await;
    let admin = platform_token();
    let mut db = app.db().await;
    let running: Vec<uuid::Uuid> = (0..2).map(|_| uuid::Uuid::now_v7()).collect();
    for id in &running {
        sqlx::query(
            "INSERT INTO bss.archive_jobs (id, kind, tenant_id, created_by) VALUES ($1, 'export', $2, 'elsewhere')",
        )
        .bind(id)
        .bind(&tenant)
        .execute(&mut db)
        .await
        .unwrap();
    }
    let export = format!("/v1/tenants/{tenant}/export");
    let resp = app.post(&export, &admin, &json!({})).await;
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    assert!(!resp.headers().contains_key("ratelimit-policy"));

    // One replica stopped a minute ago: its job is failed, its place free.
    sqlx::query(
        "UPDATE bss.archive_jobs SET updated_at = now() - interval '2 minutes' WHERE id = $1",
    )
    .bind(running[0])
    .execute(&mut db)
    .await
    .unwrap();
    let job = body(
        app.get(&format!("/v1/archive-jobs/{}", running[0]), &admin)
            .await,
    )
    .await;
    assert_eq!(job["status"], "failed", "{job:#}");
    assert!(
        job["error"].as_str().unwrap().contains("interrupted"),
        "{job:#}"
    );
    let resp = app.post(&export, &admin, &json!({})).await;
    assert_eq!(resp.status(), 202);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(finished(&app, &location).await["status"], "done");
}

/// The archive's members, decompressed.
fn members(file: &Path) -> Vec<(String, Vec<u8>)> {
    let decoder = zstd::Decoder::new(std::fs::File::open(file).unwrap()).unwrap();
    let mut archive = tar::Archive::new(decoder);
    let mut out = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        out.push((name, bytes));
    }
    out
}

/// Writes members as an archive (checksums as they are: the manifest is
/// one of the members).
fn write_members(file: &Path, members: &[(String, Vec<u8>)]) {
    let encoder = zstd::Encoder::new(std::fs::File::create(file).unwrap(), 3).unwrap();
    let mut tar = tar::Builder::new(encoder);
    for (name, bytes) in members {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        tar.append_data(&mut header, name, bytes.as_slice())
            .unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap().flush().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_taken_id_a_newer_format_a_corrupt_or_truncated_archive_are_refused_leaving_nothing() {
    let app = installation().await;
    let (tenant, _) = busy_tenant(&app).await;
    let dir = TempDir::new("bss-archive");
    std::fs::create_dir_all(&dir.0).unwrap();
    let good = dir.0.join("good.tar.zst");
    let (ok, said) = tenant_cli(&app, &["export", &tenant, "--out", good.to_str().unwrap()]);
    assert!(ok, "{said}");
    let count = tenants(&app).await;

    // The id is taken here: said, with the way out.
    let (ok, said) = tenant_cli(&app, &["import", good.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        said.contains("exists here") && said.contains("--as"),
        "{said}"
    );

    let original = members(&good);
    let refused = |name: &str, members: Vec<(String, Vec<u8>)>| {
        let file = dir.0.join(name);
        write_members(&file, &members);
        let (ok, said) = tenant_cli(&app, &["import", "--as", "copy", file.to_str().unwrap()]);
        assert!(!ok, "{name} was imported: {said}");
        said
    };
    // A newer format.
    let mut newer = original.clone();
    let mut header: Value = serde_json::from_slice(&newer[0].1).unwrap();
    header["formatVersion"] = json!(99);
    newer[0].1 = serde_json::to_vec(&header).unwrap();
    let said = refused("newer.tar.zst", newer);
    assert!(said.contains("format version 99, newer"), "{said}");
    // A record changed after the export: its checksum no longer matches.
    let tampered = edited(&original, "records/customers/", "cust", "CUST");
    let said = refused("tampered.tar.zst", tampered);
    assert!(said.contains("does not match its checksum"), "{said}");
    // A record that breaks its schema (checksums made to match): named.
    let invalid = edited(
        &original,
        "records/customers/",
        "\"tier\": 0",
        "\"tier\": \"zero\"",
    );
    let said = refused("invalid.tar.zst", with_manifest(invalid));
    assert!(
        said.contains("does not match its schema") && said.contains("/tier"),
        "{said}"
    );
    // A plugin version whose manifest this build cannot load.
    let broken = edited(
        &original,
        "plugin_versions.ndjson",
        "\"validation-hook\"",
        "\"no-such-kind\"",
    );
    let said = refused("broken-plugin.tar.zst", with_manifest(broken));
    assert!(said.contains("its manifest is not valid"), "{said}");
    // A member larger than any the export writes: refused from its header,
    // before it is read into memory.
    let mut huge = original.clone();
    let last = huge.len() - 1;
    let size = bss::archive::MAX_MEMBER_BYTES as usize + 1;
    huge.insert(
        last,
        ("records/customers/999999.ndjson".into(), vec![b'\n'; size]),
    );
    let said = refused("huge.tar.zst", huge);
    assert!(said.contains("more than any member holds"), "{said}");
    // Truncated: cut anywhere.
    let bytes = std::fs::read(&good).unwrap();
    for cut in [bytes.len() / 3, bytes.len() - 40] {
        let file = dir.0.join(format!("cut-{cut}.tar.zst"));
        std::fs::write(&file, &bytes[..cut]).unwrap();
        let (ok, said) = tenant_cli(&app, &["import", "--as", "copy", file.to_str().unwrap()]);
        assert!(!ok, "{said}");
        assert!(
            said.contains("truncated") || said.contains("corrupt"),
            "{said}"
        );
    }
    // Nothing was left behind by any of them.
    assert_eq!(tenants(&app).await, count);
    let resp = app.get("/v1/tenants/copy", &platform_token()).await;
    assert_eq!(resp.status(), 404);

    // Under another id: a tenant of its own, sealed values sealed again.
    let (ok, said) = tenant_cli(&app, &["import", "--as", "copy", good.to_str().unwrap()]);
    assert!(ok, "{said}");
    assert!(said.contains("(exported as"), "{said}");
    let copy = token("copy", &["admin"]);
    let page = body(app.get("/v1/data/invoices?limit=1000", &copy).await).await;
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 60);
    assert!(
        items
            .iter()
            .all(|i| i["data"]["iban"].as_str().unwrap().starts_with("DE"))
    );
    // Its endpoint has an id of its own and a secret that opens (a rotation
    // keeps it as the previous one).
    let hooks = body(app.get("/v1/webhooks", &copy).await).await;
    let hook = hooks["items"][0]["id"].as_str().unwrap().to_owned();
    let rotated = app
        .post(
            &format!("/v1/webhooks/{hook}/secret/rotate"),
            &copy,
            &json!({}),
        )
        .await;
    assert_eq!(rotated.status(), 200, "{:#}", body(rotated).await);

    // Without the webhook secrets: endpoints come disabled, saying why.
    let bare = dir.0.join("bare.tar.zst");
    let (ok, said) = tenant_cli(
        &app,
        &[
            "export",
            &tenant,
            "--out",
            bare.to_str().unwrap(),
            "--without-webhook-secrets",
        ],
    );
    assert!(ok, "{said}");
    let (ok, said) = tenant_cli(&app, &["import", "--as", "bare", bare.to_str().unwrap()]);
    assert!(ok, "{said}");
    assert!(said.contains("1 without their secret"), "{said}");
    let hooks = body(app.get("/v1/webhooks", &token("bare", &["admin"])).await).await;
    assert_eq!(hooks["items"][0]["enabled"], false, "{hooks:#}");
    assert!(
        hooks["items"][0]["disabledReason"]
            .as_str()
            .unwrap()
            .contains("rotate")
    );
}

async fn tenants(app: &TestApp) -> i64 {
    let mut db = app.db().await;
    sqlx::query_scalar("SELECT count(*) FROM bss.tenants")
        .fetch_one(&mut db)
        .await
        .unwrap()
}

/// The members with the first `from` in the first member named `member…`
/// replaced by `to` (which must change it).
fn edited(
    members: &[(String, Vec<u8>)],
    member: &str,
    from: &str,
    to: &str,
) -> Vec<(String, Vec<u8>)> {
    let mut members = members.to_vec();
    let (_, bytes) = members
        .iter_mut()
        .find(|(n, _)| n.starts_with(member))
        .unwrap();
    let text = String::from_utf8(bytes.clone())
        .unwrap()
        .replacen(from, to, 1);
    assert_ne!(
        text.as_bytes(),
        bytes.as_slice(),
        "{from} is not in {member}"
    );
    *bytes = text.into_bytes();
    members
}

/// The members with their manifest's checksums made to match again.
fn with_manifest(mut members: Vec<(String, Vec<u8>)>) -> Vec<(String, Vec<u8>)> {
    let digest = |bytes: &[u8]| bss::archive::export::hex(&sha2::Sha256::digest(bytes));
    let last = members.len() - 1;
    let mut manifest: Value = serde_json::from_slice(&members[last].1).unwrap();
    for (i, (_, bytes)) in members[..last].iter().enumerate() {
        manifest["members"][i]["bytes"] = json!(bytes.len());
        manifest["members"][i]["sha256"] = json!(digest(bytes));
    }
    members[last].1 = serde_json::to_vec(&manifest).unwrap();
    members
}
