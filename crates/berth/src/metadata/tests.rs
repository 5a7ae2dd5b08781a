//! The suite every engine runs ([`metadata_suite`]), then what is particular to each: SQLite's
//! statement stability, PostgreSQL's collation, concurrent migration and racing nodes, and for
//! both, databases created by the old (version 1) schema.

use std::path::Path;

use super::*;

/// The value, or a panic naming the error: an error must fail the test, never pass as "none".
#[track_caller]
pub(crate) fn must<T>(r: Result<T, MetadataError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

pub(crate) fn name(s: &str) -> RepositoryName {
    s.parse().unwrap_or_else(|e| panic!("{e}"))
}

pub(crate) fn tag(s: &str) -> Tag {
    s.parse().unwrap_or_else(|e| panic!("{e}"))
}

pub(crate) fn manifest(seed: &str, blobs: Vec<Digest>, subject: Option<Digest>) -> NewManifest {
    let bytes = format!("{{\"seed\":\"{seed}\"}}").into_bytes();
    NewManifest {
        digest: Digest::sha256_of(&bytes),
        media_type: oci::media_type::OCI_MANIFEST.into(),
        bytes,
        blobs,
        declared_sizes: vec![],
        children: vec![],
        subject,
        artifact_type: Some("application/x-test".into()),
        annotations: Some([("k".to_string(), seed.to_string())].into()),
    }
}

const ALL: Page<'static> = Page {
    last: None,
    limit: None,
};

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The event log: appends chain, queries filter newest first, and verify names the first
/// edited, deleted or removed-from-the-end entry.
pub(crate) async fn events_suite(store: &Metadata) {
    use super::events::{self, EventFilter, NewEvent};
    let ev = |kind: &str, actor: &str, repo: &str| NewEvent {
        kind: kind.into(),
        actor: actor.into(),
        repository: Some(repo.into()),
        tags: vec!["v1".into()],
        size: Some(7),
        result: "ok".into(),
        ..NewEvent::default()
    };
    let all = [
        ev("manifest.pushed", "user:alice", "team/app"),
        ev("tag.deleted", "user:bob", "team/app"),
        ev("manifest.pushed", "user:alice", "lib/base"),
        ev("manifest.deleted", "robot:team+ci", "team/web"),
    ];
    for e in &all {
        must(store.write(|tx| Box::pin(events::append(tx, e))).await);
    }
    let verify = || async {
        must(events::verify(store, 2, |_| Ok(())).await)
            .map(|v| (v.entries, v.from_checkpoint.map(|c| c.seq)))
    };
    assert_eq!(verify().await, Ok((4, None)));
    let alice = EventFilter {
        actor: Some("user:alice".into()),
        ..EventFilter::default()
    };
    let found = must(
        store
            .read(|tx| Box::pin(events::query(tx, &alice, 10)))
            .await,
    );
    assert_eq!(found.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 1]);
    assert_eq!(found[1].event, all[0]);
    let team = EventFilter {
        namespace: Some("team".into()),
        before_seq: Some(4),
        ..EventFilter::default()
    };
    let found = must(
        store
            .read(|tx| Box::pin(events::query(tx, &team, 10)))
            .await,
    );
    assert_eq!(found.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 1]);
    // Each statement shape (the driving filter), with the others checked on its rows.
    let filter = |actor: Option<&str>, repository: Option<&str>, kind: Option<&str>| EventFilter {
        actor: actor.map(Into::into),
        repository: repository.map(Into::into),
        kind: kind.map(Into::into),
        ..EventFilter::default()
    };
    let pushed = Some("manifest.pushed");
    let cases: Vec<(EventFilter, Vec<i64>)> = vec![
        (filter(Some("user:alice"), None, pushed), vec![3, 1]),
        (filter(Some("user:bob"), None, pushed), vec![]),
        (filter(Some("user:bob"), Some("team/app"), None), vec![2]),
        (
            filter(Some("user:alice"), Some("team/app"), pushed),
            vec![1],
        ),
        (filter(None, None, pushed), vec![3, 1]),
        (
            EventFilter {
                kind: pushed.map(Into::into),
                before_seq: Some(3),
                ..EventFilter::default()
            },
            vec![1],
        ),
        (
            EventFilter {
                since_ms: Some(0),
                until_ms: Some(i64::MAX),
                ..EventFilter::default()
            },
            vec![4, 3, 2, 1],
        ),
        (
            EventFilter {
                since_ms: Some(i64::MAX),
                ..EventFilter::default()
            },
            vec![],
        ),
    ];
    for (filter, want) in &cases {
        let found = must(
            store
                .read(|tx| Box::pin(events::query(tx, filter, 10)))
                .await,
        );
        let seqs: Vec<i64> = found.iter().map(|e| e.seq).collect();
        assert_eq!(&seqs, want, "{filter:?}");
    }

    // Pruning: the two oldest go behind a signed checkpoint; the rest still verifies from it,
    // and only if the checkpoint's signature holds.
    let signer = |text: &str| Ok(("k1".to_string(), format!("signed:{text}")));
    let pruned = must(
        store
            .write(|tx| Box::pin(events::prune(tx, i64::MAX, 2, &signer)))
            .await,
    );
    assert_eq!(pruned, 2);
    assert_eq!(verify().await, Ok((2, Some(2))));
    let genuine = |c: &events::Checkpoint| {
        if c.signature
            == format!(
                "signed:{}",
                events::Checkpoint::signed_text(c.seq, &c.hash, c.at_ms)
            )
        {
            Ok(())
        } else {
            Err("forged".to_string())
        }
    };
    assert!(must(events::verify(store, 2, genuine).await).is_ok());
    let refused = must(events::verify(store, 2, |_| Err("forged".to_string())).await);
    assert_eq!(refused.map_err(|b| b.seq), Err(2));

    // Tampering, each kind found and named.
    must(
        store
            .write(|tx| {
                Box::pin(async move {
                    tx.execute(
                        "UPDATE events SET actor = 'user:mallory' WHERE seq = 3",
                        &[],
                    )
                    .await
                })
            })
            .await,
    );
    let broken = verify().await.expect_err("an edit");
    assert_eq!(broken.seq, 3, "{broken:?}");
    // Pruning refuses to cover up a broken chain.
    let refused = store
        .write(|tx| Box::pin(events::prune(tx, i64::MAX, 10, &signer)))
        .await;
    assert!(refused.is_err(), "{refused:?}");
    must(
        store
            .write(|tx| {
                Box::pin(async move { tx.execute("DELETE FROM events WHERE seq = 3", &[]).await })
            })
            .await,
    );
    let broken = verify().await.expect_err("a deletion");
    assert_eq!(broken.seq, 4, "{broken:?}");
    assert!(broken.reason.contains("missing"), "{broken:?}");
}

/// Accounts, namespaces, members, credentials, keys: each change bumps the generation.
pub(crate) async fn access_suite(store: &Metadata) {
    use super::access::{self as q, AccountRow, CredentialRow};
    let generation = || async { must(store.read(|tx| Box::pin(q::generation(tx))).await) };
    let g0 = generation().await;
    let user = AccountRow {
        id: 0,
        name: "alice".into(),
        kind: "user".into(),
        password_hash: Some("h".into()),
        admin: false,
        namespace: None,
        grants: None,
        expires_at: None,
        created_at: 1,
    };
    let u = &user;
    let id = must(store.write(|tx| Box::pin(q::insert_account(tx, u))).await).expect("new");
    assert_eq!(
        must(store.write(|tx| Box::pin(q::insert_account(tx, u))).await),
        None,
        "a taken name"
    );
    let g1 = generation().await;
    assert!(g1 > g0);
    let found = must(
        store
            .read(|tx| Box::pin(q::account_by_name(tx, "alice")))
            .await,
    );
    assert_eq!(found, Some(AccountRow { id, ..user.clone() }));
    assert!(must(
        store
            .write(|tx| Box::pin(q::set_password_hash(tx, "alice", "h2")))
            .await
    ));
    assert!(!must(
        store
            .write(|tx| Box::pin(q::set_password_hash(tx, "bob", "h2")))
            .await
    ));

    assert!(must(
        store
            .write(|tx| Box::pin(q::insert_namespace(tx, "team", false, 5)))
            .await
    ));
    assert!(!must(
        store
            .write(|tx| Box::pin(q::insert_namespace(tx, "team", true, 5)))
            .await
    ));
    assert!(must(
        store
            .write(|tx| Box::pin(q::insert_namespace(tx, "lib", true, 5)))
            .await
    ));
    assert_eq!(
        must(store.read(|tx| Box::pin(q::public_namespaces(tx))).await),
        strings(&["lib"])
    );
    must(
        store
            .write(|tx| Box::pin(q::set_member(tx, "team", id, "reader")))
            .await,
    );
    must(
        store
            .write(|tx| Box::pin(q::set_member(tx, "team", id, "owner")))
            .await,
    );
    assert_eq!(
        must(store.read(|tx| Box::pin(q::memberships(tx, id))).await),
        vec![("team".to_string(), "owner".to_string())]
    );
    assert_eq!(
        must(store.read(|tx| Box::pin(q::members(tx, "team"))).await),
        vec![("alice".to_string(), "owner".to_string())]
    );

    let cred = CredentialRow {
        id: "c1".into(),
        account_id: id,
        kind: "personal".into(),
        secret_hash: "x".into(),
        description: "ci".into(),
        grants: None,
        service: None,
        created_at: 10,
        expires_at: Some(1000),
        last_used_at: None,
        revoked_at: None,
    };
    let c = &cred;
    must(
        store
            .write(|tx| Box::pin(q::insert_credential(tx, c)))
            .await,
    );
    must(
        store
            .write(|tx| Box::pin(q::touch_credential(tx, "c1", 100, 60)))
            .await,
    );
    must(
        store
            .write(|tx| Box::pin(q::touch_credential(tx, "c1", 120, 60)))
            .await,
    );
    let listed = must(store.read(|tx| Box::pin(q::list_credentials(tx, id))).await);
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0].last_used_at,
        Some(100),
        "touches within the granularity write nothing"
    );
    let before = generation().await;
    assert!(must(
        store
            .write(|tx| Box::pin(q::revoke_credential(tx, "c1", 200)))
            .await
    ));
    assert!(!must(
        store
            .write(|tx| Box::pin(q::revoke_credential(tx, "c1", 201)))
            .await
    ));
    assert!(generation().await > before, "a revocation tells every node");

    let key = |kid: &str, at: i64| q::SigningKeyRow {
        kid: kid.into(),
        algorithm: "ES256".into(),
        private_key: vec![1, 2],
        public_key: vec![3],
        created_at: at,
        retired_at: None,
    };
    let (k1, k2) = (key("k1", 100), key("k2", 200));
    must(
        store
            .write(|tx| Box::pin(q::rotate_signing_key(tx, &k1)))
            .await,
    );
    must(
        store
            .write(|tx| Box::pin(q::rotate_signing_key(tx, &k2)))
            .await,
    );
    let keys = must(store.read(|tx| Box::pin(q::signing_keys(tx, 0))).await);
    assert_eq!(
        keys.iter()
            .map(|k| (k.kid.as_str(), k.retired_at))
            .collect::<Vec<_>>(),
        vec![("k2", None), ("k1", Some(200))],
        "the live key first; the old one retired when the new one started"
    );
    let keys = must(store.read(|tx| Box::pin(q::signing_keys(tx, 201))).await);
    assert_eq!(keys.len(), 1, "keys retired long enough ago are not loaded");

    // Removing the account removes its memberships and credentials.
    assert!(must(
        store
            .write(|tx| Box::pin(q::delete_account(tx, "alice")))
            .await
    ));
    assert_eq!(
        must(store.read(|tx| Box::pin(q::members(tx, "team"))).await),
        vec![]
    );
    assert_eq!(
        must(
            store
                .read(|tx| Box::pin(q::credential_by_id(tx, "c1")))
                .await
        ),
        None
    );
}

/// Webhook subscriptions: one lease holder at a time, every state change fenced by the
/// lease, cursors that only move forward, parking and replay.
pub(crate) async fn webhooks_suite(store: &Metadata) {
    use super::events::{self, NewEvent};
    use super::webhooks::{self as hooks, Attempt, NewWebhook, Outcome};
    let append = |n: usize| async move {
        for _ in 0..n {
            let e = NewEvent {
                kind: "manifest.pushed".into(),
                actor: "test".into(),
                result: "ok".into(),
                ..NewEvent::default()
            };
            let e = &e;
            must(
                store
                    .write(|tx| Box::pin(async move { events::append(tx, e).await }))
                    .await,
            );
        }
    };
    append(2).await;
    let new = NewWebhook {
        id: "wh_1".into(),
        namespace: Some("team".into()),
        url: "http://127.0.0.1:9/".into(),
        secret: "whsec_x".into(),
        events: vec!["io.berth.push".into()],
        repositories: vec!["team/*".into()],
        origin: "api",
    };
    let n = &new;
    assert!(must(
        store.write(|tx| Box::pin(hooks::insert(tx, n, 100))).await
    ));
    assert!(!must(
        store.write(|tx| Box::pin(hooks::insert(tx, n, 100))).await
    ));
    let get = || async {
        must(store.read(|tx| Box::pin(hooks::get(tx, "wh_1"))).await)
            .unwrap_or_else(|| panic!("gone"))
    };
    let row = get().await;
    assert_eq!(
        row.state.cursor_seq, 2,
        "a new subscription starts at the head"
    );
    assert_eq!(
        (row.events.clone(), row.namespace.clone()),
        (new.events.clone(), new.namespace.clone())
    );
    append(3).await;

    let lease = |owner: &'static str, ttl: i64| async move {
        must(
            store
                .write(|tx| Box::pin(hooks::take_lease(tx, "wh_1", owner, ttl)))
                .await,
        )
    };
    assert!(lease("a", 60_000).await);
    assert!(lease("a", 60_000).await, "the holder renews");
    assert!(!lease("b", 60_000).await, "another node waits");
    let record = |owner: &'static str, attempt: Attempt, outcome: Outcome<'static>| async move {
        must(
            store
                .write(|tx| Box::pin(hooks::record(tx, "wh_1", owner, attempt, outcome, 5)))
                .await,
        )
    };
    let first = Attempt {
        seq: 3,
        replay: false,
        failures: 0,
    };
    assert!(
        !record("b", first, Outcome::Delivered { latency_ms: 1 }).await,
        "fenced"
    );
    assert_eq!(get().await.state.cursor_seq, 2);
    let failed = Outcome::Failed {
        error: "HTTP 500",
        next_attempt_ms: 99,
    };
    assert!(
        record(
            "a",
            Attempt {
                failures: 1,
                ..first
            },
            failed
        )
        .await
    );
    let s = get().await.state;
    assert_eq!(
        (s.cursor_seq, s.attempt_seq, s.failures, s.next_attempt_ms),
        (2, 3, 1, 99)
    );
    assert_eq!(s.last_error.as_deref(), Some("HTTP 500"));
    assert!(
        record(
            "a",
            Attempt {
                failures: 2,
                ..first
            },
            Outcome::Parked { error: "HTTP 500" }
        )
        .await
    );
    let s = get().await.state;
    assert_eq!(
        (s.cursor_seq, s.failures, s.failed_attempts),
        (3, 0, 2),
        "parked: the cursor moves on"
    );
    assert!(
        record(
            "a",
            Attempt {
                seq: 4,
                replay: false,
                failures: 0
            },
            Outcome::Delivered { latency_ms: 7 }
        )
        .await
    );
    let s = get().await.state;
    assert_eq!(
        (s.cursor_seq, s.delivered, s.last_latency_ms),
        (4, 1, Some(7))
    );
    assert!(
        !must(
            store
                .write(|tx| Box::pin(hooks::skip_to(tx, "wh_1", "a", 3)))
                .await
        ),
        "never back"
    );
    assert!(must(
        store
            .write(|tx| Box::pin(hooks::skip_to(tx, "wh_1", "a", 5)))
            .await
    ));

    // Parked, replayed, delivered: gone from the parked list; the cursor stays.
    let parked = must(
        store
            .read(|tx| Box::pin(hooks::parked(tx, "wh_1", 0, 10)))
            .await,
    );
    assert_eq!(parked.len(), 1);
    assert_eq!(
        (parked[0].seq, parked[0].attempts, parked[0].replay),
        (3, 2, false)
    );
    assert_eq!(
        must(
            store
                .read(|tx| Box::pin(hooks::next_replay(tx, "wh_1")))
                .await
        ),
        None
    );
    assert_eq!(
        must(
            store
                .write(|tx| Box::pin(hooks::replay_all(tx, "wh_1")))
                .await
        ),
        1
    );
    assert_eq!(
        must(
            store
                .read(|tx| Box::pin(hooks::parked_counts(tx, "wh_1")))
                .await
        ),
        (1, 1)
    );
    assert_eq!(
        must(
            store
                .read(|tx| Box::pin(hooks::next_replay(tx, "wh_1")))
                .await
        ),
        Some(3)
    );
    let replay = Attempt {
        seq: 3,
        replay: true,
        failures: 0,
    };
    assert!(record("a", replay, Outcome::Delivered { latency_ms: 1 }).await);
    assert_eq!(
        must(
            store
                .read(|tx| Box::pin(hooks::parked_counts(tx, "wh_1")))
                .await
        ),
        (0, 0)
    );
    assert_eq!(get().await.state.cursor_seq, 5);

    // A released lease, or an expired one, is free for another node.
    must(
        store
            .write(|tx| Box::pin(hooks::release_lease(tx, "wh_1", "a")))
            .await,
    );
    assert!(lease("b", 1).await);
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert!(lease("a", 60_000).await, "an expired lease is taken over");
    assert!(
        !record(
            "b",
            Attempt {
                seq: 6,
                replay: false,
                failures: 0
            },
            Outcome::Delivered { latency_ms: 1 }
        )
        .await
    );

    assert_eq!(
        must(store.read(|tx| Box::pin(hooks::ids(tx))).await),
        ["wh_1"]
    );
    assert!(must(
        store.write(|tx| Box::pin(hooks::delete(tx, "wh_1"))).await
    ));
    assert!(must(store.read(|tx| Box::pin(hooks::list(tx))).await).is_empty());
}

async fn usage_of(store: &Metadata, ns: &str) -> u64 {
    must(store.read(|tx| Box::pin(quotas::quota_of(tx, ns))).await).usage_bytes
}

/// Reconciles without fixing and asserts nothing drifted.
async fn assert_no_drift(store: &Metadata) {
    let checks = must(
        store
            .write(|tx| Box::pin(quotas::reconcile(tx, false)))
            .await,
    );
    let drifted: Vec<_> = checks.iter().filter(|c| c.drifted()).collect();
    assert!(drifted.is_empty(), "drift: {drifted:?}");
}

/// Usage per namespace: shared blobs count once per namespace whatever shares them, manifests
/// count their bytes, and only manifest rows being added or removed change it. The limit check
/// rolls a push back whole.
pub(crate) async fn quota_suite(store: &Metadata) {
    let (a, b, other) = (name("acct/a"), name("acct/b"), name("other/c"));
    let blob = |s: &str| Digest::sha256_of(s.as_bytes());
    let (base, l1, l2, l3, c1, c2, c3) = (
        blob("base"),
        blob("l1"),
        blob("l2"),
        blob("l3"),
        blob("c1"),
        blob("c2"),
        blob("c3"),
    );
    for (repo, digest, size) in [
        (&a, &base, 1000),
        (&a, &l1, 100),
        (&a, &l2, 200),
        (&a, &c1, 1),
        (&a, &c2, 2),
        (&b, &base, 1000),
        (&b, &l3, 300),
        (&b, &c3, 3),
        (&other, &base, 1000),
    ] {
        must(store.link_blob(repo, digest, size).await);
    }
    // Linked but unreferenced blobs are not charged.
    assert_eq!(usage_of(store, "acct").await, 0);
    assert_no_drift(store).await;

    let m1 = manifest("q1", vec![c1.clone(), base.clone(), l1.clone()], None);
    let m2 = manifest("q2", vec![c2.clone(), base.clone(), l2.clone()], None);
    let m3 = manifest("q3", vec![c3.clone(), base.clone(), l3.clone()], None);
    let len = |m: &NewManifest| m.bytes.len() as u64;
    let put = |repo: &'static str, m: NewManifest| async move {
        let repo = name(repo);
        must(
            store
                .write(|tx| Box::pin(queries::put_manifest(tx, &repo, &m, &[])))
                .await,
        )
    };
    assert_eq!(put("acct/a", m1.clone()).await, 1101 + len(&m1));
    // Two images in one repository share the base: charged once.
    assert_eq!(put("acct/a", m2.clone()).await, 202 + len(&m2));
    // A third in another repository of the namespace: still once.
    assert_eq!(put("acct/b", m3.clone()).await, 303 + len(&m3));
    // Pushed again: nothing more.
    assert_eq!(put("acct/a", m1.clone()).await, 0);
    let all = 1000 + 101 + 202 + 303 + len(&m1) + len(&m2) + len(&m3);
    assert_eq!(usage_of(store, "acct").await, all);
    // Another namespace pays for the base too.
    let m4 = manifest("q4", vec![base.clone()], None);
    assert_eq!(put("other/c", m4.clone()).await, 1000 + len(&m4));
    assert_eq!(usage_of(store, "acct").await, all);
    assert_no_drift(store).await;

    // Deleting one image keeps the shared base charged; deleting all frees it.
    assert!(must(store.delete_manifest(&a, &m1.digest).await));
    assert_eq!(usage_of(store, "acct").await, all - 101 - len(&m1));
    assert_no_drift(store).await;
    assert!(must(store.delete_manifest(&a, &m2.digest).await));
    assert_eq!(usage_of(store, "acct").await, 1000 + 303 + len(&m3));
    assert!(must(store.delete_manifest(&b, &m3.digest).await));
    assert_eq!(usage_of(store, "acct").await, 0);
    assert_no_drift(store).await;

    // Over the limit: refused with the numbers, and nothing stays charged.
    must(
        store
            .write(|tx| Box::pin(quotas::set_limit(tx, "acct", Some(1300))))
            .await,
    );
    assert_eq!(put("acct/a", m1.clone()).await, 1101 + len(&m1));
    let before = usage_of(store, "acct").await;
    let refused = store
        .write(|tx| {
            let (repo, m) = (&a, &m2);
            Box::pin(async move {
                let charged = queries::put_manifest(tx, repo, m, &[tag("big")]).await?;
                quotas::check_limit(tx, "acct", charged).await
            })
        })
        .await;
    match refused {
        Err(MetadataError::QuotaExceeded {
            namespace,
            usage,
            limit: 1300,
            needed,
        }) => {
            assert_eq!((namespace.as_str(), usage), ("acct", before));
            assert_eq!(needed, 202 + len(&m2));
        }
        other => panic!("expected QuotaExceeded, got {other:?}"),
    }
    assert_eq!(usage_of(store, "acct").await, before);
    assert!(must(store.manifest_by_tag(&a, &tag("big")).await).is_none());
    assert_no_drift(store).await;
    // A blob that can never fit is refused before it is charged; one charged already fits.
    let fits = |digest: Digest, size: u64| async move {
        let d = digest.to_string();
        store
            .read(|tx| Box::pin(async move { quotas::check_blob_fits(tx, "acct", &d, size).await }))
            .await
    };
    assert!(matches!(
        fits(l2.clone(), 1300).await,
        Err(MetadataError::QuotaExceeded { needed: 1300, .. })
    ));
    must(fits(base.clone(), 1000).await);
    must(fits(l2.clone(), 1300 - before).await);

    // Drift is found and fixed.
    must(
        store
            .write(|tx| {
                Box::pin(async move {
                    tx.execute(
                        "UPDATE namespace_quotas SET usage_bytes = 7 WHERE namespace = 'acct'",
                        &[],
                    )
                    .await
                })
            })
            .await,
    );
    let checks = must(
        store
            .write(|tx| Box::pin(quotas::reconcile(tx, true)))
            .await,
    );
    let acct = checks.iter().find(|c| c.namespace == "acct");
    assert_eq!(
        acct.map(|c| (c.stored_bytes, c.actual_bytes)),
        Some((7, before))
    );
    assert_eq!(usage_of(store, "acct").await, before);
    assert_no_drift(store).await;
}

/// Immutability rules hold inside the statements: a protected tag is created and pushed again
/// with its digest, but never moved or deleted, by tag or with its manifest.
pub(crate) async fn immutability_suite(store: &Metadata) {
    use super::immutability;
    let repo = name("imm/app");
    let layer = Digest::sha256_of(b"imm layer");
    must(store.link_blob(&repo, &layer, 10).await);
    let (m1, m2) = (
        manifest("imm1", vec![layer.clone()], None),
        manifest("imm2", vec![layer.clone()], None),
    );
    must(
        store
            .write(|tx| Box::pin(immutability::add_rule(tx, "imm", "v*", 1, "test")))
            .await,
    );
    must(store.put_manifest(&repo, &m1, Some(&tag("v1"))).await);
    must(store.put_manifest(&repo, &m1, Some(&tag("v1"))).await);
    match store.put_manifest(&repo, &m2, Some(&tag("v1"))).await {
        Err(MetadataError::TagImmutable {
            tag,
            namespace,
            pattern,
        }) => assert_eq!((&*tag, &*namespace, &*pattern), ("v1", "imm", "v*")),
        other => panic!("expected TagImmutable, got {other:?}"),
    }
    // The refused put left nothing: m2 was not stored either.
    assert_eq!(
        must(store.manifest_by_digest(&repo, &m2.digest).await).map(|m| m.digest),
        None
    );
    let v1 = must(store.manifest_by_tag(&repo, &tag("v1")).await).map(|m| m.digest);
    assert_eq!(v1, Some(m1.digest.clone()));
    // Mutable tags and digest-derived tags move.
    for t in ["latest", "sha256-abc.sig"] {
        must(store.put_manifest(&repo, &m2, Some(&tag(t))).await);
        must(store.put_manifest(&repo, &m1, Some(&tag(t))).await);
    }
    assert!(matches!(
        store.delete_tag(&repo, &tag("v1")).await,
        Err(MetadataError::TagImmutable { .. })
    ));
    assert!(!must(store.delete_tag(&repo, &tag("v9")).await));
    assert!(matches!(
        store.delete_manifest(&repo, &m1.digest).await,
        Err(MetadataError::TagImmutable { .. })
    ));
    let rule = |t: &'static str| {
        let repo = repo.clone();
        async move {
            let t = tag(t);
            must(
                store
                    .read(|tx| {
                        Box::pin(async move { queries::protecting_rule(tx, &repo, &t).await })
                    })
                    .await,
            )
            .map(|r| r.pattern)
        }
    };
    assert_eq!(rule("v1").await.as_deref(), Some("v*"));
    assert_eq!(rule("latest").await, None);
    assert_eq!(rule("sha256-abc.sig").await, None);
    // Removing the rule lifts it.
    assert!(must(
        store
            .write(|tx| Box::pin(immutability::remove_rule(tx, "imm", "v*")))
            .await
    ));
    must(store.put_manifest(&repo, &m2, Some(&tag("v1"))).await);
    assert!(must(store.delete_tag(&repo, &tag("v1")).await));
    assert!(must(store.delete_manifest(&repo, &m1.digest).await));
    assert_no_drift(store).await;
}

pub(crate) async fn metadata_suite(store: &Metadata) {
    let (a, b) = (name("team/a"), name("team/b"));
    let blob = Digest::sha256_of(b"layer");

    // Blobs are per repository.
    must(store.link_blob(&a, &blob, 5).await);
    assert_eq!(must(store.blob_in_repository(&a, &blob).await), Some(5));
    assert_eq!(must(store.blob_in_repository(&b, &blob).await), None);

    // A manifest whose blob is missing from the repository is refused and changes nothing.
    let m1 = manifest("one", vec![blob.clone()], None);
    assert!(matches!(
        store.put_manifest(&b, &m1, Some(&tag("v1"))).await,
        Err(MetadataError::MissingBlob(_))
    ));
    assert_eq!(must(store.list_tags(&b, ALL).await), None);

    // So is one that declares another size for a blob than the stored one.
    let mut wrong_size = m1.clone();
    wrong_size.declared_sizes = vec![(blob.clone(), 6)];
    match store.put_manifest(&a, &wrong_size, Some(&tag("v1"))).await {
        Err(MetadataError::SizeMismatch {
            digest,
            declared: 6,
            stored: 5,
        }) => assert_eq!(digest, blob),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        must(store.manifest_by_digest(&a, &m1.digest).await).map(|m| m.digest),
        None
    );

    // Tags: put, move, sorted listing with pages, delete.
    let mut m1_sized = m1.clone();
    m1_sized.declared_sizes = vec![(blob.clone(), 5)];
    must(store.put_manifest(&a, &m1_sized, Some(&tag("v1"))).await);
    must(store.put_manifest(&a, &m1, Some(&tag("latest"))).await);
    let got = must(store.manifest_by_tag(&a, &tag("v1")).await);
    assert_eq!(got.map(|m| m.bytes.to_vec()), Some(m1.bytes.clone()));
    let m2 = manifest("two", vec![], None);
    must(store.put_manifest(&a, &m2, Some(&tag("v1"))).await);
    let got = must(store.manifest_by_tag(&a, &tag("v1")).await);
    assert_eq!(got.map(|m| m.digest), Some(m2.digest.clone()));
    assert_eq!(
        must(store.list_tags(&a, ALL).await),
        Some(strings(&["latest", "v1"]))
    );
    let page = Page {
        last: Some("latest"),
        limit: Some(1),
    };
    assert_eq!(
        must(store.list_tags(&a, page).await),
        Some(strings(&["v1"]))
    );
    assert!(must(store.delete_tag(&a, &tag("latest")).await));
    assert!(!must(store.delete_tag(&a, &tag("latest")).await));
    assert!(must(store.manifest_by_digest(&a, &m1.digest).await).is_some());

    // Catalog lists repositories that hold manifests.
    assert_eq!(
        must(store.list_repositories(ALL).await),
        strings(&["team/a"])
    );

    // Index children must exist.
    let mut index = manifest("index", vec![], None);
    index.children = vec![Digest::sha256_of(b"nope")];
    assert!(matches!(
        store.put_manifest(&a, &index, None).await,
        Err(MetadataError::MissingManifest(_))
    ));
    index.children = vec![m1.digest.clone()];
    must(store.put_manifest(&a, &index, None).await);

    // Referrers, even when pushed before their subject.
    let subject = Digest::sha256_of(b"not pushed yet");
    let sig = manifest("sig", vec![], Some(subject.clone()));
    must(store.put_manifest(&a, &sig, None).await);
    let refs = must(store.referrers(&a, &subject).await);
    assert_eq!(refs.len(), 1);
    assert_eq!(refs[0].digest, sig.digest);
    assert_eq!(refs[0].size, sig.bytes.len() as u64);
    assert_eq!(refs[0].artifact_type.as_deref(), Some("application/x-test"));
    assert_eq!(refs[0].annotations, sig.annotations);
    assert!(must(store.referrers(&b, &subject).await).is_empty());

    // Exports, as a registry copy reads them.
    assert_eq!(must(store.all_repositories().await), strings(&["team/a"]));
    assert_eq!(
        must(store.repository_blobs(&a).await),
        vec![(blob.clone(), 5)]
    );
    let manifests: Vec<Digest> = must(store.repository_manifests(&a).await)
        .into_iter()
        .map(|m| m.digest)
        .collect();
    assert_eq!(
        manifests,
        vec![
            m1.digest.clone(),
            m2.digest.clone(),
            index.digest.clone(),
            sig.digest.clone()
        ]
    );
    assert_eq!(
        must(store.repository_tags(&a).await),
        vec![("v1".to_string(), m2.digest.clone())]
    );

    // Deleting a manifest removes its tags.
    assert!(must(store.delete_manifest(&a, &m2.digest).await));
    assert!(!must(store.delete_manifest(&a, &m2.digest).await));
    assert!(must(store.manifest_by_tag(&a, &tag("v1")).await).is_none());
    assert_eq!(must(store.list_tags(&a, ALL).await), Some(vec![]));

    // A manifest an index lists cannot be deleted, nor a blob a manifest references; a
    // referrer does not hold its subject.
    match store.delete_manifest(&a, &m1.digest).await {
        Err(MetadataError::ManifestReferenced { by }) => assert_eq!(by, index.digest),
        other => panic!("{other:?}"),
    }
    assert!(must(store.manifest_by_digest(&a, &m1.digest).await).is_some());
    match store.unlink_blob(&a, &blob).await {
        Err(MetadataError::BlobReferenced { by }) => assert_eq!(by, m1.digest),
        other => panic!("{other:?}"),
    }
    assert_eq!(must(store.blob_in_repository(&a, &blob).await), Some(5));
    let sig_on_m1 = manifest("sig on one", vec![], Some(m1.digest.clone()));
    must(store.put_manifest(&a, &sig_on_m1, None).await);
    assert!(must(store.delete_manifest(&a, &index.digest).await));
    assert!(must(store.delete_manifest(&a, &m1.digest).await));
    assert_eq!(must(store.referrers(&a, &m1.digest).await).len(), 1);

    // Unlinking a blob nothing references.
    assert!(must(store.unlink_blob(&a, &blob).await));
    assert!(!must(store.unlink_blob(&a, &blob).await));
    assert_eq!(must(store.blob_in_repository(&a, &blob).await), None);

    // Upload sessions and their expiry.
    let s = UploadSession {
        id: "u1".into(),
        repository: a.clone(),
        updated_at: 100,
        owner: Some("alice".into()),
    };
    must(store.create_upload(&s).await);
    assert_eq!(must(store.get_upload("u1").await), Some(s.clone()));
    assert_eq!(must(store.stale_uploads(101).await), strings(&["u1"]));
    // Touches closer together than the granularity write nothing.
    must(store.touch_upload("u1", 159, 60).await);
    assert_eq!(
        must(store.get_upload("u1").await).map(|u| u.updated_at),
        Some(100)
    );
    must(store.touch_upload("u1", 200, 60).await);
    assert_eq!(
        must(store.get_upload("u1").await).map(|u| u.updated_at),
        Some(200)
    );
    assert_eq!(must(store.stale_uploads(101).await), Vec::<String>::new());
    must(store.delete_upload("u1").await);
    assert_eq!(must(store.get_upload("u1").await), None);

    // Finishing an upload links the blob and ends the session in one transaction; a composed
    // transaction that fails after both changes keeps neither.
    let u2 = UploadSession {
        id: "u2".into(),
        ..s.clone()
    };
    must(store.create_upload(&u2).await);
    let failed = store
        .write(|tx| {
            Box::pin(async {
                queries::link_blob(tx, &a, &blob, 5).await?;
                queries::delete_upload(tx, "u2").await?;
                Err::<(), _>(MetadataError::MissingBlob(blob.clone()))
            })
        })
        .await;
    assert!(matches!(failed, Err(MetadataError::MissingBlob(_))));
    assert_eq!(must(store.blob_in_repository(&a, &blob).await), None);
    assert_eq!(must(store.upload_ids().await), strings(&["u2"]));
    must(store.finish_upload(&a, &blob, 5, "u2", None).await);
    assert_eq!(must(store.blob_in_repository(&a, &blob).await), Some(5));
    assert_eq!(must(store.upload_ids().await), Vec::<String>::new());
}

/// The trash's listing with and without each filter (every filter is an optional parameter,
/// which PostgreSQL must be able to type). Restores are tested through the API, with real
/// manifests.
pub(crate) async fn trash_suite(store: &Metadata) {
    use super::trash::{self, Reason, TrashFilter};
    let (app, other) = (name("bin/app"), name("bin2/app"));
    let layer = Digest::sha256_of(b"trash layer");
    let m = manifest("trashed", vec![layer.clone()], None);
    for repo in [&app, &other] {
        must(store.link_blob(repo, &layer, 10).await);
        must(store.put_manifest(repo, &m, Some(&tag("v1"))).await);
    }
    let (app_ref, other_ref, digest) = (&app, &other, &m.digest);
    must(
        store
            .write(|tx| {
                Box::pin(async move {
                    trash::trash_tag(tx, app_ref, &tag("v1"), Reason::Deleted, "test", true)
                        .await?;
                    trash::trash_manifest(tx, other_ref, digest, Reason::Retention, "test", true)
                        .await?;
                    Ok(())
                })
            })
            .await,
    );
    let list = |filter: TrashFilter| async move {
        let filter = &filter;
        let entries = must(store.read(|tx| Box::pin(trash::list(tx, filter))).await);
        entries
            .into_iter()
            .map(|e| (e.repository, e.kind))
            .collect::<Vec<_>>()
    };
    let both = vec![
        ("bin2/app".to_string(), "manifest".to_string()),
        ("bin/app".to_string(), "tag".to_string()),
    ];
    assert_eq!(list(TrashFilter::default()).await, both);
    let only_app = vec![("bin/app".to_string(), "tag".to_string())];
    let by_repository = TrashFilter {
        repository: Some("bin/app".into()),
        ..TrashFilter::default()
    };
    assert_eq!(list(by_repository).await, only_app);
    let by_namespace = TrashFilter {
        namespace: Some("bin".into()),
        ..TrashFilter::default()
    };
    assert_eq!(list(by_namespace).await, only_app);
    let by_reason = TrashFilter {
        reason: Some("retention".into()),
        ..TrashFilter::default()
    };
    assert_eq!(list(by_reason).await, both[..1]);
    let paged = TrashFilter {
        limit: Some(1),
        ..TrashFilter::default()
    };
    assert_eq!(list(paged).await, both[..1]);
}

/// Quarantine and the scrub's lease: a quarantined blob is linked but not readable, a repair
/// (an upload finished with `replaced`) lifts it in its own transaction, the lease is one
/// node's at a time and every position it stores is fenced by it.
pub(crate) async fn integrity_suite(store: &Metadata) {
    use integrity::Problem;
    let (a, blob, other) = (
        name("scrub/a"),
        Digest::sha256_of(b"bytes"),
        Digest::sha256_of(b"b2"),
    );
    must(store.link_blob(&a, &blob, 5).await);
    must(store.link_blob(&a, &other, 2).await);
    let q = |d: &Digest, p: Problem| {
        let d = d.clone();
        async move {
            store
                .write(|tx| {
                    let d = d.clone();
                    Box::pin(async move { integrity::quarantine(tx, &d, p, "found bad").await })
                })
                .await
        }
    };
    assert!(must(q(&blob, Problem::Mismatch).await));
    assert!(!must(q(&blob, Problem::Missing).await), "quarantined twice");
    // A blob the registry does not hold is not quarantined.
    assert!(!must(
        q(&Digest::sha256_of(b"none"), Problem::Missing).await
    ));
    assert_eq!(
        must(store.linked_blob(&a, &blob).await),
        Some(queries::LinkedBlob {
            size: 5,
            quarantined: true
        })
    );
    assert_eq!(must(store.blob_in_repository(&a, &blob).await), None);
    assert_eq!(must(store.blob_in_repository(&a, &other).await), Some(2));
    let listed = must(
        store
            .read(|tx| Box::pin(integrity::quarantined(tx, 100)))
            .await,
    );
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            &listed[0].digest,
            listed[0].problem,
            listed[0].detail.as_str()
        ),
        (&blob, Problem::Mismatch, "found bad")
    );
    // Blobs in digest order, after a cursor.
    let mut all = [blob.clone(), other.clone()];
    all.sort_by_key(|d| d.to_string());
    let first = must(
        store
            .read(|tx| Box::pin(integrity::blobs_after(tx, None, 1)))
            .await,
    );
    assert_eq!(
        first.iter().map(|b| &b.digest).collect::<Vec<_>>(),
        vec![&all[0]]
    );
    assert_eq!(first[0].quarantined, all[0] == blob);
    let after = all[0].to_string();
    let counts = must(
        store
            .read(|tx| {
                let after = after.clone();
                Box::pin(async move { integrity::blob_counts(tx, Some(&after)).await })
            })
            .await,
    );
    assert_eq!(counts, (2, 1));
    let rest = must(
        store
            .read(|tx| {
                let after = after.clone();
                Box::pin(async move { integrity::blobs_after(tx, Some(&after), 10).await })
            })
            .await,
    );
    assert!(rest.iter().any(|b| b.digest == all[1]) && !rest.iter().any(|b| b.digest == all[0]));

    // An upload finished without replacing keeps the quarantine; one that replaced lifts it.
    let s = UploadSession {
        id: "q1".into(),
        repository: a.clone(),
        updated_at: 1,
        owner: None,
    };
    must(store.create_upload(&s).await);
    must(store.finish_upload(&a, &blob, 5, "q1", None).await);
    assert_eq!(must(store.blob_in_repository(&a, &blob).await), None);
    must(
        store
            .create_upload(&UploadSession {
                id: "q2".into(),
                ..s
            })
            .await,
    );
    let repaired = events::NewEvent {
        kind: "blob.repaired".into(),
        actor: "user:test".into(),
        client_addr: None,
        user_agent: None,
        request_id: None,
        repository: Some(a.as_str().into()),
        digest: Some(blob.to_string()),
        tags: vec![],
        size: Some(5),
        result: "ok".into(),
        detail: None,
    };
    must(
        store
            .finish_upload(&a, &blob, 5, "q2", Some(&repaired))
            .await,
    );
    assert_eq!(must(store.blob_in_repository(&a, &blob).await), Some(5));

    // The lease: one holder; its position is fenced; released, another takes it and resumes.
    let lease = |owner: &'static str| async move {
        store
            .write(|tx| Box::pin(integrity::take_scrub_lease(tx, owner, 60_000)))
            .await
    };
    let state = must(lease("n1").await).unwrap_or_else(|| panic!("n1 got no lease"));
    assert_eq!((state.cursor, state.pass_started_ms), (None, None));
    assert!(must(lease("n2").await).is_none(), "two holders");
    let save = |owner: &'static str| async move {
        store
            .write(|tx| {
                Box::pin(integrity::save_scrub_position(
                    tx,
                    owner,
                    Some("sha256:ab"),
                    7,
                    60_000,
                ))
            })
            .await
    };
    assert!(!must(save("n2").await), "a non-holder moved the position");
    assert!(must(save("n1").await));
    must(
        store
            .write(|tx| Box::pin(integrity::release_scrub_lease(tx, "n1")))
            .await,
    );
    let state = must(lease("n2").await).unwrap_or_else(|| panic!("n2 got no lease"));
    assert_eq!(
        (state.cursor.as_deref(), state.pass_started_ms),
        (Some("sha256:ab"), Some(7))
    );
    assert!(must(
        store
            .write(|tx| Box::pin(integrity::finish_scrub_pass(tx, "n2")))
            .await
    ));
    let state = must(lease("n2").await).unwrap_or_else(|| panic!("n2 lost its lease"));
    assert_eq!((state.cursor, state.pass_started_ms), (None, None));
    assert!(state.last_pass_done_ms.is_some());
    // An expired lease is taken over.
    must(
        store
            .write(|tx| Box::pin(integrity::take_scrub_lease(tx, "n2", -1)))
            .await,
    );
    assert!(
        must(lease("n3").await).is_some(),
        "an expired lease was not taken over"
    );
}

/// Checks a database written by version 1 of the schema (see `write_v1_data`) after migration.
async fn check_migrated_v1(store: &Metadata) {
    let (repo, blob) = (name("old/r"), Digest::sha256_of(b"layer"));
    let got = must(store.manifest_by_tag(&repo, &tag("v1")).await);
    assert_eq!(
        got.map(|m| m.bytes.to_vec()),
        Some(V1_MANIFEST.as_bytes().to_vec())
    );
    assert_eq!(must(store.blob_in_repository(&repo, &blob).await), Some(5));
    // The quota migration charged what was there: the layer and the manifest.
    assert_eq!(usage_of(store, "old").await, 5 + V1_MANIFEST.len() as u64);
    assert_no_drift(store).await;
    assert!(matches!(
        store.unlink_blob(&repo, &blob).await,
        Err(MetadataError::BlobReferenced { .. })
    ));
    must(store.link_blob(&repo, &Digest::sha256_of(b"new"), 3).await);
    let m = manifest("after migration", vec![blob.clone()], None);
    must(store.put_manifest(&repo, &m, Some(&tag("v2"))).await);
    assert_eq!(
        must(store.list_tags(&repo, ALL).await),
        Some(strings(&["v1", "v2"]))
    );
}

const V1_MANIFEST: &str = r#"{"schemaVersion":2}"#;

/// Rows as version 1 wrote them, in either dialect.
fn v1_data(dialect: Dialect) -> String {
    let blob = Digest::sha256_of(b"layer");
    let m = Digest::sha256_of(V1_MANIFEST.as_bytes());
    let sql = format!(
        "INSERT INTO repositories (name) VALUES ('old/r');
         INSERT INTO blobs (digest, size) VALUES ('{blob}', 5);
         INSERT INTO repository_blobs (repository_id, digest) SELECT id, '{blob}' FROM repositories;
         INSERT INTO manifests (repository_id, digest, media_type, content, created_at)
             SELECT id, '{m}', 'application/vnd.oci.image.manifest.v1+json',
                    CAST('{V1_MANIFEST}' AS {{BYTES}}), 1 FROM repositories;
         INSERT INTO manifest_blobs (manifest_id, digest) SELECT id, '{blob}' FROM manifests;
         INSERT INTO tags (repository_id, name, manifest_id, updated_at)
             SELECT repository_id, 'v1', id, 1 FROM manifests;"
    );
    must(db::rewrite(&sql, dialect))
}

mod sqlite {
    use super::*;

    /// With the read cache, as `serve` opens it: every suite's reads after writes go through it.
    async fn open(path: &Path) -> Metadata {
        must(Metadata::open_sqlite(path).await).with_read_cache(1 << 20)
    }

    /// Another process on the same file is another connection: what it commits is seen by the
    /// very next read of a cached handle, for each read the cache answers, found or not.
    #[tokio::test(flavor = "multi_thread")]
    async fn cached_reads_see_what_another_connection_commits_at_once() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("m.db");
        let cached = open(&path).await;
        let other = must(Metadata::open_sqlite(&path).await);
        assert!(cached.reads.is_some() && other.reads.is_none());
        let (repo, latest) = (name("team/app"), tag("latest"));
        let blob = Digest::sha256_of(b"layer");
        let (one, two) = (
            manifest("one", vec![blob.clone()], None),
            manifest("two", vec![], None),
        );
        let by_tag = async || must(cached.manifest_by_tag(&repo, &latest).await).map(|m| m.digest);
        let by_digest =
            async |d: &Digest| must(cached.manifest_by_digest(&repo, d).await).is_some();
        let linked = async || must(cached.linked_blob(&repo, &blob).await).map(|b| b.size);
        let tags = async || must(cached.list_tags(&repo, ALL).await);
        // Twice each: the second answer comes from the cache.
        for _ in 0..2 {
            assert_eq!(by_tag().await, None);
            assert!(!by_digest(&one.digest).await);
            assert_eq!(linked().await, None);
            assert_eq!(tags().await, None);
        }
        must(other.link_blob(&repo, &blob, 5).await);
        must(other.put_manifest(&repo, &one, Some(&latest)).await);
        for _ in 0..2 {
            assert_eq!(by_tag().await, Some(one.digest.clone()));
            assert!(by_digest(&one.digest).await);
            assert_eq!(linked().await, Some(5));
            assert_eq!(tags().await, Some(strings(&["latest"])));
        }
        must(other.put_manifest(&repo, &two, Some(&latest)).await);
        assert_eq!(by_tag().await, Some(two.digest.clone()));
        assert!(must(other.delete_tag(&repo, &latest).await));
        assert_eq!(by_tag().await, None);
        assert_eq!(tags().await, Some(vec![]));
        // The same through the cached handle's own writes.
        must(cached.put_manifest(&repo, &one, Some(&latest)).await);
        assert_eq!(by_tag().await, Some(one.digest.clone()));
        assert!(must(cached.delete_manifest(&repo, &one.digest).await));
        assert!(!by_digest(&one.digest).await);
        assert_eq!(by_tag().await, None);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn passes_the_shared_suite() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        metadata_suite(&open(&dir.path().join("m.db")).await).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn passes_the_access_suite() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        access_suite(&open(&dir.path().join("m.db")).await).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn passes_the_events_suite() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        events_suite(&open(&dir.path().join("m.db")).await).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn passes_the_quota_suite() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        quota_suite(&open(&dir.path().join("m.db")).await).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn passes_the_immutability_suite() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        immutability_suite(&open(&dir.path().join("m.db")).await).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn passes_the_webhooks_suite() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        webhooks_suite(&open(&dir.path().join("m.db")).await).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn passes_the_integrity_suite() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        integrity_suite(&open(&dir.path().join("m.db")).await).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn passes_the_trash_suite() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        trash_suite(&open(&dir.path().join("m.db")).await).await;
    }

    #[tokio::test]
    async fn migrations_are_idempotent() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("m.db");
        drop(open(&path).await);
        drop(open(&path).await);
        let conn = rusqlite::Connection::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(version, schema::MIGRATIONS.len() as i64);
    }

    fn create_v1(path: &Path, data: bool) {
        let conn = rusqlite::Connection::open(path).unwrap_or_else(|e| panic!("{e}"));
        let mut sql = format!("{}\nPRAGMA user_version = 1;", schema::V1_SQLITE);
        if data {
            sql.push_str(&v1_data(Dialect::Sqlite));
        }
        conn.execute_batch(&sql).unwrap_or_else(|e| panic!("{e}"));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_version_1_database_migrates_and_passes_the_suite() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (empty, full) = (dir.path().join("empty.db"), dir.path().join("full.db"));
        create_v1(&empty, false);
        metadata_suite(&open(&empty).await).await;
        create_v1(&full, true);
        check_migrated_v1(&open(&full).await).await;
    }

    /// With the query planner stability guarantee, the hot statements (joins, ORDER BY) are
    /// prepared once, however the bound values change.
    #[tokio::test(flavor = "multi_thread")]
    async fn hot_statements_are_never_re_prepared() {
        use rusqlite::StatementStatus;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("m.db");
        let store = open(&path).await;
        metadata_suite(&store).await;
        let conn = rusqlite::Connection::open(&path).unwrap_or_else(|e| panic!("{e}"));
        db::configure_sqlite(&conn, true).unwrap_or_else(|e| panic!("{e}"));
        for sql in queries::HOT_STATEMENTS {
            let mut stmt = conn.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
            for i in 0..20i64 {
                let repo = ["team/a", "team/b", "nope"][i as usize % 3];
                let params: Vec<rusqlite::types::Value> = (1..=stmt.parameter_count())
                    .map(|p| match p {
                        1 => repo.to_string().into(),
                        3 => (i % 4).into(),
                        _ => format!("v{i}").into(),
                    })
                    .collect();
                let mut rows = stmt
                    .query(rusqlite::params_from_iter(params))
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
                while rows.next().unwrap_or_else(|e| panic!("{e}")).is_some() {}
            }
            assert_eq!(stmt.get_status(StatementStatus::RePrepare), 0, "{sql}");
        }
    }
}

mod postgres {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio_postgres::NoTls;

    use super::*;

    const OPTIONS: PoolOptions = PoolOptions {
        size: 8,
        timeout: Duration::from_secs(10),
        operation_timeout: Some(Duration::from_secs(60)),
    };

    /// A database of its own on the server named by `BERTH_TEST_POSTGRES_URL`, dropped by
    /// [`TestDb::drop_database`] (a failed test leaves it behind for inspection).
    struct TestDb {
        admin: tokio_postgres::Client,
        name: String,
        url: String,
    }

    /// `url` with its database name replaced.
    fn with_database(url: &str, db: &str) -> String {
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

    impl TestDb {
        /// The new database's default collation is linguistic (ICU `en-US`) where the server
        /// supports it, so an ordering that leaned on it instead of `COLLATE "C"` would show.
        async fn create() -> TestDb {
            let admin_url = std::env::var("BERTH_TEST_POSTGRES_URL").unwrap_or_else(|_| {
                panic!(
                    "BERTH_TEST_POSTGRES_URL is not set. The PostgreSQL tests need a server: run \
                     `eval \"$(bash scripts/postgres.sh)\"` first (scripts/test.sh does), or set \
                     it to a superuser URL such as postgres://postgres@127.0.0.1:54329/postgres"
                )
            });
            let (admin, conn) = tokio_postgres::connect(&admin_url, NoTls)
                .await
                .unwrap_or_else(|e| panic!("connecting to BERTH_TEST_POSTGRES_URL: {e:?}"));
            tokio::spawn(conn);
            let name = format!("berth_test_{}", uuid::Uuid::new_v4().simple());
            let icu = format!(
                "CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
            );
            if admin.batch_execute(&icu).await.is_err() {
                admin
                    .batch_execute(&format!("CREATE DATABASE {name}"))
                    .await
                    .unwrap_or_else(|e| panic!("CREATE DATABASE: {e:?}"));
            }
            let url = with_database(&admin_url, &name);
            TestDb { admin, name, url }
        }

        async fn store(&self) -> Metadata {
            must(Metadata::connect_postgres(&self.url, OPTIONS).await)
        }

        async fn client(&self) -> tokio_postgres::Client {
            let (client, conn) = tokio_postgres::connect(&self.url, NoTls)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            tokio::spawn(conn);
            client
        }

        /// The schema as version 1 left it, with `data` in it.
        async fn create_v1(&self, data: bool) {
            let mut sql = format!(
                "{}
                 CREATE TABLE berth_schema_migrations (
                     version    INTEGER PRIMARY KEY,
                     applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
                 );
                 INSERT INTO berth_schema_migrations (version) VALUES (1);",
                schema::V1_POSTGRES
            );
            if data {
                sql.push_str(&v1_data(Dialect::Postgres));
            }
            self.client()
                .await
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("{e:?}"));
        }

        async fn drop_database(self) {
            let sql = format!("DROP DATABASE {} WITH (FORCE)", self.name);
            if let Err(e) = self.admin.batch_execute(&sql).await {
                panic!("{sql}: {e:?}");
            }
        }
    }

    #[test]
    fn database_urls() {
        let cases = [
            ("postgres://u@h:1/postgres", "postgres://u@h:1/x"),
            (
                "postgres://u:p@h/db?sslmode=disable",
                "postgres://u:p@h/x?sslmode=disable",
            ),
            ("postgresql://h", "postgresql://h/x"),
        ];
        for (url, expected) in cases {
            assert_eq!(with_database(url, "x"), expected, "{url}");
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn passes_the_shared_suite() {
        let db = TestDb::create().await;
        metadata_suite(&db.store().await).await;
        db.drop_database().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn passes_the_access_suite() {
        let db = TestDb::create().await;
        access_suite(&db.store().await).await;
        db.drop_database().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn passes_the_events_suite() {
        let db = TestDb::create().await;
        events_suite(&db.store().await).await;
        db.drop_database().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn passes_the_quota_suite() {
        let db = TestDb::create().await;
        quota_suite(&db.store().await).await;
        db.drop_database().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn passes_the_immutability_suite() {
        let db = TestDb::create().await;
        immutability_suite(&db.store().await).await;
        db.drop_database().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn passes_the_webhooks_suite() {
        let db = TestDb::create().await;
        webhooks_suite(&db.store().await).await;
        db.drop_database().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn passes_the_integrity_suite() {
        let db = TestDb::create().await;
        integrity_suite(&db.store().await).await;
        db.drop_database().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn passes_the_trash_suite() {
        let db = TestDb::create().await;
        trash_suite(&db.store().await).await;
        db.drop_database().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_version_1_database_migrates_and_passes_the_suite() {
        let (empty, full) = (TestDb::create().await, TestDb::create().await);
        empty.create_v1(false).await;
        metadata_suite(&empty.store().await).await;
        full.create_v1(true).await;
        check_migrated_v1(&full.store().await).await;
        empty.drop_database().await;
        full.drop_database().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn names_sort_bytewise_whatever_the_database_collation() {
        let db = TestDb::create().await;
        let store = db.store().await;
        let repo = name("sort/tags");
        let m = manifest("sort", vec![], None);
        for t in ["a", "B", "_z", "1", "Z", "b.1", "b-1"] {
            must(store.put_manifest(&repo, &m, Some(&tag(t))).await);
        }
        let want = ["1", "B", "Z", "_z", "a", "b-1", "b.1"];
        assert_eq!(
            must(store.list_tags(&repo, ALL).await),
            Some(strings(&want))
        );
        let page = Page {
            last: Some("Z"),
            limit: Some(2),
        };
        assert_eq!(
            must(store.list_tags(&repo, page).await),
            Some(strings(&["_z", "a"]))
        );

        let mut repos = vec!["a-b", "a/b", "a.b", "a_b", "ab", "a0", "sort/tags"];
        for r in &repos {
            must(store.put_manifest(&name(r), &m, None).await);
        }
        repos.sort_unstable();
        assert_eq!(must(store.list_repositories(ALL).await), strings(&repos));
        let page = Page {
            last: Some("a.b"),
            limit: Some(2),
        };
        assert_eq!(
            must(store.list_repositories(page).await),
            strings(&["a/b", "a0"])
        );
        db.drop_database().await;
    }

    /// Nodes starting together race to migrate; each migration must run exactly once.
    #[tokio::test(flavor = "multi_thread")]
    async fn nodes_starting_together_migrate_once() {
        let db = TestDb::create().await;
        let starts = (0..4).map(|_| Metadata::connect_postgres(&db.url, OPTIONS));
        for store in futures_util::future::join_all(starts).await {
            must(store);
        }
        let client = db.client().await;
        let versions: Vec<i32> = client
            .query(
                "SELECT version FROM berth_schema_migrations ORDER BY version",
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(
            versions,
            (1..=schema::MIGRATIONS.len() as i32).collect::<Vec<_>>()
        );
        drop(client);
        db.drop_database().await;
    }

    /// Two nodes pushing and deleting manifests that share a layer, the same manifest on both
    /// at once, and pushes racing for the last bytes of a quota or for a new protected tag:
    /// usage stays exact, and only one racer wins each race.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_nodes_racing_keep_usage_exact_and_rules_whole() {
        use super::super::immutability;
        const ROUNDS: usize = 16;
        let db = TestDb::create().await;
        let nodes = [Arc::new(db.store().await), Arc::new(db.store().await)];
        let base = Digest::sha256_of(b"qrace base");
        let own = |r: usize, n: usize| Digest::sha256_of(format!("qrace {r} {n}").as_bytes());
        let image = |r: usize, n: usize| {
            manifest(
                &format!("qrace {r} {n}"),
                vec![base.clone(), own(r, n)],
                None,
            )
        };
        let same = |r: usize| manifest(&format!("qrace same {r}"), vec![base.clone()], None);
        let mut tasks = tokio::task::JoinSet::new();
        for round in 0..ROUNDS {
            for (n, node) in nodes.iter().enumerate() {
                let (node, base, own, m, same) = (
                    node.clone(),
                    base.clone(),
                    own(round, n),
                    image(round, n),
                    same(round),
                );
                tasks.spawn(async move {
                    let repo = name(&format!("qrace/r{}", round % 3));
                    node.link_blob(&repo, &base, 1000).await?;
                    node.link_blob(&repo, &own, 10 + n as u64).await?;
                    node.put_manifest(&repo, &m, None).await?;
                    node.put_manifest(&repo, &same, None).await?;
                    // Every other round each node deletes the image it pushed.
                    if round % 2 == 1 {
                        node.delete_manifest(&repo, &m.digest).await?;
                    }
                    Ok::<(), MetadataError>(())
                });
            }
        }
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("a racing write failed: {e}"),
                Err(e) => panic!("{e}"),
            }
        }
        // Kept: the even rounds' images (own layers of 10 and 11 bytes), every `same` (one row
        // in its repository), the base once.
        let mut want = 1000;
        for round in 0..ROUNDS {
            if round % 2 == 0 {
                want += 21 + (image(round, 0).bytes.len() + image(round, 1).bytes.len()) as u64;
            }
            want += same(round).bytes.len() as u64;
        }
        assert_eq!(usage_of(&nodes[0], "qrace").await, want);
        assert_no_drift(&nodes[1]).await;

        // The last bytes of a quota: of two pushes that each fit alone, one wins.
        let repo = name("qlimit/app");
        for (n, node) in nodes.iter().enumerate() {
            must(node.link_blob(&repo, &own(100, n), 600).await);
        }
        must(
            nodes[0]
                .write(|tx| Box::pin(quotas::set_limit(tx, "qlimit", Some(1000))))
                .await,
        );
        let racers = nodes.iter().enumerate().map(|(n, node)| {
            let m = manifest(&format!("qlimit {n}"), vec![own(100, n)], None);
            let (node, repo) = (node.clone(), repo.clone());
            async move {
                node.write(|tx| {
                    let (m, repo) = (&m, &repo);
                    Box::pin(async move {
                        let charged = queries::put_manifest(tx, repo, m, &[]).await?;
                        quotas::check_limit(tx, "qlimit", charged).await
                    })
                })
                .await
            }
        });
        let results = futures_util::future::join_all(racers).await;
        let won = results.iter().filter(|r| r.is_ok()).count();
        let refused = results
            .iter()
            .filter(|r| matches!(r, Err(MetadataError::QuotaExceeded { .. })))
            .count();
        assert_eq!((won, refused), (1, 1), "{results:?}");
        assert!(usage_of(&nodes[0], "qlimit").await <= 1000);
        assert_no_drift(&nodes[0]).await;

        // A new protected tag: of two different images, one wins and the tag stays on it.
        // The images are there already: a new manifest row takes the namespace's usage row,
        // which would order the two pushes by itself.
        let repo = name("qimm/app");
        must(nodes[0].link_blob(&repo, &base, 1000).await);
        must(
            nodes[0]
                .write(|tx| Box::pin(immutability::add_rule(tx, "qimm", "v*", 1, "test")))
                .await,
        );
        let image = |round: usize, n: usize| {
            manifest(&format!("qimm {round} {n}"), vec![base.clone()], None)
        };
        for round in 0..ROUNDS {
            for n in 0..2 {
                must(nodes[0].put_manifest(&repo, &image(round, n), None).await);
            }
        }
        for round in 0..ROUNDS {
            let t = tag(&format!("v{round}"));
            let racers = nodes.iter().enumerate().map(|(n, node)| {
                let m = image(round, n);
                let (node, repo, t) = (node.clone(), repo.clone(), t.clone());
                async move {
                    node.put_manifest(&repo, &m, Some(&t))
                        .await
                        .map(|()| m.digest)
                }
            });
            let results = futures_util::future::join_all(racers).await;
            let winners: Vec<&Digest> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
            let refused = results
                .iter()
                .filter(|r| matches!(r, Err(MetadataError::TagImmutable { .. })))
                .count();
            assert_eq!((winners.len(), refused), (1, 1), "{results:?}");
            let got = must(nodes[1].manifest_by_tag(&repo, &t).await).map(|m| m.digest);
            assert_eq!(got.as_ref(), Some(winners[0]));
        }
        assert_no_drift(&nodes[0]).await;
        drop(nodes);
        db.drop_database().await;
    }

    /// Two stores over one database are two nodes: they create the same repositories, push
    /// the same manifest and move the same tag at the same time, and none of it may fail.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_nodes_racing_writes() {
        const ROUNDS: usize = 24;
        let db = TestDb::create().await;
        let nodes = [Arc::new(db.store().await), Arc::new(db.store().await)];
        let blob = Digest::sha256_of(b"race layer");
        let same = manifest("same on both nodes", vec![blob.clone()], None);
        let own = [
            manifest("node 0", vec![], None),
            manifest("node 1", vec![], None),
        ];
        let shared = name("race/shared");

        let mut tasks = tokio::task::JoinSet::new();
        for round in 0..ROUNDS {
            for (n, node) in nodes.iter().enumerate() {
                let (node, blob, same, own, shared) = (
                    node.clone(),
                    blob.clone(),
                    same.clone(),
                    own[n].clone(),
                    shared.clone(),
                );
                tasks.spawn(async move {
                    let repo = name(&format!("race/r{round:02}"));
                    node.link_blob(&repo, &blob, 10).await?;
                    node.put_manifest(&repo, &same, Some(&tag(&format!("node{n}"))))
                        .await?;
                    node.put_manifest(&repo, &same, Some(&tag("both"))).await?;
                    node.put_manifest(&shared, &own, Some(&tag("latest"))).await
                });
            }
        }
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("a racing write failed: {e}"),
                Err(e) => panic!("{e}"),
            }
        }

        let mut want: Vec<String> = (0..ROUNDS).map(|r| format!("race/r{r:02}")).collect();
        want.push("race/shared".into());
        for node in &nodes {
            assert_eq!(must(node.list_repositories(ALL).await), want);
        }
        for round in 0..ROUNDS {
            let repo = name(&format!("race/r{round:02}"));
            let tags = must(nodes[round % 2].list_tags(&repo, ALL).await);
            assert_eq!(tags, Some(strings(&["both", "node0", "node1"])));
            for t in ["both", "node0", "node1"] {
                let got = must(nodes[1 - round % 2].manifest_by_tag(&repo, &tag(t)).await);
                assert_eq!(got.map(|m| m.digest), Some(same.digest.clone()));
            }
        }
        let latest = must(nodes[0].manifest_by_tag(&shared, &tag("latest")).await);
        let latest = latest.map(|m| m.digest);
        assert!(
            own.iter().any(|m| Some(&m.digest) == latest.as_ref()),
            "latest points at {latest:?}"
        );

        // One row per (repository, manifest): the losing insert found the winner's.
        let client = db.client().await;
        let rows: i64 = client
            .query_one(
                "SELECT count(*) FROM manifests WHERE digest = $1",
                &[&same.digest.to_string()],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(rows, ROUNDS as i64);
        drop(client);
        drop(nodes);
        db.drop_database().await;
    }

    /// A blob DELETE and a manifest PUT referencing that blob, on two nodes at once: one of
    /// them must lose. Never may the manifest end up stored while its blob is unlinked.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn blob_unlink_racing_manifest_put_never_leaves_a_dangling_reference() {
        const ROUNDS: usize = 50;
        let db = TestDb::create().await;
        let nodes = [Arc::new(db.store().await), Arc::new(db.store().await)];
        let (mut puts_won, mut unlinks_won) = (0, 0);
        for round in 0..ROUNDS {
            let repo = name(&format!("race/b{round:02}"));
            let blob = Digest::sha256_of(format!("layer {round}").as_bytes());
            let m = manifest(&format!("m {round}"), vec![blob.clone()], None);
            must(nodes[0].link_blob(&repo, &blob, 7).await);
            let (putter, unlinker) = (nodes[round % 2].clone(), nodes[1 - round % 2].clone());
            let (r, m2) = (repo.clone(), m.clone());
            let put = tokio::spawn(async move { putter.put_manifest(&r, &m2, None).await });
            let (r, b) = (repo.clone(), blob.clone());
            let unlink = tokio::spawn(async move { unlinker.unlink_blob(&r, &b).await });
            let put = put.await.unwrap_or_else(|e| panic!("{e}"));
            let unlink = unlink.await.unwrap_or_else(|e| panic!("{e}"));
            match (&put, &unlink) {
                (Ok(()), Err(MetadataError::BlobReferenced { by })) if *by == m.digest => {
                    puts_won += 1
                }
                (Err(MetadataError::MissingBlob(_)), Ok(true)) => unlinks_won += 1,
                other => panic!("round {round}: {other:?}"),
            }
            let stored = must(nodes[0].manifest_by_digest(&repo, &m.digest).await).is_some();
            let linked = must(nodes[1].blob_in_repository(&repo, &blob).await).is_some();
            assert!(
                !stored || linked,
                "round {round}: manifest without its blob"
            );
        }
        assert_eq!(puts_won + unlinks_won, ROUNDS);
        drop(nodes);
        db.drop_database().await;
    }
}
