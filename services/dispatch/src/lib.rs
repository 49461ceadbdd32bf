//! Dispatch: turns journey actions into messages. Before each send it claims an idempotency
//! key for (action, channel) and re-reads the invoice's journey state (the last look); a paid,
//! credited, cancelled or handed-over invoice yields a `SUPPRESSED` outcome instead of a
//! message. Every action ends as a `DispatchOutcome`.
//!
//! The exact guarantee: a provider is handed a given (action, channel) at most once. The
//! claim (one Redis key per action and channel) moves `claimed` → `sending` → `sent` (or
//! `failed`, `suppressed`, `unknown`):
//! - `claimed:<attempt>` is taken atomically (`SET NX`) with a short lease before the last look,
//!   and renewed while the attempt runs. An attempt that stops there has called no provider:
//!   when the lease runs out the redelivered action claims it again and sends.
//! - `sending:<attempt>` is written (compare-and-set from this attempt's own lease) right before
//!   the provider can have the message: the commit point. `sent:<id>` is written when the
//!   provider answers that it took it.
//! - Every write an attempt makes to the claim is a compare-and-set on its own attempt id: an
//!   attempt whose claim was taken (its lease ran out and another attempt claimed the message)
//!   sends nothing, writes nothing over its successor's state, reports nothing and tries no
//!   other channel; the successor owns the action.
//!
//! After the commit point, a failure that does not prove the provider refused the message (a
//! timeout, a connection broken after the request was written, a 5xx) is an *unknown* delivery:
//! the claim becomes `unknown:<reason>` and the outcome `DUPLICATE` ("delivery unknown, not sent
//! again"). It is never retried on that channel, by this process or a redelivery, and never falls
//! back to the next channel: the debtor may already have the message.
//!
//! The one remaining window is a stop *during* the provider call (between `sending` and
//! `sent`): the redelivered action reports the same `DUPLICATE` rather than risk a second
//! message. The e-mail's Message-ID is derived from the action, so even a message re-sent by
//! hand is recognisably the same one.

mod attempt;
pub mod channels;
pub mod content;
mod deferral;
mod message;
mod ratelimit;
pub mod rebuild;
mod receipts;
mod smtp;

use std::sync::Arc;
use std::time::Duration;

use attempt::Attempt;
use channels::{SendError, Sms, SmsProvider, SmsProviderKind, Webhook};
use content::Templates;
use forfall_domain::Jurisdiction;
use forfall_domain::calendar::{ContactHours, next_contact_moment};
use forfall_domain::policy::experiment_labels;
use forfall_platform::changelog::{self, Changelog};
use forfall_platform::derived_state::DerivedState;
use forfall_platform::kafka::{Failure, Handler, Inbound, Outbound, Producer, run_consumer};
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
    /// The tenant's own secret for the webhook channel's `Forfall-Signature` (its requests and
    /// its receipts, at `/v1/receipts/webhook/<tenant>`), instead of `dispatch.webhook.secret`:
    /// one tenant's system can then neither verify nor forge another's.
    pub webhook_secret: Option<forfall_platform::config::Secret>,
    /// SMS provider for this tenant, overriding `dispatch.sms.provider`.
    pub sms_provider: Option<channels::SmsProviderKind>,
}

use forfall_platform::pay_links::PayLinkKeys;
pub use forfall_platform::pay_links::PayLinkSettings;

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

/// The receipt secrets of the dev stack, published with the source: refused in production.
pub const DEVELOPMENT_ELKS46_TOKEN: &str = "forfall-dev-46elks-receipt-token";
pub const DEVELOPMENT_GATEWAYAPI_SECRET: &str = "forfall-dev-gatewayapi-receipt-secret";

impl Default for ReceiptSettings {
    fn default() -> Self {
        Self {
            base_url: None,
            elks46_token: DEVELOPMENT_ELKS46_TOKEN.into(),
            gatewayapi_secret: DEVELOPMENT_GATEWAYAPI_SECRET.into(),
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
    /// The lease of a claim before its commit point: how long a message stays taken after its
    /// attempt was last seen alive. The attempt renews it every third of this (a compare-and-set
    /// on its own attempt id) for as long as it runs, so the lease need not outlast connecting,
    /// the rate limit, retries or the provider call; it only bounds how long a message waits
    /// after its attempt stopped (a crash, a kill) before the redelivery may claim it. An attempt
    /// that fell silent for longer than this (a stalled process, Redis out of reach) loses the
    /// claim: its commit point, a compare-and-set too, then fails and it sends nothing. After the
    /// commit point the claim no longer expires (see `idempotency_ttl_days`).
    pub claim_lease_ms: u64,
    /// Actions handled at once (one debtor's in order): sending waits mostly on the network.
    pub concurrency: usize,
    /// `linger.ms` of the producer that writes the commit points: each attempt waits for its
    /// commit record's acknowledgement before the provider is called, so a slot's linger is
    /// paid once per message. The shared producer's `kafka.linger_ms` (20 ms, chosen for
    /// throughput where nothing waits) held each slot to about 40 messages a second.
    pub commit_linger_ms: u32,
    /// For benchmarks only: `false` sends without claims and without the last look, to measure
    /// what they cost. Never in production: messages may then go out twice or after payment.
    pub idempotency: bool,
}

impl DispatchSettings {
    /// The secret of `tenant`'s webhook channel: its own, else the shared one.
    pub fn webhook_secret(&self, tenant: &str) -> &str {
        self.tenants
            .get(tenant)
            .and_then(|t| t.webhook_secret.as_ref())
            .map_or(self.webhook.secret.as_str(), |s| s.expose())
    }

    /// The secrets this configuration uses, each with its setting and its published development
    /// value: the pay-link keys always, a provider's receipt secret when the provider is set up,
    /// the webhook secret when a tenant has a webhook.
    fn development_secrets(&self) -> Vec<(String, &str, &str)> {
        let mut secrets = self.pay_link.development_secrets();
        if self.sms.elks46.is_some() {
            let token = self.receipts.elks46_token.as_str();
            secrets.push(("dispatch.receipts.elks46_token".into(), token, DEVELOPMENT_ELKS46_TOKEN));
        }
        if self.sms.gatewayapi.is_some() {
            let secret = self.receipts.gatewayapi_secret.as_str();
            secrets.push((
                "dispatch.receipts.gatewayapi_secret".into(),
                secret,
                DEVELOPMENT_GATEWAYAPI_SECRET,
            ));
        }
        // Each tenant with a webhook signs with its own secret or the shared one: whichever it
        // uses must not be the published one.
        let mut shared_used = false;
        for (tenant, profile) in self.tenants.iter().filter(|(_, t)| t.webhook_url.is_some()) {
            match &profile.webhook_secret {
                Some(own) => secrets.push((
                    format!("dispatch.tenants.{tenant}.webhook_secret"),
                    own.expose(),
                    channels::DEVELOPMENT_WEBHOOK_SECRET,
                )),
                None => shared_used = true,
            }
        }
        if shared_used {
            let secret = self.webhook.secret.as_str();
            secrets.push((
                "dispatch.webhook.secret".into(),
                secret,
                channels::DEVELOPMENT_WEBHOOK_SECRET,
            ));
        }
        secrets
    }
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
            commit_linger_ms: 1,
            idempotency: true,
        }
    }
}

pub struct Dispatch {
    rt: Runtime,
    redis: ConnectionManager,
    keys: Keys,
    /// Whether Redis holds dispatch's state (see [`rebuild`]).
    state: Arc<DerivedState<rebuild::DispatchRebuild>>,
    /// Held messages and sent messages, for a rebuild.
    changelog: Changelog,
    producer: Producer,
    /// Writes the commit points (and their tombstones, so the two stay in order): a short
    /// linger, because each is waited for inside an attempt.
    commit_producer: Producer,
    settings: DispatchSettings,
    /// The keys the pay links are signed with (`dispatch.pay_link`).
    pay_links: PayLinkKeys,
    templates: Templates,
    from: Mailbox,
    mailer: smtp::SmtpClient,
    sms: Vec<SmsProvider>,
    webhook: Webhook,
    receipts_base: String,
    outcomes_topic: String,
    outcomes: IntCounterVec,
    /// Looks at the commit point: journeys as the first look found them, or changed since.
    commit_looks: IntCounterVec,
    /// Messages sent, by step, channel, segment and experiment variant.
    messages: IntCounterVec,
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
    /// SHA-256 of the content sent (see [`content::Content::digest`]), when known.
    content_sha256: Option<String>,
    /// A redelivered action: nothing was sent this time (counted as a duplicate).
    redelivered: bool,
    /// This attempt handed the message over and cannot tell whether the provider took it.
    unknown: bool,
}

impl ChannelResult {
    fn new(status: DispatchStatus, reason: impl Into<Option<String>>) -> Self {
        Self {
            status,
            reason: reason.into(),
            provider_message_id: None,
            content_sha256: None,
            redelivered: false,
            unknown: false,
        }
    }

    fn sent(sent: Sent) -> Self {
        Self {
            provider_message_id: Some(sent.message_id),
            content_sha256: Some(sent.content_sha256),
            ..Self::new(DispatchStatus::Sent, None::<String>)
        }
    }

    /// `DUPLICATE` with the reason "delivery unknown, …": the outcome the schema has for a
    /// message that may or may not have gone out and is not sent again.
    fn unknown(detail: &str) -> Self {
        Self {
            unknown: true,
            ..Self::new(
                DispatchStatus::Duplicate,
                format!("delivery unknown, not sent again and no fallback: {detail}"),
            )
        }
    }
}

/// A message a provider took: its id there, and the digest of what it carried.
pub(crate) struct Sent {
    pub(crate) message_id: String,
    pub(crate) content_sha256: String,
}

impl Sent {
    const DIGEST: &'static str = " sha256=";

    /// As the claim's final state keeps it, after `sent:` (without a digest when none is known).
    pub(crate) fn claim_value(&self) -> String {
        if self.content_sha256.is_empty() {
            return self.message_id.clone();
        }
        format!("{}{}{}", self.message_id, Self::DIGEST, self.content_sha256)
    }

    /// From a claim's final state (claims settled before digests were kept have none).
    fn from_claim(value: &str) -> Self {
        match value.rsplit_once(Self::DIGEST) {
            Some((message_id, digest)) => Self {
                message_id: message_id.to_owned(),
                content_sha256: digest.to_owned(),
            },
            None => Self {
                message_id: value.to_owned(),
                content_sha256: String::new(),
            },
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
        content_sha256: None,
        covered_invoice_ids: action.covers.iter().map(|c| c.invoice_id.clone()).collect(),
    }
}

/// What a receipt needs to find its action again: stored per provider message id.
#[derive(Serialize, Deserialize)]
pub(crate) struct SentMessage {
    pub action: JourneyAction,
    pub channel: String,
}

/// The invoices an action's last look reads: its own at its step, and a combined action's others.
fn looked_at(action: &JourneyAction) -> Vec<(&str, i32)> {
    let mut invoices = vec![(action.invoice_id.as_str(), action.step_index)];
    invoices.extend(action.covers.iter().map(|c| (c.invoice_id.as_str(), -1)));
    invoices
}

/// The idempotency claim of one (action, channel): its Redis key.
pub fn claim_key(keys: &Keys, action_id: &str, channel: &str) -> String {
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

    fn profile(&self, tenant: &str) -> TenantProfile {
        self.settings.tenants.get(tenant).cloned().unwrap_or_default()
    }

    fn sms_provider(&self, tenant: &str) -> Option<&SmsProvider> {
        let kind = self.profile(tenant).sms_provider.or(self.settings.sms.provider)?;
        self.sms.iter().find(|p| p.kind == kind)
    }

    /// What a redelivered action finds when its claim is taken.
    async fn claimed_before(&self, key: &str) -> Result<ChannelResult, Failure> {
        let state: Option<String> = redis::cmd("GET").arg(key).query_async(&mut self.redis.clone()).await?;
        let state = state.unwrap_or_default();
        let redelivered = |status, reason: String, provider_message_id: Option<String>| ChannelResult {
            status,
            reason: Some(reason),
            provider_message_id,
            content_sha256: None,
            redelivered: true,
            unknown: false,
        };
        if let Some(sent) = state.strip_prefix("sent:") {
            // Sent before, perhaps by an attempt that died before reporting it: report SENT
            // again under the same event id, so the outcome is never lost, and send nothing.
            let sent = Sent::from_claim(sent);
            return Ok(ChannelResult {
                content_sha256: Some(sent.content_sha256).filter(|d| !d.is_empty()),
                ..redelivered(
                    DispatchStatus::Sent,
                    "redelivered action: already sent, not sent again".to_owned(),
                    Some(sent.message_id),
                )
            });
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
        if let Some(reason) = state.strip_prefix("unknown:") {
            // An earlier attempt handed the message over and could not tell whether the provider
            // took it: the same "delivery unknown" again, and still not sent again.
            return Ok(redelivered(DispatchStatus::Duplicate, reason.to_owned(), None));
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

    /// An attempt whose claim was taken before it wrote anything: it sent nothing (its commit
    /// point is a compare-and-set on its own claim) and writes and reports nothing. When another
    /// attempt holds or has settled the claim, that one owns the action and reports it, so this
    /// record is done (`None`); when the claim merely ran out and nobody holds it, the record is
    /// handled again from the start, so that nothing is lost.
    async fn claim_lost(&self, key: &str) -> Result<Option<ChannelResult>, Failure> {
        let state: Option<String> = redis::cmd("GET").arg(key).query_async(&mut self.redis.clone()).await?;
        match state {
            None => Err(Failure::Transient(anyhow::anyhow!(
                "this message's claim ran out before it was sent and nobody holds it: handling the action again"
            ))),
            Some(state) => {
                tracing::warn!(
                    claim = %state,
                    "another attempt took this message's claim: this one sent nothing and leaves the action to it"
                );
                Ok(None)
            }
        }
    }

    /// One channel of an action: `None` when this attempt lost the claim to another, which then
    /// owns the action (nothing to report, no fallback).
    async fn deliver(&self, action: &JourneyAction, channel: &str) -> Result<Option<ChannelResult>, Failure> {
        let key = self.claim_key(&action.action_id, channel);
        let attempt = Attempt::new(self, &key, &action.action_id, channel);
        if !attempt.enabled() {
            return Ok(Some(match self.send_with_retries(action, channel, &attempt).await {
                Ok(sent) => ChannelResult::sent(sent),
                Err(SendError::Unknown(detail)) => ChannelResult::unknown(&detail),
                Err(SendError::Permanent(reason) | SendError::Transient(reason)) => {
                    ChannelResult::new(DispatchStatus::Failed, reason)
                }
                // Without the idempotency machinery there is no claim to lose and no second look.
                Err(SendError::ClaimLost | SendError::Stale(_)) => {
                    ChannelResult::new(DispatchStatus::Failed, "lost a claim that was never taken".to_owned())
                }
            }));
        }
        // A short lease, renewed while this attempt runs: an attempt that stops before the
        // commit point frees the message for the redelivery once it runs out.
        // The last look, with the claim: a combined action's other invoices are looked at too.
        // The provider is called only after one more look at the commit point.
        let Some(looks) = attempt.claim_and_look(&action.tenant, &looked_at(action)).await? else {
            return self.claimed_before(&key).await.map(Some);
        };
        let caught_up = looks.first().is_none_or(|l| l.caught_up);
        if !caught_up && !self.waited_long_enough(&action.action_id) {
            // The watcher has produced this action but not yet stored the journey that includes
            // it: judge the state once it does. The claim is released so the retry may send.
            attempt.release().await?;
            return Err(Failure::Transient(anyhow::anyhow!(
                "journey state not yet updated for this action"
            )));
        }
        let statuses: Vec<Option<String>> = looks.into_iter().map(|l| l.status).collect();
        let Some(current) = message::still_open(action, &statuses) else {
            let status = statuses.first().cloned().flatten();
            let reason = format!("invoice is {}", status.as_deref().unwrap_or("unknown to the watcher"));
            if !attempt.settle(&format!("suppressed:{reason}")).await? {
                return self.claim_lost(&key).await;
            }
            self.suppression_lag
                .observe((self.rt.clock.now().timestamp_millis() - action.send_at).max(0) as f64 / 1000.0);
            return Ok(Some(ChannelResult::new(DispatchStatus::Suppressed, reason)));
        };
        let action = &current;
        let sent = attempt
            .renewing(self.send_with_retries(action, channel, &attempt))
            .await;
        match sent {
            Ok(sent) => {
                // The message went out under this attempt's own `sending`, which no other attempt
                // can take: the claim is still this attempt's unless someone removed it by hand.
                // What was sent is remembered for its receipt in the same round trip; its
                // changelog record goes once the claim says `sent` (a producer waiting for room
                // must not hold the final state back).
                let (remember, change) = self.remember_sent(action, channel, &sent.message_id)?;
                if !attempt
                    .settle_and(&format!("sent:{}", sent.claim_value()), remember)
                    .await?
                {
                    tracing::error!(channel, message_id = %sent.message_id, "sent, but the claim was no longer this attempt's to record it");
                }
                attempt.forget_commit(false).await;
                self.publish_sent(change).await;
                Ok(Some(ChannelResult::sent(sent)))
            }
            Err(SendError::Unknown(detail)) => {
                // After the commit point, without proof either way: never again on this channel
                // (the claim's final state says so to every redelivery), and no fallback.
                tracing::warn!(channel, %detail, "delivery unknown: not sent again, no fallback");
                let result = ChannelResult::unknown(&detail);
                let state = format!("unknown:{}", result.reason.as_deref().unwrap_or_default());
                if !attempt.settle(&state).await? {
                    tracing::error!(
                        channel,
                        "delivery unknown, and the claim was no longer this attempt's to record it"
                    );
                }
                attempt.forget_commit(false).await;
                Ok(Some(result))
            }
            Err(SendError::Permanent(reason)) => {
                if !attempt.settle(&format!("failed:{reason}")).await? {
                    return self.claim_lost(&key).await;
                }
                attempt.forget_commit(false).await;
                Ok(Some(ChannelResult::new(DispatchStatus::Failed, reason)))
            }
            Err(SendError::Transient(reason)) => {
                // Retried as often as configured and the provider still could not take it: this
                // channel failed for this action (the next one is the fallback). Nothing
                // reached the provider as far as anyone can tell, but it is not tried again.
                let reason = format!(
                    "gave up after {} attempts: {reason}",
                    self.settings.retry.attempts.max(1)
                );
                if !attempt.settle(&format!("failed:{reason}")).await? {
                    return self.claim_lost(&key).await;
                }
                attempt.forget_commit(false).await;
                Ok(Some(ChannelResult::new(DispatchStatus::Failed, reason)))
            }
            Err(SendError::ClaimLost) => self.claim_lost(&key).await,
            Err(SendError::Stale(reason)) => {
                // Nothing was sent: free the claim and handle the action again from the start,
                // where the last look suppresses it or renders it without the settled invoices.
                if !attempt.release().await? {
                    return self.claim_lost(&key).await;
                }
                Err(Failure::Transient(anyhow::anyhow!(
                    "looked again at the commit point: {reason}"
                )))
            }
        }
    }

    /// Transient errors (the provider certainly did not take the message) are retried with
    /// exponential backoff and full jitter, the claim back on its lease meanwhile; a shutdown
    /// meanwhile leaves the claim to the redelivery. An unknown delivery is never retried.
    async fn send_with_retries(
        &self,
        action: &JourneyAction,
        channel: &str,
        attempt: &Attempt<'_>,
    ) -> Result<Sent, SendError> {
        let retry = &self.settings.retry;
        let mut tries = 0u32;
        loop {
            match self.send_once(action, channel, attempt).await {
                Err(SendError::Transient(reason)) if tries + 1 < retry.attempts => {
                    attempt.reopen().await?;
                    let cap = retry.first_ms.saturating_mul(1u64 << tries.min(20)).min(retry.max_ms);
                    let wait = Duration::from_millis((cap as f64 * rand::random::<f64>().max(0.1)) as u64);
                    tracing::warn!(channel, attempt = tries, wait_ms = wait.as_millis() as u64, %reason, "transient send failure, retrying");
                    tries += 1;
                    tokio::time::sleep(wait).await;
                    if attempt.lost() {
                        return Err(SendError::ClaimLost);
                    }
                }
                other => return other,
            }
        }
    }

    async fn send_once(&self, action: &JourneyAction, channel: &str, attempt: &Attempt<'_>) -> Result<Sent, SendError> {
        let profile = self.profile(&action.tenant);
        let ctx = message::context(action, &profile, &self.pay_links, self.rt.clock.now());
        let content = self
            .templates
            .render(&action.tenant, &ctx)
            .map_err(|e| SendError::Permanent(format!("the message cannot be rendered: {e}")))?;
        let content_sha256 = content.digest(channel);
        let message_id = self
            .send_content(action, channel, attempt, &profile, &ctx, &content)
            .await?;
        Ok(Sent {
            message_id,
            content_sha256,
        })
    }

    /// Sends rendered `content` on `channel`; the provider's message id.
    async fn send_content(
        &self,
        action: &JourneyAction,
        channel: &str,
        attempt: &Attempt<'_>,
        profile: &TenantProfile,
        ctx: &content::MessageContext,
        content: &content::Content,
    ) -> Result<String, SendError> {
        let reference = format!("{}:{channel}", action.action_id);
        match channel {
            "email" => self.send_email(action, content, attempt).await,
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
                provider
                    .send(
                        &Sms {
                            to: phone,
                            text: &content.sms,
                            reference: &reference,
                            callback_url,
                        },
                        || self.commit_if_still_open(action, attempt),
                    )
                    .await
            }
            "webhook" => {
                let Some(url) = profile.webhook_url.as_deref() else {
                    return Err(SendError::Permanent("the tenant has no webhook_url".into()));
                };
                let body = message::webhook_body(action, ctx, content);
                let secret = self.settings.webhook_secret(&action.tenant);
                self.webhook
                    .send(url, secret, &reference, &body, self.rt.clock.now().timestamp(), || {
                        self.commit_if_still_open(action, attempt)
                    })
                    .await
            }
            other => Err(SendError::Permanent(format!("unknown channel '{other}'"))),
        }
    }

    /// The commit point: the last look once more (a message may wait seconds for a rate-limit
    /// token, a retry's backoff or the provider's connection after the first look), then the
    /// claim moves to `sending`. A message any of whose invoices is no longer open is not sent:
    /// the action is looked at again from the start (suppressed, or rendered without them).
    async fn commit_if_still_open(&self, action: &JourneyAction, attempt: &Attempt<'_>) -> Result<(), SendError> {
        if attempt.enabled() {
            // Mostly nothing changed since the first look: then the look and the commit are one
            // script. Otherwise the look is taken and judged here.
            if attempt.commit_if_unchanged(&action.tenant, &looked_at(action)).await? {
                self.commit_looks.with_label_values(&["unchanged"]).inc();
                return Ok(());
            }
            self.commit_looks.with_label_values(&["changed"]).inc();
            let looks =
                journey_state::last_looks(&mut self.redis.clone(), &self.keys, &action.tenant, &looked_at(action))
                    .await
                    .map_err(|e| SendError::Transient(format!("cannot look at the journey once more: {e}")))?;
            let statuses: Vec<Option<String>> = looks.into_iter().map(|l| l.status).collect();
            let unchanged = message::still_open(action, &statuses)
                .is_some_and(|now| now.invoice_id == action.invoice_id && now.covers.len() == action.covers.len());
            if !unchanged {
                return Err(SendError::Stale(format!(
                    "an invoice of the message is no longer open ({})",
                    statuses
                        .iter()
                        .map(|s| s.as_deref().unwrap_or("unknown"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        attempt.commit().await
    }

    /// What remembers a sent message under the provider's id, for its delivery receipt: the
    /// Redis write (for the caller to send with the claim's final state) and the changelog
    /// record (for a Redis that loses it; see [`Dispatch::publish_sent`]).
    fn remember_sent(
        &self,
        action: &JourneyAction,
        channel: &str,
        message_id: &str,
    ) -> Result<(redis::Cmd, Outbound), Failure> {
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
        let change = self.changelog.put_keyed(
            rebuild::sent_changelog_key(provider, message_id),
            value.clone().into_bytes(),
        );
        let mut remember = redis::cmd("SET");
        remember
            .arg(sent_key(&self.keys, provider, message_id))
            .arg(value)
            .arg("EX")
            .arg(self.settings.receipts.remember_days * 86_400);
        Ok((remember, change))
    }

    /// A sent message's changelog record, not waited for: the message is out, and only its
    /// receipt needs this (and only once Redis is lost).
    async fn publish_sent(&self, change: Outbound) {
        let ack = self.producer.send(&change).await;
        tokio::spawn(async move {
            if let Err(e) = ack.await {
                tracing::warn!(error = %e, "a sent message did not reach dispatch's changelog; its receipt is lost if Redis is lost");
            }
        });
    }

    async fn send_email(
        &self,
        action: &JourneyAction,
        content: &content::Content,
        attempt: &Attempt<'_>,
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
        self.mailer
            .send(&message, || self.commit_if_still_open(action, attempt))
            .await?;
        Ok(message_id)
    }
}

impl Handler for Dispatch {
    async fn handle(&self, record: &Inbound) -> Result<Vec<Outbound>, Failure> {
        self.state.ensure_ready().await?;
        let action: JourneyAction = self.rt.codec.decode(record.payload.as_deref()).await?.to()?;
        if let Some(until) = self.outside_contact_hours(&action)? {
            let store = deferral::HeldStore {
                redis: self.redis.clone(),
                keys: &self.keys,
                changelog: &self.changelog,
                producer: &self.producer,
            };
            deferral::hold(store, &action, until).await?;
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
            let Some(result) = self.deliver(&action, channel).await? else {
                // Another attempt took this message's claim and owns the action from here: it
                // reports it. Nothing more from this one, and no fallback.
                self.outcomes
                    .with_label_values(&[&action.step, channel, "superseded"])
                    .inc();
                tracing::info!(step = %action.step, channel = %channel, "superseded by another attempt");
                break;
            };
            let status_label = format!("{:?}", result.status).to_lowercase();
            let metric_label = if result.redelivered {
                "duplicate"
            } else if result.unknown {
                "unknown"
            } else {
                status_label.as_str()
            };
            self.outcomes
                .with_label_values(&[&action.step, channel, metric_label])
                .inc();
            if matches!(metric_label, "sent" | "delivered") {
                let (experiment, variant) = experiment_labels(action.experiment.as_deref());
                let segment = action.segment.as_deref().unwrap_or("none");
                self.messages
                    .with_label_values(&[&action.step, channel, segment, experiment, variant])
                    .inc();
            }
            tracing::info!(step = %action.step, channel = %channel, status = %status_label, "dispatch outcome");
            let mut outcome = outcome_of(
                &action,
                channel,
                result.status,
                result.reason,
                result.provider_message_id,
                self.rt.clock.now().timestamp_millis(),
            );
            outcome.content_sha256 = result.content_sha256;
            outs.push(
                self.rt
                    .codec
                    .outbound(&self.outcomes_topic, &action.debtor_id, &outcome, record.trace)
                    .await?,
            );
            // The next channel is a fallback: only when this one certainly did not deliver (not
            // after an unknown delivery, which may have reached the debtor).
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

/// What rebuilds dispatch's state (see [`rebuild`]).
pub fn rebuilder(rt: &Runtime, settings: &DispatchSettings, redis: ConnectionManager) -> rebuild::DispatchRebuild {
    rebuild::DispatchRebuild {
        kafka: rt.config.kafka.clone(),
        outcomes_topic: rt.topic(&rt.config.topics.dispatch_outcomes),
        changelog_topic: rt.topic(&rt.config.topics.dispatch_changelog),
        codec: rt.codec.clone(),
        redis,
        keys: rt.keys(),
        idempotency_ttl_secs: settings.idempotency_ttl_days * 86_400,
        remember_sent_secs: settings.receipts.remember_days * 86_400,
    }
}

/// Runs dispatch until shutdown.
pub async fn run(rt: Runtime) -> anyhow::Result<()> {
    let settings: DispatchSettings = config::section(&rt.figment, SERVICE)?;
    // Renewed every third of it: a lease shorter than a few Redis round trips would be lost by
    // live attempts.
    anyhow::ensure!(
        settings.claim_lease_ms >= 300,
        "dispatch.claim_lease_ms is {} ms: it must be at least 300 ms",
        settings.claim_lease_ms
    );
    smtp::check(&settings.smtp)?;
    rt.config
        .profile
        .refuse_development_secrets(&settings.development_secrets())?;
    let pay_links = PayLinkKeys::new(settings.pay_link.clone())?;
    let templates = Templates::load(
        settings.templates_dir.as_deref().map(std::path::Path::new),
        settings.max_sms_segments,
    )?;
    let redis = redis_store::connect(&rt.config.redis).await?;
    let receipts = Arc::new(receipts::Receipts::new(&rt, redis.clone(), &settings));
    let receipt_routes = receipts.clone();
    let shell = ServiceShell::start_with_routes(&rt, SERVICE, PORT_OFFSET, move |metrics, producer, _| {
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
    let commit_looks = IntCounterVec::new(
        Opts::new(
            "dispatch_commit_looks_total",
            "Looks at the commit point, by whether the journeys were as the first look found them \
             (unchanged: looked at and committed in one round trip) or had changed since (changed: \
             judged again, e.g. a payment booked while the message waited)",
        ),
        &["journey"],
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
    // The labels are bounded by the policy (its steps, segments, experiments and variants).
    let messages = IntCounterVec::new(
        Opts::new(
            "dispatch_messages_total",
            "Messages sent, by step, channel, policy segment, experiment and variant ('none' outside experiments)",
        ),
        &["step", "channel", "segment", "experiment", "variant"],
    )?;
    shell.metrics.registry.register(Box::new(outcomes.clone()))?;
    shell.metrics.registry.register(Box::new(commit_looks.clone()))?;
    shell.metrics.registry.register(Box::new(messages.clone()))?;
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
    let actions_topic = rt.topic(&rt.config.topics.journey_actions);
    let changelog_topic = rt.topic(&rt.config.topics.dispatch_changelog);
    let partitions = changelog::partition_count(&rt.config.kafka, &actions_topic).await?;
    anyhow::ensure!(partitions > 0, "topic '{actions_topic}' has no partitions");
    changelog::ensure(&rt.config.kafka, &changelog_topic, partitions).await?;
    let outcomes_topic = rt.topic(&rt.config.topics.dispatch_outcomes);
    let state = Arc::new(DerivedState::new(
        &rt.keys(),
        SERVICE,
        redis.clone(),
        shell.readiness.clone(),
        rebuilder(&rt, &settings, redis.clone()),
    ));
    receipts.set_state(state.clone());
    let watching = tokio::spawn(state.clone().watch(Duration::from_secs(1)));
    let changelog = Changelog::new(changelog_topic);
    let commit_producer = shell.producer_lingering(&rt, settings.commit_linger_ms)?;
    let dispatch = Dispatch {
        redis,
        keys: rt.keys(),
        state,
        changelog: changelog.clone(),
        producer: shell.producer.clone(),
        commit_producer: commit_producer.clone(),
        mailer: smtp::SmtpClient::new(settings.smtp.clone(), concurrency)?,
        sms: sms_providers(&settings.sms)?,
        webhook: Webhook::new(settings.webhook.clone())?,
        from,
        templates,
        receipts_base,
        settings,
        pay_links,
        outcomes_topic,
        outcomes,
        commit_looks,
        messages,
        deferred,
        suppression_lag,
        lagging: std::sync::Mutex::default(),
        rt: rt.clone(),
    };
    let releaser = tokio::spawn(deferral::release_due(
        rt.clone(),
        dispatch.redis.clone(),
        shell.producer.clone(),
        changelog,
        Duration::from_millis(dispatch.settings.deferred_poll_ms),
    ));
    let consumer = shell.consumer(&rt, SERVICE, &[actions_topic])?;
    let mut ctx = shell.loop_context(&rt);
    ctx.key_concurrency = concurrency;
    let result = run_consumer(consumer, dispatch, ctx).await;
    releaser.abort();
    watching.abort();
    result?;
    shell.producer.flush(Duration::from_secs(5)).await;
    commit_producer.flush(Duration::from_secs(5)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use forfall_platform::config::Secret;

    fn with_webhook(secret: Option<&str>) -> TenantProfile {
        TenantProfile {
            webhook_url: Some("https://billing.example/hooks".into()),
            webhook_secret: secret.map(|s| Secret(s.into())),
            ..TenantProfile::default()
        }
    }

    /// Whichever secret a tenant's webhook uses is checked against the published one, by the
    /// setting a platform team would change.
    #[test]
    fn each_tenant_webhook_secret_in_use_is_checked_and_named() {
        let mut settings = DispatchSettings::default();
        settings.tenants.insert("acme".into(), with_webhook(Some("acme-own")));
        settings.tenants.insert("nordkraft".into(), with_webhook(None));
        settings.tenants.insert("quiet".into(), TenantProfile::default());
        let names = |s: &DispatchSettings| -> Vec<String> {
            s.development_secrets()
                .into_iter()
                .filter(|(name, _, _)| name.contains("webhook"))
                .map(|(name, _, _)| name)
                .collect()
        };
        assert_eq!(
            names(&settings),
            ["dispatch.tenants.acme.webhook_secret", "dispatch.webhook.secret"]
        );
        assert_eq!(settings.webhook_secret("acme"), "acme-own");
        assert_eq!(
            settings.webhook_secret("nordkraft"),
            channels::DEVELOPMENT_WEBHOOK_SECRET
        );
        // Every tenant with a webhook has its own: the shared one is not in use.
        settings
            .tenants
            .insert("nordkraft".into(), with_webhook(Some("nk-own")));
        assert_eq!(
            names(&settings),
            [
                "dispatch.tenants.acme.webhook_secret",
                "dispatch.tenants.nordkraft.webhook_secret"
            ]
        );
        assert!(
            !format!("{settings:?}").contains("acme-own"),
            "a tenant's secret is not in Debug"
        );
    }
}
