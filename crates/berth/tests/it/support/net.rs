//! Raw sockets for tests that misbehave on purpose (partial headers, short bodies, idle
//! connections), and a look at a process's open file descriptors.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// A TCP connection to `host` (`127.0.0.1:PORT`) that has sent nothing yet.
pub fn connect(host: &str) -> TcpStream {
    let addr: SocketAddr = host.parse().expect("host is an address");
    TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect")
}

/// `n` connections that have sent nothing.
pub fn idle_connections(host: &str, n: usize) -> Vec<TcpStream> {
    (0..n).map(|_| connect(host)).collect()
}

/// `n` connections that each sent the start of a request's headers and then stall (slowloris).
pub fn stalled_header_connections(host: &str, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let mut s = connect(host);
            s.write_all(format!("GET /v2/ HTTP/1.1\r\nHost: {host}\r\nX-Slow: ").as_bytes())
                .expect("send partial header");
            s
        })
        .collect()
}

/// How a connection ended, as seen by a client waiting on it.
#[derive(Debug)]
pub enum Ended {
    /// The server closed it (EOF or reset) after `after`; `bytes` is what it sent first.
    Closed { after: Duration, bytes: Vec<u8> },
    /// Still open at the deadline.
    Open { bytes: Vec<u8> },
}

impl Ended {
    pub fn is_closed(&self) -> bool {
        matches!(self, Ended::Closed { .. })
    }

    /// The status code of the response the server sent before closing, if any.
    pub fn status(&self) -> Option<u16> {
        let bytes = match self {
            Ended::Closed { bytes, .. } | Ended::Open { bytes } => bytes,
        };
        response_status(bytes)
    }
}

/// Reads (and keeps) whatever the server sends until it closes the connection or `deadline`
/// passes. `since` is when the wait began, for [`Ended::Closed::after`].
pub fn wait_closed(stream: &mut TcpStream, since: Instant, deadline: Instant) -> Ended {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ended::Open { bytes };
        }
        stream
            .set_read_timeout(Some(deadline - now))
            .expect("set read timeout");
        match stream.read(&mut buf) {
            Ok(0) => {
                return Ended::Closed {
                    after: since.elapsed(),
                    bytes,
                };
            }
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => {
                return Ended::Closed {
                    after: since.elapsed(),
                    bytes,
                };
            }
        }
    }
}

/// The status code of an HTTP/1.1 response that starts `bytes`.
pub fn response_status(bytes: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(bytes.get(..12)?).ok()?;
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// Sends a whole request on `stream` and reads one response (head and a `Content-Length`
/// body), leaving the connection open. Returns the status.
pub fn request_keep_alive(stream: &mut TcpStream, request: &str) -> u16 {
    stream.write_all(request.as_bytes()).expect("send request");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("set read timeout");
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = find(&bytes, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().expect("content-length"));
            if bytes.len() >= end + 4 + length {
                return response_status(&bytes).expect("a status line");
            }
        }
        let n = stream.read(&mut buf).expect("read response");
        assert!(n > 0, "connection closed mid-response: {bytes:?}");
        bytes.extend_from_slice(&buf[..n]);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// How many file descriptors process `pid` has open (Linux).
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(Path::new("/proc").join(pid.to_string()).join("fd"))
        .map(|d| d.count())
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/fd: {e}"))
}

/// The soft open-file limit of this test process (`ulimit -n`).
pub fn own_fd_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}

/// Fails the test early, with the reason, if this process cannot open `sockets` more sockets
/// besides what the other tests running beside it use.
#[track_caller]
pub fn require_fd_room(sockets: usize) {
    let limit = own_fd_limit();
    assert!(
        limit >= sockets as u64 + 2048,
        "this test opens {sockets} sockets; raise the open-file limit (ulimit -n is {limit})"
    );
}
