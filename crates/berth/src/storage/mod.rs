//! Blob bytes by digest, and in-progress uploads as writers with commit and cancel.
//!
//! A `BlobStore` knows nothing about repositories, manifests or HTTP: which repository may read
//! a blob is the metadata store's business. It owes the service two promises:
//! - a committed blob is complete and durable before `commit_upload` returns, and is never
//!   visible half-written, whatever instant the process dies at;
//! - no call holds a whole blob in memory: bytes move in bounded chunks.
//!
//! Implementations: [`fs::FsBlobStore`] (a local directory) and [`s3::S3BlobStore`] (an
//! S3-compatible bucket that several berth processes may share).

pub mod fs;
pub mod observed;
pub mod s3;

use std::any::Any;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::Stream;
use oci::Digest;

pub use fs::FsBlobStore;
pub use observed::ObservedStore;
pub use s3::S3BlobStore;

/// Chunks of a blob as they are read.
pub type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("not found")]
    NotFound,
    /// The upload's size is not what the writer was opened at (a concurrent or stale writer).
    #[error("upload is at offset {actual}, not {expected}")]
    OffsetMismatch { expected: u64, actual: u64 },
    /// Writers on two nodes raced on one upload and one is about to withdraw; retry.
    #[error("conflicting writes: {0}")]
    Conflict(String),
    #[error("storage unavailable: {0}")]
    Io(#[from] io::Error),
    /// A bug rather than an unavailable backend: a panicked worker, data that breaks the
    /// store's own layout. The API answers 500, not a retryable 503.
    #[error("storage internal error: {0}")]
    Internal(String),
}

/// Kept alive by an [`UploadWriter`] until every byte written through it has reached the store
/// or been abandoned, even when the writer itself is dropped mid-write (the request was
/// cancelled). The service passes its per-upload lock here, so nobody else touches the upload
/// while a write it started is still landing.
pub type WriteGuard = Arc<dyn Any + Send + Sync>;

/// Exactly which stored pieces hold an upload's bytes `[0, size)`: what a writer left or a
/// reader streamed, and so what a commit must join. Another node may append to the upload (or
/// race an append at the same offset) between the hash and the commit; joining the very
/// pieces that were hashed keeps the blob's bytes equal to its digest whatever they did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UploadExtent {
    pub size: u64,
    /// Store-specific: S3's part objects in order (each written once, never replaced); empty
    /// for a filesystem upload, which is one file that only its lock holder appends to.
    pub pieces: Vec<Piece>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub key: String,
    pub offset: u64,
    pub size: u64,
}

/// An upload present in the store, as the janitor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredUpload {
    pub id: String,
    /// When its bytes last changed.
    pub modified: SystemTime,
}

/// A blob present in the store, as GC's listing sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlob {
    pub digest: Digest,
    pub size: u64,
    /// When its bytes were written (for a grace period before an unknown blob may go).
    pub modified: SystemTime,
}

/// Bounds on calls to a backend (the object store, PostgreSQL), so that one that stops
/// answering (a partition, a frozen process) costs a request seconds, not minutes. None of them
/// caps the time to stream a large body from a store that keeps sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendTimeouts {
    /// Opening a TCP connection.
    pub connect: Duration,
    /// Waiting for the first byte of an answer: a blob read until its bytes start, a probe.
    pub first_byte: Duration,
    /// One call with its retries (a metadata transaction, a storage call up to the start of a
    /// body it streams).
    pub operation: Duration,
}

impl Default for BackendTimeouts {
    fn default() -> Self {
        BackendTimeouts {
            connect: Duration::from_secs(3),
            first_byte: Duration::from_secs(4),
            operation: Duration::from_secs(8),
        }
    }
}

/// A byte range: first byte and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub len: u64,
}

/// Appends to an upload. Bytes written are kept even if `finish` is never called, so that an
/// interrupted transfer can be resumed from what arrived.
#[async_trait]
pub trait UploadWriter: Send {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StorageError>;
    /// Waits until every written chunk has reached the store; returns the upload as it now
    /// stands (its size is the new size).
    async fn finish(self: Box<Self>) -> Result<UploadExtent, StorageError>;
    /// Hands what is buffered to the store and releases the buffer, without finishing: called
    /// when the sender goes quiet, so that a stalled transfer holds no batch in memory. Stores
    /// that cannot write partial buffers (S3 parts have a minimum size) keep them.
    async fn flush(&mut self) -> Result<(), StorageError> {
        Ok(())
    }
}

#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Size of a committed blob, if present.
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StorageError>;
    /// Streams a committed blob, or part of it.
    async fn read(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<ByteStream, StorageError>;
    /// Removes a committed blob (garbage collection only; repositories unlink in metadata).
    async fn delete(&self, digest: &Digest) -> Result<(), StorageError>;

    async fn create_upload(&self, id: &str) -> Result<(), StorageError>;
    /// Bytes received so far, or `None` for an unknown upload.
    async fn upload_size(&self, id: &str) -> Result<Option<u64>, StorageError>;
    /// Opens a writer appending at `offset`, which must equal the upload's current size.
    /// `guard` is held until the writer's last byte has landed (see [`WriteGuard`]).
    async fn append_upload(
        &self,
        id: &str,
        offset: u64,
        guard: WriteGuard,
    ) -> Result<Box<dyn UploadWriter>, StorageError>;
    /// Streams what an upload holds so far (to rebuild a hash state lost with a restart), and
    /// which pieces those bytes came from.
    async fn read_upload(&self, id: &str) -> Result<(ByteStream, UploadExtent), StorageError>;
    /// Makes the upload's bytes the durable blob `digest` (the caller has verified the digest
    /// over `extent`, which the blob is then made of exactly; `None` takes what the upload
    /// holds when the store looks). If the blob already exists the upload is simply discarded.
    async fn commit_upload(
        &self,
        id: &str,
        digest: &Digest,
        extent: Option<&UploadExtent>,
    ) -> Result<(), StorageError>;
    /// Like [`BlobStore::commit_upload`], but the upload's bytes replace a blob already stored
    /// under `digest`: the service calls it for a blob whose stored bytes failed an integrity
    /// check, which `commit_upload` would keep. Atomic like a commit: a reader sees the old
    /// bytes or the new ones, never a mix, and the new ones are durable before it returns.
    async fn replace_with_upload(
        &self,
        id: &str,
        digest: &Digest,
        extent: Option<&UploadExtent>,
    ) -> Result<(), StorageError>;
    async fn delete_upload(&self, id: &str) -> Result<(), StorageError>;
    /// Every upload the store holds bytes for, so that uploads whose session was never
    /// recorded (a crash between the two) can be found and reclaimed.
    async fn list_uploads(&self) -> Result<Vec<StoredUpload>, StorageError>;
    /// Up to `limit` blobs in digest order (as `Digest`'s text sorts) after `after`, so GC can
    /// find bytes that metadata does not know (a crash between storing and linking).
    async fn list_blobs(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<StoredBlob>, StorageError>;
    /// Deletes many blobs (absent ones are no error); a store may batch them (S3's
    /// DeleteObjects).
    async fn delete_blobs(&self, digests: &[Digest]) -> Result<(), StorageError> {
        for digest in digests {
            self.delete(digest).await?;
        }
        Ok(())
    }

    /// Whether blob GETs are to be answered with a redirect to [`BlobStore::redirect_url`].
    /// Asked first so that stores that never redirect cost nothing on the pull path.
    fn redirects_gets(&self) -> bool {
        false
    }

    /// A URL from which a client may fetch the committed blob directly (a presigned object-store
    /// URL), for stores configured to redirect blob GETs; `None` means serve the bytes.
    async fn redirect_url(&self, _digest: &Digest) -> Result<Option<String>, StorageError> {
        Ok(None)
    }
}

/// The suite every `BlobStore` implementation must pass.
#[cfg(test)]
pub(crate) mod tests {
    use futures_util::TryStreamExt;

    use super::*;

    /// The value, or a panic naming the error: a negative assert must fail when the store
    /// errors, not pass because the error looked like "absent".
    fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
        r.unwrap_or_else(|e| panic!("{e}"))
    }

    fn no_guard() -> WriteGuard {
        Arc::new(())
    }

    async fn collect(stream: ByteStream) -> Vec<u8> {
        let chunks: Vec<Bytes> = ok(stream.try_collect().await);
        chunks.concat()
    }

    async fn upload(store: &dyn BlobStore, id: &str, parts: &[&[u8]]) {
        ok(store.create_upload(id).await);
        let mut offset = 0;
        for part in parts {
            let mut w = ok(store.append_upload(id, offset, no_guard()).await);
            ok(w.write(Bytes::copy_from_slice(part)).await);
            offset = ok(w.finish().await).size;
        }
    }

    pub(crate) async fn blob_store_suite(store: &dyn BlobStore) {
        let data = b"hello, blob".repeat(300_000);
        let digest = Digest::sha256_of(&data);
        assert_eq!(ok(store.stat(&digest).await), None);
        assert!(matches!(
            store.read(&digest, None).await,
            Err(StorageError::NotFound)
        ));

        // Chunked upload, then commit.
        let (a, b) = data.split_at(1_400_000);
        upload(store, "u1", &[a, b]).await;
        assert_eq!(ok(store.upload_size("u1").await), Some(data.len() as u64));
        let (stream, extent) = ok(store.read_upload("u1").await);
        assert_eq!(collect(stream).await, data);
        assert_eq!(extent.size, data.len() as u64);
        let listed = ok(store.list_uploads().await);
        assert!(listed.iter().any(|u| u.id == "u1"), "{listed:?}");
        // Appending at the wrong offset is refused.
        assert!(matches!(
            store.append_upload("u1", 3, no_guard()).await.err(),
            Some(StorageError::OffsetMismatch { expected: 3, .. })
        ));
        ok(store.commit_upload("u1", &digest, Some(&extent)).await);
        assert_eq!(ok(store.upload_size("u1").await), None);
        assert_eq!(ok(store.stat(&digest).await), Some(data.len() as u64));
        assert_eq!(collect(ok(store.read(&digest, None).await)).await, data);
        assert!(!ok(store.list_uploads().await).iter().any(|u| u.id == "u1"));

        // Ranges, small and large.
        let part = ok(store
            .read(&digest, Some(ByteRange { start: 5, len: 10 }))
            .await);
        assert_eq!(collect(part).await, &data[5..15]);
        let part = ok(store
            .read(
                &digest,
                Some(ByteRange {
                    start: 7,
                    len: 2_000_000,
                }),
            )
            .await);
        assert_eq!(collect(part).await, &data[7..2_000_007]);

        // Committing the same content twice keeps one blob and discards the upload.
        upload(store, "u2", &[&data]).await;
        ok(store.commit_upload("u2", &digest, None).await);
        assert_eq!(ok(store.upload_size("u2").await), None);
        assert_eq!(collect(ok(store.read(&digest, None).await)).await, data);

        // A blob whose stored bytes went bad (same size, one byte flipped): a commit keeps them,
        // a replace puts the upload's bytes in their place.
        let small = b"small blob, soon damaged".to_vec();
        let small_digest = Digest::sha256_of(&small);
        let mut damaged = small.clone();
        damaged[3] ^= 0x20;
        upload(store, "r1", &[&damaged]).await;
        // Committed under the wrong digest on purpose, as a flipped bit on disk would leave it.
        ok(store.commit_upload("r1", &small_digest, None).await);
        upload(store, "r2", &[&small]).await;
        ok(store.commit_upload("r2", &small_digest, None).await);
        assert_eq!(
            collect(ok(store.read(&small_digest, None).await)).await,
            damaged,
            "commit_upload replaced an existing blob"
        );
        upload(store, "r3", &[&small]).await;
        let (_, extent) = ok(store.read_upload("r3").await);
        ok(store
            .replace_with_upload("r3", &small_digest, Some(&extent))
            .await);
        assert_eq!(ok(store.upload_size("r3").await), None);
        assert_eq!(
            collect(ok(store.read(&small_digest, None).await)).await,
            small
        );
        // Replacing a blob that is not there stores it.
        ok(store.delete(&small_digest).await);
        upload(store, "r4", &[&small]).await;
        ok(store.replace_with_upload("r4", &small_digest, None).await);
        assert_eq!(
            ok(store.stat(&small_digest).await),
            Some(small.len() as u64)
        );
        ok(store.delete(&small_digest).await);

        // A writer dropped before `finish` keeps the guard until its bytes have landed, and
        // whatever it wrote is a prefix of what was sent: never bytes past the upload's end.
        ok(store.create_upload("u4").await);
        let guard: WriteGuard = Arc::new(());
        let weak = Arc::downgrade(&guard);
        let mut w = ok(store.append_upload("u4", 0, guard).await);
        ok(w.write(Bytes::from(vec![7u8; 3 * 1024 * 1024])).await);
        drop(w);
        for _ in 0..200 {
            if weak.strong_count() == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(
            weak.strong_count(),
            0,
            "guard still held by a finished writer"
        );
        let size = ok(store.upload_size("u4").await).unwrap_or_else(|| panic!("u4 vanished"));
        assert!(size <= 3 * 1024 * 1024);
        ok(store.delete_upload("u4").await);

        // Cancelled uploads vanish.
        upload(store, "u3", &[b"abc"]).await;
        ok(store.delete_upload("u3").await);
        assert_eq!(ok(store.upload_size("u3").await), None);
        assert!(store.append_upload("u3", 0, no_guard()).await.is_err());

        ok(store.delete(&digest).await);
        assert_eq!(ok(store.stat(&digest).await), None);

        // GC's listing: every blob once, in digest order, a page at a time; then a batch delete.
        let mut stored = Vec::new();
        for i in 0..7u8 {
            let bytes = vec![i; usize::from(i) + 1];
            let d = Digest::sha256_of(&bytes);
            upload(store, &format!("l{i}"), &[&bytes]).await;
            ok(store.commit_upload(&format!("l{i}"), &d, None).await);
            stored.push((d, bytes.len() as u64));
        }
        stored.sort_by_key(|(d, _)| d.to_string());
        let mut listed = Vec::new();
        let mut after: Option<Digest> = None;
        loop {
            let page = ok(store.list_blobs(after.as_ref(), 3).await);
            assert!(page.len() <= 3);
            let Some(last) = page.last() else { break };
            after = Some(last.digest.clone());
            listed.extend(page.into_iter().map(|b| (b.digest, b.size)));
        }
        assert_eq!(listed, stored);
        let (gone, kept) = stored.split_at(4);
        let gone: Vec<Digest> = gone.iter().map(|(d, _)| d.clone()).collect();
        ok(store.delete_blobs(&gone).await);
        // Deleting what is gone already is no error.
        ok(store.delete_blobs(&gone).await);
        let left: Vec<(Digest, u64)> = ok(store.list_blobs(None, 100).await)
            .into_iter()
            .map(|b| (b.digest, b.size))
            .collect();
        assert_eq!(left, kept);
        for (d, _) in kept {
            ok(store.delete(d).await);
        }
    }
}
