//! Blob uploads: sessions, chunks, verification, commit, mounts and expiry.
//!
//! Bytes are hashed as they stream past on their way to storage, so finishing an upload costs no
//! second read (unless the process restarted mid-upload or the client chose sha512, in which
//! case the stored bytes are re-read once).

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use oci::{Algorithm, Digest, Hasher, RepositoryName};

use super::{Registry, ServiceError, now_secs};
use crate::metadata::UploadSession;
use crate::storage::StorageError;

/// A request body as the service consumes it.
pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>;

/// Bytes to append to an upload.
pub struct Chunk {
    /// Where the client says the chunk starts (its Content-Range); must equal the current size.
    pub start: Option<u64>,
    pub body: BodyStream,
}

/// Where an upload stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadState {
    pub id: String,
    /// Bytes received so far.
    pub size: u64,
}

impl Registry {
    fn upload_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.upload_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(id.to_string()).or_default().clone()
    }

    fn forget_upload(&self, id: &str) {
        self.hash_states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.upload_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// The session, if it exists and belongs to `repo`.
    async fn session(
        &self,
        repo: &RepositoryName,
        id: &str,
    ) -> Result<UploadSession, ServiceError> {
        match self.metadata.get_upload(id).await? {
            Some(s) if &s.repository == repo => Ok(s),
            _ => Err(ServiceError::UploadUnknown),
        }
    }

    async fn stored_size(&self, id: &str) -> Result<u64, ServiceError> {
        self.blobs
            .upload_size(id)
            .await?
            .ok_or(ServiceError::UploadUnknown)
    }

    pub async fn start_upload(&self, repo: &RepositoryName) -> Result<UploadState, ServiceError> {
        let id = uuid::Uuid::new_v4().to_string();
        // Bytes first, then the session: a session never names a missing upload.
        self.blobs.create_upload(&id).await?;
        self.metadata
            .create_upload(&UploadSession {
                id: id.clone(),
                repository: repo.clone(),
                updated_at: now_secs(),
            })
            .await?;
        Ok(UploadState { id, size: 0 })
    }

    pub async fn upload_status(
        &self,
        repo: &RepositoryName,
        id: &str,
    ) -> Result<UploadState, ServiceError> {
        self.session(repo, id).await?;
        let size = self.stored_size(id).await?;
        Ok(UploadState {
            id: id.to_string(),
            size,
        })
    }

    /// Appends a chunk. `start`, when the client gave a Content-Range, must equal the current size.
    pub async fn append_upload(
        &self,
        repo: &RepositoryName,
        id: &str,
        chunk: Chunk,
    ) -> Result<UploadState, ServiceError> {
        self.session(repo, id).await?;
        let lock = self.upload_lock(id);
        let _guard = lock.lock().await;
        let size = self.stored_size(id).await?;
        let size = self.write_chunk(id, size, chunk).await?;
        self.metadata.touch_upload(id, now_secs()).await?;
        Ok(UploadState {
            id: id.to_string(),
            size,
        })
    }

    /// Completes an upload with an optional last chunk, verifies `digest`, and makes the blob
    /// readable from `repo`. On a digest mismatch the upload is discarded: nothing is stored.
    pub async fn finish_upload(
        &self,
        repo: &RepositoryName,
        id: &str,
        digest: &Digest,
        last_chunk: Chunk,
    ) -> Result<u64, ServiceError> {
        self.session(repo, id).await?;
        let lock = self.upload_lock(id);
        let _guard = lock.lock().await;
        let size = self.stored_size(id).await?;
        let size = self.write_chunk(id, size, last_chunk).await?;
        let actual = self.upload_digest(id, size, digest.algorithm()).await?;
        if &actual != digest {
            self.discard_upload(id).await?;
            return Err(ServiceError::DigestInvalid(format!(
                "uploaded content has digest {actual}, not {digest}"
            )));
        }
        self.blobs.commit_upload(id, digest).await?;
        self.metadata.link_blob(repo, digest, size).await?;
        self.metadata.delete_upload(id).await?;
        self.forget_upload(id);
        Ok(size)
    }

    /// A whole blob in one request (POST with `?digest=`).
    pub async fn upload_monolithic(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
        body: BodyStream,
    ) -> Result<u64, ServiceError> {
        let upload = self.start_upload(repo).await?;
        self.finish_upload(repo, &upload.id, digest, Chunk { start: None, body })
            .await
    }

    pub async fn cancel_upload(&self, repo: &RepositoryName, id: &str) -> Result<(), ServiceError> {
        self.session(repo, id).await?;
        let lock = self.upload_lock(id);
        let _guard = lock.lock().await;
        self.discard_upload(id).await
    }

    async fn discard_upload(&self, id: &str) -> Result<(), ServiceError> {
        // Session first: once it is gone no client can reach the bytes being deleted.
        self.metadata.delete_upload(id).await?;
        self.blobs.delete_upload(id).await?;
        self.forget_upload(id);
        Ok(())
    }

    /// Cancels uploads idle for longer than the configured timeout. Returns how many.
    pub async fn purge_stale_uploads(&self) -> Result<usize, ServiceError> {
        let cutoff = now_secs() - self.options.upload_idle_timeout.as_secs() as i64;
        let stale = self.metadata.stale_uploads(cutoff).await?;
        let mut purged = 0;
        for id in &stale {
            let lock = self.upload_lock(id);
            let _guard = lock.lock().await;
            // A chunk may have been streaming while the list was taken: it touched the upload
            // when it finished, so look again now that no writer holds it.
            match self.metadata.get_upload(id).await? {
                Some(session) if session.updated_at < cutoff => {}
                _ => continue,
            }
            self.discard_upload(id).await?;
            purged += 1;
        }
        Ok(purged)
    }

    /// Streams `body` onto the end of the upload, hashing as it goes. Bytes that arrived before
    /// the body broke off are kept, so the client can resume from the reported size.
    async fn write_chunk(&self, id: &str, offset: u64, chunk: Chunk) -> Result<u64, ServiceError> {
        if let Some(requested) = chunk.start
            && requested != offset
        {
            return Err(ServiceError::RangeMismatch {
                size: offset,
                requested,
            });
        }
        let mut body = chunk.body;
        let cached = self
            .hash_states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        let mut hasher = match cached {
            Some((size, hasher)) if size == offset => Some(hasher),
            // No state for this size (restart, or another writer): rebuild it only if needed
            // at finish time, by re-reading.
            _ if offset == 0 => Some(Hasher::new(Algorithm::Sha256)),
            _ => None,
        };
        let mut writer = match self.blobs.append_upload(id, offset).await {
            Ok(w) => w,
            Err(StorageError::NotFound) => return Err(ServiceError::UploadUnknown),
            Err(StorageError::OffsetMismatch { actual, .. }) => {
                return Err(ServiceError::RangeMismatch {
                    size: actual,
                    requested: offset,
                });
            }
            Err(e) => return Err(e.into()),
        };
        let mut body_error = None;
        let mut write_error = None;
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(bytes) => {
                    if let Some(h) = hasher.as_mut() {
                        h.update(&bytes);
                    }
                    if let Err(e) = writer.write(bytes).await {
                        write_error = Some(e);
                        break;
                    }
                }
                Err(e) => {
                    body_error = Some(e);
                    break;
                }
            }
        }
        let size = writer.finish().await?;
        if let Some(e) = write_error {
            return Err(e.into());
        }
        // Even when the body broke off, the hasher saw exactly the bytes written, so its state
        // is good for a resumed upload.
        if let Some(h) = hasher {
            self.hash_states
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id.to_string(), (size, h));
        }
        match body_error {
            Some(e) => Err(ServiceError::Body(e)),
            None => Ok(size),
        }
    }

    /// Digest of what the upload holds, from the running hash when it is current.
    async fn upload_digest(
        &self,
        id: &str,
        size: u64,
        algorithm: Algorithm,
    ) -> Result<Digest, ServiceError> {
        let cached = self
            .hash_states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if let Some((s, hasher)) = cached
            && s == size
            && hasher.algorithm() == algorithm
        {
            return Ok(hasher.finish());
        }
        let mut hasher = Hasher::new(algorithm);
        let mut stream = self.blobs.read_upload(id).await?;
        while let Some(chunk) = stream.next().await {
            hasher.update(&chunk.map_err(StorageError::Io)?);
        }
        Ok(hasher.finish())
    }
}
