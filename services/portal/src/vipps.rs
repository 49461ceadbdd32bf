//! Vipps MobilePay's ePayment API (Norway, Denmark, Finland), as its documentation describes
//! it (developer.vippsmobilepay.com): an access token from `POST /accesstoken/get`, a payment
//! created with `POST /epayment/v1/payments` under an `Idempotency-Key`, the user sent to its
//! `redirectUrl`, then captured in full once authorized (a bill is owed already, there is
//! nothing to deliver first). The webhooks API tells of each state change, signed with the
//! secret the merchant got when it registered the webhook ([`verify_webhook`]).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

/// One merchant (sales unit) at Vipps MobilePay: a tenant's credentials.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct VippsMerchant {
    /// `https://api.vipps.no`, or `https://apitest.vipps.no` for the test environment.
    pub base_url: String,
    pub client_id: String,
    pub client_secret: String,
    pub subscription_key: String,
    pub merchant_serial_number: String,
    /// The secret the webhooks API answered when the merchant's webhook was registered
    /// (`POST /webhooks/v1/webhooks` with this portal's `/providers/vipps/<tenant>` URL).
    pub webhook_secret: String,
    /// Where the `redirectUrl`s lead (the landing pages), for the page's form-action policy;
    /// [`LANDING_ORIGINS`] and the API's own origin when empty.
    pub redirect_origins: Vec<String>,
}

/// Where Vipps MobilePay's landing pages are (`redirectUrl`'s origin in production).
pub const LANDING_ORIGINS: [&str; 3] = [
    "https://pay.vipps.no",
    "https://pay.mobilepay.dk",
    "https://pay.mobilepay.fi",
];

impl std::fmt::Debug for VippsMerchant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VippsMerchant")
            .field("base_url", &self.base_url)
            .field("merchant_serial_number", &self.merchant_serial_number)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VippsError {
    /// The API could not be reached or answered 5xx or 429: worth trying again.
    #[error("Vipps MobilePay is unavailable: {0}")]
    Unavailable(String),
    /// The API refused the request (4xx): trying again will not help.
    #[error("Vipps MobilePay refused the request ({status}): {detail}")]
    Refused { status: u16, detail: String },
}

/// A payment's state and amounts, as `GET /epayment/v1/payments/{reference}` tells it.
#[derive(Debug, Clone, PartialEq)]
pub struct PaymentState {
    pub state: String,
    pub currency: String,
    pub authorized_minor: i64,
    pub captured_minor: i64,
    pub psp_reference: String,
}

/// The API client of one portal: one access token per merchant, renewed before it expires.
pub struct VippsClient {
    http: reqwest::Client,
    tokens: Mutex<HashMap<String, (String, Instant)>>,
}

impl VippsClient {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder().timeout(Duration::from_secs(15)).build()?,
            tokens: Mutex::default(),
        })
    }

    async fn token(&self, m: &VippsMerchant) -> Result<String, VippsError> {
        let mut tokens = self.tokens.lock().await;
        if let Some((token, until)) = tokens.get(&m.merchant_serial_number) {
            if Instant::now() < *until {
                return Ok(token.clone());
            }
        }
        let answer = self
            .http
            .post(format!("{}/accesstoken/get", m.base_url.trim_end_matches('/')))
            .header("client_id", &m.client_id)
            .header("client_secret", &m.client_secret)
            .header("Ocp-Apim-Subscription-Key", &m.subscription_key)
            .header("Merchant-Serial-Number", &m.merchant_serial_number)
            .send()
            .await;
        let body = read(answer).await?;
        let token = body["access_token"]
            .as_str()
            .ok_or_else(|| VippsError::Unavailable("the token answer has no access_token".into()))?
            .to_owned();
        // `expires_in` is a string of seconds; renew a minute early.
        let secs = body["expires_in"]
            .as_str()
            .and_then(|s| s.parse::<u64>().ok())
            .or_else(|| body["expires_in"].as_u64())
            .unwrap_or(300);
        tokens.insert(
            m.merchant_serial_number.clone(),
            (
                token.clone(),
                Instant::now() + Duration::from_secs(secs.saturating_sub(60).max(30)),
            ),
        );
        Ok(token)
    }

    async fn call(
        &self,
        m: &VippsMerchant,
        method: reqwest::Method,
        path: &str,
        idempotency_key: Option<&str>,
        body: Option<&Value>,
    ) -> Result<Value, VippsError> {
        let token = self.token(m).await?;
        let mut request = self
            .http
            .request(method, format!("{}{path}", m.base_url.trim_end_matches('/')))
            .bearer_auth(token)
            .header("Ocp-Apim-Subscription-Key", &m.subscription_key)
            .header("Merchant-Serial-Number", &m.merchant_serial_number)
            .header("Vipps-System-Name", "forfall")
            .header("Vipps-System-Version", env!("CARGO_PKG_VERSION"));
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        read(request.send().await).await
    }

    /// Creates the payment; the URL to send the user to. Calling it again with the same
    /// reference and body answers the same (the reference is the idempotency key).
    pub async fn create(
        &self,
        m: &VippsMerchant,
        reference: &str,
        amount_minor: i64,
        currency: &str,
        description: &str,
        return_url: &str,
    ) -> Result<String, VippsError> {
        let body = json!({
            "amount": { "currency": currency, "value": amount_minor },
            "paymentMethod": { "type": "WALLET" },
            "reference": reference,
            "returnUrl": return_url,
            "userFlow": "WEB_REDIRECT",
            "paymentDescription": description.chars().take(100).collect::<String>(),
        });
        let answer = self
            .call(
                m,
                reqwest::Method::POST,
                "/epayment/v1/payments",
                Some(reference),
                Some(&body),
            )
            .await?;
        answer["redirectUrl"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| VippsError::Unavailable("the answer has no redirectUrl".into()))
    }

    pub async fn state(&self, m: &VippsMerchant, reference: &str) -> Result<PaymentState, VippsError> {
        let answer = self
            .call(
                m,
                reqwest::Method::GET,
                &format!("/epayment/v1/payments/{reference}"),
                None,
                None,
            )
            .await?;
        Ok(state_of(&answer))
    }

    /// Captures what is left authorized; the payment's state after it.
    pub async fn capture_rest(
        &self,
        m: &VippsMerchant,
        reference: &str,
        state: &PaymentState,
    ) -> Result<PaymentState, VippsError> {
        let rest = state.authorized_minor - state.captured_minor;
        if rest <= 0 {
            return Ok(state.clone());
        }
        let body = json!({ "modificationAmount": { "currency": state.currency, "value": rest } });
        let answer = self
            .call(
                m,
                reqwest::Method::POST,
                &format!("/epayment/v1/payments/{reference}/capture"),
                Some(&format!("capture-{reference}")),
                Some(&body),
            )
            .await?;
        let mut after = state_of(&answer);
        if after.psp_reference.is_empty() {
            after.psp_reference = state.psp_reference.clone();
        }
        Ok(after)
    }
}

fn state_of(answer: &Value) -> PaymentState {
    let aggregate = &answer["aggregate"];
    PaymentState {
        state: answer["state"].as_str().unwrap_or_default().to_owned(),
        currency: answer["amount"]["currency"].as_str().unwrap_or_default().to_owned(),
        authorized_minor: aggregate["authorizedAmount"]["value"].as_i64().unwrap_or_default(),
        captured_minor: aggregate["capturedAmount"]["value"].as_i64().unwrap_or_default(),
        psp_reference: answer["pspReference"].as_str().unwrap_or_default().to_owned(),
    }
}

async fn read(sent: Result<reqwest::Response, reqwest::Error>) -> Result<Value, VippsError> {
    let response = sent.map_err(|e| VippsError::Unavailable(e.without_url().to_string()))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|e| VippsError::Unavailable(e.without_url().to_string()))?;
    if status.is_success() {
        return serde_json::from_str(&text)
            .map_err(|e| VippsError::Unavailable(format!("an answer that is not JSON: {e}")));
    }
    let detail = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["detail"].as_str().or(v["title"].as_str()).map(str::to_owned))
        .unwrap_or_else(|| text.chars().take(200).collect());
    if status.is_server_error() || status.as_u16() == 429 {
        Err(VippsError::Unavailable(format!("{status}: {detail}")))
    } else {
        Err(VippsError::Refused {
            status: status.as_u16(),
            detail,
        })
    }
}

/// A webhook event of the ePayment API.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookEvent {
    pub msn: String,
    pub reference: String,
    #[serde(default)]
    pub psp_reference: String,
    /// CREATED, AUTHORIZED, CAPTURED, ABORTED, EXPIRED, CANCELLED, TERMINATED, REFUNDED.
    pub name: String,
    pub amount: Amount,
    #[serde(default)]
    pub success: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Amount {
    pub currency: String,
    pub value: i64,
}

/// Whether a webhook request is the webhooks API's, signed with `secret`: the body's SHA-256
/// in `x-ms-content-sha256`, and `Authorization: HMAC-SHA256
/// SignedHeaders=x-ms-date;host;x-ms-content-sha256&Signature=<base64 HMAC-SHA256 of
/// "POST\n<path and query>\n<x-ms-date>;<host>;<content hash>">`. Compared in constant time.
pub fn verify_webhook(
    secret: &str,
    path_and_query: &str,
    host: &str,
    date: &str,
    content_hash: &str,
    authorization: &str,
    body: &[u8],
) -> bool {
    let actual_hash = STANDARD.encode(Sha256::digest(body));
    // The hash is no secret: the signature below is what is compared in constant time.
    if actual_hash != content_hash {
        return false;
    }
    let Some(signature) = authorization
        .strip_prefix("HMAC-SHA256 SignedHeaders=x-ms-date;host;x-ms-content-sha256&Signature=")
        .and_then(|s| STANDARD.decode(s).ok())
    else {
        return false;
    };
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(format!("POST\n{path_and_query}\n{date};{host};{content_hash}").as_bytes());
    mac.verify_slice(&signature).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of the webhooks API's "Request authentication" page.
    #[test]
    fn the_documented_example_verifies_and_any_change_does_not() {
        let secret = "A0+AeKBRG2KRGvnNwJpQlb6IJFk48CKXCIcrLoHncVJKDILsQSxS6NWCccwWm6r6FhGKhiHTBsG2wo/xU6FY/A==";
        let body = br#"{"some-unique-content":"ee6e441b-cc4a-46f8-895d-a5af79bcc233/hello-world"}"#;
        let path = "/e2cee29b-012e-4f1d-8ef4-e95fd74a7a63";
        let host = "webhook.site";
        let date = "Thu, 30 Mar 2023 08:38:32 GMT";
        let hash = "lNlsp1XA03N34HrQsVzPgJKtC+r7l/RBF4V3JQUWMj4=";
        let auth = "HMAC-SHA256 SignedHeaders=x-ms-date;host;x-ms-content-sha256&Signature=agAiSyogQbDHpeucoNwYz+yAr5nJ+v+zasdkSbqzv+U=";
        assert!(verify_webhook(secret, path, host, date, hash, auth, body));
        assert!(!verify_webhook("another secret", path, host, date, hash, auth, body));
        assert!(!verify_webhook(secret, "/other", host, date, hash, auth, body));
        assert!(!verify_webhook(secret, path, "evil.example", date, hash, auth, body));
        assert!(!verify_webhook(
            secret,
            path,
            host,
            "Thu, 30 Mar 2023 08:38:33 GMT",
            hash,
            auth,
            body
        ));
        let tampered = br#"{"some-unique-content":"ee6e441b-cc4a-46f8-895d-a5af79bcc233/hello-worle"}"#;
        assert!(!verify_webhook(secret, path, host, date, hash, auth, tampered));
        assert!(!verify_webhook(secret, path, host, date, hash, "Bearer x", body));
    }

    #[test]
    fn a_webhook_event_reads_as_documented() {
        let event: WebhookEvent = serde_json::from_str(
            r#"{"msn":"123456","reference":"24ab7cd6ef658155992","pspReference":"1234567891","name":"AUTHORIZED",
                "amount":{"currency":"NOK","value":35000},"timestamp":"2023-08-14T12:48:46.260Z",
                "idempotencyKey":"49ca711a9487112e1def","success":true}"#,
        )
        .unwrap();
        assert_eq!(event.name, "AUTHORIZED");
        assert_eq!(
            event.amount,
            Amount {
                currency: "NOK".into(),
                value: 35000
            }
        );
        assert_eq!(event.psp_reference, "1234567891");
    }
}
