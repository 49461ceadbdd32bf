//! What the platform's producer relies on from the broker.

use forfall_e2e::*;
use forfall_platform::clock::SystemClock;
use forfall_platform::kafka::{Outbound, Producer};
use forfall_platform::metrics::Metrics;
use forfall_platform::telemetry::TraceContext;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_of_a_burst_is_kept_in_order() -> anyhow::Result<()> {
    let stack = LocalStack::start(base_config(), Arc::new(SystemClock)).await?;
    let producer = Producer::new(&stack.rt.config.kafka, Metrics::new("test")?)?;
    let topic = stack.topic(&stack.topics().journey_events);
    let outs: Vec<Outbound> = (0..200)
        .map(|i| Outbound {
            topic: topic.clone(),
            key: "same-debtor".into(),
            payload: format!("record-{i}").into_bytes(),
            trace: TraceContext::new_root(),
            partition: None,
        })
        .collect();
    producer.send_all(&outs).await.map_err(anyhow::Error::msg)?;
    // Identical records sent one by one are all kept. (Tansu 0.6.0 collapses byte-identical
    // records that share one produce batch; Forfall never relies on keeping those, because
    // byte-identical Forfall records are the same fact under the same derived event id.)
    let same: Vec<Outbound> = (0..3)
        .map(|_| Outbound {
            payload: b"same".to_vec(),
            ..outs[0].clone()
        })
        .collect();
    for one in &same {
        producer
            .send_all(std::slice::from_ref(one))
            .await
            .map_err(anyhow::Error::msg)?;
    }
    let read = stack.read_raw(&topic).await?;
    let texts: Vec<String> = read.iter().map(|r| String::from_utf8_lossy(r).into_owned()).collect();
    let expected: Vec<String> = (0..200)
        .map(|i| format!("record-{i}"))
        .chain((0..3).map(|_| "same".to_owned()))
        .collect();
    assert_eq!(
        texts.len(),
        expected.len(),
        "tail: {:?}",
        &texts[texts.len().saturating_sub(8)..]
    );
    assert_eq!(texts, expected);
    Ok(())
}

/// Reading a topic to its end returns every record of its last batch, although tansu 0.6.0
/// reports a high watermark that counts a multi-record batch as one offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_to_the_end_includes_the_whole_last_batch() -> anyhow::Result<()> {
    let stack = LocalStack::start(base_config(), Arc::new(SystemClock)).await?;
    let producer = Producer::new(&stack.rt.config.kafka, Metrics::new("test")?)?;
    let topic = stack.topic(&stack.topics().journey_events);
    let outs: Vec<Outbound> = (0..3)
        .map(|i| Outbound {
            topic: topic.clone(),
            key: "k".into(),
            payload: format!("r{i}").into_bytes(),
            trace: TraceContext::new_root(),
            partition: None,
        })
        .collect();
    producer.send_all(&outs).await.map_err(anyhow::Error::msg)?;
    let read: Vec<String> = stack
        .read_raw(&topic)
        .await?
        .iter()
        .map(|r| String::from_utf8_lossy(r).into_owned())
        .collect();
    assert_eq!(read, ["r0", "r1", "r2"]);
    Ok(())
}

/// A broker that answers late when a service starts (just restarted, or electing its
/// controller) is waited out: the topics are created once it answers, rather than the service
/// exiting on its first admin request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_answers_late_at_start_is_waited_out() -> anyhow::Result<()> {
    use forfall_e2e::chaos::{Helper, signal};
    let dir = std::env::temp_dir().join(format!("forfall-late-broker-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (broker, port) = Helper::broker(&dir)?;
    servers::wait_port(port, "tansu").await?;
    let mut kafka = base_config().kafka;
    kafka.brokers = format!("127.0.0.1:{port}");
    signal(broker.pid(), "STOP");
    let topics = vec!["late.invoices".to_owned(), "late.actions".to_owned()];
    let ensuring = tokio::spawn({
        let (kafka, topics) = (kafka.clone(), topics.clone());
        async move { forfall_platform::kafka::ensure_topics(&kafka, &topics).await }
    });
    // Longer than one request's bound (10 s): a start that does not ask again has failed by now.
    tokio::time::sleep(std::time::Duration::from_secs(13)).await;
    signal(broker.pid(), "CONT");
    let created = tokio::time::timeout(std::time::Duration::from_secs(120), ensuring).await??;
    created.map_err(|e| anyhow::anyhow!("the topics were not created once the broker answered: {e:#}"))?;
    for topic in &topics {
        assert_eq!(
            forfall_platform::changelog::partition_count(&kafka, topic).await?,
            kafka.partitions,
            "{topic}"
        );
    }
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
