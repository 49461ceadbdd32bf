//! The service binary on the dev stack: configured from `FORFALL_*` variables, ready on
//! `/readyz`, and on SIGTERM it commits what it handled and exits 0.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn wait_http_ok(url: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if reqwest::get(url)
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_service_cleanly_with_exit_code_zero() -> anyhow::Result<()> {
    let registry = forfall_schema_registry_emulator::spawn("127.0.0.1:0").await?;
    let prefix = format!("sig{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let base_port = free_port() - 1; // ingest listens on base + 1
    let mut child = Command::new(env!("CARGO_BIN_EXE_forfall-ingest"))
        .env("FORFALL_REGISTRY__URL", format!("http://{registry}"))
        .env("FORFALL_TOPICS__PREFIX", format!("{prefix}."))
        .env("FORFALL_REDIS__KEY_PREFIX", format!("{prefix}:"))
        .env("FORFALL_KAFKA__GROUP_PREFIX", &prefix)
        .env("FORFALL_KAFKA__SESSION_TIMEOUT_MS", "2000")
        .env("FORFALL_KAFKA__HEARTBEAT_INTERVAL_MS", "300")
        .env("FORFALL_ADMIN__BASE_PORT", base_port.to_string())
        .env("FORFALL_CONFIG", "/nonexistent/forfall.toml")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let admin = format!("http://127.0.0.1:{}", base_port + 1);
    assert!(
        wait_http_ok(&format!("{admin}/healthz"), Duration::from_secs(30)).await,
        "healthz answers"
    );
    assert!(
        wait_http_ok(&format!("{admin}/readyz"), Duration::from_secs(30)).await,
        "readyz turns ready once the group is joined"
    );
    let metrics = reqwest::get(format!("{admin}/metrics")).await?.text().await?;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("forfall_build_info{") && l.contains("service=\"ingest\"")),
        "Prometheus text on /metrics:\n{metrics}"
    );

    let status = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status()?;
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = child.try_wait()? {
            break exit;
        }
        anyhow::ensure!(Instant::now() < deadline, "did not stop within 20 s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut logs = String::new();
    if let Some(mut err) = child.stderr.take() {
        std::io::Read::read_to_string(&mut err, &mut logs)?;
    }
    assert_eq!(exit.code(), Some(0), "exit code 0; logs:\n{logs}");
    assert!(
        logs.contains("shutdown requested") && logs.contains("stopped"),
        "logs say why it stopped:\n{logs}"
    );
    assert!(
        logs.lines().all(|l| l.starts_with('{')),
        "JSON logs when not on a terminal:\n{logs}"
    );
    Ok(())
}
