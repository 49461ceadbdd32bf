//! `forfall simulate`: a synthetic customer base driven through the real policy, journey and
//! law code on a simulated clock, with debtors who behave as [`BehaviourModel`] says. This is
//! the domain-core mode, for millions of debtors in one process: each invoice's whole journey
//! (plan chosen, steps fired with their lawful fees, payment or hand-off) runs through
//! `forfall_domain::journey` and the watcher's own plan choice, and its story goes straight
//! into the experiment report. A seed makes a run repeatable, and each debtor draws from a
//! generator of its own (seeded from the run's seed and its number), so the pipeline mode
//! ([`pipeline`], `--pipeline`) gives the same debtors the same lives through the real services.

#[cfg(feature = "demo")]
pub mod pipeline;

use std::path::PathBuf;
use std::time::Instant;

use chrono::NaiveDate;
use clap::Args;
use forfall_domain::behaviour::{BehaviourModel, MessageSeen, PayerType};
use forfall_domain::experiment::{Collector, InvoiceFacts, Report};
use forfall_domain::invoice::{self, Contact, IssuedInput};
use forfall_domain::journey::{self, Emit, JourneyState, TimerChange};
use forfall_domain::law::{DebtorContext, LawBook};
use forfall_domain::policy::{self, DebtorFacts, Policy};
use forfall_domain::propensity::Features;
use forfall_domain::{DebtorKind, Jurisdiction};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// How many debtors (one invoice each, all due on `--due`).
    #[arg(long, default_value_t = 10_000)]
    pub debtors: u64,
    /// The same seed gives the same customer base and the same behaviour.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The policy to drive (default: the watcher's `watcher.policy_file`, else the built-in).
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// The behaviour model's parameters (TOML; every one has a stated default).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The experiment to report on (default: the policy's first).
    #[arg(long)]
    pub experiment: Option<String>,
    /// The due date of every invoice.
    #[arg(long, default_value = "2026-03-04")]
    pub due: NaiveDate,
    /// Where the experiment report goes (`<out>/<experiment>.json` and `.html`).
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    /// Through the real pipeline (every service, the broker, Redis, the mail and SMS stand-ins)
    /// on the dev stack, for thousands of debtors, instead of the domain core alone.
    #[arg(long)]
    pub pipeline: bool,
}

/// What a run found and cost.
#[derive(Debug, serde::Serialize)]
pub struct Outcome {
    pub debtors: u64,
    pub seed: u64,
    pub settled_before_any_fee: u64,
    pub settled: u64,
    pub handed_over: u64,
    /// Per payer type: debtors, settled before any fee, handed over.
    pub by_payer: std::collections::BTreeMap<&'static str, (u64, u64, u64)>,
    pub wall_seconds: f64,
    pub debtors_per_second: f64,
    /// The process's peak resident memory (Linux: VmHWM), in MiB.
    pub peak_rss_mib: Option<f64>,
    pub report: Option<Report>,
}

impl Outcome {
    fn new(args: &SimulateArgs) -> Self {
        Self {
            debtors: args.debtors,
            seed: args.seed,
            settled_before_any_fee: 0,
            settled: 0,
            handed_over: 0,
            by_payer: PayerType::ALL.iter().map(|p| (p.code(), (0, 0, 0))).collect(),
            wall_seconds: 0.0,
            debtors_per_second: 0.0,
            peak_rss_mib: None,
            report: None,
        }
    }

    /// One debtor's end: paid (without any fee charged, or after one), or handed over.
    fn count(&mut self, payer: PayerType, settled: bool, before_any_fee: bool, handed_over: bool) {
        self.settled += u64::from(settled);
        self.settled_before_any_fee += u64::from(before_any_fee);
        self.handed_over += u64::from(handed_over);
        if let Some(row) = self.by_payer.get_mut(payer.code()) {
            row.0 += 1;
            row.1 += u64::from(before_any_fee);
            row.2 += u64::from(handed_over);
        }
    }
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

pub fn load_model(path: Option<&std::path::Path>) -> anyhow::Result<BehaviourModel> {
    let model: BehaviourModel = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?;
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
        }
        None => BehaviourModel::default(),
    };
    model.check()?;
    Ok(model)
}

/// A debtor of the synthetic base: where, what kind, how much, how reachable.
struct Debtor {
    jurisdiction: Jurisdiction,
    kind: DebtorKind,
    amount_minor: i64,
    contact: Contact,
    fee_agreed: bool,
    payer: PayerType,
}

/// The generator of debtor `i`'s draws (who they are, then what they do), seeded from the run's
/// seed and the debtor's number, so that a debtor's life does not depend on the order in which
/// the debtors are simulated.
pub fn debtor_rng(seed: u64, i: u64) -> StdRng {
    StdRng::seed_from_u64(seed ^ i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// A phone number in the form of the debtor's country (E.164).
fn phone_number(j: Jurisdiction, i: u64) -> String {
    match j {
        Jurisdiction::DK => format!("+4520{:06}", i % 1_000_000),
        Jurisdiction::NO => format!("+4740{:06}", i % 1_000_000),
        Jurisdiction::SE => format!("+4670{:07}", i % 10_000_000),
        Jurisdiction::FI => format!("+35840{:07}", i % 10_000_000),
    }
}

/// A Nordic utility's mix: a third Danish, a fifth Norwegian, three in ten Swedish, the rest
/// Finnish; one in ten a business; bills of a few hundred to a few thousand in the home
/// currency (businesses ten times more); most reachable by e-mail and by phone.
fn draw_debtor(i: u64, model: &BehaviourModel, rng: &mut StdRng) -> Debtor {
    let u: f64 = rng.random();
    let (jurisdiction, language) = if u < 0.35 {
        (Jurisdiction::DK, "da")
    } else if u < 0.55 {
        (Jurisdiction::NO, "nb")
    } else if u < 0.85 {
        (Jurisdiction::SE, "sv")
    } else {
        (Jurisdiction::FI, "fi")
    };
    let kind = if rng.random::<f64>() < 0.1 {
        DebtorKind::Business
    } else {
        DebtorKind::Consumer
    };
    // Units of the home currency; the euro is worth about ten of the others.
    let units: i64 = rng.random_range(200..=3_000) * if kind == DebtorKind::Business { 10 } else { 1 };
    let amount_minor = if jurisdiction == Jurisdiction::FI {
        units * 10
    } else {
        units * 100
    };
    let email = rng.random::<f64>() < 0.95;
    let phone = rng.random::<f64>() < 0.85 || !email;
    Debtor {
        jurisdiction,
        kind,
        amount_minor,
        contact: Contact {
            name: Some(format!("Debtor {i}")),
            email: email.then(|| format!("d{i}@example.test")),
            phone: phone.then(|| phone_number(jurisdiction, i)),
            language: Some(language.into()),
            ..Contact::default()
        },
        fee_agreed: jurisdiction == Jurisdiction::SE && rng.random::<f64>() < 0.7,
        payer: model.draw_payer(rng),
    }
}

/// Days from `due` to the debtor's local day of `at`.
fn day_of(at: chrono::DateTime<chrono::Utc>, due: NaiveDate, j: Jurisdiction) -> i64 {
    (at.with_timezone(&j.time_zone()).date_naive() - due).num_days()
}

/// Debtor `i` as drawn: who they are, their invoice as billing issues it, whether they were
/// late before, and when they would pay with no message at all.
pub struct Drawn {
    debtor: Debtor,
    pub invoice: IssuedInput,
    pub late_last_12m: u32,
    /// Days after the due date (negative: before), if ever.
    pub own_payment_day: Option<i64>,
}

impl Drawn {
    pub fn payer(&self) -> PayerType {
        self.debtor.payer
    }

    pub fn jurisdiction(&self) -> Jurisdiction {
        self.debtor.jurisdiction
    }
}

/// Draws debtor `i` from its generator (the draws come first, in this order, in both modes).
pub fn draw(i: u64, args: &SimulateArgs, model: &BehaviourModel, rng: &mut StdRng) -> anyhow::Result<Drawn> {
    let debtor = draw_debtor(i, model, rng);
    // Who was late before: the short of cash and the unwilling, mostly.
    let late_last_12m = match debtor.payer {
        PayerType::Early => 0,
        PayerType::Forgetful => u32::from(rng.random::<f64>() < 0.3),
        PayerType::ShortOfCash => rng.random_range(0..=3),
        PayerType::Unwilling => rng.random_range(1..=4),
    };
    let own_payment_day = model.own_payment_day(debtor.payer, rng);
    let reference = forfall_domain::reference::generate(
        forfall_domain::reference::ReferenceKind::Rf,
        &format!("{}", 5_150_000_000u64 + i),
    )
    .map_err(|e| anyhow::anyhow!("debtor {i}'s payment reference: {e}"))?;
    let invoice = IssuedInput {
        tenant: SIM_TENANT.into(),
        debtor_id: format!("{SIM_TENANT}:d{i}"),
        invoice_id: format!("sim-{i}"),
        revision: 1,
        invoice_number: format!("S-{i}"),
        issue_date_days: invoice::epoch_days(issue_day(args)),
        due_date_days: invoice::epoch_days(args.due),
        amount_minor: debtor.amount_minor,
        currency: debtor.jurisdiction.home_currency().code().into(),
        jurisdiction: debtor.jurisdiction.code().into(),
        debtor_kind: match debtor.kind {
            DebtorKind::Consumer => "consumer",
            DebtorKind::Business => "business",
        }
        .into(),
        payment_reference: Some(reference.value),
        description: Some("Electricity".into()),
        contact: debtor.contact.clone(),
        reminder_fee_agreed: debtor.fee_agreed,
    };
    Ok(Drawn {
        debtor,
        invoice,
        late_last_12m,
        own_payment_day,
    })
}

/// The tenant whose invoices the simulator issues.
pub const SIM_TENANT: &str = "sim";

/// The channel a message goes out on: the first of the step's channels (in the debtor's order of
/// preference) that the debtor has an address for, as dispatch falls back from one to the next.
pub fn channel_reached(channels: &[String], contact: &Contact) -> Option<String> {
    invoice::channels_for(channels, contact)
        .into_iter()
        .find(|c| match c.as_str() {
            "email" => contact.email.is_some(),
            "sms" => contact.phone.is_some(),
            _ => false,
        })
}

/// One debtor's invoice through its whole journey: its story for the report, and whether it
/// was settled before any fee.
fn simulate_one(
    i: u64,
    args: &SimulateArgs,
    policy: &Policy,
    law: &LawBook,
    model: &BehaviourModel,
    experiment: Option<&str>,
    rng: &mut StdRng,
) -> anyhow::Result<Simulated> {
    let drawn = draw(i, args, model, rng)?;
    let debtor = &drawn.debtor;
    let due = args.due;
    let issued = issue_day(args);
    let snapshot = invoice::validate_issued(drawn.invoice.clone()).map_err(|e| anyhow::anyhow!("debtor {i}: {e:?}"))?;
    let facts = DebtorFacts {
        jurisdiction: debtor.jurisdiction,
        kind: debtor.kind,
        late_last_12m: drawn.late_last_12m,
        propensity: None,
        amount: snapshot.amount,
        fee_agreed: debtor.fee_agreed,
    };
    let features = Features::of(&snapshot, facts.late_last_12m);
    let (mut d, plan) = forfall_watcher::opened(policy, snapshot, &facts, issued);
    let ctx = DebtorContext {
        jurisdiction: debtor.jurisdiction,
        kind: debtor.kind,
        fee_agreed_in_advance: debtor.fee_agreed,
    };
    let mut story = InvoiceFacts {
        variant: experiment.and_then(|name| {
            d.journey
                .experiment
                .as_deref()
                .and_then(|x| x.strip_prefix(name))
                .and_then(|x| x.strip_prefix('/'))
                .map(str::to_owned)
        }),
        debtor_id: Some(d.journey.invoice.debtor_id.clone()),
        ..InvoiceFacts::default()
    };
    let mut pays_on = drawn.own_payment_day;
    loop {
        let TimerChange::Schedule { step_index, fire_at } = d.timer.clone() else {
            // No step left (a plan without a hand-off): paid when the debtor pays, if ever.
            story.settled_days = pays_on;
            break;
        };
        let step_day = day_of(fire_at, due, debtor.jurisdiction);
        if let Some(day) = pays_on.filter(|day| *day < step_day) {
            let paid = journey::on_payment(d.journey.clone(), "sim-payment", d.journey.outstanding())
                .map_err(|e| anyhow::anyhow!("debtor {i}: {e}"))?;
            debug_assert!(matches!(paid.journey.state, JourneyState::Closed(_)));
            story.settled_days = Some(day);
            break;
        }
        let today = fire_at.with_timezone(&debtor.jurisdiction.time_zone()).date_naive();
        let fee = plan
            .steps
            .get(step_index)
            .map(|step| policy::step_fee(step, &ctx, law, d.journey.anchor_due(), &d.journey.fee_dates, today))
            .unwrap_or_else(|| journey::StepFee::plain(forfall_domain::Money::zero(d.journey.invoice.amount.currency)));
        let fees_before = d.journey.fees_minor;
        d = journey::on_timer_with(d.journey, step_index, &plan, fee, fire_at);
        let charged = d.journey.fees_minor - fees_before;
        if charged > 0 {
            *story
                .fees
                .entry(d.journey.invoice.amount.currency.code().to_owned())
                .or_default() += charged;
        }
        match &d.emit {
            Some(Emit::Message { tone, channels, .. }) => {
                if let Some(channel) = channel_reached(channels, &debtor.contact) {
                    *story.messages.entry(channel.clone()).or_default() += 1;
                    let seen = MessageSeen {
                        tone: *tone,
                        sms: channel == "sms",
                        fee_charged: charged > 0,
                        day: step_day,
                    };
                    if let Some(day) = model.respond(debtor.payer, &seen, rng) {
                        pays_on = Some(pays_on.map_or(day, |p| p.min(day)));
                    }
                }
            }
            Some(Emit::Handoff { .. }) => {
                story.handed_over = true;
                break;
            }
            _ => {}
        }
        if d.journey.state.is_final() {
            break;
        }
    }
    Ok(Simulated {
        story,
        payer: debtor.payer,
        features,
    })
}

/// One simulated invoice: its story, its debtor's kind of payer, and what was known of the
/// debtor when the invoice arrived (a propensity model's inputs).
pub struct Simulated {
    pub story: InvoiceFacts,
    pub payer: PayerType,
    pub features: Features,
}

/// Invoices one by one, for what needs each (training a model): `each` gets every one.
pub fn for_each(
    args: &SimulateArgs,
    policy: &Policy,
    law: &LawBook,
    model: &BehaviourModel,
    mut each: impl FnMut(u64, Simulated),
) -> anyhow::Result<()> {
    let name = experiment(policy, args.experiment.as_deref())?.map(|e| e.name.as_str());
    for i in 0..args.debtors {
        let mut rng = debtor_rng(args.seed, i);
        each(i, simulate_one(i, args, policy, law, model, name, &mut rng)?);
    }
    Ok(())
}

/// The experiment named (it must be in the policy), else the policy's first, if any.
pub fn experiment<'p>(policy: &'p Policy, name: Option<&str>) -> anyhow::Result<Option<&'p policy::Experiment>> {
    match name {
        Some(name) => named_experiment(policy, name).map(Some),
        None => Ok(policy.experiments.first()),
    }
}

pub use forfall_watcher::experiments::{named_experiment, variants};

/// Runs the simulation; progress goes to stderr about every tenth of the base.
pub fn run(args: &SimulateArgs, policy: &Policy, law: &LawBook, model: &BehaviourModel) -> anyhow::Result<Outcome> {
    let experiment = experiment(policy, args.experiment.as_deref())?;
    let started = Instant::now();
    let mut collector = Collector::default();
    let mut outcome = Outcome::new(args);
    let tenth = (args.debtors / 10).max(1);
    for_each(args, policy, law, model, |i, Simulated { story, payer, .. }| {
        let paid_without_fee = story.settled_days.is_some() && story.fees.values().all(|f| *f == 0);
        outcome.count(payer, story.settled_days.is_some(), paid_without_fee, story.handed_over);
        collector.add_story(&story);
        if (i + 1) % tenth == 0 {
            let elapsed = started.elapsed().as_secs_f64();
            eprintln!(
                "simulated {} of {} debtors ({:.0} %), {:.0} debtors/s",
                i + 1,
                args.debtors,
                (i + 1) as f64 * 100.0 / args.debtors as f64,
                (i + 1) as f64 / elapsed.max(1e-9)
            );
        }
    })?;
    if let Some(e) = experiment {
        outcome.report = Some(collector.report(&e.name, &variants(e), 0.05)?);
    }
    outcome.wall_seconds = started.elapsed().as_secs_f64();
    outcome.debtors_per_second = args.debtors as f64 / outcome.wall_seconds.max(1e-9);
    outcome.peak_rss_mib = peak_rss_mib();
    Ok(outcome)
}

#[cfg(feature = "demo")]
fn through_pipeline(
    args: &SimulateArgs,
    figment: &figment::Figment,
    policy: &Policy,
    model: &BehaviourModel,
) -> anyhow::Result<Outcome> {
    let common = forfall_platform::config::common(figment)?;
    let settings: forfall_watcher::WatcherSettings = forfall_platform::config::section(figment, "watcher")?;
    let policy_file = match &args.policy {
        Some(p) => Some(std::fs::canonicalize(p)?.display().to_string()),
        None => settings.policy_file,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (outcome, _) = runtime.block_on(pipeline::run(args, common, policy, policy_file.as_deref(), model))?;
    Ok(outcome)
}

#[cfg(not(feature = "demo"))]
fn through_pipeline(_: &SimulateArgs, _: &figment::Figment, _: &Policy, _: &BehaviourModel) -> anyhow::Result<Outcome> {
    anyhow::bail!("--pipeline runs on the dev stack, which this build leaves out (the `demo` feature)")
}

/// The policy (`policy`, else the watcher's `watcher.policy_file`) and the law book, loaded and
/// checked as the watcher loads them, as of `on`.
pub fn policy_and_law(
    figment: &figment::Figment,
    policy: Option<&std::path::Path>,
    on: NaiveDate,
) -> anyhow::Result<(Policy, LawBook)> {
    let mut settings: forfall_watcher::WatcherSettings = forfall_platform::config::section(figment, "watcher")?;
    if let Some(p) = policy {
        settings.policy_file = Some(p.display().to_string());
    }
    let law = forfall_watcher::load_law(&settings)?;
    let policy = forfall_watcher::load_policy(&settings, &law, on)?;
    Ok((policy, law))
}

/// The day the simulated invoices are issued: the policy is read as of then.
pub fn issue_day(args: &SimulateArgs) -> NaiveDate {
    args.due - chrono::Duration::days(14)
}

/// The command: loads the policy and the model, runs, prints, writes the report.
pub fn command(args: SimulateArgs, figment: &figment::Figment) -> anyhow::Result<()> {
    let (policy, law) = policy_and_law(figment, args.policy.as_deref(), issue_day(&args))?;
    let model = load_model(args.model.as_deref())?;
    eprintln!(
        "simulating {} debtors (seed {}) on policy {}{}; behaviour: {}",
        args.debtors,
        args.seed,
        policy.version,
        if args.pipeline { " through the pipeline" } else { "" },
        serde_json::to_string(&model)?
    );
    let outcome = if args.pipeline {
        through_pipeline(&args, figment, &policy, &model)?
    } else {
        run(&args, &policy, &law, &model)?
    };
    let share = |n: u64| n as f64 * 100.0 / outcome.debtors.max(1) as f64;
    println!(
        "{} debtors in {:.1} s ({:.0} debtors/s), peak memory {}",
        outcome.debtors,
        outcome.wall_seconds,
        outcome.debtors_per_second,
        outcome
            .peak_rss_mib
            .map_or_else(|| "unknown".into(), |m| format!("{m:.0} MiB"))
    );
    println!(
        "settled before any fee {:.1} %, settled {:.1} %, handed over {:.1} %",
        share(outcome.settled_before_any_fee),
        share(outcome.settled),
        share(outcome.handed_over)
    );
    for (payer, (n, before_fee, handed)) in &outcome.by_payer {
        println!(
            "  {payer:<14} {n:>9} debtors, {:.1} % before any fee, {:.1} % handed over",
            *before_fee as f64 * 100.0 / (*n).max(1) as f64,
            *handed as f64 * 100.0 / (*n).max(1) as f64
        );
    }
    if let Some(report) = &outcome.report {
        print!("{}", forfall_watcher::experiment_page::summary(report));
        std::fs::create_dir_all(&args.out)?;
        let json = args.out.join(format!("{}.json", report.experiment));
        let html = args.out.join(format!("{}.html", report.experiment));
        std::fs::write(&json, serde_json::to_vec_pretty(report)?)?;
        std::fs::write(&html, forfall_watcher::experiment_page::page(report))?;
        println!("report: {}\n        {}", html.display(), json.display());
    }
    Ok(())
}
