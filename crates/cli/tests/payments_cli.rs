//! `forfall payments …` as an operator runs them, against a real matcher on the dev stack.

use std::process::Command;
use std::sync::Arc;

use forfall::devstack::LocalStack;
use forfall_platform::clock::SystemClock;

/// Read when the test runs (cargo and nextest set it), not when it was compiled: a shared target
/// dir may hold a test binary built from another checkout.
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string())
}

fn forfall(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_forfall"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("forfall runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The tenant's API token the matcher knows and the commands send.
const TOKEN: &str = "nordkraft-token-51c7";

fn base_config() -> forfall_platform::CommonConfig {
    let figment = forfall_platform::config::figment(Some(std::path::Path::new("/nonexistent/forfall.toml")));
    let mut config = forfall_platform::config::common(&figment).expect("valid FORFALL_* environment");
    config.api.tenants.insert(
        "nordkraft".into(),
        forfall_platform::api_auth::TenantCredentials {
            token: Some(forfall_platform::config::Secret(TOKEN.into())),
        },
    );
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn import_list_and_match_from_the_command_line() -> anyhow::Result<()> {
    let stack = LocalStack::start(base_config(), Arc::new(SystemClock)).await?;
    stack.start_service("matcher");
    stack
        .wait_ready(&["matcher"], std::time::Duration::from_secs(45))
        .await?;
    let url = format!("http://{}", stack.rt.admin_addr("matcher").expect("matcher HTTP"));
    let fixture = format!(
        "{}/../camt054/tests/fixtures/no_kid_nordea_054_001_02.xml",
        manifest_dir()
    );

    let (code, out, err) = tokio::task::spawn_blocking(move || {
        forfall(&[
            "payments",
            "import",
            &fixture,
            "--tenant",
            "nordkraft",
            "--token",
            TOKEN,
            "--matcher",
            &url,
        ])
    })
    .await?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("camt.054.001.02 NDEANOKK-20240304-000117: 2 payments imported (0 already known), 1 debits"),
        "{out}"
    );

    // No invoices are indexed, so both payments end up unmatched and listed.
    let url = format!("http://{}", stack.rt.admin_addr("matcher").expect("matcher HTTP"));
    let listed = {
        let url = url.clone();
        forfall::devstack::eventually(
            "two unmatched payments",
            std::time::Duration::from_secs(45),
            move || {
                let url = url.clone();
                async move {
                    let (code, out, _) = tokio::task::spawn_blocking(move || {
                        forfall(&[
                            "payments",
                            "unmatched",
                            "--tenant",
                            "nordkraft",
                            "--token",
                            TOKEN,
                            "--matcher",
                            &url,
                        ])
                    })
                    .await?;
                    Ok((code == 0 && out.contains("2 unmatched payments for nordkraft")).then_some(out))
                }
            },
        )
        .await?
    };
    assert!(listed.contains("NO240304000117000101"), "{listed}");

    let u = url.clone();
    let (code, _, err) = tokio::task::spawn_blocking(move || {
        forfall(&[
            "payments",
            "match",
            "NO240304000117000101",
            "no-such-invoice",
            "--tenant",
            "nordkraft",
            "--by",
            "kari@ops",
            "--token",
            TOKEN,
            "--matcher",
            &u,
        ])
    })
    .await?;
    assert_eq!(code, 1);
    assert!(
        err.contains("no invoice 'no-such-invoice' for tenant 'nordkraft'"),
        "{err}"
    );

    let bad = format!("{}/../camt054/tests/fixtures/amount_three_decimals.xml", manifest_dir());
    let (code, _, err) = tokio::task::spawn_blocking(move || {
        forfall(&[
            "payments",
            "import",
            &bad,
            "--tenant",
            "nordkraft",
            "--token",
            TOKEN,
            "--matcher",
            &url,
        ])
    })
    .await?;
    assert_eq!(code, 1);
    assert!(
        err.contains("invalid_camt054") && err.contains("line "),
        "says what and where: {err}"
    );
    stack.shutdown().await;
    Ok(())
}
