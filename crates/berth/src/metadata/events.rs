//! The event log: one row per change (and per login, token, permission change), appended by
//! [`append`] inside the transaction of the change it describes, so a crash can never leave a
//! change without its event or an event without its change.
//!
//! Events form a hash chain: each row's `hash` is SHA-256 over the previous row's hash and the
//! row's own fields in a fixed encoding ([`chain_hash`]). Appends lock the one row of
//! `event_chain` (the head: last sequence number and hash) until they commit, so sequence
//! numbers follow commit order and [`verify`] can find the first row that was edited,
//! deleted, inserted or moved.

use serde::Serialize;
use sha2::{Digest as _, Sha256};

use super::MetadataError;
use super::db::{Row, Tx};

/// An event about to be appended.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct NewEvent {
    pub kind: String,
    pub actor: String,
    pub client_addr: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    pub repository: Option<String>,
    pub digest: Option<String>,
    pub tags: Vec<String>,
    pub size: Option<u64>,
    /// `ok`, `denied` or `failed`.
    pub result: String,
    /// More, as JSON, when the kind has more to say.
    pub detail: Option<String>,
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    pub seq: i64,
    pub at_ms: i64,
    #[serde(flatten)]
    pub event: NewEvent,
    pub prev_hash: String,
    pub hash: String,
}

/// The fields a hash commits to, in a fixed order (serde serializes struct fields in
/// declaration order).
#[derive(Serialize)]
struct Hashed<'a> {
    seq: i64,
    at_ms: i64,
    event: &'a NewEvent,
}

/// SHA-256 (hex) of the previous hash, a newline, and the event's canonical JSON.
pub fn chain_hash(prev_hash: &str, seq: i64, at_ms: i64, event: &NewEvent) -> String {
    let json = serde_json::to_vec(&Hashed { seq, at_ms, event }).unwrap_or_default();
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(b"\n");
    h.update(&json);
    let mut out = String::with_capacity(64);
    for b in h.finalize() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Appends `event` to the log as part of the caller's transaction; returns its sequence
/// number. Call it last in a transaction: the chain head stays locked until the commit.
pub async fn append(tx: &mut Tx<'_>, event: &NewEvent) -> Result<i64, MetadataError> {
    // Only for `bench/events.sh`, which measures what the log costs a push against a build
    // that writes none: no head lock, no row, no webhook wake-up. Never in a release.
    if cfg!(feature = "bench-no-event-log") {
        return Ok(0);
    }
    let head = tx
        .query_opt(
            "SELECT seq, hash FROM event_chain WHERE id = 1 {FOR_UPDATE}",
            &[],
        )
        .await?
        .ok_or_else(|| MetadataError::internal("event_chain has no head row"))?;
    let (prev_seq, prev_hash) = (head.i64(0)?, head.text(1)?.to_owned());
    let seq = prev_seq + 1;
    // Times never go backwards along the log, even when nodes' clocks differ, so a time range
    // is a range of sequence numbers and [`query`] can bound it by index.
    let prev_at_ms = tx
        .query_opt(
            "SELECT at_ms FROM events WHERE seq = ?1",
            &[prev_seq.into()],
        )
        .await?
        .map(|row| row.i64(0))
        .transpose()?
        .unwrap_or(0);
    let at_ms = now_ms().max(prev_at_ms);
    let hash = chain_hash(&prev_hash, seq, at_ms, event);
    let tags = serde_json::to_string(&event.tags).map_err(MetadataError::internal)?;
    let size = event
        .size
        .map(|s| i64::try_from(s).map_err(MetadataError::internal))
        .transpose()?;
    tx.execute(
        "INSERT INTO events (seq, at_ms, kind, actor, client_addr, user_agent, request_id,
                             repository, digest, tags, size, result, detail, prev_hash, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        &[
            seq.into(),
            at_ms.into(),
            event.kind.as_str().into(),
            event.actor.as_str().into(),
            event.client_addr.as_deref().into(),
            event.user_agent.as_deref().into(),
            event.request_id.as_deref().into(),
            event.repository.as_deref().into(),
            event.digest.as_deref().into(),
            tags.as_str().into(),
            size.into(),
            event.result.as_str().into(),
            event.detail.as_deref().into(),
            prev_hash.as_str().into(),
            hash.as_str().into(),
        ],
    )
    .await?;
    tx.execute(
        "UPDATE event_chain SET seq = ?1, hash = ?2 WHERE id = 1",
        &[seq.into(), hash.as_str().into()],
    )
    .await?;
    tx.note_event();
    Ok(seq)
}

fn event(row: &Row) -> Result<Event, MetadataError> {
    let opt = |i| row.opt_text(i).map(|v| v.map(str::to_owned));
    Ok(Event {
        seq: row.i64(0)?,
        at_ms: row.i64(1)?,
        event: NewEvent {
            kind: row.text(2)?.to_owned(),
            actor: row.text(3)?.to_owned(),
            client_addr: opt(4)?,
            user_agent: opt(5)?,
            request_id: opt(6)?,
            repository: opt(7)?,
            digest: opt(8)?,
            tags: serde_json::from_str(row.text(9)?).map_err(MetadataError::internal)?,
            size: row
                .opt_i64(10)?
                .map(|s| u64::try_from(s).map_err(MetadataError::internal))
                .transpose()?,
            result: row.text(11)?.to_owned(),
            detail: opt(12)?,
        },
        prev_hash: row.text(13)?.to_owned(),
        hash: row.text(14)?.to_owned(),
    })
}

macro_rules! select_events {
    ($($rest:literal),+) => {
        concat!(
            "SELECT seq, at_ms, kind, actor, client_addr, user_agent, request_id, repository, \
             digest, tags, size, result, detail, prev_hash, hash FROM events ",
            $($rest),+
        )
    };
}

/// Events with `seq` after `after`, in order, at most `limit`.
pub async fn after(tx: &mut Tx<'_>, after: i64, limit: i64) -> Result<Vec<Event>, MetadataError> {
    tx.query(
        select_events!("WHERE seq > ?1 ORDER BY seq LIMIT ?2"),
        &[after.into(), limit.into()],
    )
    .await?
    .iter()
    .map(event)
    .collect()
}

/// Events at or after `since_ms` and before `until_ms`, after `seq`, in order.
pub async fn between(
    tx: &mut Tx<'_>,
    since_ms: i64,
    until_ms: i64,
    after: i64,
    limit: i64,
) -> Result<Vec<Event>, MetadataError> {
    tx.query(
        select_events!("WHERE at_ms >= ?1 AND at_ms < ?2 AND seq > ?3 ORDER BY seq LIMIT ?4"),
        &[since_ms.into(), until_ms.into(), after.into(), limit.into()],
    )
    .await?
    .iter()
    .map(event)
    .collect()
}

/// What to look for in the log; `None` matches anything.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub actor: Option<String>,
    pub repository: Option<String>,
    /// One namespace: its repositories' events and its own (members, robots), whose
    /// `repository` is the namespace's name.
    pub namespace: Option<String>,
    pub kind: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// Keyset pagination: events with `seq` below this (newest first).
    pub before_seq: Option<i64>,
}

/// Newest first, by keyset: each page names the `seq` to continue below. Every condition is a
/// bound parameter (NULL meaning "any"). The statement is chosen by the most selective filter
/// given, so that an index on `(those columns, seq)` drives it and a page at tens of millions
/// of rows reads about a page of index entries; the other filters are checked on those rows.
pub async fn query(
    tx: &mut Tx<'_>,
    f: &EventFilter,
    limit: i64,
) -> Result<Vec<Event>, MetadataError> {
    // The residual conditions, the same in every shape; ?1..?9 mean the same everywhere.
    // The ORDER BY names the driving index's columns (all but seq are fixed by the WHERE, so
    // the order is still by seq), so that the index visibly gives the order. On PostgreSQL the
    // statement is planned for each call's values (`query_replanned`): the values NULL fold
    // the residual conditions away, and the estimates come from the real filters. A generic
    // plan saw six unknown filters, expected one row, and so read all of a repository's 10,000
    // events and sorted them for each page (90-200 ms at 10M entries, cold).
    macro_rules! shape {
        ($driver:literal, $order:literal) => {
            shape!("", $driver, $order)
        };
        ($index:literal, $driver:literal, $order:literal) => {
            select_events!(
                $index,
                " WHERE ",
                $driver,
                " AND (CAST(?1 AS TEXT) IS NULL OR actor = ?1)
                  AND (CAST(?2 AS TEXT) IS NULL OR repository = ?2)
                  AND (CAST(?3 AS TEXT) IS NULL
                       OR repository = ?9 OR (repository >= ?3 AND repository < ?4))
                  AND (CAST(?5 AS TEXT) IS NULL OR kind = ?5)
                ORDER BY ",
                $order,
                " LIMIT ?7"
            )
        };
    }
    let sql = if f.actor.is_some() && f.kind.is_some() && f.repository.is_none() {
        // Its own index: through the actor's alone, a kind the actor never had walks every
        // entry of the actor.
        shape!(
            "{EVENTS_BY_ACTOR_KIND}",
            "actor = ?1 AND kind = ?5 AND seq >= ?8 AND seq < ?6",
            "actor DESC, kind DESC, seq DESC"
        )
    } else if f.repository.is_some() {
        shape!(
            "repository = ?2 AND seq >= ?8 AND seq < ?6",
            "repository DESC, seq DESC"
        )
    } else if f.actor.is_some() {
        shape!(
            "actor = ?1 AND seq >= ?8 AND seq < ?6",
            "actor DESC, seq DESC"
        )
    } else if f.kind.is_some() {
        shape!(
            "kind = ?5 AND seq >= ?8 AND seq < ?6",
            "kind DESC, seq DESC"
        )
    } else {
        // A namespace prefix or nothing: walk the log backwards from the page's start.
        shape!("seq >= ?8 AND seq < ?6", "seq DESC")
    };
    // The time range is exactly this range of sequence numbers, since times never go
    // backwards along the log (see `append`); so `at_ms` is not tested again. Testing it
    // made PostgreSQL multiply the two ranges' selectivities as if independent, expect a few
    // rows, and intersect both indexes and sort, reading every entry in the range.
    let lowest = match f.since_ms {
        Some(t) => first_seq_at_or_after(tx, t).await?,
        None => 0,
    };
    let mut below = f.before_seq.unwrap_or(i64::MAX);
    if let Some(t) = f.until_ms {
        below = below.min(first_seq_at_or_after(tx, t).await?);
    }
    // A namespace's repositories are the names in ["ns/", "ns/\u{10FFFF}").
    let prefix = f.namespace.as_ref().map(|ns| format!("{ns}/"));
    let prefix_end = f.namespace.as_ref().map(|ns| format!("{ns}/\u{10FFFF}"));
    tx.query_replanned(
        sql,
        &[
            f.actor.as_deref().into(),
            f.repository.as_deref().into(),
            prefix.as_deref().into(),
            prefix_end.as_deref().into(),
            f.kind.as_deref().into(),
            below.into(),
            limit.into(),
            lowest.into(),
            f.namespace.as_deref().into(),
        ],
    )
    .await?
    .iter()
    .map(event)
    .collect()
}

/// The first sequence number whose time is at or after `at_ms` (one past the last if none).
async fn first_seq_at_or_after(tx: &mut Tx<'_>, at_ms: i64) -> Result<i64, MetadataError> {
    let first = tx
        .query_opt(
            "SELECT seq FROM events WHERE at_ms >= ?1 ORDER BY at_ms, seq LIMIT 1",
            &[at_ms.into()],
        )
        .await?;
    match first {
        Some(row) => row.i64(0),
        None => Ok(head(tx).await?.0 + 1),
    }
}

/// The head of the chain: last sequence number and hash.
pub async fn head(tx: &mut Tx<'_>) -> Result<(i64, String), MetadataError> {
    let row = tx
        .query_opt("SELECT seq, hash FROM event_chain WHERE id = 1", &[])
        .await?
        .ok_or_else(|| MetadataError::internal("event_chain has no head row"))?;
    Ok((row.i64(0)?, row.text(1)?.to_owned()))
}

/// The first break in the chain, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct ChainBreak {
    pub seq: i64,
    pub reason: String,
}

/// Walks the chain in order (in pages) and names the first entry that does not follow from
/// the one before: an edited entry's hash does not match its fields, a deleted entry leaves a
/// gap in `seq` and a `prev_hash` that names no entry, an inserted or moved one breaks the
/// `prev_hash` link. Returns how many entries were checked.
pub async fn verify(
    metadata: &super::Metadata,
    page: i64,
    signed: impl Fn(&Checkpoint) -> Result<(), String>,
) -> Result<Result<Verified, ChainBreak>, MetadataError> {
    let (mut prev_seq, mut prev_hash) = (0i64, String::new());
    let mut checked = 0;
    // Pruned entries: the chain continues from the newest checkpoint, if its signature holds.
    let checkpoint = metadata.read(|tx| Box::pin(last_checkpoint(tx))).await?;
    if let Some(c) = &checkpoint {
        if let Err(why) = signed(c) {
            return Ok(Err(ChainBreak {
                seq: c.seq,
                reason: format!("the checkpoint at entry {} is not genuine: {why}", c.seq),
            }));
        }
        (prev_seq, prev_hash) = (c.seq, c.hash.clone());
    }
    loop {
        let batch = metadata
            .read(|tx| Box::pin(after(tx, prev_seq, page)))
            .await?;
        if batch.is_empty() {
            break;
        }
        for e in &batch {
            let broken = |reason: String| Ok(Err(ChainBreak { seq: e.seq, reason }));
            if e.seq != prev_seq + 1 {
                return broken(format!(
                    "entries {} to {} are missing",
                    prev_seq + 1,
                    e.seq - 1
                ));
            }
            if e.prev_hash != prev_hash {
                return broken("it does not follow the entry before it".to_string());
            }
            if chain_hash(&e.prev_hash, e.seq, e.at_ms, &e.event) != e.hash {
                return broken("its contents do not match its hash (edited)".to_string());
            }
            prev_seq = e.seq;
            prev_hash = e.hash.clone();
            checked += 1;
        }
    }
    let (head_seq, head_hash) = metadata.read(|tx| Box::pin(head(tx))).await?;
    if (head_seq, head_hash.as_str()) != (prev_seq, prev_hash.as_str()) {
        return Ok(Err(ChainBreak {
            seq: prev_seq.min(head_seq) + 1,
            reason: if head_seq > prev_seq {
                format!(
                    "the log ends at {prev_seq} but its head names entry {head_seq}: entries were removed from the end"
                )
            } else {
                format!(
                    "the log runs to {prev_seq} past its head, entry {head_seq}: entries were added or changed at the end"
                )
            },
        }));
    }
    Ok(Ok(Verified {
        entries: checked,
        from_checkpoint: checkpoint,
    }))
}

/// What [`verify`] found intact.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub entries: i64,
    /// The checkpoint the chain was verified from, when older entries were pruned.
    pub from_checkpoint: Option<Checkpoint>,
}

/// The last entry pruned from the log: its sequence number and hash, signed.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub seq: i64,
    pub hash: String,
    pub at_ms: i64,
    pub kid: String,
    pub signature: String,
}

impl Checkpoint {
    /// The bytes a checkpoint's signature covers.
    pub fn signed_text(seq: i64, hash: &str, at_ms: i64) -> String {
        format!("berth audit checkpoint\n{seq}\n{hash}\n{at_ms}")
    }
}

async fn last_checkpoint(tx: &mut Tx<'_>) -> Result<Option<Checkpoint>, MetadataError> {
    tx.query_opt(
        "SELECT seq, hash, at_ms, kid, signature FROM event_checkpoints ORDER BY seq DESC LIMIT 1",
        &[],
    )
    .await?
    .map(|row| {
        Ok(Checkpoint {
            seq: row.i64(0)?,
            hash: row.text(1)?.to_owned(),
            at_ms: row.i64(2)?,
            kid: row.text(3)?.to_owned(),
            signature: row.text(4)?.to_owned(),
        })
    })
    .transpose()
}

/// Removes up to `max_rows` of the oldest entries older than `before_ms`, after recording a
/// checkpoint for the last one removed, signed by `sign` (which returns the key id and the
/// signature of [`Checkpoint::signed_text`]). Holds the chain head for the transaction, so it
/// is ordered with appends. Returns how many entries went.
pub async fn prune(
    tx: &mut Tx<'_>,
    before_ms: i64,
    max_rows: i64,
    sign: &(dyn Fn(&str) -> Result<(String, String), String> + Sync),
) -> Result<i64, MetadataError> {
    tx.query_opt("SELECT seq FROM event_chain WHERE id = 1 {FOR_UPDATE}", &[])
        .await?;
    let Some(oldest) = tx
        .query_opt("SELECT MIN(seq) FROM events", &[])
        .await?
        .and_then(|row| row.i64(0).ok())
    else {
        return Ok(0);
    };
    let last = (first_seq_at_or_after(tx, before_ms).await? - 1).min(oldest + max_rows - 1);
    if last < oldest {
        return Ok(0);
    }
    // What goes must chain from the last checkpoint (or the start): pruning must never hide a
    // break the way `verify` would have named it.
    let (mut prev_seq, mut prev_hash) = match last_checkpoint(tx).await? {
        Some(c) => (c.seq, c.hash),
        None => (0, String::new()),
    };
    for e in after(tx, oldest - 1, last - oldest + 1).await? {
        if e.seq != prev_seq + 1
            || e.prev_hash != prev_hash
            || chain_hash(&e.prev_hash, e.seq, e.at_ms, &e.event) != e.hash
        {
            return Err(MetadataError::internal(format!(
                "not pruning: the chain is broken at entry {} (run `berth audit verify`)",
                e.seq
            )));
        }
        (prev_seq, prev_hash) = (e.seq, e.hash);
    }
    if prev_seq != last {
        return Err(MetadataError::internal(format!(
            "not pruning: entries {} to {last} are missing",
            prev_seq + 1
        )));
    }
    let hash = prev_hash;
    let at_ms = now_ms();
    let (kid, signature) =
        sign(&Checkpoint::signed_text(last, &hash, at_ms)).map_err(MetadataError::internal)?;
    tx.execute(
        "INSERT INTO event_checkpoints (seq, hash, at_ms, kid, signature) VALUES (?1, ?2, ?3, ?4, ?5)",
        &[
            last.into(),
            hash.as_str().into(),
            at_ms.into(),
            kid.as_str().into(),
            signature.as_str().into(),
        ],
    )
    .await?;
    let removed = tx
        .execute("DELETE FROM events WHERE seq <= ?1", &[last.into()])
        .await?;
    Ok(removed as i64)
}

/// Events recorded on their own, not as part of a change (logins, tokens issued), appended
/// with group commit: a background task takes every event waiting, appends them in one
/// transaction and then answers each caller. Under concurrent logins one fsync serves many,
/// so issuing a token costs a share of a commit instead of a commit of its own, and each
/// caller still returns only once its event is durable.
#[derive(Clone)]
pub struct Recorder {
    queue: tokio::sync::mpsc::Sender<Pending>,
    /// Events given to [`Recorder::record_later`] and dropped because the queue was full
    /// (shared with `/metrics` as `berth_events_dropped_total`).
    dropped: prometheus_client::metrics::counter::Counter,
}

struct Pending {
    event: NewEvent,
    /// Told when the event is committed; `None` for events nobody waits for.
    done: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
}

/// Events waiting beyond this make callers wait for room, so a flood of logins is paced by
/// the database instead of growing memory.
const RECORDER_QUEUE: usize = 1024;
/// At most this many events per transaction, so one commit stays short.
const RECORDER_BATCH: usize = 256;

impl Recorder {
    /// Starts the appending task on the current runtime; it ends when the last clone drops.
    pub fn start(metadata: super::Metadata) -> Recorder {
        let (queue, mut waiting) = tokio::sync::mpsc::channel::<Pending>(RECORDER_QUEUE);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(RECORDER_BATCH);
            while waiting.recv_many(&mut batch, RECORDER_BATCH).await > 0 {
                let events: Vec<&NewEvent> = batch.iter().map(|p| &p.event).collect();
                let events = &events;
                let written = metadata
                    .write(|tx| {
                        Box::pin(async move {
                            for event in events {
                                append(tx, event).await?;
                            }
                            Ok(())
                        })
                    })
                    .await
                    .map_err(|e| e.to_string());
                for done in batch.drain(..).filter_map(|p| p.done) {
                    // The caller may have gone (its request was dropped); the event stays.
                    let _ = done.send(written.clone());
                }
            }
        });
        Recorder {
            queue,
            dropped: Default::default(),
        }
    }

    /// Appends `event` without waiting; if the queue is full, drops it and counts it.
    pub fn record_later(&self, event: NewEvent) {
        if self.queue.try_send(Pending { event, done: None }).is_err() {
            self.dropped.inc();
        }
    }

    /// How many events [`Recorder::record_later`] has dropped since the start, as a counter
    /// `/metrics` can show.
    pub fn dropped(&self) -> prometheus_client::metrics::counter::Counter {
        self.dropped.clone()
    }

    /// Appends `event` and returns once it is committed.
    pub async fn record(&self, event: NewEvent) -> Result<(), String> {
        let (done, committed) = tokio::sync::oneshot::channel();
        self.queue
            .send(Pending {
                event,
                done: Some(done),
            })
            .await
            .map_err(|_| "the event recorder has stopped".to_string())?;
        committed
            .await
            .map_err(|_| "the event recorder has stopped".to_string())?
    }
}
