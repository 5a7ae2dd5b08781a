//! Statements about who may do what: accounts, namespaces and their members, credentials,
//! token signing keys, CI trust rules. Plain rows in, plain rows out; what they mean is the
//! `auth` module's business. Every statement that changes any of them is followed, in the
//! same transaction, by [`bump_generation`], which is how every node learns to drop what it
//! cached (see `auth::Auth`).

use super::MetadataError;
use super::db::{Row, Tx};

/// Tells every node that accounts, rights, credentials or keys changed.
pub async fn bump_generation(tx: &mut Tx<'_>) -> Result<(), MetadataError> {
    tx.execute(
        "UPDATE auth_generation SET generation = generation + 1 WHERE id = 1",
        &[],
    )
    .await?;
    Ok(())
}

pub async fn generation(tx: &mut Tx<'_>) -> Result<i64, MetadataError> {
    match tx
        .query_opt("SELECT generation FROM auth_generation WHERE id = 1", &[])
        .await?
    {
        Some(row) => row.i64(0),
        None => Err(MetadataError::internal("auth_generation has no row")),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AccountRow {
    pub id: i64,
    pub name: String,
    /// `user` or `robot`.
    pub kind: String,
    pub password_hash: Option<String>,
    pub admin: bool,
    pub namespace: Option<String>,
    /// JSON, robots only.
    pub grants: Option<String>,
    pub expires_at: Option<i64>,
    pub created_at: i64,
}

/// `SELECT` of every account column, then the rest of the statement (statements are
/// `&'static str`, so the column list is spliced in at compile time).
macro_rules! select_accounts {
    ($rest:literal) => {
        concat!(
            "SELECT id, name, kind, password_hash, admin, namespace, grants, expires_at, \
             created_at FROM accounts ",
            $rest
        )
    };
}

fn account(row: &Row) -> Result<AccountRow, MetadataError> {
    Ok(AccountRow {
        id: row.i64(0)?,
        name: row.text(1)?.to_owned(),
        kind: row.text(2)?.to_owned(),
        password_hash: row.opt_text(3)?.map(str::to_owned),
        admin: row.i64(4)? != 0,
        namespace: row.opt_text(5)?.map(str::to_owned),
        grants: row.opt_text(6)?.map(str::to_owned),
        expires_at: row.opt_i64(7)?,
        created_at: row.i64(8)?,
    })
}

/// Inserts an account; `None` if the name is taken.
pub async fn insert_account(tx: &mut Tx<'_>, a: &AccountRow) -> Result<Option<i64>, MetadataError> {
    let id = tx
        .query_opt(
            "INSERT INTO accounts
                 (name, kind, password_hash, admin, namespace, grants, expires_at, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (name) DO NOTHING RETURNING id",
            &[
                a.name.as_str().into(),
                a.kind.as_str().into(),
                a.password_hash.as_deref().into(),
                i64::from(a.admin).into(),
                a.namespace.as_deref().into(),
                a.grants.as_deref().into(),
                a.expires_at.into(),
                a.created_at.into(),
            ],
        )
        .await?
        .map(|r| r.i64(0))
        .transpose()?;
    if id.is_some() {
        bump_generation(tx).await?;
    }
    Ok(id)
}

pub async fn account_by_name(
    tx: &mut Tx<'_>,
    name: &str,
) -> Result<Option<AccountRow>, MetadataError> {
    tx.query_opt(select_accounts!("WHERE name = ?1"), &[name.into()])
        .await?
        .map(|r| account(&r))
        .transpose()
}

pub async fn account_by_id(tx: &mut Tx<'_>, id: i64) -> Result<Option<AccountRow>, MetadataError> {
    tx.query_opt(select_accounts!("WHERE id = ?1"), &[id.into()])
        .await?
        .map(|r| account(&r))
        .transpose()
}

/// Accounts by name; robots of one namespace when `namespace` is given.
pub async fn list_accounts(
    tx: &mut Tx<'_>,
    namespace: Option<&str>,
) -> Result<Vec<AccountRow>, MetadataError> {
    let rows = match namespace {
        None => tx.query(select_accounts!("ORDER BY name"), &[]).await?,
        Some(ns) => {
            tx.query(
                select_accounts!("WHERE namespace = ?1 ORDER BY name"),
                &[ns.into()],
            )
            .await?
        }
    };
    rows.iter().map(account).collect()
}

/// Replaces a user's password hash (or a robot's grants); false if there is no such account.
pub async fn set_password_hash(
    tx: &mut Tx<'_>,
    name: &str,
    hash: &str,
) -> Result<bool, MetadataError> {
    let n = tx
        .execute(
            "UPDATE accounts SET password_hash = ?2 WHERE name = ?1 AND kind = 'user'",
            &[name.into(), hash.into()],
        )
        .await?;
    if n > 0 {
        bump_generation(tx).await?;
    }
    Ok(n > 0)
}

pub async fn set_admin(tx: &mut Tx<'_>, name: &str, admin: bool) -> Result<bool, MetadataError> {
    let n = tx
        .execute(
            "UPDATE accounts SET admin = ?2 WHERE name = ?1 AND kind = 'user'",
            &[name.into(), i64::from(admin).into()],
        )
        .await?;
    if n > 0 {
        bump_generation(tx).await?;
    }
    Ok(n > 0)
}

/// Deletes an account with its memberships, credentials and trust rules.
pub async fn delete_account(tx: &mut Tx<'_>, name: &str) -> Result<bool, MetadataError> {
    let n = tx
        .execute("DELETE FROM accounts WHERE name = ?1", &[name.into()])
        .await?;
    if n > 0 {
        bump_generation(tx).await?;
    }
    Ok(n > 0)
}

#[derive(Debug, Clone, PartialEq)]
pub struct NamespaceRow {
    pub name: String,
    pub public: bool,
    pub created_at: i64,
}

/// Creates a namespace; false if it exists.
pub async fn insert_namespace(
    tx: &mut Tx<'_>,
    name: &str,
    public: bool,
    now: i64,
) -> Result<bool, MetadataError> {
    let n = tx
        .execute(
            "INSERT INTO namespaces (name, public, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO NOTHING",
            &[name.into(), i64::from(public).into(), now.into()],
        )
        .await?;
    if n > 0 {
        bump_generation(tx).await?;
    }
    Ok(n > 0)
}

pub async fn set_namespace_public(
    tx: &mut Tx<'_>,
    name: &str,
    public: bool,
) -> Result<bool, MetadataError> {
    let n = tx
        .execute(
            "UPDATE namespaces SET public = ?2 WHERE name = ?1",
            &[name.into(), i64::from(public).into()],
        )
        .await?;
    if n > 0 {
        bump_generation(tx).await?;
    }
    Ok(n > 0)
}

/// Deletes a namespace and its memberships (its repositories stay, reachable by admins).
pub async fn delete_namespace(tx: &mut Tx<'_>, name: &str) -> Result<bool, MetadataError> {
    let n = tx
        .execute("DELETE FROM namespaces WHERE name = ?1", &[name.into()])
        .await?;
    if n > 0 {
        bump_generation(tx).await?;
    }
    Ok(n > 0)
}

pub async fn namespace(tx: &mut Tx<'_>, name: &str) -> Result<Option<NamespaceRow>, MetadataError> {
    tx.query_opt(
        "SELECT name, public, created_at FROM namespaces WHERE name = ?1",
        &[name.into()],
    )
    .await?
    .map(|r| namespace_row(&r))
    .transpose()
}

fn namespace_row(row: &Row) -> Result<NamespaceRow, MetadataError> {
    Ok(NamespaceRow {
        name: row.text(0)?.to_owned(),
        public: row.i64(1)? != 0,
        created_at: row.i64(2)?,
    })
}

pub async fn list_namespaces(tx: &mut Tx<'_>) -> Result<Vec<NamespaceRow>, MetadataError> {
    tx.query(
        "SELECT name, public, created_at FROM namespaces ORDER BY name",
        &[],
    )
    .await?
    .iter()
    .map(namespace_row)
    .collect()
}

pub async fn public_namespaces(tx: &mut Tx<'_>) -> Result<Vec<String>, MetadataError> {
    tx.query(
        "SELECT name FROM namespaces WHERE public <> 0 ORDER BY name",
        &[],
    )
    .await?
    .iter()
    .map(|r| r.text(0).map(str::to_owned))
    .collect()
}

/// Gives `account_id` `role` in the namespace, replacing any role it had.
pub async fn set_member(
    tx: &mut Tx<'_>,
    namespace: &str,
    account_id: i64,
    role: &str,
) -> Result<(), MetadataError> {
    tx.execute(
        "INSERT INTO namespace_members (namespace, account_id, role) VALUES (?1, ?2, ?3)
         ON CONFLICT (namespace, account_id) DO UPDATE SET role = excluded.role",
        &[namespace.into(), account_id.into(), role.into()],
    )
    .await?;
    bump_generation(tx).await
}

pub async fn remove_member(
    tx: &mut Tx<'_>,
    namespace: &str,
    account_id: i64,
) -> Result<bool, MetadataError> {
    let n = tx
        .execute(
            "DELETE FROM namespace_members WHERE namespace = ?1 AND account_id = ?2",
            &[namespace.into(), account_id.into()],
        )
        .await?;
    if n > 0 {
        bump_generation(tx).await?;
    }
    Ok(n > 0)
}

/// A namespace's members: (account name, role), by name.
pub async fn members(
    tx: &mut Tx<'_>,
    namespace: &str,
) -> Result<Vec<(String, String)>, MetadataError> {
    tx.query(
        "SELECT a.name, m.role FROM namespace_members m JOIN accounts a ON a.id = m.account_id
         WHERE m.namespace = ?1 ORDER BY a.name",
        &[namespace.into()],
    )
    .await?
    .iter()
    .map(|r| Ok((r.text(0)?.to_owned(), r.text(1)?.to_owned())))
    .collect()
}

/// An account's roles: (namespace, role).
pub async fn memberships(
    tx: &mut Tx<'_>,
    account_id: i64,
) -> Result<Vec<(String, String)>, MetadataError> {
    tx.query(
        "SELECT namespace, role FROM namespace_members WHERE account_id = ?1 ORDER BY namespace",
        &[account_id.into()],
    )
    .await?
    .iter()
    .map(|r| Ok((r.text(0)?.to_owned(), r.text(1)?.to_owned())))
    .collect()
}

#[derive(Debug, Clone, PartialEq)]
pub struct CredentialRow {
    pub id: String,
    pub account_id: i64,
    /// `robot`, `personal` or `refresh`.
    pub kind: String,
    pub secret_hash: String,
    pub description: String,
    pub grants: Option<String>,
    pub service: Option<String>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

macro_rules! select_credentials {
    ($rest:literal) => {
        concat!(
            "SELECT id, account_id, kind, secret_hash, description, grants, service, \
             created_at, expires_at, last_used_at, revoked_at FROM credentials ",
            $rest
        )
    };
}

fn credential(row: &Row) -> Result<CredentialRow, MetadataError> {
    Ok(CredentialRow {
        id: row.text(0)?.to_owned(),
        account_id: row.i64(1)?,
        kind: row.text(2)?.to_owned(),
        secret_hash: row.text(3)?.to_owned(),
        description: row.text(4)?.to_owned(),
        grants: row.opt_text(5)?.map(str::to_owned),
        service: row.opt_text(6)?.map(str::to_owned),
        created_at: row.i64(7)?,
        expires_at: row.opt_i64(8)?,
        last_used_at: row.opt_i64(9)?,
        revoked_at: row.opt_i64(10)?,
    })
}

pub async fn insert_credential(tx: &mut Tx<'_>, c: &CredentialRow) -> Result<(), MetadataError> {
    tx.execute(
        "INSERT INTO credentials (id, account_id, kind, secret_hash, description, grants,
                                  service, created_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        &[
            c.id.as_str().into(),
            c.account_id.into(),
            c.kind.as_str().into(),
            c.secret_hash.as_str().into(),
            c.description.as_str().into(),
            c.grants.as_deref().into(),
            c.service.as_deref().into(),
            c.created_at.into(),
            c.expires_at.into(),
        ],
    )
    .await?;
    // A new refresh token changes nothing any node cached.
    if c.kind != "refresh" {
        bump_generation(tx).await?;
    }
    Ok(())
}

pub async fn credential_by_id(
    tx: &mut Tx<'_>,
    id: &str,
) -> Result<Option<CredentialRow>, MetadataError> {
    tx.query_opt(select_credentials!("WHERE id = ?1"), &[id.into()])
        .await?
        .map(|r| credential(&r))
        .transpose()
}

/// An account's credentials other than refresh tokens, newest first.
pub async fn list_credentials(
    tx: &mut Tx<'_>,
    account_id: i64,
) -> Result<Vec<CredentialRow>, MetadataError> {
    tx.query(
        select_credentials!(
            "WHERE account_id = ?1 AND kind <> 'refresh' ORDER BY created_at DESC, id"
        ),
        &[account_id.into()],
    )
    .await?
    .iter()
    .map(credential)
    .collect()
}

/// Revokes a credential at once; false if there is no such live credential.
pub async fn revoke_credential(tx: &mut Tx<'_>, id: &str, now: i64) -> Result<bool, MetadataError> {
    let n = tx
        .execute(
            "UPDATE credentials SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
            &[id.into(), now.into()],
        )
        .await?;
    if n > 0 {
        bump_generation(tx).await?;
    }
    Ok(n > 0)
}

/// Records a use, at most once per `granularity` seconds per credential, so a busy CI robot
/// does not write on every request.
pub async fn touch_credential(
    tx: &mut Tx<'_>,
    id: &str,
    now: i64,
    granularity: i64,
) -> Result<(), MetadataError> {
    tx.execute(
        "UPDATE credentials SET last_used_at = ?2
         WHERE id = ?1 AND (last_used_at IS NULL OR last_used_at <= ?3)",
        &[id.into(), now.into(), (now - granularity).into()],
    )
    .await?;
    Ok(())
}

/// Removes refresh tokens and other credentials that expired or were revoked before `before`.
pub async fn purge_credentials(tx: &mut Tx<'_>, before: i64) -> Result<u64, MetadataError> {
    tx.execute(
        "DELETE FROM credentials WHERE (expires_at IS NOT NULL AND expires_at < ?1)
                                    OR (revoked_at IS NOT NULL AND revoked_at < ?1)",
        &[before.into()],
    )
    .await
}

#[derive(Debug, Clone, PartialEq)]
pub struct SigningKeyRow {
    pub kid: String,
    pub algorithm: String,
    /// PKCS#8 DER.
    pub private_key: Vec<u8>,
    /// The raw public key as the algorithm encodes it (an uncompressed point for ES256).
    pub public_key: Vec<u8>,
    pub created_at: i64,
    pub retired_at: Option<i64>,
}

/// Adds a signing key and retires every other live one as of `key.created_at`.
pub async fn rotate_signing_key(tx: &mut Tx<'_>, key: &SigningKeyRow) -> Result<(), MetadataError> {
    tx.execute(
        "UPDATE signing_keys SET retired_at = ?1 WHERE retired_at IS NULL",
        &[key.created_at.into()],
    )
    .await?;
    tx.execute(
        "INSERT INTO signing_keys (kid, algorithm, private_key, public_key, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        &[
            key.kid.as_str().into(),
            key.algorithm.as_str().into(),
            key.private_key.as_slice().into(),
            key.public_key.as_slice().into(),
            key.created_at.into(),
        ],
    )
    .await?;
    bump_generation(tx).await
}

/// Keys that are live or were retired at or after `retired_since`: the ones that may still
/// have unexpired tokens. The live key comes first.
pub async fn signing_keys(
    tx: &mut Tx<'_>,
    retired_since: i64,
) -> Result<Vec<SigningKeyRow>, MetadataError> {
    let rows = tx
        .query(
            "SELECT kid, algorithm, private_key, public_key, created_at, retired_at
             FROM signing_keys WHERE retired_at IS NULL OR retired_at >= ?1
             ORDER BY retired_at IS NOT NULL, created_at DESC",
            &[retired_since.into()],
        )
        .await?;
    rows.into_iter()
        .map(|mut r| {
            Ok(SigningKeyRow {
                kid: r.text(0)?.to_owned(),
                algorithm: r.text(1)?.to_owned(),
                private_key: r.take_bytes(2)?,
                public_key: r.take_bytes(3)?,
                created_at: r.i64(4)?,
                retired_at: r.opt_i64(5)?,
            })
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrustRuleRow {
    pub id: i64,
    pub name: String,
    pub issuer: String,
    pub audience: String,
    /// Where the issuer's keys are: an `https://`/`http://` URL or a file path.
    pub jwks: String,
    pub conditions: String,
    pub robot_id: i64,
    pub created_at: i64,
}

/// Adds a trust rule; `None` if the name is taken.
pub async fn insert_trust_rule(
    tx: &mut Tx<'_>,
    r: &TrustRuleRow,
) -> Result<Option<i64>, MetadataError> {
    let id = tx
        .query_opt(
            "INSERT INTO trust_rules (name, issuer, audience, jwks, conditions, robot_id,
                                      created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (name) DO NOTHING RETURNING id",
            &[
                r.name.as_str().into(),
                r.issuer.as_str().into(),
                r.audience.as_str().into(),
                r.jwks.as_str().into(),
                r.conditions.as_str().into(),
                r.robot_id.into(),
                r.created_at.into(),
            ],
        )
        .await?
        .map(|row| row.i64(0))
        .transpose()?;
    if id.is_some() {
        bump_generation(tx).await?;
    }
    Ok(id)
}

pub async fn trust_rules(tx: &mut Tx<'_>) -> Result<Vec<TrustRuleRow>, MetadataError> {
    tx.query(
        "SELECT id, name, issuer, audience, jwks, conditions, robot_id, created_at
         FROM trust_rules ORDER BY name",
        &[],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(TrustRuleRow {
            id: r.i64(0)?,
            name: r.text(1)?.to_owned(),
            issuer: r.text(2)?.to_owned(),
            audience: r.text(3)?.to_owned(),
            jwks: r.text(4)?.to_owned(),
            conditions: r.text(5)?.to_owned(),
            robot_id: r.i64(6)?,
            created_at: r.i64(7)?,
        })
    })
    .collect()
}

pub async fn delete_trust_rule(tx: &mut Tx<'_>, name: &str) -> Result<bool, MetadataError> {
    let n = tx
        .execute("DELETE FROM trust_rules WHERE name = ?1", &[name.into()])
        .await?;
    if n > 0 {
        bump_generation(tx).await?;
    }
    Ok(n > 0)
}
