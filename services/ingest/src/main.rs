//! The ingest service as its own process.

fn main() -> anyhow::Result<()> {
    forfall_platform::service::main_for("ingest", forfall_ingest::run)
}
