//! Payments on the dev stack: camt.054 import, matching rules, duplicates, partial and over
//! payments, unmatched payments matched by hand, and recalls after hand-off.

use std::time::Duration;

use forfall_domain::reference::{self, ReferenceKind};
use forfall_e2e::*;
use forfall_platform::clock::ManualClock;
use forfall_platform::records::{JourneyEvent, PaymentMatched, PaymentReceived, PaymentUnmatched, Rejected};
use serde_json::{Value, json};

/// Imports a camt.054 file as a bank integration does: a 503 (the matcher's state not built
/// yet, just after its start) is tried again; any other answer is the test's.
async fn import(stack: &LocalStack, tenant: &str, xml: &str, lenient: bool) -> anyhow::Result<(u16, Value)> {
    let addr = stack.rt.admin_addr("matcher").expect("the matcher serves HTTP");
    eventually("the matcher to take the file", WAIT, || async {
        let r = reqwest::Client::new()
            .post(format!(
                "http://{addr}/v1/payments/camt054?tenant={tenant}&lenient={lenient}"
            ))
            .body(xml.to_owned())
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status != 503).then_some((status, r.json().await?)))
    })
    .await
}

fn norwegian(
    invoice_id: &'static str,
    number: &'static str,
    kid: &'static str,
    email: &'static str,
) -> Sample<'static> {
    Sample {
        tenant: "nordkraft",
        invoice_id,
        number,
        due: day(2026, 3, 2),
        amount_minor: 125_000,
        currency: "NOK",
        jurisdiction: "NO",
        email,
        reference: kid,
        language: "nb",
    }
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// `n` Norwegian invoices of as many debtors issued at once (`no-<name>-<i>`, numbers from
/// `<base>00000`), each with its KID.
async fn billing_run(
    stack: &LocalStack,
    billing: &str,
    name: &str,
    base: &str,
    n: usize,
) -> anyhow::Result<Vec<Sample<'static>>> {
    let invoices: Vec<Sample<'static>> = (0..n)
        .map(|i| {
            let number = format!("{base}{i:05}");
            Ok(norwegian(
                leak(format!("no-{name}-{i}")),
                leak(number.clone()),
                leak(reference::generate(ReferenceKind::KidMod10, &number)?.value),
                leak(format!("{name}-{i}@example.test")),
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let issued: Vec<(String, _)> = invoices.iter().map(|s| (s.debtor_id(), s.issued())).collect();
    futures::future::try_join_all(
        issued
            .iter()
            .map(|(debtor, issued)| stack.produce(billing, debtor, issued)),
    )
    .await?;
    Ok(invoices)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bank_file_settles_the_invoice_before_its_reminder_and_a_second_import_books_nothing() -> anyhow::Result<()> {
    let clock = ManualClock::new(at("2026-03-01T08:00:00Z"));
    let stack = LocalStack::start(base_config(), clock.clone()).await?;
    stack.start_all();
    let kid = leak(reference::generate(ReferenceKind::KidMod10, "7000123")?.value);
    let s = norwegian("no-pay-1", "7000123", kid, "ola@example.test");
    stack
        .produce(
            &stack.topic(&stack.topics().billing_invoice_events),
            &s.debtor_id(),
            &s.issued(),
        )
        .await?;
    status_is(&stack, s.tenant, s.invoice_id, "open").await?;
    clock.set(at("2026-03-02T08:00:01Z")); // the nudge, 09:00 in Oslo
    eventually("the nudge", WAIT, || async {
        Ok((stack.mail.to(s.email).len() == 1).then_some(()))
    })
    .await?;

    let file = camt054(
        "NDEA-1",
        &[CamtCredit {
            transaction_id: "TX-1",
            amount: "1250.00",
            currency: "NOK",
            reference: Some(kid),
            text: None,
            payer_account: None,
            date: "2026-03-04",
        }],
    );
    let (status, body) = import(&stack, s.tenant, &file, false).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["imported"].as_u64(), body["already_known"].as_u64()),
        (Some(1), Some(0)),
        "{body}"
    );
    status_is(&stack, s.tenant, s.invoice_id, "closed:paid").await?;
    // The contact stop the watcher put up before its "paid" event is gone with the journey
    // write that followed: the journey itself says it now.
    let keys = forfall_platform::redis_store::Keys::new(&stack.rt.config.redis.key_prefix);
    let stop = forfall_platform::journey_state::stop_location(&keys, s.tenant, s.invoice_id);
    let left: Option<Vec<u8>> = redis::cmd("HGET")
        .arg(&stop.key)
        .arg(&stop.field)
        .query_async(&mut stack.redis())
        .await?;
    assert_eq!(left, None, "no contact stop left behind");

    // The reminder falls due a moment later: it is not sent.
    let mark = issue_timer_mark(&stack, &s, day(2026, 3, 16)).await?;
    clock.set(at("2026-03-16T08:00:01Z"));
    timer_mark_fired(&stack, &mark).await?;
    dispatch_caught_up(&stack, &s).await?;
    assert_eq!(stack.mail.to(s.email).len(), 1, "no reminder after payment");

    // The same file again: recognised, and nothing is booked twice.
    let (status, body) = import(&stack, s.tenant, &file, false).await?;
    assert_eq!(status, 200);
    assert_eq!(body["already_known"].as_u64(), Some(1), "{body}");
    eventually("the duplicate to be seen", WAIT, || async {
        let m = stack.metrics("matcher").await?;
        Ok((metric_value(&m, "forfall_matcher_payments_total", &["result=\"duplicate\""]) == Some(1.0)).then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = stack
        .read::<JourneyEvent>(&stack.topic(&stack.topics().journey_events))
        .await?;
    let paid: Vec<&JourneyEvent> = events
        .iter()
        .filter(|e| e.invoice_id == s.invoice_id && e.kind == "paid")
        .collect();
    assert_eq!(paid.len(), 1, "the payment is applied once: {events:?}");
    assert_eq!(paid[0].open_minor, 0);
    let matched = stack
        .read::<PaymentMatched>(&stack.topic(&stack.topics().payments_matched))
        .await?;
    assert!(
        matched
            .iter()
            .all(|m| m.rule == "exact_reference" && m.amount_minor == 125_000 && m.payment_id == "TX-1")
    );
    stack.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_account_a_matched_payment_came_from_matches_that_debtors_next_payment_without_a_reference()
-> anyhow::Result<()> {
    let stack = LocalStack::start(base_config(), ManualClock::new(at("2026-03-01T08:00:00Z"))).await?;
    stack.start_all();
    let billing = stack.topic(&stack.topics().billing_invoice_events);
    let first = norwegian(
        "no-acct-1",
        "7000201",
        leak(reference::generate(ReferenceKind::KidMod10, "7000201")?.value),
        "kari@example.test",
    );
    let second = Sample {
        amount_minor: 80_000,
        ..norwegian(
            "no-acct-2",
            "7000202",
            leak(reference::generate(ReferenceKind::KidMod10, "7000202")?.value),
            "kari@example.test",
        )
    };
    for s in [&first, &second] {
        stack.produce(&billing, &s.debtor_id(), &s.issued()).await?;
        status_is(&stack, s.tenant, s.invoice_id, "open").await?;
    }
    let account = "NO9386011117947";
    let credit = |tx, amount, reference| CamtCredit {
        transaction_id: tx,
        amount,
        currency: "NOK",
        reference,
        text: None,
        payer_account: Some(account),
        date: "2026-03-04",
    };
    // The first payment quotes its KID: matched by reference, and the account is learned.
    let (status, body) = import(
        &stack,
        first.tenant,
        &camt054("NDEA-A1", &[credit("TX-A1", "1250.00", Some(first.reference))]),
        false,
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    status_is(&stack, first.tenant, first.invoice_id, "closed:paid").await?;
    // The next one from the same account quotes nothing: the account names the debtor, and
    // the amount fits their one open invoice.
    let (status, body) = import(
        &stack,
        first.tenant,
        &camt054("NDEA-A2", &[credit("TX-A2", "800.00", None)]),
        false,
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    status_is(&stack, second.tenant, second.invoice_id, "closed:paid").await?;
    let matched = stack
        .read::<PaymentMatched>(&stack.topic(&stack.topics().payments_matched))
        .await?;
    let rules: Vec<(&str, &str, &str)> = matched
        .iter()
        .map(|m| (m.payment_id.as_str(), m.invoice_id.as_str(), m.rule.as_str()))
        .collect();
    assert_eq!(
        rules,
        [
            ("TX-A1", "no-acct-1", "exact_reference"),
            ("TX-A2", "no-acct-2", "payer_account_amount")
        ],
        "each payment matched once, the second by the account the first taught"
    );
    stack.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partly_invalid_file_imports_nothing_and_says_where_unless_lenient() -> anyhow::Result<()> {
    let stack = LocalStack::start(base_config(), ManualClock::new(at("2026-03-01T08:00:00Z"))).await?;
    stack.start_service("matcher");
    stack.wait_ready(&["matcher"], WAIT).await?;
    let file = camt054(
        "BAD-1",
        &[
            CamtCredit {
                transaction_id: "OK-1",
                amount: "100.00",
                currency: "NOK",
                reference: None,
                text: Some("faktura 1"),
                payer_account: None,
                date: "2026-03-04",
            },
            CamtCredit {
                transaction_id: "BAD-2",
                amount: "12.345",
                currency: "NOK",
                reference: None,
                text: None,
                payer_account: None,
                date: "2026-03-04",
            },
        ],
    );
    let (status, body) = import(&stack, "nordkraft", &file, false).await?;
    assert_eq!(status, 422, "{body}");
    let problems = body["problems"].to_string();
    assert!(
        problems.contains("line ") && problems.contains("Amt") && problems.contains("12.345"),
        "names line, element and value: {problems}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        stack.read_raw(&stack.topic(&stack.topics().payments)).await?.is_empty(),
        "all or nothing"
    );

    let (status, body) = import(&stack, "nordkraft", &file, true).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["imported"].as_u64(), Some(1));
    assert_eq!(body["problems"].as_array().map(Vec::len), Some(1));
    let (status, body) = import(&stack, "nordkraft", "<not-xml", false).await?;
    assert_eq!(status, 422);
    assert!(body["detail"].as_str().unwrap_or("").contains("line 1"), "{body}");
    stack.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partial_and_over_payments_and_a_payment_matched_by_hand() -> anyhow::Result<()> {
    let clock = ManualClock::new(at("2026-03-01T08:00:00Z"));
    let stack = LocalStack::start(base_config(), clock).await?;
    stack.start_all();
    let billing = stack.topic(&stack.topics().billing_invoice_events);
    let kid_a = leak(reference::generate(ReferenceKind::KidMod10, "8000001")?.value);
    let kid_b = leak(reference::generate(ReferenceKind::KidMod10, "8000002")?.value);
    let a = norwegian("no-a", "8000001", kid_a, "pia@example.test");
    let b = norwegian("no-b", "8000002", kid_b, "pia@example.test");
    for s in [&a, &b] {
        stack.produce(&billing, &s.debtor_id(), &s.issued()).await?;
        status_is(&stack, s.tenant, s.invoice_id, "open").await?;
    }
    let credit = |tx: &'static str,
                  amount: &'static str,
                  reference: Option<&'static str>,
                  text: Option<&'static str>| CamtCredit {
        transaction_id: tx,
        amount,
        currency: "NOK",
        reference,
        text,
        payer_account: None,
        date: "2026-03-04",
    };
    // 400 of 1 250: partly paid, still open.
    let (status, _) = import(
        &stack,
        "nordkraft",
        &camt054("F-1", &[credit("P-1", "400.00", Some(kid_a), None)]),
        false,
    )
    .await?;
    assert_eq!(status, 200);
    eventually("the partial payment", WAIT, || async {
        let events = stack
            .read::<JourneyEvent>(&stack.topic(&stack.topics().journey_events))
            .await?;
        Ok(events
            .into_iter()
            .find(|e| e.invoice_id == "no-a" && e.kind == "partly_paid"))
    })
    .await?;
    assert_eq!(
        stack.journey_status(a.tenant, a.invoice_id).await?.as_deref(),
        Some("open")
    );
    // 950 more: 100 too much, which becomes the debtor's credit balance.
    import(
        &stack,
        "nordkraft",
        &camt054("F-2", &[credit("P-2", "950.00", Some(kid_a), None)]),
        false,
    )
    .await?;
    status_is(&stack, a.tenant, a.invoice_id, "closed:paid").await?;
    let credit_balance = eventually("the credit balance", WAIT, || async {
        let events = stack
            .read::<JourneyEvent>(&stack.topic(&stack.topics().journey_events))
            .await?;
        Ok(events
            .into_iter()
            .find(|e| e.invoice_id == "no-a" && e.kind == "credit_balance"))
    })
    .await?;
    assert!(
        credit_balance
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("overpaid by 100.00 NOK"),
        "{credit_balance:?}"
    );

    // No reference and no invoice number: unmatched, listed, and matched by a person.
    import(
        &stack,
        "nordkraft",
        &camt054("F-3", &[credit("P-3", "1250.00", None, Some("takk for sist"))]),
        false,
    )
    .await?;
    let unmatched = eventually("the unmatched event", WAIT, || async {
        Ok(stack
            .read::<PaymentUnmatched>(&stack.topic(&stack.topics().payments_unmatched))
            .await?
            .into_iter()
            .next())
    })
    .await?;
    assert_eq!(
        (unmatched.payment_id.as_str(), unmatched.reason_code.as_str()),
        ("P-3", "no_candidate")
    );
    let addr = stack.rt.admin_addr("matcher").expect("matcher HTTP");
    let client = reqwest::Client::new();
    let listed: Value = client
        .get(format!("http://{addr}/v1/payments/unmatched?tenant=nordkraft"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(listed["unmatched"][0]["payment_id"], "P-3", "{listed}");
    let no_who = client
        .post(format!("http://{addr}/v1/payments/P-3/match"))
        .json(&json!({"tenant": "nordkraft", "invoices": ["no-b"], "by": ""}))
        .send()
        .await?;
    assert_eq!(no_who.status(), 422, "a manual match must say who made it");
    let done = client
        .post(format!("http://{addr}/v1/payments/P-3/match"))
        .json(&json!({"tenant": "nordkraft", "invoices": ["no-b"], "by": "kari@ops"}))
        .send()
        .await?;
    assert_eq!(done.status(), 200);
    status_is(&stack, b.tenant, b.invoice_id, "closed:paid").await?;
    let matched = stack
        .read::<PaymentMatched>(&stack.topic(&stack.topics().payments_matched))
        .await?;
    let manual = matched
        .iter()
        .find(|m| m.payment_id == "P-3")
        .expect("the manual match is an event");
    assert_eq!(
        (
            manual.rule.as_str(),
            manual.matched_by.as_deref(),
            manual.invoice_id.as_str()
        ),
        ("manual", Some("kari@ops"), "no-b")
    );
    let listed: Value = client
        .get(format!("http://{addr}/v1/payments/unmatched?tenant=nordkraft"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(listed["unmatched"].as_array().map(Vec::len), Some(0));
    let again = client
        .post(format!("http://{addr}/v1/payments/P-3/match"))
        .json(&json!({"tenant": "nordkraft", "invoices": ["no-b"], "by": "kari@ops"}))
        .send()
        .await?;
    assert_eq!(again.status(), 409, "a payment is never matched twice");
    stack.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn money_for_a_claim_with_the_agency_is_booked_on_the_case_then_recalls_it() -> anyhow::Result<()> {
    let clock = ManualClock::new(at("2026-09-01T06:00:00Z"));
    let stack = LocalStack::start(base_config(), clock.clone()).await?;
    stack.start_all();
    let s = danish("inv-late", "INV-9001", day(2026, 9, 2), "sen@example.test");
    stack
        .produce(
            &stack.topic(&stack.topics().billing_invoice_events),
            &s.debtor_id(),
            &s.issued(),
        )
        .await?;
    status_is(&stack, s.tenant, s.invoice_id, "open").await?;
    for (at_time, mails) in [("2026-09-02T07:00:01Z", 1), ("2026-09-16T07:00:01Z", 2)] {
        clock.set(at(at_time));
        eventually("a message", WAIT, || async {
            Ok((stack.mail.to(s.email).len() == mails).then_some(()))
        })
        .await?;
    }
    clock.set(at("2026-09-30T07:00:01Z"));
    status_is(&stack, s.tenant, s.invoice_id, "handed_over").await?;
    eventually("the case at the agency", WAIT, || async {
        Ok((stack.agency.requests().len() == 1).then_some(()))
    })
    .await?;

    // Part of it first: a payment on the case, saying what remains.
    let file = camt054(
        "DK-0",
        &[CamtCredit {
            transaction_id: "DK-TX-0",
            amount: "234.50",
            currency: "DKK",
            reference: Some(s.reference),
            text: None,
            payer_account: None,
            date: "2026-10-01",
        }],
    );
    let (status, body) = import(&stack, s.tenant, &file, false).await?;
    assert_eq!(status, 200, "{body}");
    let payment = eventually("the payment booked at the agency", WAIT, || async {
        Ok(stack.agency.payments().into_iter().next())
    })
    .await?;
    assert_eq!(
        (payment["amount_minor"].as_i64(), payment["remaining_minor"].as_i64()),
        (Some(23_450), Some(100_000))
    );
    assert!(stack.agency.recalls().is_empty(), "part of a claim is not a recall");
    let reported = eventually("the report on the timeline", WAIT, || async {
        let events = stack
            .read::<JourneyEvent>(&stack.topic(&stack.topics().journey_events))
            .await?;
        Ok(events.into_iter().find(|e| e.kind == "payment_reported_to_agency"))
    })
    .await?;
    assert_eq!(reported.to_state, "handed_over", "still the agency's");

    let file = camt054(
        "DK-1",
        &[CamtCredit {
            transaction_id: "DK-TX-1",
            amount: "1000.00",
            currency: "DKK",
            reference: Some(s.reference),
            text: None,
            payer_account: None,
            date: "2026-10-01",
        }],
    );
    let (status, body) = import(&stack, s.tenant, &file, false).await?;
    assert_eq!(status, 200, "{body}");
    let recall = eventually("the recall at the agency", WAIT, || async {
        Ok(stack.agency.requests().into_iter().find(|r| r.path == "/recalls"))
    })
    .await?;
    let body = recall.json();
    assert_eq!(
        (
            body["invoice_id"].as_str(),
            body["amount_minor"].as_i64(),
            body["remaining_minor"].as_i64()
        ),
        (Some("inv-late"), Some(100_000), Some(0))
    );
    assert!(recall.header("idempotency-key").is_some());
    assert_eq!(stack.agency.recalls().len(), 1, "{:?}", stack.agency.recalls());
    status_is(&stack, s.tenant, s.invoice_id, "closed:paid").await?;
    eventually("the recall on the timeline", WAIT, || async {
        let events = stack
            .read::<JourneyEvent>(&stack.topic(&stack.topics().journey_events))
            .await?;
        Ok(events.into_iter().find(|e| e.kind == "case_recalled"))
    })
    .await?;
    stack.shutdown().await;
    Ok(())
}

/// Payments are decided concurrently. Thirty payments of 50.00 for one invoice of 1,250.00,
/// all at once: exactly twenty-five are applied to it, none twice over what it owed, and the
/// five that find nothing open are kept as unmatched for a person.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_payments_for_one_invoice_never_allocate_more_than_it_owes() -> anyhow::Result<()> {
    let clock = ManualClock::new(at("2026-03-01T08:00:00Z"));
    let mut stack = LocalStack::start(base_config(), clock).await?;
    stack.set("matcher.concurrency", 32);
    for s in ["ingest", "matcher", "watcher"] {
        stack.start_service(s);
    }
    let billing = stack.topic(&stack.topics().billing_invoice_events);
    let kid = leak(reference::generate(ReferenceKind::KidMod10, "8100001")?.value);
    let a = norwegian("no-many", "8100001", kid, "many@example.test");
    stack.produce(&billing, &a.debtor_id(), &a.issued()).await?;
    status_is(&stack, a.tenant, a.invoice_id, "open").await?;
    let payments = stack.topic(&stack.topics().payments);
    let all: Vec<_> = (0..30).map(|i| a.payment(&format!("many-{i}"), 5_000, kid)).collect();
    futures::future::try_join_all(all.iter().map(|p| stack.produce(&payments, "bank", p))).await?;
    let (matched, unmatched) = eventually("every payment decided", WAIT, || async {
        let matched: Vec<PaymentMatched> = stack.read(&stack.topic(&stack.topics().payments_matched)).await?;
        let unmatched: Vec<PaymentUnmatched> = stack.read(&stack.topic(&stack.topics().payments_unmatched)).await?;
        Ok((matched.len() + unmatched.len() >= 30).then_some((matched, unmatched)))
    })
    .await?;
    let applied: i64 = matched
        .iter()
        .filter(|m| m.invoice_id == "no-many")
        .map(|m| m.amount_minor)
        .sum();
    assert_eq!(applied, 125_000, "exactly what the invoice owed: {matched:?}");
    assert_eq!(matched.len(), 25);
    assert_eq!(unmatched.len(), 5, "{unmatched:?}");
    status_is(&stack, a.tenant, a.invoice_id, "closed:paid").await?;
    stack.shutdown().await;
    Ok(())
}

/// A bank file's payments reach the matcher together and share their round trips: sixty
/// invoices, fifty-eight paid by their reference, one in six parts of which five pay it (they
/// compete for it in one batch), one by its number in the text; a payment sent twice, and one quoting a
/// reference nobody issued. Each is decided once, no invoice is allocated more than it owes, and
/// most were decided together.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bank_files_payments_are_decided_together_each_once() -> anyhow::Result<()> {
    let stack = LocalStack::start(base_config(), ManualClock::new(at("2026-03-01T08:00:00Z"))).await?;
    for s in ["ingest", "matcher", "watcher"] {
        stack.start_service(s);
    }
    let billing = stack.topic(&stack.topics().billing_invoice_events);
    let invoices = billing_run(&stack, &billing, "file", "82", 60).await?;
    for s in &invoices {
        status_is(&stack, s.tenant, s.invoice_id, "open").await?;
    }
    // The file arrives while the matcher is away: it finds every payment at hand at once.
    stack.stop_service("matcher").await?;
    let payments = stack.topic(&stack.topics().payments);
    let mut file: Vec<PaymentReceived> = invoices[1..59]
        .iter()
        .map(|s| s.payment(&format!("TX-{}", s.invoice_id), s.amount_minor, s.reference))
        .collect();
    let parted = &invoices[0];
    // Six parts for what five pay: one of them finds nothing left to pay and is kept.
    file.extend((0..6).map(|k| parted.payment(&format!("TX-part-{k}"), 25_000, parted.reference)));
    file.push(file[0].clone());
    let nobodys = leak(reference::generate(ReferenceKind::KidMod10, "9999999")?.value);
    file.push(parted.payment("TX-nobody", 10_000, nobodys));
    let named = &invoices[59];
    let mut by_number = named.payment("TX-by-number", named.amount_minor, "");
    by_number.reference = None;
    by_number.remittance_text = Some(format!("Faktura {}", named.number));
    file.push(by_number);
    futures::future::try_join_all(file.iter().map(|p| stack.produce(&payments, "bank", p))).await?;
    stack.restart_service("matcher").await;

    let (mut matched, unmatched) = eventually("every payment decided", WAIT, || async {
        let matched: Vec<PaymentMatched> = stack.read(&stack.topic(&stack.topics().payments_matched)).await?;
        let unmatched: Vec<PaymentUnmatched> = stack.read(&stack.topic(&stack.topics().payments_unmatched)).await?;
        let decided =
            |id: &str| matched.iter().any(|m| m.payment_id == id) || unmatched.iter().any(|u| u.payment_id == id);
        Ok(file
            .iter()
            .all(|p| decided(&p.payment_id))
            .then_some((matched, unmatched)))
    })
    .await?;
    // A payment sent twice has its records sent twice, with the same ids: applied once.
    matched.sort_by(|a, b| a.event_id.cmp(&b.event_id));
    matched.dedup_by(|a, b| a.event_id == b.event_id);
    for s in &invoices {
        let applied: i64 = matched
            .iter()
            .filter(|m| m.invoice_id == s.invoice_id)
            .map(|m| m.amount_minor)
            .sum();
        assert_eq!(applied, s.amount_minor, "{}: {matched:?}", s.invoice_id);
        status_is(&stack, s.tenant, s.invoice_id, "closed:paid").await?;
    }
    let mut ids: Vec<&str> = matched.iter().map(|m| m.payment_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), matched.len(), "a payment matched twice: {matched:?}");
    assert_eq!(matched.len(), 58 + 5 + 1, "{matched:?}");
    let mut unmatched: Vec<&str> = unmatched.iter().map(|u| u.payment_id.as_str()).collect();
    unmatched.sort_unstable();
    assert!(
        unmatched.len() == 2 && unmatched[0] == "TX-nobody" && unmatched[1].starts_with("TX-part-"),
        "{unmatched:?}"
    );
    let m = stack.metrics("matcher").await?;
    let together = metric_value(&m, "forfall_matcher_payments_decided_total", &["path=\"together\""]).unwrap_or(0.0);
    assert!(together >= 40.0, "{together} of 65 decided together");
    assert_eq!(
        metric_value(&m, "forfall_matcher_payments_total", &["result=\"duplicate\""]),
        Some(1.0),
        "the payment sent twice is booked once"
    );
    stack.shutdown().await;
    Ok(())
}

/// A billing run's invoices reach the watcher while it is away, with matched payments for a
/// third of them, one of them in a currency the invoice does not take; later, while it is away
/// again, a bank file's payments for most of the rest, one of them twice. Each invoice's journey
/// opens once, each payment is applied once (the foreign one refused with its reason), and most
/// records were decided together.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_billing_runs_invoices_and_a_bank_files_payments_reach_journeys_together_each_once() -> anyhow::Result<()> {
    let stack = LocalStack::start(base_config(), ManualClock::new(at("2026-03-01T08:00:00Z"))).await?;
    stack.start_service("ingest");
    let billing = stack.topic(&stack.topics().billing_invoice_events);
    let invoices = billing_run(&stack, &billing, "run", "83", 60).await?;
    let matched_topic = stack.topic(&stack.topics().payments_matched);
    let paid = |s: &Sample<'static>, payment_id: &str, currency: &str| s.matched(payment_id, s.amount_minor, currency);
    // Paid at once: on the watcher's arrival some payments come before their invoice (parked
    // until it arrives), most after.
    let early: Vec<PaymentMatched> = invoices[..20]
        .iter()
        .map(|s| paid(s, &format!("TX-early-{}", s.invoice_id), "NOK"))
        .collect();
    let foreign = paid(&invoices[20], "TX-foreign", "SEK");
    for p in early.iter().chain([&foreign]) {
        stack.produce(&matched_topic, &p.debtor_id, p).await?;
    }
    eventually("ingest to pass on every invoice", WAIT, || async {
        let n = stack
            .read::<forfall_platform::records::Invoice>(&stack.topic(&stack.topics().invoices))
            .await?
            .len();
        Ok((n >= invoices.len()).then_some(()))
    })
    .await?;
    stack.start_service("watcher");
    for s in &invoices[..20] {
        status_is(&stack, s.tenant, s.invoice_id, "closed:paid").await?;
    }
    for s in &invoices[20..] {
        status_is(&stack, s.tenant, s.invoice_id, "open").await?;
    }
    let refused = eventually("the foreign payment refused", WAIT, || async {
        let rejected: Vec<Rejected> = stack.read(&stack.topic(&stack.topics().rejected)).await?;
        Ok(rejected.into_iter().find(|r| r.detail.contains("TX-foreign")))
    })
    .await?;
    assert_eq!(refused.reason_code, "payment_not_applicable", "{refused:?}");
    let m = stack.metrics("watcher").await?;
    let together = metric_value(&m, "forfall_watcher_records_decided_total", &["path=\"together\""]).unwrap_or(0.0);
    // The invoices without a payment parked for them go together at least (those with one go
    // alone, to apply it), and so do the payments that come after their invoice.
    assert!(together >= 30.0, "{together} of 81 records decided together");

    // The bank's file while the watcher is away: one payment twice, one invoice left unpaid.
    stack.stop_service("watcher").await?;
    let file: Vec<PaymentMatched> = invoices[21..59]
        .iter()
        .map(|s| paid(s, &format!("TX-file-{}", s.invoice_id), "NOK"))
        .collect();
    for p in file.iter().chain([&file[0]]) {
        stack.produce(&matched_topic, &p.debtor_id, p).await?;
    }
    stack.restart_service("watcher").await;
    for s in &invoices[21..59] {
        status_is(&stack, s.tenant, s.invoice_id, "closed:paid").await?;
    }
    // Up to a mark: a last payment on the twice-sent payment's key (records of one key are
    // decided in order), so that the second copy has been decided once it is applied.
    let mark = paid(&invoices[59], "TX-mark", "NOK");
    stack.produce(&matched_topic, &file[0].debtor_id, &mark).await?;
    status_is(&stack, invoices[59].tenant, invoices[59].invoice_id, "closed:paid").await?;
    status_is(&stack, invoices[20].tenant, invoices[20].invoice_id, "open").await?;

    let events = stack
        .read::<JourneyEvent>(&stack.topic(&stack.topics().journey_events))
        .await?;
    for (i, s) in invoices.iter().enumerate() {
        let ids = |kind: &str| {
            let mut ids: Vec<&str> = events
                .iter()
                .filter(|e| e.invoice_id == s.invoice_id && e.kind == kind)
                .map(|e| e.event_id.as_str())
                .collect();
            ids.sort_unstable();
            ids.dedup();
            ids.len()
        };
        assert_eq!(ids("opened"), 1, "{} opened once", s.invoice_id);
        assert_eq!(
            ids("paid"),
            usize::from(i != 20),
            "{} paid once, or never",
            s.invoice_id
        );
    }
    let m = stack.metrics("watcher").await?;
    let together = metric_value(&m, "forfall_watcher_records_decided_total", &["path=\"together\""]).unwrap_or(0.0);
    assert!(together >= 20.0, "{together} of 40 payments decided together");
    stack.shutdown().await;
    Ok(())
}
