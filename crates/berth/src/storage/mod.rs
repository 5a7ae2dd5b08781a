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
pub mod s3;

use std::io;
use std::pin::Pin;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::Stream;
use oci::Digest;

pub use fs::FsBlobStore;
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
    #[error("storage unavailable: {0}")]
    Io(#[from] io::Error),
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
    /// Waits until every written chunk has reached the store; returns the upload's new size.
    async fn finish(self: Box<Self>) -> Result<u64, StorageError>;
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
    async fn append_upload(
        &self,
        id: &str,
        offset: u64,
    ) -> Result<Box<dyn UploadWriter>, StorageError>;
    /// Streams what an upload holds so far (to rebuild a hash state lost with a restart).
    async fn read_upload(&self, id: &str) -> Result<ByteStream, StorageError>;
    /// Makes the upload's bytes the durable blob `digest` (the caller has verified the digest).
    /// If the blob already exists the upload is simply discarded.
    async fn commit_upload(&self, id: &str, digest: &Digest) -> Result<(), StorageError>;
    async fn delete_upload(&self, id: &str) -> Result<(), StorageError>;

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

    async fn collect(stream: ByteStream) -> Vec<u8> {
        let chunks: Vec<Bytes> = stream.try_collect().await.unwrap_or_else(|e| panic!("{e}"));
        chunks.concat()
    }

    async fn upload(store: &dyn BlobStore, id: &str, parts: &[&[u8]]) {
        store
            .create_upload(id)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut offset = 0;
        for part in parts {
            let mut w = store
                .append_upload(id, offset)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            w.write(Bytes::copy_from_slice(part))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            offset = w.finish().await.unwrap_or_else(|e| panic!("{e}"));
        }
    }

    pub(crate) async fn blob_store_suite(store: &dyn BlobStore) {
        let data = b"hello, blob".repeat(100_000);
        let digest = Digest::sha256_of(&data);
        assert_eq!(store.stat(&digest).await.ok().flatten(), None);
        assert!(matches!(
            store.read(&digest, None).await,
            Err(StorageError::NotFound)
        ));

        // Chunked upload, then commit.
        let (a, b) = data.split_at(400_000);
        upload(store, "u1", &[a, b]).await;
        assert_eq!(
            store.upload_size("u1").await.ok().flatten(),
            Some(data.len() as u64)
        );
        assert_eq!(
            collect(
                store
                    .read_upload("u1")
                    .await
                    .unwrap_or_else(|e| panic!("{e}"))
            )
            .await,
            data
        );
        // Appending at the wrong offset is refused.
        assert!(matches!(
            store.append_upload("u1", 3).await.err(),
            Some(StorageError::OffsetMismatch { expected: 3, .. })
        ));
        store
            .commit_upload("u1", &digest)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(store.upload_size("u1").await.ok().flatten(), None);
        assert_eq!(
            store.stat(&digest).await.ok().flatten(),
            Some(data.len() as u64)
        );
        assert_eq!(
            collect(
                store
                    .read(&digest, None)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"))
            )
            .await,
            data
        );

        // Ranges.
        let part = store
            .read(&digest, Some(ByteRange { start: 5, len: 10 }))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(collect(part).await, &data[5..15]);

        // Committing the same content twice keeps one blob and discards the upload.
        upload(store, "u2", &[&data]).await;
        store
            .commit_upload("u2", &digest)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(store.upload_size("u2").await.ok().flatten(), None);

        // Cancelled uploads vanish.
        upload(store, "u3", &[b"abc"]).await;
        store
            .delete_upload("u3")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(store.upload_size("u3").await.ok().flatten(), None);
        assert!(store.append_upload("u3", 0).await.is_err());

        store
            .delete(&digest)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(store.stat(&digest).await.ok().flatten(), None);
    }
}
