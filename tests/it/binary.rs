//! The real `bss` binary: zero-configuration start on a private PostgreSQL
//! cluster, and graceful shutdown on SIGTERM.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

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

    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
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
