//! Kafka plumbing: client settings, topic creation, the idempotent producer, and the consume
//! runtime every service runs (see [`consume`] for its rule on offsets).
//!
//! Delivery is at-least-once (tansu does not complete transactions, and no transaction could
//! cover Redis or a provider anyway): every handler must be idempotent.

mod consume;
pub mod offsets;
mod producer;
mod rebalance;
pub(crate) mod topics;

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};

pub use consume::{
    Failure, Handler, LaneOf, LoopContext, RAW_BYTES_KEPT, backoff, each_failed_as, each_retried_alone,
    every_record_decided, key_lane, payload_lane, run_consumer,
};
pub use producer::{Ack, Delivered, Outbound, ProduceError, Producer, producer};
pub use rebalance::ConsumeContext;
pub use topics::ensure_topics;

use crate::config::KafkaConfig;
use crate::telemetry::TraceContext;

/// A consumer whose partitions the consume runtime tracks through rebalances.
pub type KafkaConsumer = StreamConsumer<ConsumeContext>;

/// The settings every client of the deployment's brokers starts from.
pub(crate) fn base_config(config: &KafkaConfig) -> ClientConfig {
    base(config)
}

fn base(config: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers);
    // Tansu listens on IPv4 only; resolving "localhost" to ::1 first would stall connects.
    c.set("broker.address.family", "v4");
    // The deployment's own (TLS, SASL, ...), before the consumer's and producer's settings
    // that the guarantees rest on.
    for (name, value) in config.properties.flattened() {
        c.set(name, value);
    }
    c
}

pub fn consumer(config: &KafkaConfig, group: &str, topics: &[String]) -> Result<KafkaConsumer, KafkaError> {
    let context = ConsumeContext::new(Duration::from_millis(config.revoke_timeout_ms.into()));
    let consumer: KafkaConsumer = base(config)
        .set("group.id", format!("{}.{group}", config.group_prefix))
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        // Offsets are stored by the loop only after the outputs are acknowledged.
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", config.session_timeout_ms.to_string())
        .set("heartbeat.interval.ms", config.heartbeat_interval_ms.to_string())
        .set("topic.metadata.refresh.interval.ms", "5000")
        .set("fetch.wait.max.ms", config.fetch_wait_max_ms.to_string())
        .create_with_context(context)?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names)?;
    Ok(consumer)
}

/// One consumed record, detached from the client's buffers.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// When the record was written (its producer's create time, ms since the epoch), if known.
    pub timestamp_ms: Option<i64>,
    /// The producer's trace context, or a new root when the record carried none; once the
    /// record's span is open (and spans are exported), that span's.
    pub trace: TraceContext,
    /// The producer's trace context, as the record's headers carried it.
    pub parent: Option<TraceContext>,
}

impl Inbound {
    pub(crate) fn from_message(m: &OwnedMessage) -> Self {
        let parent = m.headers().and_then(TraceContext::extract);
        let trace = parent.unwrap_or_else(TraceContext::new_root);
        Self {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            timestamp_ms: m.timestamp().to_millis(),
            trace,
            parent,
        }
    }

    pub fn key_str(&self) -> Option<String> {
        self.key.as_deref().map(|k| String::from_utf8_lossy(k).into_owned())
    }
}
