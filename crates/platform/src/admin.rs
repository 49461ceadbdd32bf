//! The admin HTTP endpoint every service exposes: `/metrics`, `/healthz` (the process is
//! alive) and `/readyz` (connected and consuming). Services may merge routes of their own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Set when the service has joined its consumer group and can do its work.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set_ready(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: Metrics,
    readiness: Readiness,
}

pub fn router(metrics: Metrics, readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(AdminState { metrics, readiness })
}

async fn render_metrics(State(state): State<AdminState>) -> ([(&'static str, &'static str); 1], String) {
    ([("content-type", "text/plain; version=0.0.4")], state.metrics.render())
}

async fn ready(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if state.readiness.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// Binds `bind:port` (0 = any free port) and serves `router` until `shutdown`.
/// Returns the bound address, so tests and the all-in-one binary can report it.
pub async fn serve(bind: &str, port: u16, router: Router, shutdown: CancellationToken) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind((bind, port))
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind admin/HTTP port {bind}:{port}: {e}"))?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "HTTP server stopped");
        }
    });
    Ok(addr)
}
