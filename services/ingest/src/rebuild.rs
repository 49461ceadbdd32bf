//! Rebuilding ingest's de-duplication state from its own output: every snapshot ingest
//! accepted is on `forfall.invoices.v1`, in the order ingest decided it per debtor, with the
//! credit note it applied. Replaying the topic leaves each invoice's last snapshot and its
//! credit notes in Redis, as they were (or further, when Redis was restored from an older copy).

use std::collections::HashMap;

use forfall_domain::invoice::{Contact, InvoiceSnapshot, InvoiceStatus};
use forfall_domain::{DebtorKind, Jurisdiction, Money};
use forfall_platform::avro::Codec;
use forfall_platform::changelog::{Change, Progress, Restore};
use forfall_platform::config::KafkaConfig;
use forfall_platform::derived_state::Rebuild;
use forfall_platform::kafka::Failure;
use forfall_platform::rebuild_resume::Resume;
use forfall_platform::records::{self, InvoiceChange, Record};
use redis::aio::ConnectionManager;

use crate::stored::Stored;
use crate::{Retention, StoredKeys};

/// Records applied per Redis round trip.
const BATCH: usize = 2000;

/// The snapshot a published record carries (the inverse of [`crate::invoice_record`]).
pub fn snapshot_of(r: &records::Invoice) -> Result<InvoiceSnapshot, String> {
    let currency = r
        .currency
        .parse()
        .map_err(|e| format!("currency '{}': {e}", r.currency))?;
    let jurisdiction: Jurisdiction = r
        .jurisdiction
        .parse()
        .map_err(|_| format!("jurisdiction '{}'", r.jurisdiction))?;
    let debtor_kind: DebtorKind = r
        .debtor_kind
        .parse()
        .map_err(|_| format!("debtor kind '{}'", r.debtor_kind))?;
    let date = |days: i32, field: &str| {
        forfall_domain::invoice::date_from_epoch_days(days).ok_or_else(|| format!("{field} {days} is not a date"))
    };
    Ok(InvoiceSnapshot {
        tenant: r.tenant.clone(),
        debtor_id: r.debtor_id.clone(),
        invoice_id: r.invoice_id.clone(),
        revision: r.revision,
        invoice_number: r.invoice_number.clone(),
        issue_date: date(r.issue_date, "issue date")?,
        due_date: date(r.due_date, "due date")?,
        amount: Money::new(r.amount_minor, currency),
        credited_minor: r.credited_minor,
        jurisdiction,
        debtor_kind,
        status: match r.status {
            records::InvoiceStatus::Open => InvoiceStatus::Open,
            records::InvoiceStatus::SettledByCredit => InvoiceStatus::SettledByCredit,
            records::InvoiceStatus::Cancelled => InvoiceStatus::Cancelled,
        },
        payment_reference: r.payment_reference.clone(),
        description: r.description.clone(),
        contact: Contact {
            name: r.debtor_name.clone(),
            email: r.email.clone(),
            phone: r.phone.clone(),
            language: r.language.clone(),
            preferred_channels: r.preferred_channels.clone(),
            declined_channels: r.declined_channels.clone(),
            details: r.debtor_details.clone(),
        },
        reminder_fee_agreed: r.reminder_fee_agreed.unwrap_or(false),
    })
}

/// Replays `forfall.invoices.v1` into ingest's keys.
#[derive(Clone)]
pub struct IngestRebuild {
    pub kafka: KafkaConfig,
    pub topic: String,
    pub codec: std::sync::Arc<Codec>,
    pub redis: ConnectionManager,
    pub keys: StoredKeys,
    pub retention: Retention,
}

impl Rebuild for IngestRebuild {
    async fn rebuild(&self, resume: &Resume, report: &(dyn Fn(&Progress) + Send + Sync)) -> anyhow::Result<Progress> {
        let mut restore = Restorer {
            rebuild: self,
            skipped: 0,
        };
        // Each batch is written with what Redis holds of its invoices: resumable.
        let progress = resume
            .replay(&self.kafka, &self.topic, BATCH, &mut restore, report)
            .await?;
        if restore.skipped > 0 {
            tracing::error!(skipped = restore.skipped, topic = %self.topic, "records on the invoices topic ingest cannot read were left out of the rebuild");
        }
        Ok(progress)
    }
}

struct Restorer<'a> {
    rebuild: &'a IngestRebuild,
    skipped: u64,
}

impl Restore for Restorer<'_> {
    async fn apply(&mut self, partition: i32, changes: Vec<Change>) -> Result<(), Failure> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut decoded = Vec::with_capacity(changes.len());
        for c in &changes {
            let Some(value) = &c.value else { continue };
            let record = match self.rebuild.codec.decode(Some(value)).await {
                Ok(d) if d.name == records::Invoice::FULL_NAME => d.to::<records::Invoice>(),
                Ok(d) => Err(forfall_platform::avro::DecodeError::UnexpectedType {
                    expected: records::Invoice::FULL_NAME.to_owned(),
                    found: d.name,
                }),
                Err(e) if e.is_transient() => return Err(e.into()),
                Err(e) => Err(e),
            };
            match record
                .map_err(|e| e.to_string())
                .and_then(|r| Ok((snapshot_of(&r)?, r)))
            {
                Ok((snapshot, r)) => decoded.push((snapshot, r, c.timestamp_ms)),
                Err(e) => {
                    self.skipped += 1;
                    tracing::error!(partition, offset = c.offset, error = %e, "unreadable record on the invoices topic; skipped in the rebuild");
                }
            }
        }
        let mut latest: HashMap<String, (Stored, i64)> = HashMap::new();
        let keys: Vec<String> = decoded
            .iter()
            .map(|(s, _, _)| self.rebuild.keys.stored(&s.tenant, &s.invoice_id))
            .collect();
        let mut unique = keys.clone();
        unique.sort();
        unique.dedup();
        let existing: Vec<Option<Vec<u8>>> = if unique.is_empty() {
            Vec::new()
        } else {
            redis::cmd("MGET")
                .arg(&unique)
                .query_async(&mut self.rebuild.redis.clone())
                .await?
        };
        let mut before: HashMap<&str, Stored> = unique
            .iter()
            .zip(existing)
            .filter_map(|(k, v)| Some((k.as_str(), Stored::decode(&v?).ok()?)))
            .collect();
        for ((snapshot, record, at), key) in decoded.into_iter().zip(&keys) {
            let mut credit_notes = match latest.remove(key) {
                Some((s, _)) => s.credit_notes,
                None => before.remove(key.as_str()).map(|s| s.credit_notes).unwrap_or_default(),
            };
            if record.change == InvoiceChange::Credited
                && let Some(id) = record.credit_note_id
                && !credit_notes.contains(&id)
            {
                credit_notes.push(id);
            }
            latest.insert(key.clone(), (Stored { snapshot, credit_notes }, at));
        }
        let mut pipe = redis::pipe();
        for (key, (stored, at)) in latest {
            let Some(ttl) = self.rebuild.retention.remaining_secs(at, now_ms) else {
                // Older than retention: it would have expired had Redis not been lost.
                pipe.del(&key).ignore();
                continue;
            };
            pipe.cmd("SET")
                .arg(&key)
                .arg(stored.encode()?)
                .arg("EX")
                .arg(ttl)
                .ignore();
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
