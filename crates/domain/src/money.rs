//! Money as integer minor units plus an ISO 4217 currency. Never floating point.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use crate::locale::Locale;

/// Currencies Forfall handles, with their ISO 4217 minor-unit exponent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Currency {
    DKK,
    NOK,
    SEK,
    EUR,
}

impl Currency {
    pub const ALL: [Currency; 4] = [Currency::DKK, Currency::NOK, Currency::SEK, Currency::EUR];

    pub fn code(self) -> &'static str {
        match self {
            Currency::DKK => "DKK",
            Currency::NOK => "NOK",
            Currency::SEK => "SEK",
            Currency::EUR => "EUR",
        }
    }

    /// Number of decimal places of the minor unit (ISO 4217).
    pub fn exponent(self) -> u32 {
        2
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("unknown currency '{0}': expected one of DKK, NOK, SEK, EUR")]
    UnknownCurrency(String),
    #[error("currency mismatch: cannot combine {left} with {right}")]
    CurrencyMismatch { left: Currency, right: Currency },
    #[error("amount overflow")]
    Overflow,
    #[error("nothing to allocate to: no parts, or all weights are zero")]
    NothingToAllocateTo,
    #[error("amount must not be negative, got {0}")]
    Negative(Money),
    #[error("'{text}' is not an amount: {why}")]
    Unparseable { text: String, why: String },
}

impl FromStr for Currency {
    type Err = MoneyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Currency::ALL
            .into_iter()
            .find(|c| c.code() == s)
            .ok_or_else(|| MoneyError::UnknownCurrency(s.to_owned()))
    }
}

/// An amount in minor units of one currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Money {
    pub minor: i64,
    pub currency: Currency,
}

impl Money {
    pub fn new(minor: i64, currency: Currency) -> Self {
        Self { minor, currency }
    }

    pub fn zero(currency: Currency) -> Self {
        Self::new(0, currency)
    }

    fn same_currency(self, other: Money) -> Result<(), MoneyError> {
        if self.currency == other.currency {
            Ok(())
        } else {
            Err(MoneyError::CurrencyMismatch {
                left: self.currency,
                right: other.currency,
            })
        }
    }

    pub fn checked_add(self, other: Money) -> Result<Money, MoneyError> {
        self.same_currency(other)?;
        let minor = self.minor.checked_add(other.minor).ok_or(MoneyError::Overflow)?;
        Ok(Money::new(minor, self.currency))
    }

    pub fn checked_sub(self, other: Money) -> Result<Money, MoneyError> {
        self.same_currency(other)?;
        let minor = self.minor.checked_sub(other.minor).ok_or(MoneyError::Overflow)?;
        Ok(Money::new(minor, self.currency))
    }

    /// Compares two amounts of the same currency; a mismatch is an error, not an ordering.
    pub fn try_cmp(self, other: Money) -> Result<std::cmp::Ordering, MoneyError> {
        self.same_currency(other)?;
        Ok(self.minor.cmp(&other.minor))
    }

    pub fn is_positive(self) -> bool {
        self.minor > 0
    }
}

/// Plain, locale-neutral rendering ("1234.50 DKK"); locale formatting belongs to the templates.
impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scale = 10i64.pow(self.currency.exponent());
        let sign = if self.minor < 0 { "-" } else { "" };
        let abs = self.minor.unsigned_abs();
        let scale = scale as u64;
        write!(
            f,
            "{sign}{}.{:0width$} {}",
            abs / scale,
            abs % scale,
            self.currency,
            width = self.currency.exponent() as usize
        )
    }
}

/// Splits `total` into parts proportional to `weights` without creating or losing a minor unit
/// (largest-remainder method; ties go to the earlier part, so the result is deterministic).
pub fn allocate(total: Money, weights: &[u64]) -> Result<Vec<Money>, MoneyError> {
    let weight_sum: u128 = weights.iter().map(|w| u128::from(*w)).sum();
    if weights.is_empty() || weight_sum == 0 {
        return Err(MoneyError::NothingToAllocateTo);
    }
    let sign: i128 = if total.minor < 0 { -1 } else { 1 };
    let abs = i128::from(total.minor).abs();
    let mut parts: Vec<i128> = Vec::with_capacity(weights.len());
    let mut remainders: Vec<(u128, usize)> = Vec::with_capacity(weights.len());
    for (i, w) in weights.iter().enumerate() {
        let exact = abs * i128::from(*w);
        let w_sum = i128::try_from(weight_sum).map_err(|_| MoneyError::Overflow)?;
        parts.push(exact / w_sum);
        remainders.push(((exact % w_sum) as u128, i));
    }
    let mut left = abs - parts.iter().sum::<i128>();
    // Largest remainder first; on equal remainders the earlier part wins.
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (_, i) in remainders {
        if left == 0 {
            break;
        }
        parts[i] += 1;
        left -= 1;
    }
    parts
        .into_iter()
        .map(|p| {
            i64::try_from(sign * p)
                .map(|m| Money::new(m, total.currency))
                .map_err(|_| MoneyError::Overflow)
        })
        .collect()
}

/// `n` instalments as equal as possible; the first ones carry the extra minor units, so the
/// debtor never pays more later than earlier.
pub fn split_even(total: Money, n: usize) -> Result<Vec<Money>, MoneyError> {
    allocate(total, &vec![1; n])
}

/// Applies `payment` to `open` amounts in the given order (oldest due first, as the caller
/// sorts them): each gets at most what it owes. Returns what each received and what is left
/// over (an overpayment).
pub fn allocate_in_order(payment: Money, open: &[Money]) -> Result<(Vec<Money>, Money), MoneyError> {
    if payment.minor < 0 {
        return Err(MoneyError::Negative(payment));
    }
    let mut left = payment;
    let mut applied = Vec::with_capacity(open.len());
    for owed in open {
        payment.same_currency(*owed)?;
        let take = left.minor.min(owed.minor.max(0));
        applied.push(Money::new(take, payment.currency));
        left = Money::new(left.minor - take, payment.currency);
    }
    Ok((applied, left))
}

/// Where the currency sign goes and what it is, as each locale writes its own currency; other
/// currencies are written with their ISO code after the number.
fn sign(locale: Locale, currency: Currency) -> (bool, &'static str) {
    match (locale, currency) {
        (Locale::DaDk, Currency::DKK) => (false, "kr."),
        (Locale::NbNo, Currency::NOK) => (true, "kr"),
        (Locale::SvSe, Currency::SEK) => (false, "kr"),
        (_, Currency::EUR) if locale != Locale::En => (false, "€"),
        (Locale::En, Currency::EUR) => (true, "€"),
        (Locale::En, c) => (true, c.code()),
        (_, c) => (false, c.code()),
    }
}

fn grouped(mut n: u64, group: char) -> String {
    let mut chunks = Vec::new();
    loop {
        if n < 1000 {
            chunks.push(n.to_string());
            break;
        }
        chunks.push(format!("{:03}", n % 1000));
        n /= 1000;
    }
    chunks.reverse();
    chunks.join(&group.to_string())
}

/// Formats an amount for a debtor: `1.234,50 kr.` (da-DK), `kr 1 234,50` (nb-NO),
/// `1 234,50 kr` (sv-SE), `1 234,50 €` (fi-FI), `DKK 1,234.50` (en), with no-break spaces.
pub fn format(money: Money, locale: Locale) -> String {
    let (group, decimal) = locale.separators();
    let scale = 10u64.pow(money.currency.exponent());
    let abs = money.minor.unsigned_abs();
    let number = format!(
        "{}{}{decimal}{:0width$}",
        if money.minor < 0 { "-" } else { "" },
        grouped(abs / scale, group),
        abs % scale,
        width = money.currency.exponent() as usize
    );
    match sign(locale, money.currency) {
        (true, s) if locale == Locale::En && s == "€" => format!("{s}{number}"),
        (true, s) => format!("{s}\u{a0}{number}"),
        (false, s) => format!("{number}\u{a0}{s}"),
    }
}

/// Parses an amount as a person in `locale` writes it, with or without the currency sign or
/// grouping: `1.234,50 kr.`, `1234,5`, `kr 1 234,50`, `1 234,50 €`, `DKK 1,234.50`.
pub fn parse(text: &str, locale: Locale, currency: Currency) -> Result<Money, MoneyError> {
    let (group, decimal) = locale.separators();
    let (_, sign_text) = sign(locale, currency);
    let mut t = text.trim().to_owned();
    for s in [sign_text, currency.code(), "kr.", "kr", "€"] {
        t = t.replace(s, "");
    }
    let t: String = t
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '\u{a0}' && *c != group)
        .collect();
    let err = |why: &str| MoneyError::Unparseable {
        text: text.to_owned(),
        why: why.to_owned(),
    };
    let (negative, t) = match t.strip_prefix('-') {
        Some(rest) => (true, rest.to_owned()),
        None => (false, t),
    };
    let (whole, fraction) = match t.split_once(decimal) {
        Some((w, f)) => (w.to_owned(), f.to_owned()),
        None => (t.clone(), String::new()),
    };
    if whole.is_empty() || !whole.chars().all(|c| c.is_ascii_digit()) {
        return Err(err("expected digits before the decimal separator"));
    }
    let exp = currency.exponent() as usize;
    if fraction.len() > exp || !fraction.chars().all(|c| c.is_ascii_digit()) {
        return Err(err(&format!("at most {exp} decimals, digits only")));
    }
    let whole: i64 = whole.parse().map_err(|_| err("amount too large"))?;
    let fraction: i64 = if fraction.is_empty() {
        0
    } else {
        format!("{fraction:0<exp$}").parse().map_err(|_| err("bad decimals"))?
    };
    let minor = whole
        .checked_mul(10i64.pow(exp as u32))
        .and_then(|w| w.checked_add(fraction))
        .ok_or_else(|| err("amount too large"))?;
    Ok(Money::new(if negative { -minor } else { minor }, currency))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_known_currencies_and_refuses_others() {
        assert_eq!("NOK".parse::<Currency>(), Ok(Currency::NOK));
        assert_eq!(
            "XYZ".parse::<Currency>(),
            Err(MoneyError::UnknownCurrency("XYZ".into()))
        );
        assert!("dkk".parse::<Currency>().is_err(), "codes are upper case by ISO 4217");
    }

    #[test]
    fn mixing_currencies_is_an_error() {
        let a = Money::new(100, Currency::DKK);
        let b = Money::new(100, Currency::SEK);
        assert_eq!(
            a.checked_add(b),
            Err(MoneyError::CurrencyMismatch {
                left: Currency::DKK,
                right: Currency::SEK
            })
        );
        assert!(a.try_cmp(b).is_err());
    }

    #[test]
    fn displays_minor_units_exactly() {
        assert_eq!(Money::new(123450, Currency::DKK).to_string(), "1234.50 DKK");
        assert_eq!(Money::new(-5, Currency::EUR).to_string(), "-0.05 EUR");
    }

    #[test]
    fn formats_as_each_locale_writes_its_currency() {
        let m = Money::new(123_450, Currency::DKK);
        assert_eq!(format(m, Locale::DaDk), "1.234,50\u{a0}kr.");
        assert_eq!(
            format(Money::new(123_450, Currency::NOK), Locale::NbNo),
            "kr\u{a0}1\u{a0}234,50"
        );
        assert_eq!(
            format(Money::new(123_450, Currency::SEK), Locale::SvSe),
            "1\u{a0}234,50\u{a0}kr"
        );
        assert_eq!(
            format(Money::new(123_450, Currency::EUR), Locale::FiFi),
            "1\u{a0}234,50\u{a0}€"
        );
        assert_eq!(format(m, Locale::En), "DKK\u{a0}1,234.50");
        assert_eq!(format(Money::new(99, Currency::EUR), Locale::En), "€0.99");
        assert_eq!(
            format(Money::new(100_000_000, Currency::SEK), Locale::DaDk),
            "1.000.000,00\u{a0}SEK"
        );
        assert_eq!(format(Money::new(-5, Currency::DKK), Locale::DaDk), "-0,05\u{a0}kr.");
    }

    #[test]
    fn parses_what_people_write() {
        assert_eq!(
            parse("1.234,50 kr.", Locale::DaDk, Currency::DKK),
            Ok(Money::new(123_450, Currency::DKK))
        );
        assert_eq!(
            parse("kr 1 234,5", Locale::NbNo, Currency::NOK),
            Ok(Money::new(123_450, Currency::NOK))
        );
        assert_eq!(
            parse("1234", Locale::SvSe, Currency::SEK),
            Ok(Money::new(123_400, Currency::SEK))
        );
        assert_eq!(
            parse("DKK 1,234.50", Locale::En, Currency::DKK),
            Ok(Money::new(123_450, Currency::DKK))
        );
        assert!(
            matches!(
                parse("12,345", Locale::DaDk, Currency::DKK),
                Err(MoneyError::Unparseable { .. })
            ),
            "three decimals"
        );
        assert!(matches!(
            parse("abc", Locale::FiFi, Currency::EUR),
            Err(MoneyError::Unparseable { .. })
        ));
    }

    #[test]
    fn splits_instalments_with_the_extra_units_first() {
        let parts = split_even(Money::new(1000, Currency::DKK), 3).unwrap();
        assert_eq!(parts.iter().map(|m| m.minor).collect::<Vec<_>>(), vec![334, 333, 333]);
        assert_eq!(
            allocate(Money::new(100, Currency::EUR), &[0, 0]),
            Err(MoneyError::NothingToAllocateTo)
        );
    }

    #[test]
    fn payments_go_oldest_first_and_the_rest_is_an_overpayment() {
        let open = [Money::new(500, Currency::NOK), Money::new(300, Currency::NOK)];
        let (applied, left) = allocate_in_order(Money::new(600, Currency::NOK), &open).unwrap();
        assert_eq!(
            applied,
            vec![Money::new(500, Currency::NOK), Money::new(100, Currency::NOK)]
        );
        assert_eq!(left.minor, 0);
        let (_, left) = allocate_in_order(Money::new(900, Currency::NOK), &open).unwrap();
        assert_eq!(left.minor, 100);
        assert!(
            allocate_in_order(Money::new(1, Currency::SEK), &open).is_err(),
            "currency mismatch"
        );
    }

    proptest! {
        #[test]
        fn allocation_conserves_money_and_is_fair(total in -10_000_000_000i64..10_000_000_000, weights in proptest::collection::vec(0u64..1_000_000, 1..20)) {
            prop_assume!(weights.iter().any(|w| *w > 0));
            let parts = allocate(Money::new(total, Currency::DKK), &weights).unwrap();
            prop_assert_eq!(parts.iter().map(|p| p.minor).sum::<i64>(), total);
            // Each part is within one minor unit of its exact share total * w / sum, checked in
            // integers: |part * sum - total * w| < sum.
            let sum: i128 = weights.iter().map(|w| i128::from(*w)).sum();
            for (p, w) in parts.iter().zip(&weights) {
                let error = (i128::from(p.minor) * sum - i128::from(total) * i128::from(*w)).abs();
                prop_assert!(error < sum, "part {} of weight {} out of {}", p.minor, w, sum);
            }
        }

        #[test]
        fn a_payment_is_never_allocated_twice(payment in 0i64..1_000_000, owed in proptest::collection::vec(0i64..500_000, 0..10)) {
            let open: Vec<Money> = owed.iter().map(|m| Money::new(*m, Currency::SEK)).collect();
            let (applied, left) = allocate_in_order(Money::new(payment, Currency::SEK), &open).unwrap();
            prop_assert_eq!(applied.iter().map(|m| m.minor).sum::<i64>() + left.minor, payment);
            for (a, o) in applied.iter().zip(&open) {
                prop_assert!(a.minor >= 0 && a.minor <= o.minor);
            }
        }

        #[test]
        fn format_then_parse_round_trips(minor in -1_000_000_000_000i64..1_000_000_000_000, l in 0usize..5, c in 0usize..4) {
            let m = Money::new(minor, Currency::ALL[c]);
            let locale = Locale::ALL[l];
            prop_assert_eq!(parse(&format(m, locale), locale, m.currency), Ok(m));
        }

        #[test]
        fn add_then_sub_is_identity(a in -1_000_000_000i64..1_000_000_000, b in -1_000_000_000i64..1_000_000_000) {
            let x = Money::new(a, Currency::NOK);
            let y = Money::new(b, Currency::NOK);
            prop_assert_eq!(x.checked_add(y).unwrap().checked_sub(y).unwrap(), x);
        }
    }
}
