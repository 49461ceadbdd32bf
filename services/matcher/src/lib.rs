//! Matcher: turns payments into settled invoices. It keeps a reference index (payment
//! reference → tenant, debtor, invoice) from `forfall.invoices.v1` and matches each payment on
//! `payments.events.v1` by its structured reference, producing `PaymentMatched` keyed by the
//! debtor so the watcher sees it in order with the debtor's invoices.
//!
//! A payment whose reference is not (yet) indexed is recorded on the rejected topic as
//! `payment_unmatched` and kept: the invoices and payments topics are consumed together but
//! not in a guaranteed order, so when an invoice with that reference arrives later, the kept
//! payment is matched then. The full matching rules (remittance text, payer account, several
//! invoices, over/under payment) belong to the payment-matching issue.

use std::time::Duration;

use forfall_domain::reference::normalise;
use forfall_domain::{Currency, Money};
use forfall_platform::kafka::{Failure, Handler, Inbound, Outbound, run_consumer};
use forfall_platform::records::{self, PaymentMatched, PaymentReceived, Record, derived_id};
use forfall_platform::redis_store::{self, Keys};
use forfall_platform::service::{Runtime, ServiceShell};
use forfall_platform::telemetry::TraceContext;
use prometheus::{IntCounterVec, Opts};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

pub const SERVICE: &str = "matcher";
pub const PORT_OFFSET: u16 = 4;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct IndexEntry {
    debtor_id: String,
    invoice_id: String,
    currency: String,
}

pub struct Matcher {
    rt: Runtime,
    redis: ConnectionManager,
    keys: Keys,
    matched_topic: String,
    results: IntCounterVec,
}

impl Matcher {
    fn index_key(&self, tenant: &str, reference: &str) -> String {
        self.keys.key(&["matcher", "ref", &format!("{{{tenant}:{reference}}}")])
    }

    fn kept_key(&self, tenant: &str, reference: &str) -> String {
        self.keys
            .key(&["matcher", "unmatched", &format!("{{{tenant}:{reference}}}")])
    }

    fn conn(&self) -> ConnectionManager {
        self.redis.clone()
    }

    async fn matched(&self, p: &PaymentReceived, entry: &IndexEntry, trace: TraceContext) -> Result<Outbound, Failure> {
        self.results.with_label_values(&["matched"]).inc();
        let m = PaymentMatched {
            event_id: derived_id("payment-matched", &[&p.tenant, &p.payment_id, &entry.invoice_id]),
            tenant: p.tenant.clone(),
            debtor_id: entry.debtor_id.clone(),
            occurred_at: self.rt.clock.now().timestamp_millis(),
            payment_id: p.payment_id.clone(),
            invoice_id: entry.invoice_id.clone(),
            amount_minor: p.amount_minor,
            currency: p.currency.clone(),
            rule: "exact_reference".into(),
            reference: p.reference.clone(),
            value_date: p.value_date,
        };
        let payload = self.rt.codec.encode(&self.matched_topic, &m).await?;
        Ok(Outbound {
            topic: self.matched_topic.clone(),
            key: entry.debtor_id.clone(),
            payload,
            trace: trace.child(),
        })
    }

    async fn index(&self, inv: records::Invoice, trace: TraceContext) -> Result<Vec<Outbound>, Failure> {
        let Some(reference) = inv
            .payment_reference
            .as_deref()
            .map(normalise)
            .filter(|r| !r.is_empty())
        else {
            return Ok(Vec::new());
        };
        let entry = IndexEntry {
            debtor_id: inv.debtor_id.clone(),
            invoice_id: inv.invoice_id.clone(),
            currency: inv.currency.clone(),
        };
        let json = serde_json::to_string(&entry).map_err(|e| Failure::Fatal(e.into()))?;
        let _: () = redis::cmd("SET")
            .arg(self.index_key(&inv.tenant, &reference))
            .arg(json)
            .query_async(&mut self.conn())
            .await?;
        // Payments that arrived before this invoice was indexed.
        let kept: Vec<String> = redis::cmd("LRANGE")
            .arg(self.kept_key(&inv.tenant, &reference))
            .arg(0)
            .arg(-1)
            .query_async(&mut self.conn())
            .await?;
        let mut outs = Vec::new();
        for k in &kept {
            let Ok(p) = serde_json::from_str::<KeptPayment>(k) else {
                continue;
            };
            if p.0.currency == entry.currency {
                outs.push(self.matched(&p.0, &entry, trace).await?);
            }
        }
        if !kept.is_empty() {
            let _: () = redis::cmd("DEL")
                .arg(self.kept_key(&inv.tenant, &reference))
                .query_async(&mut self.conn())
                .await?;
        }
        Ok(outs)
    }

    async fn payment(&self, p: PaymentReceived, trace: TraceContext) -> Result<Vec<Outbound>, Failure> {
        let reject = |code: &'static str, detail: String| Failure::Reject {
            code,
            detail,
            tenant: Some(p.tenant.clone()),
            debtor_id: p.debtor_id.clone(),
        };
        let currency: Currency = p
            .currency
            .parse()
            .map_err(|e| reject("unknown_currency", format!("field 'currency': {e}")))?;
        if p.amount_minor <= 0 {
            return Err(reject(
                "invalid_amount",
                format!("field 'amount_minor' is {}, must be greater than 0", p.amount_minor),
            ));
        }
        let amount = Money::new(p.amount_minor, currency);
        let Some(reference) = p.reference.as_deref().map(normalise).filter(|r| !r.is_empty()) else {
            self.results.with_label_values(&["unmatched"]).inc();
            return Err(reject(
                "payment_unmatched",
                format!("payment '{}' of {amount} has no structured reference", p.payment_id),
            ));
        };
        let raw: Option<String> = redis::cmd("GET")
            .arg(self.index_key(&p.tenant, &reference))
            .query_async(&mut self.conn())
            .await?;
        let Some(entry) = raw.and_then(|r| serde_json::from_str::<IndexEntry>(&r).ok()) else {
            let kept = serde_json::to_string(&KeptPayment(p.clone())).map_err(|e| Failure::Fatal(e.into()))?;
            let _: () = redis::cmd("RPUSH")
                .arg(self.kept_key(&p.tenant, &reference))
                .arg(kept)
                .query_async(&mut self.conn())
                .await?;
            self.results.with_label_values(&["kept"]).inc();
            return Err(reject(
                "payment_unmatched",
                format!(
                    "payment '{}' of {amount}: no invoice with reference '{reference}' yet; kept, and matched if one arrives",
                    p.payment_id
                ),
            ));
        };
        if entry.currency != p.currency {
            self.results.with_label_values(&["currency_mismatch"]).inc();
            return Err(reject(
                "currency_mismatch",
                format!(
                    "payment '{}' is in {} but the invoice with reference '{reference}' is in {}; not matched automatically",
                    p.payment_id, p.currency, entry.currency
                ),
            ));
        }
        Ok(vec![self.matched(&p, &entry, trace).await?])
    }
}

/// A payment kept until its invoice is indexed (the record, as JSON).
#[derive(Serialize, Deserialize)]
struct KeptPayment(PaymentReceived);

impl Handler for Matcher {
    async fn handle(&self, record: &Inbound) -> Result<Vec<Outbound>, Failure> {
        let decoded = self.rt.codec.decode(record.payload.as_deref()).await?;
        match decoded.name.as_str() {
            records::Invoice::FULL_NAME => self.index(decoded.to()?, record.trace).await,
            PaymentReceived::FULL_NAME => self.payment(decoded.to()?, record.trace).await,
            other => Err(Failure::reject(
                "unexpected_record_type",
                format!("the matcher does not handle '{other}'"),
            )),
        }
    }
}

/// Runs the matcher until shutdown.
pub async fn run(rt: Runtime) -> anyhow::Result<()> {
    let shell = ServiceShell::start(&rt, SERVICE, PORT_OFFSET, None).await?;
    let results = IntCounterVec::new(
        Opts::new("matcher_payments_total", "Payments by matching result"),
        &["result"],
    )?;
    shell.metrics.registry.register(Box::new(results.clone()))?;
    let matcher = Matcher {
        redis: redis_store::connect(&rt.config.redis).await?,
        keys: rt.keys(),
        matched_topic: rt.topic(&rt.config.topics.payments_matched),
        results,
        rt: rt.clone(),
    };
    let topics = [
        rt.topic(&rt.config.topics.invoices),
        rt.topic(&rt.config.topics.payments),
    ];
    let consumer = shell.consumer(&rt, SERVICE, &topics)?;
    run_consumer(consumer, matcher, shell.loop_context(&rt)).await?;
    shell.producer.flush(Duration::from_secs(5)).await;
    Ok(())
}
