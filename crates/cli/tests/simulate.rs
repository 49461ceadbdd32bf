//! The simulator on the example experiment (`deploy/policies/fee-free-reminder.toml`): the
//! same seed gives the same run, the payer types come out as the behaviour model makes them,
//! and the report finds an effect the model puts in, and none where the model puts none.

use forfall::simulate::{Outcome, SimulateArgs, run};
use forfall_domain::behaviour::BehaviourModel;
use forfall_domain::law::LawBook;
use forfall_domain::policy::{self, Policy};

fn policy(law: &LawBook) -> Policy {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/policies/fee-free-reminder.toml"
    );
    let text = std::fs::read_to_string(path).expect("the example policy");
    policy::load(
        &text,
        law,
        chrono::NaiveDate::from_ymd_opt(2026, 2, 18).expect("a date"),
    )
    .expect("lawful")
}

fn simulate(debtors: u64, seed: u64, model: &BehaviourModel) -> Outcome {
    let law = LawBook::builtin().expect("the law book");
    let args = SimulateArgs {
        debtors,
        seed,
        policy: None,
        model: None,
        experiment: None,
        due: chrono::NaiveDate::from_ymd_opt(2026, 3, 4).expect("a date"),
        out: std::env::temp_dir(),
        pipeline: false,
        fit_model: None,
    };
    run(&args, &policy(&law), &law, model).expect("the run")
}

#[test]
fn the_same_seed_gives_the_same_run_and_payer_types_behave_as_modelled() {
    let model = BehaviourModel::default();
    let a = simulate(4_000, 11, &model);
    let b = simulate(4_000, 11, &model);
    assert_eq!(
        serde_json::to_value(&a.report).unwrap(),
        serde_json::to_value(&b.report).unwrap()
    );
    assert_eq!(a.by_payer, b.by_payer);
    let c = simulate(4_000, 12, &model);
    assert_ne!(a.by_payer, c.by_payer, "another seed, another base");
    let (early, _, early_handed) = a.by_payer["early"];
    assert_eq!(a.by_payer["early"].1, early, "early payers all pay before any fee");
    assert_eq!(early_handed, 0);
    let (unwilling, unwilling_before_fee, unwilling_handed) = a.by_payer["unwilling"];
    assert!(
        unwilling_handed * 2 > unwilling,
        "most unwilling debtors reach the agency: {:?}",
        a.by_payer
    );
    assert!(unwilling_before_fee * 4 < unwilling);
    assert_eq!(
        a.settled + a.handed_over,
        a.debtors,
        "every journey ends paid or at the agency"
    );
}

/// The model's fee lift is the only difference the fee makes to behaviour: with a strong one
/// the variant without fees sends measurably more debtors to the agency, and with none the
/// report's always-valid interval holds zero.
#[test]
fn the_report_finds_the_effect_the_model_puts_in_and_none_where_it_puts_none() {
    let handed_over = |fee_lift: f64| {
        let model = BehaviourModel {
            fee_lift,
            ..BehaviourModel::default()
        };
        let outcome = simulate(30_000, 5, &model);
        let report = outcome.report.expect("the policy has an experiment");
        assert!(!report.sample_ratio.expect("two variants").mismatch);
        let no_fee = report.variants.iter().find(|v| v.variant == "no-fee").expect("variant");
        no_fee.versus_control.as_ref().expect("compared").differences["handed_over"].clone()
    };
    let strong = handed_over(3.0);
    assert!(
        strong.significant() && strong.sequential.estimate > 0.0,
        "without fees more reach the agency when fees pull hard: {strong:?}"
    );
    let none = handed_over(1.0);
    assert!(
        none.sequential.interval.contains(0.0),
        "no effect, none found: {none:?}"
    );
}

/// The propensity model fitted on the simulator's customer base tells its payer types apart on
/// invoices it was not fitted to: AUC well above chance, and early payers score above the
/// unwilling.
#[test]
fn a_model_trained_on_simulated_debtors_separates_the_payer_types() {
    use forfall_domain::behaviour::PayerType;
    let law = LawBook::builtin().expect("the law book");
    let policy = policy(&law);
    let args = SimulateArgs {
        debtors: 20_000,
        seed: 21,
        policy: None,
        model: None,
        experiment: None,
        due: chrono::NaiveDate::from_ymd_opt(2026, 3, 4).expect("a date"),
        out: std::env::temp_dir(),
        pipeline: false,
        fit_model: None,
    };
    let mut samples = Vec::new();
    let mut by_payer: Vec<(PayerType, forfall_domain::propensity::Features)> = Vec::new();
    forfall::simulate::for_each(&args, &policy, &law, &BehaviourModel::default(), |_, s| {
        samples.push((s.features.vector(), s.story.settled_days.is_some()));
        by_payer.push((s.payer, s.features));
    })
    .expect("the run");
    let model = forfall::model::fit(&samples, "test").expect("a fit");
    model.check().expect("a model this version can score with");
    assert!(model.metrics.auc > 0.75, "held-out AUC {}", model.metrics.auc);
    assert!(model.metrics.brier < model.metrics.base_rate * (1.0 - model.metrics.base_rate));
    assert_eq!(model.metrics.tested_on, 4_000);
    let mean = |payer: PayerType| {
        let scores: Vec<f64> = by_payer
            .iter()
            .filter(|(p, _)| *p == payer)
            .map(|(_, f)| f64::from(model.score(f)))
            .collect();
        scores.iter().sum::<f64>() / scores.len() as f64
    };
    assert!(
        mean(PayerType::Early) > mean(PayerType::Unwilling) + 20.0,
        "early {} vs unwilling {}",
        mean(PayerType::Early),
        mean(PayerType::Unwilling)
    );
    // What decides who pays here: the debtor's own history (days late, late invoices), and an
    // e-mail address (the example's nudges and friendly reminders go by e-mail only, so a
    // debtor without one hears nothing before the agency).
    let top = model.top_features();
    let weight = |name: &str| top.iter().find(|(n, _)| n == name).map(|(_, w)| *w);
    assert!(
        top[..3]
            .iter()
            .any(|(n, _)| n == "avg_days_late" || n == "late_last_12m"),
        "{top:?}"
    );
    assert!(weight("avg_days_late").is_some_and(|w| w < 0.0), "{top:?}");
    assert!(weight("has_email").is_some_and(|w| w > 0.0), "{top:?}");
}
