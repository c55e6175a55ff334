//! The standards clients meet, checked from outside: RFC 9457 problem
//! documents for every error, RFC 9110 conditional writes, and the
//! Prometheus exposition format (by Prometheus' own `promtool`).

use bss_tests::*;
use reqwest::Method;
use serde_json::{Value, json};

/// Asserts an RFC 9457 answer: the status, `application/problem+json`, and
/// a document whose `status` matches and whose `detail` says something.
async fn assert_problem(resp: reqwest::Response, status: u16) -> Value {
    assert_eq!(resp.status(), status);
    assert_eq!(
        resp.headers()["content-type"],
        "application/problem+json",
        "{status}"
    );
    let problem = body(resp).await;
    assert_eq!(problem["status"], status, "{problem:#}");
    assert!(
        problem["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("https://")),
        "{problem:#}"
    );
    assert!(
        problem["detail"].as_str().is_some_and(|d| d.len() > 10),
        "{problem:#}"
    );
    problem
}

#[tokio::test]
async fn what_the_framework_refuses_is_a_problem_document_too() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;

    // A method the path does not have: 405, with Allow.
    let resp = send(app.request(Method::PATCH, "/v1/schemas/invoices", Some(&token))).await;
    let allow = resp.headers()["allow"].to_str().unwrap().to_owned();
    assert!(allow.contains("GET") && allow.contains("PUT"), "{allow}");
    let problem = assert_problem(resp, 405).await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("PATCH") && detail.contains("Allow"),
        "{detail}"
    );

    // A query parameter of the wrong type, and one given twice.
    let problem = assert_problem(app.get("/v1/events?limit=abc", &token).await, 400).await;
    assert!(
        problem["detail"].as_str().unwrap().contains("limit"),
        "{problem:#}"
    );
    assert_problem(app.get("/v1/events?limit=1&limit=2", &token).await, 400).await;

    // A path segment that is not UTF-8.
    assert_problem(app.get("/v1/data/invoices/%FF", &token).await, 400).await;

    // A plugin upload sent as JSON is the wrong media type; a multipart
    // one without its boundary cannot be read.
    let resp = app.post("/v1/plugins", &token, &json!({})).await;
    let problem = assert_problem(resp, 415).await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("multipart/form-data")
    );
    let resp = send(
        app.request(Method::POST, "/v1/plugins", Some(&token))
            .header("content-type", "multipart/form-data")
            .body("--x\r\n"),
    )
    .await;
    let problem = assert_problem(resp, 400).await;
    assert!(problem["detail"].as_str().unwrap().contains("boundary"));

    // A path no route has.
    assert_problem(app.get("/v1/nothing-here", &token).await, 404).await;
}

#[tokio::test]
async fn if_match_star_and_weak_tags_follow_rfc_9110() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    let doc = json!({"number": "A-1", "total": 10});
    let put = |path: &str, header: (&'static str, &'static str), doc: &Value| {
        app.request(Method::PUT, path, Some(&token))
            .header(header.0, header.1)
            .json(doc)
    };

    // If-None-Match: * creates only.
    let path = "/v1/data/invoices/inv-a1";
    let resp = send(put(path, ("if-none-match", "*"), &doc)).await;
    assert_eq!(resp.status(), 201);
    let again = send(put(
        path,
        ("if-none-match", "*"),
        &json!({"number": "A-2", "total": 1}),
    ))
    .await;
    let problem = assert_problem(again, 412).await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("already exists")
    );
    assert_eq!(body(app.get(path, &token).await).await["data"], doc);

    // If-Match: * matches any current record, and none when there is none.
    let resp = send(put(
        path,
        ("if-match", "*"),
        &json!({"number": "A-1", "total": 11}),
    ))
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["etag"], "\"2\"");
    let missing = "/v1/data/invoices/inv-missing";
    assert_problem(send(put(missing, ("if-match", "*"), &doc)).await, 412).await;
    let resp = send(
        app.request(Method::PATCH, missing, Some(&token))
            .header("if-match", "*")
            .json(&json!({"total": 3})),
    )
    .await;
    assert_problem(resp, 412).await;
    let resp = send(
        app.request(Method::DELETE, missing, Some(&token))
            .header("if-match", "*"),
    )
    .await;
    assert_problem(resp, 412).await;
    assert_eq!(app.get(missing, &token).await.status(), 404);

    // A weak tag never matches a write, even the current version's.
    let resp = send(put(path, ("if-match", "W/\"2\""), &doc)).await;
    assert_problem(resp, 412).await;
    let resp = send(
        app.request(Method::PATCH, path, Some(&token))
            .header("if-match", "W/\"2\"")
            .json(&json!({"total": 3})),
    )
    .await;
    assert_problem(resp, 412).await;
    let resp = send(
        app.request(Method::DELETE, path, Some(&token))
            .header("if-match", "W/\"2\""),
    )
    .await;
    assert_problem(resp, 412).await;
    assert_eq!(body(app.get(path, &token).await).await["version"], 2);

    // A list holding the current strong tag matches; `*` deletes.
    let resp = send(
        app.request(Method::PATCH, path, Some(&token))
            .header("if-match", "W/\"1\", \"2\"")
            .json(&json!({"total": 12})),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let resp = send(
        app.request(Method::DELETE, path, Some(&token))
            .header("if-match", "*"),
    )
    .await;
    assert_eq!(resp.status(), 204);
    assert_eq!(app.get(path, &token).await.status(), 404);

    // What is not an ETag at all is a 400 that says what to send.
    let problem = assert_problem(send(put(path, ("if-match", "3"), &doc)).await, 400).await;
    assert!(problem["detail"].as_str().unwrap().contains('*'));
}

/// `promtool` from Debian's prometheus package, which `scripts/test`
/// unpacks (`BSS_TEST_PROMTOOL`), or one on the PATH.
fn promtool() -> String {
    std::env::var("BSS_TEST_PROMTOOL").unwrap_or_else(|_| "promtool".into())
}

#[tokio::test]
async fn metrics_pass_promtool_check_metrics() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    app.post(
        "/v1/data/invoices",
        &token,
        &json!({"number": "1", "total": 1}),
    )
    .await;
    app.get("/v1/no-such-route", &token).await;
    let text = app.metrics_text().await;
    assert!(text.contains("route=\"unmatched\""), "{text}");

    let (ok, out, err) = run_with_stdin(&promtool(), &["check", "metrics"], text.as_bytes());
    let said = format!("{out}{err}");
    assert!(ok && said.trim().is_empty(), "promtool: {said}");
}

/// schemathesis, from the virtual environment `scripts/test` makes.
fn schemathesis() -> std::path::PathBuf {
    let python = std::env::var("BSS_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    std::path::Path::new(&python).with_file_name("schemathesis")
}

/// Runs schemathesis (every check, every phase, `tests/schemathesis.toml`)
/// against the service with `token`; returns its summary, failing the test
/// on any finding.
async fn schemathesis_run(app: &TestApp, token: &str, who: &str) -> String {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/schemathesis.toml");
    let reports = TempDir::new("bss-schemathesis");
    std::fs::create_dir_all(&reports.0).unwrap();
    let mut command = std::process::Command::new(schemathesis());
    command.current_dir(&reports.0).args([
        "--no-color",
        "--config-file",
        config,
        "run",
        &format!("{}/openapi.json", app.base),
        "--checks",
        "all",
        "--exclude-path",
        "/v1/events/stream",
        "--header",
        &format!("Authorization: Bearer {token}"),
        "--max-examples",
        "20",
        "--seed",
        "1",
        "--workers",
        "2",
        "--request-timeout",
        "20",
    ]);
    let out = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (scripts/test installs it)",
                schemathesis().display()
            )
        });
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "schemathesis as {who} found problems:\n{said}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    said.lines()
        .filter(|l| l.contains("generated") || l.contains("Tested:"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ")
}

#[tokio::test]
async fn schemathesis_finds_nothing_as_tenant_admin_or_platform_admin() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    for n in 0..3 {
        let doc = json!({"number": format!("S-{n}"), "total": n});
        assert_eq!(
            app.post("/v1/data/invoices", &token, &doc).await.status(),
            201
        );
    }
    let tenant = schemathesis_run(&app, &token, "a tenant admin").await;
    let platform = schemathesis_run(&app, &platform_token(), "the platform admin").await;
    eprintln!("schemathesis: tenant admin: {tenant}\nschemathesis: platform admin: {platform}");
}

#[tokio::test]
async fn the_asyncapi_document_passes_the_asyncapi_parser() {
    let app = TestApp::spawn_with(|s| s.kafka_record_topic = Some("records".into())).await;
    let resp = send(app.request(Method::GET, "/asyncapi.json", None)).await;
    assert_eq!(resp.status(), 200);
    let doc = body(resp).await;
    assert_eq!(doc["asyncapi"], "3.0.0");
    let addresses: Vec<&str> = doc["channels"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(|c| c["address"].as_str())
        .collect();
    for topic in [
        "business_store.schema.updated",
        "business_store.data.created",
        "business_store.data.updated",
        "business_store.data.deleted",
        "business_store.webhook.failed",
        "business_store.tenant.imported",
        "auth.tenant.created",
        "auth.tenant.deleted",
        "business_store.dead_letter",
        "records",
    ] {
        assert!(addresses.contains(&topic), "{topic} is not described");
    }

    // The AsyncAPI Initiative's parser (installed by scripts/test).
    let modules = std::env::var("BSS_TEST_ASYNCAPI_MODULES").unwrap_or_else(|_| {
        panic!("BSS_TEST_ASYNCAPI_MODULES is not set: run the tests with scripts/test")
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/support/validate_asyncapi.js");
    let (ok, out, err) = run_with_stdin("node", &[script, &modules], doc.to_string().as_bytes());
    assert!(ok, "the parser failed: {err}");
    let diagnostics: Vec<Value> = serde_json::from_str(&out).unwrap();
    // The one remark allowed: 3.1 exists (the document is 3.0, as the
    // events contract asks).
    let findings: Vec<&Value> = diagnostics
        .iter()
        .filter(|d| d["code"] != "asyncapi-latest-version")
        .collect();
    assert!(findings.is_empty(), "{findings:#?}");
}

#[tokio::test]
async fn preconditions_answer_the_same_with_validation_hooks_bound() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    app.install_plugin(
        &token,
        json!({"name": "no-negative-totals", "kind": "validation-hook",
               "resources": ["invoices"], "config": {}}),
        "no_negative_totals",
    )
    .await;
    let patch = |path: &str, header: (&'static str, &'static str)| {
        app.request(Method::PATCH, path, Some(&token))
            .header(header.0, header.1)
            .json(&json!({"total": 3}))
    };
    // If-Match: * on a missing record: 412, hooks or not.
    let resp = send(patch("/v1/data/invoices/none", ("if-match", "*"))).await;
    assert_problem(resp, 412).await;

    let path = "/v1/data/invoices/pc-1";
    assert_eq!(
        app.put(path, &token, &json!({"number": "1", "total": 1}))
            .await
            .status(),
        201
    );
    // Tags compare character by character: "01" is not "1".
    assert_problem(send(patch(path, ("if-match", "\"01\""))).await, 412).await;
    // If-None-Match: * on an existing record: 412; ETags there are for reads.
    assert_problem(send(patch(path, ("if-none-match", "*"))).await, 412).await;
    let resp = send(patch(path, ("if-none-match", "\"7\""))).await;
    assert_eq!(resp.status(), 200);
    let resp = send(
        app.request(Method::DELETE, path, Some(&token))
            .header("if-none-match", "*"),
    )
    .await;
    assert_problem(resp, 412).await;
    let resp = send(
        app.request(Method::DELETE, "/v1/data/invoices/none", Some(&token))
            .header("if-none-match", "*"),
    )
    .await;
    assert_eq!(resp.status(), 404);
}
