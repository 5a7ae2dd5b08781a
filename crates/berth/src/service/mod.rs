//! The registry's rules: what a push must prove before it becomes visible, what a pull may read,
//! what a delete removes. No HTTP types here; the `api` module translates.
//!
//! Order of effects on every write path: blob bytes are made durable in storage first, and only
//! then recorded in metadata. A crash in between leaves unreferenced bytes (harmless, reclaimable)
//! but never metadata that points at missing bytes.

mod copy;
mod uploads;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oci::manifest;
use oci::{Digest, Reference, RepositoryName};

use crate::metadata::{MetadataError, MetadataStore, NewManifest, Page, Referrer, StoredManifest};
use crate::storage::{BlobStore, ByteRange, ByteStream, StorageError};

pub use copy::{CopyError, CopyReport};
pub use uploads::{BodyStream, Chunk, UploadState};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("blob unknown to registry")]
    BlobUnknown,
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
    #[error("manifest is {size} bytes, over the limit of {limit}")]
    ManifestTooLarge { size: usize, limit: usize },
    #[error("blob {0} referenced by the manifest is not in the repository")]
    ManifestBlobUnknown(Digest),
    #[error("manifest {0} referenced by the index is not in the repository")]
    ManifestChildUnknown(Digest),
    /// The request body broke off (client went away or sent garbage framing).
    #[error("request body: {0}")]
    Body(String),
    #[error("backend unavailable: {0}")]
    Unavailable(String),
}

impl From<StorageError> for ServiceError {
    fn from(e: StorageError) -> Self {
        ServiceError::Unavailable(e.to_string())
    }
}

impl From<MetadataError> for ServiceError {
    fn from(e: MetadataError) -> Self {
        match e {
            MetadataError::MissingBlob(d) => ServiceError::ManifestBlobUnknown(d),
            MetadataError::MissingManifest(d) => ServiceError::ManifestChildUnknown(d),
            MetadataError::Unavailable(s) => ServiceError::Unavailable(s),
        }
    }
}

pub struct RegistryOptions {
    pub max_manifest_bytes: usize,
    pub upload_idle_timeout: Duration,
}

pub struct Registry {
    blobs: Arc<dyn BlobStore>,
    metadata: Arc<dyn MetadataStore>,
    options: RegistryOptions,
    /// Hash state of each upload at its current size, so an append continues hashing where the
    /// last one stopped. Lost on restart; rebuilt by re-reading the upload.
    hash_states: Mutex<HashMap<String, (u64, oci::Hasher)>>,
    /// Serialises writers of one upload: a chunk must see the size the previous chunk left.
    upload_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A blob ready to stream: its total size, the part being sent, and the bytes.
pub struct BlobRead {
    pub size: u64,
    pub range: Option<ByteRange>,
    pub body: ByteStream,
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

/// A page of a listing and whether more follow.
pub struct Listing {
    pub items: Vec<String>,
    pub more: bool,
}

pub struct PushedManifest {
    pub digest: Digest,
    pub subject: Option<Digest>,
}

pub(crate) fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Registry {
    pub fn new(
        blobs: Arc<dyn BlobStore>,
        metadata: Arc<dyn MetadataStore>,
        options: RegistryOptions,
    ) -> Registry {
        Registry {
            blobs,
            metadata,
            options,
            hash_states: Mutex::new(HashMap::new()),
            upload_locks: Mutex::new(HashMap::new()),
        }
    }

    pub fn max_manifest_bytes(&self) -> usize {
        self.options.max_manifest_bytes
    }

    /// Size of a blob the repository may read.
    pub async fn stat_blob(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<u64, ServiceError> {
        self.metadata
            .blob_in_repository(repo, digest)
            .await?
            .ok_or(ServiceError::BlobUnknown)
    }

    /// Where to send a client for the blob's bytes instead of serving them (a presigned URL),
    /// for stores configured to redirect. Checks the repository may read the blob first.
    pub async fn blob_redirect(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<Option<String>, ServiceError> {
        if !self.blobs.redirects_gets() {
            return Ok(None);
        }
        self.stat_blob(repo, digest).await?;
        Ok(self.blobs.redirect_url(digest).await?)
    }

    /// Opens a blob (or a range of it) for streaming. `Err(Ok(..))` is an unsatisfiable range.
    pub async fn read_blob(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
        range: Option<RangeRequest>,
    ) -> Result<Result<BlobRead, Unsatisfiable>, ServiceError> {
        let size = self.stat_blob(repo, digest).await?;
        let range = match range.map(|r| r.resolve(size)).transpose() {
            Ok(r) => r,
            Err(unsatisfiable) => return Ok(Err(unsatisfiable)),
        };
        let body = match self.blobs.read(digest, range).await {
            Ok(b) => b,
            // Metadata says yes but the bytes are gone: report it as the client would see it.
            Err(StorageError::NotFound) => return Err(ServiceError::BlobUnknown),
            Err(e) => return Err(e.into()),
        };
        Ok(Ok(BlobRead { size, range, body }))
    }

    /// Removes the blob from the repository. Its bytes stay until garbage collection, since other
    /// repositories may share them.
    pub async fn delete_blob(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<(), ServiceError> {
        if self.metadata.unlink_blob(repo, digest).await? {
            Ok(())
        } else {
            Err(ServiceError::BlobUnknown)
        }
    }

    /// Cross-repository mount: links a blob `from` may read into `repo`. `None` when `from`
    /// does not have it, in which case the caller falls back to an ordinary upload.
    pub async fn mount_blob(
        &self,
        repo: &RepositoryName,
        from: &RepositoryName,
        digest: &Digest,
    ) -> Result<Option<u64>, ServiceError> {
        let Some(size) = self.metadata.blob_in_repository(from, digest).await? else {
            return Ok(None);
        };
        if self.blobs.stat(digest).await?.is_none() {
            return Ok(None);
        }
        self.metadata.link_blob(repo, digest, size).await?;
        Ok(Some(size))
    }

    pub async fn put_manifest(
        &self,
        repo: &RepositoryName,
        reference: &Reference,
        content_type: Option<&str>,
        bytes: Vec<u8>,
    ) -> Result<PushedManifest, ServiceError> {
        if bytes.len() > self.options.max_manifest_bytes {
            return Err(ServiceError::ManifestTooLarge {
                size: bytes.len(),
                limit: self.options.max_manifest_bytes,
            });
        }
        let parsed = manifest::parse(content_type, &bytes)
            .map_err(|e| ServiceError::ManifestInvalid(e.to_string()))?;
        let (digest, tag) = match reference {
            Reference::Digest(expected) => {
                let actual = Digest::of(expected.algorithm(), &bytes);
                if &actual != expected {
                    return Err(ServiceError::DigestInvalid(format!(
                        "manifest digest is {actual}, not {expected}"
                    )));
                }
                (actual, None)
            }
            Reference::Tag(tag) => (Digest::sha256_of(&bytes), Some(tag)),
        };
        let record = NewManifest {
            digest: digest.clone(),
            media_type: parsed.media_type,
            bytes,
            blobs: parsed.blobs,
            children: parsed.children,
            subject: parsed.subject.clone(),
            artifact_type: parsed.artifact_type,
            annotations: parsed.annotations,
        };
        self.metadata.put_manifest(repo, &record, tag).await?;
        Ok(PushedManifest {
            digest,
            subject: parsed.subject,
        })
    }

    pub async fn get_manifest(
        &self,
        repo: &RepositoryName,
        reference: &Reference,
    ) -> Result<StoredManifest, ServiceError> {
        let found = match reference {
            Reference::Tag(tag) => self.metadata.manifest_by_tag(repo, tag).await?,
            Reference::Digest(digest) => self.metadata.manifest_by_digest(repo, digest).await?,
        };
        found.ok_or(ServiceError::ManifestUnknown)
    }

    /// By digest: the manifest and all its tags. By tag: only the tag.
    pub async fn delete_manifest(
        &self,
        repo: &RepositoryName,
        reference: &Reference,
    ) -> Result<(), ServiceError> {
        let deleted = match reference {
            Reference::Tag(tag) => self.metadata.delete_tag(repo, tag).await?,
            Reference::Digest(digest) => self.metadata.delete_manifest(repo, digest).await?,
        };
        if deleted {
            Ok(())
        } else {
            Err(ServiceError::ManifestUnknown)
        }
    }

    pub async fn list_tags(
        &self,
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

    pub async fn list_repositories(
        &self,
        last: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Listing, ServiceError> {
        let page = Page {
            last,
            limit: limit.map(|n| n + 1),
        };
        let mut items = self.metadata.list_repositories(page).await?;
        Ok(truncate(&mut items, limit))
    }

    /// Manifests whose subject is `subject`, optionally only those of one artifact type.
    pub async fn referrers(
        &self,
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
