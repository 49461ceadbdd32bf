//! Who calls the tenants' HTTP APIs (invoice intake, camt.054 import, the unmatched list, manual
//! matches): each tenant has its own bearer token (`api.tenants.<tenant>.token`, from a Secret:
//! `FORFALL_API__TENANTS__<TENANT>__TOKEN`), and a request acts for the tenant of its token,
//! never for one it names itself. A request that names another tenant is refused (403).
//!
//! Without any token configured, production answers every such request 401 (the APIs are off)
//! and the development profile trusts the tenant the request names, as the dev stack's tools do.
//! mTLS at an ingress in front of the services is the other way to authenticate callers; the
//! ingress then sets the token.

use std::collections::BTreeMap;

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::config::{Profile, Secret};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ApiConfig {
    /// Each tenant's credentials, by tenant id.
    pub tenants: BTreeMap<String, TenantCredentials>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TenantCredentials {
    /// The bearer token of the tenant's systems (never logged).
    pub token: Option<Secret>,
}

/// The tokens in force and what a request without one may do.
#[derive(Debug, Clone)]
pub struct TenantTokens {
    tokens: Vec<(String, Secret)>,
    profile: Profile,
}

/// Why a request may not go on, as its HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 401: no token, or one no tenant has.
    Unauthenticated(&'static str),
    /// 403: the token's tenant is not the one the request names.
    OtherTenant { token: String, named: String },
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Unauthenticated(why) => (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                axum::Json(serde_json::json!({"error": "unauthenticated", "detail": why})),
            )
                .into_response(),
            Refusal::OtherTenant { token, named } => (
                StatusCode::FORBIDDEN,
                axum::Json(serde_json::json!({
                    "error": "other_tenant",
                    "detail": format!("this token is tenant '{token}''s; the request names tenant '{named}'"),
                })),
            )
                .into_response(),
        }
    }
}

impl TenantTokens {
    pub fn new(config: &ApiConfig, profile: Profile) -> Self {
        let tokens = config
            .tenants
            .iter()
            .filter_map(|(tenant, c)| c.token.clone().map(|t| (tenant.clone(), t)))
            .filter(|(_, t)| !t.expose().is_empty())
            .collect();
        Self { tokens, profile }
    }

    /// Who is calling, from the request's headers alone (before its body is read): a tenant by
    /// its token, or, with no token configured, whoever the development profile trusts.
    pub fn caller(&self, headers: &HeaderMap) -> Result<Caller, Refusal> {
        if self.tokens.is_empty() {
            return match self.profile {
                Profile::Development => Ok(Caller::Trusted),
                Profile::Production => Err(Refusal::Unauthenticated(
                    "the tenants' APIs are off: set api.tenants.<tenant>.token",
                )),
            };
        }
        let given = crate::admin::bearer_token(headers);
        if given.is_empty() {
            return Err(Refusal::Unauthenticated("a tenant's bearer token is needed"));
        }
        // Every token is compared, in constant time each, so the answer's timing tells nothing.
        let mut found = None;
        for (tenant, token) in &self.tokens {
            if crate::admin::same_secret(given, token.expose()) {
                found = Some(tenant);
            }
        }
        found
            .map(|t| Caller::Tenant(t.clone()))
            .ok_or(Refusal::Unauthenticated("this token is no tenant's"))
    }

    /// [`TenantTokens::caller`], then [`Caller::tenant`].
    pub fn tenant(&self, headers: &HeaderMap, named: Option<&str>) -> Result<String, Refusal> {
        self.caller(headers)?.tenant(named)
    }
}

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A tenant's systems, by their token.
    Tenant(String),
    /// Anyone (the development profile, no token configured).
    Trusted,
}

impl Caller {
    /// The tenant the request acts for: the token's (the one the request names must be it), or
    /// for a trusted caller the one it names.
    pub fn tenant(&self, named: Option<&str>) -> Result<String, Refusal> {
        let named = named.map(str::trim).filter(|t| !t.is_empty());
        match (self, named) {
            (Caller::Tenant(tenant), Some(named)) if named != tenant => Err(Refusal::OtherTenant {
                token: tenant.clone(),
                named: named.to_owned(),
            }),
            (Caller::Tenant(tenant), _) => Ok(tenant.clone()),
            (Caller::Trusted, Some(named)) => Ok(named.to_owned()),
            (Caller::Trusted, None) => Err(Refusal::Unauthenticated(
                "no tenant: name one (the development profile trusts it)",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(profile: Profile) -> TenantTokens {
        let mut config = ApiConfig::default();
        for (tenant, token) in [("acme", "acme-token-1"), ("nordlys", "nordlys-token-2")] {
            config.tenants.insert(
                tenant.into(),
                TenantCredentials {
                    token: Some(Secret(token.into())),
                },
            );
        }
        TenantTokens::new(&config, profile)
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
        h
    }

    #[test]
    fn the_tenant_is_the_tokens_whatever_the_request_names() {
        for profile in [Profile::Development, Profile::Production] {
            let t = tokens(profile);
            assert_eq!(t.tenant(&bearer("acme-token-1"), None), Ok("acme".into()));
            assert_eq!(t.tenant(&bearer("acme-token-1"), Some("acme")), Ok("acme".into()));
            assert_eq!(
                t.tenant(&bearer("acme-token-1"), Some("nordlys")),
                Err(Refusal::OtherTenant {
                    token: "acme".into(),
                    named: "nordlys".into()
                })
            );
            assert_eq!(
                t.tenant(&bearer("nordlys-token-2"), Some("nordlys")),
                Ok("nordlys".into())
            );
            assert!(matches!(
                t.tenant(&bearer("guess"), Some("acme")),
                Err(Refusal::Unauthenticated(_))
            ));
            assert!(matches!(
                t.tenant(&HeaderMap::new(), Some("acme")),
                Err(Refusal::Unauthenticated(_))
            ));
        }
    }

    #[test]
    fn without_tokens_production_is_closed_and_development_trusts_the_request() {
        let none = ApiConfig::default();
        let production = TenantTokens::new(&none, Profile::Production);
        assert!(matches!(
            production.tenant(&HeaderMap::new(), Some("acme")),
            Err(Refusal::Unauthenticated(_))
        ));
        assert!(matches!(
            production.tenant(&bearer("anything"), Some("acme")),
            Err(Refusal::Unauthenticated(_))
        ));
        let development = TenantTokens::new(&none, Profile::Development);
        assert_eq!(development.tenant(&HeaderMap::new(), Some("acme")), Ok("acme".into()));
        assert!(matches!(
            development.tenant(&HeaderMap::new(), None),
            Err(Refusal::Unauthenticated(_))
        ));
    }

    #[test]
    fn a_token_is_not_shown() {
        let shown = format!("{:?}", tokens(Profile::Production));
        assert!(!shown.contains("acme-token-1"), "{shown}");
    }
}
