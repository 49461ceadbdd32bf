//! The Debitura adapter: hand-off through Debitura's Customer API as docs.debitura.com
//! publishes it (`XApiKey` header; `POST /cases/preview`, a dry run that creates nothing;
//! `POST /cases` from claim lines with `Idempotency-Key`; the case chat, `POST
//! /cases/{id}/chats`, which is how a creditor reports money the debtor paid it directly, the
//! Customer API having no payment or recall endpoint of its own), and Debitura's webhooks
//! back (`POST /v1/agency/debitura`: `X-Debitura-Signature: t=<unix>,v1=<hex HMAC-SHA256 of
//! "<t>.<body>">` under the base64-decoded webhook secret, five minutes' tolerance).
//!
//! What Debitura takes is less than a Forfall case holds: claim lines carry only a due date,
//! an amount and a reference, so the rest (fees with their rules, interest, the warning, the
//! evidence) goes in `claimDescription`, within its 4,000 characters.

use forfall_platform::config::Secret;
use forfall_platform::records::{HandoffCase, HandoffOutcome, HandoffRecall, HandoffStatus, Regarding, derived_id};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// `handoff.debitura`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DebituraSettings {
    pub base_url: String,
    /// The creditor's API key (never logged).
    pub api_key: Option<Secret>,
    /// The webhook's signing secret as Debitura returns it on registration (base64).
    pub webhook_secret: Option<Secret>,
    /// Cases are test cases (Debitura's `isTest`).
    pub is_test: bool,
    /// Who writes in the case chat when the creditor reports a payment.
    pub user_email: Option<String>,
}

impl Default for DebituraSettings {
    fn default() -> Self {
        Self {
            base_url: "https://customer-api.debitura.com".into(),
            api_key: None,
            webhook_secret: None,
            is_test: false,
            user_email: None,
        }
    }
}

/// Debitura's limit on `claimDescription`.
const DESCRIPTION_LIMIT: usize = 4_000;

/// An amount in major units as Debitura reads it (a JSON number with at most two decimals).
fn amount(minor: i64) -> Value {
    // Nordic currencies and the euro have two decimals; n/100 prints exactly as a shortest f64.
    json!(minor as f64 / 100.0)
}

fn day(epoch_days: i32) -> String {
    forfall_domain::invoice::date_from_epoch_days(epoch_days)
        .map(|d| format!("{d}T00:00:00Z"))
        .unwrap_or_default()
}

/// The debtor as Debitura's `DebtorDto` has it.
fn debtor(case: &HandoffCase) -> Value {
    let details = case.debtor_details.as_ref();
    let address = details.and_then(|d| d.address.as_ref());
    let mut debtor = json!({
        "type": if case.debtor_kind == "business" { "Company" } else { "Private" },
        "name": case.debtor_name.clone().unwrap_or_default(),
        "countryAlpha2": address.map_or(case.jurisdiction.as_str(), |a| a.country.as_str()),
    });
    let optional = [
        ("address", address.map(|a| a.lines.join(", "))),
        ("zipCode", address.map(|a| a.postal_code.clone())),
        ("city", address.map(|a| a.city.clone())),
        ("email", case.email.clone()),
        ("phone", case.phone.clone()),
        ("companyRegistrationNumber", details.and_then(|d| d.company_id.clone())),
    ];
    for (field, value) in optional {
        if let Some(v) = value.filter(|v| !v.is_empty()) {
            debtor[field] = json!(v);
        }
    }
    debtor
}

/// What the claim lines cannot carry, in words for the collector.
fn description(case: &HandoffCase) -> String {
    let mut out = vec![format!(
        "Forfall case {} (policy {}), claim as of {}.",
        case.case_id,
        case.policy_version,
        case.claim_date.map(day).unwrap_or_default().get(..10).unwrap_or("")
    )];
    let date = |d: i32| day(d).get(..10).unwrap_or("").to_owned();
    let said = |text: &Option<String>| text.as_deref().map(|t| format!(" ('{t}')")).unwrap_or_default();
    let mut claim = |number: &str,
                     fees: &[forfall_platform::records::CaseFee],
                     interest: i64,
                     note: &Option<String>,
                     disputes: &[forfall_platform::records::CaseDispute]| {
        for f in fees {
            out.push(format!(
                "Invoice {number}: fee {} for '{}'{}.",
                amount(f.amount_minor),
                f.step,
                f.citation.as_deref().map(|c| format!(" ({c})")).unwrap_or_default()
            ));
        }
        if interest > 0 {
            out.push(format!(
                "Invoice {number}: late interest {} to the claim date.",
                amount(interest)
            ));
        }
        if let Some(note) = note {
            out.push(format!("Invoice {number}: {note}."));
        }
        for d in disputes {
            out.push(match d.resolved {
                Some(resolved) => format!(
                    "Invoice {number}: disputed on {}{}, resolved on {}{}.",
                    date(d.opened),
                    said(&d.reason),
                    date(resolved),
                    said(&d.resolution)
                ),
                None => format!(
                    "Invoice {number}: disputed on {}{}, not resolved.",
                    date(d.opened),
                    said(&d.reason)
                ),
            });
        }
    };
    claim(
        &case.invoice_number,
        &case.fee_lines,
        case.interest_minor,
        &case.interest_note,
        &case.disputes,
    );
    for m in &case.merged_claims {
        claim(
            &m.invoice_number,
            &m.fee_lines,
            m.interest_minor,
            &m.interest_note,
            &m.disputes,
        );
    }
    if case.compensation_minor > 0 {
        out.push(format!(
            "Compensation {} ({}).",
            amount(case.compensation_minor),
            case.compensation_citation.clone().unwrap_or_default()
        ));
    }
    if let Some(citation) = &case.merge_citation {
        out.push(format!("Claims merged into one case: {citation}."));
    }
    match &case.collection_warning {
        Some(w) if w.given => out.push(format!(
            "Warning before collection given ({}), deadline {}.",
            w.citation.clone().unwrap_or_default(),
            w.deadline.map(day).unwrap_or_default().get(..10).unwrap_or("")
        )),
        Some(w) => out.push(format!(
            "Warning before collection NOT given: the agency sends it ({}).",
            w.citation.clone().unwrap_or_default()
        )),
        None => {}
    }
    out.push(format!(
        "{} message(s) sent, with SHA-256 digests of their content; the full evidence is in the Forfall case.",
        case.messages.len()
    ));
    let mut text = out.join("\n");
    if text.len() > DESCRIPTION_LIMIT {
        let mut cut = DESCRIPTION_LIMIT - 3;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

/// `POST /cases`: one claim line per claim (the lead and any merged), each the amount left
/// on it with fees, interest and compensation, so the lines add up to what is claimed.
pub fn case_body(case: &HandoffCase, is_test: bool) -> Value {
    let mut lines = vec![json!({
        "dueDate": day(case.due_date),
        "amount": amount(case.total_minor.unwrap_or(case.principal_minor + case.fees_minor)),
        "reference": case.invoice_number,
    })];
    let mut oldest = case.due_date;
    for m in &case.merged_claims {
        lines.push(json!({
            "dueDate": day(m.due_date),
            "amount": amount(m.total_minor),
            "reference": m.invoice_number,
        }));
        oldest = oldest.min(m.due_date);
    }
    let issued = std::iter::once(case.issue_date)
        .chain(case.merged_claims.iter().map(|m| m.issue_date))
        .min()
        .unwrap_or(case.issue_date);
    json!({
        "currencyCode": case.currency,
        "date": day(issued),
        "dueDate": day(oldest),
        "claimLines": lines,
        "claimDescription": description(case),
        "creditorReference": case.case_id.chars().take(50).collect::<String>(),
        "isTest": is_test,
        "debtor": debtor(case),
    })
}

/// `POST /cases/preview`: would Debitura take this case (and where)?
pub fn preview_body(case: &HandoffCase) -> Value {
    let body = case_body(case, false);
    json!({
        "currencyCode": body["currencyCode"],
        "claimLines": body["claimLines"],
        "debtor": { "type": body["debtor"]["type"], "countryAlpha2": body["debtor"]["countryAlpha2"] },
    })
}

/// Why a preview says Debitura would not take the case; `None` when it would.
pub fn ineligible(preview: &Value) -> Option<String> {
    let result = &preview["result"];
    if result["isEligible"].as_bool() != Some(false) {
        return None;
    }
    let blocking: Vec<&str> = result["requiredActions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["isBlocking"].as_bool() == Some(true))
        .filter_map(|a| a["message"].as_str())
        .collect();
    let reason = result["ineligibilityReason"].as_str().unwrap_or("not eligible");
    Some(if blocking.is_empty() {
        format!("Debitura would not take the case: {reason}")
    } else {
        format!("Debitura would not take the case: {reason} ({})", blocking.join("; "))
    })
}

/// The chat message that tells Debitura's collector of money the debtor paid the creditor.
pub fn payment_message(r: &HandoffRecall) -> String {
    let paid = amount(r.amount_minor);
    match r.remaining_minor.filter(|left| *left > 0) {
        Some(left) => format!(
            "Direct payment: the debtor paid {paid} {} to the creditor ({}, payment {}). {} {} remains on the claim; please book the payment on the case.",
            r.currency,
            r.reason,
            r.payment_id,
            amount(left),
            r.currency
        ),
        None => format!(
            "Direct payment: the debtor paid {paid} {} to the creditor ({}, payment {}). The claim is settled in full; please close the case without further steps.",
            r.currency, r.reason, r.payment_id
        ),
    }
}

/// The body of a chat message.
pub fn chat_body(r: &HandoffRecall, user_email: Option<&str>) -> Value {
    let mut body = json!({ "message": payment_message(r) });
    if let Some(email) = user_email {
        body["userEmail"] = json!(email);
    }
    body
}

/// Which Forfall case a Debitura case is (remembered when Debitura took it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaseRef {
    pub case_id: String,
    pub tenant: String,
    pub debtor_id: String,
    pub invoice_id: String,
}

/// Where a Debitura case's Forfall case is remembered.
pub(crate) fn case_key(keys: &forfall_platform::redis_store::Keys, debitura_id: &str) -> String {
    keys.key(&["handoff", "debitura", debitura_id])
}

/// Debitura's webhook body.
#[derive(Debug, Deserialize)]
pub struct WebhookEvent {
    pub id: String,
    pub event: String,
    #[serde(default)]
    pub data: Value,
}

/// An amount in major units (a JSON number or string) in minor units; `None` if it has more
/// than two decimals or is not a number.
fn minor_units(v: &Value) -> Option<i64> {
    let text = match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        _ => return None,
    };
    let (whole, fraction) = text.split_once('.').unwrap_or((&text, ""));
    if fraction.len() > 2 || !fraction.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let whole: i64 = whole.parse().ok()?;
    let fraction: i64 = format!("{fraction:0<2}").parse().ok()?;
    whole
        .checked_mul(100)?
        .checked_add(if whole < 0 { -fraction } else { fraction })
}

/// What Debitura's event says of the case: an outcome for the watcher, `Ok(None)` for events
/// that say nothing of the claim (chat, a payment withdrawn), or what is wrong with it.
pub fn outcome_of(e: &WebhookEvent, case: &CaseRef, now_ms: i64) -> Result<Option<HandoffOutcome>, String> {
    let data = &e.data;
    let text = |field: &str| data[field].as_str().map(str::to_owned);
    let collected = || -> Result<(i64, String), String> {
        let minor = minor_units(&data["amount"])
            .filter(|m| *m > 0)
            .ok_or_else(|| format!("{}: data.amount must be a positive amount", e.event))?;
        let currency = text("currency")
            .filter(|c| c.len() == 3)
            .ok_or_else(|| format!("{}: data.currency is needed", e.event))?;
        Ok((minor, currency))
    };
    let (status, detail, money) = match e.event.as_str() {
        "case.created" => (
            HandoffStatus::Accepted,
            Some("Debitura created the case".to_owned()),
            None,
        ),
        "case.updated" => match data["status"].as_str().or(data["lifecycle"].as_str()) {
            Some("Active" | "Paused") => (HandoffStatus::InCollection, text("status"), None),
            Some("NeedsAdditionalDetails") => (
                HandoffStatus::Rejected,
                Some("Debitura needs additional details before it works the case".to_owned()),
                None,
            ),
            Some(other) => (HandoffStatus::Accepted, Some(format!("Debitura: {other}")), None),
            None => return Err("case.updated: data.status is missing".into()),
        },
        "case.closed" => match data["closeCode"].as_str().or(data["status"].as_str()) {
            Some("Paid") => {
                let money = collected().ok();
                (
                    HandoffStatus::Paid,
                    Some("Debitura closed the case as paid".to_owned()),
                    money,
                )
            }
            Some(code) => (
                HandoffStatus::Closed,
                Some(format!("Debitura closed the case: {code}")),
                None,
            ),
            None => return Err("case.closed: data.closeCode is missing".into()),
        },
        "payment.created" => {
            let money = collected()?;
            (
                HandoffStatus::PartlyPaid,
                Some("Debitura collected a payment".to_owned()),
                Some(money),
            )
        }
        "payment.deleted" | "chat.created" => return Ok(None),
        other => return Err(format!("event '{other}' is not one Forfall takes")),
    };
    let (collected_minor, currency) = match money {
        Some((m, c)) => (Some(m), Some(c)),
        None => (None, None),
    };
    Ok(Some(HandoffOutcome {
        event_id: derived_id("debitura-event", &[&case.tenant, &case.case_id, &e.id]),
        tenant: case.tenant.clone(),
        debtor_id: case.debtor_id.clone(),
        occurred_at: now_ms,
        case_id: case.case_id.clone(),
        invoice_id: case.invoice_id.clone(),
        status,
        agency_reference: text("reference"),
        http_status: None,
        detail,
        collected_minor,
        currency,
        regarding: Some(Regarding::Agency.code().to_owned()),
        invoice_ids: Vec::new(),
    }))
}

/// Whether `X-Debitura-Signature` (`t=<unix>,v1=<hex>[,v1=<hex>]`) signs `body` under the
/// base64 `secret` within the tolerance of `now`.
pub fn signed(secret: &str, header: &str, body: &[u8], now: i64) -> bool {
    use base64::Engine;
    let Ok(key) = base64::engine::general_purpose::STANDARD.decode(secret.trim()) else {
        return false;
    };
    let mut timestamp = None;
    let mut given = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", v)) => given.push(v),
            _ => {}
        }
    }
    timestamp.is_some_and(|t| forfall_platform::signing::verify_key(&key, t, given, body, now))
}

#[cfg(test)]
mod tests {
    use super::*;
    use forfall_platform::records::{CaseClaim, CollectionWarning};

    fn case() -> HandoffCase {
        serde_json::from_value(json!({
            "event_id": "e1", "tenant": "nordkraft", "debtor_id": "nordkraft:gunnar", "occurred_at": 0,
            "case_id": "case-1", "invoice_id": "no-1", "invoice_number": "70001",
            "issue_date": 20_500, "due_date": 20_514, "principal_minor": 89_900, "fees_minor": 3_500,
            "currency": "NOK", "jurisdiction": "NO", "debtor_kind": "consumer", "payment_reference": null,
            "steps_taken": [], "policy_version": "p1", "debtor_name": "Gunnar Berg", "email": "g@example.test",
            "phone": null, "language": "nb", "total_minor": 94_848, "interest_minor": 1_448,
            "fee_lines": [{"date": 20_530, "step": "purring", "amount_minor": 3_500, "rule_id": "no.fee", "citation": "inkassoforskriften § 1-2"}],
        }))
        .unwrap()
    }

    #[test]
    fn a_case_goes_as_claim_lines_adding_up_to_the_claim_with_the_rest_described() {
        let mut c = case();
        c.merged_claims =
            vec![serde_json::from_value::<CaseClaim>(json!({
            "invoice_id": "no-2", "invoice_number": "70002", "issue_date": 20_490, "due_date": 20_504,
            "description": null, "payment_reference": null, "original_principal_minor": 50_000, "paid_minor": 0,
            "principal_minor": 50_000, "fees_minor": 0, "fee_lines": [], "interest_lines": [], "interest_minor": 0,
            "interest_note": null, "compensation_minor": 0, "total_minor": 50_000, "collection_warning": null,
            "messages": [], "steps_taken": [],
        }))
        .unwrap()];
        c.collection_warning = Some(CollectionWarning {
            given: false,
            step: None,
            sent_on: None,
            deadline: None,
            days_to_pay: None,
            required_days: Some(14),
            rule_id: None,
            citation: Some("inkassoloven § 9".into()),
        });
        let body = case_body(&c, true);
        assert_eq!(
            body["claimLines"][0],
            json!({"dueDate": "2026-03-02T00:00:00Z", "amount": 948.48, "reference": "70001"})
        );
        assert_eq!(body["claimLines"][1]["amount"], json!(500.0));
        assert_eq!(body["dueDate"], "2026-02-20T00:00:00Z", "the oldest claim's");
        assert_eq!(body["date"], "2026-02-06T00:00:00Z");
        assert_eq!(
            body["debtor"],
            json!({"type": "Private", "name": "Gunnar Berg", "countryAlpha2": "NO", "email": "g@example.test"})
        );
        assert_eq!(body["isTest"], true);
        assert!(
            body.get("amountToRecover").is_none(),
            "claim lines or an amount, never both"
        );
        let text = body["claimDescription"].as_str().unwrap();
        for want in [
            "fee 35.0 for 'purring' (inkassoforskriften § 1-2)",
            "late interest 14.48",
            "NOT given: the agency sends it (inkassoloven § 9)",
        ] {
            assert!(text.contains(want), "'{want}' in {text}");
        }
        let preview = preview_body(&c);
        assert_eq!(preview["debtor"], json!({"type": "Private", "countryAlpha2": "NO"}));
        assert_eq!(preview["claimLines"], body["claimLines"]);
    }

    #[test]
    fn a_preview_that_says_no_is_a_reason_and_one_that_says_yes_is_none() {
        assert_eq!(ineligible(&json!({"result": {"isEligible": true}})), None);
        let no = json!({"result": {"isEligible": false, "ineligibilityReason": "NoPartnerAvailable",
            "requiredActions": [{"type": "x", "message": "sign the contract", "isBlocking": true}, {"message": "optional", "isBlocking": false}]}});
        assert_eq!(
            ineligible(&no).as_deref(),
            Some("Debitura would not take the case: NoPartnerAvailable (sign the contract)")
        );
    }

    #[test]
    fn money_the_creditor_got_is_told_in_the_case_chat() {
        let recall = |remaining| HandoffRecall {
            event_id: "r1".into(),
            tenant: "t".into(),
            debtor_id: "t:d".into(),
            occurred_at: 0,
            case_id: "case-1".into(),
            invoice_id: "no-1".into(),
            payment_id: "pay-9".into(),
            amount_minor: 20_000,
            currency: "NOK".into(),
            reason: "paid to the creditor".into(),
            remaining_minor: remaining,
        };
        let part = chat_body(&recall(Some(74_848)), Some("credit@example.test"));
        assert_eq!(part["userEmail"], "credit@example.test");
        assert!(
            part["message"].as_str().unwrap().contains("paid 200.0 NOK")
                && part["message"].as_str().unwrap().contains("748.48 NOK remains")
        );
        let full = payment_message(&recall(None));
        assert!(full.contains("settled in full; please close the case"), "{full}");
    }

    #[test]
    fn debituras_events_become_outcomes() {
        let case = CaseRef {
            case_id: "case-1".into(),
            tenant: "t".into(),
            debtor_id: "t:d".into(),
            invoice_id: "no-1".into(),
        };
        let event = |name: &str, data: Value| WebhookEvent {
            id: "evt_1".into(),
            event: name.into(),
            data,
        };
        let of = |e: WebhookEvent| outcome_of(&e, &case, 1);
        let paid = of(event(
            "payment.created",
            json!({"caseId": "x", "amount": 250.5, "currency": "NOK"}),
        ))
        .unwrap()
        .unwrap();
        assert_eq!(
            (paid.status, paid.collected_minor),
            (HandoffStatus::PartlyPaid, Some(25_050))
        );
        assert!(
            of(event("payment.created", json!({"amount": 1.005, "currency": "NOK"}))).is_err(),
            "three decimals"
        );
        let closed = of(event("case.closed", json!({"closeCode": "Paid"}))).unwrap().unwrap();
        assert_eq!(closed.status, HandoffStatus::Paid);
        let exhausted = of(event("case.closed", json!({"closeCode": "PreLegalExhaustedNoPayment"})))
            .unwrap()
            .unwrap();
        assert_eq!(exhausted.status, HandoffStatus::Closed);
        assert_eq!(
            of(event("case.updated", json!({"status": "Active"})))
                .unwrap()
                .unwrap()
                .status,
            HandoffStatus::InCollection
        );
        assert_eq!(
            of(event("case.updated", json!({"status": "NeedsAdditionalDetails"})))
                .unwrap()
                .unwrap()
                .status,
            HandoffStatus::Rejected
        );
        assert_eq!(of(event("chat.created", json!({}))).unwrap(), None);
        assert!(
            of(event("case.exploded", json!({})))
                .unwrap_err()
                .contains("case.exploded")
        );
        assert_eq!(
            of(event("case.closed", json!({"closeCode": "Paid"})))
                .unwrap()
                .unwrap()
                .event_id,
            closed.event_id,
            "the same event again is the same record"
        );
    }

    #[test]
    fn a_webhook_is_signed_over_its_time_and_body_with_the_decoded_secret() {
        use base64::Engine;
        let secret = base64::engine::general_purpose::STANDARD.encode(b"debitura-webhook-key");
        let body = br#"{"id":"evt_1"}"#;
        let sig = forfall_platform::signing::sign_key(b"debitura-webhook-key", 1_800_000_000, body);
        let header = format!("t=1800000000,v1={sig}");
        assert!(signed(&secret, &header, body, 1_800_000_100));
        assert!(!signed(&secret, &header, body, 1_800_000_400), "stale");
        assert!(!signed(&secret, &header, b"{}", 1_800_000_000), "another body");
        assert!(
            !signed(&secret, &format!("t=1800000001,v1={sig}"), body, 1_800_000_000),
            "the time is signed"
        );
        assert!(!signed("not base64!", &header, body, 1_800_000_000));
    }
}
