//! The `berth` command line. `anyhow` lives here and nowhere below.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use berth::config::{Config, LogFormat, RawConfig};
use berth::server::{self, ServeOptions};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "berth",
    version,
    about = "Berth: an OCI container image registry"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the registry. With no options it serves 127.0.0.1:5000 and keeps blobs and metadata
    /// under ./berth-data. Settings come from, in rising precedence: a TOML file (--config),
    /// environment variables (BERTH_<KEY>), and these flags.
    Serve(ServeArgs),
    /// Apply pending metadata schema migrations, then exit. `serve` applies them too; this is
    /// for upgrading the database before starting new nodes.
    Migrate(MigrateArgs),
    /// Copy a whole registry from one configuration to another (for example from the embedded
    /// defaults to PostgreSQL + S3), verifying every blob's digest on the way. Re-running it
    /// skips what the target already holds, so an interrupted copy resumes.
    Copy(CopyArgs),
}

#[derive(clap::Args)]
struct CopyArgs {
    /// TOML config of the source registry (its data_dir, storage, metadata and s3_* keys).
    #[arg(long)]
    from: PathBuf,
    /// TOML config of the target registry.
    #[arg(long)]
    to: PathBuf,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML config file; every key is documented in README.md.
    #[arg(long, env = "BERTH_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1:5000; port 0 picks a free one).
    #[arg(long, env = "BERTH_LISTEN")]
    listen: Option<String>,
    /// Directory for blobs, uploads and the metadata database (default ./berth-data).
    #[arg(long, env = "BERTH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Blob storage: fs (default, under --data-dir), file:///PATH, or s3://BUCKET/PREFIX.
    #[arg(long, env = "BERTH_STORAGE")]
    storage: Option<String>,
    /// Metadata store: sqlite (default, under --data-dir), sqlite:///PATH, or postgres://...
    #[arg(long, env = "BERTH_METADATA")]
    metadata: Option<String>,
}

#[derive(clap::Args)]
struct MigrateArgs {
    /// TOML config file; every key is documented in README.md.
    #[arg(long, env = "BERTH_CONFIG")]
    config: Option<PathBuf>,
    /// Directory holding the default SQLite database (default ./berth-data).
    #[arg(long, env = "BERTH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Metadata store: sqlite (default, under --data-dir), sqlite:///PATH, or postgres://...
    #[arg(long, env = "BERTH_METADATA")]
    metadata: Option<String>,
}

fn env_number<T: std::str::FromStr>(key: &str) -> anyhow::Result<Option<T>> {
    match std::env::var(key) {
        Ok(v) => v
            .parse()
            .map(Some)
            .map_err(|_| anyhow::anyhow!("{key}={v:?} is not a valid number")),
        Err(_) => Ok(None),
    }
}

fn env_bool(key: &str) -> anyhow::Result<Option<bool>> {
    match std::env::var(key).as_deref() {
        Ok("true" | "1") => Ok(Some(true)),
        Ok("false" | "0") => Ok(Some(false)),
        Ok(v) => anyhow::bail!("{key}={v:?} is not true or false"),
        Err(_) => Ok(None),
    }
}

/// The keys without a flag, from the environment.
fn env_config() -> anyhow::Result<RawConfig> {
    Ok(RawConfig {
        upload_idle_timeout_secs: env_number("BERTH_UPLOAD_IDLE_TIMEOUT_SECS")?,
        upload_purge_interval_secs: env_number("BERTH_UPLOAD_PURGE_INTERVAL_SECS")?,
        max_manifest_bytes: env_number("BERTH_MAX_MANIFEST_BYTES")?,
        metadata_pool_size: env_number("BERTH_METADATA_POOL_SIZE")?,
        metadata_connect_timeout_secs: env_number("BERTH_METADATA_CONNECT_TIMEOUT_SECS")?,
        shutdown_grace_secs: env_number("BERTH_SHUTDOWN_GRACE_SECS")?,
        log_format: std::env::var("BERTH_LOG_FORMAT").ok(),
        s3_endpoint: std::env::var("BERTH_S3_ENDPOINT").ok(),
        s3_region: std::env::var("BERTH_S3_REGION").ok(),
        s3_access_key_id: std::env::var("BERTH_S3_ACCESS_KEY_ID").ok(),
        s3_secret_access_key: std::env::var("BERTH_S3_SECRET_ACCESS_KEY").ok(),
        s3_secret_access_key_file: std::env::var_os("BERTH_S3_SECRET_ACCESS_KEY_FILE")
            .map(PathBuf::from),
        s3_path_style: env_bool("BERTH_S3_PATH_STYLE")?,
        s3_max_concurrent_requests: env_number("BERTH_S3_MAX_CONCURRENT_REQUESTS")?,
        s3_redirect_blob_gets: env_bool("BERTH_S3_REDIRECT_BLOB_GETS")?,
        ..RawConfig::default()
    })
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process still stops on SIGTERM, just not gracefully.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// The config file, then the environment, then `flags`, validated.
fn load_config(file: Option<&Path>, flags: RawConfig) -> anyhow::Result<Config> {
    let file = match file {
        Some(path) => RawConfig::from_toml_file(path)?,
        None => RawConfig::default(),
    };
    file.overlay(env_config()?).overlay(flags).validate()
}

async fn copy(args: CopyArgs) -> anyhow::Result<()> {
    let from = RawConfig::from_toml_file(&args.from)?.validate()?;
    let to = RawConfig::from_toml_file(&args.to)?.validate()?;
    init_logging(to.log_format);
    let source = server::open_registry(&from)
        .await
        .context("opening the source")?;
    let target = server::open_registry(&to)
        .await
        .context("opening the target")?;
    let report = source
        .copy_into(
            &target,
            |repo| tracing::info!(repository = %repo, "copying"),
        )
        .await
        .context("copy stopped; run it again to resume")?;
    #[allow(clippy::print_stdout)]
    {
        println!("repositories: {}", report.repositories);
        println!(
            "blobs copied: {} ({} bytes)",
            report.blobs_copied, report.blob_bytes_copied
        );
        println!("blobs already there: {}", report.blobs_skipped);
        println!("manifests: {}", report.manifests);
        println!("tags: {}", report.tags);
    }
    Ok(())
}

async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let flags = RawConfig {
        data_dir: args.data_dir,
        metadata: args.metadata,
        ..RawConfig::default()
    };
    let config = load_config(args.config.as_deref(), flags)?;
    init_logging(config.log_format);
    server::open_metadata(&config).await?;
    tracing::info!("metadata schema is up to date");
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let flags = RawConfig {
        listen: args.listen,
        data_dir: args.data_dir,
        storage: args.storage,
        metadata: args.metadata,
        ..RawConfig::default()
    };
    let config = load_config(args.config.as_deref(), flags)?;
    init_logging(config.log_format);

    let registry = server::open_registry(&config).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    // The one line on stdout: scripts and tests read the bound address from it.
    #[allow(clippy::print_stdout)]
    {
        println!("berth listening on http://{addr}");
    }
    std::io::stdout().flush()?;
    tracing::info!(listen = %addr, data_dir = %config.data_dir.display(), "serving");
    server::run(
        listener,
        registry,
        ServeOptions {
            shutdown_grace: config.shutdown_grace,
            upload_purge_interval: config.upload_purge_interval,
        },
        shutdown_signal(),
    )
    .await?;
    tracing::info!("stopped");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Migrate(args) => runtime.block_on(migrate(args)),
        Command::Copy(args) => runtime.block_on(copy(args)),
    }
}
