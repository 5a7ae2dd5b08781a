//! The integrity scrub, quarantine, repair by re-push, and `berth fsck`: bytes damaged or lost
//! behind berth's back (a flipped byte in `blobs/`, a deleted file or object) are found, no
//! longer served, named with the manifests that need them, and repaired by pushing again.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use crate::clients::three_layer_image;
use crate::support::clients::{Tools, pseudo_random};
use crate::support::{
    TestApp, assert_error, blob_file, clean_command, output_within, push_blob, push_image, send,
};

/// The sum of the samples of metric `name` (a counter's `_total` included in `name`).
fn metric(app: &TestApp, name: &str) -> f64 {
    let text = app
        .client()
        .get(app.url("/metrics"))
        .send()
        .and_then(|r| r.text())
        .unwrap_or_else(|e| panic!("GET /metrics: {e}"));
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = match rest.strip_prefix('{') {
                Some(r) => r.split_once("} ")?.1,
                None => rest.strip_prefix(' ')?,
            };
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `berth fsck` on the app's data directory (while it serves), with `extra` arguments.
fn fsck(data_dir: &Path, extra: &[&str], envs: &[(&str, &str)]) -> (Output, String) {
    // A node on S3 and PostgreSQL may never have created its data directory.
    std::fs::create_dir_all(data_dir).expect("data dir");
    let mut cmd = clean_command(data_dir);
    cmd.arg("fsck").arg("--data-dir").arg(data_dir).args(extra);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = output_within(cmd, "berth fsck");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, stdout)
}

fn layer_of(manifest: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(manifest).expect("manifest JSON");
    v["layers"][0]["digest"]
        .as_str()
        .expect("layer digest")
        .to_string()
}

/// The spec body of a quarantined blob's GET: 404 BLOB_UNKNOWN, saying why and what repairs it.
fn assert_quarantined(app: &TestApp, repo: &str, digest: &str) {
    let path = format!("/v2/{repo}/blobs/{digest}");
    let got = app.get(&path);
    assert_error(&got, 404, "BLOB_UNKNOWN");
    let detail = got.json()["errors"][0]["detail"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        detail.contains("failed an integrity check") && detail.contains("pushing the blob again"),
        "{detail:?}"
    );
    assert_eq!(app.head(&path).status, 404);
}

#[test]
fn scrub_quarantines_a_flipped_byte_and_a_skopeo_push_repairs_it() {
    let app = TestApp::builder()
        .arg("--scrub-bytes-per-sec")
        .arg("104857600")
        .arg("--scrub-interval-secs")
        .arg("1")
        .start();
    let tools = Tools::new();
    let src = three_layer_image(&tools);
    let mdigest = src.manifest_digest("v1");
    let dest = format!("docker://{}/scrub/app:v1", app.host);
    let push = || {
        tools.skopeo(&[
            "copy",
            "--preserve-digests",
            "--dest-tls-verify=false",
            &src.reference("v1"),
            &dest,
        ])
    };
    push();
    let layer = layer_of(&src.blob(&mdigest));
    let good = src.blob(&layer);
    let file = blob_file(app.data_dir(), &layer);
    let mut bad = std::fs::read(&file).expect("read blob file");
    assert_eq!(bad, good);
    bad[good.len() / 2] ^= 0x01;
    std::fs::write(&file, &bad).expect("flip a byte");

    let blob_path = format!("/v2/scrub/app/blobs/{layer}");
    wait_for(
        "scrub finds the flipped byte",
        Duration::from_secs(30),
        || app.head(&blob_path).status == 404,
    );
    assert_quarantined(&app, "scrub/app", &layer);
    assert!(metric(&app, "berth_scrub_mismatches_total") >= 1.0);
    assert_eq!(metric(&app, "berth_quarantined_blobs"), 1.0);
    assert!(metric(&app, "berth_scrub_bytes_total") >= good.len() as f64);
    // Other blobs of the image are still served.
    let config = src.json(&mdigest)["config"]["digest"]
        .as_str()
        .expect("config")
        .to_string();
    app.get(&format!("/v2/scrub/app/blobs/{config}"))
        .assert_status(200);

    // fsck, while serve runs, names the blob, the problem and the manifest that needs it.
    let (out, report) = fsck(app.data_dir(), &[], &[]);
    assert!(!out.status.success(), "fsck passed:\n{report}");
    let line = report
        .lines()
        .find(|l| l.contains(&layer))
        .unwrap_or_else(|| panic!("{layer} not in the report:\n{report}"));
    assert!(line.starts_with("digest mismatch"), "{line}");
    assert!(line.contains(&format!("scrub/app@{mdigest}")), "{line}");
    // The management API lists it too, with the same manifest.
    let listed = app.get("/api/v1/quarantine").assert_status(200).json();
    assert_eq!(listed["total"], 1, "{listed}");
    assert_eq!(listed["blobs"][0]["digest"], layer.as_str(), "{listed}");
    assert_eq!(listed["blobs"][0]["problem"], "digest mismatch", "{listed}");
    assert_eq!(
        listed["blobs"][0]["needed_by"],
        serde_json::json!([format!("scrub/app@{mdigest}")]),
        "{listed}"
    );

    // The same push again sends the layer (its HEAD says 404), which replaces the bad bytes.
    push();
    let got = app.get(&blob_path);
    got.assert_status(200);
    assert!(
        got.body == good,
        "the repaired blob is not the pushed bytes"
    );
    assert_eq!(std::fs::read(&file).expect("read blob file"), good);
    assert_eq!(metric(&app, "berth_quarantined_blobs"), 0.0);
    let listed = app.get("/api/v1/quarantine").assert_status(200).json();
    assert_eq!(listed["total"], 0, "{listed}");
    let (out, report) = fsck(app.data_dir(), &[], &[]);
    assert!(out.status.success(), "fsck after the repair:\n{report}");
    assert!(report.contains("0 problems"), "{report}");

    // The event log has both: who found it, who repaired it.
    let mut cmd = clean_command(app.data_dir());
    cmd.args(["audit", "export", "--since", "0", "--data-dir"])
        .arg(app.data_dir());
    let out = output_within(cmd, "berth audit export");
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("event JSON"))
        .filter(|e: &serde_json::Value| e["digest"] == layer.as_str())
        .collect();
    let kinds: Vec<(&str, &str)> = events
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap_or_default(),
                e["actor"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert!(
        kinds.contains(&("blob.quarantined", "system:scrub")),
        "{kinds:?}"
    );
    assert!(kinds.iter().any(|k| k.0 == "blob.repaired"), "{kinds:?}");
}

/// Small blobs are served from verified copies in memory (see `service::small_blobs`): bytes
/// that went bad on disk before their first read are never served nor kept, the read
/// quarantines them at once, and bytes that go bad after a verified copy was kept do not reach
/// clients either. A push repairs the first.
#[test]
fn small_blobs_are_verified_before_they_are_served_from_memory() {
    let app = TestApp::start();
    let repo = "small/app";
    let (_, manifest) = push_image(&app, repo, "v1", "small");
    let v: serde_json::Value = serde_json::from_slice(&manifest).expect("manifest JSON");
    let (config, layer) = (
        v["config"]["digest"].as_str().expect("config").to_string(),
        layer_of(&manifest),
    );
    let good_config = app
        .get(&format!("/v2/{repo}/blobs/{config}"))
        .assert_status(200)
        .body
        .clone();
    let (config_file, layer_file) = (
        blob_file(app.data_dir(), &config),
        blob_file(app.data_dir(), &layer),
    );
    let good_layer = std::fs::read(&layer_file).expect("read layer file");
    let flip = |file: &Path| {
        let mut bytes = std::fs::read(file).expect("read blob file");
        bytes[0] ^= 0x01;
        std::fs::write(file, &bytes).expect("flip a byte");
    };
    // The config was read (and kept) before its file went bad: clients still get its bytes.
    flip(&config_file);
    let got = app.get(&format!("/v2/{repo}/blobs/{config}"));
    got.assert_status(200);
    assert!(got.body == good_config, "a bad config byte was served");
    // The layer's file went bad before anyone read it: the first read finds out.
    flip(&layer_file);
    assert_quarantined(&app, repo, &layer);
    assert_eq!(metric(&app, "berth_quarantined_blobs"), 1.0);
    assert!(metric(&app, "berth_integrity_errors_total") >= 1.0);
    let range = app
        .client()
        .get(app.url(&format!("/v2/{repo}/blobs/{layer}")))
        .header("Range", "bytes=0-3")
        .send()
        .expect("ranged GET");
    assert_eq!(range.status().as_u16(), 404);
    // Pushing the blob again repairs it; ranges come from the verified copy.
    push_blob(&app, repo, &good_layer);
    let got = app.get(&format!("/v2/{repo}/blobs/{layer}"));
    got.assert_status(200);
    assert!(
        got.body == good_layer,
        "the repaired blob is not the pushed bytes"
    );
    let range = app
        .client()
        .get(app.url(&format!("/v2/{repo}/blobs/{layer}")))
        .header("Range", "bytes=2-5")
        .send()
        .expect("ranged GET");
    assert_eq!(range.status().as_u16(), 206);
    assert_eq!(
        range.headers()["content-range"]
            .to_str()
            .unwrap_or_default(),
        format!("bytes 2-5/{}", good_layer.len())
    );
    assert_eq!(
        range.bytes().expect("range body").as_ref(),
        &good_layer[2..6]
    );
    assert_eq!(metric(&app, "berth_quarantined_blobs"), 0.0);
}

#[test]
fn fsck_reports_a_missing_blob_file_with_the_manifests_that_need_it() {
    let app = TestApp::builder()
        .arg("--scrub-bytes-per-sec")
        .arg("0")
        .start();
    let (mdigest, manifest) = push_image(&app, "fsck/missing", "v1", "fsck-missing");
    let layer = layer_of(&manifest);
    std::fs::remove_file(blob_file(app.data_dir(), &layer)).expect("remove blob file");

    for extra in [&["--no-hash"][..], &[]] {
        let (out, report) = fsck(app.data_dir(), extra, &[]);
        assert!(!out.status.success(), "fsck {extra:?} passed:\n{report}");
        let line = report
            .lines()
            .find(|l| l.contains(&layer))
            .unwrap_or_else(|| panic!("{layer} not in the report:\n{report}"));
        assert!(line.starts_with("missing bytes"), "{line}");
        assert!(line.contains(&format!("fsck/missing@{mdigest}")), "{line}");
        assert!(report.contains("1 problems"), "{report}");
    }
    assert_quarantined(&app, "fsck/missing", &layer);
    // Nor can it be mounted, from its repository or without one: the client must upload it.
    for query in [
        format!("mount={layer}&from=fsck/missing"),
        format!("mount={layer}"),
    ] {
        let url = app.url(&format!("/v2/fsck/other/blobs/uploads/?{query}"));
        let r = send(app.client().post(url));
        assert_eq!(r.status, 202, "mount {query}: {}", r.describe());
    }

    // A monolithic push of the blob repairs it.
    let bytes = b"layer bytes for fsck-missing".to_vec();
    assert_eq!(push_blob(&app, "fsck/missing", &bytes), layer);
    app.get(&format!("/v2/fsck/missing/blobs/{layer}"))
        .assert_status(200);
    let (out, report) = fsck(app.data_dir(), &[], &[]);
    assert!(out.status.success(), "fsck after the repair:\n{report}");
}

#[test]
fn a_restarted_scrub_continues_from_its_stored_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    const BLOBS: usize = 10;
    let mut app = TestApp::builder()
        .data_dir(&data)
        .arg("--scrub-bytes-per-sec")
        .arg("0")
        .start();
    for i in 0..BLOBS {
        push_blob(&app, "scrub/resume", &pseudo_random(i as u64, 256 * 1024));
    }
    assert!(app.terminate());
    // 10 blobs of 256 KiB at 512 KiB/s: a pass takes 5 s.
    let scrubbing = || {
        TestApp::builder()
            .data_dir(&data)
            .arg("--scrub-bytes-per-sec")
            .arg("524288")
            .arg("--scrub-interval-secs")
            .arg("3600")
            .start()
    };
    let mut app = scrubbing();
    wait_for("three blobs scrubbed", Duration::from_secs(20), || {
        metric(&app, "berth_scrub_blobs_total") >= 3.0
    });
    assert_eq!(metric(&app, "berth_scrub_passes_total"), 0.0);
    assert!(app.terminate(), "berth did not stop cleanly");

    let app = scrubbing();
    wait_for("the pass completes", Duration::from_secs(30), || {
        metric(&app, "berth_scrub_passes_total") >= 1.0
    });
    let checked = metric(&app, "berth_scrub_last_pass_blobs");
    assert_eq!(
        metric(&app, "berth_scrub_pass_blobs_to_check"),
        checked,
        "the resumed pass did not check what it had left"
    );
    assert!(
        (1.0..=(BLOBS - 3) as f64).contains(&checked),
        "the resumed pass checked {checked} of {BLOBS} blobs"
    );
    assert_eq!(metric(&app, "berth_quarantined_blobs"), 0.0);
}

#[test]
fn fsck_on_s3_reports_a_deleted_object() {
    use object_store::ObjectStoreExt;
    let endpoint = crate::s3::endpoint();
    let storage = crate::s3::storage_url("fsck");
    let app = crate::s3::s3_app(&storage, &endpoint)
        .arg("--scrub-bytes-per-sec")
        .arg("0")
        .start();
    let (mdigest, manifest) = push_image(&app, "fsck/s3", "v1", "fsck-s3");
    let layer = layer_of(&manifest);
    let (bucket, prefix) = storage
        .strip_prefix("s3://")
        .and_then(|s| s.split_once('/'))
        .expect("s3://BUCKET/PREFIX");
    let key = format!(
        "{prefix}/blobs/sha256/{}",
        layer.strip_prefix("sha256:").expect("sha256")
    );
    let store = object_store::aws::AmazonS3Builder::from_env()
        .with_endpoint(&endpoint)
        .with_bucket_name(bucket)
        .with_allow_http(true)
        .build()
        .expect("S3 client");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(store.delete(&object_store::path::Path::from(key)))
        .expect("delete the layer's object");

    let envs = [("BERTH_S3_ENDPOINT", endpoint.as_str())];
    let (out, report) = fsck(app.data_dir(), &["--storage", &storage], &envs);
    assert!(!out.status.success(), "fsck passed:\n{report}");
    let line = report
        .lines()
        .find(|l| l.contains(&layer))
        .unwrap_or_else(|| panic!("{layer} not in the report:\n{report}"));
    assert!(line.starts_with("missing bytes"), "{line}");
    assert!(line.contains(&format!("fsck/s3@{mdigest}")), "{line}");
    assert_quarantined(&app, "fsck/s3", &layer);

    push_blob(&app, "fsck/s3", b"layer bytes for fsck-s3");
    app.get(&format!("/v2/fsck/s3/blobs/{layer}"))
        .assert_status(200);
    let (out, report) = fsck(app.data_dir(), &["--storage", &storage], &envs);
    assert!(out.status.success(), "fsck after the repair:\n{report}");
}

/// Two nodes on one PostgreSQL database and one bucket: one scrubs (the lease), finds an
/// object overwritten with other bytes of the same size, and the quarantine it records is what
/// the other node serves; a push through the other node replaces the object.
#[test]
fn two_nodes_scrub_once_and_share_the_quarantine_on_s3() {
    use object_store::{ObjectStoreExt, PutPayload};
    let db = crate::multinode::Database::create();
    let endpoint = crate::s3::endpoint();
    let storage = crate::s3::storage_url("scrub-two");
    let node = || {
        crate::s3::s3_app(&storage, &endpoint)
            .arg("--metadata")
            .arg(&db.url)
            .arg("--scrub-bytes-per-sec")
            .arg("104857600")
            .arg("--scrub-interval-secs")
            .arg("1")
            .start()
    };
    let (a, b) = (node(), node());
    let (mdigest, manifest) = push_image(&a, "scrub/two", "v1", "scrub-two");
    let layer = layer_of(&manifest);
    let good = b"layer bytes for scrub-two".to_vec();
    let mut bad = good.clone();
    bad[3] ^= 0x01;
    let (bucket, prefix) = storage
        .strip_prefix("s3://")
        .and_then(|s| s.split_once('/'))
        .expect("s3://BUCKET/PREFIX");
    let key = object_store::path::Path::from(format!(
        "{prefix}/blobs/sha256/{}",
        layer.strip_prefix("sha256:").expect("sha256")
    ));
    let store = object_store::aws::AmazonS3Builder::from_env()
        .with_endpoint(&endpoint)
        .with_bucket_name(bucket)
        .with_allow_http(true)
        .build()
        .expect("S3 client");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime
        .block_on(store.put(&key, PutPayload::from(bad)))
        .expect("overwrite the layer's object");

    let path = format!("/v2/scrub/two/blobs/{layer}");
    wait_for("a scrub finds the object", Duration::from_secs(30), || {
        b.head(&path).status == 404
    });
    assert_quarantined(&a, "scrub/two", &layer);
    let passes = (
        metric(&a, "berth_scrub_passes_total"),
        metric(&b, "berth_scrub_passes_total"),
    );
    assert!(
        (passes.0 == 0.0) != (passes.1 == 0.0),
        "exactly one node scrubs: passes {passes:?}"
    );
    let (out, report) = fsck(
        a.data_dir(),
        &["--storage", &storage, "--metadata", &db.url],
        &[("BERTH_S3_ENDPOINT", endpoint.as_str())],
    );
    assert!(!out.status.success(), "fsck passed:\n{report}");
    assert!(report.contains(&format!("scrub/two@{mdigest}")), "{report}");

    assert_eq!(push_blob(&b, "scrub/two", &good), layer);
    let got = a.get(&path);
    got.assert_status(200);
    assert!(
        got.body == good,
        "node a serves other bytes after the repair"
    );
    let stored = runtime
        .block_on(async { store.get(&key).await?.bytes().await })
        .expect("read the object");
    assert_eq!(stored.as_ref(), good.as_slice());
}
