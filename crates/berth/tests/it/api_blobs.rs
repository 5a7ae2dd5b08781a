//! Pulling, checking, ranging and deleting blobs: `/v2/<name>/blobs/<digest>`.

use crate::support::*;

/// 100 distinct bytes, so every range is recognisable.
fn hundred_bytes() -> Vec<u8> {
    (0u8..100).collect()
}

#[track_caller]
fn assert_blob_headers(r: &Reply, digest: &str, len: usize) {
    assert_eq!(
        r.header("content-length"),
        Some(&*len.to_string()),
        "{}",
        r.describe()
    );
    assert_eq!(
        r.header("content-type"),
        Some("application/octet-stream"),
        "{}",
        r.describe()
    );
    assert_eq!(
        r.header("docker-content-digest"),
        Some(digest),
        "{}",
        r.describe()
    );
    assert_eq!(
        r.header("etag"),
        Some(&*format!("\"{digest}\"")),
        "{}",
        r.describe()
    );
    assert_eq!(r.header("accept-ranges"), Some("bytes"), "{}", r.describe());
}

#[test]
fn get_blob_returns_the_bytes_with_all_headers() {
    let app = TestApp::start();
    let bytes = b"hello blob".to_vec();
    let digest = push_blob(&app, "repo", &bytes);
    let r = app.get(&format!("/v2/repo/blobs/{digest}"));
    r.assert_status(200);
    assert_eq!(r.body, bytes);
    assert_blob_headers(&r, &digest, bytes.len());
    // The digest header matches the body (spec MUST).
    assert_eq!(sha256(&r.body), digest);
}

#[test]
fn head_blob_returns_headers_without_body() {
    let app = TestApp::start();
    let bytes = b"head me".to_vec();
    let digest = push_blob(&app, "repo", &bytes);
    let r = app.head(&format!("/v2/repo/blobs/{digest}"));
    assert_head_status(&r, 200);
    assert_blob_headers(&r, &digest, bytes.len());
}

#[test]
fn empty_blob_round_trips() {
    let app = TestApp::start();
    let digest = push_blob(&app, "repo", b"");
    assert_eq!(
        digest,
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    let r = app.get(&format!("/v2/repo/blobs/{digest}"));
    r.assert_status(200);
    assert!(r.body.is_empty());
    assert_blob_headers(&r, &digest, 0);
    let r = app.head(&format!("/v2/repo/blobs/{digest}"));
    assert_head_status(&r, 200);
    assert_eq!(r.header("content-length"), Some("0"));
}

#[test]
fn large_blob_round_trips_intact() {
    let app = TestApp::start();
    let bytes: Vec<u8> = (0..6 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let digest = push_blob(&app, "big/blob", &bytes);
    let r = app.get(&format!("/v2/big/blob/blobs/{digest}"));
    r.assert_status(200);
    assert_eq!(r.body.len(), bytes.len());
    assert!(r.body == bytes, "large blob bytes differ");
    assert_eq!(sha256(&r.body), digest);
}

#[test]
fn unknown_blob_is_404_blob_unknown() {
    let app = TestApp::start();
    push_blob(&app, "repo", b"something else");
    let missing = sha256(b"never pushed");
    let r = app.get(&format!("/v2/repo/blobs/{missing}"));
    assert_error(&r, 404, "BLOB_UNKNOWN");
    assert_head_status(&app.head(&format!("/v2/repo/blobs/{missing}")), 404);
    let sha512_missing = sha512(b"never pushed");
    let r = app.get(&format!("/v2/repo/blobs/{sha512_missing}"));
    assert_error(&r, 404, "BLOB_UNKNOWN");
}

#[test]
fn blob_in_unknown_repository_is_404() {
    let app = TestApp::start();
    let digest = push_blob(&app, "known", b"data");
    let r = app.get(&format!("/v2/unknown/blobs/{digest}"));
    let codes = assert_client_error(&r, &[404]);
    assert!(
        codes
            .iter()
            .any(|c| c == "BLOB_UNKNOWN" || c == "NAME_UNKNOWN"),
        "{}",
        r.describe()
    );
}

#[test]
fn blob_pushed_to_one_repository_is_not_readable_from_another() {
    let app = TestApp::start();
    let digest = push_blob(&app, "team-a/app", b"private layer");
    push_blob(&app, "team-b/app", b"b has its own blob");
    app.get(&format!("/v2/team-a/app/blobs/{digest}"))
        .assert_status(200);
    for repo in ["team-b/app", "team-a", "team-a/app/sub"] {
        let r = app.get(&format!("/v2/{repo}/blobs/{digest}"));
        assert_eq!(r.status, 404, "{repo}: {}", r.describe());
        assert_head_status(&app.head(&format!("/v2/{repo}/blobs/{digest}")), 404);
    }
    let r = app.get(&format!("/v2/team-b/app/blobs/{digest}"));
    assert_error(&r, 404, "BLOB_UNKNOWN");
}

#[test]
fn satisfiable_ranges_return_206_with_content_range() {
    let app = TestApp::start();
    let bytes = hundred_bytes();
    let digest = push_blob(&app, "repo", &bytes);
    // (Range header, first byte, last byte)
    let cases = [
        ("bytes=0-9", 0, 9),
        ("bytes=0-0", 0, 0),
        ("bytes=10-19", 10, 19),
        ("bytes=99-99", 99, 99),
        ("bytes=10-", 10, 99),
        ("bytes=0-", 0, 99),
        ("bytes=-5", 95, 99),
        ("bytes=-1", 99, 99),
        ("bytes=-100", 0, 99),
        // RFC 9110: a suffix longer than the representation selects all of it.
        ("bytes=-500", 0, 99),
        // RFC 9110: a last-pos at or past the end is clamped to the last byte.
        ("bytes=90-200", 90, 99),
    ];
    for (range, first, last) in cases {
        let r = send(
            app.client()
                .get(app.url(&format!("/v2/repo/blobs/{digest}")))
                .header("Range", range),
        );
        assert_eq!(r.status, 206, "{range}: {}", r.describe());
        assert_eq!(r.body, bytes[first..=last], "{range}");
        assert_eq!(
            r.header("content-range"),
            Some(&*format!("bytes {first}-{last}/100")),
            "{range}: {}",
            r.describe()
        );
        assert_eq!(
            r.header("content-length"),
            Some(&*(last - first + 1).to_string()),
            "{range}: {}",
            r.describe()
        );
    }
}

#[test]
fn unsatisfiable_ranges_are_416_with_total_size() {
    let app = TestApp::start();
    let digest = push_blob(&app, "repo", &hundred_bytes());
    for range in ["bytes=100-", "bytes=100-100", "bytes=200-300", "bytes=-0"] {
        let r = send(
            app.client()
                .get(app.url(&format!("/v2/repo/blobs/{digest}")))
                .header("Range", range),
        );
        assert_eq!(r.status, 416, "{range}: {}", r.describe());
        assert_eq!(
            r.header("content-range"),
            Some("bytes */100"),
            "{range}: {}",
            r.describe()
        );
        if !r.body.is_empty() {
            spec_error_codes(&r);
        }
    }
}

#[test]
fn any_range_of_an_empty_blob_is_416() {
    let app = TestApp::start();
    let digest = push_blob(&app, "repo", b"");
    for range in ["bytes=0-", "bytes=0-0", "bytes=-1"] {
        let r = send(
            app.client()
                .get(app.url(&format!("/v2/repo/blobs/{digest}")))
                .header("Range", range),
        );
        assert_eq!(r.status, 416, "{range}: {}", r.describe());
        assert_eq!(
            r.header("content-range"),
            Some("bytes */0"),
            "{range}: {}",
            r.describe()
        );
    }
}

/// RFC 9110: a Range with a unit the server does not understand MUST be ignored; other
/// malformed ranges may be ignored (200) or rejected (416), but never crash the server.
#[test]
fn malformed_ranges_are_ignored_or_rejected_never_5xx() {
    let app = TestApp::start();
    let bytes = hundred_bytes();
    let digest = push_blob(&app, "repo", &bytes);
    let url = app.url(&format!("/v2/repo/blobs/{digest}"));
    let mut failures = Vec::new();
    for range in ["items=0-5", "lines=1-2"] {
        soft_case(&mut failures, range, || {
            let r = send(app.client().get(&url).header("Range", range));
            assert_eq!(r.status, 200, "{range}: {}", r.describe());
            assert_eq!(r.body, bytes, "{range}");
        });
    }
    let garbage = [
        "bytes=abc",
        "bytes=5-2",
        "bytes=--1",
        "bytes=",
        "bytes=1-2-3",
        "bytes=99999999999999999999999-",
        "bytes=0-99999999999999999999999",
        "bytes=0-1,5-6",
        "bytes 0-5",
        "=",
    ];
    for range in garbage {
        soft_case(&mut failures, range, || {
            let r = send(app.client().get(&url).header("Range", range));
            assert!(
                matches!(r.status, 200 | 206 | 400 | 416),
                "{range:?}: {}",
                r.describe()
            );
            if r.status == 200 {
                assert_eq!(r.body, bytes, "{range:?}");
            }
        });
    }
    assert_no_failures(&failures);
}

#[test]
fn head_with_range_reports_the_partial_length() {
    let app = TestApp::start();
    let digest = push_blob(&app, "repo", &hundred_bytes());
    let r = send(
        app.client()
            .head(app.url(&format!("/v2/repo/blobs/{digest}")))
            .header("Range", "bytes=10-19"),
    );
    assert!(r.body.is_empty());
    match r.status {
        206 => {
            assert_eq!(r.header("content-range"), Some("bytes 10-19/100"));
            assert_eq!(r.header("content-length"), Some("10"));
        }
        200 => assert_eq!(r.header("content-length"), Some("100")),
        s => panic!("HEAD with Range: {s}: {}", r.describe()),
    }
}

#[test]
fn delete_blob_returns_202_then_it_is_unknown() {
    let app = TestApp::start();
    let digest = push_blob(&app, "repo", b"delete me");
    let keep = push_blob(&app, "repo", b"keep me");
    let r = app.delete(&format!("/v2/repo/blobs/{digest}"));
    r.assert_status(202);
    assert_error(
        &app.get(&format!("/v2/repo/blobs/{digest}")),
        404,
        "BLOB_UNKNOWN",
    );
    assert_head_status(&app.head(&format!("/v2/repo/blobs/{digest}")), 404);
    app.get(&format!("/v2/repo/blobs/{keep}"))
        .assert_status(200);
    // A second delete: the blob is not found.
    assert_error(
        &app.delete(&format!("/v2/repo/blobs/{digest}")),
        404,
        "BLOB_UNKNOWN",
    );
}

#[test]
fn deleting_a_blob_in_one_repository_leaves_it_in_another() {
    let app = TestApp::start();
    let bytes = b"shared layer";
    let digest = push_blob(&app, "one", bytes);
    push_blob(&app, "one", b"one keeps another blob");
    push_blob(&app, "two", bytes);
    app.delete(&format!("/v2/one/blobs/{digest}"))
        .assert_status(202);
    assert_error(
        &app.get(&format!("/v2/one/blobs/{digest}")),
        404,
        "BLOB_UNKNOWN",
    );
    let r = app.get(&format!("/v2/two/blobs/{digest}"));
    r.assert_status(200);
    assert_eq!(r.body, bytes);
}

#[test]
fn deleted_blob_can_be_pushed_again() {
    let app = TestApp::start();
    let bytes = b"phoenix";
    let digest = push_blob(&app, "repo", bytes);
    app.delete(&format!("/v2/repo/blobs/{digest}"))
        .assert_status(202);
    push_blob(&app, "repo", bytes);
    let r = app.get(&format!("/v2/repo/blobs/{digest}"));
    r.assert_status(200);
    assert_eq!(r.body, bytes);
}

#[test]
fn delete_unknown_blob_is_404_blob_unknown() {
    let app = TestApp::start();
    push_blob(&app, "repo", b"x");
    let r = app.delete(&format!("/v2/repo/blobs/{}", sha256(b"not here")));
    assert_error(&r, 404, "BLOB_UNKNOWN");
}

#[test]
fn invalid_digests_are_400_digest_invalid() {
    let app = TestApp::start();
    push_blob(&app, "repo", b"x");
    let digests = [
        "sha256:abc".to_string(),
        format!("sha256:{}", "A".repeat(64)),
        format!("sha256:{}", "0".repeat(65)),
        format!("sha256:{}", "0".repeat(128)),
        format!("sha512:{}", "0".repeat(64)),
        "md5:d41d8cd98f00b204e9800998ecf8427e".to_string(),
        format!("SHA256:{}", "0".repeat(64)),
        format!("sha256+b64u:{}", "0".repeat(43)),
        "nodigest".to_string(),
        "sha256:".to_string(),
    ];
    for d in &digests {
        for method in ["GET", "DELETE"] {
            let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
            let r = send(
                app.client()
                    .request(m, app.url(&format!("/v2/repo/blobs/{d}"))),
            );
            assert_error(&r, 400, "DIGEST_INVALID");
        }
        assert_head_status(&app.head(&format!("/v2/repo/blobs/{d}")), 400);
    }
}

#[test]
fn sha512_blob_is_served_by_its_sha512_digest() {
    let app = TestApp::start();
    let bytes = b"five hundred and twelve bits".to_vec();
    let d512 = sha512(&bytes);
    push_blob(&app, "repo", b"repo keeps another blob");
    let loc = app.start_upload("repo");
    app.finish_upload(&loc, &d512, Some(&bytes))
        .assert_status(201);
    let r = app.get(&format!("/v2/repo/blobs/{d512}"));
    r.assert_status(200);
    assert_eq!(r.body, bytes);
    assert_blob_headers(&r, &d512, bytes.len());
    let r = send(
        app.client()
            .get(app.url(&format!("/v2/repo/blobs/{d512}")))
            .header("Range", "bytes=5-"),
    );
    r.assert_status(206);
    assert_eq!(r.body, &bytes[5..]);
    app.delete(&format!("/v2/repo/blobs/{d512}"))
        .assert_status(202);
    assert_error(
        &app.get(&format!("/v2/repo/blobs/{d512}")),
        404,
        "BLOB_UNKNOWN",
    );
}
