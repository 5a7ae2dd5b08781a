//! OpenTelemetry export of the request spans, built in with the `otel` feature and turned on by
//! `otel_endpoint`.
//!
//! Each request runs in the `request` tracing span that [`crate::api::observe`] opens; with
//! export on, a `tracing-opentelemetry` layer turns that span (and any span opened inside it)
//! into an OpenTelemetry span. [`adopt_parent`] makes a W3C `traceparent` its parent, so the
//! span joins the caller's trace; [`finish_request`] names it after the route template and adds
//! the semantic-convention attributes once the handler has answered; it ends when the response
//! body does.
//!
//! Export never makes a request wait: an ended span is handed to the SDK's batch processor with a
//! non-blocking send into a bounded queue ([`QUEUE_SPANS`]); a full queue drops the span (the
//! SDK counts the drops and logs the total at shutdown). The processor's own thread sends
//! batches to the collector; the HTTP exchange runs as a task on the server's runtime (see
//! [`RuntimeClient`]) and is bounded by [`EXPORT_TIMEOUT`], so a collector that is slow or down
//! only delays that thread. [`Exporter::shutdown`] flushes what is queued, bounded by
//! [`SHUTDOWN_BUDGET`].
//!
//! Without the feature this module keeps only no-op stand-ins, so callers need no `cfg`.

use axum::http::HeaderMap;

/// What [`finish_request`] records on a request span.
pub struct RequestSummary<'a> {
    pub method: &'a str,
    /// The route template, never the raw path (one span name per endpoint).
    pub route: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub repository: Option<&'a str>,
    pub request_id: &'a str,
    /// The OCI error code of a failure.
    pub error: Option<&'a str>,
}

#[cfg(feature = "otel")]
pub use enabled::*;

#[cfg(not(feature = "otel"))]
pub use disabled::*;

#[cfg(not(feature = "otel"))]
mod disabled {
    use super::*;

    pub fn adopt_parent(_span: &tracing::Span, _headers: &HeaderMap) {}

    pub fn finish_request(_span: &tracing::Span, _summary: RequestSummary<'_>) {}

    pub fn trace_id(_span: &tracing::Span) -> Option<String> {
        None
    }
}

#[cfg(feature = "otel")]
mod enabled {
    use std::time::Duration;

    use opentelemetry::trace::{Status, TraceContextExt, TracerProvider as _};
    use opentelemetry::{KeyValue, propagation::TextMapPropagator};
    use opentelemetry_http::{Bytes, HeaderExtractor, HttpClient, HttpError, Request, Response};
    use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::Layer;
    use tracing_subscriber::registry::LookupSpan;

    use super::*;

    /// Ended spans waiting for export; past this they are dropped, not waited for.
    pub const QUEUE_SPANS: usize = 2048;
    /// Bound on one export (connect, send, answer, with the exporter's retries).
    pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
    /// Bound on the last flush when the server stops.
    pub const SHUTDOWN_BUDGET: Duration = Duration::from_secs(5);

    /// The span pipeline: tracer provider, batch processor and OTLP/HTTP exporter.
    pub struct Exporter {
        provider: SdkTracerProvider,
    }

    impl Exporter {
        /// Starts the batch processor's thread; sends nothing until spans end. `endpoint` is
        /// the collector's base URL; spans go to `ENDPOINT/v1/traces` as protobuf.
        pub fn start(endpoint: &str, runtime: tokio::runtime::Handle) -> Result<Exporter, String> {
            let client = reqwest::Client::builder()
                .timeout(EXPORT_TIMEOUT)
                .connect_timeout(EXPORT_TIMEOUT / 2)
                // A collector answers; a redirect is a misconfiguration, not a hop.
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(|e| format!("building the OTLP HTTP client: {e}"))?;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(RuntimeClient { client, runtime })
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(format!("{endpoint}/v1/traces"))
                .with_timeout(EXPORT_TIMEOUT)
                .build()
                .map_err(|e| format!("building the OTLP exporter: {e}"))?;
            // OTEL_BSP_SCHEDULE_DELAY and the batch size stay the operator's (the SDK reads
            // them); the queue bound is ours.
            let batch = BatchConfigBuilder::default()
                .with_max_queue_size(QUEUE_SPANS)
                .build();
            let processor = BatchSpanProcessor::builder(exporter)
                .with_batch_config(batch)
                .build();
            let mut resource = Resource::builder()
                .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
            // OTEL_SERVICE_NAME, when set, names the service (the SDK reads it).
            if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
                resource = resource.with_service_name("berth");
            }
            let provider = SdkTracerProvider::builder()
                .with_span_processor(processor)
                .with_resource(resource.build())
                .build();
            Ok(Exporter { provider })
        }

        /// The tracing layer that turns berth's spans into OpenTelemetry spans. It sees spans
        /// at `info` and above from berth itself whatever `RUST_LOG` says (that filter is the
        /// log's), and events at `warn` and above, which become span events.
        pub fn layer<S>(&self) -> impl Layer<S> + Send + Sync + 'static
        where
            S: tracing::Subscriber + for<'span> LookupSpan<'span> + Send + Sync,
        {
            let filter = tracing_subscriber::filter::filter_fn(|meta| {
                if meta.is_span() {
                    meta.target().starts_with("berth") && *meta.level() <= tracing::Level::INFO
                } else {
                    *meta.level() <= tracing::Level::WARN
                }
            })
            .with_max_level_hint(tracing::level_filters::LevelFilter::INFO);
            tracing_opentelemetry::layer()
                .with_tracer(self.provider.tracer("berth"))
                .with_location(false)
                .with_threads(false)
                .with_target(false)
                .with_level(false)
                .with_filter(filter)
        }

        /// Exports what is queued, then stops the processor; gives up after
        /// [`SHUTDOWN_BUDGET`] (a collector that is down must not hold up the stop).
        pub async fn shutdown(self) {
            let provider = self.provider;
            // The SDK waits on a channel; off the async threads, which the last export needs.
            let stopped = tokio::task::spawn_blocking(move || {
                provider.shutdown_with_timeout(SHUTDOWN_BUDGET)
            })
            .await;
            match stopped {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "flushing spans to the collector"),
                Err(e) => tracing::warn!(error = %e, "flushing spans to the collector"),
            }
        }
    }

    /// Makes the caller's span, named by a W3C `traceparent`, the parent of `span`; without a
    /// valid one the span starts a trace of its own. Call before the span is first entered.
    pub fn adopt_parent(span: &tracing::Span, headers: &HeaderMap) {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        if parent.span().span_context().is_valid() {
            // Fails only when export is off (no layer) or the span is disabled: nothing to do.
            let _ = span.set_parent(parent);
        }
    }

    /// Names the span `METHOD ROUTE` and records the answer, following OpenTelemetry's HTTP
    /// server conventions; a 5xx marks the span as failed (a 4xx is the client's).
    pub fn finish_request(span: &tracing::Span, summary: RequestSummary<'_>) {
        let cx = span.context();
        let otel = cx.span();
        if !otel.is_recording() {
            return;
        }
        otel.update_name(format!("{} {}", summary.method, summary.route));
        otel.set_attributes([
            KeyValue::new("http.request.method", summary.method.to_string()),
            KeyValue::new("http.route", summary.route.to_string()),
            KeyValue::new("url.path", summary.path.to_string()),
            KeyValue::new("http.response.status_code", i64::from(summary.status)),
            KeyValue::new("berth.request_id", summary.request_id.to_string()),
        ]);
        if let Some(repository) = summary.repository {
            otel.set_attribute(KeyValue::new("berth.repository", repository.to_string()));
        }
        if let Some(code) = summary.error {
            otel.set_attribute(KeyValue::new("error.type", code.to_string()));
        }
        if summary.status >= 500 {
            otel.set_status(Status::error(
                summary.error.unwrap_or("server error").to_string(),
            ));
        }
    }

    /// The span's trace id (hex), for the access log of a request that brought none.
    pub fn trace_id(span: &tracing::Span) -> Option<String> {
        let cx = span.context();
        let context = cx.span().span_context().clone();
        context.is_valid().then(|| context.trace_id().to_string())
    }

    /// Sends the exporter's requests with the server's reqwest client, as tasks on the server's
    /// runtime. The batch processor runs exports on a thread of its own, outside any runtime,
    /// where reqwest cannot run; a task handle can be awaited from anywhere. This keeps one
    /// HTTP client, one TLS stack and one runtime in the process.
    #[derive(Debug)]
    struct RuntimeClient {
        client: reqwest::Client,
        runtime: tokio::runtime::Handle,
    }

    #[async_trait::async_trait]
    impl HttpClient for RuntimeClient {
        async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
            let client = self.client.clone();
            let exchange = self.runtime.spawn(async move {
                let request = reqwest::Request::try_from(request)?;
                let response = client.execute(request).await?;
                let mut answer = Response::builder().status(response.status());
                if let Some(headers) = answer.headers_mut() {
                    *headers = response.headers().clone();
                }
                // The client's timeout covers the body too.
                let body = response.bytes().await?;
                Ok::<_, HttpError>(answer.body(body)?)
            });
            exchange.await?
        }
    }
}
