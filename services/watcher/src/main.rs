//! The watcher service as its own process.

fn main() -> anyhow::Result<()> {
    forfall_platform::service::main_for("watcher", forfall_watcher::run)
}
