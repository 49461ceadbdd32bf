//! Invoice validation and normalisation: what ingest accepts, and the snapshot it publishes.

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use crate::jurisdiction::{DebtorKind, Jurisdiction};
use crate::money::{Currency, Money};

/// Why an input was refused: a stable machine code plus words that say what and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {detail}")]
pub struct Rejection {
    pub code: &'static str,
    pub detail: String,
}

impl Rejection {
    pub fn new(code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            code,
            detail: detail.into(),
        }
    }
}

const EPOCH: NaiveDate = NaiveDate::from_ymd_opt(1970, 1, 1).expect("1970-01-01 is a valid date");

/// Avro `date` is days since the Unix epoch.
pub fn date_from_epoch_days(days: i32) -> Option<NaiveDate> {
    EPOCH.checked_add_signed(chrono::Duration::days(i64::from(days)))
}

pub fn epoch_days(date: NaiveDate) -> i32 {
    // Every date we handle is within i32 days of 1970.
    i32::try_from(date.signed_duration_since(EPOCH).num_days()).unwrap_or(i32::MAX)
}

/// Serde for dates kept in stored state: days since the epoch, three bytes in a binary format
/// where the ISO text takes eleven (a utility keeps millions of invoices open).
pub mod epoch_days_serde {
    use chrono::NaiveDate;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(date: &NaiveDate, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i32(super::epoch_days(*date))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<NaiveDate, D::Error> {
        let days = i32::deserialize(d)?;
        super::date_from_epoch_days(days)
            .ok_or_else(|| D::Error::custom(format!("{days} days from 1970 is out of range")))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InvoiceStatus {
    Open,
    SettledByCredit,
    Cancelled,
}

/// Contact details: personal data, never logged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    pub name: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub language: Option<String>,
    /// The debtor's channels, most preferred first (`email`, `sms`, `webhook`).
    #[serde(default)]
    pub preferred_channels: Vec<String>,
    /// Channels the debtor asked not to be contacted on.
    #[serde(default)]
    pub declined_channels: Vec<String>,
    /// Who the debtor is, when billing says: what an agency needs to act on a claim.
    #[serde(default)]
    pub details: Option<DebtorDetails>,
}

/// Who the debtor is beyond how to reach them (personal data, never logged).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebtorDetails {
    pub address: Option<PostalAddress>,
    /// Personal identity number (fødselsnummer, CPR-nummer, personnummer, henkilötunnus).
    pub national_id: Option<String>,
    /// Company registration number (organisasjonsnummer, CVR-nummer, organisationsnummer,
    /// Y-tunnus).
    pub company_id: Option<String>,
}

/// A postal address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostalAddress {
    /// Street, building, c/o: one to four lines.
    pub lines: Vec<String>,
    pub postal_code: String,
    pub city: String,
    /// ISO 3166-1 alpha-2 (NO, DK, SE, FI...).
    pub country: String,
}

/// What is wrong with the debtor's details, as a rejection naming the field.
fn check_details(details: &DebtorDetails) -> Result<(), Rejection> {
    let bad = |field: &str, why: String| {
        Rejection::new(
            "invalid_debtor_details",
            format!("field 'debtor_details.{field}' {why}"),
        )
    };
    let text = |field: &str, value: &str, max: usize| {
        if value.trim().is_empty() {
            Err(bad(field, "is empty".into()))
        } else if value.chars().count() > max {
            Err(bad(field, format!("is longer than {max} characters")))
        } else if value.chars().any(char::is_control) {
            Err(bad(field, "holds a control character".into()))
        } else {
            Ok(())
        }
    };
    if let Some(a) = &details.address {
        if a.lines.is_empty() || a.lines.len() > 4 {
            return Err(bad(
                "address.lines",
                format!("has {} lines: one to four are needed", a.lines.len()),
            ));
        }
        for (i, line) in a.lines.iter().enumerate() {
            text(&format!("address.lines[{i}]"), line, 70)?;
        }
        text("address.postal_code", &a.postal_code, 10)?;
        text("address.city", &a.city, 50)?;
        if a.country.len() != 2 || !a.country.chars().all(|c| c.is_ascii_uppercase()) {
            return Err(bad(
                "address.country",
                format!("is '{}': an ISO 3166 code like NO is needed", a.country),
            ));
        }
    }
    for (field, value) in [
        ("national_id", &details.national_id),
        ("company_id", &details.company_id),
    ] {
        if let Some(id) = value {
            text(field, id, 32)?;
            if !id.chars().all(|c| c.is_ascii_alphanumeric() || " +-.".contains(c)) {
                return Err(bad(field, "holds characters an identity number has not".into()));
            }
        }
    }
    Ok(())
}

/// The channels a message can be sent on.
pub const CHANNELS: [&str; 3] = ["email", "sms", "webhook"];

/// A step's channels for this debtor: the plan decides which channels a step may use (a
/// collection warning may need a traceable one), the debtor the order among them and which
/// they decline. Preferred channels come first in the debtor's order, the others keep the
/// plan's order; declined ones are left out, even when also preferred.
pub fn channels_for(plan: &[String], contact: &Contact) -> Vec<String> {
    let allowed = |c: &&String| !contact.declined_channels.contains(c);
    let mut out: Vec<String> = contact
        .preferred_channels
        .iter()
        .filter(|c| plan.contains(c))
        .filter(allowed)
        .cloned()
        .collect();
    out.dedup();
    for c in plan.iter().filter(allowed) {
        if !out.contains(c) {
            out.push(c.clone());
        }
    }
    out
}

fn check_channels(field: &str, channels: &[String]) -> Result<(), Rejection> {
    for (i, c) in channels.iter().enumerate() {
        if !CHANNELS.contains(&c.as_str()) {
            return Err(Rejection::new(
                "unknown_channel",
                format!("field '{field}[{i}]' is '{c}': expected one of {}", CHANNELS.join(", ")),
            ));
        }
    }
    Ok(())
}

/// An upstream "invoice issued" as received, before validation.
#[derive(Debug, Clone)]
pub struct IssuedInput {
    pub tenant: String,
    pub debtor_id: String,
    pub invoice_id: String,
    pub revision: i32,
    pub invoice_number: String,
    pub issue_date_days: i32,
    pub due_date_days: i32,
    pub amount_minor: i64,
    pub currency: String,
    pub jurisdiction: String,
    pub debtor_kind: String,
    pub payment_reference: Option<String>,
    pub description: Option<String>,
    pub contact: Contact,
    /// Sweden: the reminder fee was agreed no later than when the debt arose.
    pub reminder_fee_agreed: bool,
}

/// The normalised state of one invoice as billing knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvoiceSnapshot {
    pub tenant: String,
    pub debtor_id: String,
    pub invoice_id: String,
    pub revision: i32,
    pub invoice_number: String,
    #[serde(with = "epoch_days_serde")]
    pub issue_date: NaiveDate,
    #[serde(with = "epoch_days_serde")]
    pub due_date: NaiveDate,
    pub amount: Money,
    pub credited_minor: i64,
    pub jurisdiction: Jurisdiction,
    pub debtor_kind: DebtorKind,
    pub status: InvoiceStatus,
    pub payment_reference: Option<String>,
    pub description: Option<String>,
    pub contact: Contact,
    /// Sweden: the reminder fee was agreed no later than when the debt arose (lag (1981:739)
    /// 2 §); without it, no reminder fee.
    #[serde(default)]
    pub reminder_fee_agreed: bool,
}

impl InvoiceSnapshot {
    /// What the debtor still owes by the invoice's own terms (payments are the journey's business).
    pub fn open(&self) -> Money {
        let minor = match self.status {
            InvoiceStatus::Cancelled => 0,
            _ => self.amount.minor - self.credited_minor,
        };
        Money::new(minor, self.amount.currency)
    }
}

fn non_empty(field: &'static str, value: &str) -> Result<(), Rejection> {
    if value.trim().is_empty() {
        Err(Rejection::new("missing_field", format!("field '{field}' is empty")))
    } else {
        Ok(())
    }
}

/// The longest value, in characters, each text field of an invoice may have. Generous for any
/// real invoice (an e-mail address is at most 254 characters by RFC 5321's path limit, a payment
/// reference 25 in every Nordic scheme), and small enough that no invoice, however written, makes
/// a record the broker refuses or a message no provider takes.
pub const FIELD_LIMITS: &[(&str, usize)] = &[
    ("tenant", 64),
    ("debtor_id", 200),
    ("invoice_id", 128),
    ("invoice_number", 64),
    ("payment_reference", 64),
    ("description", 1000),
    ("debtor_name", 200),
    ("email", 254),
    ("phone", 32),
    ("language", 16),
];

fn within_limit(field: &'static str, value: Option<&str>) -> Result<(), Rejection> {
    let limit = FIELD_LIMITS
        .iter()
        .find(|(name, _)| *name == field)
        .map_or(usize::MAX, |(_, limit)| *limit);
    let length = value.map_or(0, |v| v.chars().count());
    if length > limit {
        return Err(Rejection::new(
            "field_too_long",
            format!("field '{field}' is {length} characters long, at most {limit} are allowed"),
        ));
    }
    Ok(())
}

fn check_lengths(input: &IssuedInput) -> Result<(), Rejection> {
    within_limit("tenant", Some(&input.tenant))?;
    within_limit("debtor_id", Some(&input.debtor_id))?;
    within_limit("invoice_id", Some(&input.invoice_id))?;
    within_limit("invoice_number", Some(&input.invoice_number))?;
    within_limit("payment_reference", input.payment_reference.as_deref())?;
    within_limit("description", input.description.as_deref())?;
    within_limit("debtor_name", input.contact.name.as_deref())?;
    within_limit("email", input.contact.email.as_deref())?;
    within_limit("phone", input.contact.phone.as_deref())?;
    within_limit("language", input.contact.language.as_deref())
}

/// Validates an issued invoice and turns it into a snapshot.
pub fn validate_issued(input: IssuedInput) -> Result<InvoiceSnapshot, Rejection> {
    check_lengths(&input)?;
    non_empty("tenant", &input.tenant)?;
    if input.debtor_id.trim().is_empty() {
        return Err(Rejection::new("missing_debtor", "field 'debtor_id' is empty"));
    }
    non_empty("invoice_id", &input.invoice_id)?;
    non_empty("invoice_number", &input.invoice_number)?;
    if input.revision < 0 {
        return Err(Rejection::new(
            "invalid_revision",
            format!("field 'revision' is {}, must be 0 or more", input.revision),
        ));
    }
    if input.amount_minor <= 0 {
        return Err(Rejection::new(
            "invalid_amount",
            format!("field 'amount_minor' is {}, must be greater than 0", input.amount_minor),
        ));
    }
    let currency: Currency = input
        .currency
        .parse()
        .map_err(|e: crate::MoneyError| Rejection::new("unknown_currency", format!("field 'currency': {e}")))?;
    let jurisdiction: Jurisdiction = input
        .jurisdiction
        .parse()
        .map_err(|e| Rejection::new("unknown_jurisdiction", format!("field 'jurisdiction': {e}")))?;
    let debtor_kind: DebtorKind = input
        .debtor_kind
        .parse()
        .map_err(|e| Rejection::new("unknown_debtor_kind", format!("field 'debtor_kind': {e}")))?;
    let issue_date = date_from_epoch_days(input.issue_date_days)
        .ok_or_else(|| Rejection::new("invalid_date", "field 'issue_date' is out of range"))?;
    let due_date = date_from_epoch_days(input.due_date_days)
        .ok_or_else(|| Rejection::new("invalid_date", "field 'due_date' is out of range"))?;
    if due_date < issue_date {
        return Err(Rejection::new(
            "due_before_issue",
            format!("field 'due_date' {due_date} is before field 'issue_date' {issue_date}"),
        ));
    }
    check_channels("preferred_channels", &input.contact.preferred_channels)?;
    check_channels("declined_channels", &input.contact.declined_channels)?;
    if let Some(details) = &input.contact.details {
        check_details(details)?;
    }
    Ok(InvoiceSnapshot {
        tenant: input.tenant,
        debtor_id: input.debtor_id,
        invoice_id: input.invoice_id,
        revision: input.revision,
        invoice_number: input.invoice_number,
        issue_date,
        due_date,
        amount: Money::new(input.amount_minor, currency),
        credited_minor: 0,
        jurisdiction,
        debtor_kind,
        status: InvoiceStatus::Open,
        payment_reference: input.payment_reference.filter(|r| !r.trim().is_empty()),
        description: input.description,
        contact: input.contact,
        reminder_fee_agreed: input.reminder_fee_agreed,
    })
}

/// What to do with an issued invoice given what we already hold for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevisionDecision {
    /// First time we see this invoice.
    New,
    /// A re-issue with a higher revision: replaces the terms, keeps credits.
    Newer,
    /// Same revision again (a redelivery or a retry upstream): nothing to do.
    Duplicate,
    /// Older than what we hold: arrived out of order, ignored.
    Stale,
}

pub fn decide_revision(existing: Option<&InvoiceSnapshot>, incoming_revision: i32) -> RevisionDecision {
    match existing {
        None => RevisionDecision::New,
        Some(e) if incoming_revision > e.revision => RevisionDecision::Newer,
        Some(e) if incoming_revision == e.revision => RevisionDecision::Duplicate,
        Some(_) => RevisionDecision::Stale,
    }
}

/// A re-issue replaces the terms; credits already granted and a cancellation still hold.
pub fn reissue(existing: &InvoiceSnapshot, mut incoming: InvoiceSnapshot) -> Result<InvoiceSnapshot, Rejection> {
    if incoming.amount.currency != existing.amount.currency && existing.credited_minor > 0 {
        return Err(Rejection::new(
            "currency_mismatch",
            format!(
                "re-issue of invoice '{}' changes currency from {} to {} after credits were applied",
                existing.invoice_id, existing.amount.currency, incoming.amount.currency
            ),
        ));
    }
    incoming.credited_minor = existing.credited_minor.min(incoming.amount.minor);
    incoming.status = match existing.status {
        InvoiceStatus::Cancelled => InvoiceStatus::Cancelled,
        _ if incoming.credited_minor >= incoming.amount.minor => InvoiceStatus::SettledByCredit,
        _ => InvoiceStatus::Open,
    };
    Ok(incoming)
}

/// Applies a credit note. Over-crediting is refused rather than silently capped: billing must fix it.
pub fn apply_credit(snapshot: &InvoiceSnapshot, credit: Money) -> Result<InvoiceSnapshot, Rejection> {
    if credit.minor <= 0 {
        return Err(Rejection::new(
            "invalid_amount",
            format!("field 'amount_minor' is {}, must be greater than 0", credit.minor),
        ));
    }
    if credit.currency != snapshot.amount.currency {
        return Err(Rejection::new(
            "currency_mismatch",
            format!(
                "credit in {} for invoice '{}' in {}",
                credit.currency, snapshot.invoice_id, snapshot.amount.currency
            ),
        ));
    }
    if snapshot.status == InvoiceStatus::Cancelled {
        return Err(Rejection::new(
            "invoice_cancelled",
            format!("invoice '{}' is cancelled; it cannot be credited", snapshot.invoice_id),
        ));
    }
    let open = snapshot.open();
    if credit.minor > open.minor {
        return Err(Rejection::new(
            "over_credit",
            format!(
                "credit of {credit} exceeds the {open} still open on invoice '{}'",
                snapshot.invoice_id
            ),
        ));
    }
    let mut next = snapshot.clone();
    next.credited_minor += credit.minor;
    if next.credited_minor == next.amount.minor {
        next.status = InvoiceStatus::SettledByCredit;
    }
    Ok(next)
}

pub fn apply_cancel(snapshot: &InvoiceSnapshot) -> InvoiceSnapshot {
    let mut next = snapshot.clone();
    next.status = InvoiceStatus::Cancelled;
    next
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn input() -> IssuedInput {
        IssuedInput {
            tenant: "acme".into(),
            debtor_id: "acme:c-1".into(),
            invoice_id: "inv-1".into(),
            revision: 1,
            invoice_number: "100001".into(),
            issue_date_days: epoch_days(NaiveDate::from_ymd_opt(2026, 3, 1).unwrap()),
            due_date_days: epoch_days(NaiveDate::from_ymd_opt(2026, 3, 15).unwrap()),
            amount_minor: 49_900,
            currency: "DKK".into(),
            jurisdiction: "DK".into(),
            debtor_kind: "consumer".into(),
            payment_reference: Some("+71<000000001000014+".into()),
            description: Some("Electricity, February".into()),
            contact: Contact::default(),
            reminder_fee_agreed: false,
        }
    }

    #[test]
    fn the_debtors_details_are_checked_and_each_fault_names_its_field() {
        let address = PostalAddress {
            lines: vec!["Storgata 1".into()],
            postal_code: "0155".into(),
            city: "Oslo".into(),
            country: "NO".into(),
        };
        let with = |details: DebtorDetails| {
            let mut i = input();
            i.contact.details = Some(details);
            validate_issued(i).map(|s| s.contact.details)
        };
        let good = DebtorDetails {
            address: Some(address.clone()),
            national_id: Some("010190 12345".into()),
            company_id: None,
        };
        assert_eq!(with(good.clone()).unwrap(), Some(good.clone()));
        for (details, field) in [
            (
                DebtorDetails {
                    address: Some(PostalAddress {
                        country: "Norway".into(),
                        ..address.clone()
                    }),
                    ..good.clone()
                },
                "debtor_details.address.country",
            ),
            (
                DebtorDetails {
                    address: Some(PostalAddress {
                        lines: vec!["a".into(); 5],
                        ..address.clone()
                    }),
                    ..good.clone()
                },
                "debtor_details.address.lines",
            ),
            (
                DebtorDetails {
                    address: Some(PostalAddress {
                        city: " ".into(),
                        ..address.clone()
                    }),
                    ..good.clone()
                },
                "debtor_details.address.city",
            ),
            (
                DebtorDetails {
                    company_id: Some("985 <script>".into()),
                    ..good.clone()
                },
                "debtor_details.company_id",
            ),
        ] {
            let e = with(details).unwrap_err();
            assert_eq!(e.code, "invalid_debtor_details");
            assert!(e.detail.contains(&format!("'{field}'")), "{e:?}");
        }
    }

    #[test]
    fn accepts_a_valid_invoice() {
        let s = validate_issued(input()).unwrap();
        assert_eq!(s.amount, Money::new(49_900, Currency::DKK));
        assert_eq!(s.open(), s.amount);
        assert_eq!(s.due_date, NaiveDate::from_ymd_opt(2026, 3, 15).unwrap());
    }

    #[test]
    fn each_invalid_field_has_its_own_code_and_names_the_field() {
        type Case = (Box<dyn Fn(&mut IssuedInput)>, &'static str, &'static str);
        let cases: Vec<Case> = vec![
            (Box::new(|i| i.amount_minor = -100), "invalid_amount", "amount_minor"),
            (Box::new(|i| i.amount_minor = 0), "invalid_amount", "amount_minor"),
            (Box::new(|i| i.currency = "XYZ".into()), "unknown_currency", "currency"),
            (Box::new(|i| i.debtor_id = " ".into()), "missing_debtor", "debtor_id"),
            (
                Box::new(|i| i.jurisdiction = "DE".into()),
                "unknown_jurisdiction",
                "jurisdiction",
            ),
            (
                Box::new(|i| i.debtor_kind = "robot".into()),
                "unknown_debtor_kind",
                "debtor_kind",
            ),
            (
                Box::new(|i| i.due_date_days = i.issue_date_days - 1),
                "due_before_issue",
                "due_date",
            ),
            (Box::new(|i| i.invoice_id = "".into()), "missing_field", "invoice_id"),
            (
                Box::new(|i| i.description = Some("x".repeat(1001))),
                "field_too_long",
                "description",
            ),
            (
                Box::new(|i| i.contact.email = Some(format!("{}@example.dk", "a".repeat(250)))),
                "field_too_long",
                "email",
            ),
            (
                Box::new(|i| i.invoice_number = "9".repeat(65)),
                "field_too_long",
                "invoice_number",
            ),
            (
                Box::new(|i| i.contact.name = Some("Å".repeat(201))),
                "field_too_long",
                "debtor_name",
            ),
        ];
        for (mutate, code, field) in cases {
            let mut i = input();
            mutate(&mut i);
            let err = validate_issued(i).unwrap_err();
            assert_eq!(err.code, code);
            assert!(
                err.detail.contains(field),
                "detail '{}' should name '{field}'",
                err.detail
            );
        }
    }

    #[test]
    fn fields_at_their_limit_are_accepted_and_counted_in_characters() {
        let mut i = input();
        i.description = Some("æ".repeat(1000));
        i.contact.name = Some("Ø".repeat(200));
        i.contact.email = Some(format!("{}@example.dk", "a".repeat(243)));
        assert_eq!(i.contact.email.as_ref().map(String::len), Some(254));
        assert!(validate_issued(i).is_ok());
    }

    #[test]
    fn revisions_are_ordered() {
        let s = validate_issued(input()).unwrap();
        assert_eq!(decide_revision(None, 1), RevisionDecision::New);
        assert_eq!(decide_revision(Some(&s), 1), RevisionDecision::Duplicate);
        assert_eq!(decide_revision(Some(&s), 2), RevisionDecision::Newer);
        assert_eq!(decide_revision(Some(&s), 0), RevisionDecision::Stale);
    }

    #[test]
    fn credits_reduce_and_settle_and_never_overshoot() {
        let s = validate_issued(input()).unwrap();
        let part = apply_credit(&s, Money::new(9_900, Currency::DKK)).unwrap();
        assert_eq!(part.open().minor, 40_000);
        assert_eq!(part.status, InvoiceStatus::Open);
        let full = apply_credit(&part, Money::new(40_000, Currency::DKK)).unwrap();
        assert_eq!(full.status, InvoiceStatus::SettledByCredit);
        assert_eq!(
            apply_credit(&full, Money::new(1, Currency::DKK)).unwrap_err().code,
            "over_credit"
        );
        assert_eq!(
            apply_credit(&s, Money::new(1, Currency::SEK)).unwrap_err().code,
            "currency_mismatch"
        );
    }

    #[test]
    fn reissue_keeps_credits_and_cancellation() {
        let s = validate_issued(input()).unwrap();
        let credited = apply_credit(&s, Money::new(10_000, Currency::DKK)).unwrap();
        let mut newer = input();
        newer.revision = 2;
        newer.amount_minor = 60_000;
        let re = reissue(&credited, validate_issued(newer.clone()).unwrap()).unwrap();
        assert_eq!(re.open().minor, 50_000);
        let cancelled = apply_cancel(&credited);
        assert_eq!(
            reissue(&cancelled, validate_issued(newer).unwrap()).unwrap().status,
            InvoiceStatus::Cancelled
        );
        assert_eq!(cancelled.open().minor, 0);
    }

    fn channels(list: &[&str]) -> Vec<String> {
        list.iter().map(|c| (*c).to_owned()).collect()
    }

    #[test]
    fn the_debtor_orders_the_plans_channels_and_declines_some() {
        let plan = channels(&["email", "sms", "webhook"]);
        let mut contact = Contact::default();
        assert_eq!(channels_for(&plan, &contact), plan, "no preference: the plan's order");
        contact.preferred_channels = channels(&["sms"]);
        assert_eq!(channels_for(&plan, &contact), channels(&["sms", "email", "webhook"]));
        contact.declined_channels = channels(&["email"]);
        assert_eq!(channels_for(&plan, &contact), channels(&["sms", "webhook"]));
        // A preference the plan does not allow for this step adds nothing.
        let email_only = channels(&["email"]);
        contact.declined_channels.clear();
        assert_eq!(channels_for(&email_only, &contact), email_only);
        contact.declined_channels = channels(&["email"]);
        assert!(
            channels_for(&email_only, &contact).is_empty(),
            "declined the only channel"
        );
    }

    #[test]
    fn an_unknown_channel_preference_is_refused_with_where() {
        let mut input = input();
        input.contact.preferred_channels = channels(&["sms", "fax"]);
        let err = validate_issued(input).expect_err("refused");
        assert_eq!(err.code, "unknown_channel");
        assert_eq!(
            err.detail,
            "field 'preferred_channels[1]' is 'fax': expected one of email, sms, webhook"
        );
    }

    use proptest::prelude::{Strategy, prop_assert_eq};

    proptest::proptest! {
        #[test]
        fn channel_order_is_the_plan_without_declined_with_preferences_first(
            plan in proptest::sample::subsequence(CHANNELS.to_vec(), 0..=3).prop_shuffle(),
            preferred in proptest::sample::subsequence(CHANNELS.to_vec(), 0..=3).prop_shuffle(),
            declined in proptest::sample::subsequence(CHANNELS.to_vec(), 0..=3),
        ) {
            let contact = Contact {
                preferred_channels: channels(&preferred),
                declined_channels: channels(&declined),
                ..Contact::default()
            };
            let out = channels_for(&channels(&plan), &contact);
            // Exactly the plan's channels that were not declined, each once.
            let mut expected: Vec<&str> = plan.iter().copied().filter(|c| !declined.contains(c)).collect();
            let mut got: Vec<&str> = out.iter().map(String::as_str).collect();
            expected.sort();
            got.sort();
            prop_assert_eq!(got, expected);
            // Preferred ones first, in the debtor's order; then the plan's order.
            let first: Vec<&str> = out.iter().map(String::as_str).take_while(|c| preferred.contains(c)).collect();
            let wanted: Vec<&str> = preferred.iter().copied().filter(|c| plan.contains(c) && !declined.contains(c)).collect();
            prop_assert_eq!(first, wanted);
        }
    }
}
