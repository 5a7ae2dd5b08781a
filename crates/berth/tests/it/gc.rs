//! Garbage collection and the trash, against the real binary: `berth gc` and `berth trash`
//! while `serve` runs, the scheduled GC inside `serve`, GC racing pushes, and kill -9 of a
//! collector.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::check::{assert_blob_files_match_their_names, assert_every_tag_is_complete};
use crate::support::{
    OCI_MANIFEST, TestApp, blob_file, clean_command, descriptor, json_doc, output_within,
    push_blob, push_image, sha256,
};

/// A registry whose GC deletes at once: no grace, and the trash period `trash_secs`.
fn app_with(trash_secs: u64, extra: &[(&str, &str)]) -> TestApp {
    let mut b = TestApp::builder()
        .env("BERTH_GC_GRACE_SECS", "0")
        .env("BERTH_TRASH_RETENTION_SECS", trash_secs.to_string())
        .env("BERTH_GC_INTERVAL_SECS", "0");
    for (k, v) in extra {
        b = b.env(*k, *v);
    }
    b.start()
}

/// Runs `berth <args> --data-dir <dir>` with the same lifecycle settings as the server.
fn berth(app: &TestApp, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = clean_command(&std::env::temp_dir());
    cmd.args(args)
        .arg("--data-dir")
        .arg(app.data_dir())
        .env("BERTH_GC_GRACE_SECS", "0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = output_within(cmd, &format!("berth {}", args.join(" ")));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() || !text.is_empty(),
        "berth {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn gc_report(app: &TestApp, dry_run: bool, env: &[(&str, &str)]) -> serde_json::Value {
    let mut args = vec!["gc", "--json"];
    if dry_run {
        args.push("--dry-run");
    }
    let (ok, out) = berth(app, &args, env);
    assert!(ok, "berth gc: {out}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("gc report {out:?}: {e}"))
}

fn trash_entries(app: &TestApp) -> Vec<serde_json::Value> {
    let (ok, out) = berth(app, &["trash", "list", "--json"], &[]);
    assert!(ok, "trash list: {out}");
    out.lines()
        .map(|l| serde_json::from_str(l).expect("trash entry JSON"))
        .collect()
}

fn manifest_blobs(manifest: &[u8]) -> Vec<String> {
    let m: serde_json::Value = serde_json::from_slice(manifest).expect("manifest JSON");
    let mut blobs = vec![m["config"]["digest"].as_str().expect("config").to_string()];
    for l in m["layers"].as_array().expect("layers") {
        blobs.push(l["digest"].as_str().expect("layer").to_string());
    }
    blobs
}

#[test]
fn gc_deletes_what_nothing_references_and_keeps_every_tagged_image() {
    let app = app_with(0, &[]);
    let (_, kept) = push_image(&app, "team/app", "keep", "kept");
    let (gone_digest, gone) = push_image(&app, "team/app", "gone", "gone");
    let lone = push_blob(&app, "team/app", b"a blob no manifest ever referenced");
    app.delete(&format!("/v2/team/app/manifests/{gone_digest}"))
        .assert_status(202);

    let dry = gc_report(&app, true, &[]);
    assert_eq!(dry["blobs_deleted"], 3, "dry run: {dry}");
    assert_eq!(dry["links_removed"], 3, "dry run: {dry}");
    for blob in manifest_blobs(&gone).iter().chain([&lone]) {
        assert!(
            blob_file(app.data_dir(), blob).exists(),
            "dry run kept {blob}"
        );
    }

    let report = gc_report(&app, false, &[]);
    assert_eq!(report["blobs_deleted"], 3, "{report}");
    let gone_bytes: u64 = manifest_blobs(&gone)
        .iter()
        .chain([&lone])
        .map(|b| std::fs::metadata(blob_file(app.data_dir(), b)).map_or(0, |m| m.len()))
        .sum();
    assert_eq!(gone_bytes, 0, "GC left bytes behind");
    for blob in manifest_blobs(&gone).iter().chain([&lone]) {
        assert!(!blob_file(app.data_dir(), blob).exists(), "{blob} kept");
        app.head(&format!("/v2/team/app/blobs/{blob}"))
            .assert_status(404);
    }
    for blob in manifest_blobs(&kept) {
        assert!(
            blob_file(app.data_dir(), &blob).exists(),
            "{blob} of a tagged image deleted"
        );
    }
    assert_every_tag_is_complete(&app);
    // Nothing left to do: a second run deletes nothing.
    let again = gc_report(&app, false, &[]);
    assert_eq!(again["blobs_deleted"], 0, "{again}");
}

#[test]
fn grace_period_keeps_blobs_of_a_push_in_progress() {
    let app = TestApp::builder()
        .env("BERTH_GC_INTERVAL_SECS", "0")
        .start();
    let layer = push_blob(&app, "team/app", b"uploaded, manifest not yet pushed");
    let report = gc_report(&app, false, &[("BERTH_GC_GRACE_SECS", "3600")]);
    assert_eq!(report["blobs_deleted"], 0, "{report}");
    assert!(blob_file(app.data_dir(), &layer).exists());
    app.head(&format!("/v2/team/app/blobs/{layer}"))
        .assert_status(200);
}

#[test]
fn deleted_image_and_its_referrers_wait_in_the_trash_and_restore_byte_for_byte() {
    let app = app_with(3600, &[]);
    let (digest, manifest) = push_image(&app, "team/app", "v1", "trashed");
    // A signature-like referrer of the image.
    let empty = push_blob(&app, "team/app", b"{}");
    let sig_layer = push_blob(&app, "team/app", b"signature bytes");
    let referrer = json_doc(
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.example.signature",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
            "layers": [descriptor("application/octet-stream", b"signature bytes")],
            "subject": {"mediaType": OCI_MANIFEST, "digest": digest, "size": manifest.len()},
        }),
        serde_json::json!({}),
    );
    let referrer_digest =
        app.push_manifest("team/app", &sha256(&referrer), OCI_MANIFEST, &referrer);

    app.delete(&format!("/v2/team/app/manifests/{digest}"))
        .assert_status(202);
    app.get("/v2/team/app/manifests/v1").assert_status(404);
    app.get(&format!("/v2/team/app/manifests/{referrer_digest}"))
        .assert_status(404);

    let entries = trash_entries(&app);
    assert_eq!(entries.len(), 2, "{entries:?}");
    let subject = entries
        .iter()
        .find(|e| e["digest"] == digest.as_str())
        .expect("subject in the trash");
    assert_eq!(subject["tags"], serde_json::json!(["v1"]));
    let follower = entries
        .iter()
        .find(|e| e["digest"] == referrer_digest.as_str())
        .expect("referrer in the trash");
    assert_eq!(follower["group_id"], subject["id"]);

    // GC must not touch the blobs of what the trash still holds.
    let report = gc_report(&app, false, &[("BERTH_TRASH_RETENTION_SECS", "3600")]);
    assert_eq!(report["blobs_deleted"], 0, "{report}");

    let id = subject["id"].as_i64().expect("id").to_string();
    let (ok, out) = berth(&app, &["trash", "restore", &id], &[]);
    assert!(ok, "{out}");
    assert!(out.contains("restored tag team/app:v1"), "{out}");
    let back = app
        .get("/v2/team/app/manifests/v1")
        .assert_status(200)
        .body
        .clone();
    assert_eq!(back, manifest, "restored bytes differ");
    app.get(&format!("/v2/team/app/manifests/{referrer_digest}"))
        .assert_status(200);
    let referrers = app
        .get(&format!("/v2/team/app/referrers/{digest}"))
        .assert_status(200)
        .json();
    assert_eq!(
        referrers["manifests"][0]["digest"],
        referrer_digest.as_str()
    );
    for blob in manifest_blobs(&manifest).iter().chain([&sig_layer]) {
        app.get(&format!("/v2/team/app/blobs/{blob}"))
            .assert_status(200);
    }
    assert!(trash_entries(&app).is_empty());
    assert_every_tag_is_complete(&app);
}

#[test]
fn trash_past_its_period_is_purged_and_its_blobs_collected() {
    let app = app_with(3600, &[]);
    let (digest, manifest) = push_image(&app, "team/app", "old", "expired");
    app.delete(&format!("/v2/team/app/manifests/{digest}"))
        .assert_status(202);
    // The same database seen by a collector whose trash period is over.
    let report = gc_report(&app, false, &[("BERTH_TRASH_RETENTION_SECS", "0")]);
    assert_eq!(report["trash_purged"], 1, "{report}");
    assert_eq!(report["blobs_deleted"], 2, "{report}");
    for blob in manifest_blobs(&manifest) {
        assert!(!blob_file(app.data_dir(), &blob).exists());
    }
    assert!(trash_entries(&app).is_empty());
}

#[test]
fn a_deleted_tag_is_restored_to_its_manifest() {
    let app = app_with(3600, &[]);
    let (digest, _) = push_image(&app, "team/app", "stable", "tagged");
    app.delete("/v2/team/app/manifests/stable")
        .assert_status(202);
    app.get("/v2/team/app/manifests/stable").assert_status(404);
    let entries = trash_entries(&app);
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["kind"], "tag");
    let (ok, out) = berth(
        &app,
        &["trash", "restore", "--all", "--repository", "team/app"],
        &[],
    );
    assert!(ok, "{out}");
    let r = app.get("/v2/team/app/manifests/stable");
    r.assert_status(200);
    assert_eq!(r.must_header("docker-content-digest"), digest);
}

#[test]
fn untagged_manifests_go_to_the_trash_when_configured() {
    let app = app_with(3600, &[]);
    let (tagged, _) = push_image(&app, "team/app", "latest", "one");
    let untagged = {
        let m = app.image_manifest("team/app", "two", serde_json::json!({}));
        app.push_manifest("team/app", &sha256(&m), OCI_MANIFEST, &m)
    };
    let kept = gc_report(&app, false, &[]);
    assert_eq!(
        kept["manifests_trashed"], 0,
        "untagged kept by default: {kept}"
    );
    let report = gc_report(&app, false, RACE_GC);
    assert_eq!(report["manifests_trashed"], 1, "{report}");
    app.get(&format!("/v2/team/app/manifests/{untagged}"))
        .assert_status(404);
    app.get(&format!("/v2/team/app/manifests/{tagged}"))
        .assert_status(200);
}

#[test]
fn bytes_metadata_never_knew_are_collected_after_the_grace_period() {
    let app = app_with(0, &[]);
    let bytes = b"left by a crash between storing and linking";
    let digest = sha256(bytes);
    let path = blob_file(app.data_dir(), &digest);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(&path, bytes).expect("write orphan");
    // Fresh bytes are within a grace period of an hour.
    let report = gc_report(&app, false, &[("BERTH_GC_GRACE_SECS", "3600")]);
    assert_eq!(report["orphans_deleted"], 0, "{report}");
    assert!(path.exists());
    let status = Command::new("touch")
        .args(["-d", "2 hours ago"])
        .arg(&path)
        .status()
        .expect("touch");
    assert!(status.success());
    let report = gc_report(&app, false, &[("BERTH_GC_GRACE_SECS", "3600")]);
    assert_eq!(report["orphans_deleted"], 1, "{report}");
    assert!(!path.exists());
}

#[test]
fn scheduled_gc_in_serve_collects_and_shows_on_metrics() {
    let app = TestApp::builder()
        .env("BERTH_GC_GRACE_SECS", "0")
        .env("BERTH_TRASH_RETENTION_SECS", "0")
        .env("BERTH_GC_INTERVAL_SECS", "1")
        .start();
    let (digest, manifest) = push_image(&app, "team/app", "x", "scheduled");
    app.delete(&format!("/v2/team/app/manifests/{digest}"))
        .assert_status(202);
    let deadline = Instant::now() + Duration::from_secs(20);
    let blobs = manifest_blobs(&manifest);
    while blobs.iter().any(|b| blob_file(app.data_dir(), b).exists()) {
        assert!(
            Instant::now() < deadline,
            "scheduled GC did not collect within 20 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let metrics = app.get("/metrics").assert_status(200).text();
    let deleted = metrics
        .lines()
        .find(|l| l.starts_with("berth_gc_blobs_deleted_total "))
        .unwrap_or_else(|| panic!("no berth_gc_blobs_deleted_total in {metrics}"));
    let n: f64 = deleted
        .rsplit(' ')
        .next()
        .unwrap_or("0")
        .parse()
        .unwrap_or(0.0);
    assert!(n >= 2.0, "{deleted}");
}

/// The race test's collector: untagged manifests and the trash go at once.
const RACE_GC: &[(&str, &str)] = &[
    ("BERTH_GC_UNTAGGED_MANIFEST_SECS", "0"),
    ("BERTH_TRASH_RETENTION_SECS", "0"),
];

/// Restores what is in the trash through the management API, over and over, until `stop`;
/// returns how many restores put something back. A restore racing the purge of its entry (or
/// of the blobs it needs) is refused with a 4xx, never a 5xx.
fn restore_until(app: &TestApp, stop: &AtomicBool) -> usize {
    let mut restored = 0;
    while !stop.load(Ordering::Relaxed) {
        let listed = app.get("/api/v1/trash?limit=10").assert_status(200).json();
        let ids: Vec<i64> = listed["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .filter_map(|e| e["id"].as_i64())
            .collect();
        for id in ids {
            let r = send_post(app, &format!("/api/v1/trash/{id}/restore"));
            assert!(r.status < 500, "restore {id}: {} {}", r.status, r.text());
            if r.status == 200 {
                restored += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    restored
}

/// The collector of the race tests with a trash: entries stay 2 s, long enough to be restored.
const RACE_GC_WITH_TRASH: &[(&str, &str)] = &[
    ("BERTH_GC_UNTAGGED_MANIFEST_SECS", "0"),
    ("BERTH_TRASH_RETENTION_SECS", "2"),
];

#[test]
fn gc_looping_while_clients_push_retag_delete_and_restore_never_breaks_a_tag() {
    let app = Arc::new(app_with(2, &[("BERTH_GC_UNTAGGED_MANIFEST_SECS", "0")]));
    let stop = Arc::new(AtomicBool::new(false));
    let data_dir = app.data_dir().to_path_buf();
    let restorer = {
        let (stop, app) = (stop.clone(), app.clone());
        std::thread::spawn(move || restore_until(&app, &stop))
    };
    let collector = {
        let stop = stop.clone();
        let app = app.clone();
        std::thread::spawn(move || {
            let mut runs = 0;
            while !stop.load(Ordering::Relaxed) {
                let r = gc_report(&app, false, RACE_GC_WITH_TRASH);
                assert!(r["blobs_deleted"].is_u64());
                runs += 1;
            }
            runs
        })
    };
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let app = app.clone();
            let acknowledged = acknowledged.clone();
            std::thread::spawn(move || {
                for i in 0..25 {
                    // Shared base layer across writers and pushes, plus a layer of its own.
                    let tag = format!("w{w}-{}", i % 4);
                    let pushed = push_until_accepted(&app, "race/app", &tag, w, i);
                    acknowledged
                        .lock()
                        .expect("lock")
                        .push((tag.clone(), pushed));
                    if i % 3 == 2 {
                        let _ = app.delete(&format!("/v2/race/app/manifests/{tag}"));
                        acknowledged
                            .lock()
                            .expect("lock")
                            .retain(|(t, _)| t != &tag);
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
    stop.store(true, Ordering::Relaxed);
    let runs = collector.join().expect("collector");
    assert!(runs >= 2, "GC ran only {runs} times");
    let restored = restorer.join().expect("restorer");
    assert!(restored > 0, "nothing was restored while GC ran");
    // Every tag still there is complete, and every tag last acknowledged is still there.
    assert_every_tag_is_complete(&app);
    let tags = app.get("/v2/race/app/tags/list").assert_status(200).json();
    let listed: Vec<String> = tags["tags"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    for (tag, _) in acknowledged.lock().expect("lock").iter() {
        assert!(
            listed.contains(tag),
            "acknowledged tag {tag} lost: {listed:?}"
        );
    }
    // Once nothing is pushing, a last run with no trash period leaves exactly the blobs
    // tagged images use.
    let last = gc_report(&app, false, RACE_GC);
    assert_blob_files_match_their_names(&data_dir);
    let on_disk = blob_files(&data_dir);
    let mut used = std::collections::BTreeSet::new();
    for tag in &listed {
        let m = app
            .get(&format!("/v2/race/app/manifests/{tag}"))
            .assert_status(200)
            .body
            .clone();
        used.extend(manifest_blobs(&m));
    }
    let missing: Vec<_> = used.difference(&on_disk).collect();
    let heads: Vec<u16> = missing
        .iter()
        .map(|b| app.head(&format!("/v2/race/app/blobs/{b}")).status)
        .collect();
    assert_eq!(
        on_disk, used,
        "blobs on disk differ from what tagged images use; missing {missing:?} (HEAD {heads:?}); last run {last}"
    );
}

fn blob_files(data_dir: &Path) -> std::collections::BTreeSet<String> {
    crate::support::files_under(&data_dir.join("blobs"))
        .into_iter()
        .filter_map(|(p, _)| {
            let hex = p.file_name()?.to_str()?.to_string();
            let alg = p.parent()?.parent()?.file_name()?.to_str()?.to_string();
            Some(format!("{alg}:{hex}"))
        })
        .collect()
}

/// Pushes an image (a shared base layer and one of its own) under `tag`, starting over when
/// a racing GC removed a blob between its upload and the manifest (MANIFEST_BLOB_UNKNOWN) or
/// was deleting it (503). Returns the manifest's digest.
fn push_until_accepted(app: &TestApp, repo: &str, tag: &str, w: usize, i: usize) -> String {
    // With no grace period a collector may take an uploaded layer before its manifest comes,
    // over and over on a busy machine: retry, backing off as clients do, for up to 2 minutes.
    let deadline = Instant::now() + Duration::from_secs(120);
    for attempt in 0u64.. {
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis((attempt * 50).min(1000)));
        let config = format!(r#"{{"architecture":"amd64","os":"linux","w":{w},"i":{i}}}"#);
        let base = b"a base layer every image shares".to_vec();
        let own = format!("layer {w}-{i}").into_bytes();
        let c = app.client();
        let mut ok = true;
        for bytes in [config.as_bytes(), &base[..], &own[..]] {
            let status = c
                .post(app.url(&format!(
                    "/v2/{repo}/blobs/uploads/?digest={}",
                    sha256(bytes)
                )))
                .body(bytes.to_vec())
                .send()
                .map(|r| r.status().as_u16())
                .unwrap_or(0);
            ok &= status == 201;
        }
        if !ok {
            continue;
        }
        let manifest = json_doc(
            serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": descriptor("application/vnd.oci.image.config.v1+json", config.as_bytes()),
                "layers": [
                    descriptor("application/vnd.oci.image.layer.v1.tar", &base),
                    descriptor("application/vnd.oci.image.layer.v1.tar", &own),
                ],
            }),
            serde_json::json!({}),
        );
        let r = app.put_manifest(repo, tag, OCI_MANIFEST, &manifest);
        match r.status {
            201 => return sha256(&manifest),
            400 | 503 => continue,
            s => panic!("manifest put: {s} {}", r.text()),
        }
    }
    panic!("push of {tag} never accepted")
}

#[test]
fn kill9_of_a_collector_loses_nothing_and_the_next_run_finishes() {
    let app = app_with(0, &[]);
    let (_, kept) = push_image(&app, "team/app", "keep", "survivor");
    let mut garbage = Vec::new();
    for i in 0..400 {
        garbage.push(push_blob(
            &app,
            "team/junk",
            format!("garbage {i}").as_bytes(),
        ));
    }
    for cut_ms in [30u64, 80, 150] {
        let mut cmd = clean_command(&std::env::temp_dir());
        cmd.args(["gc", "--data-dir"])
            .arg(app.data_dir())
            .env("BERTH_GC_GRACE_SECS", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("spawn gc");
        std::thread::sleep(Duration::from_millis(cut_ms));
        let _ = child.kill();
        let _ = child.wait();
    }
    // The killed collector's lease lapses (30 s) or the next one waits for it; then it finishes.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut cmd = clean_command(&std::env::temp_dir());
        cmd.args(["gc", "--json", "--data-dir"])
            .arg(app.data_dir())
            .env("BERTH_GC_GRACE_SECS", "0");
        let out = output_within(cmd, "berth gc");
        if out.status.success() {
            break;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("lease"), "gc failed: {err}");
        assert!(Instant::now() < deadline, "the lease never lapsed");
        std::thread::sleep(Duration::from_secs(2));
    }
    for blob in &garbage {
        assert!(!blob_file(app.data_dir(), blob).exists(), "{blob} left");
    }
    for blob in manifest_blobs(&kept) {
        assert!(blob_file(app.data_dir(), &blob).exists(), "{blob} lost");
    }
    assert_every_tag_is_complete(&app);
    assert_blob_files_match_their_names(app.data_dir());
}

#[test]
fn trash_and_gc_through_the_management_api() {
    let app = app_with(3600, &[]);
    let (digest, manifest) = push_image(&app, "team/app", "v1", "api");
    app.delete(&format!("/v2/team/app/manifests/{digest}"))
        .assert_status(202);
    let page = app
        .get("/api/v1/trash?namespace=team")
        .assert_status(200)
        .json();
    let entries = page["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 1, "{page}");
    assert_eq!(entries[0]["digest"], digest.as_str());
    assert_eq!(entries[0]["reason"], "deleted");
    let id = entries[0]["id"].as_i64().expect("id");
    let report = send_post(&app, "/api/v1/gc?dry_run=true");
    assert_eq!(report.status, 200, "{}", report.text());
    assert_eq!(report.json()["dry_run"], true);
    let restored = send_post(&app, &format!("/api/v1/trash/{id}/restore"));
    assert_eq!(restored.status, 200, "{}", restored.text());
    assert_eq!(restored.json()["tags"], serde_json::json!(["team/app:v1"]));
    assert_eq!(
        app.get("/v2/team/app/manifests/v1").assert_status(200).body,
        manifest
    );
    // Restored once: the entry is gone.
    assert_eq!(
        send_post(&app, &format!("/api/v1/trash/{id}/restore")).status,
        404
    );
    // The deletes and the restore are in the audit trail.
    let audit = app
        .get("/api/v1/audit?repository=team/app")
        .assert_status(200)
        .json();
    let kinds: Vec<&str> = audit["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"manifest.deleted") && kinds.contains(&"trash.restored"),
        "{kinds:?}"
    );
}

fn send_post(app: &TestApp, path: &str) -> crate::support::Reply {
    crate::support::send(app.client().post(app.url(path)))
}

/// `berth gc --json` against PostgreSQL and S3, configured as the nodes of the test below.
fn gc_on(metadata: &str, storage: &str, endpoint: &str, dry_run: bool) -> serde_json::Value {
    // A node's scheduled run may hold the lease for a moment.
    for _ in 0..50 {
        let mut cmd = clean_command(&std::env::temp_dir());
        cmd.args(["gc", "--json", "--metadata", metadata, "--storage", storage])
            .env("BERTH_S3_ENDPOINT", endpoint)
            .env("BERTH_GC_GRACE_SECS", "0")
            .env("BERTH_TRASH_RETENTION_SECS", "0")
            .env("BERTH_GC_UNTAGGED_MANIFEST_SECS", "0");
        if dry_run {
            cmd.arg("--dry-run");
        }
        let out = output_within(cmd, "berth gc");
        let stdout = String::from_utf8_lossy(&out.stdout);
        if out.status.success() {
            return serde_json::from_str(stdout.trim()).expect("gc report");
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("lease"), "gc failed: {err}");
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("gc never got the lease");
}

#[test]
fn two_nodes_on_postgres_and_s3_collect_while_clients_push_delete_and_restore() {
    let db = crate::multinode::Database::create();
    let storage = crate::s3::storage_url("gc-race");
    let endpoint = crate::s3::endpoint();
    let node = || {
        crate::s3::s3_app(&storage, &endpoint)
            .arg("--metadata")
            .arg(&db.url)
            .env("BERTH_GC_GRACE_SECS", "0")
            // Long enough for the restorer to find entries, short enough to race the purge.
            .env("BERTH_TRASH_RETENTION_SECS", "2")
            .env("BERTH_GC_UNTAGGED_MANIFEST_SECS", "0")
            // Both nodes schedule GC every second; the lease lets one run at a time.
            .env("BERTH_GC_INTERVAL_SECS", "1")
            .start()
    };
    let nodes = Arc::new([node(), node()]);
    let stop = Arc::new(AtomicBool::new(false));
    let restorer = {
        let (stop, nodes) = (stop.clone(), nodes.clone());
        std::thread::spawn(move || restore_until(&nodes[0], &stop))
    };
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let nodes = nodes.clone();
            std::thread::spawn(move || {
                let mut kept = Vec::new();
                for i in 0..12 {
                    let app = &nodes[(w + i) % 2];
                    let tag = format!("w{w}-{}", i % 3);
                    push_until_accepted(app, "mn/gc", &tag, w, i);
                    kept.retain(|t: &String| t != &tag);
                    kept.push(tag.clone());
                    if i % 4 == 3 {
                        nodes[(w + i + 1) % 2]
                            .delete(&format!("/v2/mn/gc/manifests/{tag}"))
                            .assert_status(202);
                        kept.retain(|t| t != &tag);
                    }
                }
                kept
            })
        })
        .collect();
    let mut kept = Vec::new();
    for w in writers {
        kept.extend(w.join().expect("writer"));
    }
    stop.store(true, Ordering::Relaxed);
    let restored = restorer.join().expect("restorer");
    assert!(restored > 0, "nothing was restored while GC ran");
    // Both nodes' scheduled collectors ran.
    let runs = |app: &TestApp| -> f64 {
        let m = app.get("/metrics").assert_status(200).text();
        m.lines()
            .find(|l| l.starts_with("berth_gc_runs_total "))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    // The writers may finish before two runs have (on a quick machine in about 3 s, with a
    // run every second on each node); the runs in progress end soon after.
    let deadline = Instant::now() + Duration::from_secs(30);
    while runs(&nodes[0]) + runs(&nodes[1]) < 2.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        runs(&nodes[0]) + runs(&nodes[1]) >= 2.0,
        "scheduled GC did not run"
    );
    // Every tag acknowledged and not deleted is there, complete, its bytes served from S3;
    // so is every tag a restore brought back.
    assert_every_tag_is_complete(&nodes[1]);
    let mut used = std::collections::BTreeSet::new();
    for tag in &kept {
        let m = nodes[1]
            .get(&format!("/v2/mn/gc/manifests/{tag}"))
            .assert_status(200)
            .body
            .clone();
        for blob in manifest_blobs(&m) {
            let r = nodes[0].get(&format!("/v2/mn/gc/blobs/{blob}"));
            r.assert_status(200);
            assert_eq!(sha256(&r.body), blob, "bytes of {blob}");
            used.insert(blob);
        }
    }
    // Once nothing pushes, a run leaves nothing: the dry run finds no garbage in metadata
    // nor bytes in the bucket that metadata does not know.
    gc_on(&db.url, &storage, &endpoint, false);
    let dry = gc_on(&db.url, &storage, &endpoint, true);
    assert_eq!(dry["blobs_deleted"], 0, "{dry}");
    assert_eq!(dry["orphans_deleted"], 0, "{dry}");
    assert_eq!(dry["links_removed"], 0, "{dry}");
    assert_eq!(dry["manifests_trashed"], 0, "{dry}");
    assert!(!used.is_empty());
}

/// Sets when a tag was last pushed, straight in the SQLite database.
fn set_pushed_at(app: &TestApp, tag: &str, at: i64) {
    sqlite(
        app,
        &format!("UPDATE tags SET updated_at = {at} WHERE name = '{tag}'"),
    );
}

/// Now, in seconds since the epoch, as the registry stores times.
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

#[test]
fn retention_policy_plans_exactly_what_gc_then_trashes_and_restore_undoes_it() {
    let app = app_with(3600, &[]);
    let now = unix_now();
    let tags = ["v1.0", "v1.1", "dev-1", "dev-2", "latest", "dev-3"];
    let mut digests = std::collections::HashMap::new();
    for (i, tag) in tags.iter().enumerate() {
        let (digest, _) = push_image(&app, "team/app", tag, &format!("retained {tag}"));
        push_image(&app, "other/app", tag, &format!("other {tag}"));
        digests.insert(*tag, digest);
        // Pushed in this order, a day apart, the newest now.
        set_pushed_at(&app, tag, now - (tags.len() - i) as i64 * 86_400);
    }
    // A signature of dev-1 follows it.
    let sig = {
        let m = app.image_manifest(
            "team/app",
            "signature of dev-1",
            serde_json::json!({"subject": {"mediaType": OCI_MANIFEST, "digest": digests["dev-1"], "size": 1}}),
        );
        // The subject's declared size is not checked against a manifest's length by the
        // referrers API; what matters here is the subject digest.
        app.push_manifest("team/app", &sha256(&m), OCI_MANIFEST, &m)
    };

    // A policy without a keep rule would empty the namespace: refused.
    let bad = crate::support::send(
        app.client()
            .post(app.url("/api/v1/retention"))
            .header("Content-Type", "application/json")
            .body(r#"{"repositories": "team/*"}"#),
    );
    assert_eq!(bad.status, 400, "{}", bad.text());

    let (ok, out) = berth(
        &app,
        &[
            "retention",
            "add",
            "team/*",
            "--keep-last",
            "2",
            "--keep-tag",
            "v*",
            "--keep-tag",
            "latest",
        ],
        &[],
    );
    assert!(ok, "{out}");
    let (ok, plan) = berth(&app, &["retention", "plan"], &[]);
    assert!(ok, "{plan}");
    let planned: Vec<&str> = plan.lines().filter(|l| l.starts_with("tag ")).collect();
    assert_eq!(
        planned,
        [
            format!("tag team/app:dev-2 ({})", digests["dev-2"]),
            format!("tag team/app:dev-1 ({})", digests["dev-1"]),
        ],
        "{plan}"
    );

    let report = gc_report(&app, false, &[]);
    assert_eq!(report["retention_tags"], 2, "{report}");
    // dev-1, dev-2 and the signature that followed dev-1.
    assert_eq!(report["manifests_trashed"], 3, "{report}");
    for tag in ["dev-1", "dev-2"] {
        app.get(&format!("/v2/team/app/manifests/{tag}"))
            .assert_status(404);
    }
    app.get(&format!("/v2/team/app/manifests/{sig}"))
        .assert_status(404);
    for tag in ["v1.0", "v1.1", "latest", "dev-3"] {
        app.get(&format!("/v2/team/app/manifests/{tag}"))
            .assert_status(200);
    }
    for tag in tags {
        app.get(&format!("/v2/other/app/manifests/{tag}"))
            .assert_status(200);
    }
    // Nothing more to do: the plan is empty now.
    let (_, plan) = berth(&app, &["retention", "plan"], &[]);
    assert!(plan.contains("0 tags and 0 untagged"), "{plan}");

    let (ok, out) = berth(
        &app,
        &["trash", "restore", "--all", "--reason", "retention"],
        &[],
    );
    assert!(ok, "{out}");
    for tag in ["dev-1", "dev-2"] {
        let r = app.get(&format!("/v2/team/app/manifests/{tag}"));
        r.assert_status(200);
        assert_eq!(r.must_header("docker-content-digest"), digests[tag]);
    }
    app.get(&format!("/v2/team/app/manifests/{sig}"))
        .assert_status(200);
    assert_every_tag_is_complete(&app);
}

#[test]
fn retention_never_deletes_an_immutable_tag() {
    let app = app_with(3600, &[]);
    let now = unix_now();
    for (i, tag) in ["rel-1", "x-1", "x-2"].iter().enumerate() {
        push_image(&app, "team/app", tag, &format!("immutable? {tag}"));
        set_pushed_at(&app, tag, now - (3 - i) as i64 * 86_400);
    }
    let (ok, out) = berth(&app, &["immutable", "add", "team", "rel-*"], &[]);
    assert!(ok, "{out}");
    let (ok, out) = berth(
        &app,
        &["retention", "add", "team/*", "--keep-last", "1"],
        &[],
    );
    assert!(ok, "{out}");
    let (_, plan) = berth(&app, &["retention", "plan"], &[]);
    let planned: Vec<&str> = plan.lines().filter(|l| l.starts_with("tag ")).collect();
    assert_eq!(planned.len(), 1, "{plan}");
    assert!(planned[0].starts_with("tag team/app:x-1 "), "{plan}");
    let report = gc_report(&app, false, &[]);
    assert_eq!(report["retention_tags"], 1, "{report}");
    app.get("/v2/team/app/manifests/rel-1").assert_status(200);
    app.get("/v2/team/app/manifests/x-2").assert_status(200);
    app.get("/v2/team/app/manifests/x-1").assert_status(404);
}

fn quota_usage(app: &TestApp, ns: &str) -> u64 {
    let r = app.get(&format!("/api/v1/namespaces/{ns}/quota"));
    r.assert_status(200);
    r.json()["usage_bytes"].as_u64().expect("usage_bytes")
}

#[test]
fn quota_usage_stays_exact_through_trash_restore_and_gc() {
    let app = app_with(3600, &[]);
    let (ok, out) = berth(&app, &["quota", "set", "team", "100000000"], &[]);
    assert!(ok, "{out}");
    let (one, _) = push_image(&app, "team/app", "one", "quota one");
    let after_one = quota_usage(&app, "team");
    let (two, _) = push_image(&app, "team/app", "two", "quota two");
    let after_two = quota_usage(&app, "team");
    assert!(after_two > after_one);
    // In the trash, an image is not charged; restored, it is again; GC changes nothing.
    app.delete(&format!("/v2/team/app/manifests/{two}"))
        .assert_status(202);
    assert_eq!(quota_usage(&app, "team"), after_one);
    let id = trash_entries(&app)[0]["id"]
        .as_i64()
        .expect("id")
        .to_string();
    let (ok, out) = berth(&app, &["trash", "restore", &id], &[]);
    assert!(ok, "{out}");
    assert_eq!(quota_usage(&app, "team"), after_two);
    gc_report(&app, false, &[]);
    assert_eq!(quota_usage(&app, "team"), after_two);
    // Deleted for good (trash period over) and collected: usage is the first image's.
    app.delete(&format!("/v2/team/app/manifests/{two}"))
        .assert_status(202);
    let report = gc_report(&app, false, &[("BERTH_TRASH_RETENTION_SECS", "0")]);
    assert_eq!(report["blobs_deleted"], 2, "{report}");
    assert_eq!(quota_usage(&app, "team"), after_one);
    let (ok, out) = berth(&app, &["quota", "reconcile"], &[]);
    assert!(ok && out.contains("no drift"), "{out}");
    app.get(&format!("/v2/team/app/manifests/{one}"))
        .assert_status(200);
}

#[test]
fn skopeo_delete_then_restore_gives_back_the_image_skopeo_pushed() {
    use crate::support::clients::{Tools, pseudo_random};
    let app = app_with(3600, &[]);
    let tools = Tools::new();
    let layout = tools.umoci_image(
        "trash",
        "v1",
        &[vec![("app.bin", pseudo_random(31, 300_000))]],
    );
    let dest = format!("docker://{}/team/restored:v1", app.host);
    tools.skopeo(&[
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &layout.reference("v1"),
        &dest,
    ]);
    tools.skopeo(&["delete", "--tls-verify=false", &dest]);
    assert!(
        tools
            .try_skopeo(&["inspect", "--tls-verify=false", &dest])
            .is_err(),
        "the image is still there after skopeo delete"
    );
    let (ok, out) = berth(
        &app,
        &["trash", "restore", "--all", "--namespace", "team"],
        &[],
    );
    assert!(ok, "{out}");
    // Pulled back out, it is the very image pushed: same manifest digest, same blobs.
    let back = tools.path("back");
    tools.skopeo(&[
        "copy",
        "--preserve-digests",
        "--src-tls-verify=false",
        &dest,
        &format!("oci:{}:v1", back.display()),
    ]);
    let back = crate::support::clients::OciLayout::new(back);
    assert_eq!(back.manifest_digest("v1"), layout.manifest_digest("v1"));
    for d in layout.closure(&layout.manifest_digest("v1")) {
        assert_eq!(back.blob(&d), layout.blob(&d), "{d}");
    }
}

/// Runs one SQL statement on the test registry's SQLite database.
fn sqlite(app: &TestApp, sql: &str) -> String {
    let out = Command::new("sqlite3")
        .arg(app.data_dir().join("metadata.db"))
        .arg(sql)
        .output()
        .expect("sqlite3");
    assert!(out.status.success(), "{sql}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn retention_keeps_images_clients_pulled_lately_by_tag_or_by_digest() {
    use crate::support::clients::Tools;
    let app = app_with(3600, &[("BERTH_PULL_TIMES_FLUSH_SECS", "1")]);
    let now = unix_now();
    let mut digests = std::collections::HashMap::new();
    for tag in ["pulled", "idle", "pulled-long-ago"] {
        let (digest, _) = push_image(&app, "team/app", tag, &format!("pulls {tag}"));
        set_pushed_at(&app, tag, now - 90 * 86_400);
        digests.insert(tag, digest);
    }
    sqlite(
        &app,
        &format!(
            "UPDATE manifests SET last_pulled_at = {} WHERE digest = '{}'",
            now - 40 * 86_400,
            digests["pulled-long-ago"]
        ),
    );
    // Untagged manifests, pushed long ago; a deployment still pulls one by digest.
    let mut untagged = Vec::new();
    for name in ["by-digest", "forgotten"] {
        let m = app.image_manifest("team/app", name, serde_json::json!({}));
        untagged.push(app.push_manifest("team/app", &sha256(&m), OCI_MANIFEST, &m));
    }
    sqlite(
        &app,
        &format!(
            "UPDATE manifests SET created_at = {} WHERE digest IN ('{}', '{}')",
            now - 90 * 86_400,
            untagged[0],
            untagged[1]
        ),
    );
    let (ok, out) = berth(
        &app,
        &[
            "retention",
            "add",
            "team/*",
            "--keep-pulled-days",
            "30",
            "--untagged-days",
            "7",
        ],
        &[],
    );
    assert!(ok, "{out}");

    // skopeo pulls one tag; a GET by digest pulls one untagged manifest.
    let tools = Tools::new();
    let dest = tools.path("pulled");
    tools.skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/team/app:pulled", app.host),
        &format!("oci:{}:pulled", dest.display()),
    ]);
    app.get(&format!("/v2/team/app/manifests/{}", untagged[0]))
        .assert_status(200);

    // The pulls reach metadata within a flush interval; until then the plan still lists them.
    let want = vec![
        format!("tag team/app:idle ({})", digests["idle"]),
        format!(
            "tag team/app:pulled-long-ago ({})",
            digests["pulled-long-ago"]
        ),
        format!("untagged team/app@{}", untagged[1]),
    ];
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (ok, plan) = berth(&app, &["retention", "plan"], &[]);
        assert!(ok, "{plan}");
        let mut planned: Vec<String> = plan
            .lines()
            .filter(|l| l.starts_with("tag ") || l.starts_with("untagged "))
            .map(str::to_owned)
            .collect();
        planned.sort();
        if planned == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "plan never became {want:?}: {plan}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let report = gc_report(&app, false, &[]);
    assert_eq!(report["retention_tags"], 2, "{report}");
    app.get("/v2/team/app/manifests/pulled").assert_status(200);
    app.get("/v2/team/app/manifests/idle").assert_status(404);
    app.get("/v2/team/app/manifests/pulled-long-ago")
        .assert_status(404);
    app.get(&format!("/v2/team/app/manifests/{}", untagged[0]))
        .assert_status(200);
    app.get(&format!("/v2/team/app/manifests/{}", untagged[1]))
        .assert_status(404);
}

#[test]
fn kill9_of_a_serving_node_mid_scheduled_gc_loses_nothing_and_a_later_run_finishes() {
    let log = tempfile::NamedTempFile::new().expect("log file");
    // GC every second inside serve, working 1% of the time: after its first batch of 1,000
    // blobs it sleeps for seconds, which is where the kill lands. A grace of 2 s keeps the
    // blobs of a push between upload and manifest.
    let mut app = TestApp::builder()
        .env("BERTH_GC_GRACE_SECS", "2")
        .env("BERTH_TRASH_RETENTION_SECS", "0")
        .env("BERTH_GC_INTERVAL_SECS", "1")
        .env("BERTH_GC_DUTY_PERCENT", "1")
        .stderr_to(log.path())
        .start();
    let (_, kept) = push_image(&app, "team/app", "keep", "survivor of a killed collector");
    let mut garbage = Vec::new();
    for i in 0..1500 {
        garbage.push(push_blob(
            &app,
            "team/junk",
            format!("garbage to collect {i}").as_bytes(),
        ));
    }
    let left = |app: &TestApp| {
        garbage
            .iter()
            .filter(|b| blob_file(app.data_dir(), b).exists())
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while left(&app) == garbage.len() {
        assert!(Instant::now() < deadline, "scheduled GC never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    app.kill9();
    let remaining = left(&app);
    assert!(
        remaining > 0,
        "the run finished before the kill; the test did not kill it mid-run"
    );
    // The node comes back; clients push while its scheduled GC waits for the dead node's
    // lease to lapse and then finishes the work.
    app.restart();
    let (_, pushed_after) = push_image(&app, "team/app", "after", "pushed after the crash");
    let deadline = Instant::now() + Duration::from_secs(120);
    while left(&app) > 0 {
        assert!(
            Instant::now() < deadline,
            "{} of {} garbage blobs left after the restart",
            left(&app),
            garbage.len()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    for blob in manifest_blobs(&kept)
        .into_iter()
        .chain(manifest_blobs(&pushed_after))
    {
        assert!(blob_file(app.data_dir(), &blob).exists(), "{blob} lost");
    }
    assert_every_tag_is_complete(&app);
    assert_blob_files_match_their_names(app.data_dir());
}

/// GC and scrub run at a lower priority than the threads that answer requests, so that under
/// load clients get the CPUs first (see `LifecycleThread::NICE` in server.rs).
#[test]
fn the_lifecycle_threads_run_at_a_lower_priority_than_the_request_threads() {
    let app = TestApp::start();
    let tasks = std::path::PathBuf::from(format!("/proc/{}/task", app.pid()));
    // /proc/PID/task/TID/stat: "TID (NAME) STATE ..."; after the name, field 19 (nice) is
    // the 17th. The lifecycle thread may start just after the listener.
    let threads = || -> Vec<(String, i64)> {
        let mut nice_of = Vec::new();
        for entry in std::fs::read_dir(&tasks).expect("threads") {
            let stat = std::fs::read_to_string(entry.expect("thread").path().join("stat"))
                .unwrap_or_default();
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let name = stat[open + 1..close].to_string();
            let nice = stat[close + 2..]
                .split(' ')
                .nth(16)
                .and_then(|n| n.parse::<i64>().ok())
                .expect("a nice value");
            nice_of.push((name, nice));
        }
        nice_of
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut nice_of = threads();
    while !nice_of.iter().any(|(n, _)| n == "berth-lifecycle") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        nice_of = threads();
    }
    let of = |name: &str| -> Vec<i64> {
        nice_of
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .collect()
    };
    let lifecycle = of("berth-lifecycle");
    let workers = of("tokio-rt-worker");
    assert!(!lifecycle.is_empty() && !workers.is_empty(), "{nice_of:?}");
    // Ten more than the process's own (which a niced test run raises), at most 19.
    let base = workers[0];
    assert!(workers.iter().all(|n| *n == base), "{nice_of:?}");
    assert!(
        lifecycle.iter().all(|n| *n == (base + 10).min(19)),
        "{nice_of:?}"
    );
}
