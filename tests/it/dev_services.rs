//! `bss dev-services` beside `bss serve`, as a developer runs them: the
//! service with all three peer URLs on the stand-ins verifies their tokens
//! with their JWKS, checks schemas with them and seals `x-encrypted` fields
//! with their keys, which stay the same across a restart of dev-services.
//! They refuse an address other machines can reach.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bss_tests::{TempDir, bss_binary, free_port, test_settings};
use reqwest::Client;
use serde_json::{Value, json};
use sqlx::Connection;

const IBAN: &str = "DE89370400440532013000";

/// A child process, killed with the guard.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `bss dev-services` on `port` with `data` as its data directory; its
/// stdout (the environment lines, then its logs) appended to `log`.
fn dev_services(port: u16, data: &Path, log: &Path) -> Running {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let child = Command::new(bss_binary())
        .args(["dev-services", "--addr", &format!("127.0.0.1:{port}")])
        .env("BSS_DATA_DIR", data)
        .env("BSS_LOG_FORMAT", "json")
        .env_remove("RUST_LOG")
        .env_remove("BSS_JWT_ISSUER")
        .env_remove("BSS_JWT_AUDIENCE")
        .stdout(out)
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Running(child)
}

/// `bss serve` on `port` with its three peer services at `peers`.
fn serve(port: u16, database_url: &str, peers: &str, data: &Path) -> Running {
    let child = Command::new(bss_binary())
        .arg("serve")
        .env("DATABASE_URL", database_url)
        .env("BSS_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("BSS_DATA_DIR", data)
        .env("VALIDATION_SERVICE_URL", peers)
        .env("AUTH_SERVICE_URL", peers)
        .env("TASK_SERVICE_URL", peers)
        .env("RUST_LOG", "warn")
        .env_remove("BSS_JWT_SECRET")
        .env_remove("BSS_JWT_ISSUER")
        .env_remove("BSS_JWT_AUDIENCE")
        .env_remove("KAFKA_BROKERS")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Running(child)
}

async fn wait_ok(client: &Client, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(r) = client.get(url).send().await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} did not answer 200");
}

async fn json_of(resp: reqwest::Response, status: u16) -> Value {
    let got = resp.status();
    let text = resp.text().await.unwrap();
    assert_eq!(got, status, "{text}");
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

/// A token from dev-services' `POST /dev/token`.
async fn dev_token(client: &Client, dev: &str, request: Value) -> String {
    let resp = client
        .post(format!("{dev}/dev/token"))
        .json(&request)
        .send()
        .await
        .unwrap();
    json_of(resp, 200).await["token"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The tenant's data-encryption key `key_id` (the current one if `None`).
async fn data_key(client: &Client, dev: &str, tenant: &str, key_id: Option<&str>) -> Value {
    let mut url = format!("{dev}/api/auth/tenants/{tenant}/keys/data-encryption-key");
    if let Some(id) = key_id {
        url = format!("{url}?keyId={id}");
    }
    json_of(client.get(url).send().await.unwrap(), 200).await
}

async fn sigterm_and_wait(running: &mut Running) -> Option<std::process::ExitStatus> {
    bss_tests::sigterm(&running.0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Some(status) = running.0.try_wait().unwrap() {
            return Some(status);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

#[tokio::test]
async fn the_service_runs_on_dev_services_and_its_encrypted_fields_survive_their_restart() {
    let (settings, _scratch) = test_settings();
    let database_url = settings.database_url.unwrap();
    let dir = TempDir::new("bss-dev-services");
    let (dev_data, log) = (dir.0.join("dev"), dir.0.join("dev-services.log"));
    std::fs::create_dir_all(&dir.0).unwrap();
    let client = Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    let dev_port = free_port();
    let dev = format!("http://127.0.0.1:{dev_port}");
    let mut stand_ins = dev_services(dev_port, &dev_data, &log);
    wait_ok(&client, &format!("{dev}/.well-known/jwks.json")).await;
    let printed = std::fs::read_to_string(&log).unwrap();
    for name in [
        "VALIDATION_SERVICE_URL",
        "AUTH_SERVICE_URL",
        "TASK_SERVICE_URL",
    ] {
        assert!(printed.contains(&format!("{name}={dev}\n")), "{printed}");
    }
    let jwks = json_of(
        client
            .get(format!("{dev}/.well-known/jwks.json"))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(jwks["keys"][0]["alg"], "EdDSA", "{jwks}");

    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let _service = serve(port, &database_url, &dev, &dir.0.join("serve"));
    wait_ok(&client, &format!("{base}/health/ready")).await;

    // A platform admin's token from dev-services creates a tenant.
    let admin = dev_token(&client, &dev, json!({"roles": ["platform-admin"]})).await;
    let tenant = format!("dev-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let resp = client
        .post(format!("{base}/v1/tenants"))
        .bearer_auth(&admin)
        .json(&json!({"id": tenant, "name": "Dev"}))
        .send()
        .await
        .unwrap();
    json_of(resp, 201).await;

    // The tenant's admin (the default role) defines a resource with an
    // encrypted field and writes a record.
    let token = dev_token(&client, &dev, json!({"tenant": tenant})).await;
    let schema = json!({"schema": {"type": "object", "required": ["holder"], "properties": {
        "holder": {"type": "string"},
        "iban": {"type": "string", "x-encrypted": true}
    }}});
    let resp = client
        .put(format!("{base}/v1/schemas/accounts"))
        .bearer_auth(&token)
        .json(&schema)
        .send()
        .await
        .unwrap();
    json_of(resp, 201).await;
    let resp = client
        .post(format!("{base}/v1/data/accounts"))
        .bearer_auth(&token)
        .json(&json!({"holder": "Ada", "iban": IBAN}))
        .send()
        .await
        .unwrap();
    let created = json_of(resp, 201).await;
    assert_eq!(created["data"]["iban"], IBAN, "{created}");
    let record = format!(
        "{base}/v1/data/accounts/{}",
        created["id"].as_str().unwrap()
    );
    assert_reads_iban(&client, &record, &token).await;

    // PostgreSQL holds it sealed with dev-services' first key.
    let mut db = sqlx::PgConnection::connect(&database_url).await.unwrap();
    let (stored,): (Value,) = sqlx::query_as(&format!(
        "SELECT data FROM \"t_{}\".accounts WHERE id = $1",
        tenant.replace('-', "_")
    ))
    .bind(created["id"].as_str().unwrap())
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert!(
        !stored.to_string().contains(IBAN),
        "plaintext stored: {stored}"
    );
    assert_eq!(stored["iban"]["$enc"], 1, "{stored}");
    assert_eq!(stored["iban"]["kid"], "dev-1", "{stored}");

    // The schema check and the key came from dev-services.
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("/api/validation/validateSchema"),
        "{logged}"
    );
    assert!(
        logged.contains(&format!(
            "/api/auth/tenants/{tenant}/keys/data-encryption-key"
        )),
        "{logged}"
    );

    // A rotation makes dev-2 current; dev-1 still answers by id.
    let first = data_key(&client, &dev, &tenant, None).await;
    assert_eq!(first["keyId"], "dev-1");
    let resp = client
        .post(format!("{dev}/dev/tenants/{tenant}/keys/rotate"))
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(resp, 200).await["keyId"], "dev-2");
    assert_eq!(
        data_key(&client, &dev, &tenant, None).await["keyId"],
        "dev-2"
    );
    assert_eq!(data_key(&client, &dev, &tenant, Some("dev-1")).await, first);
    let unknown = client
        .get(format!(
            "{dev}/api/auth/tenants/{tenant}/keys/data-encryption-key?keyId=dev-3"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    // One Idempotency-Key, one task.
    let schedule = |key: Option<&'static str>| {
        let mut req = client
            .post(format!("{dev}/api/task/schedule"))
            .json(&json!({"task": "send-invoice", "record": 1}));
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        req.send()
    };
    let once = json_of(schedule(Some("k-1")).await.unwrap(), 200).await;
    let twice = json_of(schedule(Some("k-1")).await.unwrap(), 200).await;
    let other = json_of(schedule(None).await.unwrap(), 200).await;
    assert_eq!(once["status"], "scheduled");
    assert_eq!(once["taskId"], twice["taskId"]);
    assert_ne!(once["taskId"], other["taskId"]);
    let tasks = json_of(
        client.get(format!("{dev}/dev/tasks")).send().await.unwrap(),
        200,
    )
    .await;
    let items = tasks["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{tasks}");
    assert_eq!(items[0]["idempotencyKey"], "k-1");
    assert_eq!(items[0]["times"], 2);
    assert_eq!(items[0]["body"]["task"], "send-invoice");

    // It stops on SIGTERM; its state, kept private, brings back the same
    // signing key, keys and rotation.
    let status = sigterm_and_wait(&mut stand_ins).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let state = dev_data.join("dev-services.json");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&state).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "{} is private", state.display());
    let files: Vec<_> = std::fs::read_dir(&dev_data)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files, ["dev-services.json"], "no temporary file is left");
    let _stand_ins = dev_services(dev_port, &dev_data, &log);
    wait_ok(&client, &format!("{dev}/.well-known/jwks.json")).await;
    let again = client
        .get(format!("{dev}/.well-known/jwks.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(again, 200).await, jwks);
    assert_eq!(
        data_key(&client, &dev, &tenant, None).await["keyId"],
        "dev-2"
    );
    assert_eq!(data_key(&client, &dev, &tenant, Some("dev-1")).await, first);
    assert_reads_iban(&client, &record, &token).await;
}

#[tokio::test]
async fn dev_services_refuse_an_address_other_machines_can_reach() {
    let dir = TempDir::new("bss-dev-services-public");
    let out = Command::new(bss_binary())
        .args([
            "dev-services",
            "--addr",
            &format!("0.0.0.0:{}", free_port()),
        ])
        .env("BSS_DATA_DIR", &dir.0)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("refusing to listen on 0.0.0.0"), "{stderr}");
    assert!(!dir.0.exists(), "nothing was written");
}

/// The record reads back with its IBAN in clear.
async fn assert_reads_iban(client: &reqwest::Client, record: &str, token: &str) {
    let read = json_of(
        client.get(record).bearer_auth(token).send().await.unwrap(),
        200,
    )
    .await;
    assert_eq!(read["data"]["iban"], IBAN, "{read}");
}
