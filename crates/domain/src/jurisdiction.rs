//! The four Nordic jurisdictions: their calendars' time zones and default currencies.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::money::Currency;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Jurisdiction {
    DK,
    NO,
    SE,
    FI,
}

impl Jurisdiction {
    pub const ALL: [Jurisdiction; 4] = [Jurisdiction::DK, Jurisdiction::NO, Jurisdiction::SE, Jurisdiction::FI];

    pub fn code(self) -> &'static str {
        match self {
            Jurisdiction::DK => "DK",
            Jurisdiction::NO => "NO",
            Jurisdiction::SE => "SE",
            Jurisdiction::FI => "FI",
        }
    }

    /// The debtor's local calendar: rules and contact hours are applied in this zone.
    pub fn time_zone(self) -> Tz {
        match self {
            Jurisdiction::DK => chrono_tz::Europe::Copenhagen,
            Jurisdiction::NO => chrono_tz::Europe::Oslo,
            Jurisdiction::SE => chrono_tz::Europe::Stockholm,
            Jurisdiction::FI => chrono_tz::Europe::Helsinki,
        }
    }

    /// The debtor's calendar day at the instant `at`.
    pub fn local_day(self, at: DateTime<Utc>) -> NaiveDate {
        at.with_timezone(&self.time_zone()).date_naive()
    }

    pub fn home_currency(self) -> Currency {
        match self {
            Jurisdiction::DK => Currency::DKK,
            Jurisdiction::NO => Currency::NOK,
            Jurisdiction::SE => Currency::SEK,
            Jurisdiction::FI => Currency::EUR,
        }
    }
}

impl fmt::Display for Jurisdiction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown jurisdiction '{0}': expected DK, NO, SE or FI")]
pub struct UnknownJurisdiction(pub String);

impl FromStr for Jurisdiction {
    type Err = UnknownJurisdiction;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Jurisdiction::ALL
            .into_iter()
            .find(|j| j.code() == s)
            .ok_or_else(|| UnknownJurisdiction(s.to_owned()))
    }
}

/// Consumer and business debtors are treated differently by every Nordic statute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DebtorKind {
    Consumer,
    Business,
}

impl DebtorKind {
    pub fn code(self) -> &'static str {
        match self {
            DebtorKind::Consumer => "consumer",
            DebtorKind::Business => "business",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown debtor kind '{0}': expected consumer or business")]
pub struct UnknownDebtorKind(pub String);

impl FromStr for DebtorKind {
    type Err = UnknownDebtorKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "consumer" => Ok(DebtorKind::Consumer),
            "business" => Ok(DebtorKind::Business),
            other => Err(UnknownDebtorKind(other.to_owned())),
        }
    }
}
