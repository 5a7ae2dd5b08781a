//! The referrers API: `/v2/<name>/referrers/<digest>[?artifactType=...]`.

use crate::support::*;
use serde_json::{Value, json};

const SBOM: &str = "application/vnd.example.sbom.v1";
const SIG: &str = "application/vnd.example.signature.v1";

/// GET referrers, asserting 200, the index Content-Type and the index shape; returns the reply
/// and its descriptors sorted by digest.
#[track_caller]
fn referrers(app: &TestApp, repo: &str, digest: &str, query: &str) -> (Reply, Vec<Value>) {
    let mut path = format!("/v2/{repo}/referrers/{digest}");
    if !query.is_empty() {
        path = format!("{path}?{query}");
    }
    let r = app.get(&path);
    r.assert_status(200);
    assert_eq!(
        r.header("content-type"),
        Some(OCI_INDEX),
        "{path}: {}",
        r.describe()
    );
    let v = r.json();
    assert_eq!(v["schemaVersion"], 2, "{v}");
    assert_eq!(v["mediaType"], OCI_INDEX, "{v}");
    let mut manifests = v["manifests"]
        .as_array()
        .unwrap_or_else(|| panic!("manifests must be an array: {v}"))
        .clone();
    manifests.sort_by(|a, b| a["digest"].as_str().cmp(&b["digest"].as_str()));
    (r, manifests)
}

fn sorted(mut v: Vec<Value>) -> Vec<Value> {
    v.sort_by(|a, b| a["digest"].as_str().cmp(&b["digest"].as_str()));
    v
}

fn subject_of(digest: &str, bytes: &[u8]) -> Value {
    json!({"mediaType": OCI_MANIFEST, "digest": digest, "size": bytes.len()})
}

/// Pushes an artifact (empty config, one layer) with the given subject, artifactType and
/// annotations; returns (digest, bytes).
fn push_artifact(
    app: &TestApp,
    repo: &str,
    subject: &Value,
    artifact_type: &str,
    annotations: Value,
    seed: &str,
) -> (String, Vec<u8>) {
    let empty = app.blob_descriptor(repo, OCI_EMPTY, b"{}");
    let layer = app.blob_descriptor(
        repo,
        "application/octet-stream",
        format!("artifact {seed}").as_bytes(),
    );
    let body = oci_manifest(
        &empty,
        &[layer],
        json!({"artifactType": artifact_type, "subject": subject, "annotations": annotations}),
    );
    let digest = sha256(&body);
    let r = app.put_manifest(repo, &digest, OCI_MANIFEST, &body);
    r.assert_status(201);
    assert_eq!(
        r.header("oci-subject"),
        subject["digest"].as_str(),
        "{}",
        r.describe()
    );
    (digest, body)
}

fn expected(
    media_type: &str,
    digest: &str,
    body: &[u8],
    artifact_type: &str,
    annotations: Value,
) -> Value {
    json!({
        "mediaType": media_type,
        "digest": digest,
        "size": body.len(),
        "artifactType": artifact_type,
        "annotations": annotations,
    })
}

#[test]
fn referrers_lists_the_manifests_whose_subject_is_the_digest() {
    let app = TestApp::start();
    let (subject, subject_bytes) = push_image(&app, "repo", "v1", "subject");
    let subj = subject_of(&subject, &subject_bytes);
    let sbom_ann = json!({"org.opencontainers.image.created": "2024-01-01T00:00:00Z", "org.example.format": "spdx"});
    let sig_ann = json!({"org.example.signature.fingerprint": "abcd"});
    let (sbom, sbom_body) = push_artifact(&app, "repo", &subj, SBOM, sbom_ann.clone(), "sbom");
    let (sig, sig_body) = push_artifact(&app, "repo", &subj, SIG, sig_ann.clone(), "sig");
    // Noise: a manifest without subject and one referring to something else.
    push_image(&app, "repo", "unrelated", "unrelated");
    let (other, other_bytes) = push_image(&app, "repo", "other", "other");
    push_artifact(
        &app,
        "repo",
        &subject_of(&other, &other_bytes),
        SBOM,
        json!({"x": "y"}),
        "other-sbom",
    );

    let (_, got) = referrers(&app, "repo", &subject, "");
    assert_eq!(
        got,
        sorted(vec![
            expected(OCI_MANIFEST, &sbom, &sbom_body, SBOM, sbom_ann),
            expected(OCI_MANIFEST, &sig, &sig_body, SIG, sig_ann),
        ])
    );
    // Each descriptor is accurate for what GET returns.
    for d in &got {
        let r = app.get(&format!(
            "/v2/repo/manifests/{}",
            d["digest"].as_str().expect("digest")
        ));
        r.assert_status(200);
        assert_eq!(d["size"], r.body.len());
        assert_eq!(d["digest"], sha256(&r.body));
    }
}

#[test]
fn artifact_type_filter_selects_and_reports_the_filter() {
    let app = TestApp::start();
    let (subject, bytes) = push_image(&app, "repo", "v1", "subject");
    let subj = subject_of(&subject, &bytes);
    let (sbom, sbom_body) = push_artifact(&app, "repo", &subj, SBOM, json!({"k": "1"}), "a");
    let (sbom2, sbom2_body) = push_artifact(&app, "repo", &subj, SBOM, json!({"k": "2"}), "b");
    push_artifact(&app, "repo", &subj, SIG, json!({"k": "3"}), "c");
    let (plus, plus_body) = push_artifact(
        &app,
        "repo",
        &subj,
        "application/vnd.example+json",
        json!({"k": "4"}),
        "d",
    );

    let (r, got) = referrers(
        &app,
        "repo",
        &subject,
        &format!("artifactType={}", pct(SBOM)),
    );
    assert_eq!(
        r.header("oci-filters-applied"),
        Some("artifactType"),
        "{}",
        r.describe()
    );
    assert_eq!(
        got,
        sorted(vec![
            expected(OCI_MANIFEST, &sbom, &sbom_body, SBOM, json!({"k": "1"})),
            expected(OCI_MANIFEST, &sbom2, &sbom2_body, SBOM, json!({"k": "2"})),
        ])
    );
    // A type with a '+' (percent-encoded, as a '+' in a query means a space).
    let (r, got) = referrers(
        &app,
        "repo",
        &subject,
        &format!("artifactType={}", pct("application/vnd.example+json")),
    );
    assert_eq!(r.header("oci-filters-applied"), Some("artifactType"));
    assert_eq!(
        got,
        vec![expected(
            OCI_MANIFEST,
            &plus,
            &plus_body,
            "application/vnd.example+json",
            json!({"k": "4"})
        )]
    );
    // Unfiltered: everything, and no filter header.
    let (r, got) = referrers(&app, "repo", &subject, "");
    assert_eq!(got.len(), 4);
    assert_eq!(r.header("oci-filters-applied"), None);
}

#[test]
fn artifact_type_filter_with_no_match_is_an_empty_list() {
    let app = TestApp::start();
    let (subject, bytes) = push_image(&app, "repo", "v1", "subject");
    push_artifact(
        &app,
        "repo",
        &subject_of(&subject, &bytes),
        SBOM,
        json!({"a": "b"}),
        "x",
    );
    let (r, got) = referrers(
        &app,
        "repo",
        &subject,
        "artifactType=application%2Fvnd.nothing",
    );
    assert_eq!(r.header("oci-filters-applied"), Some("artifactType"));
    assert!(got.is_empty(), "{got:?}");
}

#[test]
fn unknown_digest_has_an_empty_referrers_list() {
    let app = TestApp::start();
    push_image(&app, "repo", "v1", "x");
    for d in [sha256(b"nothing refers to this"), sha512(b"nor this")] {
        let (_, got) = referrers(&app, "repo", &d, "");
        assert!(got.is_empty(), "{got:?}");
    }
}

/// "If the registry supports the referrers API, the registry MUST NOT return a 404".
#[test]
fn unknown_repository_referrers_is_never_404() {
    let app = TestApp::start();
    let (_, got) = referrers(&app, "no/such/repo", &sha256(b"x"), "");
    assert!(got.is_empty());
}

#[test]
fn referrers_pushed_before_their_subject_are_listed() {
    let app = TestApp::start();
    // The subject's digest is known before it is pushed.
    let subject_body = app.image_manifest("repo", "late-subject", json!({}));
    let subject = sha256(&subject_body);
    let subj = subject_of(&subject, &subject_body);
    let (early, early_body) =
        push_artifact(&app, "repo", &subj, SIG, json!({"when": "before"}), "early");
    let (_, got) = referrers(&app, "repo", &subject, "");
    assert_eq!(
        got,
        vec![expected(
            OCI_MANIFEST,
            &early,
            &early_body,
            SIG,
            json!({"when": "before"})
        )]
    );
    app.push_manifest("repo", "v1", OCI_MANIFEST, &subject_body);
    let (late, late_body) =
        push_artifact(&app, "repo", &subj, SIG, json!({"when": "after"}), "late");
    let (_, got) = referrers(&app, "repo", &subject, "");
    assert_eq!(
        got,
        sorted(vec![
            expected(
                OCI_MANIFEST,
                &early,
                &early_body,
                SIG,
                json!({"when": "before"})
            ),
            expected(
                OCI_MANIFEST,
                &late,
                &late_body,
                SIG,
                json!({"when": "after"})
            ),
        ])
    );
}

#[test]
fn image_manifest_without_artifact_type_reports_its_config_media_type() {
    let app = TestApp::start();
    let (subject, bytes) = push_image(&app, "repo", "v1", "subject");
    let subj = subject_of(&subject, &bytes);
    let cfg_type = "application/vnd.example.config.v1+json";
    let cfg = app.blob_descriptor("repo", cfg_type, b"{\"example\":1}");
    // Without artifactType, and with an empty one: both fall back to the config type.
    let without = oci_manifest(
        &cfg,
        &[],
        json!({"subject": subj, "annotations": {"n": "1"}}),
    );
    let empty = oci_manifest(
        &cfg,
        &[],
        json!({"subject": subj, "artifactType": "", "annotations": {"n": "2"}}),
    );
    for body in [&without, &empty] {
        let r = app.put_manifest("repo", &sha256(body), OCI_MANIFEST, body);
        r.assert_status(201);
        assert_eq!(r.header("oci-subject"), Some(&*subject));
    }
    let (_, got) = referrers(&app, "repo", &subject, "");
    assert_eq!(
        got,
        sorted(vec![
            expected(
                OCI_MANIFEST,
                &sha256(&without),
                &without,
                cfg_type,
                json!({"n": "1"})
            ),
            expected(
                OCI_MANIFEST,
                &sha256(&empty),
                &empty,
                cfg_type,
                json!({"n": "2"})
            ),
        ])
    );
    // And the filter matches on that reported type.
    let (_, got) = referrers(
        &app,
        "repo",
        &subject,
        &format!("artifactType={}", pct(cfg_type)),
    );
    assert_eq!(got.len(), 2);
}

#[test]
fn index_referrers_report_their_artifact_type_or_omit_it() {
    let app = TestApp::start();
    let (subject, bytes) = push_image(&app, "repo", "v1", "subject");
    let (child, child_bytes) = push_image(&app, "repo", "child", "child");
    let subj = subject_of(&subject, &bytes);
    let children = [json!({"mediaType": OCI_MANIFEST, "digest": child, "size": child_bytes.len()})];
    let typed = oci_index(
        &children,
        json!({"subject": subj, "artifactType": "application/vnd.example.bundle", "annotations": {"t": "typed"}}),
    );
    let untyped = oci_index(
        &children,
        json!({"subject": subj, "annotations": {"t": "untyped"}}),
    );
    // An empty artifactType counts as missing: omitted for an index.
    let empty = oci_index(
        &children,
        json!({"subject": subj, "artifactType": "", "annotations": {"t": "empty"}}),
    );
    for body in [&typed, &untyped, &empty] {
        app.push_manifest("repo", &sha256(body), OCI_INDEX, body);
    }
    let (_, got) = referrers(&app, "repo", &subject, "");
    let want = sorted(vec![
        expected(
            OCI_INDEX,
            &sha256(&typed),
            &typed,
            "application/vnd.example.bundle",
            json!({"t": "typed"}),
        ),
        json!({"mediaType": OCI_INDEX, "digest": sha256(&untyped), "size": untyped.len(),
               "annotations": {"t": "untyped"}}),
        json!({"mediaType": OCI_INDEX, "digest": sha256(&empty), "size": empty.len(),
               "annotations": {"t": "empty"}}),
    ]);
    assert_eq!(got, want);
}

#[test]
fn referrers_without_annotations_have_no_or_empty_annotations() {
    let app = TestApp::start();
    let (subject, bytes) = push_image(&app, "repo", "v1", "subject");
    let body = app.image_manifest(
        "repo",
        "bare",
        json!({"artifactType": SBOM, "subject": subject_of(&subject, &bytes)}),
    );
    app.push_manifest("repo", &sha256(&body), OCI_MANIFEST, &body);
    let (_, got) = referrers(&app, "repo", &subject, "");
    assert_eq!(got.len(), 1);
    let d = &got[0];
    assert_eq!(d["mediaType"], OCI_MANIFEST);
    assert_eq!(d["digest"], sha256(&body));
    assert_eq!(d["size"], body.len());
    assert_eq!(d["artifactType"], SBOM);
    assert!(
        d["annotations"].is_null() || d["annotations"] == json!({}),
        "{d}"
    );
}

#[test]
fn invalid_digest_is_400() {
    let app = TestApp::start();
    push_image(&app, "repo", "v1", "x");
    for d in [
        "sha256:abc".to_string(),
        "latest".to_string(),
        format!("md5:{}", "0".repeat(32)),
        format!("sha256:{}", "A".repeat(64)),
    ] {
        let r = app.get(&format!("/v2/repo/referrers/{d}"));
        assert_error(&r, 400, "DIGEST_INVALID");
    }
    assert_error(
        &app.get(&format!("/v2/Repo/referrers/{}", sha256(b"x"))),
        400,
        "NAME_INVALID",
    );
}

#[test]
fn deleted_referrers_are_no_longer_listed() {
    let app = TestApp::start();
    let (subject, bytes) = push_image(&app, "repo", "v1", "subject");
    let subj = subject_of(&subject, &bytes);
    let (gone, _) = push_artifact(&app, "repo", &subj, SIG, json!({"a": "1"}), "gone");
    let (kept, kept_body) = push_artifact(&app, "repo", &subj, SIG, json!({"a": "2"}), "kept");
    app.delete(&format!("/v2/repo/manifests/{gone}"))
        .assert_status(202);
    let (_, got) = referrers(&app, "repo", &subject, "");
    assert_eq!(
        got,
        vec![expected(
            OCI_MANIFEST,
            &kept,
            &kept_body,
            SIG,
            json!({"a": "2"})
        )]
    );
}

#[test]
fn tagging_a_referrer_does_not_duplicate_it() {
    let app = TestApp::start();
    let (subject, bytes) = push_image(&app, "repo", "v1", "subject");
    let subj = subject_of(&subject, &bytes);
    let (d, body) = push_artifact(&app, "repo", &subj, SIG, json!({"a": "1"}), "tagged");
    app.push_manifest("repo", "sig-tag", OCI_MANIFEST, &body);
    app.push_manifest("repo", "sig-tag2", OCI_MANIFEST, &body);
    app.push_manifest("repo", &d, OCI_MANIFEST, &body);
    let (_, got) = referrers(&app, "repo", &subject, "");
    assert_eq!(
        got,
        vec![expected(OCI_MANIFEST, &d, &body, SIG, json!({"a": "1"}))]
    );
    // Deleting one tag keeps the referrer (the manifest still exists).
    app.delete("/v2/repo/manifests/sig-tag").assert_status(202);
    let (_, got) = referrers(&app, "repo", &subject, "");
    assert_eq!(got.len(), 1);
}

#[test]
fn referrers_are_scoped_to_their_repository() {
    let app = TestApp::start();
    let (subject, bytes) = push_image(&app, "a", "v1", "shared");
    // The same subject bytes in repository b.
    push_image(&app, "b", "v1", "shared");
    let subj = subject_of(&subject, &bytes);
    let (in_a, in_a_body) = push_artifact(&app, "a", &subj, SBOM, json!({"repo": "a"}), "in-a");
    let (_, got) = referrers(&app, "a", &subject, "");
    assert_eq!(
        got,
        vec![expected(
            OCI_MANIFEST,
            &in_a,
            &in_a_body,
            SBOM,
            json!({"repo": "a"})
        )]
    );
    let (_, got) = referrers(&app, "b", &subject, "");
    assert!(got.is_empty(), "{got:?}");
}

#[test]
fn referrers_survive_a_restart() {
    let mut app = TestApp::start();
    let (subject, bytes) = push_image(&app, "repo", "v1", "subject");
    let (d, body) = push_artifact(
        &app,
        "repo",
        &subject_of(&subject, &bytes),
        SBOM,
        json!({"p": "1"}),
        "p",
    );
    app.restart();
    let (_, got) = referrers(&app, "repo", &subject, "");
    assert_eq!(
        got,
        vec![expected(OCI_MANIFEST, &d, &body, SBOM, json!({"p": "1"}))]
    );
}
