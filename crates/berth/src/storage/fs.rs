//! Blobs on a local filesystem.
//!
//! Layout under the root: `blobs/<algorithm>/<first two hex>/<hex>` for committed blobs and
//! `uploads/<id>` for uploads in progress. Both live on one filesystem so that committing is a
//! rename: the upload is fsynced, renamed into place, and the directory fsynced, so a crash
//! leaves either the whole blob or none of it.
//!
//! File IO can block, but no transfer holds a blocking thread for its duration. A read is first
//! tried without blocking (`preadv2` with `RWF_NOWAIT`: it succeeds only from the page cache),
//! inline on the async task, where a hop to the blocking pool would cost more than the read
//! itself; only bytes that must come from the disk are read on the blocking pool, one chunk per
//! task. Writes are one short blocking task per batch. So a thousand clients that stall
//! mid-transfer hold memory for a chunk each but no thread, and a slow disk blocks only the
//! blocking pool, never the async workers.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::io::IoSliceMut;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use oci::Digest;
use tokio::task::JoinHandle;

use super::{
    BlobStore, ByteRange, ByteStream, StorageError, StoredBlob, StoredUpload, UploadExtent,
    UploadWriter, WriteGuard,
};

/// Size of each chunk read from disk: large enough for few syscalls and task hops, small
/// enough that a stalled pull holds little (one chunk being sent and one read ahead: 600
/// clients that stop reading hold 150 MiB between them).
const READ_CHUNK: usize = 128 * 1024;
/// Reads up to this size are answered in one piece; larger ones stream chunk by chunk.
const INLINE_READ: u64 = 128 * 1024;
/// While an upload streams in, the bytes written so far are flushed to disk in the
/// background every this many bytes, so the fsync before the 201 finds little left to do.
const FLUSH_EVERY: u64 = 32 * 1024 * 1024;
/// Writes are coalesced up to this size before reaching the file.
const WRITE_BATCH: usize = 1024 * 1024;

pub struct FsBlobStore {
    root: PathBuf,
}

impl FsBlobStore {
    pub fn open(root: &Path) -> io::Result<FsBlobStore> {
        fs::create_dir_all(root.join("blobs"))?;
        fs::create_dir_all(root.join("uploads"))?;
        Ok(FsBlobStore {
            root: root.to_path_buf(),
        })
    }

    /// Renames a verified upload to `digest`'s path. `replace`: even over a blob of the same
    /// size (whose bytes failed an integrity check); otherwise such a blob is kept.
    async fn commit(
        &self,
        id: &str,
        digest: &Digest,
        extent: Option<&UploadExtent>,
        replace: bool,
    ) -> Result<(), StorageError> {
        let from = self.upload_path(id);
        let to = self.blob_path(digest);
        let expected = extent.map(|e| e.size);
        blocking(move || {
            let upload = File::open(&from)?;
            let upload_len = upload.metadata()?.len();
            // One file, appended only under the upload's lock: it cannot have changed since it
            // was hashed, and if it somehow has, it is not the bytes of `digest`.
            if expected.is_some_and(|size| size != upload_len) {
                return Err(io::Error::other(format!(
                    "upload holds {upload_len} bytes, not the {expected:?} that were hashed"
                )));
            }
            // Content-addressed: the same digest is the same bytes, so an existing blob of the
            // right size is kept, unless asked to replace it (its bytes failed a check). One
            // of another size cannot hold these bytes (it was damaged after it was written);
            // the verified upload replaces it. The rename swaps the file atomically: a reader
            // that opened the old one keeps reading it, later ones get the new.
            if !replace
                && not_found_as_none(fs::metadata(&to))?.is_some_and(|m| m.len() == upload_len)
            {
                return not_found_as_none(fs::remove_file(&from)).map(|_| ());
            }
            upload.sync_all()?;
            drop(upload);
            let dir = to
                .parent()
                .ok_or_else(|| io::Error::other("blob path has no parent"))?;
            if !dir.exists() {
                fs::create_dir_all(dir)?;
                if let Some(parent) = dir.parent() {
                    fsync_dir(parent)?;
                }
            }
            fs::rename(&from, &to)?;
            fsync_dir(dir)?;
            if let Some(uploads) = from.parent() {
                fsync_dir(uploads)?;
            }
            Ok(())
        })
        .await
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root
            .join("blobs")
            .join(digest.algorithm().as_str())
            .join(&hex[..2])
            .join(hex)
    }

    fn upload_path(&self, id: &str) -> PathBuf {
        // Ids are generated by the service as UUIDs; refuse anything that could escape the dir.
        debug_assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        self.root.join("uploads").join(id)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, StorageError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(StorageError::from),
        Err(e) => Err(join_error(e)),
    }
}

fn not_found_as_none<T>(r: io::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn join_error(e: tokio::task::JoinError) -> StorageError {
    StorageError::Internal(format!("blocking file task failed: {e}"))
}

fn not_found_as_storage(e: StorageError) -> StorageError {
    match e {
        StorageError::Io(io) if io.kind() == io::ErrorKind::NotFound => StorageError::NotFound,
        other => other,
    }
}

/// Reads `len` bytes at `at`, or fails if the file ends first.
fn read_exact_at(file: &File, at: u64, len: usize) -> io::Result<Bytes> {
    let mut buf = BytesMut::zeroed(len);
    file.read_exact_at(&mut buf, at)?;
    Ok(buf.freeze())
}

/// Reads up to `len` bytes at `at` only as far as they are in the page cache, without blocking:
/// `None` when the first byte is not (or the kernel cannot tell), else what was there.
fn read_cached(file: &File, at: u64, len: usize) -> io::Result<Option<Bytes>> {
    let mut buf = BytesMut::zeroed(len);
    let mut done = 0;
    while done < len {
        let mut slices = [IoSliceMut::new(&mut buf[done..])];
        match rustix::io::preadv2(
            file,
            &mut slices,
            at + done as u64,
            rustix::io::ReadWriteFlags::NOWAIT,
        ) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "blob shorter than expected",
                ));
            }
            Ok(n) => done += n,
            // Not cached (or a kernel or filesystem without RWF_NOWAIT): what we have, if any.
            Err(
                rustix::io::Errno::AGAIN | rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS,
            ) => break,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if done == 0 {
        return Ok(None);
    }
    buf.truncate(done);
    Ok(Some(buf.freeze()))
}

/// Reads up to `len` bytes at `at`: from the page cache inline if they are there, else on the
/// blocking pool.
async fn read_chunk(file: &Arc<File>, at: u64, len: usize) -> io::Result<Bytes> {
    if let Some(bytes) = read_cached(file, at, len)? {
        return Ok(bytes);
    }
    let file = file.clone();
    match tokio::task::spawn_blocking(move || read_exact_at(&file, at, len)).await {
        Ok(r) => r,
        Err(e) => Err(io::Error::other(e)),
    }
}

/// Streams `len` bytes of `file` from `start`, a chunk at a time as the socket takes them.
/// Nothing is read ahead: a pull whose client stops reading holds at most the chunk being
/// sent.
fn stream_file(file: File, start: u64, len: u64) -> ByteStream {
    let state = (Arc::new(file), start, start + len);
    Box::pin(futures_util::stream::unfold(
        state,
        |(file, pos, end)| async move {
            if pos >= end {
                return None;
            }
            let want = (end - pos).min(READ_CHUNK as u64) as usize;
            match read_chunk(&file, pos, want).await {
                Ok(bytes) => {
                    let next = pos + bytes.len() as u64;
                    Some((Ok(bytes), (file, next, end)))
                }
                // Stop after reporting the error.
                Err(e) => Some((Err(e), (file, end, end))),
            }
        },
    ))
}

/// Opens `path` and resolves `range` against its size: (file, start, length).
fn open_range(path: &Path, range: Option<ByteRange>) -> io::Result<(File, u64, u64)> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let (start, len) = match range {
        Some(r) => (r.start, r.len.min(size.saturating_sub(r.start))),
        None => (0, size),
    };
    Ok((file, start, len))
}

#[async_trait]
impl BlobStore for FsBlobStore {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        let path = self.blob_path(digest);
        blocking(move || not_found_as_none(fs::metadata(path)).map(|m| m.map(|m| m.len()))).await
    }

    async fn read(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<ByteStream, StorageError> {
        let path = self.blob_path(digest);
        // Open and stat inline: both are cheap on a cached directory entry, and they tell
        // whether the read can be answered in one piece.
        let (file, start, len) =
            open_range(&path, range).map_err(|e| not_found_as_storage(e.into()))?;
        if len <= INLINE_READ && len > 0 {
            let file = Arc::new(file);
            let mut bytes = read_chunk(&file, start, len as usize).await?;
            while (bytes.len() as u64) < len {
                // Partly cached: the rest as it comes.
                let got = bytes.len();
                let rest = read_chunk(&file, start + got as u64, len as usize - got).await?;
                bytes = [bytes, rest].concat().into();
            }
            return Ok(Box::pin(futures_util::stream::once(async { Ok(bytes) })));
        }
        Ok(stream_file(file, start, len))
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StorageError> {
        let path = self.blob_path(digest);
        blocking(move || not_found_as_none(fs::remove_file(path)).map(|_| ())).await
    }

    async fn create_upload(&self, id: &str) -> Result<(), StorageError> {
        let path = self.upload_path(id);
        blocking(move || {
            OpenOptions::new().write(true).create_new(true).open(path)?;
            Ok(())
        })
        .await
    }

    async fn upload_size(&self, id: &str) -> Result<Option<u64>, StorageError> {
        let path = self.upload_path(id);
        blocking(move || not_found_as_none(fs::metadata(path)).map(|m| m.map(|m| m.len()))).await
    }

    async fn append_upload(
        &self,
        id: &str,
        offset: u64,
        guard: WriteGuard,
    ) -> Result<Box<dyn UploadWriter>, StorageError> {
        let path = self.upload_path(id);
        let (file, actual) = blocking(move || {
            // Not O_APPEND: every write goes to an explicit offset, so a write can only ever
            // land where this writer was told the upload ends.
            let file = OpenOptions::new().write(true).open(path)?;
            let len = file.metadata()?.len();
            Ok((file, len))
        })
        .await
        .map_err(not_found_as_storage)?;
        if actual != offset {
            return Err(StorageError::OffsetMismatch {
                expected: offset,
                actual,
            });
        }
        Ok(Box::new(FsUploadWriter {
            file: Arc::new(file),
            offset,
            batch: BytesMut::new(),
            in_flight: None,
            unflushed: 0,
            flushing: Arc::new(AtomicBool::new(false)),
            guard,
        }))
    }

    async fn read_upload(&self, id: &str) -> Result<(ByteStream, UploadExtent), StorageError> {
        let path = self.upload_path(id);
        let (file, start, len) = blocking(move || open_range(&path, None))
            .await
            .map_err(not_found_as_storage)?;
        let extent = UploadExtent {
            size: len,
            pieces: Vec::new(),
        };
        Ok((stream_file(file, start, len), extent))
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
        let path = self.upload_path(id);
        blocking(move || not_found_as_none(fs::remove_file(path)).map(|_| ())).await
    }

    async fn list_blobs(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<StoredBlob>, StorageError> {
        let (root, after) = (self.root.clone(), after.cloned());
        blocking(move || list_blob_files(&root, after.as_ref(), limit)).await
    }

    async fn delete_blobs(&self, digests: &[Digest]) -> Result<(), StorageError> {
        let paths: Vec<PathBuf> = digests.iter().map(|d| self.blob_path(d)).collect();
        blocking(move || {
            for path in paths {
                not_found_as_none(fs::remove_file(path))?;
            }
            Ok(())
        })
        .await
    }

    async fn list_uploads(&self) -> Result<Vec<StoredUpload>, StorageError> {
        let dir = self.root.join("uploads");
        blocking(move || {
            let mut uploads = Vec::new();
            for entry in fs::read_dir(dir)? {
                let entry = entry?;
                let Some(meta) = not_found_as_none(entry.metadata())? else {
                    continue; // deleted while listing
                };
                uploads.push(StoredUpload {
                    id: entry.file_name().to_string_lossy().into_owned(),
                    modified: meta.modified()?,
                });
            }
            Ok(uploads)
        })
        .await
    }
}

/// The algorithms whose blobs live under `blobs/<algorithm>/`, in the order their digests sort.
const ALGORITHMS: [&str; 2] = ["sha256", "sha512"];

/// Up to `limit` blobs under `root/blobs` after `after`, in digest order: one fan-out
/// directory at a time, starting at `after`'s, so a page costs a directory or two.
fn list_blob_files(
    root: &Path,
    after: Option<&Digest>,
    limit: usize,
) -> io::Result<Vec<StoredBlob>> {
    let after_text = after.map(|d| d.to_string());
    let mut found = Vec::new();
    for algorithm in ALGORITHMS {
        if let Some(a) = after
            && a.algorithm().as_str() > algorithm
        {
            continue;
        }
        let Some(fans) = not_found_as_none(fs::read_dir(root.join("blobs").join(algorithm)))?
        else {
            continue;
        };
        let mut fans: Vec<String> = fans
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        fans.sort();
        for fan in fans {
            if let Some(a) = after
                && a.algorithm().as_str() == algorithm
                && fan.as_str() < &a.hex()[..2]
            {
                continue;
            }
            let dir = root.join("blobs").join(algorithm).join(&fan);
            let Some(entries) = not_found_as_none(fs::read_dir(&dir))? else {
                continue;
            };
            let mut page = Vec::new();
            for entry in entries {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let Ok(digest) = format!("{algorithm}:{name}").parse::<Digest>() else {
                    continue; // not a blob (a stray temporary file)
                };
                if after_text
                    .as_deref()
                    .is_some_and(|a| digest.to_string().as_str() <= a)
                {
                    continue;
                }
                let Some(meta) = not_found_as_none(entry.metadata())? else {
                    continue; // deleted while listing
                };
                page.push(StoredBlob {
                    digest,
                    size: meta.len(),
                    modified: meta.modified()?,
                });
            }
            page.sort_by_key(|b| b.digest.to_string());
            found.extend(page);
            if found.len() >= limit {
                found.truncate(limit);
                return Ok(found);
            }
        }
    }
    Ok(found)
}

/// Writes an upload in batches of up to [`WRITE_BATCH`], each a short blocking task writing at
/// an explicit offset; one batch is written while the next arrives. Every task holds the
/// caller's [`WriteGuard`], so a writer dropped mid-transfer keeps it until its last write has
/// landed.
struct FsUploadWriter {
    file: Arc<File>,
    /// Where the next batch goes: the upload's size once everything queued has landed.
    offset: u64,
    batch: BytesMut,
    in_flight: Option<JoinHandle<io::Result<()>>>,
    unflushed: u64,
    /// A background `sync_data` is running (at most one per upload).
    flushing: Arc<AtomicBool>,
    guard: WriteGuard,
}

impl FsUploadWriter {
    async fn wait_in_flight(&mut self) -> Result<(), StorageError> {
        if let Some(handle) = self.in_flight.take() {
            handle.await.map_err(join_error)??;
        }
        Ok(())
    }

    /// Starts writing `bytes` at the current offset, after the previous batch has landed.
    async fn send(&mut self, bytes: Bytes) -> Result<(), StorageError> {
        self.wait_in_flight().await?;
        let (file, at, guard) = (self.file.clone(), self.offset, self.guard.clone());
        self.offset += bytes.len() as u64;
        self.unflushed += bytes.len() as u64;
        self.in_flight = Some(tokio::task::spawn_blocking(move || {
            let _guard = guard;
            file.write_all_at(&bytes, at)
        }));
        if self.unflushed >= FLUSH_EVERY {
            self.unflushed = 0;
            self.start_writeback();
        }
        Ok(())
    }

    /// Starts writeback of a large upload while it is still arriving, so the fsync before the
    /// 201 finds little left to do; without it, every byte of a large push would be flushed
    /// only after the transfer, doubling its duration. Errors here are not lost: the fsync at
    /// commit reports them.
    fn start_writeback(&self) {
        if self.flushing.swap(true, Ordering::AcqRel) {
            return; // a flush already running covers these bytes too
        }
        let (file, flushing) = (self.file.clone(), self.flushing.clone());
        tokio::task::spawn_blocking(move || {
            let _ = file.sync_data();
            flushing.store(false, Ordering::Release);
        });
    }
}

#[async_trait]
impl UploadWriter for FsUploadWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StorageError> {
        if self.batch.is_empty() && chunk.len() >= WRITE_BATCH {
            return self.send(chunk).await;
        }
        self.batch.extend_from_slice(&chunk);
        if self.batch.len() >= WRITE_BATCH {
            let bytes = self.batch.split().freeze();
            self.send(bytes).await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), StorageError> {
        if !self.batch.is_empty() {
            // A new buffer rather than the rest of the old one, so the old allocation is freed
            // once its write lands.
            let bytes = std::mem::take(&mut self.batch).freeze();
            self.send(bytes).await?;
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<UploadExtent, StorageError> {
        if !self.batch.is_empty() {
            let bytes = self.batch.split().freeze();
            self.send(bytes).await?;
        }
        self.wait_in_flight().await?;
        // A chunked push writes each PATCH through its own writer, none reaching FLUSH_EVERY:
        // start writeback of each chunk now, or the fsync before the final 201 would find the
        // whole blob still to write.
        if self.unflushed > 0 {
            self.start_writeback();
        }
        Ok(UploadExtent {
            size: self.offset,
            pieces: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::tests::blob_store_suite;

    /// Bytes not in the page cache come from the blocking pool, whole and in order.
    #[tokio::test(flavor = "multi_thread")]
    async fn reads_what_the_page_cache_does_not_hold() {
        use futures_util::TryStreamExt;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("cold");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap_or_else(|e| panic!("{e}"));
        let file = File::open(&path).unwrap_or_else(|e| panic!("{e}"));
        file.sync_all().unwrap_or_else(|e| panic!("{e}"));
        // Written back, so the kernel may drop the pages when asked; asked again a few
        // times, since it may keep them a moment longer (seen once in a full CI run).
        let mut cold = Some(Bytes::new());
        for _ in 0..20 {
            rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed)
                .unwrap_or_else(|e| panic!("{e}"));
            cold = read_cached(&file, 0, READ_CHUNK).unwrap_or_else(|e| panic!("{e}"));
            if cold.is_none() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(
            cold.is_none(),
            "the first chunk is still cached: the blocking path is not exercised"
        );
        let chunks: Vec<Bytes> = stream_file(file, 5, data.len() as u64 - 5)
            .try_collect()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(chunks.concat(), &data[5..]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn passes_the_shared_suite() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = FsBlobStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        blob_store_suite(&store).await;
    }
}
