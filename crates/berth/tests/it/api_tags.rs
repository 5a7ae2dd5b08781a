//! Listing tags (`/v2/<name>/tags/list`) and repositories (`/v2/_catalog`), with pagination.

use crate::support::*;
use serde_json::{Value, json};

/// Pushes one image and tags it with every tag, in the given order.
fn tag_all(app: &TestApp, repo: &str, tags: &[&str]) {
    let body = app.image_manifest(repo, "tagged", json!({}));
    for t in tags {
        app.push_manifest(repo, t, OCI_MANIFEST, &body);
    }
}

fn list(app: &TestApp, path: &str) -> Reply {
    let r = app.get(path);
    r.assert_status(200);
    let ct = r.header("content-type").unwrap_or("");
    assert_eq!(
        ct.split(';').next().map(str::trim),
        Some("application/json"),
        "{}",
        r.describe()
    );
    r
}

/// The target of a `Link: <url>; rel="next"` header.
fn next_link(r: &Reply) -> Option<String> {
    let link = r.header("link")?;
    let rest = link
        .trim()
        .strip_prefix('<')
        .unwrap_or_else(|| panic!("bad Link {link:?}"));
    let (url, params) = rest
        .split_once('>')
        .unwrap_or_else(|| panic!("bad Link {link:?}"));
    assert!(
        params.replace(' ', "").contains("rel=\"next\""),
        "Link must have rel=\"next\": {link:?}"
    );
    Some(url.to_string())
}

/// Follows Link headers from `first`, returning every page's items under `key`.
fn walk(app: &TestApp, first: &str, key: &str) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut path = first.to_string();
    for _ in 0..100 {
        let r = list(app, &path);
        let items: Vec<String> = r.json()[key]
            .as_array()
            .unwrap_or_else(|| panic!("no {key} array: {}", r.describe()))
            .iter()
            .map(|v| v.as_str().expect("string").to_string())
            .collect();
        pages.push(items);
        match next_link(&r) {
            Some(next) => path = location_path(&next),
            None => return pages,
        }
    }
    panic!("pagination did not terminate");
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().expect("string").to_string())
        .collect()
}

#[test]
fn tags_are_listed_in_lexical_order() {
    let app = TestApp::start();
    let pushed = [
        "v2", "latest", "v10", "1.0", "a-b", "a.b", "alpha", "0", "v1",
    ];
    tag_all(&app, "my/repo", &pushed);
    let r = list(&app, "/v2/my/repo/tags/list");
    assert_eq!(
        r.json(),
        json!({"name": "my/repo", "tags": ["0", "1.0", "a-b", "a.b", "alpha", "latest", "v1", "v10", "v2"]})
    );
    assert_eq!(r.header("link"), None);
}

/// The spec says lexical order, described both as case-insensitive and as ASCII order in its
/// versions: either is accepted, but it must be one of them consistently.
#[test]
fn mixed_case_tags_are_in_case_insensitive_or_ascii_order() {
    let app = TestApp::start();
    tag_all(&app, "repo", &["b", "B", "a", "C", "_x", "Z9", "z1"]);
    let got = strings(&list(&app, "/v2/repo/tags/list").json()["tags"]);
    let mut ascii = got.clone();
    ascii.sort();
    let mut folded = got.clone();
    folded.sort_by_key(|t| (t.to_lowercase(), t.clone()));
    assert!(
        got == ascii || got == folded,
        "tags not in lexical order: {got:?}"
    );
    assert_eq!(got.len(), 7);
}

#[test]
fn unknown_repository_tags_list_is_404_name_unknown() {
    let app = TestApp::start();
    push_image(&app, "known", "v1", "x");
    for repo in ["unknown", "known/sub", "kno"] {
        assert_error(
            &app.get(&format!("/v2/{repo}/tags/list")),
            404,
            "NAME_UNKNOWN",
        );
    }
}

#[test]
fn repository_with_only_untagged_manifests_has_an_empty_tag_list() {
    let app = TestApp::start();
    let body = app.image_manifest("repo", "untagged", json!({}));
    app.push_manifest("repo", &sha256(&body), OCI_MANIFEST, &body);
    let v = list(&app, "/v2/repo/tags/list").json();
    assert_eq!(v["name"], "repo");
    assert!(v["tags"] == json!([]) || v["tags"].is_null(), "{v}");
}

#[test]
fn tags_are_paginated_with_n_and_link_headers() {
    let app = TestApp::start();
    tag_all(&app, "repo", &["e", "c", "a", "d", "b"]);
    let r = list(&app, "/v2/repo/tags/list?n=2");
    assert_eq!(r.json(), json!({"name": "repo", "tags": ["a", "b"]}));
    assert_eq!(
        r.header("link"),
        Some("</v2/repo/tags/list?n=2&last=b>; rel=\"next\"")
    );
    let r = list(&app, "/v2/repo/tags/list?n=2&last=b");
    assert_eq!(r.json(), json!({"name": "repo", "tags": ["c", "d"]}));
    assert_eq!(
        r.header("link"),
        Some("</v2/repo/tags/list?n=2&last=d>; rel=\"next\"")
    );
    let r = list(&app, "/v2/repo/tags/list?n=2&last=d");
    assert_eq!(r.json(), json!({"name": "repo", "tags": ["e"]}));
    assert_eq!(r.header("link"), None, "{}", r.describe());
    // Following the links visits every tag once.
    let pages = walk(&app, "/v2/repo/tags/list?n=2", "tags");
    assert_eq!(pages, vec![vec!["a", "b"], vec!["c", "d"], vec!["e"]]);
}

#[test]
fn nested_repository_link_header_names_the_repository() {
    let app = TestApp::start();
    tag_all(&app, "org/team/app", &["t1", "t2", "t3"]);
    let r = list(&app, "/v2/org/team/app/tags/list?n=1");
    assert_eq!(r.json()["tags"], json!(["t1"]));
    assert_eq!(
        r.header("link"),
        Some("</v2/org/team/app/tags/list?n=1&last=t1>; rel=\"next\"")
    );
    let pages = walk(&app, "/v2/org/team/app/tags/list?n=1", "tags");
    assert_eq!(pages, vec![vec!["t1"], vec!["t2"], vec!["t3"]]);
}

#[test]
fn last_page_that_is_exactly_full_has_no_link() {
    let app = TestApp::start();
    tag_all(&app, "repo", &["a", "b", "c", "d"]);
    let r = list(&app, "/v2/repo/tags/list?n=2&last=b");
    assert_eq!(r.json()["tags"], json!(["c", "d"]));
    assert_eq!(r.header("link"), None, "{}", r.describe());
    let r = list(&app, "/v2/repo/tags/list?n=4");
    assert_eq!(r.json()["tags"], json!(["a", "b", "c", "d"]));
    assert_eq!(r.header("link"), None, "{}", r.describe());
}

#[test]
fn n_zero_returns_an_empty_list_without_link() {
    let app = TestApp::start();
    tag_all(&app, "repo", &["a", "b"]);
    let r = list(&app, "/v2/repo/tags/list?n=0");
    assert_eq!(r.json()["name"], "repo");
    assert!(
        r.json()["tags"] == json!([]) || r.json()["tags"].is_null(),
        "{}",
        r.describe()
    );
    assert_eq!(r.header("link"), None);
}

#[test]
fn n_larger_than_the_tag_count_returns_all_without_link() {
    let app = TestApp::start();
    tag_all(&app, "repo", &["b", "a", "c"]);
    let r = list(&app, "/v2/repo/tags/list?n=1000");
    assert_eq!(r.json()["tags"], json!(["a", "b", "c"]));
    assert_eq!(r.header("link"), None);
}

#[test]
fn last_without_n_returns_every_tag_after_it() {
    let app = TestApp::start();
    tag_all(&app, "repo", &["a", "b", "c", "d"]);
    let cases = [
        ("a", json!(["b", "c", "d"])),
        ("b", json!(["c", "d"])),
        // `last` need not be an existing tag: the list continues after it lexically.
        ("bb", json!(["c", "d"])),
        ("0", json!(["a", "b", "c", "d"])),
        ("d", json!([])),
        ("zzz", json!([])),
    ];
    for (last, expected) in cases {
        let v = list(&app, &format!("/v2/repo/tags/list?last={last}")).json();
        let tags = if v["tags"].is_null() {
            json!([])
        } else {
            v["tags"].clone()
        };
        assert_eq!(tags, expected, "last={last}");
    }
}

#[test]
fn tag_list_reflects_deletes_and_moves() {
    let app = TestApp::start();
    let (d1, body1) = push_image(&app, "repo", "one", "1");
    app.push_manifest("repo", "two", OCI_MANIFEST, &body1);
    push_image(&app, "repo", "three", "3");
    assert_eq!(
        list(&app, "/v2/repo/tags/list").json()["tags"],
        json!(["one", "three", "two"])
    );
    app.delete("/v2/repo/manifests/two").assert_status(202);
    assert_eq!(
        list(&app, "/v2/repo/tags/list").json()["tags"],
        json!(["one", "three"])
    );
    app.delete(&format!("/v2/repo/manifests/{d1}"))
        .assert_status(202);
    assert_eq!(
        list(&app, "/v2/repo/tags/list").json()["tags"],
        json!(["three"])
    );
    push_image(&app, "repo", "one", "moved");
    assert_eq!(
        list(&app, "/v2/repo/tags/list").json()["tags"],
        json!(["one", "three"])
    );
}

#[test]
fn invalid_pagination_parameters_are_400() {
    let app = TestApp::start();
    tag_all(&app, "repo", &["a"]);
    let mut failures = Vec::new();
    for q in ["n=-1", "n=abc", "n=1.5", "n=0x10"] {
        for path in [
            format!("/v2/repo/tags/list?{q}"),
            format!("/v2/_catalog?{q}"),
        ] {
            soft_case(&mut failures, &path, || {
                assert_client_error(&app.get(&path), &[400]);
            });
        }
    }
    assert_no_failures(&failures);
}

#[test]
fn tag_list_of_invalid_name_is_400_name_invalid() {
    let app = TestApp::start();
    assert_error(&app.get("/v2/Repo/tags/list"), 400, "NAME_INVALID");
}

#[test]
fn catalog_lists_repositories_in_lexical_order() {
    let app = TestApp::start();
    for repo in [
        "zeta",
        "alpha/one",
        "alpha",
        "mid/a/b/c",
        "alpha-two",
        "0num",
    ] {
        push_image(&app, repo, "v1", repo);
    }
    let r = list(&app, "/v2/_catalog");
    let repos = strings(&r.json()["repositories"]);
    let mut sorted = repos.clone();
    sorted.sort();
    assert_eq!(repos, sorted, "catalog not sorted");
    let mut expected = vec![
        "zeta",
        "alpha/one",
        "alpha",
        "mid/a/b/c",
        "alpha-two",
        "0num",
    ];
    expected.sort();
    assert_eq!(repos, expected);
    assert_eq!(r.header("link"), None);
}

#[test]
fn empty_registry_has_an_empty_catalog() {
    let app = TestApp::start();
    let v = list(&app, "/v2/_catalog").json();
    assert!(
        v["repositories"] == json!([]) || v["repositories"].is_null(),
        "{v}"
    );
}

#[test]
fn catalog_is_paginated_with_n_and_link_headers() {
    let app = TestApp::start();
    for repo in ["e", "c", "a", "d", "b"] {
        push_image(&app, repo, "v1", repo);
    }
    let r = list(&app, "/v2/_catalog?n=2");
    assert_eq!(r.json(), json!({"repositories": ["a", "b"]}));
    assert_eq!(
        r.header("link"),
        Some("</v2/_catalog?n=2&last=b>; rel=\"next\"")
    );
    let r = list(&app, "/v2/_catalog?n=2&last=b");
    assert_eq!(r.json()["repositories"], json!(["c", "d"]));
    let r = list(&app, "/v2/_catalog?n=2&last=d");
    assert_eq!(r.json()["repositories"], json!(["e"]));
    assert_eq!(r.header("link"), None);
    let r = list(&app, "/v2/_catalog?n=0");
    assert!(r.json()["repositories"] == json!([]) || r.json()["repositories"].is_null());
    assert_eq!(r.header("link"), None);
}

#[test]
fn catalog_pagination_handles_nested_names() {
    let app = TestApp::start();
    let repos = ["a/b/c", "a/b", "a", "a-b", "a/c", "b/a"];
    for repo in repos {
        push_image(&app, repo, "v1", repo);
    }
    let pages = walk(&app, "/v2/_catalog?n=2", "repositories");
    assert!(pages.iter().all(|p| p.len() <= 2), "{pages:?}");
    let all: Vec<String> = pages.into_iter().flatten().collect();
    let mut expected: Vec<String> = repos.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(all, expected);
}
