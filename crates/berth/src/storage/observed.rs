//! [`ObservedStore`]: any [`BlobStore`] with a time budget on each call and its latency and
//! failures recorded in [`Metrics`]. The budgets make a store that stops answering (a network
//! partition, a frozen process: the kernel may still accept connections, so nothing is ever
//! refused) a 503 within seconds instead of a request that hangs.
//!
//! Which calls get which budget follows from what they move. Calls that move a bounded amount
//! (`stat`, `delete`, creating, sizing, opening and deleting uploads, presigning) get the whole
//! operation budget, retries included. Calls that return a stream (`read`, `read_upload`) get
//! the first-byte budget until the stream starts, and none after: a large blob from a slow but
//! live store is never cut off (a store that goes silent half-way is the store's client's to
//! catch; see `s3.rs`). Writing an upload's bytes gets the operation budget per call on its
//! writer (`write`, `flush`, `finish`): each call hands the store at most about one part (on
//! S3, 8 MiB; a part waits for at most one earlier part in flight), so a whole upload of any
//! size is never cut off, but a store that stops taking bytes fails the request within the
//! budget. A live store must therefore take one part per operation budget (1 MiB/s at the
//! defaults). Calls whose single step grows with the blob (committing, listing every upload)
//! get no budget here.
//!
//! A call cut short by its budget is dropped, exactly as when a client hangs up, which every
//! store already handles (see ARCHITECTURE.md, "A push, walked through").

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use oci::Digest;
use tokio::time::Instant;

use super::{
    BlobStore, ByteRange, ByteStream, StorageError, StoredBlob, StoredUpload, UploadExtent,
    UploadWriter, WriteGuard,
};
use crate::metrics::{BackendFailure, BackendOp, Metrics};

pub struct ObservedStore {
    inner: Arc<dyn BlobStore>,
    metrics: Option<Arc<Metrics>>,
    operation: Duration,
    first_byte: Duration,
}

impl ObservedStore {
    pub fn new(
        inner: Arc<dyn BlobStore>,
        metrics: Option<Arc<Metrics>>,
        timeouts: super::BackendTimeouts,
    ) -> ObservedStore {
        ObservedStore {
            inner,
            metrics,
            operation: timeouts.operation,
            first_byte: timeouts.first_byte,
        }
    }

    /// Runs `call` within `budget` (if any) and records it.
    async fn call<T>(
        &self,
        op: BackendOp,
        budget: Option<Duration>,
        call: impl Future<Output = Result<T, StorageError>>,
    ) -> Result<T, StorageError> {
        observe(self.metrics.as_deref(), op, budget, call).await
    }
}

/// Runs `call` within `budget` (if any) and records its latency and failure in `metrics`.
async fn observe<T>(
    metrics: Option<&Metrics>,
    op: BackendOp,
    budget: Option<Duration>,
    call: impl Future<Output = Result<T, StorageError>>,
) -> Result<T, StorageError> {
    let started = Instant::now();
    let result = match budget {
        Some(budget) => match tokio::time::timeout(budget, call).await {
            Ok(result) => result,
            Err(_) => Err(StorageError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the store did not answer {} within {} s",
                    op.labels().1,
                    budget.as_secs_f64()
                ),
            ))),
        },
        None => call.await,
    };
    if let Some(metrics) = metrics {
        let failure = match &result {
            Err(StorageError::Io(e)) if e.kind() == io::ErrorKind::TimedOut => {
                Some(BackendFailure::Timeout)
            }
            Err(StorageError::Io(_)) => Some(BackendFailure::Unavailable),
            Err(StorageError::Internal(_)) => Some(BackendFailure::Internal),
            // Answers, not failures of the store.
            Ok(_)
            | Err(
                StorageError::NotFound
                | StorageError::OffsetMismatch { .. }
                | StorageError::Conflict(_),
            ) => None,
        };
        metrics.backend(op, started.elapsed(), failure);
    }
    result
}

/// An upload writer whose every call gets the operation budget (see the module's comment).
/// A call cut short by the budget leaves the inner writer mid-call, in a state nobody can
/// trust, so every later call fails at once with the same timeout (the request answers 503
/// within one budget, not one per call; what reached the store before stays).
struct ObservedWriter {
    inner: Box<dyn UploadWriter>,
    metrics: Option<Arc<Metrics>>,
    budget: Duration,
    timed_out: bool,
}

impl ObservedWriter {
    async fn call<T>(
        metrics: Option<&Metrics>,
        budget: Duration,
        timed_out: &mut bool,
        call: impl Future<Output = Result<T, StorageError>>,
    ) -> Result<T, StorageError> {
        if *timed_out {
            return Err(StorageError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                "an earlier write of this upload did not finish within its budget",
            )));
        }
        let result = observe(metrics, BackendOp::StorageWriteUpload, Some(budget), call).await;
        *timed_out =
            matches!(&result, Err(StorageError::Io(e)) if e.kind() == io::ErrorKind::TimedOut);
        result
    }
}

#[async_trait]
impl UploadWriter for ObservedWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StorageError> {
        let metrics = self.metrics.as_deref();
        let call = self.inner.write(chunk);
        Self::call(metrics, self.budget, &mut self.timed_out, call).await
    }

    async fn finish(mut self: Box<Self>) -> Result<UploadExtent, StorageError> {
        let ObservedWriter {
            inner,
            metrics,
            budget,
            mut timed_out,
        } = *self;
        Self::call(metrics.as_deref(), budget, &mut timed_out, inner.finish()).await
    }

    async fn flush(&mut self) -> Result<(), StorageError> {
        let metrics = self.metrics.as_deref();
        let call = self.inner.flush();
        Self::call(metrics, self.budget, &mut self.timed_out, call).await
    }
}

#[async_trait]
impl BlobStore for ObservedStore {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        let budget = Some(self.operation);
        self.call(BackendOp::StorageStat, budget, self.inner.stat(digest))
            .await
    }

    async fn read(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<ByteStream, StorageError> {
        let budget = Some(self.first_byte);
        self.call(
            BackendOp::StorageRead,
            budget,
            self.inner.read(digest, range),
        )
        .await
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StorageError> {
        let budget = Some(self.operation);
        self.call(BackendOp::StorageDelete, budget, self.inner.delete(digest))
            .await
    }

    async fn create_upload(&self, id: &str) -> Result<(), StorageError> {
        let budget = Some(self.operation);
        let call = self.inner.create_upload(id);
        self.call(BackendOp::StorageCreateUpload, budget, call)
            .await
    }

    async fn upload_size(&self, id: &str) -> Result<Option<u64>, StorageError> {
        let budget = Some(self.operation);
        let call = self.inner.upload_size(id);
        self.call(BackendOp::StorageUploadSize, budget, call).await
    }

    async fn append_upload(
        &self,
        id: &str,
        offset: u64,
        guard: WriteGuard,
    ) -> Result<Box<dyn UploadWriter>, StorageError> {
        let budget = Some(self.operation);
        let call = self.inner.append_upload(id, offset, guard);
        let inner = self
            .call(BackendOp::StorageAppendUpload, budget, call)
            .await?;
        Ok(Box::new(ObservedWriter {
            inner,
            metrics: self.metrics.clone(),
            budget: self.operation,
            timed_out: false,
        }))
    }

    async fn read_upload(&self, id: &str) -> Result<(ByteStream, UploadExtent), StorageError> {
        let budget = Some(self.first_byte);
        let call = self.inner.read_upload(id);
        self.call(BackendOp::StorageReadUpload, budget, call).await
    }

    async fn commit_upload(
        &self,
        id: &str,
        digest: &Digest,
        extent: Option<&UploadExtent>,
    ) -> Result<(), StorageError> {
        let call = self.inner.commit_upload(id, digest, extent);
        self.call(BackendOp::StorageCommitUpload, None, call).await
    }

    async fn replace_with_upload(
        &self,
        id: &str,
        digest: &Digest,
        extent: Option<&UploadExtent>,
    ) -> Result<(), StorageError> {
        let call = self.inner.replace_with_upload(id, digest, extent);
        self.call(BackendOp::StorageCommitUpload, None, call).await
    }

    async fn delete_upload(&self, id: &str) -> Result<(), StorageError> {
        let budget = Some(self.operation);
        let call = self.inner.delete_upload(id);
        self.call(BackendOp::StorageDeleteUpload, budget, call)
            .await
    }

    async fn list_uploads(&self) -> Result<Vec<StoredUpload>, StorageError> {
        let call = self.inner.list_uploads();
        self.call(BackendOp::StorageListUploads, None, call).await
    }

    async fn list_blobs(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<StoredBlob>, StorageError> {
        let budget = Some(self.operation);
        let call = self.inner.list_blobs(after, limit);
        self.call(BackendOp::StorageListBlobs, budget, call).await
    }

    async fn delete_blobs(&self, digests: &[Digest]) -> Result<(), StorageError> {
        let budget = Some(self.operation);
        let call = self.inner.delete_blobs(digests);
        self.call(BackendOp::StorageDeleteBlobs, budget, call).await
    }

    fn redirects_gets(&self) -> bool {
        self.inner.redirects_gets()
    }

    async fn redirect_url(&self, digest: &Digest) -> Result<Option<String>, StorageError> {
        let budget = Some(self.operation);
        let call = self.inner.redirect_url(digest);
        self.call(BackendOp::StorageRedirectUrl, budget, call).await
    }
}
