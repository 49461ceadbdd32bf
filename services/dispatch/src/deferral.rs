//! Actions that fall due outside the debtor's contact hours wait in Redis for the next allowed
//! moment (a sorted set by that moment, the action beside it), and are put back on the actions
//! topic when it comes, to be handled like any other: claim, last look, send. So a payment
//! made overnight still suppresses the morning's message.
//!
//! Putting back is at least once (produce, then forget): two dispatch instances, or a crash
//! between the two, may put an action back twice, and the (action, channel) claim keeps the
//! message single.
//!
//! A held action is a fact only Redis knew, so it goes to dispatch's changelog first (key
//! `h/<event id>`, acknowledged before Redis is written) and leaves it (a tombstone) once it
//! is put back: a Redis that lost it gets it back from there (see [`crate::rebuild`]).

use std::time::Duration;
use tracing::Instrument;

use chrono::{DateTime, Utc};
use forfall_platform::changelog::Changelog;
use forfall_platform::kafka::{Failure, Producer};
use forfall_platform::records::{JourneyAction, derived_id};
use forfall_platform::redis_store::Keys;
use forfall_platform::service::Runtime;
use forfall_platform::telemetry::TraceContext;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

pub(crate) fn due_key(keys: &Keys) -> String {
    keys.key(&["dispatch", "held", "due"])
}

pub(crate) fn actions_key(keys: &Keys) -> String {
    keys.key(&["dispatch", "held", "actions"])
}

/// A held action, as Redis and the changelog keep it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Held {
    pub action: JourneyAction,
    pub until_ms: i64,
}

impl Held {
    /// The changelog key of a held action.
    pub fn changelog_key(event_id: &str) -> String {
        format!("h/{event_id}")
    }

    /// What Redis holds: this form, or (`None`) a bare action held before the changelog existed.
    fn parse(json: &str) -> Result<Option<Held>, serde_json::Error> {
        match serde_json::from_str::<Held>(json) {
            Ok(h) => Ok(Some(h)),
            Err(_) => serde_json::from_str::<JourneyAction>(json).map(|_| None),
        }
    }
}

/// Where holding writes.
pub(crate) struct HeldStore<'a> {
    pub redis: ConnectionManager,
    pub keys: &'a Keys,
    pub changelog: &'a Changelog,
    pub producer: &'a Producer,
}

/// Holds `action` until `until`: on the changelog (acknowledged), then in Redis. Idempotent:
/// a redelivered action is held once.
pub(crate) async fn hold(store: HeldStore<'_>, action: &JourneyAction, until: DateTime<Utc>) -> Result<(), Failure> {
    let held = Held {
        action: action.clone(),
        until_ms: until.timestamp_millis(),
    };
    let json = serde_json::to_string(&held).map_err(|e| Failure::Fatal(e.into()))?;
    let change = store
        .changelog
        .put_keyed(Held::changelog_key(&action.event_id), json.clone().into_bytes());
    store
        .producer
        .send_all(std::slice::from_ref(&change))
        .await
        .map_err(|e| Failure::Transient(anyhow::anyhow!("writing a held action to the changelog: {e}")))?;
    let _: () = redis::pipe()
        .atomic()
        .hset(actions_key(store.keys), &action.event_id, json)
        .zadd(due_key(store.keys), &action.event_id, held.until_ms)
        .query_async(&mut store.redis.clone())
        .await?;
    Ok(())
}

/// Puts held actions whose moment has come back on the actions topic, until aborted.
pub async fn release_due(
    rt: Runtime,
    mut redis: ConnectionManager,
    producer: Producer,
    changelog: Changelog,
    every: Duration,
) {
    let keys = rt.keys();
    let topic = rt.topic(&rt.config.topics.journey_actions);
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        if let Err(e) = release_once(&rt, &mut redis, &keys, &producer, &changelog, &topic).await {
            tracing::warn!(error = %e, "releasing held actions failed; retrying");
        }
    }
}

async fn release_once(
    rt: &Runtime,
    redis: &mut ConnectionManager,
    keys: &Keys,
    producer: &Producer,
    changelog: &Changelog,
    topic: &str,
) -> anyhow::Result<()> {
    let now = rt.clock.now().timestamp_millis();
    let due: Vec<String> = redis::cmd("ZRANGEBYSCORE")
        .arg(due_key(keys))
        .arg("-inf")
        .arg(now)
        .arg("LIMIT")
        .arg(0)
        .arg(500)
        .query_async(redis)
        .await?;
    for event_id in due {
        let json: Option<String> = redis::cmd("HGET")
            .arg(actions_key(keys))
            .arg(&event_id)
            .query_async(redis)
            .await?;
        if let Some(json) = json {
            let (held, on_changelog) = match Held::parse(&json)? {
                Some(h) => (h.action, true),
                None => (serde_json::from_str::<JourneyAction>(&json)?, false),
            };
            let span = tracing::info_span!("release_held", step = %held.step);
            async {
                let released = JourneyAction {
                    event_id: derived_id("action-released", &[&held.event_id]),
                    ..held
                };
                let out = rt
                    .codec
                    .outbound(topic, &released.debtor_id, &released, TraceContext::new_root())
                    .await?;
                producer
                    .send(&out)
                    .await
                    .await
                    .map_err(|e| anyhow::anyhow!("putting a held action back: {e}"))?;
                if on_changelog {
                    let gone = changelog.delete_keyed(Held::changelog_key(&event_id));
                    producer
                        .send_all(std::slice::from_ref(&gone))
                        .await
                        .map_err(|e| anyhow::anyhow!("removing a released action from the changelog: {e}"))?;
                }
                Ok::<(), anyhow::Error>(())
            }
            .instrument(span)
            .await?;
        }
        let _: () = redis::pipe()
            .atomic()
            .zrem(due_key(keys), &event_id)
            .hdel(actions_key(keys), &event_id)
            .query_async(redis)
            .await?;
    }
    Ok(())
}
