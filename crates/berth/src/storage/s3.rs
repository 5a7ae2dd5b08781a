//! Blobs in an S3-compatible object store (AWS S3, Garage, MinIO, ...), through `object_store`.
//!
//! Layout under the configured prefix:
//! - `blobs/<algorithm>/<hex>`: committed blobs. An object appears there whole or not at all: by
//!   a server-side copy, a single PUT, or the completion of a multipart upload, each of which S3
//!   makes visible atomically.
//! - `uploads/<id>/<offset, 20 digits>-<writer>`: one *part object* per append, named by the
//!   offset it starts at and a random id of the writer. `create_upload` writes an empty part at
//!   offset 0 as a marker, so an empty upload is told apart from an unknown one.
//!
//! Two nodes may append at the same offset at once (a client retrying on another node). S3
//! has no create-only PUT everywhere (Garage lacks `If-None-Match`), so parts are never
//! overwritten instead: each writer's key is its own, and after writing, the writer lists the
//! upload and withdraws its part (deleting it, answering 416) if another part starts at its
//! offset or its part does not follow the others. Of two racing writers at least one sees the
//! other (lists are strongly consistent), so at most one part per offset survives, and a part
//! that survived is never removed by another writer: the running hash a node keeps for the
//! parts it wrote stays true of the bytes a commit will join.
//!
//! Everything about an upload lives in the bucket, so any process sharing it can continue any
//! upload: its size is the sum of its parts (one list request), an append writes the next part,
//! and commit turns the parts into the blob (one part: a server-side copy; several: streamed
//! into a multipart upload) and then deletes them. A crash at any instant leaves either the old
//! upload, the upload plus one complete new part, or the committed blob plus leftover parts that
//! the upload's expiry deletes; never a partial blob or a partial part.
//!
//! Memory: an append buffers up to [`PART_SIZE`] before it either PUTs the part whole or starts a
//! multipart upload, with at most [`PARTS_IN_FLIGHT`] parts in flight; reads stream. Every request
//! to the store takes a slot of one semaphore (`max_concurrent_requests`); a streamed read holds
//! its slot until the stream ends.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{TryStreamExt, stream};
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
    BlobStore, ByteRange, ByteStream, StorageError, StoredUpload, UploadWriter, WriteGuard,
};

/// Size of each part of a multipart upload, and how much an append buffers before starting one.
/// S3 wants parts of at least 5 MiB and at most 10,000 of them: 8 MiB parts allow a single
/// append of up to 78 GiB.
pub const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts of one multipart upload sent at once.
pub const PARTS_IN_FLIGHT: usize = 2;
/// S3 refuses server-side copies of objects larger than 5 GiB; larger single parts are streamed.
const MAX_COPY_BYTES: u64 = 5 * 1024 * 1024 * 1024;
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

/// Every part object of the upload in `dir`, sorted by offset (empty markers first), or `None`
/// for an unknown upload.
async fn list_all_parts(
    store: &LimitStore<AmazonS3>,
    dir: &Path,
) -> Result<Option<Vec<Part>>, StorageError> {
    let metas: Vec<_> = store
        .list(Some(dir))
        .try_collect()
        .await
        .map_err(storage_error)?;
    if metas.is_empty() {
        return Ok(None);
    }
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
    Ok(Some(parts))
}

/// The upload's parts in order, which must tile it without gaps or overlaps. Two parts at one
/// offset mean two writers raced and one is about to withdraw: a conflict to retry, not a guess.
async fn list_parts(
    store: &LimitStore<AmazonS3>,
    dir: &Path,
) -> Result<Option<Vec<Part>>, StorageError> {
    let Some(parts) = list_all_parts(store, dir).await? else {
        return Ok(None);
    };
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
                // 5xx, 429, SlowDown and connection errors are retried; when the store is down
                // a request gives up after about three seconds rather than minutes.
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(5),
                    base: 2.0,
                },
                max_retries: 5,
                retry_timeout: Duration::from_secs(60),
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
                // slow client. A stalled connection is caught by the read timeout instead.
                .with_timeout_disabled()
                .with_connect_timeout(Duration::from_secs(5))
                .with_read_timeout(Duration::from_secs(60)),
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

    /// Deletes parts last first, so that an interrupted delete still leaves a consistent (shorter)
    /// upload.
    async fn delete_parts(&self, parts: &[Part]) -> Result<(), StorageError> {
        for p in parts.iter().rev() {
            not_found_as_none(self.store.delete(&p.path).await)?;
        }
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
        Ok(self
            .parts(id)
            .await?
            .map(|parts| parts.iter().map(|p| p.size).sum()))
    }

    async fn append_upload(
        &self,
        id: &str,
        offset: u64,
        guard: WriteGuard,
    ) -> Result<Box<dyn UploadWriter>, StorageError> {
        let parts = self.parts(id).await?.ok_or(StorageError::NotFound)?;
        let actual: u64 = parts.iter().map(|p| p.size).sum();
        if actual != offset {
            return Err(StorageError::OffsetMismatch {
                expected: offset,
                actual,
            });
        }
        Ok(Box::new(S3UploadWriter {
            store: self.store.clone(),
            dir: self.upload_dir(id),
            path: self.part_key(id, offset),
            offset,
            written: 0,
            state: WriterState::Buffering(PutPayloadMut::new()),
            _guard: guard,
        }))
    }

    async fn read_upload(&self, id: &str) -> Result<ByteStream, StorageError> {
        let parts = self.parts(id).await?.ok_or(StorageError::NotFound)?;
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
        Ok(Box::pin(chunks))
    }

    async fn commit_upload(&self, id: &str, digest: &Digest) -> Result<(), StorageError> {
        let parts = self.parts(id).await?.ok_or(StorageError::NotFound)?;
        let to = self.blob_key(digest);
        // Content-addressed: the same digest is the same bytes, so an existing blob stays.
        if self.stat(digest).await?.is_none() {
            let data: Vec<Part> = parts.iter().filter(|p| p.size > 0).cloned().collect();
            match data.as_slice() {
                [] => {
                    self.store
                        .put(&to, PutPayload::new())
                        .await
                        .map_err(storage_error)?;
                }
                [only] if only.size <= MAX_COPY_BYTES => {
                    self.store
                        .copy(&only.path, &to)
                        .await
                        .map_err(storage_error)?;
                }
                _ => self.concatenate(&data, &to).await?,
            }
        }
        self.delete_parts(&parts).await
    }

    async fn delete_upload(&self, id: &str) -> Result<(), StorageError> {
        match self.parts(id).await {
            Ok(Some(parts)) => self.delete_parts(&parts).await,
            Ok(None) => Ok(()),
            // Parts that do not tile the upload are deleted all the same.
            Err(StorageError::Conflict(_)) => {
                let paths: Vec<Path> = self
                    .store
                    .list(Some(&self.upload_dir(id)))
                    .map_ok(|m| m.location)
                    .try_collect()
                    .await
                    .map_err(storage_error)?;
                for p in paths {
                    not_found_as_none(self.store.delete(&p).await)?;
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
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
    async fn finish(mut self: Box<Self>) -> Result<u64, StorageError> {
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
        if self.written > 0 {
            let written = PartWritten {
                store: self.store.clone(),
                dir: self.dir.clone(),
                path: self.path.clone(),
                offset: self.offset,
                written: self.written,
            };
            written.withdraw_if_raced().await?;
        }
        Ok(self.offset + self.written)
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
    /// Keeps the part just written only if it is the one part at its offset and follows the
    /// others; otherwise deletes it and reports where the upload really ends.
    async fn withdraw_if_raced(&self) -> Result<(), StorageError> {
        let parts = list_all_parts(&self.store, &self.dir)
            .await?
            .unwrap_or_default();
        let data = || parts.iter().filter(|p| p.size > 0);
        let before: u64 = data()
            .filter(|p| p.offset < self.offset)
            .map(|p| p.size)
            .sum();
        // Another part overlapping this one; a part starting where this one ends is the next
        // append, made after this part was visible, and is no rival.
        let end = self.offset + self.written;
        let rival =
            data().any(|p| p.path != self.path && p.offset >= self.offset && p.offset < end);
        let follows = before == self.offset
            && data()
                .filter(|p| p.offset < self.offset)
                .all(|p| p.offset + p.size <= self.offset);
        if follows && !rival {
            return Ok(());
        }
        not_found_as_none(self.store.delete(&self.path).await)?;
        let actual: u64 = data().filter(|p| p.path != self.path).map(|p| p.size).sum();
        Err(StorageError::OffsetMismatch {
            expected: self.offset,
            actual,
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
        w.finish().await.unwrap_or_else(|e| panic!("{e}"))
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
                w.finish().await
            }
            let (ra, rb) = tokio::join!(
                append(&a, &id, bytes_a.clone()),
                append(&b, &id, bytes_b.clone())
            );
            let stored = collect(a.read_upload(&id).await.unwrap_or_else(|e| panic!("{e}"))).await;
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
        let read = collect(a.read_upload("x").await.unwrap_or_else(|e| panic!("{e}"))).await;
        assert!(read == whole, "read_upload returned other bytes");

        b.commit_upload("x", &digest)
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
    struct Proxy {
        addr: SocketAddr,
        upstream: SocketAddr,
        task: Option<JoinHandle<()>>,
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
            };
            proxy.serve(listener);
            proxy
        }

        fn url(&self) -> String {
            format!("http://{}", self.addr)
        }

        fn serve(&mut self, listener: TcpListener) {
            let upstream = self.upstream;
            self.task = Some(tokio::spawn(async move {
                // Dropped (and so aborted) with this task: `down` cuts every open connection.
                let mut connections = JoinSet::new();
                while let Ok((mut inbound, _)) = listener.accept().await {
                    connections.spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
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
        assert!(is_unavailable(store.commit_upload("d", &digest).await));
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
            .commit_upload("d", &digest)
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
