//! The event log end to end: changes and logins are recorded with who made them, exported as
//! JSON lines, and `berth audit verify` finds an edited or deleted entry.

use std::process::Command;

use serde_json::Value;

use crate::auth::{admin, cast, push_as};
use crate::support::*;

fn export(data: &std::path::Path) -> Vec<Value> {
    admin(data, &["audit", "export", "--since", "2000-01-01"], "")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

fn verify(data: &std::path::Path) -> (bool, String) {
    verify_on(&["--data-dir".to_string(), data.display().to_string()])
}

/// `berth audit verify` on a data directory or a database: whether it passed, and what it said.
fn verify_on(target: &[String]) -> (bool, String) {
    let mut cmd = clean_command(&std::env::temp_dir());
    cmd.args(["audit", "verify"]).args(target);
    let out = output_within(cmd, "berth audit verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn sql(data: &std::path::Path, statement: &str) {
    let status = Command::new("sqlite3")
        .arg(data.join("metadata.db"))
        .arg(statement)
        .status()
        .expect("sqlite3 (apt-get install sqlite3)");
    assert!(status.success(), "{statement}");
}

#[test]
fn changes_and_logins_are_recorded_and_the_chain_detects_tampering() {
    let c = cast();
    let app = &c.app;
    let data = app.data_dir().to_path_buf();
    push_as(app, "alice", "alice-pw", "team/app", "1").assert_status(201);
    send(
        app.client()
            .delete(app.url("/v2/team/app/manifests/1"))
            .basic_auth("alice", Some("alice-pw")),
    )
    .assert_status(202);
    send(
        app.client()
            .get(app.url("/v2/"))
            .basic_auth("bob", Some("wrong")),
    )
    .assert_status(401);
    let reply = send(
        app.client()
            .get(app.url("/auth/token?service=berth&scope=repository:team/app:pull"))
            .basic_auth("bob", Some("bob-pw")),
    );
    reply.assert_status(200);

    // A token's event is queued, not awaited by its answer: it lands within moments.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let events = loop {
        let events = export(&data);
        if events.iter().any(|e| e["kind"] == "token.issued")
            || std::time::Instant::now() > deadline
        {
            break events;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let find = |kind: &str| {
        events
            .iter()
            .find(|e| e["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} event in {events:#?}"))
    };
    let pushed = find("manifest.pushed");
    assert_eq!(pushed["actor"], "user:alice");
    assert_eq!(pushed["repository"], "team/app");
    assert_eq!(pushed["tags"], serde_json::json!(["1"]));
    assert_eq!(pushed["client_addr"], "127.0.0.1");
    assert!(
        pushed["digest"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:"))
    );
    assert_eq!(find("tag.deleted")["tags"], serde_json::json!(["1"]));
    assert_eq!(find("login.succeeded")["actor"], "user:alice");
    let failed = find("login.failed");
    assert_eq!(
        (failed["actor"].clone(), failed["result"].clone()),
        ("unverified:bob".into(), "denied".into())
    );
    let issued = find("token.issued");
    assert_eq!(issued["actor"], "user:bob");
    assert!(
        issued["detail"]
            .as_str()
            .is_some_and(|d| d.contains("repository:team/app:pull"))
    );
    // Sequence numbers are dense and each entry names the previous one's hash.
    for pair in events.windows(2) {
        assert_eq!(
            pair[1]["seq"].as_i64(),
            pair[0]["seq"].as_i64().map(|s| s + 1)
        );
        assert_eq!(pair[1]["prev_hash"], pair[0]["hash"]);
    }

    let (ok, text) = verify(&data);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("{} entries", events.len())),
        "{text}"
    );

    // An edited entry is named.
    let seq = pushed["seq"].as_i64().expect("seq");
    sql(
        &data,
        &format!("UPDATE events SET actor = 'user:mallory' WHERE seq = {seq}"),
    );
    let (ok, text) = verify(&data);
    assert!(!ok, "an edit must be found");
    assert!(text.contains(&format!("entry {seq}")), "{text}");
    // A deleted one too.
    sql(&data, &format!("DELETE FROM events WHERE seq = {seq}"));
    let (ok, text) = verify(&data);
    assert!(!ok && text.contains("missing"), "{text}");
}

fn audit_page(app: &TestApp, who: (&str, &str), query: &str) -> Reply {
    send(
        app.client()
            .get(app.url(&format!("/api/v1/audit?{query}")))
            .basic_auth(who.0, Some(who.1)),
    )
}

fn kinds(page: &Value) -> Vec<String> {
    page["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["kind"].as_str().expect("kind").to_string())
        .collect()
}

#[test]
fn permission_changes_are_recorded_and_the_audit_api_scopes_and_pages_them() {
    let c = cast();
    let app = &c.app;
    let admin_creds = ("admin", "admin-pw");
    let alice = ("alice", "alice-pw");
    // A change through the API, by a namespace owner, and one through the CLI (in cast()).
    send(
        app.client()
            .put(app.url("/api/v1/namespaces/team/members/carol"))
            .basic_auth(alice.0, Some(alice.1))
            .body(r#"{"role":"writer"}"#),
    )
    .assert_status(200);
    push_as(app, "alice", "alice-pw", "team/app", "1").assert_status(201);
    push_as(app, "admin", "admin-pw", "lib/base", "1").assert_status(201);

    // The owner's view of their namespace: the member change and the push, not lib's push.
    let reply = audit_page(app, alice, "namespace=team");
    reply.assert_status(200);
    let page: Value = reply.json();
    let seen = kinds(&page);
    assert!(seen.contains(&"member.set".to_string()), "{seen:?}");
    assert!(seen.contains(&"manifest.pushed".to_string()), "{seen:?}");
    assert!(seen.contains(&"robot.created".to_string()), "{seen:?}");
    for e in page["events"].as_array().expect("events") {
        let repo = e["repository"].as_str().unwrap_or_default();
        assert!(repo == "team" || repo.starts_with("team/"), "{e}");
    }
    let member_set = page["events"]
        .as_array()
        .expect("events")
        .iter()
        .find(|e| e["kind"] == "member.set" && e["actor"] == "user:alice")
        .unwrap_or_else(|| panic!("alice's member.set in {page:#}"));
    assert!(
        member_set["detail"]
            .as_str()
            .is_some_and(|d| d.contains("carol") && d.contains("writer")),
        "{member_set}"
    );
    // The CLI's changes name the command line as the actor.
    let all: Value = audit_page(app, admin_creds, "kind=namespace.created").json();
    let created = all["events"].as_array().expect("events");
    assert_eq!(created.len(), 2, "{all:#}");
    assert!(
        created
            .iter()
            .all(|e| e["actor"].as_str().is_some_and(|a| a.starts_with("cli:"))),
        "{all:#}"
    );

    // Not the owner: 403, whether asking about the namespace, a repository or everything.
    audit_page(app, ("bob", "bob-pw"), "namespace=team").assert_status(403);
    audit_page(app, alice, "namespace=lib").assert_status(403);
    audit_page(app, alice, "repository=lib/base").assert_status(403);
    audit_page(app, alice, "").assert_status(403);
    send(app.client().get(app.url("/api/v1/audit"))).assert_status(401);
    // Bad parameters are 400 with a reason.
    audit_page(app, admin_creds, "limit=0").assert_status(400);
    audit_page(app, admin_creds, "since=yesterday").assert_status(400);
    audit_page(app, admin_creds, "colour=blue").assert_status(400);

    // Pages: newest first, each continuing below the previous, together the whole log.
    let everything: Value = audit_page(app, admin_creds, "limit=1000").json();
    let total: Vec<i64> = everything["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["seq"].as_i64().expect("seq"))
        .collect();
    assert!(total.len() > 5, "{total:?}");
    let mut paged = Vec::new();
    let mut query = "limit=2".to_string();
    loop {
        let page: Value = audit_page(app, admin_creds, &query).json();
        paged.extend(
            page["events"]
                .as_array()
                .expect("events")
                .iter()
                .map(|e| e["seq"].as_i64().expect("seq")),
        );
        match page["next"].as_str() {
            Some(next) => query = format!("limit=2&before={next}"),
            None => break,
        }
    }
    assert_eq!(paged, total);
    assert!(total.windows(2).all(|w| w[0] > w[1]), "{total:?}");

    // A time range: everything since a moment ago, nothing before the log began.
    let none: Value = audit_page(app, admin_creds, "until=2000-01-01").json();
    assert_eq!(kinds(&none), Vec::<String>::new());
    // Every entry listed before, and perhaps newer ones: a token.issued event is queued, not
    // awaited, and may land after the listing above.
    let recent: Value = audit_page(app, admin_creds, "since=2000-01-01&limit=1000").json();
    let recent: Vec<i64> = recent["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["seq"].as_i64().expect("seq"))
        .collect();
    assert!(
        total.iter().all(|s| recent.contains(s)),
        "{recent:?} vs {total:?}"
    );
}

/// Where a tamper test's log lives: a data directory (SQLite) or a PostgreSQL database.
enum Log {
    Sqlite(tempfile::TempDir),
    Postgres(String),
}

impl Log {
    fn target(&self) -> Vec<String> {
        match self {
            Log::Sqlite(dir) => vec![
                "--data-dir".into(),
                dir.path().join("data").display().to_string(),
            ],
            Log::Postgres(url) => vec!["--metadata".into(), url.clone()],
        }
    }

    fn berth(&self, args: &[&str], stdin: &str) -> String {
        let tmp = std::env::temp_dir();
        let mut cmd = clean_command(&tmp);
        cmd.args(args).args(self.target());
        crate::auth::run_with_stdin(cmd, stdin)
    }

    fn verify(&self) -> (bool, String) {
        verify_on(&self.target())
    }

    fn sql(&self, statements: &[&str]) {
        match self {
            Log::Sqlite(dir) => {
                for s in statements {
                    sql(&dir.path().join("data"), s);
                }
            }
            Log::Postgres(url) => {
                let url = url.clone();
                let statements: Vec<String> = statements.iter().map(|s| s.to_string()).collect();
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime")
                    .block_on(async move {
                        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                            .await
                            .expect("connect");
                        tokio::spawn(conn);
                        for s in &statements {
                            client
                                .batch_execute(s)
                                .await
                                .unwrap_or_else(|e| panic!("{s}: {e:?}"));
                        }
                    });
            }
        }
    }
}

/// Five changes made through the command line: entries 1 to 5.
fn five_entries(log: &Log) {
    log.berth(&["user", "add", "ann", "--password-stdin"], "ann-pw\n");
    log.berth(&["user", "add", "ben", "--password-stdin"], "ben-pw\n");
    log.berth(&["namespace", "add", "shop"], "");
    log.berth(&["namespace", "grant", "shop", "ann", "writer"], "");
    log.berth(&["user", "rm", "ben"], "");
}

/// Each way of tampering, and the entry `berth audit verify` must name.
const TAMPERING: &[(&str, &[&str], i64)] = &[
    (
        "edit",
        &["UPDATE events SET actor = 'user:mallory' WHERE seq = 3"],
        3,
    ),
    ("delete", &["DELETE FROM events WHERE seq = 3"], 4),
    (
        "insert",
        &[
            "UPDATE events SET seq = seq + 1000 WHERE seq >= 3",
            "UPDATE events SET seq = seq - 999 WHERE seq >= 1003",
            "INSERT INTO events (seq, at_ms, kind, actor, client_addr, user_agent, request_id, \
             repository, digest, tags, size, result, detail, prev_hash, hash) \
             SELECT 3, at_ms, 'login.succeeded', 'user:mallory', client_addr, user_agent, \
             request_id, repository, digest, tags, size, result, detail, prev_hash, hash \
             FROM events WHERE seq = 2",
        ],
        3,
    ),
    (
        "reorder",
        &[
            "UPDATE events SET seq = -1 WHERE seq = 3",
            "UPDATE events SET seq = 3 WHERE seq = 4",
            "UPDATE events SET seq = 4 WHERE seq = -1",
        ],
        3,
    ),
    ("truncate", &["DELETE FROM events WHERE seq = 5"], 5),
];

fn tampering_is_named(new_log: impl Fn(&str) -> Log) {
    for (how, statements, bad) in TAMPERING {
        let log = new_log(how);
        five_entries(&log);
        let (ok, text) = log.verify();
        assert!(
            ok && text.contains("5 entries"),
            "{how}: before tampering: {text}"
        );
        log.sql(statements);
        let (ok, text) = log.verify();
        assert!(!ok, "{how}: verify passed a tampered log: {text}");
        assert!(
            text.contains(&format!("entry {bad}")),
            "{how}: expected entry {bad} to be named: {text}"
        );
    }
}

#[test]
fn audit_verify_names_each_kind_of_tampering_on_sqlite() {
    tampering_is_named(|_| Log::Sqlite(tempfile::tempdir().expect("tempdir")));
}

#[test]
fn audit_verify_names_each_kind_of_tampering_on_postgres() {
    tampering_is_named(|how| {
        let db = format!("berth_tamper_{how}_{}", std::process::id());
        crate::postgres::admin_sql(&format!("DROP DATABASE IF EXISTS {db}"));
        let url = crate::postgres::with_database(
            &crate::postgres::admin_sql(&format!("CREATE DATABASE {db}")),
            &db,
        );
        Log::Postgres(url)
    });
}

#[test]
fn pulls_are_recorded_when_switched_on_one_in_n() {
    let c = crate::auth::cast_with(TestApp::builder().arg("--pull-events-every").arg("2"));
    let app = &c.app;
    push_as(app, "alice", "alice-pw", "team/app", "1").assert_status(201);
    for _ in 0..4 {
        send(
            app.client()
                .get(app.url("/v2/team/app/manifests/1"))
                .header("accept", "application/vnd.oci.image.manifest.v1+json")
                .basic_auth("bob", Some("bob-pw")),
        )
        .assert_status(200);
    }
    // A HEAD is not a pull.
    send(
        app.client()
            .head(app.url("/v2/team/app/manifests/1"))
            .basic_auth("bob", Some("bob-pw")),
    )
    .assert_status(200);
    // Pull events are queued, not awaited: give the recorder a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let pulled = loop {
        let page: Value = audit_page(app, ("admin", "admin-pw"), "kind=manifest.pulled").json();
        let events = page["events"].as_array().expect("events").clone();
        if events.len() >= 2 || std::time::Instant::now() > deadline {
            break events;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(pulled.len(), 2, "one in two of four GETs: {pulled:#?}");
    for e in &pulled {
        assert_eq!(e["actor"], "user:bob");
        assert_eq!(e["repository"], "team/app");
        assert_eq!(e["tags"], serde_json::json!(["1"]));
    }
    // None was dropped, and /metrics says so.
    let metrics = app.get("/metrics").assert_status(200).text();
    assert!(
        metrics.lines().any(|l| l == "berth_events_dropped_total 0"),
        "{metrics}"
    );
}

#[test]
fn pruned_entries_leave_a_signed_checkpoint_the_chain_verifies_from() {
    let log = Log::Sqlite(tempfile::tempdir().expect("tempdir"));
    five_entries(&log);
    // The registry has no signing key yet (access control is off): pruning makes one, a sixth
    // entry (key.rotated), and prunes it with the rest.
    let out = log.berth(&["audit", "prune", "--before", "2999-01-01"], "");
    assert!(out.contains("pruned 6 entries"), "{out}");
    // New entries chain on from the checkpoint.
    log.berth(&["user", "add", "cat", "--password-stdin"], "cat-pw\n");
    let (ok, text) = log.verify();
    assert!(ok, "{text}");
    assert!(
        text.contains("1 entries after the checkpoint at entry 6"),
        "{text}"
    );
    // A forged checkpoint (its hash changed to cover other entries) is named.
    log.sql(&["UPDATE event_checkpoints SET hash = 'forged'"]);
    let (ok, text) = log.verify();
    assert!(!ok, "{text}");
    assert!(
        text.contains("entry 6") && text.contains("not genuine"),
        "{text}"
    );
    // So is pruning without a checkpoint (the oldest entries simply deleted).
    log.sql(&["DELETE FROM event_checkpoints"]);
    let (ok, text) = log.verify();
    assert!(!ok && text.contains("missing"), "{text}");
}
