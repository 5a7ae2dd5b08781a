//! Resources stay bounded whatever clients do: connections that never finish their headers,
//! keep-alive connections left idle, bodies shorter than announced, more connections than the
//! server will hold, and idle connections at shutdown.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::support::net::{
    Ended, connect, idle_connections, open_fds, request_keep_alive, require_fd_room,
    stalled_header_connections, wait_closed,
};
use crate::support::{TestApp, location_path, push_blob, sha256};

#[test]
fn a_thousand_stalled_headers_are_closed_after_the_header_timeout_while_others_are_served() {
    require_fd_room(1000);
    let timeout = Duration::from_secs(5);
    let app = TestApp::builder()
        .env(
            "BERTH_HEADER_READ_TIMEOUT_SECS",
            timeout.as_secs().to_string(),
        )
        .start();
    let began = Instant::now();
    let mut stalled = stalled_header_connections(&app.host, 1000);
    let opened_in = began.elapsed();

    // While all of them are open, a normal request is served at once.
    let asked = Instant::now();
    app.get("/v2/").assert_status(200);
    let answered_in = asked.elapsed();
    assert!(
        answered_in < Duration::from_secs(2),
        "GET /v2/ took {answered_in:?} with 1000 stalled connections open"
    );

    let deadline = Instant::now() + timeout + Duration::from_secs(10);
    let mut latest = Duration::ZERO;
    for (i, s) in stalled.iter_mut().enumerate() {
        match wait_closed(s, began, deadline) {
            Ended::Closed { after, .. } => latest = latest.max(after),
            Ended::Open { .. } => panic!("stalled connection {i} still open 15 s after the last"),
        }
    }
    eprintln!(
        "1000 stalled connections: opened in {opened_in:?}, GET /v2/ among them took \
         {answered_in:?}, the last closed {latest:?} after the first opened"
    );
    assert!(
        latest >= opened_in + timeout - Duration::from_secs(1),
        "the last stalled connection closed {latest:?} after the first opened, before the \
         {timeout:?} header timeout"
    );
    app.get("/v2/").assert_status(200);
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let app = TestApp::builder()
        .env("BERTH_HEADER_READ_TIMEOUT_SECS", "2")
        .start();
    let mut s = connect(&app.host);
    let request = format!("GET /v2/ HTTP/1.1\r\nHost: {}\r\n\r\n", app.host);
    assert_eq!(request_keep_alive(&mut s, &request), 200);
    // The connection is reusable ...
    assert_eq!(request_keep_alive(&mut s, &request), 200);
    // ... until it has been idle for the timeout.
    let idle_since = Instant::now();
    match wait_closed(&mut s, idle_since, idle_since + Duration::from_secs(10)) {
        Ended::Closed { after, bytes } => {
            assert!(
                after >= Duration::from_millis(1500),
                "closed after {after:?}"
            );
            assert!(
                bytes.is_empty() || bytes.starts_with(b"HTTP/1.1 408"),
                "unexpected bytes on an idle connection: {:?}",
                String::from_utf8_lossy(&bytes)
            );
            eprintln!("idle keep-alive connection closed after {after:?}");
        }
        Ended::Open { .. } => panic!("an idle keep-alive connection is still open after 10 s"),
    }
}

#[test]
fn a_body_shorter_than_its_content_length_is_aborted_and_the_upload_stays_usable() {
    let app = TestApp::builder()
        .env("BERTH_BODY_IDLE_TIMEOUT_SECS", "2")
        .start();
    let repo = "res/short-body";
    let location = app.start_upload(repo);
    let bytes: Vec<u8> = (0..100u8).collect();

    let mut s = connect(&app.host);
    let head = format!(
        "PATCH {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: 100\r\n\r\n",
        location_path(&location),
        app.host
    );
    s.write_all(head.as_bytes()).expect("send head");
    s.write_all(&bytes[..50]).expect("send half the body");
    let sent = Instant::now();
    let ended = wait_closed(&mut s, sent, sent + Duration::from_secs(15));
    let Ended::Closed { after, .. } = &ended else {
        panic!("a PATCH missing half its body is still open 15 s later: {ended:?}");
    };
    assert!(
        *after >= Duration::from_millis(1500),
        "answered after {after:?}, before the 2 s body timeout: {ended:?}"
    );
    if let Some(status) = ended.status() {
        assert_eq!(status, 400, "status of the aborted PATCH: {ended:?}");
    }
    eprintln!(
        "short body: answered {:?} and closed {after:?} after the last byte",
        ended.status()
    );

    // The upload is still there, holding at most the bytes that arrived, and can be finished.
    let status = app.get(&location_path(&location));
    status.assert_status(204);
    let have = match status.must_header("range") {
        "0-0" => 0,
        range => {
            let end: usize = range
                .strip_prefix("0-")
                .and_then(|e| e.parse().ok())
                .unwrap_or_else(|| panic!("Range {range:?}"));
            end + 1
        }
    };
    assert!(have <= 50, "the upload claims {have} bytes; 50 were sent");
    let reply = app.patch_chunk(&location, have, &bytes[have..]);
    reply.assert_status(202);
    let next = app.resolve(reply.must_header("location"));
    let digest = sha256(&bytes);
    app.finish_upload(&next, &digest, None).assert_status(201);
    let blob = app.get(&format!("/v2/{repo}/blobs/{digest}"));
    blob.assert_status(200);
    assert_eq!(blob.body, bytes);
}

#[test]
fn past_max_connections_new_connections_wait_and_file_descriptors_stay_bounded() {
    require_fd_room(200);
    let app = TestApp::builder()
        .env("BERTH_MAX_CONNECTIONS", "50")
        .env("BERTH_HEADER_READ_TIMEOUT_SECS", "1")
        .start();
    app.get("/v2/").assert_status(200);
    std::thread::sleep(Duration::from_millis(200));
    let baseline = open_fds(app.pid());

    let idle = idle_connections(&app.host, 200);
    // A client behind them in the backlog is served once the idle ones are reaped.
    let client = app.client();
    let url = app.url("/v2/");
    let started = Instant::now();
    let request = std::thread::spawn(move || {
        let status = client.get(&url).send().map(|r| r.status().as_u16());
        (status, started.elapsed())
    });
    let mut most = 0;
    while !request.is_finished() {
        most = most.max(open_fds(app.pid()));
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no answer 60 s after opening 200 idle connections"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, waited) = request.join().expect("request thread");
    assert_eq!(status.expect("GET /v2/ behind 200 idle connections"), 200);
    eprintln!(
        "max_connections=50, 200 idle connections: {baseline} fds before, at most {most} during; \
         a request behind them answered after {waited:?}"
    );
    assert!(
        most <= baseline + 50 + 5,
        "berth held {most} file descriptors ({baseline} before 200 idle connections, limit 50)"
    );
    drop(idle);
}

#[test]
fn under_a_1024_fd_limit_the_default_connection_limit_keeps_the_server_working() {
    require_fd_room(1100);
    let app = TestApp::builder()
        .fd_limit(1024)
        .env("BERTH_HEADER_READ_TIMEOUT_SECS", "2")
        .start();
    let opening = Instant::now();
    let idle = idle_connections(&app.host, 1100);
    let opened_in = opening.elapsed();
    let started = Instant::now();
    let app = std::sync::Arc::new(app);
    let pusher = {
        let app = app.clone();
        std::thread::spawn(move || {
            push_blob(&app, "res/fd-limit", b"pushed behind 1100 idle connections")
        })
    };
    let mut most = 0;
    while !pusher.is_finished() {
        most = most.max(open_fds(app.pid()));
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no answer 60 s after opening 1100 idle connections"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    pusher.join().expect("a push behind 1100 idle connections");
    eprintln!(
        "fd limit 1024, 1100 idle connections (opened in {opened_in:?}): at most {most} fds; \
         a push behind them took {:?}",
        started.elapsed()
    );
    assert!(
        most < 1000,
        "berth held {most} of its 1024 file descriptors"
    );
    drop(idle);
}

#[test]
fn sigterm_with_a_hundred_idle_connections_exits_0_promptly() {
    require_fd_room(100);
    let mut app = TestApp::start();
    std::thread::sleep(Duration::from_millis(200));
    let baseline = open_fds(app.pid());
    // 40 never sent a byte, 40 finished a request and wait for the next, 20 stall in their
    // first request's headers; none has a request in flight.
    let mut conns = idle_connections(&app.host, 40);
    let request = format!("GET /v2/ HTTP/1.1\r\nHost: {}\r\n\r\n", app.host);
    for _ in 0..40 {
        let mut s = connect(&app.host);
        assert_eq!(request_keep_alive(&mut s, &request), 200);
        conns.push(s);
    }
    conns.extend(stalled_header_connections(&app.host, 20));
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_fds(app.pid()) < baseline + 100 {
        assert!(
            Instant::now() < deadline,
            "berth did not accept 100 connections"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let term = Instant::now();
    app.send_sigterm();
    let exit = app
        .wait_exit(Duration::from_secs(40))
        .expect("berth still running 40 s after SIGTERM");
    let took = term.elapsed();
    eprintln!("SIGTERM with 100 idle connections: exited ({exit}) after {took:?}");
    assert!(exit.success(), "exit status: {exit}");
    assert!(
        took < Duration::from_secs(3),
        "berth took {took:?} to exit with only idle connections (grace is 30 s)"
    );
    for s in &mut conns {
        let now = Instant::now();
        assert!(wait_closed(s, now, now + Duration::from_secs(2)).is_closed());
    }
}

#[test]
fn requests_are_logged_with_path_query_status_and_duration() {
    let tmp = tempfile::tempdir().expect("tmp");
    let log = tmp.path().join("stderr.log");
    let mut cmd = crate::support::clean_command(tmp.path());
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(tmp.path().join("data"))
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log file"));
    let mut child = cmd.spawn().expect("spawn berth");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("first line");
    let base = line
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    let status = reqwest::blocking::get(format!("{base}/v2/_catalog?n=1"))
        .expect("GET")
        .status();
    assert_eq!(status.as_u16(), 200);
    // Access log lines are written out within 100 ms (berth::logging buffers them).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut text = String::new();
    while Instant::now() < deadline {
        text = std::fs::read_to_string(&log).expect("read log");
        if text.contains("berth::access") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let found = text.lines().find(|l| l.contains("berth::access"));
    let found = found.unwrap_or_else(|| panic!("no access log line:\n{text}"));
    for part in [
        "method=GET",
        "path=/v2/_catalog",
        "query=n=1",
        "status=200",
        "duration_ms=",
    ] {
        assert!(found.contains(part), "{part} missing from {found:?}");
    }
}
