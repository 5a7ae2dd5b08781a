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
    let mut cmd = clean_command(data.parent().expect("parent"));
    cmd.args(["audit", "verify", "--data-dir"]).arg(data);
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

    let events = export(&data);
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
