//! Copying a whole registry from one pair of stores to another (for example from the embedded
//! defaults to PostgreSQL + S3), verifying every digest on the way.
//!
//! The copy is idempotent, which is what makes it resumable: blobs the target already holds
//! are skipped, manifests and tags are upserts. Running it again after an interruption
//! continues where it stopped, at the cost of one existence check per item already copied.

use futures_util::TryStreamExt;
use oci::{Digest, Reference, RepositoryName};

use super::{Chunk, ManifestPut, Registry, RequestContext, ServiceError};
use crate::metadata::NewManifest;

/// A copy that stopped, and at what.
#[derive(Debug, thiserror::Error)]
#[error("{at}: {source}")]
pub struct CopyError {
    pub at: String,
    pub source: ServiceError,
}

fn at(what: impl std::fmt::Display) -> impl FnOnce(ServiceError) -> CopyError {
    move |source| CopyError {
        at: what.to_string(),
        source,
    }
}

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
    ) -> Result<CopyReport, CopyError> {
        let ctx = &RequestContext::system("copy");
        let mut report = CopyReport::default();
        let names = self.metadata.all_repositories().await;
        for name in names.map_err(|e| at("listing repositories")(e.into()))? {
            let repo: RepositoryName = name.parse().map_err(|_| {
                at("reading the source")(ServiceError::ManifestInvalid(format!(
                    "stored repository name {name:?} is invalid"
                )))
            })?;
            progress(&repo);
            report.repositories += 1;
            let blobs = self.metadata.repository_blobs(&repo).await;
            for (digest, size) in
                blobs.map_err(|e| at(format!("listing blobs of {repo}"))(e.into()))?
            {
                self.copy_blob(ctx, target, &repo, &digest, size, &mut report)
                    .await
                    .map_err(at(format!("copying blob {digest} of {repo}")))?;
            }
            // Oldest first: an index's children were stored before it, so they exist in the
            // target by the time the index is checked.
            let manifests = self.metadata.repository_manifests(&repo).await;
            for m in manifests.map_err(|e| at(format!("listing manifests of {repo}"))(e.into()))? {
                let reference = Reference::Digest(m.digest.clone());
                target
                    .put_manifest(
                        ctx,
                        &repo,
                        &reference,
                        Some(&m.media_type),
                        m.bytes.to_vec(),
                        ManifestPut::default(),
                    )
                    .await
                    .map_err(at(format!("copying manifest {reference} of {repo}")))?;
                report.manifests += 1;
            }
            let tags = self.metadata.repository_tags(&repo).await;
            for (tag, digest) in
                tags.map_err(|e| at(format!("listing tags of {repo}"))(e.into()))?
            {
                target
                    .copy_tag(ctx, &repo, &tag, &digest)
                    .await
                    .map_err(at(format!("copying tag {tag} of {repo}")))?;
                report.tags += 1;
            }
        }
        Ok(report)
    }

    /// Points `tag` at a manifest this registry already holds.
    async fn copy_tag(
        &self,
        ctx: &RequestContext,
        repo: &RepositoryName,
        tag: &str,
        digest: &Digest,
    ) -> Result<(), ServiceError> {
        let tag = tag
            .parse()
            .map_err(|_| ServiceError::ManifestInvalid(format!("stored tag {tag:?} is invalid")))?;
        let m = self
            .get_manifest(ctx, repo, &Reference::Digest(digest.clone()))
            .await?;
        let parsed = oci::manifest::parse(Some(&m.media_type), &m.bytes)
            .map_err(|e| ServiceError::ManifestInvalid(e.to_string()))?;
        let record = NewManifest {
            digest: m.digest,
            media_type: parsed.media_type,
            bytes: m.bytes.to_vec(),
            blobs: parsed.blobs,
            declared_sizes: Vec::new(),
            children: parsed.children,
            subject: parsed.subject,
            artifact_type: parsed.artifact_type,
            annotations: parsed.annotations,
        };
        self.metadata
            .put_manifest(repo, &record, Some(&tag))
            .await?;
        Ok(())
    }

    async fn copy_blob(
        &self,
        ctx: &RequestContext,
        target: &Registry,
        repo: &RepositoryName,
        digest: &Digest,
        size: u64,
        report: &mut CopyReport,
    ) -> Result<(), ServiceError> {
        if target.blobs.stat(digest).await?.is_some() {
            let blobs = &*target.blobs;
            target
                .metadata
                .write(|tx| Box::pin(super::link_confirmed(tx, blobs, repo, digest, size)))
                .await?;
            report.blobs_skipped += 1;
            return Ok(());
        }
        let read = match self.read_blob(ctx, repo, digest, None).await? {
            Ok(read) => read,
            Err(_) => return Err(ServiceError::BlobUnknown),
        };
        let body = Box::pin(read.body.into_stream().map_err(|e| e.to_string()));
        // The target's upload path hashes the bytes and refuses them if they do not match.
        let upload = target.start_upload(ctx, repo).await?;
        target
            .finish_upload(ctx, repo, &upload.id, digest, Chunk::whole(body))
            .await?;
        report.blobs_copied += 1;
        report.blob_bytes_copied += size;
        Ok(())
    }
}
