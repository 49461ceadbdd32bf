//! The hand-off service as its own process.

fn main() -> anyhow::Result<()> {
    forfall_platform::service::main_for("handoff", forfall_handoff::run)
}
