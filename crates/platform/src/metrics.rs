//! Prometheus metrics. Each service owns a [`Metrics`] with the shared families; services add
//! their business metrics to the same registry.

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Records handled, by topic and outcome (applied, rejected, duplicate, ...).
    pub messages: IntCounterVec,
    /// Records sent to the rejected topic, by reason code.
    pub rejected: IntCounterVec,
    /// Time to handle one record, by topic.
    pub handle_seconds: HistogramVec,
    /// Records produced, by topic.
    pub produced: IntCounterVec,
    /// Transient failures retried (registry, Redis, broker, provider), by operation.
    pub retries: IntCounterVec,
    /// Consumer lag per topic/partition (high watermark - position), sampled.
    pub consumer_lag: IntGaugeVec,
}

#[derive(Debug, thiserror::Error)]
#[error("metrics registration failed: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    pub fn new(service: &str) -> Result<Self, MetricsError> {
        let registry = Registry::new_custom(
            Some("forfall".into()),
            Some([("service".to_owned(), service.to_owned())].into()),
        )?;
        let messages = IntCounterVec::new(
            Opts::new("messages_total", "Records handled, by topic and outcome"),
            &["topic", "outcome"],
        )?;
        let rejected = IntCounterVec::new(
            Opts::new("rejected_total", "Records rejected, by reason code"),
            &["reason"],
        )?;
        let handle_seconds = HistogramVec::new(
            HistogramOpts::new("handle_seconds", "Time to handle one record").buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["topic"],
        )?;
        let produced = IntCounterVec::new(Opts::new("produced_total", "Records produced, by topic"), &["topic"])?;
        let retries = IntCounterVec::new(
            Opts::new("retries_total", "Transient failures retried, by operation"),
            &["operation"],
        )?;
        let consumer_lag = IntGaugeVec::new(
            Opts::new("consumer_lag", "Consumer lag in records"),
            &["topic", "partition"],
        )?;
        registry.register(Box::new(messages.clone()))?;
        registry.register(Box::new(rejected.clone()))?;
        registry.register(Box::new(handle_seconds.clone()))?;
        registry.register(Box::new(produced.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(consumer_lag.clone()))?;
        let build_info = IntGaugeVec::new(
            Opts::new("build_info", "Always 1; labels say which build runs"),
            &["version"],
        )?;
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(build_info))?;
        Ok(Self {
            registry,
            messages,
            rejected,
            handle_seconds,
            produced,
            retries,
            consumer_lag,
        })
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
