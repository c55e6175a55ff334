//! `/v1/events…`: the tenant's event log, replayed from the database and
//! followed live over Server-Sent Events. Both read the same log positions
//! (assigned by the relay after commit), so a client that resumes from the
//! last event id it saw gets no gap and no duplicate, on any replica.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use dashmap::DashMap;
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app_state::SharedState;
use crate::auth::{Principal, Role};
use crate::error::{ApiError, ApiResult, Problem};
use crate::events::outbox::{self, OutboxEvent};

pub fn router() -> OpenApiRouter<SharedState> {
    OpenApiRouter::new()
        .routes(routes!(replay))
        .routes(routes!(stream))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct LogQuery {
    /// Start after this event id (exclusive); default: the oldest retained event
    /// (replay) or now (stream).
    after: Option<String>,
    /// 1-1000, default 100 (replay only).
    limit: Option<i64>,
    /// Only events of this type, e.g. `business_store.data.created`.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    kind: Option<String>,
}

impl LogQuery {
    /// Refuses what cannot reach the database: U+0000 in a value.
    fn check(&self) -> ApiResult<()> {
        let nul = [("after", &self.after), ("type", &self.kind)]
            .into_iter()
            .find(|(_, v)| v.as_deref().is_some_and(|v| v.contains('\0')));
        match nul {
            Some((name, _)) => Err(ApiError::bad_request(format!(
                "the query parameter {name} contains U+0000 (%00), which cannot be used; remove it"
            ))),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct EventPage {
    /// CloudEvents, oldest first.
    #[schema(value_type = Vec<crate::events::envelope::CloudEvent>)]
    items: Vec<Value>,
    /// The id to pass as `after` for the next page; null when this page was not full.
    next_cursor: Option<String>,
}

/// The log position just after `event_id` (an event of this tenant).
async fn position(state: &SharedState, tenant: &str, event_id: &str) -> ApiResult<i64> {
    let unknown = || {
        ApiError::bad_request(format!(
            "unknown event id {event_id:?}: pass an id this API returned (events past retention are gone)"
        ))
    };
    let id: uuid::Uuid = event_id.parse().map_err(|_| unknown())?;
    outbox::position_of(&state.pool, tenant, id)
        .await
        .map_err(|e| ApiError::Internal(e.into()))?
        .ok_or_else(unknown)
}

/// The tenant's event log, oldest first.
#[utoipa::path(get, path = "/v1/events", tag = "events", params(LogQuery),
    responses((status = 200, body = EventPage), (status = 400, body = Problem)),
    security(("bearer" = [])))]
async fn replay(
    State(state): State<SharedState>,
    principal: Principal,
    Query(q): Query<LogQuery>,
) -> ApiResult<Json<EventPage>> {
    let tenant = principal.tenant_with(Role::Reader)?.as_str().to_owned();
    q.check()?;
    let limit = super::page_limit(q.limit)?;
    let after = match &q.after {
        Some(id) => position(&state, &tenant, id).await?,
        None => 0,
    };
    let rows = outbox::log(&state.pool, &tenant, after, q.kind.as_deref(), limit)
        .await
        .map_err(|e| ApiError::Internal(e.into()))?;
    let next_cursor = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|e| e.event_id.to_string()))
        .flatten();
    Ok(Json(EventPage {
        items: rows.into_iter().map(|e| e.envelope).collect(),
        next_cursor,
    }))
}

/// Follow the tenant's events live (Server-Sent Events). The SSE `id` is the
/// event id; reconnecting with `Last-Event-ID` resumes without gap or duplicate.
#[utoipa::path(get, path = "/v1/events/stream", tag = "events", params(LogQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event")),
    responses((status = 200, content_type = "text/event-stream", body = String),
              (status = 400, body = Problem)),
    security(("bearer" = [])))]
async fn stream(
    State(state): State<SharedState>,
    principal: Principal,
    headers: HeaderMap,
    Query(q): Query<LogQuery>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let tenant = principal.tenant_with(Role::Reader)?.as_str().to_owned();
    q.check()?;
    let open = state
        .streams
        .open(&tenant, state.settings.sse_max_streams_per_tenant)?;
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(q.after.clone());
    let mut head = state.event_log.follow();
    let pos = match resume {
        Some(id) => position(&state, &tenant, &id).await?,
        None => {
            head.borrow_and_update();
            outbox::last_seq(&state.pool)
                .await
                .map_err(|e| ApiError::Internal(e.into()))?
        }
    };
    let follower = Follower {
        _open: open,
        shutdown: state.shutdown.subscribe(),
        archived: state.gate.changes(),
        state: state.clone(),
        tenant,
        kind: q.kind,
        pos,
        head,
        buffered: VecDeque::new(),
    };
    let events = futures_util::stream::unfold(follower, |mut f| async move {
        let event = f.next().await?;
        Some((Ok(event), f))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// The event streams open per tenant: each holds a connection for as long
/// as it lasts, so a tenant gets a bounded number of them (else one tenant
/// could take every connection the server serves).
#[derive(Debug, Default)]
pub struct OpenStreams(Arc<DashMap<String, usize>>);

impl OpenStreams {
    /// Counts a new stream of `tenant`, or refuses it past `max`.
    fn open(&self, tenant: &str, max: usize) -> ApiResult<OpenStream> {
        let mut open = self.0.entry(tenant.to_owned()).or_insert(0);
        if *open >= max {
            return Err(ApiError::RateLimited {
                detail: format!(
                    "this tenant already has {max} event streams open; close one, or read with GET /v1/events"
                ),
                retry_after_secs: 5,
                policy: format!("\"streams\";q={max}"),
                limit: "\"streams\";r=0".into(),
            });
        }
        *open += 1;
        Ok(OpenStream {
            streams: self.0.clone(),
            tenant: tenant.to_owned(),
        })
    }
}

/// One open stream; dropping it (the stream ended) frees its place.
struct OpenStream {
    streams: Arc<DashMap<String, usize>>,
    tenant: String,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.streams.remove_if_mut(&self.tenant, |_, open| {
            *open = open.saturating_sub(1);
            *open == 0
        });
    }
}

/// How often an idle stream checks that its tenant is still active.
const STANDING_CHECK: Duration = Duration::from_secs(1);
/// How long an idle stream waits for the log head before reading anyway.
const IDLE_READ: Duration = Duration::from_secs(5);

/// One SSE client's cursor over the log. It reads at its own pace from the
/// database, so a slow client holds up nobody else. It ends when the service
/// shuts down or the tenant is archived.
struct Follower {
    _open: OpenStream,
    state: SharedState,
    tenant: String,
    kind: Option<String>,
    pos: i64,
    head: watch::Receiver<i64>,
    shutdown: watch::Receiver<bool>,
    archived: watch::Receiver<u64>,
    buffered: VecDeque<OutboxEvent>,
}

impl Follower {
    /// The next event, or `None` when the stream is over.
    async fn next(&mut self) -> Option<Event> {
        loop {
            if !self.wanted().await {
                return None;
            }
            if let Some(e) = self.buffered.pop_front() {
                self.pos = e.seq;
                return Some(
                    Event::default()
                        .id(e.event_id.to_string())
                        .event(e.kind)
                        .data(e.envelope.to_string()),
                );
            }
            self.read().await;
        }
    }

    /// Reads what follows in the log, or waits for the log to move.
    async fn read(&mut self) {
        // Mark the head seen before reading, so a move during the read wakes us.
        self.head.borrow_and_update();
        let kind = self.kind.as_deref();
        match outbox::log(&self.state.pool, &self.tenant, self.pos, kind, 100).await {
            Ok(rows) if !rows.is_empty() => self.buffered.extend(rows),
            Ok(_) => self.wait_for_head().await,
            Err(e) => {
                if !*self.shutdown.borrow() {
                    tracing::warn!(error = %e, "reading the event log for a stream failed");
                }
                self.pause(Duration::from_secs(1)).await;
            }
        }
    }

    /// Whether the stream goes on: the service is not stopping and the
    /// tenant is still active.
    async fn wanted(&self) -> bool {
        !*self.shutdown.borrow() && self.state.gate.is_admitted(&self.state, &self.tenant).await
    }

    /// Waits for the log head to move (up to [`IDLE_READ`]), checking the
    /// tenant's standing every [`STANDING_CHECK`] and returning early on
    /// shutdown or archive.
    async fn wait_for_head(&mut self) {
        let until = tokio::time::Instant::now() + IDLE_READ;
        while tokio::time::Instant::now() < until {
            let tick = until
                .saturating_duration_since(tokio::time::Instant::now())
                .min(STANDING_CHECK);
            tokio::select! {
                moved = self.head.changed() => {
                    if moved.is_err() {
                        self.pause(Duration::from_secs(1)).await;
                    }
                    return;
                }
                _ = self.shutdown.changed() => return,
                _ = self.archived.changed() => return,
                _ = tokio::time::sleep(tick) => {}
            }
            if !self.wanted().await {
                return;
            }
        }
    }

    /// Sleeps, unless the service begins to shut down.
    async fn pause(&mut self, wait: Duration) {
        tokio::select! {
            _ = self.shutdown.changed() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
