//! The Redis settings production needs, checked when a service connects: each one that is off
//! is logged as a warning naming the setting, the value found, the value wanted and why. A check
//! never stops a service: managed Redis (ElastiCache, Memorystore) often renames or disables
//! `CONFIG`, and then one warning lists what to verify by hand.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::ConnectionManager;

/// The settings read with `CONFIG GET`. `hash-max-ziplist-value` is the name before Redis 7
/// (an alias of `hash-max-listpack-value` since).
pub const SETTINGS: &[&str] = &[
    "appendonly",
    "appendfsync",
    "maxmemory-policy",
    "maxmemory",
    LISTPACK_VALUE,
    ZIPLIST_VALUE,
];

const LISTPACK_VALUE: &str = "hash-max-listpack-value";
const ZIPLIST_VALUE: &str = "hash-max-ziplist-value";

/// Smallest `hash-max-listpack-value` that keeps a bucket hash holding journeys compact.
pub const MIN_HASH_VALUE: u64 = 1024;

/// Longest the check may hold up a service's start.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

const AOF_REASON: &str = "Redis can be rebuilt from the topics, but a large deployment takes minutes to rebuild; \
                          AOF keeps a restart cheap";
const FSYNC_REASON: &str = "everysec loses at most about a second of writes in a crash without an fsync per write";
const POLICY_REASON: &str = "any eviction policy silently drops journeys, timers and idempotency keys; with \
                             noeviction Redis refuses writes instead, which the services wait out as a transient \
                             fault (counted in retries_total)";
const MAXMEMORY_REASON: &str = "with no limit the OS kills Redis when memory runs out instead of Redis refusing \
                                writes; set a limit with headroom below the machine's memory";
const HASH_REASON: &str = "journeys are fields of bucketed hashes; below 1024 a hash holding a journey converts \
                           to a hashtable and costs about 60 bytes more per invoice";

/// One setting that is not what production needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub setting: &'static str,
    /// `None` when `CONFIG GET` did not report the setting (an older Redis, or renamed).
    pub found: Option<String>,
    pub wanted: &'static str,
    pub reason: &'static str,
}

impl Finding {
    fn new(setting: &'static str, found: Option<&str>, wanted: &'static str, reason: &'static str) -> Self {
        Self {
            setting,
            found: found.map(str::to_owned),
            wanted,
            reason,
        }
    }

    /// The value found, as logged.
    pub fn found_text(&self) -> &str {
        self.found.as_deref().unwrap_or("(not reported by CONFIG GET)")
    }
}

/// What checking a Redis server came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// The settings were read; the findings are those that are off (none: all good).
    Checked(Vec<Finding>),
    /// `CONFIG GET` was refused or did not answer; the settings must be verified by hand.
    Unchecked { error: String },
}

/// The findings for the values `CONFIG GET` returned (setting name to value). Names are
/// compared as Redis reports them (lower case); values case-insensitively.
pub fn review(config: &HashMap<String, String>) -> Vec<Finding> {
    let get = |name: &str| config.get(name).map(String::as_str);
    let is = |value: Option<&str>, wanted: &str| value.is_some_and(|v| v.eq_ignore_ascii_case(wanted));
    let mut findings = Vec::new();

    let appendonly = get("appendonly");
    if !is(appendonly, "yes") {
        findings.push(Finding::new("appendonly", appendonly, "yes", AOF_REASON));
    }
    let appendfsync = get("appendfsync");
    if !is(appendfsync, "everysec") {
        findings.push(Finding::new("appendfsync", appendfsync, "everysec", FSYNC_REASON));
    }
    let policy = get("maxmemory-policy");
    if !is(policy, "noeviction") {
        findings.push(Finding::new("maxmemory-policy", policy, "noeviction", POLICY_REASON));
    }
    let maxmemory = get("maxmemory");
    if maxmemory.is_none_or(|v| v.trim().parse::<u64>().is_ok_and(|bytes| bytes == 0)) {
        findings.push(Finding::new(
            "maxmemory",
            maxmemory,
            "a limit with headroom (not 0)",
            MAXMEMORY_REASON,
        ));
    }
    // Redis 7 reports both names (one is an alias); older Redis only the ziplist one.
    let (name, value) = match (get(LISTPACK_VALUE), get(ZIPLIST_VALUE)) {
        (Some(v), _) => (LISTPACK_VALUE, Some(v)),
        (None, Some(v)) => (ZIPLIST_VALUE, Some(v)),
        (None, None) => (LISTPACK_VALUE, None),
    };
    if value
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_none_or(|v| v < MIN_HASH_VALUE)
    {
        findings.push(Finding::new(name, value, ">= 1024", HASH_REASON));
    }
    findings
}

/// Reads [`SETTINGS`] with `CONFIG GET` (one name per call: Redis before 7 takes only one).
/// Never fails: a refused or unanswered `CONFIG` is [`Check::Unchecked`].
pub async fn check(con: &ConnectionManager) -> Check {
    let mut con = con.clone();
    let read = async {
        let mut config = HashMap::new();
        for name in SETTINGS {
            let reply: HashMap<String, String> =
                redis::cmd("CONFIG").arg("GET").arg(*name).query_async(&mut con).await?;
            config.extend(reply.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)));
        }
        Ok::<_, redis::RedisError>(config)
    };
    match tokio::time::timeout(CHECK_TIMEOUT, read).await {
        Ok(Ok(config)) => Check::Checked(review(&config)),
        Ok(Err(e)) => Check::Unchecked { error: e.to_string() },
        Err(_) => Check::Unchecked {
            error: format!("no answer within {CHECK_TIMEOUT:?}"),
        },
    }
}

/// [`check`], then one warning per finding, or one saying what to verify by hand when the
/// settings could not be read.
pub async fn check_and_warn(con: &ConnectionManager) -> Check {
    let result = check(con).await;
    match &result {
        Check::Checked(findings) => {
            for f in findings {
                tracing::warn!(
                    setting = f.setting,
                    found = f.found_text(),
                    wanted = f.wanted,
                    reason = f.reason,
                    "Redis setting {} is {}, production wants {}",
                    f.setting,
                    f.found_text(),
                    f.wanted,
                );
            }
        }
        Check::Unchecked { error } => tracing::warn!(
            error = error.as_str(),
            verify = "appendonly yes, appendfsync everysec, maxmemory-policy noeviction, maxmemory set with \
                      headroom, hash-max-listpack-value >= 1024",
            "could not read the Redis settings (CONFIG refused or renamed, as on managed Redis); verify them by hand"
        ),
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    const GOOD: &[(&str, &str)] = &[
        ("appendonly", "yes"),
        ("appendfsync", "everysec"),
        ("maxmemory-policy", "noeviction"),
        ("maxmemory", "8589934592"),
        ("hash-max-listpack-value", "1024"),
        ("hash-max-ziplist-value", "1024"),
    ];

    fn with(changes: &[(&str, &str)]) -> HashMap<String, String> {
        let mut c = config(GOOD);
        c.extend(config(changes));
        c
    }

    fn settings(findings: &[Finding]) -> Vec<&'static str> {
        findings.iter().map(|f| f.setting).collect()
    }

    #[test]
    fn production_settings_have_no_findings() {
        assert_eq!(review(&config(GOOD)), vec![]);
        let upper = with(&[("appendonly", "YES"), ("maxmemory-policy", "NoEviction")]);
        assert_eq!(review(&upper), vec![], "values are compared case-insensitively");
        let larger = with(&[("hash-max-listpack-value", "4096"), ("hash-max-ziplist-value", "4096")]);
        assert_eq!(review(&larger), vec![]);
    }

    #[test]
    fn each_setting_that_is_off_is_a_finding_naming_it() {
        let cases: &[(&str, &str, &str)] = &[
            ("appendonly", "no", "yes"),
            ("appendfsync", "always", "everysec"),
            ("appendfsync", "no", "everysec"),
            ("maxmemory-policy", "allkeys-lru", "noeviction"),
            ("maxmemory-policy", "volatile-ttl", "noeviction"),
            ("maxmemory", "0", "a limit with headroom (not 0)"),
            ("hash-max-listpack-value", "64", ">= 1024"),
            ("hash-max-listpack-value", "1023", ">= 1024"),
        ];
        for (setting, found, wanted) in cases {
            let findings = review(&with(&[(setting, found)]));
            assert_eq!(findings.len(), 1, "{setting}={found}: {findings:?}");
            let f = &findings[0];
            assert_eq!(
                (f.setting, f.found.as_deref(), f.wanted),
                (*setting, Some(*found), *wanted)
            );
            assert!(!f.reason.is_empty());
        }
    }

    #[test]
    fn the_dev_stack_settings_are_reported_together() {
        let dev = with(&[("appendonly", "no"), ("maxmemory", "0")]);
        assert_eq!(settings(&review(&dev)), ["appendonly", "maxmemory"]);
        let defaults = with(&[
            ("appendonly", "no"),
            ("maxmemory", "0"),
            ("maxmemory-policy", "allkeys-lru"),
            ("hash-max-listpack-value", "64"),
            ("hash-max-ziplist-value", "64"),
        ]);
        assert_eq!(
            settings(&review(&defaults)),
            ["appendonly", "maxmemory-policy", "maxmemory", "hash-max-listpack-value"]
        );
    }

    #[test]
    fn missing_settings_are_findings_with_nothing_found() {
        let findings = review(&HashMap::new());
        assert_eq!(
            settings(&findings),
            [
                "appendonly",
                "appendfsync",
                "maxmemory-policy",
                "maxmemory",
                "hash-max-listpack-value"
            ]
        );
        assert!(findings.iter().all(|f| f.found.is_none()));
        assert_eq!(findings[0].found_text(), "(not reported by CONFIG GET)");
    }

    #[test]
    fn before_redis_7_the_ziplist_name_is_read() {
        let mut old = config(GOOD);
        old.remove("hash-max-listpack-value");
        assert_eq!(review(&old), vec![]);
        old.insert("hash-max-ziplist-value".into(), "64".into());
        let findings = review(&old);
        assert_eq!(settings(&findings), ["hash-max-ziplist-value"]);
        assert_eq!(findings[0].found.as_deref(), Some("64"));
    }

    #[test]
    fn unreadable_numbers_are_findings() {
        assert_eq!(
            settings(&review(&with(&[("hash-max-listpack-value", "lots")]))),
            ["hash-max-listpack-value"]
        );
        // A maxmemory Redis would not report is not mistaken for "no limit".
        assert_eq!(review(&with(&[("maxmemory", "8gb")])), vec![]);
    }
}
