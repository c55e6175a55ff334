use bss_tests::fake_services::{auth_service, auth_service_with_tenants};
use bss_tests::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::Method;
use serde_json::{Value, json};

async fn status_with(app: &TestApp, token: &str) -> u16 {
    app.get("/v1/schemas", token).await.status().as_u16()
}

#[tokio::test]
async fn requests_without_a_token_are_refused_with_401() {
    let app = TestApp::spawn().await;
    let resp = send(app.request(Method::GET, "/v1/schemas", None)).await;
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let b = body(resp).await;
    assert_eq!(b["status"], 401);
    assert!(b["detail"].as_str().unwrap().contains("Bearer"));
    let resp = send(
        app.request(Method::GET, "/v1/schemas", None)
            .header("authorization", "Basic abc"),
    )
    .await;
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn expired_forged_and_unsigned_tokens_are_refused() {
    let app = TestApp::spawn().await;
    let (tenant, _) = app.tenant().await;
    let mut expired = claims(Some(&tenant), &["admin"]);
    expired.exp = now() - 3600;
    assert_eq!(status_with(&app, &mint(&expired)).await, 401);

    let forged =
        bss::auth::jwt::mint("not-the-secret", &claims(Some(&tenant), &["admin"])).unwrap();
    assert_eq!(status_with(&app, &forged).await, 401);

    // alg: none, with a valid-looking payload and no signature.
    let b64 = |v: &Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let payload = serde_json::to_value(claims(Some(&tenant), &["admin"])).unwrap();
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&payload)
    );
    assert_eq!(status_with(&app, &none).await, 401);

    assert_eq!(status_with(&app, "garbage").await, 401);
    assert_eq!(status_with(&app, &token(&tenant, &["reader"])).await, 200);
}

#[tokio::test]
async fn roles_are_enforced() {
    let app = TestApp::spawn().await;
    let (tenant, admin) = app.tenant_with_invoices().await;
    let reader = token(&tenant, &["reader"]);
    let writer = token(&tenant, &["writer"]);
    let doc = json!({"number": "1", "total": 1});
    assert_eq!(
        app.post("/v1/data/invoices", &reader, &doc).await.status(),
        403
    );
    assert_eq!(
        app.post("/v1/data/invoices", &writer, &doc).await.status(),
        201
    );
    assert_eq!(app.get("/v1/data/invoices", &reader).await.status(), 200);
    let schema = json!({"schema": invoice_schema()});
    assert_eq!(
        app.put("/v1/schemas/other", &writer, &schema)
            .await
            .status(),
        403
    );
    assert_eq!(
        app.put("/v1/schemas/other", &admin, &schema).await.status(),
        201
    );
    // Tenant roles do not reach tenant lifecycle, and platform admins have no tenant data.
    assert_eq!(
        app.post("/v1/tenants", &admin, &json!({"id": "x1"}))
            .await
            .status(),
        403
    );
    assert_eq!(
        app.get("/v1/data/invoices", &platform_token())
            .await
            .status(),
        403
    );
    let no_roles = token(&tenant, &[]);
    assert_eq!(app.get("/v1/data/invoices", &no_roles).await.status(), 403);
}

fn jwks() -> Value {
    serde_json::from_str(include_str!("../fixtures/jwks.json")).unwrap()
}

fn es256(claims: &bss::auth::Claims, kid: &str) -> String {
    let key =
        EncodingKey::from_ec_pem(include_bytes!("../fixtures/jwt-es256-private.pem")).unwrap();
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

#[tokio::test]
async fn with_an_auth_service_tokens_are_verified_by_its_jwks() {
    let auth = auth_service(jwks()).await;
    let app = TestApp::spawn_with(|s| s.auth_service_url = Some(auth.url.clone())).await;
    let tenant = "jwks-tenant";
    let platform = es256(&claims(None, &["platform-admin"]), "test-key-1");
    let resp = app
        .post("/v1/tenants", &platform, &json!({"id": tenant}))
        .await;
    assert_eq!(resp.status(), 201);
    let good = es256(&claims(Some(tenant), &["reader"]), "test-key-1");
    assert_eq!(status_with(&app, &good).await, 200);
    // Cached: a second request does not refetch the key set.
    assert_eq!(status_with(&app, &good).await, 200);
    assert_eq!(auth.calls(), 1);

    // The local secret is no longer accepted.
    assert_eq!(status_with(&app, &token(tenant, &["reader"])).await, 401);
    // Algorithm confusion: HS256 "signed" with the public key.
    let public = include_bytes!("../fixtures/jwt-es256-public.pem");
    let confused = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(Some(tenant), &["admin"]),
        &EncodingKey::from_secret(public),
    )
    .unwrap();
    assert_eq!(status_with(&app, &confused).await, 401);
    // A key the Auth Service does not publish.
    let unknown = es256(&claims(Some(tenant), &["reader"]), "other-key");
    assert_eq!(status_with(&app, &unknown).await, 401);
}

#[tokio::test]
async fn issuer_and_audience_are_checked_when_configured() {
    let app = TestApp::spawn_with(|s| {
        s.jwt_issuer = Some("https://auth.example".into());
        s.jwt_audience = Some("business-store".into());
    })
    .await;
    let mut c = claims(None, &["platform-admin"]);
    assert_eq!(app.get("/v1/tenants/x", &mint(&c)).await.status(), 401);
    c.iss = Some("https://auth.example".into());
    c.aud = Some("business-store".into());
    assert_eq!(app.get("/v1/tenants/x", &mint(&c)).await.status(), 404);
    c.aud = Some("someone-else".into());
    assert_eq!(app.get("/v1/tenants/x", &mint(&c)).await.status(), 401);
}

/// An RSA key for tests only (generated with `openssl genpkey`).
const RSA_TEST_KEY: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQDJJWrCm/bTJqt/\n\
fJMOheHDUjcg+AXbaIglVWjnO8DizSnNNPA4ds5ObwKkuOSUHt2DC7woCUdlN//f\n\
t8IARRSVZON0RqeFFUUAbbSg9MyaDQ8y/MEGNAGWtxVO7on4m00o/QQkarEqEST4\n\
MZ3KlN/UrEoQ9mwCCe9LQYqagblpepUGGjG5foKbePEdnOvTpCaSeblxf/5rPEan\n\
Umk82YD87eHm/bctS0gHnWNFeYX5JVwsQxI7QhWZrzmQz6lEC5W/tljzgcZHWNPj\n\
wQaPd5K5wu3yb+yQhws7FwoaoGRn/2QQZC+Uxgv9NtDyebwTVJFnZgcC5C6+WUjY\n\
c5w3kn2nAgMBAAECggEAFrsBu4hAdlASZU/Alo2Om7H4xOMCVm8To5RpTGg2PesN\n\
ZEEtPFRAsCBfXhn+yrZKNfrngma6CLgxVCjB5aHo15EVGxi46ZMjvw6msOG5FVeQ\n\
diSV84uA+nUqFUdjlBKIv68H/s2Hw8c4NEv3FuOH/9KQdCZEwl45CnoXnao3N7IN\n\
LDGY0Tbelw3YgDmyIybn0EIH/rTvHXxTlB6TpOfGkYAJ8V6APk90ObsMWuC5Lu+N\n\
N5OLY2Hfl5NtSuoA3YH2YvdSqauptngmTAnWAu8KLxNfHB7UpqJqzrMCWJuz3o0e\n\
x3pi1HcObqDWwk+FVi0qgwpj1FHAx7PUo60veYmLwQKBgQDyEf5ycCp871bKGvTr\n\
4Cbn78iqjYyzfGFZF+PxZeIf+wvlnpiRUjbqbTzfSHQW+bXr1eLfIY4ddDk4dk6z\n\
UnRG8W1zCIwffnES5mRLPPKsfvCk/SFDXYn9bxiuEs7ulij/tn3CoUgJ0zEioiMb\n\
LbBUys/swuf9GujyXtjSb6NG1wKBgQDUuI7jWIxfVzkNA4xVgjaOpsaedFZd3Gp7\n\
D3XxUxSSQVNzw+uxwNHFm4Icf6VEbG7Ps7+R60VkSiKrOne0Wm/5iFUCXcdI1Apc\n\
8pKnYqjyvSca3S6OdpBTpuAct8KmND+0dK74XP5J3blywB3zlzopqXup4lL8s4aW\n\
O5koiZw1sQKBgQDk81HmqOH2smQy2VYnNiV2Hxt6/FBEfnKQUoE8EzHRL59r+Rmx\n\
8MGR7emyAZQTGvEOcoiWo+UHRKLOHU+IWYcyhiwPrdjh/LQzvQbFBos7zQAL/IIW\n\
dgUKV6ZPFej0Tb/PQ6okiGhbKo2BhTqQ/SCWwg/wjdPfVzFV85E9T2ttlwKBgQC1\n\
Og8yDUx6JXtLZQx4BRmp6tgoQwEZsiFdekyHLrrF57XLWM1CgP22lsgAs5b/dknp\n\
1j+Nd52E1cw3iPZWxv3C361c+LxBhbTWfysGQ/2f4BqivnFdmhFX00H39W513umv\n\
OgGfQsq575aA9sANuXcp62SZ1WHSPLia4WeYq7RT4QKBgEFhxNVjAI/e2BRFqfh8\n\
6fgV6oNVJGsUr4VCMhNacLEarIB4P25lU8du+DCdba3R4/hjdCBnaaP7PhQiroJs\n\
V7Ud/z0q6lm/oMWpznVtktpdRCE01XUJuvjZ+GrMw+vey/YXOOhuiNcxPn1tVZkw\n\
RjpS0xFhEBoej3HfarRdpyxq\n\
-----END PRIVATE KEY-----\n";

#[tokio::test]
async fn rs256_tokens_verify_by_a_jwks_and_time_claims_are_checked_there_too() {
    let rsa = EncodingKey::from_rsa_pem(RSA_TEST_KEY.as_bytes()).unwrap();
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&rsa, Algorithm::RS256).unwrap();
    jwk.common.key_id = Some("rsa-key-1".into());
    let mut set = jwks();
    set["keys"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::to_value(&jwk).unwrap());
    let auth = auth_service(set).await;
    let app = TestApp::spawn_with(|s| s.auth_service_url = Some(auth.url.clone())).await;
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-key-1".into());
    let rs256 = |c: &Value| jsonwebtoken::encode(&header, c, &rsa).unwrap();

    let platform = serde_json::to_value(claims(None, &["platform-admin"])).unwrap();
    let resp = app
        .post(
            "/v1/tenants",
            &rs256(&platform),
            &json!({"id": "rsa-tenant"}),
        )
        .await;
    assert_eq!(resp.status(), 201);
    let mut reader = serde_json::to_value(claims(Some("rsa-tenant"), &["reader"])).unwrap();
    assert_eq!(status_with(&app, &rs256(&reader)).await, 200);
    // The ES256 key of the same set still verifies its tokens.
    let es = es256(&claims(Some("rsa-tenant"), &["reader"]), "test-key-1");
    assert_eq!(status_with(&app, &es).await, 200);

    reader["nbf"] = json!(now() + 600);
    assert_eq!(status_with(&app, &rs256(&reader)).await, 401);
    reader["nbf"] = json!(now() - 600);
    reader["iat"] = json!(now() + 600);
    assert_eq!(status_with(&app, &rs256(&reader)).await, 401);
}

#[tokio::test]
async fn a_tenant_announced_without_a_name_is_named_by_the_auth_service_now_or_later() {
    let (auth, names) = auth_service_with_tenants(jwks()).await;
    let app = TestApp::spawn_with(|s| s.auth_service_url = Some(auth.url.clone())).await;
    let platform = es256(&claims(None, &["platform-admin"]), "test-key-1");
    names
        .lock()
        .unwrap()
        .insert("named-now".into(), "Named Now Ltd".into());
    let announce = |id: &str| {
        let body = json!({"tenantId": id});
        let platform = platform.clone();
        let app = &app;
        async move {
            app.post(
                "/v1/broker/topics/auth.tenant.created/messages",
                &platform,
                &body,
            )
            .await
        }
    };
    assert!(announce("named-now").await.status().is_success());
    let got = body(app.get("/v1/tenants/named-now", &platform).await).await;
    assert_eq!(got["name"], "Named Now Ltd");

    // The Auth Service does not know it yet: provisioned at once under its
    // id, named once the Auth Service answers.
    assert!(announce("named-later").await.status().is_success());
    let got = body(app.get("/v1/tenants/named-later", &platform).await).await;
    assert_eq!(
        (got["status"].as_str(), got["name"].as_str()),
        (Some("active"), Some("named-later"))
    );
    names
        .lock()
        .unwrap()
        .insert("named-later".into(), "Named Later GmbH".into());
    let mut name = String::new();
    for _ in 0..80 {
        let got = body(app.get("/v1/tenants/named-later", &platform).await).await;
        name = got["name"].as_str().unwrap_or_default().to_owned();
        if name == "Named Later GmbH" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(name, "Named Later GmbH");
}
