//! The debtor's page on the dev stack: the link in the nudge the SMTP sink received opens the
//! page in the debtor's language with what they owe and how to pay it; after the payment it
//! says paid; an altered, forged or expired link, or one naming another debtor's invoice,
//! shows nothing of the invoice; and pages are limited per link.

use forfall::pay_flow;
use forfall_devsinks::ingress::Forwarder;
use forfall_devsinks::stripe::StripeSim;
use forfall_devsinks::swish::SwishSim;
use forfall_devsinks::tls::TestPki;
use forfall_devsinks::vipps::{VippsMerchant, VippsSim};
use forfall_domain::paylink::{self, LinkClaims, LinkKey};
use forfall_domain::reference::{self, ReferenceKind};
use forfall_e2e::*;
use forfall_platform::clock::{Clock, ManualClock};
use forfall_platform::records::PaymentReceived;

/// The dev profile's pay-link key (`dispatch.pay_link` defaults).
fn dev_key() -> LinkKey {
    LinkKey {
        id: "dev".into(),
        secret: b"forfall-dev-pay-link-secret".to_vec(),
    }
}

fn norwegian(kid: &'static str) -> Sample<'static> {
    Sample {
        tenant: "nordkraft",
        invoice_id: "no-portal-1",
        number: "7000123",
        due: day(2026, 3, 2),
        amount_minor: 125_000,
        currency: "NOK",
        jurisdiction: "NO",
        email: "kari@example.test",
        reference: kid,
        language: "nb",
    }
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

async fn get(stack: &LocalStack, path: &str) -> anyhow::Result<Answer> {
    let addr = stack.rt.admin_addr("portal").expect("the portal serves HTTP");
    let r = reqwest::get(format!("http://{addr}{path}")).await?;
    Ok(Answer {
        status: r.status().as_u16(),
        headers: r.headers().clone(),
        body: r.text().await?,
    })
}

/// The page once it shows `want` (the read model follows the topics).
async fn page_showing(stack: &LocalStack, path: &str, want: &str) -> anyhow::Result<Answer> {
    eventually(&format!("the page to show '{want}'"), WAIT, || async {
        if stack.rt.admin_addr("portal").is_none() {
            return Ok(None); // not listening yet (a loaded machine starts it late)
        }
        let answer = get(stack, path).await?;
        Ok((answer.status == 200 && answer.body.contains(want)).then_some(answer))
    })
    .await
}

async fn stack_with_creditor(clock: std::sync::Arc<ManualClock>) -> anyhow::Result<LocalStack> {
    let mut stack = LocalStack::start(base_config(), clock).await?;
    stack.set("dispatch.tenants.nordkraft.name", "Nordkraft AS");
    stack.set("dispatch.tenants.nordkraft.bank_account", "1234.56.78903");
    stack.set("dispatch.tenants.nordkraft.contact", "kundeservice@nordkraft.example");
    stack.set("dispatch.tenants.nordkraft.iban", "FI37 1590 3000 0007 76");
    stack.set("dispatch.tenants.nordkraft.bic", "NDEAFIHH");
    Ok(stack)
}

/// A fresh stack with `s` issued and its nudge sent; the portal's limits are lifted because
/// the simulated clock stands still while a test polls the page.
async fn nudged(s: &Sample<'_>) -> anyhow::Result<(std::sync::Arc<ManualClock>, LocalStack)> {
    nudged_with(s, &[]).await
}

/// [`nudged`], with these settings (`section.key`, value) besides.
async fn nudged_with(
    s: &Sample<'_>,
    settings: &[(String, serde_json::Value)],
) -> anyhow::Result<(std::sync::Arc<ManualClock>, LocalStack)> {
    let clock = ManualClock::new(at("2026-03-01T08:00:00Z"));
    let mut stack = stack_with_creditor(clock.clone()).await?;
    for (key, value) in settings {
        stack.set(key, value);
    }
    stack.set("portal.per_link_per_minute", 100_000);
    stack.set("portal.per_address_per_minute", 100_000);
    stack.start_all();
    issue_invoice(&stack, s).await?;
    status_is(&stack, s.tenant, s.invoice_id, "open").await?;
    clock.set(at("2026-03-02T08:00:01Z"));
    status_is(&stack, s.tenant, s.invoice_id, "nudged").await?;
    Ok((clock, stack))
}

/// The page's path for a link to `s` signed with the dev key, as dispatch would sign it.
fn signed_path(s: &Sample<'_>) -> String {
    let token = paylink::issue(
        &dev_key(),
        &LinkClaims {
            tenant: s.tenant.into(),
            debtor_id: s.debtor_id(),
            invoices: vec![s.invoice_id.into()],
            expires_at: at("2026-04-01T00:00:00Z").timestamp(),
            issued_at: None,
        },
    );
    format!("/pay/{token}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_link_in_the_nudge_opens_the_debtors_page_until_it_is_paid_and_no_other_link_shows_it() -> anyhow::Result<()>
{
    let kid = Box::leak(
        reference::generate(ReferenceKind::KidMod10, "7000123")?
            .value
            .into_boxed_str(),
    );
    let s = norwegian(kid);
    let (clock, stack) = nudged_with(&s, &[("portal.staff_token".to_owned(), STAFF_TOKEN.into())]).await?;

    // The link as the debtor gets it: in the e-mail the SMTP sink received.
    let mail = eventually("the nudge", WAIT, || async {
        Ok(stack.mail.to(s.email).into_iter().next())
    })
    .await?;
    let body = mail.body();
    let link = body
        .split_whitespace()
        .find(|w| w.contains("/pay/v1."))
        .unwrap_or_else(|| panic!("no pay link in\n{body}"));
    let token = link.rsplit("/pay/").next().unwrap_or_default().to_owned();
    let path = format!("/pay/{token}");

    // In Norwegian (the invoice's language): the creditor, the invoice, how to pay, and the
    // nudge just sent.
    page_showing(&stack, &path, "Vennlig påminnelse sendt 02.03.2026 på e-post").await?;
    // The read model follows the journey's events and dispatch's outcomes separately.
    let page = page_showing(&stack, &path, "sender vi en purring").await?;
    for want in [
        "Vennlig påminnelse sendt 02.03.2026 på e-post",
        "<html lang=\"nb\">",
        "Nordkraft AS",
        "Faktura 7000123",
        "Electricity, February",
        "kr\u{a0}1\u{a0}250,00",
        "02.03.2026",
        "KID",
        kid,
        "Slik betaler du",
        "1234.56.78903",
        "kundeservice@nordkraft.example",
        // What happens next and when: the plan's reminder, ten banking days after the due date.
        "Er den fortsatt ubetalt, sender vi en purring 16.03.2026.",
    ] {
        assert!(page.body.contains(want), "the page shows '{want}':\n{}", page.body);
    }
    let header = |name: &str| {
        page.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(header("cache-control"), "no-store");
    assert_eq!(header("referrer-policy"), "no-referrer");
    assert!(header("content-security-policy").starts_with("default-src 'none'"));
    assert!(
        page.body.len() < 16 * 1024,
        "the page stays within its 16 KiB budget ({} bytes)",
        page.body.len()
    );
    // Switched to English.
    let english = get(&stack, &format!("{path}?lang=en")).await?;
    assert!(english.body.contains("<html lang=\"en\">") && english.body.contains("How to pay"));

    // Altered, forged, or naming another debtor's invoice: nothing of the invoice shows.
    let mut altered = token.clone();
    let last = altered.pop().unwrap_or('A');
    altered.push(if last == 'A' { 'B' } else { 'A' });
    let forged_key = LinkKey {
        id: "dev".into(),
        secret: b"a guess".to_vec(),
    };
    let claims = LinkClaims {
        tenant: s.tenant.into(),
        debtor_id: s.debtor_id(),
        invoices: vec![s.invoice_id.into()],
        expires_at: at("2026-05-01T00:00:00Z").timestamp(),
        issued_at: None,
    };
    let forged = paylink::issue(&forged_key, &claims);
    for bad in [altered.as_str(), forged.as_str(), "not-a-link"] {
        let refused = get(&stack, &format!("/pay/{bad}")).await?;
        assert_eq!(refused.status, 403, "{bad}");
        assert!(
            !refused.body.contains("7000123") && !refused.body.contains("Nordkraft"),
            "a refusal shows nothing: {}",
            refused.body
        );
    }
    let someone_else = paylink::issue(
        &dev_key(),
        &LinkClaims {
            debtor_id: "nordkraft:someone-else".into(),
            ..claims.clone()
        },
    );
    let other = get(&stack, &format!("/pay/{someone_else}")).await?;
    assert_eq!(other.status, 200);
    assert!(
        !other.body.contains("7000123"),
        "another debtor's link shows not this invoice"
    );

    // Paid: the page says so and offers no way to pay it again.
    stack
        .produce(
            &stack.topic(&stack.topics().payments),
            "bank",
            &s.payment("pay-portal-1", s.amount_minor, kid),
        )
        .await?;
    status_is(&stack, s.tenant, s.invoice_id, "closed:paid").await?;
    let paid = page_showing(&stack, &path, "Betalt. Takk!").await?;
    assert!(
        paid.body.contains("Betaling mottatt: kr\u{a0}1\u{a0}250,00"),
        "{}",
        paid.body
    );
    assert!(
        !paid.body.contains("Slik betaler du"),
        "no pay instructions for a paid invoice"
    );

    // Withdrawn by the creditor's staff (it reached the wrong person): the link is refused
    // without a word of the invoice, and so is a form posted from it; a link signed afterwards
    // (the next message's) works.
    let addr = stack.rt.admin_addr("portal").expect("the portal serves HTTP");
    let revoke_url = format!("http://{addr}/v1/links/revoke/{}/{}", s.tenant, s.debtor_id());
    let http = reqwest::Client::new();
    assert_eq!(http.post(&revoke_url).send().await?.status(), 401, "staff only");
    let revoked = http.post(&revoke_url).bearer_auth(STAFF_TOKEN).send().await?;
    assert_eq!(revoked.status(), 200);
    let withdrawn = get(&stack, &path).await?;
    assert_eq!(withdrawn.status, 410);
    assert!(
        withdrawn.body.contains("withdrawn")
            && !withdrawn.body.contains("7000123")
            && !withdrawn.body.contains("Nordkraft"),
        "{}",
        withdrawn.body
    );
    let posted = http
        .post(format!("http://{addr}{path}/requests"))
        .form(&[("kind", "claims_paid"), ("invoice", s.invoice_id), ("form_token", "x")])
        .send()
        .await?;
    assert_eq!(posted.status(), 410, "no request from a withdrawn link");
    // Redis lost: the portal rebuilds from the topics and its changelog, and the link stays
    // withdrawn (never shown meanwhile).
    assert!(forfall_e2e::flush_stack_state(&stack.rt.config).await? > 0);
    eventually("the link withdrawn after the rebuild", WAIT, || async {
        let answer = get(&stack, &path).await?;
        anyhow::ensure!(answer.status != 200, "a withdrawn link was shown after Redis was lost");
        Ok((answer.status == 410).then_some(()))
    })
    .await?;
    clock.advance(chrono::Duration::seconds(1));
    let next_message = paylink::issue(
        &dev_key(),
        &LinkClaims {
            tenant: s.tenant.into(),
            debtor_id: s.debtor_id(),
            invoices: vec![s.invoice_id.into()],
            expires_at: clock.now().timestamp() + 86_400,
            issued_at: Some(clock.now().timestamp()),
        },
    );
    page_showing(&stack, &format!("/pay/{next_message}"), "Betalt. Takk!").await?;

    // Expired (links work 60 days): nothing of the invoice. The withdrawn link stays
    // withdrawn; the later one says it expired.
    clock.advance(chrono::Duration::days(61));
    assert!(get(&stack, &path).await?.body.contains("withdrawn"));
    let expired = get(&stack, &format!("/pay/{next_message}")).await?;
    assert_eq!(expired.status, 410);
    assert!(
        expired.body.contains("Lenken er utløpt"),
        "in the debtor's language: {}",
        expired.body
    );
    assert!(expired.body.contains("kundeservice@nordkraft.example"));
    assert!(!expired.body.contains("7000123"));
    stack.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pages_are_limited_per_link() -> anyhow::Result<()> {
    let clock = ManualClock::new(at("2026-03-01T08:00:00Z"));
    let mut stack = stack_with_creditor(clock).await?;
    stack.set("portal.per_link_per_minute", 3);
    stack.start_service("portal");
    stack
        .wait_ready(&["portal"], std::time::Duration::from_secs(60))
        .await?;
    let token = paylink::issue(
        &dev_key(),
        &LinkClaims {
            tenant: "nordkraft".into(),
            debtor_id: "nordkraft:d1".into(),
            invoices: vec!["i1".into()],
            expires_at: at("2026-04-01T00:00:00Z").timestamp(),
            issued_at: None,
        },
    );
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(get(&stack, &format!("/pay/{token}")).await?.status);
    }
    assert_eq!(statuses, vec![200, 200, 200, 429]);
    let limited = get(&stack, &format!("/pay/{token}")).await?;
    assert!(limited.headers.contains_key("retry-after"));
    // Another link from the same address is still answered.
    assert_eq!(get(&stack, "/pay/another").await?.status, 403);
    stack.shutdown().await;
    Ok(())
}

/// Lets the clock run to 08:00:01 UTC on `until`, waits until every timer due by then has fired
/// and dispatch has caught up, and checks that `s`'s debtor got no message but the nudge.
async fn only_the_nudge_by(
    stack: &LocalStack,
    clock: &ManualClock,
    s: &Sample<'_>,
    until: chrono::NaiveDate,
) -> anyhow::Result<()> {
    let mark = issue_timer_mark(stack, s, until).await?;
    clock.set(until.and_hms_opt(8, 0, 1).expect("a time of day").and_utc());
    timer_mark_fired(stack, &mark).await?;
    dispatch_caught_up(stack, s).await?;
    let got = stack.mail.to(s.email);
    anyhow::ensure!(
        got.len() == 1,
        "only the nudge was sent by {until}, not {} messages",
        got.len()
    );
    Ok(())
}

/// The browser scripts (`tools/browser`), once Chromium and their npm packages are there.
fn browser_tools() -> anyhow::Result<&'static std::path::Path> {
    let tools = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../tools/browser"));
    anyhow::ensure!(
        tools.join("node_modules/playwright-core").exists() && std::path::Path::new("/usr/bin/chromium").exists(),
        "the browser tools are missing: `make devstack` installs Chromium and tools/browser's npm packages"
    );
    Ok(tools)
}

/// The serious and critical violations of an axe-core report's `violations`.
fn serious_violations(violations: &serde_json::Value) -> Vec<&serde_json::Value> {
    violations
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| matches!(v["impact"].as_str(), Some("serious" | "critical")))
        .collect()
}

/// Where the screenshots go: next to the build's output, kept after the run.
fn artifacts() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")))
        .join("artifacts")
        .join("portal")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_a_real_browser_the_page_passes_an_accessibility_audit_in_every_language_and_works_by_keyboard()
-> anyhow::Result<()> {
    let tools = browser_tools()?;
    let kid = Box::leak(
        reference::generate(ReferenceKind::KidMod10, "7000123")?
            .value
            .into_boxed_str(),
    );
    let s = norwegian(kid);
    let (_clock, stack, Providers { ingress, .. }) = with_providers(&s).await?;
    let path = signed_path(&s);
    page_showing(&stack, &path, "Vennlig påminnelse sendt").await?;
    let addr = stack.rt.admin_addr("portal").expect("the portal serves HTTP");
    let shots = artifacts();
    let out = tokio::process::Command::new("node")
        .arg(tools.join("check-page.mjs"))
        .arg(format!("http://{addr}{path}"))
        .arg(&shots)
        .args(["nb", "da", "sv", "fi", "en"])
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "the browser check failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    for language in ["nb", "da", "sv", "fi", "en"] {
        let r = &report["languages"][language];
        assert_eq!(
            (r["status"].as_u64(), r["lang"].as_str()),
            (Some(200), Some(language)),
            "{r}"
        );
        let serious = serious_violations(&r["violations"]);
        assert!(serious.is_empty(), "{language}: WCAG 2.1 AA violations: {serious:?}");
        assert!(r["passes"].as_u64().unwrap_or(0) > 10, "axe ran its checks: {r}");
        let shot = r["screenshot"].as_str().unwrap_or_default();
        assert!(
            std::fs::metadata(shot).is_ok_and(|m| m.len() > 10_000),
            "{language}: screenshot {shot}"
        );
        println!("{language}: screenshot {shot}, {} bytes of HTML", r["bytes"]);
    }
    // A Finnish invoice: the page's EPC QR code reads back as the transfer itself.
    let finnish_reference = reference::generate(ReferenceKind::Finnish, "2026042")?;
    let fi = Sample {
        invoice_id: "fi-portal-1",
        number: "2026-042",
        currency: "EUR",
        jurisdiction: "FI",
        email: "aino@example.test",
        reference: Box::leak(finnish_reference.value.clone().into_boxed_str()),
        language: "fi",
        amount_minor: 12_345,
        ..s.clone()
    };
    issue_invoice(&stack, &fi).await?;
    let fi_path = signed_path(&fi);
    page_showing(&stack, &fi_path, "Lasku 2026-042").await?;
    let out = tokio::process::Command::new("node")
        .arg(tools.join("check-page.mjs"))
        .arg(format!("http://{addr}{fi_path}"))
        .arg(shots.join("finnish-invoice"))
        .arg("fi")
        .output()
        .await?;
    anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let finnish: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let transfer = forfall_domain::bank_codes::SepaTransfer {
        beneficiary: "Nordkraft AS",
        iban: "FI37 1590 3000 0007 76",
        bic: Some("NDEAFIHH"),
        amount: forfall_domain::Money::new(12_345, forfall_domain::Currency::EUR),
        reference: Some(&finnish_reference),
        text: None,
    };
    assert_eq!(
        finnish["languages"]["fi"]["qr"].as_str(),
        Some(forfall_domain::bank_codes::epc_qr_payload(&transfer)?.as_str()),
        "the QR code a banking app scans is the transfer"
    );
    let violations = &finnish["languages"]["fi"]["violations"];
    assert!(
        violations.is_array() && serious_violations(violations).is_empty(),
        "{violations}"
    );

    // Everything it loads comes from the page itself (no fonts, scripts or images elsewhere).
    for request in report["requests"].as_array().into_iter().flatten() {
        assert!(
            request
                .as_str()
                .unwrap_or_default()
                .starts_with(&format!("http://{addr}/pay/")),
            "the page loaded {request}"
        );
    }
    // By keyboard alone: every other language is reached, and the focus can be seen.
    let walk = report["keyboard"].as_array().cloned().unwrap_or_default();
    for other in ["?lang=da", "?lang=sv", "?lang=fi", "?lang=en"] {
        let stop = walk.iter().find(|f| f["href"].as_str() == Some(other));
        assert!(
            stop.is_some_and(|f| f["visible"] == true),
            "Tab reaches {other} with a visible focus: {walk:?}"
        );
    }

    // The copy buttons work under the page's own policy: the KID is on the clipboard.
    let copy = &report["copy"];
    assert!(copy["buttons"].as_u64().unwrap_or(0) >= 2, "{copy}");
    assert_eq!(copy["copied"].as_str(), Some(&*kid), "{copy}");
    assert_eq!(copy["label_after"], "Kopiert", "{copy}");
    assert_eq!(
        copy["console_errors"],
        serde_json::json!([]),
        "no script refused: {copy}"
    );

    // Paying by keyboard alone: Tab to "Betal med Vipps", Enter; approve in the app (the
    // stand-in's page), Enter; back on the portal's page, which says it is paid.
    let shot = shots.join("portal-paid-nb.png");
    let out = tokio::process::Command::new("node")
        .arg(tools.join("pay-by-keyboard.mjs"))
        .arg(format!("http://{}{path}", ingress.addr))
        .arg("Betal med Vipps")
        .arg("approve")
        .arg(&shot)
        .output()
        .await?;
    anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let walk: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        walk["pay_button"]["reached"], true,
        "Tab reaches the pay button: {walk}"
    );
    assert_eq!(walk["pay_button"]["focus_visible"], true, "{walk}");
    assert_eq!(walk["approve_button"]["reached"], true, "{walk}");
    assert_eq!(walk["lang"], "nb", "{walk}");
    assert!(
        walk["status"]
            .as_str()
            .is_some_and(|t| t.contains("kr\u{a0}1\u{a0}250,00")),
        "the return page says what was paid: {walk}"
    );
    assert!(std::fs::metadata(&shot).is_ok_and(|m| m.len() > 5_000));
    println!(
        "paid by keyboard in {} tabs; screenshot {}",
        walk["pay_button"]["tabs"],
        shot.display()
    );
    status_is(&stack, s.tenant, s.invoice_id, "closed:paid").await?;
    stack.shutdown().await;
    Ok(())
}

/// An expired link's page offers to send a fresh link to the contact on file: the debtor asks,
/// the watcher records it and dispatch sends a new link by e-mail, which opens the page. A live
/// link cannot ask for one, and the same request twice sends one message.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_link_asks_for_a_fresh_one_which_goes_to_the_contact_on_file() -> anyhow::Result<()> {
    let kid = Box::leak(
        reference::generate(ReferenceKind::KidMod10, "7000129")?
            .value
            .into_boxed_str(),
    );
    let s = Sample {
        invoice_id: "no-portal-fresh",
        number: "7000129",
        email: "nora@example.test",
        ..norwegian(kid)
    };
    let (clock, stack) = nudged(&s).await?;
    eventually("the nudge", WAIT, || async {
        Ok((stack.mail.to(s.email).len() == 1).then_some(()))
    })
    .await?;
    // A link that works for an hour, then the debtor comes back two hours later.
    let short = paylink::issue(
        &dev_key(),
        &LinkClaims {
            tenant: s.tenant.into(),
            debtor_id: s.debtor_id(),
            invoices: vec![s.invoice_id.into()],
            expires_at: clock.now().timestamp() + 3600,
            issued_at: Some(clock.now().timestamp()),
        },
    );
    let path = format!("/pay/{short}");
    let live_token =
        form_token_in(&page_showing(&stack, &path, "Faktura 7000129").await?.body).expect("the live page has forms");
    let addr = stack.rt.admin_addr("portal").expect("the portal serves HTTP");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let ask = |token: String| {
        let http = http.clone();
        let url = format!("http://{addr}{path}/requests");
        async move {
            http.post(url)
                .form(&[
                    ("kind", "fresh_link"),
                    ("invoice", s.invoice_id),
                    ("form_token", token.as_str()),
                    ("lang", "nb"),
                ])
                .send()
                .await
        }
    };
    assert_eq!(
        ask(live_token).await?.status(),
        403,
        "a live link has no need of a new one"
    );
    clock.advance(chrono::Duration::hours(2));
    let expired = get(&stack, &path).await?;
    assert_eq!(expired.status, 410);
    assert!(
        expired.body.contains("Lenken er utløpt") && expired.body.contains("Send meg en ny lenke"),
        "{}",
        expired.body
    );
    assert!(
        !expired.body.contains("7000129"),
        "nothing of the invoice on an expired link's page"
    );
    let token = form_token_in(&expired.body).expect("the expired page has the form");
    let asked = ask(token.clone()).await?;
    assert_eq!(asked.status(), 303);
    let told = get(&stack, &format!("{path}?lang=nb&received=1")).await?;
    assert!(told.body.contains("En ny lenke er på vei"), "{}", told.body);
    // Sent by e-mail, to the address on file, with a link that opens the page.
    let fresh = eventually("the fresh link", WAIT, || async {
        Ok(stack.mail.to(s.email).into_iter().nth(1))
    })
    .await?;
    assert_eq!(
        fresh.header("Subject").as_deref(),
        Some("Din nye lenke til faktura 7000129 fra Nordkraft AS")
    );
    let body = fresh.body();
    let link = body
        .split_whitespace()
        .find(|w| w.contains("/pay/v1."))
        .unwrap_or_else(|| panic!("no pay link in\n{body}"));
    let fresh_path = format!("/pay/{}", link.rsplit("/pay/").next().unwrap_or_default());
    assert_ne!(fresh_path, path);
    page_showing(&stack, &fresh_path, "Faktura 7000129").await?;
    // The same form again (a reload): the same request, no second message.
    assert_eq!(ask(token).await?.status(), 303);
    consumed_to_end(&stack, "watcher", &[stack.topic(&stack.topics().debtor_requests)]).await?;
    consumed_to_end(&stack, "dispatch", &[stack.topic(&stack.topics().journey_actions)]).await?;
    assert_eq!(stack.mail.to(s.email).len(), 2, "one fresh link per request");
    let events = stack
        .read::<forfall_platform::records::JourneyEvent>(&stack.topic(&stack.topics().journey_events))
        .await?;
    let sent = events
        .iter()
        .filter(|e| e.invoice_id == s.invoice_id && e.kind == "fresh_link_sent")
        .count();
    assert_eq!(sent, 1, "on the journey's story once");
    stack.shutdown().await;
    Ok(())
}

/// The page's form token for an invoice, as the page carries it.
fn form_token_in(html: &str) -> Option<String> {
    let (_, rest) = html.split_once("name=\"form_token\" value=\"")?;
    rest.split_once('"').map(|(token, _)| token.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_debtor_says_it_is_paid_from_the_page_and_the_page_tells_what_became_of_it() -> anyhow::Result<()> {
    let kid = Box::leak(
        reference::generate(ReferenceKind::KidMod10, "7000124")?
            .value
            .into_boxed_str(),
    );
    let s = Sample {
        invoice_id: "no-portal-2",
        number: "7000124",
        email: "ola@example.test",
        ..norwegian(kid)
    };
    let (_clock, stack) = nudged(&s).await?;
    let path = signed_path(&s);
    let page = page_showing(&stack, &path, "Vennlig påminnelse sendt").await?;
    let form_token = form_token_in(&page.body).expect("the page has request forms");
    let addr = stack.rt.admin_addr("portal").expect("the portal serves HTTP");
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let post = |fields: Vec<(&'static str, String)>, origin: Option<&'static str>| {
        let mut request = client.post(format!("http://{addr}{path}/requests")).form(&fields);
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        request.send()
    };
    let fields = |kind: &str, token: &str| {
        vec![
            ("invoice", s.invoice_id.to_owned()),
            ("form_token", token.to_owned()),
            ("kind", kind.to_owned()),
            ("lang", "nb".to_owned()),
        ]
    };

    // Forged: another token, another site, an invoice the link does not name.
    assert_eq!(post(fields("claims_paid", "bm90IGl0"), None).await?.status(), 403);
    assert_eq!(
        post(fields("claims_paid", &form_token), Some("https://evil.example"))
            .await?
            .status(),
        403
    );
    let mut other_invoice = fields("claims_paid", &form_token);
    other_invoice[0].1 = "someone-elses".into();
    assert_eq!(post(other_invoice, None).await?.status(), 403);
    // An objection needs its text.
    assert_eq!(post(fields("dispute", &form_token), None).await?.status(), 422);

    // "I have paid": received, then the watcher pauses the reminders and the page says so.
    let same_origin = format!("http://{addr}");
    let answer = client
        .post(format!("http://{addr}{path}/requests"))
        .header("origin", same_origin)
        .form(&fields("claims_paid", &form_token))
        .send()
        .await?;
    assert_eq!(answer.status(), 303);
    let location = answer
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(location, format!("{path}?lang=nb&received=1"));
    let received = get(&stack, &location).await?;
    assert!(received.body.contains("Takk. Vi har mottatt forespørselen din."));
    status_is(&stack, s.tenant, s.invoice_id, "paused:claims_paid").await?;
    let told = page_showing(&stack, &path, "Du har sagt at du har betalt").await?;
    assert!(
        form_token_in(&told.body).is_none(),
        "no new request while this one pauses the reminders"
    );
    // The same form sent again (a double click) is the same request: applied once.
    post(fields("claims_paid", &form_token), None).await?;
    consumed_to_end(&stack, "watcher", &[stack.topic(&stack.topics().debtor_requests)]).await?;
    let events = stack
        .read::<forfall_platform::records::JourneyEvent>(&stack.topic(&stack.topics().journey_events))
        .await?;
    let kinds: Vec<&str> = events
        .iter()
        .filter(|e| e.invoice_id == s.invoice_id && (e.kind == "claims_paid" || e.kind == "request_refused"))
        .map(|e| e.kind.as_str())
        .collect();
    assert_eq!(kinds, vec!["claims_paid"], "applied once");
    stack.shutdown().await;
    Ok(())
}

/// The stand-in's test merchant.
fn vipps_merchant() -> VippsMerchant {
    VippsMerchant {
        client_id: "forfall-test-client".into(),
        client_secret: "forfall-test-client-secret".into(),
        subscription_key: "forfall-test-subscription".into(),
        msn: "123456".into(),
    }
}

const STRIPE_KEY: &str = "sk_test_forfall";
const STAFF_TOKEN: &str = "staff-token-for-tests";

/// The payment providers' stand-ins and the ingress they reach the portal through.
struct Providers {
    vipps: VippsSim,
    stripe: StripeSim,
    ingress: Forwarder,
}

/// A stack whose creditor takes Vipps MobilePay and cards through Stripe (the stand-ins),
/// reached from outside through an ingress that also serves the links; the webhooks are
/// registered with the ingress's URL, once, as an operator would.
async fn with_providers(s: &Sample<'_>) -> anyhow::Result<(std::sync::Arc<ManualClock>, LocalStack, Providers)> {
    let sim = VippsSim::start(vipps_merchant()).await?;
    let stripe = StripeSim::start(STRIPE_KEY).await?;
    // The ingress finds the portal once the stack runs.
    let portal_addr: std::sync::Arc<std::sync::Mutex<Option<std::net::SocketAddr>>> = std::sync::Arc::default();
    let found = portal_addr.clone();
    let ingress = Forwarder::start(move || *found.lock().unwrap_or_else(|p| p.into_inner())).await?;
    let secret = sim
        .register_webhook(
            &format!("http://{}/providers/vipps/{}", ingress.addr, s.tenant),
            &[
                "epayments.payment.authorized.v1",
                "epayments.payment.captured.v1",
                "epayments.payment.aborted.v1",
            ],
        )
        .await?;
    let stripe_secret = stripe
        .register_webhook(
            &format!("http://{}/providers/stripe/{}", ingress.addr, s.tenant),
            &["checkout.session.completed", "checkout.session.expired"],
        )
        .await?;
    let m = vipps_merchant();
    let merchant = format!("portal.vipps.{}", s.tenant);
    let account = format!("portal.stripe.{}", s.tenant);
    let settings = [
        (format!("{merchant}.base_url"), sim.url().into()),
        (format!("{merchant}.client_id"), m.client_id.into()),
        (format!("{merchant}.client_secret"), m.client_secret.into()),
        (format!("{merchant}.subscription_key"), m.subscription_key.into()),
        (format!("{merchant}.merchant_serial_number"), m.msn.into()),
        (format!("{merchant}.webhook_secret"), secret.into()),
        (format!("{account}.base_url"), stripe.url().into()),
        (format!("{account}.secret_key"), STRIPE_KEY.into()),
        (format!("{account}.webhook_secret"), stripe_secret.into()),
        (
            "dispatch.pay_link.base_url".to_owned(),
            format!("http://{}/pay/", ingress.addr).into(),
        ),
        ("portal.staff_token".to_owned(), STAFF_TOKEN.into()),
    ];
    let (clock, stack) = nudged_with(s, &settings).await?;
    *portal_addr.lock().unwrap_or_else(|p| p.into_inner()) = stack.rt.admin_addr("portal");
    Ok((
        clock,
        stack,
        Providers {
            vipps: sim,
            stripe,
            ingress,
        },
    ))
}

/// Pays from the page at `path` (through the ingress) with the Vipps MobilePay stand-in; the
/// provider's reference, and the return page's status and body.
async fn pay_through_vipps(
    ingress: &Forwarder,
    path: &str,
    page: &str,
    amount: &str,
    choice: &str,
) -> anyhow::Result<(String, u16, String)> {
    let paid = pay_flow::pay_with_vipps(&format!("http://{}{path}", ingress.addr), page, amount, choice).await?;
    Ok((paid.reference, paid.status, paid.body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paid_with_vipps_from_the_page_the_invoice_is_settled_and_no_reminder_follows() -> anyhow::Result<()> {
    let kid = Box::leak(
        reference::generate(ReferenceKind::KidMod10, "7000125")?
            .value
            .into_boxed_str(),
    );
    let s = Sample {
        invoice_id: "no-portal-vipps-1",
        number: "7000125",
        email: "nora@example.test",
        ..norwegian(kid)
    };
    let (
        clock,
        stack,
        Providers {
            vipps: sim, ingress, ..
        },
    ) = with_providers(&s).await?;
    let path = signed_path(&s);
    let page = page_showing(&stack, &path, "Betal med Vipps").await?;

    let (reference, status, back) = pay_through_vipps(&ingress, &path, &page.body, "", "approve").await?;
    assert_eq!(status, 200, "{back}");
    assert!(
        back.contains("Takk!") && back.contains("kr\u{a0}1\u{a0}250,00"),
        "the debtor is told it is paid: {back}"
    );
    let payment = sim
        .payments()
        .into_iter()
        .find(|p| p.reference == reference)
        .expect("the stand-in has the payment");
    assert_eq!(
        (
            payment.state.as_str(),
            payment.value,
            payment.captured,
            payment.currency.as_str()
        ),
        ("AUTHORIZED", 125_000, 125_000, "NOK"),
        "the whole invoice is authorized and captured"
    );
    status_is(&stack, s.tenant, s.invoice_id, "closed:paid").await?;
    let paid = page_showing(&stack, &path, "Betalt. Takk!").await?;
    assert!(!paid.body.contains("Betal med Vipps"), "no pay button once paid");

    // The webhooks came too (authorized, captured): the payment is on record once however
    // often it was finished.
    eventually("both webhooks taken", WAIT, || async {
        let got = sim.delivered();
        Ok((["AUTHORIZED", "CAPTURED"]
            .iter()
            .all(|n| got.iter().any(|(name, r)| name == n && *r == reference)))
        .then_some(()))
    })
    .await?;
    let received: Vec<PaymentReceived> = stack
        .read::<PaymentReceived>(&stack.topic(&stack.topics().payments))
        .await?
        .into_iter()
        .filter(|p| p.payment_id == format!("vipps:{reference}"))
        .collect();
    assert!(!received.is_empty());
    assert!(
        received.iter().all(|p| p.event_id == received[0].event_id
            && p.amount_minor == 125_000
            && p.reference.as_deref() == Some(kid)
            && p.debtor_id.as_deref() == Some(s.debtor_id().as_str())),
        "one payment, by the invoice's KID: {received:?}"
    );

    // The reminder falls due: it is not sent.
    only_the_nudge_by(&stack, &clock, &s, day(2026, 3, 16)).await?;

    // The creditor's staff see the whole story: the nudge, the payment, the close.
    let timeline_url = format!("http://{}/v1/timeline/{}/{}", ingress.addr, s.tenant, s.invoice_id);
    let staff = reqwest::Client::new();
    assert_eq!(staff.get(&timeline_url).send().await?.status().as_u16(), 401);
    assert_eq!(
        staff
            .get(&timeline_url)
            .bearer_auth("a guess")
            .send()
            .await?
            .status()
            .as_u16(),
        401
    );
    let story: serde_json::Value = eventually("the timeline to show the close", WAIT, || async {
        let story: serde_json::Value = staff
            .get(&timeline_url)
            .bearer_auth(STAFF_TOKEN)
            .send()
            .await?
            .json()
            .await?;
        Ok((story["state"] == "closed:paid").then_some(story))
    })
    .await?;
    let said: Vec<String> = story["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            format!(
                "{} {} {}",
                e["source"].as_str().unwrap_or(""),
                e["what"].as_str().unwrap_or(""),
                e["detail"].as_str().unwrap_or("")
            )
        })
        .collect();
    for want in [
        "journey opened",
        "journey step_sent nudge (open → nudged)",
        "message nudge by email: sent",
        &format!("payment 1250.00 NOK matched payment vipps:{reference}; matched by exact_reference"),
        "journey paid (nudged → closed:paid)",
    ] {
        assert!(
            said.iter().any(|l| l.starts_with(want)),
            "the timeline tells '{want}': {said:#?}"
        );
    }
    let forfall_cli = forfall_e2e::chaos::binaries_dir()?.join("forfall");
    let printed = tokio::process::Command::new(&forfall_cli)
        .args(["timeline", s.tenant, s.invoice_id, "--portal"])
        .arg(format!("http://{}", ingress.addr))
        .env("FORFALL_STAFF_TOKEN", STAFF_TOKEN)
        .output()
        .await?;
    let text = String::from_utf8_lossy(&printed.stdout);
    assert!(printed.status.success(), "{}", String::from_utf8_lossy(&printed.stderr));
    assert!(
        text.starts_with(&format!("invoice {} (7000125) of nordkraft", s.invoice_id)),
        "{text}"
    );
    assert!(text.contains("message  nudge by email: sent"), "{text}");
    println!("{text}");

    // A webhook not signed with the merchant's secret is refused.
    let forged = reqwest::Client::new()
        .post(format!("http://{}/providers/vipps/{}", ingress.addr, s.tenant))
        .header("x-ms-date", "Thu, 05 Mar 2026 08:00:00 GMT")
        .header("x-ms-content-sha256", "bm90IHRoZSBoYXNo")
        .header("authorization", "HMAC-SHA256 SignedHeaders=x-ms-date;host;x-ms-content-sha256&Signature=Zm9yZ2Vk")
        .body(r#"{"msn":"123456","reference":"ff-x","pspReference":"1","name":"CAPTURED","amount":{"currency":"NOK","value":1},"success":true}"#)
        .send()
        .await?;
    assert_eq!(forged.status().as_u16(), 401);
    let metrics = stack.metrics("portal").await?;
    assert_eq!(
        metric_value(
            &metrics,
            "forfall_portal_provider_webhooks_total",
            &["result=\"unsigned\""]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&metrics, "forfall_portal_payments_total", &["result=\"started\""]),
        Some(1.0)
    );
    stack.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_part_payment_is_booked_when_the_debtor_comes_back_though_every_webhook_is_lost_and_a_cancelled_one_changes_nothing()
-> anyhow::Result<()> {
    let kid = Box::leak(
        reference::generate(ReferenceKind::KidMod10, "7000126")?
            .value
            .into_boxed_str(),
    );
    let s = Sample {
        invoice_id: "no-portal-vipps-2",
        number: "7000126",
        email: "per@example.test",
        ..norwegian(kid)
    };
    let (
        _clock,
        stack,
        Providers {
            vipps: sim, ingress, ..
        },
    ) = with_providers(&s).await?;
    sim.lose_webhooks("AUTHORIZED");
    sim.lose_webhooks("CAPTURED");
    let path = signed_path(&s);
    let page = page_showing(&stack, &path, "Betal med Vipps").await?;

    // Cancelled in the app: nothing is charged, nothing is booked.
    let (cancelled, status, back) = pay_through_vipps(&ingress, &path, &page.body, "400,50", "cancel").await?;
    assert_eq!(status, 200);
    assert!(back.contains("Betalingen ble avbrutt"), "{back}");
    // The return page finished the payment before it answered, so this is the whole record.
    let booked = |reference: &str| {
        let id = format!("vipps:{reference}");
        let stack = &stack;
        async move {
            anyhow::Ok(
                stack
                    .read::<PaymentReceived>(&stack.topic(&stack.topics().payments))
                    .await?
                    .into_iter()
                    .filter(|p| p.payment_id == id)
                    .collect::<Vec<_>>(),
            )
        }
    };
    assert!(
        booked(&cancelled).await?.is_empty(),
        "a cancelled payment is not booked"
    );

    // Part of it, with the point phones offer: captured and booked by the return alone.
    let (reference, status, back) = pay_through_vipps(&ingress, &path, &page.body, "400.50", "approve").await?;
    assert_eq!(status, 200);
    assert!(back.contains("kr\u{a0}400,50"), "{back}");
    let part = booked(&reference).await?;
    assert!(
        !part.is_empty() && part.iter().all(|p| p.amount_minor == 40_050),
        "{part:?}"
    );
    let page = page_showing(&stack, &path, "kr\u{a0}849,50").await?;
    assert!(page.body.contains("Betal med Vipps"), "the rest can still be paid");
    assert!(
        sim.delivered()
            .iter()
            .all(|(name, _)| name != "AUTHORIZED" && name != "CAPTURED")
    );

    // More than is owed is refused, with what is owed.
    let (invoice, form_token) = pay_flow::pay_form(&page.body).expect("a pay-now form");
    let too_much = reqwest::Client::new()
        .post(format!("http://{}{path}/checkout", ingress.addr))
        .form(&[
            ("invoice", invoice.as_str()),
            ("form_token", form_token.as_str()),
            ("lang", "nb"),
            ("amount", "5000"),
            ("provider", "vipps"),
        ])
        .send()
        .await?;
    assert_eq!(too_much.status().as_u16(), 422);
    assert!(too_much.text().await?.contains("849,50"));
    assert_eq!(sim.payments().len(), 2, "nothing was started at the provider for it");
    stack.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_debtor_chooses_instalments_or_postpones_from_the_page_within_the_policy_and_the_watcher_grants_it()
-> anyhow::Result<()> {
    let kid = Box::leak(
        reference::generate(ReferenceKind::KidMod10, "7000127")?
            .value
            .into_boxed_str(),
    );
    let s = Sample {
        invoice_id: "no-portal-plan-1",
        number: "7000127",
        email: "liv@example.test",
        ..norwegian(kid)
    };
    let (_clock, stack) = nudged(&s).await?;
    let later_kid = Box::leak(
        reference::generate(ReferenceKind::KidMod10, "7000128")?
            .value
            .into_boxed_str(),
    );
    // Due later: still open, so its due date may move.
    let later = Sample {
        invoice_id: "no-portal-plan-2",
        number: "7000128",
        email: "tor@example.test",
        due: day(2026, 3, 20),
        ..norwegian(later_kid)
    };
    issue_invoice(&stack, &later).await?;
    status_is(&stack, later.tenant, later.invoice_id, "open").await?;
    let addr = stack.rt.admin_addr("portal").expect("the portal serves HTTP");
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;

    // Instalments: the page offers 2 to 6 (the default policy), shows the plan asked for with
    // every date, amount and the reference, and the debtor agrees to it.
    let path = signed_path(&s);
    let page = page_showing(&stack, &path, "Vennlig påminnelse sendt").await?;
    for n in 2..=6 {
        assert!(
            page.body.contains(&format!("<option value=\"{n}\"")),
            "{n} instalments offered"
        );
    }
    assert!(
        !page.body.contains("<option value=\"7\""),
        "no more than the policy allows"
    );
    let plan = get(&stack, &format!("{path}?lang=nb&plan_for={}&plan=3", s.invoice_id)).await?;
    for want in [
        "Din avdragsplan",
        "16.03.2026",
        "16.04.2026",
        "16.05.2026",
        "kr\u{a0}416,67",
        "kr\u{a0}416,66",
        kid,
    ] {
        assert!(plan.body.contains(want), "the plan shows '{want}':\n{}", plan.body);
    }
    let form_token = form_token_in(&plan.body).expect("a form token");
    let agreed = client
        .post(format!("http://{addr}{path}/requests"))
        .form(&[
            ("invoice", s.invoice_id),
            ("form_token", form_token.as_str()),
            ("kind", "instalment_plan"),
            ("count", "3"),
            ("lang", "nb"),
        ])
        .send()
        .await?;
    assert_eq!(agreed.status(), 303);
    status_is(&stack, s.tenant, s.invoice_id, "paused:instalments").await?;
    page_showing(&stack, &path, "Forespørselen din er innvilget").await?;
    let events = stack
        .read::<forfall_platform::records::JourneyEvent>(&stack.topic(&stack.topics().journey_events))
        .await?;
    assert!(
        events
            .iter()
            .any(|e| e.invoice_id == s.invoice_id && e.kind == "instalment_plan_agreed"),
        "{events:?}"
    );
    // A count the page does not offer is not sent.
    let seven = client
        .post(format!("http://{addr}{path}/requests"))
        .form(&[
            ("invoice", s.invoice_id),
            ("form_token", form_token.as_str()),
            ("kind", "instalment_plan"),
            ("count", "7"),
        ])
        .send()
        .await?;
    assert_eq!(seven.status(), 422);

    // Postponing: from the day after the due date to 30 days past it, once.
    let later_path = signed_path(&later);
    let page = page_showing(&stack, &later_path, "Faktura 7000128").await?;
    assert!(
        page.body
            .contains("name=\"postpone_date\" min=\"2026-03-21\" max=\"2026-04-19\""),
        "{}",
        page.body
    );
    let form_token = form_token_in(&page.body).expect("a form token");
    let moved = client
        .post(format!("http://{addr}{later_path}/requests"))
        .form(&[
            ("invoice", later.invoice_id),
            ("form_token", form_token.as_str()),
            ("kind", "postpone"),
            ("postpone_date", "2026-04-19"),
            ("lang", "nb"),
        ])
        .send()
        .await?;
    assert_eq!(moved.status(), 303);
    let page = page_showing(&stack, &later_path, "Forespørselen din er innvilget").await?;
    assert!(
        !page.body.contains("name=\"postpone_date\""),
        "the policy allows one postponement: {}",
        page.body
    );
    let postponed = eventually("the postponement", WAIT, || async {
        Ok(stack
            .read::<forfall_platform::records::JourneyEvent>(&stack.topic(&stack.topics().journey_events))
            .await?
            .into_iter()
            .find(|e| e.invoice_id == later.invoice_id && e.kind == "postponed"))
    })
    .await?;
    assert!(
        postponed
            .reason
            .as_deref()
            .is_some_and(|r| r.ends_with("to 2026-04-19")),
        "{postponed:?}"
    );

    // A promise further ahead than the policy allows (14 days): refused, and the page says why
    // in the debtor's language.
    let promised = client
        .post(format!("http://{addr}{later_path}/requests"))
        .form(&[
            ("invoice", later.invoice_id),
            ("form_token", form_token.as_str()),
            ("kind", "promise_to_pay"),
            ("promise_date", "2026-04-30"),
            ("lang", "nb"),
        ])
        .send()
        .await?;
    assert_eq!(promised.status(), 303);
    page_showing(
        &stack,
        &later_path,
        "Forespørselen din kunne ikke innvilges: datoen er lenger fram enn tillatt",
    )
    .await?;
    // Corrected the same day: a new request, granted.
    let corrected = client
        .post(format!("http://{addr}{later_path}/requests"))
        .form(&[
            ("invoice", later.invoice_id),
            ("form_token", form_token.as_str()),
            ("kind", "promise_to_pay"),
            ("promise_date", "2026-03-10"),
            ("lang", "nb"),
        ])
        .send()
        .await?;
    assert_eq!(corrected.status(), 303);
    status_is(&stack, later.tenant, later.invoice_id, "paused:promise").await?;
    page_showing(&stack, &later_path, "Betalingsløftet ditt er registrert").await?;
    stack.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paid_by_card_through_stripe_checkout_after_a_decline_and_a_turn_back_the_invoice_is_settled_once()
-> anyhow::Result<()> {
    let kid = Box::leak(
        reference::generate(ReferenceKind::KidMod10, "7000129")?
            .value
            .into_boxed_str(),
    );
    let s = Sample {
        invoice_id: "no-portal-card-1",
        number: "7000129",
        email: "siri@example.test",
        ..norwegian(kid)
    };
    let (_clock, stack, Providers { stripe, ingress, .. }) = with_providers(&s).await?;
    let path = signed_path(&s);
    let page = page_showing(&stack, &path, "Betal med kort").await?;
    let browser = pay_flow::no_redirects()?;

    // Turned back on Stripe's page: nothing is charged, nothing is booked.
    let checkout_page = pay_flow::checkout(
        &browser,
        &format!("http://{}{path}", ingress.addr),
        &page.body,
        "",
        "stripe",
    )
    .await?;
    let back = browser.get(format!("{checkout_page}/back")).send().await?;
    assert_eq!(back.status().as_u16(), 303);
    let returned = browser.get(pay_flow::location(&back)).send().await?.text().await?;
    assert!(returned.contains("Betalingen ble avbrutt"), "{returned}");

    // Declined, then paid with the test card.
    let checkout_page = pay_flow::checkout(
        &browser,
        &format!("http://{}{path}", ingress.addr),
        &page.body,
        "",
        "stripe",
    )
    .await?;
    let session_id = checkout_page.rsplit('/').next().unwrap_or_default().to_owned();
    let declined = browser
        .post(format!("{checkout_page}/pay"))
        .form(&[("card", "4000 0000 0000 0002")])
        .send()
        .await?;
    assert_eq!(declined.status().as_u16(), 402);
    let paid = browser
        .post(format!("{checkout_page}/pay"))
        .form(&[("card", "4242 4242 4242 4242")])
        .send()
        .await?;
    assert_eq!(paid.status().as_u16(), 303);
    let success = pay_flow::location(&paid);
    assert!(success.ends_with(&format!("?session_id={session_id}")), "{success}");
    let returned = browser.get(&success).send().await?.text().await?;
    assert!(
        returned.contains("Takk!") && returned.contains("kr\u{a0}1\u{a0}250,00"),
        "{returned}"
    );
    status_is(&stack, s.tenant, s.invoice_id, "closed:paid").await?;
    eventually("the completed session's webhook taken", WAIT, || async {
        Ok(stripe
            .delivered()
            .iter()
            .any(|(kind, id)| kind == "checkout.session.completed" && *id == session_id)
            .then_some(()))
    })
    .await?;
    let sessions = stripe.sessions();
    assert_eq!(sessions.len(), 2);
    let session = sessions.iter().find(|x| x.id == session_id).expect("the paid session");
    assert_eq!(
        (
            session.amount_total,
            session.currency.as_str(),
            session.locale.as_deref()
        ),
        (125_000, "nok", Some("nb"))
    );
    let received: Vec<PaymentReceived> = stack
        .read::<PaymentReceived>(&stack.topic(&stack.topics().payments))
        .await?
        .into_iter()
        .filter(|p| p.payment_id.starts_with("stripe:"))
        .collect();
    assert!(
        !received.is_empty()
            && received.iter().all(|p| p.payment_id == received[0].payment_id
                && p.event_id == received[0].event_id
                && p.amount_minor == 125_000
                && p.reference.as_deref() == Some(kid)),
        "one card payment, by the invoice's KID: {received:?}"
    );
    let settled = page_showing(&stack, &path, "Betalt. Takk!").await?;
    assert!(!settled.body.contains("Betal med kort"));
    stack.shutdown().await;
    Ok(())
}

/// The Swish number of the stand-in's test merchant (the simulator's own, 123…).
const SWISH_NUMBER: &str = "1231181189";

/// A Swedish invoice of `nordkraft`, with its OCR.
fn swedish(invoice_id: &'static str, number: &'static str) -> anyhow::Result<Sample<'static>> {
    let ocr = Box::leak(reference::generate(ReferenceKind::Ocr, number)?.value.into_boxed_str());
    Ok(Sample {
        tenant: "nordkraft",
        invoice_id,
        number,
        due: day(2026, 3, 2),
        amount_minor: 125_000,
        currency: "SEK",
        jurisdiction: "SE",
        email: "sven@example.test",
        reference: ocr,
        language: "sv",
    })
}

/// Swish's stand-in (mutual TLS, with a certificate authority of this test), the ingress that
/// serves the links, and the HTTPS ingress Swish calls back through.
struct SwishSetup {
    pki: TestPki,
    sim: SwishSim,
    ingress: Forwarder,
    callbacks: Forwarder,
}

/// A stack whose creditor takes Swish, with the merchant's certificate and key in files as an
/// operator would mount them.
async fn with_swish(s: &Sample<'_>) -> anyhow::Result<(std::sync::Arc<ManualClock>, LocalStack, SwishSetup)> {
    let pki = TestPki::new()?;
    let sim = SwishSim::start(&pki, SWISH_NUMBER).await?;
    let portal_addr: std::sync::Arc<std::sync::Mutex<Option<std::net::SocketAddr>>> = std::sync::Arc::default();
    let (found, found_too) = (portal_addr.clone(), portal_addr.clone());
    let ingress = Forwarder::start(move || *found.lock().unwrap_or_else(|p| p.into_inner())).await?;
    let callbacks = Forwarder::start_tls(&pki, move || *found_too.lock().unwrap_or_else(|p| p.into_inner())).await?;
    let dir = std::env::temp_dir().join(format!("forfall-swish-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let (certificate, key) = pki.client(SWISH_NUMBER)?.write_to(&dir, "swish-merchant")?;
    let ca = dir.join("swish-ca.pem");
    std::fs::write(&ca, &pki.ca_pem)?;
    let merchant = format!("portal.swish.{}", s.tenant);
    let settings = [
        (format!("{merchant}.base_url"), sim.url().into()),
        (format!("{merchant}.payee_alias"), SWISH_NUMBER.into()),
        (format!("{merchant}.certificate_file"), certificate.into()),
        (format!("{merchant}.key_file"), key.into()),
        (format!("{merchant}.ca_file"), ca.display().to_string().into()),
        (
            format!("{merchant}.callback_url"),
            format!("https://{}/providers/swish/{}", callbacks.addr, s.tenant).into(),
        ),
        (
            "dispatch.pay_link.base_url".to_owned(),
            format!("http://{}/pay/", ingress.addr).into(),
        ),
    ];
    let (clock, stack) = nudged_with(s, &settings).await?;
    *portal_addr.lock().unwrap_or_else(|p| p.into_inner()) = stack.rt.admin_addr("portal");
    Ok((
        clock,
        stack,
        SwishSetup {
            pki,
            sim,
            ingress,
            callbacks,
        },
    ))
}

/// Starts a Swish payment from the page and opens the page the browser is sent to; that
/// page's body and the token in its `swish://` link.
async fn start_swish(ingress: &Forwarder, path: &str) -> anyhow::Result<(String, String, String)> {
    let page_url = format!("http://{}{path}", ingress.addr);
    let browser = pay_flow::no_redirects()?;
    let page = browser.get(&page_url).send().await?.text().await?;
    let next = pay_flow::checkout(&browser, &page_url, &page, "", "swish").await?;
    let shown = browser.get(&next).send().await?;
    anyhow::ensure!(
        shown.status().as_u16() == 200,
        "the Swish page answered {}",
        shown.status()
    );
    let body = shown.text().await?;
    let token = body
        .split_once("swish://paymentrequest?token=")
        .and_then(|(_, rest)| rest.split_once("&amp;callbackurl="))
        .map(|(token, _)| token.to_owned())
        .ok_or_else(|| anyhow::anyhow!("no link to the Swish app on the page: {body}"))?;
    Ok((next, body, token))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paid_with_swish_from_the_page_after_a_decline_and_a_forged_callback_the_invoice_is_settled_once()
-> anyhow::Result<()> {
    let s = swedish("se-portal-swish-1", "7000127")?;
    let (
        clock,
        stack,
        SwishSetup {
            pki,
            sim,
            ingress,
            callbacks,
        },
    ) = with_swish(&s).await?;
    let path = signed_path(&s);
    page_showing(&stack, &path, "Betala med Swish").await?;

    // Declined in the app: the return page says so, nothing is booked.
    let (declined_page, body, token) = start_swish(&ingress, &path).await?;
    assert!(
        body.contains("Betala i Swish-appen")
            && body.contains("<svg")
            && body.contains("Öppna Swish")
            && body.contains("1\u{a0}250,00"),
        "the page opens the app or shows its QR code: {body}"
    );
    let declined_id = sim.decline(&token).await?;
    let back = reqwest::get(&declined_page).await?.text().await?;
    assert!(back.contains("Betalningen avbröts"), "{back}");

    // The request as Swish got it: the whole invoice in kronor, the invoice's OCR, our
    // callback over HTTPS, opened by its token (no payer number asked for).
    let (paid_page, _, token) = start_swish(&ingress, &path).await?;
    let request = sim
        .requests()
        .into_iter()
        .find(|r| r.token.as_deref() == Some(token.as_str()))
        .expect("the stand-in has the request");
    assert_eq!(request.body["amount"], "1250.00");
    assert_eq!(request.body["currency"], "SEK");
    assert_eq!(request.body["payeePaymentReference"], s.reference);
    assert_eq!(request.body["payeeAlias"], SWISH_NUMBER);
    assert!(request.body.get("payerAlias").is_none());
    assert!(
        request.body["message"]
            .as_str()
            .is_some_and(|m| m.contains("Nordkraft AS") && m.contains("7000127")),
        "{}",
        request.body
    );

    // A callback saying "paid" is only a reason to ask Swish: without the payment's
    // identifier it is refused, and with it, Swish (still CREATED) has the last word.
    let outside = pki.client_trusting()?;
    let callback_url = format!("https://{}/providers/swish/{}", callbacks.addr, s.tenant);
    let forged = serde_json::json!({ "id": request.id, "status": "PAID", "amount": 1250.00, "currency": "SEK" });
    let refused = outside
        .post(&callback_url)
        .header("callbackIdentifier", "0000000000000000000000000000000A")
        .json(&forged)
        .send()
        .await?;
    assert_eq!(refused.status().as_u16(), 401);
    let identifier = request.body["callbackIdentifier"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let asked = outside
        .post(&callback_url)
        .header("callbackIdentifier", &identifier)
        .json(&forged)
        .send()
        .await?;
    assert_eq!(asked.status().as_u16(), 200);
    // The portal answers once whatever it books is on the topic: nothing is.
    let booked = stack
        .read::<PaymentReceived>(&stack.topic(&stack.topics().payments))
        .await?
        .into_iter()
        .filter(|p| p.payment_id.starts_with("swish:"))
        .count();
    assert_eq!(booked, 0, "a callback Swish does not confirm books nothing");

    // Approved in the app: Swish calls back, the portal asks, the payment is booked.
    let paid_id = sim.pay(&token).await?;
    eventually("the callback to be taken", WAIT, || async {
        Ok(sim
            .delivered()
            .iter()
            .any(|(id, status)| *id == paid_id && status == "PAID")
            .then_some(()))
    })
    .await?;
    status_is(&stack, s.tenant, s.invoice_id, "closed:paid").await?;
    let back = reqwest::get(&paid_page).await?.text().await?;
    assert!(back.contains("Tack!") && back.contains("1\u{a0}250,00"), "{back}");
    let paid = page_showing(&stack, &path, "Betald. Tack!").await?;
    assert!(!paid.body.contains("Betala med Swish"), "no pay button once paid");

    let reference = |id: &str| format!("swish:ff-{}", id.to_ascii_lowercase());
    let received: Vec<PaymentReceived> = stack
        .read::<PaymentReceived>(&stack.topic(&stack.topics().payments))
        .await?
        .into_iter()
        .filter(|p| p.payment_id.starts_with("swish:"))
        .collect();
    assert!(!received.is_empty());
    assert!(
        received.iter().all(|p| p.payment_id == reference(&paid_id)
            && p.event_id == received[0].event_id
            && p.amount_minor == 125_000
            && p.currency == "SEK"
            && p.reference.as_deref() == Some(s.reference)),
        "one payment, by the invoice's OCR, none for the declined {declined_id}: {received:?}"
    );

    // Later steps of the plan fall due: nothing more is sent.
    only_the_nudge_by(&stack, &clock, &s, day(2026, 6, 1)).await?;

    let metrics = stack.metrics("portal").await?;
    assert_eq!(
        metric_value(
            &metrics,
            "forfall_portal_provider_webhooks_total",
            &["provider=\"swish\"", "result=\"unsigned\""]
        ),
        Some(1.0)
    );
    assert!(
        metric_value(
            &metrics,
            "forfall_portal_payments_total",
            &["provider=\"swish\"", "result=\"started\""]
        ) == Some(2.0)
    );

    // Swish's API takes no request without the merchant's certificate, nor one for another
    // Swish number.
    let put = |client: &reqwest::Client| {
        client
            .put(format!(
                "{}/api/v2/paymentrequests/{}",
                sim.url(),
                "0123456789ABCDEF0123456789ABCDEF"
            ))
            .json(&request.body)
            .send()
    };
    assert!(
        put(&outside).await.is_err(),
        "no handshake without a client certificate"
    );
    let other = pki.client("1239999999")?;
    let imposter = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(pki.ca_pem.as_bytes())?])
        .identity(reqwest::Identity::from_pkcs8_pem(
            other.cert_pem.as_bytes(),
            other.key_pem.as_bytes(),
        )?)
        .build()?;
    assert_eq!(put(&imposter).await?.status().as_u16(), 403);
    stack.shutdown().await;
    Ok(())
}

/// In Chromium, by keyboard: "Betala med Swish", the page that opens the app or shows its QR
/// code (audited, the code read back as the app reads it), the payer approves in the app, and
/// "Jag har godkänt" shows the payment taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_a_real_browser_swish_is_paid_by_keyboard_from_the_page_that_shows_its_qr_code() -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let tools = browser_tools()?;
    let s = swedish("se-portal-swish-2", "7000128")?;
    let (_clock, stack, SwishSetup { sim, ingress, .. }) = with_swish(&s).await?;
    let path = signed_path(&s);
    page_showing(&stack, &path, "Betala med Swish").await?;
    let shots = artifacts();
    std::fs::create_dir_all(&shots)?;
    let mut node = tokio::process::Command::new("node")
        .arg(tools.join("pay-with-swish.mjs"))
        .arg(format!("http://{}{path}", ingress.addr))
        .arg("Betala med Swish")
        .arg("Jag har godkänt: visa resultatet")
        .arg(&shots)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = node.stdin.take().expect("piped");
    let mut lines = tokio::io::BufReader::new(node.stdout.take().expect("piped")).lines();
    let shown: serde_json::Value = match lines.next_line().await? {
        Some(line) => serde_json::from_str(&line)?,
        None => {
            let out = node.wait_with_output().await?;
            anyhow::bail!("the browser stopped: {}", String::from_utf8_lossy(&out.stderr));
        }
    };
    assert_eq!(shown["pay_button"]["reached"], true, "{shown}");
    assert_eq!(shown["heading"], "Betala i Swish-appen", "{shown}");
    let token = shown["app_link"]
        .as_str()
        .and_then(|l| l.strip_prefix("swish://paymentrequest?token="))
        .and_then(|l| l.split_once('&'))
        .map(|(token, _)| token.to_owned())
        .ok_or_else(|| anyhow::anyhow!("no app link: {shown}"))?;
    assert_eq!(
        shown["qr"].as_str(),
        Some(format!("D{token}").as_str()),
        "the QR code is what the Swish app scans"
    );
    let serious = serious_violations(&shown["violations"]);
    assert!(serious.is_empty(), "WCAG 2.1 AA violations: {serious:?}");
    assert!(shown["passes"].as_u64().unwrap_or(0) > 5, "axe ran: {shown}");

    sim.pay(&token).await?;
    status_is(&stack, s.tenant, s.invoice_id, "closed:paid").await?;
    stdin.write_all(b"paid\n").await?;
    let result: serde_json::Value = serde_json::from_str(
        &lines
            .next_line()
            .await?
            .ok_or_else(|| anyhow::anyhow!("the browser stopped after the QR page"))?,
    )?;
    assert_eq!(result["check_link"]["reached"], true, "{result}");
    assert_eq!(result["check_link"]["focus_visible"], true, "{result}");
    assert_eq!(result["heading"], "Tack!", "{result}");
    assert!(
        result["status"].as_str().is_some_and(|t| t.contains("1\u{a0}250,00")),
        "{result}"
    );
    println!(
        "Swish by keyboard; screenshots {} and {}",
        shown["screenshot"], result["screenshot"]
    );
    drop(stdin);
    let _ = node.wait().await;
    stack.shutdown().await;
    Ok(())
}
