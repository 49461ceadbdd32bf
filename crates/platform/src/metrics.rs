//! Prometheus metrics. Each service owns a [`Metrics`] with the shared families; services add
//! their business metrics to the same registry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

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
    /// The same lag in time: how long ago the record at the position was written (0 when
    /// caught up), sampled. Comparable across topics of any rate, unlike a count of records.
    pub consumer_lag_seconds: GaugeVec,
    /// When the last record polled from each topic and partition was written (ms since the
    /// epoch); by topic first, so that noting a record allocates nothing once its topic is known.
    last_polled: Arc<Mutex<HashMap<String, HashMap<i32, i64>>>>,
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
        let consumer_lag_seconds = GaugeVec::new(
            Opts::new(
                "consumer_lag_seconds",
                "Consumer lag in time: age of the record at the consumer's position, 0 when caught up",
            ),
            &["topic", "partition"],
        )?;
        registry.register(Box::new(consumer_lag.clone()))?;
        registry.register(Box::new(consumer_lag_seconds.clone()))?;
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
            consumer_lag_seconds,
            last_polled: Arc::default(),
        })
    }

    /// Notes when the record just polled from `topic`/`partition` was written.
    pub fn polled(&self, topic: &str, partition: i32, written_ms: i64) {
        let mut last = self.last_polled.lock().unwrap_or_else(|p| p.into_inner());
        match last.get_mut(topic) {
            Some(partitions) => {
                partitions.insert(partition, written_ms);
            }
            None => {
                last.insert(topic.to_owned(), HashMap::from([(partition, written_ms)]));
            }
        }
    }

    /// Sets a partition's lag: `records` behind the high watermark, and in time the age of the
    /// last record polled (the one just before the position), the usual estimate of a consumer's
    /// time lag; 0 when caught up.
    pub fn record_lag(&self, topic: &str, partition: i32, records: i64, now_ms: i64) {
        let labels = [topic, &partition.to_string()];
        self.consumer_lag.with_label_values(&labels).set(records);
        let written = self
            .last_polled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(topic)
            .and_then(|partitions| partitions.get(&partition))
            .copied();
        let seconds = match written {
            _ if records == 0 => 0.0,
            Some(written_ms) => (now_ms - written_ms).max(0) as f64 / 1000.0,
            // Behind on a partition nothing was polled from yet: no estimate until a record is.
            None => return,
        };
        self.consumer_lag_seconds.with_label_values(&labels).set(seconds);
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lag_seconds(m: &Metrics, topic: &str, partition: i32) -> f64 {
        m.consumer_lag_seconds
            .with_label_values(&[topic, &partition.to_string()])
            .get()
    }

    #[test]
    fn lag_in_time_is_the_age_of_the_last_record_polled_and_zero_when_caught_up() {
        let m = Metrics::new("test").unwrap();
        m.polled("t", 0, 1_000_000);
        m.record_lag("t", 0, 500, 1_090_000);
        assert_eq!(lag_seconds(&m, "t", 0), 90.0);
        assert_eq!(m.consumer_lag.with_label_values(&["t", "0"]).get(), 500);
        m.record_lag("t", 0, 0, 1_200_000);
        assert_eq!(lag_seconds(&m, "t", 0), 0.0, "caught up");
        // Behind on a partition nothing was polled from yet: no estimate rather than a made-up one.
        m.record_lag("t", 1, 20, 1_200_000);
        let rendered = m.render();
        let sample = |name: &str, partition: &str| {
            rendered
                .lines()
                .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&format!("partition=\"{partition}\"")))
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_owned)
        };
        assert_eq!(
            sample("forfall_consumer_lag_seconds", "0").as_deref(),
            Some("0"),
            "{rendered}"
        );
        assert_eq!(sample("forfall_consumer_lag_seconds", "1"), None, "{rendered}");
        assert_eq!(sample("forfall_consumer_lag", "1").as_deref(), Some("20"), "{rendered}");
    }
}
