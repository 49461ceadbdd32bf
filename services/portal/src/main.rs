//! The portal as its own process.

fn main() -> anyhow::Result<()> {
    forfall_platform::service::main_for("portal", forfall_portal::run)
}
