//! The reader against bank-shaped files under tests/fixtures (each cites its source at the top)
//! and against small variations of them built in place.

use chrono::NaiveDate;
use forfall_camt054::{CamtError, CamtPayment, Problem, parse, parse_bytes, parse_bytes_lenient, parse_lenient};
use forfall_domain::reference::{ReferenceKind, validate};
use forfall_domain::{Currency, Money};

const NTRY: &str = "/Document/BkToCstmrDbtCdtNtfctn/Ntfctn/Ntry";
const TX: &str = "/Document/BkToCstmrDbtCdtNtfctn/Ntfctn/Ntry/NtryDtls/TxDtls";

/// Read when the test runs (cargo and nextest set it), not when it was compiled: a shared target
/// dir may hold a test binary built from another checkout.
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string())
}

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", manifest_dir());
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// 1-based line of the `n`th (0-based) line containing `needle`, so tests state line numbers by
/// content rather than by counting.
fn line_of_nth(text: &str, needle: &str, n: usize) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, line)| line.contains(needle))
        .nth(n)
        .map(|(i, _)| i + 1)
        .unwrap_or_else(|| panic!("'{needle}' occurs fewer than {} times", n + 1))
}

fn line_of(text: &str, needle: &str) -> usize {
    line_of_nth(text, needle, 0)
}

fn date(y: i32, m: u32, d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, d).expect("valid test date")
}

fn problems(result: Result<forfall_camt054::Import, CamtError>) -> Vec<Problem> {
    match result {
        Err(CamtError::Invalid(problems)) => problems,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn norwegian_kid_credits_in_version_02() {
    let xml = fixture("no_kid_nordea_054_001_02.xml");
    let import = parse(&xml).expect("valid file");
    assert_eq!(import.version, "camt.054.001.02");
    assert_eq!(import.message_id, "NDEANOKK-20240304-000117");
    assert_eq!(import.skipped_debits, 1);
    assert_eq!(import.skipped_reversals, 0);
    assert_eq!(
        import.payments,
        vec![
            CamtPayment {
                transaction_id: "NO240304000117000101".into(),
                amount: Money::new(125_000, Currency::NOK),
                reference: Some("20240012342".into()),
                remittance_text: None,
                payer_name: Some("Kari Nordmann".into()),
                payer_account: Some("12345678903".into()),
                booking_date: date(2024, 3, 4),
                value_date: date(2024, 3, 4),
                line: line_of_nth(&xml, "<Ntry>", 0),
            },
            CamtPayment {
                // No TxDtls/Refs/AcctSvcrRef: the entry's reference is the bank's id.
                transaction_id: "NO2403040001170002".into(),
                amount: Money::new(89_950, Currency::NOK),
                reference: Some("20240012359".into()),
                remittance_text: None,
                payer_name: Some("Ola Nordmann AS".into()),
                payer_account: Some("NO8330001234567".into()),
                booking_date: date(2024, 3, 4),
                value_date: date(2024, 3, 1),
                line: line_of_nth(&xml, "<Ntry>", 1),
            },
        ]
    );
    for payment in &import.payments {
        let kid = payment.reference.as_deref().unwrap_or_default();
        assert!(validate(ReferenceKind::KidMod10, kid).is_ok(), "{kid} is a KID");
    }
}

#[test]
fn swedish_ocr_batch_yields_one_payment_per_transaction() {
    let xml = fixture("se_ocr_batch_054_001_02.xml");
    let import = parse(&xml).expect("valid file");
    let summary: Vec<_> = import
        .payments
        .iter()
        .map(|p| (p.transaction_id.as_str(), p.amount, p.reference.as_deref(), p.line))
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                "SE240305990004200001",
                Money::new(150_000, Currency::SEK),
                Some("55001234560"),
                line_of_nth(&xml, "<TxDtls>", 0)
            ),
            (
                "SE240305990004200002",
                Money::new(275_000, Currency::SEK),
                Some("55001234578"),
                line_of_nth(&xml, "<TxDtls>", 1)
            ),
            (
                "SE240305990004200003",
                Money::new(50_000, Currency::SEK),
                None,
                line_of_nth(&xml, "<TxDtls>", 2)
            ),
        ]
    );
    let [first, second, third] = import.payments.as_slice() else {
        panic!("three payments")
    };
    assert_eq!(first.payer_account.as_deref(), Some("50501055"));
    assert_eq!(second.payer_account, None);
    assert_eq!(third.payer_name.as_deref(), Some("Per Öberg"));
    assert_eq!(
        third.remittance_text.as_deref(),
        Some("Faktura 2024-118 delbetalning, tack!")
    );
    for payment in &import.payments {
        assert_eq!(payment.booking_date, date(2024, 3, 5));
        if let Some(ocr) = &payment.reference {
            assert!(validate(ReferenceKind::Ocr, ocr).is_ok(), "{ocr} is an OCR reference");
        }
    }
}

#[test]
fn danish_fik_in_version_08_and_skipped_entries() {
    let xml = fixture("dk_fik_054_001_08.xml");
    let import = parse(&xml).expect("valid file");
    assert_eq!(import.version, "camt.054.001.08");
    assert_eq!(import.message_id, "DABADKKK-CN-20240305-7781");
    assert_eq!(
        (import.skipped_debits, import.skipped_reversals, import.skipped_unbooked),
        (1, 1, 1)
    );
    assert_eq!(
        import.payments,
        vec![
            CamtPayment {
                transaction_id: "DK7781000001-FIK".into(),
                amount: Money::new(250_000, Currency::DKK),
                reference: Some("000000202400420".into()),
                remittance_text: None,
                payer_name: Some("Jens Hansen".into()),
                payer_account: Some("30000123456789".into()),
                booking_date: date(2024, 3, 5),
                value_date: date(2024, 3, 5),
                line: line_of_nth(&xml, "<Ntry>", 0),
            },
            CamtPayment {
                // The entry's AcctSvcrRef outranks the payer's EndToEndId.
                transaction_id: "DK7781000002".into(),
                amount: Money::new(1_000_000, Currency::DKK),
                reference: None,
                remittance_text: Some("Faktura 2024-0042".into()),
                payer_name: Some("Mølle & Søn ApS".into()),
                payer_account: Some("DK9520000123456789".into()),
                booking_date: date(2024, 3, 5),
                value_date: date(2024, 3, 6),
                line: line_of_nth(&xml, "<Ntry>", 1),
            },
        ]
    );
    assert!(validate(ReferenceKind::Fik71, "000000202400420").is_ok());
}

#[test]
fn finnish_and_rf_references() {
    let xml = fixture("fi_reference_rf_054_001_02.xml");
    let import = parse(&xml).expect("valid file");
    let [national, rf, text_only] = import.payments.as_slice() else {
        panic!("three payments")
    };

    assert_eq!(national.transaction_id, "202403062588CECZ0804");
    assert_eq!(national.amount, Money::new(12_000, Currency::EUR));
    assert_eq!(national.reference.as_deref(), Some("20245557"));
    assert_eq!(national.payer_account.as_deref(), Some("FI2112345600000785"));
    assert!(validate(ReferenceKind::Finnish, "20245557").is_ok());

    // The reference is in the second Strd; the first only names an invoice.
    assert_eq!(rf.reference.as_deref(), Some("RF0520240099"));
    assert_eq!(rf.amount, Money::new(74_245, Currency::EUR));
    assert_eq!(rf.value_date, date(2024, 3, 5));
    assert!(validate(ReferenceKind::Rf, "RF0520240099").is_ok());

    // No AcctSvcrRef anywhere: the end-to-end id identifies it; no ValDt: value date = booking.
    assert_eq!(text_only.transaction_id, "INV-43459-PARTIAL");
    assert_eq!(
        text_only.amount,
        Money::new(21_685, Currency::EUR),
        "the booked EUR amount, not the SEK instructed one"
    );
    assert_eq!(text_only.value_date, text_only.booking_date);
    assert_eq!(text_only.reference, None);
    assert_eq!(
        text_only.remittance_text.as_deref(),
        Some("PARTIAL PYMT 240301 INV 43459 INV EUR 357")
    );
}

#[test]
fn malformed_xml_is_refused_with_its_line() {
    let xml = fixture("malformed.xml");
    let expected_line = line_of(&xml, "</CdtDbtIn>");
    for result in [parse(&xml).map(|_| ()), parse_lenient(&xml).map(|_| ())] {
        match result {
            Err(CamtError::Xml { line, message }) => {
                assert_eq!(line, expected_line, "{message}");
                assert!(!message.is_empty());
            }
            other => panic!("expected an XML error, got {other:?}"),
        }
    }
}

#[test]
fn other_messages_are_not_camt054() {
    let statement = fixture("camt053_statement.xml");
    match parse_lenient(&statement) {
        Err(CamtError::NotCamt054 { found }) => {
            assert!(
                found.contains("urn:iso:std:iso:20022:tech:xsd:camt.053.001.02"),
                "{found}"
            )
        }
        other => panic!("expected NotCamt054, got {other:?}"),
    }
    match parse("<invoice><total>100</total></invoice>") {
        Err(e @ CamtError::NotCamt054 { .. }) => {
            assert_eq!(
                e.to_string(),
                "not a camt.054 file: found <invoice> without a namespace"
            )
        }
        other => panic!("expected NotCamt054, got {other:?}"),
    }
    let wrong_body = r#"<Document xmlns="urn:iso:std:iso:20022:tech:xsd:camt.054.001.08"><BkToCstmrStmt/></Document>"#;
    assert!(matches!(parse(wrong_body), Err(CamtError::NotCamt054 { .. })));
    assert!(matches!(parse(""), Err(CamtError::Xml { .. })));
}

#[test]
fn an_amount_finer_than_the_currency_is_refused_with_line_and_path() {
    let xml = fixture("amount_three_decimals.xml");
    let problems = problems(parse(&xml));
    assert_eq!(
        problems,
        vec![Problem {
            line: line_of(&xml, "1250.005"),
            path: format!("{NTRY}/Amt"),
            message: "'1250.005' has 3 decimals, but EUR has 2".into(),
        }]
    );
    assert_eq!(
        problems[0].to_string(),
        format!(
            "line {}: /Document/BkToCstmrDbtCdtNtfctn/Ntfctn/Ntry/Amt: '1250.005' has 3 decimals, but EUR has 2",
            line_of(&xml, "1250.005")
        )
    );
}

#[test]
fn a_credit_without_any_transaction_id_is_refused() {
    let xml = fixture("missing_transaction_id.xml");
    let problems = problems(parse(&xml));
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].line, line_of(&xml, "<TxDtls>"));
    assert_eq!(problems[0].path, format!("{TX}/Refs/AcctSvcrRef"));
    assert!(
        problems[0].message.starts_with("no transaction id"),
        "{}",
        problems[0].message
    );
}

#[test]
fn an_unknown_currency_is_refused_by_name() {
    let xml = fixture("unknown_currency.xml");
    let problems = problems(parse(&xml));
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].line, line_of(&xml, r#"Ccy="USD""#));
    assert_eq!(problems[0].path, format!("{NTRY}/Amt/@Ccy"));
    assert!(problems[0].message.contains("'USD'"), "{}", problems[0].message);
}

#[test]
fn a_partly_valid_file_imports_nothing_unless_asked_to_be_lenient() {
    let xml = fixture("partly_valid.xml");
    let expected = vec![
        Problem {
            line: line_of(&xml, ">abc<"),
            path: format!("{NTRY}/Amt"),
            message: "'abc' is not an amount".into(),
        },
        Problem {
            line: line_of_nth(&xml, "<Ntry>", 2),
            path: format!("{NTRY}/BookgDt"),
            message: "missing: a booked entry needs its booking date".into(),
        },
    ];

    let error = parse(&xml).expect_err("all or nothing");
    let shown = error.to_string();
    assert_eq!(shown.lines().count(), 1 + expected.len(), "{shown}");
    for problem in &expected {
        assert!(shown.lines().any(|l| l == problem.to_string()), "{shown}");
    }
    assert_eq!(error, CamtError::Invalid(expected.clone()));

    let (import, problems) = parse_lenient(&xml).expect("lenient import");
    assert_eq!(problems, expected);
    let ids: Vec<_> = import.payments.iter().map(|p| p.transaction_id.as_str()).collect();
    assert_eq!(ids, ["NO240304000101", "NO240304000104"]);
    assert_eq!(import.payments[1].amount, Money::new(40_000, Currency::NOK));
}

#[test]
fn a_batch_that_does_not_add_up_is_refused() {
    let xml = fixture("se_ocr_batch_054_001_02.xml").replacen(
        r#"<Amt Ccy="SEK">4750.00</Amt>"#,
        r#"<Amt Ccy="SEK">4700.00</Amt>"#,
        1,
    );
    let (import, problems) = parse_lenient(&xml).expect("lenient import");
    assert!(import.payments.is_empty());
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].line, line_of(&xml, "4700.00"));
    assert_eq!(problems[0].path, format!("{NTRY}/Amt"));
    assert_eq!(
        problems[0].message,
        "the entry amount 4700.00 SEK differs from the sum 4750.00 SEK of its 3 transactions"
    );
}

#[test]
fn one_bad_transaction_in_a_batch_leaves_the_others_to_lenient_mode() {
    let xml = fixture("se_ocr_batch_054_001_02.xml").replacen(
        r#"<Amt Ccy="SEK">2750.00</Amt>"#,
        r#"<Amt Ccy="SEK">27,50</Amt>"#,
        1,
    );
    let (import, problems) = parse_lenient(&xml).expect("lenient import");
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].path, format!("{TX}/AmtDtls/TxAmt/Amt"));
    assert_eq!(problems[0].line, line_of(&xml, "27,50"));
    assert_eq!(import.payments.len(), 2);
}

#[test]
fn a_batch_without_per_transaction_references_numbers_the_entry_reference() {
    let xml = fixture("se_ocr_batch_054_001_02.xml")
        .replace("<AcctSvcrRef>SE2403059900042000", "<InstrId>SE2403059900042000")
        .replace("</AcctSvcrRef>\n            </Refs>", "</InstrId>\n            </Refs>");
    let import = parse(&xml).expect("valid file");
    let ids: Vec<_> = import.payments.iter().map(|p| p.transaction_id.as_str()).collect();
    assert_eq!(ids, ["SE2403059900042/1", "SE2403059900042/2", "SE2403059900042/3"]);
}

#[test]
fn a_repeated_transaction_id_is_a_problem() {
    let xml = fixture("partly_valid.xml")
        .replace(">abc<", ">200.00<")
        .replace("NO240304000102", "NO240304000101");
    let (import, problems) = parse_lenient(&xml).expect("lenient import");
    let duplicate = problems
        .iter()
        .find(|p| p.message.contains("already used"))
        .expect("duplicate reported");
    assert_eq!(duplicate.line, line_of_nth(&xml, "<Ntry>", 1));
    assert_eq!(duplicate.path, format!("{NTRY}/AcctSvcrRef"));
    assert!(
        duplicate
            .message
            .contains(&format!("line {}", line_of_nth(&xml, "<Ntry>", 0)))
    );
    assert_eq!(
        import
            .payments
            .iter()
            .filter(|p| p.transaction_id == "NO240304000101")
            .count(),
        1
    );
}

#[test]
fn an_entry_without_details_is_one_payment() {
    let xml =
        fixture("no_kid_nordea_054_001_02.xml").replace("<CdtDbtInd>DBIT</CdtDbtInd>", "<CdtDbtInd>CRDT</CdtDbtInd>");
    let import = parse(&xml).expect("valid file");
    assert_eq!(import.skipped_debits, 0);
    let last = import.payments.last().expect("a payment");
    assert_eq!(last.transaction_id, "NO2403040001170003");
    assert_eq!(last.amount, Money::new(35_000, Currency::NOK));
    assert_eq!((last.reference.as_ref(), last.payer_name.as_ref()), (None, None));
}

#[test]
fn a_reversed_debit_counts_as_a_reversal() {
    let xml = fixture("no_kid_nordea_054_001_02.xml").replace(
        "<CdtDbtInd>DBIT</CdtDbtInd>",
        "<CdtDbtInd>DBIT</CdtDbtInd>\n        <RvslInd>true</RvslInd>",
    );
    let import = parse(&xml).expect("valid file");
    assert_eq!((import.skipped_debits, import.skipped_reversals), (0, 1));
}

#[test]
fn a_file_without_message_id_is_refused_even_when_lenient() {
    let xml = fixture("no_kid_nordea_054_001_02.xml").replace("<MsgId>NDEANOKK-20240304-000117</MsgId>", "");
    match parse_lenient(&xml) {
        Err(CamtError::Invalid(problems)) => {
            assert_eq!(problems.len(), 1);
            assert_eq!(problems[0].path, "/Document/BkToCstmrDbtCdtNtfctn/GrpHdr/MsgId");
            assert_eq!(problems[0].line, line_of(&xml, "<GrpHdr>"));
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn bad_dates_and_indicators_are_located() {
    let xml = fixture("no_kid_nordea_054_001_02.xml")
        .replacen("<Dt>2024-03-04</Dt>", "<Dt>04.03.2024</Dt>", 1)
        .replace(
            "<Amt Ccy=\"NOK\">899.5</Amt>\n        <CdtDbtInd>CRDT</CdtDbtInd>",
            "<Amt Ccy=\"NOK\">899.5</Amt>\n        <CdtDbtInd>CREDIT</CdtDbtInd>",
        );
    let problems = problems(parse(&xml));
    let paths: Vec<_> = problems
        .iter()
        .map(|p| (p.line, p.path.as_str(), p.message.as_str()))
        .collect();
    assert_eq!(
        paths,
        vec![
            (
                line_of(&xml, "04.03.2024"),
                "/Document/BkToCstmrDbtCdtNtfctn/Ntfctn/Ntry/BookgDt/Dt",
                "'04.03.2024' is not a date (YYYY-MM-DD)"
            ),
            (
                line_of(&xml, "CREDIT"),
                "/Document/BkToCstmrDbtCdtNtfctn/Ntfctn/Ntry/CdtDbtInd",
                "'CREDIT' is not CRDT or DBIT"
            ),
        ]
    );
}

#[test]
fn a_message_inside_an_envelope_is_found() {
    let inner = fixture("dk_fik_054_001_08.xml");
    let body = inner.split_once("?>").map(|(_, rest)| rest).unwrap_or_default();
    let wrapped = format!(
        "<Envelope xmlns=\"urn:example:envelope\">\n<AppHdr xmlns=\"urn:iso:std:iso:20022:tech:xsd:head.001.001.02\"/>{body}</Envelope>"
    );
    let import = parse(&wrapped).expect("valid file");
    assert_eq!(import.payments.len(), 2);
    assert_eq!(import.payments[0].line, line_of_nth(&wrapped, "<Ntry>", 0));
}

#[test]
fn dtds_are_refused() {
    let xml = r#"<?xml version="1.0"?>
<!DOCTYPE Document [<!ENTITY a "aaaaaaaaaa">]>
<Document xmlns="urn:iso:std:iso:20022:tech:xsd:camt.054.001.02"><BkToCstmrDbtCdtNtfctn/></Document>"#;
    let result = parse(xml);
    assert!(matches!(result, Err(CamtError::Xml { line: 2, .. })), "{result:?}");
}

#[test]
fn bytes_in_utf8_with_bom_or_declared_latin1() {
    let utf8 = fixture("se_ocr_batch_054_001_02.xml");
    let mut with_bom = b"\xEF\xBB\xBF".to_vec();
    with_bom.extend_from_slice(utf8.as_bytes());
    let from_bom = parse_bytes(&with_bom).expect("BOM is skipped");
    assert_eq!(from_bom, parse(&utf8).expect("valid file"));

    let latin1_text = utf8.replacen(r#"encoding="UTF-8""#, r#"encoding="ISO-8859-1""#, 1);
    let latin1: Vec<u8> = latin1_text
        .chars()
        .map(|c| u8::try_from(u32::from(c)).expect("Latin-1 text"))
        .collect();
    let import = parse_bytes(&latin1).expect("declared Latin-1");
    assert_eq!(import.payments[2].payer_name.as_deref(), Some("Per Öberg"));

    let mut broken = utf8.into_bytes();
    let at = broken
        .windows(2)
        .position(|w| w == "Ö".as_bytes())
        .expect("Ö in fixture");
    broken[at] = 0xD6;
    broken[at + 1] = b'b';
    let expected_line = 1 + broken[..at].iter().filter(|&&b| b == b'\n').count();
    assert!(matches!(parse_bytes_lenient(&broken), Err(CamtError::Xml { line, .. }) if line == expected_line));
}

#[test]
fn a_truncated_file_is_reported_at_its_end() {
    let xml = fixture("no_kid_nordea_054_001_02.xml");
    let cut = &xml[..xml.find("<NtryRef>3</NtryRef>").expect("third entry")];
    match parse(cut) {
        Err(CamtError::Xml { line, message }) => {
            assert_eq!(line, cut.trim_end().lines().count(), "{message}");
            assert!(message.contains("ends early"), "{message}");
        }
        other => panic!("expected an XML error, got {other:?}"),
    }
}
