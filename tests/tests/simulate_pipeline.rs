//! `forfall simulate --pipeline` on the example experiment (`deploy/policies/fee-free-reminder.toml`):
//! hundreds of simulated debtors through every real service, and the experiment report read
//! back from the topics. The services must do what the domain core does (the same seed gives
//! the same counts in both modes, disputes and part payments included), and the report must
//! find the effect the behaviour model puts in: its interval for the no-fee variant covers the
//! effect that a large domain-core run measures, and excludes no effect.

use forfall::simulate::{self, SimulateArgs};
use forfall_domain::behaviour::BehaviourModel;
use forfall_domain::experiment::Report;
use forfall_e2e::*;

const POLICY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/policies/fee-free-reminder.toml");

fn args(debtors: u64, seed: u64, out: std::path::PathBuf) -> SimulateArgs {
    SimulateArgs {
        debtors,
        seed,
        policy: Some(POLICY.into()),
        model: None,
        experiment: None,
        due: day(2026, 3, 4),
        out,
        pipeline: false,
        fit_model: None,
    }
}

/// What a report says of each variant, in numbers a credit controller reads.
fn counts(r: &Report) -> Vec<serde_json::Value> {
    r.variants
        .iter()
        .map(|v| {
            serde_json::json!({
                "variant": v.variant,
                "debtors": v.debtors,
                "invoices": v.invoices,
                "metrics": v.metrics.iter().map(|(k, m)| (k.to_string(), m.count)).collect::<std::collections::BTreeMap<_, _>>(),
                "fees": v.fees_minor,
                "messages": v.messages,
                "paid": v.days_to_payment.as_ref().map(|d| d.paid),
                "mean_days": v.days_to_payment.as_ref().map(|d| d.mean),
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_pipeline_lives_the_domain_cores_lives_and_the_report_finds_the_models_effect() -> anyhow::Result<()> {
    let model = BehaviourModel::default();
    let law = forfall_domain::law::LawBook::builtin()?;
    let (debtors, seed) = (600, 2026);
    let out = std::env::temp_dir().join(format!("forfall-sim-{}", uuid::Uuid::new_v4().simple()));
    let figment = forfall_platform::config::figment(Some(std::path::Path::new("/nonexistent/forfall.toml")));
    let fitted = out.join("propensity-model.json");
    let run_args = SimulateArgs {
        fit_model: Some(fitted.clone()),
        ..args(debtors, seed, out.clone())
    };
    let (policy, _) = simulate::policy_and_law(&figment, run_args.policy.as_deref(), simulate::issue_day(&run_args))?;

    // The effect itself: the domain core on a base large enough to pin it down (another seed).
    let truth = simulate::run(&args(100_000, 1, out.join("truth")), &policy, &law, &model)?;
    let truth = truth.report.expect("the experiment's report");
    let effect = truth.variants[1].versus_control.as_ref().expect("compared").differences["settled_before_fee"]
        .fixed
        .estimate;
    assert!(
        effect > 0.1,
        "the model's fee-free reminder settles more before any fee: {effect}"
    );

    let (piped, written) = simulate::pipeline::run(&run_args, base_config(), &policy, Some(POLICY), &model).await?;
    let written = written.expect("the experiment's report");
    let report = &written.report;
    assert_eq!(piped.debtors, debtors);
    assert_eq!(
        piped.settled + piped.handed_over,
        debtors,
        "every debtor paid or reached the agency: {piped:?}"
    );

    // The same debtors, the same lives, through the domain core alone.
    let core = simulate::run(&run_args, &policy, &law, &model)?;
    assert_eq!(
        counts(report),
        counts(core.report.as_ref().expect("the report")),
        "the pipeline and the domain core differ"
    );
    assert_eq!(piped.by_payer, core.by_payer);
    // Disputes (settled by the creditor, then the journey goes on) and payments in two parts
    // happened, the same in both.
    assert!(piped.disputed > 0 && piped.paid_in_parts > 0, "{piped:?}");
    assert_eq!(
        (piped.disputed, piped.paid_in_parts),
        (core.disputed, core.paid_in_parts)
    );

    let no_fee = &report.variants[1];
    assert_eq!(no_fee.variant, "no-fee");
    let found = &no_fee.versus_control.as_ref().expect("compared").differences["settled_before_fee"].fixed;
    assert!(
        found.interval.contains(effect),
        "the report's interval {:?} misses the model's effect {effect}",
        found.interval
    );
    assert!(found.interval.low > 0.0, "the effect is found: {:?}", found.interval);
    let sample_ratio = report.sample_ratio.as_ref().expect("a sample-ratio check");
    assert!(!sample_ratio.mismatch, "{sample_ratio:?}");
    assert!(std::fs::read_to_string(&written.html)?.contains("<svg"));

    // The propensity model fitted from the run's topics: every debtor's plan choice recorded
    // its inputs, and every journey ended paid or handed over, so each is a labelled sample.
    let model: forfall_domain::propensity::PropensityModel = serde_json::from_slice(&std::fs::read(&fitted)?)?;
    model.check()?;
    assert_eq!(
        model.metrics.trained_on + model.metrics.tested_on,
        debtors,
        "{:?}",
        model.metrics
    );
    assert!(
        (0.0..=1.0).contains(&model.metrics.auc) && model.metrics.brier < 0.25,
        "{:?}",
        model.metrics
    );
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}
