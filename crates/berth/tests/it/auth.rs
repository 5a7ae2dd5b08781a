//! Access control end to end: the secure default, the token endpoint, basic credentials on
//! `/v2`, roles, robots, personal tokens, refresh tokens, refused tokens, key rotation, and real
//! clients logging in with each kind of credential.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::Value;

use crate::support::clients::Tools;
use crate::support::*;

/// Runs `berth ARGS --data-dir DIR` (a management command on the app's metadata), feeding
/// `stdin`; returns stdout, panicking on failure.
pub fn admin(data_dir: &std::path::Path, args: &[&str], stdin: &str) -> String {
    let mut cmd = clean_command(data_dir.parent().unwrap_or(data_dir));
    cmd.args(args).arg("--data-dir").arg(data_dir);
    run_with_stdin(cmd, stdin)
}

/// Runs `berth ARGS --metadata URL` (a management command on a shared database).
pub fn admin_on(metadata: &str, args: &[&str], stdin: &str) -> String {
    let dir = std::env::temp_dir();
    let mut cmd = clean_command(&dir);
    cmd.args(args).arg("--metadata").arg(metadata);
    run_with_stdin(cmd, stdin)
}

pub fn run_with_stdin(mut cmd: Command, stdin: &str) -> String {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn berth");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "berth {:?} failed: {}",
        cmd.get_args().collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An app with access control on and a cast: `admin` (administrator), `alice` (owner of
/// `team`), `bob` (reader of `team`), `carol` (no roles); `lib` is public; robot `team+ci`
/// may pull and push `team/*`.
pub struct Cast {
    pub app: TestApp,
    pub robot_secret: String,
    _tmp: tempfile::TempDir,
}

pub fn cast_with(builder: TestAppBuilder) -> Cast {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    for (user, extra) in [
        ("admin", Some("--admin")),
        ("alice", None),
        ("bob", None),
        ("carol", None),
    ] {
        let mut args = vec!["user", "add", user, "--password-stdin"];
        args.extend(extra);
        admin(&data, &args, &format!("{user}-pw\n"));
    }
    admin(&data, &["namespace", "add", "team", "--owner", "alice"], "");
    admin(&data, &["namespace", "grant", "team", "bob", "reader"], "");
    admin(&data, &["namespace", "add", "lib", "--public"], "");
    let out = admin(
        &data,
        &["robot", "add", "team", "ci", "--grant", "team/*:pull,push"],
        "",
    );
    let robot_secret = out
        .lines()
        .find_map(|l| l.strip_prefix("secret: "))
        .expect("a secret line")
        .to_string();
    let app = builder.data_dir(&data).arg("--auth").arg("token").start();
    Cast {
        app,
        robot_secret,
        _tmp: tmp,
    }
}

pub fn cast() -> Cast {
    cast_with(TestApp::builder())
}

/// A token from the token endpoint (`GET`, basic credentials when given).
pub fn token(app: &TestApp, creds: Option<(&str, &str)>, scopes: &[&str]) -> Value {
    let mut url = app.url("/auth/token?service=berth");
    for s in scopes {
        url.push_str(&format!("&scope={}", pct(s)));
    }
    let mut req = app.client().get(url);
    if let Some((u, p)) = creds {
        req = req.basic_auth(u, Some(p));
    }
    let reply = send(req);
    reply.assert_status(200);
    reply.json()
}

fn bearer(app: &TestApp, path: &str, token: &str) -> Reply {
    send(app.client().get(app.url(path)).bearer_auth(token))
}

fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("json claims")
}

/// Pushes a small image as `user` over basic auth; returns its manifest digest.
pub fn push_as(app: &TestApp, user: &str, password: &str, repo: &str, tag: &str) -> Reply {
    let client = app.client();
    let layer = format!("layer of {repo}:{tag}").into_bytes();
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    for blob in [&layer, &config] {
        let reply = send(
            client
                .post(app.url(&format!(
                    "/v2/{repo}/blobs/uploads/?digest={}",
                    sha256(blob)
                )))
                .basic_auth(user, Some(password))
                .body(blob.clone()),
        );
        if reply.status != 201 {
            return reply;
        }
    }
    let manifest = oci_manifest(
        &descriptor("application/vnd.oci.image.config.v1+json", &config),
        &[descriptor("application/vnd.oci.image.layer.v1.tar", &layer)],
        serde_json::json!({}),
    );
    send(
        client
            .put(app.url(&format!("/v2/{repo}/manifests/{tag}")))
            .basic_auth(user, Some(password))
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(manifest),
    )
}

#[test]
fn a_non_loopback_address_needs_auth_or_an_explicit_opt_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = clean_command(dir.path());
    cmd.args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path().join("d"));
    let out = output_within(cmd, "serve on 0.0.0.0 without auth");
    assert!(!out.status.success(), "it must refuse to start");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("without access control"), "{stderr}");

    let mut app = TestApp::builder()
        .arg("--allow-anonymous")
        .env("RUST_LOG", "warn")
        .start();
    send(app.client().get(app.url("/v2/"))).assert_status(200);
    assert!(app.terminate());
}

#[test]
fn challenges_follow_the_token_spec() {
    let c = cast();
    let reply = send(c.app.client().get(c.app.url("/v2/")));
    assert_error(&reply, 401, "UNAUTHORIZED");
    let challenge = reply.must_header("www-authenticate");
    assert_eq!(
        challenge,
        format!(
            "Bearer realm=\"http://{}/auth/token\",service=\"berth\"",
            c.app.host
        )
    );
    let reply = send(c.app.client().get(c.app.url("/v2/team/app/manifests/1")));
    assert_error(&reply, 401, "UNAUTHORIZED");
    assert!(
        reply
            .must_header("www-authenticate")
            .ends_with(",scope=\"repository:team/app:pull\""),
        "{}",
        reply.describe()
    );
    let reply = send(
        c.app
            .client()
            .post(c.app.url("/v2/team/app/blobs/uploads/")),
    );
    assert!(
        reply
            .must_header("www-authenticate")
            .ends_with(",scope=\"repository:team/app:pull,push\"")
    );
    let reply = send(c.app.client().get(c.app.url("/v2/_catalog")));
    assert!(
        reply
            .must_header("www-authenticate")
            .ends_with(",scope=\"registry:catalog:*\"")
    );
    // A bad bearer token says so.
    let reply = bearer(&c.app, "/v2/", "not.a.token");
    assert_error(&reply, 401, "UNAUTHORIZED");
    assert!(
        reply
            .must_header("www-authenticate")
            .contains("error=\"invalid_token\"")
    );
}

#[test]
fn tokens_grant_what_was_asked_and_allowed() {
    let c = cast();
    let app = &c.app;
    let t = token(
        app,
        Some(("alice", "alice-pw")),
        &[
            "repository:team/app:pull,push repository:other/x:pull",
            "repository:lib/base:pull,push",
            "registry:catalog:*",
            "repository:localhost:5000/team/app:pull",
        ],
    );
    assert_eq!(t["expires_in"], 300);
    assert!(t["issued_at"].as_str().is_some_and(|s| s.ends_with('Z')));
    assert_eq!(t["token"], t["access_token"]);
    let jwt = t["token"].as_str().expect("token");
    let header: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(jwt.split('.').next().expect("header"))
            .expect("b64"),
    )
    .expect("json");
    assert_eq!(header["alg"], "ES256");
    assert!(header["kid"].as_str().is_some_and(|k| !k.is_empty()));
    let alice = claims(jwt);
    assert_eq!(alice["sub"], "alice");
    assert_eq!(alice["aud"], "berth");
    assert_eq!(
        alice["access"],
        serde_json::json!([
            {"type": "repository", "name": "team/app", "actions": ["pull", "push"]},
            {"type": "repository", "name": "lib/base", "actions": ["pull"]},
            {"type": "registry", "name": "catalog", "actions": ["*"]},
        ])
    );

    // The reader gets pull only; nobody gets more than asked.
    let t = token(
        app,
        Some(("bob", "bob-pw")),
        &["repository:team/app:pull,push,delete"],
    );
    assert_eq!(
        claims(t["token"].as_str().expect("token"))["access"],
        serde_json::json!([{"type": "repository", "name": "team/app", "actions": ["pull"]}])
    );
    // Anonymous: public pulls only.
    let t = token(
        app,
        None,
        &["repository:lib/base:pull", "repository:team/app:pull"],
    );
    let anon = claims(t["token"].as_str().expect("token"));
    assert_eq!(anon["sub"], "");
    assert_eq!(
        anon["access"],
        serde_json::json!([{"type": "repository", "name": "lib/base", "actions": ["pull"]}])
    );
    // Wrong password, unknown user: 401.
    for (u, p) in [("alice", "nope"), ("nobody", "x")] {
        let reply = send(
            app.client()
                .get(app.url("/auth/token?service=berth"))
                .basic_auth(u, Some(p)),
        );
        reply.assert_status(401);
    }
}

#[test]
fn scopes_outside_the_grammar_are_refused() {
    let c = cast();
    for scope in [
        "repository:team/../app:pull",
        "repository:team%2Fapp:pull",
        "repository:Team/App:pull",
        &format!("repository:{}:pull", "a".repeat(300)),
        "repository:team/app",
        "repository:team/app:PULL",
    ] {
        let reply = send(
            c.app.client().get(
                c.app
                    .url(&format!("/auth/token?service=berth&scope={}", pct(scope))),
            ),
        );
        assert_eq!(reply.status, 400, "{scope}: {}", reply.describe());
        assert_eq!(reply.json()["error"], "invalid_scope", "{scope}");
    }
    let reply = send(
        c.app.client().get(
            c.app
                .url("/auth/token?service=elsewhere&scope=repository:team/app:pull"),
        ),
    );
    reply.assert_status(400);
}

#[test]
fn roles_decide_pushes_pulls_and_deletes() {
    let c = cast();
    let app = &c.app;
    // The owner pushes; the reader may not; a stranger is denied; an admin may push anywhere.
    push_as(app, "alice", "alice-pw", "team/app", "1").assert_status(201);
    assert_error(
        &push_as(app, "bob", "bob-pw", "team/app", "2"),
        403,
        "DENIED",
    );
    assert_error(
        &push_as(app, "carol", "carol-pw", "team/app", "2"),
        403,
        "DENIED",
    );
    push_as(app, "admin", "admin-pw", "lib/base", "1").assert_status(201);
    // Reads: the reader yes, the stranger no, and a stranger cannot tell whether a repository
    // exists: the same 403 for one that does and one that does not.
    let get = |user: &str, path: &str| {
        send(
            app.client()
                .get(app.url(path))
                .basic_auth(user, Some(format!("{user}-pw"))),
        )
    };
    get("bob", "/v2/team/app/manifests/1").assert_status(200);
    let exists = get("carol", "/v2/team/app/manifests/1");
    let missing = get("carol", "/v2/team/nothing/manifests/1");
    assert_error(&exists, 403, "DENIED");
    assert_eq!(
        (exists.status, exists.text()),
        (missing.status, missing.text())
    );
    // Anonymous reads of the public namespace work; of others, a challenge.
    send(app.client().get(app.url("/v2/lib/base/manifests/1"))).assert_status(200);
    send(app.client().get(app.url("/v2/team/app/manifests/1"))).assert_status(401);
    // Deletes need maintainer.
    let del = |user: &str| {
        send(
            app.client()
                .delete(app.url("/v2/team/app/manifests/1"))
                .basic_auth(user, Some(format!("{user}-pw"))),
        )
    };
    assert_error(&del("bob"), 403, "DENIED");
    assert_eq!(del("alice").status, 202);
    // The catalog shows only what each may pull.
    let catalog = |user: &str| get(user, "/v2/_catalog").json()["repositories"].clone();
    assert_eq!(catalog("carol"), serde_json::json!(["lib/base"]));
    assert_eq!(catalog("bob"), serde_json::json!(["lib/base", "team/app"]));
    send(app.client().get(app.url("/v2/_catalog"))).assert_status(401);
}

#[test]
fn bearer_tokens_push_and_pull_and_expire_except_for_open_uploads() {
    let c = cast_with(TestApp::builder().arg("--token-ttl-secs").arg("10"));
    let app = &c.app;
    let t = token(
        app,
        Some(("alice", "alice-pw")),
        &["repository:team/app:pull,push"],
    );
    let jwt = t["token"].as_str().expect("token").to_string();
    assert_eq!(t["expires_in"], 10);
    let client = app.client();
    let start = send(
        client
            .post(app.url("/v2/team/app/blobs/uploads/"))
            .bearer_auth(&jwt),
    );
    start.assert_status(202);
    let location = app.location_url(start.must_header("location"));
    let blob = b"part one, then part two".to_vec();
    send(
        client
            .patch(&location)
            .bearer_auth(&jwt)
            .header("content-range", "0-8")
            .body(blob[..9].to_vec()),
    )
    .assert_status(202);
    // Another account cannot continue this upload, even with push rights.
    let other = send(
        client
            .patch(&location)
            .basic_auth("admin", Some("admin-pw"))
            .body(b"x".to_vec()),
    );
    assert_error(&other, 404, "BLOB_UPLOAD_UNKNOWN");

    std::thread::sleep(Duration::from_secs(11));
    // Expired: refused for everything else...
    let reply = bearer(app, "/v2/team/app/tags/list", &jwt);
    assert_error(&reply, 401, "UNAUTHORIZED");
    // ...but the upload it opened can still be finished with it.
    let finished = send(
        client
            .put(with_query(&location, &format!("digest={}", sha256(&blob))))
            .bearer_auth(&jwt)
            .body(blob[9..].to_vec()),
    );
    finished.assert_status(201);
    // And an expired token cannot open a new one.
    let reply = send(
        client
            .post(app.url("/v2/team/app/blobs/uploads/"))
            .bearer_auth(&jwt),
    );
    assert_error(&reply, 401, "UNAUTHORIZED");
}

#[test]
fn forged_and_foreign_tokens_are_refused() {
    let c = cast();
    let app = &c.app;
    let t = token(
        app,
        Some(("alice", "alice-pw")),
        &["repository:team/app:pull"],
    );
    let jwt = t["token"].as_str().expect("token").to_string();
    bearer(app, "/v2/team/app/tags/list", &jwt).assert_status(404);
    let parts: Vec<&str> = jwt.split('.').collect();
    let b64 = |v: &Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(v).expect("json"))
    };
    let mut more = claims(&jwt);
    more["access"][0]["actions"] = serde_json::json!(["pull", "push"]);
    let tampered = format!("{}.{}.{}", parts[0], b64(&more), parts[2]);
    let none_header = b64(&serde_json::json!({"alg": "none", "typ": "JWT"}));
    let unsigned = format!("{none_header}.{}.", parts[1]);
    let hs_header = b64(&serde_json::json!({"alg": "HS256", "typ": "JWT", "kid": "x"}));
    let hs = format!("{hs_header}.{}.{}", parts[1], parts[2]);
    let mut unknown_kid_header: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[0])
            .expect("b64"),
    )
    .expect("json");
    unknown_kid_header["kid"] = serde_json::json!("0000000000000000");
    let unknown_kid = format!("{}.{}.{}", b64(&unknown_kid_header), parts[1], parts[2]);

    // A genuine token of another registry (its own keys, other service): unknown key, wrong
    // audience and issuer.
    let other = cast_with(TestApp::builder().arg("--auth-service").arg("other"));
    let foreign = other_token(&other.app);
    for (what, bad) in [
        ("tampered", tampered.as_str()),
        ("unsigned (alg none)", unsigned.as_str()),
        ("HS256", hs.as_str()),
        ("unknown kid", unknown_kid.as_str()),
        ("another registry's", foreign.as_str()),
        ("garbage", "a.b.c"),
    ] {
        let reply = bearer(app, "/v2/team/app/tags/list", bad);
        assert_eq!(reply.status, 401, "{what}: {}", reply.describe());
    }
}

fn other_token(app: &TestApp) -> String {
    let reply = send(
        app.client()
            .get(app.url("/auth/token?service=other&scope=repository:team/app:pull"))
            .basic_auth("alice", Some("alice-pw")),
    );
    reply.assert_status(200);
    reply.json()["token"].as_str().expect("token").to_string()
}

#[test]
fn a_token_for_another_audience_on_the_same_store_is_refused() {
    // Two nodes on one store (same keys), configured with different services: a token for
    // one is not valid at the other.
    let c = cast();
    let other = TestApp::builder()
        .data_dir(c.app.data_dir())
        .arg("--auth")
        .arg("token")
        .arg("--auth-service")
        .arg("other")
        .start();
    let jwt = other_token(&other);
    bearer(&other, "/v2/team/app/tags/list", &jwt).assert_status(404);
    assert_eq!(bearer(&c.app, "/v2/team/app/tags/list", &jwt).status, 401);
}

#[test]
fn refresh_tokens_follow_oauth2() {
    let c = cast();
    let app = &c.app;
    let form = |pairs: &[(&str, &str)]| {
        send(
            app.client()
                .post(app.url("/auth/token"))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(
                    pairs
                        .iter()
                        .map(|(k, v)| format!("{k}={}", pct(v)))
                        .collect::<Vec<_>>()
                        .join("&"),
                ),
        )
    };
    let reply = form(&[
        ("grant_type", "password"),
        ("username", "alice"),
        ("password", "alice-pw"),
        ("service", "berth"),
        ("client_id", "test"),
        ("access_type", "offline"),
        ("scope", "repository:team/app:pull"),
    ]);
    reply.assert_status(200);
    let body = reply.json();
    assert_eq!(body["scope"], "repository:team/app:pull");
    let refresh = body["refresh_token"]
        .as_str()
        .expect("a refresh token")
        .to_string();
    let access = body["access_token"].as_str().expect("access token");
    bearer(app, "/v2/team/app/tags/list", access).assert_status(404);

    let reply = form(&[
        ("grant_type", "refresh_token"),
        ("refresh_token", &refresh),
        ("service", "berth"),
        ("client_id", "test"),
        ("scope", "repository:team/app:pull,push"),
    ]);
    reply.assert_status(200);
    assert_eq!(reply.json()["scope"], "repository:team/app:pull,push");
    // For another service, wrong, or missing client_id: refused.
    for (what, pairs) in [
        (
            "another service",
            vec![
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh.as_str()),
                ("service", "other"),
                ("client_id", "test"),
            ],
        ),
        (
            "a made-up token",
            vec![
                ("grant_type", "refresh_token"),
                (
                    "refresh_token",
                    "berth_aaaaaaaaaaaa_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                ),
                ("service", "berth"),
                ("client_id", "test"),
            ],
        ),
        (
            "no client_id",
            vec![
                ("grant_type", "password"),
                ("username", "alice"),
                ("password", "alice-pw"),
                ("service", "berth"),
            ],
        ),
        (
            "a refresh token as a password",
            vec![
                ("grant_type", "password"),
                ("username", "alice"),
                ("password", refresh.as_str()),
                ("service", "berth"),
                ("client_id", "test"),
            ],
        ),
    ] {
        let reply = form(&pairs);
        assert!(
            matches!(reply.status, 400 | 401),
            "{what}: {}",
            reply.describe()
        );
    }
}

#[test]
fn robots_and_personal_tokens_are_passwords_that_can_be_revoked() {
    let c = cast();
    let app = &c.app;
    let data = app.data_dir();
    push_as(app, "team+ci", &c.robot_secret, "team/app", "1").assert_status(201);
    // Outside its grants: denied.
    admin(data, &["namespace", "add", "other"], "");
    assert_error(
        &push_as(app, "team+ci", &c.robot_secret, "other/app", "1"),
        403,
        "DENIED",
    );
    // The secret with another user name: refused.
    push_as(app, "alice", &c.robot_secret, "team/app", "1").assert_status(401);

    // A personal token limited to pulls.
    let pat = admin(
        data,
        &[
            "token",
            "add",
            "alice",
            "--grant",
            "team/*:pull",
            "--description",
            "laptop",
        ],
        "",
    )
    .trim()
    .to_string();
    let get = send(
        app.client()
            .get(app.url("/v2/team/app/manifests/1"))
            .basic_auth("alice", Some(&pat)),
    );
    get.assert_status(200);
    assert_error(&push_as(app, "alice", &pat, "team/app", "2"), 403, "DENIED");
    // A token obtained with it carries its limit too.
    let t = token(
        app,
        Some(("alice", &pat)),
        &["repository:team/app:pull,push"],
    );
    assert_eq!(
        claims(t["token"].as_str().expect("token"))["access"][0]["actions"],
        serde_json::json!(["pull"])
    );
    let jwt = t["token"].as_str().expect("token").to_string();
    bearer(app, "/v2/team/app/manifests/1", &jwt).assert_status(200);

    // Revoked: refused at once, and so are tokens obtained with it.
    let listed = admin(data, &["token", "list", "alice"], "");
    assert!(
        listed.contains("laptop") && listed.contains("live"),
        "{listed}"
    );
    let id = pat.split('_').nth(1).expect("berth_<id>_<secret>");
    admin(data, &["token", "revoke", id], "");
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let basic = send(
            app.client()
                .get(app.url("/v2/team/app/manifests/1"))
                .basic_auth("alice", Some(&pat)),
        )
        .status;
        let by_token = bearer(app, "/v2/team/app/manifests/1", &jwt).status;
        if (basic, by_token) == (401, 401) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still accepted 2 s after revocation: basic {basic}, token {by_token}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Removing the robot ends its secret.
    admin(data, &["user", "rm", "team+ci"], "");
    std::thread::sleep(Duration::from_millis(1200));
    push_as(app, "team+ci", &c.robot_secret, "team/app", "3").assert_status(401);
}

#[test]
fn a_rotated_key_keeps_verifying_its_tokens() {
    let c = cast();
    let app = &c.app;
    let old = token(
        app,
        Some(("alice", "alice-pw")),
        &["repository:team/app:pull"],
    );
    let old = old["token"].as_str().expect("token").to_string();
    let out = admin(app.data_dir(), &["key", "rotate"], "");
    assert!(out.contains("new signing key"), "{out}");
    std::thread::sleep(Duration::from_millis(1200));
    let new = token(
        app,
        Some(("alice", "alice-pw")),
        &["repository:team/app:pull"],
    );
    let new = new["token"].as_str().expect("token").to_string();
    let kid = |t: &str| {
        let h: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(t.split('.').next().expect("header"))
                .expect("b64"),
        )
        .expect("json");
        h["kid"].clone()
    };
    assert_ne!(kid(&old), kid(&new), "new tokens are signed by the new key");
    bearer(app, "/v2/team/app/tags/list", &old).assert_status(404);
    bearer(app, "/v2/team/app/tags/list", &new).assert_status(404);
}

#[test]
fn htpasswd_users_log_in_with_their_bcrypt_passwords() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let htpasswd = dir.path().join("htpasswd");
    // As `htpasswd -nbB` writes it.
    let hash = bcrypt::hash("dave-pw", 5).expect("bcrypt");
    std::fs::write(&htpasswd, format!("dave:{hash}\n")).expect("write");
    let out = admin(
        &data,
        &["user", "import-htpasswd", htpasswd.to_str().expect("utf-8")],
        "",
    );
    assert!(out.contains("added 1 users"), "{out}");
    let app = TestApp::builder()
        .data_dir(&data)
        .arg("--auth")
        .arg("token")
        .start();
    let ok = send(
        app.client()
            .get(app.url("/v2/"))
            .basic_auth("dave", Some("dave-pw")),
    );
    ok.assert_status(200);
    let bad = send(
        app.client()
            .get(app.url("/v2/"))
            .basic_auth("dave", Some("wrong")),
    );
    bad.assert_status(401);
}

#[test]
fn mounts_need_pull_on_the_source() {
    let c = cast();
    let app = &c.app;
    push_as(app, "admin", "admin-pw", "secret/app", "1").assert_status(201);
    let layer = b"layer of secret/app:1".to_vec();
    let digest = sha256(&layer);
    for query in [
        format!("mount={digest}&from=secret/app"),
        format!("mount={digest}"),
    ] {
        let reply = send(
            app.client()
                .post(app.url(&format!("/v2/team/app/blobs/uploads/?{query}")))
                .basic_auth("alice", Some("alice-pw")),
        );
        assert_eq!(
            reply.status,
            202,
            "{query}: alice may not read secret/app, so no mount: {}",
            reply.describe()
        );
    }
    let reply = send(
        app.client()
            .post(app.url(&format!(
                "/v2/team/app/blobs/uploads/?mount={digest}&from=secret/app"
            )))
            .basic_auth("admin", Some("admin-pw")),
    );
    reply.assert_status(201);
}

#[test]
fn real_clients_log_in_with_each_kind_of_credential() {
    let c = cast();
    let app = &c.app;
    let tools = Tools::new();
    let layout = tools.umoci_image("img", "v1", &[vec![("hello.txt", b"hello".to_vec())]]);
    let src = layout.reference("v1");
    let pat = admin(app.data_dir(), &["token", "add", "alice"], "")
        .trim()
        .to_string();
    let robot = format!("team+ci:{}", c.robot_secret);
    let user = "alice:alice-pw".to_string();
    for (what, creds, repo) in [
        ("user", &user, "team/by-user"),
        ("robot", &robot, "team/by-robot"),
        ("personal token", &format!("alice:{pat}"), "team/by-pat"),
    ] {
        let dest = format!("docker://{}/{repo}:1", app.host);
        tools
            .try_skopeo(&[
                "copy",
                "--dest-tls-verify=false",
                "--dest-creds",
                creds,
                &src,
                &dest,
            ])
            .unwrap_or_else(|e| panic!("skopeo push as {what}: {e}"));
        tools
            .try_skopeo(&["inspect", "--tls-verify=false", "--creds", creds, &dest])
            .unwrap_or_else(|e| panic!("skopeo inspect as {what}: {e}"));
    }
    // Without credentials: refused.
    let dest = format!("docker://{}/team/by-user:1", app.host);
    let refused = tools.try_skopeo(&["inspect", "--tls-verify=false", &dest]);
    assert!(
        refused.is_err(),
        "anonymous inspect of a private repository"
    );
    // podman login stores the credentials; pull and push then need no flags.
    tools.podman(&[
        "login",
        "--tls-verify=false",
        "-u",
        "alice",
        "-p",
        "alice-pw",
        &app.host,
    ]);
    tools.podman(&[
        "pull",
        "--tls-verify=false",
        &format!("{}/team/by-robot:1", app.host),
    ]);
    // buildah pushes with --creds.
    tools.buildah(&[
        "push",
        "--tls-verify=false",
        "--creds",
        &robot,
        &format!("{}/team/by-robot:1", app.host),
        &format!("docker://{}/team/by-buildah:1", app.host),
    ]);
    let tags = send(
        app.client()
            .get(app.url("/v2/team/by-buildah/tags/list"))
            .basic_auth("bob", Some("bob-pw")),
    );
    tags.assert_status(200);
    assert_eq!(tags.json()["tags"], serde_json::json!(["1"]));
}

#[test]
fn failed_logins_are_throttled_per_account() {
    let c = cast_with(
        TestApp::builder()
            .arg("--max-failed-logins-per-minute")
            .arg("3"),
    );
    let app = &c.app;
    let login =
        |user: &str, pw: &str| send(app.client().get(app.url("/v2/")).basic_auth(user, Some(pw)));
    for _ in 0..4 {
        login("bob", "guess").assert_status(401);
    }
    // Now even the right password waits: guessing is slow.
    let throttled = login("bob", "bob-pw");
    assert_error(&throttled, 429, "TOOMANYREQUESTS");
    let wait: u64 = throttled
        .must_header("retry-after")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&wait), "{wait}");
    // Other accounts are unaffected.
    login("alice", "alice-pw").assert_status(200);
    // The token endpoint is throttled the same way.
    let reply = send(
        app.client()
            .get(app.url("/auth/token?service=berth"))
            .basic_auth("bob", Some("bob-pw")),
    );
    reply.assert_status(429);
    assert!(reply.header("retry-after").is_some());
}

#[test]
fn request_rates_and_uploads_in_flight_are_limited_when_configured() {
    let c = cast_with(
        TestApp::builder()
            .arg("--rate-limit-per-address")
            .arg("5")
            .arg("--max-concurrent-uploads-per-client")
            .arg("1"),
    );
    let app = &c.app;
    let statuses: Vec<u16> = (0..20)
        .map(|_| send(app.client().get(app.url("/v2/lib/base/tags/list"))).status)
        .collect();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert!(limited >= 10, "{statuses:?}");
    std::thread::sleep(Duration::from_millis(1200));

    // One upload streaming slowly holds alice's only upload slot.
    let start = send(
        app.client()
            .post(app.url("/v2/team/app/blobs/uploads/"))
            .basic_auth("alice", Some("alice-pw")),
    );
    start.assert_status(202);
    let location = app.location_url(start.must_header("location"));
    let body = crate::support::clients::GenReader::new(7, 1 << 20).stall_after(1000);
    let abort = body.abort_flag();
    let slow = {
        let (client, location) = (app.client(), location.clone());
        std::thread::spawn(move || {
            client
                .patch(&location)
                .basic_auth("alice", Some("alice-pw"))
                .body(reqwest::blocking::Body::new(body))
                .send()
                .map(|r| r.status().as_u16())
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let second = send(
        app.client()
            .post(app.url("/v2/team/other/blobs/uploads/"))
            .basic_auth("alice", Some("alice-pw")),
    );
    assert_error(&second, 429, "TOOMANYREQUESTS");
    // Another account has its own slot.
    send(
        app.client()
            .post(app.url("/v2/team/other/blobs/uploads/"))
            .basic_auth("admin", Some("admin-pw")),
    )
    .assert_status(202);
    abort.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = slow.join();
    std::thread::sleep(Duration::from_millis(300));
    send(
        app.client()
            .post(app.url("/v2/team/other/blobs/uploads/"))
            .basic_auth("alice", Some("alice-pw")),
    )
    .assert_status(202);
}

/// Every `/v2` endpoint times every kind of caller, with basic credentials and again with a
/// bearer token obtained by the same caller for everything on the repository.
#[test]
fn the_v2_access_matrix() {
    // The revoked robot fails every request; it must not be throttled into 429s here.
    let c = cast_with(
        TestApp::builder()
            .arg("--max-failed-logins-per-minute")
            .arg("1000"),
    );
    let app = &c.app;
    let data = app.data_dir();
    for (user, role) in [
        ("dave", "writer"),
        ("erin", "maintainer"),
        ("zed", "writer"),
    ] {
        admin(
            data,
            &["user", "add", user, "--password-stdin"],
            &format!("{user}-pw\n"),
        );
        admin(data, &["namespace", "grant", "team", user, role], "");
    }
    admin(data, &["namespace", "add", "other"], "");
    let out = admin(
        data,
        &[
            "robot",
            "add",
            "other",
            "ci",
            "--grant",
            "other/*:pull,push",
        ],
        "",
    );
    let outside = out
        .lines()
        .find_map(|l| l.strip_prefix("secret: "))
        .expect("secret")
        .to_string();
    let out = admin(
        data,
        &["robot", "add", "team", "old", "--grant", "team/*:pull"],
        "",
    );
    let revoked = out
        .lines()
        .find_map(|l| l.strip_prefix("secret: "))
        .expect("secret")
        .to_string();
    admin(
        data,
        &["token", "revoke", revoked.split('_').nth(1).expect("id")],
        "",
    );
    push_as(app, "alice", "alice-pw", "team/app", "1").assert_status(201);
    let layer = sha256(b"layer of team/app:1");
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    // An upload of zed's, whom no column is.
    let upload = send(
        app.client()
            .post(app.url("/v2/team/app/blobs/uploads/"))
            .basic_auth("zed", Some("zed-pw")),
    );
    let upload = location_path(upload.must_header("location"));
    let manifest = oci_manifest(
        &descriptor("application/vnd.oci.image.config.v1+json", &config),
        &[],
        serde_json::json!({}),
    );

    // Columns: anonymous, reader, writer, maintainer, owner, admin, robot in scope, robot out
    // of scope, revoked robot.
    let callers: [(&str, Option<(&str, String)>); 9] = [
        ("anonymous", None),
        ("reader", Some(("bob", "bob-pw".into()))),
        ("writer", Some(("dave", "dave-pw".into()))),
        ("maintainer", Some(("erin", "erin-pw".into()))),
        ("owner", Some(("alice", "alice-pw".into()))),
        ("admin", Some(("admin", "admin-pw".into()))),
        ("robot", Some(("team+ci", c.robot_secret.clone()))),
        ("robot elsewhere", Some(("other+ci", outside))),
        ("revoked robot", Some(("team+old", revoked))),
    ];
    type Row = (&'static str, &'static str, String, [u16; 9]);
    const LOGIN: [u16; 9] = [401, 200, 200, 200, 200, 200, 200, 200, 401];
    const PULL: [u16; 9] = [401, 200, 200, 200, 200, 200, 200, 403, 401];
    let push = |ok: u16| [401, 403, ok, ok, ok, ok, ok, 403, 401];
    let delete = |ok: u16| [401, 403, 403, ok, ok, ok, 403, 403, 401];
    let rows: Vec<Row> = vec![
        ("base", "GET", "/v2/".into(), LOGIN),
        ("catalog", "GET", "/v2/_catalog".into(), LOGIN),
        ("tags", "GET", "/v2/team/app/tags/list".into(), PULL),
        ("manifest", "GET", "/v2/team/app/manifests/1".into(), PULL),
        (
            "manifest head",
            "HEAD",
            "/v2/team/app/manifests/1".into(),
            PULL,
        ),
        ("blob", "GET", format!("/v2/team/app/blobs/{layer}"), PULL),
        (
            "blob head",
            "HEAD",
            format!("/v2/team/app/blobs/{layer}"),
            PULL,
        ),
        (
            "referrers",
            "GET",
            format!("/v2/team/app/referrers/{layer}"),
            PULL,
        ),
        (
            "start upload",
            "POST",
            "/v2/team/app/blobs/uploads/".into(),
            push(202),
        ),
        // Someone else's upload: push rights let the request through, to a 404.
        ("upload status", "GET", upload.clone(), push(404)),
        ("upload patch", "PATCH", upload.clone(), push(404)),
        ("upload cancel", "DELETE", upload.clone(), push(404)),
        (
            "manifest put",
            "PUT",
            "/v2/team/app/manifests/2".into(),
            push(201),
        ),
        (
            "manifest delete",
            "DELETE",
            "/v2/team/app/manifests/nope".into(),
            delete(404),
        ),
        (
            "blob delete",
            "DELETE",
            format!("/v2/team/app/blobs/{}", sha256(b"none")),
            delete(404),
        ),
    ];
    let config_pushed = send(
        app.client()
            .post(app.url(&format!(
                "/v2/team/app/blobs/uploads/?digest={}",
                sha256(&config)
            )))
            .basic_auth("alice", Some("alice-pw"))
            .body(config.clone()),
    );
    config_pushed.assert_status(201);

    let mut failures = Vec::new();
    for bearer_tokens in [false, true] {
        for (column, (who, creds)) in callers.iter().enumerate() {
            let token = match (bearer_tokens, creds) {
                (true, Some((user, password))) => {
                    let reply = send(
                        app.client()
                            .get(app.url(
                                "/auth/token?service=berth&scope=repository:team/app:*\
                                 &scope=registry:catalog:*",
                            ))
                            .basic_auth(user, Some(password)),
                    );
                    if reply.status != 200 {
                        // The revoked robot gets no token at all.
                        assert_eq!(reply.status, 401, "{who}: {}", reply.describe());
                        continue;
                    }
                    Some(reply.json()["token"].as_str().expect("token").to_string())
                }
                _ => None,
            };
            for (what, method, path, expected) in &rows {
                let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
                let mut req = app.client().request(method.clone(), app.url(path));
                req = match (&token, creds) {
                    (Some(t), _) => req.bearer_auth(t),
                    (None, Some((u, p))) => req.basic_auth(u, Some(p)),
                    (None, None) => req,
                };
                if *what == "manifest put" {
                    req = req
                        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
                        .body(manifest.clone());
                }
                let got = send(req).status;
                if got != expected[column] {
                    failures.push(format!(
                        "{what} {method} {path} as {who} ({}): got {got}, expected {}",
                        if bearer_tokens { "token" } else { "basic" },
                        expected[column]
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn an_open_registry_ignores_whatever_authorization_a_client_sends() {
    let app = TestApp::start();
    for value in [
        "Digest username=x",
        "Bearer a b c",
        "Basic !!!",
        "Bearer x.y.z",
    ] {
        let reply = send(
            app.client()
                .get(app.url("/v2/"))
                .header("authorization", value),
        );
        assert_eq!(reply.status, 200, "{value}: {}", reply.describe());
    }
}
