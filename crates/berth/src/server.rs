//! Wires the stores into a [`Registry`] and serves it on an already-bound listener until a
//! shutdown signal, then lets in-flight requests finish within a bound. The accept loop is
//! where a client's hold on the server is bounded: connections at once, time to send headers
//! (which also reaps idle keep-alive connections), and silence inside a request body. With TLS
//! configured, each connection's handshake runs on its own task, bounded like the headers, and
//! ALPN picks HTTP/2 or HTTP/1.1 for it (see [`TlsServer`]). Beside it run the background
//! workers: upload expiry, the access-generation watch, webhook delivery and the integrity scrub.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::api;
use crate::api::observe::{Listener, ObserveSettings, Observer};
use crate::auth::Auth;
use crate::config::{Config, MetadataConfig, StorageConfig};
use crate::metadata::{Metadata, PoolOptions};
use crate::metrics::Metrics;
use crate::service::{Registry, RegistryOptions, ScrubOptions};
use crate::storage::{BlobStore, FsBlobStore, ObservedStore, S3BlobStore};
use crate::tls::{self, Tls, TlsError};
use crate::webhooks::worker::{Worker, WorkerOptions};

/// Opens the configured blob and metadata stores and builds the registry over them.
pub async fn open_registry(config: &Config) -> anyhow::Result<Arc<Registry>> {
    let metrics = Arc::new(Metrics::new(config.observe.metrics_per_repository));
    let recorded = config.observe.metrics.then(|| metrics.clone());
    let store: Arc<dyn BlobStore> = match &config.storage {
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
    let blobs = Arc::new(ObservedStore::new(
        store,
        recorded.clone(),
        config.backend_timeouts,
    ));
    let mut metadata = open_metadata(config, true).await?;
    if let Some(metrics) = recorded {
        metadata.set_metrics(metrics);
    }
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
            pull_events_every: config.pull_events_every,
            lifecycle: config.lifecycle,
            metrics,
            blob_cache_bytes: config.blob_cache_bytes,
        },
    ));
    Ok(registry)
}

/// Opens the configured metadata store, applying any pending schema migrations. `bounded`
/// gives each PostgreSQL transaction the backend operation budget (serving); commands that
/// run long transactions on purpose (audit verification, exports) pass `false`.
pub async fn open_metadata(config: &Config, bounded: bool) -> anyhow::Result<Metadata> {
    Ok(match &config.metadata {
        MetadataConfig::Sqlite(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
            }
            Metadata::open_sqlite(path)
                .await
                .map_err(|e| anyhow::anyhow!("opening SQLite metadata {}: {e}", path.display()))?
                .with_read_cache(config.metadata_cache_bytes)
        }
        MetadataConfig::Postgres(url) => {
            let options = PoolOptions {
                size: config.metadata_pool_size,
                timeout: config.metadata_connect_timeout,
                operation_timeout: bounded.then_some(config.backend_timeouts.operation),
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
    /// HTTPS with this certificate; plain HTTP when `None`.
    pub tls: Option<Tls>,
    /// How the webhook worker delivers.
    pub webhooks: WorkerOptions,
    /// Audit entries older than this many days are pruned (behind a signed checkpoint);
    /// 0 keeps them all.
    pub audit_retention_days: u64,
    /// How often GC runs (one node at a time); zero: never.
    pub gc_interval: Duration,
    /// How often noted manifest pulls are written to metadata.
    pub pull_times_flush: Duration,
    /// The access log, metrics and health endpoints.
    pub observe: ObserveSettings,
    /// The integrity scrub worker.
    pub scrub: ScrubOptions,
}

impl ServeOptions {
    /// Also reads and checks the TLS files, so that a bad certificate or key stops the start.
    pub fn from_config(config: &Config) -> Result<ServeOptions, TlsError> {
        Ok(ServeOptions {
            shutdown_grace: config.shutdown_grace,
            upload_purge_interval: config.upload_purge_interval,
            gc_interval: config.gc_interval,
            pull_times_flush: config.pull_times_flush,
            header_read_timeout: config.header_read_timeout,
            body_idle_timeout: config.body_idle_timeout,
            max_connections: config.max_connections,
            tls: config.tls.as_ref().map(Tls::load).transpose()?,
            audit_retention_days: config.audit_retention_days,
            scrub: ScrubOptions {
                bytes_per_sec: config.scrub_bytes_per_sec,
                interval: config.scrub_interval,
            },
            webhooks: WorkerOptions {
                max_attempts: config.webhooks.max_attempts,
                timeout: config.webhooks.timeout,
                backoff_max: config.webhooks.backoff_max,
                poll_interval: config.webhooks.poll_interval,
                source: config
                    .auth
                    .public_url
                    .clone()
                    .unwrap_or_else(|| format!("urn:berth:{}", config.auth.service)),
            },
            observe: ObserveSettings {
                access_log: config.observe.access_log,
                metrics: config.observe.metrics,
                metrics_require_auth: config.observe.metrics_require_auth,
                probe_budget: config.backend_timeouts.first_byte,
                data_dir: config.data_dir.clone(),
                body_idle_timeout: config.body_idle_timeout,
                otel: config.observe.otel_endpoint.is_some(),
            },
        })
    }
}

/// Most bytes hyper buffers per connection, each way (per stream for HTTP/2 responses).
const HYPER_MAX_BUF: usize = 128 * 1024;

/// HTTP/2 requests in flight at once on one connection (nginx's default). Each is bounded like
/// an HTTP/1.1 connection's, so one connection can hold this many times as much.
const H2_MAX_STREAMS: u32 = 128;
/// Largest HTTP/2 request head (decoded header list) accepted.
const H2_MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;
/// Flow-control windows: request body bytes a client may send ahead of the handler, per stream
/// and per connection (so per connection at most this much is buffered).
const H2_WINDOW_BYTES: u32 = 1024 * 1024;

/// Serves until `shutdown` completes; then closes the listener (new connections are refused),
/// closes idle connections at once, and waits up to the grace period for in-flight requests
/// before returning.
///
/// axum::serve hides hyper's connection builder, so this is the accept loop itself: it is where
/// the header timeout, the connection limit and the graceful close of idle connections live.
///
/// `metrics_listener`, when given, serves only `/metrics`, `/healthz` and `/readyz` (see
/// [`serve_operators`]).
pub async fn run(
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
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
    if let Some(tls) = &options.tls {
        tokio::spawn(tls.clone().reload_until(stop_rx.clone()));
    }
    let webhooks = Worker::new(registry.auth().metadata().clone(), options.webhooks.clone())
        .map_err(std::io::Error::other)?;
    webhooks.register_metrics(registry.metrics());
    let webhooks = tokio::spawn(Arc::new(webhooks).run(stop_rx.clone()));
    let lifecycle = LifecycleThread::start()?;
    registry.lifecycle_on(Some(lifecycle.runtime.clone()));
    let scrub =
        registry.spawn_lifecycle(registry.clone().scrub_until(options.scrub, stop_rx.clone()));
    let pull_times = {
        let (registry, stop) = (registry.clone(), stop_rx.clone());
        let interval = options.pull_times_flush;
        tokio::spawn(async move { registry.record_pull_times(interval, stop).await })
    };
    if options.audit_retention_days > 0 {
        tokio::spawn(crate::audit::keep_days(
            registry.auth().metadata().clone(),
            options.audit_retention_days,
            stop_rx.clone(),
        ));
    }
    let gc = (!options.gc_interval.is_zero()).then(|| {
        tokio::spawn(crate::service::gc::run_scheduled(
            registry.clone(),
            options.gc_interval,
            stop_rx.clone(),
        ))
    });
    let observer = Arc::new(Observer::new(
        options.observe.clone(),
        registry.metrics().clone(),
    ));
    let operators = metrics_listener.map(|listener| {
        tokio::spawn(serve_operators(
            listener,
            registry.clone(),
            observer.clone(),
            options.header_read_timeout,
            stop_rx.clone(),
        ))
    });

    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        // hyper keeps pulling a response body into its write buffer until this much is queued;
        // its default (~400 KiB) per stalled pull made 600 clients that stop reading cost
        // ~400 MiB. 128 KiB still fills a socket and keeps upload reads large; it bounds
        // request heads as well.
        .max_buf_size(HYPER_MAX_BUF);
    let tls = options
        .tls
        .as_ref()
        .map(|tls| Arc::new(TlsServer::new(tls.clone(), http.clone(), &options)));
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
        // Small responses (manifests, statuses) must not wait for Nagle.
        let _ = tcp.set_nodelay(true);
        if let Some(tls) = &tls {
            let connection = (tcp, peer, slot, connections.watcher());
            tokio::spawn(tls.clone().serve(
                connection,
                registry.clone(),
                observer.clone(),
                stop.clone(),
            ));
            continue;
        }
        let peer = Arc::new(api::Peer::plain(peer));
        let answered = Arc::new(AtomicBool::new(false));
        let service = {
            let (registry, answered, peer) = (registry.clone(), answered.clone(), peer.clone());
            let observer = observer.clone();
            service_fn(move |request: hyper::Request<Incoming>| {
                answered.store(true, Ordering::Relaxed);
                let (registry, peer, observer) = (registry.clone(), peer.clone(), observer.clone());
                async move {
                    let response = observer
                        .answer(&registry, &peer, Listener::Main, request)
                        .await;
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
    if let Some(gc) = gc {
        // The schedule; a run in progress stops with the lifecycle runtime below.
        gc.abort();
    }
    // It stops on the signal by itself, within one delivery timeout.
    let _ = webhooks.await;
    // It stores its position and gives up its lease on the signal (a read in flight is
    // dropped); a re-check of a bad blob is not waited for long: the lease then expires.
    let abort = scrub.abort_handle();
    if tokio::time::timeout(Duration::from_secs(5), scrub)
        .await
        .is_err()
    {
        abort.abort();
    }
    // It writes the pulls noted so far on the signal; a frozen metadata store is not waited
    // for long.
    let abort = pull_times.abort_handle();
    if tokio::time::timeout(Duration::from_secs(5), pull_times)
        .await
        .is_err()
    {
        abort.abort();
    }
    if let Some(operators) = operators {
        operators.abort();
    }
    // A GC run still going is cut short here; the next run resumes its work.
    registry.lifecycle_on(None);
    drop(lifecycle);
    Ok(())
}

/// A tokio runtime on a thread of its own for the lifecycle's background work (GC, scrub), so
/// that work never holds the threads that answer requests (see [`Registry::lifecycle_on`]).
/// Dropping it stops the thread, and with it every task still on the runtime.
struct LifecycleThread {
    runtime: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl LifecycleThread {
    /// How long stopping waits for the runtime's blocking tasks (a file being hashed or
    /// deleted) before leaving them to finish alone.
    const STOP_WAIT: Duration = Duration::from_secs(5);

    /// How much higher the nice value of the lifecycle's threads (the runtime's own and its
    /// blocking pool's) is than the process's.
    /// When clients keep the CPUs busy the scheduler then gives the threads that answer them
    /// about ten times the lifecycle's share (weights 1024 against 110), and on an idle
    /// machine GC still runs at its full pace (`gc_duty_percent`). With the default nice of
    /// 0, GC in a loop at a quarter of one core took clients' pull and push rates to about
    /// 0.8x on two busy cores (bench/gc.sh).
    const NICE: i32 = 10;

    fn start() -> std::io::Result<Self> {
        // Threads inherit their creator's nice value: each is set from the process's own,
        // not raised again from the lifecycle thread's.
        let nice = rustix::process::getpriority_process(None)
            .map_or(Self::NICE, |now| (now + Self::NICE).min(19));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("berth-lifecycle")
            .on_thread_start(move || Self::lower_priority(nice))
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("berth-lifecycle".into())
            .spawn(move || {
                Self::lower_priority(nice);
                runtime.block_on(async {
                    let _ = stopped.await;
                });
                runtime.shutdown_timeout(Self::STOP_WAIT);
            })?;
        Ok(LifecycleThread {
            runtime: handle,
            stop: Some(stop),
        })
    }

    /// Sets the calling thread's nice value (on Linux a nice value is per thread). Where that
    /// is refused the work runs at the usual priority.
    fn lower_priority(nice: i32) {
        if let Err(e) = rustix::process::setpriority_process(None, nice) {
            tracing::debug!(error = %e, "cannot lower the lifecycle thread's priority");
        }
    }
}

impl Drop for LifecycleThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Completes once `stop` says so. (A `watch::Ref` held across an await is not `Send`.)
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Serves the operators' endpoints (`/metrics`, `/healthz`, `/readyz`) on a listener of their
/// own, without credentials: it is meant for an address only the monitoring network reaches.
/// Plain HTTP/1.1, a few connections at a time, until told to stop.
async fn serve_operators(
    listener: TcpListener,
    registry: Arc<Registry>,
    observer: Arc<Observer>,
    header_read_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    const CONNECTIONS: usize = 64;
    let slots = Arc::new(Semaphore::new(CONNECTIONS));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_buf_size(HYPER_MAX_BUF);
    loop {
        let slot = tokio::select! {
            _ = stopped(&mut stop) => return,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
        };
        let (tcp, addr) = tokio::select! {
            _ = stopped(&mut stop) => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
        };
        let peer = Arc::new(api::Peer::plain(addr));
        let (registry, observer) = (registry.clone(), observer.clone());
        let service = service_fn(move |request: hyper::Request<Incoming>| {
            let (registry, peer, observer) = (registry.clone(), peer.clone(), observer.clone());
            async move {
                let response = observer
                    .answer(&registry, &peer, Listener::Metrics, request)
                    .await;
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        let connection = http.serve_connection(TokioIo::new(tcp), service);
        tokio::spawn(async move {
            let _ = connection.await;
            drop(slot);
        });
    }
}

/// Serves TLS connections: one task each, from the handshake on, so a slow handshake holds its
/// own slot and never the accept loop.
///
/// hyper-util's `auto` builder is not used: it tells HTTP/2 from HTTP/1.1 by reading the first
/// bytes, with no timeout, while ALPN has already said which it is.
struct TlsServer {
    tls: Tls,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    /// Bound on the handshake, and on an HTTP/2 connection without a request in flight (the
    /// counterpart of HTTP/1.1's header timeout).
    header_read_timeout: Duration,
}

/// An accepted connection: its socket, the peer's address, its `max_connections` slot, and the
/// watcher that makes shutdown wait for it.
type Accepted = (TcpStream, SocketAddr, OwnedSemaphorePermit, Watcher);

impl TlsServer {
    fn new(tls: Tls, http1: http1::Builder, options: &ServeOptions) -> TlsServer {
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(H2_MAX_STREAMS)
            .max_header_list_size(H2_MAX_HEADER_LIST_BYTES)
            .initial_stream_window_size(H2_WINDOW_BYTES)
            .initial_connection_window_size(H2_WINDOW_BYTES)
            // As for HTTP/1.1: a response stalled by a client that stops reading holds at most
            // this much (per stream).
            .max_send_buf_size(HYPER_MAX_BUF)
            // A quiet connection is pinged, and closed when the peer no longer answers (it
            // vanished mid-request, without a FIN).
            .keep_alive_interval(options.header_read_timeout)
            .keep_alive_timeout(options.header_read_timeout);
        TlsServer {
            tls,
            http1,
            http2,
            header_read_timeout: options.header_read_timeout,
        }
    }

    async fn serve(
        self: Arc<Self>,
        (tcp, addr, slot, watcher): Accepted,
        registry: Arc<Registry>,
        observer: Arc<Observer>,
        mut stop: watch::Receiver<bool>,
    ) {
        let _held_until_closed = (slot, watcher);
        // Nothing was answered yet, so shutdown drops a connection still in its handshake.
        let handshake = self.tls.acceptor().accept(tcp);
        let handshake = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return,
            done = tokio::time::timeout(self.header_read_timeout, handshake) => done,
        };
        let stream = match handshake {
            Ok(Ok(stream)) => stream,
            // Scanners, clients that distrust the certificate, client certificates from
            // another CA: the client's problem, and it has been told.
            Ok(Err(e)) => return tracing::debug!(peer = %addr, error = %e, "TLS handshake failed"),
            Err(_) => return tracing::debug!(peer = %addr, "TLS handshake timed out"),
        };
        let session = stream.get_ref().1;
        let h2 = session.alpn_protocol() == Some(b"h2");
        let peer = Arc::new(api::Peer {
            addr,
            tls: true,
            client_cert_subject: session
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|cert| tls::common_name(cert)),
        });
        let answered = Arc::new(AtomicBool::new(false));
        // Only HTTP/2 reads the count; TLS connections are not the ones benchmarked.
        let in_flight = Arc::new(watch::Sender::new(0usize));
        let service = {
            let (answered, in_flight) = (answered.clone(), in_flight.clone());
            service_fn(move |request: hyper::Request<Incoming>| {
                answered.store(true, Ordering::Relaxed);
                let in_flight = InFlight::start(&in_flight);
                let (registry, peer, observer) = (registry.clone(), peer.clone(), observer.clone());
                async move {
                    let response = observer
                        .answer(&registry, &peer, Listener::Main, request)
                        .await;
                    let response = response.map(|body| CountedBody {
                        body,
                        _in_flight: in_flight,
                    });
                    Ok::<_, std::convert::Infallible>(response)
                }
            })
        };
        let io = TokioIo::new(stream);
        let result = if h2 {
            let connection = pin!(self.http2.serve_connection(io, service));
            let idle = idle(in_flight, self.header_read_timeout);
            let graceful = http2::Connection::graceful_shutdown;
            drive(connection, graceful, idle, &answered, stop).await
        } else {
            // hyper's header timeout already closes an idle HTTP/1.1 connection.
            let connection = pin!(self.http1.serve_connection(io, service));
            let graceful = http1::Connection::graceful_shutdown;
            let idle = std::future::pending();
            drive(connection, graceful, idle, &answered, stop).await
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }
}

/// Runs a TLS connection to its end. On shutdown, or once `idle` completes, a connection that
/// never answered a request is dropped at once (as in the plain accept loop: nothing can be cut
/// short, and hyper's HTTP/2 handshake, waiting for the preface, has no timeout of its own);
/// any other is asked to close gracefully: HTTP/2 sends GOAWAY and lets its streams finish
/// (their last bytes may still be on their way when the count of requests in flight drops),
/// and a peer that stops answering pings is cut by hyper's keep-alive.
async fn drive<C>(
    mut connection: Pin<&mut C>,
    graceful: fn(Pin<&mut C>),
    idle: impl Future<Output = ()>,
    answered: &AtomicBool,
    mut stop: watch::Receiver<bool>,
) -> hyper::Result<()>
where
    C: Future<Output = hyper::Result<()>>,
{
    tokio::select! {
        result = connection.as_mut() => return result,
        _ = stop.wait_for(|s| *s) => {}
        _ = idle => {}
    };
    if !answered.load(Ordering::Relaxed) {
        return Ok(());
    }
    graceful(connection.as_mut());
    connection.await
}

/// Completes once no request has been in flight for `after`: how long an HTTP/2 connection may
/// sit idle, as hyper's header timeout does for HTTP/1.1.
async fn idle(in_flight: Arc<watch::Sender<usize>>, after: Duration) {
    let mut count = in_flight.subscribe();
    loop {
        if count.wait_for(|n| *n == 0).await.is_err() {
            return std::future::pending().await;
        }
        match tokio::time::timeout(after, count.changed()).await {
            Err(_) => return,
            Ok(Ok(())) => {}
            Ok(Err(_)) => return std::future::pending().await,
        }
    }
}

/// One request of a TLS connection, from its start until its response body is sent or dropped.
struct InFlight(Arc<watch::Sender<usize>>);

impl InFlight {
    fn start(count: &Arc<watch::Sender<usize>>) -> InFlight {
        count.send_modify(|n| *n += 1);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// A response body that keeps its request counted as in flight.
struct CountedBody {
    body: Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for CountedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
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
        // A registry that grew tenfold since the last look gets fresh planner statistics.
        if let Err(e) = registry.auth().metadata().optimize().await {
            tracing::warn!(error = %e, "refreshing SQLite's planner statistics failed; will retry");
        }
    }
}
