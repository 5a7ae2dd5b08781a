//! Retention policies: which tags and untagged manifests a policy lets go. The plan is a pure
//! function of the policies, the tags and the time ([`plan_repository`]); GC carries it out
//! (each deletion into the trash, so a policy that took too much is undone with one
//! `berth trash restore --all --reason retention`), and `berth retention plan` prints it.

use oci::{Digest, RepositoryName, Tag};
use serde::Serialize;

use super::gc::{GcReport, Run, hold};
use super::{Registry, RequestContext, ServiceError, now_secs};
use crate::auth::conditions::glob_match;
use crate::metadata::immutability;
use crate::metadata::retention::{self, Policy, TagRow};
use crate::metadata::trash::{self, Reason};
use crate::metadata::{MetadataError, events, queries};

const DAY_SECS: i64 = 86_400;

/// What the policies would delete now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RetentionPlan {
    /// Tags to delete; their manifest goes too when no other tag or index holds it.
    pub tags: Vec<PlannedTag>,
    /// Untagged manifests past every applicable policy's `untagged_days`.
    pub untagged: Vec<PlannedManifest>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedTag {
    pub repository: String,
    pub tag: String,
    pub digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedManifest {
    pub repository: String,
    pub digest: String,
}

/// A policy that says nothing about tags keeps them all (it may still drop untagged ones).
fn has_tag_rules(p: &Policy) -> bool {
    p.keep_last.is_some()
        || !p.keep_tags.is_empty()
        || p.keep_days.is_some()
        || p.keep_pulled_days.is_some()
}

/// Whether `at` lies within `days` of `now`.
fn within_days(at: i64, days: u64, now: i64) -> bool {
    let days = i64::try_from(days).unwrap_or(i64::MAX / DAY_SECS);
    at >= now.saturating_sub(days.saturating_mul(DAY_SECS))
}

/// Whether `policy` keeps `tag`, given the repository's tags newest first.
fn keeps(policy: &Policy, tag: &TagRow, newest_first: &[&TagRow], now: i64) -> bool {
    if !has_tag_rules(policy) {
        return true;
    }
    if let Some(n) = policy.keep_last
        && newest_first
            .iter()
            .take(usize::try_from(n).unwrap_or(usize::MAX))
            .any(|t| t.name == tag.name)
    {
        return true;
    }
    if policy.keep_tags.iter().any(|p| glob_match(p, &tag.name)) {
        return true;
    }
    if let Some(days) = policy.keep_days
        && within_days(tag.pushed_at, days, now)
    {
        return true;
    }
    if let (Some(days), Some(pulled_at)) = (policy.keep_pulled_days, tag.pulled_at)
        && within_days(pulled_at, days, now)
    {
        return true;
    }
    false
}

/// The tags of one repository the policies let go: those every applicable policy would
/// delete (keeping wins), newest first by push time (ties by name).
pub fn plan_repository<'t>(policies: &[&Policy], tags: &'t [TagRow], now: i64) -> Vec<&'t TagRow> {
    if policies.is_empty() {
        return Vec::new();
    }
    let mut newest_first: Vec<&TagRow> = tags.iter().collect();
    newest_first.sort_by(|a, b| b.pushed_at.cmp(&a.pushed_at).then(a.name.cmp(&b.name)));
    newest_first
        .iter()
        .copied()
        .filter(|t| policies.iter().all(|p| !keeps(p, t, &newest_first, now)))
        .collect()
}

/// Checks a policy before it is stored: it must match something and keep something, since a
/// policy without a keep rule would empty every repository it matches.
pub fn validate(p: &Policy) -> Result<(), String> {
    if p.repositories.trim().is_empty() {
        return Err("repositories: a pattern is required (e.g. team/*)".into());
    }
    if !has_tag_rules(p) && p.untagged_days.is_none() {
        return Err(
            "a policy needs keep_last, keep_tags, keep_days, keep_pulled_days or untagged_days: \
             without one it would delete every tag it matches"
                .into(),
        );
    }
    if p.keep_tags.iter().any(|t| t.is_empty()) {
        return Err("keep_tags: an empty pattern".into());
    }
    Ok(())
}

impl Registry {
    pub async fn retention_policies(&self) -> Result<Vec<Policy>, ServiceError> {
        Ok(self
            .metadata
            .read(|tx| Box::pin(retention::list(tx)))
            .await?)
    }

    pub async fn add_retention_policy(
        &self,
        ctx: &RequestContext,
        policy: &Policy,
    ) -> Result<Policy, ServiceError> {
        validate(policy).map_err(ServiceError::InvalidRequest)?;
        let added = self
            .metadata
            .write(|tx| {
                Box::pin(async move {
                    let added = retention::add(tx, policy).await?;
                    events::append(tx, &policy_event(ctx, "retention.policy_added", &added))
                        .await?;
                    Ok(added)
                })
            })
            .await?;
        Ok(added)
    }

    /// False if there was no such policy.
    pub async fn remove_retention_policy(
        &self,
        ctx: &RequestContext,
        id: i64,
    ) -> Result<Option<Policy>, ServiceError> {
        Ok(self
            .metadata
            .write(|tx| {
                Box::pin(async move {
                    let Some(policy) = retention::list(tx).await?.into_iter().find(|p| p.id == id)
                    else {
                        return Ok(None);
                    };
                    retention::remove(tx, id).await?;
                    events::append(tx, &policy_event(ctx, "retention.policy_removed", &policy))
                        .await?;
                    Ok(Some(policy))
                })
            })
            .await?)
    }

    /// Exactly what the policies would delete now.
    pub async fn retention_plan(&self) -> Result<RetentionPlan, ServiceError> {
        let policies = self.retention_policies().await?;
        let mut plan = RetentionPlan::default();
        if policies.is_empty() {
            return Ok(plan);
        }
        let now = now_secs();
        let repositories = self.metadata.all_repositories().await?;
        for repository in repositories {
            let applicable: Vec<&Policy> = policies
                .iter()
                .filter(|p| glob_match(&p.repositories, &repository))
                .collect();
            if applicable.is_empty() {
                continue;
            }
            let repo_ref = repository.as_str();
            let namespace = repository.split('/').next().unwrap_or(&repository);
            let (tags, rules) = self
                .metadata
                .read(|tx| {
                    Box::pin(async move {
                        let tags = retention::tags(tx, repo_ref).await?;
                        Ok((tags, immutability::rules(tx, namespace).await?))
                    })
                })
                .await?;
            // An immutable tag is never a policy's to delete.
            let tags: Vec<TagRow> = tags
                .into_iter()
                .filter(|t| immutability::first_protecting(&rules, &t.name).is_none())
                .collect();
            for tag in plan_repository(&applicable, &tags, now) {
                plan.tags.push(PlannedTag {
                    repository: repository.clone(),
                    tag: tag.name.clone(),
                    digest: tag.digest.clone(),
                });
            }
            // Keeping wins: the longest period of the policies that say one; none if any
            // applicable policy keeps untagged manifests (says nothing about them).
            let days: Option<Vec<u64>> = applicable.iter().map(|p| p.untagged_days).collect();
            let Some(days) = days.and_then(|d| d.into_iter().max()) else {
                continue;
            };
            let before = now - i64::try_from(days).unwrap_or(i64::MAX / DAY_SECS) * DAY_SECS;
            let untagged = self
                .metadata
                .read(|tx| Box::pin(retention::untagged(tx, repo_ref, before)))
                .await?;
            plan.untagged
                .extend(untagged.into_iter().map(|digest| PlannedManifest {
                    repository: repository.clone(),
                    digest,
                }));
        }
        Ok(plan)
    }

    /// GC's first step: carries out the plan (a dry run only counts it). Each tag goes to the
    /// trash, and its manifest (with its referrers) when nothing else holds it.
    pub(super) async fn apply_retention(
        &self,
        ctx: &RequestContext,
        run: &Run,
        report: &mut GcReport,
    ) -> Result<(), ServiceError> {
        let plan = self.retention_plan().await?;
        if report.dry_run {
            report.retention_tags = plan.tags.len() as u64;
            report.manifests_trashed += plan.untagged.len() as u64;
            return Ok(());
        }
        let keep = self.options.lifecycle.trash_retention_secs > 0;
        let actor = ctx.actor().to_string();
        for planned in &plan.tags {
            run.pace().await?;
            let (Ok(repo), Ok(tag)) = (
                planned.repository.parse::<RepositoryName>(),
                planned.tag.parse::<Tag>(),
            ) else {
                continue;
            };
            let Ok(digest) = planned.digest.parse::<Digest>() else {
                continue;
            };
            let (repo, tag, digest, actor) = (&repo, &tag, &digest, &actor);
            let removed = self
                .metadata
                .write(|tx| {
                    Box::pin(async move {
                        hold(tx, &run.owner).await?;
                        // Moved since the plan was made: a newer push is not the policy's.
                        match queries::manifest_by_tag(tx, repo, tag).await? {
                            Some(m) if &m.digest == digest => {}
                            _ => return Ok(0),
                        }
                        trash::trash_tag(tx, repo, tag, Reason::Retention, actor, keep).await?;
                        let mut event = ctx.event(
                            "tag.deleted",
                            repo,
                            Some(digest),
                            &[tag.as_str().to_string()],
                            None,
                        );
                        event.detail = Some(r#"{"reason":"retention"}"#.to_string());
                        events::append(tx, &event).await?;
                        let mut manifests = 0;
                        if retention::is_loose(tx, repo.as_str(), &digest.to_string()).await? {
                            manifests = trash_loose(tx, ctx, repo, digest, actor, keep).await?;
                        }
                        Ok(1 + manifests)
                    })
                })
                .await;
            match removed {
                Ok(0) => {}
                Ok(n) => {
                    report.retention_tags += 1;
                    report.manifests_trashed += n - 1;
                }
                // An index listing the manifest was pushed meanwhile (the tag went, it stays),
                // or a rule made the tag or a referrer's tag immutable since the plan.
                Err(
                    MetadataError::ManifestReferenced { .. } | MetadataError::TagImmutable { .. },
                ) => {}
                Err(e) => return Err(e.into()),
            }
        }
        for planned in &plan.untagged {
            run.pace().await?;
            let (Ok(repo), Ok(digest)) = (
                planned.repository.parse::<RepositoryName>(),
                planned.digest.parse::<Digest>(),
            ) else {
                continue;
            };
            let (repo, digest, actor) = (&repo, &digest, &actor);
            let removed = self
                .metadata
                .write(|tx| {
                    Box::pin(async move {
                        hold(tx, &run.owner).await?;
                        if !retention::is_loose(tx, repo.as_str(), &digest.to_string()).await? {
                            return Ok(0);
                        }
                        trash_loose(tx, ctx, repo, digest, actor, keep).await
                    })
                })
                .await;
            match removed {
                Ok(n) => report.manifests_trashed += n,
                Err(
                    MetadataError::ManifestReferenced { .. } | MetadataError::TagImmutable { .. },
                ) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// Moves a manifest nothing holds (and its referrers) to the trash for a policy; returns how
/// many manifests went.
async fn trash_loose(
    tx: &mut crate::metadata::Tx<'_>,
    ctx: &RequestContext,
    repo: &RepositoryName,
    digest: &Digest,
    actor: &str,
    keep: bool,
) -> Result<u64, MetadataError> {
    let removed = trash::trash_manifest(tx, repo, digest, Reason::Retention, actor, keep).await?;
    if !removed.is_empty() {
        let mut event = ctx.event("manifest.deleted", repo, Some(digest), &[], None);
        event.detail = Some(r#"{"reason":"retention"}"#.to_string());
        events::append(tx, &event).await?;
    }
    Ok(removed.len() as u64)
}

/// The namespace a policy's pattern stays within (its first segment, if that has no wildcard):
/// its owners may manage it and see its events.
pub fn namespace_of(pattern: &str) -> Option<&str> {
    let first = pattern.split('/').next()?;
    let literal = !first.is_empty() && !first.contains(['*', '?']) && pattern.len() > first.len();
    literal.then_some(first)
}

fn policy_event(ctx: &RequestContext, kind: &str, p: &Policy) -> crate::metadata::events::NewEvent {
    let mut event = ctx.event_about(kind, namespace_of(&p.repositories));
    event.detail = serde_json::to_string(p).ok();
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(name: &str, pushed_at: i64) -> TagRow {
        TagRow {
            name: name.into(),
            digest: format!("sha256:{name}"),
            pushed_at,
            pulled_at: None,
        }
    }

    fn policy(keep_last: Option<u64>, keep_tags: &[&str], keep_days: Option<u64>) -> Policy {
        Policy {
            id: 1,
            repositories: "team/*".into(),
            keep_last,
            keep_tags: keep_tags.iter().map(|s| s.to_string()).collect(),
            keep_days,
            keep_pulled_days: None,
            untagged_days: None,
            created_at: 0,
        }
    }

    fn deleted(policies: &[Policy], tags: &[TagRow], now: i64) -> Vec<String> {
        let refs: Vec<&Policy> = policies.iter().collect();
        let mut names: Vec<String> = plan_repository(&refs, tags, now)
            .into_iter()
            .map(|t| t.name.clone())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn plans() {
        let now = 100 * DAY_SECS;
        let tags = [
            tag("a", now - 50 * DAY_SECS),
            tag("b", now - 40 * DAY_SECS),
            tag("c", now - 3 * DAY_SECS),
            tag("v1", now - 90 * DAY_SECS),
            tag("latest", now - 60 * DAY_SECS),
        ];
        let cases: &[(&[Policy], &[&str])] = &[
            // The two most recent stay.
            (&[policy(Some(2), &[], None)], &["a", "latest", "v1"]),
            // Patterns keep.
            (&[policy(Some(1), &["v*", "latest"], None)], &["a", "b"]),
            // Pushed within 45 days.
            (&[policy(None, &[], Some(45))], &["a", "latest", "v1"]),
            // Two policies: keeping wins.
            (
                &[policy(Some(1), &[], None), policy(None, &["a"], None)],
                &["b", "latest", "v1"],
            ),
            // A policy about untagged manifests only keeps every tag.
            (&[policy(None, &[], None)], &[]),
            (&[], &[]),
        ];
        for (policies, want) in cases {
            assert_eq!(deleted(policies, &tags, now), *want, "{policies:?}");
        }
    }

    #[test]
    fn pulls_keep_tags() {
        let now = 100 * DAY_SECS;
        let pulled = |name, pushed_days_ago, pulled_days_ago: Option<i64>| TagRow {
            pulled_at: pulled_days_ago.map(|d| now - d * DAY_SECS),
            ..tag(name, now - pushed_days_ago * DAY_SECS)
        };
        let tags = [
            pulled("old-but-pulled", 90, Some(2)),
            pulled("old-pulled-long-ago", 90, Some(40)),
            pulled("never-pulled", 1, None),
            pulled("pulled-today", 50, Some(0)),
        ];
        let mut p = policy(None, &[], None);
        p.keep_pulled_days = Some(30);
        assert_eq!(
            deleted(std::slice::from_ref(&p), &tags, now),
            ["never-pulled", "old-pulled-long-ago"]
        );
        // Pushed or pulled within the period.
        p.keep_days = Some(30);
        assert_eq!(deleted(&[p], &tags, now), ["old-pulled-long-ago"]);
        assert!(
            validate(&Policy {
                keep_pulled_days: Some(0),
                ..policy(None, &[], None)
            })
            .is_ok()
        );
    }

    #[test]
    fn namespaces_of_patterns() {
        for (pattern, want) in [
            ("team/*", Some("team")),
            ("team/app", Some("team")),
            ("team", None),
            ("*", None),
            ("te*/app", None),
            ("/x", None),
        ] {
            assert_eq!(namespace_of(pattern), want, "{pattern}");
        }
    }

    #[test]
    fn validation() {
        assert!(validate(&policy(None, &[], None)).is_err());
        assert!(validate(&policy(Some(0), &[], None)).is_ok());
        let mut p = policy(Some(1), &[], None);
        p.repositories = " ".into();
        assert!(validate(&p).is_err());
        p.repositories = "team/*".into();
        p.keep_tags = vec![String::new()];
        assert!(validate(&p).is_err());
    }
}
