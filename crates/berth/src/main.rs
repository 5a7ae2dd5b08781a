//! The `berth` command line. `anyhow` lives here and nowhere below.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

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
    Serve(ConfigArgs),
    /// Apply pending metadata schema migrations, then exit. `serve` applies them too; this is
    /// for upgrading the database before starting new nodes.
    Migrate(ConfigArgs),
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

/// Where settings come from: a TOML file, then `BERTH_*` environment variables, then flags.
#[derive(clap::Args)]
struct ConfigArgs {
    /// TOML config file; every key is documented in README.md.
    #[arg(long, env = "BERTH_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Every config key, as an environment variable and a flag.
    #[command(
        flatten,
        next_help_heading = "Settings (each also BERTH_<KEY> in the environment)"
    )]
    settings: RawConfig,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal, not in files and journals.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
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

/// The config file, then the environment and flags (clap has already laid flags over the
/// environment), validated.
fn load_config(args: ConfigArgs) -> anyhow::Result<Config> {
    let file = match args.config.as_deref() {
        Some(path) => RawConfig::from_toml_file(path)?,
        None => RawConfig::default(),
    };
    file.overlay(args.settings)?.validate()
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

async fn migrate(args: ConfigArgs) -> anyhow::Result<()> {
    let config = load_config(args)?;
    init_logging(config.log_format);
    server::open_metadata(&config).await?;
    tracing::info!("metadata schema is up to date");
    Ok(())
}

async fn serve(args: ConfigArgs) -> anyhow::Result<()> {
    let config = load_config(args)?;
    init_logging(config.log_format);
    if let Some(warning) = config.fd_warning() {
        tracing::warn!("{warning}");
    }

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
    tracing::info!(
        listen = %addr,
        data_dir = %config.data_dir.display(),
        max_connections = config.max_connections,
        "serving"
    );
    server::run(
        listener,
        registry,
        ServeOptions::from_config(&config),
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
