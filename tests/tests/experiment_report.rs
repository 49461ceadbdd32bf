//! `forfall experiment report` on what the real pipeline wrote: an experiment whose variants
//! differ in one thing (a reminder fee), debtors who pay at known moments, and a report whose
//! counts are exactly what happened, per variant, read back from the topics.

use forfall::experiment::{ReportArgs, report};
use forfall_e2e::*;
use forfall_platform::clock::ManualClock;
use forfall_platform::records::JourneyEvent;

const POLICY: &str = r#"
version = "report-e2e-1"

[handoff]
agency_sends_warning = ["DK", "NO"]

# The fee is Danish law's (a reminder may charge it three days after the due date there); the
# others' rules would refuse this plan, so only Danish debtors are in the experiment.
[[segment]]
name = "danish"
when = { jurisdiction = ["DK"] }
plan = "with-fee"

[[segment]]
name = "everyone-else"
plan = "no-fee"

[plan.with-fee]
step = [
  { name = "nudge", offset_banking_days = 0, channels = ["email"], tone = "nudge" },
  { name = "reminder-1", offset_banking_days = 3, channels = ["email"], tone = "reminder", fee = "statutory_maximum", days_to_pay = 10 },
  { name = "handoff", offset_banking_days = 40, handoff = true },
]

[plan.no-fee]
step = [
  { name = "nudge", offset_banking_days = 0, channels = ["email"], tone = "nudge" },
  { name = "reminder-1", offset_banking_days = 3, channels = ["email"], tone = "reminder", days_to_pay = 10 },
  { name = "handoff", offset_banking_days = 40, handoff = true },
]

[[experiment]]
name = "fee-free-reminder"
segments = ["danish"]
start = "2026-01-01"
end = "2026-12-31"
variant = [
  { name = "control", weight = 50 },
  { name = "no-fee", weight = 50, plan = "no-fee" },
]
"#;

const STAFF_TOKEN: &str = "staff-token-for-the-report";

/// The bank pays `s` in full; returns once its journey is closed as paid.
/// `fee_minor`: the reminder fee charged meanwhile, which the payment includes.
async fn pay(stack: &LocalStack, s: &Sample<'_>, tx: &str, fee_minor: i64) -> anyhow::Result<()> {
    let payment = s.payment(tx, s.amount_minor + fee_minor, s.reference);
    stack
        .produce(&stack.topic(&stack.topics().payments), "bank", &payment)
        .await?;
    status_is(stack, s.tenant, s.invoice_id, "closed:paid").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_report_counts_what_each_variant_did() -> anyhow::Result<()> {
    let clock = ManualClock::new(at("2026-03-02T08:00:00Z"));
    let mut stack = LocalStack::start(base_config(), clock.clone()).await?;
    let policy = std::env::temp_dir().join(format!("{}-report-policy.toml", stack.prefix));
    std::fs::write(&policy, POLICY)?;
    stack.set("watcher.policy_file", &policy);
    stack.set("watcher.staff_token", STAFF_TOKEN);
    stack.start_all();

    // Sixteen debtors, one invoice each, due Wednesday 4 March 2026.
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let invoices: Vec<Sample<'static>> = (0..16)
        .map(|i| {
            let reference = forfall_domain::reference::generate(
                forfall_domain::reference::ReferenceKind::Rf,
                &format!("5150{i:04}"),
            )
            .expect("an RF reference");
            Sample {
                reference: leak(reference.value),
                ..danish(
                    leak(format!("exp-{i:02}")),
                    leak(format!("E-{i:02}")),
                    day(2026, 3, 4),
                    leak(format!("exp{i}@example.test")),
                )
            }
        })
        .collect();
    for s in &invoices {
        issue_invoice(&stack, s).await?;
    }
    for s in &invoices {
        status_is(&stack, s.tenant, s.invoice_id, "open").await?;
    }
    // Which variant each debtor drew, as its plan_chosen event says.
    let events = stack
        .read::<JourneyEvent>(&stack.topic(&stack.topics().journey_events))
        .await?;
    let variant_of = |invoice: &str| -> String {
        events
            .iter()
            .find(|e| e.invoice_id == invoice && e.kind == "plan_chosen")
            .and_then(|e| e.experiment.clone())
            .and_then(|x| x.strip_prefix("fee-free-reminder/").map(str::to_owned))
            .unwrap_or_default()
    };
    let variants: Vec<String> = invoices.iter().map(|s| variant_of(s.invoice_id)).collect();
    assert!(
        variants.iter().all(|v| v == "control" || v == "no-fee"),
        "every invoice in the experiment: {variants:?}"
    );

    // The due date's nudges; then every fourth debtor pays before the reminder.
    clock.set(at("2026-03-04T08:00:01Z"));
    for s in &invoices {
        status_is(&stack, s.tenant, s.invoice_id, "nudged").await?;
    }
    consumed_to_end(&stack, "dispatch", &[stack.topic(&stack.topics().journey_actions)]).await?;
    let early: Vec<usize> = (0..16).filter(|i| i % 4 == 0).collect();
    for &i in &early {
        pay(&stack, &invoices[i], &format!("early-{i}"), 0).await?;
    }
    // Three banking days on (Monday 9 March): the reminders; then every fourth of the rest pays.
    clock.set(at("2026-03-09T08:00:01Z"));
    for (i, s) in invoices.iter().enumerate().filter(|(i, _)| !early.contains(i)) {
        status_is(&stack, s.tenant, s.invoice_id, "reminded-1")
            .await
            .map_err(|e| anyhow::anyhow!("{i}: {e}"))?;
    }
    // Every reminder sent before anyone pays (as every nudge was): dispatch's last look would
    // rightly hold back a message whose invoice was paid meanwhile.
    consumed_to_end(&stack, "dispatch", &[stack.topic(&stack.topics().journey_actions)]).await?;
    let late: Vec<usize> = (0..16).filter(|i| i % 4 == 1).collect();
    for &i in &late {
        let fee = if variants[i] == "control" { 10_000 } else { 0 };
        pay(&stack, &invoices[i], &format!("late-{i}"), fee).await?;
    }
    consumed_to_end(&stack, "dispatch", &[stack.topic(&stack.topics().journey_actions)]).await?;

    let out = std::env::temp_dir().join(format!("{}-report", stack.prefix));
    let written = report(
        &stack.rt,
        &ReportArgs {
            name: "fee-free-reminder".into(),
            policy: Some(policy.clone()),
            out: out.clone(),
            alpha: 0.05,
        },
    )
    .await?;
    let r = &written.report;
    assert_eq!(r.control, "control");
    for v in &r.variants {
        let mine: Vec<usize> = (0..16).filter(|i| variants[*i] == v.variant).collect();
        let count = |set: &[usize]| mine.iter().filter(|i| set.contains(i)).count() as u64;
        let n = mine.len() as u64;
        assert_eq!(v.invoices, n, "{}", v.variant);
        assert_eq!(v.debtors, n, "{}", v.variant);
        let m = |k: &str| v.metrics[k].count;
        assert_eq!(m("settled"), count(&early) + count(&late), "{}", v.variant);
        assert_eq!(m("settled_before_handoff"), count(&early) + count(&late));
        assert_eq!(m("handed_over"), 0);
        // The fee is the one difference: control's reminders charge it, no-fee's do not.
        let reminded = n - count(&early);
        if v.variant == "control" {
            assert_eq!(m("settled_before_fee"), count(&early), "control");
            assert_eq!(m("charged_a_fee"), reminded, "control");
            assert_eq!(
                v.fees_minor.get("DKK").copied(),
                Some(reminded as i64 * 10_000),
                "100 kr. a reminder"
            );
        } else {
            assert_eq!(m("settled_before_fee"), count(&early) + count(&late), "no-fee");
            assert_eq!(m("charged_a_fee"), 0, "no-fee");
            assert!(v.fees_minor.values().all(|f| *f == 0), "{:?}", v.fees_minor);
        }
        // A nudge each and a reminder for each that had not paid.
        assert_eq!(v.messages.get("email").copied(), Some(n + reminded), "{}", v.variant);
        let days = v.days_to_payment.as_ref().expect("some paid");
        assert_eq!(days.paid, count(&early) + count(&late));
    }
    let no_fee = r.variants.iter().find(|v| v.variant == "no-fee").expect("the variant");
    assert!(no_fee.versus_control.is_some(), "compared to control");
    assert!(r.sample_ratio.is_some());
    let html = std::fs::read_to_string(&written.html)?;
    assert!(html.contains("<svg") && html.contains("no-fee") && html.contains("Settled before any fee"));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&written.json)?)?;
    assert_eq!(json["experiment"], "fee-free-reminder");

    // Dashboards ask the watcher: the same report, for staff only.
    let watcher = stack.rt.admin_addr("watcher").expect("the watcher serves HTTP");
    let url = format!("http://{watcher}/v1/experiments/fee-free-reminder/report");
    let http = reqwest::Client::new();
    assert_eq!(http.get(&url).send().await?.status().as_u16(), 401);
    let unknown = http
        .get(format!("http://{watcher}/v1/experiments/no-such-thing/report"))
        .bearer_auth(STAFF_TOKEN)
        .send()
        .await?;
    assert_eq!(unknown.status().as_u16(), 404);
    assert!(unknown.text().await?.contains("it has: fee-free-reminder"));
    // The first ask starts reading the topics; until the copy is there it is asked to come back.
    let served: serde_json::Value = eventually("the watcher's report", WAIT, || async {
        let answer = http.get(&url).bearer_auth(STAFF_TOKEN).send().await?;
        if answer.status() == 503 {
            assert!(answer.headers().contains_key("retry-after"));
            return Ok(None);
        }
        assert_eq!(answer.status().as_u16(), 200);
        Ok(Some(answer.json().await?))
    })
    .await?;
    assert_eq!(served, json, "the endpoint and the command agree");
    let page = http.get(format!("{url}.html")).bearer_auth(STAFF_TOKEN).send().await?;
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.headers()["content-type"].to_str()?.starts_with("text/html"));
    assert!(page.headers().contains_key("age"));
    assert!(page.text().await?.contains("<svg"));
    stack.shutdown().await;
    Ok(())
}
