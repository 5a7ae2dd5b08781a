//! Webhook subscriptions and their delivery state. A namespace's owners manage its webhooks;
//! global ones (every namespace, and events without a repository such as logins) are for
//! administrators. The secret is shown once, in the answer to the creation.

use axum::body::Body;
use axum::http::StatusCode;
use serde::Serialize;

use super::{Ctx, created, json, no_content, read_json, time};
use crate::api::error::{ApiError, ApiResult, ErrorCode};
use crate::auth::manage::ManageError;
use crate::auth::policy::Op;
use crate::metadata::webhooks::{Parked, WebhookRow};
use crate::webhooks::{self, Status, WebhookSpec};

/// Most parked deliveries listed in one answer.
const MAX_PARKED_PAGE: i64 = 1000;

#[derive(Serialize)]
struct Webhook {
    id: String,
    namespace: Option<String>,
    url: String,
    events: Vec<String>,
    repositories: Vec<String>,
    /// `api` or `config` (defined in the config file; change it there).
    origin: String,
    created_at: String,
    delivery: Delivery,
}

/// Where delivery stands; the numbers a dashboard wants.
#[derive(Serialize)]
struct Delivery {
    /// Every event up to this sequence number was delivered, parked or filtered out.
    cursor: i64,
    /// The last event in the log.
    head: i64,
    /// Events after the cursor not yet looked at (an upper bound of the queue: some may be
    /// filtered out), plus parked deliveries queued for replay.
    pending: i64,
    /// Failed attempts of the event being delivered.
    failures: i64,
    next_attempt_at: Option<String>,
    last_success_at: Option<String>,
    last_failure_at: Option<String>,
    last_error: Option<String>,
    last_latency_ms: Option<i64>,
    /// Deliveries that succeeded, and attempts that failed, since the subscription began.
    delivered: i64,
    failed_attempts: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    parked: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replay_queued: Option<i64>,
}

fn ms_time(ms: i64) -> String {
    time(ms.div_euclid(1000))
}

fn webhook(row: WebhookRow, head: i64, parked: Option<(i64, i64)>) -> Webhook {
    let s = &row.state;
    let queued = parked.map_or(0, |(_, q)| q);
    let delivery = Delivery {
        cursor: s.cursor_seq,
        head,
        pending: (head - s.cursor_seq).max(0) + queued,
        failures: s.failures,
        next_attempt_at: (s.next_attempt_ms > 0).then(|| ms_time(s.next_attempt_ms)),
        last_success_at: s.last_success_ms.map(ms_time),
        last_failure_at: s.last_failure_ms.map(ms_time),
        last_error: s.last_error.clone(),
        last_latency_ms: s.last_latency_ms,
        delivered: s.delivered,
        failed_attempts: s.failed_attempts,
        parked: parked.map(|(p, _)| p),
        replay_queued: parked.map(|(_, q)| q),
    };
    Webhook {
        id: row.id,
        namespace: row.namespace,
        url: row.url,
        events: row.events,
        repositories: row.repositories,
        origin: row.origin,
        created_at: time(row.created_at),
        delivery,
    }
}

fn detailed(status: Status) -> Webhook {
    webhook(
        status.hook,
        status.head,
        Some((status.parked, status.replay_queued)),
    )
}

pub(super) async fn list(ctx: &Ctx<'_>) -> ApiResult {
    ctx.require(Op::ListWebhooks)?;
    let head = crate::webhooks::head(ctx.md()).await?;
    let visible: Vec<Webhook> = webhooks::list(ctx.md())
        .await?
        .into_iter()
        .filter(|w| match &w.namespace {
            Some(ns) => ctx.who.owns(ns),
            None => ctx.who.is_admin(),
        })
        .map(|w| webhook(w, head, None))
        .collect();
    json(StatusCode::OK, &visible)
}

#[derive(Serialize)]
struct CreatedWebhook {
    #[serde(flatten)]
    webhook: Webhook,
    /// Shown once: receivers verify signatures with it.
    secret: String,
}

pub(super) async fn create(ctx: &Ctx<'_>, body: Body) -> ApiResult {
    let spec: WebhookSpec = read_json(body).await?;
    ctx.require(Op::Webhooks(spec.namespace.as_deref()))?;
    let new = webhooks::create(ctx.md(), spec).await?;
    ctx.changed("webhook added", &new.id);
    let status = webhooks::status(ctx.md(), &new.id).await?;
    created(
        &format!("/api/v1/webhooks/{}", new.id),
        &CreatedWebhook {
            webhook: detailed(status),
            secret: new.secret,
        },
    )
}

/// The subscription named in the path, once the caller may see it: a missing one is asked as
/// a global one, so only an administrator learns it is missing.
async fn target(ctx: &Ctx<'_>) -> Result<WebhookRow, ApiError> {
    let id = ctx.param("id");
    let row = webhooks::get(ctx.md(), id).await?;
    ctx.require(Op::Webhooks(
        row.as_ref().and_then(|r| r.namespace.as_deref()),
    ))?;
    row.ok_or_else(|| ManageError::NotFound(format!("no webhook {id:?}")).into())
}

pub(super) async fn get(ctx: &Ctx<'_>) -> ApiResult {
    let row = target(ctx).await?;
    json(
        StatusCode::OK,
        &detailed(webhooks::status(ctx.md(), &row.id).await?),
    )
}

pub(super) async fn delete(ctx: &Ctx<'_>) -> ApiResult {
    let row = target(ctx).await?;
    webhooks::delete(ctx.md(), &row.id).await?;
    ctx.changed("webhook removed", &row.id);
    no_content()
}

#[derive(Serialize)]
struct ParkedDelivery {
    seq: i64,
    attempts: i64,
    error: String,
    parked_at: String,
    /// Queued again by a replay, not yet delivered.
    replay_queued: bool,
}

impl From<Parked> for ParkedDelivery {
    fn from(p: Parked) -> Self {
        ParkedDelivery {
            seq: p.seq,
            attempts: p.attempts,
            error: p.error,
            parked_at: ms_time(p.parked_at_ms),
            replay_queued: p.replay,
        }
    }
}

pub(super) async fn parked(ctx: &Ctx<'_>) -> ApiResult {
    let row = target(ctx).await?;
    let mut after = 0;
    let mut limit = MAX_PARKED_PAGE;
    for (key, value) in form_urlencoded::parse(ctx.query.as_bytes()) {
        let number = value.parse::<i64>().map_err(|_| {
            ApiError::new(ErrorCode::Invalid).detail(format!("{key} must be a number"))
        })?;
        match &*key {
            "after" => after = number,
            "limit" => limit = number.clamp(1, MAX_PARKED_PAGE),
            _ => {}
        }
    }
    let list: Vec<ParkedDelivery> = webhooks::parked(ctx.md(), &row.id, after, limit)
        .await?
        .into_iter()
        .map(ParkedDelivery::from)
        .collect();
    json(StatusCode::OK, &list)
}

#[derive(Serialize)]
struct Replayed {
    /// Parked deliveries queued again.
    queued: u64,
}

pub(super) async fn replay(ctx: &Ctx<'_>) -> ApiResult {
    let row = target(ctx).await?;
    let queued = webhooks::replay(ctx.md(), &row.id).await?;
    ctx.changed("webhook deliveries replayed", &row.id);
    json(StatusCode::ACCEPTED, &Replayed { queued })
}
