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
