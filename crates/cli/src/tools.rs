//! The domain-core commands: payment references, the law in force, banking calendars.
//! They print to stdout and return an error (non-zero exit) on invalid input.

use std::path::PathBuf;

use chrono::NaiveDate;
use clap::Subcommand;
use forfall_domain::calendar;
use forfall_domain::law::{LawBook, Limit};
use forfall_domain::reference::{self, ReferenceKind};
use forfall_domain::{Jurisdiction, Locale, Money, money};

#[derive(Debug, Subcommand)]
pub enum ReferenceCommand {
    /// Make a payment reference from an invoice number.
    Generate {
        /// kid-mod10, kid-mod11, fik71, ocr, ocr-length, fi or rf
        kind: ReferenceKind,
        value: String,
    },
    /// Check a payment reference; says which rule fails.
    Validate { kind: ReferenceKind, value: String },
}

pub fn reference(cmd: ReferenceCommand) -> anyhow::Result<()> {
    match cmd {
        ReferenceCommand::Generate { kind, value } => {
            let r = reference::generate(kind, &value)
                .map_err(|e| anyhow::anyhow!("cannot make a {kind} reference from '{value}': {e}"))?;
            println!("{}", r.printed());
        }
        ReferenceCommand::Validate { kind, value } => {
            let r = reference::validate(kind, &value)
                .map_err(|e| anyhow::anyhow!("'{value}' is not a valid {kind} reference: {e}"))?;
            println!("valid {kind} reference: {}", r.printed());
        }
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum LawCommand {
    /// The rules of a jurisdiction with their citations and dates, and its reference rates.
    Show {
        /// DK, NO, SE or FI
        jurisdiction: Jurisdiction,
        /// A rules file to use instead of the built-in one (same shape as crates/domain/data/law.toml).
        #[arg(long)]
        rules: Option<PathBuf>,
        /// A rates file to use instead of the built-in one.
        #[arg(long)]
        rates: Option<PathBuf>,
    },
}

fn amount(minor: i64, currency: forfall_domain::Currency) -> String {
    money::format(Money::new(minor, currency), Locale::En)
}

pub fn law(cmd: LawCommand) -> anyhow::Result<()> {
    let LawCommand::Show {
        jurisdiction,
        rules,
        rates,
    } = cmd;
    let read = |p: Option<PathBuf>, builtin: &str| -> anyhow::Result<String> {
        match p {
            Some(p) => std::fs::read_to_string(&p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display())),
            None => Ok(builtin.to_owned()),
        }
    };
    let book = LawBook::from_toml(
        &read(rules, forfall_domain::law::BUILTIN_RULES)?,
        &read(rates, forfall_domain::law::BUILTIN_RATES)?,
    )?;
    println!("{jurisdiction} rules (debtor: any, consumer or business):");
    let mut series = Vec::new();
    for r in book.rules().iter().filter(|r| r.jurisdiction == jurisdiction) {
        let value = match &r.limit {
            Limit::MaxFee {
                step,
                amount_minor,
                currency,
            } => format!("{} fee at most {}", step.label(), amount(*amount_minor, *currency)),
            Limit::FeeNeedsDaysAfterDue { days, .. } => format!("fee from {days} days after due"),
            Limit::MinDaysBetweenFees { days, .. } => format!("{days} days between fees"),
            Limit::MaxFeeBearingSteps { count, .. } => format!("at most {count} fees"),
            Limit::FeeNeedsAgreement => "fee only if agreed in advance".to_owned(),
            Limit::MinDaysToPay { step, days } => format!("{} gives at least {days} days to pay", step.label()),
            Limit::SecondFeeNeedsMissedDeadline { days, .. } => {
                format!("second fee only after a missed {days}-day deadline")
            }
            Limit::Compensation {
                amount_minor,
                currency,
                offsets_fees,
            } => format!(
                "compensation {}{}",
                amount(*amount_minor, *currency),
                if *offsets_fees { ", instead of fees charged" } else { "" }
            ),
            Limit::LateInterest { series: s, margin_bp } => {
                series.push(s.clone());
                format!("{s} + {}.{:02} pp", margin_bp / 100, margin_bp % 100)
            }
            Limit::MergeClaims => "claims handed over together form one case".to_owned(),
            Limit::AgreedInterest {
                at_most_statutory: true,
            } => "agreed interest, at most the statutory rate".to_owned(),
            Limit::AgreedInterest {
                at_most_statutory: false,
            } => "agreed interest".to_owned(),
            Limit::NeedsEarlierStep {
                step,
                earlier,
                days,
                after_its_deadline,
            } => format!(
                "{} {}",
                step.label(),
                forfall_domain::law::earlier_step_wording(earlier, *days, *after_its_deadline)
            ),
        };
        let dates = match r.valid_to {
            Some(to) => format!("{} to {to}", r.valid_from),
            None => format!("from {}", r.valid_from),
        };
        let check = if r.verified {
            String::new()
        } else {
            format!("  [verify: {}]", r.note.as_deref().unwrap_or("not confirmed"))
        };
        println!("  {:<34} {:<9} {value}", r.id, format!("{:?}", r.debtor).to_lowercase());
        println!("  {:<34} {:<9} {} ({dates}){check}", "", "", r.citation);
    }
    println!("reference rates:");
    for rate in book.rates().iter().filter(|r| series.contains(&r.series)) {
        let check = if rate.verified { "" } else { "  [verify]" };
        println!(
            "  {} {} {}.{:02} %  ({}){check}",
            rate.series,
            rate.period,
            rate.rate_bp / 100,
            rate.rate_bp % 100,
            rate.source
        );
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum CalendarCommand {
    /// Banking days between two dates (inclusive), with the closed days and why.
    BankingDays {
        jurisdiction: Jurisdiction,
        from: NaiveDate,
        to: NaiveDate,
    },
}

pub fn calendar(cmd: CalendarCommand) -> anyhow::Result<()> {
    let CalendarCommand::BankingDays { jurisdiction, from, to } = cmd;
    anyhow::ensure!(from <= to, "FROM {from} is after TO {to}");
    anyhow::ensure!((to - from).num_days() <= 3660, "at most ten years at a time");
    let mut day = from;
    let mut count = 0;
    while day <= to {
        if calendar::is_banking_day(jurisdiction, day) {
            count += 1;
            println!("{day} {}", day.format("%a"));
        } else if let Some(h) = calendar::holiday_on(jurisdiction, day) {
            println!("{day} {} closed: {} ({})", day.format("%a"), h.name, h.local_name);
        }
        day = day.succ_opt().ok_or_else(|| anyhow::anyhow!("date out of range"))?;
    }
    println!("{count} banking days in {jurisdiction} from {from} to {to}");
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check a policy file: structure, and every plan against the law of every jurisdiction and
    /// debtor kind it can reach. Prints every problem; exits non-zero if there is any.
    Check {
        file: PathBuf,
        /// Check as of this date (default: today).
        #[arg(long)]
        on: Option<NaiveDate>,
    },
}

pub fn policy(cmd: PolicyCommand) -> anyhow::Result<()> {
    let PolicyCommand::Check { file, on } = cmd;
    let text = std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    let law = LawBook::builtin()?;
    let on = on.unwrap_or_else(|| chrono::Utc::now().date_naive());
    match forfall_domain::policy::load(&text, &law, on) {
        Ok(p) => {
            println!(
                "{}: policy {} is lawful as of {on}: {} segments, {} plans, {} experiments",
                file.display(),
                p.version,
                p.segments.len(),
                p.plans.len(),
                p.experiments.len()
            );
            Ok(())
        }
        Err(e) => anyhow::bail!("{}: {e}", file.display()),
    }
}

#[derive(Debug, Subcommand)]
pub enum PaymentsCommand {
    /// Import a bank's camt.054 file: its credit entries become payments. A file with any
    /// invalid entry imports nothing unless --lenient.
    Import {
        file: PathBuf,
        #[arg(long)]
        tenant: String,
        /// Import the valid entries and list the problems of the others.
        #[arg(long)]
        lenient: bool,
        /// The matcher's HTTP address.
        #[arg(long, env = "FORFALL_MATCHER_URL", default_value = "http://127.0.0.1:9604")]
        matcher: String,
        /// The tenant's API token (`api.tenants.<tenant>.token`).
        #[arg(long, env = "FORFALL_TENANT_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// The payments no rule could match.
    Unmatched {
        #[arg(long)]
        tenant: String,
        #[arg(long, env = "FORFALL_MATCHER_URL", default_value = "http://127.0.0.1:9604")]
        matcher: String,
        /// The tenant's API token (`api.tenants.<tenant>.token`).
        #[arg(long, env = "FORFALL_TENANT_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Match a payment by hand to invoices, in the order given; records who did it.
    Match {
        payment_id: String,
        #[arg(required = true)]
        invoices: Vec<String>,
        #[arg(long)]
        tenant: String,
        /// Who matches it (recorded on the payment).
        #[arg(long)]
        by: String,
        #[arg(long, env = "FORFALL_MATCHER_URL", default_value = "http://127.0.0.1:9604")]
        matcher: String,
        /// The tenant's API token (`api.tenants.<tenant>.token`).
        #[arg(long, env = "FORFALL_TENANT_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
}

/// `request` with the tenant's token, when there is one.
fn with_token(request: reqwest::RequestBuilder, token: Option<&str>) -> reqwest::RequestBuilder {
    match token {
        Some(token) => request.bearer_auth(token),
        None => request,
    }
}

async fn answer(response: reqwest::Response) -> anyhow::Result<serde_json::Value> {
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    if !status.is_success() {
        let mut message = format!(
            "{} ({status}): {}",
            body["error"].as_str().unwrap_or("error"),
            body["detail"].as_str().unwrap_or("")
        );
        for p in body["problems"].as_array().into_iter().flatten() {
            message.push_str(&format!("\n  {}", p.as_str().unwrap_or_default()));
        }
        anyhow::bail!(message);
    }
    Ok(body)
}

pub async fn payments(cmd: PaymentsCommand) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    match cmd {
        PaymentsCommand::Import {
            file,
            tenant,
            lenient,
            matcher,
            token,
        } => {
            let bytes = std::fs::read(&file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let response = with_token(client.post(format!("{matcher}/v1/payments/camt054")), token.as_deref())
                .query(&[
                    ("tenant", tenant.as_str()),
                    ("lenient", if lenient { "true" } else { "false" }),
                ])
                .body(bytes)
                .send()
                .await
                .map_err(|e| anyhow::anyhow!("cannot reach the matcher at {matcher}: {e}"))?;
            let body = answer(response)
                .await
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            println!(
                "{}: {} {}: {} payments imported ({} already known), {} debits, {} reversals and {} unbooked entries skipped",
                file.display(),
                body["version"].as_str().unwrap_or("camt.054"),
                body["message_id"].as_str().unwrap_or(""),
                body["imported"],
                body["already_known"],
                body["skipped_debits"],
                body["skipped_reversals"],
                body["skipped_unbooked"]
            );
            for p in body["problems"].as_array().into_iter().flatten() {
                println!("  not imported: {}", p.as_str().unwrap_or_default());
            }
        }
        PaymentsCommand::Unmatched { tenant, matcher, token } => {
            let response = with_token(client.get(format!("{matcher}/v1/payments/unmatched")), token.as_deref())
                .query(&[("tenant", &tenant)])
                .send()
                .await?;
            let body = answer(response).await?;
            let rows = body["unmatched"].as_array().cloned().unwrap_or_default();
            for r in &rows {
                println!(
                    "{}  {} {}  ref {}  {}",
                    r["payment_id"].as_str().unwrap_or(""),
                    r["amount_minor"],
                    r["currency"].as_str().unwrap_or(""),
                    r["reference"].as_str().unwrap_or("-"),
                    r["remittance_text"].as_str().unwrap_or("")
                );
            }
            println!("{} unmatched payments for {tenant}", rows.len());
        }
        PaymentsCommand::Match {
            payment_id,
            invoices,
            tenant,
            by,
            matcher,
            token,
        } => {
            let response = with_token(
                client.post(format!("{matcher}/v1/payments/{payment_id}/match")),
                token.as_deref(),
            )
            .json(&serde_json::json!({"tenant": tenant, "invoices": invoices, "by": by}))
            .send()
            .await?;
            let body = answer(response).await?;
            for a in body["allocations"].as_array().into_iter().flatten() {
                println!(
                    "{payment_id} → {}: {} minor units",
                    a["invoice_id"].as_str().unwrap_or(""),
                    a["amount_minor"]
                );
            }
            println!("matched by {by}; overpayment {} minor units", body["overpayment_minor"]);
        }
    }
    Ok(())
}

/// `forfall rebuild`.
#[derive(clap::Args, Debug)]
pub struct RebuildArgs {
    /// The services whose state to rebuild (comma-separated: watcher, ingest, matcher,
    /// dispatch, portal); all by default.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "watcher,ingest,matcher,dispatch,portal"
    )]
    pub services: Vec<String>,
    /// Only these partitions of the watcher's changelog (comma-separated); all by default.
    #[arg(long, value_delimiter = ',')]
    pub partitions: Option<Vec<i32>>,
    /// Replay every partition from the start, whatever Redis says it holds.
    #[arg(long)]
    pub from_start: bool,
    /// Do not replay here: mark the partitions' state missing so that the running services
    /// rebuild what they own (they are not ready meanwhile).
    #[arg(long, conflicts_with = "from_start")]
    pub ask_running: bool,
}

pub async fn rebuild(rt: &forfall_platform::service::Runtime, args: RebuildArgs) -> anyhow::Result<()> {
    const KNOWN: [&str; 5] = ["watcher", "ingest", "matcher", "dispatch", "portal"];
    if let Some(unknown) = args.services.iter().find(|s| !KNOWN.contains(&s.as_str())) {
        anyhow::bail!(
            "--services: '{unknown}' keeps no state to rebuild; choose from {}",
            KNOWN.join(", ")
        );
    }
    let wants = |s: &str| args.services.iter().any(|w| w == s);
    if wants("watcher") {
        let request = forfall_watcher::rebuild::Request {
            partitions: args.partitions.clone(),
            from_start: args.from_start,
            ask_running: args.ask_running,
        };
        let progress =
            forfall_watcher::rebuild::rebuild_deployment(&rt.config, &request, |p| eprintln!("watcher: {p}")).await?;
        if request.ask_running {
            println!(
                "watcher: {} partitions marked for rebuilding; the running watchers rebuild them at their next read",
                progress.partitions
            );
        } else {
            println!("watcher: rebuilt, {progress}");
        }
    }
    let redis = forfall_platform::redis_store::connect(&rt.config.redis).await?;
    if wants("ingest") {
        let rebuilder = forfall_ingest::rebuilder(rt, redis.clone())?;
        rebuild_derived(rt, forfall_ingest::SERVICE, redis.clone(), rebuilder, args.ask_running).await?;
    }
    if wants("matcher") {
        let settings: forfall_matcher::MatcherSettings =
            forfall_platform::config::section(&rt.figment, forfall_matcher::SERVICE)?;
        let rebuilder = forfall_matcher::rebuilder(rt, &settings, redis.clone());
        rebuild_derived(rt, forfall_matcher::SERVICE, redis.clone(), rebuilder, args.ask_running).await?;
    }
    if wants("dispatch") {
        let settings: forfall_dispatch::DispatchSettings =
            forfall_platform::config::section(&rt.figment, forfall_dispatch::SERVICE)?;
        let rebuilder = forfall_dispatch::rebuilder(rt, &settings, redis.clone());
        rebuild_derived(
            rt,
            forfall_dispatch::SERVICE,
            redis.clone(),
            rebuilder,
            args.ask_running,
        )
        .await?;
    }
    if wants("portal") {
        let settings: forfall_portal::PortalSettings =
            forfall_platform::config::section(&rt.figment, forfall_portal::SERVICE)?;
        let rebuilder = forfall_portal::rebuilder(rt, &settings, redis.clone());
        rebuild_derived(rt, forfall_portal::SERVICE, redis.clone(), rebuilder, args.ask_running).await?;
    }
    Ok(())
}

/// Rebuilds one service's derived state here (or, with `ask_running`, has its running
/// instances do it), waiting while a running instance is already at it.
async fn rebuild_derived<R: forfall_platform::derived_state::Rebuild>(
    rt: &forfall_platform::service::Runtime,
    service: &'static str,
    redis: redis::aio::ConnectionManager,
    rebuilder: R,
    ask_running: bool,
) -> anyhow::Result<()> {
    use forfall_platform::derived_state::{DerivedState, ask_rebuild};
    if ask_running {
        ask_rebuild(&mut redis.clone(), &rt.keys(), service).await?;
        println!("{service}: marked for rebuilding; its running instances rebuild it at once");
        return Ok(());
    }
    let state = DerivedState::new(
        &rt.keys(),
        service,
        redis,
        forfall_platform::admin::Readiness::default(),
        rebuilder,
    );
    let started = std::time::Instant::now();
    let mut result = state.rebuild_now().await;
    // A running instance may have taken the rebuild on (it saw the marker go): wait for it.
    while let Err(e) = result {
        anyhow::ensure!(
            started.elapsed() < std::time::Duration::from_secs(1800),
            "{service}: not rebuilt after 30 minutes: {e:?}"
        );
        eprintln!("{service}: {e:?}");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        result = state.ensure_ready().await;
    }
    println!("{service}: rebuilt in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct TimelineArgs {
    pub tenant: String,
    pub invoice: String,
    /// The portal's HTTP address.
    #[arg(long, env = "FORFALL_PORTAL_URL", default_value = "http://127.0.0.1:9606")]
    pub portal: String,
    /// The portal's staff token (`portal.staff_token`).
    #[arg(long, env = "FORFALL_STAFF_TOKEN", hide_env_values = true)]
    pub token: String,
    /// JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `forfall timeline`: an invoice's whole story, as the portal tells it to staff.
pub async fn timeline(args: TimelineArgs) -> anyhow::Result<()> {
    let url = format!(
        "{}/v1/timeline/{}/{}",
        args.portal.trim_end_matches('/'),
        urlencode(&args.tenant),
        urlencode(&args.invoice)
    );
    let body = staff_get(
        &url,
        &[("format", if args.json { "json" } else { "text" })],
        &args.token,
        "portal",
        &args.portal,
    )
    .await?;
    print!("{body}");
    Ok(())
}

/// GETs a staff endpoint of `service` (at `base`) with the staff token; the body of a 2xx
/// answer, or what the service said.
pub(crate) async fn staff_get(
    url: &str,
    query: &[(&str, &str)],
    token: &str,
    service: &str,
    base: &str,
) -> anyhow::Result<String> {
    let response = reqwest::Client::new()
        .get(url)
        .query(query)
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the {service} at {base}: {e}"))?;
    let status = response.status();
    let body = response.text().await?;
    anyhow::ensure!(status.is_success(), "the {service} answered {status}: {}", body.trim());
    Ok(body)
}

/// A path segment, percent-encoded (tenant and invoice ids are free text from billing).
pub(crate) fn urlencode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
