//! The consume runtime on the real broker: offsets only for the settled prefix, rebalances with
//! records in hand, the drain deadline, outputs the broker cannot take, and a registry outage.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forfall_e2e::*;
use forfall_platform::admin::Readiness;
use forfall_platform::clock::SystemClock;
use forfall_platform::kafka::{self, Failure, Handler, Inbound, LoopContext, Outbound, Producer, run_consumer};
use forfall_platform::metrics::Metrics;
use forfall_platform::records::Rejected;
use forfall_platform::telemetry::TraceContext;
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

/// What the test handler does with a record, by its payload.
#[derive(Clone, Default)]
struct Scripted {
    handled: Arc<Mutex<Vec<String>>>,
    calls: Arc<AtomicUsize>,
    output_topic: String,
    /// Per-record delay.
    delay: Duration,
    /// Records named `held-…` wait until this is cancelled.
    released: CancellationToken,
}

impl Handler for Scripted {
    async fn handle(&self, record: &Inbound) -> Result<Vec<Outbound>, Failure> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let text = String::from_utf8_lossy(record.payload.as_deref().unwrap_or_default()).into_owned();
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let out = |payload: Vec<u8>| Outbound {
            topic: self.output_topic.clone(),
            key: record.key_str().unwrap_or_default(),
            payload,
            trace: record.trace.child(),
            partition: None,
        };
        let result = match text.as_str() {
            "fatal" => {
                // Long enough for the records after it (other keys) to be handled meanwhile.
                tokio::time::sleep(Duration::from_secs(1)).await;
                Err(Failure::Fatal(anyhow::anyhow!("a bug")))
            }
            "stuck" => Err(Failure::transient(anyhow::anyhow!("Redis away"))),
            "slow" => {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(vec![])
            }
            "huge-output" => Ok(vec![out(vec![b'x'; 2_000_000])]),
            t if t.starts_with("held") => {
                self.released.cancelled().await;
                Ok(vec![out(text.clone().into_bytes())])
            }
            t if t.starts_with("reject-me") => Err(Failure::reject("test_reason", "refused by the test")),
            _ => Ok(vec![out(text.clone().into_bytes())]),
        };
        if result.is_ok() {
            self.handled.lock().expect("lock").push(text);
        }
        result
    }
}

/// The records either of two handlers handled, once each.
fn handled_by_either(first: &Mutex<Vec<String>>, second: &Mutex<Vec<String>>) -> HashSet<String> {
    let first = first.lock().expect("lock");
    let second = second.lock().expect("lock");
    first.iter().chain(second.iter()).cloned().collect()
}

struct Harness {
    stack: LocalStack,
    input: String,
    output: String,
    group: String,
    /// Records decided together (`LoopContext::batch`).
    batch: usize,
    /// Records in hand at most (`LoopContext::max_in_flight`).
    max_in_flight: usize,
}

impl Harness {
    async fn new(partitions: i32) -> anyhow::Result<Self> {
        Self::batched(partitions, 1).await
    }

    async fn batched(partitions: i32, batch: usize) -> anyhow::Result<Self> {
        let stack = LocalStack::start(base_config(), Arc::new(SystemClock)).await?;
        let input = stack.topic("runtime.in");
        let output = stack.topic("runtime.out");
        let mut kafka_config = stack.rt.config.kafka.clone();
        kafka_config.partitions = partitions;
        kafka::ensure_topics(&kafka_config, &[input.clone(), output.clone()]).await?;
        let group = "runtime-test".to_owned();
        Ok(Self {
            stack,
            input,
            output,
            group,
            batch,
            max_in_flight: 1000,
        })
    }

    fn context(&self, shutdown: CancellationToken, concurrency: usize) -> anyhow::Result<LoopContext> {
        let metrics = Metrics::new("runtime-test")?;
        Ok(LoopContext {
            service: "runtime-test",
            producer: Producer::new(&self.stack.rt.config.kafka, metrics.clone())?,
            codec: self.stack.rt.codec.clone(),
            metrics,
            rejected_topic: self.stack.topic(&self.stack.topics().rejected),
            readiness: Readiness::default(),
            shutdown,
            max_in_flight: self.max_in_flight,
            key_concurrency: concurrency,
            lane: None,
            batch: self.batch,
            drain_timeout: Duration::from_secs(1),
        })
    }

    fn start(
        &self,
        handler: Scripted,
        concurrency: usize,
    ) -> anyhow::Result<(CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>)> {
        let shutdown = CancellationToken::new();
        let ctx = self.context(shutdown.clone(), concurrency)?;
        let consumer = Arc::new(kafka::consumer(
            &self.stack.rt.config.kafka,
            &self.group,
            std::slice::from_ref(&self.input),
        )?);
        Ok((shutdown, tokio::spawn(run_consumer(consumer, handler, ctx))))
    }

    fn handler(&self) -> Scripted {
        Scripted {
            output_topic: self.output.clone(),
            ..Scripted::default()
        }
    }

    /// Produces `payloads` to partition 0, each under its own key; returns their offsets.
    async fn produce(&self, payloads: &[&str]) -> anyhow::Result<Vec<i64>> {
        let producer: rdkafka::producer::FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.stack.rt.config.kafka.brokers)
            .set("broker.address.family", "v4")
            .set("message.max.bytes", "1100000")
            .create()?;
        let mut offsets = Vec::new();
        for (i, payload) in payloads.iter().enumerate() {
            let key = format!("debtor-{i}");
            let delivery = producer
                .send(
                    rdkafka::producer::FutureRecord::to(&self.input)
                        .partition(0)
                        .key(&key)
                        .payload(payload.as_bytes()),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
            offsets.push(delivery.offset);
        }
        Ok(offsets)
    }

    /// Produces `payloads`, each under its own key, spread over the partitions by key.
    async fn produce_spread(&self, payloads: &[String]) -> anyhow::Result<()> {
        let producer = Producer::new(&self.stack.rt.config.kafka, Metrics::new("feeder")?)?;
        let outs: Vec<Outbound> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| Outbound {
                topic: self.input.clone(),
                key: format!("debtor-{i}"),
                payload: p.clone().into_bytes(),
                trace: TraceContext::new_root(),
                partition: None,
            })
            .collect();
        producer.send_all(&outs).await?;
        Ok(())
    }

    /// Waits until the group has committed `records` records over `partitions` partitions.
    async fn committed_to_the_end(&self, partitions: i32, records: usize) -> anyhow::Result<()> {
        eventually("the committed offsets to reach the end", WAIT, || async {
            let committed = self.committed(partitions).await?;
            let total: i64 = committed.values().map(|o| o.unwrap_or(0)).sum();
            Ok((total == records as i64).then_some(()))
        })
        .await
    }

    /// The group's committed offset (the next offset it will read) per partition.
    async fn committed(&self, partitions: i32) -> anyhow::Result<HashMap<i32, Option<i64>>> {
        let mut config = self.stack.rt.config.clone();
        config.kafka.partitions = partitions;
        let group = format!("{}.{}", config.kafka.group_prefix, self.group);
        Ok(committed_offsets(&config, &group, std::slice::from_ref(&self.input))
            .await?
            .into_iter()
            .map(|((_, p), offset)| (p, offset))
            .collect())
    }
}

/// Finding 1: a record whose handling fails is not skipped: the loop stops, and nothing past it
/// is committed although later records of its partition were handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_record_is_never_committed_past() -> anyhow::Result<()> {
    a_failed_record_is_never_committed_past_case(1).await
}

/// The same, with records decided in batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_record_is_never_committed_past_in_batches() -> anyhow::Result<()> {
    a_failed_record_is_never_committed_past_case(16).await
}

async fn a_failed_record_is_never_committed_past_case(batch: usize) -> anyhow::Result<()> {
    let h = Harness::batched(1, batch).await?;
    let mut payloads: Vec<String> = (0..20).map(|i| format!("before-{i}")).collect();
    payloads.push("fatal".into());
    payloads.extend((0..20).map(|i| format!("after-{i}")));
    let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
    let offsets = h.produce(&refs).await?;
    let fatal_offset = offsets[20];

    let handler = h.handler();
    let handled = handler.handled.clone();
    let (_shutdown, running) = h.start(handler, 8)?;
    let ended = tokio::time::timeout(WAIT, running).await??;
    let error = ended.expect_err("a fatal failure ends the loop");
    assert!(format!("{error:#}").contains("a bug"), "{error:#}");
    let after_handled = handled
        .lock()
        .expect("lock")
        .iter()
        .filter(|t| t.starts_with("after-"))
        .count();
    let committed = h.committed(1).await?;
    assert_eq!(
        committed[&0],
        Some(fatal_offset),
        "committed up to the failed record and no further ({after_handled} later records were handled meanwhile)"
    );
    Ok(())
}

/// Finding 1: a record interrupted by shutdown while it waits out a fault is redelivered by the
/// next run, and so is everything after it on its partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_record_is_redelivered_with_everything_after_it() -> anyhow::Result<()> {
    an_interrupted_record_is_redelivered_with_everything_after_it_case(1).await
}

/// The same, with records decided in batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_record_is_redelivered_with_everything_after_it_in_batches() -> anyhow::Result<()> {
    an_interrupted_record_is_redelivered_with_everything_after_it_case(16).await
}

async fn an_interrupted_record_is_redelivered_with_everything_after_it_case(batch: usize) -> anyhow::Result<()> {
    let h = Harness::batched(1, batch).await?;
    let offsets = h.produce(&["a", "stuck", "b", "c", "d"]).await?;
    let handler = h.handler();
    let handled = handler.handled.clone();
    let (shutdown, running) = h.start(handler, 4)?;
    // Wait until every record after the stuck one was handled: their outputs are on the topic.
    eventually("the records after the stuck one to be handled", WAIT, || async {
        let done = handled.lock().expect("lock").len();
        Ok((done == 4).then_some(()))
    })
    .await?;
    shutdown.cancel();
    tokio::time::timeout(WAIT, running).await???;
    assert_eq!(
        h.committed(1).await?[&0],
        Some(offsets[1]),
        "committed up to the stuck record"
    );

    // The next run gets the stuck record again, and the ones after it.
    let again = h.handler();
    let seen = again.handled.clone();
    let calls = again.calls.clone();
    let (shutdown, running) = h.start(again, 4)?;
    eventually("the stuck record to be redelivered", WAIT, || async {
        Ok((calls.load(Ordering::SeqCst) >= 4 && seen.lock().expect("lock").len() >= 3).then_some(()))
    })
    .await?;
    shutdown.cancel();
    tokio::time::timeout(WAIT, running).await???;
    let seen: HashSet<String> = seen.lock().expect("lock").iter().cloned().collect();
    assert_eq!(seen, ["b", "c", "d"].iter().map(|s| s.to_string()).collect());
    Ok(())
}

/// Finding 2: a rebalance while records are in hand neither kills a consumer nor loses a record;
/// once both consumers settle, the group's offsets reach the end of every partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_with_records_in_hand_loses_nothing_and_kills_nobody() -> anyhow::Result<()> {
    a_rebalance_with_records_in_hand_loses_nothing_and_kills_nobody_case(1).await
}

/// The same, with records decided in batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_with_records_in_hand_loses_nothing_and_kills_nobody_in_batches() -> anyhow::Result<()> {
    a_rebalance_with_records_in_hand_loses_nothing_and_kills_nobody_case(16).await
}

async fn a_rebalance_with_records_in_hand_loses_nothing_and_kills_nobody_case(batch: usize) -> anyhow::Result<()> {
    let h = Harness::batched(2, batch).await?;
    let payloads: Vec<String> = (0..300).map(|i| format!("r-{i}")).collect();
    h.produce_spread(&payloads).await?;

    let first = Scripted {
        delay: Duration::from_millis(20),
        ..h.handler()
    };
    let first_handled = first.handled.clone();
    let (stop_first, first_running) = h.start(first, 4)?;
    eventually("the first consumer to be busy", WAIT, || async {
        Ok((first_handled.lock().expect("lock").len() >= 20).then_some(()))
    })
    .await?;
    let second = Scripted {
        delay: Duration::from_millis(20),
        ..h.handler()
    };
    let second_handled = second.handled.clone();
    let (stop_second, second_running) = h.start(second, 4)?;

    eventually("every record to be handled", Duration::from_secs(90), || async {
        let all = handled_by_either(&first_handled, &second_handled);
        anyhow::ensure!(
            !first_running.is_finished(),
            "the first consumer ended during the rebalance"
        );
        anyhow::ensure!(
            !second_running.is_finished(),
            "the second consumer ended during the rebalance"
        );
        Ok((all.len() == payloads.len()).then_some(()))
    })
    .await?;
    // Both settle their offsets; then every partition's committed offset is its end.
    h.committed_to_the_end(2, payloads.len()).await?;
    stop_first.cancel();
    stop_second.cancel();
    first_running.await??;
    second_running.await??;
    Ok(())
}

/// Shutdown lets records in hand finish only within the drain deadline; one that does not is
/// left uncommitted for the next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_within_its_deadline() -> anyhow::Result<()> {
    let h = Harness::new(1).await?;
    let offsets = h.produce(&["a", "slow", "b"]).await?;
    let handler = h.handler();
    let calls = handler.calls.clone();
    let (shutdown, running) = h.start(handler, 4)?;
    eventually("all three records to be taken", WAIT, || async {
        Ok((calls.load(Ordering::SeqCst) == 3).then_some(()))
    })
    .await?;
    let asked = Instant::now();
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), running).await???;
    let took = asked.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "the loop returned after {took:?} although the slow record takes 60 s (deadline 1 s)"
    );
    assert_eq!(
        h.committed(1).await?[&0],
        Some(offsets[1]),
        "the slow record stays uncommitted"
    );
    Ok(())
}

/// Finding 3: an output larger than the broker takes rejects the record it came from (and a
/// rejection carries at most a stated part of a huge record), and the loop goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_and_rejections_too_large_for_the_broker_become_rejections() -> anyhow::Result<()> {
    let h = Harness::new(1).await?;
    let huge_rejected = format!("reject-me{}", "y".repeat(999_000));
    let offsets = h.produce(&["huge-output", &huge_rejected, "after"]).await?;
    let handler = h.handler();
    let handled = handler.handled.clone();
    let (shutdown, running) = h.start(handler, 1)?;
    eventually("the record after the huge ones to be handled", WAIT, || async {
        anyhow::ensure!(!running.is_finished(), "the loop ended");
        Ok(handled.lock().expect("lock").iter().any(|t| t == "after").then_some(()))
    })
    .await?;
    let rejected_topic = h.stack.topic(&h.stack.topics().rejected);
    let rejections = eventually("both rejections", WAIT, || async {
        let r: Vec<Rejected> = h.stack.read(&rejected_topic).await?;
        Ok((r.len() >= 2).then_some(r))
    })
    .await?;
    let too_large = rejections
        .iter()
        .find(|r| r.source_offset == offsets[0])
        .expect("the huge output's record is rejected");
    assert_eq!(too_large.reason_code, "output_too_large");
    assert_eq!(too_large.raw_value.as_deref(), Some(&b"huge-output"[..]));
    let cut = rejections
        .iter()
        .find(|r| r.source_offset == offsets[1])
        .expect("the huge record is rejected");
    assert_eq!(cut.reason_code, "test_reason");
    assert_eq!(cut.raw_value.as_ref().map(Vec::len), Some(kafka::RAW_BYTES_KEPT));
    assert!(
        cut.detail.contains("cut to its first 65536 of 999009 bytes"),
        "{}",
        cut.detail
    );
    shutdown.cancel();
    running.await??;
    assert_eq!(h.committed(1).await?[&0], Some(offsets[2] + 1), "all three settled");
    Ok(())
}

/// Finding 3: a registry answering 500s is waited out: a valid record is applied once the
/// registry is back, never rejected as an unknown schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_outage_is_waited_out_not_turned_into_rejections() -> anyhow::Result<()> {
    let stack = LocalStack::start(base_config(), Arc::new(SystemClock)).await?;
    let http = reqwest::Client::new();
    let fault = format!("{}/_emulator/fault", stack.registry_url);
    let sample = danish("inv-registry-1", "R-1", day(2026, 3, 2), "registry@example.dk");
    let billing = stack.topic(&stack.topics().billing_invoice_events);
    // Encoded while the registry answers; ingest has not seen the schema id yet.
    let issued = sample.issued();
    let payload = stack.rt.codec.encode(&billing, &issued).await?;
    http.put(&fault)
        .json(&serde_json::json!({"status": 500}))
        .send()
        .await?
        .error_for_status()?;
    stack.start_service("ingest");
    stack.produce_raw(&billing, &issued.debtor_id, &payload).await?;
    eventually("ingest to meet the outage", WAIT, || async {
        let refused: serde_json::Value = http.get(&fault).send().await?.json().await?;
        Ok((refused["refused"].as_u64().unwrap_or(0) >= 3).then_some(()))
    })
    .await?;
    let ready = stack.wait_ready(&["ingest"], Duration::from_millis(300)).await;
    assert!(
        ready.is_err(),
        "ingest says it is not ready while it waits for the registry"
    );
    http.delete(&fault).send().await?.error_for_status()?;
    let invoices = stack.topic(&stack.topics().invoices);
    eventually("the invoice to be applied", WAIT, || async {
        let read: Vec<forfall_platform::records::Invoice> = stack.read(&invoices).await?;
        Ok(read.iter().any(|i| i.invoice_id == "inv-registry-1").then_some(()))
    })
    .await?;
    let rejected: Vec<Rejected> = stack.read(&stack.topic(&stack.topics().rejected)).await?;
    assert!(rejected.is_empty(), "nothing rejected: {rejected:?}");
    stack.shutdown().await;
    Ok(())
}

/// A loop with as many records in hand as it may hold leaves the rest to the client; held
/// full for longer (a fault waited out) it pauses its partitions and polls again, so that it
/// stays in the group and a rebalance goes through: a member that stopped polling would hold
/// the whole group up until `max.poll.interval.ms` (5 minutes) put it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_loop_still_serves_a_rebalance_and_loses_nothing() -> anyhow::Result<()> {
    let mut h = Harness::new(2).await?;
    h.max_in_flight = 6;
    let payloads: Vec<String> = (0..40).map(|i| format!("held-{i}")).collect();
    h.produce_spread(&payloads).await?;

    let first = h.handler();
    let (first_calls, first_handled, first_released) =
        (first.calls.clone(), first.handled.clone(), first.released.clone());
    let (stop_first, first_running) = h.start(first, 16)?;
    eventually("the first consumer to be full", WAIT, || async {
        Ok((first_calls.load(Ordering::SeqCst) >= h.max_in_flight).then_some(()))
    })
    .await?;
    let second = h.handler();
    second.released.cancel();
    let second_handled = second.handled.clone();
    let (stop_second, second_running) = h.start(second, 16)?;
    eventually(
        "the second member to get a partition while the first is full",
        Duration::from_secs(60),
        || async {
            anyhow::ensure!(!first_running.is_finished(), "the first consumer ended");
            Ok((!second_handled.lock().expect("lock").is_empty()).then_some(()))
        },
    )
    .await?;
    first_released.cancel();
    eventually("every record to be handled", Duration::from_secs(60), || async {
        let all = handled_by_either(&first_handled, &second_handled);
        Ok((all.len() == payloads.len()).then_some(()))
    })
    .await?;
    h.committed_to_the_end(2, payloads.len()).await?;
    stop_first.cancel();
    stop_second.cancel();
    first_running.await??;
    second_running.await??;
    Ok(())
}
