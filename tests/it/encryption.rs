//! `x-encrypted` fields: stored sealed at any depth, opened for readers,
//! never in events, idempotency replays, filters or indexes; keys from the
//! built-in keyring or the Auth Service, failing closed without one.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Json;
use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bss_tests::{TestApp, body, claims, wait_for_events};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::Method;
use serde_json::{Value, json};

const SSN: &str = "123-45-6789";
const PAN: &str = "4111111111111111";

fn people_schema() -> Value {
    json!({
        "type": "object",
        "x-event-payload": "full",
        "required": ["name"],
        "properties": {
            "name": {"type": "string"},
            "ssn": {"type": "string", "pattern": "^\\d{3}-\\d{2}-\\d{4}$", "x-encrypted": true},
            "card": {"type": "object", "properties": {
                "brand": {"type": "string"},
                "pan": {"type": "string", "x-encrypted": true}
            }}
        }
    })
}

fn person(name: &str) -> Value {
    json!({"name": name, "ssn": SSN, "card": {"brand": "visa", "pan": PAN}})
}

/// A tenant with the `people` resource; returns id and admin token.
async fn tenant_with_people(app: &TestApp) -> (String, String) {
    let (id, token) = app.tenant().await;
    let resp = app.put_schema("people", &token, people_schema()).await;
    assert_eq!(resp.status(), 201, "{}", body(resp).await);
    (id, token)
}

/// The stored `data` of every `people` row, as PostgreSQL holds it.
async fn stored_rows(app: &TestApp, tenant: &str) -> Vec<(String, Value)> {
    let mut db = app.db().await;
    let schema = tenant.replace('-', "_");
    sqlx::query_as(&format!(
        "SELECT id, data FROM \"t_{schema}\".people ORDER BY created_at"
    ))
    .fetch_all(&mut db)
    .await
    .unwrap()
}

fn assert_sealed(data: &Value) {
    let text = data.to_string();
    assert!(
        !text.contains(SSN) && !text.contains(PAN),
        "plaintext stored: {text}"
    );
    assert_eq!(data["ssn"]["$enc"], 1, "{text}");
    assert_eq!(data["card"]["pan"]["$enc"], 1, "{text}");
    assert_eq!(data["card"]["brand"], "visa", "{text}");
}

fn assert_plain(data: &Value) {
    assert_eq!(data["ssn"], SSN, "{data}");
    assert_eq!(data["card"]["pan"], PAN, "{data}");
}

#[tokio::test]
async fn encrypted_fields_are_stored_sealed_and_read_back_in_clear() {
    let app = TestApp::spawn().await;
    let (tenant, token) = tenant_with_people(&app).await;

    let resp = app.post("/v1/data/people", &token, &person("ada")).await;
    assert_eq!(resp.status(), 201);
    let created = body(resp).await;
    assert_plain(&created["data"]);
    let id = created["id"].as_str().unwrap().to_owned();

    let got = body(app.get(&format!("/v1/data/people/{id}"), &token).await).await;
    assert_plain(&got["data"]);
    let list = body(app.get("/v1/data/people", &token).await).await;
    assert_plain(&list["items"][0]["data"]);
    let projected = body(
        app.get("/v1/data/people?select=id,data.ssn,data.card.pan", &token)
            .await,
    )
    .await;
    assert_plain(&projected["items"][0]["data"]);

    let patched = app
        .patch(
            &format!("/v1/data/people/{id}"),
            &token,
            &json!({"name": "ada l."}),
        )
        .await;
    assert_eq!(patched.status(), 200);
    let patched = body(patched).await;
    assert_plain(&patched["data"]);
    assert_eq!(patched["data"]["name"], "ada l.");

    let put = app
        .put(&format!("/v1/data/people/{id}"), &token, &person("ada"))
        .await;
    assert_eq!(put.status(), 200);
    assert_plain(&body(put).await["data"]);

    let batch = app
        .post(
            "/v1/data/people/batch",
            &token,
            &json!({"items": [person("bob"), person("cy")]}),
        )
        .await;
    assert_eq!(batch.status(), 201);
    let batch = body(batch).await;
    for item in batch["items"].as_array().unwrap() {
        assert_plain(&item["data"]);
    }

    let rows = stored_rows(&app, &tenant).await;
    assert_eq!(rows.len(), 3);
    for (_, data) in &rows {
        assert_sealed(data);
        assert!(data["ssn"]["kid"].as_str().unwrap().starts_with("local-"));
    }
    // Two writes of one value never look alike.
    assert_ne!(rows[1].1["ssn"]["c"], rows[2].1["ssn"]["c"]);

    // A later schema version still accepts the stored (sealed) records.
    let mut v2 = people_schema();
    v2["properties"]["note"] = json!({"type": "string"});
    assert_eq!(app.put_schema("people", &token, v2).await.status(), 201);
    let got = body(app.get(&format!("/v1/data/people/{id}"), &token).await).await;
    assert_plain(&got["data"]);
}

#[tokio::test]
async fn validation_sees_the_plaintext() {
    let app = TestApp::spawn().await;
    let (tenant, token) = tenant_with_people(&app).await;
    let mut bad = person("eve");
    bad["ssn"] = json!("not-an-ssn");
    let resp = app.post("/v1/data/people", &token, &bad).await;
    assert_eq!(resp.status(), 422);
    let problem = body(resp).await;
    assert_eq!(problem["errors"][0]["path"], "/ssn", "{problem:#}");
    assert!(
        !problem.to_string().contains("not-an-ssn"),
        "the value is not quoted: {problem:#}"
    );
    assert!(stored_rows(&app, &tenant).await.is_empty());
}

#[tokio::test]
async fn x_encrypted_where_it_would_not_be_sealed_is_refused() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant().await;
    let cases = [
        (
            json!({"type": "object", "properties": {"ssn": {"$ref": "#/$defs/secret"}},
                   "$defs": {"secret": {"type": "string", "x-encrypted": true}}}),
            "/schema/$defs/secret/x-encrypted",
        ),
        (
            json!({"type": "object", "properties": {"tags": {"type": "array",
                   "items": {"type": "string", "x-encrypted": true}}}}),
            "/schema/properties/tags/items/x-encrypted",
        ),
        (
            json!({"type": "object", "properties": {"ssn": {"type": "string", "x-encrypted": "true"}}}),
            "/schema/properties/ssn/x-encrypted",
        ),
    ];
    for (schema, at) in cases {
        let resp = app.put_schema("vault", &token, schema).await;
        assert_eq!(resp.status(), 422);
        assert_eq!(body(resp).await["errors"][0]["path"], at);
    }
}

#[tokio::test]
async fn a_writer_cannot_plant_a_sealed_lookalike() {
    let app = TestApp::spawn().await;
    let (tenant, token) = tenant_with_people(&app).await;
    let mut doc = person("mallory");
    doc["note"] = json!({"$enc": 1, "kid": "x", "n": "", "c": ""});
    let resp = app.post("/v1/data/people", &token, &doc).await;
    assert_eq!(resp.status(), 422);
    let batch = json!({"items": [person("ok"), doc]});
    let resp = app.post("/v1/data/people/batch", &token, &batch).await;
    assert_eq!(resp.status(), 422);
    assert_eq!(body(resp).await["errors"][0]["path"], "/items/1");
    assert!(stored_rows(&app, &tenant).await.is_empty());
}

#[tokio::test]
async fn a_ciphertext_moved_to_another_record_or_field_does_not_open() {
    let app = TestApp::spawn().await;
    let (tenant, token) = tenant_with_people(&app).await;
    let a = body(app.post("/v1/data/people", &token, &person("a")).await).await;
    let b = body(app.post("/v1/data/people", &token, &person("b")).await).await;
    let (a, b) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    let schema = format!("\"t_{}\"", tenant.replace('-', "_"));
    let mut db = app.db().await;
    // b's ssn becomes a's sealed ssn: same tenant, resource and key.
    sqlx::query(&format!(
        "UPDATE {schema}.people SET data = jsonb_set(data, '{{ssn}}',
            (SELECT data->'ssn' FROM {schema}.people WHERE id = $1)) WHERE id = $2"
    ))
    .bind(a)
    .bind(b)
    .execute(&mut db)
    .await
    .unwrap();
    // a's sealed card number moved to its ssn field.
    sqlx::query(&format!(
        "UPDATE {schema}.people SET data = jsonb_set(data, '{{ssn}}', data #> '{{card,pan}}') WHERE id = $1"
    ))
    .bind(a)
    .execute(&mut db)
    .await
    .unwrap();
    for id in [a, b] {
        let resp = app.get(&format!("/v1/data/people/{id}"), &token).await;
        assert_eq!(resp.status(), 409);
        let problem = body(resp).await;
        let detail = problem["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("/ssn cannot be decrypted"), "{problem:#}");
        assert!(!problem.to_string().contains(SSN));
    }
    assert_eq!(app.get("/v1/data/people", &token).await.status(), 409);
}

/// Whether `v` holds a key named `name` at any depth.
fn has_key(v: &Value, name: &str) -> bool {
    match v {
        Value::Object(m) => m.contains_key(name) || m.values().any(|c| has_key(c, name)),
        Value::Array(items) => items.iter().any(|c| has_key(c, name)),
        _ => false,
    }
}

#[tokio::test]
async fn events_carry_no_encrypted_field_at_any_depth() {
    let app = TestApp::spawn().await;
    let (_, token) = tenant_with_people(&app).await;
    let created = body(app.post("/v1/data/people", &token, &person("ada")).await).await;
    let id = created["id"].as_str().unwrap();
    let resp = app
        .patch(
            &format!("/v1/data/people/{id}"),
            &token,
            &json!({"card": {"brand": "amex"}}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let log = wait_for_events(&app, &token, 3).await;
    let data_events: Vec<&Value> = log
        .iter()
        .filter(|e| e["type"].as_str().unwrap_or_default().contains(".data."))
        .collect();
    assert_eq!(data_events.len(), 2, "{log:#?}");
    for event in data_events {
        let record = &event["data"]["data"];
        assert_eq!(record["name"], "ada", "{event:#}");
        assert!(record["card"]["brand"].is_string(), "{event:#}");
        assert!(
            !has_key(record, "ssn") && !has_key(record, "pan"),
            "{event:#}"
        );
        assert!(!has_key(event, "$enc"), "{event:#}");
        let text = event.to_string();
        assert!(!text.contains(SSN) && !text.contains(PAN), "{text}");
    }
}

#[tokio::test]
async fn an_idempotent_replay_answers_plaintext_and_stores_none() {
    let app = TestApp::spawn().await;
    let (tenant, token) = tenant_with_people(&app).await;
    let create = || {
        app.request(Method::POST, "/v1/data/people", Some(&token))
            .header("idempotency-key", "k-1")
            .json(&person("ada"))
            .send()
    };
    let first = create().await.unwrap();
    assert_eq!(first.status(), 201);
    let first = body(first).await;
    let again = create().await.unwrap();
    assert_eq!(again.status(), 201);
    assert_eq!(
        again
            .headers()
            .get("idempotent-replayed")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );
    let again = body(again).await;
    assert_plain(&again["data"]);
    assert_eq!(again["id"], first["id"]);
    let mut db = app.db().await;
    let (response,): (Value,) = sqlx::query_as(&format!(
        "SELECT response FROM \"t_{}\"._idempotency WHERE key = 'k-1'",
        tenant.replace('-', "_")
    ))
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_sealed(&response["data"]);
}

#[tokio::test]
async fn encrypted_fields_cannot_be_filtered_sorted_or_indexed() {
    let app = TestApp::spawn().await;
    let (_, token) = tenant_with_people(&app).await;
    for query in [
        "card.pan=eq.4111111111111111",
        "data.card.pan=is.null",
        "ssn=like.123*",
        "order=ssn.desc",
        "order=card.pan",
    ] {
        let resp = app.get(&format!("/v1/data/people?{query}"), &token).await;
        assert_eq!(resp.status(), 400, "{query}");
        let problem = body(resp).await;
        assert!(
            problem["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("encrypted"),
            "{problem:#}"
        );
    }
    // Inside an encrypted object too.
    let mut schema = people_schema();
    schema["properties"]["secret"] = json!({"type": "object", "x-encrypted": true,
        "properties": {"pin": {"type": "string"}}});
    assert_eq!(
        app.put_schema("people", &token, schema.clone())
            .await
            .status(),
        201
    );
    let resp = app.get("/v1/data/people?secret.pin=eq.1", &token).await;
    assert_eq!(resp.status(), 400);

    schema["properties"]["card"]["properties"]["pan"]["x-index"] = json!(true);
    let resp = app.put_schema("people", &token, schema).await;
    assert_eq!(resp.status(), 422);
    let problem = body(resp).await;
    assert!(problem.to_string().contains("x-index"), "{problem:#}");
}

const AUTH_KEY_ID: &str = "auth-k7";

/// A fake Auth Service: its URL, how many key requests it had, and the id
/// of the key it calls current (change it to rotate).
struct KeyService {
    url: String,
    calls: Arc<AtomicUsize>,
    current: Arc<std::sync::Mutex<String>>,
}

/// An Auth Service serving the test JWKS and data-encryption keys (`auth-k<digit>`,
/// any of them by `?keyId=`); for tenants whose id starts with `down-` the
/// key endpoint fails (503).
async fn auth_with_keys() -> KeyService {
    let jwks: Value = serde_json::from_str(include_str!("../fixtures/jwks.json")).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let current = Arc::new(std::sync::Mutex::new(AUTH_KEY_ID.to_owned()));
    let (counter, now) = (calls.clone(), current.clone());
    let router = Router::new()
        .route(
            "/.well-known/jwks.json",
            get(move || async move { Json(jwks) }),
        )
        .route(
            "/api/auth/tenants/{id}/keys/data-encryption-key",
            get(
                move |axum::extract::Path(id): axum::extract::Path<String>,
                      axum::extract::Query(q): axum::extract::Query<
                    std::collections::HashMap<String, String>,
                >| async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    if id.starts_with("down-") {
                        return StatusCode::SERVICE_UNAVAILABLE.into_response();
                    }
                    let kid = match q.get("keyId") {
                        Some(kid) => kid.clone(),
                        None => now.lock().unwrap().clone(),
                    };
                    let Some(digit) = kid.strip_prefix("auth-k").and_then(|d| d.bytes().next())
                    else {
                        return StatusCode::NOT_FOUND.into_response();
                    };
                    let key = STANDARD.encode([digit ^ id.len() as u8; 32]);
                    Json(json!({"keyId": kid, "key": key, "expiresAt": "2999-01-01T00:00:00Z"}))
                        .into_response()
                },
            ),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    KeyService {
        url,
        calls,
        current,
    }
}

fn es256(claims: &bss::auth::Claims) -> String {
    let key =
        EncodingKey::from_ec_pem(include_bytes!("../fixtures/jwt-es256-private.pem")).unwrap();
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("test-key-1".into());
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

#[tokio::test]
async fn keys_come_from_the_auth_service_and_writes_fail_closed_without_them() {
    let keys = auth_with_keys().await;
    let app = TestApp::spawn_with(|s| s.auth_service_url = Some(keys.url.clone())).await;
    let key_calls = keys.calls.clone();
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let (up_tenant, down_tenant) = (format!("up-{suffix}"), format!("down-{suffix}"));
    let up = auth_tenant(&app, &up_tenant).await;
    let down = auth_tenant(&app, &down_tenant).await;
    let created = app.post("/v1/data/people", &up, &person("ada")).await;
    assert_eq!(created.status(), 201);
    assert_plain(&body(created).await["data"]);
    let rows = stored_rows(&app, &up_tenant).await;
    assert_sealed(&rows[0].1);
    assert_eq!(rows[0].1["ssn"]["kid"], AUTH_KEY_ID);
    // Cached: more writes and reads do not ask again.
    let asked = key_calls.load(Ordering::SeqCst);
    assert_eq!(
        app.post("/v1/data/people", &up, &person("bo"))
            .await
            .status(),
        201
    );
    assert_eq!(app.get("/v1/data/people", &up).await.status(), 200);
    assert_eq!(key_calls.load(Ordering::SeqCst), asked);

    let resp = app.post("/v1/data/people", &down, &person("ada")).await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().get("retry-after").is_some());
    let problem = body(resp).await;
    assert!(!problem.to_string().contains(SSN), "{problem:#}");
    let resp = app
        .post(
            "/v1/data/people/batch",
            &down,
            &json!({"items": [person("x")]}),
        )
        .await;
    assert_eq!(resp.status(), 503);
    assert!(stored_rows(&app, &down_tenant).await.is_empty());
    // A resource without encrypted fields needs no key.
    let plain = json!({"type": "object", "properties": {"n": {"type": "string"}}});
    assert_eq!(app.put_schema("notes", &down, plain).await.status(), 201);
    assert_eq!(
        app.post("/v1/data/notes", &down, &json!({"n": "x"}))
            .await
            .status(),
        201
    );
}

/// A tenant under an Auth Service with the `people` resource; its admin token.
async fn auth_tenant(app: &TestApp, tenant: &str) -> String {
    let platform = es256(&claims(None, &["platform-admin"]));
    let resp = app
        .post("/v1/tenants", &platform, &json!({"id": tenant}))
        .await;
    assert_eq!(resp.status(), 201);
    let admin = es256(&claims(Some(tenant), &["admin"]));
    let resp = app.put_schema("people", &admin, people_schema()).await;
    assert_eq!(resp.status(), 201);
    admin
}

#[tokio::test]
async fn a_rotated_key_seals_new_writes_and_old_values_still_open() {
    let keys = auth_with_keys().await;
    let app = TestApp::spawn_with(|s| {
        s.auth_service_url = Some(keys.url.clone());
        s.key_cache_secs = 0;
    })
    .await;
    let tenant = format!("rot-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let admin = auth_tenant(&app, &tenant).await;
    let old = body(app.post("/v1/data/people", &admin, &person("old")).await).await;
    *keys.current.lock().unwrap() = "auth-k8".into();
    let new = body(app.post("/v1/data/people", &admin, &person("new")).await).await;
    let rows = stored_rows(&app, &tenant).await;
    assert_eq!(rows[1].1["ssn"]["kid"], "auth-k8");
    // The new key id was noticed: the re-encryption job moves the old row.
    let job = wait_for_job(&app, &admin, "done").await;
    assert_eq!(job["source"], "key-rotation");
    assert_eq!(job["idempotencyKey"], "reseal:auth-k8");
    for (_, data) in stored_rows(&app, &tenant).await {
        assert_sealed(&data);
        assert_eq!(data["ssn"]["kid"], "auth-k8", "{data}");
        assert_eq!(data["card"]["pan"]["kid"], "auth-k8", "{data}");
    }
    for record in [old, new] {
        let id = record["id"].as_str().unwrap();
        let got = app.get(&format!("/v1/data/people/{id}"), &admin).await;
        assert_eq!(got.status(), 200);
        assert_plain(&body(got).await["data"]);
    }
}

/// Waits (up to 30 s) for the tenant's newest re-encryption job to reach
/// `status`; returns it.
async fn wait_for_job(app: &TestApp, token: &str, status: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let page = body(app.get("/v1/tasks", token).await).await;
        let job = page["items"]
            .as_array()
            .and_then(|items| items.iter().find(|t| t["kind"] == "reseal"))
            .cloned();
        if let Some(job) = job.as_ref().filter(|j| j["status"] == status) {
            return job.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no job reached {status}: {page:#}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn rotating_the_built_in_key_moves_every_stored_value_while_reads_go_on() {
    let app = TestApp::spawn_with(|s| {
        s.reseal_batch = 7;
        s.reseal_pause_ms = 20;
    })
    .await;
    let (tenant, token) = tenant_with_people(&app).await;
    let (_, other) = tenant_with_people(&app).await;
    let theirs = body(app.post("/v1/data/people", &other, &person("theirs")).await).await;
    let items: Vec<Value> = (0..60).map(|i| person(&format!("p{i}"))).collect();
    let resp = app
        .post("/v1/data/people/batch", &token, &json!({"items": items}))
        .await;
    assert_eq!(resp.status(), 201, "{}", body(resp).await);
    assert!(
        stored_rows(&app, &tenant)
            .await
            .iter()
            .all(|(_, d)| d["ssn"]["kid"] == "local-1")
    );

    let resp = app
        .request(Method::POST, "/v1/encryption/rotate", Some(&token))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let rotation = body(resp).await;
    assert_eq!(rotation["keyId"], "local-2");
    // New writes use the new key at once.
    let fresh = body(app.post("/v1/data/people", &token, &person("fresh")).await).await;
    let fresh_id = fresh["id"].as_str().unwrap().to_owned();
    let stored = stored_rows(&app, &tenant).await;
    let (_, fresh_row) = stored.iter().find(|(id, _)| *id == fresh_id).unwrap();
    assert_eq!(fresh_row["ssn"]["kid"], "local-2");
    // Reads keep working while the job runs.
    let task = format!("/v1/tasks/{}", rotation["taskId"].as_str().unwrap());
    loop {
        let list = app.get("/v1/data/people?limit=100", &token).await;
        assert_eq!(list.status(), 200);
        for item in body(list).await["items"].as_array().unwrap() {
            assert_plain(&item["data"]);
        }
        let job = body(app.get(&task, &token).await).await;
        if job["status"] == "done" {
            assert_eq!(job["progress"]["scanned"], 61, "{job:#}");
            assert_eq!(job["progress"]["moved"], 60, "{job:#}");
            break;
        }
        assert!(
            ["pending", "running"].contains(&job["status"].as_str().unwrap()),
            "{job:#}"
        );
    }
    for (_, data) in stored_rows(&app, &tenant).await {
        assert_sealed(&data);
        assert_eq!(data["ssn"]["kid"], "local-2");
    }
    let metrics = app.metrics_text().await;
    assert!(metrics.contains("reseal_records_moved_total"), "{metrics}");
    // The other tenant's key and values did not move.
    let other_tenant = theirs["id"].as_str().unwrap();
    let got = app
        .get(&format!("/v1/data/people/{other_tenant}"), &other)
        .await;
    assert_eq!(got.status(), 200);
    let others = body(app.get("/v1/tasks", &other).await).await;
    assert_eq!(others["items"], json!([]), "{others:#}");
    assert_eq!(app.get(&task, &other).await.status(), 404);
}

#[tokio::test]
async fn a_schema_change_that_adds_or_removes_x_encrypted_reseals_stored_values() {
    let app = TestApp::spawn().await;
    let (tenant, token) = tenant_with_people(&app).await;
    for i in 0..5 {
        let mut p = person(&format!("p{i}"));
        p["note"] = json!(format!("note {i}"));
        assert_eq!(app.post("/v1/data/people", &token, &p).await.status(), 201);
    }
    // `note` becomes encrypted.
    let mut schema = people_schema();
    schema["properties"]["note"] = json!({"type": "string", "x-encrypted": true});
    let resp = app.put_schema("people", &token, schema.clone()).await;
    assert_eq!(resp.status(), 201, "{}", body(resp).await);
    wait_for_job(&app, &token, "done").await;
    for (_, data) in stored_rows(&app, &tenant).await {
        assert_eq!(data["note"]["$enc"], 1, "{data}");
        assert!(!data.to_string().contains("note "), "{data}");
    }
    // `ssn` is no longer encrypted: stored in clear again (and filterable).
    schema["properties"]["ssn"] = json!({"type": "string"});
    let resp = app.put_schema("people", &token, schema).await;
    assert_eq!(resp.status(), 201, "{}", body(resp).await);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while stored_rows(&app, &tenant)
        .await
        .iter()
        .any(|(_, d)| d["ssn"] != SSN)
    {
        assert!(std::time::Instant::now() < deadline, "ssn still sealed");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for (_, data) in stored_rows(&app, &tenant).await {
        assert_eq!(data["card"]["pan"]["$enc"], 1, "{data}");
        assert_eq!(data["note"]["$enc"], 1, "{data}");
    }
    let found = app
        .get(&format!("/v1/data/people?ssn=eq.{SSN}"), &token)
        .await;
    assert_eq!(found.status(), 200);
    let found = body(found).await;
    assert_eq!(found["items"].as_array().unwrap().len(), 5, "{found:#}");
    for item in found["items"].as_array().unwrap() {
        assert!(item["data"]["note"].as_str().unwrap().starts_with("note "));
    }
}

#[tokio::test]
async fn a_rotation_on_one_replica_reaches_the_writes_of_another_at_once() {
    let a = TestApp::spawn().await;
    let service = bss::startup::Application::build(a.settings.clone())
        .await
        .unwrap();
    let b = TestApp {
        base: format!("http://127.0.0.1:{}", service.port()),
        client: reqwest::Client::new(),
        database_url: a.database_url.clone(),
        settings: a.settings.clone(),
        _scratch: None,
    };
    tokio::spawn(service.run_until(std::future::pending()));
    let (tenant, token) = tenant_with_people(&a).await;
    // B caches the tenant's key (for BSS_KEY_CACHE_SECS, 300 s).
    assert_eq!(
        b.post("/v1/data/people", &token, &person("b"))
            .await
            .status(),
        201
    );
    let resp = a
        .request(Method::POST, "/v1/encryption/rotate", Some(&token))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let created = body(b.post("/v1/data/people", &token, &person("b")).await).await;
        let id = created["id"].as_str().unwrap().to_owned();
        let rows = stored_rows(&a, &tenant).await;
        let (_, row) = rows.iter().find(|(r, _)| *r == id).unwrap();
        if row["ssn"]["kid"] == "local-2" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "replica B still seals with {}",
            row["ssn"]["kid"]
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
