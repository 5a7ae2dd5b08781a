//! The driver layer: one handle, [`Db`], over SQLite (rusqlite) or PostgreSQL (tokio-postgres
//! through a deadpool), and one transaction type, [`Tx`], that runs SQL written once.
//!
//! SQL is written in SQLite's syntax with numbered `?N` placeholders. For PostgreSQL each
//! statement is rewritten once (placeholders become `$N`) and the rewrite is cached by the
//! statement's address: statements are `&'static str`, so no SQL is ever built from data.
//! Where the dialects truly differ a statement names a `{TOKEN}` from [`TOKENS`] instead.
//!
//! SQLite: one writer connection and a few readers, each behind a tokio mutex. Statements run
//! inline on the async task: they take microseconds from the page cache, less than a hop to the
//! blocking pool would cost. Only a COMMIT that wrote something (it fsyncs the WAL) runs on the
//! blocking pool, holding the writer's owned guard, so a caller that is dropped while waiting
//! can never let another transaction start before that commit finished.
//!
//! PostgreSQL: a pool that drops closed connections and opens new ones on demand; a write is
//! `BEGIN` ... `COMMIT` on one pooled connection at READ COMMITTED, retried when it loses a
//! deadlock. A transaction abandoned half-way (its future dropped) closes its connection, which
//! makes the server roll it back, rather than returning it to the pool mid-transaction.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::BytesMut;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::future::BoxFuture;
use oci::Digest;
use rusqlite::Connection;
use rusqlite::types::{ToSqlOutput, ValueRef};
use tokio::sync::{Mutex, OwnedMutexGuard};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

use super::MetadataError;

/// SQLite reader connections; reads beyond this many at once wait for one.
const SQLITE_READERS: usize = 4;

/// How long a SQLite statement waits for a lock held by another process (`berth migrate`).
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long sent data may go unacknowledged before a PostgreSQL connection counts as dead.
const SILENT_SERVER_TIMEOUT: Duration = Duration::from_secs(30);

/// A PostgreSQL write that lost a deadlock is run this many times in all.
const ATTEMPTS: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// `{TOKEN}` → (SQLite, PostgreSQL): the only places the dialects differ.
pub const TOKENS: &[(&str, &str, &str)] = &[
    // A checked row stays until this transaction ends; SQLite's single writer gives that.
    ("KEY_SHARE", "", "FOR KEY SHARE"),
    // A row only one transaction may hold at a time; SQLite's single writer gives that.
    ("FOR_UPDATE", "", "FOR UPDATE"),
    (
        "ID",
        "INTEGER PRIMARY KEY",
        "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    ),
    ("INT", "INTEGER", "BIGINT"),
    ("BYTES", "BLOB", "BYTEA"),
    // Names compare bytewise whatever the database's locale, as SQLite's BINARY does.
    ("NAME", "TEXT", "TEXT COLLATE \"C\""),
    ("WITHOUT_ROWID", "WITHOUT ROWID", ""),
    // The audit query by actor and kind names its index on SQLite. Without statistics (a new
    // database, before `PRAGMA optimize` first finds the log grown) SQLite rates every index
    // whose first column the query fixes alike, and picked the one on kind alone: a walk of a
    // sixth of the log for one page. PostgreSQL plans that query for its values.
    ("EVENTS_BY_ACTOR_KIND", "INDEXED BY events_actor_kind", ""),
    // Position of a substring (1-based, 0 when absent): `{STRPOS}(haystack, needle)`.
    ("STRPOS", "instr", "strpos"),
    (
        "NOW",
        "unixepoch()",
        "CAST(extract(epoch FROM now()) AS BIGINT)",
    ),
    // The database's clock in milliseconds, at the statement (not the transaction's start):
    // leases that several nodes compare must not depend on each node's clock.
    (
        "NOW_MS",
        "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
        "CAST(extract(epoch FROM clock_timestamp()) * 1000 AS BIGINT)",
    ),
];

/// A bound parameter.
#[derive(Debug, Clone, Copy)]
pub enum Param<'a> {
    Null,
    Int(i64),
    Text(&'a str),
    Bytes(&'a [u8]),
}

impl From<i64> for Param<'_> {
    fn from(v: i64) -> Self {
        Param::Int(v)
    }
}

impl<'a> From<&'a str> for Param<'a> {
    fn from(v: &'a str) -> Self {
        Param::Text(v)
    }
}

impl<'a> From<&'a String> for Param<'a> {
    fn from(v: &'a String) -> Self {
        Param::Text(v)
    }
}

impl<'a> From<&'a [u8]> for Param<'a> {
    fn from(v: &'a [u8]) -> Self {
        Param::Bytes(v)
    }
}

impl<'a, T: Into<Param<'a>>> From<Option<T>> for Param<'a> {
    fn from(v: Option<T>) -> Self {
        v.map_or(Param::Null, Into::into)
    }
}

impl rusqlite::ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match *self {
            Param::Null => ValueRef::Null,
            Param::Int(v) => ValueRef::Integer(v),
            Param::Text(s) => ValueRef::Text(s.as_bytes()),
            Param::Bytes(b) => ValueRef::Blob(b),
        }))
    }
}

impl ToSql for Param<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match *self {
            Param::Null => Ok(IsNull::Yes),
            Param::Int(v) if *ty == Type::INT4 => i32::try_from(v)?.to_sql(ty, out),
            Param::Int(v) if *ty == Type::INT2 => i16::try_from(v)?.to_sql(ty, out),
            Param::Int(v) if *ty == Type::INT8 => v.to_sql(ty, out),
            Param::Text(s) if <&str as ToSql>::accepts(ty) => s.to_sql(ty, out),
            Param::Bytes(b) if *ty == Type::BYTEA => b.to_sql(ty, out),
            p => Err(format!("parameter {p:?} cannot be sent as {ty}").into()),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// One column's value, read out of either driver.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Null,
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
}

/// A result row, owned, so nothing borrowed from a connection outlives a statement.
#[derive(Debug, Clone)]
pub struct Row(Vec<Value>);

fn column_error(i: usize, want: &str, got: &Value) -> MetadataError {
    MetadataError::internal(format!("column {i}: expected {want}, got {got:?}"))
}

impl Row {
    fn get(&self, i: usize) -> Result<&Value, MetadataError> {
        self.0
            .get(i)
            .ok_or_else(|| MetadataError::internal(format!("no column {i}")))
    }

    pub fn i64(&self, i: usize) -> Result<i64, MetadataError> {
        match self.get(i)? {
            Value::Int(v) => Ok(*v),
            v => Err(column_error(i, "an integer", v)),
        }
    }

    pub fn opt_i64(&self, i: usize) -> Result<Option<i64>, MetadataError> {
        match self.get(i)? {
            Value::Null => Ok(None),
            _ => self.i64(i).map(Some),
        }
    }

    pub fn u64(&self, i: usize) -> Result<u64, MetadataError> {
        let v = self.i64(i)?;
        u64::try_from(v).map_err(|_| MetadataError::internal(format!("column {i}: {v} < 0")))
    }

    pub fn text(&self, i: usize) -> Result<&str, MetadataError> {
        match self.get(i)? {
            Value::Text(s) => Ok(s),
            v => Err(column_error(i, "text", v)),
        }
    }

    pub fn opt_text(&self, i: usize) -> Result<Option<&str>, MetadataError> {
        match self.get(i)? {
            Value::Null => Ok(None),
            _ => self.text(i).map(Some),
        }
    }

    pub fn take_bytes(&mut self, i: usize) -> Result<Vec<u8>, MetadataError> {
        match self.0.get_mut(i) {
            Some(Value::Bytes(b)) => Ok(std::mem::take(b)),
            Some(v) => Err(column_error(i, "bytes", v)),
            None => Err(MetadataError::internal(format!("no column {i}"))),
        }
    }

    /// A stored digest; one that does not parse is corruption, an internal error.
    pub fn digest(&self, i: usize) -> Result<Digest, MetadataError> {
        self.text(i)?.parse().map_err(MetadataError::internal)
    }
}

/// A handle on the database, cheap to clone.
#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

struct Inner {
    driver: Driver,
    /// PostgreSQL: the budget of one transaction (see [`PoolOptions::operation_timeout`]).
    /// SQLite has none: its statements run inline and could not be interrupted anyway.
    budget: Option<Duration>,
    /// PostgreSQL rewrites by the static statement's address; leaked, so bounded by the
    /// number of statements in the source.
    rewrites: RwLock<HashMap<(usize, usize), &'static str>>,
    /// Told when a transaction that appended an event has committed (see
    /// [`Db::event_committed`]).
    committed_events: tokio::sync::Notify,
}

enum Driver {
    Sqlite(SqlitePool),
    Postgres(Pool),
}

struct SqlitePool {
    writer: Arc<Mutex<Connection>>,
    readers: Vec<Arc<Mutex<Connection>>>,
    next_reader: AtomicUsize,
    /// The WAL index (`<db>-shm`), read for [`CommitMark`]s; `None` when the database has
    /// none (in memory), and then nothing is cached.
    wal_index: Option<std::fs::File>,
}

/// Identifies the committed state of a SQLite database, across every connection and process
/// using it: the first copy of the WAL-index header (SQLite's "walformat" document, section
/// 2.1), which every commit rewrites (frame count, change counter, checksums) before the commit
/// becomes visible to new readers, and which checkpoints leave alone. Two equal marks read
/// before two reads mean no commit came between, so a result read under the first still holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitMark([u8; WAL_INDEX_HEADER]);

/// Size of one copy of the WAL-index header.
const WAL_INDEX_HEADER: usize = 48;

/// How many connections a node keeps and how long a call waits for one.
#[derive(Debug, Clone, Copy)]
pub struct PoolOptions {
    pub size: usize,
    /// Bound on opening a connection, and on waiting for a free one when all are busy.
    pub timeout: Duration,
    /// Budget of one transaction, from asking for a connection to the end of its COMMIT; a
    /// server that stops answering (a partition, a frozen process) costs a call this long.
    /// `None` for commands that may run long transactions on purpose (migrations, audits).
    pub operation_timeout: Option<Duration>,
}

/// `call` within `budget`. Past it the call is dropped, which for PostgreSQL closes its
/// connection mid-transaction (the server rolls it back), and the caller gets `Unavailable`
/// with a `TimedOut` cause.
async fn within<T>(
    budget: Option<Duration>,
    call: impl std::future::Future<Output = Result<T, MetadataError>>,
) -> Result<T, MetadataError> {
    let Some(budget) = budget else {
        return call.await;
    };
    match tokio::time::timeout(budget, call).await {
        Ok(result) => result,
        Err(_) => Err(MetadataError::Unavailable(Box::new(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "the database did not answer within {} s",
                budget.as_secs_f64()
            ),
        )))),
    }
}

/// Rewrites `sql` for `dialect`: `{TOKEN}`s substituted, and for PostgreSQL `?N` → `$N`.
/// Quoted literals are left alone.
pub fn rewrite(sql: &str, dialect: Dialect) -> Result<String, MetadataError> {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut quoted = false;
    let mut rest = sql;
    while let Some(c) = rest.chars().next() {
        rest = &rest[c.len_utf8()..];
        match c {
            '\'' => quoted = !quoted,
            '?' if !quoted && dialect == Dialect::Postgres => {
                if !rest.starts_with(|c: char| c.is_ascii_digit()) {
                    return Err(MetadataError::internal(format!(
                        "an unnumbered placeholder in {sql:?}"
                    )));
                }
                out.push('$');
                continue;
            }
            '{' if !quoted => {
                let end = rest.find('}').ok_or_else(|| {
                    MetadataError::internal(format!("an unclosed token in {sql:?}"))
                })?;
                let token = &rest[..end];
                let &(_, sqlite, postgres) = TOKENS
                    .iter()
                    .find(|(name, _, _)| *name == token)
                    .ok_or_else(|| MetadataError::internal(format!("unknown token {token:?}")))?;
                out.push_str(match dialect {
                    Dialect::Sqlite => sqlite,
                    Dialect::Postgres => postgres,
                });
                rest = &rest[end + 1..];
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    Ok(out)
}

pub(crate) fn configure_sqlite(conn: &Connection, reader: bool) -> rusqlite::Result<()> {
    conn.busy_timeout(SQLITE_BUSY_TIMEOUT)?;
    // 2 MiB of page cache per connection (negative = KiB): the hot set is tags and manifests.
    conn.pragma_update(None, "cache_size", -2048)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // Every acknowledged commit survives power loss, not only a process crash.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Plans do not depend on bound values, so a statement is prepared once and never
    // re-prepared when a value changes (which, without this, a join whose constant propagation
    // involves a parameter, or an ORDER BY, did on every execution).
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    // Statements are cached per connection; the registry has a few dozen.
    conn.set_prepared_statement_cache_capacity(64);
    if reader {
        conn.pragma_update(None, "query_only", true)?;
    }
    Ok(())
}

impl Db {
    /// Opens (creating if needed) a SQLite database: one writer and a few reader connections.
    pub fn open_sqlite(path: &Path) -> Result<Db, MetadataError> {
        let open = |reader| -> Result<_, MetadataError> {
            let conn = Connection::open(path).map_err(MetadataError::from)?;
            configure_sqlite(&conn, reader)?;
            Ok(Arc::new(Mutex::new(conn)))
        };
        let writer = open(false)?;
        let readers = (0..SQLITE_READERS)
            .map(|_| open(true))
            .collect::<Result<_, _>>()?;
        // Exists once a connection has opened the database in WAL mode, as configured above.
        let mut shm = path.as_os_str().to_owned();
        shm.push("-shm");
        let wal_index = std::fs::File::open(shm).ok();
        Ok(Db::new(
            Driver::Sqlite(SqlitePool {
                writer,
                readers,
                next_reader: AtomicUsize::new(0),
                wal_index,
            }),
            None,
        ))
    }

    /// The database's [`CommitMark`] now: one small read of the WAL index, no lock. `None` on
    /// PostgreSQL (whose commits other nodes make, unseen) and when it cannot be read.
    pub fn commit_mark(&self) -> Option<CommitMark> {
        let Driver::Sqlite(pool) = &self.inner.driver else {
            return None;
        };
        let mut header = [0; WAL_INDEX_HEADER];
        pool.wal_index
            .as_ref()?
            .read_exact_at(&mut header, 0)
            .ok()?;
        Some(CommitMark(header))
    }

    /// A pool of connections to `url` (`postgres://USER:PASSWORD@HOST:PORT/DB`, or libpq
    /// key=value pairs). Connects once to fail early if the database is unreachable.
    pub async fn connect_postgres(url: &str, options: PoolOptions) -> Result<Db, MetadataError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(MetadataError::internal)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.timeout);
        }
        if config.get_tcp_user_timeout().is_none() {
            // A query sent to a server that went silent (a partition, a dead host) fails after
            // this, instead of after TCP's retransmissions give up, some 15 minutes later.
            config.tcp_user_timeout(SILENT_SERVER_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("berth");
        }
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                // A connection the server closed is noticed by its task and dropped on reuse;
                // a test query per checkout would cost a round trip on every call.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.timeout))
            .create_timeout(Some(options.timeout))
            .recycle_timeout(Some(options.timeout))
            .build()
            .map_err(MetadataError::internal)?;
        drop(pool.get().await?);
        Ok(Db::new(Driver::Postgres(pool), options.operation_timeout))
    }

    fn new(driver: Driver, budget: Option<Duration>) -> Db {
        Db {
            inner: Arc::new(Inner {
                driver,
                budget,
                rewrites: RwLock::new(HashMap::new()),
                committed_events: tokio::sync::Notify::new(),
            }),
        }
    }

    pub fn dialect(&self) -> Dialect {
        match self.inner.driver {
            Driver::Sqlite(_) => Dialect::Sqlite,
            Driver::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Runs `f` with statements that each see every transaction committed before they start
    /// (PostgreSQL's READ COMMITTED, which a multi-statement read transaction would not
    /// improve on); not for writes (SQLite's readers are `query_only`).
    pub async fn read<'env, T, F>(&self, f: F) -> Result<T, MetadataError>
    where
        F: for<'a> FnOnce(&'a mut Tx<'env>) -> BoxFuture<'a, Result<T, MetadataError>>,
    {
        within(self.inner.budget, self.read_unbounded(f)).await
    }

    async fn read_unbounded<'env, T, F>(&self, f: F) -> Result<T, MetadataError>
    where
        F: for<'a> FnOnce(&'a mut Tx<'env>) -> BoxFuture<'a, Result<T, MetadataError>>,
    {
        let conn = match &self.inner.driver {
            Driver::Sqlite(pool) => {
                let start = pool.next_reader.fetch_add(1, Ordering::Relaxed);
                let n = pool.readers.len();
                let free = (0..n)
                    .find_map(|i| pool.readers[(start + i) % n].clone().try_lock_owned().ok());
                let guard = match free {
                    Some(guard) => guard,
                    None => pool.readers[start % n].clone().lock_owned().await,
                };
                Conn::Sqlite(Some(guard))
            }
            Driver::Postgres(pool) => Conn::Postgres {
                client: Some(Box::new(pool.get().await?)),
                in_tx: false,
            },
        };
        let mut tx = Tx {
            db: self.inner.clone(),
            conn,
            appended: false,
            _env: PhantomData,
        };
        f(&mut tx).await
    }

    /// Runs `f` in one transaction: committed if `f` returns `Ok`, rolled back if it returns
    /// `Err` (a domain refusal such as a missing blob, or a failure). On PostgreSQL `f` runs
    /// again if the transaction lost a deadlock, up to [`ATTEMPTS`] times.
    pub async fn write<'env, T, F>(&self, f: F) -> Result<T, MetadataError>
    where
        F: for<'a> FnMut(&'a mut Tx<'env>) -> BoxFuture<'a, Result<T, MetadataError>>,
    {
        within(self.inner.budget, self.write_unbounded(f)).await
    }

    /// [`Db::write`] without the budget: schema migrations may take long on purpose.
    pub(super) async fn write_unbounded<'env, T, F>(&self, mut f: F) -> Result<T, MetadataError>
    where
        F: for<'a> FnMut(&'a mut Tx<'env>) -> BoxFuture<'a, Result<T, MetadataError>>,
    {
        match &self.inner.driver {
            Driver::Sqlite(pool) => {
                let guard = pool.writer.clone().lock_owned().await;
                self.write_sqlite(guard, f).await
            }
            Driver::Postgres(pool) => {
                let mut attempt = 1;
                loop {
                    let client = pool.get().await?;
                    match self.write_postgres(client, &mut f).await {
                        Err(e) if e.is_retryable() && attempt < ATTEMPTS => attempt += 1,
                        result => return result,
                    }
                }
            }
        }
    }

    async fn write_sqlite<'env, T, F>(
        &self,
        guard: OwnedMutexGuard<Connection>,
        f: F,
    ) -> Result<T, MetadataError>
    where
        F: for<'a> FnOnce(&'a mut Tx<'env>) -> BoxFuture<'a, Result<T, MetadataError>>,
    {
        // Inline too: only another process holding the write lock (`berth migrate` against a
        // serving database) can make this wait, for up to the busy timeout.
        guard
            .prepare_cached("BEGIN IMMEDIATE")
            .and_then(|mut s| s.execute([]))?;
        let changes_before = guard.total_changes();
        let mut tx = Tx {
            db: self.inner.clone(),
            conn: Conn::Sqlite(Some(guard)),
            appended: false,
            _env: PhantomData,
        };
        // An error here drops `tx`, which rolls back.
        let value = f(&mut tx).await?;
        let appended = tx.appended;
        let Conn::Sqlite(slot) = &mut tx.conn else {
            return Err(MetadataError::internal(
                "a SQLite transaction on another driver",
            ));
        };
        let guard = slot
            .take()
            .ok_or_else(|| MetadataError::internal("the SQLite connection is gone"))?;
        if guard.total_changes() == changes_before {
            // No row changed, nothing to fsync: commit inline. (Row changes only: a DDL-only
            // transaction, which only migrations at startup run, also commits inline.)
            commit_sqlite(&guard)?;
            self.committed(appended);
            return Ok(value);
        }
        // The guard moves into the blocking task: were this future dropped while waiting, the
        // writer stays locked until the commit (or its rollback) has finished.
        tokio::task::spawn_blocking(move || commit_sqlite(&guard))
            .await
            .map_err(MetadataError::internal)??;
        self.committed(appended);
        Ok(value)
    }

    /// Refreshes SQLite's query-planner statistics for tables that changed much since they
    /// were last gathered (`PRAGMA optimize`, which bounds its own sampling). Without them
    /// SQLite takes an index on `manifests(repository_id, ...)` to be as selective as one on a
    /// blob digest, and "does a manifest of this repository reference this digest" then walks
    /// every manifest of the repository (GC's link scan over a million links spent most of its
    /// time there). PostgreSQL gathers its own (autovacuum): nothing to do.
    pub async fn optimize(&self) -> Result<(), MetadataError> {
        let Driver::Sqlite(pool) = &self.inner.driver else {
            return Ok(());
        };
        let guard = pool.writer.clone().lock_owned().await;
        // ANALYZE reads pages of every index it samples: the blocking pool, not an async thread.
        tokio::task::spawn_blocking(move || guard.execute_batch("PRAGMA optimize=0x10002"))
            .await
            .map_err(MetadataError::internal)??;
        Ok(())
    }

    fn committed(&self, appended: bool) {
        if appended {
            // One stored permit at most: a waiter that was busy still wakes once.
            self.inner.committed_events.notify_one();
        }
    }

    /// Returns once a transaction of this process that appended an event has committed since
    /// the last call (or at once if one did meanwhile). Other processes' events are not seen:
    /// whoever waits here polls as well.
    pub async fn event_committed(&self) {
        self.inner.committed_events.notified().await;
    }

    async fn write_postgres<'env, T, F>(
        &self,
        client: deadpool_postgres::Object,
        f: &mut F,
    ) -> Result<T, MetadataError>
    where
        F: for<'a> FnMut(&'a mut Tx<'env>) -> BoxFuture<'a, Result<T, MetadataError>>,
    {
        client.batch_execute("BEGIN").await?;
        let mut tx = Tx {
            db: self.inner.clone(),
            conn: Conn::Postgres {
                client: Some(Box::new(client)),
                in_tx: true,
            },
            appended: false,
            _env: PhantomData,
        };
        let result = f(&mut tx).await;
        let Conn::Postgres { client, in_tx } = &mut tx.conn else {
            return Err(MetadataError::internal(
                "a PostgreSQL transaction on another driver",
            ));
        };
        let c = client
            .as_ref()
            .ok_or_else(|| MetadataError::internal("the PostgreSQL connection is gone"))?;
        let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
        // If this fails, `in_tx` stays set and dropping `tx` closes the connection.
        c.batch_execute(end).await?;
        *in_tx = false;
        let appended = tx.appended;
        if result.is_ok() {
            self.committed(appended);
        }
        result
    }

    fn rewritten(&self, sql: &'static str) -> Result<&'static str, MetadataError> {
        if matches!(self.inner.driver, Driver::Sqlite(_)) && !sql.contains('{') {
            return Ok(sql);
        }
        let key = (sql.as_ptr() as usize, sql.len());
        if let Some(done) = self.inner.rewrites.read().map_err(poisoned)?.get(&key) {
            return Ok(done);
        }
        let done: &'static str = rewrite(sql, self.dialect())?.leak();
        self.inner
            .rewrites
            .write()
            .map_err(poisoned)?
            .insert(key, done);
        Ok(done)
    }
}

fn poisoned<T>(_: std::sync::PoisonError<T>) -> MetadataError {
    MetadataError::internal("the SQL rewrite cache is poisoned")
}

fn commit_sqlite(conn: &Connection) -> Result<(), MetadataError> {
    let committed = conn
        .prepare_cached("COMMIT")
        .and_then(|mut s| s.execute([]));
    if committed.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    committed?;
    Ok(())
}

enum Conn {
    /// `None` once the guard moved to the committing task.
    Sqlite(Option<OwnedMutexGuard<Connection>>),
    Postgres {
        /// `None` only while being dropped. Boxed: one allocation per transaction is nothing
        /// next to a round trip, and keeps `Tx` small.
        client: Option<Box<deadpool_postgres::Object>>,
        in_tx: bool,
    },
}

/// A transaction (or, from [`Db::read`], a read-only connection) on which the registry's
/// statements run. `'env` is the caller's: what the closure borrows must outlive it, which
/// lets closures passed to [`Db::read`] and [`Db::write`] borrow their arguments.
pub struct Tx<'env> {
    db: Arc<Inner>,
    conn: Conn,
    /// An event was appended: its commit wakes [`Db::event_committed`].
    appended: bool,
    _env: PhantomData<&'env ()>,
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        match &mut self.conn {
            Conn::Sqlite(Some(conn)) => {
                if !conn.is_autocommit() {
                    // Abandoned half-way (an error, or the caller's future dropped).
                    let _ = conn.execute_batch("ROLLBACK");
                }
            }
            Conn::Sqlite(None) => {}
            Conn::Postgres { client, in_tx } => {
                if *in_tx {
                    // Detached from the pool and closed: the server rolls back.
                    if let Some(c) = client.take() {
                        drop(deadpool_postgres::Object::take(*c));
                    }
                }
            }
        }
    }
}

impl Tx<'_> {
    /// Marks the transaction as one that appended an event (see [`Db::event_committed`]).
    pub(crate) fn note_event(&mut self) {
        self.appended = true;
    }

    pub fn dialect(&self) -> Dialect {
        match self.conn {
            Conn::Sqlite(_) => Dialect::Sqlite,
            Conn::Postgres { .. } => Dialect::Postgres,
        }
    }

    fn sql(&self, sql: &'static str) -> Result<&'static str, MetadataError> {
        Db {
            inner: self.db.clone(),
        }
        .rewritten(sql)
    }

    fn sqlite(&self) -> Result<&Connection, MetadataError> {
        match &self.conn {
            Conn::Sqlite(Some(c)) => Ok(c),
            _ => Err(MetadataError::internal("no SQLite connection")),
        }
    }

    fn postgres(&self) -> Result<&deadpool_postgres::Object, MetadataError> {
        match &self.conn {
            Conn::Postgres {
                client: Some(c), ..
            } => Ok(c),
            _ => Err(MetadataError::internal("no PostgreSQL connection")),
        }
    }

    /// Runs a statement that returns no rows; returns how many rows it changed.
    pub async fn execute(
        &mut self,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> Result<u64, MetadataError> {
        let sql = self.sql(sql)?;
        match self.dialect() {
            Dialect::Sqlite => {
                let mut stmt = self.sqlite()?.prepare_cached(sql)?;
                Ok(stmt.execute(rusqlite::params_from_iter(params))? as u64)
            }
            Dialect::Postgres => {
                let c = self.postgres()?;
                let stmt = c.prepare_cached(sql).await?;
                Ok(c.execute(&stmt, &pg_params(params)).await?)
            }
        }
    }

    pub async fn query(
        &mut self,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> Result<Vec<Row>, MetadataError> {
        let sql = self.sql(sql)?;
        match self.dialect() {
            Dialect::Sqlite => sqlite_query(self.sqlite()?, sql, params),
            Dialect::Postgres => {
                let c = self.postgres()?;
                let stmt = c.prepare_cached(sql).await?;
                c.query(&stmt, &pg_params(params))
                    .await?
                    .iter()
                    .map(pg_row)
                    .collect()
            }
        }
    }

    /// [`Tx::query`] for a statement whose best plan depends on its parameters' values. On
    /// PostgreSQL a cached statement gets a generic plan after five runs, one chosen without
    /// the values; for a statement with optional filters (`?N IS NULL OR column = ?N`) that
    /// plan guesses every filter selective and reads all of a repository's events to sort
    /// them, where the plan made for the values walks an index for one page. So this prepares
    /// the statement afresh on every call, which PostgreSQL always plans for the values given
    /// (one more round trip and a plan per call). SQLite plans without values either way.
    pub async fn query_replanned(
        &mut self,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> Result<Vec<Row>, MetadataError> {
        let sql = self.sql(sql)?;
        match self.dialect() {
            Dialect::Sqlite => sqlite_query(self.sqlite()?, sql, params),
            Dialect::Postgres => self
                .postgres()?
                .query(sql, &pg_params(params))
                .await?
                .iter()
                .map(pg_row)
                .collect(),
        }
    }

    /// The first row, if any.
    pub async fn query_opt(
        &mut self,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> Result<Option<Row>, MetadataError> {
        Ok(self.query(sql, params).await?.into_iter().next())
    }

    /// Runs several statements with no parameters (schema migrations); not cached.
    pub async fn batch(&mut self, sql: &str) -> Result<(), MetadataError> {
        match self.dialect() {
            Dialect::Sqlite => Ok(self.sqlite()?.execute_batch(sql)?),
            Dialect::Postgres => Ok(self.postgres()?.batch_execute(sql).await?),
        }
    }
}

fn sqlite_query(
    conn: &Connection,
    sql: &str,
    params: &[Param<'_>],
) -> Result<Vec<Row>, MetadataError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let columns = stmt.column_count();
    let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let mut values = Vec::with_capacity(columns);
        for i in 0..columns {
            values.push(match row.get_ref(i)? {
                ValueRef::Null => Value::Null,
                ValueRef::Integer(v) => Value::Int(v),
                ValueRef::Text(t) => Value::Text(
                    std::str::from_utf8(t)
                        .map_err(MetadataError::internal)?
                        .to_owned(),
                ),
                ValueRef::Blob(b) => Value::Bytes(b.to_vec()),
                ValueRef::Real(f) => {
                    return Err(MetadataError::internal(format!("column {i}: real {f}")));
                }
            });
        }
        out.push(Row(values));
    }
    Ok(out)
}

fn pg_params<'p>(params: &'p [Param<'_>]) -> Vec<&'p (dyn ToSql + Sync)> {
    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
}

fn pg_row(row: &tokio_postgres::Row) -> Result<Row, MetadataError> {
    let mut values = Vec::with_capacity(row.len());
    for (i, column) in row.columns().iter().enumerate() {
        let ty = column.type_();
        let value = if *ty == Type::INT8 {
            row.try_get::<_, Option<i64>>(i)?.map(Value::Int)
        } else if *ty == Type::INT4 {
            row.try_get::<_, Option<i32>>(i)?
                .map(|v| Value::Int(v.into()))
        } else if *ty == Type::INT2 {
            row.try_get::<_, Option<i16>>(i)?
                .map(|v| Value::Int(v.into()))
        } else if *ty == Type::BYTEA {
            row.try_get::<_, Option<Vec<u8>>>(i)?.map(Value::Bytes)
        } else if <&str as tokio_postgres::types::FromSql>::accepts(ty) {
            row.try_get::<_, Option<String>>(i)?.map(Value::Text)
        } else {
            return Err(MetadataError::internal(format!("column {i} has type {ty}")));
        };
        values.push(value.unwrap_or(Value::Null));
    }
    Ok(Row(values))
}

impl From<rusqlite::Error> for MetadataError {
    /// Busy, locked (after the busy timeout), full, unreadable or unopenable: the database is
    /// unavailable. Anything else (constraints, misuse, conversions) is a bug: internal.
    fn from(e: rusqlite::Error) -> MetadataError {
        use rusqlite::ErrorCode as C;
        let unavailable = matches!(
            e.sqlite_error_code(),
            Some(
                C::DatabaseBusy
                    | C::DatabaseLocked
                    | C::DiskFull
                    | C::SystemIoFailure
                    | C::CannotOpen
                    | C::OutOfMemory
                    | C::FileLockingProtocolFailed
                    | C::ReadOnly
            )
        );
        if unavailable {
            MetadataError::Unavailable(e.into())
        } else {
            MetadataError::Internal(e.into())
        }
    }
}

impl From<tokio_postgres::Error> for MetadataError {
    /// By SQLSTATE class when the server answered: connection (08), resources (53), operator
    /// intervention (57: shutdown, statement timeout), system (58), and lost races (40) are
    /// unavailability; the rest (constraints, syntax, ...) are bugs. Without a server answer:
    /// a closed connection, an IO error or a timeout is unavailability; a conversion is a bug.
    fn from(e: tokio_postgres::Error) -> MetadataError {
        let unavailable = match e.code() {
            Some(code) => ["08", "40", "53", "57", "58"]
                .iter()
                .any(|class| code.code().starts_with(class)),
            None => {
                e.is_closed()
                    || io_caused(&e)
                    // tokio-postgres does not expose its error kinds; these have no source.
                    || ["timeout", "error connecting", "authentication", "error performing TLS"]
                        .iter()
                        .any(|p| e.to_string().starts_with(p))
            }
        };
        if unavailable {
            MetadataError::Unavailable(e.into())
        } else {
            MetadataError::Internal(e.into())
        }
    }
}

fn io_caused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = e.source();
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

impl From<deadpool_postgres::PoolError> for MetadataError {
    fn from(e: deadpool_postgres::PoolError) -> MetadataError {
        use deadpool_postgres::PoolError as P;
        match e {
            P::Backend(e) => e.into(),
            P::NoRuntimeSpecified => MetadataError::Internal(e.into()),
            // Timed out waiting for or creating a connection, closed, or a hook failed.
            _ => MetadataError::Unavailable(e.into()),
        }
    }
}

impl MetadataError {
    /// A PostgreSQL transaction that lost a deadlock or a serialization race: running it again
    /// will see the winner's outcome.
    fn is_retryable(&self) -> bool {
        let MetadataError::Unavailable(cause) = self else {
            return false;
        };
        cause
            .downcast_ref::<tokio_postgres::Error>()
            .and_then(|e| e.code())
            .is_some_and(|c| {
                *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_per_dialect() {
        let cases = [
            (
                "SELECT id FROM t WHERE a = ?1 AND b = ?12 {KEY_SHARE}",
                "SELECT id FROM t WHERE a = ?1 AND b = ?12 ",
                "SELECT id FROM t WHERE a = $1 AND b = $12 FOR KEY SHARE",
            ),
            (
                "CREATE TABLE t (id {ID}, n {NAME}, b {BYTES}) {WITHOUT_ROWID}",
                "CREATE TABLE t (id INTEGER PRIMARY KEY, n TEXT, b BLOB) WITHOUT ROWID",
                "CREATE TABLE t (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
                 n TEXT COLLATE \"C\", b BYTEA) ",
            ),
            (
                "SELECT '?1 {X}', ?2",
                "SELECT '?1 {X}', ?2",
                "SELECT '?1 {X}', $2",
            ),
        ];
        for (sql, sqlite, postgres) in cases {
            assert_eq!(rewrite(sql, Dialect::Sqlite).ok().as_deref(), Some(sqlite));
            assert_eq!(
                rewrite(sql, Dialect::Postgres).ok().as_deref(),
                Some(postgres)
            );
        }
        for bad in ["SELECT ?", "SELECT {NOPE}", "SELECT {KEY_SHARE"] {
            assert!(
                matches!(
                    rewrite(bad, Dialect::Postgres),
                    Err(MetadataError::Internal(_))
                ),
                "{bad}"
            );
        }
    }
}
