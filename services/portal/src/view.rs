//! The portal's read model: per invoice, what the debtor's page shows, kept in the portal's own
//! Redis keys from the topics (never another service's keys).
//!
//! One hash per invoice, `portal:inv:{<tenant>}:<invoice>`:
//! - `snap`: the latest invoice snapshot from `forfall.invoices.v1` (a later revision wins);
//! - `state`: the journey's state after its latest event on `forfall.journey.events.v1`, with
//!   what is left to pay including fees (a later event wins);
//! - `ev:<event id>`: the journey events the page tells (opened, paid, handed over...);
//! - `out:<event id>`: what became of each message, from `forfall.dispatch.outcomes.v1`;
//! - `pay:<event id>`: each payment matched to the invoice, from `forfall.payments.matched.v1`.
//!
//! Every write is idempotent (a field per event id, a snapshot or state only when newer), so
//! a redelivered record and a rebuild that replays the topics again change nothing. A closed
//! invoice's hash expires `portal.closed_retention_days` after it closed; an open one's never.

use std::collections::HashMap;

use forfall_platform::derived_state::guard_lua;
use forfall_platform::records::{
    self, DebtorRequest, DispatchOutcome, DispatchStatus, JourneyEvent, PaymentMatched, Record,
};
use forfall_platform::redis_store::Keys;
use serde::{Deserialize, Serialize};

/// An invoice as the page shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    pub revision: i32,
    pub debtor_id: String,
    pub number: String,
    pub description: Option<String>,
    pub issue_date: i32,
    pub due_date: i32,
    pub amount_minor: i64,
    pub credited_minor: i64,
    /// After credits, before payments.
    pub open_minor: i64,
    pub currency: String,
    pub jurisdiction: String,
    pub status: String,
    pub reference: Option<String>,
    pub language: Option<String>,
}

/// The journey after its latest event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JourneyNow {
    /// `open`, `nudged`, `warned`, `handed_over`, `closed:paid`...
    pub state: String,
    /// What is left to pay, fees included.
    pub outstanding_minor: i64,
    pub at_ms: i64,
    /// What the journey does next if nothing changes, and when.
    #[serde(default)]
    pub next: Option<Upcoming>,
}

/// The step a journey takes next: `nudge`, `reminder`, `collection_warning` or `handoff`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Upcoming {
    pub kind: String,
    pub step: String,
    pub at_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Happened {
    pub kind: String,
    pub step: Option<String>,
    pub at_ms: i64,
    /// Why (a refused request's reason).
    #[serde(default)]
    pub reason: Option<String>,
    /// The journey's states around it, and what was left to pay after it.
    #[serde(default)]
    pub from_state: Option<String>,
    #[serde(default)]
    pub to_state: Option<String>,
    #[serde(default)]
    pub open_minor: Option<i64>,
    /// The event's offset on its partition: the order of events of the same moment.
    #[serde(default)]
    pub seq: Option<i64>,
    /// The rule behind it (a refused request's refusal code).
    #[serde(default)]
    pub rule: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub step: String,
    pub channel: String,
    /// `sent`, `delivered`, `bounced`, `failed`, `suppressed`, `duplicate`.
    pub status: String,
    pub at_ms: i64,
    /// Why it was not sent, when it was not.
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Paid {
    pub amount_minor: i64,
    pub currency: String,
    pub at_ms: i64,
    /// The day the bank booked it (days since the epoch).
    pub value_date: i32,
    #[serde(default)]
    pub payment_id: Option<String>,
    /// The matching rule, or `manual`.
    #[serde(default)]
    pub rule: Option<String>,
}

/// A debtor's request about the invoice, as the portal (or an agent) sent it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Asked {
    pub kind: String,
    pub at_ms: i64,
    pub source: String,
    /// What was asked, in a few words (the date, the number of instalments, the objection).
    pub detail: Option<String>,
}

/// Everything the read model holds of one invoice.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InvoiceView {
    /// The invoice the view is of (its key).
    pub invoice_id: String,
    pub snapshot: Option<Snapshot>,
    pub journey: Option<JourneyNow>,
    pub happened: Vec<Happened>,
    pub messages: Vec<Message>,
    pub payments: Vec<Paid>,
    pub requests: Vec<Asked>,
}

impl InvoiceView {
    /// From the invoice's hash (`HGETALL`); fields that do not parse are left out.
    pub fn from_fields(invoice_id: &str, fields: HashMap<String, String>) -> Self {
        let mut view = InvoiceView {
            invoice_id: invoice_id.to_owned(),
            ..InvoiceView::default()
        };
        for (field, value) in fields {
            match field.split_once(':').map_or((field.as_str(), ""), |(a, b)| (a, b)) {
                ("snap", _) => view.snapshot = serde_json::from_str(&value).ok(),
                ("state", _) => view.journey = serde_json::from_str(&value).ok(),
                ("ev", _) => view.happened.extend(serde_json::from_str(&value).ok()),
                ("out", _) => view.messages.extend(serde_json::from_str(&value).ok()),
                ("pay", _) => view.payments.extend(serde_json::from_str(&value).ok()),
                ("req", _) => view.requests.extend(serde_json::from_str(&value).ok()),
                _ => {}
            }
        }
        view.happened.sort_by_key(|h| (h.at_ms, h.seq));
        view.messages.sort_by_key(|m| m.at_ms);
        view.payments.sort_by_key(|p| p.at_ms);
        view.requests.sort_by_key(|r| r.at_ms);
        view
    }

    pub fn paid_minor(&self) -> i64 {
        self.payments.iter().map(|p| p.amount_minor).sum()
    }
}

/// The portal's keys.
#[derive(Debug, Clone)]
pub struct ViewKeys(pub Keys);

impl ViewKeys {
    pub fn invoice(&self, tenant: &str, invoice_id: &str) -> String {
        // One hash tag per tenant, as the other services do, for Redis Cluster.
        self.0.key(&["portal", "inv", &format!("{{{tenant}}}:{invoice_id}")])
    }

    /// A payment under way at a provider, by the reference the provider knows it by.
    /// A debtor's withdrawal of links (see [`crate::revocation`]).
    pub fn revoked(&self, tenant: &str, debtor_id: &str) -> String {
        self.0.key(&["portal", "revoked", &format!("{{{tenant}}}:{debtor_id}")])
    }

    pub fn attempt(&self, reference: &str) -> String {
        self.0.key(&["portal", "pay", reference])
    }
}

/// One change to an invoice's hash.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Snapshot { revision: i32, json: String },
    Journey { at_ms: i64, json: String, closed: bool },
    Field { field: String, json: String },
}

/// What a record changes: the invoice's key parts and the change(s); `None` for a record the
/// page has nothing to show of.
///
/// `offset` is the record's offset: an invoice's journey events share a partition (they are
/// keyed by debtor), so it orders events of the same millisecond.
pub fn changes_of(
    name: &str,
    decoded: &forfall_platform::avro::Decoded,
    offset: i64,
) -> anyhow::Result<Vec<(String, String, Change)>> {
    Ok(match name {
        records::Invoice::FULL_NAME => {
            let inv: records::Invoice = decoded.to()?;
            let snapshot = Snapshot {
                revision: inv.revision,
                debtor_id: inv.debtor_id.clone(),
                number: inv.invoice_number.clone(),
                description: inv.description.clone(),
                issue_date: inv.issue_date,
                due_date: inv.due_date,
                amount_minor: inv.amount_minor,
                credited_minor: inv.credited_minor,
                open_minor: inv.open_minor,
                currency: inv.currency.clone(),
                jurisdiction: inv.jurisdiction.clone(),
                status: format!("{:?}", inv.status).to_lowercase(),
                reference: inv.payment_reference.clone(),
                language: inv.language.clone(),
            };
            vec![(
                inv.tenant,
                inv.invoice_id,
                Change::Snapshot {
                    revision: snapshot.revision,
                    json: serde_json::to_string(&snapshot)?,
                },
            )]
        }
        JourneyEvent::FULL_NAME => {
            let e: JourneyEvent = decoded.to()?;
            let now = JourneyNow {
                state: e.to_state.clone(),
                outstanding_minor: e.open_minor,
                at_ms: e.occurred_at,
                next: match (&e.next_kind, &e.next_step, e.next_at) {
                    (Some(kind), Some(step), Some(at_ms)) => Some(Upcoming {
                        kind: kind.clone(),
                        step: step.clone(),
                        at_ms,
                    }),
                    _ => None,
                },
            };
            let mut out = vec![(
                e.tenant.clone(),
                e.invoice_id.clone(),
                Change::Journey {
                    at_ms: e.occurred_at,
                    json: serde_json::to_string(&now)?,
                    closed: e.to_state.starts_with("closed:"),
                },
            )];
            // Every transition: the page tells the debtor the moments they recognise, the
            // timeline tells the creditor's staff all of it.
            let happened = Happened {
                kind: e.kind.clone(),
                step: e.step.clone(),
                at_ms: e.occurred_at,
                reason: e.reason.clone(),
                from_state: Some(e.from_state.clone()),
                to_state: Some(e.to_state.clone()),
                open_minor: Some(e.open_minor),
                seq: Some(offset),
                rule: e.rule.clone(),
            };
            out.push((
                e.tenant,
                e.invoice_id,
                Change::Field {
                    field: format!("ev:{}", e.event_id),
                    json: serde_json::to_string(&happened)?,
                },
            ));
            out
        }
        PaymentMatched::FULL_NAME => {
            let p: PaymentMatched = decoded.to()?;
            let paid = Paid {
                amount_minor: p.amount_minor,
                currency: p.currency.clone(),
                at_ms: p.occurred_at,
                value_date: p.value_date,
                payment_id: Some(p.payment_id.clone()),
                rule: Some(
                    p.matched_by
                        .as_ref()
                        .map_or_else(|| p.rule.clone(), |by| format!("manual by {by}")),
                ),
            };
            vec![(
                p.tenant,
                p.invoice_id,
                Change::Field {
                    field: format!("pay:{}", p.event_id),
                    json: serde_json::to_string(&paid)?,
                },
            )]
        }
        DispatchOutcome::FULL_NAME => {
            let o: DispatchOutcome = decoded.to()?;
            let status = match o.status {
                DispatchStatus::Sent => "sent",
                DispatchStatus::Delivered => "delivered",
                DispatchStatus::Bounced => "bounced",
                DispatchStatus::Failed => "failed",
                DispatchStatus::Suppressed => "suppressed",
                DispatchStatus::Duplicate => "duplicate",
            };
            let message = Message {
                step: o.step.clone(),
                channel: o.channel.clone(),
                status: status.to_owned(),
                at_ms: o.occurred_at,
                reason: o.reason.clone(),
            };
            vec![(
                o.tenant,
                o.invoice_id,
                Change::Field {
                    field: format!("out:{}", o.event_id),
                    json: serde_json::to_string(&message)?,
                },
            )]
        }
        DebtorRequest::FULL_NAME => {
            let r: DebtorRequest = decoded.to()?;
            let day = |d: Option<i32>| {
                d.and_then(forfall_domain::invoice::date_from_epoch_days)
                    .map(|d| d.to_string())
            };
            let detail = match r.kind.as_str() {
                "postpone" => day(r.new_due_date).map(|d| format!("to {d}")),
                "promise_to_pay" => day(r.promise_date).map(|d| format!("by {d}")),
                "instalment_plan" => Some(format!("{} instalments", r.instalments.len())),
                _ => r.reason.clone(),
            };
            let asked = Asked {
                kind: r.kind.clone(),
                at_ms: r.occurred_at,
                source: r.source.clone(),
                detail,
            };
            vec![(
                r.tenant,
                r.invoice_id,
                Change::Field {
                    field: format!("req:{}", r.event_id),
                    json: serde_json::to_string(&asked)?,
                },
            )]
        }
        other => anyhow::bail!("the portal does not read '{other}' records"),
    })
}

/// The write of one change: `KEYS[1]` the invoice's hash, `KEYS[2]` the state marker;
/// `ARGV`: seen epoch, seen writes, kind, order (revision or time), field or '', JSON, closed
/// ('1' / '0'), retention in seconds.
const APPLY_LUA: &str = r"
local kind, order, field, json = ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6]
if kind == 'snap' then
  local have = tonumber(redis.call('HGET', KEYS[1], 'snap_rev') or '-1')
  if order > have then redis.call('HSET', KEYS[1], 'snap', json, 'snap_rev', order) end
elseif kind == 'state' then
  local have = tonumber(redis.call('HGET', KEYS[1], 'state_at') or '-1')
  if order >= have then
    redis.call('HSET', KEYS[1], 'state', json, 'state_at', order)
    if ARGV[7] == '1' then redis.call('EXPIRE', KEYS[1], ARGV[8]) else redis.call('PERSIST', KEYS[1]) end
  end
else
  redis.call('HSET', KEYS[1], field, json)
end
return 1";

/// For the running service: guarded by the state marker (see `derived_state`).
pub static APPLY: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(&format!("{}{APPLY_LUA}", guard_lua("KEYS[2]", "ARGV[1]", "ARGV[2]")))
});

/// For the rebuild, which writes before the marker exists.
pub static APPLY_REBUILDING: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(APPLY_LUA));

/// The call of `script` that applies one change.
pub fn invocation(
    script: &'static redis::Script,
    hash: &str,
    marker: &str,
    (epoch, writes): (i64, i64),
    change: &Change,
    retention_secs: u64,
) -> redis::ScriptInvocation<'static> {
    let mut call = script.prepare_invoke();
    call.key(hash).key(marker).arg(epoch).arg(writes);
    match change {
        Change::Snapshot { revision, json } => call.arg("snap").arg(*revision).arg("").arg(json).arg("0"),
        Change::Journey { at_ms, json, closed } => {
            call.arg("state")
                .arg(*at_ms)
                .arg("")
                .arg(json)
                .arg(if *closed { "1" } else { "0" })
        }
        Change::Field { field, json } => call.arg("field").arg(0).arg(field).arg(json).arg("0"),
    };
    call.arg(retention_secs);
    call
}
