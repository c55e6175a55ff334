//! Per-tenant admission, after the token is verified and before any
//! handler runs: an archived (or unknown) tenant's tokens reach nothing, and
//! each tenant's requests and plugin uploads are rate limited, so one
//! tenant cannot spend the capacity the others need.
//!
//! It runs on every request, so it must not ask the database each time: a
//! tenant's standing (active or not, and its own limits) is cached for
//! [`TTL`] and refreshed by one request while the others use the value they
//! have. Archiving on this replica takes effect at once ([`TenantGate::forget`]);
//! other replicas see it within [`TTL`]. Long-lived responses (SSE) ask
//! [`TenantGate::is_admitted`] as they go and wake on [`TenantGate::changes`].

mod limits;
mod token_bucket;

use std::cell::Cell;
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use dashmap::DashMap;
use tokio::sync::watch;

pub use self::limits::{RateLimitOverrides, RateLimits, check as check_overrides};
use self::token_bucket::{Bucket, Rate, Take};
use crate::app_state::SharedState;
use crate::auth::Principal;
use crate::config::Settings;
use crate::error::ApiError;

/// How long a tenant's standing is trusted before it is read again.
const TTL: Duration = Duration::from_secs(1);
/// A refresh that has not finished in this time (its request went away) is
/// taken over by the next request.
const REFRESH_GIVE_UP: Duration = Duration::from_secs(2);
/// Tenants remembered before the long-unseen ones are dropped.
const MAX_TENANTS: usize = 100_000;
/// What a token for a tenant that is not (or no longer) active gets: the
/// same answer whether it never existed or was archived.
const NOT_FOUND: &str = "the token's tenant was not found";

/// One tenant as this replica knows it.
#[derive(Debug)]
struct Entry {
    /// The limits of an active tenant; `None`: not active (unknown or archived).
    limits: Option<RateLimits>,
    checked: Instant,
    stale: bool,
    refreshing_since: Option<Instant>,
    /// Bumped when the tenant is archived here, so that a refresh that read
    /// the row before the archive cannot undo it.
    generation: u64,
    requests: Option<Bucket>,
    uploads: Option<Bucket>,
}

impl Entry {
    fn new(limits: Option<RateLimits>) -> Self {
        Self {
            limits,
            checked: Instant::now(),
            stale: false,
            refreshing_since: None,
            generation: 0,
            requests: None,
            uploads: None,
        }
    }
}

/// What the cache could say without asking the database.
enum Cached {
    Fresh(Option<RateLimits>),
    /// Known but old: this request refreshes it (from this generation).
    Refresh(Option<RateLimits>, u64),
    Missing,
}

/// A rate-limit outcome, as the `RateLimit*` headers show it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quota {
    policy: &'static str,
    rate: Rate,
    take: Take,
}

impl Quota {
    /// `RateLimit-Policy`: the quota and the seconds it refills in.
    pub fn policy_header(&self) -> String {
        format!(
            "\"{}\";q={};w={}",
            self.policy,
            self.rate.burst,
            self.rate.window_secs()
        )
    }

    /// `RateLimit`: what is left and the seconds until it resets.
    pub fn limit_header(&self) -> String {
        format!(
            "\"{}\";r={};t={}",
            self.policy, self.take.remaining, self.take.reset_secs
        )
    }

    fn refusal(&self) -> ApiError {
        let what = if self.policy == "uploads" {
            "plugin uploads"
        } else {
            "requests"
        };
        ApiError::RateLimited {
            detail: format!(
                "this tenant is over its limit of {what}; retry after {} s",
                self.take.reset_secs
            ),
            retry_after_secs: self.take.reset_secs,
            policy: self.policy_header(),
            limit: self.limit_header(),
        }
    }
}

tokio::task_local! {
    /// The request's quota, for [`rate_limit_headers`] to show.
    static QUOTA: Cell<Option<Quota>>;
}

#[derive(Debug)]
pub struct TenantGate {
    defaults: RateLimits,
    tenants: DashMap<String, Entry>,
    /// Bumped whenever a tenant is archived here.
    changes: watch::Sender<u64>,
}

impl TenantGate {
    pub fn new(settings: &Settings) -> Self {
        Self {
            defaults: RateLimits::from_settings(settings),
            tenants: DashMap::new(),
            changes: watch::Sender::new(0),
        }
    }

    /// The installation's limits.
    pub fn defaults(&self) -> RateLimits {
        self.defaults
    }

    /// Lets the request through, or answers why not: 404 for a tenant that
    /// is not active, 429 over a rate limit. Platform admins without a
    /// tenant are not gated.
    pub async fn admit(
        &self,
        state: &SharedState,
        principal: &Principal,
        parts: &Parts,
    ) -> Result<(), ApiError> {
        let Some(tenant) = &principal.tenant else {
            return Ok(());
        };
        let tenant = tenant.as_str();
        let limits = self
            .standing(state, tenant)
            .await?
            .ok_or_else(|| ApiError::not_found(NOT_FOUND))?;
        let upload = parts.method == Method::POST && parts.uri.path() == "/v1/plugins";
        let quota = self.take(tenant, &limits, upload);
        if let Some(q) = quota.filter(|q| !q.take.allowed) {
            return Err(q.refusal());
        }
        let _ = QUOTA.try_with(|cell| cell.set(quota));
        Ok(())
    }

    /// Whether the tenant is still active, as of at most [`TTL`] ago.
    /// A failure to find out counts as yes: it is not a reason to cut off.
    pub async fn is_admitted(&self, state: &SharedState, tenant: &str) -> bool {
        self.standing(state, tenant)
            .await
            .map_or(true, |limits| limits.is_some())
    }

    /// Wakes when a tenant was archived on this replica.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The tenant was archived here: refuse it at once.
    pub fn forget(&self, tenant: &str) {
        let mut e = self
            .tenants
            .entry(tenant.to_owned())
            .or_insert_with(|| Entry::new(None));
        e.limits = None;
        e.checked = Instant::now();
        e.stale = false;
        e.refreshing_since = None;
        e.generation = e.generation.wrapping_add(1);
        drop(e);
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The tenant was created: read it afresh.
    pub fn reset(&self, tenant: &str) {
        self.tenants.remove(tenant);
    }

    /// The tenant's limits changed: read them again, keeping its buckets.
    pub fn refresh(&self, tenant: &str) {
        if let Some(mut e) = self.tenants.get_mut(tenant) {
            e.stale = true;
        }
    }

    /// The tenant's limits if it is active, `None` if not.
    async fn standing(
        &self,
        state: &SharedState,
        tenant: &str,
    ) -> Result<Option<RateLimits>, ApiError> {
        let (previous, generation) = match self.cached(tenant, Instant::now()) {
            Cached::Fresh(limits) => return Ok(limits),
            Cached::Refresh(limits, generation) => (Some(limits), Some(generation)),
            Cached::Missing => (None, None),
        };
        match crate::storage::tenants::rate_limits(&state.pool, tenant).await {
            Ok(row) => {
                let limits = row.map(|own| {
                    let own: RateLimitOverrides = serde_json::from_value(own).unwrap_or_default();
                    self.defaults.with(&own)
                });
                Ok(self.store(tenant, limits, generation))
            }
            Err(e) => {
                if let Some(mut entry) = self.tenants.get_mut(tenant) {
                    entry.refreshing_since = None;
                }
                previous.ok_or_else(|| ApiError::Internal(e.into()))
            }
        }
    }

    fn cached(&self, tenant: &str, now: Instant) -> Cached {
        let Some(mut entry) = self.tenants.get_mut(tenant) else {
            return Cached::Missing;
        };
        if !entry.stale && now.saturating_duration_since(entry.checked) < TTL {
            return Cached::Fresh(entry.limits);
        }
        let busy = entry
            .refreshing_since
            .is_some_and(|since| now.saturating_duration_since(since) < REFRESH_GIVE_UP);
        if busy {
            return Cached::Fresh(entry.limits);
        }
        entry.refreshing_since = Some(now);
        Cached::Refresh(entry.limits, entry.generation)
    }

    /// Keeps what was read, unless the entry changed since (`generation`:
    /// the one the read started from, `None` if there was no entry): then
    /// what the entry says wins. Returns the tenant's standing.
    fn store(
        &self,
        tenant: &str,
        limits: Option<RateLimits>,
        generation: Option<u64>,
    ) -> Option<RateLimits> {
        let now = Instant::now();
        if let Some(mut e) = self.tenants.get_mut(tenant) {
            if generation != Some(e.generation) {
                return e.limits;
            }
            e.limits = limits;
            e.checked = now;
            e.stale = false;
            e.refreshing_since = None;
            return limits;
        }
        if self.tenants.len() >= MAX_TENANTS {
            self.tenants
                .retain(|_, e| now.saturating_duration_since(e.checked) < Duration::from_secs(60));
            if self.tenants.len() >= MAX_TENANTS {
                self.tenants.clear();
            }
        }
        match self.tenants.entry(tenant.to_owned()) {
            // Made meanwhile (an archive here, another first request): it wins.
            dashmap::Entry::Occupied(e) => e.get().limits,
            dashmap::Entry::Vacant(v) => {
                v.insert(Entry::new(limits));
                limits
            }
        }
    }

    /// Spends one request (and then one upload) from the tenant's buckets. The
    /// quota that refused it, or else the request quota; `None` when
    /// requests are not limited.
    fn take(&self, tenant: &str, limits: &RateLimits, upload: bool) -> Option<Quota> {
        let mut entry = self.tenants.get_mut(tenant)?;
        let now = Instant::now();
        let entry = &mut *entry;
        let requests = spend("requests", limits.requests(), &mut entry.requests, now);
        if !upload || requests.as_ref().is_some_and(|q| !q.take.allowed) {
            return requests;
        }
        let uploads = spend("uploads", limits.uploads(), &mut entry.uploads, now);
        match uploads {
            Some(q) if !q.take.allowed => Some(q),
            _ => requests,
        }
    }
}

fn spend(
    policy: &'static str,
    rate: Rate,
    bucket: &mut Option<Bucket>,
    now: Instant,
) -> Option<Quota> {
    if rate.is_off() {
        return None;
    }
    let take = bucket
        .get_or_insert_with(|| Bucket::full(rate, now))
        .take(rate, now);
    Some(Quota { policy, rate, take })
}

/// Adds `RateLimit-Policy` and `RateLimit` to the responses of requests the
/// gate let through under a limit (a 429 carries its own).
pub async fn rate_limit_headers(req: Request, next: Next) -> Response {
    let (mut response, quota) = QUOTA
        .scope(Cell::new(None), async move {
            let response = next.run(req).await;
            (response, QUOTA.with(Cell::get))
        })
        .await;
    let headers = response.headers_mut();
    if let Some(q) = quota.filter(|_| !headers.contains_key("ratelimit")) {
        for (name, value) in [
            ("ratelimit-policy", q.policy_header()),
            ("ratelimit", q.limit_header()),
        ] {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    use super::*;

    fn quota(allowed: bool) -> Quota {
        Quota {
            policy: "requests",
            rate: Rate {
                per_sec: 10.0,
                burst: 20,
            },
            take: Take {
                allowed,
                remaining: 19,
                reset_secs: 1,
            },
        }
    }

    #[tokio::test]
    async fn a_response_shows_the_quota_its_request_was_admitted_under() {
        let app = Router::new()
            .route(
                "/",
                get(|| async {
                    let _ = QUOTA.try_with(|cell| cell.set(Some(quota(true))));
                    "ok"
                }),
            )
            .route_layer(axum::middleware::from_fn(rate_limit_headers));
        let request = Request::builder().uri("/").body(Body::empty());
        let response = app.oneshot(request.unwrap_or_default()).await;
        let headers = response.map(|r| r.headers().clone()).unwrap_or_default();
        assert_eq!(headers["ratelimit-policy"], "\"requests\";q=20;w=2");
        assert_eq!(headers["ratelimit"], "\"requests\";r=19;t=1");
    }

    #[test]
    fn a_refusal_is_a_429_with_retry_after() {
        let response = axum::response::IntoResponse::into_response(quota(false).refusal());
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["retry-after"], "1");
        assert_eq!(response.headers()["ratelimit"], "\"requests\";r=19;t=1");
    }
}
