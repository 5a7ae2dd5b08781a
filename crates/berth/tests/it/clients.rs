//! Real container tools against berth: skopeo, buildah, podman and umoci. Every image pushed is
//! pulled back and compared byte for byte (manifests and blobs), so any re-serialisation,
//! truncation or media-type drift on the server shows up.

use std::process::Command;

use reqwest::header::{ACCEPT, CONTENT_TYPE};
use serde_json::Value;

use crate::support::clients::{DirImage, OciLayout, Tools, list_dir, pseudo_random};
use crate::support::{TestApp, sha256};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const ALL_MANIFEST_TYPES: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// A three-layer image (umoci, gzip layers) with pseudo-random file contents, tag `v1`.
pub(crate) fn three_layer_image(tools: &Tools) -> OciLayout {
    tools.umoci_image(
        "src",
        "v1",
        &[
            vec![
                ("l1/a.bin", pseudo_random(1, 300_000)),
                ("etc/berth-hello", b"hello from layer one\n".to_vec()),
            ],
            vec![("l2/b.bin", pseudo_random(2, 150_000))],
            vec![("l3/c.bin", pseudo_random(3, 70_001))],
        ],
    )
}

struct Got {
    status: u16,
    content_type: String,
    digest_header: String,
    body: Vec<u8>,
}

fn get(app: &TestApp, path: &str) -> Got {
    let resp = app
        .client()
        .get(app.url(path))
        .header(ACCEPT, ALL_MANIFEST_TYPES)
        .send()
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let h = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let status = resp.status().as_u16();
    let content_type = h(CONTENT_TYPE.as_str());
    let digest_header = h("docker-content-digest");
    let body = resp.bytes().expect("body").to_vec();
    Got {
        status,
        content_type,
        digest_header,
        body,
    }
}

/// Asserts berth serves `manifest` for `repo`/`reference` and every blob of `closure` (without
/// its first element, the manifest itself) with bytes identical to `layout`'s.
fn assert_served(
    app: &TestApp,
    repo: &str,
    reference: &str,
    media_type: &str,
    manifest: &[u8],
    blobs: &[String],
    layout: &OciLayout,
) {
    let m = get(app, &format!("/v2/{repo}/manifests/{reference}"));
    assert_eq!(m.status, 200, "GET manifest {repo}:{reference}");
    assert_eq!(
        m.content_type, media_type,
        "Content-Type of {repo}:{reference}"
    );
    assert_eq!(
        m.digest_header,
        sha256(manifest),
        "Docker-Content-Digest of {repo}:{reference}"
    );
    assert!(
        m.body == manifest,
        "manifest bytes of {repo}:{reference} differ from what was pushed"
    );
    for d in blobs {
        let b = get(app, &format!("/v2/{repo}/blobs/{d}"));
        assert_eq!(b.status, 200, "GET blob {repo}@{d}");
        assert!(
            b.body == layout.blob(d),
            "blob {d} in {repo} differs from the source"
        );
    }
}

pub(crate) fn hexes(digests: &[String]) -> Vec<String> {
    let mut v: Vec<String> = digests
        .iter()
        .map(|d| d.strip_prefix("sha256:").expect("sha256").to_string())
        .collect();
    v.sort();
    v.dedup();
    v
}

#[test]
fn skopeo_oci_push_by_tag_and_digest_then_pull_is_byte_identical() {
    let app = TestApp::start();
    let tools = Tools::new();
    let src = three_layer_image(&tools);
    let mdigest = src.manifest_digest("v1");
    let manifest = src.blob(&mdigest);
    let closure = src.closure(&mdigest);
    assert_eq!(
        closure.len(),
        5,
        "manifest + config + 3 layers: {closure:?}"
    );

    let by_tag = format!("docker://{}/clients/oci:v1", app.host);
    let by_digest = format!("docker://{}/clients/oci-bydigest@{mdigest}", app.host);
    for dest in [&by_tag, &by_digest] {
        tools.skopeo(&[
            "copy",
            "--preserve-digests",
            "--dest-tls-verify=false",
            &src.reference("v1"),
            dest,
        ]);
    }

    // Over plain HTTP, berth serves exactly what was pushed, by tag and by digest.
    assert_served(
        &app,
        "clients/oci",
        "v1",
        OCI_MANIFEST,
        &manifest,
        &closure[1..],
        &src,
    );
    assert_served(
        &app,
        "clients/oci",
        &mdigest,
        OCI_MANIFEST,
        &manifest,
        &closure[1..],
        &src,
    );
    assert_served(
        &app,
        "clients/oci-bydigest",
        &mdigest,
        OCI_MANIFEST,
        &manifest,
        &closure[1..],
        &src,
    );

    // A second push of the same image (blobs already there) still succeeds and changes nothing.
    tools.skopeo(&[
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &src.reference("v1"),
        &by_tag,
    ]);
    assert_served(
        &app,
        "clients/oci",
        "v1",
        OCI_MANIFEST,
        &manifest,
        &closure[1..],
        &src,
    );

    // Pull by tag into a fresh OCI layout: same manifest digest, every blob byte-identical, and
    // nothing else.
    let out = OciLayout::new(tools.path("out-oci"));
    tools.skopeo(&[
        "copy",
        "--preserve-digests",
        "--src-tls-verify=false",
        &by_tag,
        &out.reference("back"),
    ]);
    assert_eq!(out.manifest_digest("back"), mdigest);
    assert_eq!(out.descriptor("back")["mediaType"], OCI_MANIFEST);
    for d in &closure {
        assert!(
            out.blob(d) == src.blob(d),
            "pulled blob {d} differs from the source"
        );
    }
    assert_eq!(list_dir(&out.path.join("blobs/sha256")), hexes(&closure));

    // Pull by digest into a `dir:` target.
    let dir = DirImage::new(tools.path("out-dir"));
    tools.skopeo(&[
        "copy",
        "--preserve-digests",
        "--src-tls-verify=false",
        &by_digest,
        &dir.reference(),
    ]);
    assert!(
        dir.manifest() == manifest,
        "dir: manifest.json differs from the pushed manifest"
    );
    for d in &closure[1..] {
        assert!(
            dir.blob(d) == src.blob(d),
            "dir: blob {d} differs from the source"
        );
    }
    let mut expected_files = hexes(&closure[1..]);
    expected_files.extend(["manifest.json".to_string(), "version".to_string()]);
    expected_files.sort();
    assert_eq!(dir.files(), expected_files);
}

#[test]
fn skopeo_docker_v2s2_push_and_pull_is_byte_identical() {
    let app = TestApp::start();
    let tools = Tools::new();
    let src = three_layer_image(&tools);
    let oci_digest = src.manifest_digest("v1");
    let oci_manifest = src.json(&oci_digest);
    let closure = src.closure(&oci_digest);

    // Convert while pushing. (skopeo quirk: with --preserve-digests it silently keeps the OCI
    // manifest, so no --preserve-digests here; the gzip layers are copied as they are anyway.)
    let digestfile = tools.path("pushed.digest");
    let dest = format!("docker://{}/clients/v2s2:v1", app.host);
    tools.skopeo(&[
        "copy",
        "--format",
        "v2s2",
        "--digestfile",
        &digestfile.display().to_string(),
        "--dest-tls-verify=false",
        &src.reference("v1"),
        &dest,
    ]);
    let pushed = std::fs::read_to_string(&digestfile)
        .expect("digestfile")
        .trim()
        .to_string();
    assert_ne!(pushed, oci_digest, "skopeo did not convert the manifest");

    let m = get(&app, "/v2/clients/v2s2/manifests/v1");
    assert_eq!(m.status, 200);
    assert_eq!(m.content_type, DOCKER_MANIFEST);
    assert_eq!(m.digest_header, pushed);
    assert_eq!(
        sha256(&m.body),
        pushed,
        "served manifest bytes are not the ones skopeo pushed"
    );
    let v: Value = serde_json::from_slice(&m.body).expect("manifest JSON");
    assert_eq!(v["mediaType"], DOCKER_MANIFEST);
    assert_eq!(
        v["config"]["mediaType"],
        "application/vnd.docker.container.image.v1+json"
    );
    assert_eq!(v["config"]["digest"], oci_manifest["config"]["digest"]);
    let layers = v["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 3);
    for (l, s) in layers
        .iter()
        .zip(oci_manifest["layers"].as_array().expect("src layers"))
    {
        assert_eq!(
            l["mediaType"],
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        );
        assert_eq!(l["digest"], s["digest"]);
        assert_eq!(l["size"], s["size"]);
    }
    let by_digest = get(&app, &format!("/v2/clients/v2s2/manifests/{pushed}"));
    assert_eq!(by_digest.status, 200);
    assert_eq!(by_digest.content_type, DOCKER_MANIFEST);
    assert!(by_digest.body == m.body);

    // Back out: identical manifest and blobs.
    let dir = DirImage::new(tools.path("out-dir"));
    tools.skopeo(&[
        "copy",
        "--preserve-digests",
        "--src-tls-verify=false",
        &dest,
        &dir.reference(),
    ]);
    assert!(
        dir.manifest() == m.body,
        "pulled v2s2 manifest differs from the pushed one"
    );
    for d in &closure[1..] {
        assert!(
            dir.blob(d) == src.blob(d),
            "pulled blob {d} differs from the source"
        );
    }

    // And the v2s2 image pushed as it is (no conversion) under another tag keeps its bytes.
    let again = format!("docker://{}/clients/v2s2:again", app.host);
    tools.skopeo(&[
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &dir.reference(),
        &again,
    ]);
    let m2 = get(&app, "/v2/clients/v2s2/manifests/again");
    assert_eq!(m2.status, 200);
    assert_eq!(m2.content_type, DOCKER_MANIFEST);
    assert_eq!(m2.digest_header, pushed);
    assert!(m2.body == m.body);
}

/// Builds one single-file image per architecture from scratch with buildah
/// (`localhost/berth-test-<arch>`, `/hello.txt` = "hello from <arch>") and a local manifest list
/// `list` over them; returns the image IDs (`sha256:...`, the config digests), in `arches` order.
pub(crate) fn buildah_list(tools: &Tools, arches: &[&str], list: &str) -> Vec<String> {
    let mut image_ids = Vec::new();
    for &arch in arches {
        let file = tools.path(&format!("{arch}.txt"));
        std::fs::write(&file, format!("hello from {arch}\n")).expect("write");
        let ctr = tools.buildah(&["from", "scratch"]).trim().to_string();
        tools.buildah(&["copy", &ctr, &file.display().to_string(), "/hello.txt"]);
        tools.buildah(&["config", "--arch", arch, "--os", "linux", &ctr]);
        let iid = tools.path(&format!("{arch}.iid"));
        tools.buildah(&[
            "commit",
            "--iidfile",
            &iid.display().to_string(),
            &ctr,
            &format!("localhost/berth-test-{arch}"),
        ]);
        let id = std::fs::read_to_string(&iid)
            .expect("iidfile")
            .trim()
            .to_string();
        let id = if id.starts_with("sha256:") {
            id
        } else {
            format!("sha256:{id}")
        };
        image_ids.push(id);
    }
    tools.buildah(&["manifest", "create", list]);
    for &arch in arches {
        tools.buildah(&[
            "manifest",
            "add",
            list,
            &format!("localhost/berth-test-{arch}"),
        ]);
    }
    image_ids
}

/// Two single-arch images built from scratch with buildah, in a manifest list pushed with
/// `buildah manifest push --all --format FORMAT`, pulled back with `skopeo copy --all`.
fn buildah_manifest_list_roundtrip(format: &str, list_type: &str, child_type: &str) {
    let app = TestApp::start();
    let tools = Tools::new();
    let arches = ["amd64", "arm64"];
    let image_ids = buildah_list(&tools, &arches, "localhost/berth-test-list");
    let digestfile = tools.path("list.digest");
    let dest = format!("docker://{}/clients/multi-{format}:v1", app.host);
    tools.buildah(&[
        "manifest",
        "push",
        "--all",
        "--format",
        format,
        "--tls-verify=false",
        "--digestfile",
        &digestfile.display().to_string(),
        "localhost/berth-test-list",
        &dest,
    ]);
    let pushed = std::fs::read_to_string(&digestfile)
        .expect("digestfile")
        .trim()
        .to_string();

    let repo = format!("clients/multi-{format}");
    let list = get(&app, &format!("/v2/{repo}/manifests/v1"));
    assert_eq!(list.status, 200);
    assert_eq!(list.content_type, list_type);
    assert_eq!(list.digest_header, pushed);
    assert_eq!(
        sha256(&list.body),
        pushed,
        "served list bytes are not the ones buildah pushed"
    );
    let lv: Value = serde_json::from_slice(&list.body).expect("list JSON");
    assert_eq!(lv["mediaType"], list_type);
    let children = lv["manifests"].as_array().expect("manifests").clone();
    assert_eq!(children.len(), 2);

    // Everything back with skopeo --all: into an OCI layout for an OCI index; into `dir:` for a
    // Docker list (skopeo refuses to write a Docker list into an OCI layout without converting).
    let out = OciLayout::new(tools.path("out"));
    let dir = DirImage::new(tools.path("out-dir"));
    let oci = format == "oci";
    if oci {
        tools.skopeo(&[
            "copy",
            "--all",
            "--preserve-digests",
            "--src-tls-verify=false",
            &dest,
            &out.reference("back"),
        ]);
        assert_eq!(out.manifest_digest("back"), pushed);
        assert_eq!(out.descriptor("back")["mediaType"], list_type);
        assert!(
            out.blob(&pushed) == list.body,
            "pulled list differs from the pushed one"
        );
    } else {
        tools.skopeo(&[
            "copy",
            "--all",
            "--preserve-digests",
            "--src-tls-verify=false",
            &dest,
            &dir.reference(),
        ]);
        assert!(
            dir.manifest() == list.body,
            "pulled list differs from the pushed one"
        );
    }
    let pulled_manifest = |d: &str| {
        if oci {
            out.blob(d)
        } else {
            dir.instance_manifest(d)
        }
    };
    let pulled_blob = |d: &str| if oci { out.blob(d) } else { dir.blob(d) };

    let mut manifests = vec![pushed.clone()];
    let mut blobs = Vec::new();
    for ((child, arch), id) in children.iter().zip(arches).zip(&image_ids) {
        assert_eq!(child["mediaType"], child_type);
        assert_eq!(child["platform"]["architecture"], arch);
        assert_eq!(child["platform"]["os"], "linux");
        let cd = child["digest"].as_str().expect("child digest").to_string();
        let bytes = pulled_manifest(&cd);
        assert_eq!(sha256(&bytes), cd);
        assert_eq!(bytes.len() as u64, child["size"].as_u64().expect("size"));
        let served = get(&app, &format!("/v2/{repo}/manifests/{cd}"));
        assert_eq!(served.status, 200);
        assert_eq!(served.content_type, child_type);
        assert!(served.body == bytes);
        let mv: Value = serde_json::from_slice(&bytes).expect("child JSON");
        assert_eq!(mv["mediaType"], child_type);
        // buildah keeps the image config as it is, so its digest is the local image ID.
        assert_eq!(
            mv["config"]["digest"].as_str(),
            Some(id.as_str()),
            "{arch} config digest"
        );
        let cfg: Value = serde_json::from_slice(&pulled_blob(id)).expect("config JSON");
        assert_eq!(cfg["architecture"], arch);
        let layers = mv["layers"].as_array().expect("layers");
        assert_eq!(layers.len(), 1);
        let ld = layers[0]["digest"].as_str().expect("layer digest");
        let layer = pulled_blob(ld);
        assert_eq!(sha256(&layer), ld);
        let served = get(&app, &format!("/v2/{repo}/blobs/{ld}"));
        assert_eq!(served.status, 200);
        assert!(served.body == layer);
        let layer_file = tools.path(&format!("{arch}-layer.tar.gz"));
        std::fs::write(&layer_file, &layer).expect("write layer");
        let text = Command::new("tar")
            .arg("-xzOf")
            .arg(&layer_file)
            .arg("hello.txt")
            .output()
            .expect("tar");
        assert!(
            text.status.success(),
            "tar: {}",
            String::from_utf8_lossy(&text.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&text.stdout),
            format!("hello from {arch}\n")
        );
        manifests.push(cd.clone());
        blobs.push(id.clone());
        blobs.push(ld.to_string());
    }
    if oci {
        let mut all = manifests.clone();
        all.extend(blobs);
        assert_eq!(list_dir(&out.path.join("blobs/sha256")), hexes(&all));
    } else {
        let mut files = hexes(&blobs);
        files.extend(
            hexes(&manifests[1..])
                .into_iter()
                .map(|h| format!("{h}.manifest.json")),
        );
        files.extend(["manifest.json".to_string(), "version".to_string()]);
        files.sort();
        assert_eq!(dir.files(), files);
    }
}

#[test]
fn buildah_oci_index_push_all_and_skopeo_copy_all_back() {
    buildah_manifest_list_roundtrip("oci", OCI_INDEX, OCI_MANIFEST);
}

#[test]
fn buildah_docker_manifest_list_push_all_and_skopeo_copy_all_back() {
    buildah_manifest_list_roundtrip("v2s2", DOCKER_LIST, DOCKER_MANIFEST);
}

pub(crate) fn podman_inspect(tools: &Tools, reference: &str) -> Value {
    let out = tools.podman(&["image", "inspect", reference]);
    let v: Value = serde_json::from_str(&out).expect("podman inspect JSON");
    v[0].clone()
}

#[test]
fn podman_pulls_by_tag_and_by_digest() {
    let app = TestApp::start();
    let tools = Tools::new();
    let src = tools.umoci_image(
        "src",
        "v1",
        &[
            vec![("a/one.bin", pseudo_random(11, 123_456))],
            vec![("b/two.bin", pseudo_random(12, 65_536))],
        ],
    );
    let mdigest = src.manifest_digest("v1");
    let manifest = src.json(&mdigest);
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .expect("config")
        .to_string();
    let config = src.json(&config_digest);
    let diff_ids = config["rootfs"]["diff_ids"].clone();
    assert_eq!(diff_ids.as_array().map(|a| a.len()), Some(2));
    tools.skopeo(&[
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &src.reference("v1"),
        &format!("docker://{}/clients/podman:v1", app.host),
    ]);
    let config_hex = config_digest.strip_prefix("sha256:").expect("hex");

    // By tag.
    let by_tag = format!("{}/clients/podman:v1", app.host);
    let out = tools.podman(&["pull", "--tls-verify=false", &by_tag]);
    assert_eq!(
        out.lines().last(),
        Some(config_hex),
        "podman pull prints the image ID"
    );
    let v = podman_inspect(&tools, &by_tag);
    assert_eq!(v["Id"], config_hex);
    assert_eq!(v["Digest"], mdigest.as_str());
    assert_eq!(v["RepoTags"], serde_json::json!([by_tag]));
    assert_eq!(
        v["RepoDigests"],
        serde_json::json!([format!("{}/clients/podman@{mdigest}", app.host)])
    );
    assert_eq!(
        v["RootFS"]["Layers"], diff_ids,
        "podman's unpacked layers are not the source layers"
    );
    assert_eq!(v["Architecture"], "amd64");

    // By digest, into separate storage so that everything is really fetched again.
    let tools2 = Tools::new();
    let by_digest = format!("{}/clients/podman@{mdigest}", app.host);
    let out = tools2.podman(&["pull", "--tls-verify=false", &by_digest]);
    assert_eq!(out.lines().last(), Some(config_hex));
    let v = podman_inspect(&tools2, &by_digest);
    assert_eq!(v["Id"], config_hex);
    assert_eq!(v["Digest"], mdigest.as_str());
    assert_eq!(v["RepoDigests"], serde_json::json!([by_digest]));
    assert_eq!(v["RootFS"]["Layers"], diff_ids);
}

#[test]
fn skopeo_inspect_and_list_tags_show_pushed_tags() {
    let app = TestApp::start();
    let tools = Tools::new();
    let src = tools.umoci_image("src", "v1", &[vec![("x.bin", pseudo_random(21, 40_000))]]);
    let mdigest = src.manifest_digest("v1");
    let manifest = src.blob(&mdigest);
    let mv = src.json(&mdigest);
    let config_digest = mv["config"]["digest"].as_str().expect("config").to_string();
    let layer_digests: Vec<Value> = mv["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["digest"].clone())
        .collect();
    for tag in ["v2", "latest", "v1"] {
        tools.skopeo(&[
            "copy",
            "--preserve-digests",
            "--dest-tls-verify=false",
            &src.reference("v1"),
            &format!("docker://{}/clients/tags:{tag}", app.host),
        ]);
    }
    // A tag in another repository must not show up.
    tools.skopeo(&[
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &src.reference("v1"),
        &format!("docker://{}/clients/tags-other:other", app.host),
    ]);

    let repo = format!("docker://{}/clients/tags", app.host);
    let out = tools.skopeo(&["list-tags", "--tls-verify=false", &repo]);
    let v: Value = serde_json::from_str(&out).expect("list-tags JSON");
    assert_eq!(v["Repository"], format!("{}/clients/tags", app.host));
    assert_eq!(v["Tags"], serde_json::json!(["latest", "v1", "v2"]));

    let out = tools.skopeo(&["inspect", "--tls-verify=false", &format!("{repo}:v2")]);
    let v: Value = serde_json::from_str(&out).expect("inspect JSON");
    assert_eq!(v["Name"], format!("{}/clients/tags", app.host));
    assert_eq!(v["Digest"], mdigest.as_str());
    assert_eq!(v["RepoTags"], serde_json::json!(["latest", "v1", "v2"]));
    assert_eq!(v["Architecture"], "amd64");
    assert_eq!(v["Os"], "linux");
    assert_eq!(v["Layers"], Value::Array(layer_digests));

    let raw = tools.skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("{repo}:latest"),
    ]);
    assert!(
        raw.as_bytes() == manifest.as_slice(),
        "inspect --raw differs from the pushed manifest"
    );
    let raw_config = tools.skopeo(&[
        "inspect",
        "--config",
        "--raw",
        "--tls-verify=false",
        &format!("{repo}:v1"),
    ]);
    assert!(
        raw_config.as_bytes() == src.blob(&config_digest).as_slice(),
        "inspect --config --raw differs"
    );

    let err = tools
        .try_skopeo(&["inspect", "--tls-verify=false", &format!("{repo}:nope")])
        .err()
        .expect("inspecting a missing tag must fail");
    assert!(err.to_lowercase().contains("manifest unknown"), "{err}");
}
