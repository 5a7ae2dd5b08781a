//! Integrity whatever clients do: dropped requests, chunk bodies longer than their range,
//! deletes racing the manifests that need them, descriptors that lie, abandoned uploads. Each
//! test is named after what used to break.

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::check::{assert_blob_files_match_their_names, assert_every_tag_is_complete};
use crate::support::net::connect;
use crate::support::*;

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Sends a PATCH declaring `body` but only `sent` bytes of it to the upload at `location`, and
/// closes the connection without reading the answer, as a client killed mid-request would.
fn patch_and_hang_up(app: &TestApp, location: &str, body: &[u8], sent: usize) {
    let path = location_path(location);
    let mut s = connect(&app.host);
    let head = format!(
        "PATCH {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        app.host,
        body.len()
    );
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(&body[..sent]);
    // A reset, not a polite close: the server learns at once that the client is gone and
    // drops the request's handler mid-body, as with a killed client.
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}

/// Regression: a PATCH whose client hung up had its handler dropped while the blocking
/// writer still held queued bytes; a retry on the same upload committed, and the late bytes
/// were appended to the file just renamed into `blobs/`. It showed most on a freshly started
/// server, so each round starts one.
#[test]
fn a_dropped_patch_never_lands_bytes_in_a_committed_blob() {
    let mut failures = Vec::new();
    for round in 0..80u8 {
        let app = TestApp::start();
        let bytes = data(3 * 1024 * 1024 + round as usize, round);
        let digest = sha256(&bytes);
        let loc = app.start_upload("drop/retry");
        // Every other round hangs up part-way, the others after the whole body.
        let sent = if round % 2 == 0 {
            bytes.len()
        } else {
            512 * 1024 + (round as usize % 8) * 256 * 1024
        };
        patch_and_hang_up(&app, &loc, &bytes, sent);
        // The client retries at once on the same upload, from offset 0, then commits.
        let retry = app
            .client()
            .patch(&loc)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", format!("0-{}", bytes.len() - 1))
            .body(bytes.clone())
            .send();
        let committed = match retry.map(|r| r.status().as_u16()) {
            Ok(202) => app.finish_upload(&loc, &digest, None).status == 201,
            // The dropped request's bytes landed first: the retry is told where the upload
            // stands (416, possibly before its body is read, so the client may see the
            // connection close instead), and a client starts over with a new upload.
            Ok(416) | Err(_) => false,
            Ok(other) => {
                failures.push(format!("round {round}: retry PATCH got {other}"));
                false
            }
        };
        if !committed {
            let loc = app.start_upload("drop/retry");
            app.finish_upload(&loc, &digest, Some(&bytes))
                .assert_status(201);
        }
        // Late appends land after the commit, if they land at all: give them the chance.
        std::thread::sleep(Duration::from_millis(50));
        let file = blob_file(&app.data_dir, &digest);
        let on_disk = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        if on_disk != bytes.len() as u64 {
            failures.push(format!(
                "round {round}: blob file holds {on_disk} bytes, not {}",
                bytes.len()
            ));
        }
        soft_case(&mut failures, &format!("round {round}"), || {
            assert_blob_files_match_their_names(&app.data_dir)
        });
    }
    assert_no_failures(&failures);
}

#[test]
fn a_chunked_body_longer_than_its_content_range_is_refused_at_the_range() {
    let app = TestApp::start();
    let loc = app.start_upload("range/chunked");
    // A reader body has no known length, so it goes out with chunked transfer encoding.
    let body = reqwest::blocking::Body::new(std::io::Cursor::new(b"0123456789".to_vec()));
    let r = send(
        app.client()
            .patch(&loc)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", "0-2")
            .body(body),
    );
    assert_error(&r, 416, "BLOB_UPLOAD_INVALID");
    assert_eq!(r.header("range"), Some("0-2"), "{}", r.describe());
    let status = send(app.client().get(&loc));
    assert_eq!(status.header("range"), Some("0-2"), "{}", status.describe());
    // The upload goes on from where the range ended.
    let r = app.finish_upload(&loc, &sha256(b"012345"), Some(b"345"));
    r.assert_status(201);
}

#[test]
fn a_chunked_body_shorter_than_its_content_range_is_400_and_resumable() {
    let app = TestApp::start();
    let loc = app.start_upload("range/short");
    let body = reqwest::blocking::Body::new(std::io::Cursor::new(b"0123".to_vec()));
    let r = send(
        app.client()
            .patch(&loc)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", "0-9")
            .body(body),
    );
    assert_error(&r, 400, "BLOB_UPLOAD_INVALID");
    let status = send(app.client().get(&loc));
    assert_eq!(status.header("range"), Some("0-3"), "{}", status.describe());
}

#[test]
fn a_blob_delete_is_refused_while_a_manifest_uses_it() {
    let app = TestApp::start();
    let config = app.blob_descriptor("del/blob", OCI_CONFIG, b"{\"os\":\"linux\"}");
    let layer_bytes = data(5000, 3);
    let layer = app.blob_descriptor("del/blob", OCI_LAYER, &layer_bytes);
    let manifest = oci_manifest(&config, &[layer], json!({}));
    let m = app.push_manifest("del/blob", "v1", OCI_MANIFEST, &manifest);
    let layer_digest = sha256(&layer_bytes);

    let r = app.delete(&format!("/v2/del/blob/blobs/{layer_digest}"));
    assert_error(&r, 409, "DENIED");
    assert!(r.text().contains(&m), "names the referrer: {}", r.text());
    assert_every_tag_is_complete(&app);

    // Once the manifest is gone, so may the blob be.
    app.delete(&format!("/v2/del/blob/manifests/{m}"))
        .assert_status(202);
    app.delete(&format!("/v2/del/blob/blobs/{layer_digest}"))
        .assert_status(202);
}

#[test]
fn a_manifest_delete_is_refused_while_an_index_lists_it() {
    let app = TestApp::start();
    let child = app.image_manifest("del/index", "child", json!({}));
    let child_digest = app.push_manifest("del/index", &sha256(&child), OCI_MANIFEST, &child);
    let index = oci_index(
        &[json!({"mediaType": OCI_MANIFEST, "digest": child_digest, "size": child.len()})],
        json!({}),
    );
    let index_digest = app.push_manifest("del/index", "multi", OCI_INDEX, &index);

    let r = app.delete(&format!("/v2/del/index/manifests/{child_digest}"));
    assert_error(&r, 409, "DENIED");
    assert!(r.text().contains(&index_digest), "{}", r.text());
    assert_every_tag_is_complete(&app);

    app.delete(&format!("/v2/del/index/manifests/{index_digest}"))
        .assert_status(202);
    app.delete(&format!("/v2/del/index/manifests/{child_digest}"))
        .assert_status(202);
}

#[test]
fn racing_blob_deletes_and_manifest_puts_never_leave_a_broken_tag() {
    let app = TestApp::start();
    for round in 0..40 {
        let repo = format!("race/{round}");
        let config =
            app.blob_descriptor(&repo, OCI_CONFIG, format!("{{\"r\":{round}}}").as_bytes());
        let layer_bytes = data(2000, round as u8);
        let layer = app.blob_descriptor(&repo, OCI_LAYER, &layer_bytes);
        let manifest = oci_manifest(&config, &[layer], json!({}));
        let layer_digest = sha256(&layer_bytes);
        std::thread::scope(|s| {
            let put = s.spawn(|| app.put_manifest(&repo, "t", OCI_MANIFEST, &manifest));
            let del = s.spawn(|| app.delete(&format!("/v2/{repo}/blobs/{layer_digest}")));
            let (put, del) = (
                put.join().unwrap_or_else(|_| panic!("put thread")),
                del.join().unwrap_or_else(|_| panic!("delete thread")),
            );
            // Exactly one order happened: the put first (the delete is refused) or the
            // delete first (the put finds the blob gone).
            match (put.status, del.status) {
                (201, 409) | (400, 202) => {}
                other => panic!(
                    "round {round}: put/delete answered {other:?}: {} / {}",
                    put.describe(),
                    del.describe()
                ),
            }
        });
    }
    assert_every_tag_is_complete(&app);
}

#[test]
fn descriptors_must_match_what_the_registry_holds() {
    let app = TestApp::start();
    let config_bytes = b"{\"os\":\"linux\"}";
    let config = app.blob_descriptor("lying/desc", OCI_CONFIG, config_bytes);
    let layer = app.blob_descriptor("lying/desc", OCI_LAYER, b"layer");
    let mut wrong_size = layer.clone();
    wrong_size["size"] = json!(6);
    let mut bad_data = config.clone();
    bad_data["data"] = json!("aGVsbG8="); // base64 of "hello", not of the config
    let mut good_data = config.clone();
    good_data["data"] = json!(base64_of(config_bytes));
    let mut failures = Vec::new();
    for (case, config, layer, status) in [
        (
            "size disagrees with the stored blob",
            &config,
            &wrong_size,
            400,
        ),
        ("data is not the described content", &bad_data, &layer, 400),
        ("data is the described content", &good_data, &layer, 201),
    ] {
        soft_case(&mut failures, case, || {
            let m = oci_manifest(config, std::slice::from_ref(layer), json!({}));
            let r = app.put_manifest("lying/desc", "t", OCI_MANIFEST, &m);
            if status == 400 {
                assert_error(&r, 400, "MANIFEST_INVALID");
            } else {
                r.assert_status(status);
            }
        });
    }
    assert_no_failures(&failures);
}

fn base64_of(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn an_abandoned_monolithic_push_leaves_no_bytes_behind() {
    let app = TestApp::start();
    let bytes = data(2 * 1024 * 1024, 9);
    let digest = sha256(&bytes);
    let mut s = connect(&app.host);
    let head = format!(
        "POST /v2/mono/abort/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        app.host,
        bytes.len()
    );
    s.write_all(head.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    s.write_all(&bytes[..bytes.len() / 2])
        .unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(Duration::from_millis(300));
    drop(s);
    let uploads = app.data_dir.join("uploads");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !files_under(&uploads).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        files_under(&uploads),
        vec![],
        "bytes of the aborted push remain"
    );
    // A monolithic push whose digest is wrong leaves nothing either.
    let r = send(
        app.client()
            .post(app.url(&format!(
                "/v2/mono/abort/blobs/uploads/?digest={}",
                sha256(b"x")
            )))
            .body(b"not x".to_vec()),
    );
    assert_error(&r, 400, "DIGEST_INVALID");
    assert_eq!(files_under(&uploads), vec![]);
}

#[test]
fn orphaned_upload_bytes_and_sessions_without_bytes_are_reclaimed() {
    let app = TestApp::builder()
        .env("BERTH_UPLOAD_PURGE_INTERVAL_SECS", "1")
        .start();
    // Bytes whose session was never recorded (a crash between the two writes), old enough.
    let orphan = app
        .data_dir
        .join("uploads")
        .join("0b8e1a6e-0000-4000-8000-000000000001");
    std::fs::write(&orphan, b"left by a crash").unwrap_or_else(|e| panic!("{e}"));
    let status = std::process::Command::new("touch")
        .args(["-d", "2 hours ago"])
        .arg(&orphan)
        .status()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(status.success());
    // A session whose bytes are gone.
    let loc = app.start_upload("orphans/repo");
    let id = location_path(&loc)
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    std::fs::remove_file(app.data_dir.join("uploads").join(&id)).unwrap_or_else(|e| panic!("{e}"));
    // A fresh upload in progress stays.
    let live = app.start_upload("orphans/repo");
    let deadline = Instant::now() + Duration::from_secs(15);
    while orphan.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!orphan.exists(), "orphaned upload bytes were not reclaimed");
    let r = send(app.client().get(&loc));
    assert_error(&r, 404, "BLOB_UPLOAD_UNKNOWN");
    send(app.client().get(&live)).assert_status(204);
}

#[test]
fn a_push_by_digest_may_carry_tags_and_names_each_in_oci_tag() {
    let app = TestApp::start();
    let m = app.image_manifest("tagged/push", "q", json!({}));
    let digest = sha256(&m);
    let r = send(
        app.client()
            .put(app.url(&format!(
                "/v2/tagged/push/manifests/{digest}?tag=v1&tag=latest"
            )))
            .header("Content-Type", OCI_MANIFEST)
            .body(m.clone()),
    );
    r.assert_status(201);
    let mut applied: Vec<&str> = r
        .headers
        .get_all("oci-tag")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    applied.sort();
    assert_eq!(applied, vec!["latest", "v1"], "{}", r.describe());
    for tag in ["v1", "latest"] {
        let got = app.get(&format!("/v2/tagged/push/manifests/{tag}"));
        assert_eq!(got.header("docker-content-digest"), Some(digest.as_str()));
    }
    let r = send(
        app.client()
            .put(app.url(&format!("/v2/tagged/push/manifests/{digest}?tag=-bad")))
            .header("Content-Type", OCI_MANIFEST)
            .body(m),
    );
    assert_error(&r, 400, "TAG_INVALID");
}

#[test]
fn a_tag_push_may_ask_for_a_sha512_manifest_digest() {
    let app = TestApp::start();
    let m = app.image_manifest("sha512/push", "q", json!({}));
    let digest = sha512(&m);
    let r = send(
        app.client()
            .put(app.url(&format!("/v2/sha512/push/manifests/v1?digest={digest}")))
            .header("Content-Type", OCI_MANIFEST)
            .body(m.clone()),
    );
    r.assert_status(201);
    assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
    let got = app.get("/v2/sha512/push/manifests/v1");
    assert_eq!(got.header("docker-content-digest"), Some(digest.as_str()));
    app.get(&format!("/v2/sha512/push/manifests/{digest}"))
        .assert_status(200);
    // A digest that does not match is refused.
    let r = send(
        app.client()
            .put(app.url(&format!(
                "/v2/sha512/push/manifests/v2?digest={}",
                sha512(b"other")
            )))
            .header("Content-Type", OCI_MANIFEST)
            .body(m),
    );
    assert_error(&r, 400, "DIGEST_INVALID");
}

#[test]
fn a_mount_without_from_finds_the_blob_anywhere() {
    let app = TestApp::start();
    let bytes = data(3000, 21);
    let digest = push_blob(&app, "somewhere/else", &bytes);
    let r = send(
        app.client()
            .post(app.url(&format!("/v2/mount/here/blobs/uploads/?mount={digest}")))
            .header("Content-Length", "0"),
    );
    r.assert_status(201);
    let got = app.get(&format!("/v2/mount/here/blobs/{digest}"));
    got.assert_status(200);
    assert_eq!(got.body, bytes);
    // Unknown anywhere: an ordinary upload starts.
    let r = send(
        app.client()
            .post(app.url(&format!(
                "/v2/mount/here/blobs/uploads/?mount={}",
                sha256(b"nowhere")
            )))
            .header("Content-Length", "0"),
    );
    r.assert_status(202);
}

#[test]
fn a_page_size_past_the_maximum_is_cut_not_overflowed() {
    let app = TestApp::start();
    let m = app.image_manifest("pages/repo", "p", json!({}));
    app.push_manifest("pages/repo", "a", OCI_MANIFEST, &m);
    app.push_manifest("pages/repo", "b", OCI_MANIFEST, &m);
    for path in [
        "/v2/pages/repo/tags/list?n=18446744073709551615",
        "/v2/_catalog?n=18446744073709551615",
        "/v2/pages/repo/tags/list?n=99999999999999999999999",
    ] {
        let r = app.get(path);
        if path.ends_with("999") {
            assert_client_error(&r, &[400]);
            continue;
        }
        r.assert_status(200);
        let body = r.json();
        let items = body["tags"]
            .as_array()
            .or_else(|| body["repositories"].as_array())
            .cloned()
            .unwrap_or_default();
        assert!(!items.is_empty(), "{path}: {}", r.describe());
    }
}
