//! Paying now, through a payment provider: `POST /pay/<token>/checkout` starts a payment of
//! one invoice, of all the link's open invoices, or of an amount the debtor chose (a part
//! payment), and sends the browser to the provider; the provider's webhook and the page the
//! provider returns the debtor to (`GET /pay/return/<reference>`) both finish it. A completed
//! payment becomes a `PaymentReceived` on `payments.events.v1` with the provider's reference,
//! which the matcher settles like any other; an abandoned or failed one changes nothing.
//!
//! A payment under way is an [`Attempt`]: what it pays, for whom. It is written to the
//! portal's changelog (acknowledged) before the provider hears of it, then to Redis, so that
//! neither a lost Redis nor a restart loses what a payment was for. Finishing is idempotent:
//! the webhook and the return page may both finish the same payment, and the record they
//! write has the same event id and payment id (`<provider>:<reference>`) either way.

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use forfall_domain::invoice::epoch_days;
use forfall_domain::money::parse;
use forfall_domain::paylink::LinkError;
use forfall_domain::{Currency, Locale, Money};
use forfall_platform::kafka::Failure;
use forfall_platform::records::{PaymentReceived, derived_id};
use forfall_platform::telemetry::TraceContext;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use tracing::Instrument;

use crate::Portal;
use crate::http::{PLAIN, fingerprint, html_response, limited, refused, unavailable};
use crate::page;
use crate::view::InvoiceView;
use crate::vipps::{PaymentState, VippsError};

/// The form's `invoice` when the debtor pays every open invoice of the link.
pub const ALL_INVOICES: &str = "*";

/// How long a payment under way is remembered: longer than any provider keeps one open.
pub const ATTEMPT_TTL_SECS: u64 = 30 * 86_400;

/// The payment providers the page offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Vipps,
}

impl Provider {
    pub fn code(self) -> &'static str {
        match self {
            Provider::Vipps => "vipps",
        }
    }

    fn parse(code: &str) -> Option<Self> {
        (code == "vipps").then_some(Provider::Vipps)
    }

    /// What the debtor knows the app as in the invoice's country.
    pub fn name(self, jurisdiction: &str) -> &'static str {
        match (self, jurisdiction) {
            (Provider::Vipps, "NO") => "Vipps",
            (Provider::Vipps, _) => "MobilePay",
        }
    }

    pub fn pays(self, currency: Currency) -> bool {
        match self {
            Provider::Vipps => matches!(currency, Currency::NOK | Currency::DKK | Currency::EUR),
        }
    }
}

/// A payment under way at a provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub provider: String,
    /// The reference the provider knows the payment by (ours, unique).
    pub reference: String,
    pub tenant: String,
    pub debtor_id: String,
    pub invoices: Vec<String>,
    /// The invoices' numbers, for the remittance text the matcher reads.
    pub numbers: Vec<String>,
    /// The invoice's structured reference (KID, FIK, OCR...) when one invoice is paid.
    pub structured_reference: Option<String>,
    pub amount_minor: i64,
    pub currency: String,
    pub lang: String,
    pub created_ms: i64,
}

impl Attempt {
    /// The payment as the matcher reads it: the invoice's own reference for one invoice, the
    /// invoices' numbers in the remittance text (paid in that order) for several.
    pub fn received(&self, captured_minor: i64, at_ms: i64, day: i32) -> PaymentReceived {
        let payment_id = format!("{}:{}", self.provider, self.reference);
        PaymentReceived {
            event_id: derived_id("provider-payment", &[&self.tenant, &payment_id]),
            tenant: self.tenant.clone(),
            debtor_id: Some(self.debtor_id.clone()),
            occurred_at: at_ms,
            payment_id,
            amount_minor: captured_minor,
            currency: self.currency.clone(),
            reference: self.structured_reference.clone(),
            remittance_text: Some(format!(
                "{} {}",
                if self.numbers.len() == 1 { "Invoice" } else { "Invoices" },
                self.numbers.join(" ")
            )),
            payer_name: None,
            payer_account: None,
            booking_date: day,
            value_date: day,
        }
    }
}

/// What a checkout form asks to pay, checked against what the link's invoices owe.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    pub invoices: Vec<String>,
    pub numbers: Vec<String>,
    pub structured_reference: Option<String>,
    pub amount: Money,
    pub jurisdiction: String,
}

/// Why a checkout form was not taken, in words the page can show.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SelectionError {
    #[error("nothing is left to pay on the chosen invoice(s)")]
    NothingToPay,
    #[error("the invoices are in different currencies: pay them one by one")]
    MixedCurrencies,
    #[error("'{0}' is not an amount")]
    Amount(String),
    #[error("the amount must be more than zero and at most what is left, {0}")]
    OutOfRange(String),
}

/// The invoices a form pays (`invoice` one of the link's, or [`ALL_INVOICES`]) and how much:
/// what they owe, or the debtor's `amount` when given (at most what they owe). `amount` is
/// read in the debtor's locale; a point before the last one or two digits is taken as the
/// decimal point even where the comma is, as phones often offer only the point.
pub fn select(
    debtor_id: &str,
    views: &[InvoiceView],
    invoice: &str,
    amount: Option<&str>,
    locale: Locale,
) -> Result<Selection, SelectionError> {
    let mut chosen: Vec<(&InvoiceView, &crate::view::Snapshot, i64, Currency)> = Vec::new();
    for view in views
        .iter()
        .filter(|v| invoice == ALL_INVOICES || v.invoice_id == invoice)
    {
        let Some(s) = view.snapshot.as_ref().filter(|s| s.debtor_id == debtor_id) else {
            continue;
        };
        let Ok(currency) = s.currency.parse::<Currency>() else {
            continue;
        };
        let (left, why_not) = page::standing(view, s);
        if why_not.is_none() && left > 0 {
            chosen.push((view, s, left, currency));
        }
    }
    let Some(&(_, first, _, currency)) = chosen.first() else {
        return Err(SelectionError::NothingToPay);
    };
    if chosen.iter().any(|c| c.3 != currency) {
        return Err(SelectionError::MixedCurrencies);
    }
    let owed = Money::new(chosen.iter().map(|c| c.2).sum(), currency);
    let amount = match amount.map(str::trim).filter(|a| !a.is_empty()) {
        None => owed,
        Some(text) => {
            let wanted = parse(&decimal_point_as_typed(text, locale), locale, currency)
                .map_err(|_| SelectionError::Amount(text.chars().take(30).collect()))?;
            if wanted.minor <= 0 || wanted.minor > owed.minor {
                return Err(SelectionError::OutOfRange(forfall_domain::money::format(owed, locale)));
            }
            wanted
        }
    };
    Ok(Selection {
        invoices: chosen.iter().map(|c| c.0.invoice_id.clone()).collect(),
        numbers: chosen.iter().map(|c| c.1.number.clone()).collect(),
        structured_reference: if chosen.len() == 1 {
            first.reference.clone()
        } else {
            None
        },
        amount,
        jurisdiction: first.jurisdiction.clone(),
    })
}

/// "250.50" where the locale writes "250,50": a single point followed by one or two digits
/// is a decimal point, not a thousands separator.
fn decimal_point_as_typed(text: &str, locale: Locale) -> String {
    let (_, decimal) = locale.separators();
    if decimal == ',' && !text.contains(',') && text.matches('.').count() == 1 {
        if let Some((_, after)) = text.rsplit_once('.') {
            if (1..=2).contains(&after.trim().len()) {
                return text.replace('.', ",");
            }
        }
    }
    text.to_owned()
}

#[derive(Debug, Deserialize)]
pub(crate) struct CheckoutForm {
    invoice: String,
    form_token: String,
    provider: String,
    amount: Option<String>,
    lang: Option<String>,
}

pub(crate) async fn post_checkout(
    State(portal): State<Portal>,
    Path(token): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<CheckoutForm>,
) -> Response {
    let link = fingerprint(&token);
    let span = tracing::info_span!("checkout", link = %link, provider = %form.provider);
    async move {
        let client = portal.client_address(&headers, peer);
        let (response, result) = match portal.over_limit(&fingerprint(&client), &link).await {
            Ok(Some(retry_after)) => (limited(retry_after), "limited"),
            Ok(None) => portal.start_payment(&token, &link, &headers, &form).await,
            Err(e) => {
                tracing::warn!(error = ?e, "cannot count requests; answering unavailable");
                (unavailable(), "unavailable")
            }
        };
        portal
            .0
            .metrics
            .payments
            .with_label_values(&[form.provider.as_str(), result])
            .inc();
        tracing::info!(result, "checkout answered");
        response
    }
    .instrument(span)
    .await
}

impl Portal {
    async fn start_payment(
        &self,
        token: &str,
        link: &str,
        headers: &HeaderMap,
        form: &CheckoutForm,
    ) -> (Response, &'static str) {
        let claims = match self.0.links.verify(token, self.0.rt.clock.now()) {
            Ok(claims) => claims,
            Err(LinkError::Expired(_)) => return (refused(), "expired"),
            Err(_) => return (refused(), "refused"),
        };
        let Some(provider) = Provider::parse(&form.provider) else {
            return (refused(), "refused");
        };
        if crate::requests::cross_site(headers)
            || !(form.invoice == ALL_INVOICES || claims.invoices.contains(&form.invoice))
            || !self
                .0
                .links
                .verify_form_token(&format!("{link}/{}", form.invoice), &form.form_token)
        {
            return (refused(), "forged");
        }
        let Some(merchant) = self.0.settings.vipps.get(&claims.tenant) else {
            return (refused(), "refused");
        };
        let views = match self.views(&claims).await {
            Ok(views) => views,
            Err(_) => return (unavailable(), "unavailable"),
        };
        let lang = form
            .lang
            .as_deref()
            .filter(|l| page::LANGUAGES.contains(l))
            .unwrap_or("en")
            .to_owned();
        let selection = match select(
            &claims.debtor_id,
            &views,
            &form.invoice,
            form.amount.as_deref(),
            Locale::from_language(&lang),
        ) {
            Ok(s) if provider.pays(s.amount.currency) => s,
            Ok(_) => return (refused(), "refused"),
            Err(e) => {
                let back = format!("/pay/{token}?lang={lang}");
                return (
                    html_response(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        format!("{PLAIN}{e}</h1><p><a href=\"{back}\">Back</a></p></main></body></html>"),
                    ),
                    "invalid",
                );
            }
        };
        let now = self.0.rt.clock.now();
        let attempt = Attempt {
            provider: provider.code().to_owned(),
            reference: format!("ff-{}", uuid::Uuid::new_v4().simple()),
            tenant: claims.tenant.clone(),
            debtor_id: claims.debtor_id.clone(),
            invoices: selection.invoices.clone(),
            numbers: selection.numbers.clone(),
            structured_reference: selection.structured_reference.clone(),
            amount_minor: selection.amount.minor,
            currency: selection.amount.currency.code().to_owned(),
            lang,
            created_ms: now.timestamp_millis(),
        };
        if let Err(e) = self.remember(&attempt).await {
            tracing::warn!(error = ?e, "the payment could not be recorded");
            return (unavailable(), "unavailable");
        }
        let creditor = self.creditor(&claims.tenant);
        let description = format!(
            "{} {}",
            creditor.name.as_deref().unwrap_or(&claims.tenant),
            attempt.numbers.join(", ")
        );
        let return_url = format!("{}return/{}", self.0.pay_base_url, attempt.reference);
        match self
            .0
            .vipps
            .create(
                merchant,
                &attempt.reference,
                attempt.amount_minor,
                &attempt.currency,
                &description,
                &return_url,
            )
            .await
        {
            Ok(redirect) => match HeaderValue::from_str(&redirect) {
                Ok(location) => {
                    let mut response = StatusCode::SEE_OTHER.into_response();
                    response.headers_mut().insert(header::LOCATION, location);
                    response
                        .headers_mut()
                        .insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
                    (response, "started")
                }
                Err(_) => (unavailable(), "unavailable"),
            },
            Err(VippsError::Refused { status, detail }) => {
                tracing::error!(status, detail = %detail, "the provider refused the payment");
                (unavailable(), "provider_refused")
            }
            Err(e) => {
                tracing::warn!(error = %e, "the provider is unavailable");
                (unavailable(), "unavailable")
            }
        }
    }

    /// Writes the attempt to the changelog (acknowledged), then to Redis.
    async fn remember(&self, attempt: &Attempt) -> Result<(), Failure> {
        let value = serde_json::to_vec(attempt).map_err(|e| Failure::Transient(e.into()))?;
        let out = self
            .0
            .changelog
            .put_keyed(attempt_changelog_key(&attempt.reference), value.clone());
        self.0
            .producer
            .send_all(std::slice::from_ref(&out))
            .await
            .map_err(|e| Failure::Transient(anyhow::anyhow!(e)))?;
        redis::cmd("SET")
            .arg(self.0.keys.attempt(&attempt.reference))
            .arg(value)
            .arg("EX")
            .arg(ATTEMPT_TTL_SECS)
            .query_async::<()>(&mut self.0.redis.clone())
            .await?;
        Ok(())
    }

    /// The attempt with this reference; `None` when the portal started no such payment.
    pub(crate) async fn attempt(&self, reference: &str) -> Result<Option<Attempt>, Failure> {
        self.0.state.ensure_ready().await?;
        let raw: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.0.keys.attempt(reference))
            .query_async(&mut self.0.redis.clone())
            .await?;
        Ok(raw.and_then(|r| serde_json::from_slice(&r).ok()))
    }

    /// Asks the provider where the payment is, captures it once authorized, and writes the
    /// payment received once captured. Safe to call any number of times.
    pub(crate) async fn finish(&self, attempt: &Attempt) -> Result<PaymentState, Failure> {
        let merchant = self.0.settings.vipps.get(&attempt.tenant).ok_or_else(|| {
            Failure::Transient(anyhow::anyhow!(
                "no Vipps MobilePay merchant for tenant {}",
                attempt.tenant
            ))
        })?;
        let provider_failure = |e: VippsError| Failure::Transient(anyhow::anyhow!(e));
        let mut state = self
            .0
            .vipps
            .state(merchant, &attempt.reference)
            .await
            .map_err(provider_failure)?;
        if state.state == "AUTHORIZED" && state.captured_minor < state.authorized_minor {
            state = self
                .0
                .vipps
                .capture_rest(merchant, &attempt.reference, &state)
                .await
                .map_err(provider_failure)?;
        }
        if state.captured_minor > 0 {
            let now = self.0.rt.clock.now();
            let record = attempt.received(
                state.captured_minor,
                now.timestamp_millis(),
                epoch_days(now.date_naive()),
            );
            let topic = self.0.rt.topic(&self.0.rt.config.topics.payments);
            let out = self
                .0
                .rt
                .codec
                .outbound(&topic, &attempt.tenant, &record, TraceContext::new_root())
                .await?;
            self.0
                .producer
                .send_all(std::slice::from_ref(&out))
                .await
                .map_err(|e| Failure::Transient(anyhow::anyhow!(e)))?;
        }
        Ok(state)
    }
}

/// The changelog's key of an attempt.
pub fn attempt_changelog_key(reference: &str) -> String {
    format!("pay/{reference}")
}

/// `GET /pay/return/<reference>`: where the provider sends the debtor back. It finishes the
/// payment (in case the webhook is late or lost) and says how it went.
pub(crate) async fn returned(State(portal): State<Portal>, Path(reference): Path<String>) -> Response {
    let span = tracing::info_span!("payment_return", reference = %reference);
    async move {
        let attempt = match portal.attempt(&reference).await {
            Ok(Some(a)) => a,
            Ok(None) => return refused(),
            Err(_) => return unavailable(),
        };
        let t = portal.0.texts.for_language(&attempt.lang, "");
        let text = |key: &str| t.get(key).cloned().unwrap_or_else(|| key.to_owned());
        let (heading, detail, result) = match portal.finish(&attempt).await {
            Ok(state) if state.captured_minor > 0 => {
                let amount = attempt
                    .currency
                    .parse::<Currency>()
                    .map(|c| {
                        forfall_domain::money::format(
                            Money::new(state.captured_minor, c),
                            Locale::from_language(&attempt.lang),
                        )
                    })
                    .unwrap_or_default();
                (text("return_paid_title"), format!("{} {amount}", text("return_paid")), "completed")
            }
            Ok(state) if matches!(state.state.as_str(), "ABORTED" | "EXPIRED" | "TERMINATED" | "CANCELLED") => {
                (text("return_cancelled_title"), text("return_cancelled"), "abandoned")
            }
            Ok(_) | Err(_) => (text("return_pending_title"), text("return_pending"), "pending"),
        };
        portal
            .0
            .metrics
            .payments
            .with_label_values(&[attempt.provider.as_str(), result])
            .inc();
        tracing::info!(result, "payment return answered");
        let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;");
        html_response(
            StatusCode::OK,
            format!(
                "<!doctype html><html lang=\"{}\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{}</title></head><body><main><h1>{}</h1><p role=\"status\">{}</p><p>{}</p></main></body></html>",
                esc(&attempt.lang),
                esc(&heading),
                esc(&heading),
                esc(&detail),
                esc(&text("return_link_again"))
            ),
        )
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::{JourneyNow, Snapshot};

    fn open(id: &str, number: &str, amount: i64, currency: &str, reference: Option<&str>) -> InvoiceView {
        InvoiceView {
            invoice_id: id.into(),
            snapshot: Some(Snapshot {
                revision: 1,
                debtor_id: "d1".into(),
                number: number.into(),
                description: None,
                issue_date: 20_000,
                due_date: 20_030,
                amount_minor: amount,
                credited_minor: 0,
                open_minor: amount,
                currency: currency.into(),
                jurisdiction: "NO".into(),
                status: "open".into(),
                reference: reference.map(str::to_owned),
                language: Some("nb".into()),
            }),
            ..InvoiceView::default()
        }
    }

    #[test]
    fn one_invoice_is_paid_in_full_by_its_own_reference_or_in_part_by_the_debtors_amount() {
        let views = [open("i1", "1001", 125_000, "NOK", Some("70001232"))];
        let all = select("d1", &views, "i1", None, Locale::NbNo).unwrap();
        assert_eq!(all.amount, Money::new(125_000, Currency::NOK));
        assert_eq!(all.structured_reference.as_deref(), Some("70001232"));
        for typed in ["400,50", "400.50", "kr 400,50"] {
            let part = select("d1", &views, "i1", Some(typed), Locale::NbNo).unwrap();
            assert_eq!(part.amount, Money::new(40_050, Currency::NOK), "{typed}");
        }
        let thousands = select("d1", &views, "i1", Some("1.000"), Locale::DaDk).unwrap();
        assert_eq!(
            thousands.amount,
            Money::new(100_000, Currency::NOK),
            "the Danish thousands point"
        );
        assert!(matches!(
            select("d1", &views, "i1", Some("1.000"), Locale::NbNo),
            Err(SelectionError::Amount(_))
        ));
        assert!(matches!(
            select("d1", &views, "i1", Some("1250,01"), Locale::NbNo),
            Err(SelectionError::OutOfRange(_))
        ));
        assert!(matches!(
            select("d1", &views, "i1", Some("0"), Locale::NbNo),
            Err(SelectionError::OutOfRange(_))
        ));
        assert!(matches!(
            select("d1", &views, "i1", Some("ti kroner"), Locale::NbNo),
            Err(SelectionError::Amount(_))
        ));
    }

    #[test]
    fn all_pays_every_open_invoice_of_the_debtor_by_their_numbers_and_nothing_else() {
        let mut paid = open("i3", "1003", 10_000, "NOK", None);
        paid.journey = Some(JourneyNow {
            state: "closed:paid".into(),
            outstanding_minor: 0,
            at_ms: 0,
        });
        let mut other = open("i4", "1004", 10_000, "NOK", None);
        other.snapshot.as_mut().unwrap().debtor_id = "d2".into();
        let views = [
            open("i1", "1001", 125_000, "NOK", Some("70001232")),
            open("i2", "1002", 30_000, "NOK", Some("70002248")),
            paid,
            other,
        ];
        let all = select("d1", &views, ALL_INVOICES, None, Locale::NbNo).unwrap();
        assert_eq!(all.invoices, ["i1", "i2"]);
        assert_eq!(all.numbers, ["1001", "1002"]);
        assert_eq!(all.amount, Money::new(155_000, Currency::NOK));
        assert_eq!(all.structured_reference, None, "two invoices have no one reference");
        assert_eq!(
            select("d1", &views, "i3", None, Locale::NbNo),
            Err(SelectionError::NothingToPay)
        );
        assert_eq!(
            select("d1", &views, "i4", None, Locale::NbNo),
            Err(SelectionError::NothingToPay)
        );
        let mixed = [
            open("i1", "1001", 100, "NOK", None),
            open("i2", "1002", 100, "EUR", None),
        ];
        assert_eq!(
            select("d1", &mixed, ALL_INVOICES, None, Locale::NbNo),
            Err(SelectionError::MixedCurrencies)
        );
    }

    #[test]
    fn a_finished_payment_reads_as_the_same_record_however_often_it_is_finished() {
        let attempt = Attempt {
            provider: "vipps".into(),
            reference: "ff-0123456789abcdef".into(),
            tenant: "nordkraft".into(),
            debtor_id: "d1".into(),
            invoices: vec!["i1".into(), "i2".into()],
            numbers: vec!["1001".into(), "1002".into()],
            structured_reference: None,
            amount_minor: 155_000,
            currency: "NOK".into(),
            lang: "nb".into(),
            created_ms: 0,
        };
        let first = attempt.received(155_000, 1, 20_000);
        let again = attempt.received(155_000, 2, 20_001);
        assert_eq!(first.event_id, again.event_id);
        assert_eq!(first.payment_id, "vipps:ff-0123456789abcdef");
        assert_eq!(first.payment_id, again.payment_id);
        assert_eq!(first.debtor_id.as_deref(), Some("d1"));
        assert_eq!(first.remittance_text.as_deref(), Some("Invoices 1001 1002"));
    }
}
