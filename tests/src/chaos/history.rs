//! Reads what happened (every topic, the mail sink, the agency stand-in) and counts what must
//! never happen.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use forfall_platform::avro::Codec;
use forfall_platform::config::CommonConfig;
use forfall_platform::records::{
    DispatchOutcome, HandoffCase, HandoffOutcome, Invoice, JourneyAction, JourneyEvent, PaymentMatched,
    PaymentReceived, PaymentUnmatched, Record, Rejected,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::infra::Infra;
use super::workload::Workload;

/// One record as stored, with where and when.
#[derive(Debug, Clone)]
pub struct Stored {
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: i64,
    pub payload: Vec<u8>,
}

/// Every record of `topic`: each partition read to its end (past the reported watermark, which
/// tansu 0.6.0 under-reports for multi-record batches, until the topic is quiet).
pub async fn read_all(config: &CommonConfig, topic: &str) -> anyhow::Result<Vec<Stored>> {
    let brokers = config.kafka.brokers.clone();
    let partitions = config.kafka.partitions;
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Stored>> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("broker.address.family", "v4")
            .set("group.id", format!("chaos-reader-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        let mut high = HashMap::new();
        for p in 0..partitions {
            let (low, h) = consumer.fetch_watermarks(&topic, p, Duration::from_secs(10))?;
            tpl.add_partition_offset(&topic, p, Offset::Offset(low))?;
            high.insert(p, h);
        }
        consumer.assign(&tpl)?;
        let mut next: HashMap<i32, i64> = HashMap::new();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut last_seen = Instant::now();
        loop {
            let behind = high.iter().any(|(p, h)| next.get(p).copied().unwrap_or(0) < *h);
            if !behind && last_seen.elapsed() >= Duration::from_millis(500) {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "timed out reading {topic}");
            if let Some(m) = consumer.poll(Duration::from_millis(50)) {
                let m = m?;
                let n = next.entry(m.partition()).or_insert(0);
                if m.offset() >= *n {
                    *n = m.offset() + 1;
                    last_seen = Instant::now();
                    out.push(Stored {
                        partition: m.partition(),
                        offset: m.offset(),
                        timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
                        payload: m.payload().unwrap_or_default().to_vec(),
                    });
                }
            }
        }
        Ok(out)
    })
    .await?
}

/// The true end (next offset) of each partition of `topic`.
pub async fn ends(config: &CommonConfig, topic: &str) -> anyhow::Result<HashMap<i32, i64>> {
    let mut ends = HashMap::new();
    for r in read_all(config, topic).await? {
        let e = ends.entry(r.partition).or_insert(0);
        *e = (*e).max(r.offset + 1);
    }
    Ok(ends)
}

/// Records of type `T` on `topic`, with when they were written.
pub async fn typed<T: Record>(config: &CommonConfig, codec: &Codec, topic: &str) -> anyhow::Result<Vec<(i64, T)>> {
    let mut out = Vec::new();
    for r in read_all(config, topic).await? {
        let decoded = codec.decode(Some(&r.payload)).await?;
        if decoded.name == T::FULL_NAME {
            out.push((r.timestamp_ms, decoded.to::<T>()?));
        }
    }
    Ok(out)
}

/// What the checker found. Every count but the throughput must be 0.
#[derive(Debug, Default, serde::Serialize)]
pub struct Findings {
    pub invoices_lost: usize,
    pub records_neither_applied_nor_rejected: usize,
    pub messages_twice: usize,
    /// Messages sent although dispatch's last look came after the watcher had recorded the
    /// payment that settled the invoice (the watcher marks the journey stopped before its
    /// journey event, so the event's time is when it was recorded). For e-mail the last look
    /// provably follows the moment the server asked for the message (its 354); for SMS it
    /// precedes the provider's accept, by at most [`SMS_TRANSIT_MS`].
    pub messages_after_payment: usize,
    pub cases_twice: usize,
    /// Records refused: the workload sends nothing invalid, so each is a fault (a lost state,
    /// a broker away) turned into a rejection instead of being waited out.
    pub records_rejected: usize,
    /// Informational: messages that reached a provider after the settling payment was matched
    /// but before the watcher had recorded it (the window between the matcher's decision and
    /// the journey's state, which the last look reads), and the longest such lag.
    pub messages_racing_payment: usize,
    pub longest_race_ms: i64,
    /// Informational: what was seen, to tell a quiet run from a broken one.
    pub seen: BTreeMap<&'static str, usize>,
    /// Informational: what stands behind the counts, a few of each.
    pub examples: Vec<String>,
    /// Informational: steps of the wall clock during the run (ms each). The moments of the
    /// providers are placed among Kafka's stamps with the clock as it read then.
    pub wall_clock_steps_ms: Vec<i64>,
}

impl Findings {
    pub fn clean(&self) -> bool {
        self.invoices_lost == 0
            && self.records_neither_applied_nor_rejected == 0
            && self.messages_twice == 0
            && self.messages_after_payment == 0
            && self.cases_twice == 0
            && self.records_rejected == 0
    }
}

fn example(findings: &mut Findings, text: String) {
    if findings.examples.len() < 20 {
        findings.examples.push(text);
    }
}

/// How long an SMS may take from dispatch's last look to the provider's accept: one HTTP
/// request on a loaded machine.
pub const SMS_TRANSIT_MS: i64 = 1_000;

/// Rounding between the broker's millisecond timestamps and the sinks' monotonic clocks.
pub const CLOCK_ROUNDING_MS: i64 = 5;

/// Reads everything and counts what must never happen.
pub async fn check(infra: &Infra, workload: &Workload) -> anyhow::Result<Findings> {
    let c = &infra.config;
    let codec = Codec::new(&c.registry.url, false);
    let t = |name: &str| c.topics.name(name);
    let mut f = Findings::default();

    // Invoices: each issued one is on the invoices topic (none of the workload's is invalid).
    let invoices = typed::<Invoice>(c, &codec, &t(&c.topics.invoices)).await?;
    let known: HashSet<&str> = invoices.iter().map(|(_, i)| i.invoice_id.as_str()).collect();
    for d in &workload.debtors {
        if !known.contains(d.invoice_id.as_str()) {
            f.invoices_lost += 1;
            example(&mut f, format!("invoice {} lost", d.invoice_id));
        }
    }
    f.seen.insert("invoices", known.len());

    let rejected = typed::<Rejected>(c, &codec, &t(&c.topics.rejected)).await?;
    let rejected_at: HashSet<(String, i32, i64)> = rejected
        .iter()
        .map(|(_, r)| (r.source_topic.clone(), r.source_partition, r.source_offset))
        .collect();
    f.seen.insert("rejections", rejected.len());
    f.records_rejected = rejected.len();
    for (_, r) in rejected.iter().take(5) {
        example(
            &mut f,
            format!(
                "rejected by {}: {} ({}) from {}[{}]@{}",
                r.service, r.reason_code, r.detail, r.source_topic, r.source_partition, r.source_offset
            ),
        );
    }

    // Payments: each one matched, kept as unmatched, or rejected.
    let payments_topic = t(&c.topics.payments);
    let matched = typed::<PaymentMatched>(c, &codec, &t(&c.topics.payments_matched)).await?;
    let unmatched = typed::<PaymentUnmatched>(c, &codec, &t(&c.topics.payments_unmatched)).await?;
    let decided: HashSet<&str> = matched
        .iter()
        .map(|(_, m)| m.payment_id.as_str())
        .chain(unmatched.iter().map(|(_, u)| u.payment_id.as_str()))
        .collect();
    let payments = read_all(c, &payments_topic).await?;
    for r in &payments {
        let decoded = codec.decode(Some(&r.payload)).await?;
        if decoded.name != PaymentReceived::FULL_NAME {
            continue;
        }
        let p: PaymentReceived = decoded.to()?;
        if !decided.contains(p.payment_id.as_str())
            && !rejected_at.contains(&(payments_topic.clone(), r.partition, r.offset))
        {
            f.records_neither_applied_nor_rejected += 1;
            example(
                &mut f,
                format!("payment {} neither matched, kept nor rejected", p.payment_id),
            );
        }
    }
    f.seen.insert("payments", payments.len());

    // Actions: each one has an outcome.
    let actions = typed::<JourneyAction>(c, &codec, &t(&c.topics.journey_actions)).await?;
    let outcomes = typed::<DispatchOutcome>(c, &codec, &t(&c.topics.dispatch_outcomes)).await?;
    let with_outcome: HashSet<&str> = outcomes.iter().map(|(_, o)| o.action_id.as_str()).collect();
    for (_, a) in &actions {
        if !with_outcome.contains(a.action_id.as_str()) {
            f.records_neither_applied_nor_rejected += 1;
            example(
                &mut f,
                format!("action {} ({} {}) has no outcome", a.action_id, a.invoice_id, a.step),
            );
        }
    }
    f.seen.insert("actions", actions.len());
    f.seen.insert("outcomes", outcomes.len());

    // Cases: each one has an outcome; an invoice goes to the agency in one case only.
    let cases = typed::<HandoffCase>(c, &codec, &t(&c.topics.handoff_cases)).await?;
    let case_outcomes = typed::<HandoffOutcome>(c, &codec, &t(&c.topics.handoff_outcomes)).await?;
    let answered: HashSet<&str> = case_outcomes.iter().map(|(_, o)| o.case_id.as_str()).collect();
    for (_, case) in &cases {
        if !answered.contains(case.case_id.as_str()) {
            f.records_neither_applied_nor_rejected += 1;
            example(&mut f, format!("case {} has no outcome", case.case_id));
        }
    }
    let mut cases_per_invoice: HashMap<String, HashSet<String>> = HashMap::new();
    for request in infra.agency.requests().iter().filter(|r| r.path.starts_with("/cases")) {
        let body = request.json();
        let case_id = body["case_id"].as_str().unwrap_or_default().to_owned();
        let invoice_id = body["invoice_id"].as_str().unwrap_or_default().to_owned();
        cases_per_invoice.entry(invoice_id).or_default().insert(case_id);
    }
    f.cases_twice = cases_per_invoice.values().map(|ids| ids.len().saturating_sub(1)).sum();
    f.seen.insert("cases_at_agency", cases_per_invoice.len());

    // Messages: at most one per (invoice, step, channel), none after the settling payment.
    let by_action: HashMap<&str, &JourneyAction> = actions.iter().map(|(_, a)| (a.action_id.as_str(), a)).collect();
    let events = typed::<JourneyEvent>(c, &codec, &t(&c.topics.journey_events)).await?;
    let mut settled_at: HashMap<&str, i64> = HashMap::new();
    for (ts, e) in &events {
        if e.to_state.starts_with("closed") {
            settled_at.entry(e.invoice_id.as_str()).or_insert(*ts);
        }
    }
    // The settling payment: the last one matched to the invoice before the watcher closed it.
    let mut matched_at: HashMap<&str, i64> = HashMap::new();
    for (ts, m) in &matched {
        if settled_at.get(m.invoice_id.as_str()).is_some_and(|closed| ts <= closed) {
            let at = matched_at.entry(m.invoice_id.as_str()).or_insert(*ts);
            *at = (*at).max(*ts);
        }
    }
    let wall_ms = |at: Instant| infra.wall.wall_ms(at);
    f.wall_clock_steps_ms = infra.wall.steps().into_iter().map(|(_, step)| step).collect();
    // Each message the providers took: its action and channel, a moment by which dispatch's
    // last look had not yet happened (e-mail) or had (SMS), and how far the look may lie after it.
    let mut sent: Vec<(String, &'static str, i64, i64)> = Vec::new();
    let mails = infra.mail.messages();
    for mail in &mails {
        let id = mail.header("Message-ID").unwrap_or_default();
        let action_id = id.trim_start_matches('<').split(".email@").next().unwrap_or_default();
        sent.push((action_id.to_owned(), "email", wall_ms(mail.asked_at), CLOCK_ROUNDING_MS));
    }
    let texts = infra.sms.accepted();
    for sms in &texts {
        // GatewayAPI's `userref` is dispatch's reference of the message: `<action>:sms`.
        let reference = sms.userref.clone().unwrap_or_default();
        let action_id = reference.trim_end_matches(":sms");
        sent.push((action_id.to_owned(), "sms", wall_ms(sms.accepted_at), SMS_TRANSIT_MS));
    }
    let mut per_step: HashMap<(String, String, &str), usize> = HashMap::new();
    for (action_id, channel, received, margin) in &sent {
        let (channel, received, margin) = (*channel, *received, *margin);
        let Some(action) = by_action.get(action_id.as_str()) else {
            example(&mut f, format!("a {channel} message for no known action: {action_id}"));
            continue;
        };
        let invoices =
            std::iter::once(action.invoice_id.as_str()).chain(action.covers.iter().map(|c| c.invoice_id.as_str()));
        for invoice in invoices {
            *per_step
                .entry((invoice.to_owned(), action.step.clone(), channel))
                .or_default() += 1;
            if let Some(paid) = matched_at.get(invoice)
                && received > *paid
            {
                let recorded = settled_at.get(invoice).copied().unwrap_or_default();
                let what = format!(
                    "{} of {invoice} by {channel} was taken by the provider {} ms after its payment was matched ({} ms after the watcher recorded it)",
                    action.step,
                    received - paid,
                    received - recorded
                );
                if received > recorded + margin {
                    f.messages_after_payment += 1;
                    example(&mut f, what);
                } else {
                    f.messages_racing_payment += 1;
                    f.longest_race_ms = f.longest_race_ms.max(received - paid);
                    example(&mut f, format!("(in flight) {what}"));
                }
            }
        }
    }
    for ((invoice, step, channel), n) in &per_step {
        if *n > 1 {
            f.messages_twice += n - 1;
            example(&mut f, format!("{step} of {invoice} by {channel} sent {n} times"));
        }
    }
    f.seen.insert("emails", mails.len());
    f.seen.insert("sms", texts.len());
    Ok(f)
}
