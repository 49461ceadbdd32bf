//! Dispatch: turns journey actions into messages. Before each send it claims an idempotency
//! key for (action, channel) and re-reads the invoice's journey state (the last look); a paid,
//! credited, cancelled or handed-over invoice yields a `SUPPRESSED` outcome instead of a
//! message. Every action ends as a `DispatchOutcome`.
//!
//! The exact guarantee: a provider is handed a given (action, channel) at most once. The
//! claim (one Redis key per action and channel) moves `claimed` → `sending` → `sent` (or
//! `failed`, `suppressed`):
//! - `claimed:<attempt>` is taken atomically (`SET NX`) with a short lease before the last look.
//!   An attempt that stops there has called no provider: when the lease runs out the
//!   redelivered action claims it again and sends.
//! - `sending:<attempt>` is written (compare-and-set from this attempt's own lease) right before
//!   the provider is called, and `sent:<id>` right after it answers.
//!
//! The one remaining window is a stop *during* the provider call (between `sending` and
//! `sent`): the provider may or may not have taken the message, so the redelivered action
//! reports `DUPLICATE` ("delivery unknown, not sent again") rather than risk a second one.
//! The e-mail's Message-ID is derived from the action, so even a message re-sent by hand is
//! recognisably the same one.

pub mod channels;
pub mod content;
mod deferral;
mod message;
mod ratelimit;
mod receipts;
mod smtp;

use std::time::Duration;

use std::sync::Arc;

use channels::{SendError, Sms, SmsProvider, SmsProviderKind, Webhook};
use content::Templates;
use forfall_domain::Jurisdiction;
use forfall_domain::calendar::{ContactHours, next_contact_moment};
use forfall_platform::kafka::{Failure, Handler, Inbound, Outbound, run_consumer};
use forfall_platform::records::{DispatchOutcome, DispatchStatus, JourneyAction, derived_id};
use forfall_platform::redis_store::{self, Keys};
use forfall_platform::service::{Runtime, ServiceShell};
use forfall_platform::{config, journey_state};
use lettre::Message;
use lettre::message::{Mailbox, MultiPart};
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

/// What a tenant's messages say about the creditor.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TenantProfile {
    /// The creditor's name as debtors know it.
    pub name: Option<String>,
    /// Bank details for a transfer, e.g. "Reg. 1234 konto 0001234567" or an IBAN.
    pub bank_account: Option<String>,
    /// Where debtors can ask questions (phone or e-mail).
    pub contact: Option<String>,
    /// The tenant's own endpoint for the webhook channel.
    pub webhook_url: Option<String>,
    /// SMS provider for this tenant, overriding `dispatch.sms.provider`.
    pub sms_provider: Option<channels::SmsProviderKind>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct PayLinkSettings {
    /// The self-service page; the token is appended.
    pub base_url: String,
    pub key_id: String,
    /// Signing secret (set `FORFALL_DISPATCH__PAY_LINK__SECRET` in production; never logged).
    pub secret: String,
    pub ttl_days: i64,
}

impl Default for PayLinkSettings {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:8096/pay/".into(),
            key_id: "dev".into(),
            secret: "forfall-dev-pay-link-secret".into(),
            ttl_days: 60,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SmsSettings {
    /// The provider used when the tenant names none.
    pub provider: Option<channels::SmsProviderKind>,
    pub gatewayapi: Option<channels::SmsProviderSettings>,
    #[serde(rename = "46elks")]
    pub elks46: Option<channels::SmsProviderSettings>,
    pub twilio: Option<channels::SmsProviderSettings>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RetrySettings {
    /// Attempts per channel on transient errors before the channel counts as failed.
    pub attempts: u32,
    pub first_ms: u64,
    pub max_ms: u64,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            attempts: 5,
            first_ms: 200,
            max_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ReceiptSettings {
    /// How providers reach this service's receipt endpoints (default: its admin address).
    pub base_url: Option<String>,
    /// Secret that 46elks must echo in the `token` query parameter (it signs nothing).
    pub elks46_token: String,
    /// Key of GatewayAPI's `X-Gwapi-Signature` JWT (the webhook's token in its dashboard).
    pub gatewayapi_secret: String,
    /// How long a sent message can still receive a receipt.
    pub remember_days: u64,
}

impl Default for ReceiptSettings {
    fn default() -> Self {
        Self {
            base_url: None,
            elks46_token: "forfall-dev-46elks-receipt-token".into(),
            gatewayapi_secret: "forfall-dev-gatewayapi-receipt-secret".into(),
            remember_days: 14,
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
    /// Tenants' own templates: `<dir>/<tenant>/<language>.toml`.
    pub templates_dir: Option<String>,
    /// Templates whose SMS would need more segments are refused at load.
    pub max_sms_segments: usize,
    pub pay_link: PayLinkSettings,
    pub tenants: std::collections::BTreeMap<String, TenantProfile>,
    pub sms: SmsSettings,
    pub webhook: channels::WebhookSettings,
    pub retry: RetrySettings,
    pub receipts: ReceiptSettings,
    /// Contact hours per jurisdiction (DK, NO, SE, FI), overriding the domain's defaults.
    pub contact_hours: std::collections::BTreeMap<String, ContactHours>,
    /// How often actions held for contact hours are looked at.
    pub deferred_poll_ms: u64,
    /// How long a claim protects a message before its provider is called: an attempt that
    /// stops in that time frees the message for the redelivery once the lease runs out.
    pub claim_lease_ms: u64,
    /// Actions handled at once (one debtor's in order): sending waits mostly on the network.
    pub concurrency: usize,
    /// For benchmarks only: `false` sends without claims and without the last look, to measure
    /// what they cost. Never in production: messages may then go out twice or after payment.
    pub idempotency: bool,
}

impl Default for DispatchSettings {
    fn default() -> Self {
        Self {
            smtp: SmtpSettings::default(),
            message_id_domain: "forfall.invalid".into(),
            idempotency_ttl_days: 90,
            templates_dir: None,
            max_sms_segments: 3,
            pay_link: PayLinkSettings::default(),
            tenants: Default::default(),
            sms: SmsSettings::default(),
            webhook: channels::WebhookSettings::default(),
            retry: RetrySettings::default(),
            receipts: ReceiptSettings::default(),
            contact_hours: Default::default(),
            deferred_poll_ms: 500,
            claim_lease_ms: 5_000,
            concurrency: 16,
            idempotency: true,
        }
    }
}

pub struct Dispatch {
    rt: Runtime,
    redis: ConnectionManager,
    keys: Keys,
    settings: DispatchSettings,
    templates: Templates,
    from: Mailbox,
    mailer: smtp::SmtpClient,
    sms: Vec<SmsProvider>,
    webhook: Webhook,
    receipts_base: String,
    outcomes_topic: String,
    outcomes: IntCounterVec,
    deferred: IntCounterVec,
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

/// The point after which a stop leaves a delivery unknown: the claim moves from this attempt's
/// lease to `sending`, right before the provider can have the message. Idempotent, so that a
/// retried send commits again harmlessly.
struct Commit<'a> {
    dispatch: &'a Dispatch,
    key: &'a str,
    lease: &'a str,
    sending: String,
}

impl Commit<'_> {
    async fn commit(&self) -> Result<(), SendError> {
        if !self.dispatch.settings.idempotency {
            return Ok(());
        }
        let lost = |e: Failure| SendError::Transient(format!("cannot record the send's start: {e:?}"));
        if self
            .dispatch
            .move_claim(self.key, self.lease, &self.sending)
            .await
            .map_err(lost)?
        {
            return Ok(());
        }
        let state: Option<String> = redis::cmd("GET")
            .arg(self.key)
            .query_async(&mut self.dispatch.redis.clone())
            .await
            .map_err(|e| lost(e.into()))?;
        if state.as_deref() == Some(self.sending.as_str()) {
            Ok(())
        } else {
            // The lease ran out and the claim moved on: this attempt must not send.
            Err(SendError::Transient("the claim's lease ran out before the send".into()))
        }
    }
}

/// An action's outcome on a channel. The event id derives from (action, channel, status), so
/// a redelivered action's outcome is the same event.
pub(crate) fn outcome_of(
    action: &JourneyAction,
    channel: &str,
    status: DispatchStatus,
    reason: Option<String>,
    provider_message_id: Option<String>,
    now_ms: i64,
) -> DispatchOutcome {
    let label = format!("{status:?}").to_lowercase();
    DispatchOutcome {
        event_id: derived_id("dispatch-outcome", &[&action.action_id, channel, &label]),
        tenant: action.tenant.clone(),
        debtor_id: action.debtor_id.clone(),
        occurred_at: now_ms,
        action_id: action.action_id.clone(),
        invoice_id: action.invoice_id.clone(),
        step: action.step.clone(),
        channel: channel.to_owned(),
        status,
        reason,
        provider_message_id,
    }
}

/// What a receipt needs to find its action again: stored per provider message id.
#[derive(Serialize, Deserialize)]
pub(crate) struct SentMessage {
    pub action: JourneyAction,
    pub channel: String,
}

/// The idempotency claim of one (action, channel).
pub(crate) fn claim_key(keys: &Keys, action_id: &str, channel: &str) -> String {
    keys.key(&["dispatch", "claim", &format!("{action_id}:{channel}")])
}

pub(crate) fn sent_key(keys: &Keys, provider: &str, provider_message_id: &str) -> String {
    keys.key(&["dispatch", "sent", provider, provider_message_id])
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

    /// When the debtor's contact hours forbid contact now: the next allowed moment.
    fn outside_contact_hours(&self, action: &JourneyAction) -> Result<Option<chrono::DateTime<chrono::Utc>>, Failure> {
        let jurisdiction: Jurisdiction = action.jurisdiction.parse().map_err(|_| {
            Failure::reject(
                "unknown_jurisdiction",
                format!(
                    "action {}: jurisdiction '{}' is not DK, NO, SE or FI",
                    action.action_id, action.jurisdiction
                ),
            )
        })?;
        let hours = self
            .settings
            .contact_hours
            .get(jurisdiction.code())
            .copied()
            .unwrap_or_else(|| ContactHours::default_for(jurisdiction));
        let now = self.rt.clock.now();
        match next_contact_moment(&hours, jurisdiction, now) {
            Some(moment) if moment > now => Ok(Some(moment)),
            Some(_) => Ok(None),
            None => Err(Failure::reject(
                "no_contact_hours",
                format!("the contact hours for {} allow no contact at all", jurisdiction.code()),
            )),
        }
    }

    fn claim_key(&self, action_id: &str, channel: &str) -> String {
        claim_key(&self.keys, action_id, channel)
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

    fn profile(&self, tenant: &str) -> TenantProfile {
        self.settings.tenants.get(tenant).cloned().unwrap_or_default()
    }

    fn sms_provider(&self, tenant: &str) -> Option<&SmsProvider> {
        let kind = self.profile(tenant).sms_provider.or(self.settings.sms.provider)?;
        self.sms.iter().find(|p| p.kind == kind)
    }

    /// Moves the claim from `from` to `to` (deleting it when `to` is empty) only if it still
    /// holds `from`: an attempt whose lease ran out must not overwrite its successor's claim.
    async fn move_claim(&self, key: &str, from: &str, to: &str) -> Result<bool, Failure> {
        static MOVE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                r"if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
                  if ARGV[2] == '' then redis.call('DEL', KEYS[1])
                  else redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) end
                  return 1",
            )
        });
        let moved: i32 = MOVE
            .key(key)
            .arg(from)
            .arg(to)
            .arg(self.ttl_secs())
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(moved == 1)
    }

    /// What a redelivered action finds when its claim is taken.
    async fn claimed_before(&self, key: &str) -> Result<ChannelResult, Failure> {
        let state: Option<String> = redis::cmd("GET").arg(key).query_async(&mut self.redis.clone()).await?;
        let state = state.unwrap_or_default();
        let redelivered = |status, reason: String, provider_message_id: Option<String>| ChannelResult {
            status,
            reason: Some(reason),
            provider_message_id,
            redelivered: true,
        };
        if let Some(message_id) = state.strip_prefix("sent:") {
            // Sent before, perhaps by an attempt that died before reporting it: report SENT
            // again under the same event id, so the outcome is never lost, and send nothing.
            return Ok(redelivered(
                DispatchStatus::Sent,
                "redelivered action: already sent, not sent again".to_owned(),
                Some(message_id.to_owned()),
            ));
        }
        if let Some(reason) = state.strip_prefix("suppressed:") {
            // Suppressed before, perhaps by an attempt that died before reporting it.
            return Ok(redelivered(DispatchStatus::Suppressed, reason.to_owned(), None));
        }
        if let Some(reason) = state.strip_prefix("failed:") {
            // A fallback after a bounce comes back through here: the failed channel stays
            // failed and the next one is tried.
            return Ok(redelivered(DispatchStatus::Failed, reason.to_owned(), None));
        }
        if state.starts_with("sending:") {
            // The one window: an attempt stopped while the provider was being called. Whether
            // the provider took the message is unknown, and sending again could make it two.
            return Ok(redelivered(
                DispatchStatus::Duplicate,
                "an earlier attempt stopped while the provider was being called: delivery unknown, not sent again"
                    .to_owned(),
                None,
            ));
        }
        if state.starts_with("claimed:") || state.is_empty() {
            // Another attempt holds the lease, or held it and stopped before calling the
            // provider: wait for it to finish or for its lease to run out, then decide.
            return Err(Failure::Transient(anyhow::anyhow!(
                "another attempt holds this message's claim; waiting for it or its lease"
            )));
        }
        Ok(redelivered(
            DispatchStatus::Duplicate,
            format!("already handled ({state})"),
            None,
        ))
    }

    async fn deliver(&self, action: &JourneyAction, channel: &str) -> Result<ChannelResult, Failure> {
        let key = self.claim_key(&action.action_id, channel);
        if !self.settings.idempotency {
            let commit = Commit {
                dispatch: self,
                key: &key,
                lease: "",
                sending: String::new(),
            };
            return Ok(match self.send_with_retries(action, channel, &commit).await {
                Ok(id) => ChannelResult {
                    status: DispatchStatus::Sent,
                    reason: None,
                    provider_message_id: Some(id),
                    redelivered: false,
                },
                Err(SendError::Permanent(reason) | SendError::Transient(reason)) => {
                    ChannelResult::new(DispatchStatus::Failed, reason)
                }
            });
        }
        let lease = format!("claimed:{}", uuid::Uuid::new_v4().simple());
        // A short lease: an attempt that stops before calling the provider frees the message
        // for the redelivery once it runs out.
        let claimed: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(&lease)
            .arg("NX")
            .arg("PX")
            .arg(self.settings.claim_lease_ms)
            .query_async(&mut self.redis.clone())
            .await?;
        if claimed.is_none() {
            return self.claimed_before(&key).await;
        }
        // The last look: as late as possible, right before the provider is called. A combined
        // action's other invoices are looked at too, in the same round trip.
        let mut invoices = vec![(action.invoice_id.as_str(), action.step_index)];
        invoices.extend(action.covers.iter().map(|c| (c.invoice_id.as_str(), -1)));
        let looks = journey_state::last_looks(&mut self.redis.clone(), &self.keys, &action.tenant, &invoices).await?;
        let caught_up = looks.first().is_none_or(|l| l.caught_up);
        if !caught_up && !self.waited_long_enough(&action.action_id) {
            // The watcher has produced this action but not yet stored the journey that includes
            // it: judge the state once it does. The claim is released so the retry may send.
            self.move_claim(&key, &lease, "").await?;
            return Err(Failure::Transient(anyhow::anyhow!(
                "journey state not yet updated for this action"
            )));
        }
        let statuses: Vec<Option<String>> = looks.into_iter().map(|l| l.status).collect();
        let Some(current) = message::still_open(action, &statuses) else {
            let status = statuses.first().cloned().flatten();
            let reason = format!("invoice is {}", status.as_deref().unwrap_or("unknown to the watcher"));
            self.set_claim(&key, &format!("suppressed:{reason}")).await?;
            self.suppression_lag
                .observe((self.rt.clock.now().timestamp_millis() - action.send_at).max(0) as f64 / 1000.0);
            return Ok(ChannelResult::new(DispatchStatus::Suppressed, reason));
        };
        let action = &current;
        let commit = Commit {
            dispatch: self,
            sending: format!("sending:{}", &lease["claimed:".len()..]),
            key: &key,
            lease: &lease,
        };
        let sent = self.send_with_retries(action, channel, &commit).await;
        match sent {
            Ok(message_id) => {
                self.set_claim(&key, &format!("sent:{message_id}")).await?;
                self.remember_sent(action, channel, &message_id).await?;
                Ok(ChannelResult {
                    status: DispatchStatus::Sent,
                    reason: None,
                    provider_message_id: Some(message_id),
                    redelivered: false,
                })
            }
            Err(SendError::Permanent(reason)) => {
                self.set_claim(&key, &format!("failed:{reason}")).await?;
                Ok(ChannelResult::new(DispatchStatus::Failed, reason))
            }
            Err(SendError::Transient(reason)) => {
                // Retried as often as configured and the provider still could not take it: this
                // channel failed for this action (the next one is the fallback). Nothing
                // reached the provider as far as anyone can tell, but it is not tried again.
                let reason = format!(
                    "gave up after {} attempts: {reason}",
                    self.settings.retry.attempts.max(1)
                );
                self.set_claim(&key, &format!("failed:{reason}")).await?;
                Ok(ChannelResult::new(DispatchStatus::Failed, reason))
            }
        }
    }

    /// Transient errors are retried with exponential backoff and full jitter; a shutdown
    /// meanwhile leaves the claim to the redelivery.
    async fn send_with_retries(
        &self,
        action: &JourneyAction,
        channel: &str,
        commit: &Commit<'_>,
    ) -> Result<String, SendError> {
        let retry = &self.settings.retry;
        let mut attempt = 0u32;
        loop {
            match self.send_once(action, channel, commit).await {
                Err(SendError::Transient(reason)) if attempt + 1 < retry.attempts => {
                    let cap = retry.first_ms.saturating_mul(1u64 << attempt.min(20)).min(retry.max_ms);
                    let wait = Duration::from_millis((cap as f64 * rand::random::<f64>().max(0.1)) as u64);
                    tracing::warn!(channel, attempt, wait_ms = wait.as_millis() as u64, %reason, "transient send failure, retrying");
                    attempt += 1;
                    tokio::time::sleep(wait).await;
                }
                other => return other,
            }
        }
    }

    async fn send_once(&self, action: &JourneyAction, channel: &str, commit: &Commit<'_>) -> Result<String, SendError> {
        let profile = self.profile(&action.tenant);
        let ctx = message::context(action, &profile, &self.settings.pay_link, self.rt.clock.now());
        let content = self
            .templates
            .render(&action.tenant, &ctx)
            .map_err(|e| SendError::Permanent(format!("the message cannot be rendered: {e}")))?;
        let reference = format!("{}:{channel}", action.action_id);
        match channel {
            "email" => self.send_email(action, &content, commit).await,
            "sms" => {
                let Some(provider) = self.sms_provider(&action.tenant) else {
                    return Err(SendError::Permanent("no SMS provider is configured".into()));
                };
                let Some(phone) = action.phone.as_deref() else {
                    return Err(SendError::Permanent("no mobile number".into()));
                };
                let callback_url = match provider.kind {
                    SmsProviderKind::Elks46 => Some(format!(
                        "{}/v1/receipts/46elks?token={}",
                        self.receipts_base, self.settings.receipts.elks46_token
                    )),
                    kind => Some(format!("{}/v1/receipts/{}", self.receipts_base, kind.name())),
                };
                commit.commit().await?;
                provider
                    .send(&Sms {
                        to: phone,
                        text: &content.sms,
                        reference: &reference,
                        callback_url,
                    })
                    .await
            }
            "webhook" => {
                let Some(url) = profile.webhook_url.as_deref() else {
                    return Err(SendError::Permanent("the tenant has no webhook_url".into()));
                };
                let body = message::webhook_body(action, &ctx, &content);
                commit.commit().await?;
                self.webhook
                    .send(url, &reference, &body, self.rt.clock.now().timestamp())
                    .await
            }
            other => Err(SendError::Permanent(format!("unknown channel '{other}'"))),
        }
    }

    /// Remembers what was sent under the provider's id, for its delivery receipt.
    async fn remember_sent(&self, action: &JourneyAction, channel: &str, message_id: &str) -> Result<(), Failure> {
        let provider = match channel {
            "sms" => self
                .sms_provider(&action.tenant)
                .map(|p| p.kind.name())
                .unwrap_or("sms"),
            other => other,
        };
        let value = serde_json::to_string(&SentMessage {
            action: action.clone(),
            channel: channel.to_owned(),
        })
        .map_err(|e| Failure::Fatal(e.into()))?;
        let _: () = redis::cmd("SET")
            .arg(sent_key(&self.keys, provider, message_id))
            .arg(value)
            .arg("EX")
            .arg(self.settings.receipts.remember_days * 86_400)
            .query_async(&mut self.redis.clone())
            .await?;
        Ok(())
    }

    async fn send_email(
        &self,
        action: &JourneyAction,
        content: &content::Content,
        commit: &Commit<'_>,
    ) -> Result<String, SendError> {
        let Some(address) = action.email.as_deref() else {
            return Err(SendError::Permanent("no e-mail address".into()));
        };
        let to: Mailbox = address
            .parse()
            .map_err(|_| SendError::Permanent("e-mail address is not valid".into()))?;
        let message_id = format!("<{}.email@{}>", action.action_id, self.settings.message_id_domain);
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(content.subject.clone())
            .message_id(Some(message_id.clone()))
            .multipart(MultiPart::alternative_plain_html(
                content.text.clone(),
                content.html.clone(),
            ))
            .map_err(|e| SendError::Permanent(format!("cannot build the message: {e}")))?;
        self.mailer.send(&message, || commit.commit()).await?;
        Ok(message_id)
    }
}

impl Handler for Dispatch {
    async fn handle(&self, record: &Inbound) -> Result<Vec<Outbound>, Failure> {
        let action: JourneyAction = self.rt.codec.decode(record.payload.as_deref()).await?.to()?;
        if let Some(until) = self.outside_contact_hours(&action)? {
            deferral::hold(&mut self.redis.clone(), &self.keys, &action, until).await?;
            self.deferred.with_label_values(&[&action.jurisdiction]).inc();
            tracing::info!(step = %action.step, until = %until, "outside the debtor's contact hours: held");
            return Ok(Vec::new());
        }
        let mut outs = Vec::new();
        if action.channels.is_empty() {
            // The debtor declined every channel this step may use: on record, not silent.
            let outcome = outcome_of(
                &action,
                "none",
                DispatchStatus::Failed,
                Some("the debtor declined every channel this step may use".into()),
                None,
                self.rt.clock.now().timestamp_millis(),
            );
            self.outcomes.with_label_values(&[&action.step, "none", "failed"]).inc();
            outs.push(
                self.rt
                    .codec
                    .outbound(&self.outcomes_topic, &action.debtor_id, &outcome, record.trace)
                    .await?,
            );
            return Ok(outs);
        }
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
            let outcome = outcome_of(
                &action,
                channel,
                result.status,
                result.reason,
                result.provider_message_id,
                self.rt.clock.now().timestamp_millis(),
            );
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

fn sms_providers(settings: &SmsSettings) -> anyhow::Result<Vec<SmsProvider>> {
    let mut providers = Vec::new();
    for (kind, s) in [
        (SmsProviderKind::GatewayApi, &settings.gatewayapi),
        (SmsProviderKind::Elks46, &settings.elks46),
        (SmsProviderKind::Twilio, &settings.twilio),
    ] {
        if let Some(s) = s {
            providers.push(SmsProvider::new(kind, s.clone())?);
        }
    }
    if let Some(kind) = settings.provider
        && !providers.iter().any(|p| p.kind == kind)
    {
        anyhow::bail!(
            "dispatch.sms.provider is '{}' but dispatch.sms.{} is not configured",
            kind.name(),
            kind.name()
        );
    }
    Ok(providers)
}

/// Runs dispatch until shutdown.
pub async fn run(rt: Runtime) -> anyhow::Result<()> {
    let settings: DispatchSettings = config::section(&rt.figment, SERVICE)?;
    let templates = Templates::load(
        settings.templates_dir.as_deref().map(std::path::Path::new),
        settings.max_sms_segments,
    )?;
    let redis = redis_store::connect(&rt.config.redis).await?;
    let receipts = Arc::new(receipts::Receipts::new(&rt, redis.clone(), &settings));
    let receipt_routes = receipts.clone();
    let shell = ServiceShell::start_with_routes(&rt, SERVICE, PORT_OFFSET, move |metrics, producer| {
        receipt_routes.router(metrics, producer)
    })
    .await?;
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
    let deferred = IntCounterVec::new(
        Opts::new(
            "dispatch_deferred_total",
            "Actions held until the debtor's contact hours, by jurisdiction",
        ),
        &["jurisdiction"],
    )?;
    shell.metrics.registry.register(Box::new(outcomes.clone()))?;
    shell.metrics.registry.register(Box::new(deferred.clone()))?;
    shell.metrics.registry.register(Box::new(suppression_lag.clone()))?;
    let from: Mailbox = settings
        .smtp
        .from
        .parse()
        .map_err(|e| anyhow::anyhow!("dispatch.smtp.from '{}' is not a mailbox: {e}", settings.smtp.from))?;
    let receipts_base = settings
        .receipts
        .base_url
        .clone()
        .unwrap_or_else(|| format!("http://{}", shell.admin_addr))
        .trim_end_matches('/')
        .to_owned();
    let concurrency = settings.concurrency.max(1);
    if !settings.idempotency {
        tracing::warn!("dispatch.idempotency is off: messages may go out twice or after payment (benchmarks only)");
    }
    let dispatch = Dispatch {
        redis,
        keys: rt.keys(),
        mailer: smtp::SmtpClient::new(settings.smtp.clone(), concurrency)?,
        sms: sms_providers(&settings.sms)?,
        webhook: Webhook::new(settings.webhook.clone())?,
        from,
        templates,
        receipts_base,
        settings,
        outcomes_topic: rt.topic(&rt.config.topics.dispatch_outcomes),
        outcomes,
        deferred,
        suppression_lag,
        lagging: std::sync::Mutex::default(),
        rt: rt.clone(),
    };
    let releaser = tokio::spawn(deferral::release_due(
        rt.clone(),
        dispatch.redis.clone(),
        shell.producer.clone(),
        Duration::from_millis(dispatch.settings.deferred_poll_ms),
    ));
    let consumer = shell.consumer(&rt, SERVICE, &[rt.topic(&rt.config.topics.journey_actions)])?;
    let mut ctx = shell.loop_context(&rt);
    ctx.key_concurrency = concurrency;
    let result = run_consumer(consumer, dispatch, ctx).await;
    releaser.abort();
    result?;
    shell.producer.flush(Duration::from_secs(5)).await;
    Ok(())
}
