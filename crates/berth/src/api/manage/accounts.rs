//! The caller itself, users, secrets (personal access tokens, robot secrets) and signing keys.

use axum::body::Body;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::{Ctx, created, json, no_content, opt_time, read_json, time};
use crate::api::error::{ApiError, ApiResult, ErrorCode};
use crate::auth::limits::Limited;
use crate::auth::manage::{self, ManageError};
use crate::auth::policy::{self, Authority, Holder, Op};
use crate::auth::rights::{Grant, Role};
use crate::auth::secrets::ApiSecret;
use crate::auth::{AuthError, Method};
use crate::metadata::access::{AccountRow, CredentialRow};
use crate::metadata::queries::now_secs;

#[derive(Serialize)]
struct User {
    name: String,
    admin: bool,
    created_at: String,
}

fn user(row: &AccountRow) -> User {
    User {
        name: row.name.clone(),
        admin: row.admin,
        created_at: time(row.created_at),
    }
}

#[derive(Serialize)]
struct Membership {
    namespace: String,
    role: Role,
}

#[derive(Serialize)]
struct Me {
    /// False when access control is off: everyone is an administrator then.
    access_control: bool,
    name: Option<String>,
    /// `user` or `robot`.
    kind: Option<String>,
    admin: bool,
    /// What the caller may manage here: `administrator`, `user` (itself, and the namespaces
    /// it owns) or `none`.
    management: &'static str,
    roles: Vec<Membership>,
    /// A robot's grants.
    grants: Option<Vec<String>>,
    /// How the caller proved who it is.
    authenticated_by: &'static str,
    /// The secret or token's credential id, when not a password.
    credential: Option<String>,
    /// A personal access token's limit.
    restricted_to: Option<Vec<String>>,
}

/// Grants as the command line writes them, `PATTERN:ACTIONS`.
pub(super) fn grant_strings(grants: &[Grant]) -> Vec<String> {
    grants.iter().map(Grant::to_string).collect()
}

/// Parses stored grants (JSON).
pub(super) fn stored_grants(json: &str) -> Result<Vec<String>, ApiError> {
    let grants: Vec<Grant> = serde_json::from_str(json)
        .map_err(|e| ApiError::new(ErrorCode::Internal).detail(format!("stored grants: {e}")))?;
    Ok(grant_strings(&grants))
}

/// Parses grants as the command line takes them.
pub(super) fn parse_grants(texts: &[String]) -> Result<Vec<Grant>, ApiError> {
    texts
        .iter()
        .map(|g| Grant::parse(g).map_err(|e| ApiError::new(ErrorCode::Invalid).detail(e)))
        .collect()
}

/// An expiry in days from now, as the command line takes it.
pub(super) fn expiry(days: Option<u64>) -> Result<Option<i64>, ApiError> {
    Ok(days.map(manage::expiry_in_days).transpose()?)
}

pub(super) async fn me(ctx: &Ctx<'_>) -> ApiResult {
    ctx.require(Op::Me)?;
    let principal = &ctx.request.principal;
    let access_control = ctx.registry.auth().enabled();
    let mut me = Me {
        access_control,
        name: None,
        kind: None,
        admin: !access_control,
        management: match ctx.who {
            Authority::Admin { .. } => "administrator",
            Authority::User { .. } => "user",
            Authority::Limited { .. } => "none",
        },
        roles: Vec::new(),
        grants: None,
        authenticated_by: match principal.method {
            Method::None => "nothing",
            Method::Password => "password",
            Method::Secret => "secret",
            Method::Token => "token",
            Method::ClientCertificate => "client_certificate",
            Method::Federation => "federation",
            Method::External => "external_token",
        },
        credential: principal.credential.clone(),
        restricted_to: principal.rights.restrict.as_deref().map(grant_strings),
    };
    if let Some(name) = principal.account() {
        let row = manage::account(ctx.md(), name).await?;
        me.admin = row.admin;
        if row.kind == "robot" {
            me.grants = row.grants.as_deref().map(stored_grants).transpose()?;
        } else {
            me.roles = manage::memberships(ctx.md(), name)
                .await?
                .into_iter()
                .map(|(namespace, role)| Membership { namespace, role })
                .collect();
        }
        me.name = Some(row.name);
        me.kind = Some(row.kind);
    }
    json(StatusCode::OK, &me)
}

/// A user account by name: robots are not users (they live under their namespace).
async fn user_row(ctx: &Ctx<'_>, name: &str) -> Result<AccountRow, ApiError> {
    match manage::account(ctx.md(), name).await {
        Ok(row) if row.kind == "user" => Ok(row),
        Ok(_) | Err(ManageError::NotFound(_)) => {
            Err(ManageError::NotFound(format!("no user {name}")).into())
        }
        Err(e) => Err(e.into()),
    }
}

pub(super) async fn list_users(ctx: &Ctx<'_>) -> ApiResult {
    ctx.require(Op::ListUsers)?;
    let users: Vec<User> = manage::list_accounts(ctx.md(), None)
        .await?
        .iter()
        .filter(|a| a.kind == "user")
        .map(user)
        .collect();
    json(StatusCode::OK, &users)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    name: String,
    password: String,
    #[serde(default)]
    admin: bool,
}

pub(super) async fn create_user(ctx: &Ctx<'_>, body: Body) -> ApiResult {
    ctx.require(Op::CreateUser)?;
    let new: NewUser = read_json(body).await?;
    manage::add_user(ctx.md(), &ctx.by(), &new.name, &new.password, new.admin).await?;
    ctx.changed(
        if new.admin {
            "administrator added"
        } else {
            "user added"
        },
        &new.name,
    );
    let row = user_row(ctx, &new.name).await?;
    created(&format!("/api/v1/users/{}", row.name), &user(&row))
}

pub(super) async fn get_user(ctx: &Ctx<'_>) -> ApiResult {
    let name = ctx.param("name");
    ctx.require(Op::ReadUser(name))?;
    json(StatusCode::OK, &user(&user_row(ctx, name).await?))
}

pub(super) async fn delete_user(ctx: &Ctx<'_>) -> ApiResult {
    let name = ctx.param("name");
    ctx.require(Op::DeleteUser(name))?;
    user_row(ctx, name).await?;
    manage::remove_account(ctx.md(), &ctx.by(), name).await?;
    ctx.changed("user removed", name);
    no_content()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewPassword {
    password: String,
    /// Required to change one's own password.
    old_password: Option<String>,
}

pub(super) async fn set_password(ctx: &Ctx<'_>, body: Body) -> ApiResult {
    let name = ctx.param("name");
    ctx.require(Op::SetPassword(name))?;
    let new: NewPassword = read_json(body).await?;
    if policy::needs_old_password(&ctx.who, name) {
        let Some(old) = new.old_password.as_deref() else {
            return Err(ApiError::new(ErrorCode::Invalid)
                .detail("old_password is required to change your own password"));
        };
        let right = ctx
            .registry
            .auth()
            .is_password_of(name, old, ctx.request.client_addr)
            .await
            .map_err(auth_failure)?;
        if !right {
            return Err(ApiError::new(ErrorCode::Denied).detail("old_password is wrong"));
        }
    }
    manage::set_password(ctx.md(), &ctx.by(), name, &new.password).await?;
    ctx.changed("password changed", name);
    no_content()
}

fn auth_failure(e: AuthError) -> ApiError {
    match e {
        AuthError::Throttled(wait) => {
            crate::api::too_many(Limited(wait)).detail("too many failed logins")
        }
        AuthError::Metadata(e) => crate::service::ServiceError::from(e).into(),
        e => ApiError::new(ErrorCode::Internal).detail(e.to_string()),
    }
}

#[derive(Serialize)]
struct Token {
    id: String,
    /// `personal`, `robot` or `refresh`.
    kind: String,
    description: String,
    /// A personal token's limit; `null`: all of its user's rights.
    grants: Option<Vec<String>>,
    /// `live`, `revoked` or `expired`.
    state: &'static str,
    created_at: String,
    expires_at: Option<String>,
    last_used_at: Option<String>,
    revoked_at: Option<String>,
}

fn token(row: &CredentialRow) -> Result<Token, ApiError> {
    let state = if row.revoked_at.is_some() {
        "revoked"
    } else if row.expires_at.is_some_and(|e| e <= now_secs()) {
        "expired"
    } else {
        "live"
    };
    Ok(Token {
        id: row.id.clone(),
        kind: row.kind.clone(),
        description: row.description.clone(),
        grants: row.grants.as_deref().map(stored_grants).transpose()?,
        state,
        created_at: time(row.created_at),
        expires_at: opt_time(row.expires_at),
        last_used_at: opt_time(row.last_used_at),
        revoked_at: opt_time(row.revoked_at),
    })
}

/// Whose secrets these are, for the policy: `None` when there is no such account.
fn holder(row: Option<&AccountRow>) -> Option<Holder<'_>> {
    row.map(|a| Holder {
        account: &a.name,
        robot_of: if a.kind == "robot" {
            a.namespace.as_deref()
        } else {
            None
        },
    })
}

/// The account whose secrets a route names, checked against the policy: 403 for a caller who
/// may not, whether or not it exists; 404 only for one who may.
async fn secrets_of(ctx: &Ctx<'_>, name: &str) -> Result<AccountRow, ApiError> {
    let row = match manage::account(ctx.md(), name).await {
        Ok(row) => Some(row),
        Err(ManageError::NotFound(_)) => None,
        Err(e) => return Err(e.into()),
    };
    ctx.require(Op::Secrets(holder(row.as_ref())))?;
    row.ok_or_else(|| ManageError::NotFound(format!("no account {name}")).into())
}

pub(super) async fn list_tokens(ctx: &Ctx<'_>) -> ApiResult {
    let account = secrets_of(ctx, ctx.param("account")).await?;
    let tokens = manage::list_tokens(ctx.md(), &account.name)
        .await?
        .iter()
        .map(token)
        .collect::<Result<Vec<_>, _>>()?;
    json(StatusCode::OK, &tokens)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    #[serde(default)]
    description: String,
    /// Limits a personal token (`PATTERN:ACTIONS`); absent: all of its user's rights.
    grants: Option<Vec<String>>,
    expires_in_days: Option<u64>,
}

#[derive(Serialize)]
struct CreatedToken {
    #[serde(flatten)]
    token: Token,
    /// Shown once: only its hash is stored.
    secret: String,
}

pub(super) async fn create_token(ctx: &Ctx<'_>, body: Body) -> ApiResult {
    let account = secrets_of(ctx, ctx.param("account")).await?;
    let new: NewToken = read_json(body).await?;
    let grants = new.grants.as_deref().map(parse_grants).transpose()?;
    if grants.as_ref().is_some_and(Vec::is_empty) {
        return Err(ApiError::new(ErrorCode::Invalid)
            .detail("grants, when given, must name at least one PATTERN:ACTIONS"));
    }
    let secret = manage::add_token(
        ctx.md(),
        &ctx.by(),
        &account.name,
        &new.description,
        grants.as_deref(),
        expiry(new.expires_in_days)?,
    )
    .await?;
    let id = ApiSecret::parse(&secret)
        .map(|s| s.id)
        .ok_or_else(|| ApiError::new(ErrorCode::Internal).detail("a generated secret"))?;
    ctx.changed("token created", &format!("{} {id}", account.name));
    let row = manage::token(ctx.md(), &id).await?;
    json(
        StatusCode::CREATED,
        &CreatedToken {
            token: token(&row)?,
            secret,
        },
    )
}

pub(super) async fn revoke_token(ctx: &Ctx<'_>) -> ApiResult {
    let id = ctx.param("id");
    let account = match manage::token_holder(ctx.md(), id).await {
        Ok((_, account)) => Some(account),
        Err(ManageError::NotFound(_)) => None,
        Err(e) => return Err(e.into()),
    };
    ctx.require(Op::Secrets(holder(account.as_ref())))?;
    let Some(account) = account else {
        return Err(ManageError::NotFound(format!("no token {id}")).into());
    };
    manage::revoke_token(ctx.md(), &ctx.by(), id).await?;
    ctx.changed("token revoked", &format!("{} {id}", account.name));
    no_content()
}

#[derive(Serialize)]
struct Key {
    kid: String,
}

pub(super) async fn rotate_keys(ctx: &Ctx<'_>) -> ApiResult {
    ctx.require(Op::RotateKeys)?;
    let kid = manage::rotate_key(ctx.md(), &ctx.by()).await?;
    ctx.changed("signing key rotated", &kid);
    json(StatusCode::OK, &Key { kid })
}
