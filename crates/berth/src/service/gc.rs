//! Online garbage collection and the trash: what goes, in which order, and what a run did.
//!
//! GC runs while the registry serves: every step is a short transaction over a batch, and
//! each write transaction first renews GC's lease, so of several nodes (or a node and
//! `berth gc`) only one collects, and a collector that lost its lease stops at its next batch.
//! The steps and why each is safe against a concurrent push are in ARCHITECTURE.md ("Garbage
//! collection"); the statements are in `metadata::gc` and `metadata::trash`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use oci::{Digest, Reference, RepositoryName};
use serde::Serialize;

use super::{Registry, RequestContext, ServiceError, now_secs};
use crate::metadata::gc::{self as statements, Doomed, Link};
use crate::metadata::trash::{self, Reason, Restored, TrashEntry, TrashFilter};
use crate::metadata::{MetadataError, Tx, events};

/// The lease GC holds while it runs.
const LEASE: &str = "gc";
/// How long the lease lasts unless renewed; each batch renews it.
const LEASE_TTL_MS: i64 = 30_000;
/// A run renews the lease between batches when nothing renewed it for this long.
const LEASE_RENEW_AFTER: Duration = Duration::from_secs(10);
/// Rows (or objects) per transaction and per storage request.
const BATCH: usize = 1000;

/// How long things are kept, from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifecycle {
    /// A blob no manifest references may go this long after it was last referenced (a push
    /// in progress has linked its layers but not yet put its manifest).
    pub gc_grace_secs: i64,
    /// Deleted manifests and tags stay restorable this long; 0 deletes at once.
    pub trash_retention_secs: i64,
    /// Untagged manifests older than this go to the trash; `None` keeps them (pulls by digest).
    pub untagged_manifest_secs: Option<i64>,
    /// Percent of the time a run works; it sleeps the rest between batches, leaving the
    /// machine to clients.
    pub gc_duty_percent: u32,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            gc_grace_secs: 86_400,
            trash_retention_secs: 7 * 86_400,
            untagged_manifest_secs: None,
            gc_duty_percent: 50,
        }
    }
}

/// What a GC run did, or (dry run) what the current state makes garbage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    /// Manifests moved to the trash: untagged ones past their age, and those retention
    /// policies let go (referrers that followed them included).
    pub manifests_trashed: u64,
    /// Tags retention policies deleted.
    pub retention_tags: u64,
    /// Trash entries past the trash period, removed for good.
    pub trash_purged: u64,
    /// Repository links to blobs no manifest there references any more.
    pub links_removed: u64,
    /// Blobs deleted (metadata row and bytes), and their bytes.
    pub blobs_deleted: u64,
    pub bytes_deleted: u64,
    /// Of those, bytes in storage that metadata never knew (a crash between store and link).
    pub orphans_deleted: u64,
    pub duration_ms: u64,
}

/// GC could not start: another collector holds the lease.
#[derive(Debug, thiserror::Error)]
#[error("another garbage collection is running (lease held)")]
pub struct GcBusy;

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    Busy(#[from] GcBusy),
    #[error(transparent)]
    Service(#[from] ServiceError),
}

impl From<MetadataError> for GcError {
    fn from(e: MetadataError) -> Self {
        GcError::Service(e.into())
    }
}

impl From<crate::storage::StorageError> for GcError {
    fn from(e: crate::storage::StorageError) -> Self {
        GcError::Service(e.into())
    }
}

/// One GC run: its lease owner id and its pace.
pub(super) struct Run {
    pub(super) owner: String,
    /// Percent of the time the run may work; it sleeps the rest, between batches.
    duty_percent: u32,
    batch_started: std::sync::Mutex<Instant>,
    /// Where the lease is renewed when a step goes on without writing.
    metadata: crate::metadata::Metadata,
    renewed: std::sync::Mutex<Instant>,
}

impl Run {
    fn new(owner: String, duty_percent: u32, metadata: crate::metadata::Metadata) -> Run {
        Run {
            owner,
            duty_percent: duty_percent.clamp(1, 100),
            batch_started: std::sync::Mutex::new(Instant::now()),
            metadata,
            renewed: std::sync::Mutex::new(Instant::now()),
        }
    }

    /// Between batches: sleeps so that the run works `duty_percent` of the time (the clients
    /// get the rest of the machine), renews the lease if nothing renewed it for a while (a
    /// step that only reads, such as a scan with nothing to delete, must not let it lapse),
    /// then starts timing the next batch. Fails if another collector has taken the lease.
    pub(super) async fn pace(&self) -> Result<(), MetadataError> {
        let worked = lock(&self.batch_started).elapsed();
        if self.duty_percent < 100 {
            let rest = worked * (100 - self.duty_percent) / self.duty_percent;
            tokio::time::sleep(rest.min(Duration::from_secs(10))).await;
        }
        if lock(&self.renewed).elapsed() > LEASE_RENEW_AFTER {
            let owner = &self.owner;
            self.metadata.write(|tx| Box::pin(hold(tx, owner))).await?;
            *lock(&self.renewed) = Instant::now();
        }
        *lock(&self.batch_started) = Instant::now();
        Ok(())
    }
}

fn lock(m: &std::sync::Mutex<Instant>) -> std::sync::MutexGuard<'_, Instant> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Renews the lease inside a write transaction; a collector that lost it stops.
pub(super) async fn hold(tx: &mut Tx<'_>, owner: &str) -> Result<(), MetadataError> {
    if statements::take_lease(tx, LEASE, owner, LEASE_TTL_MS).await? {
        Ok(())
    } else {
        Err(MetadataError::Unavailable(
            "lost the GC lease to another collector".into(),
        ))
    }
}

fn secs_since_epoch(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Registry {
    pub fn lifecycle(&self) -> Lifecycle {
        self.options.lifecycle
    }

    /// One GC run: untagged manifests to the trash (if configured), the trash purged of what
    /// is past its period, dangling links removed, then every blob nothing links deleted
    /// (bytes first, then the row), and bytes in storage that metadata does not know. With
    /// `dry_run`, counts what the current state makes garbage and changes nothing (what this
    /// run's earlier steps would free shows up in the next run). Runs on the lifecycle runtime
    /// when there is one; a caller that stops waiting does not stop the run.
    pub async fn collect_garbage(
        self: &Arc<Self>,
        ctx: &RequestContext,
        dry_run: bool,
    ) -> Result<GcReport, GcError> {
        let (registry, ctx) = (self.clone(), ctx.clone());
        let run = self.spawn_lifecycle(async move { registry.collect_here(&ctx, dry_run).await });
        match run.await {
            Ok(result) => result,
            // Only at shutdown, when the lifecycle runtime stops: the run resumes next time.
            Err(e) if e.is_cancelled() => Err(GcError::Service(ServiceError::Unavailable(
                "the server is shutting down".into(),
            ))),
            Err(e) => Err(GcError::Service(ServiceError::Internal(format!(
                "garbage collection: {e}"
            )))),
        }
    }

    async fn collect_here(&self, ctx: &RequestContext, dry_run: bool) -> Result<GcReport, GcError> {
        let started = Instant::now();
        let owner = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4());
        let taken = self
            .metadata
            .write(|tx| Box::pin(statements::take_lease(tx, LEASE, &owner, LEASE_TTL_MS)))
            .await?;
        if !taken {
            return Err(GcBusy.into());
        }
        let mut report = GcReport {
            dry_run,
            ..GcReport::default()
        };
        let run = Run::new(
            owner,
            self.options.lifecycle.gc_duty_percent,
            self.metadata.clone(),
        );
        let result = self.collect(ctx, &run, &mut report).await;
        let released = self
            .metadata
            .write(|tx| Box::pin(statements::release_lease(tx, LEASE, &run.owner)))
            .await;
        result?;
        released?;
        // GC may have removed half of some tables: plans should know.
        if let Err(e) = self.metadata.optimize().await {
            tracing::warn!(error = %e, "refreshing SQLite's planner statistics failed");
        }
        if let Ok((entries, bytes)) = self.metadata.read(|tx| Box::pin(trash::totals(tx))).await {
            self.options.metrics.trash_size(entries, bytes);
        }
        report.duration_ms = started.elapsed().as_millis() as u64;
        let metrics = &self.options.metrics;
        metrics.gc_run(&report, started.elapsed());
        tracing::info!(
            dry_run,
            manifests_trashed = report.manifests_trashed,
            trash_purged = report.trash_purged,
            links_removed = report.links_removed,
            blobs_deleted = report.blobs_deleted,
            size_bytes = report.bytes_deleted,
            orphans_deleted = report.orphans_deleted,
            duration_ms = report.duration_ms,
            "garbage collection finished"
        );
        Ok(report)
    }

    async fn collect(
        &self,
        ctx: &RequestContext,
        run: &Run,
        report: &mut GcReport,
    ) -> Result<(), GcError> {
        // Times are whole seconds and the statements compare `< before`: a period of 0 must
        // take what was done this very second too.
        let now = now_secs() + 1;
        let life = self.options.lifecycle;
        let grace_before = now - life.gc_grace_secs;
        self.apply_retention(ctx, run, report).await?;
        if let Some(age) = life.untagged_manifest_secs {
            self.trash_untagged(ctx, run, now - age, report).await?;
        }
        let trash_before = now - life.trash_retention_secs;
        if report.dry_run {
            report.trash_purged = self
                .metadata
                .read(|tx| Box::pin(trash::expired(tx, trash_before)))
                .await?;
        } else {
            loop {
                run.pace().await?;
                let purged = self
                    .metadata
                    .write(|tx| {
                        Box::pin(async move {
                            hold(tx, &run.owner).await?;
                            trash::purge(tx, trash_before, BATCH as i64).await
                        })
                    })
                    .await?;
                report.trash_purged += purged;
                if purged < BATCH as u64 {
                    break;
                }
            }
        }
        self.unlink_dangling(run, grace_before, report).await?;
        if !report.dry_run {
            // Blobs a stopped run marked but did not delete.
            loop {
                run.pace().await?;
                let left = self
                    .metadata
                    .read(|tx| Box::pin(statements::marked(tx, BATCH as i64)))
                    .await?;
                if left.is_empty() {
                    break;
                }
                self.delete_doomed(run, &left, report).await?;
            }
        }
        self.delete_unreferenced(run, grace_before, trash_before, report)
            .await?;
        self.delete_orphans(run, grace_before, report).await?;
        Ok(())
    }

    async fn trash_untagged(
        &self,
        ctx: &RequestContext,
        run: &Run,
        before: i64,
        report: &mut GcReport,
    ) -> Result<(), GcError> {
        let keep = self.options.lifecycle.trash_retention_secs > 0;
        let mut after = 0;
        loop {
            run.pace().await?;
            let page = self
                .metadata
                .read(|tx| {
                    Box::pin(statements::untagged_manifests(
                        tx,
                        before,
                        after,
                        BATCH as i64,
                    ))
                })
                .await?;
            let Some((end, page)) = page else {
                return Ok(());
            };
            after = end;
            if report.dry_run {
                report.manifests_trashed += page.len() as u64;
                continue;
            }
            for candidate in &page {
                let Ok(repo) = candidate.repository.parse::<RepositoryName>() else {
                    continue;
                };
                let digest = &candidate.digest;
                let actor = ctx.actor().to_string();
                let event = ctx.event("manifest.deleted", &repo, Some(digest), &[], None);
                let (repo_ref, actor_ref, event_ref) = (&repo, &actor, &event);
                let trashed = self
                    .metadata
                    .write(|tx| {
                        Box::pin(async move {
                            hold(tx, &run.owner).await?;
                            let removed = trash::trash_manifest(
                                tx,
                                repo_ref,
                                digest,
                                Reason::Untagged,
                                actor_ref,
                                keep,
                            )
                            .await?;
                            if !removed.is_empty() {
                                let mut event = event_ref.clone();
                                event.detail = Some(
                                    serde_json::json!({ "reason": "untagged",
                                        "removed": removed.iter().map(|d| d.to_string())
                                            .collect::<Vec<_>>() })
                                    .to_string(),
                                );
                                events::append(tx, &event).await?;
                            }
                            Ok(removed.len())
                        })
                    })
                    .await;
                match trashed {
                    Ok(n) => report.manifests_trashed += n as u64,
                    // An index listing it was pushed since the candidate was read, or a
                    // referrer that would follow it carries an immutable tag.
                    Err(
                        MetadataError::ManifestReferenced { .. }
                        | MetadataError::TagImmutable { .. },
                    ) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }

    async fn unlink_dangling(
        &self,
        run: &Run,
        before: i64,
        report: &mut GcReport,
    ) -> Result<(), GcError> {
        let mut after = Link {
            repository_id: -1,
            digest: String::new(),
        };
        loop {
            run.pace().await?;
            let after_ref = &after;
            let page = self
                .metadata
                .read(|tx| {
                    Box::pin(statements::dangling_links(
                        tx,
                        before,
                        after_ref,
                        BATCH as i64,
                    ))
                })
                .await?;
            let Some((last, page)) = page else {
                return Ok(());
            };
            if report.dry_run {
                report.links_removed += page.len() as u64;
            } else if !page.is_empty() {
                let page_ref = &page;
                report.links_removed += self
                    .metadata
                    .write(|tx| {
                        Box::pin(async move {
                            hold(tx, &run.owner).await?;
                            let mut removed = 0;
                            for link in page_ref {
                                if statements::unlink_dangling(tx, link, before).await? {
                                    removed += 1;
                                }
                            }
                            Ok(removed)
                        })
                    })
                    .await?;
            }
            after = last;
        }
    }

    async fn delete_unreferenced(
        &self,
        run: &Run,
        before: i64,
        trash_before: i64,
        report: &mut GcReport,
    ) -> Result<(), GcError> {
        let mut after = String::new();
        loop {
            run.pace().await?;
            let after_ref = after.as_str();
            if report.dry_run {
                let (doomed, last) = self
                    .metadata
                    .read(|tx| {
                        Box::pin(statements::unreferenced(
                            tx,
                            before,
                            trash_before,
                            after_ref,
                            BATCH as i64,
                        ))
                    })
                    .await?;
                let Some(last) = last else {
                    return Ok(());
                };
                count(report, &doomed, false);
                after = last;
                continue;
            }
            // Which pages have something to mark is read first; only those take the writer.
            let Some((last, any)) = self
                .metadata
                .read(|tx| {
                    Box::pin(statements::unreferenced_page(
                        tx,
                        before,
                        after_ref,
                        BATCH as i64,
                    ))
                })
                .await?
            else {
                return Ok(());
            };
            let last_ref = last.as_str();
            if any {
                let doomed = self
                    .metadata
                    .write(|tx| {
                        Box::pin(async move {
                            hold(tx, &run.owner).await?;
                            statements::mark_unreferenced(tx, before, after_ref, last_ref).await
                        })
                    })
                    .await?;
                self.delete_doomed(run, &doomed, report).await?;
            }
            after = last;
        }
    }

    /// Bytes in storage with no blob row, older than the grace period.
    async fn delete_orphans(
        &self,
        run: &Run,
        before: i64,
        report: &mut GcReport,
    ) -> Result<(), GcError> {
        let mut after: Option<Digest> = None;
        loop {
            run.pace().await?;
            let page = self.blobs.list_blobs(after.as_ref(), BATCH).await?;
            let Some(last) = page.last() else {
                return Ok(());
            };
            let (first, last_text) = (page[0].digest.to_string(), last.digest.to_string());
            let (first_ref, last_ref) = (first.as_str(), last_text.as_str());
            let known = self
                .metadata
                .read(|tx| Box::pin(statements::blobs_between(tx, first_ref, last_ref)))
                .await?;
            let orphans: Vec<(Digest, u64)> = page
                .iter()
                .filter(|b| secs_since_epoch(b.modified) < before)
                .filter(|b| known.binary_search(&b.digest.to_string()).is_err())
                .map(|b| (b.digest.clone(), b.size))
                .collect();
            after = Some(last.digest.clone());
            if orphans.is_empty() {
                continue;
            }
            if report.dry_run {
                let doomed: Vec<Doomed> = orphans
                    .into_iter()
                    .map(|(digest, size)| Doomed { digest, size })
                    .collect();
                count(report, &doomed, true);
                continue;
            }
            let orphans_ref = &orphans;
            let doomed = self
                .metadata
                .write(|tx| {
                    Box::pin(async move {
                        hold(tx, &run.owner).await?;
                        statements::mark_orphans(tx, orphans_ref).await
                    })
                })
                .await?;
            report.orphans_deleted += doomed.len() as u64;
            self.delete_doomed(run, &doomed, report).await?;
        }
    }

    /// Deletes the bytes of blobs marked `deleting`, then their rows. A crash in between leaves
    /// the rows, and the next run deletes again.
    async fn delete_doomed(
        &self,
        run: &Run,
        doomed: &[Doomed],
        report: &mut GcReport,
    ) -> Result<(), GcError> {
        if doomed.is_empty() {
            return Ok(());
        }
        let digests: Vec<Digest> = doomed.iter().map(|d| d.digest.clone()).collect();
        self.blobs.delete_blobs(&digests).await?;
        let digests_ref = &digests;
        self.metadata
            .write(|tx| {
                Box::pin(async move {
                    hold(tx, &run.owner).await?;
                    statements::forget_deleted(tx, digests_ref).await
                })
            })
            .await?;
        count(report, doomed, false);
        Ok(())
    }

    /// Trash entries, newest first.
    pub async fn list_trash(&self, filter: &TrashFilter) -> Result<Vec<TrashEntry>, ServiceError> {
        Ok(self
            .metadata
            .read(|tx| Box::pin(trash::list(tx, filter)))
            .await?)
    }

    pub async fn trash_entry(&self, id: i64) -> Result<Option<TrashEntry>, ServiceError> {
        Ok(self
            .metadata
            .read(|tx| Box::pin(trash::get(tx, id)))
            .await?)
    }

    /// Puts trash entries back, each with its tags, children and the referrers that followed
    /// it, in one transaction with a `trash.restored` event per entry. Entries already gone
    /// (restored with another, or purged) are skipped.
    pub async fn restore_trash(
        &self,
        ctx: &RequestContext,
        ids: &[i64],
    ) -> Result<Restored, ServiceError> {
        let restored = self
            .metadata
            .write(|tx| {
                Box::pin(async move {
                    let mut out = Restored::default();
                    for &id in ids {
                        let Some(entry) = trash::get(tx, id).await? else {
                            continue;
                        };
                        let Ok(repo) = entry.repository.parse::<RepositoryName>() else {
                            continue;
                        };
                        let digest: Digest =
                            entry.digest.parse().map_err(MetadataError::internal)?;
                        let before = out.manifests.len() + out.tags.len();
                        trash::restore(tx, id, &mut out).await?;
                        let mut event =
                            ctx.event("trash.restored", &repo, Some(&digest), &entry.tags, None);
                        event.detail = Some(
                            serde_json::json!({
                                "trash_id": id,
                                "restored": out.manifests.len() + out.tags.len() - before,
                            })
                            .to_string(),
                        );
                        events::append(tx, &event).await?;
                    }
                    Ok(out)
                })
            })
            .await?;
        for m in &restored.manifests {
            tracing::info!(actor = %ctx.actor(), manifest = %m, "manifest restored from trash");
        }
        Ok(restored)
    }

    /// A client's DELETE of a manifest or tag: into the trash (with the manifest's referrers)
    /// unless the trash period is 0.
    pub(super) async fn trash_reference(
        &self,
        ctx: &RequestContext,
        repo: &RepositoryName,
        reference: &Reference,
    ) -> Result<bool, ServiceError> {
        let keep = self.options.lifecycle.trash_retention_secs > 0;
        let actor = ctx.actor().to_string();
        let event = &match reference {
            Reference::Tag(tag) => {
                ctx.event("tag.deleted", repo, None, &[tag.as_str().to_string()], None)
            }
            Reference::Digest(digest) => {
                ctx.event("manifest.deleted", repo, Some(digest), &[], None)
            }
        };
        let actor = &actor;
        Ok(self
            .metadata
            .write(|tx| {
                Box::pin(async move {
                    // Retried writes start again from the event as built.
                    let mut event = event.clone();
                    let deleted = match reference {
                        Reference::Tag(tag) => {
                            trash::trash_tag(tx, repo, tag, Reason::Deleted, actor, keep).await?
                        }
                        Reference::Digest(digest) => {
                            let removed = trash::trash_manifest(
                                tx,
                                repo,
                                digest,
                                Reason::Deleted,
                                actor,
                                keep,
                            )
                            .await?;
                            if removed.len() > 1 {
                                // The referrers that followed it.
                                event.detail = Some(
                                    serde_json::json!({ "referrers": removed[1..].iter()
                                        .map(|d| d.to_string()).collect::<Vec<_>>() })
                                    .to_string(),
                                );
                            }
                            !removed.is_empty()
                        }
                    };
                    if deleted {
                        events::append(tx, &event).await?;
                    }
                    Ok(deleted)
                })
            })
            .await?)
    }
}

fn count(report: &mut GcReport, doomed: &[Doomed], orphans: bool) {
    report.blobs_deleted += doomed.len() as u64;
    report.bytes_deleted += doomed.iter().map(|d| d.size).sum::<u64>();
    if orphans {
        report.orphans_deleted += doomed.len() as u64;
    }
}

/// Runs GC every `interval` inside `serve` until `shutdown`; a run another node holds the
/// lease for is skipped.
pub async fn run_scheduled(
    registry: std::sync::Arc<Registry>,
    interval: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let ctx = RequestContext::system("gc");
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
        match registry.collect_garbage(&ctx, false).await {
            Ok(_) => {}
            Err(GcError::Busy(_)) => tracing::debug!("GC skipped: another node is collecting"),
            Err(e) => tracing::warn!(error = %e, "garbage collection failed; retried next round"),
        }
    }
}
