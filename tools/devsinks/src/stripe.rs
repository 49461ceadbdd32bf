//! DEV AND TEST ONLY: a stand-in for Stripe Checkout, strict in the way Stripe's API reference
//! describes it (docs.stripe.com/api/checkout/sessions/create, /api/webhook_endpoints,
//! docs.stripe.com/webhooks#verify-manually, docs.stripe.com/currencies#minimum-and-maximum-charge-amounts):
//!
//! - Every call needs `Authorization: Bearer <secret key>`; another key is 401 with Stripe's
//!   error body `{"error": {"type": "invalid_request_error", "message": ...}}`.
//! - `POST /v1/checkout/sessions`, form-encoded with bracketed keys: `mode=payment`,
//!   `success_url`, `line_items[0][price_data][currency]` (lower case), `[unit_amount]` (an
//!   integer in minor units, at least the currency's minimum charge: NOK 3.00, SEK 3.00,
//!   DKK 2.50, EUR 0.50), `[product_data][name]` and `line_items[0][quantity]`; 400 naming
//!   the parameter otherwise. An `Idempotency-Key` seen before answers the first answer again,
//!   or 400 `idempotency_error` if the parameters differ. The session: `id` `cs_test_...`,
//!   `url`, `status` open, `payment_status` unpaid, `amount_total`, `currency`,
//!   `client_reference_id`, `metadata`.
//! - `GET /v1/checkout/sessions/{id}`.
//! - `POST /v1/webhook_endpoints` with `url` and `enabled_events[]`: `{"id": "we_...",
//!   "secret": "whsec_..."}`. Events go to the URL as Stripe sends them: JSON `{"id": "evt_...",
//!   "object": "event", "type", "created", "data": {"object": <session>}}` signed in
//!   `Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, retried while the
//!   endpoint answers other than 2xx.
//!
//! The session's URL leads to a payment page standing in for Checkout: the test card
//! 4242 4242 4242 4242 pays (the session completes, `checkout.session.completed` is sent and
//! the browser goes to `success_url` with `{CHECKOUT_SESSION_ID}` filled in);
//! 4000 0000 0000 0002 is declined (nothing changes); "Back" goes to `cancel_url`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

/// A Checkout Session as the stand-in holds it.
#[derive(Debug, Clone)]
pub struct StripeSession {
    pub id: String,
    pub status: String,
    pub payment_status: String,
    pub amount_total: i64,
    pub currency: String,
    pub client_reference_id: Option<String>,
    pub success_url: String,
    pub cancel_url: Option<String>,
    pub locale: Option<String>,
    pub name: String,
}

#[derive(Default)]
struct SimState {
    sessions: HashMap<String, StripeSession>,
    idempotent: HashMap<String, (Vec<(String, String)>, Value)>,
    endpoints: Vec<(String, String, Vec<String>)>,
    delivered: Vec<(String, String)>,
    lose: Vec<String>,
    refused: Vec<String>,
    counter: u64,
}

#[derive(Clone)]
struct Sim {
    secret_key: String,
    addr: SocketAddr,
    state: Arc<Mutex<SimState>>,
    http: reqwest::Client,
}

#[derive(Clone)]
pub struct StripeSim {
    pub addr: SocketAddr,
    sim: Sim,
}

impl StripeSim {
    pub async fn start(secret_key: &str) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let sim = Sim {
            secret_key: secret_key.to_owned(),
            addr,
            state: Arc::default(),
            http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?,
        };
        let app = axum::Router::new()
            .route("/v1/checkout/sessions", axum::routing::post(create_session))
            .route("/v1/checkout/sessions/{id}", axum::routing::get(get_session))
            .route("/v1/webhook_endpoints", axum::routing::post(create_endpoint))
            .route("/c/pay/{id}", axum::routing::get(checkout_page))
            .route("/c/pay/{id}/pay", axum::routing::post(pay))
            .route("/c/pay/{id}/back", axum::routing::get(back))
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

    pub fn sessions(&self) -> Vec<StripeSession> {
        let mut all: Vec<_> = self.state().sessions.values().cloned().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    pub fn refused(&self) -> Vec<String> {
        self.state().refused.clone()
    }

    /// Events the endpoint took (answered 2xx): (event type, session id).
    pub fn delivered(&self) -> Vec<(String, String)> {
        self.state().delivered.clone()
    }

    /// Events of this type are not sent from now on.
    pub fn lose_webhooks(&self, event_type: &str) {
        self.state().lose.push(event_type.to_owned());
    }

    /// Registers a webhook endpoint as an operator does once (`POST /v1/webhook_endpoints`
    /// over HTTP); its signing secret.
    pub async fn register_webhook(&self, url: &str, events: &[&str]) -> anyhow::Result<String> {
        let mut form = vec![("url".to_owned(), url.to_owned())];
        for (i, e) in events.iter().enumerate() {
            form.push((format!("enabled_events[{i}]"), (*e).to_owned()));
        }
        let answer: Value = reqwest::Client::new()
            .post(format!("{}/v1/webhook_endpoints", self.url()))
            .bearer_auth(&self.sim.secret_key)
            .form(&form)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(answer["secret"].as_str().unwrap_or_default().to_owned())
    }
}

fn error(sim: &Sim, status: StatusCode, kind: &str, param: Option<&str>, message: &str) -> Response {
    sim.state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .refused
        .push(message.to_owned());
    (
        status,
        axum::Json(json!({ "error": { "type": kind, "param": param, "message": message } })),
    )
        .into_response()
}

fn authorized(sim: &Sim, headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        == Some(sim.secret_key.as_str())
}

fn unauthorized(sim: &Sim) -> Response {
    error(
        sim,
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        None,
        "Invalid API Key provided",
    )
}

/// The smallest charge Stripe takes in a currency, in minor units.
fn minimum_charge(currency: &str) -> Option<i64> {
    match currency {
        "nok" | "sek" => Some(300),
        "dkk" => Some(250),
        "eur" => Some(50),
        _ => None,
    }
}

fn session_json(s: &StripeSession, addr: SocketAddr) -> Value {
    json!({
        "id": s.id,
        "object": "checkout.session",
        "mode": "payment",
        "livemode": false,
        "status": s.status,
        "payment_status": s.payment_status,
        "amount_total": s.amount_total,
        "currency": s.currency,
        "client_reference_id": s.client_reference_id,
        "success_url": s.success_url,
        "cancel_url": s.cancel_url,
        "locale": s.locale,
        "url": if s.status == "open" { Value::from(format!("http://{addr}/c/pay/{}", s.id)) } else { Value::Null },
    })
}

async fn create_session(State(sim): State<Sim>, headers: HeaderMap, body: Bytes) -> Response {
    if !authorized(&sim, &headers) {
        return unauthorized(&sim);
    }
    let Ok(params) = serde_urlencoded::from_bytes::<Vec<(String, String)>>(&body) else {
        return error(
            &sim,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            "the body is not form-encoded",
        );
    };
    let get = |k: &str| params.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(key) = &key {
        let seen = sim
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .idempotent
            .get(key)
            .cloned();
        if let Some((first, answer)) = seen {
            if first == params {
                return axum::Json(answer).into_response();
            }
            return error(
                &sim,
                StatusCode::BAD_REQUEST,
                "idempotency_error",
                None,
                "Keys for idempotent requests can only be used with the same parameters they were first used with",
            );
        }
    }
    if get("mode").as_deref() != Some("payment") {
        return error(
            &sim,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("mode"),
            "mode must be payment",
        );
    }
    let Some(success_url) = get("success_url").filter(|u| u.starts_with("http")) else {
        return error(
            &sim,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("success_url"),
            "Missing required param: success_url.",
        );
    };
    let currency = get("line_items[0][price_data][currency]").unwrap_or_default();
    if currency.len() != 3 || currency.chars().any(|c| !c.is_ascii_lowercase()) {
        return error(
            &sim,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("line_items[0][price_data][currency]"),
            "Invalid currency: a lower-case ISO code is required",
        );
    }
    let Some(unit_amount) = get("line_items[0][price_data][unit_amount]").and_then(|a| a.parse::<i64>().ok()) else {
        return error(
            &sim,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("line_items[0][price_data][unit_amount]"),
            "Invalid integer",
        );
    };
    let Some(quantity) = get("line_items[0][quantity]")
        .and_then(|q| q.parse::<i64>().ok())
        .filter(|q| *q >= 1)
    else {
        return error(
            &sim,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("line_items[0][quantity]"),
            "Missing required param: line_items[0][quantity].",
        );
    };
    let Some(name) = get("line_items[0][price_data][product_data][name]").filter(|n| !n.is_empty()) else {
        return error(
            &sim,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("line_items[0][price_data][product_data][name]"),
            "Missing required param: line_items[0][price_data][product_data][name].",
        );
    };
    let total = unit_amount * quantity;
    if minimum_charge(&currency).is_none_or(|min| total < min) {
        return error(
            &sim,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("line_items[0][price_data][unit_amount]"),
            "amount_too_small: the amount is below the minimum charge amount for the currency",
        );
    }
    let answer = {
        let mut state = sim.state.lock().unwrap_or_else(|p| p.into_inner());
        state.counter += 1;
        let session = StripeSession {
            id: format!("cs_test_{:024x}", state.counter * 0x9e37_79b9),
            status: "open".into(),
            payment_status: "unpaid".into(),
            amount_total: total,
            currency,
            client_reference_id: get("client_reference_id"),
            success_url,
            cancel_url: get("cancel_url"),
            locale: get("locale"),
            name,
        };
        let answer = session_json(&session, sim.addr);
        state.sessions.insert(session.id.clone(), session);
        if let Some(key) = key {
            state.idempotent.insert(key, (params, answer.clone()));
        }
        answer
    };
    axum::Json(answer).into_response()
}

async fn get_session(State(sim): State<Sim>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if !authorized(&sim, &headers) {
        return unauthorized(&sim);
    }
    let found = sim
        .state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .sessions
        .get(&id)
        .cloned();
    match found {
        Some(s) => axum::Json(session_json(&s, sim.addr)).into_response(),
        None => error(
            &sim,
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("id"),
            &format!("No such checkout.session: '{id}'"),
        ),
    }
}

async fn create_endpoint(State(sim): State<Sim>, headers: HeaderMap, body: Bytes) -> Response {
    if !authorized(&sim, &headers) {
        return unauthorized(&sim);
    }
    let params: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let url = params
        .iter()
        .find(|(k, _)| k == "url")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let events: Vec<String> = params
        .iter()
        .filter(|(k, _)| k.starts_with("enabled_events["))
        .map(|(_, v)| v.clone())
        .collect();
    if !url.starts_with("http") || events.is_empty() {
        return error(
            &sim,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("url"),
            "url and enabled_events are required",
        );
    }
    let mut state = sim.state.lock().unwrap_or_else(|p| p.into_inner());
    state.counter += 1;
    let id = format!("we_{:024x}", state.counter);
    let secret = format!("whsec_{:032x}", state.counter.wrapping_mul(0x5851_f42d_4c95_7f2d));
    state.endpoints.push((url.clone(), secret.clone(), events.clone()));
    axum::Json(
        json!({ "id": id, "object": "webhook_endpoint", "url": url, "enabled_events": events, "secret": secret }),
    )
    .into_response()
}

async fn checkout_page(State(sim): State<Sim>, Path(id): Path<String>) -> Response {
    let found = sim
        .state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .sessions
        .get(&id)
        .cloned();
    let Some(s) = found.filter(|s| s.status == "open") else {
        return (StatusCode::NOT_FOUND, "This Checkout Session is no longer active.").into_response();
    };
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Checkout (stand-in)</title></head><body><main>\
         <h1>{} {}.{:02}</h1><p>{}</p>\
         <form method=\"post\" action=\"/c/pay/{id}/pay\"><label for=\"card\">Card number</label> <input id=\"card\" name=\"card\" autocomplete=\"cc-number\" required>\
         <button id=\"pay\" type=\"submit\">Pay</button></form>\
         <p><a id=\"back\" href=\"/c/pay/{id}/back\">Back</a></p></main></body></html>",
        s.currency.to_uppercase(),
        s.amount_total / 100,
        s.amount_total % 100,
        s.name.replace('<', "&lt;")
    ))
    .into_response()
}

async fn pay(State(sim): State<Sim>, Path(id): Path<String>, body: Bytes) -> Response {
    let params: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let card: String = params
        .iter()
        .find(|(k, _)| k == "card")
        .map(|(_, v)| v.chars().filter(char::is_ascii_digit).collect())
        .unwrap_or_default();
    let session = {
        let mut state = sim.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(s) = state.sessions.get_mut(&id).filter(|s| s.status == "open") else {
            return (StatusCode::NOT_FOUND, "This Checkout Session is no longer active.").into_response();
        };
        match card.as_str() {
            "4242424242424242" => {
                s.status = "complete".into();
                s.payment_status = "paid".into();
                s.clone()
            }
            "4000000000000002" => {
                return (
                    StatusCode::PAYMENT_REQUIRED,
                    Html("<p id=\"declined\">Your card was declined.</p>"),
                )
                    .into_response();
            }
            _ => return (StatusCode::BAD_REQUEST, Html("<p>Your card number is invalid.</p>")).into_response(),
        }
    };
    notify(&sim, "checkout.session.completed", &session);
    Redirect::to(&session.success_url.replace("{CHECKOUT_SESSION_ID}", &session.id)).into_response()
}

async fn back(State(sim): State<Sim>, Path(id): Path<String>) -> Response {
    let found = sim
        .state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .sessions
        .get(&id)
        .cloned();
    match found.and_then(|s| s.cancel_url) {
        Some(url) => Redirect::to(&url).into_response(),
        None => (StatusCode::NOT_FOUND, "no cancel_url").into_response(),
    }
}

fn notify(sim: &Sim, event_type: &str, session: &StripeSession) {
    let hooks: Vec<(String, String)> = {
        let mut state = sim.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.lose.iter().any(|t| t == event_type) {
            return;
        }
        state.counter += 1;
        state
            .endpoints
            .iter()
            .filter(|(_, _, events)| events.iter().any(|e| e == event_type || e == "*"))
            .map(|(u, s, _)| (u.clone(), s.clone()))
            .collect()
    };
    let body = json!({
        "id": format!("evt_{}", session.id.trim_start_matches("cs_test_")),
        "object": "event",
        "api_version": "2024-06-20",
        "created": chrono::Utc::now().timestamp(),
        "type": event_type,
        "livemode": false,
        "data": { "object": session_json(session, sim.addr) },
    })
    .to_string();
    for (url, secret) in hooks {
        let (sim, body, event_type, id) = (sim.clone(), body.clone(), event_type.to_owned(), session.id.clone());
        tokio::spawn(async move {
            for attempt in 0..30u64 {
                let t = chrono::Utc::now().timestamp();
                let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()) else {
                    return;
                };
                mac.update(format!("{t}.{body}").as_bytes());
                let signature = hex_lower(&mac.finalize().into_bytes());
                let sent = sim
                    .http
                    .post(&url)
                    .header("Stripe-Signature", format!("t={t},v1={signature}"))
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                if sent.is_ok_and(|r| r.status().is_success()) {
                    sim.state
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .delivered
                        .push((event_type, id));
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200 * (attempt + 1).min(10))).await;
            }
        });
    }
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
