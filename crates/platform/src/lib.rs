//! Forfall's imperative shell, shared by every service: configuration, Kafka consume/produce
//! loops with commit-after-ack, Avro + schema registry serde, Redis, metrics, tracing, the
//! admin HTTP endpoints (metrics, health, readiness), the clock and graceful shutdown.
//!
//! Services own their decisions (in `forfall-domain`) and their loop bodies; everything that
//! would otherwise be copied between services lives here.

pub mod admin;
pub mod api_auth;
pub mod avro;
pub mod changelog;
pub mod clock;
pub mod config;
pub mod derived_state;
pub mod journey_state;
pub mod kafka;
pub mod metrics;
pub mod pay_links;
pub mod rebuild_resume;
pub mod records;
pub mod redis_settings;
pub mod redis_store;
pub mod service;
pub mod shutdown;
pub mod signing;
pub mod telemetry;
pub mod topic_read;

pub use clock::{Clock, SharedClock};
pub use config::{CommonConfig, Topics};

/// Every Forfall process allocates through mimalloc: records are decoded, encoded and dropped
/// by the hundred thousand, and glibc's allocator took about a fifth of a service's CPU in the
/// payment benchmark's profile.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
