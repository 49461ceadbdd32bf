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

use chrono::{DateTime, NaiveDate, TimeZone, Timelike, Utc};
use forfall_devsinks::sms::{Provider, SmsProviderSim};
use forfall_domain::behaviour::{BehaviourModel, MessageSeen};
use forfall_domain::invoice::epoch_days;
use forfall_domain::journey::Tone;
use forfall_domain::policy::Policy;
use forfall_platform::clock::ManualClock;
use forfall_platform::config::{CommonConfig, Profile};
use forfall_platform::records::{
    DebtorRequest, DispatchOutcome, DispatchStatus, InvoiceIssued, JourneyAction, JourneyEvent, PaymentReceived,
    new_event_id,
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
    /// Days after the due date (negative: before).
    pays_on: Option<i64>,
    dispute_on: Option<i64>,
    /// While disputed: the day the creditor settles it.
    resolve_on: Option<i64>,
    fees_minor: i64,
    paid_minor: i64,
    paid_in_part: bool,
    disputed: bool,
    reached_before: bool,
    fate: Fate,
}

impl Life {
    fn is_open(&self) -> bool {
        self.fate == Fate::Open
    }

    fn invoice_id(&self) -> &str {
        &self.drawn.invoice.invoice_id
    }

    fn outstanding(&self) -> i64 {
        self.drawn.invoice.amount_minor + self.fees_minor - self.paid_minor
    }
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
    /// The kinds of journey event each invoice has had (`plan_chosen`, `paid`, ...).
    events_of: HashMap<String, std::collections::HashSet<String>>,
}

impl Watch {
    async fn read_events(&mut self) -> anyhow::Result<()> {
        for e in self.events.next::<JourneyEvent>().await? {
            self.events_of.entry(e.invoice_id).or_default().insert(e.kind);
        }
        Ok(())
    }

    /// Whether the invoice's journey has had an event of `kind`.
    fn had(&self, invoice: &str, kind: &str) -> bool {
        self.events_of.get(invoice).is_some_and(|kinds| kinds.contains(kind))
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
    let result = match (result, &args.fit_model) {
        (Ok(done), Some(path)) => fit_model(&stack, path).await.map(|()| done),
        (other, _) => other,
    };
    stack.shutdown().await;
    let (mut outcome, written) = result?;
    outcome.report = written.as_ref().map(|w| w.report.clone());
    outcome.wall_seconds = started.elapsed().as_secs_f64();
    outcome.debtors_per_second = args.debtors as f64 / outcome.wall_seconds.max(1e-9);
    outcome.peak_rss_mib = super::peak_rss_mib();
    Ok((outcome, written))
}

/// Fits the propensity model on the run's journeys, read back from the topics.
async fn fit_model(stack: &LocalStack, path: &std::path::Path) -> anyhow::Result<()> {
    crate::model::train_from_topics(&stack.rt, Some(super::SIM_TENANT), path).await?;
    Ok(())
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
    let mut run = Run {
        stack,
        clock,
        model,
        watch: Watch {
            actions: stack.tail(&stack.topic(&topics.journey_actions)).await?,
            outcomes: stack.tail(&stack.topic(&topics.dispatch_outcomes)).await?,
            events: stack.tail(&stack.topic(&topics.journey_events)).await?,
            outcomes_of: HashMap::new(),
            events_of: HashMap::new(),
        },
        lives: Vec::new(),
        by_invoice: HashMap::new(),
        due: args.due,
    };
    for i in 0..args.debtors {
        let mut rng = super::debtor_rng(args.seed, i);
        let drawn = super::draw(i, args, model, &mut rng)?;
        run.by_invoice.insert(drawn.invoice.invoice_id.clone(), run.lives.len());
        run.lives.push(Life {
            pays_on: drawn.own_payment_day,
            drawn,
            rng,
            dispute_on: None,
            resolve_on: None,
            fees_minor: 0,
            paid_minor: 0,
            paid_in_part: false,
            disputed: false,
            reached_before: false,
            fate: Fate::Open,
        });
    }
    run.issue(args).await?;
    let mut day = first_day;
    loop {
        let offset = (day - args.due).num_days();
        if !run.lives.iter().any(Life::is_open) || offset > super::HORIZON_DAYS {
            break;
        }
        clock.set(noon(day));
        // A day goes as the domain core lives it: the day's steps, the creditor settling
        // disputes (and the steps that fall due again with them), new disputes, payments.
        run.steps(day, offset).await?;
        if run.settle_disputes(day, offset).await? {
            run.steps(day, offset).await?;
        }
        run.open_disputes(day, offset).await?;
        let paid = run.pay(day, offset).await?;
        if offset % 7 == 0 || paid > 0 && offset < 0 {
            let count = |fate| run.lives.iter().filter(|l| l.fate == fate).count();
            eprintln!(
                "day {offset:+} ({day}): {} open, {} paid, {} handed over, {:.0} s",
                count(Fate::Open),
                count(Fate::Paid),
                count(Fate::HandedOver),
                started.elapsed().as_secs_f64()
            );
        }
        day = day
            .succ_opt()
            .ok_or_else(|| anyhow::anyhow!("the calendar ends after {day}"))?;
    }
    Ok(tally(args, &run.lives))
}

/// The run under way: the stack, the debtors, and what was read back.
struct Run<'a> {
    stack: &'a LocalStack,
    clock: &'a ManualClock,
    model: &'a BehaviourModel,
    watch: Watch,
    lives: Vec<Life>,
    by_invoice: HashMap<String, usize>,
    due: NaiveDate,
}

impl Run<'_> {
    /// Billing's run: every invoice, then every journey open.
    async fn issue(&mut self, args: &SimulateArgs) -> anyhow::Result<()> {
        let billing = self.stack.topic(&self.stack.topics().billing_invoice_events);
        let now = clock_now(self.clock);
        let stack = self.stack;
        let mut sends = futures::stream::iter(self.lives.iter().map(|l| {
            let record = issued_record(&l.drawn, now);
            let billing = billing.clone();
            async move { stack.produce(&billing, &record.debtor_id, &record).await }
        }))
        .buffer_unordered(64);
        while let Some(sent) = sends.next().await {
            sent?;
        }
        drop(sends);
        eprintln!("issued {} invoices due {}", self.lives.len(), args.due);
        let (watch, lives) = (&mut self.watch, &self.lives);
        until(format!("every one of the {} journeys open", lives.len()), async || {
            watch.read_events().await?;
            Ok(lives.iter().all(|l| watch.had(l.invoice_id(), "plan_chosen")))
        })
        .await
    }

    /// The steps due by noon: every timer fired (its outputs acknowledged), every message's
    /// outcome on record, and the debtors' answers to those that reached them.
    async fn steps(&mut self, day: NaiveDate, offset: i64) -> anyhow::Result<()> {
        let stack = self.stack;
        until(format!("every timer due by noon of {day} fired"), async || {
            Ok(!stack.timers_due(noon(day)).await?)
        })
        .await?;
        let actions: Vec<JourneyAction> = self.watch.actions.next().await?;
        let watch = &mut self.watch;
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
        self.watch.read_events().await?;
        for a in &actions {
            let Some(&n) = self.by_invoice.get(&a.invoice_id) else {
                continue;
            };
            let life = &mut self.lives[n];
            life.fees_minor += a.fee_minor;
            let Some(channel) = self.watch.outcomes_of.get(&a.action_id).and_then(|o| reached(o)) else {
                continue;
            };
            let tone = Tone::from_code(&a.tone)
                .ok_or_else(|| anyhow::anyhow!("action {} has an unknown tone '{}'", a.action_id, a.tone))?;
            let send_at = DateTime::from_timestamp_millis(a.send_at)
                .ok_or_else(|| anyhow::anyhow!("action {} has no send time", a.action_id))?;
            let seen = MessageSeen {
                tone,
                sms: channel == "sms",
                fee_charged: a.fee_minor > 0,
                day: offset,
                local_hour: send_at.with_timezone(&life.drawn.jurisdiction().time_zone()).hour(),
            };
            if let Some(pay_day) = self.model.respond(life.drawn.payer(), &seen, &mut life.rng) {
                life.pays_on = Some(life.pays_on.map_or(pay_day, |p| p.min(pay_day)));
            }
            if !life.reached_before {
                life.reached_before = true;
                life.dispute_on = life.drawn.habits.dispute.map(|(after, _)| offset + after);
            }
        }
        for life in &mut self.lives {
            if life.is_open() && self.watch.had(life.invoice_id(), "handed_over") {
                life.fate = Fate::HandedOver;
            }
        }
        Ok(())
    }

    /// The debtors' requests of `kind` for the invoices `who`, each answered by a journey
    /// event of `answer`.
    async fn request(&mut self, day: NaiveDate, who: &[usize], kind: &str, answer: &str) -> anyhow::Result<()> {
        let topic = self.stack.topic(&self.stack.topics().debtor_requests);
        let now = clock_now(self.clock).timestamp_millis();
        for &n in who {
            let i = &self.lives[n].drawn.invoice;
            let request = DebtorRequest {
                event_id: new_event_id(),
                tenant: i.tenant.clone(),
                debtor_id: i.debtor_id.clone(),
                occurred_at: now,
                invoice_id: i.invoice_id.clone(),
                kind: kind.to_owned(),
                new_due_date: None,
                promise_date: None,
                instalments: Vec::new(),
                reason: None,
                // The debtor disputes on their page; the creditor's staff settle it.
                source: if kind == "dispute" { "portal" } else { "staff" }.to_owned(),
            };
            self.stack.produce(&topic, &request.debtor_id, &request).await?;
        }
        let (watch, lives) = (&mut self.watch, &self.lives);
        until(
            format!("the {} '{kind}' requests of {day} answered", who.len()),
            async || {
                watch.read_events().await?;
                Ok(who.iter().all(|&n| watch.had(lives[n].invoice_id(), answer)))
            },
        )
        .await
    }

    /// The disputes the creditor settles today; whether there were any.
    async fn settle_disputes(&mut self, day: NaiveDate, offset: i64) -> anyhow::Result<bool> {
        let who: Vec<usize> = (0..self.lives.len())
            .filter(|&n| self.lives[n].is_open() && self.lives[n].resolve_on == Some(offset))
            .collect();
        if who.is_empty() {
            return Ok(false);
        }
        self.request(day, &who, "dispute_resolved", "dispute_resolved").await?;
        for &n in &who {
            self.lives[n].resolve_on = None;
        }
        Ok(true)
    }

    async fn open_disputes(&mut self, day: NaiveDate, offset: i64) -> anyhow::Result<()> {
        let who: Vec<usize> = (0..self.lives.len())
            .filter(|&n| self.lives[n].is_open() && self.lives[n].dispute_on == Some(offset))
            .collect();
        if who.is_empty() {
            return Ok(());
        }
        self.request(day, &who, "dispute", "disputed").await?;
        for &n in &who {
            let life = &mut self.lives[n];
            life.dispute_on = None;
            life.disputed = true;
            let (j, due) = (life.drawn.jurisdiction(), self.due);
            life.resolve_on = life
                .drawn
                .habits
                .dispute
                .map(|(_, resolved_after)| super::settling_day(j, due, offset + resolved_after));
        }
        Ok(())
    }

    /// The day's payments (half first for those who pay in parts, else what is owed: the
    /// invoice and the fees charged, less what was paid), and their journeys' answers; how many.
    async fn pay(&mut self, day: NaiveDate, offset: i64) -> anyhow::Result<usize> {
        let payments = self.stack.topic(&self.stack.topics().payments);
        let paying: Vec<usize> = (0..self.lives.len())
            .filter(|&n| {
                let l = &self.lives[n];
                l.is_open() && l.resolve_on.is_none() && l.pays_on.is_some_and(|p| p <= offset)
            })
            .collect();
        let mut in_full = Vec::new();
        let mut in_part = Vec::new();
        for &n in &paying {
            let life = &mut self.lives[n];
            let outstanding = life.outstanding();
            let amount = match life.drawn.habits.part_payment_gap {
                Some(gap) if !life.paid_in_part && outstanding >= 2 => {
                    life.paid_in_part = true;
                    life.pays_on = Some(offset + gap);
                    in_part.push(n);
                    outstanding / 2
                }
                _ => {
                    in_full.push(n);
                    outstanding
                }
            };
            life.paid_minor += amount;
            let payment = payment_of(life, amount, day, clock_now(self.clock));
            self.stack.produce(&payments, "bank", &payment).await?;
        }
        let (watch, lives) = (&mut self.watch, &self.lives);
        until(
            format!("the journeys of the {} payments of {day} answered", paying.len()),
            async || {
                watch.read_events().await?;
                Ok(in_full.iter().all(|&n| watch.had(lives[n].invoice_id(), "paid"))
                    && in_part.iter().all(|&n| watch.had(lives[n].invoice_id(), "partly_paid")))
            },
        )
        .await?;
        for &n in &in_full {
            self.lives[n].fate = Fate::Paid;
        }
        Ok(paying.len())
    }
}

fn clock_now(clock: &ManualClock) -> DateTime<Utc> {
    use forfall_platform::clock::Clock;
    clock.now()
}

fn payment_of(life: &Life, amount_minor: i64, day: NaiveDate, now: DateTime<Utc>) -> PaymentReceived {
    let i = &life.drawn.invoice;
    PaymentReceived {
        event_id: new_event_id(),
        tenant: i.tenant.clone(),
        debtor_id: None,
        occurred_at: now.timestamp_millis(),
        // One a day at most: the day tells the parts apart.
        payment_id: format!("sim-payment-{}-{day}", i.invoice_id),
        amount_minor,
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
        outcome.count(&super::End {
            payer: life.drawn.payer(),
            settled: life.fate == Fate::Paid,
            charged_a_fee: life.fees_minor > 0,
            handed_over: life.fate == Fate::HandedOver,
            disputed: life.disputed,
            paid_in_parts: life.paid_in_part,
        });
    }
    outcome
}
