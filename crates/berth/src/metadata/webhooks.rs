//! Webhook subscriptions and their delivery state: the statements of `crate::webhooks`, once
//! for both dialects.
//!
//! Every change of delivery state is *fenced* by the lease: it names the node that holds it
//! (`lease_owner = ?2`) and changes nothing when another node took the subscription over, so a
//! node that stalled past its lease cannot move a cursor it no longer owns.

use super::MetadataError;
use super::db::{Row, Tx};

/// A subscription as stored, with its delivery state.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookRow {
    pub id: String,
    /// `None`: every namespace (and events without a repository, such as logins).
    pub namespace: Option<String>,
    pub url: String,
    /// `whsec_` and base64 of the key: HMAC needs the key itself, so it is stored as given.
    pub secret: String,
    /// Event kinds or CloudEvents types; empty: all.
    pub events: Vec<String>,
    /// Repository globs; empty: all.
    pub repositories: Vec<String>,
    /// `api` or `config`.
    pub origin: String,
    pub created_at: i64,
    pub state: DeliveryState,
}

/// Where delivery stands for one subscription.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeliveryState {
    /// Every event up to this one was delivered, parked or filtered out.
    pub cursor_seq: i64,
    /// The event `failures` counts attempts of.
    pub attempt_seq: i64,
    pub failures: i64,
    pub next_attempt_ms: i64,
    pub last_success_ms: Option<i64>,
    pub last_failure_ms: Option<i64>,
    pub last_error: Option<String>,
    pub last_latency_ms: Option<i64>,
    /// Deliveries that succeeded, ever.
    pub delivered: i64,
    /// Attempts that failed, ever.
    pub failed_attempts: i64,
    pub lease_owner: Option<String>,
    pub lease_until_ms: i64,
}

/// What a new subscription is.
#[derive(Debug, Clone, PartialEq)]
pub struct NewWebhook {
    pub id: String,
    pub namespace: Option<String>,
    pub url: String,
    pub secret: String,
    pub events: Vec<String>,
    pub repositories: Vec<String>,
    pub origin: &'static str,
}

/// A delivery that failed too often, kept until replayed and delivered.
#[derive(Debug, Clone, PartialEq)]
pub struct Parked {
    pub seq: i64,
    pub attempts: i64,
    pub error: String,
    pub parked_at_ms: i64,
    /// Queued again by a replay.
    pub replay: bool,
}

macro_rules! select_webhooks {
    ($rest:literal) => {
        concat!(
            "SELECT id, namespace, url, secret, events, repositories, origin, created_at, \
             cursor_seq, attempt_seq, failures, next_attempt_ms, last_success_ms, \
             last_failure_ms, last_error, last_latency_ms, delivered, failed_attempts, \
             lease_owner, lease_until_ms FROM webhooks ",
            $rest
        )
    };
}

fn list_of(text: &str) -> Result<Vec<String>, MetadataError> {
    serde_json::from_str(text).map_err(MetadataError::internal)
}

fn json_list(items: &[String]) -> Result<String, MetadataError> {
    serde_json::to_string(items).map_err(MetadataError::internal)
}

fn webhook(row: &Row) -> Result<WebhookRow, MetadataError> {
    let opt = |i| row.opt_text(i).map(|v| v.map(str::to_owned));
    Ok(WebhookRow {
        id: row.text(0)?.to_owned(),
        namespace: opt(1)?,
        url: row.text(2)?.to_owned(),
        secret: row.text(3)?.to_owned(),
        events: list_of(row.text(4)?)?,
        repositories: list_of(row.text(5)?)?,
        origin: row.text(6)?.to_owned(),
        created_at: row.i64(7)?,
        state: DeliveryState {
            cursor_seq: row.i64(8)?,
            attempt_seq: row.i64(9)?,
            failures: row.i64(10)?,
            next_attempt_ms: row.i64(11)?,
            last_success_ms: row.opt_i64(12)?,
            last_failure_ms: row.opt_i64(13)?,
            last_error: opt(14)?,
            last_latency_ms: row.opt_i64(15)?,
            delivered: row.i64(16)?,
            failed_attempts: row.i64(17)?,
            lease_owner: opt(18)?,
            lease_until_ms: row.i64(19)?,
        },
    })
}

/// Adds a subscription whose cursor is the log's head: it receives events from now on.
/// `false` if the id is taken.
pub async fn insert(tx: &mut Tx<'_>, new: &NewWebhook, now: i64) -> Result<bool, MetadataError> {
    let (events, repositories) = (json_list(&new.events)?, json_list(&new.repositories)?);
    let inserted = tx
        .execute(
            "INSERT INTO webhooks (id, namespace, url, secret, events, repositories, origin,
                                   created_at, cursor_seq)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, (SELECT seq FROM event_chain WHERE id = 1))
             ON CONFLICT (id) DO NOTHING",
            &[
                new.id.as_str().into(),
                new.namespace.as_deref().into(),
                new.url.as_str().into(),
                new.secret.as_str().into(),
                events.as_str().into(),
                repositories.as_str().into(),
                new.origin.into(),
                now.into(),
            ],
        )
        .await?;
    Ok(inserted == 1)
}

/// Sets what a subscription is (not its delivery state); `false` if there is none.
pub async fn update_definition(tx: &mut Tx<'_>, new: &NewWebhook) -> Result<bool, MetadataError> {
    let (events, repositories) = (json_list(&new.events)?, json_list(&new.repositories)?);
    let updated = tx
        .execute(
            "UPDATE webhooks SET namespace = ?2, url = ?3, secret = ?4, events = ?5,
                                 repositories = ?6, origin = ?7
             WHERE id = ?1",
            &[
                new.id.as_str().into(),
                new.namespace.as_deref().into(),
                new.url.as_str().into(),
                new.secret.as_str().into(),
                events.as_str().into(),
                repositories.as_str().into(),
                new.origin.into(),
            ],
        )
        .await?;
    Ok(updated == 1)
}

pub async fn get(tx: &mut Tx<'_>, id: &str) -> Result<Option<WebhookRow>, MetadataError> {
    tx.query_opt(select_webhooks!("WHERE id = ?1"), &[id.into()])
        .await?
        .as_ref()
        .map(webhook)
        .transpose()
}

/// Every subscription, by id.
pub async fn list(tx: &mut Tx<'_>) -> Result<Vec<WebhookRow>, MetadataError> {
    tx.query(select_webhooks!("ORDER BY id"), &[])
        .await?
        .iter()
        .map(webhook)
        .collect()
}

/// The ids of every subscription, by id.
pub async fn ids(tx: &mut Tx<'_>) -> Result<Vec<String>, MetadataError> {
    tx.query("SELECT id FROM webhooks ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| r.text(0).map(str::to_owned))
        .collect()
}

/// Removes a subscription and its parked deliveries; `false` if there was none.
pub async fn delete(tx: &mut Tx<'_>, id: &str) -> Result<bool, MetadataError> {
    tx.execute(
        "DELETE FROM webhook_parked WHERE webhook_id = ?1",
        &[id.into()],
    )
    .await?;
    Ok(tx
        .execute("DELETE FROM webhooks WHERE id = ?1", &[id.into()])
        .await?
        == 1)
}

/// Takes the subscription's lease for `ttl_ms` (or renews it): `true` if this node holds it now.
pub async fn take_lease(
    tx: &mut Tx<'_>,
    id: &str,
    owner: &str,
    ttl_ms: i64,
) -> Result<bool, MetadataError> {
    Ok(tx
        .execute(
            "UPDATE webhooks SET lease_owner = ?2, lease_until_ms = {NOW_MS} + ?3
             WHERE id = ?1 AND (lease_owner = ?2 OR lease_owner IS NULL
                                OR lease_until_ms < {NOW_MS})",
            &[id.into(), owner.into(), ttl_ms.into()],
        )
        .await?
        == 1)
}

/// Gives the lease up, so another node (or this one restarted) may take it at once.
pub async fn release_lease(tx: &mut Tx<'_>, id: &str, owner: &str) -> Result<(), MetadataError> {
    tx.execute(
        "UPDATE webhooks SET lease_owner = NULL, lease_until_ms = 0
         WHERE id = ?1 AND lease_owner = ?2",
        &[id.into(), owner.into()],
    )
    .await?;
    Ok(())
}

/// Moves the cursor over events this subscription does not want.
pub async fn skip_to(
    tx: &mut Tx<'_>,
    id: &str,
    owner: &str,
    seq: i64,
) -> Result<bool, MetadataError> {
    Ok(tx
        .execute(
            "UPDATE webhooks SET cursor_seq = ?3
             WHERE id = ?1 AND lease_owner = ?2 AND cursor_seq < ?3",
            &[id.into(), owner.into(), seq.into()],
        )
        .await?
        == 1)
}

/// How a delivery ended, for [`record`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome<'a> {
    Delivered {
        latency_ms: i64,
    },
    /// Failed; try again at `next_attempt_ms`.
    Failed {
        error: &'a str,
        next_attempt_ms: i64,
    },
    /// Failed for the last time: parked.
    Parked {
        error: &'a str,
    },
}

/// One attempt to deliver an event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Attempt {
    pub seq: i64,
    /// A parked delivery queued again; else the first wanted event after the cursor.
    pub replay: bool,
    /// Failed attempts of this event so far, this one included when it failed.
    pub failures: i64,
}

/// Records how an attempt ended. Fenced by the lease: `false` (and nothing changed) if this
/// node no longer holds it.
pub async fn record(
    tx: &mut Tx<'_>,
    id: &str,
    owner: &str,
    attempt: Attempt,
    outcome: Outcome<'_>,
    now_ms: i64,
) -> Result<bool, MetadataError> {
    let Attempt {
        seq,
        replay,
        failures,
    } = attempt;
    // The cursor moves past a delivered or parked event; a replayed one is behind it already.
    let cursor = match outcome {
        Outcome::Failed { .. } => None,
        _ if replay => None,
        _ => Some(seq),
    };
    let changed = match outcome {
        Outcome::Delivered { latency_ms } => {
            tx.execute(
                "UPDATE webhooks SET cursor_seq = COALESCE(?3, cursor_seq), attempt_seq = 0,
                        failures = 0, next_attempt_ms = 0, last_success_ms = ?4,
                        last_latency_ms = ?5, delivered = delivered + 1
                 WHERE id = ?1 AND lease_owner = ?2",
                &[
                    id.into(),
                    owner.into(),
                    cursor.into(),
                    now_ms.into(),
                    latency_ms.into(),
                ],
            )
            .await?
        }
        Outcome::Failed {
            error,
            next_attempt_ms,
        } => {
            tx.execute(
                "UPDATE webhooks SET attempt_seq = ?3, failures = ?4, next_attempt_ms = ?5,
                        last_failure_ms = ?6, last_error = ?7,
                        failed_attempts = failed_attempts + 1
                 WHERE id = ?1 AND lease_owner = ?2",
                &[
                    id.into(),
                    owner.into(),
                    seq.into(),
                    failures.into(),
                    next_attempt_ms.into(),
                    now_ms.into(),
                    error.into(),
                ],
            )
            .await?
        }
        Outcome::Parked { error } => {
            tx.execute(
                "UPDATE webhooks SET cursor_seq = COALESCE(?3, cursor_seq), attempt_seq = 0,
                        failures = 0, next_attempt_ms = 0, last_failure_ms = ?4,
                        last_error = ?5, failed_attempts = failed_attempts + 1
                 WHERE id = ?1 AND lease_owner = ?2",
                &[
                    id.into(),
                    owner.into(),
                    cursor.into(),
                    now_ms.into(),
                    error.into(),
                ],
            )
            .await?
        }
    };
    if changed != 1 {
        return Ok(false);
    }
    match outcome {
        Outcome::Delivered { .. } if replay => {
            tx.execute(
                "DELETE FROM webhook_parked WHERE webhook_id = ?1 AND seq = ?2",
                &[id.into(), seq.into()],
            )
            .await?;
        }
        Outcome::Parked { error } => {
            tx.execute(
                "INSERT INTO webhook_parked (webhook_id, seq, attempts, error, parked_at_ms, replay)
                 VALUES (?1, ?2, ?3, ?4, ?5, 0)
                 ON CONFLICT (webhook_id, seq) DO UPDATE
                 SET attempts = webhook_parked.attempts + ?3, error = ?4, parked_at_ms = ?5,
                     replay = 0",
                &[
                    id.into(),
                    seq.into(),
                    failures.into(),
                    error.into(),
                    now_ms.into(),
                ],
            )
            .await?;
        }
        _ => {}
    }
    Ok(true)
}

/// The lowest parked delivery queued again by a replay.
pub async fn next_replay(tx: &mut Tx<'_>, id: &str) -> Result<Option<i64>, MetadataError> {
    tx.query_opt(
        "SELECT MIN(seq) FROM webhook_parked WHERE webhook_id = ?1 AND replay = 1",
        &[id.into()],
    )
    .await?
    .map_or(Ok(None), |r| r.opt_i64(0))
}

/// Drops a parked delivery whose event is gone from the log.
pub async fn forget_parked(tx: &mut Tx<'_>, id: &str, seq: i64) -> Result<(), MetadataError> {
    tx.execute(
        "DELETE FROM webhook_parked WHERE webhook_id = ?1 AND seq = ?2",
        &[id.into(), seq.into()],
    )
    .await?;
    Ok(())
}

/// Parked deliveries after `after`, in order, at most `limit`.
pub async fn parked(
    tx: &mut Tx<'_>,
    id: &str,
    after: i64,
    limit: i64,
) -> Result<Vec<Parked>, MetadataError> {
    tx.query(
        "SELECT seq, attempts, error, parked_at_ms, replay FROM webhook_parked
         WHERE webhook_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        &[id.into(), after.into(), limit.into()],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(Parked {
            seq: r.i64(0)?,
            attempts: r.i64(1)?,
            error: r.text(2)?.to_owned(),
            parked_at_ms: r.i64(3)?,
            replay: r.i64(4)? != 0,
        })
    })
    .collect()
}

/// (parked, of which queued for replay).
pub async fn parked_counts(tx: &mut Tx<'_>, id: &str) -> Result<(i64, i64), MetadataError> {
    let row = tx
        .query_opt(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN replay = 1 THEN 1 ELSE 0 END), 0)
             FROM webhook_parked WHERE webhook_id = ?1",
            &[id.into()],
        )
        .await?;
    match row {
        Some(r) => Ok((r.i64(0)?, r.i64(1)?)),
        None => Ok((0, 0)),
    }
}

/// Queues every parked delivery of the subscription again; how many.
pub async fn replay_all(tx: &mut Tx<'_>, id: &str) -> Result<u64, MetadataError> {
    tx.execute(
        "UPDATE webhook_parked SET replay = 1 WHERE webhook_id = ?1 AND replay = 0",
        &[id.into()],
    )
    .await
}
