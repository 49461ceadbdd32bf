//! DEV AND TEST ONLY: a stand-in for the Swish Commerce API (Swish för handel), strict in the
//! way its published documentation describes it (developer.swish.nu, "Commerce API"):
//!
//! - HTTPS with mutual TLS: no handshake completes without a client certificate issued by the
//!   stand-in's authority, and a request for another Swish number than the certificate's
//!   (its common name), in the path's payee or the body's `payeeAlias`, is 403.
//! - `PUT /swish-cpcapi/api/v2/paymentrequests/{instructionUUID}` (32 upper-case hex digits,
//!   else 400) with JSON `payeePaymentReference` (1–35 of `a-zA-Z0-9-_.+*/`, FF08),
//!   `callbackUrl` (HTTPS, RP03), `payeeAlias` (RP01), `payerAlias` (optional: e-commerce,
//!   8–15 digits, BE18), `amount` (a string of digits with optionally two decimals after a
//!   point, 0.01–999999999999.99, PA02), `currency` (SEK, AM03), `message` (at most 50 of
//!   the allowed characters, RP02) and `callbackIdentifier` (optional, 32–36 of
//!   `A-Za-z0-9-`, RP02 being the nearest code the API has). Errors are 422 with a JSON array
//!   of `{errorCode, errorMessage, additionalInformation}`; an instruction id already used is
//!   RP09. 201 with `Location` and, without a payer alias (m-commerce), `PaymentRequestToken`.
//! - `GET /swish-cpcapi/api/v1/paymentrequests/{id}`: the payment request (`status` CREATED,
//!   PAID, DECLINED, ERROR, CANCELLED; `amount` a JSON number; `paymentReference`,
//!   `datePaid`, `errorCode` when they apply).
//! - When the payer answers in the app ([`SwishSim::pay`], [`SwishSim::decline`], or the
//!   request times out, [`SwishSim::time_out`], TM01), the payment request is posted to its
//!   `callbackUrl` over HTTPS, with the `callbackIdentifier` header when one was given,
//!   retried while the receiver answers other than 2xx.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sha2::Digest;

use crate::tls::{TestPki, TlsListener, TlsPeer};

/// A payment request as the stand-in holds it.
#[derive(Debug, Clone)]
pub struct SwishRequest {
    pub id: String,
    pub token: Option<String>,
    /// The body of the PUT, as sent.
    pub body: Value,
    pub status: String,
    pub payment_reference: Option<String>,
    pub error_code: Option<String>,
    pub date_created: String,
    pub date_paid: Option<String>,
}

impl SwishRequest {
    fn field(&self, name: &str) -> Value {
        self.body.get(name).cloned().unwrap_or(Value::Null)
    }

    /// As `GET .../paymentrequests/{id}` and the callback show it.
    fn json(&self) -> Value {
        let amount: Value = self
            .field("amount")
            .as_str()
            .and_then(|a| serde_json::from_str::<serde_json::Number>(a).ok())
            .map_or(Value::Null, Value::Number);
        json!({
            "id": self.id,
            "payeePaymentReference": self.field("payeePaymentReference"),
            "paymentReference": self.payment_reference,
            "callbackUrl": self.field("callbackUrl"),
            "payerAlias": self.field("payerAlias"),
            "payeeAlias": self.field("payeeAlias"),
            "amount": amount,
            "currency": self.field("currency"),
            "message": self.field("message"),
            "status": self.status,
            "dateCreated": self.date_created,
            "datePaid": self.date_paid,
            "errorCode": self.error_code,
            "errorMessage": self.error_code.as_ref().map(|_| "Swish timed out before the payment was started"),
        })
    }
}

#[derive(Default)]
struct SimState {
    requests: HashMap<String, SwishRequest>,
    /// Callback deliveries answered 2xx: (instruction id, status).
    delivered: Vec<(String, String)>,
    counter: u64,
}

#[derive(Clone)]
struct Sim {
    payee_alias: String,
    base: String,
    state: Arc<Mutex<SimState>>,
    callbacks: reqwest::Client,
}

impl Sim {
    fn state(&self) -> std::sync::MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The stand-in on 127.0.0.1, serving one merchant (Swish number).
#[derive(Clone)]
pub struct SwishSim {
    pub addr: SocketAddr,
    sim: Sim,
}

impl SwishSim {
    /// Serves `payee_alias` with a server certificate of `pki`, demanding client certificates
    /// of `pki`, and posts callbacks trusting `pki` (the receiver's ingress has one of its
    /// certificates too).
    pub async fn start(pki: &TestPki, payee_alias: &str) -> anyhow::Result<Self> {
        let listener = TlsListener::bind(pki.acceptor(true)?).await?;
        let addr = listener.addr()?;
        let sim = Sim {
            payee_alias: payee_alias.to_owned(),
            base: format!("https://{addr}/swish-cpcapi"),
            state: Arc::default(),
            callbacks: pki.client_trusting()?,
        };
        let app = axum::Router::new()
            .route(
                "/swish-cpcapi/api/v2/paymentrequests/{id}",
                axum::routing::put(create_request),
            )
            .route(
                "/swish-cpcapi/api/v1/paymentrequests/{id}",
                axum::routing::get(get_request),
            )
            .with_state(sim.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app.into_make_service_with_connect_info::<TlsPeer>()).await;
        });
        Ok(Self { addr, sim })
    }

    /// The API's base URL (`https://cpc.getswish.net/swish-cpcapi` in production).
    pub fn url(&self) -> String {
        self.sim.base.clone()
    }

    pub fn requests(&self) -> Vec<SwishRequest> {
        let mut all: Vec<_> = self.sim.state().requests.values().cloned().collect();
        all.sort_by(|a, b| a.date_created.cmp(&b.date_created).then(a.id.cmp(&b.id)));
        all
    }

    /// Callbacks the receiver took (answered 2xx): instruction id and status.
    pub fn delivered(&self) -> Vec<(String, String)> {
        self.sim.state().delivered.clone()
    }

    /// The payer approves the request with this token in the app (scanned from the QR code,
    /// or opened by the `swish://` link): it is PAID and the callback is posted.
    pub async fn pay(&self, token: &str) -> anyhow::Result<String> {
        self.answer(token, "PAID", None).await
    }

    /// The payer declines it in the app.
    pub async fn decline(&self, token: &str) -> anyhow::Result<String> {
        self.answer(token, "DECLINED", None).await
    }

    /// Nobody answered within Swish's three minutes.
    pub async fn time_out(&self, token: &str) -> anyhow::Result<String> {
        self.answer(token, "ERROR", Some("TM01")).await
    }

    async fn answer(&self, token: &str, status: &str, error: Option<&str>) -> anyhow::Result<String> {
        let request = {
            let mut state = self.sim.state();
            state.counter += 1;
            let counter = state.counter;
            let request = state
                .requests
                .values_mut()
                .find(|r| r.token.as_deref() == Some(token))
                .ok_or_else(|| anyhow::anyhow!("no payment request has the token {token}"))?;
            anyhow::ensure!(
                request.status == "CREATED",
                "the payment request is {} already",
                request.status
            );
            request.status = status.to_owned();
            request.error_code = error.map(str::to_owned);
            if status == "PAID" {
                request.payment_reference = Some(format!("{counter:032X}"));
                request.date_paid = Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
            }
            request.clone()
        };
        self.sim.deliver(&request).await;
        Ok(request.id)
    }
}

impl Sim {
    /// Posts the callback, trying again (briefly, where Swish waits minutes) while the
    /// receiver answers other than 2xx.
    async fn deliver(&self, request: &SwishRequest) {
        let Some(url) = request.field("callbackUrl").as_str().map(str::to_owned) else {
            return;
        };
        for _ in 0..20 {
            let mut post = self.callbacks.post(&url).json(&request.json());
            if let Some(identifier) = request.field("callbackIdentifier").as_str() {
                post = post.header("callbackIdentifier", identifier);
            }
            if let Ok(r) = post.send().await {
                if r.status().is_success() {
                    self.state()
                        .delivered
                        .push((request.id.clone(), request.status.clone()));
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

fn error(code: &str, message: &str) -> Response {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        axum::Json(json!([{ "errorCode": code, "errorMessage": message, "additionalInformation": null }])),
    )
        .into_response()
}

fn message_char_allowed(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || " !?=#$%&()*+,-./:;<'\"@".contains(c)
        || "åäöÅÄÖ^¡¢£€¥¿Š§šŽžŒœŸÀÁÂÃÆÇÈÉÊËÌÍÎÏÐÑÒÓÔÕØÙÚÛÜÝÞßàáâãæçèéêëìíîïðñòóôõøùúûüýþÿ".contains(c)
}

/// The first thing wrong with a payment request's body, as the API's error code and message.
fn invalid(body: &Value) -> Option<(&'static str, &'static str)> {
    let text = |name: &str| body.get(name).and_then(Value::as_str);
    if let Some(reference) = body.get("payeePaymentReference").filter(|v| !v.is_null()) {
        let ok = reference.as_str().is_some_and(|r| {
            (1..=35).contains(&r.len()) && r.chars().all(|c| c.is_ascii_alphanumeric() || "-_.+*/".contains(c))
        });
        if !ok {
            return Some(("FF08", "PaymentReference is invalid"));
        }
    }
    if !text("callbackUrl").is_some_and(|u| u.starts_with("https://") && u.len() > "https://".len()) {
        return Some(("RP03", "Callback URL is missing or does not use HTTPS"));
    }
    if text("payeeAlias").is_none_or(str::is_empty) {
        return Some(("RP01", "Missing Merchant Swish Number"));
    }
    if let Some(payer) = body.get("payerAlias").filter(|v| !v.is_null()) {
        if !payer
            .as_str()
            .is_some_and(|p| (8..=15).contains(&p.len()) && p.chars().all(|c| c.is_ascii_digit()))
        {
            return Some(("BE18", "Payer alias is invalid"));
        }
    }
    let amount_ok = text("amount").is_some_and(|a| {
        let (whole, decimals) = a.split_once('.').unwrap_or((a, "00"));
        let digits = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
        digits(whole)
            && whole.len() <= 12
            && decimals.len() == 2
            && digits(decimals)
            && (!whole.trim_start_matches('0').is_empty() || decimals != "00")
    });
    if !amount_ok {
        return Some(("PA02", "Amount value is missing or not a valid number"));
    }
    if text("currency") != Some("SEK") {
        return Some(("AM03", "Invalid or missing Currency"));
    }
    if let Some(message) = body.get("message").filter(|v| !v.is_null()) {
        if !message
            .as_str()
            .is_some_and(|m| m.chars().count() <= 50 && m.chars().all(message_char_allowed))
        {
            return Some(("RP02", "Wrong formated message"));
        }
    }
    if let Some(identifier) = body.get("callbackIdentifier").filter(|v| !v.is_null()) {
        if !identifier
            .as_str()
            .is_some_and(|i| (32..=36).contains(&i.len()) && i.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        {
            return Some(("RP02", "callbackIdentifier is invalid"));
        }
    }
    None
}

async fn create_request(
    State(sim): State<Sim>,
    ConnectInfo(peer): ConnectInfo<TlsPeer>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if id.len() != 32 || !id.chars().all(|c| c.is_ascii_digit() || ('A'..='F').contains(&c)) {
        return (
            StatusCode::BAD_REQUEST,
            "instructionUUID must be 32 upper-case hexadecimal digits",
        )
            .into_response();
    }
    let certificate_alias = peer.client_common_name.unwrap_or_default();
    if certificate_alias != sim.payee_alias {
        return StatusCode::FORBIDDEN.into_response();
    }
    let json_body = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let Some(body) = json_body.then(|| serde_json::from_slice::<Value>(&body).ok()).flatten() else {
        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, "a JSON body is needed").into_response();
    };
    if let Some((code, message)) = invalid(&body) {
        return error(code, message);
    }
    // The certificate is issued for one Swish number: it cannot ask for another's money.
    if body.get("payeeAlias").and_then(Value::as_str) != Some(certificate_alias.as_str()) {
        return StatusCode::FORBIDDEN.into_response();
    }
    let mut state = sim.state();
    if state.requests.contains_key(&id) {
        return error("RP09", "The given instructionUUID is not available");
    }
    state.counter += 1;
    let m_commerce = body.get("payerAlias").is_none_or(Value::is_null);
    let token = m_commerce.then(|| {
        use base64::Engine;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let seed = sha2::Sha256::digest(format!("{id}/{}/{nanos}", state.counter).as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&seed[..24])
    });
    state.requests.insert(
        id.clone(),
        SwishRequest {
            id: id.clone(),
            token: token.clone(),
            body,
            status: "CREATED".into(),
            payment_reference: None,
            error_code: None,
            date_created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            date_paid: None,
        },
    );
    let mut response = StatusCode::CREATED.into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("{}/api/v1/paymentrequests/{id}", sim.base)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    if let Some(token) = token.and_then(|t| HeaderValue::from_str(&t).ok()) {
        response.headers_mut().insert("PaymentRequestToken", token);
    }
    response
}

async fn get_request(
    State(sim): State<Sim>,
    ConnectInfo(peer): ConnectInfo<TlsPeer>,
    Path(id): Path<String>,
) -> Response {
    let state = sim.state();
    let Some(request) = state.requests.get(&id) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if request.field("payeeAlias").as_str() != peer.client_common_name.as_deref() {
        return StatusCode::FORBIDDEN.into_response();
    }
    axum::Json(request.json()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> Value {
        json!({
            "payeePaymentReference": "0123456789",
            "callbackUrl": "https://example.com/swish",
            "payeeAlias": "1231181189",
            "amount": "100.00",
            "currency": "SEK",
            "message": "Nordkraft faktura 1001",
        })
    }

    #[test]
    fn each_field_is_checked_with_the_documented_code() {
        assert_eq!(invalid(&body()), None);
        let with = |name: &str, value: Value| {
            let mut b = body();
            b[name] = value;
            invalid(&b).map(|(code, _)| code)
        };
        assert_eq!(with("callbackUrl", json!("http://example.com/swish")), Some("RP03"));
        assert_eq!(with("payeePaymentReference", json!("ÅÄÖ")), Some("FF08"));
        assert_eq!(with("payeePaymentReference", json!("x".repeat(36))), Some("FF08"));
        assert_eq!(with("payeeAlias", json!("")), Some("RP01"));
        assert_eq!(with("amount", json!("100,00")), Some("PA02"));
        assert_eq!(with("amount", json!("100.5")), Some("PA02"));
        assert_eq!(with("amount", json!(100)), Some("PA02"));
        assert_eq!(with("amount", json!("0.00")), Some("PA02"));
        assert_eq!(with("amount", json!("100")), None);
        assert_eq!(with("currency", json!("NOK")), Some("AM03"));
        assert_eq!(with("message", json!("x".repeat(51))), Some("RP02"));
        assert_eq!(with("message", json!("Faktura | 1001")), Some("RP02"));
        assert_eq!(with("message", json!("Räkning 1001 (el), mars")), None);
        assert_eq!(with("payerAlias", json!("4670")), Some("BE18"));
    }
}
