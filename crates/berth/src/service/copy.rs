//! Copying a whole registry from one pair of stores to another (for example from the embedded
//! defaults to PostgreSQL + S3), verifying every digest on the way.
//!
//! The copy is idempotent, which is what makes it resumable: blobs the target already holds
//! are skipped, manifests and tags are upserts. Running it again after an interruption
//! continues where it stopped, at the cost of one existence check per item already copied.

use futures_util::TryStreamExt;
use oci::{Digest, Reference, RepositoryName};

use super::{Chunk, Registry, ServiceError};
use crate::metadata::NewManifest;

/// What one copy did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CopyReport {
    pub repositories: usize,
    pub blobs_copied: usize,
    pub blob_bytes_copied: u64,
    /// Blobs the target already had (a resumed or repeated copy).
    pub blobs_skipped: usize,
    pub manifests: usize,
    pub tags: usize,
}

impl Registry {
    /// Copies every repository of `self` into `target`. `progress` is told about each
    /// repository as it starts.
    pub async fn copy_into(
        &self,
        target: &Registry,
        mut progress: impl FnMut(&RepositoryName),
    ) -> Result<CopyReport, ServiceError> {
        let mut report = CopyReport::default();
        for name in self.metadata.all_repositories().await? {
            let repo: RepositoryName = name.parse().map_err(|_| {
                ServiceError::Unavailable(format!("stored repository name {name:?} is invalid"))
            })?;
            progress(&repo);
            report.repositories += 1;
            for (digest, size) in self.metadata.repository_blobs(&repo).await? {
                self.copy_blob(target, &repo, &digest, size, &mut report)
                    .await?;
            }
            // Oldest first: an index's children were stored before it, so they exist in the
            // target by the time the index is checked.
            for m in self.metadata.repository_manifests(&repo).await? {
                target
                    .put_manifest(
                        &repo,
                        &Reference::Digest(m.digest.clone()),
                        Some(&m.media_type),
                        m.bytes,
                    )
                    .await?;
                report.manifests += 1;
            }
            for (tag, digest) in self.metadata.repository_tags(&repo).await? {
                let tag = tag.parse().map_err(|_| {
                    ServiceError::Unavailable(format!("stored tag {tag:?} is invalid"))
                })?;
                let m = target
                    .get_manifest(&repo, &Reference::Digest(digest))
                    .await?;
                let parsed = oci::manifest::parse(Some(&m.media_type), &m.bytes)
                    .map_err(|e| ServiceError::ManifestInvalid(e.to_string()))?;
                let record = NewManifest {
                    digest: m.digest,
                    media_type: parsed.media_type,
                    bytes: m.bytes,
                    blobs: parsed.blobs,
                    children: parsed.children,
                    subject: parsed.subject,
                    artifact_type: parsed.artifact_type,
                    annotations: parsed.annotations,
                };
                target
                    .metadata
                    .put_manifest(&repo, &record, Some(&tag))
                    .await?;
                report.tags += 1;
            }
        }
        Ok(report)
    }

    async fn copy_blob(
        &self,
        target: &Registry,
        repo: &RepositoryName,
        digest: &Digest,
        size: u64,
        report: &mut CopyReport,
    ) -> Result<(), ServiceError> {
        if target.blobs.stat(digest).await?.is_some() {
            target.metadata.link_blob(repo, digest, size).await?;
            report.blobs_skipped += 1;
            return Ok(());
        }
        let read = match self.read_blob(repo, digest, None).await? {
            Ok(read) => read,
            Err(_) => return Err(ServiceError::BlobUnknown),
        };
        let body = Box::pin(read.body.map_err(|e| e.to_string()));
        // The target's upload path hashes the bytes and refuses them if they do not match.
        let upload = target.start_upload(repo).await?;
        target
            .finish_upload(repo, &upload.id, digest, Chunk { start: None, body })
            .await?;
        report.blobs_copied += 1;
        report.blob_bytes_copied += size;
        Ok(())
    }
}
