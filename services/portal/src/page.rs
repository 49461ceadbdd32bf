//! What the debtor's page says, decided from the read model: a pure function from the link's
//! claims, the invoices' views, the creditor and the language to a page model, and its
//! rendering as HTML (server-side, no script, no external assets).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use forfall_domain::invoice::date_from_epoch_days;
use forfall_domain::locale::format_date;
use forfall_domain::money::format;
use forfall_domain::{Currency, Locale, Money};
use serde::{Deserialize, Serialize};

use crate::checkout::{ALL_INVOICES, Provider};
use crate::view::{InvoiceView, Snapshot};
use forfall_domain::journey::PauseLimits;
use forfall_domain::self_service::{instalment_counts, instalment_plan, postpone_window};

/// The languages the page speaks, in the order the switcher lists them.
pub const LANGUAGES: [&str; 5] = ["da", "nb", "sv", "fi", "en"];

/// What the creditor's messages and page say about it (`dispatch.tenants.<tenant>`, the same
/// settings the messages use).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Creditor {
    pub name: Option<String>,
    pub contact: Option<String>,
    /// Bank details for a transfer, e.g. "Reg. 1234 konto 0001234567" or an IBAN.
    pub bank_account: Option<String>,
    /// For the EPC QR code and the Finnish bank barcode.
    pub iban: Option<String>,
    pub bic: Option<String>,
    /// Denmark: the FI-kort creditor number (8 digits) for the `+71` payment line.
    pub fik_creditor: Option<String>,
    /// Sweden: the bankgiro number the OCR reference is paid to.
    pub bankgiro: Option<String>,
}

impl Creditor {
    /// Refuses account details a debtor's bank would refuse: an IBAN with wrong check digits, a
    /// bankgiro number failing its MOD 10, a Norwegian account number (`NNNN.NN.NNNNN`) failing
    /// its MOD 11. A mistyped digit here sends every debtor's money nowhere, so the portal
    /// does not start with one.
    pub fn check(&self) -> Result<(), forfall_domain::bank_codes::BankCodeError> {
        use forfall_domain::bank_codes;
        if let Some(iban) = &self.iban {
            bank_codes::iban(iban)?;
        }
        if let Some(bankgiro) = &self.bankgiro {
            bank_codes::bankgiro(bankgiro)?;
        }
        if let Some(account) = self.bank_account.as_deref().filter(|a| norwegian_layout(a)) {
            bank_codes::norwegian_account(account)?;
        }
        Ok(())
    }
}

/// Whether an account is written the Norwegian way, `NNNN.NN.NNNNN` (other countries' accounts
/// are free text: "Reg. 1234 konto 0001234567").
fn norwegian_layout(account: &str) -> bool {
    let parts: Vec<&str> = account.trim().split('.').collect();
    parts.iter().map(|p| p.len()).eq([4, 2, 5]) && parts.iter().all(|p| p.chars().all(|c| c.is_ascii_digit()))
}

/// Every language's texts (`templates/texts.toml`).
#[derive(Debug, Clone)]
pub struct Texts(BTreeMap<String, BTreeMap<String, String>>);

#[derive(Debug, thiserror::Error)]
pub enum TextsError {
    #[error("the page's texts are not valid TOML: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("the page's texts have no language '{0}'")]
    MissingLanguage(&'static str),
    #[error("the page's texts in '{language}' lack '{key}' (English has it)")]
    MissingText { language: &'static str, key: String },
}

impl Texts {
    /// The built-in texts, checked: every language has every key English has.
    pub fn built_in() -> Result<Self, TextsError> {
        Self::parse(include_str!("../templates/texts.toml"))
    }

    pub fn parse(toml_text: &str) -> Result<Self, TextsError> {
        let all: BTreeMap<String, BTreeMap<String, String>> = toml::from_str(toml_text)?;
        let english = all.get("en").ok_or(TextsError::MissingLanguage("en"))?;
        for language in LANGUAGES {
            let texts = all.get(language).ok_or(TextsError::MissingLanguage(language))?;
            if let Some(key) = english.keys().find(|k| !texts.contains_key(*k)) {
                return Err(TextsError::MissingText {
                    language,
                    key: key.clone(),
                });
            }
        }
        Ok(Self(all))
    }

    /// One language's texts with the creditor's name put in.
    pub(crate) fn for_language(&self, language: &str, creditor: &str) -> BTreeMap<String, String> {
        let texts = self
            .0
            .get(language)
            .or_else(|| self.0.get("en"))
            .cloned()
            .unwrap_or_default();
        texts
            .into_iter()
            .map(|(k, v)| (k, v.replace("{creditor}", creditor)))
            .collect()
    }

    fn language_name(&self, language: &str) -> String {
        self.0
            .get(language)
            .and_then(|t| t.get("language_name"))
            .cloned()
            .unwrap_or_else(|| language.to_owned())
    }
}

/// The language the page is shown in: the one asked for if the page speaks it, else the first
/// invoice's, else English.
pub fn language(asked: Option<&str>, views: &[InvoiceView]) -> &'static str {
    let known = |code: &str| {
        let code = match code
            .split(['-', '_'])
            .next()
            .unwrap_or("")
            .to_ascii_lowercase()
            .as_str()
        {
            "no" | "nn" => "nb".to_owned(),
            other => other.to_owned(),
        };
        LANGUAGES.into_iter().find(|l| *l == code)
    };
    asked
        .and_then(known)
        .or_else(|| {
            views
                .iter()
                .find_map(|v| v.snapshot.as_ref()?.language.as_deref())
                .and_then(known)
        })
        .unwrap_or("en")
}

/// The page's only script, progressive enhancement: the copy buttons (hidden without it) put a
/// reference or account on the clipboard. The page's policy allows exactly this script, by its
/// hash ([`copy_script_source`]).
pub const COPY_SCRIPT: &str = "document.querySelectorAll('button.copy').forEach(function(b){if(!navigator.clipboard){return;}b.hidden=false;b.addEventListener('click',function(){navigator.clipboard.writeText(b.dataset.copy).then(function(){b.textContent=b.dataset.done;});});});";

/// The `script-src` source that allows [`COPY_SCRIPT`] and nothing else.
pub fn copy_script_source() -> String {
    use base64::Engine;
    use sha2::Digest;
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(COPY_SCRIPT.as_bytes()))
    )
}

/// The page, ready to render.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Page {
    pub lang: String,
    pub t: BTreeMap<String, String>,
    pub creditor: String,
    pub contact: Option<String>,
    pub invoices: Vec<Line>,
    /// What is left to pay on the invoices that can be paid here, when any.
    pub total: Option<String>,
    pub bank_account: Option<String>,
    pub history: Vec<String>,
    pub languages: Vec<LanguageLink>,
    /// Where the forms post to, relative to the page (`<token>/requests`).
    pub action: String,
    /// Where the pay-now forms post to (`<token>/checkout`).
    pub pay_action: String,
    /// One payment for all the link's open invoices, when there are several.
    pub pay_all: Option<PayAll>,
    /// A request was just received (shown once, after the form's redirect).
    pub received: bool,
    /// Today in the debtor's calendar (the earliest day a promise may name).
    pub today: String,
    /// [`COPY_SCRIPT`].
    pub copy_script: &'static str,
    /// On an expired link's page: the form that asks for a fresh link.
    pub fresh_link: Option<FreshLinkForm>,
}

/// What the expired page's "send me a new link" form posts, besides its kind.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FreshLinkForm {
    pub invoice_id: String,
    pub form_token: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Line {
    pub invoice_id: String,
    pub number: String,
    pub description: Option<String>,
    pub amount: String,
    pub due: String,
    pub fees: Option<String>,
    pub paid: Option<String>,
    pub left: String,
    /// Why it cannot be paid here (paid, credited, with the agency...); `None` when it can.
    pub status: Option<String>,
    pub reference: Option<String>,
    /// What the debtor's bank calls the reference in the invoice's country.
    pub reference_label: String,
    /// What the debtor's bank reads in the invoice's country (label, value): the account,
    /// the Finnish bank barcode, the Danish payment line...
    pub codes: Vec<Code>,
    /// The EPC QR code (inline SVG, drawn here) for a euro transfer.
    pub qr: Option<String>,
    /// The anti-forgery token of this invoice's request forms; `None` when no request can be
    /// made here (nothing to pay, or a request already pauses the journey).
    pub form_token: Option<String>,
    /// The pay-now buttons (one per provider that pays the invoice's currency), and the
    /// anti-forgery token of their form; empty when it cannot be paid here.
    pub pay: Vec<PayButton>,
    pub pay_token: Option<String>,
    /// The days the due date may move to (`YYYY-MM-DD`), when it may move.
    pub postpone: Option<(String, String)>,
    /// The numbers of instalments offered (none when no plan can be made here).
    pub instalment_counts: Vec<usize>,
    /// The plan the debtor asked to see, to agree to.
    pub plan: Option<PlanPreview>,
    /// What happens next if it stays unpaid, and when ("a reminder on 14 March").
    pub next: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PlanPreview {
    pub count: usize,
    /// (date, amount), in the debtor's locale.
    pub rows: Vec<(String, String)>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PayButton {
    pub provider: String,
    pub label: String,
}

/// Paying every open invoice of the link in one payment.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PayAll {
    pub invoice: String,
    pub form_token: String,
    pub buttons: Vec<PayButton>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Code {
    pub label: String,
    pub value: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LanguageLink {
    pub code: String,
    pub name: String,
    pub current: bool,
}

/// How the banks of a country name a payment's structured reference.
fn reference_label(jurisdiction: &str, t: &BTreeMap<String, String>) -> String {
    match jurisdiction {
        "NO" => "KID".to_owned(),
        "SE" => "OCR".to_owned(),
        "DK" => "FIK / betalings-ID".to_owned(),
        "FI" => "Viitenumero / referens".to_owned(),
        _ => t.get("reference").cloned().unwrap_or_else(|| "Reference".to_owned()),
    }
}

/// What the journey does next if the invoice stays unpaid, on which day of the debtor's
/// calendar, in the debtor's words; `None` when nothing is planned or the step is unknown.
fn next_step(view: &InvoiceView, jurisdiction: &str, t: &BTreeMap<String, String>, locale: Locale) -> Option<String> {
    let next = view.journey.as_ref()?.next.as_ref()?;
    let at = DateTime::<Utc>::from_timestamp_millis(next.at_ms)?;
    let day = match jurisdiction.parse::<forfall_domain::jurisdiction::Jurisdiction>() {
        Ok(j) => j.local_day(at),
        Err(_) => at.date_naive(),
    };
    let words = t.get(&format!("next_{}", next.kind))?;
    Some(words.replace("{date}", &format_date(day, locale)))
}

fn at_date(at_ms: i64) -> Option<chrono::NaiveDate> {
    DateTime::<Utc>::from_timestamp_millis(at_ms).map(|d| d.date_naive())
}

/// What kind of message a plan step sends, as far as its name tells (plans name steps freely;
/// the defaults and the examples use these words).
fn message_text<'t>(step: &str, t: &'t BTreeMap<String, String>) -> &'t str {
    let step = step.to_ascii_lowercase();
    let key = if step == "fresh_link" {
        "sent_fresh_link"
    } else if step.contains("warning") || step.contains("varsel") || step.contains("inkasso") {
        "sent_warning"
    } else if step.contains("remind") || step.contains("paamin") || step.contains("purring") {
        "sent_reminder"
    } else if step.contains("nudge") {
        "sent_nudge"
    } else {
        "sent_other"
    };
    t.get(key).map(String::as_str).unwrap_or(key)
}

/// What banks and apps in the invoice's country read to pay `left` with the invoice's
/// reference; a code the creditor's settings or the reference cannot make is left out.
fn payment_codes(
    s: &crate::view::Snapshot,
    left: i64,
    currency: Currency,
    creditor: &Creditor,
    creditor_name: &str,
    t: &BTreeMap<String, String>,
) -> (Vec<Code>, Option<String>) {
    use forfall_domain::bank_codes;
    use forfall_domain::reference::{ReferenceKind, validate};
    let text = |key: &str| t.get(key).cloned().unwrap_or_else(|| key.to_owned());
    let mut codes = Vec::new();
    let mut qr = None;
    let amount = Money::new(left, currency);
    let reference = |kinds: &[ReferenceKind]| {
        s.reference
            .as_deref()
            .and_then(|r| kinds.iter().find_map(|k| validate(*k, r).ok()))
    };
    match s.jurisdiction.as_str() {
        "FI" => {
            if let (Some(iban), Some(r)) = (&creditor.iban, reference(&[ReferenceKind::Finnish, ReferenceKind::Rf])) {
                let due = date_from_epoch_days(s.due_date);
                if let Ok(code) = bank_codes::finnish_virtual_barcode(iban, amount, &r, due) {
                    codes.push(Code {
                        label: text("barcode"),
                        value: code,
                    });
                }
                let transfer = bank_codes::SepaTransfer {
                    beneficiary: creditor_name,
                    iban,
                    bic: creditor.bic.as_deref(),
                    amount,
                    reference: Some(&r),
                    text: None,
                };
                qr = bank_codes::epc_qr_payload(&transfer)
                    .ok()
                    .and_then(|payload| qr_svg(&payload, &text("scan")));
            }
        }
        "DK" => {
            if let (Some(number), Some(r)) = (&creditor.fik_creditor, reference(&[ReferenceKind::Fik71]))
                && let Ok(line) = bank_codes::fik71_line(&r, number)
            {
                codes.push(Code {
                    label: text("fik_line"),
                    value: line,
                });
            }
        }
        "SE" => {
            if let Some(bankgiro) = &creditor.bankgiro {
                codes.push(Code {
                    label: "Bankgiro".to_owned(),
                    value: bankgiro.clone(),
                });
            }
        }
        // Norway: KID and the account, which the transfer section already shows.
        _ => {}
    }
    (codes, qr)
}

/// Text made safe inside HTML, in element content and in double-quoted attributes alike.
pub fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;").replace('"', "&quot;").replace('<', "&lt;")
}

/// A QR code as inline SVG: one path of horizontal runs (a few kilobytes), with a quiet zone
/// of four modules, labelled for screen readers.
pub fn qr_svg(payload: &str, label: &str) -> Option<String> {
    let code = qrcode::QrCode::with_error_correction_level(payload.as_bytes(), qrcode::EcLevel::M).ok()?;
    let width = code.width();
    let colors = code.to_colors();
    let mut path = String::new();
    for y in 0..width {
        let mut x = 0;
        while x < width {
            if colors[y * width + x] == qrcode::Color::Dark {
                let start = x;
                while x < width && colors[y * width + x] == qrcode::Color::Dark {
                    x += 1;
                }
                path.push_str(&format!("M{} {}h{}v1h-{}z", start + 4, y + 4, x - start, x - start));
            } else {
                x += 1;
            }
        }
    }
    let size = width + 8;
    let label = escape_html(label);
    Some(format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {size} {size}\" width=\"220\" height=\"220\" role=\"img\" aria-label=\"{label}\" shape-rendering=\"crispEdges\"><rect width=\"{size}\" height=\"{size}\" fill=\"#fff\"/><path d=\"{path}\" fill=\"#000\"/></svg>"
    ))
}

/// What is left to pay on an invoice (fees included, payments taken off), and the text key of
/// why it cannot be paid here (paid, credited, with the agency...), `None` when it can.
pub fn standing(view: &InvoiceView, s: &Snapshot) -> (i64, Option<&'static str>) {
    let left = view
        .journey
        .as_ref()
        .map_or((s.open_minor - view.paid_minor()).max(0), |j| {
            j.outstanding_minor.max(0)
        });
    let why_not = match view.journey.as_ref().map(|j| j.state.as_str()).unwrap_or("open") {
        "closed:paid" => Some("status_paid"),
        "closed:credited" => Some("status_credited"),
        "closed:cancelled" => Some("status_cancelled"),
        "handed_over" => Some("status_handed_over"),
        _ if left == 0 => Some("nothing_to_pay"),
        _ => None,
    };
    (left, why_not)
}

/// The pay-now buttons for an invoice: one per provider of the creditor that pays `currency`.
fn pay_buttons(
    payable: bool,
    currency: Currency,
    jurisdiction: &str,
    forms: &Forms<'_>,
    t: &BTreeMap<String, String>,
) -> Vec<PayButton> {
    if !payable {
        return Vec::new();
    }
    forms
        .providers
        .iter()
        .filter(|p| p.pays(currency))
        .map(|p| PayButton {
            provider: p.code().to_owned(),
            label: p.label(jurisdiction, t),
        })
        .collect()
}

/// What the page's request forms need from the link: where they post, each invoice's
/// anti-forgery token, and today's date in the debtor's calendar.
pub struct Forms<'a> {
    pub action: String,
    pub token_for: &'a dyn Fn(&str) -> String,
    pub today: chrono::NaiveDate,
    pub received: bool,
    /// The payment providers of the link's creditor.
    pub providers: Vec<Provider>,
    /// The policy's limits on what may be asked for.
    pub pauses: PauseLimits,
    /// The instalment plan the debtor asked to see: (invoice, number of instalments).
    pub plan_asked: Option<(String, usize)>,
}

impl Forms<'_> {
    /// No forms (an expired link's page).
    pub fn none() -> Forms<'static> {
        Forms {
            action: String::new(),
            token_for: &|_| String::new(),
            today: chrono::NaiveDate::MIN,
            received: false,
            providers: Vec::new(),
            pauses: PauseLimits::default(),
            plan_asked: None,
        }
    }
}

/// The page for a link's invoices. `views` are the claimed invoices' views, in the claims'
/// order; an invoice of another debtor than the link's, or one the read model does not know,
/// is shown as not available.
pub fn build(
    debtor_id: &str,
    views: &[InvoiceView],
    creditor: &Creditor,
    tenant: &str,
    language: &str,
    texts: &Texts,
    forms: &Forms<'_>,
) -> Page {
    let creditor_name = creditor.name.clone().unwrap_or_else(|| tenant.to_owned());
    let t = texts.for_language(language, &creditor_name);
    let locale = Locale::from_language(language);
    let text = |key: &str| t.get(key).cloned().unwrap_or_else(|| key.to_owned());
    let mut lines = Vec::new();
    let mut history: Vec<(i64, String)> = Vec::new();
    let mut total: Option<(Currency, i64)> = None;
    let mut mixed_currencies = false;
    // A SEPA transfer (euro invoices) goes to the IBAN when the creditor gives one.
    let mut sepa = false;
    // The currency and country of each invoice that can be paid now.
    let mut payable: Vec<(Currency, String)> = Vec::new();
    for view in views {
        let Some(s) = view.snapshot.as_ref().filter(|s| s.debtor_id == debtor_id) else {
            continue;
        };
        let Ok(currency) = s.currency.parse::<Currency>() else {
            continue;
        };
        let money = |minor: i64| format(Money::new(minor, currency), locale);
        let day = |days: i32| {
            date_from_epoch_days(days)
                .map(|d| format_date(d, locale))
                .unwrap_or_default()
        };
        let paid = view.paid_minor();
        let (left, why_not) = standing(view, s);
        let fees = (left + paid - s.open_minor).max(0);
        let state = view.journey.as_ref().map(|j| j.state.as_str()).unwrap_or("open");
        let status = why_not.map(text);
        if status.is_none() {
            sepa |= currency == Currency::EUR;
            match total {
                None => total = Some((currency, left)),
                Some((c, sum)) if c == currency => total = Some((c, sum + left)),
                Some(_) => mixed_currencies = true,
            }
        }
        let (codes, qr) = if status.is_none() {
            payment_codes(s, left, currency, creditor, &creditor_name, &t)
        } else {
            (Vec::new(), None)
        };
        let form_token = (status.is_none() && !state.starts_with("paused:") && !forms.action.is_empty())
            .then(|| (forms.token_for)(&view.invoice_id));
        let pay = pay_buttons(
            status.is_none() && !forms.action.is_empty(),
            currency,
            &s.jurisdiction,
            forms,
            &t,
        );
        if !pay.is_empty() {
            payable.push((currency, s.jurisdiction.clone()));
        }
        let pay_token = (!pay.is_empty()).then(|| (forms.token_for)(&view.invoice_id));
        let (postpone, instalment_counts, plan) = match (&form_token, date_from_epoch_days(s.due_date)) {
            (Some(_), Some(original)) => {
                let owed = Money::new(left, currency);
                let moved: Vec<&crate::view::Happened> =
                    view.happened.iter().filter(|h| h.kind == "postponed").collect();
                // The watcher says where it moved the due date: "... to YYYY-MM-DD".
                let current = moved
                    .last()
                    .and_then(|h| {
                        h.reason
                            .as_deref()?
                            .rsplit(' ')
                            .next()?
                            .parse::<chrono::NaiveDate>()
                            .ok()
                    })
                    .unwrap_or(original);
                let postpone = postpone_window(original, current, moved.len() as u32, forms.today, &forms.pauses)
                    .map(|(a, b)| (a.format("%Y-%m-%d").to_string(), b.format("%Y-%m-%d").to_string()));
                let counts = instalment_counts(owed, forms.today, &forms.pauses);
                let plan = forms
                    .plan_asked
                    .as_ref()
                    .filter(|(invoice, n)| *invoice == view.invoice_id && counts.contains(n))
                    .and_then(|(_, n)| {
                        let rows = instalment_plan(owed, forms.today, *n, &forms.pauses)?;
                        Some(PlanPreview {
                            count: *n,
                            rows: rows
                                .into_iter()
                                .map(|(d, m)| (format_date(d, locale), format(m, locale)))
                                .collect(),
                        })
                    });
                (postpone, counts, plan)
            }
            _ => (None, Vec::new(), None),
        };
        let next = status
            .is_none()
            .then(|| next_step(view, &s.jurisdiction, &t, locale))
            .flatten();
        lines.push(Line {
            next,
            invoice_id: view.invoice_id.clone(),
            form_token,
            pay,
            pay_token,
            postpone,
            instalment_counts,
            plan,
            codes,
            qr,
            number: s.number.clone(),
            description: s.description.clone(),
            amount: money(s.open_minor),
            due: day(s.due_date),
            fees: (fees > 0).then(|| money(fees)),
            paid: (paid > 0).then(|| money(paid)),
            left: money(left),
            reference: s.reference.clone().filter(|_| status.is_none()),
            reference_label: reference_label(&s.jurisdiction, &t),
            status,
        });
        // Each message once, however many outcomes it had: sent, then delivered.
        let mut told = std::collections::BTreeSet::new();
        for m in &view.messages {
            if !matches!(m.status.as_str(), "sent" | "delivered") || !told.insert((m.step.clone(), m.channel.clone())) {
                continue;
            }
            let channel = match m.channel.as_str() {
                "email" => text("by_email"),
                "sms" => text("by_sms"),
                _ => text("by_webhook"),
            };
            if let Some(d) = at_date(m.at_ms) {
                history.push((
                    m.at_ms,
                    format!("{} {} {channel}", message_text(&m.step, &t), format_date(d, locale)),
                ));
            }
        }
        for p in &view.payments {
            let when = date_from_epoch_days(p.value_date).or_else(|| at_date(p.at_ms));
            if let (Ok(c), Some(d)) = (p.currency.parse::<Currency>(), when) {
                history.push((
                    p.at_ms,
                    format!(
                        "{}: {} ({})",
                        text("payment_received"),
                        format(Money::new(p.amount_minor, c), locale),
                        format_date(d, locale)
                    ),
                ));
            }
        }
        for h in &view.happened {
            let Some(d) = at_date(h.at_ms) else { continue };
            let told = match h.kind.as_str() {
                "handed_over" => text("handed_over"),
                "claims_paid" => text("req_claims_paid"),
                "disputed" => text("req_disputed"),
                "promised_to_pay" => text("req_promised"),
                "postponed" | "instalment_plan_agreed" | "dispute_resolved" => text("req_changed"),
                // Why, in the debtor's words, from the refusal's code; the watcher's English
                // reason is for staff (the timeline).
                "request_refused" => match h.rule.as_deref().and_then(|code| t.get(&format!("refused_{code}"))) {
                    Some(why) => format!("{}: {why}", text("req_refused")),
                    None => text("req_refused"),
                },
                _ => continue,
            };
            history.push((h.at_ms, format!("{told} ({})", format_date(d, locale))));
        }
    }
    history.sort_by_key(|(at, _)| *at);
    let pay_all = match payable.as_slice() {
        [(currency, jurisdiction), rest @ ..] if !rest.is_empty() && rest.iter().all(|(c, _)| c == currency) => {
            // The same providers, their buttons saying "everything".
            let mut all_texts = t.clone();
            for (key, all_key) in [("pay_with", "pay_all_with"), ("pay_card", "pay_all_card")] {
                all_texts.insert(key.to_owned(), text(all_key));
            }
            let buttons = forms
                .providers
                .iter()
                .filter(|p| p.pays(*currency))
                .map(|p| PayButton {
                    provider: p.code().to_owned(),
                    label: p.label(jurisdiction, &all_texts),
                })
                .collect();
            Some(PayAll {
                invoice: ALL_INVOICES.to_owned(),
                form_token: (forms.token_for)(ALL_INVOICES),
                buttons,
            })
        }
        _ => None,
    };
    Page {
        copy_script: COPY_SCRIPT,
        fresh_link: None,
        pay_action: forms.action.replace("/requests", "/checkout"),
        pay_all,
        lang: language.to_owned(),
        creditor: creditor_name,
        contact: creditor.contact.clone(),
        invoices: lines,
        total: if mixed_currencies {
            None
        } else {
            total
                .filter(|(_, sum)| *sum > 0)
                .map(|(c, sum)| format(Money::new(sum, c), locale))
        },
        bank_account: match (&creditor.iban, sepa) {
            (Some(iban), true) => Some(iban.clone()),
            _ => creditor.bank_account.clone(),
        },
        history: history.into_iter().map(|(_, line)| line).collect(),
        action: forms.action.clone(),
        received: forms.received,
        today: forms.today.format("%Y-%m-%d").to_string(),
        languages: LANGUAGES
            .iter()
            .map(|code| LanguageLink {
                code: (*code).to_owned(),
                name: texts.language_name(code),
                current: *code == language,
            })
            .collect(),
        t,
    }
}

/// The page for a genuine link that expired: nothing of the invoices, and a form that asks
/// for a fresh link to the contact on file (posting to `action`), or, once asked, that it is
/// on its way.
pub fn expired(
    creditor: &Creditor,
    tenant: &str,
    language: &str,
    texts: &Texts,
    action: String,
    fresh_link: Option<FreshLinkForm>,
    received: bool,
) -> Page {
    let mut page = build("", &[], creditor, tenant, language, texts, &Forms::none());
    page.action = action;
    page.fresh_link = fresh_link;
    page.received = received;
    page
}

#[derive(Debug, thiserror::Error)]
#[error("the page cannot be rendered: {0}")]
pub struct RenderError(#[from] minijinja::Error);

/// The page's templates, compiled once.
pub struct Renderer {
    env: minijinja::Environment<'static>,
}

impl Renderer {
    pub fn new() -> Result<Self, RenderError> {
        let mut env = minijinja::Environment::new();
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::Html);
        env.add_template("style.html", include_str!("../templates/style.html"))?;
        env.add_template("base.html", include_str!("../templates/base.html"))?;
        env.add_template("page.html", include_str!("../templates/page.html"))?;
        env.add_template("expired.html", include_str!("../templates/expired.html"))?;
        Ok(Self { env })
    }

    pub fn page(&self, page: &Page) -> Result<String, RenderError> {
        Ok(self.env.get_template("page.html")?.render(page)?)
    }

    pub fn expired(&self, page: &Page) -> Result<String, RenderError> {
        Ok(self.env.get_template("expired.html")?.render(page)?)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_creditor_with_a_mistyped_account_is_refused_naming_it() {
        assert!(creditor().check().is_ok());
        let with = |f: &dyn Fn(&mut Creditor)| {
            let mut c = creditor();
            f(&mut c);
            c.check().map_err(|e| e.to_string())
        };
        let bad_bankgiro = with(&|c| c.bankgiro = Some("5050-1056".into())).unwrap_err();
        assert!(
            bad_bankgiro.contains("'5050-1056' is not a bankgiro number"),
            "{bad_bankgiro}"
        );
        let bad_account = with(&|c| c.bank_account = Some("1234.56.78904".into())).unwrap_err();
        assert!(bad_account.contains("Norwegian account number"), "{bad_account}");
        assert!(with(&|c| c.iban = Some("FI37 1590 3000 0007 77".into())).is_err());
        // Free-text details of other countries are left as they are written.
        assert!(with(&|c| c.bank_account = Some("Reg. 1234 konto 0001234567".into())).is_ok());
    }

    use super::*;
    use crate::view::{JourneyNow, Message, Paid, Snapshot, Upcoming};

    fn snapshot(number: &str, debtor: &str, open_minor: i64) -> Snapshot {
        Snapshot {
            revision: 1,
            debtor_id: debtor.into(),
            number: number.into(),
            description: Some("Strøm mars".into()),
            issue_date: 20_500,
            due_date: 20_514,
            amount_minor: open_minor,
            credited_minor: 0,
            open_minor,
            currency: "NOK".into(),
            jurisdiction: "NO".into(),
            status: "open".into(),
            reference: Some("70001234".into()),
            language: Some("nb".into()),
        }
    }

    fn creditor() -> Creditor {
        Creditor {
            name: Some("Nordkraft AS".into()),
            contact: Some("kundeservice@nordkraft.example".into()),
            bank_account: Some("1234.56.78903".into()),
            ..Creditor::default()
        }
    }

    fn texts() -> Texts {
        Texts::built_in().expect("the built-in texts are complete")
    }

    #[test]
    fn every_language_has_every_text() {
        let all = texts();
        for language in LANGUAGES {
            let t = all.for_language(language, "X");
            assert_eq!(t.len(), all.for_language("en", "X").len(), "{language}");
        }
        // Every reason the watcher can refuse a request for is worded for the debtor.
        for code in forfall_domain::journey::RefusalCode::ALL {
            for language in LANGUAGES {
                let key = format!("refused_{}", code.as_str());
                assert!(all.for_language(language, "X").contains_key(&key), "{language}: {key}");
            }
        }
        let missing = Texts::parse("[en]\na = \"1\"\n[da]\n[nb]\na=\"\"\n[sv]\na=\"\"\n[fi]\na=\"\"\n").unwrap_err();
        assert_eq!(
            missing.to_string(),
            "the page's texts in 'da' lack 'a' (English has it)"
        );
    }

    #[test]
    fn an_open_invoice_shows_fees_payments_and_what_is_left_in_the_debtors_locale() {
        let view = InvoiceView {
            snapshot: Some(snapshot("7000123", "d1", 125_000)),
            journey: Some(JourneyNow {
                state: "reminded:1".into(),
                outstanding_minor: 125_000 - 40_000 + 3_500,
                at_ms: 1_773_000_000_000,
                // 2026-03-18 23:30 UTC is already the 19th in Oslo.
                next: Some(Upcoming {
                    kind: "collection_warning".into(),
                    step: "inkassovarsel".into(),
                    at_ms: 1_773_876_600_000,
                }),
            }),
            invoice_id: "i1".into(),
            happened: vec![],
            messages: vec![
                Message {
                    step: "reminder-1".into(),
                    channel: "email".into(),
                    status: "sent".into(),
                    at_ms: 1_772_600_000_000,
                    reason: None,
                },
                Message {
                    step: "reminder-1".into(),
                    channel: "email".into(),
                    status: "delivered".into(),
                    at_ms: 1_772_600_100_000,
                    reason: None,
                },
            ],
            payments: vec![Paid {
                amount_minor: 40_000,
                currency: "NOK".into(),
                at_ms: 1_772_700_000_000,
                value_date: 20_520,
                payment_id: None,
                rule: None,
            }],
            requests: vec![],
        };
        let page = build("d1", &[view], &creditor(), "nordkraft", "nb", &texts(), &Forms::none());
        let line = &page.invoices[0];
        assert_eq!(line.amount, "kr\u{a0}1\u{a0}250,00");
        assert_eq!(line.fees.as_deref(), Some("kr\u{a0}35,00"));
        assert_eq!(line.paid.as_deref(), Some("kr\u{a0}400,00"));
        assert_eq!(line.left, "kr\u{a0}885,00");
        assert_eq!(line.due, "02.03.2026");
        assert_eq!(
            line.next.as_deref(),
            Some("Er den fortsatt ubetalt, sender vi et inkassovarsel 19.03.2026."),
            "what happens next, on the debtor's calendar day"
        );
        let html = Renderer::new().unwrap().page(&page).unwrap();
        assert!(html.contains("sender vi et inkassovarsel 19.03.2026"));
        assert_eq!((line.reference_label.as_str(), line.status.as_ref()), ("KID", None));
        assert_eq!(page.total.as_deref(), Some("kr\u{a0}885,00"));
        assert_eq!(
            page.history,
            vec![
                "Betalingspåminnelse sendt 04.03.2026 på e-post".to_owned(),
                "Betaling mottatt: kr\u{a0}400,00 (08.03.2026)".to_owned()
            ]
        );
    }

    #[test]
    fn a_paid_invoice_shows_its_status_and_no_reference_to_pay_with() {
        let view = InvoiceView {
            snapshot: Some(snapshot("7000123", "d1", 125_000)),
            journey: Some(JourneyNow {
                state: "closed:paid".into(),
                outstanding_minor: 0,
                at_ms: 1,
                next: Some(Upcoming {
                    kind: "reminder".into(),
                    step: "reminder-1".into(),
                    at_ms: 2,
                }),
            }),
            ..InvoiceView::default()
        };
        let page = build("d1", &[view], &creditor(), "nordkraft", "en", &texts(), &Forms::none());
        assert_eq!(page.invoices[0].status.as_deref(), Some("Paid. Thank you!"));
        assert_eq!(page.invoices[0].reference, None);
        assert_eq!(page.invoices[0].next, None, "nothing comes next for a paid invoice");
        assert_eq!(page.total, None);
    }

    #[test]
    fn a_finnish_invoice_carries_the_bank_barcode_and_the_epc_qr_code_and_a_danish_one_the_fik_line() {
        let mut s = snapshot("2026-0042", "d1", 12_345);
        s.currency = "EUR".into();
        s.jurisdiction = "FI".into();
        s.reference = Some("11112".into());
        let finnish = Creditor {
            name: Some("Nordlys Energia Oy".into()),
            iban: Some("FI37 1590 3000 0007 76".into()),
            bic: Some("NDEAFIHH".into()),
            ..Creditor::default()
        };
        let view = InvoiceView {
            snapshot: Some(s.clone()),
            ..InvoiceView::default()
        };
        let page = build(
            "d1",
            std::slice::from_ref(&view),
            &finnish,
            "nordlys",
            "fi",
            &texts(),
            &Forms::none(),
        );
        let line = &page.invoices[0];
        assert_eq!(line.reference_label, "Viitenumero / referens");
        assert_eq!(
            line.codes[0].value, "437159030000007760001234500000000000000000011112260302",
            "the barcode pays what is left by the due date"
        );
        let qr = line.qr.as_deref().expect("an EPC QR code for a euro invoice");
        assert!(qr.starts_with("<svg") && qr.contains("aria-label=\"Skannaa pankkisovelluksellasi\""));
        let html = Renderer::new().unwrap().page(&page).unwrap();
        assert!(
            html.len() < 16 * 1024,
            "within the page budget with a QR code: {} bytes",
            html.len()
        );

        s.currency = "DKK".into();
        s.jurisdiction = "DK".into();
        let fik =
            forfall_domain::reference::generate(forfall_domain::reference::ReferenceKind::Fik71, "12345678901234")
                .unwrap();
        s.reference = Some(fik.value.clone());
        let danish = Creditor {
            fik_creditor: Some("85386489".into()),
            ..Creditor::default()
        };
        let view = InvoiceView {
            snapshot: Some(s),
            ..InvoiceView::default()
        };
        let page = build("d1", &[view], &danish, "acme", "da", &texts(), &Forms::none());
        assert_eq!(page.invoices[0].codes[0].label, "Betalingslinje (FIK)");
        assert_eq!(page.invoices[0].codes[0].value, format!("+71<{}+85386489<", fik.value));
        assert_eq!(page.invoices[0].qr, None, "no EPC code for kroner");
    }

    #[test]
    fn another_debtors_invoice_is_not_shown() {
        let view = InvoiceView {
            snapshot: Some(snapshot("7000123", "someone-else", 125_000)),
            ..InvoiceView::default()
        };
        let page = build("d1", &[view], &creditor(), "nordkraft", "en", &texts(), &Forms::none());
        assert!(page.invoices.is_empty());
    }

    #[test]
    fn the_language_asked_for_wins_then_the_invoices_then_english() {
        let nb = InvoiceView {
            snapshot: Some(snapshot("1", "d1", 1)),
            ..InvoiceView::default()
        };
        assert_eq!(language(Some("sv"), std::slice::from_ref(&nb)), "sv");
        assert_eq!(language(Some("xx"), std::slice::from_ref(&nb)), "nb");
        assert_eq!(language(Some("no"), &[]), "nb");
        assert_eq!(language(None, &[]), "en");
    }

    #[test]
    fn the_page_renders_in_every_language_and_escapes_what_billing_wrote() {
        let renderer = Renderer::new().unwrap();
        let mut s = snapshot("7000123", "d1", 125_000);
        s.description = Some("<script>alert(1)</script>".into());
        let view = InvoiceView {
            snapshot: Some(s),
            ..InvoiceView::default()
        };
        for language in LANGUAGES {
            let page = build(
                "d1",
                std::slice::from_ref(&view),
                &creditor(),
                "nordkraft",
                language,
                &texts(),
                &Forms::none(),
            );
            let html = renderer.page(&page).unwrap();
            assert!(html.starts_with("<!doctype html>"), "{language}");
            assert!(html.contains(&format!("<html lang=\"{language}\">")), "{language}");
            assert!(html.contains("7000123") && html.contains("70001234"), "{language}");
            assert!(!html.contains("<script>alert"), "{language}: billing's text is escaped");
        }
    }
}
