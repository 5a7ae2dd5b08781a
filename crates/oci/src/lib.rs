//! Pure OCI domain types: digests, repository names, tags, manifest parsing and media types.
//!
//! This crate performs no IO, knows nothing about HTTP or async, and never allocates a blob's
//! bytes: it only validates and describes. Everything that crosses the registry's boundary is
//! parsed into one of these types first, so the rest of Berth can trust it.

pub mod digest;
pub mod manifest;
pub mod media_type;
pub mod name;

pub use digest::{Algorithm, Digest, DigestError, Hasher};
pub use manifest::{Descriptor, ManifestError, ParsedManifest};
pub use name::{NameError, Reference, RepositoryName, Tag};
