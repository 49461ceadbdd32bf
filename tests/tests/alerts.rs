//! The alert rules in `deploy/prometheus`: promtool (Debian's `prometheus` package, which the
//! dev stack installs) loads them and runs their unit tests, and every metric they query is
//! one a service registers.

use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus")
}

fn files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yml"))
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

#[test]
fn the_alert_rules_load_and_pass_their_unit_tests() -> anyhow::Result<()> {
    let rules = files(&deploy().join("rules"))?;
    let tests = files(&deploy().join("tests"))?;
    assert!(!rules.is_empty() && !tests.is_empty(), "rules and their tests");
    for r in &rules {
        promtool(&["check", "rules", &r.to_string_lossy()], &deploy())?;
    }
    for t in &tests {
        let said = promtool(&["test", "rules", &t.to_string_lossy()], &deploy().join("tests"))?;
        assert!(said.contains("SUCCESS"), "{said}");
    }
    Ok(())
}

/// Every `forfall_*` metric a rule queries is registered by some service under that name (the
/// exporter adds the `forfall_` prefix): a renamed metric fails here, not silently in Prometheus.
#[test]
fn every_metric_the_rules_query_is_registered_by_a_service() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut sources = String::new();
    let mut dirs = vec![root.join("services"), root.join("crates")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|x| x == "rs") {
                sources.push_str(&std::fs::read_to_string(&path)?);
            }
        }
    }
    for rules in files(&deploy().join("rules"))? {
        let text = std::fs::read_to_string(&rules)?;
        // The queries only: from each `expr:` to the rule's next key.
        let mut queries = String::new();
        let mut in_expr = false;
        for line in text.lines() {
            let key = line.trim_start();
            if key.starts_with("expr:") {
                in_expr = true;
            } else if ["for:", "labels:", "annotations:", "- alert:"]
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
        let mut names: Vec<&str> = queries
            .match_indices("forfall_")
            .map(|(at, _)| {
                let rest = &queries[at..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                let name = &rest[..end];
                // A histogram's series are its name plus a suffix.
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(name)
            })
            .collect();
        names.sort_unstable();
        names.dedup();
        assert!(!names.is_empty(), "{}", rules.display());
        for name in names {
            let registered = format!("\"{}\"", name.trim_start_matches("forfall_"));
            assert!(
                sources.contains(&registered),
                "{}: {name} is not registered by any service",
                rules.display()
            );
        }
    }
    Ok(())
}
