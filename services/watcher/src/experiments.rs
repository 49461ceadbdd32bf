//! Experiment reports read from the topics (journey events, the invoices' due dates, dispatch's
//! outcomes, the debtors' requests) and compared with [`forfall_domain::experiment`]: for
//! `forfall experiment report`, and for dashboards at `GET /v1/experiments/<name>/report`
//! (JSON) and `.../report.html` (the self-contained page), staff only (`watcher.staff_token`).
//! The same report comes from real and from simulated data, since both write the same topics.
//!
//! Reading the topics takes a while on a large tenant, so the endpoint answers from a copy at
//! most `watcher.experiment_report_max_age_secs` old, read anew in the background when it ages
//! (the stale copy meanwhile, with its age); before the first copy it asks to come back.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use forfall_domain::Jurisdiction;
use forfall_domain::experiment::{Collector, InvoiceKey, Observation, Report};
use forfall_domain::invoice;
use forfall_domain::policy::{Experiment, Policy};
use forfall_platform::config::Secret;
use forfall_platform::records::{DebtorRequest, DispatchOutcome, DispatchStatus, Invoice, JourneyEvent, Record};
use forfall_platform::service::Runtime;
use forfall_platform::topic_read;
use tracing::Instrument;

use crate::Watcher;

/// An experiment's variants and weights, in the policy's order (the first is control).
pub fn variants(e: &Experiment) -> Vec<(String, f64)> {
    e.variants
        .iter()
        .map(|v| (v.name.clone(), f64::from(v.weight)))
        .collect()
}

/// The policy's experiment `name`, or an error listing the ones it has.
pub fn named_experiment<'p>(policy: &'p Policy, name: &str) -> anyhow::Result<&'p Experiment> {
    policy.experiments.iter().find(|e| e.name == name).ok_or_else(|| {
        let known: Vec<&str> = policy.experiments.iter().map(|e| e.name.as_str()).collect();
        anyhow::anyhow!(
            "policy {} has no experiment '{name}' (it has: {})",
            policy.version,
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        )
    })
}

/// Reads the topics and reports experiment `name` with `variants` at level `alpha`;
/// `progress` hears each topic's replay progress.
pub async fn read_report(
    rt: &Runtime,
    name: &str,
    variants: &[(String, f64)],
    alpha: f64,
    mut progress: impl FnMut(String),
) -> anyhow::Result<Report> {
    let topics = &rt.config.topics;
    let mut reader = Reader {
        experiment: format!("{name}/"),
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
        let (done, undecodable) =
            topic_read::read_whole(rt, &topic, |d| reader.take(d), |p| progress(format!("{topic}: {p}"))).await?;
        reader.undecodable += undecodable;
        progress(format!("{topic}: {done}"));
    }
    reader.settle();
    if reader.undecodable > 0 {
        progress(format!(
            "{} records could not be decoded and were left out",
            reader.undecodable
        ));
    }
    Ok(reader.collector.report(name, variants, alpha)?)
}

/// Turns the topics' records into the experiment's observations.
struct Reader {
    /// `name/`: the prefix of this experiment's assignments.
    experiment: String,
    /// Event ids already taken: a redelivered record is the same event again.
    seen: HashSet<String>,
    /// Each invoice's due date (days since the epoch) and the debtor's jurisdiction.
    due: HashMap<InvoiceKey, (i32, Option<Jurisdiction>)>,
    /// When each invoice was paid in full (the `paid` event's instant).
    paid_at: HashMap<InvoiceKey, i64>,
    collector: Collector,
    undecodable: u64,
}

impl Reader {
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
                Some(j) => j.local_day(paid),
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

/// One experiment's last report and whether a newer one is being read.
#[derive(Default)]
struct Copy {
    report: Option<(Arc<Report>, Instant, chrono::DateTime<chrono::Utc>)>,
    reading: bool,
    /// Why the last reading failed, if it did (until one succeeds).
    failed: Option<String>,
}

#[derive(Clone)]
struct Reports {
    watcher: Arc<OnceLock<Watcher>>,
    token: Option<Secret>,
    max_age: Duration,
    copies: Arc<Mutex<HashMap<String, Copy>>>,
}

pub(crate) fn routes(watcher: Arc<OnceLock<Watcher>>, token: Option<Secret>, max_age: Duration) -> Router {
    Router::new()
        .route("/v1/experiments/{name}/report", axum::routing::get(json))
        .route("/v1/experiments/{name}/report.html", axum::routing::get(html))
        .with_state(Reports {
            watcher,
            token,
            max_age,
            copies: Arc::default(),
        })
}

async fn json(State(r): State<Reports>, Path(name): Path<String>, headers: HeaderMap) -> Response {
    r.answer(&name, &headers, |report| axum::Json(report).into_response())
}

async fn html(State(r): State<Reports>, Path(name): Path<String>, headers: HeaderMap) -> Response {
    r.answer(&name, &headers, |report| {
        (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            crate::experiment_page::page(report),
        )
            .into_response()
    })
}

fn try_later(why: String) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, HeaderValue::from_static("5"))],
        why,
    )
        .into_response()
}

impl Reports {
    fn copies(&self) -> std::sync::MutexGuard<'_, HashMap<String, Copy>> {
        self.copies.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn answer(&self, name: &str, headers: &HeaderMap, render: impl FnOnce(&Report) -> Response) -> Response {
        if let Some(refused) = forfall_platform::admin::staff_refusal(
            self.token.as_ref().map(Secret::expose),
            "watcher.staff_token",
            headers,
        ) {
            return refused;
        }
        let Some(watcher) = self.watcher.get() else {
            return try_later("starting\n".into());
        };
        let policy = watcher.policy();
        let variants = match named_experiment(&policy, name) {
            Ok(e) => variants(e),
            Err(e) => return (StatusCode::NOT_FOUND, format!("{e}\n")).into_response(),
        };
        let (report, failed) = {
            let mut copies = self.copies();
            let copy = copies.entry(name.to_owned()).or_default();
            let fresh = copy
                .report
                .as_ref()
                .is_some_and(|(_, read, _)| read.elapsed() < self.max_age);
            if !fresh && !copy.reading {
                copy.reading = true;
                self.read_anew(watcher.clone(), name.to_owned(), variants);
            }
            (copy.report.clone(), copy.failed.clone())
        };
        match (report, failed) {
            (Some((report, read, as_of)), _) => {
                let mut answer = render(&report);
                let h = answer.headers_mut();
                if let Ok(v) = HeaderValue::from_str(&read.elapsed().as_secs().to_string()) {
                    h.insert(header::AGE, v);
                }
                if let Ok(v) = HeaderValue::from_str(&as_of.to_rfc3339()) {
                    h.insert("x-forfall-report-as-of", v);
                }
                answer
            }
            (None, Some(why)) => try_later(format!("the report could not be read: {why}; trying again\n")),
            (None, None) => try_later("the report is being read from the topics; try again shortly\n".into()),
        }
    }

    fn read_anew(&self, watcher: Watcher, name: String, variants: Vec<(String, f64)>) {
        let copies = self.copies.clone();
        let span = tracing::info_span!("experiment_report", experiment = %name);
        tokio::spawn(
            async move {
                let started = Instant::now();
                let rt = &watcher.0.rt;
                let as_of = rt.clock.now();
                let result = read_report(rt, &name, &variants, 0.05, |p| tracing::debug!(progress = %p)).await;
                let mut copies = copies.lock().unwrap_or_else(|p| p.into_inner());
                let copy = copies.entry(name).or_default();
                copy.reading = false;
                match result {
                    Ok(report) => {
                        tracing::info!(seconds = started.elapsed().as_secs_f64(), "experiment report read");
                        copy.report = Some((Arc::new(report), Instant::now(), as_of));
                        copy.failed = None;
                    }
                    Err(e) => {
                        tracing::warn!(error = format!("{e:#}"), "cannot read the experiment report now");
                        copy.failed = Some(format!("{e:#}"));
                    }
                }
            }
            .instrument(span),
        );
    }
}
