//! `forfall experiment report NAME`: what an experiment of the policy did, per variant, read
//! from the topics (journey events, the invoices' due dates, dispatch's outcomes, the debtors'
//! requests) and compared with [`forfall_domain::experiment`]; written as a JSON file and a
//! self-contained HTML page with inline SVG plots. The same report comes from real and from
//! simulated data, since both write the same topics.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use forfall_domain::Jurisdiction;
use forfall_domain::experiment::{Collector, InvoiceKey, Observation, Report};
use forfall_domain::invoice;
use forfall_platform::changelog::{self, Change, Restore};
use forfall_platform::kafka::Failure;
use forfall_platform::records::{DebtorRequest, DispatchOutcome, DispatchStatus, Invoice, JourneyEvent, Record};
use forfall_platform::service::Runtime;

#[derive(Debug, Subcommand)]
pub enum ExperimentCommand {
    /// Per variant: invoices and debtors assigned, settled before any fee, before the hand-off,
    /// handed over, fees, messages by channel, disputes, days to payment; each variant against
    /// control with fixed and always-valid intervals, and the sample ratio checked.
    Report(ReportArgs),
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The experiment's name in the policy.
    pub name: String,
    /// The policy file that defines it (default: the watcher's `watcher.policy_file`).
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Where the report goes: `<out>/<name>.json` and `<out>/<name>.html`.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    /// The level of the intervals (0.05: 95 %).
    #[arg(long, default_value_t = 0.05)]
    pub alpha: f64,
}

/// The files a report was written to.
#[derive(Debug)]
pub struct Written {
    pub json: PathBuf,
    pub html: PathBuf,
    pub report: Report,
}

pub async fn run(rt: &Runtime, cmd: ExperimentCommand) -> anyhow::Result<()> {
    let ExperimentCommand::Report(args) = cmd;
    let written = report(rt, &args).await?;
    print!("{}", crate::experiment_html::summary(&written.report));
    println!("report: {}\n        {}", written.html.display(), written.json.display());
    Ok(())
}

/// The experiment's variants and weights, in the policy's order (the first is control).
fn variants(rt: &Runtime, args: &ReportArgs) -> anyhow::Result<Vec<(String, f64)>> {
    let (policy, _) =
        crate::simulate::policy_and_law(&rt.figment, args.policy.as_deref(), rt.clock.now().date_naive())?;
    Ok(crate::simulate::variants(crate::simulate::named_experiment(
        &policy, &args.name,
    )?))
}

/// Reads the topics, writes the report's files, and returns them.
pub async fn report(rt: &Runtime, args: &ReportArgs) -> anyhow::Result<Written> {
    let variants = variants(rt, args)?;
    let topics = &rt.config.topics;
    let mut reader = Reader {
        rt,
        experiment: format!("{}/", args.name),
        seen: HashSet::new(),
        due: HashMap::new(),
        paid_at: HashMap::new(),
        collector: Collector::default(),
        undecodable: 0,
    };
    for topic in [
        &topics.invoices,
        &topics.journey_events,
        &topics.dispatch_outcomes,
        &topics.debtor_requests,
    ] {
        let topic = rt.topic(topic);
        let progress = changelog::replay_whole(&rt.config.kafka, &topic, 2_000, &mut reader, |p| {
            eprintln!("{topic}: {p}");
        })
        .await?;
        eprintln!("{topic}: {progress}");
    }
    reader.settle();
    if reader.undecodable > 0 {
        eprintln!("{} records could not be decoded and were left out", reader.undecodable);
    }
    let report = reader.collector.report(&args.name, &variants, args.alpha)?;
    std::fs::create_dir_all(&args.out)?;
    let json = args.out.join(format!("{}.json", args.name));
    let html = args.out.join(format!("{}.html", args.name));
    write(&json, &serde_json::to_vec_pretty(&report)?)?;
    write(&html, crate::experiment_html::page(&report).as_bytes())?;
    Ok(Written { json, html, report })
}

fn write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
}

/// Turns the topics' records into the experiment's observations.
struct Reader<'a> {
    rt: &'a Runtime,
    /// `name/`: the prefix of this experiment's assignments.
    experiment: String,
    /// Event ids already taken: a redelivered record is the same event again.
    seen: HashSet<String>,
    /// Each invoice's due date (days since the epoch) and the debtor's jurisdiction.
    due: HashMap<InvoiceKey, (i32, Option<Jurisdiction>)>,
    /// When each invoice was paid in full (ms), until the due dates are all read.
    paid_at: HashMap<InvoiceKey, i64>,
    collector: Collector,
    undecodable: u64,
}

impl Reader<'_> {
    fn take(&mut self, decoded: &forfall_platform::avro::Decoded) -> anyhow::Result<()> {
        match decoded.name.as_str() {
            Invoice::FULL_NAME => {
                let i: Invoice = decoded.to()?;
                let jurisdiction = i.jurisdiction.parse::<Jurisdiction>().ok();
                self.due.insert((i.tenant, i.invoice_id), (i.due_date, jurisdiction));
            }
            JourneyEvent::FULL_NAME => {
                let e: JourneyEvent = decoded.to()?;
                if !self.seen.insert(e.event_id.clone()) {
                    return Ok(());
                }
                let invoice = (e.tenant.clone(), e.invoice_id.clone());
                match e.kind.as_str() {
                    "plan_chosen" => {
                        if let Some(variant) = e.experiment.as_deref().and_then(|x| x.strip_prefix(&self.experiment)) {
                            self.collector.observe(Observation::Assigned {
                                invoice,
                                debtor_id: e.debtor_id,
                                variant: variant.to_owned(),
                            });
                        }
                    }
                    "paid" => {
                        self.paid_at.insert(invoice, e.occurred_at);
                    }
                    "handed_over" => self.collector.observe(Observation::HandedOver { invoice }),
                    _ => {}
                }
                if e.fee_minor > 0 {
                    self.collector.observe(Observation::FeeCharged {
                        invoice: (e.tenant, e.invoice_id),
                        fee_minor: e.fee_minor,
                        currency: e.currency,
                    });
                }
            }
            DispatchOutcome::FULL_NAME => {
                let o: DispatchOutcome = decoded.to()?;
                // One message per action and channel, whatever became of it later (delivered).
                let sent = matches!(o.status, DispatchStatus::Sent | DispatchStatus::Delivered);
                if sent && self.seen.insert(format!("sent:{}:{}", o.action_id, o.channel)) {
                    self.collector.observe(Observation::MessageSent {
                        invoice: (o.tenant, o.invoice_id),
                        channel: o.channel,
                    });
                }
            }
            DebtorRequest::FULL_NAME => {
                let r: DebtorRequest = decoded.to()?;
                if r.kind == "dispute" && self.seen.insert(r.event_id.clone()) {
                    self.collector.observe(Observation::Disputed {
                        invoice: (r.tenant, r.invoice_id),
                    });
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The payments, now that every due date is known: days from due date to payment in the
    /// debtor's own calendar.
    fn settle(&mut self) {
        for (invoice, paid_ms) in std::mem::take(&mut self.paid_at) {
            let Some((due, jurisdiction)) = self.due.get(&invoice).copied() else {
                continue;
            };
            let Some(paid) = chrono::DateTime::from_timestamp_millis(paid_ms) else {
                continue;
            };
            let local = match jurisdiction {
                Some(j) => paid.with_timezone(&j.time_zone()).date_naive(),
                None => paid.date_naive(),
            };
            let paid_day = invoice::epoch_days(local);
            self.collector.observe(Observation::Settled {
                invoice,
                days_after_due: i64::from(paid_day) - i64::from(due),
            });
        }
    }
}

impl Restore for Reader<'_> {
    async fn apply(&mut self, _partition: i32, changes: Vec<Change>) -> Result<(), Failure> {
        for change in changes {
            let decoded = match self.rt.codec.decode(change.value.as_deref()).await {
                Ok(d) => d,
                // The registry away is waited out (the replay retries the batch), not counted.
                Err(e) if e.is_transient() => return Err(Failure::Transient(e.into())),
                Err(_) => {
                    self.undecodable += 1;
                    continue;
                }
            };
            if self.take(&decoded).is_err() {
                self.undecodable += 1;
            }
        }
        Ok(())
    }

    async fn finish(&mut self, _partition: i32, _end: i64) -> Result<(), Failure> {
        Ok(())
    }
}
