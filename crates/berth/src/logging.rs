//! Where log lines go: stderr, with the access log's lines gathered first. A busy registry
//! writes one access log line per request, and a write system call for each was much of the
//! access log's cost (bench/observe.sh: manifest GET on/off 0.68 before, 0.78 after). So lines of the target `berth::access` are appended
//! to a buffer that is written out when it reaches [`FLUSH_BYTES`], every [`FLUSH_EVERY`] (a
//! background thread), before any other line (so the order holds), and by [`flush`] at exit.
//! The price: a process killed with SIGKILL loses up to [`FLUSH_EVERY`] of access log lines.

use std::io::{self, Write};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// The access log's target.
pub const ACCESS_TARGET: &str = "berth::access";
/// Buffered access log lines are written out at least this often.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// ... and whenever this many bytes are waiting.
pub const FLUSH_BYTES: usize = 64 * 1024;

/// The process's log sink (stderr).
pub static STDERR: Sink = Sink {
    buffer: Mutex::new(Vec::new()),
};

pub struct Sink {
    buffer: Mutex<Vec<u8>>,
}

impl Sink {
    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        // A panic while appending leaves at worst a partial line.
        self.buffer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes out what is buffered.
    pub fn flush(&self) {
        let mut buffer = self.lock();
        write_out(&mut buffer);
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
}

fn write_out(buffer: &mut Vec<u8>) {
    if !buffer.is_empty() {
        // Nowhere to report a failure to write the log.
        let _ = io::stderr().write_all(buffer);
        buffer.clear();
    }
}

/// One log line on its way to [`Sink`].
pub struct LineWriter {
    sink: &'static Sink,
    buffered: bool,
}

impl Write for LineWriter {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut buffer = self.sink.lock();
        if self.buffered {
            buffer.extend_from_slice(line);
            if buffer.len() >= FLUSH_BYTES {
                write_out(&mut buffer);
            }
        } else {
            write_out(&mut buffer);
            io::stderr().write_all(line)?;
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
