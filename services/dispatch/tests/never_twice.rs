//! Never twice, against the provider's side of the commit point, on the dev stack (tansu, Redis,
//! the real SMTP sink and the SMS provider stand-in, all on loopback):
//! - a provider that took the message but whose answer never came (a timeout) or said otherwise
//!   (a 5xx) leaves the delivery unknown: exactly one message reached it, it is not sent again on
//!   that channel (neither by a retry nor by a redelivery), no other channel falls back, and the
//!   outcome says "delivery unknown";
//! - an attempt whose claim was taken (its lease ran out and a successor claimed the message)
//!   sends nothing, writes nothing over the successor's state, reports nothing and does not fall
//!   back; when nobody took the claim over, the action is handled again and sent once.
//!
//! Nothing here waits a fixed time to conclude that nothing happened: each test ends its
//! debtor's records with a sentinel action for the same debtor (same key, same partition,
//! handled only after the earlier records' outputs were acknowledged), and looks once the
//! sentinel's outcome is there.

use std::time::Duration;

use forfall_devsinks::sms::{AfterAccept, Provider, SmsProviderSim};
use forfall_dispatch::claim_key;
use forfall_e2e::{
    LocalStack, WAIT, at, base_config, dispatch_outcomes, eventually, journeys_after, metric_value, nudge_action,
    outcome_for,
};
use forfall_platform::clock::ManualClock;
use forfall_platform::records::{DispatchOutcome, DispatchStatus, JourneyAction};
use forfall_platform::redis_store::Keys;

const TENANT: &str = "acme-energy";

/// Friday 4 September 2026, 09:00 in Copenhagen: inside the debtor's contact hours.
async fn stack() -> anyhow::Result<LocalStack> {
    let mut stack = LocalStack::start(base_config(), ManualClock::new(at("2026-09-04T07:00:00Z"))).await?;
    stack.set("dispatch.retry.first_ms", 20);
    Ok(stack)
}

/// GatewayAPI's stand-in as the SMS provider, with a client timeout of three seconds.
async fn sms_provider(stack: &mut LocalStack) -> anyhow::Result<SmsProviderSim> {
    let sim = SmsProviderSim::start(Provider::GatewayApi, "", "gw-token-1").await?;
    stack.set("dispatch.sms.provider", "gatewayapi");
    stack.set("dispatch.sms.gatewayapi.url", sim.url());
    stack.set("dispatch.sms.gatewayapi.token", "gw-token-1");
    stack.set("dispatch.sms.gatewayapi.timeout_ms", 3000);
    Ok(sim)
}

/// A nudge for `invoice` to `debtor`, on `channels` in that order (the second is the fallback).
fn action(invoice: &str, debtor: &str, channels: &[&str]) -> JourneyAction {
    JourneyAction {
        debtor_id: format!("{TENANT}:{debtor}"),
        channels: channels.iter().map(|c| (*c).to_owned()).collect(),
        phone: Some("+4520304050".into()),
        ..nudge_action(TENANT, invoice, &format!("{invoice}@example.test"))
    }
}

/// An e-mail for the same debtor as `after`: its outcome marks that everything before it for
/// this debtor is done and acknowledged.
fn sentinel(invoice: &str, after: &JourneyAction) -> JourneyAction {
    JourneyAction {
        debtor_id: after.debtor_id.clone(),
        ..action(invoice, "sentinel", &["email"])
    }
}

/// Produces the actions in this order, their journeys open so that the last look lets them out.
async fn send(stack: &LocalStack, actions: &[&JourneyAction]) -> anyhow::Result<()> {
    let topic = stack.topic(&stack.topics().journey_actions);
    for a in actions {
        journeys_after(stack, std::slice::from_ref(*a), |_, _| "nudged").await?;
        stack.produce(&topic, &a.debtor_id, *a).await?;
    }
    Ok(())
}

/// Every outcome of one action so far.
async fn outcomes_of(stack: &LocalStack, action: &JourneyAction) -> anyhow::Result<Vec<DispatchOutcome>> {
    Ok(dispatch_outcomes(stack)
        .await?
        .into_iter()
        .filter(|o| o.action_id == action.action_id)
        .collect())
}

fn claim_of(stack: &LocalStack, action: &JourneyAction, channel: &str) -> String {
    claim_key(
        &Keys::new(&stack.rt.config.redis.key_prefix),
        &action.action_id,
        channel,
    )
}

/// The claim's state in Redis.
async fn claim_state(stack: &LocalStack, action: &JourneyAction, channel: &str) -> anyhow::Result<Option<String>> {
    let state: Option<String> = redis::cmd("GET")
        .arg(claim_of(stack, action, channel))
        .query_async(&mut stack.redis())
        .await?;
    Ok(state)
}

/// Messages the SMTP sink received for this action (by its derived Message-ID).
fn mails_of(stack: &LocalStack, action: &JourneyAction) -> usize {
    let id = format!("<{}.email@forfall.invalid>", action.action_id);
    stack
        .mail
        .messages()
        .iter()
        .filter(|m| m.header("Message-ID").as_deref() == Some(id.as_str()))
        .count()
}

fn is_unknown(o: &DispatchOutcome) -> bool {
    o.status == DispatchStatus::Duplicate && o.reason.as_deref().unwrap_or("").contains("delivery unknown")
}

/// The provider takes each SMS and then answers too late (after the client's timeout) or with a
/// 503. Each is a delivery unknown: one message at the provider, no retry, no e-mail fallback;
/// and a redelivered action reports the same and sends nothing either.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_sms_the_provider_took_without_a_clear_answer_is_never_sent_again_nor_followed_by_an_email()
-> anyhow::Result<()> {
    let mut stack = stack().await?;
    let sim = sms_provider(&mut stack).await?;
    sim.after_accepting_next(&[
        AfterAccept::Delay(Duration::from_secs(8)),
        AfterAccept::Answer(
            503,
            r#"{"code":"0x0000","incident_uuid":"00000000-0000-4000-8000-000000000000","message":"Service Unavailable"}"#
                .into(),
        ),
    ]);
    stack.start_service("dispatch");
    let late = action("sms-late", "d-sms", &["sms", "email"]);
    let failing = action("sms-503", "d-sms", &["sms", "email"]);
    let mark = sentinel("sentinel-sms-1", &late);
    send(&stack, &[&late, &failing, &mark]).await?;
    outcome_for(&stack, &mark, "email", DispatchStatus::Sent).await?;

    assert_eq!(
        sim.accepted().len(),
        2,
        "each SMS reached the provider exactly once: {:?}",
        sim.accepted()
    );
    for a in [&late, &failing] {
        let recorded = outcomes_of(&stack, a).await?;
        assert_eq!(
            recorded.len(),
            1,
            "{}: one outcome, on SMS only: {recorded:?}",
            a.invoice_id
        );
        assert_eq!(recorded[0].channel, "sms");
        assert!(is_unknown(&recorded[0]), "{}: {recorded:?}", a.invoice_id);
        assert_eq!(mails_of(&stack, a), 0, "{}: no e-mail fallback", a.invoice_id);
        let state = claim_state(&stack, a, "sms").await?.unwrap_or_default();
        assert!(
            state.starts_with("unknown:"),
            "{}: the claim is final: {state}",
            a.invoice_id
        );
        assert_eq!(
            claim_state(&stack, a, "email").await?,
            None,
            "{}: e-mail never claimed",
            a.invoice_id
        );
    }
    let reason = outcomes_of(&stack, &late).await?[0].reason.clone().unwrap_or_default();
    assert!(reason.contains("did not answer in time"), "{reason}");
    let reason = outcomes_of(&stack, &failing).await?[0]
        .reason
        .clone()
        .unwrap_or_default();
    assert!(reason.contains("503"), "{reason}");

    // Redelivered (a restart, a rebalance, an upstream retry): reported the same, sent never.
    let mark = sentinel("sentinel-sms-2", &late);
    send(&stack, &[&late, &failing, &mark]).await?;
    outcome_for(&stack, &mark, "email", DispatchStatus::Sent).await?;
    assert_eq!(sim.accepted().len(), 2, "nothing sent again: {:?}", sim.accepted());
    for a in [&late, &failing] {
        let recorded = outcomes_of(&stack, a).await?;
        assert_eq!(recorded.len(), 2, "{}: {recorded:?}", a.invoice_id);
        assert!(recorded.iter().all(is_unknown), "{}: {recorded:?}", a.invoice_id);
        assert_eq!(recorded[0].event_id, recorded[1].event_id, "the same outcome event");
        assert_eq!(mails_of(&stack, a), 0, "{}: no e-mail fallback", a.invoice_id);
    }
    stack.shutdown().await;
    Ok(())
}

/// The SMTP server keeps the message and answers the end of data only after the client's timeout:
/// exactly one message at the server, no second one from a retry, no SMS fallback, and the
/// outcome says delivery unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_email_the_server_took_but_answered_too_late_is_never_sent_again_nor_followed_by_an_sms()
-> anyhow::Result<()> {
    let mut stack = stack().await?;
    let sim = sms_provider(&mut stack).await?;
    stack.set("dispatch.smtp.timeout_ms", 3000);
    stack.mail.stall_reply_after_next_message(Duration::from_secs(8));
    stack.start_service("dispatch");
    let late = action("mail-late", "d-mail", &["email", "sms"]);
    let mark = sentinel("sentinel-mail", &late);
    send(&stack, &[&late, &mark]).await?;
    outcome_for(&stack, &mark, "email", DispatchStatus::Sent).await?;

    assert_eq!(mails_of(&stack, &late), 1, "the server got the message exactly once");
    let recorded = outcomes_of(&stack, &late).await?;
    assert_eq!(recorded.len(), 1, "one outcome, on e-mail only: {recorded:?}");
    assert_eq!(recorded[0].channel, "email");
    assert!(is_unknown(&recorded[0]), "{recorded:?}");
    assert!(sim.accepted().is_empty(), "no SMS fallback: {:?}", sim.accepted());
    let state = claim_state(&stack, &late, "email").await?.unwrap_or_default();
    assert!(state.starts_with("unknown:"), "the claim is final: {state}");
    assert_eq!(claim_state(&stack, &late, "sms").await?, None, "SMS never claimed");
    stack.shutdown().await;
    Ok(())
}

/// An attempt is held before its commit point (the SMTP server holds DATA) while its claim is
/// taken over, as a successor does once the lease ran out. The attempt must then send nothing,
/// leave the successor's claim as it is, report nothing and not fall back to SMS; its record is
/// still acknowledged (the next record of the debtor goes through).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_attempt_whose_claim_was_taken_over_writes_nothing_and_does_not_fall_back() -> anyhow::Result<()> {
    let mut stack = stack().await?;
    let sim = sms_provider(&mut stack).await?;
    stack.mail.hold_next_data();
    stack.start_service("dispatch");
    let taken = action("mail-taken", "d-taken", &["email", "sms"]);
    let mark = sentinel("sentinel-taken", &taken);
    send(&stack, &[&taken, &mark]).await?;
    eventually("the attempt to reach DATA", WAIT, || async {
        Ok((stack.mail.holding() == 1).then_some(()))
    })
    .await?;
    // The successor's claim, as `SET NX` writes it after the first lease ran out.
    let successor = "claimed:the-successor";
    let _: () = redis::cmd("SET")
        .arg(claim_of(&stack, &taken, "email"))
        .arg(successor)
        .arg("PX")
        .arg(600_000)
        .query_async(&mut stack.redis())
        .await?;
    stack.mail.release_data();
    outcome_for(&stack, &mark, "email", DispatchStatus::Sent).await?;

    assert_eq!(
        claim_state(&stack, &taken, "email").await?.as_deref(),
        Some(successor),
        "the successor's claim is untouched"
    );
    assert_eq!(mails_of(&stack, &taken), 0, "nothing sent");
    let recorded = outcomes_of(&stack, &taken).await?;
    assert!(
        recorded.is_empty(),
        "the successor reports, not this attempt: {recorded:?}"
    );
    assert!(sim.accepted().is_empty(), "no SMS fallback: {:?}", sim.accepted());
    assert_eq!(claim_state(&stack, &taken, "sms").await?, None, "SMS never claimed");
    let metrics = stack.metrics("dispatch").await?;
    assert_eq!(
        metric_value(&metrics, "forfall_dispatch_outcomes_total", &["status=\"superseded\""]),
        Some(1.0),
        "{metrics}"
    );
    stack.shutdown().await;
    Ok(())
}

/// Never after payment: an e-mail held at the server's DATA after its first last look, while
/// its invoice is paid (the watcher closes the journey). At the commit point the journey is no
/// longer what the first look found, so it is judged again: nothing is sent, the action is
/// handled again from the start and suppressed. The sentinel after it, whose journey did not
/// change, is looked at and committed in one round trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_email_whose_invoice_is_paid_while_it_waits_for_the_server_is_not_sent() -> anyhow::Result<()> {
    let stack = stack().await?;
    stack.mail.hold_next_data();
    stack.start_service("dispatch");
    let paid = action("mail-paid", "d-paid", &["email"]);
    let mark = sentinel("sentinel-paid", &paid);
    send(&stack, &[&paid, &mark]).await?;
    eventually("the attempt to reach DATA", WAIT, || async {
        Ok((stack.mail.holding() == 1).then_some(()))
    })
    .await?;
    journeys_after(&stack, std::slice::from_ref(&paid), |_, _| "closed:paid").await?;
    stack.mail.release_data();
    outcome_for(&stack, &mark, "email", DispatchStatus::Sent).await?;

    assert_eq!(mails_of(&stack, &paid), 0, "not sent after the payment");
    let recorded = outcomes_of(&stack, &paid).await?;
    assert!(
        !recorded.is_empty() && recorded.iter().all(|o| o.status == DispatchStatus::Suppressed),
        "{recorded:?}"
    );
    let metrics = stack.metrics("dispatch").await?;
    let looks = |journey: &str| {
        metric_value(
            &metrics,
            "forfall_dispatch_commit_looks_total",
            &[&format!("journey=\"{journey}\"")],
        )
    };
    assert_eq!(looks("changed"), Some(1.0), "{metrics}");
    assert_eq!(looks("unchanged"), Some(1.0), "{metrics}");
    stack.shutdown().await;
    Ok(())
}

/// The same hold, but the claim simply runs out and nobody takes it: the attempt sends nothing
/// and writes nothing, and the action is handled again from the start, so the message goes
/// out once (nothing lost) and without a fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_attempt_whose_lease_ran_out_with_no_successor_sends_the_message_once_after_all() -> anyhow::Result<()> {
    let mut stack = stack().await?;
    let sim = sms_provider(&mut stack).await?;
    stack.mail.hold_next_data();
    stack.start_service("dispatch");
    let expired = action("mail-expired", "d-expired", &["email", "sms"]);
    send(&stack, &[&expired]).await?;
    eventually("the attempt to reach DATA", WAIT, || async {
        Ok((stack.mail.holding() == 1).then_some(()))
    })
    .await?;
    let _: () = redis::cmd("DEL")
        .arg(claim_of(&stack, &expired, "email"))
        .query_async(&mut stack.redis())
        .await?;
    stack.mail.release_data();
    let sent = outcome_for(&stack, &expired, "email", DispatchStatus::Sent).await?;

    assert_eq!(mails_of(&stack, &expired), 1, "sent exactly once");
    assert_eq!(
        claim_state(&stack, &expired, "email").await?,
        Some(format!(
            "sent:{} sha256={}",
            sent.provider_message_id.unwrap_or_default(),
            sent.content_sha256.unwrap_or_default()
        ))
    );
    let recorded = outcomes_of(&stack, &expired).await?;
    assert!(
        recorded
            .iter()
            .all(|o| o.channel == "email" && o.status == DispatchStatus::Sent),
        "{recorded:?}"
    );
    assert!(sim.accepted().is_empty(), "no SMS fallback: {:?}", sim.accepted());
    stack.shutdown().await;
    Ok(())
}

/// Never after payment, however long a message waits: an SMS held back by the provider's rate
/// limit after its first last look is looked at again at the commit point, and an invoice paid
/// meanwhile suppresses it (seen in the fault suite: SMS sent seconds after the payment was
/// recorded, when a day's SMS queued for tokens).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_sms_waiting_for_the_rate_limit_is_not_sent_when_its_invoice_is_paid_meanwhile() -> anyhow::Result<()> {
    let mut stack = stack().await?;
    let sim = sms_provider(&mut stack).await?;
    // One message, then one every five seconds.
    stack.set("dispatch.sms.gatewayapi.rate_per_sec", 0.2);
    stack.set("dispatch.sms.gatewayapi.burst", 1.0);
    stack.start_service("dispatch");
    let first = action("rl-first", "d-rl-1", &["sms"]);
    send(&stack, &[&first]).await?;
    outcome_for(&stack, &first, "sms", DispatchStatus::Sent).await?;

    let waiting = action("rl-waiting", "d-rl-2", &["sms"]);
    send(&stack, &[&waiting]).await?;
    // Claimed and past its first look, it waits for a token.
    eventually("the second SMS to be claimed", WAIT, || async {
        Ok(claim_state(&stack, &waiting, "sms")
            .await?
            .is_some_and(|s| s.starts_with("claimed:"))
            .then_some(()))
    })
    .await?;
    assert!(
        dispatch_outcomes(&stack)
            .await?
            .iter()
            .all(|o| o.action_id != waiting.action_id)
    );
    let keys = Keys::new(&stack.rt.config.redis.key_prefix);
    let _: () = forfall_e2e::journey_header(&keys, TENANT, "rl-waiting", "closed:paid", None)
        .query_async(&mut stack.redis())
        .await?;

    let suppressed = outcome_for(&stack, &waiting, "sms", DispatchStatus::Suppressed).await?;
    assert_eq!(suppressed.reason.as_deref(), Some("invoice is closed:paid"));
    let references: Vec<Option<String>> = sim.accepted().into_iter().map(|s| s.userref).collect();
    assert_eq!(
        references,
        [Some(format!("{}:sms", first.action_id))],
        "only the first SMS reached the provider"
    );
    stack.shutdown().await;
    Ok(())
}
