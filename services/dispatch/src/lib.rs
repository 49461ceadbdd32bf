//! Dispatch: turns journey actions into messages. Before each send it claims an idempotency
//! key for (action, channel) and re-reads the invoice's journey state (the last look); a paid,
//! credited, cancelled or handed-over invoice yields a `SUPPRESSED` outcome instead of a
//! message. Every action ends as a `DispatchOutcome`.
//!
//! The exact guarantee: a provider is handed a given (action, channel) at most once. The
//! claim is taken atomically (`SET NX`) before the send and marked `sent` after it. The one
//! remaining window is a crash after the provider accepted the message and before `sent` was
//! recorded: the redelivered action finds the claim and reports `DUPLICATE` ("claimed, not
//! confirmed") rather than risk a second message. The e-mail's Message-ID is derived from the
//! action, so even a message re-sent by hand is recognisably the same one.

mod templates;

use std::time::Duration;

use forfall_platform::kafka::{Failure, Handler, Inbound, Outbound, run_consumer};
use forfall_platform::records::{DispatchOutcome, DispatchStatus, JourneyAction, derived_id};
use forfall_platform::redis_store::{self, Keys};
use forfall_platform::service::{Runtime, ServiceShell};
use forfall_platform::{config, journey_state};
use lettre::message::{Mailbox, header::ContentType};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

pub const SERVICE: &str = "dispatch";
pub const PORT_OFFSET: u16 = 3;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    /// `none` (dev only), `starttls` or `tls`.
    pub tls: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub from: String,
    pub timeout_ms: u64,
}

impl Default for SmtpSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 2525,
            tls: "none".into(),
            username: None,
            password: None,
            from: "Forfall <no-reply@forfall.invalid>".into(),
            timeout_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DispatchSettings {
    pub smtp: SmtpSettings,
    /// Domain of the derived Message-IDs.
    pub message_id_domain: String,
    /// How long an idempotency claim is remembered.
    pub idempotency_ttl_days: u64,
}

impl Default for DispatchSettings {
    fn default() -> Self {
        Self {
            smtp: SmtpSettings::default(),
            message_id_domain: "forfall.invalid".into(),
            idempotency_ttl_days: 90,
        }
    }
}

fn mailer(s: &SmtpSettings) -> anyhow::Result<AsyncSmtpTransport<Tokio1Executor>> {
    let builder = match s.tls.as_str() {
        "none" => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&s.host),
        "starttls" => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&s.host)?,
        "tls" => AsyncSmtpTransport::<Tokio1Executor>::relay(&s.host)?,
        other => anyhow::bail!("dispatch.smtp.tls is '{other}': expected none, starttls or tls"),
    };
    let mut builder = builder.port(s.port).timeout(Some(Duration::from_millis(s.timeout_ms)));
    if let (Some(user), Some(pass)) = (&s.username, &s.password) {
        builder = builder.credentials(Credentials::new(user.clone(), pass.clone()));
    }
    Ok(builder.build())
}

pub struct Dispatch {
    rt: Runtime,
    redis: ConnectionManager,
    keys: Keys,
    settings: DispatchSettings,
    from: Mailbox,
    mailer: AsyncSmtpTransport<Tokio1Executor>,
    outcomes_topic: String,
    outcomes: IntCounterVec,
    suppression_lag: Histogram,
    /// Actions whose journey write has not landed yet, and since when (real time).
    lagging: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

/// What happened on one channel.
struct ChannelResult {
    status: DispatchStatus,
    reason: Option<String>,
    provider_message_id: Option<String>,
    /// A redelivered action: nothing was sent this time (counted as a duplicate).
    redelivered: bool,
}

impl ChannelResult {
    fn new(status: DispatchStatus, reason: impl Into<Option<String>>) -> Self {
        Self {
            status,
            reason: reason.into(),
            provider_message_id: None,
            redelivered: false,
        }
    }
}

enum SendError {
    Permanent(String),
    Transient(anyhow::Error),
}

impl Dispatch {
    /// Whether this action has waited for the watcher's write long enough (30 s of real time).
    /// A write that never comes (the watcher lost a compare-and-set race and decided otherwise)
    /// must not hold the action forever: then the state as it is decides.
    fn waited_long_enough(&self, action_id: &str) -> bool {
        let mut waiting = self.lagging.lock().unwrap_or_else(|p| p.into_inner());
        if waiting.len() > 10_000 {
            waiting.retain(|_, since| since.elapsed() < Duration::from_secs(300));
        }
        waiting
            .entry(action_id.to_owned())
            .or_insert_with(std::time::Instant::now)
            .elapsed()
            >= Duration::from_secs(30)
    }

    fn claim_key(&self, action_id: &str, channel: &str) -> String {
        self.keys.key(&["dispatch", "claim", &format!("{action_id}:{channel}")])
    }

    fn ttl_secs(&self) -> u64 {
        self.settings.idempotency_ttl_days * 86_400
    }

    async fn set_claim(&self, key: &str, value: &str) -> Result<(), Failure> {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("EX")
            .arg(self.ttl_secs())
            .query_async(&mut self.redis.clone())
            .await?;
        Ok(())
    }

    async fn deliver(&self, action: &JourneyAction, channel: &str) -> Result<ChannelResult, Failure> {
        let key = self.claim_key(&action.action_id, channel);
        let claimed: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg("claimed")
            .arg("NX")
            .arg("EX")
            .arg(self.ttl_secs())
            .query_async(&mut self.redis.clone())
            .await?;
        if claimed.is_none() {
            let state: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut self.redis.clone()).await?;
            if let Some(message_id) = state.as_deref().and_then(|s| s.strip_prefix("sent:")) {
                // Sent before, perhaps by an attempt that died before reporting it: report SENT
                // again under the same event id, so the outcome is never lost, and send nothing.
                return Ok(ChannelResult {
                    status: DispatchStatus::Sent,
                    reason: Some("redelivered action: already sent, not sent again".to_owned()),
                    provider_message_id: Some(message_id.to_owned()),
                    redelivered: true,
                });
            }
            let reason = match state.as_deref() {
                Some("claimed") => "claimed by an earlier attempt that did not confirm; not sent again".to_owned(),
                Some(other) => format!("already handled ({other})"),
                None => "already handled".to_owned(),
            };
            let mut result = ChannelResult::new(DispatchStatus::Duplicate, reason);
            result.redelivered = true;
            return Ok(result);
        }
        // The last look: as late as possible, right before the provider is called.
        let look = journey_state::last_look(
            &mut self.redis.clone(),
            &self.keys,
            &action.tenant,
            &action.invoice_id,
            action.step_index,
        )
        .await?;
        if !look.caught_up && !self.waited_long_enough(&action.action_id) {
            // The watcher has produced this action but not yet stored the journey that includes
            // it: judge the state once it does. The claim is released so the retry may send.
            let _: () = redis::cmd("DEL").arg(&key).query_async(&mut self.redis.clone()).await?;
            return Err(Failure::Transient(anyhow::anyhow!(
                "journey state not yet updated for this action"
            )));
        }
        let status = look.status;
        if !journey_state::status_accepts_contact(status.as_deref()) {
            let reason = format!("invoice is {}", status.as_deref().unwrap_or("unknown to the watcher"));
            self.set_claim(&key, "suppressed").await?;
            self.suppression_lag
                .observe((self.rt.clock.now().timestamp_millis() - action.send_at).max(0) as f64 / 1000.0);
            return Ok(ChannelResult::new(DispatchStatus::Suppressed, reason));
        }
        let sent = match channel {
            "email" => self.send_email(action).await,
            other => Err(SendError::Permanent(format!("channel '{other}' is not available yet"))),
        };
        match sent {
            Ok(message_id) => {
                self.set_claim(&key, &format!("sent:{message_id}")).await?;
                Ok(ChannelResult {
                    status: DispatchStatus::Sent,
                    reason: None,
                    provider_message_id: Some(message_id),
                    redelivered: false,
                })
            }
            Err(SendError::Permanent(reason)) => {
                self.set_claim(&key, "failed").await?;
                Ok(ChannelResult::new(DispatchStatus::Failed, reason))
            }
            Err(SendError::Transient(e)) => {
                // Nothing reached the provider: release the claim so the retry may send.
                let _: () = redis::cmd("DEL").arg(&key).query_async(&mut self.redis.clone()).await?;
                Err(Failure::Transient(e))
            }
        }
    }

    async fn send_email(&self, action: &JourneyAction) -> Result<String, SendError> {
        let Some(address) = action.email.as_deref() else {
            return Err(SendError::Permanent("no e-mail address".into()));
        };
        let to: Mailbox = address
            .parse()
            .map_err(|_| SendError::Permanent("e-mail address is not valid".into()))?;
        let message_id = format!("<{}.email@{}>", action.action_id, self.settings.message_id_domain);
        let content = templates::render(action);
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(content.subject)
            .message_id(Some(message_id.clone()))
            .header(ContentType::TEXT_PLAIN)
            .body(content.body)
            .map_err(|e| SendError::Permanent(format!("cannot build the message: {e}")))?;
        match self.mailer.send(message).await {
            Ok(_) => Ok(message_id),
            Err(e) if e.is_permanent() => Err(SendError::Permanent(format!("SMTP server refused the message: {e}"))),
            Err(e) => Err(SendError::Transient(anyhow::anyhow!("SMTP send failed: {e}"))),
        }
    }
}

impl Handler for Dispatch {
    async fn handle(&self, record: &Inbound) -> Result<Vec<Outbound>, Failure> {
        let action: JourneyAction = self.rt.codec.decode(record.payload.as_deref()).await?.to()?;
        let mut outs = Vec::new();
        for channel in &action.channels {
            let result = self.deliver(&action, channel).await?;
            let status_label = format!("{:?}", result.status).to_lowercase();
            let metric_label = if result.redelivered {
                "duplicate"
            } else {
                status_label.as_str()
            };
            self.outcomes
                .with_label_values(&[&action.step, channel, metric_label])
                .inc();
            tracing::info!(step = %action.step, channel = %channel, status = %status_label, "dispatch outcome");
            let outcome = DispatchOutcome {
                event_id: derived_id("dispatch-outcome", &[&action.action_id, channel, &status_label]),
                tenant: action.tenant.clone(),
                debtor_id: action.debtor_id.clone(),
                occurred_at: self.rt.clock.now().timestamp_millis(),
                action_id: action.action_id.clone(),
                invoice_id: action.invoice_id.clone(),
                step: action.step.clone(),
                channel: channel.clone(),
                status: result.status,
                reason: result.reason,
                provider_message_id: result.provider_message_id,
            };
            outs.push(
                self.rt
                    .codec
                    .outbound(&self.outcomes_topic, &action.debtor_id, &outcome, record.trace)
                    .await?,
            );
            // The next channel is a fallback: only when this one could not deliver.
            if result.status != DispatchStatus::Failed {
                break;
            }
        }
        Ok(outs)
    }
}

/// Runs dispatch until shutdown.
pub async fn run(rt: Runtime) -> anyhow::Result<()> {
    let settings: DispatchSettings = config::section(&rt.figment, SERVICE)?;
    let shell = ServiceShell::start(&rt, SERVICE, PORT_OFFSET, None).await?;
    let outcomes = IntCounterVec::new(
        Opts::new(
            "dispatch_outcomes_total",
            "Dispatch outcomes, by step, channel and status",
        ),
        &["step", "channel", "status"],
    )?;
    let suppression_lag = Histogram::with_opts(HistogramOpts::new(
        "dispatch_suppressed_after_due_seconds",
        "For suppressed messages: time from the step falling due to the suppression (simulated time)",
    ))?;
    shell.metrics.registry.register(Box::new(outcomes.clone()))?;
    shell.metrics.registry.register(Box::new(suppression_lag.clone()))?;
    let from: Mailbox = settings
        .smtp
        .from
        .parse()
        .map_err(|e| anyhow::anyhow!("dispatch.smtp.from '{}' is not a mailbox: {e}", settings.smtp.from))?;
    let dispatch = Dispatch {
        redis: redis_store::connect(&rt.config.redis).await?,
        keys: rt.keys(),
        mailer: mailer(&settings.smtp)?,
        from,
        settings,
        outcomes_topic: rt.topic(&rt.config.topics.dispatch_outcomes),
        outcomes,
        suppression_lag,
        lagging: std::sync::Mutex::default(),
        rt: rt.clone(),
    };
    let consumer = shell.consumer(&rt, SERVICE, &[rt.topic(&rt.config.topics.journey_actions)])?;
    run_consumer(consumer, dispatch, shell.loop_context(&rt)).await?;
    shell.producer.flush(Duration::from_secs(5)).await;
    Ok(())
}
