//! The messages of a journey, kept as evidence for a hand-off: every message the debtor was
//! sent (or that may have reached them), on which channel, when, what became of it, and a digest
//! of its content. An agency, a court or a supervisor asks exactly this: was the debtor told,
//! and what were they told.
//!
//! A message's outcomes arrive one by one and may come again or out of order (sent, then
//! delivered; a receipt before the redelivered "sent"): [`record`] keeps one entry per message
//! and channel, the furthest it got, the first time it went out and the first digest seen.

use serde::{Deserialize, Serialize};

/// How far a message got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// The provider refused it; it did not reach the debtor.
    Failed,
    /// Handed to the provider without an answer: it may have reached the debtor.
    Unknown,
    /// The provider took it.
    Sent,
    /// The provider could not deliver it after taking it.
    Bounced,
    /// The provider confirmed delivery.
    Delivered,
}

impl Delivery {
    pub fn code(self) -> &'static str {
        match self {
            Delivery::Failed => "failed",
            Delivery::Unknown => "unknown",
            Delivery::Sent => "sent",
            Delivery::Bounced => "bounced",
            Delivery::Delivered => "delivered",
        }
    }
}

/// One message on one channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageEvidence {
    pub action_id: String,
    /// The plan step it was sent for (the lead invoice's, for a combined message).
    pub step: String,
    pub channel: String,
    /// When it first went out, UTC milliseconds.
    pub at_ms: i64,
    pub delivery: Delivery,
    /// SHA-256 (hex) of the content the channel carried.
    pub content_sha256: Option<String>,
    pub provider_message_id: Option<String>,
}

/// Adds what became of a message to `messages` (kept in the order they went out); whether
/// anything changed.
pub fn record(messages: &mut Vec<MessageEvidence>, news: MessageEvidence) -> bool {
    let Some(known) = messages
        .iter_mut()
        .find(|m| m.action_id == news.action_id && m.channel == news.channel)
    else {
        let at = messages.partition_point(|m| m.at_ms <= news.at_ms);
        messages.insert(at, news);
        return true;
    };
    let before = known.clone();
    // Delivered and bounced are the provider's last word; neither undoes the other.
    if news.delivery > known.delivery && known.delivery < Delivery::Bounced {
        known.delivery = news.delivery;
    }
    known.at_ms = known.at_ms.min(news.at_ms);
    if known.content_sha256.is_none() {
        known.content_sha256 = news.content_sha256;
    }
    if known.provider_message_id.is_none() {
        known.provider_message_id = news.provider_message_id;
    }
    let changed = *known != before;
    if changed {
        messages.sort_by_key(|m| m.at_ms);
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn news(action: &str, channel: &str, at_ms: i64, delivery: Delivery, digest: Option<&str>) -> MessageEvidence {
        MessageEvidence {
            action_id: action.into(),
            step: "reminder-1".into(),
            channel: channel.into(),
            at_ms,
            delivery,
            content_sha256: digest.map(str::to_owned),
            provider_message_id: None,
        }
    }

    #[test]
    fn one_entry_per_message_and_channel_the_furthest_it_got() {
        let mut messages = Vec::new();
        assert!(record(
            &mut messages,
            news("a1", "email", 100, Delivery::Sent, Some("d1"))
        ));
        assert!(record(
            &mut messages,
            news("a1", "email", 900, Delivery::Delivered, None)
        ));
        assert!(
            !record(&mut messages, news("a1", "email", 100, Delivery::Sent, Some("d1"))),
            "again"
        );
        assert!(record(&mut messages, news("a1", "sms", 120, Delivery::Failed, None)));
        assert_eq!(messages.len(), 2);
        assert_eq!(
            (
                messages[0].delivery,
                messages[0].at_ms,
                messages[0].content_sha256.as_deref()
            ),
            (Delivery::Delivered, 100, Some("d1"))
        );
        assert_eq!(messages[1].delivery, Delivery::Failed);
    }

    #[test]
    fn a_receipt_before_its_send_keeps_the_send_time_and_digest() {
        let mut messages = Vec::new();
        record(&mut messages, news("a1", "sms", 500, Delivery::Delivered, None));
        record(&mut messages, news("a1", "sms", 400, Delivery::Sent, Some("d")));
        assert_eq!(messages.len(), 1);
        assert_eq!(
            (
                messages[0].delivery,
                messages[0].at_ms,
                messages[0].content_sha256.as_deref()
            ),
            (Delivery::Delivered, 400, Some("d"))
        );
    }

    #[test]
    fn delivered_and_bounced_are_final() {
        let mut messages = Vec::new();
        record(&mut messages, news("a1", "email", 1, Delivery::Bounced, None));
        record(&mut messages, news("a1", "email", 2, Delivery::Delivered, None));
        assert_eq!(messages[0].delivery, Delivery::Bounced);
    }

    fn any_news() -> impl Strategy<Value = MessageEvidence> {
        (
            prop::sample::select(vec!["a1", "a2", "a3"]),
            prop::sample::select(vec!["email", "sms"]),
            0i64..1_000,
            prop::sample::select(vec![
                Delivery::Failed,
                Delivery::Unknown,
                Delivery::Sent,
                Delivery::Bounced,
                Delivery::Delivered,
            ]),
            prop::option::of(prop::sample::select(vec!["d1", "d2"])),
        )
            .prop_map(|(a, c, at, d, digest)| news(a, c, at, d, digest))
    }

    proptest! {
        #[test]
        fn outcomes_in_any_order_and_repeated_keep_one_ordered_entry_each(
            outcomes in prop::collection::vec(any_news(), 0..30),
        ) {
            let mut messages = Vec::new();
            for n in &outcomes {
                record(&mut messages, n.clone());
                // Applying the same outcome again changes nothing.
                prop_assert!(!record(&mut messages, n.clone()));
            }
            let mut keys: Vec<(String, String)> =
                messages.iter().map(|m| (m.action_id.clone(), m.channel.clone())).collect();
            keys.sort();
            keys.dedup();
            prop_assert_eq!(keys.len(), messages.len());
            prop_assert!(messages.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
            for m in &messages {
                let same: Vec<&MessageEvidence> = outcomes
                    .iter()
                    .filter(|n| n.action_id == m.action_id && n.channel == m.channel)
                    .collect();
                prop_assert_eq!(m.at_ms, same.iter().map(|n| n.at_ms).min().unwrap_or_default());
                // Never behind what any outcome said, unless the provider's last word came first.
                let furthest = same.iter().map(|n| n.delivery).max().unwrap_or(Delivery::Failed);
                prop_assert!(m.delivery == furthest || m.delivery >= Delivery::Bounced);
            }
        }
    }
}
