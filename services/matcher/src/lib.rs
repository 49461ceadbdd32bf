//! Matcher: turns payments into settled invoices.
//!
//! It keeps an index of open invoices from `forfall.invoices.v1` (by validated payment
//! reference, by invoice number, by debtor) and of payer accounts learned from earlier matches,
//! gathers the candidates for each payment on `payments.events.v1`, and lets the domain's
//! matching rules decide: exact reference, invoice number in the remittance text, payer account
//! with a fitting amount, or unmatched. Each allocation is a `PaymentMatched` keyed by the
//! debtor; money for a claim already with an agency also yields a `HandoffRecall`; an
//! unmatched payment is a `PaymentUnmatched` event, kept for a later invoice or a person.
//!
//! A payment is decided once per bank transaction id: the decision is stored, and a repeated
//! payment (the same bank file imported twice) re-emits the same records with the same ids,
//! which the watcher applies once.
//!
//! State changes after the outputs are acknowledged, or is idempotent on redelivery: a decision
//! is booked before its records go out, and a redelivered record finds it booked and sends the
//! same records again. Where nothing would be redelivered the order is kept explicitly: a kept
//! payment matched by a later invoice leaves the kept set only after its records are
//! acknowledged (the invoice handler produces them itself), and a person's match, booked by an
//! HTTP request, stays marked pending until its events are acknowledged and is sent again from
//! that mark (at start and periodically) after a stop or a broker outage.

mod batch;
mod closing;
mod http;
pub mod rebuild;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use forfall_domain::invoice::date_from_epoch_days;
use forfall_domain::matching::{self, Allocation, Candidates, IncomingPayment, MatchDecision, OpenInvoice};
use forfall_domain::reference::normalise;
use forfall_domain::{Currency, Money};
use forfall_platform::derived_state::{DerivedState, guard_lua};
use forfall_platform::kafka::{self, Failure, Handler, Inbound, Outbound, Producer, run_consumer};
use forfall_platform::records::{
    self, HandoffRecall, PaymentMatched, PaymentReceived, PaymentUnmatched, Record, derived_id,
};
use forfall_platform::redis_store::{self, Keys};
use forfall_platform::service::{Runtime, ServiceShell};
use forfall_platform::telemetry::TraceContext;
use forfall_platform::{config, journey_state};
use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

pub const SERVICE: &str = "matcher";
pub const PORT_OFFSET: u16 = 4;

/// What the matcher keeps per invoice.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Indexed {
    debtor_id: String,
    invoice_id: String,
    invoice_number: String,
    reference: Option<String>,
    currency: Currency,
    /// Open by the invoice's own terms (after credits), before payments.
    open_minor: i64,
    due_date: i32,
}

/// A decided payment, kept so that a repeat re-emits the same records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Decided {
    payment: PaymentReceived,
    decision: MatchDecision,
    matched_by: Option<String>,
}

struct Metrics {
    results: IntCounterVec,
    /// Payments decided (booked), by whether they shared the round trips of a batch
    /// (`together`, see `batch`) or took their own (`alone`).
    decided: IntCounterVec,
    /// Time from the bank's report of the payment to the matcher's decision (event time).
    decided_after: Histogram,
}

pub(crate) struct Inner {
    rt: Runtime,
    redis: ConnectionManager,
    keys: Keys,
    state: Arc<DerivedState<rebuild::MatcherRebuild>>,
    /// `matcher.retention_days`, in seconds.
    retention_secs: u64,
    producer: Producer,
    metrics: Metrics,
    /// Who may call the HTTP API, for which tenant.
    tokens: forfall_platform::api_auth::TenantTokens,
}

#[derive(Clone)]
pub struct Matcher(pub(crate) Arc<Inner>);

/// What a decision was based on: each candidate invoice's allocation as read, and the
/// reference key that had no invoice yet.
#[derive(Default)]
struct Seen {
    allocated: BTreeMap<String, i64>,
    /// Each invoice as indexed when read (what closing it needs).
    indexed: BTreeMap<String, Indexed>,
    missing_reference: Option<String>,
}

/// What is read of an indexed invoice: its index entry, the amount allocated to it, its journey.
type InvoiceRow = (Option<String>, Option<i64>, Option<Vec<u8>>);

#[derive(Debug, PartialEq, Eq)]
enum Booked {
    Done,
    AlreadyDecided,
    Conflict,
}

/// The booking script (see [`Matcher::book`]). `KEYS`: the decision, the unmatched list, the
/// kept list, the reference without an invoice, `n` allocated totals, the manual matches
/// pending, the state marker, the payer account's hints, then the settled invoices' keys;
/// `ARGV` as [`Matcher::book_invocation`] lays them out.
static BOOK: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(&format!(
        "local n = tonumber(ARGV[5])\n{}{}{}{}",
        guard_lua("KEYS[6 + n]", "ARGV[8 + 2 * n]", "ARGV[9 + 2 * n]"),
        closing::CLOSE_OR_KEEP_LUA,
        closing::SETTLE_INVOICES_LUA,
        r"if ARGV[4] == 'new' and redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
if ARGV[4] == 'replace' and redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0 then return -1 end
for i = 1, n do
  local current = tonumber(redis.call('GET', KEYS[4 + i]) or '0')
  if current ~= tonumber(ARGV[5 + i]) then return 0 end
end
if ARGV[3] == 'unmatched' then
  if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[6 + 2 * n])
  redis.call('SADD', KEYS[3], ARGV[2])
else
  for i = 1, n do
    local add = tonumber(ARGV[5 + n + i])
    if add ~= 0 then redis.call('INCRBY', KEYS[4 + i], add) end
  end
  redis.call('HDEL', KEYS[2], ARGV[2])
  if ARGV[7 + 2 * n] == 'pending' then redis.call('SADD', KEYS[5 + n], ARGV[2]) end
  local h = tonumber(ARGV[11 + 2 * n])
  for i = 1, h do redis.call('SADD', KEYS[7 + n], ARGV[11 + 2 * n + i]) end
  if h > 0 then redis.call('EXPIRE', KEYS[7 + n], ARGV[10 + 2 * n]) end
  settle_invoices(7 + n, 12 + 2 * n + h, tonumber(ARGV[12 + 2 * n + h]))
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[10 + 2 * n])
return 1"
    ))
});

/// How often a payment is decided again when its invoices change under it before it gives
/// way to the loop's retry with backoff.
const MAX_REDECISIONS: usize = 20;

fn tagged(tenant: &str, id: &str) -> String {
    format!("{{{tenant}}}:{id}")
}

/// The matcher's keys.
pub(crate) struct MatcherKeys<'a>(pub &'a Keys);

impl MatcherKeys<'_> {
    pub(crate) fn key(&self, kind: &str, tenant: &str, id: &str) -> String {
        // One hash tag per tenant keeps a tenant's index in one Redis Cluster slot.
        self.0.key(&["matcher", kind, &tagged(tenant, id)])
    }

    /// An invoice's index entries, as the index script writes them (for the rebuild): the
    /// invoice, its debtor's invoices, its number and its reference; for an invoice closed by
    /// its own terms (credited in full), its entry and reference expiring after `closed_ttl`
    /// seconds (0: at once) and out of the sets (see `closing`).
    pub(crate) fn add_index(
        &self,
        pipe: &mut redis::Pipeline,
        tenant: &str,
        ix: &Indexed,
        closed_ttl: Option<u64>,
    ) -> Result<(), serde_json::Error> {
        let k = self.of_invoice(tenant, ix);
        let json = serde_json::to_string(ix)?;
        match closed_ttl {
            None => {
                pipe.set(&k.inv, json).ignore().sadd(&k.debtor, &ix.invoice_id).ignore();
                if let Some(num) = &k.num {
                    pipe.sadd(num, &ix.invoice_id).ignore();
                }
                if let Some(reference) = &k.reference {
                    pipe.set(reference, &ix.invoice_id).ignore();
                }
            }
            Some(ttl) => {
                // SET with EX 0 is refused; a key that expires now is simply not there.
                if ttl > 0 {
                    pipe.set_ex(&k.inv, json, ttl).ignore();
                    if let Some(reference) = &k.reference {
                        pipe.set_ex(reference, &ix.invoice_id, ttl).ignore();
                    }
                } else {
                    pipe.del(&k.inv).ignore();
                    if let Some(reference) = &k.reference {
                        pipe.del(reference).ignore();
                    }
                }
                pipe.srem(&k.debtor, &ix.invoice_id).ignore();
                if let Some(num) = &k.num {
                    pipe.srem(num, &ix.invoice_id).ignore();
                }
            }
        }
        Ok(())
    }
}

/// What the matcher indexes of an invoice snapshot, and its reference as payments quote it.
pub(crate) fn indexed_of(inv: &records::Invoice) -> Result<(Indexed, Option<String>), Failure> {
    let reference = inv.payment_reference.as_deref().map(|r| {
        matching::structured_reference(r)
            .map(|v| v.value)
            .unwrap_or_else(|_| normalise(r))
    });
    let ix = Indexed {
        debtor_id: inv.debtor_id.clone(),
        invoice_id: inv.invoice_id.clone(),
        invoice_number: inv.invoice_number.clone(),
        reference: reference.clone(),
        currency: currency(&inv.currency)?,
        open_minor: inv.open_minor,
        due_date: inv.due_date,
    };
    Ok((ix, reference))
}

fn currency(code: &str) -> Result<Currency, Failure> {
    code.parse()
        .map_err(|e: forfall_domain::MoneyError| Failure::reject("unknown_currency", format!("field 'currency': {e}")))
}

impl Matcher {
    fn conn(&self) -> ConnectionManager {
        self.0.redis.clone()
    }

    fn key(&self, kind: &str, tenant: &str, id: &str) -> String {
        MatcherKeys(&self.0.keys).key(kind, tenant, id)
    }

    async fn members(&self, key: &str) -> Result<Vec<String>, Failure> {
        Ok(redis::cmd("SMEMBERS").arg(key).query_async(&mut self.conn()).await?)
    }

    /// Indexed invoices as the matching rules see them: what is still open, and whether the
    /// claim is with an agency (the watcher's journey status says). One round trip for all.
    async fn open_invoices(
        &self,
        tenant: &str,
        ids: Vec<String>,
        seen: &mut Seen,
    ) -> Result<Vec<OpenInvoice>, Failure> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        self.add_open_invoice_reads(&mut pipe, tenant, &ids);
        let rows: Vec<InvoiceRow> = pipe.query_async(&mut self.conn()).await?;
        Ok(rows
            .into_iter()
            .filter_map(|row| Self::open_invoice_from(tenant, row, seen))
            .collect())
    }

    /// Adds the reads of [`Matcher::open_invoices`] to `pipe`: an [`InvoiceRow`] per id.
    fn add_open_invoice_reads(&self, pipe: &mut redis::Pipeline, tenant: &str, ids: &[String]) {
        for id in ids {
            let journey = journey_state::location(&self.0.keys, tenant, id);
            pipe.get(self.key("inv", tenant, id))
                .get(self.key("alloc", tenant, id))
                .hget(journey.key, journey.field);
        }
    }

    /// An indexed invoice from what [`Matcher::add_open_invoice_reads`] read of it, noted in
    /// `seen`; `None` when it is not indexed.
    fn open_invoice_from(tenant: &str, (ix, allocated, journey): InvoiceRow, seen: &mut Seen) -> Option<OpenInvoice> {
        let status = journey_state::status_of(journey.as_deref());
        let ix: Indexed = serde_json::from_str(&ix?).ok()?;
        seen.allocated.insert(ix.invoice_id.clone(), allocated.unwrap_or(0));
        seen.indexed.insert(ix.invoice_id.clone(), ix.clone());
        Some(OpenInvoice {
            tenant: tenant.to_owned(),
            debtor_id: ix.debtor_id,
            invoice_id: ix.invoice_id,
            invoice_number: ix.invoice_number,
            reference: ix.reference,
            open: Money::new((ix.open_minor - allocated.unwrap_or(0)).max(0), ix.currency),
            due_date: date_from_epoch_days(ix.due_date).unwrap_or_default(),
            handed_over: status.as_deref() == Some("handed_over"),
        })
    }

    /// The index key of the payment's structured reference, if it has one.
    fn reference_key(&self, p: &PaymentReceived) -> Option<String> {
        p.reference
            .as_deref()
            .and_then(|r| matching::structured_reference(r).ok())
            .map(|r| self.key("ref", &p.tenant, &r.value))
    }

    /// Everything the rules may need for this payment, and what was read to find it.
    async fn candidates(&self, p: &PaymentReceived) -> Result<(Candidates, Seen), Failure> {
        self.candidates_with(p, None).await
    }

    /// [`Matcher::candidates`], with the invoice the payment's reference named when the caller
    /// has just read it (`Some(None)`: it named none).
    async fn candidates_with(
        &self,
        p: &PaymentReceived,
        referenced: Option<Option<String>>,
    ) -> Result<(Candidates, Seen), Failure> {
        let mut c = Candidates::default();
        let mut seen = Seen::default();
        if let Some(ref_key) = self.reference_key(p) {
            let id: Option<String> = match referenced {
                Some(id) => id,
                None => redis::cmd("GET").arg(&ref_key).query_async(&mut self.conn()).await?,
            };
            match id {
                Some(id) => c.by_reference = self.open_invoices(&p.tenant, vec![id], &mut seen).await?.pop(),
                None => seen.missing_reference = Some(ref_key),
            }
        }
        for number in p
            .remittance_text
            .as_deref()
            .map(matching::invoice_number_candidates)
            .unwrap_or_default()
        {
            let ids = self.members(&self.key("num", &p.tenant, &number)).await?;
            c.by_invoice_number
                .extend(self.open_invoices(&p.tenant, ids, &mut seen).await?);
        }
        if let Some(account) = p.payer_account.as_deref().map(normalise).filter(|a| !a.is_empty()) {
            for debtor in self.members(&self.key("acct", &p.tenant, &account)).await? {
                let ids = self.members(&self.key("debtor", &p.tenant, &debtor)).await?;
                c.by_payer_account
                    .extend(self.open_invoices(&p.tenant, ids, &mut seen).await?);
            }
        }
        Ok((c, seen))
    }

    fn incoming(p: &PaymentReceived) -> Result<IncomingPayment, Failure> {
        Ok(IncomingPayment {
            payment_id: p.payment_id.clone(),
            amount: Money::new(p.amount_minor, currency(&p.currency)?),
            reference: p.reference.clone(),
            remittance_text: p.remittance_text.clone(),
            payer_account: p.payer_account.clone(),
        })
    }

    /// The records a decision becomes. Ids derive from the payment, so a repeat is the same.
    async fn records_for(&self, d: &Decided, trace: TraceContext) -> Result<Vec<Outbound>, Failure> {
        let p = &d.payment;
        let topics = &self.0.rt.config.topics;
        let now = self.0.rt.clock.now().timestamp_millis();
        let mut outs = Vec::new();
        match &d.decision {
            MatchDecision::Matched {
                rule,
                allocations,
                overpayment,
            } => {
                let matched_topic = self.0.rt.topic(&topics.payments_matched);
                for (i, a) in allocations.iter().enumerate() {
                    // The surplus goes with the first allocation: the watcher records it as that
                    // debtor's credit balance.
                    let amount = if i == 0 {
                        a.amount.minor + overpayment.minor
                    } else {
                        a.amount.minor
                    };
                    let m = PaymentMatched {
                        event_id: derived_id("payment-matched", &[&p.tenant, &p.payment_id, &a.invoice_id]),
                        tenant: p.tenant.clone(),
                        debtor_id: a.debtor_id.clone(),
                        occurred_at: now,
                        payment_id: p.payment_id.clone(),
                        invoice_id: a.invoice_id.clone(),
                        amount_minor: amount,
                        currency: a.amount.currency.code().to_owned(),
                        rule: rule.code().to_owned(),
                        reference: p.reference.clone(),
                        value_date: p.value_date,
                        matched_by: d.matched_by.clone(),
                    };
                    outs.push(
                        self.0
                            .rt
                            .codec
                            .outbound(&matched_topic, &a.debtor_id, &m, trace)
                            .await?,
                    );
                    if a.handed_over {
                        outs.push(self.recall(p, a, amount, trace).await?);
                    }
                }
            }
            MatchDecision::Unmatched { reason } => {
                let u = PaymentUnmatched {
                    event_id: derived_id("payment-unmatched", &[&p.tenant, &p.payment_id]),
                    tenant: p.tenant.clone(),
                    debtor_id: p.debtor_id.clone(),
                    occurred_at: now,
                    payment_id: p.payment_id.clone(),
                    amount_minor: p.amount_minor,
                    currency: p.currency.clone(),
                    reference: p.reference.clone(),
                    remittance_text: p.remittance_text.clone(),
                    payer_name: p.payer_name.clone(),
                    payer_account: p.payer_account.clone(),
                    value_date: p.value_date,
                    reason_code: reason.code().to_owned(),
                    reason: reason.explain(),
                };
                let topic = self.0.rt.topic(&topics.payments_unmatched);
                outs.push(self.0.rt.codec.outbound(&topic, &p.tenant, &u, trace).await?);
            }
        }
        Ok(outs)
    }

    async fn recall(
        &self,
        p: &PaymentReceived,
        a: &Allocation,
        amount_minor: i64,
        trace: TraceContext,
    ) -> Result<Outbound, Failure> {
        let r = HandoffRecall {
            event_id: derived_id("handoff-recall", &[&p.tenant, &p.payment_id, &a.invoice_id]),
            tenant: p.tenant.clone(),
            debtor_id: a.debtor_id.clone(),
            occurred_at: self.0.rt.clock.now().timestamp_millis(),
            case_id: derived_id("case", &[&p.tenant, &a.invoice_id]),
            invoice_id: a.invoice_id.clone(),
            payment_id: p.payment_id.clone(),
            amount_minor,
            currency: a.amount.currency.code().to_owned(),
            reason: format!("payment '{}' received after hand-off", p.payment_id),
            remaining_minor: a.case_remaining.map(|r| r.minor),
        };
        let topic = self.0.rt.topic(&self.0.rt.config.topics.handoff_cases);
        Ok(self.0.rt.codec.outbound(&topic, &a.debtor_id, &r, trace).await?)
    }

    /// Books a decision if what it was based on still holds: allocations against the
    /// invoices, the kept list for unmatched payments, and the decision itself (the
    /// de-duplication record), in one atomic script. Payments are decided concurrently, so the
    /// script checks that no invoice's allocation moved since it was read, that an unmatched
    /// payment's reference was not indexed meanwhile (the index then looks at the kept list
    /// after writing the reference, so one of the two sees the other), for a new decision,
    /// that the payment was not decided by another attempt, and for a replacing one (a kept
    /// payment matched by a later invoice, or a person's match) that the payment is still
    /// unmatched, so that it is never matched twice. A person's decision is also marked as
    /// pending until its events are acknowledged (see [`Matcher::announce_manual`]). The same
    /// script settles the invoices a match paid (see `closing`) and learns who pays for whom.
    async fn book(&self, d: &Decided, seen: &Seen, replace: bool) -> Result<Booked, Failure> {
        let invocation = self.book_invocation(d, seen, replace)?;
        let code: i32 = invocation.invoke_async(&mut self.conn()).await?;
        self.booked(d, code)
    }

    /// The call of the booking script for `d` (see [`Matcher::book`]), for a caller that sends
    /// it, or several, in one round trip; [`Matcher::booked`] reads its reply.
    fn book_invocation(
        &self,
        d: &Decided,
        seen: &Seen,
        replace: bool,
    ) -> Result<redis::ScriptInvocation<'static>, Failure> {
        let p = &d.payment;
        let mut added: BTreeMap<&str, i64> = BTreeMap::new();
        let (mode, unmatched_json, kept) = match &d.decision {
            MatchDecision::Matched {
                rule: _,
                allocations,
                overpayment,
            } => {
                for (i, a) in allocations.iter().enumerate() {
                    let extra = if i == 0 { overpayment.minor } else { 0 };
                    *added.entry(a.invoice_id.as_str()).or_default() += a.amount.minor + extra;
                }
                ("matched", String::new(), None)
            }
            MatchDecision::Unmatched { .. } => {
                let json = serde_json::to_string(p).map_err(|e| Failure::Fatal(e.into()))?;
                ("unmatched", json, p.reference.as_deref().map(kept_reference))
            }
        };
        let mut watched: Vec<(&str, i64)> = seen.allocated.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        for id in added.keys() {
            if !seen.allocated.contains_key(*id) {
                watched.push((id, 0));
            }
        }
        let json = serde_json::to_string(d).map_err(|e| Failure::Fatal(e.into()))?;
        let mut invocation = BOOK.prepare_invoke();
        invocation
            .key(self.key("payment", &p.tenant, &p.payment_id))
            .key(self.key("unmatched", &p.tenant, "all"))
            .key(self.key("kept", &p.tenant, kept.as_deref().unwrap_or("-")))
            .key(
                seen.missing_reference
                    .clone()
                    .unwrap_or_else(|| self.key("ref", &p.tenant, "-")),
            )
            .arg(json)
            .arg(&p.payment_id)
            .arg(mode)
            .arg(if replace { "replace" } else { "new" })
            .arg(watched.len());
        for (id, _) in &watched {
            invocation.key(self.key("alloc", &p.tenant, id));
        }
        for (_, was) in &watched {
            invocation.arg(*was);
        }
        for (id, _) in &watched {
            invocation.arg(added.get(id).copied().unwrap_or(0));
        }
        invocation.arg(unmatched_json);
        // A person's match is announced by the HTTP request that books it, outside any consume
        // loop: it stays marked until its events are acknowledged, so that a stop in between is
        // made good by `resend_manual` instead of leaving a booking nobody hears of.
        invocation
            .key(self.manual_pending_key(&p.tenant))
            .arg(if d.matched_by.is_some() { "pending" } else { "" });
        // Nothing is booked on a Redis that lost the state (see `rebuild`).
        let (epoch, writes) = self.0.state.seen();
        invocation
            .key(self.0.state.marker_key())
            .arg(epoch)
            .arg(writes)
            .arg(self.0.retention_secs);
        let allocations = match &d.decision {
            MatchDecision::Matched { allocations, .. } => allocations.as_slice(),
            MatchDecision::Unmatched { .. } => &[],
        };
        // Learning who pays for whom: a hint for later payments, kept as long as a decision.
        let account = p.payer_account.as_deref().map(normalise).filter(|a| !a.is_empty());
        let hinted: Vec<&str> = match &account {
            Some(_) => allocations.iter().map(|a| a.debtor_id.as_str()).collect(),
            None => Vec::new(),
        };
        invocation
            .key(self.key("acct", &p.tenant, account.as_deref().unwrap_or("-")))
            .arg(hinted.len());
        for debtor in hinted {
            invocation.arg(debtor);
        }
        // The invoices the match paid in full leave the index (see `closing`).
        closing::add_settled(
            &mut invocation,
            &MatcherKeys(&self.0.keys),
            &p.tenant,
            allocations
                .iter()
                .filter_map(|a| seen.indexed.get(&a.invoice_id))
                .map(|ix| (ix, self.0.retention_secs)),
        );
        Ok(invocation)
    }

    /// What the booking script's reply says of `d`; a booked decision is counted here, once (a
    /// decision taken again after a conflict is one payment).
    fn booked(&self, d: &Decided, reply: i32) -> Result<Booked, Failure> {
        let booked = match reply {
            1 => Booked::Done,
            -2 => return Err(self.0.state.missing()),
            -1 => Booked::AlreadyDecided,
            _ => Booked::Conflict,
        };
        if booked == Booked::Done {
            let result = match &d.decision {
                MatchDecision::Matched { rule, .. } => rule.code(),
                MatchDecision::Unmatched { reason } => reason.code(),
            };
            self.0.metrics.results.with_label_values(&[result]).inc();
        }
        Ok(booked)
    }

    /// A payment's booked decision, read with the state marker: a decision missing because
    /// Redis lost it (or went back to an older copy) is never taken for a payment not decided.
    async fn decided(&self, tenant: &str, payment_id: &str) -> Result<Option<Decided>, Failure> {
        Ok(self.decided_and_referenced(tenant, payment_id, None).await?.0)
    }

    /// [`Matcher::decided`], and in the same round trip the invoice id `ref_key` (a reference's
    /// index key) names, if given: a new payment's first decision needs both.
    async fn decided_and_referenced(
        &self,
        tenant: &str,
        payment_id: &str,
        ref_key: Option<&str>,
    ) -> Result<(Option<Decided>, Option<String>), Failure> {
        let floor = self.0.state.read_floor();
        let mut pipe = redis::pipe();
        pipe.get(self.key("payment", tenant, payment_id))
            .get(self.0.state.marker_key());
        if let Some(ref_key) = ref_key {
            pipe.get(ref_key);
        }
        let mut got: Vec<Option<String>> = pipe.query_async(&mut self.conn()).await?;
        let referenced = if ref_key.is_some() { got.pop().flatten() } else { None };
        let marker = got.pop().flatten();
        let raw = got.pop().flatten();
        self.0.state.check(marker.as_deref(), floor)?;
        Ok((raw.and_then(|r| serde_json::from_str(&r).ok()), referenced))
    }

    async fn payment(&self, p: PaymentReceived, trace: TraceContext) -> Result<Vec<Outbound>, Failure> {
        // Whether it was decided before, and the invoice its reference names (most payments
        // carry one), in one round trip.
        let ref_key = self.reference_key(&p);
        let (decided, referenced) = self
            .decided_and_referenced(&p.tenant, &p.payment_id, ref_key.as_deref())
            .await?;
        self.payment_after_read(p, trace, decided, ref_key.is_some().then_some(referenced))
            .await
    }

    /// A payment once it is known whether it was `decided` before, and, when its reference
    /// was read with that, which invoice the reference named (`Some(None)`: none).
    async fn payment_after_read(
        &self,
        p: PaymentReceived,
        trace: TraceContext,
        decided: Option<Decided>,
        referenced: Option<Option<String>>,
    ) -> Result<Vec<Outbound>, Failure> {
        if let Some(d) = decided {
            // The same bank transaction again: the same records, nothing booked twice.
            self.0.metrics.results.with_label_values(&["duplicate"]).inc();
            return self.records_for(&d, trace).await;
        }
        let incoming = Self::incoming(&p)?;
        // What the reference named is used for the first decision only: a decision taken again
        // reads everything afresh.
        let mut referenced = referenced;
        // Decided optimistically: another payment for the same invoice may be booked between
        // reading and booking; then this one is decided again on what is there now.
        for _ in 0..MAX_REDECISIONS {
            let (candidates, seen) = self.candidates_with(&p, referenced.take()).await?;
            let d = Decided {
                payment: p.clone(),
                decision: matching::decide(&incoming, &candidates),
                matched_by: None,
            };
            match self.book(&d, &seen, false).await? {
                Booked::Done => return self.decided_now(&d, trace, "alone").await,
                Booked::AlreadyDecided => {
                    if let Some(d) = self.decided(&d.payment.tenant, &d.payment.payment_id).await? {
                        self.0.metrics.results.with_label_values(&["duplicate"]).inc();
                        return self.records_for(&d, trace).await;
                    }
                }
                Booked::Conflict => self.0.metrics.results.with_label_values(&["redecided"]).inc(),
            }
        }
        Err(Failure::Transient(anyhow::anyhow!(
            "payment decided {MAX_REDECISIONS} times while its invoices kept changing"
        )))
    }

    /// The records of a decision just booked (on the batch's `path`), its time from the
    /// bank's report observed.
    async fn decided_now(&self, d: &Decided, trace: TraceContext, path: &str) -> Result<Vec<Outbound>, Failure> {
        self.0.metrics.decided.with_label_values(&[path]).inc();
        let latency = (self.0.rt.clock.now().timestamp_millis() - d.payment.occurred_at).max(0) as f64 / 1000.0;
        self.0.metrics.decided_after.observe(latency);
        self.records_for(d, trace).await
    }

    /// Indexes an invoice snapshot, then tries the payments kept for its reference.
    async fn index(&self, inv: records::Invoice, trace: TraceContext) -> Result<Vec<Outbound>, Failure> {
        static INDEX: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(&format!(
                "{}{}{}",
                guard_lua("KEYS[5]", "ARGV[4]", "ARGV[5]"),
                closing::CLOSE_OR_KEEP_LUA,
                r"redis.call('SET', KEYS[1], ARGV[1])
                  if ARGV[6] == '1' then redis.call('SET', KEYS[4], ARGV[2]) end
                  close_or_keep(KEYS[1], KEYS[6], KEYS[2], KEYS[3], KEYS[4], ARGV[2], ARGV[3] == '1',
                    ARGV[6] == '1', tonumber(ARGV[7]), tonumber(ARGV[8]))
                  return 1"
            ))
        });
        let (ix, reference) = indexed_of(&inv)?;
        let keys = MatcherKeys(&self.0.keys).of_invoice(&inv.tenant, &ix);
        let json = serde_json::to_string(&ix).map_err(|e| Failure::Fatal(e.into()))?;
        // One script: nothing is indexed on a Redis that lost the state, and an invoice a
        // revision closes (credited in full) or reopens leaves or rejoins the index with it.
        let (epoch, writes) = self.0.state.seen();
        let indexed: i32 = INDEX
            .key(&keys.inv)
            .key(&keys.debtor)
            .key(keys.num.as_deref().unwrap_or("-"))
            .key(keys.reference.as_deref().unwrap_or("-"))
            .key(self.0.state.marker_key())
            .key(&keys.alloc)
            .arg(json)
            .arg(&inv.invoice_id)
            .arg(if keys.num.is_some() { "1" } else { "0" })
            .arg(epoch)
            .arg(writes)
            .arg(if reference.is_some() { "1" } else { "0" })
            .arg(ix.open_minor)
            .arg(self.0.retention_secs)
            .invoke_async(&mut self.conn())
            .await?;
        if indexed != 1 {
            return Err(self.0.state.missing());
        }
        let Some(reference) = reference else {
            return Ok(Vec::new());
        };
        // Payments that arrived before this invoice (the topics are not ordered between them).
        // A kept payment leaves the kept set only after the records of its match are
        // acknowledged: they are produced here, not handed back to the loop, because the kept
        // set is the only way back to the payment. A stop anywhere before the removal leaves it
        // kept, and the redelivered invoice finds it booked and sends the same records (same ids).
        let kept_key = self.key("kept", &inv.tenant, &kept_reference(&reference));
        let mut outs = Vec::new();
        let mut announced = Vec::new();
        for payment_id in self.members(&kept_key).await? {
            let Some(prior) = self.decided(&inv.tenant, &payment_id).await? else {
                continue;
            };
            let d = if matches!(prior.decision, MatchDecision::Matched { .. }) {
                // Matched by an earlier attempt (or by hand) whose records may not be out yet.
                prior
            } else {
                let (candidates, seen) = self.candidates(&prior.payment).await?;
                let decision = matching::decide(&Self::incoming(&prior.payment)?, &candidates);
                if !matches!(decision, MatchDecision::Matched { .. }) {
                    continue;
                }
                let d = Decided {
                    payment: prior.payment,
                    decision,
                    matched_by: None,
                };
                match self.book(&d, &seen, true).await? {
                    Booked::Done => d,
                    Booked::AlreadyDecided => match self.decided(&inv.tenant, &payment_id).await? {
                        // Matched meanwhile, by a person or another snapshot with this reference.
                        Some(now) if matches!(now.decision, MatchDecision::Matched { .. }) => now,
                        _ => continue,
                    },
                    Booked::Conflict => {
                        // What was booked above is still kept: the retry sends its records.
                        return Err(Failure::Transient(anyhow::anyhow!(
                            "a kept payment's invoice changed while it was matched; trying again"
                        )));
                    }
                }
            };
            outs.extend(self.records_for(&d, trace).await?);
            announced.push(payment_id);
        }
        if announced.is_empty() {
            return Ok(Vec::new());
        }
        self.0
            .producer
            .send_all(&outs)
            .await
            .map_err(|e| Failure::Transient(anyhow::anyhow!(e)))?;
        let _: () = redis::cmd("SREM")
            .arg(&kept_key)
            .arg(&announced)
            .query_async(&mut self.conn())
            .await?;
        Ok(Vec::new())
    }

    /// The unmatched payments of a tenant, oldest value date first.
    pub(crate) async fn unmatched(&self, tenant: &str) -> Result<Vec<PaymentReceived>, Failure> {
        self.0.state.ensure_ready().await?;
        let all: Vec<String> = redis::cmd("HVALS")
            .arg(self.key("unmatched", tenant, "all"))
            .query_async(&mut self.conn())
            .await?;
        let mut payments: Vec<PaymentReceived> = all.iter().filter_map(|j| serde_json::from_str(j).ok()).collect();
        payments.sort_by(|a, b| a.value_date.cmp(&b.value_date).then(a.payment_id.cmp(&b.payment_id)));
        Ok(payments)
    }

    /// A person's match: allocates an unmatched payment to the invoices they name, in order,
    /// and records who did it.
    ///
    /// The person chooses the invoices and their order; the amounts follow what the invoices
    /// owe when it is booked (matching::manual). The decision is booked first, by the same
    /// script that re-checks what it was based on; when another payment for one of the
    /// invoices was booked between reading and booking (a conflict), it is decided again on
    /// what is there now, and refused with the reason when that no longer allows it (e.g. the
    /// invoice was paid in full meanwhile). Only a booked decision's events go out, after the
    /// booking; the booking marks them pending until they are acknowledged, so a stop or a
    /// broker outage in between is made good by [`Matcher::resend_manual`]. Returns the booked
    /// decision, and why its events are not acknowledged yet if they are not.
    pub(crate) async fn match_by_hand(
        &self,
        tenant: &str,
        payment_id: &str,
        invoice_ids: &[String],
        by: &str,
    ) -> Result<(Decided, Option<String>), ManualError> {
        self.0.state.ensure_ready().await?;
        // Known before anything is booked, so that the resend finds this tenant's pending events.
        let _: () = redis::cmd("SADD")
            .arg(self.manual_tenants_key())
            .arg(tenant)
            .query_async(&mut self.conn())
            .await
            .map_err(Failure::from)?;
        for attempt in 0..MAX_REDECISIONS {
            let prior = self
                .decided(tenant, payment_id)
                .await?
                .ok_or_else(|| ManualError::NotFound(format!("no payment '{payment_id}' for tenant '{tenant}'")))?;
            if !matches!(prior.decision, MatchDecision::Unmatched { .. }) {
                return Err(ManualError::Refused(if attempt == 0 {
                    format!("payment '{payment_id}' is already matched")
                } else {
                    format!("payment '{payment_id}' was matched by someone else meanwhile; nothing was booked")
                }));
            }
            let mut invoices = Vec::new();
            let mut seen = Seen::default();
            for id in invoice_ids {
                invoices.push(
                    self.open_invoices(tenant, vec![id.clone()], &mut seen)
                        .await?
                        .pop()
                        .ok_or_else(|| ManualError::NotFound(format!("no invoice '{id}' for tenant '{tenant}'")))?,
                );
            }
            let incoming = Self::incoming(&prior.payment)
                .map_err(|_| ManualError::Refused("the payment's currency is unknown".into()))?;
            let decision = matching::manual(&incoming, &invoices).map_err(|e| {
                ManualError::Refused(if attempt == 0 {
                    e.to_string()
                } else {
                    format!("{e} (the invoices changed while the match was being booked; nothing was booked)")
                })
            })?;
            let d = Decided {
                payment: prior.payment,
                decision,
                matched_by: Some(by.to_owned()),
            };
            match self.book(&d, &seen, true).await? {
                Booked::Done => {
                    let pending = self.announce_manual(&d).await.err().map(|e| format!("{e:?}"));
                    if let Some(why) = &pending {
                        tracing::warn!(payment_id = %payment_id, error = %why, "manual match booked; its events are sent again later");
                    }
                    return Ok((d, pending));
                }
                Booked::AlreadyDecided => {
                    return Err(ManualError::Refused(format!(
                        "payment '{payment_id}' was matched by someone else meanwhile; nothing was booked"
                    )));
                }
                Booked::Conflict => self.0.metrics.results.with_label_values(&["redecided"]).inc(),
            }
        }
        Err(ManualError::Refused(format!(
            "the invoices kept changing while payment '{payment_id}' was being matched; nothing was booked, try again"
        )))
    }

    /// The set of a tenant's booked manual matches whose events are not acknowledged yet.
    fn manual_pending_key(&self, tenant: &str) -> String {
        self.key("manual-pending", tenant, "all")
    }

    /// The tenants that have matched by hand: where [`Matcher::resend_manual`] looks.
    fn manual_tenants_key(&self) -> String {
        self.0.keys.key(&["matcher", "manual-tenants"])
    }

    /// Produces a booked manual match's events, waits for their acknowledgement, then clears
    /// its pending mark. Ids derive from the payment, so sending them again is harmless.
    async fn announce_manual(&self, d: &Decided) -> Result<(), Failure> {
        let outs = self.records_for(d, TraceContext::new_root()).await?;
        self.0
            .producer
            .send_all(&outs)
            .await
            .map_err(|e| Failure::Transient(anyhow::anyhow!(e)))?;
        let _: () = redis::cmd("SREM")
            .arg(self.manual_pending_key(&d.payment.tenant))
            .arg(&d.payment.payment_id)
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// Sends the events of a tenant's manual matches that were booked but not acknowledged
    /// (a stop or a broker outage between booking and producing).
    pub(crate) async fn resend_manual(&self, tenant: &str) -> Result<usize, Failure> {
        let pending_key = self.manual_pending_key(tenant);
        let mut sent = 0;
        for payment_id in self.members(&pending_key).await? {
            match self.decided(tenant, &payment_id).await? {
                Some(d) if matches!(d.decision, MatchDecision::Matched { .. }) => {
                    self.announce_manual(&d).await?;
                    sent += 1;
                }
                // Nothing booked, nothing to announce.
                _ => {
                    let _: () = redis::cmd("SREM")
                        .arg(&pending_key)
                        .arg(&payment_id)
                        .query_async(&mut self.conn())
                        .await?;
                }
            }
        }
        Ok(sent)
    }

    /// At start and then every `every`: the pending events of manual matches of every tenant.
    async fn resend_manual_matches(self, every: Duration) {
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.0.rt.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let tenants = match self.members(&self.manual_tenants_key()).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(error = ?e, "cannot read the tenants with manual matches; trying again later");
                    continue;
                }
            };
            for tenant in tenants {
                match self.resend_manual(&tenant).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(tenant = %tenant, sent = n, "events of booked manual matches sent"),
                    Err(e) => {
                        tracing::warn!(tenant = %tenant, error = ?e, "events of booked manual matches not sent yet")
                    }
                }
            }
        }
    }
}

/// Invoice snapshots by key (a debtor's in order); payments by their bytes, so that the same
/// record redelivered waits for itself.
fn lane(record: &Inbound, payments_topic: &str) -> u64 {
    if record.topic == payments_topic {
        kafka::payload_lane(record)
    } else {
        kafka::key_lane(record)
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct MatcherSettings {
    /// Payments, or batches of them (`batch`), decided at once. Booking re-checks what each
    /// decision was based on, so any value is safe (and several matcher instances are). A
    /// payment decided alone is a few Redis round trips in turn, so without batches the burst
    /// follows this number: on a 2-core dev stack (matcher-throughput, 2026-12-05) 16 carried
    /// 4,900-6,200 payments/s, 64 8,500-8,900/s, 128 10,000-10,600/s and 256 no more, with the
    /// same latency at a steady 3,000/s.
    pub concurrency: usize,
    /// Most payments decided together (those the consumer has at hand): they share their
    /// round trips (see `batch`), so a bank file's burst costs a share of a round trip per
    /// payment instead of three or four; 1 decides each alone.
    pub batch: usize,
    /// How often (seconds) the events of manual matches booked but not acknowledged (a stop or
    /// a broker outage right after booking) are sent again; also once at start.
    pub manual_resend_secs: u64,
    /// Days a payment's decision (what a repeat of it is told) and a payer account's hint are
    /// kept. A bank reports a payment again within days, a re-imported statement comes within
    /// months: 400 days covers them; longer would keep debtors' payments beyond need. Unmatched
    /// payments stay until a person matches them (they are a work list, not history). An
    /// invoice's index entry, reference and allocated total are kept as long as it is open
    /// (however many years) and this long once it is paid or credited in full: a revision or a
    /// repeated payment quoting it comes within the same year.
    pub retention_days: u64,
}

impl Default for MatcherSettings {
    fn default() -> Self {
        Self {
            concurrency: 128,
            batch: 64,
            manual_resend_secs: 10,
            retention_days: 400,
        }
    }
}

/// The key a kept payment waits under: the validated reference when it validates.
pub(crate) fn kept_reference(raw: &str) -> String {
    matching::structured_reference(raw)
        .map(|r| r.value)
        .unwrap_or_else(|_| normalise(raw))
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ManualError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Refused(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl From<Failure> for ManualError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Reject { detail, .. } => ManualError::Refused(detail),
            Failure::Transient(e) | Failure::Fatal(e) => ManualError::Unavailable(e.to_string()),
        }
    }
}

impl Handler for Matcher {
    async fn handle(&self, record: &Inbound) -> Result<Vec<Outbound>, Failure> {
        self.0.state.ensure_ready().await?;
        let decoded = self.0.rt.codec.decode(record.payload.as_deref()).await?;
        match decoded.name.as_str() {
            records::Invoice::FULL_NAME => self.index(decoded.to()?, record.trace).await,
            PaymentReceived::FULL_NAME => self.payment(decoded.to()?, record.trace).await,
            other => Err(Failure::reject(
                "unexpected_record_type",
                format!("the matcher does not handle '{other}'"),
            )),
        }
    }

    async fn handle_batch(&self, records: &[Inbound]) -> Vec<Result<Vec<Outbound>, Failure>> {
        batch::handle(self, records).await
    }
}

/// What rebuilds the matcher's state (see [`rebuild`]).
pub fn rebuilder(rt: &Runtime, settings: &MatcherSettings, redis: ConnectionManager) -> rebuild::MatcherRebuild {
    rebuild::MatcherRebuild {
        kafka: rt.config.kafka.clone(),
        invoices_topic: rt.topic(&rt.config.topics.invoices),
        matched_topic: rt.topic(&rt.config.topics.payments_matched),
        unmatched_topic: rt.topic(&rt.config.topics.payments_unmatched),
        codec: rt.codec.clone(),
        redis,
        keys: rt.keys(),
        retention_secs: settings.retention_days * 86_400,
    }
}

/// Runs the matcher until shutdown.
pub async fn run(rt: Runtime) -> anyhow::Result<()> {
    let redis = redis_store::connect(&rt.config.redis).await?;
    let results = IntCounterVec::new(
        Opts::new(
            "matcher_payments_total",
            "Payments by matching rule or unmatched reason",
        ),
        &["result"],
    )?;
    let decided = IntCounterVec::new(
        Opts::new(
            "matcher_payments_decided_total",
            "Payments decided, by whether they shared a batch's round trips (together) or took their own (alone)",
        ),
        &["path"],
    )?;
    let decided_after = Histogram::with_opts(
        HistogramOpts::new(
            "matcher_decided_after_seconds",
            "From the payment's report to the matcher's decision",
        )
        .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
    )?;
    let settings: MatcherSettings = config::section(&rt.figment, SERVICE)?;
    let mut core = None;
    let shell = ServiceShell::start_with_routes(&rt, SERVICE, PORT_OFFSET, |_, producer, readiness| {
        let state = Arc::new(DerivedState::new(
            &rt.keys(),
            SERVICE,
            redis.clone(),
            readiness.clone(),
            rebuilder(&rt, &settings, redis.clone()),
        ));
        let m = Matcher(Arc::new(Inner {
            rt: rt.clone(),
            redis: redis.clone(),
            keys: rt.keys(),
            state,
            retention_secs: settings.retention_days * 86_400,
            producer: producer.clone(),
            metrics: Metrics {
                results: results.clone(),
                decided: decided.clone(),
                decided_after: decided_after.clone(),
            },
            tokens: forfall_platform::api_auth::TenantTokens::new(&rt.config.api, rt.config.profile),
        }));
        core = Some(m.clone());
        http::routes(m)
    })
    .await?;
    shell.metrics.registry.register(Box::new(results))?;
    shell.metrics.registry.register(Box::new(decided))?;
    shell.metrics.registry.register(Box::new(decided_after))?;
    let matcher = core.ok_or_else(|| anyhow::anyhow!("matcher routes were not built"))?;
    let topics = [
        rt.topic(&rt.config.topics.invoices),
        rt.topic(&rt.config.topics.payments),
    ];
    let consumer = shell.consumer(&rt, SERVICE, &topics)?;
    let mut ctx = shell.loop_context(&rt);
    // Payments are decided concurrently (booking re-checks what a decision was based on);
    // a bank's feed often has one key for all, so they spread by content, not by key.
    ctx.key_concurrency = settings.concurrency.max(1);
    ctx.batch = settings.batch.max(1);
    tokio::spawn(
        matcher
            .clone()
            .resend_manual_matches(Duration::from_secs(settings.manual_resend_secs.max(1))),
    );
    let watching = tokio::spawn(matcher.0.state.clone().watch(Duration::from_secs(1)));
    let payments_topic = rt.topic(&rt.config.topics.payments);
    ctx.lane = Some(Arc::new(move |record| lane(record, &payments_topic)));
    let consumed = run_consumer(consumer, matcher, ctx).await;
    watching.abort();
    consumed?;
    shell.producer.flush(Duration::from_secs(5)).await;
    Ok(())
}
