//! The file adapter, for agencies that take files instead of an API: one file per agency per
//! day, as JSON (`<agency>-<day>.json`, an array of cases exactly as the API would get them) and
//! as CSV (`<agency>-<day>.csv`, one row per case, amounts in minor units), in a directory the
//! agency collects from. The day is the case's claim date (the debtor's local day of the
//! hand-off), so a case delivered again goes to the same file. Recalls go to
//! `<agency>-<day>-recalls.json|csv`.
//!
//! Every write replaces the whole file atomically (written to a temporary file in the same
//! directory, synced, renamed), so the agency never picks up half a file. The JSON file is the
//! record of what was exported: a case already in it is not added again, and the CSV is
//! written from it each time (before the JSON), so the two agree even after a crash between
//! them. Writers on one machine take an exclusive lock on `.<agency>.lock` first.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use forfall_domain::invoice::date_from_epoch_days;
use forfall_platform::records::{HandoffCase, HandoffRecall};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The directory cannot be written now (full, unmounted, no permission): worth waiting out.
    #[error("cannot write the export in {dir}: {source}")]
    Io {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the export file {file} is not a JSON array of records: {detail}")]
    Corrupt { file: String, detail: String },
}

/// Whether the record was added, or was in the day's file already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exported {
    Added,
    AlreadyThere,
}

/// Writes cases and recalls into `dir` under the agency's name.
#[derive(Debug, Clone)]
pub struct FileExport {
    pub dir: PathBuf,
    pub agency: String,
}

impl FileExport {
    fn io(&self, source: std::io::Error) -> ExportError {
        ExportError::Io {
            dir: self.dir.display().to_string(),
            source,
        }
    }

    /// Adds the case to its day's files.
    pub fn case(&self, case: &HandoffCase) -> Result<(String, Exported), ExportError> {
        let day = case
            .claim_date
            .and_then(date_from_epoch_days)
            .unwrap_or_else(|| chrono::Utc::now().date_naive());
        let value = serde_json::to_value(case).map_err(|e| self.io(std::io::Error::other(e)))?;
        self.add(&self.base(day, ""), "case_id", &case.case_id, value, case_row)
    }

    /// Adds the recall to its day's recall files.
    pub fn recall(&self, recall: &HandoffRecall, day: NaiveDate) -> Result<(String, Exported), ExportError> {
        let value = serde_json::to_value(recall).map_err(|e| self.io(std::io::Error::other(e)))?;
        self.add(
            &self.base(day, "-recalls"),
            "event_id",
            &recall.event_id,
            value,
            recall_row,
        )
    }

    fn base(&self, day: NaiveDate, suffix: &str) -> String {
        format!("{}-{day}{suffix}", self.agency)
    }

    /// Adds `value` (identified by its `id_field`) to `<base>.json` and `<base>.csv`; the JSON
    /// file's name, and whether it was new.
    fn add(
        &self,
        base: &str,
        id_field: &str,
        id: &str,
        value: Value,
        row: fn(&Value) -> Vec<(&'static str, String)>,
    ) -> Result<(String, Exported), ExportError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| self.io(e))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(format!(".{}.lock", self.agency)))
            .map_err(|e| self.io(e))?;
        // Held until `lock` is closed (flock(2); std's File::lock is newer than our MSRV).
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| self.io(std::io::Error::from(e)))?;
        let json_path = self.dir.join(format!("{base}.json"));
        let mut all: Vec<Value> = match std::fs::read(&json_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ExportError::Corrupt {
                file: json_path.display().to_string(),
                detail: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(self.io(e)),
        };
        let name = format!("{base}.json");
        if all.iter().any(|v| v[id_field] == id) {
            return Ok((name, Exported::AlreadyThere));
        }
        all.push(value);
        let csv = to_csv(&all, row).map_err(|e| self.io(e))?;
        self.replace(&self.dir.join(format!("{base}.csv")), &csv)?;
        let json = serde_json::to_vec_pretty(&all).map_err(|e| self.io(std::io::Error::other(e)))?;
        self.replace(&json_path, &json)?;
        drop(lock);
        Ok((name, Exported::Added))
    }

    /// Replaces `path` with `bytes` at once: a temporary file beside it, synced, renamed.
    fn replace(&self, path: &Path, bytes: &[u8]) -> Result<(), ExportError> {
        let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("export");
        let tmp = path.with_file_name(format!(".{file_name}.{}.tmp", uuid::Uuid::new_v4().simple()));
        let written = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            // The rename itself is durable once the directory is.
            File::open(&self.dir)?.sync_all()
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.map_err(|e| self.io(e))
    }
}

fn to_csv(all: &[Value], row: fn(&Value) -> Vec<(&'static str, String)>) -> std::io::Result<Vec<u8>> {
    let mut out = csv::Writer::from_writer(Vec::new());
    let mut header_written = false;
    for value in all {
        let cells = row(value);
        if !header_written {
            out.write_record(cells.iter().map(|(name, _)| *name))?;
            header_written = true;
        }
        out.write_record(cells.iter().map(|(_, cell)| cell.as_str()))?;
    }
    out.into_inner().map_err(|e| std::io::Error::other(e.to_string()))
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn day(v: &Value) -> String {
    v.as_i64()
        .and_then(|d| i32::try_from(d).ok())
        .and_then(date_from_epoch_days)
        .map(|d| d.to_string())
        .unwrap_or_default()
}

/// A case as one CSV row: who, what for, how much (minor units, with the currency), and the
/// statutory warning.
fn case_row(c: &Value) -> Vec<(&'static str, String)> {
    let details = &c["debtor_details"];
    let address = &details["address"];
    let lines: Vec<String> = address["lines"].as_array().into_iter().flatten().map(text).collect();
    let warning = &c["collection_warning"];
    vec![
        ("case_id", text(&c["case_id"])),
        ("tenant", text(&c["tenant"])),
        ("debtor_id", text(&c["debtor_id"])),
        ("debtor_kind", text(&c["debtor_kind"])),
        ("debtor_name", text(&c["debtor_name"])),
        ("national_id", text(&details["national_id"])),
        ("company_id", text(&details["company_id"])),
        ("address", lines.join(", ")),
        ("postal_code", text(&address["postal_code"])),
        ("city", text(&address["city"])),
        ("country", text(&address["country"])),
        ("email", text(&c["email"])),
        ("phone", text(&c["phone"])),
        ("jurisdiction", text(&c["jurisdiction"])),
        ("invoice_id", text(&c["invoice_id"])),
        ("invoice_number", text(&c["invoice_number"])),
        ("payment_reference", text(&c["payment_reference"])),
        ("issue_date", day(&c["issue_date"])),
        ("due_date", day(&c["due_date"])),
        ("claim_date", day(&c["claim_date"])),
        ("currency", text(&c["currency"])),
        ("original_principal_minor", text(&c["original_principal_minor"])),
        ("paid_minor", text(&c["paid_minor"])),
        ("principal_minor", text(&c["principal_minor"])),
        ("fees_minor", text(&c["fees_minor"])),
        ("interest_minor", text(&c["interest_minor"])),
        ("compensation_minor", text(&c["compensation_minor"])),
        ("total_minor", text(&c["total_minor"])),
        ("warning_given", text(&warning["given"])),
        ("warning_sent_on", day(&warning["sent_on"])),
        ("warning_deadline", day(&warning["deadline"])),
        // Each message with its digest is in the JSON file; the row counts them.
        ("messages", c["messages"].as_array().map_or(0, Vec::len).to_string()),
        // A merged case's other claims are itemised in the JSON file; the row names them and
        // gives the sums the agency's fees are computed on.
        (
            "merged_invoice_numbers",
            c["merged_claims"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| text(&m["invoice_number"]))
                .collect::<Vec<_>>()
                .join(";"),
        ),
        ("combined_principal_minor", text(&c["combined_principal_minor"])),
        ("combined_total_minor", text(&c["combined_total_minor"])),
        ("policy_version", text(&c["policy_version"])),
    ]
}

/// A recall as one CSV row.
fn recall_row(r: &Value) -> Vec<(&'static str, String)> {
    [
        "event_id",
        "tenant",
        "debtor_id",
        "case_id",
        "invoice_id",
        "payment_id",
        "amount_minor",
        "currency",
        "reason",
        "remaining_minor",
    ]
    .into_iter()
    .map(|field| (field, text(&r[field])))
    .chain(std::iter::once((
        "kind",
        if r["remaining_minor"].as_i64().is_some_and(|left| left > 0) {
            "payment_on_case".to_owned()
        } else {
            "recall".to_owned()
        },
    )))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use forfall_platform::records::{DebtorDetails, PostalAddress};

    fn case(id: &str, total: i64) -> HandoffCase {
        HandoffCase {
            event_id: format!("e-{id}"),
            tenant: "nordkraft".into(),
            debtor_id: "nordkraft:kari".into(),
            occurred_at: 0,
            case_id: id.into(),
            invoice_id: format!("inv-{id}"),
            invoice_number: "70001".into(),
            issue_date: 20_500,
            due_date: 20_514,
            principal_minor: total,
            fees_minor: 0,
            currency: "NOK".into(),
            jurisdiction: "NO".into(),
            debtor_kind: "consumer".into(),
            payment_reference: None,
            steps_taken: vec!["nudge".into()],
            policy_version: "p".into(),
            debtor_name: Some("Kari, \"Nordmann\"".into()),
            email: None,
            phone: None,
            language: None,
            claim_date: Some(20_563),
            original_principal_minor: Some(total),
            paid_minor: Some(0),
            fee_lines: Vec::new(),
            interest_lines: Vec::new(),
            interest_minor: 0,
            interest_note: None,
            compensation_minor: 0,
            compensation_rule_id: None,
            compensation_citation: None,
            total_minor: Some(total),
            debtor_details: Some(DebtorDetails {
                address: Some(PostalAddress {
                    lines: vec!["Storgata 1".into(), "c/o Hansen".into()],
                    postal_code: "0155".into(),
                    city: "Oslo".into(),
                    country: "NO".into(),
                }),
                national_id: None,
                company_id: None,
            }),
            collection_warning: None,
            messages: Vec::new(),
            disputes: Vec::new(),
            merged_claims: Vec::new(),
            combined_principal_minor: Some(total),
            combined_total_minor: Some(total),
            merge_citation: None,
        }
    }

    fn export() -> FileExport {
        FileExport {
            dir: std::env::temp_dir().join(format!("forfall-export-{}", uuid::Uuid::new_v4().simple())),
            agency: "nordinkasso".into(),
        }
    }

    #[test]
    fn a_case_is_written_once_to_its_days_json_and_csv_and_nothing_half_written_stays() {
        let x = export();
        assert_eq!(
            x.case(&case("c1", 89_900)).unwrap(),
            ("nordinkasso-2026-04-20.json".into(), Exported::Added)
        );
        assert_eq!(x.case(&case("c1", 89_900)).unwrap().1, Exported::AlreadyThere);
        assert_eq!(x.case(&case("c2", 1_000)).unwrap().1, Exported::Added);
        let json: Vec<Value> =
            serde_json::from_slice(&std::fs::read(x.dir.join("nordinkasso-2026-04-20.json")).unwrap()).unwrap();
        assert_eq!(json.len(), 2);
        assert_eq!(json[0], serde_json::to_value(case("c1", 89_900)).unwrap());
        let mut csv = csv::Reader::from_path(x.dir.join("nordinkasso-2026-04-20.csv")).unwrap();
        let header = csv.headers().unwrap().clone();
        let rows: Vec<csv::StringRecord> = csv.records().map(Result::unwrap).collect();
        assert_eq!(rows.len(), 2);
        let cell = |row: &csv::StringRecord, name: &str| {
            row.get(header.iter().position(|h| h == name).unwrap())
                .unwrap()
                .to_owned()
        };
        assert_eq!(
            cell(&rows[0], "debtor_name"),
            "Kari, \"Nordmann\"",
            "quoted as CSV quotes"
        );
        assert_eq!(cell(&rows[0], "address"), "Storgata 1, c/o Hansen");
        assert_eq!(cell(&rows[0], "total_minor"), "89900");
        assert_eq!(cell(&rows[0], "claim_date"), "2026-04-20");
        assert_eq!(cell(&rows[1], "case_id"), "c2");
        let names: Vec<String> = std::fs::read_dir(&x.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn a_file_that_is_not_an_export_is_refused_not_overwritten() {
        let x = export();
        std::fs::create_dir_all(&x.dir).unwrap();
        std::fs::write(x.dir.join("nordinkasso-2026-04-20.json"), b"not json").unwrap();
        assert!(matches!(x.case(&case("c1", 1)), Err(ExportError::Corrupt { .. })));
        assert_eq!(
            std::fs::read(x.dir.join("nordinkasso-2026-04-20.json")).unwrap(),
            b"not json"
        );
    }
}
