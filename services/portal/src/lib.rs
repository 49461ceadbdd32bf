//! Portal: the debtor's page behind the signed link in every message.
//!
//! It owns a read model of what the page shows (see [`view`]), kept in its own Redis keys from
//! the topics (invoices, journey events, matched payments, dispatch outcomes) and rebuilt from
//! them when Redis loses it, and it answers `GET /pay/<token>`: the link is verified in
//! constant time against the keys dispatch signs with (`dispatch.pay_link`), and the page
//! shows the creditor, each invoice the link names (of that debtor only), what is paid and
//! left, how to pay by bank transfer with the exact reference, and what has happened so far,
//! in the debtor's language. The token is never logged (a short fingerprint is), and requests
//! are limited per link and per client address.

pub mod checkout;
mod http;
pub mod page;
pub mod payments;
pub mod rebuild;
mod requests;
pub mod revocation;
pub mod stripe;
pub mod swish;
pub mod timeline;
pub mod view;
pub mod vipps;
mod webhook;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use forfall_domain::journey::PauseLimits;
use forfall_platform::changelog::{self, Changelog};
use forfall_platform::config;
use forfall_platform::derived_state::DerivedState;
use forfall_platform::kafka::{Failure, Handler, Inbound, Outbound, Producer, run_consumer};
use forfall_platform::pay_links::{PayLinkKeys, PayLinkSettings};
use forfall_platform::redis_store;
use forfall_platform::service::{Runtime, ServiceShell};
use prometheus::{IntCounterVec, Opts};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use crate::page::{Creditor, Renderer, Texts};
use crate::view::{APPLY, ViewKeys};

pub const SERVICE: &str = "portal";
/// The page listens on `admin.base_port + 6` (9606), where dispatch's default links point.
pub const PORT_OFFSET: u16 = 6;

#[derive(Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct PortalSettings {
    /// Days a closed invoice's page stays answerable after it closed: a debtor who opens an
    /// old message sees "paid" rather than nothing. As long as the watcher keeps a closed
    /// journey (`watcher.closed_retention_days`), no longer (it names what the debtor paid).
    pub closed_retention_days: u64,
    /// Pages per client address per minute.
    pub per_address_per_minute: u64,
    /// Pages per link per minute.
    pub per_link_per_minute: u64,
    /// The header a trusted proxy in front of the portal puts the client's address in (e.g.
    /// `x-forwarded-for`, its first entry is taken); the connection's peer address when unset.
    pub client_address_header: Option<String>,
    /// Each tenant's Vipps MobilePay merchant, by tenant: the page offers to pay with the app
    /// for the tenants named here (NOK, DKK and EUR invoices).
    pub vipps: BTreeMap<String, vipps::VippsMerchant>,
    /// Each tenant's Stripe account, by tenant: the page offers to pay by card for these.
    pub stripe: BTreeMap<String, stripe::StripeAccount>,
    /// Each tenant's Swish number and certificate, by tenant: the page offers Swish for
    /// these (SEK invoices).
    pub swish: BTreeMap<String, swish::SwishMerchant>,
    /// The bearer token of the staff endpoints (`/v1/timeline/...`); they answer nothing
    /// without one.
    pub staff_token: Option<String>,
}

/// Without the secrets (the staff token; the providers' own `Debug` leaves theirs out).
impl std::fmt::Debug for PortalSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortalSettings")
            .field("closed_retention_days", &self.closed_retention_days)
            .field("per_address_per_minute", &self.per_address_per_minute)
            .field("per_link_per_minute", &self.per_link_per_minute)
            .field("client_address_header", &self.client_address_header)
            .field("vipps", &self.vipps)
            .field("stripe", &self.stripe)
            .field("swish", &self.swish)
            .field("staff_token", &self.staff_token.as_ref().map(|_| "(set)"))
            .finish()
    }
}

impl Default for PortalSettings {
    fn default() -> Self {
        Self {
            closed_retention_days: 120,
            per_address_per_minute: 120,
            per_link_per_minute: 30,
            client_address_header: None,
            vipps: BTreeMap::new(),
            stripe: BTreeMap::new(),
            swish: BTreeMap::new(),
            staff_token: None,
        }
    }
}

/// What the portal reads of dispatch's settings: the keys its links are signed with and what
/// the creditors' messages say about them, so that the page and the messages agree.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct CreditorSettings {
    pay_link: PayLinkSettings,
    tenants: BTreeMap<String, Creditor>,
}

pub(crate) struct Metrics {
    /// Pages answered, by result: shown, expired, refused, limited, unavailable.
    pages: IntCounterVec,
    /// Records applied to the read model, by type.
    applied: IntCounterVec,
    /// Requests from the page's forms, by result: claims_paid, promise_to_pay, dispute,
    /// invalid, forged, refused, expired, limited, unavailable.
    requests: IntCounterVec,
    /// Payments through providers, by provider and result: started, completed, abandoned,
    /// pending, invalid, forged, refused, provider_refused, unavailable.
    payments: IntCounterVec,
    /// Providers' webhook requests, by provider and result.
    webhooks: IntCounterVec,
}

pub(crate) struct Inner {
    rt: Runtime,
    redis: ConnectionManager,
    keys: ViewKeys,
    state: Arc<DerivedState<rebuild::PortalRebuild>>,
    settings: PortalSettings,
    links: PayLinkKeys,
    creditors: BTreeMap<String, Creditor>,
    /// Writes the debtors' requests.
    producer: Producer,
    texts: Texts,
    renderer: Renderer,
    metrics: Metrics,
    vipps: vipps::VippsClient,
    stripe: stripe::StripeClient,
    swish: swish::SwishClient,
    /// Where payments under way are kept (see [`checkout`]).
    changelog: Changelog,
    /// The links' base (`dispatch.pay_link.base_url`, ending in `/`): providers send the
    /// debtor back under it.
    pay_base_url: String,
    /// The policy's limits on what a debtor may ask for: the page offers only what the
    /// watcher grants.
    pauses: PauseLimits,
    /// The tenants' bearer tokens: a tenant's systems read its own invoices' timelines.
    tokens: forfall_platform::api_auth::TenantTokens,
}

#[derive(Clone)]
pub struct Portal(pub(crate) Arc<Inner>);

impl Portal {
    /// Writes `record` to the topic named `topic` (its base name) under `key`, and waits for the
    /// broker's acknowledgement: the page says something was received only when it is.
    pub(crate) async fn publish<T: forfall_platform::records::Record + Serialize>(
        &self,
        topic: &str,
        key: &str,
        record: &T,
    ) -> Result<(), Failure> {
        let topic = self.0.rt.topic(topic);
        let out = self
            .0
            .rt
            .codec
            .outbound(
                &topic,
                key,
                record,
                forfall_platform::telemetry::TraceContext::new_root(),
            )
            .await?;
        self.send_acknowledged(out).await
    }

    /// Sends one record and waits for the broker's acknowledgement.
    async fn send_acknowledged(&self, out: forfall_platform::kafka::Outbound) -> Result<(), Failure> {
        self.0
            .producer
            .send_all(std::slice::from_ref(&out))
            .await
            .map_err(|e| Failure::Transient(anyhow::anyhow!(e)))
    }

    /// Keeps a fact of the portal's own (a payment under way, a withdrawal): on its changelog
    /// under `changelog_key` (acknowledged) first, so a rebuild finds it, then in Redis under
    /// `redis_key` for `ttl_secs`.
    pub(crate) async fn keep(
        &self,
        changelog_key: String,
        redis_key: String,
        value: Vec<u8>,
        ttl_secs: u64,
    ) -> Result<(), Failure> {
        self.send_acknowledged(self.0.changelog.put_keyed(changelog_key, value.clone()))
            .await?;
        redis::cmd("SET")
            .arg(redis_key)
            .arg(value)
            .arg("EX")
            .arg(ttl_secs.max(1))
            .query_async::<()>(&mut self.0.redis.clone())
            .await?;
        Ok(())
    }

    fn retention_secs(&self) -> u64 {
        self.0.settings.closed_retention_days.max(1) * 86_400
    }

    /// Applies one record to the read model (idempotent; see [`view`]).
    async fn apply(&self, record: &Inbound) -> Result<(), Failure> {
        self.0.state.ensure_ready().await?;
        let decoded = self.0.rt.codec.decode(record.payload.as_deref()).await?;
        let changes = view::changes_of(&decoded.name, &decoded, record.offset)
            .map_err(|e| Failure::reject("unreadable_record", format!("{e:#}")))?;
        // A span entered across an await leaks into whatever else runs on the thread meanwhile
        // (and can corrupt the registry): the work is instrumented instead.
        let span = tracing::info_span!("apply", record = %decoded.name, changes = changes.len());
        async {
            for (tenant, invoice_id, change) in &changes {
                let applied: i64 = view::invocation(
                    &APPLY,
                    &self.0.keys.invoice(tenant, invoice_id),
                    self.0.state.marker_key(),
                    self.0.state.seen(),
                    change,
                    self.retention_secs(),
                )
                .invoke_async(&mut self.0.redis.clone())
                .await?;
                if applied == -2 {
                    return Err(self.0.state.missing());
                }
            }
            Ok(())
        }
        .instrument(span)
        .await?;
        self.0.metrics.applied.with_label_values(&[&decoded.name]).inc();
        Ok(())
    }
}

impl Handler for Portal {
    async fn handle(&self, record: &Inbound) -> Result<Vec<Outbound>, Failure> {
        self.apply(record).await?;
        Ok(Vec::new())
    }
}

/// The watcher's policy file, as far as the page needs it: the limits of what a debtor may ask
/// for (the built-in default policy's when no file is configured). The watcher checks the
/// whole policy and decides each request; the page only offers within these limits.
#[derive(Debug, Default, Deserialize)]
struct PolicyPauses {
    #[serde(default)]
    pauses: PauseLimits,
}

#[derive(Debug, Default, Deserialize, Serialize)]
struct WatcherPolicyFile {
    policy_file: Option<String>,
}

fn pause_limits(rt: &Runtime) -> anyhow::Result<PauseLimits> {
    let watcher: WatcherPolicyFile = config::section(&rt.figment, "watcher")?;
    let text = match &watcher.policy_file {
        Some(path) => std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("the policy file {path}: {e}"))?,
        None => forfall_domain::policy::DEFAULT_POLICY.to_owned(),
    };
    let parsed: PolicyPauses = toml::from_str(&text).map_err(|e| anyhow::anyhow!("the policy's [pauses]: {e}"))?;
    Ok(parsed.pauses)
}

/// What rebuilds the portal's read model (see [`rebuild`]).
pub fn rebuilder(rt: &Runtime, settings: &PortalSettings, redis: ConnectionManager) -> rebuild::PortalRebuild {
    rebuild::PortalRebuild {
        kafka: rt.config.kafka.clone(),
        topics: read_model_topics(rt),
        codec: rt.codec.clone(),
        redis,
        keys: ViewKeys(rt.keys()),
        retention_secs: settings.closed_retention_days.max(1) * 86_400,
        changelog: rt.topic(&rt.config.topics.portal_changelog),
        // The portal reads its settings at start and stops on bad ones; the default is only
        // for a tool that rebuilds without them.
        link_ttl_secs: config::section::<CreditorSettings>(&rt.figment, "dispatch")
            .map_or(PayLinkSettings::default().ttl_days, |c| c.pay_link.ttl_days)
            * 86_400,
    }
}

/// The topics the read model follows.
fn read_model_topics(rt: &Runtime) -> Vec<String> {
    let t = &rt.config.topics;
    [
        &t.invoices,
        &t.journey_events,
        &t.payments_matched,
        &t.dispatch_outcomes,
        &t.debtor_requests,
    ]
    .into_iter()
    .map(|name| rt.topic(name))
    .collect()
}

/// Runs the portal until shutdown.
pub async fn run(rt: Runtime) -> anyhow::Result<()> {
    let settings: PortalSettings = config::section(&rt.figment, SERVICE)?;
    let creditors: CreditorSettings = config::section(&rt.figment, "dispatch")?;
    rt.config
        .profile
        .refuse_development_secrets(&creditors.pay_link.development_secrets())?;
    for (tenant, creditor) in &creditors.tenants {
        creditor
            .check()
            .map_err(|e| anyhow::anyhow!("dispatch.tenants.{tenant}: {e}"))?;
    }
    let mut pay_base_url = creditors.pay_link.base_url.clone();
    if !pay_base_url.ends_with('/') {
        pay_base_url.push('/');
    }
    let links = PayLinkKeys::new(creditors.pay_link)?;
    let changelog_topic = rt.topic(&rt.config.topics.portal_changelog);
    // Payments under way are few (one a click); one partition keeps them in order.
    changelog::ensure(&rt.config.kafka, &changelog_topic, 1).await?;
    for (tenant, merchant) in &settings.vipps {
        anyhow::ensure!(
            !merchant.base_url.is_empty() && !merchant.client_secret.is_empty() && !merchant.webhook_secret.is_empty(),
            "portal.vipps.{tenant}: base_url, client_id, client_secret, subscription_key, merchant_serial_number and webhook_secret are all needed"
        );
    }
    for (tenant, account) in &settings.stripe {
        anyhow::ensure!(
            !account.base_url.is_empty() && !account.secret_key.is_empty() && !account.webhook_secret.is_empty(),
            "portal.stripe.{tenant}: base_url, secret_key and webhook_secret are all needed"
        );
    }
    let texts = Texts::built_in()?;
    let pauses = pause_limits(&rt)?;
    let renderer = Renderer::new()?;
    let redis = redis_store::connect(&rt.config.redis).await?;
    let metrics = Metrics {
        pages: IntCounterVec::new(
            Opts::new("portal_pages_total", "Debtor pages answered, by result"),
            &["result"],
        )?,
        applied: IntCounterVec::new(
            Opts::new(
                "portal_read_model_records_total",
                "Records applied to the page's read model",
            ),
            &["record"],
        )?,
        requests: IntCounterVec::new(
            Opts::new("portal_requests_total", "Debtors' requests from the page, by result"),
            &["result"],
        )?,
        payments: IntCounterVec::new(
            Opts::new(
                "portal_payments_total",
                "Payments through providers, by provider and result",
            ),
            &["provider", "result"],
        )?,
        webhooks: IntCounterVec::new(
            Opts::new(
                "portal_provider_webhooks_total",
                "Providers' webhook requests, by provider and result",
            ),
            &["provider", "result"],
        )?,
    };
    let counters = [
        metrics.pages.clone(),
        metrics.applied.clone(),
        metrics.requests.clone(),
        metrics.payments.clone(),
        metrics.webhooks.clone(),
    ];
    let vipps_client = vipps::VippsClient::new()?;
    let stripe_client = stripe::StripeClient::new()?;
    let swish_client = swish::SwishClient::new(&settings.swish)?;
    let mut core = None;
    let shell = ServiceShell::start_with_routes(&rt, SERVICE, PORT_OFFSET, |_, producer, readiness| {
        let state = Arc::new(DerivedState::new(
            &rt.keys(),
            SERVICE,
            redis.clone(),
            readiness.clone(),
            rebuilder(&rt, &settings, redis.clone()),
        ));
        let portal = Portal(Arc::new(Inner {
            rt: rt.clone(),
            redis: redis.clone(),
            keys: ViewKeys(rt.keys()),
            state,
            settings: settings.clone(),
            links,
            creditors: creditors.tenants,
            producer: producer.clone(),
            texts,
            renderer,
            metrics,
            vipps: vipps_client,
            stripe: stripe_client,
            swish: swish_client,
            changelog: Changelog::new(changelog_topic.clone()),
            pay_base_url,
            pauses,
            tokens: forfall_platform::api_auth::TenantTokens::new(&rt.config.api, rt.config.profile),
        }));
        core = Some(portal.clone());
        http::routes(portal)
    })
    .await?;
    for counter in counters {
        shell.metrics.registry.register(Box::new(counter))?;
    }
    let portal = core.ok_or_else(|| anyhow::anyhow!("portal routes were not built"))?;
    let consumer = shell.consumer(&rt, SERVICE, &read_model_topics(&rt))?;
    let watching = tokio::spawn(portal.0.state.clone().watch(Duration::from_secs(1)));
    let consumed = run_consumer(consumer, portal, shell.loop_context(&rt)).await;
    watching.abort();
    consumed?;
    Ok(())
}
