//! Tokens (RFC 8725): a token that is not valid yet, was issued in the
//! future or asks for an extension we do not implement is refused; claims
//! PostgreSQL cannot store are refused before they reach it. And the local
//! signing secret: generated on first start into the data directory, read
//! (never generated) by `bss token`, kept across restarts, and never used on
//! a public address, where a configured secret must have 256 bits too.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use bss::auth::jwt;
use bss_tests::*;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Value, json};

/// An HS256 token with the test secret, any header, any claims.
fn signed(header: &Header, claims: &Value) -> String {
    jsonwebtoken::encode(header, claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

/// A reader's claims for `tenant`, with `extra` merged in.
fn reader_claims(tenant: &str, extra: Value) -> Value {
    let mut c = serde_json::to_value(claims(Some(tenant), &["reader"])).unwrap();
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        c.extend(extra.clone());
    }
    c
}

async fn status_with(app: &TestApp, token: &str) -> u16 {
    app.get("/v1/schemas", token).await.status().as_u16()
}

#[tokio::test]
async fn a_token_that_is_not_valid_yet_is_refused() {
    let app = TestApp::spawn().await;
    let (tenant, _) = app.tenant().await;
    let hs256 = Header::new(Algorithm::HS256);
    let future = signed(&hs256, &reader_claims(&tenant, json!({"nbf": now() + 600})));
    let resp = app.get("/v1/schemas", &future).await;
    assert_eq!(resp.status(), 401);
    let detail = body(resp).await["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("invalid token"), "{detail}");
    let past = signed(&hs256, &reader_claims(&tenant, json!({"nbf": now() - 600})));
    assert_eq!(status_with(&app, &past).await, 200);
}

#[tokio::test]
async fn a_token_issued_in_the_future_is_refused() {
    let app = TestApp::spawn().await;
    let (tenant, _) = app.tenant().await;
    let hs256 = Header::new(Algorithm::HS256);
    let future = signed(&hs256, &reader_claims(&tenant, json!({"iat": now() + 600})));
    let resp = app.get("/v1/schemas", &future).await;
    assert_eq!(resp.status(), 401);
    let detail = body(resp).await["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("iat"), "{detail}");
    let malformed = signed(&hs256, &reader_claims(&tenant, json!({"iat": "yesterday"})));
    assert_eq!(status_with(&app, &malformed).await, 401);
    let past = signed(&hs256, &reader_claims(&tenant, json!({"iat": now() - 600})));
    assert_eq!(status_with(&app, &past).await, 200);
}

#[tokio::test]
async fn clock_skew_within_the_leeway_is_accepted_and_the_leeway_is_a_setting() {
    let app = TestApp::spawn().await;
    let (tenant, _) = app.tenant().await;
    let hs256 = Header::new(Algorithm::HS256);
    // The default leeway is 30 s: a clock 10 s ahead is fine.
    let skewed = reader_claims(&tenant, json!({"nbf": now() + 10, "iat": now() + 10}));
    assert_eq!(status_with(&app, &signed(&hs256, &skewed)).await, 200);

    let strict = TestApp::spawn_with(|s| s.jwt_leeway_secs = 0).await;
    let (tenant, _) = strict.tenant().await;
    let skewed = reader_claims(&tenant, json!({"iat": now() + 10}));
    assert_eq!(status_with(&strict, &signed(&hs256, &skewed)).await, 401);
    let skewed = reader_claims(&tenant, json!({"nbf": now() + 10}));
    assert_eq!(status_with(&strict, &signed(&hs256, &skewed)).await, 401);
    let expired = reader_claims(&tenant, json!({"exp": now() - 5}));
    assert_eq!(status_with(&strict, &signed(&hs256, &expired)).await, 401);
}

#[tokio::test]
async fn a_token_with_a_critical_header_we_do_not_understand_is_refused() {
    let app = TestApp::spawn().await;
    let (tenant, _) = app.tenant().await;
    let mut header = Header::new(Algorithm::HS256);
    header.crit = Some(vec!["exp-extension".into()]);
    header
        .extras
        .insert("exp-extension".into(), "must-be-understood".into());
    let critical = signed(&header, &reader_claims(&tenant, json!({})));
    let resp = app.get("/v1/schemas", &critical).await;
    assert_eq!(resp.status(), 401);
    let detail = body(resp).await["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("crit"), "{detail}");
    // An empty list is malformed too (RFC 7515 §4.1.11).
    header.crit = Some(vec![]);
    let empty = signed(&header, &reader_claims(&tenant, json!({})));
    assert_eq!(status_with(&app, &empty).await, 401);
}

#[tokio::test]
async fn a_nul_character_in_a_claim_is_refused_with_401_not_500() {
    let app = TestApp::spawn().await;
    let (tenant, _) = app.tenant_with_invoices().await;
    let hs256 = Header::new(Algorithm::HS256);
    let mut admin = serde_json::to_value(claims(Some(&tenant), &["admin"])).unwrap();
    admin["sub"] = json!("mallory\u{0000}");
    let nul_sub = signed(&hs256, &admin);
    // Writes record the actor (`user:<sub>`) in PostgreSQL: these were 500s.
    let resp = app.put_schema("notes", &nul_sub, invoice_schema()).await;
    assert_eq!(resp.status(), 401);
    let detail = body(resp).await["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("sub"), "{detail}");
    let doc = json!({"number": "1", "total": 1});
    let resp = app.post("/v1/data/invoices", &nul_sub, &doc).await;
    assert_eq!(resp.status(), 401);
    assert_eq!(status_with(&app, &nul_sub).await, 401);

    for (claim, value) in [
        ("tenant_id", json!(format!("{tenant}\u{0000}"))),
        ("roles", json!(["admin\u{0000}"])),
        ("iss", json!("issuer\u{0000}")),
    ] {
        let mut c = serde_json::to_value(claims(Some(&tenant), &["admin"])).unwrap();
        c[claim] = value;
        let resp = app
            .post("/v1/data/invoices", &signed(&hs256, &c), &doc)
            .await;
        assert_eq!(resp.status(), 401, "{claim}");
    }
    // The tenant is untouched: nothing was written by those tokens.
    let list = body(
        app.get("/v1/data/invoices", &token(&tenant, &["reader"]))
            .await,
    )
    .await;
    assert_eq!(list["items"].as_array().map(Vec::len), Some(0), "{list}");
}

// --- The real binary and its local secret ---------------------------------

fn temp_data_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bss-secret-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `bss <args>` with a clean authentication environment: no configured
/// secret, no Auth Service, no config file.
fn bss(data: &Path, database_url: &str, addr: &str) -> Command {
    let mut cmd = Command::new(bss_binary());
    cmd.current_dir(data)
        .env_remove("BSS_JWT_SECRET")
        .env_remove("AUTH_SERVICE_URL")
        .env_remove("BSS_CONFIG_FILE")
        .env_remove("KAFKA_BROKERS")
        .env("BSS_DATA_DIR", data)
        .env("DATABASE_URL", database_url)
        .env("BSS_HTTP_ADDR", addr)
        .env("RUST_LOG", "warn");
    cmd
}

fn serve(data: &Path, database_url: &str, port: u16) -> Child {
    bss(data, database_url, &format!("127.0.0.1:{port}"))
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

async fn wait_ready(child: &mut Child, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}/health/ready")).await
            && r.status() == 200
        {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the service exited before it was ready: {status}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    panic!("the service did not become ready");
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `bss token` in the same data directory, as the README tells a user to.
fn bss_token(data: &Path, database_url: &str, args: &[&str]) -> String {
    let out = bss(data, database_url, "127.0.0.1:0")
        .arg("token")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bss token failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

async fn create_tenant(port: u16, token: &str, id: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/v1/tenants"))
        .bearer_auth(token)
        .json(&json!({"id": id}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn without_a_configured_secret_one_is_generated_kept_private_and_shared_with_bss_token() {
    let data = temp_data_dir();
    let (settings, _scratch) = test_settings();
    let database_url = settings.database_url.unwrap();
    let port = free_port();
    let mut child = serve(&data, &database_url, port);
    wait_ready(&mut child, port).await;

    let secret_file = data.join("jwt-secret");
    let meta = std::fs::metadata(&secret_file).expect("the first start wrote a secret");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let secret = std::fs::read_to_string(&secret_file).unwrap();
    assert!(secret.trim().len() >= 43, "at least 256 random bits");
    assert!(!secret.contains("bss-local-dev-secret"));

    let admin = bss_token(&data, &database_url, &["--roles", "platform-admin"]);
    assert_eq!(create_tenant(port, &admin, "secret-1").await, 201);
    // A token signed with any other secret is refused.
    assert_eq!(
        create_tenant(port, &platform_token(), "secret-2").await,
        401
    );

    // A restart keeps the secret: tokens minted before still work.
    stop(child);
    let port = free_port();
    let mut child = serve(&data, &database_url, port);
    wait_ready(&mut child, port).await;
    assert_eq!(std::fs::read_to_string(&secret_file).unwrap(), secret);
    assert_eq!(create_tenant(port, &admin, "secret-3").await, 201);
    stop(child);
    let _ = std::fs::remove_dir_all(&data);
}

/// Runs `cmd` until it exits (killed after 60 s), with its output.
fn run_to_exit(mut cmd: Command) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    child.wait_with_output().unwrap()
}

#[tokio::test]
async fn a_public_address_with_a_generated_secret_is_refused_with_what_to_set() {
    let data = temp_data_dir();
    let (settings, _scratch) = test_settings();
    let database_url = settings.database_url.unwrap();
    let out = run_to_exit({
        let mut cmd = bss(&data, &database_url, "0.0.0.0:0");
        cmd.arg("serve");
        cmd
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it refused to start: {stderr}");
    assert!(
        out.status.code().is_some(),
        "it exited, not killed: {stderr}"
    );
    assert!(stderr.contains("BSS_JWT_SECRET"), "{stderr}");
    assert!(stderr.contains("AUTH_SERVICE_URL"), "{stderr}");
    assert!(stderr.contains("0.0.0.0"), "{stderr}");

    // With an explicit secret of 256 bits the same address is served.
    let port = free_port();
    let mut child = bss(&data, &database_url, &format!("0.0.0.0:{port}"))
        .env("BSS_JWT_SECRET", LONG_SECRET)
        .env(
            "BSS_MASTER_KEY",
            "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
        )
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    wait_ready(&mut child, port).await;
    let admin = jwt::mint(LONG_SECRET, &claims(None, &["platform-admin"])).unwrap();
    assert_eq!(create_tenant(port, &admin, "public-1").await, 201);
    stop(child);
    let _ = std::fs::remove_dir_all(&data);
}

/// A configured secret of 48 bytes, as `openssl rand -base64 36` prints.
const LONG_SECRET: &str = "k3Jt0Zp9qVwX2yLr8aBcDeFgHiJkLmNoPqRsTuVwXyZ01234";

/// `bss serve` on 0.0.0.0 with `secret` in the environment or, when
/// `in_file`, in a configuration file (where an empty one can be written).
fn serve_public_with(data: &Path, database_url: &str, secret: &str, in_file: bool) -> Output {
    let mut cmd = bss(data, database_url, "0.0.0.0:0");
    if in_file {
        let file = data.join("bss.toml");
        std::fs::write(&file, format!("jwt_secret = {secret:?}\n")).unwrap();
        cmd.env("BSS_CONFIG_FILE", file);
    } else {
        cmd.env("BSS_JWT_SECRET", secret);
    }
    cmd.arg("serve");
    run_to_exit(cmd)
}

#[tokio::test]
async fn a_public_address_with_a_short_or_empty_secret_is_refused() {
    let data = temp_data_dir();
    let (settings, _scratch) = test_settings();
    let database_url = settings.database_url.unwrap();
    for (secret, in_file) in [("", true), ("secret", false), (SECRET, false)] {
        let out = serve_public_with(&data, &database_url, secret, in_file);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code().is_some_and(|c| c != 0),
            "{secret:?}: {stderr}"
        );
        assert!(stderr.contains("refusing to listen on 0.0.0.0"), "{stderr}");
        assert!(stderr.contains("BSS_JWT_SECRET"), "{stderr}");
        assert!(stderr.contains("at least 32"), "{stderr}");
    }
    // On loopback a short secret is still served (with a warning).
    let port = free_port();
    let mut child = bss(&data, &database_url, &format!("127.0.0.1:{port}"))
        .env("BSS_JWT_SECRET", SECRET)
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_ready(&mut child, port).await;
    assert_eq!(
        create_tenant(port, &platform_token(), "short-loopback").await,
        201
    );
    stop(child);
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn bss_token_without_a_secret_fails_with_a_hint_and_generates_none() {
    // A data directory the service never started in, e.g. the default
    // relative `.bss` seen from another working directory.
    let data = temp_data_dir();
    let (settings, _scratch) = test_settings();
    let database_url = settings.database_url.unwrap();
    let out = bss(&data, &database_url, "127.0.0.1:0")
        .arg("token")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(out.stdout.is_empty(), "no token was printed");
    assert!(stderr.contains("Start the service first"), "{stderr}");
    assert!(stderr.contains("BSS_JWT_SECRET"), "{stderr}");
    assert!(stderr.contains("BSS_DATA_DIR"), "{stderr}");
    assert!(!data.join("jwt-secret").exists(), "no secret was generated");

    // With a configured secret it needs no data directory.
    let token = bss(&data, &database_url, "127.0.0.1:0")
        .env("BSS_JWT_SECRET", LONG_SECRET)
        .args(["token", "--roles", "platform-admin"])
        .output()
        .unwrap();
    assert!(token.status.success());
    let token = String::from_utf8(token.stdout).unwrap();
    let key = DecodingKey::from_secret(LONG_SECRET.as_bytes());
    let mut validation = Validation::new(Algorithm::HS256);
    validation.validate_aud = false;
    let minted = jsonwebtoken::decode::<Value>(token.trim(), &key, &validation).unwrap();
    assert_eq!(minted.claims["roles"], json!(["platform-admin"]));
    let _ = std::fs::remove_dir_all(&data);
}
