//! Nordic law as dated, cited data: what fees, deadlines and interest each jurisdiction allows.
//!
//! The rules live in `data/law.toml` and the reference rates in `data/rates.toml`, compiled in
//! and overridable with files of the same shape. Both are checked when loaded. Every refusal is
//! a [`Violation`] that names the rule and its citation in words a credit controller reads.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use chrono::{Datelike, Duration, NaiveDate};
use serde::{Deserialize, Serialize};

use crate::jurisdiction::{DebtorKind, Jurisdiction};
use crate::locale::Locale;
use crate::money::{self, Currency, Money};

pub const BUILTIN_RULES: &str = include_str!("../data/law.toml");
pub const BUILTIN_RATES: &str = include_str!("../data/rates.toml");

/// The kinds of step a fee can attach to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeeStep {
    /// DK rykker, NO purring, SE påminnelse, FI maksumuistutus.
    Reminder,
    /// DK påkrav (inkassoloven § 10), NO inkassovarsel (inkassoloven § 9).
    CollectionWarning,
    /// The creditor's own payment demand: NO betalingsoppfordring, SE inkassokrav, FI
    /// maksuvaatimus.
    PaymentDemand,
    /// DK inkassogebyr, SE inkassokrav.
    Collection,
    /// SE amorteringsplan.
    InstalmentPlan,
}

impl FeeStep {
    pub fn label(self) -> &'static str {
        match self {
            FeeStep::Reminder => "reminder",
            FeeStep::CollectionWarning => "collection warning",
            FeeStep::PaymentDemand => "payment demand",
            FeeStep::Collection => "collection",
            FeeStep::InstalmentPlan => "instalment plan",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DebtorScope {
    Any,
    Consumer,
    Business,
}

impl DebtorScope {
    fn covers(self, kind: DebtorKind) -> bool {
        matches!(
            (self, kind),
            (DebtorScope::Any, _)
                | (DebtorScope::Consumer, DebtorKind::Consumer)
                | (DebtorScope::Business, DebtorKind::Business)
        )
    }
}

/// What a rule limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Limit {
    MaxFee {
        step: FeeStep,
        amount_minor: i64,
        currency: Currency,
    },
    FeeNeedsDaysAfterDue {
        steps: Vec<FeeStep>,
        days: u32,
    },
    MinDaysBetweenFees {
        steps: Vec<FeeStep>,
        days: u32,
    },
    MaxFeeBearingSteps {
        steps: Vec<FeeStep>,
        count: u32,
    },
    FeeNeedsAgreement,
    MinDaysToPay {
        step: FeeStep,
        days: u32,
    },
    SecondFeeNeedsMissedDeadline {
        steps: Vec<FeeStep>,
        days: u32,
    },
    Compensation {
        amount_minor: i64,
        currency: Currency,
        /// The fees already charged on the claim count against it: the creditor gets the
        /// compensation instead of them, not on top.
        #[serde(default = "offsets_fees_by_default")]
        offsets_fees: bool,
    },
    LateInterest {
        series: String,
        margin_bp: i64,
    },
    /// A debtor's claims from one creditor handed over together form one case (the agency's
    /// fees on the combined principal); a disputed claim stays apart.
    MergeClaims,
    /// A late-interest rate agreed with the debtor in advance may be claimed instead of the
    /// statutory one; `at_most_statutory`: never more than the statutory rate (consumers in
    /// Denmark, Norway and Finland).
    AgreedInterest {
        at_most_statutory: bool,
    },
    /// A `step` step only after an `earlier` one: `days` before it, or, with
    /// `after_its_deadline`, after the end of a deadline of at least `days` that one gave.
    NeedsEarlierStep {
        step: FeeStep,
        earlier: Vec<FeeStep>,
        days: u32,
        #[serde(default)]
        after_its_deadline: bool,
    },
}

/// When a step needing an earlier one may come, in words: "after the end of a deadline of at
/// least 14 days given in a reminder or collection warning", "at least 14 days after a reminder".
pub fn earlier_step_wording(earlier: &[FeeStep], days: u32, after_its_deadline: bool) -> String {
    let kinds: Vec<&str> = earlier.iter().map(|k| k.label()).collect();
    if after_its_deadline {
        format!(
            "after the end of a deadline of at least {days} days given in a {}",
            kinds.join(" or ")
        )
    } else {
        format!("at least {days} days after a {}", kinds.join(" or "))
    }
}

impl Limit {
    /// Whether this rule speaks of steps of kind `step`.
    pub fn concerns(&self, step: FeeStep) -> bool {
        match self {
            Limit::MaxFee { step: s, .. } | Limit::MinDaysToPay { step: s, .. } => *s == step,
            Limit::NeedsEarlierStep { step: s, .. } => *s == step,
            Limit::FeeNeedsDaysAfterDue { steps, .. }
            | Limit::MinDaysBetweenFees { steps, .. }
            | Limit::MaxFeeBearingSteps { steps, .. }
            | Limit::SecondFeeNeedsMissedDeadline { steps, .. } => steps.contains(&step),
            Limit::FeeNeedsAgreement
            | Limit::Compensation { .. }
            | Limit::LateInterest { .. }
            | Limit::MergeClaims
            | Limit::AgreedInterest { .. } => false,
        }
    }
}

/// Where the data does not say, the compensation replaces the fees (never claims more).
fn offsets_fees_by_default() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub id: String,
    pub jurisdiction: Jurisdiction,
    pub debtor: DebtorScope,
    #[serde(flatten)]
    pub limit: Limit,
    pub citation: String,
    pub summary: String,
    pub valid_from: NaiveDate,
    #[serde(default)]
    pub valid_to: Option<NaiveDate>,
    pub verified: bool,
    #[serde(default)]
    pub note: Option<String>,
}

impl Rule {
    pub fn in_force(&self, on: NaiveDate) -> bool {
        self.valid_from <= on && self.valid_to.is_none_or(|to| on <= to)
    }
}

/// A half-year: H1 runs from 1 January, H2 from 1 July.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HalfYear {
    pub year: i32,
    pub second: bool,
}

impl HalfYear {
    pub fn of(date: NaiveDate) -> Self {
        HalfYear {
            year: date.year(),
            second: date.month() >= 7,
        }
    }

    /// The last day of this half-year.
    fn last_day(self) -> NaiveDate {
        let (m, d) = if self.second { (12, 31) } else { (6, 30) };
        NaiveDate::from_ymd_opt(self.year, m, d).unwrap_or(NaiveDate::MAX)
    }
}

impl fmt::Display for HalfYear {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-H{}", self.year, if self.second { 2 } else { 1 })
    }
}

impl FromStr for HalfYear {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (year, half) = s
            .split_once("-H")
            .ok_or_else(|| format!("'{s}' is not a half-year like 2026-H1"))?;
        let year = year.parse().map_err(|_| format!("'{s}': bad year"))?;
        match half {
            "1" => Ok(HalfYear { year, second: false }),
            "2" => Ok(HalfYear { year, second: true }),
            _ => Err(format!("'{s}': half must be H1 or H2")),
        }
    }
}

impl<'de> Deserialize<'de> for HalfYear {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for HalfYear {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// One published reference rate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rate {
    pub series: String,
    pub period: HalfYear,
    /// Basis points (1/100 of a percentage point): exact, never floating point.
    pub rate_bp: i64,
    pub source: String,
    pub verified: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LawError {
    #[error("cannot read the rules: {0}")]
    Unreadable(String),
    #[error("rule '{id}': {problem}")]
    Invalid { id: String, problem: String },
    #[error(
        "no {series} reference rate for {period}: add it to the rates file (needed for {jurisdiction} late interest)"
    )]
    RateMissing {
        series: String,
        period: HalfYear,
        jurisdiction: Jurisdiction,
    },
    #[error("no late-interest rule for {jurisdiction} {kind} debtors on {on}")]
    NoInterestRule {
        jurisdiction: Jurisdiction,
        kind: &'static str,
        on: NaiveDate,
    },
    #[error("no rule on agreed late interest for {jurisdiction} {kind} debtors on {on}")]
    NoAgreedInterestRule {
        jurisdiction: Jurisdiction,
        kind: &'static str,
        on: NaiveDate,
    },
    #[error(transparent)]
    Money(#[from] money::MoneyError),
}

/// A refused question: the rule, its citation, and what in the plan breaks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub rule_id: String,
    pub citation: String,
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.citation, self.message)
    }
}

/// Who the debtor is, as far as the law cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebtorContext {
    pub jurisdiction: Jurisdiction,
    pub kind: DebtorKind,
    /// Sweden: the reminder fee was agreed no later than when the debt arose.
    pub fee_agreed_in_advance: bool,
}

/// One step of a plan, as the law sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedFeeStep {
    pub name: String,
    /// Calendar days after the due date the step is sent (negative = before).
    pub days_after_due: i32,
    pub step: FeeStep,
    /// Zero for a step without a fee.
    pub fee: Money,
    /// The deadline the step gives the debtor, in days.
    pub days_to_pay: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct RulesFile {
    rule: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
struct RatesFile {
    #[serde(default)]
    rate: Vec<Rate>,
}

/// The rules and rates in force.
#[derive(Debug, Clone)]
pub struct LawBook {
    rules: Vec<Rule>,
    rates: Vec<Rate>,
}

impl LawBook {
    /// The compiled-in rules and rates.
    pub fn builtin() -> Result<LawBook, LawError> {
        LawBook::from_toml(BUILTIN_RULES, BUILTIN_RATES)
    }

    /// Rules and rates from TOML text, checked.
    pub fn from_toml(rules: &str, rates: &str) -> Result<LawBook, LawError> {
        let rules: RulesFile = toml::from_str(rules).map_err(|e| LawError::Unreadable(format!("rules: {e}")))?;
        let rates: RatesFile = toml::from_str(rates).map_err(|e| LawError::Unreadable(format!("rates: {e}")))?;
        let book = LawBook {
            rules: rules.rule,
            rates: rates.rate,
        };
        book.check()?;
        Ok(book)
    }

    fn check(&self) -> Result<(), LawError> {
        let mut ids = HashSet::new();
        for r in &self.rules {
            let invalid = |problem: String| LawError::Invalid {
                id: r.id.clone(),
                problem,
            };
            if !ids.insert(r.id.as_str()) {
                return Err(invalid("appears twice".into()));
            }
            if r.citation.trim().is_empty() {
                return Err(invalid("has no citation".into()));
            }
            if let Some(to) = r.valid_to {
                if to < r.valid_from {
                    return Err(invalid(format!("valid_to {to} is before valid_from {}", r.valid_from)));
                }
            }
            match &r.limit {
                Limit::MaxFee {
                    amount_minor, currency, ..
                }
                | Limit::Compensation {
                    amount_minor, currency, ..
                } => {
                    if *amount_minor <= 0 {
                        return Err(invalid(format!("amount {amount_minor} must be positive")));
                    }
                    if *currency != r.jurisdiction.home_currency() {
                        return Err(invalid(format!(
                            "amount in {currency}, but {} law is in {}",
                            r.jurisdiction,
                            r.jurisdiction.home_currency()
                        )));
                    }
                }
                Limit::FeeNeedsDaysAfterDue { steps, .. }
                | Limit::MinDaysBetweenFees { steps, .. }
                | Limit::MaxFeeBearingSteps { steps, .. }
                | Limit::SecondFeeNeedsMissedDeadline { steps, .. }
                | Limit::NeedsEarlierStep { earlier: steps, .. }
                    if steps.is_empty() =>
                {
                    return Err(invalid("names no steps".into()));
                }
                Limit::LateInterest { margin_bp, .. } if !(0..=2000).contains(margin_bp) => {
                    return Err(invalid(format!("margin {margin_bp} bp is outside 0-2000")));
                }
                _ => {}
            }
        }
        let mut periods = HashSet::new();
        for rate in &self.rates {
            if !periods.insert((rate.series.as_str(), rate.period)) {
                return Err(LawError::Invalid {
                    id: rate.series.clone(),
                    problem: format!("{} appears twice", rate.period),
                });
            }
            if !(-1000..=5000).contains(&rate.rate_bp) {
                return Err(LawError::Invalid {
                    id: rate.series.clone(),
                    problem: format!("{} rate {} bp is implausible", rate.period, rate.rate_bp),
                });
            }
        }
        Ok(())
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn rates(&self) -> &[Rate] {
        &self.rates
    }

    /// The rules that apply to this debtor on this date.
    pub fn applicable<'a>(&'a self, ctx: &DebtorContext, on: NaiveDate) -> impl Iterator<Item = &'a Rule> + 'a {
        let ctx = *ctx;
        self.rules
            .iter()
            .filter(move |r| r.jurisdiction == ctx.jurisdiction && r.debtor.covers(ctx.kind) && r.in_force(on))
    }

    /// The highest fee the law allows on a step ("statutory maximum"); `None` when no rule caps
    /// it, which is not the same as allowing any fee: check the plan.
    pub fn max_fee(&self, ctx: &DebtorContext, step: FeeStep, on: NaiveDate) -> Option<Money> {
        self.max_fee_rule(ctx, step, on).map(|(fee, _)| fee)
    }

    /// [`LawBook::max_fee`], with the rule that sets it (for its citation).
    pub fn max_fee_rule<'a>(
        &'a self,
        ctx: &'a DebtorContext,
        step: FeeStep,
        on: NaiveDate,
    ) -> Option<(Money, &'a Rule)> {
        self.applicable(ctx, on)
            .filter_map(|r| match &r.limit {
                Limit::MaxFee {
                    step: s,
                    amount_minor,
                    currency,
                } if *s == step => Some((Money::new(*amount_minor, *currency), r)),
                _ => None,
            })
            .min_by_key(|(m, _)| m.minor)
    }

    /// Fixed compensation for a business debtor, when the jurisdiction has one.
    pub fn compensation<'a>(&'a self, ctx: &'a DebtorContext, on: NaiveDate) -> Option<(Money, &'a Rule)> {
        self.applicable(ctx, on).find_map(|r| match &r.limit {
            Limit::Compensation {
                amount_minor, currency, ..
            } => Some((Money::new(*amount_minor, *currency), r)),
            _ => None,
        })
    }

    /// The fewest days to pay a `step` must give this debtor, and the rule that says so.
    pub fn min_days_to_pay(&self, ctx: &DebtorContext, step: FeeStep, on: NaiveDate) -> Option<(u32, &Rule)> {
        self.applicable(ctx, on).find_map(|r| match &r.limit {
            Limit::MinDaysToPay { step: s, days } if *s == step => Some((*days, r)),
            _ => None,
        })
    }

    /// The rule that merges this debtor's claims at hand-off, where the law has one.
    pub fn merge_rule(&self, ctx: &DebtorContext, on: NaiveDate) -> Option<&Rule> {
        self.applicable(ctx, on).find(|r| matches!(r.limit, Limit::MergeClaims))
    }

    /// The rule saying whether, and how far, an agreed late-interest rate may be claimed from
    /// this debtor on `on`.
    pub fn agreed_interest_rule(&self, ctx: &DebtorContext, on: NaiveDate) -> Option<&Rule> {
        self.applicable(ctx, on)
            .find(|r| matches!(r.limit, Limit::AgreedInterest { .. }))
    }

    /// The late-interest rule in force for this debtor on `on`.
    pub fn interest_rule(&self, ctx: &DebtorContext, on: NaiveDate) -> Option<&Rule> {
        self.applicable(ctx, on)
            .find(|r| matches!(r.limit, Limit::LateInterest { .. }))
    }

    /// Every way the plan breaks the law for this debtor; empty when it is lawful.
    pub fn check_plan(&self, ctx: &DebtorContext, on: NaiveDate, steps: &[PlannedFeeStep]) -> Vec<Violation> {
        let locale = Locale::En;
        let mut out = Vec::new();
        let violation = |r: &Rule, detail: String| Violation {
            rule_id: r.id.clone(),
            citation: r.citation.clone(),
            message: format!("{}; {detail}", r.summary),
        };
        let mut ordered: Vec<&PlannedFeeStep> = steps.iter().collect();
        ordered.sort_by_key(|s| s.days_after_due);
        let home = ctx.jurisdiction.home_currency();
        for s in &ordered {
            if s.fee.minor < 0 {
                out.push(Violation {
                    rule_id: "fee.negative".into(),
                    citation: "Forfall".into(),
                    message: format!("'{}' has a negative fee", s.name),
                });
            }
            if s.fee.minor > 0 && s.fee.currency != home {
                out.push(Violation {
                    rule_id: "fee.currency".into(),
                    citation: format!("{} law", ctx.jurisdiction),
                    message: format!(
                        "fees must be in {home}; '{}' charges {}",
                        s.name,
                        money::format(s.fee, locale)
                    ),
                });
            }
        }
        for r in self.applicable(ctx, on) {
            let charged = |kinds: &[FeeStep]| -> Vec<&PlannedFeeStep> {
                ordered
                    .iter()
                    .copied()
                    .filter(|s| s.fee.minor > 0 && kinds.contains(&s.step))
                    .collect()
            };
            match &r.limit {
                Limit::MaxFee {
                    step,
                    amount_minor,
                    currency,
                } => {
                    let cap = Money::new(*amount_minor, *currency);
                    for s in ordered
                        .iter()
                        .filter(|s| s.step == *step && s.fee.currency == cap.currency && s.fee.minor > cap.minor)
                    {
                        out.push(violation(
                            r,
                            format!("'{}' charges {}", s.name, money::format(s.fee, locale)),
                        ));
                    }
                }
                Limit::FeeNeedsDaysAfterDue { steps: kinds, days } => {
                    for s in charged(kinds).into_iter().filter(|s| s.days_after_due < *days as i32) {
                        let when = match s.days_after_due {
                            d if d < 0 => format!("{} days before the due date", -d),
                            0 => "on the due date".to_owned(),
                            d => format!("{d} days after the due date"),
                        };
                        out.push(violation(r, format!("'{}' charges a fee {when}", s.name)));
                    }
                }
                Limit::MinDaysBetweenFees { steps: kinds, days } => {
                    for pair in charged(kinds).windows(2) {
                        let gap = pair[1].days_after_due - pair[0].days_after_due;
                        if gap < *days as i32 {
                            out.push(violation(
                                r,
                                format!("'{}' comes {gap} days after '{}'", pair[1].name, pair[0].name),
                            ));
                        }
                    }
                }
                Limit::MaxFeeBearingSteps { steps: kinds, count } => {
                    let fee_bearing = charged(kinds);
                    if fee_bearing.len() > *count as usize {
                        let names: Vec<String> = fee_bearing.iter().map(|s| format!("'{}'", s.name)).collect();
                        out.push(violation(
                            r,
                            format!("the plan charges {} fees: {}", fee_bearing.len(), names.join(", ")),
                        ));
                    }
                }
                Limit::FeeNeedsAgreement if !ctx.fee_agreed_in_advance => {
                    for s in charged(&[FeeStep::Reminder]) {
                        out.push(violation(
                            r,
                            format!(
                                "'{}' charges {} but no fee was agreed in advance",
                                s.name,
                                money::format(s.fee, locale)
                            ),
                        ));
                    }
                }
                Limit::MinDaysToPay { step, days } => {
                    for s in ordered.iter().filter(|s| s.step == *step) {
                        let given = s.days_to_pay.unwrap_or(0);
                        if given < *days {
                            out.push(violation(r, format!("'{}' gives {given} days to pay", s.name)));
                        }
                    }
                }
                Limit::SecondFeeNeedsMissedDeadline { steps: kinds, days } => {
                    let fee_bearing = charged(kinds);
                    if let [first, second, ..] = fee_bearing.as_slice() {
                        let deadline = first.days_to_pay.unwrap_or(0);
                        if deadline < *days {
                            out.push(violation(
                                r,
                                format!(
                                    "'{}' charges a second fee, but '{}' gave only {deadline} days to pay",
                                    second.name, first.name
                                ),
                            ));
                        } else if second.days_after_due <= first.days_after_due + deadline as i32 {
                            out.push(violation(
                                r,
                                format!(
                                    "'{}' comes before the {deadline}-day deadline given in '{}' has passed",
                                    second.name, first.name
                                ),
                            ));
                        }
                    }
                }
                Limit::NeedsEarlierStep {
                    step,
                    earlier,
                    days,
                    after_its_deadline,
                } => {
                    for s in ordered.iter().filter(|s| s.step == *step) {
                        // A message on or before the due date reminds of no arrears.
                        let preceded = ordered.iter().any(|e| {
                            earlier.contains(&e.step)
                                && e.days_after_due > 0
                                && e.days_after_due < s.days_after_due
                                && if *after_its_deadline {
                                    let deadline = e.days_to_pay.unwrap_or(0);
                                    deadline >= *days && s.days_after_due > e.days_after_due + deadline as i32
                                } else {
                                    s.days_after_due - e.days_after_due >= *days as i32
                                }
                        });
                        if !preceded {
                            let what = earlier_step_wording(earlier, *days, *after_its_deadline);
                            out.push(violation(r, format!("'{}' does not come {what}", s.name)));
                        }
                    }
                }
                _ => {}
            }
        }
        // A step the law of this country does not know (a creditor's payment demand in
        // Denmark, where the påkrav is the warning) cannot be checked, so it is not sent.
        for s in ordered.iter().filter(|s| s.step == FeeStep::PaymentDemand) {
            if !self
                .applicable(ctx, on)
                .any(|r| r.limit.concerns(FeeStep::PaymentDemand))
            {
                out.push(Violation {
                    rule_id: "payment_demand.unknown".into(),
                    citation: format!("{} law", ctx.jurisdiction),
                    message: format!(
                        "'{}' is a payment demand, which the law book does not know for {} debtors: use a collection_warning",
                        s.name, ctx.jurisdiction
                    ),
                });
            }
        }
        out
    }

    /// The earliest date a next fee-bearing `step` may be sent, given the dates fees were charged
    /// before on this claim; a violation when the law allows no further fee.
    pub fn earliest_fee_date(
        &self,
        ctx: &DebtorContext,
        step: FeeStep,
        due: NaiveDate,
        previous_fees: &[NaiveDate],
        on: NaiveDate,
    ) -> Result<NaiveDate, Violation> {
        let mut earliest = due;
        for r in self.applicable(ctx, on) {
            match &r.limit {
                Limit::FeeNeedsDaysAfterDue { steps, days } if steps.contains(&step) => {
                    earliest = earliest.max(due + Duration::days(i64::from(*days)));
                }
                Limit::MinDaysBetweenFees { steps, days } if steps.contains(&step) => {
                    if let Some(last) = previous_fees.iter().max() {
                        earliest = earliest.max(*last + Duration::days(i64::from(*days)));
                    }
                }
                Limit::MaxFeeBearingSteps { steps, count }
                    if steps.contains(&step) && previous_fees.len() >= *count as usize =>
                {
                    return Err(Violation {
                        rule_id: r.id.clone(),
                        citation: r.citation.clone(),
                        message: format!("{}; {} fees were already charged", r.summary, previous_fees.len()),
                    });
                }
                _ => {}
            }
        }
        Ok(earliest)
    }

    fn rate(&self, series: &str, period: HalfYear) -> Option<&Rate> {
        self.rates.iter().find(|r| r.series == series && r.period == period)
    }

    /// The stretches of days after `from` up to and including `to`, one per half-year, each
    /// with the rule and published rate in force for it, or why it has none.
    fn interest_periods(
        &self,
        ctx: &DebtorContext,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Vec<Result<InterestPeriod<'_>, LawError>> {
        let mut periods = Vec::new();
        for (first, last, days) in half_years(from, to) {
            let half = HalfYear::of(first);
            let Some(rule) = self.interest_rule(ctx, first) else {
                periods.push(Err(LawError::NoInterestRule {
                    jurisdiction: ctx.jurisdiction,
                    kind: ctx.kind.code(),
                    on: first,
                }));
                continue;
            };
            let Limit::LateInterest { series, margin_bp } = &rule.limit else {
                continue;
            };
            periods.push(
                self.rate(series, half)
                    .map(|rate| InterestPeriod {
                        first_day: first,
                        last_day: last,
                        days,
                        rate,
                        margin_bp: *margin_bp,
                        rule,
                    })
                    .ok_or(LawError::RateMissing {
                        series: series.clone(),
                        period: half,
                        jurisdiction: ctx.jurisdiction,
                    }),
            );
        }
        periods
    }

    /// Statutory late interest on `principal` for each day after `from` up to and including
    /// `to`: actual/365, each day at the rate of its half-year. The exact sum is rounded once,
    /// half away from zero, to the minor unit.
    pub fn late_interest(
        &self,
        ctx: &DebtorContext,
        principal: Money,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Money, LawError> {
        let mut numerator: i128 = 0;
        for period in self.interest_periods(ctx, from, to) {
            numerator += period?.numerator(principal);
        }
        Ok(Money::new(rounded_interest(numerator)?, principal.currency))
    }

    /// The yearly statutory late-interest rate (basis points) for the day `on`: the reference
    /// rate of its half-year plus the law's margin; `None` without a rule or a published rate.
    pub fn late_interest_rate_bp(&self, ctx: &DebtorContext, on: NaiveDate) -> Option<i64> {
        match self.interest_periods(ctx, on - Duration::days(1), on).pop()? {
            Ok(p) => Some(p.rate.rate_bp + p.margin_bp),
            Err(_) => None,
        }
    }

    /// The same interest, line by line as a claim shows it: one line per half-year with its
    /// rate, rule and source, each rounded to the minor unit (the claim's total is their sum).
    /// A half-year without a published rate (or rule) has no line; it is named in `missing`,
    /// so what is known is claimed and what is not is said.
    pub fn late_interest_lines(
        &self,
        ctx: &DebtorContext,
        principal: Money,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<InterestLines, LawError> {
        let mut out = InterestLines::default();
        for period in self.interest_periods(ctx, from, to) {
            match period {
                Ok(p) => out.lines.push(InterestLine {
                    first_day: p.first_day,
                    last_day: p.last_day,
                    days: p.days,
                    reference_bp: p.rate.rate_bp,
                    margin_bp: p.margin_bp,
                    amount: Money::new(rounded_interest(p.numerator(principal))?, principal.currency),
                    rule_id: p.rule.id.clone(),
                    citation: p.rule.citation.clone(),
                    rate_source: p.rate.source.clone(),
                }),
                Err(e) => out.missing.push(e),
            }
        }
        Ok(out)
    }
}

impl LawBook {
    /// Late interest at a rate agreed with the debtor (`agreed_bp` a year), line by line as
    /// [`LawBook::late_interest_lines`] gives the statutory one: one line per half-year, at the
    /// agreed rate where the law lets it be claimed, at the statutory rate where the law caps
    /// an agreed rate there and the agreed one is higher. Without a rule saying an agreed rate
    /// may be claimed from this debtor, nothing is claimed and the reason is in `missing`.
    pub fn agreed_interest_lines(
        &self,
        ctx: &DebtorContext,
        principal: Money,
        agreed_bp: i64,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<InterestLines, LawError> {
        let mut out = InterestLines::default();
        for (first, last, days) in half_years(from, to) {
            let Some(rule) = self.agreed_interest_rule(ctx, first) else {
                out.missing.push(LawError::NoAgreedInterestRule {
                    jurisdiction: ctx.jurisdiction,
                    kind: ctx.kind.code(),
                    on: first,
                });
                continue;
            };
            let capped = matches!(
                rule.limit,
                Limit::AgreedInterest {
                    at_most_statutory: true
                }
            );
            let line = |reference_bp: i64,
                        margin_bp: i64,
                        rule: &Rule,
                        rate_source: String|
             -> Result<InterestLine, LawError> {
                let numerator = i128::from(principal.minor) * i128::from(reference_bp + margin_bp) * i128::from(days);
                Ok(InterestLine {
                    first_day: first,
                    last_day: last,
                    days,
                    reference_bp,
                    margin_bp,
                    amount: Money::new(rounded_interest(numerator)?, principal.currency),
                    rule_id: rule.id.clone(),
                    citation: rule.citation.clone(),
                    rate_source,
                })
            };
            if !capped {
                out.lines
                    .push(line(0, agreed_bp, rule, "agreed with the debtor".to_owned())?);
                continue;
            }
            // The cap is the statutory rate of this half-year: where it is not known, neither
            // is what may be claimed.
            match self.interest_periods(ctx, first - Duration::days(1), last).pop() {
                Some(Ok(p)) if p.rate.rate_bp + p.margin_bp < agreed_bp => {
                    out.lines
                        .push(line(p.rate.rate_bp, p.margin_bp, p.rule, p.rate.source.clone())?)
                }
                Some(Ok(_)) => out
                    .lines
                    .push(line(0, agreed_bp, rule, "agreed with the debtor".to_owned())?),
                Some(Err(e)) => out.missing.push(e),
                None => {}
            }
        }
        Ok(out)
    }
}

/// The days after `from` up to and including `to`, one stretch per half-year: its first and
/// last day and how many days it has.
fn half_years(from: NaiveDate, to: NaiveDate) -> Vec<(NaiveDate, NaiveDate, i64)> {
    let mut stretches = Vec::new();
    let mut day = from;
    while day < to {
        let first = day + Duration::days(1);
        let last = HalfYear::of(first).last_day().min(to);
        stretches.push((first, last, (last - day).num_days()));
        day = last;
    }
    stretches
}

/// Days at one rule and rate.
struct InterestPeriod<'a> {
    first_day: NaiveDate,
    last_day: NaiveDate,
    days: i64,
    rate: &'a Rate,
    margin_bp: i64,
    rule: &'a Rule,
}

impl InterestPeriod<'_> {
    /// Interest in minor units times 365 × 10 000 (exact).
    fn numerator(&self, principal: Money) -> i128 {
        i128::from(principal.minor) * i128::from(self.rate.rate_bp + self.margin_bp) * i128::from(self.days)
    }
}

/// An exact interest numerator (see [`InterestPeriod::numerator`]) rounded half away from zero.
fn rounded_interest(numerator: i128) -> Result<i64, LawError> {
    let denominator: i128 = 365 * 10_000;
    let rounded = (numerator.abs() * 2 + denominator) / (2 * denominator) * numerator.signum();
    Ok(i64::try_from(rounded).map_err(|_| money::MoneyError::Overflow)?)
}

/// One half-year's late interest on a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterestLine {
    /// The first and last day that earn interest at this rate.
    pub first_day: NaiveDate,
    pub last_day: NaiveDate,
    pub days: i64,
    /// The published reference rate, and the law's margin on top, in basis points.
    pub reference_bp: i64,
    pub margin_bp: i64,
    pub amount: Money,
    pub rule_id: String,
    pub citation: String,
    /// Where the reference rate was published.
    pub rate_source: String,
}

impl InterestLine {
    pub fn rate_bp(&self) -> i64 {
        self.reference_bp + self.margin_bp
    }
}

/// Late interest as lines, and the half-years it could not be computed for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterestLines {
    pub lines: Vec<InterestLine>,
    pub missing: Vec<LawError>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn book() -> LawBook {
        LawBook::builtin().expect("the built-in law loads")
    }

    fn d(y: i32, m: u32, day: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, day).unwrap()
    }

    const TODAY: fn() -> NaiveDate = || NaiveDate::from_ymd_opt(2026, 11, 22).unwrap();

    fn ctx(j: Jurisdiction, kind: DebtorKind) -> DebtorContext {
        DebtorContext {
            jurisdiction: j,
            kind,
            fee_agreed_in_advance: false,
        }
    }

    fn step(
        name: &str,
        day: i32,
        kind: FeeStep,
        fee_minor: i64,
        currency: Currency,
        days_to_pay: Option<u32>,
    ) -> PlannedFeeStep {
        PlannedFeeStep {
            name: name.into(),
            days_after_due: day,
            step: kind,
            fee: Money::new(fee_minor, currency),
            days_to_pay,
        }
    }

    #[test]
    fn the_builtin_law_loads_and_every_rule_is_cited() {
        let b = book();
        assert!(b.rules().len() >= 25);
        for j in Jurisdiction::ALL {
            assert!(b.rules().iter().any(|r| r.jurisdiction == j), "{j} has rules");
        }
    }

    #[test]
    fn a_bad_rules_file_is_refused_with_the_rule_named() {
        let wrong_currency = BUILTIN_RULES.replacen("currency = \"DKK\"", "currency = \"SEK\"", 1);
        let err = LawBook::from_toml(&wrong_currency, BUILTIN_RATES).unwrap_err();
        assert_eq!(
            err,
            LawError::Invalid {
                id: "dk.reminder.max_fee".into(),
                problem: "amount in SEK, but DK law is in DKK".into()
            }
        );
        let duplicate = format!(
            "{BUILTIN_RATES}\n[[rate]]\nseries = \"fi.reference\"\nperiod = \"2026-H1\"\nrate_bp = 1\nsource = \"x\"\nverified = false\n"
        );
        assert!(matches!(
            LawBook::from_toml(BUILTIN_RULES, &duplicate),
            Err(LawError::Invalid { .. })
        ));
        assert!(matches!(
            LawBook::from_toml("not toml [", BUILTIN_RATES),
            Err(LawError::Unreadable(_))
        ));
    }

    #[test]
    fn danish_reminders_closer_than_ten_days_are_refused_in_plain_words() {
        // The example from the domain-core issue.
        let plan = [
            step("reminder-1", 3, FeeStep::Reminder, 10_000, Currency::DKK, Some(10)),
            step("reminder-2", 10, FeeStep::Reminder, 10_000, Currency::DKK, Some(10)),
        ];
        let v = book().check_plan(&ctx(Jurisdiction::DK, DebtorKind::Consumer), TODAY(), &plan);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(
            v[0].to_string(),
            "renteloven § 9 b stk. 2: fee-bearing reminders must be at least 10 days apart; 'reminder-2' comes 7 days after 'reminder-1'"
        );
    }

    #[test]
    fn danish_caps_fee_count_and_due_date() {
        let b = book();
        let c = ctx(Jurisdiction::DK, DebtorKind::Business);
        let plan = [
            step("early", 0, FeeStep::Reminder, 5_000, Currency::DKK, None),
            step("r1", 10, FeeStep::Reminder, 15_000, Currency::DKK, None),
            step("r2", 20, FeeStep::Reminder, 10_000, Currency::DKK, None),
            step("r3", 30, FeeStep::Reminder, 10_000, Currency::DKK, None),
        ];
        let ids: Vec<String> = b
            .check_plan(&c, TODAY(), &plan)
            .into_iter()
            .map(|v| v.rule_id)
            .collect();
        assert!(
            ids.contains(&"dk.reminder.after_due".into()),
            "fee on the due date: {ids:?}"
        );
        assert!(ids.contains(&"dk.reminder.max_fee".into()), "150 DKK > 100 DKK");
        assert!(ids.contains(&"dk.reminder.max_count".into()), "four fees > three");
        assert_eq!(
            b.max_fee(&c, FeeStep::Reminder, TODAY()),
            Some(Money::new(10_000, Currency::DKK))
        );
        assert_eq!(
            b.compensation(&c, TODAY()).map(|(m, _)| m),
            Some(Money::new(31_000, Currency::DKK))
        );
        assert_eq!(
            b.compensation(&ctx(Jurisdiction::DK, DebtorKind::Consumer), TODAY()),
            None,
            "business only"
        );
    }

    #[test]
    fn norway_fees_wait_fourteen_days_and_a_second_needs_a_missed_deadline() {
        let b = book();
        let c = ctx(Jurisdiction::NO, DebtorKind::Consumer);
        let too_early = [step("purring", 7, FeeStep::Reminder, 3_500, Currency::NOK, Some(14))];
        let v = b.check_plan(&c, TODAY(), &too_early);
        assert_eq!(
            v.iter().map(|v| v.rule_id.as_str()).collect::<Vec<_>>(),
            ["no.fee.after_due"]
        );
        assert!(v[0].to_string().starts_with("inkassoforskriften § 1-2: "));
        let lawful = [
            step("purring", 14, FeeStep::Reminder, 3_500, Currency::NOK, Some(14)),
            step(
                "inkassovarsel",
                29,
                FeeStep::CollectionWarning,
                3_500,
                Currency::NOK,
                Some(14),
            ),
        ];
        assert_eq!(b.check_plan(&c, TODAY(), &lawful), vec![]);
        let second_too_soon = [
            step("purring", 14, FeeStep::Reminder, 3_500, Currency::NOK, Some(14)),
            step(
                "inkassovarsel",
                21,
                FeeStep::CollectionWarning,
                3_500,
                Currency::NOK,
                Some(14),
            ),
        ];
        let ids: Vec<String> = b
            .check_plan(&c, TODAY(), &second_too_soon)
            .into_iter()
            .map(|v| v.rule_id)
            .collect();
        assert_eq!(ids, ["no.fee.second_needs_missed_deadline"]);
        let short_warning = [step(
            "inkassovarsel",
            20,
            FeeStep::CollectionWarning,
            0,
            Currency::NOK,
            Some(10),
        )];
        let ids: Vec<String> = b
            .check_plan(&c, TODAY(), &short_warning)
            .into_iter()
            .map(|v| v.rule_id)
            .collect();
        assert_eq!(ids, ["no.warning.days_to_pay"]);
    }

    #[test]
    fn sweden_needs_an_agreed_reminder_fee() {
        let b = book();
        let plan = [step("påminnelse", 10, FeeStep::Reminder, 6_000, Currency::SEK, None)];
        let mut c = ctx(Jurisdiction::SE, DebtorKind::Consumer);
        let v = b.check_plan(&c, TODAY(), &plan);
        assert_eq!(v.len(), 1);
        assert!(v[0].to_string().contains("no fee was agreed in advance"), "{}", v[0]);
        c.fee_agreed_in_advance = true;
        assert_eq!(b.check_plan(&c, TODAY(), &plan), vec![]);
        let over = [step("påminnelse", 10, FeeStep::Reminder, 6_100, Currency::SEK, None)];
        assert_eq!(b.check_plan(&c, TODAY(), &over).len(), 1);
    }

    #[test]
    fn finland_treats_consumers_and_businesses_differently() {
        let b = book();
        let plan = [
            step("muistutus-1", 14, FeeStep::Reminder, 500, Currency::EUR, None),
            step("muistutus-2", 25, FeeStep::Reminder, 500, Currency::EUR, None),
        ];
        let consumer: Vec<String> = b
            .check_plan(&ctx(Jurisdiction::FI, DebtorKind::Consumer), TODAY(), &plan)
            .into_iter()
            .map(|v| v.rule_id)
            .collect();
        assert_eq!(consumer, ["fi.consumer.reminder.spacing"], "11 days < 14 for consumers");
        assert_eq!(
            b.check_plan(&ctx(Jurisdiction::FI, DebtorKind::Business), TODAY(), &plan),
            vec![],
            "10 days suffice between businesses"
        );
        let wrong_currency = [step("muistutus-1", 14, FeeStep::Reminder, 500, Currency::SEK, None)];
        assert_eq!(
            b.check_plan(&ctx(Jurisdiction::FI, DebtorKind::Consumer), TODAY(), &wrong_currency)[0].rule_id,
            "fee.currency"
        );
    }

    #[test]
    fn earliest_next_fee_date_follows_spacing_and_caps() {
        let b = book();
        let c = ctx(Jurisdiction::DK, DebtorKind::Consumer);
        let due = d(2026, 3, 1);
        assert_eq!(
            b.earliest_fee_date(&c, FeeStep::Reminder, due, &[], TODAY()),
            Ok(d(2026, 3, 2))
        );
        assert_eq!(
            b.earliest_fee_date(&c, FeeStep::Reminder, due, &[d(2026, 3, 5)], TODAY()),
            Ok(d(2026, 3, 15))
        );
        let capped = b.earliest_fee_date(
            &c,
            FeeStep::Reminder,
            due,
            &[d(2026, 3, 5), d(2026, 3, 15), d(2026, 3, 25)],
            TODAY(),
        );
        assert!(
            capped
                .unwrap_err()
                .to_string()
                .starts_with("renteloven § 9 b stk. 2: fees may be charged on at most 3 reminders")
        );
        let no = ctx(Jurisdiction::NO, DebtorKind::Consumer);
        assert_eq!(
            b.earliest_fee_date(&no, FeeStep::Reminder, due, &[], TODAY()),
            Ok(d(2026, 3, 15))
        );
    }

    #[test]
    fn late_interest_is_exact_per_half_year_and_refuses_missing_rates() {
        let b = book();
        let se = ctx(Jurisdiction::SE, DebtorKind::Consumer);
        // 10 000,00 SEK for the 184 days of 2025 H2 at 2 % + 8 pp = 10 %:
        // 1 000 000 * 1000 bp * 184 / 3 650 000 = 50 410.958... -> 50 411 öre.
        let h2 = b
            .late_interest(
                &se,
                Money::new(1_000_000, Currency::SEK),
                d(2025, 6, 30),
                d(2025, 12, 31),
            )
            .unwrap();
        assert_eq!(h2, Money::new(50_411, Currency::SEK));
        // Across the half-year boundary: 31 days in 2025 H2 and 31 in 2026 H1, both 10 %.
        let across = b
            .late_interest(
                &se,
                Money::new(1_000_000, Currency::SEK),
                d(2025, 11, 30),
                d(2026, 1, 31),
            )
            .unwrap();
        assert_eq!(
            across,
            Money::new(16_986, Currency::SEK),
            "62 days: 1 000 000 * 1000 * 62 / 3 650 000 = 16 986.3"
        );
        let missing = b
            .late_interest(&se, Money::new(100, Currency::SEK), d(2026, 6, 1), d(2026, 7, 5))
            .unwrap_err();
        assert_eq!(
            missing.to_string(),
            "no se.riksbank_reference reference rate for 2026-H2: add it to the rates file (needed for SE late interest)"
        );
        let fi = b
            .late_interest(
                &ctx(Jurisdiction::FI, DebtorKind::Consumer),
                Money::new(36_500, Currency::EUR),
                d(2026, 1, 1),
                d(2026, 1, 11),
            )
            .unwrap();
        assert_eq!(
            fi,
            Money::new(95, Currency::EUR),
            "365.00 EUR * 9.5 % * 10/365 = 0.95 EUR"
        );
        let fi_b2b = b
            .late_interest(
                &ctx(Jurisdiction::FI, DebtorKind::Business),
                Money::new(36_500, Currency::EUR),
                d(2026, 1, 1),
                d(2026, 1, 11),
            )
            .unwrap();
        assert_eq!(fi_b2b, Money::new(105, Currency::EUR), "10.5 % between businesses");
        assert_eq!(
            b.late_interest(&se, Money::new(100, Currency::SEK), d(2026, 1, 5), d(2026, 1, 5))
                .unwrap()
                .minor,
            0
        );
    }

    #[test]
    fn half_years_parse_and_print() {
        assert_eq!(
            "2026-H2".parse::<HalfYear>(),
            Ok(HalfYear {
                year: 2026,
                second: true
            })
        );
        assert!("2026-H3".parse::<HalfYear>().is_err());
        assert_eq!(HalfYear::of(d(2026, 7, 1)).to_string(), "2026-H2");
        assert_eq!(HalfYear::of(d(2026, 6, 30)).to_string(), "2026-H1");
    }

    fn arb_plan(currency: Currency) -> impl Strategy<Value = Vec<PlannedFeeStep>> {
        proptest::collection::vec(
            (0i32..60, 0usize..2, 0i64..20_000, proptest::option::of(0u32..30)),
            1..6,
        )
        .prop_map(move |raw| {
            raw.into_iter()
                .enumerate()
                .map(|(i, (day, k, fee, pay))| {
                    step(
                        &format!("s{i}"),
                        day,
                        [FeeStep::Reminder, FeeStep::CollectionWarning][k],
                        fee,
                        currency,
                        pay,
                    )
                })
                .collect()
        })
    }

    proptest! {
        /// Whatever the checker accepts stays inside the statutes' numbers, written out here
        /// independently of the data file.
        #[test]
        fn no_plan_the_checker_accepts_breaks_a_danish_cap(plan in arb_plan(Currency::DKK)) {
            let c = ctx(Jurisdiction::DK, DebtorKind::Consumer);
            if book().check_plan(&c, TODAY(), &plan).is_empty() {
                let mut fees: Vec<&PlannedFeeStep> = plan.iter().filter(|s| s.step == FeeStep::Reminder && s.fee.minor > 0).collect();
                fees.sort_by_key(|s| s.days_after_due);
                prop_assert!(fees.len() <= 3);
                prop_assert!(fees.iter().all(|s| s.fee.minor <= 10_000 && s.days_after_due >= 1));
                prop_assert!(fees.windows(2).all(|w| w[1].days_after_due - w[0].days_after_due >= 10));
                prop_assert!(plan.iter().filter(|s| s.step == FeeStep::CollectionWarning).all(|s| s.days_to_pay.unwrap_or(0) >= 10));
            }
        }

        #[test]
        fn no_plan_the_checker_accepts_breaks_a_norwegian_cap(plan in arb_plan(Currency::NOK)) {
            let c = ctx(Jurisdiction::NO, DebtorKind::Consumer);
            if book().check_plan(&c, TODAY(), &plan).is_empty() {
                let mut fees: Vec<&PlannedFeeStep> = plan.iter().filter(|s| s.fee.minor > 0).collect();
                fees.sort_by_key(|s| s.days_after_due);
                prop_assert!(fees.len() <= 2);
                prop_assert!(fees.iter().all(|s| s.fee.minor <= 3_500 && s.days_after_due >= 14));
                if let [a, b] = fees.as_slice() {
                    let deadline = a.days_to_pay.unwrap_or(0) as i32;
                    prop_assert!(deadline >= 14 && b.days_after_due > a.days_after_due + deadline);
                }
            }
        }

        #[test]
        fn interest_is_additive_over_adjacent_periods(principal in 0i64..100_000_000, a in 0i64..150, b in 0i64..150) {
            let c = ctx(Jurisdiction::SE, DebtorKind::Consumer);
            let start = d(2025, 7, 1);
            let mid = start + Duration::days(a);
            let end = mid + Duration::days(b);
            prop_assume!(end <= d(2026, 6, 30));
            let bk = book();
            let p = Money::new(principal, Currency::SEK);
            let whole = bk.late_interest(&c, p, start, end).unwrap().minor;
            let parts = bk.late_interest(&c, p, start, mid).unwrap().minor + bk.late_interest(&c, p, mid, end).unwrap().minor;
            prop_assert!((whole - parts).abs() <= 1, "rounding once per call moves at most one unit");
        }
    }
}
