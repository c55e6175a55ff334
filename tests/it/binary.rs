//! The real `bss` binary: zero-configuration start on a private PostgreSQL
//! cluster, and graceful shutdown on SIGTERM.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bss_tests::free_port;

async fn wait_ready(url: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(r) = reqwest::get(url).await
            && r.status() == 200
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

#[tokio::test]
async fn with_no_database_configured_it_runs_a_private_cluster_and_stops_it_on_sigterm() {
    let data = std::env::temp_dir().join(format!("bss-private-{}", uuid::Uuid::new_v4().simple()));
    let port = free_port();
    let mut child = Command::new(bss_tests::bss_binary())
        .arg("serve")
        .env_remove("DATABASE_URL")
        .env("BSS_LOCAL_POSTGRES", "private")
        .env("BSS_DATA_DIR", &data)
        .env("BSS_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("BSS_JWT_SECRET", bss_tests::SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let ready = wait_ready(&format!("{base}/health/ready")).await;
    if !ready {
        let _ = child.kill();
    }
    assert!(ready, "the service became ready on a private cluster");
    let pid_file = data.join("pg").join("postmaster.pid");
    assert!(
        pid_file.exists(),
        "the private cluster runs under the data directory"
    );

    // It serves the API against that cluster.
    let client = reqwest::Client::new();
    let resp = client
        .post(format!("{base}/v1/tenants"))
        .bearer_auth(bss_tests::platform_token())
        .json(&serde_json::json!({"id": "private-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);

    bss_tests::sigterm(&child);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        status.is_some_and(|s| s.success()),
        "exited cleanly on SIGTERM: {status:?}"
    );
    assert!(!pid_file.exists(), "the private cluster was stopped");
    let _ = std::fs::remove_dir_all(&data);
}

/// A `bss serve` on a fresh database, its logs (stdout) in a file.
struct Served {
    child: std::process::Child,
    base: String,
    log: std::path::PathBuf,
    /// Its database, dropped after the process.
    _scratch: bss_tests::Scratch,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

async fn serve(drain_secs: u64, body_timeout_ms: u64) -> Served {
    serve_with(drain_secs, body_timeout_ms, &[]).await
}

/// `serve` with more environment variables.
async fn serve_with(drain_secs: u64, body_timeout_ms: u64, env: &[(&str, String)]) -> Served {
    let port = free_port();
    let log = std::env::temp_dir().join(format!("bss-log-{}.json", uuid::Uuid::new_v4().simple()));
    let (settings, scratch) = bss_tests::test_settings();
    let database_url = settings.database_url.unwrap();
    let child = Command::new(bss_tests::bss_binary())
        .arg("serve")
        .env("DATABASE_URL", database_url)
        .env("BSS_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("BSS_JWT_SECRET", bss_tests::SECRET)
        .env("BSS_SHUTDOWN_DRAIN_SECS", drain_secs.to_string())
        .env("BSS_HTTP_BODY_TIMEOUT_MS", body_timeout_ms.to_string())
        .env("BSS_LOG_FORMAT", "json")
        .env_remove("RUST_LOG")
        .env_remove("KAFKA_BROKERS")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut served = Served {
        child,
        base: format!("http://127.0.0.1:{port}"),
        log,
        _scratch: scratch,
    };
    if !wait_ready(&format!("{}/health/ready", served.base)).await {
        let _ = served.child.kill();
        panic!("the service did not become ready");
    }
    served
}

impl Served {
    fn signal(&self, name: &str) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args([name, &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// Waits for the process to exit; its status and how long that took.
    async fn exited_within(
        &mut self,
        bound: Duration,
    ) -> (Option<std::process::ExitStatus>, Duration) {
        let started = Instant::now();
        while started.elapsed() < bound {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (Some(status), started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        (None, started.elapsed())
    }

    /// A tenant and an open SSE stream of its events.
    async fn sse_client(&self) -> reqwest::Response {
        let id = format!("t-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let client = reqwest::Client::new();
        let resp = client
            .post(format!("{}/v1/tenants", self.base))
            .bearer_auth(bss_tests::platform_token())
            .json(&serde_json::json!({"id": id}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        let resp = client
            .get(format!("{}/v1/events/stream", self.base))
            .bearer_auth(bss_tests::token(&id, &["admin"]))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp
    }
}

/// Reads the stream until it ends; false if it is still open after `wait`.
async fn stream_ends_within(mut stream: reqwest::Response, wait: Duration) -> bool {
    let read = async { while let Ok(Some(_)) = stream.chunk().await {} };
    tokio::time::timeout(wait, read).await.is_ok()
}

#[tokio::test]
async fn sigint_with_an_sse_client_connected_ends_the_stream_and_exits_within_the_drain() {
    let mut served = serve(3, 30_000).await;
    let stream = served.sse_client().await;
    served.signal("-INT");
    let ended = tokio::spawn(stream_ends_within(stream, Duration::from_secs(8)));
    let (status, took) = served.exited_within(Duration::from_secs(8)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "exited cleanly: {status:?} after {took:?}"
    );
    assert!(ended.await.unwrap(), "the SSE stream ended");
    let logs = std::fs::read_to_string(&served.log).unwrap();
    let after_signal = logs
        .split_once("shutdown signal received")
        .map(|(_, rest)| rest)
        .expect("the signal was logged");
    let warnings: Vec<&str> = after_signal
        .lines()
        .filter(|l| l.contains("\"level\":\"WARN\"") || l.contains("\"level\":\"ERROR\""))
        .collect();
    assert!(warnings.is_empty(), "a clean stop logged {warnings:#?}");
}

/// A request whose body never arrives: it keeps a drain waiting.
async fn stuck_request(served: &Served) -> tokio::net::TcpStream {
    let addr = served.base.trim_start_matches("http://").to_owned();
    let mut stuck = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/tenants HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{",
        bss_tests::platform_token()
    );
    tokio::io::AsyncWriteExt::write_all(&mut stuck, head.as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stuck
}

#[tokio::test]
async fn the_drain_on_sigterm_is_bounded_by_shutdown_drain_secs() {
    let mut served = serve(2, 60_000).await;
    let _stuck = stuck_request(&served).await;
    served.signal("-TERM");
    let (status, took) = served.exited_within(Duration::from_secs(10)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?} after {took:?}"
    );
    assert!(
        took >= Duration::from_millis(1500),
        "waited for the request: {took:?}"
    );
}

#[tokio::test]
async fn a_second_sigint_while_draining_exits_at_once() {
    let mut served = serve(60, 60_000).await;
    let _stuck = stuck_request(&served).await;

    served.signal("-INT");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(served.child.try_wait().unwrap().is_none(), "still draining");
    served.signal("-INT");
    let (status, took) = served.exited_within(Duration::from_secs(5)).await;
    assert!(
        status.is_some(),
        "exited at once on the second SIGINT ({took:?})"
    );
}

/// The keys of a JSON object, in order, duplicates kept (a `Value` would
/// keep only the last of two equal keys); nested objects' too, each with
/// its path.
struct KeyLists(Vec<(String, Vec<String>)>);

impl<'de> serde::Deserialize<'de> for KeyLists {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit(String);
        impl<'de> serde::de::DeserializeSeed<'de> for Visit {
            type Value = Vec<(String, Vec<String>)>;
            fn deserialize<D: serde::Deserializer<'de>>(
                self,
                d: D,
            ) -> Result<Self::Value, D::Error> {
                d.deserialize_any(self)
            }
        }
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Vec<(String, Vec<String>)>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut keys = Vec::new();
                let mut nested = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    nested.extend(map.next_value_seed(Visit(format!("{}/{key}", self.0)))?);
                    keys.push(key);
                }
                nested.push((self.0, keys));
                Ok(nested)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut nested = Vec::new();
                while let Some(n) = seq.next_element_seed(Visit(self.0.clone()))? {
                    nested.extend(n);
                }
                Ok(nested)
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(vec![])
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(vec![])
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(vec![])
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(vec![])
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(vec![])
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(vec![])
            }
        }
        serde::de::DeserializeSeed::deserialize(Visit(String::new()), d).map(KeyLists)
    }
}

#[tokio::test]
async fn every_request_and_lifecycle_change_is_one_json_log_line_without_duplicate_keys() {
    let served = serve(1, 30_000).await;
    let client = reqwest::Client::new();
    let tenant = format!("t-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let token = bss_tests::token(&tenant, &["admin"]);
    let resp = client
        .post(format!("{}/v1/tenants", served.base))
        .bearer_auth(bss_tests::platform_token())
        .json(&serde_json::json!({"id": tenant}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let resp = client
        .put(format!("{}/v1/schemas/invoices", served.base))
        .bearer_auth(&token)
        .json(&serde_json::json!({"schema": bss_tests::invoice_schema()}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let resp = client
        .get(format!("{}/v1/data/invoices/nope", served.base))
        .bearer_auth(&token)
        .header("x-request-id", "req-log-test")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);

    // The lines are written as the requests end: wait for the last one.
    let mut lines = Vec::new();
    for _ in 0..50 {
        let logs = std::fs::read_to_string(&served.log).unwrap();
        lines = logs.lines().map(str::to_owned).collect::<Vec<_>>();
        if logs.contains("req-log-test") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut parsed = Vec::new();
    for line in &lines {
        let KeyLists(objects) =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        for (path, keys) in objects {
            let mut sorted = keys.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(
                sorted.len(),
                keys.len(),
                "duplicate keys at {path:?}: {line}"
            );
        }
        parsed.push(serde_json::from_str::<serde_json::Value>(line).unwrap());
    }
    let access = |route: &str, status: u16| {
        parsed.iter().find(|l| {
            l["message"] == "request answered"
                && l["span"]["route"] == route
                && l["status"] == status
        })
    };
    let created = access("/v1/tenants", 201).unwrap_or_else(|| panic!("{lines:#?}"));
    assert_eq!(created["span"]["method"], "POST");
    let missing = access("/v1/data/{resource}/{id}", 404).unwrap_or_else(|| panic!("{lines:#?}"));
    assert_eq!(missing["span"]["tenant"], tenant.as_str());
    assert_eq!(missing["span"]["request_id"], "req-log-test");
    assert_eq!(missing["span"]["uri"], "/v1/data/invoices/nope");
    for lifecycle in ["tenant provisioned", "schema applied"] {
        assert!(
            parsed
                .iter()
                .any(|l| l["message"] == lifecycle && l["tenant"] == tenant.as_str()),
            "no {lifecycle:?} line: {lines:#?}"
        );
    }
}

#[tokio::test]
async fn with_an_otlp_endpoint_request_spans_are_exported_in_the_callers_trace() {
    use std::sync::{Arc, Mutex};
    // A stand-in OpenTelemetry collector: keeps what is posted to it.
    let received: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let keep = received.clone();
    let collector = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let keep = keep.clone();
            async move {
                keep.lock().unwrap().push(body.to_vec());
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, collector).await });

    let served = serve_with(
        1,
        30_000,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
            ("OTEL_SERVICE_NAME", "bss-otlp-test".into()),
        ],
    )
    .await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/tenants", served.base))
        .bearer_auth(bss_tests::platform_token())
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .json(&serde_json::json!({"id": "otlp-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);

    // OTLP/HTTP protobuf: the trace id travels as its 16 bytes.
    let trace_bytes: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let contains =
        |haystack: &[u8], needle: &[u8]| haystack.windows(needle.len()).any(|w| w == needle);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let bodies = received.lock().unwrap().clone();
        if bodies.iter().any(|b| {
            contains(b, &trace_bytes) && contains(b, b"bss-otlp-test") && contains(b, b"request")
        }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no span of the caller's trace reached the collector ({} exports)",
            bodies.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn pretty_logs_written_to_a_file_have_no_colour_codes() {
    let served = serve_with(1, 30_000, &[("BSS_LOG_FORMAT", "pretty".into())]).await;
    let resp = reqwest::get(format!("{}/health/live", served.base))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut logs = String::new();
    for _ in 0..50 {
        logs = std::fs::read_to_string(&served.log).unwrap();
        if logs.contains("request answered") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(logs.contains("request answered"), "{logs}");
    assert!(!logs.contains('\u{1b}'), "colour codes in a file: {logs}");
}
