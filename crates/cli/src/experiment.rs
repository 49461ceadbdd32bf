//! `forfall experiment report NAME`: what an experiment of the policy did, per variant, read
//! from the topics as the watcher reads it for its report endpoint
//! ([`forfall_watcher::experiments`]); written as a JSON file and a self-contained HTML page with
//! inline SVG plots.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use forfall_domain::experiment::Report;
use forfall_platform::service::Runtime;

#[derive(Debug, Subcommand)]
pub enum ExperimentCommand {
    /// Per variant: invoices and debtors assigned, settled before any fee, before the hand-off,
    /// handed over, fees, messages by channel, disputes, days to payment; each variant against
    /// control with fixed and always-valid intervals, and the sample ratio checked.
    Report(ReportArgs),
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The experiment's name in the policy.
    pub name: String,
    /// The policy file that defines it (default: the watcher's `watcher.policy_file`).
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Where the report goes: `<out>/<name>.json` and `<out>/<name>.html`.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    /// The level of the intervals (0.05: 95 %).
    #[arg(long, default_value_t = 0.05)]
    pub alpha: f64,
}

/// The files a report was written to.
#[derive(Debug)]
pub struct Written {
    pub json: PathBuf,
    pub html: PathBuf,
    pub report: Report,
}

pub async fn run(rt: &Runtime, cmd: ExperimentCommand) -> anyhow::Result<()> {
    let ExperimentCommand::Report(args) = cmd;
    let written = report(rt, &args).await?;
    print!("{}", forfall_watcher::experiment_page::summary(&written.report));
    println!("report: {}\n        {}", written.html.display(), written.json.display());
    Ok(())
}

/// The experiment's variants and weights, in the policy's order (the first is control).
fn variants(rt: &Runtime, args: &ReportArgs) -> anyhow::Result<Vec<(String, f64)>> {
    let (policy, _) =
        crate::simulate::policy_and_law(&rt.figment, args.policy.as_deref(), rt.clock.now().date_naive())?;
    Ok(forfall_watcher::experiments::variants(
        forfall_watcher::experiments::named_experiment(&policy, &args.name)?,
    ))
}

/// Reads the topics, writes the report's files, and returns them.
pub async fn report(rt: &Runtime, args: &ReportArgs) -> anyhow::Result<Written> {
    let variants = variants(rt, args)?;
    let report =
        forfall_watcher::experiments::read_report(rt, &args.name, &variants, args.alpha, |p| eprintln!("{p}")).await?;
    std::fs::create_dir_all(&args.out)?;
    let json = args.out.join(format!("{}.json", args.name));
    let html = args.out.join(format!("{}.html", args.name));
    write(&json, &serde_json::to_vec_pretty(&report)?)?;
    write(&html, forfall_watcher::experiment_page::page(&report).as_bytes())?;
    Ok(Written { json, html, report })
}

fn write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
}
