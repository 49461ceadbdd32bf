//! Swish (Sweden), through the Swish Commerce API as its documentation describes it
//! (developer.swish.nu): every call over mutual TLS with the merchant's certificate, which is
//! issued for its Swish number; a payment request created with `PUT
//! /api/v2/paymentrequests/{instructionUUID}` without a payer alias (m-commerce), answered
//! with a `PaymentRequestToken` that the Swish app opens (`swish://paymentrequest?token=…`
//! on the phone) or scans (a QR code of `D<token>` on a computer). Swish posts the request to
//! the `callbackUrl` (HTTPS) when the payer answers, with the `callbackIdentifier` header the
//! merchant chose; the portal then asks `GET /api/v1/paymentrequests/{id}` what became of it,
//! so a forged callback can make it ask, never make it book.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// One merchant at Swish: a tenant's Swish number and certificate.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SwishMerchant {
    /// `https://cpc.getswish.net/swish-cpcapi` (`https://mss.cpc.getswish.net/swish-cpcapi`
    /// for the merchant simulator).
    pub base_url: String,
    /// The Swish number (`123…`, ten digits), the payee of every request.
    pub payee_alias: String,
    /// The merchant's client certificate (PEM; its chain after it).
    pub certificate_file: String,
    /// Its private key (PEM, PKCS #8).
    pub key_file: String,
    /// The roots trusted for the API's own certificate (PEM); the system's when unset.
    pub ca_file: Option<String>,
    /// This portal's `/providers/swish/<tenant>` as Swish reaches it: HTTPS.
    pub callback_url: String,
}

impl std::fmt::Debug for SwishMerchant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwishMerchant")
            .field("base_url", &self.base_url)
            .field("payee_alias", &self.payee_alias)
            .field("callback_url", &self.callback_url)
            .finish_non_exhaustive()
    }
}

impl SwishMerchant {
    /// What is wrong with the settings, if anything: checked at start.
    pub fn check(&self) -> Result<(), String> {
        if !self.base_url.starts_with("https://") {
            return Err(format!("base_url '{}' is not an HTTPS URL", self.base_url));
        }
        if !self.callback_url.starts_with("https://") {
            return Err(format!(
                "callback_url '{}' is not an HTTPS URL (Swish calls back only over HTTPS)",
                self.callback_url
            ));
        }
        let alias = &self.payee_alias;
        if alias.len() != 10 || !alias.starts_with("123") || !alias.chars().all(|c| c.is_ascii_digit()) {
            return Err(format!(
                "payee_alias '{alias}' is not a Swish number (ten digits, 123…)"
            ));
        }
        if self.certificate_file.is_empty() || self.key_file.is_empty() {
            return Err("certificate_file and key_file are needed".into());
        }
        Ok(())
    }

    /// The HTTP client that shows this merchant's certificate.
    fn client(&self) -> anyhow::Result<reqwest::Client> {
        let read = |path: &str| std::fs::read(path).map_err(|e| anyhow::anyhow!("{path}: {e}"));
        let identity = reqwest::Identity::from_pkcs8_pem(&read(&self.certificate_file)?, &read(&self.key_file)?)
            .map_err(|e| anyhow::anyhow!("{} and {}: {e}", self.certificate_file, self.key_file))?;
        let mut builder = reqwest::Client::builder()
            .identity(identity)
            .timeout(Duration::from_secs(15))
            .redirect(reqwest::redirect::Policy::none());
        if let Some(ca) = &self.ca_file {
            let roots = reqwest::Certificate::from_pem_bundle(&read(ca)?).map_err(|e| anyhow::anyhow!("{ca}: {e}"))?;
            builder = builder.tls_certs_only(roots);
        }
        Ok(builder.build()?)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SwishError {
    /// Swish could not be reached or answered 5xx or 429: worth trying again.
    #[error("Swish is unavailable: {0}")]
    Unavailable(String),
    /// Swish refused the request (4xx, with its error codes when it gave them).
    #[error("Swish refused the request ({status}): {detail}")]
    Refused { status: u16, detail: String },
}

/// A payment request, as `GET /api/v1/paymentrequests/{id}` tells it.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestState {
    /// CREATED, PAID, DECLINED, ERROR, CANCELLED.
    pub status: String,
    pub amount_minor: Option<i64>,
    pub currency: String,
    /// Swish's reference of the payment, once paid.
    pub payment_reference: Option<String>,
    pub error_code: Option<String>,
}

/// What the portal asks Swish for.
pub struct NewRequest<'a> {
    /// 32 upper-case hexadecimal digits, unique: see [`instruction_id`].
    pub instruction_id: &'a str,
    /// What the creditor's books know the payment by (the invoice's OCR, or ours).
    pub payee_reference: &'a str,
    pub amount_minor: i64,
    pub message: &'a str,
    pub callback_identifier: &'a str,
}

/// The API clients of one portal, one per tenant (each with its own certificate).
pub struct SwishClient {
    clients: BTreeMap<String, reqwest::Client>,
}

impl SwishClient {
    /// Reads every merchant's certificate and key: a missing or unreadable one stops the
    /// start, naming the tenant.
    pub fn new(merchants: &BTreeMap<String, SwishMerchant>) -> anyhow::Result<Self> {
        let mut clients = BTreeMap::new();
        for (tenant, merchant) in merchants {
            merchant
                .check()
                .map_err(|e| anyhow::anyhow!("portal.swish.{tenant}: {e}"))?;
            let client = merchant
                .client()
                .map_err(|e| anyhow::anyhow!("portal.swish.{tenant}: {e:#}"))?;
            clients.insert(tenant.clone(), client);
        }
        Ok(Self { clients })
    }

    fn client(&self, tenant: &str) -> Result<&reqwest::Client, SwishError> {
        self.clients.get(tenant).ok_or_else(|| SwishError::Refused {
            status: 0,
            detail: format!("no Swish merchant for {tenant}"),
        })
    }

    /// Creates the payment request; the token the app opens it by.
    pub async fn create(&self, tenant: &str, m: &SwishMerchant, new: &NewRequest<'_>) -> Result<String, SwishError> {
        let url = format!(
            "{}/api/v2/paymentrequests/{}",
            m.base_url.trim_end_matches('/'),
            new.instruction_id
        );
        let body = request_body(m, new);
        let answer = self
            .client(tenant)?
            .put(url)
            .json(&body)
            .send()
            .await
            .map_err(|e| SwishError::Unavailable(e.without_url().to_string()))?;
        let status = answer.status();
        if status.as_u16() == 201 {
            return answer
                .headers()
                .get("PaymentRequestToken")
                .and_then(|v| v.to_str().ok())
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .ok_or_else(|| SwishError::Unavailable("the answer has no PaymentRequestToken".into()));
        }
        Err(failure(answer).await)
    }

    /// Where the payment request is.
    pub async fn state(
        &self,
        tenant: &str,
        m: &SwishMerchant,
        instruction_id: &str,
    ) -> Result<RequestState, SwishError> {
        let url = format!(
            "{}/api/v1/paymentrequests/{instruction_id}",
            m.base_url.trim_end_matches('/')
        );
        let answer = self
            .client(tenant)?
            .get(url)
            .send()
            .await
            .map_err(|e| SwishError::Unavailable(e.without_url().to_string()))?;
        if !answer.status().is_success() {
            return Err(failure(answer).await);
        }
        let body: Value = answer
            .json()
            .await
            .map_err(|e| SwishError::Unavailable(format!("an answer that is not JSON: {}", e.without_url())))?;
        Ok(state_of(&body))
    }
}

async fn failure(answer: reqwest::Response) -> SwishError {
    let status = answer.status();
    let text = answer.text().await.unwrap_or_default();
    // 422 carries `[{errorCode, errorMessage}]`.
    let detail = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| {
            v.as_array().map(|errors| {
                errors
                    .iter()
                    .map(|e| {
                        format!(
                            "{} {}",
                            e["errorCode"].as_str().unwrap_or("?"),
                            e["errorMessage"].as_str().unwrap_or("")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            })
        })
        .unwrap_or_else(|| text.chars().take(200).collect());
    if status.is_server_error() || status.as_u16() == 429 {
        SwishError::Unavailable(format!("{status}: {detail}"))
    } else {
        SwishError::Refused {
            status: status.as_u16(),
            detail,
        }
    }
}

/// The body of the `PUT`: m-commerce (no payer alias), amount in kronor with two decimals.
pub fn request_body(m: &SwishMerchant, new: &NewRequest<'_>) -> Value {
    json!({
        "payeePaymentReference": new.payee_reference,
        "callbackUrl": m.callback_url,
        "payeeAlias": m.payee_alias,
        "amount": kronor(new.amount_minor),
        "currency": "SEK",
        "message": message(new.message),
        "callbackIdentifier": new.callback_identifier,
    })
}

/// Öre as Swish writes an amount: "1250.00".
pub fn kronor(minor: i64) -> String {
    format!("{}.{:02}", minor / 100, minor % 100)
}

/// An amount as Swish tells it (a JSON number or string, "1250.5") in öre, read exactly.
pub fn ore(amount: &Value) -> Option<i64> {
    let text = match amount {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        _ => return None,
    };
    let (whole, fraction) = text.split_once('.').unwrap_or((&text, ""));
    if whole.is_empty() || !whole.chars().all(|c| c.is_ascii_digit()) || fraction.len() > 2 {
        return None;
    }
    if !fraction.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let whole: i64 = whole.parse().ok()?;
    let fraction: i64 = format!("{fraction:0<2}").parse().ok()?;
    whole.checked_mul(100)?.checked_add(fraction)
}

/// The message the payer sees in the app: at most 50 characters, those Swish allows (letters
/// a–ö, digits and some punctuation); anything else becomes a space.
pub fn message(text: &str) -> String {
    let allowed =
        |c: char| c.is_ascii_alphanumeric() || " !?=#$%&()*+,-./:;<'\"@".contains(c) || "åäöÅÄÖéÉüÜøØæÆ".contains(c);
    let cleaned: String = text
        .chars()
        .map(|c| if allowed(c) { c } else { ' ' })
        .take(50)
        .collect();
    cleaned.trim_end().to_owned()
}

/// The Swish instruction id of a payment the portal started (`ff-<32 hex>`): its hex, upper
/// case, as Swish wants it. The callback's `id` leads back with [`reference_of`].
pub fn instruction_id(reference: &str) -> Option<String> {
    let hex = reference.strip_prefix("ff-")?;
    (hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit())).then(|| hex.to_ascii_uppercase())
}

/// The portal's reference of a Swish instruction id.
pub fn reference_of(instruction_id: &str) -> Option<String> {
    (instruction_id.len() == 32 && instruction_id.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| format!("ff-{}", instruction_id.to_ascii_lowercase()))
}

/// What the app opens on the payer's phone; it sends them back to `return_url` after.
pub fn app_link(token: &str, return_url: &str) -> String {
    let query = serde_urlencoded::to_string([("token", token), ("callbackurl", return_url)]).unwrap_or_default();
    format!("swish://paymentrequest?{query}")
}

/// What the app scans on a computer's screen: the token behind a "D" (a dynamic request).
pub fn qr_payload(token: &str) -> String {
    format!("D{token}")
}

fn state_of(body: &Value) -> RequestState {
    RequestState {
        status: body["status"].as_str().unwrap_or_default().to_owned(),
        amount_minor: ore(&body["amount"]),
        currency: body["currency"].as_str().unwrap_or_default().to_owned(),
        payment_reference: body["paymentReference"].as_str().map(str::to_owned),
        error_code: body["errorCode"].as_str().map(str::to_owned),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merchant() -> SwishMerchant {
        SwishMerchant {
            base_url: "https://mss.cpc.getswish.net/swish-cpcapi".into(),
            payee_alias: "1231181189".into(),
            certificate_file: "swish.crt".into(),
            key_file: "swish.key".into(),
            ca_file: None,
            callback_url: "https://portal.example/providers/swish/t".into(),
        }
    }

    #[test]
    fn amounts_are_written_and_read_exactly_in_ore() {
        assert_eq!(kronor(125_000), "1250.00");
        assert_eq!(kronor(40_050), "400.50");
        assert_eq!(kronor(7), "0.07");
        for (said, ore_) in [
            (json!(1250.0), 125_000),
            (json!(400.5), 40_050),
            (json!(0.07), 7),
            (json!("1250.00"), 125_000),
            (json!(1250), 125_000),
        ] {
            assert_eq!(ore(&said), Some(ore_), "{said}");
        }
        for wrong in [json!("12,50"), json!("1.005"), json!(null), json!("-1.00"), json!("")] {
            assert_eq!(ore(&wrong), None, "{wrong}");
        }
    }

    #[test]
    fn the_message_keeps_to_swishs_characters_and_length() {
        assert_eq!(message("Nordkraft AB 1001, 1002"), "Nordkraft AB 1001, 1002");
        assert_eq!(message("Kraft & Värme | faktura_7"), "Kraft & Värme   faktura 7");
        assert_eq!(message(&"x".repeat(60)).len(), 50);
    }

    #[test]
    fn the_instruction_id_is_the_references_hex_upper_case_and_back() {
        let reference = "ff-0123456789abcdef0123456789abcdef";
        let id = instruction_id(reference).unwrap();
        assert_eq!(id, "0123456789ABCDEF0123456789ABCDEF");
        assert_eq!(reference_of(&id).as_deref(), Some(reference));
        assert_eq!(instruction_id("ff-xyz"), None);
        assert_eq!(reference_of("../../etc"), None);
    }

    #[test]
    fn the_request_is_m_commerce_in_kronor_with_the_callback_and_its_identifier() {
        let body = request_body(
            &merchant(),
            &NewRequest {
                instruction_id: "0123456789ABCDEF0123456789ABCDEF",
                payee_reference: "1234567897",
                amount_minor: 125_000,
                message: "Nordkraft AB 7000125",
                callback_identifier: "11A86BE70EA346E4B1C39C874173F088",
            },
        );
        assert_eq!(body["amount"], "1250.00");
        assert_eq!(body["currency"], "SEK");
        assert_eq!(body["payeeAlias"], "1231181189");
        assert_eq!(body["callbackIdentifier"], "11A86BE70EA346E4B1C39C874173F088");
        assert!(body.get("payerAlias").is_none(), "the app opens it by its token");
    }

    #[test]
    fn settings_are_checked_for_https_and_a_swish_number() {
        assert_eq!(merchant().check(), Ok(()));
        let plain = SwishMerchant {
            callback_url: "http://portal.example/providers/swish/t".into(),
            ..merchant()
        };
        assert!(plain.check().unwrap_err().contains("callback_url"));
        let phone = SwishMerchant {
            payee_alias: "46701234567".into(),
            ..merchant()
        };
        assert!(phone.check().unwrap_err().contains("payee_alias"));
    }

    #[test]
    fn the_app_link_and_qr_carry_the_token() {
        assert_eq!(
            app_link("Esg4X_zZQz-ag", "https://pay.example/pay/return/ff-1"),
            "swish://paymentrequest?token=Esg4X_zZQz-ag&callbackurl=https%3A%2F%2Fpay.example%2Fpay%2Freturn%2Fff-1"
        );
        assert_eq!(qr_payload("Esg4X"), "DEsg4X");
    }
}
