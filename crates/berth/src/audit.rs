//! The audit trail's upkeep: verifying the event log's hash chain with its signed checkpoints,
//! and retention, which prunes entries older than `audit_retention_days` after recording a
//! checkpoint signed with the registry's signing key (see "The event log" in ARCHITECTURE.md).
//! The SQL is in [`crate::metadata::events`]; the keys in [`crate::auth::token`].

use std::time::Duration;

use tokio::sync::watch;

use crate::auth::manage::{self, By, ManageError};
use crate::auth::token;
use crate::metadata::access::{self as q, SigningKeyRow};
use crate::metadata::events::{self, ChainBreak, Verified};
use crate::metadata::{Metadata, MetadataError};

/// Entries removed per transaction, so pruning a large backlog never holds the chain head
/// (and so every push) for long.
const PRUNE_BATCH: i64 = 10_000;
/// How often `serve` prunes.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Every signing key ever stored, live or retired (checkpoints outlive key rotations).
async fn all_keys(md: &Metadata) -> Result<Vec<SigningKeyRow>, MetadataError> {
    md.read(|tx| Box::pin(q::signing_keys(tx, 0))).await
}

/// Verifies the chain from its newest checkpoint (or its start) to its head.
pub async fn verify(
    md: &Metadata,
    page: i64,
) -> Result<Result<Verified, ChainBreak>, MetadataError> {
    let keys = all_keys(md).await?;
    events::verify(md, page, |c| {
        let text = events::Checkpoint::signed_text(c.seq, &c.hash, c.at_ms);
        token::verify_text(&keys, &c.kid, &text, &c.signature)
    })
    .await
}

/// Removes the entries older than `before_ms`, a batch per transaction; returns how many.
pub async fn prune(md: &Metadata, before_ms: i64) -> Result<i64, ManageError> {
    let mut keys = all_keys(md).await?;
    if !keys.iter().any(|k| k.retired_at.is_none()) {
        // An open registry has no key until now: checkpoints need one.
        manage::rotate_key(md, &By::system("audit-retention")).await?;
        keys = all_keys(md).await?;
    }
    let live = keys
        .into_iter()
        .find(|k| k.retired_at.is_none())
        .ok_or_else(|| ManageError::Invalid("no live signing key".to_string()))?;
    let sign = move |text: &str| token::sign_text(&live, text);
    let sign = &sign;
    let mut total = 0;
    loop {
        let removed = md
            .write(|tx| Box::pin(events::prune(tx, before_ms, PRUNE_BATCH, sign)))
            .await?;
        total += removed;
        if removed < PRUNE_BATCH {
            return Ok(total);
        }
    }
}

/// Prunes entries older than `days` once an hour until `stop`. Several nodes may do it at
/// once: each batch holds the chain head, so they take turns and the second finds less.
pub async fn keep_days(md: Metadata, days: u64, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let before_ms = events::now_ms() - days as i64 * 86_400_000;
        match prune(&md, before_ms).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                entries = n,
                days,
                "pruned the audit trail past its retention"
            ),
            Err(e) => tracing::warn!(error = %e, "pruning the audit trail failed; will retry"),
        }
    }
}
