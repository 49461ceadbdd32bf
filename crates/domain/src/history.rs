//! A debtor's own history with the creditor: one small record per invoice (when it was issued,
//! how large it was, how late it was paid, whether it was disputed, whether the debtor served
//! themselves on the page, which channels failed to reach them), kept up by the watcher once the
//! debtor did something with an invoice (paid it, left it to an agency, disputed it, used the
//! page, or a channel failed), and summed up into the facts a new invoice's propensity score
//! starts from.
//!
//! A record is derived from its journey and the record before it, so that writing it again
//! (a redelivered decision, a rebuild replaying the changelog) gives the same record.

use chrono::NaiveDate;

use crate::Money;
use crate::evidence::Delivery;
use crate::journey::{CloseReason, Journey, JourneyState};

/// What one invoice of a debtor came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvoiceRecord {
    pub issued: NaiveDate,
    /// The amount in euro cents, roughly (see [`euro_cents`]): a size, not a price.
    pub amount_eur_cents: u64,
    /// Days from the due date to the day it was paid in full (negative: before it), once paid.
    pub days_late: Option<i32>,
    pub disputed: bool,
    /// The debtor used the page: postponed, agreed instalments, promised, said they had paid,
    /// asked for a fresh link, or disputed.
    pub self_service: bool,
    /// The channels a message failed on or bounced from (see [`channel_bit`]).
    pub failed_channels: u8,
}

/// The bit of a channel in [`InvoiceRecord::failed_channels`].
pub fn channel_bit(channel: &str) -> u8 {
    match channel {
        "email" => 1,
        "sms" => 2,
        "letter" => 4,
        _ => 8,
    }
}

/// An amount in euro cents at fixed rates: the Nordic crowns rank with the euro, no more.
pub fn euro_cents(amount: Money) -> u64 {
    let per_unit = match amount.currency.code() {
        "EUR" => 1.0,
        "DKK" => 1.0 / 7.46,
        "NOK" => 1.0 / 11.5,
        "SEK" => 1.0 / 11.2,
        _ => 0.1,
    };
    (amount.minor.max(0) as f64 * per_unit).round() as u64
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    #[error("history record '{0}' is not in format 1 (issued;cents;days late or -;flags;channels)")]
    Malformed(String),
}

/// The format of [`InvoiceRecord::encode`]: a leading tag so that a later format can be told.
const FORMAT_V1: &str = "1";

impl InvoiceRecord {
    /// The record of `journey` once its latest decision is made on the debtor's local day
    /// `today`: what `before` said, with what the journey adds. The payment day is kept from
    /// the decision that paid it, later decisions leave it be.
    pub fn observe(before: Option<&InvoiceRecord>, journey: &Journey, today: NaiveDate) -> Self {
        let invoice = &journey.invoice;
        let paid = journey.state == JourneyState::Closed(CloseReason::Paid);
        let failed = journey
            .messages
            .iter()
            .filter(|m| matches!(m.delivery, Delivery::Failed | Delivery::Bounced))
            .fold(0u8, |bits, m| bits | channel_bit(&m.channel));
        let days_late = before
            .and_then(|b| b.days_late)
            .or_else(|| paid.then(|| (today - invoice.due_date).num_days() as i32));
        InvoiceRecord {
            issued: invoice.issue_date,
            amount_eur_cents: euro_cents(invoice.amount),
            days_late,
            disputed: before.is_some_and(|b| b.disputed) || !journey.disputes.is_empty(),
            self_service: before.is_some_and(|b| b.self_service)
                || journey.postponements > 0
                || !journey.applied_requests.is_empty()
                || !journey.disputes.is_empty(),
            failed_channels: before.map_or(0, |b| b.failed_channels) | failed,
        }
    }

    /// `1;<issued, days since 1970>;<euro cents>;<days late or ->;<d?s?>;<channel bits>`:
    /// short, since every invoice of every debtor keeps one.
    pub fn encode(&self) -> String {
        let days = (self.issued - epoch()).num_days();
        let late = self.days_late.map_or("-".to_owned(), |d| d.to_string());
        let flags = match (self.disputed, self.self_service) {
            (true, true) => "ds",
            (true, false) => "d",
            (false, true) => "s",
            (false, false) => "",
        };
        format!(
            "{FORMAT_V1};{days};{};{late};{flags};{}",
            self.amount_eur_cents, self.failed_channels
        )
    }

    pub fn decode(text: &str) -> Result<Self, HistoryError> {
        let malformed = || HistoryError::Malformed(text.chars().take(80).collect());
        let parts: Vec<&str> = text.split(';').collect();
        let [FORMAT_V1, days, cents, late, flags, channels] = parts.as_slice() else {
            return Err(malformed());
        };
        let days: i64 = days.parse().map_err(|_| malformed())?;
        let issued = epoch()
            .checked_add_signed(chrono::Duration::days(days))
            .ok_or_else(malformed)?;
        let days_late = match *late {
            "-" => None,
            d => Some(d.parse().map_err(|_| malformed())?),
        };
        if !flags.chars().all(|c| c == 'd' || c == 's') {
            return Err(malformed());
        }
        Ok(InvoiceRecord {
            issued,
            amount_eur_cents: cents.parse().map_err(|_| malformed())?,
            days_late,
            disputed: flags.contains('d'),
            self_service: flags.contains('s'),
            failed_channels: channels.parse().map_err(|_| malformed())?,
        })
    }
}

fn epoch() -> NaiveDate {
    NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default()
}

/// A debtor's history summed up for a new invoice.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct HistoryFacts {
    /// Invoices before this one.
    pub invoices: u32,
    /// Mean days paid after the due date over the invoices paid (early counts as 0).
    pub avg_days_late: f64,
    /// The mean size of the invoices before, in euros; `None` without any.
    pub usual_amount_eur: Option<f64>,
    /// Days since the first invoice was issued.
    pub tenure_days: u32,
    /// Channels that failed to reach the debtor at least once.
    pub failed_channels: u32,
    pub disputes: u32,
    pub self_service: u32,
}

impl HistoryFacts {
    /// The summary of `records` as of the debtor's local day `today`.
    pub fn of<'r>(records: impl IntoIterator<Item = &'r InvoiceRecord>, today: NaiveDate) -> Self {
        let mut facts = HistoryFacts::default();
        let mut paid = 0u32;
        let mut late_days = 0i64;
        let mut cents = 0u64;
        let mut first: Option<NaiveDate> = None;
        let mut channels = 0u8;
        for r in records {
            facts.invoices += 1;
            cents = cents.saturating_add(r.amount_eur_cents);
            first = Some(first.map_or(r.issued, |f| f.min(r.issued)));
            if let Some(d) = r.days_late {
                paid += 1;
                late_days += i64::from(d.max(0));
            }
            facts.disputes += u32::from(r.disputed);
            facts.self_service += u32::from(r.self_service);
            channels |= r.failed_channels;
        }
        if paid > 0 {
            facts.avg_days_late = late_days as f64 / f64::from(paid);
        }
        if facts.invoices > 0 {
            facts.usual_amount_eur = Some(cents as f64 / f64::from(facts.invoices) / 100.0);
        }
        facts.tenure_days = first.map_or(0, |f| (today - f).num_days().max(0) as u32);
        facts.failed_channels = channels.count_ones();
        facts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Currency;
    use crate::evidence::MessageEvidence;
    use crate::journey::DisputeRecord;
    use proptest::prelude::*;

    fn day(d: &str) -> NaiveDate {
        d.parse().unwrap()
    }

    fn journey(amount: i64, currency: Currency) -> Journey {
        let mut input = crate::invoice::tests::input();
        input.issue_date_days = crate::invoice::epoch_days(day("2026-10-01"));
        input.due_date_days = crate::invoice::epoch_days(day("2026-10-31"));
        input.amount_minor = amount;
        input.currency = currency.code().into();
        if currency != Currency::DKK {
            input.jurisdiction = "FI".into();
            input.payment_reference = None;
        }
        let invoice = crate::invoice::validate_issued(input).unwrap();
        crate::journey::on_invoice(None, invoice, &crate::journey::Plan::builtin()).journey
    }

    #[test]
    fn a_paid_invoice_keeps_the_day_it_was_paid() {
        let mut j = journey(74_600, Currency::DKK);
        let open = InvoiceRecord::observe(None, &j, day("2026-10-01"));
        assert_eq!(open.days_late, None);
        assert_eq!(open.amount_eur_cents, 10_000);
        j.state = JourneyState::Closed(CloseReason::Paid);
        let paid = InvoiceRecord::observe(Some(&open), &j, day("2026-11-04"));
        assert_eq!(paid.days_late, Some(4));
        // A later outcome on the closed journey does not move the payment day.
        let later = InvoiceRecord::observe(Some(&paid), &j, day("2026-11-20"));
        assert_eq!(later.days_late, Some(4));
    }

    #[test]
    fn disputes_requests_and_failed_channels_are_kept() {
        let mut j = journey(10_000, Currency::EUR);
        j.disputes.push(DisputeRecord {
            opened: day("2026-11-02"),
            reason: None,
            resolved: None,
            resolution: None,
        });
        for (channel, delivery) in [
            ("email", Delivery::Bounced),
            ("sms", Delivery::Delivered),
            ("letter", Delivery::Failed),
        ] {
            j.messages.push(MessageEvidence {
                action_id: format!("a-{channel}"),
                step: "reminder".into(),
                channel: channel.into(),
                at_ms: 0,
                delivery,
                content_sha256: None,
                provider_message_id: None,
            });
        }
        let r = InvoiceRecord::observe(None, &j, day("2026-11-03"));
        assert!(r.disputed && r.self_service);
        assert_eq!(r.failed_channels, channel_bit("email") | channel_bit("letter"));
        let facts = HistoryFacts::of([&r], day("2026-12-01"));
        assert_eq!((facts.disputes, facts.self_service, facts.failed_channels), (1, 1, 2));
    }

    #[test]
    fn the_summary_is_of_the_invoices_before() {
        let r = |issued: &str, cents: u64, late: Option<i32>| InvoiceRecord {
            issued: day(issued),
            amount_eur_cents: cents,
            days_late: late,
            disputed: false,
            self_service: false,
            failed_channels: 0,
        };
        let records = [
            r("2025-12-01", 10_000, Some(-3)),
            r("2026-01-01", 20_000, Some(9)),
            r("2026-02-01", 30_000, None),
        ];
        let facts = HistoryFacts::of(&records, day("2026-12-01"));
        assert_eq!(facts.invoices, 3);
        assert_eq!(facts.avg_days_late, 4.5);
        assert_eq!(facts.usual_amount_eur, Some(200.0));
        assert_eq!(facts.tenure_days, 365);
        assert_eq!(HistoryFacts::of(&[], day("2026-12-01")), HistoryFacts::default());
    }

    #[test]
    fn a_malformed_record_says_what_it_is() {
        for bad in ["", "2;1;1;-;;0", "1;x;1;-;;0", "1;1;1;-;q;0", "1;1;1;-;;0;7"] {
            assert!(InvoiceRecord::decode(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn records_read_back_as_written(
            days in -10_000i64..40_000,
            cents in 0u64..10_000_000_000,
            late in proptest::option::of(-400i32..4_000),
            disputed: bool,
            self_service: bool,
            failed_channels: u8,
        ) {
            let r = InvoiceRecord {
                issued: epoch() + chrono::Duration::days(days),
                amount_eur_cents: cents,
                days_late: late,
                disputed,
                self_service,
                failed_channels,
            };
            prop_assert_eq!(InvoiceRecord::decode(&r.encode()), Ok(r));
        }
    }
}
