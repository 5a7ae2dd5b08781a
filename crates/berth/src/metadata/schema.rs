//! The schema: numbered migrations, applied in order, each exactly once.
//!
//! Version 1 is history, frozen per dialect as it shipped (the two had drifted: PostgreSQL had
//! three indexes SQLite lacked). From version 2 on, one SQL text serves both, with `{TOKEN}`
//! substitutions (see [`super::db::TOKENS`]); version 2 brings SQLite's indexes level with
//! PostgreSQL's and adds the columns garbage collection will need. SQLite records the version
//! in `PRAGMA user_version`; PostgreSQL in `berth_schema_migrations`, under an advisory lock so
//! that nodes starting together apply each migration exactly once.

use super::MetadataError;
use super::db::{Db, Dialect, Tx, rewrite};

pub enum Migration {
    PerDialect {
        sqlite: &'static str,
        postgres: &'static str,
    },
    Shared(&'static str),
}

pub const MIGRATIONS: &[Migration] = &[
    Migration::PerDialect {
        sqlite: V1_SQLITE,
        postgres: V1_POSTGRES,
    },
    Migration::Shared(V2),
    Migration::Shared(V3),
    Migration::Shared(V4),
    Migration::Shared(V5),
    Migration::Shared(V6),
    Migration::Shared(V7),
    Migration::Shared(INTEGRITY),
    Migration::Shared(TAG_RULES_AND_QUOTAS),
    Migration::Shared(PULL_TIMES),
    Migration::Shared(EVENTS_ACTOR_KIND),
];

/// Key of the transaction-scoped advisory lock that serializes migrations across nodes.
const MIGRATION_LOCK: i64 = 0x6265_7274_686d_6967; // "berthmig"

/// Applies pending migrations in one transaction.
pub async fn migrate(db: &Db) -> Result<(), MetadataError> {
    db.write_unbounded(|tx| Box::pin(migrate_in(tx))).await
}

async fn migrate_in(tx: &mut Tx<'_>) -> Result<(), MetadataError> {
    let dialect = tx.dialect();
    let applied = match dialect {
        Dialect::Sqlite => tx.query_opt("PRAGMA user_version", &[]).await?,
        Dialect::Postgres => {
            tx.execute("SELECT pg_advisory_xact_lock(?1)", &[MIGRATION_LOCK.into()])
                .await?;
            tx.batch(
                "CREATE TABLE IF NOT EXISTS berth_schema_migrations (
                    version    INTEGER PRIMARY KEY,
                    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
                )",
            )
            .await?;
            tx.query_opt(
                "SELECT COALESCE(MAX(version), 0) FROM berth_schema_migrations",
                &[],
            )
            .await?
        }
    };
    let applied = match applied {
        Some(row) => usize::try_from(row.i64(0)?).map_err(MetadataError::internal)?,
        None => 0,
    };
    if applied > MIGRATIONS.len() {
        return Err(MetadataError::internal(format!(
            "the database schema is at version {applied}, newer than this berth knows ({})",
            MIGRATIONS.len()
        )));
    }
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(applied) {
        let version = i as i64 + 1;
        let sql = match (migration, dialect) {
            (Migration::PerDialect { sqlite, .. }, Dialect::Sqlite) => sqlite.to_string(),
            (Migration::PerDialect { postgres, .. }, Dialect::Postgres) => postgres.to_string(),
            (Migration::Shared(sql), _) => rewrite(sql, dialect)?,
        };
        tx.batch(&sql).await?;
        match dialect {
            Dialect::Sqlite => {
                tx.batch(&format!("PRAGMA user_version = {version}"))
                    .await?
            }
            Dialect::Postgres => {
                tx.execute(
                    "INSERT INTO berth_schema_migrations (version) VALUES (?1)",
                    &[version.into()],
                )
                .await?;
            }
        }
        tracing::info!(version, "applied metadata schema migration");
    }
    Ok(())
}

/// Version 1 as SQLite databases have it. Frozen.
pub const V1_SQLITE: &str = r#"
CREATE TABLE repositories (
    id   INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
CREATE TABLE blobs (
    digest TEXT PRIMARY KEY,
    size   INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE repository_blobs (
    repository_id INTEGER NOT NULL REFERENCES repositories(id),
    digest        TEXT NOT NULL REFERENCES blobs(digest),
    PRIMARY KEY (repository_id, digest)
) WITHOUT ROWID;
CREATE INDEX repository_blobs_digest ON repository_blobs(digest);
CREATE TABLE manifests (
    id            INTEGER PRIMARY KEY,
    repository_id INTEGER NOT NULL REFERENCES repositories(id),
    digest        TEXT NOT NULL,
    media_type    TEXT NOT NULL,
    content       BLOB NOT NULL,
    subject       TEXT,
    artifact_type TEXT,
    annotations   TEXT,
    created_at    INTEGER NOT NULL,
    UNIQUE (repository_id, digest)
);
-- Not a partial index: a partial one makes SQLite re-prepare every statement on manifests
-- whose WHERE binds a parameter (it re-checks the index condition per bound value).
CREATE INDEX manifests_subject ON manifests(repository_id, subject);
CREATE TABLE manifest_blobs (
    manifest_id INTEGER NOT NULL REFERENCES manifests(id) ON DELETE CASCADE,
    digest      TEXT NOT NULL,
    PRIMARY KEY (manifest_id, digest)
) WITHOUT ROWID;
CREATE INDEX manifest_blobs_digest ON manifest_blobs(digest);
CREATE TABLE manifest_children (
    manifest_id  INTEGER NOT NULL REFERENCES manifests(id) ON DELETE CASCADE,
    child_digest TEXT NOT NULL,
    PRIMARY KEY (manifest_id, child_digest)
) WITHOUT ROWID;
CREATE TABLE tags (
    repository_id INTEGER NOT NULL REFERENCES repositories(id),
    name          TEXT NOT NULL,
    manifest_id   INTEGER NOT NULL REFERENCES manifests(id) ON DELETE CASCADE,
    updated_at    INTEGER NOT NULL,
    PRIMARY KEY (repository_id, name)
) WITHOUT ROWID;
CREATE TABLE uploads (
    id         TEXT PRIMARY KEY,
    repository TEXT NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;
"#;

/// Version 1 as PostgreSQL databases have it. Frozen.
pub const V1_POSTGRES: &str = r#"
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
"#;

/// Version 2, both dialects: the indexes SQLite lacked, and what garbage collection will need
/// (see "GC protocol" in ARCHITECTURE.md). Rows that exist already count as created and
/// referenced now, so they get a whole grace period.
const V2: &str = r#"
-- Deleting a manifest cascades to its tags; without this index each delete scans all tags.
CREATE INDEX IF NOT EXISTS tags_manifest ON tags(manifest_id);
-- Deleting a manifest looks for an index in its repository that lists it.
CREATE INDEX IF NOT EXISTS manifest_children_child ON manifest_children(child_digest);
CREATE INDEX IF NOT EXISTS uploads_updated_at ON uploads(updated_at);
ALTER TABLE blobs ADD COLUMN created_at {INT} NOT NULL DEFAULT 0;
ALTER TABLE blobs ADD COLUMN last_referenced_at {INT} NOT NULL DEFAULT 0;
ALTER TABLE blobs ADD COLUMN state TEXT NOT NULL DEFAULT 'live'
    CHECK (state IN ('live', 'deleting'));
ALTER TABLE repository_blobs ADD COLUMN created_at {INT} NOT NULL DEFAULT 0;
ALTER TABLE repository_blobs ADD COLUMN last_referenced_at {INT} NOT NULL DEFAULT 0;
UPDATE blobs SET created_at = {NOW}, last_referenced_at = {NOW};
UPDATE repository_blobs SET created_at = {NOW}, last_referenced_at = {NOW};
"#;

/// Version 3, both dialects: who may do what (see `auth` in ARCHITECTURE.md). Accounts are
/// users and robots; credentials are the secrets other than passwords (robot secrets, personal
/// access tokens, refresh tokens), stored as SHA-256 of high-entropy secrets; signing keys are
/// shared by every node; `auth_generation` is bumped by every change to any of these, and
/// nodes poll it to drop their caches. An upload remembers the account that opened it.
const V3: &str = r#"
CREATE TABLE accounts (
    id            {ID},
    name          {NAME} NOT NULL UNIQUE,
    kind          TEXT NOT NULL CHECK (kind IN ('user', 'robot')),
    password_hash TEXT,
    admin         {INT} NOT NULL DEFAULT 0,
    -- Robots: the namespace they belong to, what they may do there (JSON), and an expiry.
    namespace     {NAME},
    grants        TEXT,
    expires_at    {INT},
    created_at    {INT} NOT NULL
);
CREATE TABLE namespaces (
    name       {NAME} PRIMARY KEY,
    public     {INT} NOT NULL DEFAULT 0,
    created_at {INT} NOT NULL
) {WITHOUT_ROWID};
CREATE TABLE namespace_members (
    namespace  {NAME} NOT NULL REFERENCES namespaces(name) ON DELETE CASCADE,
    account_id {INT} NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    role       TEXT NOT NULL CHECK (role IN ('reader', 'writer', 'maintainer', 'owner')),
    PRIMARY KEY (namespace, account_id)
) {WITHOUT_ROWID};
CREATE INDEX namespace_members_account ON namespace_members(account_id);
CREATE TABLE credentials (
    id           {NAME} PRIMARY KEY,
    account_id   {INT} NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    kind         TEXT NOT NULL CHECK (kind IN ('robot', 'personal', 'refresh')),
    secret_hash  TEXT NOT NULL,
    description  TEXT NOT NULL DEFAULT '',
    -- Personal tokens: at most these rights (JSON), NULL for all the user may do.
    grants       TEXT,
    -- Refresh tokens: the service they were issued for.
    service      TEXT,
    created_at   {INT} NOT NULL,
    expires_at   {INT},
    last_used_at {INT},
    revoked_at   {INT}
) {WITHOUT_ROWID};
CREATE INDEX credentials_account ON credentials(account_id);
CREATE TABLE signing_keys (
    kid         {NAME} PRIMARY KEY,
    algorithm   TEXT NOT NULL,
    private_key {BYTES} NOT NULL,
    public_key  {BYTES} NOT NULL,
    created_at  {INT} NOT NULL,
    retired_at  {INT}
) {WITHOUT_ROWID};
CREATE TABLE trust_rules (
    id         {ID},
    name       {NAME} NOT NULL UNIQUE,
    issuer     TEXT NOT NULL,
    audience   TEXT NOT NULL,
    jwks       TEXT NOT NULL,
    conditions TEXT NOT NULL,
    robot_id   {INT} NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    created_at {INT} NOT NULL
);
CREATE TABLE auth_generation (
    id         {INT} PRIMARY KEY CHECK (id = 1),
    generation {INT} NOT NULL
);
INSERT INTO auth_generation (id, generation) VALUES (1, 0);
ALTER TABLE uploads ADD COLUMN owner TEXT;
"#;

/// Version 4, both dialects: the event log (see "Events" in ARCHITECTURE.md). Each event is
/// appended in the transaction of the change it describes; `event_chain` is the head of the
/// hash chain, one row that every append updates, so sequence numbers follow commit order.
const V4: &str = r#"
CREATE TABLE events (
    seq         {INT} PRIMARY KEY,
    at_ms       {INT} NOT NULL,
    kind        TEXT NOT NULL,
    actor       TEXT NOT NULL,
    client_addr TEXT,
    user_agent  TEXT,
    request_id  TEXT,
    repository  {NAME},
    digest      TEXT,
    tags        TEXT NOT NULL,
    size        {INT},
    result      TEXT NOT NULL,
    detail      TEXT,
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL
);
CREATE INDEX events_at ON events(at_ms);
CREATE INDEX events_repository ON events(repository, seq);
CREATE INDEX events_actor ON events(actor, seq);
CREATE INDEX events_kind ON events(kind, seq);
CREATE TABLE event_chain (
    id   {INT} PRIMARY KEY CHECK (id = 1),
    seq  {INT} NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO event_chain (id, seq, hash) VALUES (1, 0, '');
"#;

/// Version 5, both dialects: webhook subscriptions and their delivery state (see "Webhooks" in
/// ARCHITECTURE.md). Each row is a subscription, its cursor in the event log (`cursor_seq`:
/// every event up to it was delivered, parked or filtered out), the failures of the event being
/// tried (`attempt_seq`), statistics, and the lease (`lease_owner` until `lease_until_ms`, by
/// the database's clock) that lets one node at a time deliver for it. `webhook_parked` holds the
/// deliveries that failed `webhook_max_attempts` times; `replay` = 1 queues one again.
const V5: &str = r#"
CREATE TABLE webhooks (
    id              {NAME} PRIMARY KEY,
    namespace       {NAME},
    url             TEXT NOT NULL,
    secret          TEXT NOT NULL,
    events          TEXT NOT NULL,
    repositories    TEXT NOT NULL,
    origin          TEXT NOT NULL CHECK (origin IN ('api', 'config')),
    created_at      {INT} NOT NULL,
    cursor_seq      {INT} NOT NULL,
    attempt_seq     {INT} NOT NULL DEFAULT 0,
    failures        {INT} NOT NULL DEFAULT 0,
    next_attempt_ms {INT} NOT NULL DEFAULT 0,
    last_success_ms {INT},
    last_failure_ms {INT},
    last_error      TEXT,
    last_latency_ms {INT},
    delivered       {INT} NOT NULL DEFAULT 0,
    failed_attempts {INT} NOT NULL DEFAULT 0,
    lease_owner     TEXT,
    lease_until_ms  {INT} NOT NULL DEFAULT 0
) {WITHOUT_ROWID};
CREATE INDEX webhooks_namespace ON webhooks(namespace);
CREATE TABLE webhook_parked (
    webhook_id   {NAME} NOT NULL REFERENCES webhooks(id) ON DELETE CASCADE,
    seq          {INT} NOT NULL,
    attempts     {INT} NOT NULL,
    error        TEXT NOT NULL,
    parked_at_ms {INT} NOT NULL,
    replay       {INT} NOT NULL DEFAULT 0,
    PRIMARY KEY (webhook_id, seq)
) {WITHOUT_ROWID};
"#;

/// Version 6, both dialects: checkpoints of the event log. Pruning old entries first records
/// the last pruned entry's sequence number and hash, signed with the registry's signing key,
/// so the chain stays verifiable from the checkpoint on (see "The event log" in
/// ARCHITECTURE.md).
const V6: &str = r#"
CREATE TABLE event_checkpoints (
    seq       {INT} PRIMARY KEY,
    hash      TEXT NOT NULL,
    at_ms     {INT} NOT NULL,
    kid       TEXT NOT NULL,
    signature TEXT NOT NULL
);
"#;

/// The trash (deleted manifests and tags, kept for `trash_retention_secs` and restorable),
/// leases (one holder at a time among several nodes, such as the GC's) and retention policies.
const V7: &str = r#"
CREATE TABLE trash (
    id          {ID},
    repository  {NAME} NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('manifest', 'tag')),
    -- The digest of the manifest, or the one the tag pointed at (no quotes in comments here).
    digest      TEXT NOT NULL,
    media_type  TEXT,
    content     {BYTES},
    -- JSON array: the tags that pointed at the manifest, or the one tag.
    tags        TEXT NOT NULL,
    reason      TEXT NOT NULL,
    actor       TEXT NOT NULL,
    -- The entry this one went to the trash with (a referrer follows its subject).
    group_id    {INT},
    deleted_at  {INT} NOT NULL
);
CREATE INDEX trash_repository ON trash(repository, digest);
CREATE INDEX trash_deleted_at ON trash(deleted_at);
CREATE INDEX trash_group ON trash(group_id);
-- The blobs a trashed manifest references: their links stay while it may be restored.
CREATE TABLE trash_refs (
    trash_id {INT} NOT NULL REFERENCES trash(id) ON DELETE CASCADE,
    digest   TEXT NOT NULL,
    PRIMARY KEY (trash_id, digest)
) {WITHOUT_ROWID};
CREATE INDEX trash_refs_digest ON trash_refs(digest);
CREATE TABLE leases (
    name     {NAME} PRIMARY KEY,
    owner    TEXT NOT NULL,
    until_ms {INT} NOT NULL
) {WITHOUT_ROWID};
-- What GC keeps of the repositories a pattern matches; everything else there goes to the trash.
CREATE TABLE retention_policies (
    id            {ID},
    repositories  TEXT NOT NULL,
    keep_last     {INT},
    keep_tags     TEXT NOT NULL,
    keep_days     {INT},
    untagged_days {INT},
    created_at    {INT} NOT NULL
);
"#;

/// Integrity scrub (see "Integrity scrub and quarantine" in ARCHITECTURE.md): blobs whose
/// stored bytes failed a check, and the one scrub worker's lease and position. Nothing depends
/// on this migration's number, so a merge may move it.
const INTEGRITY: &str = r#"
CREATE TABLE quarantined_blobs (
    digest      {NAME} PRIMARY KEY,
    found_at_ms {INT} NOT NULL,
    problem     TEXT NOT NULL,
    detail      TEXT NOT NULL
) {WITHOUT_ROWID};
CREATE TABLE scrub_state (
    id                {INT} PRIMARY KEY CHECK (id = 1),
    cursor            {NAME},
    pass_started_ms   {INT},
    last_pass_done_ms {INT},
    lease_owner       TEXT,
    lease_until_ms    {INT} NOT NULL DEFAULT 0
);
INSERT INTO scrub_state (id) VALUES (1);
"#;

/// Tag immutability rules and namespace quotas (see "Immutability and quotas" in
/// ARCHITECTURE.md). `namespace_blobs` counts, per namespace, the manifests that reference each
/// blob (a blob is charged once per namespace while its count is above zero);
/// `namespace_quotas` holds each namespace's usage (charged blobs plus manifest bytes) and its
/// limit, if any. Both start from what the registry already holds. Nothing may depend on this
/// migration's position in [`MIGRATIONS`].
const TAG_RULES_AND_QUOTAS: &str = r#"
CREATE TABLE immutability_rules (
    namespace  {NAME} NOT NULL,
    pattern    {NAME} NOT NULL,
    created_at {INT} NOT NULL,
    created_by TEXT NOT NULL,
    PRIMARY KEY (namespace, pattern)
) {WITHOUT_ROWID};
CREATE TABLE namespace_blobs (
    namespace {NAME} NOT NULL,
    digest    {NAME} NOT NULL,
    size      {INT} NOT NULL,
    refs      {INT} NOT NULL CHECK (refs >= 0),
    PRIMARY KEY (namespace, digest)
) {WITHOUT_ROWID};
CREATE TABLE namespace_quotas (
    namespace   {NAME} PRIMARY KEY,
    usage_bytes {INT} NOT NULL DEFAULT 0,
    limit_bytes {INT}
) {WITHOUT_ROWID};
INSERT INTO namespace_blobs (namespace, digest, size, refs)
SELECT x.namespace, x.digest, b.size, x.refs FROM (
    SELECT CASE WHEN {STRPOS}(r.name, '/') > 0
                THEN substr(r.name, 1, {STRPOS}(r.name, '/') - 1) ELSE r.name END AS namespace,
           mb.digest AS digest, COUNT(*) AS refs
    FROM manifest_blobs mb
    JOIN manifests m ON m.id = mb.manifest_id
    JOIN repositories r ON r.id = m.repository_id
    GROUP BY 1, 2
) x JOIN blobs b ON b.digest = x.digest;
INSERT INTO namespace_quotas (namespace, usage_bytes)
SELECT namespace, CAST(SUM(bytes) AS BIGINT) FROM (
    SELECT namespace, size AS bytes FROM namespace_blobs
    UNION ALL
    SELECT CASE WHEN {STRPOS}(r.name, '/') > 0
                THEN substr(r.name, 1, {STRPOS}(r.name, '/') - 1) ELSE r.name END,
           length(m.content)
    FROM manifests m JOIN repositories r ON r.id = m.repository_id
) u GROUP BY namespace;
"#;

/// When each manifest was last pulled (seconds; recorded in batches by `service::pulls`, so up
/// to one flush interval late), for the retention rule `keep_pulled_days` and so that an
/// untagged manifest still pulled by digest is not old enough for GC.
const PULL_TIMES: &str = r#"
ALTER TABLE manifests ADD COLUMN last_pulled_at {INT};
ALTER TABLE retention_policies ADD COLUMN keep_pulled_days {INT};
"#;

/// "What did this actor do of this kind" (`GET /api/v1/audit?actor=..&kind=..`): through the
/// actor's index alone, a kind the actor never had walks every entry of the actor (1.5 s at
/// 10M entries). Building it takes about a minute per 10M entries, during which PostgreSQL
/// holds appends (and so pushes) back. Nothing depends on this migration's position.
const EVENTS_ACTOR_KIND: &str = r#"
CREATE INDEX IF NOT EXISTS events_actor_kind ON events(actor, kind, seq);
"#;
