//! `/v1/events…`: the tenant's event log, replayed from the database and
//! followed live over Server-Sent Events. Both read the same log positions
//! (assigned by the relay after commit), so a client that resumes from the
//! last event id it saw gets no gap and no duplicate, on any replica.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
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

const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1000;

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

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct EventPage {
    /// CloudEvents, oldest first.
    #[schema(value_type = Vec<Object>)]
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
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be from 1 to {MAX_LIMIT}"
        )));
    }
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
        state: state.clone(),
        tenant,
        kind: q.kind,
        pos,
        head,
        buffered: VecDeque::new(),
    };
    let events = futures_util::stream::unfold(follower, |mut f| async move {
        let event = f.next().await;
        Some((Ok(event), f))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// One SSE client's cursor over the log. It reads at its own pace from the
/// database, so a slow client holds up nobody else.
struct Follower {
    state: SharedState,
    tenant: String,
    kind: Option<String>,
    pos: i64,
    head: watch::Receiver<i64>,
    buffered: VecDeque<OutboxEvent>,
}

impl Follower {
    async fn next(&mut self) -> Event {
        loop {
            if let Some(e) = self.buffered.pop_front() {
                self.pos = e.seq;
                return Event::default()
                    .id(e.event_id.to_string())
                    .event(e.kind)
                    .data(e.envelope.to_string());
            }
            // Mark the head seen before reading, so a move during the read wakes us.
            self.head.borrow_and_update();
            match outbox::log(
                &self.state.pool,
                &self.tenant,
                self.pos,
                self.kind.as_deref(),
                100,
            )
            .await
            {
                Ok(rows) if !rows.is_empty() => self.buffered.extend(rows),
                Ok(_) => {
                    let woke =
                        tokio::time::timeout(Duration::from_secs(5), self.head.changed()).await;
                    if matches!(woke, Ok(Err(_))) {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the event log for a stream failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}
