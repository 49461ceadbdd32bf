//! Paying now, through a payment provider: `POST /pay/<token>/checkout` starts a payment of
//! one invoice, of all the link's open invoices, or of an amount the debtor chose (a part
//! payment), and sends the browser to the provider: Vipps MobilePay's app (NO, DK, FI) or a
//! card through Stripe Checkout; or, for Swish (SE), creates the payment request and sends
//! the browser to the return page, which opens the app or shows its QR code. How a payment then ends is [`crate::payments`].

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use forfall_domain::money::parse;
use forfall_domain::paylink::LinkError;
use forfall_domain::{Currency, Locale, Money};
use serde::Deserialize;
use std::net::SocketAddr;
use tracing::Instrument;

use crate::Portal;
use crate::http::{PLAIN, fingerprint, html_response, limited, refused, unavailable, withdrawn};
use crate::page;
use crate::payments::Attempt;
use crate::revocation::LinkRefusal;
use crate::stripe::{NewSession, StripeError};
use crate::swish::SwishError;
use crate::view::InvoiceView;
use crate::vipps::VippsError;

/// The form's `invoice` when the debtor pays every open invoice of the link.
pub const ALL_INVOICES: &str = "*";

/// The payment providers the page offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// Vipps MobilePay's app (ePayment API).
    Vipps,
    /// Card, through Stripe Checkout.
    Stripe,
    /// Swish (Sweden): the app opens or scans the payment request.
    Swish,
}

impl Provider {
    pub fn code(self) -> &'static str {
        match self {
            Provider::Vipps => "vipps",
            Provider::Stripe => "stripe",
            Provider::Swish => "swish",
        }
    }

    fn parse(code: &str) -> Option<Self> {
        match code {
            "vipps" => Some(Provider::Vipps),
            "stripe" => Some(Provider::Stripe),
            "swish" => Some(Provider::Swish),
            _ => None,
        }
    }

    /// The button's text: the app's name as the invoice's country knows it, or the debtor's
    /// word for a card (`t` the page's texts).
    pub fn label(self, jurisdiction: &str, t: &std::collections::BTreeMap<String, String>) -> String {
        let name = match (self, jurisdiction) {
            (Provider::Vipps, "NO") => "Vipps".to_owned(),
            (Provider::Vipps, _) => "MobilePay".to_owned(),
            (Provider::Swish, _) => "Swish".to_owned(),
            (Provider::Stripe, _) => return t.get("pay_card").cloned().unwrap_or_else(|| "Card".to_owned()),
        };
        t.get("pay_with")
            .map(|w| w.replace("{provider}", &name))
            .unwrap_or(name)
    }

    pub fn pays(self, currency: Currency) -> bool {
        match self {
            Provider::Vipps => matches!(currency, Currency::NOK | Currency::DKK | Currency::EUR),
            Provider::Stripe => true,
            Provider::Swish => currency == Currency::SEK,
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
        let claims = match self.open_link(token).await {
            Ok(claims) => claims,
            Err(LinkRefusal::Invalid(LinkError::Expired(_))) => return (refused(), "expired"),
            Err(LinkRefusal::Withdrawn) => return (withdrawn(), "withdrawn"),
            Err(LinkRefusal::Unavailable(_)) => return (unavailable(), "unavailable"),
            Err(LinkRefusal::Invalid(_)) => return (refused(), "refused"),
        };
        let Some(provider) = Provider::parse(&form.provider) else {
            return (refused(), "refused");
        };
        let cross_site = crate::requests::cross_site(headers, &self.public_origin());
        let named = form.invoice == ALL_INVOICES || claims.invoices.contains(&form.invoice);
        let token_holds = self
            .0
            .links
            .verify_form_token(&crate::http::form_scope(link, &form.invoice), &form.form_token);
        if cross_site || !named || !token_holds {
            tracing::warn!(cross_site, named, token_holds, "a pay-now form refused as forged");
            return (refused(), "forged");
        }
        if !self.providers(&claims.tenant).contains(&provider) {
            return (refused(), "refused");
        }
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
        let reference = uuid::Uuid::new_v4().simple().to_string();
        let mut attempt = Attempt {
            provider: provider.code().to_owned(),
            reference: format!("ff-{reference}"),
            // Swish knows the payment by the reference's hex, and calls back with an
            // identifier only the attempt holds.
            provider_id: (provider == Provider::Swish).then(|| reference.to_ascii_uppercase()),
            provider_token: None,
            callback_identifier: (provider == Provider::Swish)
                .then(|| uuid::Uuid::new_v4().simple().to_string().to_ascii_uppercase()),
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
        let started = match provider {
            Provider::Vipps => match self.0.settings.vipps.get(&claims.tenant) {
                Some(merchant) => self
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
                    .map_err(|e| match e {
                        VippsError::Refused { status, detail } => Started::Refused(status, detail),
                        e => Started::Unavailable(e.to_string()),
                    }),
                None => Err(Started::Refused(0, "no merchant".into())),
            },
            Provider::Stripe => match self.0.settings.stripe.get(&claims.tenant) {
                Some(account) => {
                    let session = self
                        .0
                        .stripe
                        .create(
                            account,
                            &NewSession {
                                reference: &attempt.reference,
                                amount_minor: attempt.amount_minor,
                                currency: &attempt.currency,
                                description: &description,
                                success_url: &format!("{return_url}?session_id={{CHECKOUT_SESSION_ID}}"),
                                cancel_url: &return_url,
                                locale: stripe_locale(&attempt.lang),
                            },
                        )
                        .await
                        .map_err(|e| match e {
                            StripeError::Refused { status, detail } => Started::Refused(status, detail),
                            e => Started::Unavailable(e.to_string()),
                        });
                    match session {
                        Ok(session) => {
                            // Kept so that the return without a session id can still ask.
                            attempt.provider_id = Some(session.id.clone());
                            if let Err(e) = self.remember(&attempt).await {
                                tracing::warn!(error = ?e, "the session id could not be kept; the webhook and the return still carry it");
                            }
                            session
                                .url
                                .ok_or_else(|| Started::Unavailable("the session has no url".into()))
                        }
                        Err(e) => Err(e),
                    }
                }
                None => Err(Started::Refused(0, "no account".into())),
            },
            Provider::Swish => self.start_swish(&mut attempt, &description, &return_url).await,
        };
        match started {
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
            Err(Started::Refused(status, detail)) => {
                tracing::error!(status, detail = %detail, "the provider refused the payment");
                (unavailable(), "provider_refused")
            }
            Err(Started::Unavailable(e)) => {
                tracing::warn!(error = %e, "the provider is unavailable");
                (unavailable(), "unavailable")
            }
        }
    }
}

impl Portal {
    /// Creates the Swish payment request and keeps its token with the attempt; where the
    /// browser goes next (the return page, which opens the app or shows the QR code).
    async fn start_swish(&self, attempt: &mut Attempt, description: &str, return_url: &str) -> Result<String, Started> {
        let Some(merchant) = self.0.settings.swish.get(&attempt.tenant) else {
            return Err(Started::Refused(0, "no merchant".into()));
        };
        let (Some(instruction_id), Some(callback_identifier)) =
            (attempt.provider_id.clone(), attempt.callback_identifier.clone())
        else {
            return Err(Started::Unavailable("the attempt has no Swish ids".into()));
        };
        // The creditor's books know one invoice by its OCR; several, by our reference.
        let payee_reference = attempt
            .structured_reference
            .clone()
            .filter(|r| (1..=35).contains(&r.len()) && r.chars().all(|c| c.is_ascii_alphanumeric()))
            .unwrap_or_else(|| instruction_id.clone());
        let token = self
            .0
            .swish
            .create(
                &attempt.tenant,
                merchant,
                &crate::swish::NewRequest {
                    instruction_id: &instruction_id,
                    payee_reference: &payee_reference,
                    amount_minor: attempt.amount_minor,
                    message: description,
                    callback_identifier: &callback_identifier,
                },
            )
            .await
            .map_err(|e| match e {
                SwishError::Refused { status, detail } => Started::Refused(status, detail),
                e => Started::Unavailable(e.to_string()),
            })?;
        attempt.provider_token = Some(token);
        self.remember(attempt)
            .await
            .map_err(|e| Started::Unavailable(format!("the token could not be kept: {e:?}")))?;
        Ok(return_url.to_owned())
    }
}

/// Why a payment could not be started at the provider.
enum Started {
    Refused(u16, String),
    Unavailable(String),
}

/// The language Stripe Checkout is shown in (Stripe's `locale` codes).
fn stripe_locale(lang: &str) -> &'static str {
    match lang {
        "da" => "da",
        "nb" => "nb",
        "sv" => "sv",
        "fi" => "fi",
        _ => "en",
    }
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
            next: None,
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
}
