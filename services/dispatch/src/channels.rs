//! The channels a message can go out on: e-mail over SMTP, SMS through a provider's HTTP API
//! (GatewayAPI, 46elks, Twilio, each written to its public documentation), and a signed
//! webhook to the tenant's own system.
//!
//! Each send takes a `commit` callback and calls it right before the provider can have the
//! message (after everything that can be checked, built and rate-limited without it), and its
//! result is classified by what is known about the provider's side:
//! - before the commit point, or after it with an answer that proves the message was not taken
//!   (a documented 4xx refusal, 429, 408, a connection that could not be opened): permanently
//!   failed (fall back to the next channel) or transiently failed (retry with backoff);
//! - after the commit point without such proof (a timeout, a connection broken after the request
//!   was written, a 5xx, an acceptance whose answer cannot be read): *unknown*. The provider may
//!   have the message, so it is never sent again on that channel and never falls back to another.
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

/// Why a send did not (certainly) go out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// The provider did not take the message and will not if asked again (a documented refusal):
    /// fall back to the next channel.
    Permanent(String),
    /// The provider did not take the message but may later (unreachable, 429, 408, an SMTP 4xx):
    /// retry with backoff.
    Transient(String),
    /// After the commit point, with no proof either way (a timeout, a connection broken after the
    /// request was written, a 5xx, an unreadable acceptance): the provider may have the message.
    /// Never retried and never a fallback: the debtor may already have it.
    Unknown(String),
    /// The attempt no longer holds the message's claim (it ran out and another attempt may own
    /// it), found at the commit point: nothing was sent, and this attempt writes nothing more.
    ClaimLost,
    /// At the commit point an invoice of the message was no longer open (paid, credited, ...
    /// while the message waited for a rate-limit token, a retry or the provider): nothing was
    /// sent; the action is looked at again from the start.
    Stale(String),
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
    /// The whole request, answer included. A request that times out after it was written leaves
    /// the delivery unknown.
    pub timeout_ms: u64,
    /// Opening the connection (at most `timeout_ms`): a connection that could not be opened
    /// carried nothing, so that failure is retried.
    pub connect_timeout_ms: u64,
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
            connect_timeout_ms: 3_000,
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

/// A provider's error answer, given after the request was written. 429 (rate limit) and 408 (the
/// server did not receive the whole request, RFC 9110 15.5.9) prove the message was not taken:
/// retried. Any other 4xx is a documented refusal of the request: permanent, the fallback may
/// go. A 5xx proves nothing (the provider may have queued the message before failing): unknown.
fn classify(status: reqwest::StatusCode, provider: &str, detail: &str) -> SendError {
    let message = format!(
        "{provider} answered {status}: {}",
        detail.chars().take(300).collect::<String>()
    );
    if status == reqwest::StatusCode::TOO_MANY_REQUESTS || status == reqwest::StatusCode::REQUEST_TIMEOUT {
        SendError::Transient(message)
    } else if status.is_client_error() {
        SendError::Permanent(message)
    } else {
        SendError::Unknown(message)
    }
}

/// A request that got no answer. Only a connection that could not be opened (refused, DNS, TLS
/// handshake, connect timeout) or a request that could not be built proves that nothing was
/// written; a timeout or a broken connection after that leaves the delivery unknown.
fn request_failed(provider: &str, e: reqwest::Error) -> SendError {
    if e.is_builder() {
        SendError::Permanent(format!("cannot build the request to {provider}: {e}"))
    } else if e.is_connect() {
        SendError::Transient(format!("{provider} could not be reached: {e}"))
    } else if e.is_timeout() {
        SendError::Unknown(format!(
            "{provider} did not answer in time after the request was written: {e}"
        ))
    } else {
        SendError::Unknown(format!("the request to {provider} failed after it was written: {e}"))
    }
}

/// The answer's body, when its status came but the body did not.
fn body_failed(provider: &str, status: reqwest::StatusCode, e: reqwest::Error) -> SendError {
    if status.is_success() {
        SendError::Unknown(format!(
            "{provider} answered {status} but its body could not be read: {e}"
        ))
    } else {
        classify(status, provider, &format!("(body unreadable: {e})"))
    }
}

/// The client's connect timeout: `connect_timeout_ms`, at most the whole request's.
fn connect_timeout(connect_timeout_ms: u64, timeout_ms: u64) -> Duration {
    Duration::from_millis(connect_timeout_ms.min(timeout_ms).max(1))
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
            .connect_timeout(connect_timeout(settings.connect_timeout_ms, settings.timeout_ms))
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
    /// receipt callback when there is one. Built, not sent.
    fn form_request(
        &self,
        url: String,
        fields: [(&str, &str); 3],
        callback: (&str, Option<&str>),
    ) -> reqwest::RequestBuilder {
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
    }

    /// Sends one SMS; the provider's message id when accepted. `commit` runs after the request
    /// is checked and built and a token of the rate limit is taken, right before the request is
    /// written: if it fails, nothing was sent.
    pub async fn send<F, Fut>(&self, sms: &Sms<'_>, commit: F) -> Result<String, SendError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(), SendError>>,
    {
        let digits = e164(sms.to)?;
        let base = self.settings.url.trim_end_matches('/');
        let name = self.kind.name();
        let request = match self.kind {
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
            }
            SmsProviderKind::Elks46 => {
                // 46elks and Twilio: form-encoded, HTTP Basic; the field names are theirs.
                self.form_request(
                    format!("{base}/a1/sms"),
                    [
                        ("from", self.settings.sender.as_str()),
                        ("to", sms.to),
                        ("message", sms.text),
                    ],
                    ("whendelivered", sms.callback_url.as_deref()),
                )
            }
            SmsProviderKind::Twilio => {
                let account = self
                    .settings
                    .account_sid
                    .as_deref()
                    .or(self.settings.username.as_deref())
                    .unwrap_or("");
                self.form_request(
                    format!("{base}/2010-04-01/Accounts/{account}/Messages.json"),
                    [
                        ("To", sms.to),
                        ("From", self.settings.sender.as_str()),
                        ("Body", sms.text),
                    ],
                    ("StatusCallback", sms.callback_url.as_deref()),
                )
            }
        };
        self.limiter.acquire().await;
        commit().await?;
        // From here on the provider may have the message: see `request_failed` and `classify`.
        let response = request.send().await.map_err(|e| request_failed(name, e))?;
        let status = response.status();
        let text = response.text().await.map_err(|e| body_failed(name, status, e))?;
        if !status.is_success() {
            return Err(classify(status, name, &provider_error(self.kind, &text)));
        }
        let unreadable = |e: serde_json::Error| {
            // Accepted but unreadable: the message may be out; never retried, never a fallback.
            SendError::Unknown(format!("{name} accepted the message but its answer is unreadable: {e}"))
        };
        match self.kind {
            SmsProviderKind::GatewayApi => {
                let accepted: GatewayApiAccepted = serde_json::from_str(&text).map_err(unreadable)?;
                accepted
                    .ids
                    .first()
                    .map(u64::to_string)
                    .ok_or_else(|| SendError::Unknown("gatewayapi accepted the message without an id".into()))
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
    /// Shared secret for the `Forfall-Signature` header, for tenants without their own
    /// (`dispatch.tenants.<tenant>.webhook_secret`).
    pub secret: String,
    /// The whole request, answer included (a timeout after the request was written leaves the
    /// delivery unknown).
    pub timeout_ms: u64,
    /// Opening the connection (at most `timeout_ms`; a failure here is retried).
    pub connect_timeout_ms: u64,
    pub rate_per_sec: f64,
    pub burst: f64,
}

/// The webhook secret of the dev stack, published with the source: refused in production.
pub const DEVELOPMENT_WEBHOOK_SECRET: &str = "forfall-dev-webhook-secret";

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            secret: DEVELOPMENT_WEBHOOK_SECRET.into(),
            timeout_ms: 10_000,
            connect_timeout_ms: 3_000,
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
    client: reqwest::Client,
    limiter: TokenBucket,
}

impl Webhook {
    pub fn new(settings: WebhookSettings) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(settings.timeout_ms))
            .connect_timeout(connect_timeout(settings.connect_timeout_ms, settings.timeout_ms))
            .build()?;
        let limiter = TokenBucket::new(settings.rate_per_sec, settings.burst);
        Ok(Self { client, limiter })
    }

    /// Posts `body` to `url`, signed with `secret`; the receiver's id for it (or the idempotency
    /// key). `commit` runs right before the request is written (see [`SmsProvider::send`]).
    pub async fn send<F, Fut>(
        &self,
        url: &str,
        secret: &str,
        idempotency_key: &str,
        body: &serde_json::Value,
        now: i64,
        commit: F,
    ) -> Result<String, SendError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(), SendError>>,
    {
        let raw = serde_json::to_vec(body)
            .map_err(|e| SendError::Permanent(format!("cannot encode the webhook body: {e}")))?;
        let request = self
            .client
            .post(url)
            .header("Content-Type", "application/json")
            .header("Idempotency-Key", idempotency_key)
            .header("Forfall-Signature", webhook_signature(secret, now, &raw))
            .body(raw);
        self.limiter.acquire().await;
        commit().await?;
        let response = request.send().await.map_err(|e| request_failed("webhook", e))?;
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
    fn only_answers_that_prove_the_message_was_not_taken_are_retried_or_fall_back() {
        use reqwest::StatusCode;
        let class = |code: u16| classify(StatusCode::from_u16(code).expect("status"), "p", "");
        for code in [429, 408] {
            assert!(matches!(class(code), SendError::Transient(_)), "{code}");
        }
        for code in [400, 401, 403, 404, 422] {
            assert!(matches!(class(code), SendError::Permanent(_)), "{code}");
        }
        for code in [500, 502, 503, 504] {
            assert!(
                matches!(class(code), SendError::Unknown(_)),
                "{code}: the provider may have it"
            );
        }
    }

    fn gatewayapi(url: String, timeout_ms: u64) -> SmsProvider {
        SmsProvider::new(
            SmsProviderKind::GatewayApi,
            SmsProviderSettings {
                url,
                token: Some("token".into()),
                timeout_ms,
                ..SmsProviderSettings::default()
            },
        )
        .expect("provider")
    }

    fn sms() -> Sms<'static> {
        Sms {
            to: "+4520304050",
            text: "Hej",
            reference: "action:sms",
            callback_url: None,
        }
    }

    #[tokio::test]
    async fn a_connection_that_could_not_be_opened_carried_nothing_and_is_retried() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = closed.local_addr().expect("addr");
        drop(closed);
        let result = gatewayapi(format!("http://{addr}"), 1000)
            .send(&sms(), || async { Ok::<(), SendError>(()) })
            .await;
        assert!(matches!(result, Err(SendError::Transient(_))), "{result:?}");
    }

    #[tokio::test]
    async fn a_request_written_but_never_answered_is_an_unknown_delivery() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Takes the request, then says nothing.
        let (read_tx, read_rx) = tokio::sync::oneshot::channel::<usize>();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 8192];
            let n = socket.read(&mut buf).await.expect("read");
            let _ = read_tx.send(n);
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(socket);
        });
        let result = gatewayapi(format!("http://{addr}"), 300)
            .send(&sms(), || async { Ok::<(), SendError>(()) })
            .await;
        assert!(matches!(result, Err(SendError::Unknown(_))), "{result:?}");
        assert!(read_rx.await.expect("the server read") > 0, "the request was written");
        server.abort();
    }

    #[tokio::test]
    async fn a_failed_commit_point_sends_nothing() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener.local_addr().expect("addr");
        let result = gatewayapi(format!("http://{addr}"), 1000)
            .send(&sms(), || async { Err::<(), SendError>(SendError::ClaimLost) })
            .await;
        assert_eq!(result, Err(SendError::ClaimLost));
        // The send has returned: a connection it made would be waiting to be accepted.
        let pending = listener.accept();
        assert!(
            matches!(&pending, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "no connection was opened: {pending:?}"
        );
    }

    #[test]
    fn phone_numbers_must_be_e164() {
        assert_eq!(e164("+4512345678"), Ok("4512345678"));
        assert!(matches!(e164("4512345678"), Err(SendError::Permanent(_))));
        assert!(matches!(e164("+45 12 34"), Err(SendError::Permanent(_))));
    }
}
