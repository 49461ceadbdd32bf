//! DEV AND TEST ONLY: a collection agency's case API, strict as the generic agency API in the
//! README ("The agency API") describes it, written from that text and not from hand-off's code.
//!
//! - `POST /cases` takes a case (JSON), `POST /recalls` a recall of a case paid in full to the
//!   creditor, `POST /payments` a part payment to book on a case.
//! - Every request needs `Idempotency-Key` (a case's id; a recall's or payment's event id) and,
//!   when the agency has a signing secret, `X-Forfall-Timestamp` and `X-Forfall-Signature`
//!   (`v1=` hex HMAC-SHA256 of `<timestamp>.<body>`, 5 minutes' tolerance): 400 without the
//!   key or with one that is not the body's id, 401 unsigned or forged.
//! - A key seen before gets the first answer again (the same reference); the same key with
//!   another body gets 409 with the reference. So a retried case is one case.
//! - What is not a case gets 422 with what is wrong; a case the agency will not take (see
//!   [`AgencyApi::refuse_debtor`]) 422 with its reason; a recall or payment for a case the
//!   agency does not hold 422, and a recall that leaves money open (or a payment that leaves
//!   none) 422.
//! - Faults on request: the next answers as 5xx ([`AgencyApi::fail_next`]), or held longer than
//!   the caller waits ([`AgencyApi::stall_next`]), the request still processed afterwards, as a
//!   real server does when its client times out.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::RecordedRequest;

/// How far the timestamp may be from the agency's clock.
const TOLERANCE_SECS: i64 = 300;

#[derive(Default)]
struct Books {
    /// Every request, as it came (refused ones too).
    requests: Vec<RecordedRequest>,
    /// Answers by idempotency key: the body's digest, the status and the answer.
    answered: HashMap<String, (Vec<u8>, u16, Value)>,
    /// Cases taken, in order.
    cases: Vec<Value>,
    /// Recalls and payments booked, in order.
    recalls: Vec<Value>,
    payments: Vec<Value>,
    held: HashSet<String>,
    refused_debtors: HashMap<String, String>,
    failures: VecDeque<u16>,
    stalls: VecDeque<Duration>,
}

#[derive(Clone)]
struct Shared {
    books: Arc<Mutex<Books>>,
    secret: Option<String>,
}

impl Shared {
    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A collection agency's case API on 127.0.0.1.
#[derive(Clone)]
pub struct AgencyApi {
    pub addr: SocketAddr,
    shared: Shared,
}

impl AgencyApi {
    /// Starts the API; with a `secret`, every request must be signed with it.
    pub async fn start(secret: Option<&str>) -> anyhow::Result<Self> {
        let shared = Shared {
            books: Arc::default(),
            secret: secret.map(str::to_owned),
        };
        let app = axum::Router::new().fallback(handle).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, shared })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every request received, refused ones included, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.books().requests.clone()
    }

    /// The cases the agency holds, each once, in the order taken.
    pub fn cases(&self) -> Vec<Value> {
        self.shared.books().cases.clone()
    }

    /// The recalls booked (cases paid in full to the creditor).
    pub fn recalls(&self) -> Vec<Value> {
        self.shared.books().recalls.clone()
    }

    /// The part payments booked on cases.
    pub fn payments(&self) -> Vec<Value> {
        self.shared.books().payments.clone()
    }

    /// The agency will not take cases against this debtor, and says why.
    pub fn refuse_debtor(&self, debtor_id: &str, reason: &str) {
        self.shared
            .books()
            .refused_debtors
            .insert(debtor_id.to_owned(), reason.to_owned());
    }

    /// The next requests are answered with these statuses (5xx), one each, before anything is
    /// looked at.
    pub fn fail_next(&self, statuses: &[u16]) {
        self.shared.books().failures.extend(statuses);
    }

    /// The next `n` requests are held for `hold` before they are processed (and processed all
    /// the same): a caller that waits less sees a timeout, though the agency acted.
    pub fn stall_next(&self, n: usize, hold: Duration) {
        self.shared.books().stalls.extend(std::iter::repeat_n(hold, n));
    }

    /// Signs `event` as this agency and posts it to Forfall's webhook at `url`; the status.
    pub async fn send_event(&self, url: &str, event: &Value) -> anyhow::Result<u16> {
        let body = serde_json::to_vec(event)?;
        let mut request = reqwest::Client::new()
            .post(url)
            .header("content-type", "application/json");
        if let Some(secret) = &self.shared.secret {
            let now = chrono::Utc::now().timestamp();
            request = request
                .header("X-Forfall-Timestamp", now.to_string())
                .header("X-Forfall-Signature", format!("v1={}", hex(&mac(secret, now, &body))));
        }
        Ok(request.body(body).send().await?.status().as_u16())
    }
}

fn mac(secret: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
    let Ok(mut m) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return Vec::new();
    };
    m.update(timestamp.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    m.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn signed(secret: &str, headers: &HeaderMap, body: &[u8]) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
    let Ok(timestamp) = header("x-forfall-timestamp").trim().parse::<i64>() else {
        return false;
    };
    if (chrono::Utc::now().timestamp() - timestamp).abs() > TOLERANCE_SECS {
        return false;
    }
    let expected = hex(&mac(secret, timestamp, body));
    header("x-forfall-signature")
        .split(',')
        .filter_map(|entry| entry.trim().strip_prefix("v1="))
        .any(|given| given.eq_ignore_ascii_case(&expected))
}

fn answer(status: u16, body: Value) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(body),
    )
        .into_response()
}

fn refuse(status: u16, error: impl Into<String>) -> Response {
    answer(status, json!({ "error": error.into() }))
}

async fn handle(State(shared): State<Shared>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let (failure, stall) = {
        let mut books = shared.books();
        books
            .requests
            .push(RecordedRequest::new(&method, &uri, &headers, &body));
        match books.failures.pop_front() {
            Some(status) => (Some(status), None),
            None => (None, books.stalls.pop_front()),
        }
    };
    if let Some(status) = failure {
        return refuse(status, "the agency is unavailable; try again");
    }
    if let Some(hold) = stall {
        tokio::time::sleep(hold).await;
    }
    if method != Method::POST {
        return refuse(405, "only POST");
    }
    let path = uri.path();
    if !["/cases", "/recalls", "/payments"].contains(&path) {
        return refuse(404, format!("no such endpoint: {path}"));
    }
    if let Some(secret) = &shared.secret {
        if !signed(secret, &headers, &body) {
            return refuse(401, "missing, stale or wrong X-Forfall-Signature");
        }
    }
    let Some(key) = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty())
    else {
        return refuse(400, "Idempotency-Key is required");
    };
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return refuse(422, "the body must be a JSON object"),
        Err(e) => return refuse(422, format!("the body is not JSON: {e}")),
    };
    let id_field = if path == "/cases" { "case_id" } else { "event_id" };
    if value[id_field].as_str() != Some(key) {
        return refuse(400, format!("Idempotency-Key must be the body's {id_field}"));
    }
    let mut books = shared.books();
    if let Some((seen_body, status, first)) = books.answered.get(key) {
        return if *seen_body == body.to_vec() {
            answer(*status, first.clone())
        } else {
            let mut conflict = first.clone();
            conflict["error"] = "this Idempotency-Key was used with another body".into();
            answer(409, conflict)
        };
    }
    let (status, reply) = match path {
        "/cases" => take_case(&mut books, value),
        "/recalls" => book_money(&mut books, value, true),
        _ => book_money(&mut books, value, false),
    };
    // Only what the agency acted on is remembered; a refusal may be corrected and sent again.
    if status < 300 {
        books
            .answered
            .insert(key.to_owned(), (body.to_vec(), status, reply.clone()));
    }
    answer(status, reply)
}

/// What a case must hold for the agency to work it.
fn case_problem(case: &Value) -> Option<String> {
    for field in [
        "case_id",
        "tenant",
        "debtor_id",
        "invoice_id",
        "invoice_number",
        "currency",
        "jurisdiction",
        "debtor_kind",
    ] {
        if case[field].as_str().is_none_or(|s| s.trim().is_empty()) {
            return Some(format!("'{field}' is required"));
        }
    }
    for field in ["principal_minor", "fees_minor", "due_date", "issue_date"] {
        if case[field].as_i64().is_none() {
            return Some(format!("'{field}' must be an integer"));
        }
    }
    if case["principal_minor"].as_i64().is_some_and(|p| p <= 0) {
        return Some("'principal_minor' must be positive".into());
    }
    let currency = case["currency"].as_str().unwrap_or("");
    if currency.len() != 3 || !currency.chars().all(|c| c.is_ascii_uppercase()) {
        return Some(format!("'currency' {currency:?} is not an ISO 4217 code"));
    }
    if !["DK", "NO", "SE", "FI"].contains(&case["jurisdiction"].as_str().unwrap_or("")) {
        return Some("'jurisdiction' must be DK, NO, SE or FI".into());
    }
    if case["total_minor"].as_i64().is_some_and(|t| t < 0) {
        return Some("'total_minor' must not be negative".into());
    }
    None
}

fn take_case(books: &mut Books, case: Value) -> (u16, Value) {
    if let Some(problem) = case_problem(&case) {
        return (422, json!({ "error": problem }));
    }
    let debtor = case["debtor_id"].as_str().unwrap_or_default();
    if let Some(reason) = books.refused_debtors.get(debtor) {
        return (422, json!({ "error": reason }));
    }
    let reference = format!("AG-{}", books.cases.len() + 1);
    books
        .held
        .insert(case["case_id"].as_str().unwrap_or_default().to_owned());
    books.cases.push(case);
    (201, json!({ "reference": reference }))
}

fn book_money(books: &mut Books, money: Value, recall: bool) -> (u16, Value) {
    for field in ["event_id", "case_id", "payment_id", "currency"] {
        if money[field].as_str().is_none_or(|s| s.is_empty()) {
            return (422, json!({ "error": format!("'{field}' is required") }));
        }
    }
    if money["amount_minor"].as_i64().is_none_or(|a| a <= 0) {
        return (422, json!({ "error": "'amount_minor' must be a positive integer" }));
    }
    let case_id = money["case_id"].as_str().unwrap_or_default();
    if !books.held.contains(case_id) {
        return (422, json!({ "error": format!("no case '{case_id}' here") }));
    }
    let remaining = money["remaining_minor"].as_i64();
    match (recall, remaining) {
        (true, Some(left)) if left > 0 => {
            return (
                422,
                json!({ "error": "a recall is for a claim paid in full; book a part payment on /payments" }),
            );
        }
        (false, None | Some(0)) => {
            return (
                422,
                json!({ "error": "a payment on a case must say what remains ('remaining_minor' above 0); a claim paid in full is recalled on /recalls" }),
            );
        }
        _ => {}
    }
    if recall {
        books.recalls.push(money);
        (201, json!({ "reference": format!("RC-{}", books.recalls.len()) }))
    } else {
        books.payments.push(money);
        (201, json!({ "reference": format!("PM-{}", books.payments.len()) }))
    }
}
