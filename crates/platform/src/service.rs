//! What every service starts from: its configuration, clock, shutdown token, registry codec,
//! metrics, readiness and admin endpoint, and the helpers to build its consume loops.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use figment::Figment;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Readiness};
use crate::avro::Codec;
use crate::clock::SharedClock;
use crate::config::CommonConfig;
use crate::kafka::{self, KafkaConsumer, LoopContext, Producer};
use crate::metrics::Metrics;
use crate::redis_store::Keys;

/// Shared by all services of one process.
#[derive(Clone)]
pub struct Runtime {
    pub config: CommonConfig,
    pub figment: Figment,
    pub clock: SharedClock,
    pub shutdown: CancellationToken,
    pub codec: Arc<Codec>,
    /// Where each service's admin endpoint ended up (ports may be chosen by the OS).
    pub admin_addrs: Arc<Mutex<HashMap<&'static str, SocketAddr>>>,
    /// The name this copy of the runtime registers its admin address under, when several
    /// instances of one service share a process (tests of rebalancing); the service's name otherwise.
    pub instance: Option<&'static str>,
}

impl Runtime {
    pub fn new(
        config: CommonConfig,
        figment: Figment,
        clock: SharedClock,
        shutdown: CancellationToken,
    ) -> Result<Self, crate::avro::CodecError> {
        let codec = Arc::new(Codec::for_registry(&config.registry)?);
        Ok(Self {
            config,
            figment,
            clock,
            shutdown,
            codec,
            admin_addrs: Arc::default(),
            instance: None,
        })
    }

    pub fn admin_addr(&self, service: &str) -> Option<SocketAddr> {
        self.admin_addrs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
            .copied()
    }

    pub fn keys(&self) -> Keys {
        Keys::new(&self.config.redis.key_prefix)
    }

    pub fn topic(&self, name: &str) -> String {
        self.config.topics.name(name)
    }
}

/// One running service's shell: its metrics, readiness, producer and admin address.
#[derive(Clone)]
pub struct ServiceShell {
    pub name: &'static str,
    pub metrics: Metrics,
    pub readiness: Readiness,
    pub producer: Producer,
    pub admin_addr: SocketAddr,
}

impl ServiceShell {
    /// Creates metrics and the producer, creates missing topics (dev), and serves the admin
    /// endpoint (plus `routes`) on `base_port + port_offset` (or a free port when base is 0).
    pub async fn start(
        rt: &Runtime,
        name: &'static str,
        port_offset: u16,
        routes: Option<Router>,
    ) -> anyhow::Result<Self> {
        Self::start_with_routes(rt, name, port_offset, |_, _, _| routes.unwrap_or_default()).await
    }

    /// Like [`ServiceShell::start`], with routes built from the service's own metrics and
    /// producer (an HTTP intake that produces records and counts what it refuses) and readiness.
    pub async fn start_with_routes(
        rt: &Runtime,
        name: &'static str,
        port_offset: u16,
        routes: impl FnOnce(&Metrics, &Producer, &Readiness) -> Router,
    ) -> anyhow::Result<Self> {
        let metrics = Metrics::new(name)?;
        let readiness = Readiness::default();
        if rt.config.kafka.create_topics {
            kafka::ensure_topics(&rt.config.kafka, &rt.config.topics.all()).await?;
        }
        let producer = Producer::new(&rt.config.kafka, metrics.clone())?;
        let router = admin::router(metrics.clone(), readiness.clone()).merge(routes(&metrics, &producer, &readiness));
        let port = if rt.config.admin.base_port == 0 {
            0
        } else {
            rt.config.admin.base_port + port_offset
        };
        let admin_addr = admin::serve(&rt.config.admin.bind, port, router, rt.shutdown.clone()).await?;
        rt.admin_addrs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rt.instance.unwrap_or(name), admin_addr);
        tracing::info!(service = name, admin = %admin_addr, "service started");
        Ok(Self {
            name,
            metrics,
            readiness,
            producer,
            admin_addr,
        })
    }

    /// A producer that lingers `linger_ms` instead of `kafka.linger_ms`, for outputs a service
    /// waits on in a latency-bound loop (the shell's own producer when the two agree). It
    /// counts into the shell's metrics.
    pub fn producer_lingering(&self, rt: &Runtime, linger_ms: u32) -> anyhow::Result<Producer> {
        if linger_ms == rt.config.kafka.linger_ms {
            return Ok(self.producer.clone());
        }
        let config = crate::config::KafkaConfig {
            linger_ms,
            ..rt.config.kafka.clone()
        };
        Ok(Producer::new(&config, self.metrics.clone())?)
    }

    pub fn consumer(&self, rt: &Runtime, group: &str, topics: &[String]) -> anyhow::Result<Arc<KafkaConsumer>> {
        Ok(Arc::new(kafka::consumer(&rt.config.kafka, group, topics)?))
    }

    pub fn loop_context(&self, rt: &Runtime) -> LoopContext {
        LoopContext {
            service: self.name,
            producer: self.producer.clone(),
            codec: rt.codec.clone(),
            metrics: self.metrics.clone(),
            rejected_topic: rt.topic(&rt.config.topics.rejected),
            readiness: self.readiness.clone(),
            shutdown: rt.shutdown.clone(),
            max_in_flight: rt.config.kafka.max_in_flight,
            key_concurrency: 1,
            lane: None,
            batch: 1,
            drain_timeout: std::time::Duration::from_millis(rt.config.kafka.drain_timeout_ms.into()),
        }
    }
}

/// The `main` of a single-service binary: configuration, logging, signals, then `run`.
pub fn main_for<F, Fut>(name: &'static str, run: F) -> anyhow::Result<()>
where
    F: FnOnce(Runtime) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = runtime.block_on(async {
        let figment = crate::config::figment(None);
        let config = crate::config::common(&figment)?;
        crate::telemetry::init(&config.log, &config.traces, &format!("forfall-{name}"))?;
        let shutdown = CancellationToken::new();
        crate::shutdown::cancel_on_signals(shutdown.clone());
        let clock: crate::clock::SharedClock = match &config.clock.shared_redis_key {
            None => Arc::new(crate::clock::SystemClock),
            Some(key) => {
                tracing::warn!(%key, "following the simulated clock in Redis (dev and test only)");
                crate::clock::SharedRedisClock::follow(&config.redis.url, key, shutdown.clone()).await?
            }
        };
        let rt = Runtime::new(config, figment, clock, shutdown)?;
        let result = run(rt).await;
        match &result {
            Ok(()) => tracing::info!(service = name, "stopped"),
            Err(error) => tracing::error!(service = name, error = format!("{error:#}"), "failed"),
        }
        result
    });
    // The spans still queued go out before the process ends.
    crate::telemetry::shutdown();
    result
}
