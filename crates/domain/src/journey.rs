//! The journey of one invoice: its plan, its state and every transition, decided purely.
//!
//! The watcher stores a [`Journey`] per invoice, feeds it facts (invoice changes, payments,
//! timer firings) and carries out the [`Decision`]: persist, (re)schedule, emit.

use chrono::{DateTime, Duration, NaiveDate, NaiveTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::calendar;
use crate::invoice::{InvoiceSnapshot, InvoiceStatus};
use crate::jurisdiction::Jurisdiction;
use crate::money::{Money, MoneyError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Tone {
    Nudge,
    Reminder,
    CollectionWarning,
    /// The creditor's own demand for payment (NO betalingsoppfordring, SE inkassokrav, FI
    /// maksuvaatimus): the last word before the claim goes to collection or to court.
    PaymentDemand,
}

impl Tone {
    pub fn code(self) -> &'static str {
        match self {
            Tone::Nudge => "nudge",
            Tone::Reminder => "reminder",
            Tone::CollectionWarning => "collection_warning",
            Tone::PaymentDemand => "payment_demand",
        }
    }

    /// The tone a [`Tone::code`] names (as journey actions carry it).
    pub fn from_code(code: &str) -> Option<Tone> {
        [
            Tone::Nudge,
            Tone::Reminder,
            Tone::CollectionWarning,
            Tone::PaymentDemand,
        ]
        .into_iter()
        .find(|t| t.code() == code)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepKind {
    Message { tone: Tone, channels: Vec<String> },
    Handoff,
}

impl StepKind {
    /// What the step is, as a debtor's page words it: the tone of a message, or `handoff`.
    pub fn code(&self) -> &'static str {
        match self {
            StepKind::Message { tone, .. } => tone.code(),
            StepKind::Handoff => "handoff",
        }
    }
}

/// What a step charges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FeeSpec {
    None,
    /// The highest fee the debtor's law allows for the step (resolved per debtor).
    StatutoryMaximum,
    Fixed(Money),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedStep {
    pub name: String,
    /// Banking days from the due date in the debtor's calendar (negative = before). A due date on
    /// a closed day counts from the next banking day.
    pub offset_banking_days: i32,
    pub kind: StepKind,
    pub fee: FeeSpec,
    /// The deadline the step gives the debtor, in calendar days.
    pub days_to_pay: Option<u32>,
}

/// An ordered list of steps, chosen per segment by the policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub name: String,
    /// Version of the policy the plan came from.
    pub version: String,
    pub steps: Vec<PlannedStep>,
    /// Local time of day at which steps fall due in the debtor's calendar.
    pub send_time: NaiveTime,
}

impl Plan {
    /// The plan used when no policy is configured: a friendly nudge on the due date, one
    /// reminder ten banking days later, hand-off ten banking days after that. No fees.
    pub fn builtin() -> Plan {
        let message = |name: &str, offset, tone| PlannedStep {
            name: name.to_owned(),
            offset_banking_days: offset,
            kind: StepKind::Message {
                tone,
                channels: vec!["email".to_owned()],
            },
            fee: FeeSpec::None,
            days_to_pay: None,
        };
        Plan {
            name: "builtin".to_owned(),
            version: "builtin-v1".to_owned(),
            steps: vec![
                message("nudge", 0, Tone::Nudge),
                PlannedStep {
                    days_to_pay: Some(10),
                    ..message("reminder-1", 10, Tone::Reminder)
                },
                PlannedStep {
                    name: "handoff".to_owned(),
                    offset_banking_days: 20,
                    kind: StepKind::Handoff,
                    fee: FeeSpec::None,
                    days_to_pay: None,
                },
            ],
            send_time: NaiveTime::from_hms_opt(9, 0, 0).unwrap_or(NaiveTime::MIN),
        }
    }

    /// The calendar day step `index` falls on in the debtor's calendar.
    pub fn step_day(&self, index: usize, due_date: NaiveDate, jurisdiction: Jurisdiction) -> Option<NaiveDate> {
        let step = self.steps.get(index)?;
        let due = calendar::roll_forward(jurisdiction, due_date);
        Some(calendar::add_banking_days(jurisdiction, due, step.offset_banking_days))
    }

    /// The moment the due date itself arrives for the plan: its first banking day at `send_time`.
    pub fn due_moment(&self, due_date: NaiveDate, jurisdiction: Jurisdiction) -> Option<DateTime<Utc>> {
        local_instant(
            calendar::roll_forward(jurisdiction, due_date),
            self.send_time,
            jurisdiction,
        )
    }

    /// When step `index` falls due: its banking day at `send_time` in the debtor's zone, moved
    /// to the next moment inside the debtor's contact hours, as UTC.
    pub fn fire_at(&self, index: usize, due_date: NaiveDate, jurisdiction: Jurisdiction) -> Option<DateTime<Utc>> {
        let day = self.step_day(index, due_date, jurisdiction)?;
        let at = local_instant(day, self.send_time, jurisdiction)?;
        calendar::next_contact_moment(&calendar::ContactHours::default_for(jurisdiction), jurisdiction, at)
    }
}

/// A local wall-clock time in the jurisdiction's zone as a UTC instant. On the spring-forward
/// gap the next valid minute is used; on the autumn overlap, the earlier instant.
pub fn local_instant(day: NaiveDate, time: NaiveTime, jurisdiction: Jurisdiction) -> Option<DateTime<Utc>> {
    let tz = jurisdiction.time_zone();
    let naive = day.and_time(time);
    (0..=120)
        .find_map(|minutes| tz.from_local_datetime(&(naive + Duration::minutes(minutes))).earliest())
        .map(|t| t.with_timezone(&Utc))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CloseReason {
    Paid,
    Credited,
    Cancelled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JourneyState {
    Open,
    Nudged,
    Reminded(u32),
    Warned,
    HandedOver,
    Closed(CloseReason),
    /// No steps while the pause lasts; see [`Pause`].
    Paused(PauseReason),
    /// The agency rejected or returned the case, or closed it unpaid: the journey waits for a
    /// person at the creditor (see [`crate::agency`]). Last, so that journeys stored before it
    /// existed keep their states' encodings.
    NeedsPerson,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PauseReason {
    Dispute,
    PromiseToPay,
    Instalments,
    ClaimsPaid,
}

impl PauseReason {
    pub fn code(self) -> &'static str {
        match self {
            PauseReason::Dispute => "dispute",
            PauseReason::PromiseToPay => "promise",
            PauseReason::Instalments => "instalments",
            PauseReason::ClaimsPaid => "claims_paid",
        }
    }
}

impl JourneyState {
    pub fn label(self) -> String {
        match self {
            JourneyState::Open => "open".into(),
            JourneyState::Nudged => "nudged".into(),
            JourneyState::Reminded(n) => format!("reminded-{n}"),
            JourneyState::Warned => "warned".into(),
            JourneyState::HandedOver => "handed_over".into(),
            JourneyState::NeedsPerson => "needs_person".into(),
            JourneyState::Closed(CloseReason::Paid) => "closed:paid".into(),
            JourneyState::Closed(CloseReason::Credited) => "closed:credited".into(),
            JourneyState::Closed(CloseReason::Cancelled) => "closed:cancelled".into(),
            JourneyState::Paused(reason) => format!("paused:{}", reason.code()),
        }
    }

    /// The state a [`JourneyState::label`] names (a stored journey's header carries it).
    pub fn from_label(label: &str) -> Option<Self> {
        Some(match label {
            "open" => JourneyState::Open,
            "nudged" => JourneyState::Nudged,
            "warned" => JourneyState::Warned,
            "handed_over" => JourneyState::HandedOver,
            "needs_person" => JourneyState::NeedsPerson,
            "closed:paid" => JourneyState::Closed(CloseReason::Paid),
            "closed:credited" => JourneyState::Closed(CloseReason::Credited),
            "closed:cancelled" => JourneyState::Closed(CloseReason::Cancelled),
            "paused:dispute" => JourneyState::Paused(PauseReason::Dispute),
            "paused:promise" => JourneyState::Paused(PauseReason::PromiseToPay),
            "paused:instalments" => JourneyState::Paused(PauseReason::Instalments),
            "paused:claims_paid" => JourneyState::Paused(PauseReason::ClaimsPaid),
            other => JourneyState::Reminded(other.strip_prefix("reminded-")?.parse().ok()?),
        })
    }

    /// Closed, with an agency, or waiting for a person: the plan takes no more steps.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JourneyState::Closed(_) | JourneyState::HandedOver | JourneyState::NeedsPerson
        )
    }

    /// Whether a message may still be sent for this invoice (dispatch's last look asks this).
    pub fn accepts_contact(self) -> bool {
        !matches!(
            self,
            JourneyState::Closed(_) | JourneyState::HandedOver | JourneyState::NeedsPerson | JourneyState::Paused(_)
        )
    }
}

/// The journey of one invoice, as the watcher stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journey {
    pub state: JourneyState,
    pub invoice: InvoiceSnapshot,
    pub plan_version: String,
    /// The plan the journey follows (by name in the policy).
    #[serde(default)]
    pub plan: String,
    /// The policy segment and experiment variant that chose the plan, when a policy did.
    #[serde(default)]
    pub segment: Option<String>,
    #[serde(default)]
    pub experiment: Option<String>,
    /// Fees charged by steps so far, in the invoice's currency.
    #[serde(default)]
    pub fees_minor: i64,
    /// The current pause, if the debtor disputed, promised, or agreed instalments.
    #[serde(default)]
    pub pause: Option<Pause>,
    /// A due date the debtor was granted by postponement; the plan counts from it.
    #[serde(default)]
    pub due_override: Option<NaiveDate>,
    #[serde(default)]
    pub postponements: u32,
    /// Debtor request ids already applied, so a redelivered request is not applied twice.
    #[serde(default)]
    pub applied_requests: Vec<String>,
    /// Index of the next plan step to fire.
    pub next_step: usize,
    pub paid_minor: i64,
    /// Payment ids already applied, so a redelivered payment is not counted twice.
    pub applied_payments: Vec<String>,
    pub steps_taken: Vec<String>,
    /// The debtor's local days on which fees were charged: the law spaces fees apart.
    #[serde(default)]
    pub fee_dates: Vec<NaiveDate>,
    /// Each fee charged, for the claim a hand-off carries (journeys from before it was kept
    /// have only `fee_dates` and `fees_minor`).
    #[serde(default)]
    pub fees: Vec<FeeCharged>,
    /// The collection warning the creditor gave (the last, if several), for the hand-off.
    #[serde(default)]
    pub warning: Option<WarningGiven>,
    /// Every message of the journey and what became of it: the hand-off's evidence.
    #[serde(default)]
    pub messages: Vec<crate::evidence::MessageEvidence>,
    /// Every dispute the debtor raised, and how it was resolved: the agency must know.
    #[serde(default)]
    pub disputes: Vec<DisputeRecord>,
}

/// A dispute the debtor raised on the invoice (personal data: never logged).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisputeRecord {
    /// The debtor's local day it was raised.
    pub opened: NaiveDate,
    /// What the debtor wrote.
    pub reason: Option<String>,
    pub resolved: Option<NaiveDate>,
    pub resolution: Option<String>,
}

/// A collection warning sent (NO inkassovarsel, DK påkrav): when, and the deadline it gave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarningGiven {
    /// The debtor's local day it went out.
    pub date: NaiveDate,
    pub step: String,
    pub days_to_pay: Option<u32>,
}

impl WarningGiven {
    /// The last day to pay it gave, counted in the debtor's calendar from the day it went out.
    pub fn deadline(&self) -> Option<NaiveDate> {
        self.days_to_pay
            .and_then(|days| self.date.checked_add_signed(chrono::Duration::days(i64::from(days))))
    }
}

/// A fee a step charged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeeCharged {
    /// The debtor's local day.
    pub date: NaiveDate,
    pub step: String,
    pub kind: crate::law::FeeStep,
    pub minor: i64,
}

/// Why and until when a journey waits, and the state it returns to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pause {
    pub reason: PauseReason,
    pub resume_state: JourneyState,
    /// Promise or "I have paid": the day by which the money should be there.
    pub until: Option<NaiveDate>,
    /// Instalment plan: (due date, amount in minor units), in date order.
    pub instalments: Vec<(NaiveDate, i64)>,
    /// What had been paid when the plan was agreed; instalments count on top of it.
    #[serde(default)]
    pub paid_before: i64,
}

impl Journey {
    /// The due date the plan counts from: a postponed one if granted.
    pub fn anchor_due(&self) -> NaiveDate {
        self.due_override.unwrap_or(self.invoice.due_date)
    }

    /// What the instalment plan required to be paid by `day` (with `grace` days of slack).
    fn instalments_due_by(&self, day: NaiveDate, grace: i64) -> i64 {
        let Some(p) = &self.pause else { return 0 };
        p.paid_before
            + p.instalments
                .iter()
                .filter(|(due, _)| *due + Duration::days(grace) < day)
                .map(|(_, amount)| amount)
                .sum::<i64>()
    }

    /// What is still owed: the invoice's open amount plus fees charged, less payments, never
    /// below zero.
    pub fn outstanding(&self) -> Money {
        let open = self.invoice.open();
        Money::new((open.minor + self.fees_minor - self.paid_minor).max(0), open.currency)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub kind: &'static str,
    pub from: JourneyState,
    pub to: JourneyState,
    pub step: Option<String>,
    pub rule: Option<String>,
    pub reason: Option<String>,
    /// On a plan choice: what the propensity model knew of the debtor, and its score.
    pub propensity: Option<Scored>,
}

/// The propensity model's inputs at a plan choice (recorded so that a model can be fitted on
/// what was known then) and, when a model is configured, its score (0 to 100) and version.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub features: Vec<(&'static str, f64)>,
    pub score: Option<u8>,
    pub model_version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimerChange {
    Keep,
    Schedule { step_index: usize, fire_at: DateTime<Utc> },
    Cancel,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Emit {
    Message {
        step_index: usize,
        step: PlannedStep,
        tone: Tone,
        channels: Vec<String>,
    },
    Handoff {
        step: PlannedStep,
    },
    /// A fresh link to the debtor's page, sent to the contact on file because the one they
    /// followed had expired: no step of the plan, no fee.
    FreshLink {
        channels: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub journey: Journey,
    pub transitions: Vec<Transition>,
    pub timer: TimerChange,
    pub emit: Option<Emit>,
}

impl Decision {
    /// Whether this decision takes a journey that accepted contact to one that does not (paid,
    /// credited, paused, handed over): such a decision must be seen by senders before any of
    /// its effects, since a message sent in between cannot be taken back.
    pub fn stops_contact(&self) -> bool {
        !self.journey.state.accepts_contact() && self.transitions.iter().any(|t| t.from.accepts_contact())
    }
}

fn transition(kind: &'static str, from: JourneyState, to: JourneyState) -> Transition {
    Transition {
        kind,
        from,
        to,
        step: None,
        rule: None,
        reason: None,
        propensity: None,
    }
}

/// After a pause, the plan goes on from today: the step that waited is due now and the later
/// steps keep their distance from it in banking days, so a long pause never makes several
/// steps (or the hand-off) fall due at once.
fn reanchor_after_pause(journey: &mut Journey, plan: &Plan, today: NaiveDate) {
    let j = journey.invoice.jurisdiction;
    let Some(next_day) = plan.step_day(journey.next_step, journey.anchor_due(), j) else {
        return;
    };
    if next_day >= today {
        return;
    }
    let Some(after) = next_day.succ_opt() else { return };
    let shift = calendar::banking_days(j, after, today).len() as i32;
    let anchor = calendar::roll_forward(j, journey.anchor_due());
    journey.due_override = Some(calendar::add_banking_days(j, anchor, shift));
}

/// How long the pauses a debtor can ask for may last; the policy sets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PauseLimits {
    pub max_postpone_days: i64,
    pub max_postponements: u32,
    pub max_instalments: usize,
    pub max_instalment_span_days: i64,
    /// Days after an instalment's due date before it counts as missed (bank transfer time).
    pub instalment_grace_days: i64,
    pub max_promise_days: i64,
    /// How long "I have paid" holds the journey while the payment is matched.
    pub claims_paid_days: i64,
}

impl Default for PauseLimits {
    fn default() -> Self {
        Self {
            max_postpone_days: 30,
            max_postponements: 1,
            max_instalments: 6,
            max_instalment_span_days: 180,
            instalment_grace_days: 3,
            max_promise_days: 14,
            claims_paid_days: 5,
        }
    }
}

/// The day a pause is next looked at: the day after a promise, or after the next instalment
/// (with grace) that is not yet covered by payments. `None` for a dispute (no timer).
fn pause_check_day(journey: &Journey, grace: i64) -> Option<NaiveDate> {
    let pause = journey.pause.as_ref()?;
    match pause.reason {
        PauseReason::Dispute => None,
        PauseReason::PromiseToPay | PauseReason::ClaimsPaid => pause.until.map(|d| d + Duration::days(1)),
        PauseReason::Instalments => {
            let mut cumulative = pause.paid_before;
            let next = pause.instalments.iter().find(|(_, amount)| {
                cumulative += amount;
                cumulative > journey.paid_minor
            });
            next.map(|(due, _)| *due + Duration::days(grace + 1))
        }
    }
}

fn schedule_next(journey: &Journey, plan: &Plan) -> TimerChange {
    schedule_next_with(journey, plan, PauseLimits::default().instalment_grace_days)
}

fn schedule_next_with(journey: &Journey, plan: &Plan, grace: i64) -> TimerChange {
    if journey.state.is_final() {
        return TimerChange::Cancel;
    }
    let j = journey.invoice.jurisdiction;
    let Some(step_time) = plan.fire_at(journey.next_step, journey.anchor_due(), j) else {
        return TimerChange::Cancel;
    };
    let fire_at = match (&journey.state, pause_check_day(journey, grace)) {
        (JourneyState::Paused(PauseReason::Dispute), _) => return TimerChange::Cancel,
        // A resumed step goes out like any step: on a banking day, within contact hours.
        (JourneyState::Paused(_), Some(day)) => match plan
            .due_moment(day, j)
            .and_then(|at| calendar::next_contact_moment(&calendar::ContactHours::default_for(j), j, at))
        {
            Some(check) => step_time.max(check),
            None => step_time,
        },
        _ => step_time,
    };
    TimerChange::Schedule {
        step_index: journey.next_step,
        fire_at,
    }
}

fn closed_by_invoice(snapshot: &InvoiceSnapshot) -> Option<CloseReason> {
    match snapshot.status {
        InvoiceStatus::Cancelled => Some(CloseReason::Cancelled),
        InvoiceStatus::SettledByCredit => Some(CloseReason::Credited),
        InvoiceStatus::Open => None,
    }
}

/// A new or changed invoice snapshot.
pub fn on_invoice(existing: Option<Journey>, snapshot: InvoiceSnapshot, plan: &Plan) -> Decision {
    let Some(mut journey) = existing else {
        let mut journey = Journey {
            state: JourneyState::Open,
            invoice: snapshot,
            plan_version: plan.version.clone(),
            plan: plan.name.clone(),
            segment: None,
            experiment: None,
            fees_minor: 0,
            pause: None,
            due_override: None,
            postponements: 0,
            applied_requests: Vec::new(),
            next_step: 0,
            paid_minor: 0,
            applied_payments: Vec::new(),
            steps_taken: Vec::new(),
            fee_dates: Vec::new(),
            fees: Vec::new(),
            warning: None,
            messages: Vec::new(),
            disputes: Vec::new(),
        };
        let mut transitions = vec![transition("opened", JourneyState::Open, JourneyState::Open)];
        if let Some(reason) = closed_by_invoice(&journey.invoice) {
            journey.state = JourneyState::Closed(reason);
            transitions.push(transition("closed", JourneyState::Open, journey.state));
        }
        let timer = schedule_next(&journey, plan);
        return Decision {
            journey,
            transitions,
            timer,
            emit: None,
        };
    };
    let from = journey.state;
    let previous_open = journey.invoice.open();
    journey.invoice = snapshot;
    let mut transitions = Vec::new();
    if from.is_final() {
        // Closed or handed over: record the change, act on nothing.
        transitions.push(transition("invoice_changed", from, from));
        return Decision {
            journey,
            transitions,
            timer: TimerChange::Keep,
            emit: None,
        };
    }
    let kind = match journey.invoice.status {
        InvoiceStatus::Cancelled => "cancelled",
        _ if journey.invoice.open() != previous_open => "credited",
        _ => "invoice_changed",
    };
    let close =
        closed_by_invoice(&journey.invoice).or_else(|| (journey.outstanding().minor == 0).then_some(CloseReason::Paid));
    if let Some(reason) = close {
        journey.state = JourneyState::Closed(reason);
        transitions.push(transition(kind, from, journey.state));
        return Decision {
            journey,
            transitions,
            timer: TimerChange::Cancel,
            emit: None,
        };
    }
    transitions.push(transition(kind, from, from));
    // A re-issue may move the due date: re-anchor the pending step.
    let timer = schedule_next(&journey, plan);
    Decision {
        journey,
        transitions,
        timer,
        emit: None,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaymentError {
    #[error(transparent)]
    Money(#[from] MoneyError),
    #[error("payment amount must be positive, got {0}")]
    NotPositive(Money),
}

/// A payment allocated to this invoice.
pub fn on_payment(mut journey: Journey, payment_id: &str, amount: Money) -> Result<Decision, PaymentError> {
    if !amount.is_positive() {
        return Err(PaymentError::NotPositive(amount));
    }
    journey.invoice.open().try_cmp(amount)?;
    let from = journey.state;
    if journey.applied_payments.iter().any(|p| p == payment_id) {
        return Ok(Decision {
            journey,
            transitions: Vec::new(),
            timer: TimerChange::Keep,
            emit: None,
        });
    }
    journey.applied_payments.push(payment_id.to_owned());
    let owed_before = journey.outstanding().minor;
    journey.paid_minor = journey.paid_minor.saturating_add(amount.minor);
    let settled = journey.outstanding().minor == 0;
    let overpaid = Money::new((amount.minor - owed_before).max(0), amount.currency);
    let mut t = if settled && !matches!(from, JourneyState::Closed(_)) {
        journey.state = JourneyState::Closed(CloseReason::Paid);
        transition("paid", from, journey.state)
    } else {
        transition("partly_paid", from, journey.state)
    };
    t.reason = Some(format!("payment of {amount}; outstanding {}", journey.outstanding()));
    let mut transitions = vec![t];
    if overpaid.minor > 0 {
        // The debtor paid more than was owed: the surplus is theirs, to refund or to set off.
        let mut credit = transition("credit_balance", journey.state, journey.state);
        credit.reason = Some(format!("overpaid by {overpaid} with payment '{payment_id}'"));
        transitions.push(credit);
    }
    let timer = if settled {
        TimerChange::Cancel
    } else {
        TimerChange::Keep
    };
    Ok(Decision {
        journey,
        transitions,
        timer,
        emit: None,
    })
}

/// What a debtor asked for about an invoice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Dispute {
        reason: Option<String>,
    },
    DisputeResolved {
        resolution: Option<String>,
    },
    Postpone {
        to: NaiveDate,
    },
    InstalmentPlan {
        parts: Vec<(NaiveDate, Money)>,
    },
    PromiseToPay {
        by: NaiveDate,
    },
    ClaimsPaid,
    /// The link the debtor followed had expired: send a fresh one to the contact on file.
    FreshLink,
}

/// Why a debtor's request was refused, as a stable code (`request_refused` events carry it as
/// their rule) that the debtor's page words in the debtor's language.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalCode {
    /// Paid, credited, cancelled or with the agency.
    Closed,
    AlreadyDisputed,
    NoDispute,
    /// Another pause holds the invoice.
    Paused,
    /// The invoice is disputed: nothing else is decided until the dispute is.
    Disputed,
    /// No more postponements are allowed.
    Postponed,
    /// The new due date is not after the current one.
    NotLater,
    /// Further ahead than the policy allows.
    TooFar,
    /// The instalments are not within the policy's limits or do not add up.
    PlanOutsideLimits,
}

impl RefusalCode {
    pub const ALL: [RefusalCode; 9] = [
        RefusalCode::Closed,
        RefusalCode::AlreadyDisputed,
        RefusalCode::NoDispute,
        RefusalCode::Paused,
        RefusalCode::Disputed,
        RefusalCode::Postponed,
        RefusalCode::NotLater,
        RefusalCode::TooFar,
        RefusalCode::PlanOutsideLimits,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RefusalCode::Closed => "closed",
            RefusalCode::AlreadyDisputed => "already_disputed",
            RefusalCode::NoDispute => "no_dispute",
            RefusalCode::Paused => "paused",
            RefusalCode::Disputed => "disputed",
            RefusalCode::Postponed => "postponed_already",
            RefusalCode::NotLater => "not_later",
            RefusalCode::TooFar => "too_far",
            RefusalCode::PlanOutsideLimits => "plan_outside_limits",
        }
    }
}

/// A debtor's request. A request the policy's limits do not allow is refused, and the
/// refusal, with its reason, is the transition.
pub fn on_request(
    mut journey: Journey,
    request_id: &str,
    request: Request,
    plan: &Plan,
    limits: &PauseLimits,
    today: NaiveDate,
) -> Decision {
    let from = journey.state;
    if journey.applied_requests.iter().any(|r| r == request_id) {
        return Decision {
            journey,
            transitions: Vec::new(),
            timer: TimerChange::Keep,
            emit: None,
        };
    }
    journey.applied_requests.push(request_id.to_owned());
    // The refusal's code (in the transition's `rule`) says which rule refused, for the page to
    // tell the debtor in their language; the reason says it in English for staff.
    let refuse = |journey: Journey, code: RefusalCode, why: String| {
        let mut t = transition("request_refused", from, from);
        t.rule = Some(code.as_str().to_owned());
        t.reason = Some(why);
        Decision {
            journey,
            transitions: vec![t],
            timer: TimerChange::Keep,
            emit: None,
        }
    };
    if from.is_final() {
        return refuse(journey, RefusalCode::Closed, format!("the invoice is {}", from.label()));
    }
    let disputed = from == JourneyState::Paused(PauseReason::Dispute);
    let pause = |journey: &mut Journey, reason, until, instalments| {
        let resume_state = journey.pause.take().map(|p| p.resume_state).unwrap_or(journey.state);
        journey.pause = Some(Pause {
            reason,
            resume_state,
            until,
            instalments,
            paid_before: journey.paid_minor,
        });
        journey.state = JourneyState::Paused(reason);
    };
    let (kind, reason) = match request {
        Request::Dispute { reason } => {
            if disputed {
                return refuse(
                    journey,
                    RefusalCode::AlreadyDisputed,
                    "the invoice is already disputed".into(),
                );
            }
            pause(&mut journey, PauseReason::Dispute, None, Vec::new());
            journey.disputes.push(DisputeRecord {
                opened: today,
                reason: reason.clone(),
                resolved: None,
                resolution: None,
            });
            ("disputed", reason)
        }
        Request::DisputeResolved { resolution } => {
            if !disputed {
                return refuse(
                    journey,
                    RefusalCode::NoDispute,
                    "no dispute is open on the invoice".into(),
                );
            }
            journey.state = journey
                .pause
                .take()
                .map(|p| p.resume_state)
                .unwrap_or(JourneyState::Open);
            reanchor_after_pause(&mut journey, plan, today);
            if let Some(open) = journey.disputes.iter_mut().rev().find(|d| d.resolved.is_none()) {
                open.resolved = Some(today);
                open.resolution = resolution.clone();
            }
            ("dispute_resolved", resolution)
        }
        Request::Postpone { to } => {
            if matches!(from, JourneyState::Paused(_)) {
                return refuse(journey, RefusalCode::Paused, format!("the invoice is {}", from.label()));
            }
            if journey.postponements >= limits.max_postponements {
                return refuse(
                    journey,
                    RefusalCode::Postponed,
                    format!("at most {} postponement(s) per invoice", limits.max_postponements),
                );
            }
            let original = journey.invoice.due_date;
            let current = journey.anchor_due();
            if to <= current {
                return refuse(
                    journey,
                    RefusalCode::NotLater,
                    format!("the new due date {to} must be after the current one {current}"),
                );
            }
            if (to - original).num_days() > limits.max_postpone_days {
                return refuse(
                    journey,
                    RefusalCode::TooFar,
                    format!(
                        "a due date may move at most {} days past the original {original}",
                        limits.max_postpone_days
                    ),
                );
            }
            let was = journey.anchor_due();
            journey.due_override = Some(to);
            journey.postponements += 1;
            ("postponed", Some(format!("due date moved from {was} to {to}")))
        }
        Request::InstalmentPlan { parts } => {
            if disputed {
                return refuse(journey, RefusalCode::Disputed, "the invoice is disputed".into());
            }
            let owed = journey.outstanding();
            let problem = if parts.is_empty() {
                Some("the plan has no instalments".to_owned())
            } else if parts.len() > limits.max_instalments {
                Some(format!("at most {} instalments", limits.max_instalments))
            } else if parts.iter().any(|(_, m)| m.currency != owed.currency || m.minor <= 0) {
                Some(format!(
                    "every instalment must be a positive amount in {}",
                    owed.currency
                ))
            } else if parts.windows(2).any(|w| w[1].0 <= w[0].0) {
                Some("instalment dates must increase".to_owned())
            } else if parts[0].0 < today {
                Some(format!(
                    "the first instalment ({}) is before today ({today})",
                    parts[0].0
                ))
            } else if (parts[parts.len() - 1].0 - today).num_days() > limits.max_instalment_span_days {
                Some(format!(
                    "the plan may span at most {} days",
                    limits.max_instalment_span_days
                ))
            } else if parts.iter().map(|(_, m)| m.minor).sum::<i64>() != owed.minor {
                Some(format!(
                    "the instalments add up to {} but {owed} is owed",
                    Money::new(parts.iter().map(|(_, m)| m.minor).sum(), owed.currency)
                ))
            } else {
                None
            };
            if let Some(why) = problem {
                return refuse(journey, RefusalCode::PlanOutsideLimits, why);
            }
            let n = parts.len();
            let first = parts[0];
            pause(
                &mut journey,
                PauseReason::Instalments,
                None,
                parts.into_iter().map(|(d, m)| (d, m.minor)).collect(),
            );
            (
                "instalment_plan_agreed",
                Some(format!("{n} instalments, the first {} on {}", first.1, first.0)),
            )
        }
        Request::PromiseToPay { by } => {
            if disputed {
                return refuse(journey, RefusalCode::Disputed, "the invoice is disputed".into());
            }
            if by < today || (by - today).num_days() > limits.max_promise_days {
                return refuse(
                    journey,
                    RefusalCode::TooFar,
                    format!(
                        "a promise must be for a day from today to {} days ahead",
                        limits.max_promise_days
                    ),
                );
            }
            pause(&mut journey, PauseReason::PromiseToPay, Some(by), Vec::new());
            ("promised_to_pay", Some(format!("promised to pay by {by}")))
        }
        Request::FreshLink => {
            // A message like any other: not while the journey is paused (dispatch's last look
            // would hold it back anyway), and never for a closed or handed-over invoice.
            if !from.accepts_contact() {
                return refuse(
                    journey,
                    RefusalCode::Paused,
                    format!("the invoice is {}: no message goes out while it is", from.label()),
                );
            }
            let mut t = transition("fresh_link_sent", from, from);
            t.reason = Some("the debtor's link had expired: a fresh one goes to the contact on file".into());
            return Decision {
                journey,
                transitions: vec![t],
                timer: TimerChange::Keep,
                emit: Some(Emit::FreshLink {
                    channels: vec!["email".to_owned(), "sms".to_owned()],
                }),
            };
        }
        Request::ClaimsPaid => {
            if disputed {
                return refuse(journey, RefusalCode::Disputed, "the invoice is disputed".into());
            }
            let until = today + Duration::days(limits.claims_paid_days);
            pause(&mut journey, PauseReason::ClaimsPaid, Some(until), Vec::new());
            (
                "claims_paid",
                Some(format!(
                    "the debtor says it is paid; waiting for the money until {until}"
                )),
            )
        }
    };
    let mut t = transition(kind, from, journey.state);
    t.reason = reason;
    let timer = schedule_next_with(&journey, plan, limits.instalment_grace_days);
    Decision {
        journey,
        transitions: vec![t],
        timer,
        emit: None,
    }
}

/// The timer for step `step_index` fired at `now`. `fee` is what the step charges this debtor,
/// resolved from the plan's fee spec and the debtor's law by the caller (zero for none).
///
/// Late never means a burst. A step that fires late (a watcher outage, a rebuild, a clock jump)
/// is still taken, so none is silently skipped, and the steps after it are planned again from
/// today, keeping their banking-day distance from it: the debtor gets one message for the
/// catch-up, not every overdue step back to back. A step meant for before the due date whose
/// moment has passed is skipped with the reason recorded ("due soon" after the due date would
/// be wrong).
pub fn on_timer(journey: Journey, step_index: usize, plan: &Plan, fee: Money, now: DateTime<Utc>) -> Decision {
    on_timer_with(journey, step_index, plan, StepFee::plain(fee), now)
}

/// What a step charges this debtor, and the first local day the law lets that fee be charged
/// (from the fees charged before: [`crate::law::LawBook::earliest_fee_date`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepFee {
    pub amount: Money,
    pub not_before: Option<NaiveDate>,
}

impl StepFee {
    pub fn plain(amount: Money) -> Self {
        Self {
            amount,
            not_before: None,
        }
    }
}

/// [`on_timer`], with the law's earliest day for the step's fee: a fee-bearing step that
/// fires before it (a late journey re-planned, a postponement) waits for that day instead of
/// going out, so fees are never closer together than the law allows.
pub fn on_timer_with(
    mut journey: Journey,
    step_index: usize,
    plan: &Plan,
    fee: StepFee,
    now: DateTime<Utc>,
) -> Decision {
    let mut resumed = None;
    if let (JourneyState::Paused(reason), true) = (journey.state, step_index == journey.next_step) {
        let today = now
            .with_timezone(&journey.invoice.jurisdiction.time_zone())
            .date_naive();
        let grace = PauseLimits::default().instalment_grace_days;
        let kept = match reason {
            PauseReason::Dispute => None,
            PauseReason::PromiseToPay | PauseReason::ClaimsPaid => {
                let until = journey.pause.as_ref().and_then(|p| p.until);
                if until.is_some_and(|u| today <= u) {
                    Some(())
                } else {
                    None
                }
            }
            PauseReason::Instalments => {
                let due = journey.instalments_due_by(today, grace);
                if journey.paid_minor >= due && pause_check_day(&journey, grace).is_some() {
                    Some(())
                } else {
                    None
                }
            }
        };
        if reason == PauseReason::Dispute || kept.is_some() {
            // Still within what was agreed: look again at the next check.
            let timer = schedule_next_with(&journey, plan, grace);
            return Decision {
                journey,
                transitions: Vec::new(),
                timer,
                emit: None,
            };
        }
        let pause = journey.pause.take();
        let back = pause.as_ref().map(|p| p.resume_state).unwrap_or(JourneyState::Open);
        let mut t = transition("resumed", journey.state, back);
        t.reason = Some(match reason {
            PauseReason::Instalments => format!(
                "an instalment was missed: {} of {} due by {today} was paid",
                Money::new(journey.paid_minor, journey.invoice.amount.currency),
                Money::new(
                    journey.instalments_due_by(today, grace),
                    journey.invoice.amount.currency
                )
            ),
            PauseReason::PromiseToPay => format!(
                "the promise to pay by {} was not kept",
                pause.and_then(|p| p.until).map(|d| d.to_string()).unwrap_or_default()
            ),
            _ => "the payment the debtor reported has not arrived".to_owned(),
        });
        journey.state = back;
        reanchor_after_pause(&mut journey, plan, today);
        resumed = Some(t);
    }
    let mut decision = on_timer_active(journey, step_index, plan, fee, now);
    if let Some(t) = resumed {
        decision.transitions.insert(0, t);
    }
    decision
}

fn on_timer_active(mut journey: Journey, step_index: usize, plan: &Plan, fee: StepFee, now: DateTime<Utc>) -> Decision {
    let from = journey.state;
    if !from.accepts_contact() || step_index != journey.next_step {
        // A timer left over from before a payment, a re-anchor or a redelivery: nothing to do.
        return Decision {
            journey,
            transitions: Vec::new(),
            timer: TimerChange::Keep,
            emit: None,
        };
    }
    let Some(step) = plan.steps.get(step_index).cloned() else {
        return Decision {
            journey,
            transitions: Vec::new(),
            timer: TimerChange::Cancel,
            emit: None,
        };
    };
    let j = journey.invoice.jurisdiction;
    let today = j.local_day(now);
    let due_moment = plan.due_moment(journey.anchor_due(), j);
    if step.offset_banking_days < 0 && due_moment.is_some_and(|due| now >= due) {
        journey.next_step += 1;
        let mut t = transition("step_skipped", from, from);
        t.step = Some(step.name.clone());
        t.rule = Some(format!(
            "plan '{}' step '{}' is for before the due date",
            plan.name, step.name
        ));
        t.reason = Some("its moment passed before it could be sent (the due date has arrived)".to_owned());
        let timer = schedule_next(&journey, plan);
        return Decision {
            journey,
            transitions: vec![t],
            timer,
            emit: None,
        };
    }
    let charges = matches!(step.kind, StepKind::Message { .. })
        && fee.amount.minor > 0
        && fee.amount.currency == journey.invoice.amount.currency;
    if let Some(day) = fee.not_before.filter(|day| charges && *day > today) {
        return defer_for_fee(journey, step_index, &step, plan, day);
    }
    // Planned for an earlier day: the steps after this one count from today.
    let planned = plan.fire_at(step_index, journey.anchor_due(), j);
    let late_from = planned.map(|at| j.local_day(at)).filter(|day| *day < today);
    if late_from.is_some() {
        reanchor_after_pause(&mut journey, plan, today);
    }
    journey.next_step += 1;
    journey.steps_taken.push(step.name.clone());
    if let StepKind::Message {
        tone: Tone::CollectionWarning,
        ..
    } = &step.kind
    {
        journey.warning = Some(WarningGiven {
            date: today,
            step: step.name.clone(),
            days_to_pay: step.days_to_pay,
        });
    }
    if charges {
        journey.fees_minor += fee.amount.minor;
        journey.fee_dates.push(today);
        if let StepKind::Message { tone, .. } = &step.kind {
            journey.fees.push(FeeCharged {
                date: today,
                step: step.name.clone(),
                kind: crate::policy::law_step(*tone),
                minor: fee.amount.minor,
            });
        }
    }
    let (to, emit) = match &step.kind {
        StepKind::Message { tone, channels } => {
            let to = match tone {
                Tone::Nudge => JourneyState::Nudged,
                Tone::Reminder => JourneyState::Reminded(match from {
                    JourneyState::Reminded(n) => n + 1,
                    _ => 1,
                }),
                // Both tell the debtor that collection follows.
                Tone::CollectionWarning | Tone::PaymentDemand => JourneyState::Warned,
            };
            (
                to,
                Emit::Message {
                    step_index,
                    step: step.clone(),
                    tone: *tone,
                    channels: channels.clone(),
                },
            )
        }
        StepKind::Handoff => (JourneyState::HandedOver, Emit::Handoff { step: step.clone() }),
    };
    journey.state = to;
    let mut t = transition(
        if to == JourneyState::HandedOver {
            "handed_over"
        } else {
            "step_sent"
        },
        from,
        to,
    );
    t.step = Some(step.name.clone());
    t.rule = Some(format!(
        "plan '{}' ({}) step '{}' ({} banking days from due)",
        plan.name, plan.version, step.name, step.offset_banking_days
    ));
    let mut reasons = Vec::new();
    if charges {
        reasons.push(format!("fee {}", fee.amount));
    }
    if let Some(day) = late_from {
        reasons.push(format!(
            "planned for {day}, taken late; the steps after it keep their spacing from today"
        ));
    }
    if !reasons.is_empty() {
        t.reason = Some(reasons.join("; "));
    }
    let timer = schedule_next(&journey, plan);
    Decision {
        journey,
        transitions: vec![t],
        timer,
        emit: Some(emit),
    }
}

/// A fee-bearing step that came before the law's earliest day for its fee: nothing is sent,
/// and the step is looked at again on that day at the plan's hour.
fn defer_for_fee(journey: Journey, step_index: usize, step: &PlannedStep, plan: &Plan, day: NaiveDate) -> Decision {
    let j = journey.invoice.jurisdiction;
    let Some(fire_at) = local_instant(day, plan.send_time, j)
        .and_then(|at| calendar::next_contact_moment(&calendar::ContactHours::default_for(j), j, at))
    else {
        return Decision {
            journey,
            transitions: Vec::new(),
            timer: TimerChange::Cancel,
            emit: None,
        };
    };
    let mut t = transition("step_deferred", journey.state, journey.state);
    t.step = Some(step.name.clone());
    t.rule = Some(format!(
        "the law's earliest day for this fee, counted from the fees charged before ({})",
        journey
            .fee_dates
            .iter()
            .map(NaiveDate::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    ));
    t.reason = Some(format!("a fee-bearing step waits until {day}"));
    Decision {
        journey,
        transitions: vec![t],
        timer: TimerChange::Schedule { step_index, fire_at },
        emit: None,
    }
}

/// One of a debtor's open invoices at the moment a timer of the debtor fires: its journey, its
/// plan, the fee its next step charges when sent on time, and the step whose timer fired, when
/// its own timer is the one firing.
#[derive(Debug, Clone)]
pub struct DebtorInvoice {
    pub journey: Journey,
    pub plan: Plan,
    pub fee: Money,
    /// The law's earliest day for that fee (see [`StepFee`]).
    pub fee_not_before: Option<NaiveDate>,
    pub fired_step: Option<usize>,
}

/// How an invoice took part in a firing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Its step produced the message; `covers` are the other invoices (input indices) listed in it.
    Lead { covers: Vec<usize> },
    /// Its step went out in the message of the invoice at input index `lead`.
    Covered { lead: usize },
    /// Decided on its own: a hand-off, a skipped step, a stale timer.
    Alone,
}

/// The decision for one input invoice (by index) and its role.
#[derive(Debug, Clone, PartialEq)]
pub struct Fired {
    pub index: usize,
    pub decision: Decision,
    pub role: Role,
}

/// Fires a debtor's due timers together. Messages of one tone and currency become one action:
/// the oldest claim leads and the others are listed in it. An open invoice whose own next step
/// has that tone and falls within `window` joins too, so the debtor gets one message instead of
/// several in a few days. A step sent before its planned moment charges no fee: the plan's
/// timing is what was checked against the law, so a fee is only charged on or after it; a
/// reminder or warning is never brought forward for a claim that is not yet overdue.
pub fn fire_together(invoices: &[DebtorInvoice], now: DateTime<Utc>, window: Duration) -> Vec<Fired> {
    let mut fired: Vec<Fired> = invoices
        .iter()
        .enumerate()
        .filter_map(|(index, inv)| {
            let step = inv.fired_step?;
            Some(Fired {
                index,
                decision: on_timer_with(
                    inv.journey.clone(),
                    step,
                    &inv.plan,
                    StepFee {
                        amount: inv.fee,
                        not_before: inv.fee_not_before,
                    },
                    now,
                ),
                role: Role::Alone,
            })
        })
        .collect();
    let claim_order = |i: usize| {
        let j = &invoices[i].journey;
        (j.anchor_due(), j.invoice.invoice_id.clone())
    };
    // Leads: per (tone, currency), the oldest claim among the messages due now.
    let mut order: Vec<usize> = (0..fired.len())
        .filter(|&p| message_tone(&fired[p].decision).is_some())
        .collect();
    order.sort_by_key(|&p| claim_order(fired[p].index));
    let mut leads: Vec<(Tone, crate::Currency, usize)> = Vec::new();
    for p in order {
        let Some(tone) = message_tone(&fired[p].decision) else {
            continue;
        };
        let currency = invoices[fired[p].index].journey.invoice.amount.currency;
        match leads.iter().find(|(t, c, _)| *t == tone && *c == currency) {
            Some(&(_, _, lead)) => {
                let lead_index = fired[lead].index;
                cover(&mut fired[p], lead_index, &invoices[lead_index].journey, window, None);
                let covered = fired[p].index;
                if let Role::Lead { covers } = &mut fired[lead].role {
                    covers.push(covered);
                }
            }
            None => {
                fired[p].role = Role::Lead { covers: Vec::new() };
                leads.push((tone, currency, p));
            }
        }
    }
    // Invoices whose own step is near: brought forward into a lead's message.
    let mut near: Vec<usize> = (0..invoices.len())
        .filter(|&i| invoices[i].fired_step.is_none())
        .collect();
    near.sort_by_key(|&i| claim_order(i));
    for i in near {
        let inv = &invoices[i];
        let j = &inv.journey;
        if !j.state.accepts_contact() {
            continue;
        }
        let TimerChange::Schedule { step_index, fire_at } = schedule_next(j, &inv.plan) else {
            continue;
        };
        if fire_at > now + window {
            continue;
        }
        let Some(StepKind::Message { tone, .. }) = inv.plan.steps.get(step_index).map(|s| &s.kind) else {
            continue;
        };
        let today = j.invoice.jurisdiction.local_day(now);
        if *tone != Tone::Nudge && today <= j.anchor_due() {
            continue;
        }
        let Some(&(_, _, lead)) = leads
            .iter()
            .find(|(t, c, _)| t == tone && *c == j.invoice.amount.currency)
        else {
            continue;
        };
        let early = fire_at > now;
        let fee = if early { Money::zero(inv.fee.currency) } else { inv.fee };
        let fee = StepFee {
            amount: fee,
            not_before: inv.fee_not_before,
        };
        let decision = on_timer_with(j.clone(), step_index, &inv.plan, fee, now);
        if message_tone(&decision).is_none() {
            continue;
        }
        let lead_index = fired[lead].index;
        let mut f = Fired {
            index: i,
            decision,
            role: Role::Alone,
        };
        let waived = (early && inv.fee.minor > 0).then_some(inv.fee);
        cover(&mut f, lead_index, &invoices[lead_index].journey, window, waived);
        if let Role::Lead { covers } = &mut fired[lead].role {
            covers.push(i);
        }
        fired.push(f);
    }
    fired
}

fn message_tone(d: &Decision) -> Option<Tone> {
    match &d.emit {
        Some(Emit::Message { tone, .. }) => Some(*tone),
        _ => None,
    }
}

/// Turns a message decision into a part of the lead's message, saying so in its transition.
fn cover(f: &mut Fired, lead: usize, lead_journey: &Journey, window: Duration, waived: Option<Money>) {
    f.decision.emit = None;
    f.role = Role::Covered { lead };
    if let Some(t) = f.decision.transitions.iter_mut().find(|t| t.kind == "step_sent") {
        let mut reason = format!(
            "sent in one message with invoice {} (steps within {} days of each other are combined)",
            lead_journey.invoice.invoice_number,
            window.num_days()
        );
        if let Some(fee) = waived {
            reason.push_str(&format!(
                "; fee {fee} not charged: the step went out before its planned date"
            ));
        } else if let Some(fee) = t.reason.take() {
            reason = format!("{fee}; {reason}");
        }
        t.reason = Some(reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invoice::{apply_cancel, apply_credit, tests::input, validate_issued};
    use crate::money::Currency;

    #[test]
    fn a_tone_reads_back_from_its_code() {
        for tone in [
            Tone::Nudge,
            Tone::Reminder,
            Tone::CollectionWarning,
            Tone::PaymentDemand,
        ] {
            assert_eq!(Tone::from_code(tone.code()), Some(tone));
        }
        assert_eq!(Tone::from_code("Reminder"), None);
        assert_eq!(Tone::from_code(""), None);
    }

    fn far_future() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap()
    }

    /// The moment a scheduled timer falls due.
    fn on_time(timer: &TimerChange) -> DateTime<Utc> {
        match timer {
            TimerChange::Schedule { fire_at, .. } => *fire_at,
            other => panic!("no timer scheduled: {other:?}"),
        }
    }

    fn opened_timer() -> TimerChange {
        on_invoice(None, validate_issued(input()).unwrap(), &Plan::builtin()).timer
    }

    fn opened() -> (Journey, Plan) {
        let plan = Plan::builtin();
        let d = on_invoice(None, validate_issued(input()).unwrap(), &plan);
        (d.journey, plan)
    }

    #[test]
    fn a_new_invoice_schedules_the_nudge_at_nine_local_on_the_due_date() {
        let plan = Plan::builtin();
        let d = on_invoice(None, validate_issued(input()).unwrap(), &plan);
        // Due Sunday 2026-03-15, so the first banking day is Monday 16 March; 09:00 in
        // Copenhagen is 08:00 UTC (CET, before the DST change on 29 March).
        let expected = Utc.with_ymd_and_hms(2026, 3, 16, 8, 0, 0).unwrap();
        assert_eq!(
            d.timer,
            TimerChange::Schedule {
                step_index: 0,
                fire_at: expected
            }
        );
        assert_eq!(d.journey.state, JourneyState::Open);
    }

    #[test]
    fn a_fresh_link_is_a_message_without_a_step_or_fee_and_only_while_contact_is_allowed() {
        let (j, plan) = opened();
        let limits = PauseLimits::default();
        let today = NaiveDate::from_ymd_opt(2026, 3, 20).unwrap();
        let d = on_request(j.clone(), "r1", Request::FreshLink, &plan, &limits, today);
        assert!(matches!(&d.emit, Some(Emit::FreshLink { channels }) if channels == &["email", "sms"]));
        assert_eq!(d.timer, TimerChange::Keep, "the plan goes on as it was");
        assert_eq!(
            (d.journey.state, d.journey.next_step, d.journey.fees_minor),
            (j.state, j.next_step, j.fees_minor)
        );
        assert_eq!(d.transitions[0].kind, "fresh_link_sent");
        // The same request again (a redelivery) sends nothing more.
        let again = on_request(d.journey, "r1", Request::FreshLink, &plan, &limits, today);
        assert!(again.emit.is_none() && again.transitions.is_empty());
        // Paused or paid: refused, nothing sent.
        let paused = on_request(j.clone(), "r2", Request::ClaimsPaid, &plan, &limits, today).journey;
        let refused = on_request(paused, "r3", Request::FreshLink, &plan, &limits, today);
        assert!(refused.emit.is_none());
        assert_eq!(
            refused.transitions[0].rule.as_deref(),
            Some(RefusalCode::Paused.as_str())
        );
        let amount = j.invoice.amount;
        let paid = on_payment(j, "p1", amount).unwrap().journey;
        let refused = on_request(paid, "r4", Request::FreshLink, &plan, &limits, today);
        assert!(refused.emit.is_none());
        assert_eq!(
            refused.transitions[0].rule.as_deref(),
            Some(RefusalCode::Closed.as_str())
        );
    }

    #[test]
    fn only_decisions_that_end_contact_stop_it() {
        let (j, plan) = opened();
        let nudge = on_timer(
            j.clone(),
            0,
            &plan,
            Money::zero(Currency::DKK),
            on_time(&opened_timer()),
        );
        assert!(!nudge.stops_contact(), "a nudge keeps the journey contactable");
        let amount = j.invoice.amount;
        let paid = on_payment(j, "p1", amount).unwrap();
        assert_eq!(paid.journey.state, JourneyState::Closed(CloseReason::Paid));
        assert!(paid.stops_contact());
        // A payment on a journey already closed changes no contact.
        let again = on_payment(paid.journey.clone(), "p2", amount).unwrap();
        assert!(!again.stops_contact(), "{:?}", again.transitions);
    }

    #[test]
    fn steps_run_in_order_to_handoff_then_stop() {
        let (j, plan) = opened();
        let d1 = on_timer(j, 0, &plan, Money::zero(Currency::DKK), on_time(&opened_timer()));
        assert!(matches!(d1.emit, Some(Emit::Message { tone: Tone::Nudge, .. })));
        // The reminder is ten banking days later (Monday 30 March), after the DST change:
        // 09:00 CEST = 07:00 UTC.
        assert_eq!(
            d1.timer,
            TimerChange::Schedule {
                step_index: 1,
                fire_at: Utc.with_ymd_and_hms(2026, 3, 30, 7, 0, 0).unwrap()
            }
        );
        let d2 = on_timer(
            d1.journey,
            1,
            &plan,
            Money::new(10_000, Currency::DKK),
            on_time(&d1.timer),
        );
        assert_eq!(d2.journey.state, JourneyState::Reminded(1));
        assert_eq!(d2.journey.fees_minor, 10_000, "the reminder's fee is owed");
        assert_eq!(d2.journey.outstanding().minor, 49_900 + 10_000);
        let d3 = on_timer(d2.journey, 2, &plan, Money::zero(Currency::DKK), on_time(&d2.timer));
        assert!(matches!(d3.emit, Some(Emit::Handoff { .. })));
        assert_eq!(d3.journey.state, JourneyState::HandedOver);
        assert_eq!(d3.timer, TimerChange::Cancel);
        assert_eq!(d3.journey.steps_taken, vec!["nudge", "reminder-1", "handoff"]);
    }

    #[test]
    fn a_redelivered_or_stale_timer_does_nothing() {
        let (j, plan) = opened();
        let d1 = on_timer(j, 0, &plan, Money::zero(Currency::DKK), far_future());
        let again = on_timer(d1.journey.clone(), 0, &plan, Money::zero(Currency::DKK), far_future());
        assert_eq!(again.emit, None);
        assert_eq!(again.journey, d1.journey);
    }

    #[test]
    fn full_payment_closes_and_cancels_timers_and_is_applied_once() {
        let (j, plan) = opened();
        let paid = on_payment(j, "bank-1", Money::new(49_900, Currency::DKK)).unwrap();
        assert_eq!(paid.journey.state, JourneyState::Closed(CloseReason::Paid));
        assert_eq!(paid.timer, TimerChange::Cancel);
        let again = on_payment(paid.journey.clone(), "bank-1", Money::new(49_900, Currency::DKK)).unwrap();
        assert!(again.transitions.is_empty());
        assert_eq!(again.journey.paid_minor, 49_900);
        assert_eq!(
            on_timer(paid.journey, 0, &plan, Money::zero(Currency::DKK), far_future()).emit,
            None,
            "no step after payment"
        );
    }

    #[test]
    fn overpayment_closes_and_records_a_credit_balance() {
        let (j, _) = opened();
        let d = on_payment(j, "bank-1", Money::new(50_000, Currency::DKK)).unwrap();
        assert_eq!(d.journey.state, JourneyState::Closed(CloseReason::Paid));
        let kinds: Vec<&str> = d.transitions.iter().map(|t| t.kind).collect();
        assert_eq!(kinds, ["paid", "credit_balance"]);
        assert_eq!(
            d.transitions[1].reason.as_deref(),
            Some("overpaid by 1.00 DKK with payment 'bank-1'")
        );
        // A payment to an invoice already closed is all credit balance.
        let again = on_payment(d.journey, "bank-2", Money::new(2_500, Currency::DKK)).unwrap();
        assert_eq!(
            again.transitions.iter().map(|t| t.kind).collect::<Vec<_>>(),
            ["partly_paid", "credit_balance"]
        );
    }

    #[test]
    fn partial_payment_keeps_the_journey_open_on_the_rest() {
        let (j, _) = opened();
        let d = on_payment(j, "bank-1", Money::new(9_900, Currency::DKK)).unwrap();
        assert_eq!(d.journey.state, JourneyState::Open);
        assert_eq!(d.journey.outstanding().minor, 40_000);
        assert_eq!(d.timer, TimerChange::Keep);
    }

    #[test]
    fn payment_in_another_currency_is_refused() {
        let (j, _) = opened();
        assert!(matches!(
            on_payment(j, "b", Money::new(1, Currency::SEK)),
            Err(PaymentError::Money(_))
        ));
    }

    #[test]
    fn credit_to_zero_and_cancellation_close_the_journey() {
        let (j, plan) = opened();
        let credited = apply_credit(&j.invoice, Money::new(49_900, Currency::DKK)).unwrap();
        let d = on_invoice(Some(j.clone()), credited, &plan);
        assert_eq!(d.journey.state, JourneyState::Closed(CloseReason::Credited));
        assert_eq!(d.timer, TimerChange::Cancel);
        let d = on_invoice(Some(j.clone()), apply_cancel(&j.invoice), &plan);
        assert_eq!(d.journey.state, JourneyState::Closed(CloseReason::Cancelled));
    }

    #[test]
    fn partial_credit_plus_payment_settles() {
        let (j, plan) = opened();
        let paid = on_payment(j, "p1", Money::new(40_000, Currency::DKK)).unwrap().journey;
        let credited = apply_credit(&paid.invoice, Money::new(9_900, Currency::DKK)).unwrap();
        let d = on_invoice(Some(paid), credited, &plan);
        assert_eq!(d.journey.state, JourneyState::Closed(CloseReason::Paid));
    }

    fn plan_with_pre_due_nudge() -> Plan {
        let mut plan = Plan::builtin();
        plan.steps.insert(
            0,
            PlannedStep {
                name: "heads-up".into(),
                offset_banking_days: -3,
                kind: StepKind::Message {
                    tone: Tone::Nudge,
                    channels: vec!["email".into()],
                },
                fee: FeeSpec::None,
                days_to_pay: None,
            },
        );
        plan
    }

    #[test]
    fn a_pre_due_step_that_fires_after_the_due_date_is_skipped_with_its_reason() {
        let plan = plan_with_pre_due_nudge();
        let j = on_invoice(None, validate_issued(input()).unwrap(), &plan).journey;
        // Due Sunday 15 March, so the due moment is Monday 16 March 09:00 CET = 08:00 UTC.
        let late = Utc.with_ymd_and_hms(2026, 3, 16, 8, 0, 0).unwrap();
        let d = on_timer(j.clone(), 0, &plan, Money::zero(Currency::DKK), late);
        assert_eq!(d.emit, None, "no 'due soon' message after the due date");
        assert_eq!(d.transitions[0].kind, "step_skipped");
        assert!(d.journey.steps_taken.is_empty());
        // The next step (the nudge on the due date) is scheduled at once, and fires.
        assert!(matches!(d.timer, TimerChange::Schedule { step_index: 1, fire_at } if fire_at == late));
        let nudge = on_timer(d.journey, 1, &plan, Money::zero(Currency::DKK), late);
        assert!(matches!(nudge.emit, Some(Emit::Message { tone: Tone::Nudge, .. })));
        // In time, the same step is sent.
        let in_time = Utc.with_ymd_and_hms(2026, 3, 11, 8, 0, 0).unwrap();
        assert!(
            on_timer(j, 0, &plan, Money::zero(Currency::DKK), in_time)
                .emit
                .is_some()
        );
    }

    #[test]
    fn steps_land_on_banking_days_at_local_time_in_each_country() {
        // (jurisdiction, due date, step index, expected UTC instant, why)
        let cases = [
            // Easter 2026: Maundy Thursday 2 April to Easter Monday 6 April closed in DK and NO.
            (
                Jurisdiction::DK,
                (2026, 4, 2),
                0,
                (2026, 4, 7, 7),
                "due Maundy Thursday -> Tuesday after Easter, 09:00 CEST",
            ),
            (
                Jurisdiction::NO,
                (2026, 4, 2),
                0,
                (2026, 4, 7, 7),
                "Norway closes Maundy Thursday too",
            ),
            // Sweden and Finland work on Maundy Thursday, close Good Friday and Easter Monday.
            (
                Jurisdiction::SE,
                (2026, 4, 2),
                0,
                (2026, 4, 2, 7),
                "Swedish banks open on Maundy Thursday",
            ),
            (
                Jurisdiction::FI,
                (2026, 4, 3),
                0,
                (2026, 4, 7, 6),
                "Good Friday -> Tuesday 09:00 EEST = 06:00 UTC",
            ),
            // DST: the clocks go forward on 29 March 2026 in all four.
            (
                Jurisdiction::SE,
                (2026, 3, 27),
                0,
                (2026, 3, 27, 8),
                "Friday before the change: 09:00 CET",
            ),
            (
                Jurisdiction::SE,
                (2026, 3, 27),
                1,
                (2026, 4, 14, 7),
                "ten banking days later (Good Friday, Easter Monday closed): 09:00 CEST",
            ),
            (
                Jurisdiction::FI,
                (2026, 10, 23),
                0,
                (2026, 10, 23, 6),
                "Friday before the autumn change: 09:00 EEST",
            ),
            (
                Jurisdiction::FI,
                (2026, 10, 23),
                1,
                (2026, 11, 6, 7),
                "two weeks later: 09:00 EET",
            ),
            // Midsummer Eve (Friday) is closed in SE and FI; a Saturday due date rolls to Monday.
            (
                Jurisdiction::SE,
                (2026, 6, 19),
                0,
                (2026, 6, 22, 7),
                "Midsummer Eve -> Monday",
            ),
            (
                Jurisdiction::DK,
                (2026, 6, 5),
                0,
                (2026, 6, 8, 7),
                "Constitution Day (Friday) -> Monday",
            ),
        ];
        let plan = Plan::builtin();
        for (j, (y, m, d), step, (ey, em, ed, eh), why) in cases {
            let got = plan
                .fire_at(step, NaiveDate::from_ymd_opt(y, m, d).unwrap(), j)
                .unwrap();
            assert_eq!(got, Utc.with_ymd_and_hms(ey, em, ed, eh, 0, 0).unwrap(), "{j}: {why}");
        }
    }

    fn date(y: i32, m: u32, day: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, day).unwrap()
    }

    fn noon(y: i32, m: u32, day: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, day, 11, 0, 0).unwrap()
    }

    fn dkk(minor: i64) -> Money {
        Money::new(minor, Currency::DKK)
    }

    fn scheduled(d: &Decision) -> Option<DateTime<Utc>> {
        match d.timer {
            TimerChange::Schedule { fire_at, .. } => Some(fire_at),
            _ => None,
        }
    }

    #[test]
    fn a_dispute_stops_every_step_until_it_is_resolved() {
        let (j, plan) = opened();
        let limits = PauseLimits::default();
        let d = on_request(
            j,
            "r11",
            Request::Dispute {
                reason: Some("never ordered".into()),
            },
            &plan,
            &limits,
            date(2026, 3, 10),
        );
        assert_eq!(d.journey.state, JourneyState::Paused(PauseReason::Dispute));
        assert_eq!(d.timer, TimerChange::Cancel);
        assert_eq!(d.journey.state.label(), "paused:dispute");
        assert!(
            !d.journey.state.accepts_contact(),
            "dispatch's last look refuses to send"
        );
        // A timer left from before the dispute does nothing.
        let stale = on_timer(d.journey.clone(), 0, &plan, dkk(0), noon(2026, 3, 20));
        assert_eq!((stale.emit, stale.transitions.len()), (None, 0));
        let again = on_request(
            d.journey.clone(),
            "r12",
            Request::Dispute { reason: None },
            &plan,
            &limits,
            date(2026, 3, 11),
        );
        assert_eq!(again.transitions[0].kind, "request_refused");
        assert_eq!(again.transitions[0].rule.as_deref(), Some("already_disputed"));
        let resolved = on_request(
            d.journey,
            "r13",
            Request::DisputeResolved {
                resolution: Some("delivered".into()),
            },
            &plan,
            &limits,
            date(2026, 3, 20),
        );
        assert_eq!(resolved.journey.state, JourneyState::Open);
        // The nudge was due on Monday 16 March; resolved on Friday the 20th, it goes out that
        // day, and the later steps keep their distance from it.
        assert_eq!(
            scheduled(&resolved),
            plan.fire_at(0, date(2026, 3, 20), Jurisdiction::DK)
        );
        assert_eq!(resolved.journey.due_override, Some(date(2026, 3, 20)));
        // Kept for the agency: when it was raised, what the debtor said, and how it ended.
        assert_eq!(
            resolved.journey.disputes,
            vec![DisputeRecord {
                opened: date(2026, 3, 10),
                reason: Some("never ordered".into()),
                resolved: Some(date(2026, 3, 20)),
                resolution: Some("delivered".into()),
            }]
        );
        assert_eq!(again.journey.disputes.len(), 1, "a refused second dispute is not one");
    }

    #[test]
    fn a_postponement_moves_the_plan_once_and_within_the_limit() {
        let (j, plan) = opened();
        let limits = PauseLimits::default();
        let d1 = on_request(
            j,
            "r14",
            Request::Postpone { to: date(2026, 3, 31) },
            &plan,
            &limits,
            date(2026, 3, 12),
        );
        assert_eq!(d1.transitions[0].kind, "postponed");
        assert_eq!(d1.journey.anchor_due(), date(2026, 3, 31));
        assert_eq!(scheduled(&d1), plan.fire_at(0, date(2026, 3, 31), Jurisdiction::DK));
        let twice = on_request(
            d1.journey,
            "r15",
            Request::Postpone { to: date(2026, 4, 10) },
            &plan,
            &limits,
            date(2026, 3, 13),
        );
        assert_eq!(
            twice.transitions[0].reason.as_deref(),
            Some("at most 1 postponement(s) per invoice")
        );
        let (j, _) = opened();
        let far = on_request(
            j,
            "r16",
            Request::Postpone { to: date(2026, 4, 30) },
            &plan,
            &limits,
            date(2026, 3, 12),
        );
        assert_eq!(
            far.transitions[0].reason.as_deref(),
            Some("a due date may move at most 30 days past the original 2026-03-15")
        );
    }

    #[test]
    fn a_broken_promise_resumes_the_journey_and_a_kept_one_closes_it() {
        let (j, plan) = opened();
        let limits = PauseLimits::default();
        let promised = on_request(
            j,
            "r17",
            Request::PromiseToPay { by: date(2026, 3, 20) },
            &plan,
            &limits,
            date(2026, 3, 16),
        );
        assert_eq!(promised.journey.state, JourneyState::Paused(PauseReason::PromiseToPay));
        // Looked at again the banking morning after the promise, not at the plan's time.
        assert_eq!(
            scheduled(&promised),
            plan.due_moment(date(2026, 3, 21), Jurisdiction::DK)
        );
        let kept = on_payment(promised.journey.clone(), "p", dkk(49_900)).unwrap();
        assert_eq!(kept.journey.state, JourneyState::Closed(CloseReason::Paid));
        let broken = on_timer(promised.journey, 0, &plan, dkk(0), noon(2026, 3, 23));
        assert_eq!(broken.transitions[0].kind, "resumed");
        assert_eq!(
            broken.transitions[0].reason.as_deref(),
            Some("the promise to pay by 2026-03-20 was not kept")
        );
        assert!(broken.emit.is_some(), "the step that waited is sent now");
        let (j, _) = opened();
        let too_far = on_request(
            j,
            "r18",
            Request::PromiseToPay { by: date(2026, 5, 1) },
            &plan,
            &limits,
            date(2026, 3, 16),
        );
        assert_eq!(too_far.transitions[0].kind, "request_refused");
        assert_eq!(too_far.transitions[0].rule.as_deref(), Some("too_far"));
    }

    #[test]
    fn what_the_page_offers_the_watcher_grants() {
        use crate::self_service::{instalment_counts, instalment_plan, postpone_window};
        let limits = PauseLimits::default();
        let today = date(2026, 3, 16);
        let (j, plan) = opened();
        let owed = j.outstanding();
        let counts = instalment_counts(owed, today, &limits);
        assert_eq!(counts, vec![2, 3, 4, 5, 6]);
        for n in counts {
            let parts = instalment_plan(owed, today, n, &limits).unwrap();
            let d = on_request(j.clone(), "r", Request::InstalmentPlan { parts }, &plan, &limits, today);
            assert_eq!(
                d.transitions[0].kind, "instalment_plan_agreed",
                "{n}: {:?}",
                d.transitions
            );
        }
        let (earliest, latest) =
            postpone_window(j.invoice.due_date, j.anchor_due(), j.postponements, today, &limits).unwrap();
        for to in [earliest, latest] {
            let d = on_request(j.clone(), "p", Request::Postpone { to }, &plan, &limits, today);
            assert_eq!(d.transitions[0].kind, "postponed", "{to}: {:?}", d.transitions);
        }
        let beyond = on_request(
            j.clone(),
            "p",
            Request::Postpone {
                to: latest.succ_opt().unwrap(),
            },
            &plan,
            &limits,
            today,
        );
        assert_eq!(beyond.transitions[0].kind, "request_refused");
        assert_eq!(
            beyond.transitions[0].rule.as_deref(),
            Some(RefusalCode::TooFar.as_str())
        );
        let once = on_request(j, "p", Request::Postpone { to: latest }, &plan, &limits, today).journey;
        assert_eq!(
            postpone_window(
                once.invoice.due_date,
                once.anchor_due(),
                once.postponements,
                today,
                &limits
            ),
            None
        );
    }

    #[test]
    fn instalments_hold_the_journey_while_paid_and_a_missed_one_resumes_it() {
        let (j, plan) = opened();
        let limits = PauseLimits::default();
        let parts = vec![(date(2026, 3, 20), dkk(25_000)), (date(2026, 4, 20), dkk(24_900))];
        let agreed = on_request(
            j,
            "r1",
            Request::InstalmentPlan { parts },
            &plan,
            &limits,
            date(2026, 3, 16),
        );
        assert_eq!(agreed.journey.state, JourneyState::Paused(PauseReason::Instalments));
        let paid_first = on_payment(agreed.journey, "p1", dkk(25_000)).unwrap();
        assert_eq!(paid_first.journey.state, JourneyState::Paused(PauseReason::Instalments));
        // At the first check the plan is kept: the next look is after the second instalment.
        let check = on_timer(paid_first.journey, 0, &plan, dkk(0), noon(2026, 3, 24));
        assert_eq!((check.emit.clone(), check.transitions.len()), (None, 0));
        assert_eq!(scheduled(&check).map(|t| t.date_naive()), Some(date(2026, 4, 24)));
        // The second is missed.
        let missed = on_timer(check.journey, 0, &plan, dkk(0), noon(2026, 4, 27));
        assert_eq!(missed.transitions[0].kind, "resumed");
        assert!(
            missed.transitions[0]
                .reason
                .as_deref()
                .unwrap_or("")
                .starts_with("an instalment was missed")
        );
        assert!(missed.emit.is_some());
    }

    #[test]
    fn instalment_plans_are_checked_before_they_are_agreed() {
        let (j, plan) = opened();
        let limits = PauseLimits::default();
        let refuse = |parts: Vec<(NaiveDate, Money)>| {
            on_request(
                j.clone(),
                "r19",
                Request::InstalmentPlan { parts },
                &plan,
                &limits,
                date(2026, 3, 16),
            )
            .transitions[0]
                .reason
                .clone()
                .unwrap_or_default()
        };
        assert_eq!(
            refuse(vec![(date(2026, 3, 20), dkk(100))]),
            "the instalments add up to 1.00 DKK but 499.00 DKK is owed"
        );
        assert_eq!(
            refuse(vec![(date(2026, 4, 20), dkk(24_900)), (date(2026, 3, 20), dkk(25_000))]),
            "instalment dates must increase"
        );
        assert_eq!(
            refuse(vec![(date(2026, 3, 1), dkk(49_900))]),
            "the first instalment (2026-03-01) is before today (2026-03-16)"
        );
        assert_eq!(
            refuse(vec![(date(2026, 3, 20), Money::new(49_900, Currency::SEK))]),
            "every instalment must be a positive amount in DKK"
        );
        assert_eq!(
            refuse(vec![(date(2027, 3, 20), dkk(49_900))]),
            "the plan may span at most 180 days"
        );
    }

    #[test]
    fn a_credit_during_a_pause_can_still_settle_the_invoice_and_requests_on_closed_invoices_are_refused() {
        let (j, plan) = opened();
        let limits = PauseLimits::default();
        let disputed = on_request(
            j,
            "r2",
            Request::Dispute { reason: None },
            &plan,
            &limits,
            date(2026, 3, 16),
        )
        .journey;
        let credited = apply_credit(&disputed.invoice, dkk(49_900)).unwrap();
        let d = on_invoice(Some(disputed), credited, &plan);
        assert_eq!(d.journey.state, JourneyState::Closed(CloseReason::Credited));
        let late = on_request(d.journey, "r3", Request::ClaimsPaid, &plan, &limits, date(2026, 3, 17));
        assert_eq!(
            late.transitions[0].reason.as_deref(),
            Some("the invoice is closed:credited")
        );
    }

    #[test]
    fn local_instant_skips_the_spring_forward_gap() {
        // 2026-03-29 02:30 does not exist in Copenhagen; 03:00 CEST = 01:00 UTC.
        let t = local_instant(
            NaiveDate::from_ymd_opt(2026, 3, 29).unwrap(),
            NaiveTime::from_hms_opt(2, 30, 0).unwrap(),
            Jurisdiction::DK,
        )
        .unwrap();
        assert_eq!(t, Utc.with_ymd_and_hms(2026, 3, 29, 1, 0, 0).unwrap());
    }
    mod combined {
        use super::*;
        use proptest::prelude::*;

        /// An opened journey for invoice `id` due on `due`, in `currency`.
        fn journey(id: &str, due: NaiveDate, currency: &str) -> Journey {
            let mut i = input();
            i.invoice_id = id.into();
            i.invoice_number = format!("N-{id}");
            i.due_date_days = crate::invoice::epoch_days(due);
            i.currency = currency.into();
            on_invoice(None, validate_issued(i).unwrap(), &Plan::builtin()).journey
        }

        fn member(j: Journey, fired_step: Option<usize>, fee: i64) -> DebtorInvoice {
            let currency = j.invoice.amount.currency;
            DebtorInvoice {
                journey: j,
                plan: Plan::builtin(),
                fee: Money::new(fee, currency),
                fee_not_before: None,
                fired_step,
            }
        }

        /// After the nudge, so the next step is the reminder.
        fn nudged(j: Journey) -> Journey {
            let plan = Plan::builtin();
            let at = plan.fire_at(0, j.anchor_due(), j.invoice.jurisdiction).unwrap();
            on_timer(j, 0, &plan, Money::zero(Currency::DKK), at).journey
        }

        fn d(y: i32, m: u32, day: u32) -> NaiveDate {
            NaiveDate::from_ymd_opt(y, m, day).unwrap()
        }

        // Monday 2026-03-16 09:00 Copenhagen.
        fn monday_nine() -> DateTime<Utc> {
            Utc.with_ymd_and_hms(2026, 3, 16, 8, 0, 0).unwrap()
        }

        fn roles(f: &[Fired]) -> Vec<(usize, Role)> {
            let mut r: Vec<_> = f.iter().map(|f| (f.index, f.role.clone())).collect();
            r.sort_by_key(|(i, _)| *i);
            r
        }

        fn messages(f: &[Fired]) -> usize {
            f.iter().filter(|f| f.decision.emit.is_some()).count()
        }

        #[test]
        fn cases() {
            let days = Duration::days;
            type Case = (&'static str, Vec<DebtorInvoice>, Duration, Vec<(usize, Role)>);
            let due = d(2026, 3, 16);
            let cases: Vec<Case> = vec![
                (
                    "two nudges due at once: the older claim leads, one message",
                    vec![
                        member(journey("b", due, "DKK"), Some(0), 0),
                        member(journey("a", d(2026, 3, 15), "DKK"), Some(0), 0),
                    ],
                    days(3),
                    vec![(0, Role::Covered { lead: 1 }), (1, Role::Lead { covers: vec![0] })],
                ),
                (
                    "a nudge two days later joins with a three-day window",
                    vec![
                        member(journey("a", due, "DKK"), Some(0), 0),
                        member(journey("b", d(2026, 3, 18), "DKK"), None, 0),
                    ],
                    days(3),
                    vec![(0, Role::Lead { covers: vec![1] }), (1, Role::Covered { lead: 0 })],
                ),
                (
                    "the same nudge stays on its own day with a one-day window",
                    vec![
                        member(journey("a", due, "DKK"), Some(0), 0),
                        member(journey("b", d(2026, 3, 18), "DKK"), None, 0),
                    ],
                    days(1),
                    vec![(0, Role::Lead { covers: vec![] })],
                ),
                (
                    "another currency is another message",
                    vec![
                        member(journey("a", due, "DKK"), Some(0), 0),
                        member(journey("b", due, "EUR"), Some(0), 0),
                    ],
                    days(3),
                    vec![(0, Role::Lead { covers: vec![] }), (1, Role::Lead { covers: vec![] })],
                ),
                (
                    "a nudge and a reminder are two messages",
                    vec![
                        member(journey("a", due, "DKK"), Some(0), 0),
                        member(nudged(journey("b", d(2026, 3, 2), "DKK")), Some(1), 0),
                    ],
                    days(3),
                    vec![(0, Role::Lead { covers: vec![] }), (1, Role::Lead { covers: vec![] })],
                ),
                (
                    "a reminder is not brought forward for a claim not yet overdue",
                    vec![
                        member(nudged(journey("a", d(2026, 3, 2), "DKK")), Some(1), 0),
                        member(nudged(journey("b", d(2026, 3, 17), "DKK")), None, 0),
                    ],
                    days(30),
                    vec![(0, Role::Lead { covers: vec![] })],
                ),
                (
                    "a paid invoice is left alone",
                    vec![
                        member(journey("a", due, "DKK"), Some(0), 0),
                        member(
                            on_payment(
                                journey("b", d(2026, 3, 17), "DKK"),
                                "p",
                                Money::new(49_900, Currency::DKK),
                            )
                            .unwrap()
                            .journey,
                            None,
                            0,
                        ),
                    ],
                    days(3),
                    vec![(0, Role::Lead { covers: vec![] })],
                ),
            ];
            for (name, invoices, window, want) in cases {
                let fired = fire_together(&invoices, monday_nine(), window);
                assert_eq!(roles(&fired), want, "{name}");
                let leads = want.iter().filter(|(_, r)| matches!(r, Role::Lead { .. })).count();
                assert_eq!(messages(&fired), leads, "{name}: one message per lead");
            }
        }

        #[test]
        fn a_reminder_brought_forward_charges_no_fee_and_says_why() {
            // Both nudged; a's reminder is due now (10 banking days after 2 March), b's two days later.
            let now = Utc.with_ymd_and_hms(2026, 3, 16, 8, 0, 0).unwrap();
            let a = nudged(journey("a", d(2026, 3, 2), "DKK"));
            let b = nudged(journey("b", d(2026, 3, 4), "DKK"));
            let fired = fire_together(
                &[member(a, Some(1), 10_000), member(b, None, 10_000)],
                now,
                Duration::days(3),
            );
            let lead = fired.iter().find(|f| f.index == 0).unwrap();
            let covered = fired.iter().find(|f| f.index == 1).unwrap();
            assert_eq!(lead.decision.journey.fees_minor, 10_000, "on time: the fee is charged");
            assert_eq!(covered.decision.journey.fees_minor, 0, "early: no fee");
            assert_eq!(covered.decision.journey.state, JourneyState::Reminded(1));
            let reason = covered.decision.transitions[0].reason.clone().unwrap();
            assert!(reason.contains("N-a"), "{reason}");
            assert!(reason.contains("not charged"), "{reason}");
            assert!(
                matches!(covered.decision.timer, TimerChange::Schedule { step_index: 2, .. }),
                "the covered invoice goes on to its next step"
            );
        }

        #[test]
        fn reminders_both_due_charge_each_claim_its_fee() {
            let now = Utc.with_ymd_and_hms(2026, 3, 16, 8, 0, 0).unwrap();
            let a = nudged(journey("a", d(2026, 3, 2), "DKK"));
            let b = nudged(journey("b", d(2026, 3, 2), "DKK"));
            let fired = fire_together(
                &[member(a, Some(1), 10_000), member(b, Some(1), 10_000)],
                now,
                Duration::days(3),
            );
            assert_eq!(messages(&fired), 1);
            assert!(fired.iter().all(|f| f.decision.journey.fees_minor == 10_000));
        }

        proptest! {
            #[test]
            fn every_message_is_one_lead_and_each_invoice_is_decided_once(
                specs in proptest::collection::vec((0i64..20, any::<bool>(), any::<bool>(), 0usize..2), 1..8),
                window in 0i64..6,
            ) {
                let base = d(2026, 3, 2);
                let invoices: Vec<DebtorInvoice> = specs
                    .iter()
                    .enumerate()
                    .map(|(i, (offset, own_timer, was_nudged, cur))| {
                        let j = journey(&format!("i{i}"), base + Duration::days(*offset), ["DKK", "EUR"][*cur]);
                        let j = if *was_nudged { nudged(j) } else { j };
                        let step = j.next_step;
                        member(j, own_timer.then_some(step), 100)
                    })
                    .collect();
                let now = monday_nine();
                let fired = fire_together(&invoices, now, Duration::days(window));
                let mut seen = std::collections::BTreeSet::new();
                for f in &fired {
                    prop_assert!(seen.insert(f.index), "decided twice: {}", f.index);
                    match &f.role {
                        Role::Lead { covers } => {
                            prop_assert!(f.decision.emit.is_some(), "a lead has a message");
                            for c in covers {
                                let covered = fired.iter().find(|x| x.index == *c).unwrap();
                                prop_assert_eq!(&covered.role, &Role::Covered { lead: f.index });
                                prop_assert_eq!(
                                    invoices[*c].journey.invoice.amount.currency,
                                    invoices[f.index].journey.invoice.amount.currency
                                );
                            }
                        }
                        Role::Covered { lead } => {
                            prop_assert!(f.decision.emit.is_none(), "a covered invoice has no message of its own");
                            let l = fired.iter().find(|x| x.index == *lead).unwrap();
                            let listed = matches!(&l.role, Role::Lead { covers } if covers.contains(&f.index));
                            prop_assert!(listed, "the lead lists it");
                        }
                        Role::Alone => {
                            let message = matches!(f.decision.emit, Some(Emit::Message { .. }));
                            prop_assert!(!message, "a message always has a lead");
                        }
                    }
                    if invoices[f.index].fired_step.is_none() {
                        // Brought forward: only within the window, never with an early fee.
                        let next = schedule_next(&invoices[f.index].journey, &invoices[f.index].plan);
                        let TimerChange::Schedule { fire_at, .. } = next else { panic!("no next step") };
                        prop_assert!(fire_at <= now + Duration::days(window), "within the window");
                        if fire_at > now {
                            prop_assert_eq!(f.decision.journey.fees_minor, invoices[f.index].journey.fees_minor);
                        }
                    }
                }
            }
        }
    }
}
