//! DEV AND TEST ONLY: Debitura's Customer API, strict as docs.debitura.com and its published
//! OpenAPI file (`customer-api.json`) describe it, written from those and not from hand-off's
//! code.
//!
//! - Every request needs `XApiKey` (401 with a ProblemDetails body without it or with another).
//! - `POST /cases/preview` is a dry run: `{currencyCode, debtor{type, countryAlpha2}, dueDate |
//!   claimLines | amountToRecover}` → `{"result": {isEligible, ineligibilityReason,
//!   requiredActions, pricingPreview...}}`; nothing is created.
//! - `POST /cases` creates a case from `claimLines` (`{dueDate, amount, reference?}`, 1 to
//!   1,000, each amount above 0 with at most two decimals, no due date in the future) or
//!   `amountToRecover`, never both; `currencyCode`, `date` (not in the future) and a debtor
//!   (`type` Company, Private or Person, `name`, `countryAlpha2`) are required; `claimDescription`
//!   and `comments` at most 4,000 characters, `creditorReference` at most 50 and unique.
//!   A field fault is 400 `{field: [messages]}`. 200 with the case (`id`, an 8-character
//!   `reference`, `lifecycle`...).
//! - `Idempotency-Key` (optional, at most 255 characters) on `POST /cases`: the same key and
//!   body get the stored answer again; the same key with another body 422 `IdempotencyConflict`;
//!   a 400 is not stored, so a corrected request may reuse the key.
//! - A business rule refusal is 422 `{"businessErrors": [{type, message, solutionUrl}]}`.
//! - `POST /cases/{id}/chats` `{message, userEmail?}` on a case it holds (404 otherwise).
//! - Webhooks to Forfall: `X-Debitura-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">`
//!   under the base64-decoded secret, `X-Debitura-Event`, `X-Debitura-Timestamp`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::RecordedRequest;

#[derive(Default)]
struct Books {
    requests: Vec<RecordedRequest>,
    /// Stored answers by idempotency key: the body, the status and the answer.
    answered: HashMap<String, (Vec<u8>, u16, Value)>,
    /// Cases by id, and their order.
    cases: Vec<Value>,
    creditor_references: HashMap<String, String>,
    chats: Vec<(String, Value)>,
    /// Countries no partner covers, with the reason the preview gives.
    uncovered: HashMap<String, String>,
    failures: Vec<u16>,
}

#[derive(Clone)]
struct Shared {
    books: Arc<Mutex<Books>>,
    api_key: String,
}

impl Shared {
    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Debitura's Customer API on 127.0.0.1.
#[derive(Clone)]
pub struct DebituraApi {
    pub addr: SocketAddr,
    shared: Shared,
    webhook_key: Vec<u8>,
}

impl DebituraApi {
    /// Starts the API for the creditor with `api_key`; webhooks are signed with the base64
    /// `webhook_secret` (as Debitura returns it when a webhook is registered).
    pub async fn start(api_key: &str, webhook_secret: &str) -> anyhow::Result<Self> {
        let shared = Shared {
            books: Arc::default(),
            api_key: api_key.to_owned(),
        };
        let app = axum::Router::new().fallback(handle).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            addr,
            shared,
            webhook_key: base64::engine::general_purpose::STANDARD.decode(webhook_secret)?,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.books().requests.clone()
    }

    /// The cases created, in order, each as Debitura holds it (`id`, `reference`, the request).
    pub fn cases(&self) -> Vec<Value> {
        self.shared.books().cases.clone()
    }

    /// Chat messages written on cases: (case id, body).
    pub fn chats(&self) -> Vec<(String, Value)> {
        self.shared.books().chats.clone()
    }

    /// No collection partner covers debtors in `country`: previews say not eligible, cases are
    /// refused with `NoPartnerAvailable`.
    pub fn uncovered(&self, country: &str, reason: &str) {
        self.shared
            .books()
            .uncovered
            .insert(country.to_owned(), reason.to_owned());
    }

    /// The next requests get these statuses, one each, before anything is looked at.
    pub fn fail_next(&self, statuses: &[u16]) {
        self.shared.books().failures.extend(statuses);
    }

    /// Sends a signed webhook event about case `case_id` to `url`; the status.
    pub async fn send_webhook(&self, url: &str, id: &str, event: &str, data: Value) -> anyhow::Result<u16> {
        let now = chrono::Utc::now().timestamp();
        let body = serde_json::to_vec(&json!({
            "id": id, "specVersion": "1.0", "event": event,
            "timestamp": chrono::Utc::now().to_rfc3339(), "data": data,
        }))?;
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.webhook_key)?;
        mac.update(format!("{now}.").as_bytes());
        mac.update(&body);
        let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        let status = reqwest::Client::new()
            .post(url)
            .header("content-type", "application/json")
            .header("X-Debitura-Signature", format!("t={now},v1={hex}"))
            .header("X-Debitura-Timestamp", now.to_string())
            .header("X-Debitura-Event", event)
            .body(body)
            .send()
            .await?
            .status();
        Ok(status.as_u16())
    }
}

fn answer(status: u16, body: Value) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(body),
    )
        .into_response()
}

fn business(kind: &str, message: &str) -> (u16, Value) {
    (
        422,
        json!({"businessErrors": [{"type": kind, "message": message, "solutionUrl": "https://docs.debitura.com"}]}),
    )
}

async fn handle(State(shared): State<Shared>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let failure = {
        let mut books = shared.books();
        books
            .requests
            .push(RecordedRequest::new(&method, &uri, &headers, &body));
        (!books.failures.is_empty()).then(|| books.failures.remove(0))
    };
    if let Some(status) = failure {
        return answer(status, json!({"error": "unavailable", "message": "try again"}));
    }
    let key = headers.get("xapikey").and_then(|v| v.to_str().ok()).unwrap_or("");
    if key.is_empty() || key != shared.api_key {
        return answer(
            401,
            json!({"type": "https://tools.ietf.org/html/rfc7235#section-3.1", "title": "Unauthorized", "status": 401}),
        );
    }
    if method != Method::POST {
        return answer(405, json!({"message": "only POST here"}));
    }
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        _ => return answer(400, json!({"body": ["must be a JSON object"]})),
    };
    let path = uri.path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let mut books = shared.books();
    let (status, reply) = match segments.as_slice() {
        ["cases", "preview"] => preview(&books, &request),
        ["cases"] => {
            let idempotency = headers.get("idempotency-key").and_then(|v| v.to_str().ok());
            if idempotency.is_some_and(|k| k.len() > 255) {
                (400, json!({"Idempotency-Key": ["at most 255 characters"]}))
            } else if let Some((seen, status, first)) = idempotency.and_then(|k| books.answered.get(k)) {
                if *seen == body.to_vec() {
                    (*status, first.clone())
                } else {
                    business(
                        "IdempotencyConflict",
                        "this Idempotency-Key was used with another request",
                    )
                }
            } else {
                let (status, reply) = create(&mut books, request);
                // Validation faults are not stored: a corrected request may reuse the key.
                if let Some(k) = idempotency.filter(|_| status != 400) {
                    books
                        .answered
                        .insert(k.to_owned(), (body.to_vec(), status, reply.clone()));
                }
                (status, reply)
            }
        }
        ["cases", id, "chats"] => {
            if !books.cases.iter().any(|c| c["id"] == *id) {
                (404, json!({"message": format!("no case {id}")}))
            } else if request["message"].as_str().is_none_or(|m| m.trim().is_empty()) {
                (400, json!({"message": ["is required"]}))
            } else {
                books.chats.push(((*id).to_owned(), request));
                (201, json!({"id": uuid(books.chats.len() as u64 + 5_000)}))
            }
        }
        _ => (404, json!({"message": format!("no such endpoint: {path}")})),
    };
    answer(status, reply)
}

/// A deterministic UUID-shaped id.
fn uuid(n: u64) -> String {
    format!("5e1f0c2a-0000-4000-8000-{n:012x}")
}

/// What is wrong with the fields of a case or preview, as Debitura's 400 map.
fn field_faults(request: &Value, full: bool) -> serde_json::Map<String, Value> {
    let mut faults = serde_json::Map::new();
    let mut fault = |field: &str, message: &str| {
        if let Some(messages) = faults
            .entry(field.to_owned())
            .or_insert_with(|| json!([]))
            .as_array_mut()
        {
            messages.push(json!(message));
        }
    };
    let today = chrono::Utc::now().date_naive();
    let date = |v: &Value| -> Option<chrono::NaiveDate> {
        let text = v.as_str()?;
        chrono::DateTime::parse_from_rfc3339(text)
            .map(|d| d.date_naive())
            .ok()
            .or_else(|| text.get(..10)?.parse().ok())
    };
    let currency = request["currencyCode"].as_str().unwrap_or("");
    if currency.len() != 3 || !currency.chars().all(|c| c.is_ascii_uppercase()) {
        fault("currencyCode", "must be a 3-letter ISO 4217 code");
    }
    let debtor = &request["debtor"];
    if !["company", "private", "person"].contains(&debtor["type"].as_str().unwrap_or("").to_lowercase().as_str()) {
        fault("debtor.type", "must be Company or Private");
    }
    if debtor["countryAlpha2"].as_str().is_none_or(|c| c.len() != 2) && debtor["country"].as_str().is_none() {
        fault("debtor.countryAlpha2", "is required");
    }
    let lines = request.get("claimLines");
    let amount = request
        .get("amountToRecover")
        .and_then(Value::as_f64)
        .filter(|a| *a != 0.0);
    match (lines, amount) {
        (Some(_), Some(_)) => fault("claimLines", "send claimLines or amountToRecover, not both"),
        (None, None) => fault("amountToRecover", "must be greater than 0"),
        (None, Some(a)) if a < 0.0 => fault("amountToRecover", "must be greater than 0"),
        _ => {}
    }
    if let Some(lines) = lines {
        match lines.as_array() {
            Some(l) if (1..=1_000).contains(&l.len()) => {
                for (i, line) in l.iter().enumerate() {
                    let cents = line["amount"].as_f64().map(|a| a * 100.0);
                    if cents.is_none_or(|c| c <= 0.0 || (c - c.round()).abs() > 1e-6) {
                        fault(
                            &format!("claimLines[{i}].amount"),
                            "must be above 0 with at most 2 decimals",
                        );
                    }
                    match date(&line["dueDate"]) {
                        Some(d) if d <= today => {}
                        Some(_) => fault(&format!("claimLines[{i}].dueDate"), "must not be in the future"),
                        None => fault(&format!("claimLines[{i}].dueDate"), "is required"),
                    }
                }
            }
            _ => fault("claimLines", "1 to 1000 lines"),
        }
    }
    if full {
        match date(&request["date"]) {
            Some(d) if d <= today => {
                if date(&request["dueDate"]).is_some_and(|due| due < d) {
                    fault("dueDate", "must be on or after date");
                }
            }
            Some(_) => fault("date", "must not be in the future"),
            None => fault("date", "is required"),
        }
        if debtor["name"].as_str().is_none_or(|n| n.trim().is_empty()) {
            fault("debtor.name", "is required");
        }
        for (field, limit) in [
            ("claimDescription", 4_000),
            ("comments", 4_000),
            ("creditorReference", 50),
        ] {
            if request[field].as_str().is_some_and(|s| s.chars().count() > limit) {
                fault(field, &format!("at most {limit} characters"));
            }
        }
    }
    faults
}

fn preview(books: &Books, request: &Value) -> (u16, Value) {
    let faults = field_faults(request, false);
    if !faults.is_empty() {
        return (400, Value::Object(faults));
    }
    let country = request["debtor"]["countryAlpha2"].as_str().unwrap_or_default();
    let uncovered = books.uncovered.get(country);
    (
        200,
        json!({"result": {
            "isEligible": uncovered.is_none(),
            "ineligibilityReason": uncovered,
            "partnerAssignment": uncovered.is_none().then(|| json!({"partnerName": "Nordic Collect", "partnerCountry": country})),
            "requiredActions": [],
            "jurisdiction": {"countryAlpha2": country},
            "pricingPreview": {"baseSuccessFeePercentage": 10.0, "ageSurchargePercentage": 0.0, "totalSuccessFeePercentage": 10.0, "currencyCode": request["currencyCode"]},
        }}),
    )
}

fn create(books: &mut Books, request: Value) -> (u16, Value) {
    let faults = field_faults(&request, true);
    if !faults.is_empty() {
        return (400, Value::Object(faults));
    }
    let country = request["debtor"]["countryAlpha2"].as_str().unwrap_or_default();
    if let Some(reason) = books.uncovered.get(country) {
        return business("NoPartnerAvailable", reason);
    }
    if let Some(reference) = request["creditorReference"].as_str() {
        if books.creditor_references.contains_key(reference) {
            return business(
                "DuplicateCreditorReference",
                "a case with this creditorReference exists",
            );
        }
    }
    let n = books.cases.len() as u64 + 1;
    let id = uuid(n);
    let gross: f64 = match request["claimLines"].as_array() {
        Some(lines) => lines.iter().filter_map(|l| l["amount"].as_f64()).sum(),
        None => request["amountToRecover"].as_f64().unwrap_or_default(),
    };
    let case = json!({
        "id": id,
        "reference": format!("DB{n:06}"),
        "creditorReference": request["creditorReference"],
        "lifecycle": "PendingVerification",
        "grossAmount": (gross * 100.0).round() / 100.0,
        "remainder": (gross * 100.0).round() / 100.0,
        "currency": request["currencyCode"],
        "isTestCase": request["isTest"].as_bool().unwrap_or(false),
        "request": request,
    });
    if let Some(reference) = request["creditorReference"].as_str() {
        books.creditor_references.insert(reference.to_owned(), id.clone());
    }
    books.cases.push(case.clone());
    let mut reply = case;
    if let Some(o) = reply.as_object_mut() {
        o.remove("request");
    }
    (200, reply)
}
