//! DEV AND TEST ONLY: serves the Confluent Schema Registry REST subset from memory.

use clap::Parser;

/// DEV AND TEST ONLY — an in-memory emulator of the Confluent Schema Registry REST API subset
/// that Forfall uses. Not for production: no persistence, no authentication.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8081", env = "FORFALL_REGISTRY_LISTEN")]
    listen: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    tracing::warn!(addr = %listener.local_addr()?, "schema registry EMULATOR listening (dev and test only)");
    axum::serve(listener, forfall_schema_registry_emulator::router())
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
