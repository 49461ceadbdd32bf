//! The shared, idempotent producer, and what its errors mean for the record being handled.

use std::time::Duration;

use futures::FutureExt;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::KafkaConfig;
use crate::metrics::Metrics;
use crate::telemetry::TraceContext;

/// A record to produce.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub topic: String,
    pub key: String,
    /// An empty payload is produced as a null value: a tombstone, which a compacted topic
    /// (a changelog) reads as "this key is gone". Every other record is Avro, never empty.
    pub payload: Vec<u8>,
    pub trace: TraceContext,
    /// A partition chosen by the caller (a changelog follows its input's partitions); the
    /// key's partition when `None`.
    pub partition: Option<i32>,
}

/// Why a record could not be produced, by what to do about it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProduceError {
    /// The broker is away, slow or electing a leader; the same record will go through later.
    #[error("produce to '{topic}' failed (will retry): {detail}")]
    Transient { topic: String, detail: String },
    /// The record can never be accepted: it is larger than the broker or client allows.
    #[error("record for '{topic}' is too large ({bytes} bytes): {detail}")]
    TooLarge {
        topic: String,
        bytes: usize,
        detail: String,
    },
    /// Only an operator can fix this (authorisation, a fenced or broken idempotent producer).
    #[error("produce to '{topic}' failed: {detail}")]
    Fatal { topic: String, detail: String },
}

impl ProduceError {
    /// `error` of a record of `bytes` (key and payload) for `topic`.
    fn of(error: &KafkaError, topic: &str, bytes: usize) -> Self {
        let (topic, detail) = (topic.to_owned(), error.to_string());
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge) => {
                ProduceError::TooLarge { topic, bytes, detail }
            }
            Some(
                RDKafkaErrorCode::Fatal
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::InvalidTopic,
            ) => ProduceError::Fatal { topic, detail },
            _ => ProduceError::Transient { topic, detail },
        }
    }
}

pub fn producer(config: &KafkaConfig) -> Result<FutureProducer, KafkaError> {
    super::base(config)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // Murmur2 like the Java client, so that upstream producers and Forfall agree on which
        // partition a debtor's key belongs to.
        .set("partitioner", "murmur2_random")
        .set("linger.ms", config.linger_ms.to_string())
        .set("queue.buffering.max.messages", "200000")
        .set("message.max.bytes", config.message_max_bytes.to_string())
        .create()
}

/// The shared, idempotent producer.
#[derive(Clone)]
pub struct Producer {
    inner: FutureProducer,
    metrics: Metrics,
}

/// Where the broker put an acknowledged record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    pub partition: i32,
    pub offset: i64,
}

/// The broker's acknowledgement of one record.
pub type Ack = futures::future::BoxFuture<'static, Result<Delivered, ProduceError>>;

impl Producer {
    pub fn new(config: &KafkaConfig, metrics: Metrics) -> Result<Self, KafkaError> {
        Ok(Self {
            inner: producer(config)?,
            metrics,
        })
    }

    /// Enqueues one record and returns a future of its acknowledgement. Waits while the
    /// client's local queue is full rather than failing.
    pub async fn send(&self, out: &Outbound) -> Ack {
        let bytes = out.key.len() + out.payload.len();
        loop {
            let mut record = FutureRecord::to(&out.topic)
                .key(out.key.as_bytes())
                .headers(out.trace.inject(OwnedHeaders::new()));
            if !out.payload.is_empty() {
                record = record.payload(&out.payload);
            }
            if let Some(partition) = out.partition {
                record = record.partition(partition);
            }
            match self.inner.send_result(record) {
                Ok(delivery) => {
                    self.metrics.produced.with_label_values(&[&out.topic]).inc();
                    let topic = out.topic.clone();
                    return async move {
                        match delivery.await {
                            Ok(Ok(d)) => Ok(Delivered {
                                partition: d.partition,
                                offset: d.offset,
                            }),
                            Ok(Err((e, _))) => Err(ProduceError::of(&e, &topic, bytes)),
                            Err(_) => Err(ProduceError::Transient {
                                topic,
                                detail: "delivery cancelled".into(),
                            }),
                        }
                    }
                    .boxed();
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return futures::future::ready(Err(ProduceError::of(&e, &out.topic, bytes))).boxed(),
            }
        }
    }

    /// Produces all records and waits until each is acknowledged; the first error, if any.
    pub async fn send_all(&self, outs: &[Outbound]) -> Result<(), ProduceError> {
        self.send_all_delivered(outs).await.map(|_| ())
    }

    /// Like [`Producer::send_all`], with where each record went, in order.
    pub async fn send_all_delivered(&self, outs: &[Outbound]) -> Result<Vec<Delivered>, ProduceError> {
        let mut acks = Vec::with_capacity(outs.len());
        for out in outs {
            acks.push(self.send(out).await);
        }
        let mut delivered = Vec::with_capacity(outs.len());
        let mut first_error = None;
        for ack in futures::future::join_all(acks).await {
            match ack {
                Ok(d) => delivered.push(d),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(delivered), Err)
    }

    pub async fn flush(&self, timeout: Duration) {
        let inner = self.inner.clone();
        let _ = tokio::task::spawn_blocking(move || rdkafka::producer::Producer::flush(&inner, timeout)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_properties(properties: serde_json::Value) -> KafkaConfig {
        KafkaConfig {
            properties: serde_json::from_value(properties).unwrap(),
            ..KafkaConfig::default()
        }
    }

    #[tokio::test]
    async fn tls_and_sasl_settings_reach_librdkafka_and_a_wrong_one_is_named() {
        // librdkafka checks these when the client is made: SASL_SSL with SCRAM needs OpenSSL
        // built in, which is what the `ssl` feature brings.
        let secured = with_properties(serde_json::json!({
            "security.protocol": "SASL_SSL",
            "sasl": {"mechanism": "SCRAM-SHA-512", "username": "forfall", "password": "hunter2"},
            "ssl.endpoint.identification.algorithm": "https",
        }));
        Producer::new(&secured, Metrics::new("t").unwrap()).unwrap();
        let wrong = with_properties(serde_json::json!({"sasl.mechanisms.typo": "PLAIN"}));
        let err = Producer::new(&wrong, Metrics::new("t").unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("sasl.mechanisms.typo"), "{err}");
        let unsupported = with_properties(serde_json::json!({"security.protocol": "SASL_TLS"}));
        let err = Producer::new(&unsupported, Metrics::new("t").unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("security.protocol"), "{err}");
    }

    /// One request to a token endpoint on loopback, answered with an unsigned JWT valid for an
    /// hour (librdkafka reads its `exp` and `sub`); the request as it came.
    async fn token_endpoint() -> (String, tokio::task::JoinHandle<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/oauth2/token", listener.local_addr().unwrap());
        let served = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            // Headers, then as many body bytes as they announce.
            loop {
                let n = conn.read(&mut buf).await.unwrap();
                request.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&request).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let length: usize = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().to_owned())
                        })
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    if request.len() >= end + 4 + length || n == 0 {
                        break;
                    }
                }
            }
            let b64 = |v: serde_json::Value| {
                use base64::Engine;
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
            };
            let exp = chrono::Utc::now().timestamp() + 3600;
            let jwt = format!(
                "{}.{}.",
                b64(serde_json::json!({"alg": "none", "typ": "JWT"})),
                b64(serde_json::json!({"sub": "forfall", "exp": exp, "iat": exp - 3600}))
            );
            let body = serde_json::json!({"access_token": jwt, "token_type": "bearer", "expires_in": 3600}).to_string();
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            conn.write_all(response.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&request).to_string()
        });
        (url, served)
    }

    #[tokio::test]
    async fn oauthbearer_with_an_oidc_token_endpoint_fetches_a_token_with_the_client_credentials() {
        // `sasl.oauthbearer.method=oidc` needs librdkafka built with libcurl (the `curl-static`
        // feature): without it the client is refused when made. With it, the client asks the
        // token endpoint for a token with its credentials before it talks to any broker.
        let (url, served) = token_endpoint().await;
        let oidc = with_properties(serde_json::json!({
            "bootstrap.servers": "127.0.0.1:1",
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "OAUTHBEARER",
            "sasl.oauthbearer.method": "oidc",
            "sasl.oauthbearer.client.id": "forfall-watcher",
            "sasl.oauthbearer.client.secret": "s3cret",
            "sasl.oauthbearer.scope": "kafka",
            "sasl.oauthbearer.token.endpoint.url": url,
        }));
        let producer = Producer::new(&oidc, Metrics::new("t").unwrap()).unwrap();
        let request = tokio::time::timeout(Duration::from_secs(30), served)
            .await
            .expect("the token endpoint is asked within 30 s")
            .unwrap();
        drop(producer);
        assert!(request.starts_with("POST /oauth2/token "), "{request}");
        assert!(request.contains("grant_type=client_credentials"), "{request}");
        assert!(request.contains("scope=kafka"), "{request}");
        use base64::Engine;
        let basic = base64::engine::general_purpose::STANDARD.encode("forfall-watcher:s3cret");
        assert!(
            request
                .to_ascii_lowercase()
                .contains(&format!("authorization: basic {}", basic.to_ascii_lowercase())),
            "{request}"
        );
    }

    fn kind(code: RDKafkaErrorCode) -> &'static str {
        match ProduceError::of(&KafkaError::MessageProduction(code), "t", 11) {
            ProduceError::Transient { .. } => "transient",
            ProduceError::TooLarge { .. } => "too large",
            ProduceError::Fatal { .. } => "fatal",
        }
    }

    #[test]
    fn a_broker_away_longer_than_the_message_timeout_is_waited_out() {
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::RequestTimedOut,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::UnknownTopicOrPartition,
        ] {
            assert_eq!(kind(code), "transient", "{code:?}");
        }
    }

    #[test]
    fn a_record_too_large_is_never_retried_and_authorisation_needs_an_operator() {
        assert_eq!(kind(RDKafkaErrorCode::MessageSizeTooLarge), "too large");
        assert_eq!(kind(RDKafkaErrorCode::MessageBatchTooLarge), "too large");
        assert_eq!(kind(RDKafkaErrorCode::TopicAuthorizationFailed), "fatal");
        assert_eq!(kind(RDKafkaErrorCode::Fatal), "fatal");
    }
}
