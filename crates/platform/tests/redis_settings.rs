//! The start-up check of Redis's production settings, against real Redis servers of the test's
//! own: one set up badly, one set up for production, one that refuses `CONFIG` (as managed
//! Redis often does).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use forfall_platform::config::RedisConfig;
use forfall_platform::redis_settings::{self, Check};
use forfall_platform::redis_store;
use redis::aio::ConnectionManager;

struct PrivateRedis {
    child: Child,
    url: String,
    /// Its working directory (where an AOF goes), removed with it.
    dir: PathBuf,
}

impl PrivateRedis {
    fn start(settings: &[&str]) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let port = port.to_string();
        let dir = std::env::temp_dir().join(format!("forfall-redis-settings-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let child = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
            .arg("--dir")
            .arg(&dir)
            .args(settings)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start redis-server (the dev stack installs it): {e}"))?;
        Ok(Self {
            child,
            url: format!("redis://127.0.0.1:{port}/"),
            dir,
        })
    }

    /// Connects the way services do, once the server listens.
    async fn connect(&self) -> anyhow::Result<ConnectionManager> {
        let config = RedisConfig {
            url: self.url.clone(),
            key_prefix: "test:".into(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match redis_store::connect(&config).await {
                Ok(c) => return Ok(c),
                Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The warnings show in a failing test's output.
fn log_to_test_output() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
}

fn findings(check: Check) -> Vec<(&'static str, Option<String>)> {
    match check {
        Check::Checked(findings) => findings.into_iter().map(|f| (f.setting, f.found)).collect(),
        Check::Unchecked { error } => panic!("the settings should have been read: {error}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_findings_name_exactly_the_settings_that_are_off() -> anyhow::Result<()> {
    log_to_test_output();
    let bad = PrivateRedis::start(&[
        "--appendonly",
        "no",
        "--maxmemory-policy",
        "allkeys-lru",
        "--hash-max-listpack-value",
        "64",
        "--maxmemory",
        "64mb",
    ])?;
    let good = PrivateRedis::start(&[
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--maxmemory-policy",
        "noeviction",
        "--hash-max-listpack-value",
        "1024",
        "--maxmemory",
        "64mb",
    ])?;

    let bad_con = bad.connect().await?;
    assert_eq!(
        findings(redis_settings::check(&bad_con).await),
        [
            ("appendonly", Some("no".to_owned())),
            ("maxmemory-policy", Some("allkeys-lru".to_owned())),
            ("hash-max-listpack-value", Some("64".to_owned())),
        ]
    );
    let good_con = good.connect().await?;
    assert_eq!(findings(redis_settings::check_and_warn(&good_con).await), []);

    // No memory limit is a finding of its own.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query_async(&mut good_con.clone())
        .await?;
    assert_eq!(
        findings(redis_settings::check(&good_con).await),
        [("maxmemory", Some("0".to_owned()))]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_refuses_config_is_reported_unchecked_and_still_connects() -> anyhow::Result<()> {
    log_to_test_output();
    let managed = PrivateRedis::start(&["--rename-command", "CONFIG", ""])?;
    // Connecting runs the check too: it must not fail the connection.
    let con = managed.connect().await?;
    match redis_settings::check_and_warn(&con).await {
        Check::Unchecked { error } => assert!(error.to_ascii_lowercase().contains("config"), "{error}"),
        other => panic!("CONFIG is disabled, yet: {other:?}"),
    }
    let pong: String = redis::cmd("PING").query_async(&mut con.clone()).await?;
    assert_eq!(pong, "PONG", "the connection still serves commands");
    Ok(())
}
