//! Logging with `tracing` (JSON when stderr is not a terminal), spans exported to an
//! OpenTelemetry collector over OTLP when `traces.enabled`, and W3C trace context carried in
//! Kafka headers by OpenTelemetry's propagator, so one invoice's path through every service is
//! one trace.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider};
use rand::RngCore;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use serde::{Deserialize, Serialize};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, fmt};

use crate::config::{LogConfig, TracesConfig};

/// The exporting tracer provider, when traces are enabled (flushed and shut down at exit).
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

#[derive(Debug, thiserror::Error)]
#[error("traces: cannot export to {endpoint}: {reason}")]
pub struct TelemetryError {
    endpoint: String,
    reason: String,
}

/// Installs the global subscriber once; later calls (tests, the all-in-one binary) are no-ops.
/// `service` names the process in traces unless `traces.service_name` does.
pub fn init(log: &LogConfig, traces: &TracesConfig, service: &str) -> Result<(), TelemetryError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.level));
    let json = match log.format.as_str() {
        "json" => true,
        "pretty" => false,
        _ => !std::io::stderr().is_terminal(),
    };
    let logs = if json {
        fmt::layer()
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed()
    } else {
        fmt::layer().with_writer(std::io::stderr).boxed()
    };
    let spans = if traces.enabled && PROVIDER.get().is_none() {
        let provider = tracer_provider(traces, service)?;
        let tracer = provider.tracer("forfall");
        let _ = PROVIDER.set(provider);
        // Forfall's own spans at info and above, whatever the log level: a quiet log must not
        // break a trace, and the exporter's own HTTP client must not trace itself.
        let ours = tracing_subscriber::filter::filter_fn(|m| {
            m.target().starts_with("forfall") && *m.level() <= tracing::Level::INFO
        });
        Some(tracing_opentelemetry::layer().with_tracer(tracer).with_filter(ours))
    } else {
        None
    };
    let _ = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(spans)
        .try_init();
    Ok(())
}

fn tracer_provider(traces: &TracesConfig, service: &str) -> Result<SdkTracerProvider, TelemetryError> {
    let failed = |reason: String| TelemetryError {
        endpoint: traces.endpoint.clone(),
        reason,
    };
    if !(0.0..=1.0).contains(&traces.sample_ratio) {
        return Err(failed(format!(
            "traces.sample_ratio is {}: it must be between 0 and 1",
            traces.sample_ratio
        )));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(&traces.endpoint)
        .with_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| failed(e.to_string()))?;
    let batches = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_scheduled_delay(Duration::from_millis(traces.flush_ms))
                .build(),
        )
        .build();
    let name = traces.service_name.clone().unwrap_or_else(|| service.to_owned());
    Ok(SdkTracerProvider::builder()
        .with_span_processor(batches)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            traces.sample_ratio,
        ))))
        .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(name).build())
        .build())
}

/// Whether spans are exported (traces enabled and the exporter installed in this process).
pub fn exporting() -> bool {
    PROVIDER.get().is_some()
}

/// Sends the spans finished so far (blocks until the collector answered or gave up).
pub fn flush() {
    if let Some(provider) = PROVIDER.get() {
        let _ = provider.force_flush();
    }
}

/// Sends what is left and stops exporting; at the end of `main`, outside the runtime.
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get() {
        let _ = provider.shutdown();
    }
}

/// Makes `span` a child of `parent` (a record's or request's trace context), when spans are
/// exported; call before the span is first entered.
pub fn set_parent(span: &tracing::Span, parent: &TraceContext) {
    if exporting() {
        let _ = span.set_parent(parent.otel());
    }
}

/// The trace context of `span` as exported (its own span id, the sampler's decision), when
/// spans are exported.
pub fn context_of(span: &tracing::Span) -> Option<TraceContext> {
    if !exporting() {
        return None;
    }
    TraceContext::of(span.context().span().span_context())
}

pub const TRACEPARENT: &str = "traceparent";

/// A W3C trace context (`traceparent`, version 00).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl TraceContext {
    /// Starts a new trace (an input that arrived without one).
    pub fn new_root() -> Self {
        let mut rng = rand::rng();
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        rng.fill_bytes(&mut trace_id);
        rng.fill_bytes(&mut span_id);
        Self {
            trace_id,
            span_id,
            sampled: true,
        }
    }

    /// The same trace, a new span: what a service puts on the records it produces.
    pub fn child(&self) -> Self {
        let mut span_id = [0u8; 8];
        rand::rng().fill_bytes(&mut span_id);
        Self { span_id, ..*self }
    }

    /// Parses `00-<32 hex>-<16 hex>-<2 hex>`; anything else is treated as absent.
    pub fn parse(header: &str) -> Option<Self> {
        let mut parts = header.trim().split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let span = parts.next()?;
        let flags = parts.next()?;
        if version != "00" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 || parts.next().is_some() {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        hex::decode_to_slice(trace, &mut trace_id).ok()?;
        hex::decode_to_slice(span, &mut span_id).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(self.span_id),
            u8::from(self.sampled)
        )
    }

    /// What OpenTelemetry's propagator reads from a record's headers; `None` when they carry no
    /// valid `traceparent`.
    pub fn extract<H: Headers>(headers: &H) -> Option<Self> {
        let reader = HeaderReader(headers);
        // W3C's exact shape first: the propagator takes short ids (`00-abc-def-01`) too.
        Self::parse(reader.get(TRACEPARENT)?)?;
        let context = TraceContextPropagator::new().extract(&reader);
        Self::of(context.span().span_context())
    }

    /// Adds this context to a record's headers as OpenTelemetry's propagator writes it.
    pub fn inject(&self, headers: OwnedHeaders) -> OwnedHeaders {
        let mut written = HeaderWriter(Vec::new());
        TraceContextPropagator::new().inject_context(&self.otel(), &mut written);
        written.0.iter().fold(headers, |headers, (key, value)| {
            headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            })
        })
    }

    fn of(span: &SpanContext) -> Option<Self> {
        span.is_valid().then(|| Self {
            trace_id: span.trace_id().to_bytes(),
            span_id: span.span_id().to_bytes(),
            sampled: span.is_sampled(),
        })
    }

    fn otel(&self) -> opentelemetry::Context {
        let flags = if self.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let span = SpanContext::new(
            TraceId::from_bytes(self.trace_id),
            SpanId::from_bytes(self.span_id),
            flags,
            true,
            TraceState::default(),
        );
        opentelemetry::Context::new().with_remote_span_context(span)
    }

    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }
}

struct HeaderReader<'a, H>(&'a H);

impl<H: Headers> Extractor for HeaderReader<'_, H> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|h| h.key.eq_ignore_ascii_case(key))
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|h| h.key).collect()
    }
}

struct HeaderWriter(Vec<(String, String)>);

impl Injector for HeaderWriter {
    fn set(&mut self, key: &str, value: String) {
        // An empty `tracestate` says nothing.
        if !value.is_empty() {
            self.0.push((key.to_owned(), value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_keeps_the_trace_in_children() {
        let root = TraceContext::new_root();
        let parsed = TraceContext::parse(&root.header()).unwrap();
        assert_eq!(parsed, root);
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.span_id, root.span_id);
    }

    #[test]
    fn record_headers_carry_the_context_through_the_propagator() {
        let root = TraceContext::new_root();
        let headers = root.inject(OwnedHeaders::new().insert(Header {
            key: "other",
            value: Some("x"),
        }));
        let traceparent = headers
            .iter()
            .find(|h| h.key == TRACEPARENT)
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned());
        assert_eq!(traceparent, Some(root.header()), "W3C traceparent, as parse reads it");
        assert_eq!(TraceContext::extract(&headers), Some(root));
        let unsampled = TraceContext { sampled: false, ..root };
        assert_eq!(
            TraceContext::extract(&unsampled.inject(OwnedHeaders::new())),
            Some(unsampled)
        );
        assert_eq!(TraceContext::extract(&OwnedHeaders::new()), None);
        let bad = OwnedHeaders::new().insert(Header {
            key: TRACEPARENT,
            value: Some("00-abc-def-01"),
        });
        assert_eq!(TraceContext::extract(&bad), None);
    }

    #[test]
    fn refuses_malformed_headers() {
        for bad in [
            "",
            "00-abc-def-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad}");
        }
        assert!(TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_some());
    }
}
