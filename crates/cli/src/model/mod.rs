//! `forfall model train`: fits the propensity-to-pay model (logistic regression, `linfa-logistic`)
//! on invoices whose end is known, measures it on a fifth held out (AUC, Brier score, a
//! calibration table) and writes the versioned model file the watcher scores new invoices with
//! (`watcher.propensity_model`). The invoices come from the topics (`--from-topics`: what each
//! `plan_chosen` event recorded, labelled by how the journey ended, see [`topics`]) or from the
//! simulator (`forfall simulate`'s customer base and behaviour model), so that a model can be
//! tried before real history exists.

pub mod topics;

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use forfall_domain::propensity::{self, FEATURE_NAMES, ModelMetrics, PropensityModel};
use forfall_platform::service::Runtime;
use linfa::prelude::*;
use linfa_logistic::LogisticRegression;
use ndarray::{Array1, Array2};

use self::topics::Sample;
use crate::simulate::{self, SimulateArgs};

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Fit the propensity model on a simulated customer base and write it with its metrics.
    Train(TrainArgs),
}

impl ModelCommand {
    /// Whether it reads the topics (and so needs the broker and the registry).
    pub fn reads_topics(&self) -> bool {
        let ModelCommand::Train(args) = self;
        args.from_topics
    }
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Fit on the journeys on the topics instead of a simulated base: each plan's recorded
    /// inputs, labelled paid (true) or handed over (false).
    #[arg(long = "from-topics")]
    pub from_topics: bool,
    /// With `--from-topics`: only this tenant's journeys.
    #[arg(long, requires = "from_topics")]
    pub tenant: Option<String>,
    /// Without `--from-topics`: the simulated base to fit on.
    #[command(flatten)]
    pub simulation: SimulateArgs,
    /// The model file to write.
    #[arg(long = "model-out", default_value = "propensity-model.json")]
    pub model_out: PathBuf,
}

/// Fits a model on labelled invoices (`paid`: settled without collection), every fifth held out.
pub fn fit(samples: &[Sample], version: &str) -> anyhow::Result<PropensityModel> {
    let (train, test): (Vec<_>, Vec<_>) = samples.iter().enumerate().partition(|(i, _)| i % 5 != 0);
    anyhow::ensure!(
        !test.is_empty(),
        "{} invoices are too few to fit and test a model on",
        samples.len()
    );
    let matrix = |rows: &[(usize, &Sample)]| -> anyhow::Result<(Array2<f64>, Array1<bool>)> {
        let flat: Vec<f64> = rows.iter().flat_map(|(_, (x, _))| x.iter().copied()).collect();
        Ok((
            Array2::from_shape_vec((rows.len(), FEATURE_NAMES.len()), flat)?,
            rows.iter().map(|(_, (_, y))| *y).collect(),
        ))
    };
    let (x, y) = matrix(&train)?;
    let feature_sd = x.std_axis(ndarray::Axis(0), 0.0).to_vec();
    anyhow::ensure!(
        y.iter().any(|v| *v) && y.iter().any(|v| !*v),
        "the training invoices must include paid and unpaid ones"
    );
    let fitted = LogisticRegression::default()
        .max_iterations(200)
        .fit(&Dataset::new(x, y))
        .map_err(|e| anyhow::anyhow!("fitting the model: {e}"))?;
    // linfa's positive class is the larger label: `true`, paid.
    let mut model = PropensityModel {
        version: version.to_owned(),
        label: "paid in full without collection".into(),
        features: FEATURE_NAMES.iter().map(|s| (*s).to_owned()).collect(),
        intercept: fitted.intercept(),
        coefficients: fitted.params().to_vec(),
        feature_sd,
        metrics: ModelMetrics {
            auc: 0.0,
            brier: 0.0,
            calibration: Vec::new(),
            trained_on: train.len() as u64,
            tested_on: test.len() as u64,
            base_rate: 0.0,
        },
    };
    model.check()?;
    let scored: Vec<(f64, bool)> = test.iter().map(|(_, (x, y))| (model.probability_of(x), *y)).collect();
    model.metrics.auc = propensity::auc(&scored).unwrap_or(0.5);
    model.metrics.brier = propensity::brier(&scored);
    model.metrics.calibration = propensity::calibration(&scored, 10);
    model.metrics.base_rate = scored.iter().filter(|(_, y)| *y).count() as f64 / scored.len().max(1) as f64;
    Ok(model)
}

/// `forfall model train` on a simulated base.
pub fn command(cmd: ModelCommand, figment: &figment::Figment) -> anyhow::Result<()> {
    let ModelCommand::Train(args) = cmd;
    let (policy, law) = simulate::policy_and_law(
        figment,
        args.simulation.policy.as_deref(),
        simulate::issue_day(&args.simulation),
    )?;
    let behaviour = simulate::load_model(args.simulation.model.as_deref())?;
    let mut samples = Vec::with_capacity(args.simulation.debtors as usize);
    simulate::for_each(&args.simulation, &policy, &law, &behaviour, |_, s| {
        samples.push((s.features.vector(), s.story.settled_days.is_some()));
    })?;
    let version = format!(
        "propensity-{}-sim-{}-seed-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
        args.simulation.debtors,
        args.simulation.seed
    );
    let model = fit(&samples, &version)?;
    write(&model, &args.model_out)
}

/// `forfall model train --from-topics`.
pub async fn command_from_topics(rt: &Runtime, cmd: ModelCommand) -> anyhow::Result<PropensityModel> {
    let ModelCommand::Train(args) = cmd;
    train_from_topics(rt, args.tenant.as_deref(), &args.model_out).await
}

/// Fits a model on the journeys the topics hold (of `tenant`, or every tenant) and writes it
/// to `out`.
pub async fn train_from_topics(rt: &Runtime, tenant: Option<&str>, out: &Path) -> anyhow::Result<PropensityModel> {
    let set = topics::read(rt, tenant, |p| eprintln!("{p}")).await?;
    eprintln!(
        "{} journeys ended paid or handed over; left out: {} still open or closed otherwise, {} without recorded inputs, {} undecodable",
        set.samples.len(),
        set.unresolved,
        set.without_inputs,
        set.undecodable
    );
    let version = format!(
        "propensity-{}-topics-{}{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
        set.samples.len(),
        tenant.map(|t| format!("-{t}")).unwrap_or_default()
    );
    let model = fit(&set.samples, &version)?;
    write(&model, out)?;
    Ok(model)
}

fn write(model: &PropensityModel, out: &Path) -> anyhow::Result<()> {
    std::fs::write(out, serde_json::to_vec_pretty(model)?)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
    let m = &model.metrics;
    println!(
        "model {}: AUC {:.3}, Brier {:.4} (always guessing the base rate {:.3}: {:.4}), trained on {}, tested on {}",
        model.version,
        m.auc,
        m.brier,
        m.base_rate,
        m.base_rate * (1.0 - m.base_rate),
        m.trained_on,
        m.tested_on
    );
    for (feature, weight) in model.top_features().iter().take(5) {
        println!("  {feature:<16} {weight:+.3}");
    }
    println!("calibration (predicted → paid):");
    for b in &m.calibration {
        println!(
            "  {:.1}-{:.1}: {:>7} invoices, predicted {:.3}, paid {:.3}",
            b.from, b.to, b.invoices, b.predicted, b.observed
        );
    }
    println!("written: {}", out.display());
    Ok(())
}
