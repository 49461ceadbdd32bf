//! Providers telling of a payment's state: `POST /providers/vipps/<tenant>` (the Vipps
//! MobilePay webhooks API), `POST /providers/stripe/<tenant>` (a Stripe webhook endpoint) and
//! `POST /providers/swish/<tenant>` (Swish's callback, behind an HTTPS ingress).
//! A request not signed with the tenant's secret (for Swish: without the payment's own
//! `callbackIdentifier`) is refused (401) and changes nothing. Whatever a request says, the
//! payment's state is then asked of the provider itself. A
//! payment that may have the money is finished (see [`crate::payments`]); an abandoned one is
//! counted and changes nothing. Anything the portal cannot do now (Redis, the broker or the
//! provider away) answers 503, so that the provider sends the event again.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use crate::Portal;
use crate::payments::{Attempt, Finished};
use crate::stripe::{Session, verify_signature};
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
            let attempt = match self.attempt_started_here(&event.reference, tenant, "vipps").await {
                Ok(a) => a,
                Err(answer) => return answer,
            };
            self.finish_from_webhook(&attempt, None).await
        }
        .instrument(span)
        .await
    }

    /// The payment a provider's request is about, if this portal started it for that tenant
    /// and provider; otherwise the answer to give (200 "not ours", so the provider stops, or 503
    /// while it cannot be read, so it sends the request again).
    async fn attempt_started_here(
        &self,
        reference: &str,
        tenant: &str,
        provider: &str,
    ) -> Result<Attempt, (StatusCode, &'static str)> {
        match self.attempt(reference).await {
            Ok(Some(a)) if a.tenant == tenant && a.provider == provider => Ok(a),
            Ok(_) => {
                tracing::warn!("a payment the portal did not start; left alone");
                Err((StatusCode::OK, "not_ours"))
            }
            Err(e) => {
                tracing::warn!(error = ?e, "cannot read the payment now; the provider will send it again");
                Err((StatusCode::SERVICE_UNAVAILABLE, "unavailable"))
            }
        }
    }

    async fn finish_from_webhook(&self, attempt: &Attempt, session: Option<&str>) -> (StatusCode, &'static str) {
        match self.finish(attempt, session).await {
            Ok(Finished::Taken(_)) => (StatusCode::OK, "completed"),
            Ok(_) => (StatusCode::OK, "noted"),
            Err(e) => {
                tracing::warn!(error = ?e, "cannot finish the payment now; the provider will send it again");
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
        }
    }

    async fn take_stripe_event(&self, tenant: &str, headers: &HeaderMap, body: &[u8]) -> (StatusCode, &'static str) {
        let Some(account) = self.0.settings.stripe.get(tenant) else {
            return (StatusCode::NOT_FOUND, "unknown_tenant");
        };
        let signature = headers
            .get("stripe-signature")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        // Freshness is of the delivery, in real time, whatever clock the journeys run on.
        if account.webhook_secret.is_empty()
            || !verify_signature(&account.webhook_secret, signature, body, chrono::Utc::now().timestamp())
        {
            return (StatusCode::UNAUTHORIZED, "unsigned");
        }
        let event: serde_json::Value = match serde_json::from_slice(body) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "a signed webhook that is not JSON");
                return (StatusCode::BAD_REQUEST, "unreadable");
            }
        };
        let kind = event["type"].as_str().unwrap_or_default().to_owned();
        let session = Session::from_json(&event["data"]["object"]);
        let span = tracing::info_span!("payment", event = %kind);
        async move {
            match kind.as_str() {
                "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {}
                "checkout.session.expired" | "checkout.session.async_payment_failed" => {
                    return (StatusCode::OK, "abandoned");
                }
                _ => return (StatusCode::OK, "noted"),
            }
            let Some(reference) = session.client_reference_id.clone() else {
                return (StatusCode::OK, "not_ours");
            };
            let attempt = match self.attempt_started_here(&reference, tenant, "stripe").await {
                Ok(a) => a,
                Err(answer) => return answer,
            };
            self.finish_from_webhook(&attempt, Some(&session.id)).await
        }
        .instrument(span)
        .await
    }
}

pub(crate) async fn swish_callback(
    State(portal): State<Portal>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let span = tracing::info_span!("provider_webhook", provider = "swish", tenant = %tenant);
    async move {
        let (status, result) = portal.take_swish_callback(&tenant, &headers, &body).await;
        portal.0.metrics.webhooks.with_label_values(&["swish", result]).inc();
        tracing::info!(result, "webhook answered");
        status.into_response()
    }
    .instrument(span)
    .await
}

impl Portal {
    async fn take_swish_callback(&self, tenant: &str, headers: &HeaderMap, body: &[u8]) -> (StatusCode, &'static str) {
        if !self.0.settings.swish.contains_key(tenant) {
            return (StatusCode::NOT_FOUND, "unknown_tenant");
        }
        let Some(reference) = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["id"].as_str().and_then(crate::swish::reference_of))
        else {
            return (StatusCode::BAD_REQUEST, "unreadable");
        };
        let span = tracing::info_span!("payment", reference = %reference);
        async move {
            let attempt = match self.attempt_started_here(&reference, tenant, "swish").await {
                Ok(a) => a,
                Err(answer) => return answer,
            };
            let said = headers
                .get("callbackidentifier")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            if !forfall_platform::admin::same_secret(said, attempt.callback_identifier.as_deref().unwrap_or_default()) {
                return (StatusCode::UNAUTHORIZED, "unsigned");
            }
            self.finish_from_webhook(&attempt, None).await
        }
        .instrument(span)
        .await
    }
}

pub(crate) async fn stripe_webhook(
    State(portal): State<Portal>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let span = tracing::info_span!("provider_webhook", provider = "stripe", tenant = %tenant);
    async move {
        let (status, result) = portal.take_stripe_event(&tenant, &headers, &body).await;
        portal.0.metrics.webhooks.with_label_values(&["stripe", result]).inc();
        tracing::info!(result, "webhook answered");
        status.into_response()
    }
    .instrument(span)
    .await
}
