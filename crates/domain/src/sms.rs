//! How long an SMS really is. Texts in the GSM 03.38 7-bit alphabet take 160 characters in one
//! message, or 153 per part when concatenated (the user data header takes 7); the extension
//! characters (`^{}\[~]|€`) take two septets each. Any other character forces UCS-2: 70 UTF-16
//! units in one message, 67 per part. (3GPP TS 23.038 for the alphabet, TS 23.040 for
//! concatenation.)

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SmsEncoding {
    Gsm7,
    Ucs2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmsLength {
    pub encoding: SmsEncoding,
    /// Septets for GSM-7, UTF-16 code units for UCS-2.
    pub units: usize,
    pub segments: usize,
}

/// The GSM 03.38 default alphabet (basic table), as Unicode.
const GSM7_BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\u{1b}ÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";
/// Characters of the extension table: each is sent as escape + character (two septets).
const GSM7_EXTENSION: &str = "\u{c}^{}\\[~]|€";

fn gsm7_septets(c: char) -> Option<usize> {
    if GSM7_BASIC.contains(c) {
        Some(1)
    } else if GSM7_EXTENSION.contains(c) {
        Some(2)
    } else {
        None
    }
}

/// The encoding, length and number of segments a text needs.
pub fn length(text: &str) -> SmsLength {
    let septets: Option<usize> = text.chars().map(gsm7_septets).sum();
    let (encoding, units, single, part) = match septets {
        Some(n) => (SmsEncoding::Gsm7, n, 160, 153),
        None => (SmsEncoding::Ucs2, text.encode_utf16().count(), 70, 67),
    };
    let segments = if units <= single { 1 } else { units.div_ceil(part) };
    SmsLength {
        encoding,
        units,
        segments,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn nordic_letters_are_in_the_gsm_alphabet_but_some_are_not() {
        // Æ Ø Å æ ø å Ä Ö ä ö are in the basic table: Danish, Norwegian, Swedish and Finnish
        // texts usually stay 7-bit. "õ" (Estonian) and "š" are not.
        assert_eq!(
            length("Hej Søren, din regning på 499,00 kr. forfalder i dag.").encoding,
            SmsEncoding::Gsm7
        );
        assert_eq!(
            length("Hei! Påminnelse: faktura förfaller idag, ÄÖ äö").encoding,
            SmsEncoding::Gsm7
        );
        assert_eq!(length("Tere, arve õigus").encoding, SmsEncoding::Ucs2);
    }

    #[test]
    fn lengths_and_segments_follow_the_3gpp_limits() {
        assert_eq!(
            length(&"a".repeat(160)),
            SmsLength {
                encoding: SmsEncoding::Gsm7,
                units: 160,
                segments: 1
            }
        );
        assert_eq!(
            length(&"a".repeat(161)),
            SmsLength {
                encoding: SmsEncoding::Gsm7,
                units: 161,
                segments: 2
            }
        );
        assert_eq!(length(&"a".repeat(306)).segments, 2, "2 x 153");
        assert_eq!(length(&"a".repeat(307)).segments, 3);
        // The euro sign is an extension character: two septets.
        assert_eq!(
            length(&"€".repeat(80)),
            SmsLength {
                encoding: SmsEncoding::Gsm7,
                units: 160,
                segments: 1
            }
        );
        assert_eq!(length(&"€".repeat(81)).segments, 2);
        assert_eq!(
            length(&"š".repeat(70)),
            SmsLength {
                encoding: SmsEncoding::Ucs2,
                units: 70,
                segments: 1
            }
        );
        assert_eq!(length(&"š".repeat(71)).segments, 2);
        assert_eq!(length(&"š".repeat(134)).segments, 2, "2 x 67");
        // An emoji is two UTF-16 units.
        assert_eq!(length("👍").units, 2);
    }

    proptest! {
        #[test]
        fn segments_hold_the_text(text in "\\\\PC{0,400}") {
            let l = length(&text);
            let (single, part) = match l.encoding { SmsEncoding::Gsm7 => (160, 153), SmsEncoding::Ucs2 => (70, 67) };
            prop_assert!(l.units <= single || l.units <= part * l.segments);
            prop_assert!(l.segments == 1 || l.units > single);
            prop_assert!(l.segments <= 1 || l.units > part * (l.segments - 1));
        }
    }
}
