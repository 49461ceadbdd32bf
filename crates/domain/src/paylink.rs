//! The debtor's link to the self-service page: a signed, expiring token scoped to one tenant,
//! one debtor and the invoices it names.
//!
//! Format: `v1.<key id>.<base64url(claims JSON)>.<base64url(HMAC-SHA256(key, "v1.<key id>.<claims>"))>`.
//! The key id lets keys rotate: old links verify until they expire while new ones use the new
//! key. The signature is checked in constant time before anything in the claims is trusted.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// What a link lets its holder see and do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkClaims {
    #[serde(rename = "t")]
    pub tenant: String,
    #[serde(rename = "d")]
    pub debtor_id: String,
    #[serde(rename = "i")]
    pub invoices: Vec<String>,
    /// Expiry, Unix seconds.
    #[serde(rename = "x")]
    pub expires_at: i64,
    /// When it was signed, Unix seconds: a withdrawal covers the links signed before it. Links
    /// signed before the field existed lack it.
    #[serde(rename = "a", default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<i64>,
}

/// A signing key and its id.
#[derive(Debug, Clone)]
pub struct LinkKey {
    pub id: String,
    pub secret: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("the link is malformed: {0}")]
    Malformed(&'static str),
    #[error("the link was signed with key '{0}', which is not known")]
    UnknownKey(String),
    #[error("the link's signature does not match (altered or forged)")]
    BadSignature,
    #[error("the link expired at {0} (Unix seconds)")]
    Expired(i64),
}

fn mac(key: &LinkKey, signed: &str) -> HmacSha256 {
    // HMAC accepts keys of any length.
    let mut m =
        <HmacSha256 as Mac>::new_from_slice(&key.secret).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    m.update(signed.as_bytes());
    m
}

/// Signs claims with `key`.
pub fn issue(key: &LinkKey, claims: &LinkClaims) -> String {
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
    let signed = format!("v1.{}.{body}", key.id);
    let signature = URL_SAFE_NO_PAD.encode(mac(key, &signed).finalize().into_bytes());
    format!("{signed}.{signature}")
}

/// Checks a token against the known keys and the time; the claims when it is valid.
pub fn verify(keys: &[LinkKey], token: &str, now_unix: i64) -> Result<LinkClaims, LinkError> {
    let claims = verify_signature(keys, token)?;
    if now_unix >= claims.expires_at {
        return Err(LinkError::Expired(claims.expires_at));
    }
    Ok(claims)
}

/// Checks a token's signature only: the claims of a genuine link, expired or not (what an
/// expired link's page needs to offer a fresh one to the same debtor).
pub fn verify_signature(keys: &[LinkKey], token: &str) -> Result<LinkClaims, LinkError> {
    let mut parts = token.split('.');
    let (Some(version), Some(key_id), Some(body), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(LinkError::Malformed("expected four dot-separated parts"));
    };
    if version != "v1" {
        return Err(LinkError::Malformed("unknown version"));
    }
    let key = keys
        .iter()
        .find(|k| k.id == key_id)
        .ok_or_else(|| LinkError::UnknownKey(key_id.to_owned()))?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| LinkError::Malformed("signature is not base64url"))?;
    mac(key, &format!("v1.{key_id}.{body}"))
        .verify_slice(&signature)
        .map_err(|_| LinkError::BadSignature)?;
    let json = URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| LinkError::Malformed("claims are not base64url"))?;
    serde_json::from_slice(&json).map_err(|_| LinkError::Malformed("claims are not valid"))
}

/// A form's anti-forgery token for one link's page and `scope` (e.g. the invoice a request is
/// about): base64url(HMAC-SHA256(key, "form.<scope>")). Only a page served for the link carries
/// it, so a form posted from elsewhere cannot.
pub fn form_token(key: &LinkKey, scope: &str) -> String {
    URL_SAFE_NO_PAD.encode(mac(key, &format!("form.{scope}")).finalize().into_bytes())
}

/// Checks a form token in constant time.
pub fn verify_form_token(key: &LinkKey, scope: &str, token: &str) -> bool {
    URL_SAFE_NO_PAD
        .decode(token)
        .is_ok_and(|bytes| mac(key, &format!("form.{scope}")).verify_slice(&bytes).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(id: &str) -> LinkKey {
        LinkKey {
            id: id.into(),
            secret: format!("secret-{id}").into_bytes(),
        }
    }

    fn claims() -> LinkClaims {
        LinkClaims {
            tenant: "acme".into(),
            debtor_id: "acme:c-1".into(),
            invoices: vec!["inv-1".into(), "inv-2".into()],
            expires_at: 2_000_000_000,
            issued_at: None,
        }
    }

    #[test]
    fn a_form_token_is_bound_to_its_key_and_scope() {
        let token = form_token(&key("k1"), "link-a/inv-1");
        assert!(verify_form_token(&key("k1"), "link-a/inv-1", &token));
        assert!(!verify_form_token(&key("k1"), "link-a/inv-2", &token));
        assert!(!verify_form_token(&key("k2"), "link-a/inv-1", &token));
        assert!(!verify_form_token(&key("k1"), "link-a/inv-1", "not base64!"));
    }

    #[test]
    fn a_link_verifies_until_it_expires() {
        let token = issue(&key("k1"), &claims());
        assert!(token.starts_with("v1.k1."));
        assert_eq!(verify(&[key("k1")], &token, 1_900_000_000), Ok(claims()));
        assert_eq!(
            verify(&[key("k1")], &token, 2_000_000_000),
            Err(LinkError::Expired(2_000_000_000))
        );
    }

    #[test]
    fn rotated_keys_keep_old_links_working_and_unknown_keys_fail() {
        let old = issue(&key("k1"), &claims());
        assert!(verify(&[key("k2"), key("k1")], &old, 0).is_ok());
        assert_eq!(verify(&[key("k2")], &old, 0), Err(LinkError::UnknownKey("k1".into())));
        let forged = LinkKey {
            id: "k1".into(),
            secret: b"guess".to_vec(),
        };
        assert_eq!(
            verify(&[key("k1")], &issue(&forged, &claims()), 0),
            Err(LinkError::BadSignature)
        );
    }

    #[test]
    fn widening_the_scope_breaks_the_signature() {
        let token = issue(&key("k1"), &claims());
        let parts: Vec<&str> = token.split('.').collect();
        let mut wider = claims();
        wider.invoices.push("someone-elses".into());
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&wider).unwrap());
        let tampered = format!("{}.{}.{}.{}", parts[0], parts[1], body, parts[3]);
        assert_eq!(verify(&[key("k1")], &tampered, 0), Err(LinkError::BadSignature));
        assert!(matches!(
            verify(&[key("k1")], "v1.k1.abc", 0),
            Err(LinkError::Malformed(_))
        ));
    }

    proptest! {
        #[test]
        fn any_altered_character_is_refused(pos in 0usize..200, c in proptest::char::range('0', 'z')) {
            let token = issue(&key("k1"), &claims());
            let mut chars: Vec<char> = token.chars().collect();
            let pos = pos % chars.len();
            prop_assume!(chars[pos] != c);
            chars[pos] = c;
            let altered: String = chars.into_iter().collect();
            prop_assert!(verify(&[key("k1")], &altered, 0).is_err());
        }
    }
}
