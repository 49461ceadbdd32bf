//! The channels a message can go out on: e-mail over SMTP, SMS through a provider's HTTP API
//! (GatewayAPI, 46elks, Twilio, each written to its public documentation), and a signed
//! webhook to the tenant's own system. Each send is classified as sent, permanently failed
//! (fall back to the next channel) or transiently failed (retry with backoff).
//!
//! None of the three SMS providers documents an idempotency key for sending: the claim dispatch
//! takes before the call is what keeps a message single. GatewayAPI gets the claim key as
//! `userref`; the webhook gets it as `Idempotency-Key`.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::ratelimit::TokenBucket;

/// Why a send did not go out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// Will not succeed if repeated: fall back to the next channel.
    Permanent(String),
    /// May succeed later (timeouts, 5xx, 429): retry with backoff.
    Transient(String),
}

/// One SMS provider's settings. Secrets come from the environment in production
/// (`FORFALL_DISPATCH__SMS__GATEWAYAPI__TOKEN`, ...) and are never logged.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SmsProviderSettings {
    /// The API's base URL (production default per provider; tests point it at a local server).
    pub url: String,
    /// GatewayAPI: the API token.
    pub token: Option<String>,
    /// 46elks: API username; Twilio: Account SID (or API key SID with `account_sid` set).
    pub username: Option<String>,
    /// 46elks: API password; Twilio: Auth Token (or API key secret).
    pub password: Option<String>,
    /// Twilio: the account the messages belong to, when `username` is an API key.
    pub account_sid: Option<String>,
    /// Sender id (up to 11 letters) or number.
    pub sender: String,
    /// Token-bucket rate limit: messages per second, and the burst allowed.
    pub rate_per_sec: f64,
    pub burst: f64,
    pub timeout_ms: u64,
}

impl Default for SmsProviderSettings {
    fn default() -> Self {
        Self {
            url: String::new(),
            token: None,
            username: None,
            password: None,
            account_sid: None,
            sender: "Forfall".into(),
            rate_per_sec: 20.0,
            burst: 40.0,
            timeout_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmsProviderKind {
    GatewayApi,
    #[serde(rename = "46elks")]
    Elks46,
    Twilio,
}

impl SmsProviderKind {
    pub fn name(self) -> &'static str {
        match self {
            SmsProviderKind::GatewayApi => "gatewayapi",
            SmsProviderKind::Elks46 => "46elks",
            SmsProviderKind::Twilio => "twilio",
        }
    }

    pub fn default_url(self) -> &'static str {
        match self {
            SmsProviderKind::GatewayApi => "https://gatewayapi.com",
            SmsProviderKind::Elks46 => "https://api.46elks.com",
            SmsProviderKind::Twilio => "https://api.twilio.com",
        }
    }
}

/// An SMS to send.
pub struct Sms<'a> {
    /// E.164 with '+'.
    pub to: &'a str,
    pub text: &'a str,
    /// Unique per (action, channel): the provider reference and the receipt's key.
    pub reference: &'a str,
    /// Where the provider should post delivery receipts.
    pub callback_url: Option<String>,
}

pub struct SmsProvider {
    pub kind: SmsProviderKind,
    settings: SmsProviderSettings,
    client: reqwest::Client,
    limiter: TokenBucket,
}

/// Checks an E.164 number: '+', then 8 to 15 digits.
fn e164(to: &str) -> Result<&str, SendError> {
    let digits = to
        .strip_prefix('+')
        .ok_or_else(|| SendError::Permanent("the phone number is not in E.164 form (+ and country code)".into()))?;
    if (8..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) {
        Ok(digits)
    } else {
        Err(SendError::Permanent(
            "the phone number is not in E.164 form (8 to 15 digits)".into(),
        ))
    }
}

/// Transient for timeouts, connection failures, 429 and 5xx; permanent for other 4xx.
fn classify(status: reqwest::StatusCode, provider: &str, detail: &str) -> SendError {
    let message = format!(
        "{provider} answered {status}: {}",
        detail.chars().take(300).collect::<String>()
    );
    if status.is_server_error()
        || status == reqwest::StatusCode::TOO_MANY_REQUESTS
        || status == reqwest::StatusCode::REQUEST_TIMEOUT
    {
        SendError::Transient(message)
    } else {
        SendError::Permanent(message)
    }
}

fn request_failed(provider: &str, e: reqwest::Error) -> SendError {
    SendError::Transient(format!("{provider} could not be reached: {e}"))
}

#[derive(Deserialize)]
struct GatewayApiAccepted {
    ids: Vec<u64>,
}

#[derive(Deserialize)]
struct Elks46Accepted {
    id: String,
}

#[derive(Deserialize)]
struct TwilioAccepted {
    sid: String,
}

impl SmsProvider {
    pub fn new(kind: SmsProviderKind, mut settings: SmsProviderSettings) -> anyhow::Result<Self> {
        if settings.url.is_empty() {
            settings.url = kind.default_url().to_owned();
        }
        let missing = |what: &str| anyhow::anyhow!("dispatch.sms.{}: {what} is not set", kind.name());
        match kind {
            SmsProviderKind::GatewayApi => {
                settings.token.as_ref().ok_or_else(|| missing("token"))?;
            }
            SmsProviderKind::Elks46 | SmsProviderKind::Twilio => {
                settings.username.as_ref().ok_or_else(|| missing("username"))?;
                settings.password.as_ref().ok_or_else(|| missing("password"))?;
            }
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(settings.timeout_ms))
            .build()?;
        let limiter = TokenBucket::new(settings.rate_per_sec, settings.burst);
        Ok(Self {
            kind,
            settings,
            client,
            limiter,
        })
    }

    /// A form-encoded POST with HTTP Basic auth: the sender, recipient and text fields, and the
    /// receipt callback when there is one.
    async fn post_form(
        &self,
        url: String,
        fields: [(&str, &str); 3],
        callback: (&str, Option<&str>),
    ) -> reqwest::Result<reqwest::Response> {
        let mut form: Vec<(&str, &str)> = fields.to_vec();
        if let (name, Some(url)) = callback {
            form.push((name, url));
        }
        self.client
            .post(url)
            .basic_auth(
                self.settings.username.as_deref().unwrap_or(""),
                self.settings.password.as_deref(),
            )
            .form(&form)
            .send()
            .await
    }

    /// Sends one SMS; the provider's message id when accepted.
    pub async fn send(&self, sms: &Sms<'_>) -> Result<String, SendError> {
        let digits = e164(sms.to)?;
        self.limiter.acquire().await;
        let base = self.settings.url.trim_end_matches('/');
        let name = self.kind.name();
        let response = match self.kind {
            SmsProviderKind::GatewayApi => {
                // GatewayAPI's msisdn: country code and number, no '+', as a JSON integer.
                let msisdn: u64 = digits
                    .parse()
                    .map_err(|_| SendError::Permanent("the phone number is too long".into()))?;
                let mut body = serde_json::json!({
                    "sender": self.settings.sender,
                    "message": sms.text,
                    "recipients": [{ "msisdn": msisdn }],
                    "userref": sms.reference,
                });
                if forfall_domain::sms::length(sms.text).encoding == forfall_domain::sms::SmsEncoding::Ucs2 {
                    body["encoding"] = "UCS2".into();
                }
                if let Some(url) = &sms.callback_url {
                    body["callback_url"] = url.clone().into();
                }
                self.client
                    .post(format!("{base}/rest/mtsms"))
                    .header(
                        "Authorization",
                        format!("Token {}", self.settings.token.as_deref().unwrap_or("")),
                    )
                    .json(&body)
                    .send()
                    .await
            }
            SmsProviderKind::Elks46 => {
                // 46elks and Twilio: form-encoded, HTTP Basic; the field names are theirs.
                self.post_form(
                    format!("{base}/a1/sms"),
                    [
                        ("from", self.settings.sender.as_str()),
                        ("to", sms.to),
                        ("message", sms.text),
                    ],
                    ("whendelivered", sms.callback_url.as_deref()),
                )
                .await
            }
            SmsProviderKind::Twilio => {
                let account = self
                    .settings
                    .account_sid
                    .as_deref()
                    .or(self.settings.username.as_deref())
                    .unwrap_or("");
                self.post_form(
                    format!("{base}/2010-04-01/Accounts/{account}/Messages.json"),
                    [
                        ("To", sms.to),
                        ("From", self.settings.sender.as_str()),
                        ("Body", sms.text),
                    ],
                    ("StatusCallback", sms.callback_url.as_deref()),
                )
                .await
            }
        }
        .map_err(|e| request_failed(name, e))?;
        let status = response.status();
        let text = response.text().await.map_err(|e| request_failed(name, e))?;
        if !status.is_success() {
            return Err(classify(status, name, &provider_error(self.kind, &text)));
        }
        let unreadable = |e: serde_json::Error| {
            // Accepted but unreadable: the message may be out; never retry it.
            SendError::Permanent(format!("{name} accepted the message but its answer is unreadable: {e}"))
        };
        match self.kind {
            SmsProviderKind::GatewayApi => {
                let accepted: GatewayApiAccepted = serde_json::from_str(&text).map_err(unreadable)?;
                accepted
                    .ids
                    .first()
                    .map(u64::to_string)
                    .ok_or_else(|| SendError::Permanent("gatewayapi accepted the message without an id".into()))
            }
            SmsProviderKind::Elks46 => Ok(serde_json::from_str::<Elks46Accepted>(&text).map_err(unreadable)?.id),
            SmsProviderKind::Twilio => Ok(serde_json::from_str::<TwilioAccepted>(&text).map_err(unreadable)?.sid),
        }
    }
}

/// The provider's own words for an error: GatewayAPI and Twilio answer JSON with a code and a
/// message, 46elks plain text.
fn provider_error(kind: SmsProviderKind, body: &str) -> String {
    let json: Option<serde_json::Value> = serde_json::from_str(body).ok();
    match (kind, json) {
        (SmsProviderKind::GatewayApi | SmsProviderKind::Twilio, Some(v)) => {
            let code = v.get("code").map(|c| c.to_string().trim_matches('"').to_owned());
            let message = v.get("message").and_then(|m| m.as_str()).unwrap_or("");
            match code {
                Some(code) => format!("{message} (code {code})"),
                None => message.to_owned(),
            }
        }
        _ => body.trim().to_owned(),
    }
}

/// The tenant's own system, called with the rendered message.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct WebhookSettings {
    /// Shared secret for the `Forfall-Signature` header.
    pub secret: String,
    pub timeout_ms: u64,
    pub rate_per_sec: f64,
    pub burst: f64,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            secret: "forfall-dev-webhook-secret".into(),
            timeout_ms: 10_000,
            rate_per_sec: 50.0,
            burst: 100.0,
        }
    }
}

type HmacSha256 = Hmac<Sha256>;

/// `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`: the receiver recomputes it
/// over the raw body, compares in constant time and refuses old timestamps (replays).
pub fn webhook_signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    format!(
        "t={timestamp},v1={}",
        hex::encode(webhook_mac(secret, timestamp, body).finalize().into_bytes())
    )
}

fn webhook_mac(secret: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// Checks a `Forfall-Signature` header against the body, within `tolerance_secs` of `now`.
pub fn verify_webhook_signature(secret: &str, header: &str, body: &[u8], now: i64, tolerance_secs: i64) -> bool {
    let mut timestamp = None;
    let mut signature = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", s)) => signature = hex::decode(s).ok(),
            _ => {}
        }
    }
    let (Some(timestamp), Some(signature)) = (timestamp, signature) else {
        return false;
    };
    if (now - timestamp).abs() > tolerance_secs {
        return false;
    }
    webhook_mac(secret, timestamp, body).verify_slice(&signature).is_ok()
}

pub struct Webhook {
    settings: WebhookSettings,
    client: reqwest::Client,
    limiter: TokenBucket,
}

impl Webhook {
    pub fn new(settings: WebhookSettings) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(settings.timeout_ms))
            .build()?;
        let limiter = TokenBucket::new(settings.rate_per_sec, settings.burst);
        Ok(Self {
            settings,
            client,
            limiter,
        })
    }

    /// Posts `body` to `url`; the receiver's id for it (or the idempotency key).
    pub async fn send(
        &self,
        url: &str,
        idempotency_key: &str,
        body: &serde_json::Value,
        now: i64,
    ) -> Result<String, SendError> {
        self.limiter.acquire().await;
        let raw = serde_json::to_vec(body)
            .map_err(|e| SendError::Permanent(format!("cannot encode the webhook body: {e}")))?;
        let response = self
            .client
            .post(url)
            .header("Content-Type", "application/json")
            .header("Idempotency-Key", idempotency_key)
            .header("Forfall-Signature", webhook_signature(&self.settings.secret, now, &raw))
            .body(raw)
            .send()
            .await
            .map_err(|e| request_failed("webhook", e))?;
        let status = response.status();
        if status.is_success() {
            let id = response
                .headers()
                .get("X-Message-Id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .unwrap_or_else(|| idempotency_key.to_owned());
            Ok(id)
        } else {
            let text = response.text().await.unwrap_or_default();
            Err(classify(status, "webhook", &text))
        }
    }
}

/// GatewayAPI's delivery notification signature: an HS256 JWT over the notification's fields,
/// keyed with the webhook's token. The claims must agree with the body (the JWT does not cover
/// the raw bytes).
pub fn verify_gatewayapi_jwt(secret: &str, jwt: &str) -> Option<serde_json::Value> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut parts = jwt.split('.');
    let (Some(header), Some(claims), Some(signature), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let header: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).ok()?).ok()?;
    // Pin the algorithm: a token that says "none" or anything else is refused.
    if header.get("alg").and_then(|a| a.as_str()) != Some("HS256") {
        return None;
    }
    let mut mac = <HmacSha256 as Mac>::new_from_slice(secret.as_bytes()).ok()?;
    mac.update(format!("{}.{}", jwt.split('.').next()?, claims).as_bytes());
    mac.verify_slice(&URL_SAFE_NO_PAD.decode(signature).ok()?).ok()?;
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).ok()?).ok()
}

/// Twilio's `X-Twilio-Signature`: base64(HMAC-SHA1(auth token, full URL + each POST parameter's
/// name and value, sorted by name)).
pub fn twilio_signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let mut data = url.to_owned();
    for (k, v) in sorted {
        data.push_str(k);
        data.push_str(v);
    }
    let mut mac = <Hmac<sha1::Sha1> as Mac>::new_from_slice(auth_token.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(data.as_bytes());
    STANDARD.encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twilio_signature_matches_twilios_published_example() {
        // https://www.twilio.com/docs/usage/security#validating-requests
        let params: Vec<(String, String)> = [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+12349013030"),
            ("Digits", "1234"),
            ("From", "+12349013030"),
            ("To", "+18005551212"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(
            twilio_signature("12345", "https://mycompany.com/myapp.php?foo=1&bar=2", &params),
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
        );
    }

    #[test]
    fn gatewayapi_jwt_from_the_docs_verifies_and_a_forged_one_does_not() {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"HS256"}"#);
        let claims = URL_SAFE_NO_PAD.encode(br#"{"id":2381703,"msisdn":4542609045,"status":"DELIVERED"}"#);
        let mut mac = <HmacSha256 as Mac>::new_from_slice(b"secret").expect("key");
        mac.update(format!("{header}.{claims}").as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        let jwt = format!("{header}.{claims}.{sig}");
        let c = verify_gatewayapi_jwt("secret", &jwt).expect("valid");
        assert_eq!(c["id"], 2381703);
        assert!(verify_gatewayapi_jwt("other", &jwt).is_none());
        let none = format!("{}.{claims}.", URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#));
        assert!(verify_gatewayapi_jwt("secret", &none).is_none());
    }

    #[test]
    fn webhook_signatures_verify_only_with_the_secret_body_and_time() {
        let header = webhook_signature("s3cret", 1_800_000_000, b"{\"a\":1}");
        assert!(verify_webhook_signature(
            "s3cret",
            &header,
            b"{\"a\":1}",
            1_800_000_100,
            300
        ));
        assert!(!verify_webhook_signature(
            "s3cret",
            &header,
            b"{\"a\":2}",
            1_800_000_100,
            300
        ));
        assert!(!verify_webhook_signature(
            "other",
            &header,
            b"{\"a\":1}",
            1_800_000_100,
            300
        ));
        assert!(
            !verify_webhook_signature("s3cret", &header, b"{\"a\":1}", 1_800_001_000, 300),
            "replayed"
        );
    }

    #[test]
    fn phone_numbers_must_be_e164() {
        assert_eq!(e164("+4512345678"), Ok("4512345678"));
        assert!(matches!(e164("4512345678"), Err(SendError::Permanent(_))));
        assert!(matches!(e164("+45 12 34"), Err(SendError::Permanent(_))));
    }
}
