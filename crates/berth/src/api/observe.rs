//! What happens around every request: its id, its tracing span, the access log line, the
//! metrics, and the endpoints for operators (`/healthz`, `/readyz`, `/metrics`).
//!
//! [`Observer::answer`] wraps [`super::handle`]. It takes the request id from a sane
//! `X-Request-Id` or makes one, returns it in `X-Request-Id`, and (with the access log on) runs
//! the handler tagged with it and any W3C `traceparent` trace id ([`crate::logging::in_request`]),
//! so every line logged for the request names it; with OpenTelemetry export on, in a `request`
//! span instead, which the exporter sends. The handler fills in a [`Note`] (route template,
//! repository, account, error code, why access was refused); the response body is wrapped so
//! that when its last byte is sent, or the client hangs up, the bytes each way are counted and
//! the access log line is written.
//!
//! The hot path stays cheap: with the access log off nothing is formatted and no names are
//! copied; metric series are found by index (see [`crate::metrics`]); with both off a request
//! costs the id and its header.

use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use tokio::time::Instant;
use tower_http::timeout::TimeoutBody;
use tracing::Instrument;

use super::error::{ApiError, ErrorCode};
use super::{Note, Peer};
use crate::auth::Credentials;
use crate::metrics::{self, AuthFailure, Metrics, RouteKind};
use crate::service::{Registry, RequestId};

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// How long the blob total behind `berth_storage_used_bytes` is reused (it is a full scan).
const STORAGE_USED_REFRESH: Duration = Duration::from_secs(60);

/// The switches of [`Observer`], from the config.
#[derive(Debug, Clone)]
pub struct ObserveSettings {
    pub access_log: bool,
    pub metrics: bool,
    /// `/metrics` on the main listener needs credentials (when access control is on).
    pub metrics_require_auth: bool,
    /// Bound on each readiness probe call.
    pub probe_budget: Duration,
    /// Whose filesystem `berth_data_dir_free_bytes` reports.
    pub data_dir: PathBuf,
    /// Silence allowed inside a request body.
    pub body_idle_timeout: Duration,
    /// Request spans are exported to OpenTelemetry (see [`crate::otel`]).
    pub otel: bool,
}

pub struct Observer {
    settings: ObserveSettings,
    metrics: Arc<Metrics>,
    /// (when, bytes) of the last blob total.
    storage_used: tokio::sync::Mutex<Option<(Instant, u64)>>,
}

/// Which listener a request came on: the main one serves everything, the metrics listener
/// (`metrics_listen`) only the operators' endpoints, without credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Main,
    Metrics,
}

impl Observer {
    pub fn new(settings: ObserveSettings, metrics: Arc<Metrics>) -> Observer {
        Observer {
            settings,
            metrics,
            storage_used: tokio::sync::Mutex::new(None),
        }
    }

    /// Answers one request, observed.
    pub async fn answer(
        &self,
        registry: &Arc<Registry>,
        peer: &Peer,
        listener: Listener,
        request: hyper::Request<Incoming>,
    ) -> Response {
        let started = Instant::now();
        let (record, log, export) = (
            self.settings.metrics,
            self.settings.access_log,
            self.settings.otel,
        );
        let received = (record || log).then(|| Arc::new(AtomicU64::new(0)));
        let idle = self.settings.body_idle_timeout;
        let request = request.map(|body| {
            Body::new(TimeoutBody::new(
                idle,
                CountingBody {
                    inner: body,
                    count: received.clone(),
                },
            ))
        });
        let method = request.method().clone();
        let request_id = request_id(request.headers());
        let details = log || self.metrics.per_repository();
        let mut note = Note::new(request_id, details);
        let builtin = match request.uri().path() {
            "/healthz" => Some(RouteKind::Healthz),
            "/readyz" => Some(RouteKind::Readyz),
            "/metrics" if self.settings.metrics => Some(RouteKind::Metrics),
            _ => None,
        };
        let mut line = log.then(|| AccessLine::new(&request, peer));
        // Kept to the end of the response body, so that an exported span lasts as long.
        let mut exported = None;
        let mut response = match (builtin, listener) {
            (Some(kind), _) => {
                note.route = kind;
                let (method, headers) = (request.method(), request.headers());
                self.builtin(registry, peer, listener, kind, method, headers)
                    .await
            }
            (None, Listener::Metrics) => ApiError::new(ErrorCode::Unsupported)
                .status(StatusCode::NOT_FOUND)
                .detail("this listener serves /metrics, /healthz and /readyz only")
                .into_response(),
            (None, Listener::Main) if export => {
                // OpenTelemetry takes a span's kind from this field when the span starts.
                let span = tracing::info_span!(
                    "request",
                    request_id = %note.request_id,
                    trace_id = line.as_ref().and_then(|l| l.trace_id.as_deref()),
                    otel.kind = "server",
                );
                crate::otel::adopt_parent(&span, request.headers());
                let path = request.uri().path().to_string();
                let response = super::handle(registry, peer, request, &mut note)
                    .instrument(span.clone())
                    .await;
                crate::otel::finish_request(
                    &span,
                    crate::otel::RequestSummary {
                        method: method.as_str(),
                        route: note.route.template(),
                        path: &path,
                        status: response.status().as_u16(),
                        repository: note.repository.as_deref(),
                        request_id: &note.request_id.to_string(),
                        error: note.error.map(|c| c.describe().0),
                    },
                );
                if let Some(line) = &mut line
                    && line.trace_id.is_none()
                {
                    line.trace_id = crate::otel::trace_id(&span);
                }
                exported = Some(span);
                response
            }
            (None, Listener::Main) => match &line {
                Some(line) => {
                    let tag = crate::logging::RequestTag {
                        request_id: note.request_id.clone(),
                        trace_id: line.trace_id.clone(),
                    };
                    let handled = super::handle(registry, peer, request, &mut note);
                    crate::logging::in_request(tag, handled).await
                }
                None => super::handle(registry, peer, request, &mut note).await,
            },
        };
        let status = response.status();
        if let Ok(id) = HeaderValue::try_from(note.request_id.to_string()) {
            response.headers_mut().insert(X_REQUEST_ID, id);
        }
        if record {
            self.record(&note, &method, status, started.elapsed());
        }
        if !(record || log || export) {
            return response;
        }
        let finish = Finish {
            span: exported,
            head: method == Method::HEAD,
            metrics: record.then(|| self.metrics.clone()),
            route: note.route,
            received,
            sent: 0,
            line: line.map(|line| {
                Box::new(AccessLine {
                    method,
                    status: status.as_u16(),
                    started,
                    note,
                    ..line
                })
            }),
        };
        let declared = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        response.map(|body| {
            let length = HttpBody::size_hint(&body).exact().or(declared);
            Body::new(ObservedBody {
                body,
                length,
                finish: Some(finish),
            })
        })
    }

    /// Counts one answered request in the metrics.
    fn record(&self, note: &Note, method: &Method, status: StatusCode, elapsed: Duration) {
        let m = &self.metrics;
        m.request(note.route, method, status.as_u16(), elapsed);
        let code = note.error.map(|c| c.describe().0);
        let repo = note.repository.as_deref();
        match (note.route, method) {
            (RouteKind::Manifest, &Method::PUT) => m.push(code, repo, elapsed),
            (RouteKind::Manifest, &Method::GET) => m.pull(code, repo, elapsed),
            _ => {}
        }
        let why = match (note.route, status) {
            (RouteKind::Token, StatusCode::UNAUTHORIZED) => Some(AuthFailure::BadCredentials),
            (RouteKind::Token, StatusCode::TOO_MANY_REQUESTS) => Some(AuthFailure::Throttled),
            _ => note.auth_failure,
        };
        if let Some(why) = why {
            m.auth_failure(why);
        }
    }

    async fn builtin(
        &self,
        registry: &Registry,
        peer: &Peer,
        listener: Listener,
        kind: RouteKind,
        method: &Method,
        headers: &HeaderMap,
    ) -> Response {
        if !matches!(*method, Method::GET | Method::HEAD) {
            return ApiError::new(ErrorCode::Unsupported)
                .status(StatusCode::METHOD_NOT_ALLOWED)
                .detail("only GET and HEAD")
                .into_response();
        }
        match kind {
            RouteKind::Healthz => json(StatusCode::OK, r#"{"status":"ok"}"#.to_string()),
            RouteKind::Readyz => self.readyz(registry).await,
            _ => {
                let open = listener == Listener::Metrics
                    || !self.settings.metrics_require_auth
                    || !registry.auth().enabled();
                if !open && !self.authenticated(registry, peer, headers).await {
                    self.metrics.auth_failure(AuthFailure::Missing);
                    return ApiError::new(ErrorCode::Unauthorized)
                        .header(header::WWW_AUTHENTICATE, "Basic realm=\"berth metrics\"")
                        .into_response();
                }
                self.refresh_gauges(registry).await;
                (
                    [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
                    self.metrics.encode(),
                )
                    .into_response()
            }
        }
    }

    /// Whether the request carries credentials of any account.
    async fn authenticated(&self, registry: &Registry, peer: &Peer, headers: &HeaderMap) -> bool {
        let Ok(credentials) = super::access::credentials(headers) else {
            return false;
        };
        if matches!(credentials, Credentials::None) {
            return false;
        }
        let subject = peer.client_cert_subject.as_deref();
        match registry
            .auth()
            .authenticate(&credentials, subject, Some(peer.addr.ip()))
            .await
        {
            Ok(principal) => !principal.is_anonymous(),
            Err(_) => false,
        }
    }

    /// 200 when both backends answered within the budget, else 503 naming what failed.
    async fn readyz(&self, registry: &Registry) -> Response {
        let probe = registry.probe(self.settings.probe_budget).await;
        let ready = probe.metadata.is_ok() && probe.storage.is_ok();
        let part = |r: &Result<(), String>| match r {
            Ok(()) => serde_json::Value::from("ok"),
            Err(e) => serde_json::Value::from(e.as_str()),
        };
        let body = serde_json::json!({
            "status": if ready { "ready" } else { "not ready" },
            "metadata": part(&probe.metadata),
            "storage": part(&probe.storage),
        });
        if !ready {
            tracing::warn!(
                metadata = ?probe.metadata,
                storage = ?probe.storage,
                "readiness probe failed"
            );
        }
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        json(status, body.to_string())
    }

    /// The gauges read at scrape time: the data directory's filesystem, and the blob total
    /// (reused for a minute: it is a scan of the blob table) with each namespace's usage.
    async fn refresh_gauges(&self, registry: &Registry) {
        if let Ok(fs) = rustix::fs::statvfs(&self.settings.data_dir) {
            let block = fs.f_frsize;
            self.metrics.set_disk(
                fs.f_bavail.saturating_mul(block),
                fs.f_blocks.saturating_mul(block),
            );
        }
        let mut cached = self.storage_used.lock().await;
        let fresh = cached.is_some_and(|(at, _)| at.elapsed() < STORAGE_USED_REFRESH);
        if !fresh {
            let budget = self.settings.probe_budget;
            match tokio::time::timeout(budget, registry.stored_blob_bytes()).await {
                Ok(Ok(bytes)) => {
                    *cached = Some((Instant::now(), bytes));
                    self.metrics.set_storage_used(bytes);
                }
                // The scrape still answers, with the last known total.
                Ok(Err(e)) => tracing::debug!(error = %e, "cannot total the stored blobs"),
                Err(_) => tracing::debug!("totalling the stored blobs timed out"),
            }
            match tokio::time::timeout(budget, registry.namespace_usage()).await {
                Ok(Ok(usage)) => self.metrics.set_namespace_usage(&usage),
                Ok(Err(e)) => tracing::debug!(error = %e, "cannot read the namespaces' usage"),
                Err(_) => tracing::debug!("reading the namespaces' usage timed out"),
            }
        }
    }
}

fn json(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The client's `X-Request-Id` if it is short and plain, so logs can be joined with the
/// client's; anything else is replaced by one of ours rather than echoed into logs.
fn request_id(headers: &HeaderMap) -> RequestId {
    headers
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|id| {
            !id.is_empty()
                && id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map_or_else(RequestId::generate, |id| RequestId::Client(id.to_string()))
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), if valid.
fn trace_id(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(TRACEPARENT)?.to_str().ok()?;
    let mut parts = value.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && hex(flags, 2)
        // Version 00 has exactly four fields; later versions may add more.
        && (version != "00" || parts.next().is_none());
    valid.then(|| trace.to_string())
}

/// What the access log line says, gathered as the request goes.
struct AccessLine {
    method: Method,
    /// Cloning a URI or a header value shares its bytes rather than copying them.
    uri: axum::http::Uri,
    client: IpAddr,
    /// The subject of a verified client certificate.
    client_cert: Option<String>,
    user_agent: Option<HeaderValue>,
    trace_id: Option<String>,
    status: u16,
    started: Instant,
    note: Note,
}

impl AccessLine {
    fn new(request: &axum::extract::Request, peer: &Peer) -> AccessLine {
        let headers = request.headers();
        AccessLine {
            method: Method::GET,
            uri: request.uri().clone(),
            client: peer.addr.ip(),
            client_cert: peer.client_cert_subject.clone(),
            user_agent: headers.get(header::USER_AGENT).cloned(),
            trace_id: trace_id(headers),
            status: 0,
            started: Instant::now(),
            note: Note::new(RequestId::Generated(0), false),
        }
    }

    fn write(&self, received: u64, sent: u64, completed: bool) {
        if !crate::logging::access_enabled() {
            return;
        }
        let note = &self.note;
        crate::logging::AccessRecord::new("request")
            .text("request_id", Some(&note.request_id))
            .str("trace_id", self.trace_id.as_deref())
            .text("method", Some(&self.method))
            .str("route", Some(note.route.template()))
            .text("path", Some(&self.uri.path()))
            .text(
                "query",
                self.uri
                    .query()
                    .as_ref()
                    .map(|q| q as &dyn std::fmt::Display),
            )
            .str("repository", note.repository.as_deref())
            .u64("status", u64::from(self.status))
            .str("error", note.error.map(|c| c.describe().0))
            .u64("bytes_in", received)
            .u64("bytes_out", sent)
            .millis("duration_ms", self.started.elapsed())
            .str("account", note.account.as_deref())
            .text("client", Some(&self.client))
            .str("client_cert", self.client_cert.as_deref())
            .str(
                "user_agent",
                self.user_agent.as_ref().and_then(|v| v.to_str().ok()),
            )
            .bool("completed", completed)
            .write();
    }
}

/// Settles a request once its response body ends or is dropped.
struct Finish {
    /// A HEAD's body is never sent, so its drop is its normal end.
    head: bool,
    metrics: Option<Arc<Metrics>>,
    route: RouteKind,
    received: Option<Arc<AtomicU64>>,
    sent: u64,
    line: Option<Box<AccessLine>>,
    /// The exported request span, which ends when this is dropped.
    span: Option<tracing::Span>,
}

impl Finish {
    fn done(self, completed: bool) {
        let received = self
            .received
            .as_ref()
            .map_or(0, |r| r.load(Ordering::Relaxed));
        if let Some(metrics) = &self.metrics {
            metrics.body_bytes(self.route, received, self.sent);
        }
        if let Some(line) = &self.line {
            line.write(received, self.sent, completed);
        }
        // The exported span ends with the response, after the access log line.
        drop(self.span);
    }
}

/// A request body that counts the bytes it delivers.
struct CountingBody {
    inner: Incoming,
    count: Option<Arc<AtomicU64>>,
}

impl HttpBody for CountingBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(frame))), Some(count)) = (&polled, &this.count)
            && let Some(data) = frame.data_ref()
        {
            count.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that counts the bytes it sends and settles the request at its end.
struct ObservedBody {
    body: Body,
    /// The body's length when known (hyper stops polling once it has sent that many bytes).
    length: Option<u64>,
    finish: Option<Finish>,
}

impl HttpBody for ObservedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(finish), Some(data)) = (&mut this.finish, frame.data_ref()) {
                    finish.sent += data.len() as u64;
                }
                let sent = this.finish.as_ref().map(|f| f.sent);
                if (this.body.is_end_stream() || (sent.is_some() && sent == this.length))
                    && let Some(finish) = this.finish.take()
                {
                    finish.done(true);
                }
            }
            Poll::Ready(None) => {
                if let Some(finish) = this.finish.take() {
                    finish.done(true);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(finish) = this.finish.take() {
                    finish.done(false);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        if let Some(finish) = self.finish.take() {
            // An empty body hyper never polled (a 201) or a HEAD's ended normally; any other
            // was cut short (the client hung up).
            let completed = finish.head
                || HttpBody::is_end_stream(&self.body)
                || Some(finish.sent) == self.length;
            finish.done(completed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_headers() {
        let cases = [
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            ),
            (
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
                Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
                None,
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                None,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                None,
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                None,
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                None,
            ),
            ("00-abc-00f067aa0ba902b7-01", None),
            ("garbage", None),
        ];
        for (value, want) in cases {
            let mut headers = HeaderMap::new();
            headers.insert(TRACEPARENT, HeaderValue::from_static(value));
            assert_eq!(trace_id(&headers).as_deref(), want, "{value}");
        }
    }

    #[test]
    fn request_ids_from_clients_are_kept_only_when_plain() {
        let cases = [
            ("abc-123_x.y:z", true),
            ("", false),
            ("has space", false),
            ("quote\"", false),
        ];
        for (value, kept) in cases {
            let mut headers = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(value) {
                headers.insert(X_REQUEST_ID, v);
            }
            let id = request_id(&headers);
            assert_eq!(
                matches!(&id, RequestId::Client(c) if c == value),
                kept,
                "{value:?}"
            );
        }
        let long = "a".repeat(65);
        let mut headers = HeaderMap::new();
        headers.insert(
            X_REQUEST_ID,
            HeaderValue::from_str(&long).unwrap_or(HeaderValue::from_static("x")),
        );
        assert!(matches!(request_id(&headers), RequestId::Generated(_)));
    }
}
