//! The debtor's requests from the page: "I have paid", a promise to pay by a date, an
//! objection (dispute), a later due date, and an instalment plan. `POST /pay/<token>/requests`
//! turns a form into a `DebtorRequest` on `forfall.debtor.requests.v1`; the watcher decides it
//! under the policy's limits and the law, and the page then tells what became of it from the
//! journey's events. The page offers only postponements and plans within the policy's limits
//! (`forfall_domain::self_service`); a plan is sent as the page showed it, instalment by
//! instalment, so the debtor agrees to exactly what they saw.
//!
//! A form is accepted only with the anti-forgery token its page carried (HMAC of the link's
//! fingerprint and the invoice, see `paylink::form_token`), for an invoice the link names, and
//! from the page's own origin when the browser says where it posts from. The same request sent
//! twice on a day (a double click, a reload) is one request: its id derives from it and what it
//! asks, so a corrected request (another date) is a new one.

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use forfall_domain::invoice::epoch_days;
use forfall_domain::paylink::LinkError;
use forfall_platform::kafka::Failure;
use forfall_platform::records::{DebtorRequest, Instalment, derived_id};
use serde::Deserialize;
use std::net::SocketAddr;
use tracing::Instrument;

use crate::Portal;
use crate::http::{fingerprint, limited, refused, unavailable, withdrawn};
use crate::revocation::LinkRefusal;

/// What a debtor may write in an objection.
const MAX_REASON_CHARS: usize = 1000;

#[derive(Debug, Deserialize)]
pub(crate) struct RequestForm {
    invoice: String,
    form_token: String,
    kind: String,
    lang: Option<String>,
    reason: Option<String>,
    promise_date: Option<String>,
    postpone_date: Option<String>,
    /// How many instalments (the plan itself is the one the page showed for that number).
    count: Option<String>,
}

/// Why a form was not taken.
#[derive(Debug, thiserror::Error, PartialEq)]
pub(crate) enum FormError {
    #[error("unknown request kind '{0}'")]
    Kind(String),
    #[error("an objection needs a text of 1 to {MAX_REASON_CHARS} characters")]
    Reason,
    #[error("a date is needed as YYYY-MM-DD, not '{0}'")]
    Date(String),
    #[error("the number of instalments must be one of those offered, not '{0}'")]
    Count(String),
}

/// What a form asks for, checked for shape only: whether it is granted is the watcher's
/// decision.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Wanted {
    ClaimsPaid,
    Promise(chrono::NaiveDate),
    Dispute(String),
    Postpone(chrono::NaiveDate),
    Instalments(usize),
    /// From an expired link's page: a fresh link to the contact on file.
    FreshLink,
}

impl Wanted {
    fn kind(&self) -> &'static str {
        match self {
            Wanted::ClaimsPaid => "claims_paid",
            Wanted::Promise(_) => "promise_to_pay",
            Wanted::Dispute(_) => "dispute",
            Wanted::Postpone(_) => "postpone",
            Wanted::Instalments(_) => "instalment_plan",
            Wanted::FreshLink => "fresh_link",
        }
    }
}

fn date_field(raw: Option<&str>) -> Result<chrono::NaiveDate, FormError> {
    let raw = raw.unwrap_or_default();
    chrono::NaiveDate::parse_from_str(raw.trim(), "%Y-%m-%d")
        .map_err(|_| FormError::Date(raw.chars().take(20).collect()))
}

pub(crate) fn request_of(form: &RequestForm) -> Result<Wanted, FormError> {
    match form.kind.as_str() {
        "claims_paid" => Ok(Wanted::ClaimsPaid),
        "fresh_link" => Ok(Wanted::FreshLink),
        "promise_to_pay" => Ok(Wanted::Promise(date_field(form.promise_date.as_deref())?)),
        "postpone" => Ok(Wanted::Postpone(date_field(form.postpone_date.as_deref())?)),
        "instalment_plan" => {
            let raw = form.count.as_deref().unwrap_or_default();
            raw.trim()
                .parse::<usize>()
                .map(Wanted::Instalments)
                .map_err(|_| FormError::Count(raw.chars().take(10).collect()))
        }
        "dispute" => {
            let reason = form.reason.as_deref().unwrap_or_default().trim();
            if reason.is_empty() || reason.chars().count() > MAX_REASON_CHARS {
                return Err(FormError::Reason);
            }
            Ok(Wanted::Dispute(reason.to_owned()))
        }
        other => Err(FormError::Kind(other.chars().take(40).collect())),
    }
}

/// Whether the browser says the form came from elsewhere. `Sec-Fetch-Site` decides where the
/// browser sends it (every current browser): only `same-origin` (or `none`, typed by the user)
/// passes. Older browsers send only `Origin`: it must be the links' public origin,
/// `public_origin`, or the host asked for (a proxy in front of the portal may rewrite `Host`).
/// `Origin: null` alone is no proof of another site: the page's `Referrer-Policy: no-referrer`
/// makes browsers send it for the page's own forms.
pub(crate) fn cross_site(headers: &HeaderMap, public_origin: &str) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return !matches!(site, "same-origin" | "none");
    }
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    match origin {
        None => false,
        Some("null") => true,
        Some(origin) if origin == public_origin => false,
        Some(origin) => origin.split_once("://").map(|(_, h)| h) != host,
    }
}

pub(crate) async fn post_request(
    State(portal): State<Portal>,
    Path(token): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<RequestForm>,
) -> Response {
    let link = fingerprint(&token);
    let span = tracing::info_span!("request", link = %link, kind = %form.kind);
    async move {
        let client = portal.client_address(&headers, peer);
        let (response, result) = match portal.over_limit(&fingerprint(&client), &link).await {
            Ok(Some(retry_after)) => (limited(retry_after), "limited"),
            Ok(None) => portal.take_request(&token, &link, &headers, &form).await,
            Err(e) => {
                tracing::warn!(error = ?e, "cannot count requests; answering unavailable");
                (unavailable(), "unavailable")
            }
        };
        portal.0.metrics.requests.with_label_values(&[result]).inc();
        tracing::info!(result, "request answered");
        response
    }
    .instrument(span)
    .await
}

impl Portal {
    async fn take_request(
        &self,
        token: &str,
        link: &str,
        headers: &HeaderMap,
        form: &RequestForm,
    ) -> (Response, &'static str) {
        // An expired link asks for a fresh one and nothing else; a live one has no need to.
        let opened = match self.open_link(token).await {
            Err(LinkRefusal::Invalid(LinkError::Expired(_))) if form.kind == "fresh_link" => {
                self.open_expired_link(token).await
            }
            Err(LinkRefusal::Invalid(LinkError::Expired(_))) => return (refused_with(StatusCode::GONE), "expired"),
            Ok(_) if form.kind == "fresh_link" => return (refused(), "forged"),
            other => other,
        };
        let claims = match opened {
            Ok(claims) => claims,
            Err(LinkRefusal::Withdrawn) => return (withdrawn(), "withdrawn"),
            Err(LinkRefusal::Unavailable(_)) => return (unavailable(), "unavailable"),
            Err(LinkRefusal::Invalid(_)) => return (refused(), "refused"),
        };
        if cross_site(headers, &self.public_origin())
            || !claims.invoices.contains(&form.invoice)
            || !self
                .0
                .links
                .verify_form_token(&crate::http::form_scope(link, &form.invoice), &form.form_token)
        {
            return (refused(), "forged");
        }
        let invalid = |e: &dyn std::fmt::Display| {
            (
                crate::http::html_response(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!(
                        "{}{e}</h1><p><a href=\"/pay/{token}\">Back</a></p></main></body></html>",
                        crate::http::PLAIN
                    ),
                ),
                "invalid",
            )
        };
        let wanted = match request_of(form) {
            Ok(w) => w,
            Err(e) => return invalid(&e),
        };
        let now = self.0.rt.clock.now();
        let today = now.date_naive();
        let instalments = match &wanted {
            Wanted::Instalments(count) => match self.plan_for(&claims, &form.invoice, *count, today).await {
                Ok(Some(plan)) => plan
                    .into_iter()
                    .map(|(day, amount)| Instalment {
                        due_date: epoch_days(day),
                        amount_minor: amount.minor,
                    })
                    .collect(),
                Ok(None) => return invalid(&FormError::Count(count.to_string())),
                Err(_) => return (unavailable(), "unavailable"),
            },
            _ => Vec::new(),
        };
        let kind = wanted.kind();
        let day = today.to_string();
        // What was asked is part of the id: the same form twice is one request, a corrected
        // one (another date, another plan) is a new one.
        let asked = format!("{wanted:?}");
        let request = DebtorRequest {
            event_id: derived_id(
                "debtor-request",
                &[&claims.tenant, &form.invoice, kind, link, &day, &asked],
            ),
            tenant: claims.tenant.clone(),
            debtor_id: claims.debtor_id.clone(),
            occurred_at: now.timestamp_millis(),
            invoice_id: form.invoice.clone(),
            kind: kind.to_owned(),
            new_due_date: match &wanted {
                Wanted::Postpone(d) => Some(epoch_days(*d)),
                _ => None,
            },
            promise_date: match &wanted {
                Wanted::Promise(d) => Some(epoch_days(*d)),
                _ => None,
            },
            instalments,
            reason: match &wanted {
                Wanted::Dispute(r) => Some(r.clone()),
                _ => None,
            },
            source: "portal".to_owned(),
        };
        if let Err(e) = self.send(&request).await {
            tracing::warn!(error = ?e, "the request could not be written");
            return (unavailable(), "unavailable");
        }
        let lang = form
            .lang
            .as_deref()
            .filter(|l| crate::page::LANGUAGES.contains(l))
            .unwrap_or("en");
        let mut response = StatusCode::SEE_OTHER.into_response();
        if let Ok(location) = HeaderValue::from_str(&format!("/pay/{token}?lang={lang}&received=1")) {
            response.headers_mut().insert(header::LOCATION, location);
        }
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
            .headers_mut()
            .insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
        (response, kind)
    }

    /// The plan of `count` instalments the page offers for the invoice today, if it offers one.
    async fn plan_for(
        &self,
        claims: &forfall_domain::paylink::LinkClaims,
        invoice: &str,
        count: usize,
        today: chrono::NaiveDate,
    ) -> Result<Option<Vec<(chrono::NaiveDate, forfall_domain::Money)>>, Failure> {
        let views = self.views(claims).await?;
        let owed = views.iter().find(|v| v.invoice_id == invoice).and_then(|v| {
            let s = v.snapshot.as_ref().filter(|s| s.debtor_id == claims.debtor_id)?;
            let currency = s.currency.parse::<forfall_domain::Currency>().ok()?;
            let (left, why_not) = crate::page::standing(v, s);
            why_not.is_none().then(|| forfall_domain::Money::new(left, currency))
        });
        Ok(owed.and_then(|owed| forfall_domain::self_service::instalment_plan(owed, today, count, &self.0.pauses)))
    }

    /// Writes the request and waits for the broker's acknowledgement: the page says it was
    /// received only when it is.
    async fn send(&self, request: &DebtorRequest) -> Result<(), Failure> {
        self.publish(&self.0.rt.config.topics.debtor_requests, &request.debtor_id, request)
            .await
    }
}

fn refused_with(status: StatusCode) -> Response {
    let mut response = refused();
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(kind: &str) -> RequestForm {
        RequestForm {
            invoice: "i1".into(),
            form_token: "t".into(),
            kind: kind.into(),
            lang: None,
            reason: None,
            promise_date: None,
            postpone_date: None,
            count: None,
        }
    }

    #[test]
    fn each_form_becomes_its_request_or_says_what_is_missing() {
        let day = chrono::NaiveDate::from_ymd_opt(2026, 3, 20).unwrap();
        assert_eq!(request_of(&form("claims_paid")), Ok(Wanted::ClaimsPaid));
        assert_eq!(request_of(&form("dispute")), Err(FormError::Reason));
        let dispute = RequestForm {
            reason: Some("  I cancelled in January  ".into()),
            ..form("dispute")
        };
        assert_eq!(
            request_of(&dispute),
            Ok(Wanted::Dispute("I cancelled in January".into()))
        );
        let promise = RequestForm {
            promise_date: Some("2026-03-20".into()),
            ..form("promise_to_pay")
        };
        assert_eq!(request_of(&promise), Ok(Wanted::Promise(day)));
        assert_eq!(request_of(&form("promise_to_pay")), Err(FormError::Date(String::new())));
        let postpone = RequestForm {
            postpone_date: Some("2026-03-20".into()),
            ..form("postpone")
        };
        assert_eq!(request_of(&postpone), Ok(Wanted::Postpone(day)));
        let plan = RequestForm {
            count: Some("3".into()),
            ..form("instalment_plan")
        };
        assert_eq!(request_of(&plan), Ok(Wanted::Instalments(3)));
        let nonsense = RequestForm {
            count: Some("three".into()),
            ..form("instalment_plan")
        };
        assert_eq!(request_of(&nonsense), Err(FormError::Count("three".into())));
        assert_eq!(request_of(&form("refund")), Err(FormError::Kind("refund".into())));
    }

    #[test]
    fn a_form_from_another_site_is_told_apart() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("pay.example.com"));
        let public = "https://pay.example.com";
        assert!(
            !cross_site(&h, public),
            "no Origin: an older browser, the token decides"
        );
        h.insert(header::ORIGIN, HeaderValue::from_static("https://pay.example.com"));
        assert!(!cross_site(&h, public));
        h.insert(header::ORIGIN, HeaderValue::from_static("https://evil.example"));
        assert!(cross_site(&h, public));
        // Behind a proxy that rewrites Host, the links' public origin is still the page's.
        h.insert(header::HOST, HeaderValue::from_static("portal.internal:9606"));
        h.insert(header::ORIGIN, HeaderValue::from_static("https://pay.example.com"));
        assert!(!cross_site(&h, public));
        let mut h = HeaderMap::new();
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(cross_site(&h, "https://pay.example.com"));
        // What Chromium sends for the page's own form under `Referrer-Policy: no-referrer`.
        let mut h = HeaderMap::new();
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        h.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        assert!(!cross_site(&h, "https://pay.example.com"));
        h.insert("sec-fetch-site", HeaderValue::from_static("same-site"));
        assert!(
            cross_site(&h, "https://pay.example.com"),
            "a sibling subdomain is another site"
        );
    }
}
