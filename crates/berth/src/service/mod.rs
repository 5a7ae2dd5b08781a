//! The registry's rules: what a push must prove before it becomes visible, what a pull may read,
//! what a delete removes. No HTTP types here; the `api` module translates.
//!
//! Order of effects on every write path: blob bytes are made durable in storage first, and only
//! then recorded in metadata. A crash in between leaves unreferenced bytes (harmless, reclaimable)
//! but never metadata that points at missing bytes.

mod context;
mod copy;
pub mod gc;
mod integrity;
mod pulls;
pub mod retention;
mod small_blobs;
mod uploads;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oci::manifest;
use oci::{Digest, Reference, RepositoryName, Tag};

use crate::auth::Auth;
use crate::auth::rights::{Action, Rights};
use crate::metadata::{Metadata, MetadataError, NewManifest, Page, Referrer, StoredManifest};
use crate::metadata::{events, queries, quotas};
use crate::storage::{BlobStore, ByteRange, ByteStream, StorageError};

pub use context::{Actor, RequestContext, RequestId};
pub use copy::{CopyError, CopyReport};
pub use integrity::{
    FsckProblem, FsckReport, Pacer, QuarantineReport, QuarantinedBlob, ScrubOptions, Verdict,
};
pub use uploads::{BodyStream, Chunk, UploadState};
use uploads::{HashState, UploadLocks};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("blob unknown to registry")]
    BlobUnknown,
    /// The repository has the blob, but its stored bytes failed an integrity check.
    #[error(
        "the stored bytes of blob {0} failed an integrity check and are not served; pushing the blob again repairs it"
    )]
    BlobQuarantined(Digest),
    #[error("manifest unknown to registry")]
    ManifestUnknown,
    #[error("repository name not known to registry")]
    NameUnknown,
    #[error("blob upload unknown to registry")]
    UploadUnknown,
    #[error("{0}")]
    DigestInvalid(String),
    /// A chunk did not start where the upload ends.
    #[error("chunk starts at {requested} but the upload holds {size} bytes")]
    RangeMismatch { size: u64, requested: u64 },
    #[error("{0}")]
    ManifestInvalid(String),
    /// A management request that is not valid (a bad policy, an unknown parameter).
    #[error("{0}")]
    InvalidRequest(String),
    #[error("manifest is {size} bytes, over the limit of {limit}")]
    ManifestTooLarge { size: usize, limit: usize },
    #[error("blob {0} referenced by the manifest is not in the repository")]
    ManifestBlobUnknown(Digest),
    #[error("manifest {0} referenced by the index is not in the repository")]
    ManifestChildUnknown(Digest),
    /// The request body broke off (client went away, stalled, or sent garbage framing).
    #[error("request body: {0}")]
    Body(String),
    /// A chunk's body went on past the length its Content-Range declared; the bytes within the
    /// range were kept.
    #[error("chunk is longer than its Content-Range; the upload now holds {size} bytes")]
    ChunkOverrun { size: u64 },
    #[error("blob exceeds the limit of {limit} bytes")]
    BlobTooLarge { limit: u64 },
    /// A blob delete refused because a manifest of the repository still references it.
    #[error("blob is referenced by manifest {by}; delete that manifest first")]
    BlobReferenced { by: Digest },
    /// A manifest delete refused because an index of the repository still lists it.
    #[error("manifest is listed by index {by}; delete that index first")]
    ManifestReferenced { by: Digest },
    /// An immutability rule protects the tag (the message names the rule).
    #[error("{0}")]
    TagImmutable(String),
    /// The push would take the namespace over its quota (the message says by how much).
    #[error("{0}")]
    QuotaExceeded(String),
    /// Berth itself is at a configured limit; the client should retry shortly.
    #[error("{0}")]
    Busy(String),
    /// A backend is unreachable, timed out or out of capacity: worth retrying.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// A bug or corrupted state: retrying will not help.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StorageError> for ServiceError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Internal(_) => ServiceError::Internal(e.to_string()),
            StorageError::Io(ref io) if io.kind() == std::io::ErrorKind::InvalidData => {
                ServiceError::Internal(e.to_string())
            }
            _ => ServiceError::Unavailable(e.to_string()),
        }
    }
}

impl From<MetadataError> for ServiceError {
    fn from(e: MetadataError) -> Self {
        match e {
            MetadataError::MissingBlob(d) => ServiceError::ManifestBlobUnknown(d),
            MetadataError::MissingManifest(d) => ServiceError::ManifestChildUnknown(d),
            MetadataError::BlobReferenced { by } => ServiceError::BlobReferenced { by },
            MetadataError::ManifestReferenced { by } => ServiceError::ManifestReferenced { by },
            e @ MetadataError::SizeMismatch { .. } => ServiceError::ManifestInvalid(e.to_string()),
            e @ MetadataError::TagImmutable { .. } => ServiceError::TagImmutable(e.to_string()),
            e @ MetadataError::QuotaExceeded { .. } => ServiceError::QuotaExceeded(e.to_string()),
            e @ (MetadataError::BlobDeleting(_) | MetadataError::Unavailable(_)) => {
                ServiceError::Unavailable(e.to_string())
            }
            e @ MetadataError::Internal(_) => ServiceError::Internal(e.to_string()),
        }
    }
}

pub struct RegistryOptions {
    pub max_manifest_bytes: usize,
    pub upload_idle_timeout: Duration,
    /// The largest blob an upload may grow to; more gets 413.
    pub max_blob_bytes: u64,
    /// Most manifest bytes held in memory at once across all pushes in flight.
    pub max_buffered_manifest_bytes: usize,
    /// Record one manifest GET in this many as a `manifest.pulled` event; 0: none.
    pub pull_events_every: u64,
    /// Grace, trash and untagged periods for deletes and GC.
    pub lifecycle: gc::Lifecycle,
    /// Where the server's metrics are recorded (the backends record theirs when they are on).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Bytes of verified small-blob copies kept in memory (see [`small_blobs`]); 0: none.
    pub blob_cache_bytes: u64,
}

/// How long a manifest push waits for room in the manifest buffer before it is told to come
/// back later (429).
const MANIFEST_BUFFER_WAIT: Duration = Duration::from_secs(10);

/// Room reserved in the manifest buffer; released when dropped.
pub struct ManifestBuffer {
    _permit: tokio::sync::OwnedSemaphorePermit,
}

pub struct Registry {
    auth: Arc<Auth>,
    blobs: Arc<dyn BlobStore>,
    metadata: Metadata,
    options: RegistryOptions,
    /// Hash state of each upload at its current size, so an append continues hashing where the
    /// last one stopped. Lost on restart; rebuilt by re-reading the upload.
    hash_states: Mutex<HashMap<String, HashState>>,
    /// Serialises writers of one upload: a chunk must see the size the previous chunk left.
    upload_locks: Arc<UploadLocks>,
    /// One permit per byte of manifest body that may be buffered at once.
    manifest_buffer: Arc<tokio::sync::Semaphore>,
    /// Manifest GETs so far, for sampling pull events.
    pulls: std::sync::atomic::AtomicU64,
    /// The integrity scrub's counters and gauges.
    integrity: integrity::IntegrityMetrics,
    /// Pulls not yet written to metadata.
    pull_times: pulls::PullTimes,
    /// The runtime GC and the scrub run on while `serve` gives them one of their own (see
    /// [`Registry::lifecycle_on`]).
    lifecycle_runtime: Mutex<Option<tokio::runtime::Handle>>,
    /// Verified copies of small blobs.
    small_blobs: small_blobs::SmallBlobs,
}

/// A blob ready to stream: its total size, the part being sent, and the bytes.
pub struct BlobRead {
    pub size: u64,
    pub range: Option<ByteRange>,
    pub body: BlobBody,
}

/// The bytes of a blob being read: whole, from memory (a small blob), or streamed from the
/// store.
pub enum BlobBody {
    Whole(bytes::Bytes),
    Stream(ByteStream),
}

impl BlobBody {
    pub fn into_stream(self) -> ByteStream {
        match self {
            BlobBody::Whole(bytes) => Box::pin(futures_util::stream::once(async { Ok(bytes) })),
            BlobBody::Stream(stream) => stream,
        }
    }
}

/// What a client may ask of a blob's bytes, already parsed from the Range header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// `bytes=start-end` (end inclusive) or `bytes=start-`.
    From { start: u64, end: Option<u64> },
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

/// The range cannot be served from a blob of this size.
#[derive(Debug)]
pub struct Unsatisfiable {
    pub size: u64,
}

impl RangeRequest {
    pub fn resolve(self, size: u64) -> Result<ByteRange, Unsatisfiable> {
        let (start, end) = match self {
            RangeRequest::From { start, end } => {
                (start, end.unwrap_or(u64::MAX).min(size.saturating_sub(1)))
            }
            RangeRequest::Suffix(0) => return Err(Unsatisfiable { size }),
            RangeRequest::Suffix(n) => (size.saturating_sub(n), size.saturating_sub(1)),
        };
        if size == 0 || start >= size || end < start {
            return Err(Unsatisfiable { size });
        }
        Ok(ByteRange {
            start,
            len: end - start + 1,
        })
    }
}

/// Repository names read at once while filtering the catalog by what the caller may see.
const CATALOG_SCAN_BATCH: usize = 1000;

/// The most entries one page of the tags list or catalog holds; a larger `n` is cut to it.
pub const MAX_PAGE_SIZE: usize = 10_000;

/// A page of a listing and whether more follow.
pub struct Listing {
    pub items: Vec<String>,
    pub more: bool,
}

/// What [`Registry::probe`] found: each backend's failure, if any.
#[derive(Debug)]
pub struct Probe {
    pub metadata: Result<(), String>,
    pub storage: Result<(), String>,
}

pub struct PushedManifest {
    pub digest: Digest,
    pub subject: Option<Digest>,
    /// Every tag now pointing at the manifest.
    pub tags: Vec<Tag>,
}

/// What a manifest push asks for beyond its reference.
#[derive(Debug, Default)]
pub struct ManifestPut {
    /// Tags to point at the manifest besides the reference (`?tag=`, repeatable).
    pub tags: Vec<Tag>,
    /// The digest, in the algorithm the client wants, when pushing by tag (`?digest=`).
    pub digest: Option<Digest>,
}

/// Links a blob to a repository, confirming in the same transaction that its bytes are in the
/// store. GC deletes a blob's bytes after marking its row `deleting` and forgets the row after
/// that; a commit that found the bytes already there (and kept them) may come to link once the
/// row is gone and the bytes with it. Inside the link's transaction GC cannot start deleting
/// the blob (the row is locked or uncommitted, and a marked row refuses the link), so bytes
/// seen here stay; bytes missing here mean nothing is linked and the client retries (503).
pub(crate) async fn link_confirmed(
    tx: &mut crate::metadata::Tx<'_>,
    blobs: &dyn BlobStore,
    repo: &RepositoryName,
    digest: &Digest,
    size: u64,
) -> Result<(), MetadataError> {
    queries::link_blob(tx, repo, digest, size).await?;
    confirm_bytes(blobs, digest).await
}

/// The second half of [`link_confirmed`], for a transaction that linked the blob otherwise
/// (`queries::finish_upload`): bytes missing refuse the link.
pub(crate) async fn confirm_bytes(
    blobs: &dyn BlobStore,
    digest: &Digest,
) -> Result<(), MetadataError> {
    match blobs.stat(digest).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(MetadataError::BlobDeleting(digest.clone())),
        Err(e) => Err(MetadataError::Unavailable(Box::new(e))),
    }
}

pub(crate) fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Registry {
    pub fn new(
        auth: Arc<Auth>,
        blobs: Arc<dyn BlobStore>,
        metadata: Metadata,
        options: RegistryOptions,
    ) -> Registry {
        let manifest_buffer = Arc::new(tokio::sync::Semaphore::new(
            options
                .max_buffered_manifest_bytes
                .min(tokio::sync::Semaphore::MAX_PERMITS),
        ));
        let integrity = integrity::IntegrityMetrics::default();
        integrity.register(&options.metrics);
        options.metrics.register(
            "berth_events_dropped",
            "Queued events (sampled pulls) dropped because the event log's queue was full",
            auth.recorder().dropped(),
        );
        Registry {
            small_blobs: small_blobs::SmallBlobs::new(options.blob_cache_bytes),
            integrity,
            auth,
            manifest_buffer,
            blobs,
            metadata,
            options,
            hash_states: Mutex::new(HashMap::new()),
            upload_locks: Arc::new(UploadLocks::default()),
            pulls: std::sync::atomic::AtomicU64::new(0),
            pull_times: pulls::PullTimes::default(),
            lifecycle_runtime: Mutex::new(None),
        }
    }

    /// Runs GC and the scrub from now on on `runtime`, one with a thread of its own (`None`:
    /// on the caller's). SQLite statements run inline on whatever thread polls them (see
    /// `metadata::db`), so a GC run on the server's runtime would hold one of its request
    /// threads for as long as each statement lasts.
    pub fn lifecycle_on(&self, runtime: Option<tokio::runtime::Handle>) {
        *self
            .lifecycle_runtime
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = runtime;
    }

    /// Spawns `job` on the lifecycle runtime if there is one, else on the current runtime.
    pub(crate) fn spawn_lifecycle<F>(&self, job: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let runtime = self
            .lifecycle_runtime
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match runtime {
            Some(runtime) => runtime.spawn(job),
            None => tokio::spawn(job),
        }
    }

    /// Who may do what; the API asks it before calling the registry.
    pub fn auth(&self) -> &Arc<Auth> {
        &self.auth
    }

    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.options.metrics
    }

    /// The readiness probe: a trivial metadata statement and a stat of a blob nobody holds,
    /// at once, each within `budget`. Each part is `Err` with what went wrong.
    pub async fn probe(&self, budget: Duration) -> Probe {
        let timed_out = || format!("no answer within {} s", budget.as_secs_f64());
        let metadata = async {
            match tokio::time::timeout(budget, self.metadata.ping()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(timed_out()),
            }
        };
        let nobody = Digest::sha256_of(b"berth readiness probe");
        let storage = async {
            match tokio::time::timeout(budget, self.blobs.stat(&nobody)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(timed_out()),
            }
        };
        let (metadata, storage) = tokio::join!(metadata, storage);
        Probe { metadata, storage }
    }

    /// Bytes of every blob held, each counted once (a full scan: cache it).
    pub async fn stored_blob_bytes(&self) -> Result<u64, ServiceError> {
        Ok(self.metadata.stored_blob_bytes().await?)
    }

    /// Each namespace's usage in bytes, as quotas count it (one row per namespace).
    pub async fn namespace_usage(&self) -> Result<Vec<(String, u64)>, ServiceError> {
        let quotas = self
            .metadata
            .read(|tx| Box::pin(quotas::quotas(tx)))
            .await?;
        Ok(quotas
            .into_iter()
            .map(|q| (q.namespace, q.usage_bytes))
            .collect())
    }

    pub fn max_manifest_bytes(&self) -> usize {
        self.options.max_manifest_bytes
    }

    /// Reserves room to buffer a manifest body of up to `len` bytes (a body without a known
    /// length reserves the largest a manifest may be), so that many stalled pushes cannot hold
    /// more than `max_buffered_manifest_bytes` between them. Whole or nothing: a push never
    /// holds part of the buffer while waiting for the rest.
    pub async fn reserve_manifest_buffer(
        &self,
        len: Option<usize>,
    ) -> Result<ManifestBuffer, ServiceError> {
        let want = len
            .unwrap_or(self.options.max_manifest_bytes)
            .min(self.options.max_manifest_bytes)
            .max(1);
        let want = u32::try_from(want).unwrap_or(u32::MAX);
        let acquire = self.manifest_buffer.clone().acquire_many_owned(want);
        match tokio::time::timeout(MANIFEST_BUFFER_WAIT, acquire).await {
            Ok(Ok(permit)) => Ok(ManifestBuffer { _permit: permit }),
            Ok(Err(closed)) => Err(ServiceError::Internal(closed.to_string())),
            Err(_) => Err(ServiceError::Busy(
                "too many manifest pushes in flight; retry shortly".into(),
            )),
        }
    }

    /// Size of a blob the repository may read.
    pub async fn stat_blob(
        &self,
        _ctx: &RequestContext,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<u64, ServiceError> {
        match self.metadata.linked_blob(repo, digest).await? {
            None => Err(ServiceError::BlobUnknown),
            Some(b) if b.quarantined => Err(ServiceError::BlobQuarantined(digest.clone())),
            Some(b) => Ok(b.size),
        }
    }

    /// Where to send a client for the blob's bytes instead of serving them (a presigned URL),
    /// for stores configured to redirect. Checks the repository may read the blob first.
    pub async fn blob_redirect(
        &self,
        _ctx: &RequestContext,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<Option<String>, ServiceError> {
        if !self.blobs.redirects_gets() {
            return Ok(None);
        }
        self.stat_blob(_ctx, repo, digest).await?;
        Ok(self.blobs.redirect_url(digest).await?)
    }

    /// Opens a blob (or a range of it) for streaming. `Err(Ok(..))` is an unsatisfiable range.
    pub async fn read_blob(
        &self,
        _ctx: &RequestContext,
        repo: &RepositoryName,
        digest: &Digest,
        range: Option<RangeRequest>,
    ) -> Result<Result<BlobRead, Unsatisfiable>, ServiceError> {
        let size = self.stat_blob(_ctx, repo, digest).await?;
        let range = match range.map(|r| r.resolve(size)).transpose() {
            Ok(r) => r,
            Err(unsatisfiable) => return Ok(Err(unsatisfiable)),
        };
        if self.small_blobs.holds(size) {
            let mut bytes = self.small_blob(digest, size).await?;
            if let Some(r) = &range {
                bytes = bytes.slice(r.start as usize..(r.start + r.len) as usize);
            }
            let body = BlobBody::Whole(bytes);
            return Ok(Ok(BlobRead { size, range, body }));
        }
        let body = match self.blobs.read(digest, range).await {
            Ok(b) => b,
            // Metadata says yes but the bytes are gone: report it as the client would see it.
            Err(StorageError::NotFound) => return Err(ServiceError::BlobUnknown),
            Err(e) => return Err(e.into()),
        };
        Ok(Ok(BlobRead {
            size,
            range,
            body: BlobBody::Stream(body),
        }))
    }

    /// Removes the blob from the repository. Its bytes stay until garbage collection, since other
    /// repositories may share them.
    pub async fn delete_blob(
        &self,
        ctx: &RequestContext,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<(), ServiceError> {
        let event = &ctx.event("blob.deleted", repo, Some(digest), &[], None);
        let unlinked = self
            .metadata
            .write(|tx| {
                Box::pin(async move {
                    let unlinked = queries::unlink_blob(tx, repo, digest).await?;
                    if unlinked {
                        events::append(tx, event).await?;
                    }
                    Ok(unlinked)
                })
            })
            .await?;
        if !unlinked {
            return Err(ServiceError::BlobUnknown);
        }
        ctx.log_change("blob deleted", repo, digest, &[]);
        Ok(())
    }

    /// Cross-repository mount: links a blob `from` may read into `repo`. `None` when `from`
    /// does not have it, or the caller may not pull from `from`, in which case the caller
    /// falls back to an ordinary upload (and learns nothing about `from`).
    pub async fn mount_blob(
        &self,
        ctx: &RequestContext,
        repo: &RepositoryName,
        from: &RepositoryName,
        digest: &Digest,
    ) -> Result<Option<u64>, ServiceError> {
        if !ctx.may(from.as_str(), Action::Pull) {
            return Ok(None);
        }
        let Some(size) = self.metadata.blob_in_repository(from, digest).await? else {
            return Ok(None);
        };
        if self.blobs.stat(digest).await?.is_none() {
            return Ok(None);
        }
        self.link_mounted(ctx, repo, digest, size, Some(from))
            .await?;
        Ok(Some(size))
    }

    /// Links a mounted blob and records the mount, in one transaction.
    async fn link_mounted(
        &self,
        ctx: &RequestContext,
        repo: &RepositoryName,
        digest: &Digest,
        size: u64,
        from: Option<&RepositoryName>,
    ) -> Result<(), ServiceError> {
        let mut event = ctx.event("blob.mounted", repo, Some(digest), &[], Some(size));
        event.detail = from.map(|f| serde_json::json!({ "from": f.as_str() }).to_string());
        let event = &event;
        self.metadata
            .write(|tx| {
                Box::pin(async move {
                    link_confirmed(tx, &*self.blobs, repo, digest, size).await?;
                    events::append(tx, event).await?;
                    Ok(())
                })
            })
            .await?;
        ctx.log_change("blob mounted", repo, digest, &[]);
        Ok(())
    }

    /// Mount without `from` (the spec's automatic content discovery): links the blob if the
    /// caller may read it in some repository. Every committed blob was verified against its
    /// digest when it was stored, so holding its bytes proves it. `None` sends the client to an
    /// ordinary upload, which is also what a caller who may read it nowhere gets: the answer
    /// must not tell them the registry holds it.
    pub async fn mount_known_blob(
        &self,
        ctx: &RequestContext,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<Option<u64>, ServiceError> {
        if let Some(size) = self.metadata.blob_in_repository(repo, digest).await? {
            return Ok(Some(size));
        }
        if !ctx.principal.rights.is_all() {
            let holders = self.metadata.repositories_with_blob(digest).await?;
            if !holders.iter().any(|r| ctx.may(r, Action::Pull)) {
                return Ok(None);
            }
        }
        // A quarantined blob's bytes are not proof of anything: the client must push it.
        if self.is_quarantined(digest).await? {
            return Ok(None);
        }
        let Some(size) = self.blobs.stat(digest).await? else {
            return Ok(None);
        };
        self.link_mounted(ctx, repo, digest, size, None).await?;
        Ok(Some(size))
    }

    /// Stores a manifest pushed to `reference`, and points every tag in `options.tags` (and
    /// the reference itself, if a tag) at it. `options.digest` asks for the manifest's digest
    /// in a given algorithm (regctl's `?digest=` on a tag push) and is verified like a digest
    /// reference.
    pub async fn put_manifest(
        &self,
        ctx: &RequestContext,
        repo: &RepositoryName,
        reference: &Reference,
        content_type: Option<&str>,
        bytes: Vec<u8>,
        options: ManifestPut,
    ) -> Result<PushedManifest, ServiceError> {
        if bytes.len() > self.options.max_manifest_bytes {
            return Err(ServiceError::ManifestTooLarge {
                size: bytes.len(),
                limit: self.options.max_manifest_bytes,
            });
        }
        let parsed = manifest::parse(content_type, &bytes)
            .map_err(|e| ServiceError::ManifestInvalid(e.to_string()))?;
        let mut tags = options.tags;
        let expected = match reference {
            Reference::Digest(d) => Some(d),
            Reference::Tag(tag) => {
                tags.insert(0, tag.clone());
                options.digest.as_ref()
            }
        };
        if let (Reference::Digest(d), Some(other)) = (reference, &options.digest)
            && d != other
        {
            return Err(ServiceError::DigestInvalid(format!(
                "the digest parameter {other} disagrees with the reference {d}"
            )));
        }
        let digest = match expected {
            Some(expected) => {
                let actual = Digest::of(expected.algorithm(), &bytes);
                if &actual != expected {
                    self.options.metrics.integrity_error("manifest");
                    return Err(ServiceError::DigestInvalid(format!(
                        "manifest digest is {actual}, not {expected}"
                    )));
                }
                actual
            }
            None => Digest::sha256_of(&bytes),
        };
        // The image's size as pushed: the manifest and every size its descriptors declare.
        let image_bytes = parsed
            .declared_sizes
            .iter()
            .fold(bytes.len() as u64, |sum, (_, size)| {
                sum.saturating_add(*size)
            });
        let subject = parsed.subject.clone();
        // Declared sizes are checked in the put's transaction, where the stored sizes are read
        // anyway.
        let record = NewManifest::from_parsed(digest.clone(), bytes, parsed);
        let mut distinct = Vec::with_capacity(tags.len());
        for tag in tags {
            if !distinct.contains(&tag) {
                distinct.push(tag);
            }
        }
        let tags = distinct;
        // The manifest, all its tags and the event commit together.
        let tag_names: Vec<String> = tags.iter().map(|t| t.as_str().to_string()).collect();
        let mut event = ctx.event(
            "manifest.pushed",
            repo,
            Some(&digest),
            &tag_names,
            Some(record.bytes.len() as u64),
        );
        event.detail = Some(serde_json::json!({ "media_type": record.media_type }).to_string());
        let (record_ref, tags_ref, event) = (&record, &tags, &event);
        self.metadata
            .write(|tx| {
                Box::pin(async move {
                    let charged = queries::put_manifest(tx, repo, record_ref, tags_ref).await?;
                    // After the charge, whose update locked the namespace's usage row: exact.
                    quotas::check_limit(tx, repo.namespace(), charged).await?;
                    events::append(tx, event).await?;
                    Ok(())
                })
            })
            .await?;
        ctx.log_change("manifest pushed", repo, &digest, &tags);
        self.options.metrics.pushed_image(image_bytes);
        Ok(PushedManifest {
            digest,
            subject,
            tags,
        })
    }

    pub async fn get_manifest(
        &self,
        _ctx: &RequestContext,
        repo: &RepositoryName,
        reference: &Reference,
    ) -> Result<StoredManifest, ServiceError> {
        let found = match reference {
            Reference::Tag(tag) => self.metadata.manifest_by_tag(repo, tag).await?,
            Reference::Digest(digest) => self.metadata.manifest_by_digest(repo, digest).await?,
        };
        found.ok_or(ServiceError::ManifestUnknown)
    }

    /// A pull, counted at its manifest GET: noted for the manifest's last pull time (see
    /// `pulls`), and recorded as a `manifest.pulled` event when `pull_events_every` says so.
    /// Pulls are the bulk of the traffic, so neither is written before the pull is answered
    /// (see `Auth::record_later`).
    pub fn record_pull(
        &self,
        ctx: &RequestContext,
        repo: &RepositoryName,
        reference: &Reference,
        manifest: &StoredManifest,
    ) {
        self.pull_times.note(repo.as_str(), &manifest.digest);
        let every = self.options.pull_events_every;
        let n = self
            .pulls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if every == 0 || !n.is_multiple_of(every) {
            return;
        }
        let tags = match reference {
            Reference::Tag(tag) => vec![tag.as_str().to_string()],
            Reference::Digest(_) => Vec::new(),
        };
        let size = Some(manifest.bytes.len() as u64);
        let event = ctx.event("manifest.pulled", repo, Some(&manifest.digest), &tags, size);
        self.auth.record_later(event);
    }

    /// By digest: the manifest, all its tags and its referrers. By tag: only the tag. Either
    /// goes to the trash for `trash_retention_secs`, from where it can be restored.
    pub async fn delete_manifest(
        &self,
        ctx: &RequestContext,
        repo: &RepositoryName,
        reference: &Reference,
    ) -> Result<(), ServiceError> {
        if !self.trash_reference(ctx, repo, reference).await? {
            return Err(ServiceError::ManifestUnknown);
        }
        match reference {
            Reference::Tag(tag) => ctx.log_tag_deleted(repo, tag),
            Reference::Digest(digest) => ctx.log_change("manifest deleted", repo, digest, &[]),
        }
        Ok(())
    }

    pub async fn list_tags(
        &self,
        _ctx: &RequestContext,
        repo: &RepositoryName,
        last: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Listing, ServiceError> {
        let page = Page {
            last,
            limit: limit.map(|n| n + 1),
        };
        let mut items = self
            .metadata
            .list_tags(repo, page)
            .await?
            .ok_or(ServiceError::NameUnknown)?;
        Ok(truncate(&mut items, limit))
    }

    /// A page of the repositories `visible` lets the caller pull from.
    pub async fn list_repositories(
        &self,
        _ctx: &RequestContext,
        visible: &Rights,
        last: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Listing, ServiceError> {
        if visible.is_all() {
            let page = Page {
                last,
                limit: limit.map(|n| n + 1),
            };
            let mut items = self.metadata.list_repositories(page).await?;
            return Ok(truncate(&mut items, limit));
        }
        // Filtered page by page until the page is full: a caller who sees few repositories
        // costs a scan of the names, never more than one page of them in memory.
        let want = limit.map_or(usize::MAX, |n| n.saturating_add(1));
        let mut items = Vec::new();
        let mut after = last.map(str::to_owned);
        loop {
            let batch = self
                .metadata
                .list_repositories(Page {
                    last: after.as_deref(),
                    limit: Some(CATALOG_SCAN_BATCH),
                })
                .await?;
            let exhausted = batch.len() < CATALOG_SCAN_BATCH;
            after = batch.last().cloned();
            items.extend(batch.into_iter().filter(|r| visible.may(r, Action::Pull)));
            if exhausted || items.len() >= want {
                break;
            }
        }
        items.truncate(want);
        Ok(truncate(&mut items, limit))
    }

    /// Manifests whose subject is `subject`, optionally only those of one artifact type.
    pub async fn referrers(
        &self,
        _ctx: &RequestContext,
        repo: &RepositoryName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Referrer>, ServiceError> {
        let mut referrers = self.metadata.referrers(repo, subject).await?;
        if let Some(wanted) = artifact_type {
            referrers.retain(|r| r.artifact_type.as_deref() == Some(wanted));
        }
        Ok(referrers)
    }
}

/// Listings ask the store for one more than the page size to learn whether more follow.
fn truncate(items: &mut Vec<String>, limit: Option<usize>) -> Listing {
    let more = limit.is_some_and(|n| items.len() > n);
    if let Some(n) = limit {
        items.truncate(n);
    }
    Listing {
        items: std::mem::take(items),
        more,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_resolve_against_the_blob_size() {
        let cases = [
            (
                RangeRequest::From {
                    start: 0,
                    end: Some(9),
                },
                100,
                Some((0, 10)),
            ),
            (
                RangeRequest::From {
                    start: 90,
                    end: None,
                },
                100,
                Some((90, 10)),
            ),
            (
                RangeRequest::From {
                    start: 90,
                    end: Some(500),
                },
                100,
                Some((90, 10)),
            ),
            (RangeRequest::Suffix(10), 100, Some((90, 10))),
            (RangeRequest::Suffix(500), 100, Some((0, 100))),
            (RangeRequest::Suffix(0), 100, None),
            (
                RangeRequest::From {
                    start: 100,
                    end: None,
                },
                100,
                None,
            ),
            (
                RangeRequest::From {
                    start: 5,
                    end: Some(4),
                },
                100,
                None,
            ),
            (
                RangeRequest::From {
                    start: 0,
                    end: None,
                },
                0,
                None,
            ),
        ];
        for (req, size, expected) in cases {
            let got = req.resolve(size).ok().map(|r| (r.start, r.len));
            assert_eq!(got, expected, "{req:?} of {size}");
        }
    }
}
