//! Dispatch on the dev stack: what messages say in each language and tone, SMS through each
//! provider exactly as documented (against local stand-ins that refuse anything else), the
//! signed webhook, fallback after a bounce or a permanent error, retries, and receipts.

use forfall::devstack::{LocalStack, eventually};
use forfall_devsinks::HttpRecorder;
use forfall_devsinks::sms::{Provider, SmsProviderSim};
use forfall_domain::paylink::{self, LinkKey};
use forfall_e2e::{
    WAIT, at, base_config, consumed_to_end, dispatch_outcomes, flush_stack_state, journey_header, journeys_after,
    nudge_action, outcome_for,
};
use forfall_platform::clock::ManualClock;
use forfall_platform::journey_state;
use forfall_platform::records::{DispatchOutcome, DispatchStatus, JourneyAction, derived_id};
use forfall_platform::redis_store::Keys;

const TENANT: &str = "acme-energy";

struct Action<'a> {
    invoice: &'a str,
    number: &'a str,
    language: &'a str,
    tone: &'a str,
    step_index: i32,
    channels: &'a [&'a str],
    fee_minor: i64,
    pay_by: Option<i32>,
}

impl Action<'_> {
    fn build(&self, email: &str, phone: &str) -> JourneyAction {
        JourneyAction {
            action_id: derived_id("action", &[TENANT, self.invoice, self.tone]),
            invoice_number: self.number.into(),
            step: format!("{}-{}", self.tone, self.step_index),
            step_index: self.step_index,
            tone: self.tone.into(),
            channels: self.channels.iter().map(|c| (*c).to_owned()).collect(),
            open_minor: 123_450 + self.fee_minor,
            fee_minor: self.fee_minor,
            pay_by: self.pay_by,
            phone: Some(phone.into()),
            language: Some(self.language.into()),
            ..nudge_action(TENANT, self.invoice, email)
        }
    }
}

async fn stack_with_profile() -> anyhow::Result<LocalStack> {
    let mut stack = LocalStack::start(base_config(), ManualClock::new(at("2026-09-04T07:00:00Z"))).await?;
    stack.set("dispatch.tenants.acme-energy.name", "Acme Energi A/S");
    stack.set(
        "dispatch.tenants.acme-energy.bank_account",
        "Reg. 1234 konto 0001234567",
    );
    stack.set("dispatch.tenants.acme-energy.contact", "+45 70 10 20 30");
    stack.set("dispatch.retry.first_ms", 20);
    Ok(stack)
}

/// Lets the last look pass: the journey as the watcher leaves it after emitting the step.
async fn journeys_open(stack: &LocalStack, actions: &[JourneyAction]) -> anyhow::Result<()> {
    journeys_after(
        stack,
        actions,
        |_, a| if a.step_index == 0 { "nudged" } else { "reminded-1" },
    )
    .await
}

async fn send(stack: &LocalStack, action: &JourneyAction) -> anyhow::Result<()> {
    journeys_open(stack, std::slice::from_ref(action)).await?;
    stack
        .produce(&stack.topic(&stack.topics().journey_actions), &action.debtor_id, action)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_language_and_tone_arrives_with_what_the_law_requires() -> anyhow::Result<()> {
    let stack = stack_with_profile().await?;
    stack.start_service("dispatch");
    let languages = ["da", "nb", "sv", "fi", "en"];
    let tones = [("nudge", 0, 0), ("reminder", 1, 10_000), ("collection_warning", 2, 0)];
    let mut sent = Vec::new();
    for language in languages {
        for (tone, step_index, fee) in tones {
            let invoice: &'static str = Box::leak(format!("inv-{language}-{tone}").into_boxed_str());
            let email = format!("{language}.{tone}@example.test");
            let action = Action {
                invoice,
                number: "F-2026-0815",
                language,
                tone,
                step_index,
                channels: &["email"],
                fee_minor: fee,
                pay_by: (step_index > 0).then_some(20_714), // 2026-09-18
            }
            .build(&email, "+4520304050");
            send(&stack, &action).await?;
            sent.push((language, tone, email, action));
        }
    }
    eventually("every message", WAIT, || async {
        Ok((stack.mail.messages().len() >= sent.len()).then_some(()))
    })
    .await?;
    let key = LinkKey {
        id: "dev".into(),
        secret: b"forfall-dev-pay-link-secret".to_vec(),
    };
    // Expected words: (language, tone) → a phrase of the subject and one of the body.
    let expected = |language: &str, tone: &str| -> (&str, &str) {
        match (language, tone) {
            ("da", "nudge") => ("forfalder", "En venlig påmindelse"),
            ("da", "reminder") => ("Påmindelse", "Vi har endnu ikke modtaget betaling"),
            ("da", _) => ("Inkassovarsel", "sender vi kravet til inkasso"),
            ("nb", "nudge") => ("forfaller", "En vennlig påminnelse"),
            ("nb", "reminder") => ("Påminnelse", "Vi har ennå ikke mottatt betaling"),
            ("nb", _) => ("Inkassovarsel", "blir kravet sendt til inkasso"),
            ("sv", "nudge") => ("förfaller", "En vänlig påminnelse"),
            ("sv", "reminder") => ("Påminnelse", "Vi har ännu inte fått betalning"),
            ("sv", _) => ("Inkassovarning", "lämnas fordran till inkasso"),
            ("fi", "nudge") => ("erääntyy", "Ystävällinen muistutus"),
            ("fi", "reminder") => ("Maksumuistutus", "Emme ole vielä saaneet maksua"),
            ("fi", _) => ("Perintävaroitus", "saatava siirretään perintään"),
            (_, "nudge") => ("is due", "A friendly reminder"),
            (_, "reminder") => ("Reminder", "We have not yet received payment"),
            _ => ("Collection warning", "passed to a debt collection agency"),
        }
    };
    for (language, tone, email, action) in &sent {
        let mails = stack.mail.to(email);
        assert_eq!(mails.len(), 1, "{email}: one message");
        let mail = &mails[0];
        let subject = mail.header("Subject").unwrap_or_default();
        let text = mail.body();
        let html = mail.html().unwrap_or_default();
        let (in_subject, in_body) = expected(language, tone);
        assert!(subject.contains(in_subject), "{language}/{tone} subject: {subject}");
        assert!(
            subject.contains("F-2026-0815"),
            "{language}/{tone} subject names the invoice"
        );
        assert!(text.contains(in_body), "{language}/{tone} text:\n{text}");
        assert!(
            html.contains(in_body),
            "{language}/{tone} has an HTML part with the same words"
        );
        // What the claim is for, the amount (locale-formatted), the due date, the payment details.
        let amount = if *language == "en" {
            "DKK\u{a0}1,234.50"
        } else if *language == "da" {
            "1.234,50\u{a0}kr."
        } else {
            "1\u{a0}234,50"
        };
        for needle in [
            "El, august 2026",
            amount,
            "Reg. 1234 konto 0001234567",
            "+71<000000001234567+85937346<",
            "Acme Energi A/S",
            "Karen Blixen",
        ] {
            assert!(
                text.contains(needle),
                "{language}/{tone} text lacks {needle:?}:\n{text}"
            );
        }
        if *tone == "reminder" {
            let fee = if *language == "da" { "100,00\u{a0}kr." } else { "100" };
            assert!(text.contains(fee), "{language}/{tone} shows the fee:\n{text}");
        }
        if *tone != "nudge" {
            let deadline = match *language {
                "sv" => "2026-09-18",
                "fi" => "18.9.2026",
                "en" => "18 September 2026",
                _ => "18.09.2026",
            };
            assert!(text.contains(deadline), "{language}/{tone} gives the deadline:\n{text}");
        }
        // The pay link verifies and is scoped to this debtor and invoice.
        let link = text
            .split_whitespace()
            .find(|w| w.starts_with("http://127.0.0.1:9606/pay/"))
            .unwrap_or_else(|| panic!("{language}/{tone}: no pay link in\n{text}"));
        let claims = paylink::verify(
            std::slice::from_ref(&key),
            link.trim_start_matches("http://127.0.0.1:9606/pay/"),
            at("2026-09-05T00:00:00Z").timestamp(),
        )?;
        assert_eq!(claims.debtor_id, action.debtor_id);
        assert_eq!(claims.invoices, vec![action.invoice_id.clone()]);
        assert_eq!(
            mail.header("Message-ID").unwrap_or_default(),
            format!("<{}.email@forfall.invalid>", action.action_id)
        );
    }
    stack.shutdown().await;
    Ok(())
}

struct Sims {
    gatewayapi: SmsProviderSim,
    elks: SmsProviderSim,
    twilio: SmsProviderSim,
}

async fn with_sms_providers(stack: &mut LocalStack) -> anyhow::Result<Sims> {
    let sims = Sims {
        gatewayapi: SmsProviderSim::start(Provider::GatewayApi, "", "gw-token-1").await?,
        elks: SmsProviderSim::start(Provider::Elks46, "u1234abcd", "elks-password").await?,
        twilio: SmsProviderSim::start(
            Provider::Twilio,
            "AC0123456789abcdef0123456789abcdef",
            "twilio-auth-token",
        )
        .await?,
    };
    stack.set("dispatch.sms.gatewayapi.url", sims.gatewayapi.url());
    stack.set("dispatch.sms.gatewayapi.token", "gw-token-1");
    stack.set("dispatch.sms.gatewayapi.sender", "AcmeEnergi");
    stack.set("dispatch.sms.46elks.url", sims.elks.url());
    stack.set("dispatch.sms.46elks.username", "u1234abcd");
    stack.set("dispatch.sms.46elks.password", "elks-password");
    stack.set("dispatch.sms.46elks.sender", "AcmeEnergi");
    stack.set("dispatch.sms.twilio.url", sims.twilio.url());
    stack.set("dispatch.sms.twilio.username", "AC0123456789abcdef0123456789abcdef");
    stack.set("dispatch.sms.twilio.password", "twilio-auth-token");
    stack.set("dispatch.sms.twilio.sender", "+4591000000");
    stack.set("dispatch.sms.provider", "gatewayapi");
    stack.set("dispatch.receipts.gatewayapi_secret", "gw-webhook-secret");
    Ok(sims)
}

fn sms_action(invoice: &'static str, language: &'static str, channels: &'static [&'static str]) -> Action<'static> {
    Action {
        invoice,
        number: "F-77",
        language,
        tone: "reminder",
        step_index: 1,
        channels,
        fee_minor: 0,
        pay_by: Some(20_714),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_sms_provider_gets_exactly_what_its_api_documents() -> anyhow::Result<()> {
    let mut stack = stack_with_profile().await?;
    let sims = with_sms_providers(&mut stack).await?;
    // GatewayAPI is the default provider; a tenant may name another (below).
    stack.start_service("dispatch");
    let gw = sms_action("sms-gw", "da", &["sms"]).build("gw@example.test", "+4520304050");
    send(&stack, &gw).await?;
    let sent = outcome_for(&stack, &gw, "sms", DispatchStatus::Sent).await?;
    let accepted = sims.gatewayapi.accepted();
    assert_eq!(accepted.len(), 1, "refused: {:?}", sims.gatewayapi.refused());
    let sms = &accepted[0];
    assert_eq!(sms.to, "4520304050", "msisdn without '+'");
    assert_eq!(sms.from, "AcmeEnergi");
    assert!(sms.content_type.starts_with("application/json"));
    assert_eq!(sms.userref.as_deref(), Some(format!("{}:sms", gw.action_id).as_str()));
    assert_eq!(sms.encoding, None, "Danish fits GSM-7: no UCS2");
    assert!(
        sms.text
            .starts_with("Påmindelse fra Acme Energi A/S: 1.234,50 kr. er ikke betalt."),
        "{}",
        sms.text
    );
    assert!(sms.text.contains("http://127.0.0.1:9606/pay/v1.dev."), "{}", sms.text);
    assert!(
        sms.callback_url
            .as_deref()
            .is_some_and(|u| u.ends_with("/v1/receipts/gatewayapi")),
        "{:?}",
        sms.callback_url
    );
    assert_eq!(sent.provider_message_id.as_deref(), Some(sms.id.as_str()));
    stack.shutdown().await;

    // The same action text through 46elks and Twilio, chosen per tenant.
    for provider in ["46elks", "twilio"] {
        let mut stack = stack_with_profile().await?;
        let sims = with_sms_providers(&mut stack).await?;
        let sim = if provider == "46elks" { &sims.elks } else { &sims.twilio };
        stack.set("dispatch.tenants.acme-energy.sms_provider", provider);
        stack.start_service("dispatch");
        let invoice: &'static str = Box::leak(format!("sms-{provider}").into_boxed_str());
        let action = sms_action(invoice, "sv", &["sms"]).build("se@example.test", "+46701740605");
        send(&stack, &action).await?;
        let sent = outcome_for(&stack, &action, "sms", DispatchStatus::Sent).await?;
        let accepted = sim.accepted();
        assert_eq!(accepted.len(), 1, "{provider} refused: {:?}", sim.refused());
        let sms = &accepted[0];
        assert_eq!(sms.to, "+46701740605", "{provider}: E.164 with '+'");
        assert!(sms.content_type.starts_with("application/x-www-form-urlencoded"));
        assert!(
            sms.text
                .starts_with("Påminnelse från Acme Energi A/S: 1 234,50 DKK är obetalt."),
            "{}",
            sms.text
        );
        assert_eq!(sent.provider_message_id.as_deref(), Some(sms.id.as_str()));
        let callback = sms.callback_url.clone().unwrap_or_default();
        match provider {
            "46elks" => {
                assert_eq!(sms.from, "AcmeEnergi");
                assert!(sms.id.starts_with('s'));
                assert!(callback.contains("/v1/receipts/46elks?token="), "{callback}");
            }
            _ => {
                assert_eq!(sms.from, "+4591000000");
                assert!(sms.id.starts_with("SM"));
                assert!(callback.ends_with("/v1/receipts/twilio"), "{callback}");
            }
        }
        stack.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bounced_sms_falls_back_to_email_and_receipts_become_outcomes() -> anyhow::Result<()> {
    let mut stack = stack_with_profile().await?;
    let sims = with_sms_providers(&mut stack).await?;
    stack.start_service("dispatch");
    let bounced = sms_action("bounce-1", "da", &["sms", "email"]).build("b1@example.test", "+4520000001");
    let delivered = sms_action("deliver-1", "da", &["sms", "email"]).build("d1@example.test", "+4520000002");
    send(&stack, &bounced).await?;
    send(&stack, &delivered).await?;
    let first = outcome_for(&stack, &bounced, "sms", DispatchStatus::Sent).await?;
    let second = outcome_for(&stack, &delivered, "sms", DispatchStatus::Sent).await?;
    assert!(stack.mail.messages().is_empty(), "the SMS went out: no e-mail yet");

    // A forged receipt is refused and changes nothing.
    let forged = sims
        .gatewayapi
        .send_receipt(
            first.provider_message_id.as_deref().unwrap_or(""),
            "UNDELIVERABLE",
            "not-the-secret",
        )
        .await?;
    assert_eq!(forged, 401);

    let status = sims
        .gatewayapi
        .send_receipt(
            first.provider_message_id.as_deref().unwrap_or(""),
            "UNDELIVERABLE",
            "gw-webhook-secret",
        )
        .await?;
    assert_eq!(status, 200);
    let bounce = outcome_for(&stack, &bounced, "sms", DispatchStatus::Bounced).await?;
    assert!(
        bounce.reason.as_deref().unwrap_or("").contains("UNDELIVERABLE"),
        "{:?}",
        bounce.reason
    );
    outcome_for(&stack, &bounced, "email", DispatchStatus::Sent).await?;
    assert_eq!(stack.mail.to("b1@example.test").len(), 1, "the fallback e-mail");

    let status = sims
        .gatewayapi
        .send_receipt(
            second.provider_message_id.as_deref().unwrap_or(""),
            "DELIVERED",
            "gw-webhook-secret",
        )
        .await?;
    assert_eq!(status, 200);
    outcome_for(&stack, &delivered, "sms", DispatchStatus::Delivered).await?;
    // The receipt's answer came after its outputs were produced: a sentinel for the debtor now
    // is handled after any fallback action.
    forfall_e2e::dispatch_sentinel(&stack, TENANT, &delivered.debtor_id).await?;
    assert!(stack.mail.to("d1@example.test").is_empty(), "delivered: no fallback");
    assert_eq!(sims.gatewayapi.accepted().len(), 2, "each SMS sent once");
    let all = dispatch_outcomes(&stack).await?;
    assert_eq!(
        all.iter().filter(|o| o.status == DispatchStatus::Bounced).count(),
        1,
        "the forged receipt produced nothing"
    );
    stack.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transient_provider_errors_are_retried_and_permanent_ones_fall_back() -> anyhow::Result<()> {
    let mut stack = stack_with_profile().await?;
    let sims = with_sms_providers(&mut stack).await?;
    stack.set("dispatch.tenants.acme-energy.sms_provider", "twilio");
    stack.start_service("dispatch");
    // Twilio rate-limits twice (429: the message was not taken), then takes it. A 503 after the
    // request was written is an unknown delivery, never retried (see never_twice.rs).
    sims.twilio.answer_next(&[
        (429, r#"{"code":20429,"message":"Too Many Requests","status":429}"#),
        (429, r#"{"code":20429,"message":"Too Many Requests","status":429}"#),
    ]);
    let retried = sms_action("retry-1", "en", &["sms", "email"]).build("r1@example.test", "+4520000003");
    send(&stack, &retried).await?;
    outcome_for(&stack, &retried, "sms", DispatchStatus::Sent).await?;
    assert_eq!(sims.twilio.accepted().len(), 1);
    // Then it refuses a number for good (21211): the e-mail is the fallback.
    sims.twilio.answer_next(&[(
        400,
        r#"{"code":21211,"message":"The 'To' number +4520000004 is not a valid phone number.","more_info":"https://www.twilio.com/docs/errors/21211","status":400}"#,
    )]);
    let refused = sms_action("refused-1", "en", &["sms", "email"]).build("r2@example.test", "+4520000004");
    send(&stack, &refused).await?;
    let failed = outcome_for(&stack, &refused, "sms", DispatchStatus::Failed).await?;
    let reason = failed.reason.unwrap_or_default();
    assert!(
        reason.contains("21211") && reason.contains("not a valid phone number"),
        "{reason}"
    );
    outcome_for(&stack, &refused, "email", DispatchStatus::Sent).await?;
    assert_eq!(stack.mail.to("r2@example.test").len(), 1);
    assert_eq!(
        stack.mail.to("r1@example.test").len(),
        0,
        "the retried SMS needed no fallback"
    );
    stack.shutdown().await;
    Ok(())
}

/// A recipient the SMTP server refuses (550): the e-mail fails for good with the server's
/// reason, and its claim says so (a redelivery finds it final and sends nothing); nothing
/// reached the server, and the next message goes out as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recipient_the_mail_server_refuses_fails_for_good_and_its_claim_says_so() -> anyhow::Result<()> {
    let stack = stack_with_profile().await?;
    stack.start_service("dispatch");
    let nudge = |invoice| Action {
        invoice,
        number: invoice,
        language: "en",
        tone: "nudge",
        step_index: 0,
        channels: &["email"],
        fee_minor: 0,
        pay_by: None,
    };
    let nobody = format!("nobody@{}", forfall_devsinks::NO_SUCH_MAILBOX_DOMAIN);
    let refused = nudge("no-mailbox-1").build(&nobody, "+4520000011");
    send(&stack, &refused).await?;
    let failed = outcome_for(&stack, &refused, "email", DispatchStatus::Failed).await?;
    let reason = failed.reason.unwrap_or_default();
    assert!(
        reason.contains("refused") && reason.contains("Mailbox unavailable"),
        "{reason}"
    );
    let keys = Keys::new(&stack.rt.config.redis.key_prefix);
    let claim: Option<String> = redis::cmd("GET")
        .arg(forfall_dispatch::claim_key(&keys, &refused.action_id, "email"))
        .query_async(&mut stack.redis())
        .await?;
    assert!(
        claim.as_deref().is_some_and(|c| c.starts_with("failed:")),
        "the claim of a refused message: {claim:?}"
    );
    let fine = nudge("no-mailbox-2").build("fine@example.test", "+4520000012");
    send(&stack, &fine).await?;
    outcome_for(&stack, &fine, "email", DispatchStatus::Sent).await?;
    assert!(stack.mail.to(&nobody).is_empty());
    assert_eq!(stack.mail.to("fine@example.test").len(), 1);
    stack.shutdown().await;
    Ok(())
}

/// Acme's webhook channel to a recording receiver (answering 200), the shared secret
/// `tenant-shared-secret`; dispatch not started yet.
async fn stack_with_webhook() -> anyhow::Result<(LocalStack, HttpRecorder)> {
    let mut stack = stack_with_profile().await?;
    let hook = HttpRecorder::start().await?;
    hook.answer_with(&[200]);
    stack.set(
        "dispatch.tenants.acme-energy.webhook_url",
        hook.url("/forfall/messages"),
    );
    stack.set("dispatch.webhook.secret", "tenant-shared-secret");
    Ok((stack, hook))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_webhook_channel_signs_what_it_sends() -> anyhow::Result<()> {
    let (stack, hook) = stack_with_webhook().await?;
    stack.start_service("dispatch");
    let action = sms_action("hook-1", "nb", &["webhook"]).build("w@example.test", "+4790000001");
    send(&stack, &action).await?;
    outcome_for(&stack, &action, "webhook", DispatchStatus::Sent).await?;
    let requests = hook.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.path, "/forfall/messages");
    assert_eq!(
        request.header("idempotency-key"),
        Some(format!("{}:webhook", action.action_id).as_str())
    );
    let signature = request.header("forfall-signature").unwrap_or_default();
    let now = at("2026-09-04T07:00:00Z").timestamp();
    assert!(forfall_dispatch::channels::verify_webhook_signature(
        "tenant-shared-secret",
        signature,
        &request.body,
        now,
        300
    ));
    assert!(!forfall_dispatch::channels::verify_webhook_signature(
        "another-secret",
        signature,
        &request.body,
        now,
        300
    ));
    let body = request.json();
    assert_eq!(body["action_id"], action.action_id.as_str());
    assert_eq!(body["invoice_ids"], serde_json::json!(["hook-1"]));
    assert!(
        body["subject"].as_str().unwrap_or("").starts_with("Påminnelse"),
        "{body}"
    );
    assert!(body["pay_link"].as_str().unwrap_or("").contains("/pay/v1.dev."));
    stack.shutdown().await;
    Ok(())
}

/// A tenant with its own webhook secret: its messages are signed with it, not the shared one,
/// and its system's receipts count only on its own route, signed with it. The shared secret
/// (another tenant's system holds it) can speak of none of its messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenants_own_webhook_secret_signs_its_messages_and_alone_verifies_its_receipts() -> anyhow::Result<()> {
    use forfall_dispatch::channels::{verify_webhook_signature, webhook_signature};
    let (mut stack, hook) = stack_with_webhook().await?;
    stack.set("dispatch.tenants.acme-energy.webhook_secret", "acme-own-secret");
    stack.set("dispatch.tenants.nordkraft.webhook_url", hook.url("/nordkraft"));
    stack.start_service("dispatch");
    let action = sms_action("hook-own", "da", &["webhook"]).build("own@example.test", "+4520000021");
    send(&stack, &action).await?;
    let sent = outcome_for(&stack, &action, "webhook", DispatchStatus::Sent).await?;
    let requests = hook.requests();
    assert_eq!(requests.len(), 1);
    let signature = requests[0].header("forfall-signature").unwrap_or_default();
    let now = at("2026-09-04T07:00:00Z").timestamp();
    assert!(verify_webhook_signature(
        "acme-own-secret",
        signature,
        &requests[0].body,
        now,
        300
    ));
    assert!(!verify_webhook_signature(
        "tenant-shared-secret",
        signature,
        &requests[0].body,
        now,
        300
    ));

    let message_id = sent.provider_message_id.clone().unwrap_or_default();
    let receipt = serde_json::to_vec(&serde_json::json!({"message_id": message_id, "status": "delivered"}))?;
    let dispatch = stack
        .rt
        .admin_addr("dispatch")
        .ok_or_else(|| anyhow::anyhow!("dispatch serves HTTP"))?;
    let http = reqwest::Client::new();
    let post = |path: &str, secret: &str| {
        http.post(format!("http://{dispatch}{path}"))
            .header("Forfall-Signature", webhook_signature(secret, now, &receipt))
            .body(receipt.clone())
            .send()
    };
    // The shared secret on the shared route: not a message it may speak of.
    assert_eq!(
        post("/v1/receipts/webhook", "tenant-shared-secret")
            .await?
            .status()
            .as_u16(),
        404
    );
    // Acme's secret on another tenant's route: that route verifies with the other's secret.
    assert_eq!(
        post("/v1/receipts/webhook/nordkraft", "acme-own-secret")
            .await?
            .status()
            .as_u16(),
        401
    );
    // The shared secret on the other tenant's route verifies, but the message is not its.
    assert_eq!(
        post("/v1/receipts/webhook/nordkraft", "tenant-shared-secret")
            .await?
            .status()
            .as_u16(),
        404
    );
    assert_eq!(
        post("/v1/receipts/webhook/acme-energy", "tenant-shared-secret")
            .await?
            .status()
            .as_u16(),
        401
    );
    assert!(
        !dispatch_outcomes(&stack)
            .await?
            .iter()
            .any(|o| o.status == DispatchStatus::Delivered),
        "nothing recorded from a receipt its tenant did not sign"
    );
    let taken = post("/v1/receipts/webhook/acme-energy", "acme-own-secret").await?;
    assert_eq!(taken.status().as_u16(), 200, "{}", taken.text().await?);
    outcome_for(&stack, &action, "webhook", DispatchStatus::Delivered).await?;
    stack.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_due_outside_contact_hours_waits_for_the_next_allowed_moment() -> anyhow::Result<()> {
    // Friday 4 September 2026, 21:30 in Copenhagen: after the weekday window (08:00–21:00).
    let clock = ManualClock::new(at("2026-09-04T19:30:00Z"));
    let mut stack = LocalStack::start(base_config(), clock.clone()).await?;
    stack.set("dispatch.deferred_poll_ms", 100);
    stack.start_service("dispatch");
    let late = sms_action("late-1", "da", &["email"]).build("late@example.test", "+4520000009");
    let paid = sms_action("paid-overnight", "da", &["email"]).build("paid@example.test", "+4520000010");
    send(&stack, &late).await?;
    send(&stack, &paid).await?;
    eventually("both held", WAIT, || async {
        let m = stack.metrics("dispatch").await.unwrap_or_default();
        Ok(
            (forfall_e2e::metric_value(&m, "forfall_dispatch_deferred_total", &["jurisdiction=\"DK\""]) == Some(2.0))
                .then_some(()),
        )
    })
    .await?;
    // Saturday 08:59: still outside (Saturdays 09:00–15:00). One invoice is paid overnight.
    let keys = Keys::new(&stack.rt.config.redis.key_prefix);
    let _: () = journey_header(&keys, TENANT, "paid-overnight", "closed:paid", None)
        .query_async(&mut stack.redis())
        .await?;
    clock.set(at("2026-09-05T06:59:00Z"));
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(stack.mail.messages().is_empty(), "nothing before the window opens");
    assert!(dispatch_outcomes(&stack).await?.is_empty(), "held, not decided");
    clock.set(at("2026-09-05T07:00:00Z"));
    outcome_for(&stack, &late, "email", DispatchStatus::Sent).await?;
    let suppressed = outcome_for(&stack, &paid, "email", DispatchStatus::Suppressed).await?;
    assert_eq!(suppressed.reason.as_deref(), Some("invoice is closed:paid"));
    assert_eq!(stack.mail.to("late@example.test").len(), 1);
    assert!(
        stack.mail.to("paid@example.test").is_empty(),
        "paid overnight: never sent"
    );
    stack.shutdown().await;
    Ok(())
}

/// Payments landing while dispatch works through a backlog of due messages. A payment becomes
/// the journey's `closed:paid`, or first the watcher's contact stop for it (the watcher's
/// writes, done here directly so that their moment is known); the last look reads exactly
/// that. Dispatch looks last after the SMTP server has asked for the message (its 354), so a
/// message the server asked for after the payment was written must never have been sent:
/// no timing margin, whatever the machine's load.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn payments_around_send_time_never_let_a_message_out_after_the_last_look() -> anyhow::Result<()> {
    use rand::seq::SliceRandom;
    use std::time::{Duration, Instant};
    // Wednesday 09:00 in Copenhagen: inside contact hours.
    let mut stack = stack_with_profile().await?;
    stack.set("dispatch.concurrency", 16);
    let n = 1000;
    let actions: Vec<JourneyAction> = (0..n)
        .map(|i| {
            let invoice: &'static str = Box::leak(format!("race-{i}").into_boxed_str());
            sms_action(invoice, "da", &["email"]).build(&format!("race{i}@example.test"), "+4520000000")
        })
        .collect();
    journeys_open(&stack, &actions).await?;
    let topic = stack.topic(&stack.topics().journey_actions);
    for chunk in actions.chunks(250) {
        futures::future::try_join_all(chunk.iter().map(|a| stack.produce(&topic, &a.debtor_id, a))).await?;
    }
    let mut to_pay: Vec<usize> = (0..n).filter(|i| i % 2 == 0).collect();
    to_pay.shuffle(&mut rand::rng());
    stack.start_service("dispatch");
    stack.wait_ready(&["dispatch"], WAIT).await?;
    // Payments arrive one by one while the backlog drains.
    let keys = Keys::new(&stack.rt.config.redis.key_prefix);
    let mut redis = stack.redis();
    let mut paid_at: std::collections::HashMap<String, Instant> = std::collections::HashMap::new();
    for (n, i) in to_pay.into_iter().enumerate() {
        let invoice = &actions[i].invoice_id;
        let write = if n % 2 == 0 {
            journey_header(&keys, TENANT, invoice, "closed:paid", None)
        } else {
            // Decided, not yet written: the journey still says what it said (version 1).
            let stop = journey_state::stop_location(&keys, TENANT, invoice);
            let mut cmd = redis::cmd("HSET");
            cmd.arg(stop.key)
                .arg(stop.field)
                .arg(journey_state::encode_stop(2, "closed:paid"));
            cmd
        };
        let _: () = write.query_async(&mut redis).await?;
        paid_at.insert(invoice.clone(), Instant::now());
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
    let decided = eventually("every action decided", WAIT, || async {
        let outcomes = dispatch_outcomes(&stack).await?;
        Ok((outcomes.len() >= n).then_some(outcomes))
    })
    .await?;
    let mails = stack.mail.messages();
    let mut suppressed_paid = 0;
    let mut sent_paid = 0;
    let mut close_calls = 0;
    for a in &actions {
        let mine: Vec<&DispatchOutcome> = decided.iter().filter(|o| o.action_id == a.action_id).collect();
        assert_eq!(mine.len(), 1, "one outcome per action: {mine:?}");
        let mail: Vec<_> = mails
            .iter()
            .filter(|m| m.to.iter().any(|t| a.email.as_deref() == Some(t.as_str())))
            .collect();
        match mine[0].status {
            DispatchStatus::Suppressed => {
                assert!(mail.is_empty(), "suppressed but mailed");
                assert!(paid_at.contains_key(&a.invoice_id), "only paid invoices are suppressed");
                suppressed_paid += 1;
            }
            DispatchStatus::Sent => {
                assert_eq!(mail.len(), 1);
                if let Some(paid) = paid_at.get(&a.invoice_id) {
                    sent_paid += 1;
                    let asked = mail[0].asked_at;
                    assert!(
                        asked <= *paid,
                        "{} was paid {:?} before the server asked for its message, and it was sent",
                        a.invoice_id,
                        asked.duration_since(*paid)
                    );
                    if paid.duration_since(asked) < Duration::from_millis(50) {
                        close_calls += 1;
                    }
                }
            }
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    println!(
        "{n} actions, {} paid while sending: {suppressed_paid} suppressed, {sent_paid} sent before their payment ({close_calls} within 50 ms of it)",
        paid_at.len()
    );
    assert!(suppressed_paid > 0 && sent_paid > 0, "the payments did race the sends");
    stack.shutdown().await;
    Ok(())
}

/// The debtor's channel preferences travel with the invoice: the plan says which channels a
/// step may use, the debtor which comes first and which not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_debtors_channel_preferences_order_the_plans_channels() -> anyhow::Result<()> {
    use forfall_e2e::{danish, day, status_is};
    let clock = ManualClock::new(at("2026-09-01T06:00:00Z"));
    let mut stack = LocalStack::start(base_config(), clock.clone()).await?;
    let sims = with_sms_providers(&mut stack).await?;
    let policy = std::env::temp_dir().join(format!("{}-channels.toml", stack.prefix));
    std::fs::write(
        &policy,
        r#"
version = "e2e-channels-1"
# The agency sends the warning before collection where the law asks for one (see README).
[handoff]
agency_sends_warning = ["DK", "NO"]

[[segment]]
name = "all"
plan = "both"
[plan.both]
step = [
  { name = "nudge", offset_banking_days = 0, channels = ["email", "sms"], tone = "nudge" },
  { name = "handoff", offset_banking_days = 20, handoff = true },
]
"#,
    )?;
    stack.set("watcher.policy_file", policy.to_string_lossy());
    for s in ["ingest", "watcher", "dispatch"] {
        stack.start_service(s);
    }
    let billing = stack.topic(&stack.topics().billing_invoice_events);
    let due = day(2026, 9, 2);
    let cases: [(&str, &str, &[&str], &[&str]); 4] = [
        ("pref-none", "none@example.test", &[], &[]),
        ("pref-sms", "sms@example.test", &["sms"], &[]),
        ("decl-email", "decl@example.test", &[], &["email"]),
        ("decl-all", "all@example.test", &["email"], &["email", "sms"]),
    ];
    for (i, (id, email, preferred, declined)) in cases.iter().enumerate() {
        let mut issued = danish(id, id, due, email).issued();
        issued.phone = Some(format!("+452000010{i}"));
        issued.preferred_channels = preferred.iter().map(|c| (*c).to_owned()).collect();
        issued.declined_channels = declined.iter().map(|c| (*c).to_owned()).collect();
        stack.produce(&billing, &issued.debtor_id, &issued).await?;
    }
    for (id, ..) in &cases {
        status_is(&stack, "acme-energy", id, "open").await?;
    }
    clock.set(at("2026-09-02T07:00:01Z")); // 09:00 in Copenhagen, the due date
    let outcome = |invoice: &'static str, channel: &'static str, status: DispatchStatus| {
        let stack = &stack;
        async move {
            eventually(&format!("{invoice} {channel} {status:?}"), WAIT, || async {
                Ok(dispatch_outcomes(stack)
                    .await?
                    .into_iter()
                    .find(|o| o.invoice_id == invoice && o.channel == channel && o.status == status))
            })
            .await
        }
    };
    outcome("pref-none", "email", DispatchStatus::Sent).await?;
    outcome("pref-sms", "sms", DispatchStatus::Sent).await?;
    outcome("decl-email", "sms", DispatchStatus::Sent).await?;
    let none = outcome("decl-all", "none", DispatchStatus::Failed).await?;
    assert_eq!(
        none.reason.as_deref(),
        Some("the debtor declined every channel this step may use")
    );
    assert_eq!(
        stack.mail.to("none@example.test").len(),
        1,
        "no preference: the plan's first channel"
    );
    assert!(
        stack.mail.to("sms@example.test").is_empty(),
        "preferred SMS first, and it went"
    );
    assert!(stack.mail.to("decl@example.test").is_empty(), "declined e-mail");
    assert!(stack.mail.to("all@example.test").is_empty());
    let texted: Vec<String> = sims.gatewayapi.accepted().into_iter().map(|s| s.to).collect();
    assert_eq!(texted.len(), 2, "{texted:?}");
    assert!(texted.contains(&"4520000101".to_owned()) && texted.contains(&"4520000102".to_owned()));
    stack.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_the_provider_has_is_not_sent_again_when_redis_and_dispatch_are_lost_together() -> anyhow::Result<()>
{
    let stack = stack_with_profile().await?;
    stack.start_service("dispatch");
    let action = nudge_action(TENANT, "lost-together-1", "lt1@example.test");
    // The mail server takes the message and is slow to say so: dispatch is inside the provider
    // call when it dies, and Redis loses its state at the same moment.
    stack
        .mail
        .stall_reply_after_next_message(std::time::Duration::from_secs(30));
    send(&stack, &action).await?;
    eventually("the mail server to have the nudge", WAIT, || async {
        Ok((stack.mail.to("lt1@example.test").len() == 1).then_some(()))
    })
    .await?;
    stack.kill_service("dispatch").await;
    flush_stack_state(&stack.rt.config).await?;
    // The redelivered action meets a rebuilt state: no outcome says what became of the
    // message, the commit record on dispatch's changelog does.
    journeys_open(&stack, std::slice::from_ref(&action)).await?;
    stack.restart_service("dispatch").await;
    let unknown = outcome_for(&stack, &action, "email", DispatchStatus::Duplicate).await?;
    assert!(
        unknown.reason.as_deref().unwrap_or_default().contains("not sent again"),
        "{unknown:?}"
    );
    consumed_to_end(&stack, "dispatch", &[stack.topic(&stack.topics().journey_actions)]).await?;
    assert_eq!(
        stack.mail.to("lt1@example.test").len(),
        1,
        "the message the provider had was not sent a second time"
    );
    stack.shutdown().await;
    Ok(())
}
