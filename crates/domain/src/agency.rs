//! What the collection agency's word on a case does to the invoice's journey.
//!
//! Once handed over, the journey takes no more steps; what happens next is the agency's. Its
//! answers still matter to the creditor: a case the agency refuses, gives back or closes
//! unpaid is nobody's until a person takes it up, so it goes to [`JourneyState::NeedsPerson`]
//! (counted and alerted by the service); a case the agency collected in full closes the
//! invoice. Everything else is written on the invoice's timeline and changes nothing. News
//! about a journey that has moved on (paid to the creditor meanwhile, say) is recorded, never
//! allowed to reopen it.

use crate::journey::{CloseReason, Decision, Journey, JourneyState, TimerChange, Transition};
use crate::money::Money;

/// The agency's word on a case, or hand-off's on delivering to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgencyNews {
    /// The agency took the case (its reference, when it gave one).
    CaseAccepted { reference: Option<String> },
    /// The agency refused the case, with its reason.
    CaseRejected { reason: String },
    /// The agency is working the case.
    InCollection,
    /// The agency collected part of the claim: what it collected in all, when it said.
    PartlyPaid { collected: Option<Money> },
    /// The agency collected the claim.
    Paid { collected: Option<Money> },
    /// The agency gave the case back to the creditor.
    Returned { reason: Option<String> },
    /// The agency closed the case.
    Closed { reason: Option<String> },
    /// Hand-off told the agency of money the creditor received: the case recalled (paid in
    /// full) or the payment booked on it.
    PaymentReported { recalled: bool },
    /// The agency would not take the report of a payment: it may still be collecting money
    /// the debtor has paid.
    PaymentReportRefused { reason: String },
}

impl AgencyNews {
    /// The transition kind it is recorded as (stable: metrics and alerts name them).
    pub fn kind(&self, from: JourneyState) -> &'static str {
        let with_agency = from == JourneyState::HandedOver;
        match self {
            AgencyNews::CaseAccepted { .. } => "handoff_accepted",
            AgencyNews::CaseRejected { .. } => "handoff_rejected",
            AgencyNews::InCollection => "agency_collecting",
            AgencyNews::PartlyPaid { .. } => "agency_collected_part",
            AgencyNews::Paid { .. } => "paid_at_agency",
            AgencyNews::Returned { .. } => "handoff_returned",
            AgencyNews::Closed { .. } if with_agency => "agency_closed_unpaid",
            AgencyNews::Closed { .. } => "agency_closed",
            AgencyNews::PaymentReported { recalled: true } => "case_recalled",
            AgencyNews::PaymentReported { recalled: false } => "payment_reported_to_agency",
            AgencyNews::PaymentReportRefused { .. } => "payment_report_refused",
        }
    }

    fn reason(&self) -> Option<String> {
        let collected = |c: &Option<Money>| c.map(|m| format!("the agency has collected {m}"));
        match self {
            AgencyNews::CaseAccepted { reference } => Some(match reference {
                Some(r) => format!("the agency took the case as {r}"),
                None => "the agency took the case".to_owned(),
            }),
            AgencyNews::CaseRejected { reason } => Some(format!("the agency refused the case: {reason}")),
            AgencyNews::InCollection => None,
            AgencyNews::PartlyPaid { collected: c } | AgencyNews::Paid { collected: c } => collected(c),
            AgencyNews::Returned { reason } => Some(match reason {
                Some(r) => format!("the agency gave the case back: {r}"),
                None => "the agency gave the case back".to_owned(),
            }),
            AgencyNews::Closed { reason } => reason.as_ref().map(|r| format!("the agency closed the case: {r}")),
            AgencyNews::PaymentReported { .. } => None,
            AgencyNews::PaymentReportRefused { reason } => {
                Some(format!("the agency refused the report of a payment: {reason}"))
            }
        }
    }

    /// Where the journey goes from `from`, if anywhere.
    fn moves_to(&self, from: JourneyState) -> Option<JourneyState> {
        let with_agency = from == JourneyState::HandedOver;
        match self {
            AgencyNews::CaseRejected { .. } | AgencyNews::Returned { .. } | AgencyNews::Closed { .. }
                if with_agency =>
            {
                Some(JourneyState::NeedsPerson)
            }
            // A case the agency collected is settled, also one a person was looking at.
            AgencyNews::Paid { .. } if with_agency || from == JourneyState::NeedsPerson => {
                Some(JourneyState::Closed(CloseReason::Paid))
            }
            _ => None,
        }
    }
}

/// Applies the agency's `news` to the journey of the invoice its case is for.
pub fn on_agency_news(mut journey: Journey, news: &AgencyNews) -> Decision {
    let from = journey.state;
    let to = news.moves_to(from).unwrap_or(from);
    if to != from && to == JourneyState::Closed(CloseReason::Paid) {
        // Settled through the agency: nothing more is owed the creditor on this invoice, and
        // money the debtor sends the creditor later is an overpayment.
        let open = journey.outstanding().minor;
        journey.paid_minor = journey.paid_minor.saturating_add(open);
    }
    journey.state = to;
    Decision {
        journey,
        transitions: vec![Transition {
            kind: news.kind(from),
            from,
            to,
            step: None,
            rule: None,
            reason: news.reason(),
            propensity: None,
        }],
        timer: if to == from {
            TimerChange::Keep
        } else {
            TimerChange::Cancel
        },
        emit: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journey::{PauseReason, Plan};
    use crate::money::Currency;
    use chrono::NaiveDate;
    use proptest::prelude::*;

    fn journey(state: JourneyState) -> Journey {
        let mut input = crate::invoice::tests::input();
        input.due_date_days = crate::invoice::epoch_days(NaiveDate::from_ymd_opt(2026, 3, 2).unwrap());
        input.amount_minor = 125_000;
        input.currency = "NOK".into();
        input.jurisdiction = "NO".into();
        input.payment_reference = None;
        let snapshot = crate::invoice::validate_issued(input).unwrap();
        let mut journey = crate::journey::on_invoice(None, snapshot, &Plan::builtin()).journey;
        journey.fees_minor = 3_500;
        journey.state = state;
        journey
    }

    fn nok(minor: i64) -> Money {
        Money::new(minor, Currency::NOK)
    }

    #[test]
    fn a_case_the_agency_will_not_work_waits_for_a_person() {
        for (news, kind) in [
            (
                AgencyNews::CaseRejected {
                    reason: "debtor deceased".into(),
                },
                "handoff_rejected",
            ),
            (AgencyNews::Returned { reason: None }, "handoff_returned"),
            (
                AgencyNews::Closed {
                    reason: Some("no assets".into()),
                },
                "agency_closed_unpaid",
            ),
        ] {
            let d = on_agency_news(journey(JourneyState::HandedOver), &news);
            assert_eq!(d.journey.state, JourneyState::NeedsPerson, "{news:?}");
            assert_eq!(d.transitions[0].kind, kind);
            assert_eq!(d.timer, TimerChange::Cancel);
            assert!(
                !d.journey.state.accepts_contact(),
                "nobody writes to the debtor meanwhile"
            );
        }
        let d = on_agency_news(
            journey(JourneyState::HandedOver),
            &AgencyNews::CaseRejected {
                reason: "debtor deceased".into(),
            },
        );
        assert_eq!(
            d.transitions[0].reason.as_deref(),
            Some("the agency refused the case: debtor deceased")
        );
    }

    #[test]
    fn a_claim_the_agency_collected_closes_the_invoice_as_paid() {
        let d = on_agency_news(
            journey(JourneyState::HandedOver),
            &AgencyNews::Paid {
                collected: Some(nok(140_000)),
            },
        );
        assert_eq!(d.journey.state, JourneyState::Closed(CloseReason::Paid));
        assert_eq!(d.journey.outstanding(), nok(0));
        assert_eq!(d.transitions[0].kind, "paid_at_agency");
        assert_eq!(
            d.transitions[0].reason,
            Some(format!("the agency has collected {}", nok(140_000)))
        );
        // Also one a person was looking at.
        let d = on_agency_news(
            journey(JourneyState::NeedsPerson),
            &AgencyNews::Paid { collected: None },
        );
        assert_eq!(d.journey.state, JourneyState::Closed(CloseReason::Paid));
    }

    #[test]
    fn the_rest_is_the_timeline_only() {
        for news in [
            AgencyNews::CaseAccepted {
                reference: Some("AG-1".into()),
            },
            AgencyNews::InCollection,
            AgencyNews::PartlyPaid {
                collected: Some(nok(50_000)),
            },
            AgencyNews::PaymentReported { recalled: false },
            AgencyNews::PaymentReportRefused {
                reason: "unknown case".into(),
            },
        ] {
            let before = journey(JourneyState::HandedOver);
            let d = on_agency_news(before.clone(), &news);
            assert_eq!(d.journey, before, "{news:?}");
            assert_eq!(d.timer, TimerChange::Keep);
            assert_eq!(d.transitions.len(), 1);
        }
    }

    #[test]
    fn news_about_a_journey_that_moved_on_does_not_reopen_it() {
        // Paid to the creditor after hand-off; then the agency's late word arrives.
        for news in [
            AgencyNews::CaseRejected { reason: "x".into() },
            AgencyNews::Returned { reason: None },
            AgencyNews::Closed { reason: None },
            AgencyNews::Paid { collected: None },
        ] {
            let before = journey(JourneyState::Closed(CloseReason::Paid));
            let d = on_agency_news(before.clone(), &news);
            assert_eq!(d.journey.state, before.state, "{news:?}");
            assert_eq!(d.journey.paid_minor, before.paid_minor);
        }
        let d = on_agency_news(
            journey(JourneyState::Closed(CloseReason::Paid)),
            &AgencyNews::Closed { reason: None },
        );
        assert_eq!(d.transitions[0].kind, "agency_closed");
    }

    fn any_state() -> impl Strategy<Value = JourneyState> {
        prop_oneof![
            Just(JourneyState::Open),
            Just(JourneyState::Nudged),
            (1u32..4).prop_map(JourneyState::Reminded),
            Just(JourneyState::Warned),
            Just(JourneyState::HandedOver),
            Just(JourneyState::NeedsPerson),
            Just(JourneyState::Closed(CloseReason::Paid)),
            Just(JourneyState::Closed(CloseReason::Credited)),
            Just(JourneyState::Closed(CloseReason::Cancelled)),
            Just(JourneyState::Paused(PauseReason::Dispute)),
        ]
    }

    fn any_news() -> impl Strategy<Value = AgencyNews> {
        prop_oneof![
            Just(AgencyNews::CaseAccepted { reference: None }),
            Just(AgencyNews::CaseRejected { reason: "r".into() }),
            Just(AgencyNews::InCollection),
            (0i64..500_000).prop_map(|m| AgencyNews::PartlyPaid {
                collected: Some(nok(m))
            }),
            (0i64..500_000).prop_map(|m| AgencyNews::Paid {
                collected: Some(nok(m))
            }),
            Just(AgencyNews::Returned { reason: None }),
            Just(AgencyNews::Closed { reason: None }),
            any::<bool>().prop_map(|recalled| AgencyNews::PaymentReported { recalled }),
            Just(AgencyNews::PaymentReportRefused { reason: "r".into() }),
        ]
    }

    proptest! {
        #[test]
        fn agency_news_never_reopens_contact_and_applies_once(
            state in any_state(),
            news in prop::collection::vec(any_news(), 1..6),
        ) {
            let mut j = journey(state);
            for n in &news {
                let before = j.clone();
                let d = on_agency_news(j, n);
                // Nobody is written to because of the agency's word.
                prop_assert!(!d.journey.state.accepts_contact() || d.journey.state == before.state);
                // Only a case with the agency (or waiting for a person, when collected) moves.
                if d.journey.state != before.state {
                    prop_assert!(matches!(before.state, JourneyState::HandedOver | JourneyState::NeedsPerson));
                }
                // A closed invoice stays closed as it was.
                if let JourneyState::Closed(_) = before.state {
                    prop_assert_eq!(&d.journey, &before);
                }
                // The same word again changes nothing more.
                let again = on_agency_news(d.journey.clone(), n);
                prop_assert_eq!(&again.journey, &d.journey);
                prop_assert_eq!(d.transitions.len(), 1);
                j = d.journey;
            }
        }
    }
}
