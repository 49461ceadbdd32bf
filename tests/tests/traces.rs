//! Traces: with `traces.enabled`, the services export their spans over OTLP/HTTP, and one
//! invoice's path is one trace: billing's record → ingest → watcher → (the nudge's timer, days
//! later) → dispatch, each a consumer span by OpenTelemetry's messaging conventions, each the
//! child of the span that produced its record. The collector is an OTLP/HTTP endpoint in this
//! test, decoding what the exporter sends with OpenTelemetry's own protobuf types.
//!
//! Its own test binary: the exporter is installed once per process, by the first stack started.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use forfall_e2e::*;
use forfall_platform::clock::ManualClock;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;

type Received = Arc<Mutex<Vec<Span>>>;

/// What an OTLP/HTTP collector does with `POST /v1/traces`: a protobuf request in, an empty
/// protobuf response out.
async fn collect(State(received): State<Received>, body: Bytes) -> Response {
    match ExportTraceServiceRequest::decode(body) {
        Ok(request) => {
            let spans = request
                .resource_spans
                .into_iter()
                .flat_map(|r| r.scope_spans)
                .flat_map(|s| s.spans);
            received.lock().unwrap().extend(spans);
            (
                [(header::CONTENT_TYPE, "application/x-protobuf")],
                ExportTraceServiceResponse::default().encode_to_vec(),
            )
                .into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
        .and_then(|v| match &v.value {
            Some(any_value::Value::StringValue(s)) => Some(s.as_str()),
            _ => None,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_invoice_is_one_trace_across_ingest_watcher_and_dispatch() -> anyhow::Result<()> {
    let received: Received = Arc::default();
    let collector = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}/v1/traces", collector.local_addr()?);
    let app = Router::new()
        .route("/v1/traces", post(collect))
        .with_state(received.clone());
    tokio::spawn(async move { axum::serve(collector, app).await });

    let mut config = base_config();
    config.traces.enabled = true;
    config.traces.endpoint = endpoint;
    config.traces.flush_ms = 200;
    let clock = ManualClock::new(at("2026-03-10T08:00:00Z"));
    let stack = LocalStack::start(config, clock.clone()).await?;
    assert!(
        forfall_platform::telemetry::exporting(),
        "the stack installed the exporter"
    );
    stack.start_all();

    let s = danish("inv-traced", "INV-7001", day(2026, 3, 12), "tracy@example.test");
    issue_invoice(&stack, &s).await?;
    status_is(&stack, s.tenant, s.invoice_id, "open").await?;
    // The nudge's timer fires on the due date, two days after the invoice came.
    clock.set(at("2026-03-12T08:00:01Z"));
    eventually("the nudge e-mail", WAIT, || async {
        Ok(Some(()).filter(|_| !stack.mail.to("tracy@example.test").is_empty()))
    })
    .await?;

    // Spans arrive in batches; the dispatch span of the nudge closes once it is sent.
    let actions = stack.topic(&stack.topics().journey_actions);
    let spans = eventually("the spans of ingest, watcher and dispatch", WAIT, || async {
        tokio::task::spawn_blocking(forfall_platform::telemetry::flush).await?;
        let spans = received.lock().unwrap().clone();
        let dispatched = spans.iter().any(|s| {
            attribute(s, "service") == Some("dispatch")
                && attribute(s, "messaging.destination.name") == Some(actions.as_str())
        });
        Ok(Some(spans).filter(|_| dispatched))
    })
    .await?;

    let by_id: HashMap<&[u8], &Span> = spans.iter().map(|s| (s.span_id.as_slice(), s)).collect();
    let dispatch = spans
        .iter()
        .find(|s| {
            attribute(s, "service") == Some("dispatch")
                && attribute(s, "messaging.destination.name") == Some(actions.as_str())
        })
        .expect("found above");
    // Up the chain of parents from dispatch's span: the watcher's span of the invoice, then
    // ingest's span of billing's record, all in one trace.
    let mut chain = vec![dispatch];
    while let Some(parent) = by_id.get(chain[chain.len() - 1].parent_span_id.as_slice()) {
        chain.push(parent);
    }
    let services: Vec<(&str, &str)> = chain
        .iter()
        .map(|s| {
            (
                attribute(s, "service").unwrap_or("?"),
                attribute(s, "messaging.destination.name").unwrap_or("?"),
            )
        })
        .collect();
    let topic = |name: &str| stack.topic(name);
    assert_eq!(
        services,
        [
            ("dispatch", topic(&stack.topics().journey_actions).as_str()),
            ("watcher", topic(&stack.topics().invoices).as_str()),
            ("ingest", topic(&stack.topics().billing_invoice_events).as_str()),
        ],
        "dispatch's span, its parent and grandparent"
    );
    for span in &chain {
        assert_eq!(span.trace_id, dispatch.trace_id, "one trace");
        assert_eq!(span.kind, SpanKind::Consumer as i32, "{}", span.name);
        assert_eq!(attribute(span, "messaging.system"), Some("kafka"));
        assert_eq!(attribute(span, "messaging.operation.type"), Some("process"));
        assert!(span.name.starts_with("process "), "{}", span.name);
    }
    Ok(())
}
