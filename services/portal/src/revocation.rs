//! Withdrawing a debtor's links: when a link went to the wrong person (a mistyped address, a
//! shared phone, a contact that changed hands), the creditor's staff withdraw every link of
//! that debtor signed so far. Such a link then gets a plain "withdrawn" answer that shows
//! nothing of the invoices, and no form posted from it is taken; links signed afterwards (the
//! next message's) work.
//!
//! `POST /v1/links/revoke/<tenant>/<debtor>` with the staff token. The withdrawal goes to the
//! portal's changelog (acknowledged) before Redis, so a rebuilt portal still refuses those
//! links; it is kept as long as a link lives (`dispatch.pay_link.ttl_days`), after which every
//! link it covers has expired anyway.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use forfall_domain::paylink::{LinkClaims, LinkError};
use forfall_platform::kafka::Failure;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::Instrument;

use crate::Portal;

/// The changelog's keys of withdrawals start with this.
pub const CHANGELOG_PREFIX: &str = "revoked/";

/// The debtor's links signed at or before `revoked_at` (Unix seconds) are withdrawn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub tenant: String,
    pub debtor_id: String,
    pub revoked_at: i64,
}

/// The changelog's key of a debtor's withdrawal (a digest: ids may hold any character).
pub fn changelog_key(tenant: &str, debtor_id: &str) -> String {
    // The tenant's length first: no two (tenant, debtor) pairs read as the same text.
    let digest = Sha256::digest(format!("{}:{tenant}{debtor_id}", tenant.len()));
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{CHANGELOG_PREFIX}{hex}")
}

/// Why a link is not taken.
#[derive(Debug)]
pub(crate) enum LinkRefusal {
    /// Forged, altered, unknown key, or expired.
    Invalid(LinkError),
    /// Genuine, but withdrawn by the creditor's staff.
    Withdrawn,
    /// Redis is away: whether it was withdrawn cannot be told yet.
    Unavailable(Failure),
}

impl Portal {
    /// The claims of a link that is genuine, unexpired and not withdrawn.
    pub(crate) async fn open_link(&self, token: &str) -> Result<LinkClaims, LinkRefusal> {
        let claims = self
            .0
            .links
            .verify(token, self.0.rt.clock.now())
            .map_err(LinkRefusal::Invalid)?;
        self.unless_withdrawn(claims).await
    }

    /// The claims of a link that is genuine and not withdrawn, however old: an expired one may
    /// still ask for a fresh link to the contact on file, and nothing more.
    pub(crate) async fn open_expired_link(&self, token: &str) -> Result<LinkClaims, LinkRefusal> {
        let claims = self.0.links.verify_signature(token).map_err(LinkRefusal::Invalid)?;
        self.unless_withdrawn(claims).await
    }

    async fn unless_withdrawn(&self, claims: LinkClaims) -> Result<LinkClaims, LinkRefusal> {
        match self.revoked_at(&claims.tenant, &claims.debtor_id).await {
            Ok(Some(at)) if self.0.links.issued_at(&claims) <= at => Err(LinkRefusal::Withdrawn),
            Ok(_) => Ok(claims),
            Err(e) => Err(LinkRefusal::Unavailable(e)),
        }
    }

    /// Read with the state marker: a withdrawal lost with Redis is not taken for none while
    /// the portal rebuilds.
    async fn revoked_at(&self, tenant: &str, debtor_id: &str) -> Result<Option<i64>, Failure> {
        self.0.state.ensure_ready().await?;
        let floor = self.0.state.read_floor();
        let (raw, marker): (Option<Vec<u8>>, Option<String>) = redis::pipe()
            .get(self.0.keys.revoked(tenant, debtor_id))
            .get(self.0.state.marker_key())
            .query_async(&mut self.0.redis.clone())
            .await?;
        self.0.state.check(marker.as_deref(), floor)?;
        Ok(raw
            .and_then(|r| serde_json::from_slice::<Revocation>(&r).ok())
            .map(|r| r.revoked_at))
    }

    /// Withdraws every link of the debtor signed up to now: on the changelog (acknowledged),
    /// then in Redis for as long as a link lives.
    pub(crate) async fn revoke(&self, tenant: &str, debtor_id: &str) -> Result<Revocation, Failure> {
        let revocation = Revocation {
            tenant: tenant.to_owned(),
            debtor_id: debtor_id.to_owned(),
            revoked_at: self.0.rt.clock.now().timestamp(),
        };
        let value = serde_json::to_vec(&revocation).map_err(|e| Failure::Transient(e.into()))?;
        let ttl_secs = u64::try_from(self.0.links.ttl_secs()).unwrap_or(1);
        self.keep(
            changelog_key(tenant, debtor_id),
            self.0.keys.revoked(tenant, debtor_id),
            value,
            ttl_secs,
        )
        .await?;
        Ok(revocation)
    }
}

/// `POST /v1/links/revoke/<tenant>/<debtor>`: withdraws the debtor's links signed so far.
pub(crate) async fn post_revoke(
    State(portal): State<Portal>,
    Path((tenant, debtor_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = crate::timeline::tenant_or_staff_refusal(&portal, &headers, &tenant) {
        return refused;
    }
    let span = tracing::info_span!("revoke_links", tenant = %tenant);
    let revoked = portal.revoke(&tenant, &debtor_id).instrument(span.clone()).await;
    // Entered only once nothing is awaited any more (an entered span must not cross an await).
    let _entered = span.enter();
    match revoked {
        Ok(revocation) => {
            tracing::info!(revoked_at = revocation.revoked_at, "a debtor's links withdrawn");
            axum::Json(revocation).into_response()
        }
        Err(e) => {
            tracing::warn!(error = ?e, "the withdrawal could not be recorded");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the withdrawal could not be recorded; nothing changed, try again\n",
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_debtor_has_one_key_whatever_the_ids_hold() {
        let a = changelog_key("acme", "x/y");
        assert_eq!(a, changelog_key("acme", "x/y"));
        assert!(a.starts_with(CHANGELOG_PREFIX) && a.len() == CHANGELOG_PREFIX.len() + 64);
        assert_ne!(changelog_key("acme", "x"), changelog_key("acm", "ex"));
        assert_ne!(changelog_key("ac\u{0}me", "x"), changelog_key("ac", "me\u{0}x"));
    }
}
