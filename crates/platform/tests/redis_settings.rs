//! The start-up check of Redis's production settings, against real Redis servers of the test's
//! own: one set up badly, one set up for production, one that refuses `CONFIG` (as managed
//! Redis often does).

mod common;

use common::PrivateRedis;
use forfall_platform::config::RedisConfig;
use forfall_platform::redis_settings::{self, Check};
use forfall_platform::redis_store;
use redis::aio::ConnectionManager;

/// Connects the way services do, once the server listens.
async fn connect(server: &PrivateRedis) -> anyhow::Result<ConnectionManager> {
    let config = RedisConfig {
        url: server.url.clone(),
        key_prefix: "test:".into(),
        ..RedisConfig::default()
    };
    server.when_up(|| redis_store::connect(&config)).await
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

    let bad_con = connect(&bad).await?;
    assert_eq!(
        findings(redis_settings::check(&bad_con).await),
        [
            ("appendonly", Some("no".to_owned())),
            ("maxmemory-policy", Some("allkeys-lru".to_owned())),
            ("hash-max-listpack-value", Some("64".to_owned())),
        ]
    );
    let good_con = connect(&good).await?;
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
    let con = connect(&managed).await?;
    match redis_settings::check_and_warn(&con).await {
        Check::Unchecked { error } => assert!(error.to_ascii_lowercase().contains("config"), "{error}"),
        other => panic!("CONFIG is disabled, yet: {other:?}"),
    }
    let pong: String = redis::cmd("PING").query_async(&mut con.clone()).await?;
    assert_eq!(pong, "PONG", "the connection still serves commands");
    Ok(())
}
