//! From a journey action to what its templates see: amounts and dates in the debtor's locale,
//! every invoice the action covers, and a signed pay link scoped to the debtor and exactly
//! those invoices.

use chrono::{DateTime, Utc};
use forfall_domain::invoice::date_from_epoch_days;
use forfall_domain::locale::format_date;
use forfall_domain::money::format;
use forfall_domain::{Currency, Locale, Money};
use forfall_platform::journey_state;
use forfall_platform::records::{CoveredInvoice, JourneyAction};

use crate::TenantProfile;
use crate::content::{Content, InvoiceLine, MessageContext};
use forfall_platform::pay_links::PayLinkKeys;

/// The action as it may still go out, given the journey status of each of its invoices (main
/// first, then its covers in order): covered invoices settled since are left out, and when the
/// main invoice is settled the first open covered one takes its place. `None` when none is open.
pub fn still_open(action: &JourneyAction, statuses: &[Option<String>]) -> Option<JourneyAction> {
    let open = |i: usize| journey_state::status_accepts_contact(statuses.get(i).and_then(|s| s.as_deref()));
    let mut covers: Vec<CoveredInvoice> = action
        .covers
        .iter()
        .enumerate()
        .filter(|(i, _)| open(i + 1))
        .map(|(_, c)| c.clone())
        .collect();
    let mut current = action.clone();
    if !open(0) {
        if covers.is_empty() {
            return None;
        }
        let first = covers.remove(0);
        current.invoice_id = first.invoice_id;
        current.invoice_number = first.invoice_number;
        current.description = first.description;
        current.open_minor = first.open_minor;
        current.fee_minor = first.fee_minor;
        current.interest_minor = first.interest_minor;
        current.compensation_minor = first.compensation_minor;
        current.due_date = first.due_date;
        current.payment_reference = first.payment_reference;
    }
    current.covers = covers;
    Some(current)
}

/// The signed link to the self-service page for the debtor and the action's invoices.
pub fn pay_link(action: &JourneyAction, keys: &PayLinkKeys, now: DateTime<Utc>) -> String {
    let mut invoices = vec![action.invoice_id.clone()];
    invoices.extend(action.covers.iter().map(|c| c.invoice_id.clone()));
    keys.link(&action.tenant, &action.debtor_id, invoices, now)
}

pub fn context(
    action: &JourneyAction,
    profile: &TenantProfile,
    link: &PayLinkKeys,
    now: DateTime<Utc>,
) -> MessageContext {
    let language = action.language.clone().unwrap_or_else(|| "en".to_owned());
    let locale = Locale::from_language(&language);
    let currency = action.currency.parse::<Currency>().ok();
    let money = |minor: i64| match currency {
        Some(c) => format(Money::new(minor, c), locale),
        None => format!("{minor} {}", action.currency),
    };
    let date = |days: i32| {
        date_from_epoch_days(days)
            .map(|d| format_date(d, locale))
            .unwrap_or_default()
    };
    // Each line shows what the invoice itself owes; this step's fees are shown once, apart.
    let mut invoices = vec![InvoiceLine {
        number: action.invoice_number.clone(),
        description: action.description.clone(),
        amount: money(action.open_minor - action.fee_minor),
        due_date: date(action.due_date),
        reference: action.payment_reference.clone(),
    }];
    let mut total = action.open_minor;
    let mut fee = action.fee_minor;
    let mut interest = action.interest_minor;
    let mut compensation = action.compensation_minor;
    let mut earliest_due = action.due_date;
    for c in &action.covers {
        invoices.push(InvoiceLine {
            number: c.invoice_number.clone(),
            description: c.description.clone(),
            amount: money(c.open_minor - c.fee_minor),
            due_date: date(c.due_date),
            reference: c.payment_reference.clone(),
        });
        total += c.open_minor;
        fee += c.fee_minor;
        interest += c.interest_minor;
        compensation += c.compensation_minor;
        earliest_due = earliest_due.min(c.due_date);
    }
    MessageContext {
        language,
        tone: action.tone.clone(),
        creditor: profile.name.clone().unwrap_or_else(|| action.tenant.clone()),
        debtor_name: action.debtor_name.clone(),
        due_date: date(earliest_due),
        fee: (fee > 0).then(|| money(fee)),
        total: money(total),
        interest: (interest > 0).then(|| money(interest)),
        interest_rate: action.interest_rate_bp.map(|bp| percent(bp, locale)),
        // A friendly nudge on the due date does not threaten what collection would cost.
        compensation: (compensation > 0 && action.tone != "nudge").then(|| money(compensation)),
        pay_by: action.pay_by.map(date),
        pay_link: pay_link(action, link, now),
        bank_account: profile.bank_account.clone(),
        reference: if action.covers.is_empty() {
            action.payment_reference.clone()
        } else {
            None
        },
        contact: profile.contact.clone(),
        invoices,
    }
}

/// A yearly rate in basis points as the debtor's locale writes a percentage: `10,5 %`.
fn percent(bp: i32, locale: Locale) -> String {
    let whole = bp / 100;
    let hundredths = (bp % 100).abs();
    let separator = if locale == Locale::En { "." } else { "," };
    let fraction = match hundredths {
        0 => String::new(),
        h if h % 10 == 0 => format!("{separator}{}", h / 10),
        h => format!("{separator}{h:02}"),
    };
    format!("{whole}{fraction} %")
}

/// What the tenant's webhook receives: the rendered message and the facts behind it.
pub fn webhook_body(action: &JourneyAction, ctx: &MessageContext, content: &Content) -> serde_json::Value {
    let mut invoice_ids = vec![action.invoice_id.clone()];
    invoice_ids.extend(action.covers.iter().map(|c| c.invoice_id.clone()));
    serde_json::json!({
        "action_id": action.action_id,
        "tenant": action.tenant,
        "debtor_id": action.debtor_id,
        "invoice_ids": invoice_ids,
        "step": action.step,
        "tone": action.tone,
        "language": ctx.language,
        "currency": action.currency,
        "open_minor": action.open_minor + action.covers.iter().map(|c| c.open_minor).sum::<i64>(),
        "fee_minor": action.fee_minor + action.covers.iter().map(|c| c.fee_minor).sum::<i64>(),
        "interest_minor": action.interest_minor + action.covers.iter().map(|c| c.interest_minor).sum::<i64>(),
        "interest_rate_bp": action.interest_rate_bp,
        "compensation_minor": action.compensation_minor + action.covers.iter().map(|c| c.compensation_minor).sum::<i64>(),
        "pay_by": action.pay_by.and_then(date_from_epoch_days).map(|d| d.to_string()),
        "pay_link": ctx.pay_link,
        "subject": content.subject,
        "text": content.text,
        "html": content.html,
        "sms": content.sms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cover(id: &str, open_minor: i64) -> CoveredInvoice {
        CoveredInvoice {
            invoice_id: id.into(),
            invoice_number: format!("N-{id}"),
            description: None,
            open_minor,
            fee_minor: 0,
            due_date: 20_000,
            payment_reference: Some(format!("ref-{id}")),
            interest_minor: 0,
            compensation_minor: 0,
        }
    }

    #[test]
    fn a_reminder_shows_the_interest_and_compensation_claimed_a_nudge_not_the_compensation() {
        let keys = PayLinkKeys::new(forfall_platform::pay_links::PayLinkSettings::default()).unwrap();
        let reminder = JourneyAction {
            tone: "reminder".into(),
            interest_minor: 1_234,
            interest_rate_bp: Some(1_050),
            compensation_minor: 31_000,
            covers: vec![CoveredInvoice {
                interest_minor: 100,
                compensation_minor: 31_000,
                ..cover("b", 200)
            }],
            ..forfall_e2e::nudge_action("acme", "a", "a@example.test")
        };
        let ctx = context(&reminder, &TenantProfile::default(), &keys, Utc::now());
        assert_eq!(
            ctx.interest.as_deref(),
            Some("13,34\u{a0}kr."),
            "both invoices' interest"
        );
        assert_eq!(ctx.interest_rate.as_deref(), Some("10,5 %"));
        assert_eq!(ctx.compensation.as_deref(), Some("620,00\u{a0}kr."));
        assert_eq!(
            ctx.total,
            context(
                &JourneyAction {
                    interest_minor: 0,
                    compensation_minor: 0,
                    ..reminder.clone()
                },
                &TenantProfile::default(),
                &keys,
                Utc::now()
            )
            .total,
            "neither is in the total"
        );
        let nudge = JourneyAction {
            tone: "nudge".into(),
            ..reminder
        };
        assert_eq!(
            context(&nudge, &TenantProfile::default(), &keys, Utc::now()).compensation,
            None
        );
        assert_eq!(percent(1_200, Locale::NbNo), "12 %");
        assert_eq!(percent(1_225, Locale::En), "12.25 %");
    }

    #[test]
    fn settled_invoices_leave_a_combined_message() {
        let action = JourneyAction {
            interest_minor: 0,
            interest_rate_bp: None,
            compensation_minor: 0,
            covers: vec![cover("b", 200), cover("c", 300)],
            ..forfall_e2e::nudge_action("acme", "a", "a@example.test")
        };
        let open = || Some("nudged".to_owned());
        let paid = || Some("closed:paid".to_owned());
        let ids = |a: &JourneyAction| {
            std::iter::once(a.invoice_id.clone())
                .chain(a.covers.iter().map(|c| c.invoice_id.clone()))
                .collect::<Vec<_>>()
        };
        let all = still_open(&action, &[open(), open(), open()]).unwrap();
        assert_eq!(ids(&all), ["a", "b", "c"]);
        let without_b = still_open(&action, &[open(), paid(), open()]).unwrap();
        assert_eq!(ids(&without_b), ["a", "c"]);
        let c_leads = still_open(&action, &[paid(), paid(), open()]).unwrap();
        assert_eq!(ids(&c_leads), ["c"]);
        assert_eq!(c_leads.invoice_number, "N-c");
        assert_eq!(c_leads.open_minor, 300);
        assert_eq!(c_leads.payment_reference.as_deref(), Some("ref-c"));
        assert_eq!(c_leads.action_id, action.action_id, "still the same message");
        assert_eq!(
            still_open(&action, &[paid(), paid(), None]),
            None,
            "unknown is not contacted"
        );
    }
}
