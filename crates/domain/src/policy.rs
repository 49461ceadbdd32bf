//! The journey policy a credit controller writes: segments chosen by predicates on the debtor
//! and the invoice, a plan per segment, and experiments that vary plans for a share of debtors.
//!
//! A policy is loaded from TOML, checked for structure, and every plan is checked against the
//! law of every jurisdiction and debtor kind its segments can reach. A policy with any problem
//! is refused as a whole, with every problem listed and the law's citation for each violation.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use chrono::{NaiveDate, NaiveTime};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::journey::{FeeSpec, PauseLimits, Plan, PlannedStep, StepFee, StepKind, Tone};
use crate::jurisdiction::{DebtorKind, Jurisdiction};
use crate::law::{DebtorContext, FeeStep, LawBook, PlannedFeeStep};
use crate::money::{Currency, Money};

pub const CHANNELS: [&str; 3] = ["email", "sms", "webhook"];

/// The built-in policy: what a tenant without its own policy gets.
pub const DEFAULT_POLICY: &str = include_str!("../data/default-policy.toml");

/// One problem found in a policy: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyProblem {
    pub location: String,
    pub message: String,
}

impl fmt::Display for PolicyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// Every problem of a refused policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy refused ({} problem{}):\n{}", .0.len(), if .0.len() == 1 { "" } else { "s" }, .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
pub struct PolicyError(pub Vec<PolicyProblem>);

/// Which invoices and debtors a segment takes. Every condition given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Predicate {
    /// `consumer` or `business`.
    pub debtor_kind: Option<String>,
    pub jurisdiction: Option<Vec<Jurisdiction>>,
    /// Late invoices of this debtor in the last 12 months (first-time late = max 0).
    pub late_last_12m_min: Option<u32>,
    pub late_last_12m_max: Option<u32>,
    /// Propensity-to-pay score band, 0-100 (invoices without a score do not match a band).
    pub propensity_min: Option<u8>,
    pub propensity_max: Option<u8>,
    /// Amount band in minor units of the invoice's currency.
    pub amount_min_minor: Option<i64>,
    pub amount_max_minor: Option<i64>,
    /// Sweden: whether a reminder fee was agreed in advance.
    pub fee_agreed: Option<bool>,
}

impl Predicate {
    fn is_catch_all(&self) -> bool {
        *self == Predicate::default()
    }

    fn kind(&self) -> Option<DebtorKind> {
        self.debtor_kind.as_deref().and_then(|k| k.parse().ok())
    }

    pub fn matches(&self, f: &DebtorFacts) -> bool {
        let within =
            |v: i64, lo: Option<i64>, hi: Option<i64>| lo.is_none_or(|lo| v >= lo) && hi.is_none_or(|hi| v <= hi);
        self.kind().is_none_or(|k| k == f.kind)
            && self.jurisdiction.as_ref().is_none_or(|js| js.contains(&f.jurisdiction))
            && within(
                i64::from(f.late_last_12m),
                self.late_last_12m_min.map(i64::from),
                self.late_last_12m_max.map(i64::from),
            )
            && (self.propensity_min.is_none() && self.propensity_max.is_none()
                || f.propensity.is_some_and(|p| {
                    within(
                        i64::from(p),
                        self.propensity_min.map(i64::from),
                        self.propensity_max.map(i64::from),
                    )
                }))
            && within(f.amount.minor, self.amount_min_minor, self.amount_max_minor)
            && self.fee_agreed.is_none_or(|a| a == f.fee_agreed)
    }

    fn jurisdictions(&self) -> Vec<Jurisdiction> {
        self.jurisdiction.clone().unwrap_or_else(|| Jurisdiction::ALL.to_vec())
    }

    fn kinds(&self) -> Vec<DebtorKind> {
        self.kind()
            .map(|k| vec![k])
            .unwrap_or_else(|| vec![DebtorKind::Consumer, DebtorKind::Business])
    }

    fn fee_agreed_values(&self) -> Vec<bool> {
        self.fee_agreed.map(|a| vec![a]).unwrap_or_else(|| vec![false, true])
    }
}

/// What the policy knows about a debtor and invoice when choosing a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebtorFacts {
    pub jurisdiction: Jurisdiction,
    pub kind: DebtorKind,
    pub late_last_12m: u32,
    pub propensity: Option<u8>,
    pub amount: Money,
    pub fee_agreed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub name: String,
    pub when: Predicate,
    pub plan: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variant {
    pub name: String,
    pub weight: u32,
    /// The plan this variant uses instead of the segment's; `None` = the segment's own.
    pub plan: Option<String>,
    /// Gets no messages at all (the journey still runs to its hand-off).
    pub holdout: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Experiment {
    pub name: String,
    pub segments: Vec<String>,
    pub start: NaiveDate,
    pub end: NaiveDate,
    pub variants: Vec<Variant>,
}

impl Experiment {
    fn active(&self, on: NaiveDate) -> bool {
        self.start <= on && on <= self.end
    }

    /// The variant a debtor is in: the same for all of the debtor's invoices, every time.
    pub fn variant_for(&self, tenant: &str, debtor_id: &str) -> &Variant {
        let total: u64 = self.variants.iter().map(|v| u64::from(v.weight)).sum();
        let mut point = bucket(tenant, debtor_id, &self.name) % total.max(1);
        for v in &self.variants {
            if point < u64::from(v.weight) {
                return v;
            }
            point -= u64::from(v.weight);
        }
        // Unreachable with positive weights (checked at load); the first variant is the control.
        &self.variants[0]
    }
}

/// A stable, uniform number per (tenant, debtor, experiment): the first 8 bytes of SHA-256.
pub fn bucket(tenant: &str, debtor_id: &str, experiment: &str) -> u64 {
    let digest = Sha256::new()
        .chain_update(tenant)
        .chain_update([0x1f])
        .chain_update(debtor_id)
        .chain_update([0x1f])
        .chain_update(experiment)
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// A loaded, checked policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub version: String,
    pub tenant: Option<String>,
    pub segments: Vec<Segment>,
    pub plans: BTreeMap<String, Plan>,
    pub experiments: Vec<Experiment>,
    /// What debtors may ask for: postponement, instalments, promises.
    pub pauses: PauseLimits,
    /// A debtor's messages of one tone due within this many days of each other go out as one.
    pub combine_within_days: u32,
    /// Where the law merges a debtor's claims at hand-off (Norway), a claim whose own hand-off
    /// falls within this many days of another's goes in the same case.
    pub merge_within_days: u32,
    /// What a hand-off claims beyond the plan's fees: late interest, compensation.
    pub claims: crate::claim::ClaimTerms,
    /// Who gives the statutory warning before collection (`[handoff]`).
    pub handoff: HandoffTerms,
}

/// What a policy says of its hand-offs (`[handoff]` in the policy file).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HandoffTerms {
    /// Where the agency, by its contract with the creditor, sends the statutory warning before
    /// collection as its first step (NO inkassovarsel, DK påkrav): a plan may hand off there
    /// without sending one, and the case tells the agency it was not given.
    pub agency_sends_warning: Vec<Jurisdiction>,
}

/// Days within which a debtor's steps are combined when a policy does not say.
pub const DEFAULT_COMBINE_WITHIN_DAYS: u32 = 3;

fn default_combine_within_days() -> u32 {
    DEFAULT_COMBINE_WITHIN_DAYS
}

/// Days within which claims handed over are merged when a policy does not say.
pub const DEFAULT_MERGE_WITHIN_DAYS: u32 = 14;

fn default_merge_within_days() -> u32 {
    DEFAULT_MERGE_WITHIN_DAYS
}

impl Policy {
    /// How far ahead a firing step gathers the debtor's other steps into one message.
    pub fn combine_window(&self) -> chrono::Duration {
        chrono::Duration::days(i64::from(self.combine_within_days))
    }

    /// How far ahead a hand-off gathers the debtor's other claims into one case.
    pub fn merge_window(&self) -> chrono::Duration {
        chrono::Duration::days(i64::from(self.merge_within_days))
    }
}

/// The plan chosen for one invoice, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub segment: String,
    pub plan: Plan,
    /// `experiment/variant` when an experiment assigned the debtor.
    pub experiment: Option<String>,
}

/// The experiment and variant of a journey's recorded assignment (`experiment/variant`), as
/// metric labels: `("none", "none")` for a journey no experiment assigned.
pub fn experiment_labels(assignment: Option<&str>) -> (&str, &str) {
    match assignment.and_then(|a| a.split_once('/')) {
        Some((experiment, variant)) => (experiment, variant),
        None => ("none", "none"),
    }
}

impl Policy {
    /// A plan by the name a journey recorded (`name+holdout` for a holdout's message-free copy).
    pub fn plan_named(&self, name: &str) -> Option<Plan> {
        let (base, holdout) = match name.strip_suffix("+holdout") {
            Some(base) => (base, true),
            None => (name, false),
        };
        let mut plan = self.plans.get(base).cloned()?;
        if holdout {
            plan.steps.retain(|s| matches!(s.kind, StepKind::Handoff));
            plan.name = name.to_owned();
        }
        Some(plan)
    }

    /// The catch-all segment's plan: where a journey goes when its plan left the policy.
    pub fn fallback_plan(&self) -> Plan {
        self.segments
            .last()
            .and_then(|s| self.plans.get(&s.plan))
            .cloned()
            .unwrap_or_else(Plan::builtin)
    }

    /// The plan for a debtor's invoice: the first segment that matches, then any active
    /// experiment on that segment.
    pub fn choose(&self, tenant: &str, debtor_id: &str, facts: &DebtorFacts, on: NaiveDate) -> Choice {
        // A catch-all last segment is required at load, so some segment always matches.
        let segment = self
            .segments
            .iter()
            .find(|s| s.when.matches(facts))
            .unwrap_or_else(|| &self.segments[self.segments.len() - 1]);
        let mut plan_name = segment.plan.clone();
        let mut experiment = None;
        let mut holdout = false;
        if let Some(e) = self
            .experiments
            .iter()
            .find(|e| e.active(on) && e.segments.contains(&segment.name))
        {
            let v = e.variant_for(tenant, debtor_id);
            if let Some(p) = &v.plan {
                plan_name = p.clone();
            }
            holdout = v.holdout;
            experiment = Some(format!("{}/{}", e.name, v.name));
        }
        let name = if holdout {
            format!("{plan_name}+holdout")
        } else {
            plan_name
        };
        let plan = self.plan_named(&name).unwrap_or_else(|| self.fallback_plan());
        Choice {
            segment: segment.name.clone(),
            plan,
            experiment,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    version: String,
    tenant: Option<String>,
    send_time: Option<String>,
    #[serde(default, rename = "segment")]
    segments: Vec<RawSegment>,
    #[serde(default, rename = "plan")]
    plans: BTreeMap<String, RawPlan>,
    #[serde(default, rename = "experiment")]
    experiments: Vec<RawExperiment>,
    #[serde(default)]
    pauses: PauseLimits,
    #[serde(default = "default_combine_within_days")]
    combine_within_days: u32,
    #[serde(default = "default_merge_within_days")]
    merge_within_days: u32,
    #[serde(default)]
    claims: crate::claim::ClaimTerms,
    #[serde(default)]
    handoff: HandoffTerms,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSegment {
    name: String,
    #[serde(default)]
    when: Predicate,
    plan: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    #[serde(rename = "step")]
    steps: Vec<RawStep>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: String,
    offset_banking_days: i32,
    #[serde(default)]
    channels: Vec<String>,
    tone: Option<String>,
    #[serde(default)]
    handoff: bool,
    #[serde(default)]
    fee: Option<RawFee>,
    days_to_pay: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawFee {
    Word(String),
    Amount { amount_minor: i64, currency: Currency },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExperiment {
    name: String,
    segments: Vec<String>,
    start: NaiveDate,
    end: NaiveDate,
    #[serde(rename = "variant")]
    variants: Vec<RawVariant>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVariant {
    name: String,
    weight: u32,
    plan: Option<String>,
    #[serde(default)]
    holdout: bool,
}

/// The kind of step the law sees in a message of this tone.
pub(crate) fn law_step(tone: Tone) -> FeeStep {
    match tone {
        Tone::Nudge | Tone::Reminder => FeeStep::Reminder,
        Tone::CollectionWarning => FeeStep::CollectionWarning,
        Tone::PaymentDemand => FeeStep::PaymentDemand,
    }
}

/// Loads a policy and checks it, structure and law, as of `on`.
pub fn load(text: &str, law: &LawBook, on: NaiveDate) -> Result<Policy, PolicyError> {
    let raw: RawPolicy = toml::from_str(text).map_err(|e| {
        PolicyError(vec![PolicyProblem {
            location: "policy file".into(),
            message: e.to_string().trim().to_owned(),
        }])
    })?;
    let mut problems = Vec::new();
    let mut problem = |location: String, message: String| problems.push(PolicyProblem { location, message });
    if raw.combine_within_days > 14 {
        // Combining brings steps forward by up to the window: beyond two weeks a nudge or a
        // reminder would reach the debtor far from the day the plan (and its law check) set.
        problem(
            "combine_within_days".into(),
            format!("{} days: at most 14", raw.combine_within_days),
        );
    }
    if raw.merge_within_days > 31 {
        // A claim joins a case before its own hand-off day, once its warning's deadline has
        // passed; a month is as far as a claim may reasonably be taken ahead of its plan.
        problem(
            "merge_within_days".into(),
            format!("{} days: at most 31", raw.merge_within_days),
        );
    }
    let send_time = match raw.send_time.as_deref() {
        None => NaiveTime::from_hms_opt(9, 0, 0).unwrap_or(NaiveTime::MIN),
        Some(t) => NaiveTime::parse_from_str(t, "%H:%M").unwrap_or_else(|_| {
            problem("send_time".into(), format!("'{t}' is not a time like 09:00"));
            NaiveTime::MIN
        }),
    };
    if raw.version.trim().is_empty() {
        problem("version".into(), "must not be empty".into());
    }

    let mut plans = BTreeMap::new();
    for (name, rp) in &raw.plans {
        let at = |step: &str| format!("plan '{name}' step '{step}'");
        let mut steps = Vec::new();
        let mut seen = HashSet::new();
        if rp.steps.is_empty() {
            problem(format!("plan '{name}'"), "has no steps".into());
        }
        for (i, st) in rp.steps.iter().enumerate() {
            if !seen.insert(st.name.as_str()) {
                problem(at(&st.name), "the name is used twice in the plan".into());
            }
            if i > 0 && st.offset_banking_days <= rp.steps[i - 1].offset_banking_days {
                problem(
                    at(&st.name),
                    format!(
                        "comes at {} banking days, not after '{}' at {}",
                        st.offset_banking_days,
                        rp.steps[i - 1].name,
                        rp.steps[i - 1].offset_banking_days
                    ),
                );
            }
            let fee = match &st.fee {
                None => FeeSpec::None,
                Some(RawFee::Word(w)) if w == "none" => FeeSpec::None,
                Some(RawFee::Word(w)) if w == "statutory_maximum" => FeeSpec::StatutoryMaximum,
                Some(RawFee::Word(w)) => {
                    problem(
                        at(&st.name),
                        format!(
                            "fee '{w}': expected \"none\", \"statutory_maximum\" or {{ amount_minor = …, currency = … }}"
                        ),
                    );
                    FeeSpec::None
                }
                Some(RawFee::Amount { amount_minor, currency }) => {
                    if *amount_minor < 0 {
                        problem(at(&st.name), format!("fee {amount_minor} is negative"));
                    }
                    FeeSpec::Fixed(Money::new(*amount_minor, *currency))
                }
            };
            let kind = if st.handoff {
                if i + 1 != rp.steps.len() {
                    problem(at(&st.name), "the hand-off must be the plan's last step".into());
                }
                if !st.channels.is_empty() || st.tone.is_some() || fee != FeeSpec::None {
                    problem(at(&st.name), "a hand-off step has no channels, tone or fee".into());
                }
                StepKind::Handoff
            } else {
                let tone = match st.tone.as_deref() {
                    Some("nudge") => Tone::Nudge,
                    Some("reminder") => Tone::Reminder,
                    Some("collection_warning") => Tone::CollectionWarning,
                    Some("payment_demand") => Tone::PaymentDemand,
                    other => {
                        problem(
                            at(&st.name),
                            format!("tone {other:?}: expected nudge, reminder, collection_warning or payment_demand"),
                        );
                        Tone::Reminder
                    }
                };
                if st.channels.is_empty() {
                    problem(at(&st.name), "names no channel".into());
                }
                for c in &st.channels {
                    if !CHANNELS.contains(&c.as_str()) {
                        problem(
                            at(&st.name),
                            format!("channel '{c}': expected one of {}", CHANNELS.join(", ")),
                        );
                    }
                }
                StepKind::Message {
                    tone,
                    channels: st.channels.clone(),
                }
            };
            steps.push(PlannedStep {
                name: st.name.clone(),
                offset_banking_days: st.offset_banking_days,
                kind,
                fee,
                days_to_pay: st.days_to_pay,
            });
        }
        plans.insert(
            name.clone(),
            Plan {
                name: name.clone(),
                version: raw.version.clone(),
                steps,
                send_time,
            },
        );
    }

    let mut segments = Vec::new();
    let mut seen = HashSet::new();
    for s in &raw.segments {
        let at = format!("segment '{}'", s.name);
        if !seen.insert(s.name.as_str()) {
            problem(at.clone(), "the name is used twice".into());
        }
        if !plans.contains_key(&s.plan) {
            problem(at.clone(), format!("plan '{}' is not defined", s.plan));
        }
        if let Some(k) = &s.when.debtor_kind {
            if k.parse::<DebtorKind>().is_err() {
                problem(at.clone(), format!("debtor_kind '{k}': expected consumer or business"));
            }
        }
        segments.push(Segment {
            name: s.name.clone(),
            when: s.when.clone(),
            plan: s.plan.clone(),
        });
    }
    match segments.last() {
        None => problem("segments".into(), "the policy has no segment".into()),
        Some(last) if !last.when.is_catch_all() => problem(
            format!("segment '{}'", last.name),
            "the last segment must have no `when`, so that every invoice gets a plan".into(),
        ),
        _ => {}
    }

    let mut experiments = Vec::new();
    for e in &raw.experiments {
        let at = format!("experiment '{}'", e.name);
        if e.name.is_empty() || e.name.contains('/') {
            problem(
                at.clone(),
                "its name must be non-empty and without '/' (journeys record 'experiment/variant')".into(),
            );
        }
        if e.end < e.start {
            problem(at.clone(), format!("ends {} before it starts {}", e.end, e.start));
        }
        for s in &e.segments {
            if !seen.contains(s.as_str()) {
                problem(at.clone(), format!("segment '{s}' is not defined"));
            }
        }
        if e.variants.is_empty() {
            problem(at.clone(), "has no variants".into());
        }
        let mut names = HashSet::new();
        for v in &e.variants {
            if v.name.is_empty() || v.name.contains('/') {
                problem(at.clone(), format!("variant '{}' must be named, without '/'", v.name));
            }
            if !names.insert(v.name.as_str()) {
                problem(at.clone(), format!("variant '{}' is defined twice", v.name));
            }
            if v.weight == 0 {
                problem(at.clone(), format!("variant '{}' has weight 0", v.name));
            }
            if let Some(p) = &v.plan {
                if !plans.contains_key(p) {
                    problem(
                        at.clone(),
                        format!("variant '{}' uses plan '{p}', which is not defined", v.name),
                    );
                }
            }
        }
        experiments.push(Experiment {
            name: e.name.clone(),
            segments: e.segments.clone(),
            start: e.start,
            end: e.end,
            variants: e
                .variants
                .iter()
                .map(|v| Variant {
                    name: v.name.clone(),
                    weight: v.weight,
                    plan: v.plan.clone(),
                    holdout: v.holdout,
                })
                .collect(),
        });
    }

    // The law: every plan a segment can lead to, for every debtor it can reach.
    let mut checked = HashSet::new();
    for s in &segments {
        let mut reachable = vec![s.plan.clone()];
        for e in experiments.iter().filter(|e| e.segments.contains(&s.name)) {
            reachable.extend(e.variants.iter().filter_map(|v| v.plan.clone()));
        }
        for plan_name in reachable {
            let Some(plan) = plans.get(&plan_name) else { continue };
            for j in s.when.jurisdictions() {
                for kind in s.when.kinds() {
                    for agreed in s.when.fee_agreed_values() {
                        let ctx = DebtorContext {
                            jurisdiction: j,
                            kind,
                            fee_agreed_in_advance: agreed,
                        };
                        let warning = warning_before_handoff(plan, &ctx, law, on, &raw.handoff);
                        for v in law_violations(plan, &ctx, law, on).into_iter().chain(warning) {
                            let who = format!(
                                "{j} {}{}",
                                kind.code(),
                                if j == Jurisdiction::SE && !agreed {
                                    " debtors without an agreed fee"
                                } else {
                                    " debtors"
                                }
                            );
                            if checked.insert((plan_name.clone(), who.clone(), v.clone())) {
                                problem(format!("plan '{plan_name}' (segment '{}') for {who}", s.name), v);
                            }
                        }
                    }
                }
            }
        }
    }

    for message in crate::claim::check_terms(&raw.claims, law, on) {
        problem("claims".into(), message);
    }

    if problems.is_empty() {
        Ok(Policy {
            version: raw.version,
            tenant: raw.tenant,
            segments,
            plans,
            experiments,
            pauses: raw.pauses,
            combine_within_days: raw.combine_within_days,
            merge_within_days: raw.merge_within_days,
            claims: raw.claims,
            handoff: raw.handoff,
        })
    } else {
        Err(PolicyError(problems))
    }
}

/// The fee a step charges this debtor: its fixed amount, or the statutory maximum of the
/// debtor's law (zero where the law sets none).
pub fn resolve_fee(step: &PlannedStep, ctx: &DebtorContext, law: &LawBook, on: NaiveDate) -> Money {
    let zero = Money::zero(ctx.jurisdiction.home_currency());
    match (&step.fee, &step.kind) {
        (FeeSpec::Fixed(m), StepKind::Message { .. }) => *m,
        (FeeSpec::StatutoryMaximum, StepKind::Message { tone, .. }) => {
            law.max_fee(ctx, law_step(*tone), on).unwrap_or(zero)
        }
        _ => zero,
    }
}

/// What a step charges this debtor now ([`resolve_fee`]) and the first day the law lets it be
/// charged, given the days fees were charged before on this claim; no fee at all once the law
/// allows no further one.
pub fn step_fee(
    step: &PlannedStep,
    ctx: &DebtorContext,
    law: &LawBook,
    due: NaiveDate,
    previous_fees: &[NaiveDate],
    on: NaiveDate,
) -> StepFee {
    let amount = resolve_fee(step, ctx, law, on);
    let StepKind::Message { tone, .. } = &step.kind else {
        return StepFee::plain(amount);
    };
    if amount.minor <= 0 {
        return StepFee::plain(amount);
    }
    match law.earliest_fee_date(ctx, law_step(*tone), due, previous_fees, on) {
        Ok(day) => StepFee {
            amount,
            not_before: Some(day),
        },
        Err(_) => StepFee::plain(Money::zero(amount.currency)),
    }
}

/// Where the law asks for a warning before collection (NO inkassoloven § 9, DK § 10), a plan
/// that hands off must send one first, giving the days the law asks, that many days before the
/// hand-off (banking days count as calendar days: never fewer), unless the policy says the
/// agency sends it.
fn warning_before_handoff(
    plan: &Plan,
    ctx: &DebtorContext,
    law: &LawBook,
    on: NaiveDate,
    terms: &HandoffTerms,
) -> Option<String> {
    let handoff_at = plan.steps.iter().position(|s| s.kind == StepKind::Handoff)?;
    if terms.agency_sends_warning.contains(&ctx.jurisdiction) {
        return None;
    }
    let (days, rule) = law.min_days_to_pay(ctx, FeeStep::CollectionWarning, on)?;
    let handoff_day = plan.steps[handoff_at].offset_banking_days;
    let warned = plan.steps[..handoff_at].iter().any(|s| {
        matches!(
            s.kind,
            StepKind::Message {
                tone: Tone::CollectionWarning,
                ..
            }
        ) && s.days_to_pay.unwrap_or(0) >= days
            && i64::from(handoff_day) - i64::from(s.offset_banking_days) >= i64::from(days)
    });
    (!warned).then(|| {
        format!(
            "{}: a hand-off in {j} needs the warning before collection first: a collection_warning step \
             giving at least {days} days to pay, at least {days} days before the hand-off; or, where the \
             agency sends it as its first step, [handoff] agency_sends_warning = [\"{j}\"]",
            rule.citation,
            j = ctx.jurisdiction
        )
    })
}

/// The law's objections to a plan for one kind of debtor, as "citation: words" lines.
/// Banking-day offsets are read as calendar days: N banking days always span at least N
/// calendar days, so a plan lawful at the shortest spacing is lawful in every week.
fn law_violations(plan: &Plan, ctx: &DebtorContext, law: &LawBook, on: NaiveDate) -> Vec<String> {
    let mut out = Vec::new();
    let steps: Vec<PlannedFeeStep> = plan
        .steps
        .iter()
        .filter_map(|s| match &s.kind {
            StepKind::Message { tone, .. } => {
                if s.fee == FeeSpec::StatutoryMaximum && law.max_fee(ctx, law_step(*tone), on).is_none() {
                    out.push(format!(
                        "step '{}' asks for the statutory maximum fee, but {} law sets none for a {}",
                        s.name,
                        ctx.jurisdiction,
                        law_step(*tone).label()
                    ));
                }
                Some(PlannedFeeStep {
                    name: s.name.clone(),
                    days_after_due: s.offset_banking_days,
                    step: law_step(*tone),
                    fee: resolve_fee(s, ctx, law, on),
                    days_to_pay: s.days_to_pay,
                })
            }
            StepKind::Handoff => None,
        })
        .collect();
    out.extend(law.check_plan(ctx, on, &steps).into_iter().map(|v| v.to_string()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn law() -> LawBook {
        LawBook::builtin().expect("built-in law")
    }

    fn today() -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 11, 22).unwrap()
    }

    fn facts(j: Jurisdiction, kind: DebtorKind) -> DebtorFacts {
        DebtorFacts {
            jurisdiction: j,
            kind,
            late_last_12m: 0,
            propensity: None,
            amount: Money::new(50_000, j.home_currency()),
            fee_agreed: false,
        }
    }

    const POLICY: &str = r#"
version = "acme-2026-11"
tenant = "acme-energy"
send_time = "10:00"

[handoff]
agency_sends_warning = ["DK", "NO"]

[[segment]]
name = "danish-repeat"
when = { jurisdiction = ["DK"], late_last_12m_min = 1 }
plan = "firm-dk"

[[segment]]
name = "everyone"
plan = "gentle"

[plan.gentle]
step = [
  { name = "nudge", offset_banking_days = 0, channels = ["email"], tone = "nudge" },
  { name = "reminder-1", offset_banking_days = 10, channels = ["email", "sms"], tone = "reminder", days_to_pay = 14 },
  { name = "handoff", offset_banking_days = 25, handoff = true },
]

[plan.firm-dk]
step = [
  { name = "reminder-1", offset_banking_days = 3, channels = ["sms", "email"], tone = "reminder", fee = "statutory_maximum", days_to_pay = 10 },
  { name = "reminder-2", offset_banking_days = 13, channels = ["email"], tone = "reminder", fee = { amount_minor = 10000, currency = "DKK" }, days_to_pay = 10 },
  { name = "warning", offset_banking_days = 23, channels = ["email"], tone = "collection_warning", days_to_pay = 10 },
  { name = "handoff", offset_banking_days = 35, handoff = true },
]

[plan.sms-first]
step = [
  { name = "nudge", offset_banking_days = 0, channels = ["sms"], tone = "nudge" },
  { name = "handoff", offset_banking_days = 25, handoff = true },
]

[[experiment]]
name = "sms-first"
segments = ["everyone"]
start = "2026-01-01"
end = "2026-12-31"
variant = [
  { name = "control", weight = 45 },
  { name = "sms", weight = 45, plan = "sms-first" },
  { name = "holdout", weight = 10, holdout = true },
]
"#;

    #[test]
    fn a_hand_off_in_norway_or_denmark_needs_the_warning_first_or_the_agency_to_send_it() {
        let plan = |warning: &str| {
            format!(
                r#"
version = "w"
[[segment]]
name = "all"
plan = "p"
[plan.p]
step = [
  {{ name = "nudge", offset_banking_days = 0, channels = ["email"], tone = "nudge" }},
  {warning}
  {{ name = "handoff", offset_banking_days = 30, handoff = true }},
]
"#
            )
        };
        // No warning at all: refused for Denmark and Norway, with the rule and the way out.
        let refused = load(&plan(""), &law(), today()).unwrap_err().to_string();
        for (j, citation) in [("DK", "inkassoloven § 10"), ("NO", "inkassoloven § 9")] {
            assert!(
                refused.contains(&format!(
                    "{citation}: a hand-off in {j} needs the warning before collection first"
                )) && refused.contains(&format!("agency_sends_warning = [\"{j}\"]")),
                "{refused}"
            );
        }
        assert!(
            !refused.contains("hand-off in SE") && !refused.contains("hand-off in FI"),
            "{refused}"
        );
        // The agency sends it: lawful.
        let text = format!("{}\n[handoff]\nagency_sends_warning = [\"DK\", \"NO\"]\n", plan(""));
        let p = load(&text, &law(), today()).expect("the agency warns");
        assert_eq!(p.handoff.agency_sends_warning, vec![Jurisdiction::DK, Jurisdiction::NO]);
        // A warning with 14 days, 20 banking days before the hand-off: lawful in both.
        let warned = r#"{ name = "varsel", offset_banking_days = 10, channels = ["email"], tone = "collection_warning", days_to_pay = 14 },"#;
        load(&plan(warned), &law(), today()).expect("warned in time");
        // Too close to the hand-off for Norway's 14 days (fine for Denmark's 10).
        let late = r#"{ name = "varsel", offset_banking_days = 18, channels = ["email"], tone = "collection_warning", days_to_pay = 14 },"#;
        let refused = load(&plan(late), &law(), today()).unwrap_err().to_string();
        assert!(
            refused.contains("a hand-off in NO needs") && !refused.contains("a hand-off in DK needs"),
            "{refused}"
        );
    }

    /// A creditor collecting itself sends a payment demand: the law of each country says when,
    /// with what deadline and fee; Denmark knows none (its påkrav is the warning).
    #[test]
    fn a_payment_demand_is_checked_against_each_countrys_rules() {
        let policy = |jurisdiction: &str, steps: &str| {
            format!(
                r#"
version = "demand"
[handoff]
agency_sends_warning = ["DK", "NO"]
[[segment]]
name = "here"
when = {{ jurisdiction = ["{jurisdiction}"] }}
plan = "p"
[[segment]]
name = "rest"
plan = "p0"
[plan.p0]
step = [{{ name = "nudge", offset_banking_days = 0, channels = ["email"], tone = "nudge" }}]
[plan.p]
step = [
  {{ name = "nudge", offset_banking_days = 0, channels = ["email"], tone = "nudge" }},
  {steps}
  {{ name = "handoff", offset_banking_days = 60, handoff = true }},
]
"#
            )
        };
        let reminder = r#"{ name = "purring", offset_banking_days = 14, channels = ["email"], tone = "reminder", fee = "statutory_maximum", days_to_pay = 14 },"#;
        let demand = |day: u32, days_to_pay: u32| {
            format!(
                r#"{{ name = "demand", offset_banking_days = {day}, channels = ["email"], tone = "payment_demand", fee = "statutory_maximum", days_to_pay = {days_to_pay} }},"#
            )
        };
        // Norway: after the purring's 14-day deadline has passed, 14 days to pay, 105 NOK.
        let p = load(
            &policy("NO", &format!("{reminder}\n{}", demand(29, 14))),
            &law(),
            today(),
        )
        .expect("a lawful betalingsoppfordring");
        let step = &p.plans["p"].steps[2];
        assert_eq!(
            step.kind,
            StepKind::Message {
                tone: Tone::PaymentDemand,
                channels: vec!["email".into()]
            }
        );
        let no = DebtorContext {
            jurisdiction: Jurisdiction::NO,
            kind: DebtorKind::Consumer,
            fee_agreed_in_advance: false,
        };
        assert_eq!(
            resolve_fee(step, &no, &law(), today()),
            Money::new(10_500, Currency::NOK)
        );
        let early = load(
            &policy("NO", &format!("{reminder}\n{}", demand(28, 14))),
            &law(),
            today(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            early.contains("inkassoforskriften § 1-2 tredje ledd") && early.contains("'demand' does not come after the end of a deadline of at least 14 days given in a reminder or collection warning"),
            "{early}"
        );
        let alone = load(&policy("NO", &demand(29, 14)), &law(), today())
            .unwrap_err()
            .to_string();
        assert!(alone.contains("inkassoforskriften § 1-2 tredje ledd"), "{alone}");
        let short = load(
            &policy("NO", &format!("{reminder}\n{}", demand(29, 10))),
            &law(),
            today(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            short.contains("inkassoloven § 10") && short.contains("'demand' gives 10 days to pay"),
            "{short}"
        );
        // Sweden: the creditor's own inkassokrav, 180 SEK, a reasonable time; no reminder needed.
        let p = load(&policy("SE", &demand(10, 8)), &law(), today()).expect("a lawful inkassokrav");
        let se = DebtorContext {
            jurisdiction: Jurisdiction::SE,
            ..no
        };
        assert_eq!(
            resolve_fee(&p.plans["p"].steps[1], &se, &law(), today()),
            Money::new(18_000, Currency::SEK)
        );
        let hasty = load(&policy("SE", &demand(10, 5)), &law(), today())
            .unwrap_err()
            .to_string();
        assert!(hasty.contains("inkassolagen (1974:182) 5 §"), "{hasty}");
        // Finland: only 14 days after a reminder (10 for businesses).
        let fi_reminder = r#"{ name = "muistutus", offset_banking_days = 14, channels = ["email"], tone = "reminder", fee = "statutory_maximum", days_to_pay = 14 },"#;
        load(
            &policy("FI", &format!("{fi_reminder}\n{}", demand(28, 14))),
            &law(),
            today(),
        )
        .expect("a lawful maksuvaatimus");
        let soon = load(
            &policy("FI", &format!("{fi_reminder}\n{}", demand(27, 14))),
            &law(),
            today(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            soon.contains("laki saatavien perinnästä (513/1999) 5 § ja 10 b §") && soon.contains("FI consumer"),
            "{soon}"
        );
        assert!(
            !soon.contains("FI business"),
            "10 days are enough between businesses: {soon}"
        );
        // Denmark: no such step.
        let dk = load(&policy("DK", &demand(20, 14)), &law(), today())
            .unwrap_err()
            .to_string();
        assert!(dk.contains("DK law: 'demand' is a payment demand, which the law book does not know for DK debtors: use a collection_warning"), "{dk}");
    }

    #[test]
    fn a_lawful_policy_loads_and_chooses_by_segment() {
        let p = load(POLICY, &law(), today()).expect("lawful");
        assert_eq!(p.version, "acme-2026-11");
        let mut repeat = facts(Jurisdiction::DK, DebtorKind::Consumer);
        repeat.late_last_12m = 2;
        let c = p.choose("acme-energy", "d-1", &repeat, today());
        assert_eq!(
            (c.segment.as_str(), c.plan.name.as_str(), c.experiment),
            ("danish-repeat", "firm-dk", None)
        );
        assert_eq!(c.plan.send_time, NaiveTime::from_hms_opt(10, 0, 0).unwrap());
        let first_time = p.choose(
            "acme-energy",
            "d-1",
            &facts(Jurisdiction::DK, DebtorKind::Consumer),
            today(),
        );
        assert_eq!(first_time.segment, "everyone");
        assert!(
            first_time
                .experiment
                .as_deref()
                .is_some_and(|e| e.starts_with("sms-first/"))
        );
    }

    #[test]
    fn statutory_maximum_resolves_per_debtor() {
        let p = load(POLICY, &law(), today()).unwrap();
        let step = &p.plans["firm-dk"].steps[0];
        let ctx = DebtorContext {
            jurisdiction: Jurisdiction::DK,
            kind: DebtorKind::Consumer,
            fee_agreed_in_advance: false,
        };
        assert_eq!(
            resolve_fee(step, &ctx, &law(), today()),
            Money::new(10_000, Currency::DKK)
        );
    }

    #[test]
    fn experiment_assignment_is_stable_and_follows_the_weights() {
        let p = load(POLICY, &law(), today()).unwrap();
        let e = &p.experiments[0];
        assert_eq!(
            e.variant_for("acme-energy", "debtor-42"),
            e.variant_for("acme-energy", "debtor-42"),
            "stable"
        );
        let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
        for i in 0..20_000 {
            *counts
                .entry(e.variant_for("acme-energy", &format!("debtor-{i}")).name.as_str())
                .or_default() += 1;
        }
        // 45 / 45 / 10 % of 20 000, within 1.5 percentage points.
        assert!((8_700..=9_300).contains(&counts["control"]), "{counts:?}");
        assert!((8_700..=9_300).contains(&counts["sms"]), "{counts:?}");
        assert!((1_700..=2_300).contains(&counts["holdout"]), "{counts:?}");
        // Another tenant or experiment draws independently.
        let differs = (0..200)
            .filter(|i| bucket("acme-energy", &format!("d{i}"), "x") != bucket("other", &format!("d{i}"), "x"))
            .count();
        assert_eq!(differs, 200);
    }

    #[test]
    fn an_assignment_reads_back_as_experiment_and_variant_labels_and_names_with_a_slash_are_refused() {
        assert_eq!(experiment_labels(Some("sms-first/holdout")), ("sms-first", "holdout"));
        assert_eq!(experiment_labels(None), ("none", "none"));
        let slashed = POLICY.replacen("name = \"sms-first\"", "name = \"sms/first\"", 1);
        assert_ne!(slashed, POLICY, "the test policy names its experiment");
        let refused = load(&slashed, &law(), today()).unwrap_err().to_string();
        assert!(
            refused.contains("experiment 'sms/first'") && refused.contains("without '/'"),
            "{refused}"
        );
    }

    #[test]
    fn a_holdout_gets_no_messages_but_still_hands_off() {
        let p = load(POLICY, &law(), today()).unwrap();
        let e = &p.experiments[0];
        let holdout_debtor = (0..1000)
            .map(|i| format!("d{i}"))
            .find(|d| e.variant_for("acme-energy", d).holdout)
            .expect("some debtor is in the holdout");
        let c = p.choose(
            "acme-energy",
            &holdout_debtor,
            &facts(Jurisdiction::SE, DebtorKind::Consumer),
            today(),
        );
        assert_eq!(c.experiment.as_deref(), Some("sms-first/holdout"));
        assert_eq!(
            c.plan.steps.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["handoff"]
        );
    }

    #[test]
    fn an_unlawful_plan_is_refused_with_the_cited_rule_for_each_debtor_it_can_reach() {
        let unlawful = POLICY.replace(
            r#"{ name = "reminder-2", offset_banking_days = 13,"#,
            r#"{ name = "reminder-2", offset_banking_days = 8,"#,
        );
        let err = load(&unlawful, &law(), today()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("plan 'firm-dk' (segment 'danish-repeat') for DK consumer debtors: renteloven § 9 b stk. 2: fee-bearing reminders must be at least 10 days apart; 'reminder-2' comes 5 days after 'reminder-1'"),
            "{text}"
        );
        assert!(
            text.contains("for DK business debtors: renteloven § 9 b stk. 2"),
            "business debtors are checked too: {text}"
        );
    }

    #[test]
    fn a_fixed_danish_fee_cannot_reach_other_countries() {
        let wider = POLICY.replace(
            r#"when = { jurisdiction = ["DK"], late_last_12m_min = 1 }"#,
            r#"when = { late_last_12m_min = 1 }"#,
        );
        let text = load(&wider, &law(), today()).unwrap_err().to_string();
        assert!(
            text.contains("for NO consumer debtors: NO law: fees must be in NOK"),
            "{text}"
        );
        assert!(
            text.contains("for SE consumer debtors without an agreed fee: lag (1981:739) 2 §"),
            "{text}"
        );
        assert!(
            text.contains("for NO consumer debtors: inkassoforskriften § 1-2"),
            "{text}"
        );
    }

    #[test]
    fn structural_problems_are_all_listed() {
        let broken = r#"
version = "v"
[[segment]]
name = "a"
when = { debtor_kind = "robot" }
plan = "missing"
[plan.p]
step = [
  { name = "x", offset_banking_days = 5, channels = ["pigeon"], tone = "nudge" },
  { name = "x", offset_banking_days = 1, channels = ["email"], tone = "shout" },
]
[[experiment]]
name = "e"
segments = ["nope"]
start = "2026-02-01"
end = "2026-01-01"
variant = [{ name = "v", weight = 0, plan = "gone" }]
"#;
        let err = load(broken, &law(), today()).unwrap_err();
        let text = err.to_string();
        for expected in [
            "segment 'a': plan 'missing' is not defined",
            "segment 'a': debtor_kind 'robot': expected consumer or business",
            "segment 'a': the last segment must have no `when`",
            "plan 'p' step 'x': channel 'pigeon': expected one of email, sms, webhook",
            "plan 'p' step 'x': the name is used twice in the plan",
            "plan 'p' step 'x': comes at 1 banking days, not after 'x' at 5",
            "plan 'p' step 'x': tone Some(\"shout\")",
            "experiment 'e': ends 2026-01-01 before it starts 2026-02-01",
            "experiment 'e': segment 'nope' is not defined",
            "experiment 'e': variant 'v' has weight 0",
            "experiment 'e': variant 'v' uses plan 'gone', which is not defined",
        ] {
            assert!(text.contains(expected), "missing '{expected}' in:\n{text}");
        }
        let bad_toml = load("version = ", &law(), today()).unwrap_err().to_string();
        assert!(bad_toml.contains("policy file: "), "{bad_toml}");
        let unknown_key = load("version = \"v\"\ncolour = \"red\"\n", &law(), today())
            .unwrap_err()
            .to_string();
        assert!(unknown_key.contains("colour"), "{unknown_key}");
    }

    #[test]
    fn the_default_policy_is_lawful_everywhere() {
        let p = load(DEFAULT_POLICY, &law(), today()).expect("the built-in default policy passes its own check");
        let c = p.choose("t", "d", &facts(Jurisdiction::FI, DebtorKind::Business), today());
        assert_eq!(c.segment, "default");
    }

    #[test]
    fn a_combine_window_over_two_weeks_is_refused() {
        let text = DEFAULT_POLICY.replace("combine_within_days = 3", "combine_within_days = 30");
        assert_ne!(text, DEFAULT_POLICY);
        let e = load(&text, &law(), today()).unwrap_err();
        assert!(e.0.iter().any(|p| p.location == "combine_within_days"), "{e:?}");
        assert_eq!(load(DEFAULT_POLICY, &law(), today()).unwrap().combine_within_days, 3);
    }
}
