//! The fault test: 10,000 actions while the dispatch binary is killed with SIGKILL at random
//! moments and restarted. Afterwards every action has produced exactly one message or a
//! recorded suppression, and none produced two. The one documented window (a kill during the
//! provider call itself) is allowed to show as a DUPLICATE "delivery unknown" outcome, at most
//! for at most the actions in flight at each kill, and even then with at most one message.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use forfall_e2e::{LocalStack, base_config, journeys_after, nudge_action};
use forfall_platform::clock::SystemClock;
use forfall_platform::records::{DispatchOutcome, DispatchStatus, JourneyAction};
use rand::Rng;

const ACTIONS: usize = 10_000;
const KILLS: usize = 6;
fn kill_count() -> usize {
    std::env::var("FORFALL_TEST_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(KILLS)
}
const TENANT: &str = "acme-energy";

fn action(i: usize) -> JourneyAction {
    JourneyAction {
        debtor_id: format!("{TENANT}:d{i}"),
        invoice_number: format!("K-{i}"),
        open_minor: 10_000 + i as i64,
        payment_reference: None,
        debtor_name: None,
        description: None,
        ..nudge_action(TENANT, &format!("k-{i}"), &format!("d{i}@example.test"))
    }
}

fn spawn_dispatch(stack: &LocalStack, config: &std::path::Path) -> anyhow::Result<Child> {
    let c = &stack.rt.config;
    Ok(Command::new(env!("CARGO_BIN_EXE_forfall-dispatch"))
        .env("FORFALL_CONFIG", config)
        .env("FORFALL_PROFILE", "development")
        .env("FORFALL_REGISTRY__URL", &c.registry.url)
        .env("FORFALL_TOPICS__PREFIX", &c.topics.prefix)
        .env("FORFALL_REDIS__KEY_PREFIX", &c.redis.key_prefix)
        .env("FORFALL_KAFKA__GROUP_PREFIX", &c.kafka.group_prefix)
        .env("FORFALL_KAFKA__SESSION_TIMEOUT_MS", "2000")
        .env("FORFALL_KAFKA__HEARTBEAT_INTERVAL_MS", "300")
        .env("FORFALL_KAFKA__PARTITIONS", "2")
        .env("FORFALL_ADMIN__BASE_PORT", "0")
        .env("FORFALL_LOG__LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(match std::env::var_os("FORFALL_TEST_DISPATCH_LOG") {
            Some(path) => Stdio::from(std::fs::OpenOptions::new().create(true).append(true).open(path)?),
            None => Stdio::null(),
        })
        .spawn()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_actions_through_random_sigkills_send_each_message_at_most_once() -> anyhow::Result<()> {
    let stack = LocalStack::start(base_config(), std::sync::Arc::new(SystemClock)).await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("dispatch.toml");
    // Contact hours around the clock: the test runs whenever CI does.
    std::fs::write(
        &config,
        format!(
            "[dispatch]\nclaim_lease_ms = 2000\n[dispatch.smtp]\nport = {}\n[dispatch.contact_hours.DK]\nweekdays = [\"00:00:00\", \"23:59:59.999\"]\nsaturday = [\"00:00:00\", \"23:59:59.999\"]\nsunday = [\"00:00:00\", \"23:59:59.999\"]\non_holidays = true\n",
            stack.mail.addr.port()
        ),
    )?;
    let actions: Vec<JourneyAction> = (0..ACTIONS).map(action).collect();
    // One in ten is paid before dispatch gets to it.
    journeys_after(
        &stack,
        &actions,
        |i, _| if i % 10 == 3 { "closed:paid" } else { "nudged" },
    )
    .await?;
    let topic = stack.topic(&stack.topics().journey_actions);
    for chunk in actions.chunks(500) {
        futures::future::try_join_all(chunk.iter().map(|a| stack.produce(&topic, &a.debtor_id, a))).await?;
    }

    let mut child = spawn_dispatch(&stack, &config)?;
    let mut rng = rand::rng();
    let outcomes_topic = stack.topic(&stack.topics().dispatch_outcomes);
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_secs(200);
    let mut progress = (0usize, Instant::now());
    let outcomes = loop {
        if kills < kill_count() {
            tokio::time::sleep(Duration::from_millis(rng.random_range(1500..4000))).await;
            child.kill()?; // SIGKILL
            child.wait()?;
            kills += 1;
            // tansu 0.6.0 may strand a join that overlaps the dead member's expiry.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            child = spawn_dispatch(&stack, &config)?;
            continue;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let outcomes: Vec<DispatchOutcome> = stack.read(&outcomes_topic).await?;
        let decided: std::collections::HashSet<&str> = outcomes.iter().map(|o| o.action_id.as_str()).collect();
        if decided.len() == ACTIONS {
            break outcomes;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {ACTIONS} actions decided within 200 s",
            decided.len()
        );
        // tansu 0.6.0 can strand a group join (see the devstack notes); an operator restarts a
        // consumer that makes no progress, and so does this test. It is one more kill.
        if decided.len() > progress.0 {
            progress = (decided.len(), Instant::now());
        } else if progress.1.elapsed() > Duration::from_secs(30) {
            child.kill()?;
            child.wait()?;
            kills += 1;
            tokio::time::sleep(Duration::from_millis(1500)).await;
            child = spawn_dispatch(&stack, &config)?;
            progress = (decided.len(), Instant::now());
        }
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    child.kill()?;
    child.wait()?;

    let mut messages: HashMap<String, usize> = HashMap::new();
    for mail in stack.mail.messages() {
        *messages
            .entry(mail.header("Message-ID").unwrap_or_default())
            .or_default() += 1;
    }
    let mut by_action: HashMap<&str, Vec<&DispatchOutcome>> = HashMap::new();
    for o in &outcomes {
        by_action.entry(o.action_id.as_str()).or_default().push(o);
    }
    let mut unknown = 0;
    for (i, a) in actions.iter().enumerate() {
        let sent = messages
            .get(&format!("<{}.email@forfall.invalid>", a.action_id))
            .copied()
            .unwrap_or(0);
        assert!(sent <= 1, "action {i} produced {sent} messages");
        let recorded = &by_action[a.action_id.as_str()];
        let suppressed = recorded.iter().any(|o| o.status == DispatchStatus::Suppressed);
        if i % 10 == 3 {
            assert!(
                suppressed && sent == 0,
                "paid invoice {i}: {recorded:?}, {sent} messages"
            );
            continue;
        }
        let window = recorded.iter().any(|o| {
            o.status == DispatchStatus::Duplicate && o.reason.as_deref().unwrap_or("").contains("delivery unknown")
        });
        if window {
            unknown += 1;
        } else {
            assert_eq!(sent, 1, "action {i}: exactly one message; outcomes {recorded:?}");
            assert!(
                recorded.iter().any(|o| o.status == DispatchStatus::Sent),
                "{recorded:?}"
            );
        }
    }
    // Dispatch handles up to `dispatch.concurrency` (16) actions at once: a kill can catch at
    // most that many inside a provider call.
    assert!(
        unknown <= kills * 16,
        "{unknown} actions hit the provider-call window, more than {kills} kills could cause"
    );
    println!(
        "{ACTIONS} actions, {kills} SIGKILLs: {} messages, {} suppressed, {unknown} in the documented window, 0 twice",
        messages.len(),
        ACTIONS / 10
    );
    stack.shutdown().await;
    Ok(())
}
