//! The source of truth for everything but blob bytes: repositories, which blobs each may read,
//! manifests (their bytes and every reference they make), tags, subjects, upload sessions.
//!
//! Every reference a manifest makes is recorded as a row so that garbage collection can later
//! find what is unreferenced with a query, online, instead of walking storage read-only.

pub mod postgres;
pub mod sqlite;

use std::collections::BTreeMap;

use async_trait::async_trait;
use oci::{Digest, RepositoryName, Tag};

pub use postgres::PostgresMetadata;
pub use sqlite::SqliteMetadata;

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// A manifest references a blob the repository does not have.
    #[error("blob {0} is not in the repository")]
    MissingBlob(Digest),
    /// An index references a manifest the repository does not have.
    #[error("manifest {0} is not in the repository")]
    MissingManifest(Digest),
    #[error("metadata store unavailable: {0}")]
    Unavailable(String),
}

/// A manifest about to be stored, with the references parsed out of it.
#[derive(Debug, Clone)]
pub struct NewManifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Vec<u8>,
    pub blobs: Vec<Digest>,
    pub children: Vec<Digest>,
    pub subject: Option<Digest>,
    pub artifact_type: Option<String>,
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone)]
pub struct StoredManifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Vec<u8>,
}

/// A manifest whose subject is some digest, as the referrers API lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct Referrer {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    pub artifact_type: Option<String>,
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UploadSession {
    pub id: String,
    pub repository: RepositoryName,
    /// Seconds since the Unix epoch of the last byte or status change.
    pub updated_at: i64,
}

/// One page of a sorted listing.
#[derive(Debug, Clone, Copy)]
pub struct Page<'a> {
    /// Return entries strictly after this one.
    pub last: Option<&'a str>,
    pub limit: Option<usize>,
}

#[async_trait]
pub trait MetadataStore: Send + Sync + 'static {
    /// The blob's size if `repo` may read it.
    async fn blob_in_repository(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<Option<u64>, MetadataError>;
    /// Lets `repo` read a committed blob (creating the repository if needed).
    async fn link_blob(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
        size: u64,
    ) -> Result<(), MetadataError>;
    /// Returns false if the repository did not have the blob.
    async fn unlink_blob(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<bool, MetadataError>;

    async fn create_upload(&self, session: &UploadSession) -> Result<(), MetadataError>;
    async fn get_upload(&self, id: &str) -> Result<Option<UploadSession>, MetadataError>;
    async fn touch_upload(&self, id: &str, now: i64) -> Result<(), MetadataError>;
    async fn delete_upload(&self, id: &str) -> Result<(), MetadataError>;
    /// Uploads last touched before `before`.
    async fn stale_uploads(&self, before: i64) -> Result<Vec<String>, MetadataError>;

    /// Stores a manifest and, atomically with it, points `tag` at it. Fails without changing
    /// anything if a referenced blob or child manifest is missing from the repository.
    async fn put_manifest(
        &self,
        repo: &RepositoryName,
        manifest: &NewManifest,
        tag: Option<&Tag>,
    ) -> Result<(), MetadataError>;
    async fn manifest_by_digest(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<Option<StoredManifest>, MetadataError>;
    async fn manifest_by_tag(
        &self,
        repo: &RepositoryName,
        tag: &Tag,
    ) -> Result<Option<StoredManifest>, MetadataError>;
    /// Removes the manifest and every tag pointing at it. False if it was not there.
    async fn delete_manifest(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<bool, MetadataError>;
    /// False if the tag was not there.
    async fn delete_tag(&self, repo: &RepositoryName, tag: &Tag) -> Result<bool, MetadataError>;
    /// Tags sorted lexically (by byte), or `None` if the repository is unknown.
    async fn list_tags(
        &self,
        repo: &RepositoryName,
        page: Page<'_>,
    ) -> Result<Option<Vec<String>>, MetadataError>;
    /// Repositories holding at least one manifest, sorted.
    async fn list_repositories(&self, page: Page<'_>) -> Result<Vec<String>, MetadataError>;
    /// Every repository, including those holding only blobs, sorted (for copying a registry).
    async fn all_repositories(&self) -> Result<Vec<String>, MetadataError>;
    /// Every blob the repository may read, with its size.
    async fn repository_blobs(
        &self,
        repo: &RepositoryName,
    ) -> Result<Vec<(Digest, u64)>, MetadataError>;
    /// Every manifest of the repository, oldest first (so an index follows its children).
    async fn repository_manifests(
        &self,
        repo: &RepositoryName,
    ) -> Result<Vec<StoredManifest>, MetadataError>;
    /// Every tag of the repository with the digest it points at, sorted by tag.
    async fn repository_tags(
        &self,
        repo: &RepositoryName,
    ) -> Result<Vec<(String, Digest)>, MetadataError>;

    /// Manifests in `repo` whose subject is `subject`, oldest first.
    async fn referrers(
        &self,
        repo: &RepositoryName,
        subject: &Digest,
    ) -> Result<Vec<Referrer>, MetadataError>;
}

/// The suite every `MetadataStore` implementation must pass.
#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn name(s: &str) -> RepositoryName {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    fn tag(s: &str) -> Tag {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    fn manifest(seed: &str, blobs: Vec<Digest>, subject: Option<Digest>) -> NewManifest {
        let bytes = format!("{{\"seed\":\"{seed}\"}}").into_bytes();
        NewManifest {
            digest: Digest::sha256_of(&bytes),
            media_type: oci::media_type::OCI_MANIFEST.into(),
            bytes,
            blobs,
            children: vec![],
            subject,
            artifact_type: Some("application/x-test".into()),
            annotations: Some([("k".to_string(), seed.to_string())].into()),
        }
    }

    const ALL: Page<'static> = Page {
        last: None,
        limit: None,
    };

    pub(crate) async fn metadata_suite(store: &dyn MetadataStore) {
        let (a, b) = (name("team/a"), name("team/b"));
        let blob = Digest::sha256_of(b"layer");

        // Blobs are per repository.
        store
            .link_blob(&a, &blob, 5)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            store.blob_in_repository(&a, &blob).await.ok().flatten(),
            Some(5)
        );
        assert_eq!(
            store.blob_in_repository(&b, &blob).await.ok().flatten(),
            None
        );

        // A manifest whose blob is missing from the repository is refused and changes nothing.
        let m1 = manifest("one", vec![blob.clone()], None);
        assert!(matches!(
            store.put_manifest(&b, &m1, Some(&tag("v1"))).await,
            Err(MetadataError::MissingBlob(_))
        ));
        assert_eq!(store.list_tags(&b, ALL).await.ok().flatten(), None);

        // Tags: put, move, sorted listing with pages, delete.
        store
            .put_manifest(&a, &m1, Some(&tag("v1")))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        store
            .put_manifest(&a, &m1, Some(&tag("latest")))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let got = store.manifest_by_tag(&a, &tag("v1")).await.ok().flatten();
        assert_eq!(got.map(|m| m.bytes), Some(m1.bytes.clone()));
        let m2 = manifest("two", vec![], None);
        store
            .put_manifest(&a, &m2, Some(&tag("v1")))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let got = store.manifest_by_tag(&a, &tag("v1")).await.ok().flatten();
        assert_eq!(got.map(|m| m.digest), Some(m2.digest.clone()));
        assert_eq!(
            store.list_tags(&a, ALL).await.ok().flatten(),
            Some(vec!["latest".to_string(), "v1".to_string()])
        );
        let page = Page {
            last: Some("latest"),
            limit: Some(1),
        };
        assert_eq!(
            store.list_tags(&a, page).await.ok().flatten(),
            Some(vec!["v1".to_string()])
        );
        assert!(store.delete_tag(&a, &tag("latest")).await.unwrap_or(false));
        assert!(!store.delete_tag(&a, &tag("latest")).await.unwrap_or(true));
        assert!(
            store
                .manifest_by_digest(&a, &m1.digest)
                .await
                .ok()
                .flatten()
                .is_some()
        );

        // Catalog lists repositories that hold manifests.
        assert_eq!(
            store.list_repositories(ALL).await.ok(),
            Some(vec!["team/a".to_string()])
        );

        // Index children must exist.
        let mut index = manifest("index", vec![], None);
        index.children = vec![Digest::sha256_of(b"nope")];
        assert!(matches!(
            store.put_manifest(&a, &index, None).await,
            Err(MetadataError::MissingManifest(_))
        ));
        index.children = vec![m1.digest.clone()];
        store
            .put_manifest(&a, &index, None)
            .await
            .unwrap_or_else(|e| panic!("{e}"));

        // Referrers, even when pushed before their subject.
        let subject = Digest::sha256_of(b"not pushed yet");
        let sig = manifest("sig", vec![], Some(subject.clone()));
        store
            .put_manifest(&a, &sig, None)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let refs = store.referrers(&a, &subject).await.unwrap_or_default();
        assert_eq!(refs.len(), 1);
        assert_eq!(refs[0].digest, sig.digest);
        assert_eq!(refs[0].size, sig.bytes.len() as u64);
        assert_eq!(refs[0].artifact_type.as_deref(), Some("application/x-test"));
        assert_eq!(refs[0].annotations, sig.annotations);
        assert!(
            store
                .referrers(&b, &subject)
                .await
                .unwrap_or_default()
                .is_empty()
        );

        // Exports, as a registry copy reads them.
        assert_eq!(
            store.all_repositories().await.ok(),
            Some(vec!["team/a".to_string()])
        );
        assert_eq!(
            store.repository_blobs(&a).await.ok(),
            Some(vec![(blob.clone(), 5)])
        );
        let manifests: Vec<Digest> = store
            .repository_manifests(&a)
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|m| m.digest)
            .collect();
        assert_eq!(
            manifests,
            vec![
                m1.digest.clone(),
                m2.digest.clone(),
                index.digest.clone(),
                sig.digest.clone()
            ]
        );
        assert_eq!(
            store.repository_tags(&a).await.ok(),
            Some(vec![("v1".to_string(), m2.digest.clone())])
        );

        // Deleting a manifest removes its tags.
        assert!(store.delete_manifest(&a, &m2.digest).await.unwrap_or(false));
        assert!(
            store
                .manifest_by_tag(&a, &tag("v1"))
                .await
                .ok()
                .flatten()
                .is_none()
        );
        assert_eq!(store.list_tags(&a, ALL).await.ok().flatten(), Some(vec![]));

        // Unlinking a blob.
        assert!(store.unlink_blob(&a, &blob).await.unwrap_or(false));
        assert_eq!(
            store.blob_in_repository(&a, &blob).await.ok().flatten(),
            None
        );

        // Upload sessions and their expiry.
        let s = UploadSession {
            id: "u1".into(),
            repository: a.clone(),
            updated_at: 100,
        };
        store
            .create_upload(&s)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(store.get_upload("u1").await.ok().flatten(), Some(s));
        assert_eq!(
            store.stale_uploads(101).await.ok(),
            Some(vec!["u1".to_string()])
        );
        store
            .touch_upload("u1", 200)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(store.stale_uploads(101).await.ok(), Some(vec![]));
        store
            .delete_upload("u1")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(store.get_upload("u1").await.ok().flatten(), None);
    }
}
