//! Benchmark: the debtor's page under a steady load, next to a static answer of the same
//! server (`/healthz`), measured in the same run: p50, p99 and the slowest, at a fixed rate of
//! requests (an open loop: each request's time counts from when it was due, so a stall is not
//! hidden by the requests it held back).
//!
//!     cargo run --release -p forfall-e2e --bin portal-load -- 300 20
//!
//! Arguments: requests per second, seconds per measurement.

use std::sync::Arc;
use std::time::{Duration, Instant};

use forfall_domain::paylink::{self, LinkClaims, LinkKey};
use forfall_domain::reference::{self, ReferenceKind};
use forfall_e2e::*;
use forfall_platform::clock::ManualClock;

struct Figures {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    errors: usize,
    sent: usize,
    bytes: usize,
}

/// `rate` requests a second to `url` for `secs` seconds.
async fn measure(http: &reqwest::Client, url: &str, rate: f64, secs: f64) -> anyhow::Result<Figures> {
    let n = (rate * secs) as usize;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now() + Duration::from_millis(100);
    let url = Arc::new(url.to_owned());
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let due = start + interval * i as u32;
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(due.into()).await;
            let answer = http.get(url.as_str()).send().await;
            let ok_bytes = match answer {
                Ok(r) if r.status().is_success() => r.bytes().await.ok().map(|b| b.len()),
                _ => None,
            };
            (due.elapsed().as_secs_f64() * 1000.0, ok_bytes)
        }));
    }
    let mut latencies = Vec::with_capacity(n);
    let (mut errors, mut bytes) = (0, 0);
    for t in tasks {
        let (ms, ok) = t.await?;
        latencies.push(ms);
        match ok {
            Some(b) => bytes = b,
            None => errors += 1,
        }
    }
    latencies.sort_by(f64::total_cmp);
    Ok(Figures {
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        max_ms: latencies.last().copied().unwrap_or_default(),
        errors,
        sent: n,
        bytes,
    })
}

fn report(what: &str, f: &Figures) {
    println!(
        "{what:<28} p50 {:>7.2} ms   p99 {:>7.2} ms   max {:>8.2} ms   errors {}/{}   {} bytes",
        f.p50_ms, f.p99_ms, f.max_ms, f.errors, f.sent, f.bytes
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rate = bench_arg(1, 300.0)?;
    let secs = bench_arg(2, 20.0)?;
    let mut config = base_config();
    config.log.level = "warn".into();
    let mut stack = LocalStack::start(config, ManualClock::new(at("2026-03-01T08:00:00Z"))).await?;
    stack.set("dispatch.tenants.nordkraft.name", "Nordkraft AS");
    stack.set("dispatch.tenants.nordkraft.bank_account", "1234.56.78903");
    stack.set("portal.per_link_per_minute", 10_000_000);
    stack.set("portal.per_address_per_minute", 10_000_000);
    stack.start_all();
    let kid = reference::generate(ReferenceKind::KidMod10, "7000123")?.value;
    let s = Sample {
        tenant: "nordkraft",
        invoice_id: "load-1",
        number: "7000123",
        due: day(2026, 3, 2),
        amount_minor: 125_000,
        currency: "NOK",
        jurisdiction: "NO",
        email: "kari@example.test",
        reference: Box::leak(kid.into_boxed_str()),
        language: "nb",
    };
    issue_invoice(&stack, &s).await?;
    status_is(&stack, s.tenant, s.invoice_id, "open").await?;
    let token = paylink::issue(
        &LinkKey {
            id: "dev".into(),
            secret: b"forfall-dev-pay-link-secret".to_vec(),
        },
        &LinkClaims {
            tenant: s.tenant.into(),
            debtor_id: s.debtor_id(),
            invoices: vec![s.invoice_id.into()],
            expires_at: at("2026-04-01T00:00:00Z").timestamp(),
            issued_at: None,
        },
    );
    let addr = stack
        .rt
        .admin_addr("portal")
        .ok_or_else(|| anyhow::anyhow!("the portal serves no HTTP"))?;
    let page = format!("http://{addr}/pay/{token}");
    let http = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    eventually("the page to show the invoice", WAIT, || async {
        let body = http.get(&page).send().await?.text().await?;
        Ok(body.contains("Faktura 7000123").then_some(()))
    })
    .await?;
    println!("portal load: {rate:.0} requests/s for {secs:.0} s each, open loop, keep-alive, one client");
    // Warm both paths, then measure each; the static answer twice, around the page, so that
    // drift on the shared machine shows.
    measure(&http, &format!("http://{addr}/healthz"), rate, 2.0).await?;
    measure(&http, &page, rate, 2.0).await?;
    let static_before = measure(&http, &format!("http://{addr}/healthz"), rate, secs).await?;
    let page_figures = measure(&http, &page, rate, secs).await?;
    let static_after = measure(&http, &format!("http://{addr}/healthz"), rate, secs).await?;
    report("static /healthz (before)", &static_before);
    report("debtor page /pay/<token>", &page_figures);
    report("static /healthz (after)", &static_after);
    let baseline_p50 = (static_before.p50_ms + static_after.p50_ms) / 2.0;
    let baseline_p99 = (static_before.p99_ms + static_after.p99_ms) / 2.0;
    println!(
        "page / static: p50 {:.1}x, p99 {:.1}x",
        page_figures.p50_ms / baseline_p50.max(1e-9),
        page_figures.p99_ms / baseline_p99.max(1e-9)
    );
    stack.shutdown().await;
    Ok(())
}
