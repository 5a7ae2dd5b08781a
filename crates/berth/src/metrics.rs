//! Prometheus metrics: [`Metrics`], which every layer records into, and its OpenMetrics text
//! (`GET /metrics`, see `api::observe`).
//!
//! Cardinality is bounded by construction: labels are route templates, methods, status
//! classes, OCI error codes, operation names and reasons, all `&'static str` from closed sets.
//! A repository label exists only on the push and pull counters, and only when
//! `metrics_per_repository` is on.
//!
//! The hot path never looks a series up by its labels: the series of each (route, method,
//! status class) and of each backend operation is resolved once, the first time it is used,
//! into a slot of a fixed table, and found again by index.
//!
//! **Adding a metric** (the webhook engine's queue depth, the event log's lag, ...): either
//! add a field to [`Metrics`] and register it in [`Metrics::new`] (when the code that
//! records it holds the `Registry`), or create it where it is recorded and hand it to
//! [`Metrics::register`] once at startup. Names start with `berth_`; a counter's `_total` is
//! added by the encoder; use base units (seconds, bytes) and say which in the name.

use std::fmt;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};

/// What a request was, as metrics and the access log name it: its route template, never its
/// path (which holds repository names and digests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    Base,
    Catalog,
    Tags,
    Manifest,
    Blob,
    Uploads,
    Upload,
    Referrers,
    Token,
    Manage,
    Healthz,
    Readyz,
    Metrics,
    /// No such endpoint (404), or a path that did not parse.
    Unknown,
}

impl RouteKind {
    const ALL: [RouteKind; 14] = [
        RouteKind::Base,
        RouteKind::Catalog,
        RouteKind::Tags,
        RouteKind::Manifest,
        RouteKind::Blob,
        RouteKind::Uploads,
        RouteKind::Upload,
        RouteKind::Referrers,
        RouteKind::Token,
        RouteKind::Manage,
        RouteKind::Healthz,
        RouteKind::Readyz,
        RouteKind::Metrics,
        RouteKind::Unknown,
    ];

    pub fn template(self) -> &'static str {
        match self {
            RouteKind::Base => "/v2/",
            RouteKind::Catalog => "/v2/_catalog",
            RouteKind::Tags => "/v2/{name}/tags/list",
            RouteKind::Manifest => "/v2/{name}/manifests/{reference}",
            RouteKind::Blob => "/v2/{name}/blobs/{digest}",
            RouteKind::Uploads => "/v2/{name}/blobs/uploads/",
            RouteKind::Upload => "/v2/{name}/blobs/uploads/{id}",
            RouteKind::Referrers => "/v2/{name}/referrers/{digest}",
            RouteKind::Token => "/auth/token",
            RouteKind::Manage => "/api/v1/{path}",
            RouteKind::Healthz => "/healthz",
            RouteKind::Readyz => "/readyz",
            RouteKind::Metrics => "/metrics",
            RouteKind::Unknown => "unknown",
        }
    }
}

const METHODS: [&str; 7] = ["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OTHER"];
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn method_index(method: &axum::http::Method) -> usize {
    match *method {
        axum::http::Method::GET => 0,
        axum::http::Method::HEAD => 1,
        axum::http::Method::PUT => 2,
        axum::http::Method::POST => 3,
        axum::http::Method::PATCH => 4,
        axum::http::Method::DELETE => 5,
        _ => 6,
    }
}

fn status_index(status: u16) -> usize {
    usize::from(status / 100).clamp(1, 5) - 1
}

/// A backend call, as `berth_backend_*` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendOp {
    MetadataRead,
    MetadataWrite,
    StorageStat,
    StorageRead,
    StorageDelete,
    StorageCreateUpload,
    StorageUploadSize,
    StorageAppendUpload,
    /// One write (or flush, or finish) of an upload's bytes to an open writer.
    StorageWriteUpload,
    StorageReadUpload,
    StorageCommitUpload,
    StorageDeleteUpload,
    StorageListUploads,
    StorageListBlobs,
    StorageDeleteBlobs,
    StorageRedirectUrl,
    /// The readiness probe's query.
    MetadataPing,
}

impl BackendOp {
    const COUNT: usize = 17;

    /// (backend, operation)
    pub fn labels(self) -> (&'static str, &'static str) {
        use BackendOp::*;
        match self {
            MetadataRead => ("metadata", "read"),
            MetadataWrite => ("metadata", "write"),
            MetadataPing => ("metadata", "ping"),
            StorageStat => ("storage", "stat"),
            StorageRead => ("storage", "read"),
            StorageDelete => ("storage", "delete"),
            StorageCreateUpload => ("storage", "create_upload"),
            StorageUploadSize => ("storage", "upload_size"),
            StorageAppendUpload => ("storage", "append_upload"),
            StorageWriteUpload => ("storage", "write_upload"),
            StorageReadUpload => ("storage", "read_upload"),
            StorageCommitUpload => ("storage", "commit_upload"),
            StorageDeleteUpload => ("storage", "delete_upload"),
            StorageListUploads => ("storage", "list_uploads"),
            StorageListBlobs => ("storage", "list_blobs"),
            StorageDeleteBlobs => ("storage", "delete_blobs"),
            StorageRedirectUrl => ("storage", "redirect_url"),
        }
    }
}

/// How a backend call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendFailure {
    /// It did not answer within its budget.
    Timeout,
    /// It answered with, or could not be reached for, a failure the client may retry (503).
    Unavailable,
    /// A bug or corruption (500).
    Internal,
}

impl BackendFailure {
    fn label(self) -> &'static str {
        match self {
            BackendFailure::Timeout => "timeout",
            BackendFailure::Unavailable => "unavailable",
            BackendFailure::Internal => "internal",
        }
    }
}

/// Why a request's credentials were refused (`berth_auth_failures_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No credentials where some are needed (the 401 that starts every token login).
    Missing,
    /// Wrong password, unknown account, malformed header.
    BadCredentials,
    /// A token that did not verify (signature, issuer, audience).
    InvalidToken,
    ExpiredToken,
    /// Good credentials, not enough rights (403).
    Denied,
    /// Too many failed logins (429).
    Throttled,
}

impl AuthFailure {
    pub fn label(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing_credentials",
            AuthFailure::BadCredentials => "bad_credentials",
            AuthFailure::InvalidToken => "invalid_token",
            AuthFailure::ExpiredToken => "expired_token",
            AuthFailure::Denied => "denied",
            AuthFailure::Throttled => "throttled",
        }
    }
}

type Labels<const N: usize> = [(&'static str, &'static str); N];

/// A push or pull outcome: `result`, `code`, and `repository` only when switched on.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct Outcome {
    result: &'static str,
    code: &'static str,
    repository: Option<String>,
}

impl EncodeLabelSet for Outcome {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> fmt::Result {
        use prometheus_client::encoding::EncodeLabel;
        ("result", self.result).encode(encoder.encode_label())?;
        ("code", self.code).encode(encoder.encode_label())?;
        if let Some(repo) = &self.repository {
            ("repository", repo.as_str()).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

/// Histograms constructed with fixed buckets (a `fn` pointer, so the family stays `Sync`).
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms to ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Every metric Berth records; see the module doc for how to add one.
pub struct Metrics {
    registry: Mutex<Registry>,
    per_repository: bool,

    requests: Family<Labels<3>, Counter>,
    request_duration: HistogramFamily<Labels<3>>,
    /// The (counter, histogram) of each (route, method, status class), resolved on first use.
    http: Box<[OnceLock<(Counter, Histogram)>]>,
    /// Request and response body bytes by route (ingress, egress), one pair per route.
    bytes: Box<[(Counter, Counter)]>,

    pushes: Family<Outcome, Counter>,
    pulls: Family<Outcome, Counter>,
    push_duration: Histogram,
    pull_duration: Histogram,
    pushed_image_bytes: Histogram,
    auth_failures: Family<Labels<1>, Counter>,
    integrity_errors: Family<Labels<1>, Counter>,

    backend_errors: Family<Labels<3>, Counter>,
    backend_duration: HistogramFamily<Labels<2>>,
    backend: Box<[OnceLock<Histogram>]>,

    data_dir_free_bytes: Gauge,
    data_dir_size_bytes: Gauge,
    storage_used_bytes: Gauge,
    /// By namespace: namespaces are few (an administrator creates each, or a repository's
    /// first segment), unlike repositories.
    namespace_usage_bytes: Family<[(&'static str, String); 1], Gauge>,

    /// Garbage collection and the trash (see [`GcMetrics`]).
    gc: GcMetrics,
}

/// What `/metrics` shows of GC runs and the trash.
#[derive(Clone, Default)]
struct GcMetrics {
    runs: Counter,
    /// Seconds the last run took, and when it finished (seconds since the epoch).
    last_duration_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    last_finished: Gauge,
    manifests_trashed: Counter,
    trash_purged: Counter,
    blobs_deleted: Counter,
    bytes_deleted: Counter,
    trash_entries: Gauge,
    trash_bytes: Gauge,
}

impl GcMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "berth_gc_runs",
            "Garbage collection runs finished",
            self.runs.clone(),
        );
        registry.register(
            "berth_gc_last_duration_seconds",
            "How long the last garbage collection run on this node took",
            self.last_duration_seconds.clone(),
        );
        registry.register(
            "berth_gc_last_finished_timestamp_seconds",
            "When the last garbage collection run on this node finished",
            self.last_finished.clone(),
        );
        registry.register(
            "berth_gc_manifests_trashed",
            "Untagged manifests GC moved to the trash",
            self.manifests_trashed.clone(),
        );
        registry.register(
            "berth_gc_trash_purged",
            "Trash entries removed for good after the trash period",
            self.trash_purged.clone(),
        );
        registry.register(
            "berth_gc_blobs_deleted",
            "Blobs GC deleted (bytes and row)",
            self.blobs_deleted.clone(),
        );
        registry.register(
            "berth_gc_reclaimed_bytes",
            "Bytes of the blobs GC deleted",
            self.bytes_deleted.clone(),
        );
        registry.register(
            "berth_trash_entries",
            "Manifests and tags in the trash, as of the last GC run or restore on this node",
            self.trash_entries.clone(),
        );
        registry.register(
            "berth_trash_manifest_bytes",
            "Bytes of the manifests in the trash (their blobs are kept with them)",
            self.trash_bytes.clone(),
        );
    }
}

impl Metrics {
    /// `per_repository` adds a `repository` label to the push and pull counters.
    pub fn new(per_repository: bool) -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<Labels<3>, Counter>::default();
        registry.register(
            "berth_http_requests",
            "HTTP requests answered, by route template, method and status class",
            requests.clone(),
        );
        let request_duration: HistogramFamily<Labels<3>> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "berth_http_request_duration_seconds",
            "Time from a request's arrival to its response head (a body may still stream)",
            request_duration.clone(),
        );
        let ingress = Family::<Labels<1>, Counter>::default();
        registry.register(
            "berth_http_request_body_bytes",
            "Request body bytes received (ingress), by route template",
            ingress.clone(),
        );
        let egress = Family::<Labels<1>, Counter>::default();
        registry.register(
            "berth_http_response_body_bytes",
            "Response body bytes sent (egress), by route template",
            egress.clone(),
        );
        let bytes = RouteKind::ALL
            .iter()
            .map(|r| {
                let labels = [("route", r.template())];
                (
                    ingress.get_or_create_owned(&labels),
                    egress.get_or_create_owned(&labels),
                )
            })
            .collect();
        let pushes = Family::<Outcome, Counter>::default();
        registry.register(
            "berth_pushes",
            "Image pushes, counted at the manifest PUT: result and OCI error code",
            pushes.clone(),
        );
        let pulls = Family::<Outcome, Counter>::default();
        registry.register(
            "berth_pulls",
            "Image pulls, counted at the manifest GET: result and OCI error code",
            pulls.clone(),
        );
        let push_duration = latency_histogram();
        registry.register(
            "berth_push_duration_seconds",
            "Time to answer a manifest PUT (the step that completes a push)",
            push_duration.clone(),
        );
        let pull_duration = latency_histogram();
        registry.register(
            "berth_pull_duration_seconds",
            "Time to answer a manifest GET (the step that starts a pull)",
            pull_duration.clone(),
        );
        // 1 KiB to 256 GiB.
        let pushed_image_bytes = Histogram::new(exponential_buckets(1024.0, 4.0, 15));
        registry.register(
            "berth_pushed_image_bytes",
            "Size of each image pushed: the manifest and every blob it references",
            pushed_image_bytes.clone(),
        );
        let auth_failures = Family::<Labels<1>, Counter>::default();
        registry.register(
            "berth_auth_failures",
            "Requests refused by access control, by reason",
            auth_failures.clone(),
        );
        let integrity_errors = Family::<Labels<1>, Counter>::default();
        registry.register(
            "berth_integrity_errors",
            "Uploads whose bytes did not match the digest the client declared (blob or manifest)",
            integrity_errors.clone(),
        );
        let backend_errors = Family::<Labels<3>, Counter>::default();
        registry.register(
            "berth_backend_errors",
            "Failed backend calls, by backend, operation and kind (timeout, unavailable, internal)",
            backend_errors.clone(),
        );
        let backend_duration: HistogramFamily<Labels<2>> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "berth_backend_duration_seconds",
            "Backend call latency (metadata transactions, storage operations; a read until its \
             body starts)",
            backend_duration.clone(),
        );
        let data_dir_free_bytes = Gauge::default();
        registry.register(
            "berth_data_dir_free_bytes",
            "Free space on the data directory's filesystem, for unprivileged users",
            data_dir_free_bytes.clone(),
        );
        let data_dir_size_bytes = Gauge::default();
        registry.register(
            "berth_data_dir_size_bytes",
            "Size of the data directory's filesystem",
            data_dir_size_bytes.clone(),
        );
        let storage_used_bytes = Gauge::default();
        registry.register(
            "berth_storage_used_bytes",
            "Bytes of all blobs the registry holds (each stored once), as of the last scrape",
            storage_used_bytes.clone(),
        );
        let gc = GcMetrics::default();
        gc.register(&mut registry);
        let namespace_usage_bytes = Family::<[(&'static str, String); 1], Gauge>::default();
        registry.register(
            "berth_namespace_usage_bytes",
            "Bytes a namespace's manifests use (each blob once per namespace, as quotas count \
             them), as of the last refresh",
            namespace_usage_bytes.clone(),
        );
        Metrics {
            gc,
            registry: Mutex::new(registry),
            per_repository,
            requests,
            request_duration,
            http: (0..RouteKind::ALL.len() * METHODS.len() * STATUS_CLASSES.len())
                .map(|_| OnceLock::new())
                .collect(),
            bytes,
            pushes,
            pulls,
            push_duration,
            pull_duration,
            pushed_image_bytes,
            auth_failures,
            integrity_errors,
            backend_errors,
            backend_duration,
            backend: (0..BackendOp::COUNT).map(|_| OnceLock::new()).collect(),
            data_dir_free_bytes,
            data_dir_size_bytes,
            storage_used_bytes,
            namespace_usage_bytes,
        }
    }

    /// Registers a metric recorded elsewhere (keep a clone of it there: metrics are handles on
    /// shared values).
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.lock().register(name, help, metric);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        // Registering or encoding cannot leave the registry half-changed.
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn per_repository(&self) -> bool {
        self.per_repository
    }

    /// One answered request: counted, and its time to response head observed.
    pub fn request(
        &self,
        route: RouteKind,
        method: &axum::http::Method,
        status: u16,
        elapsed: Duration,
    ) {
        let (m, s) = (method_index(method), status_index(status));
        let index = (route as usize * METHODS.len() + m) * STATUS_CLASSES.len() + s;
        let (count, duration) = self.http[index].get_or_init(|| {
            let labels = [
                ("route", route.template()),
                ("method", METHODS[m]),
                ("status", STATUS_CLASSES[s]),
            ];
            (
                self.requests.get_or_create_owned(&labels),
                self.request_duration.get_or_create_owned(&labels),
            )
        });
        count.inc();
        duration.observe(elapsed.as_secs_f64());
    }

    /// Body bytes of one request: received and sent.
    pub fn body_bytes(&self, route: RouteKind, received: u64, sent: u64) {
        let (ingress, egress) = &self.bytes[route as usize];
        if received > 0 {
            ingress.inc_by(received);
        }
        if sent > 0 {
            egress.inc_by(sent);
        }
    }

    fn outcome(&self, code: Option<&'static str>, repository: Option<&str>) -> Outcome {
        Outcome {
            result: if code.is_some() { "error" } else { "success" },
            code: code.unwrap_or("none"),
            repository: repository
                .filter(|_| self.per_repository)
                .map(str::to_owned),
        }
    }

    /// A manifest PUT: `code` is the OCI error code of a failure.
    pub fn push(&self, code: Option<&'static str>, repository: Option<&str>, elapsed: Duration) {
        self.pushes
            .get_or_create(&self.outcome(code, repository))
            .inc();
        self.push_duration.observe(elapsed.as_secs_f64());
    }

    /// A manifest GET: `code` is the OCI error code of a failure.
    pub fn pull(&self, code: Option<&'static str>, repository: Option<&str>, elapsed: Duration) {
        self.pulls
            .get_or_create(&self.outcome(code, repository))
            .inc();
        self.pull_duration.observe(elapsed.as_secs_f64());
    }

    /// A finished (not dry) GC run.
    pub fn gc_run(&self, report: &crate::service::gc::GcReport, took: Duration) {
        if report.dry_run {
            return;
        }
        let gc = &self.gc;
        gc.runs.inc();
        gc.last_duration_seconds.set(took.as_secs_f64());
        gc.last_finished.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
        );
        gc.manifests_trashed.inc_by(report.manifests_trashed);
        gc.trash_purged.inc_by(report.trash_purged);
        gc.blobs_deleted.inc_by(report.blobs_deleted);
        gc.bytes_deleted.inc_by(report.bytes_deleted);
    }

    pub fn trash_size(&self, entries: u64, bytes: u64) {
        self.gc.trash_entries.set(entries as i64);
        self.gc.trash_bytes.set(bytes as i64);
    }

    pub fn pushed_image(&self, bytes: u64) {
        self.pushed_image_bytes.observe(bytes as f64);
    }

    pub fn auth_failure(&self, why: AuthFailure) {
        self.auth_failures
            .get_or_create(&[("reason", why.label())])
            .inc();
    }

    /// An upload whose bytes did not hash to the declared digest: `object` is `blob` or
    /// `manifest`.
    pub fn integrity_error(&self, object: &'static str) {
        self.integrity_errors
            .get_or_create(&[("object", object)])
            .inc();
    }

    /// One backend call: its latency, and how it failed if it did.
    pub fn backend(&self, op: BackendOp, elapsed: Duration, failure: Option<BackendFailure>) {
        let histogram = self.backend[op as usize].get_or_init(|| {
            let (backend, operation) = op.labels();
            self.backend_duration
                .get_or_create_owned(&[("backend", backend), ("operation", operation)])
        });
        histogram.observe(elapsed.as_secs_f64());
        if let Some(failure) = failure {
            let (backend, operation) = op.labels();
            self.backend_errors
                .get_or_create(&[
                    ("backend", backend),
                    ("operation", operation),
                    ("kind", failure.label()),
                ])
                .inc();
        }
    }

    /// Sets the gauges that are read at scrape time.
    pub fn set_disk(&self, free_bytes: u64, size_bytes: u64) {
        self.data_dir_free_bytes.set(gauge_value(free_bytes));
        self.data_dir_size_bytes.set(gauge_value(size_bytes));
    }

    pub fn set_storage_used(&self, bytes: u64) {
        self.storage_used_bytes.set(gauge_value(bytes));
    }

    /// Each namespace's usage (a namespace once counted keeps its row, so none goes stale).
    pub fn set_namespace_usage(&self, usage: &[(String, u64)]) {
        for (namespace, bytes) in usage {
            self.namespace_usage_bytes
                .get_or_create(&[("namespace", namespace.clone())])
                .set(gauge_value(*bytes));
        }
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.lock());
        out
    }
}

fn gauge_value(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_named_by_template_and_class_never_by_path() {
        let m = Metrics::new(false);
        m.request(
            RouteKind::Manifest,
            &axum::http::Method::GET,
            200,
            Duration::from_millis(3),
        );
        m.request(
            RouteKind::Manifest,
            &axum::http::Method::GET,
            204,
            Duration::from_millis(3),
        );
        m.request(
            RouteKind::Blob,
            &axum::http::Method::from_bytes(b"BREW").unwrap_or(axum::http::Method::GET),
            503,
            Duration::ZERO,
        );
        m.push(Some("MANIFEST_INVALID"), Some("team/app"), Duration::ZERO);
        let text = m.encode();
        assert!(
            text.contains(
                "berth_http_requests_total{route=\"/v2/{name}/manifests/{reference}\",method=\"GET\",status=\"2xx\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "berth_http_requests_total{route=\"/v2/{name}/blobs/{digest}\",method=\"OTHER\",status=\"5xx\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("berth_pushes_total{result=\"error\",code=\"MANIFEST_INVALID\"} 1"),
            "{text}"
        );
        assert!(!text.contains("team/app"), "{text}");
    }

    /// The dashboard in deploy/grafana is valid JSON and every `berth_*` series it queries
    /// exists.
    #[test]
    fn the_grafana_dashboard_queries_only_metrics_that_exist() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/grafana/berth.json"
        );
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let dashboard: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(
            dashboard["panels"]
                .as_array()
                .is_some_and(|p| !p.is_empty())
        );
        // A family shows only once it has a series: record one of each.
        let m = Metrics::new(false);
        m.request(
            RouteKind::Base,
            &axum::http::Method::GET,
            200,
            Duration::ZERO,
        );
        m.push(None, None, Duration::ZERO);
        m.pull(None, None, Duration::ZERO);
        m.auth_failure(AuthFailure::Denied);
        m.integrity_error("blob");
        m.backend(
            BackendOp::StorageStat,
            Duration::ZERO,
            Some(BackendFailure::Timeout),
        );
        let exposed = m.encode();
        let families: Vec<&str> = exposed
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        let mut queried = 0;
        for (i, _) in text.match_indices("berth_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            let family = ["_bucket", "_total", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(&name);
            if family == "berth_registry" || family == "berth_" {
                continue; // the dashboard's uid and tags
            }
            assert!(
                families.contains(&family),
                "{name} is not a metric: {families:?}"
            );
            queried += 1;
        }
        assert!(queried > 10);
    }

    #[test]
    fn the_repository_label_is_opt_in() {
        let m = Metrics::new(true);
        m.pull(None, Some("team/app"), Duration::ZERO);
        let text = m.encode();
        assert!(
            text.contains(
                "berth_pulls_total{result=\"success\",code=\"none\",repository=\"team/app\"} 1"
            ),
            "{text}"
        );
    }
}
