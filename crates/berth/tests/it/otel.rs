//! OpenTelemetry export (the `otel` feature) end to end: a collector of the test's own, a plain
//! HTTP listener on 127.0.0.1 that keeps what is POSTed to `/v1/traces`, must receive the span of
//! a manifest GET that curl sent with a `traceparent`, in the caller's trace and under the
//! caller's span; and a collector that never answers must cost requests nothing and the stop no
//! more than its bound.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::{TestApp, push_image};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN_ID: &str = "00f067aa0ba902b7";
/// OTLP's `Span.SpanKind.SPAN_KIND_SERVER`.
const KIND_SERVER: u64 = 2;

/// A collector: answers every request 200 (or, when `stuck`, reads it and never answers) and
/// keeps the bodies POSTed to /v1/traces.
struct Collector {
    url: String,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Collector {
    fn start(stuck: bool) -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the collector");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let kept = bodies.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let kept = kept.clone();
                std::thread::spawn(move || serve_connection(stream, &kept, stuck));
            }
        });
        Collector { url, bodies }
    }

    fn spans(&self) -> Vec<Span> {
        let bodies = self.bodies.lock().expect("bodies").clone();
        bodies.iter().flat_map(|b| export_request(b)).collect()
    }

    /// The spans of one trace, once at least one has arrived (or none after 20 s).
    fn wait_for_trace(&self, trace_id: &str) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let spans: Vec<Span> = self
                .spans()
                .into_iter()
                .filter(|s| s.trace_id == trace_id)
                .collect();
            if !spans.is_empty() || Instant::now() >= deadline {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// HTTP/1.1 with keep-alive, as much as an OTLP exporter uses: a head, a Content-Length body.
fn serve_connection(stream: TcpStream, kept: &Mutex<Vec<Vec<u8>>>, stuck: bool) {
    let mut writer = stream.try_clone().expect("clone the stream");
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().expect("content-length");
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if stuck {
            // Hold the connection open and say nothing, like a collector that hangs.
            std::thread::sleep(Duration::from_secs(600));
            return;
        }
        if request_line.starts_with("POST /v1/traces ") {
            kept.lock().expect("bodies").push(body);
        }
        let answer =
            "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
        if writer.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// One exported span, as far as these tests look at it.
#[derive(Debug, Clone)]
struct Span {
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    kind: u64,
    /// Values as text (integers in decimal).
    attributes: HashMap<String, String>,
    /// The resource's attributes (service.name, ...).
    resource: HashMap<String, String>,
}

/// A protobuf field: its number and its value (varints and fixed-width numbers as u64).
enum Field<'a> {
    Number(u64),
    Bytes(&'a [u8]),
}

/// The fields of one protobuf message, in order; just enough of the wire format for OTLP.
fn fields(mut buf: &[u8]) -> Vec<(u64, Field<'_>)> {
    fn varint(buf: &mut &[u8]) -> u64 {
        let mut value = 0;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = buf.split_first().expect("truncated varint");
            *buf = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
        }
        value
    }
    let mut out = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf);
        let field = match key & 7 {
            0 => Field::Number(varint(&mut buf)),
            1 => {
                let (bytes, rest) = buf.split_at(8);
                buf = rest;
                Field::Number(u64::from_le_bytes(bytes.try_into().expect("8 bytes")))
            }
            2 => {
                let len = varint(&mut buf) as usize;
                let (bytes, rest) = buf.split_at(len);
                buf = rest;
                Field::Bytes(bytes)
            }
            5 => {
                let (bytes, rest) = buf.split_at(4);
                buf = rest;
                Field::Number(u64::from(u32::from_le_bytes(
                    bytes.try_into().expect("4 bytes"),
                )))
            }
            wire => panic!("unexpected wire type {wire}"),
        };
        out.push((key >> 3, field));
    }
    out
}

/// The message-typed fields numbered `number`.
fn messages(buf: &[u8], number: u64) -> Vec<&[u8]> {
    fields(buf)
        .into_iter()
        .filter_map(|(n, f)| match f {
            Field::Bytes(b) if n == number => Some(b),
            _ => None,
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `KeyValue` messages (key = 1, value = 2: an `AnyValue`, string = 1, int = 3) as text.
fn attributes(kvs: Vec<&[u8]>) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for kv in kvs {
        let (mut key, mut value) = (String::new(), String::new());
        for (n, f) in fields(kv) {
            match (n, f) {
                (1, Field::Bytes(k)) => key = String::from_utf8_lossy(k).into_owned(),
                (2, Field::Bytes(any)) => {
                    for (m, v) in fields(any) {
                        match (m, v) {
                            (1, Field::Bytes(s)) => value = String::from_utf8_lossy(s).into_owned(),
                            (3, Field::Number(i)) => value = (i as i64).to_string(),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        out.insert(key, value);
    }
    out
}

/// The spans of an `ExportTraceServiceRequest`: resource_spans = 1 { resource = 1 {
/// attributes = 1 }, scope_spans = 2 { spans = 2 } }.
fn export_request(body: &[u8]) -> Vec<Span> {
    let mut spans = Vec::new();
    for resource_spans in messages(body, 1) {
        let resource = attributes(
            messages(resource_spans, 1)
                .into_iter()
                .flat_map(|r| messages(r, 1))
                .collect(),
        );
        for scope_spans in messages(resource_spans, 2) {
            for span in messages(scope_spans, 2) {
                let mut s = Span {
                    trace_id: String::new(),
                    span_id: String::new(),
                    parent_span_id: String::new(),
                    name: String::new(),
                    kind: 0,
                    attributes: attributes(messages(span, 9)),
                    resource: resource.clone(),
                };
                for (n, f) in fields(span) {
                    match (n, f) {
                        (1, Field::Bytes(b)) => s.trace_id = hex(b),
                        (2, Field::Bytes(b)) => s.span_id = hex(b),
                        (4, Field::Bytes(b)) => s.parent_span_id = hex(b),
                        (5, Field::Bytes(b)) => s.name = String::from_utf8_lossy(b).into_owned(),
                        (6, Field::Number(k)) => s.kind = k,
                        _ => {}
                    }
                }
                spans.push(s);
            }
        }
    }
    spans
}

/// curl's GET of `url` with these headers; returns the status and the response headers.
fn curl_get(url: &str, headers: &[&str]) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-o", "/dev/null", "-D", "-", "-w", "%{http_code}"]);
    for h in headers {
        cmd.arg("-H").arg(h);
    }
    let out = cmd
        .arg(url)
        .output()
        .expect("run curl (apt-get install curl)");
    assert!(out.status.success(), "curl: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .parse()
        .unwrap_or(0);
    (status, text)
}

#[test]
fn a_manifest_get_exports_a_server_span_in_the_callers_trace() {
    let collector = Collector::start(false);
    let app = TestApp::builder()
        .arg("--otel-endpoint")
        .arg(&collector.url)
        // Export within 100 ms instead of the SDK's 5 s, so the test need not wait.
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start();
    push_image(&app, "otel/app", "v1", "otel");

    let url = app.url("/v2/otel/app/manifests/v1");
    let traceparent = format!("traceparent: 00-{TRACE_ID}-{PARENT_SPAN_ID}-01");
    let accept = "accept: application/vnd.oci.image.manifest.v1+json";
    let (status, _) = curl_get(&url, &[&traceparent, accept, "x-request-id: otel-test-1"]);
    assert_eq!(status, 200);

    let spans = collector.wait_for_trace(TRACE_ID);
    assert_eq!(spans.len(), 1, "one span for the one request: {spans:#?}");
    let span = &spans[0];
    assert_eq!(span.parent_span_id, PARENT_SPAN_ID, "{span:#?}");
    assert_ne!(span.span_id, PARENT_SPAN_ID, "{span:#?}");
    assert_eq!(span.kind, KIND_SERVER, "{span:#?}");
    assert_eq!(span.name, "GET /v2/{name}/manifests/{reference}");
    let expected = [
        ("http.request.method", "GET"),
        ("http.route", "/v2/{name}/manifests/{reference}"),
        ("http.response.status_code", "200"),
        ("url.path", "/v2/otel/app/manifests/v1"),
        ("berth.repository", "otel/app"),
        ("berth.request_id", "otel-test-1"),
    ];
    for (key, value) in expected {
        assert_eq!(
            span.attributes.get(key).map(String::as_str),
            Some(value),
            "{key}: {span:#?}"
        );
    }
    assert_eq!(
        span.resource.get("service.name").map(String::as_str),
        Some("berth")
    );

    // Without a traceparent the span starts a trace of its own; a failure names its code.
    let (status, head) = curl_get(&app.url("/v2/otel/app/manifests/nope"), &[]);
    assert_eq!(status, 404);
    let request_id = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("x-request-id")
                .then(|| value.trim().to_string())
        })
        .expect("x-request-id header");
    let deadline = Instant::now() + Duration::from_secs(20);
    let span = loop {
        let found = collector
            .spans()
            .into_iter()
            .find(|s| s.attributes.get("berth.request_id") == Some(&request_id));
        match found {
            Some(span) => break span,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            None => panic!("no span for request {request_id}: {:#?}", collector.spans()),
        }
    };
    assert_ne!(span.trace_id, TRACE_ID);
    assert_eq!(span.parent_span_id, "", "{span:#?}");
    assert_eq!(
        span.attributes
            .get("http.response.status_code")
            .map(String::as_str),
        Some("404")
    );
    assert_eq!(
        span.attributes.get("error.type").map(String::as_str),
        Some("MANIFEST_UNKNOWN")
    );
}

#[test]
fn a_collector_that_never_answers_costs_requests_nothing_and_the_stop_is_bounded() {
    let collector = Collector::start(true);
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("berth.log");
    let mut app = TestApp::builder()
        .arg("--otel-endpoint")
        .arg(&collector.url)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        // One span per export, so that the queue fills while the collector hangs.
        .env("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1")
        .stderr_to(&log)
        .start();
    push_image(&app, "otel/stuck", "v1", "stuck");

    // More spans than the queue holds (2,048) while the exporter waits on the collector: the
    // surplus is dropped, never waited for.
    let client = app.client();
    let url = app.url("/v2/otel/stuck/manifests/v1");
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for _ in 0..2200 {
        let t = Instant::now();
        let r = client
            .head(&url)
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .expect("HEAD");
        assert_eq!(r.status().as_u16(), 200);
        slowest = slowest.max(t.elapsed());
    }
    // An export waits up to 5 s on this collector; no request may have waited for one.
    assert!(
        slowest < Duration::from_secs(3),
        "slowest request {slowest:?} (all: {:?})",
        started.elapsed()
    );

    app.send_sigterm();
    let status = app
        .wait_exit(Duration::from_secs(20))
        .expect("berth did not stop within 20 s with a stuck collector");
    assert!(status.success(), "{status:?}");
    let text = std::fs::read_to_string(&log).expect("read the log");
    assert!(
        text.contains("dropped_span_count"),
        "the SDK reports the spans it dropped at shutdown:\n{text}"
    );
}
