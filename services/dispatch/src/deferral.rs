//! Actions that fall due outside the debtor's contact hours wait in Redis for the next allowed
//! moment (a sorted set by that moment, the action beside it), and are put back on the actions
//! topic when it comes, to be handled like any other: claim, last look, send. So a payment
//! made overnight still suppresses the morning's message.
//!
//! Putting back is at least once (produce, then forget): two dispatch instances, or a crash
//! between the two, may put an action back twice, and the (action, channel) claim keeps the
//! message single.

use std::time::Duration;

use chrono::{DateTime, Utc};
use forfall_platform::kafka::{Failure, Producer};
use forfall_platform::records::{JourneyAction, derived_id};
use forfall_platform::redis_store::Keys;
use forfall_platform::service::Runtime;
use forfall_platform::telemetry::TraceContext;
use redis::aio::ConnectionManager;

fn due_key(keys: &Keys) -> String {
    keys.key(&["dispatch", "held", "due"])
}

fn actions_key(keys: &Keys) -> String {
    keys.key(&["dispatch", "held", "actions"])
}

/// Holds `action` until `until`. Idempotent: a redelivered action is held once.
pub async fn hold(
    redis: &mut ConnectionManager,
    keys: &Keys,
    action: &JourneyAction,
    until: DateTime<Utc>,
) -> Result<(), Failure> {
    let json = serde_json::to_string(action).map_err(|e| Failure::Fatal(e.into()))?;
    let _: () = redis::pipe()
        .atomic()
        .hset(actions_key(keys), &action.event_id, json)
        .zadd(due_key(keys), &action.event_id, until.timestamp_millis())
        .query_async(redis)
        .await?;
    Ok(())
}

/// Puts held actions whose moment has come back on the actions topic, until aborted.
pub async fn release_due(rt: Runtime, mut redis: ConnectionManager, producer: Producer, every: Duration) {
    let keys = rt.keys();
    let topic = rt.topic(&rt.config.topics.journey_actions);
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        if let Err(e) = release_once(&rt, &mut redis, &keys, &producer, &topic).await {
            tracing::warn!(error = %e, "releasing held actions failed; retrying");
        }
    }
}

async fn release_once(
    rt: &Runtime,
    redis: &mut ConnectionManager,
    keys: &Keys,
    producer: &Producer,
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
            let held: JourneyAction = serde_json::from_str(&json)?;
            let span = tracing::info_span!("release_held", step = %held.step);
            let _entered = span.enter();
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
