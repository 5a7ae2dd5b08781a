//! Crash safety: `kill -9` in the middle of a large push leaves no blob behind and does not stop
//! a retry; `kill -9` right after an acknowledgement loses nothing that was acknowledged.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::support::clients::{GenReader, digest_of};
use crate::support::{TestApp, blob_file, files_under, push_image, sha256};

const BIG: u64 = 256 * 1024 * 1024;

fn header(resp: &reqwest::blocking::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// POST /v2/<repo>/blobs/uploads/ and return the absolute upload URL.
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

fn bytes_outside_metadata(data_dir: &std::path::Path) -> u64 {
    files_under(data_dir)
        .into_iter()
        .filter(|(p, _)| {
            !p.file_name()
                .map(|n| n.to_string_lossy().starts_with("metadata.db"))
                .unwrap_or(false)
        })
        .map(|(_, n)| n)
        .sum()
}

#[test]
fn kill9_during_large_monolithic_put_leaves_no_blob_and_retry_succeeds() {
    let mut app = TestApp::start();
    let repo = "crash/big";
    let seed = 0xB16_B10B;
    let (digest, len) = digest_of(GenReader::new(seed, BIG));
    assert_eq!(len, BIG);
    let hex = digest.strip_prefix("sha256:").expect("hex").to_string();

    // Start a monolithic PUT of the whole blob, and stall the body at 64 MiB.
    let upload = start_upload(&app, repo);
    let reader = GenReader::new(seed, BIG).stall_after(64 * 1024 * 1024);
    let produced = reader.produced();
    let abort = reader.abort_flag();
    let client = app.client();
    let put_url = with_query(&upload, &format!("digest={digest}"));
    let sender = std::thread::spawn(move || {
        client
            .put(put_url)
            .header("Content-Type", "application/octet-stream")
            .body(reqwest::blocking::Body::sized(reader, BIG))
            .send()
            .map(|r| r.status().as_u16())
    });

    let deadline = Instant::now() + Duration::from_secs(120);
    while produced.load(Ordering::SeqCst) < 64 * 1024 * 1024 {
        assert!(
            Instant::now() < deadline,
            "the body generator stalled before 64 MiB"
        );
        assert!(
            !sender.is_finished(),
            "the PUT ended before 64 MiB were sent: {:?}",
            sender.join()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The server must be streaming to disk, not buffering: wait until it has written a good
    // part of what was sent.
    let deadline = Instant::now() + Duration::from_secs(30);
    while bytes_outside_metadata(&app.data_dir) < 16 * 1024 * 1024 {
        assert!(
            Instant::now() < deadline,
            "after 64 MiB were sent, berth has written only {} bytes under {} (is it buffering the body in memory?)",
            bytes_outside_metadata(&app.data_dir),
            app.data_dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    app.kill9();
    abort.store(true, Ordering::SeqCst);
    let outcome = sender.join().expect("sender thread");
    assert!(
        outcome.is_err(),
        "the interrupted PUT must fail, got {outcome:?}"
    );

    app.restart();
    let head = app
        .client()
        .head(app.url(&format!("/v2/{repo}/blobs/{digest}")))
        .send()
        .expect("HEAD");
    assert_eq!(
        head.status().as_u16(),
        404,
        "a blob whose push was cut by kill -9 must not exist"
    );
    assert!(
        !blob_file(&app.data_dir, &digest).exists(),
        "a final blob file exists for the cut push"
    );
    let stray: Vec<_> = files_under(&app.data_dir.join("blobs"))
        .into_iter()
        .filter(|(p, _)| {
            p.file_name()
                .map(|n| n.to_string_lossy() == hex)
                .unwrap_or(false)
        })
        .collect();
    assert!(
        stray.is_empty(),
        "files named after the digest under blobs/: {stray:?}"
    );

    // Retry from scratch: the full push succeeds and the bytes come back.
    let upload = start_upload(&app, repo);
    let resp = app
        .client()
        .put(with_query(&upload, &format!("digest={digest}")))
        .header("Content-Type", "application/octet-stream")
        .body(reqwest::blocking::Body::sized(
            GenReader::new(seed, BIG),
            BIG,
        ))
        .send()
        .expect("retry PUT");
    assert_eq!(resp.status().as_u16(), 201, "retry PUT");
    assert_eq!(header(&resp, "docker-content-digest"), digest);

    let get = app
        .client()
        .get(app.url(&format!("/v2/{repo}/blobs/{digest}")))
        .send()
        .expect("GET blob");
    assert_eq!(get.status().as_u16(), 200);
    assert_eq!(header(&get, "content-length"), BIG.to_string());
    let (got, n) = digest_of(get);
    assert_eq!(n, BIG, "GET returned a different length");
    assert_eq!(got, digest, "GET returned different bytes");
    let on_disk = std::fs::metadata(blob_file(&app.data_dir, &digest)).expect("final blob file");
    assert_eq!(on_disk.len(), BIG);
}

#[test]
fn kill9_right_after_acknowledgement_loses_nothing() {
    let mut app = TestApp::start();
    let repo = "crash/acked";
    let mut pushed = Vec::new();
    for i in 0..3 {
        // A chunked blob upload (POST, PATCH, PUT) ...
        let chunk = crate::support::clients::pseudo_random(100 + i, 3 * 1024 * 1024 + 17);
        let digest = sha256(&chunk);
        let upload = start_upload(&app, repo);
        let patch = app
            .client()
            .patch(&upload)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", format!("0-{}", chunk.len() - 1))
            .body(chunk.clone())
            .send()
            .expect("PATCH");
        assert_eq!(patch.status().as_u16(), 202, "PATCH");
        let loc = app.location_url(&header(&patch, "location"));
        let put = app
            .client()
            .put(with_query(&loc, &format!("digest={digest}")))
            .send()
            .expect("PUT");
        assert_eq!(put.status().as_u16(), 201, "PUT");
        app.kill9();
        app.restart();

        // ... then an image (blobs + manifest), killed right after the manifest's 201.
        let tag = format!("t{i}");
        let (mdigest, manifest) = push_image(&app, repo, &tag, &format!("acked-{i}"));
        app.kill9();
        app.restart();
        pushed.push((digest, chunk, tag, mdigest, manifest));
    }

    for (digest, chunk, tag, mdigest, manifest) in &pushed {
        let blob = app
            .client()
            .get(app.url(&format!("/v2/{repo}/blobs/{digest}")))
            .send()
            .expect("GET blob");
        assert_eq!(
            blob.status().as_u16(),
            200,
            "acknowledged blob {digest} lost"
        );
        assert!(
            blob.bytes().expect("body").as_ref() == chunk.as_slice(),
            "blob {digest} bytes changed"
        );
        for reference in [tag.as_str(), mdigest.as_str()] {
            let m = app
                .client()
                .get(app.url(&format!("/v2/{repo}/manifests/{reference}")))
                .header("Accept", "application/vnd.oci.image.manifest.v1+json")
                .send()
                .expect("GET manifest");
            assert_eq!(
                m.status().as_u16(),
                200,
                "acknowledged manifest {reference} lost"
            );
            assert_eq!(header(&m, "docker-content-digest"), *mdigest);
            assert!(m.bytes().expect("body").as_ref() == manifest.as_slice());
        }
    }
    let tags = app
        .client()
        .get(app.url(&format!("/v2/{repo}/tags/list")))
        .send()
        .expect("tags")
        .bytes()
        .expect("tags body");
    let tags: serde_json::Value = serde_json::from_slice(&tags).expect("tags JSON");
    assert_eq!(tags["tags"], serde_json::json!(["t0", "t1", "t2"]));
}
