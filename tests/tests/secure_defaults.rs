//! Secure by default: a service binary started without `profile = "development"` is in
//! production, and there it refuses the development stack's published secrets, naming each
//! setting and the variable that sets it (and never the secret); SMTP credentials are refused
//! without TLS in any profile. These run the real binaries and stop before they connect to
//! anything: the refusals come first.

use std::process::Command;

fn binary(name: &str) -> anyhow::Result<std::path::PathBuf> {
    Ok(forfall_e2e::chaos::binaries_dir()?.join(name))
}

/// Runs a service binary with only `env` set (no `FORFALL_*` of the test's own environment, no
/// configuration file) and returns whether it succeeded, and what it logged.
fn start(name: &str, env: &[(&str, &str)]) -> anyhow::Result<(bool, String)> {
    let mut command = Command::new(binary(name)?);
    command
        .env_clear()
        .env("FORFALL_CONFIG", "/nonexistent/forfall.toml")
        .env("FORFALL_LOG__FORMAT", "json")
        .envs(env.iter().copied());
    let out = command.output()?;
    let logged = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), logged))
}

#[test]
fn dispatch_and_the_portal_refuse_the_published_pay_link_key_in_production() -> anyhow::Result<()> {
    for service in ["forfall-dispatch", "forfall-portal"] {
        let (ok, logged) = start(service, &[])?;
        assert!(!ok, "{service} started with the published pay-link key: {logged}");
        assert!(
            logged.contains("refusing to start in the production profile with development secrets"),
            "{service}: {logged}"
        );
        assert!(
            logged.contains("FORFALL_DISPATCH__PAY_LINK__SECRET"),
            "{service}: {logged}"
        );
        assert!(
            !logged.contains("forfall-dev-pay-link-secret"),
            "{service} logged the secret: {logged}"
        );
    }
    Ok(())
}

#[test]
fn each_published_secret_a_configuration_uses_is_named() -> anyhow::Result<()> {
    let (ok, logged) = start(
        "forfall-dispatch",
        &[
            (
                "FORFALL_DISPATCH__PAY_LINK__SECRET",
                "a-real-secret-from-a-kubernetes-secret",
            ),
            ("FORFALL_DISPATCH__SMS__GATEWAYAPI__SENDER", "Acme"),
            (
                "FORFALL_DISPATCH__TENANTS__ACME__WEBHOOK_URL",
                "https://acme.example/hook",
            ),
        ],
    )?;
    assert!(!ok, "{logged}");
    assert!(!logged.contains("FORFALL_DISPATCH__PAY_LINK__SECRET"), "{logged}");
    assert!(
        logged.contains("FORFALL_DISPATCH__RECEIPTS__GATEWAYAPI_SECRET"),
        "{logged}"
    );
    assert!(logged.contains("FORFALL_DISPATCH__WEBHOOK__SECRET"), "{logged}");
    // 46elks is not set up: its receipt token is not asked for.
    assert!(!logged.contains("ELKS46"), "{logged}");
    Ok(())
}

#[test]
fn smtp_credentials_without_tls_are_refused_in_every_profile() -> anyhow::Result<()> {
    for profile in ["development", "production"] {
        let (ok, logged) = start(
            "forfall-dispatch",
            &[
                ("FORFALL_PROFILE", profile),
                (
                    "FORFALL_DISPATCH__PAY_LINK__SECRET",
                    "a-real-secret-from-a-kubernetes-secret",
                ),
                ("FORFALL_DISPATCH__SMTP__USERNAME", "mailer"),
                ("FORFALL_DISPATCH__SMTP__PASSWORD", "hunter2-smtp"),
            ],
        )?;
        assert!(!ok, "{profile}: {logged}");
        assert!(
            logged.contains("dispatch.smtp has a username or password but dispatch.smtp.tls is none"),
            "{profile}: {logged}"
        );
        assert!(
            !logged.contains("hunter2-smtp"),
            "{profile}: logged the password: {logged}"
        );
    }
    Ok(())
}
