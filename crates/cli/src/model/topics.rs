//! The propensity model's training set read from the topics: each invoice's inputs as its
//! `plan_chosen` event recorded them when the plan was chosen (so the fit sees what was known
//! then, not what became known later), labelled by how its journey ended: `paid` in full
//! (true) or `handed_over` to an agency (false), whichever came first. Journeys still open, or
//! closed by a credit note or a cancellation, say nothing of the debtor and are left out; so are
//! plans chosen before the inputs were recorded.

use std::collections::{HashMap, HashSet};

use forfall_domain::propensity::{self, FEATURE_NAMES};
use forfall_platform::avro::Decoded;
use forfall_platform::records::{JourneyEvent, Record};
use forfall_platform::service::Runtime;
use forfall_platform::topic_read;

/// One invoice's inputs and whether it was paid without collection.
pub type Sample = ([f64; FEATURE_NAMES.len()], bool);

/// What the topics held, and what of it could not be used.
#[derive(Debug, Default)]
pub struct TrainingSet {
    /// In the order the plans were chosen (per partition), so that a held-out share is spread.
    pub samples: Vec<Sample>,
    /// Plans chosen without the inputs this version computes (older events, other features).
    pub without_inputs: u64,
    /// Journeys that had not ended paid or handed over when the topic was read.
    pub unresolved: u64,
    pub undecodable: u64,
}

type InvoiceKey = (String, String);

struct Reader<'a> {
    tenant: Option<&'a str>,
    seen: HashSet<String>,
    /// Invoices in the order their plans were chosen, with their inputs.
    chosen: Vec<(InvoiceKey, Option<[f64; FEATURE_NAMES.len()]>)>,
    ended: HashMap<InvoiceKey, bool>,
}

impl Reader<'_> {
    fn take(&mut self, decoded: &Decoded) -> anyhow::Result<()> {
        if decoded.name != JourneyEvent::FULL_NAME {
            return Ok(());
        }
        let e: JourneyEvent = decoded.to()?;
        if self.tenant.is_some_and(|t| t != e.tenant) || !self.seen.insert(e.event_id.clone()) {
            return Ok(());
        }
        let key = (e.tenant, e.invoice_id);
        match e.kind.as_str() {
            "plan_chosen" => {
                let inputs =
                    propensity::vector_from_named(e.propensity_features.iter().map(|f| (f.name.as_str(), f.value)));
                self.chosen.push((key, inputs));
            }
            "paid" => {
                self.ended.entry(key).or_insert(true);
            }
            "handed_over" => {
                self.ended.entry(key).or_insert(false);
            }
            _ => {}
        }
        Ok(())
    }
}

/// Reads the journey events (of `tenant`, or all) up to their end as the read starts.
pub async fn read(rt: &Runtime, tenant: Option<&str>, mut progress: impl FnMut(String)) -> anyhow::Result<TrainingSet> {
    let mut reader = Reader {
        tenant,
        seen: HashSet::new(),
        chosen: Vec::new(),
        ended: HashMap::new(),
    };
    let topic = rt.topic(&rt.config.topics.journey_events);
    let (done, undecodable) =
        topic_read::read_whole(rt, &topic, |d| reader.take(d), |p| progress(format!("{topic}: {p}"))).await?;
    progress(format!("{topic}: {done}"));
    let mut set = TrainingSet {
        undecodable,
        ..TrainingSet::default()
    };
    for (key, inputs) in reader.chosen {
        match (inputs, reader.ended.get(&key)) {
            (None, _) => set.without_inputs += 1,
            (Some(_), None) => set.unresolved += 1,
            (Some(x), Some(paid)) => set.samples.push((x, *paid)),
        }
    }
    Ok(set)
}
