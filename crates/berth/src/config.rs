//! Configuration: defaults, then a TOML file, then environment variables, then flags, merged by
//! `main` into [`RawConfig`] and validated into [`Config`], the only type the server reads.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::storage::s3::S3Settings;

/// Every key the config file accepts. Each is also an environment variable (`BERTH_` + the key
/// in upper case) and, for the common ones, a flag of `berth serve`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Address to listen on. Default `127.0.0.1:5000`.
    pub listen: Option<String>,
    /// Directory for blobs, uploads and the metadata database. Default `./berth-data`.
    pub data_dir: Option<PathBuf>,
    /// Where blobs live: `fs` (default: `<data_dir>`), `file:///PATH`, or `s3://BUCKET/PREFIX`
    /// (endpoint, region and keys from the standard AWS settings or the `s3_*` keys).
    pub storage: Option<String>,
    /// Where metadata lives: `sqlite` (default: `<data_dir>/metadata.db`), `sqlite:///PATH`,
    /// or `postgres://USER:PASSWORD@HOST:PORT/DB`.
    pub metadata: Option<String>,
    /// Most connections one node opens to PostgreSQL. Default 16.
    pub metadata_pool_size: Option<usize>,
    /// Bound on connecting to PostgreSQL and on waiting for a free pooled connection; past it a
    /// request fails with 503. Default 5.
    pub metadata_connect_timeout_secs: Option<u64>,
    /// An upload untouched for this long is cancelled and its bytes deleted. Default 86400.
    pub upload_idle_timeout_secs: Option<u64>,
    /// How often expired uploads are looked for. Default 600.
    pub upload_purge_interval_secs: Option<u64>,
    /// Largest manifest accepted, in bytes. Default 4194304 (4 MiB).
    pub max_manifest_bytes: Option<usize>,
    /// On SIGTERM/SIGINT, in-flight requests get this long to finish. Default 30.
    pub shutdown_grace_secs: Option<u64>,
    /// `text` (default) or `json`.
    pub log_format: Option<String>,
    /// S3 endpoint URL, e.g. `http://127.0.0.1:3900`. Default: `AWS_ENDPOINT_URL`, else AWS.
    pub s3_endpoint: Option<String>,
    /// Default: `AWS_REGION`, else `us-east-1`.
    pub s3_region: Option<String>,
    /// Default: `AWS_ACCESS_KEY_ID`.
    pub s3_access_key_id: Option<String>,
    /// Default: `AWS_SECRET_ACCESS_KEY`.
    pub s3_secret_access_key: Option<String>,
    /// A file holding the secret access key (trailing whitespace ignored).
    pub s3_secret_access_key_file: Option<PathBuf>,
    /// Path-style URLs (`ENDPOINT/BUCKET/KEY`), as self-hosted stores expect. Default true.
    pub s3_path_style: Option<bool>,
    /// Requests to the object store in flight at once, per process. Default 64.
    pub s3_max_concurrent_requests: Option<usize>,
    /// Answer blob GETs with a 307 to a presigned URL. Default false.
    pub s3_redirect_blob_gets: Option<bool>,
}

impl RawConfig {
    pub fn from_toml_file(path: &Path) -> anyhow::Result<RawConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("parsing config {}: {e}", path.display()))
    }

    /// Fields set in `over` replace those in `self`.
    pub fn overlay(self, over: RawConfig) -> RawConfig {
        RawConfig {
            listen: over.listen.or(self.listen),
            data_dir: over.data_dir.or(self.data_dir),
            storage: over.storage.or(self.storage),
            metadata: over.metadata.or(self.metadata),
            metadata_pool_size: over.metadata_pool_size.or(self.metadata_pool_size),
            metadata_connect_timeout_secs: over
                .metadata_connect_timeout_secs
                .or(self.metadata_connect_timeout_secs),
            upload_idle_timeout_secs: over
                .upload_idle_timeout_secs
                .or(self.upload_idle_timeout_secs),
            upload_purge_interval_secs: over
                .upload_purge_interval_secs
                .or(self.upload_purge_interval_secs),
            max_manifest_bytes: over.max_manifest_bytes.or(self.max_manifest_bytes),
            shutdown_grace_secs: over.shutdown_grace_secs.or(self.shutdown_grace_secs),
            log_format: over.log_format.or(self.log_format),
            s3_endpoint: over.s3_endpoint.or(self.s3_endpoint),
            s3_region: over.s3_region.or(self.s3_region),
            s3_access_key_id: over.s3_access_key_id.or(self.s3_access_key_id),
            s3_secret_access_key: over.s3_secret_access_key.or(self.s3_secret_access_key),
            s3_secret_access_key_file: over
                .s3_secret_access_key_file
                .or(self.s3_secret_access_key_file),
            s3_path_style: over.s3_path_style.or(self.s3_path_style),
            s3_max_concurrent_requests: over
                .s3_max_concurrent_requests
                .or(self.s3_max_concurrent_requests),
            s3_redirect_blob_gets: over.s3_redirect_blob_gets.or(self.s3_redirect_blob_gets),
        }
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
        let max_manifest_bytes = self.max_manifest_bytes.unwrap_or(4 * 1024 * 1024);
        anyhow::ensure!(
            max_manifest_bytes > 0,
            "max_manifest_bytes must be positive"
        );
        let purge = self.upload_purge_interval_secs.unwrap_or(600);
        anyhow::ensure!(purge > 0, "upload_purge_interval_secs must be positive");
        let data_dir = self.data_dir.unwrap_or_else(|| PathBuf::from("berth-data"));
        let storage = StorageConfig::parse(self.storage.as_deref(), &data_dir)?;
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
            max_concurrent_requests: self.s3_max_concurrent_requests.unwrap_or(64),
            redirect_blob_gets: self.s3_redirect_blob_gets.unwrap_or(false),
        };
        anyhow::ensure!(
            s3.max_concurrent_requests > 0,
            "s3_max_concurrent_requests must be positive"
        );
        let metadata = MetadataConfig::parse(self.metadata.as_deref(), &data_dir)?;
        let metadata_pool_size = self.metadata_pool_size.unwrap_or(16);
        anyhow::ensure!(
            metadata_pool_size > 0,
            "metadata_pool_size must be positive"
        );
        let connect_timeout = self.metadata_connect_timeout_secs.unwrap_or(5);
        anyhow::ensure!(
            connect_timeout > 0,
            "metadata_connect_timeout_secs must be positive"
        );
        Ok(Config {
            listen,
            storage,
            metadata,
            metadata_pool_size,
            metadata_connect_timeout: Duration::from_secs(connect_timeout),
            data_dir,
            upload_idle_timeout: Duration::from_secs(
                self.upload_idle_timeout_secs.unwrap_or(86_400),
            ),
            upload_purge_interval: Duration::from_secs(purge),
            max_manifest_bytes,
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs.unwrap_or(30)),
            log_format,
            s3,
        })
    }
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

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub storage: StorageConfig,
    pub metadata: MetadataConfig,
    pub metadata_pool_size: usize,
    pub metadata_connect_timeout: Duration,
    pub upload_idle_timeout: Duration,
    pub upload_purge_interval: Duration,
    pub max_manifest_bytes: usize,
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    /// How to reach the object store when `storage` is S3.
    pub s3: S3Settings,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_layers_win_and_defaults_fill_the_rest() {
        let file: RawConfig = toml::from_str("listen = \"127.0.0.1:1\"\nmax_manifest_bytes = 10")
            .unwrap_or_else(|e| panic!("{e}"));
        let env = RawConfig {
            listen: Some("127.0.0.1:2".into()),
            ..RawConfig::default()
        };
        let cfg = file
            .overlay(env)
            .validate()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.listen.port(), 2);
        assert_eq!(cfg.max_manifest_bytes, 10);
        assert_eq!(cfg.data_dir, PathBuf::from("berth-data"));
        assert_eq!(cfg.shutdown_grace, Duration::from_secs(30));
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
    fn rejects_unknown_keys_and_bad_values() {
        assert!(toml::from_str::<RawConfig>("lisen = \"x\"").is_err());
        let bad = RawConfig {
            listen: Some("nonsense".into()),
            ..RawConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}
