//! The journey engine on the dev stack: policies, segments, experiments, law at load and reload.

use std::path::PathBuf;
use std::time::Duration;

use forfall_domain::jurisdiction::Jurisdiction;
use forfall_domain::law::LawBook;
use forfall_domain::policy;
use forfall_e2e::*;
use forfall_platform::clock::ManualClock;
use forfall_platform::records::{HandoffOutcome, JourneyAction, JourneyEvent};

fn policy_file(stack: &LocalStack, text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("{}-policy.toml", stack.prefix));
    std::fs::write(&path, text).expect("write policy");
    path
}

async fn events_of(stack: &LocalStack, invoice: &str) -> anyhow::Result<Vec<JourneyEvent>> {
    let all = stack
        .read::<JourneyEvent>(&stack.topic(&stack.topics().journey_events))
        .await?;
    Ok(all.into_iter().filter(|e| e.invoice_id == invoice).collect())
}

/// The invoice's `plan_chosen` event, once it can be read.
async fn plan_chosen(stack: &LocalStack, invoice: &str) -> anyhow::Result<JourneyEvent> {
    eventually(&format!("the plan choice of {invoice}"), WAIT, || async move {
        Ok(events_of(stack, invoice)
            .await?
            .into_iter()
            .find(|e| e.kind == "plan_chosen"))
    })
    .await
}

const STAFF_TOKEN: &str = "staff-token-for-tests";

const NORWAY: &str = r#"
version = "e2e-norway-1"

[claims]
late_interest = "statutory"

# The agency sends the warning before collection where the law asks for one (see README).
[handoff]
agency_sends_warning = ["DK", "NO"]

[[segment]]
name = "norway"
when = { jurisdiction = ["NO"] }
plan = "no-firm"

[[segment]]
name = "rest"
plan = "gentle"

[plan.no-firm]
step = [
  { name = "nudge", offset_banking_days = 0, channels = ["email"], tone = "nudge" },
  { name = "purring", offset_banking_days = 14, channels = ["email"], tone = "reminder", fee = "statutory_maximum", days_to_pay = 14 },
  { name = "inkassovarsel", offset_banking_days = 25, channels = ["email"], tone = "collection_warning", days_to_pay = 14 },
  { name = "handoff", offset_banking_days = 36, handoff = true },
]

[plan.gentle]
step = [
  { name = "nudge", offset_banking_days = 0, channels = ["email"], tone = "nudge" },
  { name = "handoff", offset_banking_days = 20, handoff = true },
]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unlawful_policy_is_refused_at_start_with_the_cited_rule() -> anyhow::Result<()> {
    let mut stack = LocalStack::start(base_config(), ManualClock::new(at("2026-03-01T08:00:00Z"))).await?;
    // Two fee-bearing Danish reminders five banking days apart.
    let purring = r#"{ name = "purring", offset_banking_days = 14, channels = ["email"], tone = "reminder", fee = "statutory_maximum", days_to_pay = 14 },"#;
    assert!(NORWAY.contains(purring), "the policy this test changes");
    let unlawful = NORWAY.replace(r#"jurisdiction = ["NO"]"#, r#"jurisdiction = ["DK"]"#).replace(
        purring,
        &format!(
            r#"{purring}
  {{ name = "purring-2", offset_banking_days = 19, channels = ["email"], tone = "reminder", fee = "statutory_maximum", days_to_pay = 14 }},"#
        ),
    );
    let path = policy_file(&stack, &unlawful);
    stack.set("watcher.policy_file", &path);
    // A watcher that starts after all runs until stopped: give it a minute, not forever.
    let started = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        forfall::run_target(stack.rt.clone(), "watcher"),
    )
    .await;
    let Ok(Err(err)) = started else {
        stack.rt.shutdown.cancel();
        anyhow::bail!("the watcher started with the unlawful policy:\n{unlawful}");
    };
    let text = format!("{err:#}");
    assert!(
        text.contains("plan 'no-firm' (segment 'norway') for DK consumer debtors: renteloven § 9 b stk. 2: fee-bearing reminders must be at least 10 days apart; 'purring-2' comes 5 days after 'purring'"),
        "{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_segment_plan_with_a_statutory_fee_runs_to_hand_off() -> anyhow::Result<()> {
    let clock = ManualClock::new(at("2026-03-01T08:00:00Z"));
    let mut stack = LocalStack::start(base_config(), clock.clone()).await?;
    let path = policy_file(&stack, NORWAY);
    stack.set("watcher.policy_file", &path);
    stack.set("watcher.staff_token", STAFF_TOKEN);
    stack.start_all();
    let s = Sample {
        tenant: "nordkraft",
        invoice_id: "no-1",
        number: "70001",
        due: day(2026, 3, 2),
        amount_minor: 89_900,
        currency: "NOK",
        jurisdiction: "NO",
        email: "kari@example.test",
        reference: "1234567890128",
        language: "nb",
    };
    // Billing knows where the debtor lives and who they are: the agency gets it.
    let mut issued = s.issued();
    let details = forfall_platform::records::DebtorDetails {
        address: Some(forfall_platform::records::PostalAddress {
            lines: vec!["Storgata 1".into()],
            postal_code: "0155".into(),
            city: "Oslo".into(),
            country: "NO".into(),
        }),
        national_id: Some("01019012345".into()),
        company_id: None,
    };
    issued.debtor_details = Some(details.clone());
    stack
        .produce(
            &stack.topic(&stack.topics().billing_invoice_events),
            &s.debtor_id(),
            &issued,
        )
        .await?;
    status_is(&stack, s.tenant, s.invoice_id, "open").await?;
    // When each step falls due, in Oslo's banking calendar, as the policy says.
    let plan = policy::load(NORWAY, &LawBook::builtin()?, day(2026, 3, 1))?.plans["no-firm"].clone();
    let when = |i: usize| plan.fire_at(i, s.due, Jurisdiction::NO).expect("step time");
    clock.set(when(0));
    eventually("the nudge", WAIT, || async {
        Ok((stack.mail.to(s.email).len() == 1).then_some(()))
    })
    .await?;
    clock.set(when(1));
    eventually("the purring", WAIT, || async {
        Ok((stack.mail.to(s.email).len() == 2).then_some(()))
    })
    .await?;
    clock.set(when(2));
    eventually("the inkassovarsel", WAIT, || async {
        Ok((stack.mail.to(s.email).len() == 3).then_some(()))
    })
    .await?;
    // Staff ask what would go to the agency today: every amount with its rule, sent nowhere.
    let watcher = stack.rt.admin_addr("watcher").expect("the watcher serves HTTP");
    let preview_url = format!("http://{watcher}/v1/handoff/preview/{}/{}", s.tenant, s.debtor_id());
    let staff = reqwest::Client::new();
    assert_eq!(staff.get(&preview_url).send().await?.status().as_u16(), 401);
    // Once the watcher has heard what became of the three messages, the case lists them.
    let preview: Vec<serde_json::Value> = eventually("the messages in the preview", WAIT, || async {
        let answer = staff.get(&preview_url).bearer_auth(STAFF_TOKEN).send().await?;
        // 503: the watcher is starting or cannot read the journeys this moment; it asks to wait.
        if answer.status() == 503 {
            return Ok(None);
        }
        let preview: Vec<serde_json::Value> = answer.json().await?;
        let listed = preview.first().and_then(|p| p["messages"].as_array().map(Vec::len));
        Ok((listed == Some(3)).then_some(preview))
    })
    .await?;
    assert_eq!(preview.len(), 1, "{preview:?}");
    let varsel_day = when(2).with_timezone(&Jurisdiction::NO.time_zone()).date_naive();
    assert_eq!(
        preview[0]["claim_date"],
        forfall_domain::invoice::epoch_days(varsel_day)
    );
    let printed = tokio::process::Command::new(forfall_e2e::chaos::binaries_dir()?.join("forfall"))
        .args(["handoff", "preview", s.tenant, &s.debtor_id(), "--watcher"])
        .arg(format!("http://{watcher}"))
        .env("FORFALL_STAFF_TOKEN", STAFF_TOKEN)
        .output()
        .await?;
    let text = String::from_utf8_lossy(&printed.stdout);
    assert!(printed.status.success(), "{}", String::from_utf8_lossy(&printed.stderr));
    for want in [
        "invoice 70001 (no-1) of nordkraft",
        "fee          35.00 NOK",
        "inkassoforskriften § 1-2",
        "forsinkelsesrenteloven § 3",
        "warning      'inkassovarsel' sent",
        "inkassoloven § 9",
        "message      'purring' (reminder) by email",
    ] {
        assert!(text.contains(want), "the preview shows '{want}':\n{text}");
    }
    println!("{text}");
    assert!(stack.agency.requests().is_empty(), "a preview sends nothing");
    clock.set(when(3));
    status_is(&stack, s.tenant, s.invoice_id, "handed_over").await?;

    let actions = stack
        .read::<JourneyAction>(&stack.topic(&stack.topics().journey_actions))
        .await?;
    let purring = actions.iter().find(|a| a.step == "purring").expect("a purring action");
    assert_eq!(
        purring.fee_minor, 3_500,
        "1/20 of the inkassosats, inkassoforskriften § 1-2"
    );
    assert_eq!(purring.open_minor, 89_900 + 3_500);
    assert!(purring.pay_by.is_some(), "the purring gives a deadline");
    // The policy claims statutory interest: the purring says what has accrued by its day, at
    // Norges Bank's rate + 8 pp (2026 H1: 4 % + 8 pp), apart from the amount to pay.
    let law = LawBook::builtin()?;
    let purring_on = when(1).with_timezone(&Jurisdiction::NO.time_zone()).date_naive();
    let accrued = law.late_interest(
        &forfall_domain::law::DebtorContext {
            jurisdiction: Jurisdiction::NO,
            kind: forfall_domain::DebtorKind::Consumer,
            fee_agreed_in_advance: false,
        },
        forfall_domain::Money::new(89_900, forfall_domain::Currency::NOK),
        s.due,
        purring_on,
    )?;
    assert!(accrued.minor > 0);
    assert_eq!(purring.interest_minor, accrued.minor);
    assert_eq!(purring.interest_rate_bp, Some(1_200));
    assert_eq!(purring.compensation_minor, 0, "a consumer owes no compensation");
    let purring_mail = stack.mail.to(s.email)[1].body();
    let shown = format!(
        "Forsinkelsesrente så langt (12 % per år): {}",
        forfall_domain::money::format(accrued, forfall_domain::Locale::NbNo)
    );
    assert!(purring_mail.contains(&shown), "'{shown}' in:\n{purring_mail}");
    assert!(purring_mail.contains("Rente og kompensasjon er ikke med i beløpet å betale"));
    eventually("the agency's answer", WAIT, || async {
        Ok(stack
            .read::<HandoffOutcome>(&stack.topic(&stack.topics().handoff_outcomes))
            .await?
            .into_iter()
            .next())
    })
    .await?;
    let case = stack.agency.requests()[0].json();
    assert_eq!(case["principal_minor"], 89_900);
    assert_eq!(case["fees_minor"], 3_500);
    // The claim, itemised as of the hand-off day in Oslo: the purring's fee with its rule, and
    // late interest from the due date at Norges Bank's rate + 8 pp for 2026 H1.
    let handed_over = when(3).with_timezone(&Jurisdiction::NO.time_zone()).date_naive();
    let epoch = |d: chrono::NaiveDate| forfall_domain::invoice::epoch_days(d);
    let purring_day = when(1).with_timezone(&Jurisdiction::NO.time_zone()).date_naive();
    assert_eq!(case["claim_date"], epoch(handed_over));
    assert_eq!(case["original_principal_minor"], 89_900);
    assert_eq!(case["fee_lines"][0]["step"], "purring");
    assert_eq!(case["fee_lines"][0]["amount_minor"], 3_500);
    assert_eq!(case["fee_lines"][0]["date"], epoch(purring_day));
    assert!(
        case["fee_lines"][0]["citation"]
            .as_str()
            .is_some_and(|c| c.starts_with("inkassoforskriften § 1-2")),
        "{case}"
    );
    let reference_bp = law
        .rates()
        .iter()
        .find(|r| r.series == "no.norges_bank_policy" && r.period.to_string() == "2026-H1")
        .expect("the 2026 H1 rate")
        .rate_bp;
    let days = (handed_over - s.due).num_days();
    let exact = 89_900i128 * i128::from(reference_bp + 800) * i128::from(days);
    let interest = i64::try_from((exact * 2 + 3_650_000) / 7_300_000)?;
    let line = &case["interest_lines"][0];
    assert_eq!(case["interest_lines"].as_array().map(Vec::len), Some(1), "{case}");
    assert_eq!(line["first_day"], epoch(s.due) + 1);
    assert_eq!(line["last_day"], epoch(handed_over));
    assert_eq!(line["days"], days);
    assert_eq!(line["reference_bp"], reference_bp);
    assert_eq!(line["margin_bp"], 800);
    assert_eq!(line["amount_minor"], interest);
    assert_eq!(line["citation"], "forsinkelsesrenteloven § 3");
    assert!(interest > 0);
    assert_eq!(case["interest_minor"], interest);
    assert_eq!(case["interest_note"], serde_json::Value::Null);
    assert_eq!(case["compensation_minor"], 0, "a consumer owes no compensation");
    assert_eq!(case["total_minor"], 89_900 + 3_500 + interest);
    assert_eq!(case["debtor_details"], serde_json::to_value(&details)?);
    // The inkassovarsel went out with 14 days to pay, as inkassoloven § 9 asks: the agency
    // may act on the case.
    let warning = &case["collection_warning"];
    assert_eq!(warning["given"], true, "{case}");
    assert_eq!(warning["step"], "inkassovarsel");
    assert_eq!(warning["sent_on"], epoch(varsel_day));
    assert_eq!(warning["deadline"], epoch(varsel_day) + 14);
    assert_eq!(warning["days_to_pay"], 14);
    assert_eq!(warning["required_days"], 14);
    assert_eq!(warning["citation"], "inkassoloven § 9");
    assert_eq!(
        case["fee_lines"], preview[0]["fee_lines"],
        "the preview's fees are the case's"
    );
    assert_eq!(case["collection_warning"], preview[0]["collection_warning"]);
    assert_eq!(
        case["steps_taken"],
        serde_json::json!(["nudge", "purring", "inkassovarsel", "handoff"])
    );
    // The evidence: each message, its day, tone, channel, what became of it, and a digest of
    // what it said (each different; the e-mails the debtor got are the ones listed).
    let messages = case["messages"].as_array().cloned().unwrap_or_default();
    let listed: Vec<(&str, &str, &str, &str)> = messages
        .iter()
        .map(|m| {
            (
                m["step"].as_str().unwrap_or(""),
                m["tone"].as_str().unwrap_or(""),
                m["channel"].as_str().unwrap_or(""),
                m["delivery"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        listed,
        vec![
            ("nudge", "nudge", "email", "sent"),
            ("purring", "reminder", "email", "sent"),
            ("inkassovarsel", "collection_warning", "email", "sent"),
        ],
        "{case}"
    );
    assert_eq!(messages[2]["sent_on"], epoch(varsel_day));
    let digests: std::collections::HashSet<&str> = messages
        .iter()
        .filter_map(|m| m["content_sha256"].as_str())
        .filter(|d| d.len() == 64 && d.chars().all(|c| c.is_ascii_hexdigit()))
        .collect();
    assert_eq!(digests.len(), 3, "a digest each, all different: {case}");
    let mail_ids: Vec<String> = stack
        .mail
        .to(s.email)
        .iter()
        .filter_map(|m| m.header("Message-ID"))
        .collect();
    for m in &messages {
        let id = m["provider_message_id"].as_str().unwrap_or("");
        assert!(
            mail_ids.iter().any(|h| h.contains(id) && !id.is_empty()),
            "{id} in {mail_ids:?}"
        );
    }
    let chosen = plan_chosen(&stack, s.invoice_id).await?;
    assert_eq!(
        chosen.rule.as_deref(),
        Some("policy e2e-norway-1 segment 'norway' → plan 'no-firm'")
    );
    stack.shutdown().await;
    Ok(())
}

const SWEDEN: &str = r#"
version = "e2e-sweden-1"

# The agency sends the warning before collection where the law asks for one (see README).
[handoff]
agency_sends_warning = ["DK", "NO"]

[[segment]]
name = "se-agreed-fee"
when = { jurisdiction = ["SE"], fee_agreed = true }
plan = "se-fee"

[[segment]]
name = "rest"
plan = "gentle"

[plan.se-fee]
step = [
  { name = "nudge", offset_banking_days = 0, channels = ["email"], tone = "nudge" },
  { name = "paminnelse", offset_banking_days = 10, channels = ["email"], tone = "reminder", fee = "statutory_maximum", days_to_pay = 10 },
  { name = "inkassokrav", offset_banking_days = 20, channels = ["email"], tone = "payment_demand", fee = "statutory_maximum", days_to_pay = 10 },
  { name = "handoff", offset_banking_days = 30, handoff = true },
]

[plan.gentle]
step = [
  { name = "nudge", offset_banking_days = 0, channels = ["email"], tone = "nudge" },
  { name = "handoff", offset_banking_days = 20, handoff = true },
]
"#;

/// Sweden allows a reminder fee only when it was agreed when the debt arose: the invoice says
/// so, the policy's segment reads it, and only that debtor's reminder carries the 60 SEK.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_swedish_reminder_fee_is_charged_only_where_the_invoice_says_it_was_agreed() -> anyhow::Result<()> {
    let clock = ManualClock::new(at("2026-03-01T08:00:00Z"));
    let mut stack = LocalStack::start(base_config(), clock.clone()).await?;
    let path = policy_file(&stack, SWEDEN);
    stack.set("watcher.policy_file", &path);
    stack.start_all();
    let swede = |invoice_id: &'static str, email: &'static str| Sample {
        tenant: "nordkraft",
        invoice_id,
        number: "80001",
        due: day(2026, 3, 2),
        amount_minor: 49_900,
        currency: "SEK",
        jurisdiction: "SE",
        email,
        reference: "80001",
        language: "sv",
    };
    let (agreed, not_agreed) = (
        swede("se-agreed", "sara@example.test"),
        swede("se-plain", "olle@example.test"),
    );
    let billing = stack.topic(&stack.topics().billing_invoice_events);
    let mut issued = agreed.issued();
    issued.reminder_fee_agreed = Some(true);
    stack.produce(&billing, &agreed.debtor_id(), &issued).await?;
    stack
        .produce(&billing, &not_agreed.debtor_id(), &not_agreed.issued())
        .await?;
    assert_eq!(
        plan_chosen(&stack, "se-agreed").await?.rule.as_deref(),
        Some("policy e2e-sweden-1 segment 'se-agreed-fee' → plan 'se-fee'")
    );
    assert_eq!(
        plan_chosen(&stack, "se-plain").await?.rule.as_deref(),
        Some("policy e2e-sweden-1 segment 'rest' → plan 'gentle'")
    );
    let plan = policy::load(SWEDEN, &LawBook::builtin()?, day(2026, 3, 1))?.plans["se-fee"].clone();
    let when = |i: usize| plan.fire_at(i, agreed.due, Jurisdiction::SE).expect("the step's time");
    clock.set(when(0));
    eventually("both nudges", WAIT, || async {
        Ok((stack.mail.to(agreed.email).len() == 1 && stack.mail.to(not_agreed.email).len() == 1).then_some(()))
    })
    .await?;
    clock.set(when(1));
    let reminder = eventually("the påminnelse", WAIT, || async {
        Ok(stack
            .read::<JourneyAction>(&stack.topic(&stack.topics().journey_actions))
            .await?
            .into_iter()
            .find(|a| a.step == "paminnelse"))
    })
    .await?;
    assert_eq!(reminder.invoice_id, "se-agreed");
    assert_eq!(
        reminder.fee_minor, 6_000,
        "lag (1981:739) 2 §: at most 60 SEK, when agreed"
    );
    // The creditor's own inkassokrav: 180 SEK, a deadline, and what follows if it passes.
    clock.set(when(2));
    let demand = eventually("the inkassokrav", WAIT, || async {
        Ok(stack
            .read::<JourneyAction>(&stack.topic(&stack.topics().journey_actions))
            .await?
            .into_iter()
            .find(|a| a.step == "inkassokrav"))
    })
    .await?;
    assert_eq!(demand.tone, "payment_demand");
    assert_eq!(demand.fee_minor, 18_000, "lag (1981:739) 4 §: at most 180 SEK");
    assert_eq!(demand.open_minor, 49_900 + 6_000 + 18_000);
    let sent_on = when(2).with_timezone(&Jurisdiction::SE.time_zone()).date_naive();
    assert_eq!(
        demand.pay_by,
        Some(forfall_domain::invoice::epoch_days(
            sent_on + chrono::Duration::days(10)
        ))
    );
    status_is(&stack, agreed.tenant, agreed.invoice_id, "warned").await?;
    let mail = eventually("the inkassokrav by e-mail", WAIT, || async {
        Ok(stack.mail.to(agreed.email).get(2).map(|m| m.body()))
    })
    .await?;
    for want in [
        "Detta är ett inkassokrav.",
        "kan vi ansöka om betalningsföreläggande hos Kronofogden",
        "Att betala totalt: 739,00",
    ] {
        assert!(mail.contains(want), "'{want}' in:\n{mail}");
    }
    stack.shutdown().await;
    Ok(())
}

const EXPERIMENT: &str = r#"
version = "e2e-exp-1"

# The agency sends the warning before collection where the law asks for one (see README).
[handoff]
agency_sends_warning = ["DK", "NO"]

[[segment]]
name = "everyone"
plan = "email-first"

[plan.email-first]
step = [
  { name = "nudge", offset_banking_days = 0, channels = ["email"], tone = "nudge" },
  { name = "handoff", offset_banking_days = 20, handoff = true },
]

[plan.late-nudge]
step = [
  { name = "nudge", offset_banking_days = 2, channels = ["email"], tone = "nudge" },
  { name = "handoff", offset_banking_days = 20, handoff = true },
]

[[experiment]]
name = "nudge-timing"
segments = ["everyone"]
start = "2026-01-01"
end = "2026-12-31"
variant = [
  { name = "control", weight = 50 },
  { name = "late", weight = 50, plan = "late-nudge" },
]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn experiment_assignment_is_stable_across_invoices_and_restarts() -> anyhow::Result<()> {
    let clock = ManualClock::new(at("2026-04-01T08:00:00Z"));
    let mut stack = LocalStack::start(base_config(), clock).await?;
    let path = policy_file(&stack, EXPERIMENT);
    stack.set("watcher.policy_file", &path);
    stack.start_service("ingest");
    stack.start_service("watcher");
    let billing = stack.topic(&stack.topics().billing_invoice_events);
    let debtors = ["a@example.test", "b@example.test", "c@example.test", "d@example.test"];
    let mut first = Vec::new();
    for (i, email) in debtors.iter().enumerate() {
        let mut s = danish("x", "x", day(2026, 4, 20), email);
        let id = format!("first-{i}");
        s.invoice_id = &id;
        stack.produce(&billing, &s.debtor_id(), &s.issued()).await?;
        status_is(&stack, s.tenant, &id, "open").await?;
        first.push(
            plan_chosen(&stack, &id)
                .await?
                .reason
                .expect("an experiment variant is recorded"),
        );
    }
    // The experiment comparison counts each debtor under its variant; every variant's
    // outcomes are there from the start, at zero until one happens.
    let m = stack.metrics("watcher").await?;
    for variant in ["control", "late"] {
        let assigned = first
            .iter()
            .filter(|v| v.starts_with(&format!("experiment nudge-timing/{variant} ")))
            .count();
        let counted = |outcome: &str| {
            metric_value(
                &m,
                "forfall_watcher_experiment_invoices_total{",
                &[
                    "experiment=\"nudge-timing\"",
                    &format!("variant=\"{variant}\""),
                    &format!("outcome=\"{outcome}\""),
                ],
            )
        };
        assert_eq!(counted("assigned"), Some(assigned as f64), "{variant}: {first:?}\n{m}");
        assert_eq!(counted("paid_without_fee"), Some(0.0), "{variant}\n{m}");
    }
    stack.stop_service("watcher").await?;
    stack.restart_service("watcher").await;
    for (i, email) in debtors.iter().enumerate() {
        let mut s = danish("x", "x", day(2026, 5, 20), email);
        let id = format!("second-{i}");
        s.invoice_id = &id;
        stack.produce(&billing, &s.debtor_id(), &s.issued()).await?;
        status_is(&stack, s.tenant, &id, "open").await?;
        let second = plan_chosen(&stack, &id)
            .await?
            .reason
            .expect("an experiment variant is recorded");
        assert_eq!(second, first[i], "debtor {email} keeps its variant after a restart");
    }
    for v in &first {
        assert!(
            v.starts_with("experiment nudge-timing/control") || v.starts_with("experiment nudge-timing/late"),
            "{v}"
        );
    }
    stack.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_keeps_the_running_policy_when_the_new_one_is_unlawful() -> anyhow::Result<()> {
    let clock = ManualClock::new(at("2026-03-01T08:00:00Z"));
    let mut stack = LocalStack::start(base_config(), clock).await?;
    let path = policy_file(&stack, NORWAY);
    stack.set("watcher.policy_file", &path);
    stack.set("watcher.policy_reload_secs", 1);
    stack.start_service("ingest");
    stack.start_service("watcher");
    stack.wait_ready(&["watcher"], WAIT).await?;
    let reloads = |result: &'static str| {
        let stack = &stack;
        async move {
            let m = stack.metrics("watcher").await.unwrap_or_default();
            metric_value(
                &m,
                "forfall_watcher_policy_reloads_total",
                &[&format!("result=\"{result}\"")],
            )
            .unwrap_or(0.0)
        }
    };
    // A purring on the due date with a fee breaks inkassoforskriften § 1-2.
    std::fs::write(
        &path,
        NORWAY.replace(
            r#"{ name = "purring", offset_banking_days = 14,"#,
            r#"{ name = "purring", offset_banking_days = 1,"#,
        ),
    )?;
    eventually("the unlawful reload to be refused", WAIT, || async {
        Ok((reloads("refused").await >= 1.0).then_some(()))
    })
    .await?;
    let billing = stack.topic(&stack.topics().billing_invoice_events);
    let mut s = danish("r-1", "R1", day(2026, 3, 20), "r@example.test");
    stack.produce(&billing, &s.debtor_id(), &s.issued()).await?;
    status_is(&stack, s.tenant, "r-1", "open").await?;
    let rule = plan_chosen(&stack, "r-1").await?.rule;
    assert_eq!(
        rule.as_deref(),
        Some("policy e2e-norway-1 segment 'rest' → plan 'gentle'"),
        "still the running policy"
    );

    std::fs::write(&path, NORWAY.replace("e2e-norway-1", "e2e-norway-2"))?;
    eventually("the lawful reload to apply", WAIT, || async {
        Ok((reloads("applied").await >= 1.0).then_some(()))
    })
    .await?;
    s.invoice_id = "r-2";
    stack.produce(&billing, &s.debtor_id(), &s.issued()).await?;
    status_is(&stack, s.tenant, "r-2", "open").await?;
    let rule = plan_chosen(&stack, "r-2").await?.rule;
    assert_eq!(
        rule.as_deref(),
        Some("policy e2e-norway-2 segment 'rest' → plan 'gentle'")
    );
    stack.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebalance_while_timers_are_due_sends_each_step_once() -> anyhow::Result<()> {
    let clock = ManualClock::new(at("2026-09-01T06:00:00Z"));
    let stack = LocalStack::start(base_config(), clock.clone()).await?;
    for s in ["ingest", "dispatch"] {
        stack.start_service(s);
    }
    stack.start_instance("watcher", "watcher-a");
    stack.wait_ready(&["watcher-a"], WAIT).await?;
    let billing = stack.topic(&stack.topics().billing_invoice_events);
    let n = 40;
    let emails: Vec<&'static str> = (0..n)
        .map(|i| &*Box::leak(format!("r{i}@example.test").into_boxed_str()))
        .collect();
    let ids: Vec<&'static str> = (0..n)
        .map(|i| &*Box::leak(format!("reb-{i}").into_boxed_str()))
        .collect();
    for i in 0..n {
        // Half fall due on 2 September, half on 3 September.
        let due = if i % 2 == 0 { day(2026, 9, 2) } else { day(2026, 9, 3) };
        let s = danish(ids[i], ids[i], due, emails[i]);
        stack.produce(&billing, &s.debtor_id(), &s.issued()).await?;
    }
    for id in &ids {
        status_is(&stack, "acme-energy", id, "open").await?;
    }
    // A second watcher joins and the group settles with two members (tansu 0.6.0 never
    // completes a join if the other member leaves during it, so the join finishes first).
    stack.start_instance("watcher", "watcher-b");
    stack.wait_ready(&["watcher-b"], WAIT).await?;
    // The first half falls due while both fire their partitions; the first watcher leaves while
    // they fire: a rebalance with timers due.
    clock.set(at("2026-09-02T07:00:01Z"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    stack.stop_service("watcher-a").await?;
    eventually("the first half", WAIT, || async {
        Ok((stack.mail.messages().len() >= n / 2).then_some(()))
    })
    .await?;
    // The second half: timers scheduled by either watcher, now all polled by the one left. A
    // mark due the same day on each partition: once both are nudged, every timer due by then has
    // fired; once dispatch has handled everything on its topic, every message is on record.
    let partitions = stack.rt.config.kafka.partitions;
    let mut marks = Vec::new();
    for p in 0..partitions {
        let i = (0..n)
            .find(|i| partition_of(&format!("acme-energy:{}", emails[*i]), partitions) == p)
            .expect("a test debtor on every partition");
        let like = danish(ids[i], ids[i], day(2026, 9, 3), emails[i]);
        marks.push(issue_timer_mark(&stack, &like, day(2026, 9, 3)).await?);
    }
    clock.set(at("2026-09-03T07:00:01Z"));
    eventually("every nudge", WAIT, || async {
        Ok((emails.iter().all(|e| !stack.mail.to(e).is_empty())).then_some(()))
    })
    .await?;
    for mark in &marks {
        timer_mark_fired(&stack, mark).await?;
    }
    consumed_to_end(&stack, "dispatch", &[stack.topic(&stack.topics().journey_actions)]).await?;
    let ours: usize = emails.iter().map(|e| stack.mail.to(e).len()).sum();
    assert_eq!(ours, n, "exactly one nudge per invoice");
    for email in &emails {
        assert_eq!(stack.mail.to(email).len(), 1, "{email} got one nudge");
    }
    for id in &ids {
        assert_eq!(
            stack.journey_status("acme-energy", id).await?.as_deref(),
            Some("nudged")
        );
    }
    let fired_by_b = metric_value(
        &stack.metrics("watcher-b").await?,
        "forfall_watcher_steps_fired_total",
        &["step=\"nudge\""],
    )
    .unwrap_or(0.0);
    assert!(
        fired_by_b >= (n / 2) as f64,
        "the second watcher fired the second half: {fired_by_b}"
    );
    stack.shutdown().await;
    Ok(())
}

/// Two invoices of one debtor whose nudges fall two days apart become one message listing both
/// (the policy's combine window is 3 days); the one brought forward says so in its timeline and
/// is not nudged again on its own day; an invoice due weeks later stays apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_debtors_steps_within_the_window_go_out_as_one_message() -> anyhow::Result<()> {
    let clock = ManualClock::new(at("2026-09-01T06:00:00Z"));
    let stack = LocalStack::start(base_config(), clock.clone()).await?;
    for s in ["ingest", "watcher", "dispatch"] {
        stack.start_service(s);
    }
    let billing = stack.topic(&stack.topics().billing_invoice_events);
    let email = "combined@example.test";
    // Wednesday 2 September, Friday 4 September, Monday 21 September.
    let a = danish("comb-a", "C-1001", day(2026, 9, 2), email);
    let b = Sample {
        amount_minor: 45_000,
        ..danish("comb-b", "C-1002", day(2026, 9, 4), email)
    };
    let c = danish("comb-c", "C-1003", day(2026, 9, 21), email);
    for s in [&a, &b, &c] {
        stack.produce(&billing, &s.debtor_id(), &s.issued()).await?;
    }
    for id in ["comb-a", "comb-b", "comb-c"] {
        status_is(&stack, "acme-energy", id, "open").await?;
    }
    // 09:00 in Copenhagen on 2 September: a's nudge is due, b's is two days off.
    clock.set(at("2026-09-02T07:00:01Z"));
    status_is(&stack, "acme-energy", "comb-a", "nudged").await?;
    status_is(&stack, "acme-energy", "comb-b", "nudged").await?;
    eventually("the combined nudge", WAIT, || async {
        Ok((!stack.mail.to(email).is_empty()).then_some(()))
    })
    .await?;
    dispatch_caught_up(&stack, &a).await?;
    let mails = stack.mail.to(email);
    assert_eq!(mails.len(), 1, "one message for both invoices");
    let body = mails[0].body();
    assert!(body.contains("C-1001") && body.contains("C-1002"), "{body}");
    assert!(
        !body.contains("C-1003"),
        "the invoice due weeks later is not in it: {body}"
    );
    assert_eq!(
        stack.journey_status("acme-energy", "comb-c").await?.as_deref(),
        Some("open")
    );
    let sent = events_of(&stack, "comb-b")
        .await?
        .into_iter()
        .find(|e| e.kind == "step_sent")
        .expect("b's nudge is in its timeline");
    assert!(
        sent.reason.as_deref().is_some_and(|r| r.contains("C-1001")),
        "the timeline says which message carried it: {sent:?}"
    );
    let combined = metric_value(
        &stack.metrics("watcher").await?,
        "forfall_watcher_combined_invoices_total",
        &[],
    );
    assert_eq!(combined, Some(1.0));
    // b's own day passes without a second nudge.
    let mark = issue_timer_mark(&stack, &a, day(2026, 9, 4)).await?;
    clock.set(at("2026-09-04T07:00:01Z"));
    timer_mark_fired(&stack, &mark).await?;
    dispatch_caught_up(&stack, &a).await?;
    assert_eq!(stack.mail.to(email).len(), 1, "nothing more on b's own day");
    stack.shutdown().await;
    Ok(())
}

const NORWAY_MERGE: &str = r#"
version = "e2e-norway-merge-1"
merge_within_days = 14

[[segment]]
name = "norway"
plan = "no-varsel"

[plan.no-varsel]
step = [
  { name = "nudge", offset_banking_days = 0, channels = ["email"], tone = "nudge" },
  { name = "inkassovarsel", offset_banking_days = 10, channels = ["email"], tone = "collection_warning", days_to_pay = 14 },
  { name = "handoff", offset_banking_days = 25, handoff = true },
]
"#;

/// Norway merges a debtor's claims at hand-off (Finanstilsynet's circular 1/2018): two claims a
/// few days apart go to the agency as one case, led by the older, with the combined principal
/// the agency's fees are computed on. Money for the merged claim is reported on that case, and
/// the agency's word on the case reaches both invoices.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn norwegian_claims_reaching_hand_off_together_go_as_one_merged_case() -> anyhow::Result<()> {
    let clock = ManualClock::new(at("2026-03-01T08:00:00Z"));
    let mut stack = LocalStack::start(base_config(), clock.clone()).await?;
    let path = policy_file(&stack, NORWAY_MERGE);
    stack.set("watcher.policy_file", &path);
    stack.start_all();
    let older = Sample {
        tenant: "nordkraft",
        invoice_id: "no-a",
        number: "71001",
        due: day(2026, 3, 2),
        amount_minor: 89_900,
        currency: "NOK",
        jurisdiction: "NO",
        email: "kari@example.test",
        reference: "1234567890128",
        language: "nb",
    };
    let newer = Sample {
        invoice_id: "no-b",
        number: "71002",
        due: day(2026, 3, 6),
        amount_minor: 45_000,
        reference: "1234567890136",
        ..older.clone()
    };
    for s in [&older, &newer] {
        issue_invoice(&stack, s).await?;
        status_is(&stack, s.tenant, s.invoice_id, "open").await?;
    }
    let plan = policy::load(NORWAY_MERGE, &LawBook::builtin()?, day(2026, 3, 1))?.plans["no-varsel"].clone();
    let when = |s: &Sample<'_>, i: usize| plan.fire_at(i, s.due, Jurisdiction::NO).expect("step time");
    // Each message in turn, up to the older claim's hand-off; the newer's is four days later.
    let mut moments = vec![
        (when(&older, 0), 1),
        (when(&newer, 0), 2),
        (when(&older, 1), 3),
        (when(&newer, 1), 4),
    ];
    moments.sort();
    for (moment, mails) in moments {
        clock.set(moment);
        eventually(&format!("{mails} e-mails"), WAIT, || async {
            Ok((stack.mail.to(older.email).len() == mails).then_some(()))
        })
        .await?;
    }
    assert!(when(&newer, 2) > when(&older, 2) && when(&newer, 2) - when(&older, 2) < chrono::Duration::days(14));
    clock.set(when(&older, 2));
    for s in [&older, &newer] {
        status_is(&stack, s.tenant, s.invoice_id, "handed_over").await?;
    }
    // Both claims went to the agency unpaid: the debtor's history keeps them, for its next
    // invoice's propensity (it is no longer a new debtor).
    assert_eq!(history_fields(&stack).await?, ["no-a", "no-b"]);
    eventually("the case at the agency", WAIT, || async {
        Ok((!stack.agency.cases().is_empty()).then_some(()))
    })
    .await?;
    let cases = stack.agency.cases();
    assert_eq!(cases.len(), 1, "one case for both claims: {cases:?}");
    let case = &cases[0];
    assert_eq!(case["invoice_id"], "no-a", "led by the older claim");
    let merged = case["merged_claims"].as_array().cloned().unwrap_or_default();
    assert_eq!(merged.len(), 1, "{case}");
    assert_eq!(merged[0]["invoice_id"], "no-b");
    assert_eq!(merged[0]["original_principal_minor"], 45_000);
    assert_eq!(
        merged[0]["collection_warning"]["given"], true,
        "its own inkassovarsel ran out before it joined"
    );
    assert_eq!(case["combined_principal_minor"], 89_900 + 45_000);
    let totals = case["total_minor"].as_i64().unwrap_or(0) + merged[0]["total_minor"].as_i64().unwrap_or(0);
    assert_eq!(case["combined_total_minor"], totals);
    assert!(
        case["merge_citation"]
            .as_str()
            .is_some_and(|c| c.contains("rundskriv 1/2018")),
        "{case}"
    );
    let events = events_of(&stack, "no-b").await?;
    let joined = events.iter().find(|e| e.kind == "handed_over").expect("handed over");
    assert!(
        joined
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("merged into the case of invoice 71001")),
        "{joined:?}"
    );
    let watcher = stack.metrics("watcher").await?;
    assert_eq!(
        metric_value(&watcher, "forfall_watcher_merged_claims_total", &[]),
        Some(1.0)
    );

    // The debtor pays the newer claim to the creditor: reported on the case it went in.
    stack
        .produce(
            &stack.topic(&stack.topics().payments),
            &newer.debtor_id(),
            &newer.payment("bank-9", 45_000, newer.reference),
        )
        .await?;
    let recall = eventually("the recall at the agency", WAIT, || async {
        Ok(stack.agency.recalls().into_iter().next())
    })
    .await?;
    assert_eq!(recall["case_id"], case["case_id"], "{recall}");
    assert_eq!(recall["invoice_id"], "no-b");
    status_is(&stack, newer.tenant, newer.invoice_id, "closed:paid").await?;

    // The agency collects the rest: its word on the case is on every claim in it.
    let addr = stack.rt.admin_addr("handoff").expect("hand-off listens");
    let answer = stack
        .agency
        .send_event(
            &format!("http://{addr}/v1/agency/events"),
            &serde_json::json!({
                "event_id": "ag-merged-1", "case_id": case["case_id"], "tenant": older.tenant,
                "debtor_id": older.debtor_id(), "invoice_id": older.invoice_id, "status": "paid",
                "collected_minor": 95_000, "currency": "NOK",
            }),
        )
        .await?;
    assert_eq!(answer, 200);
    status_is(&stack, older.tenant, older.invoice_id, "closed:paid").await?;
    eventually("the agency's word on the merged claim too", WAIT, || async {
        let events = events_of(&stack, "no-b").await?;
        Ok(events.into_iter().find(|e| e.kind == "paid_at_agency"))
    })
    .await?;
    stack.shutdown().await;
    Ok(())
}

const BY_PROPENSITY: &str = r#"
version = "e2e-propensity-1"

[handoff]
agency_sends_warning = ["DK", "NO"]

[[segment]]
name = "likely-payers"
when = { propensity_min = 80 }
plan = "gentle"

[[segment]]
name = "everyone"
plan = "standard"

[plan.gentle]
step = [
  { name = "nudge", offset_banking_days = 0, channels = ["email"], tone = "nudge" },
  { name = "handoff", offset_banking_days = 30, handoff = true },
]

[plan.standard]
step = [
  { name = "nudge", offset_banking_days = 0, channels = ["email"], tone = "nudge" },
  { name = "reminder-1", offset_banking_days = 10, channels = ["email"], tone = "reminder", days_to_pay = 10 },
  { name = "handoff", offset_banking_days = 20, handoff = true },
]
"#;

/// With a propensity model configured, the watcher scores each new invoice, the policy's
/// propensity band picks the plan, and the plan choice records the score and the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_propensity_model_scores_each_new_invoice_and_its_band_picks_the_plan() -> anyhow::Result<()> {
    use forfall_domain::propensity::{FEATURE_NAMES, ModelMetrics, PropensityModel};
    let clock = ManualClock::new(at("2026-04-01T08:00:00Z"));
    let mut stack = LocalStack::start(base_config(), clock).await?;
    // Debtors never late score sigmoid(3) = 95; each late invoice in 12 months takes 3 off z.
    let mut coefficients = vec![0.0; FEATURE_NAMES.len()];
    coefficients[0] = -3.0;
    let model = PropensityModel {
        version: "e2e-model-7".into(),
        label: "paid in full without collection".into(),
        features: FEATURE_NAMES.iter().map(|s| (*s).to_owned()).collect(),
        intercept: 3.0,
        coefficients,
        feature_sd: Vec::new(),
        metrics: ModelMetrics {
            auc: 0.8,
            brier: 0.1,
            calibration: Vec::new(),
            trained_on: 1,
            tested_on: 1,
            base_rate: 0.9,
        },
    };
    let model_path = std::env::temp_dir().join(format!("{}-propensity.json", stack.prefix));
    std::fs::write(&model_path, serde_json::to_vec(&model)?)?;
    stack.set("watcher.policy_file", policy_file(&stack, BY_PROPENSITY));
    stack.set("watcher.propensity_model", &model_path);
    stack.start_service("ingest");
    stack.start_service("watcher");
    let s = danish("prop-1", "P-1", day(2026, 4, 20), "likely@example.test");
    issue_invoice(&stack, &s).await?;
    let chosen = plan_chosen(&stack, "prop-1").await?;
    assert_eq!(chosen.propensity, Some(95), "{chosen:?}");
    assert_eq!(chosen.propensity_model.as_deref(), Some("e2e-model-7"));
    assert_eq!(chosen.segment.as_deref(), Some("likely-payers"));
    assert!(
        chosen.rule.as_deref().unwrap_or_default().contains("plan 'gentle'"),
        "{chosen:?}"
    );
    stack.shutdown().await;
    Ok(())
}

/// The invoices in the (one) debtor's history the watcher keeps in Redis.
async fn history_fields(stack: &LocalStack) -> anyhow::Result<Vec<String>> {
    let keys = watcher_keys(&stack.rt.config).await?;
    let key = keys
        .iter()
        .find(|k| k.contains("history:"))
        .ok_or_else(|| anyhow::anyhow!("no history key in {keys:?}"))?;
    let mut fields: Vec<String> = redis::cmd("HKEYS").arg(key).query_async(&mut stack.redis()).await?;
    fields.sort();
    Ok(fields)
}

/// The value a `plan_chosen` event recorded for the propensity input `name`.
fn input(chosen: &JourneyEvent, name: &str) -> f64 {
    chosen
        .propensity_features
        .iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("no input {name} in {chosen:?}"))
        .value
}

/// A debtor's own history reaches the plan choice of its next invoice: how late it paid, how
/// large its invoices usually are, how long it has been a customer, the channel that bounced,
/// the dispute and the page it used. Every plan choice records these inputs (with or without a
/// model, for `forfall model train --from-topics`); the history is derived state, so it comes
/// back from the changelog when Redis loses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_debtors_own_history_reaches_its_next_plan_choice_and_survives_losing_redis() -> anyhow::Result<()> {
    use forfall_domain::reference::{ReferenceKind, generate};
    use forfall_platform::records::{DebtorRequest, DispatchOutcome, DispatchStatus, new_event_id};
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let invoice = |id: &'static str, due, amount_minor: i64| Sample {
        reference: leak(
            generate(ReferenceKind::Rf, &format!("8121{amount_minor}"))
                .expect("a reference")
                .value,
        ),
        amount_minor,
        ..danish(id, id, due, "history@example.test")
    };
    let first = invoice("hist-a", day(2026, 4, 20), 100_000);
    let clock = ManualClock::new(at("2026-04-06T08:00:00Z"));
    let mut stack = LocalStack::start(base_config(), clock.clone()).await?;
    // Records leave 61 days after their invoice's issue date (when the next invoice arrives).
    stack.set("watcher.history_retention_days", 61);
    for service in ["ingest", "watcher", "matcher"] {
        stack.start_service(service);
    }
    issue_invoice(&stack, &first).await?;
    let opened = plan_chosen(&stack, first.invoice_id).await?;
    assert_eq!(
        input(&opened, "new_debtor"),
        1.0,
        "a first invoice has no history: {opened:?}"
    );
    assert_eq!(opened.propensity, None, "no model, no score");

    // The debtor disputes it on the page, the e-mail bounces, and it is paid 5 days late.
    let dispute = DebtorRequest {
        event_id: new_event_id(),
        tenant: first.tenant.into(),
        debtor_id: first.debtor_id(),
        occurred_at: 0,
        invoice_id: first.invoice_id.into(),
        kind: "dispute".into(),
        new_due_date: None,
        promise_date: None,
        instalments: Vec::new(),
        reason: Some("meter reading".into()),
        source: "portal".into(),
    };
    stack
        .produce(
            &stack.topic(&stack.topics().debtor_requests),
            &first.debtor_id(),
            &dispute,
        )
        .await?;
    journey_event(&stack, first.invoice_id, "the dispute", |e| e.kind == "disputed").await?;
    let bounce = DispatchOutcome {
        event_id: new_event_id(),
        tenant: first.tenant.into(),
        debtor_id: first.debtor_id(),
        occurred_at: 0,
        action_id: "hist-a-nudge".into(),
        invoice_id: first.invoice_id.into(),
        step: "nudge".into(),
        channel: "email".into(),
        status: DispatchStatus::Bounced,
        reason: Some("mailbox unavailable".into()),
        provider_message_id: None,
        content_sha256: None,
        covered_invoice_ids: Vec::new(),
    };
    stack
        .produce(
            &stack.topic(&stack.topics().dispatch_outcomes),
            &first.debtor_id(),
            &bounce,
        )
        .await?;
    journey_event(&stack, first.invoice_id, "the bounce", |e| e.kind == "message_bounced").await?;
    clock.set(at("2026-04-25T10:00:00Z"));
    let payment = first.payment("hist-a-paid", first.amount_minor, first.reference);
    stack
        .produce(&stack.topic(&stack.topics().payments), "bank", &payment)
        .await?;
    status_is(&stack, first.tenant, first.invoice_id, "closed:paid").await?;

    // A month later, an invoice twice the usual size.
    clock.set(at("2026-05-06T08:00:00Z"));
    let second = invoice("hist-b", day(2026, 5, 20), 200_000);
    issue_invoice(&stack, &second).await?;
    let chosen = plan_chosen(&stack, second.invoice_id).await?;
    let close = |a: f64, b: f64| (a - b).abs() < 1e-3;
    assert_eq!(input(&chosen, "new_debtor"), 0.0, "{chosen:?}");
    assert_eq!(input(&chosen, "avg_days_late"), 5.0, "{chosen:?}");
    assert!(close(input(&chosen, "amount_vs_usual"), 2f64.ln()), "{chosen:?}");
    assert!(close(input(&chosen, "tenure_years"), 30.0 / 365.0), "{chosen:?}");
    assert_eq!(input(&chosen, "failed_channels"), 1.0, "{chosen:?}");
    assert_eq!(input(&chosen, "past_disputes"), 1.0, "{chosen:?}");
    assert_eq!(input(&chosen, "self_service"), 1.0, "{chosen:?}");

    // It is paid 5 days late too.
    clock.set(at("2026-05-25T10:00:00Z"));
    let payment = second.payment("hist-b-paid", second.amount_minor, second.reference);
    stack
        .produce(&stack.topic(&stack.topics().payments), "bank", &payment)
        .await?;
    status_is(&stack, second.tenant, second.invoice_id, "closed:paid").await?;

    // Redis loses the watcher's state; the history comes back from the changelog.
    lose_watcher_state(&stack.rt.config).await?;
    clock.set(at("2026-06-06T08:00:00Z"));
    let third = invoice("hist-c", day(2026, 6, 20), 150_000);
    issue_invoice(&stack, &third).await?;
    let chosen = plan_chosen(&stack, third.invoice_id).await?;
    assert_eq!(input(&chosen, "avg_days_late"), 5.0, "{chosen:?}");
    assert_eq!(input(&chosen, "past_disputes"), 1.0, "{chosen:?}");
    assert_eq!(input(&chosen, "failed_channels"), 1.0, "{chosen:?}");
    // The usual size is now the two paid before: 150,000 is exactly it.
    assert!(close(input(&chosen, "amount_vs_usual"), 0.0), "{chosen:?}");
    assert!(close(input(&chosen, "tenure_years"), 61.0 / 365.0), "{chosen:?}");

    // Four days on, the first invoice is past its retention: the next change to the history
    // (the third paid, early) takes it away, from Redis and from the changelog (it does not come
    // back when Redis is lost again). A new invoice adds nothing to the history.
    clock.set(at("2026-06-10T08:00:00Z"));
    let payment = third.payment("hist-c-paid", third.amount_minor, third.reference);
    stack
        .produce(&stack.topic(&stack.topics().payments), "bank", &payment)
        .await?;
    status_is(&stack, third.tenant, third.invoice_id, "closed:paid").await?;
    let fourth = invoice("hist-d", day(2026, 6, 24), 150_001);
    issue_invoice(&stack, &fourth).await?;
    let chosen = plan_chosen(&stack, fourth.invoice_id).await?;
    assert_eq!(input(&chosen, "past_disputes"), 0.0, "{chosen:?}");
    assert_eq!(input(&chosen, "failed_channels"), 0.0, "{chosen:?}");
    // 5 days late and early (counted as 0).
    assert_eq!(input(&chosen, "avg_days_late"), 2.5, "{chosen:?}");
    let kept = ["hist-b", "hist-c"];
    assert_eq!(history_fields(&stack).await?, kept);
    lose_watcher_state(&stack.rt.config).await?;
    status_is(&stack, fourth.tenant, fourth.invoice_id, "open").await?;
    assert_eq!(history_fields(&stack).await?, kept);
    stack.shutdown().await;
    Ok(())
}
