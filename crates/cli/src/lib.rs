//! The `forfall` command: runs any set of services in one process (dev, demo, small
//! deployments), the way Loki runs as one binary or as microservices by target.

#[cfg(feature = "demo")]
pub mod demo;
#[cfg(feature = "demo")]
pub mod devstack;
pub mod experiment;
pub mod handoff_preview;
pub mod model;
pub mod pay_flow;
pub mod simulate;
pub mod tools;

use forfall_platform::service::Runtime;
use tokio::task::JoinSet;

pub const TARGETS: [&str; 6] = ["ingest", "watcher", "dispatch", "matcher", "handoff", "portal"];

/// `all` or a comma-separated list of service names.
pub fn parse_targets(spec: &str) -> anyhow::Result<Vec<&'static str>> {
    if spec.trim() == "all" {
        return Ok(TARGETS.to_vec());
    }
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            TARGETS
                .iter()
                .copied()
                .find(|t| *t == s)
                .ok_or_else(|| anyhow::anyhow!("unknown target '{s}': expected all or some of {}", TARGETS.join(", ")))
        })
        .collect()
}

/// Starts one service's loop.
pub async fn run_target(rt: Runtime, target: &str) -> anyhow::Result<()> {
    match target {
        "ingest" => forfall_ingest::run(rt).await,
        "watcher" => forfall_watcher::run(rt).await,
        "dispatch" => forfall_dispatch::run(rt).await,
        "matcher" => forfall_matcher::run(rt).await,
        "handoff" => forfall_handoff::run(rt).await,
        "portal" => forfall_portal::run(rt).await,
        other => anyhow::bail!("unknown target '{other}'"),
    }
}

/// Runs the targets until shutdown; the first one to fail stops the others.
pub async fn run_targets(rt: Runtime, targets: &[&'static str]) -> anyhow::Result<()> {
    let mut set = JoinSet::new();
    for &target in targets {
        let rt = rt.clone();
        set.spawn(async move {
            run_target(rt, target)
                .await
                .map_err(|e| e.context(format!("service {target}")))
        });
    }
    let mut first_error = None;
    while let Some(joined) = set.join_next().await {
        let result = joined
            .map_err(|e| anyhow::anyhow!("a service task panicked: {e}"))
            .and_then(|r| r);
        if let Err(e) = result {
            tracing::error!(error = format!("{e:#}"), "stopping all services");
            rt.shutdown.cancel();
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}
