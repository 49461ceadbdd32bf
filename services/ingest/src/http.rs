//! `POST /v1/invoices`: billing systems without Kafka post invoices as JSON. A valid invoice is
//! published to the billing topic (so both paths share de-duplication and normalisation) and
//! answered 202 once the broker has it; an invalid one is answered 422 with the reason and,
//! like any rejected input, recorded on the rejected topic and counted. The tenant is the one of
//! the caller's token ([`forfall_platform::api_auth`]): an invoice naming another is refused
//! (403) before anything is recorded.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use forfall_domain::invoice;
use forfall_platform::kafka::{Outbound, ProduceError, Producer, RAW_BYTES_KEPT};
use forfall_platform::metrics::Metrics;
use forfall_platform::records::{InvoiceIssued, Rejected, new_event_id};
use forfall_platform::service::Runtime;
use forfall_platform::telemetry::TraceContext;
use serde::Deserialize;
use serde_json::json;

#[derive(Clone)]
pub struct HttpState {
    pub rt: Runtime,
    pub billing_topic: String,
    pub producer: Producer,
    pub metrics: Metrics,
    pub tokens: forfall_platform::api_auth::TenantTokens,
}

pub fn routes(state: HttpState) -> Router {
    Router::new()
        .route("/v1/invoices", post(post_invoice))
        .with_state(state)
}

/// The JSON form of an issued invoice. Dates are ISO 8601 (`2026-03-15`); `event_id` and
/// `occurred_at` are filled in when absent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvoiceJson {
    pub event_id: Option<String>,
    /// The token's tenant when absent; when given, it must be the token's.
    #[serde(default)]
    pub tenant: Option<String>,
    pub debtor_id: String,
    pub invoice_id: String,
    #[serde(default)]
    pub revision: i32,
    pub invoice_number: String,
    pub issue_date: chrono::NaiveDate,
    pub due_date: chrono::NaiveDate,
    pub amount_minor: i64,
    pub currency: String,
    pub jurisdiction: String,
    pub debtor_kind: String,
    pub payment_reference: Option<String>,
    pub description: Option<String>,
    pub debtor_name: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub language: Option<String>,
    #[serde(default)]
    pub preferred_channels: Vec<String>,
    #[serde(default)]
    pub declined_channels: Vec<String>,
    /// Address, national or company id (see `schemas/InvoiceIssued.avsc`).
    #[serde(default)]
    pub debtor_details: Option<forfall_platform::records::DebtorDetails>,
    #[serde(default)]
    pub reminder_fee_agreed: Option<bool>,
}

fn problem(status: StatusCode, code: &str, detail: &str) -> Response {
    (status, Json(json!({"error": code, "detail": detail}))).into_response()
}

async fn post_invoice(
    State(state): State<HttpState>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let (producer, metrics) = (&state.producer, &state.metrics);
    // Who calls, before anything of the body is read or recorded.
    let caller = match state.tokens.caller(&headers) {
        Ok(caller) => caller,
        Err(refusal) => return refusal.into_response(),
    };
    let trace = TraceContext::new_root();
    let parsed = match serde_json::from_slice::<InvoiceJson>(&body) {
        Ok(j) => match caller.tenant(j.tenant.as_deref()) {
            Ok(tenant) => Ok((tenant, j)),
            Err(refusal) => return refusal.into_response(),
        },
        Err(e) => Err(e),
    };
    let issued = parsed
        .map_err(|e| ("invalid_json", e.to_string()))
        .and_then(|(tenant, j)| {
            let issued = InvoiceIssued {
                event_id: j.event_id.unwrap_or_else(new_event_id),
                tenant,
                debtor_id: j.debtor_id,
                occurred_at: state.rt.clock.now().timestamp_millis(),
                invoice_id: j.invoice_id,
                revision: j.revision,
                invoice_number: j.invoice_number,
                issue_date: invoice::epoch_days(j.issue_date),
                due_date: invoice::epoch_days(j.due_date),
                amount_minor: j.amount_minor,
                currency: j.currency,
                jurisdiction: j.jurisdiction,
                debtor_kind: j.debtor_kind,
                payment_reference: j.payment_reference,
                description: j.description,
                debtor_name: j.debtor_name,
                email: j.email,
                phone: j.phone,
                language: j.language,
                preferred_channels: j.preferred_channels,
                declined_channels: j.declined_channels,
                debtor_details: j.debtor_details,
                reminder_fee_agreed: j.reminder_fee_agreed,
            };
            // Validate now, so the caller hears what is wrong; the consumer validates again.
            invoice::validate_issued(crate::to_input(issued.clone())).map_err(|r| (r.code, r.detail))?;
            Ok(issued)
        });
    match issued {
        Ok(issued) => {
            let payload = match state.rt.codec.encode(&state.billing_topic, &issued).await {
                Ok(p) => p,
                Err(e) => {
                    return problem(StatusCode::SERVICE_UNAVAILABLE, "registry_unavailable", &e.to_string());
                }
            };
            let out = Outbound {
                topic: state.billing_topic.clone(),
                key: issued.debtor_id.clone(),
                payload,
                trace,
                partition: None,
            };
            match producer.send_all(std::slice::from_ref(&out)).await {
                Ok(()) => (
                    StatusCode::ACCEPTED,
                    Json(json!({"event_id": issued.event_id, "trace_id": trace.trace_id_hex()})),
                )
                    .into_response(),
                Err(e @ ProduceError::TooLarge { .. }) => {
                    problem(StatusCode::PAYLOAD_TOO_LARGE, "too_large", &e.to_string())
                }
                Err(e) => problem(StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable", &e.to_string()),
            }
        }
        Err((code, detail)) => {
            metrics.rejected.with_label_values(&[code]).inc();
            metrics
                .messages
                .with_label_values(&["http:/v1/invoices", "rejected"])
                .inc();
            let rejected = Rejected {
                event_id: new_event_id(),
                tenant: None,
                debtor_id: None,
                occurred_at: state.rt.clock.now().timestamp_millis(),
                service: crate::SERVICE.to_owned(),
                source_topic: "http:/v1/invoices".to_owned(),
                source_partition: -1,
                source_offset: -1,
                reason_code: code.to_owned(),
                detail: detail.clone(),
                raw_key: None,
                // Enough to see what it was; never so much that the rejection is too large.
                raw_value: Some(body[..body.len().min(RAW_BYTES_KEPT)].to_vec()),
            };
            let rejected_topic = state.rt.topic(&state.rt.config.topics.rejected);
            match state.rt.codec.encode(&rejected_topic, &rejected).await {
                Ok(payload) => {
                    let out = Outbound {
                        topic: rejected_topic,
                        key: String::new(),
                        payload,
                        trace,
                        partition: None,
                    };
                    if let Err(e) = producer.send_all(std::slice::from_ref(&out)).await {
                        tracing::error!(error = %e, "could not record an HTTP rejection");
                    }
                }
                Err(e) => tracing::error!(error = %e, "could not encode an HTTP rejection"),
            }
            problem(StatusCode::UNPROCESSABLE_ENTITY, code, &detail)
        }
    }
}
