//! Configuration: built-in defaults that work on the dev stack, then an optional file
//! (`FORFALL_CONFIG`, or `forfall.toml` in the working directory; TOML, or JSON when its name
//! ends in `.json`), then `FORFALL_*` environment variables, nested with `__` (for example
//! `FORFALL_KAFKA__BROKERS`).

use std::collections::BTreeMap;
use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Json, Serialized, Toml};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
#[error("configuration error: {0}")]
pub struct ConfigError(#[from] Box<figment::Error>);

/// Settings every service shares.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
#[derive(Default)]
pub struct CommonConfig {
    /// `production` unless set: see [`Profile`].
    pub profile: Profile,
    pub kafka: KafkaConfig,
    pub registry: RegistryConfig,
    pub redis: RedisConfig,
    pub topics: Topics,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub traces: TracesConfig,
    /// The tenants' tokens for their HTTP APIs (see [`crate::api_auth`]).
    pub api: crate::api_auth::ApiConfig,
    pub clock: ClockConfig,
}

/// Where spans go: an OpenTelemetry collector (the OpenTelemetry Collector, Tempo, Jaeger) over
/// OTLP/HTTP with protobuf. Off unless enabled; the `traceparent` of records flows either way.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct TracesConfig {
    pub enabled: bool,
    /// The collector's traces endpoint, path included (OTLP/HTTP's is `/v1/traces`).
    pub endpoint: String,
    /// Share of the traces started here that are kept (0.0 to 1.0); a trace started upstream
    /// keeps its upstream's decision.
    pub sample_ratio: f64,
    /// The `service.name` of this process; the binary's name when unset (`forfall-ingest`, ...).
    pub service_name: Option<String>,
    /// Longest a finished span waits to be sent with others.
    pub flush_ms: u64,
}

impl Default for TracesConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            endpoint: "http://127.0.0.1:4318/v1/traces".into(),
            sample_ratio: 1.0,
            service_name: None,
            flush_ms: 5_000,
        }
    }
}

/// What a secret left at its built-in value means. The built-in values of secrets (the pay-link
/// key, receipt tokens, webhook secrets) are published with the source code: on a developer's
/// machine (`profile = "development"`: `make run`, the tests) they save setting up secrets; in
/// production (the default, so that forgetting to choose cannot weaken it) a service refuses to
/// start while one of its secrets still holds its published value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    Development,
    #[default]
    Production,
}

/// A secret still at its published development value, in production.
#[derive(Debug, thiserror::Error)]
#[error(
    "refusing to start in the production profile with development secrets: {}",
    .0.iter().map(|key| format!("{key} (set {})", env_name(key))).collect::<Vec<_>>().join(", ")
)]
pub struct DevelopmentSecrets(pub Vec<String>);

impl Profile {
    /// In production, refuses every `(setting, value, published development value)` whose value
    /// is the published one, naming each setting and the variable that sets it.
    pub fn refuse_development_secrets<K: AsRef<str>>(
        self,
        secrets: &[(K, &str, &str)],
    ) -> Result<(), DevelopmentSecrets> {
        if self == Profile::Development {
            return Ok(());
        }
        let found: Vec<String> = secrets
            .iter()
            .filter(|(_, value, development)| value == development)
            .map(|(key, _, _)| key.as_ref().to_owned())
            .collect();
        if found.is_empty() {
            Ok(())
        } else {
            Err(DevelopmentSecrets(found))
        }
    }
}

/// The environment variable that sets a dotted setting: `dispatch.pay_link.secret` is
/// `FORFALL_DISPATCH__PAY_LINK__SECRET`.
pub fn env_name(key: &str) -> String {
    format!("FORFALL_{}", key.to_uppercase().replace('.', "__"))
}

/// DEV AND TEST ONLY: where time comes from. Unset, it is the system clock (production).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ClockConfig {
    /// Follow simulated time in this Redis key (milliseconds since the epoch), shared by every
    /// process of a fault-suite run.
    pub shared_redis_key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct KafkaConfig {
    /// Bootstrap servers. Tansu listens on IPv4 only: use 127.0.0.1, not localhost.
    pub brokers: String,
    /// Prefix for consumer group ids, so that test runs and tenants do not share groups.
    pub group_prefix: String,
    /// Kafka's default is 45 s; a consumer group on tansu joins after about half of it,
    /// so dev and test use short values. Production sets Kafka's defaults here.
    pub session_timeout_ms: u32,
    pub heartbeat_interval_ms: u32,
    /// Partitions for topics Forfall creates (all topics share one count so that a debtor's
    /// records land on the same partition number everywhere).
    pub partitions: i32,
    pub replication_factor: i32,
    /// Create missing topics at start (dev); production manages topics outside.
    pub create_topics: bool,
    /// Most records produced but not yet acknowledged, per consumer loop.
    pub max_in_flight: usize,
    /// How long the producer waits to fill a batch (librdkafka `linger.ms`). A broker's cost is
    /// mostly per request: on tansu, 20 ms instead of 1 lets the payment pipeline carry twice
    /// as much on the same CPU, and that headroom is what keeps its latency low.
    pub linger_ms: u32,
    /// Longest a fetch waits for data (librdkafka `fetch.wait.max.ms`). Kafka answers as soon as
    /// data arrives, so there it only bounds idle polling (100 to 500 ms is usual); tansu 0.6
    /// holds every fetch for the whole wait, so on the dev stack it is each hop's latency.
    pub fetch_wait_max_ms: u32,
    /// Largest record the producer sends (librdkafka `message.max.bytes`; keep it at or below
    /// the broker's limit). An output larger than this rejects the record it came from.
    pub message_max_bytes: u32,
    /// When partitions are revoked (a rebalance), how long records already in hand may take to
    /// finish before their offsets are committed and the partitions let go. Keep it well under
    /// `session_timeout_ms`; what does not finish is redelivered to the next owner.
    pub revoke_timeout_ms: u32,
    /// On shutdown, how long records in hand may take to finish before the process commits what
    /// is done and exits (keep it under the pod's termination grace period).
    pub drain_timeout_ms: u32,
    /// librdkafka settings passed through to every client (see [`KafkaProperties`]): TLS and
    /// SASL above all.
    pub properties: KafkaProperties,
}

/// librdkafka settings passed through as they are, e.g. `security.protocol = "SASL_SSL"`,
/// `sasl.mechanism = "SCRAM-SHA-512"`, `sasl.username`, `sasl.password`, `ssl.ca.location`.
/// They are set before Forfall's own consumer and producer settings, so the settings its
/// guarantees rest on (offsets stored only after the outputs are acknowledged, idempotent
/// producing) cannot be turned off by accident. Nested tables read as dotted names, which is
/// what `FORFALL_KAFKA__PROPERTIES__SASL__PASSWORD` makes of `sasl.password`. Values of
/// settings that name a secret never show in `Debug`.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KafkaProperties(BTreeMap<String, PropertyValue>);

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
enum PropertyValue {
    Flag(bool),
    Integer(i64),
    Number(f64),
    Text(String),
    Table(BTreeMap<String, PropertyValue>),
}

impl KafkaProperties {
    /// Every setting with its dotted name and its value as librdkafka reads it.
    pub fn flattened(&self) -> Vec<(String, String)> {
        fn walk(prefix: &str, table: &BTreeMap<String, PropertyValue>, out: &mut Vec<(String, String)>) {
            for (key, value) in table {
                let name = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                match value {
                    PropertyValue::Flag(b) => out.push((name, b.to_string())),
                    PropertyValue::Integer(i) => out.push((name, i.to_string())),
                    PropertyValue::Number(n) => out.push((name, n.to_string())),
                    PropertyValue::Text(t) => out.push((name, t.clone())),
                    PropertyValue::Table(inner) => walk(&name, inner, out),
                }
            }
        }
        let mut out = Vec::new();
        walk("", &self.0, &mut out);
        out
    }
}

/// A librdkafka setting whose value is a credential (`sasl.password`, `ssl.key.password`,
/// `sasl.oauthbearer.client.secret`, an inline `ssl.key.pem`, a JAAS line).
fn names_a_secret(name: &str) -> bool {
    ["password", "secret", "token", ".pem", "jaas"]
        .iter()
        .any(|part| name.contains(part))
}

impl std::fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut map = f.debug_map();
        for (name, value) in self.flattened() {
            if names_a_secret(&name) {
                map.entry(&name, &"(secret)");
            } else {
                map.entry(&name, &value);
            }
        }
        map.finish()
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            group_prefix: "forfall".into(),
            session_timeout_ms: 6000,
            heartbeat_interval_ms: 500,
            partitions: 3,
            replication_factor: 1,
            create_topics: true,
            max_in_flight: 10_000,
            linger_ms: 20,
            fetch_wait_max_ms: 10,
            message_max_bytes: 1_000_000,
            revoke_timeout_ms: 2_000,
            drain_timeout_ms: 10_000,
            properties: KafkaProperties::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RegistryConfig {
    pub url: String,
    /// Register the service's schemas at start (dev, and the usual `auto.register.schemas`).
    pub auto_register: bool,
    /// HTTP basic authentication (Confluent Cloud's API key and secret, Karapace, Apicurio).
    pub username: Option<String>,
    /// Its password (`FORFALL_REGISTRY__PASSWORD`, from a Secret).
    pub password: Option<Secret>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8081".into(),
            auto_register: true,
            username: None,
            password: None,
        }
    }
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RedisConfig {
    /// `redis://host:port/db`, or `rediss://` for TLS.
    pub url: String,
    /// The ACL user, when not `default`.
    pub username: Option<String>,
    /// Its password (`FORFALL_REDIS__PASSWORD`, from a Secret), rather than one in the URL.
    pub password: Option<Secret>,
    /// Prefix of every key, so that several deployments (or tests) can share one Redis.
    pub key_prefix: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379/".into(),
            username: None,
            password: None,
            key_prefix: "forfall:".into(),
        }
    }
}

/// The URL without a password in it, and the password setting only as "(secret)".
impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redacted_url(&self.url))
            .field("username", &self.username)
            .field("password", &self.password)
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

/// `url` with the password of its user information, if any, replaced: what may be logged of a
/// URL such as `redis://:hunter2@redis:6379/`.
pub fn redacted_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rsplit_once('@') {
        Some((user_info, host)) => {
            let user = user_info.split_once(':').map_or(user_info, |(user, _)| user);
            format!("{scheme}://{user}:(secret)@{host}{}", &rest[authority_end..])
        }
        None => url.to_owned(),
    }
}

/// Topic names. Tests give each run its own prefix.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Topics {
    pub prefix: String,
    pub billing_invoice_events: String,
    pub invoices: String,
    pub rejected: String,
    pub journey_actions: String,
    pub journey_events: String,
    pub dispatch_outcomes: String,
    pub payments: String,
    pub payments_matched: String,
    pub payments_unmatched: String,
    pub handoff_cases: String,
    pub handoff_outcomes: String,
    pub debtor_requests: String,
    /// The watcher's state (compacted; see [`crate::changelog`]). Not in [`Topics::all`]: the
    /// watcher creates it with its settings.
    pub watcher_changelog: String,
    /// Dispatch's held messages and sent-message receipts' keys (compacted). Not in
    /// [`Topics::all`]: dispatch creates it.
    pub dispatch_changelog: String,
    /// The portal's payments under way at providers (compacted). Not in [`Topics::all`]: the
    /// portal creates it.
    pub portal_changelog: String,
}

impl Default for Topics {
    fn default() -> Self {
        Self {
            prefix: String::new(),
            billing_invoice_events: "billing.invoice-events.v1".into(),
            invoices: "forfall.invoices.v1".into(),
            rejected: "forfall.rejected.v1".into(),
            journey_actions: "forfall.journey.actions.v1".into(),
            journey_events: "forfall.journey.events.v1".into(),
            dispatch_outcomes: "forfall.dispatch.outcomes.v1".into(),
            payments: "payments.events.v1".into(),
            payments_matched: "forfall.payments.matched.v1".into(),
            payments_unmatched: "forfall.payments.unmatched.v1".into(),
            handoff_cases: "forfall.handoff.cases.v1".into(),
            handoff_outcomes: "forfall.handoff.outcomes.v1".into(),
            debtor_requests: "forfall.debtor.requests.v1".into(),
            watcher_changelog: "forfall.watcher.changelog.v1".into(),
            dispatch_changelog: "forfall.dispatch.changelog.v1".into(),
            portal_changelog: "forfall.portal.changelog.v1".into(),
        }
    }
}

impl Topics {
    pub fn with_prefix(prefix: &str) -> Self {
        Topics {
            prefix: prefix.to_owned(),
            ..Topics::default()
        }
    }

    /// The full name of a topic, with the deployment's prefix.
    pub fn name(&self, topic: &str) -> String {
        format!("{}{}", self.prefix, topic)
    }

    pub fn all(&self) -> Vec<String> {
        [
            &self.billing_invoice_events,
            &self.invoices,
            &self.rejected,
            &self.journey_actions,
            &self.journey_events,
            &self.dispatch_outcomes,
            &self.payments,
            &self.payments_matched,
            &self.payments_unmatched,
            &self.handoff_cases,
            &self.handoff_outcomes,
            &self.debtor_requests,
        ]
        .into_iter()
        .map(|t| self.name(t))
        .collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct AdminConfig {
    pub bind: String,
    /// Port of the first service's admin endpoint; each service adds its own offset.
    /// 0 picks free ports (tests).
    pub base_port: u16,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1".into(),
            base_port: 9600,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LogConfig {
    /// `auto` (JSON unless stderr is a terminal), `json` or `pretty`.
    pub format: String,
    /// An `EnvFilter` directive; `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: "auto".into(),
            level: "info".into(),
        }
    }
}

/// Defaults, then the file, then `FORFALL_*` variables.
pub fn figment(file: Option<&Path>) -> Figment {
    let mut figment = Figment::from(Serialized::defaults(CommonConfig::default()));
    let path = file
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("FORFALL_CONFIG").map(Into::into))
        .unwrap_or_else(|| "forfall.toml".into());
    // JSON for files generated from data, such as the Helm chart's ConfigMap: Helm keeps every
    // number of its values as a float, and its TOML would write `500.0` where a count is meant.
    figment = if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json")) {
        figment.merge(Json::file(path))
    } else {
        figment.merge(Toml::file(path))
    };
    figment.merge(Env::prefixed("FORFALL_").split("__"))
}

/// Extracts one section (a service's own settings) with its defaults.
/// A secret setting (a token, a password): read like a string, never shown by `Debug`, so
/// settings can be logged whole.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("(secret)")
    }
}

pub fn section<T: DeserializeOwned + Default + Serialize>(figment: &Figment, name: &str) -> Result<T, ConfigError> {
    Figment::from(Serialized::defaults(T::default()))
        .merge(figment.focus(name))
        .extract()
        .map_err(|e| ConfigError(Box::new(e)))
}

pub fn common(figment: &Figment) -> Result<CommonConfig, ConfigError> {
    figment.extract().map_err(|e| ConfigError(Box::new(e)))
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail API returns figment::Error
mod tests {
    use super::*;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(default)]
    struct Svc {
        port: u16,
        name: String,
    }

    #[test]
    fn file_then_env_override_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "forfall.toml",
                "[kafka]\nbrokers = \"10.0.0.1:9092\"\n[svc]\nport = 7\n",
            )?;
            jail.set_env("FORFALL_SVC__NAME", "from-env");
            jail.set_env("FORFALL_REDIS__KEY_PREFIX", "x:");
            let f = figment(None);
            let c = common(&f).unwrap();
            assert_eq!(c.kafka.brokers, "10.0.0.1:9092");
            assert_eq!(c.redis.key_prefix, "x:");
            assert_eq!(c.kafka.session_timeout_ms, 6000, "untouched defaults stay");
            let s: Svc = section(&f, "svc").unwrap();
            assert_eq!(
                s,
                Svc {
                    port: 7,
                    name: "from-env".into()
                }
            );
            Ok(())
        });
    }

    #[test]
    fn production_is_the_profile_unless_development_is_chosen() {
        figment::Jail::expect_with(|jail| {
            assert_eq!(common(&figment(None)).unwrap().profile, Profile::Production);
            jail.set_env("FORFALL_PROFILE", "development");
            assert_eq!(common(&figment(None)).unwrap().profile, Profile::Development);
            jail.set_env("FORFALL_PROFILE", "staging");
            let err = common(&figment(None)).unwrap_err().to_string();
            assert!(err.contains("staging"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn production_refuses_published_secrets_and_says_how_to_set_each() {
        let secrets = [
            (
                "dispatch.pay_link.secret",
                "forfall-dev-pay-link-secret",
                "forfall-dev-pay-link-secret",
            ),
            ("dispatch.webhook.secret", "a real one", "forfall-dev-webhook-secret"),
            (
                "dispatch.receipts.elks46_token",
                "forfall-dev-46elks",
                "forfall-dev-46elks",
            ),
        ];
        assert!(Profile::Development.refuse_development_secrets(&secrets).is_ok());
        let err = Profile::Production.refuse_development_secrets(&secrets).unwrap_err();
        assert_eq!(err.0, ["dispatch.pay_link.secret", "dispatch.receipts.elks46_token"]);
        let said = err.to_string();
        assert!(said.contains("FORFALL_DISPATCH__PAY_LINK__SECRET"), "{said}");
        assert!(said.contains("FORFALL_DISPATCH__RECEIPTS__ELKS46_TOKEN"), "{said}");
        assert!(!said.contains("forfall-dev"), "the error shows no secret: {said}");
        assert!(Profile::Production.refuse_development_secrets(&secrets[1..2]).is_ok());
    }

    #[test]
    fn kafka_properties_pass_through_with_dotted_names_from_files_and_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "forfall.toml",
                "[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\"socket.keepalive.enable\" = true\n",
            )?;
            jail.set_env("FORFALL_KAFKA__PROPERTIES__SASL__USERNAME", "forfall");
            jail.set_env("FORFALL_KAFKA__PROPERTIES__SASL__PASSWORD", "hunter2-kafka");
            jail.set_env("FORFALL_KAFKA__PROPERTIES__MESSAGE__TIMEOUT__MS", "30000");
            let c = common(&figment(None)).unwrap();
            let mut found = c.kafka.properties.flattened();
            found.sort();
            let found: Vec<(&str, &str)> = found.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            assert_eq!(
                found,
                [
                    ("message.timeout.ms", "30000"),
                    ("sasl.mechanism", "SCRAM-SHA-512"),
                    ("sasl.password", "hunter2-kafka"),
                    ("sasl.username", "forfall"),
                    ("security.protocol", "SASL_SSL"),
                    ("socket.keepalive.enable", "true"),
                ]
            );
            let shown = format!("{:?}", c.kafka);
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("sasl.username") && shown.contains("SASL_SSL"), "{shown}");
            Ok(())
        });
    }

    #[test]
    fn passwords_in_urls_and_settings_never_show() {
        assert_eq!(
            redacted_url("redis://:hunter2@redis:6379/0"),
            "redis://:(secret)@redis:6379/0"
        );
        assert_eq!(
            redacted_url("rediss://forfall:hunter2@redis.example:6380"),
            "rediss://forfall:(secret)@redis.example:6380"
        );
        assert_eq!(redacted_url("redis://127.0.0.1:6379/"), "redis://127.0.0.1:6379/");
        let redis = RedisConfig {
            url: "redis://:in-the-url@redis:6379/".into(),
            password: Some(Secret("from-a-secret".into())),
            ..RedisConfig::default()
        };
        let registry = RegistryConfig {
            username: Some("key".into()),
            password: Some(Secret("api-secret".into())),
            ..RegistryConfig::default()
        };
        let shown = format!("{redis:?} {registry:?}");
        for secret in ["in-the-url", "from-a-secret", "api-secret"] {
            assert!(!shown.contains(secret), "{shown}");
        }
    }

    #[test]
    fn a_json_file_is_read_as_json() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "forfall.json",
                r#"{"kafka": {"brokers": "10.0.0.2:9092", "fetch_wait_max_ms": 500}, "svc": {"port": 8}}"#,
            )?;
            let f = figment(Some(Path::new("forfall.json")));
            let c = common(&f).unwrap();
            assert_eq!(c.kafka.brokers, "10.0.0.2:9092");
            assert_eq!(c.kafka.fetch_wait_max_ms, 500);
            let s: Svc = section(&f, "svc").unwrap();
            assert_eq!(s.port, 8);
            Ok(())
        });
    }

    #[test]
    fn a_wrong_type_names_the_key() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("forfall.toml", "[kafka]\npartitions = \"many\"\n")?;
            let err = common(&figment(None)).unwrap_err().to_string();
            assert!(err.contains("partitions"), "{err}");
            Ok(())
        });
    }
}
