//! `forfall simulate --pipeline`: the synthetic base and the behaviour model through the real
//! services on the dev stack (ingest, watcher, dispatch with the mail sink and an SMS provider's
//! stand-in, matcher, hand-off), on a simulated clock moved a day at a time. Billing issues each
//! debtor's invoice; each day the watcher fires what falls due, dispatch sends it, and the
//! debtors who got a message decide, as the model says, whether and when to pay; the bank's
//! payments go to the matcher. Each day ends only once the pipeline has provably handled it
//! (no timer due left, every message's outcome on record, every payment's journey closed).
//! The report is then read from the topics, as `forfall experiment report` reads a real run.
//!
//! A debtor draws from a generator of its own in the same order as in the domain-core mode, so
//! the same seed gives the same debtors the same lives: where the services and the domain core
//! agree, both modes report the same counts.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use forfall_devsinks::sms::{Provider, SmsProviderSim};
use forfall_domain::behaviour::{BehaviourModel, MessageSeen};
use forfall_domain::invoice::epoch_days;
use forfall_domain::journey::Tone;
use forfall_domain::policy::Policy;
use forfall_platform::clock::ManualClock;
use forfall_platform::config::{CommonConfig, Profile};
use forfall_platform::records::{
    DispatchOutcome, DispatchStatus, InvoiceIssued, JourneyAction, JourneyEvent, PaymentReceived, new_event_id,
};
use futures::StreamExt;
use rand::rngs::StdRng;

use super::{Drawn, Outcome, SimulateArgs};
use crate::devstack::{LocalStack, TopicTail};
use crate::experiment::{ReportArgs, Written};

/// DEV ONLY: the SMS stand-in's GatewayAPI token.
const SMS_TOKEN: &str = "forfall-sim-gatewayapi-token";
/// How long one simulated day may take the pipeline before the run gives up.
const DAY_PATIENCE: Duration = Duration::from_secs(120);
/// Debtors still open this long after the due date are left where they are.
const HORIZON_DAYS: i64 = 150;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Open,
    Paid,
    HandedOver,
}

/// One simulated debtor as the run goes.
struct Life {
    drawn: Drawn,
    rng: StdRng,
    pays_on: Option<i64>,
    fees_minor: i64,
    fate: Fate,
}

/// Noon UTC: after every Nordic jurisdiction's morning send time, within its contact hours.
fn noon(day: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&day.and_hms_opt(12, 0, 0).unwrap_or_default())
}

fn issued_record(drawn: &Drawn, now: DateTime<Utc>) -> InvoiceIssued {
    let i = &drawn.invoice;
    InvoiceIssued {
        event_id: new_event_id(),
        tenant: i.tenant.clone(),
        debtor_id: i.debtor_id.clone(),
        occurred_at: now.timestamp_millis(),
        invoice_id: i.invoice_id.clone(),
        revision: i.revision,
        invoice_number: i.invoice_number.clone(),
        issue_date: i.issue_date_days,
        due_date: i.due_date_days,
        amount_minor: i.amount_minor,
        currency: i.currency.clone(),
        jurisdiction: i.jurisdiction.clone(),
        debtor_kind: i.debtor_kind.clone(),
        payment_reference: i.payment_reference.clone(),
        description: i.description.clone(),
        debtor_name: i.contact.name.clone(),
        email: i.contact.email.clone(),
        phone: i.contact.phone.clone(),
        language: i.contact.language.clone(),
        preferred_channels: i.contact.preferred_channels.clone(),
        declined_channels: i.contact.declined_channels.clone(),
        debtor_details: None,
        reminder_fee_agreed: Some(i.reminder_fee_agreed),
    }
}

/// Whether dispatch is done with `action`: a message went out (or was suppressed), or every
/// channel it may use failed. Dispatch tries the next channel only after a certain failure.
fn settled(action: &JourneyAction, outcomes: &[DispatchOutcome]) -> bool {
    let failed = outcomes.iter().filter(|o| o.status == DispatchStatus::Failed).count();
    outcomes.iter().any(|o| o.status != DispatchStatus::Failed) || failed >= action.channels.len().max(1)
}

/// The channel a message reached the debtor on, if any.
fn reached(outcomes: &[DispatchOutcome]) -> Option<&str> {
    outcomes
        .iter()
        .find(|o| matches!(o.status, DispatchStatus::Sent | DispatchStatus::Delivered))
        .map(|o| o.channel.as_str())
}

/// Waits until `check` holds, reading on; `what` names what it waited for if it never does.
async fn until(what: String, mut check: impl AsyncFnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + DAY_PATIENCE;
    while !check().await? {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the pipeline did not get there within {DAY_PATIENCE:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// What the run read from the topics so far.
struct Watch {
    actions: TopicTail,
    outcomes: TopicTail,
    events: TopicTail,
    /// Dispatch's outcomes by action (some may be read before their action).
    outcomes_of: HashMap<String, Vec<DispatchOutcome>>,
    /// Journey events of interest by invoice: opened, paid, handed over.
    opened: std::collections::HashSet<String>,
    paid: std::collections::HashSet<String>,
    handed_over: std::collections::HashSet<String>,
}

impl Watch {
    async fn read_events(&mut self) -> anyhow::Result<()> {
        for e in self.events.next::<JourneyEvent>().await? {
            match e.kind.as_str() {
                "plan_chosen" => self.opened.insert(e.invoice_id),
                "paid" => self.paid.insert(e.invoice_id),
                "handed_over" => self.handed_over.insert(e.invoice_id),
                _ => false,
            };
        }
        Ok(())
    }

    async fn read_outcomes(&mut self) -> anyhow::Result<()> {
        for o in self.outcomes.next::<DispatchOutcome>().await? {
            self.outcomes_of.entry(o.action_id.clone()).or_default().push(o);
        }
        Ok(())
    }
}

/// Runs the simulation through the pipeline; the report goes to `args.out`.
pub async fn run(
    args: &SimulateArgs,
    mut common: CommonConfig,
    policy: &Policy,
    policy_file: Option<&str>,
    model: &BehaviourModel,
) -> anyhow::Result<(Outcome, Option<Written>)> {
    // The dev stack, its stand-ins and their published secrets.
    common.profile = Profile::Development;
    // The run's own progress is the output; service logs only for errors (RUST_LOG overrides):
    // thousands of messages at once make dispatch wait out many a journey not yet saved.
    if common.log.level == "info" {
        common.log.level = "error".into();
    }
    let started = Instant::now();
    let experiment = super::experiment(policy, args.experiment.as_deref())?;
    let first_day = super::issue_day(args);
    let clock = ManualClock::new(noon(first_day));
    let mut stack = LocalStack::start(common, clock.clone()).await?;
    if let Some(p) = policy_file {
        stack.set("watcher.policy_file", p);
    }
    let sms = SmsProviderSim::start(Provider::GatewayApi, "", SMS_TOKEN).await?;
    stack.set("dispatch.sms.provider", "gatewayapi");
    stack.set("dispatch.sms.gatewayapi.url", sms.url());
    stack.set("dispatch.sms.gatewayapi.token", SMS_TOKEN);
    stack.set("dispatch.sms.gatewayapi.sender", "Forfall");
    stack.start_all();
    stack.wait_ready(&crate::TARGETS, Duration::from_secs(60)).await?;
    let result = drive(args, &stack, &clock, model, first_day, started).await;
    let result = match (result, experiment) {
        (Ok(outcome), Some(e)) => {
            let written = crate::experiment::report(
                &stack.rt,
                &ReportArgs {
                    name: e.name.clone(),
                    policy: policy_file.map(Into::into),
                    out: args.out.clone(),
                    alpha: 0.05,
                },
            )
            .await;
            written.map(|w| (outcome, Some(w)))
        }
        (Ok(outcome), None) => Ok((outcome, None)),
        (Err(e), _) => Err(e),
    };
    stack.shutdown().await;
    let (mut outcome, written) = result?;
    outcome.report = written.as_ref().map(|w| w.report.clone());
    outcome.wall_seconds = started.elapsed().as_secs_f64();
    outcome.debtors_per_second = args.debtors as f64 / outcome.wall_seconds.max(1e-9);
    outcome.peak_rss_mib = super::peak_rss_mib();
    Ok((outcome, written))
}

/// Issues the invoices, then moves the clock a day at a time until every debtor has paid or
/// been handed over (or the horizon is reached).
async fn drive(
    args: &SimulateArgs,
    stack: &LocalStack,
    clock: &ManualClock,
    model: &BehaviourModel,
    first_day: NaiveDate,
    started: Instant,
) -> anyhow::Result<Outcome> {
    let topics = stack.topics();
    let mut watch = Watch {
        actions: stack.tail(&stack.topic(&topics.journey_actions)).await?,
        outcomes: stack.tail(&stack.topic(&topics.dispatch_outcomes)).await?,
        events: stack.tail(&stack.topic(&topics.journey_events)).await?,
        outcomes_of: HashMap::new(),
        opened: Default::default(),
        paid: Default::default(),
        handed_over: Default::default(),
    };
    let mut lives = Vec::new();
    for i in 0..args.debtors {
        let mut rng = super::debtor_rng(args.seed, i);
        let drawn = super::draw(i, args, model, &mut rng)?;
        lives.push(Life {
            pays_on: drawn.own_payment_day,
            drawn,
            rng,
            fees_minor: 0,
            fate: Fate::Open,
        });
    }
    let by_invoice: HashMap<String, usize> = lives
        .iter()
        .enumerate()
        .map(|(n, l)| (l.drawn.invoice.invoice_id.clone(), n))
        .collect();

    // Billing's run: every invoice, then every journey open.
    let billing = stack.topic(&topics.billing_invoice_events);
    let now = clock_now(clock);
    let mut sends = futures::stream::iter(lives.iter().map(|l| {
        let record = issued_record(&l.drawn, now);
        let billing = billing.clone();
        async move { stack.produce(&billing, &record.debtor_id, &record).await }
    }))
    .buffer_unordered(64);
    while let Some(sent) = sends.next().await {
        sent?;
    }
    drop(sends);
    eprintln!("issued {} invoices due {}", lives.len(), args.due);
    until(format!("every one of the {} journeys open", lives.len()), async || {
        watch.read_events().await?;
        Ok(lives.iter().all(|l| watch.opened.contains(&l.drawn.invoice.invoice_id)))
    })
    .await?;

    let payments = stack.topic(&topics.payments);
    let mut day = first_day;
    loop {
        let offset = (day - args.due).num_days();
        let open = lives.iter().filter(|l| l.fate == Fate::Open).count();
        if open == 0 || offset > HORIZON_DAYS {
            break;
        }
        clock.set(noon(day));
        // The day's steps: every timer due fired (its outputs acknowledged), every message's
        // outcome on record.
        until(format!("every timer due by noon of {day} fired"), async || {
            Ok(!stack.timers_due(noon(day)).await?)
        })
        .await?;
        let actions: Vec<JourneyAction> = watch.actions.next().await?;
        until(
            format!("the outcome of every one of the {} messages of {day}", actions.len()),
            async || {
                watch.read_outcomes().await?;
                Ok(actions
                    .iter()
                    .all(|a| watch.outcomes_of.get(&a.action_id).is_some_and(|o| settled(a, o))))
            },
        )
        .await?;
        watch.read_events().await?;
        for a in &actions {
            let Some(&n) = by_invoice.get(&a.invoice_id) else {
                continue;
            };
            let life = &mut lives[n];
            life.fees_minor += a.fee_minor;
            let Some(channel) = watch.outcomes_of.get(&a.action_id).and_then(|o| reached(o)) else {
                continue;
            };
            let tone = Tone::from_code(&a.tone)
                .ok_or_else(|| anyhow::anyhow!("action {} has an unknown tone '{}'", a.action_id, a.tone))?;
            let seen = MessageSeen {
                tone,
                sms: channel == "sms",
                fee_charged: a.fee_minor > 0,
                day: offset,
            };
            if let Some(pay_day) = model.respond(life.drawn.payer(), &seen, &mut life.rng) {
                life.pays_on = Some(life.pays_on.map_or(pay_day, |p| p.min(pay_day)));
            }
        }
        for life in &mut lives {
            if life.fate == Fate::Open && watch.handed_over.contains(&life.drawn.invoice.invoice_id) {
                life.fate = Fate::HandedOver;
            }
        }
        // The day's payments, in full (the invoice and the fees charged), and their journeys closed.
        let paying: Vec<usize> = (0..lives.len())
            .filter(|&n| lives[n].fate == Fate::Open && lives[n].pays_on.is_some_and(|p| p <= offset))
            .collect();
        for &n in &paying {
            let payment = payment_of(&lives[n], day, clock_now(clock));
            stack.produce(&payments, "bank", &payment).await?;
        }
        until(
            format!("the journeys of the {} payments of {day} closed", paying.len()),
            async || {
                watch.read_events().await?;
                Ok(paying
                    .iter()
                    .all(|&n| watch.paid.contains(&lives[n].drawn.invoice.invoice_id)))
            },
        )
        .await?;
        for &n in &paying {
            lives[n].fate = Fate::Paid;
        }
        if offset % 7 == 0 || !paying.is_empty() && offset < 0 {
            eprintln!(
                "day {offset:+} ({day}): {} open, {} paid, {} handed over, {:.0} s",
                watch_count(&lives, |f| f == Fate::Open),
                watch_count(&lives, |f| f == Fate::Paid),
                watch_count(&lives, |f| f == Fate::HandedOver),
                started.elapsed().as_secs_f64()
            );
        }
        day = day
            .succ_opt()
            .ok_or_else(|| anyhow::anyhow!("the calendar ends after {day}"))?;
    }
    Ok(tally(args, &lives))
}

fn clock_now(clock: &ManualClock) -> DateTime<Utc> {
    use forfall_platform::clock::Clock;
    clock.now()
}

fn watch_count(lives: &[Life], fate: impl Fn(Fate) -> bool) -> usize {
    lives.iter().filter(|l| fate(l.fate)).count()
}

fn payment_of(life: &Life, day: NaiveDate, now: DateTime<Utc>) -> PaymentReceived {
    let i = &life.drawn.invoice;
    PaymentReceived {
        event_id: new_event_id(),
        tenant: i.tenant.clone(),
        debtor_id: None,
        occurred_at: now.timestamp_millis(),
        payment_id: format!("sim-payment-{}", i.invoice_id),
        amount_minor: i.amount_minor + life.fees_minor,
        currency: i.currency.clone(),
        reference: i.payment_reference.clone(),
        remittance_text: None,
        payer_name: i.contact.name.clone(),
        payer_account: None,
        booking_date: epoch_days(day),
        value_date: epoch_days(day),
    }
}

/// The run's figures by payer type, as the domain-core mode counts them.
fn tally(args: &SimulateArgs, lives: &[Life]) -> Outcome {
    let mut outcome = Outcome::new(args);
    for life in lives {
        let paid = life.fate == Fate::Paid;
        outcome.count(
            life.drawn.payer(),
            paid,
            paid && life.fees_minor == 0,
            life.fate == Fate::HandedOver,
        );
    }
    outcome
}
