//! The matcher service as its own process.

fn main() -> anyhow::Result<()> {
    forfall_platform::service::main_for("matcher", forfall_matcher::run)
}
