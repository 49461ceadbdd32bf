//! Redis connection and key naming. Redis holds derived state only: everything in it can be
//! rebuilt by replaying the topics.

use std::collections::HashSet;
use std::sync::Mutex;

use redis::IntoConnectionInfo;
use redis::aio::ConnectionManager;

use crate::config::RedisConfig;

/// Runs `pipe`, whose first command invokes `script`; when Redis does not know the script
/// (restarted, or its scripts flushed) nothing of it ran: it is loaded and `pipe` runs once more.
/// The pipeline's other commands then run twice, so they must be safe to repeat.
pub async fn query_with_script<T: redis::FromRedisValue>(
    conn: &mut ConnectionManager,
    pipe: &redis::Pipeline,
    script: &redis::ScriptInvocation<'_>,
) -> redis::RedisResult<T> {
    match pipe.query_async(conn).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            script.load_async(conn).await?;
            pipe.query_async(conn).await
        }
        other => other,
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot connect to Redis at {url}: {source}")]
pub struct ConnectError {
    url: String,
    source: redis::RedisError,
}

/// A client for `redis.url` (`rediss://` for TLS) with `redis.username` and `redis.password`
/// when set (they win over any in the URL).
pub fn client(config: &RedisConfig) -> redis::RedisResult<redis::Client> {
    let info = config.url.as_str().into_connection_info()?;
    let mut login = info.redis_settings().clone();
    if let Some(username) = &config.username {
        login = login.set_username(username);
    }
    if let Some(password) = &config.password {
        login = login.set_password(password.expose());
    }
    redis::Client::open(info.set_redis_settings(login))
}

/// Connects with automatic reconnection; commands fail fast while Redis is away and the
/// callers retry them as transient failures.
///
/// The first connection of a process to a Redis checks the settings production needs and
/// warns about each one that is off ([`crate::redis_settings`]); it never fails for them.
/// Every service connects here, so each one checks at start; services sharing a process
/// (`forfall run`) check once.
pub async fn connect(config: &RedisConfig) -> Result<ConnectionManager, ConnectError> {
    let err = |source| ConnectError {
        url: crate::config::redacted_url(&config.url),
        source,
    };
    let client = client(config).map_err(err)?;
    // A Redis that is away at start (restarting, failing over, paused) is waited out like one
    // that goes away later; a wrong address or a refused login is not.
    let deadline = tokio::time::Instant::now() + CONNECT_PATIENCE;
    let mut backoff = std::time::Duration::from_millis(200);
    let con = loop {
        match client.get_connection_manager().await {
            Ok(con) => break con,
            Err(e)
                if (e.is_timeout() || e.is_io_error() || e.is_connection_refusal() || e.is_connection_dropped())
                    && tokio::time::Instant::now() + backoff < deadline =>
            {
                tracing::warn!(error = %e, "Redis does not answer yet; waiting for it");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
            }
            Err(e) => return Err(err(e)),
        }
    };
    if first_connection_to(&config.url) {
        crate::redis_settings::check_and_warn(&con).await;
    }
    Ok(con)
}

/// How long a service waits at start for a Redis that does not answer.
const CONNECT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(300);

/// Whether this process has not connected to `url` before.
fn first_connection_to(url: &str) -> bool {
    static CHECKED: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    CHECKED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashSet::new)
        .insert(url.to_owned())
}

/// Key names, all under one prefix. Hash tags (`{...}`) keep one invoice's keys in one
/// Redis Cluster slot so that scripts touching them stay atomic.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    pub fn key(&self, parts: &[&str]) -> String {
        let mut k = self.prefix.clone();
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                k.push(':');
            }
            k.push_str(p);
        }
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn tls_urls_are_understood_and_the_password_setting_wins_over_the_url() {
        let config = RedisConfig {
            url: "rediss://:from-the-url@redis.example:6380/2".into(),
            username: Some("forfall".into()),
            password: Some(Secret("from-a-secret".into())),
            ..RedisConfig::default()
        };
        let client = client(&config).unwrap();
        let info = client.get_connection_info();
        assert!(
            matches!(info.addr(), redis::ConnectionAddr::TcpTls { host, port: 6380, .. } if host == "redis.example"),
            "{:?}",
            info.addr()
        );
        assert_eq!(info.redis_settings().username(), Some("forfall"));
        assert_eq!(info.redis_settings().password(), Some("from-a-secret"));
        assert_eq!(info.redis_settings().db(), 2);
    }
}
