//! Rebuilding the matcher's Redis state from the topics that hold its facts:
//! - the reference index (invoice, debtor, invoice number, payment reference) from
//!   `forfall.invoices.v1`, the topic the matcher indexes live;
//! - its decisions from its own output: each `PaymentMatched` (one per allocation) and each
//!   `PaymentUnmatched`. A payment matched after it was first kept unmatched is matched.
//!   From the decisions follow what is allocated to each invoice, the unmatched payments a
//!   person can match by hand, and the payments kept for a reference that has no invoice yet.
//!
//! What a rebuild does not bring back: the payer-account hints (learned again from the next
//! payments; they only help the third rule) and, for a payment repeated by the bank after the
//! rebuild, the hand-off recall of an allocation to a handed-over invoice (the recall itself was
//! acknowledged on its topic when the payment was first decided). An unmatched payment's reason
//! is rebuilt from its code and explanation; only the text of a repeat's record can differ.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use forfall_domain::matching::{Allocation, MatchDecision, MatchRule, UnmatchedReason};
use forfall_domain::{Currency, Money};
use forfall_platform::avro::Codec;
use forfall_platform::changelog::{self, Change, Progress, Restore};
use forfall_platform::config::KafkaConfig;
use forfall_platform::derived_state::{Rebuild, remaining_ttl};
use forfall_platform::kafka::Failure;
use forfall_platform::rebuild_resume::Resume;
use forfall_platform::records::{self, PaymentMatched, PaymentReceived, PaymentUnmatched, Record};
use forfall_platform::redis_store::Keys;
use redis::aio::ConnectionManager;

use crate::closing::rebuild_settle_invocation;
use crate::{Decided, Indexed, MatcherKeys, indexed_of, kept_reference};

/// Records per Redis round trip.
const BATCH: usize = 2000;

/// Replays the matcher's topics into its keys.
pub struct MatcherRebuild {
    pub kafka: KafkaConfig,
    pub invoices_topic: String,
    pub matched_topic: String,
    pub unmatched_topic: String,
    pub codec: Arc<Codec>,
    pub redis: ConnectionManager,
    pub keys: Keys,
    /// `matcher.retention_days`, in seconds: what is older is not brought back.
    pub retention_secs: u64,
}

/// Payments as their records tell them, by (tenant, payment id), with when each was written.
#[derive(Default)]
struct Payments {
    matched: HashMap<(String, String), (Vec<PaymentMatched>, i64)>,
    unmatched: HashMap<(String, String), (PaymentUnmatched, i64)>,
}

impl Rebuild for MatcherRebuild {
    async fn rebuild(&self, resume: &Resume, report: &(dyn Fn(&Progress) + Send + Sync)) -> anyhow::Result<Progress> {
        let started = std::time::Instant::now();
        let mut total = Progress::default();
        let mut index = Restorer {
            rebuild: self,
            payments: None,
            skipped: 0,
        };
        // The index is written batch by batch (resumable); the decisions are summed up over
        // all payments first, so their topics are replayed whole each time.
        total.add(
            &resume
                .replay(&self.kafka, &self.invoices_topic, BATCH, &mut index, report)
                .await?,
        );
        let mut payments = Restorer {
            rebuild: self,
            payments: Some(Payments::default()),
            skipped: index.skipped,
        };
        total.add(&self.replay_all(&self.matched_topic, &mut payments, report).await?);
        total.add(&self.replay_all(&self.unmatched_topic, &mut payments, report).await?);
        if payments.skipped > 0 {
            tracing::error!(
                skipped = payments.skipped,
                "records the matcher cannot read were left out of the rebuild"
            );
        }
        let decided = payments.payments.take().unwrap_or_default();
        self.write_decisions(decided).await?;
        total.elapsed = started.elapsed();
        Ok(total)
    }
}

impl MatcherRebuild {
    async fn replay_all(
        &self,
        topic: &str,
        restore: &mut Restorer<'_>,
        report: &(dyn Fn(&Progress) + Send + Sync),
    ) -> anyhow::Result<Progress> {
        changelog::replay_whole(&self.kafka, topic, BATCH, restore, report).await
    }

    /// Writes every payment's decision, each invoice's allocated total, the unmatched payments
    /// and the kept ones. Totals are written, not added, so a rebuild run twice gives the same.
    /// Each key lives what is left of the retention since its last record.
    async fn write_decisions(&self, payments: Payments) -> anyhow::Result<()> {
        let keys = MatcherKeys(&self.keys);
        let now_ms = chrono::Utc::now().timestamp_millis();
        let Payments { matched, mut unmatched } = payments;
        // Per invoice: the total allocated, and when the last allocation was written.
        let mut allocated: BTreeMap<(String, String), (i64, i64)> = BTreeMap::new();
        let mut batch = Batch::new(self.redis.clone());
        for ((tenant, payment_id), (allocations, at)) in matched {
            let first_seen = unmatched.remove(&(tenant.clone(), payment_id.clone())).map(|(u, _)| u);
            for a in &allocations {
                let (total, last) = allocated.entry((tenant.clone(), a.invoice_id.clone())).or_default();
                *total += a.amount_minor;
                *last = (*last).max(at);
            }
            // The allocations count however old they are (the invoice may still be open); the
            // decision is forgotten after its retention.
            let Some(ttl) = remaining_ttl(self.retention_secs, at, now_ms) else {
                continue;
            };
            let decided = decided_matched(&allocations, first_seen)?;
            batch
                .pipe
                .set_ex(
                    keys.key("payment", &tenant, &payment_id),
                    serde_json::to_string(&decided)?,
                    ttl,
                )
                .ignore();
            batch.one_more().await?;
        }
        for ((tenant, invoice_id), (total, _)) in &allocated {
            batch.pipe.set(keys.key("alloc", tenant, invoice_id), total).ignore();
            batch.one_more().await?;
        }
        for ((tenant, payment_id), (u, at)) in unmatched {
            // Unmatched payments wait for a person however old they are.
            let ttl = remaining_ttl(self.retention_secs, at, now_ms).unwrap_or(self.retention_secs.max(1));
            let decided = decided_unmatched(u);
            let payment_json = serde_json::to_string(&decided.payment)?;
            batch
                .pipe
                .set_ex(
                    keys.key("payment", &tenant, &payment_id),
                    serde_json::to_string(&decided)?,
                    ttl,
                )
                .ignore()
                .hset(keys.key("unmatched", &tenant, "all"), &payment_id, payment_json)
                .ignore();
            if let Some(reference) = &decided.payment.reference {
                batch
                    .pipe
                    .sadd(keys.key("kept", &tenant, &kept_reference(reference)), &payment_id)
                    .ignore();
            }
            batch.one_more().await?;
        }
        batch.flush().await?;
        self.close_settled(&allocated, now_ms).await
    }

    /// The invoices paid in full leave the index as they did when their last allocation was
    /// booked (see `closing`): expiring what is left of the retention since then, or at once.
    async fn close_settled(
        &self,
        allocated: &BTreeMap<(String, String), (i64, i64)>,
        now_ms: i64,
    ) -> anyhow::Result<()> {
        let keys = MatcherKeys(&self.keys);
        let allocated: Vec<_> = allocated.iter().collect();
        for chunk in allocated.chunks(BATCH) {
            let mut read = redis::pipe();
            for ((tenant, invoice_id), _) in chunk {
                read.get(keys.key("inv", tenant, invoice_id));
            }
            let indexed: Vec<Option<String>> = read.query_async(&mut self.redis.clone()).await?;
            let mut by_tenant: BTreeMap<&str, Vec<(Indexed, u64)>> = BTreeMap::new();
            let mut orphans = redis::pipe();
            for (((tenant, invoice_id), (_, last)), ix) in chunk.iter().zip(indexed) {
                let ttl = remaining_ttl(self.retention_secs, *last, now_ms).unwrap_or(0);
                match ix.and_then(|raw| serde_json::from_str::<Indexed>(&raw).ok()) {
                    Some(ix) => by_tenant.entry(tenant.as_str()).or_default().push((ix, ttl)),
                    // The invoice itself is gone (closed and expired before): so is its total.
                    None => {
                        orphans
                            .expire(keys.key("alloc", tenant, invoice_id), ttl as i64)
                            .ignore();
                    }
                }
            }
            if !orphans.is_empty() {
                orphans.query_async::<()>(&mut self.redis.clone()).await?;
            }
            for (tenant, invoices) in &by_tenant {
                let invocation = rebuild_settle_invocation(&keys, tenant, invoices.iter().map(|(ix, ttl)| (ix, *ttl)));
                let _closed: i64 = invocation.invoke_async(&mut self.redis.clone()).await?;
            }
        }
        Ok(())
    }
}

/// Writes queued in one pipeline, sent every [`BATCH`].
struct Batch {
    redis: ConnectionManager,
    pipe: redis::Pipeline,
    queued: usize,
}

impl Batch {
    fn new(redis: ConnectionManager) -> Self {
        Self {
            redis,
            pipe: redis::pipe(),
            queued: 0,
        }
    }

    async fn one_more(&mut self) -> anyhow::Result<()> {
        self.queued += 1;
        if self.queued >= BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        if !self.pipe.is_empty() {
            self.pipe.query_async::<()>(&mut self.redis.clone()).await?;
        }
        self.pipe = redis::pipe();
        self.queued = 0;
        Ok(())
    }
}

/// A matched payment's decision from its allocations (in their order; the first carried any
/// surplus, so its amount is written as it was and the overpayment as zero: a repeat's records
/// come out the same).
fn decided_matched(allocations: &[PaymentMatched], first_seen: Option<PaymentUnmatched>) -> anyhow::Result<Decided> {
    let first = allocations
        .first()
        .ok_or_else(|| anyhow::anyhow!("a matched payment without allocations"))?;
    let currency: Currency = first
        .currency
        .parse()
        .map_err(|e| anyhow::anyhow!("payment '{}': currency: {e}", first.payment_id))?;
    let rule = MatchRule::ALL
        .into_iter()
        .find(|r| r.code() == first.rule)
        .ok_or_else(|| anyhow::anyhow!("payment '{}': unknown rule '{}'", first.payment_id, first.rule))?;
    let total: i64 = allocations.iter().map(|a| a.amount_minor).sum();
    let payment = match first_seen {
        Some(u) => payment_of(u),
        None => PaymentReceived {
            event_id: first.event_id.clone(),
            tenant: first.tenant.clone(),
            debtor_id: Some(first.debtor_id.clone()),
            occurred_at: first.occurred_at,
            payment_id: first.payment_id.clone(),
            amount_minor: total,
            currency: first.currency.clone(),
            reference: first.reference.clone(),
            remittance_text: None,
            payer_name: None,
            payer_account: None,
            booking_date: first.value_date,
            value_date: first.value_date,
        },
    };
    Ok(Decided {
        payment,
        decision: MatchDecision::Matched {
            rule,
            allocations: allocations
                .iter()
                .map(|a| Allocation {
                    invoice_id: a.invoice_id.clone(),
                    debtor_id: a.debtor_id.clone(),
                    amount: Money::new(a.amount_minor, currency),
                    handed_over: false,
                    case_remaining: None,
                })
                .collect(),
            overpayment: Money::new(0, currency),
        },
        matched_by: first.matched_by.clone(),
    })
}

fn payment_of(u: PaymentUnmatched) -> PaymentReceived {
    PaymentReceived {
        event_id: u.event_id,
        tenant: u.tenant,
        debtor_id: u.debtor_id,
        occurred_at: u.occurred_at,
        payment_id: u.payment_id,
        amount_minor: u.amount_minor,
        currency: u.currency,
        reference: u.reference,
        remittance_text: u.remittance_text,
        payer_name: u.payer_name,
        payer_account: u.payer_account,
        booking_date: u.value_date,
        value_date: u.value_date,
    }
}

fn decided_unmatched(u: PaymentUnmatched) -> Decided {
    let reason = reason_of(&u.reason_code, &u.reason, &u.currency);
    Decided {
        payment: payment_of(u),
        decision: MatchDecision::Unmatched { reason },
        matched_by: None,
    }
}

/// The reason a `PaymentUnmatched` states, from its code (and, where the reason carries a
/// detail, from its explanation).
fn reason_of(code: &str, explained: &str, payment_currency: &str) -> UnmatchedReason {
    match code {
        "not_positive" => UnmatchedReason::NotPositive,
        "ambiguous" => UnmatchedReason::Ambiguous {
            options: explained
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(2),
        },
        "invalid_reference" => UnmatchedReason::InvalidReference {
            detail: explained.to_owned(),
        },
        "currency_mismatch" => {
            let codes: Vec<Currency> = explained
                .split(|c: char| !c.is_ascii_uppercase())
                .filter(|w| w.len() == 3)
                .filter_map(|w| w.parse().ok())
                .collect();
            match (payment_currency.parse::<Currency>(), codes.last()) {
                (Ok(payment), Some(invoice)) => UnmatchedReason::CurrencyMismatch {
                    payment,
                    invoice: *invoice,
                },
                _ => UnmatchedReason::NoCandidate,
            }
        }
        _ => UnmatchedReason::NoCandidate,
    }
}

struct Restorer<'a> {
    rebuild: &'a MatcherRebuild,
    /// `None` while the index is replayed.
    payments: Option<Payments>,
    skipped: u64,
}

impl Restore for Restorer<'_> {
    async fn apply(&mut self, partition: i32, changes: Vec<Change>) -> Result<(), Failure> {
        let keys = MatcherKeys(&self.rebuild.keys);
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut pipe = redis::pipe();
        for c in &changes {
            let Some(value) = &c.value else { continue };
            let decoded = match self.rebuild.codec.decode(Some(value)).await {
                Ok(d) => d,
                Err(e) if e.is_transient() => return Err(e.into()),
                Err(e) => {
                    self.skipped += 1;
                    tracing::error!(partition, offset = c.offset, error = %e, "unreadable record; skipped in the rebuild");
                    continue;
                }
            };
            let read = match (decoded.name.as_str(), &mut self.payments) {
                (records::Invoice::FULL_NAME, None) => decoded
                    .to::<records::Invoice>()
                    .map_err(|e| e.to_string())
                    .and_then(|inv| {
                        let (ix, _) = indexed_of(&inv).map_err(|f| format!("{f:?}"))?;
                        let closed_ttl = (ix.open_minor <= 0)
                            .then(|| remaining_ttl(self.rebuild.retention_secs, c.timestamp_ms, now_ms).unwrap_or(0));
                        keys.add_index(&mut pipe, &inv.tenant, &ix, closed_ttl)
                            .map_err(|e| e.to_string())
                    }),
                (PaymentMatched::FULL_NAME, Some(payments)) => decoded
                    .to::<PaymentMatched>()
                    .map(|m| {
                        let (allocations, at) = payments
                            .matched
                            .entry((m.tenant.clone(), m.payment_id.clone()))
                            .or_default();
                        *at = (*at).max(c.timestamp_ms);
                        // A repeat of the same allocation (a redelivered decision) counts once.
                        if !allocations.iter().any(|a| a.invoice_id == m.invoice_id) {
                            allocations.push(m);
                        }
                    })
                    .map_err(|e| e.to_string()),
                (PaymentUnmatched::FULL_NAME, Some(payments)) => decoded
                    .to::<PaymentUnmatched>()
                    .map(|u| {
                        payments
                            .unmatched
                            .insert((u.tenant.clone(), u.payment_id.clone()), (u, c.timestamp_ms));
                    })
                    .map_err(|e| e.to_string()),
                (other, _) => Err(format!("record type '{other}' is not one the matcher rebuilds from")),
            };
            if let Err(e) = read {
                self.skipped += 1;
                tracing::error!(partition, offset = c.offset, error = %e, "record left out of the rebuild");
            }
        }
        if !pipe.is_empty() {
            pipe.query_async::<()>(&mut self.rebuild.redis.clone()).await?;
        }
        Ok(())
    }

    async fn finish(&mut self, _partition: i32, _end: i64) -> Result<(), Failure> {
        Ok(())
    }
}
