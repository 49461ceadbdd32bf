//! How simulated debtors behave: a stated, configurable model of who pays when, for
//! `forfall simulate`. Debtors are of four kinds, as collection practice knows them:
//! early payers (pay before the due date, on their own), forgetful ones (pay soon after a
//! message reminds them), short-of-cash ones (pay when the money comes, some weeks late,
//! sooner if a message finds them with it) and unwilling ones (rarely pay before collection).
//! A message's pull depends on its channel (an SMS is read sooner than an e-mail), its tone
//! (a reminder weighs more than a nudge, a collection warning most) and whether it charged a
//! fee, and the hour it arrives (an evening message finds people at home with their bank app).
//! Some debtors dispute the invoice when the first message reaches them (the creditor settles
//! the dispute some days later, and the journey goes on); some of the short of cash pay part
//! first and the rest a few weeks later. Every figure is a parameter with its default here, so
//! a run says what it assumed.
//!
//! A debtor comes with a past: a tenure of monthly invoices lived by its kind (the early pay
//! them before the due date, the forgetful mostly on time and now and then a week or two late,
//! the short of cash weeks late and often through the page, the unwilling late or only in
//! collection and more often disputing; a channel now and then bounced), which is the history
//! the propensity model learns from.

use chrono::{Months, NaiveDate};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::history::{InvoiceRecord, channel_bit};

use crate::journey::Tone;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayerType {
    Early,
    Forgetful,
    ShortOfCash,
    Unwilling,
}

impl PayerType {
    pub const ALL: [PayerType; 4] = [
        PayerType::Early,
        PayerType::Forgetful,
        PayerType::ShortOfCash,
        PayerType::Unwilling,
    ];

    pub fn code(self) -> &'static str {
        match self {
            PayerType::Early => "early",
            PayerType::Forgetful => "forgetful",
            PayerType::ShortOfCash => "short_of_cash",
            PayerType::Unwilling => "unwilling",
        }
    }
}

/// The model's parameters (shares sum to at most 1; the rest are unwilling).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BehaviourModel {
    pub early_share: f64,
    pub forgetful_share: f64,
    pub short_of_cash_share: f64,
    /// How many days before the due date an early payer pays (uniform, inclusive).
    pub early_days_before_due: (i64, i64),
    /// The chance that a message (an e-mail nudge, no fee) gets each kind to pay.
    pub forgetful_response: f64,
    pub short_of_cash_response: f64,
    pub unwilling_response: f64,
    /// When the money comes for a short-of-cash debtor: days after the due date (uniform).
    pub short_of_cash_days_after_due: (i64, i64),
    /// Multipliers on a message's pull (the chance is capped at 0.98).
    pub sms_lift: f64,
    pub reminder_lift: f64,
    pub warning_lift: f64,
    pub fee_lift: f64,
    /// Days from a message that worked to the payment (uniform, inclusive).
    pub response_days: (i64, i64),
    /// Multipliers on a message's pull by the debtor's local hour when it arrives.
    pub time_of_day: TimeOfDayLifts,
    /// The chance that a debtor disputes the invoice when the first message reaches them.
    pub dispute_share: f64,
    /// Days from that message to the dispute, and from the dispute to the creditor settling it
    /// (uniform, inclusive).
    pub dispute_days: (i64, i64),
    pub dispute_resolution_days: (i64, i64),
    /// The chance that a short-of-cash debtor pays half first, and the rest this many days
    /// later (uniform, inclusive).
    pub part_payment_share: f64,
    pub part_payment_gap_days: (i64, i64),
    /// How many monthly invoices a debtor had before this one (uniform, inclusive; 0: new).
    pub history_months: (i64, i64),
    /// The chance that a past invoice found a channel of the debtor failing.
    pub failed_channel_share: f64,
}

/// Multipliers on a message's pull by the local hour it arrives: morning 06–12, afternoon
/// 12–17, evening 17–22, night otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimeOfDayLifts {
    pub morning: f64,
    pub afternoon: f64,
    pub evening: f64,
    pub night: f64,
}

impl Default for TimeOfDayLifts {
    fn default() -> Self {
        Self {
            morning: 1.0,
            afternoon: 1.05,
            evening: 1.2,
            night: 0.8,
        }
    }
}

impl TimeOfDayLifts {
    pub fn at(&self, local_hour: u32) -> f64 {
        match local_hour {
            6..=11 => self.morning,
            12..=16 => self.afternoon,
            17..=21 => self.evening,
            _ => self.night,
        }
    }
}

/// What a debtor will do besides paying, drawn when the debtor is (the same draws whatever
/// the debtor's kind, so that a run's draws stay in step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Habits {
    /// Disputes the invoice this many days after the first message reaches them, and the
    /// creditor settles the dispute this many days after that.
    pub dispute: Option<(i64, i64)>,
    /// Pays half first, and the rest this many days later.
    pub part_payment_gap: Option<i64>,
}

impl Default for BehaviourModel {
    fn default() -> Self {
        Self {
            early_share: 0.55,
            forgetful_share: 0.25,
            short_of_cash_share: 0.12,
            early_days_before_due: (0, 10),
            forgetful_response: 0.6,
            short_of_cash_response: 0.25,
            unwilling_response: 0.05,
            short_of_cash_days_after_due: (10, 45),
            sms_lift: 1.3,
            reminder_lift: 1.15,
            warning_lift: 1.5,
            fee_lift: 1.1,
            response_days: (0, 3),
            time_of_day: TimeOfDayLifts::default(),
            dispute_share: 0.02,
            dispute_days: (0, 2),
            dispute_resolution_days: (7, 21),
            part_payment_share: 0.3,
            part_payment_gap_days: (10, 20),
            history_months: (0, 48),
            failed_channel_share: 0.03,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BehaviourError {
    #[error("{name} must be in [0, 1], not {value}")]
    Share { name: &'static str, value: f64 },
    #[error("the payer shares add up to {0}, more than 1")]
    Shares(f64),
    #[error("{name} must be a range low..=high with low <= high, not {low}..={high}")]
    Range { name: &'static str, low: i64, high: i64 },
    #[error("{name} must be positive, not {value}")]
    Lift { name: &'static str, value: f64 },
}

/// A message as the debtor saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MessageSeen {
    pub tone: Tone,
    /// Sent by SMS (else e-mail or another written channel).
    pub sms: bool,
    pub fee_charged: bool,
    /// Days after the due date it arrived.
    pub day: i64,
    /// The debtor's local hour when it arrived (0–23).
    pub local_hour: u32,
}

impl BehaviourModel {
    /// The parameters checked: shares in [0, 1] adding up to at most 1, ranges ordered,
    /// multipliers positive.
    pub fn check(&self) -> Result<(), BehaviourError> {
        let shares = [
            ("early_share", self.early_share),
            ("forgetful_share", self.forgetful_share),
            ("short_of_cash_share", self.short_of_cash_share),
            ("forgetful_response", self.forgetful_response),
            ("short_of_cash_response", self.short_of_cash_response),
            ("unwilling_response", self.unwilling_response),
            ("dispute_share", self.dispute_share),
            ("part_payment_share", self.part_payment_share),
            ("failed_channel_share", self.failed_channel_share),
        ];
        for (name, value) in shares {
            if !(0.0..=1.0).contains(&value) {
                return Err(BehaviourError::Share { name, value });
            }
        }
        let sum = self.early_share + self.forgetful_share + self.short_of_cash_share;
        if sum > 1.0 + 1e-9 {
            return Err(BehaviourError::Shares(sum));
        }
        for (name, (low, high)) in [
            ("early_days_before_due", self.early_days_before_due),
            ("short_of_cash_days_after_due", self.short_of_cash_days_after_due),
            ("response_days", self.response_days),
            ("dispute_days", self.dispute_days),
            ("dispute_resolution_days", self.dispute_resolution_days),
            ("part_payment_gap_days", self.part_payment_gap_days),
            ("history_months", self.history_months),
        ] {
            if low > high || low < 0 {
                return Err(BehaviourError::Range { name, low, high });
            }
        }
        for (name, value) in [
            ("sms_lift", self.sms_lift),
            ("reminder_lift", self.reminder_lift),
            ("warning_lift", self.warning_lift),
            ("fee_lift", self.fee_lift),
            ("time_of_day.morning", self.time_of_day.morning),
            ("time_of_day.afternoon", self.time_of_day.afternoon),
            ("time_of_day.evening", self.time_of_day.evening),
            ("time_of_day.night", self.time_of_day.night),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(BehaviourError::Lift { name, value });
            }
        }
        Ok(())
    }

    pub fn draw_payer(&self, rng: &mut impl Rng) -> PayerType {
        let u: f64 = rng.random();
        if u < self.early_share {
            PayerType::Early
        } else if u < self.early_share + self.forgetful_share {
            PayerType::Forgetful
        } else if u < self.early_share + self.forgetful_share + self.short_of_cash_share {
            PayerType::ShortOfCash
        } else {
            PayerType::Unwilling
        }
    }

    /// Whether the debtor will dispute and whether they pay in two parts (five draws, always).
    pub fn draw_habits(&self, payer: PayerType, rng: &mut impl Rng) -> Habits {
        let disputes = rng.random::<f64>() < self.dispute_share;
        let dispute_after = rng.random_range(self.dispute_days.0..=self.dispute_days.1);
        let resolved_after = rng.random_range(self.dispute_resolution_days.0..=self.dispute_resolution_days.1);
        let in_parts = payer == PayerType::ShortOfCash && rng.random::<f64>() < self.part_payment_share;
        let gap = rng.random_range(self.part_payment_gap_days.0..=self.part_payment_gap_days.1);
        Habits {
            dispute: disputes.then_some((dispute_after, resolved_after)),
            part_payment_gap: in_parts.then_some(gap),
        }
    }

    /// The debtor's past invoices with the creditor, monthly before `issued`, each about
    /// `amount_eur_cents` large, lived as its kind lives them (see the module's words).
    pub fn draw_history(
        &self,
        payer: PayerType,
        amount_eur_cents: u64,
        issued: NaiveDate,
        rng: &mut impl Rng,
    ) -> Vec<InvoiceRecord> {
        let months = rng.random_range(self.history_months.0..=self.history_months.1);
        (1..=months)
            .rev()
            .filter_map(|m| issued.checked_sub_months(Months::new(u32::try_from(m).ok()?)))
            .map(|past| {
                let size = rng.random_range(0.6..1.4);
                let u: f64 = rng.random();
                let days_late = match payer {
                    PayerType::Early => Some(rng.random_range(-10..=0)),
                    PayerType::Forgetful if u < 0.7 => Some(rng.random_range(-5..=0)),
                    PayerType::Forgetful => Some(rng.random_range(3..=14)),
                    PayerType::ShortOfCash => Some(rng.random_range(5..=40)),
                    PayerType::Unwilling if u < 0.5 => None,
                    PayerType::Unwilling => Some(rng.random_range(20..=60)),
                };
                let dispute_share = match payer {
                    PayerType::Unwilling => (self.dispute_share * 5.0).min(1.0),
                    _ => self.dispute_share,
                };
                let self_service_share = match payer {
                    PayerType::Early => 0.02,
                    PayerType::Forgetful => 0.1,
                    PayerType::ShortOfCash => 0.4,
                    PayerType::Unwilling => 0.05,
                };
                let failed_share = match payer {
                    PayerType::Unwilling => (self.failed_channel_share * 5.0).min(1.0),
                    _ => self.failed_channel_share,
                };
                let disputed = rng.random::<f64>() < dispute_share;
                let failed = rng.random::<f64>() < failed_share;
                InvoiceRecord {
                    issued: past,
                    amount_eur_cents: (amount_eur_cents as f64 * size).round() as u64,
                    days_late,
                    disputed,
                    self_service: disputed || rng.random::<f64>() < self_service_share,
                    failed_channels: if failed {
                        channel_bit(if u < 0.5 { "email" } else { "sms" })
                    } else {
                        0
                    },
                }
            })
            .collect()
    }

    /// When the debtor pays with no message at all, in days after the due date (negative:
    /// before), if ever.
    pub fn own_payment_day(&self, payer: PayerType, rng: &mut impl Rng) -> Option<i64> {
        match payer {
            PayerType::Early => {
                let (low, high) = self.early_days_before_due;
                Some(-rng.random_range(low..=high))
            }
            PayerType::ShortOfCash => {
                let (low, high) = self.short_of_cash_days_after_due;
                Some(rng.random_range(low..=high))
            }
            PayerType::Forgetful | PayerType::Unwilling => None,
        }
    }

    /// The chance that `message` gets a debtor of `payer`'s kind to pay.
    pub fn pull(&self, payer: PayerType, message: &MessageSeen) -> f64 {
        let base = match payer {
            // An early payer has paid already; one who has not is reminded like the forgetful.
            PayerType::Early | PayerType::Forgetful => self.forgetful_response,
            PayerType::ShortOfCash => self.short_of_cash_response,
            PayerType::Unwilling => self.unwilling_response,
        };
        let tone = match message.tone {
            Tone::Nudge => 1.0,
            Tone::Reminder => self.reminder_lift,
            Tone::CollectionWarning | Tone::PaymentDemand => self.warning_lift,
        };
        let channel = if message.sms { self.sms_lift } else { 1.0 };
        let fee = if message.fee_charged { self.fee_lift } else { 1.0 };
        let hour = self.time_of_day.at(message.local_hour);
        (base * tone * channel * fee * hour).min(0.98)
    }

    /// Whether `message` gets the debtor to pay, and if so the day (after the due date).
    pub fn respond(&self, payer: PayerType, message: &MessageSeen, rng: &mut impl Rng) -> Option<i64> {
        if rng.random::<f64>() < self.pull(payer, message) {
            let (low, high) = self.response_days;
            Some(message.day + rng.random_range(low..=high))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn nudge(day: i64) -> MessageSeen {
        MessageSeen {
            tone: Tone::Nudge,
            sms: false,
            fee_charged: false,
            day,
            local_hour: 9,
        }
    }

    #[test]
    fn an_evening_message_pulls_harder_than_a_morning_one_and_a_night_one_least() {
        let m = BehaviourModel::default();
        let at = |local_hour| m.pull(PayerType::Forgetful, &MessageSeen { local_hour, ..nudge(0) });
        assert!(
            at(19) > at(14) && at(14) > at(9) && at(9) > at(23),
            "{} {} {} {}",
            at(19),
            at(14),
            at(9),
            at(23)
        );
        assert!((at(9) - 0.6).abs() < 1e-12, "a morning message is the baseline");
    }

    #[test]
    fn each_kind_has_the_past_its_kind_lives() {
        let m = BehaviourModel::default();
        let mut rng = StdRng::seed_from_u64(9);
        let today: NaiveDate = "2026-12-01".parse().unwrap();
        let mut facts = |payer| {
            let mut sum = crate::history::HistoryFacts::default();
            let n = 2_000;
            let mut lengths = 0;
            for _ in 0..n {
                let past = m.draw_history(payer, 10_000, today, &mut rng);
                assert!(past.iter().all(|r| r.issued < today));
                assert!(past.windows(2).all(|w| w[0].issued < w[1].issued));
                lengths += past.len();
                let f = crate::history::HistoryFacts::of(&past, today);
                sum.avg_days_late += f.avg_days_late / f64::from(n);
                sum.disputes += f.disputes;
                sum.self_service += f.self_service;
                sum.failed_channels += f.failed_channels;
            }
            // history_months (0, 48): 24 invoices on average.
            assert!((lengths as f64 / f64::from(n) - 24.0).abs() < 2.0, "{lengths}");
            sum
        };
        let early = facts(PayerType::Early);
        let short = facts(PayerType::ShortOfCash);
        let unwilling = facts(PayerType::Unwilling);
        assert_eq!(early.avg_days_late, 0.0);
        assert!(short.avg_days_late > 15.0 && unwilling.avg_days_late > short.avg_days_late);
        assert!(short.self_service > 5 * early.self_service);
        assert!(unwilling.disputes > 3 * early.disputes && unwilling.failed_channels > early.failed_channels);
    }

    #[test]
    fn disputes_and_part_payments_come_in_the_stated_shares() {
        let m = BehaviourModel::default();
        let mut rng = StdRng::seed_from_u64(5);
        let n = 100_000;
        let (mut disputes, mut short_in_parts, mut others_in_parts) = (0, 0, 0);
        for i in 0..n {
            let payer = if i % 2 == 0 {
                PayerType::ShortOfCash
            } else {
                PayerType::Forgetful
            };
            let h = m.draw_habits(payer, &mut rng);
            if let Some((after, resolved)) = h.dispute {
                disputes += 1;
                assert!((0..=2).contains(&after) && (7..=21).contains(&resolved), "{h:?}");
            }
            match (payer, h.part_payment_gap) {
                (PayerType::ShortOfCash, Some(gap)) => {
                    short_in_parts += 1;
                    assert!((10..=20).contains(&gap));
                }
                (_, Some(_)) => others_in_parts += 1,
                _ => {}
            }
        }
        let share = |k: i32, of: i32| f64::from(k) / f64::from(of);
        assert!((share(disputes, n) - 0.02).abs() < 0.003, "{disputes}");
        assert!((share(short_in_parts, n / 2) - 0.3).abs() < 0.01, "{short_in_parts}");
        assert_eq!(others_in_parts, 0, "only the short of cash pay in parts");
    }

    #[test]
    fn the_payer_mix_follows_the_shares() {
        let model = BehaviourModel::default();
        let mut rng = StdRng::seed_from_u64(7);
        let mut counts = std::collections::BTreeMap::new();
        for _ in 0..100_000 {
            *counts.entry(model.draw_payer(&mut rng)).or_insert(0u32) += 1;
        }
        let share = |p| f64::from(counts[&p]) / 100_000.0;
        assert!((share(PayerType::Early) - 0.55).abs() < 0.01, "{counts:?}");
        assert!((share(PayerType::Forgetful) - 0.25).abs() < 0.01);
        assert!((share(PayerType::ShortOfCash) - 0.12).abs() < 0.01);
        assert!((share(PayerType::Unwilling) - 0.08).abs() < 0.01);
    }

    #[test]
    fn an_sms_a_firmer_tone_and_a_fee_pull_harder_and_the_unwilling_least() {
        let m = BehaviourModel::default();
        let email = nudge(0);
        let sms = MessageSeen { sms: true, ..email };
        let reminder_with_fee = MessageSeen {
            tone: Tone::Reminder,
            fee_charged: true,
            ..email
        };
        assert!(m.pull(PayerType::Forgetful, &sms) > m.pull(PayerType::Forgetful, &email));
        assert!(m.pull(PayerType::Forgetful, &reminder_with_fee) > m.pull(PayerType::Forgetful, &email));
        assert!(m.pull(PayerType::Unwilling, &sms) < m.pull(PayerType::ShortOfCash, &sms));
        assert!((m.pull(PayerType::Forgetful, &email) - 0.6).abs() < 1e-12);
    }

    #[test]
    fn the_same_seed_gives_the_same_debtors() {
        let m = BehaviourModel::default();
        let run = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..100)
                .map(|_| {
                    let p = m.draw_payer(&mut rng);
                    (p, m.own_payment_day(p, &mut rng), m.respond(p, &nudge(0), &mut rng))
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn bad_parameters_are_named() {
        let too_many = BehaviourModel {
            early_share: 0.9,
            ..BehaviourModel::default()
        };
        assert!(matches!(too_many.check(), Err(BehaviourError::Shares(_))));
        let backwards = BehaviourModel {
            response_days: (3, 1),
            ..BehaviourModel::default()
        };
        assert_eq!(
            backwards.check(),
            Err(BehaviourError::Range {
                name: "response_days",
                low: 3,
                high: 1
            })
        );
        let dark = BehaviourModel {
            time_of_day: TimeOfDayLifts {
                night: 0.0,
                ..TimeOfDayLifts::default()
            },
            ..BehaviourModel::default()
        };
        assert_eq!(
            dark.check(),
            Err(BehaviourError::Lift {
                name: "time_of_day.night",
                value: 0.0
            })
        );
        assert!(BehaviourModel::default().check().is_ok());
    }
}
