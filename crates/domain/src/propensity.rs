//! Propensity to pay: a logistic model over what is known of a debtor when a new invoice
//! arrives (its own history: late invoices in the last 12 months, average days late, the amount
//! against its usual, tenure, channels that failed, disputes, self-service; and the invoice:
//! the amount, business or consumer, country, the channels on file, a fee agreed in advance),
//! scored 0 to 100 so that policy segments can
//! say `propensity_min` / `propensity_max`. A model is a versioned file with its coefficients
//! and the metrics it was accepted on (AUC, Brier score, a calibration table, measured on
//! invoices it was not fitted to); this module scores with it and measures it. Fitting is the
//! shell's (`forfall model train`).

use serde::{Deserialize, Serialize};

use crate::history::{self, HistoryFacts};
use crate::invoice::InvoiceSnapshot;
use crate::{DebtorKind, Jurisdiction};

/// The model's inputs, in this order (a model file names them, and is refused if they differ).
pub const FEATURE_NAMES: [&str; 16] = [
    "late_last_12m",
    "new_debtor",
    "avg_days_late",
    "amount_vs_usual",
    "tenure_years",
    "failed_channels",
    "past_disputes",
    "self_service",
    "log_amount_eur",
    "business",
    "norway",
    "sweden",
    "finland",
    "has_phone",
    "has_email",
    "fee_agreed",
];

/// What is known of a debtor and its new invoice.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Features {
    pub late_last_12m: u32,
    /// The rest of the debtor's own history.
    pub history: HistoryFacts,
    /// The amount in euros, roughly (the Nordic crowns at fixed rates): a size, not a price.
    pub amount_eur: f64,
    pub kind: DebtorKind,
    pub jurisdiction: Jurisdiction,
    pub has_phone: bool,
    pub has_email: bool,
    pub fee_agreed: bool,
}

impl Features {
    pub fn of(invoice: &InvoiceSnapshot, late_last_12m: u32, history: HistoryFacts) -> Self {
        Self {
            late_last_12m,
            history,
            amount_eur: history::euro_cents(invoice.amount) as f64 / 100.0,
            kind: invoice.debtor_kind,
            jurisdiction: invoice.jurisdiction,
            has_phone: invoice.contact.phone.is_some(),
            has_email: invoice.contact.email.is_some(),
            fee_agreed: invoice.reminder_fee_agreed,
        }
    }

    /// The input vector with its names, as a `plan_chosen` event records it.
    pub fn named(&self) -> Vec<(&'static str, f64)> {
        FEATURE_NAMES.iter().copied().zip(self.vector()).collect()
    }

    /// The model's input vector, in [`FEATURE_NAMES`]' order.
    pub fn vector(&self) -> [f64; FEATURE_NAMES.len()] {
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        let h = &self.history;
        // Bounded, so that one extreme debtor does not carry the fit.
        let amount_vs_usual = h
            .usual_amount_eur
            .filter(|u| *u > 0.0)
            .map_or(0.0, |usual| (self.amount_eur.max(0.01) / usual).ln().clamp(-3.0, 3.0));
        [
            f64::from(self.late_last_12m.min(12)),
            flag(h.invoices == 0),
            h.avg_days_late.min(90.0),
            amount_vs_usual,
            (f64::from(h.tenure_days) / 365.0).min(10.0),
            f64::from(h.failed_channels.min(4)),
            f64::from(h.disputes.min(5)),
            f64::from(h.self_service.min(5)),
            self.amount_eur.max(0.0).ln_1p(),
            flag(self.kind == DebtorKind::Business),
            flag(self.jurisdiction == Jurisdiction::NO),
            flag(self.jurisdiction == Jurisdiction::SE),
            flag(self.jurisdiction == Jurisdiction::FI),
            flag(self.has_phone),
            flag(self.has_email),
            flag(self.fee_agreed),
        ]
    }
}

/// An input vector from named values (as a `plan_chosen` event records them): `None` when
/// one of [`FEATURE_NAMES`] is missing, so that events from before a feature existed are
/// left out of a fit rather than read as zero.
pub fn vector_from_named<'a>(named: impl IntoIterator<Item = (&'a str, f64)>) -> Option<[f64; FEATURE_NAMES.len()]> {
    let mut x = [f64::NAN; FEATURE_NAMES.len()];
    for (name, value) in named {
        if let Some(i) = FEATURE_NAMES.iter().position(|n| *n == name) {
            x[i] = value;
        }
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
}

/// One band of predicted probabilities and how often those invoices were in fact paid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationBin {
    pub from: f64,
    pub to: f64,
    pub invoices: u64,
    pub predicted: f64,
    pub observed: f64,
}

/// How well a model did on invoices it was not fitted to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMetrics {
    pub auc: f64,
    pub brier: f64,
    pub calibration: Vec<CalibrationBin>,
    pub trained_on: u64,
    pub tested_on: u64,
    /// The share of test invoices paid (the Brier score of always guessing it is the bar).
    pub base_rate: f64,
}

/// A fitted model, as its file holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PropensityModel {
    pub version: String,
    /// What it predicts, in words.
    pub label: String,
    pub features: Vec<String>,
    pub intercept: f64,
    pub coefficients: Vec<f64>,
    /// Each feature's standard deviation on the invoices it was fitted to: a coefficient times
    /// it is the feature's weight on a comparable scale (a day late against an e-mail address).
    #[serde(default)]
    pub feature_sd: Vec<f64>,
    pub metrics: ModelMetrics,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    #[error("the model's features {found:?} are not the ones this version computes {expected:?}")]
    Features { found: Vec<String>, expected: Vec<String> },
    #[error("the model has {coefficients} coefficients for {features} features")]
    Shape { coefficients: usize, features: usize },
    #[error("a coefficient is not a finite number")]
    NotFinite,
}

impl PropensityModel {
    /// The model checked against the features this version computes.
    pub fn check(&self) -> Result<(), ModelError> {
        if self.features != FEATURE_NAMES {
            return Err(ModelError::Features {
                found: self.features.clone(),
                expected: FEATURE_NAMES.iter().map(|s| (*s).to_owned()).collect(),
            });
        }
        if self.coefficients.len() != FEATURE_NAMES.len() {
            return Err(ModelError::Shape {
                coefficients: self.coefficients.len(),
                features: FEATURE_NAMES.len(),
            });
        }
        if !self.intercept.is_finite() || self.coefficients.iter().any(|c| !c.is_finite()) {
            return Err(ModelError::NotFinite);
        }
        Ok(())
    }

    /// The probability that the debtor pays without collection.
    pub fn probability(&self, f: &Features) -> f64 {
        self.probability_of(&f.vector())
    }

    /// The probability for an input vector in [`FEATURE_NAMES`]' order.
    pub fn probability_of(&self, x: &[f64]) -> f64 {
        let z: f64 = self.intercept + self.coefficients.iter().zip(x).map(|(c, x)| c * x).sum::<f64>();
        1.0 / (1.0 + (-z).exp())
    }

    /// The score policies segment on: the probability in whole percent, 0 to 100.
    pub fn score(&self, f: &Features) -> u8 {
        (self.probability(f) * 100.0).round().clamp(0.0, 100.0) as u8
    }

    /// The features by their weight (the coefficient per standard deviation of the feature,
    /// where the file has them), strongest first.
    pub fn top_features(&self) -> Vec<(String, f64)> {
        let mut all: Vec<(String, f64)> = self
            .features
            .iter()
            .cloned()
            .zip(self.coefficients.iter().copied())
            .enumerate()
            .map(|(i, (name, c))| (name, c * self.feature_sd.get(i).copied().unwrap_or(1.0)))
            .collect();
        all.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
        all
    }
}

/// The area under the ROC curve of `(predicted probability, paid)` pairs: the chance that a
/// paid invoice scores above an unpaid one (ties count half). `None` without both kinds.
pub fn auc(scored: &[(f64, bool)]) -> Option<f64> {
    let mut sorted: Vec<(f64, bool)> = scored.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let positives = sorted.iter().filter(|(_, y)| *y).count() as f64;
    let negatives = sorted.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return None;
    }
    // Mann-Whitney: the positives' rank sum, ties at their average rank.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j < sorted.len() && sorted[j].0 == sorted[i].0 {
            j += 1;
        }
        let average_rank = (i + 1 + j) as f64 / 2.0;
        rank_sum += average_rank * sorted[i..j].iter().filter(|(_, y)| *y).count() as f64;
        i = j;
    }
    Some((rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives))
}

/// The mean squared difference between predicted probability and outcome.
pub fn brier(scored: &[(f64, bool)]) -> f64 {
    if scored.is_empty() {
        return 0.0;
    }
    scored
        .iter()
        .map(|(p, y)| (p - if *y { 1.0 } else { 0.0 }).powi(2))
        .sum::<f64>()
        / scored.len() as f64
}

/// Predictions in `bins` equal bands of probability, each with the mean prediction and the
/// share paid (empty bands left out).
pub fn calibration(scored: &[(f64, bool)], bins: usize) -> Vec<CalibrationBin> {
    let bins = bins.max(1);
    let mut sums = vec![(0u64, 0.0f64, 0u64); bins];
    for (p, y) in scored {
        let b = ((p * bins as f64) as usize).min(bins - 1);
        sums[b].0 += 1;
        sums[b].1 += p;
        sums[b].2 += u64::from(*y);
    }
    sums.into_iter()
        .enumerate()
        .filter(|(_, (n, _, _))| *n > 0)
        .map(|(b, (n, p, y))| CalibrationBin {
            from: b as f64 / bins as f64,
            to: (b + 1) as f64 / bins as f64,
            invoices: n,
            predicted: p / n as f64,
            observed: y as f64 / n as f64,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// scipy 1.17.1: `mannwhitneyu(paid, unpaid).statistic / (len(paid) * len(unpaid))`.
    #[test]
    fn auc_matches_the_mann_whitney_statistic() {
        let scored = [
            (0.9, true),
            (0.8, true),
            (0.8, false),
            (0.7, true),
            (0.6, false),
            (0.4, true),
            (0.3, false),
            (0.2, false),
        ];
        let got = auc(&scored).unwrap();
        assert!((got - 0.78125).abs() < 1e-12, "{got}");
        assert_eq!(auc(&[(0.1, true)]), None);
    }

    #[test]
    fn brier_and_calibration_say_how_close_the_probabilities_are() {
        let scored = [(0.9, true), (0.1, false), (0.8, false), (0.2, true)];
        assert!((brier(&scored) - (0.01 + 0.01 + 0.64 + 0.64) / 4.0).abs() < 1e-12);
        let bins = calibration(&scored, 2);
        assert_eq!(bins.len(), 2);
        assert_eq!((bins[0].invoices, bins[0].observed), (2, 0.5));
        assert!((bins[1].predicted - 0.85).abs() < 1e-12);
    }

    fn model(coefficients: Vec<f64>) -> PropensityModel {
        PropensityModel {
            version: "t".into(),
            label: "pays without collection".into(),
            features: FEATURE_NAMES.iter().map(|s| (*s).to_owned()).collect(),
            intercept: 1.0,
            coefficients,
            feature_sd: Vec::new(),
            metrics: ModelMetrics {
                auc: 0.5,
                brier: 0.25,
                calibration: Vec::new(),
                trained_on: 0,
                tested_on: 0,
                base_rate: 0.5,
            },
        }
    }

    #[test]
    fn a_model_file_for_other_features_is_refused() {
        let mut m = model(vec![0.0; FEATURE_NAMES.len()]);
        assert!(m.check().is_ok());
        m.features[0] = "days_late".into();
        assert!(matches!(m.check(), Err(ModelError::Features { .. })));
        assert!(matches!(model(vec![0.0; 3]).check(), Err(ModelError::Shape { .. })));
    }

    #[test]
    fn named_values_make_the_vector_only_when_all_are_there() {
        let f = Features {
            late_last_12m: 2,
            history: HistoryFacts {
                invoices: 4,
                avg_days_late: 6.5,
                usual_amount_eur: Some(50.0),
                tenure_days: 730,
                failed_channels: 1,
                disputes: 1,
                self_service: 2,
            },
            amount_eur: 100.0,
            kind: DebtorKind::Business,
            jurisdiction: Jurisdiction::SE,
            has_phone: true,
            has_email: false,
            fee_agreed: true,
        };
        let x = f.vector();
        assert_eq!(&x[..8], &[2.0, 0.0, 6.5, 2f64.ln(), 2.0, 1.0, 1.0, 2.0]);
        let named = f.named();
        assert_eq!(vector_from_named(named.iter().rev().copied()), Some(x));
        assert_eq!(vector_from_named(named[1..].iter().copied()), None);
    }

    proptest! {
        /// More late invoices never raise the score when their coefficient is negative, and the
        /// score stays in 0..=100.
        #[test]
        fn late_history_lowers_the_score(late in 0u32..20, eur in 0.0f64..100_000.0) {
            let mut c = vec![0.0; FEATURE_NAMES.len()];
            c[0] = -0.8;
            c[8] = 0.1;
            let m = model(c);
            let f = Features {
                late_last_12m: late,
                history: HistoryFacts::default(),
                amount_eur: eur,
                kind: DebtorKind::Consumer,
                jurisdiction: Jurisdiction::DK,
                has_phone: true,
                has_email: true,
                fee_agreed: false,
            };
            let more = Features { late_last_12m: late + 1, ..f };
            prop_assert!(m.score(&more) <= m.score(&f));
            prop_assert!(m.score(&f) <= 100);
        }
    }
}
