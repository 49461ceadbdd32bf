//! Every schema change must be backward compatible with the versions in `main`'s history.
//! The history comes from git; the check is the registry's own (the emulator, over HTTP).

use std::path::{Path, PathBuf};
use std::process::Command;

use forfall_platform::records::ALL_SCHEMAS;
use serde_json::{Value, json};

fn repo_root() -> PathBuf {
    // Read when the test runs: a shared target dir may hold a binary built from another checkout.
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string());
    Path::new(&dir).join("..")
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).current_dir(repo_root()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every committed version of `path`, oldest first.
fn history(path: &str) -> Vec<String> {
    let Some(commits) = git(&["log", "--format=%H", "--reverse", "--", path]) else {
        return Vec::new();
    };
    commits
        .lines()
        .filter_map(|c| git(&["show", &format!("{c}:{path}")]))
        .collect()
}

async fn register(client: &reqwest::Client, base: &str, subject: &str, schema: &str) -> anyhow::Result<(u16, Value)> {
    let response = client
        .post(format!("{base}/subjects/{subject}/versions"))
        .header("content-type", "application/vnd.schemaregistry.v1+json")
        .json(&json!({ "schema": schema }))
        .send()
        .await?;
    Ok((response.status().as_u16(), response.json().await?))
}

#[tokio::test]
async fn every_schema_is_backward_compatible_with_its_history() -> anyhow::Result<()> {
    let addr = forfall_schema_registry_emulator::spawn("127.0.0.1:0").await?;
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();
    let files: Vec<PathBuf> = std::fs::read_dir(repo_root().join("schemas"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "avsc"))
        .collect();
    assert_eq!(
        files.len(),
        ALL_SCHEMAS.len(),
        "every schema file is embedded in the services"
    );
    for file in files {
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        let mut versions = history(&format!("schemas/{name}"));
        versions.push(std::fs::read_to_string(&file)?);
        for (i, schema) in versions.iter().enumerate() {
            let (status, body) = register(&client, &base, &format!("history-{name}"), schema).await?;
            assert_eq!(
                status,
                200,
                "{name} version {} of {} is not backward compatible: {body}",
                i + 1,
                versions.len()
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn the_check_refuses_an_incompatible_change() -> anyhow::Result<()> {
    let addr = forfall_schema_registry_emulator::spawn("127.0.0.1:0").await?;
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();
    let (_, original) = ALL_SCHEMAS
        .iter()
        .find(|(n, _)| n.ends_with(".Invoice"))
        .copied()
        .expect("Invoice schema");
    let (status, first) = register(&client, &base, "t-io.forfall.Invoice", original).await?;
    assert_eq!(status, 200, "{first}");

    // A new required field without a default cannot read old data.
    let mut changed: Value = serde_json::from_str(original)?;
    changed["fields"]
        .as_array_mut()
        .expect("fields")
        .push(json!({"name": "segment", "type": "string"}));
    let (status, body) = register(&client, &base, "t-io.forfall.Invoice", &changed.to_string()).await?;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error_code"], 409);
    assert!(
        body["message"].as_str().unwrap_or("").contains("segment"),
        "names the field: {body}"
    );

    // With a default it can: accepted as version 2.
    changed["fields"]
        .as_array_mut()
        .expect("fields")
        .last_mut()
        .expect("field")["default"] = json!("default");
    let (status, body) = register(&client, &base, "t-io.forfall.Invoice", &changed.to_string()).await?;
    assert_eq!(status, 200, "{body}");
    assert_ne!(body["id"], first["id"]);

    // The registry's documented errors for unknown things.
    let missing = client.get(format!("{base}/schemas/ids/4242")).send().await?;
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.json::<Value>().await?["error_code"], 40403);
    let versions: Value = client
        .get(format!("{base}/subjects/t-io.forfall.Invoice/versions"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(versions, json!([1, 2]));
    let bad_level = client
        .put(format!("{base}/config"))
        .json(&json!({"compatibility": "SIDEWAYS"}))
        .send()
        .await?;
    assert_eq!(bad_level.status(), 422);
    assert_eq!(bad_level.json::<Value>().await?["error_code"], 42203);
    Ok(())
}
