//! `forfall handoff preview TENANT DEBTOR`: the cases that would go to the agency today for a
//! debtor's open invoices, with every amount and citation, asked of the watcher (which composes
//! them exactly as a hand-off does) and sent nowhere.

use forfall_domain::invoice::date_from_epoch_days;
use forfall_domain::{Currency, Money};
use serde_json::Value;

#[derive(Debug, clap::Subcommand)]
pub enum HandoffCommand {
    /// The cases that would go to the agency today for a debtor's open invoices.
    Preview(PreviewArgs),
}

#[derive(Debug, clap::Args)]
pub struct PreviewArgs {
    pub tenant: String,
    /// The debtor's id (as billing sends it, namespaced by tenant).
    pub debtor: String,
    /// The watcher's HTTP address.
    #[arg(long, env = "FORFALL_WATCHER_URL", default_value = "http://127.0.0.1:9602")]
    pub watcher: String,
    /// The watcher's staff token (`watcher.staff_token`).
    #[arg(long, env = "FORFALL_STAFF_TOKEN", hide_env_values = true)]
    pub token: String,
    /// JSON (the cases as the agency would get them) instead of text.
    #[arg(long)]
    pub json: bool,
}

pub async fn handoff(cmd: HandoffCommand) -> anyhow::Result<()> {
    let HandoffCommand::Preview(args) = cmd;
    let url = format!(
        "{}/v1/handoff/preview/{}/{}",
        args.watcher.trim_end_matches('/'),
        crate::tools::urlencode(&args.tenant),
        crate::tools::urlencode(&args.debtor)
    );
    let body = crate::tools::staff_get(&url, &[], &args.token, "watcher", &args.watcher).await?;
    let cases: Vec<Value> = serde_json::from_str(&body)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&cases)?);
    } else {
        print!("{}", render(&args.tenant, &args.debtor, &cases));
    }
    Ok(())
}

/// The cases as text: one block per case, one line per amount, each with its rule.
pub fn render(tenant: &str, debtor: &str, cases: &[Value]) -> String {
    if cases.is_empty() {
        return format!("{debtor} of {tenant} has no open invoice: nothing would go to the agency\n");
    }
    let mut out = String::new();
    for case in cases {
        let currency = case["currency"].as_str().and_then(|c| c.parse::<Currency>().ok());
        let money = |v: &Value| {
            currency
                .map(|c| Money::new(v.as_i64().unwrap_or(0), c).to_string())
                .unwrap_or_else(|| v.to_string())
        };
        let day = |v: &Value| {
            v.as_i64()
                .and_then(|d| i32::try_from(d).ok())
                .and_then(date_from_epoch_days)
                .map_or_else(|| "?".to_owned(), |d| d.to_string())
        };
        let text = |v: &Value| v.as_str().unwrap_or("").to_owned();
        out.push_str(&format!(
            "invoice {} ({}) of {}, as of {}: would go to the agency today\n",
            text(&case["invoice_number"]),
            text(&case["invoice_id"]),
            tenant,
            day(&case["claim_date"]),
        ));
        out.push_str(&format!(
            "  debtor       {} ({} debtor, {})\n",
            debtor,
            text(&case["debtor_kind"]),
            text(&case["jurisdiction"])
        ));
        out.push_str(&format!(
            "  principal    {} left of {} (paid {}), due {}\n",
            money(&case["principal_minor"]),
            money(&case["original_principal_minor"]),
            money(&case["paid_minor"]),
            day(&case["due_date"])
        ));
        for fee in case["fee_lines"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "  fee          {} on {} ({}): {}\n",
                money(&fee["amount_minor"]),
                day(&fee["date"]),
                text(&fee["step"]),
                fee["citation"].as_str().unwrap_or("no rule caps it")
            ));
        }
        for line in case["interest_lines"].as_array().into_iter().flatten() {
            let (reference, margin) = (
                line["reference_bp"].as_i64().unwrap_or(0),
                line["margin_bp"].as_i64().unwrap_or(0),
            );
            out.push_str(&format!(
                "  interest     {} for {} to {} ({} days at {} = {} reference + {}): {}; rate: {}\n",
                money(&line["amount_minor"]),
                day(&line["first_day"]),
                day(&line["last_day"]),
                line["days"],
                percent(reference + margin),
                percent(reference),
                percent(margin),
                text(&line["citation"]),
                text(&line["rate_source"])
            ));
        }
        if let Some(note) = case["interest_note"].as_str() {
            out.push_str(&format!("  interest     ({note})\n"));
        }
        if case["compensation_minor"].as_i64().unwrap_or(0) > 0 {
            out.push_str(&format!(
                "  compensation {}: {}\n",
                money(&case["compensation_minor"]),
                text(&case["compensation_citation"])
            ));
        }
        out.push_str(&format!("  total        {}\n", money(&case["total_minor"])));
        let warning = &case["collection_warning"];
        if warning["given"] == true {
            out.push_str(&format!(
                "  warning      '{}' sent {}, {} days to pay (by {}); the law asks {} ({})\n",
                text(&warning["step"]),
                day(&warning["sent_on"]),
                warning["days_to_pay"],
                day(&warning["deadline"]),
                warning["required_days"],
                text(&warning["citation"])
            ));
        } else if warning["given"] == false {
            out.push_str(&format!(
                "  warning      none sent: the agency must give {} days first ({})\n",
                warning["required_days"],
                text(&warning["citation"])
            ));
        }
        for d in case["disputes"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "  dispute      raised {}: {}; {}\n",
                day(&d["opened"]),
                d["reason"].as_str().unwrap_or("no reason given"),
                match d["resolved"].as_i64() {
                    Some(_) => format!(
                        "resolved {}: {}",
                        day(&d["resolved"]),
                        d["resolution"].as_str().unwrap_or("no resolution given")
                    ),
                    None => "open".to_owned(),
                }
            ));
        }
        for m in case["messages"].as_array().into_iter().flatten() {
            let digest = text(&m["content_sha256"]);
            out.push_str(&format!(
                "  message      '{}' ({}) by {} on {}: {}; sha256 {}\n",
                text(&m["step"]),
                m["tone"].as_str().unwrap_or("no tone"),
                text(&m["channel"]),
                day(&m["sent_on"]),
                text(&m["delivery"]),
                if digest.is_empty() {
                    "not kept".to_owned()
                } else {
                    digest
                }
            ));
        }
    }
    out
}

/// Basis points as a percentage: 1225 → "12.25 %".
fn percent(bp: i64) -> String {
    let sign = if bp < 0 { "-" } else { "" };
    format!("{sign}{}.{:02} %", bp.abs() / 100, bp.abs() % 100)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_amount_is_shown_with_its_rule() {
        let case = json!({
            "invoice_number": "70001", "invoice_id": "no-1", "claim_date": 20_563, "due_date": 20_514,
            "debtor_kind": "consumer", "jurisdiction": "NO", "currency": "NOK",
            "principal_minor": 89_900, "original_principal_minor": 89_900, "paid_minor": 0,
            "fee_lines": [{"date": 20_528, "step": "purring", "amount_minor": 3_500,
                           "citation": "inkassoforskriften § 1-2"}],
            "interest_lines": [{"first_day": 20_515, "last_day": 20_563, "days": 49,
                                "reference_bp": 400, "margin_bp": 800, "amount_minor": 1_448,
                                "citation": "forsinkelsesrenteloven § 3", "rate_source": "FOR-2025-12-18"}],
            "interest_note": null, "compensation_minor": 0, "total_minor": 94_848,
            "collection_warning": {"given": true, "step": "inkassovarsel", "sent_on": 20_549,
                                   "days_to_pay": 14, "deadline": 20_563, "required_days": 14,
                                   "citation": "inkassoloven § 9"},
            "messages": [{"sent_at": 0, "sent_on": 20_528, "step": "purring", "tone": "reminder",
                          "channel": "sms", "delivery": "delivered", "content_sha256": "ab12",
                          "provider_message_id": "gw-1"}],
            "disputes": [{"opened": 20_530, "reason": "never ordered", "resolved": 20_535, "resolution": "delivered"}]
        });
        let text = render("nordkraft", "nordkraft:kari@example.test", &[case]);
        for want in [
            "invoice 70001 (no-1) of nordkraft, as of 2026-04-20",
            "principal    899.00 NOK left of 899.00 NOK (paid 0.00 NOK), due 2026-03-02",
            "fee          35.00 NOK on 2026-03-16 (purring): inkassoforskriften § 1-2",
            "interest     14.48 NOK for 2026-03-03 to 2026-04-20 (49 days at 12.00 % = 4.00 % reference + 8.00 %): forsinkelsesrenteloven § 3",
            "total        948.48 NOK",
            "warning      'inkassovarsel' sent 2026-04-06, 14 days to pay (by 2026-04-20); the law asks 14 (inkassoloven § 9)",
            "message      'purring' (reminder) by sms on 2026-03-16: delivered; sha256 ab12",
            "dispute      raised 2026-03-18: never ordered; resolved 2026-03-23: delivered",
        ] {
            assert!(text.contains(want), "missing '{want}' in:\n{text}");
        }
        assert_eq!(
            render("t", "t:d", &[]),
            "t:d of t has no open invoice: nothing would go to the agency\n"
        );
    }
}
