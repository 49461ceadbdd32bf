//! The `forfall` command.

use std::sync::Arc;

use clap::{Parser, Subcommand};
use forfall_platform::clock::SystemClock;
use forfall_platform::service::Runtime;
use forfall_platform::{config, shutdown, telemetry};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "forfall", version, about = "Forfall: the debtor journey platform")]
struct Cli {
    /// Configuration file (default: $FORFALL_CONFIG, else ./forfall.toml when present).
    #[arg(long, global = true)]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run services in this process until SIGTERM.
    Run {
        /// `all`, or a comma-separated list of: ingest, watcher, dispatch, matcher, handoff.
        #[arg(long, default_value = "all")]
        target: String,
    },
    /// Run the whole pipeline on the dev stack with simulated time, feed a demo set of invoices
    /// and payments, and print what happened to each (development builds only).
    #[cfg(feature = "demo")]
    Demo(forfall::demo::DemoArgs),
    /// Payment references: generate and validate KID, FIK, OCR, Finnish and RF references.
    #[command(subcommand)]
    Reference(forfall::tools::ReferenceCommand),
    /// The Nordic rules Forfall applies, with citations and dates.
    #[command(subcommand)]
    Law(forfall::tools::LawCommand),
    /// Banking-day calendars.
    #[command(subcommand)]
    Calendar(forfall::tools::CalendarCommand),
    /// Journey policies: check one against the law before deploying it.
    #[command(subcommand)]
    Policy(forfall::tools::PolicyCommand),
    /// An invoice's whole story (journey, messages, payments, requests), as the portal tells
    /// it to the creditor's staff.
    Timeline(forfall::tools::TimelineArgs),
    /// Hand-off: the cases that would go to the agency today, with every amount and citation.
    #[command(subcommand)]
    Handoff(forfall::handoff_preview::HandoffCommand),
    /// Payments: import camt.054 files, list and match unmatched payments.
    #[command(subcommand)]
    Payments(forfall::tools::PaymentsCommand),
    /// A synthetic customer base driven through the real policy, journey and law code with
    /// a stated behaviour model (domain core, millions of debtors); reports its experiment.
    Simulate(forfall::simulate::SimulateArgs),
    /// The propensity-to-pay model: fit it and write the file the watcher scores with.
    #[command(subcommand)]
    Model(forfall::model::ModelCommand),
    /// Experiments of the policy: what each variant did, with honest statistics.
    #[command(subcommand)]
    Experiment(forfall::experiment::ExperimentCommand),
    /// Rebuild Redis from the topics (after Redis was lost, flushed or restored from an older
    /// copy), with progress; resumes where an interrupted rebuild stopped.
    Rebuild(forfall::tools::RebuildArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The offline tools need no runtime, broker or configuration.
    match cli.command {
        Command::Reference(cmd) => return forfall::tools::reference(cmd),
        Command::Law(cmd) => return forfall::tools::law(cmd),
        Command::Calendar(cmd) => return forfall::tools::calendar(cmd),
        Command::Policy(cmd) => return forfall::tools::policy(cmd),
        Command::Simulate(args) => return forfall::simulate::command(args, &config::figment(cli.config.as_deref())),
        Command::Model(cmd) if !cmd.reads_topics() => {
            return forfall::model::command(cmd, &config::figment(cli.config.as_deref()));
        }
        _ => {}
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = runtime.block_on(async move {
        let figment = config::figment(cli.config.as_deref());
        let common = config::common(&figment)?;
        match cli.command {
            Command::Run { target } => {
                telemetry::init(&common.log, &common.traces, "forfall")?;
                let targets = forfall::parse_targets(&target)?;
                let token = CancellationToken::new();
                shutdown::cancel_on_signals(token.clone());
                let rt = Runtime::new(common, figment, Arc::new(SystemClock), token)?;
                forfall::run_targets(rt, &targets).await
            }
            #[cfg(feature = "demo")]
            Command::Demo(args) => forfall::demo::run(common, figment, args).await,
            Command::Payments(cmd) => forfall::tools::payments(cmd).await,
            Command::Timeline(args) => forfall::tools::timeline(args).await,
            Command::Handoff(cmd) => forfall::handoff_preview::handoff(cmd).await,
            Command::Experiment(cmd) => {
                let rt = Runtime::new(common, figment, Arc::new(SystemClock), CancellationToken::new())?;
                forfall::experiment::run(&rt, cmd).await
            }
            Command::Model(cmd) => {
                let rt = Runtime::new(common, figment, Arc::new(SystemClock), CancellationToken::new())?;
                forfall::model::command_from_topics(&rt, cmd).await.map(|_| ())
            }
            Command::Rebuild(args) => {
                telemetry::init(&common.log, &common.traces, "forfall")?;
                let rt = Runtime::new(common, figment, Arc::new(SystemClock), CancellationToken::new())?;
                forfall::tools::rebuild(&rt, args).await
            }
            Command::Reference(_)
            | Command::Law(_)
            | Command::Calendar(_)
            | Command::Policy(_)
            | Command::Simulate(_) => Ok(()),
        }
    });
    // The spans still queued go out before the process ends.
    telemetry::shutdown();
    result
}
