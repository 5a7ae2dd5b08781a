//! The version check, repository-name routing and validation, error bodies, and unknown paths.

use crate::support::*;
use serde_json::json;

#[test]
fn version_check_returns_200_with_api_version_header() {
    let app = TestApp::start();
    let r = app.get("/v2/");
    r.assert_status(200);
    assert_eq!(
        r.header("docker-distribution-api-version"),
        Some("registry/2.0")
    );
}

#[test]
fn version_check_head_returns_200() {
    let app = TestApp::start();
    let r = app.head("/v2/");
    assert_head_status(&r, 200);
    assert_eq!(
        r.header("docker-distribution-api-version"),
        Some("registry/2.0")
    );
}

#[test]
fn unknown_paths_are_404_never_5xx() {
    let app = TestApp::start();
    let paths = [
        "/",
        "/v1/",
        "/v3/",
        "/v2/foo",
        "/v2/foo/bar",
        "/v2/foo/unknown/thing",
        "/v2/foo/blobs",
        "/v2/foo/manifests",
        "/v2/foo/tags",
        "/v2/foo/tags/lists",
        "/v2/foo/referrers",
        "/favicon.ico",
    ];
    for path in paths {
        let r = app.get(path);
        assert_eq!(r.status, 404, "GET {path}: {}", r.describe());
        if !r.body.is_empty() && r.header("content-type").is_some_and(|c| c.contains("json")) {
            spec_error_codes(&r);
        }
    }
}

#[test]
fn unsupported_methods_are_client_errors_never_5xx() {
    let app = TestApp::start();
    let (digest, _) = push_image(&app, "repo", "v1", "m");
    let cases = [
        ("POST", "/v2/"),
        ("DELETE", "/v2/"),
        ("POST", "/v2/repo/tags/list"),
        ("PUT", "/v2/repo/tags/list"),
        ("POST", &*format!("/v2/repo/manifests/{digest}")),
        ("PATCH", &*format!("/v2/repo/manifests/{digest}")),
        ("PUT", &*format!("/v2/repo/referrers/{digest}")),
    ];
    for (method, path) in cases {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let r = send(app.client().request(m, app.url(path)));
        assert!(
            matches!(r.status, 404 | 405),
            "{method} {path} must be 404 or 405: {}",
            r.describe()
        );
    }
}

#[test]
fn repository_names_may_have_many_components() {
    let app = TestApp::start();
    for repo in [
        "a",
        "a/b",
        "a/b/c/d/e/f/g",
        "my-org/my.app_x/sub--dir/x__y",
        "0/1/2",
    ] {
        let (digest, bytes) = push_image(&app, repo, "latest", repo);
        let r = app.get(&format!("/v2/{repo}/manifests/latest"));
        r.assert_status(200);
        assert_eq!(r.body, bytes, "{repo}");
        let r = app.get(&format!("/v2/{repo}/manifests/{digest}"));
        r.assert_status(200);
        let r = app.get(&format!("/v2/{repo}/tags/list"));
        r.assert_status(200);
        assert_eq!(
            r.json(),
            json!({"name": repo, "tags": ["latest"]}),
            "{repo}"
        );
    }
}

/// Names whose components are the endpoints' own keywords must still route by the rightmost
/// endpoint suffix.
#[test]
fn repository_names_containing_endpoint_keywords_route_correctly() {
    let app = TestApp::start();
    let repos = [
        "manifests",
        "blobs",
        "tags/list",
        "a/manifests/b",
        "x/blobs/uploads",
        "x/blobs/y",
        "referrers/z",
        "v2/v2",
    ];
    for repo in repos {
        let blob = format!("blob in {repo}");
        let d = push_blob(&app, repo, blob.as_bytes());
        let r = app.get(&format!("/v2/{repo}/blobs/{d}"));
        r.assert_status(200);
        assert_eq!(r.body, blob.as_bytes(), "{repo}");

        let loc = app.start_upload(repo);
        let part = b"chunked";
        app.patch_chunk(&loc, 0, part).assert_status(202);
        app.finish_upload(&loc, &sha256(part), None)
            .assert_status(201);
        app.get(&format!("/v2/{repo}/blobs/{}", sha256(part)))
            .assert_status(200);

        let (digest, bytes) = push_image(&app, repo, "t1", repo);
        let r = app.get(&format!("/v2/{repo}/manifests/t1"));
        r.assert_status(200);
        assert_eq!(r.body, bytes, "{repo}");
        let r = app.get(&format!("/v2/{repo}/tags/list"));
        r.assert_status(200);
        assert_eq!(r.json(), json!({"name": repo, "tags": ["t1"]}), "{repo}");
        let r = app.get(&format!("/v2/{repo}/referrers/{digest}"));
        r.assert_status(200);
    }
    // The repositories stay distinct from their prefixes.
    let r = app.get("/v2/x/tags/list");
    assert_error(&r, 404, "NAME_UNKNOWN");
}

#[test]
fn invalid_repository_names_are_400_name_invalid_on_every_endpoint() {
    let app = TestApp::start();
    let digest = sha256(b"whatever");
    let long = "a".repeat(256);
    let names = [
        "Upper",
        "a/Upper",
        "my___app",
        "my._app",
        "-app",
        "app-",
        "_app",
        "app_",
        "a//b",
        "a/-b",
        "a%20b",
        "a!b",
        "a+b",
        "a~b",
        long.as_str(),
    ];
    for name in names {
        let cases: Vec<(&str, String)> = vec![
            ("GET", format!("/v2/{name}/tags/list")),
            ("GET", format!("/v2/{name}/manifests/latest")),
            ("HEAD", format!("/v2/{name}/manifests/latest")),
            ("PUT", format!("/v2/{name}/manifests/latest")),
            ("DELETE", format!("/v2/{name}/manifests/{digest}")),
            ("GET", format!("/v2/{name}/blobs/{digest}")),
            ("HEAD", format!("/v2/{name}/blobs/{digest}")),
            ("DELETE", format!("/v2/{name}/blobs/{digest}")),
            ("POST", format!("/v2/{name}/blobs/uploads/")),
            ("GET", format!("/v2/{name}/referrers/{digest}")),
        ];
        for (method, path) in cases {
            let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
            let mut req = app.client().request(m, app.url(&path));
            if method == "PUT" {
                req = req
                    .header("Content-Type", OCI_MANIFEST)
                    .body(b"{}".to_vec());
            }
            let r = send(req);
            if method == "HEAD" {
                assert_head_status(&r, 400);
            } else {
                assert_error(&r, 400, "NAME_INVALID");
            }
        }
    }
}

#[test]
fn longest_valid_repository_name_is_accepted() {
    let app = TestApp::start();
    // 255 characters in total, made of valid components.
    let name = format!("{}/{}", "a".repeat(127), "b".repeat(127));
    assert_eq!(name.len(), 255);
    let d = push_blob(&app, &name, b"long name");
    app.get(&format!("/v2/{name}/blobs/{d}")).assert_status(200);
}

#[test]
fn error_bodies_are_spec_json_with_code_message_and_detail() {
    let app = TestApp::start();
    let missing = sha256(b"nothing");
    let r = app.get(&format!("/v2/nope/blobs/{missing}"));
    assert_eq!(r.status, 404, "{}", r.describe());
    spec_error_codes(&r);
    let v = r.json();
    let err = &v["errors"][0];
    assert!(err["message"].is_string(), "{v}");
    assert!(
        err.as_object().is_some_and(|o| o
            .keys()
            .all(|k| ["code", "message", "detail"].contains(&k.as_str()))),
        "{v}"
    );
}

#[test]
fn head_errors_have_no_body() {
    let app = TestApp::start();
    push_image(&app, "repo", "v1", "x");
    let missing = sha256(b"missing");
    for path in [
        "/v2/repo/manifests/nope".to_string(),
        format!("/v2/repo/manifests/{missing}"),
        format!("/v2/repo/blobs/{missing}"),
        "/v2/unknown/manifests/v1".to_string(),
        format!("/v2/unknown/blobs/{missing}"),
    ] {
        let r = app.head(&path);
        assert_head_status(&r, 404);
    }
    for path in ["/v2/repo/blobs/sha256:abc", "/v2/Bad/blobs/x"] {
        let r = app.head(path);
        assert_head_status(&r, 400);
    }
    // A reference outside the tag grammar names nothing that could exist.
    assert_head_status(&app.head("/v2/repo/manifests/-bad"), 404);
}

#[test]
fn garbage_requests_are_4xx_with_spec_errors_never_5xx() {
    let app = TestApp::start();
    push_image(&app, "repo", "v1", "g");
    let cases: Vec<(&str, String, Vec<(&str, String)>, Vec<u8>)> = vec![
        ("GET", "/v2/repo/blobs/sha256".into(), vec![], vec![]),
        ("GET", "/v2/repo/blobs/sha256:".into(), vec![], vec![]),
        ("GET", "/v2/repo/blobs/:abc".into(), vec![], vec![]),
        (
            "GET",
            format!("/v2/repo/blobs/sha256:{}", "g".repeat(64)),
            vec![],
            vec![],
        ),
        (
            "GET",
            format!("/v2/repo/manifests/sha256:{}", "0".repeat(63)),
            vec![],
            vec![],
        ),
        ("GET", "/v2/repo/tags/list?n=-1".into(), vec![], vec![]),
        ("GET", "/v2/repo/tags/list?n=abc".into(), vec![], vec![]),
        ("GET", "/v2/_catalog?n=abc".into(), vec![], vec![]),
        (
            "GET",
            "/v2/repo/referrers/not-a-digest".into(),
            vec![],
            vec![],
        ),
        (
            "POST",
            "/v2/repo/blobs/uploads/?digest=nope".into(),
            vec![],
            b"x".to_vec(),
        ),
        ("GET", "/v2/repo/tags/list?n=%ZZ".into(), vec![], vec![]),
        (
            "GET",
            format!("/v2/{}/tags/list", "a".repeat(5000)),
            vec![],
            vec![],
        ),
        (
            "PUT",
            format!("/v2/repo/manifests/{}", "t".repeat(5000)),
            vec![],
            vec![],
        ),
        (
            "POST",
            "/v2/repo/blobs/uploads/?digest=%ZZ".into(),
            vec![],
            b"x".to_vec(),
        ),
        (
            "POST",
            "/v2/repo/blobs/uploads/?digest=sha256%3A%FF".into(),
            vec![],
            b"x".to_vec(),
        ),
        (
            "PUT",
            "/v2/repo/manifests/v2".into(),
            vec![("Content-Type", OCI_MANIFEST.into())],
            vec![0xff, 0xfe, 0x00, 0x01],
        ),
        (
            "PUT",
            "/v2/repo/manifests/v2".into(),
            vec![("Content-Type", OCI_MANIFEST.into())],
            b"null".to_vec(),
        ),
    ];
    let mut failures = Vec::new();
    for (method, path, headers, body) in cases {
        soft_case(&mut failures, &format!("{method} {path}"), || {
            let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
            let mut req = app.client().request(m, app.url(&path)).body(body);
            for (k, v) in headers {
                req = req.header(k, v);
            }
            let r = send(req);
            assert_client_error(&r, &[400]);
        });
    }
    assert_no_failures(&failures);
}
