//! Webhooks end to end: a receiver in the test (a plain HTTP server on 127.0.0.1:0 that checks
//! every signature with its own HMAC-SHA256) gets real pushes and deletes as signed CloudEvents;
//! filters; parking after `webhook_max_attempts` and replay through the API; `kill -9` during a
//! burst while the receiver is down loses nothing; two nodes on PostgreSQL deliver each event
//! once.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::auth::cast;
use crate::multinode::Database;
use crate::support::{TestApp, TestAppBuilder, push_image, send};

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Got {
    path: String,
    content_type: String,
    id: String,
    timestamp: i64,
    signature: String,
    body: Vec<u8>,
    /// What the receiver answered.
    status: u16,
    at: Instant,
}

impl Got {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    fn seq(&self) -> i64 {
        self.json()["data"]["seq"].as_i64().expect("data.seq")
    }

    fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// A webhook receiver: answers `status` (settable) and records every request.
struct Receiver {
    addr: SocketAddr,
    status: Arc<AtomicU16>,
    got: Arc<Mutex<Vec<Got>>>,
    stop: Arc<AtomicBool>,
}

impl Receiver {
    fn start(status: u16) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the receiver");
        let addr = listener.local_addr().expect("its address");
        let receiver = Receiver {
            addr,
            status: Arc::new(AtomicU16::new(status)),
            got: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (status, got, stop) = (
            receiver.status.clone(),
            receiver.got.clone(),
            receiver.stop.clone(),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let (status, got) = (status.clone(), got.clone());
                std::thread::spawn(move || serve(stream, &status, &got));
            }
        });
        receiver
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn answer(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().expect("lock").clone()
    }

    /// Successful deliveries to `path`.
    fn delivered(&self, path: &str) -> Vec<Got> {
        self.got()
            .into_iter()
            .filter(|g| g.path == path && g.ok())
            .collect()
    }

    fn wait_for(&self, what: &str, timeout: Duration, done: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.got();
            if done(&got) {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {timeout:?}; the receiver got {:#?}",
                got.iter()
                    .map(|g| (g.path.clone(), g.status, String::from_utf8_lossy(&g.body)))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

/// Reads one request (Content-Length body), records it, answers and closes.
fn serve(stream: TcpStream, status: &AtomicU16, got: &Mutex<Vec<Got>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() || line.is_empty() {
        return;
    }
    let path = line.split(' ').nth(1).unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() {
            return;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let len: usize = header("content-length").parse().unwrap_or(0);
    let mut body = vec![0; len];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let answer = status.load(Ordering::SeqCst);
    let silent = answer == 0;
    got.lock().expect("lock").push(Got {
        path,
        content_type: header("content-type"),
        id: header("webhook-id"),
        timestamp: header("webhook-timestamp").parse().unwrap_or(0),
        signature: header("webhook-signature"),
        body,
        status: answer,
        at: Instant::now(),
    });
    if silent {
        std::thread::sleep(Duration::from_secs(120));
        return;
    }
    let _ = (&stream).write_all(
        format!("HTTP/1.1 {answer} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").as_bytes(),
    );
}

/// HMAC-SHA256 (RFC 2104), written here so the test does not share the server's code.
fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let mut inner = Sha256::new();
    inner.update(pad(0x36));
    inner.update(message);
    let mut outer = Sha256::new();
    outer.update(pad(0x5c));
    outer.update(inner.finalize());
    outer.finalize().to_vec()
}

/// Whether the Standard Webhooks signature of `got` is valid for `secret`.
fn signed_by(got: &Got, secret: &str) -> bool {
    let key = BASE64
        .decode(secret.strip_prefix("whsec_").expect("whsec_"))
        .expect("base64");
    let mut message = format!("{}.{}.", got.id, got.timestamp).into_bytes();
    message.extend_from_slice(&got.body);
    let expected = format!("v1,{}", BASE64.encode(hmac_sha256(&key, &message)));
    got.signature.split(' ').any(|s| s == expected)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

const SECRET: &str = "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

/// A config file with `[[webhooks]]` tables (name, url path on the receiver) in `dir`.
fn config_file(dir: &Path, receiver: &Receiver, hooks: &[(&str, &str)]) -> String {
    let mut toml = String::new();
    for (name, path) in hooks {
        toml.push_str(&format!(
            "[[webhooks]]\nname = \"{name}\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n\n",
            receiver.url(path)
        ));
    }
    let file = dir.join("berth.toml");
    std::fs::write(&file, toml).expect("write the config");
    file.display().to_string()
}

/// Fast retries and short timeouts, so failures show within a test's patience.
fn quick(builder: TestAppBuilder) -> TestAppBuilder {
    builder
        .arg("--webhook-backoff-max-secs")
        .arg("1")
        .arg("--webhook-timeout-secs")
        .arg("2")
        .arg("--webhook-poll-interval-ms")
        .arg("50")
}

fn api(app: &TestApp, method: &str, path: &str, body: Option<Value>) -> crate::support::Reply {
    let client = app.client();
    let url = app.url(path);
    let req = match method {
        "GET" => client.get(url),
        "POST" => client.post(url),
        "DELETE" => client.delete(url),
        other => panic!("{other}"),
    };
    send(match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(b.to_string()),
        None => req,
    })
}

fn delivery_state(app: &TestApp, id: &str) -> Value {
    let reply = api(app, "GET", &format!("/api/v1/webhooks/{id}"), None);
    reply.assert_status(200);
    reply.json()["delivery"].clone()
}

#[test]
fn pushes_and_deletes_arrive_as_signed_cloudevents() {
    let receiver = Receiver::start(204);
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = config_file(tmp.path(), &receiver, &[("all", "/all")]);
    // Polling every 5 s: events committed by this process wake the worker at once.
    let mut app = TestApp::builder()
        .arg("--config")
        .arg(&config)
        .arg("--webhook-poll-interval-ms")
        .arg("5000")
        .start();

    let pushed_at = Instant::now();
    let (digest, manifest) = push_image(&app, "team/app", "v1", "one");
    let got = receiver.wait_for("the push", Duration::from_secs(10), |g| g.len() == 1);
    let latency = got[0].at.saturating_duration_since(pushed_at);
    eprintln!("push started to webhook received: {latency:?}");
    assert!(
        latency < Duration::from_secs(2),
        "the worker was not woken by the commit: {latency:?}"
    );
    send(app.client().delete(app.url("/v2/team/app/manifests/v1"))).assert_status(202);
    let got = receiver.wait_for("the tag delete", Duration::from_secs(10), |g| g.len() == 2);

    for g in &got {
        assert_eq!(g.path, "/all");
        assert_eq!(g.content_type, "application/cloudevents+json");
        assert!(signed_by(g, SECRET), "signature of {g:?}");
        assert!(!signed_by(g, "whsec_YW5vdGhlciBrZXkgb2YgMjQgYnl0ZXMgISE="));
        assert!(
            (g.timestamp - unix_now()).abs() < 60,
            "timestamp {}",
            g.timestamp
        );
        let ce = g.json();
        assert_eq!(ce["id"], g.id.as_str(), "webhook-id is the event's id");
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["subject"], "team/app");
        assert_eq!(ce["data"]["repository"], "team/app");
        assert!(ce["source"].as_str().is_some_and(|s| !s.is_empty()));
        assert!(ce["time"].as_str().is_some_and(|t| t.ends_with('Z')));
        assert!(ce["data"]["actor"].as_str().is_some());
    }
    let push = got[0].json();
    assert_eq!(push["type"], "io.berth.push");
    assert_eq!(push["data"]["digest"], digest.as_str());
    assert_eq!(push["data"]["tag"], "v1");
    assert_eq!(push["data"]["size"], manifest.len());
    assert_eq!(
        push["data"]["media_type"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let delete = got[1].json();
    assert_eq!(delete["type"], "io.berth.tag.delete");
    assert_eq!(delete["data"]["tag"], "v1");
    assert_ne!(push["id"], delete["id"]);

    // The state through the API; a webhook of the config file is changed there, not here.
    let state = delivery_state(&app, "config-all");
    assert_eq!(state["delivered"], 2, "{state}");
    assert_eq!(state["cursor"], state["head"], "{state}");
    assert_eq!(state["pending"], 0, "{state}");
    assert!(state["last_latency_ms"].as_i64().is_some(), "{state}");
    // And /metrics says the same: two delivered, none pending, the log's head.
    // (The pending gauge is set at the task's next look, moments after the last delivery.)
    let pending = "berth_webhook_pending_events{subscription=\"config-all\"} 0";
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let metrics = loop {
        let text = send(app.client().get(app.url("/metrics"))).text();
        if text.lines().any(|l| l == pending) || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let value = |series: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {series} in {metrics}"))
    };
    assert_eq!(
        value("berth_webhook_attempts_total{outcome=\"delivered\"}"),
        2.0
    );
    assert_eq!(
        value("berth_webhook_pending_events{subscription=\"config-all\"}"),
        0.0
    );
    assert_eq!(value("berth_webhook_delivery_seconds_count"), 2.0);
    assert_eq!(
        value("berth_event_log_head"),
        state["head"].as_f64().expect("head")
    );
    eprintln!(
        "delivery latency (berth's measure): {} ms",
        state["last_latency_ms"]
    );
    api(&app, "DELETE", "/api/v1/webhooks/config-all", None).assert_status(409);

    // The config file changes: at the next start its webhooks are what the file says, and a
    // new one starts at the log's head (nothing old is sent to it).
    config_file(tmp.path(), &receiver, &[("renamed", "/renamed")]);
    app.restart();
    let list = api(&app, "GET", "/api/v1/webhooks", None);
    list.assert_status(200);
    let ids: Vec<String> = list
        .json()
        .as_array()
        .expect("a list")
        .iter()
        .map(|w| w["id"].as_str().expect("an id").to_string())
        .collect();
    assert_eq!(ids, ["config-renamed"]);
    let state = delivery_state(&app, "config-renamed");
    assert_eq!(state["cursor"], 2, "{state}");
    push_image(&app, "team/app", "v2", "two");
    receiver.wait_for("the push after the restart", Duration::from_secs(10), |g| {
        g.len() == 3 && g[2].path == "/renamed"
    });
}

#[test]
fn subscriptions_filter_by_kind_repository_pattern_and_namespace() {
    let receiver = Receiver::start(204);
    let app = quick(TestApp::builder()).start();
    let create = |body: Value| {
        let reply = api(&app, "POST", "/api/v1/webhooks", Some(body));
        reply.assert_status(201);
        reply.json()
    };
    let pushes_to_prod = create(json!({
        "url": receiver.url("/prod-pushes"),
        "events": ["io.berth.push"],
        "repositories": ["prod/*"],
    }));
    let dev = create(json!({ "url": receiver.url("/dev"), "namespace": "dev" }));
    let tag_deletes = create(json!({
        "url": receiver.url("/tag-deletes"),
        "events": ["tag.deleted"],
        "secret": SECRET,
    }));
    assert_eq!(tag_deletes["secret"], SECRET);
    let generated = pushes_to_prod["secret"]
        .as_str()
        .expect("a generated secret");
    assert!(generated.starts_with("whsec_"));
    // Mistakes are refused, by name.
    let bad = api(
        &app,
        "POST",
        "/api/v1/webhooks",
        Some(json!({ "url": receiver.url("/x"), "events": ["manifest.pulled"] })),
    );
    bad.assert_status(400);
    assert!(bad.text().contains("manifest.pulled"), "{}", bad.text());
    api(
        &app,
        "POST",
        "/api/v1/webhooks",
        Some(json!({ "url": "ftp://example.com/" })),
    )
    .assert_status(400);
    api(
        &app,
        "POST",
        "/api/v1/webhooks",
        Some(json!({ "url": receiver.url("/x"), "secret": "not-whsec" })),
    )
    .assert_status(400);

    push_image(&app, "prod/web", "1", "p");
    push_image(&app, "dev/web", "1", "d");
    push_image(&app, "other/x", "1", "o");
    send(app.client().delete(app.url("/v2/prod/web/manifests/1"))).assert_status(202);

    // Once every subscription's cursor reached the head, nothing more will come.
    let ids =
        [&pushes_to_prod, &dev, &tag_deletes].map(|w| w["id"].as_str().expect("an id").to_string());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ids.iter().all(|id| {
        let s = delivery_state(&app, id);
        s["cursor"] == s["head"] && s["head"] == 4
    }) {
        assert!(Instant::now() < deadline, "cursors never reached the head");
        std::thread::sleep(Duration::from_millis(50));
    }
    let kinds = |path: &str| -> Vec<(String, String)> {
        receiver
            .delivered(path)
            .iter()
            .map(|g| {
                let ce = g.json();
                (
                    ce["type"].as_str().unwrap_or("").to_string(),
                    ce["subject"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    };
    let pair = |t: &str, s: &str| (t.to_string(), s.to_string());
    assert_eq!(kinds("/prod-pushes"), [pair("io.berth.push", "prod/web")]);
    assert_eq!(kinds("/dev"), [pair("io.berth.push", "dev/web")]);
    assert_eq!(
        kinds("/tag-deletes"),
        [pair("io.berth.tag.delete", "prod/web")]
    );
    assert!(signed_by(&receiver.delivered("/prod-pushes")[0], generated));
    assert!(signed_by(&receiver.delivered("/tag-deletes")[0], SECRET));

    // Listing, then deleting one: it receives nothing more.
    let list = api(&app, "GET", "/api/v1/webhooks", None);
    list.assert_status(200);
    assert_eq!(list.json().as_array().map(Vec::len), Some(3));
    api(
        &app,
        "DELETE",
        &format!("/api/v1/webhooks/{}", ids[1]),
        None,
    )
    .assert_status(204);
    api(&app, "GET", &format!("/api/v1/webhooks/{}", ids[1]), None).assert_status(404);
    push_image(&app, "dev/web", "2", "d2");
    push_image(&app, "prod/web", "2", "p2");
    receiver.wait_for("the second prod push", Duration::from_secs(10), |_| {
        receiver.delivered("/prod-pushes").len() == 2
    });
    assert_eq!(receiver.delivered("/dev").len(), 1);
}

#[test]
fn namespace_owners_manage_only_their_namespaces_webhooks() {
    let c = cast();
    let app = &c.app;
    let as_user = |user: &str, method: &str, path: &str, body: Option<Value>| {
        let client = app.client();
        let url = app.url(path);
        let req = match method {
            "GET" => client.get(url),
            "POST" => client.post(url),
            "DELETE" => client.delete(url),
            other => panic!("{other}"),
        }
        .basic_auth(user, Some(format!("{user}-pw")));
        send(match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(b.to_string()),
            None => req,
        })
    };
    let hook = |ns: Option<&str>| match ns {
        Some(ns) => json!({ "url": "http://127.0.0.1:9/", "namespace": ns }),
        None => json!({ "url": "http://127.0.0.1:9/" }),
    };
    let team = as_user(
        "alice",
        "POST",
        "/api/v1/webhooks",
        Some(hook(Some("team"))),
    );
    team.assert_status(201);
    let team_id = team.json()["id"].as_str().expect("an id").to_string();
    as_user("alice", "POST", "/api/v1/webhooks", Some(hook(Some("lib")))).assert_status(403);
    as_user("alice", "POST", "/api/v1/webhooks", Some(hook(None))).assert_status(403);
    as_user("bob", "POST", "/api/v1/webhooks", Some(hook(Some("team")))).assert_status(403);
    let global = as_user("admin", "POST", "/api/v1/webhooks", Some(hook(None)));
    global.assert_status(201);
    let global_id = global.json()["id"].as_str().expect("an id").to_string();

    let listed = |user: &str| -> Vec<String> {
        let reply = as_user(user, "GET", "/api/v1/webhooks", None);
        reply.assert_status(200);
        reply
            .json()
            .as_array()
            .expect("a list")
            .iter()
            .map(|w| w["id"].as_str().expect("an id").to_string())
            .collect()
    };
    assert_eq!(listed("alice"), std::slice::from_ref(&team_id));
    assert_eq!(listed("admin").len(), 2);
    assert!(listed("bob").is_empty());
    // The same refusal whether or not it exists; only an administrator learns it is missing.
    as_user(
        "alice",
        "GET",
        &format!("/api/v1/webhooks/{global_id}"),
        None,
    )
    .assert_status(403);
    as_user("alice", "GET", "/api/v1/webhooks/wh_missing", None).assert_status(403);
    as_user("admin", "GET", "/api/v1/webhooks/wh_missing", None).assert_status(404);
    as_user(
        "bob",
        "POST",
        &format!("/api/v1/webhooks/{team_id}/replay"),
        None,
    )
    .assert_status(403);
    as_user(
        "alice",
        "GET",
        &format!("/api/v1/webhooks/{team_id}/parked"),
        None,
    )
    .assert_status(200);
    as_user(
        "alice",
        "DELETE",
        &format!("/api/v1/webhooks/{team_id}"),
        None,
    )
    .assert_status(204);
    send(app.client().get(app.url("/api/v1/webhooks"))).assert_status(401);
}

#[test]
fn deliveries_park_after_max_attempts_and_replay_through_the_api() {
    let receiver = Receiver::start(500);
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = config_file(tmp.path(), &receiver, &[("flaky", "/flaky")]);
    let app = quick(TestApp::builder())
        .arg("--config")
        .arg(&config)
        .arg("--webhook-max-attempts")
        .arg("3")
        .start();
    push_image(&app, "park/app", "1", "a");
    push_image(&app, "park/app", "2", "b");

    // Three attempts each, then parked; parking does not hold the next event back.
    let deadline = Instant::now() + Duration::from_secs(30);
    let state = loop {
        let s = delivery_state(&app, "config-flaky");
        if s["parked"] == 2 {
            break s;
        }
        assert!(Instant::now() < deadline, "never parked: {s}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(state["cursor"], state["head"], "{state}");
    assert_eq!(state["failed_attempts"], 6, "{state}");
    assert!(
        state["last_error"].as_str().unwrap_or("").contains("500"),
        "{state}"
    );
    let attempts = receiver.got();
    assert_eq!(attempts.len(), 6);
    assert!(attempts.iter().all(|g| signed_by(g, SECRET)));
    // In order: the first event's three attempts before the second's.
    let seqs: Vec<i64> = attempts.iter().map(Got::seq).collect();
    assert_eq!(seqs, [1, 1, 1, 2, 2, 2]);
    let parked = api(&app, "GET", "/api/v1/webhooks/config-flaky/parked", None);
    parked.assert_status(200);
    let parked = parked.json();
    assert_eq!(parked.as_array().map(Vec::len), Some(2), "{parked}");
    assert_eq!(parked[0]["seq"], 1);
    assert_eq!(parked[0]["attempts"], 3);
    assert_eq!(parked[0]["replay_queued"], false);

    // The receiver recovers; a replay delivers both, in order.
    receiver.answer(200);
    let replay = api(&app, "POST", "/api/v1/webhooks/config-flaky/replay", None);
    replay.assert_status(202);
    assert_eq!(replay.json()["queued"], 2);
    let got = receiver.wait_for("the replay", Duration::from_secs(10), |g| {
        g.iter().filter(|g| g.ok()).count() == 2
    });
    let delivered: Vec<i64> = got.iter().filter(|g| g.ok()).map(Got::seq).collect();
    assert_eq!(delivered, [1, 2]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while delivery_state(&app, "config-flaky")["parked"] != 0 {
        assert!(
            Instant::now() < deadline,
            "parked deliveries stayed after replay"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // And delivery goes on with new events.
    push_image(&app, "park/app", "3", "c");
    receiver.wait_for("the next push", Duration::from_secs(10), |g| {
        g.iter().filter(|g| g.ok()).count() == 3
    });
}

/// Pushes one small image with its own client (the pusher runs on a thread while the test
/// kills the server); the manifest digest once acknowledged.
fn push_over(base: &str, repo: &str, tag: &str) -> Result<String, String> {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let config = format!(r#"{{"architecture":"amd64","os":"linux","tag":"{tag}"}}"#).into_bytes();
    let layer = format!("layer {repo}:{tag}").into_bytes();
    let mut digests = Vec::new();
    for blob in [&config, &layer] {
        let digest = crate::support::sha256(blob);
        let resp = client
            .post(format!("{base}/v2/{repo}/blobs/uploads/?digest={digest}"))
            .body(blob.clone())
            .send()
            .map_err(|e| e.to_string())?;
        if resp.status().as_u16() != 201 {
            return Err(format!("blob: {}", resp.status()));
        }
        digests.push((digest, blob.len()));
    }
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": digests[0].0, "size": digests[0].1 },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar",
                     "digest": digests[1].0, "size": digests[1].1 }],
    })
    .to_string()
    .into_bytes();
    let resp = client
        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .map_err(|e| e.to_string())?;
    if resp.status().as_u16() != 201 {
        return Err(format!("manifest: {}", resp.status()));
    }
    Ok(crate::support::sha256(&manifest))
}

/// The seqs of successful deliveries, in the order received, never go back: event n+1 is never
/// delivered before n (a re-sent n after a crash may repeat it, but nothing older).
fn assert_in_order(delivered: &[Got]) {
    let mut highest = 0;
    for g in delivered {
        let seq = g.seq();
        assert!(
            seq >= highest,
            "event {seq} delivered after event {highest}: out of order"
        );
        highest = seq;
    }
}

#[test]
fn kill9_during_a_burst_with_the_receiver_down_loses_no_event() {
    // Up at first, so that the cursor has moved when berth is killed; then down.
    let receiver = Receiver::start(204);
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = config_file(tmp.path(), &receiver, &[("burst", "/burst")]);
    let mut app = quick(TestApp::builder())
        .arg("--config")
        .arg(&config)
        .start();

    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let pusher = {
        let (base, acknowledged) = (app.base.clone(), acknowledged.clone());
        std::thread::spawn(move || {
            for i in 0..200 {
                match push_over(&base, "burst/app", &format!("t{i}")) {
                    Ok(digest) => acknowledged.lock().expect("lock").push(digest),
                    Err(_) => return,
                }
            }
        })
    };
    receiver.wait_for("the first deliveries", Duration::from_secs(30), |g| {
        g.len() >= 3
    });
    receiver.answer(500);
    let delivered_while_up = receiver.delivered("/burst").len();
    let deadline = Instant::now() + Duration::from_secs(30);
    while acknowledged.lock().expect("lock").len() < delivered_while_up + 15 {
        assert!(Instant::now() < deadline, "the burst did not go on");
        std::thread::sleep(Duration::from_millis(5));
    }
    app.kill9();
    pusher.join().expect("the pusher");
    let acknowledged = acknowledged.lock().expect("lock").clone();
    let failed_attempts = receiver.got().iter().filter(|g| !g.ok()).count();
    assert!(
        failed_attempts > 0,
        "the receiver was never tried while down"
    );

    app.restart();
    std::thread::sleep(Duration::from_millis(500));
    receiver.answer(204);
    let started = Instant::now();
    let got = receiver.wait_for(
        "every acknowledged push delivered",
        Duration::from_secs(60),
        |got| {
            let digests: Vec<String> = got
                .iter()
                .filter(|g| g.ok())
                .filter_map(|g| g.json()["data"]["digest"].as_str().map(str::to_string))
                .collect();
            acknowledged.iter().all(|d| digests.contains(d))
        },
    );
    let delivered: Vec<Got> = got.iter().filter(|g| g.ok()).cloned().collect();
    assert!(got.iter().all(|g| signed_by(g, SECRET)), "a bad signature");
    assert_in_order(&delivered);
    // None missing: every event of the log (all pushes: this registry has no other events)
    // up to the last delivered one, each at least once.
    let mut seqs: Vec<i64> = delivered.iter().map(Got::seq).collect();
    let total = seqs.len();
    seqs.dedup();
    let highest = *seqs.last().expect("deliveries");
    assert_eq!(
        seqs,
        (1..=highest).collect::<Vec<_>>(),
        "a gap in the events"
    );
    eprintln!(
        "{} pushes acknowledged before kill -9 ({delivered_while_up} delivered while the \
         receiver was up), {} events committed; {} failed attempts while down; after recovery \
         all delivered in {:?}, {} duplicates",
        acknowledged.len(),
        highest,
        failed_attempts,
        started.elapsed(),
        total - seqs.len()
    );
}

#[test]
fn two_nodes_on_postgres_deliver_each_event_once() {
    let db = Database::create();
    let receiver = Receiver::start(204);
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = config_file(tmp.path(), &receiver, &[("shared", "/shared")]);
    let node = || {
        quick(TestApp::builder())
            .arg("--config")
            .arg(&config)
            .arg("--metadata")
            .arg(&db.url)
            .start()
    };
    let (a, b) = (node(), node());
    let pushes = 20;
    for i in 0..pushes {
        let app = if i % 2 == 0 { &a } else { &b };
        push_image(
            app,
            &format!("two/n{}", i % 2),
            &format!("t{i}"),
            &format!("s{i}"),
        );
    }
    receiver.wait_for("every push", Duration::from_secs(30), |g| {
        g.iter().filter(|g| g.ok()).count() >= pushes
    });
    // Give a second delivery, if one were coming, time to arrive.
    std::thread::sleep(Duration::from_secs(2));
    let got = receiver
        .got()
        .into_iter()
        .filter(Got::ok)
        .collect::<Vec<_>>();
    assert!(got.len() >= pushes);
    let mut ids: Vec<String> = got.iter().map(|g| g.id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        got.len() - ids.len(),
        0,
        "duplicates: {} deliveries of {} events",
        got.len(),
        ids.len()
    );
    assert_eq!(ids.len(), pushes);
    assert_in_order(&got);
    assert!(got.iter().all(|g| signed_by(g, SECRET)));

    // A node dies (perhaps the lease holder): the other goes on, within the lease.
    let mut a = a;
    a.kill9();
    let killed = Instant::now();
    for i in pushes..pushes + 5 {
        push_image(&b, "two/n1", &format!("t{i}"), &format!("s{i}"));
    }
    receiver.wait_for("the pushes after the kill", Duration::from_secs(30), |g| {
        g.iter().filter(|g| g.ok()).count() >= pushes + 5
    });
    eprintln!(
        "after kill -9 of a node, delivery resumed within {:?}",
        killed.elapsed()
    );
    let got: Vec<Got> = receiver.got().into_iter().filter(Got::ok).collect();
    assert_in_order(&got);
    assert_eq!(got.iter().map(Got::seq).max(), Some((pushes + 5) as i64));
}

#[test]
fn shutdown_does_not_wait_for_a_receiver_that_never_answers() {
    // 0: the receiver reads the request and then says nothing.
    let receiver = Receiver::start(0);
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = config_file(tmp.path(), &receiver, &[("silent", "/silent")]);
    let mut app = TestApp::builder()
        .arg("--config")
        .arg(&config)
        .arg("--webhook-timeout-secs")
        .arg("60")
        .arg("--webhook-poll-interval-ms")
        .arg("50")
        .start();
    push_image(&app, "quiet/app", "1", "q");
    receiver.wait_for("the attempt", Duration::from_secs(10), |g| g.len() == 1);
    let asked = Instant::now();
    app.send_sigterm();
    let status = app
        .wait_exit(Duration::from_secs(10))
        .expect("berth exits while a delivery waits for its answer");
    assert!(status.success(), "{status:?}");
    eprintln!("stopped {:?} after SIGTERM", asked.elapsed());
}
