//! The test harness: starts the real `berth` binary on 127.0.0.1:0 and learns its address from
//! the line it prints once bound, so there is no port race.
#![allow(dead_code)]

pub mod chaos;
pub mod check;
pub mod clients;
pub mod net;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::blocking::Client;

pub struct TestApp {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`, or `https://` when berth serves TLS.
    pub base: String,
    /// `127.0.0.1:PORT`, for clients that take a registry host (skopeo, podman).
    pub host: String,
    /// `http://127.0.0.1:PORT` of the `--metrics-listen` listener, when one was asked for.
    pub metrics_base: Option<String>,
    pub data_dir: PathBuf,
    extra_args: Vec<String>,
    envs: Vec<(String, String)>,
    fd_limit: Option<u64>,
    stderr: Option<PathBuf>,
    _tmp: Option<tempfile::TempDir>,
}

pub struct TestAppBuilder {
    args: Vec<String>,
    envs: Vec<(String, String)>,
    data_dir: Option<PathBuf>,
    fd_limit: Option<u64>,
    stderr: Option<PathBuf>,
}

impl TestAppBuilder {
    /// An extra argument to `berth serve`.
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.envs.push((k.into(), v.into()));
        self
    }

    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Runs berth with this open-file limit (soft and hard), through util-linux's `prlimit`.
    pub fn fd_limit(mut self, n: u64) -> Self {
        self.fd_limit = Some(n);
        self
    }

    /// Appends berth's stderr (its logs) to this file instead of the test's stderr.
    pub fn stderr_to(mut self, file: impl Into<PathBuf>) -> Self {
        self.stderr = Some(file.into());
        self
    }

    pub fn start(self) -> TestApp {
        let (tmp, data_dir) = match self.data_dir {
            Some(d) => (None, d),
            None => {
                let t = tempfile::tempdir().expect("tempdir");
                let d = t.path().join("data");
                (Some(t), d)
            }
        };
        let mut app = TestApp {
            child: None,
            base: String::new(),
            host: String::new(),
            metrics_base: None,
            data_dir,
            extra_args: self.args,
            envs: self.envs,
            fd_limit: self.fd_limit,
            stderr: self.stderr,
            _tmp: tmp,
        };
        app.spawn();
        app
    }
}

/// The binary under test: this build's, or `BERTH_TEST_BIN` (to run the suite against
/// another build, e.g. to show a regression test fails on the code before the fix).
pub fn berth_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("BERTH_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_berth").to_string())
    })
}

impl TestApp {
    pub fn start() -> TestApp {
        TestApp::builder().start()
    }

    pub fn builder() -> TestAppBuilder {
        TestAppBuilder {
            args: Vec::new(),
            envs: Vec::new(),
            data_dir: None,
            fd_limit: None,
            stderr: None,
        }
    }

    fn spawn(&mut self) {
        let listen = if self.host.is_empty() {
            "127.0.0.1:0".to_string()
        } else {
            // A restart keeps its address so that upload Locations stay valid.
            self.host.clone()
        };
        // prlimit sets the limit and then execs berth, so the child's pid is berth's.
        let mut cmd = match self.fd_limit {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg(berth_bin());
                c
            }
            None => Command::new(berth_bin()),
        };
        cmd.arg("serve")
            .arg("--listen")
            .arg(&listen)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.extra_args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(match &self.stderr {
                Some(file) => std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(file)
                    .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
                    .into(),
                None => Stdio::inherit(),
            });
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn berth");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        let mut stdout = BufReader::new(stdout);
        stdout
            .read_line(&mut line)
            .expect("read berth's first line");
        // "berth metrics on http://127.0.0.1:PORT", written with the first line.
        if self.extra_args.iter().any(|a| a == "--metrics-listen") {
            let mut second = String::new();
            stdout
                .read_line(&mut second)
                .expect("read berth's second line");
            self.metrics_base = second
                .trim()
                .strip_prefix("berth metrics on ")
                .map(str::to_string);
            assert!(
                self.metrics_base.is_some(),
                "unexpected second line {second:?}"
            );
        }
        // "berth listening on http://127.0.0.1:PORT" (https:// with TLS)
        let base = line
            .trim()
            .rsplit(' ')
            .next()
            .filter(|u| u.starts_with("http://") || u.starts_with("https://"))
            .unwrap_or_else(|| panic!("unexpected first line from berth: {line:?}"))
            .to_string();
        self.host = base
            .split_once("://")
            .map_or(base.as_str(), |(_, host)| host)
            .to_string();
        self.base = base;
        self.child = Some(child);
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn client(&self) -> Client {
        Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(120))
            .build()
            .expect("client")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL: no chance to clean up, as in a crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for the process to exit; returns its exit status success.
    pub fn terminate(&mut self) -> bool {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            return c.wait().map(|s| s.success()).unwrap_or(false);
        }
        false
    }

    /// Starts the process again on the same address and data directory.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `berth` with a working directory and no `BERTH_*` variables from the test's environment.
pub fn clean_command(cwd: &Path) -> Command {
    let mut cmd = Command::new(berth_bin());
    cmd.current_dir(cwd).env("RUST_LOG", "warn");
    for (k, _) in std::env::vars() {
        if k.starts_with("BERTH_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Runs a command that should exit by itself; kills it (and fails) after 20 s.
pub fn output_within(mut cmd: Command, what: &str) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn berth");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// `sha256:<hex>` of some bytes, for building pushes in tests.
pub fn sha256(bytes: &[u8]) -> String {
    oci::Digest::sha256_of(bytes).to_string()
}

/// Reads the `code` of the first error in a spec error body.
pub fn error_code(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {body:?}"));
    v["errors"][0]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no errors[0].code in {body}"))
        .to_string()
}

/// Pushes a blob monolithically (POST ?digest=) and returns its digest.
pub fn push_blob(app: &TestApp, repo: &str, bytes: &[u8]) -> String {
    let digest = sha256(bytes);
    let resp = app
        .client()
        .post(app.url(&format!("/v2/{repo}/blobs/uploads/?digest={digest}")))
        .header("Content-Type", "application/octet-stream")
        .body(bytes.to_vec())
        .send()
        .expect("push blob");
    assert_eq!(resp.status().as_u16(), 201, "push blob: {:?}", resp.text());
    digest
}

/// Pushes a config and one layer, then an OCI image manifest under `reference`.
/// Returns (manifest digest, manifest bytes).
pub fn push_image(app: &TestApp, repo: &str, reference: &str, seed: &str) -> (String, Vec<u8>) {
    let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":"{seed}"}}"#);
    let layer = format!("layer bytes for {seed}").into_bytes();
    let cfg = push_blob(app, repo, config.as_bytes());
    let lay = push_blob(app, repo, &layer);
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cfg}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{lay}","size":{}}}]}}"#,
        config.len(),
        layer.len()
    )
    .into_bytes();
    let resp = app
        .client()
        .put(app.url(&format!("/v2/{repo}/manifests/{reference}")))
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .expect("push manifest");
    assert_eq!(
        resp.status().as_u16(),
        201,
        "push manifest: {:?}",
        resp.text()
    );
    (sha256(&manifest), manifest)
}

// ---------------------------------------------------------------------------------------------
// Helpers for the HTTP API tests (api_*.rs).
// ---------------------------------------------------------------------------------------------

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Every code the distribution spec defines, plus the two legacy Docker codes it allows.
pub const SPEC_ERROR_CODES: &[&str] = &[
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
    "TOOMANYREQUESTS",
    "TAG_INVALID",
    "MANIFEST_UNVERIFIED",
];

/// `sha512:<hex>` of some bytes.
pub fn sha512(bytes: &[u8]) -> String {
    oci::Digest::of(oci::Algorithm::Sha512, bytes).to_string()
}

/// A fully read response: status, headers and body, so tests can assert on all three.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    /// The value of a header (first one), if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The value of a header that must be present.
    pub fn must_header(&self, name: &str) -> &str {
        self.header(name)
            .unwrap_or_else(|| panic!("missing header {name}; reply: {}", self.describe()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.describe()))
    }

    /// Status, headers and (truncated) body, for assertion messages.
    pub fn describe(&self) -> String {
        let mut body = self.text();
        if body.len() > 600 {
            body.truncate(600);
            body.push_str("...");
        }
        format!("{} {:?} {body:?}", self.status, self.headers)
    }

    /// Asserts the status, printing the whole reply when it differs.
    #[track_caller]
    pub fn assert_status(&self, status: u16) -> &Self {
        assert_eq!(
            self.status,
            status,
            "unexpected status: {}",
            self.describe()
        );
        self
    }
}

/// Sends a request and reads the whole response.
#[track_caller]
pub fn send(req: reqwest::blocking::RequestBuilder) -> Reply {
    let resp = req.send().expect("request failed to complete");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.bytes().expect("read response body").to_vec();
    Reply {
        status,
        headers,
        body,
    }
}

/// Checks that a body is a spec error document and returns its codes.
#[track_caller]
pub fn spec_error_codes(reply: &Reply) -> Vec<String> {
    let ct = reply.header("content-type").unwrap_or("");
    assert_eq!(
        ct.split(';').next().unwrap_or("").trim(),
        "application/json",
        "error Content-Type must be application/json: {}",
        reply.describe()
    );
    let v = reply.json();
    let errors = v["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("no errors array: {}", reply.describe()));
    assert!(
        !errors.is_empty(),
        "empty errors array: {}",
        reply.describe()
    );
    errors
        .iter()
        .map(|e| {
            let code = e["code"]
                .as_str()
                .unwrap_or_else(|| panic!("error without code: {}", reply.describe()));
            assert!(
                !code.is_empty() && code.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
                "code must be uppercase letters and underscores: {code:?}"
            );
            assert!(
                SPEC_ERROR_CODES.contains(&code),
                "code {code:?} is not a distribution-spec error code: {}",
                reply.describe()
            );
            if let Some(m) = e.get("message") {
                assert!(
                    m.is_string(),
                    "message must be a string: {}",
                    reply.describe()
                );
            }
            code.to_string()
        })
        .collect()
}

/// Asserts a spec error: exact status, JSON error body, and `code` among its errors.
#[track_caller]
pub fn assert_error(reply: &Reply, status: u16, code: &str) {
    reply.assert_status(status);
    let codes = spec_error_codes(reply);
    assert!(
        codes.iter().any(|c| c == code),
        "expected error code {code}, got {codes:?}: {}",
        reply.describe()
    );
}

/// Asserts a client error (one of `statuses`) with a spec error body; never a 5xx.
#[track_caller]
pub fn assert_client_error(reply: &Reply, statuses: &[u16]) -> Vec<String> {
    assert!(
        statuses.contains(&reply.status),
        "expected one of {statuses:?}: {}",
        reply.describe()
    );
    spec_error_codes(reply)
}

/// Asserts a response to HEAD: the status and an empty body.
#[track_caller]
pub fn assert_head_status(reply: &Reply, status: u16) {
    reply.assert_status(status);
    assert!(
        reply.body.is_empty(),
        "HEAD response has a body: {}",
        reply.describe()
    );
}

/// Percent-encodes a query value (everything but unreserved characters).
pub fn pct(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Appends `key=value` to a URL that may or may not already carry a query.
pub fn with_query(url: &str, kv: &str) -> String {
    if url.contains('?') {
        format!("{url}&{kv}")
    } else {
        format!("{url}?{kv}")
    }
}

/// The path (and query) of a Location, whether it is absolute or relative.
pub fn location_path(location: &str) -> String {
    for scheme in ["http://", "https://"] {
        if let Some(rest) = location.strip_prefix(scheme) {
            return match rest.find('/') {
                Some(i) => rest[i..].to_string(),
                None => "/".to_string(),
            };
        }
    }
    location.to_string()
}

/// Whether `s` looks like a UUID (8-4-4-4-12 hex).
pub fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A descriptor `{"mediaType","digest","size"}` for some bytes.
pub fn descriptor(media_type: &str, bytes: &[u8]) -> serde_json::Value {
    serde_json::json!({"mediaType": media_type, "digest": sha256(bytes), "size": bytes.len()})
}

/// Builds a JSON document from a base object plus extra top-level fields.
pub fn json_doc(mut base: serde_json::Value, extra: serde_json::Value) -> Vec<u8> {
    if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    serde_json::to_vec(&base).expect("serialize")
}

/// An OCI image manifest with the given config and layers, plus extra top-level fields.
pub fn oci_manifest(
    config: &serde_json::Value,
    layers: &[serde_json::Value],
    extra: serde_json::Value,
) -> Vec<u8> {
    json_doc(
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config,
            "layers": layers,
        }),
        extra,
    )
}

/// An OCI index over the given manifest descriptors, plus extra top-level fields.
pub fn oci_index(manifests: &[serde_json::Value], extra: serde_json::Value) -> Vec<u8> {
    json_doc(
        serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}),
        extra,
    )
}

impl TestApp {
    /// Resolves a Location header (absolute or relative) against the server.
    pub fn resolve(&self, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else if location.starts_with('/') {
            format!("{}{}", self.base, location)
        } else {
            format!("{}/{}", self.base, location)
        }
    }

    pub fn get(&self, path: &str) -> Reply {
        send(self.client().get(self.url(path)))
    }

    pub fn head(&self, path: &str) -> Reply {
        send(self.client().head(self.url(path)))
    }

    pub fn delete(&self, path: &str) -> Reply {
        send(self.client().delete(self.url(path)))
    }

    /// Pushes a blob and returns its descriptor with the given media type.
    pub fn blob_descriptor(&self, repo: &str, media_type: &str, bytes: &[u8]) -> serde_json::Value {
        push_blob(self, repo, bytes);
        descriptor(media_type, bytes)
    }

    /// PUT /v2/<repo>/manifests/<reference> with a Content-Type.
    #[track_caller]
    pub fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        content_type: &str,
        body: &[u8],
    ) -> Reply {
        let mut req = self
            .client()
            .put(self.url(&format!("/v2/{repo}/manifests/{reference}")))
            .body(body.to_vec());
        if !content_type.is_empty() {
            req = req.header("Content-Type", content_type);
        }
        send(req)
    }

    /// Pushes a manifest, asserting 201, and returns its sha256 digest.
    #[track_caller]
    pub fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        content_type: &str,
        body: &[u8],
    ) -> String {
        let r = self.put_manifest(repo, reference, content_type, body);
        r.assert_status(201);
        sha256(body)
    }

    /// Pushes a config and one layer to `repo` and returns an OCI image manifest over them.
    pub fn image_manifest(&self, repo: &str, seed: &str, extra: serde_json::Value) -> Vec<u8> {
        let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":"{seed}"}}"#);
        let layer = format!("layer bytes for {seed}");
        let c = self.blob_descriptor(repo, OCI_CONFIG, config.as_bytes());
        let l = self.blob_descriptor(repo, OCI_LAYER, layer.as_bytes());
        oci_manifest(&c, &[l], extra)
    }

    /// POST /v2/<repo>/blobs/uploads/ asserting 202; returns the absolute upload URL.
    #[track_caller]
    pub fn start_upload(&self, repo: &str) -> String {
        let r = send(
            self.client()
                .post(self.url(&format!("/v2/{repo}/blobs/uploads/")))
                .header("Content-Length", "0"),
        );
        r.assert_status(202);
        self.resolve(r.must_header("location"))
    }

    /// PATCH one chunk with `Content-Range: start-end`.
    pub fn patch_chunk(&self, location: &str, start: usize, bytes: &[u8]) -> Reply {
        let end = (start + bytes.len()).saturating_sub(1);
        send(
            self.client()
                .patch(location)
                .header("Content-Type", "application/octet-stream")
                .header("Content-Range", format!("{start}-{end}"))
                .body(bytes.to_vec()),
        )
    }

    /// Closes an upload: PUT <location>?digest=<digest> with an optional last chunk.
    pub fn finish_upload(&self, location: &str, digest: &str, last: Option<&[u8]>) -> Reply {
        let mut req = self
            .client()
            .put(with_query(location, &format!("digest={digest}")));
        if let Some(bytes) = last {
            req = req
                .header("Content-Type", "application/octet-stream")
                .body(bytes.to_vec());
        }
        send(req)
    }
}

impl TestApp {
    /// Sends SIGTERM and returns at once (see [`TestApp::wait_exit`]).
    pub fn send_sigterm(&self) {
        if let Some(c) = self.child.as_ref() {
            let status = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status()
                .expect("run kill");
            assert!(status.success(), "kill -TERM failed");
        }
    }

    /// Waits up to `timeout` for the process to exit. `Some(status)` once it has (the process is
    /// then gone, and `restart` starts a new one); `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let c = self.child.as_mut()?;
            if let Some(status) = c.try_wait().expect("try_wait") {
                self.child = None;
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// Resolves a `Location` header value (absolute or a path) to a full URL.
    pub fn location_url(&self, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else {
            self.url(location)
        }
    }
}

/// Every regular file under `dir` (recursively) with its size; empty if `dir` does not exist.
pub fn files_under(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                out.push((e.path(), md.len()));
            }
        }
    }
    out.sort();
    out
}

/// Where berth keeps the bytes of a finished blob: `<data-dir>/blobs/sha256/<2 hex>/<hex>`.
pub fn blob_file(data_dir: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    data_dir
        .join("blobs")
        .join("sha256")
        .join(&hex[..2])
        .join(hex)
}

/// Runs one case of a table-driven test, recording its failure instead of stopping the table,
/// so that a run reports every failing case at once. Finish with [`assert_no_failures`].
pub fn soft_case(failures: &mut Vec<String>, case: &str, f: impl FnOnce()) {
    if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        failures.push(format!("[{case}] {msg}"));
    }
}

#[track_caller]
pub fn assert_no_failures(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
