//! Wires the stores into a [`Registry`] and serves it on an already-bound listener until a
//! shutdown signal, then lets in-flight requests finish within a bound.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api;
use crate::config::{Config, MetadataConfig, StorageConfig};
use crate::metadata::postgres::PoolOptions;
use crate::metadata::{MetadataStore, PostgresMetadata, SqliteMetadata};
use crate::service::{Registry, RegistryOptions};
use crate::storage::{BlobStore, FsBlobStore, S3BlobStore};

/// Opens the configured blob and metadata stores and builds the registry over them.
pub async fn open_registry(config: &Config) -> anyhow::Result<Arc<Registry>> {
    let blobs: Arc<dyn BlobStore> = match &config.storage {
        StorageConfig::Filesystem(dir) => Arc::new(
            FsBlobStore::open(dir)
                .map_err(|e| anyhow::anyhow!("opening blob store in {}: {e}", dir.display()))?,
        ),
        StorageConfig::S3 { bucket, prefix } => Arc::new(
            S3BlobStore::open(bucket, prefix, &config.s3)
                .await
                .map_err(|e| anyhow::anyhow!("opening S3 bucket {bucket:?}: {e}"))?,
        ),
    };
    let metadata = open_metadata(config).await?;
    let registry = Arc::new(Registry::new(
        blobs,
        metadata,
        RegistryOptions {
            max_manifest_bytes: config.max_manifest_bytes,
            upload_idle_timeout: config.upload_idle_timeout,
        },
    ));
    Ok(registry)
}

/// Opens the configured metadata store, applying any pending schema migrations.
pub async fn open_metadata(config: &Config) -> anyhow::Result<Arc<dyn MetadataStore>> {
    Ok(match &config.metadata {
        MetadataConfig::Sqlite(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
            }
            Arc::new(SqliteMetadata::open(path)?)
        }
        MetadataConfig::Postgres(url) => {
            let options = PoolOptions {
                size: config.metadata_pool_size,
                timeout: config.metadata_connect_timeout,
            };
            Arc::new(
                PostgresMetadata::connect(url, options)
                    .await
                    .map_err(|e| anyhow::anyhow!("opening PostgreSQL metadata: {e}"))?,
            )
        }
    })
}

pub struct ServeOptions {
    /// How long in-flight requests may run after shutdown begins.
    pub shutdown_grace: Duration,
    pub upload_purge_interval: Duration,
}

pub fn router(registry: Arc<Registry>) -> Router {
    Router::new().fallback(api::handle).with_state(registry)
}

/// Serves until `shutdown` completes; then stops accepting, and waits up to the grace period
/// for in-flight requests before returning.
pub async fn run(
    listener: TcpListener,
    registry: Arc<Registry>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down: no new connections; finishing in-flight requests");
        let _ = stop_tx.send(true);
    });
    let janitor = tokio::spawn(expire_uploads(
        registry.clone(),
        options.upload_purge_interval,
        stop_rx.clone(),
    ));

    let listener = listener.tap_io(|tcp| {
        // Small responses (manifests, statuses) must not wait for Nagle.
        let _ = tcp.set_nodelay(true);
    });
    let mut graceful = stop_rx.clone();
    let serve = axum::serve(listener, router(registry)).with_graceful_shutdown(async move {
        let _ = graceful.wait_for(|stop| *stop).await;
    });
    let mut deadline = stop_rx;
    let grace = options.shutdown_grace;
    let result = tokio::select! {
        r = serve.into_future() => r,
        _ = async move {
            let _ = deadline.wait_for(|stop| *stop).await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(grace_secs = grace.as_secs(), "grace period over; abandoning in-flight requests");
            Ok(())
        }
    };
    janitor.abort();
    result
}

/// Background worker: cancels uploads idle past the timeout, until told to stop.
async fn expire_uploads(registry: Arc<Registry>, every: Duration, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match registry.purge_stale_uploads().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(uploads = n, "expired idle uploads"),
            Err(e) => tracing::warn!(error = %e, "upload expiry failed; will retry"),
        }
    }
}
