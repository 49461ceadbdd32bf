//! The admin HTTP endpoint every service exposes: `/metrics`, `/healthz` (the process is
//! alive) and `/readyz` (connected and consuming). Services may merge routes of their own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Ready when the service has joined its consumer group and nothing it depends on is away:
/// while any record waits out a fault (broker, Redis, registry), `/readyz` says so.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    joined: Arc<AtomicBool>,
    waiting_out_faults: Arc<AtomicUsize>,
    rebuilding: Arc<AtomicUsize>,
}

impl Readiness {
    pub fn set_ready(&self, ready: bool) {
        self.joined.store(ready, Ordering::SeqCst);
    }

    /// Whether the service has joined (whatever faults it is waiting out).
    pub fn has_joined(&self) -> bool {
        self.joined.load(Ordering::SeqCst)
    }

    pub fn is_ready(&self) -> bool {
        self.reason().is_none()
    }

    /// Marks the service not ready while a partition's state is rebuilt from its changelog.
    pub fn rebuilding_state(&self) -> FaultGuard {
        self.rebuilding.fetch_add(1, Ordering::SeqCst);
        FaultGuard(self.rebuilding.clone())
    }

    /// Marks the service not ready until the returned guard is dropped.
    pub fn waiting_out_fault(&self) -> FaultGuard {
        self.waiting_out_faults.fetch_add(1, Ordering::SeqCst);
        FaultGuard(self.waiting_out_faults.clone())
    }

    /// Why the service is not ready, if it is not.
    pub fn reason(&self) -> Option<&'static str> {
        if !self.has_joined() {
            Some("not ready: not consuming (joining the consumer group, or stopping)")
        } else if self.rebuilding.load(Ordering::SeqCst) > 0 {
            Some("not ready: rebuilding its state in Redis from the topics")
        } else if self.waiting_out_faults.load(Ordering::SeqCst) > 0 {
            Some("not ready: waiting for the broker, Redis or the schema registry to come back")
        } else {
            None
        }
    }
}

/// Held while a record waits out a fault; see [`Readiness::waiting_out_fault`].
#[derive(Debug)]
pub struct FaultGuard(Arc<AtomicUsize>);

impl Drop for FaultGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
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
    match state.readiness.reason() {
        None => (StatusCode::OK, "ready"),
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason),
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
        // The peer's address reaches handlers that limit requests per client.
        let served = axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "HTTP server stopped");
        }
    });
    Ok(addr)
}

/// Whether a secret given in a request is the one kept: their digests are compared, so the
/// time taken tells nothing of the secret. An empty one is never the same.
pub fn same_secret(given: &str, kept: &str) -> bool {
    use sha2::Digest;
    !given.is_empty()
        && !kept.is_empty()
        && sha2::Sha256::digest(given.as_bytes()) == sha2::Sha256::digest(kept.as_bytes())
}

/// The bearer token a request carries (`Authorization: Bearer ...`); empty when none.
pub fn bearer_token(headers: &axum::http::HeaderMap) -> &str {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
}

/// The answer to a staff request that does not carry `token` as its bearer token (401), or to
/// any while no token is configured (404, naming the `setting` that turns the API on); `None`
/// when the request may go on.
pub fn staff_refusal(
    token: Option<&str>,
    setting: &str,
    headers: &axum::http::HeaderMap,
) -> Option<axum::response::Response> {
    use axum::http::header;
    use axum::response::IntoResponse;
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        return Some((StatusCode::NOT_FOUND, format!("the staff API is off: set {setting}\n")).into_response());
    };
    (!same_secret(bearer_token(headers), token)).then(|| {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a staff token is needed\n",
        )
            .into_response()
    })
}
