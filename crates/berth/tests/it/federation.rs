//! CI identity federation and external token issuers, end to end. The test is the OIDC issuer:
//! it generates its keys, publishes them as a JWKS (a file, or served from a thread on
//! 127.0.0.1) and signs identity tokens shaped like GitHub Actions'. Berth must take the ones a
//! trust rule matches, as the rule's robot, and refuse every other.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::{AsDer, PublicKeyX509Der};
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair, RSA_PKCS1_SHA256, RsaKeyPair,
};
use base64::Engine;
use reqwest::blocking::RequestBuilder;
use serde_json::{Value, json};

use crate::auth::{Cast, admin, cast_with, token};
use crate::support::clients::Tools;
use crate::support::*;

const GITHUB: &str = "https://token.actions.githubusercontent.com";
const AUDIENCE: &str = "https://registry.example";
const MAIN_ONLY: &str = r#"repository == "org/app" && ref == "refs/heads/main""#;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

enum Signer {
    Ec(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

/// An issuer's signing key.
struct Key {
    kid: String,
    signer: Signer,
}

impl Key {
    fn ec(kid: &str) -> Key {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("EC key");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
            .expect("EC key");
        Key {
            kid: kid.into(),
            signer: Signer::Ec(pair),
        }
    }

    /// RS256, as GitHub and GitLab sign.
    fn rsa(kid: &str) -> Key {
        let pair = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("RSA key");
        Key {
            kid: kid.into(),
            signer: Signer::Rsa(pair),
        }
    }

    fn alg(&self) -> &'static str {
        match self.signer {
            Signer::Ec(_) => "ES256",
            Signer::Rsa(_) => "RS256",
        }
    }

    fn jwk(&self) -> Value {
        match &self.signer {
            Signer::Ec(pair) => {
                let p = pair.public_key().as_ref();
                json!({"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256",
                       "kid": self.kid, "x": b64(&p[1..33]), "y": b64(&p[33..65])})
            }
            Signer::Rsa(pair) => {
                let public = pair.public_key();
                json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.kid,
                       "n": b64(public.modulus().big_endian_without_leading_zero()),
                       "e": b64(public.exponent().big_endian_without_leading_zero())})
            }
        }
    }

    /// The public key in PEM, as a token server's operator would hand it over.
    fn pem(&self) -> String {
        let der: PublicKeyX509Der<'static> = match &self.signer {
            Signer::Ec(pair) => pair.public_key().as_der().expect("DER"),
            Signer::Rsa(pair) => pair.public_key().as_der().expect("DER"),
        };
        let body = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).expect("ascii"))
            .collect();
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            lines.join("\n")
        )
    }

    fn sign(&self, claims: &Value) -> String {
        self.sign_with(
            &json!({"alg": self.alg(), "typ": "JWT", "kid": self.kid}),
            claims,
        )
    }

    fn sign_with(&self, header: &Value, claims: &Value) -> String {
        let message = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let signature = match &self.signer {
            Signer::Ec(pair) => pair
                .sign(&rng, message.as_bytes())
                .expect("sign")
                .as_ref()
                .to_vec(),
            Signer::Rsa(pair) => {
                let mut sig = vec![0; pair.public_modulus_len()];
                pair.sign(&RSA_PKCS1_SHA256, &rng, message.as_bytes(), &mut sig)
                    .expect("sign");
                sig
            }
        };
        format!("{message}.{}", b64(&signature))
    }
}

fn jwks(keys: &[&Key]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()}).to_string()
}

/// An issuer's JWKS endpoint on 127.0.0.1, served from a thread; counts the fetches.
struct JwksServer {
    url: String,
    jwks: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
    failing: Arc<AtomicBool>,
}

impl JwksServer {
    fn start(keys: &[&Key]) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!(
            "http://{}/.well-known/jwks",
            listener.local_addr().expect("addr")
        );
        let server = JwksServer {
            url,
            jwks: Arc::new(Mutex::new(jwks(keys))),
            fetches: Arc::default(),
            failing: Arc::default(),
        };
        let (body, fetches, failing) = (
            server.jwks.clone(),
            server.fetches.clone(),
            server.failing.clone(),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 65536 {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                fetches.fetch_add(1, Ordering::SeqCst);
                let (status, text) = if failing.load(Ordering::SeqCst) {
                    ("500 Internal Server Error", "down".to_string())
                } else {
                    ("200 OK", body.lock().expect("lock").clone())
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{text}",
                    text.len()
                );
            }
        });
        server
    }

    fn publish(&self, keys: &[&Key]) {
        *self.jwks.lock().expect("lock") = jwks(keys);
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

/// Claims as GitHub Actions puts them in a job's identity token.
fn github_claims(repository: &str, r#ref: &str) -> Value {
    let now = now();
    json!({
        "iss": GITHUB,
        "aud": AUDIENCE,
        "sub": format!("repo:{repository}:ref:{ref}"),
        "repository": repository,
        "repository_owner": repository.split('/').next().unwrap_or_default(),
        "ref": r#ref,
        "ref_type": "branch",
        "workflow": "release",
        "jti": uuid_like(),
        "iat": now,
        "nbf": now - 5,
        "exp": now + 300,
    })
}

fn uuid_like() -> String {
    format!("{:x}", now() as u128 * 7919 + std::process::id() as u128)
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn without(mut claims: Value, key: &str) -> Value {
    claims.as_object_mut().expect("object").remove(key);
    claims
}

fn add_rule(data: &Path, name: &str, jwks: &str, conditions: &str, robot: &str) -> String {
    admin(
        data,
        &[
            "trust",
            "add",
            name,
            "--issuer",
            GITHUB,
            "--audience",
            AUDIENCE,
            "--jwks",
            jwks,
            "--conditions",
            conditions,
            "--robot",
            robot,
        ],
        "",
    )
}

/// `berth ARGS` that must fail; returns its stderr.
fn admin_fails(data: &Path, args: &[&str]) -> String {
    let mut cmd = clean_command(data.parent().unwrap_or(data));
    cmd.args(args).arg("--data-dir").arg(data);
    let out = output_within(cmd, "berth trust");
    assert!(!out.status.success(), "berth {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `GET /auth/token` with basic credentials.
fn token_reply(app: &TestApp, user: &str, password: &str, scope: &str) -> Reply {
    send(
        app.client()
            .get(app.url(&format!("/auth/token?service=berth&scope={}", pct(scope))))
            .basic_auth(user, Some(password)),
    )
}

/// Retries `f` until it returns `want` (a node sees a new trust rule within a second).
fn eventually(what: &str, want: u16, f: impl Fn() -> Reply) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let reply = f();
        if reply.status == want {
            return reply;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {} after 5 s: {}",
            reply.status,
            reply.describe()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn claims_of(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .expect("base64url"),
    )
    .expect("JSON claims")
}

/// Pushes a one-layer image with whatever credentials `auth` adds to each request.
fn push_with(
    app: &TestApp,
    auth: &dyn Fn(RequestBuilder) -> RequestBuilder,
    repo: &str,
    tag: &str,
) -> Reply {
    let client = app.client();
    let layer = format!("layer of {repo}:{tag}").into_bytes();
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    for blob in [&layer, &config] {
        let reply = send(auth(
            client
                .post(app.url(&format!(
                    "/v2/{repo}/blobs/uploads/?digest={}",
                    sha256(blob)
                )))
                .body(blob.clone()),
        ));
        if reply.status != 201 {
            return reply;
        }
    }
    let manifest = oci_manifest(
        &descriptor("application/vnd.oci.image.config.v1+json", &config),
        &[descriptor("application/vnd.oci.image.layer.v1.tar", &layer)],
        json!({}),
    );
    send(auth(
        client
            .put(app.url(&format!("/v2/{repo}/manifests/{tag}")))
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(manifest),
    ))
}

fn form(app: &TestApp, pairs: &[(&str, &str)]) -> Reply {
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
}

/// A builder whose failed-login throttle stays out of the way: these tests fail logins on
/// purpose, many times a minute.
fn unthrottled() -> TestAppBuilder {
    TestApp::builder()
        .arg("--max-failed-logins-per-minute")
        .arg("1000")
        .arg("--max-failed-logins-per-minute-per-address")
        .arg("1000")
}

/// The cast of `auth.rs` (robot `team+ci` may pull and push `team/*`), logging at info.
fn logged_cast(log: &Path) -> Cast {
    cast_with(
        TestApp::builder()
            .env("RUST_LOG", "berth=info")
            .stderr_to(log),
    )
}

#[test]
fn a_ci_job_whose_claims_match_gets_a_token_and_pushes_as_the_robot() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let log = tmp.path().join("berth.log");
    let c = logged_cast(&log);
    let app = &c.app;
    let key = Key::rsa("gh-1");
    let issuer = JwksServer::start(&[&key]);
    let out = add_rule(
        app.data_dir(),
        "github-main",
        &issuer.url,
        MAIN_ONLY,
        "team+ci",
    );
    assert!(out.contains("act as team+ci"), "{out}");
    let listed = admin(app.data_dir(), &["trust", "list"], "");
    assert!(
        listed.contains("github-main\tteam+ci\thttps://token.actions.githubusercontent.com")
            && listed.contains(MAIN_ONLY),
        "{listed}"
    );

    // The job's token as the password of the token endpoint (user name: the robot).
    let jwt = key.sign(&github_claims("org/app", "refs/heads/main"));
    let reply = eventually("a token for the new rule", 200, || {
        token_reply(app, "team+ci", &jwt, "repository:team/app:pull,push")
    });
    let registry_token = reply.json()["token"].as_str().expect("token").to_string();
    let claims = claims_of(&registry_token);
    assert_eq!(claims["sub"], "team+ci");
    assert_eq!(
        claims["act"],
        format!("{GITHUB}#repo:org/app:ref:refs/heads/main")
    );
    assert_eq!(
        claims["access"],
        json!([{"type": "repository", "name": "team/app", "actions": ["pull", "push"]}])
    );
    // The robot's rights, no more: other namespaces are not granted.
    let other = token(
        app,
        Some(("team+ci", &jwt)),
        &["repository:other/app:pull,push"],
    );
    assert_eq!(
        claims_of(other["token"].as_str().expect("token"))["access"],
        json!([])
    );
    // No refresh token: it would outlive the job's identity.
    let offline =
        send(
            app.client()
                .get(app.url(
                    "/auth/token?service=berth&offline_token=true&scope=repository:team/app:pull",
                ))
                .basic_auth("team+ci", Some(&jwt)),
        );
    offline.assert_status(200);
    assert!(offline.json().get("refresh_token").is_none());

    push_with(app, &|r| r.bearer_auth(&registry_token), "team/app", "1").assert_status(201);
    // The JWT as the basic-auth password of /v2 itself, with any user name.
    push_with(app, &|r| r.basic_auth("oidc", Some(&jwt)), "team/app", "2").assert_status(201);
    assert_error(
        &push_with(app, &|r| r.basic_auth("oidc", Some(&jwt)), "other/app", "1"),
        403,
        "DENIED",
    );

    // OAuth2 token exchange.
    let exchange = |kind: &str| {
        form(
            app,
            &[
                (
                    "grant_type",
                    "urn:ietf:params:oauth:grant-type:token-exchange",
                ),
                ("subject_token", &jwt),
                ("subject_token_type", kind),
                ("client_id", "ci"),
                ("service", "berth"),
                ("scope", "repository:team/app:pull"),
            ],
        )
    };
    let reply = exchange("urn:ietf:params:oauth:token-type:jwt");
    reply.assert_status(200);
    let body = reply.json();
    assert_eq!(
        body["issued_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["scope"], "repository:team/app:pull");
    let exchanged = body["access_token"].as_str().expect("access_token");
    assert_eq!(claims_of(exchanged)["sub"], "team+ci");
    send(
        app.client()
            .get(app.url("/v2/team/app/manifests/1"))
            .bearer_auth(exchanged),
    )
    .assert_status(200);
    exchange("urn:ietf:params:oauth:token-type:saml2").assert_status(400);

    // A real client: skopeo logs in with the token as its password.
    let tools = Tools::new();
    let layout = tools.umoci_image("img", "v1", &[vec![("hello.txt", b"hello".to_vec())]]);
    tools
        .try_skopeo(&[
            "copy",
            "--dest-tls-verify=false",
            "--dest-creds",
            &format!("team+ci:{jwt}"),
            &layout.reference("v1"),
            &format!("docker://{}/team/by-ci:1", app.host),
        ])
        .unwrap_or_else(|e| panic!("skopeo push with the CI token: {e}"));

    // Every push is logged as the robot acting for the CI identity.
    let text = std::fs::read_to_string(&log).expect("read the log");
    let actor = format!("actor=robot:team+ci({GITHUB}#repo:org/app:ref:refs/heads/main)");
    let pushes: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("manifest pushed"))
        .collect();
    assert_eq!(pushes.len(), 3, "{text}");
    assert!(pushes.iter().all(|l| l.contains(&actor)), "{text}");
    // And so is the event log: the login, the tokens issued, the pushes.
    let actor = format!("robot:team+ci({GITHUB}#repo:org/app:ref:refs/heads/main)");
    let events: Vec<Value> = admin(
        app.data_dir(),
        &["audit", "export", "--since", "2000-01-01"],
        "",
    )
    .lines()
    .map(|l| serde_json::from_str(l).expect("a JSON line"))
    .collect();
    for kind in ["login.succeeded", "token.issued", "manifest.pushed"] {
        assert!(
            events
                .iter()
                .any(|e| e["kind"] == kind && e["actor"] == actor.as_str()),
            "no {kind} event by {actor}: {events:#?}"
        );
    }
}

#[test]
fn tokens_the_rules_do_not_match_or_that_fail_verification_are_refused() {
    let c = cast_with(unthrottled());
    let app = &c.app;
    let data = app.data_dir();
    let key = Key::ec("k1");
    let file = c.app.data_dir().parent().expect("parent").join("jwks.json");
    std::fs::write(&file, jwks(&[&key])).expect("write JWKS");
    let jwks_path = file.to_str().expect("utf-8");
    add_rule(data, "main", jwks_path, MAIN_ONLY, "team+ci");
    add_rule(
        data,
        "tags",
        jwks_path,
        r#"repository == "org/app" && ref =~ "refs/tags/v*""#,
        "team+ci",
    );
    let good = github_claims("org/app", "refs/heads/main");
    let scope = "repository:team/app:pull";
    eventually("the rules are loaded", 200, || {
        token_reply(app, "team+ci", &key.sign(&good), scope)
    });
    token_reply(
        app,
        "team+ci",
        &key.sign(&github_claims("org/app", "refs/tags/v1.2.0")),
        scope,
    )
    .assert_status(200);

    let stranger = Key::ec("k2");
    let signed = key.sign(&good);
    let parts: Vec<&str> = signed.split('.').collect();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(with(good.clone(), "repository", json!("org/evil"))
            .to_string()
            .as_bytes()),
        parts[2]
    );
    let unsigned = format!("{}.{}.", b64(br#"{"alg":"none","typ":"JWT"}"#), parts[1]);
    let hs256 = format!(
        "{}.{}.{}",
        b64(br#"{"alg":"HS256","typ":"JWT","kid":"k1"}"#),
        parts[1],
        parts[2]
    );
    let now = now();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "another repository",
            key.sign(&github_claims("org/evil", "refs/heads/main")),
            "match no trust rule",
        ),
        (
            "another branch",
            key.sign(&github_claims("org/app", "refs/heads/dev")),
            "match no trust rule",
        ),
        (
            "a tag outside the pattern",
            key.sign(&github_claims("org/app", "refs/tags/release-1")),
            "match no trust rule",
        ),
        (
            "no ref claim",
            key.sign(&without(good.clone(), "ref")),
            "match no trust rule",
        ),
        (
            "another audience",
            key.sign(&with(good.clone(), "aud", json!("https://elsewhere"))),
            "refused",
        ),
        (
            "another issuer",
            key.sign(&with(good.clone(), "iss", json!("https://gitlab.com"))),
            "no trust rule",
        ),
        (
            "expired",
            key.sign(
                &with(good.clone(), "exp", json!(now - 10))
                    .pipe(|c| with(c, "iat", json!(now - 400))),
            ),
            "expired",
        ),
        (
            "not yet valid",
            key.sign(&with(good.clone(), "nbf", json!(now + 3600))),
            "not yet valid",
        ),
        ("an unknown key", stranger.sign(&good), "does not publish"),
        (
            "the right kid, another key",
            stranger.sign_with(&json!({"alg": "ES256", "kid": "k1"}), &good),
            "refused",
        ),
        ("tampered", tampered, "refused"),
        ("alg none", unsigned, ""),
        ("HS256", hs256, "HS256"),
    ];
    for (what, jwt, message) in cases {
        let reply = token_reply(app, "team+ci", &jwt, scope);
        assert_eq!(reply.status, 401, "{what}: {}", reply.describe());
        assert!(
            reply.text().contains(message),
            "{what}: {}",
            reply.describe()
        );
        let reply = send(
            app.client()
                .get(app.url("/v2/team/app/tags/list"))
                .basic_auth("team+ci", Some(&jwt)),
        );
        assert_error(&reply, 401, "UNAUTHORIZED");
    }

    // The user name, when it names a robot, restricts the rules to that robot's.
    admin(
        data,
        &["robot", "add", "team", "deploy", "--grant", "team/*:pull"],
        "",
    );
    let reply = token_reply(app, "team+deploy", &key.sign(&good), scope);
    assert_eq!(reply.status, 401, "{}", reply.describe());
    assert!(reply.text().contains("no trust rule of robot team+deploy"));
    // Two robots' rules matching one identity: the user name must say which.
    add_rule(data, "deploy-main", jwks_path, MAIN_ONLY, "team+deploy");
    let reply = eventually("the ambiguity is seen", 401, || {
        token_reply(app, "oidc", &key.sign(&good), scope)
    });
    assert!(
        reply.text().contains("several robots"),
        "{}",
        reply.describe()
    );
    let t = token(app, Some(("team+deploy", &key.sign(&good))), &[scope]);
    assert_eq!(
        claims_of(t["token"].as_str().expect("token"))["sub"],
        "team+deploy"
    );
}

/// `x.pipe(f)` is `f(x)`, to chain edits of a claims object.
trait Pipe: Sized {
    fn pipe<T>(self, f: impl FnOnce(Self) -> T) -> T {
        f(self)
    }
}
impl Pipe for Value {}

#[test]
fn key_rotation_at_the_issuer_is_picked_up_and_unknown_keys_cannot_make_berth_hammer_it() {
    let c = cast_with(unthrottled());
    let app = &c.app;
    let (old, new) = (Key::ec("2024"), Key::ec("2025"));
    let issuer = JwksServer::start(&[&old]);
    add_rule(app.data_dir(), "main", &issuer.url, MAIN_ONLY, "team+ci");
    let claims = github_claims("org/app", "refs/heads/main");
    let scope = "repository:team/app:pull";
    eventually("the rule is loaded", 200, || {
        token_reply(app, "team+ci", &old.sign(&claims), scope)
    });
    assert_eq!(issuer.fetches(), 1, "the JWKS is fetched once, then cached");

    // The issuer rotates: a token naming the new key makes Berth refetch (once the rate limit
    // allows: at most one fetch per 5 s).
    issuer.publish(&[&new]);
    std::thread::sleep(Duration::from_millis(5100));
    token_reply(app, "team+ci", &new.sign(&claims), scope).assert_status(200);
    assert_eq!(issuer.fetches(), 2);

    // A burst of tokens naming keys nobody published: refused, and the issuer hardly asked.
    for i in 0..20 {
        let forged = Key::ec(&format!("made-up-{i}")).sign(&claims);
        token_reply(app, "team+ci", &forged, scope).assert_status(401);
    }
    assert!(
        issuer.fetches() <= 3,
        "{} fetches for 20 unknown keys",
        issuer.fetches()
    );

    // An issuer whose keys cannot be fetched: 503, retry later (not 401: the token may be fine).
    let down = JwksServer::start(&[&old]);
    down.failing.store(true, Ordering::SeqCst);
    admin(app.data_dir(), &["namespace", "add", "other"], "");
    admin(
        app.data_dir(),
        &["robot", "add", "other", "ci", "--grant", "other/*:pull"],
        "",
    );
    add_rule(app.data_dir(), "down", &down.url, MAIN_ONLY, "other+ci");
    let reply = eventually("the JWKS cannot be fetched", 503, || {
        token_reply(app, "other+ci", &old.sign(&claims), scope)
    });
    assert_eq!(reply.json()["error"], "temporarily_unavailable");
}

#[test]
fn removing_a_trust_rule_ends_the_tokens_obtained_through_it() {
    let c = cast_with(unthrottled());
    let app = &c.app;
    let data = app.data_dir();
    let key = Key::ec("k1");
    let file = data.parent().expect("parent").join("jwks.json");
    std::fs::write(&file, jwks(&[&key])).expect("write JWKS");

    // Invalid rules are refused, saying why.
    let jwks_path = file.to_str().expect("utf-8");
    let bad = |conditions: &str, robot: &str| {
        admin_fails(
            data,
            &[
                "trust",
                "add",
                "bad",
                "--issuer",
                GITHUB,
                "--audience",
                AUDIENCE,
                "--jwks",
                jwks_path,
                "--conditions",
                conditions,
                "--robot",
                robot,
            ],
        )
    };
    let e = bad(r#"repository == "org/app" &&"#, "team+ci");
    assert!(
        e.contains("expected a claim name, found the end at byte 26"),
        "{e}"
    );
    let e = bad(MAIN_ONLY, "alice");
    assert!(e.contains("is a user"), "{e}");
    let e = admin_fails(data, &["trust", "rm", "nothing"]);
    assert!(e.contains("no trust rule nothing"), "{e}");

    // A relative JWKS file is stored as an absolute path.
    let dir = data.parent().expect("parent");
    let mut cmd = clean_command(dir);
    cmd.args([
        "trust",
        "add",
        "main",
        "--issuer",
        GITHUB,
        "--audience",
        AUDIENCE,
        "--jwks",
        "jwks.json",
        "--conditions",
        MAIN_ONLY,
        "--robot",
        "team+ci",
        "--data-dir",
    ])
    .arg(data);
    crate::auth::run_with_stdin(cmd, "");
    let listed = admin(data, &["trust", "list"], "");
    assert!(listed.contains(jwks_path), "{listed}");

    let jwt = key.sign(&github_claims("org/app", "refs/heads/main"));
    let reply = eventually("the rule is loaded", 200, || {
        token_reply(app, "team+ci", &jwt, "repository:team/app:pull")
    });
    let registry_token = reply.json()["token"].as_str().expect("token").to_string();
    let tags = |r: RequestBuilder| send(r).status;
    assert_eq!(
        tags(
            app.client()
                .get(app.url("/v2/team/app/tags/list"))
                .bearer_auth(&registry_token)
        ),
        404
    );

    admin(data, &["trust", "rm", "main"], "");
    assert!(admin(data, &["trust", "list"], "").is_empty());
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let by_token = tags(
            app.client()
                .get(app.url("/v2/team/app/tags/list"))
                .bearer_auth(&registry_token),
        );
        let by_jwt = tags(
            app.client()
                .get(app.url("/v2/team/app/tags/list"))
                .basic_auth("team+ci", Some(&jwt)),
        );
        if (by_token, by_jwt) == (401, 401) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still accepted 2 s after the rule was removed: token {by_token}, JWT {by_jwt}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_external_issuers_token_pulls_what_it_grants_and_nothing_else() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (pem_key, jwks_key) = (Key::ec("auth-1"), Key::rsa("other-1"));
    std::fs::write(tmp.path().join("auth.pem"), pem_key.pem()).expect("write PEM");
    std::fs::write(tmp.path().join("other.jwks"), jwks(&[&jwks_key])).expect("write JWKS");
    let issuers = tmp.path().join("issuers.toml");
    std::fs::write(
        &issuers,
        r#"
[[issuer]]
issuer = "https://auth.example"
audience = "registry.example"
public_key_file = "auth.pem"

[[issuer]]
issuer = "https://other.example"
audience = "registry.example"
jwks = "other.jwks"
"#,
    )
    .expect("write issuers file");
    let c = cast_with(
        TestApp::builder()
            .arg("--trusted-issuers-file")
            .arg(issuers.to_str().expect("utf-8")),
    );
    let app = &c.app;
    let admin_auth = |r: RequestBuilder| r.basic_auth("admin", Some("admin-pw"));
    push_with(app, &admin_auth, "team/app", "1").assert_status(201);
    push_with(app, &admin_auth, "team/secret", "1").assert_status(201);

    let now = now();
    let grant = |iss: &str, repository: &str, actions: &[&str]| {
        json!({
            "iss": iss, "aud": "registry.example", "sub": "deploy-bot",
            "iat": now, "nbf": now - 5, "exp": now + 300, "jti": "1",
            "access": [{"type": "repository", "name": repository, "actions": actions}],
        })
    };
    let get = |path: &str, token: &str| send(app.client().get(app.url(path)).bearer_auth(token));
    let pull_app = pem_key.sign(&grant("https://auth.example", "team/app", &["pull"]));
    get("/v2/team/app/manifests/1", &pull_app).assert_status(200);
    get("/v2/team/app/tags/list", &pull_app).assert_status(200);
    assert_error(
        &get("/v2/team/secret/manifests/1", &pull_app),
        403,
        "DENIED",
    );
    assert_error(
        &push_with(app, &|r| r.bearer_auth(&pull_app), "team/app", "2"),
        403,
        "DENIED",
    );
    // The other issuer, through its JWKS.
    let pull_secret = jwks_key.sign(&grant("https://other.example", "team/secret", &["pull"]));
    get("/v2/team/secret/manifests/1", &pull_secret).assert_status(200);
    assert_error(
        &get("/v2/team/app/manifests/1", &pull_secret),
        403,
        "DENIED",
    );

    // Refused: expired, another audience, a key of the wrong issuer, tampered.
    let expired = pem_key.sign(
        &grant("https://auth.example", "team/app", &["pull"])
            .pipe(|c| with(c, "exp", json!(now - 10)))
            .pipe(|c| with(c, "iat", json!(now - 400))),
    );
    let audience = pem_key.sign(
        &grant("https://auth.example", "team/app", &["pull"])
            .pipe(|c| with(c, "aud", json!("elsewhere"))),
    );
    let crossed = jwks_key.sign(&grant("https://auth.example", "team/app", &["pull"]));
    let parts: Vec<&str> = pull_app.split('.').collect();
    let wider = grant("https://auth.example", "team/secret", &["pull"]);
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(wider.to_string().as_bytes()),
        parts[2]
    );
    for (what, bad) in [
        ("expired", &expired),
        ("another audience", &audience),
        ("another issuer's key", &crossed),
        ("tampered", &tampered),
    ] {
        let reply = get("/v2/team/app/manifests/1", bad);
        assert_error(&reply, 401, "UNAUTHORIZED");
        assert!(
            reply
                .must_header("www-authenticate")
                .contains("error=\"invalid_token\""),
            "{what}"
        );
    }

    // An upload opened with an external token belongs to that identity.
    let push_app = pem_key.sign(&grant(
        "https://auth.example",
        "team/app",
        &["pull", "push"],
    ));
    let start = send(
        app.client()
            .post(app.url("/v2/team/app/blobs/uploads/"))
            .bearer_auth(&push_app),
    );
    start.assert_status(202);
    let location = app.location_url(start.must_header("location"));
    let other = send(
        app.client()
            .patch(&location)
            .basic_auth("admin", Some("admin-pw"))
            .body(b"x".to_vec()),
    );
    assert_error(&other, 404, "BLOB_UPLOAD_UNKNOWN");
    send(
        app.client()
            .patch(&location)
            .bearer_auth(&push_app)
            .body(b"x".to_vec()),
    )
    .assert_status(202);

    // Berth's own tokens work as before.
    let own = token(
        app,
        Some(("alice", "alice-pw")),
        &["repository:team/secret:pull"],
    );
    get(
        "/v2/team/secret/manifests/1",
        own["token"].as_str().expect("token"),
    )
    .assert_status(200);
}
