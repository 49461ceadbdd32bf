//! The agency's word on a case (hand-off's `HandoffOutcome`s: its delivery, its reports of
//! payments, the agency's webhook) applied to the invoice's journey, by the rules in
//! [`forfall_domain::agency`]: a case refused, given back or closed unpaid waits for a person,
//! one collected closes the invoice, the rest goes on the timeline.

use forfall_domain::Money;
use forfall_domain::agency::{self, AgencyNews};
use forfall_platform::kafka::Failure;
use forfall_platform::records::{HandoffOutcome, HandoffStatus, Regarding};
use forfall_platform::telemetry::TraceContext;

use crate::Watcher;

/// The outcome in the journey's terms.
pub(crate) fn news_of(o: &HandoffOutcome) -> Result<AgencyNews, Failure> {
    let collected = match (o.collected_minor, o.currency.as_deref()) {
        (Some(minor), Some(code)) => Some(Money::new(
            minor,
            code.parse().map_err(|e| {
                Failure::reject(
                    "unknown_currency",
                    format!("field 'currency' of outcome '{}': {e}", o.event_id),
                )
            })?,
        )),
        _ => None,
    };
    let reason = || {
        o.detail
            .clone()
            .filter(|d| !d.trim().is_empty())
            .or_else(|| o.http_status.map(|s| format!("HTTP {s}")))
            .unwrap_or_else(|| "no reason given".to_owned())
    };
    Ok(match (o.regarding(), o.status) {
        (Regarding::Recall | Regarding::PaymentOnCase, HandoffStatus::Accepted) => AgencyNews::PaymentReported {
            recalled: o.regarding() == Regarding::Recall,
        },
        (Regarding::Recall | Regarding::PaymentOnCase, _) => AgencyNews::PaymentReportRefused { reason: reason() },
        (_, HandoffStatus::Accepted) => AgencyNews::CaseAccepted {
            reference: o.agency_reference.clone(),
        },
        (_, HandoffStatus::Rejected | HandoffStatus::Failed) => AgencyNews::CaseRejected { reason: reason() },
        (_, HandoffStatus::InCollection) => AgencyNews::InCollection,
        (_, HandoffStatus::PartlyPaid) => AgencyNews::PartlyPaid { collected },
        (_, HandoffStatus::Paid) => AgencyNews::Paid { collected },
        (_, HandoffStatus::Returned) => AgencyNews::Returned {
            reason: o.detail.clone(),
        },
        (_, HandoffStatus::Closed) => AgencyNews::Closed {
            reason: o.detail.clone(),
        },
    })
}

impl Watcher {
    /// Applies one outcome to its invoice's journey: the state change written like a payment's
    /// (events first, then the journey, compare-and-set), a timeline entry alone otherwise. The
    /// events' ids derive from the outcome's, so a redelivered outcome adds nothing.
    pub(crate) async fn on_handoff_outcome(
        &self,
        rec: HandoffOutcome,
        partition: i32,
        trace: TraceContext,
    ) -> Result<(), Failure> {
        let news = news_of(&rec)?;
        // A merged case: its news is every claim's in it.
        let invoices = if rec.invoice_ids.is_empty() {
            vec![rec.invoice_id.clone()]
        } else {
            rec.invoice_ids.clone()
        };
        for invoice_id in &invoices {
            self.apply_news(&rec, invoice_id, &news, partition, trace).await?;
        }
        Ok(())
    }

    async fn apply_news(
        &self,
        rec: &HandoffOutcome,
        invoice_id: &str,
        news: &AgencyNews,
        partition: i32,
        trace: TraceContext,
    ) -> Result<(), Failure> {
        let cause = format!("agency:{}", rec.event_id);
        let _guard = self.stripe(&rec.tenant, invoice_id).lock().await;
        loop {
            let Some(loaded) = self.load(partition, &rec.tenant, invoice_id).await? else {
                // Removed after its retention: nothing left to apply it to.
                tracing::info!(case = %rec.case_id, "outcome for a journey no longer kept");
                return Ok(());
            };
            let d = agency::on_agency_news(loaded.stored.journey.clone(), news);
            if self.record(&loaded, &d, &cause, trace).await? {
                let kind = d.transitions.first().map_or("agency", |t| t.kind);
                tracing::info!(case = %rec.case_id, kind, state = %d.journey.state.label(), "agency outcome applied");
                return Ok(());
            }
        }
    }
}
