//! The dispatch service as its own process.

fn main() -> anyhow::Result<()> {
    forfall_platform::service::main_for("dispatch", forfall_dispatch::run)
}
