//! containerd (through `ctr`, against a private daemon per test) pulls from berth, and podman
//! pushes to it. Every pulled manifest and blob is checked against what was pushed, by digest and
//! byte for byte, and the unpacked root filesystem against the files that went into the image.

use std::path::Path;
use std::process::Command;

use reqwest::header::{ACCEPT, CONTENT_TYPE};
use serde_json::Value;

use crate::support::clients::{Containerd, OciLayout, Tools, pseudo_random};
use crate::support::{TestApp, sha256};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const ALL_MANIFEST_TYPES: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// The files of the two-layer image the containerd tests pull: (path in the rootfs, contents).
fn two_layer_files() -> Vec<Vec<(&'static str, Vec<u8>)>> {
    vec![
        vec![
            (
                "etc/berth-hello",
                b"hello from berth to containerd\n".to_vec(),
            ),
            ("a/one.bin", pseudo_random(31, 250_000)),
        ],
        vec![("b/two.bin", pseudo_random(32, 90_001))],
    ]
}

/// The layer chain ID of a stack of layers (OCI image spec: ChainID(L0) = DiffID(L0),
/// ChainID(L0..n) = sha256(ChainID(L0..n-1) + " " + DiffID(Ln))).
fn chain_id(diff_ids: &[String]) -> String {
    let mut chain = diff_ids.first().expect("at least one layer").clone();
    for d in &diff_ids[1..] {
        chain = sha256(format!("{chain} {d}").as_bytes());
    }
    chain
}

fn diff_ids(config: &Value) -> Vec<String> {
    config["rootfs"]["diff_ids"]
        .as_array()
        .expect("rootfs.diff_ids")
        .iter()
        .map(|d| d.as_str().expect("diff id").to_string())
        .collect()
}

fn sorted(digests: &[String]) -> Vec<String> {
    let mut v = digests.to_vec();
    v.sort();
    v.dedup();
    v
}

/// What a `ctr images pull` into `namespace` must have left behind.
struct Expected<'a> {
    reference: &'a str,
    media_type: &'a str,
    digest: &'a str,
    /// Every blob containerd must have fetched (manifests included), with the pushed bytes.
    blobs: Vec<(String, Vec<u8>)>,
    /// The chain ID of the unpacked image.
    chain: String,
    /// Files the unpacked root filesystem must hold, with their contents.
    files: Vec<(&'a str, Vec<u8>)>,
}

/// Pulls `expected.reference` with `ctr images pull --plain-http` into `namespace` (which must be
/// empty) and checks the image record, the content store and the unpacked snapshot.
fn pull_and_check(ctrd: &Containerd, namespace: &str, extra: &[&str], expected: &Expected) {
    assert!(ctrd.images(namespace).is_empty());
    let mut args = vec![
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "native",
        "--print-chainid",
    ];
    args.extend_from_slice(extra);
    args.push(expected.reference);
    let out = ctrd.ctr(namespace, &args);
    let printed = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("image chain ID: "))
        .unwrap_or_else(|| panic!("no chain ID in ctr's output:\n{out}"));
    assert_eq!(
        printed, expected.chain,
        "containerd unpacked other layers than the pushed ones"
    );

    // The image record points at the pushed manifest (or index).
    assert_eq!(
        ctrd.images(namespace),
        vec![(
            expected.reference.to_string(),
            expected.media_type.to_string(),
            expected.digest.to_string()
        )]
    );

    // Exactly the expected blobs were fetched, and each holds the pushed bytes.
    let want: Vec<String> = expected.blobs.iter().map(|(d, _)| d.clone()).collect();
    assert_eq!(ctrd.content_digests(namespace), sorted(&want));
    for (d, bytes) in &expected.blobs {
        let got = ctrd.content(namespace, d);
        assert_eq!(sha256(&got), *d, "content {d} in containerd");
        assert!(
            got == *bytes,
            "containerd's copy of {d} differs from the pushed bytes"
        );
    }

    // The top snapshot is committed under the chain ID, and one snapshot directory (the native
    // snapshotter's top one holds everything) has every file with its contents.
    let snapshots = ctrd.native_snapshots(namespace);
    assert!(
        snapshots
            .iter()
            .any(|(key, _, kind)| *key == expected.chain && kind == "Committed"),
        "no committed snapshot {} in {snapshots:?}",
        expected.chain
    );
    let dirs = ctrd.native_snapshot_dirs();
    let holds_all = |dir: &Path| {
        expected
            .files
            .iter()
            .all(|(rel, bytes)| std::fs::read(dir.join(rel)).ok().as_ref() == Some(bytes))
    };
    assert!(
        dirs.iter().any(|d| holds_all(d)),
        "no unpacked snapshot holds every file of the image with its contents: {dirs:?}"
    );
}

/// Blobs of an OCI layout, as (digest, bytes).
fn layout_blobs(layout: &OciLayout, digests: &[String]) -> Vec<(String, Vec<u8>)> {
    digests
        .iter()
        .map(|d| (d.clone(), layout.blob(d)))
        .collect()
}

fn get_manifest(app: &TestApp, repo: &str, reference: &str) -> (String, String, Vec<u8>) {
    let resp = app
        .client()
        .get(app.url(&format!("/v2/{repo}/manifests/{reference}")))
        .header(ACCEPT, ALL_MANIFEST_TYPES)
        .send()
        .expect("GET manifest");
    assert_eq!(resp.status().as_u16(), 200, "GET {repo}:{reference}");
    let h = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let ct = h(CONTENT_TYPE.as_str());
    let digest = h("docker-content-digest");
    (ct, digest, resp.bytes().expect("body").to_vec())
}

#[test]
fn containerd_pulls_oci_image_by_tag_and_by_digest() {
    let app = TestApp::start();
    let tools = Tools::new();
    let layers = two_layer_files();
    let src = tools.umoci_image("src", "v1", &layers);
    let mdigest = src.manifest_digest("v1");
    let closure = src.closure(&mdigest);
    assert_eq!(
        closure.len(),
        4,
        "manifest + config + 2 layers: {closure:?}"
    );
    let chain = chain_id(&diff_ids(&src.json(&closure[1])));
    tools.skopeo(&[
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &src.reference("v1"),
        &format!("docker://{}/containerd/oci:v1", app.host),
    ]);
    let files: Vec<(&str, Vec<u8>)> = layers.into_iter().flatten().collect();

    let ctrd = Containerd::start();
    let by_tag = format!("{}/containerd/oci:v1", app.host);
    pull_and_check(
        &ctrd,
        "berth-test",
        &[],
        &Expected {
            reference: &by_tag,
            media_type: OCI_MANIFEST,
            digest: &mdigest,
            blobs: layout_blobs(&src, &closure),
            chain: chain.clone(),
            files: files.clone(),
        },
    );

    // By digest, in another namespace: content is not shared between namespaces, so every blob
    // is fetched from berth again.
    let by_digest = format!("{}/containerd/oci@{mdigest}", app.host);
    pull_and_check(
        &ctrd,
        "berth-test-digest",
        &[],
        &Expected {
            reference: &by_digest,
            media_type: OCI_MANIFEST,
            digest: &mdigest,
            blobs: layout_blobs(&src, &closure),
            chain,
            files,
        },
    );

    // A tag that does not exist is reported as not found, not as a server error.
    let err = ctrd
        .try_ctr(
            "berth-test-missing",
            &[
                "images",
                "pull",
                "--plain-http",
                "--snapshotter",
                "native",
                &format!("{}/containerd/oci:nope", app.host),
            ],
        )
        .err()
        .expect("pulling a missing tag must fail");
    assert!(err.contains("not found"), "{err}");
    assert!(ctrd.images("berth-test-missing").is_empty());
}

#[test]
fn containerd_pulls_docker_v2s2_image() {
    let app = TestApp::start();
    let tools = Tools::new();
    let layers = two_layer_files();
    let src = tools.umoci_image("src", "v1", &layers);
    let oci_digest = src.manifest_digest("v1");
    let closure = src.closure(&oci_digest);
    let chain = chain_id(&diff_ids(&src.json(&closure[1])));
    let digestfile = tools.path("v2s2.digest");
    tools.skopeo(&[
        "copy",
        "--format",
        "v2s2",
        "--dest-tls-verify=false",
        "--digestfile",
        &digestfile.display().to_string(),
        &src.reference("v1"),
        &format!("docker://{}/containerd/v2s2:v1", app.host),
    ]);
    let pushed = std::fs::read_to_string(&digestfile)
        .expect("digestfile")
        .trim()
        .to_string();
    assert_ne!(pushed, oci_digest, "skopeo did not convert the manifest");
    let (ct, digest_header, manifest) = get_manifest(&app, "containerd/v2s2", "v1");
    assert_eq!(ct, DOCKER_MANIFEST);
    assert_eq!(digest_header, pushed);
    assert_eq!(sha256(&manifest), pushed);

    let mut blobs = vec![(pushed.clone(), manifest)];
    blobs.extend(layout_blobs(&src, &closure[1..]));
    let ctrd = Containerd::start();
    pull_and_check(
        &ctrd,
        "berth-test",
        &[],
        &Expected {
            reference: &format!("{}/containerd/v2s2:v1", app.host),
            media_type: DOCKER_MANIFEST,
            digest: &pushed,
            blobs,
            chain,
            files: layers.into_iter().flatten().collect(),
        },
    );
}

/// Builds a one-layer image from scratch with buildah holding `files`, for `arch`; returns the
/// image ID (`sha256:...`, the config digest).
fn buildah_image(tools: &Tools, name: &str, arch: &str, files: &[(&str, &[u8])]) -> String {
    let ctr = tools.buildah(&["from", "scratch"]).trim().to_string();
    let stem = name.replace('/', "_");
    for (i, (rel, bytes)) in files.iter().enumerate() {
        let f = tools.path(&format!("{stem}-input-{i}"));
        std::fs::write(&f, bytes).expect("write input");
        tools.buildah(&["copy", &ctr, &f.display().to_string(), &format!("/{rel}")]);
    }
    tools.buildah(&["config", "--arch", arch, "--os", "linux", &ctr]);
    let iid = tools.path(&format!("{stem}.iid"));
    tools.buildah(&[
        "commit",
        "--iidfile",
        &iid.display().to_string(),
        &ctr,
        name,
    ]);
    let id = std::fs::read_to_string(&iid)
        .expect("iidfile")
        .trim()
        .to_string();
    if id.starts_with("sha256:") {
        id
    } else {
        format!("sha256:{id}")
    }
}

fn blob(app: &TestApp, repo: &str, digest: &str) -> Vec<u8> {
    let resp = app
        .client()
        .get(app.url(&format!("/v2/{repo}/blobs/{digest}")))
        .send()
        .expect("GET blob");
    assert_eq!(resp.status().as_u16(), 200, "GET blob {repo}@{digest}");
    let body = resp.bytes().expect("body").to_vec();
    assert_eq!(sha256(&body), digest, "blob {digest} in {repo}");
    body
}

#[test]
fn containerd_pulls_one_platform_of_an_oci_index() {
    let app = TestApp::start();
    let tools = Tools::new();
    let arches = ["amd64", "arm64"];
    for arch in arches {
        let text = format!("hello from {arch}\n");
        buildah_image(
            &tools,
            &format!("localhost/berth-ctr-{arch}"),
            arch,
            &[("hello.txt", text.as_bytes())],
        );
    }
    tools.buildah(&["manifest", "create", "localhost/berth-ctr-list"]);
    for arch in arches {
        tools.buildah(&[
            "manifest",
            "add",
            "localhost/berth-ctr-list",
            &format!("localhost/berth-ctr-{arch}"),
        ]);
    }
    let digestfile = tools.path("list.digest");
    tools.buildah(&[
        "manifest",
        "push",
        "--all",
        "--format",
        "oci",
        "--tls-verify=false",
        "--digestfile",
        &digestfile.display().to_string(),
        "localhost/berth-ctr-list",
        &format!("docker://{}/containerd/multi:v1", app.host),
    ]);
    let pushed = std::fs::read_to_string(&digestfile)
        .expect("digestfile")
        .trim()
        .to_string();
    let repo = "containerd/multi";
    let (ct, _, index) = get_manifest(&app, repo, "v1");
    assert_eq!(ct, OCI_INDEX);
    assert_eq!(sha256(&index), pushed);
    let iv: Value = serde_json::from_slice(&index).expect("index JSON");
    let arm = iv["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|m| m["platform"]["architecture"] == "arm64")
        .expect("arm64 entry")
        .clone();
    let arm_digest = arm["digest"].as_str().expect("digest").to_string();
    let (_, _, arm_manifest) = get_manifest(&app, repo, &arm_digest);
    let mv: Value = serde_json::from_slice(&arm_manifest).expect("manifest JSON");
    let config_digest = mv["config"]["digest"].as_str().expect("config").to_string();
    let layer_digest = mv["layers"][0]["digest"]
        .as_str()
        .expect("layer")
        .to_string();
    let config = blob(&app, repo, &config_digest);
    let cv: Value = serde_json::from_slice(&config).expect("config JSON");
    assert_eq!(cv["architecture"], "arm64");
    let layer = blob(&app, repo, &layer_digest);

    // Only the arm64 image is fetched: the index, its manifest, config and layer; nothing of
    // the amd64 one.
    let ctrd = Containerd::start();
    pull_and_check(
        &ctrd,
        "berth-test",
        &["--platform", "linux/arm64"],
        &Expected {
            reference: &format!("{}/{repo}:v1", app.host),
            media_type: OCI_INDEX,
            digest: &pushed,
            blobs: vec![
                (pushed.clone(), index.clone()),
                (arm_digest, arm_manifest),
                (config_digest, config),
                (layer_digest, layer),
            ],
            chain: chain_id(&diff_ids(&cv)),
            files: vec![("hello.txt", b"hello from arm64\n".to_vec())],
        },
    );
}

fn podman_inspect(tools: &Tools, reference: &str) -> Value {
    let out = tools.podman(&["image", "inspect", reference]);
    let v: Value = serde_json::from_str(&out).expect("podman inspect JSON");
    v[0].clone()
}

/// `sha256:` of the gunzipped bytes of a gzip layer: its diff ID.
fn gunzip_digest(tools: &Tools, gz: &[u8]) -> String {
    let f = tools.path("layer.tar.gz");
    std::fs::write(&f, gz).expect("write layer");
    let out = Command::new("gzip")
        .arg("-dc")
        .arg(&f)
        .output()
        .expect("gzip");
    assert!(
        out.status.success(),
        "gzip -dc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    sha256(&out.stdout)
}

/// An image built with buildah, pushed with `podman push --format FORMAT`, inspected with skopeo
/// and over HTTP, then pulled with podman into fresh storage: same image ID and layers.
fn podman_push_roundtrip(format: &str, media_type: &str, config_type: &str, layer_type: &str) {
    let app = TestApp::start();
    let tools = Tools::new();
    let data = pseudo_random(41, 180_000);
    let id = buildah_image(
        &tools,
        "localhost/berth-podman-push",
        "amd64",
        &[
            ("hello.txt", b"pushed by podman\n".as_slice()),
            ("data.bin", &data),
        ],
    );
    let hex = id.strip_prefix("sha256:").expect("sha256 id");
    let local = podman_inspect(&tools, "localhost/berth-podman-push");
    assert_eq!(local["Id"], hex);
    let local_layers = local["RootFS"]["Layers"].clone();
    assert_eq!(local_layers.as_array().map(|a| a.len()), Some(1));

    let repo = format!("containerd/podman-{format}");
    let dest = format!("{}/{repo}:v1", app.host);
    let digestfile = tools.path("push.digest");
    tools.podman(&[
        "push",
        "--tls-verify=false",
        "--format",
        format,
        "--digestfile",
        &digestfile.display().to_string(),
        "localhost/berth-podman-push",
        &format!("docker://{dest}"),
    ]);
    let pushed = std::fs::read_to_string(&digestfile)
        .expect("digestfile")
        .trim()
        .to_string();

    // skopeo sees exactly the manifest podman pushed, and berth serves the same bytes.
    let raw = tools.skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{dest}"),
    ]);
    assert_eq!(sha256(raw.as_bytes()), pushed, "inspect --raw: {raw}");
    let (ct, digest_header, served) = get_manifest(&app, &repo, "v1");
    assert_eq!(ct, media_type);
    assert_eq!(digest_header, pushed);
    assert!(served == raw.as_bytes());
    let (ct, _, by_digest) = get_manifest(&app, &repo, &pushed);
    assert_eq!(ct, media_type);
    assert!(by_digest == served);
    let mv: Value = serde_json::from_str(&raw).expect("manifest JSON");
    assert_eq!(mv["schemaVersion"], 2);
    assert_eq!(mv["mediaType"], media_type);
    assert_eq!(mv["config"]["mediaType"], config_type);
    assert_eq!(
        mv["config"]["digest"],
        id.as_str(),
        "config digest is the image ID"
    );
    let raw_config = tools.skopeo(&[
        "inspect",
        "--config",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{dest}"),
    ]);
    assert_eq!(sha256(raw_config.as_bytes()), id);
    let layers = mv["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0]["mediaType"], layer_type);
    let ld = layers[0]["digest"].as_str().expect("layer digest");
    let layer = blob(&app, &repo, ld);
    assert_eq!(Some(layer.len() as u64), layers[0]["size"].as_u64());
    assert_eq!(
        Value::from(vec![gunzip_digest(&tools, &layer)]),
        local_layers,
        "the pushed layer does not unpack to the local one"
    );

    // Pulled into fresh storage, by tag and by digest: the same image.
    let fresh = Tools::new();
    let out = fresh.podman(&["pull", "--tls-verify=false", &dest]);
    assert_eq!(
        out.lines().last(),
        Some(hex),
        "podman pull prints the image ID"
    );
    let v = podman_inspect(&fresh, &dest);
    assert_eq!(v["Id"], hex);
    assert_eq!(v["Digest"], pushed.as_str());
    assert_eq!(v["RootFS"]["Layers"], local_layers);
    assert_eq!(v["Architecture"], "amd64");
    let by_digest = format!("{}/{repo}@{pushed}", app.host);
    let fresh2 = Tools::new();
    let out = fresh2.podman(&["pull", "--tls-verify=false", &by_digest]);
    assert_eq!(out.lines().last(), Some(hex));
    let v = podman_inspect(&fresh2, &by_digest);
    assert_eq!(v["Id"], hex);
    assert_eq!(v["RootFS"]["Layers"], local_layers);
}

#[test]
fn podman_push_oci_format_then_pull_gives_the_same_image() {
    podman_push_roundtrip("oci", OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_GZIP);
}

#[test]
fn podman_push_v2s2_format_then_pull_gives_the_same_image() {
    podman_push_roundtrip("v2s2", DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER);
}
