//! Benchmark: a utility's billing run, end to end, on one machine.
//!
//!     make bench-billing-run        # or: cargo run --release -p forfall-e2e --bin billing-run -- 1000000 [SMS_PER_SECOND]
//!
//! A billing producer publishes N invoices (default 1,000,000), one per customer, due on one
//! day (Monday 2 November 2026), of a utility billing in four countries (DK 30 %, SE 30 %,
//! NO 25 %, FI 15 %: each country's currency, language, payment reference and sizes of
//! amounts, names and postal addresses). Ingest, matcher, watcher and dispatch run in this
//! process on the dev stack, as `make run` runs them, with the clock a week before the due date:
//!
//! 1. **issue**: the invoices are published while the services run; ingest validates and
//!    normalises them, the matcher indexes them, the watcher opens a journey for each (its
//!    nudge timer at 09:00 local time on the due date). Redis' memory is taken before and
//!    after.
//! 2. **due date**: the clock moves to 10:00 UTC on the due date, past every customer's 09:00;
//!    the watcher fires N nudges at once and dispatch sends them: by SMS to the 30 % who prefer
//!    it (through a GatewayAPI stand-in at `SMS_PER_SECOND`, the provider's rate limit, default
//!    2,000) and by e-mail to the others (through the SMTP stand-in).
//! 3. **payments**: 40 % of the customers pay the amount with their reference, as a bank file
//!    import publishes it; the matcher matches each, the watcher closes its journey as paid.
//!
//! Each stage's time to drain is from its trigger (the first invoice published, the clock
//! moved, the first payment published) to its last record; its rate is records over that time.
//! The baseline, in the same run: a plain rdkafka relay of the same invoice bytes.
//!
//! To compare two values of a batch size on one build: `MATCHER_BATCH=N` (`matcher.batch`),
//! `WATCHER_CONSUME_BATCH=N` (`watcher.consume_batch`), `WATCHER_BATCH=N` (`watcher.batch`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use forfall_devsinks::sms::{Provider, SmsProviderSim};
use forfall_domain::invoice::{DebtorDetails, PostalAddress, epoch_days};
use forfall_domain::reference::{self, ReferenceKind};
use forfall_e2e::*;
use forfall_platform::clock::ManualClock;
use forfall_platform::records::{InvoiceIssued, PaymentReceived, new_event_id};
use rdkafka::producer::{FutureProducer, FutureRecord};

const TENANT: &str = "acme-energy";
/// DEV AND TEST ONLY: the GatewayAPI stand-in's token.
const SMS_TOKEN: &str = "billing-run-bench-token";

/// What differs between the utility's customers in one country.
struct Country {
    code: &'static str,
    currency: &'static str,
    language: &'static str,
    reference: ReferenceKind,
    /// The country calling code and the digits after it of a mobile number.
    mobile: (&'static str, u64),
    /// The smallest bill and the spread above it, in minor units.
    amount: (i64, i64),
    names: [&'static str; 4],
    streets: [&'static str; 3],
    cities: [(&'static str, &'static str); 3],
    description: &'static str,
}

const COUNTRIES: [Country; 4] = [
    Country {
        code: "DK",
        currency: "DKK",
        language: "da",
        reference: ReferenceKind::Fik71,
        mobile: ("+45", 20_000_000),
        amount: (40_000, 90_000),
        names: ["Maja Kristensen", "Lars Nielsen", "Sofie Andersen", "Mikkel Pedersen"],
        streets: ["Vesterbrogade", "Nørregade", "Strandvejen"],
        cities: [("1620", "København V"), ("8000", "Aarhus C"), ("5000", "Odense C")],
        description: "Elektricitet, oktober 2026: 412 kWh, netabonnement og elafgift",
    },
    Country {
        code: "SE",
        currency: "SEK",
        language: "sv",
        reference: ReferenceKind::Ocr,
        mobile: ("+46", 701_000_000),
        amount: (50_000, 130_000),
        names: ["Elsa Johansson", "Erik Karlsson", "Astrid Lindqvist", "Oskar Nilsson"],
        streets: ["Drottninggatan", "Kungsgatan", "Storgatan"],
        cities: [("111 51", "Stockholm"), ("411 06", "Göteborg"), ("211 22", "Malmö")],
        description: "El, oktober 2026: 518 kWh, elnät och energiskatt",
    },
    Country {
        code: "NO",
        currency: "NOK",
        language: "nb",
        reference: ReferenceKind::KidMod10,
        mobile: ("+47", 40_000_000),
        amount: (60_000, 140_000),
        names: ["Ingrid Hansen", "Ole Johansen", "Kari Olsen", "Henrik Larsen"],
        streets: ["Karl Johans gate", "Storgata", "Bygdøy allé"],
        cities: [("0154", "Oslo"), ("5003", "Bergen"), ("7011", "Trondheim")],
        description: "Strøm, oktober 2026: 1 240 kWh, nettleie og elavgift",
    },
    Country {
        code: "FI",
        currency: "EUR",
        language: "fi",
        reference: ReferenceKind::Finnish,
        mobile: ("+358", 401_000_000),
        amount: (5_000, 13_000),
        names: ["Aino Virtanen", "Juha Korhonen", "Emma Mäkinen", "Mikko Nieminen"],
        streets: ["Mannerheimintie", "Hämeenkatu", "Aleksanterinkatu"],
        cities: [("00100", "Helsinki"), ("33100", "Tampere"), ("20100", "Turku")],
        description: "Sähkö, lokakuu 2026: 610 kWh, siirto ja sähkövero",
    },
];

/// Customer `i`'s country: DK 30 %, SE 30 %, NO 25 %, FI 15 %.
fn country(i: usize) -> &'static Country {
    match i % 20 {
        0..6 => &COUNTRIES[0],
        6..12 => &COUNTRIES[1],
        12..17 => &COUNTRIES[2],
        _ => &COUNTRIES[3],
    }
}

fn debtor_id(i: usize) -> String {
    format!("{TENANT}:c-{i:09}")
}

fn amount_minor(i: usize) -> i64 {
    let c = country(i);
    c.amount.0 + (i as i64 * 7_919) % c.amount.1
}

fn payment_reference(i: usize) -> anyhow::Result<String> {
    // Fourteen digits: a FI-kort 71 id is fifteen with its check digit.
    Ok(reference::generate(country(i).reference, &format!("{:014}", 10_000_000 + i))?.value)
}

/// Whether customer `i` prefers SMS (30 %): they gave a mobile number and asked for texts.
fn prefers_sms(i: usize) -> bool {
    i % 10 < 3
}

/// Whether customer `i` pays during the run (40 %).
fn pays(i: usize) -> bool {
    i % 5 < 2
}

/// The local part people give for their name: lower case, without the letters an address
/// without SMTPUTF8 cannot carry (ä, ø, å...).
fn mailbox(name: &str) -> String {
    name.to_lowercase()
        .chars()
        .map(|c| match c {
            ' ' => ".".to_owned(),
            'ä' | 'å' | 'á' => "a".to_owned(),
            'æ' => "ae".to_owned(),
            'ö' | 'ø' => "o".to_owned(),
            c => c.to_string(),
        })
        .collect()
}

fn invoice(i: usize, due: NaiveDate) -> anyhow::Result<InvoiceIssued> {
    let c = country(i);
    let name = c.names[i % c.names.len()];
    let (postal_code, city) = c.cities[i % c.cities.len()];
    let sms = prefers_sms(i);
    Ok(InvoiceIssued {
        event_id: new_event_id(),
        tenant: TENANT.into(),
        debtor_id: debtor_id(i),
        occurred_at: 0,
        invoice_id: format!("inv-2026-10-{i:09}"),
        revision: 1,
        invoice_number: format!("2026{i:09}"),
        issue_date: epoch_days(due) - 14,
        due_date: epoch_days(due),
        amount_minor: amount_minor(i),
        currency: c.currency.into(),
        jurisdiction: c.code.into(),
        debtor_kind: "consumer".into(),
        payment_reference: Some(payment_reference(i)?),
        description: Some(c.description.into()),
        debtor_name: Some(name.into()),
        email: Some(format!("{}.{i}@example.{}", mailbox(name), c.code.to_lowercase())),
        phone: sms.then(|| format!("{}{}", c.mobile.0, c.mobile.1 + (i as u64 % 9_000_000))),
        language: Some(c.language.into()),
        preferred_channels: if sms { vec!["sms".into()] } else { Vec::new() },
        declined_channels: Vec::new(),
        debtor_details: Some(DebtorDetails {
            address: Some(PostalAddress {
                lines: vec![format!("{} {}", c.streets[i % c.streets.len()], 1 + i % 180)],
                postal_code: postal_code.into(),
                city: city.into(),
                country: c.code.into(),
            }),
            national_id: None,
            company_id: None,
        }),
        reminder_fee_agreed: None,
    })
}

fn payment(i: usize, due: NaiveDate) -> anyhow::Result<PaymentReceived> {
    Ok(PaymentReceived {
        event_id: new_event_id(),
        tenant: TENANT.into(),
        debtor_id: None,
        occurred_at: chrono::Utc::now().timestamp_millis(),
        payment_id: format!("bank-2026-11-{i:09}"),
        amount_minor: amount_minor(i),
        currency: country(i).currency.into(),
        reference: Some(payment_reference(i)?),
        remittance_text: None,
        payer_name: Some(country(i).names[i % 4].into()),
        payer_account: None,
        booking_date: epoch_days(due) + 1,
        value_date: epoch_days(due) + 1,
    })
}

/// The default policy, with the due-date nudge on SMS too for those who prefer it.
fn policy() -> anyhow::Result<String> {
    let email_only = r#"{ name = "nudge", offset_banking_days = 0, channels = ["email"], tone = "nudge" }"#;
    anyhow::ensure!(
        forfall_domain::policy::DEFAULT_POLICY.contains(email_only),
        "the default policy's nudge step changed: update the benchmark"
    );
    Ok(forfall_domain::policy::DEFAULT_POLICY.replace(
        email_only,
        r#"{ name = "nudge", offset_banking_days = 0, channels = ["email", "sms"], tone = "nudge" }"#,
    ))
}

/// A stage's progress: a Prometheus counter of one service, from a trigger to a target.
struct Stage {
    name: &'static str,
    service: &'static str,
    metric: &'static str,
    parts: Vec<String>,
    target: usize,
    first: Option<Duration>,
    drained: Option<Duration>,
}

impl Stage {
    fn new(name: &'static str, service: &'static str, metric: &'static str, parts: &[&str], target: usize) -> Self {
        Self {
            name,
            service,
            metric,
            parts: parts.iter().map(|p| p.to_string()).collect(),
            target,
            first: None,
            drained: None,
        }
    }
}

/// Polls the stages' counters until each reached its target; times are from `trigger`. Gives
/// up when no stage moved for `STALLED` (a record lost or refused never arrives).
async fn drain(stack: &LocalStack, stages: &mut [Stage], trigger: Instant) -> anyhow::Result<()> {
    const STALLED: Duration = Duration::from_secs(120);
    let mut counts = vec![0usize; stages.len()];
    let mut moved = Instant::now();
    while stages.iter().any(|s| s.drained.is_none()) {
        // Each service's metrics once a round, however many of its stages are watched.
        let mut texts: HashMap<&str, String> = HashMap::new();
        for (stage, count) in stages.iter_mut().zip(counts.iter_mut()) {
            if stage.drained.is_some() {
                continue;
            }
            if !texts.contains_key(stage.service) {
                texts.insert(stage.service, stack.metrics(stage.service).await.unwrap_or_default());
            }
            let text = &texts[stage.service];
            let parts: Vec<&str> = stage.parts.iter().map(String::as_str).collect();
            let done = metric_sum(text, stage.metric, &parts) as usize;
            if done > 0 && stage.first.is_none() {
                stage.first = Some(trigger.elapsed());
            }
            if done != *count {
                (*count, moved) = (done, Instant::now());
            }
            if done >= stage.target {
                stage.drained = Some(trigger.elapsed());
                eprintln!(
                    "{}: {} in {:.1} s",
                    stage.name,
                    stage.target,
                    trigger.elapsed().as_secs_f64()
                );
            }
        }
        if moved.elapsed() > STALLED {
            let waiting: Vec<String> = stages
                .iter()
                .zip(&counts)
                .filter(|(s, _)| s.drained.is_none())
                .map(|(s, c)| format!("{} at {c} of {}", s.name, s.target))
                .collect();
            anyhow::bail!("nothing moved for {} s: {}", STALLED.as_secs(), waiting.join(", "));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n = bench_arg(1, 1_000_000.0)? as usize;
    let sms_rate = bench_arg(2, 2_000.0)?;
    let due = day(2026, 11, 2);
    let mut config = base_config();
    config.log.level = "warn".into();
    let clock = ManualClock::new(at("2026-10-26T06:00:00Z"));
    let mut stack = LocalStack::start(config, clock.clone()).await?;
    let sms = SmsProviderSim::start(Provider::GatewayApi, "", SMS_TOKEN).await?;
    let policy_file = std::env::temp_dir().join(format!("{}-policy.toml", stack.prefix));
    std::fs::write(&policy_file, policy()?)?;
    stack.set("watcher.policy_file", policy_file.display().to_string());
    counts_from_env(
        &mut stack,
        &[
            ("MATCHER_BATCH", "matcher.batch"),
            ("WATCHER_CONSUME_BATCH", "watcher.consume_batch"),
            ("WATCHER_BATCH", "watcher.batch"),
        ],
    )?;
    stack.set("dispatch.sms.provider", "gatewayapi");
    stack.set(
        "dispatch.sms.gatewayapi",
        serde_json::json!({
            "url": sms.url(),
            "token": SMS_TOKEN,
            "sender": "AcmeEnergy",
            "rate_per_sec": sms_rate,
            "burst": sms_rate,
        }),
    );
    let stack = stack;
    let services = ["ingest", "matcher", "watcher", "dispatch"];
    for s in services {
        stack.start_service(s);
    }
    stack.wait_ready(&services, Duration::from_secs(120)).await?;
    let mut redis = stack.redis();
    let memory_before = used_memory(&mut redis).await?;
    let billing = stack.topic(&stack.topics().billing_invoice_events);
    let invoices = stack.topic(&stack.topics().invoices);
    let brokers = stack.rt.config.kafka.brokers.clone();
    let producer: FutureProducer = bench_client(&brokers)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .create()?;

    // Stage 1: the billing run is published and flows through ingest, matcher and watcher.
    let mut issue = vec![
        Stage::new("publish (billing system)", "ingest", "forfall_messages_total", &[], n),
        Stage::new(
            "ingest: validated, normalised",
            "ingest",
            "forfall_messages_total",
            &["outcome=\"applied\""],
            n,
        ),
        Stage::new(
            "matcher: invoices indexed",
            "matcher",
            "forfall_messages_total",
            &[&format!("topic=\"{invoices}\""), "outcome=\"applied\""],
            n,
        ),
        Stage::new(
            "watcher: journeys opened",
            "watcher",
            "forfall_watcher_transitions_total",
            &["kind=\"opened\""],
            n,
        ),
    ];
    let published = Instant::now();
    let publish = async {
        let mut publisher = Publisher::new(producer.clone(), &billing);
        for i in 0..n {
            let record = invoice(i, due)?;
            let payload = stack.rt.codec.encode(&billing, &record).await?;
            publisher.send(record.debtor_id, payload).await?;
        }
        let bytes = publisher.finish().await?;
        anyhow::Ok((bytes, published.elapsed()))
    };
    // The stages downstream are watched while the billing system publishes.
    let (publishing, downstream) = issue.split_at_mut(1);
    let (published_all, drained) = tokio::join!(publish, drain(&stack, downstream, published));
    let (bytes, publish_time) = published_all?;
    drained?;
    publishing[0].first = Some(Duration::ZERO);
    publishing[0].drained = Some(publish_time);
    let memory_open = used_memory(&mut redis).await?;
    let open_by_kind = memory_by_kind(&mut redis, &stack.rt.config.redis.key_prefix).await?;

    // Stage 2: the due date's nudges, at once.
    clock.set(at("2026-11-02T10:00:00Z"));
    let due_moment = Instant::now();
    let mut nudge = vec![
        Stage::new(
            "watcher: nudges fired",
            "watcher",
            "forfall_watcher_steps_fired_total",
            &["step=\"nudge\""],
            n,
        ),
        Stage::new(
            "dispatch: messages sent",
            "dispatch",
            "forfall_dispatch_messages_total",
            &["step=\"nudge\""],
            n,
        ),
    ];
    drain(&stack, &mut nudge, due_moment).await?;
    let (mails, texts) = (stack.mail.count(), sms.accepted().len());
    let want_texts = (0..n).filter(|&i| prefers_sms(i)).count();
    anyhow::ensure!(
        mails == n - want_texts && texts == want_texts,
        "the stand-ins received {mails} e-mails and {texts} texts, not {} and {want_texts}",
        n - want_texts
    );

    // Stage 3: 40 % pay.
    let payments = stack.topic(&stack.topics().payments);
    let payers: Vec<usize> = (0..n).filter(|&i| pays(i)).collect();
    let mut pay = vec![
        Stage::new(
            "matcher: payments matched",
            "matcher",
            "forfall_matcher_payments_total",
            &["result=\"exact_reference\""],
            payers.len(),
        ),
        Stage::new(
            "watcher: journeys closed as paid",
            "watcher",
            "forfall_watcher_transitions_total",
            &["kind=\"paid\""],
            payers.len(),
        ),
    ];
    let paying = Instant::now();
    for chunk in payers.chunks(10_000) {
        let mut sent = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let payload = stack.rt.codec.encode(&payments, &payment(i, due)?).await?;
            // Keyed by tenant, as the bank-file import keys them.
            sent.push(
                producer
                    .send_result(FutureRecord::to(&payments).key(TENANT).payload(&payload))
                    .map_err(|(e, _)| e)?,
            );
        }
        for ack in futures::future::join_all(sent).await {
            ack?.map_err(|(e, _)| e)?;
        }
    }
    drain(&stack, &mut pay, paying).await?;
    let memory_end = used_memory(&mut redis).await?;
    stack.shutdown().await;

    // The baseline: the same invoice bytes through a plain relay.
    let relay_topic = format!("{}.bench.relay", stack.prefix);
    forfall_platform::kafka::ensure_topics(&stack.rt.config.kafka, std::slice::from_ref(&relay_topic)).await?;
    let relay = plain_relay(&brokers, &format!("{}.relay", stack.prefix), &billing, &relay_topic, n).await?;
    let relay_rate = n as f64 / relay.as_secs_f64();
    remove_keys(&mut redis, &stack.rt.config.redis.key_prefix).await?;
    let _ = std::fs::remove_file(&policy_file);

    println!(
        "billing run: {n} invoices of {n} customers (DK 30 %, SE 30 %, NO 25 %, FI 15 %), {} bytes each on average, {} partitions; SMS provider limit {sms_rate:.0}/s",
        bytes / n.max(1),
        stack.rt.config.kafka.partitions
    );
    println!("| stage | records | first after | drained after | records/s | ratio to relay |");
    println!("|---|---:|---:|---:|---:|---:|");
    let phases: [(&str, &[Stage]); 3] = [
        ("issue (from the first invoice published)", &issue),
        ("due date (from the clock reaching it)", &nudge),
        ("payments (from the first payment published)", &pay),
    ];
    for (phase, stages) in phases {
        println!("| *{phase}* | | | | | |");
        for s in stages {
            let drained = s.drained.unwrap_or_default().as_secs_f64();
            let rate = s.target as f64 / drained.max(1e-9);
            println!(
                "| {} | {} | {:.1} s | {:.1} s | {rate:.0} | {:.3} |",
                s.name,
                s.target,
                s.first.unwrap_or_default().as_secs_f64(),
                drained,
                rate / relay_rate
            );
        }
    }
    println!(
        "| plain rdkafka relay of the invoice bytes | {n} | | {:.1} s | {relay_rate:.0} | 1 |",
        relay.as_secs_f64()
    );
    println!(
        "Redis: {:.0} MB for {n} open invoices ({:.0} bytes each: ingest's snapshots, the matcher's index, the watcher's journeys and timers); {:.0} MB at the end",
        (memory_open - memory_before) as f64 / 1e6,
        (memory_open - memory_before) as f64 / n as f64,
        (memory_end - memory_before) as f64 / 1e6
    );
    println!(
        "Redis per open invoice by kind of key, once the invoices were open (MEMORY USAGE; keys, bytes per invoice):"
    );
    for (kind, keys, bytes) in &open_by_kind {
        println!("  {kind}: {keys} keys, {:.0} bytes", *bytes as f64 / n as f64);
    }
    println!("stand-ins: {mails} e-mails, {texts} texts");
    let slowest = phases
        .iter()
        .flat_map(|(_, stages)| stages.iter())
        .min_by(|a, b| {
            let rate = |s: &Stage| s.target as f64 / s.drained.unwrap_or_default().as_secs_f64().max(1e-9);
            rate(a).total_cmp(&rate(b))
        })
        .map(|s| s.name)
        .unwrap_or("none");
    println!("slowest stage: {slowest}");
    Ok(())
}
