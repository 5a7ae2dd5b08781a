//! A namespace's tag immutability rules and its quota.

use axum::body::Body;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::{Ctx, created, json, no_content, read_json, time};
use crate::api::error::ApiResult;
use crate::auth::namespace_rules as ops;
use crate::auth::policy::Op;
use crate::metadata::immutability::ImmutabilityRule;
use crate::metadata::quotas::Quota;

#[derive(Serialize)]
struct Rule {
    namespace: String,
    pattern: String,
    created_at: String,
    created_by: String,
}

fn rule(r: ImmutabilityRule) -> Rule {
    Rule {
        created_at: time(r.created_at),
        namespace: r.namespace,
        pattern: r.pattern,
        created_by: r.created_by,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewRule {
    pattern: String,
}

pub(super) async fn list_rules(ctx: &Ctx<'_>) -> ApiResult {
    let ns = ctx.param("namespace");
    ctx.require(Op::Immutability(ns))?;
    let rules: Vec<Rule> = ops::rules(ctx.md(), ns)
        .await?
        .into_iter()
        .map(rule)
        .collect();
    json(StatusCode::OK, &rules)
}

pub(super) async fn add_rule(ctx: &Ctx<'_>, body: Body) -> ApiResult {
    let ns = ctx.param("namespace");
    ctx.require(Op::Immutability(ns))?;
    let NewRule { pattern } = read_json(body).await?;
    let added = ops::add_rule(ctx.md(), &ctx.by(), ns, &pattern).await?;
    ctx.changed("immutability rule added", &format!("{ns} {pattern}"));
    let location = format!(
        "/api/v1/namespaces/{ns}/immutability/{}",
        pattern.replace('?', "%3F")
    );
    created(&location, &rule(added))
}

pub(super) async fn remove_rule(ctx: &Ctx<'_>) -> ApiResult {
    let (ns, pattern) = (ctx.param("namespace"), ctx.param("pattern"));
    ctx.require(Op::Immutability(ns))?;
    ops::remove_rule(ctx.md(), &ctx.by(), ns, pattern).await?;
    ctx.changed("immutability rule removed", &format!("{ns} {pattern}"));
    no_content()
}

#[derive(Serialize)]
struct QuotaBody {
    namespace: String,
    usage_bytes: u64,
    /// `null`: no limit.
    limit_bytes: Option<u64>,
}

fn quota_body(q: Quota) -> QuotaBody {
    QuotaBody {
        namespace: q.namespace,
        usage_bytes: q.usage_bytes,
        limit_bytes: q.limit_bytes,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewLimit {
    limit_bytes: u64,
}

pub(super) async fn quota(ctx: &Ctx<'_>) -> ApiResult {
    let ns = ctx.param("namespace");
    ctx.require(Op::ReadQuota(ns))?;
    json(StatusCode::OK, &quota_body(ops::quota(ctx.md(), ns).await?))
}

pub(super) async fn set_quota(ctx: &Ctx<'_>, body: Body) -> ApiResult {
    let ns = ctx.param("namespace");
    ctx.require(Op::SetQuota(ns))?;
    let NewLimit { limit_bytes } = read_json(body).await?;
    let q = ops::set_limit(ctx.md(), &ctx.by(), ns, Some(limit_bytes)).await?;
    ctx.changed("quota set", &format!("{ns} {limit_bytes}"));
    json(StatusCode::OK, &quota_body(q))
}

pub(super) async fn remove_quota(ctx: &Ctx<'_>) -> ApiResult {
    let ns = ctx.param("namespace");
    ctx.require(Op::SetQuota(ns))?;
    ops::set_limit(ctx.md(), &ctx.by(), ns, None).await?;
    ctx.changed("quota removed", ns);
    no_content()
}
