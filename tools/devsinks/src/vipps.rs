//! DEV AND TEST ONLY: a stand-in for the Vipps MobilePay ePayment API, strict in the way the
//! published documentation describes it (developer.vippsmobilepay.com, and the OpenAPI and
//! guides in github.com/vippsas/vipps-epayment-api and github.com/vippsas/webhooks-api):
//!
//! - `POST /accesstoken/get` with the headers `client_id`, `client_secret`,
//!   `Ocp-Apim-Subscription-Key` and `Merchant-Serial-Number`: `{"token_type": "Bearer",
//!   "expires_in": "3600", "access_token": ...}`.
//! - Every other call needs `Authorization: Bearer <token>`, `Ocp-Apim-Subscription-Key` and
//!   `Merchant-Serial-Number`; a missing or wrong one is 401.
//! - `POST /epayment/v1/payments` needs an `Idempotency-Key`; the body's `amount` (`currency`
//!   NOK, DKK or EUR, `value` a positive integer in minor units), `paymentMethod.type` (WALLET
//!   or CARD), `reference` (`^[a-zA-Z0-9-]{8,64}$`), `userFlow`, `returnUrl` (for
//!   WEB_REDIRECT) and at most 100 characters of `paymentDescription` are checked, with a
//!   problem-details 400 naming the field. The same key and body answer the first answer again;
//!   a reference already used is 409. 201 `{"redirectUrl", "reference"}`.
//! - `GET /epayment/v1/payments/{reference}`: `state` (CREATED, AUTHORIZED, ABORTED, EXPIRED,
//!   TERMINATED), `amount`, `aggregate` (authorized, captured, cancelled, refunded) and
//!   `pspReference`.
//! - `POST /epayment/v1/payments/{reference}/capture` with an `Idempotency-Key` and
//!   `modificationAmount`: only of an AUTHORIZED payment and at most what is left authorized.
//! - `POST /webhooks/v1/webhooks` with `url` and `events`: `{"id", "secret"}`. Events are
//!   posted to the URL as the webhooks API posts them: JSON `{"msn", "reference",
//!   "pspReference", "name", "amount", "timestamp", "idempotencyKey", "success"}`, with
//!   `x-ms-date`, `x-ms-content-sha256` and `Authorization: HMAC-SHA256
//!   SignedHeaders=x-ms-date;host;x-ms-content-sha256&Signature=...`, retried while the
//!   receiver answers other than 2xx.
//!
//! The redirect URL leads to a landing page standing in for the app: "Approve" authorizes the
//! payment, "Cancel" aborts it, and either sends the browser to the merchant's `returnUrl`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The merchant the stand-in serves (its test credentials).
#[derive(Debug, Clone)]
pub struct VippsMerchant {
    pub client_id: String,
    pub client_secret: String,
    pub subscription_key: String,
    pub msn: String,
}

/// A payment as the stand-in holds it.
#[derive(Debug, Clone)]
pub struct VippsPayment {
    pub reference: String,
    pub psp_reference: String,
    pub state: String,
    pub currency: String,
    pub value: i64,
    pub captured: i64,
    pub return_url: String,
    pub description: Option<String>,
    pub idempotency_key: String,
}

#[derive(Default)]
struct SimState {
    token: Option<String>,
    payments: HashMap<String, VippsPayment>,
    /// Idempotency-Key of a create → (body, status, answer).
    created: HashMap<String, (Value, u16, Value)>,
    /// Idempotency-Key of a capture → answer.
    captures: HashMap<String, Value>,
    webhooks: Vec<(String, String, Vec<String>)>,
    /// Webhook deliveries that got a 2xx: (event name, reference).
    delivered: Vec<(String, String)>,
    /// Events not to send (a webhook lost on its way), by name.
    lose: Vec<String>,
    refused: Vec<String>,
    counter: u64,
}

#[derive(Clone)]
struct Sim {
    merchant: VippsMerchant,
    addr: SocketAddr,
    state: Arc<Mutex<SimState>>,
    http: reqwest::Client,
}

/// The stand-in on 127.0.0.1.
#[derive(Clone)]
pub struct VippsSim {
    pub addr: SocketAddr,
    sim: Sim,
}

impl VippsSim {
    pub async fn start(merchant: VippsMerchant) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let sim = Sim {
            merchant,
            addr,
            state: Arc::default(),
            http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?,
        };
        let app = axum::Router::new()
            .route("/accesstoken/get", axum::routing::post(access_token))
            .route("/epayment/v1/payments", axum::routing::post(create_payment))
            .route("/epayment/v1/payments/{reference}", axum::routing::get(get_payment))
            .route(
                "/epayment/v1/payments/{reference}/capture",
                axum::routing::post(capture),
            )
            .route("/webhooks/v1/webhooks", axum::routing::post(register_webhook))
            .route("/landing/{reference}", axum::routing::get(landing))
            .route("/landing/{reference}/{choice}", axum::routing::post(choose))
            .with_state(sim.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, sim })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SimState> {
        self.sim.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn payments(&self) -> Vec<VippsPayment> {
        let mut all: Vec<_> = self.state().payments.values().cloned().collect();
        all.sort_by(|a, b| a.psp_reference.cmp(&b.psp_reference));
        all
    }

    /// Requests refused, with the reason the API gave.
    pub fn refused(&self) -> Vec<String> {
        self.state().refused.clone()
    }

    /// Webhook events the receiver took (answered 2xx): (event name, reference).
    pub fn delivered(&self) -> Vec<(String, String)> {
        self.state().delivered.clone()
    }

    /// Events with this name are not sent from now on: the merchant has to ask.
    pub fn lose_webhooks(&self, name: &str) {
        self.state().lose.push(name.to_owned());
    }

    /// Registers a webhook the way an operator does once per merchant (`POST
    /// /webhooks/v1/webhooks` over HTTP, with a token); the secret it answers.
    pub async fn register_webhook(&self, url: &str, events: &[&str]) -> anyhow::Result<String> {
        let m = &self.sim.merchant;
        let http = reqwest::Client::new();
        let token: Value = http
            .post(format!("{}/accesstoken/get", self.url()))
            .header("client_id", &m.client_id)
            .header("client_secret", &m.client_secret)
            .header("Ocp-Apim-Subscription-Key", &m.subscription_key)
            .header("Merchant-Serial-Number", &m.msn)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let answer: Value = http
            .post(format!("{}/webhooks/v1/webhooks", self.url()))
            .bearer_auth(token["access_token"].as_str().unwrap_or_default())
            .header("Ocp-Apim-Subscription-Key", &m.subscription_key)
            .header("Merchant-Serial-Number", &m.msn)
            .json(&json!({ "url": url, "events": events }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(answer["secret"].as_str().unwrap_or_default().to_owned())
    }

    /// What the user's "Approve" in the app does, without a browser.
    pub async fn approve(&self, reference: &str) -> anyhow::Result<()> {
        decide(&self.sim, reference, "approve").await.map(|_| ())
    }
}

/// RFC 7807 problem details, as the API answers errors.
fn problem(sim: &Sim, status: StatusCode, detail: &str) -> Response {
    sim.state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .refused
        .push(detail.to_owned());
    (
        status,
        [(header::CONTENT_TYPE, "application/problem+json")],
        json!({
            "type": "https://developer.vippsmobilepay.com/docs/APIs/epayment-api/api-guide/errors",
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "detail": detail,
            "instance": "/epayment/v1/payments",
        })
        .to_string(),
    )
        .into_response()
}

fn h<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The checks every call but the token's needs; the problem when one fails.
fn authorized(sim: &Sim, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let m = &sim.merchant;
    let deny = |why: &str| Err(Box::new(problem(sim, StatusCode::UNAUTHORIZED, why)));
    if h(headers, "Ocp-Apim-Subscription-Key") != Some(m.subscription_key.as_str()) {
        return deny("Ocp-Apim-Subscription-Key is missing or wrong");
    }
    if h(headers, "Merchant-Serial-Number") != Some(m.msn.as_str()) {
        return deny("Merchant-Serial-Number is missing or wrong");
    }
    let token = sim.state.lock().unwrap_or_else(|p| p.into_inner()).token.clone();
    let bearer = h(headers, "Authorization").and_then(|v| v.strip_prefix("Bearer "));
    if token.is_none() || bearer != token.as_deref() {
        return deny("Authorization: the access token is missing or invalid");
    }
    Ok(())
}

async fn access_token(State(sim): State<Sim>, headers: HeaderMap) -> Response {
    let m = &sim.merchant;
    let ok = h(&headers, "client_id") == Some(m.client_id.as_str())
        && h(&headers, "client_secret") == Some(m.client_secret.as_str())
        && h(&headers, "Ocp-Apim-Subscription-Key") == Some(m.subscription_key.as_str())
        && h(&headers, "Merchant-Serial-Number") == Some(m.msn.as_str());
    if !ok {
        return problem(
            &sim,
            StatusCode::UNAUTHORIZED,
            "client_id, client_secret, Ocp-Apim-Subscription-Key or Merchant-Serial-Number is wrong",
        );
    }
    let token = {
        let mut state = sim.state.lock().unwrap_or_else(|p| p.into_inner());
        state.counter += 1;
        let token = format!("eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.stand-in-{}", state.counter);
        state.token = Some(token.clone());
        token
    };
    axum::Json(json!({
        "token_type": "Bearer",
        "expires_in": "3600",
        "ext_expires_in": "3600",
        "access_token": token,
    }))
    .into_response()
}

/// The create body's problem, naming the field, when it has one.
fn invalid_create(body: &Value) -> Option<String> {
    let amount = &body["amount"];
    match amount["currency"].as_str() {
        Some("NOK" | "DKK" | "EUR") => {}
        other => return Some(format!("amount.currency must be NOK, DKK or EUR, not {other:?}")),
    }
    if amount["value"].as_i64().is_none_or(|v| v <= 0) {
        return Some("amount.value must be a positive integer in minor units".into());
    }
    if !matches!(body["paymentMethod"]["type"].as_str(), Some("WALLET" | "CARD")) {
        return Some("paymentMethod.type must be WALLET or CARD".into());
    }
    let reference = body["reference"].as_str().unwrap_or_default();
    if !(8..=64).contains(&reference.len()) || !reference.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Some(format!(
            "reference must match ^[a-zA-Z0-9-]{{8,64}}$, not '{reference}'"
        ));
    }
    let flow = body["userFlow"].as_str().unwrap_or_default();
    if !matches!(flow, "WEB_REDIRECT" | "NATIVE_REDIRECT" | "PUSH_MESSAGE" | "QR") {
        return Some(format!(
            "userFlow must be WEB_REDIRECT, NATIVE_REDIRECT, PUSH_MESSAGE or QR, not '{flow}'"
        ));
    }
    if matches!(flow, "WEB_REDIRECT" | "NATIVE_REDIRECT")
        && !body["returnUrl"].as_str().is_some_and(|u| u.starts_with("http"))
    {
        return Some("returnUrl is required for this userFlow".into());
    }
    if body["paymentDescription"]
        .as_str()
        .is_some_and(|d| d.chars().count() > 100)
    {
        return Some("paymentDescription is at most 100 characters".into());
    }
    None
}

async fn create_payment(State(sim): State<Sim>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = authorized(&sim, &headers) {
        return *r;
    }
    let Some(key) = h(&headers, "Idempotency-Key")
        .filter(|k| !k.is_empty() && k.len() <= 50)
        .map(str::to_owned)
    else {
        return problem(
            &sim,
            StatusCode::BAD_REQUEST,
            "Idempotency-Key is required (at most 50 characters)",
        );
    };
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return problem(&sim, StatusCode::BAD_REQUEST, "the body is not JSON");
    };
    if let Some(why) = invalid_create(&body) {
        return problem(&sim, StatusCode::BAD_REQUEST, &why);
    }
    let reference = body["reference"].as_str().unwrap_or_default().to_owned();
    let answer = {
        let mut state = sim.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((first, status, answer)) = state.created.get(&key) {
            if *first == body {
                return (
                    StatusCode::from_u16(*status).unwrap_or(StatusCode::CREATED),
                    axum::Json(answer.clone()),
                )
                    .into_response();
            }
            drop(state);
            return problem(
                &sim,
                StatusCode::CONFLICT,
                "the Idempotency-Key was used with another request",
            );
        }
        if state.payments.contains_key(&reference) {
            drop(state);
            return problem(
                &sim,
                StatusCode::CONFLICT,
                &format!("reference '{reference}' is already used"),
            );
        }
        state.counter += 1;
        let payment = VippsPayment {
            reference: reference.clone(),
            psp_reference: format!("{}", 7_000_000_000u64 + state.counter),
            state: "CREATED".into(),
            currency: body["amount"]["currency"].as_str().unwrap_or_default().to_owned(),
            value: body["amount"]["value"].as_i64().unwrap_or_default(),
            captured: 0,
            return_url: body["returnUrl"].as_str().unwrap_or_default().to_owned(),
            description: body["paymentDescription"].as_str().map(str::to_owned),
            idempotency_key: key.clone(),
        };
        state.payments.insert(reference.clone(), payment);
        let answer = json!({
            "redirectUrl": format!("http://{}/landing/{reference}", sim.addr),
            "reference": reference,
        });
        state.created.insert(key, (body, 201, answer.clone()));
        answer
    };
    notify(&sim, &reference, "CREATED");
    (StatusCode::CREATED, axum::Json(answer)).into_response()
}

fn payment_json(sim: &Sim, p: &VippsPayment) -> Value {
    let amount = |value: i64| json!({ "currency": p.currency, "value": value });
    let authorized = if matches!(p.state.as_str(), "AUTHORIZED") {
        p.value
    } else {
        0
    };
    json!({
        "reference": p.reference,
        "pspReference": p.psp_reference,
        "state": p.state,
        "amount": amount(p.value),
        "aggregate": {
            "authorizedAmount": amount(authorized),
            "capturedAmount": amount(p.captured),
            "cancelledAmount": amount(0),
            "refundedAmount": amount(0),
        },
        "paymentMethod": { "type": "WALLET" },
        "profile": {},
        "redirectUrl": format!("http://{}/landing/{}", sim.addr, p.reference),
    })
}

async fn get_payment(State(sim): State<Sim>, headers: HeaderMap, Path(reference): Path<String>) -> Response {
    if let Err(r) = authorized(&sim, &headers) {
        return *r;
    }
    let found = sim
        .state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .payments
        .get(&reference)
        .cloned();
    match found {
        Some(p) => axum::Json(payment_json(&sim, &p)).into_response(),
        None => problem(
            &sim,
            StatusCode::NOT_FOUND,
            &format!("no payment with reference '{reference}'"),
        ),
    }
}

async fn capture(State(sim): State<Sim>, headers: HeaderMap, Path(reference): Path<String>, body: Bytes) -> Response {
    if let Err(r) = authorized(&sim, &headers) {
        return *r;
    }
    let Some(key) = h(&headers, "Idempotency-Key")
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
    else {
        return problem(&sim, StatusCode::BAD_REQUEST, "Idempotency-Key is required");
    };
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return problem(&sim, StatusCode::BAD_REQUEST, "the body is not JSON");
    };
    let answer = {
        let mut state = sim.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(answer) = state.captures.get(&key) {
            return axum::Json(answer.clone()).into_response();
        }
        let Some(p) = state.payments.get_mut(&reference) else {
            drop(state);
            return problem(
                &sim,
                StatusCode::NOT_FOUND,
                &format!("no payment with reference '{reference}'"),
            );
        };
        let amount = &body["modificationAmount"];
        let value = amount["value"].as_i64().unwrap_or_default();
        if amount["currency"].as_str() != Some(p.currency.as_str()) || value <= 0 {
            drop(state);
            return problem(
                &sim,
                StatusCode::BAD_REQUEST,
                "modificationAmount must be a positive amount in the payment's currency",
            );
        }
        if p.state != "AUTHORIZED" {
            let why = format!("a {} payment cannot be captured", p.state);
            drop(state);
            return problem(&sim, StatusCode::BAD_REQUEST, &why);
        }
        if p.captured + value > p.value {
            drop(state);
            return problem(
                &sim,
                StatusCode::BAD_REQUEST,
                "modificationAmount is more than is left authorized",
            );
        }
        p.captured += value;
        let answer = payment_json(&sim, p);
        state.captures.insert(key, answer.clone());
        answer
    };
    notify(&sim, &reference, "CAPTURED");
    axum::Json(answer).into_response()
}

async fn register_webhook(State(sim): State<Sim>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = authorized(&sim, &headers) {
        return *r;
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return problem(&sim, StatusCode::BAD_REQUEST, "the body is not JSON");
    };
    let url = body["url"].as_str().unwrap_or_default().to_owned();
    let events: Vec<String> = body["events"]
        .as_array()
        .map(|e| e.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    if !url.starts_with("http") || events.is_empty() {
        return problem(&sim, StatusCode::BAD_REQUEST, "url and events are required");
    }
    let mut state = sim.state.lock().unwrap_or_else(|p| p.into_inner());
    state.counter += 1;
    let id = format!("{:08x}-0000-4000-8000-{:012x}", state.counter, state.counter);
    let secret = STANDARD.encode(Sha256::digest(format!("{id}/{url}").as_bytes()));
    state.webhooks.push((url, secret.clone(), events));
    (StatusCode::CREATED, axum::Json(json!({ "id": id, "secret": secret }))).into_response()
}

async fn landing(State(sim): State<Sim>, Path(reference): Path<String>) -> Response {
    let found = sim
        .state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .payments
        .get(&reference)
        .cloned();
    let Some(p) = found else {
        return (StatusCode::NOT_FOUND, "unknown payment").into_response();
    };
    let amount = format!("{}.{:02} {}", p.value / 100, p.value % 100, p.currency);
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Vipps MobilePay (stand-in)</title></head><body><main>\
         <h1>Pay {amount}</h1><p class=\"description\">{}</p>\
         <form method=\"post\" action=\"/landing/{reference}/approve\"><button id=\"approve\" type=\"submit\">Approve</button></form>\
         <form method=\"post\" action=\"/landing/{reference}/cancel\"><button id=\"cancel\" type=\"submit\">Cancel</button></form>\
         </main></body></html>",
        p.description.unwrap_or_default().replace('<', "&lt;")
    ))
    .into_response()
}

async fn choose(State(sim): State<Sim>, Path((reference, choice)): Path<(String, String)>) -> Response {
    match decide(&sim, &reference, &choice).await {
        Ok(return_url) => Redirect::to(&return_url).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

/// The user's choice in the app: the payment's new state, its event, and where the browser
/// goes next.
async fn decide(sim: &Sim, reference: &str, choice: &str) -> anyhow::Result<String> {
    let (name, return_url) = {
        let mut state = sim.state.lock().unwrap_or_else(|p| p.into_inner());
        let p = state
            .payments
            .get_mut(reference)
            .ok_or_else(|| anyhow::anyhow!("unknown payment"))?;
        anyhow::ensure!(p.state == "CREATED", "the payment is {} already", p.state);
        p.state = if choice == "approve" { "AUTHORIZED" } else { "ABORTED" }.into();
        (p.state.clone(), p.return_url.clone())
    };
    notify(sim, reference, &name);
    Ok(return_url)
}

/// Posts the event to every webhook registered for it, signed, in the background, retrying
/// while the receiver does not take it.
fn notify(sim: &Sim, reference: &str, name: &str) {
    let (payment, hooks) = {
        let state = sim.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.lose.iter().any(|n| n == name) {
            return;
        }
        let event = format!("epayments.payment.{}.v1", name.to_ascii_lowercase());
        let hooks: Vec<(String, String)> = state
            .webhooks
            .iter()
            .filter(|(_, _, events)| events.contains(&event))
            .map(|(u, s, _)| (u.clone(), s.clone()))
            .collect();
        (state.payments.get(reference).cloned(), hooks)
    };
    let Some(p) = payment else { return };
    let amount = if name == "CAPTURED" { p.captured } else { p.value };
    let body = json!({
        "msn": sim.merchant.msn,
        "reference": p.reference,
        "pspReference": p.psp_reference,
        "name": name,
        "amount": { "currency": p.currency, "value": amount },
        "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "idempotencyKey": p.idempotency_key,
        "success": true,
    })
    .to_string();
    for (url, secret) in hooks {
        let sim = sim.clone();
        let body = body.clone();
        let name = name.to_owned();
        let reference = reference.to_owned();
        tokio::spawn(async move {
            for attempt in 0..30u64 {
                if let Ok(status) = post_signed(&sim.http, &url, &secret, &body).await {
                    if (200..300).contains(&status) {
                        sim.state
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .delivered
                            .push((name, reference));
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(200 * (attempt + 1).min(10))).await;
            }
        });
    }
}

/// One delivery, signed as the webhooks API signs: HMAC-SHA256 of
/// `POST\n<path and query>\n<x-ms-date>;<host>;<x-ms-content-sha256>`.
async fn post_signed(http: &reqwest::Client, url: &str, secret: &str, body: &str) -> anyhow::Result<u16> {
    let parsed = reqwest::Url::parse(url)?;
    let host = match parsed.port() {
        Some(port) => format!("{}:{port}", parsed.host_str().unwrap_or_default()),
        None => parsed.host_str().unwrap_or_default().to_owned(),
    };
    let path_and_query = match parsed.query() {
        Some(q) => format!("{}?{q}", parsed.path()),
        None => parsed.path().to_owned(),
    };
    let date = chrono::Utc::now().format("%a, %d %b %Y %H:%M:%S GMT").to_string();
    let content_hash = STANDARD.encode(Sha256::digest(body.as_bytes()));
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())?;
    mac.update(format!("POST\n{path_and_query}\n{date};{host};{content_hash}").as_bytes());
    let signature = STANDARD.encode(mac.finalize().into_bytes());
    let response = http
        .post(url)
        .header("x-ms-date", date)
        .header("x-ms-content-sha256", content_hash)
        .header(
            "Authorization",
            format!("HMAC-SHA256 SignedHeaders=x-ms-date;host;x-ms-content-sha256&Signature={signature}"),
        )
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.to_owned())
        .send()
        .await?;
    Ok(response.status().as_u16())
}
