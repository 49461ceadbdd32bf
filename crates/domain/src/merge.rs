//! Merging a debtor's claims at hand-off where the law asks for it (Norway: Finanstilsynet's
//! circular 1/2018, on inkassoloven § 17: claims of one debtor from one creditor handed over
//! together form one case, and the agency's fees are computed on the combined principal).
//!
//! When hand-offs fire, those of a debtor in one jurisdiction and currency go as one case, led
//! by the oldest claim. A claim whose own hand-off falls within the policy's merge window joins
//! it too, once the deadline of the collection warning it was given has passed (it may go to an
//! agency today on its own terms, only earlier than its plan). A disputed or paused claim, or
//! one still being worked by its plan, does not join; nor does one in another currency.

use chrono::{DateTime, Duration, Utc};

use crate::journey::{DebtorInvoice, Emit, Fired, Journey, JourneyState, Role, StepFee, StepKind, on_timer_with};
use crate::money::Money;

/// Which claims the law merges: the citation of the rule for this journey's debtor, if any.
pub trait MergeLaw {
    fn merge_citation(&self, journey: &Journey) -> Option<String>;
}

impl<F: Fn(&Journey) -> Option<String>> MergeLaw for F {
    fn merge_citation(&self, journey: &Journey) -> Option<String> {
        self(journey)
    }
}

fn claim_order(j: &Journey) -> (chrono::NaiveDate, String) {
    (j.anchor_due(), j.invoice.invoice_id.clone())
}

fn is_handoff(f: &Fired) -> bool {
    matches!(f.decision.emit, Some(Emit::Handoff { .. }))
}

/// Makes `f` part of the case led by `lead`, saying so in its hand-off transition.
fn join(f: &mut Fired, lead: usize, lead_journey: &Journey, citation: &str) {
    f.decision.emit = None;
    f.role = Role::Covered { lead };
    if let Some(t) = f.decision.transitions.iter_mut().find(|t| t.kind == "handed_over") {
        let merged = format!(
            "merged into the case of invoice {} ({citation})",
            lead_journey.invoice.invoice_number
        );
        t.reason = Some(match t.reason.take() {
            Some(r) => format!("{r}; {merged}"),
            None => merged,
        });
    }
}

/// Merges the hand-offs in `fired` (decided by [`crate::journey::fire_together`] for one
/// debtor's `invoices`) where `law` says so: one lead per jurisdiction and currency keeps its
/// hand-off and lists the others (`Role::Lead { covers }`), which go with it (`Role::Covered`)
/// instead of as cases of their own; claims due to be handed over within `window` are added.
pub fn merge_handoffs(
    invoices: &[DebtorInvoice],
    fired: &mut Vec<Fired>,
    now: DateTime<Utc>,
    window: Duration,
    law: &impl MergeLaw,
) {
    let mut order: Vec<usize> = (0..fired.len())
        .filter(|&p| is_handoff(&fired[p]) && law.merge_citation(&invoices[fired[p].index].journey).is_some())
        .collect();
    order.sort_by_key(|&p| claim_order(&invoices[fired[p].index].journey));
    // Per (jurisdiction, currency): the lead's position in `fired`, and the rule's citation.
    let mut leads: Vec<((crate::Jurisdiction, crate::Currency), usize, String)> = Vec::new();
    let key = |j: &Journey| (j.invoice.jurisdiction, j.invoice.amount.currency);
    for p in order {
        let journey = &invoices[fired[p].index].journey;
        let citation = law.merge_citation(journey).unwrap_or_default();
        match leads.iter().find(|(k, _, _)| *k == key(journey)) {
            Some(&(_, lead, ref citation)) => {
                let lead_index = fired[lead].index;
                let citation = citation.clone();
                join(&mut fired[p], lead_index, &invoices[lead_index].journey, &citation);
                let joined = fired[p].index;
                if let Role::Lead { covers } = &mut fired[lead].role {
                    covers.push(joined);
                }
            }
            None => {
                fired[p].role = Role::Lead { covers: Vec::new() };
                leads.push((key(journey), p, citation));
            }
        }
    }
    if leads.is_empty() {
        return;
    }
    // Claims whose own hand-off is near, in claim order.
    let mut near: Vec<usize> = (0..invoices.len())
        .filter(|&i| invoices[i].fired_step.is_none() && !fired.iter().any(|f| f.index == i))
        .collect();
    near.sort_by_key(|&i| claim_order(&invoices[i].journey));
    for i in near {
        let inv = &invoices[i];
        let j = &inv.journey;
        // Paused (a dispute, a promise, instalments), closed or already with an agency: apart.
        if !j.state.accepts_contact() || law.merge_citation(j).is_none() {
            continue;
        }
        let Some(&(_, lead, ref citation)) = leads.iter().find(|(k, _, _)| *k == key(j)) else {
            continue;
        };
        if !matches!(
            inv.plan.steps.get(j.next_step).map(|s| &s.kind),
            Some(StepKind::Handoff)
        ) {
            continue;
        }
        let Some(own_day) = inv.plan.fire_at(j.next_step, j.anchor_due(), j.invoice.jurisdiction) else {
            continue;
        };
        if own_day > now + window {
            continue;
        }
        let today = j.invoice.jurisdiction.local_day(now);
        if j.warning
            .as_ref()
            .and_then(|w| w.deadline())
            .is_some_and(|d| d >= today)
        {
            // The debtor still has time to pay what the warning asked.
            continue;
        }
        let decision = on_timer_with(
            j.clone(),
            j.next_step,
            &inv.plan,
            StepFee::plain(Money::zero(j.invoice.amount.currency)),
            now,
        );
        if decision.journey.state != JourneyState::HandedOver {
            continue;
        }
        let lead_index = fired[lead].index;
        let citation = citation.clone();
        let mut f = Fired {
            index: i,
            decision,
            role: Role::Alone,
        };
        join(&mut f, lead_index, &invoices[lead_index].journey, &citation);
        if let Role::Lead { covers } = &mut fired[lead].role {
            covers.push(i);
        }
        fired.push(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journey::{FeeSpec, Plan, PlannedStep, Tone, WarningGiven, fire_together};
    use crate::jurisdiction::Jurisdiction;
    use crate::money::Currency;
    use chrono::{NaiveDate, TimeZone};
    use proptest::prelude::*;

    const CITATION: &str = "Finanstilsynet rundskriv 1/2018";

    fn norway(j: &Journey) -> Option<String> {
        (j.invoice.jurisdiction == Jurisdiction::NO).then(|| CITATION.to_owned())
    }

    fn plan() -> Plan {
        let mut plan = Plan::builtin();
        plan.steps = vec![
            PlannedStep {
                name: "inkassovarsel".into(),
                offset_banking_days: 0,
                kind: StepKind::Message {
                    tone: Tone::CollectionWarning,
                    channels: vec!["email".into()],
                },
                fee: FeeSpec::None,
                days_to_pay: Some(14),
            },
            PlannedStep {
                name: "handoff".into(),
                offset_banking_days: 15,
                kind: StepKind::Handoff,
                fee: FeeSpec::None,
                days_to_pay: None,
            },
        ];
        plan
    }

    fn d(y: i32, m: u32, day: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, day).unwrap()
    }

    /// A claim waiting for its hand-off step, its warning sent on its due date.
    fn claim(id: &str, due: NaiveDate, jurisdiction: Jurisdiction, currency: Currency) -> Journey {
        let mut input = crate::invoice::tests::input();
        input.invoice_id = id.into();
        input.invoice_number = format!("N-{id}");
        input.due_date_days = crate::invoice::epoch_days(due);
        input.issue_date_days = crate::invoice::epoch_days(due - Duration::days(14));
        input.amount_minor = 50_000;
        input.currency = currency.code().into();
        input.jurisdiction = jurisdiction.code().into();
        input.payment_reference = None;
        let snapshot = crate::invoice::validate_issued(input).unwrap();
        let mut j = crate::journey::on_invoice(None, snapshot, &plan()).journey;
        j.state = JourneyState::Warned;
        j.next_step = 1;
        j.steps_taken = vec!["inkassovarsel".into()];
        j.warning = Some(WarningGiven {
            date: due,
            step: "inkassovarsel".into(),
            days_to_pay: Some(14),
        });
        j
    }

    fn member(journey: Journey, fired: bool) -> DebtorInvoice {
        DebtorInvoice {
            fee: Money::zero(journey.invoice.amount.currency),
            fee_not_before: None,
            plan: plan(),
            fired_step: fired.then_some(1),
            journey,
        }
    }

    /// When claim `first`'s hand-off falls due.
    fn handoff_time(j: &Journey) -> DateTime<Utc> {
        plan().fire_at(1, j.anchor_due(), j.invoice.jurisdiction).unwrap()
    }

    fn run(invoices: &[DebtorInvoice], now: DateTime<Utc>, window_days: i64) -> Vec<Fired> {
        let mut fired = fire_together(invoices, now, Duration::days(3));
        merge_handoffs(invoices, &mut fired, now, Duration::days(window_days), &norway);
        fired
    }

    #[test]
    fn norwegian_claims_near_each_other_go_as_one_case_led_by_the_oldest() {
        let older = claim("a", d(2026, 3, 2), Jurisdiction::NO, Currency::NOK);
        // Its inkassovarsel's 14 days ran out on 18 March; its own hand-off is two days later.
        let newer = claim("b", d(2026, 3, 4), Jurisdiction::NO, Currency::NOK);
        let far = claim("c", d(2026, 5, 4), Jurisdiction::NO, Currency::NOK);
        let now = handoff_time(&older);
        let invoices = [
            member(newer.clone(), false),
            member(older.clone(), true),
            member(far, false),
        ];
        let fired = run(&invoices, now, 14);
        let lead = fired.iter().find(|f| f.index == 1).unwrap();
        assert_eq!(lead.role, Role::Lead { covers: vec![0] });
        assert!(matches!(lead.decision.emit, Some(Emit::Handoff { .. })));
        let joined = fired.iter().find(|f| f.index == 0).unwrap();
        assert_eq!(joined.role, Role::Covered { lead: 1 });
        assert_eq!(joined.decision.emit, None, "no case of its own");
        assert_eq!(joined.decision.journey.state, JourneyState::HandedOver);
        let reason = joined.decision.transitions[0].reason.clone().unwrap_or_default();
        assert!(
            reason.contains("merged into the case of invoice N-a") && reason.contains(CITATION),
            "{reason}"
        );
        assert!(
            !fired.iter().any(|f| f.index == 2),
            "a claim a month away waits for its own day"
        );
    }

    #[test]
    fn a_claim_whose_warning_still_runs_or_that_is_disputed_stays_apart() {
        let older = claim("a", d(2026, 3, 2), Jurisdiction::NO, Currency::NOK);
        let now = handoff_time(&older);
        let mut fresh_warning = claim("b", d(2026, 3, 9), Jurisdiction::NO, Currency::NOK);
        fresh_warning.warning = Some(WarningGiven {
            date: now.date_naive() - Duration::days(3),
            step: "inkassovarsel".into(),
            days_to_pay: Some(14),
        });
        let mut disputed = claim("c", d(2026, 3, 9), Jurisdiction::NO, Currency::NOK);
        disputed.state = JourneyState::Paused(crate::journey::PauseReason::Dispute);
        let invoices = [
            member(older, true),
            member(fresh_warning, false),
            member(disputed, false),
        ];
        let fired = run(&invoices, now, 14);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].role, Role::Lead { covers: vec![] });
    }

    #[test]
    fn only_where_the_law_merges_and_never_across_currencies() {
        // Two Danish hand-offs at once: two cases.
        let a = claim("a", d(2026, 3, 2), Jurisdiction::DK, Currency::DKK);
        let b = claim("b", d(2026, 3, 2), Jurisdiction::DK, Currency::DKK);
        let now = handoff_time(&a);
        let fired = run(&[member(a, true), member(b, true)], now, 14);
        assert!(fired.iter().all(|f| f.role == Role::Alone && f.decision.emit.is_some()));
        // A Norwegian claim in euros is its own case.
        let nok = claim("a", d(2026, 3, 2), Jurisdiction::NO, Currency::NOK);
        let eur = claim("b", d(2026, 3, 2), Jurisdiction::NO, Currency::EUR);
        let fired = run(&[member(nok, true), member(eur, true)], now, 14);
        assert!(
            fired
                .iter()
                .all(|f| matches!(f.role, Role::Lead { ref covers } if covers.is_empty()))
        );
    }

    fn lists(role: &Role, index: usize) -> bool {
        matches!(role, Role::Lead { covers } if covers.contains(&index))
    }

    proptest! {
        /// Whatever the claims, each goes to the agency once: in exactly one case, as its lead
        /// or listed by one, and a lead lists only claims of its own jurisdiction and currency.
        #[test]
        fn every_claim_handed_over_is_in_exactly_one_case(
            claims in prop::collection::vec((0i64..40, any::<bool>(), 0usize..3, any::<bool>()), 1..8),
            window in 0i64..31,
        ) {
            let base = d(2026, 3, 2);
            let currencies = [Currency::NOK, Currency::NOK, Currency::EUR];
            let invoices: Vec<DebtorInvoice> = claims
                .iter()
                .enumerate()
                .map(|(i, (days, fires, currency, dk))| {
                    let jurisdiction = if *dk { Jurisdiction::DK } else { Jurisdiction::NO };
                    let currency = if *dk { Currency::DKK } else { currencies[*currency] };
                    let j = claim(&format!("c{i}"), base + Duration::days(*days), jurisdiction, currency);
                    member(j, *fires)
                })
                .collect();
            let now = Utc.from_utc_datetime(&(base + Duration::days(40)).and_hms_opt(8, 0, 0).unwrap());
            let fired = run(&invoices, now, window);
            let handed: Vec<&Fired> = fired
                .iter()
                .filter(|f| f.decision.journey.state == JourneyState::HandedOver)
                .collect();
            for f in &handed {
                let in_cases = handed
                    .iter()
                    .filter(|g| g.decision.emit.is_some())
                    .filter(|g| g.index == f.index || lists(&g.role, f.index))
                    .count();
                prop_assert_eq!(in_cases, 1, "claim {} in {} cases", f.index, in_cases);
                if let Role::Lead { covers } = &f.role {
                    for c in covers {
                        let (lead, other) = (&invoices[f.index].journey.invoice, &invoices[*c].journey.invoice);
                        prop_assert_eq!((lead.jurisdiction, lead.amount.currency), (other.jurisdiction, other.amount.currency));
                    }
                }
            }
            // A claim that was not due and not near enough is left alone.
            for f in &fired {
                if invoices[f.index].fired_step.is_none() {
                    let joined = matches!(f.role, Role::Covered { .. });
                    prop_assert!(joined, "claim {} was taken though not due", f.index);
                }
            }
        }
    }
}
