//! Records of different debtors decided together: a billing run brings hundreds of thousands
//! of new invoices at once, and a bank's file as many payments. Alone, each takes its own few
//! Redis round trips and waits for its own acknowledged produces; a poll's worth of them share
//! them instead: their journeys (with each partition's state marker) and the invoices' parked
//! payments read at once, the new invoices' debtors' history in one more read, and their
//! decisions written together (see [`Watcher::write_together`]).
//!
//! What batches is the common case: a payment applied to a journey, a new invoice opening one,
//! a changed snapshot. Everything else goes the way of a record alone, once the batch has let
//! go of its invoices: other kinds of record, an invoice with payments parked for it, a payment
//! whose invoice has not arrived (it is parked), an invoice another task holds, and a journey
//! another task wrote between the batch's read and its write (decided again on what is there).
//! A batch never waits for an invoice's lock: holding some while waiting for others could
//! wait for a task that waits for it.

use std::collections::{BTreeMap, BTreeSet};

use forfall_domain::Money;
use forfall_domain::invoice::InvoiceSnapshot;
use forfall_domain::journey::{self, Decision, Plan};
use forfall_platform::kafka::{
    Failure, Handler, Inbound, Outbound, each_failed_as, each_retried_alone, every_record_decided,
};
use forfall_platform::records::{self, PaymentMatched, Record};
use futures::future::join_all;

use crate::store::{self, Loaded, Stored};
use crate::{Emission, JourneyWrite, Watcher, payment_amount, payment_applied, snapshot, trace_to_keep};

type Outcome = Result<Vec<Outbound>, Failure>;

/// A record the batch may decide, with what it says.
enum Kind {
    Payment {
        rec: Box<PaymentMatched>,
        amount: Money,
    },
    Invoice {
        rec: Box<records::Invoice>,
        incoming: Box<InvoiceSnapshot>,
    },
}

impl Kind {
    fn invoice(&self) -> (&str, &str) {
        match self {
            Kind::Payment { rec, .. } => (&rec.tenant, &rec.invoice_id),
            Kind::Invoice { rec, .. } => (&rec.tenant, &rec.invoice_id),
        }
    }
}

struct Item<'r> {
    at: usize,
    record: &'r Inbound,
    kind: Kind,
}

/// A decision of the batch, ready to write.
struct Decided<'r> {
    at: usize,
    record: &'r Inbound,
    expected: Option<u64>,
    stored: Stored,
    decision: Decision,
    plan: Plan,
    fee: Money,
    cause: String,
    /// A payment's: its wait from match to contact stop is measured.
    payment: bool,
}

/// What the batch made of its records: outcomes by place, and the places of those that go
/// their own way.
#[derive(Default)]
struct Sorted {
    outcomes: Vec<(usize, Outcome)>,
    alone: Vec<usize>,
}

/// One result per record, in order (see [`Handler::handle_batch`]).
pub(crate) async fn handle(watcher: &Watcher, records: &[Inbound]) -> Vec<Outcome> {
    let partitions: Vec<i32> = records
        .iter()
        .map(|r| r.partition)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if let Err(e) = watcher.ensure_ready_all(&partitions).await {
        // Each is retried on its own, which waits for its partition's state as `handle` does.
        return each_retried_alone(records.len(), &format!("{e:?}"));
    }
    let mut items = Vec::with_capacity(records.len());
    let mut alone = Vec::new();
    for (at, record) in records.iter().enumerate() {
        match read(watcher, record).await {
            Some(kind) => items.push(Item { at, record, kind }),
            // Other kinds of record, and whatever `handle` rejects with its reason.
            None => alone.push(at),
        }
    }
    let mut results: Vec<Option<Outcome>> = records.iter().map(|_| None).collect();
    let places: Vec<usize> = items.iter().map(|i| i.at).collect();
    match decide_together(watcher, items).await {
        Ok(sorted) => {
            let together = sorted.outcomes.iter().filter(|(_, o)| o.is_ok()).count();
            watcher
                .0
                .metrics
                .decided
                .with_label_values(&["together"])
                .inc_by(together as u64);
            for (at, outcome) in sorted.outcomes {
                results[at] = Some(outcome);
            }
            alone.extend(sorted.alone);
        }
        Err(e) => {
            // A round trip that failed fails them all (Redis or the broker away, a partition's
            // state gone): each is retried on its own.
            let e = watcher.noticing_missing_state(e);
            let failed = each_failed_as(places.len(), &e);
            for (at, outcome) in places.into_iter().zip(failed) {
                results[at] = Some(outcome);
            }
        }
    }
    let handled = join_all(
        alone
            .into_iter()
            .map(|at| async move { (at, watcher.handle(&records[at]).await) }),
    )
    .await;
    for (at, outcome) in handled {
        results[at] = Some(outcome);
    }
    every_record_decided(results)
}

/// The record as one the batch may decide, if it is one.
async fn read(watcher: &Watcher, record: &Inbound) -> Option<Kind> {
    let decoded = watcher.0.rt.codec.decode(record.payload.as_deref()).await.ok()?;
    match decoded.name.as_str() {
        PaymentMatched::FULL_NAME => {
            let rec: PaymentMatched = decoded.to().ok()?;
            let amount = payment_amount(&rec).ok()?;
            Some(Kind::Payment {
                rec: Box::new(rec),
                amount,
            })
        }
        records::Invoice::FULL_NAME => {
            let rec: records::Invoice = decoded.to().ok()?;
            let incoming = snapshot(&rec).ok()?;
            Some(Kind::Invoice {
                rec: Box::new(rec),
                incoming: Box::new(incoming),
            })
        }
        _ => None,
    }
}

async fn decide_together<'r>(watcher: &Watcher, items: Vec<Item<'r>>) -> Result<Sorted, Failure> {
    let mut sorted = Sorted::default();
    if items.is_empty() {
        return Ok(sorted);
    }
    let w = &watcher.0;
    // Each invoice's lock, taken only if free (see the module's doc).
    let mut held = BTreeSet::new();
    let mut guards = Vec::with_capacity(items.len());
    let mut mine = Vec::with_capacity(items.len());
    for item in items {
        let (tenant, invoice_id) = item.kind.invoice();
        let stripe = watcher.stripe_index(tenant, invoice_id);
        if !held.contains(&stripe) {
            match w.stripes[stripe].try_lock() {
                Ok(guard) => {
                    held.insert(stripe);
                    guards.push(guard);
                }
                Err(_) => {
                    sorted.alone.push(item.at);
                    continue;
                }
            }
        }
        mine.push(item);
    }

    // 1. The journeys, by partition with its state marker, and the invoices' parked payments.
    let mut by_partition: BTreeMap<i32, Vec<usize>> = BTreeMap::new();
    for (index, item) in mine.iter().enumerate() {
        by_partition.entry(item.record.partition).or_default().push(index);
    }
    let parked_of: Vec<usize> = (0..mine.len())
        .filter(|i| matches!(mine[*i].kind, Kind::Invoice { .. }))
        .collect();
    let reads = futures::future::try_join_all(by_partition.iter().map(|(partition, indexes)| {
        let pairs: Vec<(String, String)> = indexes
            .iter()
            .map(|i| {
                let (tenant, invoice_id) = mine[*i].kind.invoice();
                (tenant.to_owned(), invoice_id.to_owned())
            })
            .collect();
        async move { w.store.load_many(*partition, &pairs).await }
    }));
    let parked = async {
        if parked_of.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for i in &parked_of {
            let (tenant, invoice_id) = mine[*i].kind.invoice();
            pipe.hlen(w.store.parked_key(tenant, invoice_id));
        }
        let counts: Vec<u64> = pipe.query_async(&mut watcher.conn()).await?;
        Ok::<_, Failure>(counts)
    };
    let (loads, parked) = futures::try_join!(reads, parked)?;
    let mut loaded: Vec<Option<Loaded>> = (0..mine.len()).map(|_| None).collect();
    for (indexes, journeys) in by_partition.values().zip(loads) {
        for (index, journey) in indexes.iter().zip(journeys) {
            loaded[*index] = journey;
        }
    }
    let mut has_parked = vec![false; mine.len()];
    for (index, count) in parked_of.iter().zip(parked) {
        has_parked[*index] = count > 0;
    }

    // 2. What each decides; the new invoices' debtors' history read together.
    let mut decided: Vec<Decided<'r>> = Vec::with_capacity(mine.len());
    let mut new_invoices: Vec<(&'r Inbound, usize, records::Invoice, InvoiceSnapshot)> = Vec::new();
    for ((item, loaded), parked) in mine.into_iter().zip(loaded).zip(has_parked) {
        let Item { at, record, kind } = item;
        match kind {
            Kind::Payment { rec, amount } => {
                // Not arrived yet: the payment is parked for it, on its own.
                let Some(loaded) = loaded else {
                    sorted.alone.push(at);
                    continue;
                };
                let d = match payment_applied(loaded.stored.journey.clone(), &rec, amount) {
                    Ok(d) => d,
                    Err(refused) => {
                        sorted.outcomes.push((at, Err(refused)));
                        continue;
                    }
                };
                if d.transitions.is_empty() {
                    sorted.outcomes.push((at, Ok(Vec::new()))); // already applied
                    continue;
                }
                decided.push(Decided {
                    at,
                    record,
                    expected: Some(loaded.version),
                    stored: Stored {
                        journey: d.journey.clone(),
                        ..loaded.stored
                    },
                    plan: watcher.plan_of(&d.journey),
                    decision: d,
                    fee: Money::zero(amount.currency),
                    cause: rec.event_id,
                    payment: true,
                });
            }
            Kind::Invoice { rec, incoming } => {
                if parked {
                    sorted.alone.push(at);
                    continue;
                }
                let Some(loaded) = loaded else {
                    new_invoices.push((record, at, *rec, *incoming));
                    continue;
                };
                if loaded.stored.journey.invoice == *incoming {
                    sorted.outcomes.push((at, Ok(Vec::new()))); // the same snapshot again
                    continue;
                }
                let plan = watcher.plan_of(&loaded.stored.journey);
                let fee = Money::zero(incoming.amount.currency);
                let d = journey::on_invoice(Some(loaded.stored.journey), *incoming, &plan);
                decided.push(Decided {
                    at,
                    record,
                    expected: Some(loaded.version),
                    stored: Stored {
                        journey: d.journey.clone(),
                        trace: trace_to_keep(loaded.stored.trace, record.trace),
                        ..loaded.stored
                    },
                    decision: d,
                    plan,
                    fee,
                    cause: rec.event_id,
                    payment: false,
                });
            }
        }
    }
    let snapshots: Vec<&InvoiceSnapshot> = new_invoices.iter().map(|(_, _, _, s)| s).collect();
    let histories = watcher.histories_of(&snapshots).await?;
    for ((record, at, rec, incoming), history) in new_invoices.into_iter().zip(histories) {
        let fee = Money::zero(incoming.amount.currency);
        let (d, plan) = watcher.open_journey_with(incoming, history);
        decided.push(Decided {
            at,
            record,
            expected: None,
            stored: Stored {
                journey: d.journey.clone(),
                partition: record.partition,
                pending_step: None,
                pending_fire_ms: None,
                trace: trace_to_keep(None, record.trace),
            },
            decision: d,
            plan,
            fee,
            cause: rec.event_id,
            payment: false,
        });
    }

    // 3. Written together.
    let writes: Vec<JourneyWrite<'_>> = decided
        .iter()
        .map(|d| JourneyWrite {
            expected: d.expected,
            stored: d.stored.clone(),
            emission: Emission {
                decision: &d.decision,
                plan: &d.plan,
                fee: d.fee,
                cause: &d.cause,
                trace: d.record.trace,
                covers: &[],
                merged: &[],
            },
            extra: &[],
            extra_changes: &[],
        })
        .collect();
    let written = watcher.write_together(writes).await?;
    drop(guards);
    for (d, written) in decided.iter().zip(written) {
        match written {
            store::Written::Yes => {
                if d.payment
                    && d.decision.stops_contact()
                    && let Some(matched_ms) = d.record.timestamp_ms
                {
                    let waited_ms = (chrono::Utc::now().timestamp_millis() - matched_ms).max(0);
                    w.metrics.payment_to_stop.observe(waited_ms as f64 / 1000.0);
                }
                sorted.outcomes.push((d.at, Ok(Vec::new())));
            }
            // Written by another task since it was read: decided again on what is there.
            store::Written::Conflict => sorted.alone.push(d.at),
        }
    }
    Ok(sorted)
}
