//! `GET /v1/handoff/preview/<tenant>/<debtor>`: the cases that would go to the agency today
//! for the debtor's open invoices, composed as the hand-off composes them (the claim with every
//! amount and citation, the warning, the debtor), and sent nowhere. For the creditor's staff
//! only (`watcher.staff_token` as the bearer token): a case names the debtor.

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use forfall_domain::JourneyState;
use forfall_domain::journey::{Journey, PauseReason};
use forfall_platform::config::Secret;
use forfall_platform::kafka::Failure;
use forfall_platform::records::HandoffCase;
use tracing::Instrument;

use crate::Watcher;

#[derive(Clone)]
struct Preview {
    watcher: Arc<OnceLock<Watcher>>,
    token: Option<Secret>,
}

pub(crate) fn routes(watcher: Arc<OnceLock<Watcher>>, token: Option<Secret>) -> Router {
    Router::new()
        .route("/v1/handoff/preview/{tenant}/{debtor}", axum::routing::get(preview))
        .with_state(Preview { watcher, token })
}

async fn preview(
    State(p): State<Preview>,
    Path((tenant, debtor)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) =
        forfall_platform::admin::staff_refusal(p.token.as_ref().map(Secret::expose), "watcher.staff_token", &headers)
    {
        return refused;
    }
    let Some(watcher) = p.watcher.get() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response();
    };
    if !watcher.0.readiness.is_ready() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the journeys are not all here yet (starting or rebuilding)\n",
        )
            .into_response();
    }
    let span = tracing::info_span!("handoff_preview", tenant = %tenant);
    match watcher.cases_today(&tenant, &debtor).instrument(span).await {
        Ok(cases) => axum::Json(cases).into_response(),
        Err(e) => {
            tracing::warn!(error = ?e, "cannot read the debtor's journeys now");
            (StatusCode::SERVICE_UNAVAILABLE, "the journeys cannot be read now\n").into_response()
        }
    }
}

impl Watcher {
    /// The case each of the debtor's journeys still open would make if handed over now.
    pub(crate) async fn cases_today(&self, tenant: &str, debtor_id: &str) -> Result<Vec<HandoffCase>, Failure> {
        let invoices = self
            .0
            .store
            .open_invoices(&[(tenant.to_owned(), debtor_id.to_owned())])
            .await?
            .pop()
            .unwrap_or_default();
        let pairs: Vec<(String, String)> = invoices.into_iter().map(|i| (tenant.to_owned(), i)).collect();
        let now = self.0.rt.clock.now();
        let mut journeys: Vec<Journey> = self
            .0
            .store
            .read_journeys(&pairs)
            .await?
            .into_iter()
            .flatten()
            .map(|loaded| loaded.stored.journey)
            .filter(|j| !matches!(j.state, JourneyState::Closed(_) | JourneyState::HandedOver))
            .collect();
        journeys.sort_by_key(|j| (j.anchor_due(), j.invoice.invoice_id.clone()));
        // Where the law merges a debtor's claims, they would go as one case, led by the oldest;
        // a disputed claim stays apart.
        let mut cases = Vec::new();
        let mut groups: Vec<Vec<Journey>> = Vec::new();
        for j in journeys {
            let today = j.invoice.jurisdiction.local_day(now);
            let merges = j.state != JourneyState::Paused(PauseReason::Dispute)
                && self.0.law.merge_rule(&Self::law_context(&j), today).is_some();
            let key = |g: &Journey| (g.invoice.jurisdiction, g.invoice.amount.currency);
            match groups
                .iter_mut()
                .find(|g| merges && g.first().is_some_and(|l| key(l) == key(&j)))
            {
                Some(group) => group.push(j),
                None if merges => groups.push(vec![j]),
                None => cases.push(self.case(&j, &[], now)),
            }
        }
        for group in groups {
            if let Some((lead, merged)) = group.split_first() {
                cases.push(self.case(lead, merged, now));
            }
        }
        Ok(cases)
    }
}
