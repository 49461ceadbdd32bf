//! The agency talks back: `POST /v1/agency/events` (on hand-off's admin port, behind the
//! ingress) takes the agency's word on a case it holds (accepted, rejected with a reason, in
//! collection, partly paid, paid, returned, closed), signed as Forfall signs what it sends
//! ([`forfall_platform::signing`], `handoff.agency_signing_secret`). Each event becomes a
//! `HandoffOutcome` on `forfall.handoff.outcomes.v1`, written (acknowledged) before the agency
//! hears 200; the same event again is the same record (its id derives from the agency's event
//! id). An unsigned or stale request is refused (401) and writes nothing; a body that does not
//! name a case Forfall sent (the case id is derived from tenant and invoice) is refused (422).
//!
//! The body: `{"event_id", "case_id", "tenant", "debtor_id", "invoice_id", "status",
//! "reason"?, "reference"?, "collected_minor"?, "currency"?}`.

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use forfall_platform::config::Secret;
use forfall_platform::kafka::Producer;
use forfall_platform::records::{HandoffOutcome, HandoffStatus, Regarding, derived_id};
use forfall_platform::service::Runtime;
use forfall_platform::signing;
use prometheus::IntCounterVec;
use serde::Deserialize;
use tracing::Instrument;

#[derive(Clone)]
pub(crate) struct AgencyEvents {
    pub(crate) rt: Runtime,
    pub(crate) producer: Producer,
    pub(crate) secret: Option<Secret>,
    /// Debitura's webhook secret (base64), when hand-off goes through Debitura.
    pub(crate) debitura_secret: Option<Secret>,
    pub(crate) topic: String,
    /// Agency events, by result: applied, unsigned, invalid, unavailable, off.
    pub(crate) results: IntCounterVec,
    /// Where a merged case's invoices are remembered (see [`crate::Handoff::remember_case`]).
    pub(crate) redis: redis::aio::ConnectionManager,
    pub(crate) keys: forfall_platform::redis_store::Keys,
}

pub(crate) fn routes(events: AgencyEvents) -> Router {
    Router::new()
        .route("/v1/agency/events", axum::routing::post(post_event))
        .route("/v1/agency/debitura", axum::routing::post(post_debitura))
        .with_state(events)
}

#[derive(Debug, Deserialize)]
struct AgencyEvent {
    event_id: String,
    case_id: String,
    tenant: String,
    debtor_id: String,
    invoice_id: String,
    status: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    reference: Option<String>,
    #[serde(default)]
    collected_minor: Option<i64>,
    #[serde(default)]
    currency: Option<String>,
}

/// What is wrong with an event that is signed but cannot be taken, in words for the agency.
fn outcome_of(e: AgencyEvent, now_ms: i64) -> Result<HandoffOutcome, String> {
    let status = HandoffStatus::parse_agency(&e.status).ok_or_else(|| {
        format!(
            "status '{}' is not one of accepted, rejected, in_collection, partly_paid, paid, returned, closed",
            e.status
        )
    })?;
    if e.event_id.trim().is_empty() {
        return Err("event_id is empty".into());
    }
    if e.case_id != derived_id("case", &[&e.tenant, &e.invoice_id]) {
        return Err(format!(
            "case_id '{}' is not the case Forfall sent for invoice '{}' of '{}'",
            e.case_id, e.invoice_id, e.tenant
        ));
    }
    if status == HandoffStatus::Rejected && e.reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
        return Err("a rejection needs its reason".into());
    }
    let collected = matches!(status, HandoffStatus::PartlyPaid | HandoffStatus::Paid);
    match (collected, e.collected_minor, e.currency.as_deref()) {
        (true, Some(minor), Some(c)) if minor > 0 && c.len() == 3 => {}
        (true, _, _) => return Err(format!("{}: collected_minor (> 0) and currency are needed", e.status)),
        (false, None, _) => {}
        (false, Some(_), _) => {
            return Err(format!(
                "{}: collected_minor is only for partly_paid and paid",
                e.status
            ));
        }
    }
    Ok(HandoffOutcome {
        event_id: derived_id("agency-event", &[&e.tenant, &e.case_id, &e.event_id]),
        tenant: e.tenant,
        debtor_id: e.debtor_id,
        occurred_at: now_ms,
        case_id: e.case_id,
        invoice_id: e.invoice_id,
        status,
        agency_reference: e.reference,
        http_status: None,
        detail: e.reason,
        collected_minor: e.collected_minor,
        currency: e.currency,
        regarding: Some(Regarding::Agency.code().to_owned()),
        invoice_ids: Vec::new(),
    })
}

async fn post_event(State(events): State<AgencyEvents>, headers: HeaderMap, body: Bytes) -> Response {
    let span = tracing::info_span!("agency_event");
    async move {
        let (status, result, detail) = events.take(&headers, &body).await;
        events.results.with_label_values(&[result]).inc();
        tracing::info!(result, "agency event answered");
        (status, detail).into_response()
    }
    .instrument(span)
    .await
}

async fn post_debitura(State(events): State<AgencyEvents>, headers: HeaderMap, body: Bytes) -> Response {
    let span = tracing::info_span!("debitura_event");
    async move {
        let (status, result, detail) = events.take_debitura(&headers, &body).await;
        events.results.with_label_values(&[result]).inc();
        tracing::info!(result, "Debitura event answered");
        (status, detail).into_response()
    }
    .instrument(span)
    .await
}

impl AgencyEvents {
    /// Debitura's webhook: signed with its secret, naming its case by Debitura's id (which
    /// hand-off remembered when Debitura took the case).
    async fn take_debitura(&self, headers: &HeaderMap, body: &[u8]) -> (StatusCode, &'static str, String) {
        let Some(secret) = self.debitura_secret.as_ref().filter(|s| !s.expose().is_empty()) else {
            return (
                StatusCode::NOT_FOUND,
                "off",
                "Debitura events are off: set handoff.debitura.webhook_secret\n".into(),
            );
        };
        let signature = headers
            .get("x-debitura-signature")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !crate::debitura::signed(secret.expose(), signature, body, chrono::Utc::now().timestamp()) {
            return (
                StatusCode::UNAUTHORIZED,
                "unsigned",
                "a valid X-Debitura-Signature is needed\n".into(),
            );
        }
        let event: crate::debitura::WebhookEvent = match serde_json::from_slice(body) {
            Ok(e) => e,
            Err(e) => return (StatusCode::UNPROCESSABLE_ENTITY, "invalid", format!("{e}\n")),
        };
        let Some(debitura_id) = event.data["caseId"].as_str().map(str::to_owned) else {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                "data.caseId is missing\n".into(),
            );
        };
        let known: Result<Option<String>, redis::RedisError> = redis::cmd("GET")
            .arg(crate::debitura::case_key(&self.keys, &debitura_id))
            .query_async(&mut self.redis.clone())
            .await;
        let case = match known {
            Ok(Some(json)) => match serde_json::from_str::<crate::debitura::CaseRef>(&json) {
                Ok(case) => case,
                Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, "invalid", format!("{e}\n")),
            },
            Ok(None) => {
                return (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid",
                    format!("case {debitura_id} is not one Forfall handed over (or is no longer remembered)\n"),
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot look up Debitura's case now; it will send it again");
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "try again later\n".into(),
                );
            }
        };
        match crate::debitura::outcome_of(&event, &case, self.rt.clock.now().timestamp_millis()) {
            Ok(Some(outcome)) => self.record(outcome).await,
            Ok(None) => (StatusCode::OK, "ignored", "nothing to record\n".into()),
            Err(why) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid", format!("{why}\n")),
        }
    }

    async fn take(&self, headers: &HeaderMap, body: &[u8]) -> (StatusCode, &'static str, String) {
        let Some(secret) = self.secret.as_ref().filter(|s| !s.expose().is_empty()) else {
            return (
                StatusCode::NOT_FOUND,
                "off",
                "agency events are off: set handoff.agency_signing_secret\n".into(),
            );
        };
        let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default();
        // Real time: the agency signs with its own clock, not the journeys' simulated one.
        let now = chrono::Utc::now().timestamp();
        if !signing::verify(
            secret.expose(),
            h(signing::TIMESTAMP_HEADER),
            h(signing::SIGNATURE_HEADER),
            body,
            now,
        ) {
            return (
                StatusCode::UNAUTHORIZED,
                "unsigned",
                "a valid signature is needed\n".into(),
            );
        }
        let event: AgencyEvent = match serde_json::from_slice(body) {
            Ok(e) => e,
            Err(e) => return (StatusCode::UNPROCESSABLE_ENTITY, "invalid", format!("{e}\n")),
        };
        let outcome = match outcome_of(event, self.rt.clock.now().timestamp_millis()) {
            Ok(o) => o,
            Err(why) => return (StatusCode::UNPROCESSABLE_ENTITY, "invalid", format!("{why}\n")),
        };
        self.record(outcome).await
    }

    /// Writes the outcome (acknowledged) before the agency hears 200.
    async fn record(&self, mut outcome: HandoffOutcome) -> (StatusCode, &'static str, String) {
        let sent = async {
            // A merged case: the agency's word is on every claim in it.
            outcome.invoice_ids = crate::case_invoices(&mut self.redis.clone(), &self.keys, &outcome.case_id).await?;
            let out = self
                .rt
                .codec
                .outbound(
                    &self.topic,
                    &outcome.debtor_id,
                    &outcome,
                    forfall_platform::telemetry::TraceContext::new_root(),
                )
                .await?;
            self.producer
                .send_all(std::slice::from_ref(&out))
                .await
                .map_err(|e| forfall_platform::kafka::Failure::Transient(anyhow::anyhow!(e)))
        };
        match sent.await {
            Ok(()) => (StatusCode::OK, "applied", "recorded\n".into()),
            Err(e) => {
                tracing::warn!(error = ?e, "cannot record the agency's event now; it will send it again");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "try again later\n".into(),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(status: &str) -> AgencyEvent {
        AgencyEvent {
            event_id: "ag-1".into(),
            case_id: derived_id("case", &["nordkraft", "no-1"]),
            tenant: "nordkraft".into(),
            debtor_id: "nordkraft:kari".into(),
            invoice_id: "no-1".into(),
            status: status.into(),
            reason: None,
            reference: Some("NI-7".into()),
            collected_minor: None,
            currency: None,
        }
    }

    #[test]
    fn each_status_is_checked_for_what_it_needs() {
        assert_eq!(
            outcome_of(event("in_collection"), 1).unwrap().status,
            HandoffStatus::InCollection
        );
        assert!(outcome_of(event("rejected"), 1).unwrap_err().contains("reason"));
        let rejected = AgencyEvent {
            reason: Some("the debtor is deceased".into()),
            ..event("rejected")
        };
        assert_eq!(
            outcome_of(rejected, 1).unwrap().detail.as_deref(),
            Some("the debtor is deceased")
        );
        assert!(outcome_of(event("paid"), 1).unwrap_err().contains("collected_minor"));
        let paid = AgencyEvent {
            collected_minor: Some(94_848),
            currency: Some("NOK".into()),
            ..event("paid")
        };
        let paid = outcome_of(paid, 1).unwrap();
        assert_eq!((paid.status, paid.collected_minor), (HandoffStatus::Paid, Some(94_848)));
        assert!(outcome_of(event("lost"), 1).unwrap_err().contains("'lost'"));
        let other_case = AgencyEvent {
            invoice_id: "no-2".into(),
            ..event("closed")
        };
        assert!(
            outcome_of(other_case, 1)
                .unwrap_err()
                .contains("not the case Forfall sent")
        );
        assert_eq!(
            outcome_of(event("closed"), 1).unwrap().event_id,
            outcome_of(event("closed"), 2).unwrap().event_id,
            "the same event again is the same record"
        );
    }
}
