//! What ingest keeps per invoice, and how it is encoded in Redis.
//!
//! postcard with a format tag in front: a third of the JSON it replaced (a billing run's
//! million open invoices held about 980 bytes each as JSON). postcard carries no field names,
//! so bytes written with one shape of [`Stored`] only read with that shape: a change to it (or
//! to [`InvoiceSnapshot`], which the watcher's journey format shares) takes a new tag here,
//! and the reader of the old tag stays as long as a snapshot written with it can live
//! (`ingest.snapshot_retention_days`). Snapshots written as JSON before the tag still read.

use forfall_domain::invoice::InvoiceSnapshot;
use forfall_platform::kafka::Failure;
use serde::{Deserialize, Serialize};

/// The snapshot and the credit notes already applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Stored {
    pub snapshot: InvoiceSnapshot,
    pub credit_notes: Vec<String>,
}

const FORMAT_POSTCARD_V1: u8 = 1;

impl Stored {
    pub fn encode(&self) -> Result<Vec<u8>, Failure> {
        let mut body = vec![FORMAT_POSTCARD_V1];
        let encoded = postcard::to_allocvec(self)
            .map_err(|e| Failure::Fatal(anyhow::anyhow!("encoding an invoice's snapshot: {e}")))?;
        body.extend_from_slice(&encoded);
        Ok(body)
    }

    pub fn decode(body: &[u8]) -> Result<Self, Failure> {
        match body.split_first() {
            Some((&FORMAT_POSTCARD_V1, rest)) => postcard::from_bytes(rest).map_err(|e| {
                Failure::Fatal(anyhow::anyhow!(
                    "corrupt ingest state for an invoice (postcard v1): {e}"
                ))
            }),
            Some((b'{', _)) => serde_json::from_slice(body)
                .map_err(|e| Failure::Fatal(anyhow::anyhow!("corrupt ingest state for an invoice (JSON): {e}"))),
            Some((tag, _)) => Err(Failure::Fatal(anyhow::anyhow!(
                "ingest state for an invoice in format {tag}, which this ingest does not read (newer than it?)"
            ))),
            None => Err(Failure::Fatal(anyhow::anyhow!(
                "ingest state for an invoice without a body"
            ))),
        }
    }
}

/// A snapshot as Redis holds it, if it holds one.
pub(crate) fn parse_stored(raw: Option<Vec<u8>>) -> Result<Option<Stored>, Failure> {
    raw.as_deref().map(Stored::decode).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;
    use forfall_domain::invoice::{Contact, DebtorDetails, InvoiceStatus, PostalAddress};
    use forfall_domain::{Currency, DebtorKind, Jurisdiction, Money};

    fn stored() -> Stored {
        Stored {
            snapshot: InvoiceSnapshot {
                tenant: "nordkraft".into(),
                debtor_id: "cust-0042".into(),
                invoice_id: "INV-2026-000123".into(),
                revision: 2,
                invoice_number: "2026000123".into(),
                issue_date: NaiveDate::from_ymd_opt(2026, 10, 1).unwrap(),
                due_date: NaiveDate::from_ymd_opt(2026, 11, 2).unwrap(),
                amount: Money::new(128_450, Currency::SEK),
                credited_minor: 10_000,
                jurisdiction: Jurisdiction::SE,
                debtor_kind: DebtorKind::Consumer,
                status: InvoiceStatus::Open,
                payment_reference: Some("4605092222".into()),
                description: Some("El, oktober 2026".into()),
                contact: Contact {
                    name: Some("Åsa Lindqvist".into()),
                    email: Some("asa.lindqvist@example.se".into()),
                    phone: Some("+46701234567".into()),
                    language: Some("sv".into()),
                    preferred_channels: vec!["sms".into(), "email".into()],
                    declined_channels: vec![],
                    details: Some(DebtorDetails {
                        address: Some(PostalAddress {
                            lines: vec!["Storgatan 12".into()],
                            postal_code: "114 51".into(),
                            city: "Stockholm".into(),
                            country: "SE".into(),
                        }),
                        national_id: Some("198112189876".into()),
                        company_id: None,
                    }),
                },
                reminder_fee_agreed: true,
            },
            credit_notes: vec!["CN-77".into()],
        }
    }

    #[test]
    fn a_snapshot_round_trips_in_a_third_of_its_json() {
        let s = stored();
        let body = s.encode().unwrap();
        assert_eq!(Stored::decode(&body).unwrap(), s);
        let json = serde_json::to_vec(&s).unwrap();
        assert!(
            body.len() * 3 <= json.len(),
            "postcard {} bytes against JSON {}",
            body.len(),
            json.len()
        );
    }

    #[test]
    fn a_snapshot_written_as_json_still_reads() {
        let s = stored();
        let json = serde_json::to_vec(&s).unwrap();
        assert_eq!(Stored::decode(&json).unwrap(), s);
        assert_eq!(parse_stored(Some(json)).unwrap(), Some(s));
        assert_eq!(parse_stored(None).unwrap(), None);
    }

    #[test]
    fn an_unknown_format_or_a_broken_body_is_an_error_that_says_so() {
        let s = stored();
        let mut body = s.encode().unwrap();
        body[0] = 9;
        let e = format!("{:?}", Stored::decode(&body).unwrap_err());
        assert!(e.contains("format 9"), "{e}");
        let body = s.encode().unwrap();
        let e = format!("{:?}", Stored::decode(&body[..body.len() / 2]).unwrap_err());
        assert!(e.contains("corrupt"), "{e}");
        assert!(Stored::decode(b"").is_err());
    }
}
