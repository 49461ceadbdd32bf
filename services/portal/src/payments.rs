//! Payments under way at providers, and how they end.
//!
//! A payment the page started is an [`Attempt`]: what it pays, for whom. It is written to the
//! portal's changelog (acknowledged) before the provider hears of it, then to Redis, so that
//! neither a lost Redis nor a restart loses what a payment was for. The provider's webhook and
//! the page the provider sends the debtor back to (`GET /pay/return/<reference>`) both
//! [`finish`](Portal::finish) it: ask the provider where it is, capture an authorized Vipps
//! MobilePay payment, and once the money is taken write a `PaymentReceived` on
//! `payments.events.v1`. Finishing is idempotent: however often and by whichever path, the
//! record has the same event id and payment id (`<provider>:<reference>`), which the matcher
//! books once. An abandoned, expired or failed payment writes nothing.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use forfall_domain::invoice::epoch_days;
use forfall_domain::{Currency, Locale, Money};
use forfall_platform::kafka::Failure;
use forfall_platform::records::{PaymentReceived, derived_id};
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::Portal;
use crate::http::{html_response, refused, unavailable};

/// How long a payment under way is remembered: longer than any provider keeps one open.
pub const ATTEMPT_TTL_SECS: u64 = 30 * 86_400;

/// A payment under way at a provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// `vipps`, `stripe`, `swish`.
    pub provider: String,
    /// The reference the provider knows the payment by (ours, unique).
    pub reference: String,
    /// The provider's own id for it when it has one (a Stripe Checkout Session's id, a
    /// Swish instruction id).
    #[serde(default)]
    pub provider_id: Option<String>,
    /// What the payer's app opens the payment by (a Swish payment request token).
    #[serde(default)]
    pub provider_token: Option<String>,
    /// What the provider's callback must carry to be taken as about this payment (Swish's
    /// `callbackIdentifier`).
    #[serde(default)]
    pub callback_identifier: Option<String>,
    pub tenant: String,
    pub debtor_id: String,
    pub invoices: Vec<String>,
    /// The invoices' numbers, for the remittance text the matcher reads.
    pub numbers: Vec<String>,
    /// The invoice's structured reference (KID, FIK, OCR...) when one invoice is paid.
    pub structured_reference: Option<String>,
    pub amount_minor: i64,
    pub currency: String,
    pub lang: String,
    pub created_ms: i64,
}

impl Attempt {
    /// The payment as the matcher reads it: the invoice's own reference for one invoice, the
    /// invoices' numbers in the remittance text (paid in that order) for several.
    pub fn received(&self, taken_minor: i64, at_ms: i64, day: i32) -> PaymentReceived {
        let payment_id = format!("{}:{}", self.provider, self.reference);
        PaymentReceived {
            event_id: derived_id("provider-payment", &[&self.tenant, &payment_id]),
            tenant: self.tenant.clone(),
            debtor_id: Some(self.debtor_id.clone()),
            occurred_at: at_ms,
            payment_id,
            amount_minor: taken_minor,
            currency: self.currency.clone(),
            reference: self.structured_reference.clone(),
            remittance_text: Some(format!(
                "{} {}",
                if self.numbers.len() == 1 { "Invoice" } else { "Invoices" },
                self.numbers.join(" ")
            )),
            payer_name: None,
            payer_account: None,
            booking_date: day,
            value_date: day,
        }
    }
}

/// The changelog's key of an attempt.
pub fn attempt_changelog_key(reference: &str) -> String {
    format!("pay/{reference}")
}

/// Where a payment is, as the provider tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// The money is taken (this much, in minor units) and the payment is on record.
    Taken(i64),
    /// The debtor cancelled, or it expired or failed: nothing was taken.
    Abandoned,
    /// Not decided yet.
    Pending,
}

impl Portal {
    /// Writes the attempt to the changelog (acknowledged), then to Redis.
    pub(crate) async fn remember(&self, attempt: &Attempt) -> Result<(), Failure> {
        let value = serde_json::to_vec(attempt).map_err(|e| Failure::Transient(e.into()))?;
        self.keep(
            attempt_changelog_key(&attempt.reference),
            self.0.keys.attempt(&attempt.reference),
            value,
            ATTEMPT_TTL_SECS,
        )
        .await
    }

    /// The attempt with this reference; `None` when the portal started no such payment.
    pub(crate) async fn attempt(&self, reference: &str) -> Result<Option<Attempt>, Failure> {
        self.0.state.ensure_ready().await?;
        let raw: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.0.keys.attempt(reference))
            .query_async(&mut self.0.redis.clone())
            .await?;
        Ok(raw.and_then(|r| serde_json::from_slice(&r).ok()))
    }

    /// Asks the provider where the payment is, captures it once authorized (Vipps MobilePay),
    /// and writes the payment received once the money is taken. `session` is a Stripe Checkout
    /// Session's id when the caller has it (the return URL, the webhook). Safe to call any
    /// number of times.
    pub(crate) async fn finish(&self, attempt: &Attempt, session: Option<&str>) -> Result<Finished, Failure> {
        let unavailable = |e: &dyn std::fmt::Display| Failure::Transient(anyhow::anyhow!("{e}"));
        let finished =
            match attempt.provider.as_str() {
                "vipps" => {
                    let merchant =
                        self.0.settings.vipps.get(&attempt.tenant).ok_or_else(|| {
                            unavailable(&format!("no Vipps MobilePay merchant for {}", attempt.tenant))
                        })?;
                    let mut state = self
                        .0
                        .vipps
                        .state(merchant, &attempt.reference)
                        .await
                        .map_err(|e| unavailable(&e))?;
                    if state.state == "AUTHORIZED" && state.captured_minor < state.authorized_minor {
                        state = self
                            .0
                            .vipps
                            .capture_rest(merchant, &attempt.reference, &state)
                            .await
                            .map_err(|e| unavailable(&e))?;
                    }
                    match state.state.as_str() {
                        _ if state.captured_minor > 0 => Finished::Taken(state.captured_minor),
                        "ABORTED" | "EXPIRED" | "TERMINATED" => Finished::Abandoned,
                        _ => Finished::Pending,
                    }
                }
                "stripe" => {
                    let account = self
                        .0
                        .settings
                        .stripe
                        .get(&attempt.tenant)
                        .ok_or_else(|| unavailable(&format!("no Stripe account for {}", attempt.tenant)))?;
                    let Some(id) = session.or(attempt.provider_id.as_deref()) else {
                        return Ok(Finished::Pending);
                    };
                    let s = self.0.stripe.session(account, id).await.map_err(|e| unavailable(&e))?;
                    if s.client_reference_id.as_deref() != Some(attempt.reference.as_str()) {
                        tracing::warn!("a Checkout Session of another payment; left alone");
                        return Ok(Finished::Pending);
                    }
                    match (s.status.as_str(), s.payment_status.as_str()) {
                        (_, "paid") if s.currency.eq_ignore_ascii_case(&attempt.currency) => {
                            Finished::Taken(s.amount_total)
                        }
                        ("expired", _) => Finished::Abandoned,
                        _ => Finished::Pending,
                    }
                }
                "swish" => {
                    let merchant = self
                        .0
                        .settings
                        .swish
                        .get(&attempt.tenant)
                        .ok_or_else(|| unavailable(&format!("no Swish merchant for {}", attempt.tenant)))?;
                    let Some(id) = attempt.provider_id.as_deref() else {
                        return Ok(Finished::Pending);
                    };
                    let s = self
                        .0
                        .swish
                        .state(&attempt.tenant, merchant, id)
                        .await
                        .map_err(|e| unavailable(&e))?;
                    match s.status.as_str() {
                        "PAID" if s.currency.eq_ignore_ascii_case(&attempt.currency) => match s.amount_minor {
                            Some(minor) if minor > 0 => Finished::Taken(minor),
                            _ => return Err(unavailable(&"Swish says paid without a readable amount")),
                        },
                        "DECLINED" | "ERROR" | "CANCELLED" => Finished::Abandoned,
                        _ => Finished::Pending,
                    }
                }
                other => return Err(unavailable(&format!("unknown provider {other}"))),
            };
        if let Finished::Taken(minor) = finished {
            self.record_received(attempt, minor).await?;
        }
        Ok(finished)
    }

    async fn record_received(&self, attempt: &Attempt, taken_minor: i64) -> Result<(), Failure> {
        let now = self.0.rt.clock.now();
        let record = attempt.received(taken_minor, now.timestamp_millis(), epoch_days(now.date_naive()));
        self.publish(&self.0.rt.config.topics.payments, &attempt.tenant, &record)
            .await
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct ReturnQuery {
    /// Stripe fills in the Checkout Session's id.
    session_id: Option<String>,
}

/// `GET /pay/return/<reference>`: where the provider sends the debtor back. It finishes the
/// payment (in case the webhook is late or lost) and says how it went.
pub(crate) async fn returned(
    State(portal): State<Portal>,
    Path(reference): Path<String>,
    Query(query): Query<ReturnQuery>,
) -> Response {
    let span = tracing::info_span!("payment_return", reference = %reference);
    async move {
        let attempt = match portal.attempt(&reference).await {
            Ok(Some(a)) => a,
            Ok(None) => return refused(),
            Err(_) => return unavailable(),
        };
        let t = portal.0.texts.for_language(&attempt.lang, "");
        let text = |key: &str| t.get(key).cloned().unwrap_or_else(|| key.to_owned());
        let finished = portal.finish(&attempt, query.session_id.as_deref()).await;
        let amount = |minor: i64| {
            attempt
                .currency
                .parse::<Currency>()
                .map(|c| forfall_domain::money::format(Money::new(minor, c), Locale::from_language(&attempt.lang)))
                .unwrap_or_default()
        };
        let (heading, detail, result) = match finished {
            Ok(Finished::Taken(minor)) => (
                text("return_paid_title"),
                format!("{} {}", text("return_paid"), amount(minor)),
                "completed",
            ),
            Ok(Finished::Abandoned) => (text("return_cancelled_title"), text("return_cancelled"), "abandoned"),
            // Stripe sends the debtor back without a session when they turned back.
            Ok(Finished::Pending) if attempt.provider == "stripe" && query.session_id.is_none() => {
                (text("return_cancelled_title"), text("return_cancelled"), "abandoned")
            }
            Ok(Finished::Pending) | Err(_) => (text("return_pending_title"), text("return_pending"), "pending"),
        };
        // A Swish request not yet answered: the app opens it here, or scans it from here.
        let swish = match (&finished, &attempt.provider_token) {
            (Ok(Finished::Pending) | Err(_), Some(token)) if attempt.provider == "swish" => {
                let here = format!("{}return/{}", portal.0.pay_base_url, attempt.reference);
                Some(swish_panel(token, &here, &amount(attempt.amount_minor), &text))
            }
            _ => None,
        };
        let (heading, detail) = match &swish {
            Some(_) => (text("swish_title"), text("swish_open_or_scan")),
            None => (heading, detail),
        };
        portal
            .0
            .metrics
            .payments
            .with_label_values(&[attempt.provider.as_str(), result])
            .inc();
        tracing::info!(result, "payment return answered");
        let esc = crate::page::escape_html;
        html_response(
            StatusCode::OK,
            format!(
                "<!doctype html><html lang=\"{}\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{}</title></head><body><main><h1>{}</h1><p role=\"status\">{}</p>{}<p>{}</p></main></body></html>",
                esc(&attempt.lang),
                esc(&heading),
                esc(&heading),
                esc(&detail),
                swish.unwrap_or_default(),
                esc(&text("return_link_again"))
            ),
        )
    }
    .instrument(span)
    .await
}

/// The link that opens the Swish app on this phone, the QR code its app scans from another
/// screen, and a link to ask again once it is answered (no script: the page is static).
fn swish_panel(token: &str, here: &str, amount: &str, text: &dyn Fn(&str) -> String) -> String {
    let attr = crate::page::escape_html;
    let qr = crate::page::qr_svg(&crate::swish::qr_payload(token), &text("swish_scan")).unwrap_or_default();
    format!(
        "<p><strong>{}</strong></p><p><a class=\"swish-app\" href=\"{}\">{}</a></p><figure>{qr}<figcaption>{}</figcaption></figure><p><a href=\"{}\">{}</a></p>",
        attr(amount),
        attr(&crate::swish::app_link(token, here)),
        attr(&text("swish_open_app")),
        attr(&text("swish_scan")),
        attr(here),
        attr(&text("swish_check")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_payment_reads_as_the_same_record_however_often_it_is_finished() {
        let attempt = Attempt {
            provider: "vipps".into(),
            reference: "ff-0123456789abcdef".into(),
            provider_id: None,
            provider_token: None,
            callback_identifier: None,
            tenant: "nordkraft".into(),
            debtor_id: "d1".into(),
            invoices: vec!["i1".into(), "i2".into()],
            numbers: vec!["1001".into(), "1002".into()],
            structured_reference: None,
            amount_minor: 155_000,
            currency: "NOK".into(),
            lang: "nb".into(),
            created_ms: 0,
        };
        let first = attempt.received(155_000, 1, 20_000);
        let again = attempt.received(155_000, 2, 20_001);
        assert_eq!(first.event_id, again.event_id);
        assert_eq!(first.payment_id, "vipps:ff-0123456789abcdef");
        assert_eq!(first.payment_id, again.payment_id);
        assert_eq!(first.debtor_id.as_deref(), Some("d1"));
        assert_eq!(first.remittance_text.as_deref(), Some("Invoices 1001 1002"));
        let stored: Attempt = serde_json::from_str(
            r#"{"provider":"vipps","reference":"ff-1","tenant":"t","debtor_id":"d","invoices":[],"numbers":[],
                "structured_reference":null,"amount_minor":1,"currency":"NOK","lang":"nb","created_ms":0}"#,
        )
        .unwrap();
        assert_eq!(
            stored.provider_id, None,
            "attempts written before provider ids were kept still read"
        );
    }
}
