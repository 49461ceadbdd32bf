//! The keys that sign and verify the debtor's pay links, shared by the service that writes the
//! links into messages (dispatch) and the one that answers them (the portal), so that every link
//! one signs the other verifies. Configured under `dispatch.pay_link`.
//!
//! Keys rotate by id: `key_id`/`secret` is the key new links are signed with; `keys.<id>` are
//! more keys, older ones kept so that links already sent keep working until they expire. A key
//! may belong to one tenant (`keys.<id>.tenant`): it then signs that tenant's links
//! (`tenant_keys.<tenant> = "<id>"`) and verifies no other tenant's, so that one creditor's
//! leaked key opens no other creditor's pages.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use forfall_domain::paylink::{self, LinkClaims, LinkError, LinkKey};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct PayLinkSettings {
    /// The self-service page; the token is appended.
    pub base_url: String,
    /// The key new links are signed with, unless the tenant has its own.
    pub key_id: String,
    /// Its secret (set `FORFALL_DISPATCH__PAY_LINK__SECRET` in production; never logged).
    pub secret: String,
    /// How long a link works.
    pub ttl_days: i64,
    /// More keys by id: retired ones (verify only) and tenants' own.
    pub keys: BTreeMap<String, ExtraKey>,
    /// A tenant's own signing key, by id (one of `keys`).
    pub tenant_keys: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ExtraKey {
    pub secret: String,
    /// The one tenant whose links this key signs and verifies; any tenant's when absent.
    pub tenant: Option<String>,
}

/// The key links are signed with on the dev stack, published with the source: refused in the
/// production profile (see [`crate::config::Profile`]).
pub const DEVELOPMENT_SECRET: &str = "forfall-dev-pay-link-secret";

impl PayLinkSettings {
    /// Every key's secret with its setting's name and the published development value, for
    /// the production profile's check ([`crate::config::Profile::refuse_development_secrets`]).
    pub fn development_secrets(&self) -> Vec<(String, &str, &'static str)> {
        let mut found = vec![(
            "dispatch.pay_link.secret".to_owned(),
            self.secret.as_str(),
            DEVELOPMENT_SECRET,
        )];
        for (id, key) in &self.keys {
            found.push((
                format!("dispatch.pay_link.keys.{id}.secret"),
                key.secret.as_str(),
                DEVELOPMENT_SECRET,
            ));
        }
        found
    }
}

impl Default for PayLinkSettings {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:9606/pay/".into(),
            key_id: "dev".into(),
            secret: DEVELOPMENT_SECRET.into(),
            ttl_days: 60,
            keys: BTreeMap::new(),
            tenant_keys: BTreeMap::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PayLinkConfigError {
    #[error("dispatch.pay_link.tenant_keys.{tenant} names key '{key}', which dispatch.pay_link.keys does not have")]
    UnknownTenantKey { tenant: String, key: String },
    #[error("dispatch.pay_link.tenant_keys.{tenant} names key '{key}', which belongs to tenant '{owner}'")]
    OtherTenantsKey { tenant: String, key: String, owner: String },
    #[error("dispatch.pay_link key '{0}' has an empty secret")]
    EmptySecret(String),
}

/// The scoped key set, checked.
#[derive(Debug, Clone)]
pub struct PayLinkKeys {
    settings: PayLinkSettings,
}

impl PayLinkKeys {
    pub fn new(settings: PayLinkSettings) -> Result<Self, PayLinkConfigError> {
        if settings.secret.is_empty() {
            return Err(PayLinkConfigError::EmptySecret(settings.key_id.clone()));
        }
        if let Some((id, _)) = settings.keys.iter().find(|(_, k)| k.secret.is_empty()) {
            return Err(PayLinkConfigError::EmptySecret(id.clone()));
        }
        for (tenant, key) in &settings.tenant_keys {
            let extra = settings
                .keys
                .get(key)
                .ok_or_else(|| PayLinkConfigError::UnknownTenantKey {
                    tenant: tenant.clone(),
                    key: key.clone(),
                })?;
            if let Some(owner) = extra.tenant.as_ref().filter(|owner| *owner != tenant) {
                return Err(PayLinkConfigError::OtherTenantsKey {
                    tenant: tenant.clone(),
                    key: key.clone(),
                    owner: owner.clone(),
                });
            }
        }
        Ok(Self { settings })
    }

    pub fn settings(&self) -> &PayLinkSettings {
        &self.settings
    }

    /// The key a tenant's new links are signed with.
    fn signing_key(&self, tenant: &str) -> LinkKey {
        match self
            .settings
            .tenant_keys
            .get(tenant)
            .and_then(|id| Some((id, self.settings.keys.get(id)?)))
        {
            Some((id, key)) => LinkKey {
                id: id.clone(),
                secret: key.secret.as_bytes().to_vec(),
            },
            None => LinkKey {
                id: self.settings.key_id.clone(),
                secret: self.settings.secret.as_bytes().to_vec(),
            },
        }
    }

    /// Every key a link may verify with (whatever tenant it claims; see [`Self::verify`]).
    fn verifying_keys(&self) -> Vec<LinkKey> {
        let mut keys = vec![LinkKey {
            id: self.settings.key_id.clone(),
            secret: self.settings.secret.as_bytes().to_vec(),
        }];
        keys.extend(self.settings.keys.iter().map(|(id, k)| LinkKey {
            id: id.clone(),
            secret: k.secret.as_bytes().to_vec(),
        }));
        keys
    }

    /// Whether a key (by id) may vouch for a tenant's link.
    fn key_serves(&self, key_id: &str, tenant: &str) -> bool {
        match self.settings.keys.get(key_id) {
            Some(extra) if key_id != self.settings.key_id => extra.tenant.as_deref().is_none_or(|t| t == tenant),
            _ => true,
        }
    }

    /// When a genuine link was signed: its own claim, or for a link signed before links said
    /// so, its expiry less today's `ttl_days` (a later, longer ttl only moves that earlier).
    pub fn issued_at(&self, claims: &LinkClaims) -> i64 {
        claims
            .issued_at
            .unwrap_or(claims.expires_at - self.settings.ttl_days * 86_400)
    }

    /// How long a link works, in seconds.
    pub fn ttl_secs(&self) -> i64 {
        self.settings.ttl_days * 86_400
    }

    /// A signed link for the debtor and the invoices, expiring `ttl_days` from `now`.
    pub fn link(&self, tenant: &str, debtor_id: &str, invoices: Vec<String>, now: DateTime<Utc>) -> String {
        let claims = LinkClaims {
            tenant: tenant.to_owned(),
            debtor_id: debtor_id.to_owned(),
            invoices,
            expires_at: now.timestamp() + self.settings.ttl_days * 86_400,
            issued_at: Some(now.timestamp()),
        };
        format!(
            "{}{}",
            self.settings.base_url,
            paylink::issue(&self.signing_key(tenant), &claims)
        )
    }

    /// The anti-forgery token of a form on a link's page (`scope`: the link's fingerprint and
    /// what the form is about), keyed by the current signing key.
    pub fn form_token(&self, scope: &str) -> String {
        paylink::form_token(&self.form_key(), scope)
    }

    pub fn verify_form_token(&self, scope: &str, token: &str) -> bool {
        paylink::verify_form_token(&self.form_key(), scope, token)
    }

    fn form_key(&self) -> LinkKey {
        LinkKey {
            id: self.settings.key_id.clone(),
            secret: self.settings.secret.as_bytes().to_vec(),
        }
    }

    /// The claims of a valid link: signed by a known key that may sign for the tenant it
    /// names, and not expired.
    pub fn verify(&self, token: &str, now: DateTime<Utc>) -> Result<LinkClaims, LinkError> {
        let claims = self.verify_signature(token)?;
        if now.timestamp() >= claims.expires_at {
            return Err(LinkError::Expired(claims.expires_at));
        }
        Ok(claims)
    }

    /// The claims of a genuine link, expired or not.
    pub fn verify_signature(&self, token: &str) -> Result<LinkClaims, LinkError> {
        let claims = paylink::verify_signature(&self.verifying_keys(), token)?;
        let key_id = token.split('.').nth(1).unwrap_or_default();
        if !self.key_serves(key_id, &claims.tenant) {
            // Genuine for its own tenant, but it claims another: as good as forged.
            return Err(LinkError::BadSignature);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        "2026-03-01T08:00:00Z".parse().unwrap()
    }

    fn settings() -> PayLinkSettings {
        let mut s = PayLinkSettings {
            key_id: "k2".into(),
            secret: "current".into(),
            ..PayLinkSettings::default()
        };
        s.keys.insert(
            "k1".into(),
            ExtraKey {
                secret: "retired".into(),
                tenant: None,
            },
        );
        s.keys.insert(
            "acme-1".into(),
            ExtraKey {
                secret: "acme's own".into(),
                tenant: Some("acme".into()),
            },
        );
        s.tenant_keys.insert("acme".into(), "acme-1".into());
        s
    }

    fn token(link: &str) -> &str {
        link.rsplit('/').next().unwrap()
    }

    #[test]
    fn a_tenant_with_its_own_key_signs_with_it_and_others_with_the_current_key() {
        let keys = PayLinkKeys::new(settings()).unwrap();
        let acme = keys.link("acme", "acme:d1", vec!["i1".into()], now());
        assert!(token(&acme).starts_with("v1.acme-1."), "{acme}");
        let other = keys.link("other", "other:d1", vec!["i1".into()], now());
        assert!(token(&other).starts_with("v1.k2."), "{other}");
        assert_eq!(keys.verify(token(&acme), now()).unwrap().tenant, "acme");
        assert_eq!(keys.verify(token(&other), now()).unwrap().tenant, "other");
    }

    #[test]
    fn a_tenants_key_cannot_vouch_for_another_tenant() {
        let keys = PayLinkKeys::new(settings()).unwrap();
        let acme_key = LinkKey {
            id: "acme-1".into(),
            secret: b"acme's own".to_vec(),
        };
        let claims = LinkClaims {
            tenant: "other".into(),
            debtor_id: "other:d1".into(),
            invoices: vec!["i1".into()],
            expires_at: now().timestamp() + 60,
            issued_at: None,
        };
        let forged = paylink::issue(&acme_key, &claims);
        assert_eq!(keys.verify(&forged, now()), Err(LinkError::BadSignature));
    }

    #[test]
    fn links_signed_with_a_retired_key_verify_until_they_expire() {
        let keys = PayLinkKeys::new(settings()).unwrap();
        let retired = LinkKey {
            id: "k1".into(),
            secret: b"retired".to_vec(),
        };
        let claims = LinkClaims {
            tenant: "other".into(),
            debtor_id: "other:d1".into(),
            invoices: vec!["i1".into()],
            expires_at: now().timestamp() + 60,
            issued_at: None,
        };
        let old = paylink::issue(&retired, &claims);
        assert!(keys.verify(&old, now()).is_ok());
        let later = now() + chrono::Duration::seconds(61);
        assert_eq!(keys.verify(&old, later), Err(LinkError::Expired(claims.expires_at)));
        assert_eq!(keys.verify_signature(&old).map(|c| c.tenant), Ok("other".into()));
    }

    #[test]
    fn a_tenant_key_that_is_missing_or_anothers_is_refused_at_start() {
        let mut s = settings();
        s.tenant_keys.insert("beta".into(), "nope".into());
        assert!(matches!(
            PayLinkKeys::new(s),
            Err(PayLinkConfigError::UnknownTenantKey { .. })
        ));
        let mut s = settings();
        s.tenant_keys.insert("beta".into(), "acme-1".into());
        let refused = PayLinkKeys::new(s).unwrap_err().to_string();
        assert!(refused.contains("belongs to tenant 'acme'"), "{refused}");
    }

    #[test]
    fn a_link_says_when_it_was_signed_and_an_older_one_is_dated_by_its_expiry() {
        let keys = PayLinkKeys::new(PayLinkSettings::default()).unwrap();
        let link = keys.link("acme", "acme:d1", vec!["i1".into()], now());
        let token = link.rsplit('/').next().unwrap();
        let claims = keys.verify(token, now()).unwrap();
        assert_eq!(claims.issued_at, Some(now().timestamp()));
        assert_eq!(keys.issued_at(&claims), now().timestamp());
        let older = LinkClaims {
            issued_at: None,
            expires_at: claims.expires_at - 10,
            ..claims
        };
        assert_eq!(keys.issued_at(&older), now().timestamp() - 10);
    }
}
