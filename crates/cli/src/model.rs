//! `forfall model train`: fits the propensity-to-pay model (logistic regression, `linfa-logistic`)
//! on invoices whose end is known, measures it on a fifth held out (AUC, Brier score, a
//! calibration table) and writes the versioned model file the watcher scores new invoices with
//! (`watcher.propensity_model`). The invoices come from the simulator (`forfall simulate`'s
//! customer base and behaviour model), so a model can be tried before real history exists.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use forfall_domain::propensity::{self, FEATURE_NAMES, Features, ModelMetrics, PropensityModel};
use linfa::prelude::*;
use linfa_logistic::LogisticRegression;
use ndarray::{Array1, Array2};

use crate::simulate::{self, SimulateArgs};

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Fit the propensity model on a simulated customer base and write it with its metrics.
    Train(TrainArgs),
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub simulation: SimulateArgs,
    /// The model file to write.
    #[arg(long = "model-out", default_value = "propensity-model.json")]
    pub model_out: PathBuf,
}

/// Fits a model on labelled invoices (`paid`: settled without collection), every fifth held out.
pub fn fit(samples: &[(Features, bool)], version: &str) -> anyhow::Result<PropensityModel> {
    let (train, test): (Vec<_>, Vec<_>) = samples.iter().enumerate().partition(|(i, _)| i % 5 != 0);
    let matrix = |rows: &[(usize, &(Features, bool))]| -> anyhow::Result<(Array2<f64>, Array1<bool>)> {
        let flat: Vec<f64> = rows.iter().flat_map(|(_, (f, _))| f.vector()).collect();
        Ok((
            Array2::from_shape_vec((rows.len(), FEATURE_NAMES.len()), flat)?,
            rows.iter().map(|(_, (_, y))| *y).collect(),
        ))
    };
    let (x, y) = matrix(&train)?;
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
    let scored: Vec<(f64, bool)> = test.iter().map(|(_, (f, y))| (model.probability(f), *y)).collect();
    model.metrics.auc = propensity::auc(&scored).unwrap_or(0.5);
    model.metrics.brier = propensity::brier(&scored);
    model.metrics.calibration = propensity::calibration(&scored, 10);
    model.metrics.base_rate = scored.iter().filter(|(_, y)| *y).count() as f64 / scored.len().max(1) as f64;
    Ok(model)
}

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
        samples.push((s.features, s.story.settled_days.is_some()));
    })?;
    let version = format!(
        "propensity-{}-sim-{}-seed-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
        args.simulation.debtors,
        args.simulation.seed
    );
    let model = fit(&samples, &version)?;
    std::fs::write(&args.model_out, serde_json::to_vec_pretty(&model)?)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", args.model_out.display()))?;
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
    println!("written: {}", args.model_out.display());
    Ok(())
}
