//! Signed HTTP bodies between Forfall and an agency, both ways: `X-Forfall-Timestamp` (Unix
//! seconds) and `X-Forfall-Signature: v1=<hex HMAC-SHA256 of "<timestamp>.<body>" under the
//! shared secret>`. The timestamp is signed with the body, so a captured request cannot be
//! replayed after the tolerance; the signature is compared in constant time.

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const TIMESTAMP_HEADER: &str = "X-Forfall-Timestamp";
pub const SIGNATURE_HEADER: &str = "X-Forfall-Signature";

/// How far a signed timestamp may be from the receiver's clock (either way).
pub const TOLERANCE_SECS: i64 = 300;

fn mac(secret: &str, timestamp: i64, body: &[u8]) -> Option<Hmac<Sha256>> {
    mac_with_key(secret.as_bytes(), timestamp, body)
}

fn mac_with_key(key: &[u8], timestamp: i64, body: &[u8]) -> Option<Hmac<Sha256>> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).ok()?;
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Some(mac)
}

/// The signature header's value for `body` sent at `timestamp`.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let digest = mac(secret, timestamp, body)
        .map(|m| m.finalize().into_bytes().to_vec())
        .unwrap_or_default();
    format!("v1={}", hex::encode(digest))
}

/// Whether one of the hex digests `given` is the HMAC-SHA256 of `"<timestamp>.<body>"` under
/// the raw `key`, and `timestamp` is within [`TOLERANCE_SECS`] of `now`: the same scheme with
/// the key as bytes and the header left to the caller (Debitura signs so, with
/// `X-Debitura-Signature: t=<unix>,v1=<hex>` and a base64 secret).
pub fn verify_key<'a>(
    key: &[u8],
    timestamp: i64,
    given: impl IntoIterator<Item = &'a str>,
    body: &[u8],
    now: i64,
) -> bool {
    if key.is_empty() || (now - timestamp).abs() > TOLERANCE_SECS {
        return false;
    }
    given
        .into_iter()
        .filter_map(|h| hex::decode(h.trim()).ok())
        .any(|d| mac_with_key(key, timestamp, body).is_some_and(|m| m.verify_slice(&d).is_ok()))
}

/// The hex HMAC-SHA256 of `"<timestamp>.<body>"` under the raw `key` (see [`verify_key`]).
pub fn sign_key(key: &[u8], timestamp: i64, body: &[u8]) -> String {
    mac_with_key(key, timestamp, body)
        .map(|m| hex::encode(m.finalize().into_bytes()))
        .unwrap_or_default()
}

/// Whether `signature` (the header's value, with one or more comma-separated `v1=` entries,
/// so a sender can sign with two secrets while rotating) signs `body` at `timestamp` under
/// `secret`, and `timestamp` is within [`TOLERANCE_SECS`] of `now`.
pub fn verify(secret: &str, timestamp: &str, signature: &str, body: &[u8], now: i64) -> bool {
    let Ok(timestamp) = timestamp.trim().parse::<i64>() else {
        return false;
    };
    if secret.is_empty() || (now - timestamp).abs() > TOLERANCE_SECS {
        return false;
    }
    signature
        .split(',')
        .filter_map(|entry| entry.trim().strip_prefix("v1="))
        .filter_map(|h| hex::decode(h).ok())
        .any(|given| mac(secret, timestamp, body).is_some_and(|m| m.verify_slice(&given).is_ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_holds_for_its_body_secret_and_time_only() {
        let body = br#"{"case_id":"c1","total_minor":94848}"#;
        let signed = sign("agency-secret", 1_776_000_000, body);
        assert!(signed.starts_with("v1=") && signed.len() == 3 + 64, "{signed}");
        assert!(verify("agency-secret", "1776000000", &signed, body, 1_776_000_100));
        assert!(
            verify(
                "agency-secret",
                "1776000000",
                &format!("v1=00,{signed}"),
                body,
                1_776_000_000
            ),
            "rotation"
        );
        assert!(!verify("another", "1776000000", &signed, body, 1_776_000_000));
        assert!(
            !verify("agency-secret", "1776000001", &signed, body, 1_776_000_000),
            "the time is signed"
        );
        assert!(!verify("agency-secret", "1776000000", &signed, b"{}", 1_776_000_000));
        assert!(
            !verify("agency-secret", "1776000000", &signed, body, 1_776_000_301),
            "too old"
        );
        assert!(!verify("agency-secret", "soon", &signed, body, 1_776_000_000));
        assert!(!verify(
            "",
            "1776000000",
            &sign("", 1_776_000_000, body),
            body,
            1_776_000_000
        ));
    }
}
