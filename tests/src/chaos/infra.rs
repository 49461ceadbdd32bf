//! The fault suite's own stack: a private broker and Redis (so that freezing them disturbs no
//! other test), the registry emulator, the mail sink and the agency stand-in, and the service
//! binaries as separate processes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use forfall_devsinks::MailSink;
use forfall_devsinks::agency::AgencyApi;
use forfall_devsinks::sms::{Provider, SmsProviderSim};
use forfall_platform::config::CommonConfig;
use tokio::process::{Child, Command};

pub use crate::servers::{free_port, wait_port};

const SMS_TOKEN: &str = "chaos-gatewayapi-token";

/// The customer base's policy: the default one with an SMS nudge three banking days after the
/// due date, so that messages go out on both channels.
const POLICY: &str = r#"
version = "chaos-2026-12"
send_time = "09:00"
combine_within_days = 3

# The agency sends the warning before collection where the law asks for one (see README).
[handoff]
agency_sends_warning = ["DK", "NO"]

[[segment]]
name = "default"
plan = "chaos"

[plan.chaos]
step = [
  { name = "nudge", offset_banking_days = 0, channels = ["email"], tone = "nudge" },
  { name = "sms-nudge", offset_banking_days = 3, channels = ["sms", "email"], tone = "nudge" },
  { name = "reminder-1", offset_banking_days = 10, channels = ["email"], tone = "reminder", days_to_pay = 10 },
  { name = "handoff", offset_banking_days = 20, handoff = true },
]
"#;

/// Sends a signal to a process by pid (SIGSTOP and SIGCONT have no std API).
pub fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}

/// A helper process of the stack (broker, Redis), killed when dropped.
pub struct Helper {
    pub child: Child,
}

impl Helper {
    /// A broker of its own (tansu, in memory) on a free loopback port, logging to `dir`; its port.
    pub fn broker(dir: &Path) -> anyhow::Result<(Self, u16)> {
        let port = free_port()?;
        let child = Command::new(tansu_binary())
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://127.0.0.1:{port}"),
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{port}"),
                "--storage-engine",
                "memory://tansu/",
            ])
            // The group coordinator's decisions (members that missed their heartbeat, new
            // generations) are what a wedged consumer group is diagnosed from.
            // tansu logs to stdout.
            .env("RUST_LOG", "warn,tansu_broker::coordinator::group=info")
            .env("NO_COLOR", "1")
            .stdout(std::fs::File::create(dir.join("tansu.log"))?)
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start tansu ({}): {e}", tansu_binary().display()))?;
        Ok((Self { child }, port))
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            signal(pid, "CONT");
        }
        let _ = self.child.start_kill();
    }
}

fn tansu_binary() -> PathBuf {
    if let Ok(p) = std::env::var("FORFALL_TANSU") {
        return p.into();
    }
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo"));
    home.join("bin").join("tansu")
}

/// Where the service binaries are: next to this program (or one up, from a test's `deps`).
pub fn binaries_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    for name in crate::chaos::SERVICES {
        let bin = dir.join(format!("forfall-{name}"));
        anyhow::ensure!(
            bin.exists(),
            "{} is missing: build the services first (`cargo build --workspace --bins`, which `make test` and `make chaos` do)",
            bin.display()
        );
    }
    Ok(dir)
}

pub struct Infra {
    pub dir: PathBuf,
    pub broker: Helper,
    pub redis: Helper,
    pub registry_url: String,
    pub mail: MailSink,
    /// GatewayAPI's stand-in, strict as its documentation.
    pub sms: SmsProviderSim,
    pub agency: AgencyApi,
    /// The configuration the services get (as `FORFALL_*` variables) and the checker reads with.
    pub config: CommonConfig,
    pub clock_key: String,
    pub bins: PathBuf,
    /// Where each instance's admin endpoint listens, by (service, slot).
    admin_ports: std::sync::Mutex<HashMap<(&'static str, u16), u16>>,
    /// The wall clock through the run, to place the providers' moments among Kafka's stamps.
    pub wall: super::wall_clock::WallTrail,
}

impl Infra {
    pub async fn start(run: &str) -> anyhow::Result<Self> {
        let bins = binaries_dir()?;
        let dir = std::env::temp_dir().join(format!("forfall-chaos-{run}"));
        std::fs::create_dir_all(&dir)?;
        let (broker, broker_port) = Helper::broker(&dir)?;
        let redis_port = free_port()?;
        let redis = Helper {
            child: Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &redis_port.to_string(), "--save", ""])
                .args(["--appendonly", "no", "--hash-max-ziplist-value", "1024"])
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| anyhow::anyhow!("cannot start redis-server: {e}"))?,
        };
        wait_port(broker_port, "tansu").await?;
        wait_port(redis_port, "redis").await?;
        let registry = forfall_schema_registry_emulator::spawn("127.0.0.1:0").await?;
        let registry_url = format!("http://{registry}");
        let mail = MailSink::start()?;
        let sms = SmsProviderSim::start(Provider::GatewayApi, "", SMS_TOKEN).await?;
        let agency = AgencyApi::start(None).await?;
        std::fs::write(dir.join("policy.toml"), POLICY)?;
        let prefix = format!("chaos{run}");
        let mut config = crate::base_config();
        config.kafka.brokers = format!("127.0.0.1:{broker_port}");
        config.kafka.group_prefix = prefix.clone();
        config.kafka.session_timeout_ms = 2000;
        config.kafka.heartbeat_interval_ms = 300;
        config.kafka.partitions = 3;
        config.redis.url = format!("redis://127.0.0.1:{redis_port}/");
        config.redis.key_prefix = format!("{prefix}:");
        config.topics.prefix = format!("{prefix}.");
        config.registry.url = registry_url.clone();
        forfall_platform::kafka::ensure_topics(&config.kafka, &config.topics.all()).await?;
        let clock_key = format!("{prefix}:simulated-clock");
        Ok(Self {
            dir,
            broker,
            redis,
            registry_url,
            mail,
            sms,
            agency,
            config,
            clock_key,
            bins,
            admin_ports: std::sync::Mutex::default(),
            wall: super::wall_clock::WallTrail::start(),
        })
    }

    /// Redis is flushed: every service loses its state. The simulated clock (the harness's,
    /// not a service's) is put back at once, as a real clock does not stop with Redis.
    pub async fn flush_redis(&self) -> anyhow::Result<()> {
        let mut redis = redis::Client::open(self.config.redis.url.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        let now: Option<i64> = redis::cmd("GET").arg(&self.clock_key).query_async(&mut redis).await?;
        crate::flush_stack_state(&self.config).await?;
        if let Some(now) = now {
            let _: () = redis::cmd("SET")
                .arg(&self.clock_key)
                .arg(now)
                .query_async(&mut redis)
                .await?;
        }
        Ok(())
    }

    /// Sets the simulated clock every service follows (waiting while Redis is frozen).
    pub async fn set_clock(
        &self,
        redis: &mut redis::aio::ConnectionManager,
        to: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let set: Result<(), redis::RedisError> = redis::cmd("SET")
                .arg(&self.clock_key)
                .arg(to.timestamp_millis())
                .query_async(redis)
                .await;
            match set {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "chaos: setting the clock retried");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(anyhow::Error::new(e).context("setting the simulated clock")),
            }
        }
    }

    /// The `FORFALL_*` variables of one service instance listening on `admin_port`.
    fn env(&self, service: &str, admin_port: u16) -> Vec<(String, String)> {
        let c = &self.config;
        let env = vec![
            ("FORFALL_PROFILE", "development".into()),
            ("FORFALL_KAFKA__BROKERS", c.kafka.brokers.clone()),
            ("FORFALL_KAFKA__GROUP_PREFIX", c.kafka.group_prefix.clone()),
            (
                "FORFALL_KAFKA__SESSION_TIMEOUT_MS",
                c.kafka.session_timeout_ms.to_string(),
            ),
            (
                "FORFALL_KAFKA__HEARTBEAT_INTERVAL_MS",
                c.kafka.heartbeat_interval_ms.to_string(),
            ),
            ("FORFALL_KAFKA__PARTITIONS", c.kafka.partitions.to_string()),
            ("FORFALL_KAFKA__DRAIN_TIMEOUT_MS", "5000".into()),
            ("FORFALL_KAFKA__REVOKE_TIMEOUT_MS", "1000".into()),
            ("FORFALL_REDIS__URL", c.redis.url.clone()),
            ("FORFALL_REDIS__KEY_PREFIX", c.redis.key_prefix.clone()),
            ("FORFALL_TOPICS__PREFIX", c.topics.prefix.clone()),
            ("FORFALL_REGISTRY__URL", c.registry.url.clone()),
            // A service listens on base + its offset: the base that puts it on a port found free.
            (
                "FORFALL_ADMIN__BASE_PORT",
                (admin_port - port_offset(service)).to_string(),
            ),
            ("FORFALL_CLOCK__SHARED_REDIS_KEY", self.clock_key.clone()),
            ("FORFALL_LOG__LEVEL", "info".into()),
            ("FORFALL_WATCHER__TICK_MS", "50".into()),
            ("FORFALL_DISPATCH__SMTP__PORT", self.mail.addr.port().to_string()),
            ("FORFALL_DISPATCH__RETRY__FIRST_MS", "50".into()),
            ("FORFALL_DISPATCH__SMS__PROVIDER", "gatewayapi".into()),
            ("FORFALL_DISPATCH__SMS__GATEWAYAPI__URL", self.sms.url()),
            ("FORFALL_DISPATCH__SMS__GATEWAYAPI__TOKEN", SMS_TOKEN.into()),
            ("FORFALL_DISPATCH__SMS__GATEWAYAPI__SENDER", "ChaosPower".into()),
            (
                "FORFALL_WATCHER__POLICY_FILE",
                self.dir.join("policy.toml").display().to_string(),
            ),
            ("FORFALL_HANDOFF__AGENCY_URL", self.agency.url("/cases")),
            ("FORFALL_HANDOFF__AGENCY_RECALL_URL", self.agency.url("/recalls")),
            ("FORFALL_HANDOFF__AGENCY_PAYMENTS_URL", self.agency.url("/payments")),
            ("FORFALL_HANDOFF__TIMEOUT_MS", "3000".into()),
        ];
        let mut env: Vec<(String, String)> = env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        for (k, v) in [
            ("NAME", "Chaos Forsyning A/S"),
            ("BANK_ACCOUNT", "IBAN DK50 0040 0440 1162 43"),
            ("CONTACT", "+45 70 10 20 30"),
        ] {
            let tenant = crate::chaos::TENANT.to_uppercase();
            env.push((format!("FORFALL_DISPATCH__TENANTS__{tenant}__{k}"), v.to_owned()));
        }
        env
    }

    /// The service's consumer group as the broker describes it (state, members and their
    /// clients), for the log when an instance stays unready.
    pub async fn describe_group(&self, service: &str) -> String {
        let brokers = self.config.kafka.brokers.clone();
        let group = format!("{}.{service}", self.config.kafka.group_prefix);
        let described = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
            let consumer: rdkafka::consumer::BaseConsumer = crate::bench_client(&brokers).create()?;
            let list = rdkafka::consumer::Consumer::fetch_group_list(&consumer, Some(&group), Duration::from_secs(5))?;
            Ok(list
                .groups()
                .iter()
                .map(|g| {
                    let members: Vec<String> = g
                        .members()
                        .iter()
                        .map(|m| format!("{} ({})", m.id(), m.client_id()))
                        .collect();
                    format!("{} {} {} members {:?}", g.name(), g.state(), g.protocol(), members)
                })
                .collect::<Vec<_>>()
                .join("; "))
        })
        .await;
        match described {
            Ok(Ok(text)) => text,
            Ok(Err(e)) => format!("not described: {e}"),
            Err(e) => format!("not described: {e}"),
        }
    }

    /// Where an instance's admin endpoint listens (0 before it was started).
    pub fn admin_port(&self, service: &'static str, slot: u16) -> u16 {
        let ports = self.admin_ports.lock().unwrap_or_else(|p| p.into_inner());
        ports.get(&(service, slot)).copied().unwrap_or(0)
    }

    /// Starts one instance of a service as its own process; its log goes to the run's folder.
    pub fn spawn(&self, service: &'static str, slot: u16, generation: u32) -> anyhow::Result<ServiceProcess> {
        let log = std::fs::File::create(self.dir.join(format!("{service}-{slot}-{generation}.log")))?;
        let admin_port = loop {
            let port = free_port()?;
            if port > port_offset(service) {
                break port;
            }
        };
        self.admin_ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((service, slot), admin_port);
        let child = Command::new(self.bins.join(format!("forfall-{service}")))
            .envs(self.env(service, admin_port))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        Ok(ServiceProcess {
            child,
            admin_port,
            started: Instant::now(),
        })
    }
}

/// The offset of a service's admin port from `admin.base_port`.
fn port_offset(service: &str) -> u16 {
    match service {
        "ingest" => forfall_ingest::PORT_OFFSET,
        "watcher" => forfall_watcher::PORT_OFFSET,
        "dispatch" => forfall_dispatch::PORT_OFFSET,
        "matcher" => forfall_matcher::PORT_OFFSET,
        "handoff" => forfall_handoff::PORT_OFFSET,
        _ => 0,
    }
}

/// One running service instance.
pub struct ServiceProcess {
    pub child: Child,
    pub admin_port: u16,
    pub started: Instant,
}

impl ServiceProcess {
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    pub async fn ready(&self, http: &reqwest::Client) -> bool {
        self.readiness(http).await.is_ok()
    }

    /// Ready, or why not in the service's own words (its `/readyz` answer, or why none came).
    pub async fn readiness(&self, http: &reqwest::Client) -> Result<(), String> {
        let answer = http
            .get(format!("http://127.0.0.1:{}/readyz", self.admin_port))
            .timeout(Duration::from_millis(500))
            .send()
            .await
            .map_err(|e| format!("no answer: {e}"))?;
        if answer.status().is_success() {
            return Ok(());
        }
        Err(answer
            .text()
            .await
            .unwrap_or_else(|e| format!("unreadable answer: {e}")))
    }
}

/// Every instance, by (service, slot).
pub type Fleet = HashMap<(&'static str, u16), ServiceProcess>;
