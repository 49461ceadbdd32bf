//! Hand-off: delivers each `HandoffCase` to the collection agency, once, through its adapter
//! (its HTTP API, or daily files: [`file_export`]), and records the answer as a
//! `HandoffOutcome`.
//!
//! Once: a case already accepted (remembered in Redis) is not posted again, and every POST
//! carries the case id as `Idempotency-Key`, so an agency that honours it also absorbs the
//! one remaining window (a crash after the agency accepted, before we recorded it).
//!
//! The accepted and recalled marks in Redis are a cache of what the agency already has: they
//! expire after `handoff.remember_days`, and a mark lost with Redis costs one POST that the
//! agency answers from its idempotency record (a 409 counts as accepted). They are not rebuilt.

mod agency_events;
pub mod debitura;
pub mod file_export;

use std::time::Duration;

use forfall_platform::config;
use forfall_platform::kafka::{Failure, Handler, Inbound, Outbound, run_consumer};
use forfall_platform::records::{
    HandoffCase, HandoffOutcome, HandoffRecall, HandoffStatus, Record, Regarding, derived_id,
};
use forfall_platform::redis_store::{self, Keys};
use forfall_platform::service::{Runtime, ServiceShell};
use forfall_platform::signing;
use forfall_platform::telemetry::TRACEPARENT;
use prometheus::{IntCounterVec, Opts};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

pub const SERVICE: &str = "handoff";
pub const PORT_OFFSET: u16 = 5;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct HandoffSettings {
    /// The agency's case intake endpoint.
    pub agency_url: String,
    /// Where the agency is told that a claim it holds was paid in full to the creditor, and is
    /// to be recalled.
    pub agency_recall_url: String,
    /// Where the agency is told of a part payment the creditor received on a claim it holds, to
    /// book on the case.
    pub agency_payments_url: String,
    /// Bearer token for the agency API (never logged).
    pub agency_token: Option<config::Secret>,
    /// The secret the agency and Forfall sign request bodies with (see
    /// [`forfall_platform::signing`]); unsigned requests when unset.
    pub agency_signing_secret: Option<config::Secret>,
    pub timeout_ms: u64,
    /// Days a case's or recall's acceptance is remembered: longer than a case is redelivered
    /// or recalled (a claim with an agency rarely outlives a year).
    pub remember_days: u64,
    /// How the agency takes cases: `http` (its API at `agency_url`) or `file` (daily files in
    /// `export_dir`).
    pub adapter: Adapter,
    /// Where the file adapter writes (the agency collects from here).
    pub export_dir: Option<String>,
    /// The agency's name in the files' names.
    pub agency_name: String,
    /// The Debitura adapter's settings (`adapter = "debitura"`).
    pub debitura: debitura::DebituraSettings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Adapter {
    Http,
    File,
    /// Debitura's Customer API (see [`debitura`]).
    Debitura,
}

impl Default for HandoffSettings {
    fn default() -> Self {
        Self {
            agency_url: "http://127.0.0.1:8089/cases".into(),
            agency_recall_url: "http://127.0.0.1:8089/recalls".into(),
            agency_payments_url: "http://127.0.0.1:8089/payments".into(),
            agency_token: None,
            agency_signing_secret: None,
            timeout_ms: 10_000,
            remember_days: 400,
            adapter: Adapter::Http,
            export_dir: None,
            agency_name: "agency".into(),
            debitura: debitura::DebituraSettings::default(),
        }
    }
}

pub struct Handoff {
    rt: Runtime,
    redis: ConnectionManager,
    keys: Keys,
    http: reqwest::Client,
    settings: HandoffSettings,
    /// Set when the agency takes files.
    export: Option<file_export::FileExport>,
    outcomes_topic: String,
    results: IntCounterVec,
}

/// Which case an outcome is about.
#[derive(Clone, Copy)]
struct CaseOf<'a> {
    case_id: &'a str,
    invoice_id: &'a str,
    tenant: &'a str,
    debtor_id: &'a str,
    /// Every invoice of a merged case; empty for one claim.
    invoice_ids: &'a [String],
}

/// What the agency answered, reduced to what we record.
struct AgencyAnswer {
    status: HandoffStatus,
    http_status: Option<i32>,
    agency_reference: Option<String>,
    detail: Option<String>,
}

/// The agency's reason in a JSON refusal: the generic API's `error` (or `reason`, `message`,
/// `detail`), Debitura's `businessErrors` (`type: message`), or a validation map of field to
/// messages.
fn agency_reason(v: &serde_json::Value) -> Option<String> {
    if let Some(errors) = v["businessErrors"].as_array() {
        let said: Vec<String> = errors
            .iter()
            .map(|e| {
                format!(
                    "{}: {}",
                    e["type"].as_str().unwrap_or("?"),
                    e["message"].as_str().unwrap_or("")
                )
            })
            .collect();
        return Some(said.join("; "));
    }
    if let Some(text) = ["error", "reason", "message", "detail"]
        .iter()
        .find_map(|k| v.get(*k).and_then(|r| r.as_str()))
    {
        return Some(text.to_owned());
    }
    let fields: Vec<String> = v
        .as_object()?
        .iter()
        .filter_map(|(field, messages)| {
            let m: Vec<&str> = messages.as_array()?.iter().filter_map(|m| m.as_str()).collect();
            (!m.is_empty()).then(|| format!("{field}: {}", m.join(", ")))
        })
        .collect();
    (!fields.is_empty()).then(|| fields.join("; "))
}

impl Handoff {
    fn accepted_key(&self, case_id: &str) -> String {
        self.keys.key(&["handoff", "accepted", case_id])
    }

    /// A POST of `body` as JSON, authenticated as the adapter's agency asks: Debitura's
    /// `XApiKey`; otherwise the bearer token and, with a signing secret, the signature.
    fn agency_request<T: Serialize>(
        &self,
        url: &str,
        body: &T,
        traceparent: &str,
    ) -> Result<reqwest::RequestBuilder, Failure> {
        // The bytes signed are the bytes sent.
        let body = serde_json::to_vec(body).map_err(|e| Failure::Fatal(anyhow::anyhow!(e)))?;
        let mut request = self
            .http
            .post(url)
            .header(TRACEPARENT, traceparent)
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        if self.settings.adapter == Adapter::Debitura {
            if let Some(key) = &self.settings.debitura.api_key {
                request = request.header("XApiKey", key.expose());
            }
            return Ok(request.body(body));
        }
        if let Some(token) = &self.settings.agency_token {
            request = request.bearer_auth(token.expose());
        }
        if let Some(secret) = &self.settings.agency_signing_secret {
            // Real time, whatever clock the journeys run on: the agency checks it against its own.
            let now = chrono::Utc::now().timestamp();
            request = request
                .header(signing::TIMESTAMP_HEADER, now.to_string())
                .header(signing::SIGNATURE_HEADER, signing::sign(secret.expose(), now, &body));
        }
        Ok(request.body(body))
    }

    /// POSTs `body` to the agency with an idempotency key; what the agency answered, or a
    /// transient failure to retry (unreachable, 5xx, 408, 429).
    async fn post<T: Serialize>(
        &self,
        url: &str,
        idempotency_key: Option<&str>,
        body: &T,
        traceparent: &str,
    ) -> Result<AgencyAnswer, Failure> {
        let mut request = self.agency_request(url, body, traceparent)?;
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        let debitura = self.settings.adapter == Adapter::Debitura;
        let response = request
            .send()
            .await
            .map_err(|e| Failure::Transient(anyhow::anyhow!("agency unreachable: {e}")))?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        let code = Some(i32::from(status.as_u16()));
        let json = serde_json::from_str::<serde_json::Value>(&body).ok();
        if status.is_success() || status == reqwest::StatusCode::CONFLICT {
            // 409: the agency already has this case (our earlier attempt); that is success.
            // Debitura's webhooks name its case by `id`, so that is the reference kept.
            let keys: &[&str] = if debitura {
                &["id"]
            } else {
                &["reference", "case_reference", "id"]
            };
            let reference = json.as_ref().and_then(|v| {
                keys.iter()
                    .find_map(|k| v.get(*k).and_then(|r| r.as_str()).map(str::to_owned))
            });
            return Ok(AgencyAnswer {
                status: HandoffStatus::Accepted,
                http_status: code,
                agency_reference: reference,
                detail: None,
            });
        }
        if status.is_server_error()
            || status == reqwest::StatusCode::TOO_MANY_REQUESTS
            || status == reqwest::StatusCode::REQUEST_TIMEOUT
        {
            return Err(Failure::Transient(anyhow::anyhow!("agency answered {status}")));
        }
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            // Our credentials, not the debtor's case: waited out (and alerted on), never a rejection.
            tracing::error!(%status, "the agency refuses our credentials; check handoff's key or token");
            return Err(Failure::Transient(anyhow::anyhow!("agency answered {status}")));
        }
        let detail: String = json
            .as_ref()
            .and_then(agency_reason)
            .unwrap_or(body)
            .chars()
            .take(500)
            .collect();
        Ok(AgencyAnswer {
            status: HandoffStatus::Rejected,
            http_status: code,
            agency_reference: None,
            detail: Some(detail),
        })
    }
}

impl Handoff {
    /// What writing to the agency's files came to: accepted (the file named as the reference),
    /// or a fault to wait out; a case is never dropped for a full disk or a broken file.
    fn exported(
        &self,
        written: Result<Result<(String, file_export::Exported), file_export::ExportError>, tokio::task::JoinError>,
    ) -> Result<AgencyAnswer, Failure> {
        match written {
            Ok(Ok((file, how))) => Ok(AgencyAnswer {
                status: HandoffStatus::Accepted,
                http_status: None,
                agency_reference: Some(file),
                detail: Some(match how {
                    file_export::Exported::Added => "written to the agency's file".into(),
                    file_export::Exported::AlreadyThere => "in the agency's file already".into(),
                }),
            }),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot write the agency's file; waiting it out");
                Err(Failure::Transient(anyhow::anyhow!(e)))
            }
            Err(e) => Err(Failure::Transient(anyhow::anyhow!("the file writer stopped: {e}"))),
        }
    }
}

impl Handler for Handoff {
    async fn handle(&self, record: &Inbound) -> Result<Vec<Outbound>, Failure> {
        let decoded = self.rt.codec.decode(record.payload.as_deref()).await?;
        match decoded.name.as_str() {
            HandoffCase::FULL_NAME => self.case(decoded.to()?, record).await,
            HandoffRecall::FULL_NAME => self.recall(decoded.to()?, record).await,
            other => Err(Failure::reject(
                "unexpected_record_type",
                format!("hand-off does not handle '{other}'"),
            )),
        }
    }
}

impl Handoff {
    async fn outcome(
        &self,
        of: CaseOf<'_>,
        answer: AgencyAnswer,
        regarding: Regarding,
        subject_id: &str,
        record: &Inbound,
    ) -> Result<Vec<Outbound>, Failure> {
        let CaseOf {
            case_id,
            invoice_id,
            tenant,
            debtor_id,
            invoice_ids,
        } = of;
        let outcome = HandoffOutcome {
            // A case has one delivery; a payment report is one per payment.
            event_id: derived_id(
                "handoff-outcome",
                &[subject_id, regarding.code(), &format!("{:?}", answer.status)],
            ),
            tenant: tenant.to_owned(),
            debtor_id: debtor_id.to_owned(),
            occurred_at: self.rt.clock.now().timestamp_millis(),
            case_id: case_id.to_owned(),
            invoice_id: invoice_id.to_owned(),
            status: answer.status,
            agency_reference: answer.agency_reference,
            http_status: answer.http_status,
            detail: answer.detail,
            collected_minor: None,
            currency: None,
            regarding: Some(regarding.code().to_owned()),
            invoice_ids: invoice_ids.to_vec(),
        };
        Ok(vec![
            self.rt
                .codec
                .outbound(&self.outcomes_topic, debtor_id, &outcome, record.trace)
                .await?,
        ])
    }

    /// Remembers, for as long as an acceptance, which invoices a merged case holds (so that the
    /// agency's word on it reaches each) and which case each merged claim went in (so that
    /// money for it is reported on that case).
    async fn remember_case(&self, case: &HandoffCase) -> Result<(), Failure> {
        if case.merged_claims.is_empty() {
            return Ok(());
        }
        let ttl = self.settings.remember_days * 86_400;
        let ids = serde_json::to_string(&case.invoice_ids()).map_err(|e| Failure::Fatal(e.into()))?;
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(self.keys.key(&["handoff", "claims", &case.case_id]))
            .arg(ids)
            .arg("EX")
            .arg(ttl)
            .ignore();
        for claim in &case.merged_claims {
            let own = derived_id("case", &[&case.tenant, &claim.invoice_id]);
            pipe.cmd("SET")
                .arg(self.keys.key(&["handoff", "merged-into", &own]))
                .arg(&case.case_id)
                .arg("EX")
                .arg(ttl)
                .ignore();
        }
        let _: () = pipe.query_async(&mut self.redis.clone()).await?;
        Ok(())
    }

    /// The case a claim's money is reported on: the one it was merged into, if it was.
    async fn case_of_claim(&self, own_case_id: &str) -> Result<String, Failure> {
        let merged: Option<String> = redis::cmd("GET")
            .arg(self.keys.key(&["handoff", "merged-into", own_case_id]))
            .query_async(&mut self.redis.clone())
            .await?;
        Ok(merged.unwrap_or_else(|| own_case_id.to_owned()))
    }
}

/// Every invoice of a case as remembered at its acceptance; empty for a case of one claim (or
/// one whose memory expired: the outcome then names its lead invoice only).
pub(crate) async fn case_invoices(
    redis: &mut ConnectionManager,
    keys: &Keys,
    case_id: &str,
) -> Result<Vec<String>, Failure> {
    let ids: Option<String> = redis::cmd("GET")
        .arg(keys.key(&["handoff", "claims", case_id]))
        .query_async(redis)
        .await?;
    Ok(ids.and_then(|ids| serde_json::from_str(&ids).ok()).unwrap_or_default())
}

impl Handoff {
    /// Money arrived for a claim the agency holds: tell it, once per payment, on the case the
    /// claim went in.
    async fn recall(&self, mut r: HandoffRecall, record: &Inbound) -> Result<Vec<Outbound>, Failure> {
        r.case_id = self.case_of_claim(&r.case_id).await?;
        let key = self.keys.key(&["handoff", "recalled", &r.event_id]);
        let known: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut self.redis.clone()).await?;
        let answer = if known.is_some() {
            self.results.with_label_values(&["recall_duplicate"]).inc();
            AgencyAnswer {
                status: HandoffStatus::Accepted,
                http_status: None,
                agency_reference: None,
                detail: Some("recall already delivered".into()),
            }
        } else {
            let mut answer = match &self.export {
                Some(export) => {
                    let (export, written) = (export.clone(), r.clone());
                    let day = chrono::DateTime::from_timestamp_millis(r.occurred_at)
                        .unwrap_or_else(|| self.rt.clock.now())
                        .date_naive();
                    self.exported(tokio::task::spawn_blocking(move || export.recall(&written, day)).await)?
                }
                None if self.settings.adapter == Adapter::Debitura => {
                    self.debitura_chat(&r, &record.trace.child().header()).await?
                }
                None => {
                    let url = if r.recalls_case() {
                        &self.settings.agency_recall_url
                    } else {
                        &self.settings.agency_payments_url
                    };
                    self.post(url, Some(&r.event_id), &r, &record.trace.child().header())
                        .await?
                }
            };
            if answer.status == HandoffStatus::Accepted {
                let _: () = redis::cmd("SET")
                    .arg(&key)
                    .arg("1")
                    .arg("EX")
                    .arg(self.settings.remember_days * 86_400)
                    .query_async(&mut self.redis.clone())
                    .await?;
            }
            let what = if r.recalls_case() { "recall" } else { "payment_on_case" };
            self.results.with_label_values(&[what]).inc();
            answer.detail.get_or_insert_with(|| {
                format!(
                    "{}: {} paid {} minor units",
                    what.replace('_', " "),
                    r.payment_id,
                    r.amount_minor
                )
            });
            answer
        };
        self.outcome(
            CaseOf {
                case_id: &r.case_id,
                invoice_id: &r.invoice_id,
                tenant: &r.tenant,
                debtor_id: &r.debtor_id,
                invoice_ids: &[],
            },
            answer,
            if r.recalls_case() {
                Regarding::Recall
            } else {
                Regarding::PaymentOnCase
            },
            &r.event_id,
            record,
        )
        .await
    }

    async fn case(&self, case: HandoffCase, record: &Inbound) -> Result<Vec<Outbound>, Failure> {
        let key = self.accepted_key(&case.case_id);
        let known: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut self.redis.clone()).await?;
        let answer = match known {
            Some(reference) => {
                self.results.with_label_values(&["duplicate"]).inc();
                AgencyAnswer {
                    status: HandoffStatus::Accepted,
                    http_status: None,
                    agency_reference: Some(reference).filter(|r| !r.is_empty()),
                    detail: Some("already accepted; not posted again".into()),
                }
            }
            None => {
                let answer = match &self.export {
                    Some(export) => {
                        let (export, written) = (export.clone(), case.clone());
                        self.exported(tokio::task::spawn_blocking(move || export.case(&written)).await)?
                    }
                    None if self.settings.adapter == Adapter::Debitura => {
                        self.debitura_case(&case, &record.trace.child().header()).await?
                    }
                    None => {
                        self.post(
                            &self.settings.agency_url,
                            Some(&case.case_id),
                            &case,
                            &record.trace.child().header(),
                        )
                        .await?
                    }
                };
                if answer.status == HandoffStatus::Accepted {
                    // Before the acceptance mark: a stop in between posts again and remembers again.
                    self.remember_case(&case).await?;
                    let reference = answer.agency_reference.clone().unwrap_or_default();
                    let _: () = redis::cmd("SET")
                        .arg(&key)
                        .arg(reference)
                        .arg("EX")
                        .arg(self.settings.remember_days * 86_400)
                        .query_async(&mut self.redis.clone())
                        .await?;
                }
                self.results
                    .with_label_values(&[if answer.status == HandoffStatus::Accepted {
                        "accepted"
                    } else {
                        "rejected"
                    }])
                    .inc();
                answer
            }
        };
        let merged = if case.merged_claims.is_empty() {
            Vec::new()
        } else {
            case.invoice_ids()
        };
        self.outcome(
            CaseOf {
                case_id: &case.case_id,
                invoice_id: &case.invoice_id,
                tenant: &case.tenant,
                debtor_id: &case.debtor_id,
                invoice_ids: &merged,
            },
            answer,
            Regarding::Case,
            &case.case_id,
            record,
        )
        .await
    }
}

impl Handoff {
    fn debitura_url(&self, path: &str) -> String {
        format!("{}{path}", self.settings.debitura.base_url.trim_end_matches('/'))
    }

    /// A case to Debitura: a dry run first (a case it would not take is refused with its
    /// reason, and nothing is created), then the case, its id remembered so that Debitura's
    /// webhooks reach the claim.
    async fn debitura_case(&self, case: &HandoffCase, traceparent: &str) -> Result<AgencyAnswer, Failure> {
        let preview = self
            .agency_request(
                &self.debitura_url("/cases/preview"),
                &debitura::preview_body(case),
                traceparent,
            )?
            .send()
            .await
            .map_err(|e| Failure::Transient(anyhow::anyhow!("Debitura unreachable: {e}")))?;
        let status = preview.status();
        if status.is_success() {
            let said: serde_json::Value = preview.json().await.unwrap_or_default();
            if let Some(reason) = debitura::ineligible(&said) {
                return Ok(AgencyAnswer {
                    status: HandoffStatus::Rejected,
                    http_status: Some(i32::from(status.as_u16())),
                    agency_reference: None,
                    detail: Some(reason),
                });
            }
        } else if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 401 {
            return Err(Failure::Transient(anyhow::anyhow!(
                "Debitura's preview answered {status}"
            )));
        }
        let body = debitura::case_body(case, self.settings.debitura.is_test);
        let answer = self
            .post(&self.debitura_url("/cases"), Some(&case.case_id), &body, traceparent)
            .await?;
        if let (HandoffStatus::Accepted, Some(id)) = (answer.status, &answer.agency_reference) {
            let known = debitura::CaseRef {
                case_id: case.case_id.clone(),
                tenant: case.tenant.clone(),
                debtor_id: case.debtor_id.clone(),
                invoice_id: case.invoice_id.clone(),
            };
            let value = serde_json::to_string(&known).map_err(|e| Failure::Fatal(e.into()))?;
            let _: () = redis::cmd("SET")
                .arg(debitura::case_key(&self.keys, id))
                .arg(value)
                .arg("EX")
                .arg(self.settings.remember_days * 86_400)
                .query_async(&mut self.redis.clone())
                .await?;
        }
        Ok(answer)
    }

    /// Money the creditor got on a claim Debitura holds, told in the case's chat (the Customer
    /// API's way for a creditor to report a direct payment).
    async fn debitura_chat(&self, r: &HandoffRecall, traceparent: &str) -> Result<AgencyAnswer, Failure> {
        let reference: Option<String> = redis::cmd("GET")
            .arg(self.accepted_key(&r.case_id))
            .query_async(&mut self.redis.clone())
            .await?;
        let Some(id) = reference.filter(|id| !id.is_empty()) else {
            return Ok(AgencyAnswer {
                status: HandoffStatus::Rejected,
                http_status: None,
                agency_reference: None,
                detail: Some(
                    "Debitura's id for this case is no longer known here: report the payment in Debitura's portal"
                        .into(),
                ),
            });
        };
        let body = debitura::chat_body(r, self.settings.debitura.user_email.as_deref());
        self.post(
            &self.debitura_url(&format!("/cases/{id}/chats")),
            None,
            &body,
            traceparent,
        )
        .await
    }
}

/// Runs hand-off until shutdown.
pub async fn run(rt: Runtime) -> anyhow::Result<()> {
    let settings: HandoffSettings = config::section(&rt.figment, SERVICE)?;
    let export = match settings.adapter {
        Adapter::Http => None,
        Adapter::Debitura => {
            anyhow::ensure!(
                settings
                    .debitura
                    .api_key
                    .as_ref()
                    .is_some_and(|k| !k.expose().is_empty()),
                "handoff.adapter is debitura, but handoff.debitura.api_key is not set"
            );
            None
        }
        Adapter::File => {
            let dir = settings
                .export_dir
                .clone()
                .filter(|d| !d.trim().is_empty())
                .ok_or_else(|| anyhow::anyhow!("handoff.adapter is file, but handoff.export_dir is not set"))?;
            anyhow::ensure!(
                !settings.agency_name.is_empty()
                    && settings
                        .agency_name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                "handoff.agency_name '{}' must be letters, digits, - or _ (it names the files)",
                settings.agency_name
            );
            std::fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("handoff.export_dir {dir}: {e}"))?;
            Some(file_export::FileExport {
                dir: dir.into(),
                agency: settings.agency_name.clone(),
            })
        }
    };
    let agency_events = IntCounterVec::new(
        Opts::new(
            "handoff_agency_events_total",
            "The agency's events on its cases, by result",
        ),
        &["result"],
    )?;
    let outcomes_topic = rt.topic(&rt.config.topics.handoff_outcomes);
    let redis = redis_store::connect(&rt.config.redis).await?;
    let (secret, debitura_secret, counted, events_redis) = (
        settings.agency_signing_secret.clone(),
        settings.debitura.webhook_secret.clone(),
        agency_events.clone(),
        redis.clone(),
    );
    let shell = ServiceShell::start_with_routes(&rt, SERVICE, PORT_OFFSET, |_, producer, _| {
        agency_events::routes(agency_events::AgencyEvents {
            rt: rt.clone(),
            producer: producer.clone(),
            secret,
            debitura_secret,
            topic: outcomes_topic,
            results: counted,
            redis: events_redis,
            keys: rt.keys(),
        })
    })
    .await?;
    let results = IntCounterVec::new(Opts::new("handoff_cases_total", "Cases by result"), &["result"])?;
    shell.metrics.registry.register(Box::new(results.clone()))?;
    shell.metrics.registry.register(Box::new(agency_events))?;
    let handoff = Handoff {
        redis,
        keys: rt.keys(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_millis(settings.timeout_ms))
            .build()?,
        settings,
        export,
        outcomes_topic: rt.topic(&rt.config.topics.handoff_outcomes),
        results,
        rt: rt.clone(),
    };
    let consumer = shell.consumer(&rt, SERVICE, &[rt.topic(&rt.config.topics.handoff_cases)])?;
    run_consumer(consumer, handoff, shell.loop_context(&rt)).await?;
    shell.producer.flush(Duration::from_secs(5)).await;
    Ok(())
}
