//! TLS end to end: the real binary serving HTTPS with certificates made at test time (rcgen), to
//! real clients (skopeo, reqwest, curl, a bare rustls client): HTTP/2 by ALPN, certificates
//! rotated on disk while it runs, client certificates (alone, and as accounts under access
//! control), silent and idle clients, bad files at start.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth::tls::RELOAD_INTERVAL;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use reqwest::Version;
use reqwest::blocking::Client;

use crate::support::clients::{OciLayout, Tools, pseudo_random};
use crate::support::net::{Ended, connect, wait_closed};
use crate::support::{TestApp, TestAppBuilder, clean_command, output_within, sha256};

/// A certificate authority made for one test.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM, and the certificate's DER to compare with what is served.
struct Pair {
    cert: String,
    key: String,
    der: Vec<u8>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        Ca {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn issue(&self, params: CertificateParams) -> Pair {
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// A server certificate for 127.0.0.1 and localhost, with a key of its own.
    fn server(&self) -> Pair {
        let names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        let mut params = CertificateParams::new(names).expect("server params");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    fn client(&self, common_name: &str) -> Pair {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }
}

/// The server's certificate and key files in a directory of their own, replaced the way
/// cert-manager and ACME clients do it: each file whole, by rename.
struct CertFiles {
    dir: tempfile::TempDir,
}

impl CertFiles {
    fn new(pair: &Pair) -> CertFiles {
        let files = CertFiles {
            dir: tempfile::tempdir().expect("tempdir"),
        };
        files.write(&pair.cert, &pair.key);
        files
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, cert: &str, key: &str) {
        replace(&self.path("tls.crt"), cert);
        replace(&self.path("tls.key"), key);
    }

    /// `builder` with these files as berth's certificate and key.
    fn args(&self, builder: TestAppBuilder) -> TestAppBuilder {
        builder
            .arg("--tls-cert")
            .arg(self.path("tls.crt").display().to_string())
            .arg("--tls-key")
            .arg(self.path("tls.key").display().to_string())
    }

    /// `berth serve` with these files as its certificate and key.
    fn serve(&self, builder: TestAppBuilder) -> TestApp {
        let app = self.args(builder).start();
        assert!(app.base.starts_with("https://"), "{}", app.base);
        app
    }
}

fn replace(path: &Path, contents: &str) {
    let new = path.with_extension("new");
    std::fs::write(&new, contents).unwrap_or_else(|e| panic!("{}: {e}", new.display()));
    std::fs::rename(&new, path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// A client that trusts only `ca`, optionally presenting a client certificate. Each client
/// opens its own connections, so a new one sees the certificate served now.
fn https_client(ca: &Ca, identity: Option<&Pair>) -> Client {
    let root = reqwest::Certificate::from_pem(ca.pem().as_bytes()).expect("CA certificate");
    let mut builder = Client::builder()
        .tls_certs_only([root])
        .tls_info(true)
        .timeout(Duration::from_secs(30));
    if let Some(pair) = identity {
        let pem = format!("{}{}", pair.cert, pair.key);
        builder = builder.identity(reqwest::Identity::from_pem(pem.as_bytes()).expect("identity"));
    }
    builder.build().expect("client")
}

/// `GET /v2/` on a new connection; the status and the HTTP version, or the error.
fn get_v2(app: &TestApp, client: &Client) -> Result<(u16, Version), String> {
    let response = client
        .get(app.url("/v2/"))
        .send()
        .map_err(|e| format!("{e:?}"))?;
    Ok((response.status().as_u16(), response.version()))
}

/// The certificate (DER) berth serves to a new connection.
fn served_certificate(app: &TestApp, ca: &Ca) -> Vec<u8> {
    let response = https_client(ca, None)
        .get(app.url("/v2/"))
        .send()
        .unwrap_or_else(|e| panic!("GET /v2/ over TLS: {e:?}"));
    assert_eq!(response.status().as_u16(), 200);
    response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .expect("the server's certificate")
        .to_vec()
}

/// Polls `check` every 100 ms until it holds; fails the test with `what` after `within`.
fn eventually(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn count_lines(log: &Path, needle: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

#[test]
fn skopeo_pushes_and_pulls_over_tls_verifying_the_certificate() {
    let ca = Ca::new("berth test CA");
    let files = CertFiles::new(&ca.server());
    // With access control on, so that skopeo also fetches its token from the HTTPS realm.
    let cast = crate::auth::cast_with(files.args(TestApp::builder()));
    let app = &cast.app;
    let tools = Tools::new();
    let certs = tools.path("certs");
    std::fs::create_dir_all(&certs).expect("mkdir certs");
    std::fs::write(certs.join("ca.crt"), ca.pem()).expect("write ca.crt");
    let certs = certs.display().to_string();

    let src = tools.umoci_image(
        "src",
        "v1",
        &[
            vec![("a.bin", pseudo_random(31, 200_000))],
            vec![("b.bin", pseudo_random(32, 50_000))],
        ],
    );
    let remote = format!("docker://{}/team/app:v1", app.host);
    tools.skopeo(&[
        "copy",
        "--preserve-digests",
        "--dest-creds",
        "alice:alice-pw",
        "--dest-tls-verify=true",
        "--dest-cert-dir",
        &certs,
        &src.reference("v1"),
        &remote,
    ]);
    let back = OciLayout::new(tools.path("back"));
    tools.skopeo(&[
        "copy",
        "--preserve-digests",
        "--src-creds",
        "alice:alice-pw",
        "--src-tls-verify=true",
        "--src-cert-dir",
        &certs,
        &remote,
        &back.reference("v1"),
    ]);
    let digest = src.manifest_digest("v1");
    assert_eq!(back.manifest_digest("v1"), digest);
    for d in src.closure(&digest) {
        assert!(
            back.blob(&d) == src.blob(&d),
            "{d} differs after the round trip"
        );
    }

    // Without the CA the certificate is refused: the client really verified it.
    let refused = tools
        .try_skopeo(&["inspect", "--tls-verify=true", &remote])
        .err()
        .expect("skopeo trusted a certificate from an unknown CA");
    assert!(refused.contains("certificate"), "{refused}");
}

#[test]
fn http2_is_negotiated_by_alpn_and_http1_still_served() {
    let ca = Ca::new("berth test CA");
    let files = CertFiles::new(&ca.server());
    let app = files.serve(TestApp::builder());
    let client = https_client(&ca, None);
    assert_eq!(get_v2(&app, &client), Ok((200, Version::HTTP_2)));

    // A push and pulls over HTTP/2, several at once on the one connection.
    let blob = pseudo_random(33, 700_000);
    let digest = sha256(&blob);
    let pushed = client
        .post(app.url(&format!("/v2/tls/h2/blobs/uploads/?digest={digest}")))
        .header("Content-Type", "application/octet-stream")
        .body(blob.clone())
        .send()
        .expect("push over HTTP/2");
    assert_eq!(
        (pushed.status().as_u16(), pushed.version()),
        (201, Version::HTTP_2)
    );
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                let pulled = client
                    .get(app.url(&format!("/v2/tls/h2/blobs/{digest}")))
                    .send()
                    .expect("pull over HTTP/2");
                assert_eq!(pulled.version(), Version::HTTP_2);
                assert!(pulled.bytes().expect("blob body") == blob, "blob differs");
            });
        }
    });

    // A client that offers only HTTP/1.1 gets HTTP/1.1.
    let http1 = Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.pem().as_bytes()).expect("CA")])
        .http1_only()
        .build()
        .expect("client");
    assert_eq!(get_v2(&app, &http1), Ok((200, Version::HTTP_11)));

    // curl agrees (its own TLS stack and HTTP/2 implementation).
    let ca_file = files.path("ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("write ca.pem");
    let curl = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "--http2", "-w", "%{http_version}"])
        .arg("--cacert")
        .arg(&ca_file)
        .arg(app.url("/v2/"))
        .output()
        .expect("run curl");
    assert!(curl.status.success(), "curl: {curl:?}");
    assert_eq!(String::from_utf8_lossy(&curl.stdout), "2");

    // Plain HTTP to the TLS port is refused, not served.
    let plain = format!("http://{}/v2/", app.host);
    assert!(
        Client::new().get(&plain).send().is_err(),
        "plain HTTP was answered on the TLS port"
    );
}

#[test]
fn a_certificate_replaced_on_disk_is_served_to_new_connections_without_a_restart() {
    let ca = Ca::new("berth test CA");
    let (first, second) = (ca.server(), ca.server());
    let files = CertFiles::new(&first);
    let app = files.serve(TestApp::builder());
    assert!(served_certificate(&app, &ca) == first.der);
    let opened_before = https_client(&ca, None);
    assert_eq!(get_v2(&app, &opened_before), Ok((200, Version::HTTP_2)));

    files.write(&second.cert, &second.key);
    eventually("the new certificate served", RELOAD_INTERVAL * 3, || {
        served_certificate(&app, &ca) == second.der
    });
    // The connection opened before the swap goes on as it was.
    assert_eq!(get_v2(&app, &opened_before), Ok((200, Version::HTTP_2)));
}

#[test]
fn a_bad_replacement_keeps_the_old_certificate_serving() {
    let ca = Ca::new("berth test CA");
    let (first, second, third) = (ca.server(), ca.server(), ca.server());
    let files = CertFiles::new(&first);
    let log = files.path("berth.log");
    let app = files.serve(TestApp::builder().stderr_to(&log));
    let refusals = || count_lines(&log, "new TLS certificate not used");

    // A rotation caught half-way, the new certificate beside the old key: looked at, refused
    // and logged, and the first pair goes on serving new connections. (Files that do not parse
    // take the same path; `bad_tls_files_stop_the_start_with_an_error_naming_them` shows them.)
    files.write(&second.cert, &first.key);
    eventually("the bad pair refused", RELOAD_INTERVAL * 3, || {
        refusals() == 1
    });
    assert!(served_certificate(&app, &ca) == first.der);
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(logged.contains("KeyMismatch"), "{logged}");

    // The rotation completes: the good pair is taken.
    files.write(&third.cert, &third.key);
    eventually("the good pair served", RELOAD_INTERVAL * 3, || {
        served_certificate(&app, &ca) == third.der
    });
}

#[test]
fn client_certificates_are_optional_and_must_come_from_the_client_ca() {
    let ca = Ca::new("berth test CA");
    let client_ca = Ca::new("client CA");
    let stranger = Ca::new("some other CA");
    let files = CertFiles::new(&ca.server());
    std::fs::write(files.path("clients.pem"), client_ca.pem()).expect("write client CA");
    let log = files.path("berth.log");
    let app = files.serve(
        TestApp::builder()
            .arg("--tls-client-ca")
            .arg(files.path("clients.pem").display().to_string())
            .env("RUST_LOG", "berth=debug")
            .stderr_to(&log),
    );

    assert_eq!(
        get_v2(&app, &https_client(&ca, None)),
        Ok((200, Version::HTTP_2)),
        "no client certificate"
    );
    let robot = client_ca.client("ci-robot");
    assert_eq!(
        get_v2(&app, &https_client(&ca, Some(&robot))),
        Ok((200, Version::HTTP_2)),
        "a certificate from the client CA"
    );
    // The request reached the handler with the certificate's subject.
    eventually(
        "the request logged with its subject",
        Duration::from_secs(5),
        || count_lines(&log, "client_cert=\"ci-robot\"") == 1,
    );
    for (who, pair) in [
        ("another CA", stranger.client("intruder")),
        ("the server CA", ca.client("intruder")),
    ] {
        let refused = get_v2(&app, &https_client(&ca, Some(&pair)));
        assert!(refused.is_err(), "a certificate from {who} was accepted");
    }
    assert_eq!(count_lines(&log, "intruder"), 0, "no request got through");
}

#[test]
fn with_access_control_a_client_certificate_acts_as_the_user_it_names() {
    let ca = Ca::new("berth test CA");
    let client_ca = Ca::new("client CA");
    let files = CertFiles::new(&ca.server());
    std::fs::write(files.path("clients.pem"), client_ca.pem()).expect("write client CA");
    let builder = files
        .args(TestApp::builder())
        .arg("--tls-client-ca")
        .arg(files.path("clients.pem").display().to_string());
    // alice owns `team`, carol has no role anywhere (see `auth::cast`).
    let cast = crate::auth::cast_with(builder);
    let app = &cast.app;
    let push = |identity: Option<&Pair>| {
        let blob = pseudo_random(35, 1000);
        let digest = sha256(&blob);
        https_client(&ca, identity)
            .post(app.url(&format!("/v2/team/app/blobs/uploads/?digest={digest}")))
            .body(blob)
            .send()
            .expect("push")
            .status()
            .as_u16()
    };
    assert_eq!(push(Some(&client_ca.client("alice"))), 201, "alice");
    assert_eq!(push(Some(&client_ca.client("carol"))), 403, "carol");
    assert_eq!(
        push(Some(&client_ca.client("mallory"))),
        401,
        "no such user"
    );
    assert_eq!(push(None), 401, "no certificate");
}

#[test]
fn a_silent_tls_client_is_dropped_after_the_header_timeout() {
    let ca = Ca::new("berth test CA");
    let files = CertFiles::new(&ca.server());
    let app = files.serve(
        TestApp::builder()
            .arg("--header-read-timeout-secs")
            .arg("1"),
    );
    let closed_in_time = |what: &str, stream: &mut TcpStream, since: Instant| match wait_closed(
        stream,
        since,
        since + Duration::from_secs(10),
    ) {
        Ended::Closed { after, .. } => assert!(
            after >= Duration::from_millis(900) && after < Duration::from_secs(5),
            "{what}: closed after {after:?}"
        ),
        Ended::Open { .. } => panic!("{what}: still open after 10 s"),
    };

    // Connects and never sends a ClientHello: the handshake's bound.
    let mut tcp = connect(&app.host);
    closed_in_time("no handshake", &mut tcp, Instant::now());

    // Completes the handshake, then sends nothing: the header bound (HTTP/1.1), the idle bound
    // (HTTP/2, before its preface).
    for alpn in [&b"h2"[..], b"http/1.1"] {
        let (session, mut tcp) = handshake(&app.host, &ca, alpn);
        assert_eq!(session.alpn_protocol(), Some(alpn));
        let what = String::from_utf8_lossy(alpn);
        closed_in_time(&what, &mut tcp, Instant::now());
    }
    // Still serving.
    assert_eq!(
        get_v2(&app, &https_client(&ca, None)),
        Ok((200, Version::HTTP_2))
    );
}

#[test]
fn an_http2_connection_stays_open_while_a_request_runs_and_closes_once_idle() {
    let ca = Ca::new("berth test CA");
    let files = CertFiles::new(&ca.server());
    let app = files.serve(
        TestApp::builder()
            .arg("--header-read-timeout-secs")
            .arg("1"),
    );
    let blob = pseudo_random(34, 1 << 20);
    let digest = sha256(&blob);
    let pushed = https_client(&ca, None)
        .post(app.url(&format!("/v2/tls/idle/blobs/uploads/?digest={digest}")))
        .body(blob.clone())
        .send()
        .expect("push");
    assert_eq!(pushed.status().as_u16(), 201);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let tcp = tokio::net::TcpStream::connect(&app.host)
            .await
            .expect("connect");
        let tls = tokio_rustls::TlsConnector::from(client_config(&ca, b"h2"))
            .connect(server_name(), tcp)
            .await
            .expect("TLS handshake");
        // The smallest windows HTTP/2 allows, so the server can only send as fast as this
        // client reads, and the request stays in flight on the server about as long.
        let (mut requests, connection) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .initial_stream_window_size(65_535)
                .initial_connection_window_size(65_535)
                .handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .expect("HTTP/2 handshake");
        let ended = tokio::spawn(async move {
            let _ = connection.await;
            Instant::now()
        });
        let get = |path: &str| {
            hyper::Request::get(app.url(path))
                .body(String::new())
                .expect("request")
        };
        let started = Instant::now();
        let mut body = requests
            .send_request(get(&format!("/v2/tls/idle/blobs/{digest}")))
            .await
            .expect("response")
            .into_body();
        // Read slowly, for well past the 1 s idle bound; half-way, a second request on the same
        // connection is still served: no GOAWAY was sent while the first was in flight.
        let mut received = Vec::new();
        let mut second = None;
        while let Some(frame) =
            std::future::poll_fn(|cx| hyper::body::Body::poll_frame(Pin::new(&mut body), cx)).await
        {
            if let Ok(data) = frame.expect("body frame").into_data() {
                received.extend_from_slice(&data);
            }
            if second.is_none() && started.elapsed() > Duration::from_millis(1500) {
                let response = requests.send_request(get("/v2/")).await;
                second = Some(
                    response
                        .map(|r| r.status().as_u16())
                        .map_err(|e| e.to_string()),
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let done = Instant::now();
        assert!(received == blob, "the blob was cut or altered");
        assert!(
            done - started > Duration::from_secs(2),
            "the pull took only {:?}; it proves nothing about the idle bound",
            done - started
        );
        assert_eq!(
            second,
            Some(Ok(200)),
            "a request while another was in flight"
        );

        // Then, with nothing in flight, the server closes the connection.
        let ended = tokio::time::timeout(Duration::from_secs(10), ended)
            .await
            .expect("the idle connection is still open 10 s after its last request")
            .expect("connection task");
        assert!(
            ended > started + Duration::from_secs(2),
            "closed while busy"
        );
        assert!(
            ended < done + Duration::from_secs(5),
            "closed {:?} after its last request",
            ended - done
        );
    });
}

fn client_config(ca: &Ca, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.issuer.der().clone()).expect("CA root");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

fn server_name() -> rustls::pki_types::ServerName<'static> {
    rustls::pki_types::ServerName::try_from("127.0.0.1").expect("server name")
}

/// A TLS handshake with a bare rustls client offering `alpn`; the session and its socket,
/// nothing sent after the handshake.
fn handshake(host: &str, ca: &Ca, alpn: &[u8]) -> (rustls::ClientConnection, TcpStream) {
    let config = client_config(ca, alpn);
    let mut session = rustls::ClientConnection::new(config, server_name()).expect("session");
    let mut tcp = connect(host);
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    while session.is_handshaking() {
        session.complete_io(&mut tcp).expect("TLS handshake");
    }
    (session, tcp)
}

#[test]
fn without_tls_files_berth_serves_plain_http_as_before() {
    let app = TestApp::start();
    assert!(app.base.starts_with("http://"), "{}", app.base);
    let response = app.client().get(app.url("/v2/")).send().expect("GET /v2/");
    assert_eq!(
        (response.status().as_u16(), response.version()),
        (200, Version::HTTP_11)
    );
}

#[test]
fn bad_tls_files_stop_the_start_with_an_error_naming_them() {
    let ca = Ca::new("berth test CA");
    let (good, other) = (ca.server(), ca.server());
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = |name: &str, contents: &str| {
        let path = tmp.path().join(name);
        std::fs::write(&path, contents).expect("write");
        path.display().to_string()
    };
    let cert = file("cert.pem", &good.cert);
    let key = file("key.pem", &good.key);
    let other_key = file("other.key", &other.key);
    let garbage = file("garbage.pem", "not PEM at all\n");
    let missing = tmp.path().join("missing.pem").display().to_string();
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["--tls-cert", &missing, "--tls-key", &key],
            vec![&missing],
        ),
        (
            vec!["--tls-cert", &garbage, "--tls-key", &key],
            vec![&garbage, "no PEM certificate"],
        ),
        (
            vec!["--tls-cert", &cert, "--tls-key", &garbage],
            vec![&garbage, "no PEM private key"],
        ),
        (
            vec!["--tls-cert", &cert, "--tls-key", &other_key],
            vec![&cert, &other_key, "KeyMismatch"],
        ),
        (vec!["--tls-cert", &cert], vec!["tls_key"]),
        (
            vec![
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--tls-client-ca",
                &garbage,
            ],
            vec![&garbage, "client CA"],
        ),
    ];
    for (args, expected) in cases {
        let mut cmd = clean_command(tmp.path());
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(tmp.path().join("data"))
            .args(&args);
        let out = output_within(cmd, &format!("berth serve {args:?}"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with {args:?}");
        for needle in expected {
            assert!(err.contains(needle), "{args:?}: {needle:?} not in:\n{err}");
        }
    }
}
