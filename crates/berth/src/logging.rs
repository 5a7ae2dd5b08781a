//! Where log lines go: stderr, with the access log's lines gathered first. A busy registry
//! writes one access log line per request, and a write system call for each was much of the
//! access log's cost (bench/observe.sh: manifest GET on/off 0.68 before, 0.78 after). So lines
//! of the target `berth::access` are appended to a buffer that is written out when it reaches
//! [`FLUSH_BYTES`], every [`FLUSH_EVERY`] (a background thread), before any other line (so the
//! order holds), and by [`flush`] at exit. The price: a process killed with SIGKILL loses up to
//! [`FLUSH_EVERY`] of access log lines.
//!
//! The access log's lines are also formatted here ([`AccessRecord`]) rather than by
//! tracing's formatter, in the same two forms (`log_format`): a perf profile under wrk had
//! that formatter's field visitors and padding as the largest part of the access log's cost.
//! They still obey `RUST_LOG` ([`access_enabled`]).
//!
//! Every other line logged while a request is handled carries that request's id (and the
//! trace id of its `traceparent`): the handler runs inside [`in_request`], and the log's
//! formatter ([`WithRequest`]) appends them. A tracing span per request did the same at
//! about 4 us of CPU per request, most of the access log's remaining cost under wrk.

use std::fmt::{self as stdfmt, Display};
use std::future::Future;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

use crate::service::RequestId;

/// The access log's target.
pub const ACCESS_TARGET: &str = "berth::access";
/// Buffered access log lines are written out at least this often.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// ... and whenever this many bytes are waiting.
pub const FLUSH_BYTES: usize = 64 * 1024;

/// The process's log sink (stderr).
pub static STDERR: Sink = Sink {
    buffer: Mutex::new(Vec::new()),
    output: Mutex::new(Vec::new()),
};

/// Lines wait in `buffer`; a flush swaps them into `output` and writes them from there, so
/// that appending goes on while the write system call runs. The locks are always taken in
/// that order, which keeps the lines in order.
pub struct Sink {
    buffer: Mutex<Vec<u8>>,
    output: Mutex<Vec<u8>>,
}

/// A panic while appending leaves at worst a partial line.
fn lock(m: &Mutex<Vec<u8>>) -> MutexGuard<'_, Vec<u8>> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Sink {
    /// Writes out what is buffered.
    pub fn flush(&self) {
        self.drain(lock(&self.buffer), None);
    }

    /// Writes out what `buffer` holds, then `then` if given, releasing `buffer` first.
    fn drain(&self, mut buffer: MutexGuard<'_, Vec<u8>>, then: Option<&[u8]>) {
        if buffer.is_empty() && then.is_none() {
            return;
        }
        let mut output = lock(&self.output);
        std::mem::swap(&mut *buffer, &mut *output);
        drop(buffer);
        // Nowhere to report a failure to write the log.
        let mut stderr = io::stderr().lock();
        if !output.is_empty() {
            let _ = stderr.write_all(&output);
            output.clear();
        }
        if let Some(line) = then {
            let _ = stderr.write_all(line);
        }
    }

    /// Starts the thread that flushes every [`FLUSH_EVERY`]; it lives as long as the process.
    pub fn start_flusher(&'static self) {
        let spawned = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(FLUSH_EVERY);
                    self.flush();
                }
            });
        if let Err(e) = spawned {
            // Without the thread lines still go out when the buffer fills or another line
            // is written; say so once.
            let _ = writeln!(io::stderr(), "cannot start the log flusher: {e}");
        }
    }

    /// Appends one buffered line (see [`LineWriter`]).
    fn append(&self, line: &[u8]) {
        let mut buffer = lock(&self.buffer);
        buffer.extend_from_slice(line);
        if buffer.len() >= FLUSH_BYTES {
            self.drain(buffer, None);
        }
    }

    /// Writes one line at once, after the lines buffered before it.
    fn write_now(&self, line: &[u8]) {
        self.drain(lock(&self.buffer), Some(line));
    }
}

/// One log line on its way to [`Sink`].
pub struct LineWriter {
    sink: &'static Sink,
    buffered: bool,
}

impl Write for LineWriter {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        if self.buffered {
            self.sink.append(line);
        } else {
            self.sink.write_now(line);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for &'static Sink {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter {
            sink: self,
            buffered: false,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> LineWriter {
        LineWriter {
            sink: self,
            buffered: meta.target() == ACCESS_TARGET,
        }
    }
}

/// The access log is JSON (`log_format = "json"`) rather than text.
static ACCESS_JSON: AtomicBool = AtomicBool::new(false);

/// Sets the form of the access log's lines, with the rest of the log's, at startup.
pub fn set_access_json(json: bool) {
    ACCESS_JSON.store(json, Ordering::Relaxed);
}

/// Whether `RUST_LOG` lets the access log's lines through (tracing caches the answer per
/// filter, so asking costs little).
pub fn access_enabled() -> bool {
    tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO)
}

/// One access log line, in the shape tracing's formatter gives an event of the target
/// [`ACCESS_TARGET`] at level INFO: as text, `<time>  INFO berth::access: <message> k=v ...`
/// (strings quoted and escaped, other values bare); as JSON, one object with `timestamp`,
/// `level`, `fields` (the message and the fields) and `target`. A field given `None` is
/// left out. [`AccessRecord::write`] appends it to the process's log.
pub struct AccessRecord {
    line: Vec<u8>,
    json: bool,
}

// Writes to a Vec<u8> cannot fail: their results are ignored below.
impl AccessRecord {
    pub fn new(message: &str) -> AccessRecord {
        let json = ACCESS_JSON.load(Ordering::Relaxed);
        let mut line = Vec::with_capacity(512);
        let now = crate::time::Rfc3339Micros(SystemTime::now());
        if json {
            let _ = write!(
                line,
                r#"{{"timestamp":"{now}","level":"INFO","fields":{{"message":"#
            );
            let _ = serde_json::to_writer(&mut line, message);
        } else {
            let _ = write!(line, "{now}  INFO {ACCESS_TARGET}: {message}");
        }
        AccessRecord { line, json }
    }

    fn name(&mut self, name: &str) {
        if self.json {
            let _ = write!(self.line, r#","{name}":"#);
        } else {
            let _ = write!(self.line, " {name}=");
        }
    }

    /// A string: quoted and escaped in both forms.
    pub fn str(&mut self, name: &str, value: Option<&str>) -> &mut Self {
        if let Some(value) = value {
            self.name(name);
            if self.json {
                let _ = serde_json::to_writer(&mut self.line, value);
            } else {
                let _ = write!(self.line, "{value:?}");
            }
        }
        self
    }

    /// A value shown as text: bare in the text form (ids, methods, paths and addresses hold
    /// no spaces; one that does is quoted), a string in JSON.
    pub fn text(&mut self, name: &str, value: Option<&dyn Display>) -> &mut Self {
        if let Some(value) = value {
            self.name(name);
            if self.json {
                let _ = serde_json::to_writer(&mut self.line, &format_args!("{value}"));
            } else {
                let start = self.line.len();
                let _ = write!(self.line, "{value}");
                let plain = self.line[start..]
                    .iter()
                    .all(|b| b.is_ascii_graphic() && *b != b'"' && *b != b'\\');
                if !plain {
                    let shown = String::from_utf8_lossy(&self.line[start..]).into_owned();
                    self.line.truncate(start);
                    let _ = write!(self.line, "{shown:?}");
                }
            }
        }
        self
    }

    pub fn u64(&mut self, name: &str, value: u64) -> &mut Self {
        self.name(name);
        let _ = write!(self.line, "{value}");
        self
    }

    /// A duration in milliseconds, to the microsecond (`12.345`): a number in both forms.
    pub fn millis(&mut self, name: &str, value: Duration) -> &mut Self {
        self.name(name);
        let micros = value.as_micros();
        let _ = write!(self.line, "{}.{:03}", micros / 1000, micros % 1000);
        self
    }

    pub fn bool(&mut self, name: &str, value: bool) -> &mut Self {
        self.name(name);
        let _ = write!(self.line, "{value}");
        self
    }

    /// Ends the line and appends it to the log (buffered, as tracing's access lines were).
    pub fn write(&mut self) {
        if self.json {
            let _ = write!(self.line, r#"}},"target":"{ACCESS_TARGET}"}}"#);
        }
        self.line.push(b'\n');
        STDERR.append(&self.line);
    }
}

/// The request a task is handling, for the log lines it writes.
#[derive(Clone)]
pub struct RequestTag {
    pub request_id: RequestId,
    pub trace_id: Option<String>,
}

tokio::task_local! {
    static REQUEST: RequestTag;
}

/// Runs `handler` as the handling of the request `tag` names: [`WithRequest`] adds the tag to
/// every line it logs (tasks it spawns are on their own).
pub async fn in_request<F: Future>(tag: RequestTag, handler: F) -> F::Output {
    REQUEST.scope(tag, handler).await
}

/// A log line formatter that adds the request being handled, if any, to what `F` writes:
/// ` request_id=... trace_id=...` at the end of a text line, `"request_id"` and `"trace_id"`
/// members of a JSON line's object. An event that names the request itself (`request.id`, as
/// the service's change events do) keeps its own.
pub struct WithRequest<F> {
    pub inner: F,
    pub json: bool,
}

impl<S, N, F> FormatEvent<S, N> for WithRequest<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> stdfmt::Result {
        let Ok(tag) = REQUEST.try_with(RequestTag::clone) else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let named = event.metadata().fields().field("request.id").is_some();
        let request_id = (!named).then_some(&tag.request_id);
        let end = if self.json {
            line.trim_end().len().saturating_sub(1)
        } else {
            line.trim_end().len()
        };
        let (head, tail) = line.split_at(end);
        writer.write_str(head)?;
        if self.json {
            if let Some(id) = request_id {
                let id = serde_json::to_string(&id.to_string()).map_err(|_| stdfmt::Error)?;
                write!(writer, r#","request_id":{id}"#)?;
            }
            if let Some(trace) = &tag.trace_id {
                let trace = serde_json::to_string(trace).map_err(|_| stdfmt::Error)?;
                write!(writer, r#","trace_id":{trace}"#)?;
            }
        } else {
            if let Some(id) = request_id {
                write!(writer, " request_id={id}")?;
            }
            if let Some(trace) = &tag.trace_id {
                write!(writer, " trace_id={trace}")?;
            }
        }
        writer.write_str(tail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(json: bool) -> AccessRecord {
        let mut r = AccessRecord::new("request");
        r.json = json;
        r.line.clear();
        if json {
            r.line
                .extend_from_slice(br#"{"fields":{"message":"request""#);
        }
        r.text("id", Some(&"abc-1"))
            .text("path", Some(&"/v2/a b"))
            .str("agent", Some("x\"y\nz"))
            .str("missing", None)
            .u64("status", 200)
            .millis("ms", Duration::from_micros(1500))
            .bool("done", true);
        r
    }

    #[test]
    fn access_lines_as_text() {
        let r = record(false);
        assert_eq!(
            String::from_utf8_lossy(&r.line),
            r#" id=abc-1 path="/v2/a b" agent="x\"y\nz" status=200 ms=1.500 done=true"#
        );
    }

    #[test]
    fn access_lines_as_json() {
        let mut r = record(true);
        r.line.extend_from_slice(b"}}");
        let v: serde_json::Value = serde_json::from_slice(&r.line).expect("JSON");
        let f = &v["fields"];
        assert_eq!(f["message"], "request");
        assert_eq!(f["id"], "abc-1");
        assert_eq!(f["path"], "/v2/a b");
        assert_eq!(f["agent"], "x\"y\nz");
        assert!(f.get("missing").is_none());
        assert_eq!(f["status"], 200);
        assert_eq!(f["ms"], 1.5);
        assert_eq!(f["done"], true);
    }

    /// Log lines as `fmt` writes them with [`WithRequest`], gathered in memory.
    fn lines_logged(json: bool, log: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Gathered(std::sync::Arc<Mutex<Vec<u8>>>);
        impl Write for Gathered {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let gathered = Gathered::default();
        let sink = gathered.clone();
        let builder = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || sink.clone());
        let format = tracing_subscriber::fmt::format();
        let dispatch = if json {
            tracing::Dispatch::new(
                builder
                    .json()
                    .event_format(WithRequest {
                        inner: format.json(),
                        json: true,
                    })
                    .finish(),
            )
        } else {
            tracing::Dispatch::new(
                builder
                    .event_format(WithRequest {
                        inner: format,
                        json: false,
                    })
                    .finish(),
            )
        };
        tracing::dispatcher::with_default(&dispatch, log);
        let bytes = gathered
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn in_a_request() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        tracing::warn!(code = 1, "outside");
        let tag = RequestTag {
            request_id: RequestId::Client("req-7".into()),
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
        };
        runtime.block_on(in_request(tag, async {
            tracing::warn!(code = 2, "inside");
            tracing::info!(request.id = "req-7", "names itself");
        }));
    }

    #[test]
    fn lines_of_a_request_name_it_in_text() {
        let text = lines_logged(false, in_a_request);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].ends_with("outside code=1"), "{text}");
        assert!(
            lines[1].ends_with(
                "inside code=2 request_id=req-7 trace_id=4bf92f3577b34da6a3ce929d0e0e4736"
            ),
            "{text}"
        );
        assert_eq!(lines[2].matches("req-7").count(), 1, "{text}");
    }

    #[test]
    fn lines_of_a_request_name_it_in_json() {
        let text = lines_logged(true, in_a_request);
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].get("request_id").is_none(), "{text}");
        assert_eq!(lines[1]["request_id"], "req-7", "{text}");
        assert_eq!(lines[1]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(lines[1]["fields"]["code"], 2);
        assert!(lines[2].get("request_id").is_none(), "{text}");
        assert_eq!(lines[2]["fields"]["request.id"], "req-7");
    }
}
