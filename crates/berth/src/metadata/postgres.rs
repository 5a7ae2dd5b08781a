//! The shared metadata store: PostgreSQL, for several Berth nodes over one database.
//!
//! Same schema and semantics as the SQLite store, but every node writes at once, so where SQLite
//! relies on its single writer this store relies on the database: a manifest and its tag are one
//! transaction that share-locks the rows it checks (a concurrent unlink or delete waits for it);
//! tag moves and repository creation are single `INSERT ... ON CONFLICT` statements; names
//! compare bytewise (`COLLATE "C"`) whatever the database's locale, as SQLite compares them.
//!
//! Connections come from a pool that drops closed connections and opens new ones on demand, so
//! when PostgreSQL goes away calls fail with `Unavailable` (503) and, once it is back, succeed
//! again with no repair. Migrations are numbered, recorded in `berth_schema_migrations`, and run
//! under an advisory lock so that nodes starting together apply each exactly once.

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use oci::{Digest, RepositoryName, Tag};
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, Row};

use super::{
    MetadataError, MetadataStore, NewManifest, Page, Referrer, StoredManifest, UploadSession,
};

/// Each entry upgrades the schema by one version; `berth_schema_migrations` records which ran.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE repositories (
    id   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name TEXT COLLATE "C" NOT NULL UNIQUE
);
CREATE TABLE blobs (
    digest TEXT COLLATE "C" PRIMARY KEY,
    size   BIGINT NOT NULL
);
CREATE TABLE repository_blobs (
    repository_id BIGINT NOT NULL REFERENCES repositories(id),
    digest        TEXT COLLATE "C" NOT NULL REFERENCES blobs(digest),
    PRIMARY KEY (repository_id, digest)
);
CREATE INDEX repository_blobs_digest ON repository_blobs(digest);
CREATE TABLE manifests (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    repository_id BIGINT NOT NULL REFERENCES repositories(id),
    digest        TEXT COLLATE "C" NOT NULL,
    media_type    TEXT NOT NULL,
    content       BYTEA NOT NULL,
    subject       TEXT COLLATE "C",
    artifact_type TEXT,
    annotations   TEXT,
    created_at    BIGINT NOT NULL,
    UNIQUE (repository_id, digest)
);
CREATE INDEX manifests_subject ON manifests(repository_id, subject) WHERE subject IS NOT NULL;
CREATE TABLE manifest_blobs (
    manifest_id BIGINT NOT NULL REFERENCES manifests(id) ON DELETE CASCADE,
    digest      TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (manifest_id, digest)
);
CREATE INDEX manifest_blobs_digest ON manifest_blobs(digest);
CREATE TABLE manifest_children (
    manifest_id  BIGINT NOT NULL REFERENCES manifests(id) ON DELETE CASCADE,
    child_digest TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (manifest_id, child_digest)
);
CREATE INDEX manifest_children_child ON manifest_children(child_digest);
CREATE TABLE tags (
    repository_id BIGINT NOT NULL REFERENCES repositories(id),
    name          TEXT COLLATE "C" NOT NULL,
    manifest_id   BIGINT NOT NULL REFERENCES manifests(id) ON DELETE CASCADE,
    updated_at    BIGINT NOT NULL,
    PRIMARY KEY (repository_id, name)
);
-- Deleting a manifest cascades to its tags; without this index each delete scans all tags.
CREATE INDEX tags_manifest ON tags(manifest_id);
CREATE TABLE uploads (
    id         TEXT COLLATE "C" PRIMARY KEY,
    repository TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX uploads_updated_at ON uploads(updated_at);
"#];

/// Key of the transaction-scoped advisory lock that serializes migrations across nodes.
const MIGRATION_LOCK: i64 = 0x6265_7274_686d_6967; // "berthmig"

/// How long sent data may go unacknowledged before the connection counts as dead.
const SILENT_SERVER_TIMEOUT: Duration = Duration::from_secs(30);

/// A transaction that lost a deadlock or serialization race is retried this many times.
const ATTEMPTS: usize = 3;

/// How many connections a node keeps and how long a call waits for one.
#[derive(Debug, Clone, Copy)]
pub struct PoolOptions {
    pub size: usize,
    /// Bound on opening a connection, and on waiting for a free one when all are busy.
    pub timeout: Duration,
}

pub struct PostgresMetadata {
    pool: Pool,
}

/// Why a transaction did not commit: an error to return as it is (a domain refusal such as a
/// missing blob), or one from the database or the pool, which may be worth a retry.
enum Failure {
    Metadata(MetadataError),
    Db(tokio_postgres::Error),
    Pool(deadpool_postgres::PoolError),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Failure {
        Failure::Db(e)
    }
}

impl From<deadpool_postgres::PoolError> for Failure {
    fn from(e: deadpool_postgres::PoolError) -> Failure {
        Failure::Pool(e)
    }
}

impl Failure {
    /// A race another transaction won; running again will see its outcome.
    fn is_retryable(&self) -> bool {
        matches!(self, Failure::Db(e) if matches!(
            e.code(),
            Some(&SqlState::T_R_SERIALIZATION_FAILURE | &SqlState::T_R_DEADLOCK_DETECTED)
        ))
    }

    fn into_metadata(self) -> MetadataError {
        match self {
            Failure::Metadata(e) => e,
            Failure::Db(e) => unavailable(&e),
            Failure::Pool(e) => unavailable(&e),
        }
    }
}

/// The error and its causes on one line: tokio-postgres puts the server's message in a source.
fn unavailable(e: &dyn std::error::Error) -> MetadataError {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    MetadataError::Unavailable(text)
}

fn db(e: tokio_postgres::Error) -> MetadataError {
    unavailable(&e)
}

fn pool(e: deadpool_postgres::PoolError) -> MetadataError {
    unavailable(&e)
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn parse_digest(s: &str) -> Result<Digest, MetadataError> {
    s.parse()
        .map_err(|e: oci::DigestError| MetadataError::Unavailable(format!("stored digest: {e}")))
}

fn stored_manifest(row: &Row) -> Result<StoredManifest, MetadataError> {
    Ok(StoredManifest {
        digest: parse_digest(row.try_get(0).map_err(db)?)?,
        media_type: row.try_get(1).map_err(db)?,
        bytes: row.try_get(2).map_err(db)?,
    })
}

/// The first of `digests` that `sql` (selecting the digests present among `$2` for
/// repository `$1`) does not return.
async fn first_missing<'a>(
    c: &impl GenericClient,
    sql: &str,
    repo_id: i64,
    digests: &'a [Digest],
) -> Result<Option<&'a Digest>, tokio_postgres::Error> {
    if digests.is_empty() {
        return Ok(None);
    }
    let wanted: Vec<String> = digests.iter().map(|d| d.to_string()).collect();
    let stmt = c.prepare_cached(sql).await?;
    let present: HashSet<String> = c
        .query(&stmt, &[&repo_id, &wanted])
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    Ok(wanted
        .iter()
        .position(|d| !present.contains(d))
        .map(|i| &digests[i]))
}

/// The repository's id, creating the row if needed. Safe against another node creating it at
/// the same moment: `ON CONFLICT DO NOTHING` waits for that node's insert, and the second
/// `SELECT` (a new statement, so a new snapshot) then sees it.
async fn ensure_repository(
    c: &impl GenericClient,
    repo: &RepositoryName,
) -> Result<i64, tokio_postgres::Error> {
    let select = c
        .prepare_cached("SELECT id FROM repositories WHERE name = $1")
        .await?;
    if let Some(row) = c.query_opt(&select, &[&repo.as_str()]).await? {
        return row.try_get(0);
    }
    let insert = c
        .prepare_cached(
            "INSERT INTO repositories (name) VALUES ($1) ON CONFLICT (name) DO NOTHING RETURNING id",
        )
        .await?;
    if let Some(row) = c.query_opt(&insert, &[&repo.as_str()]).await? {
        return row.try_get(0);
    }
    c.query_one(&select, &[&repo.as_str()]).await?.try_get(0)
}

async fn migrate(client: &mut deadpool_postgres::Object) -> Result<(), MetadataError> {
    let tx = client.transaction().await.map_err(db)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS berth_schema_migrations (
            version    INTEGER PRIMARY KEY,
            applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
        )",
    )
    .await
    .map_err(db)?;
    let applied: i32 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM berth_schema_migrations",
            &[],
        )
        .await
        .and_then(|r| r.try_get(0))
        .map_err(db)?;
    let applied = applied as usize;
    if applied > MIGRATIONS.len() {
        return Err(MetadataError::Unavailable(format!(
            "the database schema is at version {applied}, newer than this berth knows ({})",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let version = i as i32 + 1;
        tx.batch_execute(sql).await.map_err(db)?;
        tx.execute(
            "INSERT INTO berth_schema_migrations (version) VALUES ($1)",
            &[&version],
        )
        .await
        .map_err(db)?;
        tracing::info!(version, "applied metadata schema migration");
    }
    tx.commit().await.map_err(db)
}

impl PostgresMetadata {
    /// Connects to `url` (`postgres://USER:PASSWORD@HOST:PORT/DB`, or libpq key=value pairs),
    /// applies pending migrations, and returns the store. Fails if the database is unreachable.
    pub async fn connect(
        url: &str,
        options: PoolOptions,
    ) -> Result<PostgresMetadata, MetadataError> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| MetadataError::Unavailable(format!("PostgreSQL URL: {e}")))?;
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
            .map_err(|e| unavailable(&e))?;
        let mut client = pool.get().await.map_err(self::pool)?;
        migrate(&mut client).await?;
        drop(client);
        Ok(PostgresMetadata { pool })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, MetadataError> {
        self.pool.get().await.map_err(pool)
    }

    /// Prepares (once per connection) and runs a query returning at most one row.
    async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<Row>, MetadataError> {
        let c = self.client().await?;
        let stmt = c.prepare_cached(sql).await.map_err(db)?;
        c.query_opt(&stmt, params).await.map_err(db)
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, MetadataError> {
        let c = self.client().await?;
        let stmt = c.prepare_cached(sql).await.map_err(db)?;
        c.query(&stmt, params).await.map_err(db)
    }

    /// Runs one statement; returns how many rows it changed.
    async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, MetadataError> {
        let c = self.client().await?;
        let stmt = c.prepare_cached(sql).await.map_err(db)?;
        c.execute(&stmt, params).await.map_err(db)
    }

    async fn try_put_manifest(
        &self,
        repo: &RepositoryName,
        m: &NewManifest,
        tag: Option<&Tag>,
    ) -> Result<(), Failure> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let repo_id = ensure_repository(&tx, repo).await?;

        // FOR KEY SHARE: the rows checked here cannot be deleted until this commits, so the
        // check still holds when the manifest becomes visible.
        let missing_blob = first_missing(
            &tx,
            "SELECT digest FROM repository_blobs
             WHERE repository_id = $1 AND digest = ANY($2) FOR KEY SHARE",
            repo_id,
            &m.blobs,
        )
        .await?;
        if let Some(blob) = missing_blob {
            return Err(Failure::Metadata(MetadataError::MissingBlob(blob.clone())));
        }
        let missing_child = first_missing(
            &tx,
            "SELECT digest FROM manifests
             WHERE repository_id = $1 AND digest = ANY($2) FOR KEY SHARE",
            repo_id,
            &m.children,
        )
        .await?;
        if let Some(child) = missing_child {
            return Err(Failure::Metadata(MetadataError::MissingManifest(
                child.clone(),
            )));
        }

        let digest = m.digest.to_string();
        let select = tx
            .prepare_cached(
                "SELECT id FROM manifests WHERE repository_id = $1 AND digest = $2 FOR KEY SHARE",
            )
            .await?;
        let manifest_id: i64 = match tx.query_opt(&select, &[&repo_id, &digest]).await? {
            Some(row) => row.try_get(0)?,
            None => {
                let annotations = m
                    .annotations
                    .as_ref()
                    .map(serde_json::to_string)
                    .transpose()
                    .map_err(|e| Failure::Metadata(MetadataError::Unavailable(e.to_string())))?;
                let insert = tx
                    .prepare_cached(
                        "INSERT INTO manifests (repository_id, digest, media_type, content, subject,
                                                artifact_type, annotations, created_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                         ON CONFLICT (repository_id, digest) DO NOTHING RETURNING id",
                    )
                    .await?;
                let subject = m.subject.as_ref().map(|s| s.to_string());
                let inserted = tx
                    .query_opt(
                        &insert,
                        &[
                            &repo_id,
                            &digest,
                            &m.media_type,
                            &m.bytes,
                            &subject,
                            &m.artifact_type,
                            &annotations,
                            &now_secs(),
                        ],
                    )
                    .await?;
                match inserted {
                    Some(row) => {
                        let id: i64 = row.try_get(0)?;
                        let blobs: Vec<String> = m.blobs.iter().map(|d| d.to_string()).collect();
                        let children: Vec<String> =
                            m.children.iter().map(|d| d.to_string()).collect();
                        if !blobs.is_empty() {
                            let stmt = tx
                                .prepare_cached(
                                    "INSERT INTO manifest_blobs (manifest_id, digest)
                                     SELECT $1, d FROM unnest($2::text[]) AS d
                                     ON CONFLICT DO NOTHING",
                                )
                                .await?;
                            tx.execute(&stmt, &[&id, &blobs]).await?;
                        }
                        if !children.is_empty() {
                            let stmt = tx
                                .prepare_cached(
                                    "INSERT INTO manifest_children (manifest_id, child_digest)
                                     SELECT $1, d FROM unnest($2::text[]) AS d
                                     ON CONFLICT DO NOTHING",
                                )
                                .await?;
                            tx.execute(&stmt, &[&id, &children]).await?;
                        }
                        id
                    }
                    // Another node inserted the same manifest since our SELECT and has
                    // committed (the insert waited for it): take its row.
                    None => tx
                        .query_one(&select, &[&repo_id, &digest])
                        .await?
                        .try_get(0)?,
                }
            }
        };

        if let Some(tag) = tag {
            let stmt = tx
                .prepare_cached(
                    "INSERT INTO tags (repository_id, name, manifest_id, updated_at)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (repository_id, name)
                     DO UPDATE SET manifest_id = excluded.manifest_id, updated_at = excluded.updated_at",
                )
                .await?;
            tx.execute(&stmt, &[&repo_id, &tag.as_str(), &manifest_id, &now_secs()])
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

#[async_trait]
impl MetadataStore for PostgresMetadata {
    async fn blob_in_repository(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<Option<u64>, MetadataError> {
        let row = self
            .query_opt(
                "SELECT b.size FROM repository_blobs rb
                 JOIN repositories r ON r.id = rb.repository_id
                 JOIN blobs b ON b.digest = rb.digest
                 WHERE r.name = $1 AND rb.digest = $2",
                &[&repo.as_str(), &digest.to_string()],
            )
            .await?;
        row.map(|r| r.try_get::<_, i64>(0).map(|s| s as u64))
            .transpose()
            .map_err(db)
    }

    async fn link_blob(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
        size: u64,
    ) -> Result<(), MetadataError> {
        let c = self.client().await?;
        // A repository row on its own is harmless (it is what a first push creates anyway), so
        // creating it need not share a transaction with the link, which is one statement.
        let repo_id = ensure_repository(&c, repo).await.map_err(db)?;
        let stmt = c
            .prepare_cached(
                "WITH blob AS (
                     INSERT INTO blobs (digest, size) VALUES ($2, $3) ON CONFLICT DO NOTHING
                 )
                 INSERT INTO repository_blobs (repository_id, digest) VALUES ($1, $2)
                 ON CONFLICT DO NOTHING",
            )
            .await
            .map_err(db)?;
        c.execute(&stmt, &[&repo_id, &digest.to_string(), &(size as i64)])
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn unlink_blob(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<bool, MetadataError> {
        let n = self
            .execute(
                "DELETE FROM repository_blobs WHERE digest = $2
                 AND repository_id = (SELECT id FROM repositories WHERE name = $1)",
                &[&repo.as_str(), &digest.to_string()],
            )
            .await?;
        Ok(n > 0)
    }

    async fn create_upload(&self, session: &UploadSession) -> Result<(), MetadataError> {
        self.execute(
            "INSERT INTO uploads (id, repository, updated_at) VALUES ($1, $2, $3)",
            &[
                &session.id,
                &session.repository.as_str(),
                &session.updated_at,
            ],
        )
        .await
        .map(drop)
    }

    async fn get_upload(&self, id: &str) -> Result<Option<UploadSession>, MetadataError> {
        let Some(row) = self
            .query_opt(
                "SELECT id, repository, updated_at FROM uploads WHERE id = $1",
                &[&id],
            )
            .await?
        else {
            return Ok(None);
        };
        let repository: &str = row.try_get(1).map_err(db)?;
        Ok(Some(UploadSession {
            id: row.try_get(0).map_err(db)?,
            repository: repository.parse().map_err(|e: oci::NameError| {
                MetadataError::Unavailable(format!("stored repository name: {e}"))
            })?,
            updated_at: row.try_get(2).map_err(db)?,
        }))
    }

    async fn touch_upload(&self, id: &str, now: i64) -> Result<(), MetadataError> {
        self.execute(
            "UPDATE uploads SET updated_at = $2 WHERE id = $1",
            &[&id, &now],
        )
        .await
        .map(drop)
    }

    async fn delete_upload(&self, id: &str) -> Result<(), MetadataError> {
        self.execute("DELETE FROM uploads WHERE id = $1", &[&id])
            .await
            .map(drop)
    }

    async fn stale_uploads(&self, before: i64) -> Result<Vec<String>, MetadataError> {
        self.query("SELECT id FROM uploads WHERE updated_at < $1", &[&before])
            .await?
            .iter()
            .map(|r| r.try_get(0).map_err(db))
            .collect()
    }

    async fn put_manifest(
        &self,
        repo: &RepositoryName,
        manifest: &NewManifest,
        tag: Option<&Tag>,
    ) -> Result<(), MetadataError> {
        let mut attempt = 1;
        loop {
            match self.try_put_manifest(repo, manifest, tag).await {
                Err(f) if f.is_retryable() && attempt < ATTEMPTS => attempt += 1,
                r => return r.map_err(Failure::into_metadata),
            }
        }
    }

    async fn manifest_by_digest(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<Option<StoredManifest>, MetadataError> {
        self.query_opt(
            "SELECT m.digest, m.media_type, m.content FROM manifests m
             JOIN repositories r ON r.id = m.repository_id
             WHERE r.name = $1 AND m.digest = $2",
            &[&repo.as_str(), &digest.to_string()],
        )
        .await?
        .as_ref()
        .map(stored_manifest)
        .transpose()
    }

    async fn manifest_by_tag(
        &self,
        repo: &RepositoryName,
        tag: &Tag,
    ) -> Result<Option<StoredManifest>, MetadataError> {
        self.query_opt(
            "SELECT m.digest, m.media_type, m.content FROM tags t
             JOIN repositories r ON r.id = t.repository_id
             JOIN manifests m ON m.id = t.manifest_id
             WHERE r.name = $1 AND t.name = $2",
            &[&repo.as_str(), &tag.as_str()],
        )
        .await?
        .as_ref()
        .map(stored_manifest)
        .transpose()
    }

    async fn delete_manifest(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<bool, MetadataError> {
        let n = self
            .execute(
                "DELETE FROM manifests WHERE digest = $2
                 AND repository_id = (SELECT id FROM repositories WHERE name = $1)",
                &[&repo.as_str(), &digest.to_string()],
            )
            .await?;
        Ok(n > 0)
    }

    async fn delete_tag(&self, repo: &RepositoryName, tag: &Tag) -> Result<bool, MetadataError> {
        let n = self
            .execute(
                "DELETE FROM tags WHERE name = $2
                 AND repository_id = (SELECT id FROM repositories WHERE name = $1)",
                &[&repo.as_str(), &tag.as_str()],
            )
            .await?;
        Ok(n > 0)
    }

    async fn list_tags(
        &self,
        repo: &RepositoryName,
        page: Page<'_>,
    ) -> Result<Option<Vec<String>>, MetadataError> {
        let last = page.last.unwrap_or("");
        // NULL is LIMIT ALL.
        let limit = page.limit.map(|l| l as i64);
        // One round trip: no row means no repository; one row with a NULL name, no tags.
        let rows = self
            .query(
                "SELECT t.name FROM repositories r
                 LEFT JOIN LATERAL (
                     SELECT name FROM tags WHERE repository_id = r.id AND name > $2
                     ORDER BY name LIMIT $3
                 ) t ON true
                 WHERE r.name = $1",
                &[&repo.as_str(), &last, &limit],
            )
            .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        let mut tags = Vec::with_capacity(rows.len());
        for row in &rows {
            if let Some(name) = row.try_get::<_, Option<String>>(0).map_err(db)? {
                tags.push(name);
            }
        }
        Ok(Some(tags))
    }

    async fn list_repositories(&self, page: Page<'_>) -> Result<Vec<String>, MetadataError> {
        let last = page.last.unwrap_or("");
        let limit = page.limit.map(|l| l as i64);
        self.query(
            "SELECT r.name FROM repositories r
             WHERE r.name > $1 AND EXISTS (SELECT 1 FROM manifests m WHERE m.repository_id = r.id)
             ORDER BY r.name LIMIT $2",
            &[&last, &limit],
        )
        .await?
        .iter()
        .map(|r| r.try_get(0).map_err(db))
        .collect()
    }

    async fn all_repositories(&self) -> Result<Vec<String>, MetadataError> {
        self.query("SELECT name FROM repositories ORDER BY name", &[])
            .await?
            .iter()
            .map(|r| r.try_get(0).map_err(db))
            .collect()
    }

    async fn repository_blobs(
        &self,
        repo: &RepositoryName,
    ) -> Result<Vec<(Digest, u64)>, MetadataError> {
        self.query(
            "SELECT b.digest, b.size FROM blobs b
             JOIN repository_blobs rb ON rb.digest = b.digest
             JOIN repositories r ON r.id = rb.repository_id
             WHERE r.name = $1 ORDER BY b.digest",
            &[&repo.as_str()],
        )
        .await?
        .iter()
        .map(|r| {
            Ok((
                parse_digest(r.try_get(0).map_err(db)?)?,
                r.try_get::<_, i64>(1).map_err(db)? as u64,
            ))
        })
        .collect()
    }

    async fn repository_manifests(
        &self,
        repo: &RepositoryName,
    ) -> Result<Vec<StoredManifest>, MetadataError> {
        self.query(
            "SELECT m.digest, m.media_type, m.content FROM manifests m
             JOIN repositories r ON r.id = m.repository_id
             WHERE r.name = $1 ORDER BY m.id",
            &[&repo.as_str()],
        )
        .await?
        .iter()
        .map(stored_manifest)
        .collect()
    }

    async fn repository_tags(
        &self,
        repo: &RepositoryName,
    ) -> Result<Vec<(String, Digest)>, MetadataError> {
        self.query(
            "SELECT t.name, m.digest FROM tags t
             JOIN manifests m ON m.id = t.manifest_id
             JOIN repositories r ON r.id = t.repository_id
             WHERE r.name = $1 ORDER BY t.name",
            &[&repo.as_str()],
        )
        .await?
        .iter()
        .map(|r| {
            Ok((
                r.try_get(0).map_err(db)?,
                parse_digest(r.try_get(1).map_err(db)?)?,
            ))
        })
        .collect()
    }

    async fn referrers(
        &self,
        repo: &RepositoryName,
        subject: &Digest,
    ) -> Result<Vec<Referrer>, MetadataError> {
        let rows = self
            .query(
                "SELECT m.digest, m.media_type, octet_length(m.content)::bigint, m.artifact_type,
                        m.annotations
                 FROM manifests m JOIN repositories r ON r.id = m.repository_id
                 WHERE r.name = $1 AND m.subject = $2 ORDER BY m.id",
                &[&repo.as_str(), &subject.to_string()],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let annotations: Option<&str> = r.try_get(4).map_err(db)?;
                Ok(Referrer {
                    digest: parse_digest(r.try_get(0).map_err(db)?)?,
                    media_type: r.try_get(1).map_err(db)?,
                    size: r.try_get::<_, i64>(2).map_err(db)? as u64,
                    artifact_type: r.try_get(3).map_err(db)?,
                    annotations: annotations.and_then(|a| serde_json::from_str(a).ok()),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::metadata::tests::metadata_suite;

    const OPTIONS: PoolOptions = PoolOptions {
        size: 8,
        timeout: Duration::from_secs(10),
    };

    /// A database of its own on the server named by `BERTH_TEST_POSTGRES_URL`, dropped by
    /// [`TestDb::drop_database`] (a failed test leaves it behind for inspection).
    struct TestDb {
        admin: tokio_postgres::Client,
        name: String,
        url: String,
    }

    /// `url` with its database name replaced.
    fn with_database(url: &str, db: &str) -> String {
        let (base, query) = url
            .split_once('?')
            .map_or((url, None), |(b, q)| (b, Some(q)));
        let after_scheme = base.find("://").map_or(0, |i| i + 3);
        let end = base[after_scheme..]
            .find('/')
            .map_or(base.len(), |i| after_scheme + i);
        match query {
            Some(q) => format!("{}/{db}?{q}", &base[..end]),
            None => format!("{}/{db}", &base[..end]),
        }
    }

    impl TestDb {
        /// The new database's default collation is linguistic (ICU `en-US`) where the server
        /// supports it, so an ordering that leaned on it instead of `COLLATE "C"` would show.
        async fn create() -> TestDb {
            let admin_url = std::env::var("BERTH_TEST_POSTGRES_URL").unwrap_or_else(|_| {
                panic!(
                    "BERTH_TEST_POSTGRES_URL is not set. The PostgreSQL tests need a server: run \
                     `eval \"$(bash scripts/postgres.sh)\"` first (scripts/test.sh does), or set \
                     it to a superuser URL such as postgres://postgres@127.0.0.1:54329/postgres"
                )
            });
            let (admin, conn) = tokio_postgres::connect(&admin_url, NoTls)
                .await
                .unwrap_or_else(|e| panic!("connecting to BERTH_TEST_POSTGRES_URL: {e:?}"));
            tokio::spawn(conn);
            let name = format!("berth_test_{}", uuid::Uuid::new_v4().simple());
            let icu = format!(
                "CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
            );
            if admin.batch_execute(&icu).await.is_err() {
                admin
                    .batch_execute(&format!("CREATE DATABASE {name}"))
                    .await
                    .unwrap_or_else(|e| panic!("CREATE DATABASE: {e:?}"));
            }
            let url = with_database(&admin_url, &name);
            TestDb { admin, name, url }
        }

        async fn store(&self) -> PostgresMetadata {
            PostgresMetadata::connect(&self.url, OPTIONS)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        }

        async fn drop_database(self) {
            let sql = format!("DROP DATABASE {} WITH (FORCE)", self.name);
            if let Err(e) = self.admin.batch_execute(&sql).await {
                panic!("{sql}: {e:?}");
            }
        }
    }

    fn name(s: &str) -> RepositoryName {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    fn tag(s: &str) -> Tag {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    fn manifest(seed: &str, blobs: Vec<Digest>) -> NewManifest {
        let bytes = format!("{{\"seed\":\"{seed}\"}}").into_bytes();
        NewManifest {
            digest: Digest::sha256_of(&bytes),
            media_type: oci::media_type::OCI_MANIFEST.into(),
            bytes,
            blobs,
            children: vec![],
            subject: None,
            artifact_type: None,
            annotations: None,
        }
    }

    const ALL: Page<'static> = Page {
        last: None,
        limit: None,
    };

    #[test]
    fn database_urls() {
        let cases = [
            ("postgres://u@h:1/postgres", "postgres://u@h:1/x"),
            (
                "postgres://u:p@h/db?sslmode=disable",
                "postgres://u:p@h/x?sslmode=disable",
            ),
            ("postgresql://h", "postgresql://h/x"),
        ];
        for (url, expected) in cases {
            assert_eq!(with_database(url, "x"), expected, "{url}");
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn passes_the_shared_suite() {
        let db = TestDb::create().await;
        metadata_suite(&db.store().await).await;
        db.drop_database().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn names_sort_bytewise_whatever_the_database_collation() {
        let db = TestDb::create().await;
        let store = db.store().await;
        let repo = name("sort/tags");
        let m = manifest("sort", vec![]);
        for t in ["a", "B", "_z", "1", "Z", "b.1", "b-1"] {
            store
                .put_manifest(&repo, &m, Some(&tag(t)))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let want = ["1", "B", "Z", "_z", "a", "b-1", "b.1"];
        assert_eq!(
            store.list_tags(&repo, ALL).await.ok().flatten(),
            Some(want.iter().map(|s| s.to_string()).collect())
        );
        let page = Page {
            last: Some("Z"),
            limit: Some(2),
        };
        assert_eq!(
            store.list_tags(&repo, page).await.ok().flatten(),
            Some(vec!["_z".to_string(), "a".to_string()])
        );

        let mut repos = vec!["a-b", "a/b", "a.b", "a_b", "ab", "a0", "sort/tags"];
        for r in &repos {
            store
                .put_manifest(&name(r), &m, None)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        repos.sort_unstable();
        assert_eq!(
            store.list_repositories(ALL).await.ok(),
            Some(repos.iter().map(|s| s.to_string()).collect())
        );
        let page = Page {
            last: Some("a.b"),
            limit: Some(2),
        };
        assert_eq!(
            store.list_repositories(page).await.ok(),
            Some(vec!["a/b".to_string(), "a0".to_string()])
        );
        db.drop_database().await;
    }

    /// Nodes starting together race to migrate; each migration must run exactly once.
    #[tokio::test(flavor = "multi_thread")]
    async fn nodes_starting_together_migrate_once() {
        let db = TestDb::create().await;
        let starts = (0..4).map(|_| PostgresMetadata::connect(&db.url, OPTIONS));
        for store in futures_util::future::join_all(starts).await {
            assert!(store.is_ok(), "{:?}", store.err());
        }
        let (client, conn) = tokio_postgres::connect(&db.url, NoTls)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(conn);
        let versions: Vec<i32> = client
            .query(
                "SELECT version FROM berth_schema_migrations ORDER BY version",
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(versions, (1..=MIGRATIONS.len() as i32).collect::<Vec<_>>());
        drop(client);
        db.drop_database().await;
    }

    /// Two stores over one database are two nodes: they create the same repositories, push
    /// the same manifest and move the same tag at the same time, and none of it may fail.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_nodes_racing_writes() {
        const ROUNDS: usize = 24;
        let db = TestDb::create().await;
        let nodes = [Arc::new(db.store().await), Arc::new(db.store().await)];
        let blob = Digest::sha256_of(b"race layer");
        let same = manifest("same on both nodes", vec![blob.clone()]);
        let own = [manifest("node 0", vec![]), manifest("node 1", vec![])];
        let shared = name("race/shared");

        let mut tasks = tokio::task::JoinSet::new();
        for round in 0..ROUNDS {
            for (n, node) in nodes.iter().enumerate() {
                let (node, blob, same, own, shared) = (
                    node.clone(),
                    blob.clone(),
                    same.clone(),
                    own[n].clone(),
                    shared.clone(),
                );
                tasks.spawn(async move {
                    let repo = name(&format!("race/r{round:02}"));
                    node.link_blob(&repo, &blob, 10).await?;
                    node.put_manifest(&repo, &same, Some(&tag(&format!("node{n}"))))
                        .await?;
                    node.put_manifest(&repo, &same, Some(&tag("both"))).await?;
                    node.put_manifest(&shared, &own, Some(&tag("latest"))).await
                });
            }
        }
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("a racing write failed: {e}"),
                Err(e) => panic!("{e}"),
            }
        }

        let mut want: Vec<String> = (0..ROUNDS).map(|r| format!("race/r{r:02}")).collect();
        want.push("race/shared".into());
        for node in &nodes {
            assert_eq!(node.list_repositories(ALL).await.ok(), Some(want.clone()));
        }
        for round in 0..ROUNDS {
            let repo = name(&format!("race/r{round:02}"));
            let tags = nodes[round % 2].list_tags(&repo, ALL).await.ok().flatten();
            assert_eq!(
                tags,
                Some(vec!["both".into(), "node0".into(), "node1".into()])
            );
            for t in ["both", "node0", "node1"] {
                let got = nodes[1 - round % 2].manifest_by_tag(&repo, &tag(t)).await;
                assert_eq!(
                    got.ok().flatten().map(|m| m.digest),
                    Some(same.digest.clone())
                );
            }
        }
        let latest = nodes[0].manifest_by_tag(&shared, &tag("latest")).await;
        let latest = latest.ok().flatten().map(|m| m.digest);
        assert!(
            own.iter().any(|m| Some(&m.digest) == latest.as_ref()),
            "latest points at {latest:?}"
        );

        // One row per (repository, manifest): the losing insert found the winner's.
        let (client, conn) = tokio_postgres::connect(&db.url, NoTls)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(conn);
        let rows: i64 = client
            .query_one(
                "SELECT count(*) FROM manifests WHERE digest = $1",
                &[&same.digest.to_string()],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(rows, ROUNDS as i64);
        drop(client);
        drop(nodes);
        db.drop_database().await;
    }
}
