//! Berth on S3 storage, against a real S3-compatible store (Garage: `eval "$(bash
//! scripts/garage.sh)"`, which scripts/test.sh does): pushes and pulls over plain HTTP and with
//! skopeo, redirects to presigned URLs, an upload moving between two processes that share the
//! bucket, and 503s (never 500s, never half-written blobs) while the store is down.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::support::clients::{OciLayout, Tools, pseudo_random};
use crate::support::{
    Reply, TestApp, TestAppBuilder, assert_error, error_code, location_path, push_blob, push_image,
    send, sha256,
};

fn env(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| {
        panic!(
            "{key} is not set: the S3 tests need an S3-compatible store. Run \
             `eval \"$(bash scripts/garage.sh)\"` first (scripts/test.sh does), which exports \
             BERTH_TEST_S3_ENDPOINT, BERTH_TEST_S3_BUCKET, AWS_ACCESS_KEY_ID, \
             AWS_SECRET_ACCESS_KEY and AWS_REGION"
        )
    })
}

/// The store's endpoint; checks the credentials are there too (berth reads them from `AWS_*`).
pub(crate) fn endpoint() -> String {
    env("AWS_ACCESS_KEY_ID");
    env("AWS_SECRET_ACCESS_KEY");
    env("BERTH_TEST_S3_ENDPOINT")
}

/// `s3://BUCKET/it/<name>-<unique>`: each test has a prefix of its own in the shared bucket.
pub(crate) fn storage_url(name: &str) -> String {
    let unique = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "s3://{}/it/{name}-{}-{unique}",
        env("BERTH_TEST_S3_BUCKET"),
        std::process::id()
    )
}

pub(crate) fn s3_app(storage: &str, endpoint: &str) -> TestAppBuilder {
    TestApp::builder()
        .arg("--storage")
        .arg(storage)
        .env("BERTH_S3_ENDPOINT", endpoint)
}

fn get_bytes(app: &TestApp, path: &str) -> Vec<u8> {
    let r = app.get(path);
    r.assert_status(200);
    r.body
}

#[test]
fn http_push_chunked_upload_and_pull() {
    let app = s3_app(&storage_url("http"), &endpoint()).start();
    let (mdigest, manifest) = push_image(&app, "s3/http", "v1", "s3-http");
    assert_eq!(get_bytes(&app, "/v2/s3/http/manifests/v1"), manifest);
    assert_eq!(
        get_bytes(&app, &format!("/v2/s3/http/manifests/{mdigest}")),
        manifest
    );

    // Three chunks, the middle one large enough to go to the store as a multipart upload.
    let data = pseudo_random(7, 9 * 1024 * 1024 + 4321);
    let digest = sha256(&data);
    let location = app.start_upload("s3/http");
    let (a, rest) = data.split_at(1000);
    let (b, c) = rest.split_at(rest.len() - 777);
    app.patch_chunk(&location, 0, a).assert_status(202);
    let r = app.patch_chunk(&location, a.len(), b);
    r.assert_status(202);
    let location = app.resolve(r.must_header("location"));
    app.finish_upload(&location, &digest, Some(c))
        .assert_status(201);
    let path = format!("/v2/s3/http/blobs/{digest}");
    assert!(get_bytes(&app, &path) == data, "blob bytes differ");
    let head = app.head(&path);
    head.assert_status(200);
    assert_eq!(head.must_header("content-length"), data.len().to_string());
    let ranged = send(
        app.client()
            .get(app.url(&path))
            .header("Range", "bytes=100-199"),
    );
    ranged.assert_status(206);
    assert!(ranged.body == data[100..200], "range bytes differ");

    // Everything survives a restart: the bytes are in the bucket.
    let mut app = app;
    app.restart();
    assert!(
        get_bytes(&app, &path) == data,
        "blob bytes differ after restart"
    );
    assert_eq!(get_bytes(&app, "/v2/s3/http/manifests/v1"), manifest);
}

/// A 10 MB pseudo-random layer (pushed as one multipart part object) and a small one.
fn image(tools: &Tools) -> OciLayout {
    tools.umoci_image(
        "src",
        "v1",
        &[
            vec![("big.bin", pseudo_random(11, 10_000_000))],
            vec![("etc/hello", b"hello from S3\n".to_vec())],
        ],
    )
}

#[test]
fn skopeo_push_and_pull_with_and_without_redirects() {
    let storage = storage_url("skopeo");
    let endpoint = endpoint();
    let tools = Tools::new();
    let src = image(&tools);
    let mdigest = src.manifest_digest("v1");
    let closure = src.closure(&mdigest);

    let mut app = s3_app(&storage, &endpoint).start();
    let dest = format!("docker://{}/s3/skopeo:v1", app.host);
    tools.skopeo(&[
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &src.reference("v1"),
        &dest,
    ]);
    let pull = |app: &TestApp, name: &str| {
        let out = OciLayout::new(tools.path(name));
        tools.skopeo(&[
            "copy",
            "--preserve-digests",
            "--src-tls-verify=false",
            &format!("docker://{}/s3/skopeo:v1", app.host),
            &out.reference("back"),
        ]);
        assert_eq!(out.manifest_digest("back"), mdigest);
        for d in &closure {
            assert!(out.blob(d) == src.blob(d), "{name}: blob {d} differs");
        }
    };
    pull(&app, "plain");

    // The same registry (same bucket and metadata) answering blob GETs with redirects to
    // presigned URLs: skopeo follows them to the store.
    assert!(app.terminate(), "berth did not stop cleanly");
    let app = s3_app(&storage, &endpoint)
        .data_dir(app.data_dir().to_path_buf())
        .env("BERTH_S3_REDIRECT_BLOB_GETS", "true")
        .start();
    let layer = &closure[closure.len() - 1];
    let path = format!("/v2/s3/skopeo/blobs/{layer}");
    let r = app.get(&path);
    r.assert_status(307);
    let to = r.must_header("location").to_string();
    assert!(to.starts_with(&endpoint), "redirected to {to}");
    let fetched = app.client().get(&to).send().expect("GET presigned URL");
    assert_eq!(fetched.status().as_u16(), 200, "GET {to}");
    assert!(
        fetched.bytes().expect("body").as_ref() == src.blob(layer).as_slice(),
        "presigned URL serves other bytes"
    );
    // HEAD is answered by berth itself; unknown blobs are still 404s, not redirects.
    app.head(&path).assert_status(200);
    assert_error(
        &app.get(&format!("/v2/s3/skopeo/blobs/{}", sha256(b"nope"))),
        404,
        "BLOB_UNKNOWN",
    );
    pull(&app, "redirected");
}

/// Two berth processes share the bucket and the metadata database, as nodes behind a load
/// balancer would: an upload started and appended to on one is appended to and committed on
/// the other.
#[test]
fn an_upload_continues_on_another_process() {
    let storage = storage_url("nodes");
    let endpoint = endpoint();
    let a = s3_app(&storage, &endpoint).start();
    let b = s3_app(&storage, &endpoint)
        .data_dir(a.data_dir().to_path_buf())
        .start();

    let data = pseudo_random(21, 3 * 1024 * 1024 + 5);
    let digest = sha256(&data);
    let (first, second) = data.split_at(1024 * 1024);
    let on_a = a.start_upload("s3/nodes");
    let r = a.patch_chunk(&on_a, 0, first);
    r.assert_status(202);
    let on_b = b.resolve(&location_path(r.must_header("location")));
    let r = b.patch_chunk(&on_b, first.len(), second);
    r.assert_status(202);
    assert_eq!(r.must_header("range"), format!("0-{}", data.len() - 1));
    let on_b = b.resolve(&location_path(r.must_header("location")));
    b.finish_upload(&on_b, &digest, None).assert_status(201);

    for app in [&a, &b] {
        let got = get_bytes(app, &format!("/v2/s3/nodes/blobs/{digest}"));
        assert!(got == data, "blob bytes differ on {}", app.base);
    }
    let (_, manifest) = push_image(&a, "s3/nodes", "v1", "nodes");
    assert_eq!(get_bytes(&b, "/v2/s3/nodes/manifests/v1"), manifest);
}

/// A TCP forwarder to the store that can be switched off (connections refused, open ones cut)
/// and on again at the same address: the store going down and coming back, without stopping
/// the Garage the other tests share.
pub(crate) struct Proxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    running: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    pub(crate) fn start(upstream_url: &str) -> Proxy {
        let host = upstream_url
            .split("://")
            .nth(1)
            .unwrap_or(upstream_url)
            .trim_end_matches('/');
        let upstream = host
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .unwrap_or_else(|| panic!("cannot resolve {host}"));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let mut proxy = Proxy {
            addr: listener.local_addr().expect("proxy address"),
            upstream,
            running: Arc::new(AtomicBool::new(false)),
            connections: Arc::new(Mutex::new(Vec::new())),
            acceptor: None,
        };
        proxy.serve(listener);
        proxy
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn serve(&mut self, listener: TcpListener) {
        listener.set_nonblocking(true).expect("nonblocking");
        self.running.store(true, Ordering::SeqCst);
        let running = self.running.clone();
        let connections = self.connections.clone();
        let upstream = self.upstream;
        self.acceptor = Some(std::thread::spawn(move || {
            while running.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((inbound, _)) => {
                        let _ = inbound.set_nonblocking(false);
                        let Ok(outbound) = TcpStream::connect(upstream) else {
                            continue;
                        };
                        let mut open = connections.lock().unwrap_or_else(|p| p.into_inner());
                        for s in [&inbound, &outbound] {
                            if let Ok(c) = s.try_clone() {
                                open.push(c);
                            }
                        }
                        pipe(&inbound, &outbound);
                        pipe(&outbound, &inbound);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => return,
                }
            }
            // The listener is dropped here: new connections are refused.
        }));
    }

    pub(crate) fn down(&mut self) {
        self.running.store(false, Ordering::SeqCst);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        for s in self
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub(crate) fn up(&mut self) {
        let listener = TcpListener::bind(self.addr).expect("rebind proxy");
        self.serve(listener);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.down();
    }
}

/// Copies one direction of a connection on its own thread until either side closes.
fn pipe(from: &TcpStream, to: &TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// 503 with the one non-spec code berth uses for a backend that is down.
#[track_caller]
pub(crate) fn assert_unavailable(reply: &Reply) {
    reply.assert_status(503);
    assert_eq!(
        error_code(&reply.text()),
        "UNAVAILABLE",
        "{}",
        reply.describe()
    );
}

/// While the store is down, every request that needs it is a 503 UNAVAILABLE (never a 500),
/// and nothing half-written becomes visible; once it is back, the interrupted upload resumes.
#[test]
fn store_down_gives_503_and_recovers() {
    let mut proxy = Proxy::start(&endpoint());
    let app = s3_app(&storage_url("down"), &proxy.url()).start();
    let (_, manifest) = push_image(&app, "s3/down", "v1", "down");
    // The config blob `push_image` wrote.
    let config = br#"{"architecture":"amd64","os":"linux","seed":"down"}"#;
    let config_path = format!("/v2/s3/down/blobs/{}", sha256(config));
    let data = pseudo_random(31, 2 * 1024 * 1024);
    let digest = sha256(&data);
    let (first, second) = data.split_at(1024 * 1024);
    let location = app.start_upload("s3/down");
    app.patch_chunk(&location, 0, first).assert_status(202);

    proxy.down();
    assert_unavailable(&app.get(&config_path));
    assert_unavailable(&send(
        app.client()
            .post(app.url("/v2/s3/down/blobs/uploads/"))
            .header("Content-Length", "0"),
    ));
    assert_unavailable(&app.patch_chunk(&location, first.len(), second));
    assert_unavailable(&app.finish_upload(&location, &digest, Some(second)));
    let other = pseudo_random(32, 1000);
    assert_unavailable(&send(
        app.client()
            .post(app.url(&format!(
                "/v2/s3/down/blobs/uploads/?digest={}",
                sha256(&other)
            )))
            .body(other.clone()),
    ));
    // Metadata still answers what needs no bytes.
    assert_eq!(get_bytes(&app, "/v2/s3/down/manifests/v1"), manifest);

    proxy.up();
    // Nothing of the failed requests is visible...
    assert_error(
        &app.get(&format!("/v2/s3/down/blobs/{digest}")),
        404,
        "BLOB_UNKNOWN",
    );
    assert_error(
        &app.get(&format!("/v2/s3/down/blobs/{}", sha256(&other))),
        404,
        "BLOB_UNKNOWN",
    );
    // ...the upload is where it was before the outage, and completes.
    let status = app.get(&location_path(&location));
    status.assert_status(204);
    assert_eq!(
        status.must_header("range"),
        format!("0-{}", first.len() - 1)
    );
    app.finish_upload(&location, &digest, Some(second))
        .assert_status(201);
    assert!(
        get_bytes(&app, &format!("/v2/s3/down/blobs/{digest}")) == data,
        "blob bytes differ"
    );
    assert!(!get_bytes(&app, &config_path).is_empty());
    push_blob(&app, "s3/down", &other);
}

/// Stalled uploads on S3 hold no part buffers: each sender that goes quiet has what it sent
/// written out as a part of its own (before, each held up to a whole 8 MiB part in memory).
#[test]
fn stalled_patches_on_s3_hold_no_part_buffers() {
    use crate::abuse::{stalled_patch, vm_hwm_mib};
    let app = s3_app(&storage_url("stalled"), &endpoint()).start();
    let stalled: Vec<_> = (0..100)
        .map(|_| stalled_patch(&app, "s3/stalled", 16 << 20, 3 << 20))
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let rss = vm_hwm_mib(app.pid());
    eprintln!("peak RSS with 100 stalled S3 PATCHes holding 3 MiB each: {rss} MiB");
    assert!(rss <= 256, "peak RSS {rss} MiB");
    drop(stalled);
}
