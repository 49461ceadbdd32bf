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

use chrono::{DateTime, NaiveDate, Timelike, Utc};
use clap::Args;
use forfall_domain::behaviour::{BehaviourModel, Habits, MessageSeen, PayerType};
use forfall_domain::experiment::{Collector, InvoiceFacts, Report};
use forfall_domain::history::{self, HistoryFacts};
use forfall_domain::invoice::{self, Contact, IssuedInput};
use forfall_domain::journey::{self, Emit, Journey, PauseLimits, Plan, TimerChange};
use forfall_domain::law::{DebtorContext, LawBook};
use forfall_domain::policy::{self, DebtorFacts, Policy};
use forfall_domain::propensity::Features;

use forfall_domain::{DebtorKind, Jurisdiction, Money};
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
    /// With `--pipeline`: also fit the propensity model on the run's topics, as `forfall model
    /// train --from-topics` would, and write it here.
    #[arg(long = "fit-model")]
    pub fit_model: Option<PathBuf>,
}

/// What a run found and cost.
#[derive(Debug, serde::Serialize)]
pub struct Outcome {
    pub debtors: u64,
    pub seed: u64,
    pub settled_before_any_fee: u64,
    pub settled: u64,
    pub handed_over: u64,
    /// Debtors who disputed the invoice, and who paid in two parts.
    pub disputed: u64,
    pub paid_in_parts: u64,
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
            disputed: 0,
            paid_in_parts: 0,
            by_payer: PayerType::ALL.iter().map(|p| (p.code(), (0, 0, 0))).collect(),
            wall_seconds: 0.0,
            debtors_per_second: 0.0,
            peak_rss_mib: None,
            report: None,
        }
    }

    /// One debtor's end.
    fn count(&mut self, end: &End) {
        let before_any_fee = end.settled && !end.charged_a_fee;
        self.settled += u64::from(end.settled);
        self.settled_before_any_fee += u64::from(before_any_fee);
        self.handed_over += u64::from(end.handed_over);
        self.disputed += u64::from(end.disputed);
        self.paid_in_parts += u64::from(end.paid_in_parts);
        if let Some(row) = self.by_payer.get_mut(end.payer.code()) {
            row.0 += 1;
            row.1 += u64::from(before_any_fee);
            row.2 += u64::from(end.handed_over);
        }
    }
}

/// How one debtor's invoice ended.
struct End {
    payer: PayerType,
    /// Paid in full.
    settled: bool,
    charged_a_fee: bool,
    handed_over: bool,
    disputed: bool,
    paid_in_parts: bool,
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
    (j.local_day(at) - due).num_days()
}

/// Debtor `i` as drawn: who they are, their invoice as billing issues it, whether they were
/// late before, and when they would pay with no message at all.
pub struct Drawn {
    debtor: Debtor,
    pub invoice: IssuedInput,
    pub late_last_12m: u32,
    /// The rest of their history with the creditor, summed up.
    pub history: HistoryFacts,
    /// Days after the due date (negative: before), if ever.
    pub own_payment_day: Option<i64>,
    /// Whether they will dispute, and pay in two parts.
    pub habits: Habits,
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
    // Their past with the creditor; late is what needed a reminder (a week past due, or never
    // paid), counted over the last 12 months as the watcher counts it.
    let issued = issue_day(args);
    let amount = Money::new(debtor.amount_minor, debtor.jurisdiction.home_currency());
    let past = model.draw_history(debtor.payer, history::euro_cents(amount), issued, rng);
    let year_ago = issued - chrono::Duration::days(365);
    let late_last_12m = past
        .iter()
        .filter(|r| r.issued >= year_ago && r.days_late.is_none_or(|d| d > 7))
        .count() as u32;
    let history = HistoryFacts::of(&past, issued);
    let own_payment_day = model.own_payment_day(debtor.payer, rng);
    let habits = model.draw_habits(debtor.payer, rng);
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
        history,
        own_payment_day,
        habits,
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
    let features = Features::of(&snapshot, facts.late_last_12m, drawn.history);
    let (d, plan) = forfall_watcher::opened(policy, snapshot, &facts, issued);
    let story = InvoiceFacts {
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
    let mut life = Life {
        plan: &plan,
        law,
        limits: &policy.pauses,
        model,
        ctx: DebtorContext {
            jurisdiction: debtor.jurisdiction,
            kind: debtor.kind,
            fee_agreed_in_advance: debtor.fee_agreed,
        },
        debtor,
        habits: drawn.habits,
        due,
        journey: d.journey,
        timer: None,
        story,
        pays_on: drawn.own_payment_day,
        dispute_on: None,
        resolve_on: None,
        paid_in_part: false,
        reached_before: false,
    };
    life.follow(&d.timer);
    let mut last_day = i64::MIN;
    while !life.journey.state.is_final() {
        // The next day anything happens: a step, the dispute or its settling, a payment (none
        // while the invoice is disputed).
        let payment = if life.resolve_on.is_some() { None } else { life.pays_on };
        let step = life.timer.map(|(_, at)| day_of(at, due, debtor.jurisdiction));
        let Some(next) = [step, payment, life.dispute_on, life.resolve_on]
            .into_iter()
            .flatten()
            .min()
        else {
            break;
        };
        let today = next.max(last_day);
        if today > HORIZON_DAYS {
            break;
        }
        last_day = today;
        // A day goes as the pipeline mode runs it: the day's steps, the creditor settling a
        // dispute (and a step that falls due again with it), a new dispute, the payment.
        life.fire_due(today, rng)?;
        if life.resolve_on == Some(today) {
            life.resolve_on = None;
            life.request(
                today,
                "sim-dispute-resolved",
                journey::Request::DisputeResolved { resolution: None },
            );
            life.fire_due(today, rng)?;
        }
        if life.dispute_on == Some(today) && !life.journey.state.is_final() {
            life.dispute_on = None;
            life.request(today, "sim-dispute", journey::Request::Dispute { reason: None });
            life.story.disputed = true;
            life.resolve_on = life
                .habits
                .dispute
                .map(|(_, resolved_after)| settling_day(debtor.jurisdiction, due, today + resolved_after));
        }
        if life.resolve_on.is_none() && life.pays_on.is_some_and(|p| p <= today) && !life.journey.state.is_final() {
            let outstanding = life.journey.outstanding();
            let part = match life.habits.part_payment_gap {
                Some(gap) if !life.paid_in_part && outstanding.minor >= 2 => Some((outstanding.minor / 2, gap)),
                _ => None,
            };
            if let Some((half, gap)) = part {
                life.pay(i, 1, Money::new(half, outstanding.currency))?;
                life.paid_in_part = true;
                life.pays_on = Some(today + gap);
            } else {
                life.pay(i, 2, outstanding)?;
                life.story.settled_days = Some(today);
            }
        }
    }
    Ok(Simulated {
        paid_in_parts: life.paid_in_part,
        story: life.story,
        payer: debtor.payer,
        features,
    })
}

/// The day (after the due date) the creditor's staff settle a dispute planned for `day`: the
/// next banking day in the debtor's calendar, when they work.
pub fn settling_day(j: Jurisdiction, due: NaiveDate, day: i64) -> i64 {
    let date = forfall_domain::calendar::roll_forward(j, due + chrono::Duration::days(day));
    (date - due).num_days()
}

/// Debtors still open this many days after the due date are left where they are.
pub const HORIZON_DAYS: i64 = 150;

/// One debtor's invoice as the domain core lives it.
struct Life<'a> {
    plan: &'a Plan,
    law: &'a LawBook,
    limits: &'a PauseLimits,
    model: &'a BehaviourModel,
    ctx: DebtorContext,
    debtor: &'a Debtor,
    habits: Habits,
    due: NaiveDate,
    journey: Journey,
    /// The next step and when it falls due.
    timer: Option<(usize, DateTime<Utc>)>,
    story: InvoiceFacts,
    /// Days after the due date (negative: before).
    pays_on: Option<i64>,
    dispute_on: Option<i64>,
    resolve_on: Option<i64>,
    paid_in_part: bool,
    /// Whether a message has reached the debtor yet (the first may start a dispute).
    reached_before: bool,
}

impl Life<'_> {
    fn follow(&mut self, change: &TimerChange) {
        match change {
            TimerChange::Schedule { step_index, fire_at } => self.timer = Some((*step_index, *fire_at)),
            TimerChange::Cancel => self.timer = None,
            TimerChange::Keep => {}
        }
    }

    /// Every step due by the end of day `today` (days after the due date), as the watcher fires them.
    fn fire_due(&mut self, today: i64, rng: &mut StdRng) -> anyhow::Result<()> {
        let j = self.debtor.jurisdiction;
        while let Some((step_index, fire_at)) = self.timer {
            let step_day = day_of(fire_at, self.due, j);
            if step_day > today || self.journey.state.is_final() {
                break;
            }
            let local = fire_at.with_timezone(&j.time_zone());
            let fee = self
                .plan
                .steps
                .get(step_index)
                .map(|step| {
                    policy::step_fee(
                        step,
                        &self.ctx,
                        self.law,
                        self.journey.anchor_due(),
                        &self.journey.fee_dates,
                        local.date_naive(),
                    )
                })
                .unwrap_or_else(|| journey::StepFee::plain(Money::zero(self.journey.invoice.amount.currency)));
            let fees_before = self.journey.fees_minor;
            let d = journey::on_timer_with(self.journey.clone(), step_index, self.plan, fee, fire_at);
            self.journey = d.journey;
            self.follow(&d.timer);
            let charged = self.journey.fees_minor - fees_before;
            if charged > 0 {
                *self
                    .story
                    .fees
                    .entry(self.journey.invoice.amount.currency.code().to_owned())
                    .or_default() += charged;
            }
            match &d.emit {
                Some(Emit::Message { tone, channels, .. }) => {
                    let Some(channel) = channel_reached(channels, &self.debtor.contact) else {
                        continue;
                    };
                    *self.story.messages.entry(channel.clone()).or_default() += 1;
                    let seen = MessageSeen {
                        tone: *tone,
                        sms: channel == "sms",
                        fee_charged: charged > 0,
                        day: step_day,
                        local_hour: local.hour(),
                    };
                    self.seen(&seen, rng);
                }
                Some(Emit::Handoff { .. }) => self.story.handed_over = true,
                _ => {}
            }
        }
        Ok(())
    }

    /// A message reached the debtor: whether (and when) it gets them to pay, and whether the
    /// first one starts a dispute.
    fn seen(&mut self, seen: &MessageSeen, rng: &mut StdRng) {
        if let Some(day) = self.model.respond(self.debtor.payer, seen, rng) {
            self.pays_on = Some(self.pays_on.map_or(day, |p| p.min(day)));
        }
        if !self.reached_before {
            self.reached_before = true;
            self.dispute_on = self.habits.dispute.map(|(after, _)| seen.day + after);
        }
    }

    fn request(&mut self, today: i64, id: &str, request: journey::Request) {
        let date = self.due + chrono::Duration::days(today);
        let d = journey::on_request(self.journey.clone(), id, request, self.plan, self.limits, date);
        self.journey = d.journey;
        self.follow(&d.timer);
    }

    fn pay(&mut self, i: u64, n: u32, amount: Money) -> anyhow::Result<()> {
        let d = journey::on_payment(self.journey.clone(), &format!("sim-payment-{n}"), amount)
            .map_err(|e| anyhow::anyhow!("debtor {i}: {e}"))?;
        self.journey = d.journey;
        self.follow(&d.timer);
        Ok(())
    }
}

/// One simulated invoice: its story, its debtor's kind of payer, and what was known of the
/// debtor when the invoice arrived (a propensity model's inputs).
pub struct Simulated {
    pub story: InvoiceFacts,
    pub payer: PayerType,
    pub features: Features,
    /// Paid half first (and perhaps the rest later).
    pub paid_in_parts: bool,
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
    for_each(
        args,
        policy,
        law,
        model,
        |i,
         Simulated {
             story,
             payer,
             paid_in_parts,
             ..
         }| {
            outcome.count(&End {
                payer,
                settled: story.settled_days.is_some(),
                charged_a_fee: story.fees.values().any(|f| *f > 0),
                handed_over: story.handed_over,
                disputed: story.disputed,
                paid_in_parts,
            });
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
        },
    )?;
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
        "settled before any fee {:.1} %, settled {:.1} %, handed over {:.1} %, disputed {:.1} %, paid in parts {:.1} %",
        share(outcome.settled_before_any_fee),
        share(outcome.settled),
        share(outcome.handed_over),
        share(outcome.disputed),
        share(outcome.paid_in_parts)
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
