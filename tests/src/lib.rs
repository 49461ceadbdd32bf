//! Shared pieces of Forfall's end-to-end tests: configuration for the dev stack and sample
//! records. The stack itself is `forfall::devstack::LocalStack`, which `forfall demo` uses too.

use chrono::{DateTime, NaiveDate, Utc};
use forfall_domain::invoice::epoch_days;
use forfall_platform::config::{self, CommonConfig};
use forfall_platform::journey_state::{self, Header};
use forfall_platform::records::{
    InvoiceIssued, JourneyAction, PaymentMatched, PaymentReceived, derived_id, new_event_id,
};
use forfall_platform::redis_store::Keys;

pub mod chaos;
pub mod servers;

pub use forfall::devstack::{LocalStack, eventually};

/// Settings a benchmark takes from its environment, each a count (`MATCHER_BATCH=1` for
/// `matcher.batch`): two values compared on one build. The dev stack's services read their
/// sections from the stack, not from `FORFALL_*` variables.
pub fn counts_from_env(stack: &mut LocalStack, settings: &[(&str, &str)]) -> anyhow::Result<()> {
    for (variable, key) in settings {
        if let Ok(value) = std::env::var(variable) {
            let count: usize = value
                .parse()
                .map_err(|e| anyhow::anyhow!("{variable}={value:?} is not a count for '{key}': {e}"))?;
            stack.set(key, count);
        }
    }
    Ok(())
}

/// How long the end-to-end tests wait for something that should happen.
pub const WAIT: std::time::Duration = std::time::Duration::from_secs(45);

/// Waits until the watcher's journey status of an invoice is `want`.
pub async fn status_is(stack: &LocalStack, tenant: &str, invoice: &str, want: &str) -> anyhow::Result<()> {
    eventually(&format!("invoice {invoice} to be {want}"), WAIT, || async move {
        Ok((stack.journey_status(tenant, invoice).await?.as_deref() == Some(want)).then_some(()))
    })
    .await
}

/// Dev-stack settings (`FORFALL_*` variables may point elsewhere).
/// The dev stack's configuration: the development profile (its published secrets are fine
/// here), then `FORFALL_*` variables.
pub fn base_config() -> CommonConfig {
    let mut config = config::common(&config::figment(Some(std::path::Path::new(
        "/nonexistent/forfall.toml",
    ))))
    .expect("valid FORFALL_* environment");
    config.profile = config::Profile::Development;
    config
}

pub fn at(s: &str) -> DateTime<Utc> {
    s.parse().expect("RFC 3339 instant")
}

pub fn day(y: i32, m: u32, d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, d).expect("valid date")
}

#[derive(Debug, Clone)]
pub struct Sample<'a> {
    pub tenant: &'a str,
    pub invoice_id: &'a str,
    pub number: &'a str,
    pub due: NaiveDate,
    pub amount_minor: i64,
    pub currency: &'a str,
    pub jurisdiction: &'a str,
    pub email: &'a str,
    pub reference: &'a str,
    pub language: &'a str,
}

impl Sample<'_> {
    pub fn debtor_id(&self) -> String {
        format!("{}:{}", self.tenant, self.email)
    }

    pub fn issued(&self) -> InvoiceIssued {
        InvoiceIssued {
            event_id: new_event_id(),
            tenant: self.tenant.into(),
            debtor_id: self.debtor_id(),
            occurred_at: 0,
            invoice_id: self.invoice_id.into(),
            revision: 1,
            invoice_number: self.number.into(),
            issue_date: epoch_days(self.due) - 14,
            due_date: epoch_days(self.due),
            amount_minor: self.amount_minor,
            currency: self.currency.into(),
            jurisdiction: self.jurisdiction.into(),
            debtor_kind: "consumer".into(),
            payment_reference: Some(self.reference.into()),
            description: Some("Electricity, February".into()),
            debtor_name: Some("Anna Jensen".into()),
            email: Some(self.email.into()),
            phone: None,
            language: Some(self.language.into()),
            preferred_channels: Vec::new(),
            declined_channels: Vec::new(),
            debtor_details: None,
            reminder_fee_agreed: None,
        }
    }

    pub fn payment(&self, payment_id: &str, amount_minor: i64, quoted_reference: &str) -> PaymentReceived {
        PaymentReceived {
            event_id: new_event_id(),
            tenant: self.tenant.into(),
            debtor_id: None,
            occurred_at: 0,
            payment_id: payment_id.into(),
            amount_minor,
            currency: self.currency.into(),
            reference: Some(quoted_reference.into()),
            remittance_text: None,
            payer_name: None,
            payer_account: None,
            booking_date: epoch_days(self.due),
            value_date: epoch_days(self.due),
        }
    }

    /// The matcher's word that a payment of `amount_minor` in `currency` quoting the invoice's
    /// reference pays it, as the watcher receives it.
    pub fn matched(&self, payment_id: &str, amount_minor: i64, currency: &str) -> PaymentMatched {
        PaymentMatched {
            event_id: new_event_id(),
            tenant: self.tenant.into(),
            debtor_id: self.debtor_id(),
            occurred_at: 0,
            payment_id: payment_id.into(),
            invoice_id: self.invoice_id.into(),
            amount_minor,
            currency: currency.into(),
            rule: "exact_reference".into(),
            reference: Some(self.reference.into()),
            value_date: epoch_days(self.due),
            matched_by: None,
        }
    }
}

/// A sample Danish invoice due on `due`.
pub fn danish(invoice_id: &'static str, number: &'static str, due: NaiveDate, email: &'static str) -> Sample<'static> {
    Sample {
        tenant: "acme-energy",
        invoice_id,
        number,
        due,
        amount_minor: 123_450,
        currency: "DKK",
        jurisdiction: "DK",
        email,
        reference: "RF18539007547034",
        language: "da",
    }
}

/// The value of a Prometheus sample whose line contains every one of `parts`.
pub fn metric_value(text: &str, name: &str, parts: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && parts.iter().all(|p| l.contains(p)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The sum of a Prometheus counter over every sample whose line contains every one of `parts`
/// (a counter with labels the caller does not fix, such as each channel's messages).
pub fn metric_sum(text: &str, name: &str, parts: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && parts.iter().all(|p| l.contains(p)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One credit entry of a test camt.054 file.
pub struct CamtCredit<'a> {
    pub transaction_id: &'a str,
    /// The amount as the bank writes it, e.g. "1250.00".
    pub amount: &'a str,
    pub currency: &'a str,
    pub reference: Option<&'a str>,
    pub text: Option<&'a str>,
    pub payer_account: Option<&'a str>,
    pub date: &'a str,
}

/// A camt.054.001.02 notification with these credits, shaped like the Nordea MIG example in
/// crates/camt054/tests/fixtures/no_kid_nordea_054_001_02.xml (see its sources).
pub fn camt054(message_id: &str, credits: &[CamtCredit<'_>]) -> String {
    let mut entries = String::new();
    for c in credits {
        let reference = c
            .reference
            .map(|r| {
                format!(
                    "<Strd><CdtrRefInf><Tp><CdOrPrtry><Cd>SCOR</Cd></CdOrPrtry></Tp><Ref>{r}</Ref></CdtrRefInf></Strd>"
                )
            })
            .unwrap_or_default();
        let text = c.text.map(|t| format!("<Ustrd>{t}</Ustrd>")).unwrap_or_default();
        let account = c
            .payer_account
            .map(|a| format!("<DbtrAcct><Id><IBAN>{a}</IBAN></Id></DbtrAcct>"))
            .unwrap_or_default();
        entries.push_str(&format!(
            r#"
      <Ntry>
        <Amt Ccy="{ccy}">{amt}</Amt>
        <CdtDbtInd>CRDT</CdtDbtInd>
        <Sts>BOOK</Sts>
        <BookgDt><Dt>{date}</Dt></BookgDt>
        <ValDt><Dt>{date}</Dt></ValDt>
        <AcctSvcrRef>E-{tx}</AcctSvcrRef>
        <BkTxCd><Domn><Cd>PMNT</Cd><Fmly><Cd>RCDT</Cd><SubFmlyCd>DMCT</SubFmlyCd></Fmly></Domn></BkTxCd>
        <NtryDtls>
          <TxDtls>
            <Refs><AcctSvcrRef>{tx}</AcctSvcrRef></Refs>
            <AmtDtls><TxAmt><Amt Ccy="{ccy}">{amt}</Amt></TxAmt></AmtDtls>
            <RltdPties><Dbtr><Nm>Payer</Nm></Dbtr>{account}</RltdPties>
            <RmtInf>{text}{reference}</RmtInf>
          </TxDtls>
        </NtryDtls>
      </Ntry>"#,
            ccy = c.currency,
            amt = c.amount,
            date = c.date,
            tx = c.transaction_id,
        ));
    }
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Document xmlns="urn:iso:std:iso:20022:tech:xsd:camt.054.001.02">
  <BkToCstmrDbtCdtNtfctn>
    <GrpHdr><MsgId>{message_id}</MsgId><CreDtTm>2026-03-04T06:15:02</CreDtTm></GrpHdr>
    <Ntfctn>
      <Id>N-{message_id}</Id>
      <CreDtTm>2026-03-04T06:15:02</CreDtTm>
      <Acct><Id><IBAN>NO9386011117947</IBAN></Id></Acct>{entries}
    </Ntfctn>
  </BkToCstmrDbtCdtNtfctn>
</Document>
"#
    )
}

/// A Danish nudge by e-mail for `invoice` (123.450,00 kr., due 4 September 2026), as the watcher
/// emits it; tests override what they vary with struct update syntax.
pub fn nudge_action(tenant: &str, invoice: &str, email: &str) -> JourneyAction {
    JourneyAction {
        event_id: new_event_id(),
        tenant: tenant.into(),
        debtor_id: format!("{tenant}:{email}"),
        occurred_at: 0,
        action_id: derived_id("action", &[tenant, invoice, "nudge"]),
        invoice_id: invoice.into(),
        invoice_number: invoice.to_uppercase(),
        step: "nudge".into(),
        step_index: 0,
        tone: "nudge".into(),
        channels: vec!["email".into()],
        send_at: 0,
        open_minor: 123_450,
        fee_minor: 0,
        currency: "DKK".into(),
        due_date: 20_700, // 2026-09-04
        pay_by: None,
        payment_reference: Some("+71<000000001234567+85937346<".into()),
        policy_version: "test".into(),
        jurisdiction: "DK".into(),
        debtor_name: Some("Karen Blixen".into()),
        email: Some(email.into()),
        phone: None,
        language: Some("da".into()),
        description: Some("El, august 2026".into()),
        interest_minor: 0,
        interest_rate_bp: None,
        compensation_minor: 0,
        covers: Vec::new(),
        segment: Some("standard".into()),
        experiment: None,
    }
}

/// A command storing an invoice's journey as the services that read it see it: the status and
/// the next step (what the watcher writes in the journey's header), without a journey body.
pub fn journey_header(keys: &Keys, tenant: &str, invoice: &str, status: &str, next_step: Option<i64>) -> redis::Cmd {
    let at = journey_state::location(keys, tenant, invoice);
    let value = journey_state::encode(
        &Header {
            version: 1,
            status: status.to_owned(),
            next_step,
        },
        b"",
    );
    let mut cmd = redis::cmd("HSET");
    cmd.arg(at.key).arg(at.field).arg(value);
    cmd
}

/// Each action's journey as the watcher leaves it after emitting the action's step (so the last
/// look passes), with the status `status_of` gives for its position; one round trip.
pub async fn journeys_after(
    stack: &LocalStack,
    actions: &[JourneyAction],
    status_of: impl Fn(usize, &JourneyAction) -> &'static str,
) -> anyhow::Result<()> {
    let keys = Keys::new(&stack.rt.config.redis.key_prefix);
    let mut pipe = redis::pipe();
    for (i, a) in actions.iter().enumerate() {
        pipe.add_command(journey_header(
            &keys,
            &a.tenant,
            &a.invoice_id,
            status_of(i, a),
            Some(i64::from(a.step_index) + 1),
        ))
        .ignore();
    }
    let _: () = pipe.query_async(&mut stack.redis()).await?;
    Ok(())
}

/// A plain rdkafka client of the dev broker, for the benchmarks' own producers and baselines.
pub fn bench_client(brokers: &str) -> rdkafka::ClientConfig {
    let mut c = rdkafka::ClientConfig::new();
    c.set("bootstrap.servers", brokers).set("broker.address.family", "v4");
    c
}

/// The benchmarks' baseline: consumes `n` records from `from` and produces each payload
/// unchanged to `to` with a plain rdkafka client (idempotent, acknowledged by all, as Forfall's
/// producer); returns the time from the first record consumed to the last acknowledgement.
pub async fn plain_relay(
    brokers: &str,
    group: &str,
    from: &str,
    to: &str,
    n: usize,
) -> anyhow::Result<std::time::Duration> {
    use futures::StreamExt;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Message;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let consumer: StreamConsumer = bench_client(brokers)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.offset.store", "false")
        .set("session.timeout.ms", "2000")
        .set("heartbeat.interval.ms", "300")
        // By default a client whose local queue passed `queued.min.messages` (100,000) waits a
        // second before it fetches again, which the relay's consumption (faster than that a
        // second) then spends idle; the baseline would swing between two figures.
        .set("fetch.queue.backoff.ms", "10")
        .create()?;
    consumer.subscribe(&[from])?;
    let producer: FutureProducer = bench_client(brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        .create()?;
    let mut acks = futures::stream::FuturesUnordered::new();
    let mut started = None;
    let mut stream = consumer.stream();
    let mut seen = 0;
    while seen < n {
        let m = stream
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("relay stream ended"))??;
        started.get_or_insert_with(std::time::Instant::now);
        let delivery = loop {
            let record = FutureRecord::to(to)
                .key(m.key().unwrap_or_default())
                .payload(m.payload().unwrap_or_default());
            match producer.send_result(record) {
                Ok(d) => break d,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                    _,
                )) => {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                Err((e, _)) => anyhow::bail!("relay produce refused: {e}"),
            }
        };
        acks.push(delivery);
        seen += 1;
    }
    while let Some(ack) = acks.next().await {
        ack?.map_err(|(e, _)| anyhow::anyhow!("relay produce failed: {e}"))?;
    }
    Ok(started.map(|s| s.elapsed()).unwrap_or_default())
}

type PendingAck = futures::future::BoxFuture<'static, Result<(), rdkafka::error::KafkaError>>;

/// A billing system's producer in the benchmarks: records sent without waiting for each
/// acknowledgement, at most 10,000 awaiting theirs.
pub struct Publisher {
    producer: rdkafka::producer::FutureProducer,
    topic: String,
    acks: futures::stream::FuturesUnordered<PendingAck>,
    bytes: usize,
}

impl Publisher {
    pub fn new(producer: rdkafka::producer::FutureProducer, topic: &str) -> Self {
        Self {
            producer,
            topic: topic.to_owned(),
            acks: futures::stream::FuturesUnordered::new(),
            bytes: 0,
        }
    }

    pub async fn send(&mut self, key: String, payload: Vec<u8>) -> anyhow::Result<()> {
        use futures::StreamExt;
        self.bytes += payload.len();
        let (producer, topic) = (self.producer.clone(), self.topic.clone());
        self.acks.push(Box::pin(async move {
            producer
                .send(
                    rdkafka::producer::FutureRecord::to(&topic).key(&key).payload(&payload),
                    std::time::Duration::from_secs(60),
                )
                .await
                .map(|_| ())
                .map_err(|(e, _)| e)
        }));
        if self.acks.len() > 10_000
            && let Some(ack) = self.acks.next().await
        {
            ack?;
        }
        Ok(())
    }

    /// Waits for every acknowledgement; the payload bytes sent.
    pub async fn finish(mut self) -> anyhow::Result<usize> {
        use futures::StreamExt;
        while let Some(ack) = self.acks.next().await {
            ack?;
        }
        Ok(self.bytes)
    }
}

/// A benchmark's positional argument `i` (1-based), or `default` when it is not given.
pub fn bench_arg(i: usize, default: f64) -> anyhow::Result<f64> {
    Ok(std::env::args()
        .nth(i)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(default))
}

/// The `p` quantile (0..=1) of sorted samples, NaN when there are none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The partition librdkafka's `murmur2_random` partitioner (Kafka's default) gives `key`.
pub fn partition_of(key: &str, partitions: i32) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let data = key.as_bytes();
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() == 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    ((h & 0x7fff_ffff) % partitions as u32) as i32
}

/// A mark for the watcher's timers: an invoice like `like` (same tenant) of another debtor whose
/// records, and so whose timers, land on the same partition as `like`'s, due on `due`; issued
/// here (returns once its journey is open). Timers of one partition that are due are claimed and
/// fired together, their outputs produced before their journeys are saved: once the mark's
/// nudge is recorded (`timer_mark_fired`), every timer of `like`'s partition due by then has been
/// fired and its outputs produced.
pub async fn issue_timer_mark(
    stack: &LocalStack,
    like: &Sample<'_>,
    due: NaiveDate,
) -> anyhow::Result<Sample<'static>> {
    let partitions = stack.rt.config.kafka.partitions;
    let want = partition_of(&like.debtor_id(), partitions);
    let tag = new_event_id();
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let email = (0..)
        .map(|i| format!("mark-{i}-{tag}@example.test"))
        .find(|e| partition_of(&format!("{}:{e}", like.tenant), partitions) == want)
        .expect("some debtor lands on the partition");
    let mark = Sample {
        tenant: leak(like.tenant.to_owned()),
        invoice_id: leak(format!("mark-{tag}")),
        number: leak(format!("MARK-{tag}")),
        due,
        amount_minor: like.amount_minor,
        currency: leak(like.currency.to_owned()),
        jurisdiction: leak(like.jurisdiction.to_owned()),
        email: leak(email),
        reference: leak(like.reference.to_owned()),
        language: leak(like.language.to_owned()),
    };
    stack
        .produce(
            &stack.topic(&stack.topics().billing_invoice_events),
            &mark.debtor_id(),
            &mark.issued(),
        )
        .await?;
    status_is(stack, mark.tenant, mark.invoice_id, "open").await?;
    // Its nudge's timer is where `partition_of` says (the partitioner agrees).
    let keys = Keys::new(&stack.rt.config.redis.key_prefix);
    let member = format!("0:{}", journey_state::pair_field(mark.tenant, mark.invoice_id));
    let score: Option<f64> = redis::cmd("ZSCORE")
        .arg(keys.key(&["timers", &want.to_string()]))
        .arg(&member)
        .query_async(&mut stack.redis())
        .await?;
    anyhow::ensure!(score.is_some(), "the mark's timer {member} is not on partition {want}");
    Ok(mark)
}

/// Waits until the watcher has fired the timer mark's nudge (see `issue_timer_mark`).
pub async fn timer_mark_fired(stack: &LocalStack, mark: &Sample<'_>) -> anyhow::Result<()> {
    status_is(stack, mark.tenant, mark.invoice_id, "nudged").await
}

/// A mark for dispatch: a sentinel action for `like`'s debtor (see `dispatch_sentinel`).
pub async fn dispatch_caught_up(stack: &LocalStack, like: &Sample<'_>) -> anyhow::Result<()> {
    dispatch_sentinel(stack, like.tenant, &like.debtor_id()).await
}

/// A mark for dispatch: a sentinel action for the debtor `debtor_id` (same key, so handled after
/// every action of that debtor produced before it) on an invoice whose journey is closed, so
/// that dispatch suppresses it without sending anything; returns once its outcome is on record.
pub async fn dispatch_sentinel(stack: &LocalStack, tenant: &str, debtor_id: &str) -> anyhow::Result<()> {
    let invoice = format!("sentinel-{}", new_event_id());
    let keys = Keys::new(&stack.rt.config.redis.key_prefix);
    let _: () = journey_header(&keys, tenant, &invoice, "closed:paid", None)
        .query_async(&mut stack.redis())
        .await?;
    let action = JourneyAction {
        debtor_id: debtor_id.into(),
        ..nudge_action(tenant, &invoice, "sentinel@example.test")
    };
    let topic = stack.topic(&stack.topics().journey_actions);
    stack.produce(&topic, &action.debtor_id, &action).await?;
    let outcomes = stack.topic(&stack.topics().dispatch_outcomes);
    eventually("dispatch's sentinel outcome", WAIT, || async {
        Ok(stack
            .read::<forfall_platform::records::DispatchOutcome>(&outcomes)
            .await?
            .into_iter()
            .any(|o| o.action_id == action.action_id)
            .then_some(()))
    })
    .await
}

/// Every dispatch outcome so far.
pub async fn dispatch_outcomes(stack: &LocalStack) -> anyhow::Result<Vec<forfall_platform::records::DispatchOutcome>> {
    stack.read(&stack.topic(&stack.topics().dispatch_outcomes)).await
}

/// Waits for dispatch's outcome of `action` on `channel` with `status`.
pub async fn outcome_for(
    stack: &LocalStack,
    action: &JourneyAction,
    channel: &str,
    status: forfall_platform::records::DispatchStatus,
) -> anyhow::Result<forfall_platform::records::DispatchOutcome> {
    eventually(
        &format!("{channel} {status:?} for {}", action.invoice_id),
        WAIT,
        || async {
            Ok(dispatch_outcomes(stack)
                .await?
                .into_iter()
                .find(|o| o.action_id == action.action_id && o.channel == channel && o.status == status))
        },
    )
    .await
}

/// A consumer group's committed offset (the next offset it reads) for each partition of
/// `topics` (`None` where it has committed nothing).
pub async fn committed_offsets(
    config: &CommonConfig,
    group: &str,
    topics: &[String],
) -> anyhow::Result<std::collections::HashMap<(String, i32), Option<i64>>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let (brokers, partitions, group, topics) = (
        config.kafka.brokers.clone(),
        config.kafka.partitions,
        group.to_owned(),
        topics.to_vec(),
    );
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("broker.address.family", "v4")
            .set("group.id", &group)
            .create()?;
        let mut tpl = rdkafka::TopicPartitionList::new();
        for topic in &topics {
            for p in 0..partitions {
                tpl.add_partition(topic, p);
            }
        }
        let committed = consumer.committed_offsets(tpl, std::time::Duration::from_secs(10))?;
        Ok(committed
            .elements()
            .iter()
            .map(|e| {
                let offset = match e.offset() {
                    rdkafka::Offset::Offset(o) => Some(o),
                    _ => None,
                };
                ((e.topic().to_owned(), e.partition()), offset)
            })
            .collect())
    })
    .await?
}

/// Billing issues the sample's invoice (produced to the billing topic as billing would).
pub async fn issue_invoice(stack: &LocalStack, s: &Sample<'_>) -> anyhow::Result<()> {
    stack
        .produce(
            &stack.topic(&stack.topics().billing_invoice_events),
            &s.debtor_id(),
            &s.issued(),
        )
        .await
}

/// Waits for the first journey event of `invoice_id` that `matches`.
pub async fn journey_event(
    stack: &LocalStack,
    invoice_id: &str,
    what: &str,
    matches: impl Fn(&forfall_platform::records::JourneyEvent) -> bool,
) -> anyhow::Result<forfall_platform::records::JourneyEvent> {
    let topic = stack.topic(&stack.topics().journey_events);
    eventually(&format!("{what} of {invoice_id}"), WAIT, || async {
        Ok(stack
            .read::<forfall_platform::records::JourneyEvent>(&topic)
            .await?
            .into_iter()
            .find(|e| e.invoice_id == invoice_id && matches(e)))
    })
    .await
}

/// The true end (next offset) of each partition of `topic`, read record by record (tansu 0.6.0
/// under-reports the high watermark of multi-record batches).
pub async fn topic_ends(config: &CommonConfig, topic: &str) -> anyhow::Result<std::collections::HashMap<i32, i64>> {
    Ok(chaos::read_all(config, topic)
        .await?
        .into_iter()
        .fold(std::collections::HashMap::new(), |mut ends, r| {
            let end = ends.entry(r.partition).or_insert(0);
            *end = (*end).max(r.offset + 1);
            ends
        }))
}

/// A mark for a consuming service: waits until its consumer group has committed the true end of
/// every partition of `topics`, i.e. every record on them so far was handled (applied or
/// rejected, its outputs acknowledged).
pub async fn consumed_to_end(stack: &LocalStack, service: &str, topics: &[String]) -> anyhow::Result<()> {
    let config = &stack.rt.config;
    let group = format!("{}.{service}", config.kafka.group_prefix);
    let mut ends = std::collections::HashMap::new();
    for topic in topics {
        for (p, end) in topic_ends(config, topic).await? {
            ends.insert((topic.clone(), p), end);
        }
    }
    eventually(
        &format!("{service} to have handled everything on {topics:?}"),
        WAIT,
        || async {
            let committed = committed_offsets(config, &group, topics).await?;
            Ok(ends
                .iter()
                .all(|(at, end)| committed.get(at).copied().flatten().unwrap_or(0) >= *end)
                .then_some(()))
        },
    )
    .await
}

/// The watcher's store for writing journeys the way the watcher writes them (see
/// [`write_journeys`]), with the changelog topic created as the watcher creates it.
pub async fn watcher_store(
    stack: &LocalStack,
) -> anyhow::Result<(forfall_watcher::store::Store, forfall_platform::kafka::Producer)> {
    use forfall_platform::changelog::{self, Changelog};
    let kafka = &stack.rt.config.kafka;
    let topic = stack.topic(&stack.topics().watcher_changelog);
    changelog::ensure(kafka, &topic, kafka.partitions).await?;
    let store = forfall_watcher::store::Store::new(
        stack.redis(),
        Keys::new(&stack.rt.config.redis.key_prefix),
        Changelog::new(topic),
    );
    store.prepare_scripts().await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let producer = forfall_platform::kafka::Producer::new(kafka, forfall_platform::metrics::Metrics::new("bench")?)?;
    Ok((store, producer))
}

/// Writes journeys as the watcher does: each new value on the watcher's changelog first, then
/// Redis (a partition without state is marked as built, as a watcher finds a new deployment).
pub async fn write_journeys(
    store: &forfall_watcher::store::Store,
    producer: &forfall_platform::kafka::Producer,
    saves: Vec<forfall_watcher::store::Save>,
) -> anyhow::Result<()> {
    let prepared = saves
        .into_iter()
        .map(|s| store.prepare(s, chrono::Utc::now().timestamp_millis()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let outs: Vec<_> = prepared.iter().map(|p| store.change(p)).collect();
    let delivered = producer.send_all_delivered(&outs).await?;
    let mut by_partition: std::collections::BTreeMap<i32, (Vec<_>, Vec<i64>)> = Default::default();
    for (p, d) in prepared.into_iter().zip(delivered) {
        let entry = by_partition.entry(p.partition).or_default();
        entry.0.push(p);
        entry.1.push(d.offset);
    }
    let mut redis = store.redis();
    for (partition, (saves, offsets)) in by_partition {
        let _: () = redis::cmd("SET")
            .arg(store.state_key(partition))
            .arg("ready:-1")
            .arg("NX")
            .query_async(&mut redis)
            .await?;
        let written = store
            .save_many(partition, &saves, &offsets)
            .await
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        anyhow::ensure!(
            written.iter().all(|w| *w == forfall_watcher::store::Written::Yes),
            "every journey written"
        );
    }
    Ok(())
}

/// Waits until the watcher has fired every timer of `debtor_id`'s partition due by `clock`'s now.
pub async fn timers_settled(
    stack: &LocalStack,
    clock: &forfall_platform::clock::ManualClock,
    debtor_id: &str,
) -> anyhow::Result<()> {
    use forfall_platform::clock::Clock;
    let partition = partition_of(debtor_id, stack.rt.config.kafka.partitions);
    let timers = Keys::new(&stack.rt.config.redis.key_prefix).key(&["timers", &partition.to_string()]);
    let now_ms = clock.now().timestamp_millis();
    eventually("the watcher to fire what is due", WAIT, || {
        let timers = timers.clone();
        async move {
            let due: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(&timers)
                .arg("-inf")
                .arg(now_ms)
                .arg("LIMIT")
                .arg(0)
                .arg(1)
                .query_async(&mut stack.redis())
                .await?;
            Ok(due.is_empty().then_some(()))
        }
    })
    .await
}

/// Moves `clock` on half a day at a time until `invoice`'s journey is `want` (at most
/// `max_days`), each time first waiting until the watcher has fired every timer of the
/// invoice's partition due by then. A journey woken late plans its remaining steps from the day
/// it wakes (late never means a burst), so a single long jump takes one step, not the journey.
pub async fn advance_until_status(
    stack: &LocalStack,
    clock: &forfall_platform::clock::ManualClock,
    debtor_id: &str,
    tenant: &str,
    invoice: &str,
    want: &str,
    max_days: i64,
) -> anyhow::Result<()> {
    for _ in 0..=max_days * 2 {
        timers_settled(stack, clock, debtor_id).await?;
        if stack.journey_status(tenant, invoice).await?.as_deref() == Some(want) {
            return Ok(());
        }
        clock.advance(chrono::Duration::hours(12));
    }
    anyhow::bail!("invoice {invoice} was not {want} within {max_days} days")
}

/// A household's electricity invoice for benchmarks: realistic sizes for every field the journey keeps.
pub fn household_invoice(
    prefix: &str,
    i: usize,
    due: chrono::NaiveDate,
) -> anyhow::Result<forfall_domain::InvoiceSnapshot> {
    let names = ["Maja Kristensen", "Lars Nielsen", "Sofie Andersen", "Mikkel Pedersen"];
    let name = names[i % names.len()];
    let debtor = format!("acme-energy:{prefix}c-{i:09}");
    Ok(forfall_domain::invoice::validate_issued(
        forfall_domain::invoice::IssuedInput {
            tenant: "acme-energy".into(),
            debtor_id: debtor,
            invoice_id: format!("{prefix}inv-{i:09}"),
            revision: 1,
            invoice_number: format!("2026-{i:09}"),
            issue_date_days: epoch_days(due) - 14,
            due_date_days: epoch_days(due),
            amount_minor: 40_000 + (i as i64 % 90_000),
            currency: "DKK".into(),
            jurisdiction: "DK".into(),
            debtor_kind: "consumer".into(),
            payment_reference: Some(format!("+71<{:015}+", 100_000_000 + i)),
            description: Some("Electricity, October".into()),
            contact: forfall_domain::invoice::Contact {
                name: Some(name.into()),
                email: Some(format!("{}.{i}@example.dk", name.to_lowercase().replace(' ', "."))),
                phone: Some(format!("+45{:08}", 20_000_000 + i % 70_000_000)),
                language: Some("da".into()),
                ..forfall_domain::invoice::Contact::default()
            },
            reminder_fee_agreed: false,
        },
    )?)
}

/// Redis' `used_memory`, in bytes.
pub async fn used_memory(redis: &mut redis::aio::ConnectionManager) -> anyhow::Result<i64> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(redis).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no used_memory in INFO"))
}

/// Redis' memory by kind of key under `prefix` (the name up to its first `:` or `{`, e.g.
/// `journeys`): how many keys and the bytes `MEMORY USAGE` reports for them, largest first.
/// The bytes are the keys' own (key, value, the allocator's rounding); Redis' per-key overhead
/// in its main dictionary (some 50–70 bytes) is in `used_memory` but not here.
pub async fn memory_by_kind(
    redis: &mut redis::aio::ConnectionManager,
    prefix: &str,
) -> anyhow::Result<Vec<(String, u64, u64)>> {
    let mut kinds: std::collections::BTreeMap<String, (u64, u64)> = std::collections::BTreeMap::new();
    let mut scan = KeyScan::new(format!("{prefix}*"), 10_000);
    while let Some(keys) = scan.next(redis).await? {
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.cmd("MEMORY").arg("USAGE").arg(key).arg("SAMPLES").arg(0);
        }
        let sizes: Vec<Option<u64>> = pipe.query_async(redis).await?;
        for (key, size) in keys.iter().zip(sizes) {
            let rest = key.strip_prefix(prefix).unwrap_or(key);
            let kind = rest.split([':', '{']).next().unwrap_or(rest);
            let entry = kinds.entry(kind.to_owned()).or_default();
            entry.0 += 1;
            entry.1 += size.unwrap_or(0);
        }
    }
    let mut out: Vec<(String, u64, u64)> = kinds.into_iter().map(|(k, (n, b))| (k, n, b)).collect();
    out.sort_by_key(|k| std::cmp::Reverse(k.2));
    Ok(out)
}

/// The keys matching a pattern, a `SCAN` batch at a time (never empty).
pub struct KeyScan {
    pattern: String,
    count: usize,
    cursor: Option<u64>,
}

impl KeyScan {
    pub fn new(pattern: String, count: usize) -> Self {
        Self {
            pattern,
            count,
            cursor: Some(0),
        }
    }

    pub async fn next<C: redis::aio::ConnectionLike>(&mut self, redis: &mut C) -> anyhow::Result<Option<Vec<String>>> {
        while let Some(cursor) = self.cursor {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&self.pattern)
                .arg("COUNT")
                .arg(self.count)
                .query_async(redis)
                .await?;
            self.cursor = (next != 0).then_some(next);
            if !keys.is_empty() {
                return Ok(Some(keys));
            }
        }
        Ok(None)
    }
}

/// Removes a stack's keys so a million journeys do not stay in the shared Redis.
pub async fn remove_keys(redis: &mut redis::aio::ConnectionManager, prefix: &str) -> anyhow::Result<()> {
    let mut scan = KeyScan::new(format!("{prefix}*"), 10_000);
    while let Some(keys) = scan.next(redis).await? {
        let _: () = redis::cmd("UNLINK").arg(&keys).query_async(redis).await?;
    }
    Ok(())
}

/// The kinds of the watcher's Redis keys (journeys, timers and their locks, debtors' open
/// invoices, late history, parked payments, closed index, partition markers): what Redis loses.
pub const WATCHER_KEY_KINDS: [&str; 12] = [
    "open-counts:",
    "journeys:",
    "timers:",
    "timers-lock:",
    "debtor-open:",
    "late:",
    "late-index:",
    "history:",
    "parked:",
    "parked-index:",
    "closed:",
    "state:",
];

/// Every key of the watcher's state under `config`'s prefix.
pub async fn watcher_keys(config: &CommonConfig) -> anyhow::Result<Vec<String>> {
    scan_keys(config, &WATCHER_KEY_KINDS).await
}

/// Every key under `config`'s prefix: all services' state, as a flush loses it.
pub async fn stack_keys(config: &CommonConfig) -> anyhow::Result<Vec<String>> {
    scan_keys(config, &[""]).await
}

/// Redis is flushed: every service loses its state (the test's keys only; the server is shared).
pub async fn flush_stack_state(config: &CommonConfig) -> anyhow::Result<usize> {
    let keys = stack_keys(config).await?;
    let mut redis = redis::Client::open(config.redis.url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    for chunk in keys.chunks(1000) {
        let _: () = redis::cmd("DEL").arg(chunk).query_async(&mut redis).await?;
    }
    Ok(keys.len())
}

/// A copy of every key under `config`'s prefix (DUMP, with its time to live), as a Redis
/// snapshot holds them.
pub async fn snapshot_stack_state(config: &CommonConfig) -> anyhow::Result<Vec<(String, Vec<u8>, i64)>> {
    let keys = stack_keys(config).await?;
    let mut redis = redis::Client::open(config.redis.url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let mut copy = Vec::with_capacity(keys.len());
    for key in keys {
        let (dump, pttl): (Option<Vec<u8>>, i64) = redis::pipe()
            .cmd("DUMP")
            .arg(&key)
            .cmd("PTTL")
            .arg(&key)
            .query_async(&mut redis)
            .await?;
        if let Some(dump) = dump {
            copy.push((key, dump, pttl.max(0)));
        }
    }
    Ok(copy)
}

/// Redis comes back from an older snapshot: everything under the prefix is as `copy` had it.
pub async fn restore_stack_state(config: &CommonConfig, copy: &[(String, Vec<u8>, i64)]) -> anyhow::Result<()> {
    flush_stack_state(config).await?;
    let mut redis = redis::Client::open(config.redis.url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    for chunk in copy.chunks(500) {
        let mut pipe = redis::pipe();
        for (key, dump, pttl) in chunk {
            pipe.cmd("RESTORE")
                .arg(key)
                .arg(*pttl)
                .arg(dump.as_slice())
                .arg("REPLACE")
                .ignore();
        }
        let _: () = pipe.query_async(&mut redis).await?;
    }
    Ok(())
}

/// The watcher's open-invoice counts in Redis, all partitions summed: `status|tenant` → count.
pub async fn open_invoice_counts(config: &CommonConfig) -> anyhow::Result<std::collections::BTreeMap<String, i64>> {
    let mut redis = redis::Client::open(config.redis.url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let mut sum = std::collections::BTreeMap::new();
    for key in scan_keys(config, &["open-counts:"]).await? {
        let counts: std::collections::HashMap<String, i64> =
            redis::cmd("HGETALL").arg(&key).query_async(&mut redis).await?;
        for (field, n) in counts {
            *sum.entry(field).or_insert(0) += n;
        }
    }
    Ok(sum)
}

async fn scan_keys(config: &CommonConfig, kinds: &[&str]) -> anyhow::Result<Vec<String>> {
    let mut redis = redis::Client::open(config.redis.url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let prefix = &config.redis.key_prefix;
    let mut all = Vec::new();
    for kind in kinds {
        let mut scan = KeyScan::new(format!("{prefix}{kind}*"), 1000);
        while let Some(keys) = scan.next(&mut redis).await? {
            all.extend(keys);
        }
    }
    Ok(all)
}

/// Redis loses the watcher's state (a flush, a failover to an empty replica).
pub async fn lose_watcher_state(config: &CommonConfig) -> anyhow::Result<()> {
    let keys = watcher_keys(config).await?;
    if !keys.is_empty() {
        let mut redis = redis::Client::open(config.redis.url.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut redis).await?;
    }
    Ok(())
}

/// The journey the watcher opens for an invoice of a customer never late before.
pub fn opened_new_customer(
    policy: &forfall_domain::policy::Policy,
    snapshot: forfall_domain::InvoiceSnapshot,
    today: NaiveDate,
) -> forfall_domain::journey::Decision {
    let facts = forfall_domain::policy::DebtorFacts {
        jurisdiction: snapshot.jurisdiction,
        kind: snapshot.debtor_kind,
        late_last_12m: 0,
        propensity: None,
        amount: snapshot.amount,
        fee_agreed: false,
    };
    forfall_watcher::opened(policy, snapshot, &facts, today).0
}

/// The write of a journey just opened, as the watcher saves it (no version before it).
pub fn new_journey_save(
    journey: forfall_domain::journey::Journey,
    partition: i32,
    timer: forfall_domain::journey::TimerChange,
) -> forfall_watcher::store::Save {
    forfall_watcher::store::Save {
        expected: None,
        stored: forfall_watcher::store::Stored {
            journey,
            partition,
            pending_step: None,
            pending_fire_ms: None,
            trace: None,
        },
        timer,
        fired_step: None,
        stops_contact: false,
    }
}

/// Reads a changelog without applying anything: the baseline of the rebuild benchmarks.
pub struct DiscardChanges;

impl forfall_platform::changelog::Restore for DiscardChanges {
    async fn apply(
        &mut self,
        _: i32,
        changes: Vec<forfall_platform::changelog::Change>,
    ) -> Result<(), forfall_platform::kafka::Failure> {
        std::hint::black_box(changes);
        Ok(())
    }

    async fn finish(&mut self, _: i32, _: i64) -> Result<(), forfall_platform::kafka::Failure> {
        Ok(())
    }
}
