//! Blob uploads: sessions, chunks, verification, commit, mounts and expiry.
//!
//! Bytes are hashed as they stream past on their way to storage, so finishing an upload costs no
//! second read (unless the process restarted mid-upload, another node wrote the last chunk, or
//! the client chose sha512, in which case the stored bytes are re-read once).
//!
//! One writer per upload at a time, and a writer's bytes are all on disk before the next one
//! starts: each upload has a lock, and the storage writer keeps the held lock
//! ([`crate::storage::WriteGuard`]) until its last write has landed, even when the request that
//! started it was dropped because the client hung up. So a retry never races a late append.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::{FutureExt, Stream, StreamExt};
use oci::{Algorithm, Digest, Hasher, RepositoryName};

use super::{Registry, RequestContext, ServiceError, now_secs};
use crate::metadata::{MetadataError, UploadSession, integrity, queries, quotas};
use crate::storage::{StorageError, UploadExtent, WriteGuard};

/// A request body as the service consumes it.
pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>;

/// Bytes in storage with no upload session are reclaimed once they have not changed for this
/// long: a session is recorded right after its bytes are created, so anything older was left by
/// a crash or a failed metadata write.
const ORPHAN_GRACE: Duration = Duration::from_secs(15 * 60);

/// How long a body may pause before what it sent so far is written out.
const QUIET_SENDER: Duration = Duration::from_millis(50);

/// Bytes to append to an upload.
pub struct Chunk {
    /// Where the client says the chunk starts (its Content-Range); must equal the current size.
    pub start: Option<u64>,
    /// How many bytes the client says the chunk holds (its Content-Range); a body that goes
    /// past it is cut there and refused with 416.
    pub len: Option<u64>,
    pub body: BodyStream,
}

impl Chunk {
    /// A body with no Content-Range: whatever it holds is appended.
    pub fn whole(body: BodyStream) -> Chunk {
        Chunk {
            start: None,
            len: None,
            body,
        }
    }
}

/// Where an upload stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadState {
    pub id: String,
    /// Bytes received so far.
    pub size: u64,
}

/// The per-upload locks of this process. An entry lives while someone holds or waits for it.
#[derive(Default)]
pub(super) struct UploadLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// One upload's lock, held. Dropping the last clone releases the lock and forgets the entry
/// if nobody is waiting for it.
pub(super) struct HeldUpload {
    id: String,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    locks: Arc<UploadLocks>,
}

impl Drop for HeldUpload {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = self.locks.locks.lock().unwrap_or_else(|p| p.into_inner());
        // Two references: the map's and ours. Anyone waiting holds a third.
        if Arc::strong_count(&self.lock) == 2 {
            locks.remove(&self.id);
        }
    }
}

impl UploadLocks {
    fn entry(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(id.to_string()).or_default().clone()
    }

    pub(super) async fn hold(self: &Arc<Self>, id: &str) -> Arc<HeldUpload> {
        let lock = self.entry(id);
        let guard = lock.clone().lock_owned().await;
        self.held(id, lock, guard)
    }

    /// The lock if nobody holds it now. The janitor uses this: an upload whose lock is held is
    /// in use (a chunk streaming, perhaps stalled), so not idle, and waiting for it would let
    /// one stalled client hold up expiry for everyone.
    fn try_hold(self: &Arc<Self>, id: &str) -> Option<Arc<HeldUpload>> {
        let lock = self.entry(id);
        let guard = lock.clone().try_lock_owned().ok()?;
        Some(self.held(id, lock, guard))
    }

    fn held(
        self: &Arc<Self>,
        id: &str,
        lock: Arc<tokio::sync::Mutex<()>>,
        guard: tokio::sync::OwnedMutexGuard<()>,
    ) -> Arc<HeldUpload> {
        Arc::new(HeldUpload {
            id: id.to_string(),
            lock,
            guard: Some(guard),
            locks: self.clone(),
        })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.locks.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// The running hash of an upload at a size, as this node last left it.
pub(super) struct HashState {
    /// The pieces the hasher has seen, all written by this node.
    extent: UploadExtent,
    hasher: Hasher,
    touched: Instant,
}

/// Cuts a body at the length its Content-Range declared and at the largest blob allowed,
/// remembering which limit stopped it.
struct Limits {
    /// Bytes the chunk may still hold, per its Content-Range.
    declared: Option<u64>,
    /// Bytes the upload may still grow by, per `max_blob_bytes`.
    allowed: u64,
}

enum Overrun {
    Declared,
    BlobTooLarge,
}

impl Limits {
    /// The part of `bytes` within both limits, and which limit (if any) cut the rest off.
    fn admit(&mut self, mut bytes: Bytes) -> (Bytes, Option<Overrun>) {
        let mut overrun = None;
        if let Some(declared) = self.declared
            && bytes.len() as u64 > declared
        {
            bytes.truncate(declared as usize);
            overrun = Some(Overrun::Declared);
        }
        if bytes.len() as u64 > self.allowed {
            bytes.truncate(self.allowed as usize);
            overrun = Some(Overrun::BlobTooLarge);
        }
        if let Some(d) = self.declared.as_mut() {
            *d -= bytes.len() as u64;
        }
        self.allowed -= bytes.len() as u64;
        (bytes, overrun)
    }
}

/// Cancels an upload that the client cannot see if the request making it is dropped or fails
/// (a monolithic POST never hands out a Location): its bytes are reclaimed at once rather than
/// at expiry.
struct DiscardOnDrop<'a> {
    registry: &'a Registry,
    id: Option<String>,
}

impl DiscardOnDrop<'_> {
    fn disarm(mut self) {
        self.id = None;
    }
}

impl Drop for DiscardOnDrop<'_> {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else { return };
        let (blobs, metadata, locks) = (
            self.registry.blobs.clone(),
            self.registry.metadata.clone(),
            self.registry.upload_locks.clone(),
        );
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            // Waits for any write the dropped request started to land first.
            let _held = locks.hold(&id).await;
            if let Err(e) = blobs.delete_upload(&id).await {
                tracing::warn!(upload.id = %id, error = %e, "reclaiming an abandoned upload failed; expiry will retry");
                return;
            }
            if let Err(e) = metadata.delete_upload(&id).await {
                tracing::warn!(upload.id = %id, error = %e, "removing an abandoned upload session failed; expiry will retry");
            }
        });
    }
}

/// What an append that storage refused means to the client: the upload is gone (cancelled or
/// committed, perhaps on another node), or it does not end where the chunk starts (a stale
/// client, or another node's append at the same offset won).
fn append_error(e: StorageError, offset: u64) -> ServiceError {
    match e {
        StorageError::NotFound => ServiceError::UploadUnknown,
        StorageError::OffsetMismatch { actual, .. } => ServiceError::RangeMismatch {
            size: actual,
            requested: offset,
        },
        e => e.into(),
    }
}

impl Registry {
    /// The session, if it exists and belongs to `repo`.
    /// The upload, if it is in `repo` and the caller may continue it: only the account that
    /// opened an upload (or the external identity) may, so its id alone is no capability for
    /// anyone else.
    async fn session(
        &self,
        ctx: &RequestContext,
        repo: &RepositoryName,
        id: &str,
    ) -> Result<UploadSession, ServiceError> {
        match self.metadata.get_upload(id).await? {
            Some(s)
                if &s.repository == repo
                    && (s.owner.is_none() || s.owner == ctx.actor().owner()) =>
            {
                Ok(s)
            }
            _ => Err(ServiceError::UploadUnknown),
        }
    }

    async fn stored_size(&self, id: &str) -> Result<u64, ServiceError> {
        self.blobs
            .upload_size(id)
            .await?
            .ok_or(ServiceError::UploadUnknown)
    }

    fn take_hash_state(&self, id: &str) -> Option<HashState> {
        self.hash_states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
    }

    fn forget_upload(&self, id: &str) {
        self.take_hash_state(id);
    }

    pub async fn start_upload(
        &self,
        ctx: &RequestContext,
        repo: &RepositoryName,
    ) -> Result<UploadState, ServiceError> {
        let id = uuid::Uuid::new_v4().to_string();
        // Bytes first, then the session: a session never names a missing upload. Bytes whose
        // session was never recorded are found by the janitor's listing of storage.
        self.blobs.create_upload(&id).await?;
        self.metadata
            .create_upload(&UploadSession {
                id: id.clone(),
                repository: repo.clone(),
                updated_at: now_secs(),
                owner: ctx.actor().owner(),
            })
            .await?;
        Ok(UploadState { id, size: 0 })
    }

    pub async fn upload_status(
        &self,
        ctx: &RequestContext,
        repo: &RepositoryName,
        id: &str,
    ) -> Result<UploadState, ServiceError> {
        self.session(ctx, repo, id).await?;
        let size = self.stored_size(id).await?;
        Ok(UploadState {
            id: id.to_string(),
            size,
        })
    }

    /// Appends a chunk. `start`, when the client gave a Content-Range, must equal the current size.
    pub async fn append_upload(
        &self,
        ctx: &RequestContext,
        repo: &RepositoryName,
        id: &str,
        chunk: Chunk,
    ) -> Result<UploadState, ServiceError> {
        self.session(ctx, repo, id).await?;
        let held = self.upload_locks.hold(id).await;
        let size = self.stored_size(id).await?;
        let size = self.write_chunk(id, size, chunk, held).await?.size;
        // Recorded at a tenth of the idle timeout (at most a minute): precise enough for expiry,
        // and a burst of PATCHes costs one metadata write instead of one each.
        let granularity = (self.options.upload_idle_timeout.as_secs() / 10).min(60) as i64;
        self.metadata
            .touch_upload(id, now_secs(), granularity)
            .await?;
        Ok(UploadState {
            id: id.to_string(),
            size,
        })
    }

    /// Completes an upload with an optional last chunk, verifies `digest`, and makes the blob
    /// readable from `repo`. On a digest mismatch the upload is discarded: nothing is stored.
    pub async fn finish_upload(
        &self,
        ctx: &RequestContext,
        repo: &RepositoryName,
        id: &str,
        digest: &Digest,
        last_chunk: Chunk,
    ) -> Result<u64, ServiceError> {
        self.session(ctx, repo, id).await?;
        let held = self.upload_locks.hold(id).await;
        let size = self.stored_size(id).await?;
        let extent = self.write_chunk(id, size, last_chunk, held.clone()).await?;
        // The blob is made of exactly the pieces hashed, whatever other nodes do meanwhile.
        let (actual, extent) = self.upload_digest(id, extent, digest.algorithm()).await?;
        if &actual != digest {
            self.options.metrics.integrity_error("blob");
            self.discard_upload(id).await?;
            return Err(ServiceError::DigestInvalid(format!(
                "uploaded content has digest {actual}, not {digest}"
            )));
        }
        // One read for both looks before the bytes are stored. A blob that can never fit its
        // namespace's quota is refused now (the exact check is at the manifest, which charges
        // it). A quarantined blob's bad bytes are replaced, not kept, and its quarantine is
        // lifted in the transaction that links the blob; quarantined only after this look, the
        // blob stays quarantined (its bytes were kept): the safe side.
        let (namespace, d, size) = (repo.namespace(), digest.to_string(), extent.size);
        let (over_quota, replace) = self
            .metadata
            .read(|tx| {
                Box::pin(async move {
                    let over_quota = match quotas::check_blob_fits(tx, namespace, &d, size).await {
                        Ok(()) => None,
                        Err(e @ MetadataError::QuotaExceeded { .. }) => Some(e),
                        Err(e) => return Err(e),
                    };
                    Ok((over_quota, integrity::is_quarantined(tx, digest).await?))
                })
            })
            .await?;
        if let Some(e) = over_quota {
            self.discard_upload(id).await?;
            return Err(e.into());
        }
        if replace {
            self.blobs
                .replace_with_upload(id, digest, Some(&extent))
                .await?;
        } else {
            self.blobs.commit_upload(id, digest, Some(&extent)).await?;
        }
        let repaired =
            replace.then(|| ctx.event("blob.repaired", repo, Some(digest), &[], Some(size)));
        let (blobs, repaired_ref) = (&*self.blobs, repaired.as_ref());
        self.metadata
            .write(|tx| {
                Box::pin(async move {
                    queries::finish_upload(tx, repo, digest, size, id, repaired_ref).await?;
                    // In the link's transaction (see `link_confirmed`).
                    super::confirm_bytes(blobs, digest).await
                })
            })
            .await?;
        if replace {
            tracing::info!(blob.digest = %digest, repo.name = %repo, "quarantined blob repaired by a push");
            self.refresh_quarantined_after_repair().await;
        }
        self.forget_upload(id);
        drop(held);
        ctx.log_change("blob pushed", repo, digest, &[]);
        Ok(size)
    }

    /// A whole blob in one request (POST with `?digest=`). The client never learns the upload's
    /// id, so whatever way the request ends short of success, its bytes are reclaimed at once.
    pub async fn upload_monolithic(
        &self,
        ctx: &RequestContext,
        repo: &RepositoryName,
        digest: &Digest,
        body: BodyStream,
    ) -> Result<u64, ServiceError> {
        let upload = self.start_upload(ctx, repo).await?;
        let discard = DiscardOnDrop {
            registry: self,
            id: Some(upload.id.clone()),
        };
        let size = self
            .finish_upload(ctx, repo, &upload.id, digest, Chunk::whole(body))
            .await?;
        discard.disarm();
        Ok(size)
    }

    pub async fn cancel_upload(
        &self,
        ctx: &RequestContext,
        repo: &RepositoryName,
        id: &str,
    ) -> Result<(), ServiceError> {
        self.session(ctx, repo, id).await?;
        let _held = self.upload_locks.hold(id).await;
        self.discard_upload(id).await
    }

    /// Deletes the bytes, then the session. Bytes first: on a full disk the metadata write may
    /// fail, and freeing space must still work; a session left without bytes answers
    /// BLOB_UPLOAD_UNKNOWN and the janitor removes it.
    async fn discard_upload(&self, id: &str) -> Result<(), ServiceError> {
        self.blobs.delete_upload(id).await?;
        self.forget_upload(id);
        if let Err(e) = self.metadata.delete_upload(id).await {
            tracing::warn!(upload.id = %id, error = %e, "upload bytes deleted but its session remains; expiry will remove it");
        }
        Ok(())
    }

    /// Cancels uploads idle for longer than the configured timeout, reclaims upload bytes that
    /// have no session (left by a crash between the two writes), removes sessions whose bytes
    /// are gone, and forgets hash states of uploads another node finished. Returns how many
    /// uploads were removed.
    pub async fn purge_stale_uploads(&self) -> Result<usize, ServiceError> {
        let cutoff = now_secs() - self.options.upload_idle_timeout.as_secs() as i64;
        let stale = self.metadata.stale_uploads(cutoff).await?;
        let mut purged = 0;
        for id in &stale {
            let Some(_held) = self.upload_locks.try_hold(id) else {
                continue; // a chunk is streaming: it is not idle
            };
            // A chunk may have been streaming while the list was taken: it touched the upload
            // when it finished, so look again now that no writer holds it.
            match self.metadata.get_upload(id).await? {
                Some(session) if session.updated_at < cutoff => {}
                _ => continue,
            }
            self.discard_upload(id).await?;
            purged += 1;
        }
        purged += self.reconcile_uploads().await?;
        self.sweep_hash_states().await?;
        Ok(purged)
    }

    /// Storage and metadata must agree on which uploads exist; each side's leftovers go.
    async fn reconcile_uploads(&self) -> Result<usize, ServiceError> {
        let sessions: std::collections::HashSet<String> = self
            .metadata
            .stale_uploads(i64::MAX)
            .await?
            .into_iter()
            .collect();
        let stored = self.blobs.list_uploads().await?;
        let now = SystemTime::now();
        let mut removed = 0;
        for upload in &stored {
            let age = now.duration_since(upload.modified).unwrap_or_default();
            if sessions.contains(&upload.id) || age < ORPHAN_GRACE {
                continue;
            }
            let Some(_held) = self.upload_locks.try_hold(&upload.id) else {
                continue;
            };
            // Look again under the lock: the session may have been recorded meanwhile.
            if self.metadata.get_upload(&upload.id).await?.is_some() {
                continue;
            }
            tracing::info!(upload.id = %upload.id, "reclaiming upload bytes that have no session");
            self.blobs.delete_upload(&upload.id).await?;
            removed += 1;
        }
        let stored: std::collections::HashSet<&str> =
            stored.iter().map(|u| u.id.as_str()).collect();
        for id in sessions.iter().filter(|id| !stored.contains(id.as_str())) {
            let Some(_held) = self.upload_locks.try_hold(id) else {
                continue;
            };
            if self.blobs.upload_size(id).await?.is_none() {
                tracing::info!(upload.id = %id, "removing an upload session whose bytes are gone");
                self.metadata.delete_upload(id).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Forgets hash states of uploads that no longer exist (finished or cancelled on another
    /// node) or that this node has not touched for the idle timeout.
    async fn sweep_hash_states(&self) -> Result<(), ServiceError> {
        let ids: Vec<(String, Instant)> = self
            .hash_states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, s)| (id.clone(), s.touched))
            .collect();
        for (id, touched) in ids {
            let idle = touched.elapsed() > self.options.upload_idle_timeout;
            if idle || self.metadata.get_upload(&id).await?.is_none() {
                self.take_hash_state(&id);
            }
        }
        Ok(())
    }

    /// Streams `body` onto the end of the upload, hashing as it goes. Bytes that arrived before
    /// the body broke off are kept, so the client can resume from the reported size. `held` is
    /// this upload's lock; the storage writer keeps it until its last byte has landed.
    async fn write_chunk(
        &self,
        id: &str,
        offset: u64,
        chunk: Chunk,
        held: Arc<HeldUpload>,
    ) -> Result<UploadExtent, ServiceError> {
        if let Some(requested) = chunk.start
            && requested != offset
        {
            return Err(ServiceError::RangeMismatch {
                size: offset,
                requested,
            });
        }
        let max = self.options.max_blob_bytes;
        if offset > max {
            return Err(ServiceError::BlobTooLarge { limit: max });
        }
        let mut limits = Limits {
            declared: chunk.len,
            allowed: max - offset,
        };
        let mut body = chunk.body;
        let mut hasher = match self.take_hash_state(id) {
            Some(state) if state.extent.size == offset => Some(state.hasher),
            // No state for this size (restart, or another node wrote the last chunk): rebuild
            // it only if needed at finish time, by re-reading.
            _ if offset == 0 => Some(Hasher::new(Algorithm::Sha256)),
            _ => None,
        };
        let guard: WriteGuard = held;
        let mut writer = self
            .blobs
            .append_upload(id, offset, guard)
            .await
            .map_err(|e| append_error(e, offset))?;
        let mut body_error = None;
        let mut write_error = None;
        let mut overrun = None;
        loop {
            // A sender that goes quiet gets its batch written out, so a thousand stalled
            // uploads hold no batches in memory.
            // (No timer at all while the next chunk is already there: the common case.)
            let next = match body.next().now_or_never() {
                Some(next) => next,
                None => match tokio::time::timeout(QUIET_SENDER, body.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        if let Err(e) = writer.flush().await {
                            write_error = Some(e);
                            break;
                        }
                        body.next().await
                    }
                },
            };
            let Some(item) = next else { break };
            match item {
                Ok(bytes) => {
                    let (bytes, cut) = limits.admit(bytes);
                    if let Some(h) = hasher.as_mut() {
                        h.update(&bytes);
                    }
                    if !bytes.is_empty()
                        && let Err(e) = writer.write(bytes).await
                    {
                        write_error = Some(e);
                        break;
                    }
                    if cut.is_some() {
                        overrun = cut;
                        break;
                    }
                }
                Err(e) => {
                    body_error = Some(e);
                    break;
                }
            }
        }
        let extent = writer.finish().await.map_err(|e| append_error(e, offset))?;
        if let Some(e) = write_error {
            return Err(append_error(e, offset));
        }
        // Even when the body broke off, the hasher saw exactly the bytes written, so its state
        // is good for a resumed upload.
        if let Some(hasher) = hasher {
            self.hash_states
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(
                    id.to_string(),
                    HashState {
                        extent: extent.clone(),
                        hasher,
                        touched: Instant::now(),
                    },
                );
        }
        let size = extent.size;
        match (overrun, body_error) {
            (Some(Overrun::Declared), _) => Err(ServiceError::ChunkOverrun { size }),
            (Some(Overrun::BlobTooLarge), _) => Err(ServiceError::BlobTooLarge { limit: max }),
            (None, Some(e)) => Err(ServiceError::Body(e)),
            (None, None) => match limits.declared {
                // The body ended before the length its Content-Range declared.
                Some(missing) if missing > 0 => Err(ServiceError::Body(format!(
                    "body ended {missing} bytes short of its Content-Range"
                ))),
                _ => Ok(extent),
            },
        }
    }

    /// Digest of what the upload holds, and the pieces it was computed over: from the running
    /// hash when it covers `extent` (what the last write left), else by re-reading.
    async fn upload_digest(
        &self,
        id: &str,
        extent: UploadExtent,
        algorithm: Algorithm,
    ) -> Result<(Digest, UploadExtent), ServiceError> {
        if let Some(state) = self.take_hash_state(id)
            && state.extent.size == extent.size
            && state.hasher.algorithm() == algorithm
        {
            return Ok((state.hasher.finish(), state.extent));
        }
        let mut hasher = Hasher::new(algorithm);
        let (mut stream, read) = self.blobs.read_upload(id).await?;
        while let Some(chunk) = stream.next().await {
            hasher.update(&chunk.map_err(StorageError::Io)?);
        }
        Ok((hasher.finish(), read))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn upload_lock_entries_go_when_the_last_holder_does() {
        let locks = Arc::new(UploadLocks::default());
        let first = locks.hold("u").await;
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move { locks.hold("u").await })
        };
        tokio::task::yield_now().await;
        let shared = first.clone();
        drop(first);
        assert_eq!(locks.len(), 1, "a clone still holds the lock");
        drop(shared);
        let second = waiter.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(locks.len(), 1);
        drop(second);
        assert_eq!(locks.len(), 0);
    }

    #[test]
    fn limits_cut_a_body_at_its_declared_length_and_the_blob_limit() {
        let cases: [(Option<u64>, u64, &[usize], usize, bool); 5] = [
            (Some(3), 100, &[10], 3, true),
            (None, 100, &[10, 10], 20, false),
            (None, 15, &[10, 10], 15, true),
            (Some(20), 100, &[10, 10], 20, false),
            (Some(0), 100, &[1], 0, true),
        ];
        for (declared, allowed, chunks, admitted, cut) in cases {
            let mut limits = Limits { declared, allowed };
            let mut total = 0;
            let mut was_cut = false;
            for n in chunks {
                let (bytes, overrun) = limits.admit(Bytes::from(vec![0u8; *n]));
                total += bytes.len();
                if overrun.is_some() {
                    was_cut = true;
                    break;
                }
            }
            assert_eq!((total, was_cut), (admitted, cut), "{declared:?} {allowed}");
        }
    }
}
