//! Bad input is rejected with a reason, nothing is lost, and the service keeps running.

use std::collections::BTreeMap;

use forfall_e2e::*;
use forfall_platform::clock::ManualClock;
use forfall_platform::records::{Invoice, Rejected};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_kind_of_bad_input_lands_on_the_rejected_topic_with_its_reason() -> anyhow::Result<()> {
    let clock = ManualClock::new(at("2026-03-01T08:00:00Z"));
    let stack = LocalStack::start(base_config(), clock).await?;
    stack.start_service("ingest");
    let billing = stack.topic(&stack.topics().billing_invoice_events);
    let good = danish("inv-ok", "INV-5001", day(2026, 3, 20), "ok@example.test");

    // 1. Not Avro at all.
    stack.produce_raw(&billing, "k1", b"{\"amount\": 12}").await?;
    // 2. Confluent framing with a schema id the registry does not know.
    stack
        .produce_raw(&billing, "k2", &[0, 0, 0, 0x03, 0xe7, 2, 4, 6])
        .await?;
    // 3. A known schema id with a body cut short.
    let mut encoded = stack.rt.codec.encode(&billing, &good.issued()).await?;
    encoded.truncate(12);
    stack.produce_raw(&billing, "k3", &encoded).await?;
    // 4. A negative amount.
    let mut negative = good.issued();
    negative.invoice_id = "inv-neg".into();
    negative.amount_minor = -100;
    stack.produce(&billing, &good.debtor_id(), &negative).await?;
    // 5. An unknown currency.
    let mut currency = good.issued();
    currency.invoice_id = "inv-cur".into();
    currency.currency = "XYZ".into();
    stack.produce(&billing, &good.debtor_id(), &currency).await?;
    // 6. A description far longer than any invoice needs (and than the broker takes in a record).
    let mut long = good.issued();
    long.invoice_id = "inv-long".into();
    long.description = Some("Electricity ".repeat(80_000));
    stack.produce(&billing, &good.debtor_id(), &long).await?;
    // 7. A debtor's address with a country that is no ISO code.
    let mut address = good.issued();
    address.invoice_id = "inv-addr".into();
    address.debtor_details = Some(forfall_platform::records::DebtorDetails {
        address: Some(forfall_platform::records::PostalAddress {
            lines: vec!["Vesterbrogade 1".into()],
            postal_code: "1620".into(),
            city: "København V".into(),
            country: "Danmark".into(),
        }),
        national_id: None,
        company_id: None,
    });
    stack.produce(&billing, &good.debtor_id(), &address).await?;
    // 8. And a good one after all of them: the service is still running.
    stack.produce(&billing, &good.debtor_id(), &good.issued()).await?;

    let invoices_topic = stack.topic(&stack.topics().invoices);
    let invoices = eventually("the good invoice", WAIT, || async {
        Ok(Some(stack.read::<Invoice>(&invoices_topic).await?).filter(|v| !v.is_empty()))
    })
    .await?;
    assert_eq!(invoices.len(), 1);
    assert_eq!(invoices[0].invoice_number, "INV-5001");

    let rejected_topic = stack.topic(&stack.topics().rejected);
    let rejected = eventually("seven rejections", WAIT, || async {
        let r = stack.read::<Rejected>(&rejected_topic).await?;
        Ok(Some(r).filter(|r| r.len() >= 7))
    })
    .await?;
    let by_reason: BTreeMap<&str, &Rejected> = rejected.iter().map(|r| (r.reason_code.as_str(), r)).collect();
    let reasons: Vec<&str> = by_reason.keys().copied().collect();
    assert_eq!(
        reasons,
        [
            "field_too_long",
            "invalid_amount",
            "invalid_debtor_details",
            "not_avro",
            "undecodable",
            "unknown_currency",
            "unknown_schema_id"
        ]
    );
    let too_long = by_reason["field_too_long"];
    assert!(
        too_long
            .detail
            .contains("'description' is 960000 characters long, at most 1000"),
        "{}",
        too_long.detail
    );
    assert_eq!(
        too_long.raw_value.as_ref().map(Vec::len),
        Some(forfall_platform::kafka::RAW_BYTES_KEPT),
        "the raw record cut to a stated size"
    );
    for r in &rejected {
        assert_eq!(r.service, "ingest");
        assert_eq!(r.source_topic, billing);
        assert!(r.source_offset >= 0);
        assert!(
            r.raw_value.as_ref().is_some_and(|v| !v.is_empty()),
            "raw bytes kept: {r:?}"
        );
    }
    assert_eq!(
        by_reason["not_avro"].raw_value.as_deref(),
        Some(&b"{\"amount\": 12}"[..])
    );
    assert!(
        by_reason["unknown_schema_id"].detail.contains("999"),
        "{}",
        by_reason["unknown_schema_id"].detail
    );
    assert!(
        by_reason["invalid_amount"].detail.contains("amount_minor"),
        "says which field"
    );
    assert!(
        by_reason["invalid_amount"].detail.contains("-100"),
        "and what was wrong"
    );
    assert_eq!(by_reason["invalid_amount"].tenant.as_deref(), Some("acme-energy"));
    assert!(by_reason["unknown_currency"].detail.contains("XYZ"));
    assert!(
        by_reason["invalid_debtor_details"]
            .detail
            .contains("field 'debtor_details.address.country' is 'Danmark'"),
        "{}",
        by_reason["invalid_debtor_details"].detail
    );

    // Once everything is handled, the sampled consumer lag of each billing partition is 0.
    let topic_label = format!("topic=\"{billing}\"");
    eventually("consumer lag 0 on both partitions", WAIT, || async {
        let m = stack.metrics("ingest").await?;
        let lags: Vec<f64> = (0..2)
            .filter_map(|p| {
                metric_value(
                    &m,
                    "forfall_consumer_lag",
                    &[&topic_label, &format!("partition=\"{p}\"")],
                )
            })
            .collect();
        Ok((lags == [0.0, 0.0]).then_some(()))
    })
    .await?;
    let metrics = stack.metrics("ingest").await?;
    for reason in reasons {
        let n = metric_value(&metrics, "forfall_rejected_total", &[&format!("reason=\"{reason}\"")]);
        assert_eq!(n, Some(1.0), "forfall_rejected_total for {reason} in:\n{metrics}");
    }
    stack.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_intake_answers_422_with_the_reason_and_202_for_a_good_invoice() -> anyhow::Result<()> {
    let clock = ManualClock::new(at("2026-03-01T08:00:00Z"));
    let stack = LocalStack::start(base_config(), clock).await?;
    stack.start_service("ingest");
    stack.wait_ready(&["ingest"], WAIT).await?;
    let addr = stack.rt.admin_addr("ingest").expect("ingest serves HTTP");
    let url = format!("http://{addr}/v1/invoices");
    let good = serde_json::json!({
        "tenant": "acme-energy", "debtor_id": "acme-energy:c-77", "invoice_id": "inv-http-1",
        "revision": 1, "invoice_number": "INV-6001", "issue_date": "2026-03-01", "due_date": "2026-03-15",
        "amount_minor": 49_900, "currency": "NOK", "jurisdiction": "NO", "debtor_kind": "consumer",
        "payment_reference": "1234567890128", "email": "ola@example.test", "language": "nb"
    });
    let client = reqwest::Client::new();
    let mut bad = good.clone();
    bad["amount_minor"] = serde_json::json!(-5);
    let response = client.post(&url).json(&bad).send().await?;
    assert_eq!(response.status(), 422);
    let body: serde_json::Value = response.json().await?;
    assert_eq!(body["error"], "invalid_amount");
    assert!(body["detail"].as_str().unwrap_or("").contains("amount_minor"));

    let mut unknown_field = good.clone();
    unknown_field["amuont_minor"] = serde_json::json!(1);
    let response = client.post(&url).json(&unknown_field).send().await?;
    assert_eq!(response.status(), 422);
    let body: serde_json::Value = response.json().await?;
    assert_eq!(body["error"], "invalid_json");
    assert!(
        body["detail"].as_str().unwrap_or("").contains("amuont_minor"),
        "names the unknown field: {body}"
    );

    let response = client.post(&url).json(&good).send().await?;
    assert_eq!(response.status(), 202);

    let invoices_topic = stack.topic(&stack.topics().invoices);
    let invoices = eventually("the posted invoice", WAIT, || async {
        Ok(Some(stack.read::<Invoice>(&invoices_topic).await?).filter(|v| !v.is_empty()))
    })
    .await?;
    assert_eq!(invoices[0].invoice_number, "INV-6001");
    assert_eq!(invoices[0].open_minor, 49_900);
    let rejected = stack.read::<Rejected>(&stack.topic(&stack.topics().rejected)).await?;
    let codes: Vec<&str> = rejected.iter().map(|r| r.reason_code.as_str()).collect();
    assert_eq!(codes, ["invalid_amount", "invalid_json"]);
    assert!(rejected.iter().all(|r| r.source_topic == "http:/v1/invoices"));
    stack.shutdown().await;
    Ok(())
}

/// One invoice id named under two debtors, both waiting when ingest starts (so they are likely
/// taken in one batch): the invoice keeps one debtor. The later revision under the other is
/// rejected (`debtor_mismatch`), or ignored as older, whichever order the two partitions give.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invoice_named_under_two_debtors_keeps_one_whatever_the_batch() -> anyhow::Result<()> {
    let clock = ManualClock::new(at("2026-03-01T08:00:00Z"));
    let stack = LocalStack::start(base_config(), clock).await?;
    let billing = stack.topic(&stack.topics().billing_invoice_events);
    let first = danish("inv-twice", "INV-7001", day(2026, 3, 20), "first@example.test");
    let second = danish("inv-twice", "INV-7001", day(2026, 3, 20), "second@example.test");
    let mut later = second.issued();
    later.revision = 2;
    // Other debtors' invoices around them, as in a billing run.
    let others: Vec<_> = (0..40)
        .map(|i| {
            let mut e = first.issued();
            e.invoice_id = format!("inv-other-{i}");
            e.debtor_id = format!("acme-energy:other-{i}");
            e
        })
        .collect();
    for e in &others[..20] {
        stack.produce(&billing, &e.debtor_id, e).await?;
    }
    stack.produce(&billing, &first.debtor_id(), &first.issued()).await?;
    stack.produce(&billing, &second.debtor_id(), &later).await?;
    for e in &others[20..] {
        stack.produce(&billing, &e.debtor_id, e).await?;
    }
    stack.start_service("ingest");
    let billing_label = format!("topic=\"{billing}\"");
    eventually("every billing record handled", WAIT, || async {
        // Not listening yet at first.
        let m = stack.metrics("ingest").await.unwrap_or_default();
        let n = |outcome: &str| {
            metric_value(
                &m,
                "forfall_messages_total",
                &[&billing_label, &format!("outcome=\"{outcome}\"")],
            )
            .unwrap_or(0.0)
        };
        Ok((n("applied") + n("rejected") >= 42.0).then_some(()))
    })
    .await?;
    let invoices = stack.read::<Invoice>(&stack.topic(&stack.topics().invoices)).await?;
    let debtors: std::collections::BTreeSet<&str> = invoices
        .iter()
        .filter(|i| i.invoice_id == "inv-twice")
        .map(|i| i.debtor_id.as_str())
        .collect();
    assert_eq!(debtors.len(), 1, "published under {debtors:?}");
    assert_eq!(
        invoices
            .iter()
            .filter(|i| i.invoice_id.starts_with("inv-other-"))
            .count(),
        40
    );
    let rejected = stack.read::<Rejected>(&stack.topic(&stack.topics().rejected)).await?;
    if debtors.contains(first.debtor_id().as_str()) {
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert_eq!(rejected[0].reason_code, "debtor_mismatch");
    } else {
        assert!(
            rejected.is_empty(),
            "the first revision came after the second: ignored as older"
        );
    }
    stack.shutdown().await;
    Ok(())
}
