//! The statistics an experiment report stands on, for proportions (settled before the first fee,
//! handed over, ...): Wilson's score interval for one variant's rate, Newcombe's hybrid score
//! interval for a variant's difference to control, Pearson's chi-squared test of the sample
//! ratio against the variants' weights, and an always-valid confidence sequence for the
//! difference (the asymptotic confidence sequences of Waudby-Smith et al., 2023, as GrowthBook
//! documents and implements them), so that a report looked at every day does not find effects
//! that are not there more often than its level says.
//!
//! Golden values in the tests come from statsmodels (Wilson, Newcombe), scipy (chi-squared) and
//! GrowthBook's `gbstats` (the sequential interval and p-value), computed once.

use serde::Serialize;
use statrs::distribution::{ChiSquared, ContinuousCDF, Normal};

/// Successes among trials: debtors of a variant who settled before any fee, of all assigned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Proportion {
    pub successes: u64,
    pub trials: u64,
}

impl Proportion {
    pub fn new(successes: u64, trials: u64) -> Result<Self, StatsError> {
        if successes > trials {
            return Err(StatsError::MoreSuccessesThanTrials { successes, trials });
        }
        Ok(Self { successes, trials })
    }

    /// The observed rate; 0 with no trials.
    pub fn rate(&self) -> f64 {
        if self.trials == 0 {
            0.0
        } else {
            self.successes as f64 / self.trials as f64
        }
    }

    fn checked(self) -> Result<Self, StatsError> {
        if self.trials == 0 {
            return Err(StatsError::NoTrials);
        }
        Self::new(self.successes, self.trials)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Interval {
    pub low: f64,
    pub high: f64,
}

impl Interval {
    pub fn contains(&self, x: f64) -> bool {
        self.low <= x && x <= self.high
    }
}

/// A variant's difference to control (treatment minus control) with its interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Difference {
    pub estimate: f64,
    pub interval: Interval,
}

/// The same, always valid: the interval holds whenever the report is looked at, and so does
/// the p-value (the smallest level at which the sequence excludes no difference).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SequentialDifference {
    pub estimate: f64,
    pub interval: Interval,
    pub p_value: f64,
}

/// Whether the variants' sizes fit their weights.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SampleRatio {
    pub chi_squared: f64,
    pub degrees_of_freedom: u32,
    pub p_value: f64,
    /// Below [`SAMPLE_RATIO_MISMATCH_P`]: the assignment or the counting is broken, and no
    /// difference between the variants can be trusted.
    pub mismatch: bool,
}

/// Sample ratio mismatch is flagged below this p-value (the convention of the experimentation
/// platforms: rare enough by chance that a flag means a bug).
pub const SAMPLE_RATIO_MISMATCH_P: f64 = 0.001;

/// The sample size at which GrowthBook's default confidence sequence is narrowest.
pub const DEFAULT_SEQUENTIAL_TUNING: f64 = 5_000.0;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StatsError {
    #[error("no trials: a rate of nothing has no interval")]
    NoTrials,
    #[error("{successes} successes among {trials} trials")]
    MoreSuccessesThanTrials { successes: u64, trials: u64 },
    #[error("the level alpha must be in (0, 1), not {0}")]
    Alpha(f64),
    #[error("the sequential tuning parameter must be positive, not {0}")]
    Tuning(f64),
    #[error("{observed} variants observed but {weights} weights given")]
    Variants { observed: usize, weights: usize },
    #[error("weights must be positive and finite: {0:?}")]
    Weights(Vec<f64>),
    #[error("a sample ratio needs at least two variants and one observation")]
    NothingToCompare,
}

fn check_alpha(alpha: f64) -> Result<(), StatsError> {
    if alpha > 0.0 && alpha < 1.0 {
        Ok(())
    } else {
        Err(StatsError::Alpha(alpha))
    }
}

/// The two-sided critical value of the standard normal distribution at level `alpha`.
fn critical_z(alpha: f64) -> f64 {
    let standard = Normal::standard();
    standard.inverse_cdf(1.0 - alpha / 2.0)
}

/// Wilson's score interval for a rate at level `alpha` (0.05: a 95 % interval). Good at small
/// counts and at rates near 0 or 1, where the textbook interval leaves [0, 1].
pub fn wilson(p: Proportion, alpha: f64) -> Result<Interval, StatsError> {
    check_alpha(alpha)?;
    let p = p.checked()?;
    let (x, n) = (p.successes as f64, p.trials as f64);
    let z = critical_z(alpha);
    let z2 = z * z;
    let center = (x + z2 / 2.0) / (n + z2);
    let half = z / (n + z2) * (x * (n - x) / n + z2 / 4.0).sqrt();
    Ok(Interval {
        low: (center - half).max(0.0),
        high: (center + half).min(1.0),
    })
}

/// Newcombe's hybrid score interval (his method 10) for `treatment`'s rate minus `control`'s,
/// built from the two Wilson intervals.
pub fn newcombe(treatment: Proportion, control: Proportion, alpha: f64) -> Result<Difference, StatsError> {
    let (t, c) = (wilson(treatment, alpha)?, wilson(control, alpha)?);
    let (p1, p2) = (treatment.rate(), control.rate());
    let estimate = p1 - p2;
    Ok(Difference {
        estimate,
        interval: Interval {
            low: estimate - ((p1 - t.low).powi(2) + (c.high - p2).powi(2)).sqrt(),
            high: estimate + ((t.high - p1).powi(2) + (p2 - c.low).powi(2)).sqrt(),
        },
    })
}

/// Pearson's chi-squared test of the variants' sizes against their weights.
pub fn sample_ratio(observed: &[u64], weights: &[f64]) -> Result<SampleRatio, StatsError> {
    if observed.len() != weights.len() {
        return Err(StatsError::Variants {
            observed: observed.len(),
            weights: weights.len(),
        });
    }
    if weights.iter().any(|w| !(w.is_finite() && *w > 0.0)) {
        return Err(StatsError::Weights(weights.to_vec()));
    }
    let total: u64 = observed.iter().sum();
    if observed.len() < 2 || total == 0 {
        return Err(StatsError::NothingToCompare);
    }
    let weight_sum: f64 = weights.iter().sum();
    let chi_squared: f64 = observed
        .iter()
        .zip(weights)
        .map(|(&o, &w)| {
            let expected = total as f64 * w / weight_sum;
            (o as f64 - expected).powi(2) / expected
        })
        .sum();
    let degrees_of_freedom = (observed.len() - 1) as u32;
    let distribution = ChiSquared::new(f64::from(degrees_of_freedom)).map_err(|_| StatsError::NothingToCompare)?;
    let p_value = distribution.sf(chi_squared);
    Ok(SampleRatio {
        chi_squared,
        degrees_of_freedom,
        p_value,
        mismatch: p_value < SAMPLE_RATIO_MISMATCH_P,
    })
}

/// The confidence sequence's ρ, which makes it narrowest at `tuning` observations (eq. 161 of
/// Waudby-Smith et al., arXiv:2103.06476v7).
fn sequential_rho(alpha: f64, tuning: f64) -> f64 {
    let l = -2.0 * alpha.ln();
    ((l + (l + 1.0).ln()) / tuning).sqrt()
}

/// `treatment`'s rate minus `control`'s with an always-valid interval and p-value at level
/// `alpha`, narrowest around `tuning` observations in all (eq. 9 and 155 of Waudby-Smith et
/// al.; GrowthBook's sequential test on an absolute difference).
pub fn sequential_difference(
    treatment: Proportion,
    control: Proportion,
    alpha: f64,
    tuning: f64,
) -> Result<SequentialDifference, StatsError> {
    check_alpha(alpha)?;
    if !(tuning.is_finite() && tuning > 0.0) {
        return Err(StatsError::Tuning(tuning));
    }
    let (t, c) = (treatment.checked()?, control.checked()?);
    let (p1, p2) = (t.rate(), c.rate());
    let estimate = p1 - p2;
    // The variance of the estimate, and the observations behind it.
    let variance = p1 * (1.0 - p1) / t.trials as f64 + p2 * (1.0 - p2) / c.trials as f64;
    let n = (t.trials + c.trials) as f64;
    let rho = sequential_rho(alpha, tuning);
    let n_rho2_1 = n * rho * rho + 1.0;
    let s2 = variance * n;
    let half = s2.sqrt() * (2.0 * n_rho2_1 * (n_rho2_1.sqrt() / alpha).ln() / (n * rho).powi(2)).sqrt();
    let p_value = if variance > 0.0 {
        let st2 = estimate * estimate * n / variance;
        let e_value = (rho * rho * st2 / (2.0 * n_rho2_1)).exp() / n_rho2_1.sqrt();
        (1.0 / e_value).min(1.0)
    } else if estimate == 0.0 {
        1.0
    } else {
        0.0
    };
    Ok(SequentialDifference {
        estimate,
        // A difference of rates lies in [-1, 1]: the sequence cut to it covers as often.
        interval: Interval {
            low: (estimate - half).max(-1.0),
            high: (estimate + half).min(1.0),
        },
        p_value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs().max(1e-12) || (a - b).abs() < 1e-12
    }

    fn p(x: u64, n: u64) -> Proportion {
        Proportion::new(x, n).unwrap()
    }

    /// statsmodels 0.15.0: `proportion_confint(x, n, alpha, method="wilson")`.
    const WILSON: [(u64, u64, f64, f64, f64); 6] = [
        (43, 100, 0.05, 0.337332985241101, 0.5278461045078768),
        (0, 20, 0.05, 0.0, 0.1611251580528194),
        (20, 20, 0.05, 0.8388748419471804, 0.9999999999999999),
        (4300, 10000, 0.05, 0.42032539942257974, 0.43972836034931484),
        (1, 3, 0.05, 0.06149194472039626, 0.7923403991979523),
        (430, 1000, 0.01, 0.3902655186870507, 0.47065724439942624),
    ];

    #[test]
    fn wilson_matches_statsmodels() {
        for (x, n, alpha, low, high) in WILSON {
            let i = wilson(p(x, n), alpha).unwrap();
            assert!(
                close(i.low, low) && close(i.high, high),
                "{x}/{n}: {i:?} vs ({low}, {high})"
            );
        }
    }

    /// statsmodels 0.15.0: `confint_proportions_2indep(xt, nt, xc, nc, method="newcomb",
    /// compare="diff", alpha)`.
    /// Treatment's successes and trials, control's, alpha, then the difference and its bounds.
    type NewcombeCase = (u64, u64, u64, u64, f64, f64, f64, f64);
    const NEWCOMBE: [NewcombeCase; 5] = [
        (
            470,
            1000,
            430,
            1000,
            0.05,
            0.04,
            -0.0035967102416524788,
            0.08338242369780455,
        ),
        (56, 70, 48, 80, 0.05, 0.2, 0.05243147240236498, 0.33387265403690614),
        (9, 10, 3, 10, 0.05, 0.6, 0.1705227239345029, 0.809017973535488),
        (0, 25, 2, 25, 0.05, -0.08, -0.24966108950395322, 0.06518490878150705),
        (
            2150,
            5000,
            2000,
            5000,
            0.01,
            0.03,
            0.004616932945912436,
            0.05532851707961553,
        ),
    ];

    #[test]
    fn newcombe_matches_statsmodels() {
        for (xt, nt, xc, nc, alpha, estimate, low, high) in NEWCOMBE {
            let d = newcombe(p(xt, nt), p(xc, nc), alpha).unwrap();
            assert!((d.estimate - estimate).abs() < 1e-12, "{d:?}");
            assert!(
                close(d.interval.low, low) && close(d.interval.high, high),
                "{xt}/{nt} vs {xc}/{nc}: {d:?} vs ({low}, {high})"
            );
        }
    }

    /// scipy 1.17.1: `chisquare(observed, f_exp=total * weights / sum(weights))`.
    #[test]
    fn the_sample_ratio_test_matches_scipy_and_flags_a_mismatch() {
        let cases: [(&[u64], &[f64], f64, f64); 5] = [
            (&[5120, 4880], &[1.0, 1.0], 5.76, 0.01639507184919225),
            (&[5300, 4700], &[1.0, 1.0], 36.0, 1.9731752900753933e-09),
            (
                &[4480, 4550, 970],
                &[45.0, 45.0, 10.0],
                1.5444444444444445,
                0.46198529277741585,
            ),
            (
                &[4300, 4500, 1200],
                &[45.0, 45.0, 10.0],
                48.888888888888886,
                2.420542233476213e-11,
            ),
            (&[10, 12], &[1.0, 1.0], 0.18181818181818182, 0.6698153575994166),
        ];
        for (observed, weights, chi_squared, p_value) in cases {
            let s = sample_ratio(observed, weights).unwrap();
            assert!(close(s.chi_squared, chi_squared), "{observed:?}: {s:?}");
            assert!(
                (s.p_value - p_value).abs() <= 1e-9 * p_value.max(1e-300) + 1e-15,
                "{observed:?}: {s:?} vs {p_value}"
            );
            assert_eq!(s.mismatch, p_value < 0.001, "{observed:?}");
            assert_eq!(s.degrees_of_freedom as usize, observed.len() - 1);
        }
        assert_eq!(
            sample_ratio(&[1, 2], &[1.0]),
            Err(StatsError::Variants {
                observed: 2,
                weights: 1
            })
        );
        assert!(matches!(
            sample_ratio(&[1, 2], &[1.0, 0.0]),
            Err(StatsError::Weights(_))
        ));
        assert_eq!(sample_ratio(&[0, 0], &[1.0, 1.0]), Err(StatsError::NothingToCompare));
    }

    /// gbstats 0.8.0: `SequentialTwoSidedTTest(ProportionStatistic(xc, nc),
    /// ProportionStatistic(xt, nt), SequentialConfig(alpha, sequential_tuning_parameter,
    /// difference_type="absolute"))`: its confidence interval and p-value.
    /// Control's successes and trials, treatment's, alpha, tuning, then the difference, its
    /// bounds and the p-value.
    type SequentialCase = (u64, u64, u64, u64, f64, f64, f64, f64, f64, f64);
    const SEQUENTIAL: [SequentialCase; 5] = [
        (
            430,
            1000,
            470,
            1000,
            0.05,
            5000.0,
            0.04,
            -0.029443513239706662,
            0.10944351323970662,
            0.596602690153939,
        ),
        (
            4300,
            10000,
            4500,
            10000,
            0.05,
            5000.0,
            0.02,
            -0.0019477971482472316,
            0.04194779714824727,
            0.11172358587040838,
        ),
        (
            430,
            1000,
            470,
            1000,
            0.05,
            1000.0,
            0.04,
            -0.028058504632445094,
            0.10805850463244505,
            0.8958358689059875,
        ),
        (
            2000,
            5000,
            2150,
            5000,
            0.01,
            5000.0,
            0.03,
            -0.005416250973494165,
            0.0654162509734941,
            0.057551743507872434,
        ),
        (
            50,
            100,
            50,
            100,
            0.05,
            5000.0,
            0.0,
            -0.36062162784944235,
            0.36062162784944235,
            1.0,
        ),
    ];

    #[test]
    fn a_sequential_interval_at_a_handful_of_invoices_stays_within_what_a_difference_can_be() {
        let s = sequential_difference(p(4, 9), p(3, 7), 0.05, DEFAULT_SEQUENTIAL_TUNING).unwrap();
        assert_eq!((s.interval.low, s.interval.high), (-1.0, 1.0), "{s:?}");
    }

    #[test]
    fn the_sequential_interval_and_p_value_match_gbstats() {
        for (xc, nc, xt, nt, alpha, tuning, estimate, low, high, p_value) in SEQUENTIAL {
            let s = sequential_difference(p(xt, nt), p(xc, nc), alpha, tuning).unwrap();
            assert!((s.estimate - estimate).abs() < 1e-12, "{s:?}");
            assert!(
                (s.interval.low - low).abs() < 1e-12 && (s.interval.high - high).abs() < 1e-12,
                "{s:?} vs ({low}, {high})"
            );
            assert!(close(s.p_value, p_value), "{s:?} vs {p_value}");
        }
    }

    #[test]
    fn the_sequential_interval_is_wider_than_the_fixed_one_it_guards() {
        let fixed = newcombe(p(4500, 10_000), p(4300, 10_000), 0.05).unwrap();
        let always = sequential_difference(p(4500, 10_000), p(4300, 10_000), 0.05, DEFAULT_SEQUENTIAL_TUNING).unwrap();
        // Fixed-horizon: the 2-point lift looks significant; looked at any day, not yet.
        assert!(!fixed.interval.contains(0.0), "{fixed:?}");
        assert!(always.interval.contains(0.0) && always.p_value > 0.05, "{always:?}");
    }

    #[test]
    fn bad_input_is_refused_with_what_was_wrong() {
        assert_eq!(
            Proportion::new(3, 2),
            Err(StatsError::MoreSuccessesThanTrials {
                successes: 3,
                trials: 2
            })
        );
        assert_eq!(wilson(p(0, 0), 0.05), Err(StatsError::NoTrials));
        assert_eq!(wilson(p(1, 2), 1.5), Err(StatsError::Alpha(1.5)));
        assert_eq!(
            sequential_difference(p(1, 2), p(1, 2), 0.05, 0.0),
            Err(StatsError::Tuning(0.0))
        );
    }

    /// A/A experiments (no difference at all) looked at after every day: stopping at the first
    /// look whose fixed-horizon interval excludes zero finds an "effect" far more often than
    /// its 5 %; the always-valid interval keeps to its level however often it is looked at.
    #[test]
    fn looking_every_day_does_not_inflate_false_positives() {
        // xorshift64*: reproducible draws without a dependency.
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let mut uniform = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
        };
        let (experiments, looks, per_look, rate) = (400, 20, 100, 0.3);
        let (mut fixed_found, mut sequential_found) = (0, 0);
        for _ in 0..experiments {
            let (mut a, mut b) = (
                Proportion {
                    successes: 0,
                    trials: 0,
                },
                Proportion {
                    successes: 0,
                    trials: 0,
                },
            );
            let (mut fixed_hit, mut sequential_hit) = (false, false);
            for _ in 0..looks {
                for _ in 0..per_look {
                    a.trials += 1;
                    a.successes += u64::from(uniform() < rate);
                    b.trials += 1;
                    b.successes += u64::from(uniform() < rate);
                }
                fixed_hit |= !newcombe(b, a, 0.05).unwrap().interval.contains(0.0);
                sequential_hit |= !sequential_difference(b, a, 0.05, DEFAULT_SEQUENTIAL_TUNING)
                    .unwrap()
                    .interval
                    .contains(0.0);
            }
            fixed_found += usize::from(fixed_hit);
            sequential_found += usize::from(sequential_hit);
        }
        let share = |n: usize| n as f64 / experiments as f64;
        assert!(
            share(fixed_found) > 0.12,
            "peeking at a fixed interval: {}",
            share(fixed_found)
        );
        assert!(
            share(sequential_found) <= 0.05,
            "always valid: {}",
            share(sequential_found)
        );
    }

    proptest! {
        /// Wilson's interval stays in [0, 1] and holds the observed rate.
        #[test]
        fn wilson_holds_the_rate(n in 1u64..1_000_000, share in 0.0f64..=1.0, alpha in 0.001f64..0.5) {
            let x = ((n as f64) * share).floor() as u64;
            let i = wilson(p(x, n), alpha).unwrap();
            let rate = x as f64 / n as f64;
            prop_assert!(0.0 <= i.low && i.low <= rate + 1e-12 && rate - 1e-12 <= i.high && i.high <= 1.0, "{i:?} {rate}");
        }

        /// Newcombe's interval holds the observed difference and stays in [-1, 1]; swapping
        /// the variants mirrors it.
        #[test]
        fn newcombe_holds_the_difference_and_mirrors(
            n1 in 1u64..100_000, s1 in 0.0f64..=1.0, n2 in 1u64..100_000, s2 in 0.0f64..=1.0,
        ) {
            let a = p(((n1 as f64) * s1).floor() as u64, n1);
            let b = p(((n2 as f64) * s2).floor() as u64, n2);
            let d = newcombe(a, b, 0.05).unwrap();
            let m = newcombe(b, a, 0.05).unwrap();
            prop_assert!(d.interval.low <= d.estimate + 1e-12 && d.estimate - 1e-12 <= d.interval.high);
            prop_assert!(-1.0 - 1e-12 <= d.interval.low && d.interval.high <= 1.0 + 1e-12);
            prop_assert!((d.interval.low + m.interval.high).abs() < 1e-9 && (d.interval.high + m.interval.low).abs() < 1e-9);
        }

        /// The always-valid interval contains the fixed-horizon one of the same level (it pays
        /// for being valid at every look with width).
        #[test]
        fn the_sequential_interval_is_never_narrower(n in 50u64..200_000, s1 in 0.05f64..0.95, s2 in 0.05f64..0.95) {
            let a = p(((n as f64) * s1) as u64, n);
            let b = p(((n as f64) * s2) as u64, n);
            let always = sequential_difference(a, b, 0.05, DEFAULT_SEQUENTIAL_TUNING).unwrap();
            let z = critical_z(0.05);
            let (p1, p2) = (a.rate(), b.rate());
            let se = (p1 * (1.0 - p1) / n as f64 + p2 * (1.0 - p2) / n as f64).sqrt();
            prop_assert!(always.interval.high - always.estimate >= z * se - 1e-12);
        }
    }
}
