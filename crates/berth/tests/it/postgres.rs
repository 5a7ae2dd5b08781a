//! Berth on PostgreSQL, end to end: `berth migrate`, a push and pull through a real server whose
//! metadata lives in PostgreSQL, and an outage of PostgreSQL itself (503, then recovery with no
//! restart of berth).
//!
//! The first test uses the server named by `BERTH_TEST_POSTGRES_URL` (scripts/postgres.sh starts
//! one); the outage test stops and starts a private cluster of its own, listening only on a Unix
//! socket in a temporary directory, so it disturbs no other test.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{TestApp, berth_bin, error_code, push_image, sha256};

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

/// Runs SQL on the server named by `BERTH_TEST_POSTGRES_URL`; returns that URL.
pub(crate) fn admin_sql(sql: &str) -> String {
    let url = std::env::var("BERTH_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!(
            "BERTH_TEST_POSTGRES_URL is not set. The PostgreSQL tests need a server: run \
             `eval \"$(bash scripts/postgres.sh)\"` first (scripts/test.sh does), or set it to a \
             superuser URL such as postgres://postgres@127.0.0.1:54329/postgres"
        )
    });
    admin_sql_at(&url, sql);
    url
}

/// Runs SQL as a superuser at `url`.
pub(crate) fn admin_sql_at(url: &str, sql: &str) {
    block_on(async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to {url}: {e:?}"));
        tokio::spawn(conn);
        // CREATE DATABASE copies template1 and fails while another session is copying it
        // ("source database is being accessed by other users"): tests create databases in
        // parallel, so a refusal is retried for a while.
        let mut tries = 0;
        loop {
            match client.batch_execute(sql).await {
                Ok(()) => break,
                Err(_) if sql.starts_with("CREATE DATABASE") && tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{sql}: {e:?}"),
            }
        }
    });
}

/// `url` with its database name replaced.
pub(crate) fn with_database(url: &str, db: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let end = base[after_scheme..]
        .find('/')
        .map_or(base.len(), |i| after_scheme + i);
    match query {
        Some(q) => format!("{}/{db}?{q}", &base[..end]),
        None => format!("{}/{db}", &base[..end]),
    }
}

fn migrate(url: &str) -> std::process::Output {
    Command::new(berth_bin())
        .args(["migrate", "--metadata", url])
        .env("RUST_LOG", "info")
        .output()
        .expect("run berth migrate")
}

#[test]
fn push_and_pull_with_metadata_in_postgres() {
    let db = format!("berth_it_{}", uuid::Uuid::new_v4().simple());
    let admin = admin_sql(&format!("CREATE DATABASE {db}"));
    let url = with_database(&admin, &db);

    // `berth migrate` applies the schema and exits; a second run finds nothing to do.
    for _ in 0..2 {
        let out = migrate(&url);
        assert!(out.status.success(), "berth migrate: {out:?}");
    }

    let mut app = TestApp::builder().arg("--metadata").arg(&url).start();
    let (digest, manifest) = push_image(&app, "team/app", "v1", "postgres");
    for _ in 0..2 {
        let got = app.get("/v2/team/app/manifests/v1");
        got.assert_status(200);
        assert_eq!(got.body, manifest);
        assert_eq!(got.header("docker-content-digest"), Some(digest.as_str()));
        let layer = b"layer bytes for postgres";
        let blob = app.get(&format!("/v2/team/app/blobs/{}", sha256(layer)));
        blob.assert_status(200);
        assert_eq!(blob.body, layer);
        let tags = app.get("/v2/team/app/tags/list");
        assert_eq!(tags.json()["tags"], serde_json::json!(["v1"]));
        let catalog = app.get("/v2/_catalog");
        assert_eq!(
            catalog.json()["repositories"],
            serde_json::json!(["team/app"])
        );
        assert!(
            !app.data_dir().join("metadata.db").exists(),
            "SQLite was used"
        );
        // Everything above must come back from PostgreSQL after a restart.
        app.restart();
    }
    drop(app);
    admin_sql(&format!("DROP DATABASE {db} WITH (FORCE)"));
}

/// A PostgreSQL cluster of this test's own, reachable only through a Unix socket in its
/// temporary directory. As root, it runs as Debian's `postgres` user (initdb refuses root).
pub(crate) struct Cluster {
    tmp: tempfile::TempDir,
    bin: PathBuf,
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn server_bin_dir() -> PathBuf {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!("no PostgreSQL server under /usr/lib/postgresql: run scripts/postgres.sh")
    })
}

impl Cluster {
    pub(crate) fn init() -> Cluster {
        let tmp = tempfile::Builder::new()
            .prefix("berth-pg-")
            .tempdir()
            .expect("tempdir");
        if is_root() {
            let ok = Command::new("chown")
                .arg("postgres:postgres")
                .arg(tmp.path())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown postgres {}", tmp.path().display());
        }
        let cluster = Cluster {
            tmp,
            bin: server_bin_dir(),
        };
        let data = cluster.data();
        cluster.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
            ],
        );
        cluster
    }

    fn socket_dir(&self) -> &Path {
        self.tmp.path()
    }

    fn data(&self) -> String {
        self.tmp.path().join("data").display().to_string()
    }

    /// The URL berth is given: the socket directory as `host`.
    pub(crate) fn url(&self) -> String {
        format!(
            "postgres:///postgres?host={}&user=postgres",
            self.socket_dir().display()
        )
    }

    fn run(&self, program: &str, args: &[&str]) {
        let bin = self.bin.join(program);
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin);
            c
        } else {
            Command::new(bin)
        };
        let out = cmd.args(args).output().expect("run a PostgreSQL tool");
        assert!(out.status.success(), "{program} {args:?}: {out:?}");
    }

    pub(crate) fn start(&self) {
        let options = format!(
            "-c listen_addresses='' -c unix_socket_directories='{}' -c fsync=off",
            self.socket_dir().display()
        );
        let log = self.tmp.path().join("server.log").display().to_string();
        let data = self.data();
        self.run(
            "pg_ctl",
            &["-D", &data, "-l", &log, "-o", &options, "-w", "start"],
        );
    }

    pub(crate) fn stop(&self) {
        let data = self.data();
        self.run("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"]);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.data();
        if Path::new(&data).join("postmaster.pid").exists() {
            let _ = std::panic::catch_unwind(|| {
                self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"])
            });
        }
    }
}

#[test]
fn postgres_outage_answers_503_and_berth_recovers_when_it_returns() {
    let cluster = Cluster::init();
    cluster.start();
    let app = TestApp::builder()
        .arg("--metadata")
        .arg(cluster.url())
        .env("BERTH_METADATA_CONNECT_TIMEOUT_SECS", "2")
        .start();
    let (_, manifest) = push_image(&app, "team/app", "v1", "before");
    app.get("/v2/team/app/manifests/v1").assert_status(200);

    cluster.stop();
    for path in ["/v2/team/app/manifests/v1", "/v2/team/app/tags/list"] {
        let reply = app.get(path);
        reply.assert_status(503);
        assert_eq!(error_code(&reply.text()), "UNAVAILABLE");
    }
    let started = std::time::Instant::now();
    let push = app
        .client()
        .post(app.url("/v2/team/app/blobs/uploads/"))
        .send()
        .expect("POST upload");
    assert_eq!(push.status().as_u16(), 503, "start upload while down");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "a call while PostgreSQL is down took {:?}",
        started.elapsed()
    );

    // Back up: the very next calls succeed, on connections the pool opens anew.
    cluster.start();
    let got = app.get("/v2/team/app/manifests/v1");
    got.assert_status(200);
    assert_eq!(got.body, manifest);
    push_image(&app, "team/app", "v2", "after");
    let tags = app.get("/v2/team/app/tags/list");
    assert_eq!(tags.json()["tags"], serde_json::json!(["v1", "v2"]));
}
