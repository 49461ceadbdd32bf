//! An invoice's whole story for the creditor's staff, from the portal's read model: the
//! invoice as billing last sent it, every journey transition, every message outcome, every
//! payment matched to it and every request the debtor made, in the order they happened.
//! `GET /v1/timeline/<tenant>/<invoice>` answers it as JSON or, with `?format=text`, as text;
//! `forfall timeline TENANT INVOICE` prints the text. The endpoint sits on the debtors' port,
//! so it answers only with the staff token (`portal.staff_token`) or the tenant's own API token
//! (its own invoices only), and not at all without one.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use forfall_domain::invoice::date_from_epoch_days;
use forfall_domain::{Currency, Money};
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::Portal;
use crate::view::InvoiceView;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timeline {
    pub tenant: String,
    pub invoice_id: String,
    pub number: Option<String>,
    pub debtor_id: Option<String>,
    pub amount: Option<String>,
    pub due_date: Option<String>,
    pub state: Option<String>,
    pub left: Option<String>,
    pub entries: Vec<Entry>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    /// UTC, RFC 3339.
    pub at: String,
    /// `journey`, `message`, `payment`, `request`.
    pub source: &'static str,
    pub what: String,
    pub detail: Option<String>,
    #[serde(skip)]
    at_ms: i64,
}

fn at(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

fn money(minor: i64, currency: &str) -> String {
    match currency.parse::<Currency>() {
        Ok(c) => Money::new(minor, c).to_string(),
        Err(_) => format!("{minor} (minor units of {currency})"),
    }
}

/// The story of one invoice from its view.
pub fn build(tenant: &str, view: &InvoiceView) -> Timeline {
    let s = view.snapshot.as_ref();
    let currency = s.map(|s| s.currency.clone()).unwrap_or_default();
    let mut entries = Vec::new();
    let entry = |at_ms: i64, source, what: String, detail: Option<String>| Entry {
        at: at(at_ms),
        source,
        what,
        detail,
        at_ms,
    };
    for h in &view.happened {
        let mut what = h.kind.clone();
        if let Some(step) = &h.step {
            what.push_str(&format!(" {step}"));
        }
        if let (Some(from), Some(to)) = (&h.from_state, &h.to_state) {
            if from != to {
                what.push_str(&format!(" ({from} → {to})"));
            }
        }
        let mut detail: Vec<String> = Vec::new();
        if let Some(left) = h.open_minor {
            detail.push(format!("left {}", money(left, &currency)));
        }
        detail.extend(h.reason.clone());
        entries.push(entry(
            h.at_ms,
            "journey",
            what,
            (!detail.is_empty()).then(|| detail.join("; ")),
        ));
    }
    for m in &view.messages {
        entries.push(entry(
            m.at_ms,
            "message",
            format!("{} by {}: {}", m.step, m.channel, m.status),
            m.reason.clone(),
        ));
    }
    for p in &view.payments {
        let mut detail = Vec::new();
        detail.extend(p.payment_id.as_ref().map(|id| format!("payment {id}")));
        detail.extend(p.rule.as_ref().map(|r| format!("matched by {r}")));
        detail.extend(date_from_epoch_days(p.value_date).map(|d| format!("value date {d}")));
        entries.push(entry(
            p.at_ms,
            "payment",
            format!("{} matched", money(p.amount_minor, &p.currency)),
            Some(detail.join("; ")),
        ));
    }
    for r in &view.requests {
        entries.push(entry(
            r.at_ms,
            "request",
            format!("{} (from {})", r.kind, r.source),
            r.detail.clone(),
        ));
    }
    entries.sort_by_key(|e| e.at_ms);
    Timeline {
        tenant: tenant.to_owned(),
        invoice_id: view.invoice_id.clone(),
        number: s.map(|s| s.number.clone()),
        debtor_id: s.map(|s| s.debtor_id.clone()),
        amount: s.map(|s| money(s.open_minor, &s.currency)),
        due_date: s.and_then(|s| date_from_epoch_days(s.due_date)).map(|d| d.to_string()),
        state: view.journey.as_ref().map(|j| j.state.clone()),
        left: view.journey.as_ref().map(|j| money(j.outstanding_minor, &currency)),
        entries,
    }
}

impl Timeline {
    /// One line a fact, for a terminal or a ticket.
    pub fn to_text(&self) -> String {
        let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
        let mut out = format!(
            "invoice {} ({}) of {} for {}\n  debtor {}, due {}, now {}, left {}\n",
            self.invoice_id,
            or_dash(&self.number),
            self.tenant,
            or_dash(&self.amount),
            or_dash(&self.debtor_id),
            or_dash(&self.due_date),
            or_dash(&self.state),
            or_dash(&self.left),
        );
        for e in &self.entries {
            out.push_str(&format!("{}  {:<8} {}", e.at, e.source, e.what));
            if let Some(d) = &e.detail {
                out.push_str(&format!(" — {d}"));
            }
            out.push('\n');
        }
        out
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct TimelineQuery {
    format: Option<String>,
}

/// The refusal of a request about `tenant`'s debtors, if it has neither the staff token nor
/// the tenant's own token (`api.tenants.<tenant>.token`) as its bearer token: a tenant's systems
/// see their own invoices only (403 for another's). Nothing is answered while neither kind of
/// token is configured, in any profile: the answers name debtors.
pub(crate) fn tenant_or_staff_refusal(portal: &Portal, headers: &HeaderMap, tenant: &str) -> Option<Response> {
    use forfall_platform::api_auth::Caller;
    let staff = forfall_platform::admin::staff_refusal(
        portal.0.settings.staff_token.as_deref(),
        "portal.staff_token",
        headers,
    )?;
    match portal.0.tokens.caller(headers) {
        Ok(caller @ Caller::Tenant(_)) => caller.tenant(Some(tenant)).err().map(IntoResponse::into_response),
        // A trusted caller (development, no tenant tokens) is not enough for debtors' data.
        Ok(Caller::Trusted) | Err(_) => Some(staff),
    }
}

pub(crate) async fn get_timeline(
    State(portal): State<Portal>,
    Path((tenant, invoice)): Path<(String, String)>,
    Query(query): Query<TimelineQuery>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = tenant_or_staff_refusal(&portal, &headers, &tenant) {
        return refused;
    }
    let span = tracing::info_span!("timeline", tenant = %tenant);
    let found = portal.view_of(&tenant, &invoice).instrument(span.clone()).await;
    // Entered only once nothing is awaited any more (an entered span must not cross an await).
    let _entered = span.enter();
    let view = match found {
        Ok(Some(view)) => view,
        Ok(None) => {
            return (
                StatusCode::NOT_FOUND,
                format!("no invoice {invoice} of {tenant} is known to the portal\n"),
            )
                .into_response();
        }
        Err(e) => {
            tracing::warn!(error = ?e, "the read model is not ready");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "the read model is being rebuilt; try again shortly\n",
            )
                .into_response();
        }
    };
    let timeline = build(&tenant, &view);
    let mut response = if query.format.as_deref() == Some("text") {
        (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            timeline.to_text(),
        )
            .into_response()
    } else {
        axum::Json(timeline).into_response()
    };
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::{Asked, Happened, Message, Paid, Snapshot};

    #[test]
    fn the_story_is_told_in_the_order_it_happened_from_every_source() {
        let view = InvoiceView {
            invoice_id: "i1".into(),
            snapshot: Some(Snapshot {
                revision: 1,
                debtor_id: "nordkraft:kari".into(),
                number: "7000123".into(),
                description: None,
                issue_date: 20_500,
                due_date: 20_514,
                amount_minor: 125_000,
                credited_minor: 0,
                open_minor: 125_000,
                currency: "NOK".into(),
                jurisdiction: "NO".into(),
                status: "open".into(),
                reference: None,
                language: None,
            }),
            journey: None,
            happened: vec![
                Happened {
                    kind: "step_sent".into(),
                    step: Some("nudge".into()),
                    at_ms: 2_000,
                    reason: None,
                    from_state: Some("open".into()),
                    to_state: Some("nudged".into()),
                    open_minor: Some(125_000),
                    seq: Some(7),
                    rule: None,
                },
                Happened {
                    kind: "paid".into(),
                    step: None,
                    at_ms: 5_000,
                    reason: None,
                    from_state: Some("nudged".into()),
                    to_state: Some("closed:paid".into()),
                    open_minor: Some(0),
                    seq: Some(9),
                    rule: None,
                },
            ],
            messages: vec![Message {
                step: "nudge".into(),
                channel: "email".into(),
                status: "sent".into(),
                at_ms: 3_000,
                reason: None,
            }],
            payments: vec![Paid {
                amount_minor: 125_000,
                currency: "NOK".into(),
                at_ms: 4_500,
                value_date: 20_515,
                payment_id: Some("vipps:ff-1".into()),
                rule: Some("exact_reference".into()),
            }],
            requests: vec![Asked {
                kind: "claims_paid".into(),
                at_ms: 4_000,
                source: "portal".into(),
                detail: None,
            }],
        };
        let t = build("nordkraft", &view);
        let order: Vec<&str> = t.entries.iter().map(|e| e.source).collect();
        assert_eq!(order, ["journey", "message", "request", "payment", "journey"]);
        let text = t.to_text();
        assert!(
            text.contains("journey  step_sent nudge (open → nudged) — left 1250.00 NOK\n"),
            "{text}"
        );
        assert!(text.contains("payment  1250.00 NOK matched"), "{text}");
        assert!(
            text.contains("payment vipps:ff-1; matched by exact_reference"),
            "{text}"
        );
        assert!(text.contains("claims_paid (from portal)"), "{text}");
        assert!(text.starts_with("invoice i1 (7000123) of nordkraft"), "{text}");
    }
}
