//! Rust mirrors of the Avro records in `schemas/` (the source of truth, embedded here).
//! A unit test checks each struct against its schema, so the two cannot drift apart.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use forfall_domain::invoice::{DebtorDetails, PostalAddress};

/// An Avro record type: its full name and its schema text.
pub trait Record: Serialize + DeserializeOwned + Send + Sync {
    const FULL_NAME: &'static str;
    const AVSC: &'static str;
}

macro_rules! record {
    ($ty:ident, $file:literal) => {
        impl Record for $ty {
            const FULL_NAME: &'static str = concat!("io.forfall.", stringify!($ty));
            const AVSC: &'static str = include_str!(concat!("../../../schemas/", $file));
        }
    };
}

/// Every record type, for registration at start and for the compatibility test.
pub const ALL_SCHEMAS: &[(&str, &str)] = &[
    (InvoiceIssued::FULL_NAME, InvoiceIssued::AVSC),
    (InvoiceCredited::FULL_NAME, InvoiceCredited::AVSC),
    (InvoiceCancelled::FULL_NAME, InvoiceCancelled::AVSC),
    (Invoice::FULL_NAME, Invoice::AVSC),
    (Rejected::FULL_NAME, Rejected::AVSC),
    (JourneyAction::FULL_NAME, JourneyAction::AVSC),
    (JourneyEvent::FULL_NAME, JourneyEvent::AVSC),
    (DispatchOutcome::FULL_NAME, DispatchOutcome::AVSC),
    (PaymentReceived::FULL_NAME, PaymentReceived::AVSC),
    (PaymentMatched::FULL_NAME, PaymentMatched::AVSC),
    (HandoffCase::FULL_NAME, HandoffCase::AVSC),
    (HandoffOutcome::FULL_NAME, HandoffOutcome::AVSC),
    (PaymentUnmatched::FULL_NAME, PaymentUnmatched::AVSC),
    (HandoffRecall::FULL_NAME, HandoffRecall::AVSC),
    (DebtorRequest::FULL_NAME, DebtorRequest::AVSC),
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvoiceIssued {
    pub event_id: String,
    pub tenant: String,
    pub debtor_id: String,
    pub occurred_at: i64,
    pub invoice_id: String,
    pub revision: i32,
    pub invoice_number: String,
    pub issue_date: i32,
    pub due_date: i32,
    pub amount_minor: i64,
    pub currency: String,
    pub jurisdiction: String,
    pub debtor_kind: String,
    pub payment_reference: Option<String>,
    pub description: Option<String>,
    pub debtor_name: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub language: Option<String>,
    #[serde(default)]
    pub preferred_channels: Vec<String>,
    #[serde(default)]
    pub declined_channels: Vec<String>,
    #[serde(default)]
    pub debtor_details: Option<DebtorDetails>,
    #[serde(default)]
    pub reminder_fee_agreed: Option<bool>,
}
record!(InvoiceIssued, "InvoiceIssued.avsc");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvoiceCredited {
    pub event_id: String,
    pub tenant: String,
    pub debtor_id: String,
    pub occurred_at: i64,
    pub invoice_id: String,
    pub credit_note_id: String,
    pub amount_minor: i64,
    pub currency: String,
}
record!(InvoiceCredited, "InvoiceCredited.avsc");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvoiceCancelled {
    pub event_id: String,
    pub tenant: String,
    pub debtor_id: String,
    pub occurred_at: i64,
    pub invoice_id: String,
    pub reason: Option<String>,
}
record!(InvoiceCancelled, "InvoiceCancelled.avsc");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InvoiceChange {
    Issued,
    Reissued,
    Credited,
    Cancelled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InvoiceStatus {
    Open,
    SettledByCredit,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Invoice {
    pub event_id: String,
    pub tenant: String,
    pub debtor_id: String,
    pub occurred_at: i64,
    pub invoice_id: String,
    pub revision: i32,
    pub change: InvoiceChange,
    pub source_event_id: String,
    pub invoice_number: String,
    pub issue_date: i32,
    pub due_date: i32,
    pub amount_minor: i64,
    pub credited_minor: i64,
    pub open_minor: i64,
    pub currency: String,
    pub jurisdiction: String,
    pub debtor_kind: String,
    pub status: InvoiceStatus,
    pub payment_reference: Option<String>,
    pub description: Option<String>,
    pub debtor_name: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub language: Option<String>,
    #[serde(default)]
    pub preferred_channels: Vec<String>,
    #[serde(default)]
    pub declined_channels: Vec<String>,
    /// The credit note a `Credited` snapshot applied.
    #[serde(default)]
    pub credit_note_id: Option<String>,
    #[serde(default)]
    pub debtor_details: Option<DebtorDetails>,
    #[serde(default)]
    pub reminder_fee_agreed: Option<bool>,
}
record!(Invoice, "Invoice.avsc");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rejected {
    pub event_id: String,
    pub tenant: Option<String>,
    pub debtor_id: Option<String>,
    pub occurred_at: i64,
    pub service: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub reason_code: String,
    pub detail: String,
    #[serde(with = "apache_avro::serde::bytes_opt")]
    pub raw_key: Option<Vec<u8>>,
    #[serde(with = "apache_avro::serde::bytes_opt")]
    pub raw_value: Option<Vec<u8>>,
}
record!(Rejected, "Rejected.avsc");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JourneyAction {
    pub event_id: String,
    pub tenant: String,
    pub debtor_id: String,
    pub occurred_at: i64,
    pub action_id: String,
    pub invoice_id: String,
    pub invoice_number: String,
    pub step: String,
    pub step_index: i32,
    pub tone: String,
    pub channels: Vec<String>,
    pub send_at: i64,
    pub open_minor: i64,
    pub fee_minor: i64,
    pub currency: String,
    pub due_date: i32,
    pub pay_by: Option<i32>,
    pub payment_reference: Option<String>,
    pub policy_version: String,
    pub jurisdiction: String,
    pub debtor_name: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub language: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    /// Late interest accrued to the send day, claimed if the invoice goes to collection; not
    /// part of `open_minor`.
    #[serde(default)]
    pub interest_minor: i64,
    #[serde(default)]
    pub interest_rate_bp: Option<i32>,
    /// The fixed compensation between businesses claimed if the invoice goes to collection.
    #[serde(default)]
    pub compensation_minor: i64,
    #[serde(default)]
    pub covers: Vec<CoveredInvoice>,
    /// The policy segment whose plan the journey follows.
    #[serde(default)]
    pub segment: Option<String>,
    /// `experiment/variant` when an experiment assigned the debtor.
    #[serde(default)]
    pub experiment: Option<String>,
}
record!(JourneyAction, "JourneyAction.avsc");

/// Another invoice a combined action covers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoveredInvoice {
    pub invoice_id: String,
    pub invoice_number: String,
    pub description: Option<String>,
    pub open_minor: i64,
    pub fee_minor: i64,
    pub due_date: i32,
    pub payment_reference: Option<String>,
    #[serde(default)]
    pub interest_minor: i64,
    #[serde(default)]
    pub compensation_minor: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JourneyEvent {
    pub event_id: String,
    pub tenant: String,
    pub debtor_id: String,
    pub occurred_at: i64,
    pub invoice_id: String,
    pub kind: String,
    pub from_state: String,
    pub to_state: String,
    pub step: Option<String>,
    pub rule: Option<String>,
    pub policy_version: String,
    pub reason: Option<String>,
    pub open_minor: i64,
    pub currency: String,
    /// What the journey does next if nothing changes, and when: the debtor's page says it.
    #[serde(default)]
    pub next_step: Option<String>,
    #[serde(default)]
    pub next_kind: Option<String>,
    #[serde(default)]
    pub next_at: Option<i64>,
    /// The policy segment and experiment assignment (`experiment/variant`) of the journey.
    #[serde(default)]
    pub segment: Option<String>,
    #[serde(default)]
    pub experiment: Option<String>,
    /// The fee this transition charged (a fee-bearing step sent).
    #[serde(default)]
    pub fee_minor: i64,
    /// On `plan_chosen`: the propensity score the plan was chosen with, and its model.
    #[serde(default)]
    pub propensity: Option<i32>,
    #[serde(default)]
    pub propensity_model: Option<String>,
    /// On `plan_chosen`: the propensity model's inputs by name, with or without a model.
    #[serde(default)]
    pub propensity_features: Vec<PropensityFeature>,
}
record!(JourneyEvent, "JourneyEvent.avsc");

/// One input of the propensity model, by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PropensityFeature {
    pub name: String,
    pub value: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DispatchStatus {
    Sent,
    Suppressed,
    Failed,
    Duplicate,
    Delivered,
    Bounced,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DispatchOutcome {
    pub event_id: String,
    pub tenant: String,
    pub debtor_id: String,
    pub occurred_at: i64,
    pub action_id: String,
    pub invoice_id: String,
    pub step: String,
    pub channel: String,
    pub status: DispatchStatus,
    pub reason: Option<String>,
    pub provider_message_id: Option<String>,
    #[serde(default)]
    pub content_sha256: Option<String>,
    #[serde(default)]
    pub covered_invoice_ids: Vec<String>,
}
record!(DispatchOutcome, "DispatchOutcome.avsc");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaymentReceived {
    pub event_id: String,
    pub tenant: String,
    pub debtor_id: Option<String>,
    pub occurred_at: i64,
    pub payment_id: String,
    pub amount_minor: i64,
    pub currency: String,
    pub reference: Option<String>,
    pub remittance_text: Option<String>,
    pub payer_name: Option<String>,
    pub payer_account: Option<String>,
    pub booking_date: i32,
    pub value_date: i32,
}
record!(PaymentReceived, "PaymentReceived.avsc");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaymentMatched {
    pub event_id: String,
    pub tenant: String,
    pub debtor_id: String,
    pub occurred_at: i64,
    pub payment_id: String,
    pub invoice_id: String,
    pub amount_minor: i64,
    pub currency: String,
    pub rule: String,
    pub reference: Option<String>,
    pub value_date: i32,
    #[serde(default)]
    pub matched_by: Option<String>,
}
record!(PaymentMatched, "PaymentMatched.avsc");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaymentUnmatched {
    pub event_id: String,
    pub tenant: String,
    pub debtor_id: Option<String>,
    pub occurred_at: i64,
    pub payment_id: String,
    pub amount_minor: i64,
    pub currency: String,
    pub reference: Option<String>,
    pub remittance_text: Option<String>,
    pub payer_name: Option<String>,
    pub payer_account: Option<String>,
    pub value_date: i32,
    pub reason_code: String,
    pub reason: String,
}
record!(PaymentUnmatched, "PaymentUnmatched.avsc");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandoffRecall {
    pub event_id: String,
    pub tenant: String,
    pub debtor_id: String,
    pub occurred_at: i64,
    pub case_id: String,
    pub invoice_id: String,
    pub payment_id: String,
    pub amount_minor: i64,
    pub currency: String,
    pub reason: String,
    #[serde(default)]
    pub remaining_minor: Option<i64>,
}
record!(HandoffRecall, "HandoffRecall.avsc");

impl HandoffRecall {
    /// The claim is paid in full, and the agency is to recall the case (rather than book a
    /// payment on it).
    pub fn recalls_case(&self) -> bool {
        self.remaining_minor.is_none_or(|r| r <= 0)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandoffCase {
    pub event_id: String,
    pub tenant: String,
    pub debtor_id: String,
    pub occurred_at: i64,
    pub case_id: String,
    pub invoice_id: String,
    pub invoice_number: String,
    pub issue_date: i32,
    pub due_date: i32,
    pub principal_minor: i64,
    pub fees_minor: i64,
    pub currency: String,
    pub jurisdiction: String,
    pub debtor_kind: String,
    pub payment_reference: Option<String>,
    pub steps_taken: Vec<String>,
    pub policy_version: String,
    pub debtor_name: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub language: Option<String>,
    /// The claim as of the hand-off day (cases written before it was itemised have none).
    #[serde(default)]
    pub claim_date: Option<i32>,
    #[serde(default)]
    pub original_principal_minor: Option<i64>,
    #[serde(default)]
    pub paid_minor: Option<i64>,
    #[serde(default)]
    pub fee_lines: Vec<CaseFee>,
    #[serde(default)]
    pub interest_lines: Vec<CaseInterest>,
    #[serde(default)]
    pub interest_minor: i64,
    #[serde(default)]
    pub interest_note: Option<String>,
    #[serde(default)]
    pub compensation_minor: i64,
    #[serde(default)]
    pub compensation_rule_id: Option<String>,
    #[serde(default)]
    pub compensation_citation: Option<String>,
    #[serde(default)]
    pub total_minor: Option<i64>,
    #[serde(default)]
    pub debtor_details: Option<DebtorDetails>,
    #[serde(default)]
    pub collection_warning: Option<CollectionWarning>,
    #[serde(default)]
    pub messages: Vec<CaseMessage>,
    #[serde(default)]
    pub disputes: Vec<CaseDispute>,
    #[serde(default)]
    pub merged_claims: Vec<CaseClaim>,
    #[serde(default)]
    pub combined_principal_minor: Option<i64>,
    #[serde(default)]
    pub combined_total_minor: Option<i64>,
    #[serde(default)]
    pub merge_citation: Option<String>,
}
record!(HandoffCase, "HandoffCase.avsc");

impl HandoffCase {
    /// Every invoice of the case: the lead's, then those merged into it.
    pub fn invoice_ids(&self) -> Vec<String> {
        std::iter::once(self.invoice_id.clone())
            .chain(self.merged_claims.iter().map(|c| c.invoice_id.clone()))
            .collect()
    }
}

/// A claim merged into a case (see `HandoffCase::merged_claims`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseClaim {
    pub invoice_id: String,
    pub invoice_number: String,
    pub issue_date: i32,
    pub due_date: i32,
    pub description: Option<String>,
    pub payment_reference: Option<String>,
    pub original_principal_minor: i64,
    pub paid_minor: i64,
    pub principal_minor: i64,
    pub fees_minor: i64,
    pub fee_lines: Vec<CaseFee>,
    pub interest_lines: Vec<CaseInterest>,
    pub interest_minor: i64,
    pub interest_note: Option<String>,
    pub compensation_minor: i64,
    pub total_minor: i64,
    pub collection_warning: Option<CollectionWarning>,
    pub messages: Vec<CaseMessage>,
    pub steps_taken: Vec<String>,
    #[serde(default)]
    pub disputes: Vec<CaseDispute>,
}

/// A dispute the debtor raised on a handed-over claim (personal data: never logged).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseDispute {
    pub opened: i32,
    pub reason: Option<String>,
    pub resolved: Option<i32>,
    pub resolution: Option<String>,
}

/// One message of a handed-over claim's journey, as evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseMessage {
    pub sent_at: i64,
    pub sent_on: i32,
    pub step: String,
    pub tone: Option<String>,
    pub channel: String,
    pub delivery: String,
    pub content_sha256: Option<String>,
    pub provider_message_id: Option<String>,
}

/// The statutory warning before collection, as a handed-over case tells it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectionWarning {
    pub given: bool,
    pub sent_on: Option<i32>,
    pub step: Option<String>,
    pub days_to_pay: Option<i32>,
    pub deadline: Option<i32>,
    pub required_days: Option<i32>,
    pub rule_id: Option<String>,
    pub citation: Option<String>,
}

/// A fee on a handed-over claim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseFee {
    pub date: Option<i32>,
    pub step: String,
    pub kind: Option<String>,
    pub amount_minor: i64,
    pub rule_id: Option<String>,
    pub citation: Option<String>,
}

/// Late interest for one half-year of a handed-over claim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseInterest {
    pub first_day: i32,
    pub last_day: i32,
    pub days: i32,
    pub reference_bp: i64,
    pub margin_bp: i64,
    pub principal_minor: i64,
    pub amount_minor: i64,
    pub rule_id: String,
    pub citation: String,
    pub rate_source: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HandoffStatus {
    Accepted,
    Rejected,
    Failed,
    /// The agency works the case.
    InCollection,
    /// The agency collected part of it (`collected_minor`).
    PartlyPaid,
    /// The agency collected all of it.
    Paid,
    /// The agency gave the case back to the creditor.
    Returned,
    /// The agency closed the case.
    Closed,
}

impl HandoffStatus {
    /// The agency's word for it on its webhook (`in_collection`...).
    pub fn parse_agency(word: &str) -> Option<Self> {
        Some(match word {
            "accepted" => HandoffStatus::Accepted,
            "rejected" => HandoffStatus::Rejected,
            "in_collection" => HandoffStatus::InCollection,
            "partly_paid" => HandoffStatus::PartlyPaid,
            "paid" => HandoffStatus::Paid,
            "returned" => HandoffStatus::Returned,
            "closed" => HandoffStatus::Closed,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandoffOutcome {
    pub event_id: String,
    pub tenant: String,
    pub debtor_id: String,
    pub occurred_at: i64,
    pub case_id: String,
    pub invoice_id: String,
    pub status: HandoffStatus,
    pub agency_reference: Option<String>,
    pub http_status: Option<i32>,
    pub detail: Option<String>,
    #[serde(default)]
    pub collected_minor: Option<i64>,
    #[serde(default)]
    pub currency: Option<String>,
    /// See [`Regarding`]; absent from producers before the field.
    #[serde(default)]
    pub regarding: Option<String>,
    #[serde(default)]
    pub invoice_ids: Vec<String>,
}
record!(HandoffOutcome, "HandoffOutcome.avsc");

/// What a `HandoffOutcome` answers (its `regarding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Regarding {
    /// Hand-off's delivery of the case.
    Case,
    /// Hand-off's report that the creditor was paid in full after hand-off: a recall.
    Recall,
    /// Hand-off's report of a part payment the creditor received after hand-off.
    PaymentOnCase,
    /// The agency's own word on the case, from its webhook.
    Agency,
}

impl Regarding {
    pub fn code(self) -> &'static str {
        match self {
            Regarding::Case => "case",
            Regarding::Recall => "recall",
            Regarding::PaymentOnCase => "payment_on_case",
            Regarding::Agency => "agency",
        }
    }
}

impl HandoffOutcome {
    /// What this outcome answers; outcomes from before the field tell by their status.
    pub fn regarding(&self) -> Regarding {
        match self.regarding.as_deref() {
            Some("recall") => Regarding::Recall,
            Some("payment_on_case") => Regarding::PaymentOnCase,
            Some("agency") => Regarding::Agency,
            Some(_) => Regarding::Case,
            None => match self.status {
                HandoffStatus::Accepted | HandoffStatus::Rejected | HandoffStatus::Failed => Regarding::Case,
                _ => Regarding::Agency,
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instalment {
    pub due_date: i32,
    pub amount_minor: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DebtorRequest {
    pub event_id: String,
    pub tenant: String,
    pub debtor_id: String,
    pub occurred_at: i64,
    pub invoice_id: String,
    pub kind: String,
    pub new_due_date: Option<i32>,
    pub promise_date: Option<i32>,
    pub instalments: Vec<Instalment>,
    pub reason: Option<String>,
    pub source: String,
}
record!(DebtorRequest, "DebtorRequest.avsc");

/// A fresh event id.
pub fn new_event_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A deterministic id from its parts, so that a redelivered input yields the same id.
pub fn derived_id(kind: &str, parts: &[&str]) -> String {
    let name = format!("{kind}\u{1f}{}", parts.join("\u{1f}"));
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::reader::datum::GenericDatumReader;
    use apache_avro::writer::datum::GenericDatumWriter;
    use apache_avro::{Reader, Schema, Writer, from_value};

    fn round_trip<T: Record + PartialEq + std::fmt::Debug>(value: T) {
        let schema = Schema::parse_str(T::AVSC).unwrap_or_else(|e| panic!("{}: {e}", T::FULL_NAME));
        let mut writer = Writer::new(&schema, Vec::new()).unwrap();
        writer
            .append_ser(&value)
            .unwrap_or_else(|e| panic!("{} does not fit its schema: {e}", T::FULL_NAME));
        let bytes = writer.into_inner().unwrap();
        let read = Reader::new(&bytes[..]).unwrap().next().unwrap().unwrap();
        let back: T = from_value(&read).unwrap();
        assert_eq!(back, value);

        // The codec writes and reads datums straight from and into the types; the bytes and
        // the values are those of the generic `Value` way.
        let generic = GenericDatumWriter::builder(&schema)
            .build()
            .unwrap()
            .write_value_to_vec(apache_avro::to_value(&value).unwrap())
            .unwrap();
        let direct = GenericDatumWriter::builder(&schema)
            .build()
            .unwrap()
            .write_ser_to_vec(&value)
            .unwrap();
        assert_eq!(direct, generic, "{} written straight differs", T::FULL_NAME);
        let reader = GenericDatumReader::builder(&schema).build().unwrap();
        let straight: T = reader.read_deser(&mut &generic[..]).unwrap();
        assert_eq!(straight, value, "{} read straight differs", T::FULL_NAME);
    }

    #[test]
    fn every_struct_matches_its_schema() {
        round_trip(InvoiceIssued {
            event_id: new_event_id(),
            tenant: "t".into(),
            debtor_id: "t:d".into(),
            occurred_at: 1_700_000_000_000,
            invoice_id: "i".into(),
            revision: 1,
            invoice_number: "1".into(),
            issue_date: 20_000,
            due_date: 20_014,
            amount_minor: 100,
            currency: "DKK".into(),
            jurisdiction: "DK".into(),
            debtor_kind: "consumer".into(),
            payment_reference: Some("r".into()),
            description: None,
            debtor_name: None,
            email: Some("a@b".into()),
            phone: None,
            language: Some("da".into()),
            preferred_channels: vec!["sms".into(), "email".into()],
            declined_channels: vec!["webhook".into()],
            debtor_details: Some(DebtorDetails {
                address: Some(PostalAddress {
                    lines: vec!["Storgata 1".into(), "c/o Hansen".into()],
                    postal_code: "0155".into(),
                    city: "Oslo".into(),
                    country: "NO".into(),
                }),
                national_id: Some("01019012345".into()),
                company_id: None,
            }),
            reminder_fee_agreed: Some(true),
        });
        round_trip(InvoiceCredited {
            event_id: "e".into(),
            tenant: "t".into(),
            debtor_id: "d".into(),
            occurred_at: 1,
            invoice_id: "i".into(),
            credit_note_id: "c".into(),
            amount_minor: 5,
            currency: "NOK".into(),
        });
        round_trip(InvoiceCancelled {
            event_id: "e".into(),
            tenant: "t".into(),
            debtor_id: "d".into(),
            occurred_at: 1,
            invoice_id: "i".into(),
            reason: None,
        });
        round_trip(Invoice {
            event_id: "e".into(),
            tenant: "t".into(),
            debtor_id: "d".into(),
            occurred_at: 1,
            invoice_id: "i".into(),
            revision: 2,
            change: InvoiceChange::Credited,
            source_event_id: "s".into(),
            invoice_number: "n".into(),
            issue_date: 1,
            due_date: 2,
            amount_minor: 10,
            credited_minor: 3,
            open_minor: 7,
            currency: "SEK".into(),
            jurisdiction: "SE".into(),
            debtor_kind: "business".into(),
            status: InvoiceStatus::SettledByCredit,
            payment_reference: None,
            description: Some("x".into()),
            debtor_name: None,
            email: None,
            phone: None,
            language: None,
            preferred_channels: Vec::new(),
            declined_channels: Vec::new(),
            credit_note_id: Some("cn-1".into()),
            debtor_details: Some(DebtorDetails {
                address: None,
                national_id: None,
                company_id: Some("556016-0680".into()),
            }),
            reminder_fee_agreed: None,
        });
        round_trip(Rejected {
            event_id: "e".into(),
            tenant: None,
            debtor_id: Some("d".into()),
            occurred_at: 1,
            service: "ingest".into(),
            source_topic: "t".into(),
            source_partition: 0,
            source_offset: 5,
            reason_code: "undecodable".into(),
            detail: "x".into(),
            raw_key: Some(vec![1, 2]),
            raw_value: None,
        });
        round_trip(JourneyAction {
            event_id: "e".into(),
            tenant: "t".into(),
            debtor_id: "d".into(),
            occurred_at: 1,
            action_id: "a".into(),
            invoice_id: "i".into(),
            invoice_number: "n".into(),
            step: "nudge".into(),
            step_index: 0,
            tone: "nudge".into(),
            channels: vec!["email".into()],
            send_at: 2,
            open_minor: 3,
            fee_minor: 0,
            currency: "EUR".into(),
            due_date: 4,
            pay_by: Some(5),
            payment_reference: None,
            policy_version: "p".into(),
            jurisdiction: "FI".into(),
            debtor_name: None,
            email: None,
            phone: None,
            language: None,
            description: Some("Electricity, August".into()),
            interest_minor: 0,
            interest_rate_bp: None,
            compensation_minor: 0,
            covers: vec![CoveredInvoice {
                invoice_id: "i2".into(),
                invoice_number: "n2".into(),
                description: None,
                open_minor: 5,
                fee_minor: 0,
                due_date: 3,
                payment_reference: Some("r".into()),
                interest_minor: 0,
                compensation_minor: 0,
            }],
            segment: Some("consumers".into()),
            experiment: Some("friendly/variant".into()),
        });
        round_trip(JourneyEvent {
            event_id: "e".into(),
            tenant: "t".into(),
            debtor_id: "d".into(),
            occurred_at: 1,
            invoice_id: "i".into(),
            kind: "opened".into(),
            from_state: "open".into(),
            to_state: "open".into(),
            step: None,
            rule: Some("r".into()),
            policy_version: "p".into(),
            reason: None,
            open_minor: 1,
            currency: "DKK".into(),
            next_step: Some("reminder_1".into()),
            next_kind: Some("reminder".into()),
            next_at: Some(86_400_000),
            segment: Some("consumers".into()),
            experiment: Some("friendly/variant".into()),
            fee_minor: 6_000,
            propensity: Some(73),
            propensity_model: Some("propensity-2026-12-03".into()),
            propensity_features: vec![
                PropensityFeature {
                    name: "late_last_12m".into(),
                    value: 2.0,
                },
                PropensityFeature {
                    name: "amount_vs_usual".into(),
                    value: -0.25,
                },
            ],
        });
        round_trip(DispatchOutcome {
            event_id: "e".into(),
            tenant: "t".into(),
            debtor_id: "d".into(),
            occurred_at: 1,
            action_id: "a".into(),
            invoice_id: "i".into(),
            step: "s".into(),
            channel: "email".into(),
            status: DispatchStatus::Suppressed,
            reason: Some("paid".into()),
            provider_message_id: None,
            content_sha256: Some("ab".repeat(32)),
            covered_invoice_ids: vec!["i2".into()],
        });
        round_trip(PaymentReceived {
            event_id: "e".into(),
            tenant: "t".into(),
            debtor_id: None,
            occurred_at: 1,
            payment_id: "p".into(),
            amount_minor: 1,
            currency: "DKK".into(),
            reference: Some("r".into()),
            remittance_text: None,
            payer_name: None,
            payer_account: None,
            booking_date: 1,
            value_date: 1,
        });
        round_trip(PaymentMatched {
            event_id: "e".into(),
            tenant: "t".into(),
            debtor_id: "d".into(),
            occurred_at: 1,
            payment_id: "p".into(),
            invoice_id: "i".into(),
            amount_minor: 1,
            currency: "DKK".into(),
            rule: "exact_reference".into(),
            reference: None,
            value_date: 3,
            matched_by: Some("ops@acme".into()),
        });
        round_trip(PaymentUnmatched {
            event_id: "e".into(),
            tenant: "t".into(),
            debtor_id: None,
            occurred_at: 1,
            payment_id: "p".into(),
            amount_minor: 5,
            currency: "SEK".into(),
            reference: Some("r".into()),
            remittance_text: None,
            payer_name: None,
            payer_account: Some("SE35".into()),
            value_date: 2,
            reason_code: "no_candidate".into(),
            reason: "nothing".into(),
        });
        round_trip(DebtorRequest {
            event_id: "e".into(),
            tenant: "t".into(),
            debtor_id: "d".into(),
            occurred_at: 1,
            invoice_id: "i".into(),
            kind: "instalment_plan".into(),
            new_due_date: None,
            promise_date: Some(3),
            instalments: vec![
                Instalment {
                    due_date: 5,
                    amount_minor: 100,
                },
                Instalment {
                    due_date: 35,
                    amount_minor: 99,
                },
            ],
            reason: None,
            source: "portal".into(),
        });
        round_trip(HandoffRecall {
            event_id: "e".into(),
            tenant: "t".into(),
            debtor_id: "d".into(),
            occurred_at: 1,
            case_id: "c".into(),
            invoice_id: "i".into(),
            payment_id: "p".into(),
            amount_minor: 9,
            currency: "NOK".into(),
            reason: "paid".into(),
            remaining_minor: Some(1_200),
        });
        round_trip(HandoffCase {
            event_id: "e".into(),
            tenant: "t".into(),
            debtor_id: "d".into(),
            occurred_at: 1,
            case_id: "c".into(),
            invoice_id: "i".into(),
            invoice_number: "n".into(),
            issue_date: 1,
            due_date: 2,
            principal_minor: 3,
            fees_minor: 0,
            currency: "NOK".into(),
            jurisdiction: "NO".into(),
            debtor_kind: "consumer".into(),
            payment_reference: None,
            steps_taken: vec!["nudge".into()],
            policy_version: "p".into(),
            debtor_name: None,
            email: None,
            phone: None,
            language: None,
            claim_date: Some(20_000),
            original_principal_minor: Some(3),
            paid_minor: Some(0),
            fee_lines: vec![CaseFee {
                date: Some(19_990),
                step: "reminder-1".into(),
                kind: Some("reminder".into()),
                amount_minor: 3_500,
                rule_id: Some("no.reminder.max_fee".into()),
                citation: Some("inkassoforskriften § 1-2".into()),
            }],
            interest_lines: vec![CaseInterest {
                first_day: 19_980,
                last_day: 20_000,
                days: 21,
                reference_bp: 400,
                margin_bp: 800,
                principal_minor: 3,
                amount_minor: 0,
                rule_id: "no.late_interest".into(),
                citation: "forsinkelsesrenteloven § 3".into(),
                rate_source: "FOR-2024-12-19-3279".into(),
            }],
            interest_minor: 0,
            interest_note: Some("none for 2026-H2".into()),
            compensation_minor: 0,
            compensation_rule_id: None,
            compensation_citation: None,
            total_minor: Some(3),
            debtor_details: None,
            collection_warning: Some(CollectionWarning {
                given: true,
                sent_on: Some(19_990),
                step: Some("inkassovarsel".into()),
                days_to_pay: Some(14),
                deadline: Some(20_004),
                required_days: Some(14),
                rule_id: Some("no.warning.days_to_pay".into()),
                citation: Some("inkassoloven § 9".into()),
            }),
            messages: vec![CaseMessage {
                sent_at: 1_700_000_000_000,
                sent_on: 19_676,
                step: "inkassovarsel".into(),
                tone: Some("collection_warning".into()),
                channel: "email".into(),
                delivery: "delivered".into(),
                content_sha256: Some("0f".repeat(32)),
                provider_message_id: Some("<a.email@forfall.test>".into()),
            }],
            disputes: vec![CaseDispute {
                opened: 19_995,
                reason: Some("the meter was read wrong".into()),
                resolved: Some(20_001),
                resolution: Some("reading confirmed by the grid operator".into()),
            }],
            merged_claims: vec![CaseClaim {
                invoice_id: "i2".into(),
                invoice_number: "1002".into(),
                issue_date: 19_990,
                due_date: 20_004,
                description: Some("Electricity, March".into()),
                payment_reference: None,
                original_principal_minor: 50_000,
                paid_minor: 0,
                principal_minor: 50_000,
                fees_minor: 0,
                fee_lines: Vec::new(),
                interest_lines: Vec::new(),
                interest_minor: 120,
                interest_note: None,
                compensation_minor: 0,
                total_minor: 50_120,
                collection_warning: None,
                messages: Vec::new(),
                steps_taken: vec!["nudge".into()],
                disputes: Vec::new(),
            }],
            combined_principal_minor: Some(139_900),
            combined_total_minor: Some(144_968),
            merge_citation: Some("Finanstilsynet rundskriv 1/2018".into()),
        });
        round_trip(HandoffOutcome {
            event_id: "e".into(),
            tenant: "t".into(),
            debtor_id: "d".into(),
            occurred_at: 1,
            case_id: "c".into(),
            invoice_id: "i".into(),
            status: HandoffStatus::Accepted,
            agency_reference: Some("X1".into()),
            http_status: Some(201),
            detail: None,
            collected_minor: None,
            currency: None,
            regarding: None,
            invoice_ids: vec!["i".into(), "i2".into()],
        });
        round_trip(HandoffOutcome {
            event_id: "e2".into(),
            tenant: "t".into(),
            debtor_id: "d".into(),
            occurred_at: 2,
            case_id: "c".into(),
            invoice_id: "i".into(),
            status: HandoffStatus::PartlyPaid,
            agency_reference: Some("X1".into()),
            http_status: None,
            detail: Some("instalment 1 of 3".into()),
            collected_minor: Some(30_000),
            currency: Some("NOK".into()),
            regarding: Some("agency".into()),
            invoice_ids: Vec::new(),
        });
    }

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        assert_eq!(
            derived_id("action", &["t", "i", "0"]),
            derived_id("action", &["t", "i", "0"])
        );
        assert_ne!(
            derived_id("action", &["t", "i", "0"]),
            derived_id("action", &["t", "i0", ""])
        );
    }
}
