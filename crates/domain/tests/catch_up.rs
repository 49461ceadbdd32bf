//! Late never means a burst: a journey whose timers fire late (a watcher outage, a rebuild, a
//! clock jump) takes its overdue step once and plans the rest from that day, never sends two
//! messages on one day, and never charges fees closer together than the law allows.

use chrono::{DateTime, Duration, NaiveDate, NaiveTime, TimeZone, Utc};
use forfall_domain::invoice::{Contact, IssuedInput, epoch_days, validate_issued};
use forfall_domain::journey::{
    Decision, Emit, FeeSpec, Journey, Plan, PlannedStep, StepKind, TimerChange, Tone, on_invoice, on_timer_with,
};
use forfall_domain::law::{DebtorContext, LawBook};
use forfall_domain::policy::step_fee;
use proptest::prelude::*;

fn invoice(due: NaiveDate) -> IssuedInput {
    IssuedInput {
        tenant: "acme".into(),
        debtor_id: "acme:c-1".into(),
        invoice_id: "inv-1".into(),
        revision: 1,
        invoice_number: "100001".into(),
        issue_date_days: epoch_days(due - Duration::days(14)),
        due_date_days: epoch_days(due),
        amount_minor: 49_900,
        currency: "DKK".into(),
        jurisdiction: "DK".into(),
        debtor_kind: "consumer".into(),
        payment_reference: Some("+71<000000001000014+".into()),
        description: Some("Electricity, February".into()),
        contact: Contact::default(),
        reminder_fee_agreed: false,
    }
}

fn message(name: &str, offset: i32, tone: Tone, fee: FeeSpec, days_to_pay: Option<u32>) -> PlannedStep {
    PlannedStep {
        name: name.into(),
        offset_banking_days: offset,
        kind: StepKind::Message {
            tone,
            channels: vec!["email".into()],
        },
        fee,
        days_to_pay,
    }
}

/// A Danish plan with a heads-up before the due date and three fee-bearing reminders spaced as
/// tightly as renteloven § 9 b allows (10 days apart, 10 days to pay).
fn fee_plan() -> Plan {
    let fee = || FeeSpec::StatutoryMaximum;
    Plan {
        name: "firm".into(),
        version: "test-v1".into(),
        steps: vec![
            message("heads-up", -3, Tone::Nudge, FeeSpec::None, None),
            message("nudge", 0, Tone::Nudge, FeeSpec::None, None),
            message("reminder-1", 8, Tone::Reminder, fee(), Some(10)),
            message("reminder-2", 16, Tone::Reminder, fee(), Some(10)),
            message("reminder-3", 24, Tone::Reminder, fee(), Some(10)),
            PlannedStep {
                name: "handoff".into(),
                offset_banking_days: 34,
                kind: StepKind::Handoff,
                fee: FeeSpec::None,
                days_to_pay: None,
            },
        ],
        send_time: NaiveTime::from_hms_opt(9, 0, 0).unwrap(),
    }
}

/// What happened at one firing.
struct Fired {
    at: DateTime<Utc>,
    decision: Decision,
}

/// Runs a journey's timers to the end, as the watcher would: each timer fires at its moment,
/// unless the watcher is down then, in which case it fires when the watcher is back.
fn run(plan: &Plan, law: &LawBook, due: NaiveDate, down: (DateTime<Utc>, DateTime<Utc>)) -> (Journey, Vec<Fired>) {
    let opened = on_invoice(None, validate_issued(invoice(due)).unwrap(), plan);
    let mut journey = opened.journey;
    let mut timer = opened.timer;
    let mut fired = Vec::new();
    let ctx = DebtorContext {
        jurisdiction: journey.invoice.jurisdiction,
        kind: journey.invoice.debtor_kind,
        fee_agreed_in_advance: false,
    };
    for _ in 0..40 {
        let TimerChange::Schedule { step_index, fire_at } = timer else {
            break;
        };
        let at = if fire_at >= down.0 && fire_at < down.1 {
            down.1
        } else {
            fire_at
        };
        let today = journey.invoice.jurisdiction.local_day(at);
        let fee = step_fee(
            &plan.steps[step_index],
            &ctx,
            law,
            journey.anchor_due(),
            &journey.fee_dates,
            today,
        );
        let decision = on_timer_with(journey.clone(), step_index, plan, fee, at);
        journey = decision.journey.clone();
        timer = decision.timer.clone();
        fired.push(Fired { at, decision });
    }
    (journey, fired)
}

fn copenhagen_day(at: DateTime<Utc>) -> NaiveDate {
    at.with_timezone(&chrono_tz::Europe::Copenhagen).date_naive()
}

fn sent(fired: &[Fired]) -> Vec<(DateTime<Utc>, String)> {
    fired
        .iter()
        .filter_map(|f| match &f.decision.emit {
            Some(Emit::Message { step, .. }) | Some(Emit::Handoff { step }) => Some((f.at, step.name.clone())),
            Some(Emit::FreshLink { .. }) => Some((f.at, "fresh_link".to_owned())),
            None => None,
        })
        .collect()
}

#[test]
fn a_watcher_stopped_for_30_days_sends_one_message_then_keeps_the_spacing() {
    let law = LawBook::builtin().unwrap();
    let plan = fee_plan();
    let due = NaiveDate::from_ymd_opt(2026, 3, 16).unwrap(); // a Monday
    let down_from = Utc.with_ymd_and_hms(2026, 3, 10, 0, 0, 0).unwrap();
    let back = down_from + Duration::days(30);
    let (journey, fired) = run(&plan, &law, due, (down_from, back));
    let messages = sent(&fired);
    let at_catch_up: Vec<_> = messages.iter().filter(|(at, _)| *at == back).collect();
    assert_eq!(
        at_catch_up.len(),
        1,
        "one message when the watcher is back, not every overdue step: {messages:?}"
    );
    // The heads-up's moment passed: skipped, with its reason, never silently.
    let skipped: Vec<_> = fired
        .iter()
        .flat_map(|f| &f.decision.transitions)
        .filter(|t| t.kind == "step_skipped")
        .collect();
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].step.as_deref(), Some("heads-up"));
    assert_eq!(
        journey.steps_taken,
        vec!["nudge", "reminder-1", "reminder-2", "reminder-3", "handoff"],
        "every step after the outage is still taken"
    );
    let late_note = fired
        .iter()
        .flat_map(|f| &f.decision.transitions)
        .find(|t| t.kind == "step_sent")
        .and_then(|t| t.reason.clone())
        .unwrap_or_default();
    assert!(late_note.contains("taken late"), "{late_note}");
    // After the catch-up the plan's spacing holds again: 8 banking days from nudge to reminder.
    let days: Vec<NaiveDate> = messages.iter().map(|(at, _)| copenhagen_day(*at)).collect();
    assert!(days.windows(2).all(|w| (w[1] - w[0]).num_days() >= 8), "{days:?}");
    assert_eq!(journey.fee_dates.len(), 3);
}

#[test]
fn a_fee_the_law_does_not_yet_allow_waits_for_its_day() {
    // The previous fee was charged yesterday (a postponement, a policy change, a re-plan): the
    // next fee-bearing reminder is not sent until ten days after it.
    let law = LawBook::builtin().unwrap();
    let plan = fee_plan();
    let due = NaiveDate::from_ymd_opt(2026, 3, 16).unwrap();
    let mut journey = on_invoice(None, validate_issued(invoice(due)).unwrap(), &plan).journey;
    journey.next_step = 3;
    journey.state = forfall_domain::journey::JourneyState::Reminded(1);
    let yesterday = NaiveDate::from_ymd_opt(2026, 4, 7).unwrap();
    journey.fee_dates = vec![yesterday];
    let now = Utc.with_ymd_and_hms(2026, 4, 8, 7, 0, 0).unwrap();
    let ctx = DebtorContext {
        jurisdiction: journey.invoice.jurisdiction,
        kind: journey.invoice.debtor_kind,
        fee_agreed_in_advance: false,
    };
    let fee = step_fee(&plan.steps[3], &ctx, &law, due, &journey.fee_dates, copenhagen_day(now));
    assert!(fee.amount.minor > 0);
    let d = on_timer_with(journey.clone(), 3, &plan, fee, now);
    assert_eq!(d.emit, None, "nothing is sent before the law's day");
    assert_eq!(d.journey.fees_minor, journey.fees_minor);
    assert_eq!(d.transitions[0].kind, "step_deferred");
    let TimerChange::Schedule { step_index, fire_at } = d.timer else {
        panic!("the step is looked at again: {:?}", d.timer)
    };
    assert_eq!(step_index, 3);
    assert_eq!(copenhagen_day(fire_at), yesterday + Duration::days(10));
    // On that day it goes out, with its fee.
    let fee = step_fee(
        &plan.steps[3],
        &ctx,
        &law,
        due,
        &journey.fee_dates,
        copenhagen_day(fire_at),
    );
    let d = on_timer_with(d.journey, 3, &plan, fee, fire_at);
    assert!(matches!(d.emit, Some(Emit::Message { .. })));
    assert_eq!(d.journey.fee_dates, vec![yesterday, yesterday + Duration::days(10)]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Whatever the outage (when, how long), no two messages go out on one day, fees are at
    /// least the law's ten days apart and never more than three, the hand-off comes last, and
    /// every step is either taken or skipped with a reason.
    #[test]
    fn no_outage_makes_a_burst_or_an_unlawful_fee(
        due_offset in 0i64..28,
        start_hours in -200i64..1200,
        length_hours in 0i64..1500,
    ) {
        let law = LawBook::builtin().unwrap();
        let plan = fee_plan();
        let due = NaiveDate::from_ymd_opt(2026, 2, 2).unwrap() + Duration::days(due_offset);
        let start = Utc.from_utc_datetime(&due.and_hms_opt(0, 0, 0).unwrap()) + Duration::hours(start_hours);
        let (journey, fired) = run(&plan, &law, due, (start, start + Duration::hours(length_hours)));
        let messages = sent(&fired);
        let days: Vec<NaiveDate> = messages.iter().map(|(at, _)| copenhagen_day(*at)).collect();
        prop_assert!(days.windows(2).all(|w| w[0] < w[1]), "two messages on one day: {:?}", messages);
        let fees = &journey.fee_dates;
        prop_assert!(fees.len() <= 3);
        prop_assert!(fees.windows(2).all(|w| (w[1] - w[0]).num_days() >= 10), "fees {:?}", fees);
        prop_assert_eq!(messages.last().map(|(_, s)| s.as_str()), Some("handoff"));
        let skipped = fired
            .iter()
            .flat_map(|f| &f.decision.transitions)
            .filter(|t| t.kind == "step_skipped")
            .count();
        prop_assert_eq!(journey.steps_taken.len() + skipped, plan.steps.len());
    }
}
