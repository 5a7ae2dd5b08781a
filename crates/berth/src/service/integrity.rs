//! Integrity of stored bytes: re-hashing blobs (the scrub worker inside `serve`, and `berth
//! fsck`), quarantining a blob whose bytes no longer hash to its digest, and the reference
//! checks fsck adds. Repair is an ordinary push of the blob (see `uploads::finish_upload`).
//!
//! A quarantined blob is not served (404 `BLOB_UNKNOWN`, so a client's HEAD-before-upload
//! sends it again) and cannot be mounted. Quarantine is recorded only after a second read
//! confirms the first: a repair racing the check then finds the replaced bytes instead.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use oci::{Digest, Hasher};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

use super::{Registry, ServiceError};
use crate::metadata::events::{self, NewEvent};
use crate::metadata::integrity::{self, Dangling, Problem};
use crate::metrics::Metrics;
use crate::storage::StorageError;

/// How long the scrub lease lasts unless renewed; renewed with the position every
/// [`SAVE_EVERY`], so a node that dies hands the scrub over within this.
const LEASE_TTL: Duration = Duration::from_secs(30);
/// How often the pass's position is stored (and the lease renewed): a restart re-checks at
/// most this much.
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// Blobs read from metadata at once.
const PAGE: i64 = 256;
/// Wait after a failed step (backend unavailable) before trying again.
const RETRY_AFTER: Duration = Duration::from_secs(10);
/// Tries at reading one blob before the scrub skips it for this pass.
const CHECK_ATTEMPTS: u32 = 3;
/// Longest wait for the next chunk of a blob being checked: a stream that stalls is an
/// error, not a scrub stuck for ever while it renews its lease.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(60);

/// The scrub's metrics, registered once with the registry's [`Metrics`].
#[derive(Default, Clone)]
pub struct IntegrityMetrics {
    bytes: Counter,
    blobs: Counter,
    bad: Counter,
    unreadable: Counter,
    passes: Counter,
    quarantined: Gauge,
    pass_blobs: Gauge,
    pass_left: Gauge,
    last_pass_blobs: Gauge,
    last_pass_done: Gauge,
}

impl IntegrityMetrics {
    pub(super) fn register(&self, metrics: &Metrics) {
        metrics.register(
            "berth_scrub_bytes",
            "Blob bytes re-read and hashed by the integrity scrub",
            self.bytes.clone(),
        );
        metrics.register(
            "berth_scrub_blobs",
            "Blobs checked by the integrity scrub",
            self.blobs.clone(),
        );
        metrics.register(
            "berth_scrub_mismatches",
            "Blobs the scrub found bad (bytes that hash to another digest, missing, or of another size)",
            self.bad.clone(),
        );
        metrics.register(
            "berth_scrub_unreadable",
            "Blobs the scrub skipped after repeated read failures (the store failed, not the bytes)",
            self.unreadable.clone(),
        );
        metrics.register(
            "berth_scrub_passes",
            "Scrub passes completed by this process",
            self.passes.clone(),
        );
        metrics.register(
            "berth_quarantined_blobs",
            "Blobs quarantined (not served until pushed again), as last counted",
            self.quarantined.clone(),
        );
        metrics.register(
            "berth_scrub_pass_blobs",
            "Blobs this process checked in the scrub pass in progress",
            self.pass_blobs.clone(),
        );
        metrics.register(
            "berth_scrub_pass_blobs_to_check",
            "Blobs the scrub pass in progress had left to check when this process began it (progress: berth_scrub_pass_blobs over this)",
            self.pass_left.clone(),
        );
        metrics.register(
            "berth_scrub_last_pass_blobs",
            "Blobs this process checked in the last scrub pass it completed (fewer than the registry holds when it resumed a pass)",
            self.last_pass_blobs.clone(),
        );
        metrics.register(
            "berth_scrub_last_pass_completed_seconds",
            "When this process last completed a scrub pass (Unix time)",
            self.last_pass_done.clone(),
        );
    }
}

/// What a check found.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Sound,
    Bad { problem: Problem, detail: String },
}

/// Spaces reads so they average at most `bytes_per_sec` (0: no limit).
pub struct Pacer {
    bytes_per_sec: u64,
    since: Instant,
    bytes: u64,
}

impl Pacer {
    pub fn new(bytes_per_sec: u64) -> Pacer {
        Pacer {
            bytes_per_sec,
            since: Instant::now(),
            bytes: 0,
        }
    }

    /// Starts counting afresh (after a pause, so the pause is not made up for in a burst).
    fn restart(&mut self) {
        self.since = Instant::now();
        self.bytes = 0;
    }

    async fn pace(&mut self, n: u64) {
        if self.bytes_per_sec == 0 {
            return;
        }
        self.bytes = self.bytes.saturating_add(n);
        let due = Duration::from_secs_f64(self.bytes as f64 / self.bytes_per_sec as f64);
        if let Some(wait) = due.checked_sub(self.since.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
}

/// One problem fsck found: a line of its report.
#[derive(Debug, Clone, PartialEq)]
pub struct FsckProblem {
    /// The blob or manifest at fault.
    pub digest: Digest,
    pub kind: &'static str,
    pub detail: String,
    /// `repository@manifest` (or a repository) that needs it.
    pub affected: Vec<String>,
}

/// What `berth fsck` found.
#[derive(Debug, Default)]
pub struct FsckReport {
    pub blobs: u64,
    pub bytes: u64,
    pub problems: Vec<FsckProblem>,
    /// Blobs quarantined by this run.
    pub quarantined: u64,
    /// Quarantined blobs whose bytes verified again, released by this run.
    pub released: u64,
}

/// The scrub worker's settings.
#[derive(Debug, Clone, Copy)]
pub struct ScrubOptions {
    /// 0: no scrub.
    pub bytes_per_sec: u64,
    /// From the end of a pass to the start of the next.
    pub interval: Duration,
}

enum PassEnd {
    Completed,
    Stopped,
    LostLease,
}

/// An event about a blob as a whole (no repository), by Berth's checker `by`.
pub(super) fn blob_event(
    kind: &str,
    by: &str,
    digest: &Digest,
    size: u64,
    detail: Option<String>,
) -> NewEvent {
    NewEvent {
        kind: kind.to_string(),
        actor: format!("system:{by}"),
        client_addr: None,
        user_agent: None,
        request_id: None,
        repository: None,
        digest: Some(digest.to_string()),
        tags: Vec::new(),
        size: Some(size),
        result: "ok".to_string(),
        detail,
    }
}

/// Completes once `stop` says so. (A `watch::Ref` held across an await is not `Send`.)
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn unix_secs() -> i64 {
    super::now_secs()
}

/// Most quarantined blobs one report lists (`total` counts them all).
pub const MAX_LISTED_QUARANTINED: i64 = 1000;

/// What `GET /api/v1/quarantine` answers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QuarantineReport {
    /// Quarantined blobs in all.
    pub total: u64,
    pub blobs: Vec<QuarantinedBlob>,
    /// The last blob the pass in progress checked.
    pub scrub_cursor: Option<String>,
    pub scrub_pass_started_ms: Option<i64>,
    pub scrub_last_pass_done_ms: Option<i64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct QuarantinedBlob {
    pub digest: String,
    pub found_at_ms: i64,
    /// `digest mismatch`, `missing bytes` or `size mismatch`.
    pub problem: &'static str,
    pub detail: String,
    /// `repository@manifest` of the manifests that reference it (at most 1,000).
    pub needed_by: Vec<String>,
}

/// `repository@manifest` for each (repository, manifest) pair.
fn manifest_names(pairs: Vec<(String, Digest)>) -> Vec<String> {
    pairs.into_iter().map(|(r, m)| format!("{r}@{m}")).collect()
}

impl Registry {
    /// Checks a stored blob against its digest and recorded size; `hash: false` checks only
    /// that bytes of the right size are there. Bytes read are paced by `pacer`, if any.
    /// `Err` only when the store cannot answer now (nothing is concluded from that).
    pub async fn check_blob(
        &self,
        digest: &Digest,
        size: u64,
        hash: bool,
        mut pacer: Option<&mut Pacer>,
    ) -> Result<Verdict, ServiceError> {
        let missing = || Verdict::Bad {
            problem: Problem::Missing,
            detail: "no bytes stored under the digest".into(),
        };
        let Some(stored) = self.blobs.stat(digest).await? else {
            return Ok(missing());
        };
        if stored != size {
            return Ok(Verdict::Bad {
                problem: Problem::Size,
                detail: format!("{stored} bytes stored, {size} recorded"),
            });
        }
        if !hash {
            return Ok(Verdict::Sound);
        }
        let mut stream = match self.blobs.read(digest, None).await {
            Ok(s) => s,
            Err(StorageError::NotFound) => return Ok(missing()),
            Err(e) => return Err(e.into()),
        };
        let mut hasher = Hasher::new(digest.algorithm());
        let mut read = 0u64;
        loop {
            let next = tokio::time::timeout(CHUNK_TIMEOUT, stream.next()).await;
            let chunk = match next {
                Ok(Some(chunk)) => chunk.map_err(StorageError::Io)?,
                Ok(None) => break,
                Err(_) => {
                    return Err(ServiceError::Unavailable(format!(
                        "reading {digest}: no bytes for {} s",
                        CHUNK_TIMEOUT.as_secs()
                    )));
                }
            };
            hasher.update(&chunk);
            read += chunk.len() as u64;
            self.integrity.bytes.inc_by(chunk.len() as u64);
            if let Some(p) = pacer.as_deref_mut() {
                p.pace(chunk.len() as u64).await;
            }
        }
        let actual = hasher.finish();
        if read != size {
            return Ok(Verdict::Bad {
                problem: Problem::Size,
                detail: format!("{read} bytes read, {size} recorded"),
            });
        }
        if &actual != digest {
            return Ok(Verdict::Bad {
                problem: Problem::Mismatch,
                detail: format!("the stored bytes hash to {actual}"),
            });
        }
        Ok(Verdict::Sound)
    }

    /// Records the blob as quarantined and says (at warn) which manifests need it. `true` if
    /// newly quarantined.
    /// `by` names the checker (`scrub`, `fsck`) in the event log, which records the
    /// quarantine (`blob.quarantined`) in the same transaction.
    pub async fn quarantine(
        &self,
        by: &'static str,
        digest: &Digest,
        size: u64,
        problem: Problem,
        detail: &str,
    ) -> Result<bool, ServiceError> {
        let what = serde_json::json!({ "problem": problem.as_str(), "detail": detail });
        let event = &blob_event("blob.quarantined", by, digest, size, Some(what.to_string()));
        let new = self
            .metadata
            .write(|tx| {
                Box::pin(async move {
                    let new = integrity::quarantine(tx, digest, problem, detail).await?;
                    if new {
                        events::append(tx, event).await?;
                    }
                    Ok(new)
                })
            })
            .await?;
        if new {
            let needed = self.needed_by(digest).await?;
            tracing::warn!(
                blob.digest = %digest,
                problem = problem.as_str(),
                detail,
                needed_by = %needed.join(", "),
                "blob quarantined: its stored bytes failed an integrity check; pushing it again repairs it"
            );
            self.refresh_quarantined().await?;
        }
        Ok(new)
    }

    /// The quarantined blobs (at most [`MAX_LISTED_QUARANTINED`]), each with the manifests that
    /// need it, and where the scrub stands.
    pub async fn quarantine_report(&self) -> Result<QuarantineReport, ServiceError> {
        // One read for the whole report: the listing, each blob's manifests, the scrub.
        let (listed, total, scrub) = self
            .metadata
            .read(|tx| {
                Box::pin(async move {
                    let mut listed = Vec::new();
                    for q in integrity::quarantined(tx, MAX_LISTED_QUARANTINED).await? {
                        let needed = integrity::needed_by(tx, &q.digest).await?;
                        listed.push((q, needed));
                    }
                    let total = integrity::quarantined_count(tx).await?;
                    Ok((listed, total, integrity::scrub_state(tx).await?))
                })
            })
            .await?;
        let blobs = listed
            .into_iter()
            .map(|(q, needed)| QuarantinedBlob {
                needed_by: manifest_names(needed),
                digest: q.digest.to_string(),
                found_at_ms: q.found_at_ms,
                problem: q.problem.as_str(),
                detail: q.detail,
            })
            .collect();
        Ok(QuarantineReport {
            total,
            blobs,
            scrub_cursor: scrub.as_ref().and_then(|s| s.cursor.clone()),
            scrub_pass_started_ms: scrub.as_ref().and_then(|s| s.pass_started_ms),
            scrub_last_pass_done_ms: scrub.as_ref().and_then(|s| s.last_pass_done_ms),
        })
    }

    /// `repository@manifest` of every manifest referencing the blob.
    pub async fn needed_by(&self, digest: &Digest) -> Result<Vec<String>, ServiceError> {
        let rows = self
            .metadata
            .read(|tx| Box::pin(integrity::needed_by(tx, digest)))
            .await?;
        Ok(manifest_names(rows))
    }

    async fn refresh_quarantined(&self) -> Result<u64, ServiceError> {
        let n = self
            .metadata
            .read(|tx| Box::pin(integrity::quarantined_count(tx)))
            .await?;
        self.integrity
            .quarantined
            .set(i64::try_from(n).unwrap_or(i64::MAX));
        Ok(n)
    }

    /// Keeps the gauge right after a push repaired a blob; a failure only delays it.
    pub(super) async fn refresh_quarantined_after_repair(&self) {
        if let Err(e) = self.refresh_quarantined().await {
            tracing::warn!(error = %e, "counting quarantined blobs failed");
        }
    }

    pub(super) async fn is_quarantined(&self, digest: &Digest) -> Result<bool, ServiceError> {
        Ok(self
            .metadata
            .read(|tx| Box::pin(integrity::is_quarantined(tx, digest)))
            .await?)
    }

    /// Lifts the quarantine of a blob whose bytes verified again.
    async fn release(
        &self,
        by: &'static str,
        digest: &Digest,
        size: u64,
    ) -> Result<bool, ServiceError> {
        let event = &blob_event("blob.released", by, digest, size, None);
        let released = self
            .metadata
            .write(|tx| {
                Box::pin(async move {
                    let released = integrity::release(tx, digest).await?;
                    if released {
                        events::append(tx, event).await?;
                    }
                    Ok(released)
                })
            })
            .await?;
        if released {
            tracing::info!(blob.digest = %digest, "blob verified again; quarantine lifted");
            self.refresh_quarantined().await?;
        }
        Ok(released)
    }

    /// Acts on a check: a bad blob is checked once more (a repair may have replaced its bytes
    /// meanwhile) and then quarantined; a quarantined blob that verified is released.
    async fn settle(
        &self,
        by: &'static str,
        digest: &Digest,
        size: u64,
        verdict: Verdict,
        hashed: bool,
        quarantined: bool,
    ) -> Result<Verdict, ServiceError> {
        match verdict {
            Verdict::Sound => {
                if hashed && quarantined {
                    self.release(by, digest, size).await?;
                }
                Ok(Verdict::Sound)
            }
            Verdict::Bad { .. } => {
                let again = self.check_blob(digest, size, hashed, None).await?;
                if let Verdict::Bad { problem, detail } = &again {
                    self.integrity.bad.inc();
                    self.quarantine(by, digest, size, *problem, detail).await?;
                }
                Ok(again)
            }
        }
    }

    /// The scrub worker: takes the lease, walks the blobs in digest order from the stored
    /// position at `bytes_per_sec`, quarantines what is bad, and starts the next pass
    /// `interval` after one ends. Returns once `stop` says so.
    pub async fn scrub_until(
        self: Arc<Self>,
        options: ScrubOptions,
        mut stop: watch::Receiver<bool>,
    ) {
        if options.bytes_per_sec == 0 {
            return;
        }
        let owner = uuid::Uuid::new_v4().simple().to_string();
        let ttl = LEASE_TTL.as_millis() as i64;
        if let Err(e) = self.refresh_quarantined().await {
            tracing::warn!(error = %e, "scrub: counting quarantined blobs failed");
        }
        let mut pacer = Pacer::new(options.bytes_per_sec);
        loop {
            if *stop.borrow() {
                break;
            }
            let wait = match self
                .metadata
                .write(|tx| Box::pin(integrity::take_scrub_lease(tx, &owner, ttl)))
                .await
            {
                Err(e) => {
                    tracing::warn!(error = %e, "scrub: taking the lease failed; retrying");
                    RETRY_AFTER
                }
                // Another node scrubs; look again before its lease could expire.
                Ok(None) => LEASE_TTL / 2,
                Ok(Some(state)) => {
                    let due = match (state.pass_started_ms, state.last_pass_done_ms) {
                        (None, Some(done)) => {
                            done.saturating_add(options.interval.as_millis() as i64)
                        }
                        _ => 0,
                    };
                    if state.now_ms < due {
                        // Keep the lease while idle: renewed on each look.
                        Duration::from_millis((due - state.now_ms) as u64).min(LEASE_TTL / 3)
                    } else {
                        pacer.restart();
                        match self.scrub_pass(&owner, state, &mut pacer, &mut stop).await {
                            Ok(PassEnd::Completed) | Ok(PassEnd::LostLease) => Duration::ZERO,
                            Ok(PassEnd::Stopped) => break,
                            Err(e) => {
                                tracing::warn!(error = %e, "scrub: pass interrupted; resuming later");
                                RETRY_AFTER
                            }
                        }
                    }
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stopped(&mut stop) => break,
            }
        }
        let released = self
            .metadata
            .write(|tx| Box::pin(integrity::release_scrub_lease(tx, &owner)))
            .await;
        if let Err(e) = released {
            tracing::warn!(error = %e, "scrub: releasing the lease failed; it expires by itself");
        }
    }

    async fn scrub_pass(
        &self,
        owner: &str,
        state: integrity::ScrubState,
        pacer: &mut Pacer,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<PassEnd, ServiceError> {
        let ttl = LEASE_TTL.as_millis() as i64;
        let started_ms = state.pass_started_ms.unwrap_or(state.now_ms);
        let mut cursor = state.cursor;
        let (mut blobs, mut bytes, mut bad) = (0u64, 0u64, 0u64);
        let clock = Instant::now();
        let (total, left) = self
            .metadata
            .read(|tx| Box::pin(integrity::blob_counts(tx, cursor.as_deref())))
            .await?;
        tracing::info!(
            resumed_after = cursor.as_deref().unwrap_or(""),
            blobs = total,
            blobs_left = left,
            "scrub pass {}",
            if cursor.is_some() {
                "resumed"
            } else {
                "started"
            }
        );
        self.integrity.pass_blobs.set(0);
        self.integrity
            .pass_left
            .set(i64::try_from(left).unwrap_or(i64::MAX));
        let save = |cursor: Option<String>| async move {
            self.metadata
                .write(|tx| {
                    let cursor = cursor.clone();
                    Box::pin(async move {
                        integrity::save_scrub_position(
                            tx,
                            owner,
                            cursor.as_deref(),
                            started_ms,
                            ttl,
                        )
                        .await
                    })
                })
                .await
        };
        if !save(cursor.clone()).await? {
            return Ok(PassEnd::LostLease);
        }
        let mut tick = tokio::time::interval(SAVE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let page = self
                .metadata
                .read(|tx| Box::pin(integrity::blobs_after(tx, cursor.as_deref(), PAGE)))
                .await?;
            if page.is_empty() {
                break;
            }
            for blob in page {
                let (digest, size) = (&blob.digest, blob.size);
                let mut attempt = 1;
                let verdict = loop {
                    let check = self.check_blob(digest, size, true, Some(&mut *pacer));
                    tokio::pin!(check);
                    let checked = loop {
                        tokio::select! {
                            v = &mut check => break v,
                            _ = stopped(stop) => {
                                save(cursor.clone()).await?;
                                return Ok(PassEnd::Stopped);
                            }
                            _ = tick.tick() => {
                                if !save(cursor.clone()).await? {
                                    tracing::info!("scrub: another node took the lease over");
                                    return Ok(PassEnd::LostLease);
                                }
                            }
                        }
                    };
                    match checked {
                        Ok(v) => break Some(v),
                        // One blob that cannot be read (a bad sector, an object the store
                        // keeps failing) must not stop the pass: after a few tries it is
                        // skipped, counted and logged. A store that is down fails them all,
                        // and each is logged: the operator sees it.
                        Err(e) if attempt < CHECK_ATTEMPTS => {
                            tracing::warn!(blob.digest = %digest, error = %e, attempt, "scrub: reading a blob failed; trying again");
                            attempt += 1;
                            tokio::select! {
                                _ = tokio::time::sleep(RETRY_AFTER) => {}
                                _ = stopped(stop) => {
                                    save(cursor.clone()).await?;
                                    return Ok(PassEnd::Stopped);
                                }
                            }
                        }
                        Err(e) => {
                            tracing::error!(blob.digest = %digest, error = %e, "scrub: blob unreadable; skipped in this pass");
                            self.integrity.unreadable.inc();
                            break None;
                        }
                    }
                };
                if let Some(verdict) = verdict
                    && let Verdict::Bad { .. } = self
                        .settle("scrub", digest, size, verdict, true, blob.quarantined)
                        .await?
                {
                    bad += 1;
                }
                blobs += 1;
                bytes += size;
                self.integrity.blobs.inc();
                self.integrity.pass_blobs.inc();
                cursor = Some(blob.digest.to_string());
            }
        }
        let finished = self
            .metadata
            .write(|tx| Box::pin(integrity::finish_scrub_pass(tx, owner)))
            .await?;
        if !finished {
            return Ok(PassEnd::LostLease);
        }
        self.integrity.passes.inc();
        self.integrity
            .last_pass_blobs
            .set(i64::try_from(blobs).unwrap_or(i64::MAX));
        self.integrity.last_pass_done.set(unix_secs());
        let quarantined = self.refresh_quarantined().await?;
        tracing::info!(
            blobs,
            size_bytes = bytes,
            bad,
            quarantined,
            elapsed_secs = clock.elapsed().as_secs(),
            "scrub pass completed"
        );
        Ok(PassEnd::Completed)
    }

    /// `berth fsck`: checks every blob (re-hashing it unless `hash` is false), quarantines
    /// what is bad, and checks every reference has its rows.
    pub async fn fsck(&self, hash: bool) -> Result<FsckReport, ServiceError> {
        let mut report = FsckReport::default();
        let mut cursor: Option<String> = None;
        loop {
            let page = self
                .metadata
                .read(|tx| Box::pin(integrity::blobs_after(tx, cursor.as_deref(), PAGE)))
                .await?;
            if page.is_empty() {
                break;
            }
            for blob in page {
                let (digest, size, was) = (blob.digest, blob.size, blob.quarantined);
                report.blobs += 1;
                report.bytes += size;
                cursor = Some(digest.to_string());
                let verdict = match self.check_blob(&digest, size, hash, None).await {
                    Ok(v) => v,
                    // The store failed, not necessarily the bytes: reported, not quarantined.
                    Err(e) => {
                        report.problems.push(FsckProblem {
                            affected: self.needed_by(&digest).await?,
                            digest,
                            kind: "unreadable",
                            detail: e.to_string(),
                        });
                        continue;
                    }
                };
                if was && !hash && verdict == Verdict::Sound {
                    // Present and of the right size, but only a re-hash could clear it.
                    report.problems.push(FsckProblem {
                        affected: self.needed_by(&digest).await?,
                        digest,
                        kind: "quarantined",
                        detail: "not re-hashed (--no-hash); push it again to repair it".into(),
                    });
                    continue;
                }
                let verdict = self
                    .settle("fsck", &digest, size, verdict, hash, was)
                    .await?;
                match &verdict {
                    Verdict::Sound if was => report.released += 1,
                    Verdict::Bad { .. } if !was => report.quarantined += 1,
                    _ => {}
                }
                if let Verdict::Bad { problem, detail } = verdict {
                    report.problems.push(FsckProblem {
                        affected: self.needed_by(&digest).await?,
                        digest: digest.clone(),
                        kind: problem.as_str(),
                        detail,
                    });
                }
            }
        }
        let (no_blob_row, no_link_row, children) = self
            .metadata
            .read(|tx| {
                Box::pin(async move {
                    Ok((
                        integrity::manifest_blobs_without_rows(tx).await?,
                        integrity::links_without_rows(tx).await?,
                        integrity::missing_children(tx).await?,
                    ))
                })
            })
            .await?;
        let mut add = |rows: Vec<Dangling>, kind: &'static str, detail: &str| {
            for d in rows {
                let affected = match &d.manifest {
                    Some(m) => format!("{}@{m}", d.repository),
                    None => d.repository.clone(),
                };
                match report.problems.last_mut() {
                    Some(p) if p.digest == d.target && p.kind == kind => p.affected.push(affected),
                    _ => report.problems.push(FsckProblem {
                        digest: d.target,
                        kind,
                        detail: detail.to_string(),
                        affected: vec![affected],
                    }),
                }
            }
        };
        add(
            no_blob_row,
            "missing blob row",
            "a manifest references a blob the registry has no record of",
        );
        add(
            no_link_row,
            "missing blob row",
            "a repository links a blob the registry has no record of",
        );
        add(
            children,
            "missing child manifest",
            "an index lists a manifest its repository does not hold",
        );
        self.refresh_quarantined().await?;
        Ok(report)
    }
}
