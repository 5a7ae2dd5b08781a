//! Small blobs (image configs, small layers, signatures) served from memory.
//!
//! A pull storm asks every node for the same config blob many times a second; from disk each
//! request opens, stats, reads and closes a file, and from object storage it is a round trip.
//! The bytes under a digest never change, so a copy is as good as the original *if* it hashes
//! to the digest: every copy is hashed before it is kept, and a copy that does not match is
//! never kept (its blob is quarantined instead, see [`Registry::small_blob`]). Whether the
//! repository may read the blob is still asked of the metadata on every request: the cache
//! only replaces the read of the bytes. Nothing is invalidated, on any node: verified bytes
//! are right forever, and a blob deleted or quarantined is refused before its bytes are looked
//! up.

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use oci::{Digest, Hasher};

use super::{Registry, ServiceError};
use crate::metadata::integrity::Problem;
use crate::storage::StorageError;

/// Largest blob kept, at most: larger ones stream from the store as before.
pub const MAX_SMALL_BLOB: u64 = 64 * 1024;

#[derive(Clone)]
struct ByLength;

impl quick_cache::Weighter<Digest, Bytes> for ByLength {
    fn weight(&self, _: &Digest, bytes: &Bytes) -> u64 {
        // The digest and the entry itself cost about this much besides the bytes.
        bytes.len() as u64 + 128
    }
}

/// Verified copies of small blobs, bounded in bytes.
pub struct SmallBlobs {
    copies: Option<quick_cache::sync::Cache<Digest, Bytes, ByLength>>,
    /// Blobs up to this size are kept: [`MAX_SMALL_BLOB`], or less in a small cache.
    largest: u64,
}

impl SmallBlobs {
    /// Holds up to `capacity` bytes; 0 keeps nothing.
    pub fn new(capacity: u64) -> SmallBlobs {
        if capacity == 0 {
            return SmallBlobs {
                copies: None,
                largest: 0,
            };
        }
        let estimated = (capacity / 4096).clamp(16, 1 << 16) as usize;
        SmallBlobs {
            copies: Some(quick_cache::sync::Cache::with_weighter(
                estimated, capacity, ByLength,
            )),
            // A single blob may take at most a sixteenth of the cache.
            largest: MAX_SMALL_BLOB.min(capacity / 16),
        }
    }

    /// Whether a blob of `size` bytes is served through the cache.
    pub fn holds(&self, size: u64) -> bool {
        self.copies.is_some() && size <= self.largest
    }
}

impl Registry {
    /// The whole blob, `size` bytes (`size` within [`SmallBlobs::holds`]): the verified copy,
    /// or read from the store and verified now. Bytes that do not hash to `digest` are not
    /// served: the blob is quarantined, as the scrub would, and the pull gets BLOB_UNKNOWN.
    pub(super) async fn small_blob(
        &self,
        digest: &Digest,
        size: u64,
    ) -> Result<Bytes, ServiceError> {
        let Some(copies) = &self.small_blobs.copies else {
            return Err(ServiceError::Internal("the small-blob cache is off".into()));
        };
        if let Some(bytes) = copies.get(digest) {
            return Ok(bytes);
        }
        let mut stream = match self.blobs.read(digest, None).await {
            Ok(s) => s,
            Err(StorageError::NotFound) => return Err(ServiceError::BlobUnknown),
            Err(e) => return Err(e.into()),
        };
        let mut bytes = BytesMut::with_capacity(size as usize);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(StorageError::Io)?;
            // Never more than the recorded size in memory, whatever the store holds.
            if bytes.len() + chunk.len() > size as usize {
                bytes.clear();
                break;
            }
            bytes.extend_from_slice(&chunk);
        }
        let bytes = bytes.freeze();
        let mut hasher = Hasher::new(digest.algorithm());
        hasher.update(&bytes);
        let actual = hasher.finish();
        if bytes.len() as u64 != size || &actual != digest {
            let problem = if bytes.len() as u64 != size {
                Problem::Size
            } else {
                Problem::Mismatch
            };
            let detail = format!(
                "{} bytes read (at most {size} kept) hash to {actual}; {size} bytes recorded",
                bytes.len()
            );
            self.options.metrics.integrity_error("blob");
            self.quarantine("read", digest, size, problem, &detail)
                .await?;
            return Err(ServiceError::BlobQuarantined(digest.clone()));
        }
        copies.insert(digest.clone(), bytes.clone());
        Ok(bytes)
    }
}
