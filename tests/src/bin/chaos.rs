//! `make chaos`: the fault suite at full size, several runs in a row. Each run is a baseline
//! without faults and a run with faults of the same seed; the checker's counts must all be 0.
//!
//! `chaos [--runs N] [--debtors N] [--seed S]` (with --seed, runs replay S, S+1, ...).

use forfall_e2e::chaos;

fn arg(name: &str) -> Option<u64> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let base = forfall_e2e::base_config();
    forfall_platform::telemetry::init(&base.log, &base.traces, "chaos")?;
    let runs = arg("--runs").unwrap_or(3);
    let debtors = arg("--debtors").unwrap_or(2000) as usize;
    let first_seed = arg("--seed").unwrap_or_else(|| u64::from(rand::random::<u32>()));
    let mut failed = 0;
    for run in 0..runs {
        let seed = first_seed + run;
        println!("chaos run {}/{runs}: seed {seed}, {debtors} debtors", run + 1);
        let (baseline, faulty) = chaos::baseline_and_faults(seed, debtors).await?;
        println!("{}", chaos::describe(&baseline, &faulty));
        if !(baseline.passed() && faulty.passed()) {
            failed += 1;
        }
    }
    anyhow::ensure!(
        failed == 0,
        "{failed} of {runs} chaos runs found a loss, a duplicate or a crash"
    );
    Ok(())
}
