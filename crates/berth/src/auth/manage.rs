//! Changing who may do what: the operations behind `berth user|namespace|robot|token|key|trust`
//! and the management API, written once. Each is one metadata transaction that also bumps the
//! access generation, so every node's caches follow within a second, and appends an event
//! naming who made the change ([`By`]) to the event log, in the same transaction.

use crate::metadata::access::{self as q, AccountRow, CredentialRow, NamespaceRow, TrustRuleRow};
use crate::metadata::db::Tx;
use crate::metadata::events::{self, NewEvent};
use crate::metadata::queries::now_secs;
use crate::metadata::{Metadata, MetadataError};

use super::rights::{Grant, Role};
use super::secrets::{self, ApiSecret};
use super::token;

#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Metadata(#[from] MetadataError),
}

type Result<T> = std::result::Result<T, ManageError>;

/// Who makes a change, as its event in the log names them.
#[derive(Debug, Clone, Default)]
pub struct By {
    pub actor: String,
    pub client_addr: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
}

impl By {
    /// The command line, run by the operating-system user `$USER` on the server's data.
    pub fn cli() -> By {
        let user = std::env::var("USER").unwrap_or_else(|_| "unknown".to_string());
        By {
            actor: format!("cli:{user}"),
            ..By::default()
        }
    }

    /// Berth itself, for `what` reason.
    pub fn system(what: &str) -> By {
        By {
            actor: format!("system:{what}"),
            ..By::default()
        }
    }

    /// The event of a change: its kind, the namespace it concerns if any (stored as the
    /// event's repository, so a namespace's owners find it), and what it changed.
    pub(crate) fn event(
        &self,
        kind: &str,
        namespace: Option<&str>,
        detail: serde_json::Value,
    ) -> NewEvent {
        NewEvent {
            kind: kind.to_string(),
            actor: self.actor.clone(),
            client_addr: self.client_addr.clone(),
            user_agent: self.user_agent.clone(),
            request_id: self.request_id.clone(),
            repository: namespace.map(str::to_string),
            result: "ok".to_string(),
            detail: Some(detail.to_string()),
            ..NewEvent::default()
        }
    }
}

/// Appends `event` when the change happened.
async fn record(
    tx: &mut Tx<'_>,
    happened: bool,
    event: &NewEvent,
) -> std::result::Result<bool, MetadataError> {
    if happened {
        events::append(tx, event).await?;
    }
    Ok(happened)
}

/// The namespace a robot (`NAMESPACE+NAME`) belongs to.
fn robot_namespace(account: &str) -> Option<&str> {
    account.split_once('+').map(|(ns, _)| ns)
}

/// Account names: lower case letters, digits and `._-`, starting with a letter or digit, at
/// most 64 characters (they appear in tokens, logs and basic-auth user names).
pub fn valid_account_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(c))
}

/// A namespace is a repository name's first component.
pub fn valid_namespace(name: &str) -> bool {
    !name.contains('/') && name.parse::<oci::RepositoryName>().is_ok()
}

/// Longest lifetime a robot or secret may be given, in days.
pub const MAX_EXPIRY_DAYS: u64 = 3650;

/// When something given `days` to live expires (seconds since the epoch).
pub fn expiry_in_days(days: u64) -> Result<i64> {
    if !(1..=MAX_EXPIRY_DAYS).contains(&days) {
        return Err(invalid(format!(
            "expiry must be 1 to {MAX_EXPIRY_DAYS} days"
        )));
    }
    Ok(now_secs() + days as i64 * 86_400)
}

fn invalid(what: impl Into<String>) -> ManageError {
    ManageError::Invalid(what.into())
}

async fn hash(password: String) -> Result<String> {
    if password.is_empty() {
        return Err(invalid("the password is empty"));
    }
    tokio::task::spawn_blocking(move || secrets::hash_password(&password))
        .await
        .map_err(|e| invalid(e.to_string()))?
        .map_err(invalid)
}

pub async fn add_user(
    md: &Metadata,
    by: &By,
    name: &str,
    password: &str,
    admin: bool,
) -> Result<()> {
    if !valid_account_name(name) {
        return Err(invalid(format!(
            "invalid user name {name:?}: lower case letters, digits and ._- (at most 64)"
        )));
    }
    let row = AccountRow {
        id: 0,
        name: name.to_string(),
        kind: "user".to_string(),
        password_hash: Some(hash(password.to_string()).await?),
        admin,
        namespace: None,
        grants: None,
        expires_at: None,
        created_at: now_secs(),
    };
    let event = by.event(
        "account.created",
        None,
        serde_json::json!({ "account": name, "admin": admin }),
    );
    let (row, event) = (&row, &event);
    let created = md
        .write(|tx| {
            Box::pin(async move {
                let id = q::insert_account(tx, row).await?;
                record(tx, id.is_some(), event).await
            })
        })
        .await?;
    if created {
        Ok(())
    } else {
        Err(ManageError::Conflict(format!("account {name} exists")))
    }
}

pub async fn set_password(md: &Metadata, by: &By, name: &str, password: &str) -> Result<()> {
    let hash = hash(password.to_string()).await?;
    let event = by.event(
        "account.password_changed",
        None,
        serde_json::json!({ "account": name }),
    );
    let (hash, event) = (&hash, &event);
    if md
        .write(|tx| {
            Box::pin(async move {
                let changed = q::set_password_hash(tx, name, hash).await?;
                record(tx, changed, event).await
            })
        })
        .await?
    {
        Ok(())
    } else {
        Err(ManageError::NotFound(format!("no user {name}")))
    }
}

pub async fn set_admin(md: &Metadata, by: &By, name: &str, admin: bool) -> Result<()> {
    let event = by.event(
        "account.admin_changed",
        None,
        serde_json::json!({ "account": name, "admin": admin }),
    );
    let event = &event;
    if md
        .write(|tx| {
            Box::pin(async move {
                let changed = q::set_admin(tx, name, admin).await?;
                record(tx, changed, event).await
            })
        })
        .await?
    {
        Ok(())
    } else {
        Err(ManageError::NotFound(format!("no user {name}")))
    }
}

/// Removes a user or robot with its memberships and credentials, at once on every node.
pub async fn remove_account(md: &Metadata, by: &By, name: &str) -> Result<()> {
    let event = by.event(
        "account.deleted",
        robot_namespace(name),
        serde_json::json!({ "account": name }),
    );
    let event = &event;
    if md
        .write(|tx| {
            Box::pin(async move {
                let deleted = q::delete_account(tx, name).await?;
                record(tx, deleted, event).await
            })
        })
        .await?
    {
        Ok(())
    } else {
        Err(ManageError::NotFound(format!("no account {name}")))
    }
}

pub async fn account(md: &Metadata, name: &str) -> Result<AccountRow> {
    md.read(|tx| Box::pin(q::account_by_name(tx, name)))
        .await?
        .ok_or_else(|| ManageError::NotFound(format!("no account {name}")))
}

pub async fn list_accounts(md: &Metadata, namespace: Option<&str>) -> Result<Vec<AccountRow>> {
    Ok(md
        .read(|tx| Box::pin(q::list_accounts(tx, namespace)))
        .await?)
}

/// Adds the bcrypt entries of an htpasswd file as users; existing names are skipped. Returns
/// (added, skipped) names.
pub async fn import_htpasswd(
    md: &Metadata,
    by: &By,
    text: &str,
) -> Result<(Vec<String>, Vec<String>)> {
    let entries = secrets::parse_htpasswd(text).map_err(invalid)?;
    for (name, _) in &entries {
        if !valid_account_name(name) {
            return Err(invalid(format!("invalid user name {name:?} in the file")));
        }
    }
    let now = now_secs();
    let entries = &entries;
    Ok(md
        .write(|tx| {
            Box::pin(async move {
                let (mut added, mut skipped) = (Vec::new(), Vec::new());
                for (name, hash) in entries {
                    let row = AccountRow {
                        id: 0,
                        name: name.clone(),
                        kind: "user".to_string(),
                        password_hash: Some(hash.clone()),
                        admin: false,
                        namespace: None,
                        grants: None,
                        expires_at: None,
                        created_at: now,
                    };
                    match q::insert_account(tx, &row).await? {
                        Some(_) => added.push(name.clone()),
                        None => skipped.push(name.clone()),
                    }
                }
                let event = by.event(
                    "accounts.imported",
                    None,
                    serde_json::json!({ "added": added, "skipped": skipped }),
                );
                record(tx, !added.is_empty(), &event).await?;
                Ok((added, skipped))
            })
        })
        .await?)
}

/// Creates a namespace, optionally public, optionally with an owner.
pub async fn add_namespace(
    md: &Metadata,
    by: &By,
    name: &str,
    public: bool,
    owner: Option<&str>,
) -> Result<()> {
    if !valid_namespace(name) {
        return Err(invalid(format!("invalid namespace name {name:?}")));
    }
    let now = now_secs();
    md.write(|tx| {
        Box::pin(async move {
            let owner_id = match owner {
                Some(owner) => match q::account_by_name(tx, owner).await? {
                    Some(account) => Some(account.id),
                    None => return Ok(Err(ManageError::NotFound(format!("no account {owner}")))),
                },
                None => None,
            };
            if !q::insert_namespace(tx, name, public, now).await? {
                return Ok(Err(ManageError::Conflict(format!(
                    "namespace {name} exists"
                ))));
            }
            if let Some(id) = owner_id {
                q::set_member(tx, name, id, Role::Owner.as_str()).await?;
            }
            let event = by.event(
                "namespace.created",
                Some(name),
                serde_json::json!({ "namespace": name, "public": public, "owner": owner }),
            );
            events::append(tx, &event).await?;
            Ok(Ok(()))
        })
    })
    .await?
}

pub async fn remove_namespace(md: &Metadata, by: &By, name: &str) -> Result<()> {
    let event = by.event(
        "namespace.deleted",
        Some(name),
        serde_json::json!({ "namespace": name }),
    );
    let event = &event;
    if md
        .write(|tx| {
            Box::pin(async move {
                let deleted = q::delete_namespace(tx, name).await?;
                record(tx, deleted, event).await
            })
        })
        .await?
    {
        Ok(())
    } else {
        Err(ManageError::NotFound(format!("no namespace {name}")))
    }
}

pub async fn set_public(md: &Metadata, by: &By, name: &str, public: bool) -> Result<()> {
    let event = by.event(
        "namespace.visibility_changed",
        Some(name),
        serde_json::json!({ "namespace": name, "public": public }),
    );
    let event = &event;
    if md
        .write(|tx| {
            Box::pin(async move {
                let changed = q::set_namespace_public(tx, name, public).await?;
                record(tx, changed, event).await
            })
        })
        .await?
    {
        Ok(())
    } else {
        Err(ManageError::NotFound(format!("no namespace {name}")))
    }
}

pub async fn namespace(md: &Metadata, name: &str) -> Result<NamespaceRow> {
    md.read(|tx| Box::pin(q::namespace(tx, name)))
        .await?
        .ok_or_else(|| ManageError::NotFound(format!("no namespace {name}")))
}

pub async fn list_namespaces(md: &Metadata) -> Result<Vec<NamespaceRow>> {
    Ok(md.read(|tx| Box::pin(q::list_namespaces(tx))).await?)
}

/// Gives an account a role in a namespace (replacing its previous role there).
pub async fn set_member(
    md: &Metadata,
    by: &By,
    namespace: &str,
    name: &str,
    role: Role,
) -> Result<()> {
    md.write(|tx| {
        Box::pin(async move {
            if q::namespace(tx, namespace).await?.is_none() {
                return Ok(Err(ManageError::NotFound(format!(
                    "no namespace {namespace}"
                ))));
            }
            let Some(account) = q::account_by_name(tx, name).await? else {
                return Ok(Err(ManageError::NotFound(format!("no account {name}"))));
            };
            q::set_member(tx, namespace, account.id, role.as_str()).await?;
            let event = by.event(
                "member.set",
                Some(namespace),
                serde_json::json!({ "namespace": namespace, "account": name, "role": role.as_str() }),
            );
            events::append(tx, &event).await?;
            Ok(Ok(()))
        })
    })
    .await?
}

pub async fn remove_member(md: &Metadata, by: &By, namespace: &str, name: &str) -> Result<()> {
    let removed = md
        .write(|tx| {
            Box::pin(async move {
                let Some(account) = q::account_by_name(tx, name).await? else {
                    return Ok(false);
                };
                let removed = q::remove_member(tx, namespace, account.id).await?;
                let event = by.event(
                    "member.removed",
                    Some(namespace),
                    serde_json::json!({ "namespace": namespace, "account": name }),
                );
                record(tx, removed, &event).await
            })
        })
        .await?;
    if removed {
        Ok(())
    } else {
        Err(ManageError::NotFound(format!(
            "{name} is not a member of {namespace}"
        )))
    }
}

/// A namespace's members and their roles.
pub async fn members(md: &Metadata, namespace: &str) -> Result<Vec<(String, Role)>> {
    let rows = md.read(|tx| Box::pin(q::members(tx, namespace))).await?;
    rows.into_iter()
        .map(|(name, role)| {
            let role = role
                .parse()
                .map_err(|e: String| ManageError::Metadata(MetadataError::internal(e)))?;
            Ok((name, role))
        })
        .collect()
}

/// An account's roles: (namespace, role), by namespace.
pub async fn memberships(md: &Metadata, account: &str) -> Result<Vec<(String, Role)>> {
    let row = self::account(md, account).await?;
    let rows = md.read(|tx| Box::pin(q::memberships(tx, row.id))).await?;
    rows.into_iter()
        .map(|(namespace, role)| {
            let role = role
                .parse()
                .map_err(|e: String| ManageError::Metadata(MetadataError::internal(e)))?;
            Ok((namespace, role))
        })
        .collect()
}

/// A robot's full name: `NAMESPACE+NAME`.
pub fn robot_name(namespace: &str, name: &str) -> String {
    format!("{namespace}+{name}")
}

/// Creates a robot in `namespace` with `grants` (each inside the namespace) and its first
/// secret. Returns the robot's full name and the secret, shown once.
pub async fn add_robot(
    md: &Metadata,
    by: &By,
    namespace: &str,
    name: &str,
    grants: &[Grant],
    expires_at: Option<i64>,
) -> Result<(String, String)> {
    if !valid_account_name(name) {
        return Err(invalid(format!("invalid robot name {name:?}")));
    }
    if grants.is_empty() {
        return Err(invalid(
            "a robot needs at least one grant, e.g. team/*:pull",
        ));
    }
    if let Some(g) = grants.iter().find(|g| !g.within(namespace)) {
        return Err(invalid(format!(
            "grant {g} reaches outside namespace {namespace}"
        )));
    }
    let full = robot_name(namespace, name);
    let now = now_secs();
    let row = AccountRow {
        id: 0,
        name: full.clone(),
        kind: "robot".to_string(),
        password_hash: None,
        admin: false,
        namespace: Some(namespace.to_string()),
        grants: Some(serde_json::to_string(grants).map_err(|e| invalid(e.to_string()))?),
        expires_at,
        created_at: now,
    };
    let secret = ApiSecret::generate();
    let (row, secret_ref) = (&row, &secret);
    md.write(|tx| {
        Box::pin(async move {
            if q::namespace(tx, namespace).await?.is_none() {
                return Ok(Err(ManageError::NotFound(format!(
                    "no namespace {namespace}"
                ))));
            }
            let Some(id) = q::insert_account(tx, row).await? else {
                return Ok(Err(ManageError::Conflict(format!(
                    "robot {} exists",
                    row.name
                ))));
            };
            q::insert_credential(
                tx,
                &credential_row(secret_ref, id, "robot", "", None, now, expires_at),
            )
            .await?;
            let event = by.event(
                "robot.created",
                Some(namespace),
                serde_json::json!({
                    "account": row.name,
                    "grants": row.grants,
                    "secret": secret_ref.id,
                    "expires_at": expires_at,
                }),
            );
            events::append(tx, &event).await?;
            Ok(Ok(()))
        })
    })
    .await??;
    Ok((full, secret.to_string()))
}

fn credential_row(
    secret: &ApiSecret,
    account_id: i64,
    kind: &str,
    description: &str,
    grants: Option<String>,
    now: i64,
    expires_at: Option<i64>,
) -> CredentialRow {
    CredentialRow {
        id: secret.id.clone(),
        account_id,
        kind: kind.to_string(),
        secret_hash: secret.hash(),
        description: description.to_string(),
        grants,
        service: None,
        created_at: now,
        expires_at,
        last_used_at: None,
        revoked_at: None,
    }
}

/// A new secret for an account: a personal access token for a user (limited to `grants` when
/// given), another secret for a robot. Returns the secret, shown once.
pub async fn add_token(
    md: &Metadata,
    by: &By,
    account: &str,
    description: &str,
    grants: Option<&[Grant]>,
    expires_at: Option<i64>,
) -> Result<String> {
    let row = self::account(md, account).await?;
    let kind = if row.kind == "robot" {
        if grants.is_some() {
            return Err(invalid(
                "a robot's rights are its own grants; a secret takes none",
            ));
        }
        "robot"
    } else {
        "personal"
    };
    let grants = grants
        .map(serde_json::to_string)
        .transpose()
        .map_err(|e| invalid(e.to_string()))?;
    let secret = ApiSecret::generate();
    let c = credential_row(
        &secret,
        row.id,
        kind,
        description,
        grants,
        now_secs(),
        expires_at,
    );
    let event = by.event(
        "secret.created",
        robot_namespace(account),
        serde_json::json!({
            "account": account,
            "secret": c.id,
            "kind": kind,
            "grants": c.grants,
            "expires_at": expires_at,
        }),
    );
    let (c, event) = (&c, &event);
    md.write(|tx| {
        Box::pin(async move {
            q::insert_credential(tx, c).await?;
            events::append(tx, event).await
        })
    })
    .await?;
    Ok(secret.to_string())
}

pub async fn list_tokens(md: &Metadata, account: &str) -> Result<Vec<CredentialRow>> {
    let row = self::account(md, account).await?;
    Ok(md
        .read(|tx| Box::pin(q::list_credentials(tx, row.id)))
        .await?)
}

pub async fn token(md: &Metadata, id: &str) -> Result<CredentialRow> {
    md.read(|tx| Box::pin(q::credential_by_id(tx, id)))
        .await?
        .ok_or_else(|| ManageError::NotFound(format!("no token {id}")))
}

/// A secret and the account it belongs to.
pub async fn token_holder(md: &Metadata, id: &str) -> Result<(CredentialRow, AccountRow)> {
    md.read(|tx| {
        Box::pin(async move {
            let Some(c) = q::credential_by_id(tx, id).await? else {
                return Ok(None);
            };
            Ok(q::account_by_id(tx, c.account_id).await?.map(|a| (c, a)))
        })
    })
    .await?
    .ok_or_else(|| ManageError::NotFound(format!("no token {id}")))
}

/// Revokes a secret at once on every node (tokens obtained with it stop working too).
pub async fn revoke_token(md: &Metadata, by: &By, id: &str) -> Result<()> {
    let now = now_secs();
    if md
        .write(|tx| {
            Box::pin(async move {
                let holder = match q::credential_by_id(tx, id).await? {
                    Some(c) => q::account_by_id(tx, c.account_id).await?.map(|a| a.name),
                    None => None,
                };
                let revoked = q::revoke_credential(tx, id, now).await?;
                let event = by.event(
                    "secret.revoked",
                    holder.as_deref().and_then(robot_namespace),
                    serde_json::json!({ "secret": id, "account": holder }),
                );
                record(tx, revoked, &event).await
            })
        })
        .await?
    {
        Ok(())
    } else {
        Err(ManageError::NotFound(format!("no live token {id}")))
    }
}

/// Starts a new signing key; the previous one keeps verifying until its tokens expire.
/// Returns the new key's id.
pub async fn rotate_key(md: &Metadata, by: &By) -> Result<String> {
    let key = token::generate_key(now_secs()).map_err(invalid)?;
    let kid = key.kid.clone();
    let event = by.event("key.rotated", None, serde_json::json!({ "kid": kid }));
    let (key, event) = (&key, &event);
    md.write(|tx| {
        Box::pin(async move {
            q::rotate_signing_key(tx, key).await?;
            events::append(tx, event).await
        })
    })
    .await?;
    Ok(kid)
}

/// What `berth trust add` (or the management API) asks for.
#[derive(Debug, Clone)]
pub struct NewTrustRule<'a> {
    pub name: &'a str,
    /// The tokens' `iss`, exactly.
    pub issuer: &'a str,
    /// The `aud` the CI job asks its token for.
    pub audience: &'a str,
    /// An `http(s)://` URL or an absolute file path.
    pub jwks: &'a str,
    /// See `auth::conditions`.
    pub conditions: &'a str,
    /// The robot's full name, `NAMESPACE+NAME`.
    pub robot: &'a str,
}

/// Adds a trust rule: CI identities of `issuer` whose claims satisfy `conditions` act as
/// `robot`. The conditions are parsed now (refused with where they are wrong) and stored in
/// their canonical form. Returns the stored row.
pub async fn add_trust_rule(
    md: &Metadata,
    by: &By,
    rule: &NewTrustRule<'_>,
) -> Result<TrustRuleRow> {
    let (_, conditions) = super::federation::check_fields(
        rule.name,
        rule.issuer,
        rule.audience,
        rule.jwks,
        rule.conditions,
    )
    .map_err(invalid)?;
    let mut row = TrustRuleRow {
        id: 0,
        name: rule.name.to_string(),
        issuer: rule.issuer.to_string(),
        audience: rule.audience.to_string(),
        jwks: rule.jwks.to_string(),
        conditions: conditions.to_string(),
        robot_id: 0,
        created_at: now_secs(),
    };
    let robot = rule.robot;
    let row_ref = &row;
    let (id, robot_id) = md
        .write(|tx| {
            Box::pin(async move {
                let robot_id = match q::account_by_name(tx, robot).await? {
                    Some(a) if a.kind == "robot" => a.id,
                    Some(_) => {
                        return Ok(Err(invalid(format!(
                            "{robot} is a user; a trust rule acts as a robot (NAMESPACE+NAME)"
                        ))));
                    }
                    None => return Ok(Err(ManageError::NotFound(format!("no robot {robot}")))),
                };
                let with_robot = TrustRuleRow {
                    robot_id,
                    ..row_ref.clone()
                };
                match q::insert_trust_rule(tx, &with_robot).await? {
                    Some(id) => {
                        let event = by.event(
                            "trust_rule.added",
                            robot_namespace(robot),
                            serde_json::json!({
                                "rule": with_robot.name,
                                "issuer": with_robot.issuer,
                                "audience": with_robot.audience,
                                "conditions": with_robot.conditions,
                                "robot": robot,
                            }),
                        );
                        events::append(tx, &event).await?;
                        Ok(Ok((id, robot_id)))
                    }
                    None => Ok(Err(ManageError::Conflict(format!(
                        "trust rule {} exists",
                        row_ref.name
                    )))),
                }
            })
        })
        .await??;
    row.id = id;
    row.robot_id = robot_id;
    Ok(row)
}

/// Every trust rule, by name, with its robot's name.
pub async fn list_trust_rules(md: &Metadata) -> Result<Vec<(TrustRuleRow, String)>> {
    Ok(md
        .read(|tx| {
            Box::pin(async move {
                let mut out = Vec::new();
                for row in q::trust_rules(tx).await? {
                    let robot = q::account_by_id(tx, row.robot_id)
                        .await?
                        .map(|a| a.name)
                        .unwrap_or_default();
                    out.push((row, robot));
                }
                Ok(out)
            })
        })
        .await?)
}

/// Removes a trust rule at once on every node; registry tokens obtained through it stop
/// working too.
pub async fn remove_trust_rule(md: &Metadata, by: &By, name: &str) -> Result<()> {
    let event = by.event(
        "trust_rule.removed",
        None,
        serde_json::json!({ "rule": name }),
    );
    let event = &event;
    if md
        .write(|tx| {
            Box::pin(async move {
                let deleted = q::delete_trust_rule(tx, name).await?;
                record(tx, deleted, event).await
            })
        })
        .await?
    {
        Ok(())
    } else {
        Err(ManageError::NotFound(format!("no trust rule {name}")))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap in a test is the failure
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn trust_rules_are_checked_stored_listed_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let md = Metadata::open_sqlite(&dir.path().join("m.db"))
            .await
            .unwrap();
        add_namespace(&md, &By::cli(), "team", false, None)
            .await
            .unwrap();
        let grants = [Grant::parse("team/*:pull,push").unwrap()];
        let (robot, _) = add_robot(&md, &By::cli(), "team", "ci", &grants, None)
            .await
            .unwrap();
        add_user(&md, &By::cli(), "alice", "pw", false)
            .await
            .unwrap();
        let generation = || md.read(|tx| Box::pin(q::generation(tx)));
        let before = generation().await.unwrap();
        let rule = NewTrustRule {
            name: "github-main",
            issuer: "https://token.actions.githubusercontent.com",
            audience: "berth",
            jwks: "https://token.actions.githubusercontent.com/.well-known/jwks",
            conditions: r#"repository=="org/app"&&(ref=="refs/heads/main")"#,
            robot: &robot,
        };
        let row = add_trust_rule(&md, &By::cli(), &rule).await.unwrap();
        assert_eq!(
            row.conditions,
            r#"repository == "org/app" && ref == "refs/heads/main""#
        );
        assert!(
            generation().await.unwrap() > before,
            "adding bumps the generation"
        );
        let listed = list_trust_rules(&md).await.unwrap();
        assert_eq!(listed, vec![(row.clone(), robot.clone())]);

        let refused = [
            (
                NewTrustRule {
                    name: "github-main",
                    ..rule.clone()
                },
                "exists",
            ),
            (
                NewTrustRule {
                    name: "x",
                    robot: "team+nobody",
                    ..rule.clone()
                },
                "no robot",
            ),
            (
                NewTrustRule {
                    name: "x",
                    robot: "alice",
                    ..rule.clone()
                },
                "is a user",
            ),
            (
                NewTrustRule {
                    name: "x",
                    conditions: "repository == app",
                    ..rule.clone()
                },
                "expected a quoted string",
            ),
            (
                NewTrustRule {
                    name: "x",
                    jwks: "jwks.json",
                    ..rule.clone()
                },
                "absolute",
            ),
        ];
        for (r, message) in refused {
            let e = add_trust_rule(&md, &By::cli(), &r)
                .await
                .unwrap_err()
                .to_string();
            assert!(e.contains(message), "{e}");
        }
        assert_eq!(list_trust_rules(&md).await.unwrap().len(), 1);

        remove_trust_rule(&md, &By::cli(), "github-main")
            .await
            .unwrap();
        assert!(matches!(
            remove_trust_rule(&md, &By::cli(), "github-main").await,
            Err(ManageError::NotFound(_))
        ));
        assert!(list_trust_rules(&md).await.unwrap().is_empty());
        // Removing the robot removes its rules.
        add_trust_rule(&md, &By::cli(), &rule).await.unwrap();
        remove_account(&md, &By::cli(), &robot).await.unwrap();
        assert!(list_trust_rules(&md).await.unwrap().is_empty());
    }

    #[test]
    fn names() {
        for (name, ok) in [
            ("alice", true),
            ("ci-bot.2", true),
            ("Alice", false),
            ("", false),
            ("-x", false),
            ("a b", false),
            ("a+b", false),
        ] {
            assert_eq!(valid_account_name(name), ok, "{name}");
        }
        assert!(valid_namespace("team"));
        assert!(!valid_namespace("team/app"));
        assert!(!valid_namespace("Team"));
    }
}
