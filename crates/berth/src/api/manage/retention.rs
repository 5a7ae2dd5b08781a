//! Retention policies through the API: `GET /api/v1/retention` lists them, `POST` adds one,
//! `DELETE /api/v1/retention/{id}` removes one, `GET /api/v1/retention/plan` says exactly what
//! they would delete now. Administrators manage every policy; a namespace owner those whose
//! pattern stays within the namespace (`team/*`).

use axum::body::Body;

use super::{
    ApiError, ApiResult, Ctx, ErrorCode, Op, StatusCode, created, json, no_content, read_json,
};
use crate::metadata::retention::Policy;
use crate::service::retention::namespace_of;

pub async fn list(ctx: &Ctx<'_>) -> ApiResult {
    ctx.require(Op::ListRetention)?;
    let policies = ctx.registry.retention_policies().await?;
    let visible: Vec<Policy> = policies
        .into_iter()
        .filter(|p| {
            crate::auth::policy::permits(&ctx.who, &Op::Retention(namespace_of(&p.repositories)))
        })
        .collect();
    json(StatusCode::OK, &serde_json::json!({ "policies": visible }))
}

pub async fn add(ctx: &Ctx<'_>, body: Body) -> ApiResult {
    let policy: Policy = read_json(body).await?;
    ctx.require(Op::Retention(namespace_of(&policy.repositories)))?;
    let added = ctx
        .registry
        .add_retention_policy(&ctx.request, &policy)
        .await?;
    ctx.changed("retention policy added", &added.repositories);
    created(&format!("/api/v1/retention/{}", added.id), &added)
}

pub async fn remove(ctx: &Ctx<'_>) -> ApiResult {
    let not_found = || ApiError::new(ErrorCode::NotFound).detail("no such policy".to_string());
    let id: i64 = ctx.param("id").parse().map_err(|_| not_found())?;
    let existing = ctx
        .registry
        .retention_policies()
        .await?
        .into_iter()
        .find(|p| p.id == id);
    // A caller who may not manage it learns nothing about whether it exists.
    match &existing {
        Some(p) => ctx.require(Op::Retention(namespace_of(&p.repositories)))?,
        None => ctx.require(Op::Retention(None))?,
    }
    match ctx
        .registry
        .remove_retention_policy(&ctx.request, id)
        .await?
    {
        Some(p) => {
            ctx.changed("retention policy removed", &p.repositories);
            no_content()
        }
        None => Err(not_found()),
    }
}

pub async fn plan(ctx: &Ctx<'_>) -> ApiResult {
    ctx.require(Op::Retention(None))?;
    json(StatusCode::OK, &ctx.registry.retention_plan().await?)
}
