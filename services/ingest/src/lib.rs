//! Ingest: takes invoice events from billing (Kafka or `POST /v1/invoices`), validates and
//! normalises them, de-duplicates by (tenant, invoice id, revision), and publishes invoice
//! snapshots on `forfall.invoices.v1`. Anything it cannot accept goes to `forfall.rejected.v1`.
//!
//! De-duplication keeps the last snapshot per invoice in Redis. The snapshot is written before
//! the output is acknowledged, so a redelivered record after a crash finds it: a repeated
//! revision (or credit note, or cancellation) therefore re-publishes the current snapshot
//! instead of dropping it. Downstream consumers are idempotent per snapshot, so the repeat is
//! harmless, and nothing accepted is ever lost.
//!
//! The snapshots are derived state: every one is on `forfall.invoices.v1` (with the credit note
//! it applied), and ingest rebuilds them from there when Redis lost them (see [`rebuild`]). A
//! snapshot is kept `ingest.snapshot_retention_days` after the invoice's last change.

mod batch;
mod http;
pub mod rebuild;
mod stored;

use std::sync::Arc;

use forfall_domain::Money;
use forfall_domain::invoice::{self, Contact, InvoiceSnapshot, IssuedInput, RevisionDecision};
use forfall_platform::avro::Decoded;
use forfall_platform::config;
use forfall_platform::derived_state::{DerivedState, guard_lua};
use forfall_platform::kafka::{Failure, Handler, Inbound, Outbound, run_consumer};
use forfall_platform::records::{
    self, InvoiceCancelled, InvoiceChange, InvoiceCredited, InvoiceIssued, Record, derived_id,
};
use forfall_platform::redis_store::{self, Keys};
use forfall_platform::service::{Runtime, ServiceShell};
use forfall_platform::telemetry::TraceContext;
use prometheus::IntCounterVec;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use stored::{Stored, parse_stored};

pub const SERVICE: &str = "ingest";
pub const PORT_OFFSET: u16 = 1;

/// Ingest's settings (`[ingest]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct IngestSettings {
    /// Days an invoice's last snapshot is kept after its last change. Revisions and credit notes
    /// for an invoice come within weeks of it, a yearly settlement's corrections within a year:
    /// 400 days covers both. A credit note for an invoice forgotten after that is rejected
    /// (`unknown_invoice`), with the reason, for the billing system to resend as a new invoice.
    pub snapshot_retention_days: u64,
    /// Records of different debtors handled at once (a debtor's records stay in order): a
    /// billing run is read at the speed of Redis round trips in flight, not of one at a time.
    pub concurrency: usize,
    /// Most records decided together (one Redis round trip to read their snapshots, one to
    /// write them); 1 decides one at a time.
    pub batch: usize,
}

impl Default for IngestSettings {
    fn default() -> Self {
        Self {
            snapshot_retention_days: 400,
            concurrency: 64,
            batch: 256,
        }
    }
}

/// How long a snapshot lives after it was written.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub secs: u64,
}

impl Retention {
    /// What is left of the retention of a snapshot written at `written_ms`; `None` when over.
    pub fn remaining_secs(&self, written_ms: i64, now_ms: i64) -> Option<u64> {
        forfall_platform::derived_state::remaining_ttl(self.secs, written_ms, now_ms)
    }
}

/// Where ingest keeps an invoice's snapshot.
#[derive(Debug, Clone)]
pub struct StoredKeys(Keys);

impl StoredKeys {
    pub fn new(keys: Keys) -> Self {
        Self(keys)
    }

    pub fn stored(&self, tenant: &str, invoice_id: &str) -> String {
        self.0
            .key(&["ingest", "invoice", &format!("{{{tenant}:{invoice_id}}}")])
    }
}

#[derive(Clone)]
pub struct Ingest {
    rt: Runtime,
    redis: ConnectionManager,
    keys: StoredKeys,
    retention: Retention,
    state: Arc<DerivedState<rebuild::IngestRebuild>>,
    invoices_topic: String,
    changes: IntCounterVec,
}

fn to_input(e: InvoiceIssued) -> IssuedInput {
    IssuedInput {
        tenant: e.tenant,
        debtor_id: e.debtor_id,
        invoice_id: e.invoice_id,
        revision: e.revision,
        invoice_number: e.invoice_number,
        issue_date_days: e.issue_date,
        due_date_days: e.due_date,
        amount_minor: e.amount_minor,
        currency: e.currency,
        jurisdiction: e.jurisdiction,
        debtor_kind: e.debtor_kind,
        payment_reference: e.payment_reference,
        description: e.description,
        contact: Contact {
            name: e.debtor_name,
            email: e.email,
            phone: e.phone,
            language: e.language,
            preferred_channels: e.preferred_channels,
            declined_channels: e.declined_channels,
            details: e.debtor_details,
        },
        reminder_fee_agreed: e.reminder_fee_agreed.unwrap_or(false),
    }
}

fn status(s: invoice::InvoiceStatus) -> records::InvoiceStatus {
    match s {
        invoice::InvoiceStatus::Open => records::InvoiceStatus::Open,
        invoice::InvoiceStatus::SettledByCredit => records::InvoiceStatus::SettledByCredit,
        invoice::InvoiceStatus::Cancelled => records::InvoiceStatus::Cancelled,
    }
}

/// An issued revision, checked, with what its snapshot is published for.
pub(crate) struct Issued {
    tenant: String,
    debtor: String,
    event_id: String,
    occurred_at: i64,
    incoming: InvoiceSnapshot,
}

impl Issued {
    fn of(e: InvoiceIssued) -> Result<Self, Failure> {
        let (tenant, debtor, event_id, occurred_at) =
            (e.tenant.clone(), e.debtor_id.clone(), e.event_id.clone(), e.occurred_at);
        let incoming = invoice::validate_issued(to_input(e)).map_err(|r| reject_for(&tenant, &debtor, r))?;
        Ok(Self {
            tenant,
            debtor,
            event_id,
            occurred_at,
            incoming,
        })
    }

    fn source(&self) -> Source<'_> {
        Source {
            event_id: &self.event_id,
            occurred_at: self.occurred_at,
            credit_note_id: None,
        }
    }
}

/// What an issued revision does.
pub(crate) enum Step {
    /// A new snapshot to write, then publish.
    Save(Stored, InvoiceChange),
    /// The same revision again: the snapshot held, published again.
    Republish(Stored),
    /// An older revision than the one held.
    Ignore,
}

/// The upstream event a snapshot is published for.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub event_id: &'a str,
    pub occurred_at: i64,
    /// The credit note applied, for a credited snapshot.
    pub credit_note_id: Option<&'a str>,
}

/// The published form of a snapshot. Its event id derives from the upstream event, so a
/// re-publication after redelivery carries the same id.
pub fn invoice_record(s: &InvoiceSnapshot, change: InvoiceChange, source: Source<'_>) -> records::Invoice {
    let Source {
        event_id: source_event_id,
        occurred_at,
        credit_note_id,
    } = source;
    records::Invoice {
        event_id: derived_id("invoice", &[&s.tenant, &s.invoice_id, source_event_id]),
        tenant: s.tenant.clone(),
        debtor_id: s.debtor_id.clone(),
        occurred_at,
        invoice_id: s.invoice_id.clone(),
        revision: s.revision,
        change,
        source_event_id: source_event_id.to_owned(),
        invoice_number: s.invoice_number.clone(),
        issue_date: invoice::epoch_days(s.issue_date),
        due_date: invoice::epoch_days(s.due_date),
        amount_minor: s.amount.minor,
        credited_minor: s.credited_minor,
        open_minor: s.open().minor,
        currency: s.amount.currency.code().to_owned(),
        jurisdiction: s.jurisdiction.code().to_owned(),
        debtor_kind: s.debtor_kind.code().to_owned(),
        status: status(s.status),
        payment_reference: s.payment_reference.clone(),
        description: s.description.clone(),
        debtor_name: s.contact.name.clone(),
        email: s.contact.email.clone(),
        phone: s.contact.phone.clone(),
        language: s.contact.language.clone(),
        preferred_channels: s.contact.preferred_channels.clone(),
        declined_channels: s.contact.declined_channels.clone(),
        credit_note_id: credit_note_id.map(str::to_owned),
        debtor_details: s.contact.details.clone(),
        reminder_fee_agreed: Some(s.reminder_fee_agreed),
    }
}

/// Writes snapshots (`KEYS[2..]`, each with its `ARGV[i + 2]`) unless the state's marker
/// (`KEYS[1]`) is missing or behind: a batch's in one call, all or none (a call per snapshot
/// cost Redis more than the writes themselves).
static SAVE_MANY: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(&format!(
        "{}for i = 2, #KEYS do\n  redis.call('SET', KEYS[i], ARGV[i + 2], 'EX', ARGV[1])\nend\nreturn 1",
        guard_lua("KEYS[1]", "ARGV[2]", "ARGV[3]")
    ))
});

fn reject_for(tenant: &str, debtor_id: &str, r: invoice::Rejection) -> Failure {
    Failure::Reject {
        code: r.code,
        detail: r.detail,
        tenant: Some(tenant.to_owned()),
        debtor_id: Some(debtor_id.to_owned()),
    }
}

impl Ingest {
    /// The invoice's snapshot, read with the state marker: a snapshot missing because Redis lost
    /// it is never taken for an invoice not yet issued.
    async fn load(&self, tenant: &str, invoice_id: &str) -> Result<Option<Stored>, Failure> {
        let floor = self.state.read_floor();
        let (raw, marker): (Option<Vec<u8>>, Option<String>) = redis::pipe()
            .get(self.keys.stored(tenant, invoice_id))
            .get(self.state.marker_key())
            .query_async(&mut self.redis.clone())
            .await?;
        self.state.check(marker.as_deref(), floor)?;
        parse_stored(raw)
    }

    /// The call that writes `stored` snapshots together (see [`SAVE_MANY`]).
    fn save_many_call(&self, stored: &[&Stored]) -> Result<redis::ScriptInvocation<'static>, Failure> {
        let (epoch, writes) = self.state.seen();
        let mut call = SAVE_MANY.prepare_invoke();
        call.key(self.state.marker_key())
            .arg(self.retention.secs)
            .arg(epoch)
            .arg(writes);
        for one in stored {
            call.key(self.keys.stored(&one.snapshot.tenant, &one.snapshot.invoice_id))
                .arg(one.encode()?);
        }
        Ok(call)
    }

    /// Writes the snapshot unless the state's marker is missing or behind (see `guard_lua`).
    async fn save(&self, stored: &Stored) -> Result<(), Failure> {
        let saved: i32 = self
            .save_many_call(&[stored])?
            .invoke_async(&mut self.redis.clone())
            .await?;
        if saved != 1 {
            return Err(self.state.missing());
        }
        Ok(())
    }

    async fn publish(
        &self,
        s: &InvoiceSnapshot,
        change: InvoiceChange,
        source: Source<'_>,
        trace: TraceContext,
    ) -> Result<Vec<Outbound>, Failure> {
        let label = match change {
            InvoiceChange::Issued => "issued",
            InvoiceChange::Reissued => "reissued",
            InvoiceChange::Credited => "credited",
            InvoiceChange::Cancelled => "cancelled",
        };
        self.changes.with_label_values(&[label]).inc();
        let record = invoice_record(s, change, source);
        Ok(vec![
            self.rt
                .codec
                .outbound(&self.invoices_topic, &s.debtor_id, &record, trace)
                .await?,
        ])
    }

    async fn issued(&self, e: InvoiceIssued, trace: TraceContext) -> Result<Vec<Outbound>, Failure> {
        let issued = Issued::of(e)?;
        let existing = self.load(&issued.tenant, &issued.incoming.invoice_id).await?;
        match self.revision_step(existing, &issued)? {
            Step::Save(stored, change) => {
                self.save(&stored).await?;
                self.publish(&stored.snapshot, change, issued.source(), trace).await
            }
            Step::Republish(stored) => {
                self.publish(&stored.snapshot, InvoiceChange::Issued, issued.source(), trace)
                    .await
            }
            Step::Ignore => Ok(Vec::new()),
        }
    }

    /// What an issued revision does to the snapshot held (`existing`).
    fn revision_step(&self, existing: Option<Stored>, issued: &Issued) -> Result<Step, Failure> {
        let incoming = issued.incoming.clone();
        let (tenant, debtor) = (&issued.tenant, &issued.debtor);
        match invoice::decide_revision(existing.as_ref().map(|s| &s.snapshot), incoming.revision) {
            RevisionDecision::New => Ok(Step::Save(
                Stored {
                    snapshot: incoming,
                    credit_notes: Vec::new(),
                },
                InvoiceChange::Issued,
            )),
            RevisionDecision::Newer => {
                let mut stored = existing.unwrap_or_else(|| unreachable!("Newer implies an existing snapshot"));
                if stored.snapshot.debtor_id != incoming.debtor_id {
                    return Err(Failure::Reject {
                        code: "debtor_mismatch",
                        detail: format!(
                            "revision {} of invoice '{}' names another debtor than earlier revisions",
                            incoming.revision, incoming.invoice_id
                        ),
                        tenant: Some(tenant.clone()),
                        debtor_id: Some(debtor.clone()),
                    });
                }
                stored.snapshot =
                    invoice::reissue(&stored.snapshot, incoming).map_err(|r| reject_for(tenant, debtor, r))?;
                Ok(Step::Save(stored, InvoiceChange::Reissued))
            }
            RevisionDecision::Duplicate => {
                self.changes.with_label_values(&["duplicate"]).inc();
                Ok(Step::Republish(existing.unwrap_or_else(|| {
                    unreachable!("Duplicate implies an existing snapshot")
                })))
            }
            RevisionDecision::Stale => {
                self.changes.with_label_values(&["stale"]).inc();
                tracing::info!("older revision than the one held; ignored");
                Ok(Step::Ignore)
            }
        }
    }

    async fn require(&self, tenant: &str, debtor_id: &str, invoice_id: &str) -> Result<Stored, Failure> {
        let stored = self.load(tenant, invoice_id).await?.ok_or_else(|| Failure::Reject {
            code: "unknown_invoice",
            detail: format!("invoice '{invoice_id}' has not been issued"),
            tenant: Some(tenant.to_owned()),
            debtor_id: Some(debtor_id.to_owned()),
        })?;
        if stored.snapshot.debtor_id != debtor_id {
            return Err(Failure::Reject {
                code: "debtor_mismatch",
                detail: format!("invoice '{invoice_id}' belongs to another debtor"),
                tenant: Some(tenant.to_owned()),
                debtor_id: Some(debtor_id.to_owned()),
            });
        }
        Ok(stored)
    }

    async fn credited(&self, e: InvoiceCredited, trace: TraceContext) -> Result<Vec<Outbound>, Failure> {
        let mut stored = self.require(&e.tenant, &e.debtor_id, &e.invoice_id).await?;
        if stored.credit_notes.contains(&e.credit_note_id) {
            self.changes.with_label_values(&["duplicate"]).inc();
        } else {
            let currency = e
                .currency
                .parse()
                .map_err(|err: forfall_domain::MoneyError| Failure::Reject {
                    code: "unknown_currency",
                    detail: format!("field 'currency': {err}"),
                    tenant: Some(e.tenant.clone()),
                    debtor_id: Some(e.debtor_id.clone()),
                })?;
            stored.snapshot = invoice::apply_credit(&stored.snapshot, Money::new(e.amount_minor, currency))
                .map_err(|r| reject_for(&e.tenant, &e.debtor_id, r))?;
            stored.credit_notes.push(e.credit_note_id.clone());
            self.save(&stored).await?;
        }
        self.publish(
            &stored.snapshot,
            InvoiceChange::Credited,
            Source {
                event_id: &e.event_id,
                occurred_at: e.occurred_at,
                credit_note_id: Some(&e.credit_note_id),
            },
            trace,
        )
        .await
    }

    async fn cancelled(&self, e: InvoiceCancelled, trace: TraceContext) -> Result<Vec<Outbound>, Failure> {
        let mut stored = self.require(&e.tenant, &e.debtor_id, &e.invoice_id).await?;
        if stored.snapshot.status != invoice::InvoiceStatus::Cancelled {
            stored.snapshot = invoice::apply_cancel(&stored.snapshot);
            self.save(&stored).await?;
        }
        self.publish(
            &stored.snapshot,
            InvoiceChange::Cancelled,
            Source {
                event_id: &e.event_id,
                occurred_at: e.occurred_at,
                credit_note_id: None,
            },
            trace,
        )
        .await
    }
}

impl Ingest {
    async fn handle_decoded(&self, decoded: Decoded, trace: TraceContext) -> Result<Vec<Outbound>, Failure> {
        match decoded.name.as_str() {
            InvoiceIssued::FULL_NAME => self.issued(decoded.to()?, trace).await,
            InvoiceCredited::FULL_NAME => self.credited(decoded.to()?, trace).await,
            InvoiceCancelled::FULL_NAME => self.cancelled(decoded.to()?, trace).await,
            other => Err(Failure::reject(
                "unexpected_record_type",
                format!(
                    "record type '{other}' is not an invoice event (expected InvoiceIssued, InvoiceCredited or InvoiceCancelled)"
                ),
            )),
        }
    }
}

impl Handler for Ingest {
    async fn handle(&self, record: &Inbound) -> Result<Vec<Outbound>, Failure> {
        self.state.ensure_ready().await?;
        let decoded = self.rt.codec.decode(record.payload.as_deref()).await?;
        self.handle_decoded(decoded, record.trace).await
    }

    async fn handle_batch(&self, records: &[Inbound]) -> Vec<Result<Vec<Outbound>, Failure>> {
        batch::handle(self, records).await
    }
}

/// What rebuilds ingest's state (see [`rebuild`]).
pub fn rebuilder(rt: &Runtime, redis: ConnectionManager) -> anyhow::Result<rebuild::IngestRebuild> {
    let settings: IngestSettings = config::section(&rt.figment, SERVICE)?;
    Ok(rebuild::IngestRebuild {
        kafka: rt.config.kafka.clone(),
        topic: rt.topic(&rt.config.topics.invoices),
        codec: rt.codec.clone(),
        redis,
        keys: StoredKeys::new(rt.keys()),
        retention: Retention {
            secs: settings.snapshot_retention_days * 86_400,
        },
    })
}

/// Runs ingest until shutdown.
pub async fn run(rt: Runtime) -> anyhow::Result<()> {
    let billing_topic = rt.topic(&rt.config.topics.billing_invoice_events);
    let shell = ServiceShell::start_with_routes(&rt, SERVICE, PORT_OFFSET, |metrics, producer, _| {
        http::routes(http::HttpState {
            rt: rt.clone(),
            billing_topic: billing_topic.clone(),
            producer: producer.clone(),
            metrics: metrics.clone(),
            tokens: forfall_platform::api_auth::TenantTokens::new(&rt.config.api, rt.config.profile),
        })
    })
    .await?;
    let changes = IntCounterVec::new(
        prometheus::Opts::new(
            "ingest_invoice_changes_total",
            "Invoice changes accepted, by kind (issued, reissued, credited, cancelled, duplicate, stale)",
        ),
        &["change"],
    )?;
    shell.metrics.registry.register(Box::new(changes.clone()))?;
    let redis = redis_store::connect(&rt.config.redis).await?;
    let rebuilder = rebuilder(&rt, redis.clone())?;
    let (keys, retention) = (rebuilder.keys.clone(), rebuilder.retention);
    let invoices_topic = rebuilder.topic.clone();
    let state = Arc::new(DerivedState::new(
        &rt.keys(),
        SERVICE,
        redis.clone(),
        shell.readiness.clone(),
        rebuilder,
    ));
    let watching = tokio::spawn(state.clone().watch(std::time::Duration::from_secs(1)));
    let ingest = Ingest {
        keys,
        retention,
        state,
        invoices_topic,
        rt: rt.clone(),
        redis,
        changes,
    };
    let settings: IngestSettings = config::section(&rt.figment, SERVICE)?;
    let mut loop_context = shell.loop_context(&rt);
    loop_context.key_concurrency = settings.concurrency.max(1);
    loop_context.batch = settings.batch.max(1);
    let consumer = shell.consumer(&rt, SERVICE, &[billing_topic])?;
    let consumed = run_consumer(consumer, ingest, loop_context).await;
    watching.abort();
    consumed?;
    shell.producer.flush(std::time::Duration::from_secs(5)).await;
    Ok(())
}
