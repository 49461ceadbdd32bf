//! Where in its journey an invoice was settled: the measure credit controllers judge a plan by
//! (the Danish utility's "paid before any fee-bearing reminder"), as a small fixed set of stages
//! that a metric can carry as a label.

use crate::journey::{CloseReason, JourneyState, PauseReason};

/// The stage of a journey paid in full, from the state it was in when the payment came.
pub fn stage(before: JourneyState) -> &'static str {
    match before {
        JourneyState::Open => "before_any_message",
        JourneyState::Nudged => "after_nudge",
        JourneyState::Reminded(0 | 1) => "after_reminder_1",
        JourneyState::Reminded(2) => "after_reminder_2",
        JourneyState::Reminded(3) => "after_reminder_3",
        JourneyState::Reminded(_) => "after_reminder_4_or_more",
        JourneyState::Warned => "after_collection_warning",
        JourneyState::HandedOver => "at_agency",
        JourneyState::Paused(PauseReason::Dispute) => "in_dispute",
        JourneyState::Paused(PauseReason::PromiseToPay) => "on_promise_to_pay",
        JourneyState::Paused(PauseReason::Instalments) => "in_instalments",
        JourneyState::Paused(PauseReason::ClaimsPaid) => "claims_paid",
        JourneyState::NeedsPerson => "needs_person",
        // A payment after closing settles nothing (it is a credit balance).
        JourneyState::Closed(CloseReason::Paid) => "already_paid",
        JourneyState::Closed(_) => "after_closing",
    }
}

/// Every stage [`stage`] can give: the label's whole set.
pub const STAGES: [&str; 15] = [
    "before_any_message",
    "after_nudge",
    "after_reminder_1",
    "after_reminder_2",
    "after_reminder_3",
    "after_reminder_4_or_more",
    "after_collection_warning",
    "at_agency",
    "in_dispute",
    "on_promise_to_pay",
    "in_instalments",
    "claims_paid",
    "needs_person",
    "already_paid",
    "after_closing",
];

/// What a journey transition counts for in an experiment's comparison: the debtor assigned,
/// paid in full without or after a fee-bearing step (the Danish utility's measure: settled
/// before any fee), handed to the agency, collected there. `fees_charged`: the journey had
/// been charged a fee by then.
pub fn experiment_outcome(transition_kind: &str, fees_charged: bool) -> Option<&'static str> {
    match transition_kind {
        "plan_chosen" => Some("assigned"),
        "paid" if fees_charged => Some("paid_after_fee"),
        "paid" => Some("paid_without_fee"),
        "handed_over" => Some("handed_over"),
        "paid_at_agency" => Some("paid_at_agency"),
        _ => None,
    }
}

/// Every outcome [`experiment_outcome`] can give.
pub const EXPERIMENT_OUTCOMES: [&str; 5] = [
    "assigned",
    "paid_without_fee",
    "paid_after_fee",
    "handed_over",
    "paid_at_agency",
];

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_stages_credit_controllers_ask_about() {
        assert_eq!(stage(JourneyState::Open), "before_any_message");
        assert_eq!(stage(JourneyState::Nudged), "after_nudge");
        assert_eq!(stage(JourneyState::Reminded(1)), "after_reminder_1");
        assert_eq!(stage(JourneyState::Reminded(2)), "after_reminder_2");
        assert_eq!(stage(JourneyState::Reminded(9)), "after_reminder_4_or_more");
        assert_eq!(stage(JourneyState::HandedOver), "at_agency");
        assert_eq!(stage(JourneyState::Paused(PauseReason::Instalments)), "in_instalments");
    }

    fn any_state() -> impl Strategy<Value = JourneyState> {
        prop_oneof![
            Just(JourneyState::Open),
            Just(JourneyState::Nudged),
            (0u32..1000).prop_map(JourneyState::Reminded),
            Just(JourneyState::Warned),
            Just(JourneyState::HandedOver),
            Just(JourneyState::Closed(CloseReason::Paid)),
            Just(JourneyState::Closed(CloseReason::Credited)),
            Just(JourneyState::Paused(PauseReason::Dispute)),
            Just(JourneyState::Paused(PauseReason::PromiseToPay)),
            Just(JourneyState::Paused(PauseReason::Instalments)),
            Just(JourneyState::Paused(PauseReason::ClaimsPaid)),
            Just(JourneyState::NeedsPerson),
        ]
    }

    proptest! {
        /// The label's values stay a small known set, whatever the state.
        #[test]
        fn every_state_has_one_of_the_known_stages(state in any_state()) {
            prop_assert!(STAGES.contains(&stage(state)));
        }

        /// The stored header's status reads back as the state it was written from, so the
        /// open-invoice counts kept by status give every state's stage.
        #[test]
        fn every_state_label_reads_back(state in any_state()) {
            prop_assert_eq!(JourneyState::from_label(&state.label()), Some(state));
        }
    }

    #[test]
    fn an_unknown_label_is_no_state() {
        for label in ["", "reminded-", "reminded-x", "closed:", "paused:nap", "Open"] {
            assert_eq!(JourneyState::from_label(label), None, "{label}");
        }
    }

    #[test]
    fn experiments_are_compared_on_assignment_settlement_with_and_without_fee_and_hand_off() {
        assert_eq!(experiment_outcome("plan_chosen", false), Some("assigned"));
        assert_eq!(experiment_outcome("paid", false), Some("paid_without_fee"));
        assert_eq!(experiment_outcome("paid", true), Some("paid_after_fee"));
        assert_eq!(experiment_outcome("handed_over", true), Some("handed_over"));
        assert_eq!(experiment_outcome("paid_at_agency", true), Some("paid_at_agency"));
        assert_eq!(experiment_outcome("step_sent", true), None);
        for kind in ["plan_chosen", "paid", "handed_over", "paid_at_agency"] {
            for fee in [false, true] {
                assert!(EXPERIMENT_OUTCOMES.contains(&experiment_outcome(kind, fee).unwrap_or_default()));
            }
        }
    }
}
