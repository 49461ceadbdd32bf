//! Property: a camt.054 document written from generated credits reads back as exactly those
//! payments, to the minor unit, in both message versions and as single or batch-booked entries.

use chrono::NaiveDate;
use forfall_camt054::{CamtPayment, parse};
use forfall_domain::{Currency, Money};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Credit {
    minor: i64,
    currency: Currency,
    reference: Option<String>,
    text: Option<String>,
    payer_name: Option<String>,
    payer_iban: Option<String>,
    /// Written with exactly two decimals, or with trailing zeros (and a bare dot) dropped.
    full_decimals: bool,
}

fn currency() -> impl Strategy<Value = Currency> {
    prop_oneof![
        Just(Currency::DKK),
        Just(Currency::NOK),
        Just(Currency::SEK),
        Just(Currency::EUR)
    ]
}

fn reference() -> impl Strategy<Value = String> {
    prop_oneof!["[0-9]{2,25}", "RF[0-9]{2}[A-Z0-9]{1,21}", "\\+71<[0-9]{15}\\+[0-9]{8}<"]
}

/// Free text with the characters XML must escape and Nordic letters, without surrounding
/// blanks, which the reader trims.
fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9æøåÆØÅäöÄÖ&<>'\"][a-zA-Z0-9 æøåÆØÅäöÄÖ&<>'\"/.,-]{0,30}[a-zA-Z0-9æøåäö&<>'\"]"
}

fn credit() -> impl Strategy<Value = Credit> {
    (
        1i64..1_000_000_000_000,
        currency(),
        proptest::option::of(reference()),
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::option::of("[A-Z]{2}[0-9]{2}[0-9]{10,20}"),
        any::<bool>(),
    )
        .prop_map(
            |(minor, currency, reference, text, payer_name, payer_iban, full_decimals)| Credit {
                minor,
                currency,
                reference,
                text,
                payer_name,
                payer_iban,
                full_decimals,
            },
        )
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

fn amount_text(minor: i64, full_decimals: bool) -> String {
    let full = format!("{}.{:02}", minor / 100, minor % 100);
    if full_decimals {
        full
    } else {
        full.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

/// Writes the document line by line so that each payment's expected line number is known.
struct Writer {
    lines: Vec<String>,
}

impl Writer {
    fn push(&mut self, line: impl Into<String>) -> usize {
        self.lines.push(line.into());
        self.lines.len()
    }
}

const BOOKED: (i32, u32, u32) = (2024, 3, 4);
const VALUE: (i32, u32, u32) = (2024, 3, 1);

fn day((y, m, d): (i32, u32, u32)) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, d).expect("valid test date")
}

fn write_details(w: &mut Writer, v08: bool, id: &str, credit: &Credit, batch: bool) -> usize {
    let line = w.push("<TxDtls>");
    w.push(format!(
        "<Refs><AcctSvcrRef>{id}</AcctSvcrRef><EndToEndId>NOTPROVIDED</EndToEndId></Refs>"
    ));
    if batch {
        let amount = format!(
            r#"<Amt Ccy="{}">{}</Amt>"#,
            credit.currency,
            amount_text(credit.minor, credit.full_decimals)
        );
        if v08 {
            w.push(amount);
            w.push("<CdtDbtInd>CRDT</CdtDbtInd>");
        } else {
            w.push(format!("<AmtDtls><TxAmt>{amount}</TxAmt></AmtDtls>"));
        }
    }
    w.push("<RltdPties>");
    if let Some(name) = &credit.payer_name {
        if v08 {
            w.push(format!("<Dbtr><Pty><Nm>{}</Nm></Pty></Dbtr>", escape(name)));
        } else {
            w.push(format!("<Dbtr><Nm>{}</Nm></Dbtr>", escape(name)));
        }
    }
    if let Some(iban) = &credit.payer_iban {
        w.push(format!("<DbtrAcct><Id><IBAN>{iban}</IBAN></Id></DbtrAcct>"));
    }
    w.push("</RltdPties>");
    w.push("<RmtInf>");
    if let Some(text) = &credit.text {
        w.push(format!("<Ustrd>{}</Ustrd>", escape(text)));
    }
    if let Some(reference) = &credit.reference {
        w.push("<Strd><CdtrRefInf><Tp><CdOrPrtry><Cd>SCOR</Cd></CdOrPrtry></Tp>");
        w.push(format!("<Ref>{}</Ref></CdtrRefInf></Strd>", escape(reference)));
    }
    w.push("</RmtInf>");
    w.push("</TxDtls>");
    line
}

fn entry_head(w: &mut Writer, v08: bool, minor: i64, currency: Currency, full_decimals: bool, id: &str) -> usize {
    let line = w.push("<Ntry>");
    w.push(format!(
        r#"<Amt Ccy="{currency}">{}</Amt>"#,
        amount_text(minor, full_decimals)
    ));
    w.push("<CdtDbtInd>CRDT</CdtDbtInd>");
    w.push(if v08 {
        "<Sts><Cd>BOOK</Cd></Sts>"
    } else {
        "<Sts>BOOK</Sts>"
    });
    w.push("<BookgDt><Dt>2024-03-04</Dt></BookgDt>");
    w.push("<ValDt><DtTm>2024-03-01T12:00:00+01:00</DtTm></ValDt>");
    w.push(format!("<AcctSvcrRef>{id}</AcctSvcrRef>"));
    w.push("<BkTxCd><Domn><Cd>PMNT</Cd><Fmly><Cd>RCDT</Cd><SubFmlyCd>DMCT</SubFmlyCd></Fmly></Domn></BkTxCd>");
    line
}

fn expected(credit: &Credit, transaction_id: String, currency: Currency, line: usize) -> CamtPayment {
    CamtPayment {
        transaction_id,
        amount: Money::new(credit.minor, currency),
        reference: credit.reference.clone(),
        remittance_text: credit.text.clone(),
        payer_name: credit.payer_name.clone(),
        payer_account: credit.payer_iban.clone(),
        booking_date: day(BOOKED),
        value_date: day(VALUE),
        line,
    }
}

/// The document, and the payments it must read back as.
fn document(credits: &[Credit], v08: bool, batched: bool) -> (String, Vec<CamtPayment>) {
    let version = if v08 { "08" } else { "02" };
    let mut w = Writer { lines: Vec::new() };
    w.push(r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    w.push(format!(
        r#"<Document xmlns="urn:iso:std:iso:20022:tech:xsd:camt.054.001.{version}">"#
    ));
    w.push("<BkToCstmrDbtCdtNtfctn><GrpHdr><MsgId>PROP-1</MsgId><CreDtTm>2024-03-04T06:00:00</CreDtTm></GrpHdr>");
    w.push("<Ntfctn><Id>PROP-1-1</Id><CreDtTm>2024-03-04T06:00:00</CreDtTm>");
    w.push("<Acct><Id><IBAN>NO9386011117947</IBAN></Id></Acct>");
    let mut payments = Vec::new();
    if batched {
        // One booking for all credits, so they share the first credit's currency.
        let currency = credits[0].currency;
        let total = credits.iter().map(|c| c.minor).sum();
        let entry_line = entry_head(&mut w, v08, total, currency, true, "BATCH");
        w.push("<NtryDtls>");
        for (i, credit) in credits.iter().enumerate() {
            let credit = Credit {
                currency,
                ..credit.clone()
            };
            let id = format!("TX{i}");
            let details_line = write_details(&mut w, v08, &id, &credit, true);
            // A "batch" of one is an ordinary entry, located by its Ntry.
            let line = if credits.len() == 1 { entry_line } else { details_line };
            payments.push(expected(&credit, id, currency, line));
        }
        w.push("</NtryDtls></Ntry>");
    } else {
        for (i, credit) in credits.iter().enumerate() {
            let id = format!("TX{i}");
            let line = entry_head(
                &mut w,
                v08,
                credit.minor,
                credit.currency,
                credit.full_decimals,
                &format!("E{i}"),
            );
            w.push("<NtryDtls>");
            write_details(&mut w, v08, &id, credit, false);
            w.push("</NtryDtls></Ntry>");
            payments.push(expected(credit, id, credit.currency, line));
        }
    }
    w.push("</Ntfctn></BkToCstmrDbtCdtNtfctn></Document>");
    (w.lines.join("\n"), payments)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn generated_credits_read_back_exactly(
        credits in proptest::collection::vec(credit(), 1..8),
        v08 in any::<bool>(),
        batched in any::<bool>(),
    ) {
        let (xml, payments) = document(&credits, v08, batched);
        let import = parse(&xml).map_err(|e| TestCaseError::fail(format!("{e}\n{xml}")))?;
        prop_assert_eq!(import.version, format!("camt.054.001.{}", if v08 { "08" } else { "02" }));
        prop_assert_eq!(import.payments, payments);
    }
}
