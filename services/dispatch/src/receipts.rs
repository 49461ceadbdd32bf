//! Delivery receipts: providers call back when a message was delivered or could not be, each
//! in its own documented way, and each call is authenticated before anything in it is trusted
//! (GatewayAPI: an HS256 JWT in `X-Gwapi-Signature`; Twilio: `X-Twilio-Signature`; 46elks signs
//! nothing, so its callback URL carries a secret token; e-mail bounces and the tenant's webhook
//! report with our own `Forfall-Signature`). A receipt becomes a `DELIVERED` or `BOUNCED`
//! outcome; a bounce also sends the action on to its next channel.
//!
//! A receipt for a message not (yet) known answers 404, so the provider retries it later: the
//! receipt may overtake our own record of the send.

use std::collections::HashMap;
use std::sync::Arc;
use tracing::Instrument;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::routing::post;
use forfall_platform::derived_state::DerivedState;
use forfall_platform::kafka::Producer;
use forfall_platform::metrics::Metrics;
use forfall_platform::records::{DispatchStatus, JourneyAction, derived_id};
use forfall_platform::redis_store::Keys;
use forfall_platform::service::Runtime;
use forfall_platform::telemetry::TraceContext;
use hmac::Mac;
use prometheus::{IntCounterVec, Opts};
use redis::aio::ConnectionManager;

use crate::channels::{twilio_signature, verify_gatewayapi_jwt, verify_webhook_signature};
use crate::{DispatchSettings, SentMessage, sent_key};

pub struct Receipts {
    rt: Runtime,
    redis: ConnectionManager,
    keys: Keys,
    settings: DispatchSettings,
    outcomes_topic: String,
    actions_topic: String,
    /// Whether Redis holds dispatch's state: a receipt waits (503) while it is rebuilt rather
    /// than being refused as unknown.
    state: std::sync::OnceLock<Arc<DerivedState<crate::rebuild::DispatchRebuild>>>,
}

#[derive(Clone)]
struct ReceiptState {
    receipts: Arc<Receipts>,
    producer: Producer,
    counted: IntCounterVec,
}

/// What a provider said about a message.
enum Verdict {
    Delivered,
    Bounced(String),
    /// An intermediate state (queued, sent, en route): nothing to report yet.
    Pending,
}

type Reply = (StatusCode, String);

fn reply(status: StatusCode, text: impl Into<String>) -> Reply {
    (status, text.into())
}

impl Receipts {
    pub fn new(rt: &Runtime, redis: ConnectionManager, settings: &DispatchSettings) -> Self {
        Self {
            rt: rt.clone(),
            redis,
            keys: rt.keys(),
            settings: settings.clone(),
            outcomes_topic: rt.topic(&rt.config.topics.dispatch_outcomes),
            actions_topic: rt.topic(&rt.config.topics.journey_actions),
            state: std::sync::OnceLock::new(),
        }
    }

    pub(crate) fn set_state(&self, state: Arc<DerivedState<crate::rebuild::DispatchRebuild>>) {
        let _ = self.state.set(state);
    }

    pub fn router(self: Arc<Self>, metrics: &Metrics, producer: &Producer) -> Router {
        let counted = IntCounterVec::new(
            Opts::new(
                "dispatch_receipts_total",
                "Delivery receipts by provider and result (delivered, bounced, pending, unknown, refused)",
            ),
            &["provider", "result"],
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        // A second registration (a restarted service in one process) keeps the first.
        let _ = metrics.registry.register(Box::new(counted.clone()));
        let state = ReceiptState {
            receipts: self,
            producer: producer.clone(),
            counted,
        };
        Router::new()
            .route("/v1/receipts/gatewayapi", post(gatewayapi))
            .route("/v1/receipts/46elks", post(elks46))
            .route("/v1/receipts/twilio", post(twilio))
            .route("/v1/receipts/{channel}", post(signed))
            .route("/v1/receipts/webhook/{tenant}", post(signed_by_tenant))
            .with_state(state)
    }
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    // HMAC both and compare tags, so the time taken does not depend on where they differ.
    let tag = |s: &str| {
        let mut m = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(b"forfall-compare")
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        m.update(s.as_bytes());
        m.finalize().into_bytes()
    };
    tag(a) == tag(b)
}

async fn gatewayapi(State(s): State<ReceiptState>, headers: HeaderMap, body: Bytes) -> Reply {
    let provider = "gatewayapi";
    let Some(jwt) = headers.get("X-Gwapi-Signature").and_then(|v| v.to_str().ok()) else {
        s.counted.with_label_values(&[provider, "refused"]).inc();
        return reply(StatusCode::UNAUTHORIZED, "X-Gwapi-Signature is missing");
    };
    let Some(claims) = verify_gatewayapi_jwt(&s.receipts.settings.receipts.gatewayapi_secret, jwt) else {
        s.counted.with_label_values(&[provider, "refused"]).inc();
        return reply(StatusCode::UNAUTHORIZED, "X-Gwapi-Signature does not verify");
    };
    let Ok(notification) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return reply(StatusCode::BAD_REQUEST, "the body is not JSON");
    };
    // The JWT covers the fields, not the bytes: the body must say what the token says.
    if claims.get("id") != notification.get("id") || claims.get("status") != notification.get("status") {
        s.counted.with_label_values(&[provider, "refused"]).inc();
        return reply(StatusCode::UNAUTHORIZED, "the body does not match the signed claims");
    }
    let id = match notification.get("id") {
        Some(serde_json::Value::Number(n)) => n.to_string(),
        Some(serde_json::Value::String(s)) => s.clone(),
        _ => return reply(StatusCode::BAD_REQUEST, "the notification has no id"),
    };
    let status = notification.get("status").and_then(|v| v.as_str()).unwrap_or("");
    let verdict = match status {
        "DELIVERED" => Verdict::Delivered,
        "UNDELIVERABLE" | "EXPIRED" | "REJECTED" | "DELETED" | "SKIPPED" => {
            let detail = notification.get("error").and_then(|v| v.as_str()).unwrap_or("");
            Verdict::Bounced(format!("gatewayapi: {status} {detail}").trim().to_owned())
        }
        _ => Verdict::Pending,
    };
    s.record(provider, &id, verdict).await
}

async fn elks46(State(s): State<ReceiptState>, Query(query): Query<HashMap<String, String>>, body: Bytes) -> Reply {
    let provider = "46elks";
    let expected = &s.receipts.settings.receipts.elks46_token;
    if !query.get("token").is_some_and(|t| constant_time_eq(t, expected)) {
        s.counted.with_label_values(&[provider, "refused"]).inc();
        return reply(StatusCode::UNAUTHORIZED, "the receipt URL's token is missing or wrong");
    }
    let form: HashMap<String, String> = serde_urlencoded_pairs(&body).into_iter().collect();
    let Some(id) = form.get("id") else {
        return reply(StatusCode::BAD_REQUEST, "the report has no id");
    };
    let verdict = match form.get("status").map(String::as_str) {
        Some("delivered") => Verdict::Delivered,
        Some("failed") => Verdict::Bounced("46elks: failed".into()),
        _ => Verdict::Pending,
    };
    s.record(provider, id, verdict).await
}

async fn twilio(State(s): State<ReceiptState>, uri: Uri, headers: HeaderMap, body: Bytes) -> Reply {
    let provider = "twilio";
    let token = s
        .receipts
        .settings
        .sms
        .twilio
        .as_ref()
        .and_then(|t| t.password.clone())
        .unwrap_or_default();
    let params = serde_urlencoded_pairs(&body);
    let base = s.receipts.settings.receipts.base_url.clone().unwrap_or_else(|| {
        let host = headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("");
        format!("http://{host}")
    });
    let url = format!("{}{}", base.trim_end_matches('/'), uri);
    let signed = headers.get("X-Twilio-Signature").and_then(|v| v.to_str().ok());
    if !signed.is_some_and(|sig| constant_time_eq(sig, &twilio_signature(&token, &url, &params))) {
        s.counted.with_label_values(&[provider, "refused"]).inc();
        return reply(
            StatusCode::FORBIDDEN,
            "X-Twilio-Signature is missing or does not verify",
        );
    }
    let form: HashMap<String, String> = params.into_iter().collect();
    let Some(id) = form.get("MessageSid") else {
        return reply(StatusCode::BAD_REQUEST, "the callback has no MessageSid");
    };
    let verdict = match form.get("MessageStatus").map(String::as_str) {
        Some("delivered") => Verdict::Delivered,
        Some(status @ ("undelivered" | "failed")) => Verdict::Bounced(format!(
            "twilio: {status} (error {})",
            form.get("ErrorCode").map(String::as_str).unwrap_or("none")
        )),
        _ => Verdict::Pending,
    };
    s.record(provider, id, verdict).await
}

#[derive(serde::Deserialize)]
struct SignedReceipt {
    /// The Message-ID (e-mail) or the id the webhook receiver returned.
    message_id: String,
    /// `delivered` or `bounced`.
    status: String,
    reason: Option<String>,
}

/// Who signed a `Forfall-Signature` receipt, and so whose messages it may speak of.
#[derive(Clone, Copy)]
enum Signer<'a> {
    /// The shared webhook secret: e-mail bounces (our own bounce processor), and the webhook
    /// receipts of tenants without a secret of their own.
    Shared,
    /// A tenant's webhook secret (its own, or the shared one when it has none): its messages only.
    Tenant(&'a str),
}

/// E-mail bounces (from the mail system's bounce processor) and the webhook receipts of tenants
/// without a secret of their own, signed with the shared webhook secret.
async fn signed(State(s): State<ReceiptState>, Path(channel): Path<String>, headers: HeaderMap, body: Bytes) -> Reply {
    if channel != "email" && channel != "webhook" {
        return reply(StatusCode::NOT_FOUND, format!("no receipts for '{channel}'"));
    }
    let secret = s.receipts.settings.webhook.secret.clone();
    take_signed(&s, &channel, Signer::Shared, &secret, &headers, &body).await
}

/// A tenant's webhook receiver reporting on its messages, signed with the tenant's secret.
async fn signed_by_tenant(
    State(s): State<ReceiptState>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Reply {
    let secret = s.receipts.settings.webhook_secret(&tenant).to_owned();
    take_signed(&s, "webhook", Signer::Tenant(&tenant), &secret, &headers, &body).await
}

async fn take_signed(
    s: &ReceiptState,
    channel: &str,
    signer: Signer<'_>,
    secret: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Reply {
    let now = s.receipts.rt.clock.now().timestamp();
    let valid = headers
        .get("Forfall-Signature")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|h| verify_webhook_signature(secret, h, body, now, 300));
    if !valid {
        s.counted.with_label_values(&[channel, "refused"]).inc();
        return reply(
            StatusCode::UNAUTHORIZED,
            "Forfall-Signature is missing, stale or does not verify",
        );
    }
    let receipt: SignedReceipt = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return reply(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("the receipt is not valid: {e}"),
            );
        }
    };
    let verdict = match receipt.status.as_str() {
        "delivered" => Verdict::Delivered,
        "bounced" => Verdict::Bounced(format!(
            "{channel}: bounced {}",
            receipt.reason.as_deref().unwrap_or("")
        )),
        other => {
            return reply(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("status '{other}' is not delivered or bounced"),
            );
        }
    };
    s.record_signed(channel, &receipt.message_id, verdict, signer).await
}

/// `application/x-www-form-urlencoded` pairs, in order (Twilio signs over them all).
fn serde_urlencoded_pairs(body: &[u8]) -> Vec<(String, String)> {
    serde_urlencoded::from_bytes(body).unwrap_or_default()
}

impl ReceiptState {
    async fn record(&self, provider: &str, provider_message_id: &str, verdict: Verdict) -> Reply {
        self.record_signed(provider, provider_message_id, verdict, Signer::Shared)
            .await
    }

    /// Records a receipt about a message the signer may speak of; any other is unknown to it.
    async fn record_signed(
        &self,
        provider: &str,
        provider_message_id: &str,
        verdict: Verdict,
        signer: Signer<'_>,
    ) -> Reply {
        let result = match &verdict {
            Verdict::Delivered => "delivered",
            Verdict::Bounced(_) => "bounced",
            Verdict::Pending => "pending",
        };
        if matches!(verdict, Verdict::Pending) {
            self.counted.with_label_values(&[provider, result]).inc();
            return reply(StatusCode::OK, "noted");
        }
        match self.apply(provider, provider_message_id, verdict, signer).await {
            Ok(true) => {
                self.counted.with_label_values(&[provider, result]).inc();
                reply(StatusCode::OK, "recorded")
            }
            Ok(false) => {
                self.counted.with_label_values(&[provider, "unknown"]).inc();
                reply(StatusCode::NOT_FOUND, "no message with this id (yet)")
            }
            Err(e) => {
                tracing::warn!(provider, error = %e, "receipt not recorded");
                reply(StatusCode::SERVICE_UNAVAILABLE, "try again later")
            }
        }
    }

    async fn apply(
        &self,
        provider: &str,
        provider_message_id: &str,
        verdict: Verdict,
        signer: Signer<'_>,
    ) -> anyhow::Result<bool> {
        let r = &self.receipts;
        if let Some(state) = r.state.get() {
            state
                .ensure_ready()
                .await
                .map_err(|e| anyhow::anyhow!("dispatch's state is being rebuilt: {e:?}"))?;
        }
        let stored: Option<String> = redis::cmd("GET")
            .arg(sent_key(&r.keys, provider, provider_message_id))
            .query_async(&mut r.redis.clone())
            .await?;
        let Some(stored) = stored else {
            return Ok(false);
        };
        let SentMessage { action, channel } = serde_json::from_str(&stored)?;
        let own_secret = |tenant: &str| {
            r.settings
                .tenants
                .get(tenant)
                .is_some_and(|t| t.webhook_secret.is_some())
        };
        let signer_may_speak = match signer {
            Signer::Tenant(tenant) => action.tenant == tenant,
            // A tenant with its own secret reports on its own route, signed with it.
            Signer::Shared => provider != "webhook" || !own_secret(&action.tenant),
        };
        if !signer_may_speak {
            return Ok(false);
        }
        let (status, label, reason) = match verdict {
            Verdict::Delivered => (DispatchStatus::Delivered, "delivered", None),
            Verdict::Bounced(reason) => (DispatchStatus::Bounced, "bounced", Some(reason)),
            Verdict::Pending => return Ok(true),
        };
        let span = tracing::info_span!("receipt", provider, step = %action.step, channel = %channel, status = label);
        async move {
            let trace = TraceContext::new_root();
            let outcome = crate::outcome_of(
                &action,
                &channel,
                status,
                reason.clone(),
                Some(provider_message_id.to_owned()),
                r.rt.clock.now().timestamp_millis(),
            );
            let mut outs = vec![
                r.rt.codec
                    .outbound(&r.outcomes_topic, &action.debtor_id, &outcome, trace)
                    .await?,
            ];
            if status == DispatchStatus::Bounced {
                // The bounced channel is done for this action; the next one is its fallback.
                let _: () = redis::cmd("SET")
                    .arg(crate::claim_key(&r.keys, &action.action_id, &channel))
                    .arg(format!("failed:{}", reason.unwrap_or_default()))
                    .arg("EX")
                    .arg(r.settings.idempotency_ttl_days * 86_400)
                    .query_async(&mut r.redis.clone())
                    .await?;
                let rest: Vec<String> = action
                    .channels
                    .iter()
                    .skip_while(|c| **c != channel)
                    .skip(1)
                    .cloned()
                    .collect();
                if !rest.is_empty() {
                    let fallback = JourneyAction {
                        event_id: derived_id("action-fallback", &[&action.action_id, &channel]),
                        channels: rest,
                        ..action.clone()
                    };
                    outs.push(
                        r.rt.codec
                            .outbound(&r.actions_topic, &action.debtor_id, &fallback, trace)
                            .await?,
                    );
                }
            }
            for out in &outs {
                self.producer
                    .send(out)
                    .await
                    .await
                    .map_err(|e| anyhow::anyhow!("producing the receipt's outcome: {e}"))?;
            }
            tracing::info!("delivery receipt recorded");
            Ok(true)
        }
        .instrument(span)
        .await
    }
}
