//! The full consistency check chaos tests end with: every stored blob hashes to its name, and
//! every tag resolves to a complete image.

use std::path::Path;

use super::{TestApp, files_under};

/// Every file under `<data_dir>/blobs` holds exactly the bytes its name promises.
pub fn assert_blob_files_match_their_names(data_dir: &Path) {
    for (path, _) in files_under(&data_dir.join("blobs")) {
        let hex = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_else(|| panic!("odd blob path {}", path.display()));
        let algorithm = path
            .parent()
            .and_then(Path::parent)
            .and_then(Path::file_name)
            .and_then(|n| n.to_str())
            .unwrap_or_else(|| panic!("odd blob path {}", path.display()));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let named: oci::Digest = format!("{algorithm}:{hex}")
            .parse()
            .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
        let actual = oci::Digest::of(named.algorithm(), &bytes);
        assert_eq!(
            actual,
            named,
            "{} holds {} bytes hashing to {actual}",
            path.display(),
            bytes.len()
        );
    }
}

/// Every tag of every repository in the catalog resolves to a manifest whose blobs (and, for an
/// index, child manifests) are all served with the sizes the manifest declares, in bytes that
/// hash to their digests.
pub fn assert_every_tag_is_complete(app: &TestApp) {
    let catalog = app.get("/v2/_catalog").assert_status(200).json();
    let repos = catalog["repositories"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for repo in repos {
        let repo = repo
            .as_str()
            .unwrap_or_else(|| panic!("catalog entry {repo}"));
        let tags = app
            .get(&format!("/v2/{repo}/tags/list"))
            .assert_status(200)
            .json();
        for tag in tags["tags"].as_array().cloned().unwrap_or_default() {
            let tag = tag.as_str().unwrap_or_else(|| panic!("tag {tag}"));
            assert_manifest_complete(app, repo, tag);
        }
    }
}

fn assert_manifest_complete(app: &TestApp, repo: &str, reference: &str) {
    let r = app.get(&format!("/v2/{repo}/manifests/{reference}"));
    assert_eq!(r.status, 200, "{repo}:{reference}: {}", r.describe());
    let m = r.json();
    let mut blobs = Vec::new();
    if let Some(config) = m.get("config") {
        blobs.push(config.clone());
    }
    blobs.extend(m["layers"].as_array().cloned().unwrap_or_default());
    for d in blobs {
        let digest = d["digest"].as_str().unwrap_or_default();
        let r = app.head(&format!("/v2/{repo}/blobs/{digest}"));
        assert_eq!(
            r.status,
            200,
            "{repo}:{reference} blob {digest}: {}",
            r.describe()
        );
        assert_eq!(
            r.header("content-length")
                .and_then(|l| l.parse::<u64>().ok()),
            d["size"].as_u64(),
            "{repo}:{reference} blob {digest} size"
        );
    }
    for child in m["manifests"].as_array().cloned().unwrap_or_default() {
        let digest = child["digest"].as_str().unwrap_or_default();
        assert_manifest_complete(app, repo, digest);
    }
}
