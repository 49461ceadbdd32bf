//! Watcher: owns each invoice's journey. It applies invoice snapshots, matched payments and
//! debtors' requests, keeps a timer per invoice for its next plan step, and when a timer falls
//! due emits the step as a `JourneyAction` (or a `HandoffCase` for the last step), with every
//! transition, and what became of each message (dispatch's outcomes) and of each case (the
//! agency's word, hand-off's outcomes: see [`agency`]), on `forfall.journey.events.v1`. Its Redis state is rebuilt from its changelog when lost
//! (see [`rebuild`]).
//!
//! Ordering rule: outputs are produced and acknowledged *before* the journey is written, and
//! every output's id is derived from its cause. A crash between the two re-does the work on
//! redelivery and yields the same ids, which consumers de-duplicate: nothing is lost, and
//! dispatch's idempotency key keeps a re-fired step from reaching the debtor twice. Payments
//! parked before their invoice follow the same rule: applied, or refused with a rejection on
//! `forfall.rejected.v1`, and removed from the parked list only after that is acknowledged.
//!
//! Timers live in one Redis sorted set per partition of `forfall.invoices.v1`, scored by fire
//! time; an instance polls only the partitions it is assigned and holds (a lock in Redis that
//! expires in real time), so a rebalance moves polling, not data, and two instances never fire
//! one partition at once. Due timers are fired in batches: one round trip claims them, one
//! loads their journeys, one their debtors' other open invoices; a debtor's steps due together
//! become one combined action; all outputs are produced and acknowledged together, then every
//! journey is written in one pipelined round trip (compare-and-set on a version, so a journey
//! changed meanwhile is decided again instead of overwritten). See [`store`] for the layout.

mod agency;
mod batch;
pub mod experiment_page;
pub mod experiments;
mod format;
mod preview;
pub mod rebuild;
pub mod store;

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use forfall_domain::claim;
use forfall_domain::evidence::{Delivery, MessageEvidence};
use forfall_domain::history::{HistoryFacts, InvoiceRecord};
use forfall_domain::invoice::{self, Contact, InvoiceSnapshot, InvoiceStatus};
use forfall_domain::journey::{
    self, DebtorInvoice, Decision, Emit, Journey, JourneyState, Plan, Request, Role, Scored, StepFee, TimerChange,
    Transition,
};
use forfall_domain::law::{DebtorContext, LawBook};
use forfall_domain::policy::{self, DebtorFacts, Policy, experiment_labels};
use forfall_domain::propensity::{Features, PropensityModel};
use forfall_domain::{Currency, DebtorKind, Jurisdiction, Money};
use forfall_platform::admin::Readiness;
use forfall_platform::changelog::{self, Changelog};
use forfall_platform::config;
use forfall_platform::journey_state;
use forfall_platform::kafka::KafkaConsumer;
use forfall_platform::kafka::{Failure, Handler, Inbound, Outbound, Producer, run_consumer};
use forfall_platform::records::{
    self, CaseClaim, CaseDispute, CaseFee, CaseInterest, CaseMessage, CollectionWarning, CoveredInvoice, DebtorRequest,
    DispatchOutcome, DispatchStatus, HandoffCase, HandoffOutcome, JourneyAction, JourneyEvent, PaymentMatched,
    PropensityFeature, Record, derived_id,
};
use forfall_platform::redis_store;
use forfall_platform::service::{Runtime, ServiceShell};
use forfall_platform::telemetry::TraceContext;
use futures::StreamExt;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts};
use rdkafka::consumer::Consumer;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use store::{Loaded, Save, Store, Stored, Timer};
use tokio::sync::Mutex;
use tracing::Instrument;

pub const SERVICE: &str = "watcher";
pub const PORT_OFFSET: u16 = 2;

/// How far back a debtor's late invoices count for segments ("late in the last 12 months"),
/// and so how long they are kept.
const LATE_HISTORY_DAYS: i64 = 365;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct WatcherSettings {
    /// How often due timers are polled: a timer waits up to this long past its moment before
    /// its round starts (200 ms, until 2026-12, put the lateness p99 at 5,000 timers/s past 200 ms).
    pub tick_ms: u64,
    /// `linger.ms` of the producer the timer rounds produce through. A round waits for its
    /// outputs and then for its changelog records, and the next claim waits for the round, so
    /// the linger is paid twice per round by every timer due meanwhile: the shared producer's
    /// `kafka.linger_ms` (20 ms) kept the lateness p99 at a steady 5,000/s near 140 ms, 5 ms
    /// near 55 ms (docs/benchmarks.md). A billing run's rounds fill their batches either way.
    pub timer_linger_ms: u32,
    /// Most timers claimed from one partition per poll (fired together, written in one round trip).
    /// A batch produces about three records a fire, and `partitions_in_flight` batches go at once:
    /// keep `batch × 3 × partitions_in_flight` under the producer's queue (200,000 messages), or
    /// batches wait for room (12,000 drained a billing run 15 % faster than 4,000 on the dev
    /// stack; 32,000 a third slower, see docs/benchmarks.md).
    pub batch: usize,
    /// How long a partition's timers stay with an instance that stopped without releasing
    /// them (real time): the longest a crashed watcher's partitions wait for their next owner.
    pub timer_lock_ms: u64,
    /// Partitions whose batches are fired at once.
    pub partitions_in_flight: usize,
    /// Locks by invoice (hashed), shared by the consume loop and the timer batches. A batch
    /// holds one for each invoice it fires, and one busy in another batch waits for the next
    /// round: many keep concurrent batches of thousands from wanting the same one.
    pub lock_stripes: usize,
    /// Debtors handled at once (records of one debtor stay in order).
    pub concurrency: usize,
    /// Records of different debtors the consume loop decides together (their reads, outputs
    /// and writes shared, see `batch`); 1 takes each on its own. A billing run's invoices and a
    /// bank file's payments arrive thousands at once.
    pub consume_batch: usize,
    /// The tenant policy file (TOML); the built-in default policy when unset.
    pub policy_file: Option<String>,
    /// How often the policy file is checked for changes.
    pub policy_reload_secs: u64,
    /// Law overrides (same shape as crates/domain/data/law.toml and rates.toml).
    pub law_rules_file: Option<String>,
    pub law_rates_file: Option<String>,
    /// How long a closed journey (paid, credited, cancelled) stays, in days of the service's
    /// clock, before it is removed from Redis and its changelog. Long enough for what still
    /// refers to it: a payment redelivered or booked twice, a card chargeback (up to 120 days),
    /// a correction from billing; no longer, because it holds the debtor's name and contact
    /// details. Its history stays on `forfall.journey.events.v1`, under that topic's retention.
    /// Journeys with an agency are not removed: the claim is the agency's until it closes.
    pub closed_retention_days: u32,
    /// How often (real time) closed journeys past their retention are looked for.
    pub retention_sweep_secs: u64,
    /// How long a payment matched to an invoice the watcher has not seen waits for it (days of
    /// the service's clock) before it is refused (`invoice_never_arrived`, with its record): an
    /// invoice normally follows within seconds, a billing backlog within days.
    pub parked_retention_days: u32,
    /// The bearer token of the staff endpoint (`/v1/handoff/preview/...`); it answers nothing
    /// without one, since a case names the debtor.
    pub staff_token: Option<config::Secret>,
    /// How often (real time) the open-invoice gauge is read from the partitions' counts.
    pub open_invoices_refresh_ms: u64,
    /// How old (real time) an experiment report served at `/v1/experiments/<name>/report` may
    /// be before it is read anew from the topics (in the background; the old one meanwhile).
    pub experiment_report_max_age_secs: u64,
    /// A propensity model file (`forfall model train`): each new invoice is scored with it, so
    /// that segments by `propensity_min` / `propensity_max` match; without one no score exists.
    pub propensity_model: Option<String>,
    /// How long an invoice stays in its debtor's history (the propensity model's inputs), in
    /// days from its issue date: long enough to know a customer, no longer, since how a person
    /// paid is personal data. A debtor's older records leave when its history next changes.
    pub history_retention_days: u32,
}

impl Default for WatcherSettings {
    fn default() -> Self {
        Self {
            tick_ms: 20,
            timer_linger_ms: 5,
            batch: 12_000,
            timer_lock_ms: 10_000,
            partitions_in_flight: 4,
            lock_stripes: 65_536,
            concurrency: 256,
            consume_batch: 64,
            policy_file: None,
            policy_reload_secs: 10,
            law_rules_file: None,
            law_rates_file: None,
            closed_retention_days: 120,
            retention_sweep_secs: 60,
            parked_retention_days: 30,
            staff_token: None,
            open_invoices_refresh_ms: 15_000,
            experiment_report_max_age_secs: 300,
            propensity_model: None,
            history_retention_days: 1095,
        }
    }
}

/// A decision with what its outputs need: the plan it was made on, the fee the step charges,
/// and its cause (which derives the output ids) and trace.
#[derive(Clone, Copy)]
struct Emission<'a> {
    decision: &'a Decision,
    plan: &'a Plan,
    fee: Money,
    cause: &'a str,
    trace: TraceContext,
    /// The debtor's other invoices a combined action lists.
    covers: &'a [CoveredInvoice],
    /// The debtor's other claims a hand-off takes into its case (as handed over).
    merged: &'a [Journey],
}

/// A decision to write with its outputs (see [`Watcher::write_together`]): the version it was
/// decided on (`None`: a new journey), what to store, and `extra` records produced (and
/// acknowledged) with its outputs and `extra_changes` put on the changelog with the journey.
struct JourneyWrite<'a> {
    expected: Option<u64>,
    stored: Stored,
    emission: Emission<'a>,
    extra: &'a [Outbound],
    extra_changes: &'a [Outbound],
}

struct Metrics {
    transitions: IntCounterVec,
    /// Per experiment variant: debtors assigned, paid without or after a fee, handed over,
    /// collected by the agency ([`forfall_domain::settlement::experiment_outcome`]).
    experiment_outcomes: IntCounterVec,
    /// Open invoices by tenant and stage, over the partitions this instance owns.
    open_invoices: IntGaugeVec,
    /// From a payment's match (its record's time) to the journey's contact stop written.
    payment_to_stop: Histogram,
    /// Invoices paid in full, by the stage of their journey
    /// ([`forfall_domain::settlement::stage`]).
    settlements: IntCounterVec,
    fired: IntCounterVec,
    lateness: Histogram,
    policy_reloads: IntCounterVec,
    combined: prometheus::IntCounter,
    merged: prometheus::IntCounter,
    /// Records decided by the consume loop, by whether they shared a batch's round trips
    /// (`together`, see [`batch`]) or took their own (`alone`).
    decided: IntCounterVec,
}

impl Metrics {
    /// Every outcome of every variant of the policy's experiments at zero: a comparison reads
    /// a variant's first settlement as an increase, not as a series appearing.
    fn zero_experiments(&self, policy: &Policy) {
        for e in &policy.experiments {
            for v in &e.variants {
                for outcome in forfall_domain::settlement::EXPERIMENT_OUTCOMES {
                    self.experiment_outcomes.with_label_values(&[&e.name, &v.name, outcome]);
                }
            }
        }
    }
}

struct Inner {
    rt: Runtime,
    /// The propensity model new invoices are scored with, if one is configured.
    propensity: Option<PropensityModel>,
    history_retention_days: u32,
    producer: Producer,
    /// The timer rounds' producer, lingering `watcher.timer_linger_ms`.
    timer_producer: Producer,
    readiness: Readiness,
    /// Partitions whose state this instance found ready (see [`rebuild`]).
    ready: std::sync::Mutex<HashSet<i32>>,
    /// One rebuild at a time.
    rebuilding: Mutex<()>,
    /// The shell's metrics: rejections made here (parked payments) are counted with the loop's.
    service_metrics: forfall_platform::metrics::Metrics,
    redis: ConnectionManager,
    store: Store,
    /// Who this instance is to the timer locks: unique per process.
    holder: String,
    law: LawBook,
    policy: RwLock<Arc<Policy>>,
    stripes: Vec<Mutex<()>>,
    metrics: Metrics,
    topics: config::Topics,
}

#[derive(Clone)]
pub struct Watcher(Arc<Inner>);

fn invalid(detail: String) -> Failure {
    Failure::reject("invalid_invoice", detail)
}

/// The domain snapshot of a published invoice record.
fn snapshot(rec: &records::Invoice) -> Result<InvoiceSnapshot, Failure> {
    let currency: Currency = rec
        .currency
        .parse()
        .map_err(|e| invalid(format!("field 'currency': {e}")))?;
    let jurisdiction: Jurisdiction = rec
        .jurisdiction
        .parse()
        .map_err(|e| invalid(format!("field 'jurisdiction': {e}")))?;
    let debtor_kind: DebtorKind = rec
        .debtor_kind
        .parse()
        .map_err(|e| invalid(format!("field 'debtor_kind': {e}")))?;
    let date = |days, field: &str| {
        invoice::date_from_epoch_days(days).ok_or_else(|| invalid(format!("field '{field}' out of range")))
    };
    Ok(InvoiceSnapshot {
        tenant: rec.tenant.clone(),
        debtor_id: rec.debtor_id.clone(),
        invoice_id: rec.invoice_id.clone(),
        revision: rec.revision,
        invoice_number: rec.invoice_number.clone(),
        issue_date: date(rec.issue_date, "issue_date")?,
        due_date: date(rec.due_date, "due_date")?,
        amount: Money::new(rec.amount_minor, currency),
        credited_minor: rec.credited_minor,
        jurisdiction,
        debtor_kind,
        status: match rec.status {
            records::InvoiceStatus::Open => InvoiceStatus::Open,
            records::InvoiceStatus::SettledByCredit => InvoiceStatus::SettledByCredit,
            records::InvoiceStatus::Cancelled => InvoiceStatus::Cancelled,
        },
        payment_reference: rec.payment_reference.clone(),
        description: rec.description.clone(),
        contact: Contact {
            name: rec.debtor_name.clone(),
            email: rec.email.clone(),
            phone: rec.phone.clone(),
            language: rec.language.clone(),
            preferred_channels: rec.preferred_channels.clone(),
            declined_channels: rec.declined_channels.clone(),
            details: rec.debtor_details.clone(),
        },
        reminder_fee_agreed: rec.reminder_fee_agreed.unwrap_or(false),
    })
}

/// The trace a journey keeps: the one its invoice first arrived in, kept only where traces
/// are exported.
fn trace_to_keep(kept: Option<TraceContext>, arrived_in: TraceContext) -> Option<TraceContext> {
    kept.or_else(|| (forfall_platform::telemetry::exporting() && arrived_in.sampled).then_some(arrived_in))
}

/// A matched payment's amount, in a currency the watcher knows.
fn payment_amount(rec: &PaymentMatched) -> Result<Money, Failure> {
    let currency: Currency = rec
        .currency
        .parse()
        .map_err(|e| Failure::reject("unknown_currency", format!("field 'currency': {e}")))?;
    Ok(Money::new(rec.amount_minor, currency))
}

/// A matched payment applied to its invoice's journey; refused with its reason when the
/// invoice cannot take it (another currency, a non-positive amount).
fn payment_applied(journey: Journey, rec: &PaymentMatched, amount: Money) -> Result<Decision, Failure> {
    journey::on_payment(journey, &rec.payment_id, amount).map_err(|e| Failure::Reject {
        code: "payment_not_applicable",
        detail: format!("payment '{}' for invoice '{}': {e}", rec.payment_id, rec.invoice_id),
        tenant: Some(rec.tenant.clone()),
        debtor_id: Some(rec.debtor_id.clone()),
    })
}

/// Folds a later decision into an earlier one: transitions accumulate, the last timer change
/// that is not `Keep` wins.
fn then(mut first: Decision, second: Decision) -> Decision {
    first.transitions.extend(second.transitions);
    if second.timer != TimerChange::Keep {
        first.timer = second.timer;
    }
    first.emit = second.emit.or(first.emit);
    first.journey = second.journey;
    first
}

impl Watcher {
    fn stripe_index(&self, tenant: &str, invoice_id: &str) -> usize {
        let mut h = DefaultHasher::new();
        (tenant, invoice_id).hash(&mut h);
        (h.finish() % self.0.stripes.len() as u64) as usize
    }

    fn stripe(&self, tenant: &str, invoice_id: &str) -> &Mutex<()> {
        &self.0.stripes[self.stripe_index(tenant, invoice_id)]
    }

    fn conn(&self) -> ConnectionManager {
        self.0.redis.clone()
    }

    fn policy(&self) -> Arc<Policy> {
        self.0.policy.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The plan a journey follows, from the policy in force.
    fn plan_of(&self, j: &Journey) -> Plan {
        let policy = self.policy();
        policy.plan_named(&j.plan).unwrap_or_else(|| {
            tracing::warn!(plan = %j.plan, policy = %policy.version, "plan no longer in the policy; using the catch-all plan");
            policy.fallback_plan()
        })
    }

    fn law_context(j: &Journey) -> DebtorContext {
        DebtorContext {
            jurisdiction: j.invoice.jurisdiction,
            kind: j.invoice.debtor_kind,
            fee_agreed_in_advance: j.invoice.reminder_fee_agreed,
        }
    }

    /// What the debtor's own history says as a new invoice arrives: its late invoices in the
    /// last 12 months, and its records summed up on its local day (one round trip).
    async fn history_of(&self, invoice: &InvoiceSnapshot) -> Result<(u32, HistoryFacts), Failure> {
        let mut all = self.histories_of(&[invoice]).await?;
        all.pop()
            .ok_or_else(|| Failure::Fatal(anyhow::anyhow!("no history read for invoice '{}'", invoice.invoice_id)))
    }

    /// [`Watcher::history_of`] for several new invoices, in one round trip, in order.
    async fn histories_of(&self, invoices: &[&InvoiceSnapshot]) -> Result<Vec<(u32, HistoryFacts)>, Failure> {
        if invoices.is_empty() {
            return Ok(Vec::new());
        }
        let now = self.0.rt.clock.now();
        let since = (now - chrono::Duration::days(LATE_HISTORY_DAYS)).timestamp_millis();
        let mut pipe = redis::pipe();
        for invoice in invoices {
            pipe.cmd("ZCOUNT")
                .arg(self.0.store.late_key(&invoice.tenant, &invoice.debtor_id))
                .arg(since)
                .arg("+inf")
                .cmd("HGETALL")
                .arg(self.0.store.history_key(&invoice.tenant, &invoice.debtor_id));
        }
        let replies: Vec<(u32, Vec<(String, String)>)> = {
            let flat: Vec<redis::Value> = pipe.query_async(&mut self.conn()).await?;
            let parse = |e: redis::ParsingError| Failure::Fatal(anyhow::anyhow!("unexpected reply from Redis: {e}"));
            let mut flat = flat.into_iter();
            let mut replies = Vec::with_capacity(invoices.len());
            while let (Some(late), Some(records)) = (flat.next(), flat.next()) {
                replies.push((
                    redis::from_redis_value(late).map_err(parse)?,
                    redis::from_redis_value(records).map_err(parse)?,
                ));
            }
            replies
        };
        if replies.len() != invoices.len() {
            return Err(Failure::Fatal(anyhow::anyhow!(
                "{} histories read for {} invoices",
                replies.len(),
                invoices.len()
            )));
        }
        Ok(invoices
            .iter()
            .zip(replies)
            .map(|(invoice, (late, records))| {
                let today = invoice.jurisdiction.local_day(now);
                let oldest = self.oldest_kept(today);
                let decoded: Vec<InvoiceRecord> = decode_history(records)
                    .filter(|(invoice_id, _)| *invoice_id != invoice.invoice_id)
                    .filter_map(|(_, record)| record)
                    .filter(|r| r.issued >= oldest)
                    .collect();
                (late, HistoryFacts::of(&decoded, today))
            })
            .collect())
    }

    async fn load(&self, partition: i32, tenant: &str, invoice_id: &str) -> Result<Option<Loaded>, Failure> {
        self.0.store.load(partition, tenant, invoice_id).await
    }

    /// The fee step `step_index` charges when sent now, as the law in force allows, and the
    /// first day the law lets it be charged after the fees charged before.
    fn fee_for(&self, j: &Journey, plan: &Plan, step_index: usize, now: DateTime<Utc>) -> StepFee {
        let today = j.invoice.jurisdiction.local_day(now);
        plan.steps
            .get(step_index)
            .map(|step| {
                policy::step_fee(
                    step,
                    &Self::law_context(j),
                    &self.0.law,
                    j.anchor_due(),
                    &j.fee_dates,
                    today,
                )
            })
            .unwrap_or_else(|| StepFee::plain(Money::zero(j.invoice.amount.currency)))
    }

    #[allow(clippy::too_many_arguments)]
    fn event(
        &self,
        journey: &Journey,
        plan: &Plan,
        upcoming: Option<(usize, i64)>,
        t: &Transition,
        cause: &str,
        index: usize,
        at: DateTime<Utc>,
    ) -> JourneyEvent {
        let inv = &journey.invoice;
        let outstanding = journey.outstanding();
        let next = upcoming
            .filter(|_| !journey.state.is_final())
            .and_then(|(i, at_ms)| plan.steps.get(i).map(|step| (step, at_ms)));
        JourneyEvent {
            event_id: derived_id(
                "journey-event",
                &[&inv.tenant, &inv.invoice_id, cause, &index.to_string()],
            ),
            tenant: inv.tenant.clone(),
            debtor_id: inv.debtor_id.clone(),
            occurred_at: at.timestamp_millis(),
            invoice_id: inv.invoice_id.clone(),
            kind: t.kind.to_owned(),
            from_state: t.from.label(),
            to_state: t.to.label(),
            step: t.step.clone(),
            rule: t.rule.clone(),
            policy_version: journey.plan_version.clone(),
            reason: t.reason.clone(),
            open_minor: outstanding.minor,
            currency: outstanding.currency.code().to_owned(),
            next_step: next.map(|(step, _)| step.name.clone()),
            next_kind: next.map(|(step, _)| step.kind.code().to_owned()),
            next_at: next.map(|(_, at_ms)| at_ms),
            segment: journey.segment.clone(),
            experiment: journey.experiment.clone(),
            fee_minor: 0,
            propensity: t.propensity.as_ref().and_then(|p| p.score).map(i32::from),
            propensity_model: t.propensity.as_ref().and_then(|p| p.model_version.clone()),
            propensity_features: t.propensity.as_ref().map_or_else(Vec::new, |p| {
                p.features
                    .iter()
                    .map(|(name, value)| PropensityFeature {
                        name: (*name).to_owned(),
                        value: *value,
                    })
                    .collect()
            }),
        }
    }

    /// The records a decision produces: its transitions as events (each saying what is
    /// `upcoming` after the decision), and its emit.
    async fn outputs(&self, e: &Emission<'_>, upcoming: Option<(usize, i64)>) -> Result<Vec<Outbound>, Failure> {
        let Emission {
            decision: d,
            plan,
            fee,
            cause,
            trace,
            covers,
            merged,
        } = *e;
        let now = self.0.rt.clock.now();
        let events_topic = self.0.rt.topic(&self.0.topics.journey_events);
        let debtor = d.journey.invoice.debtor_id.clone();
        let mut outs = Vec::new();
        for (i, t) in d.transitions.iter().enumerate() {
            self.0.metrics.transitions.with_label_values(&[t.kind]).inc();
            // Paid in full to the creditor, or collected in full by the agency.
            if t.kind == "paid" || t.kind == "paid_at_agency" {
                let stage = forfall_domain::settlement::stage(t.from);
                self.0.metrics.settlements.with_label_values(&[stage]).inc();
            }
            if let Some(outcome) = forfall_domain::settlement::experiment_outcome(t.kind, d.journey.fees_minor > 0) {
                let (experiment, variant) = experiment_labels(d.journey.experiment.as_deref());
                self.0
                    .metrics
                    .experiment_outcomes
                    .with_label_values(&[experiment, variant, outcome])
                    .inc();
            }
            let mut e = self.event(&d.journey, plan, upcoming, t, cause, i, now);
            // The step this decision takes charges the emission's fee.
            if matches!(t.kind, "step_sent" | "handed_over") {
                e.fee_minor = fee.minor;
            }
            outs.push(self.0.rt.codec.outbound(&events_topic, &debtor, &e, trace).await?);
        }
        match &d.emit {
            Some(Emit::Message {
                step_index,
                step,
                tone,
                channels,
            }) => {
                let mut action = self.action(
                    &d.journey,
                    plan,
                    *step_index,
                    &step.name,
                    tone.code(),
                    channels,
                    fee,
                    now,
                );
                action.covers = covers.to_vec();
                let topic = self.0.rt.topic(&self.0.topics.journey_actions);
                outs.push(self.0.rt.codec.outbound(&topic, &debtor, &action, trace).await?);
            }
            Some(Emit::FreshLink { channels }) => {
                // No step of the plan (so no deadline, and sent now), no fee, and an id of its
                // own cause (the debtor's request): each request is one message, a redelivery none.
                let mut action = self.action(
                    &d.journey,
                    plan,
                    usize::MAX,
                    FRESH_LINK,
                    FRESH_LINK,
                    channels,
                    Money::zero(fee.currency),
                    now,
                );
                action.step_index = -1;
                action.action_id = derived_id("action", &[&debtor, cause, FRESH_LINK]);
                action.event_id = derived_id("action-event", &[&debtor, cause, FRESH_LINK]);
                let topic = self.0.rt.topic(&self.0.topics.journey_actions);
                outs.push(self.0.rt.codec.outbound(&topic, &debtor, &action, trace).await?);
            }
            Some(Emit::Handoff { .. }) => {
                let case = self.case(&d.journey, merged, now);
                let topic = self.0.rt.topic(&self.0.topics.handoff_cases);
                outs.push(self.0.rt.codec.outbound(&topic, &debtor, &case, trace).await?);
            }
            None => {}
        }
        Ok(outs)
    }

    #[allow(clippy::too_many_arguments)]
    fn action(
        &self,
        j: &Journey,
        plan: &Plan,
        step_index: usize,
        step: &str,
        tone: &str,
        channels: &[String],
        fee: Money,
        now: DateTime<Utc>,
    ) -> JourneyAction {
        let inv = &j.invoice;
        let open = j.outstanding();
        // The deadline counts from the day the message goes out, in the debtor's calendar.
        let local_today = inv.jurisdiction.local_day(now);
        let pay_by = plan
            .steps
            .get(step_index)
            .and_then(|s| s.days_to_pay)
            .and_then(|days| local_today.checked_add_signed(chrono::Duration::days(i64::from(days))))
            .map(invoice::epoch_days);
        let accrued = self.accrued(j, local_today);
        JourneyAction {
            event_id: derived_id("action-event", &[&inv.tenant, &inv.invoice_id, step]),
            tenant: inv.tenant.clone(),
            debtor_id: inv.debtor_id.clone(),
            occurred_at: now.timestamp_millis(),
            action_id: derived_id("action", &[&inv.tenant, &inv.invoice_id, step]),
            invoice_id: inv.invoice_id.clone(),
            invoice_number: inv.invoice_number.clone(),
            step: step.to_owned(),
            step_index: step_index as i32,
            tone: tone.to_owned(),
            channels: invoice::channels_for(channels, &inv.contact),
            send_at: plan
                .fire_at(step_index, inv.due_date, inv.jurisdiction)
                .unwrap_or(now)
                .timestamp_millis(),
            open_minor: open.minor,
            fee_minor: fee.minor,
            currency: open.currency.code().to_owned(),
            due_date: invoice::epoch_days(inv.due_date),
            pay_by,
            payment_reference: inv.payment_reference.clone(),
            policy_version: j.plan_version.clone(),
            jurisdiction: inv.jurisdiction.code().to_owned(),
            debtor_name: inv.contact.name.clone(),
            email: inv.contact.email.clone(),
            phone: inv.contact.phone.clone(),
            language: inv.contact.language.clone(),
            description: inv.description.clone(),
            interest_minor: accrued.interest_minor,
            interest_rate_bp: accrued.rate_bp.and_then(|bp| i32::try_from(bp).ok()),
            compensation_minor: accrued.compensation_minor,
            covers: Vec::new(),
            segment: j.segment.clone(),
            experiment: j.experiment.clone(),
        }
    }

    /// What the policy's `[claims]` add to a message about `j` sent on the debtor's day `today`.
    fn accrued(&self, j: &Journey, today: chrono::NaiveDate) -> claim::Accrued {
        claim::accrued(j, &self.0.law, &self.policy().claims, &Self::law_context(j), today)
    }

    /// The case handed to the agency: the invoice, the debtor, and the claim as of the
    /// debtor's local day of the hand-off under the policy's `[claims]` (see
    /// [`forfall_domain::claim`]), with the debtor's claims `merged` into it (see
    /// [`forfall_domain::merge`]), each itemised the same way.
    fn case(&self, j: &Journey, merged: &[Journey], now: DateTime<Utc>) -> HandoffCase {
        let inv = &j.invoice;
        let today = inv.jurisdiction.local_day(now);
        let claim = claim::compose(j, &self.0.law, &self.policy().claims, &Self::law_context(j), today);
        let lead = self.case_claim(j, &claim, today);
        let merged_claims: Vec<CaseClaim> = merged
            .iter()
            .map(|m| {
                let c = claim::compose(m, &self.0.law, &self.policy().claims, &Self::law_context(m), today);
                self.case_claim(m, &c, today)
            })
            .collect();
        let merge_citation = (!merged.is_empty())
            .then(|| {
                self.0
                    .law
                    .merge_rule(&Self::law_context(j), today)
                    .map(|r| r.citation.clone())
            })
            .flatten();
        let days = invoice::epoch_days;
        HandoffCase {
            event_id: derived_id("case-event", &[&inv.tenant, &inv.invoice_id]),
            tenant: inv.tenant.clone(),
            debtor_id: inv.debtor_id.clone(),
            occurred_at: now.timestamp_millis(),
            case_id: derived_id("case", &[&inv.tenant, &inv.invoice_id]),
            invoice_id: inv.invoice_id.clone(),
            invoice_number: inv.invoice_number.clone(),
            issue_date: days(inv.issue_date),
            due_date: days(inv.due_date),
            principal_minor: lead.principal_minor,
            fees_minor: lead.fees_minor,
            currency: inv.amount.currency.code().to_owned(),
            jurisdiction: inv.jurisdiction.code().to_owned(),
            debtor_kind: inv.debtor_kind.code().to_owned(),
            payment_reference: inv.payment_reference.clone(),
            steps_taken: j.steps_taken.clone(),
            policy_version: j.plan_version.clone(),
            debtor_name: inv.contact.name.clone(),
            email: inv.contact.email.clone(),
            phone: inv.contact.phone.clone(),
            language: inv.contact.language.clone(),
            claim_date: Some(days(today)),
            original_principal_minor: Some(lead.original_principal_minor),
            paid_minor: Some(lead.paid_minor),
            combined_principal_minor: Some(
                lead.principal_minor + merged_claims.iter().map(|c| c.principal_minor).sum::<i64>(),
            ),
            combined_total_minor: Some(lead.total_minor + merged_claims.iter().map(|c| c.total_minor).sum::<i64>()),
            merge_citation,
            merged_claims,
            fee_lines: lead.fee_lines,
            interest_lines: lead.interest_lines,
            interest_minor: lead.interest_minor,
            interest_note: lead.interest_note,
            compensation_minor: lead.compensation_minor,
            compensation_rule_id: claim.compensation.as_ref().map(|c| c.rule_id.clone()),
            compensation_citation: claim.compensation.as_ref().map(|c| c.citation.clone()),
            total_minor: Some(lead.total_minor),
            debtor_details: inv.contact.details.clone(),
            collection_warning: lead.collection_warning,
            messages: lead.messages,
            disputes: lead.disputes,
        }
    }

    /// One claim of a case, itemised as of `today`.
    fn case_claim(&self, j: &Journey, claim: &claim::Claim, today: chrono::NaiveDate) -> CaseClaim {
        let inv = &j.invoice;
        let days = invoice::epoch_days;
        CaseClaim {
            invoice_id: inv.invoice_id.clone(),
            invoice_number: inv.invoice_number.clone(),
            issue_date: days(inv.issue_date),
            due_date: days(inv.due_date),
            description: inv.description.clone(),
            payment_reference: inv.payment_reference.clone(),
            original_principal_minor: claim.principal.minor,
            paid_minor: claim.paid.minor,
            principal_minor: claim.remaining_principal.minor,
            fees_minor: claim.remaining_fees.minor,
            fee_lines: claim
                .fees
                .iter()
                .map(|f| CaseFee {
                    date: f.date.map(days),
                    step: f.step.clone(),
                    kind: f.kind.map(|k| k.label().to_owned()),
                    amount_minor: f.amount.minor,
                    rule_id: f.rule_id.clone(),
                    citation: f.citation.clone(),
                })
                .collect(),
            interest_lines: claim
                .interest
                .iter()
                .map(|l| CaseInterest {
                    first_day: days(l.first_day),
                    last_day: days(l.last_day),
                    // A half-year has at most 184 days.
                    days: i32::try_from(l.days).unwrap_or(i32::MAX),
                    reference_bp: l.reference_bp,
                    margin_bp: l.margin_bp,
                    principal_minor: claim.remaining_principal.minor,
                    amount_minor: l.amount.minor,
                    rule_id: l.rule_id.clone(),
                    citation: l.citation.clone(),
                    rate_source: l.rate_source.clone(),
                })
                .collect(),
            interest_minor: claim.interest_total.minor,
            interest_note: claim.interest_note.clone(),
            compensation_minor: claim.compensation.as_ref().map_or(0, |c| c.amount.minor),
            total_minor: claim.total.minor,
            collection_warning: self.warning_of(j, today),
            messages: self.messages_of(j),
            steps_taken: j.steps_taken.clone(),
            disputes: j
                .disputes
                .iter()
                .map(|d| CaseDispute {
                    opened: days(d.opened),
                    reason: d.reason.clone(),
                    resolved: d.resolved.map(days),
                    resolution: d.resolution.clone(),
                })
                .collect(),
        }
    }

    /// The journey's messages as the case's evidence, each with its tone from the plan.
    fn messages_of(&self, j: &Journey) -> Vec<CaseMessage> {
        let plan = self.plan_of(j);
        let zone = j.invoice.jurisdiction.time_zone();
        j.messages
            .iter()
            .map(|m| {
                let at = DateTime::<Utc>::from_timestamp_millis(m.at_ms).unwrap_or_default();
                CaseMessage {
                    sent_at: m.at_ms,
                    sent_on: invoice::epoch_days(at.with_timezone(&zone).date_naive()),
                    step: m.step.clone(),
                    tone: plan
                        .steps
                        .iter()
                        .find(|s| s.name == m.step)
                        .and_then(|s| match &s.kind {
                            journey::StepKind::Message { tone, .. } => Some(tone.code().to_owned()),
                            journey::StepKind::Handoff => None,
                        }),
                    channel: m.channel.clone(),
                    delivery: m.delivery.code().to_owned(),
                    content_sha256: m.content_sha256.clone(),
                    provider_message_id: m.provider_message_id.clone(),
                }
            })
            .collect()
    }

    /// What the case says of the statutory warning before collection: the one the plan sent,
    /// or, where the law asks for one and none went out, that the agency must send it.
    fn warning_of(&self, j: &Journey, today: chrono::NaiveDate) -> Option<CollectionWarning> {
        let ctx = Self::law_context(j);
        let required = self
            .0
            .law
            .min_days_to_pay(&ctx, forfall_domain::law::FeeStep::CollectionWarning, today);
        let (required_days, rule_id, citation) = match required {
            Some((days, rule)) => (
                i32::try_from(days).ok(),
                Some(rule.id.clone()),
                Some(rule.citation.clone()),
            ),
            None => (None, None, None),
        };
        match &j.warning {
            Some(w) => Some(CollectionWarning {
                given: true,
                sent_on: Some(invoice::epoch_days(w.date)),
                step: Some(w.step.clone()),
                days_to_pay: w.days_to_pay.and_then(|d| i32::try_from(d).ok()),
                deadline: w.deadline().map(invoice::epoch_days),
                required_days,
                rule_id,
                citation,
            }),
            None => required.map(|_| CollectionWarning {
                given: false,
                sent_on: None,
                step: None,
                days_to_pay: None,
                deadline: None,
                required_days,
                rule_id,
                citation,
            }),
        }
    }

    /// Produces what the decision emits, waits for the broker, then writes the journey.
    async fn emit_then_save(&self, expected: Option<u64>, stored: Stored, e: Emission<'_>) -> Result<bool, Failure> {
        self.emit_with_then_save(expected, stored, e, &[], &[]).await
    }

    /// Like [`Watcher::emit_then_save`], with `extra` records produced (and acknowledged)
    /// together with the decision's, and `extra_changes` put on the changelog with the journey.
    async fn emit_with_then_save(
        &self,
        expected: Option<u64>,
        stored: Stored,
        e: Emission<'_>,
        extra: &[Outbound],
        extra_changes: &[Outbound],
    ) -> Result<bool, Failure> {
        let written = self
            .write_together(vec![JourneyWrite {
                expected,
                stored,
                emission: e,
                extra,
                extra_changes,
            }])
            .await?;
        Ok(written.first() == Some(&store::Written::Yes))
    }

    /// Writes decisions of different invoices together: their contact stops in one round trip,
    /// their outputs produced and acknowledged together and then their changelog records, the
    /// debtors' history read in one round trip, the journeys in one per partition (each only if
    /// nobody wrote it since it was read), and the history of those written in one more. What
    /// became of each, in order: a conflict is decided again by the caller from what is stored.
    async fn write_together(&self, writes: Vec<JourneyWrite<'_>>) -> Result<Vec<store::Written>, Failure> {
        let now_ms = self.0.rt.clock.now().timestamp_millis();
        let mut saves = Vec::with_capacity(writes.len());
        let mut emissions = Vec::with_capacity(writes.len());
        for w in writes {
            saves.push(self.0.store.prepare(
                Save {
                    expected: w.expected,
                    stored: w.stored,
                    timer: w.emission.decision.timer.clone(),
                    fired_step: None,
                    stops_contact: w.emission.decision.stops_contact(),
                },
                now_ms,
            )?);
            emissions.push((w.emission, w.extra, w.extra_changes));
        }
        self.0.store.stop_contact(&saves).await?;
        let mut outs = Vec::new();
        let mut changes = Vec::new();
        // Where each journey's own record is among the changelog records.
        let mut change_at = Vec::with_capacity(saves.len());
        for (prepared, (emission, extra, extra_changes)) in saves.iter().zip(&emissions) {
            outs.extend(self.outputs(emission, prepared.upcoming).await?);
            outs.extend_from_slice(extra);
            change_at.push(changes.len());
            changes.push(self.0.store.change(prepared));
            changes.extend_from_slice(extra_changes);
        }
        let decisions: Vec<&Decision> = emissions.iter().map(|(e, _, _)| e.decision).collect();
        let histories = self.history_writes(&decisions).await?;
        for (prepared, history) in saves.iter().zip(&histories) {
            if let Some(h) = history {
                changes.extend(h.changes(self.0.store.changelog(), prepared.partition));
            }
        }
        let logged = self.produce_then_log(&outs, &changes).await?;
        // The journeys by partition (each partition's state marker is checked with its writes).
        type PartitionSaves = (Vec<usize>, Vec<store::Prepared>, Vec<i64>);
        let mut by_partition: BTreeMap<i32, PartitionSaves> = BTreeMap::new();
        for (index, (prepared, at)) in saves.into_iter().zip(change_at).enumerate() {
            let part = by_partition.entry(prepared.partition).or_default();
            part.0.push(index);
            part.2.push(logged.get(at).copied().unwrap_or(-1));
            part.1.push(prepared);
        }
        let mut written = vec![store::Written::Conflict; decisions.len()];
        let saved = futures::future::try_join_all(
            by_partition
                .iter()
                .map(|(partition, (_, prepared, offsets))| self.0.store.save_many(*partition, prepared, offsets)),
        )
        .await?;
        for ((indexes, _, _), results) in by_partition.values().zip(saved) {
            for (index, result) in indexes.iter().zip(results) {
                written[*index] = result;
            }
        }
        // After the journeys, as the late history: a stop in between leaves the records on
        // the changelog, where a rebuild finds them.
        let mut pipe = redis::pipe();
        let mut any = false;
        for (history, result) in histories.iter().zip(&written) {
            if let (Some(h), store::Written::Yes) = (history, result) {
                h.add_to(&mut pipe);
                any = true;
            }
        }
        if any {
            let _: () = pipe.query_async(&mut self.conn()).await?;
        }
        Ok(written)
    }

    /// Produces a decision's outputs and, once every one is acknowledged, its changelog records;
    /// the changelog offsets, in order. A changelog value therefore always stands for a state
    /// whose outputs are on their topics: a rebuild never restores a decision half made.
    async fn produce_then_log(&self, outs: &[Outbound], changes: &[Outbound]) -> Result<Vec<i64>, Failure> {
        Self::produce_then_log_through(&self.0.producer, outs, changes).await
    }

    /// [`Watcher::produce_then_log`] through `producer`. Which producer a decision goes
    /// through does not change the order of an invoice's records: its next decision waits for
    /// this one's acknowledgements under the invoice's lock.
    async fn produce_then_log_through(
        producer: &Producer,
        outs: &[Outbound],
        changes: &[Outbound],
    ) -> Result<Vec<i64>, Failure> {
        let transient = |e: forfall_platform::kafka::ProduceError| Failure::Transient(anyhow::anyhow!(e));
        producer.send_all(outs).await.map_err(transient)?;
        let delivered = producer.send_all_delivered(changes).await.map_err(transient)?;
        Ok(delivered.into_iter().map(|d| d.offset).collect())
    }

    /// Applies an invoice snapshot, and the payments parked for the invoice before it was known.
    ///
    /// A parked payment leaves the parked list only after what it produced is acknowledged: its
    /// journey events (written with the journey, after them), or its rejection when the invoice
    /// refuses it (another currency, a non-positive amount), which goes to the rejected topic
    /// with its reason and the payment's source record instead of being dropped. The list is
    /// read at every snapshot: a stop between writing the journey and clearing the list leaves
    /// it there, and applying a payment again changes nothing (a journey applies a payment id
    /// once; a rejection carries the same id again).
    async fn on_invoice(&self, rec: records::Invoice, partition: i32, trace: TraceContext) -> Result<(), Failure> {
        let incoming = snapshot(&rec)?;
        let _guard = self.stripe(&rec.tenant, &rec.invoice_id).lock().await;
        let parked_key = self.0.store.parked_key(&rec.tenant, &rec.invoice_id);
        let parked_for = ParkedFor {
            tenant: &rec.tenant,
            invoice_id: &rec.invoice_id,
            debtor_id: &rec.debtor_id,
        };
        loop {
            let loaded = self.load(partition, &rec.tenant, &rec.invoice_id).await?;
            let parked: Vec<(String, String)> = redis::cmd("HGETALL")
                .arg(&parked_key)
                .query_async(&mut self.conn())
                .await?;
            let same = loaded.as_ref().is_some_and(|l| l.stored.journey.invoice == incoming);
            if same && parked.is_empty() {
                return Ok(()); // the same snapshot again
            }
            let (expected, partition, pending, pending_ms, kept_trace) = match &loaded {
                Some(l) => (
                    Some(l.version),
                    l.stored.partition,
                    l.stored.pending_step,
                    l.stored.pending_fire_ms,
                    l.stored.trace,
                ),
                None => (None, partition, None, None, None),
            };
            let (mut d, plan) = match loaded.map(|l| l.stored.journey) {
                Some(existing) if same => {
                    // Only parked payments to look at: the snapshot itself changes nothing.
                    let plan = self.plan_of(&existing);
                    let unchanged = Decision {
                        journey: existing,
                        transitions: Vec::new(),
                        timer: TimerChange::Keep,
                        emit: None,
                    };
                    (unchanged, plan)
                }
                Some(existing) => {
                    let plan = self.plan_of(&existing);
                    (journey::on_invoice(Some(existing), incoming.clone(), &plan), plan)
                }
                None => self.open_journey(incoming.clone()).await?,
            };
            // Payments that arrived before their invoice are applied now, or rejected.
            let mut rejections = Vec::new();
            let mut reasons = Vec::new();
            for (_, raw) in &parked {
                let payment = match serde_json::from_str::<ParkedPayment>(raw) {
                    Ok(p) => p,
                    Err(e) => {
                        let detail = format!("a payment parked for invoice '{}' cannot be read: {e}", rec.invoice_id);
                        let code = "unreadable_parked_payment";
                        rejections.push(
                            self.parked_rejection(&parked_for, None, raw, code, detail, trace)
                                .await?,
                        );
                        reasons.push(code);
                        continue;
                    }
                };
                let amount = Money::new(payment.amount_minor, payment.currency);
                match journey::on_payment(d.journey.clone(), &payment.payment_id, amount) {
                    Ok(next) => d = then(d, next),
                    Err(e) => {
                        let detail = format!(
                            "payment '{}' for invoice '{}' (parked until the invoice arrived): {e}",
                            payment.payment_id, rec.invoice_id
                        );
                        let code = "payment_not_applicable";
                        rejections.push(
                            self.parked_rejection(&parked_for, Some(&payment), raw, code, detail, trace)
                                .await?,
                        );
                        reasons.push(code);
                    }
                }
            }
            // The parked payments read leave the changelog after the outputs, and Redis after that.
            let changelog = self.0.store.changelog();
            let unparked: Vec<Outbound> = parked
                .iter()
                .map(|(payment_id, _)| {
                    changelog.delete(
                        partition,
                        store::parked_change_key(&rec.tenant, &rec.invoice_id, payment_id),
                    )
                })
                .collect();
            let done = if same && d.transitions.is_empty() {
                // Applied before (a stop came before the list was cleared): only rejections.
                self.produce_then_log(&rejections, &unparked).await?;
                true
            } else {
                let stored = Stored {
                    journey: d.journey.clone(),
                    partition,
                    pending_step: pending,
                    pending_fire_ms: pending_ms,
                    // The trace the invoice first arrived in, kept only where it is exported.
                    trace: trace_to_keep(kept_trace, trace),
                };
                // Event ids derive from the cause: payments applied on a redelivered snapshot
                // must not take the ids of the events its first delivery produced.
                let cause = if same {
                    format!("{}:parked", rec.event_id)
                } else {
                    rec.event_id.clone()
                };
                let emission = Emission {
                    decision: &d,
                    plan: &plan,
                    fee: Money::zero(incoming.amount.currency),
                    cause: &cause,
                    trace,
                    covers: &[],
                    merged: &[],
                };
                self.emit_with_then_save(expected, stored, emission, &rejections, &unparked)
                    .await?
            };
            if done {
                for code in reasons {
                    tracing::warn!(reason = code, invoice_id = %rec.invoice_id, "parked payment rejected");
                    self.0.service_metrics.rejected.with_label_values(&[code]).inc();
                }
                if !parked.is_empty() {
                    // Only what was read (applied or rejected above): a payment parked since stays.
                    let _: () = redis::pipe()
                        .hdel(&parked_key, parked.iter().map(|(id, _)| id).collect::<Vec<_>>())
                        .ignore()
                        .zrem(
                            self.0.store.parked_index_key(partition),
                            parked
                                .iter()
                                .map(|(id, _)| store::parked_change_key(&rec.tenant, &rec.invoice_id, id))
                                .collect::<Vec<_>>(),
                        )
                        .ignore()
                        .query_async(&mut self.conn())
                        .await?;
                }
                return Ok(());
            }
        }
    }

    /// The rejection of a parked payment its invoice refuses, as the consume loop makes one
    /// for a record it cannot apply: the payment's own record as the source, when known.
    async fn parked_rejection(
        &self,
        rec: &ParkedFor<'_>,
        payment: Option<&ParkedPayment>,
        raw: &str,
        code: &str,
        detail: String,
        trace: TraceContext,
    ) -> Result<Outbound, Failure> {
        let source = payment.and_then(|p| p.source.clone());
        let payment_id = payment.map_or(raw, |p| p.payment_id.as_str());
        let debtor_id = source
            .as_ref()
            .and_then(|s| s.key.as_deref())
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_else(|| rec.debtor_id.to_owned());
        let rejected = records::Rejected {
            event_id: derived_id("rejected-parked-payment", &[rec.tenant, rec.invoice_id, payment_id]),
            tenant: Some(rec.tenant.to_owned()),
            debtor_id: Some(debtor_id.clone()),
            occurred_at: self.0.rt.clock.now().timestamp_millis(),
            service: SERVICE.to_owned(),
            source_topic: source
                .as_ref()
                .map(|s| s.topic.clone())
                .unwrap_or_else(|| self.0.rt.topic(&self.0.topics.payments_matched)),
            source_partition: source.as_ref().map_or(-1, |s| s.partition),
            source_offset: source.as_ref().map_or(-1, |s| s.offset),
            reason_code: code.to_owned(),
            detail,
            raw_key: Some(debtor_id.clone().into_bytes()),
            raw_value: Some(source.and_then(|s| s.value).unwrap_or_else(|| raw.as_bytes().to_vec())),
        };
        let topic = self.0.rt.topic(&self.0.topics.rejected);
        Ok(self.0.rt.codec.outbound(&topic, &debtor_id, &rejected, trace).await?)
    }

    async fn on_payment(&self, rec: PaymentMatched, record: &Inbound) -> Result<(), Failure> {
        let trace = record.trace;
        let amount = payment_amount(&rec)?;
        let currency = amount.currency;
        let _guard = self.stripe(&rec.tenant, &rec.invoice_id).lock().await;
        loop {
            let Some(loaded) = self.load(record.partition, &rec.tenant, &rec.invoice_id).await? else {
                if !amount.is_positive() {
                    // No invoice would take it: refused now rather than parked.
                    return Err(Failure::Reject {
                        code: "payment_not_applicable",
                        detail: format!(
                            "payment '{}' for invoice '{}': the amount {amount} is not positive",
                            rec.payment_id, rec.invoice_id
                        ),
                        tenant: Some(rec.tenant.clone()),
                        debtor_id: Some(rec.debtor_id.clone()),
                    });
                }
                // The invoice's snapshot is on another topic and may not have arrived yet. The
                // record is kept with the payment, for its rejection if the invoice refuses it.
                let parked = serde_json::to_string(&ParkedPayment {
                    payment_id: rec.payment_id.clone(),
                    amount_minor: rec.amount_minor,
                    currency,
                    source: Some(ParkedSource {
                        topic: record.topic.clone(),
                        partition: record.partition,
                        offset: record.offset,
                        key: record.key.clone(),
                        value: record.payload.clone(),
                    }),
                })
                .map_err(|e| Failure::Fatal(e.into()))?;
                let change = self.0.store.changelog().put(
                    record.partition,
                    store::parked_change_key(&rec.tenant, &rec.invoice_id, &rec.payment_id),
                    parked.clone().into_bytes(),
                );
                self.0
                    .producer
                    .send_all(std::slice::from_ref(&change))
                    .await
                    .map_err(|e| Failure::Transient(anyhow::anyhow!(e)))?;
                let _: () = redis::pipe()
                    .hset(
                        self.0.store.parked_key(&rec.tenant, &rec.invoice_id),
                        &rec.payment_id,
                        parked,
                    )
                    .ignore()
                    .zadd(
                        self.0.store.parked_index_key(record.partition),
                        store::parked_change_key(&rec.tenant, &rec.invoice_id, &rec.payment_id),
                        self.0.rt.clock.now().timestamp_millis(),
                    )
                    .ignore()
                    .query_async(&mut self.conn())
                    .await?;
                self.0.metrics.transitions.with_label_values(&["payment_parked"]).inc();
                return Ok(());
            };
            let d = payment_applied(loaded.stored.journey.clone(), &rec, amount)?;
            if d.transitions.is_empty() {
                return Ok(()); // already applied
            }
            let plan = self.plan_of(&d.journey);
            let stored = Stored {
                journey: d.journey.clone(),
                ..loaded.stored
            };
            if self
                .emit_then_save(
                    Some(loaded.version),
                    stored,
                    Emission {
                        decision: &d,
                        plan: &plan,
                        fee: Money::zero(currency),
                        cause: &rec.event_id,
                        trace,
                        covers: &[],
                        merged: &[],
                    },
                )
                .await?
            {
                if d.stops_contact() {
                    if let Some(matched_ms) = record.timestamp_ms {
                        let waited_ms = (Utc::now().timestamp_millis() - matched_ms).max(0);
                        self.0.metrics.payment_to_stop.observe(waited_ms as f64 / 1000.0);
                    }
                }
                return Ok(());
            }
        }
    }

    /// Fires a batch of due timers of one partition together. Returns the timers whose journey
    /// changed between reading and writing (decided again from what is stored), and apart from
    /// them those not fired because an invoice of their debtor was busy elsewhere.
    async fn fire_batch(&self, partition: i32, timers: Vec<Timer>) -> Result<(Vec<Timer>, Vec<Timer>), Failure> {
        let now = self.0.rt.clock.now();
        // Each invoice's stripe, taken only if free: other partitions' batches fire at the
        // same time, and waiting for a stripe one of them holds would wait for its whole batch
        // (a batch of thousands holds as many stripes). A debtor with a fired invoice busy is
        // fired in the next round, whole, so that its invoices due together still go together.
        let stripes: Vec<usize> = timers
            .iter()
            .map(|t| self.stripe_index(&t.tenant, &t.invoice_id))
            .collect();
        let mut held: BTreeSet<usize> = BTreeSet::new();
        let mut busy_stripes: HashSet<usize> = HashSet::new();
        let mut guards = Vec::with_capacity(timers.len());
        for &i in &stripes {
            if held.contains(&i) || busy_stripes.contains(&i) {
                continue;
            }
            match self.0.stripes[i].try_lock() {
                Ok(g) => {
                    held.insert(i);
                    guards.push(g);
                }
                Err(_) => {
                    busy_stripes.insert(i);
                }
            }
        }
        let pairs: Vec<(String, String)> = timers
            .iter()
            .map(|t| (t.tenant.clone(), t.invoice_id.clone()))
            .collect();
        let loaded = self.0.store.load_many(partition, &pairs).await?;
        // Per debtor: its invoices (loaded), each with the timer that fired it, if one did.
        type Members = Vec<(Loaded, Option<Timer>)>;
        let mut debtors: BTreeMap<(String, String), Members> = BTreeMap::new();
        let mut busy_debtors: BTreeMap<(String, String), Vec<Timer>> = BTreeMap::new();
        for ((timer, loaded), stripe) in timers.into_iter().zip(loaded).zip(stripes) {
            match loaded {
                Some(l) => {
                    let debtor = (timer.tenant.clone(), l.stored.journey.invoice.debtor_id.clone());
                    if busy_stripes.contains(&stripe) {
                        // Read while another writes it: only its debtor is taken from it.
                        busy_debtors.entry(debtor).or_default().push(timer);
                    } else {
                        debtors.entry(debtor).or_default().push((l, Some(timer)));
                    }
                }
                None if busy_stripes.contains(&stripe) => {
                    // Perhaps being written right now: looked at again in the next round.
                    busy_debtors
                        .entry((timer.tenant.clone(), String::new()))
                        .or_default()
                        .push(timer);
                }
                None => self.0.store.remove_timer(partition, &timer.member).await?,
            }
        }
        let mut next_round: Vec<Timer> = Vec::new();
        for (debtor, mut busy) in busy_debtors {
            if let Some(free) = debtors.remove(&debtor) {
                next_round.extend(free.into_iter().filter_map(|(_, timer)| timer));
            }
            next_round.append(&mut busy);
        }
        // The debtors' other open invoices: they may join a combined action.
        let keys: Vec<(String, String)> = debtors.keys().cloned().collect();
        let mut others = Vec::new();
        let mut others_debtors = Vec::new();
        for (debtor, ids) in keys.iter().zip(self.0.store.open_invoices(&keys).await?) {
            let mine = &debtors[debtor];
            for id in ids {
                if !mine.iter().any(|(l, _)| l.stored.journey.invoice.invoice_id == id) {
                    others.push((debtor.0.clone(), id));
                    others_debtors.push(debtor.clone());
                }
            }
        }
        // Debtors with an invoice busy elsewhere (being written by the consume loop).
        let mut busy: HashSet<(String, String)> = HashSet::new();
        if !others.is_empty() {
            // Taken only if free: waiting here, out of order, could deadlock with another batch.
            // An invoice busy elsewhere is not combined this time; its own timer still fires.
            let mut free = Vec::with_capacity(others.len());
            for ((tenant, id), debtor) in others.into_iter().zip(others_debtors) {
                let i = self.stripe_index(&tenant, &id);
                if held.contains(&i) {
                    free.push((tenant, id));
                    continue;
                }
                match self.0.stripes[i].try_lock() {
                    Ok(g) => {
                        held.insert(i);
                        guards.push(g);
                        free.push((tenant, id));
                    }
                    Err(_) => {
                        busy.insert(debtor);
                    }
                }
            }
            others = free;
            for l in self.0.store.load_many(partition, &others).await?.into_iter().flatten() {
                let j = &l.stored.journey;
                let debtor = (j.invoice.tenant.clone(), j.invoice.debtor_id.clone());
                if let Some(mine) = debtors.get_mut(&debtor) {
                    mine.push((l, None));
                }
            }
        }

        let policy = self.policy();
        let window = policy.combine_window();
        let merges = |j: &Journey| {
            let today = j.invoice.jurisdiction.local_day(now);
            self.0
                .law
                .merge_rule(&Self::law_context(j), today)
                .map(|r| r.citation.clone())
        };
        // Debtors decided again shortly: a claim that may belong in a hand-off's case was busy.
        let mut deferred: Vec<Timer> = Vec::new();
        let mut outs = Vec::new();
        let mut saves = Vec::new();
        // The journeys' new values and the debtors' late history, for the changelog after the
        // outputs; where each journey's record is among them.
        let mut changes = Vec::new();
        let mut change_at = Vec::new();
        // Per save: the timer to decide again on a conflict, and the debtor who just became late.
        type LateMark = (String, String, String);
        let mut after_save: Vec<(Option<Timer>, Option<LateMark>)> = Vec::new();
        // Decisions that leave a record in their debtor's history (a hand-off), by save.
        let mut history_due: Vec<(usize, Decision)> = Vec::new();
        for (debtor, members) in debtors {
            let invoices: Vec<DebtorInvoice> = members
                .iter()
                .map(|(l, timer)| {
                    let j = &l.stored.journey;
                    let plan = self.plan_of(j);
                    let step = timer.as_ref().map_or(j.next_step, |t| t.step_index);
                    if let Some(t) = timer {
                        let late_ms = (now.timestamp_millis() - t.due_ms).max(0);
                        self.0.metrics.lateness.observe(late_ms as f64 / 1000.0);
                    }
                    let fee = self.fee_for(j, &plan, step, now);
                    DebtorInvoice {
                        journey: j.clone(),
                        fee: fee.amount,
                        fee_not_before: fee.not_before,
                        plan,
                        fired_step: timer.as_ref().map(|t| t.step_index),
                    }
                })
                .collect();
            let merging_handoff = invoices.iter().any(|inv| {
                inv.fired_step
                    .and_then(|s| inv.plan.steps.get(s))
                    .is_some_and(|s| s.kind == journey::StepKind::Handoff)
                    && merges(&inv.journey).is_some()
            });
            if merging_handoff && busy.contains(&debtor) {
                // Not a case without a claim that belongs in it: once the claim is free.
                deferred.extend(members.into_iter().filter_map(|(_, timer)| timer));
                continue;
            }
            let mut fired = journey::fire_together(&invoices, now, window);
            forfall_domain::merge::merge_handoffs(&invoices, &mut fired, now, policy.merge_window(), &merges);
            let covered_line = |index: usize| {
                let before = &invoices[index].journey;
                let after = &fired.iter().find(|f| f.index == index)?.decision.journey;
                let today = after.invoice.jurisdiction.local_day(now);
                let accrued = self.accrued(after, today);
                Some(CoveredInvoice {
                    invoice_id: after.invoice.invoice_id.clone(),
                    invoice_number: after.invoice.invoice_number.clone(),
                    description: after.invoice.description.clone(),
                    open_minor: after.outstanding().minor,
                    fee_minor: after.fees_minor - before.fees_minor,
                    due_date: invoice::epoch_days(after.invoice.due_date),
                    payment_reference: after.invoice.payment_reference.clone(),
                    interest_minor: accrued.interest_minor,
                    compensation_minor: accrued.compensation_minor,
                })
            };
            for f in &fired {
                let (loaded, timer) = &members[f.index];
                let input = &invoices[f.index];
                let d = &f.decision;
                let step_index = input.fired_step.unwrap_or(input.journey.next_step);
                if let (Some(step), true) = (
                    input.plan.steps.get(step_index),
                    d.emit.is_some() || matches!(f.role, Role::Covered { .. }),
                ) {
                    self.0.metrics.fired.with_label_values(&[&step.name]).inc();
                }
                let handoff = d.journey.state == JourneyState::HandedOver;
                let (covers, merged): (Vec<CoveredInvoice>, Vec<Journey>) = match &f.role {
                    // A hand-off's covers are the claims merged into its case.
                    Role::Lead { covers } if handoff => (
                        Vec::new(),
                        covers
                            .iter()
                            .filter_map(|c| fired.iter().find(|g| g.index == *c))
                            .map(|g| g.decision.journey.clone())
                            .collect(),
                    ),
                    Role::Lead { covers } => (covers.iter().filter_map(|c| covered_line(*c)).collect(), Vec::new()),
                    Role::Covered { .. } => {
                        if handoff {
                            self.0.metrics.merged.inc();
                        } else {
                            self.0.metrics.combined.inc();
                        }
                        (Vec::new(), Vec::new())
                    }
                    Role::Alone => (Vec::new(), Vec::new()),
                };
                let late = |s: JourneyState| {
                    matches!(
                        s,
                        JourneyState::Reminded(_) | JourneyState::Warned | JourneyState::HandedOver
                    )
                };
                let inv = &d.journey.invoice;
                let became_late = (late(d.journey.state) && !late(input.journey.state))
                    .then(|| (inv.tenant.clone(), inv.debtor_id.clone(), inv.invoice_id.clone()));
                let prepared = self.0.store.prepare(
                    Save {
                        expected: Some(loaded.version),
                        stored: Stored {
                            journey: d.journey.clone(),
                            ..loaded.stored.clone()
                        },
                        timer: d.timer.clone(),
                        fired_step: input.fired_step,
                        stops_contact: d.stops_contact(),
                    },
                    now.timestamp_millis(),
                )?;
                let cause = format!("timer:{step_index}");
                outs.extend(
                    self.outputs(
                        &Emission {
                            decision: d,
                            plan: &input.plan,
                            fee: input.fee,
                            cause: &cause,
                            // The step continues the invoice's trace where it was kept.
                            trace: loaded.stored.trace.unwrap_or_else(TraceContext::new_root),
                            covers: &covers,
                            merged: &merged,
                        },
                        prepared.upcoming,
                    )
                    .await?,
                );
                change_at.push(changes.len());
                changes.push(self.0.store.change(&prepared));
                if let Some((tenant, debtor, invoice_id)) = &became_late {
                    changes.push(self.0.store.changelog().put(
                        partition,
                        store::late_change_key(tenant, debtor, invoice_id),
                        now.timestamp_millis().to_string().into_bytes(),
                    ));
                }
                if leaves_history_record(d) {
                    history_due.push((saves.len(), d.clone()));
                }
                saves.push(prepared);
                after_save.push((timer.clone(), became_late));
            }
        }
        let due: Vec<&Decision> = history_due.iter().map(|(_, d)| d).collect();
        let history: Vec<(usize, HistoryWrite)> = history_due
            .iter()
            .map(|(save, _)| *save)
            .zip(self.history_writes(&due).await?)
            .filter_map(|(save, write)| write.map(|w| (save, w)))
            .collect();
        for (_, write) in &history {
            changes.extend(write.changes(self.0.store.changelog(), partition));
        }
        self.0.store.stop_contact(&saves).await?;
        let logged = Self::produce_then_log_through(&self.0.timer_producer, &outs, &changes).await?;
        let offsets: Vec<i64> = change_at
            .iter()
            .map(|i| logged.get(*i).copied().unwrap_or(-1))
            .collect();
        let written = self.0.store.save_many(partition, &saves, &offsets).await?;
        drop(guards);
        let mut conflicts = Vec::new();
        let mut histories = redis::pipe();
        // After the journeys, as on the consume path: a stop in between leaves the records
        // on the changelog, where a rebuild finds them.
        let mut any_history = false;
        for (save, write) in &history {
            if written.get(*save) == Some(&store::Written::Yes) {
                write.add_to(&mut histories);
                any_history = true;
            }
        }
        for (written, (timer, became_late)) in written.into_iter().zip(after_save) {
            if written == store::Written::Conflict {
                // A covered invoice without a timer of its own keeps its pending one.
                conflicts.extend(timer);
            } else if let Some((tenant, debtor, invoice_id)) = became_late {
                // The debtor's history: an invoice that needed a reminder counts as late.
                histories
                    .zadd(
                        self.0.store.late_key(&tenant, &debtor),
                        &invoice_id,
                        now.timestamp_millis(),
                    )
                    .ignore();
                histories
                    .zadd(
                        self.0.store.late_index_key(partition),
                        store::late_change_key(&tenant, &debtor, &invoice_id),
                        now.timestamp_millis(),
                    )
                    .ignore();
                any_history = true;
            }
        }
        if any_history {
            let _: () = histories.query_async(&mut self.conn()).await?;
        }
        conflicts.extend(deferred);
        Ok((conflicts, next_round))
    }

    /// A new invoice: the policy chooses its plan (segment, experiment), recorded as an event
    /// with what the propensity model knew of the debtor (and its score, with a model).
    async fn open_journey(&self, incoming: InvoiceSnapshot) -> Result<(Decision, Plan), Failure> {
        let history = self.history_of(&incoming).await?;
        Ok(self.open_journey_with(incoming, history))
    }

    /// [`Watcher::open_journey`] with the debtor's history read (see [`Watcher::histories_of`]).
    fn open_journey_with(
        &self,
        incoming: InvoiceSnapshot,
        (late_last_12m, history): (u32, HistoryFacts),
    ) -> (Decision, Plan) {
        let features = Features::of(&incoming, late_last_12m, history);
        let score = self.0.propensity.as_ref().map(|m| m.score(&features));
        let facts = DebtorFacts {
            jurisdiction: incoming.jurisdiction,
            kind: incoming.debtor_kind,
            late_last_12m,
            propensity: score,
            amount: incoming.amount,
            fee_agreed: incoming.reminder_fee_agreed,
        };
        let (mut d, plan) = opened(&self.policy(), incoming, &facts, self.0.rt.clock.now().date_naive());
        if let Some(chosen) = d.transitions.iter_mut().find(|t| t.kind == "plan_chosen") {
            chosen.propensity = Some(Scored {
                features: features.named(),
                score,
                model_version: self.0.propensity.as_ref().map(|m| m.version.clone()),
            });
        }
        if let Some(e) = &d.journey.experiment {
            self.0
                .metrics
                .transitions
                .with_label_values(&["experiment_assigned"])
                .inc();
            tracing::debug!(experiment = %e, "experiment assigned");
        }
        (d, plan)
    }

    /// The issue date before which a debtor's records are no longer kept.
    fn oldest_kept(&self, today: chrono::NaiveDate) -> chrono::NaiveDate {
        today - chrono::Duration::days(i64::from(self.0.history_retention_days))
    }

    /// The records decisions leave in their debtors' history, where they change it: on the
    /// transitions that say something of the debtor (paid, handed over, a request from the
    /// page, a message that did not reach them; see [`HISTORY_KINDS`]). Their debtors' records
    /// are read in one round trip (none for decisions that leave no record). Each record is derived from the
    /// journey and the record before, so a decision made again writes the same record.
    async fn history_writes(&self, decisions: &[&Decision]) -> Result<Vec<Option<HistoryWrite>>, Failure> {
        let leaves_record = leaves_history_record;
        let mut reads = redis::pipe();
        for d in decisions.iter().filter(|d| leaves_record(d)) {
            let invoice = &d.journey.invoice;
            reads.hgetall(self.0.store.history_key(&invoice.tenant, &invoice.debtor_id));
        }
        let mut records: std::vec::IntoIter<Vec<(String, String)>> = if reads.is_empty() {
            Vec::new().into_iter()
        } else {
            let read: Vec<Vec<(String, String)>> = reads.query_async(&mut self.conn()).await?;
            read.into_iter()
        };
        let mut writes = Vec::with_capacity(decisions.len());
        for d in decisions {
            let write = if leaves_record(d) {
                self.history_change(d, records.next().unwrap_or_default())
            } else {
                None
            };
            writes.push(write);
        }
        Ok(writes)
    }

    /// What `d` changes in a debtor's history read as `records`: its invoice's record, and
    /// the records past their retention (a few dozen at most), which leave with it.
    fn history_change(&self, d: &Decision, records: Vec<(String, String)>) -> Option<HistoryWrite> {
        let invoice = &d.journey.invoice;
        let today = invoice.jurisdiction.local_day(self.0.rt.clock.now());
        let oldest = self.oldest_kept(today);
        let mut before = None;
        let mut pruned = Vec::new();
        for (invoice_id, record) in decode_history(records) {
            if invoice_id == invoice.invoice_id {
                before = record;
            } else if record.is_none_or(|r| r.issued < oldest) {
                pruned.push(invoice_id);
            }
        }
        let record = InvoiceRecord::observe(before.as_ref(), &d.journey, today);
        if before == Some(record) && pruned.is_empty() {
            return None;
        }
        Some(HistoryWrite {
            key: self.0.store.history_key(&invoice.tenant, &invoice.debtor_id),
            tenant: invoice.tenant.clone(),
            debtor_id: invoice.debtor_id.clone(),
            invoice_id: invoice.invoice_id.clone(),
            record: record.encode(),
            pruned,
        })
    }

    /// Polls the timer sets of the partitions this instance is assigned, until shutdown.
    async fn run_timers(self, consumer: Arc<KafkaConsumer>, settings: WatcherSettings) -> anyhow::Result<()> {
        // Shared with each round's batch tasks.
        let settings = Arc::new(settings);
        let invoices_topic = self.0.rt.topic(&self.0.topics.invoices);
        let mut tick = tokio::time::interval(Duration::from_millis(settings.tick_ms.max(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut attempt = 0u32;
        let mut polled: HashSet<i32> = HashSet::new();
        let mut last_sweep = std::time::Instant::now();
        let mut last_counted: Option<std::time::Instant> = None;
        loop {
            tokio::select! {
                _ = self.0.rt.shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let partitions: HashSet<i32> = consumer
                .assignment()
                .map(|a| {
                    a.elements()
                        .iter()
                        .filter(|e| e.topic() == invoices_topic)
                        .map(|e| e.partition())
                        .collect()
                })
                .unwrap_or_default();
            for gone in polled.difference(&partitions) {
                // Its next owner checks its state afresh; were it ours again, so would we.
                self.forget_ready(*gone);
                self.0.store.forget_partition(*gone);
                // Revoked: its next owner need not wait for the lock to expire.
                if let Err(e) = self.0.store.release(*gone, &self.0.holder).await {
                    tracing::warn!(error = ?e, partition = gone, "could not release a timer lock");
                }
            }
            polled = partitions.clone();
            let mut partitions: Vec<i32> = partitions.into_iter().collect();
            partitions.sort_unstable();
            match self.0.store.missing_state(&partitions).await {
                Ok(missing) => {
                    for p in missing.into_iter().filter(|p| self.is_ready(*p)) {
                        tracing::warn!(partition = p, "journey state missing or behind in Redis; rebuilding it");
                        self.forget_ready(p);
                    }
                }
                Err(e) => tracing::warn!(error = ?e, "could not read the partitions' state markers"),
            }
            if last_sweep.elapsed() >= Duration::from_secs(settings.retention_sweep_secs.max(1)) {
                last_sweep = std::time::Instant::now();
                for p in partitions.iter().copied().filter(|p| self.is_ready(*p)) {
                    if let Err(e) = self.sweep_parked(p, settings.parked_retention_days).await {
                        let e = self.noticing_missing_state(e);
                        tracing::warn!(error = ?e, partition = p, "refusing long-parked payments failed; the next sweep retries");
                    }
                    if let Err(e) = self.sweep_late(p).await {
                        let e = self.noticing_missing_state(e);
                        tracing::warn!(error = ?e, partition = p, "removing late history past 12 months failed; the next sweep retries");
                    }
                    if let Err(e) = self.sweep_closed(p, settings.closed_retention_days).await {
                        let e = self.noticing_missing_state(e);
                        tracing::warn!(error = ?e, partition = p, "removing closed journeys past their retention failed; the next sweep retries");
                    }
                }
            }
            if last_counted.is_none_or(|t| t.elapsed() >= Duration::from_millis(settings.open_invoices_refresh_ms)) {
                last_counted = Some(std::time::Instant::now());
                let ready: Vec<i32> = partitions.iter().copied().filter(|p| self.is_ready(*p)).collect();
                if let Err(e) = self.count_open(&ready).await {
                    tracing::warn!(error = ?e, "could not read the open-invoice counts; the next refresh retries");
                }
            }
            if let Err(e) = self.ensure_ready_all(&partitions).await {
                let wait = forfall_platform::kafka::backoff(attempt);
                attempt = attempt.saturating_add(1);
                tracing::warn!(error = ?e, "rebuilding the state of assigned partitions failed; retrying");
                tokio::time::sleep(wait).await;
                continue;
            }
            // Rounds of one batch per partition, several partitions at once, until none has
            // more due: a partition with a backlog does not hold the others back. Each batch is
            // a task of its own, so that batches decide on different cores, not in turns on
            // this task's thread (and stops with this loop when it is stopped).
            loop {
                let rounds: Vec<(i32, Result<bool, Failure>)> = futures::stream::iter(partitions.iter().copied())
                    .map(|p| {
                        let (this, settings) = (self.clone(), Arc::clone(&settings));
                        let batch = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
                            this.fire_due(p, &settings).await
                        }));
                        async move {
                            let fired = batch.await.unwrap_or_else(|e| {
                                Err(Failure::Fatal(anyhow::anyhow!(
                                    "a timer batch of partition {p} panicked: {e}"
                                )))
                            });
                            (p, fired)
                        }
                    })
                    .buffer_unordered(settings.partitions_in_flight.max(1))
                    .collect()
                    .await;
                let mut more = false;
                for (partition, result) in rounds {
                    match result {
                        Ok(m) => {
                            more |= m;
                            attempt = 0;
                        }
                        Err(Failure::Transient(e)) => {
                            let wait = forfall_platform::kafka::backoff(attempt);
                            attempt = attempt.saturating_add(1);
                            tracing::warn!(error = %e, partition, "timer poll failed, retrying");
                            tokio::time::sleep(wait).await;
                        }
                        Err(Failure::Fatal(e)) => return Err(e.context("firing timers")),
                        Err(Failure::Reject { code, detail, .. }) => {
                            tracing::error!(code, %detail, "timer could not be fired")
                        }
                    }
                }
                if !more || self.0.rt.shutdown.is_cancelled() {
                    break;
                }
            }
        }
        for partition in polled {
            if let Err(e) = self.0.store.release(partition, &self.0.holder).await {
                tracing::warn!(error = ?e, partition, "could not release a timer lock at shutdown");
            }
        }
        Ok(())
    }

    /// Refuses the payments of `partition` parked longer than `days` for an invoice that never
    /// arrived: each goes to the rejected topic with its own record and the reason, then leaves
    /// the changelog (a tombstone) and Redis. One whose invoice has arrived meanwhile is left to
    /// that invoice's next snapshot.
    async fn sweep_parked(&self, partition: i32, days: u32) -> Result<usize, Failure> {
        let cutoff = self.0.rt.clock.now() - chrono::Duration::days(i64::from(days));
        let index = self.0.store.parked_index_key(partition);
        let old = self.0.store.older_than(&index, cutoff, 200).await?;
        let mut refused = 0;
        for change_key in old {
            let Some(store::ChangeKey::Parked {
                tenant,
                invoice_id,
                payment_id,
            }) = store::ChangeKey::parse(change_key.as_bytes())
            else {
                let _: () = redis::cmd("ZREM")
                    .arg(&index)
                    .arg(&change_key)
                    .query_async(&mut self.conn())
                    .await?;
                continue;
            };
            let Ok(_guard) = self.stripe(&tenant, &invoice_id).try_lock() else {
                continue; // busy: the next sweep
            };
            let parked_key = self.0.store.parked_key(&tenant, &invoice_id);
            let raw: Option<String> = redis::cmd("HGET")
                .arg(&parked_key)
                .arg(&payment_id)
                .query_async(&mut self.conn())
                .await?;
            let arrived = self.load(partition, &tenant, &invoice_id).await?.is_some();
            let (Some(raw), false) = (raw, arrived) else {
                let _: () = redis::cmd("ZREM")
                    .arg(&index)
                    .arg(&change_key)
                    .query_async(&mut self.conn())
                    .await?;
                continue;
            };
            let payment = serde_json::from_str::<ParkedPayment>(&raw).ok();
            let debtor_id = payment
                .as_ref()
                .and_then(|p| p.source.as_ref())
                .and_then(|s| s.key.as_deref())
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .unwrap_or_default();
            let parked_for = ParkedFor {
                tenant: &tenant,
                invoice_id: &invoice_id,
                debtor_id: &debtor_id,
            };
            let code = "invoice_never_arrived";
            let detail = format!(
                "payment '{payment_id}' was matched to invoice '{invoice_id}', which never arrived: refused after {days} days waiting for it"
            );
            let rejection = self
                .parked_rejection(
                    &parked_for,
                    payment.as_ref(),
                    &raw,
                    code,
                    detail,
                    TraceContext::new_root(),
                )
                .await?;
            let tombstone = self.0.store.changelog().delete(partition, change_key.clone());
            self.produce_then_log(std::slice::from_ref(&rejection), std::slice::from_ref(&tombstone))
                .await?;
            let _: () = redis::pipe()
                .hdel(&parked_key, &payment_id)
                .ignore()
                .zrem(&index, &change_key)
                .ignore()
                .query_async(&mut self.conn())
                .await?;
            self.0.service_metrics.rejected.with_label_values(&[code]).inc();
            tracing::warn!(reason = code, invoice_id = %invoice_id, "parked payment refused");
            refused += 1;
        }
        Ok(refused)
    }

    /// Forgets the late history of `partition` older than the 12 months segments look at:
    /// from the changelog first (a tombstone), then Redis. Kept no longer than it is used.
    async fn sweep_late(&self, partition: i32) -> Result<usize, Failure> {
        let cutoff = self.0.rt.clock.now() - chrono::Duration::days(LATE_HISTORY_DAYS);
        let index = self.0.store.late_index_key(partition);
        let old = self.0.store.older_than(&index, cutoff, 1000).await?;
        if old.is_empty() {
            return Ok(0);
        }
        let changelog = self.0.store.changelog();
        let tombstones: Vec<Outbound> = old.iter().map(|k| changelog.delete(partition, k.clone())).collect();
        self.0
            .producer
            .send_all(&tombstones)
            .await
            .map_err(|e| Failure::Transient(anyhow::anyhow!(e)))?;
        let mut pipe = redis::pipe();
        for k in &old {
            if let Some(store::ChangeKey::Late {
                tenant,
                debtor_id,
                invoice_id,
            }) = store::ChangeKey::parse(k.as_bytes())
            {
                pipe.zrem(self.0.store.late_key(&tenant, &debtor_id), invoice_id)
                    .ignore();
            }
            pipe.zrem(&index, k).ignore();
        }
        let _: () = pipe.query_async(&mut self.conn()).await?;
        tracing::info!(partition, removed = old.len(), "late history past 12 months removed");
        Ok(old.len())
    }

    /// Sets the open-invoice gauge from the counts of the partitions this instance owns (each
    /// instance its own, so that their sum is the whole).
    async fn count_open(&self, partitions: &[i32]) -> Result<(), Failure> {
        let counts = self.0.store.open_counts(partitions).await?;
        let mut by_stage: BTreeMap<(String, &'static str), i64> = BTreeMap::new();
        for ((tenant, status), n) in counts {
            let Some(state) = JourneyState::from_label(&status) else {
                tracing::warn!(status = %status, "an open-invoice count of an unknown status; not shown");
                continue;
            };
            *by_stage
                .entry((tenant, forfall_domain::settlement::stage(state)))
                .or_insert(0) += n;
        }
        let gauge = &self.0.metrics.open_invoices;
        gauge.reset();
        for ((tenant, stage), n) in by_stage {
            gauge.with_label_values(&[&tenant, stage]).set(n);
        }
        Ok(())
    }

    /// Removes the closed journeys of `partitions` whose retention has passed: each leaves the
    /// changelog first (a tombstone, so a rebuild does not bring it back), then Redis. An invoice
    /// busy in another task is left for the next sweep; one reopened since is kept.
    async fn sweep_closed(&self, partition: i32, retention_days: u32) -> Result<usize, Failure> {
        let cutoff = self.0.rt.clock.now() - chrono::Duration::days(i64::from(retention_days));
        let closed_key = self.0.store.closed_key(partition);
        let due = self.0.store.older_than(&closed_key, cutoff, 1000).await?;
        let mut guards = Vec::new();
        let mut mine = Vec::new();
        for (tenant, invoice_id) in due.iter().filter_map(|f| journey_state::split_pair(f)) {
            if let Ok(g) = self.stripe(tenant, invoice_id).try_lock() {
                guards.push(g);
                mine.push((tenant.to_owned(), invoice_id.to_owned()));
            }
        }
        let loaded = self.0.store.load_many(partition, &mine).await?;
        let changelog = self.0.store.changelog();
        let mut tombstones = Vec::new();
        let mut pipe = redis::pipe();
        for ((tenant, invoice_id), l) in mine.iter().zip(&loaded) {
            let closed = l
                .as_ref()
                .is_some_and(|l| matches!(l.stored.journey.state, JourneyState::Closed(_)));
            if closed {
                tombstones.push(changelog.delete(partition, store::journey_change_key(tenant, invoice_id)));
                let at = journey_state::location(self.0.store.keys(), tenant, invoice_id);
                pipe.hdel(at.key, at.field).ignore();
            }
            pipe.zrem(&closed_key, journey_state::pair_field(tenant, invoice_id))
                .ignore();
        }
        self.0
            .producer
            .send_all(&tombstones)
            .await
            .map_err(|e| Failure::Transient(anyhow::anyhow!(e)))?;
        // Every journey due may be busy (its stripe held): then there is nothing to write.
        if !pipe.is_empty() {
            let _: () = pipe.query_async(&mut self.conn()).await?;
        }
        drop(guards);
        if !tombstones.is_empty() {
            tracing::info!(
                partition,
                removed = tombstones.len(),
                retention_days,
                "closed journeys past their retention removed"
            );
        }
        Ok(tombstones.len())
    }

    /// Fires one batch of a partition's due timers if this instance holds its lock; whether
    /// more may be due.
    async fn fire_due(&self, partition: i32, settings: &WatcherSettings) -> Result<bool, Failure> {
        self.fire_due_ready(partition, settings)
            .await
            .map_err(|f| self.noticing_missing_state(f))
    }

    async fn fire_due_ready(&self, partition: i32, settings: &WatcherSettings) -> Result<bool, Failure> {
        self.ensure_ready(partition).await?;
        {
            let now_ms = self.0.rt.clock.now().timestamp_millis();
            let Some(due) = self
                .0
                .store
                .claim_due(
                    partition,
                    &self.0.holder,
                    settings.timer_lock_ms,
                    now_ms,
                    settings.batch.max(1),
                )
                .await?
            else {
                return Ok(false); // another instance fires this partition
            };
            let claimed = due.len();
            let mut timers = Vec::with_capacity(claimed);
            for (member, due_ms) in due {
                match store::parse_member(&member, due_ms) {
                    Some(t) => timers.push(t),
                    None => {
                        tracing::error!(partition, "unreadable timer dropped");
                        self.0.store.remove_timer(partition, &member).await?;
                    }
                }
            }
            let span = tracing::info_span!("fire_timers", service = SERVICE, partition, timers = timers.len());
            let mut redecided = 0;
            let waiting_since = std::time::Instant::now();
            while !timers.is_empty() {
                let (again, busy) = self.fire_batch(partition, timers).instrument(span.clone()).await?;
                if again.is_empty() {
                    // Only ones busy in another batch or the consume loop left: a moment for
                    // them, then (well within the claim's lock) they are left due for the next poll.
                    if !busy.is_empty() {
                        if waiting_since.elapsed() > Duration::from_millis(settings.timer_lock_ms / 4) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                } else {
                    redecided += 1;
                }
                timers = again;
                timers.extend(busy);
                if redecided > 10 && !timers.is_empty() {
                    // Journeys changing this fast are left due: the next poll takes them again.
                    tracing::warn!(partition, left = timers.len(), "timers still contended after 10 tries");
                    break;
                }
            }
            Ok(claimed >= settings.batch.max(1))
        }
    }
}

/// The journey a new invoice opens: the plan the policy chooses for the debtor's facts
/// (segment, experiment), the choice recorded as a `plan_chosen` transition.
pub fn opened(
    policy: &Policy,
    incoming: InvoiceSnapshot,
    facts: &DebtorFacts,
    today: chrono::NaiveDate,
) -> (Decision, Plan) {
    let choice = policy.choose(&incoming.tenant, &incoming.debtor_id, facts, today);
    let mut d = journey::on_invoice(None, incoming, &choice.plan);
    d.journey.segment = Some(choice.segment.clone());
    d.journey.experiment = choice.experiment.clone();
    d.transitions.insert(
        1.min(d.transitions.len()),
        Transition {
            kind: "plan_chosen",
            from: JourneyState::Open,
            to: JourneyState::Open,
            step: None,
            rule: Some(format!(
                "policy {} segment '{}' → plan '{}'",
                policy.version, choice.segment, choice.plan.name
            )),
            reason: choice
                .experiment
                .map(|e| format!("experiment {e} (late invoices in 12 months: {})", facts.late_last_12m)),
            propensity: None,
        },
    );
    (d, choice.plan)
}

/// The transitions after which an invoice's record in its debtor's history may change.
/// Not at a plan choice: an invoice counts once its debtor did something with it, so that a
/// billing run's million new invoices write nothing here.
const HISTORY_KINDS: [&str; 10] = [
    "paid",
    "handed_over",
    "disputed",
    "postponed",
    "instalment_plan_agreed",
    "promised_to_pay",
    "claims_paid",
    "fresh_link_sent",
    "message_failed",
    "message_bounced",
];

/// An invoice's new record in its debtor's history, and the debtor's records past retention.
struct HistoryWrite {
    key: String,
    tenant: String,
    debtor_id: String,
    invoice_id: String,
    record: String,
    pruned: Vec<String>,
}

impl HistoryWrite {
    /// The changelog records of the write: the record, and the pruned ones' deletions.
    fn changes(&self, changelog: &forfall_platform::changelog::Changelog, partition: i32) -> Vec<Outbound> {
        let key = |invoice_id: &str| store::history_change_key(&self.tenant, &self.debtor_id, invoice_id);
        std::iter::once(changelog.put(partition, key(&self.invoice_id), self.record.clone().into_bytes()))
            .chain(self.pruned.iter().map(|id| changelog.delete(partition, key(id))))
            .collect()
    }

    /// Its Redis commands, added to `pipe`.
    fn add_to(&self, pipe: &mut redis::Pipeline) {
        pipe.hset(&self.key, &self.invoice_id, &self.record).ignore();
        if !self.pruned.is_empty() {
            pipe.hdel(&self.key, &self.pruned).ignore();
        }
    }
}

/// Whether `d` says something of its debtor that the debtor's history keeps.
fn leaves_history_record(d: &Decision) -> bool {
    d.transitions.iter().any(|t| HISTORY_KINDS.contains(&t.kind))
}

/// A debtor's stored records by invoice, decoded; one that cannot be read is `None` (left out
/// of the sums, and pruned or written anew at the next write).
fn decode_history(records: Vec<(String, String)>) -> impl Iterator<Item = (String, Option<InvoiceRecord>)> {
    records.into_iter().map(|(invoice_id, text)| {
        let record = InvoiceRecord::decode(&text)
            .inspect_err(|e| tracing::warn!(error = %e, "a history record cannot be read"))
            .ok();
        (invoice_id, record)
    })
}

/// The invoice a parked payment waits for.
struct ParkedFor<'a> {
    tenant: &'a str,
    invoice_id: &'a str,
    debtor_id: &'a str,
}

#[derive(Debug, Serialize, Deserialize)]
struct ParkedPayment {
    payment_id: String,
    amount_minor: i64,
    currency: Currency,
    /// The `PaymentMatched` record it came from (absent in payments parked by older versions).
    #[serde(default)]
    source: Option<ParkedSource>,
}

/// Where a parked payment came from: what its rejection cites.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ParkedSource {
    topic: String,
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
}

impl Watcher {
    /// What a debtor asked for (the portal's requests): pauses, postponements, instalments.
    async fn on_debtor_request(&self, rec: DebtorRequest, partition: i32, trace: TraceContext) -> Result<(), Failure> {
        let reject = |code: &'static str, detail: String| Failure::Reject {
            code,
            detail,
            tenant: Some(rec.tenant.clone()),
            debtor_id: Some(rec.debtor_id.clone()),
        };
        let date = |days: Option<i32>, field: &str| {
            days.and_then(invoice::date_from_epoch_days).ok_or_else(|| {
                reject(
                    "missing_field",
                    format!("a '{}' request needs field '{field}'", rec.kind),
                )
            })
        };
        let _guard = self.stripe(&rec.tenant, &rec.invoice_id).lock().await;
        loop {
            let Some(loaded) = self.load(partition, &rec.tenant, &rec.invoice_id).await? else {
                return Err(reject(
                    "unknown_invoice",
                    format!("invoice '{}' has no journey", rec.invoice_id),
                ));
            };
            let currency = loaded.stored.journey.invoice.amount.currency;
            let request = match rec.kind.as_str() {
                "dispute" => Request::Dispute {
                    reason: rec.reason.clone(),
                },
                "dispute_resolved" => Request::DisputeResolved {
                    resolution: rec.reason.clone(),
                },
                "postpone" => Request::Postpone {
                    to: date(rec.new_due_date, "new_due_date")?,
                },
                "promise_to_pay" => Request::PromiseToPay {
                    by: date(rec.promise_date, "promise_date")?,
                },
                "claims_paid" => Request::ClaimsPaid,
                "fresh_link" => Request::FreshLink,
                "instalment_plan" => Request::InstalmentPlan {
                    parts: rec
                        .instalments
                        .iter()
                        .map(|i| {
                            date(Some(i.due_date), "instalments.due_date")
                                .map(|d| (d, Money::new(i.amount_minor, currency)))
                        })
                        .collect::<Result<_, _>>()?,
                },
                other => {
                    return Err(reject(
                        "unknown_request_kind",
                        format!(
                            "request kind '{other}': expected dispute, dispute_resolved, postpone, instalment_plan, promise_to_pay, claims_paid or fresh_link"
                        ),
                    ));
                }
            };
            let plan = self.plan_of(&loaded.stored.journey);
            let policy = self.policy();
            let now = self.0.rt.clock.now();
            let today = now
                .with_timezone(&loaded.stored.journey.invoice.jurisdiction.time_zone())
                .date_naive();
            let d = journey::on_request(
                loaded.stored.journey.clone(),
                &rec.event_id,
                request,
                &plan,
                &policy.pauses,
                today,
            );
            if d.transitions.is_empty() {
                return Ok(()); // applied before
            }
            let stored = Stored {
                journey: d.journey.clone(),
                ..loaded.stored
            };
            let emission = Emission {
                decision: &d,
                plan: &plan,
                fee: Money::zero(currency),
                cause: &rec.event_id,
                trace,
                covers: &[],
                merged: &[],
            };
            if self.emit_then_save(Some(loaded.version), stored, emission).await? {
                return Ok(());
            }
        }
    }
}

/// The step and tone of a fresh link sent on the debtor's request.
const FRESH_LINK: &str = "fresh_link";

impl Watcher {
    /// Makes sure partition `partition`'s state is in Redis before anything of it is decided:
    /// rebuilt from the changelog where it is missing or behind (see [`rebuild`]).
    async fn ensure_ready(&self, partition: i32) -> Result<(), Failure> {
        self.ensure_ready_all(&[partition]).await
    }

    /// [`Watcher::ensure_ready`] for several partitions, rebuilt in one replay (a new
    /// assignment's are, by the timer loop, as soon as it sees them).
    async fn ensure_ready_all(&self, partitions: &[i32]) -> Result<(), Failure> {
        let missing = |w: &Self| -> Vec<i32> { partitions.iter().copied().filter(|p| !w.is_ready(*p)).collect() };
        if missing(self).is_empty() {
            return Ok(());
        }
        let _one_at_a_time = self.0.rebuilding.lock().await;
        let todo = missing(self);
        if todo.is_empty() {
            return Ok(());
        }
        let _not_ready = self.0.readiness.rebuilding_state();
        let span = tracing::info_span!("rebuild", service = SERVICE, partitions = ?todo);
        let topic = self.0.store.changelog().topic.clone();
        let progress = rebuild::rebuild(
            &self.0.rt.config.kafka,
            &topic,
            &self.0.store,
            self.0.redis.clone(),
            &todo,
            |p| tracing::info!(progress = %p, "rebuilding journey state"),
        )
        .instrument(span)
        .await
        .map_err(Failure::Transient)?;
        if progress.records > 0 {
            tracing::warn!(partitions = ?todo, records = progress.records, "journey state rebuilt from the changelog");
        }
        self.0.ready.lock().unwrap_or_else(|p| p.into_inner()).extend(todo);
        Ok(())
    }

    fn is_ready(&self, partition: i32) -> bool {
        self.0
            .ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&partition)
    }

    /// The partition's state was found missing or behind: rebuilt before it is used again.
    fn forget_ready(&self, partition: i32) {
        self.0
            .ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&partition);
    }

    /// Passes a failure on, noting the partition whose state it found missing, if it did.
    fn noticing_missing_state(&self, failure: Failure) -> Failure {
        if let Failure::Transient(e) = &failure
            && let Some(missing) = e.downcast_ref::<store::StateMissing>()
        {
            let partition = missing.partition;
            tracing::warn!(partition, error = %e, "journey state missing; rebuilding it before going on");
            self.forget_ready(partition);
        }
        failure
    }

    async fn handle_ready(&self, record: &Inbound) -> Result<(), Failure> {
        self.ensure_ready(record.partition).await?;
        let decoded = self.0.rt.codec.decode(record.payload.as_deref()).await?;
        match decoded.name.as_str() {
            DebtorRequest::FULL_NAME => {
                self.on_debtor_request(decoded.to()?, record.partition, record.trace)
                    .await?
            }
            records::Invoice::FULL_NAME => self.on_invoice(decoded.to()?, record.partition, record.trace).await?,
            PaymentMatched::FULL_NAME => self.on_payment(decoded.to()?, record).await?,
            DispatchOutcome::FULL_NAME => self.on_outcome(decoded.to()?, record.partition, record.trace).await?,
            HandoffOutcome::FULL_NAME => {
                self.on_handoff_outcome(decoded.to()?, record.partition, record.trace)
                    .await?
            }
            other => {
                return Err(Failure::reject(
                    "unexpected_record_type",
                    format!("the watcher does not handle '{other}'"),
                ));
            }
        }
        Ok(())
    }
}

impl Watcher {
    /// What became of a message (sent, delivered, bounced, failed, suppressed, a duplicate held
    /// back): part of the invoice's timeline, and kept in its journey (and in those of the
    /// other invoices a combined message listed) as the hand-off's evidence. The journey goes
    /// on by its plan: retries and fallback channels are dispatch's.
    async fn on_outcome(&self, rec: DispatchOutcome, partition: i32, trace: TraceContext) -> Result<(), Failure> {
        let status = format!("{:?}", rec.status).to_lowercase();
        let kind = match rec.status {
            DispatchStatus::Sent => "message_sent",
            DispatchStatus::Delivered => "message_delivered",
            DispatchStatus::Bounced => "message_bounced",
            DispatchStatus::Failed => "message_failed",
            DispatchStatus::Suppressed => "message_suppressed",
            DispatchStatus::Duplicate => "message_duplicate",
        };
        let evidence = evidence_of(&rec);
        let mut invoices = vec![rec.invoice_id.as_str()];
        invoices.extend(rec.covered_invoice_ids.iter().map(String::as_str));
        for (i, invoice_id) in invoices.into_iter().enumerate() {
            // The timeline entry is the lead invoice's, as before combined messages were kept.
            let timeline = (i == 0).then(|| Transition {
                kind,
                from: JourneyState::Open,
                to: JourneyState::Open,
                step: Some(rec.step.clone()),
                rule: None,
                reason: Some(match &rec.reason {
                    Some(r) => format!("{} {status}: {r}", rec.channel),
                    None => format!("{} {status}", rec.channel),
                }),
                propensity: None,
            });
            self.record_message(&rec, invoice_id, evidence.clone(), timeline, partition, trace)
                .await?;
        }
        Ok(())
    }

    /// Keeps `evidence` in the journey of `invoice_id` (written like any decision: events, then
    /// the journey, compare-and-set) and puts `timeline` on its timeline; a redelivered outcome
    /// changes nothing and produces the same event again.
    async fn record_message(
        &self,
        rec: &DispatchOutcome,
        invoice_id: &str,
        evidence: Option<MessageEvidence>,
        timeline: Option<Transition>,
        partition: i32,
        trace: TraceContext,
    ) -> Result<(), Failure> {
        let cause = format!("outcome:{}", rec.event_id);
        let _guard = self.stripe(&rec.tenant, invoice_id).lock().await;
        loop {
            let loaded = match self.load(partition, &rec.tenant, invoice_id).await {
                // Only the timeline and the evidence depend on it: refused with the reason.
                Err(Failure::Fatal(e)) => {
                    return Err(Failure::Reject {
                        code: "journey_unreadable",
                        detail: format!("outcome for invoice '{invoice_id}': its journey cannot be read: {e}"),
                        tenant: Some(rec.tenant.clone()),
                        debtor_id: Some(rec.debtor_id.clone()),
                    });
                }
                other => other?,
            };
            let Some(loaded) = loaded else {
                // Removed after its retention (or never ours): nothing to add it to.
                return Ok(());
            };
            let mut journey = loaded.stored.journey.clone();
            if let Some(e) = evidence.clone() {
                forfall_domain::evidence::record(&mut journey.messages, e);
            }
            let transitions: Vec<Transition> = timeline
                .iter()
                .cloned()
                .map(|t| Transition {
                    from: journey.state,
                    to: journey.state,
                    ..t
                })
                .collect();
            let d = Decision {
                journey,
                transitions,
                timer: TimerChange::Keep,
                emit: None,
            };
            if self.record(&loaded, &d, &cause, trace).await? {
                return Ok(());
            }
        }
    }

    /// Writes a decision that takes no step (a timeline entry, evidence, the agency's word):
    /// its events alone when it leaves the journey as it was (news that changes nothing, or a
    /// redelivery, whose events carry the same ids), else its events and then the journey,
    /// compare-and-set. False when the journey changed since `loaded`: decide again.
    async fn record(&self, loaded: &Loaded, d: &Decision, cause: &str, trace: TraceContext) -> Result<bool, Failure> {
        let plan = self.plan_of(&d.journey);
        let emission = Emission {
            decision: d,
            plan: &plan,
            fee: Money::zero(d.journey.invoice.amount.currency),
            cause,
            trace,
            covers: &[],
            merged: &[],
        };
        if d.journey == loaded.stored.journey {
            let upcoming = loaded.stored.pending_step.zip(loaded.stored.pending_fire_ms);
            let outs = self.outputs(&emission, upcoming).await?;
            self.0
                .producer
                .send_all(&outs)
                .await
                .map_err(|e| Failure::Transient(anyhow::anyhow!(e)))?;
            return Ok(true);
        }
        let stored = Stored {
            journey: d.journey.clone(),
            ..loaded.stored.clone()
        };
        self.emit_then_save(Some(loaded.version), stored, emission).await
    }
}

/// What an outcome says of a message for the evidence: nothing for one never sent (suppressed,
/// or no channel the debtor accepts).
fn evidence_of(rec: &DispatchOutcome) -> Option<MessageEvidence> {
    let delivery = match rec.status {
        DispatchStatus::Sent => Delivery::Sent,
        DispatchStatus::Delivered => Delivery::Delivered,
        DispatchStatus::Bounced => Delivery::Bounced,
        DispatchStatus::Failed if rec.channel != "none" => Delivery::Failed,
        // Held back because it may have gone out already: it may have reached the debtor.
        DispatchStatus::Duplicate if rec.reason.as_deref().is_some_and(|r| r.contains("delivery unknown")) => {
            Delivery::Unknown
        }
        _ => return None,
    };
    Some(MessageEvidence {
        action_id: rec.action_id.clone(),
        step: rec.step.clone(),
        channel: rec.channel.clone(),
        at_ms: rec.occurred_at,
        delivery,
        content_sha256: rec.content_sha256.clone(),
        provider_message_id: rec.provider_message_id.clone(),
    })
}

impl Handler for Watcher {
    async fn handle(&self, record: &Inbound) -> Result<Vec<Outbound>, Failure> {
        self.handle_ready(record)
            .await
            .map_err(|f| self.noticing_missing_state(f))?;
        self.0.metrics.decided.with_label_values(&["alone"]).inc();
        Ok(Vec::new())
    }

    async fn handle_batch(&self, records: &[Inbound]) -> Vec<Result<Vec<Outbound>, Failure>> {
        batch::handle(self, records).await
    }
}

/// Runs the watcher until shutdown.
fn read_file(path: &str, what: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read the {what} file {path}: {e}"))
}

/// The law in force: built in, or the configured override files, checked.
pub fn load_law(settings: &WatcherSettings) -> anyhow::Result<LawBook> {
    let rules = match &settings.law_rules_file {
        Some(p) => read_file(p, "law rules")?,
        None => forfall_domain::law::BUILTIN_RULES.to_owned(),
    };
    let rates = match &settings.law_rates_file {
        Some(p) => read_file(p, "reference rates")?,
        None => forfall_domain::law::BUILTIN_RATES.to_owned(),
    };
    Ok(LawBook::from_toml(&rules, &rates)?)
}

/// The configured policy, checked against the law as of `on`; any problem refuses it.
/// The propensity model the settings name, checked against the features this version computes.
pub fn load_propensity(settings: &WatcherSettings) -> anyhow::Result<Option<PropensityModel>> {
    let Some(path) = &settings.propensity_model else {
        return Ok(None);
    };
    let text = read_file(path, "propensity model")?;
    let model: PropensityModel =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("propensity model {path}: {e}"))?;
    model
        .check()
        .map_err(|e| anyhow::anyhow!("propensity model {path}: {e}"))?;
    tracing::info!(version = %model.version, auc = model.metrics.auc, "propensity model loaded");
    Ok(Some(model))
}

pub fn load_policy(settings: &WatcherSettings, law: &LawBook, on: chrono::NaiveDate) -> anyhow::Result<Policy> {
    let text = match &settings.policy_file {
        Some(p) => read_file(p, "policy")?,
        None => policy::DEFAULT_POLICY.to_owned(),
    };
    let source = settings.policy_file.as_deref().unwrap_or("the built-in default policy");
    policy::load(&text, law, on).map_err(|e| anyhow::anyhow!("{source}: {e}"))
}

impl Watcher {
    /// Re-reads the policy file when it changes; a refused policy leaves the running one in force.
    async fn reload_policy(self, settings: WatcherSettings) {
        let Some(path) = settings.policy_file.clone() else {
            return;
        };
        let mut last = std::fs::read_to_string(&path).unwrap_or_default();
        let mut tick = tokio::time::interval(Duration::from_secs(settings.policy_reload_secs.max(1)));
        loop {
            tokio::select! {
                _ = self.0.rt.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            if text == last {
                continue;
            }
            last = text;
            match load_policy(&settings, &self.0.law, self.0.rt.clock.now().date_naive()) {
                Ok(p) => {
                    tracing::info!(version = %p.version, "policy reloaded");
                    self.0.metrics.policy_reloads.with_label_values(&["applied"]).inc();
                    self.0.metrics.zero_experiments(&p);
                    *self.0.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(p);
                }
                Err(e) => {
                    tracing::error!(error = %e, running = %self.policy().version, "policy reload refused; keeping the running policy");
                    self.0.metrics.policy_reloads.with_label_values(&["refused"]).inc();
                }
            }
        }
    }
}

/// Runs the watcher until shutdown. Refuses to start with a policy that breaks the law.
pub async fn run(rt: Runtime) -> anyhow::Result<()> {
    let settings: WatcherSettings = config::section(&rt.figment, SERVICE)?;
    let law = load_law(&settings)?;
    let policy = load_policy(&settings, &law, rt.clock.now().date_naive())?;
    tracing::info!(version = %policy.version, segments = policy.segments.len(), "policy loaded");
    // The staff endpoint answers once the watcher below exists.
    let handle: Arc<std::sync::OnceLock<Watcher>> = Arc::default();
    let staff_token = settings.staff_token.clone();
    let routes = preview::routes(handle.clone(), staff_token.clone()).merge(experiments::routes(
        handle.clone(),
        staff_token,
        std::time::Duration::from_secs(settings.experiment_report_max_age_secs),
    ));
    let shell = ServiceShell::start(&rt, SERVICE, PORT_OFFSET, Some(routes)).await?;
    let transitions = IntCounterVec::new(
        Opts::new("watcher_transitions_total", "Journey transitions, by kind"),
        &["kind"],
    )?;
    let settlements = IntCounterVec::new(
        Opts::new(
            "watcher_settlements_total",
            "Invoices paid in full, by where in the journey (before any message, after the nudge, after reminder N, at the agency, ...)",
        ),
        &["stage"],
    )?;
    let fired = IntCounterVec::new(
        Opts::new("watcher_steps_fired_total", "Plan steps fired, by step"),
        &["step"],
    )?;
    let lateness = Histogram::with_opts(
        HistogramOpts::new(
            "watcher_timer_lateness_seconds",
            "How late a step fired after it fell due (simulated time)",
        )
        .buckets(vec![
            0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
        ]),
    )?;
    let policy_reloads = IntCounterVec::new(
        Opts::new(
            "watcher_policy_reloads_total",
            "Policy reloads, by result (applied, refused)",
        ),
        &["result"],
    )?;
    let experiment_outcomes = IntCounterVec::new(
        Opts::new(
            "watcher_experiment_invoices_total",
            "Invoices by experiment, variant and outcome (assigned, paid_without_fee, paid_after_fee, handed_over, paid_at_agency); 'none' outside experiments",
        ),
        &["experiment", "variant", "outcome"],
    )?;
    let open_invoices = IntGaugeVec::new(
        Opts::new(
            "watcher_open_invoices",
            "Open invoices (not paid, credited or cancelled; with the agency included) by tenant and stage, over the partitions this instance owns",
        ),
        &["tenant", "stage"],
    )?;
    let payment_to_stop = Histogram::with_opts(
        HistogramOpts::new(
            "watcher_payment_to_stop_seconds",
            "From a payment's match (its record's time) to the paid journey written (its contact stop goes first): how long a paid debtor could still be messaged, at most",
        )
        .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
    )?;
    // Zero from the start, so that the first increment shows in rate() and increase().
    for stage in forfall_domain::settlement::STAGES {
        settlements.with_label_values(&[stage]);
    }
    for c in [
        Box::new(transitions.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(experiment_outcomes.clone()),
        Box::new(open_invoices.clone()),
        Box::new(payment_to_stop.clone()),
        Box::new(settlements.clone()),
        Box::new(fired.clone()),
        Box::new(lateness.clone()),
        Box::new(policy_reloads.clone()),
    ] {
        shell.metrics.registry.register(c)?;
    }
    let combined = prometheus::IntCounter::new(
        "watcher_combined_invoices_total",
        "Invoices whose step went out in another invoice's combined message",
    )?;
    shell.metrics.registry.register(Box::new(combined.clone()))?;
    let merged = prometheus::IntCounter::new(
        "watcher_merged_claims_total",
        "Claims handed over in another claim's case (merged where the law asks)",
    )?;
    shell.metrics.registry.register(Box::new(merged.clone()))?;
    let decided = IntCounterVec::new(
        Opts::new(
            "watcher_records_decided_total",
            "Records decided by the consume loop, by whether they shared a batch's round trips (together) or took their own (alone)",
        ),
        &["path"],
    )?;
    for path in ["together", "alone"] {
        decided.with_label_values(&[path]);
    }
    shell.metrics.registry.register(Box::new(decided.clone()))?;
    let redis = redis_store::connect(&rt.config.redis).await?;
    let topics = rt.config.topics.clone();
    // The changelog follows the invoices topic's partitions (see [`rebuild`]).
    let invoices_topic = rt.topic(&topics.invoices);
    let partitions = changelog::partition_count(&rt.config.kafka, &invoices_topic).await?;
    anyhow::ensure!(partitions > 0, "topic '{invoices_topic}' has no partitions");
    let changelog_topic = rt.topic(&topics.watcher_changelog);
    changelog::ensure(&rt.config.kafka, &changelog_topic, partitions).await?;
    let store = Store::new(redis.clone(), rt.keys(), Changelog::new(changelog_topic));
    store
        .prepare_scripts()
        .await
        .map_err(|e| anyhow::anyhow!("loading the journey scripts into Redis: {e:?}"))?;
    let propensity = load_propensity(&settings)?;
    let timer_producer = shell.producer_lingering(&rt, settings.timer_linger_ms)?;
    let watcher = Watcher(Arc::new(Inner {
        history_retention_days: settings.history_retention_days,
        propensity,
        producer: shell.producer.clone(),
        timer_producer: timer_producer.clone(),
        readiness: shell.readiness.clone(),
        ready: std::sync::Mutex::default(),
        rebuilding: Mutex::new(()),
        service_metrics: shell.metrics.clone(),
        redis,
        store,
        holder: format!("{}:{}", rt.instance.unwrap_or(SERVICE), uuid::Uuid::new_v4().simple()),
        law,
        policy: RwLock::new(Arc::new(policy)),
        stripes: (0..settings.lock_stripes.max(1)).map(|_| Mutex::new(())).collect(),
        metrics: Metrics {
            transitions,
            experiment_outcomes,
            open_invoices,
            payment_to_stop,
            settlements,
            fired,
            lateness,
            policy_reloads,
            combined,
            merged,
            decided,
        },
        topics: topics.clone(),
        rt: rt.clone(),
    }));
    watcher.0.metrics.zero_experiments(&watcher.policy());
    // The staff endpoint answers from here on.
    let _ = handle.set(watcher.clone());
    let consumer = shell.consumer(
        &rt,
        SERVICE,
        &[
            rt.topic(&topics.invoices),
            rt.topic(&topics.payments_matched),
            rt.topic(&topics.debtor_requests),
            rt.topic(&topics.dispatch_outcomes),
            rt.topic(&topics.handoff_outcomes),
        ],
    )?;
    tokio::spawn(watcher.clone().reload_policy(settings.clone()));
    let concurrency = settings.concurrency.max(1);
    let settings_batch = settings.consume_batch.max(1);
    let timers = tokio::spawn(watcher.clone().run_timers(consumer.clone(), settings));
    let mut loop_context = shell.loop_context(&rt);
    loop_context.key_concurrency = concurrency;
    loop_context.batch = settings_batch;
    let consumed = run_consumer(consumer, watcher, loop_context).await;
    rt.shutdown.cancel();
    let timed = timers.await.map_err(|e| anyhow::anyhow!("timer task panicked: {e}"))?;
    consumed?;
    timed?;
    shell.producer.flush(Duration::from_secs(5)).await;
    timer_producer.flush(Duration::from_secs(5)).await;
    Ok(())
}
