//! A namespace's tag immutability rules and storage quota: the operations behind
//! `berth immutable|quota` and the management API, written once. Each change is one metadata
//! transaction that appends its event (`immutability.rule_added|rule_removed`,
//! `quota.limit_set|limit_removed|reconciled`) naming who made it.
//!
//! A namespace needs no row in `namespaces` to have rules or a quota: with access control off
//! namespaces are only the first segment of repository names.

use crate::metadata::immutability::{self, ImmutabilityRule};
use crate::metadata::queries::now_secs;
use crate::metadata::quotas::{self, Quota, UsageCheck};
use crate::metadata::{Metadata, events};

use super::manage::{By, ManageError, valid_namespace};

type Result<T> = std::result::Result<T, ManageError>;

fn check_namespace(namespace: &str) -> Result<()> {
    if valid_namespace(namespace) {
        Ok(())
    } else {
        Err(ManageError::Invalid(format!(
            "invalid namespace name {namespace:?}"
        )))
    }
}

pub async fn rules(md: &Metadata, namespace: &str) -> Result<Vec<ImmutabilityRule>> {
    check_namespace(namespace)?;
    Ok(md
        .read(|tx| Box::pin(immutability::rules(tx, namespace)))
        .await?)
}

/// Makes tags of `namespace` matching `pattern` immutable.
pub async fn add_rule(
    md: &Metadata,
    by: &By,
    namespace: &str,
    pattern: &str,
) -> Result<ImmutabilityRule> {
    check_namespace(namespace)?;
    if !immutability::valid_pattern(pattern) {
        return Err(ManageError::Invalid(format!(
            "invalid pattern {pattern:?}: letters, digits, `_.-` and the wildcards `*` and `?`, \
             at most {} characters",
            immutability::MAX_PATTERN_LEN
        )));
    }
    let rule = ImmutabilityRule {
        namespace: namespace.to_string(),
        pattern: pattern.to_string(),
        created_at: now_secs(),
        created_by: by.actor.clone(),
    };
    let event = by.event(
        "immutability.rule_added",
        Some(namespace),
        serde_json::json!({ "namespace": namespace, "pattern": pattern }),
    );
    let (rule_ref, event) = (&rule, &event);
    let added = md
        .write(|tx| {
            Box::pin(async move {
                let r = rule_ref;
                let added = immutability::add_rule(
                    tx,
                    &r.namespace,
                    &r.pattern,
                    r.created_at,
                    &r.created_by,
                )
                .await?;
                if added {
                    events::append(tx, event).await?;
                }
                Ok(added)
            })
        })
        .await?;
    if !added {
        return Err(ManageError::Conflict(format!(
            "namespace {namespace} has the rule {pattern:?} already"
        )));
    }
    Ok(rule)
}

pub async fn remove_rule(md: &Metadata, by: &By, namespace: &str, pattern: &str) -> Result<()> {
    check_namespace(namespace)?;
    let event = by.event(
        "immutability.rule_removed",
        Some(namespace),
        serde_json::json!({ "namespace": namespace, "pattern": pattern }),
    );
    let event = &event;
    let removed = md
        .write(|tx| {
            Box::pin(async move {
                let removed = immutability::remove_rule(tx, namespace, pattern).await?;
                if removed {
                    events::append(tx, event).await?;
                }
                Ok(removed)
            })
        })
        .await?;
    if !removed {
        return Err(ManageError::NotFound(format!(
            "namespace {namespace} has no rule {pattern:?}"
        )));
    }
    Ok(())
}

/// The namespace's usage and limit.
pub async fn quota(md: &Metadata, namespace: &str) -> Result<Quota> {
    check_namespace(namespace)?;
    Ok(md
        .read(|tx| Box::pin(quotas::quota_of(tx, namespace)))
        .await?)
}

/// Every namespace with a usage or a limit.
pub async fn all_quotas(md: &Metadata) -> Result<Vec<Quota>> {
    Ok(md.read(|tx| Box::pin(quotas::quotas(tx))).await?)
}

/// Sets (`Some`) or removes (`None`) the namespace's limit in bytes. Removing a limit that is
/// not there is `NotFound`; setting the limit it has already changes nothing and succeeds.
pub async fn set_limit(
    md: &Metadata,
    by: &By,
    namespace: &str,
    limit: Option<u64>,
) -> Result<Quota> {
    check_namespace(namespace)?;
    if limit.is_some_and(|l| i64::try_from(l).is_err()) {
        return Err(ManageError::Invalid(format!(
            "a limit is at most {} bytes",
            i64::MAX
        )));
    }
    let event = match limit {
        Some(bytes) => by.event(
            "quota.limit_set",
            Some(namespace),
            serde_json::json!({ "namespace": namespace, "limit_bytes": bytes }),
        ),
        None => by.event(
            "quota.limit_removed",
            Some(namespace),
            serde_json::json!({ "namespace": namespace }),
        ),
    };
    let event = &event;
    let (changed, quota) = md
        .write(|tx| {
            Box::pin(async move {
                let changed = quotas::set_limit(tx, namespace, limit).await?;
                if changed {
                    events::append(tx, event).await?;
                }
                Ok((changed, quotas::quota_of(tx, namespace).await?))
            })
        })
        .await?;
    if !changed && limit.is_none() {
        return Err(ManageError::NotFound(format!(
            "namespace {namespace} has no quota"
        )));
    }
    Ok(quota)
}

/// Recomputes every namespace's usage from the manifests (see [`quotas::reconcile`]); with
/// `fix`, stores it, recording a `quota.reconciled` event if anything drifted.
pub async fn reconcile(md: &Metadata, by: &By, fix: bool) -> Result<Vec<UsageCheck>> {
    let by = &by;
    Ok(md
        .write(|tx| {
            Box::pin(async move {
                let checks = quotas::reconcile(tx, fix).await?;
                let drifted: Vec<_> = checks.iter().filter(|c| c.drifted()).collect();
                if fix && !drifted.is_empty() {
                    let detail: Vec<_> = drifted
                        .iter()
                        .map(|c| {
                            serde_json::json!({
                                "namespace": c.namespace,
                                "stored_bytes": c.stored_bytes,
                                "actual_bytes": c.actual_bytes,
                                "wrong_counts": c.wrong_counts,
                            })
                        })
                        .collect();
                    let event = by.event(
                        "quota.reconciled",
                        None,
                        serde_json::json!({ "drifted": detail }),
                    );
                    events::append(tx, &event).await?;
                }
                Ok(checks)
            })
        })
        .await?)
}
