//! The Helm chart (`helm/forfall`), checked without a helm binary or a cluster:
//! `tools/helm/check_chart.py` lints, schema-checks and renders it with Helm's own library and
//! validates every object against the Kubernetes schemas, for the default values and a
//! production-like values file, against golden renderings. Here also: the configuration the
//! chart writes is one every service reads, and its policy one the law accepts.

use std::path::{Path, PathBuf};
use std::process::Command;

use forfall_platform::config::{self, CommonConfig};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The chart checks' Python (`make devstack` creates it; `FORFALL_HELM_VENV` moves it).
fn python() -> PathBuf {
    let venv = std::env::var_os("FORFALL_HELM_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/forfall/helm-venv")
        });
    venv.join("bin/python")
}

fn check_chart(args: &[&str]) -> anyhow::Result<String> {
    let python = python();
    let out = Command::new(&python)
        .arg(root().join("tools/helm/check_chart.py"))
        .args(args)
        .output()
        .map_err(|e| {
            anyhow::anyhow!(
                "{} (`make devstack` installs the chart's checks): {e}",
                python.display()
            )
        })?;
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let logged = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        out.status.success(),
        "check_chart.py {}:\n{said}\n{logged}",
        args.join(" ")
    );
    Ok(said)
}

#[test]
fn the_chart_lints_validates_and_renders_as_its_golden_files() -> anyhow::Result<()> {
    let said = check_chart(&[])?;
    println!("{said}");
    // Each check prints one line; a check that silently stopped running would go unnoticed.
    let passed = said.lines().filter(|l| l.starts_with("ok ")).count();
    assert_eq!(passed, 18, "{said}");
    Ok(())
}

#[test]
fn the_charts_configuration_is_what_every_service_reads() -> anyhow::Result<()> {
    for values in ["default", "production"] {
        let dir = std::env::temp_dir().join(format!("forfall-chart-{values}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir)?;
        check_chart(&["--config-files", values, &dir.to_string_lossy()])?;
        let file = dir.join("forfall.json");
        let figment = config::figment(Some(&file));
        let common: CommonConfig = config::common(&figment).map_err(|e| anyhow::anyhow!("{values}: {e}"))?;
        assert!(!common.kafka.create_topics, "{values}: production manages its topics");
        assert!(!common.registry.auto_register, "{values}");
        assert_eq!(common.kafka.session_timeout_ms, 45_000, "{values}: Kafka's own timings");
        assert_eq!(common.log.format, "json", "{values}");
        config::section::<forfall_ingest::IngestSettings>(&figment, "ingest")?;
        config::section::<forfall_watcher::WatcherSettings>(&figment, "watcher")?;
        config::section::<forfall_matcher::MatcherSettings>(&figment, "matcher")?;
        config::section::<forfall_handoff::HandoffSettings>(&figment, "handoff")?;
        config::section::<forfall_portal::PortalSettings>(&figment, "portal")?;
        let dispatch: forfall_dispatch::DispatchSettings = config::section(&figment, "dispatch")?;
        if values == "production" {
            assert_eq!(dispatch.smtp.tls, "tls");
            assert_eq!(common.kafka.partitions, 12, "numbers arrive as integers");
            let policy = std::fs::read_to_string(dir.join("policy.toml"))?;
            let law = forfall_domain::law::LawBook::builtin()?;
            let on = chrono::NaiveDate::from_ymd_opt(2026, 12, 1).expect("a date");
            let loaded = forfall_domain::policy::load(&policy, &law, on).map_err(|e| anyhow::anyhow!("{e}"))?;
            assert_eq!(loaded.version, "acme-2026-12");
        }
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}
