//! Money as integer minor units plus an ISO 4217 currency. Never floating point.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

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

    proptest! {
        #[test]
        fn add_then_sub_is_identity(a in -1_000_000_000i64..1_000_000_000, b in -1_000_000_000i64..1_000_000_000) {
            let x = Money::new(a, Currency::NOK);
            let y = Money::new(b, Currency::NOK);
            prop_assert_eq!(x.checked_add(y).unwrap().checked_sub(y).unwrap(), x);
        }
    }
}
