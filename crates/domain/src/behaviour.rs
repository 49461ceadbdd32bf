//! How simulated debtors behave: a stated, configurable model of who pays when, for
//! `forfall simulate`. Debtors are of four kinds, as collection practice knows them:
//! early payers (pay before the due date, on their own), forgetful ones (pay soon after a
//! message reminds them), short-of-cash ones (pay when the money comes, some weeks late,
//! sooner if a message finds them with it) and unwilling ones (rarely pay before collection).
//! A message's pull depends on its channel (an SMS is read sooner than an e-mail), its tone
//! (a reminder weighs more than a nudge, a collection warning most) and whether it charged a
//! fee. Every figure is a parameter with its default here, so a run says what it assumed.

use rand::Rng;
use serde::{Deserialize, Serialize};

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
        (base * tone * channel * fee).min(0.98)
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
        }
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
        assert!(BehaviourModel::default().check().is_ok());
    }
}
