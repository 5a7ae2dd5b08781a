//! When each manifest was last pulled, for retention's `keep_pulled_days` and GC's untagged
//! age. A pull must not cost a metadata write, so manifest GETs only note (repository, digest)
//! in memory, and [`Registry::record_pull_times`] writes what was noted every flush interval,
//! in batches. A crash loses at most one interval of pull times, which only ever makes an
//! image look less recently pulled by that much.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use oci::Digest;
use tokio::sync::{Notify, watch};

use super::{Registry, now_secs};
use crate::metadata::{MetadataError, queries};

/// Most distinct (repository, digest) pairs noted between two flushes; reaching it starts a
/// flush at once, and pulls noted meanwhile beyond it are not recorded.
pub const MAX_PENDING_PULLS: usize = 65_536;

/// Pull times written per metadata transaction.
const FLUSH_BATCH: usize = 500;

/// Pulls noted since the last flush: digests by repository, so that a pull already noted
/// (the common case) is looked up without allocating.
#[derive(Default)]
pub struct PullTimes {
    pending: Mutex<Pending>,
    full: Notify,
}

#[derive(Default)]
struct Pending {
    by_repository: HashMap<String, HashSet<Digest>>,
    count: usize,
}

impl PullTimes {
    /// Notes a pull of `digest` from `repository`.
    pub fn note(&self, repository: &str, digest: &Digest) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(digests) = pending.by_repository.get(repository)
            && digests.contains(digest)
        {
            return;
        }
        if pending.count >= MAX_PENDING_PULLS {
            return;
        }
        pending
            .by_repository
            .entry(repository.to_owned())
            .or_default()
            .insert(digest.clone());
        pending.count += 1;
        if pending.count == MAX_PENDING_PULLS {
            self.full.notify_one();
        }
    }

    fn take(&self) -> Vec<(String, String)> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let taken = std::mem::take(&mut *pending);
        taken
            .by_repository
            .into_iter()
            .flat_map(|(repository, digests)| {
                digests
                    .into_iter()
                    .map(move |d| (repository.clone(), d.to_string()))
            })
            .collect()
    }
}

impl Registry {
    /// Writes noted pulls every `interval` (and when the notes fill up) until `stop`, then once
    /// more. Several nodes each write theirs; the latest time wins.
    pub async fn record_pull_times(&self, interval: Duration, mut stop: watch::Receiver<bool>) {
        loop {
            let stopping = tokio::select! {
                _ = stop.wait_for(|s| *s) => true,
                _ = tokio::time::sleep(interval) => false,
                _ = self.pull_times.full.notified() => false,
            };
            if let Err(e) = self.flush_pull_times().await {
                tracing::warn!(error = %e, "recording pull times failed; they are lost");
            }
            if stopping {
                return;
            }
        }
    }

    /// Writes the pulls noted so far; returns how many.
    async fn flush_pull_times(&self) -> Result<usize, MetadataError> {
        let pulls = self.pull_times.take();
        let at = now_secs();
        for batch in pulls.chunks(FLUSH_BATCH) {
            self.metadata
                .write(|tx| {
                    Box::pin(async move {
                        for (repository, digest) in batch {
                            queries::record_pull(tx, repository, digest, at).await?;
                        }
                        Ok(())
                    })
                })
                .await?;
        }
        Ok(pulls.len())
    }
}
