//! Observability end to end: real clients push and pull, then `/metrics` and the access log
//! (berth's stderr, as JSON lines) must say exactly what they did; the health probes; and
//! frozen backends (SIGSTOP of a PostgreSQL cluster and of a Garage process of this test's own,
//! so no other test is frozen) must give 503 within the bound and recover after SIGCONT.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::auth::cast_with;
use crate::clients::three_layer_image;
use crate::support::clients::{OciLayout, Tools, pseudo_random};
use crate::support::{TestApp, error_code, push_blob, push_image, sha256};

/// Samples of one metric: label set (as written, e.g. `{route="/v2/",method="GET"}`) → value.
fn samples(text: &str, name: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => {
                    let (labels, value) = r.split_once("} ")?;
                    (labels.to_string(), value)
                }
                None => (String::new(), rest.strip_prefix(' ')?),
            };
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

/// The value of `name` whose labels contain every one of `labels` (`key="value"`), summed.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    samples(text, name)
        .iter()
        .filter(|(l, _)| {
            labels
                .iter()
                .all(|want| l.split(',').any(|have| have == *want))
        })
        .map(|(_, v)| v)
        .sum()
}

fn scrape(app: &TestApp) -> String {
    let resp = app
        .client()
        .get(app.url("/metrics"))
        .send()
        .expect("GET /metrics");
    assert_eq!(resp.status().as_u16(), 200);
    let ct = resp.headers()["content-type"]
        .to_str()
        .unwrap_or("")
        .to_string();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    resp.text().expect("metrics text")
}

/// The access log lines (JSON, target `berth::access`) in `file`, once their number has
/// stopped changing.
fn access_lines(file: &Path) -> Vec<Value> {
    let read = || -> Vec<Value> {
        std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "berth::access")
            .collect()
    };
    let mut last = read();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = read();
        if now.len() == last.len() {
            return now;
        }
        last = now;
    }
}

fn field<'a>(line: &'a Value, key: &str) -> &'a Value {
    &line["fields"][key]
}

fn logged_app(dir: &Path, args: &[&str]) -> (TestApp, PathBuf) {
    let log = dir.join("berth.log");
    let mut builder = TestApp::builder()
        .env("RUST_LOG", "info")
        .arg("--log-format")
        .arg("json")
        .stderr_to(&log);
    for a in args {
        builder = builder.arg(*a);
    }
    (builder.start(), log)
}

#[test]
fn skopeo_push_and_pull_show_in_metrics_and_the_access_log() {
    let tools = Tools::new();
    let (app, log) = logged_app(&tools.dir, &[]);
    let src = three_layer_image(&tools);
    let mdigest = src.manifest_digest("v1");
    let manifest = src.blob(&mdigest);
    let blobs: Vec<String> = src.closure(&mdigest)[1..].to_vec();
    let blob_bytes: u64 = blobs.iter().map(|d| src.blob(d).len() as u64).sum();

    let dest = format!("docker://{}/obs/app:v1", app.host);
    tools.skopeo(&[
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &src.reference("v1"),
        &dest,
    ]);
    let out = OciLayout::new(tools.path("pulled"));
    tools.skopeo(&[
        "copy",
        "--preserve-digests",
        "--src-tls-verify=false",
        &dest,
        &out.reference("back"),
    ]);
    assert_eq!(out.manifest_digest("back"), mdigest);

    // A few requests of our own, with known answers.
    let client = app.client();
    let r = client
        .get(app.url("/v2/obs/app/manifests/nope"))
        .header("x-request-id", "test-req-1")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .send()
        .expect("GET");
    assert_eq!(r.status().as_u16(), 404);
    assert_eq!(r.headers()["x-request-id"], "test-req-1");
    let r = client.get(app.url("/v2/")).send().expect("GET /v2/");
    assert_eq!(r.status().as_u16(), 200);
    let generated = r.headers()["x-request-id"]
        .to_str()
        .expect("id")
        .to_string();
    assert!(!generated.is_empty());
    // A monolithic upload whose bytes do not match its digest: an integrity error.
    let wrong = sha256(b"something else");
    let r = client
        .post(app.url(&format!("/v2/obs/app/blobs/uploads/?digest={wrong}")))
        .body(b"these bytes".to_vec())
        .send()
        .expect("POST");
    assert_eq!(r.status().as_u16(), 400);

    let lines = access_lines(&log);
    let text = scrape(&app);

    // One access log line per request, each counted once in the metrics.
    let counted = metric(&text, "berth_http_requests_total", &[]);
    assert_eq!(counted as usize, lines.len(), "{text}");
    for line in &lines {
        let status = field(line, "status").as_u64().expect("status");
        let class = format!("status=\"{}xx\"", status / 100);
        let route = format!(
            "route=\"{}\"",
            field(line, "route").as_str().expect("route")
        );
        let method = format!(
            "method=\"{}\"",
            field(line, "method").as_str().expect("method")
        );
        assert!(
            metric(
                &text,
                "berth_http_requests_total",
                &[&route, &method, &class]
            ) >= 1.0,
            "no series for {line}"
        );
        assert!(field(line, "request_id").is_string(), "{line}");
        assert_eq!(field(line, "completed"), true, "{line}");
    }
    let by_id = |id: &str| {
        lines
            .iter()
            .find(|l| field(l, "request_id") == id)
            .unwrap_or_else(|| panic!("no access log line for {id}"))
    };
    let nope = by_id("test-req-1");
    assert_eq!(field(nope, "status"), 404);
    assert_eq!(field(nope, "error"), "MANIFEST_UNKNOWN");
    assert_eq!(field(nope, "path"), "/v2/obs/app/manifests/nope");
    assert_eq!(field(nope, "route"), "/v2/{name}/manifests/{reference}");
    assert_eq!(field(nope, "repository"), "obs/app");
    assert_eq!(field(nope, "trace_id"), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(field(by_id(&generated), "status"), 200);

    // Pushes and pulls: one manifest PUT, and as many successful manifest GETs as were logged.
    let manifest_route = "/v2/{name}/manifests/{reference}";
    let logged = |method: &str, route: &str, ok: bool| -> Vec<&Value> {
        lines
            .iter()
            .filter(|l| field(l, "method") == method && field(l, "route") == route)
            .filter(|l| (field(l, "status").as_u64().unwrap_or(0) < 300) == ok)
            .collect()
    };
    let pulls = logged("GET", manifest_route, true);
    assert!(!pulls.is_empty());
    assert_eq!(
        metric(&text, "berth_pushes_total", &["result=\"success\""]),
        logged("PUT", manifest_route, true).len() as f64
    );
    assert_eq!(
        metric(&text, "berth_pushes_total", &["result=\"error\""]),
        0.0
    );
    assert_eq!(
        metric(&text, "berth_pulls_total", &["result=\"success\""]),
        pulls.len() as f64
    );
    assert_eq!(
        metric(
            &text,
            "berth_pulls_total",
            &["result=\"error\"", "code=\"MANIFEST_UNKNOWN\""]
        ),
        1.0
    );

    // Bytes: every blob went up once and came down once; the manifest went up once.
    let route = |r: &str| format!("route=\"{r}\"");
    let uploaded = metric(
        &text,
        "berth_http_request_body_bytes_total",
        &[&route("/v2/{name}/blobs/uploads/")],
    ) + metric(
        &text,
        "berth_http_request_body_bytes_total",
        &[&route("/v2/{name}/blobs/uploads/{id}")],
    );
    // ... plus the 11 bytes of the refused upload.
    assert_eq!(uploaded as u64, blob_bytes + 11, "{text}");
    let manifests_up = metric(
        &text,
        "berth_http_request_body_bytes_total",
        &[&route(manifest_route)],
    );
    assert_eq!(manifests_up as usize, manifest.len());
    let blobs_down = metric(
        &text,
        "berth_http_response_body_bytes_total",
        &[&route("/v2/{name}/blobs/{digest}")],
    );
    assert_eq!(blobs_down as u64, blob_bytes, "{text}");
    let logged_out: u64 = lines
        .iter()
        .filter(|l| field(l, "route") == "/v2/{name}/blobs/{digest}")
        .map(|l| field(l, "bytes_out").as_u64().unwrap_or(0))
        .sum();
    assert_eq!(logged_out, blob_bytes);

    // The image's size as pushed: the manifest and what it declares.
    let declared: u64 = src.json(&mdigest)["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .chain([&src.json(&mdigest)["config"]])
        .map(|d| d["size"].as_u64().expect("size"))
        .sum();
    assert_eq!(
        metric(&text, "berth_pushed_image_bytes_sum", &[]) as u64,
        manifest.len() as u64 + declared
    );
    assert_eq!(
        metric(&text, "berth_integrity_errors_total", &["object=\"blob\""]),
        1.0
    );
    assert!(
        metric(
            &text,
            "berth_backend_duration_seconds_count",
            &["backend=\"metadata\""]
        ) > 0.0
    );
    assert!(
        metric(
            &text,
            "berth_backend_duration_seconds_count",
            &["operation=\"read\"", "backend=\"storage\""]
        ) > 0.0
    );
    assert!(metric(&text, "berth_storage_used_bytes", &[]) as u64 >= blob_bytes);
    assert!(metric(&text, "berth_data_dir_free_bytes", &[]) > 0.0);
    // Bounded cardinality: no repository name or digest anywhere in the metrics.
    assert!(!text.contains("obs/app"), "{text}");
    assert!(!text.contains("sha256:"), "{text}");
}

#[test]
fn access_log_and_metrics_can_be_switched_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (app, log) = logged_app(dir.path(), &["--access-log", "false", "--metrics", "false"]);
    push_image(&app, "quiet/app", "v1", "quiet");
    let r = app.client().get(app.url("/metrics")).send().expect("GET");
    assert_eq!(r.status().as_u16(), 404);
    // The request id is still returned.
    assert!(r.headers().contains_key("x-request-id"));
    assert!(access_lines(&log).is_empty());
}

#[test]
fn health_probes_and_metrics_answer_without_credentials_when_auth_is_on() {
    let cast = cast_with(TestApp::builder());
    let app = &cast.app;
    let client = app.client();
    let get = |path: &str| client.get(app.url(path)).send().expect("GET");
    assert_eq!(get("/v2/").status().as_u16(), 401);
    let r = get("/healthz");
    assert_eq!(r.status().as_u16(), 200);
    let r = get("/readyz");
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = serde_json::from_str(&r.text().expect("body")).expect("json");
    assert_eq!(body["status"], "ready");
    assert_eq!(body["metadata"], "ok");
    assert_eq!(body["storage"], "ok");
    assert_eq!(
        client
            .post(app.url("/readyz"))
            .send()
            .expect("POST")
            .status()
            .as_u16(),
        405
    );
    let r = get("/metrics");
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().expect("text");
    assert_eq!(
        metric(
            &text,
            "berth_auth_failures_total",
            &["reason=\"missing_credentials\""]
        ),
        1.0,
        "{text}"
    );
    let r = client
        .get(app.url("/v2/"))
        .basic_auth("alice", Some("wrong"))
        .send()
        .expect("GET");
    assert_eq!(r.status().as_u16(), 401);
    let text = get("/metrics").text().expect("text");
    assert_eq!(
        metric(
            &text,
            "berth_auth_failures_total",
            &["reason=\"bad_credentials\""]
        ),
        1.0,
        "{text}"
    );
}

#[test]
fn metrics_can_require_credentials_on_the_main_listener_but_not_on_their_own() {
    let cast = cast_with(
        TestApp::builder()
            .arg("--metrics-require-auth")
            .arg("true")
            .arg("--metrics-listen")
            .arg("127.0.0.1:0"),
    );
    let app = &cast.app;
    let client = app.client();
    let r = client.get(app.url("/metrics")).send().expect("GET");
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(error_code(&r.text().expect("body")), "UNAUTHORIZED");
    let r = client
        .get(app.url("/metrics"))
        .basic_auth("carol", Some("carol-pw"))
        .send()
        .expect("GET");
    assert_eq!(r.status().as_u16(), 200);
    // Probes stay open on the main listener.
    assert_eq!(
        client
            .get(app.url("/readyz"))
            .send()
            .expect("GET")
            .status()
            .as_u16(),
        200
    );

    let ops = app.metrics_base.clone().expect("metrics listener");
    let r = client.get(format!("{ops}/metrics")).send().expect("GET");
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        r.text()
            .expect("text")
            .contains("berth_http_requests_total")
    );
    for path in ["/healthz", "/readyz"] {
        let r = client.get(format!("{ops}{path}")).send().expect("GET");
        assert_eq!(r.status().as_u16(), 200, "{path}");
    }
    // Nothing else is served there, whatever the credentials.
    let r = client
        .get(format!("{ops}/v2/"))
        .basic_auth("admin", Some("admin-pw"))
        .send()
        .expect("GET");
    assert_eq!(r.status().as_u16(), 404);
}

// -------------------------------------------------------------------------------------------
// Frozen backends. Each test freezes a server of its own (a second PostgreSQL cluster, a
// second Garage), started by the same scripts on other ports, so tests running in parallel
// against the shared ones are never frozen.
// -------------------------------------------------------------------------------------------

/// What a frozen backend may cost a request with the default budgets.
const BOUND: Duration = Duration::from_secs(10);

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts")
        .join(name)
}

/// Runs a setup script with `envs`; returns the `export K=V` lines it printed.
fn run_script(name: &str, envs: &[(&str, &str)]) -> HashMap<String, String> {
    let mut cmd = Command::new("bash");
    cmd.arg(script(name));
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(
        out.status.success(),
        "{name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Processes stopped with SIGSTOP, continued when this is dropped (also when a test fails).
struct Frozen(Vec<u32>);

impl Frozen {
    fn stop(pids: Vec<u32>) -> Frozen {
        assert!(!pids.is_empty(), "nothing to freeze");
        signal("-STOP", &pids);
        Frozen(pids)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal("-CONT", &self.0);
    }
}

fn signal(sig: &str, pids: &[u32]) {
    let status = Command::new("kill")
        .arg(sig)
        .args(pids.iter().map(u32::to_string))
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {sig} {pids:?}");
}

/// `pid` and every process under it.
fn process_tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let out = Command::new("pgrep")
            .arg("-P")
            .arg(all[i].to_string())
            .output()
            .expect("run pgrep");
        all.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.trim().parse::<u32>().ok()),
        );
        i += 1;
    }
    all
}

/// (status, spec error code or "", time taken) of a request.
fn timed(req: reqwest::blocking::RequestBuilder) -> (u16, String, Duration) {
    let started = Instant::now();
    let resp = req.send().expect("request");
    let status = resp.status().as_u16();
    let body = resp.text().unwrap_or_default();
    let code = if status >= 400 && body.starts_with('{') && body.contains("errors") {
        error_code(&body)
    } else {
        String::new()
    };
    (status, code, started.elapsed())
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// With one backend frozen: a blob GET and the first request of a push get 503 UNAVAILABLE
/// within [`BOUND`], and `/readyz` says which backend failed; after `thaw`, all three work
/// again without a restart.
fn frozen_backend_gives_503_then_recovers(
    app: &TestApp,
    repo: &str,
    failing: &str,
    freeze: impl FnOnce() -> Frozen,
) {
    let client = app.client();
    push_image(app, repo, "v1", repo);
    let layer = push_blob(app, repo, b"bytes to fetch while frozen");
    let blob_url = app.url(&format!("/v2/{repo}/blobs/{layer}"));
    let upload_url = app.url(&format!("/v2/{repo}/blobs/uploads/"));

    let frozen = freeze();
    let (status, code, took) = timed(client.get(&blob_url));
    assert_eq!((status, code.as_str()), (503, "UNAVAILABLE"), "blob GET");
    assert!(took < BOUND, "blob GET took {took:?}");
    let (status, code, took) = timed(client.post(&upload_url));
    assert_eq!((status, code.as_str()), (503, "UNAVAILABLE"), "push");
    assert!(took < BOUND, "push took {took:?}");
    let started = Instant::now();
    let r = client.get(app.url("/readyz")).send().expect("readyz");
    assert!(
        started.elapsed() < BOUND,
        "readyz took {:?}",
        started.elapsed()
    );
    assert_eq!(r.status().as_u16(), 503);
    let body: Value = serde_json::from_str(&r.text().expect("body")).expect("readyz json");
    assert_eq!(body["status"], "not ready");
    assert_ne!(body[failing], "ok", "{body}");
    drop(frozen);

    // Recovery, without a restart.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = client.get(app.url("/readyz")).send().expect("readyz");
        if ready.status().as_u16() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "still not ready after thawing");
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = client.get(&blob_url).send().expect("GET");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.bytes().expect("body").as_ref(),
        b"bytes to fetch while frozen"
    );
    push_image(app, repo, "v2", "after the thaw");

    let text = scrape(app);
    let backend = format!("backend=\"{failing}\"");
    assert!(
        metric(&text, "berth_backend_errors_total", &[&backend]) >= 1.0,
        "{text}"
    );
}

#[test]
fn a_frozen_postgres_gives_503_within_the_bound_and_recovers() {
    let dir = "/tmp/berth-pg-frozen";
    let exports = run_script(
        "postgres.sh",
        &[("BERTH_PG_DIR", dir), ("BERTH_PG_PORT", "54341")],
    );
    let server = exports
        .get("BERTH_TEST_POSTGRES_URL")
        .expect("postgres.sh printed no URL")
        .clone();
    // A database of this run's own: the cluster outlives runs (and builds of other schemas).
    let db = format!("frozen_{}", uuid::Uuid::new_v4().simple());
    crate::postgres::admin_sql_at(&server, &format!("CREATE DATABASE {db}"));
    let url = crate::postgres::with_database(&server, &db);
    let app = TestApp::builder().arg("--metadata").arg(&url).start();
    let postmaster = std::fs::read_to_string(Path::new(dir).join("postmaster.pid"))
        .expect("postmaster.pid")
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<u32>().ok())
        .expect("postmaster pid");
    frozen_backend_gives_503_then_recovers(&app, &unique("frozen/pg"), "metadata", || {
        Frozen::stop(process_tree(postmaster))
    });
}

/// A Garage of this test's own; fails (does not skip) when garage is not installed.
fn dedicated_garage() -> (HashMap<String, String>, PathBuf) {
    let dir = PathBuf::from("/tmp/berth-garage-frozen");
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo")
        });
    let installed = home.join("bin/garage").exists()
        || Command::new("sh")
            .args(["-c", "command -v garage"])
            .output()
            .is_ok_and(|o| o.status.success());
    assert!(
        installed,
        "garage is not installed: run `bash scripts/garage.sh` once (it builds garage), then \
         run this test again"
    );
    let exports = run_script(
        "garage.sh",
        &[
            ("BERTH_GARAGE_DIR", dir.to_str().expect("utf-8")),
            ("BERTH_GARAGE_S3_PORT", "3920"),
            ("BERTH_GARAGE_RPC_PORT", "3921"),
        ],
    );
    (exports, dir)
}

fn garage_app(exports: &HashMap<String, String>, name: &str) -> TestApp {
    let mut builder = TestApp::builder().arg("--storage").arg(format!(
        "s3://{}/it/{}",
        exports["BERTH_TEST_S3_BUCKET"],
        unique(name)
    ));
    builder = builder.env("BERTH_S3_ENDPOINT", &exports["BERTH_TEST_S3_ENDPOINT"]);
    for key in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"] {
        builder = builder.env(key, &exports[key]);
    }
    builder.start()
}

#[test]
fn a_frozen_object_store_gives_503_within_the_bound_and_recovers() {
    let (exports, dir) = dedicated_garage();
    let app = garage_app(&exports, "frozen");
    let pid = garage_pid(&dir);
    frozen_backend_gives_503_then_recovers(&app, &unique("frozen/s3"), "storage", || {
        Frozen::stop(vec![pid])
    });
}

fn garage_pid(dir: &Path) -> u32 {
    std::fs::read_to_string(dir.join("garage.pid"))
        .expect("garage.pid")
        .trim()
        .parse::<u32>()
        .expect("garage pid")
}

/// A store that freezes while a PATCH streams into it: each write to the store has the
/// operation budget, so the push gets 503 within the bound instead of waiting for the S3
/// client's stall timeout (60 s). Raw HTTP/1.1, because the server answers before it has read
/// the body, and an HTTP client library reports its failed body write instead of the answer.
#[test]
fn a_store_frozen_during_a_streaming_patch_gives_503_within_the_bound() {
    use std::io::Write;
    let (exports, dir) = dedicated_garage();
    let app = garage_app(&exports, "frozen-patch");
    let r = app
        .client()
        .post(app.url("/v2/frozen/patch/blobs/uploads/"))
        .send()
        .expect("POST");
    assert_eq!(r.status().as_u16(), 202);
    let location = r.headers()["location"]
        .to_str()
        .expect("location")
        .to_string();
    let address = app
        .url("")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let mut stream = std::net::TcpStream::connect(&address).expect("connect");
    write!(
        stream,
        "PATCH {location} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/octet-stream\r\n\
         Transfer-Encoding: chunked\r\n\r\n"
    )
    .expect("send the head");
    let mut sender = stream.try_clone().expect("clone the stream");
    let data = pseudo_random(12, 24 * 1024 * 1024);
    let send = |sender: &mut std::net::TcpStream, chunk: &[u8]| {
        write!(sender, "{:x}\r\n", chunk.len())?;
        sender.write_all(chunk)?;
        sender.write_all(b"\r\n")
    };
    // The first MiB reaches the server (its writer is open) before the store freezes.
    send(&mut sender, &data[..1024 * 1024]).expect("send the first MiB");
    std::thread::sleep(Duration::from_secs(1));
    let frozen = Frozen::stop(vec![garage_pid(&dir)]);
    let froze_at = Instant::now();
    let feeder = std::thread::spawn(move || {
        // Until the server stops reading and closes: then a write fails.
        for chunk in data[1024 * 1024..].chunks(256 * 1024) {
            if send(&mut sender, chunk).is_err() {
                return;
            }
        }
        let _ = sender.write_all(b"0\r\n\r\n");
    });
    stream
        .set_read_timeout(Some(BOUND * 3))
        .expect("read timeout");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // The answer's head and its (small) JSON body; the server closes the connection after it,
    // as the request's body was not read to its end.
    while let Ok(n @ 1..) = stream.read(&mut buf) {
        answer.extend_from_slice(&buf[..n]);
        if answer.ends_with(b"}") || answer.ends_with(b"}\n") || answer.ends_with(b"0\r\n\r\n") {
            break;
        }
    }
    let took = froze_at.elapsed();
    drop(frozen);
    let _ = feeder.join();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("UNAVAILABLE"), "{answer}");
    assert!(took < BOUND, "the PATCH took {took:?} after the freeze");
}

/// The budgets bound waiting, never transferring: a blob read slowly for longer than the
/// first-byte and operation budgets together arrives whole.
#[test]
fn a_long_transfer_from_the_object_store_is_not_cut_off() {
    let (exports, _) = dedicated_garage();
    let app = garage_app(&exports, "slow");
    let data = pseudo_random(11, 6 * 1024 * 1024);
    let digest = push_blob(&app, "slow/read", &data);
    let mut resp = app
        .client()
        .get(app.url(&format!("/v2/slow/read/blobs/{digest}")))
        .send()
        .expect("GET");
    assert_eq!(resp.status().as_u16(), 200);
    let started = Instant::now();
    let mut got = Vec::with_capacity(data.len());
    let mut buf = vec![0u8; 256 * 1024];
    // 6 MiB at 256 KiB every 0.6 s: about 14 s, past 4 + 8.
    loop {
        let n = resp.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        std::thread::sleep(Duration::from_millis(600 * n as u64 / buf.len() as u64));
    }
    assert!(
        started.elapsed() > Duration::from_secs(12),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(got.len(), data.len());
    assert!(got == data, "the bytes differ");
}

/// The request id a client sends names its request in the event log too.
#[test]
fn the_request_id_reaches_the_event_log() {
    let app = TestApp::start();
    let (_, manifest) = push_image(&app, "ids/app", "v1", "ids");
    let r = app
        .client()
        .put(app.url("/v2/ids/app/manifests/v2"))
        .header("content-type", crate::support::OCI_MANIFEST)
        .header("x-request-id", "push-req-42")
        .body(manifest)
        .send()
        .expect("PUT");
    assert_eq!(r.status().as_u16(), 201);
    assert_eq!(r.headers()["x-request-id"], "push-req-42");
    let events = crate::auth::admin(
        app.data_dir(),
        &["audit", "export", "--since", "2000-01-01"],
        "",
    );
    let tagged: Vec<Value> = events
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("a JSON line"))
        .filter(|e| e["request_id"] == "push-req-42")
        .collect();
    assert_eq!(tagged.len(), 1, "{events}");
    assert_eq!(tagged[0]["repository"], "ids/app");
}
