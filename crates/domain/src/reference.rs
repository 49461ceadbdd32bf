//! Payment references as printed on invoices and quoted by banks.
//!
//! Banks and payers quote references with spaces, lower-case letters and the "+71<" style
//! prefixes of Danish FIK lines; matching compares the normalised form.

/// Strips whitespace and separators and upper-cases, so that "RF18 5390 0754 7034" and
/// "rf18539007547034" compare equal.
pub fn normalise(reference: &str) -> String {
    reference
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_spacing_and_case() {
        assert_eq!(normalise("RF18 5390 0754 7034"), "RF18539007547034");
        assert_eq!(normalise(" rf18-5390.0754 7034 "), "RF18539007547034");
    }
}
