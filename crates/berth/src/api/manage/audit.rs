//! `GET /api/v1/audit`: the event log, newest first, filtered by actor, repository, namespace,
//! kind and time, a page at a time. Administrators read everything; a namespace owner reads
//! the events of their namespace's repositories and must say which namespace (events without
//! a repository, such as logins, are the administrators').

use super::{ApiError, ApiResult, Ctx, ErrorCode, Op, StatusCode, json};
use crate::auth::manage::ManageError;
use crate::metadata::events::{self, Event, EventFilter};

/// Events per page unless the caller asks for fewer.
const DEFAULT_LIMIT: i64 = 100;
/// The most events one page holds.
const MAX_LIMIT: i64 = 1000;

#[derive(serde::Serialize)]
struct Page {
    events: Vec<Event>,
    /// Pass as `before` for the next (older) page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

pub async fn list(ctx: &Ctx<'_>) -> ApiResult {
    let invalid = |what: String| ApiError::new(ErrorCode::Invalid).detail(what);
    let mut filter = EventFilter::default();
    let mut namespace = None;
    let mut limit = DEFAULT_LIMIT;
    for (key, value) in form_urlencoded::parse(ctx.query.as_bytes()) {
        let value = value.into_owned();
        let time_ms = |v: &str| {
            crate::time::parse(v)
                .map(|secs| secs * 1000)
                .map_err(|e| invalid(format!("{key}: {e}")))
        };
        match &*key {
            "actor" => filter.actor = Some(value),
            "repository" => filter.repository = Some(value),
            "namespace" => namespace = Some(value),
            "kind" => filter.kind = Some(value),
            "since" => filter.since_ms = Some(time_ms(&value)?),
            "until" => filter.until_ms = Some(time_ms(&value)?),
            "before" => filter.before_seq = Some(super::cursor_param(&value)?),
            "limit" => limit = super::limit_param(&value, MAX_LIMIT)?,
            other => return Err(invalid(format!("unknown parameter {other:?}"))),
        }
    }
    // The namespace the caller reads: given, or that of the repository asked about.
    let scope = namespace.clone().or_else(|| {
        let repository = filter.repository.as_deref()?;
        Some(
            repository
                .split('/')
                .next()
                .unwrap_or(repository)
                .to_string(),
        )
    });
    ctx.require(Op::ReadAudit(scope.as_deref()))?;
    filter.namespace = namespace;
    let md = ctx.md();
    let filter = &filter;
    let events = md
        .read(|tx| Box::pin(events::query(tx, filter, limit)))
        .await
        .map_err(ManageError::from)?;
    let next = (events.len() as i64 == limit)
        .then(|| events.last().map(|e| e.seq.to_string()))
        .flatten();
    json(StatusCode::OK, &Page { events, next })
}
