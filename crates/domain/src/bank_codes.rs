//! What a debtor's bank or app reads to pay an invoice without typing it: the Finnish bank
//! barcode in its virtual (text) form, the EPC QR code's payload for a SEPA credit transfer,
//! and the Danish FI-kort payment line. Each is built from the creditor's account, the amount
//! and the invoice's structured reference, and refuses what its scheme cannot carry.
//!
//! Sources: Finance Finland, "Pankkiviivakoodi-opas" (bank barcode guide, versions 4 and 5);
//! European Payments Council, EPC069-12 "Quick Response Code: guidelines to enable data capture
//! for the initiation of a SEPA credit transfer" (version 002); Nets/Mastercard Payment Services,
//! FI-kort (indbetalingskort) type 71.

use chrono::{Datelike, NaiveDate};

use crate::reference::{PaymentReference, ReferenceKind, mod97};
use crate::{Currency, Money};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BankCodeError {
    #[error("'{0}' is not a valid IBAN (country, check digits and MOD 97)")]
    InvalidIban(String),
    #[error("the bank barcode needs a Finnish IBAN (FI...), not '{0}'")]
    NotFinnishIban(String),
    #[error("{scheme} carries euros only, not {currency}")]
    NotEuro { scheme: &'static str, currency: Currency },
    #[error("{scheme} cannot carry the amount {minor} (minor units): {why}")]
    Amount {
        scheme: &'static str,
        minor: i64,
        why: &'static str,
    },
    #[error("{scheme} cannot carry a {kind} reference")]
    Reference { scheme: &'static str, kind: &'static str },
    #[error("the beneficiary's name must be 1 to 70 characters, not {0}")]
    Name(usize),
    #[error("the BIC '{0}' is not 8 or 11 letters and digits")]
    Bic(String),
    #[error("the FI-kort creditor number must be 8 digits, not '{0}'")]
    CreditorNumber(String),
    #[error("the EPC QR payload is {0} bytes; at most 331 fit")]
    TooLong(usize),
    #[error("'{0}' is not a bankgiro number (7 or 8 digits, the last a MOD 10 check digit)")]
    Bankgiro(String),
    #[error("'{0}' is not a Norwegian account number (11 digits, the last a MOD 11 check digit)")]
    NorwegianAccount(String),
}

/// The digits of `raw` when it holds nothing else but the separators `allowed`.
fn digits_only(raw: &str, allowed: &[char]) -> Option<Vec<u8>> {
    raw.trim()
        .chars()
        .filter(|c| !allowed.contains(c))
        .map(|c| c.to_digit(10).map(|d| d as u8))
        .collect()
}

/// A Swedish bankgiro number, written as Bankgirot prints it (`NNN-NNNN` or `NNNN-NNNN`), after
/// checking its MOD 10 (Luhn) check digit. Source: Bankgirot, "Bankgironummer" (7 or 8 digits,
/// the last a check digit by modulus 10).
pub fn bankgiro(raw: &str) -> Result<String, BankCodeError> {
    let refuse = || BankCodeError::Bankgiro(raw.chars().take(30).collect());
    let digits = digits_only(raw, &['-', ' ']).ok_or_else(refuse)?;
    let (payload, check) = match digits.split_last() {
        Some((check, payload)) if matches!(digits.len(), 7 | 8) => (payload, *check),
        _ => return Err(refuse()),
    };
    if crate::reference::luhn_check_digit(payload) != Some(check) {
        return Err(refuse());
    }
    let text: String = digits.iter().map(|d| char::from(b'0' + d)).collect();
    let (head, tail) = text.split_at(text.len() - 4);
    Ok(format!("{head}-{tail}"))
}

/// A Norwegian account number, written `NNNN.NN.NNNNN`, after checking its MOD 11 check digit
/// (weights 5,4,3,2,7,6,5,4,3,2 from the left: the KID MOD 11 weights from the right). An
/// account whose remainder leaves no check digit is never issued. Source: Bits (formerly BSK),
/// "Kontonummer" standard: 4-digit bank, 2-digit account group, 5 digits of which the last checks.
pub fn norwegian_account(raw: &str) -> Result<String, BankCodeError> {
    let refuse = || BankCodeError::NorwegianAccount(raw.chars().take(30).collect());
    let digits = digits_only(raw, &['.', ' ']).ok_or_else(refuse)?;
    let (check, payload) = digits.split_last().filter(|_| digits.len() == 11).ok_or_else(refuse)?;
    if crate::reference::mod11_check_digit(payload) != Some(*check) {
        return Err(refuse());
    }
    let text: String = digits.iter().map(|d| char::from(b'0' + d)).collect();
    Ok(format!("{}.{}.{}", &text[..4], &text[4..6], &text[6..]))
}

/// An IBAN without spaces, upper case, after checking its check digits.
pub fn iban(raw: &str) -> Result<String, BankCodeError> {
    let compact: String = raw
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_uppercase();
    let well_formed = compact.len() >= 15
        && compact.len() <= 34
        && compact.chars().all(|c| c.is_ascii_alphanumeric())
        && compact[..2].chars().all(|c| c.is_ascii_alphabetic())
        && compact[2..4].chars().all(|c| c.is_ascii_digit());
    if !well_formed || mod97(compact[4..].chars().chain(compact[..4].chars())) != 1 {
        return Err(BankCodeError::InvalidIban(raw.to_owned()));
    }
    Ok(compact)
}

/// The virtual bank barcode (virtuaaliviivakoodi): 54 digits a Finnish bank's payment form
/// reads in one paste. Version 4 for a Finnish national reference, version 5 for an RF one.
/// An amount over 999 999,99 € is written as zeros (the payer types it), as the guide says.
pub fn finnish_virtual_barcode(
    account: &str,
    amount: Money,
    reference: &PaymentReference,
    due: Option<NaiveDate>,
) -> Result<String, BankCodeError> {
    const SCHEME: &str = "the Finnish bank barcode";
    let iban = iban(account)?;
    if !iban.starts_with("FI") {
        return Err(BankCodeError::NotFinnishIban(account.to_owned()));
    }
    if amount.currency != Currency::EUR {
        return Err(BankCodeError::NotEuro {
            scheme: SCHEME,
            currency: amount.currency,
        });
    }
    if amount.minor < 0 {
        return Err(BankCodeError::Amount {
            scheme: SCHEME,
            minor: amount.minor,
            why: "it is negative",
        });
    }
    let cents = if amount.minor > 99_999_999 { 0 } else { amount.minor };
    let due = due.map_or_else(
        || "000000".to_owned(),
        |d| format!("{:02}{:02}{:02}", d.year() % 100, d.month(), d.day()),
    );
    let account_digits = &iban[2..];
    match reference.kind {
        ReferenceKind::Finnish => Ok(format!("4{account_digits}{cents:08}000{:0>20}{due}", reference.value)),
        ReferenceKind::Rf => {
            // RF, two check digits, then the reference itself right-aligned in 21 digits.
            let (check, body) = reference.value[2..].split_at(2);
            if body.len() > 21 || !body.chars().all(|c| c.is_ascii_digit()) {
                return Err(BankCodeError::Reference {
                    scheme: SCHEME,
                    kind: "RF reference with letters or over 21 characters",
                });
            }
            Ok(format!("5{account_digits}{cents:08}{check}{body:0>21}{due}"))
        }
        other => Err(BankCodeError::Reference {
            scheme: SCHEME,
            kind: other.name(),
        }),
    }
}

/// A SEPA credit transfer for the EPC QR code.
#[derive(Debug, Clone)]
pub struct SepaTransfer<'a> {
    pub beneficiary: &'a str,
    pub iban: &'a str,
    /// Optional within the EEA since version 002.
    pub bic: Option<&'a str>,
    pub amount: Money,
    /// An RF reference goes in the structured field; a Finnish national one too, as Finnish
    /// banks read it there (Finance Finland's QR code guideline); others are unstructured.
    pub reference: Option<&'a PaymentReference>,
    /// Unstructured remittance text, used when there is no structured reference.
    pub text: Option<&'a str>,
}

/// The EPC069-12 payload (version 002, UTF-8): what the QR code encodes.
pub fn epc_qr_payload(t: &SepaTransfer<'_>) -> Result<String, BankCodeError> {
    const SCHEME: &str = "the EPC QR code";
    if t.amount.currency != Currency::EUR {
        return Err(BankCodeError::NotEuro {
            scheme: SCHEME,
            currency: t.amount.currency,
        });
    }
    if !(1..=99_999_999_999).contains(&t.amount.minor) {
        return Err(BankCodeError::Amount {
            scheme: SCHEME,
            minor: t.amount.minor,
            why: "it must be from 0.01 to 999999999.99 EUR",
        });
    }
    let name = t.beneficiary.trim();
    if name.is_empty() || name.chars().count() > 70 {
        return Err(BankCodeError::Name(name.chars().count()));
    }
    let iban = iban(t.iban)?;
    let bic = match t.bic.map(str::trim).filter(|b| !b.is_empty()) {
        Some(b) if (b.len() == 8 || b.len() == 11) && b.chars().all(|c| c.is_ascii_alphanumeric()) => {
            b.to_ascii_uppercase()
        }
        Some(b) => return Err(BankCodeError::Bic(b.to_owned())),
        None => String::new(),
    };
    let amount = format!("EUR{}.{:02}", t.amount.minor / 100, t.amount.minor % 100);
    let (structured, text) = match t.reference {
        Some(r) if matches!(r.kind, ReferenceKind::Rf | ReferenceKind::Finnish) => (r.value.clone(), String::new()),
        Some(r) => (String::new(), r.value.clone()),
        None => (String::new(), t.text.unwrap_or_default().chars().take(140).collect()),
    };
    let payload = [
        "BCD",
        "002",
        "1",
        "SCT",
        &bic,
        name,
        &iban,
        &amount,
        "",
        &structured,
        &text,
    ]
    .join("\n");
    if payload.len() > 331 {
        return Err(BankCodeError::TooLong(payload.len()));
    }
    Ok(payload)
}

/// The Danish FI-kort type 71 payment line, `+71<payment id+creditor number<`, as banks' and
/// apps' "indbetalingskort" forms take it.
pub fn fik71_line(reference: &PaymentReference, creditor_number: &str) -> Result<String, BankCodeError> {
    if reference.kind != ReferenceKind::Fik71 {
        return Err(BankCodeError::Reference {
            scheme: "FI-kort 71",
            kind: reference.kind.name(),
        });
    }
    let creditor = creditor_number.trim();
    if creditor.len() != 8 || !creditor.chars().all(|c| c.is_ascii_digit()) {
        return Err(BankCodeError::CreditorNumber(creditor_number.to_owned()));
    }
    Ok(format!("+71<{}+{creditor}<", reference.value))
}

#[cfg(test)]
mod tests {
    #[test]
    fn bankgiro_numbers_are_checked_and_written_as_bankgirot_prints_them() {
        // An 8-digit and a 7-digit number whose check digits were worked out by hand.
        assert_eq!(bankgiro("5050-1055").as_deref(), Ok("5050-1055"));
        assert_eq!(bankgiro("50501055").as_deref(), Ok("5050-1055"));
        assert_eq!(bankgiro(" 123-4566 ").as_deref(), Ok("123-4566"));
        for bad in ["5050-1056", "123-4561", "12345", "5050-105x", "", "1-2-3-4-5-6-7-8-9"] {
            assert!(bankgiro(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn norwegian_account_numbers_are_checked_by_mod11() {
        // 1234.56.78903 is the standard example (check digit 3).
        assert_eq!(norwegian_account("1234.56.78903").as_deref(), Ok("1234.56.78903"));
        assert_eq!(norwegian_account("12345678903").as_deref(), Ok("1234.56.78903"));
        for bad in ["1234.56.78904", "1234.56.7890", "1234.56.789031", "abcd.56.78903"] {
            assert!(norwegian_account(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn one_changed_digit_is_always_caught(
            payload in proptest::collection::vec(0u8..10, 10),
            at in 0usize..11,
            by in 1u8..10,
        ) {
            // Any account number with a check digit, and every single-digit error in it.
            if let Some(check) = crate::reference::mod11_check_digit(&payload) {
                let mut digits = payload.clone();
                digits.push(check);
                let text: String = digits.iter().map(|d| char::from(b'0' + d)).collect();
                proptest::prop_assert!(norwegian_account(&text).is_ok());
                digits[at] = (digits[at] + by) % 10;
                let wrong: String = digits.iter().map(|d| char::from(b'0' + d)).collect();
                proptest::prop_assert!(norwegian_account(&wrong).is_err(), "{wrong}");
            }
            let mut bg = payload[..7].to_vec();
            bg.push(crate::reference::luhn_check_digit(&bg).unwrap());
            let text: String = bg.iter().map(|d| char::from(b'0' + d)).collect();
            proptest::prop_assert!(bankgiro(&text).is_ok());
            let i = at % 8;
            bg[i] = (bg[i] + by) % 10;
            let wrong: String = bg.iter().map(|d| char::from(b'0' + d)).collect();
            proptest::prop_assert!(bankgiro(&wrong).is_err(), "{wrong}");
        }
    }

    use super::*;
    use crate::reference::{generate, validate};
    use proptest::prelude::*;

    fn eur(minor: i64) -> Money {
        Money::new(minor, Currency::EUR)
    }

    fn day(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap()
    }

    // Expected values from independent implementations of Finance Finland's guide
    // (the npm package `virtuaaliviivakoodi` and the PyPI package of the same name).
    #[test]
    fn the_virtual_barcode_matches_published_examples() {
        let national = validate(ReferenceKind::Finnish, "11112").unwrap();
        assert_eq!(
            finnish_virtual_barcode("FI37 1590 3000 0007 76", eur(1225), &national, Some(day(2016, 12, 21))).unwrap(),
            "437159030000007760000122500000000000000000011112161221"
        );
        let rf = validate(ReferenceKind::Rf, "RF9811112").unwrap();
        assert_eq!(
            finnish_virtual_barcode("FI37 1590 3000 0007 76", eur(110), &rf, Some(day(2017, 1, 1))).unwrap(),
            "537159030000007760000011098000000000000000011112170101"
        );
        let other = validate(ReferenceKind::Finnish, "1234567907").unwrap();
        assert_eq!(
            finnish_virtual_barcode("FI49 5000 9420 0287 30", eur(10_020), &other, Some(day(2022, 12, 12))).unwrap(),
            "449500094200287300001002000000000000001234567907221212"
        );
    }

    #[test]
    fn the_virtual_barcode_refuses_what_it_cannot_carry() {
        let national = validate(ReferenceKind::Finnish, "11112").unwrap();
        assert_eq!(
            finnish_virtual_barcode("DE89 3704 0044 0532 0130 00", eur(1), &national, None),
            Err(BankCodeError::NotFinnishIban("DE89 3704 0044 0532 0130 00".into()))
        );
        assert!(matches!(
            finnish_virtual_barcode("FI37 1590 3000 0007 77", eur(1), &national, None),
            Err(BankCodeError::InvalidIban(_))
        ));
        assert!(matches!(
            finnish_virtual_barcode("FI37 1590 3000 0007 76", Money::new(1, Currency::SEK), &national, None),
            Err(BankCodeError::NotEuro { .. })
        ));
        let kid = generate(ReferenceKind::KidMod10, "12345").unwrap();
        assert!(matches!(
            finnish_virtual_barcode("FI37 1590 3000 0007 76", eur(1), &kid, None),
            Err(BankCodeError::Reference { .. })
        ));
        // Over 999 999,99 €: the amount is left for the payer to type.
        let big = finnish_virtual_barcode("FI37 1590 3000 0007 76", eur(100_000_000), &national, None).unwrap();
        assert_eq!(&big[17..25], "00000000");
        assert!(big.ends_with("000000"), "no due date");
    }

    #[test]
    fn the_epc_payload_has_its_fields_in_order() {
        let rf = validate(ReferenceKind::Rf, "RF18539007547034").unwrap();
        let payload = epc_qr_payload(&SepaTransfer {
            beneficiary: "Nordlys Energia Oy",
            iban: "FI37 1590 3000 0007 76",
            bic: Some("ndeafihh"),
            amount: eur(12_345),
            reference: Some(&rf),
            text: None,
        })
        .unwrap();
        assert_eq!(
            payload,
            "BCD\n002\n1\nSCT\nNDEAFIHH\nNordlys Energia Oy\nFI3715903000000776\nEUR123.45\n\nRF18539007547034\n"
        );
    }

    #[test]
    fn the_epc_payload_refuses_other_currencies_names_too_long_and_zero_amounts() {
        let t = SepaTransfer {
            beneficiary: "X",
            iban: "FI37 1590 3000 0007 76",
            bic: None,
            amount: eur(0),
            reference: None,
            text: Some("Invoice 1"),
        };
        assert!(matches!(epc_qr_payload(&t), Err(BankCodeError::Amount { .. })));
        let long = "N".repeat(71);
        assert_eq!(
            epc_qr_payload(&SepaTransfer {
                beneficiary: &long,
                amount: eur(1),
                ..t.clone()
            }),
            Err(BankCodeError::Name(71))
        );
        assert!(matches!(
            epc_qr_payload(&SepaTransfer {
                amount: Money::new(1, Currency::NOK),
                ..t.clone()
            }),
            Err(BankCodeError::NotEuro { .. })
        ));
        let text_only = epc_qr_payload(&SepaTransfer { amount: eur(1), ..t }).unwrap();
        assert!(text_only.ends_with("\nEUR0.01\n\n\nInvoice 1"), "{text_only:?}");
    }

    #[test]
    fn the_fik_line_carries_the_payment_id_and_creditor_number() {
        let fik = generate(ReferenceKind::Fik71, "12345678901234").unwrap();
        assert_eq!(
            fik71_line(&fik, "85386489").unwrap(),
            format!("+71<{}+85386489<", fik.value)
        );
        assert_eq!(
            fik71_line(&fik, "8538648"),
            Err(BankCodeError::CreditorNumber("8538648".into()))
        );
    }

    proptest! {
        #[test]
        fn every_barcode_is_54_digits_and_carries_the_amount(cents in 0i64..=99_999_999, base in 1u64..10_000_000_000_000u64) {
            let national = generate(ReferenceKind::Finnish, &base.to_string()).unwrap();
            let code = finnish_virtual_barcode("FI37 1590 3000 0007 76", eur(cents), &national, Some(day(2026, 3, 2))).unwrap();
            prop_assert_eq!(code.len(), 54);
            prop_assert!(code.chars().all(|c| c.is_ascii_digit()));
            prop_assert_eq!(code[17..25].parse::<i64>().unwrap(), cents);
            prop_assert_eq!(code[28..48].trim_start_matches('0'), national.value.as_str());
        }
    }
}
