//! The `berth` command line. `anyhow` lives here and nowhere below.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Context;
use berth::auth::manage::{self, By};
use berth::auth::namespace_rules;
use berth::auth::rights::{Grant, Role};
use berth::config::{Config, LogFormat, RawConfig};
use berth::logging::WithRequest;
use berth::server::{self, ServeOptions};
use berth::service::{Registry, RequestContext};
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
    /// Check every stored blob against its digest and every metadata reference against its
    /// rows, while `serve` runs or not. Bad blobs are quarantined as the scrub does it (not
    /// served until pushed again). Prints one line per problem, then totals; exits 1 if any.
    Fsck(FsckArgs),
    /// Copy a whole registry from one configuration to another (for example from the embedded
    /// defaults to PostgreSQL + S3), verifying every blob's digest on the way. Re-running it
    /// skips what the target already holds, so an interrupted copy resumes.
    Copy(CopyArgs),
    /// Users: people who log in with a password.
    #[command(subcommand)]
    User(UserCommand),
    /// Namespaces (a repository name's first segment), their members and roles.
    #[command(subcommand)]
    Namespace(NamespaceCommand),
    /// Robot accounts: for CI and deployments, with grants in one namespace.
    #[command(subcommand)]
    Robot(RobotCommand),
    /// Secrets usable as passwords: personal access tokens of users, secrets of robots.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The keys registry tokens are signed with.
    #[command(subcommand)]
    Key(KeyCommand),
    /// The event log: who pushed, deleted, logged in, changed rights.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Trust rules: CI jobs (GitHub Actions, GitLab CI, Kubernetes service accounts) log in
    /// with their own OIDC identity token and act as a robot, with no stored secret.
    #[command(subcommand)]
    Trust(TrustCommand),
    /// Collect garbage now, while `serve` runs: untagged manifests past their age (if
    /// configured), trash past its period, then blobs nothing references after the grace
    /// period. Prints what went (with --dry-run: what would go). One collector at a time.
    Gc {
        /// Count what the current state makes garbage; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Deleted manifests and tags, kept for trash_retention_secs: list and restore them.
    #[command(subcommand)]
    Trash(TrashCommand),
    /// Retention policies: what GC keeps of the repositories a pattern matches.
    #[command(subcommand)]
    Retention(RetentionCommand),
    /// Tag immutability rules: tags of a namespace matching a pattern can be pushed once and
    /// never moved or deleted.
    #[command(subcommand)]
    Immutable(ImmutableCommand),
    /// Storage quotas per namespace, and their accounting.
    #[command(subcommand)]
    Quota(QuotaCommand),
}

#[derive(Subcommand)]
enum RetentionCommand {
    /// Add a policy. Of the tags of each repository PATTERN matches, GC keeps those a keep
    /// rule holds and moves the rest to the trash (their manifest too when nothing else holds
    /// it). With several policies on a repository a tag goes only if all of them let it go.
    Add {
        /// Repositories: a glob (`*` any run of characters, `/` included), e.g. 'team/*'.
        pattern: String,
        /// Keep the N most recently pushed tags.
        #[arg(long)]
        keep_last: Option<u64>,
        /// Keep tags matching this glob (repeatable), e.g. 'v*'.
        #[arg(long = "keep-tag")]
        keep_tags: Vec<String>,
        /// Keep tags pushed within this many days.
        #[arg(long)]
        keep_days: Option<u64>,
        /// Keep tags whose image was pulled (by any tag or by digest) within this many days.
        #[arg(long)]
        keep_pulled_days: Option<u64>,
        /// Delete untagged manifests neither pushed nor pulled for this many days.
        #[arg(long)]
        untagged_days: Option<u64>,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// List policies.
    List {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Remove a policy.
    Rm {
        id: i64,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Exactly what the policies would delete now (what the next GC run does).
    Plan {
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Subcommand)]
enum ImmutableCommand {
    /// Protect tags of NAMESPACE matching PATTERN (`*` any run of characters, `?` one; tags
    /// starting with `sha256-` only by a pattern starting with `sha256-`).
    Add {
        namespace: String,
        pattern: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// List a namespace's rules.
    List {
        namespace: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Remove a rule.
    Rm {
        namespace: String,
        pattern: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Subcommand)]
enum TrashCommand {
    /// List trash entries, newest first.
    List {
        #[command(flatten)]
        filter: TrashFilterArgs,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Restore entries by id, or every entry the filters match (--all), byte for byte with
    /// their tags and the referrers that followed them. A tag that now points elsewhere is
    /// left as it is.
    Restore {
        ids: Vec<i64>,
        /// Restore every entry the filters match.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        filter: TrashFilterArgs,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(clap::Args)]
struct TrashFilterArgs {
    /// Only this repository.
    #[arg(long)]
    repository: Option<String>,
    /// Only repositories of this namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Only entries deleted since (2026-12-01, 2026-12-01T07:00:00Z, or seconds).
    #[arg(long)]
    since: Option<String>,
    /// Only entries deleted for this reason: deleted, retention, untagged.
    #[arg(long)]
    reason: Option<String>,
}

impl TrashFilterArgs {
    fn filter(self) -> anyhow::Result<berth::metadata::trash::TrashFilter> {
        Ok(berth::metadata::trash::TrashFilter {
            repository: self.repository,
            namespace: self.namespace,
            since: self
                .since
                .map(|s| berth::time::parse(&s).map_err(anyhow::Error::msg))
                .transpose()?,
            reason: self.reason,
            ..Default::default()
        })
    }
}

#[derive(Subcommand)]
enum QuotaCommand {
    /// Limit a namespace to BYTES of storage.
    Set {
        namespace: String,
        bytes: u64,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Show a namespace's usage and limit.
    Get {
        namespace: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Every namespace's usage and limit.
    List {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Remove a namespace's limit (usage is still counted).
    Rm {
        namespace: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Recompute every namespace's usage from its manifests and compare it with the stored
    /// usage; exits non-zero if any differs.
    Reconcile {
        /// Store the recomputed usage (run it while no pushes or deletes are in flight).
        #[arg(long)]
        fix: bool,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Subcommand)]
enum TrustCommand {
    /// Let tokens of ISSUER minted for AUDIENCE whose claims satisfy CONDITIONS act as ROBOT.
    /// The job sends its token as the password (user name: the robot's) or by OAuth2 token
    /// exchange.
    Add {
        name: String,
        /// The tokens' `iss`, exactly, e.g. https://token.actions.githubusercontent.com
        #[arg(long)]
        issuer: String,
        /// The `aud` the job asks its token for, e.g. the registry's URL.
        #[arg(long)]
        audience: String,
        /// The issuer's keys: a JWKS URL (https://.../.well-known/jwks) or file.
        #[arg(long)]
        jwks: String,
        /// Claims the token must carry, e.g.
        /// 'repository == "org/app" && ref == "refs/heads/main"' (also !=, =~ "glob*", ||, ( )).
        #[arg(long)]
        conditions: String,
        /// The robot whose rights the job gets, NAMESPACE+NAME.
        #[arg(long)]
        robot: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// List trust rules.
    List {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Remove a trust rule, at once on every node (tokens obtained through it stop working).
    Rm {
        name: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain from the first entry to the last; names the first entry that was
    /// edited, deleted, inserted or moved, and exits 1 if there is one.
    Verify {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Remove entries older than a time, after recording a checkpoint (the last removed
    /// entry's hash, signed) from which `verify` still checks the rest.
    Prune {
        /// Entries before this time go (2026-12-01, 2026-12-01T07:00:00Z, or seconds).
        #[arg(long)]
        before: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Write events as JSON lines, oldest first.
    Export {
        /// From this time (2026-12-01, 2026-12-01T07:00:00Z, or seconds since the epoch).
        #[arg(long)]
        since: String,
        /// Up to (not including) this time.
        #[arg(long)]
        until: Option<String>,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Add a user; the password is read from the first line of stdin.
    Add {
        name: String,
        /// A system administrator may do everything.
        #[arg(long)]
        admin: bool,
        /// Read the password from stdin (required: passwords never go on a command line).
        #[arg(long, required = true)]
        password_stdin: bool,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Set a user's password, read from the first line of stdin.
    Passwd {
        name: String,
        #[arg(long, required = true)]
        password_stdin: bool,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Remove a user or robot, its memberships and secrets (at once, on every node).
    Rm {
        name: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// List accounts.
    List {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Add the users of an htpasswd file (bcrypt entries, `htpasswd -B`); existing names are
    /// skipped. Their hashes are replaced by argon2id at each user's next login.
    ImportHtpasswd {
        file: PathBuf,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Subcommand)]
enum NamespaceCommand {
    /// Create a namespace.
    Add {
        name: String,
        /// Anyone, even without credentials, may pull from it.
        #[arg(long)]
        public: bool,
        /// Make this account its owner.
        #[arg(long)]
        owner: Option<String>,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Delete a namespace and its memberships (its repositories stay).
    Rm {
        name: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// List namespaces.
    List {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Make a namespace public or private.
    Public {
        name: String,
        #[arg(action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
        public: bool,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Give an account a role: reader, writer, maintainer or owner.
    Grant {
        namespace: String,
        account: String,
        role: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Take an account's role away.
    Revoke {
        namespace: String,
        account: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// List a namespace's members.
    Members {
        namespace: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Subcommand)]
enum RobotCommand {
    /// Create a robot NAMESPACE+NAME and print its secret (shown once).
    Add {
        namespace: String,
        name: String,
        /// What it may do: PATTERN:ACTIONS, e.g. team/*:pull or team/app:pull,push,delete
        /// (repeatable; patterns stay inside the namespace).
        #[arg(long = "grant", required = true)]
        grants: Vec<String>,
        /// The robot (and its secret) stop working after this many days.
        #[arg(long)]
        expires_in_days: Option<u64>,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// List robots, of one namespace if given.
    List {
        namespace: Option<String>,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a secret for an account and print it (shown once): a personal access token for
    /// a user, another secret for a robot.
    Add {
        account: String,
        #[arg(long, default_value = "")]
        description: String,
        /// Limit a personal token to PATTERN:ACTIONS (repeatable); none: all the user's rights.
        #[arg(long = "grant")]
        grants: Vec<String>,
        #[arg(long)]
        expires_in_days: Option<u64>,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// List an account's secrets (ids, never the secrets).
    List {
        account: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Revoke a secret by id, at once on every node.
    Revoke {
        id: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Start a new signing key. Tokens signed by the previous key stay valid until they
    /// expire; every node picks the new key up within a second.
    Rotate {
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(clap::Args)]
struct FsckArgs {
    /// Check only that each blob's bytes exist with the recorded size, without re-hashing.
    #[arg(long)]
    no_hash: bool,
    #[command(flatten)]
    config: ConfigArgs,
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
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(&berth::logging::STDERR);
    berth::logging::STDERR.start_flusher();
    berth::logging::set_access_json(format == LogFormat::Json);
    let lines = tracing_subscriber::fmt::format();
    match format {
        LogFormat::Json => builder
            .json()
            .event_format(WithRequest {
                inner: lines.json(),
                json: true,
            })
            .init(),
        LogFormat::Text => builder
            .event_format(WithRequest {
                inner: lines.with_ansi(ansi),
                json: false,
            })
            .init(),
    }
}

/// [`init_logging`], plus the layer that hands berth's spans to the OpenTelemetry exporter.
/// The log's `RUST_LOG` filter then applies to the log alone, so that it cannot turn export
/// off; the exporter's layer has its own (see `berth::otel::Exporter::layer`).
#[cfg(feature = "otel")]
fn init_logging_exporting(format: LogFormat, exporter: &berth::otel::Exporter) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal();
    let log = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(&berth::logging::STDERR);
    let lines = tracing_subscriber::fmt::format();
    let log = match format {
        LogFormat::Json => log
            .json()
            .event_format(WithRequest {
                inner: lines.json(),
                json: true,
            })
            .with_filter(filter)
            .boxed(),
        LogFormat::Text => log
            .event_format(WithRequest {
                inner: lines.with_ansi(ansi),
                json: false,
            })
            .with_filter(filter)
            .boxed(),
    };
    berth::logging::STDERR.start_flusher();
    berth::logging::set_access_json(format == LogFormat::Json);
    tracing_subscriber::registry()
        .with(log)
        .with(exporter.layer())
        .init();
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
    server::open_metadata(&config, false).await?;
    tracing::info!("metadata schema is up to date");
    Ok(())
}

#[allow(clippy::print_stdout)]
async fn fsck(args: FsckArgs) -> anyhow::Result<()> {
    let config = load_config(args.config)?;
    init_logging(config.log_format);
    let registry = server::open_registry(&config).await?;
    let report = registry
        .fsck(!args.no_hash)
        .await
        .context("checking the registry")?;
    for p in &report.problems {
        let affected = if p.affected.is_empty() {
            "no manifest references it".to_string()
        } else {
            format!("needed by {}", p.affected.join(", "))
        };
        println!("{}: {} ({}); {affected}", p.kind, p.digest, p.detail);
    }
    println!(
        "checked {} blobs ({} bytes{}): {} problems, {} blobs newly quarantined, {} released",
        report.blobs,
        report.bytes,
        if args.no_hash { ", not re-hashed" } else { "" },
        report.problems.len(),
        report.quarantined,
        report.released
    );
    if !report.problems.is_empty() {
        anyhow::bail!("fsck found {} problems", report.problems.len());
    }
    Ok(())
}

async fn serve(args: ConfigArgs) -> anyhow::Result<()> {
    let config = load_config(args)?;
    #[cfg(not(feature = "otel"))]
    {
        // Ignoring it would leave the operator looking for traces that never come.
        anyhow::ensure!(
            config.observe.otel_endpoint.is_none(),
            "otel_endpoint is set, but this berth was built without the `otel` feature; \
             build it with `cargo build --release --features otel`, or unset otel_endpoint"
        );
        init_logging(config.log_format);
    }
    #[cfg(feature = "otel")]
    let exporter = match config.observe.otel_endpoint.as_deref() {
        Some(endpoint) => {
            let runtime = tokio::runtime::Handle::current();
            let exporter = berth::otel::Exporter::start(endpoint, runtime)
                .map_err(anyhow::Error::msg)
                .context("otel_endpoint")?;
            init_logging_exporting(config.log_format, &exporter);
            Some(exporter)
        }
        None => {
            init_logging(config.log_format);
            None
        }
    };
    if let Some(warning) = config.fd_warning() {
        tracing::warn!("{warning}");
    }
    if !config.auth.enabled && !config.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %config.listen,
            "serving WITHOUT ACCESS CONTROL (--allow-anonymous): anyone who reaches this \
             address may push, overwrite and delete anything"
        );
    }
    let options = ServeOptions::from_config(&config)?;
    let scheme = if options.tls.is_some() {
        "https"
    } else {
        "http"
    };

    let registry = server::open_registry(&config).await?;
    berth::webhooks::sync_config(registry.auth().metadata(), &config.webhooks.subscriptions)
        .await
        .context("storing the config file's webhooks")?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let metrics_listener = match config.observe.metrics_listen {
        Some(at) => Some(
            tokio::net::TcpListener::bind(at)
                .await
                .with_context(|| format!("binding metrics_listen {at}"))?,
        ),
        None => None,
    };
    // The lines on stdout, written at once: scripts and tests read the bound addresses.
    let mut lines = format!("berth listening on {scheme}://{addr}\n");
    if let Some(metrics) = &metrics_listener {
        lines.push_str(&format!(
            "berth metrics on http://{}\n",
            metrics.local_addr()?
        ));
    }
    std::io::stdout().lock().write_all(lines.as_bytes())?;
    std::io::stdout().flush()?;
    tracing::info!(
        listen = %addr,
        data_dir = %config.data_dir.display(),
        max_connections = config.max_connections,
        tls = options.tls.is_some(),
        "serving"
    );
    server::run(
        listener,
        metrics_listener,
        registry,
        options,
        shutdown_signal(),
    )
    .await?;
    #[cfg(feature = "otel")]
    if let Some(exporter) = exporter {
        exporter.shutdown().await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// The metadata store a management command works on: the same one `serve` uses.
async fn admin_metadata(config: ConfigArgs) -> anyhow::Result<berth::metadata::Metadata> {
    let config = load_config_for_admin(config)?;
    init_logging(config.log_format);
    server::open_metadata(&config, false).await
}

/// Like [`load_config`], but a management command never serves, so the secure-default check
/// on the listen address does not apply to it.
fn load_config_for_admin(mut args: ConfigArgs) -> anyhow::Result<Config> {
    args.settings.allow_anonymous = Some(true);
    load_config(args)
}

fn read_password() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the password from stdin")?;
    let password = line.trim_end_matches(['\n', '\r']).to_string();
    anyhow::ensure!(!password.is_empty(), "the password on stdin is empty");
    Ok(password)
}

fn expiry(days: Option<u64>) -> anyhow::Result<Option<i64>> {
    Ok(days.map(manage::expiry_in_days).transpose()?)
}

fn grants(texts: &[String]) -> anyhow::Result<Vec<Grant>> {
    texts
        .iter()
        .map(|g| Grant::parse(g).map_err(anyhow::Error::msg))
        .collect()
}

fn when(secs: Option<i64>) -> String {
    secs.map_or_else(|| "-".to_string(), berth::time::rfc3339)
}

#[allow(clippy::print_stdout)]
async fn user(command: UserCommand) -> anyhow::Result<()> {
    match command {
        UserCommand::Add {
            name,
            admin,
            config,
            ..
        } => {
            let password = read_password()?;
            manage::add_user(
                &admin_metadata(config).await?,
                &By::cli(),
                &name,
                &password,
                admin,
            )
            .await?;
            println!(
                "added user {name}{}",
                if admin { " (administrator)" } else { "" }
            );
        }
        UserCommand::Passwd { name, config, .. } => {
            let password = read_password()?;
            manage::set_password(&admin_metadata(config).await?, &By::cli(), &name, &password)
                .await?;
            println!("password of {name} changed");
        }
        UserCommand::Rm { name, config } => {
            manage::remove_account(&admin_metadata(config).await?, &By::cli(), &name).await?;
            println!("removed {name}");
        }
        UserCommand::List { config } => {
            for a in manage::list_accounts(&admin_metadata(config).await?, None).await? {
                let admin = if a.admin { " admin" } else { "" };
                println!(
                    "{}\t{}{admin}\tcreated {}",
                    a.name,
                    a.kind,
                    when(Some(a.created_at))
                );
            }
        }
        UserCommand::ImportHtpasswd { file, config } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let (added, skipped) =
                manage::import_htpasswd(&admin_metadata(config).await?, &By::cli(), &text).await?;
            println!(
                "added {} users, skipped {} that exist",
                added.len(),
                skipped.len()
            );
            for name in skipped {
                println!("skipped {name}");
            }
        }
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
async fn namespace(command: NamespaceCommand) -> anyhow::Result<()> {
    match command {
        NamespaceCommand::Add {
            name,
            public,
            owner,
            config,
        } => {
            let md = admin_metadata(config).await?;
            manage::add_namespace(&md, &By::cli(), &name, public, owner.as_deref()).await?;
            println!("added namespace {name}");
        }
        NamespaceCommand::Rm { name, config } => {
            manage::remove_namespace(&admin_metadata(config).await?, &By::cli(), &name).await?;
            println!("removed namespace {name}");
        }
        NamespaceCommand::List { config } => {
            for ns in manage::list_namespaces(&admin_metadata(config).await?).await? {
                let public = if ns.public { "public" } else { "private" };
                println!("{}\t{public}", ns.name);
            }
        }
        NamespaceCommand::Public {
            name,
            public,
            config,
        } => {
            manage::set_public(&admin_metadata(config).await?, &By::cli(), &name, public).await?;
            println!("{name} is {}", if public { "public" } else { "private" });
        }
        NamespaceCommand::Grant {
            namespace,
            account,
            role,
            config,
        } => {
            let role: Role = role.parse().map_err(anyhow::Error::msg)?;
            manage::set_member(
                &admin_metadata(config).await?,
                &By::cli(),
                &namespace,
                &account,
                role,
            )
            .await?;
            println!("{account} is {role} of {namespace}");
        }
        NamespaceCommand::Revoke {
            namespace,
            account,
            config,
        } => {
            manage::remove_member(
                &admin_metadata(config).await?,
                &By::cli(),
                &namespace,
                &account,
            )
            .await?;
            println!("{account} has no role in {namespace}");
        }
        NamespaceCommand::Members { namespace, config } => {
            for (name, role) in manage::members(&admin_metadata(config).await?, &namespace).await? {
                println!("{name}\t{role}");
            }
        }
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
async fn robot(command: RobotCommand) -> anyhow::Result<()> {
    match command {
        RobotCommand::Add {
            namespace,
            name,
            grants: texts,
            expires_in_days,
            config,
        } => {
            let md = admin_metadata(config).await?;
            let (full, secret) = manage::add_robot(
                &md,
                &By::cli(),
                &namespace,
                &name,
                &grants(&texts)?,
                expiry(expires_in_days)?,
            )
            .await?;
            println!("robot: {full}");
            println!("secret: {secret}");
        }
        RobotCommand::List { namespace, config } => {
            let md = admin_metadata(config).await?;
            for a in manage::list_accounts(&md, namespace.as_deref()).await? {
                if a.kind == "robot" {
                    println!(
                        "{}\t{}\texpires {}",
                        a.name,
                        a.grants.unwrap_or_default(),
                        when(a.expires_at)
                    );
                }
            }
        }
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
async fn token(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Add {
            account,
            description,
            grants: texts,
            expires_in_days,
            config,
        } => {
            let md = admin_metadata(config).await?;
            let limit = grants(&texts)?;
            let secret = manage::add_token(
                &md,
                &By::cli(),
                &account,
                &description,
                (!limit.is_empty()).then_some(limit.as_slice()),
                expiry(expires_in_days)?,
            )
            .await?;
            println!("{secret}");
        }
        TokenCommand::List { account, config } => {
            for c in manage::list_tokens(&admin_metadata(config).await?, &account).await? {
                let state = if c.revoked_at.is_some() {
                    "revoked"
                } else {
                    "live"
                };
                println!(
                    "{}\t{}\t{state}\tcreated {}\texpires {}\tlast used {}\t{}",
                    c.id,
                    c.kind,
                    when(Some(c.created_at)),
                    when(c.expires_at),
                    when(c.last_used_at),
                    c.description
                );
            }
        }
        TokenCommand::Revoke { id, config } => {
            manage::revoke_token(&admin_metadata(config).await?, &By::cli(), &id).await?;
            println!("revoked {id}");
        }
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
async fn key(command: KeyCommand) -> anyhow::Result<()> {
    match command {
        KeyCommand::Rotate { config } => {
            let kid = manage::rotate_key(&admin_metadata(config).await?, &By::cli()).await?;
            println!("new signing key {kid}; the previous one verifies until its tokens expire");
        }
    }
    Ok(())
}

/// Events read at once by `audit verify` and `audit export`.
const AUDIT_PAGE: i64 = 10_000;

#[allow(clippy::print_stdout)]
async fn audit(command: AuditCommand) -> anyhow::Result<()> {
    use berth::metadata::events;
    match command {
        AuditCommand::Verify { config } => {
            let md = admin_metadata(config).await?;
            match berth::audit::verify(&md, AUDIT_PAGE).await? {
                Ok(v) => match v.from_checkpoint {
                    None => println!("ok: {} entries, the chain is intact", v.entries),
                    Some(c) => println!(
                        "ok: {} entries after the checkpoint at entry {} (signed by key {}), the chain is intact",
                        v.entries, c.seq, c.kid
                    ),
                },
                Err(broken) => {
                    anyhow::bail!(
                        "the chain is BROKEN at entry {}: {}",
                        broken.seq,
                        broken.reason
                    )
                }
            }
        }
        AuditCommand::Prune { before, config } => {
            let before_ms = berth::time::parse(&before).map_err(anyhow::Error::msg)? * 1000;
            let md = admin_metadata(config).await?;
            let n = berth::audit::prune(&md, before_ms).await?;
            println!("pruned {n} entries");
        }
        AuditCommand::Export {
            since,
            until,
            config,
        } => {
            let since_ms = berth::time::parse(&since).map_err(anyhow::Error::msg)? * 1000;
            let until_ms = until
                .map(|u| berth::time::parse(&u).map_err(anyhow::Error::msg))
                .transpose()?
                .map(|s| s * 1000);
            let md = admin_metadata(config).await?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let mut after = 0;
            let until_ms = until_ms.unwrap_or(i64::MAX);
            loop {
                let batch = md
                    .read(|tx| Box::pin(events::between(tx, since_ms, until_ms, after, AUDIT_PAGE)))
                    .await?;
                let Some(last) = batch.last() else { break };
                after = last.seq;
                for e in &batch {
                    serde_json::to_writer(&mut out, e)?;
                    out.write_all(b"\n")?;
                }
            }
            out.flush()?;
        }
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
async fn trust(command: TrustCommand) -> anyhow::Result<()> {
    match command {
        TrustCommand::Add {
            name,
            issuer,
            audience,
            jwks,
            conditions,
            robot,
            config,
        } => {
            // A file is stored as an absolute path: the server's working directory may differ.
            let jwks = if jwks.starts_with("http://") || jwks.starts_with("https://") {
                jwks
            } else {
                std::path::absolute(&jwks)
                    .with_context(|| format!("JWKS file {jwks:?}"))?
                    .display()
                    .to_string()
            };
            let md = admin_metadata(config).await?;
            let row = manage::add_trust_rule(
                &md,
                &By::cli(),
                &manage::NewTrustRule {
                    name: &name,
                    issuer: &issuer,
                    audience: &audience,
                    jwks: &jwks,
                    conditions: &conditions,
                    robot: &robot,
                },
            )
            .await?;
            println!("trust rule {name}: tokens of {issuer} for {audience} act as {robot}");
            println!("when {}", row.conditions);
        }
        TrustCommand::List { config } => {
            for (rule, robot) in manage::list_trust_rules(&admin_metadata(config).await?).await? {
                println!(
                    "{}\t{robot}\t{}\t{}\t{}\t{}",
                    rule.name, rule.issuer, rule.audience, rule.jwks, rule.conditions
                );
            }
        }
        TrustCommand::Rm { name, config } => {
            manage::remove_trust_rule(&admin_metadata(config).await?, &By::cli(), &name).await?;
            println!("removed trust rule {name}");
        }
    }
    Ok(())
}

async fn admin_registry(config: ConfigArgs) -> anyhow::Result<std::sync::Arc<Registry>> {
    let config = load_config_for_admin(config)?;
    init_logging(config.log_format);
    server::open_registry(&config).await
}

#[allow(clippy::print_stdout)]
async fn gc(dry_run: bool, json: bool, config: ConfigArgs) -> anyhow::Result<()> {
    let registry = admin_registry(config).await?;
    let ctx = RequestContext::system("cli");
    let report = registry.collect_garbage(&ctx, dry_run).await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let verb = if dry_run { "would go" } else { "went" };
    println!(
        "{verb}: {} untagged manifests to the trash, {} trash entries purged, {} links, {} blobs ({} bytes, {} of them never linked) in {} ms",
        report.manifests_trashed,
        report.trash_purged,
        report.links_removed,
        report.blobs_deleted,
        report.bytes_deleted,
        report.orphans_deleted,
        report.duration_ms
    );
    Ok(())
}

#[allow(clippy::print_stdout)]
async fn trash(command: TrashCommand) -> anyhow::Result<()> {
    match command {
        TrashCommand::List {
            filter,
            json,
            config,
        } => {
            let registry = admin_registry(config).await?;
            let entries = registry.list_trash(&filter.filter()?).await?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for e in entries {
                if json {
                    writeln!(out, "{}", serde_json::to_string(&e)?)?;
                } else {
                    writeln!(
                        out,
                        "{}\t{}\t{}@{}\ttags={}\t{}\tby {}\tat {}{}",
                        e.id,
                        e.kind,
                        e.repository,
                        e.digest,
                        e.tags.join(","),
                        e.reason,
                        e.actor,
                        e.deleted_at,
                        e.group_id
                            .map(|g| format!("\twith {g}"))
                            .unwrap_or_default()
                    )?;
                }
            }
            out.flush()?;
        }
        TrashCommand::Restore {
            ids,
            all,
            filter,
            config,
        } => {
            let registry = admin_registry(config).await?;
            let ids = if all {
                anyhow::ensure!(ids.is_empty(), "give ids or --all, not both");
                let entries = registry.list_trash(&filter.filter()?).await?;
                // Oldest first; entries that followed another come back with it.
                entries
                    .iter()
                    .rev()
                    .filter(|e| e.group_id.is_none())
                    .map(|e| e.id)
                    .collect()
            } else {
                anyhow::ensure!(!ids.is_empty(), "name the entries to restore, or --all");
                ids
            };
            let ctx = RequestContext::system("cli");
            let restored = registry.restore_trash(&ctx, &ids).await?;
            for m in &restored.manifests {
                println!("restored {m}");
            }
            for t in &restored.tags {
                println!("restored tag {t}");
            }
            for t in &restored.kept_newer {
                println!("kept {t}: it now points at another manifest");
            }
        }
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
async fn retention(command: RetentionCommand) -> anyhow::Result<()> {
    let ctx = RequestContext::system("cli");
    match command {
        RetentionCommand::Add {
            pattern,
            keep_last,
            keep_tags,
            keep_days,
            keep_pulled_days,
            untagged_days,
            config,
        } => {
            let registry = admin_registry(config).await?;
            let policy = berth::metadata::retention::Policy {
                id: 0,
                repositories: pattern,
                keep_last,
                keep_tags,
                keep_days,
                keep_pulled_days,
                untagged_days,
                created_at: 0,
            };
            let added = registry.add_retention_policy(&ctx, &policy).await?;
            println!("added retention policy {}", added.id);
        }
        RetentionCommand::List { config } => {
            let registry = admin_registry(config).await?;
            for p in registry.retention_policies().await? {
                println!("{}", serde_json::to_string(&p)?);
            }
        }
        RetentionCommand::Rm { id, config } => {
            let registry = admin_registry(config).await?;
            match registry.remove_retention_policy(&ctx, id).await? {
                Some(_) => println!("removed retention policy {id}"),
                None => anyhow::bail!("no retention policy {id}"),
            }
        }
        RetentionCommand::Plan { config } => {
            let registry = admin_registry(config).await?;
            let plan = registry.retention_plan().await?;
            for t in &plan.tags {
                println!("tag {}:{} ({})", t.repository, t.tag, t.digest);
            }
            for m in &plan.untagged {
                println!("untagged {}@{}", m.repository, m.digest);
            }
            println!(
                "{} tags and {} untagged manifests would go to the trash",
                plan.tags.len(),
                plan.untagged.len()
            );
        }
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
async fn immutable(command: ImmutableCommand) -> anyhow::Result<()> {
    match command {
        ImmutableCommand::Add {
            namespace,
            pattern,
            config,
        } => {
            let md = admin_metadata(config).await?;
            namespace_rules::add_rule(&md, &By::cli(), &namespace, &pattern).await?;
            println!("tags of {namespace} matching {pattern} are immutable");
        }
        ImmutableCommand::List { namespace, config } => {
            let md = admin_metadata(config).await?;
            for rule in namespace_rules::rules(&md, &namespace).await? {
                println!(
                    "{}\t{}\t{}",
                    rule.pattern,
                    when(Some(rule.created_at)),
                    rule.created_by
                );
            }
        }
        ImmutableCommand::Rm {
            namespace,
            pattern,
            config,
        } => {
            let md = admin_metadata(config).await?;
            namespace_rules::remove_rule(&md, &By::cli(), &namespace, &pattern).await?;
            println!("removed rule {pattern} of {namespace}");
        }
    }
    Ok(())
}

fn quota_line(q: &berth::metadata::quotas::Quota) -> String {
    let limit = q
        .limit_bytes
        .map_or_else(|| "-".to_string(), |l| l.to_string());
    format!("{}\t{}\t{limit}", q.namespace, q.usage_bytes)
}

#[allow(clippy::print_stdout)]
async fn quota(command: QuotaCommand) -> anyhow::Result<()> {
    match command {
        QuotaCommand::Set {
            namespace,
            bytes,
            config,
        } => {
            let md = admin_metadata(config).await?;
            let q = namespace_rules::set_limit(&md, &By::cli(), &namespace, Some(bytes)).await?;
            println!("{}", quota_line(&q));
        }
        QuotaCommand::Get { namespace, config } => {
            let md = admin_metadata(config).await?;
            println!(
                "{}",
                quota_line(&namespace_rules::quota(&md, &namespace).await?)
            );
        }
        QuotaCommand::List { config } => {
            let md = admin_metadata(config).await?;
            for q in namespace_rules::all_quotas(&md).await? {
                println!("{}", quota_line(&q));
            }
        }
        QuotaCommand::Rm { namespace, config } => {
            let md = admin_metadata(config).await?;
            namespace_rules::set_limit(&md, &By::cli(), &namespace, None).await?;
            println!("removed the quota of {namespace}");
        }
        QuotaCommand::Reconcile { fix, config } => {
            let md = admin_metadata(config).await?;
            let checks = namespace_rules::reconcile(&md, &By::cli(), fix).await?;
            println!("namespace\tstored\tactual\tdrift\twrong_counts");
            for c in &checks {
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    c.namespace,
                    c.stored_bytes,
                    c.actual_bytes,
                    c.drift(),
                    c.wrong_counts
                );
            }
            let drifted = checks.iter().filter(|c| c.drifted()).count();
            match (drifted, fix) {
                (0, _) => println!("no drift"),
                (n, true) => println!("fixed {n} namespaces"),
                (n, false) => anyhow::bail!("{n} namespaces drifted; run with --fix"),
            }
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Migrate(args) => runtime.block_on(migrate(args)),
        Command::Fsck(args) => runtime.block_on(fsck(args)),
        Command::Copy(args) => runtime.block_on(copy(args)),
        Command::User(c) => runtime.block_on(user(c)),
        Command::Namespace(c) => runtime.block_on(namespace(c)),
        Command::Robot(c) => runtime.block_on(robot(c)),
        Command::Token(c) => runtime.block_on(token(c)),
        Command::Key(c) => runtime.block_on(key(c)),
        Command::Audit(c) => runtime.block_on(audit(c)),
        Command::Trust(c) => runtime.block_on(trust(c)),
        Command::Gc {
            dry_run,
            json,
            config,
        } => runtime.block_on(gc(dry_run, json, config)),
        Command::Trash(c) => runtime.block_on(trash(c)),
        Command::Retention(c) => runtime.block_on(retention(c)),
        Command::Immutable(c) => runtime.block_on(immutable(c)),
        Command::Quota(c) => runtime.block_on(quota(c)),
    };
    // Access log lines still buffered (see berth::logging).
    berth::logging::STDERR.flush();
    result
}
