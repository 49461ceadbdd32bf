//! Watcher: owns each invoice's journey. It applies invoice snapshots and matched payments,
//! keeps a timer per invoice for its next plan step, and when a timer falls due emits the
//! step as a `JourneyAction` (or a `HandoffCase` for the last step), with every transition on
//! `forfall.journey.events.v1`.
//!
//! Ordering rule: outputs are produced and acknowledged *before* the journey is written, and
//! every output's id is derived from its cause. A crash between the two re-does the work on
//! redelivery and yields the same ids, which consumers de-duplicate: nothing is lost, and
//! dispatch's idempotency key keeps a re-fired step from reaching the debtor twice.
//!
//! Timers live in one Redis sorted set per partition of `forfall.invoices.v1`, scored by fire
//! time; an instance polls only the partitions it is assigned, so a rebalance moves polling,
//! not data. Journey writes are compare-and-set on a version, so two instances briefly sharing
//! a partition during a rebalance cannot overwrite each other's transitions.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use forfall_domain::invoice::{self, Contact, InvoiceSnapshot, InvoiceStatus};
use forfall_domain::journey::{self, Decision, Emit, Journey, Plan, TimerChange, Transition};
use forfall_domain::{Currency, DebtorKind, Jurisdiction, Money};
use forfall_platform::kafka::{Failure, Handler, Inbound, Outbound, Producer, run_consumer};
use forfall_platform::records::{self, HandoffCase, JourneyAction, JourneyEvent, PaymentMatched, Record, derived_id};
use forfall_platform::redis_store::{self, Keys};
use forfall_platform::service::{Runtime, ServiceShell};
use forfall_platform::telemetry::TraceContext;
use forfall_platform::{config, journey_state};
use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts};
use rdkafka::consumer::{Consumer, StreamConsumer};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::Instrument;

pub const SERVICE: &str = "watcher";
pub const PORT_OFFSET: u16 = 2;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct WatcherSettings {
    /// How often due timers are polled.
    pub tick_ms: u64,
    /// Most timers claimed from one partition per poll.
    pub batch: usize,
}

impl Default for WatcherSettings {
    fn default() -> Self {
        Self {
            tick_ms: 200,
            batch: 500,
        }
    }
}

/// What the watcher stores per invoice besides the journey itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    journey: Journey,
    /// Partition of the invoice on `forfall.invoices.v1`: whose timer set holds its timer.
    partition: i32,
    /// The timer member currently scheduled, if any.
    pending_timer: Option<String>,
}

/// A stored journey with the version it was read at.
struct Loaded {
    stored: Stored,
    version: u64,
}

const CAS_SCRIPT: &str = r"
local v = redis.call('HGET', KEYS[1], 'v')
if (v or '') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'json', ARGV[3], 'status', ARGV[4])
if ARGV[5] ~= '' then redis.call('ZREM', KEYS[2], ARGV[5]) end
if ARGV[6] ~= '' then redis.call('ZADD', KEYS[2], ARGV[7], ARGV[6]) end
return 1
";

fn member(tenant: &str, invoice_id: &str, step_index: usize) -> String {
    serde_json::json!([tenant, invoice_id, step_index]).to_string()
}

fn parse_member(m: &str) -> Option<(String, String, usize)> {
    serde_json::from_str(m).ok()
}

struct Metrics {
    transitions: IntCounterVec,
    fired: IntCounterVec,
    lateness: Histogram,
}

struct Inner {
    rt: Runtime,
    producer: Producer,
    redis: ConnectionManager,
    keys: Keys,
    plan: Plan,
    cas: redis::Script,
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
        },
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
    fn journey_key(&self, tenant: &str, invoice_id: &str) -> String {
        journey_state::journey_key(&self.0.keys, tenant, invoice_id)
    }

    fn timers_key(&self, partition: i32) -> String {
        self.0.keys.key(&["timers", &partition.to_string()])
    }

    fn parked_key(&self, tenant: &str, invoice_id: &str) -> String {
        self.0
            .keys
            .key(&["parked-payments", &format!("{{{tenant}:{invoice_id}}}")])
    }

    fn stripe(&self, tenant: &str, invoice_id: &str) -> &Mutex<()> {
        let mut h = DefaultHasher::new();
        (tenant, invoice_id).hash(&mut h);
        &self.0.stripes[(h.finish() % self.0.stripes.len() as u64) as usize]
    }

    fn conn(&self) -> ConnectionManager {
        self.0.redis.clone()
    }

    async fn remove_timer(&self, partition: i32, member: &str) -> Result<(), Failure> {
        let _: () = redis::cmd("ZREM")
            .arg(self.timers_key(partition))
            .arg(member)
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn load(&self, tenant: &str, invoice_id: &str) -> Result<Option<Loaded>, Failure> {
        let (v, json): (Option<u64>, Option<String>) = redis::cmd("HMGET")
            .arg(self.journey_key(tenant, invoice_id))
            .arg("v")
            .arg("json")
            .query_async(&mut self.conn())
            .await?;
        match (v, json) {
            (Some(version), Some(json)) => {
                let stored = serde_json::from_str(&json)
                    .map_err(|e| Failure::Fatal(anyhow::anyhow!("corrupt journey state: {e}")))?;
                Ok(Some(Loaded { stored, version }))
            }
            _ => Ok(None),
        }
    }

    /// Writes the journey and its timer change if nobody wrote it since `expected`.
    async fn save(
        &self,
        expected: Option<u64>,
        mut stored: Stored,
        timer: &TimerChange,
        fired: Option<&str>,
    ) -> Result<bool, Failure> {
        let j = &stored.journey;
        let (tenant, invoice_id) = (j.invoice.tenant.clone(), j.invoice.invoice_id.clone());
        let mut remove = fired.map(str::to_owned).unwrap_or_default();
        let (mut add, mut score) = (String::new(), 0i64);
        match timer {
            TimerChange::Keep => {
                if fired.is_some() && stored.pending_timer.as_deref() == fired {
                    stored.pending_timer = None;
                }
            }
            TimerChange::Cancel => {
                remove = stored.pending_timer.take().unwrap_or(remove);
            }
            TimerChange::Schedule { step_index, fire_at } => {
                if let Some(old) = stored.pending_timer.take() {
                    remove = old;
                }
                add = member(&tenant, &invoice_id, *step_index);
                score = fire_at.timestamp_millis();
                stored.pending_timer = Some(add.clone());
            }
        }
        if let Some(stale) = fired.filter(|f| *f != remove) {
            // A fired member that is no longer the pending one is stale: drop it too.
            self.remove_timer(stored.partition, stale).await?;
        }
        let status = stored.journey.state.label();
        let json = serde_json::to_string(&stored).map_err(|e| Failure::Fatal(e.into()))?;
        let expected = expected.map(|v| v.to_string()).unwrap_or_default();
        let next = expected.parse::<u64>().map(|v| v + 1).unwrap_or(1);
        let ok: i32 = self
            .0
            .cas
            .key(self.journey_key(&tenant, &invoice_id))
            .key(self.timers_key(stored.partition))
            .arg(expected)
            .arg(next)
            .arg(json)
            .arg(status)
            .arg(remove)
            .arg(add)
            .arg(score)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(ok == 1)
    }

    fn event(&self, journey: &Journey, t: &Transition, cause: &str, index: usize, at: DateTime<Utc>) -> JourneyEvent {
        let inv = &journey.invoice;
        let outstanding = journey.outstanding();
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
        }
    }

    async fn encode<T: Record>(
        &self,
        topic: &str,
        key: &str,
        value: &T,
        trace: TraceContext,
    ) -> Result<Outbound, Failure> {
        let payload = self.0.rt.codec.encode(topic, value).await?;
        Ok(Outbound {
            topic: topic.to_owned(),
            key: key.to_owned(),
            payload,
            trace: trace.child(),
        })
    }

    /// The records a decision produces: its transitions as events, and its emit.
    async fn outputs(&self, d: &Decision, cause: &str, trace: TraceContext) -> Result<Vec<Outbound>, Failure> {
        let now = self.0.rt.clock.now();
        let events_topic = self.0.rt.topic(&self.0.topics.journey_events);
        let debtor = d.journey.invoice.debtor_id.clone();
        let mut outs = Vec::new();
        for (i, t) in d.transitions.iter().enumerate() {
            self.0.metrics.transitions.with_label_values(&[t.kind]).inc();
            let e = self.event(&d.journey, t, cause, i, now);
            outs.push(self.encode(&events_topic, &debtor, &e, trace).await?);
        }
        match &d.emit {
            Some(Emit::Message {
                step_index,
                step,
                tone,
                channels,
            }) => {
                let action = self.action(&d.journey, *step_index, &step.name, tone.code(), channels, now);
                let topic = self.0.rt.topic(&self.0.topics.journey_actions);
                outs.push(self.encode(&topic, &debtor, &action, trace).await?);
            }
            Some(Emit::Handoff { .. }) => {
                let case = self.case(&d.journey, now);
                let topic = self.0.rt.topic(&self.0.topics.handoff_cases);
                outs.push(self.encode(&topic, &debtor, &case, trace).await?);
            }
            None => {}
        }
        Ok(outs)
    }

    fn action(
        &self,
        j: &Journey,
        step_index: usize,
        step: &str,
        tone: &str,
        channels: &[String],
        now: DateTime<Utc>,
    ) -> JourneyAction {
        let inv = &j.invoice;
        let open = j.outstanding();
        // The deadline in a reminder is the day before the next step would fall due.
        let pay_by = self
            .0
            .plan
            .steps
            .get(step_index + 1)
            .filter(|_| tone != "nudge")
            .and_then(|next| {
                inv.due_date
                    .checked_add_signed(chrono::Duration::days(i64::from(next.offset_days) - 1))
            })
            .map(invoice::epoch_days);
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
            channels: channels.to_vec(),
            send_at: self
                .0
                .plan
                .fire_at(step_index, inv.due_date, inv.jurisdiction)
                .unwrap_or(now)
                .timestamp_millis(),
            open_minor: open.minor,
            fee_minor: 0,
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
        }
    }

    fn case(&self, j: &Journey, now: DateTime<Utc>) -> HandoffCase {
        let inv = &j.invoice;
        HandoffCase {
            event_id: derived_id("case-event", &[&inv.tenant, &inv.invoice_id]),
            tenant: inv.tenant.clone(),
            debtor_id: inv.debtor_id.clone(),
            occurred_at: now.timestamp_millis(),
            case_id: derived_id("case", &[&inv.tenant, &inv.invoice_id]),
            invoice_id: inv.invoice_id.clone(),
            invoice_number: inv.invoice_number.clone(),
            issue_date: invoice::epoch_days(inv.issue_date),
            due_date: invoice::epoch_days(inv.due_date),
            principal_minor: j.outstanding().minor,
            fees_minor: 0,
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
        }
    }

    async fn emit_then_save(
        &self,
        expected: Option<u64>,
        stored: Stored,
        d: &Decision,
        cause: &str,
        trace: TraceContext,
        fired: Option<&str>,
    ) -> Result<bool, Failure> {
        let outs = self.outputs(d, cause, trace).await?;
        self.0
            .producer
            .send_all(&outs)
            .await
            .map_err(|e| Failure::Transient(anyhow::anyhow!(e)))?;
        self.save(expected, stored, &d.timer, fired).await
    }

    async fn on_invoice(&self, rec: records::Invoice, partition: i32, trace: TraceContext) -> Result<(), Failure> {
        let incoming = snapshot(&rec)?;
        let _guard = self.stripe(&rec.tenant, &rec.invoice_id).lock().await;
        loop {
            let loaded = self.load(&rec.tenant, &rec.invoice_id).await?;
            if loaded.as_ref().is_some_and(|l| l.stored.journey.invoice == incoming) {
                return Ok(()); // the same snapshot again
            }
            let (expected, partition, pending) = match &loaded {
                Some(l) => (Some(l.version), l.stored.partition, l.stored.pending_timer.clone()),
                None => (None, partition, None),
            };
            let mut d = journey::on_invoice(loaded.map(|l| l.stored.journey), incoming.clone(), &self.0.plan);
            // Payments that arrived before their invoice are applied now.
            let parked: Vec<String> = if expected.is_none() {
                redis::cmd("LRANGE")
                    .arg(self.parked_key(&rec.tenant, &rec.invoice_id))
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut self.conn())
                    .await?
            } else {
                Vec::new()
            };
            for p in &parked {
                let Ok(payment) = serde_json::from_str::<ParkedPayment>(p) else {
                    continue;
                };
                if let Ok(next) = journey::on_payment(
                    d.journey.clone(),
                    &payment.payment_id,
                    Money::new(payment.amount_minor, payment.currency),
                ) {
                    d = then(d, next);
                }
            }
            let stored = Stored {
                journey: d.journey.clone(),
                partition,
                pending_timer: pending,
            };
            if self
                .emit_then_save(expected, stored, &d, &rec.event_id, trace, None)
                .await?
            {
                if !parked.is_empty() {
                    let _: () = redis::cmd("DEL")
                        .arg(self.parked_key(&rec.tenant, &rec.invoice_id))
                        .query_async(&mut self.conn())
                        .await?;
                }
                return Ok(());
            }
        }
    }

    async fn on_payment(&self, rec: PaymentMatched, trace: TraceContext) -> Result<(), Failure> {
        let currency: Currency = rec
            .currency
            .parse()
            .map_err(|e| Failure::reject("unknown_currency", format!("field 'currency': {e}")))?;
        let amount = Money::new(rec.amount_minor, currency);
        let _guard = self.stripe(&rec.tenant, &rec.invoice_id).lock().await;
        loop {
            let Some(loaded) = self.load(&rec.tenant, &rec.invoice_id).await? else {
                // The invoice's snapshot is on another topic and may not have arrived yet.
                let parked = serde_json::to_string(&ParkedPayment {
                    payment_id: rec.payment_id.clone(),
                    amount_minor: rec.amount_minor,
                    currency,
                })
                .map_err(|e| Failure::Fatal(e.into()))?;
                let _: () = redis::cmd("RPUSH")
                    .arg(self.parked_key(&rec.tenant, &rec.invoice_id))
                    .arg(parked)
                    .query_async(&mut self.conn())
                    .await?;
                self.0.metrics.transitions.with_label_values(&["payment_parked"]).inc();
                return Ok(());
            };
            let d = journey::on_payment(loaded.stored.journey.clone(), &rec.payment_id, amount).map_err(|e| {
                Failure::Reject {
                    code: "payment_not_applicable",
                    detail: format!("payment '{}' for invoice '{}': {e}", rec.payment_id, rec.invoice_id),
                    tenant: Some(rec.tenant.clone()),
                    debtor_id: Some(rec.debtor_id.clone()),
                }
            })?;
            if d.transitions.is_empty() {
                return Ok(()); // already applied
            }
            let stored = Stored {
                journey: d.journey.clone(),
                ..loaded.stored
            };
            if self
                .emit_then_save(Some(loaded.version), stored, &d, &rec.event_id, trace, None)
                .await?
            {
                return Ok(());
            }
        }
    }

    /// Fires one due timer.
    async fn fire(&self, timer: &str, partition: i32) -> Result<(), Failure> {
        let Some((tenant, invoice_id, step_index)) = parse_member(timer) else {
            tracing::error!(timer, "unreadable timer dropped");
            self.remove_timer(partition, timer).await?;
            return Ok(());
        };
        let _guard = self.stripe(&tenant, &invoice_id).lock().await;
        loop {
            let Some(loaded) = self.load(&tenant, &invoice_id).await? else {
                self.remove_timer(partition, timer).await?;
                return Ok(());
            };
            let now = self.0.rt.clock.now();
            let inv = &loaded.stored.journey.invoice;
            if let Some(due) = self.0.plan.fire_at(step_index, inv.due_date, inv.jurisdiction) {
                self.0
                    .metrics
                    .lateness
                    .observe((now - due).num_milliseconds().max(0) as f64 / 1000.0);
            }
            let d = journey::on_timer(loaded.stored.journey.clone(), step_index, &self.0.plan);
            if let Some(step) = self.0.plan.steps.get(step_index).filter(|_| d.emit.is_some()) {
                self.0.metrics.fired.with_label_values(&[&step.name]).inc();
            }
            let stored = Stored {
                journey: d.journey.clone(),
                ..loaded.stored
            };
            let cause = format!("timer:{step_index}");
            if self
                .emit_then_save(
                    Some(loaded.version),
                    stored,
                    &d,
                    &cause,
                    TraceContext::new_root(),
                    Some(timer),
                )
                .await?
            {
                return Ok(());
            }
        }
    }

    /// Polls the timer sets of the partitions this instance is assigned, until shutdown.
    async fn run_timers(self, consumer: Arc<StreamConsumer>, settings: WatcherSettings) -> anyhow::Result<()> {
        let invoices_topic = self.0.rt.topic(&self.0.topics.invoices);
        let mut tick = tokio::time::interval(Duration::from_millis(settings.tick_ms.max(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut attempt = 0u32;
        loop {
            tokio::select! {
                _ = self.0.rt.shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            let partitions: Vec<i32> = consumer
                .assignment()
                .map(|a| {
                    a.elements()
                        .iter()
                        .filter(|e| e.topic() == invoices_topic)
                        .map(|e| e.partition())
                        .collect()
                })
                .unwrap_or_default();
            let now_ms = self.0.rt.clock.now().timestamp_millis();
            for partition in partitions {
                match self.fire_due(partition, now_ms, settings.batch).await {
                    Ok(()) => attempt = 0,
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
        }
    }

    async fn fire_due(&self, partition: i32, now_ms: i64, batch: usize) -> Result<(), Failure> {
        let due: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.timers_key(partition))
            .arg("-inf")
            .arg(now_ms)
            .arg("LIMIT")
            .arg(0)
            .arg(batch)
            .query_async(&mut self.conn())
            .await?;
        for timer in due {
            let span = tracing::info_span!("fire_timer", service = SERVICE, partition);
            self.fire(&timer, partition).instrument(span).await?;
        }
        Ok(())
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct ParkedPayment {
    payment_id: String,
    amount_minor: i64,
    currency: Currency,
}

impl Handler for Watcher {
    async fn handle(&self, record: &Inbound) -> Result<Vec<Outbound>, Failure> {
        let decoded = self.0.rt.codec.decode(record.payload.as_deref()).await?;
        match decoded.name.as_str() {
            records::Invoice::FULL_NAME => self.on_invoice(decoded.to()?, record.partition, record.trace).await?,
            PaymentMatched::FULL_NAME => self.on_payment(decoded.to()?, record.trace).await?,
            other => {
                return Err(Failure::reject(
                    "unexpected_record_type",
                    format!("the watcher does not handle '{other}'"),
                ));
            }
        }
        Ok(Vec::new())
    }
}

/// Runs the watcher until shutdown.
pub async fn run(rt: Runtime) -> anyhow::Result<()> {
    let settings: WatcherSettings = config::section(&rt.figment, SERVICE)?;
    let shell = ServiceShell::start(&rt, SERVICE, PORT_OFFSET, None).await?;
    let transitions = IntCounterVec::new(
        Opts::new("watcher_transitions_total", "Journey transitions, by kind"),
        &["kind"],
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
    for c in [
        Box::new(transitions.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(fired.clone()),
        Box::new(lateness.clone()),
    ] {
        shell.metrics.registry.register(c)?;
    }
    let redis = redis_store::connect(&rt.config.redis).await?;
    let topics = rt.config.topics.clone();
    let watcher = Watcher(Arc::new(Inner {
        producer: shell.producer.clone(),
        redis,
        keys: rt.keys(),
        plan: Plan::builtin(),
        cas: redis::Script::new(CAS_SCRIPT),
        stripes: (0..256).map(|_| Mutex::new(())).collect(),
        metrics: Metrics {
            transitions,
            fired,
            lateness,
        },
        topics: topics.clone(),
        rt: rt.clone(),
    }));
    let consumer = shell.consumer(
        &rt,
        SERVICE,
        &[rt.topic(&topics.invoices), rt.topic(&topics.payments_matched)],
    )?;
    let timers = tokio::spawn(watcher.clone().run_timers(consumer.clone(), settings));
    let consumed = run_consumer(consumer, watcher, shell.loop_context(&rt)).await;
    rt.shutdown.cancel();
    let timed = timers.await.map_err(|e| anyhow::anyhow!("timer task panicked: {e}"))?;
    consumed?;
    timed?;
    shell.producer.flush(Duration::from_secs(5)).await;
    Ok(())
}
