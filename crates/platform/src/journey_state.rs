//! The contract between the watcher (which owns journey state) and dispatch (whose last look
//! before sending reads it): where an invoice's journey lives in Redis and which field says
//! whether the debtor may still be contacted about it.

use crate::redis_store::Keys;

/// Hash holding one invoice's journey: `v` (version for compare-and-set), `json` (the journey),
/// `status` (a [`forfall_domain::JourneyState`] label), `step` (the index of the next plan step).
pub fn journey_key(keys: &Keys, tenant: &str, invoice_id: &str) -> String {
    // The hash tag keeps an invoice's keys together in a Redis Cluster slot.
    keys.key(&["journey", &format!("{{{tenant}:{invoice_id}}}")])
}

pub const STATUS_FIELD: &str = "status";

/// Whether a message may be sent, from the stored status label. Unknown state is treated as
/// "do not contact": a message that should have gone can be sent later, one sent wrongly cannot
/// be taken back.
pub fn status_accepts_contact(status: Option<&str>) -> bool {
    matches!(status, Some(s) if s == "open" || s == "nudged" || s == "warned" || s.starts_with("reminded-"))
}

/// What the last look needs: the status, and whether the stored journey already includes the
/// action's own step. The watcher produces an action before it writes the journey (so that
/// nothing is lost on a crash), so for a moment the stored state can lag the action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastLook {
    pub status: Option<String>,
    pub caught_up: bool,
}

pub async fn last_look(
    conn: &mut redis::aio::ConnectionManager,
    keys: &Keys,
    tenant: &str,
    invoice_id: &str,
    step_index: i32,
) -> redis::RedisResult<LastLook> {
    let (status, step): (Option<String>, Option<i64>) = redis::cmd("HMGET")
        .arg(journey_key(keys, tenant, invoice_id))
        .arg(STATUS_FIELD)
        .arg("step")
        .query_async(conn)
        .await?;
    // The journey records a step by moving `step` past it.
    let caught_up = step.is_none_or(|next| next > i64::from(step_index));
    Ok(LastLook { status, caught_up })
}

/// Reads the status for the last look.
pub async fn read_status(
    conn: &mut redis::aio::ConnectionManager,
    keys: &Keys,
    tenant: &str,
    invoice_id: &str,
) -> redis::RedisResult<Option<String>> {
    redis::cmd("HGET")
        .arg(journey_key(keys, tenant, invoice_id))
        .arg(STATUS_FIELD)
        .query_async(conn)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use forfall_domain::journey::{CloseReason, JourneyState};

    #[test]
    fn agrees_with_the_domain_on_who_may_be_contacted() {
        for state in [
            JourneyState::Open,
            JourneyState::Nudged,
            JourneyState::Reminded(2),
            JourneyState::Warned,
            JourneyState::HandedOver,
            JourneyState::Closed(CloseReason::Paid),
            JourneyState::Closed(CloseReason::Credited),
            JourneyState::Closed(CloseReason::Cancelled),
            JourneyState::Paused(forfall_domain::journey::PauseReason::Dispute),
            JourneyState::Paused(forfall_domain::journey::PauseReason::Instalments),
        ] {
            assert_eq!(
                status_accepts_contact(Some(&state.label())),
                state.accepts_contact(),
                "{state:?}"
            );
        }
        assert!(!status_accepts_contact(None));
    }
}
