//! What an SRE watches: the alert rules in `deploy/prometheus` (promtool, from Debian's
//! `prometheus` package which the dev stack installs, loads them and runs their unit tests) and
//! the dashboards in `deploy/grafana` (data source templated, units set). Every `forfall_*`
//! metric either queries is one a service registers, and one the running services export
//! after a small day of work on the dev stack (scraped from their `/metrics`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn files(dir: &Path, extension: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == extension))
        .collect();
    found.sort();
    Ok(found)
}

fn promtool(args: &[&str], dir: &Path) -> anyhow::Result<String> {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| anyhow::anyhow!("promtool (Debian package 'prometheus'; `make devstack` installs it): {e}"))?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(out.status.success(), "promtool {}:\n{said}", args.join(" "));
    Ok(said)
}

/// Every Rust source of the services and libraries, as one text.
fn sources() -> anyhow::Result<String> {
    let mut text = String::new();
    let mut dirs = vec![root().join("services"), root().join("crates")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|x| x == "rs") {
                text.push_str(&std::fs::read_to_string(&path)?);
            }
        }
    }
    Ok(text)
}

/// The `forfall_*` metrics a query reads, a histogram's series by the histogram's name.
fn metrics_in(query: &str) -> Vec<String> {
    let mut names: Vec<String> = query
        .match_indices("forfall_")
        .map(|(at, _)| {
            let rest = &query[at..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let name = &rest[..end];
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name)
                .to_owned()
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// Metrics of the standard exporters the README asks for next to Forfall (redis_exporter next
/// to Redis), which a dashboard may show beside Forfall's own.
const EXPORTERS: [&str; 1] = ["redis_memory_"];

/// What in `where_` queries a metric no service registers (the exporter adds `forfall_`).
fn unregistered(queries: &str, sources: &str, where_: &str) -> Vec<String> {
    metrics_in(queries)
        .into_iter()
        .filter(|name| !sources.contains(&format!("\"{}\"", name.trim_start_matches("forfall_"))))
        .map(|name| format!("{where_}: {name} is not registered by any service"))
        .collect()
}

/// The queries of a rules file only: from each `expr:` to the rule's next key.
fn rule_queries(text: &str) -> String {
    let mut queries = String::new();
    let mut in_expr = false;
    for line in text.lines() {
        let key = line.trim_start();
        if key.starts_with("expr:") {
            in_expr = true;
        } else if ["for:", "labels:", "annotations:", "- alert:", "- record:"]
            .iter()
            .any(|k| key.starts_with(k))
        {
            in_expr = false;
        }
        if in_expr {
            queries.push_str(line);
            queries.push('\n');
        }
    }
    queries
}

#[test]
fn the_alert_rules_load_and_pass_their_unit_tests() -> anyhow::Result<()> {
    let deploy = root().join("deploy/prometheus");
    let rules = files(&deploy.join("rules"), "yml")?;
    let tests = files(&deploy.join("tests"), "yml")?;
    assert!(!rules.is_empty() && !tests.is_empty(), "rules and their tests");
    for r in &rules {
        promtool(&["check", "rules", &r.to_string_lossy()], &deploy)?;
    }
    for t in &tests {
        let said = promtool(&["test", "rules", &t.to_string_lossy()], &deploy.join("tests"))?;
        assert!(said.contains("SUCCESS"), "{said}");
    }
    Ok(())
}

/// A renamed metric fails here, not silently in Prometheus.
#[test]
fn every_metric_the_rules_query_is_registered_by_a_service() -> anyhow::Result<()> {
    let sources = sources()?;
    let mut problems = Vec::new();
    for rules in files(&root().join("deploy/prometheus/rules"), "yml")? {
        let queries = rule_queries(&std::fs::read_to_string(&rules)?);
        assert!(!metrics_in(&queries).is_empty(), "{}", rules.display());
        problems.extend(unregistered(&queries, &sources, &rules.display().to_string()));
    }
    assert!(problems.is_empty(), "{problems:#?}");
    Ok(())
}

/// Each dashboard works on any Prometheus (the data source is a variable), says what its
/// numbers are (a unit on every panel), and shows only metrics the services export.
#[test]
fn every_dashboard_is_templated_has_units_and_queries_real_metrics() -> anyhow::Result<()> {
    let sources = sources()?;
    let dashboards = files(&root().join("deploy/grafana"), "json")?;
    assert!(!dashboards.is_empty());
    let mut problems = Vec::new();
    for path in dashboards {
        let at = path.display().to_string();
        let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        let variables = dashboard["templating"]["list"].as_array().cloned().unwrap_or_default();
        if !variables
            .iter()
            .any(|v| v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus")
        {
            problems.push(format!(
                "{at}: no 'datasource' variable of type datasource (prometheus)"
            ));
        }
        let panels = dashboard["panels"].as_array().cloned().unwrap_or_default();
        if panels.is_empty() {
            problems.push(format!("{at}: no panels"));
        }
        for panel in panels {
            let title = panel["title"].as_str().unwrap_or("(untitled)").to_owned();
            let here = format!("{at}, panel '{title}'");
            if panel["datasource"]["uid"] != "${datasource}" {
                problems.push(format!("{here}: the data source is not ${{datasource}}"));
            }
            if panel["fieldConfig"]["defaults"]["unit"]
                .as_str()
                .is_none_or(str::is_empty)
            {
                problems.push(format!("{here}: no unit"));
            }
            let targets = panel["targets"].as_array().cloned().unwrap_or_default();
            if targets.is_empty() {
                problems.push(format!("{here}: no query"));
            }
            for target in targets {
                if target["datasource"]["uid"] != "${datasource}" {
                    problems.push(format!("{here}: a query's data source is not ${{datasource}}"));
                }
                let expr = target["expr"].as_str().unwrap_or_default();
                if metrics_in(expr).is_empty() && !EXPORTERS.iter().any(|prefix| expr.contains(prefix)) {
                    problems.push(format!("{here}: the query reads no forfall metric: {expr}"));
                }
                problems.extend(unregistered(expr, &sources, &here));
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
    Ok(())
}

/// What the running services export: every `forfall_*` family in their `/metrics`.
async fn exported_families(stack: &forfall_e2e::LocalStack) -> anyhow::Result<std::collections::BTreeSet<String>> {
    let mut families = std::collections::BTreeSet::new();
    for service in forfall::TARGETS {
        let text = stack.metrics(service).await?;
        families.extend(
            text.lines()
                .filter_map(|l| l.strip_prefix("# TYPE "))
                .filter_map(|l| l.split(' ').next())
                .filter(|name| name.starts_with("forfall_"))
                .map(str::to_owned),
        );
    }
    Ok(families)
}

/// A policy with an experiment, on a plan short enough to reach the agency in a few days.
const POLICY: &str = r#"
version = "observability-1"

[handoff]
agency_sends_warning = ["DK", "NO"]

[[segment]]
name = "everyone"
plan = "short"

[plan.short]
step = [
  { name = "nudge", offset_banking_days = 0, channels = ["email"], tone = "nudge" },
  { name = "handoff", offset_banking_days = 3, handoff = true },
]

[[experiment]]
name = "nudge-copy"
segments = ["everyone"]
start = "2026-01-01"
end = "2026-12-31"
variant = [
  { name = "control", weight = 50 },
  { name = "warm", weight = 50 },
]
"#;

/// The dashboards and the alert rules against the running services: a day of a small customer
/// base (an invoice paid after its nudge, one handed to the agency, a malformed record, an
/// unsigned agency call) on every service, then every metric a panel or a rule queries must be
/// among the families the services export. A metric renamed, or one only named in the
/// sources but never registered, fails here.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_metric_the_dashboards_and_rules_query_is_exported_by_the_running_services() -> anyhow::Result<()> {
    use forfall_e2e::*;
    let clock = forfall_platform::clock::ManualClock::new(at("2026-03-10T08:00:00Z"));
    let mut stack = LocalStack::start(base_config(), clock.clone()).await?;
    let policy = std::env::temp_dir().join(format!("{}-policy.toml", stack.prefix));
    std::fs::write(&policy, POLICY)?;
    stack.set("watcher.policy_file", &policy);
    stack.set("watcher.open_invoices_refresh_ms", 100);
    stack.start_all();
    stack.wait_ready(&forfall::TARGETS, WAIT).await?;

    let paid = danish("obs-paid", "OBS-1", day(2026, 3, 12), "paid@example.test");
    let unpaid = Sample {
        reference: "RF61123456789012",
        ..danish("obs-unpaid", "OBS-2", day(2026, 3, 12), "unpaid@example.test")
    };
    for s in [&paid, &unpaid] {
        issue_invoice(&stack, s).await?;
        status_is(&stack, s.tenant, s.invoice_id, "open").await?;
    }
    let billing = stack.topic(&stack.topics().billing_invoice_events);
    stack.produce_raw(&billing, "junk", b"not an invoice").await?;
    clock.set(at("2026-03-12T08:00:01Z"));
    // The nudges must be sent before the payment and the clock move on: dispatch's last look
    // rightly suppresses a nudge whose journey has been paid or has moved past it meanwhile.
    for s in [&paid, &unpaid] {
        status_is(&stack, s.tenant, s.invoice_id, "nudged").await?;
        eventually("the nudge e-mail", WAIT, || async {
            Ok((!stack.mail.to(s.email).is_empty()).then_some(()))
        })
        .await?;
    }
    let payment = paid.payment("obs-tx-1", paid.amount_minor, paid.reference);
    stack
        .produce(&stack.topic(&stack.topics().payments), "bank", &payment)
        .await?;
    status_is(&stack, paid.tenant, paid.invoice_id, "closed:paid").await?;
    advance_until_status(
        &stack,
        &clock,
        &unpaid.debtor_id(),
        unpaid.tenant,
        unpaid.invoice_id,
        "handed_over",
        10,
    )
    .await?;
    let handoff = stack
        .rt
        .admin_addr("handoff")
        .ok_or_else(|| anyhow::anyhow!("hand-off serves HTTP"))?;
    let refused = reqwest::Client::new()
        .post(format!("http://{handoff}/v1/agency/events"))
        .body("{}")
        .send()
        .await?;
    assert_eq!(refused.status().as_u16(), 401);

    let mut queried = std::collections::BTreeMap::<String, Vec<String>>::new();
    for path in files(&root().join("deploy/grafana"), "json")? {
        let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        for panel in dashboard["panels"].as_array().cloned().unwrap_or_default() {
            for target in panel["targets"].as_array().cloned().unwrap_or_default() {
                for name in metrics_in(target["expr"].as_str().unwrap_or_default()) {
                    queried.entry(name).or_default().push(format!(
                        "{}: '{}'",
                        path.display(),
                        panel["title"].as_str().unwrap_or_default()
                    ));
                }
            }
        }
    }
    for path in files(&root().join("deploy/prometheus/rules"), "yml")? {
        for name in metrics_in(&rule_queries(&std::fs::read_to_string(&path)?)) {
            queried.entry(name).or_default().push(path.display().to_string());
        }
    }
    assert!(queried.len() > 10, "{queried:?}");
    // Each family shows once its first series exists: wait for the last of them (the gauges
    // refresh, the lag is sampled) rather than for a fixed time.
    let missing = || async {
        let exported = exported_families(&stack).await?;
        anyhow::Ok(
            queried
                .iter()
                .filter(|(name, _)| !exported.contains(*name))
                .map(|(name, by)| format!("{name} (queried by {})", by.join(", ")))
                .collect::<Vec<String>>(),
        )
    };
    let all_there = eventually("every queried metric exported", WAIT, || async {
        Ok(missing().await?.is_empty().then_some(()))
    })
    .await;
    if all_there.is_err() {
        panic!("not exported by any running service: {:#?}", missing().await?);
    }
    stack.shutdown().await;
    Ok(())
}
