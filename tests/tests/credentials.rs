//! Credentials to the services' dependencies, against real servers: an ACL user and password
//! for Redis (from settings, never in logs or errors), and HTTP basic authentication for the
//! schema registry (a registry that demands it, in front of the emulator).

use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use forfall_e2e::*;
use forfall_platform::avro::Codec;
use forfall_platform::config::{RedisConfig, RegistryConfig, Secret};

#[tokio::test]
async fn redis_logs_in_as_the_configured_acl_user_and_a_wrong_password_is_not_shown() -> anyhow::Result<()> {
    let base = base_config().redis;
    let user = format!("forfall-test-{}", uuid::Uuid::new_v4().simple());
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let mut admin = redis::Client::open(base.url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", &user, "on", &format!(">{password}"), "~*", "&*", "+@all"][..])
        .query_async(&mut admin)
        .await?;
    let result = async {
        let config = RedisConfig {
            username: Some(user.clone()),
            password: Some(Secret(password.clone())),
            ..base.clone()
        };
        let mut con = forfall_platform::redis_store::connect(&config).await?;
        let who: String = redis::cmd("ACL").arg("WHOAMI").query_async(&mut con).await?;
        assert_eq!(who, user);

        let wrong = RedisConfig {
            password: Some(Secret("not-the-password-7f3a".into())),
            ..config
        };
        let err = forfall_platform::redis_store::connect(&wrong)
            .await
            .err()
            .ok_or_else(|| anyhow::anyhow!("a wrong password was accepted"))?
            .to_string();
        assert!(err.contains("cannot connect to Redis"), "{err}");
        assert!(!err.contains("not-the-password-7f3a"), "{err}");
        anyhow::Ok(())
    }
    .await;
    let _: () = redis::cmd("ACL")
        .arg(&["DELUSER", &user][..])
        .query_async(&mut admin)
        .await?;
    result
}

/// A registry that answers only with the right basic authentication, as Confluent Cloud does.
async fn basic_auth(request: Request, next: Next) -> Response {
    let wanted = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("api-key:api-secret")
    );
    match request.headers().get(header::AUTHORIZATION) {
        Some(given) if given.as_bytes() == wanted.as_bytes() => next.run(request).await,
        _ => (
            StatusCode::UNAUTHORIZED,
            [(header::CONTENT_TYPE, "application/vnd.schemaregistry.v1+json")],
            r#"{"error_code":401,"message":"Unauthorized"}"#,
        )
            .into_response(),
    }
}

#[tokio::test]
async fn the_registry_is_reached_with_basic_authentication() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let app = forfall_schema_registry_emulator::router().layer(middleware::from_fn(basic_auth));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let s = danish("inv-auth", "INV-9001", day(2026, 3, 12), "auth@example.test");
    let record = s.issued();
    let topic = "credentials.billing.invoice-events.v1";
    let with = RegistryConfig {
        url: url.clone(),
        auto_register: true,
        username: Some("api-key".into()),
        password: Some(Secret("api-secret".into())),
    };
    let encoded = Codec::for_registry(&with)?.encode(topic, &record).await?;
    assert!(!encoded.is_empty());

    let without = RegistryConfig {
        username: None,
        password: None,
        ..with
    };
    let refused = Codec::for_registry(&without)?.encode(topic, &record).await;
    let err = refused
        .err()
        .ok_or_else(|| anyhow::anyhow!("the registry let an anonymous client register"))?;
    assert!(err.to_string().contains("401"), "{err}");
    Ok(())
}

/// Each tenant's systems call with their own token and act for that tenant only: the invoice
/// intake and the matcher's API take the tenant from the token, and refuse a request naming
/// another (403, nothing recorded) or carrying no token (401); the portal's timeline answers a
/// tenant's token for its own invoices only, and the staff token for any.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_tenant_is_the_tokens_not_the_requests() -> anyhow::Result<()> {
    use forfall_platform::api_auth::TenantCredentials;
    let mut config = base_config();
    for (tenant, token) in [("acme-energy", "acme-token-4d1f"), ("nordlys", "nordlys-token-9c2e")] {
        config.api.tenants.insert(
            tenant.into(),
            TenantCredentials {
                token: Some(Secret(token.into())),
            },
        );
    }
    let clock = forfall_platform::clock::ManualClock::new(at("2026-03-01T08:00:00Z"));
    let mut stack = LocalStack::start(config, clock).await?;
    stack.set("portal.staff_token", "staff-token-77ab");
    stack.start_service("ingest");
    stack.start_service("matcher");
    stack.start_service("portal");
    stack.wait_ready(&["ingest", "matcher", "portal"], WAIT).await?;
    let ingest = stack.rt.admin_addr("ingest").expect("ingest serves HTTP");
    let matcher = stack.rt.admin_addr("matcher").expect("the matcher serves HTTP");
    let url = format!("http://{ingest}/v1/invoices");
    let invoice = serde_json::json!({
        "debtor_id": "acme-energy:c-78", "invoice_id": "inv-token-1",
        "revision": 1, "invoice_number": "INV-6101", "issue_date": "2026-03-01", "due_date": "2026-03-15",
        "amount_minor": 49_900, "currency": "NOK", "jurisdiction": "NO", "debtor_kind": "consumer",
        "payment_reference": "1234567890128", "email": "ola@example.test", "language": "nb"
    });
    let client = reqwest::Client::new();

    let anonymous = client.post(&url).json(&invoice).send().await?;
    assert_eq!(anonymous.status(), 401);
    assert_eq!(anonymous.headers()["www-authenticate"], "Bearer");
    let guessed = client.post(&url).bearer_auth("guess").json(&invoice).send().await?;
    assert_eq!(guessed.status(), 401);

    let mut for_another = invoice.clone();
    for_another["tenant"] = serde_json::json!("nordlys");
    let refused = client
        .post(&url)
        .bearer_auth("acme-token-4d1f")
        .json(&for_another)
        .send()
        .await?;
    assert_eq!(refused.status(), 403);
    let body: serde_json::Value = refused.json().await?;
    assert_eq!(body["error"], "other_tenant", "{body}");
    let metrics = client
        .get(format!("http://{ingest}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        !metrics.contains("forfall_rejected_total"),
        "a refused caller's request is not recorded as a rejection:\n{metrics}"
    );

    let accepted = client
        .post(&url)
        .bearer_auth("acme-token-4d1f")
        .json(&invoice)
        .send()
        .await?;
    assert_eq!(accepted.status(), 202, "{}", accepted.text().await?);
    let invoices_topic = stack.topic(&stack.topics().invoices);
    let invoices = eventually("the posted invoice", WAIT, || async {
        let read = stack
            .read::<forfall_platform::records::Invoice>(&invoices_topic)
            .await?;
        Ok(Some(read).filter(|v| !v.is_empty()))
    })
    .await?;
    assert_eq!(invoices[0].invoice_id, "inv-token-1");
    assert_eq!(invoices[0].tenant, "acme-energy", "the token's tenant");

    let unmatched = format!("http://{matcher}/v1/payments/unmatched");
    let other = client
        .get(&unmatched)
        .query(&[("tenant", "acme-energy")])
        .bearer_auth("nordlys-token-9c2e")
        .send()
        .await?;
    assert_eq!(other.status(), 403);
    let own: serde_json::Value = client
        .get(&unmatched)
        .bearer_auth("nordlys-token-9c2e")
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(own["tenant"], "nordlys", "{own}");
    let matched = client
        .post(format!("http://{matcher}/v1/payments/p-1/match"))
        .json(&serde_json::json!({"invoices": ["inv-token-1"], "by": "ola"}))
        .send()
        .await?;
    assert_eq!(matched.status(), 401);

    let portal = stack.rt.admin_addr("portal").expect("the portal serves HTTP");
    let timeline = format!("http://{portal}/v1/timeline/acme-energy/inv-token-1");
    assert_eq!(client.get(&timeline).send().await?.status(), 401);
    let other = client.get(&timeline).bearer_auth("nordlys-token-9c2e").send().await?;
    assert_eq!(other.status(), 403, "another tenant's token");
    let own: serde_json::Value = eventually("acme's timeline of its invoice", WAIT, || async {
        let answer = client.get(&timeline).bearer_auth("acme-token-4d1f").send().await?;
        Ok(if answer.status() == 200 {
            Some(answer.json().await?)
        } else {
            None
        })
    })
    .await?;
    assert_eq!(own["tenant"], "acme-energy", "{own}");
    let staff = client.get(&timeline).bearer_auth("staff-token-77ab").send().await?;
    assert_eq!(staff.status(), 200);
    stack.shutdown().await;
    Ok(())
}
