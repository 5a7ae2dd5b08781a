//! Tag immutability rules and namespace quotas, end to end: over HTTP, with skopeo, through the
//! management API and `berth immutable|quota`, on SQLite and on PostgreSQL.

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::{Value, json};

use crate::postgres::{admin_sql, with_database};
use crate::support::clients::{OciLayout, Tools, pseudo_random};
use crate::support::{
    OCI_EMPTY, OCI_LAYER, OCI_MANIFEST, Reply, TestApp, berth_bin, descriptor, error_code,
    oci_manifest, send,
};

fn manage(app: &TestApp, method: &str, path: &str, body: Option<Value>) -> Reply {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a method");
    let mut req = app.client().request(method, app.url(path));
    if let Some(body) = body {
        req = req
            .header("Content-Type", "application/json")
            .body(body.to_string());
    }
    send(req)
}

fn add_rule(app: &TestApp, ns: &str, pattern: &str) {
    manage(
        app,
        "POST",
        &format!("/api/v1/namespaces/{ns}/immutability"),
        Some(json!({ "pattern": pattern })),
    )
    .assert_status(201);
}

fn usage(app: &TestApp, ns: &str) -> u64 {
    let reply = manage(app, "GET", &format!("/api/v1/namespaces/{ns}/quota"), None);
    reply.assert_status(200);
    reply.json()["usage_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no usage in {}", reply.describe()))
}

/// Asserts a 403 DENIED whose message contains every one of `words`.
#[track_caller]
fn assert_denied(reply: &Reply, words: &[&str]) {
    reply.assert_status(403);
    assert_eq!(error_code(&reply.text()), "DENIED", "{}", reply.describe());
    for w in words {
        assert!(
            reply.text().contains(w),
            "{w:?} missing from {}",
            reply.describe()
        );
    }
}

fn berth(args: &[&str], where_: &[String]) -> std::process::Output {
    Command::new(berth_bin())
        .args(args)
        .args(where_)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run berth")
}

/// `berth quota reconcile` against the server's metadata (`where_` are the flags naming it):
/// asserts it exits 0 and reports no drift.
#[track_caller]
fn assert_no_drift(where_: &[String]) {
    let out = berth(&["quota", "reconcile"], where_);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("no drift"),
        "berth quota reconcile: {out:?}"
    );
}

#[test]
fn immutable_tags_are_never_moved_or_deleted_until_the_rule_goes() {
    let app = TestApp::start();
    let repo = "imm/app";
    let m1 = app.image_manifest(repo, "one", json!({}));
    let m2 = app.image_manifest(repo, "two", json!({}));
    let d1 = app.push_manifest(repo, "v1", OCI_MANIFEST, &m1);
    let d2 = app.push_manifest(repo, "latest", OCI_MANIFEST, &m2);
    add_rule(&app, "imm", "v*");
    let names_rule = ["imm", "v*", "immutable"];

    // Overwriting is refused, naming the rule; the tag stays.
    assert_denied(
        &app.put_manifest(repo, "v1", OCI_MANIFEST, &m2),
        &names_rule,
    );
    assert_denied(
        &app.put_manifest(repo, &format!("{d2}?tag=v1"), OCI_MANIFEST, &m2),
        &names_rule,
    );
    let got = app.get(&format!("/v2/{repo}/manifests/v1"));
    assert_eq!(got.header("docker-content-digest"), Some(d1.as_str()));
    // Pushing the same digest again (a CI retry) and creating new protected tags work.
    app.push_manifest(repo, "v1", OCI_MANIFEST, &m1);
    app.push_manifest(repo, "v2", OCI_MANIFEST, &m2);
    // Deleting it, by tag or with its manifest, is refused.
    assert_denied(
        &app.delete(&format!("/v2/{repo}/manifests/v1")),
        &names_rule,
    );
    assert_denied(
        &app.delete(&format!("/v2/{repo}/manifests/{d1}")),
        &names_rule,
    );
    // A deleted tag that never existed is still unknown.
    app.delete(&format!("/v2/{repo}/manifests/v9"))
        .assert_status(404);
    // A mutable tag moves.
    app.push_manifest(repo, "latest", OCI_MANIFEST, &m1);
    app.push_manifest(repo, "latest", OCI_MANIFEST, &m2);

    // A referrer (a signature, pushed by digest with a subject) to the immutable image.
    let empty = app.blob_descriptor(repo, OCI_EMPTY, b"{}");
    let sig = app.blob_descriptor(repo, OCI_LAYER, b"a signature");
    let subject = descriptor(OCI_MANIFEST, &m1);
    let referrer = oci_manifest(
        &empty,
        std::slice::from_ref(&sig),
        json!({ "subject": subject, "artifactType": "application/vnd.test.sig" }),
    );
    let rd = app.push_manifest(repo, &oci_digest(&referrer), OCI_MANIFEST, &referrer);
    let listed = app.get(&format!("/v2/{repo}/referrers/{d1}")).json();
    assert_eq!(listed["manifests"][0]["digest"], json!(rd));

    // Cosign's legacy `sha256-<hex>.sig` tag moves as signatures are added: `v*` does not cover
    // it, and neither would `*`; only a rule naming `sha256-` does.
    let sig_tag = format!("{}.sig", d1.replace(':', "-"));
    let referrer2 = oci_manifest(&empty, &[sig.clone(), empty.clone()], json!({}));
    app.push_manifest(repo, &sig_tag, OCI_MANIFEST, &referrer);
    add_rule(&app, "imm", "*");
    app.push_manifest(repo, &sig_tag, OCI_MANIFEST, &referrer2);
    add_rule(&app, "imm", "sha256-*.sig");
    assert_denied(
        &app.put_manifest(repo, &sig_tag, OCI_MANIFEST, &referrer),
        &["sha256-*.sig"],
    );
    // `*` protects `latest` now.
    assert_denied(
        &app.put_manifest(repo, "latest", OCI_MANIFEST, &m1),
        &["\\\"*\\\""],
    );

    // Listing, then removing the rules lifts them.
    let rules = manage(&app, "GET", "/api/v1/namespaces/imm/immutability", None);
    rules.assert_status(200);
    let patterns: Vec<Value> = rules
        .json()
        .as_array()
        .map_or(vec![], |a| a.iter().map(|r| r["pattern"].clone()).collect());
    assert_eq!(patterns, [json!("*"), json!("sha256-*.sig"), json!("v*")]);
    for p in ["v*", "*", "sha256-*.sig"] {
        manage(
            &app,
            "DELETE",
            &format!("/api/v1/namespaces/imm/immutability/{p}"),
            None,
        )
        .assert_status(204);
    }
    app.push_manifest(repo, "v1", OCI_MANIFEST, &m2);
    app.delete(&format!("/v2/{repo}/manifests/v1"))
        .assert_status(202);
    app.push_manifest(repo, &sig_tag, OCI_MANIFEST, &referrer);

    // Each change is in the event log.
    let events = manage(&app, "GET", "/api/v1/audit?namespace=imm", None);
    events.assert_status(200);
    let text = events.text();
    for kind in ["immutability.rule_added", "immutability.rule_removed"] {
        assert!(text.contains(kind), "no {kind} in {text}");
    }
}

fn oci_digest(bytes: &[u8]) -> String {
    crate::support::sha256(bytes)
}

/// A second image on top of `tag`'s layers in the same layout: the same layers, a new config
/// (an environment variable) and one more layer.
fn derived_image(tools: &Tools, layout: &OciLayout, from: &str, tag: &str, seed: u64) {
    let path = layout.path.display();
    tools.umoci(&[
        "config",
        "--image",
        &format!("{path}:{from}"),
        "--tag",
        tag,
        "--config.env",
        &format!("DERIVED={tag}"),
    ]);
    let bundle = tools.path(&format!("bundle-derived-{tag}"));
    let image = format!("{path}:{tag}");
    tools.umoci(&[
        "unpack",
        "--rootless",
        "--image",
        &image,
        &bundle.display().to_string(),
    ]);
    std::fs::write(
        bundle.join("rootfs").join(format!("{tag}.bin")),
        pseudo_random(seed, 40_000),
    )
    .expect("write a file into the rootfs");
    tools.umoci(&["repack", "--image", &image, &bundle.display().to_string()]);
    std::fs::remove_dir_all(&bundle).expect("rm bundle");
}

/// Bytes of the distinct blobs (manifest included) the images of `tags` are made of.
fn expected_bytes(layout: &OciLayout, tags: &[&str]) -> u64 {
    let digests: BTreeSet<String> = tags
        .iter()
        .flat_map(|t| layout.closure(&layout.manifest_digest(t)))
        .collect();
    digests.iter().map(|d| layout.blob(d).len() as u64).sum()
}

fn skopeo_push(tools: &Tools, layout: &OciLayout, tag: &str, dest: &str) -> Result<(), String> {
    tools
        .try_skopeo(&[
            "copy",
            "--preserve-digests",
            "--dest-tls-verify=false",
            &layout.reference(tag),
            dest,
        ])
        .map(drop)
}

/// The quota scenario, on whichever metadata store `app` uses (`where_` names it to the CLI).
fn quota_accounting(app: &TestApp, where_: &[String]) {
    let tools = Tools::new();
    let layout = tools.umoci_image(
        "quota",
        "a",
        &[
            vec![("base/one.bin", pseudo_random(11, 200_000))],
            vec![("base/two.bin", pseudo_random(12, 100_000))],
        ],
    );
    derived_image(&tools, &layout, "a", "b", 13);
    derived_image(&tools, &layout, "a", "c", 14);
    let host = &app.host;
    skopeo_push(
        &tools,
        &layout,
        "a",
        &format!("docker://{host}/quota/one:a"),
    )
    .expect("push a");
    skopeo_push(
        &tools,
        &layout,
        "b",
        &format!("docker://{host}/quota/two:b"),
    )
    .expect("push b");
    // Shared layers once: the distinct blobs of both images plus both manifests.
    let both = expected_bytes(&layout, &["a", "b"]);
    let separately = expected_bytes(&layout, &["a"]) + expected_bytes(&layout, &["b"]);
    assert!(both < separately, "the images share no layers");
    assert_eq!(usage(app, "quota"), both);
    assert_no_drift(where_);

    // c needs its config, its own layer and its manifest; each blob alone fits the limit, all
    // together do not: refused at the manifest PUT, and nothing stays charged.
    let c_only = expected_bytes(&layout, &["a", "b", "c"]) - both;
    let c_manifest = layout.manifest_digest("c");
    let c_blobs: Vec<String> = layout.closure(&c_manifest)[1..].to_vec();
    let biggest_new = c_blobs
        .iter()
        .filter(|d| !layout.closure(&layout.manifest_digest("a")).contains(d))
        .map(|d| layout.blob(d).len() as u64)
        .max()
        .expect("c has blobs of its own");
    let limit = both + biggest_new + 1;
    assert!(limit < both + c_only);
    manage(
        app,
        "PUT",
        "/api/v1/namespaces/quota/quota",
        Some(json!({ "limit_bytes": limit })),
    )
    .assert_status(200);
    let err = skopeo_push(
        &tools,
        &layout,
        "c",
        &format!("docker://{host}/quota/one:c"),
    )
    .expect_err("a push over the quota");
    assert!(
        err.contains("would exceed its quota") && err.contains("namespace quota"),
        "{err}"
    );
    for d in &c_blobs {
        app.head(&format!("/v2/quota/one/blobs/{d}"))
            .assert_status(200);
    }
    app.get("/v2/quota/one/manifests/c").assert_status(404);
    assert_eq!(usage(app, "quota"), both);
    assert_no_drift(where_);

    // A blob larger than what is left is refused at upload, monolithic or chunked.
    let big = pseudo_random(15, (biggest_new + 2) as usize);
    let digest = oci_digest(&big);
    let reply = send(
        app.client()
            .post(app.url(&format!("/v2/quota/one/blobs/uploads/?digest={digest}")))
            .header("Content-Type", "application/octet-stream")
            .body(big.clone()),
    );
    assert_denied(&reply, &["quota", &limit.to_string()]);
    let location = app.start_upload("quota/one");
    app.patch_chunk(&location, 0, &big).assert_status(202);
    let sep = if location.contains('?') { '&' } else { '?' };
    let reply = send(
        app.client()
            .put(format!("{location}{sep}digest={digest}"))
            .header("Content-Length", "0"),
    );
    assert_denied(&reply, &["quota"]);
    app.head(&format!("/v2/quota/one/blobs/{digest}"))
        .assert_status(404);
    assert_eq!(usage(app, "quota"), both);

    // Deleting manifests frees exactly what only they used.
    let b_digest = layout.manifest_digest("b");
    app.delete(&format!("/v2/quota/two/manifests/{b_digest}"))
        .assert_status(202);
    assert_eq!(usage(app, "quota"), expected_bytes(&layout, &["a"]));
    assert_no_drift(where_);
    let a_digest = layout.manifest_digest("a");
    app.delete(&format!("/v2/quota/one/manifests/{a_digest}"))
        .assert_status(202);
    assert_eq!(usage(app, "quota"), 0);
    assert_no_drift(where_);

    // With the limit gone, c fits.
    manage(app, "DELETE", "/api/v1/namespaces/quota/quota", None).assert_status(204);
    skopeo_push(
        &tools,
        &layout,
        "c",
        &format!("docker://{host}/quota/one:c"),
    )
    .expect("push c");
    assert_eq!(usage(app, "quota"), expected_bytes(&layout, &["c"]));
    assert_no_drift(where_);

    // The first scrape reads every namespace's usage.
    let text = app.get("/metrics").text();
    let want = format!(
        "berth_namespace_usage_bytes{{namespace=\"quota\"}} {}",
        expected_bytes(&layout, &["c"])
    );
    assert!(text.lines().any(|l| l == want), "no {want:?} in {text}");
}

#[test]
fn quotas_count_shared_layers_once_and_refuse_what_does_not_fit() {
    let app = TestApp::start();
    let data_dir = app.data_dir().display().to_string();
    quota_accounting(&app, &["--data-dir".to_string(), data_dir]);
}

#[test]
fn quotas_count_shared_layers_once_and_refuse_what_does_not_fit_on_postgres() {
    let db = format!("berth_it_{}", uuid::Uuid::new_v4().simple());
    let url = with_database(&admin_sql(&format!("CREATE DATABASE {db}")), &db);
    let app = TestApp::builder().arg("--metadata").arg(&url).start();
    let where_ = ["--metadata".to_string(), url.clone()];
    quota_accounting(&app, &where_);

    // Drift is reported (exit 1, the numbers per namespace) until `--fix` stores the truth.
    let stored = usage(&app, "quota");
    crate::postgres::admin_sql_at(
        &url,
        "UPDATE namespace_quotas SET usage_bytes = usage_bytes + 5 WHERE namespace = 'quota'",
    );
    let out = berth(&["quota", "reconcile"], &where_);
    assert!(!out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = format!("quota\t{}\t{stored}\t5\t0", stored + 5);
    assert!(stdout.contains(&line), "{line:?} not in {stdout}");
    assert!(
        berth(&["quota", "reconcile", "--fix"], &where_)
            .status
            .success()
    );
    assert_no_drift(&where_);
    assert_eq!(usage(&app, "quota"), stored);
    drop(app);
    admin_sql(&format!("DROP DATABASE {db} WITH (FORCE)"));
}

#[test]
fn skopeo_copy_over_an_immutable_tag_fails_naming_the_rule() {
    let app = TestApp::start();
    let tools = Tools::new();
    let layout = tools.umoci_image("imm", "one", &[vec![("a.bin", pseudo_random(21, 10_000))]]);
    derived_image(&tools, &layout, "one", "two", 22);
    let dest = format!("docker://{}/locked/app:v1", app.host);
    skopeo_push(&tools, &layout, "one", &dest).expect("first push");
    add_rule(&app, "locked", "v*");
    // The same image again is fine; another one is refused.
    skopeo_push(&tools, &layout, "one", &dest).expect("identical push");
    let err = skopeo_push(&tools, &layout, "two", &dest).expect_err("an overwrite");
    assert!(
        err.contains("immutable") && err.contains("locked") && err.contains("v*"),
        "{err}"
    );
    let got = app.get("/v2/locked/app/manifests/v1");
    assert_eq!(
        got.header("docker-content-digest"),
        Some(layout.manifest_digest("one").as_str())
    );
}

#[test]
fn the_command_line_manages_rules_and_quotas_of_a_running_registry() {
    let app = TestApp::start();
    let where_ = [
        "--data-dir".to_string(),
        app.data_dir().display().to_string(),
    ];
    let m1 = app.image_manifest("cli/app", "one", json!({}));
    let m2 = app.image_manifest("cli/app", "two", json!({}));
    app.push_manifest("cli/app", "v1", OCI_MANIFEST, &m1);
    let run = |args: &[&str]| {
        let out = berth(args, &where_);
        assert!(out.status.success(), "berth {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&["immutable", "add", "cli", "v*"]);
    assert!(run(&["immutable", "list", "cli"]).starts_with("v*\t"));
    assert_denied(
        &app.put_manifest("cli/app", "v1", OCI_MANIFEST, &m2),
        &["v*"],
    );
    run(&["immutable", "rm", "cli", "v*"]);
    app.push_manifest("cli/app", "v1", OCI_MANIFEST, &m2);

    let used = usage(&app, "cli");
    assert_eq!(
        run(&["quota", "set", "cli", "1000000"]),
        format!("cli\t{used}\t1000000\n")
    );
    assert_eq!(
        run(&["quota", "get", "cli"]),
        format!("cli\t{used}\t1000000\n")
    );
    let reply = manage(&app, "GET", "/api/v1/namespaces/cli/quota", None);
    assert_eq!(
        reply.json(),
        json!({"namespace": "cli", "usage_bytes": used, "limit_bytes": 1_000_000})
    );
    run(&["quota", "rm", "cli"]);
    assert_eq!(run(&["quota", "get", "cli"]), format!("cli\t{used}\t-\n"));
    assert!(!berth(&["quota", "rm", "cli"], &where_).status.success());
    assert!(
        !berth(&["immutable", "add", "cli", "v/1"], &where_)
            .status
            .success()
    );
    assert_no_drift(&where_);
    let events = manage(&app, "GET", "/api/v1/audit?namespace=cli", None).text();
    for kind in [
        "immutability.rule_added",
        "immutability.rule_removed",
        "quota.limit_set",
        "quota.limit_removed",
    ] {
        assert!(events.contains(kind), "no {kind} in {events}");
    }
}
