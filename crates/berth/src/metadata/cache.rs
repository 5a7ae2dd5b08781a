//! Answers the reads every pull repeats (a manifest by tag or digest, whether a repository may
//! read a blob, a page of tags) from memory, on SQLite.
//!
//! Each entry remembers the [`CommitMark`] read just before the query that filled it, and is
//! used only while the database's mark is still the same, so no commit of any connection or
//! process (another `berth` command on the same file included) can have come between: a hit
//! answers exactly what the query would. A pull storm then costs one small read of the WAL
//! index per request instead of a read transaction (its locks are two `fcntl` calls and, with
//! several threads reading, futex wake-ups). A push moves the mark, and the next read of each
//! key goes to the database again. PostgreSQL has no such mark (other nodes commit unseen):
//! nothing is cached there.

use std::sync::Arc;

use oci::{Digest, RepositoryName, Tag};
use quick_cache::Equivalent;

use super::db::CommitMark;
use super::queries::LinkedBlob;
use super::{Page, StoredManifest};

/// Which read an entry answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Read {
    ManifestByTag,
    ManifestByDigest,
    LinkedBlob,
    Tags,
}

#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Key {
    read: Read,
    repository: Box<str>,
    /// The tag, the digest's hex (whose length tells the algorithm), or the page (`limit`,
    /// NUL, `last`).
    name: Box<str>,
}

/// A [`Key`] made of borrowed parts, so a hit allocates nothing. Hashes as a [`Key`] does:
/// the same fields in the same order, `&str` and `Box<str>` hashing alike.
#[derive(Hash)]
struct KeyRef<'a> {
    read: Read,
    repository: &'a str,
    name: &'a str,
}

impl Equivalent<Key> for KeyRef<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        self.read == key.read && self.repository == &*key.repository && self.name == &*key.name
    }
}

impl KeyRef<'_> {
    fn to_owned(&self) -> Key {
        Key {
            read: self.read,
            repository: self.repository.into(),
            name: self.name.into(),
        }
    }
}

#[derive(Debug, Clone)]
pub enum Answer {
    Manifest(Option<StoredManifest>),
    Blob(Option<LinkedBlob>),
    Tags(Option<Arc<Vec<String>>>),
}

#[derive(Debug, Clone)]
pub struct Entry {
    mark: CommitMark,
    answer: Answer,
}

/// Weighs entries by the bytes they hold, so the cache is bounded in memory.
#[derive(Clone)]
pub struct ByBytes;

/// What an entry costs beyond its strings and bytes (the entry, the map's slot).
const ENTRY_OVERHEAD: u64 = 128;

impl quick_cache::Weighter<Key, Entry> for ByBytes {
    fn weight(&self, key: &Key, entry: &Entry) -> u64 {
        let answer = match &entry.answer {
            Answer::Manifest(Some(m)) => m.bytes.len() + m.media_type.len(),
            Answer::Tags(Some(tags)) => tags.iter().map(|t| t.len() + 24).sum(),
            Answer::Manifest(None) | Answer::Blob(_) | Answer::Tags(None) => 0,
        };
        ENTRY_OVERHEAD + (key.repository.len() + key.name.len() + answer) as u64
    }
}

/// Entries kept, bounded by `capacity` bytes (least recently and least often used go first).
pub struct ReadCache {
    entries: quick_cache::sync::Cache<Key, Entry, ByBytes>,
}

/// A read that missed: where to put its answer once the database has given it.
pub struct Miss {
    key: Key,
    mark: CommitMark,
}

/// What a lookup found: the answer, or how to record one.
pub enum Lookup {
    Hit(Answer),
    Miss(Miss),
}

impl ReadCache {
    pub fn new(capacity: u64) -> ReadCache {
        // quick_cache sizes its shards from an estimate of the number of entries.
        let estimated = (capacity / 1024).clamp(16, 1 << 20) as usize;
        ReadCache {
            entries: quick_cache::sync::Cache::with_weighter(estimated, capacity, ByBytes),
        }
    }

    fn lookup(&self, mark: CommitMark, key: KeyRef<'_>) -> Lookup {
        match self.entries.get(&key) {
            Some(entry) if entry.mark == mark => Lookup::Hit(entry.answer),
            _ => Lookup::Miss(Miss {
                key: key.to_owned(),
                mark,
            }),
        }
    }

    pub fn manifest_by_tag(&self, mark: CommitMark, repo: &RepositoryName, tag: &Tag) -> Lookup {
        self.lookup(
            mark,
            KeyRef {
                read: Read::ManifestByTag,
                repository: repo.as_str(),
                name: tag.as_str(),
            },
        )
    }

    pub fn manifest_by_digest(
        &self,
        mark: CommitMark,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Lookup {
        self.lookup(
            mark,
            KeyRef {
                read: Read::ManifestByDigest,
                repository: repo.as_str(),
                name: digest.hex(),
            },
        )
    }

    pub fn linked_blob(&self, mark: CommitMark, repo: &RepositoryName, digest: &Digest) -> Lookup {
        self.lookup(
            mark,
            KeyRef {
                read: Read::LinkedBlob,
                repository: repo.as_str(),
                name: digest.hex(),
            },
        )
    }

    pub fn tags(&self, mark: CommitMark, repo: &RepositoryName, page: Page<'_>) -> Lookup {
        let name = format!(
            "{}\0{}",
            page.limit.map_or(-1, |n| n as i128),
            page.last.unwrap_or("")
        );
        self.lookup(
            mark,
            KeyRef {
                read: Read::Tags,
                repository: repo.as_str(),
                name: &name,
            },
        )
    }

    /// Keeps `answer`, read after `miss` was looked up, for as long as nothing commits.
    pub fn fill(&self, miss: Miss, answer: Answer) {
        self.entries.insert(
            miss.key,
            Entry {
                mark: miss.mark,
                answer,
            },
        );
    }
}
