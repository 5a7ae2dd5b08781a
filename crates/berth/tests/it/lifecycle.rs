//! Process lifecycle: graceful shutdown on SIGTERM, upload expiry, and the command line
//! (help, config file, environment variables).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::support::clients::{GenReader, digest_of, pseudo_random};
use crate::support::{
    TestApp, blob_file, clean_command, error_code, files_under, output_within, push_blob, sha256,
};

fn header(resp: &reqwest::blocking::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

fn start_upload(app: &TestApp, repo: &str) -> String {
    let resp = app
        .client()
        .post(app.url(&format!("/v2/{repo}/blobs/uploads/")))
        .send()
        .expect("POST upload");
    assert_eq!(resp.status().as_u16(), 202, "start upload");
    let loc = header(&resp, "location");
    assert!(!loc.is_empty(), "no Location on 202");
    app.location_url(&loc)
}

fn with_query(url: &str, kv: &str) -> String {
    if url.contains('?') {
        format!("{url}&{kv}")
    } else {
        format!("{url}?{kv}")
    }
}

/// The upload's id: the last path segment of its URL.
fn upload_id(url: &str) -> String {
    let path = url.split('?').next().expect("path");
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .expect("segment")
        .to_string()
}

/// `Range: 0-<end>` of an upload status or PATCH response, as the number of bytes it covers.
/// (`0-0` is read as empty, the usual convention for a fresh upload.)
fn range_len(range: &str) -> u64 {
    let end = range
        .strip_prefix("0-")
        .unwrap_or_else(|| panic!("Range {range:?} does not start with 0-"));
    let end: u64 = end.parse().unwrap_or_else(|_| panic!("Range {range:?}"));
    if end == 0 { 0 } else { end + 1 }
}

/// Whether a new connection to `host` gets any HTTP response to `GET /v2/`.
fn new_connection_is_served(host: &str) -> Result<String, String> {
    let addr = host.parse().expect("host addr");
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
        Ok(s) => s,
        Err(e) => return Err(format!("connect: {e}")),
    };
    s.set_read_timeout(Some(Duration::from_millis(1500)))
        .expect("timeout");
    let req = format!("GET /v2/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    if let Err(e) = s.write_all(req.as_bytes()) {
        return Err(format!("write: {e}"));
    }
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(n) if n > 0 => Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Ok(_) => Err("closed without a response".into()),
        Err(e) => Err(format!("read: {e}")),
    }
}

#[test]
fn sigterm_lets_an_inflight_patch_finish_refuses_new_connections_and_exits_0() {
    let mut app = TestApp::start();
    let repo = "life/term";
    let upload = start_upload(&app, repo);
    assert!(
        new_connection_is_served(&app.host).is_ok(),
        "server not serving before SIGTERM"
    );

    // 8 MiB at 64 KiB per 25 ms: about 3.2 s of body.
    let total: u64 = 8 * 1024 * 1024;
    let seed = 7;
    let reader = GenReader::new(seed, total).throttle(64 * 1024, Duration::from_millis(25));
    let produced = reader.produced();
    let client = app.client();
    let url = upload.clone();
    let patch = std::thread::spawn(move || {
        let r = client
            .patch(&url)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", format!("0-{}", total - 1))
            .body(reqwest::blocking::Body::sized(reader, total))
            .send()
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((r.status().as_u16(), header(&r, "range"), Instant::now()))
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while produced.load(Ordering::SeqCst) < 1024 * 1024 {
        assert!(Instant::now() < deadline, "PATCH body did not start");
        std::thread::sleep(Duration::from_millis(10));
    }

    let term_at = Instant::now();
    app.send_sigterm();
    std::thread::sleep(Duration::from_millis(400));
    if patch.is_finished() {
        let running = app.is_running();
        let outcome = patch.join().expect("patch thread");
        panic!(
            "the in-flight PATCH ended within 400 ms of SIGTERM although its body needed ~2.8 s more \
             (berth still running: {running}); PATCH outcome: {outcome:?}"
        );
    }
    assert!(app.is_running(), "berth exited with a request in flight");
    let probe = new_connection_is_served(&app.host);
    assert!(
        probe.is_err(),
        "a new connection was served after SIGTERM: {probe:?}"
    );

    let (status, range, done_at) = patch
        .join()
        .expect("patch thread")
        .expect("in-flight PATCH failed");
    assert_eq!(status, 202, "in-flight PATCH");
    assert_eq!(range, format!("0-{}", total - 1));
    assert!(done_at.duration_since(term_at) > Duration::from_millis(400));

    let exit = app.wait_exit(Duration::from_secs(10));
    let exit = exit.expect("berth did not exit within 10 s after its last request finished");
    assert!(exit.success(), "exit status after SIGTERM: {exit}");

    // The upload survived the shutdown and can be completed.
    app.restart();
    let status = app.client().get(&upload).send().expect("upload status");
    assert_eq!(status.status().as_u16(), 204, "upload status after restart");
    assert_eq!(header(&status, "range"), format!("0-{}", total - 1));
    let (digest, _) = digest_of(GenReader::new(seed, total));
    let put = app
        .client()
        .put(with_query(&upload, &format!("digest={digest}")))
        .send()
        .expect("PUT");
    assert_eq!(
        put.status().as_u16(),
        201,
        "completing the upload after restart"
    );
    let get = app
        .client()
        .get(app.url(&format!("/v2/{repo}/blobs/{digest}")))
        .send()
        .expect("GET");
    assert_eq!(get.status().as_u16(), 200);
    assert_eq!(digest_of(get), (digest, total));
}

#[test]
fn sigterm_with_a_stalled_request_exits_after_the_grace_period() {
    let mut app = TestApp::builder()
        .env("BERTH_SHUTDOWN_GRACE_SECS", "2")
        .start();
    let repo = "life/stall";
    let upload = start_upload(&app, repo);
    let total: u64 = 4 * 1024 * 1024;
    let sent: u64 = 1024 * 1024;
    let seed = 9;
    let reader = GenReader::new(seed, total).stall_after(sent);
    let produced = reader.produced();
    let abort = reader.abort_flag();
    let client = app.client();
    let url = upload.clone();
    let patch = std::thread::spawn(move || {
        client
            .patch(&url)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", format!("0-{}", total - 1))
            .body(reqwest::blocking::Body::sized(reader, total))
            .send()
            .map(|r| r.status().as_u16())
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while produced.load(Ordering::SeqCst) < sent {
        assert!(Instant::now() < deadline, "PATCH body did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));

    let term_at = Instant::now();
    app.send_sigterm();
    let exit = app.wait_exit(Duration::from_secs(12));
    let waited = term_at.elapsed();
    abort.store(true, Ordering::SeqCst);
    let _ = patch.join();
    assert!(
        exit.is_some(),
        "berth still running 12 s after SIGTERM with grace 2 s"
    );
    assert!(
        waited >= Duration::from_millis(1500),
        "berth exited {waited:?} after SIGTERM: it did not give the in-flight request its grace period"
    );

    // After a restart the upload is consistent: its offset is at most what was sent, and it can
    // be resumed from there and completed.
    app.restart();
    let status = app.client().get(&upload).send().expect("upload status");
    assert_eq!(status.status().as_u16(), 204, "upload status after restart");
    let have = range_len(&header(&status, "range"));
    assert!(
        have <= sent,
        "upload claims {have} bytes, only {sent} were sent"
    );
    let all = {
        let mut v = Vec::new();
        GenReader::new(seed, total)
            .read_to_end(&mut v)
            .expect("gen");
        v
    };
    let rest = all[usize::try_from(have).expect("usize")..].to_vec();
    let loc = if rest.is_empty() {
        upload.clone()
    } else {
        let resp = app
            .client()
            .patch(&upload)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", format!("{have}-{}", total - 1))
            .body(rest)
            .send()
            .expect("resume PATCH");
        assert_eq!(resp.status().as_u16(), 202, "resuming at offset {have}");
        assert_eq!(header(&resp, "range"), format!("0-{}", total - 1));
        app.location_url(&header(&resp, "location"))
    };
    let digest = sha256(&all);
    let put = app
        .client()
        .put(with_query(&loc, &format!("digest={digest}")))
        .send()
        .expect("PUT");
    assert_eq!(put.status().as_u16(), 201, "completing the resumed upload");
    let get = app
        .client()
        .get(app.url(&format!("/v2/{repo}/blobs/{digest}")))
        .send()
        .expect("GET");
    assert!(get.bytes().expect("body").as_ref() == all.as_slice());
}

#[test]
fn sigterm_when_idle_exits_0_promptly() {
    let mut app = TestApp::start();
    push_blob(&app, "life/idle", b"some bytes");
    let t = Instant::now();
    app.send_sigterm();
    let exit = app
        .wait_exit(Duration::from_secs(10))
        .expect("berth did not exit within 10 s of SIGTERM");
    assert!(exit.success(), "exit status: {exit}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "idle shutdown took {:?}",
        t.elapsed()
    );
}

#[test]
fn idle_uploads_expire_and_their_bytes_are_deleted_while_active_ones_live() {
    let app = TestApp::builder()
        .env("BERTH_UPLOAD_IDLE_TIMEOUT_SECS", "2")
        .env("BERTH_UPLOAD_PURGE_INTERVAL_SECS", "1")
        .start();
    let repo = "life/expire";
    let uploads_dir = app.data_dir.join("uploads");

    let idle = start_upload(&app, repo);
    let idle_id = upload_id(&idle);
    let bytes = pseudo_random(5, 100_000);
    let r = app
        .client()
        .patch(&idle)
        .header("Content-Type", "application/octet-stream")
        .header("Content-Range", format!("0-{}", bytes.len() - 1))
        .body(bytes.clone())
        .send()
        .expect("PATCH");
    assert_eq!(r.status().as_u16(), 202);
    let idle = app.location_url(&header(&r, "location"));
    let idle_files = |dir: &Path| -> Vec<(PathBuf, u64)> {
        files_under(dir)
            .into_iter()
            .filter(|(p, _)| {
                p.strip_prefix(dir)
                    .map(|rel| rel.to_string_lossy().starts_with(&idle_id))
                    .unwrap_or(false)
            })
            .collect()
    };
    let on_disk: u64 = idle_files(&uploads_dir).iter().map(|(_, n)| n).sum();
    assert_eq!(
        on_disk, 100_000,
        "the PATCHed bytes should be under uploads/{idle_id}"
    );

    // Another upload, touched every 500 ms for 5 s: never idle for 2 s.
    let active = start_upload(&app, repo);
    let active_id = upload_id(&active);
    let mut active_loc = active.clone();
    let mut active_bytes = Vec::new();
    let t0 = Instant::now();
    let mut i = 0u64;
    while t0.elapsed() < Duration::from_secs(5) {
        let chunk = pseudo_random(1000 + i, 1024);
        let start = active_bytes.len();
        let r = app
            .client()
            .patch(&active_loc)
            .header("Content-Type", "application/octet-stream")
            .header(
                "Content-Range",
                format!("{start}-{}", start + chunk.len() - 1),
            )
            .body(chunk.clone())
            .send()
            .expect("PATCH active");
        assert_eq!(
            r.status().as_u16(),
            202,
            "PATCH of the active upload after {:?}",
            t0.elapsed()
        );
        active_loc = app.location_url(&header(&r, "location"));
        active_bytes.extend_from_slice(&chunk);
        i += 1;
        std::thread::sleep(Duration::from_millis(500));
    }

    // The idle one is gone, on disk (waiting a little more if the purge is late) ...
    let deadline = Instant::now() + Duration::from_secs(5);
    while !idle_files(&uploads_dir).is_empty() {
        assert!(
            Instant::now() < deadline,
            "bytes of the idle upload still on disk 10 s after its last touch: {:?}",
            idle_files(&uploads_dir)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!uploads_dir.join(&idle_id).exists());
    // ... and over the API.
    let r = app.client().get(&idle).send().expect("GET idle");
    assert_eq!(r.status().as_u16(), 404, "status of an expired upload");
    assert_eq!(error_code(&r.text().expect("body")), "BLOB_UPLOAD_UNKNOWN");
    let r = app
        .client()
        .patch(&idle)
        .header("Content-Type", "application/octet-stream")
        .header(
            "Content-Range",
            format!("{}-{}", bytes.len(), bytes.len() + 9),
        )
        .body(vec![0u8; 10])
        .send()
        .expect("PATCH idle");
    assert_eq!(r.status().as_u16(), 404, "PATCH of an expired upload");
    assert_eq!(error_code(&r.text().expect("body")), "BLOB_UPLOAD_UNKNOWN");
    let r = app
        .client()
        .put(with_query(&idle, &format!("digest={}", sha256(&bytes))))
        .send()
        .expect("PUT idle");
    assert_eq!(r.status().as_u16(), 404, "PUT of an expired upload");
    assert_eq!(error_code(&r.text().expect("body")), "BLOB_UPLOAD_UNKNOWN");

    // The active one is intact and completes.
    let r = app.client().get(&active_loc).send().expect("GET active");
    assert_eq!(
        r.status().as_u16(),
        204,
        "the active upload {active_id} must not expire"
    );
    assert_eq!(header(&r, "range"), format!("0-{}", active_bytes.len() - 1));
    let digest = sha256(&active_bytes);
    let r = app
        .client()
        .put(with_query(&active_loc, &format!("digest={digest}")))
        .send()
        .expect("PUT active");
    assert_eq!(r.status().as_u16(), 201);
    assert!(blob_file(&app.data_dir, &digest).exists());
}

// ---- command line -------------------------------------------------------------------------

/// A berth process started by a test, killed on drop.
struct Proc {
    child: Child,
    base: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `berth ARGS` with `envs`, in `cwd`, and waits for its `berth listening on` line.
fn spawn(cwd: &Path, args: &[&str], envs: &[(&str, &str)]) -> Proc {
    let mut cmd = clean_command(cwd);
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn berth");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = BufReader::new(stdout);
        let mut line = String::new();
        let _ = out.read_line(&mut line);
        let _ = tx.send(line);
        // Keep draining so that later output never meets a closed pipe.
        let _ = std::io::copy(&mut out, &mut std::io::sink());
    });
    let line = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(l) => l,
        Err(_) => {
            let _ = child.kill();
            panic!("berth {args:?} printed nothing in 30 s");
        }
    };
    let base = line
        .trim()
        .strip_prefix("berth listening on ")
        .filter(|u| u.starts_with("http://"))
        .unwrap_or_else(|| {
            let _ = child.kill();
            panic!("unexpected first line from berth {args:?}: {line:?}")
        })
        .to_string();
    Proc { child, base }
}

fn get_v2(base: &str) -> u16 {
    reqwest::blocking::Client::new()
        .get(format!("{base}/v2/"))
        .send()
        .expect("GET /v2/")
        .status()
        .as_u16()
}

/// Pushes a blob to the berth at `base` and returns its digest.
fn push_to(base: &str, bytes: &[u8]) -> String {
    let digest = sha256(bytes);
    let r = reqwest::blocking::Client::new()
        .post(format!("{base}/v2/cli/test/blobs/uploads/?digest={digest}"))
        .header("Content-Type", "application/octet-stream")
        .body(bytes.to_vec())
        .send()
        .expect("push");
    assert_eq!(r.status().as_u16(), 201, "push blob");
    digest
}

fn port_of(base: &str) -> u16 {
    base.rsplit(':')
        .next()
        .expect("port")
        .parse()
        .expect("port number")
}

#[test]
fn help_mentions_serve_and_its_options() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut cmd = clean_command(tmp.path());
    cmd.arg("--help");
    let out = output_within(cmd, "berth --help");
    assert!(
        out.status.success(),
        "berth --help exit status {}",
        out.status
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("serve"),
        "berth --help does not mention serve:\n{text}"
    );

    let mut cmd = clean_command(tmp.path());
    cmd.args(["serve", "--help"]);
    let out = output_within(cmd, "berth serve --help");
    assert!(
        out.status.success(),
        "berth serve --help exit status {}",
        out.status
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for opt in ["--listen", "--data-dir", "--config"] {
        assert!(
            text.contains(opt),
            "berth serve --help does not mention {opt}:\n{text}"
        );
    }
}

#[test]
fn config_file_env_and_flags_are_honoured_in_that_order() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cwd = tmp.path().join("cwd");
    std::fs::create_dir_all(&cwd).expect("mkdir");
    let dir_file = tmp.path().join("from-file");
    let dir_env = tmp.path().join("from-env");
    let dir_flag = tmp.path().join("from-flag");
    let config = tmp.path().join("berth.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = '{}'\n",
            dir_file.display()
        ),
    )
    .expect("write config");
    let config_s = config.display().to_string();
    let dir_env_s = dir_env.display().to_string();
    let dir_flag_s = dir_flag.display().to_string();
    let all_dirs = [&dir_file, &dir_env, &dir_flag, &cwd.join("berth-data")];

    struct Case<'a> {
        what: &'a str,
        args: Vec<&'a str>,
        envs: Vec<(&'a str, &'a str)>,
        expected: &'a Path,
    }
    let cases = [
        Case {
            what: "--config only",
            args: vec!["serve", "--config", &config_s],
            envs: vec![],
            expected: &dir_file,
        },
        Case {
            what: "--config + BERTH_DATA_DIR",
            args: vec!["serve", "--config", &config_s],
            envs: vec![("BERTH_DATA_DIR", &dir_env_s)],
            expected: &dir_env,
        },
        Case {
            what: "--config + BERTH_DATA_DIR + --data-dir",
            args: vec!["serve", "--config", &config_s, "--data-dir", &dir_flag_s],
            envs: vec![("BERTH_DATA_DIR", &dir_env_s)],
            expected: &dir_flag,
        },
    ];
    for (
        i,
        Case {
            what,
            args,
            envs,
            expected,
        },
    ) in cases.iter().enumerate()
    {
        let p = spawn(&cwd, args, envs);
        assert_ne!(
            port_of(&p.base),
            5000,
            "{what}: listen from the config file was ignored"
        );
        assert_eq!(get_v2(&p.base), 200, "{what}: GET /v2/");
        let digest = push_to(&p.base, format!("blob for case {i}").as_bytes());
        for d in all_dirs {
            let exists = blob_file(d, &digest).exists();
            assert_eq!(
                exists,
                d == *expected,
                "{what}: blob file under {} exists={exists}; expected the data dir to be {}",
                d.display(),
                expected.display()
            );
        }
        drop(p);
    }
}

#[test]
fn env_listen_and_data_dir_are_honoured() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("env-data");
    let p = spawn(
        tmp.path(),
        &["serve"],
        &[
            ("BERTH_LISTEN", "127.0.0.1:0"),
            ("BERTH_DATA_DIR", &data.display().to_string()),
        ],
    );
    assert!(p.base.starts_with("http://127.0.0.1:"), "{}", p.base);
    assert_ne!(port_of(&p.base), 5000, "BERTH_LISTEN was ignored");
    assert_eq!(get_v2(&p.base), 200);
    let digest = push_to(&p.base, b"env blob");
    assert!(
        blob_file(&data, &digest).exists(),
        "BERTH_DATA_DIR was ignored"
    );
    assert!(!tmp.path().join("berth-data").exists());
    assert!(
        data.join("metadata.db").exists(),
        "no metadata.db in BERTH_DATA_DIR"
    );
}

#[test]
fn bad_config_fails_fast_with_a_message() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = tmp.path().join("bad.toml");
    std::fs::write(&config, "lisen = \"127.0.0.1:0\"\n").expect("write");
    let mut cmd = clean_command(tmp.path());
    cmd.args(["serve", "--config", &config.display().to_string()]);
    let out = output_within(cmd, "berth with an unknown config key");
    assert!(
        !out.status.success(),
        "berth accepted an unknown config key"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("lisen"),
        "the error does not name the bad key:\n{err}"
    );

    let mut cmd = clean_command(tmp.path());
    cmd.args([
        "serve",
        "--config",
        &tmp.path().join("missing.toml").display().to_string(),
    ]);
    let out = output_within(cmd, "berth with a missing config file");
    assert!(
        !out.status.success(),
        "berth started with a missing config file"
    );
}
