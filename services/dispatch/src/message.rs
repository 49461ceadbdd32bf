//! From a journey action to what its templates see: amounts and dates in the debtor's locale,
//! every invoice the action covers, and a signed pay link scoped to the debtor and exactly
//! those invoices.

use chrono::{DateTime, Utc};
use forfall_domain::invoice::date_from_epoch_days;
use forfall_domain::locale::format_date;
use forfall_domain::money::format;
use forfall_domain::paylink::{self, LinkClaims, LinkKey};
use forfall_domain::{Currency, Locale, Money};
use forfall_platform::records::JourneyAction;

use crate::content::{Content, InvoiceLine, MessageContext};
use crate::{PayLinkSettings, TenantProfile};

/// The signed link to the self-service page for the debtor and the action's invoices.
pub fn pay_link(action: &JourneyAction, settings: &PayLinkSettings, now: DateTime<Utc>) -> String {
    let mut invoices = vec![action.invoice_id.clone()];
    invoices.extend(action.covers.iter().map(|c| c.invoice_id.clone()));
    let claims = LinkClaims {
        tenant: action.tenant.clone(),
        debtor_id: action.debtor_id.clone(),
        invoices,
        expires_at: now.timestamp() + settings.ttl_days * 86_400,
    };
    let key = LinkKey {
        id: settings.key_id.clone(),
        secret: settings.secret.as_bytes().to_vec(),
    };
    format!("{}{}", settings.base_url, paylink::issue(&key, &claims))
}

pub fn context(
    action: &JourneyAction,
    profile: &TenantProfile,
    link: &PayLinkSettings,
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
        "pay_by": action.pay_by.and_then(date_from_epoch_days).map(|d| d.to_string()),
        "pay_link": ctx.pay_link,
        "subject": content.subject,
        "text": content.text,
        "html": content.html,
        "sms": content.sms,
    })
}
