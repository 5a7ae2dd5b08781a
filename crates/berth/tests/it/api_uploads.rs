//! Blob uploads: monolithic (POST, POST+PUT), chunked (PATCH), streamed, status, cancel,
//! cross-repository mounts and resumption across a restart.

use crate::support::*;

/// Deterministic pseudo-random bytes.
fn data(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| ((i ^ seed).wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect()
}

#[track_caller]
fn assert_blob(app: &TestApp, repo: &str, digest: &str, bytes: &[u8]) {
    let r = app.get(&format!("/v2/{repo}/blobs/{digest}"));
    r.assert_status(200);
    assert!(
        r.body == bytes,
        "blob {digest} in {repo} differs ({} vs {} bytes)",
        r.body.len(),
        bytes.len()
    );
}

#[track_caller]
fn assert_no_blob(app: &TestApp, repo: &str, digest: &str) {
    assert_error(
        &app.get(&format!("/v2/{repo}/blobs/{digest}")),
        404,
        "BLOB_UNKNOWN",
    );
}

/// A completed upload: 201, Location of the pullable blob, Docker-Content-Digest.
#[track_caller]
fn assert_created_blob(app: &TestApp, r: &Reply, repo: &str, digest: &str) {
    r.assert_status(201);
    assert_eq!(
        location_path(r.must_header("location")),
        format!("/v2/{repo}/blobs/{digest}"),
        "{}",
        r.describe()
    );
    assert_eq!(
        r.header("docker-content-digest"),
        Some(digest),
        "{}",
        r.describe()
    );
    // The Location is pullable.
    let got = send(app.client().get(app.resolve(r.must_header("location"))));
    got.assert_status(200);
}

/// The status of an upload: 204, Location and Range.
#[track_caller]
fn upload_status(app: &TestApp, location: &str) -> Reply {
    let r = send(app.client().get(location));
    r.assert_status(204);
    assert!(r.body.is_empty(), "{}", r.describe());
    r.must_header("location");
    r.must_header("range");
    r
}

#[test]
fn post_starts_a_session_with_location_uuid_and_range() {
    let app = TestApp::start();
    let r = send(
        app.client()
            .post(app.url("/v2/my/repo/blobs/uploads/"))
            .header("Content-Length", "0"),
    );
    r.assert_status(202);
    let uuid = r.must_header("docker-upload-uuid").to_string();
    assert!(is_uuid(&uuid), "Docker-Upload-UUID is not a UUID: {uuid:?}");
    let location = r.must_header("location");
    assert!(
        location.contains(&uuid),
        "Location {location:?} must contain the session UUID {uuid}"
    );
    assert!(
        location_path(location).starts_with("/v2/my/repo/blobs/uploads/"),
        "{location:?}"
    );
    assert_eq!(r.header("range"), Some("0-0"), "{}", r.describe());
}

#[test]
fn each_post_starts_a_distinct_session() {
    let app = TestApp::start();
    let a = app.start_upload("repo");
    let b = app.start_upload("repo");
    assert_ne!(a, b);
    let (da, db) = (b"first".to_vec(), b"second".to_vec());
    app.patch_chunk(&b, 0, &db).assert_status(202);
    app.patch_chunk(&a, 0, &da).assert_status(202);
    let r = app.finish_upload(&a, &sha256(&da), None);
    assert_created_blob(&app, &r, "repo", &sha256(&da));
    let r = app.finish_upload(&b, &sha256(&db), None);
    assert_created_blob(&app, &r, "repo", &sha256(&db));
    assert_blob(&app, "repo", &sha256(&da), &da);
    assert_blob(&app, "repo", &sha256(&db), &db);
}

#[test]
fn monolithic_post_with_digest_creates_the_blob() {
    let app = TestApp::start();
    let bytes = data(5000, 1);
    let digest = sha256(&bytes);
    let r = send(
        app.client()
            .post(app.url(&format!("/v2/a/b/blobs/uploads/?digest={digest}")))
            .header("Content-Type", "application/octet-stream")
            .body(bytes.clone()),
    );
    assert_created_blob(&app, &r, "a/b", &digest);
    assert_blob(&app, "a/b", &digest, &bytes);
}

#[test]
fn monolithic_post_with_sha512_digest_creates_the_blob() {
    let app = TestApp::start();
    let bytes = data(3000, 2);
    let digest = sha512(&bytes);
    let r = send(
        app.client()
            .post(app.url(&format!("/v2/repo/blobs/uploads/?digest={digest}")))
            .header("Content-Type", "application/octet-stream")
            .body(bytes.clone()),
    );
    assert_created_blob(&app, &r, "repo", &digest);
    assert_blob(&app, "repo", &digest, &bytes);
}

#[test]
fn monolithic_post_with_wrong_digest_is_400_and_stores_nothing() {
    let app = TestApp::start();
    let bytes = b"actual content".to_vec();
    let claimed = sha256(b"other content");
    let r = send(
        app.client()
            .post(app.url(&format!("/v2/repo/blobs/uploads/?digest={claimed}")))
            .header("Content-Type", "application/octet-stream")
            .body(bytes.clone()),
    );
    assert_error(&r, 400, "DIGEST_INVALID");
    push_blob(&app, "repo", b"make the repo exist");
    assert_no_blob(&app, "repo", &claimed);
    assert_no_blob(&app, "repo", &sha256(&bytes));
}

#[test]
fn post_then_put_creates_the_blob() {
    let app = TestApp::start();
    let bytes = data(10_000, 3);
    let digest = sha256(&bytes);
    let loc = app.start_upload("repo");
    let r = app.finish_upload(&loc, &digest, Some(&bytes));
    assert_created_blob(&app, &r, "repo", &digest);
    assert_blob(&app, "repo", &digest, &bytes);
}

#[test]
fn chunked_upload_with_content_ranges() {
    let app = TestApp::start();
    let bytes = data(3 * 1024 * 1024 + 17, 4);
    let digest = sha256(&bytes);
    let mut loc = app.start_upload("chunked/repo");
    let mut start = 0;
    for chunk in bytes.chunks(1024 * 1024) {
        let r = app.patch_chunk(&loc, start, chunk);
        r.assert_status(202);
        start += chunk.len();
        assert_eq!(
            r.header("range"),
            Some(&*format!("0-{}", start - 1)),
            "{}",
            r.describe()
        );
        loc = app.resolve(r.must_header("location"));
        assert!(
            location_path(&loc).starts_with("/v2/chunked/repo/blobs/uploads/"),
            "{loc}"
        );
    }
    let r = upload_status(&app, &loc);
    assert_eq!(r.header("range"), Some(&*format!("0-{}", bytes.len() - 1)));
    let r = app.finish_upload(&loc, &digest, None);
    assert_created_blob(&app, &r, "chunked/repo", &digest);
    assert_blob(&app, "chunked/repo", &digest, &bytes);
}

#[test]
fn chunked_upload_with_last_chunk_in_put_with_content_range() {
    let app = TestApp::start();
    let bytes = data(3000, 5);
    let digest = sha256(&bytes);
    let loc = app.start_upload("repo");
    let r = app.patch_chunk(&loc, 0, &bytes[..1000]);
    r.assert_status(202);
    let loc = app.resolve(r.must_header("location"));
    let r = send(
        app.client()
            .put(with_query(&loc, &format!("digest={digest}")))
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", "1000-2999")
            .body(bytes[1000..].to_vec()),
    );
    assert_created_blob(&app, &r, "repo", &digest);
    assert_blob(&app, "repo", &digest, &bytes);
}

#[test]
fn chunked_upload_with_last_chunk_in_put_without_content_range() {
    let app = TestApp::start();
    let bytes = data(3000, 6);
    let digest = sha256(&bytes);
    let loc = app.start_upload("repo");
    let r = app.patch_chunk(&loc, 0, &bytes[..1234]);
    r.assert_status(202);
    let loc = app.resolve(r.must_header("location"));
    let r = app.finish_upload(&loc, &digest, Some(&bytes[1234..]));
    assert_created_blob(&app, &r, "repo", &digest);
    assert_blob(&app, "repo", &digest, &bytes);
}

#[test]
fn streamed_patches_without_content_range_append() {
    let app = TestApp::start();
    let bytes = data(7000, 7);
    let digest = sha256(&bytes);
    let mut loc = app.start_upload("repo");
    let mut sent = 0;
    for part in [&bytes[..100], &bytes[100..4000], &bytes[4000..]] {
        let r = send(
            app.client()
                .patch(&loc)
                .header("Content-Type", "application/octet-stream")
                .body(part.to_vec()),
        );
        r.assert_status(202);
        sent += part.len();
        assert_eq!(
            r.header("range"),
            Some(&*format!("0-{}", sent - 1)),
            "{}",
            r.describe()
        );
        loc = app.resolve(r.must_header("location"));
    }
    let r = app.finish_upload(&loc, &digest, None);
    assert_created_blob(&app, &r, "repo", &digest);
    assert_blob(&app, "repo", &digest, &bytes);
}

#[test]
fn patch_with_chunked_transfer_encoding_appends() {
    let app = TestApp::start();
    let bytes = data(200_000, 8);
    let digest = sha256(&bytes);
    let loc = app.start_upload("repo");
    // A reader body has no known length: reqwest sends it with Transfer-Encoding: chunked.
    let body = reqwest::blocking::Body::new(std::io::Cursor::new(bytes.clone()));
    let r = send(
        app.client()
            .patch(&loc)
            .header("Content-Type", "application/octet-stream")
            .body(body),
    );
    r.assert_status(202);
    assert_eq!(
        r.header("range"),
        Some(&*format!("0-{}", bytes.len() - 1)),
        "{}",
        r.describe()
    );
    let loc = app.resolve(r.must_header("location"));
    let r = app.finish_upload(&loc, &digest, None);
    assert_created_blob(&app, &r, "repo", &digest);
    assert_blob(&app, "repo", &digest, &bytes);
}

#[test]
fn put_with_chunked_transfer_encoding_body_completes() {
    let app = TestApp::start();
    let bytes = data(150_000, 9);
    let digest = sha256(&bytes);
    let loc = app.start_upload("repo");
    let body = reqwest::blocking::Body::new(std::io::Cursor::new(bytes.clone()));
    let r = send(
        app.client()
            .put(with_query(&loc, &format!("digest={digest}")))
            .header("Content-Type", "application/octet-stream")
            .body(body),
    );
    assert_created_blob(&app, &r, "repo", &digest);
    assert_blob(&app, "repo", &digest, &bytes);
}

#[test]
fn out_of_order_chunks_are_416_with_the_current_range() {
    let app = TestApp::start();
    let bytes = data(30, 10);
    let loc = app.start_upload("repo");
    // The first chunk must start at 0.
    let r = app.patch_chunk(&loc, 5, &bytes[5..10]);
    assert_eq!(r.status, 416, "{}", r.describe());
    let r = app.patch_chunk(&loc, 0, &bytes[..10]);
    r.assert_status(202);
    let loc = app.resolve(r.must_header("location"));
    // (start, end) of chunks that do not begin at byte 10.
    for (start, end) in [
        (0usize, 9usize),
        (5, 14),
        (9, 19),
        (11, 20),
        (20, 29),
        (0, 29),
    ] {
        let r = app.patch_chunk(&loc, start, &bytes[start..=end]);
        assert_eq!(r.status, 416, "chunk {start}-{end}: {}", r.describe());
        assert_eq!(
            r.header("range"),
            Some("0-9"),
            "chunk {start}-{end}: {}",
            r.describe()
        );
        if !r.body.is_empty() {
            spec_error_codes(&r);
        }
    }
    // Rejected chunks changed nothing: the upload continues from byte 10.
    let r = upload_status(&app, &loc);
    assert_eq!(r.header("range"), Some("0-9"));
    let r = app.patch_chunk(&loc, 10, &bytes[10..]);
    r.assert_status(202);
    assert_eq!(r.header("range"), Some("0-29"));
    let loc = app.resolve(r.must_header("location"));
    let r = app.finish_upload(&loc, &sha256(&bytes), None);
    assert_created_blob(&app, &r, "repo", &sha256(&bytes));
    assert_blob(&app, "repo", &sha256(&bytes), &bytes);
}

#[test]
fn malformed_content_range_is_a_client_error_and_changes_nothing() {
    let app = TestApp::start();
    let loc = app.start_upload("repo");
    let r = app.patch_chunk(&loc, 0, b"0123456789");
    r.assert_status(202);
    let loc = app.resolve(r.must_header("location"));
    let body = b"abcde".to_vec();
    let ranges = [
        "abc",
        "10-",
        "-14",
        "14-10",
        "10-14-15",
        "ten-fourteen",
        "10-99999999999999999999999",
        "99999999999999999999999-10",
        // Claims more or fewer bytes than the body carries.
        "10-20",
        "10-12",
    ];
    for cr in ranges {
        let r = send(
            app.client()
                .patch(&loc)
                .header("Content-Type", "application/octet-stream")
                .header("Content-Range", cr)
                .body(body.clone()),
        );
        assert!(
            matches!(r.status, 400 | 416),
            "Content-Range {cr:?}: {}",
            r.describe()
        );
        if r.status == 400 || !r.body.is_empty() {
            spec_error_codes(&r);
        }
    }
    let r = upload_status(&app, &loc);
    assert_eq!(r.header("range"), Some("0-9"), "{}", r.describe());
}

#[test]
fn upload_status_reports_range_and_location() {
    let app = TestApp::start();
    let loc = app.start_upload("repo");
    let r = upload_status(&app, &loc);
    assert_eq!(r.header("range"), Some("0-0"), "{}", r.describe());
    let uuid_loc = location_path(&loc);
    let status_loc = location_path(r.must_header("location"));
    assert_eq!(
        status_loc.split('?').next(),
        uuid_loc.split('?').next(),
        "status Location must name the same session"
    );
    app.patch_chunk(&loc, 0, &data(4096, 11)).assert_status(202);
    let r = upload_status(&app, &loc);
    assert_eq!(r.header("range"), Some("0-4095"), "{}", r.describe());
    // Continue from the Location the status reported.
    let next = app.resolve(r.must_header("location"));
    app.patch_chunk(&next, 4096, b"tail").assert_status(202);
    let mut all = data(4096, 11);
    all.extend_from_slice(b"tail");
    let r = app.finish_upload(&next, &sha256(&all), None);
    assert_created_blob(&app, &r, "repo", &sha256(&all));
}

#[test]
fn cancelled_upload_is_gone() {
    let app = TestApp::start();
    let loc = app.start_upload("repo");
    app.patch_chunk(&loc, 0, b"partial").assert_status(202);
    let r = send(app.client().delete(&loc));
    r.assert_status(204);
    assert_error(&send(app.client().get(&loc)), 404, "BLOB_UPLOAD_UNKNOWN");
    assert_error(
        &app.patch_chunk(&loc, 7, b"more"),
        404,
        "BLOB_UPLOAD_UNKNOWN",
    );
    assert_error(
        &app.finish_upload(&loc, &sha256(b"partial"), None),
        404,
        "BLOB_UPLOAD_UNKNOWN",
    );
    assert_error(&send(app.client().delete(&loc)), 404, "BLOB_UPLOAD_UNKNOWN");
    push_blob(&app, "repo", b"exists");
    assert_no_blob(&app, "repo", &sha256(b"partial"));
}

#[test]
fn completed_upload_session_is_gone() {
    let app = TestApp::start();
    let loc = app.start_upload("repo");
    app.finish_upload(&loc, &sha256(b"done"), Some(b"done"))
        .assert_status(201);
    assert_error(&send(app.client().get(&loc)), 404, "BLOB_UPLOAD_UNKNOWN");
    assert_error(
        &app.patch_chunk(&loc, 4, b"more"),
        404,
        "BLOB_UPLOAD_UNKNOWN",
    );
    assert_error(
        &app.finish_upload(&loc, &sha256(b"done"), Some(b"")),
        404,
        "BLOB_UPLOAD_UNKNOWN",
    );
}

#[test]
fn unknown_upload_ids_are_404_blob_upload_unknown() {
    let app = TestApp::start();
    push_blob(&app, "repo", b"the repository exists");
    app.start_upload("repo");
    let digest = sha256(b"x");
    for id in [
        "3f1c7a4e-1b2d-4c3e-9f8a-0123456789ab",
        "not-a-uuid",
        "0",
        "zzzz",
    ] {
        let url = app.url(&format!("/v2/repo/blobs/uploads/{id}"));
        assert_error(&send(app.client().get(&url)), 404, "BLOB_UPLOAD_UNKNOWN");
        assert_error(&app.patch_chunk(&url, 0, b"x"), 404, "BLOB_UPLOAD_UNKNOWN");
        assert_error(
            &app.finish_upload(&url, &digest, Some(b"x")),
            404,
            "BLOB_UPLOAD_UNKNOWN",
        );
        assert_error(&send(app.client().delete(&url)), 404, "BLOB_UPLOAD_UNKNOWN");
    }
    assert_no_blob(&app, "repo", &digest);
}

#[test]
fn upload_session_belongs_to_its_repository() {
    let app = TestApp::start();
    push_blob(&app, "intruder/repo", b"the other repository exists");
    let loc = app.start_upload("owner/repo");
    let path = location_path(&loc);
    let id_part = path
        .strip_prefix("/v2/owner/repo/blobs/uploads/")
        .unwrap_or_else(|| panic!("unexpected upload location {path}"))
        .to_string();
    let other = app.url(&format!("/v2/intruder/repo/blobs/uploads/{id_part}"));
    assert_error(&send(app.client().get(&other)), 404, "BLOB_UPLOAD_UNKNOWN");
    assert_error(
        &app.patch_chunk(&other, 0, b"evil"),
        404,
        "BLOB_UPLOAD_UNKNOWN",
    );
    assert_error(
        &app.finish_upload(&other, &sha256(b"evil"), Some(b"evil")),
        404,
        "BLOB_UPLOAD_UNKNOWN",
    );
    assert_error(
        &send(app.client().delete(&other)),
        404,
        "BLOB_UPLOAD_UNKNOWN",
    );
    // The session itself is untouched.
    let r = upload_status(&app, &loc);
    assert_eq!(r.header("range"), Some("0-0"));
}

#[test]
fn digest_mismatch_at_put_is_400_and_the_blob_is_not_readable() {
    let app = TestApp::start();
    let bytes = data(2048, 12);
    let wrong = sha256(b"something else entirely");
    let loc = app.start_upload("repo");
    app.patch_chunk(&loc, 0, &bytes).assert_status(202);
    let r = app.finish_upload(&loc, &wrong, None);
    assert_error(&r, 400, "DIGEST_INVALID");
    push_blob(&app, "repo", b"make the repo exist");
    assert_no_blob(&app, "repo", &wrong);
    assert_no_blob(&app, "repo", &sha256(&bytes));
    // Same with the content in the PUT body, and with a sha512 claim.
    let loc = app.start_upload("repo");
    let r = app.finish_upload(&loc, &sha512(b"nope"), Some(&bytes));
    assert_error(&r, 400, "DIGEST_INVALID");
    assert_no_blob(&app, "repo", &sha512(b"nope"));
    assert_no_blob(&app, "repo", &sha256(&bytes));
}

#[test]
fn put_without_digest_is_400_digest_invalid() {
    let app = TestApp::start();
    let loc = app.start_upload("repo");
    app.patch_chunk(&loc, 0, b"content").assert_status(202);
    let r = send(app.client().put(&loc));
    assert_error(&r, 400, "DIGEST_INVALID");
    let r = send(
        app.client()
            .put(&loc)
            .header("Content-Type", "application/octet-stream")
            .body(b"more".to_vec()),
    );
    assert_error(&r, 400, "DIGEST_INVALID");
    let r = send(app.client().put(with_query(&loc, "digest=")));
    assert_error(&r, 400, "DIGEST_INVALID");
}

#[test]
fn put_with_malformed_or_unsupported_digest_is_400_digest_invalid() {
    let app = TestApp::start();
    let bytes = b"payload".to_vec();
    let digests = [
        "sha256:abc".to_string(),
        "garbage".to_string(),
        format!("sha256:{}", sha256(&bytes)[7..].to_uppercase()),
        format!("md5:{}", "0".repeat(32)),
        format!("sha384:{}", "0".repeat(96)),
        format!("sha512:{}", "0".repeat(64)),
    ];
    for d in digests {
        let loc = app.start_upload("repo");
        let r = app.finish_upload(&loc, &pct(&d), Some(&bytes));
        assert_error(&r, 400, "DIGEST_INVALID");
        let r = send(
            app.client()
                .post(app.url(&format!("/v2/repo/blobs/uploads/?digest={}", pct(&d))))
                .header("Content-Type", "application/octet-stream")
                .body(bytes.clone()),
        );
        assert_error(&r, 400, "DIGEST_INVALID");
    }
}

#[test]
fn sha512_chunked_upload_completes() {
    let app = TestApp::start();
    let bytes = data(100_000, 13);
    let digest = sha512(&bytes);
    let loc = app.start_upload("repo");
    let r = app.patch_chunk(&loc, 0, &bytes[..60_000]);
    r.assert_status(202);
    let loc = app.resolve(r.must_header("location"));
    let r = app.patch_chunk(&loc, 60_000, &bytes[60_000..]);
    r.assert_status(202);
    let loc = app.resolve(r.must_header("location"));
    let r = app.finish_upload(&loc, &digest, None);
    assert_created_blob(&app, &r, "repo", &digest);
    assert_blob(&app, "repo", &digest, &bytes);
    // The sha256 digest of the same bytes was never stored.
    assert_no_blob(&app, "repo", &sha256(&bytes));
}

#[test]
fn pushing_an_existing_blob_again_succeeds() {
    let app = TestApp::start();
    let bytes = b"twice".to_vec();
    let d1 = push_blob(&app, "repo", &bytes);
    let d2 = push_blob(&app, "repo", &bytes);
    assert_eq!(d1, d2);
    let loc = app.start_upload("repo");
    let r = app.finish_upload(&loc, &d1, Some(&bytes));
    assert_created_blob(&app, &r, "repo", &d1);
    assert_blob(&app, "repo", &d1, &bytes);
}

#[test]
fn cross_repository_mount_of_an_existing_blob_is_201() {
    let app = TestApp::start();
    let bytes = data(4000, 14);
    let digest = push_blob(&app, "src/repo", &bytes);
    push_blob(&app, "src/repo", b"src keeps another blob");
    let r = send(
        app.client()
            .post(app.url(&format!(
                "/v2/dst/repo/blobs/uploads/?mount={digest}&from=src/repo"
            )))
            .header("Content-Length", "0"),
    );
    assert_created_blob(&app, &r, "dst/repo", &digest);
    assert_blob(&app, "dst/repo", &digest, &bytes);
    // The mount is independent of its source afterwards.
    app.delete(&format!("/v2/src/repo/blobs/{digest}"))
        .assert_status(202);
    assert_no_blob(&app, "src/repo", &digest);
    assert_blob(&app, "dst/repo", &digest, &bytes);
}

#[test]
fn cross_repository_mount_of_a_sha512_blob_is_201() {
    let app = TestApp::start();
    let bytes = data(1000, 15);
    let digest = sha512(&bytes);
    let loc = app.start_upload("a");
    app.finish_upload(&loc, &digest, Some(&bytes))
        .assert_status(201);
    let r = send(
        app.client()
            .post(app.url(&format!("/v2/b/blobs/uploads/?mount={digest}&from=a"))),
    );
    assert_created_blob(&app, &r, "b", &digest);
    assert_blob(&app, "b", &digest, &bytes);
}

#[test]
fn mount_that_cannot_be_satisfied_starts_an_ordinary_upload() {
    let app = TestApp::start();
    let bytes = data(500, 16);
    let digest = sha256(&bytes);
    push_blob(&app, "a", b"a exists but lacks the blob");
    push_blob(&app, "b", b"b exists too");
    // The blob is in c, not in a: mounting from a must not leak c's blob.
    push_blob(&app, "c", &bytes);
    for from in ["a", "nonexistent", "b"] {
        let r = send(
            app.client()
                .post(app.url(&format!("/v2/b/blobs/uploads/?mount={digest}&from={from}")))
                .header("Content-Length", "0"),
        );
        r.assert_status(202);
        let loc = app.resolve(r.must_header("location"));
        assert!(
            location_path(&loc).starts_with("/v2/b/blobs/uploads/"),
            "{loc}"
        );
        if from == "b" {
            // Complete one of them as an ordinary upload.
            let r = app.finish_upload(&loc, &digest, Some(&bytes));
            assert_created_blob(&app, &r, "b", &digest);
        } else {
            assert_no_blob(&app, "b", &digest);
        }
    }
    assert_blob(&app, "b", &digest, &bytes);
}

#[test]
fn mount_with_garbage_parameters_is_202_or_400_never_5xx() {
    let app = TestApp::start();
    let digest = push_blob(&app, "a", b"mountable");
    let queries = [
        "mount=notadigest&from=a".to_string(),
        format!("mount={digest}&from=Invalid_Name-"),
        format!("mount={digest}&from="),
        "mount=&from=a".to_string(),
        format!("mount=sha256:{}&from=a", "0".repeat(10)),
    ];
    for q in queries {
        let r = send(
            app.client()
                .post(app.url(&format!("/v2/b/blobs/uploads/?{q}"))),
        );
        assert!(matches!(r.status, 201 | 202 | 400), "{q}: {}", r.describe());
        if r.status == 400 {
            spec_error_codes(&r);
        }
        if r.status == 201 {
            // Only an empty `from` may still mount (the registry MAY treat it as optional).
            assert!(q.ends_with("from="), "{q}: {}", r.describe());
        }
    }
}

#[test]
fn upload_survives_a_server_restart() {
    let mut app = TestApp::start();
    let bytes = data(50_000, 17);
    let digest = sha256(&bytes);
    let loc = app.start_upload("durable/repo");
    let r = app.patch_chunk(&loc, 0, &bytes[..20_000]);
    r.assert_status(202);
    let loc = app.resolve(r.must_header("location"));
    let base_before = app.base.clone();

    app.restart();
    assert_eq!(app.base, base_before, "restart must keep the address");

    let r = upload_status(&app, &loc);
    assert_eq!(r.header("range"), Some("0-19999"), "{}", r.describe());
    let loc = app.resolve(r.must_header("location"));
    let r = app.patch_chunk(&loc, 20_000, &bytes[20_000..]);
    r.assert_status(202);
    assert_eq!(r.header("range"), Some("0-49999"));
    let loc = app.resolve(r.must_header("location"));
    let r = app.finish_upload(&loc, &digest, None);
    assert_created_blob(&app, &r, "durable/repo", &digest);
    assert_blob(&app, "durable/repo", &digest, &bytes);

    // And the blob itself survives another restart.
    app.restart();
    assert_blob(&app, "durable/repo", &digest, &bytes);
}

#[test]
fn completed_blob_is_only_visible_in_its_repository() {
    let app = TestApp::start();
    let bytes = b"scoped".to_vec();
    let digest = sha256(&bytes);
    let loc = app.start_upload("x");
    app.finish_upload(&loc, &digest, Some(&bytes))
        .assert_status(201);
    push_blob(&app, "y", b"y exists");
    assert_blob(&app, "x", &digest, &bytes);
    assert_no_blob(&app, "y", &digest);
}

#[test]
fn last_chunk_in_put_out_of_order_is_416() {
    let app = TestApp::start();
    let bytes = data(100, 18);
    let loc = app.start_upload("repo");
    let r = app.patch_chunk(&loc, 0, &bytes[..40]);
    r.assert_status(202);
    let loc = app.resolve(r.must_header("location"));
    // The final chunk claims to start at 50, but 40 bytes have been received.
    let r = send(
        app.client()
            .put(with_query(&loc, &format!("digest={}", sha256(&bytes))))
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", "50-99")
            .body(bytes[50..].to_vec()),
    );
    assert_eq!(r.status, 416, "{}", r.describe());
    push_blob(&app, "repo", b"the repository exists");
    assert_no_blob(&app, "repo", &sha256(&bytes));
    // The session is still usable from where it was.
    let r = upload_status(&app, &loc);
    assert_eq!(r.header("range"), Some("0-39"));
    let r = send(
        app.client()
            .put(with_query(&loc, &format!("digest={}", sha256(&bytes))))
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", "40-99")
            .body(bytes[40..].to_vec()),
    );
    assert_created_blob(&app, &r, "repo", &sha256(&bytes));
    assert_blob(&app, "repo", &sha256(&bytes), &bytes);
}

#[test]
fn concurrent_uploads_of_the_same_blob_all_succeed() {
    let app = TestApp::start();
    let bytes = data(300_000, 19);
    let digest = sha256(&bytes);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|i| {
                let (app, bytes, digest) = (&app, &bytes, &digest);
                s.spawn(move || {
                    if i % 2 == 0 {
                        let loc = app.start_upload("race");
                        let r = app.patch_chunk(&loc, 0, &bytes[..100_000]);
                        r.assert_status(202);
                        let loc = app.resolve(r.must_header("location"));
                        app.finish_upload(&loc, digest, Some(&bytes[100_000..]))
                    } else {
                        send(
                            app.client()
                                .post(app.url(&format!("/v2/race/blobs/uploads/?digest={digest}")))
                                .header("Content-Type", "application/octet-stream")
                                .body(bytes.clone()),
                        )
                    }
                })
            })
            .collect();
        for h in handles {
            let r = h.join().expect("upload thread");
            assert_eq!(r.status, 201, "{}", r.describe());
        }
    });
    assert_blob(&app, "race", &digest, &bytes);
}

#[test]
fn mount_into_a_repository_that_already_has_the_blob_is_201() {
    let app = TestApp::start();
    let bytes = b"already here".to_vec();
    let digest = push_blob(&app, "a", &bytes);
    push_blob(&app, "b", &bytes);
    let r = send(
        app.client()
            .post(app.url(&format!("/v2/b/blobs/uploads/?mount={digest}&from=a"))),
    );
    assert_created_blob(&app, &r, "b", &digest);
    let r = send(
        app.client()
            .post(app.url(&format!("/v2/a/blobs/uploads/?mount={digest}&from=a"))),
    );
    assert_created_blob(&app, &r, "a", &digest);
    assert_blob(&app, "b", &digest, &bytes);
}

#[test]
fn malformed_content_range_on_put_is_a_client_error_and_changes_nothing() {
    let app = TestApp::start();
    let bytes = data(20, 20);
    let mut failures = Vec::new();
    for cr in ["abc", "10-", "19-10", "10-12", "10-30", "0-9"] {
        soft_case(&mut failures, cr, || {
            // A fresh session per case, holding the first 10 bytes.
            let loc = app.start_upload("repo");
            let r = app.patch_chunk(&loc, 0, &bytes[..10]);
            r.assert_status(202);
            let loc = app.resolve(r.must_header("location"));
            let r = send(
                app.client()
                    .put(with_query(&loc, &format!("digest={}", sha256(&bytes))))
                    .header("Content-Type", "application/octet-stream")
                    .header("Content-Range", cr)
                    .body(bytes[10..].to_vec()),
            );
            assert!(
                matches!(r.status, 400 | 416),
                "Content-Range {cr:?}: {}",
                r.describe()
            );
            let status = upload_status(&app, &loc);
            assert_eq!(status.header("range"), Some("0-9"), "after {cr:?}");
        });
    }
    assert_no_failures(&failures);
}
