//! The trash and GC through the API: `GET /api/v1/trash` lists deleted manifests and tags,
//! `POST /api/v1/trash/{id}/restore` puts one back (with its tags and the referrers that
//! followed it), `POST /api/v1/gc` runs a collection (`?dry_run=true` to only count), `GET
//! /api/v1/quarantine` lists the blobs the integrity scrub or fsck quarantined (admins).
//! Administrators see and restore everything; a namespace owner its namespace's entries, and
//! must name the namespace (or a repository in it) when listing.

use super::{ApiError, ApiResult, Ctx, ErrorCode, Op, StatusCode, json};
use crate::metadata::trash::{TrashEntry, TrashFilter};
use crate::service::gc::GcError;

/// Entries per page unless the caller asks for fewer.
const DEFAULT_LIMIT: i64 = 100;
/// The most entries one page holds.
const MAX_LIMIT: i64 = 1000;

#[derive(serde::Serialize)]
struct Page {
    entries: Vec<TrashEntry>,
    /// Pass as `before` for the next (older) page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

fn namespace_of(repository: &str) -> &str {
    repository.split('/').next().unwrap_or(repository)
}

pub async fn list(ctx: &Ctx<'_>) -> ApiResult {
    let invalid = |what: String| ApiError::new(ErrorCode::Invalid).detail(what);
    let mut filter = TrashFilter::default();
    let mut limit = DEFAULT_LIMIT;
    for (key, value) in form_urlencoded::parse(ctx.query.as_bytes()) {
        let value = value.into_owned();
        match &*key {
            "repository" => filter.repository = Some(value),
            "namespace" => filter.namespace = Some(value),
            "reason" => filter.reason = Some(value),
            "since" => {
                filter.since =
                    Some(crate::time::parse(&value).map_err(|e| invalid(format!("since: {e}")))?)
            }
            "before" => filter.before = Some(super::cursor_param(&value)?),
            "limit" => limit = super::limit_param(&value, MAX_LIMIT)?,
            other => return Err(invalid(format!("unknown parameter {other:?}"))),
        }
    }
    let scope = filter.namespace.clone().or_else(|| {
        filter
            .repository
            .as_deref()
            .map(|r| namespace_of(r).to_string())
    });
    ctx.require(Op::Trash(scope.as_deref()))?;
    filter.limit = Some(limit);
    let entries = ctx.registry.list_trash(&filter).await?;
    let next = (entries.len() as i64 == limit)
        .then(|| entries.last().map(|e| e.id.to_string()))
        .flatten();
    json(StatusCode::OK, &Page { entries, next })
}

pub async fn restore(ctx: &Ctx<'_>) -> ApiResult {
    let id: i64 = ctx.param("id").parse().map_err(|_| {
        ApiError::new(ErrorCode::NotFound).detail("no such trash entry".to_string())
    })?;
    let entry = ctx.registry.trash_entry(id).await?;
    // Whether or not it exists, a caller who may not restore it learns nothing.
    ctx.require(Op::Trash(
        entry.as_ref().map(|e| namespace_of(&e.repository)),
    ))?;
    let Some(entry) = entry else {
        return Err(ApiError::new(ErrorCode::NotFound).detail("no such trash entry".to_string()));
    };
    let restored = ctx
        .registry
        .restore_trash(&ctx.request, &[entry.id])
        .await?;
    ctx.changed(
        "restored from the trash",
        &format!("{}@{}", entry.repository, entry.digest),
    );
    json(StatusCode::OK, &restored)
}

pub async fn gc(ctx: &Ctx<'_>) -> ApiResult {
    ctx.require(Op::RunGc)?;
    let mut dry_run = false;
    for (key, value) in form_urlencoded::parse(ctx.query.as_bytes()) {
        match (&*key, &*value) {
            ("dry_run", "true" | "1") => dry_run = true,
            ("dry_run", "false" | "0") => dry_run = false,
            _ => {
                return Err(ApiError::new(ErrorCode::Invalid)
                    .detail(format!("unknown parameter {key}={value}")));
            }
        }
    }
    match ctx.registry.collect_garbage(&ctx.request, dry_run).await {
        Ok(report) => json(StatusCode::OK, &report),
        Err(GcError::Busy(busy)) => {
            Err(ApiError::new(ErrorCode::Conflict).detail(busy.to_string()))
        }
        Err(GcError::Service(e)) => Err(e.into()),
    }
}

pub async fn quarantine(ctx: &Ctx<'_>) -> ApiResult {
    ctx.require(Op::ReadQuarantine)?;
    if !ctx.query.is_empty() {
        return Err(ApiError::new(ErrorCode::Invalid).detail("no parameters are taken".to_string()));
    }
    json(StatusCode::OK, &ctx.registry.quarantine_report().await?)
}
