//! The container image (`Dockerfile`) holds every binary the Helm chart runs: each service's
//! and the CLI. No image can be built on these machines (no container daemon); this keeps the
//! Dockerfile from silently missing a service added later.

use std::path::Path;

#[test]
fn the_image_builds_and_ships_every_service_binary() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile"))?;
    let mut manifests = vec![root.join("crates/cli/Cargo.toml")];
    for entry in std::fs::read_dir(root.join("services"))?.flatten() {
        manifests.push(entry.path().join("Cargo.toml"));
    }
    let mut binaries = Vec::new();
    for manifest in manifests.iter().filter(|m| m.exists()) {
        let text = std::fs::read_to_string(manifest)?;
        let package = text
            .lines()
            .find_map(|l| l.strip_prefix("name = \""))
            .and_then(|l| l.strip_suffix('"'))
            .ok_or_else(|| anyhow::anyhow!("{}: no package name", manifest.display()))?;
        assert!(
            dockerfile.contains(&format!("-p {package} ")) || dockerfile.contains(&format!("-p {package}\n")),
            "the Dockerfile does not build package {package}"
        );
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            if line.trim() == "[[bin]]" {
                let name = lines
                    .next()
                    .and_then(|l| l.strip_prefix("name = \""))
                    .and_then(|l| l.strip_suffix('"'))
                    .ok_or_else(|| anyhow::anyhow!("{}: a [[bin]] without a name first", manifest.display()))?;
                binaries.push(name.to_owned());
            }
        }
    }
    assert!(binaries.len() >= 7, "{binaries:?}");
    let copied = dockerfile
        .lines()
        .find(|l| l.contains("for b in"))
        .ok_or_else(|| anyhow::anyhow!("the Dockerfile's copy loop"))?;
    for b in &binaries {
        assert!(
            copied.split_whitespace().any(|w| w.trim_end_matches(';') == b),
            "the image does not ship {b}: {copied}"
        );
    }
    assert!(dockerfile.contains("USER nonroot"), "the image runs as a non-root user");
    Ok(())
}

/// What the image is built from (`--no-default-features`) links no development stand-in: no mail
/// or SMS sink, agency or payment-provider simulator, no registry emulator.
#[test]
fn the_production_build_links_no_development_stand_in() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile"))?;
    let build = dockerfile
        .lines()
        .find(|l| l.contains("cargo build"))
        .ok_or_else(|| anyhow::anyhow!("the Dockerfile's cargo build"))?;
    assert!(build.contains("--no-default-features"), "{build}");
    let packages = [
        "forfall",
        "forfall-ingest",
        "forfall-watcher",
        "forfall-dispatch",
        "forfall-matcher",
        "forfall-handoff",
        "forfall-portal",
    ];
    let tree = |features: &[&str]| -> anyhow::Result<String> {
        let mut cargo = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cargo
            .current_dir(&root)
            .args(["tree", "--offline", "-e", "normal", "--prefix", "none"])
            .args(features);
        for p in packages {
            cargo.args(["-p", p]);
        }
        let out = cargo.output()?;
        anyhow::ensure!(
            out.status.success(),
            "cargo tree: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    };
    let production = tree(&["--no-default-features"])?;
    for stand_in in ["forfall-devsinks", "forfall-schema-registry-emulator"] {
        assert!(
            !production.lines().any(|l| l.starts_with(&format!("{stand_in} "))),
            "the production build links {stand_in}"
        );
    }
    // The check can see a stand-in: the development build (`forfall demo`) links both.
    let development = tree(&[])?;
    assert!(
        development.lines().any(|l| l.starts_with("forfall-devsinks ")),
        "{development}"
    );
    Ok(())
}
