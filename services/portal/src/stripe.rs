//! Card payments through Stripe Checkout, as Stripe's API reference describes it
//! (docs.stripe.com/api/checkout/sessions, docs.stripe.com/webhooks): a Checkout Session
//! created with `POST /v1/checkout/sessions` (form-encoded, `Authorization: Bearer <secret
//! key>`, an `Idempotency-Key`), the debtor sent to its `url`, and the session read back with
//! `GET /v1/checkout/sessions/{id}`. Stripe posts `checkout.session.completed` to the merchant's
//! webhook endpoint, signed in `Stripe-Signature` ([`verify_signature`]).

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;

/// How far a webhook's signed timestamp may be from now (Stripe's libraries' default).
pub const SIGNATURE_TOLERANCE_SECS: i64 = 300;

/// A tenant's Stripe account.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct StripeAccount {
    /// `https://api.stripe.com`.
    pub base_url: String,
    /// The secret API key (`sk_live_...`, `sk_test_...`).
    pub secret_key: String,
    /// The webhook endpoint's signing secret (`whsec_...`), from registering this portal's
    /// `/providers/stripe/<tenant>` URL.
    pub webhook_secret: String,
    /// Where a session's `url` leads, for the page's form-action policy; [`CHECKOUT_ORIGINS`]
    /// and the API's own origin when empty.
    pub redirect_origins: Vec<String>,
}

/// Where Stripe Checkout's pages are.
pub const CHECKOUT_ORIGINS: [&str; 1] = ["https://checkout.stripe.com"];

impl std::fmt::Debug for StripeAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeAccount")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StripeError {
    #[error("Stripe is unavailable: {0}")]
    Unavailable(String),
    #[error("Stripe refused the request ({status}): {detail}")]
    Refused { status: u16, detail: String },
}

/// A Checkout Session as far as a payment needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub id: String,
    pub url: Option<String>,
    /// `open`, `complete`, `expired`.
    pub status: String,
    /// `paid`, `unpaid`, `no_payment_required`.
    pub payment_status: String,
    pub amount_total: i64,
    /// Lower case, as Stripe writes it.
    pub currency: String,
    pub client_reference_id: Option<String>,
}

impl Session {
    pub fn from_json(v: &Value) -> Self {
        Session {
            id: v["id"].as_str().unwrap_or_default().to_owned(),
            url: v["url"].as_str().map(str::to_owned),
            status: v["status"].as_str().unwrap_or_default().to_owned(),
            payment_status: v["payment_status"].as_str().unwrap_or_default().to_owned(),
            amount_total: v["amount_total"].as_i64().unwrap_or_default(),
            currency: v["currency"].as_str().unwrap_or_default().to_owned(),
            client_reference_id: v["client_reference_id"].as_str().map(str::to_owned),
        }
    }
}

pub struct StripeClient {
    http: reqwest::Client,
}

/// What a session is created for.
pub struct NewSession<'a> {
    pub reference: &'a str,
    pub amount_minor: i64,
    pub currency: &'a str,
    pub description: &'a str,
    /// Where Stripe sends the debtor after paying (`{CHECKOUT_SESSION_ID}` is filled in).
    pub success_url: &'a str,
    pub cancel_url: &'a str,
    pub locale: &'a str,
}

impl StripeClient {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder().timeout(Duration::from_secs(15)).build()?,
        })
    }

    /// Creates the session (idempotent by our reference); the session with its URL.
    pub async fn create(&self, account: &StripeAccount, new: &NewSession<'_>) -> Result<Session, StripeError> {
        let amount = new.amount_minor.to_string();
        let currency = new.currency.to_ascii_lowercase();
        let form: Vec<(&str, &str)> = vec![
            ("mode", "payment"),
            ("client_reference_id", new.reference),
            ("metadata[forfall_reference]", new.reference),
            ("line_items[0][quantity]", "1"),
            ("line_items[0][price_data][currency]", &currency),
            ("line_items[0][price_data][unit_amount]", &amount),
            ("line_items[0][price_data][product_data][name]", new.description),
            ("payment_method_types[0]", "card"),
            ("success_url", new.success_url),
            ("cancel_url", new.cancel_url),
            ("locale", new.locale),
        ];
        let sent = self
            .http
            .post(format!(
                "{}/v1/checkout/sessions",
                account.base_url.trim_end_matches('/')
            ))
            .bearer_auth(&account.secret_key)
            .header("Idempotency-Key", new.reference)
            .form(&form)
            .send()
            .await;
        read(sent).await.map(|v| Session::from_json(&v))
    }

    pub async fn session(&self, account: &StripeAccount, id: &str) -> Result<Session, StripeError> {
        let sent = self
            .http
            .get(format!(
                "{}/v1/checkout/sessions/{id}",
                account.base_url.trim_end_matches('/')
            ))
            .bearer_auth(&account.secret_key)
            .send()
            .await;
        read(sent).await.map(|v| Session::from_json(&v))
    }
}

async fn read(sent: Result<reqwest::Response, reqwest::Error>) -> Result<Value, StripeError> {
    let response = sent.map_err(|e| StripeError::Unavailable(e.without_url().to_string()))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|e| StripeError::Unavailable(e.without_url().to_string()))?;
    if status.is_success() {
        return serde_json::from_str(&text)
            .map_err(|e| StripeError::Unavailable(format!("an answer that is not JSON: {e}")));
    }
    let detail = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| text.chars().take(200).collect());
    if status.is_server_error() || status.as_u16() == 429 {
        Err(StripeError::Unavailable(format!("{status}: {detail}")))
    } else {
        Err(StripeError::Refused {
            status: status.as_u16(),
            detail,
        })
    }
}

/// Whether `header` (`Stripe-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>...]`) signs
/// `payload` with `secret`: HMAC-SHA256 of `<t>.<payload>`, any `v1` matching (compared in
/// constant time), and `t` within [`SIGNATURE_TOLERANCE_SECS`] of `now` so that an old
/// delivery cannot be replayed.
pub fn verify_signature(secret: &str, header: &str, payload: &[u8], now_secs: i64) -> bool {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", s)) => signatures.extend(hex::decode(s).ok()),
            _ => {}
        }
    }
    let Some(t) = timestamp else { return false };
    if (now_secs - t).abs() > SIGNATURE_TOLERANCE_SECS {
        return false;
    }
    signatures.iter().any(|signature| {
        let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()) else {
            return false;
        };
        mac.update(format!("{t}.").as_bytes());
        mac.update(payload);
        mac.verify_slice(signature).is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &str, t: i64, payload: &[u8]) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{t}.").as_bytes());
        mac.update(payload);
        hex::encode(mac.finalize().into_bytes())
    }

    #[test]
    fn a_signature_holds_for_its_payload_secret_and_time_only() {
        let secret = "whsec_test";
        let payload = br#"{"id":"evt_1","type":"checkout.session.completed"}"#;
        let t = 1_767_225_600;
        let good = format!("t={t},v1={}", sign(secret, t, payload));
        assert!(verify_signature(secret, &good, payload, t + 10));
        assert!(!verify_signature("whsec_other", &good, payload, t));
        assert!(!verify_signature(secret, &good, br#"{"id":"evt_2"}"#, t));
        assert!(
            !verify_signature(secret, &good, payload, t + SIGNATURE_TOLERANCE_SECS + 1),
            "a replay later"
        );
        // During a secret's rotation Stripe sends a signature with each; one holding is enough.
        let rotated = format!(
            "t={t},v1={},v1={}",
            sign("whsec_old", t, payload),
            sign(secret, t, payload)
        );
        assert!(verify_signature(secret, &rotated, payload, t));
        assert!(!verify_signature(
            secret,
            &format!("t={t},v0={}", sign(secret, t, payload)),
            payload,
            t
        ));
        assert!(!verify_signature(secret, "garbage", payload, t));
    }
}
