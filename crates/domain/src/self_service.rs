//! What the debtor's page offers within the policy's pause limits ([`PauseLimits`]): the
//! instalment plans to choose from and the dates a due date may move to. The watcher decides
//! each request ([`crate::journey::on_request`]); these only offer what it grants, so that the
//! debtor is not shown a choice that is then refused.

use chrono::{Months, NaiveDate};

use crate::journey::PauseLimits;
use crate::money::{Money, split_even};

/// Days from the agreement to the first instalment: time for the first transfer.
pub const FIRST_INSTALMENT_AFTER_DAYS: u64 = 14;

/// A plan of `count` instalments for `owed`, agreed `today`: the first in
/// [`FIRST_INSTALMENT_AFTER_DAYS`], then one a month on the same day (or the month's last day),
/// amounts as equal as can be with the odd minor units first. `None` when the limits do not
/// allow it: fewer than two or more than `max_instalments`, beyond `max_instalment_span_days`,
/// or an instalment of nothing.
pub fn instalment_plan(
    owed: Money,
    today: NaiveDate,
    count: usize,
    limits: &PauseLimits,
) -> Option<Vec<(NaiveDate, Money)>> {
    if count < 2 || count > limits.max_instalments || owed.minor < count as i64 {
        return None;
    }
    let first = today.checked_add_days(chrono::Days::new(FIRST_INSTALMENT_AFTER_DAYS))?;
    let dates: Vec<NaiveDate> = (0..count)
        .map(|k| first.checked_add_months(Months::new(u32::try_from(k).ok()?)))
        .collect::<Option<_>>()?;
    let last = *dates.last()?;
    if (last - today).num_days() > limits.max_instalment_span_days {
        return None;
    }
    let amounts = split_even(owed, count).ok()?;
    Some(dates.into_iter().zip(amounts).collect())
}

/// The numbers of instalments the page offers for `owed` today, fewest first.
pub fn instalment_counts(owed: Money, today: NaiveDate, limits: &PauseLimits) -> Vec<usize> {
    (2..=limits.max_instalments)
        .filter(|n| instalment_plan(owed, today, *n, limits).is_some())
        .collect()
}

/// The days a due date may be postponed to: from the day after the current one (and not before
/// tomorrow) to `max_postpone_days` past the original; `None` when no postponement is left or
/// the window is empty.
pub fn postpone_window(
    original_due: NaiveDate,
    current_due: NaiveDate,
    postponements: u32,
    today: NaiveDate,
    limits: &PauseLimits,
) -> Option<(NaiveDate, NaiveDate)> {
    if postponements >= limits.max_postponements {
        return None;
    }
    let earliest = current_due.succ_opt()?.max(today.succ_opt()?);
    let latest = original_due.checked_add_days(chrono::Days::new(u64::try_from(limits.max_postpone_days).ok()?))?;
    (earliest <= latest).then_some((earliest, latest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Currency;
    use proptest::prelude::*;

    fn d(y: i32, m: u32, day: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, day).unwrap()
    }

    #[test]
    fn three_instalments_a_month_apart_from_two_weeks_on() {
        let plan = instalment_plan(
            Money::new(100_000, Currency::NOK),
            d(2026, 1, 17),
            3,
            &PauseLimits::default(),
        )
        .unwrap();
        assert_eq!(
            plan,
            vec![
                (d(2026, 1, 31), Money::new(33_334, Currency::NOK)),
                (d(2026, 2, 28), Money::new(33_333, Currency::NOK)),
                (d(2026, 3, 31), Money::new(33_333, Currency::NOK)),
            ],
            "the 31st becomes the month's last day"
        );
    }

    #[test]
    fn the_limits_bound_what_is_offered() {
        let limits = PauseLimits {
            max_instalments: 6,
            max_instalment_span_days: 90,
            ..PauseLimits::default()
        };
        let owed = Money::new(60_000, Currency::DKK);
        // 14 days + 2 months fits 90 days; + 3 months does not.
        assert_eq!(instalment_counts(owed, d(2026, 3, 1), &limits), vec![2, 3]);
        assert_eq!(
            instalment_counts(Money::new(2, Currency::DKK), d(2026, 3, 1), &limits),
            vec![2]
        );
        assert!(instalment_plan(owed, d(2026, 3, 1), 1, &limits).is_none());
    }

    #[test]
    fn a_due_date_moves_once_and_no_further_than_the_policy_says() {
        let limits = PauseLimits::default();
        let due = d(2026, 3, 2);
        assert_eq!(
            postpone_window(due, due, 0, d(2026, 2, 20), &limits),
            Some((d(2026, 3, 3), d(2026, 4, 1)))
        );
        assert_eq!(
            postpone_window(due, due, 0, d(2026, 3, 10), &limits),
            Some((d(2026, 3, 11), d(2026, 4, 1))),
            "not into the past"
        );
        assert_eq!(postpone_window(due, d(2026, 3, 20), 1, d(2026, 3, 10), &limits), None);
        assert_eq!(
            postpone_window(due, due, 0, d(2026, 4, 1), &limits),
            None,
            "the window has passed"
        );
    }

    proptest! {
        #[test]
        fn every_offered_plan_is_one_the_watcher_grants(
            owed in 1i64..10_000_000,
            day in 0u32..3000,
            max_instalments in 1usize..13,
            span in 0i64..400,
        ) {
            let today = d(2024, 1, 1) + chrono::Days::new(u64::from(day));
            let limits = PauseLimits { max_instalments, max_instalment_span_days: span, ..PauseLimits::default() };
            let owed = Money::new(owed, Currency::EUR);
            for n in instalment_counts(owed, today, &limits) {
                let plan = instalment_plan(owed, today, n, &limits).unwrap();
                prop_assert_eq!(plan.len(), n);
                prop_assert!(n >= 2 && n <= limits.max_instalments);
                prop_assert!(plan[0].0 >= today);
                prop_assert!(plan.windows(2).all(|w| w[1].0 > w[0].0));
                prop_assert!((plan[n - 1].0 - today).num_days() <= limits.max_instalment_span_days);
                prop_assert!(plan.iter().all(|(_, m)| m.minor > 0 && m.currency == owed.currency));
                prop_assert_eq!(plan.iter().map(|(_, m)| m.minor).sum::<i64>(), owed.minor);
            }
        }
    }
}
