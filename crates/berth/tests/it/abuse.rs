//! Hostile clients against the registry's own limits: slow pulls must not take the threads
//! everyone else needs, stalled manifest pushes must not buffer without bound, and no upload
//! grows past the configured largest blob.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crate::support::net::connect;
use crate::support::*;

pub(crate) fn vm_hwm_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib / 1024)
        .unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status"))
}

#[test]
fn six_hundred_stalled_pulls_do_not_stop_small_requests() {
    let app = TestApp::start();
    let big = vec![7u8; 16 * 1024 * 1024];
    let big_digest = push_blob(&app, "slow/pulls", &big);
    let small_digest = push_blob(&app, "slow/pulls", b"a small config blob");
    // Each client asks for the big blob and never reads the answer: its socket buffers fill
    // and the server's writes stall.
    let request = format!(
        "GET /v2/slow/pulls/blobs/{big_digest} HTTP/1.1\r\nHost: {}\r\n\r\n",
        app.host
    );
    let mut stalled = Vec::new();
    for _ in 0..600 {
        let mut s = connect(&app.host);
        s.write_all(request.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        stalled.push(s);
    }
    std::thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    // The bound is liveness, not speed: before, such requests never got an answer.
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let small = client
        .get(app.url(&format!("/v2/slow/pulls/blobs/{small_digest}")))
        .send()
        .unwrap_or_else(|e| panic!("small GET while pulls stall: {e}"));
    assert_eq!(small.status().as_u16(), 200);
    // An upload still goes through: its writes need the blocking pool too.
    let digest = push_blob(&app, "slow/pulls", &vec![3u8; 3 * 1024 * 1024]);
    assert!(digest.starts_with("sha256:"));
    let waited = started.elapsed();
    let rss = vm_hwm_mib(app.pid());
    eprintln!("peak RSS with 600 stalled pulls: {rss} MiB; small requests took {waited:?}");
    assert!(rss <= 256, "peak RSS {rss} MiB with 600 stalled pulls");
    drop(stalled);
}

#[test]
fn stalled_manifest_pushes_buffer_at_most_the_configured_bytes() {
    let app = TestApp::builder()
        .env(
            "BERTH_MAX_BUFFERED_MANIFEST_BYTES",
            (8 * 1024 * 1024).to_string(),
        )
        .env("BERTH_MAX_MANIFEST_BYTES", (4 * 1024 * 1024).to_string())
        .start();
    // Each push declares a 4 MiB manifest, sends half, and stalls: two fit in the buffer.
    let half = vec![b' '; 2 * 1024 * 1024];
    let mut stalled = Vec::new();
    for i in 0..40 {
        let mut s = connect(&app.host);
        let head = format!(
            "PUT /v2/stall/m{i}/manifests/v1 HTTP/1.1\r\nHost: {}\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: {}\r\n\r\n",
            app.host,
            4 * 1024 * 1024
        );
        s.write_all(head.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        let _ = s.write_all(&half);
        stalled.push(s);
    }
    // The ones that found no room are told to come back later, and nothing is buffered for them.
    let mut too_many = 0;
    for s in stalled.iter_mut() {
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut buf = [0u8; 64];
        if let Ok(n) = s.read(&mut buf)
            && String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 429")
        {
            too_many += 1;
        }
    }
    assert!(
        too_many >= 35,
        "only {too_many} of 40 stalled pushes were turned away"
    );
    let rss = vm_hwm_mib(app.pid());
    eprintln!("peak RSS with 40 stalled 4 MiB manifest pushes: {rss} MiB; {too_many} got 429");
    assert!(rss <= 256, "peak RSS {rss} MiB");
    drop(stalled);
    // With the stalled pushes gone, a push goes through.
    let (digest, _) = push_image(&app, "stall/after", "v1", "after");
    assert!(digest.starts_with("sha256:"));
}

#[test]
fn no_upload_grows_past_the_largest_blob_allowed() {
    let app = TestApp::builder()
        .env("BERTH_MAX_BLOB_BYTES", "1000")
        .start();
    let loc = app.start_upload("big/blob");
    let r = app.patch_chunk(&loc, 0, &[1u8; 600]);
    r.assert_status(202);
    let r = app.patch_chunk(&loc, 600, &[1u8; 600]);
    assert_error(&r, 413, "SIZE_INVALID");
    let status = send(app.client().get(&loc));
    assert_eq!(
        status.header("range"),
        Some("0-999"),
        "{}",
        status.describe()
    );
    // A monolithic push over the limit is refused and leaves nothing behind.
    let bytes = vec![2u8; 5000];
    let r = send(
        app.client()
            .post(app.url(&format!(
                "/v2/big/blob/blobs/uploads/?digest={}",
                sha256(&bytes)
            )))
            .body(bytes),
    );
    assert_error(&r, 413, "SIZE_INVALID");
    // An upload within the limit still works.
    push_blob(&app, "big/blob", &[5u8; 1000]);
}

/// A tmpfs of `mib` MiB mounted for one test, unmounted when dropped. Needs root, as CI runs.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(mib: u64) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap_or_else(|e| panic!("running mount: {e}"));
        assert!(
            status.success(),
            "mounting a tmpfs failed: the full-disk test needs root (as CI runs)"
        );
        SmallDisk { dir }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn on_a_full_disk_pushes_fail_cleanly_and_cancelling_an_upload_frees_space() {
    let disk = SmallDisk::mount(24);
    let data = disk.dir.path().join("data");
    let app = TestApp::builder().data_dir(&data).start();
    let loc = app.start_upload("full/disk");
    app.patch_chunk(&loc, 0, &vec![1u8; 8 * 1024 * 1024])
        .assert_status(202);
    // Fill what is left.
    let filler = disk.dir.path().join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=64"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    // A push now fails with a retryable error, never a 500 or a crash.
    let r = send(
        app.client()
            .post(app.url(&format!(
                "/v2/full/disk/blobs/uploads/?digest={}",
                sha256(&[2u8; 2_000_000])
            )))
            .body(vec![2u8; 2_000_000]),
    );
    assert!(matches!(r.status, 503 | 507), "{}", r.describe());
    // Cancelling the upload frees its bytes even though metadata cannot be written.
    let before = files_under(&data.join("uploads")).len();
    let r = send(app.client().delete(&loc));
    r.assert_status(204);
    assert!(files_under(&data.join("uploads")).len() < before);
    send(app.client().get(&loc)).assert_status(404);
    // With room again, pushes work.
    std::fs::remove_file(&filler).unwrap_or_else(|e| panic!("{e}"));
    let (digest, _) = push_image(&app, "full/disk", "v1", "after");
    app.get(&format!("/v2/full/disk/manifests/{digest}"))
        .assert_status(200);
}

/// Starts an upload and sends a PATCH declaring `declared` bytes but only `sent` of them,
/// keeping the connection open: a stalled client.
pub(crate) fn stalled_patch(
    app: &TestApp,
    repo: &str,
    declared: usize,
    sent: usize,
) -> std::net::TcpStream {
    let loc = app.start_upload(repo);
    let path = location_path(&loc);
    let mut s = connect(&app.host);
    let head = format!(
        "PATCH {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nContent-Length: {declared}\r\n\r\n",
        app.host
    );
    s.write_all(head.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    s.write_all(&vec![9u8; sent])
        .unwrap_or_else(|e| panic!("{e}"));
    s
}

#[test]
fn stalled_patches_do_not_stop_expiry_of_other_uploads() {
    let app = TestApp::builder()
        .env("BERTH_UPLOAD_IDLE_TIMEOUT_SECS", "2")
        .env("BERTH_UPLOAD_PURGE_INTERVAL_SECS", "1")
        .start();
    // Several uploads whose PATCH stalls mid-body: each holds its upload's lock.
    let stalled: Vec<_> = (0..8)
        .map(|_| stalled_patch(&app, "expiry/stalled", 1 << 20, 1000))
        .collect();
    let idle = app.start_upload("expiry/idle");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = send(app.client().get(&idle));
        if r.status == 404 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "an idle upload did not expire while other uploads' PATCHes stalled"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(stalled);
}

#[test]
fn five_hundred_stalled_patches_hold_no_batches_in_memory() {
    let app = TestApp::start();
    // Each sends most of a write batch (1 MiB) and stalls.
    let stalled: Vec<_> = (0..500)
        .map(|_| stalled_patch(&app, "memory/stalled", 4 << 20, 900 * 1024))
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let rss = vm_hwm_mib(app.pid());
    eprintln!("peak RSS with 500 stalled PATCHes holding 900 KiB each: {rss} MiB");
    assert!(rss <= 256, "peak RSS {rss} MiB");
    // Their bytes went to disk, so the uploads can be resumed once the clients come back.
    let on_disk: u64 = files_under(&app.data_dir.join("uploads"))
        .iter()
        .map(|(_, n)| n)
        .sum();
    assert!(
        on_disk >= 400 * 900 * 1024,
        "only {on_disk} bytes reached disk"
    );
    drop(stalled);
}
