//! The offline `forfall` commands, run as a user runs them.

use std::process::Command;

fn forfall(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_forfall"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("forfall runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn reference_generate_and_validate() {
    // ISO 11649's own example, printed in groups of four.
    assert_eq!(
        forfall(&["reference", "validate", "rf", "RF18539007547034"]),
        (0, "valid rf reference: RF18 5390 0754 7034\n".into(), String::new())
    );
    // Norwegian Wikipedia's MOD10 example: 234567 -> 2345676.
    assert_eq!(
        forfall(&["reference", "generate", "kid-mod10", "234567"]).1,
        "2345676\n"
    );
    let (code, _, err) = forfall(&["reference", "validate", "kid-mod10", "2345677"]);
    assert_eq!(code, 1);
    assert!(err.contains("check digit is 7, expected 6 (MOD10/Luhn)"), "{err}");
    let (code, _, err) = forfall(&["reference", "generate", "sepa", "1"]);
    assert_eq!(code, 2, "an unknown kind is a usage error");
    assert!(err.contains("sepa"), "{err}");
}

#[test]
fn law_show_lists_rules_with_citations_and_flags_what_is_unverified() {
    let (code, out, _) = forfall(&["law", "show", "DK"]);
    assert_eq!(code, 0);
    assert!(out.contains("renteloven § 9 b stk. 2"), "{out}");
    assert!(out.contains("reminder fee at most DKK\u{a0}100.00"), "{out}");
    assert!(out.contains("[verify"), "unverified values are marked: {out}");
    let (code, _, err) = forfall(&["law", "show", "DE"]);
    assert_eq!(code, 2);
    assert!(err.contains("expected DK, NO, SE or FI"), "{err}");
}

#[test]
fn law_show_refuses_an_unlawful_override_file() {
    let dir = std::env::temp_dir().join(format!("forfall-law-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let rules = dir.join("law.toml");
    let text = forfall_domain::law::BUILTIN_RULES.replacen("amount_minor = 10000", "amount_minor = -1", 1);
    std::fs::write(&rules, text).expect("write rules");
    let (code, _, err) = forfall(&["law", "show", "DK", "--rules", rules.to_str().expect("utf-8 path")]);
    assert_eq!(code, 1);
    assert!(
        err.contains("rule 'dk.reminder.max_fee': amount -1 must be positive"),
        "{err}"
    );
}

#[test]
fn calendar_banking_days_over_danish_easter_2026() {
    // Easter Sunday 2026 is 5 April: Maundy Thursday 2 April to Easter Monday 6 April are closed.
    let (code, out, _) = forfall(&["calendar", "banking-days", "DK", "2026-03-30", "2026-04-08"]);
    assert_eq!(code, 0);
    assert!(out.contains("2026-04-02 Thu closed: Maundy Thursday"), "{out}");
    assert!(
        out.ends_with("5 banking days in DK from 2026-03-30 to 2026-04-08\n"),
        "{out}"
    );
    let (code, _, err) = forfall(&["calendar", "banking-days", "SE", "2026-04-08", "2026-03-30"]);
    assert_eq!(code, 1);
    assert!(err.contains("is after TO"), "{err}");
}
