//! `forfall demo` (what `make run` shows): the whole pipeline in one process on the dev stack,
//! with simulated time running fast, a small set of invoices and payments that exercise each
//! path, and a summary of what happened to each.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Duration as Days, Utc};
use figment::Figment;
use forfall_domain::invoice::epoch_days;
use forfall_platform::clock::AcceleratedClock;
use forfall_platform::config::CommonConfig;
use forfall_platform::records::{
    DispatchOutcome, DispatchStatus, InvoiceCredited, InvoiceIssued, JourneyEvent, PaymentReceived, PaymentUnmatched,
    Rejected, new_event_id,
};

use forfall_devsinks::ingress::Forwarder;
use forfall_devsinks::vipps::{VippsMerchant, VippsSim};

use crate::devstack::LocalStack;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Simulated seconds per real second (default: two days per second).
    #[arg(long, default_value_t = 172_800.0)]
    speed: f64,
    /// Give up after this many real seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
}

const TENANT: &str = "demo-utility";

/// The demo creditor's Vipps MobilePay test merchant (the stand-in's credentials; dev only).
struct DemoMerchant {
    client_id: &'static str,
    client_secret: &'static str,
    subscription_key: &'static str,
    msn: &'static str,
}

const DEMO_MERCHANT: DemoMerchant = DemoMerchant {
    client_id: "demo-client",
    client_secret: "demo-client-secret",
    subscription_key: "demo-subscription",
    msn: "654321",
};

impl DemoMerchant {
    fn merchant(&self) -> VippsMerchant {
        VippsMerchant {
            client_id: self.client_id.into(),
            client_secret: self.client_secret.into(),
            subscription_key: self.subscription_key.into(),
            msn: self.msn.into(),
        }
    }
}

/// One demo debtor and what they do.
struct Case {
    invoice_id: &'static str,
    number: &'static str,
    who: &'static str,
    email: &'static str,
    jurisdiction: &'static str,
    currency: &'static str,
    language: &'static str,
    amount_minor: i64,
    reference: &'static str,
    story: &'static str,
    behaviour: Behaviour,
}

#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    PaysBeforeDue,
    PaysOnThePage,
    NeverPays,
    PaysHalfAfterNudge,
    CreditedBeforeDue,
    Invalid,
}

fn demo_cases() -> Vec<Case> {
    use Behaviour::*;
    vec![
        Case {
            invoice_id: "d-1",
            number: "100001",
            who: "Astrid (DK)",
            email: "astrid@example.test",
            jurisdiction: "DK",
            currency: "DKK",
            language: "da",
            amount_minor: 74_500,
            reference: "RF69100001",
            story: "pays two days before the due date",
            behaviour: PaysBeforeDue,
        },
        Case {
            invoice_id: "d-2",
            number: "100002",
            who: "Bjørn (NO)",
            email: "bjorn@example.test",
            jurisdiction: "NO",
            currency: "NOK",
            language: "nb",
            amount_minor: 129_000,
            reference: "1000025",
            story: "pays with Vipps on his page, from the link in the friendly nudge",
            behaviour: PaysOnThePage,
        },
        Case {
            invoice_id: "d-3",
            number: "100003",
            who: "Cecilia (SE)",
            email: "cecilia@example.test",
            jurisdiction: "SE",
            currency: "SEK",
            language: "sv",
            amount_minor: 89_900,
            reference: "1000033",
            story: "never pays",
            behaviour: NeverPays,
        },
        Case {
            invoice_id: "d-4",
            number: "100004",
            who: "Dina (FI)",
            email: "dina@example.test",
            jurisdiction: "FI",
            currency: "EUR",
            language: "fi",
            amount_minor: 15_000,
            reference: "1000041",
            story: "pays half after the nudge",
            behaviour: PaysHalfAfterNudge,
        },
        Case {
            invoice_id: "d-5",
            number: "100005",
            who: "Emil (DK)",
            email: "emil@example.test",
            jurisdiction: "DK",
            currency: "DKK",
            language: "en",
            amount_minor: 30_000,
            reference: "RF58100005",
            story: "is credited in full before the due date",
            behaviour: CreditedBeforeDue,
        },
        Case {
            invoice_id: "d-7",
            number: "100007",
            who: "Gunnar (NO)",
            email: "gunnar@example.test",
            jurisdiction: "NO",
            currency: "NOK",
            language: "nb",
            amount_minor: 64_000,
            reference: "1000074",
            story: "never pays his electricity bill",
            behaviour: NeverPays,
        },
        Case {
            invoice_id: "d-8",
            number: "100008",
            who: "Gunnar (NO)",
            email: "gunnar@example.test",
            jurisdiction: "NO",
            currency: "NOK",
            language: "nb",
            amount_minor: 21_500,
            reference: "1000082",
            story: "nor his grid bill: in Norway both claims go to the agency as one case",
            behaviour: NeverPays,
        },
        Case {
            invoice_id: "d-6",
            number: "100006",
            who: "Frida (SE)",
            email: "frida@example.test",
            jurisdiction: "SE",
            currency: "SEK",
            language: "sv",
            amount_minor: -500,
            reference: "1000066",
            story: "billing sends a negative amount",
            behaviour: Invalid,
        },
    ]
}

fn debtor(c: &Case) -> String {
    format!("{TENANT}:{}", c.email)
}

fn issued(c: &Case, now: DateTime<Utc>) -> InvoiceIssued {
    let due = (now + Days::days(3)).date_naive();
    InvoiceIssued {
        event_id: new_event_id(),
        tenant: TENANT.into(),
        debtor_id: debtor(c),
        occurred_at: now.timestamp_millis(),
        invoice_id: c.invoice_id.into(),
        revision: 1,
        invoice_number: c.number.into(),
        issue_date: epoch_days(due) - 14,
        due_date: epoch_days(due),
        amount_minor: c.amount_minor,
        currency: c.currency.into(),
        jurisdiction: c.jurisdiction.into(),
        debtor_kind: "consumer".into(),
        payment_reference: Some(c.reference.into()),
        description: Some("Electricity and grid, last month".into()),
        debtor_name: Some(c.who.split(' ').next().unwrap_or("").into()),
        email: Some(c.email.into()),
        phone: None,
        language: Some(c.language.into()),
        preferred_channels: Vec::new(),
        declined_channels: Vec::new(),
        // What an agency needs to act on the claim, as billing knows it.
        debtor_details: Some(forfall_platform::records::DebtorDetails {
            address: Some(forfall_platform::records::PostalAddress {
                lines: vec![format!(
                    "Demovägen {}",
                    c.number.trim_start_matches('1').trim_start_matches('0')
                )],
                postal_code: "1000".into(),
                city: "Demo".into(),
                country: c.jurisdiction.into(),
            }),
            national_id: None,
            company_id: None,
        }),
        // The tenant's terms agree a reminder fee from the start (it matters in Sweden).
        reminder_fee_agreed: Some(true),
    }
}

fn payment(c: &Case, amount_minor: i64, now: DateTime<Utc>) -> PaymentReceived {
    PaymentReceived {
        event_id: new_event_id(),
        tenant: TENANT.into(),
        debtor_id: None,
        occurred_at: now.timestamp_millis(),
        payment_id: format!("bank-{}-{}", c.invoice_id, amount_minor),
        amount_minor,
        currency: c.currency.into(),
        reference: Some(c.reference.into()),
        remittance_text: None,
        payer_name: None,
        payer_account: None,
        booking_date: epoch_days(now.date_naive()),
        value_date: epoch_days(now.date_naive()),
    }
}

fn done(c: &Case, status: Option<&str>, rejected: &[Rejected]) -> bool {
    match c.behaviour {
        Behaviour::PaysBeforeDue | Behaviour::PaysOnThePage => status == Some("closed:paid"),
        Behaviour::NeverPays | Behaviour::PaysHalfAfterNudge => status == Some("handed_over"),
        Behaviour::CreditedBeforeDue => status == Some("closed:credited"),
        Behaviour::Invalid => rejected.iter().any(|r| {
            r.raw_value
                .as_deref()
                .is_some_and(|v| v.windows(6).any(|w| w == c.number.as_bytes()))
        }),
    }
}

pub async fn run(mut common: CommonConfig, _figment: Figment, args: DemoArgs) -> anyhow::Result<()> {
    // The demo runs on the dev stack with its stand-ins and published secrets.
    common.profile = forfall_platform::config::Profile::Development;
    let started = Instant::now();
    // The story is the output; service logs only when something is wrong (RUST_LOG overrides).
    if common.log.level == "info" {
        common.log.level = "warn".into();
    }
    let start: DateTime<Utc> = "2026-03-02T06:00:00Z".parse()?;
    let clock = AcceleratedClock::new(start, args.speed);
    println!(
        "Forfall demo: the whole pipeline on the dev stack, simulated time at {:.0} days per second.",
        args.speed / 86_400.0
    );
    let mut stack = LocalStack::start(common, clock.clone()).await?;
    // What the creditor's messages say about it (a tenant's `dispatch.tenants.<id>` section).
    stack.set("dispatch.tenants.demo-utility.name", "Nordlys Forsyning");
    stack.set(
        "dispatch.tenants.demo-utility.bank_account",
        "IBAN DK50 0040 0440 1162 43",
    );
    stack.set("dispatch.tenants.demo-utility.contact", "kundeservice@nordlys.example");
    // Vipps MobilePay (its dev stand-in) for paying on the page, and an ingress in front of the
    // portal whose address the links and the provider's webhook name.
    let vipps = VippsSim::start(DEMO_MERCHANT.merchant()).await?;
    let rt = stack.rt.clone();
    let ingress = Forwarder::start(move || rt.admin_addr("portal")).await?;
    let webhook_secret = vipps
        .register_webhook(
            &format!("http://{}/providers/vipps/{TENANT}", ingress.addr),
            &["epayments.payment.authorized.v1", "epayments.payment.captured.v1"],
        )
        .await?;
    let merchant = format!("portal.vipps.{TENANT}");
    for (key, value) in [
        ("base_url", vipps.url()),
        ("client_id", DEMO_MERCHANT.client_id.to_owned()),
        ("client_secret", DEMO_MERCHANT.client_secret.to_owned()),
        ("subscription_key", DEMO_MERCHANT.subscription_key.to_owned()),
        ("merchant_serial_number", DEMO_MERCHANT.msn.to_owned()),
        ("webhook_secret", webhook_secret),
    ] {
        stack.set(&format!("{merchant}.{key}"), value);
    }
    stack.set("dispatch.pay_link.base_url", format!("http://{}/pay/", ingress.addr));
    let stack = stack;
    stack.start_all();
    stack.wait_ready(&crate::TARGETS, Duration::from_secs(60)).await?;
    for name in crate::TARGETS {
        if let Some(addr) = stack.rt.admin_addr(name) {
            println!("  {name:<9} metrics and health on http://{addr}/metrics");
        }
    }
    let result = drive(&stack, args.timeout_secs).await;
    stack.shutdown().await;
    println!("\n(finished in {:.1} s of real time)", started.elapsed().as_secs_f64());
    result
}

async fn drive(stack: &LocalStack, timeout_secs: u64) -> anyhow::Result<()> {
    let cases = demo_cases();
    let billing = stack.topic(&stack.topics().billing_invoice_events);
    let payments = stack.topic(&stack.topics().payments);
    let now = stack.rt.clock.now();
    for c in &cases {
        stack.produce(&billing, &debtor(c), &issued(c, now)).await?;
    }
    // Someone pays with a reference nobody issued.
    let stray = Case {
        reference: "9999999",
        ..demo_cases().remove(0)
    };
    stack.produce(&payments, "bank", &payment(&stray, 10_000, now)).await?;
    println!(
        "\nFed {} invoices (due {}) and 1 stray payment; simulated time is running...",
        cases.len(),
        (now + Days::days(3)).date_naive()
    );

    let deadline = Instant::now() + Duration::from_secs(timeout_secs);
    let mut paid: BTreeMap<&str, bool> = BTreeMap::new();
    let outcomes_topic = stack.topic(&stack.topics().dispatch_outcomes);
    let rejected_topic = stack.topic(&stack.topics().rejected);
    loop {
        let outcomes = stack.read::<DispatchOutcome>(&outcomes_topic).await?;
        let rejected = stack.read::<Rejected>(&rejected_topic).await?;
        let mut all_done = true;
        for c in &cases {
            let status = stack.journey_status(TENANT, c.invoice_id).await?;
            let nudged = outcomes
                .iter()
                .any(|o| o.invoice_id == c.invoice_id && o.step == "nudge" && o.status == DispatchStatus::Sent);
            let now = stack.rt.clock.now();
            match c.behaviour {
                Behaviour::PaysBeforeDue if status.as_deref() == Some("open") && !paid.contains_key(c.invoice_id) => {
                    stack
                        .produce(&payments, "bank", &payment(c, c.amount_minor, now))
                        .await?;
                    paid.insert(c.invoice_id, true);
                }
                Behaviour::PaysOnThePage if nudged && !paid.contains_key(c.invoice_id) => {
                    println!("  {} {}", c.who, pay_on_the_page(stack, c.email).await?);
                    paid.insert(c.invoice_id, true);
                }
                Behaviour::PaysHalfAfterNudge if nudged && !paid.contains_key(c.invoice_id) => {
                    stack
                        .produce(&payments, "bank", &payment(c, c.amount_minor / 2, now))
                        .await?;
                    paid.insert(c.invoice_id, true);
                }
                Behaviour::CreditedBeforeDue
                    if status.as_deref() == Some("open") && !paid.contains_key(c.invoice_id) =>
                {
                    let credit = InvoiceCredited {
                        event_id: new_event_id(),
                        tenant: TENANT.into(),
                        debtor_id: debtor(c),
                        occurred_at: now.timestamp_millis(),
                        invoice_id: c.invoice_id.into(),
                        credit_note_id: "cn-1".into(),
                        amount_minor: c.amount_minor,
                        currency: c.currency.into(),
                    };
                    stack.produce(&billing, &debtor(c), &credit).await?;
                    paid.insert(c.invoice_id, true);
                }
                _ => {}
            }
            all_done &= done(c, status.as_deref(), &rejected);
        }
        let stray_seen = !stack
            .read::<PaymentUnmatched>(&stack.topic(&stack.topics().payments_unmatched))
            .await?
            .is_empty();
        // Sweden's, Finland's, and Norway's two claims in one case.
        let handoffs_seen = stack.agency.cases().len() >= 3;
        if all_done && stray_seen && handoffs_seen {
            break;
        }
        if Instant::now() > deadline {
            summary(stack, &cases).await?;
            anyhow::bail!("the demo did not finish within {timeout_secs} s; the summary above shows how far it got");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    summary(stack, &cases).await
}

/// The pay link in the debtor's first e-mail.
fn pay_link(stack: &LocalStack, email: &str) -> Option<String> {
    let body = stack.mail.to(email).first()?.body();
    body.split_whitespace()
        .find(|w| w.contains("/pay/v1."))
        .map(str::to_owned)
}

/// What the debtor does on their page: opens the link from the nudge, taps "pay with Vipps",
/// approves in the app (the stand-in), and comes back to the portal's page.
async fn pay_on_the_page(stack: &LocalStack, email: &str) -> anyhow::Result<String> {
    let url = pay_link(stack, email).ok_or_else(|| anyhow::anyhow!("no pay link in the nudge to {email}"))?;
    let page = reqwest::get(&url).await?.text().await?;
    let paid = crate::pay_flow::pay_with_vipps(&url, &page, "", "approve").await?;
    let said = paid
        .body
        .split_once("role=\"status\">")
        .and_then(|(_, rest)| rest.split_once('<'))
        .map_or("", |(text, _)| text);
    Ok(format!(
        "opened the link in the nudge, paid with Vipps on the page; it said (HTTP {}): \"{said}\"",
        paid.status
    ))
}

/// The debtor's page behind the pay link in their first e-mail, as the portal answered it
/// while the demo ran.
async fn pay_page(stack: &LocalStack, email: &str) -> Option<String> {
    let url = pay_link(stack, email)?;
    let answer = reqwest::get(&url).await.ok()?;
    let status = answer.status().as_u16();
    let html = answer.text().await.unwrap_or_default();
    // What the page says instead of how to pay (paid, with the agency...), if anything.
    let shows = html
        .split_once("<p class=\"status\" role=\"status\">")
        .and_then(|(_, rest)| rest.split_once("</p>"))
        .map_or_else(
            || "what is owed and how to pay it".to_owned(),
            |(status, _)| format!("\"{status}\""),
        );
    Some(format!("pay page (HTTP {status}, shows {shows}): {url}"))
}

async fn summary(stack: &LocalStack, cases: &[Case]) -> anyhow::Result<()> {
    let events = stack
        .read::<JourneyEvent>(&stack.topic(&stack.topics().journey_events))
        .await?;
    let outcomes = stack
        .read::<DispatchOutcome>(&stack.topic(&stack.topics().dispatch_outcomes))
        .await?;
    let rejected = stack.read::<Rejected>(&stack.topic(&stack.topics().rejected)).await?;
    let agency = stack.agency.cases();
    println!(
        "\nWhat happened (simulated time now {}):",
        stack.rt.clock.now().format("%Y-%m-%d")
    );
    for c in cases {
        let status = stack.journey_status(TENANT, c.invoice_id).await?;
        println!("\n  invoice {} to {} — {}", c.number, c.who, c.story);
        if c.behaviour == Behaviour::Invalid {
            for r in rejected.iter().filter(|r| {
                r.raw_value
                    .as_deref()
                    .is_some_and(|v| v.windows(6).any(|w| w == c.number.as_bytes()))
            }) {
                println!("    rejected by {}: {} ({})", r.service, r.reason_code, r.detail);
            }
            continue;
        }
        let timeline: Vec<String> = events
            .iter()
            .filter(|e| e.invoice_id == c.invoice_id)
            .map(|e| match &e.step {
                Some(step) => format!("{}({step})", e.kind),
                None => e.kind.clone(),
            })
            .collect();
        println!("    timeline: {}", timeline.join(" → "));
        for o in outcomes.iter().filter(|o| o.invoice_id == c.invoice_id) {
            println!(
                "    {} {}: {:?}{}",
                o.step,
                o.channel,
                o.status,
                o.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()
            );
        }
        for m in stack.mail.to(c.email) {
            println!("    e-mail received: \"{}\"", m.header("Subject").unwrap_or_default());
        }
        if let Some(page) = pay_page(stack, c.email).await {
            println!("    {page}");
        }
        for case in agency.iter().filter(|a| {
            a["merged_claims"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| m["invoice_id"] == c.invoice_id)
        }) {
            println!(
                "    handed to the agency in the case of invoice {} ({})",
                case["invoice_number"].as_str().unwrap_or_default(),
                case["merge_citation"].as_str().unwrap_or_default()
            );
        }
        for case in agency.iter().filter(|a| a["invoice_id"] == c.invoice_id) {
            let money = |minor: &serde_json::Value| {
                case["currency"]
                    .as_str()
                    .and_then(|c| c.parse::<forfall_domain::Currency>().ok())
                    .map(|c| forfall_domain::Money::new(minor.as_i64().unwrap_or(0), c).to_string())
                    .unwrap_or_default()
            };
            let amount = |field: &str| money(&case[field]);
            let principal = amount("principal_minor");
            let steps: Vec<&str> = case["steps_taken"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str())
                .collect();
            println!("    handed to the agency: {principal} after {}", steps.join(", "));
            for line in case["interest_lines"].as_array().into_iter().flatten() {
                let rate = line["reference_bp"].as_i64().unwrap_or(0) + line["margin_bp"].as_i64().unwrap_or(0);
                println!(
                    "      + late interest, {} days at {}.{:02} %: {} ({})",
                    line["days"],
                    rate / 100,
                    rate % 100,
                    money(&line["amount_minor"]),
                    line["citation"].as_str().unwrap_or_default()
                );
            }
            if let Some(note) = case["interest_note"].as_str() {
                println!("      ({note})");
            }
            println!("      claimed in all: {}", amount("total_minor"));
            for m in case["merged_claims"].as_array().into_iter().flatten() {
                println!(
                    "      with invoice {} merged in: {}; the case comes to {}",
                    m["invoice_number"].as_str().unwrap_or_default(),
                    money(&m["total_minor"]),
                    amount("combined_total_minor")
                );
            }
            let messages = case["messages"].as_array().map_or(0, Vec::len);
            println!("      evidence: {messages} messages, each with what became of it and a SHA-256 of what it said");
        }
        println!("    final state: {}", status.unwrap_or_else(|| "unknown".into()));
    }
    let unmatched = stack
        .read::<PaymentUnmatched>(&stack.topic(&stack.topics().payments_unmatched))
        .await?;
    for u in &unmatched {
        println!(
            "\n  stray payment {} ({} {}) — kept as unmatched for a person to look at: {}",
            u.payment_id, u.amount_minor, u.currency, u.reason
        );
    }
    Ok(())
}
