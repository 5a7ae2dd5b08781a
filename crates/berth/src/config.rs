//! Configuration, written once: [`RawConfig`] is the one definition of every key. Serde reads it
//! from the TOML file; clap reads the same struct from the environment (`BERTH_<KEY>`) and from
//! flags (`--<key-with-dashes>`), flags winning. `main` lays the two over each other with
//! [`RawConfig::overlay`] and [`RawConfig::validate`] turns the result into [`Config`], the only
//! type the server reads: defaults filled in, every number checked against a range.

use std::fmt::Display;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::builder::BoolishValueParser;
use serde::{Deserialize, Serialize};

use crate::service::gc::Lifecycle;

pub use crate::storage::BackendTimeouts;
pub use crate::storage::s3::S3Settings;

/// Every key. The TOML file uses the field names; each key is also the environment variable
/// `BERTH_<KEY>` and the flag `--<key-with-dashes>` (a unit test holds the code and README.md's
/// table to that). Doc comments are the `--help` text; the README says more.
#[derive(Debug, Default, Clone, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Address to listen on; port 0 picks a free one [default: 127.0.0.1:5000]
    #[arg(long, env = "BERTH_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Serve HTTPS with this PEM certificate chain (with --tls-key); reloaded when it changes
    #[arg(long, env = "BERTH_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert
    #[arg(long, env = "BERTH_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Verify client certificates against these PEM CA certificates; a client may still
    /// connect without one
    #[arg(long, env = "BERTH_TLS_CLIENT_CA", value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
    /// Directory for blobs, uploads and the metadata database [default: ./berth-data]
    #[arg(long, env = "BERTH_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Blob storage: fs (under --data-dir), file:///PATH or s3://BUCKET/PREFIX [default: fs]
    #[arg(long, env = "BERTH_STORAGE", value_name = "URL")]
    pub storage: Option<String>,
    /// Metadata store: sqlite (under --data-dir), sqlite:///PATH or postgres://... [default: sqlite]
    #[arg(
        long,
        env = "BERTH_METADATA",
        value_name = "URL",
        hide_env_values = true
    )]
    pub metadata: Option<String>,
    /// PostgreSQL: most connections one process opens [default: 16]
    #[arg(long, env = "BERTH_METADATA_POOL_SIZE", value_name = "N")]
    pub metadata_pool_size: Option<usize>,
    /// PostgreSQL: bound on connecting and on waiting for a pooled connection [default: 5]
    #[arg(long, env = "BERTH_METADATA_CONNECT_TIMEOUT_SECS", value_name = "SECS")]
    pub metadata_connect_timeout_secs: Option<u64>,
    /// An upload untouched this long is cancelled and its bytes deleted [default: 86400]
    #[arg(long, env = "BERTH_UPLOAD_IDLE_TIMEOUT_SECS", value_name = "SECS")]
    pub upload_idle_timeout_secs: Option<u64>,
    /// How often idle uploads are looked for [default: 600]
    #[arg(long, env = "BERTH_UPLOAD_PURGE_INTERVAL_SECS", value_name = "SECS")]
    pub upload_purge_interval_secs: Option<u64>,
    /// Largest manifest accepted, in bytes [default: 4194304]
    #[arg(long, env = "BERTH_MAX_MANIFEST_BYTES", value_name = "BYTES")]
    pub max_manifest_bytes: Option<usize>,
    /// Most manifest bytes held in memory at once, across all requests [default: 67108864]
    #[arg(long, env = "BERTH_MAX_BUFFERED_MANIFEST_BYTES", value_name = "BYTES")]
    pub max_buffered_manifest_bytes: Option<usize>,
    /// Bytes of SQLite reads (manifests, blob links, tag lists) kept in memory while nothing commits; 0: none [default: 16777216]
    #[arg(long, env = "BERTH_METADATA_CACHE_BYTES", value_name = "BYTES")]
    pub metadata_cache_bytes: Option<u64>,
    /// Bytes of verified small-blob copies (up to 64 KiB each) kept in memory; 0: none [default: 16777216]
    #[arg(long, env = "BERTH_BLOB_CACHE_BYTES", value_name = "BYTES")]
    pub blob_cache_bytes: Option<u64>,
    /// Prune audit entries older than this many days, behind a signed checkpoint; 0 keeps all [default: 0]
    #[arg(long, env = "BERTH_AUDIT_RETENTION_DAYS", value_name = "DAYS")]
    pub audit_retention_days: Option<u64>,
    /// Record one manifest GET (a pull) in this many as an event; 0: none, 1: all [default: 0]
    #[arg(long, env = "BERTH_PULL_EVENTS_EVERY", value_name = "N")]
    pub pull_events_every: Option<u64>,
    /// A blob nothing references may be collected this long after it was last referenced [default: 86400]
    #[arg(long, env = "BERTH_GC_GRACE_SECS", value_name = "SECS")]
    pub gc_grace_secs: Option<u64>,
    /// Deleted manifests and tags stay restorable this long; 0 deletes at once [default: 604800]
    #[arg(long, env = "BERTH_TRASH_RETENTION_SECS", value_name = "SECS")]
    pub trash_retention_secs: Option<u64>,
    /// GC moves untagged manifests older than this to the trash; unset keeps them [default: unset]
    #[arg(long, env = "BERTH_GC_UNTAGGED_MANIFEST_SECS", value_name = "SECS")]
    pub gc_untagged_manifest_secs: Option<u64>,
    /// Percent of the time a GC run works; it sleeps the rest between batches [default: 50]
    #[arg(long, env = "BERTH_GC_DUTY_PERCENT", value_name = "PERCENT")]
    pub gc_duty_percent: Option<u32>,
    /// serve runs GC this often (one node at a time); 0: only `berth gc` [default: 3600]
    #[arg(long, env = "BERTH_GC_INTERVAL_SECS", value_name = "SECS")]
    pub gc_interval_secs: Option<u64>,
    /// Manifest pulls are written to metadata (for keep_pulled_days) this often [default: 60]
    #[arg(long, env = "BERTH_PULL_TIMES_FLUSH_SECS", value_name = "SECS")]
    pub pull_times_flush_secs: Option<u64>,
    /// Integrity scrub: blob bytes re-read and hashed per second; 0 turns it off [default: 8388608]
    #[arg(long, env = "BERTH_SCRUB_BYTES_PER_SEC", value_name = "BYTES")]
    pub scrub_bytes_per_sec: Option<u64>,
    /// Integrity scrub: pause between the end of one pass and the start of the next [default: 86400]
    #[arg(long, env = "BERTH_SCRUB_INTERVAL_SECS", value_name = "SECS")]
    pub scrub_interval_secs: Option<u64>,
    /// Largest blob accepted, in bytes [default: 68719476736]
    #[arg(long, env = "BERTH_MAX_BLOB_BYTES", value_name = "BYTES")]
    pub max_blob_bytes: Option<u64>,
    /// Connections served at once; more wait in the accept backlog [default: 4096, lower if
    /// the open-file limit needs it]
    #[arg(long, env = "BERTH_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// A client gets this long to send a request's headers; also closes idle keep-alive
    /// connections [default: 30]
    #[arg(long, env = "BERTH_HEADER_READ_TIMEOUT_SECS", value_name = "SECS")]
    pub header_read_timeout_secs: Option<u64>,
    /// A request body that sends nothing for this long is aborted [default: 60]
    #[arg(long, env = "BERTH_BODY_IDLE_TIMEOUT_SECS", value_name = "SECS")]
    pub body_idle_timeout_secs: Option<u64>,
    /// After SIGTERM/SIGINT, in-flight requests get this long to finish [default: 30]
    #[arg(long, env = "BERTH_SHUTDOWN_GRACE_SECS", value_name = "SECS")]
    pub shutdown_grace_secs: Option<u64>,
    /// text or json [default: text]
    #[arg(long, env = "BERTH_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Access control: none (anyone may do anything; only on loopback unless
    /// --allow-anonymous) or token (accounts, Docker token auth) [default: none]
    #[arg(long, env = "BERTH_AUTH", value_name = "MODE")]
    pub auth: Option<String>,
    /// Serve without access control on a non-loopback address (warns at every start)
    /// [default: false]
    #[arg(long, env = "BERTH_ALLOW_ANONYMOUS", value_name = "BOOL",
          num_args = 0..=1, default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub allow_anonymous: Option<bool>,
    /// The service name in challenges and tokens (the tokens' audience and issuer)
    /// [default: berth]
    #[arg(long, env = "BERTH_AUTH_SERVICE", value_name = "NAME")]
    pub auth_service: Option<String>,
    /// Lifetime of issued registry tokens [default: 300]
    #[arg(long, env = "BERTH_TOKEN_TTL_SECS", value_name = "SECS")]
    pub token_ttl_secs: Option<u64>,
    /// Lifetime of refresh tokens (OAuth2 access_type=offline) [default: 2592000]
    #[arg(long, env = "BERTH_REFRESH_TOKEN_TTL_SECS", value_name = "SECS")]
    pub refresh_token_ttl_secs: Option<u64>,
    /// The registry's external URL, for the token realm in challenges [default: the scheme
    /// and Host of each request]
    #[arg(long, env = "BERTH_PUBLIC_URL", value_name = "URL")]
    pub public_url: Option<String>,
    /// Failed logins per minute one account may have; then attempts wait [default: 10]
    #[arg(long, env = "BERTH_MAX_FAILED_LOGINS_PER_MINUTE", value_name = "N")]
    pub max_failed_logins_per_minute: Option<u32>,
    /// Failed logins per minute from one client address [default: 30]
    #[arg(
        long,
        env = "BERTH_MAX_FAILED_LOGINS_PER_MINUTE_PER_ADDRESS",
        value_name = "N"
    )]
    pub max_failed_logins_per_minute_per_address: Option<u32>,
    /// Requests per second from one client address; 0 is unlimited [default: 0]
    #[arg(long, env = "BERTH_RATE_LIMIT_PER_ADDRESS", value_name = "N")]
    pub rate_limit_per_address: Option<u32>,
    /// Requests per second by one account; 0 is unlimited [default: 0]
    #[arg(long, env = "BERTH_RATE_LIMIT_PER_ACCOUNT", value_name = "N")]
    pub rate_limit_per_account: Option<u32>,
    /// Upload requests in flight per account (per address when anonymous); 0 is unlimited
    /// [default: 0]
    #[arg(
        long,
        env = "BERTH_MAX_CONCURRENT_UPLOADS_PER_CLIENT",
        value_name = "N"
    )]
    pub max_concurrent_uploads_per_client: Option<u32>,
    /// TOML file listing other token servers whose bearer tokens are accepted ([[issuer]] with
    /// issuer, audience, and jwks or public_key_file) [default: none]
    #[arg(long, env = "BERTH_TRUSTED_ISSUERS_FILE", value_name = "FILE")]
    pub trusted_issuers_file: Option<PathBuf>,
    /// Object store and PostgreSQL: bound on opening a TCP connection [default: 3]
    #[arg(long, env = "BERTH_BACKEND_CONNECT_TIMEOUT_SECS", value_name = "SECS")]
    pub backend_connect_timeout_secs: Option<u64>,
    /// Bound on the wait for a backend's first answer: a blob read from storage until its
    /// bytes start, each readiness probe [default: 4]
    #[arg(
        long,
        env = "BERTH_BACKEND_FIRST_BYTE_TIMEOUT_SECS",
        value_name = "SECS"
    )]
    pub backend_first_byte_timeout_secs: Option<u64>,
    /// Budget of one backend call with its retries (a metadata transaction, a storage call
    /// short of streaming a body); past it the request gets 503 [default: 8]
    #[arg(
        long,
        env = "BERTH_BACKEND_OPERATION_TIMEOUT_SECS",
        value_name = "SECS"
    )]
    pub backend_operation_timeout_secs: Option<u64>,
    /// One log line per request at info level (target berth::access) [default: true]
    #[arg(long, env = "BERTH_ACCESS_LOG", value_name = "BOOL",
          value_parser = BoolishValueParser::new())]
    pub access_log: Option<bool>,
    /// Record Prometheus metrics and serve them at /metrics [default: true]
    #[arg(long, env = "BERTH_METRICS", value_name = "BOOL",
          value_parser = BoolishValueParser::new())]
    pub metrics: Option<bool>,
    /// Also serve /metrics, /healthz and /readyz (never anything else, never with auth) on
    /// this address, e.g. 0.0.0.0:9090 [default: none]
    #[arg(long, env = "BERTH_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// /metrics on the main listener needs credentials (any account) [default: false]
    #[arg(long, env = "BERTH_METRICS_REQUIRE_AUTH", value_name = "BOOL",
          value_parser = BoolishValueParser::new())]
    pub metrics_require_auth: Option<bool>,
    /// Add a repository label to the push and pull counters (one series per repository)
    /// [default: false]
    #[arg(long, env = "BERTH_METRICS_PER_REPOSITORY", value_name = "BOOL",
          value_parser = BoolishValueParser::new())]
    pub metrics_per_repository: Option<bool>,
    /// Export a span per request over OTLP/HTTP to this OpenTelemetry collector, e.g.
    /// http://127.0.0.1:4318 (needs a berth built with the `otel` feature) [default: none]
    #[arg(long, env = "BERTH_OTEL_ENDPOINT", value_name = "URL")]
    pub otel_endpoint: Option<String>,
    /// S3 API URL, e.g. http://127.0.0.1:3900 [default: AWS_ENDPOINT_URL, else AWS]
    #[arg(long, env = "BERTH_S3_ENDPOINT", value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// Region the S3 requests are signed for [default: AWS_REGION, else us-east-1]
    #[arg(long, env = "BERTH_S3_REGION", value_name = "REGION")]
    pub s3_region: Option<String>,
    /// [default: AWS_ACCESS_KEY_ID]
    #[arg(
        long,
        env = "BERTH_S3_ACCESS_KEY_ID",
        value_name = "ID",
        hide_env_values = true
    )]
    pub s3_access_key_id: Option<String>,
    /// [default: AWS_SECRET_ACCESS_KEY]
    #[arg(
        long,
        env = "BERTH_S3_SECRET_ACCESS_KEY",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub s3_secret_access_key: Option<String>,
    /// Read the S3 secret access key from this file (trailing whitespace ignored)
    #[arg(long, env = "BERTH_S3_SECRET_ACCESS_KEY_FILE", value_name = "FILE")]
    pub s3_secret_access_key_file: Option<PathBuf>,
    /// ENDPOINT/BUCKET/KEY URLs, as self-hosted stores expect [default: true]
    #[arg(long, env = "BERTH_S3_PATH_STYLE", value_name = "BOOL",
          value_parser = BoolishValueParser::new())]
    pub s3_path_style: Option<bool>,
    /// Requests to the object store in flight at once [default: 64]
    #[arg(long, env = "BERTH_S3_MAX_CONCURRENT_REQUESTS", value_name = "N")]
    pub s3_max_concurrent_requests: Option<usize>,
    /// Answer blob GETs with 307 to a presigned URL [default: false]
    #[arg(long, env = "BERTH_S3_REDIRECT_BLOB_GETS", value_name = "BOOL",
          value_parser = BoolishValueParser::new())]
    pub s3_redirect_blob_gets: Option<bool>,
    /// Failed attempts after which a webhook delivery is parked [default: 12]
    #[arg(long, env = "BERTH_WEBHOOK_MAX_ATTEMPTS", value_name = "N")]
    pub webhook_max_attempts: Option<u32>,
    /// Bound on one webhook delivery attempt (connect, send, answer) [default: 10]
    #[arg(long, env = "BERTH_WEBHOOK_TIMEOUT_SECS", value_name = "SECS")]
    pub webhook_timeout_secs: Option<u64>,
    /// Longest wait between two attempts of a webhook delivery [default: 300]
    #[arg(long, env = "BERTH_WEBHOOK_BACKOFF_MAX_SECS", value_name = "SECS")]
    pub webhook_backoff_max_secs: Option<u64>,
    /// How often the event log is looked at for new events to deliver [default: 200]
    #[arg(long, env = "BERTH_WEBHOOK_POLL_INTERVAL_MS", value_name = "MS")]
    pub webhook_poll_interval_ms: Option<u64>,
    /// Webhook subscriptions: `[[webhooks]]` tables in the config file only (a table array
    /// has no environment or flag form); see README.md
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhooks: Option<Vec<crate::webhooks::WebhookSpec>>,
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const TIB: u64 = 1024 * GIB;
const DAY_SECS: u64 = 86_400;

/// Connections served at once when neither the config nor the open-file limit says otherwise.
const DEFAULT_MAX_CONNECTIONS: u64 = 4096;
/// File descriptors a connection may hold: its socket, plus a blob or upload file while it
/// streams one.
const FDS_PER_CONNECTION: u64 = 2;
/// File descriptors kept for everything but connections: stdio, the listener, the runtime,
/// SQLite's database, WAL and shared-memory files per connection, temporary files.
const RESERVED_FDS: u64 = 128;

impl RawConfig {
    pub fn from_toml_file(path: &Path) -> anyhow::Result<RawConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("parsing config {}: {e}", path.display()))
    }

    /// Every key with a value (not a table), as the config file spells it: each is also an
    /// environment variable and a flag.
    pub fn keys() -> Vec<String> {
        match serde_json::to_value(RawConfig::default()) {
            Ok(serde_json::Value::Object(map)) => map.into_iter().map(|(k, _)| k).collect(),
            _ => Vec::new(),
        }
    }

    /// Keys set in `over` replace those in `self`. Works key by key through the serde form, so
    /// a new key needs no code here.
    pub fn overlay(self, over: RawConfig) -> anyhow::Result<RawConfig> {
        let object = |raw: RawConfig| match serde_json::to_value(raw) {
            Ok(serde_json::Value::Object(map)) => Ok(map),
            Ok(_) => anyhow::bail!("the config did not serialize to a map"),
            Err(e) => anyhow::bail!("a config value is not representable: {e}"),
        };
        let mut merged = object(self)?;
        for (key, value) in object(over)? {
            if !value.is_null() {
                merged.insert(key, value);
            }
        }
        Ok(serde_json::from_value(serde_json::Value::Object(merged))?)
    }

    pub fn validate(self) -> anyhow::Result<Config> {
        let listen = self.listen.as_deref().unwrap_or("127.0.0.1:5000");
        let listen: SocketAddr = listen
            .parse()
            .map_err(|e| anyhow::anyhow!("listen address {listen:?}: {e}"))?;
        let log_format = match self.log_format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => anyhow::bail!("log_format must be text or json, not {other:?}"),
        };
        // Only paths here: `tls::Tls::load` reads and checks the files when the server starts,
        // so commands that never serve (migrate, copy) do not need them.
        let tls = match (self.tls_cert, self.tls_key, self.tls_client_ca) {
            (Some(cert), Some(key), client_ca) => Some(TlsConfig {
                cert,
                key,
                client_ca,
            }),
            (None, None, None) => None,
            (None, None, Some(_)) => {
                anyhow::bail!("tls_client_ca needs TLS: set tls_cert and tls_key as well")
            }
            (Some(_), None, _) | (None, Some(_), _) => {
                anyhow::bail!("tls_cert and tls_key go together: set both or neither")
            }
        };
        let data_dir = self.data_dir.unwrap_or_else(|| PathBuf::from("berth-data"));
        let storage = StorageConfig::parse(self.storage.as_deref(), &data_dir)?;
        let metadata = MetadataConfig::parse(self.metadata.as_deref(), &data_dir)?;

        // Every number has a range: a value past it is refused here, by name, rather than
        // wrapping or overflowing somewhere below (seconds become i64 timestamps in SQL).
        let max_manifest_bytes = within(
            "max_manifest_bytes",
            self.max_manifest_bytes,
            4 * MIB,
            1,
            256 * MIB,
        )?;
        let max_buffered_manifest_bytes = within(
            "max_buffered_manifest_bytes",
            self.max_buffered_manifest_bytes,
            64 * MIB,
            1,
            GIB,
        )?;
        anyhow::ensure!(
            max_buffered_manifest_bytes >= max_manifest_bytes,
            "max_buffered_manifest_bytes ({max_buffered_manifest_bytes}) must be at least \
             max_manifest_bytes ({max_manifest_bytes}), or a largest manifest could never be read"
        );
        let max_blob_bytes = within("max_blob_bytes", self.max_blob_bytes, 64 * GIB, 1, 16 * TIB)?;
        let metadata_pool_size =
            within("metadata_pool_size", self.metadata_pool_size, 16, 1, 1024)?;
        let s3_max_concurrent_requests = within(
            "s3_max_concurrent_requests",
            self.s3_max_concurrent_requests,
            64,
            1,
            4096,
        )?;
        let reserved_fds = RESERVED_FDS
            + match metadata {
                MetadataConfig::Postgres(_) => metadata_pool_size as u64,
                MetadataConfig::Sqlite(_) => 0,
            }
            + match storage {
                StorageConfig::S3 { .. } => s3_max_concurrent_requests as u64,
                StorageConfig::Filesystem(_) => 0,
            };
        let max_connections = within(
            "max_connections",
            self.max_connections,
            default_max_connections(open_file_limit(), reserved_fds),
            1,
            1_000_000,
        )?;

        let backend_timeouts = BackendTimeouts {
            connect: secs(
                "backend_connect_timeout_secs",
                self.backend_connect_timeout_secs,
                3,
                1,
                600,
            )?,
            first_byte: secs(
                "backend_first_byte_timeout_secs",
                self.backend_first_byte_timeout_secs,
                4,
                1,
                3600,
            )?,
            operation: secs(
                "backend_operation_timeout_secs",
                self.backend_operation_timeout_secs,
                8,
                1,
                3600,
            )?,
        };
        let metrics_listen = match self.metrics_listen.as_deref() {
            None | Some("") => None,
            Some(addr) => Some(
                addr.parse::<SocketAddr>()
                    .map_err(|e| anyhow::anyhow!("metrics_listen address {addr:?}: {e}"))?,
            ),
        };
        let otel_endpoint = match self.otel_endpoint.as_deref() {
            None | Some("") => None,
            Some(url) => {
                let base = url.trim_end_matches('/');
                let authority = base
                    .strip_prefix("http://")
                    .or_else(|| base.strip_prefix("https://"));
                anyhow::ensure!(
                    authority.is_some_and(|a| !a.is_empty() && !a.contains(['?', '#'])),
                    "otel_endpoint must be an http:// or https:// URL without a query, not {url:?}"
                );
                Some(base.to_string())
            }
        };
        let observe = ObserveOptions {
            otel_endpoint,
            access_log: self.access_log.unwrap_or(true),
            metrics: self.metrics.unwrap_or(true),
            metrics_listen,
            metrics_require_auth: self.metrics_require_auth.unwrap_or(false),
            metrics_per_repository: self.metrics_per_repository.unwrap_or(false),
        };
        anyhow::ensure!(
            observe.metrics || observe.metrics_listen.is_none(),
            "metrics_listen needs metrics = true"
        );

        let s3 = S3Settings {
            endpoint: self.s3_endpoint,
            region: self.s3_region,
            access_key_id: self.s3_access_key_id,
            secret_access_key: match (self.s3_secret_access_key, self.s3_secret_access_key_file) {
                (Some(_), Some(_)) => {
                    anyhow::bail!("set s3_secret_access_key or s3_secret_access_key_file, not both")
                }
                (Some(secret), None) => Some(secret),
                (None, Some(file)) => Some(
                    std::fs::read_to_string(&file)
                        .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?
                        .trim_end()
                        .to_string(),
                ),
                (None, None) => None,
            },
            path_style: self.s3_path_style.unwrap_or(true),
            max_concurrent_requests: s3_max_concurrent_requests,
            redirect_blob_gets: self.s3_redirect_blob_gets.unwrap_or(false),
            timeouts: backend_timeouts,
        };

        let auth_enabled = match self.auth.as_deref().unwrap_or("none") {
            "none" => false,
            "token" => true,
            other => anyhow::bail!("auth must be none or token, not {other:?}"),
        };
        let allow_anonymous = self.allow_anonymous.unwrap_or(false);
        anyhow::ensure!(
            auth_enabled || allow_anonymous || listen.ip().is_loopback(),
            "refusing to serve {listen} without access control: anyone who reaches it could \
             push, overwrite and delete. Turn auth on (--auth token, after `berth user add \
             NAME --admin`), listen on a loopback address, or pass --allow-anonymous"
        );
        let service = self.auth_service.unwrap_or_else(|| "berth".to_string());
        anyhow::ensure!(
            !service.is_empty() && !service.contains('"') && service.len() <= 255,
            "auth_service must be 1 to 255 characters without quotes"
        );
        let public_url = match self.public_url {
            Some(url) => {
                let url = url.trim_end_matches('/').to_string();
                anyhow::ensure!(
                    (url.starts_with("http://") || url.starts_with("https://"))
                        && !url.contains('"'),
                    "public_url must be an http:// or https:// URL, not {url:?}"
                );
                Some(url)
            }
            None => None,
        };
        let limits = crate::auth::limits::LimitOptions {
            failed_logins_per_account: within(
                "max_failed_logins_per_minute",
                self.max_failed_logins_per_minute,
                10,
                1,
                10_000,
            )?,
            failed_logins_per_address: within(
                "max_failed_logins_per_minute_per_address",
                self.max_failed_logins_per_minute_per_address,
                30,
                1,
                100_000,
            )?,
            requests_per_address: within(
                "rate_limit_per_address",
                self.rate_limit_per_address,
                0,
                0,
                1_000_000,
            )?,
            requests_per_account: within(
                "rate_limit_per_account",
                self.rate_limit_per_account,
                0,
                0,
                1_000_000,
            )?,
            concurrent_uploads: within(
                "max_concurrent_uploads_per_client",
                self.max_concurrent_uploads_per_client,
                0,
                0,
                100_000,
            )?,
        };
        let external_issuers = match &self.trusted_issuers_file {
            Some(path) => crate::auth::external::load(path).map_err(anyhow::Error::msg)?,
            None => Vec::new(),
        };
        if let Some(i) = external_issuers.iter().find(|i| i.issuer == service) {
            anyhow::bail!(
                "trusted_issuers_file: issuer {:?} is this registry's own (auth_service)",
                i.issuer
            );
        }
        let auth = crate::auth::AuthOptions {
            enabled: auth_enabled,
            limits,
            external_issuers,
            public_url,
            issuer: service.clone(),
            service,
            token_ttl: secs("token_ttl_secs", self.token_ttl_secs, 300, 10, DAY_SECS)?,
            refresh_token_ttl: secs(
                "refresh_token_ttl_secs",
                self.refresh_token_ttl_secs,
                30 * DAY_SECS,
                60,
                365 * DAY_SECS,
            )?,
        };

        let webhooks = WebhookOptions {
            max_attempts: within(
                "webhook_max_attempts",
                self.webhook_max_attempts,
                12,
                1,
                1000,
            )?,
            timeout: secs(
                "webhook_timeout_secs",
                self.webhook_timeout_secs,
                10,
                1,
                300,
            )?,
            backoff_max: secs(
                "webhook_backoff_max_secs",
                self.webhook_backoff_max_secs,
                300,
                1,
                DAY_SECS,
            )?,
            poll_interval: Duration::from_millis(within(
                "webhook_poll_interval_ms",
                self.webhook_poll_interval_ms,
                200,
                10,
                60_000,
            )?),
            subscriptions: crate::webhooks::from_config(self.webhooks.unwrap_or_default())
                .map_err(anyhow::Error::msg)?,
        };

        Ok(Config {
            webhooks,
            auth,
            allow_anonymous,
            listen,
            tls,
            storage,
            metadata,
            metadata_pool_size,
            metadata_connect_timeout: secs(
                "metadata_connect_timeout_secs",
                self.metadata_connect_timeout_secs,
                5,
                1,
                3600,
            )?,
            data_dir,
            upload_idle_timeout: secs(
                "upload_idle_timeout_secs",
                self.upload_idle_timeout_secs,
                DAY_SECS,
                1,
                365 * DAY_SECS,
            )?,
            upload_purge_interval: secs(
                "upload_purge_interval_secs",
                self.upload_purge_interval_secs,
                600,
                1,
                DAY_SECS,
            )?,
            max_manifest_bytes,
            max_buffered_manifest_bytes,
            metadata_cache_bytes: within(
                "metadata_cache_bytes",
                self.metadata_cache_bytes,
                16 * MIB,
                0,
                4 * GIB,
            )?,
            blob_cache_bytes: within(
                "blob_cache_bytes",
                self.blob_cache_bytes,
                16 * MIB,
                0,
                4 * GIB,
            )?,
            audit_retention_days: within(
                "audit_retention_days",
                self.audit_retention_days,
                0,
                0,
                36_500,
            )?,
            pull_events_every: within(
                "pull_events_every",
                self.pull_events_every,
                0,
                0,
                1_000_000,
            )?,
            lifecycle: Lifecycle {
                // At most ten years: the casts below cannot overflow.
                gc_grace_secs: within(
                    "gc_grace_secs",
                    self.gc_grace_secs,
                    DAY_SECS,
                    0,
                    3650 * DAY_SECS,
                )? as i64,
                trash_retention_secs: within(
                    "trash_retention_secs",
                    self.trash_retention_secs,
                    7 * DAY_SECS,
                    0,
                    3650 * DAY_SECS,
                )? as i64,
                untagged_manifest_secs: self
                    .gc_untagged_manifest_secs
                    .map(|v| within("gc_untagged_manifest_secs", Some(v), 0, 0, 3650 * DAY_SECS))
                    .transpose()?
                    .map(|v: u64| v as i64),
                gc_duty_percent: within("gc_duty_percent", self.gc_duty_percent, 50, 1, 100)?,
            },
            gc_interval: secs(
                "gc_interval_secs",
                self.gc_interval_secs,
                3600,
                0,
                7 * DAY_SECS,
            )?,
            pull_times_flush: secs(
                "pull_times_flush_secs",
                self.pull_times_flush_secs,
                60,
                1,
                DAY_SECS,
            )?,
            scrub_bytes_per_sec: within(
                "scrub_bytes_per_sec",
                self.scrub_bytes_per_sec,
                8 * 1024 * 1024,
                0,
                1 << 40,
            )?,
            scrub_interval: secs(
                "scrub_interval_secs",
                self.scrub_interval_secs,
                DAY_SECS,
                1,
                365 * DAY_SECS,
            )?,
            max_blob_bytes,
            max_connections,
            reserved_fds,
            header_read_timeout: secs(
                "header_read_timeout_secs",
                self.header_read_timeout_secs,
                30,
                1,
                3600,
            )?,
            body_idle_timeout: secs(
                "body_idle_timeout_secs",
                self.body_idle_timeout_secs,
                60,
                1,
                3600,
            )?,
            shutdown_grace: secs("shutdown_grace_secs", self.shutdown_grace_secs, 30, 0, 3600)?,
            log_format,
            s3,
            backend_timeouts,
            observe,
        })
    }
}

/// The value of `key` (or its default), refused unless `min <= value <= max`. Limits are given
/// as u64 so that one table of constants serves every integer type.
fn within<T>(key: &str, value: Option<T>, default: u64, min: u64, max: u64) -> anyhow::Result<T>
where
    T: Copy + Display + TryFrom<u64> + TryInto<u64>,
{
    let Some(value) = value else {
        return T::try_from(default).map_err(|_| anyhow::anyhow!("{key}: default out of range"));
    };
    let in_range = value
        .try_into()
        .is_ok_and(|v: u64| (min..=max).contains(&v));
    anyhow::ensure!(
        in_range,
        "{key} = {value} is out of range: it must be at least {min} and at most {max}"
    );
    Ok(value)
}

fn secs(
    key: &str,
    value: Option<u64>,
    default: u64,
    min: u64,
    max: u64,
) -> anyhow::Result<Duration> {
    within(key, value, default, min, max).map(Duration::from_secs)
}

/// `min(4096, what the open-file limit leaves for connections)`, so that the default never
/// lets connections run the process out of file descriptors (a 1024 limit gives 448).
fn default_max_connections(fd_limit: Option<u64>, reserved_fds: u64) -> u64 {
    match fd_limit {
        Some(limit) => (limit.saturating_sub(reserved_fds) / FDS_PER_CONNECTION)
            .clamp(16, DEFAULT_MAX_CONNECTIONS),
        None => DEFAULT_MAX_CONNECTIONS,
    }
}

/// The soft limit on open files (`ulimit -n`), if this platform says (Linux: /proc).
pub fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Which blob store to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageConfig {
    Filesystem(PathBuf),
    S3 { bucket: String, prefix: String },
}

impl StorageConfig {
    pub fn parse(url: Option<&str>, data_dir: &Path) -> anyhow::Result<StorageConfig> {
        match url {
            None | Some("" | "fs" | "file") => {
                Ok(StorageConfig::Filesystem(data_dir.to_path_buf()))
            }
            Some(u) if u.starts_with("file://") => Ok(StorageConfig::Filesystem(PathBuf::from(
                &u["file://".len()..],
            ))),
            Some(u) if u.starts_with("s3://") => {
                let rest = &u["s3://".len()..];
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                anyhow::ensure!(!bucket.is_empty(), "storage URL {u:?} has no bucket");
                Ok(StorageConfig::S3 {
                    bucket: bucket.to_string(),
                    prefix: prefix.trim_matches('/').to_string(),
                })
            }
            Some(u) => {
                anyhow::bail!("storage must be fs, file:///PATH or s3://BUCKET/PREFIX, not {u:?}")
            }
        }
    }
}

/// Which metadata store to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetadataConfig {
    Sqlite(PathBuf),
    /// A libpq-style connection URL, kept whole (it may carry a password).
    Postgres(String),
}

impl MetadataConfig {
    pub fn parse(url: Option<&str>, data_dir: &Path) -> anyhow::Result<MetadataConfig> {
        match url {
            None | Some("" | "sqlite") => Ok(MetadataConfig::Sqlite(data_dir.join("metadata.db"))),
            Some(u) if u.starts_with("sqlite://") => Ok(MetadataConfig::Sqlite(PathBuf::from(
                &u["sqlite://".len()..],
            ))),
            Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
                Ok(MetadataConfig::Postgres(u.to_string()))
            }
            Some(_) => anyhow::bail!("metadata must be sqlite, sqlite:///PATH or postgres://..."),
        }
    }
}

/// Where the TLS certificate, its key and the optional client CA bundle are (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients may present a certificate, and one they present must chain to these.
    pub client_ca: Option<PathBuf>,
}

/// How webhooks are delivered, and the subscriptions of the config file.
#[derive(Debug, Clone)]
pub struct WebhookOptions {
    pub max_attempts: u32,
    pub timeout: Duration,
    pub backoff_max: Duration,
    pub poll_interval: Duration,
    pub subscriptions: Vec<crate::metadata::webhooks::NewWebhook>,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub webhooks: WebhookOptions,
    pub auth: crate::auth::AuthOptions,
    /// Serving without access control on a non-loopback address was asked for.
    pub allow_anonymous: bool,
    pub listen: SocketAddr,
    /// HTTPS when set, plain HTTP otherwise.
    pub tls: Option<TlsConfig>,
    pub data_dir: PathBuf,
    pub storage: StorageConfig,
    pub metadata: MetadataConfig,
    pub metadata_pool_size: usize,
    pub metadata_connect_timeout: Duration,
    pub upload_idle_timeout: Duration,
    pub upload_purge_interval: Duration,
    pub max_manifest_bytes: usize,
    /// Most manifest bytes buffered in memory at once, across all requests.
    pub max_buffered_manifest_bytes: usize,
    /// Bytes of SQLite reads cached while nothing commits (see `metadata::cache`).
    pub metadata_cache_bytes: u64,
    /// Bytes of verified small-blob copies kept (see `service::small_blobs`).
    pub blob_cache_bytes: u64,
    pub pull_events_every: u64,
    pub audit_retention_days: u64,
    /// Grace, trash and untagged periods (GC and deletes).
    pub lifecycle: Lifecycle,
    /// How often `serve` runs GC; zero: never (only `berth gc`).
    pub gc_interval: Duration,
    /// How often noted manifest pulls are written to metadata.
    pub pull_times_flush: Duration,
    /// Integrity scrub rate; 0: no scrub.
    pub scrub_bytes_per_sec: u64,
    /// From the end of one scrub pass to the start of the next.
    pub scrub_interval: Duration,
    /// Largest blob an upload may grow to.
    pub max_blob_bytes: u64,
    /// Connections served at once; the accept loop stops accepting at this many.
    pub max_connections: usize,
    /// File descriptors the process needs besides its connections (see [`Config::fd_warning`]).
    pub reserved_fds: u64,
    /// Bound on receiving a request's headers, and on an idle keep-alive connection.
    pub header_read_timeout: Duration,
    /// Bound on a request body's silence between two chunks.
    pub body_idle_timeout: Duration,
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    /// How to reach the object store when `storage` is S3.
    pub s3: S3Settings,
    /// Bounds on every call to the object store and the metadata store.
    pub backend_timeouts: BackendTimeouts,
    /// Access log, metrics, and where /metrics is served.
    pub observe: ObserveOptions,
}

/// The access log and metrics switches (see README, "Observability").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObserveOptions {
    /// The OpenTelemetry collector's base URL (no trailing `/`); spans go to `/v1/traces`.
    pub otel_endpoint: Option<String>,
    pub access_log: bool,
    pub metrics: bool,
    /// A second listener serving only /metrics, /healthz and /readyz.
    pub metrics_listen: Option<SocketAddr>,
    /// Whether /metrics on the main listener needs credentials.
    pub metrics_require_auth: bool,
    pub metrics_per_repository: bool,
}

impl Config {
    /// A warning when `max_connections` could run the process out of file descriptors under
    /// the current open-file limit; the server still starts.
    pub fn fd_warning(&self) -> Option<String> {
        let limit = open_file_limit()?;
        let needed = self.max_connections as u64 * FDS_PER_CONNECTION + self.reserved_fds;
        (needed > limit).then(|| {
            format!(
                "max_connections = {} may need {needed} file descriptors but the open-file limit \
                 (ulimit -n) is {limit}; raise the limit or lower max_connections to at most {}",
                self.max_connections,
                limit.saturating_sub(self.reserved_fds) / FDS_PER_CONNECTION
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml: &str) -> RawConfig {
        toml::from_str(toml).unwrap_or_else(|e| panic!("{toml:?}: {e}"))
    }

    #[test]
    fn later_layers_win_and_defaults_fill_the_rest() {
        let file =
            parse("listen = \"127.0.0.1:1\"\nmax_manifest_bytes = 10\nshutdown_grace_secs = 7");
        let env = RawConfig {
            listen: Some("127.0.0.1:2".into()),
            shutdown_grace_secs: Some(0),
            ..RawConfig::default()
        };
        let cfg = file
            .overlay(env)
            .and_then(RawConfig::validate)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.listen.port(), 2);
        assert_eq!(cfg.max_manifest_bytes, 10);
        assert_eq!(cfg.shutdown_grace, Duration::ZERO);
        assert_eq!(cfg.data_dir, PathBuf::from("berth-data"));
        assert_eq!(cfg.header_read_timeout, Duration::from_secs(30));
        assert_eq!(cfg.body_idle_timeout, Duration::from_secs(60));
        assert_eq!(cfg.max_blob_bytes, 64 << 30);
        assert_eq!(cfg.max_buffered_manifest_bytes, 64 << 20);
    }

    #[test]
    fn numbers_out_of_range_are_refused_by_name() {
        let cases = [
            (
                "upload_idle_timeout_secs = 9223372036854775808",
                Some("upload_idle_timeout_secs"),
            ),
            (
                "upload_idle_timeout_secs = 31536001",
                Some("upload_idle_timeout_secs"),
            ),
            ("upload_idle_timeout_secs = 31536000", None),
            (
                "upload_idle_timeout_secs = 0",
                Some("upload_idle_timeout_secs"),
            ),
            (
                "upload_purge_interval_secs = 0",
                Some("upload_purge_interval_secs"),
            ),
            (
                "header_read_timeout_secs = 0",
                Some("header_read_timeout_secs"),
            ),
            (
                "body_idle_timeout_secs = 3601",
                Some("body_idle_timeout_secs"),
            ),
            ("shutdown_grace_secs = 0", None),
            (
                "shutdown_grace_secs = 18446744073709551615",
                Some("shutdown_grace_secs"),
            ),
            (
                "metadata_connect_timeout_secs = 0",
                Some("metadata_connect_timeout_secs"),
            ),
            ("metadata_pool_size = 0", Some("metadata_pool_size")),
            (
                "backend_connect_timeout_secs = 0",
                Some("backend_connect_timeout_secs"),
            ),
            (
                "backend_first_byte_timeout_secs = 0",
                Some("backend_first_byte_timeout_secs"),
            ),
            (
                "backend_operation_timeout_secs = 3601",
                Some("backend_operation_timeout_secs"),
            ),
            ("metrics_listen = \"nonsense\"", Some("metrics_listen")),
            ("otel_endpoint = \"127.0.0.1:4318\"", Some("otel_endpoint")),
            ("otel_endpoint = \"http://\"", Some("otel_endpoint")),
            ("otel_endpoint = \"http://127.0.0.1:4318/\"", None),
            ("otel_endpoint = \"https://collector.example\"", None),
            (
                "metrics = false\nmetrics_listen = \"127.0.0.1:0\"",
                Some("metrics_listen"),
            ),
            ("max_connections = 0", Some("max_connections")),
            ("max_connections = 50", None),
            ("max_blob_bytes = 0", Some("max_blob_bytes")),
            ("max_blob_bytes = 17592186044417", Some("max_blob_bytes")),
            ("max_manifest_bytes = 0", Some("max_manifest_bytes")),
            (
                "max_buffered_manifest_bytes = 1000",
                Some("max_buffered_manifest_bytes"),
            ),
            (
                "s3_max_concurrent_requests = 0",
                Some("s3_max_concurrent_requests"),
            ),
        ];
        for (toml, refused) in cases {
            match (parse(toml).validate(), refused) {
                (Ok(_), None) => {}
                (Ok(_), Some(key)) => panic!("{toml:?} was accepted; {key} should be refused"),
                (Err(e), None) => panic!("{toml:?} was refused: {e}"),
                (Err(e), Some(key)) => {
                    assert!(
                        e.to_string().contains(key),
                        "{toml:?}: {e} does not name {key}"
                    )
                }
            }
        }
    }

    #[test]
    fn default_max_connections_leaves_room_under_the_open_file_limit() {
        assert_eq!(default_max_connections(None, 128), 4096);
        assert_eq!(default_max_connections(Some(1_048_576), 128), 4096);
        assert_eq!(default_max_connections(Some(1024), 128), 448);
        assert_eq!(default_max_connections(Some(100), 128), 16);
    }

    #[test]
    fn backend_urls() {
        let d = Path::new("/d");
        let cases = [
            (None, Some(StorageConfig::Filesystem("/d".into()))),
            (
                Some("file:///x/y"),
                Some(StorageConfig::Filesystem("/x/y".into())),
            ),
            (
                Some("s3://b/p/q/"),
                Some(StorageConfig::S3 {
                    bucket: "b".into(),
                    prefix: "p/q".into(),
                }),
            ),
            (
                Some("s3://b"),
                Some(StorageConfig::S3 {
                    bucket: "b".into(),
                    prefix: "".into(),
                }),
            ),
            (Some("s3:///p"), None),
            (Some("gs://b"), None),
        ];
        for (url, expected) in cases {
            assert_eq!(StorageConfig::parse(url, d).ok(), expected, "{url:?}");
        }
        let pg = "postgres://u:p@127.0.0.1:5432/berth";
        assert_eq!(
            MetadataConfig::parse(Some(pg), d).ok(),
            Some(MetadataConfig::Postgres(pg.into()))
        );
        assert_eq!(
            MetadataConfig::parse(None, d).ok(),
            Some(MetadataConfig::Sqlite("/d/metadata.db".into()))
        );
        assert!(MetadataConfig::parse(Some("mysql://x"), d).is_err());
    }

    #[test]
    fn tls_keys_come_as_a_pair_and_the_client_ca_needs_them() {
        let cases = [
            ("", Ok(None)),
            (
                "tls_cert = \"c.pem\"\ntls_key = \"k.pem\"",
                Ok(Some(("c.pem", "k.pem", None))),
            ),
            (
                "tls_cert = \"c.pem\"\ntls_key = \"k.pem\"\ntls_client_ca = \"ca.pem\"",
                Ok(Some(("c.pem", "k.pem", Some("ca.pem")))),
            ),
            ("tls_cert = \"c.pem\"", Err("tls_key")),
            ("tls_key = \"k.pem\"", Err("tls_cert")),
            (
                "tls_key = \"k.pem\"\ntls_client_ca = \"ca.pem\"",
                Err("tls_cert"),
            ),
            ("tls_client_ca = \"ca.pem\"", Err("tls_client_ca")),
        ];
        for (toml, expected) in cases {
            match (parse(toml).validate(), expected) {
                (Ok(cfg), Ok(want)) => {
                    let want = want.map(|(cert, key, ca): (&str, &str, Option<&str>)| TlsConfig {
                        cert: cert.into(),
                        key: key.into(),
                        client_ca: ca.map(PathBuf::from),
                    });
                    assert_eq!(cfg.tls, want, "{toml:?}");
                }
                (Ok(_), Err(key)) => panic!("{toml:?} was accepted; it should name {key}"),
                (Err(e), Ok(_)) => panic!("{toml:?} was refused: {e}"),
                (Err(e), Err(key)) => {
                    assert!(
                        e.to_string().contains(key),
                        "{toml:?}: {e} does not name {key}"
                    )
                }
            }
        }
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        assert!(toml::from_str::<RawConfig>("lisen = \"x\"").is_err());
        let bad = RawConfig {
            listen: Some("nonsense".into()),
            ..RawConfig::default()
        };
        assert!(bad.validate().is_err());
    }

    /// Each key's environment variable and flag follow from its name, so the README states the
    /// rule once instead of listing them.
    #[test]
    fn every_key_is_an_env_var_and_a_flag_named_after_it() {
        let command = <RawConfig as clap::Args>::augment_args(clap::Command::new("berth"));
        let mut seen = Vec::new();
        for arg in command.get_arguments() {
            let key = arg.get_id().as_str().to_string();
            let long = arg.get_long().unwrap_or_default();
            let env = arg.get_env().and_then(|e| e.to_str()).unwrap_or_default();
            assert_eq!(long, key.replace('_', "-"), "flag of {key}");
            assert_eq!(env, format!("BERTH_{}", key.to_uppercase()), "env of {key}");
            seen.push(key);
        }
        let mut keys = RawConfig::keys();
        seen.sort();
        keys.sort();
        assert_eq!(
            seen, keys,
            "every config key has a flag, and nothing else does"
        );
    }

    /// The README's configuration table lists exactly the keys the code knows.
    #[test]
    fn readme_table_lists_exactly_the_config_keys() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md");
        let readme = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let section = readme
            .split("### Configuration")
            .nth(1)
            .unwrap_or_else(|| panic!("README.md has no ### Configuration section"));
        let mut documented: Vec<String> = section
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .skip(2) // header and separator
            .filter_map(|row| row.split('|').nth(1))
            .map(|cell| cell.trim().trim_matches('`').to_string())
            .collect();
        let mut keys = RawConfig::keys();
        documented.sort();
        keys.sort();
        assert_eq!(
            documented, keys,
            "README.md's configuration table vs RawConfig"
        );
    }
}
