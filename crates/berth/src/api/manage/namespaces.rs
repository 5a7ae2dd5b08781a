//! Namespaces, their members and their robots.

use axum::body::Body;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::accounts::{expiry, parse_grants, stored_grants};
use super::{Ctx, created, json, no_content, opt_time, read_json, time};
use crate::api::error::{ApiError, ApiResult};
use crate::auth::manage::{self, ManageError};
use crate::auth::policy::Op;
use crate::auth::rights::Role;
use crate::auth::secrets::ApiSecret;
use crate::metadata::access::{AccountRow, NamespaceRow};

#[derive(Serialize)]
struct Namespace {
    name: String,
    /// Anyone, even without credentials, may pull from it.
    public: bool,
    created_at: String,
}

fn namespace(row: &NamespaceRow) -> Namespace {
    Namespace {
        name: row.name.clone(),
        public: row.public,
        created_at: time(row.created_at),
    }
}

pub(super) async fn list(ctx: &Ctx<'_>) -> ApiResult {
    ctx.require(Op::ListNamespaces)?;
    let visible: Vec<Namespace> = manage::list_namespaces(ctx.md())
        .await?
        .iter()
        .filter(|ns| ctx.who.sees(&ns.name))
        .map(namespace)
        .collect();
    json(StatusCode::OK, &visible)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewNamespace {
    name: String,
    #[serde(default)]
    public: bool,
    /// An account to make its owner.
    owner: Option<String>,
}

pub(super) async fn create(ctx: &Ctx<'_>, body: Body) -> ApiResult {
    ctx.require(Op::CreateNamespace)?;
    let new: NewNamespace = read_json(body).await?;
    manage::add_namespace(
        ctx.md(),
        &ctx.by(),
        &new.name,
        new.public,
        new.owner.as_deref(),
    )
    .await?;
    ctx.changed("namespace added", &new.name);
    let row = manage::namespace(ctx.md(), &new.name).await?;
    created(
        &format!("/api/v1/namespaces/{}", row.name),
        &namespace(&row),
    )
}

pub(super) async fn get(ctx: &Ctx<'_>) -> ApiResult {
    let ns = ctx.param("namespace");
    ctx.require(Op::ReadNamespace(ns))?;
    json(
        StatusCode::OK,
        &namespace(&manage::namespace(ctx.md(), ns).await?),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NamespaceChange {
    public: bool,
}

pub(super) async fn update(ctx: &Ctx<'_>, body: Body) -> ApiResult {
    let ns = ctx.param("namespace");
    ctx.require(Op::ChangeNamespace(ns))?;
    let change: NamespaceChange = read_json(body).await?;
    manage::set_public(ctx.md(), &ctx.by(), ns, change.public).await?;
    ctx.changed(
        if change.public {
            "namespace made public"
        } else {
            "namespace made private"
        },
        ns,
    );
    json(
        StatusCode::OK,
        &namespace(&manage::namespace(ctx.md(), ns).await?),
    )
}

pub(super) async fn delete(ctx: &Ctx<'_>) -> ApiResult {
    let ns = ctx.param("namespace");
    ctx.require(Op::ChangeNamespace(ns))?;
    manage::remove_namespace(ctx.md(), &ctx.by(), ns).await?;
    ctx.changed("namespace removed", ns);
    no_content()
}

#[derive(Serialize)]
struct Member {
    account: String,
    role: Role,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberRole {
    role: Role,
}

pub(super) async fn members(ctx: &Ctx<'_>) -> ApiResult {
    let ns = ctx.param("namespace");
    ctx.require(Op::ReadNamespace(ns))?;
    // An empty list must not stand for a namespace that does not exist.
    manage::namespace(ctx.md(), ns).await?;
    let members: Vec<Member> = manage::members(ctx.md(), ns)
        .await?
        .into_iter()
        .map(|(account, role)| Member { account, role })
        .collect();
    json(StatusCode::OK, &members)
}

pub(super) async fn set_member(ctx: &Ctx<'_>, body: Body) -> ApiResult {
    let (ns, account) = (ctx.param("namespace"), ctx.param("account"));
    ctx.require(Op::ManageNamespace(ns))?;
    let MemberRole { role } = read_json(body).await?;
    manage::set_member(ctx.md(), &ctx.by(), ns, account, role).await?;
    ctx.changed("member set", &format!("{ns} {account} {role}"));
    json(
        StatusCode::OK,
        &Member {
            account: account.to_string(),
            role,
        },
    )
}

pub(super) async fn remove_member(ctx: &Ctx<'_>) -> ApiResult {
    let (ns, account) = (ctx.param("namespace"), ctx.param("account"));
    ctx.require(Op::ManageNamespace(ns))?;
    manage::remove_member(ctx.md(), &ctx.by(), ns, account).await?;
    ctx.changed("member removed", &format!("{ns} {account}"));
    no_content()
}

#[derive(Serialize)]
struct Robot {
    /// Its full name, `NAMESPACE+NAME`: the user name it logs in with.
    name: String,
    namespace: String,
    grants: Vec<String>,
    expires_at: Option<String>,
    created_at: String,
}

fn robot(row: &AccountRow) -> Result<Robot, ApiError> {
    Ok(Robot {
        name: row.name.clone(),
        namespace: row.namespace.clone().unwrap_or_default(),
        grants: stored_grants(row.grants.as_deref().unwrap_or("[]"))?,
        expires_at: opt_time(row.expires_at),
        created_at: time(row.created_at),
    })
}

pub(super) async fn robots(ctx: &Ctx<'_>) -> ApiResult {
    let ns = ctx.param("namespace");
    ctx.require(Op::ReadNamespace(ns))?;
    manage::namespace(ctx.md(), ns).await?;
    let robots = manage::list_accounts(ctx.md(), Some(ns))
        .await?
        .iter()
        .filter(|a| a.kind == "robot")
        .map(robot)
        .collect::<Result<Vec<_>, _>>()?;
    json(StatusCode::OK, &robots)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewRobot {
    /// Its short name; it logs in as `NAMESPACE+NAME`.
    name: String,
    /// `PATTERN:ACTIONS`, each inside the namespace.
    grants: Vec<String>,
    expires_in_days: Option<u64>,
}

#[derive(Serialize)]
struct CreatedRobot {
    #[serde(flatten)]
    robot: Robot,
    /// Shown once: only its hash is stored.
    secret: String,
    /// The secret's id, to revoke it with `DELETE /api/v1/tokens/{id}`.
    token_id: String,
}

pub(super) async fn create_robot(ctx: &Ctx<'_>, body: Body) -> ApiResult {
    let ns = ctx.param("namespace");
    ctx.require(Op::ManageNamespace(ns))?;
    let new: NewRobot = read_json(body).await?;
    let grants = parse_grants(&new.grants)?;
    let (full, secret) = manage::add_robot(
        ctx.md(),
        &ctx.by(),
        ns,
        &new.name,
        &grants,
        expiry(new.expires_in_days)?,
    )
    .await?;
    ctx.changed("robot added", &full);
    let row = manage::account(ctx.md(), &full).await?;
    let token_id = ApiSecret::parse(&secret).map(|s| s.id).unwrap_or_default();
    created(
        &format!("/api/v1/namespaces/{ns}/robots/{}", new.name),
        &CreatedRobot {
            robot: robot(&row)?,
            secret,
            token_id,
        },
    )
}

pub(super) async fn delete_robot(ctx: &Ctx<'_>) -> ApiResult {
    let (ns, name) = (ctx.param("namespace"), ctx.param("robot"));
    ctx.require(Op::ManageNamespace(ns))?;
    let full = manage::robot_name(ns, name);
    let gone = || ManageError::NotFound(format!("no robot {full} in namespace {ns}"));
    match manage::account(ctx.md(), &full).await {
        Ok(row) if row.kind == "robot" && row.namespace.as_deref() == Some(ns) => {}
        Ok(_) | Err(ManageError::NotFound(_)) => return Err(gone().into()),
        Err(e) => return Err(e.into()),
    }
    manage::remove_account(ctx.md(), &ctx.by(), &full).await?;
    ctx.changed("robot removed", &full);
    no_content()
}
