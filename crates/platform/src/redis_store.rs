//! Redis connection and key naming. Redis holds derived state only: everything in it can be
//! rebuilt by replaying the topics.

use redis::aio::ConnectionManager;

use crate::config::RedisConfig;

#[derive(Debug, thiserror::Error)]
#[error("cannot connect to Redis at {url}: {source}")]
pub struct ConnectError {
    url: String,
    source: redis::RedisError,
}

/// Connects with automatic reconnection; commands fail fast while Redis is away and the
/// callers retry them as transient failures.
pub async fn connect(config: &RedisConfig) -> Result<ConnectionManager, ConnectError> {
    let err = |source| ConnectError {
        url: config.url.clone(),
        source,
    };
    let client = redis::Client::open(config.url.as_str()).map_err(err)?;
    client.get_connection_manager().await.map_err(err)
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
