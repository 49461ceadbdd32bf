//! The locales Forfall writes to debtors in, and how each writes dates.

use chrono::{Datelike, NaiveDate};
use serde::{Deserialize, Serialize};

/// Locales Forfall writes to debtors in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Locale {
    DaDk,
    NbNo,
    SvSe,
    FiFi,
    En,
}

impl Locale {
    pub const ALL: [Locale; 5] = [Locale::DaDk, Locale::NbNo, Locale::SvSe, Locale::FiFi, Locale::En];

    /// From a language code as carried on invoices (`da`, `nb`, `sv`, `fi`, `en`) or a locale tag.
    pub fn from_language(language: &str) -> Locale {
        match language
            .split(['-', '_'])
            .next()
            .unwrap_or("")
            .to_ascii_lowercase()
            .as_str()
        {
            "da" => Locale::DaDk,
            "nb" | "no" | "nn" => Locale::NbNo,
            "sv" => Locale::SvSe,
            "fi" => Locale::FiFi,
            _ => Locale::En,
        }
    }

    /// (group separator, decimal separator). The Nordic groupings use a no-break space so a
    /// number never wraps across lines (CLDR).
    pub fn separators(self) -> (char, char) {
        match self {
            Locale::DaDk => ('.', ','),
            Locale::NbNo | Locale::SvSe | Locale::FiFi => ('\u{a0}', ','),
            Locale::En => (',', '.'),
        }
    }
}

/// A date as each locale writes it in running text: `12.03.2026` (da, nb), `2026-03-12` (sv),
/// `12.3.2026` (fi), `12 March 2026` (en).
pub fn format_date(date: NaiveDate, locale: Locale) -> String {
    match locale {
        Locale::DaDk | Locale::NbNo => date.format("%d.%m.%Y").to_string(),
        Locale::SvSe => date.format("%Y-%m-%d").to_string(),
        Locale::FiFi => format!("{}.{}.{}", date.day(), date.month(), date.year()),
        Locale::En => date.format("%-d %B %Y").to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_as_each_locale_writes_them() {
        let d = NaiveDate::from_ymd_opt(2026, 3, 5).unwrap();
        assert_eq!(format_date(d, Locale::DaDk), "05.03.2026");
        assert_eq!(format_date(d, Locale::NbNo), "05.03.2026");
        assert_eq!(format_date(d, Locale::SvSe), "2026-03-05");
        assert_eq!(format_date(d, Locale::FiFi), "5.3.2026");
        assert_eq!(format_date(d, Locale::En), "5 March 2026");
    }

    #[test]
    fn language_codes_map_to_locales() {
        assert_eq!(Locale::from_language("da"), Locale::DaDk);
        assert_eq!(Locale::from_language("nb-NO"), Locale::NbNo);
        assert_eq!(Locale::from_language("no"), Locale::NbNo);
        assert_eq!(Locale::from_language("sv_SE"), Locale::SvSe);
        assert_eq!(Locale::from_language("xx"), Locale::En);
    }
}
