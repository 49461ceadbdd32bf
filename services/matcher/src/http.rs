//! The matcher's HTTP API, next to its metrics:
//! - `POST /v1/payments/camt054?tenant=T[&lenient=true]`: a bank's camt.054 file; its credit
//!   entries become payment events. A file with any invalid entry imports nothing unless
//!   `lenient=true`; the answer lists every problem with its line and element.
//! - `GET /v1/payments/unmatched?tenant=T`: the payments no rule could match.
//! - `POST /v1/payments/{payment_id}/match`: `{"tenant", "invoices": [...], "by"}` matches one by
//!   hand, in the order given, recording who did it. 200 with the allocations as booked (the
//!   amounts follow what the invoices owe at booking); 202 when it is booked but its events are
//!   not acknowledged yet (they are sent again until they are); 409 with the reason when it is
//!   refused (already matched, matched by someone else meanwhile, an invoice with nothing open
//!   any more, ...), in which case nothing was booked and no event went out.
//!
//! Each acts for the tenant of the caller's bearer token ([`forfall_platform::api_auth`]); a
//! `tenant` the request names must be that one (403 otherwise), and may be left out.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use forfall_domain::invoice::epoch_days;
use forfall_domain::matching::MatchDecision;
use forfall_platform::api_auth::Refusal;
use forfall_platform::kafka::Outbound;
use forfall_platform::records::{PaymentReceived, derived_id};
use forfall_platform::telemetry::TraceContext;
use serde::Deserialize;
use serde_json::json;

use crate::{ManualError, Matcher};

pub fn routes(m: Matcher) -> Router {
    Router::new()
        .route("/v1/payments/camt054", post(import_camt054))
        .route("/v1/payments/unmatched", get(list_unmatched))
        .route("/v1/payments/{payment_id}/match", post(match_by_hand))
        .with_state(m)
}

/// The tenant the request acts for, or the answer refusing it.
fn tenant_of(m: &Matcher, headers: &HeaderMap, named: Option<&str>) -> Result<String, Refusal> {
    m.0.tokens.tenant(headers, named)
}

fn problem(status: StatusCode, code: &str, detail: impl Into<String>) -> Response {
    (status, Json(json!({"error": code, "detail": detail.into()}))).into_response()
}

#[derive(Deserialize)]
struct ImportQuery {
    tenant: Option<String>,
    #[serde(default)]
    lenient: bool,
}

async fn import_camt054(
    State(m): State<Matcher>,
    headers: HeaderMap,
    Query(q): Query<ImportQuery>,
    body: Bytes,
) -> Response {
    let tenant = match tenant_of(&m, &headers, q.tenant.as_deref()) {
        Ok(tenant) => tenant,
        Err(refused) => return refused.into_response(),
    };
    let parsed = if q.lenient {
        forfall_camt054::parse_bytes_lenient(&body)
    } else {
        forfall_camt054::parse_bytes(&body).map(|i| (i, Vec::new()))
    };
    let (import, problems) = match parsed {
        Ok(p) => p,
        Err(forfall_camt054::CamtError::Invalid(problems)) => {
            let listed: Vec<String> = problems.iter().map(ToString::to_string).collect();
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({"error": "invalid_camt054", "detail": "the file was refused as a whole; nothing was imported", "problems": listed})),
            )
                .into_response();
        }
        Err(e) => return problem(StatusCode::UNPROCESSABLE_ENTITY, "not_camt054", e.to_string()),
    };
    let topic = m.0.rt.topic(&m.0.rt.config.topics.payments);
    let now = m.0.rt.clock.now().timestamp_millis();
    let mut outs = Vec::new();
    let mut already_known = 0;
    for p in &import.payments {
        match m.decided(&tenant, &p.transaction_id).await {
            Ok(Some(_)) => already_known += 1,
            Ok(None) => {}
            Err(e) => return problem(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("{e:?}")),
        }
        let record = PaymentReceived {
            event_id: derived_id("camt054", &[&tenant, &p.transaction_id]),
            tenant: tenant.clone(),
            debtor_id: None,
            occurred_at: now,
            payment_id: p.transaction_id.clone(),
            amount_minor: p.amount.minor,
            currency: p.amount.currency.code().to_owned(),
            reference: p.reference.clone(),
            remittance_text: p.remittance_text.clone(),
            payer_name: p.payer_name.clone(),
            payer_account: p.payer_account.clone(),
            booking_date: epoch_days(p.booking_date),
            value_date: epoch_days(p.value_date),
        };
        match m.0.rt.codec.encode(&topic, &record).await {
            Ok(payload) => outs.push(Outbound {
                topic: topic.clone(),
                key: tenant.clone(),
                payload,
                trace: TraceContext::new_root(),
                partition: None,
            }),
            Err(e) => return problem(StatusCode::SERVICE_UNAVAILABLE, "registry_unavailable", e.to_string()),
        }
    }
    if let Err(e) = m.0.producer.send_all(&outs).await {
        return problem(StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable", e.to_string());
    }
    let listed: Vec<String> = problems.iter().map(ToString::to_string).collect();
    Json(json!({
        "message_id": import.message_id,
        "version": import.version,
        "imported": import.payments.len(),
        "already_known": already_known,
        "skipped_debits": import.skipped_debits,
        "skipped_reversals": import.skipped_reversals,
        "skipped_unbooked": import.skipped_unbooked,
        "problems": listed,
    }))
    .into_response()
}

#[derive(Deserialize)]
struct TenantQuery {
    tenant: Option<String>,
}

async fn list_unmatched(State(m): State<Matcher>, headers: HeaderMap, Query(q): Query<TenantQuery>) -> Response {
    let tenant = match tenant_of(&m, &headers, q.tenant.as_deref()) {
        Ok(tenant) => tenant,
        Err(refused) => return refused.into_response(),
    };
    match m.unmatched(&tenant).await {
        Ok(payments) => {
            let rows: Vec<serde_json::Value> = payments
                .iter()
                .map(|p| {
                    json!({
                        "payment_id": p.payment_id, "amount_minor": p.amount_minor, "currency": p.currency,
                        "reference": p.reference, "remittance_text": p.remittance_text, "payer_name": p.payer_name,
                        "payer_account": p.payer_account, "value_date": forfall_domain::invoice::date_from_epoch_days(p.value_date),
                    })
                })
                .collect();
            Json(json!({"tenant": tenant, "unmatched": rows})).into_response()
        }
        Err(e) => problem(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("{e:?}")),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MatchBody {
    #[serde(default)]
    tenant: Option<String>,
    invoices: Vec<String>,
    by: String,
}

async fn match_by_hand(
    State(m): State<Matcher>,
    headers: HeaderMap,
    Path(payment_id): Path<String>,
    body: Bytes,
) -> Response {
    let caller = match m.0.tokens.caller(&headers) {
        Ok(caller) => caller,
        Err(refusal) => return refusal.into_response(),
    };
    let body: MatchBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_json", e.to_string()),
    };
    let tenant = match caller.tenant(body.tenant.as_deref()) {
        Ok(tenant) => tenant,
        Err(refusal) => return refusal.into_response(),
    };
    if body.by.trim().is_empty() {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "missing_by",
            "say who matches the payment: field 'by' is empty",
        );
    }
    match m.match_by_hand(&tenant, &payment_id, &body.invoices, &body.by).await {
        Ok((d, events_pending)) => {
            let allocations: Vec<serde_json::Value> = match &d.decision {
                MatchDecision::Matched { allocations, .. } => allocations
                    .iter()
                    .map(|a| json!({"invoice_id": a.invoice_id, "amount_minor": a.amount.minor}))
                    .collect(),
                MatchDecision::Unmatched { .. } => Vec::new(),
            };
            let overpayment = match &d.decision {
                MatchDecision::Matched { overpayment, .. } => overpayment.minor,
                MatchDecision::Unmatched { .. } => 0,
            };
            let mut answer = json!({"payment_id": payment_id, "matched_by": body.by, "allocations": allocations, "overpayment_minor": overpayment});
            match events_pending {
                None => Json(answer).into_response(),
                Some(why) => {
                    answer["events"] = json!("pending");
                    answer["detail"] = json!(format!(
                        "the match is booked; its events are not acknowledged yet and are sent again until they are: {why}"
                    ));
                    (StatusCode::ACCEPTED, Json(answer)).into_response()
                }
            }
        }
        Err(ManualError::NotFound(d)) => problem(StatusCode::NOT_FOUND, "not_found", d),
        Err(ManualError::Refused(d)) => problem(StatusCode::CONFLICT, "refused", d),
        Err(ManualError::Unavailable(d)) => problem(StatusCode::SERVICE_UNAVAILABLE, "unavailable", d),
    }
}
