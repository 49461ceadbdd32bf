//! `POST /providers/vipps/<tenant>`: the Vipps MobilePay webhooks API telling of a payment's
//! state. A request not signed with the tenant's webhook secret is refused (401) and changes
//! nothing. An authorized or captured payment is finished (captured, and written as a payment
//! received); an aborted, expired, cancelled or terminated one is counted and changes nothing.
//! Anything the portal cannot do now (Redis, the broker or the provider away) answers 503, so
//! that the webhooks API sends the event again.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use crate::Portal;
use crate::vipps::{WebhookEvent, verify_webhook};

pub(crate) async fn vipps_webhook(
    State(portal): State<Portal>,
    Path(tenant): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let span = tracing::info_span!("provider_webhook", provider = "vipps", tenant = %tenant);
    async move {
        let (status, result) = portal.take_vipps_event(&tenant, &uri, &headers, &body).await;
        portal.0.metrics.webhooks.with_label_values(&["vipps", result]).inc();
        tracing::info!(result, "webhook answered");
        status.into_response()
    }
    .instrument(span)
    .await
}

impl Portal {
    async fn take_vipps_event(
        &self,
        tenant: &str,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
    ) -> (StatusCode, &'static str) {
        let Some(merchant) = self.0.settings.vipps.get(tenant) else {
            return (StatusCode::NOT_FOUND, "unknown_tenant");
        };
        let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let path_and_query = uri.path_and_query().map(|p| p.as_str()).unwrap_or_else(|| uri.path());
        if merchant.webhook_secret.is_empty()
            || !verify_webhook(
                &merchant.webhook_secret,
                path_and_query,
                h(header::HOST.as_str()),
                h("x-ms-date"),
                h("x-ms-content-sha256"),
                h(header::AUTHORIZATION.as_str()),
                body,
            )
        {
            return (StatusCode::UNAUTHORIZED, "unsigned");
        }
        let event: WebhookEvent = match serde_json::from_slice(body) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "a signed webhook that is not an ePayment event");
                return (StatusCode::BAD_REQUEST, "unreadable");
            }
        };
        if event.msn != merchant.merchant_serial_number {
            return (StatusCode::BAD_REQUEST, "other_merchant");
        }
        let span = tracing::info_span!("payment", reference = %event.reference, event = %event.name);
        async move {
            match event.name.as_str() {
                "AUTHORIZED" | "CAPTURED" => {}
                "ABORTED" | "EXPIRED" | "CANCELLED" | "TERMINATED" => return (StatusCode::OK, "abandoned"),
                _ => return (StatusCode::OK, "noted"),
            }
            let attempt = match self.attempt(&event.reference).await {
                Ok(Some(a)) if a.tenant == tenant => a,
                Ok(_) => {
                    tracing::warn!("a payment the portal did not start; left alone");
                    return (StatusCode::OK, "not_ours");
                }
                Err(e) => {
                    tracing::warn!(error = ?e, "cannot read the payment now; the provider will send it again");
                    return (StatusCode::SERVICE_UNAVAILABLE, "unavailable");
                }
            };
            match self.finish(&attempt).await {
                Ok(state) if state.captured_minor > 0 => (StatusCode::OK, "completed"),
                Ok(_) => (StatusCode::OK, "noted"),
                Err(e) => {
                    tracing::warn!(error = ?e, "cannot finish the payment now; the provider will send it again");
                    (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
                }
            }
        }
        .instrument(span)
        .await
    }
}
