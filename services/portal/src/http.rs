//! The debtor-facing HTTP endpoint: `GET /pay/<token>[?lang=xx]`.
//!
//! Answers: 200 the page; 410 a genuine link that expired (with whom to ask for a new one);
//! 403 a link that is forged, altered or signed with an unknown key (a plain refusal that says
//! nothing of what the link claims); 429 too many pages for the link or the client address;
//! 503 while the read model is being rebuilt. Pages are never cached and send no referrer, so
//! the token in the address does not travel further; only a fingerprint of it is logged.

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::Router;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use forfall_domain::paylink::{LinkClaims, LinkError};
use forfall_platform::kafka::Failure;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tracing::Instrument;

use crate::Portal;
use crate::page::{self, Creditor};
use crate::revocation::LinkRefusal;
use crate::view::InvoiceView;

/// At most this many invoices of one link are shown (a message covers a handful).
const MAX_INVOICES: usize = 50;

pub fn routes(portal: Portal) -> Router {
    Router::new()
        .route("/pay/{token}", get(page_for_link))
        .route(
            "/pay/{token}/requests",
            axum::routing::post(crate::requests::post_request),
        )
        .route(
            "/pay/{token}/checkout",
            axum::routing::post(crate::checkout::post_checkout),
        )
        .route("/pay/return/{reference}", get(crate::payments::returned))
        .route(
            "/providers/vipps/{tenant}",
            axum::routing::post(crate::webhook::vipps_webhook),
        )
        .route("/v1/timeline/{tenant}/{invoice}", get(crate::timeline::get_timeline))
        .route(
            "/v1/links/revoke/{tenant}/{debtor}",
            axum::routing::post(crate::revocation::post_revoke),
        )
        .route(
            "/providers/stripe/{tenant}",
            axum::routing::post(crate::webhook::stripe_webhook),
        )
        .route(
            "/providers/swish/{tenant}",
            axum::routing::post(crate::webhook::swish_callback),
        )
        .with_state(portal)
}

#[derive(Debug, Deserialize)]
struct PageQuery {
    lang: Option<String>,
    /// Set by the redirect after a request was received.
    received: Option<String>,
    /// An instalment plan to show: the invoice and the number of instalments.
    plan_for: Option<String>,
    plan: Option<usize>,
}

/// A short, one-way name for a token: enough to follow one link through the logs, useless to
/// open the page with.
pub(crate) fn fingerprint(secret: &str) -> String {
    hex::encode(&Sha256::digest(secret.as_bytes())[..8])
}

/// What a page's forms are signed for: one link (by its fingerprint) and one invoice of it.
/// The page signs with it and every form handler checks it.
pub(crate) fn form_scope(link: &str, invoice: &str) -> String {
    format!("{link}/{invoice}")
}

/// Where a page's request forms post to, relative to the page.
fn requests_action(token: &str) -> String {
    format!("{token}/requests")
}

async fn page_for_link(
    State(portal): State<Portal>,
    Path(token): Path<String>,
    Query(query): Query<PageQuery>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let link = fingerprint(&token);
    let span = tracing::info_span!("page", link = %link);
    async move {
        let client = portal.client_address(&headers, peer);
        let (response, result) = match portal.over_limit(&fingerprint(&client), &link).await {
            Ok(Some(retry_after)) => (limited(retry_after), "limited"),
            Ok(None) => {
                let plan_asked = query.plan_for.clone().zip(query.plan);
                portal
                    .answer(&token, query.lang.as_deref(), query.received.is_some(), plan_asked)
                    .await
            }
            Err(e) => {
                tracing::warn!(error = ?e, "cannot count pages; answering unavailable");
                (unavailable(), "unavailable")
            }
        };
        portal.0.metrics.pages.with_label_values(&[result]).inc();
        tracing::info!(result, "page answered");
        response
    }
    .instrument(span)
    .await
}

impl Portal {
    /// The client's address: the trusted proxy's header when configured, else the peer.
    pub(crate) fn client_address(&self, headers: &HeaderMap, peer: SocketAddr) -> String {
        self.0
            .settings
            .client_address_header
            .as_deref()
            .and_then(|name| headers.get(name))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| peer.ip().to_string())
    }

    /// Counts a page for the client and the link in this minute's window (in Redis, so that
    /// every instance counts together); the seconds until the window ends when either is over.
    pub(crate) async fn over_limit(&self, client: &str, link: &str) -> Result<Option<u64>, Failure> {
        let now = self.0.rt.clock.now().timestamp();
        let window = now / 60;
        let keys = &self.0.keys.0;
        let by_client = keys.key(&["portal", "limit", "client", client, &window.to_string()]);
        let by_link = keys.key(&["portal", "limit", "link", link, &window.to_string()]);
        let (client_count, link_count): (u64, u64) = redis::pipe()
            .incr(&by_client, 1)
            .expire(&by_client, 120)
            .ignore()
            .incr(&by_link, 1)
            .expire(&by_link, 120)
            .ignore()
            .query_async(&mut self.0.redis.clone())
            .await?;
        let s = &self.0.settings;
        Ok(
            (client_count > s.per_address_per_minute || link_count > s.per_link_per_minute)
                .then(|| u64::try_from(60 - now.rem_euclid(60)).unwrap_or(60)),
        )
    }

    async fn answer(
        &self,
        token: &str,
        lang: Option<&str>,
        received: bool,
        plan_asked: Option<(String, usize)>,
    ) -> (Response, &'static str) {
        match self.open_link(token).await {
            Ok(claims) => match self.views(&claims).await {
                Ok(views) => (self.page(token, &claims, &views, lang, received, plan_asked), "shown"),
                Err(e) => {
                    tracing::warn!(error = ?e, "the read model is not ready");
                    (unavailable(), "unavailable")
                }
            },
            Err(LinkRefusal::Withdrawn) => (withdrawn(), "withdrawn"),
            Err(LinkRefusal::Unavailable(e)) => {
                tracing::warn!(error = ?e, "whether the link was withdrawn cannot be told");
                (unavailable(), "unavailable")
            }
            Err(LinkRefusal::Invalid(LinkError::Expired(_))) => match self.open_expired_link(token).await {
                Ok(claims) => {
                    // Only to speak the debtor's language: nothing of the invoices is shown.
                    let views = self.views(&claims).await.unwrap_or_default();
                    (self.expired(token, &claims, &views, lang, received), "expired")
                }
                Err(LinkRefusal::Withdrawn) => (withdrawn(), "withdrawn"),
                Err(LinkRefusal::Unavailable(e)) => {
                    tracing::warn!(error = ?e, "whether the link was withdrawn cannot be told");
                    (unavailable(), "unavailable")
                }
                Err(LinkRefusal::Invalid(_)) => (refused(), "refused"),
            },
            Err(LinkRefusal::Invalid(why)) => {
                tracing::info!(why = %why, "link refused");
                (refused(), "refused")
            }
        }
    }

    /// The claimed invoices' views, read with the state marker in one round trip.
    pub(crate) async fn views(&self, claims: &LinkClaims) -> Result<Vec<InvoiceView>, Failure> {
        self.0.state.ensure_ready().await?;
        let floor = self.0.state.read_floor();
        let mut pipe = redis::pipe();
        for invoice_id in claims.invoices.iter().take(MAX_INVOICES) {
            pipe.hgetall(self.0.keys.invoice(&claims.tenant, invoice_id));
        }
        pipe.get(self.0.state.marker_key());
        let mut got: Vec<redis::Value> = pipe.query_async(&mut self.0.redis.clone()).await?;
        let marker: Option<String> = redis::from_redis_value(got.pop().unwrap_or(redis::Value::Nil))
            .map_err(|e| Failure::Transient(e.into()))?;
        self.0.state.check(marker.as_deref(), floor)?;
        got.into_iter()
            .zip(&claims.invoices)
            .map(|(v, invoice_id)| {
                let fields: HashMap<String, String> =
                    redis::from_redis_value(v).map_err(|e| Failure::Transient(e.into()))?;
                Ok(InvoiceView::from_fields(invoice_id, fields))
            })
            .collect()
    }

    /// The payment providers the page offers for the tenant.
    pub(crate) fn providers(&self, tenant: &str) -> Vec<crate::checkout::Provider> {
        use crate::checkout::Provider;
        let mut providers = Vec::new();
        if self.0.settings.vipps.contains_key(tenant) {
            providers.push(Provider::Vipps);
        }
        if self.0.settings.stripe.contains_key(tenant) {
            providers.push(Provider::Stripe);
        }
        if self.0.settings.swish.contains_key(tenant) {
            providers.push(Provider::Swish);
        }
        providers
    }

    /// The origin the links are published under (`dispatch.pay_link.base_url`'s).
    pub(crate) fn public_origin(&self) -> String {
        origin_of(&self.0.pay_base_url).unwrap_or_default()
    }

    /// The origins the page's pay-now forms end up at (the providers' pages): the browser
    /// follows the portal's redirect there only if the page's form-action policy names them.
    fn form_targets(&self, tenant: &str) -> Vec<String> {
        let mut targets = Vec::new();
        if let Some(m) = self.0.settings.vipps.get(tenant) {
            targets.extend(origin_of(&m.base_url));
            if m.redirect_origins.is_empty() {
                targets.extend(crate::vipps::LANDING_ORIGINS.map(str::to_owned));
            }
            targets.extend(m.redirect_origins.iter().cloned());
        }
        if let Some(a) = self.0.settings.stripe.get(tenant) {
            targets.extend(origin_of(&a.base_url));
            if a.redirect_origins.is_empty() {
                targets.extend(crate::stripe::CHECKOUT_ORIGINS.map(str::to_owned));
            }
            targets.extend(a.redirect_origins.iter().cloned());
        }
        // Only what a CSP source may be: no spaces, quotes or separators smuggled in.
        targets.retain(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || ":/.-[]".contains(c)));
        targets.sort();
        targets.dedup();
        targets
    }

    /// One invoice's view, read with the state marker; `None` when the portal knows nothing
    /// of it.
    pub(crate) async fn view_of(&self, tenant: &str, invoice_id: &str) -> Result<Option<InvoiceView>, Failure> {
        self.0.state.ensure_ready().await?;
        let floor = self.0.state.read_floor();
        let (fields, marker): (HashMap<String, String>, Option<String>) = redis::pipe()
            .hgetall(self.0.keys.invoice(tenant, invoice_id))
            .get(self.0.state.marker_key())
            .query_async(&mut self.0.redis.clone())
            .await?;
        self.0.state.check(marker.as_deref(), floor)?;
        Ok((!fields.is_empty()).then(|| InvoiceView::from_fields(invoice_id, fields)))
    }

    pub(crate) fn creditor(&self, tenant: &str) -> Creditor {
        self.0.creditors.get(tenant).cloned().unwrap_or_default()
    }

    fn page(
        &self,
        token: &str,
        claims: &LinkClaims,
        views: &[InvoiceView],
        lang: Option<&str>,
        received: bool,
        plan_asked: Option<(String, usize)>,
    ) -> Response {
        let language = page::language(lang, views);
        let link = fingerprint(token);
        let token_for = |invoice: &str| self.0.links.form_token(&form_scope(&link, invoice));
        let forms = page::Forms {
            action: requests_action(token),
            token_for: &token_for,
            today: self.0.rt.clock.now().date_naive(),
            received,
            providers: self.providers(&claims.tenant),
            pauses: self.0.pauses,
            plan_asked,
        };
        let page = page::build(
            &claims.debtor_id,
            views,
            &self.creditor(&claims.tenant),
            &claims.tenant,
            language,
            &self.0.texts,
            &forms,
        );
        match self.0.renderer.page(&page) {
            Ok(html) => html_response_posting_to(StatusCode::OK, html, &self.form_targets(&claims.tenant)),
            Err(e) => {
                tracing::error!(error = %e, "the page cannot be rendered");
                unavailable()
            }
        }
    }

    fn expired(
        &self,
        token: &str,
        claims: &LinkClaims,
        views: &[InvoiceView],
        lang: Option<&str>,
        received: bool,
    ) -> Response {
        // The fresh link is asked for the link's first invoice; the message lists what is
        // open of the debtor's then, like any other.
        let fresh_link = claims.invoices.first().map(|invoice_id| page::FreshLinkForm {
            invoice_id: invoice_id.clone(),
            form_token: self.0.links.form_token(&form_scope(&fingerprint(token), invoice_id)),
        });
        let page = page::expired(
            &self.creditor(&claims.tenant),
            &claims.tenant,
            page::language(lang, views),
            &self.0.texts,
            requests_action(token),
            fresh_link,
            received,
        );
        match self.0.renderer.expired(&page) {
            Ok(html) => html_response(StatusCode::GONE, html),
            Err(e) => {
                tracing::error!(error = %e, "the expired page cannot be rendered");
                unavailable()
            }
        }
    }
}

/// A URL's origin (`scheme://host[:port]`).
fn origin_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    Some(format!("{scheme}://{}", rest.split('/').next()?))
}

/// The page's one script, by its hash.
static COPY_SCRIPT_SOURCE: std::sync::LazyLock<String> = std::sync::LazyLock::new(page::copy_script_source);

/// Headers every answer carries: never cached, no referrer (the token is in the address),
/// nothing loaded from elsewhere but the page's own script, never framed.
pub(crate) fn html_response(status: StatusCode, html: String) -> Response {
    html_response_posting_to(status, html, &[])
}

/// [`html_response`] for a page whose forms may end up at these origins too (a payment
/// provider the portal redirects a pay-now form to).
pub(crate) fn html_response_posting_to(status: StatusCode, html: String, form_targets: &[String]) -> Response {
    let mut response = (status, html).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    let policy = format!(
        "default-src 'none'; script-src {}; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'{}{}; base-uri 'none'; frame-ancestors 'none'",
        COPY_SCRIPT_SOURCE.as_str(),
        if form_targets.is_empty() { "" } else { " " },
        form_targets.join(" ")
    );
    if let Ok(policy) = HeaderValue::from_str(&policy) {
        h.insert(header::CONTENT_SECURITY_POLICY, policy);
    }
    response
}

pub(crate) const PLAIN: &str = "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>Forfall</title></head><body><main><h1>";

pub(crate) fn refused() -> Response {
    html_response(
        StatusCode::FORBIDDEN,
        format!(
            "{PLAIN}This link is not valid.</h1><p>Please use the link in the message you received, or contact the company that sent it.</p></main></body></html>"
        ),
    )
}

/// A genuine link the creditor withdrew: nothing of what it claims is shown.
pub(crate) fn withdrawn() -> Response {
    html_response(
        StatusCode::GONE,
        format!(
            "{PLAIN}This link has been withdrawn.</h1><p>Please use the link in the latest message you received, or contact the company that sent it.</p></main></body></html>"
        ),
    )
}

pub(crate) fn limited(retry_after: u64) -> Response {
    let mut response = html_response(
        StatusCode::TOO_MANY_REQUESTS,
        format!("{PLAIN}Too many requests.</h1><p>Please try again in a minute.</p></main></body></html>"),
    );
    if let Ok(v) = HeaderValue::from_str(&retry_after.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    response
}

pub(crate) fn unavailable() -> Response {
    let mut response = html_response(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "{PLAIN}This page is not available right now.</h1><p>Please try again in a few minutes.</p></main></body></html>"
        ),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("30"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_names_a_token_without_revealing_it() {
        let token = "v1.dev.eyJ0IjoiYWNtZSJ9.c2lnbmF0dXJl";
        let f = fingerprint(token);
        assert_eq!(f.len(), 16);
        assert_eq!(f, fingerprint(token));
        assert_ne!(f, fingerprint("v1.dev.eyJ0IjoiYWNtZSJ9.c2lnbmF0dXJm"));
        assert!(!token.contains(&f));
    }
}
