//! `forfall demo` (what `make run` shows).

#[derive(Debug, clap::Args)]
pub struct DemoArgs {}

pub async fn run(_c: forfall_platform::CommonConfig, _f: figment::Figment, _a: DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("demo not written yet")
}
