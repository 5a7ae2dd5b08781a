//! Several stateless berth processes on one PostgreSQL database and one S3 bucket (Garage) act
//! as one registry: real clients push to one node and pull from another, a chunked upload hops
//! between nodes, concurrent tag pushes agree, a node killed mid-push leaves nothing visible,
//! and outages of PostgreSQL or of the store give 503s and heal without restarting berth.

use std::sync::atomic::Ordering;
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::clients::{buildah_list, hexes, podman_inspect, three_layer_image};
use crate::postgres::{Cluster, admin_sql, with_database};
use crate::s3::{Proxy, assert_unavailable, endpoint, s3_app, storage_url};
use crate::support::clients::{GenReader, OciLayout, Tools, digest_of, list_dir, pseudo_random};
use crate::support::{
    Reply, TestApp, assert_error, location_path, push_blob, push_image, send, sha256, with_query,
};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// A database of the test's own on the shared server, dropped afterwards.
pub(crate) struct Database {
    name: String,
    pub(crate) url: String,
}

impl Database {
    pub(crate) fn create() -> Database {
        let name = format!("berth_mn_{}", uuid::Uuid::new_v4().simple());
        let admin = admin_sql(&format!("CREATE DATABASE {name}"));
        let url = with_database(&admin, &name);
        Database { name, url }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::panic::catch_unwind(|| {
            admin_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        });
    }
}

/// A node: its own data directory, the shared metadata URL and bucket prefix.
fn node(metadata: &str, storage: &str, s3_endpoint: &str) -> TestApp {
    s3_app(storage, s3_endpoint)
        .arg("--metadata")
        .arg(metadata)
        .env("BERTH_METADATA_CONNECT_TIMEOUT_SECS", "2")
        .start()
}

/// Two nodes on a fresh database and a fresh prefix of the bucket. The database outlives the
/// nodes (fields drop in order).
struct Pair {
    a: TestApp,
    b: TestApp,
    _db: Database,
}

fn pair(name: &str) -> Pair {
    let db = Database::create();
    let storage = storage_url(&format!("multinode-{name}"));
    let endpoint = endpoint();
    let a = node(&db.url, &storage, &endpoint);
    let b = node(&db.url, &storage, &endpoint);
    assert_ne!(a.data_dir(), b.data_dir());
    Pair { a, b, _db: db }
}

#[track_caller]
fn get_ok(app: &TestApp, path: &str) -> Reply {
    let r = app.get(path);
    r.assert_status(200);
    r
}

/// GET a manifest with every manifest type accepted.
fn get_manifest(app: &TestApp, repo: &str, reference: &str) -> Reply {
    send(
        app.client()
            .get(app.url(&format!("/v2/{repo}/manifests/{reference}")))
            .header(
                "Accept",
                "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json",
            ),
    )
}

#[test]
fn skopeo_into_one_node_skopeo_and_podman_out_of_the_other() {
    let p = pair("skopeo");
    let tools = Tools::new();
    let src = three_layer_image(&tools);
    let mdigest = src.manifest_digest("v1");
    let manifest = src.blob(&mdigest);
    let closure = src.closure(&mdigest);
    assert_eq!(closure.len(), 5, "manifest + config + 3 layers");

    tools.skopeo(&[
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &src.reference("v1"),
        &format!("docker://{}/mn/app:v1", p.a.host),
    ]);

    // Node B, which saw none of the push, serves the same bytes.
    let m = get_manifest(&p.b, "mn/app", "v1");
    m.assert_status(200);
    assert_eq!(m.header("content-type"), Some(OCI_MANIFEST));
    assert_eq!(m.header("docker-content-digest"), Some(mdigest.as_str()));
    assert!(m.body == manifest, "node B serves other manifest bytes");
    for d in &closure[1..] {
        let got = get_ok(&p.b, &format!("/v2/mn/app/blobs/{d}"));
        assert!(got.body == src.blob(d), "node B: blob {d} differs");
    }

    // skopeo out of node B: the same manifest digest, every blob identical, nothing else.
    let out = OciLayout::new(tools.path("out"));
    tools.skopeo(&[
        "copy",
        "--preserve-digests",
        "--src-tls-verify=false",
        &format!("docker://{}/mn/app:v1", p.b.host),
        &out.reference("back"),
    ]);
    assert_eq!(out.manifest_digest("back"), mdigest);
    for d in &closure {
        assert!(out.blob(d) == src.blob(d), "pulled blob {d} differs");
    }
    assert_eq!(list_dir(&out.path.join("blobs/sha256")), hexes(&closure));

    // podman pulls it from node B by digest.
    let mv = src.json(&mdigest);
    let config_digest = mv["config"]["digest"].as_str().expect("config digest");
    let config_hex = config_digest.strip_prefix("sha256:").expect("hex");
    let diff_ids = src.json(config_digest)["rootfs"]["diff_ids"].clone();
    assert_eq!(diff_ids.as_array().map(|a| a.len()), Some(3));
    let by_digest = format!("{}/mn/app@{mdigest}", p.b.host);
    let pulled = tools.podman(&["pull", "--tls-verify=false", &by_digest]);
    assert_eq!(pulled.lines().last(), Some(config_hex));
    let v = podman_inspect(&tools, &by_digest);
    assert_eq!(v["Id"], config_hex);
    assert_eq!(v["Digest"], mdigest.as_str());
    assert_eq!(v["RepoDigests"], serde_json::json!([by_digest]));
    assert_eq!(v["RootFS"]["Layers"], diff_ids);
}

#[test]
fn buildah_pushes_an_index_to_one_node_skopeo_copies_all_from_the_other() {
    let p = pair("buildah");
    let tools = Tools::new();
    let arches = ["amd64", "arm64"];
    let ids = buildah_list(&tools, &arches, "localhost/berth-mn-list");
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
        "localhost/berth-mn-list",
        &format!("docker://{}/mn/multi:v1", p.b.host),
    ]);
    let pushed = std::fs::read_to_string(&digestfile)
        .expect("digestfile")
        .trim()
        .to_string();

    let list = get_manifest(&p.a, "mn/multi", "v1");
    list.assert_status(200);
    assert_eq!(list.header("content-type"), Some(OCI_INDEX));
    assert_eq!(list.header("docker-content-digest"), Some(pushed.as_str()));
    assert_eq!(sha256(&list.body), pushed);

    let out = OciLayout::new(tools.path("out"));
    tools.skopeo(&[
        "copy",
        "--all",
        "--preserve-digests",
        "--src-tls-verify=false",
        &format!("docker://{}/mn/multi:v1", p.a.host),
        &out.reference("back"),
    ]);
    assert_eq!(out.manifest_digest("back"), pushed);
    assert!(out.blob(&pushed) == list.body, "pulled index differs");
    let index: Value = serde_json::from_slice(&list.body).expect("index JSON");
    let children = index["manifests"].as_array().expect("manifests");
    assert_eq!(children.len(), 2);
    let closure = out.closure(&pushed);
    assert_eq!(
        closure.len(),
        1 + 2 * 3,
        "index + 2 x (manifest, config, layer)"
    );
    for ((child, arch), id) in children.iter().zip(arches).zip(&ids) {
        assert_eq!(child["platform"]["architecture"], arch);
        let cd = child["digest"].as_str().expect("child digest");
        let mv = out.json(cd);
        assert_eq!(mv["config"]["digest"].as_str(), Some(id.as_str()));
        let cfg: Value = serde_json::from_slice(&out.blob(id)).expect("config JSON");
        assert_eq!(cfg["architecture"], arch);
    }
    let manifests: Vec<&str> = std::iter::once(pushed.as_str())
        .chain(
            children
                .iter()
                .map(|c| c["digest"].as_str().expect("digest")),
        )
        .collect();
    for d in &closure {
        let got = out.blob(d);
        assert_eq!(sha256(&got), *d, "pulled {d} has other bytes");
        // And both nodes serve exactly those bytes.
        for app in [&p.a, &p.b] {
            let served = if manifests.contains(&d.as_str()) {
                get_manifest(app, "mn/multi", d)
            } else {
                app.get(&format!("/v2/mn/multi/blobs/{d}"))
            };
            served.assert_status(200);
            assert!(
                served.body == got,
                "{} serves other bytes for {d}",
                app.base
            );
        }
    }
    assert_eq!(list_dir(&out.path.join("blobs/sha256")), hexes(&closure));
}

#[test]
fn a_chunked_upload_hops_between_nodes() {
    let p = pair("chunked");
    let data = pseudo_random(41, 7 * 1024 * 1024 + 333);
    let digest = sha256(&data);
    let (c1, rest) = data.split_at(2 * 1024 * 1024 + 1);
    let (c2, c3) = rest.split_at(3 * 1024 * 1024 - 7);

    let on_a = p.a.start_upload("mn/chunks");
    let path = location_path(&on_a);
    let r = p.b.patch_chunk(&p.b.url(&path), 0, c1);
    r.assert_status(202);
    assert_eq!(r.must_header("range"), format!("0-{}", c1.len() - 1));
    let path = location_path(r.must_header("location"));
    let r = p.a.patch_chunk(&p.a.url(&path), c1.len(), c2);
    r.assert_status(202);
    assert_eq!(
        r.must_header("range"),
        format!("0-{}", c1.len() + c2.len() - 1)
    );
    let path = location_path(r.must_header("location"));
    // Node B reports the same progress before the last chunk.
    let status = p.b.get(&path);
    status.assert_status(204);
    assert_eq!(
        status.must_header("range"),
        format!("0-{}", c1.len() + c2.len() - 1)
    );
    let r = p.b.finish_upload(&p.b.url(&path), &digest, Some(c3));
    r.assert_status(201);
    assert_eq!(r.must_header("docker-content-digest"), digest);

    for app in [&p.a, &p.b] {
        let blob = format!("/v2/mn/chunks/blobs/{digest}");
        let got = get_ok(app, &blob);
        assert!(got.body == data, "blob bytes differ on {}", app.base);
        let head = app.head(&blob);
        head.assert_status(200);
        assert_eq!(head.must_header("content-length"), data.len().to_string());
        // The finished upload is gone everywhere.
        assert_error(&app.get(&path), 404, "BLOB_UPLOAD_UNKNOWN");
    }
}

#[test]
fn concurrent_pushes_of_one_tag_on_two_nodes_agree() {
    let p = pair("race");
    let repo = "mn/race";
    const ROUNDS: usize = 24;
    // Every manifest's blobs first, so that the race is the manifest PUTs alone.
    let mut rounds = Vec::new();
    for r in 0..ROUNDS {
        let ma =
            p.a.image_manifest(repo, &format!("race-{r}-a"), serde_json::json!({}));
        let mb =
            p.b.image_manifest(repo, &format!("race-{r}-b"), serde_json::json!({}));
        rounds.push((ma, mb));
    }
    let shared =
        p.a.image_manifest(repo, "race-shared", serde_json::json!({}));
    let shared_digest = sha256(&shared);

    let hot_pushed = Mutex::new(Vec::new());
    for (r, (ma, mb)) in rounds.iter().enumerate() {
        let tag = format!("r{r:02}");
        let barrier = Barrier::new(2);
        std::thread::scope(|s| {
            for (app, m) in [(&p.a, ma), (&p.b, mb)] {
                let (barrier, tag, hot_pushed, shared) = (&barrier, &tag, &hot_pushed, &shared);
                s.spawn(move || {
                    barrier.wait();
                    app.put_manifest(repo, tag, OCI_MANIFEST, m)
                        .assert_status(201);
                    app.put_manifest(repo, "hot", OCI_MANIFEST, m)
                        .assert_status(201);
                    hot_pushed.lock().expect("lock").push(sha256(m));
                    // Both nodes insert the very same manifest at once, by digest and by tag.
                    app.put_manifest(repo, &sha256(shared), OCI_MANIFEST, shared)
                        .assert_status(201);
                    app.put_manifest(repo, "same", OCI_MANIFEST, shared)
                        .assert_status(201);
                });
            }
        });
        let on_a = get_manifest(&p.a, repo, &tag);
        let on_b = get_manifest(&p.b, repo, &tag);
        on_a.assert_status(200);
        on_b.assert_status(200);
        let digest = on_a.must_header("docker-content-digest").to_string();
        assert_eq!(
            on_b.must_header("docker-content-digest"),
            digest,
            "round {r}: the nodes disagree on {tag}"
        );
        assert!(
            digest == sha256(ma) || digest == sha256(mb),
            "round {r}: {tag} points at {digest}, which neither node pushed"
        );
        assert!(on_a.body == on_b.body && sha256(&on_a.body) == digest);
    }

    let hot_a = get_manifest(&p.a, repo, "hot");
    let hot_b = get_manifest(&p.b, repo, "hot");
    hot_a.assert_status(200);
    hot_b.assert_status(200);
    let hot = hot_a.must_header("docker-content-digest").to_string();
    assert_eq!(hot_b.must_header("docker-content-digest"), hot);
    assert!(
        hot_pushed.lock().expect("lock").contains(&hot),
        "hot points at {hot}, which nobody pushed"
    );
    for app in [&p.a, &p.b] {
        let same = get_manifest(app, repo, "same");
        same.assert_status(200);
        assert_eq!(same.must_header("docker-content-digest"), shared_digest);
        let mut expected: Vec<String> = (0..ROUNDS).map(|r| format!("r{r:02}")).collect();
        expected.extend(["hot".to_string(), "same".to_string()]);
        expected.sort();
        let tags = get_ok(app, &format!("/v2/{repo}/tags/list")).json();
        assert_eq!(tags["tags"], serde_json::json!(expected), "{}", app.base);
        let catalog = get_ok(app, "/v2/_catalog").json();
        assert_eq!(catalog["repositories"], serde_json::json!([repo]));
    }
}

#[test]
fn kill9_of_a_node_mid_push_then_the_retry_on_another_node_succeeds() {
    const BIG: u64 = 96 * 1024 * 1024;
    const CUT: u64 = 24 * 1024 * 1024;
    let mut p = pair("kill9");
    let repo = "mn/big";
    let seed = 0x05EE_DB16;
    let (digest, len) = digest_of(GenReader::new(seed, BIG));
    assert_eq!(len, BIG);
    let blob = format!("/v2/{repo}/blobs/{digest}");

    let upload = p.a.start_upload(repo);
    let reader = GenReader::new(seed, BIG).stall_after(CUT);
    let produced = reader.produced();
    let abort = reader.abort_flag();
    let client = p.a.client();
    let put_url = with_query(&upload, &format!("digest={digest}"));
    let sender = std::thread::spawn(move || {
        client
            .put(put_url)
            .header("Content-Type", "application/octet-stream")
            .body(reqwest::blocking::Body::sized(reader, BIG))
            .send()
            .map(|r| r.status().as_u16())
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    while produced.load(Ordering::SeqCst) < CUT {
        assert!(Instant::now() < deadline, "the body stalled before {CUT}");
        assert!(
            !sender.is_finished(),
            "the PUT ended early: {:?}",
            sender.join()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Let node A take in what is in flight, then kill it mid-body.
    std::thread::sleep(Duration::from_millis(500));
    p.a.kill9();
    abort.store(true, Ordering::SeqCst);
    let outcome = sender.join().expect("sender thread");
    assert!(outcome.is_err(), "the cut PUT must fail, got {outcome:?}");

    // Nothing of the cut push is visible on the surviving node.
    let head = p.b.head(&blob);
    head.assert_status(404);
    assert_error(&p.b.get(&blob), 404, "BLOB_UNKNOWN");

    // The client retries the whole push against node B.
    let upload = p.b.start_upload(repo);
    let resp =
        p.b.client()
            .put(with_query(&upload, &format!("digest={digest}")))
            .header("Content-Type", "application/octet-stream")
            .body(reqwest::blocking::Body::sized(
                GenReader::new(seed, BIG),
                BIG,
            ))
            .send()
            .expect("retry PUT");
    assert_eq!(resp.status().as_u16(), 201, "retry PUT");
    assert_eq!(
        resp.headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok()),
        Some(digest.as_str())
    );
    let head = p.b.head(&blob);
    head.assert_status(200);
    assert_eq!(head.must_header("content-length"), BIG.to_string());
    let get = p.b.client().get(p.b.url(&blob)).send().expect("GET blob");
    assert_eq!(get.status().as_u16(), 200);
    let (got, n) = digest_of(get);
    assert_eq!(n, BIG);
    assert_eq!(got, digest, "node B serves other bytes");
}

#[test]
fn postgres_restart_while_two_nodes_run() {
    let cluster = Cluster::init();
    cluster.start();
    let storage = storage_url("multinode-pg-restart");
    let endpoint = endpoint();
    let a = node(&cluster.url(), &storage, &endpoint);
    let b = node(&cluster.url(), &storage, &endpoint);
    let repo = "mn/pg";
    let (d1, m1) = push_image(&a, repo, "v1", "pg-before");
    let got = get_manifest(&b, repo, "v1");
    got.assert_status(200);
    assert_eq!(got.body, m1);

    cluster.stop();
    for app in [&a, &b] {
        let started = Instant::now();
        assert_unavailable(&app.get(&format!("/v2/{repo}/manifests/v1")));
        assert_unavailable(&app.get(&format!("/v2/{repo}/tags/list")));
        let head = app.head(&format!("/v2/{repo}/manifests/{d1}"));
        head.assert_status(503);
        assert!(
            head.body.is_empty(),
            "HEAD with a body: {}",
            head.describe()
        );
        assert_unavailable(&send(
            app.client()
                .post(app.url(&format!("/v2/{repo}/blobs/uploads/")))
                .header("Content-Length", "0"),
        ));
        let layer = b"layer bytes for pg-before";
        assert_unavailable(&app.get(&format!("/v2/{repo}/blobs/{}", sha256(layer))));
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "five calls while PostgreSQL is down took {:?}",
            started.elapsed()
        );
    }

    cluster.start();
    // The very next requests succeed on both nodes, with no restart of berth.
    for app in [&b, &a] {
        let got = get_manifest(app, repo, "v1");
        got.assert_status(200);
        assert_eq!(got.body, m1);
        assert_eq!(got.header("docker-content-digest"), Some(d1.as_str()));
    }
    let (d2, m2) = push_image(&b, repo, "v2", "pg-after");
    let got = get_manifest(&a, repo, &d2);
    got.assert_status(200);
    assert_eq!(got.body, m2);
    let layer = b"layer bytes for pg-after";
    assert_eq!(
        get_ok(&a, &format!("/v2/{repo}/blobs/{}", sha256(layer))).body,
        layer
    );
    for app in [&a, &b] {
        let tags = get_ok(app, &format!("/v2/{repo}/tags/list")).json();
        assert_eq!(tags["tags"], serde_json::json!(["v1", "v2"]));
    }
}

#[test]
fn store_down_gives_503_on_both_nodes_and_heals() {
    let db = Database::create();
    let mut proxy = Proxy::start(&endpoint());
    let storage = storage_url("multinode-store-down");
    let a = node(&db.url, &storage, &proxy.url());
    let b = node(&db.url, &storage, &proxy.url());
    let repo = "mn/down";
    let (d1, m1) = push_image(&a, repo, "v1", "down-before");
    let layer = b"layer bytes for down-before".to_vec();
    let layer_path = format!("/v2/{repo}/blobs/{}", sha256(&layer));
    assert_eq!(get_ok(&b, &layer_path).body, layer);
    let fresh = pseudo_random(51, 300_000);
    let fresh_digest = sha256(&fresh);
    let fresh_path = format!("/v2/{repo}/blobs/{fresh_digest}");

    proxy.down();
    // b read the small layer before: it serves its verified copy (see service::small_blobs),
    // after asking PostgreSQL whether the repository may read it. a never read it: 503.
    for (app, has_copy) in [(&a, false), (&b, true)] {
        let got = app.get(&layer_path);
        if has_copy {
            got.assert_status(200);
            assert_eq!(got.body, layer);
        } else {
            assert_unavailable(&got);
        }
        assert_unavailable(&send(
            app.client()
                .post(app.url(&format!("/v2/{repo}/blobs/uploads/?digest={fresh_digest}")))
                .header("Content-Type", "application/octet-stream")
                .body(fresh.clone()),
        ));
        assert_unavailable(&send(
            app.client()
                .post(app.url(&format!("/v2/{repo}/blobs/uploads/")))
                .header("Content-Length", "0"),
        ));
        // Manifests live in PostgreSQL: still served, byte for byte.
        for reference in ["v1", d1.as_str()] {
            let got = get_manifest(app, repo, reference);
            got.assert_status(200);
            assert_eq!(got.body, m1, "{} {reference}", app.base);
            assert_eq!(got.header("docker-content-digest"), Some(d1.as_str()));
        }
        let tags = get_ok(app, &format!("/v2/{repo}/tags/list")).json();
        assert_eq!(tags["tags"], serde_json::json!(["v1"]));
    }

    proxy.up();
    // Nothing of the failed pushes is visible, and pushes complete with no repair.
    for app in [&a, &b] {
        assert_error(&app.get(&fresh_path), 404, "BLOB_UNKNOWN");
        assert_eq!(get_ok(app, &layer_path).body, layer);
    }
    assert_eq!(push_blob(&b, repo, &fresh), fresh_digest);
    assert!(get_ok(&a, &fresh_path).body == fresh, "fresh blob differs");
    let (d2, m2) = push_image(&b, repo, "v2", "down-after");
    let got = get_manifest(&a, repo, "v2");
    got.assert_status(200);
    assert_eq!(got.body, m2);
    assert_eq!(got.header("docker-content-digest"), Some(d2.as_str()));
    let after = b"layer bytes for down-after";
    assert_eq!(
        get_ok(&a, &format!("/v2/{repo}/blobs/{}", sha256(after))).body,
        after
    );
}

/// Chaos on two nodes over PostgreSQL and S3: faulty clients spread every request over both
/// nodes, race their retries across them, and node A is killed and restarted twice. The run
/// ends with the full check on both nodes: every tag complete, every blob's bytes hashing to
/// its digest.
#[test]
fn chaos_on_two_nodes_leaves_everything_consistent() {
    use crate::support::chaos::ChaosClient;
    use crate::support::check::assert_every_tag_is_complete;
    use std::sync::atomic::AtomicBool;

    let mut p = pair("chaos");
    let nodes = vec![p.a.base.clone(), p.b.base.clone()];
    let done = AtomicBool::new(false);
    let pushed = std::thread::scope(|s| {
        let workers: Vec<_> = (0..3u64)
            .map(|w| {
                let nodes = nodes.clone();
                let done = &done;
                s.spawn(move || {
                    let mut client = ChaosClient::new(nodes, 2000 + w);
                    let mut pushed = 0;
                    let mut i = 0u64;
                    while !done.load(Ordering::Relaxed) || i < 3 {
                        client.push_image(
                            &format!("chaos/w{w}"),
                            &format!("t{}", i % 4),
                            w * 10_000 + i,
                        );
                        pushed += 1;
                        i += 1;
                    }
                    pushed
                })
            })
            .collect();
        for _ in 0..2 {
            std::thread::sleep(Duration::from_secs(3));
            p.a.restart();
        }
        std::thread::sleep(Duration::from_secs(2));
        done.store(true, Ordering::Relaxed);
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| panic!("worker panicked")))
            .sum::<usize>()
    });
    eprintln!("{pushed} pushes completed on two nodes through 2 crashes");
    assert_every_tag_is_complete(&p.a);
    assert_every_tag_is_complete(&p.b);
}

/// Access control across nodes: a token issued by one node works on the other (the signing
/// keys are shared), and a robot secret revoked in the shared database is refused by both
/// within a second (each polls the access generation).
#[test]
fn tokens_cross_nodes_and_revocations_reach_every_node_within_a_second() {
    use crate::auth::{admin_on, push_as};
    let db = Database::create();
    admin_on(
        &db.url,
        &["user", "add", "alice", "--password-stdin"],
        "alice-pw\n",
    );
    admin_on(
        &db.url,
        &["namespace", "add", "team", "--owner", "alice"],
        "",
    );
    let out = admin_on(
        &db.url,
        &["robot", "add", "team", "ci", "--grant", "team/*:pull,push"],
        "",
    );
    let secret = out
        .lines()
        .find_map(|l| l.strip_prefix("secret: "))
        .expect("a secret")
        .to_string();
    let storage = storage_url("multinode-auth");
    let endpoint = endpoint();
    let node = || {
        s3_app(&storage, &endpoint)
            .arg("--metadata")
            .arg(&db.url)
            .arg("--auth")
            .arg("token")
            .start()
    };
    let (a, b) = (node(), node());

    let reply = send(
        a.client()
            .get(a.url("/auth/token?service=berth&scope=repository:team/app:pull,push"))
            .basic_auth("alice", Some("alice-pw")),
    );
    reply.assert_status(200);
    let token = reply.json()["token"].as_str().expect("token").to_string();
    let tags = |app: &TestApp| {
        send(
            app.client()
                .get(app.url("/v2/team/app/tags/list"))
                .bearer_auth(&token),
        )
    };
    push_as(&a, "team+ci", &secret, "team/app", "1").assert_status(201);
    tags(&b).assert_status(200);
    push_as(&b, "team+ci", &secret, "team/app", "2").assert_status(201);

    let id = secret.split('_').nth(1).expect("berth_<id>_<secret>");
    admin_on(&db.url, &["token", "revoke", id], "");
    let revoked_at = Instant::now();
    let refused = |app: &TestApp| {
        send(
            app.client()
                .get(app.url("/v2/team/app/tags/list"))
                .basic_auth("team+ci", Some(&secret)),
        )
        .status
            == 401
    };
    loop {
        if refused(&a) && refused(&b) {
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "a revoked robot was still accepted after {:?}",
            revoked_at.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
