//! What a claim handed to a collection agency is made of, as of the hand-off day: the
//! principal and what was paid of it, each fee with the step that charged it and the rule that
//! allows it, late interest half-year by half-year with the rate in force and its source, and
//! the fixed compensation between businesses where the policy claims it. Every amount is in
//! the invoice's currency and minor units, and every line that rests on law names its rule.

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use crate::journey::Journey;
use crate::law::{DebtorContext, FeeStep, InterestLine, LawBook};
use crate::money::Money;

/// What a policy claims beyond the fees its plan charges (`[claims]` in the policy file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClaimTerms {
    pub late_interest: InterestTerms,
    /// The fixed compensation between businesses (DK 310 DKK, NO standardkompensasjon, SE
    /// förseningsersättning 450 SEK, FI 40 EUR); never for consumers.
    pub compensation: bool,
}

/// Which late interest a policy claims: `"none"`, `"statutory"`, or
/// `{ agreed_rate_bp = 1200 }` (basis points a year).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "RawInterestTerms", into = "RawInterestTerms")]
pub enum InterestTerms {
    /// None: the agency may claim it from the hand-off on.
    #[default]
    None,
    /// The statutory rate (reference rate + the law's margin), half-year by half-year.
    Statutory,
    /// A rate agreed with every debtor in advance (the creditor's terms of sale), claimed as far
    /// as the law lets it be: for consumers in some countries never above the statutory rate.
    Agreed { rate_bp: i64 },
}

/// The highest agreed rate a policy may state: far above any lawful consumer rate, a guard
/// against a rate written in the wrong unit (1200 means 12 %).
pub const MAX_AGREED_RATE_BP: i64 = 5_000;

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum RawInterestTerms {
    Word(String),
    Agreed { agreed_rate_bp: i64 },
}

impl TryFrom<RawInterestTerms> for InterestTerms {
    type Error = String;
    fn try_from(raw: RawInterestTerms) -> Result<Self, String> {
        match raw {
            RawInterestTerms::Word(w) if w == "none" => Ok(InterestTerms::None),
            RawInterestTerms::Word(w) if w == "statutory" => Ok(InterestTerms::Statutory),
            RawInterestTerms::Word(w) => Err(format!(
                "late_interest '{w}': expected \"none\", \"statutory\" or {{ agreed_rate_bp = <basis points a year> }}"
            )),
            RawInterestTerms::Agreed { agreed_rate_bp } if (1..=MAX_AGREED_RATE_BP).contains(&agreed_rate_bp) => {
                Ok(InterestTerms::Agreed {
                    rate_bp: agreed_rate_bp,
                })
            }
            RawInterestTerms::Agreed { agreed_rate_bp } => Err(format!(
                "late_interest agreed_rate_bp = {agreed_rate_bp}: a yearly rate in basis points from 1 to {MAX_AGREED_RATE_BP} (1200 is 12 %)"
            )),
        }
    }
}

impl From<InterestTerms> for RawInterestTerms {
    fn from(terms: InterestTerms) -> Self {
        match terms {
            InterestTerms::None => RawInterestTerms::Word("none".into()),
            InterestTerms::Statutory => RawInterestTerms::Word("statutory".into()),
            InterestTerms::Agreed { rate_bp } => RawInterestTerms::Agreed {
                agreed_rate_bp: rate_bp,
            },
        }
    }
}

/// A fee charged on the claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeeLine {
    /// The debtor's local day it was charged; unknown for fees of journeys from before they
    /// were itemised.
    pub date: Option<NaiveDate>,
    pub step: String,
    pub kind: Option<FeeStep>,
    pub amount: Money,
    /// The rule that caps this fee, when one does.
    pub rule_id: Option<String>,
    pub citation: Option<String>,
}

/// The fixed compensation claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompensationLine {
    pub amount: Money,
    /// What the law sets, before the fees charged are counted against it.
    pub statutory: Money,
    pub rule_id: String,
    pub citation: String,
}

/// A claim as of one day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub on: NaiveDate,
    /// The invoice's amount less credit notes.
    pub principal: Money,
    pub paid: Money,
    pub remaining_principal: Money,
    pub fees: Vec<FeeLine>,
    /// What is left of the fees (payments go to the principal first).
    pub remaining_fees: Money,
    pub interest: Vec<InterestLine>,
    pub interest_total: Money,
    /// Why some interest is not claimed (a half-year without a published rate), if any is not.
    pub interest_note: Option<String>,
    pub compensation: Option<CompensationLine>,
    pub total: Money,
}

/// The claim of `journey` as of `on` (the debtor's local day of the hand-off), under `terms`.
///
/// Interest runs on the principal left, from the day after the due date the plan counts from
/// (a granted postponement moves it) to `on`. Payments are not dated on the journey, so what
/// is left is taken as owed for the whole stretch: never more than the law allows, sometimes
/// less.
pub fn compose(journey: &Journey, law: &LawBook, terms: &ClaimTerms, ctx: &DebtorContext, on: NaiveDate) -> Claim {
    let principal = journey.invoice.open();
    let currency = principal.currency;
    let money = |minor: i64| Money::new(minor, currency);
    let (remaining_principal, remaining_fees) = remaining(journey);
    let mut fees: Vec<FeeLine> = journey
        .fees
        .iter()
        .map(|f| {
            let rule = law.max_fee_rule(ctx, f.kind, f.date).map(|(_, r)| r);
            FeeLine {
                date: Some(f.date),
                step: f.step.clone(),
                kind: Some(f.kind),
                amount: money(f.minor),
                rule_id: rule.map(|r| r.id.clone()),
                citation: rule.map(|r| r.citation.clone()),
            }
        })
        .collect();
    let itemised: i64 = fees.iter().map(|f| f.amount.minor).sum();
    if itemised < journey.fees_minor {
        fees.push(FeeLine {
            date: journey.fee_dates.last().copied(),
            step: "fees charged before they were itemised".to_owned(),
            kind: None,
            amount: money(journey.fees_minor - itemised),
            rule_id: None,
            citation: None,
        });
    }
    let (interest, interest_note) = interest(journey, law, terms, ctx, on);
    let interest_total = money(interest.iter().map(|l| l.amount.minor).sum());
    let compensation = compensation(journey, law, terms, ctx, on);
    let total = remaining_principal
        + remaining_fees
        + interest_total.minor
        + compensation.as_ref().map_or(0, |c| c.amount.minor);
    Claim {
        on,
        principal,
        paid: money(journey.paid_minor),
        remaining_principal: money(remaining_principal),
        fees,
        remaining_fees: money(remaining_fees),
        interest,
        interest_total,
        interest_note,
        compensation,
        total: money(total),
    }
}

/// What is left of the principal and of the fees (payments go to the principal first).
fn remaining(journey: &Journey) -> (i64, i64) {
    let outstanding = journey.outstanding().minor;
    let fees = journey.fees_minor.clamp(0, outstanding);
    ((outstanding - fees).max(0), fees)
}

/// The late interest `terms` claim on the principal left, line by line, and why some is not
/// claimed, if any is not.
fn interest(
    journey: &Journey,
    law: &LawBook,
    terms: &ClaimTerms,
    ctx: &DebtorContext,
    on: NaiveDate,
) -> (Vec<InterestLine>, Option<String>) {
    let (remaining_principal, _) = remaining(journey);
    let owed = Money::new(remaining_principal, journey.invoice.open().currency);
    let found = match terms.late_interest {
        _ if remaining_principal <= 0 => return (Vec::new(), None),
        InterestTerms::None => return (Vec::new(), None),
        InterestTerms::Statutory => law.late_interest_lines(ctx, owed, journey.anchor_due(), on),
        InterestTerms::Agreed { rate_bp } => law.agreed_interest_lines(ctx, owed, rate_bp, journey.anchor_due(), on),
    };
    match found {
        Ok(found) => {
            let note = (!found.missing.is_empty()).then(|| {
                let why: Vec<String> = found.missing.iter().map(ToString::to_string).collect();
                format!("interest not claimed for part of the time: {}", why.join("; "))
            });
            (found.lines, note)
        }
        Err(e) => (Vec::new(), Some(format!("interest not claimed: {e}"))),
    }
}

/// The fixed compensation `terms` claim, less the fees it replaces where the law says so.
fn compensation(
    journey: &Journey,
    law: &LawBook,
    terms: &ClaimTerms,
    ctx: &DebtorContext,
    on: NaiveDate,
) -> Option<CompensationLine> {
    let currency = journey.invoice.open().currency;
    terms
        .compensation
        .then(|| law.compensation(ctx, on))
        .flatten()
        .filter(|(statutory, _)| statutory.currency == currency)
        .and_then(|(statutory, rule)| {
            let offsets = matches!(rule.limit, crate::law::Limit::Compensation { offsets_fees: true, .. });
            let against = if offsets { journey.fees_minor } else { 0 };
            let claimed = (statutory.minor - against).max(0);
            (claimed > 0).then(|| CompensationLine {
                amount: Money::new(claimed, currency),
                statutory,
                rule_id: rule.id.clone(),
                citation: rule.citation.clone(),
            })
        })
}

/// What a message tells the debtor the creditor claims beyond the amount to pay: the late
/// interest accrued so far and the yearly rate now in force, and the fixed compensation. Both
/// are claimed if the invoice goes to collection; neither is part of what the journey counts
/// as owed, so paying the amount shown settles the invoice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Accrued {
    pub interest_minor: i64,
    /// The yearly rate in force on the day, in basis points, when the policy claims interest
    /// (it runs from the due date on).
    pub rate_bp: Option<i64>,
    pub compensation_minor: i64,
}

/// What the claim of `journey` adds as of `on` (see [`Accrued`]); nothing when the policy
/// claims neither interest nor compensation.
pub fn accrued(journey: &Journey, law: &LawBook, terms: &ClaimTerms, ctx: &DebtorContext, on: NaiveDate) -> Accrued {
    if *terms == ClaimTerms::default() {
        return Accrued::default();
    }
    // Only what a message shows: not the fee lines and their rules a case itemises.
    let (lines, _) = interest(journey, law, terms, ctx, on);
    Accrued {
        interest_minor: lines.iter().map(|l| l.amount.minor).sum(),
        rate_bp: match terms.late_interest {
            InterestTerms::Statutory => law.late_interest_rate_bp(ctx, on),
            InterestTerms::Agreed { rate_bp } => agreed_rate_bp(law, ctx, rate_bp, on),
            InterestTerms::None => None,
        },
        compensation_minor: compensation(journey, law, terms, ctx, on).map_or(0, |c| c.amount.minor),
    }
}

/// The agreed rate as far as the law lets it be claimed from this debtor on `on`.
fn agreed_rate_bp(law: &LawBook, ctx: &DebtorContext, agreed_bp: i64, on: NaiveDate) -> Option<i64> {
    match law.agreed_interest_rule(ctx, on)?.limit {
        crate::law::Limit::AgreedInterest {
            at_most_statutory: true,
        } => law
            .late_interest_rate_bp(ctx, on)
            .map(|statutory| statutory.min(agreed_bp)),
        _ => Some(agreed_bp),
    }
}

/// What is wrong with `terms` under `law` as of `on`: statutory interest needs a late-interest
/// rule in force for every jurisdiction and kind of debtor the policy may meet; an agreed rate
/// needs a rule saying whether it may be claimed, and where the law caps it at the statutory
/// rate, the statutory rule too.
pub fn check_terms(terms: &ClaimTerms, law: &LawBook, on: NaiveDate) -> Vec<String> {
    let mut problems = Vec::new();
    for jurisdiction in crate::jurisdiction::Jurisdiction::ALL {
        for kind in [crate::DebtorKind::Consumer, crate::DebtorKind::Business] {
            let ctx = DebtorContext {
                jurisdiction,
                kind,
                fee_agreed_in_advance: false,
            };
            let debtors = format!("{jurisdiction} {} debtors on {on}", kind.code());
            let needs_statutory = match terms.late_interest {
                InterestTerms::None => false,
                InterestTerms::Statutory => true,
                InterestTerms::Agreed { .. } => match law.agreed_interest_rule(&ctx, on).map(|r| &r.limit) {
                    Some(crate::law::Limit::AgreedInterest { at_most_statutory }) => *at_most_statutory,
                    _ => {
                        problems.push(format!(
                            "an agreed late-interest rate is claimed, but the law book does not say whether one may be claimed from {debtors}"
                        ));
                        false
                    }
                },
            };
            if needs_statutory && law.interest_rule(&ctx, on).is_none() {
                problems.push(format!(
                    "late interest is claimed, but the law book has no late-interest rule for {debtors}"
                ));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invoice::{Contact, InvoiceSnapshot, InvoiceStatus};
    use crate::journey::{FeeCharged, JourneyState};
    use crate::jurisdiction::{DebtorKind, Jurisdiction};
    use crate::money::Currency;
    use proptest::prelude::*;

    fn d(y: i32, m: u32, day: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, day).unwrap()
    }

    fn journey(j: Jurisdiction, kind: DebtorKind, amount: Money, due: NaiveDate) -> Journey {
        let mut journey = crate::journey::on_invoice(
            None,
            InvoiceSnapshot {
                tenant: "t".into(),
                debtor_id: "t:d".into(),
                invoice_id: "i1".into(),
                revision: 1,
                invoice_number: "1001".into(),
                issue_date: due - chrono::Duration::days(14),
                due_date: due,
                amount,
                credited_minor: 0,
                jurisdiction: j,
                debtor_kind: kind,
                status: InvoiceStatus::Open,
                payment_reference: None,
                description: None,
                contact: Contact::default(),
                reminder_fee_agreed: false,
            },
            &crate::journey::Plan::builtin(),
        )
        .journey;
        journey.state = JourneyState::HandedOver;
        journey
    }

    fn ctx(j: &Journey) -> DebtorContext {
        DebtorContext {
            jurisdiction: j.invoice.jurisdiction,
            kind: j.invoice.debtor_kind,
            fee_agreed_in_advance: false,
        }
    }

    const STATUTORY: ClaimTerms = ClaimTerms {
        late_interest: InterestTerms::Statutory,
        compensation: false,
    };

    #[test]
    fn norwegian_interest_runs_half_year_by_half_year_across_1_july_and_1_january() {
        let law = LawBook::builtin().unwrap();
        let j = journey(
            Jurisdiction::NO,
            DebtorKind::Consumer,
            Money::new(1_000_000, Currency::NOK),
            d(2025, 5, 20),
        );
        let claim = compose(&j, &law, &STATUTORY, &ctx(&j), d(2026, 2, 10));
        let lines: Vec<(NaiveDate, NaiveDate, i64, i64)> = claim
            .interest
            .iter()
            .map(|l| (l.first_day, l.last_day, l.days, l.rate_bp()))
            .collect();
        // Norges Bank's policy rate + 8 pp: 12.50 % for 2025 H1, 12.25 % for 2025 H2, 12.00 %
        // for 2026 H1 (rates.toml, each with its source).
        let rate = |period: &str| {
            law.rates()
                .iter()
                .find(|r| r.series == "no.norges_bank_policy" && r.period.to_string() == period)
                .map(|r| r.rate_bp + 800)
                .unwrap()
        };
        let (h1, h2, h3) = (rate("2025-H1"), rate("2025-H2"), rate("2026-H1"));
        assert_eq!(
            lines,
            vec![
                (d(2025, 5, 21), d(2025, 6, 30), 41, h1),
                (d(2025, 7, 1), d(2025, 12, 31), 184, h2),
                (d(2026, 1, 1), d(2026, 2, 10), 41, h3),
            ]
        );
        // Each line is its own days at its own rate, actual/365, rounded half away from zero.
        for l in &claim.interest {
            let exact = 1_000_000i128 * i128::from(l.rate_bp()) * i128::from(l.days);
            let rounded = (exact * 2 + 3_650_000) / 7_300_000;
            assert_eq!(i128::from(l.amount.minor), rounded, "{l:?}");
            assert_eq!(l.citation, "forsinkelsesrenteloven § 3");
            assert!(!l.rate_source.is_empty());
        }
        assert_eq!(claim.interest_note, None);
        assert_eq!(
            claim.total.minor,
            1_000_000 + claim.interest_total.minor,
            "principal and interest"
        );
        let once = law
            .late_interest(
                &ctx(&j),
                Money::new(1_000_000, Currency::NOK),
                d(2025, 5, 20),
                d(2026, 2, 10),
            )
            .unwrap();
        assert!(
            (claim.interest_total.minor - once.minor).abs() <= 2,
            "lines round apart by at most a unit each"
        );
    }

    #[test]
    fn a_half_year_without_a_published_rate_is_said_not_guessed() {
        let law = LawBook::builtin().unwrap();
        let j = journey(
            Jurisdiction::SE,
            DebtorKind::Consumer,
            Money::new(500_000, Currency::SEK),
            d(2026, 5, 29),
        );
        let claim = compose(&j, &law, &STATUTORY, &ctx(&j), d(2026, 8, 1));
        assert_eq!(claim.interest.len(), 1, "2026 H1 only");
        assert_eq!(claim.interest[0].last_day, d(2026, 6, 30));
        let note = claim.interest_note.unwrap();
        assert!(
            note.contains("se.riksbank_reference") && note.contains("2026-H2"),
            "{note}"
        );
    }

    #[test]
    fn fees_are_itemised_with_their_rule_and_payments_go_to_the_principal_first() {
        let law = LawBook::builtin().unwrap();
        let mut j = journey(
            Jurisdiction::NO,
            DebtorKind::Consumer,
            Money::new(125_000, Currency::NOK),
            d(2026, 3, 2),
        );
        j.fees_minor = 3_500;
        j.fee_dates = vec![d(2026, 3, 16)];
        j.fees = vec![FeeCharged {
            date: d(2026, 3, 16),
            step: "reminder-1".into(),
            kind: FeeStep::Reminder,
            minor: 3_500,
        }];
        j.paid_minor = 25_000;
        let claim = compose(&j, &law, &ClaimTerms::default(), &ctx(&j), d(2026, 4, 1));
        assert_eq!(claim.remaining_principal.minor, 100_000);
        assert_eq!(claim.remaining_fees.minor, 3_500);
        assert_eq!(claim.paid.minor, 25_000);
        assert_eq!(claim.fees.len(), 1);
        assert_eq!(claim.fees[0].step, "reminder-1");
        assert!(
            claim.fees[0]
                .citation
                .as_deref()
                .is_some_and(|c| c.starts_with("inkassoforskriften § 1-2"))
        );
        assert!(claim.interest.is_empty(), "no interest unless the policy claims it");
        assert_eq!(claim.total.minor, 103_500);
    }

    #[test]
    fn compensation_is_for_businesses_only_and_the_fees_charged_count_against_it() {
        let law = LawBook::builtin().unwrap();
        let terms = ClaimTerms {
            late_interest: InterestTerms::None,
            compensation: true,
        };
        for (j, amount, currency, statutory) in [
            (Jurisdiction::DK, 1_000_000, Currency::DKK, 31_000),
            (Jurisdiction::SE, 1_000_000, Currency::SEK, 45_000),
            (Jurisdiction::FI, 100_000, Currency::EUR, 4_000),
        ] {
            let business = journey(j, DebtorKind::Business, Money::new(amount, currency), d(2026, 3, 2));
            let claim = compose(&business, &law, &terms, &ctx(&business), d(2026, 4, 1));
            let c = claim.compensation.expect("a business owes it");
            assert_eq!((c.amount.minor, c.statutory.minor), (statutory, statutory), "{j}");
            assert_eq!(claim.total.minor, amount + statutory);
            let consumer = journey(j, DebtorKind::Consumer, Money::new(amount, currency), d(2026, 3, 2));
            assert_eq!(
                compose(&consumer, &law, &terms, &ctx(&consumer), d(2026, 4, 1)).compensation,
                None,
                "{j}: never for a consumer"
            );
        }
        let mut with_fee = journey(
            Jurisdiction::SE,
            DebtorKind::Business,
            Money::new(1_000_000, Currency::SEK),
            d(2026, 3, 2),
        );
        with_fee.fees_minor = 6_000;
        let c = compose(&with_fee, &law, &terms, &ctx(&with_fee), d(2026, 4, 1))
            .compensation
            .unwrap();
        assert_eq!(c.amount.minor, 39_000, "450 SEK less the 60 SEK reminder fee");
        assert_eq!(c.citation, "lag (1981:739) 4 a §");
    }

    #[test]
    fn statutory_interest_is_checked_against_the_law_book_at_load() {
        let law = LawBook::builtin().unwrap();
        assert!(check_terms(&STATUTORY, &law, d(2026, 12, 3)).is_empty());
        let none = LawBook::from_toml("rule = []", "").unwrap();
        let problems = check_terms(&STATUTORY, &none, d(2026, 12, 3));
        assert_eq!(problems.len(), 8, "{problems:?}");
        assert!(
            problems[0].contains("no late-interest rule for DK consumer debtors"),
            "{problems:?}"
        );
        assert!(check_terms(&ClaimTerms::default(), &none, d(2026, 12, 3)).is_empty());
    }

    #[test]
    fn a_message_shows_the_interest_accrued_so_far_and_the_compensation_claimed() {
        let law = LawBook::builtin().unwrap();
        let terms = ClaimTerms {
            late_interest: InterestTerms::Statutory,
            compensation: true,
        };
        let due = d(2026, 3, 2);
        let business = journey(
            Jurisdiction::SE,
            DebtorKind::Business,
            Money::new(1_000_000, Currency::SEK),
            due,
        );
        let on_due = accrued(&business, &law, &terms, &ctx(&business), due);
        assert_eq!(on_due.interest_minor, 0, "nothing accrues by the due date");
        assert!(on_due.rate_bp.is_some(), "but the rate that will run is said");
        assert_eq!(on_due.compensation_minor, 45_000);
        let later = accrued(&business, &law, &terms, &ctx(&business), d(2026, 4, 1));
        let claim = compose(&business, &law, &terms, &ctx(&business), d(2026, 4, 1));
        assert!(later.interest_minor > 0);
        assert_eq!(
            later.interest_minor, claim.interest_total.minor,
            "what the hand-off would claim"
        );
        assert_eq!(later.rate_bp, Some(claim.interest[0].rate_bp()));
        let consumer = journey(
            Jurisdiction::SE,
            DebtorKind::Consumer,
            Money::new(1_000_000, Currency::SEK),
            due,
        );
        assert_eq!(
            accrued(&consumer, &law, &terms, &ctx(&consumer), d(2026, 4, 1)).compensation_minor,
            0
        );
        assert_eq!(
            accrued(&business, &law, &ClaimTerms::default(), &ctx(&business), d(2026, 4, 1)),
            Accrued::default(),
            "a policy claiming neither shows neither"
        );
    }

    #[test]
    fn an_agreed_rate_is_claimed_where_the_law_allows_it_and_capped_where_it_caps_it() {
        let law = LawBook::builtin().unwrap();
        let due = d(2026, 1, 15);
        let on = d(2026, 3, 16);
        let agreed = |bp| ClaimTerms {
            late_interest: InterestTerms::Agreed { rate_bp: bp },
            compensation: false,
        };
        // Sweden: räntelagen lets the agreed rate stand.
        let se = journey(
            Jurisdiction::SE,
            DebtorKind::Consumer,
            Money::new(1_000_000, Currency::SEK),
            due,
        );
        let claim = compose(&se, &law, &agreed(1_800), &ctx(&se), on);
        assert_eq!(claim.interest.len(), 1);
        let line = &claim.interest[0];
        assert_eq!((line.rate_bp(), line.days), (1_800, 60));
        assert_eq!(line.amount.minor, (1_000_000 * 1_800 * 60 * 2 + 3_650_000) / 7_300_000);
        assert_eq!(line.citation, "räntelagen (1975:635) 1 §");
        assert_eq!(line.rate_source, "agreed with the debtor");
        // Finland: a consumer never pays more than the statutory rate; a business pays what it agreed.
        let statutory_fi = law
            .late_interest_rate_bp(
                &DebtorContext {
                    jurisdiction: Jurisdiction::FI,
                    kind: DebtorKind::Consumer,
                    fee_agreed_in_advance: false,
                },
                on,
            )
            .unwrap();
        let fi = journey(
            Jurisdiction::FI,
            DebtorKind::Consumer,
            Money::new(100_000, Currency::EUR),
            due,
        );
        let capped = compose(&fi, &law, &agreed(2_000), &ctx(&fi), on);
        assert_eq!(capped.interest[0].rate_bp(), statutory_fi);
        assert_eq!(
            capped.interest[0].citation, "korkolaki (633/1982) 4 §",
            "the statutory rule sets it"
        );
        assert_eq!(
            accrued(&fi, &law, &agreed(2_000), &ctx(&fi), on).rate_bp,
            Some(statutory_fi)
        );
        let lower = compose(&fi, &law, &agreed(500), &ctx(&fi), on);
        assert_eq!(
            lower.interest[0].rate_bp(),
            500,
            "an agreed rate below the statutory one stands"
        );
        assert_eq!(lower.interest[0].citation, "korkolaki (633/1982) 2 § 2 mom.");
        let fi_business = journey(
            Jurisdiction::FI,
            DebtorKind::Business,
            Money::new(100_000, Currency::EUR),
            due,
        );
        let free = compose(&fi_business, &law, &agreed(2_000), &ctx(&fi_business), on);
        assert_eq!(free.interest[0].rate_bp(), 2_000);
        assert_eq!(free.interest[0].citation, "korkolaki (633/1982) 2 § 1 mom.");
    }

    #[test]
    fn a_policy_states_an_agreed_rate_in_basis_points_and_the_law_book_must_cover_it() {
        #[derive(Deserialize)]
        struct File {
            claims: ClaimTerms,
        }
        let read = |text: &str| toml::from_str::<File>(text).map(|f| f.claims.late_interest);
        assert_eq!(
            read("[claims]\nlate_interest = { agreed_rate_bp = 1200 }").unwrap(),
            InterestTerms::Agreed { rate_bp: 1_200 }
        );
        assert_eq!(
            read("[claims]\nlate_interest = \"statutory\"").unwrap(),
            InterestTerms::Statutory
        );
        let zero = read("[claims]\nlate_interest = { agreed_rate_bp = 0 }")
            .unwrap_err()
            .to_string();
        assert!(zero.contains("from 1 to 5000 (1200 is 12 %)"), "{zero}");
        let word = read("[claims]\nlate_interest = \"sometimes\"").unwrap_err().to_string();
        assert!(word.contains("late_interest 'sometimes': expected"), "{word}");
        let law = LawBook::builtin().unwrap();
        let terms = ClaimTerms {
            late_interest: InterestTerms::Agreed { rate_bp: 1_200 },
            compensation: false,
        };
        assert!(check_terms(&terms, &law, d(2026, 12, 3)).is_empty());
        let bare = LawBook::from_toml("rule = []", "").unwrap();
        let problems = check_terms(&terms, &bare, d(2026, 12, 3));
        assert_eq!(problems.len(), 8, "{problems:?}");
        assert!(
            problems[0].contains("does not say whether one may be claimed from DK consumer debtors"),
            "{problems:?}"
        );
    }

    proptest! {
        /// Whatever was paid and charged: the total is exactly its parts, nothing is negative,
        /// and fees plus compensation never exceed the larger of the two.
        #[test]
        fn the_total_is_its_parts_and_compensation_never_stacks_on_fees(
            amount in 1i64..10_000_000,
            paid in 0i64..12_000_000,
            fee in 0i64..20_000,
            days in 0i64..500,
        ) {
            let law = LawBook::builtin().unwrap();
            let due = d(2025, 3, 3);
            let mut j = journey(Jurisdiction::SE, DebtorKind::Business, Money::new(amount, Currency::SEK), due);
            j.fees_minor = fee;
            j.paid_minor = paid;
            let terms = ClaimTerms { late_interest: InterestTerms::Statutory, compensation: true };
            let c = compose(&j, &law, &terms, &ctx(&j), due + chrono::Duration::days(days));
            let compensation = c.compensation.as_ref().map_or(0, |c| c.amount.minor);
            prop_assert_eq!(
                c.total.minor,
                c.remaining_principal.minor + c.remaining_fees.minor + c.interest_total.minor + compensation
            );
            prop_assert!(c.remaining_principal.minor >= 0 && c.remaining_fees.minor >= 0 && c.interest_total.minor >= 0);
            prop_assert!(fee + compensation <= fee.max(45_000));
            prop_assert_eq!(c.remaining_principal.minor + c.remaining_fees.minor, j.outstanding().minor);
        }

        /// Where the law caps an agreed rate at the statutory one, no line of the claim ever
        /// exceeds what the statutory rate gives, whatever rate was agreed.
        #[test]
        fn a_capped_agreed_rate_never_claims_more_than_the_statutory_rate(
            agreed in 1i64..5_000,
            amount in 1i64..10_000_000,
            days in 1i64..400,
            jurisdiction in prop::sample::select(vec![Jurisdiction::DK, Jurisdiction::NO, Jurisdiction::FI]),
        ) {
            let law = LawBook::builtin().unwrap();
            let due = d(2025, 1, 10);
            let j = journey(jurisdiction, DebtorKind::Consumer, Money::new(amount, jurisdiction.home_currency()), due);
            let on = due + chrono::Duration::days(days);
            let terms = ClaimTerms { late_interest: InterestTerms::Agreed { rate_bp: agreed }, compensation: false };
            let c = compose(&j, &law, &terms, &ctx(&j), on);
            let statutory = compose(&j, &law, &STATUTORY, &ctx(&j), on);
            for line in &c.interest {
                let same = statutory.interest.iter().find(|s| s.first_day == line.first_day);
                prop_assert!(same.is_some(), "a capped line has a known statutory rate: {:?}", line);
                prop_assert!(line.amount.minor <= same.map_or(0, |s| s.amount.minor));
                prop_assert!(line.rate_bp() <= agreed);
            }
        }
    }
}
