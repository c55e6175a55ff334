//! Hostile plugins, through the real upload and write path: each ends in a
//! typed error naming the limit, nothing is stored for the refused write,
//! other tenants are served throughout, and no secret crosses tenants.

use bss_tests::fake_services::hanging_service;
use bss_tests::*;
use serde_json::{Value, json};

fn hostile(mode: &str, extra: Value) -> Value {
    let mut m = json!({"name": "hostile", "kind": "validation-hook", "resources": ["invoices"],
                       "config": {"mode": mode}});
    if let (Some(m), Some(extra)) = (m.as_object_mut(), extra.as_object()) {
        m.extend(extra.clone());
    }
    m
}

/// Installs the hostile hook in `mode` for a new tenant and writes once:
/// the write's status and problem, and the records stored afterwards.
async fn attack(app: &TestApp, manifest: Value) -> (u16, Value, u64) {
    let (_, token) = app.tenant_with_invoices().await;
    app.install_plugin(&token, manifest, "hostile").await;
    let resp = app
        .post(
            "/v1/data/invoices",
            &token,
            &json!({"number": "A", "total": 1}),
        )
        .await;
    let status = resp.status().as_u16();
    let problem = body(resp).await;
    let stored = body(app.get("/v1/data/invoices?count=exact", &token).await).await["total"]
        .as_u64()
        .unwrap();
    (status, problem, stored)
}

/// One invoice write by `token`: its status and answer.
async fn write_invoice(app: &TestApp, token: &str) -> (u16, Value) {
    let resp = app
        .post(
            "/v1/data/invoices",
            token,
            &json!({"number": "A", "total": 1}),
        )
        .await;
    (resp.status().as_u16(), body(resp).await)
}

fn assert_limit(problem: &Value, code: &str, words: &str) {
    assert_eq!(
        problem["type"], "https://business-store.dev/problems/plugin-failed",
        "{problem:#}"
    );
    let error = &problem["errors"][0];
    assert_eq!(error["source"], "plugin:hostile");
    assert_eq!(error["code"], code, "{problem:#}");
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("plugin hostile"), "{detail}");
    assert!(detail.contains(words), "{detail} should mention {words}");
    assert!(detail.contains("nothing was stored"), "{detail}");
}

#[tokio::test]
async fn each_hostile_plugin_ends_in_an_error_naming_the_limit() {
    let hang = hanging_service().await;
    let app = TestApp::spawn_with(|s| s.task_service_url = Some(hang.clone())).await;
    let cases = [
        (hostile("loop", json!({})), "deadline", "deadline of 50 ms"),
        (
            hostile("loop", json!({"limits": {"fuel": 1000000}})),
            "fuel",
            "fuel budget of 1000000",
        ),
        (
            hostile("memory", json!({"limits": {"memoryMib": 8}})),
            "memory",
            "memory limit of 8 MiB",
        ),
        (hostile("recursion", json!({})), "stack", "stack"),
        (
            hostile("huge", json!({})),
            "output",
            "output limit of 1048576 bytes",
        ),
        (hostile("trap", json!({})), "trap", "trapped"),
        (
            hostile(
                "hang-forward",
                json!({"services": ["task"], "limits": {"deadlineMs": 100}}),
            ),
            "deadline",
            "deadline of 100 ms",
        ),
    ];
    for (manifest, code, words) in cases {
        let (status, problem, stored) = attack(&app, manifest).await;
        assert_eq!(status, 422, "{code}: {problem:#}");
        assert_limit(&problem, code, words);
        assert_eq!(stored, 0, "{code}: nothing stored");
    }
}

#[tokio::test]
async fn other_tenants_are_served_while_a_plugin_spins() {
    let app = TestApp::spawn().await;
    let (_, spinner) = app.tenant_with_invoices().await;
    app.install_plugin(
        &spinner,
        hostile("loop", json!({"limits": {"deadlineMs": 1000}})),
        "hostile",
    )
    .await;
    let (_, calm) = app.tenant_with_invoices().await;
    let spins: Vec<_> = (0..4)
        .map(|i| {
            let req = app
                .request(reqwest::Method::POST, "/v1/data/invoices", Some(&spinner))
                .json(&json!({"number": i.to_string(), "total": 1}));
            tokio::spawn(async move { send(req).await.status().as_u16() })
        })
        .collect();
    // While four writes spin for a second each, the other tenant writes and reads.
    for i in 0..20 {
        let resp = app
            .post(
                "/v1/data/invoices",
                &calm,
                &json!({"number": i.to_string(), "total": 1}),
            )
            .await;
        assert_eq!(resp.status(), 201);
    }
    assert_eq!(app.get("/health/ready", &calm).await.status(), 200);
    for s in spins {
        assert_eq!(s.await.unwrap(), 422);
    }
}

#[tokio::test]
async fn a_plugin_failing_repeatedly_is_tripped_and_reported() {
    let app = TestApp::spawn_with(|s| s.plugin_breaker_threshold = 3).await;
    let (_, token) = app.tenant_with_invoices().await;
    app.install_plugin(&token, hostile("trap", json!({})), "hostile")
        .await;
    for _ in 0..3 {
        let resp = app
            .post(
                "/v1/data/invoices",
                &token,
                &json!({"number": "A", "total": 1}),
            )
            .await;
        assert_eq!(resp.status(), 422);
    }
    let resp = app
        .post(
            "/v1/data/invoices",
            &token,
            &json!({"number": "A", "total": 1}),
        )
        .await;
    assert_eq!(resp.status(), 503, "tripped");
    assert!(resp.headers().contains_key("retry-after"));
    // The 503 names the plugin, its version and what tripped it.
    let detail = body(resp).await["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("plugin hostile version 1"), "{detail}");
    assert!(detail.contains("tripped"), "{detail}");
    assert!(
        detail.contains("its last failure") && detail.contains("traps on purpose"),
        "{detail}"
    );
    let plugin = body(app.get("/v1/plugins/hostile", &token).await).await;
    assert_eq!(plugin["stats"]["breaker"], "open");
    assert_eq!(plugin["stats"]["failuresByKind"]["trap"], 3);
    assert_eq!(plugin["stats"]["lastError"]["kind"], "tripped");
    assert_eq!(
        body(app.get("/v1/data/invoices?count=exact", &token).await).await["total"],
        0
    );
}

#[tokio::test]
async fn a_secret_in_one_tenants_plugin_never_reaches_another() {
    let app = TestApp::spawn().await;
    let secret = format!("S3CR3T-{}", uuid::Uuid::new_v4().simple());
    let needle: String = secret.chars().rev().collect();
    let (_, owner) = app.tenant_with_invoices().await;
    app.install_plugin(
        &owner,
        hostile(
            "write-secret",
            json!({"config": {"mode": "write-secret", "secret": secret}}),
        ),
        "hostile",
    )
    .await;
    // The scanner works: it finds the secret when it put it there itself.
    // (Reading all of memory byte by byte needs more than 50 ms under load.)
    let (_, control) = app.tenant_with_invoices().await;
    app.install_plugin(
        &control,
        hostile(
            "scan-self",
            json!({"config": {"mode": "scan-self", "needle": needle}, "limits": {"deadlineMs": 1000}}),
        ),
        "hostile",
    )
    .await;
    let resp = app
        .post(
            "/v1/data/invoices",
            &control,
            &json!({"number": "A", "total": 1}),
        )
        .await;
    assert_eq!(resp.status(), 422);
    assert_eq!(body(resp).await["errors"][0]["code"], "found");

    let (_, snoop) = app.tenant_with_invoices().await;
    app.install_plugin(
        &snoop,
        hostile(
            "scan",
            json!({"config": {"mode": "scan", "needle": needle}, "limits": {"deadlineMs": 1000}}),
        ),
        "hostile",
    )
    .await;
    for i in 0..40 {
        let n = json!({"number": i.to_string(), "total": 1});
        assert_eq!(
            app.post("/v1/data/invoices", &owner, &n).await.status(),
            201
        );
        let resp = app.post("/v1/data/invoices", &snoop, &n).await;
        assert_eq!(resp.status(), 201, "round {i}: {:#}", body(resp).await);
    }
}

#[tokio::test]
async fn a_plugin_that_sleeps_is_stopped_at_its_deadline() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    let manifest = json!({"name": "hostile", "kind": "validation-hook", "resources": ["*"]});
    app.install_plugin(&token, manifest, "sleeper").await;
    let resp = app
        .post(
            "/v1/data/invoices",
            &token,
            &json!({"number": "A", "total": 1}),
        )
        .await;
    assert_eq!(resp.status(), 422);
    assert_limit(&body(resp).await, "deadline", "deadline of 50 ms");
}

#[tokio::test]
async fn a_panicking_plugin_says_why_and_where_in_the_problem_and_its_stats() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    app.install_plugin(&token, hostile("trap", json!({})), "hostile")
        .await;
    let (status, problem) = write_invoice(&app, &token).await;
    assert_eq!(status, 422);
    assert_limit(&problem, "trap", "trapped");
    // The guest's stderr: the panic's message and its place in the source.
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("the hostile plugin traps on purpose") && detail.contains("src/lib.rs:"),
        "{detail}"
    );
    let plugin = body(app.get("/v1/plugins/hostile", &token).await).await;
    let last = plugin["stats"]["lastError"]["message"].as_str().unwrap();
    assert!(
        last.contains("the hostile plugin traps on purpose"),
        "{plugin:#}"
    );
}

#[tokio::test]
async fn a_tripped_second_version_names_the_rollback() {
    let app = TestApp::spawn_with(|s| s.plugin_breaker_threshold = 2).await;
    let (_, token) = app.tenant_with_invoices().await;
    for _ in 0..2 {
        app.install_plugin(&token, hostile("trap", json!({})), "hostile")
            .await;
    }
    for _ in 0..2 {
        assert_eq!(write_invoice(&app, &token).await.0, 422);
    }
    let (status, problem) = write_invoice(&app, &token).await;
    assert_eq!(status, 503);
    let detail = problem["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("plugin hostile version 2"), "{detail}");
    assert!(
        detail.contains(r#"PUT /v1/plugins/hostile/active {"version": 1}"#),
        "{detail}"
    );
}

#[tokio::test]
async fn a_plugin_flooding_stderr_is_cut_at_the_bound_while_another_tenant_writes() {
    let app = TestApp::spawn().await;
    let (_, flooder) = app.tenant_with_invoices().await;
    app.install_plugin(&flooder, hostile("stderr-flood", json!({})), "hostile")
        .await;
    let (_, calm) = app.tenant_with_invoices().await;
    let floods: Vec<_> = (0..4)
        .map(|_| {
            let req = app
                .request(reqwest::Method::POST, "/v1/data/invoices", Some(&flooder))
                .json(&json!({"number": "F", "total": 1}));
            tokio::spawn(async move { body(send(req).await).await })
        })
        .collect();
    // The other tenant is served throughout.
    for _ in 0..10 {
        assert_eq!(write_invoice(&app, &calm).await.0, 201);
    }
    for flood in floods {
        let problem = flood.await.unwrap();
        assert_limit(&problem, "trap", "trapped");
        // 16 MiB were written; what reaches the answer is the first 4 kB.
        let detail = problem["detail"].as_str().unwrap();
        assert!(
            detail.contains("the plugin wrote to stderr: xxx"),
            "{detail}"
        );
        assert!(detail.len() < 6 * 1024, "{} bytes of detail", detail.len());
    }
}
