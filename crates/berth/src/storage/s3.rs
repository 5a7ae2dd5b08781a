//! Blobs in an S3-compatible object store (AWS S3, Garage, MinIO, ...), through `object_store`.
//!
//! Layout under the configured prefix:
//! - `blobs/<algorithm>/<hex>`: committed blobs. An object appears there whole or not at all: by
//!   a server-side copy, a single PUT, or the completion of a multipart upload, each of which S3
//!   makes visible atomically.
//! - `uploads/<id>/<offset, 20 digits>-<writer>`: one *part object* per append, named by the
//!   offset it starts at and a random id of the writer. `create_upload` writes an empty part at
//!   offset 0 as a marker: the upload exists while its marker does, so an empty upload is told
//!   apart from an unknown one, and parts left without a marker (a delete that failed half-way,
//!   an append that raced a cancel) belong to no upload until upload expiry removes them.
//!
//! Two nodes may append at the same offset at once (a client retrying on another node). S3
//! has no create-only PUT everywhere (Garage lacks `If-None-Match`), so parts are never
//! overwritten instead: each writer's key is its own, and after writing, the writer lists the
//! upload and withdraws its part (deleting it, answering 416) if another part overlaps it or
//! its part does not follow the others, or (answering unknown) if the marker is gone. Of two
//! racing writers at least one sees the other (lists are strongly consistent), so at most one
//! part per offset survives, and a part that survived is never removed by another writer: the
//! running hash a node keeps for the parts it wrote stays true of the bytes a commit will join.
//! Because that check after the write decides, the check before it may use a listing this
//! process made a moment earlier ([`SeenParts`]) instead of listing again.
//!
//! Everything about an upload lives in the bucket, so any process sharing it can continue any
//! upload: its size is the sum of its parts (one list request), an append writes the next part,
//! and commit turns the parts into the blob (one part: a server-side copy; several: one PUT of
//! them joined if they fit in [`PART_SIZE`], else streamed into a multipart upload) and then
//! deletes them, all in one DeleteObjects request. A crash at any instant leaves either the old
//! upload, the upload plus one complete new part, or the committed blob plus leftover parts that
//! the upload's expiry deletes; never a partial blob or a partial part.
//!
//! Requests per push, as the service calls the store (`requests_per_push` keeps the count):
//! create 1 (PUT); each append 3 (LIST, PUT, LIST); commit of one part 3 (HEAD, COPY, DELETE),
//! or 2 when the blob is already stored; cancel 2 (LIST, DELETE).
//!
//! Memory: an append buffers up to [`PART_SIZE`] before it either PUTs the part whole or starts a
//! multipart upload, with at most [`PARTS_IN_FLIGHT`] parts in flight; reads stream. Every request
//! to the store takes a slot of one semaphore (`max_concurrent_requests`); a streamed read holds
//! its slot until the stream ends.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt, stream};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::limit::LimitStore;
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload,
    PutPayloadMut, RetryConfig, WriteMultipart,
};
use oci::Digest;

use super::{
    BlobStore, ByteRange, ByteStream, Piece, StorageError, StoredBlob, StoredUpload, UploadExtent,
    UploadWriter, WriteGuard,
};

/// Size of each part of a multipart upload, and how much an append buffers before starting one.
/// S3 wants parts of at least 5 MiB and at most 10,000 of them: 8 MiB parts allow a single
/// append of up to 78 GiB.
pub const PART_SIZE: usize = 8 * 1024 * 1024;
/// A quiet sender's buffer becomes a part of its own from this size (see
/// `S3UploadWriter::flush`).
pub const QUIET_PART_MIN: usize = 256 * 1024;
/// Parts of one multipart upload sent at once.
pub const PARTS_IN_FLIGHT: usize = 2;
/// S3 refuses server-side copies of objects larger than 5 GiB; larger single parts are streamed.
const MAX_COPY_BYTES: u64 = 5 * 1024 * 1024 * 1024;
/// Longest silence of the store in the middle of a body (see `S3BlobStore::open`).
const BODY_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a redirect to a presigned URL stays valid.
const PRESIGNED_URL_TTL: Duration = Duration::from_secs(20 * 60);

/// How to reach the store. Unset values fall back to the standard `AWS_*` environment variables
/// (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, ...).
#[derive(Clone, PartialEq, Eq)]
pub struct S3Settings {
    /// e.g. `http://127.0.0.1:3900`; unset means AWS itself.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// `https://endpoint/bucket/key` rather than `https://bucket.endpoint/key`; what self-hosted
    /// stores expect. Default true.
    pub path_style: bool,
    /// Requests to the store in flight at once, across all transfers.
    pub max_concurrent_requests: usize,
    /// Answer blob GETs with a redirect to a presigned URL instead of streaming the bytes.
    pub redirect_blob_gets: bool,
    pub timeouts: super::BackendTimeouts,
}

impl Default for S3Settings {
    fn default() -> Self {
        S3Settings {
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            path_style: true,
            max_concurrent_requests: 64,
            redirect_blob_gets: false,
            timeouts: super::BackendTimeouts::default(),
        }
    }
}

// By hand, so that the secret never reaches a log line.
impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field("path_style", &self.path_style)
            .field("max_concurrent_requests", &self.max_concurrent_requests)
            .field("redirect_blob_gets", &self.redirect_blob_gets)
            .field("timeouts", &self.timeouts)
            .finish()
    }
}

pub struct S3BlobStore {
    /// Every request goes through the semaphore of the `LimitStore`.
    store: Arc<LimitStore<AmazonS3>>,
    /// Presigning is local computation, so it needs no slot.
    signer: AmazonS3,
    prefix: String,
    redirect_blob_gets: bool,
    seen: Arc<SeenParts>,
}

/// Any failure of the store is `Io` (the API's 503), except a missing object.
fn storage_error(e: object_store::Error) -> StorageError {
    match e {
        object_store::Error::NotFound { .. } => StorageError::NotFound,
        e => StorageError::Io(io::Error::other(e)),
    }
}

fn io_error(e: object_store::Error) -> io::Error {
    match e {
        object_store::Error::NotFound { .. } => io::Error::new(io::ErrorKind::NotFound, e),
        e => io::Error::other(e),
    }
}

fn not_found_as_none<T>(r: object_store::Result<T>) -> Result<Option<T>, StorageError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(storage_error(e)),
    }
}

/// One part object of an upload.
#[derive(Debug, Clone)]
struct Part {
    path: Path,
    offset: u64,
    size: u64,
}

/// Reads `<offset>` or `<offset>-<writer>` from a part object's name.
fn part_offset(name: &str) -> Option<u64> {
    name.split('-').next()?.parse().ok()
}

impl Part {
    /// The empty part `create_upload` writes: the upload exists while it does.
    fn is_marker(&self) -> bool {
        self.offset == 0 && self.size == 0
    }
}

/// Every part object under `dir`, sorted by offset (empty markers first), whether or not the
/// upload still exists.
async fn list_all_parts(
    store: &LimitStore<AmazonS3>,
    dir: &Path,
) -> Result<Vec<Part>, StorageError> {
    let metas: Vec<_> = store
        .list(Some(dir))
        .try_collect()
        .await
        .map_err(storage_error)?;
    let mut parts = Vec::with_capacity(metas.len());
    for m in metas {
        let Some(offset) = m.location.filename().and_then(part_offset) else {
            tracing::warn!(object = %m.location, "ignoring a stray object among upload parts");
            continue;
        };
        parts.push(Part {
            path: m.location,
            offset,
            size: m.size,
        });
    }
    parts.sort_by_key(|p| (p.offset, p.size));
    Ok(parts)
}

/// The upload's parts in order, which must tile it without gaps or overlaps, or `None` for an
/// unknown upload (no marker: never created, or being deleted). Two parts at one offset mean
/// two writers raced and one is about to withdraw: a conflict to retry, not a guess.
async fn list_parts(
    store: &LimitStore<AmazonS3>,
    dir: &Path,
) -> Result<Option<Vec<Part>>, StorageError> {
    let parts = list_all_parts(store, dir).await?;
    if !parts.iter().any(Part::is_marker) {
        return Ok(None);
    }
    let mut end = 0;
    for p in parts.iter().filter(|p| p.size > 0) {
        if p.offset != end {
            return Err(StorageError::Conflict(format!(
                "upload {dir}: part at offset {} does not follow the previous parts, which end at {end}",
                p.offset
            )));
        }
        end += p.size;
    }
    Ok(Some(parts))
}

/// The upload a list of parts makes up, as the service sees it (marker included, so that a
/// commit deletes it with the parts).
fn extent_of(parts: &[Part]) -> UploadExtent {
    UploadExtent {
        size: parts.iter().map(|p| p.size).sum(),
        pieces: parts
            .iter()
            .map(|p| Piece {
                key: p.path.to_string(),
                offset: p.offset,
                size: p.size,
            })
            .collect(),
    }
}

fn parts_of(extent: &UploadExtent) -> Vec<Part> {
    extent
        .pieces
        .iter()
        .map(|p| Part {
            path: Path::from(p.key.as_str()),
            offset: p.offset,
            size: p.size,
        })
        .collect()
}

/// How long a listing stays good enough to skip the next one (see [`SeenParts`]).
const SEEN_FRESH: Duration = Duration::from_secs(2);

/// An upload's parts as this process last listed them, and when the list was asked for.
#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    parts: Vec<Part>,
}

/// The last listing of each upload, kept for [`SEEN_FRESH`] so that the service's sequence of
/// calls does not list the same upload twice in a row: `upload_size` then `append_upload` (one
/// PATCH), or a writer's post-write check then `commit_upload` (the closing PUT). Nothing
/// depends on a remembered listing being current: an append is kept only after the post-write
/// check on a fresh list, and a commit joins the parts its node's hash covers (a part deleted
/// since makes the copy fail, never a partial blob). A listing is used once, and a failed
/// list or a withdrawn append leaves none.
#[derive(Default)]
struct SeenParts(std::sync::Mutex<HashMap<String, Seen>>);

impl SeenParts {
    fn remember(&self, id: &str, seen: Seen) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded by the uploads touched in the last moment, not by all uploads ever seen.
        map.retain(|_, s| s.at.elapsed() < SEEN_FRESH);
        if seen.at.elapsed() < SEEN_FRESH {
            map.insert(id.to_string(), seen);
        }
    }

    /// The upload's last listing, if fresh; forgotten either way.
    fn take(&self, id: &str) -> Option<Seen> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(id).filter(|s| s.at.elapsed() < SEEN_FRESH)
    }
}

impl S3BlobStore {
    /// Connects to `bucket` and checks that it answers, so that a wrong endpoint, bucket or key
    /// stops the server at startup rather than failing every request.
    pub async fn open(
        bucket: &str,
        prefix: &str,
        settings: &S3Settings,
    ) -> Result<S3BlobStore, StorageError> {
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_virtual_hosted_style_request(!settings.path_style)
            .with_retry(RetryConfig {
                // 5xx, 429, SlowDown, connection errors and timeouts are retried, but no
                // retry starts once the operation's budget is spent: a store that went silent
                // costs a request about that budget (`ObservedStore` enforces it as well).
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(5),
                    base: 2.0,
                },
                max_retries: 5,
                retry_timeout: settings.timeouts.operation,
            });
        let set = |b: AmazonS3Builder, key: AmazonS3ConfigKey, v: &Option<String>| match v {
            Some(v) => b.with_config(key, v),
            None => b,
        };
        builder = set(builder, AmazonS3ConfigKey::Endpoint, &settings.endpoint);
        builder = set(builder, AmazonS3ConfigKey::Region, &settings.region);
        builder = set(
            builder,
            AmazonS3ConfigKey::AccessKeyId,
            &settings.access_key_id,
        );
        builder = set(
            builder,
            AmazonS3ConfigKey::SecretAccessKey,
            &settings.secret_access_key,
        );
        let plain_http = builder
            .get_config_value(&AmazonS3ConfigKey::Endpoint)
            .is_some_and(|e| e.starts_with("http://"));
        builder = builder.with_client_options(
            ClientOptions::new()
                .with_allow_http(plain_http)
                // No deadline for a whole request: a large blob may take long to stream to a
                // slow client. The wait for an answer's head is bounded by `ObservedStore`
                // (the first-byte and operation budgets); a body that stalls half-way is
                // caught by the read timeout. That one stays long: reqwest counts it from the
                // previous chunk, so a client that reads slowly would trip a short one.
                .with_timeout_disabled()
                .with_connect_timeout(settings.timeouts.connect)
                .with_read_timeout(BODY_STALL_TIMEOUT),
        );
        let s3 = builder
            .build()
            .map_err(|e| StorageError::Io(io::Error::other(e)))?;
        let store = S3BlobStore {
            store: Arc::new(LimitStore::new(
                s3.clone(),
                settings.max_concurrent_requests.max(1),
            )),
            signer: s3,
            prefix: prefix.trim_matches('/').to_string(),
            redirect_blob_gets: settings.redirect_blob_gets,
            seen: Arc::default(),
        };
        // One cheap request that needs the bucket and the credentials.
        store
            .store
            .list_with_delimiter(Some(&store.key("blobs")))
            .await
            .map_err(|e| StorageError::Io(io::Error::other(e)))?;
        Ok(store)
    }

    fn key(&self, rest: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(rest)
        } else {
            Path::from(format!("{}/{rest}", self.prefix))
        }
    }

    /// Joins exactly the hashed parts into the blob's object. `replace`: even over an object
    /// already there (its bytes failed an integrity check); otherwise such an object is kept.
    async fn commit(
        &self,
        id: &str,
        digest: &Digest,
        extent: Option<&UploadExtent>,
        replace: bool,
    ) -> Result<(), StorageError> {
        // Exactly the parts that were hashed: a part another node added since is not joined
        // (it is left for upload expiry), and one that is gone makes the copy fail.
        let parts = match extent {
            Some(extent) => parts_of(extent),
            None => self.recent_parts(id).await?.parts,
        };
        let to = self.blob_key(digest);
        // Content-addressed: the same digest is the same bytes, so an existing blob stays. The
        // HEAD costs a request on every push, but saves a copy (or a whole re-upload, for
        // several parts) whenever the blob is already stored, which is every push of a shared
        // base layer to another repository. A replace overwrites: an object PUT or copy is
        // atomic, so readers see the old object or the new one.
        if replace || self.stat(digest).await?.is_none() {
            let data: Vec<Part> = parts.iter().filter(|p| p.size > 0).cloned().collect();
            let total: u64 = data.iter().map(|p| p.size).sum();
            match data.as_slice() {
                [only] if only.size <= MAX_COPY_BYTES => {
                    self.store
                        .copy(&only.path, &to)
                        .await
                        .map_err(storage_error)?;
                }
                // Also the empty blob: one empty PUT.
                _ if total <= PART_SIZE as u64 => self.join_small(&data, &to).await?,
                _ => self.concatenate(&data, &to).await?,
            }
        }
        self.delete_objects(parts.into_iter().map(|p| p.path).collect())
            .await
    }

    fn blob_key(&self, digest: &Digest) -> Path {
        self.key(&format!(
            "blobs/{}/{}",
            digest.algorithm().as_str(),
            digest.hex()
        ))
    }

    fn upload_dir(&self, id: &str) -> Path {
        // Ids are generated by the service as UUIDs.
        debug_assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        self.key(&format!("uploads/{id}"))
    }

    /// A new part's key: its offset, and a random writer id so that no two writers ever
    /// write the same object.
    fn part_key(&self, id: &str, offset: u64) -> Path {
        let writer = uuid::Uuid::new_v4().simple();
        self.upload_dir(id).join(format!("{offset:020}-{writer}"))
    }

    /// The upload's parts in order, or `None` for an unknown upload.
    async fn parts(&self, id: &str) -> Result<Option<Vec<Part>>, StorageError> {
        list_parts(&self.store, &self.upload_dir(id)).await
    }

    /// The upload's parts: as just listed by this process if it did (see [`SeenParts`]),
    /// otherwise listed now.
    async fn recent_parts(&self, id: &str) -> Result<Seen, StorageError> {
        if let Some(seen) = self.seen.take(id) {
            return Ok(seen);
        }
        let at = Instant::now();
        let parts = self.parts(id).await?.ok_or(StorageError::NotFound)?;
        Ok(Seen { at, parts })
    }

    /// Deletes objects in one request (S3's DeleteObjects takes up to 1,000 keys). The store
    /// may remove them in any order, and a failure may leave some: whatever remains is an
    /// unknown upload (marker gone) or one whose parts leave a gap (a conflict) or end early (a
    /// shorter upload, whose digest no longer matches); never a blob.
    async fn delete_objects(&self, paths: Vec<Path>) -> Result<(), StorageError> {
        let results: Vec<_> = self
            .store
            .delete_stream(stream::iter(paths.into_iter().map(Ok)).boxed())
            .collect()
            .await;
        for r in results {
            not_found_as_none(r)?;
        }
        Ok(())
    }

    /// Joins small parts in memory and writes them with one PUT: no multipart upload (three
    /// requests at least) for what fits in one part.
    async fn join_small(&self, parts: &[Part], to: &Path) -> Result<(), StorageError> {
        let mut joined = PutPayloadMut::new();
        for p in parts {
            let bytes = self
                .store
                .get(&p.path)
                .await
                .map_err(storage_error)?
                .bytes()
                .await
                .map_err(storage_error)?;
            joined.push(bytes);
        }
        self.store
            .put(to, joined.freeze())
            .await
            .map_err(storage_error)?;
        Ok(())
    }

    /// Streams the parts into one multipart upload to `to`, reading ranges of at most
    /// [`PART_SIZE`]. Each range is read whole before it is sent, so no request holds a slot
    /// while waiting for another one.
    async fn concatenate(&self, parts: &[Part], to: &Path) -> Result<(), StorageError> {
        let upload = self.store.put_multipart(to).await.map_err(storage_error)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let copied = async {
            for p in parts {
                let mut start = 0;
                while start < p.size {
                    let end = p.size.min(start + PART_SIZE as u64);
                    let bytes = self.store.get_range(&p.path, start..end).await?;
                    writer.wait_for_capacity(PARTS_IN_FLIGHT).await?;
                    writer.put(bytes);
                    start = end;
                }
            }
            Ok::<_, object_store::Error>(())
        }
        .await;
        match copied {
            // `finish` aborts the upload itself when completing fails.
            Ok(()) => writer.finish().await.map(|_| ()).map_err(storage_error),
            Err(e) => {
                // Best effort: an incomplete multipart upload is invisible either way; aborting
                // just frees its parts sooner.
                let _ = writer.abort().await;
                Err(storage_error(e))
            }
        }
    }
}

#[async_trait]
impl BlobStore for S3BlobStore {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        Ok(not_found_as_none(self.store.head(&self.blob_key(digest)).await)?.map(|m| m.size))
    }

    async fn read(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<ByteStream, StorageError> {
        let range = range.map(|r| GetRange::Bounded(r.start..r.start.saturating_add(r.len)));
        let result = self
            .store
            .get_opts(
                &self.blob_key(digest),
                GetOptions::default().with_range(range),
            )
            .await
            .map_err(storage_error)?;
        Ok(Box::pin(result.into_stream().map_err(io_error)))
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StorageError> {
        not_found_as_none(self.store.delete(&self.blob_key(digest)).await).map(|_| ())
    }

    async fn create_upload(&self, id: &str) -> Result<(), StorageError> {
        self.store
            .put(&self.part_key(id, 0), PutPayload::new())
            .await
            .map_err(storage_error)?;
        Ok(())
    }

    async fn upload_size(&self, id: &str) -> Result<Option<u64>, StorageError> {
        // Replaced by this listing, or by none if it fails.
        self.seen.take(id);
        let at = Instant::now();
        let Some(parts) = self.parts(id).await? else {
            return Ok(None);
        };
        let size = parts.iter().map(|p| p.size).sum();
        self.seen.remember(id, Seen { at, parts });
        Ok(Some(size))
    }

    async fn append_upload(
        &self,
        id: &str,
        offset: u64,
        guard: WriteGuard,
    ) -> Result<Box<dyn UploadWriter>, StorageError> {
        // An early answer only: the post-write check decides whether the part stays.
        let opened_on = self.recent_parts(id).await?;
        let actual: u64 = opened_on.parts.iter().map(|p| p.size).sum();
        if actual != offset {
            return Err(StorageError::OffsetMismatch {
                expected: offset,
                actual,
            });
        }
        Ok(Box::new(S3UploadWriter {
            store: self.store.clone(),
            seen: self.seen.clone(),
            id: id.to_string(),
            opened_on,
            dir: self.upload_dir(id),
            path: self.part_key(id, offset),
            offset,
            written: 0,
            state: WriterState::Buffering(PutPayloadMut::new()),
            _guard: guard,
        }))
    }

    async fn read_upload(&self, id: &str) -> Result<(ByteStream, UploadExtent), StorageError> {
        let parts = self.parts(id).await?.ok_or(StorageError::NotFound)?;
        let extent = extent_of(&parts);
        let store = self.store.clone();
        let chunks = stream::iter(
            parts
                .into_iter()
                .filter(|p| p.size > 0)
                .map(Ok::<_, io::Error>),
        )
        .and_then(move |part: Part| {
            let store = store.clone();
            async move {
                let result = store.get(&part.path).await.map_err(io_error)?;
                Ok(result.into_stream().map_err(io_error))
            }
        })
        .try_flatten();
        Ok((Box::pin(chunks), extent))
    }

    async fn commit_upload(
        &self,
        id: &str,
        digest: &Digest,
        extent: Option<&UploadExtent>,
    ) -> Result<(), StorageError> {
        self.commit(id, digest, extent, false).await
    }

    async fn replace_with_upload(
        &self,
        id: &str,
        digest: &Digest,
        extent: Option<&UploadExtent>,
    ) -> Result<(), StorageError> {
        self.commit(id, digest, extent, true).await
    }

    async fn delete_upload(&self, id: &str) -> Result<(), StorageError> {
        self.seen.take(id);
        // Every object, whether or not its parts tile the upload or its marker is left.
        let paths: Vec<Path> = self
            .store
            .list(Some(&self.upload_dir(id)))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(storage_error)?;
        self.delete_objects(paths).await
    }

    async fn list_blobs(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<StoredBlob>, StorageError> {
        let prefix = self.key("blobs");
        let mut objects = match after {
            Some(d) => self
                .store
                .list_with_offset(Some(&prefix), &self.blob_key(d)),
            None => self.store.list(Some(&prefix)),
        };
        let mut found = Vec::new();
        while found.len() < limit {
            let Some(meta) = objects.try_next().await.map_err(storage_error)? else {
                break;
            };
            // blobs/<algorithm>/<hex>
            let parts: Vec<_> = meta.location.parts().collect();
            let [.., algorithm, hex] = parts.as_slice() else {
                continue;
            };
            let Ok(digest) = format!("{}:{}", algorithm.as_ref(), hex.as_ref()).parse() else {
                continue;
            };
            found.push(StoredBlob {
                digest,
                size: meta.size,
                modified: std::time::SystemTime::from(meta.last_modified),
            });
        }
        Ok(found)
    }

    async fn delete_blobs(&self, digests: &[Digest]) -> Result<(), StorageError> {
        // DeleteObjects, up to 1,000 keys a request; an absent key is no error.
        let keys: Vec<_> = digests.iter().map(|d| Ok(self.blob_key(d))).collect();
        let mut deleted = self.store.delete_stream(stream::iter(keys).boxed());
        while let Some(result) = deleted.next().await {
            not_found_as_none(result)?;
        }
        Ok(())
    }

    async fn list_uploads(&self) -> Result<Vec<StoredUpload>, StorageError> {
        let mut latest: std::collections::BTreeMap<String, std::time::SystemTime> =
            Default::default();
        let mut objects = self.store.list(Some(&self.key("uploads")));
        while let Some(meta) = objects.try_next().await.map_err(storage_error)? {
            // uploads/<id>/<offset>: the id is the second-to-last segment.
            let parts: Vec<_> = meta.location.parts().collect();
            let Some(id) = parts
                .len()
                .checked_sub(2)
                .map(|i| parts[i].as_ref().to_string())
            else {
                continue;
            };
            let modified = std::time::SystemTime::from(meta.last_modified);
            let entry = latest.entry(id).or_insert(modified);
            *entry = (*entry).max(modified);
        }
        Ok(latest
            .into_iter()
            .map(|(id, modified)| StoredUpload { id, modified })
            .collect())
    }

    fn redirects_gets(&self) -> bool {
        self.redirect_blob_gets
    }

    async fn redirect_url(&self, digest: &Digest) -> Result<Option<String>, StorageError> {
        if !self.redirect_blob_gets {
            return Ok(None);
        }
        let url = self
            .signer
            .signed_url(
                object_store::signer::Method::GET,
                &self.blob_key(digest),
                PRESIGNED_URL_TTL,
            )
            .await
            .map_err(storage_error)?;
        Ok(Some(url.to_string()))
    }
}

enum WriterState {
    /// Nothing sent yet: small appends become one PUT.
    Buffering(PutPayloadMut),
    /// Past [`PART_SIZE`]: a multipart upload, invisible until completed.
    Multipart(WriteMultipart),
    /// A request failed; the part object was not written.
    Failed,
}

/// Writes one append as the part object `uploads/<id>/<offset>`, which appears only complete.
struct S3UploadWriter {
    store: Arc<LimitStore<AmazonS3>>,
    /// Where the listing after a successful append is left for the next call.
    seen: Arc<SeenParts>,
    id: String,
    /// The listing the append was checked against when opened.
    opened_on: Seen,
    /// The upload's directory, listed after writing to check for a racing writer.
    dir: Path,
    path: Path,
    offset: u64,
    written: u64,
    state: WriterState,
    /// Requests of a dropped writer are cancelled with it (a multipart upload is aborted), so
    /// the guard only needs to live as long as the writer.
    _guard: WriteGuard,
}

impl S3UploadWriter {
    async fn push(&mut self, chunk: Bytes) -> object_store::Result<()> {
        match &mut self.state {
            WriterState::Buffering(buf) => {
                buf.push(chunk);
                if buf.content_length() >= PART_SIZE {
                    let upload = self.store.put_multipart(&self.path).await?;
                    let mut multipart = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
                    let WriterState::Buffering(buf) =
                        std::mem::replace(&mut self.state, WriterState::Failed)
                    else {
                        unreachable!("state checked above");
                    };
                    for bytes in buf.freeze() {
                        multipart.put(bytes);
                    }
                    self.state = WriterState::Multipart(multipart);
                }
                Ok(())
            }
            WriterState::Multipart(multipart) => {
                multipart.wait_for_capacity(PARTS_IN_FLIGHT).await?;
                multipart.put(chunk);
                Ok(())
            }
            WriterState::Failed => Err(object_store::Error::Generic {
                store: "S3",
                source: "an earlier write of this upload failed".into(),
            }),
        }
    }
}

#[async_trait]
impl UploadWriter for S3UploadWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StorageError> {
        let len = chunk.len() as u64;
        match self.push(chunk).await {
            Ok(()) => {
                self.written += len;
                Ok(())
            }
            Err(e) => {
                if let WriterState::Multipart(m) =
                    std::mem::replace(&mut self.state, WriterState::Failed)
                {
                    let _ = m.abort().await;
                }
                Err(storage_error(e))
            }
        }
    }

    /// Writes what arrived (even if the request body broke off) as one complete part.
    async fn finish(mut self: Box<Self>) -> Result<UploadExtent, StorageError> {
        let seen = self.complete_part().await?;
        let extent = extent_of(&seen.parts);
        self.seen.remember(&self.id, seen);
        Ok(extent)
    }

    /// A sender that went quiet: what is buffered becomes a complete part now, and later bytes
    /// go to a new part after it, so that a stalled upload holds at most [`QUIET_PART_MIN`] in
    /// memory instead of a whole [`PART_SIZE`]. Smaller buffers stay, so that a client sending
    /// a trickle cannot make a part object out of every few bytes.
    async fn flush(&mut self) -> Result<(), StorageError> {
        let worth_it = match &self.state {
            WriterState::Buffering(buf) => buf.content_length() >= QUIET_PART_MIN,
            WriterState::Multipart(_) => true,
            WriterState::Failed => false,
        };
        if !worth_it {
            return Ok(());
        }
        let seen = self.complete_part().await?;
        // The next part starts where this one ends, under a new writer key.
        self.offset += self.written;
        self.written = 0;
        let writer = uuid::Uuid::new_v4().simple();
        self.path = self
            .dir
            .clone()
            .join(format!("{:020}-{writer}", self.offset));
        self.state = WriterState::Buffering(PutPayloadMut::new());
        self.opened_on = seen;
        Ok(())
    }
}

impl S3UploadWriter {
    /// Writes what arrived as one complete part object and checks it against racing writers;
    /// returns the upload's parts up to its end, as listed (as opened, if nothing was written).
    async fn complete_part(&mut self) -> Result<Seen, StorageError> {
        match std::mem::replace(&mut self.state, WriterState::Failed) {
            WriterState::Buffering(_) if self.written == 0 => {}
            WriterState::Buffering(buf) => {
                self.store
                    .put(&self.path, buf.freeze())
                    .await
                    .map_err(storage_error)?;
            }
            WriterState::Multipart(m) => {
                m.finish().await.map_err(storage_error)?;
            }
            WriterState::Failed => {
                return Err(StorageError::Io(io::Error::other(
                    "an earlier write of this upload failed",
                )));
            }
        }
        if self.written == 0 {
            // Nothing written: the upload is as it was when the writer was opened.
            return Ok(self.opened_on.clone());
        }
        let written = PartWritten {
            store: self.store.clone(),
            dir: self.dir.clone(),
            path: self.path.clone(),
            offset: self.offset,
            written: self.written,
        };
        written.withdraw_if_raced().await
    }
}

/// A part that has just been written, as its writer checks it against racing writers.
struct PartWritten {
    store: Arc<LimitStore<AmazonS3>>,
    dir: Path,
    path: Path,
    offset: u64,
    written: u64,
}

impl PartWritten {
    /// Keeps the part just written only if the upload still exists (its marker is there), the
    /// parts before it tile the upload up to its offset, and no other part overlaps it;
    /// otherwise deletes it and reports the upload unknown, or where it really ends. Returns the
    /// upload's parts up to the end of this one, as listed.
    ///
    /// Requiring the marker is what makes the early check in `append_upload` optional: an
    /// append that raced a cancel (or a commit) on another node, even one at offset 0 where
    /// its part alone would look like a whole upload, is withdrawn rather than bringing the
    /// upload back.
    async fn withdraw_if_raced(&self) -> Result<Seen, StorageError> {
        let at = Instant::now();
        let parts = list_all_parts(&self.store, &self.dir).await?;
        let exists = parts.iter().any(Part::is_marker);
        let others = || parts.iter().filter(|p| p.size > 0 && p.path != self.path);
        let mut tiled = 0;
        let mut follows = true;
        for p in others().filter(|p| p.offset < self.offset) {
            follows &= p.offset == tiled;
            tiled += p.size;
        }
        follows &= tiled == self.offset;
        // Another part overlapping this one; a part starting where this one ends is the next
        // append, made after this part was visible, and is no rival.
        let end = self.offset + self.written;
        let rival = others().any(|p| p.offset >= self.offset && p.offset < end);
        if exists && follows && !rival {
            let parts = parts.into_iter().filter(|p| p.offset < end).collect();
            return Ok(Seen { at, parts });
        }
        not_found_as_none(self.store.delete(&self.path).await)?;
        if !exists {
            return Err(StorageError::NotFound);
        }
        Err(StorageError::OffsetMismatch {
            expected: self.offset,
            actual: others().map(|p| p.size).sum(),
        })
    }
}

impl Drop for S3UploadWriter {
    /// A writer dropped mid-transfer (the request was cancelled) leaves no part; its pending
    /// multipart upload is aborted in the background so the store can free what it holds.
    fn drop(&mut self) {
        if let WriterState::Multipart(m) = std::mem::replace(&mut self.state, WriterState::Failed)
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let _ = m.abort().await;
            });
        }
    }
}

/// Run against a real S3-compatible store: `eval "$(bash scripts/garage.sh)"` starts a local
/// Garage and exports the variables these tests read.
#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::{JoinHandle, JoinSet};

    use super::*;
    use crate::storage::tests::blob_store_suite;

    fn env(key: &str) -> String {
        std::env::var(key).unwrap_or_else(|_| {
            panic!(
                "{key} is not set: the S3 tests need a store. Run `eval \"$(bash scripts/garage.sh)\"` \
                 first (scripts/test.sh does), which exports BERTH_TEST_S3_ENDPOINT, \
                 BERTH_TEST_S3_BUCKET, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION"
            )
        })
    }

    /// (endpoint, bucket); the keys and region come from the `AWS_*` variables.
    fn test_store() -> (String, String) {
        env("AWS_ACCESS_KEY_ID");
        env("AWS_SECRET_ACCESS_KEY");
        (env("BERTH_TEST_S3_ENDPOINT"), env("BERTH_TEST_S3_BUCKET"))
    }

    /// A fresh prefix per test, so tests share the bucket without seeing each other.
    fn unique_prefix(name: &str) -> String {
        format!("unit/{name}-{}", uuid::Uuid::new_v4())
    }

    async fn open(endpoint: &str, bucket: &str, prefix: &str) -> S3BlobStore {
        let settings = S3Settings {
            endpoint: Some(endpoint.to_string()),
            ..S3Settings::default()
        };
        S3BlobStore::open(bucket, prefix, &settings)
            .await
            .unwrap_or_else(|e| panic!("opening the S3 store at {endpoint}/{bucket}: {e}"))
    }

    async fn write(store: &S3BlobStore, id: &str, offset: u64, data: &[u8]) -> u64 {
        let mut w = store
            .append_upload(id, offset, Arc::new(()))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        for chunk in data.chunks(1024 * 1024) {
            w.write(Bytes::copy_from_slice(chunk))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        w.finish().await.unwrap_or_else(|e| panic!("{e}")).size
    }

    async fn collect(stream: ByteStream) -> Vec<u8> {
        let chunks: Vec<Bytes> = stream.try_collect().await.unwrap_or_else(|e| panic!("{e}"));
        chunks.concat()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn passes_the_shared_suite() {
        let (endpoint, bucket) = test_store();
        let store = open(&endpoint, &bucket, &unique_prefix("suite")).await;
        blob_store_suite(&store).await;
    }

    /// A writer whose sender goes quiet turns its buffer into a part of its own and goes on in
    /// a new one; the upload reads back whole and commits.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_quiet_writer_flushes_its_buffer_as_a_part() {
        let (endpoint, bucket) = test_store();
        let store = open(&endpoint, &bucket, &unique_prefix("flush")).await;
        store
            .create_upload("q")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let first = vec![1u8; QUIET_PART_MIN + 10];
        let second = vec![2u8; 1000];
        let mut w = store
            .append_upload("q", 0, Arc::new(()))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        w.write(Bytes::from(first.clone()))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        w.flush().await.unwrap_or_else(|e| panic!("{e}"));
        // The flushed part is already in the store while the writer is still open.
        assert_eq!(
            store
                .upload_size("q")
                .await
                .unwrap_or_else(|e| panic!("{e}")),
            Some(first.len() as u64)
        );
        w.write(Bytes::from(second.clone()))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let extent = w.finish().await.unwrap_or_else(|e| panic!("{e}"));
        let whole = [first, second].concat();
        assert_eq!(extent.size, whole.len() as u64);
        assert_eq!(extent.pieces.iter().filter(|p| p.size > 0).count(), 2);
        let digest = Digest::sha256_of(&whole);
        store
            .commit_upload("q", &digest, Some(&extent))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let blob = collect(
            store
                .read(&digest, None)
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        )
        .await;
        assert!(blob == whole, "the committed blob differs");
    }

    /// A commit joins exactly the parts that were hashed: a part another node appends between
    /// the hash and the commit is not in the blob, so the blob's bytes still match its digest.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_commit_joins_exactly_the_parts_that_were_hashed() {
        let (endpoint, bucket) = test_store();
        let prefix = unique_prefix("extent");
        let a = open(&endpoint, &bucket, &prefix).await;
        let b = open(&endpoint, &bucket, &prefix).await;
        a.create_upload("x").await.unwrap_or_else(|e| panic!("{e}"));
        let mut w = a
            .append_upload("x", 0, Arc::new(()))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        w.write(Bytes::from_static(b"hashed on a"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let extent = w.finish().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(extent.size, 11);
        // Node b appends while node a is about to commit what it hashed.
        write(&b, "x", 11, b" and a late part from b").await;
        let digest = Digest::sha256_of(b"hashed on a");
        a.commit_upload("x", &digest, Some(&extent))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let blob = collect(
            a.read(&digest, None)
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        )
        .await;
        assert_eq!(blob, b"hashed on a");
    }

    /// Regression: two nodes appending at the same offset once both "won" (plain PUTs to one
    /// key, last writer wins), so a node committed the other's bytes under its own digest. Now
    /// at most one append survives, and the upload holds exactly its bytes.
    #[tokio::test(flavor = "multi_thread")]
    async fn racing_appends_at_one_offset_leave_exactly_one() {
        let (endpoint, bucket) = test_store();
        let prefix = unique_prefix("race");
        let a = open(&endpoint, &bucket, &prefix).await;
        let b = open(&endpoint, &bucket, &prefix).await;
        for round in 0..10u8 {
            let id = format!("r{round}");
            a.create_upload(&id).await.unwrap_or_else(|e| panic!("{e}"));
            let bytes_a = vec![round; 3000];
            let bytes_b = vec![round.wrapping_add(100); 3000];
            async fn append(
                store: &S3BlobStore,
                id: &str,
                bytes: Vec<u8>,
            ) -> Result<u64, StorageError> {
                let mut w = store.append_upload(id, 0, Arc::new(())).await?;
                w.write(Bytes::from(bytes)).await?;
                w.finish().await.map(|e| e.size)
            }
            let (ra, rb) = tokio::join!(
                append(&a, &id, bytes_a.clone()),
                append(&b, &id, bytes_b.clone())
            );
            let stored =
                collect(a.read_upload(&id).await.unwrap_or_else(|e| panic!("{e}")).0).await;
            match (&ra, &rb) {
                (Ok(3000), Err(StorageError::OffsetMismatch { .. })) => assert_eq!(stored, bytes_a),
                (Err(StorageError::OffsetMismatch { .. }), Ok(3000)) => assert_eq!(stored, bytes_b),
                (
                    Err(StorageError::OffsetMismatch { .. }),
                    Err(StorageError::OffsetMismatch { .. }),
                ) => {
                    assert!(stored.is_empty())
                }
                other => panic!("round {round}: {other:?}"),
            }
        }
    }

    /// Two processes sharing the bucket: an upload started and appended on one is appended to
    /// and committed on the other, with a part large enough to go through a multipart upload.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_upload_continues_on_another_node() {
        let (endpoint, bucket) = test_store();
        let prefix = unique_prefix("nodes");
        let a = open(&endpoint, &bucket, &prefix).await;
        let b = open(&endpoint, &bucket, &prefix).await;
        let first = b"first chunk, written on node a".to_vec();
        let second: Vec<u8> = (0..PART_SIZE + 1_234_567)
            .map(|i| (i % 251) as u8)
            .collect();
        let third = b"and a last small one".to_vec();
        let whole = [first.clone(), second.clone(), third.clone()].concat();
        let digest = Digest::sha256_of(&whole);

        a.create_upload("x").await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            b.upload_size("x").await.unwrap_or_else(|e| panic!("{e}")),
            Some(0)
        );
        let size = write(&a, "x", 0, &first).await;
        assert_eq!(
            b.upload_size("x").await.unwrap_or_else(|e| panic!("{e}")),
            Some(size)
        );
        assert!(matches!(
            b.append_upload("x", 0, Arc::new(())).await.err(),
            Some(StorageError::OffsetMismatch { actual, .. }) if actual == size
        ));
        let size = write(&b, "x", size, &second).await;
        let size = write(&b, "x", size, &third).await;
        assert_eq!(size, whole.len() as u64);
        assert_eq!(
            a.upload_size("x").await.unwrap_or_else(|e| panic!("{e}")),
            Some(size)
        );
        let read = collect(a.read_upload("x").await.unwrap_or_else(|e| panic!("{e}")).0).await;
        assert!(read == whole, "read_upload returned other bytes");

        b.commit_upload("x", &digest, None)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            a.upload_size("x").await.unwrap_or_else(|e| panic!("{e}")),
            None
        );
        assert_eq!(
            a.stat(&digest).await.unwrap_or_else(|e| panic!("{e}")),
            Some(size)
        );
        let read = collect(
            a.read(&digest, None)
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        )
        .await;
        assert!(read == whole, "the committed blob holds other bytes");
        let tail = ByteRange {
            start: size - 30,
            len: 30,
        };
        let read = collect(
            a.read(&digest, Some(tail))
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        )
        .await;
        assert_eq!(read, &whole[whole.len() - 30..]);
        a.delete(&digest).await.unwrap_or_else(|e| panic!("{e}"));
    }

    /// Presigned URLs only when asked for.
    #[tokio::test(flavor = "multi_thread")]
    async fn redirects_only_when_configured() {
        let (endpoint, bucket) = test_store();
        let prefix = unique_prefix("redirect");
        let digest = Digest::sha256_of(b"x");
        let plain = open(&endpoint, &bucket, &prefix).await;
        assert_eq!(
            plain
                .redirect_url(&digest)
                .await
                .unwrap_or_else(|e| panic!("{e}")),
            None
        );
        let settings = S3Settings {
            endpoint: Some(endpoint.clone()),
            redirect_blob_gets: true,
            ..S3Settings::default()
        };
        let redirecting = S3BlobStore::open(&bucket, &prefix, &settings)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let url = redirecting
            .redirect_url(&digest)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("no redirect URL"));
        assert!(url.starts_with(&endpoint), "{url}");
        assert!(url.contains(digest.hex()), "{url}");
        assert!(url.contains("X-Amz-Signature="), "{url}");
    }

    /// A TCP forwarder to the store that can be switched off (connection refused, open
    /// connections cut) and on again at the same address: the store going down and coming back,
    /// without disturbing the other tests that share it.
    ///
    /// It also reads the request heads the client sends, so a test can count what an operation
    /// costs in requests to the store (see [`Proxy::take`]).
    struct Proxy {
        addr: SocketAddr,
        upstream: SocketAddr,
        task: Option<JoinHandle<()>>,
        /// Kinds of the requests seen so far, in order (see [`request_kind`]).
        seen: Arc<std::sync::Mutex<Vec<&'static str>>>,
    }

    /// What an S3 request is, from its request line and whether it names a copy source.
    fn request_kind(method: &str, target: &str, copy_source: bool) -> &'static str {
        let query = target.split_once('?').map_or("", |(_, q)| q);
        let has = |key: &str| query.split('&').any(|p| p.split('=').next() == Some(key));
        match method {
            "GET" if has("list-type") => "LIST",
            "GET" => "GET",
            "HEAD" => "HEAD",
            "PUT" if copy_source => "COPY",
            "PUT" if has("partNumber") => "PUT-PART",
            "PUT" => "PUT",
            "POST" if has("uploads") => "MULTIPART-START",
            "POST" if has("uploadId") => "MULTIPART-COMPLETE",
            "POST" if has("delete") => "DELETE-MANY",
            "DELETE" if has("uploadId") => "MULTIPART-ABORT",
            "DELETE" => "DELETE",
            _ => "OTHER",
        }
    }

    /// Forwards requests from the client to the store, recording the kind of each. Requests
    /// are HTTP/1.1 with a `Content-Length` (object_store sends no chunked bodies), so a
    /// request ends where its body does and the next head follows.
    async fn forward_requests(
        inbound: tokio::net::tcp::OwnedReadHalf,
        mut outbound: tokio::net::tcp::OwnedWriteHalf,
        seen: Arc<std::sync::Mutex<Vec<&'static str>>>,
    ) -> io::Result<()> {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
        let mut inbound = BufReader::new(inbound);
        loop {
            let mut head = Vec::new();
            let mut line = String::new();
            let (mut kind, mut length) = (None, 0u64);
            let mut copy_source = false;
            let mut request_line = String::new();
            loop {
                line.clear();
                if inbound.read_line(&mut line).await? == 0 {
                    return Ok(());
                }
                head.extend_from_slice(line.as_bytes());
                let trimmed = line.trim_end();
                if request_line.is_empty() {
                    request_line = trimmed.to_string();
                    continue;
                }
                if trimmed.is_empty() {
                    break;
                }
                if let Some((name, value)) = trimmed.split_once(':') {
                    let name = name.trim().to_ascii_lowercase();
                    if name == "content-length" {
                        length = value.trim().parse().unwrap_or(0);
                    } else if name == "x-amz-copy-source" {
                        copy_source = true;
                    }
                }
            }
            let mut words = request_line.split(' ');
            if let (Some(method), Some(target)) = (words.next(), words.next()) {
                kind = Some(request_kind(method, target, copy_source));
            }
            seen.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(kind.unwrap_or("OTHER"));
            outbound.write_all(&head).await?;
            let mut body = (&mut inbound).take(length);
            tokio::io::copy(&mut body, &mut outbound).await?;
        }
    }

    impl Proxy {
        async fn start(upstream_url: &str) -> Proxy {
            let host = upstream_url
                .split("://")
                .nth(1)
                .unwrap_or(upstream_url)
                .trim_end_matches('/');
            let upstream = tokio::net::lookup_host(host)
                .await
                .ok()
                .and_then(|mut a| a.next())
                .unwrap_or_else(|| panic!("cannot resolve {host}"));
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
            let mut proxy = Proxy {
                addr,
                upstream,
                task: None,
                seen: Default::default(),
            };
            proxy.serve(listener);
            proxy
        }

        fn url(&self) -> String {
            format!("http://{}", self.addr)
        }

        /// The kinds of requests sent since the last call, counted: `"LIST 2, PUT 1"`.
        fn take(&self) -> String {
            let seen = std::mem::take(&mut *self.seen.lock().unwrap_or_else(|p| p.into_inner()));
            let mut counts = std::collections::BTreeMap::new();
            for kind in seen {
                *counts.entry(kind).or_insert(0) += 1;
            }
            counts
                .iter()
                .map(|(kind, n)| format!("{kind} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        }

        fn serve(&mut self, listener: TcpListener) {
            let upstream = self.upstream;
            let seen = self.seen.clone();
            self.task = Some(tokio::spawn(async move {
                // Dropped (and so aborted) with this task: `down` cuts every open connection.
                let mut connections = JoinSet::new();
                while let Ok((inbound, _)) = listener.accept().await {
                    let seen = seen.clone();
                    connections.spawn(async move {
                        let Ok(outbound) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        let (from_client, mut to_client) = inbound.into_split();
                        let (mut from_store, to_store) = outbound.into_split();
                        // Either side closing ends the connection.
                        tokio::select! {
                            _ = forward_requests(from_client, to_store, seen) => {}
                            _ = tokio::io::copy(&mut from_store, &mut to_client) => {}
                        }
                    });
                }
            }));
        }

        async fn down(&mut self) {
            if let Some(task) = self.task.take() {
                task.abort();
                let _ = task.await;
            }
        }

        async fn up(&mut self) {
            let listener = TcpListener::bind(self.addr)
                .await
                .unwrap_or_else(|e| panic!("rebinding {}: {e}", self.addr));
            self.serve(listener);
        }
    }

    /// A PATCH as the service makes it: ask the size, then append there.
    async fn patch(store: &S3BlobStore, id: &str, data: &[u8]) -> u64 {
        let size = store
            .upload_size(id)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("upload {id} is unknown"));
        write(store, id, size, data).await
    }

    /// What a push costs in requests to the store, operation by operation, with the calls
    /// made as the service makes them (`service::uploads`). Fewer is cheaper; more is a
    /// regression to explain.
    #[tokio::test(flavor = "multi_thread")]
    async fn requests_per_push() {
        let (endpoint, bucket) = test_store();
        let proxy = Proxy::start(&endpoint).await;
        let store = open(&proxy.url(), &bucket, &unique_prefix("requests")).await;
        let ok = |r: Result<(), StorageError>| r.unwrap_or_else(|e| panic!("{e}"));
        let mut table = Vec::new();
        let mut step = |name: &str, proxy: &Proxy| {
            table.push(format!("{name}: {}", proxy.take()));
        };
        step("open", &proxy);

        // A monolithic push: POST, then the body and the digest.
        let layer = b"a small layer".to_vec();
        let digest = Digest::sha256_of(&layer);
        ok(store.create_upload("m").await);
        step("create", &proxy);
        patch(&store, "m", &layer).await;
        step("append", &proxy);
        ok(store.commit_upload("m", &digest, None).await);
        step("commit one part", &proxy);

        // The same blob pushed again (to another repository): nothing to copy.
        ok(store.create_upload("again").await);
        patch(&store, "again", &layer).await;
        proxy.take();
        ok(store.commit_upload("again", &digest, None).await);
        step("commit one part, blob exists", &proxy);

        // A chunked push: three PATCHes, then a PUT without a body.
        let chunks: [&[u8]; 3] = [b"first ", b"second ", b"third"];
        let digest = Digest::sha256_of(&chunks.concat());
        ok(store.create_upload("c").await);
        proxy.take();
        for chunk in chunks {
            patch(&store, "c", chunk).await;
        }
        step("three appends", &proxy);
        patch(&store, "c", b"").await;
        step("empty append", &proxy);
        ok(store.commit_upload("c", &digest, None).await);
        step("commit three parts", &proxy);

        // A cancelled upload.
        ok(store.create_upload("x").await);
        patch(&store, "x", &layer).await;
        proxy.take();
        ok(store.delete_upload("x").await);
        step("cancel", &proxy);

        // Before issue 6: append 4 (LIST 3), commit one part 5 (LIST, HEAD, COPY, two
        // DELETEs), blob exists 4, three appends 12, empty append 2, commit three parts 12
        // (a multipart upload and a DELETE each), cancel 3. A DeleteObjects is a POST ?delete.
        let expected = "\
            open: LIST 1\n\
            create: PUT 1\n\
            append: LIST 2, PUT 1\n\
            commit one part: COPY 1, DELETE-MANY 1, HEAD 1\n\
            commit one part, blob exists: DELETE-MANY 1, HEAD 1\n\
            three appends: LIST 6, PUT 3\n\
            empty append: LIST 1\n\
            commit three parts: DELETE-MANY 1, GET 3, HEAD 1, PUT 1\n\
            cancel: DELETE-MANY 1, LIST 1";
        assert_eq!(table.join("\n"), expected);
    }

    /// What a node remembers of an upload (to skip a list) is never taken over the store: an
    /// append opened on a stale listing is withdrawn when another node got there first, and an
    /// append to an upload cancelled on another node, even at offset 0 where its part alone
    /// would look like a whole upload, does not bring the upload back.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_remembered_listing_never_outvotes_the_store() {
        let (endpoint, bucket) = test_store();
        let prefix = unique_prefix("seen");
        let a = open(&endpoint, &bucket, &prefix).await;
        let b = open(&endpoint, &bucket, &prefix).await;
        let ok = |r: Result<(), StorageError>| r.unwrap_or_else(|e| panic!("{e}"));
        let size = |r: Result<Option<u64>, StorageError>| r.unwrap_or_else(|e| panic!("{e}"));
        async fn append(store: &S3BlobStore, id: &str, offset: u64) -> Result<u64, StorageError> {
            let mut w = store.append_upload(id, offset, Arc::new(())).await?;
            w.write(Bytes::from_static(b"late")).await?;
            w.finish().await.map(|e| e.size)
        }

        ok(a.create_upload("stale").await);
        assert_eq!(size(a.upload_size("stale").await), Some(0));
        write(&b, "stale", 0, b"first").await;
        assert!(matches!(
            append(&a, "stale", 0).await,
            Err(StorageError::OffsetMismatch {
                expected: 0,
                actual: 5
            })
        ));
        let read = collect(
            b.read_upload("stale")
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .0,
        )
        .await;
        assert_eq!(read, b"first");

        for offset in [0, 5] {
            let id = format!("cancelled-{offset}");
            ok(a.create_upload(&id).await);
            if offset > 0 {
                write(&a, &id, 0, b"first").await;
            }
            assert_eq!(size(a.upload_size(&id).await), Some(offset));
            ok(b.delete_upload(&id).await);
            assert!(matches!(
                append(&a, &id, offset).await,
                Err(StorageError::NotFound)
            ));
            assert_eq!(size(b.upload_size(&id).await), None);
            let listed = a.list_uploads().await.unwrap_or_else(|e| panic!("{e}"));
            assert!(!listed.iter().any(|u| u.id == id), "{listed:?}");
        }
    }

    fn is_unavailable<T>(r: Result<T, StorageError>) -> bool {
        matches!(r, Err(StorageError::Io(_)))
    }

    /// While the store is down every call fails with `Io` (the API's 503), an append cut off
    /// mid-way leaves no part behind, and once the store is back the upload goes on from where
    /// it was.
    #[tokio::test(flavor = "multi_thread")]
    async fn store_down_means_unavailable_and_nothing_half_written() {
        let (endpoint, bucket) = test_store();
        let mut proxy = Proxy::start(&endpoint).await;
        let store = open(&proxy.url(), &bucket, &unique_prefix("down")).await;
        let digest = Digest::sha256_of(b"hello");
        store
            .create_upload("d")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        write(&store, "d", 0, b"hello").await;

        proxy.down().await;
        assert!(is_unavailable(store.stat(&digest).await));
        assert!(is_unavailable(store.read(&digest, None).await));
        assert!(is_unavailable(store.upload_size("d").await));
        assert!(is_unavailable(
            store.append_upload("d", 5, Arc::new(())).await
        ));
        assert!(is_unavailable(store.read_upload("d").await));
        assert!(is_unavailable(store.create_upload("e").await));
        assert!(is_unavailable(
            store.commit_upload("d", &digest, None).await
        ));
        assert!(is_unavailable(store.delete_upload("d").await));

        // An append that loses the store half-way, past the point where it started a multipart
        // upload, fails and leaves the upload as it was.
        proxy.up().await;
        let mut w = store
            .append_upload("d", 5, Arc::new(()))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let chunk = Bytes::from(vec![7u8; 1024 * 1024]);
        for _ in 0..PART_SIZE / chunk.len() + 1 {
            w.write(chunk.clone())
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        proxy.down().await;
        let mut failed = false;
        for _ in 0..PART_SIZE / chunk.len() {
            if w.write(chunk.clone()).await.is_err() {
                failed = true;
                break;
            }
        }
        if !failed {
            assert!(is_unavailable(w.finish().await));
        }

        proxy.up().await;
        assert_eq!(
            store
                .upload_size("d")
                .await
                .unwrap_or_else(|e| panic!("{e}")),
            Some(5)
        );
        assert_eq!(
            store.stat(&digest).await.unwrap_or_else(|e| panic!("{e}")),
            None
        );
        store
            .commit_upload("d", &digest, None)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let read = collect(
            store
                .read(&digest, None)
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        )
        .await;
        assert_eq!(read, b"hello");
        store
            .delete(&digest)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
}
