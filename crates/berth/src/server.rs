//! Wires the stores into a [`Registry`] and serves it on an already-bound listener until a
//! shutdown signal, then lets in-flight requests finish within a bound. The accept loop is
//! where a client's hold on the server is bounded: connections at once, time to send headers
//! (which also reaps idle keep-alive connections), and silence inside a request body.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tower_http::timeout::TimeoutBody;

use crate::api;
use crate::auth::Auth;
use crate::config::{Config, MetadataConfig, StorageConfig};
use crate::metadata::{Metadata, PoolOptions};
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
    let auth = Auth::open(metadata.clone(), config.auth.clone())
        .await
        .map_err(|e| anyhow::anyhow!("loading access control: {e}"))?;
    let registry = Arc::new(Registry::new(
        auth,
        blobs,
        metadata,
        RegistryOptions {
            max_manifest_bytes: config.max_manifest_bytes,
            upload_idle_timeout: config.upload_idle_timeout,
            max_blob_bytes: config.max_blob_bytes,
            max_buffered_manifest_bytes: config.max_buffered_manifest_bytes,
        },
    ));
    Ok(registry)
}

/// Opens the configured metadata store, applying any pending schema migrations.
pub async fn open_metadata(config: &Config) -> anyhow::Result<Metadata> {
    Ok(match &config.metadata {
        MetadataConfig::Sqlite(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
            }
            Metadata::open_sqlite(path)
                .await
                .map_err(|e| anyhow::anyhow!("opening SQLite metadata {}: {e}", path.display()))?
        }
        MetadataConfig::Postgres(url) => {
            let options = PoolOptions {
                size: config.metadata_pool_size,
                timeout: config.metadata_connect_timeout,
            };
            Metadata::connect_postgres(url, options)
                .await
                .map_err(|e| anyhow::anyhow!("opening PostgreSQL metadata: {e}"))?
        }
    })
}

/// How [`run`] serves: the limits that keep what one client can hold bounded.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// How long in-flight requests may run after shutdown begins.
    pub shutdown_grace: Duration,
    pub upload_purge_interval: Duration,
    /// Bound on receiving a request's headers; it also closes a keep-alive connection that
    /// sends no next request (hyper starts the timer whenever it waits for a request head).
    pub header_read_timeout: Duration,
    /// A request body silent this long fails, and the handler sees a body error.
    pub body_idle_timeout: Duration,
    /// Connections served at once. Past it the server stops accepting, so further
    /// connections wait in the kernel's accept backlog instead of taking file descriptors.
    pub max_connections: usize,
}

impl ServeOptions {
    pub fn from_config(config: &Config) -> ServeOptions {
        ServeOptions {
            shutdown_grace: config.shutdown_grace,
            upload_purge_interval: config.upload_purge_interval,
            header_read_timeout: config.header_read_timeout,
            body_idle_timeout: config.body_idle_timeout,
            max_connections: config.max_connections,
        }
    }
}

/// Most bytes hyper buffers per connection, each way.
const HYPER_MAX_BUF: usize = 128 * 1024;

/// Answers one request: the body gets its silence bound, `api::handle` the rest, and at debug
/// level one line is logged per request once its response head is ready: method, path with
/// query, status, and the time taken (a streamed body may still be on its way). No router or
/// middleware stack: `api` parses routes itself, and each layer cost allocations per request.
async fn answer(
    registry: &Registry,
    peer: &api::Peer,
    body_idle_timeout: Duration,
    request: hyper::Request<Incoming>,
) -> Response {
    let request = request.map(|body| Body::new(TimeoutBody::new(body_idle_timeout, body)));
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return api::handle(registry, peer, request).await;
    }
    let method = request.method().clone();
    let uri = request.uri().clone();
    let started = Instant::now();
    let response = api::handle(registry, peer, request).await;
    tracing::debug!(
        method = %method,
        uri = %uri.path_and_query().map_or(uri.path(), |pq| pq.as_str()),
        status = response.status().as_u16(),
        duration_ms = started.elapsed().as_secs_f64() * 1e3,
        "request"
    );
    response
}

/// Serves until `shutdown` completes; then closes the listener (new connections are refused),
/// closes idle connections at once, and waits up to the grace period for in-flight requests
/// before returning.
///
/// axum::serve hides hyper's connection builder, so this is the accept loop itself: it is where
/// the header timeout, the connection limit and the graceful close of idle connections live.
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
    let access_watch = tokio::spawn(registry.auth().clone().watch(stop_rx.clone()));
    let janitor = tokio::spawn(expire_uploads(
        registry.clone(),
        options.upload_purge_interval,
        stop_rx.clone(),
    ));

    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        // hyper keeps pulling a response body into its write buffer until this much is queued;
        // its default (~400 KiB) per stalled pull made 600 clients that stop reading cost
        // ~400 MiB. 128 KiB still fills a socket and keeps upload reads large; it bounds
        // request heads as well.
        .max_buf_size(HYPER_MAX_BUF);
    let connections = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let mut stop = stop_rx;
    loop {
        // A slot first, then a connection: at the limit nothing is accepted, and the kernel's
        // backlog holds new connections until a slot frees up.
        let slot = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let tcp = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
        };
        let (tcp, peer) = tcp;
        let peer = Arc::new(api::Peer::plain(peer));
        // Small responses (manifests, statuses) must not wait for Nagle.
        let _ = tcp.set_nodelay(true);
        let answered = Arc::new(AtomicBool::new(false));
        let service = {
            let (registry, answered, peer) = (registry.clone(), answered.clone(), peer.clone());
            let body_idle_timeout = options.body_idle_timeout;
            service_fn(move |request: hyper::Request<Incoming>| {
                answered.store(true, Ordering::Relaxed);
                let (registry, peer) = (registry.clone(), peer.clone());
                async move {
                    let response = answer(&registry, &peer, body_idle_timeout, request).await;
                    Ok::<_, std::convert::Infallible>(response)
                }
            })
        };
        let connection = connections.watch(http.serve_connection(TokioIo::new(tcp), service));
        let mut stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                result = connection => if let Err(e) = result {
                    // Timeouts and clients that hang up land here; nothing to act on.
                    tracing::debug!(error = %e, "connection ended with an error");
                },
                // hyper's graceful shutdown closes an idle connection at once but waits for
                // one still sending its first request's headers (a slow client or slowloris)
                // until the header timeout. Nothing was ever answered on it, so nothing can be
                // cut short: close it at once too.
                _ = async {
                    let _ = stop.wait_for(|s| *s).await;
                    if answered.load(Ordering::Relaxed) {
                        std::future::pending::<()>().await;
                    }
                } => {}
            }
            drop(slot);
        });
    }
    drop(listener);

    let grace = options.shutdown_grace;
    tokio::select! {
        _ = connections.shutdown() => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(grace_secs = grace.as_secs(), "grace period over; abandoning in-flight requests");
        }
    }
    janitor.abort();
    access_watch.abort();
    Ok(())
}

/// An accept error: one connection's (it is gone; go on) or the process's, such as running out
/// of file descriptors, where retrying at once would spin.
async fn accept_failed(error: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        error.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::warn!(error = %error, "accept failed; retrying in 250 ms");
    tokio::time::sleep(Duration::from_millis(250)).await;
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
