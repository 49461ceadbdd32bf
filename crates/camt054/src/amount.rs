//! Exact decimal amounts: ISO 20022 writes amounts as xsd:decimal text, and a payment matched
//! against an invoice must compare to the øre/cent, so the text is read digit by digit into
//! integer minor units and never goes through a float.

/// Why an amount's text was refused. The caller adds the element path and line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AmountError {
    NotAnAmount,
    Negative,
    Zero,
    TooManyDecimals { found: usize },
    TooLarge,
}

/// Reads `text` (already trimmed) as a positive amount with at most `exponent` decimals and
/// returns it in minor units.
///
/// Decimals beyond the currency's exponent are refused even when they are zeros, because a bank
/// that writes "100.000 NOK" is not following the currency's rules and the file deserves a
/// human look rather than a silent guess.
pub(crate) fn parse_minor(text: &str, exponent: u32) -> Result<i64, AmountError> {
    let (negative, unsigned) = if let Some(rest) = text.strip_prefix('-') {
        (true, rest)
    } else {
        (false, text.strip_prefix('+').unwrap_or(text))
    };
    let (whole, fraction) = match unsigned.split_once('.') {
        Some((whole, fraction)) => (whole, fraction),
        None => (unsigned, ""),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    // xsd:decimal allows "5." and ".5" but needs at least one digit somewhere.
    if (whole.is_empty() && fraction.is_empty()) || !all_digits(whole) || !all_digits(fraction) {
        return Err(AmountError::NotAnAmount);
    }
    let is_zero = whole.bytes().chain(fraction.bytes()).all(|b| b == b'0');
    if negative && !is_zero {
        return Err(AmountError::Negative);
    }
    if fraction.len() > exponent as usize {
        return Err(AmountError::TooManyDecimals { found: fraction.len() });
    }
    if is_zero {
        return Err(AmountError::Zero);
    }
    let mut minor: i64 = 0;
    let padding = std::iter::repeat_n(b'0', exponent as usize - fraction.len());
    for digit in whole.bytes().chain(fraction.bytes()).chain(padding) {
        minor = minor
            .checked_mul(10)
            .and_then(|m| m.checked_add(i64::from(digit - b'0')))
            .ok_or(AmountError::TooLarge)?;
    }
    Ok(minor)
}

/// Writes minor units back as a decimal string, for messages that quote a computed amount.
pub(crate) fn format_minor(minor: i64, exponent: u32) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let digits = minor.unsigned_abs().to_string();
    let exponent = exponent as usize;
    if exponent == 0 {
        return format!("{sign}{digits}");
    }
    let padded = format!("{digits:0>width$}", width = exponent + 1);
    let (whole, fraction) = padded.split_at(padded.len() - exponent);
    format!("{sign}{whole}.{fraction}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_exact_minor_units() {
        assert_eq!(parse_minor("1500.00", 2), Ok(150_000));
        assert_eq!(parse_minor("1500.5", 2), Ok(150_050));
        assert_eq!(parse_minor("1500", 2), Ok(150_000));
        assert_eq!(parse_minor("0.01", 2), Ok(1));
        assert_eq!(parse_minor(".5", 2), Ok(50));
        assert_eq!(parse_minor("7.", 2), Ok(700));
        assert_eq!(parse_minor("+12.34", 2), Ok(1234));
        assert_eq!(parse_minor("000123.40", 2), Ok(12_340));
        assert_eq!(parse_minor("9999999999999999.99", 2), Ok(999_999_999_999_999_999));
    }

    #[test]
    fn refuses_what_is_not_an_exact_positive_amount() {
        assert_eq!(parse_minor("abc", 2), Err(AmountError::NotAnAmount));
        assert_eq!(parse_minor("", 2), Err(AmountError::NotAnAmount));
        assert_eq!(parse_minor(".", 2), Err(AmountError::NotAnAmount));
        assert_eq!(parse_minor("1,50", 2), Err(AmountError::NotAnAmount));
        assert_eq!(parse_minor("1.5e3", 2), Err(AmountError::NotAnAmount));
        assert_eq!(parse_minor("1 000.00", 2), Err(AmountError::NotAnAmount));
        assert_eq!(parse_minor("--1", 2), Err(AmountError::NotAnAmount));
        assert_eq!(parse_minor("-1.00", 2), Err(AmountError::Negative));
        assert_eq!(parse_minor("0.00", 2), Err(AmountError::Zero));
        assert_eq!(parse_minor("-0", 2), Err(AmountError::Zero));
        assert_eq!(parse_minor("1.005", 2), Err(AmountError::TooManyDecimals { found: 3 }));
        assert_eq!(parse_minor("1.000", 2), Err(AmountError::TooManyDecimals { found: 3 }));
        assert_eq!(parse_minor("99999999999999999999", 2), Err(AmountError::TooLarge));
    }

    #[test]
    fn formats_minor_units() {
        assert_eq!(format_minor(150_050, 2), "1500.50");
        assert_eq!(format_minor(5, 2), "0.05");
        assert_eq!(format_minor(-5, 2), "-0.05");
        assert_eq!(format_minor(42, 0), "42");
    }
}
