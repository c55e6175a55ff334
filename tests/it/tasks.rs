//! Durable tasks: what an enricher schedules reaches the Task Execution
//! Service exactly once per task, however long the service is down;
//! parked tasks are visible and retryable; a re-encryption job killed
//! with SIGKILL resumes where it stopped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bss_tests::fake_services::{TaskMode, keyed_task_service};
use bss_tests::*;
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::Connection;

fn scheduler() -> Value {
    json!({"name": "task-scheduler", "kind": "event-enricher",
           "resources": ["invoices"], "services": ["task"],
           "config": {"task": "regenerate-embeddings", "types": ["business_store.data.created"]}})
}

/// Settings for a Task Service that is down: quick retries, short pauses.
fn quick_retries(s: &mut bss::config::Settings, url: &str) {
    s.task_service_url = Some(url.to_owned());
    s.service_attempts = 1;
    s.task_retry_max_secs = 1;
    s.task_poll_ms = 100;
    s.breaker_open_secs = 1;
}

async fn tasks_of(app: &TestApp, token: &str, query: &str) -> Vec<Value> {
    let resp = app.get(&format!("/v1/tasks{query}"), token).await;
    assert_eq!(resp.status(), 200);
    body(resp).await["items"].as_array().unwrap().clone()
}

/// Waits (up to 30 s) until `check` holds for the tenant's tasks.
async fn wait_tasks(
    app: &TestApp,
    token: &str,
    what: &str,
    check: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let tasks = tasks_of(app, token, "").await;
        if check(&tasks) {
            return tasks;
        }
        assert!(Instant::now() < deadline, "{what}: {tasks:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_task_service_down_for_a_while_gets_every_task_exactly_once_by_its_key() {
    let service = keyed_task_service(TaskMode::Down).await;
    let app = TestApp::spawn_with(|s| quick_retries(s, &service.url)).await;
    let (_, token) = app.tenant_with_invoices().await;
    app.install_plugin(&token, scheduler(), "task_scheduler")
        .await;
    // A second tenant, without plugins, writes meanwhile.
    let (_, calm) = app.tenant_with_invoices().await;
    for n in 0..5 {
        let doc = json!({"number": n.to_string(), "total": 1});
        assert_eq!(
            app.post("/v1/data/invoices", &token, &doc).await.status(),
            201
        );
    }
    // Events go on at once, each naming its queued task.
    let events = wait_for_events(&app, &token, 6).await;
    let created: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "business_store.data.created")
        .collect();
    assert_eq!(created.len(), 5);
    let waiting = wait_tasks(&app, &token, "five tasks tried twice", |t| {
        t.len() == 5
            && t.iter().all(|t| {
                t["status"] == "pending"
                    && t["attempts"].as_i64() >= Some(2)
                    && t["lastError"].is_string()
            })
    })
    .await;
    let ids: std::collections::HashSet<String> = waiting
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect();
    for event in &created {
        let task = event["scheduledtask"].as_str().unwrap();
        assert!(ids.contains(task), "{event:#}");
    }
    let start = Instant::now();
    let doc = json!({"number": "calm", "total": 1});
    assert_eq!(
        app.post("/v1/data/invoices", &calm, &doc).await.status(),
        201
    );
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(tasks_of(&app, &calm, "").await, Vec::<Value>::new());

    // Up again, but the first answer to each task is lost: the retry
    // carries the same key, so nothing is scheduled twice.
    service.set(TaskMode::LosesAnswers);
    let done = wait_tasks(&app, &token, "all scheduled", |t| {
        t.iter().all(|t| t["status"] == "scheduled")
    })
    .await;
    let keys = service.keys();
    assert_eq!(keys.len(), 5, "{keys:?}");
    assert_eq!(service.unkeyed.load(std::sync::atomic::Ordering::SeqCst), 0);
    for task in &done {
        let id = task["id"].as_str().unwrap();
        assert!(keys[id] >= 2, "the lost answer was retried: {keys:?}");
        assert_eq!(task["remoteId"], format!("remote-{id}"));
        assert_eq!(task["source"], "plugin:task-scheduler");
        assert_eq!(task["name"], "regenerate-embeddings");
    }
    let metrics = app.metrics_text().await;
    assert!(metrics.contains("tasks_scheduled_total"), "{metrics}");
}

#[tokio::test]
async fn parked_tasks_are_listed_counted_and_retried() {
    let service = keyed_task_service(TaskMode::Down).await;
    let app = TestApp::spawn_with(|s| {
        quick_retries(s, &service.url);
        s.task_max_attempts = 2;
    })
    .await;
    let (_, token) = app.tenant_with_invoices().await;
    app.install_plugin(&token, scheduler(), "task_scheduler")
        .await;
    let (_, other) = app.tenant_with_invoices().await;
    for n in 0..2 {
        let doc = json!({"number": n.to_string(), "total": 1});
        assert_eq!(
            app.post("/v1/data/invoices", &token, &doc).await.status(),
            201
        );
    }
    wait_tasks(&app, &token, "two parked", |t| {
        t.len() == 2 && t.iter().all(|t| t["status"] == "failed")
    })
    .await;
    let failed = tasks_of(&app, &token, "?status=failed").await;
    assert_eq!(failed.len(), 2);
    for task in &failed {
        assert_eq!(task["attempts"], 2);
        assert!(
            task["lastError"]
                .as_str()
                .unwrap()
                .contains("task service unavailable"),
            "{task:#}"
        );
    }
    assert!(tasks_of(&app, &token, "?status=pending").await.is_empty());
    let metrics = app.metrics_text().await;
    assert!(metrics.contains("tasks_parked_total"), "{metrics}");
    let resp = app.get("/v1/tasks?status=lost", &token).await;
    assert_eq!(resp.status(), 400);

    // Another tenant sees and retries nothing of them.
    let first = failed[0]["id"].as_str().unwrap().to_owned();
    let retry = |id: &str, token: &str| {
        app.request(Method::POST, &format!("/v1/tasks/{id}/retry"), Some(token))
            .send()
    };
    assert_eq!(
        app.get(&format!("/v1/tasks/{first}"), &other)
            .await
            .status(),
        404
    );
    assert_eq!(retry(&first, &other).await.unwrap().status(), 404);

    service.set(TaskMode::Up);
    for task in &failed {
        let resp = retry(task["id"].as_str().unwrap(), &token).await.unwrap();
        assert_eq!(resp.status(), 202);
        let back = body(resp).await;
        assert_eq!(back["status"], "pending");
        assert_eq!(back["attempts"], 0);
    }
    let done = wait_tasks(&app, &token, "retried and scheduled", |t| {
        t.iter().all(|t| t["status"] == "scheduled")
    })
    .await;
    assert_eq!(done.len(), 2);
    assert_eq!(service.keys().len(), 2);
    // Only a parked task is retried.
    let resp = retry(&first, &token).await.unwrap();
    assert_eq!(resp.status(), 409);
}

#[tokio::test]
async fn a_tenant_at_its_task_cap_waits_while_another_tenants_tasks_go_on() {
    let service = keyed_task_service(TaskMode::Down).await;
    let app = TestApp::spawn_with(|s| {
        quick_retries(s, &service.url);
        s.task_max_pending_per_tenant = 2;
    })
    .await;
    let (_, greedy) = app.tenant_with_invoices().await;
    let (_, calm) = app.tenant_with_invoices().await;
    for token in [&greedy, &calm] {
        app.install_plugin(token, scheduler(), "task_scheduler")
            .await;
    }
    for n in 0..4 {
        let doc = json!({"number": n.to_string(), "total": 1});
        assert_eq!(
            app.post("/v1/data/invoices", &greedy, &doc).await.status(),
            201
        );
    }
    wait_tasks(&app, &greedy, "two queued", |t| t.len() == 2).await;
    // The calm tenant's task is queued and its event goes out, while the
    // greedy tenant's two further events wait for room in its queue.
    let doc = json!({"number": "calm", "total": 1});
    assert_eq!(
        app.post("/v1/data/invoices", &calm, &doc).await.status(),
        201
    );
    let events = wait_for_events(&app, &calm, 2).await;
    let created = events
        .iter()
        .find(|e| e["type"] == "business_store.data.created")
        .unwrap();
    let calm_tasks = wait_tasks(&app, &calm, "one queued", |t| t.len() == 1).await;
    assert_eq!(created["scheduledtask"], calm_tasks[0]["id"]);
    assert_eq!(tasks_of(&app, &greedy, "").await.len(), 2, "capped at two");

    service.set(TaskMode::Up);
    wait_tasks(
        &app,
        &greedy,
        "all four scheduled once room was made",
        |t| t.len() == 4 && t.iter().all(|t| t["status"] == "scheduled"),
    )
    .await;
    assert_eq!(service.keys().len(), 5);
}

#[tokio::test]
async fn finished_tasks_are_deleted_after_their_retention() {
    // No Task Service: the built-in stand-in accepts every task.
    let app = TestApp::spawn_with(|s| {
        s.task_poll_ms = 100;
        s.task_retention_secs = 1;
    })
    .await;
    let (_, token) = app.tenant_with_invoices().await;
    app.install_plugin(&token, scheduler(), "task_scheduler")
        .await;
    let doc = json!({"number": "1", "total": 1});
    assert_eq!(
        app.post("/v1/data/invoices", &token, &doc).await.status(),
        201
    );
    let seen = wait_tasks(&app, &token, "scheduled by the stand-in", |t| {
        t.len() == 1 && t[0]["status"] == "scheduled"
    })
    .await;
    assert!(seen[0]["remoteId"].as_str().unwrap().starts_with("local-"));
    wait_tasks(&app, &token, "deleted", <[Value]>::is_empty).await;
}

fn start(port: u16, database_url: &str, data: &std::path::Path) -> Child {
    Command::new(bss_tests::bss_binary())
        .arg("serve")
        .env("DATABASE_URL", database_url)
        .env("BSS_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("BSS_JWT_SECRET", SECRET)
        .env("BSS_DATA_DIR", data)
        .env("BSS_RESEAL_BATCH", "10")
        .env("BSS_RESEAL_PAUSE_MS", "100")
        .env("BSS_TASK_LEASE_SECS", "2")
        .env("BSS_TASK_POLL_MS", "200")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_encryption_job_killed_mid_way_resumes_where_it_stopped() {
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let (settings, _scratch) = test_settings();
    let database_url = settings.database_url.unwrap();
    let data = TempDir::new("bss-reseal");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut child = start(port, &database_url, &data.0);
    wait_ready(&client, &base).await;

    let tenant = format!("reseal-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let token = token(&tenant, &["admin"]);
    let send = |method: Method, path: &str, body: Option<Value>| {
        let mut req = client
            .request(method, format!("{base}{path}"))
            .bearer_auth(&token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send()
    };
    let r = client
        .post(format!("{base}/v1/tenants"))
        .bearer_auth(platform_token())
        .json(&json!({"id": tenant}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let schema = json!({"schema": {"type": "object", "properties": {
        "name": {"type": "string"}, "ssn": {"type": "string", "x-encrypted": true}}}});
    let r = send(Method::PUT, "/v1/schemas/people", Some(schema)).await;
    assert_eq!(r.unwrap().status(), 201);
    let items: Vec<Value> = (0..300)
        .map(|i| json!({"name": format!("p{i}"), "ssn": format!("ssn-{i}")}))
        .collect();
    let r = send(
        Method::POST,
        "/v1/data/people/batch",
        Some(json!({"items": items})),
    )
    .await;
    assert_eq!(r.unwrap().status(), 201);

    let r = send(Method::POST, "/v1/encryption/rotate", None)
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let rotation: Value = r.json().await.unwrap();
    assert_eq!(rotation["keyId"], "local-2");
    let task = format!("/v1/tasks/{}", rotation["taskId"].as_str().unwrap());
    let job = |client: reqwest::Client| {
        let (url, token) = (format!("{base}{task}"), token.clone());
        async move {
            let r = client.get(url).bearer_auth(token).send().await.unwrap();
            r.json::<Value>().await.unwrap()
        }
    };
    // Killed once some batches are done.
    let deadline = Instant::now() + Duration::from_secs(30);
    let before = loop {
        let j = job(client.clone()).await;
        if j["progress"]["scanned"].as_u64().unwrap_or(0) >= 30 {
            break j;
        }
        assert!(Instant::now() < deadline, "the job did not start: {j:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let mut db = sqlx::PgConnection::connect(&database_url).await.unwrap();
    let schema = format!("t_{}", tenant.replace('-', "_"));
    let count_old =
        format!("SELECT count(*) FROM \"{schema}\".people WHERE data->'ssn'->>'kid' = 'local-1'");
    let old: i64 = sqlx::query_scalar(&count_old)
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert!(
        old > 0 && old < 300,
        "killed mid-way: {old} left, {before:#}"
    );

    child = start(port, &database_url, &data.0);
    wait_ready(&client, &base).await;
    // Reads work at once, old and new keys mixed.
    let r = send(Method::GET, "/v1/data/people?limit=1000", None)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let page: Value = r.json().await.unwrap();
    let names: Vec<&Value> = page["items"].as_array().unwrap().iter().collect();
    assert_eq!(names.len(), 300);
    assert!(names.iter().all(|i| {
        i["data"]["ssn"]
            .as_str()
            .is_some_and(|s| s.starts_with("ssn-"))
    }));
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = loop {
        let j = job(client.clone()).await;
        if j["status"] == "done" {
            break j;
        }
        assert!(Instant::now() < deadline, "the job did not resume: {j:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Resumed after the last committed batch: every record scanned once.
    assert_eq!(done["progress"]["scanned"], 300, "{done:#}");
    assert_eq!(done["progress"]["moved"], 300, "{done:#}");
    assert_eq!(done["attempts"], 2, "taken again after the kill: {done:#}");
    let old: i64 = sqlx::query_scalar(&count_old)
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(old, 0);
    let plain: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{schema}\".people WHERE data->>'ssn' LIKE 'ssn-%'"
    ))
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!(plain, 0);
    child.kill().unwrap();
    child.wait().unwrap();
}
