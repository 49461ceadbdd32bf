//! Reads ISO 20022 camt.054 (BankToCustomerDebitCreditNotification) files into payments.
//!
//! This crate owns one thing: turning the bytes of a bank's credit notification into
//! [`CamtPayment`] records, or into a refusal that names the line and element path of every
//! defect. It accepts camt.054.001.02 (the version Nordic banks have shipped since 2013),
//! camt.054.001.08 and any other camt.054.001.NN whose elements match, because the elements read
//! here have kept their names and places across versions.
//!
//! It does not match payments to invoices, validate reference check digits (see
//! `forfall_domain::reference`), remember which files were already imported, or read files: it
//! is pure, so the ingest service decides where bytes come from and what to do with the result.
//!
//! Credit entries become payments; debit, reversed and not-yet-booked entries are counted and
//! skipped, since none of them is money a debtor has paid. An entry booked as one batch with
//! several transaction details yields one payment per transaction, because each carries its own
//! payer and reference.
//!
//! By default a file is imported whole or not at all ([`parse`]): a half-imported file is hard
//! to re-import without double-counting. [`parse_lenient`] is for an operator who has seen the
//! problems and wants the valid payments anyway.

mod amount;

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use chrono::NaiveDate;
use forfall_domain::{Currency, Money};
use roxmltree::{Document, Node};
use serde::{Deserialize, Serialize};

use crate::amount::AmountError;

/// One credit that reached the account, as the bank reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CamtPayment {
    /// The bank's identification of this transaction, stable across re-sent files, so that a
    /// file imported twice can be recognised.
    pub transaction_id: String,
    pub amount: Money,
    /// The structured creditor reference (KID, OCR, FIK payment id, Finnish or RF reference),
    /// exactly as the bank reported it apart from surrounding whitespace.
    pub reference: Option<String>,
    /// Free-text remittance information, several lines joined with a space.
    pub remittance_text: Option<String>,
    pub payer_name: Option<String>,
    /// The payer's IBAN, or the bank's other account identification when there is no IBAN.
    pub payer_account: Option<String>,
    pub booking_date: NaiveDate,
    /// The entry's value date; the booking date when the bank left it out.
    pub value_date: NaiveDate,
    /// Line of the entry (or, in a batch-booked entry, of the transaction details) in the file,
    /// so that a person can find the payment in the bank's file.
    pub line: usize,
}

/// What one camt.054 file contained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Import {
    /// GrpHdr/MsgId: the bank's identification of the whole file.
    pub message_id: String,
    /// The message version from the namespace, e.g. "camt.054.001.08".
    pub version: String,
    pub payments: Vec<CamtPayment>,
    /// Debit entries, and debit transactions inside batch-booked credit entries.
    pub skipped_debits: usize,
    /// Entries with RvslInd true, whether they reverse a credit or a debit.
    pub skipped_reversals: usize,
    /// Entries whose status is not BOOK (pending, information only, future): the money is not
    /// on the account yet, so they must not mark an invoice paid.
    pub skipped_unbooked: usize,
}

/// One defect in a file, located so that a person can find it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub line: usize,
    /// Element path from the message's Document element, e.g.
    /// "/Document/BkToCstmrDbtCdtNtfctn/Ntfctn/Ntry/Amt"; "/@Ccy" names an attribute.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}: {}", self.line, self.path, self.message)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CamtError {
    /// Well-formed XML, but not a camt.054 message (another message type or version scheme).
    #[error("not a camt.054 file: found {found}")]
    NotCamt054 { found: String },
    /// Not well-formed XML, or not in an encoding this reader knows.
    #[error("line {line}: not well-formed XML: {message}")]
    Xml { line: usize, message: String },
    /// A camt.054 file with defects; every one is listed.
    #[error("{}", list_problems(.0))]
    Invalid(Vec<Problem>),
}

fn list_problems(problems: &[Problem]) -> String {
    let mut text = format!("camt.054 file refused, {} problem(s):", problems.len());
    for problem in problems {
        text.push('\n');
        text.push_str(&problem.to_string());
    }
    text
}

/// Reads a camt.054 file whole: any problem in any credit entry refuses the entire file.
pub fn parse(xml: &str) -> Result<Import, CamtError> {
    let (import, problems) = parse_lenient(xml)?;
    if problems.is_empty() {
        Ok(import)
    } else {
        Err(CamtError::Invalid(problems))
    }
}

/// Reads a camt.054 file, keeping the valid payments and listing the problems with the rest.
///
/// Still refuses files that are not XML, not camt.054, or lack the message identification,
/// since then nothing in them can be trusted or traced.
pub fn parse_lenient(xml: &str) -> Result<(Import, Vec<Problem>), CamtError> {
    // A byte-order mark survives decoding in files saved by Windows tools; it is not XML.
    let xml = xml.strip_prefix('\u{feff}').unwrap_or(xml);
    // The default options refuse DTDs, so a file cannot expand entities into gigabytes.
    let doc = Document::parse(xml).map_err(|e| xml_error(xml, &e))?;
    let (document, version) = find_document(&doc)?;
    let body = message_body(document, &version)?;
    let mut reader = Reader {
        ns: document.tag_name().namespace().unwrap_or_default(),
        lines: LineIndex::new(xml),
        problems: Vec::new(),
    };
    let message_id = reader.message_id(body)?;
    let mut import = Import {
        message_id,
        version,
        payments: Vec::new(),
        skipped_debits: 0,
        skipped_reversals: 0,
        skipped_unbooked: 0,
    };
    let entries: Vec<Node<'_, '_>> = reader
        .children(body, "Ntfctn")
        .flat_map(|notification| reader.children(notification, "Ntry"))
        .collect();
    let mut found = Vec::new();
    for entry in entries {
        reader.entry(entry, &mut import, &mut found);
    }
    import.payments = reader.unique_ids(found);
    let mut problems = reader.problems;
    problems.sort_by_key(|p| p.line);
    Ok((import, problems))
}

/// [`parse`] for raw file bytes: UTF-8 (with or without a byte-order mark), or ISO-8859-1 when
/// the XML declaration says so, as some older bank exports do.
pub fn parse_bytes(bytes: &[u8]) -> Result<Import, CamtError> {
    parse(&decode(bytes)?)
}

/// [`parse_lenient`] for raw file bytes; see [`parse_bytes`] for the encodings read.
pub fn parse_bytes_lenient(bytes: &[u8]) -> Result<(Import, Vec<Problem>), CamtError> {
    parse_lenient(&decode(bytes)?)
}

fn decode(bytes: &[u8]) -> Result<Cow<'_, str>, CamtError> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let declared = declared_encoding(bytes).map(|e| e.to_ascii_lowercase());
    match declared.as_deref() {
        None | Some("utf-8" | "utf8" | "us-ascii" | "ascii") => {
            std::str::from_utf8(bytes).map(Cow::Borrowed).map_err(|e| {
                let valid = &bytes[..e.valid_up_to()];
                CamtError::Xml {
                    line: 1 + valid.iter().filter(|&&b| b == b'\n').count(),
                    message: format!("byte {} is not valid UTF-8", e.valid_up_to()),
                }
            })
        }
        // ISO-8859-1 maps each byte to the code point of the same number.
        Some("iso-8859-1" | "latin1" | "latin-1" | "l1") => {
            Ok(Cow::Owned(bytes.iter().map(|&b| char::from(b)).collect()))
        }
        Some(other) => Err(CamtError::Xml {
            line: 1,
            message: format!("encoding '{other}' is not supported: expected UTF-8 or ISO-8859-1"),
        }),
    }
}

/// The encoding named in the XML declaration, if there is one.
fn declared_encoding(bytes: &[u8]) -> Option<String> {
    let declaration = bytes.strip_prefix(b"<?xml")?;
    let end = declaration.windows(2).position(|w| w == b"?>")?;
    let declaration = std::str::from_utf8(&declaration[..end]).ok()?;
    let after = declaration
        .split_once("encoding")?
        .1
        .trim_start()
        .strip_prefix('=')?
        .trim_start();
    let quote = after.chars().next().filter(|c| *c == '"' || *c == '\'')?;
    let value = after.strip_prefix(quote)?.split(quote).next()?;
    Some(value.trim().to_owned())
}

fn xml_error(xml: &str, error: &roxmltree::Error) -> CamtError {
    use roxmltree::Error as E;
    let lines = LineIndex::new(xml);
    // roxmltree reports line 1 for errors that have no position; point where a person should
    // look instead.
    let (line, message) = match error {
        E::DtdDetected => (
            lines.line_of(xml.find("<!DOCTYPE").unwrap_or_default()),
            "a DTD (<!DOCTYPE ...>) is not allowed in a bank file".to_owned(),
        ),
        E::UnexpectedEndOfStream | E::UnclosedRootNode => (
            lines.line_of(xml.trim_end().len().saturating_sub(1)),
            format!("{error}: the file ends early, perhaps cut off in transfer"),
        ),
        other => (other.pos().row as usize, strip_position(&other.to_string())),
    };
    CamtError::Xml { line, message }
}

/// roxmltree appends " at ROW:COL" to its messages; the line is reported separately.
fn strip_position(message: &str) -> String {
    match message.rsplit_once(" at ") {
        Some((head, tail))
            if tail
                .split(':')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) =>
        {
            head.to_owned()
        }
        _ => message.to_owned(),
    }
}

const NS_PREFIX: &str = "urn:iso:std:iso:20022:tech:xsd:";
const BODY: &str = "/Document/BkToCstmrDbtCdtNtfctn";
const NTRY: &str = "/Document/BkToCstmrDbtCdtNtfctn/Ntfctn/Ntry";
const TX: &str = "/Document/BkToCstmrDbtCdtNtfctn/Ntfctn/Ntry/NtryDtls/TxDtls";

/// The camt.054.001.NN version named by a namespace, if it names one.
fn camt054_version(namespace: &str) -> Option<&str> {
    let version = namespace.strip_prefix(NS_PREFIX)?;
    let number = version.strip_prefix("camt.054.001.")?;
    (number.len() == 2 && number.bytes().all(|b| b.is_ascii_digit())).then_some(version)
}

fn is_camt054_document(node: Node<'_, '_>) -> bool {
    node.is_element()
        && node.tag_name().name() == "Document"
        && node.tag_name().namespace().and_then(camt054_version).is_some()
}

/// The camt.054 Document element: the root, or one wrapped in an envelope such as a business
/// application header, which some bank channels put around the message.
fn find_document<'a, 'i>(doc: &'a Document<'i>) -> Result<(Node<'a, 'i>, String), CamtError> {
    let root = doc.root_element();
    let document = if is_camt054_document(root) {
        Some(root)
    } else {
        root.descendants().find(|n| is_camt054_document(*n))
    };
    let Some(document) = document else {
        return Err(CamtError::NotCamt054 { found: describe(root) });
    };
    let version = document
        .tag_name()
        .namespace()
        .and_then(camt054_version)
        .unwrap_or_default();
    Ok((document, version.to_owned()))
}

fn message_body<'a, 'i>(document: Node<'a, 'i>, version: &str) -> Result<Node<'a, 'i>, CamtError> {
    let first = document.children().find(|n| n.is_element());
    match first {
        Some(body)
            if body.tag_name().name() == "BkToCstmrDbtCdtNtfctn"
                && body.tag_name().namespace() == document.tag_name().namespace() =>
        {
            Ok(body)
        }
        Some(other) => Err(CamtError::NotCamt054 {
            found: format!("a {version} Document holding {}", describe(other)),
        }),
        None => Err(CamtError::NotCamt054 {
            found: format!("an empty {version} Document"),
        }),
    }
}

fn describe(node: Node<'_, '_>) -> String {
    match node.tag_name().namespace() {
        Some(ns) => format!("<{}> in namespace '{ns}'", node.tag_name().name()),
        None => format!("<{}> without a namespace", node.tag_name().name()),
    }
}

/// Byte offset to line number, by binary search over line starts: asking the XML library for
/// each position would rescan the file from the top every time.
struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    fn new(text: &str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self { starts }
    }

    fn line_of(&self, offset: usize) -> usize {
        self.starts.partition_point(|&start| start <= offset)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Credit,
    Debit,
}

/// A payment found so far, with where its transaction id came from, for the duplicate check.
struct Found {
    payment: CamtPayment,
    id_path: &'static str,
}

/// The parts of a payment that come from TxDtls when the bank sends them.
#[derive(Default)]
struct Details {
    reference: Option<String>,
    remittance_text: Option<String>,
    payer_name: Option<String>,
    payer_account: Option<String>,
}

struct Reader<'t> {
    ns: &'t str,
    lines: LineIndex,
    problems: Vec<Problem>,
}

impl Reader<'_> {
    fn line(&self, node: Node<'_, '_>) -> usize {
        self.lines.line_of(node.range().start)
    }

    fn problem(&mut self, node: Node<'_, '_>, path: impl Into<String>, message: impl Into<String>) {
        let line = self.line(node);
        self.problems.push(Problem {
            line,
            path: path.into(),
            message: message.into(),
        });
    }

    fn is_named(&self, node: Node<'_, '_>, name: &str) -> bool {
        node.is_element() && node.tag_name().name() == name && node.tag_name().namespace() == Some(self.ns)
    }

    fn child<'a, 'i>(&self, node: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
        node.children().find(|c| self.is_named(*c, name))
    }

    fn children<'a, 'i, 's>(&'s self, node: Node<'a, 'i>, name: &'s str) -> impl Iterator<Item = Node<'a, 'i>> + 's
    where
        'a: 's,
        'i: 's,
    {
        node.children().filter(move |c| self.is_named(*c, name))
    }

    fn descend<'a, 'i>(&self, node: Node<'a, 'i>, names: &[&str]) -> Option<Node<'a, 'i>> {
        names.iter().try_fold(node, |node, name| self.child(node, name))
    }

    /// Trimmed text of the element at `names` below `node`; blank counts as absent, because
    /// banks fill optional elements with spaces rather than leave them out.
    fn text_at<'a>(&self, node: Node<'a, '_>, names: &[&str]) -> Option<&'a str> {
        self.descend(node, names).and_then(text)
    }

    fn message_id(&self, body: Node<'_, '_>) -> Result<String, CamtError> {
        match self.text_at(body, &["GrpHdr", "MsgId"]) {
            Some(id) => Ok(id.to_owned()),
            None => {
                let at = self.child(body, "GrpHdr").unwrap_or(body);
                let problem = Problem {
                    line: self.line(at),
                    path: format!("{BODY}/GrpHdr/MsgId"),
                    message: "missing: the file cannot be traced without its message identification".into(),
                };
                Err(CamtError::Invalid(vec![problem]))
            }
        }
    }

    fn entry(&mut self, ntry: Node<'_, '_>, import: &mut Import, found: &mut Vec<Found>) {
        let reversal = match self.child(ntry, "RvslInd") {
            None => false,
            Some(node) => match text(node) {
                Some("true" | "1") => true,
                Some("false" | "0") => false,
                other => {
                    let message = format!("'{}' is not a boolean (true or false)", other.unwrap_or_default());
                    self.problem(node, format!("{NTRY}/RvslInd"), message);
                    return;
                }
            },
        };
        let Some(direction) = self.direction(ntry, &format!("{NTRY}/CdtDbtInd"), true) else {
            return;
        };
        if reversal {
            import.skipped_reversals += 1;
            return;
        }
        if direction == Direction::Debit {
            import.skipped_debits += 1;
            return;
        }
        if !self.is_booked(ntry) {
            import.skipped_unbooked += 1;
            return;
        }

        let money = match self.child(ntry, "Amt") {
            Some(node) => self.money(node, &format!("{NTRY}/Amt")),
            None => {
                self.problem(ntry, format!("{NTRY}/Amt"), "missing");
                None
            }
        };
        let booking_date = match self.date_choice(ntry, "BookgDt", &format!("{NTRY}/BookgDt")) {
            Ok(Some(date)) => Some(date),
            Ok(None) => {
                self.problem(
                    ntry,
                    format!("{NTRY}/BookgDt"),
                    "missing: a booked entry needs its booking date",
                );
                None
            }
            Err(()) => None,
        };
        let value_date = self.date_choice(ntry, "ValDt", &format!("{NTRY}/ValDt"));
        let (Some(money), Some(booking_date), Ok(value_date)) = (money, booking_date, value_date) else {
            return;
        };
        let value_date = value_date.unwrap_or(booking_date);
        let entry = Entry {
            node: ntry,
            money,
            booking_date,
            value_date,
            reference: self.text_at(ntry, &["AcctSvcrRef"]),
        };
        let transactions: Vec<Node<'_, '_>> = self
            .children(ntry, "NtryDtls")
            .flat_map(|details| self.children(details, "TxDtls"))
            .collect();
        match transactions.as_slice() {
            [] => self.single(&entry, None, found),
            [tx] => self.single(&entry, Some(*tx), found),
            many => self.batch(&entry, many, import, found),
        }
    }

    /// CdtDbtInd of an entry (required) or of a transaction (optional, from version 05 on).
    fn direction(&mut self, node: Node<'_, '_>, path: &str, required: bool) -> Option<Direction> {
        match self.child(node, "CdtDbtInd") {
            None if required => {
                self.problem(node, path, "missing: expected CRDT or DBIT");
                None
            }
            None => Some(Direction::Credit),
            Some(indicator) => match text(indicator) {
                Some("CRDT") => Some(Direction::Credit),
                Some("DBIT") => Some(Direction::Debit),
                other => {
                    let message = format!("'{}' is not CRDT or DBIT", other.unwrap_or_default());
                    self.problem(indicator, path, message);
                    None
                }
            },
        }
    }

    /// Sts is a code in version 02 and a choice of Cd or Prtry from 05 on; files without it
    /// are taken as booked, since notifications of booked entries are what banks send.
    fn is_booked(&self, ntry: Node<'_, '_>) -> bool {
        let Some(status) = self.child(ntry, "Sts") else {
            return true;
        };
        let code = self
            .text_at(status, &["Cd"])
            .or_else(|| self.text_at(status, &["Prtry"]))
            .or_else(|| text(status));
        code.is_none_or(|code| code == "BOOK")
    }

    fn money(&mut self, node: Node<'_, '_>, path: &str) -> Option<Money> {
        let currency = match node.attribute("Ccy").map(str::trim).filter(|c| !c.is_empty()) {
            None => {
                self.problem(node, format!("{path}/@Ccy"), "missing currency");
                return None;
            }
            Some(code) => match code.parse::<Currency>() {
                Ok(currency) => currency,
                Err(e) => {
                    self.problem(node, format!("{path}/@Ccy"), e.to_string());
                    return None;
                }
            },
        };
        let raw = node.text().unwrap_or_default().trim();
        match amount::parse_minor(raw, currency.exponent()) {
            Ok(minor) => Some(Money::new(minor, currency)),
            Err(e) => {
                let message = match e {
                    AmountError::NotAnAmount => format!("'{raw}' is not an amount"),
                    AmountError::Negative => format!("'{raw}' is negative; a credit must be positive"),
                    AmountError::Zero => format!("'{raw}' is zero; a credit must be positive"),
                    AmountError::TooManyDecimals { found } => {
                        format!(
                            "'{raw}' has {found} decimals, but {currency} has {}",
                            currency.exponent()
                        )
                    }
                    AmountError::TooLarge => format!("'{raw}' is too large"),
                };
                self.problem(node, path, message);
                None
            }
        }
    }

    /// A DateAndDateTimeChoice: Ok(None) when the element is absent, Err after recording a
    /// problem when it is present but unreadable.
    fn date_choice(&mut self, parent: Node<'_, '_>, name: &str, path: &str) -> Result<Option<NaiveDate>, ()> {
        let Some(choice) = self.child(parent, name) else {
            return Ok(None);
        };
        if let Some(node) = self.child(choice, "Dt") {
            let raw = node.text().unwrap_or_default().trim();
            return match parse_date(raw) {
                Some(date) => Ok(Some(date)),
                None => {
                    self.problem(
                        node,
                        format!("{path}/Dt"),
                        format!("'{raw}' is not a date (YYYY-MM-DD)"),
                    );
                    Err(())
                }
            };
        }
        if let Some(node) = self.child(choice, "DtTm") {
            let raw = node.text().unwrap_or_default().trim();
            return match parse_date_time(raw) {
                Some(date) => Ok(Some(date)),
                None => {
                    let message = format!("'{raw}' is not a date and time (YYYY-MM-DDThh:mm:ss)");
                    self.problem(node, format!("{path}/DtTm"), message);
                    Err(())
                }
            };
        }
        self.problem(choice, path, "expected Dt or DtTm inside");
        Err(())
    }

    /// An entry with at most one TxDtls: the booked entry amount is the payment.
    fn single(&mut self, entry: &Entry<'_, '_>, tx: Option<Node<'_, '_>>, found: &mut Vec<Found>) {
        let at = tx.unwrap_or(entry.node);
        let id = tx
            .and_then(|tx| {
                self.text_at(tx, &["Refs", "AcctSvcrRef"])
                    .map(|id| (id.to_owned(), TX_ACCT_SVCR_REF))
            })
            .or_else(|| entry.reference.map(|id| (id.to_owned(), NTRY_ACCT_SVCR_REF)))
            .or_else(|| {
                tx.and_then(|tx| self.end_to_end_id(tx))
                    .map(|id| (id.to_owned(), TX_END_TO_END_ID))
            });
        let Some((transaction_id, id_path)) = id else {
            self.missing_id(at, tx.is_some());
            return;
        };
        let details = tx.map(|tx| self.details(tx)).unwrap_or_default();
        found.push(Found {
            payment: entry.payment(transaction_id, entry.money, details, self.line(entry.node)),
            id_path,
        });
    }

    /// A batch-booked entry: one payment per TxDtls, each with its own amount, and the amounts
    /// must add up to what was booked, or some credit is unaccounted for.
    fn batch(
        &mut self,
        entry: &Entry<'_, '_>,
        transactions: &[Node<'_, '_>],
        import: &mut Import,
        found: &mut Vec<Found>,
    ) {
        let mut payments = Vec::new();
        // None once some amount is unreadable: the sum can then prove nothing.
        let mut net = Some(0i64);
        for (position, tx) in transactions.iter().copied().enumerate() {
            let Some(direction) = self.direction(tx, &format!("{TX}/CdtDbtInd"), false) else {
                net = None;
                continue;
            };
            let Some(money) = self.transaction_amount(tx, entry.money.currency) else {
                net = None;
                continue;
            };
            let signed = if direction == Direction::Debit {
                -money.minor
            } else {
                money.minor
            };
            net = net.and_then(|n| n.checked_add(signed));
            if direction == Direction::Debit {
                import.skipped_debits += 1;
                continue;
            }
            let id = self
                .text_at(tx, &["Refs", "AcctSvcrRef"])
                .map(|id| (id.to_owned(), TX_ACCT_SVCR_REF))
                // The entry's reference is shared by every transaction in the batch; its position
                // makes it unique and is stable when the bank sends the same file again.
                .or_else(|| {
                    entry
                        .reference
                        .map(|r| (format!("{r}/{}", position + 1), NTRY_ACCT_SVCR_REF))
                })
                .or_else(|| self.end_to_end_id(tx).map(|id| (id.to_owned(), TX_END_TO_END_ID)));
            let Some((transaction_id, id_path)) = id else {
                self.missing_id(tx, true);
                continue;
            };
            let details = self.details(tx);
            payments.push(Found {
                payment: entry.payment(transaction_id, money, details, self.line(tx)),
                id_path,
            });
        }
        if let Some(net) = net.filter(|&net| net != entry.money.minor) {
            let at = self.child(entry.node, "Amt").unwrap_or(entry.node);
            let exponent = entry.money.currency.exponent();
            let message = format!(
                "the entry amount {} {currency} differs from the sum {} {currency} of its {} transactions",
                amount::format_minor(entry.money.minor, exponent),
                amount::format_minor(net, exponent),
                transactions.len(),
                currency = entry.money.currency,
            );
            self.problem(at, format!("{NTRY}/Amt"), message);
            return;
        }
        found.extend(payments);
    }

    fn transaction_amount(&mut self, tx: Node<'_, '_>, currency: Currency) -> Option<Money> {
        let (node, path) = match self.child(tx, "Amt") {
            Some(node) => (node, format!("{TX}/Amt")),
            None => match self.descend(tx, &["AmtDtls", "TxAmt", "Amt"]) {
                Some(node) => (node, format!("{TX}/AmtDtls/TxAmt/Amt")),
                None => {
                    let message = "missing: a batch-booked transaction needs TxDtls/Amt or TxDtls/AmtDtls/TxAmt/Amt";
                    self.problem(tx, format!("{TX}/Amt"), message);
                    return None;
                }
            },
        };
        let money = self.money(node, &path)?;
        if money.currency != currency {
            let message = format!("currency {} differs from the entry's {currency}", money.currency);
            self.problem(node, format!("{path}/@Ccy"), message);
            return None;
        }
        Some(money)
    }

    /// "NOTPROVIDED" is the ISO placeholder for a payer who gave no end-to-end id; it names
    /// nothing, and would make every such payment look like a duplicate of the others.
    fn end_to_end_id<'a>(&self, tx: Node<'a, '_>) -> Option<&'a str> {
        self.text_at(tx, &["Refs", "EndToEndId"])
            .filter(|id| *id != "NOTPROVIDED")
    }

    fn missing_id(&mut self, at: Node<'_, '_>, has_details: bool) {
        let path = if has_details {
            TX_ACCT_SVCR_REF
        } else {
            NTRY_ACCT_SVCR_REF
        };
        let message = "no transaction id: none of TxDtls/Refs/AcctSvcrRef, Ntry/AcctSvcrRef or \
                       TxDtls/Refs/EndToEndId (other than NOTPROVIDED) is given";
        self.problem(at, path, message);
    }

    fn details(&self, tx: Node<'_, '_>) -> Details {
        let remittance = self.child(tx, "RmtInf");
        let reference = remittance.and_then(|rmt| {
            self.children(rmt, "Strd")
                .find_map(|strd| self.text_at(strd, &["CdtrRefInf", "Ref"]))
        });
        let lines: Vec<&str> = remittance
            .map(|rmt| self.children(rmt, "Ustrd").filter_map(text).collect())
            .unwrap_or_default();
        let parties = self.child(tx, "RltdPties");
        // Version 02 names the debtor directly; from 08 on Dbtr is a choice of party or agent.
        let payer_name = parties.and_then(|p| {
            self.text_at(p, &["Dbtr", "Nm"])
                .or_else(|| self.text_at(p, &["Dbtr", "Pty", "Nm"]))
        });
        let payer_account = parties.and_then(|p| {
            self.text_at(p, &["DbtrAcct", "Id", "IBAN"])
                .or_else(|| self.text_at(p, &["DbtrAcct", "Id", "Othr", "Id"]))
        });
        Details {
            reference: reference.map(str::to_owned),
            remittance_text: (!lines.is_empty()).then(|| lines.join(" ")),
            payer_name: payer_name.map(str::to_owned),
            payer_account: payer_account.map(str::to_owned),
        }
    }

    /// Drops every payment whose transaction id an earlier payment in the file already has:
    /// downstream, the id is what makes re-importing a file harmless, so two different credits
    /// under one id would lose one of them.
    fn unique_ids(&mut self, found: Vec<Found>) -> Vec<CamtPayment> {
        let mut first_line: HashMap<String, usize> = HashMap::new();
        let mut payments = Vec::with_capacity(found.len());
        for Found { payment, id_path } in found {
            if let Some(line) = first_line.get(&payment.transaction_id) {
                self.problems.push(Problem {
                    line: payment.line,
                    path: id_path.to_owned(),
                    message: format!(
                        "transaction id '{}' is already used by the payment at line {line}",
                        payment.transaction_id
                    ),
                });
                continue;
            }
            first_line.insert(payment.transaction_id.clone(), payment.line);
            payments.push(payment);
        }
        payments
    }
}

const NTRY_ACCT_SVCR_REF: &str = "/Document/BkToCstmrDbtCdtNtfctn/Ntfctn/Ntry/AcctSvcrRef";
const TX_ACCT_SVCR_REF: &str = "/Document/BkToCstmrDbtCdtNtfctn/Ntfctn/Ntry/NtryDtls/TxDtls/Refs/AcctSvcrRef";
const TX_END_TO_END_ID: &str = "/Document/BkToCstmrDbtCdtNtfctn/Ntfctn/Ntry/NtryDtls/TxDtls/Refs/EndToEndId";

/// What every payment from one entry shares.
struct Entry<'a, 'i> {
    node: Node<'a, 'i>,
    money: Money,
    booking_date: NaiveDate,
    value_date: NaiveDate,
    reference: Option<&'a str>,
}

impl Entry<'_, '_> {
    fn payment(&self, transaction_id: String, amount: Money, details: Details, line: usize) -> CamtPayment {
        CamtPayment {
            transaction_id,
            amount,
            reference: details.reference,
            remittance_text: details.remittance_text,
            payer_name: details.payer_name,
            payer_account: details.payer_account,
            booking_date: self.booking_date,
            value_date: self.value_date,
            line,
        }
    }
}

fn text<'a>(node: Node<'a, '_>) -> Option<&'a str> {
    node.text().map(str::trim).filter(|t| !t.is_empty())
}

/// "YYYY-MM-DD", optionally with the time zone xsd:date allows; checked by hand because
/// chrono's parser also takes one-digit months and signed years, which no bank means.
fn parse_date(raw: &str) -> Option<NaiveDate> {
    let date = parse_ymd(raw)?;
    is_zone(&raw[10..]).then_some(date)
}

/// "YYYY-MM-DDThh:mm:ss" with optional fraction and zone; the date as written is the date the
/// bank means, so the zone is checked but not applied.
fn parse_date_time(raw: &str) -> Option<NaiveDate> {
    let date = parse_ymd(raw)?;
    let rest = raw[10..].strip_prefix('T')?;
    let b = rest.as_bytes();
    if b.len() < 8 || b[2] != b':' || b[5] != b':' {
        return None;
    }
    let hour = two_digits(&b[0..2])?;
    let minute = two_digits(&b[3..5])?;
    let second = two_digits(&b[6..8])?;
    if hour > 24 || minute > 59 || second > 60 {
        return None;
    }
    let mut rest = &rest[8..];
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &fraction[digits..];
    }
    is_zone(rest).then_some(date)
}

fn parse_ymd(raw: &str) -> Option<NaiveDate> {
    let b = raw.as_bytes();
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' || !b[..4].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let year = std::str::from_utf8(&b[..4]).ok()?.parse().ok()?;
    NaiveDate::from_ymd_opt(year, two_digits(&b[5..7])?, two_digits(&b[8..10])?)
}

fn two_digits(b: &[u8]) -> Option<u32> {
    match b {
        [t, u] if t.is_ascii_digit() && u.is_ascii_digit() => Some(u32::from(t - b'0') * 10 + u32::from(u - b'0')),
        _ => None,
    }
}

fn is_zone(rest: &str) -> bool {
    match rest.as_bytes() {
        [] | [b'Z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => [h1, h2, m1, m2].iter().all(|d| d.is_ascii_digit()),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_dates_and_date_times() {
        let day = NaiveDate::from_ymd_opt(2024, 3, 5);
        assert_eq!(parse_date("2024-03-05"), day);
        assert_eq!(parse_date("2024-03-05+01:00"), day);
        assert_eq!(parse_date("2024-03-05Z"), day);
        assert_eq!(parse_date("2024-3-5"), None);
        assert_eq!(parse_date("2024-02-30"), None);
        assert_eq!(parse_date("05.03.2024"), None);
        assert_eq!(parse_date_time("2024-03-05T10:15:00"), day);
        assert_eq!(parse_date_time("2024-03-05T10:15:00.123+02:00"), day);
        assert_eq!(parse_date_time("2024-03-05T23:59:59Z"), day);
        assert_eq!(parse_date_time("2024-03-05"), None);
        assert_eq!(parse_date_time("2024-03-05T25:00:00"), None);
        assert_eq!(parse_date_time("2024-03-05T10:15"), None);
    }

    #[test]
    fn finds_lines_by_offset() {
        let index = LineIndex::new("a\nbc\n\nd");
        assert_eq!(index.line_of(0), 1);
        assert_eq!(index.line_of(1), 1);
        assert_eq!(index.line_of(2), 2);
        assert_eq!(index.line_of(5), 3);
        assert_eq!(index.line_of(6), 4);
    }

    #[test]
    fn accepts_every_two_digit_camt054_version() {
        assert_eq!(
            camt054_version("urn:iso:std:iso:20022:tech:xsd:camt.054.001.02"),
            Some("camt.054.001.02")
        );
        assert_eq!(
            camt054_version("urn:iso:std:iso:20022:tech:xsd:camt.054.001.13"),
            Some("camt.054.001.13")
        );
        assert_eq!(camt054_version("urn:iso:std:iso:20022:tech:xsd:camt.053.001.02"), None);
        assert_eq!(camt054_version("urn:iso:std:iso:20022:tech:xsd:camt.054.001.2"), None);
    }

    #[test]
    fn reads_the_declared_encoding() {
        assert_eq!(
            declared_encoding(b"<?xml version=\"1.0\" encoding='ISO-8859-1'?><a/>"),
            Some("ISO-8859-1".into())
        );
        assert_eq!(declared_encoding(b"<?xml version=\"1.0\"?><a/>"), None);
        assert_eq!(declared_encoding(b"<a/>"), None);
    }

    #[test]
    fn drops_the_position_roxmltree_appends() {
        assert_eq!(
            strip_position("unexpected end of stream at 3:7"),
            "unexpected end of stream"
        );
        assert_eq!(strip_position("look at this"), "look at this");
    }
}
