//! DEV AND TEST ONLY: local stand-ins for the SMS providers' HTTP APIs, strict about requests
//! in the way each provider's public documentation describes them (auth scheme, content type,
//! field names, number format), answering with the documented success and error bodies, and
//! able to post the provider's delivery receipts back, signed the provider's way.
//!
//! - GatewayAPI: `POST /rest/mtsms`, `Authorization: Token <token>`, JSON with `sender`,
//!   `message`, `recipients: [{"msisdn": <integer, no '+'>}]`, optional `encoding` (UTF8|UCS2),
//!   `userref`, `callback_url`; 200 `{"ids": [...], "usage": {...}}`; errors
//!   `{"code": "0x....", "message": ...}`. Receipts: JSON POST with an HS256 JWT of the fields in
//!   `X-Gwapi-Signature`. (gatewayapi.com/docs/apis/rest, github.com/onlinecity/gatewayapi-docs)
//! - 46elks: `POST /a1/sms`, HTTP Basic (API username and password), form fields `from`, `to`
//!   (E.164 with '+'), `message`, optional `whendelivered`; 200 JSON with `"status": "created"`
//!   and an id starting with `s`; errors in plain text. Receipts: form POST `id`, `status`,
//!   `delivered`, unsigned. (46elks.com/docs/send-sms, 46elks.se/docs/sms-delivery-reports)
//! - Twilio: `POST /2010-04-01/Accounts/{AccountSid}/Messages.json`, HTTP Basic, form fields
//!   `To`, `From`, `Body`, optional `StatusCallback`; 201 JSON with `sid` `SM...` and
//!   `"status": "queued"`; errors `{"code", "message", "more_info", "status"}`. Receipts: form
//!   POST `MessageSid`, `MessageStatus`, signed in `X-Twilio-Signature`.
//!   (twilio.com/docs/messaging/api/message-resource, twilio.com/docs/usage/security)
//!
//! Faults, on request: [`SmsProviderSim::answer_next`] refuses the next requests with the given
//! answers (nothing is taken); [`SmsProviderSim::after_accepting_next`] takes the next messages
//! (they are among [`SmsProviderSim::accepted`], as a real provider would have queued them) and
//! then answers late or with an error, the way a provider or a gateway in front of it can
//! after the message is already on its way.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    GatewayApi,
    Elks46,
    Twilio,
}

/// One SMS the provider accepted.
#[derive(Debug, Clone)]
pub struct AcceptedSms {
    pub id: String,
    pub from: String,
    /// As the provider received it (GatewayAPI: digits without '+').
    pub to: String,
    pub text: String,
    pub callback_url: Option<String>,
    /// GatewayAPI's `userref`, GatewayAPI's `encoding`.
    pub userref: Option<String>,
    pub encoding: Option<String>,
    pub content_type: String,
    /// When the stand-in took it.
    pub accepted_at: std::time::Instant,
}

/// What the stand-in does after it has taken a message, instead of answering its success at
/// once (DEV AND TEST ONLY).
#[derive(Debug, Clone)]
pub enum AfterAccept {
    /// The success answer comes only after this long: a client with a shorter timeout never
    /// learns that the message was taken, nor its id.
    Delay(std::time::Duration),
    /// This status and JSON body instead of the success answer (e.g. a 502 from a gateway in
    /// front of the API, or a 500 from the API after it queued the message).
    Answer(u16, String),
}

#[derive(Default)]
struct SimState {
    accepted: Vec<AcceptedSms>,
    /// Requests refused, with the reason the provider would give.
    refused: Vec<String>,
    /// Answers to give instead of accepting, in order (status, body).
    scripted: Vec<(u16, String)>,
    /// Faults to play after accepting, in order.
    after_accept: Vec<AfterAccept>,
}

#[derive(Clone)]
struct Sim {
    provider: Provider,
    /// GatewayAPI token; 46elks username:password; Twilio AccountSid:AuthToken.
    credential: (String, String),
    state: Arc<Mutex<SimState>>,
}

/// A provider stand-in on 127.0.0.1.
#[derive(Clone)]
pub struct SmsProviderSim {
    pub addr: SocketAddr,
    sim: Sim,
}

impl SmsProviderSim {
    /// `user`/`secret`: GatewayAPI token (user ignored); 46elks API username and password;
    /// Twilio Account SID and Auth Token.
    pub async fn start(provider: Provider, user: &str, secret: &str) -> anyhow::Result<Self> {
        let sim = Sim {
            provider,
            credential: (user.to_owned(), secret.to_owned()),
            state: Arc::default(),
        };
        let app = axum::Router::new()
            .route("/rest/mtsms", axum::routing::post(gatewayapi))
            .route("/a1/sms", axum::routing::post(elks46))
            .route("/2010-04-01/Accounts/{sid}/Messages.json", axum::routing::post(twilio))
            .with_state(sim.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, sim })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn accepted(&self) -> Vec<AcceptedSms> {
        self.sim
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .accepted
            .clone()
    }

    pub fn refused(&self) -> Vec<String> {
        self.sim.state.lock().unwrap_or_else(|p| p.into_inner()).refused.clone()
    }

    /// The next requests get these answers (status, body) instead of being accepted.
    pub fn answer_next(&self, answers: &[(u16, &str)]) {
        self.sim.state.lock().unwrap_or_else(|p| p.into_inner()).scripted =
            answers.iter().map(|(s, b)| (*s, (*b).to_owned())).collect();
    }

    /// The next valid requests are accepted (the message is taken and recorded) and then
    /// answered with these faults, one each, instead of the success answer.
    pub fn after_accepting_next(&self, faults: &[AfterAccept]) {
        self.sim.state.lock().unwrap_or_else(|p| p.into_inner()).after_accept = faults.to_vec();
    }

    /// Posts the provider's delivery receipt for an accepted message to its callback URL,
    /// signed as the provider signs it. `status` in the provider's own words
    /// (GatewayAPI `DELIVERED`/`UNDELIVERABLE`, 46elks `delivered`/`failed`, Twilio
    /// `delivered`/`undelivered`). `key`: GatewayAPI's webhook secret (others ignore it).
    pub async fn send_receipt(&self, id: &str, status: &str, key: &str) -> anyhow::Result<u16> {
        let sms = self
            .accepted()
            .into_iter()
            .find(|s| s.id == id)
            .ok_or_else(|| anyhow::anyhow!("no accepted message {id}"))?;
        let url = sms
            .callback_url
            .clone()
            .ok_or_else(|| anyhow::anyhow!("message {id} has no callback URL"))?;
        let client = reqwest::Client::new();
        let response = match self.sim.provider {
            Provider::GatewayApi => {
                let fields = serde_json::json!({
                    "id": id.parse::<u64>().unwrap_or(0),
                    "msisdn": sms.to.parse::<u64>().unwrap_or(0),
                    "time": 1_800_000_000,
                    "status": status,
                    "userref": sms.userref,
                    "error": if status == "DELIVERED" { serde_json::Value::Null } else { "Handset unreachable".into() },
                    "code": serde_json::Value::Null,
                    "country_code": "DK",
                    "country_prefix": 45,
                });
                let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"HS256"}"#);
                let mut claims = fields.clone();
                claims["callback_url"] = url.clone().into();
                claims["api"] = 4.into();
                let claims = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims)?);
                let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key.as_bytes())?;
                mac.update(format!("{header}.{claims}").as_bytes());
                let jwt = format!(
                    "{header}.{claims}.{}",
                    URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
                );
                client
                    .post(&url)
                    .header("X-Gwapi-Signature", jwt)
                    .json(&fields)
                    .send()
                    .await?
            }
            Provider::Elks46 => {
                let mut form = vec![("id", id.to_owned()), ("status", status.to_owned())];
                if status == "delivered" {
                    form.push(("delivered", "2026-09-02T07:00:05.000000".to_owned()));
                }
                client.post(&url).form(&form).send().await?
            }
            Provider::Twilio => {
                let params: Vec<(String, String)> = vec![
                    ("AccountSid".into(), self.sim.credential.0.clone()),
                    ("From".into(), sms.from.clone()),
                    ("MessageSid".into(), id.to_owned()),
                    ("MessageStatus".into(), status.to_owned()),
                    ("SmsSid".into(), id.to_owned()),
                    ("SmsStatus".into(), status.to_owned()),
                    ("To".into(), sms.to.clone()),
                    ("ApiVersion".into(), "2010-04-01".into()),
                ];
                let mut sorted = params.clone();
                sorted.sort();
                let mut data = url.clone();
                for (k, v) in &sorted {
                    data.push_str(k);
                    data.push_str(v);
                }
                let mut mac = <Hmac<sha1::Sha1> as Mac>::new_from_slice(self.sim.credential.1.as_bytes())?;
                mac.update(data.as_bytes());
                let signature = STANDARD.encode(mac.finalize().into_bytes());
                client
                    .post(&url)
                    .header("X-Twilio-Signature", signature)
                    .form(&params)
                    .send()
                    .await?
            }
        };
        Ok(response.status().as_u16())
    }
}

impl Sim {
    fn refuse(&self, status: StatusCode, reason: String, body: Response) -> Response {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .refused
            .push(reason);
        (status, body).into_response()
    }

    fn scripted(&self) -> Option<(u16, String)> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.scripted.is_empty() {
            None
        } else {
            Some(state.scripted.remove(0))
        }
    }

    fn accept(&self, sms: AcceptedSms) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).accepted.push(sms);
    }

    /// The answer to a request whose message was accepted: `success`, unless a fault is due.
    async fn answer_accepted(&self, success: Response) -> Response {
        let fault = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if state.after_accept.is_empty() {
                None
            } else {
                Some(state.after_accept.remove(0))
            }
        };
        match fault {
            None => success,
            Some(AfterAccept::Delay(delay)) => {
                tokio::time::sleep(delay).await;
                success
            }
            Some(AfterAccept::Answer(status, body)) => {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                (status, [("content-type", "application/json")], body).into_response()
            }
        }
    }

    fn next_number(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).accepted.len() + 1
    }

    fn basic_auth_ok(&self, headers: &HeaderMap) -> bool {
        let expected = format!(
            "Basic {}",
            STANDARD.encode(format!("{}:{}", self.credential.0, self.credential.1))
        );
        headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(expected.as_str())
    }
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

fn form(body: &[u8]) -> Option<HashMap<String, String>> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        .ok()
        .map(|v| v.into_iter().collect())
}

/// The fields of a form-encoded body, when it is one (by content type) and parses.
fn form_body(headers: &HeaderMap, body: &[u8]) -> Option<HashMap<String, String>> {
    if content_type(headers).starts_with("application/x-www-form-urlencoded") {
        form(body)
    } else {
        None
    }
}

fn e164(to: &str) -> bool {
    to.strip_prefix('+')
        .is_some_and(|d| (8..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()))
}

fn gw_error(code: &str, message: &str) -> Response {
    axum::Json(serde_json::json!({
        "code": code,
        "incident_uuid": "00000000-0000-4000-8000-000000000000",
        "message": message,
    }))
    .into_response()
}

async fn gatewayapi(State(sim): State<Sim>, headers: HeaderMap, body: Bytes) -> Response {
    if sim.provider != Provider::GatewayApi {
        return StatusCode::NOT_FOUND.into_response();
    }
    let token_ok = headers.get("authorization").and_then(|v| v.to_str().ok())
        == Some(format!("Token {}", sim.credential.1).as_str());
    if !token_ok {
        return sim.refuse(
            StatusCode::UNAUTHORIZED,
            "no or wrong 'Authorization: Token'".into(),
            gw_error("0x0210", "Invalid API key"),
        );
    }
    if !content_type(&headers).starts_with("application/json") {
        return sim.refuse(
            StatusCode::BAD_REQUEST,
            "not JSON".into(),
            gw_error("0x0222", "Missing parameter: message"),
        );
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return sim.refuse(
            StatusCode::BAD_REQUEST,
            "malformed JSON".into(),
            gw_error("0x0222", "Invalid JSON"),
        );
    };
    const KNOWN: [&str; 6] = ["sender", "message", "recipients", "encoding", "userref", "callback_url"];
    if let Some(unknown) = v
        .as_object()
        .and_then(|o| o.keys().find(|k| !KNOWN.contains(&k.as_str())))
    {
        return sim.refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("unknown field {unknown}"),
            gw_error("0x0222", &format!("Unknown field: {unknown}")),
        );
    }
    let sender = v["sender"].as_str().unwrap_or("");
    let sender_ok = (!sender.is_empty() && sender.len() <= 11 && sender.chars().all(|c| c.is_ascii_alphanumeric()))
        || (sender.len() <= 15 && !sender.is_empty() && sender.bytes().all(|b| b.is_ascii_digit()));
    let message = v["message"].as_str().unwrap_or("");
    let msisdn = v["recipients"]
        .as_array()
        .filter(|r| r.len() == 1)
        .and_then(|r| r[0]["msisdn"].as_u64());
    let encoding = v.get("encoding").and_then(|e| e.as_str()).map(str::to_owned);
    let problem = if !sender_ok {
        Some("sender must be up to 11 letters/digits or 15 digits")
    } else if message.is_empty() {
        Some("message is missing")
    } else if msisdn.is_none() {
        Some("recipients must be [{\"msisdn\": <integer without '+'>}]")
    } else if encoding.as_deref().is_some_and(|e| e != "UTF8" && e != "UCS2") {
        Some("encoding must be UTF8 or UCS2")
    } else {
        None
    };
    if let Some(problem) = problem {
        return sim.refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            problem.into(),
            gw_error("0x0222", problem),
        );
    }
    if let Some((status, body)) = sim.scripted() {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (status, [("content-type", "application/json")], body).into_response();
    }
    let id = (1_000_000 + sim.next_number()).to_string();
    sim.accept(AcceptedSms {
        id: id.clone(),
        from: sender.to_owned(),
        to: msisdn.map(|m| m.to_string()).unwrap_or_default(),
        text: message.to_owned(),
        callback_url: v.get("callback_url").and_then(|c| c.as_str()).map(str::to_owned),
        userref: v.get("userref").and_then(|c| c.as_str()).map(str::to_owned),
        encoding,
        content_type: content_type(&headers),
        accepted_at: std::time::Instant::now(),
    });
    let success = axum::Json(serde_json::json!({
        "ids": [id.parse::<u64>().unwrap_or(0)],
        "usage": {"countries": {"DK": 1}, "currency": "DKK", "total_cost": 0.12}
    }))
    .into_response();
    sim.answer_accepted(success).await
}

async fn elks46(State(sim): State<Sim>, headers: HeaderMap, body: Bytes) -> Response {
    if sim.provider != Provider::Elks46 {
        return StatusCode::NOT_FOUND.into_response();
    }
    if !sim.basic_auth_ok(&headers) {
        return sim.refuse(
            StatusCode::UNAUTHORIZED,
            "no or wrong Basic auth".into(),
            (
                [("WWW-Authenticate", "Basic realm=\"46elks API\"")],
                "API access require proper Basic HTTP authentication. Read documentation or examples.",
            )
                .into_response(),
        );
    }
    let form = match form_body(&headers, &body) {
        Some(f) => f,
        None => {
            return sim.refuse(
                StatusCode::BAD_REQUEST,
                "not form-encoded".into(),
                "Missing key from".into_response(),
            );
        }
    };
    const KNOWN: [&str; 4] = ["from", "to", "message", "whendelivered"];
    for (key, text) in [
        ("from", "Missing key from"),
        ("to", "Missing key to"),
        ("message", "Missing key message"),
    ] {
        if form.get(key).is_none_or(|v| v.is_empty()) {
            return sim.refuse(StatusCode::BAD_REQUEST, text.into(), text.into_response());
        }
    }
    if let Some(unknown) = form.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        let text = format!("Unknown parameter {unknown}");
        return sim.refuse(StatusCode::BAD_REQUEST, text.clone(), text.into_response());
    }
    if !e164(&form["to"]) {
        return sim.refuse(
            StatusCode::FORBIDDEN,
            "Invalid to number".into(),
            "Invalid to number".into_response(),
        );
    }
    if let Some((status, body)) = sim.scripted() {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (status, body).into_response();
    }
    let id = format!("s{:032x}", sim.next_number());
    sim.accept(AcceptedSms {
        id: id.clone(),
        from: form["from"].clone(),
        to: form["to"].clone(),
        text: form["message"].clone(),
        callback_url: form.get("whendelivered").cloned(),
        userref: None,
        encoding: None,
        content_type: content_type(&headers),
        accepted_at: std::time::Instant::now(),
    });
    let success = axum::Json(serde_json::json!({
        "status": "created",
        "direction": "outgoing",
        "from": form["from"],
        "to": form["to"],
        "created": "2026-09-02T07:00:01.000000",
        "message": form["message"],
        "id": id,
        "cost": 3500,
        "parts": 1
    }))
    .into_response();
    sim.answer_accepted(success).await
}

fn twilio_error(status: StatusCode, code: u32, message: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({
            "code": code,
            "message": message,
            "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
            "status": status.as_u16(),
        })),
    )
        .into_response()
}

async fn twilio(State(sim): State<Sim>, Path(sid): Path<String>, headers: HeaderMap, body: Bytes) -> Response {
    if sim.provider != Provider::Twilio {
        return StatusCode::NOT_FOUND.into_response();
    }
    if !sim.basic_auth_ok(&headers) || sid != sim.credential.0 {
        return sim.refuse(
            StatusCode::UNAUTHORIZED,
            "no or wrong Basic auth, or another account's path".into(),
            twilio_error(StatusCode::UNAUTHORIZED, 20003, "Authenticate"),
        );
    }
    let form = match form_body(&headers, &body) {
        Some(f) => f,
        None => {
            return sim.refuse(
                StatusCode::BAD_REQUEST,
                "not form-encoded".into(),
                twilio_error(StatusCode::BAD_REQUEST, 21604, "A 'To' phone number is required."),
            );
        }
    };
    const KNOWN: [&str; 4] = ["To", "From", "Body", "StatusCallback"];
    if let Some(unknown) = form.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return sim.refuse(
            StatusCode::BAD_REQUEST,
            format!("unknown parameter {unknown}"),
            twilio_error(StatusCode::BAD_REQUEST, 21610, &format!("Unknown parameter {unknown}")),
        );
    }
    let to = form.get("To").cloned().unwrap_or_default();
    if !e164(&to) {
        return sim.refuse(
            StatusCode::BAD_REQUEST,
            "To is not E.164".into(),
            twilio_error(
                StatusCode::BAD_REQUEST,
                21211,
                &format!("The 'To' number {to} is not a valid phone number."),
            ),
        );
    }
    if form.get("From").is_none_or(|f| f.is_empty()) {
        return sim.refuse(
            StatusCode::BAD_REQUEST,
            "From missing".into(),
            twilio_error(StatusCode::BAD_REQUEST, 21603, "A 'From' phone number is required."),
        );
    }
    if form.get("Body").is_none_or(|b| b.is_empty()) {
        return sim.refuse(
            StatusCode::BAD_REQUEST,
            "Body missing".into(),
            twilio_error(StatusCode::BAD_REQUEST, 21602, "Message body is required."),
        );
    }
    if let Some((status, body)) = sim.scripted() {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (status, [("content-type", "application/json")], body).into_response();
    }
    let id = format!("SM{:032x}", sim.next_number());
    sim.accept(AcceptedSms {
        id: id.clone(),
        from: form["From"].clone(),
        to: to.clone(),
        text: form["Body"].clone(),
        callback_url: form.get("StatusCallback").cloned(),
        userref: None,
        encoding: None,
        content_type: content_type(&headers),
        accepted_at: std::time::Instant::now(),
    });
    let success = (
        StatusCode::CREATED,
        axum::Json(serde_json::json!({
            "account_sid": sid,
            "api_version": "2010-04-01",
            "body": form["Body"],
            "direction": "outbound-api",
            "from": form["From"],
            "num_segments": "1",
            "sid": id,
            "status": "queued",
            "to": to,
            "uri": format!("/2010-04-01/Accounts/{sid}/Messages/{id}.json"),
        })),
    )
        .into_response();
    sim.answer_accepted(success).await
}
