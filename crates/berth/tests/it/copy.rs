//! `berth copy`: moving a registry from the embedded defaults to PostgreSQL with another blob
//! directory or S3, verifying digests, and resuming by running again.

use std::path::Path;
use std::process::{Command, Output};

use crate::postgres::{admin_sql, with_database};
use crate::s3::{endpoint, s3_app, storage_url};
use crate::support::{TestApp, berth_bin, push_blob, push_image, sha256};

fn copy(from: &Path, to: &Path) -> Output {
    Command::new(berth_bin())
        .arg("copy")
        .arg("--from")
        .arg(from)
        .arg("--to")
        .arg(to)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run berth copy")
}

fn write_config(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write config");
}

#[test]
fn copies_a_registry_to_postgres_and_resumes_idempotently() {
    copy_registry_to(None);
}

#[test]
fn copies_a_registry_to_postgres_and_s3() {
    copy_registry_to(Some(storage_url("copy")));
}

/// Copies a populated embedded registry to PostgreSQL plus `storage` (an S3 URL, or the
/// target's data directory when `None`), twice, then serves the target and reads it back.
fn copy_registry_to(storage: Option<String>) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src_dir = tmp.path().join("src");
    let dst_dir = tmp.path().join("dst");

    // Source: the embedded defaults, with tags, an index of the repository's images, a blob
    // that only a mount put into a second repository, and a referrer.
    let mut src = TestApp::builder().data_dir(&src_dir).start();
    let (d1, m1) = push_image(&src, "team/app", "v1", "one");
    let (d2, m2) = push_image(&src, "team/app", "v2", "two");
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{d1}","size":{}}},{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{d2}","size":{}}}]}}"#,
        m1.len(),
        m2.len()
    );
    let put = src
        .client()
        .put(src.url("/v2/team/app/manifests/multi"))
        .header("Content-Type", "application/vnd.oci.image.index.v1+json")
        .body(index.clone())
        .send()
        .expect("put index");
    assert_eq!(put.status().as_u16(), 201);
    let only_blob = push_blob(&src, "other/blobs", b"a blob with no manifest");
    let mounted = src
        .client()
        .post(src.url(&format!(
            "/v2/team/mirror/blobs/uploads/?mount={only_blob}&from=other/blobs"
        )))
        .send()
        .expect("mount");
    assert_eq!(mounted.status().as_u16(), 201);
    assert!(src.terminate(), "source berth exits cleanly");

    let db = format!("berth_copy_{}", uuid::Uuid::new_v4().simple());
    let url = with_database(&admin_sql(&format!("CREATE DATABASE {db}")), &db);
    let from = tmp.path().join("from.toml");
    let to = tmp.path().join("to.toml");
    write_config(&from, &format!("data_dir = {:?}\n", src_dir));
    let mut target = format!("data_dir = {:?}\nmetadata = {url:?}\n", dst_dir);
    if let Some(storage) = &storage {
        target.push_str(&format!(
            "storage = {storage:?}\ns3_endpoint = {:?}\n",
            endpoint()
        ));
    }
    write_config(&to, &target);

    let first = copy(&from, &to);
    assert!(first.status.success(), "berth copy: {first:?}");
    let report = String::from_utf8_lossy(&first.stdout);
    assert!(report.contains("blobs copied: 5"), "{report}");
    // Copying again finds everything in place: that is what makes an interrupted copy resumable.
    let again = copy(&from, &to);
    assert!(again.status.success(), "second berth copy: {again:?}");
    let report = String::from_utf8_lossy(&again.stdout);
    assert!(
        report.contains("blobs copied: 0") && report.contains("already there: 6"),
        "{report}"
    );

    // The target serves the same registry.
    let dst = match &storage {
        Some(storage) => s3_app(storage, &endpoint()),
        None => TestApp::builder(),
    }
    .data_dir(&dst_dir)
    .arg("--metadata")
    .arg(&url)
    .start();
    for (tag, bytes) in [
        ("v1", &m1),
        ("v2", &m2),
        ("multi", &index.clone().into_bytes()),
    ] {
        let got = dst.get(&format!("/v2/team/app/manifests/{tag}"));
        got.assert_status(200);
        assert_eq!(&got.body, bytes, "manifest {tag}");
    }
    let tags = dst.get("/v2/team/app/tags/list");
    assert_eq!(
        tags.json()["tags"],
        serde_json::json!(["multi", "v1", "v2"])
    );
    let layer = b"layer bytes for one";
    let blob = dst.get(&format!("/v2/team/app/blobs/{}", sha256(layer)));
    blob.assert_status(200);
    assert_eq!(blob.body, layer);
    dst.get(&format!("/v2/team/mirror/blobs/{only_blob}"))
        .assert_status(200);
    dst.get(&format!("/v2/other/blobs/blobs/{only_blob}"))
        .assert_status(200);
    if storage.is_some() {
        // The blobs went to the bucket, not to the target's data directory.
        assert!(!dst_dir.join("blobs/sha256").join(&only_blob[7..9]).exists());
    }
    drop(dst);
    admin_sql(&format!("DROP DATABASE {db} WITH (FORCE)"));
}

#[test]
fn a_corrupted_source_blob_stops_the_copy() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src_dir = tmp.path().join("src");
    let mut src = TestApp::builder().data_dir(&src_dir).start();
    let digest = push_blob(&src, "team/app", b"the real bytes");
    assert!(src.terminate());
    let hex = digest.trim_start_matches("sha256:");
    let file = src_dir.join("blobs/sha256").join(&hex[..2]).join(hex);
    std::fs::write(&file, b"the rotten bytes").expect("corrupt the blob");

    let from = tmp.path().join("from.toml");
    let to = tmp.path().join("to.toml");
    write_config(&from, &format!("data_dir = {:?}\n", src_dir));
    write_config(&to, &format!("data_dir = {:?}\n", tmp.path().join("dst")));
    let out = copy(&from, &to);
    assert!(
        !out.status.success(),
        "copy of a corrupted blob must fail: {out:?}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&digest),
        "the error names the blob: {stderr}"
    );
    // Nothing unverified reached the target.
    let target_blob = tmp
        .path()
        .join("dst/blobs/sha256")
        .join(&hex[..2])
        .join(hex);
    assert!(!target_blob.exists());
}
