//! What an experiment did, per variant, from what the journeys recorded: invoices assigned,
//! settled before any fee (the Danish utility's measure), settled before the hand-off, handed
//! over, fees charged, messages by channel, disputes, days from due date to payment; each
//! variant compared to control with [`crate::stats`], and the assignment checked against the
//! variants' weights. The shell feeds [`Observation`]s read from the topics, in any order and
//! with redeliveries: the same facts give the same report, from real or simulated data.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::stats::{self, Difference, Interval, Proportion, SampleRatio, SequentialDifference, StatsError};

/// One invoice, by tenant and id.
pub type InvoiceKey = (String, String);

/// A fact about an invoice of the experiment, as the topics hold it.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// The policy put the debtor's invoice in `variant` (its `plan_chosen` event).
    Assigned {
        invoice: InvoiceKey,
        debtor_id: String,
        variant: String,
    },
    /// A step charged a fee (a fee-bearing reminder), in minor units of `currency`.
    FeeCharged {
        invoice: InvoiceKey,
        fee_minor: i64,
        currency: String,
    },
    /// Paid in full to the creditor, `days_after_due` days after the due date (negative: before).
    Settled { invoice: InvoiceKey, days_after_due: i64 },
    /// Handed to the collection agency.
    HandedOver { invoice: InvoiceKey },
    /// A message went out on `channel`.
    MessageSent { invoice: InvoiceKey, channel: String },
    /// The debtor disputed the invoice.
    Disputed { invoice: InvoiceKey },
}

/// What is known of one invoice: gathered fact by fact from the topics, or whole from a
/// simulation ([`Collector::add_story`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InvoiceFacts {
    pub variant: Option<String>,
    pub debtor_id: Option<String>,
    /// Fees charged, by currency.
    pub fees: BTreeMap<String, i64>,
    /// Days from the due date to payment in full, when paid.
    pub settled_days: Option<i64>,
    pub handed_over: bool,
    pub disputed: bool,
    /// Messages sent, by channel.
    pub messages: BTreeMap<String, u64>,
}

/// Collects observations; [`Collector::report`] compares the variants.
#[derive(Debug, Default)]
pub struct Collector {
    invoices: BTreeMap<InvoiceKey, InvoiceFacts>,
    /// Whole stories, tallied as they come (a simulation of millions keeps no invoice).
    tallied: BTreeMap<String, Tally>,
}

impl Collector {
    /// Takes one fact. Facts are idempotent except fees and messages, which the shell
    /// deduplicates by their record's event id before they come here.
    pub fn observe(&mut self, o: Observation) {
        match o {
            Observation::Assigned {
                invoice,
                debtor_id,
                variant,
            } => {
                let facts = self.invoices.entry(invoice).or_default();
                facts.variant = Some(variant);
                facts.debtor_id = Some(debtor_id);
            }
            Observation::FeeCharged {
                invoice,
                fee_minor,
                currency,
            } => {
                *self
                    .invoices
                    .entry(invoice)
                    .or_default()
                    .fees
                    .entry(currency)
                    .or_default() += fee_minor;
            }
            Observation::Settled {
                invoice,
                days_after_due,
            } => {
                self.invoices.entry(invoice).or_default().settled_days = Some(days_after_due);
            }
            Observation::HandedOver { invoice } => self.invoices.entry(invoice).or_default().handed_over = true,
            Observation::MessageSent { invoice, channel } => {
                *self
                    .invoices
                    .entry(invoice)
                    .or_default()
                    .messages
                    .entry(channel)
                    .or_default() += 1;
            }
            Observation::Disputed { invoice } => self.invoices.entry(invoice).or_default().disputed = true,
        }
    }

    /// An invoice whose whole story is known (a simulated one): counted at once, not kept.
    pub fn add_story(&mut self, story: &InvoiceFacts) {
        if let Some(variant) = &story.variant {
            self.tallied.entry(variant.clone()).or_default().add(story);
        }
    }

    /// The report: `variants` with their weights in the policy's order, the first compared
    /// against (control), at level `alpha`.
    pub fn report(&self, experiment: &str, variants: &[(String, f64)], alpha: f64) -> Result<Report, StatsError> {
        let mut per_variant: BTreeMap<String, Tally> = BTreeMap::new();
        let mut unknown_variants = BTreeSet::new();
        for (variant, tally) in &self.tallied {
            if variants.iter().any(|(v, _)| v == variant) {
                per_variant.insert(variant.clone(), tally.clone());
            } else {
                unknown_variants.insert(variant.clone());
            }
        }
        for facts in self.invoices.values() {
            let Some(variant) = facts.variant.as_deref() else {
                // A fact about an invoice the experiment did not assign (another experiment's,
                // or from before this one): not part of it.
                continue;
            };
            if !variants.iter().any(|(v, _)| v == variant) {
                unknown_variants.insert(variant.to_owned());
                continue;
            }
            per_variant.entry(variant.to_owned()).or_default().add(facts);
        }
        let empty = Tally::default();
        let tallies: Vec<(&str, &Tally)> = variants
            .iter()
            .map(|(v, _)| (v.as_str(), per_variant.get(v.as_str()).unwrap_or(&empty)))
            .collect();
        let weights: Vec<f64> = variants.iter().map(|(_, w)| *w).collect();
        let debtors: Vec<u64> = tallies.iter().map(|(_, t)| t.debtors.len() as u64).collect();
        let sample_ratio = stats::sample_ratio(&debtors, &weights).ok();
        let control = tallies.first().map(|(_, t)| *t);
        let mut rows = Vec::new();
        for (name, tally) in &tallies {
            let metrics = tally.metrics(alpha)?;
            let versus_control = match control {
                Some(c) if !std::ptr::eq(c, *tally) && c.invoices > 0 && tally.invoices > 0 => {
                    Some(Comparison::between(tally, c, alpha)?)
                }
                _ => None,
            };
            rows.push(VariantReport {
                variant: (*name).to_owned(),
                weight: variants.iter().find(|(v, _)| v == name).map_or(0.0, |(_, w)| *w),
                debtors: tally.debtors.len() as u64,
                invoices: tally.invoices,
                metrics,
                fees_minor: tally.fees.clone(),
                messages: tally.messages.clone(),
                days_to_payment: tally.days_to_payment(),
                versus_control,
            });
        }
        Ok(Report {
            experiment: experiment.to_owned(),
            alpha,
            control: variants.first().map(|(v, _)| v.clone()).unwrap_or_default(),
            variants: rows,
            sample_ratio,
            unknown_variants: unknown_variants.into_iter().collect(),
        })
    }
}

/// One variant's counts.
#[derive(Debug, Clone, Default)]
struct Tally {
    debtors: BTreeSet<String>,
    invoices: u64,
    settled_before_fee: u64,
    settled_before_handoff: u64,
    settled: u64,
    handed_over: u64,
    disputed: u64,
    charged: u64,
    fees: BTreeMap<String, i64>,
    messages: BTreeMap<String, u64>,
    days: Vec<i64>,
}

impl Tally {
    fn add(&mut self, f: &InvoiceFacts) {
        if let Some(d) = &f.debtor_id {
            self.debtors.insert(d.clone());
        }
        self.invoices += 1;
        let charged = f.fees.values().any(|m| *m > 0);
        if let Some(days) = f.settled_days {
            self.settled += 1;
            self.days.push(days);
            self.settled_before_fee += u64::from(!charged);
            self.settled_before_handoff += u64::from(!f.handed_over);
        }
        self.handed_over += u64::from(f.handed_over);
        self.disputed += u64::from(f.disputed);
        self.charged += u64::from(charged);
        for (currency, minor) in &f.fees {
            *self.fees.entry(currency.clone()).or_default() += minor;
        }
        for (channel, n) in &f.messages {
            *self.messages.entry(channel.clone()).or_default() += n;
        }
    }

    fn share(&self, successes: u64) -> Proportion {
        Proportion {
            successes,
            trials: self.invoices,
        }
    }

    fn proportions(&self) -> [(&'static str, Proportion); 6] {
        [
            ("settled_before_fee", self.share(self.settled_before_fee)),
            ("settled_before_handoff", self.share(self.settled_before_handoff)),
            ("settled", self.share(self.settled)),
            ("handed_over", self.share(self.handed_over)),
            ("charged_a_fee", self.share(self.charged)),
            ("disputed", self.share(self.disputed)),
        ]
    }

    fn metrics(&self, alpha: f64) -> Result<BTreeMap<&'static str, Rate>, StatsError> {
        let mut out = BTreeMap::new();
        for (name, p) in self.proportions() {
            let interval = if p.trials == 0 {
                None
            } else {
                Some(stats::wilson(p, alpha)?)
            };
            out.insert(
                name,
                Rate {
                    count: p.successes,
                    of: p.trials,
                    rate: p.rate(),
                    interval,
                },
            );
        }
        Ok(out)
    }

    fn days_to_payment(&self) -> Option<DaysToPayment> {
        if self.days.is_empty() {
            return None;
        }
        let mut sorted = self.days.clone();
        sorted.sort_unstable();
        let mean = sorted.iter().sum::<i64>() as f64 / sorted.len() as f64;
        let mid = sorted.len() / 2;
        let median = if sorted.len() % 2 == 0 {
            (sorted[mid - 1] + sorted[mid]) as f64 / 2.0
        } else {
            sorted[mid] as f64
        };
        Some(DaysToPayment {
            paid: sorted.len() as u64,
            mean,
            median,
        })
    }
}

/// A rate with its Wilson interval.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rate {
    pub count: u64,
    pub of: u64,
    pub rate: f64,
    pub interval: Option<Interval>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DaysToPayment {
    pub paid: u64,
    pub mean: f64,
    pub median: f64,
}

/// A variant against control on each rate: Newcombe's interval for a single look, and the
/// always-valid one for a report looked at again and again.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    pub differences: BTreeMap<&'static str, MetricDifference>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricDifference {
    pub fixed: Difference,
    pub sequential: SequentialDifference,
}

impl MetricDifference {
    /// The always-valid interval excludes no difference: the effect holds however often the
    /// report was looked at.
    pub fn significant(&self) -> bool {
        !self.sequential.interval.contains(0.0)
    }
}

impl Comparison {
    fn between(treatment: &Tally, control: &Tally, alpha: f64) -> Result<Self, StatsError> {
        let mut differences = BTreeMap::new();
        for ((name, t), (_, c)) in treatment.proportions().into_iter().zip(control.proportions()) {
            differences.insert(
                name,
                MetricDifference {
                    fixed: stats::newcombe(t, c, alpha)?,
                    sequential: stats::sequential_difference(t, c, alpha, stats::DEFAULT_SEQUENTIAL_TUNING)?,
                },
            );
        }
        Ok(Self { differences })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VariantReport {
    pub variant: String,
    pub weight: f64,
    pub debtors: u64,
    pub invoices: u64,
    pub metrics: BTreeMap<&'static str, Rate>,
    /// Fees charged, by currency (minor units).
    pub fees_minor: BTreeMap<String, i64>,
    /// Messages sent, by channel.
    pub messages: BTreeMap<String, u64>,
    pub days_to_payment: Option<DaysToPayment>,
    /// Absent for control itself.
    pub versus_control: Option<Comparison>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub experiment: String,
    pub alpha: f64,
    pub control: String,
    pub variants: Vec<VariantReport>,
    /// Debtors per variant against the weights; absent when there is nothing to compare.
    pub sample_ratio: Option<SampleRatio>,
    /// Variants the journeys name that the policy does not (a renamed variant?): left out.
    pub unknown_variants: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: usize) -> InvoiceKey {
        ("acme".into(), format!("inv-{i}"))
    }

    /// 1000 invoices each way: control settles 430 before a fee, the friendly variant 470.
    fn two_variants() -> Collector {
        let mut c = Collector::default();
        for i in 0..2000 {
            let variant = if i % 2 == 0 { "control" } else { "friendly" };
            c.observe(Observation::Assigned {
                invoice: key(i),
                debtor_id: format!("d{i}"),
                variant: variant.into(),
            });
            c.observe(Observation::MessageSent {
                invoice: key(i),
                channel: "email".into(),
            });
            let rank = i / 2;
            let before_fee = if variant == "control" { 430 } else { 470 };
            if rank < before_fee {
                c.observe(Observation::Settled {
                    invoice: key(i),
                    days_after_due: 2,
                });
            } else if rank < 900 {
                c.observe(Observation::FeeCharged {
                    invoice: key(i),
                    fee_minor: 6_000,
                    currency: "DKK".into(),
                });
                c.observe(Observation::Settled {
                    invoice: key(i),
                    days_after_due: 20,
                });
            } else {
                c.observe(Observation::FeeCharged {
                    invoice: key(i),
                    fee_minor: 6_000,
                    currency: "DKK".into(),
                });
                c.observe(Observation::HandedOver { invoice: key(i) });
            }
        }
        c
    }

    #[test]
    fn each_variant_gets_its_rates_and_its_difference_to_control() {
        let r = two_variants()
            .report(
                "friendly-first",
                &[("control".into(), 50.0), ("friendly".into(), 50.0)],
                0.05,
            )
            .unwrap();
        assert_eq!(r.control, "control");
        let (control, friendly) = (&r.variants[0], &r.variants[1]);
        assert_eq!((control.invoices, friendly.invoices), (1000, 1000));
        assert_eq!(control.metrics["settled_before_fee"].count, 430);
        assert_eq!(friendly.metrics["settled_before_fee"].count, 470);
        assert_eq!(control.metrics["handed_over"].count, 100);
        assert_eq!(control.metrics["settled_before_handoff"].count, 900);
        assert_eq!(control.fees_minor["DKK"], 570 * 6_000);
        assert_eq!(friendly.messages["email"], 1000);
        assert!(control.versus_control.is_none());
        let d = &friendly.versus_control.as_ref().unwrap().differences["settled_before_fee"];
        // statsmodels' Newcombe interval for 470/1000 vs 430/1000 (see stats' golden values).
        assert!((d.fixed.interval.low - -0.0035967102416524788).abs() < 1e-12, "{d:?}");
        assert!((d.sequential.p_value - 0.596602690153939).abs() < 1e-9, "{d:?}");
        assert!(!d.significant(), "4 points on 1000 each is not yet evidence");
        let days = friendly.days_to_payment.as_ref().unwrap();
        assert_eq!(days.paid, 900);
        assert_eq!(days.median, 2.0, "most of friendly's paid on the second day");
        assert_eq!(control.days_to_payment.as_ref().unwrap().median, 20.0);
        let srm = r.sample_ratio.unwrap();
        assert!(!srm.mismatch && (srm.p_value - 1.0).abs() < 1e-12, "{srm:?}");
    }

    #[test]
    fn a_lopsided_assignment_is_flagged_and_unknown_variants_are_named() {
        let mut c = Collector::default();
        for i in 0..1000 {
            c.observe(Observation::Assigned {
                invoice: key(i),
                debtor_id: format!("d{i}"),
                variant: if i < 560 { "control" } else { "friendly" }.into(),
            });
        }
        c.observe(Observation::Assigned {
            invoice: key(5000),
            debtor_id: "x".into(),
            variant: "renamed".into(),
        });
        // A fact about an invoice outside the experiment counts nowhere.
        c.observe(Observation::HandedOver { invoice: key(9999) });
        let r = c
            .report("e", &[("control".into(), 1.0), ("friendly".into(), 1.0)], 0.05)
            .unwrap();
        assert!(r.sample_ratio.unwrap().mismatch, "{:?}", r.sample_ratio);
        assert_eq!(r.unknown_variants, ["renamed"]);
        assert_eq!(r.variants[0].invoices + r.variants[1].invoices, 1000);
    }

    #[test]
    fn the_order_of_facts_does_not_matter() {
        let facts = vec![
            Observation::Settled {
                invoice: key(1),
                days_after_due: -3,
            },
            Observation::Assigned {
                invoice: key(1),
                debtor_id: "d1".into(),
                variant: "control".into(),
            },
            Observation::Assigned {
                invoice: key(2),
                debtor_id: "d2".into(),
                variant: "b".into(),
            },
        ];
        let variants = [("control".to_owned(), 1.0), ("b".to_owned(), 1.0)];
        let mut forward = Collector::default();
        let mut backward = Collector::default();
        for f in facts.iter().cloned() {
            forward.observe(f);
        }
        for f in facts.into_iter().rev() {
            backward.observe(f);
        }
        assert_eq!(
            forward.report("e", &variants, 0.05).unwrap(),
            backward.report("e", &variants, 0.05).unwrap()
        );
        let r = forward.report("e", &variants, 0.05).unwrap();
        assert_eq!(r.variants[0].metrics["settled_before_fee"].count, 1);
        assert_eq!(r.variants[0].days_to_payment.as_ref().unwrap().mean, -3.0);
    }
}
