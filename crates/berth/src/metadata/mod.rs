//! The source of truth for everything but blob bytes: repositories, which blobs each may read,
//! manifests (their bytes and every reference they make), tags, subjects, upload sessions.
//!
//! Every reference a manifest makes is recorded as a row so that garbage collection can later
//! find what is unreferenced with a query, online, instead of walking storage read-only.
//!
//! One SQL implementation over two engines: [`db`] is the driver layer (SQLite or PostgreSQL
//! behind one [`db::Tx`]), [`queries`] the registry's statements written once, [`schema`] the
//! migrations. [`Metadata`] is what the rest of the crate holds: a convenience method per
//! operation, each one transaction, and [`Metadata::write`] / [`Metadata::read`] to compose
//! several [`queries`] into one.

pub mod access;
pub mod cache;
pub mod db;
pub mod events;
pub mod gc;
pub mod immutability;
pub mod integrity;
pub mod queries;
pub mod quotas;
pub mod retention;
pub mod schema;
pub mod trash;
pub mod webhooks;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use oci::{Digest, RepositoryName, Tag};

use crate::metrics::{BackendFailure, BackendOp, Metrics};
use cache::{Answer, Lookup, ReadCache};

pub use db::{Dialect, PoolOptions, Tx};

/// The typed cause of an [`MetadataError::Unavailable`] or [`MetadataError::Internal`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// A manifest references a blob the repository does not have.
    #[error("blob {0} is not in the repository")]
    MissingBlob(Digest),
    /// An index references a manifest the repository does not have.
    #[error("manifest {0} is not in the repository")]
    MissingManifest(Digest),
    /// A blob may not leave a repository while a manifest there references it.
    #[error("blob is referenced by manifest {by}")]
    BlobReferenced { by: Digest },
    /// A manifest may not be deleted while an index in its repository lists it.
    #[error("manifest is listed by index {by}")]
    ManifestReferenced { by: Digest },
    /// A manifest declares a size for a blob other than the size stored.
    #[error("blob {digest} is {stored} bytes, but the manifest declares {declared}")]
    SizeMismatch {
        digest: Digest,
        declared: u64,
        stored: u64,
    },
    /// A tag an immutability rule protects may not be moved or deleted.
    #[error("tag {tag} is immutable: namespace {namespace} protects tags matching {pattern:?}")]
    TagImmutable {
        tag: String,
        namespace: String,
        pattern: String,
    },
    /// A push would take the namespace over its quota.
    #[error(
        "namespace {namespace} would exceed its quota: {usage} of {limit} bytes used, \
         this push needs {needed} more"
    )]
    QuotaExceeded {
        namespace: String,
        usage: u64,
        limit: u64,
        needed: u64,
    },
    /// Garbage collection is deleting this blob's bytes; it must be uploaded again once done.
    #[error("blob {0} is being garbage collected")]
    BlobDeleting(Digest),
    /// The database cannot be reached or cannot do the work now (connection refused or
    /// closed, timeouts, pool exhausted, busy or locked, disk full, IO errors): 503.
    #[error("metadata store unavailable: {}", Chain(&**.0))]
    Unavailable(#[source] BoxError),
    /// A bug or corruption (constraint violations, malformed SQL, a stored value that does not
    /// parse, a panicked task): 500.
    #[error("metadata store internal error: {}", Chain(&**.0))]
    Internal(#[source] BoxError),
}

impl MetadataError {
    pub fn internal(e: impl Into<BoxError>) -> MetadataError {
        MetadataError::Internal(e.into())
    }
}

/// An error and its causes on one line (tokio-postgres puts the server's message in a source).
struct Chain<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = self.0.to_string();
        let mut source = self.0.source();
        while let Some(s) = source {
            let s_text = s.to_string();
            if !text.contains(&s_text) {
                text.push_str(": ");
                text.push_str(&s_text);
            }
            source = s.source();
        }
        f.write_str(&text)
    }
}

/// A manifest about to be stored, with the references parsed out of it.
#[derive(Debug, Clone)]
pub struct NewManifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Vec<u8>,
    pub blobs: Vec<Digest>,
    /// Sizes the manifest's descriptors declare for some of `blobs`; each is checked against
    /// the stored size in the put's transaction. Empty: nothing checked.
    pub declared_sizes: Vec<(Digest, u64)>,
    pub children: Vec<Digest>,
    pub subject: Option<Digest>,
    pub artifact_type: Option<String>,
    pub annotations: Option<BTreeMap<String, String>>,
}

impl NewManifest {
    /// A stored or trashed manifest's record, as its push made it: the same parse, so a
    /// restore records the same references.
    pub fn parse(
        digest: Digest,
        media_type: Option<&str>,
        bytes: Vec<u8>,
    ) -> Result<NewManifest, oci::manifest::ManifestError> {
        let parsed = oci::manifest::parse(media_type, &bytes)?;
        Ok(NewManifest::from_parsed(digest, bytes, parsed))
    }

    pub fn from_parsed(
        digest: Digest,
        bytes: Vec<u8>,
        parsed: oci::manifest::ParsedManifest,
    ) -> NewManifest {
        NewManifest {
            digest,
            media_type: parsed.media_type,
            bytes,
            blobs: parsed.blobs,
            declared_sizes: parsed.declared_sizes,
            children: parsed.children,
            subject: parsed.subject,
            artifact_type: parsed.artifact_type,
            annotations: parsed.annotations,
        }
    }
}

#[derive(Debug, Clone)]
pub struct StoredManifest {
    pub digest: Digest,
    pub media_type: String,
    /// Shared, so a cached manifest is served without a copy.
    pub bytes: bytes::Bytes,
}

/// A manifest whose subject is some digest, as the referrers API lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct Referrer {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    pub artifact_type: Option<String>,
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UploadSession {
    pub id: String,
    pub repository: RepositoryName,
    /// Seconds since the Unix epoch of the last byte or status change.
    pub updated_at: i64,
    /// The account that opened the upload: only it may continue it, even after the token that
    /// opened it expired. `None` when opened without an account (auth off, or anonymous).
    pub owner: Option<String>,
}

/// One page of a sorted listing.
#[derive(Debug, Clone, Copy)]
pub struct Page<'a> {
    /// Return entries strictly after this one.
    pub last: Option<&'a str>,
    pub limit: Option<usize>,
}

/// The metadata store, cheap to clone.
#[derive(Clone)]
pub struct Metadata {
    db: db::Db,
    /// Where each transaction's latency and failure are recorded, when metrics are on.
    metrics: Option<Arc<Metrics>>,
    /// The hottest reads, kept while nothing commits (SQLite only, see [`cache`]).
    reads: Option<Arc<ReadCache>>,
}

impl Metadata {
    /// Opens (creating if needed) a SQLite database and applies pending migrations.
    pub async fn open_sqlite(path: &Path) -> Result<Metadata, MetadataError> {
        let metadata = Metadata {
            db: db::Db::open_sqlite(path)?,
            metrics: None,
            reads: None,
        };
        schema::migrate(&metadata.db).await?;
        metadata.optimize().await?;
        Ok(metadata)
    }

    /// Keeps up to `bytes` of the hottest reads in memory while nothing commits (see
    /// [`cache`]); SQLite only, and 0 keeps none. Without this call nothing is cached, as
    /// for the commands, whose reads are each made once.
    pub fn with_read_cache(mut self, bytes: u64) -> Metadata {
        self.reads =
            (bytes > 0 && self.db.commit_mark().is_some()).then(|| Arc::new(ReadCache::new(bytes)));
        self
    }

    /// Keeps the query planner's statistics current (see [`db::Db::optimize`]): at open, after
    /// each GC run and periodically from `serve`'s janitor.
    pub async fn optimize(&self) -> Result<(), MetadataError> {
        self.db.optimize().await
    }

    /// Connects to PostgreSQL at `url` (`postgres://USER:PASSWORD@HOST:PORT/DB`, or libpq
    /// key=value pairs) and applies pending migrations. Fails if the database is unreachable.
    pub async fn connect_postgres(
        url: &str,
        options: PoolOptions,
    ) -> Result<Metadata, MetadataError> {
        let metadata = Metadata {
            db: db::Db::connect_postgres(url, options).await?,
            metrics: None,
            reads: None,
        };
        schema::migrate(&metadata.db).await?;
        Ok(metadata)
    }

    pub fn dialect(&self) -> Dialect {
        self.db.dialect()
    }

    /// Returns once a transaction of this process that appended an event has committed (see
    /// [`db::Db::event_committed`]); the webhook worker waits on it besides polling.
    pub async fn event_committed(&self) {
        self.db.event_committed().await
    }

    /// Runs [`queries`] in one transaction, committed if `f` returns `Ok`, rolled back if it
    /// returns `Err`. On PostgreSQL `f` may run again if the transaction lost a deadlock, so it
    /// is `FnMut`: borrow what it needs rather than moving it in.
    pub async fn write<'env, T, F>(&self, f: F) -> Result<T, MetadataError>
    where
        F: for<'a> FnMut(&'a mut Tx<'env>) -> BoxFuture<'a, Result<T, MetadataError>>,
    {
        self.observed(BackendOp::MetadataWrite, self.db.write(f))
            .await
    }

    /// Runs read-only [`queries`]; each statement sees what was committed before it began.
    pub async fn read<'env, T, F>(&self, f: F) -> Result<T, MetadataError>
    where
        F: for<'a> FnOnce(&'a mut Tx<'env>) -> BoxFuture<'a, Result<T, MetadataError>>,
    {
        self.observed(BackendOp::MetadataRead, self.db.read(f))
            .await
    }

    /// Records every transaction from now on (set before the handle is cloned).
    pub fn set_metrics(&mut self, metrics: Arc<Metrics>) {
        self.metrics = Some(metrics);
    }

    async fn observed<T>(
        &self,
        op: BackendOp,
        call: impl std::future::Future<Output = Result<T, MetadataError>>,
    ) -> Result<T, MetadataError> {
        let Some(metrics) = &self.metrics else {
            return call.await;
        };
        let started = tokio::time::Instant::now();
        let result = call.await;
        let failure = match &result {
            Err(MetadataError::Unavailable(cause)) => Some(
                match cause.downcast_ref::<std::io::Error>().map(|e| e.kind()) {
                    Some(std::io::ErrorKind::TimedOut) => BackendFailure::Timeout,
                    _ => BackendFailure::Unavailable,
                },
            ),
            Err(MetadataError::Internal(_)) => Some(BackendFailure::Internal),
            // Domain refusals are answers, not failures of the database.
            _ => None,
        };
        metrics.backend(op, started.elapsed(), failure);
        result
    }

    /// The readiness probe: one statement that reads no table.
    pub async fn ping(&self) -> Result<(), MetadataError> {
        self.observed(
            BackendOp::MetadataPing,
            self.db.read(|tx| Box::pin(queries::ping(tx))),
        )
        .await
    }

    /// Bytes of every blob held, each once (a full scan of the blob table).
    pub async fn stored_blob_bytes(&self) -> Result<u64, MetadataError> {
        self.read(|tx| Box::pin(queries::stored_blob_bytes(tx)))
            .await
    }

    /// The blob as linked into `repo`, with its quarantine flag (one statement: the pull path).
    pub async fn linked_blob(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<Option<queries::LinkedBlob>, MetadataError> {
        let read = || self.read(|tx| Box::pin(queries::linked_blob(tx, repo, digest)));
        let Some((reads, mark)) = self.cached() else {
            return read().await;
        };
        let miss = match reads.linked_blob(mark, repo, digest) {
            Lookup::Hit(Answer::Blob(found)) => return Ok(found),
            Lookup::Hit(_) => return read().await,
            Lookup::Miss(miss) => miss,
        };
        let found = read().await?;
        reads.fill(miss, Answer::Blob(found));
        Ok(found)
    }

    /// The read cache and the database's commit mark now, when reads may be cached.
    fn cached(&self) -> Option<(&ReadCache, db::CommitMark)> {
        let reads = self.reads.as_deref()?;
        Some((reads, self.db.commit_mark()?))
    }

    /// A manifest read through the cache: `lookup` finds it, `read` asks the database.
    async fn manifest_cached(
        &self,
        lookup: impl FnOnce(&ReadCache, db::CommitMark) -> Lookup,
        read: impl AsyncFnOnce() -> Result<Option<StoredManifest>, MetadataError>,
    ) -> Result<Option<StoredManifest>, MetadataError> {
        let Some((reads, mark)) = self.cached() else {
            return read().await;
        };
        let miss = match lookup(reads, mark) {
            Lookup::Hit(Answer::Manifest(found)) => return Ok(found),
            Lookup::Hit(_) => return read().await,
            Lookup::Miss(miss) => miss,
        };
        let found = read().await?;
        reads.fill(miss, Answer::Manifest(found.clone()));
        Ok(found)
    }

    /// The blob's size if `repo` may read it (linked and not quarantined).
    pub async fn blob_in_repository(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<Option<u64>, MetadataError> {
        self.read(|tx| Box::pin(queries::blob_in_repository(tx, repo, digest)))
            .await
    }

    pub async fn repositories_with_blob(
        &self,
        digest: &Digest,
    ) -> Result<Vec<String>, MetadataError> {
        self.read(|tx| Box::pin(queries::repositories_with_blob(tx, digest)))
            .await
    }

    /// Lets `repo` read a committed blob (creating the repository if needed).
    pub async fn link_blob(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
        size: u64,
    ) -> Result<(), MetadataError> {
        self.write(|tx| Box::pin(queries::link_blob(tx, repo, digest, size)))
            .await
    }

    /// Returns false if the repository did not have the blob; refused with
    /// [`MetadataError::BlobReferenced`] while a manifest of the repository references it.
    pub async fn unlink_blob(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<bool, MetadataError> {
        self.write(|tx| Box::pin(queries::unlink_blob(tx, repo, digest)))
            .await
    }

    /// Links the uploaded blob into `repo` and ends upload session `upload_id`, atomically.
    /// `repaired`: the upload's bytes replaced a quarantined blob's, so the quarantine is
    /// lifted and this event (`blob.repaired`) appended in the same transaction.
    pub async fn finish_upload(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
        size: u64,
        upload_id: &str,
        repaired: Option<&events::NewEvent>,
    ) -> Result<(), MetadataError> {
        self.write(|tx| {
            Box::pin(queries::finish_upload(
                tx, repo, digest, size, upload_id, repaired,
            ))
        })
        .await
    }

    pub async fn create_upload(&self, session: &UploadSession) -> Result<(), MetadataError> {
        self.write(|tx| Box::pin(queries::create_upload(tx, session)))
            .await
    }

    pub async fn get_upload(&self, id: &str) -> Result<Option<UploadSession>, MetadataError> {
        self.read(|tx| Box::pin(queries::get_upload(tx, id))).await
    }

    /// Marks the upload active at `now` (coarsely: see [`queries::touch_upload`]).
    /// See [`queries::touch_upload`].
    pub async fn touch_upload(
        &self,
        id: &str,
        now: i64,
        granularity_secs: i64,
    ) -> Result<(), MetadataError> {
        self.write(|tx| Box::pin(queries::touch_upload(tx, id, now, granularity_secs)))
            .await
    }

    pub async fn delete_upload(&self, id: &str) -> Result<(), MetadataError> {
        self.write(|tx| Box::pin(queries::delete_upload(tx, id)))
            .await
            .map(drop)
    }

    /// Uploads last touched before `before`.
    pub async fn stale_uploads(&self, before: i64) -> Result<Vec<String>, MetadataError> {
        self.read(|tx| Box::pin(queries::stale_uploads(tx, before)))
            .await
    }

    /// Every upload session's id, sorted.
    pub async fn upload_ids(&self) -> Result<Vec<String>, MetadataError> {
        self.read(|tx| Box::pin(queries::upload_ids(tx))).await
    }

    /// Stores a manifest and, atomically with it, points `tag` at it. Fails without changing
    /// anything if a referenced blob or child manifest is missing from the repository, or a
    /// declared blob size differs from the stored one.
    pub async fn put_manifest(
        &self,
        repo: &RepositoryName,
        manifest: &NewManifest,
        tag: Option<&Tag>,
    ) -> Result<(), MetadataError> {
        let tags = tag.map_or(&[][..], std::slice::from_ref);
        self.put_manifest_tagged(repo, manifest, tags).await
    }

    /// Stores a manifest and points every tag in `tags` at it, in one transaction.
    pub async fn put_manifest_tagged(
        &self,
        repo: &RepositoryName,
        manifest: &NewManifest,
        tags: &[Tag],
    ) -> Result<(), MetadataError> {
        self.write(|tx| Box::pin(queries::put_manifest(tx, repo, manifest, tags)))
            .await
            .map(drop)
    }

    pub async fn manifest_by_digest(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<Option<StoredManifest>, MetadataError> {
        self.manifest_cached(
            |reads, mark| reads.manifest_by_digest(mark, repo, digest),
            async || {
                self.read(|tx| Box::pin(queries::manifest_by_digest(tx, repo, digest)))
                    .await
            },
        )
        .await
    }

    pub async fn manifest_by_tag(
        &self,
        repo: &RepositoryName,
        tag: &Tag,
    ) -> Result<Option<StoredManifest>, MetadataError> {
        self.manifest_cached(
            |reads, mark| reads.manifest_by_tag(mark, repo, tag),
            async || {
                self.read(|tx| Box::pin(queries::manifest_by_tag(tx, repo, tag)))
                    .await
            },
        )
        .await
    }

    /// Removes the manifest and every tag pointing at it. False if it was not there; refused
    /// with [`MetadataError::ManifestReferenced`] while an index of the repository lists it.
    pub async fn delete_manifest(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<bool, MetadataError> {
        self.write(|tx| Box::pin(queries::delete_manifest(tx, repo, digest)))
            .await
    }

    /// False if the tag was not there.
    pub async fn delete_tag(
        &self,
        repo: &RepositoryName,
        tag: &Tag,
    ) -> Result<bool, MetadataError> {
        self.write(|tx| Box::pin(queries::delete_tag(tx, repo, tag)))
            .await
    }

    /// Tags sorted lexically (by byte), or `None` if the repository is unknown.
    pub async fn list_tags(
        &self,
        repo: &RepositoryName,
        page: Page<'_>,
    ) -> Result<Option<Vec<String>>, MetadataError> {
        let read = || self.read(|tx| Box::pin(queries::list_tags(tx, repo, page)));
        let Some((reads, mark)) = self.cached() else {
            return read().await;
        };
        let miss = match reads.tags(mark, repo, page) {
            Lookup::Hit(Answer::Tags(found)) => return Ok(found.map(|t| t.as_ref().clone())),
            Lookup::Hit(_) => return read().await,
            Lookup::Miss(miss) => miss,
        };
        let found = read().await?;
        reads.fill(miss, Answer::Tags(found.clone().map(Arc::new)));
        Ok(found)
    }

    /// Repositories holding at least one manifest, sorted.
    pub async fn list_repositories(&self, page: Page<'_>) -> Result<Vec<String>, MetadataError> {
        self.read(|tx| Box::pin(queries::list_repositories(tx, page)))
            .await
    }

    /// Every repository, including those holding only blobs, sorted (for copying a registry).
    pub async fn all_repositories(&self) -> Result<Vec<String>, MetadataError> {
        self.read(|tx| Box::pin(queries::all_repositories(tx)))
            .await
    }

    /// Every blob the repository may read, with its size.
    pub async fn repository_blobs(
        &self,
        repo: &RepositoryName,
    ) -> Result<Vec<(Digest, u64)>, MetadataError> {
        self.read(|tx| Box::pin(queries::repository_blobs(tx, repo)))
            .await
    }

    /// Every manifest of the repository, oldest first (so an index follows its children).
    pub async fn repository_manifests(
        &self,
        repo: &RepositoryName,
    ) -> Result<Vec<StoredManifest>, MetadataError> {
        self.read(|tx| Box::pin(queries::repository_manifests(tx, repo)))
            .await
    }

    /// Every tag of the repository with the digest it points at, sorted by tag.
    pub async fn repository_tags(
        &self,
        repo: &RepositoryName,
    ) -> Result<Vec<(String, Digest)>, MetadataError> {
        self.read(|tx| Box::pin(queries::repository_tags(tx, repo)))
            .await
    }

    /// Manifests in `repo` whose subject is `subject`, oldest first.
    pub async fn referrers(
        &self,
        repo: &RepositoryName,
        subject: &Digest,
    ) -> Result<Vec<Referrer>, MetadataError> {
        self.read(|tx| Box::pin(queries::referrers(tx, repo, subject)))
            .await
    }
}

#[cfg(test)]
pub(crate) mod tests;
