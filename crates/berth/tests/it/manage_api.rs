//! The management API (`/api/v1`) end to end: every endpoint against every kind of caller, the
//! flow from an empty namespace to a robot pushing and being revoked, self-service passwords
//! and tokens, its error bodies, and the API open when access control is off.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::auth::{Cast, cast, cast_with, push_as, token};
use crate::support::*;

/// How a test request authenticates.
#[derive(Clone)]
enum Cred {
    None,
    Basic(String, String),
    Bearer(String),
    /// A fresh registry token for this user, fetched with its password before each request.
    TokenOf(&'static str),
}

fn basic(user: &str, password: &str) -> Cred {
    Cred::Basic(user.to_string(), password.to_string())
}

fn call(app: &TestApp, cred: &Cred, method: &str, path: &str, body: Option<&Value>) -> Reply {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a method");
    let mut req = app.client().request(method, app.url(path));
    req = match cred {
        Cred::None => req,
        Cred::Basic(u, p) => req.basic_auth(u, Some(p)),
        Cred::Bearer(t) => req.bearer_auth(t),
        Cred::TokenOf(user) => {
            let t = token(app, Some((user, &format!("{user}-pw"))), &[]);
            req.bearer_auth(t["token"].as_str().expect("a token"))
        }
    };
    if let Some(body) = body {
        req = req
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    send(req)
}

/// Asserts a status and, for an error, the registry's error body with `code`.
#[track_caller]
fn expect(reply: &Reply, status: u16, code: Option<&str>) {
    reply.assert_status(status);
    assert_eq!(
        reply.header("cache-control"),
        Some("no-store"),
        "{}",
        reply.describe()
    );
    if let Some(code) = code {
        assert_eq!(
            reply.header("content-type"),
            Some("application/json"),
            "{}",
            reply.describe()
        );
        assert_eq!(error_code(&reply.text()), code, "{}", reply.describe());
    }
}

/// The secret's id: `berth_<id>_<secret>`.
fn id_of(secret: &str) -> String {
    secret
        .split('_')
        .nth(1)
        .expect("berth_<id>_<secret>")
        .to_string()
}

fn create_token(app: &TestApp, cred: &Cred, account: &str, body: Value) -> Value {
    let reply = call(
        app,
        cred,
        "POST",
        &format!("/api/v1/accounts/{account}/tokens"),
        Some(&body),
    );
    expect(&reply, 201, None);
    reply.json()
}

/// Waits until `f` gives `want`, for at most `limit`; returns how long it took.
#[track_caller]
fn within(limit: Duration, what: &str, want: u16, mut f: impl FnMut() -> u16) -> Duration {
    let start = Instant::now();
    loop {
        let got = f();
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{what}: still {got} after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The callers of the matrix: each with its credentials and the account it acts for.
struct Caller {
    key: &'static str,
    cred: Cred,
    me: &'static str,
}

#[test]
fn every_endpoint_answers_every_kind_of_caller_as_the_rules_say() {
    // The revoked column fails a login per row: too many for the failed-login throttle
    // (tested on its own), which would turn its 401s, and then alice's logins, into 429s.
    let c = cast_with(
        TestApp::builder()
            .arg("--token-ttl-secs")
            .arg("10")
            .arg("--max-failed-logins-per-minute")
            .arg("1000")
            .arg("--max-failed-logins-per-minute-per-address")
            .arg("1000"),
    );
    let app = &c.app;
    let admin = basic("admin", "admin-pw");
    // A registry token that will have expired when the matrix runs.
    let expired = token(app, Some(("alice", "alice-pw")), &[])["token"]
        .as_str()
        .expect("a token")
        .to_string();
    let expires = Instant::now() + Duration::from_secs(11);

    // A writer and a maintainer of `team` besides the cast's owner (alice) and reader (bob).
    for (user, role) in [("dave", "writer"), ("erin", "maintainer")] {
        let pw = format!("{user}-pw");
        let reply = call(
            app,
            &admin,
            "POST",
            "/api/v1/users",
            Some(&json!({"name": user, "password": pw})),
        );
        expect(&reply, 201, None);
        let reply = call(
            app,
            &admin,
            "PUT",
            &format!("/api/v1/namespaces/team/members/{user}"),
            Some(&json!({ "role": role })),
        );
        expect(&reply, 200, None);
    }
    let alice = basic("alice", "alice-pw");
    let limited = create_token(app, &alice, "alice", json!({"grants": ["team/*:pull"]}))["secret"]
        .as_str()
        .expect("a secret")
        .to_string();
    let revoked = create_token(app, &alice, "alice", json!({}))["secret"]
        .as_str()
        .expect("a secret")
        .to_string();
    let reply = call(
        app,
        &alice,
        "DELETE",
        &format!("/api/v1/tokens/{}", id_of(&revoked)),
        None,
    );
    expect(&reply, 204, None);

    // The columns of the table below, in order.
    let callers: Vec<Caller> = [
        ("anon", Cred::None, "carol"),
        ("stranger", basic("carol", "carol-pw"), "carol"),
        ("reader", basic("bob", "bob-pw"), "bob"),
        ("writer", basic("dave", "dave-pw"), "dave"),
        ("maintainer", basic("erin", "erin-pw"), "erin"),
        ("owner", alice.clone(), "alice"),
        ("admin", admin.clone(), "admin"),
        ("robot", basic("team+ci", &c.robot_secret), "team+ci"),
        ("pat", basic("alice", &limited), "alice"),
        ("jwt", Cred::TokenOf("alice"), "alice"),
        ("revoked", basic("alice", &revoked), "alice"),
        ("expired", Cred::Bearer(expired), "alice"),
    ]
    .into_iter()
    .map(|(key, cred, me)| Caller { key, cred, me })
    .collect();

    // Per caller, targets of its own, so that one caller's success changes nothing another
    // caller's case depends on: a user `u-KEY`, a namespace `gone-KEY`, a secret of the
    // caller's account (`{tok}`) and one of the robot (`{rtok}`), a webhook of `team` (`{wh}`);
    // and one global webhook (`{gwh}`).
    let hook = |ns: Option<&str>| {
        let mut body = json!({"url": "http://127.0.0.1:9/"});
        if let Some(ns) = ns {
            body["namespace"] = ns.into();
        }
        let reply = call(app, &admin, "POST", "/api/v1/webhooks", Some(&body));
        expect(&reply, 201, None);
        reply.json()["id"].as_str().expect("an id").to_string()
    };
    let global_hook = hook(None);
    let mut subst: Vec<HashMap<&str, String>> = Vec::new();
    for caller in &callers {
        let k = caller.key;
        let reply = call(
            app,
            &admin,
            "POST",
            "/api/v1/users",
            Some(&json!({"name": format!("u-{k}"), "password": "pw"})),
        );
        expect(&reply, 201, None);
        let reply = call(
            app,
            &admin,
            "POST",
            "/api/v1/namespaces",
            Some(&json!({ "name": format!("gone-{k}") })),
        );
        expect(&reply, 201, None);
        let tok = create_token(app, &admin, caller.me, json!({"description": k}))["id"]
            .as_str()
            .expect("an id")
            .to_string();
        let rtok = create_token(app, &admin, "team+ci", json!({"description": k}))["id"]
            .as_str()
            .expect("an id")
            .to_string();
        subst.push(HashMap::from([
            ("{k}", k.to_string()),
            ("{me}", caller.me.to_string()),
            ("{tok}", tok),
            ("{rtok}", rtok),
            ("{wh}", hook(Some("team"))),
            ("{gwh}", global_hook.clone()),
        ]));
    }
    // The revoked secret is refused by now, and the early token has expired.
    within(Duration::from_secs(2), "revoked secret", 401, || {
        call(app, &basic("alice", &revoked), "GET", "/api/v1/me", None).status
    });
    std::thread::sleep(expires.saturating_duration_since(Instant::now()));

    // Expected statuses, by caller: [anon, stranger, reader, writer, maintainer, owner,
    // admin, robot, pat (limited), jwt, revoked, expired]. The shorthands name the rule.
    let x = 401;
    let d = 403;
    let anyone = |s| [x, s, s, s, s, s, s, s, s, s, x, x];
    let users = |s| [x, s, s, s, s, s, s, d, d, d, x, x];
    let owners = |s| [x, d, d, d, d, s, s, d, d, d, x, x];
    let admins = |s| [x, d, d, d, d, d, s, d, d, d, x, x];
    let carol_and_admins = |c, a| [x, c, d, d, d, d, a, d, d, d, x, x];
    let table: &[(&str, &str, Option<Value>, [u16; 12])] = &[
        ("GET", "/api/v1/openapi.json", None, [200; 12]),
        ("GET", "/api/v1/me", None, anyone(200)),
        ("GET", "/api/v1/users", None, admins(200)),
        (
            "POST",
            "/api/v1/users",
            Some(json!({"name": "new-{k}", "password": "pw"})),
            admins(201),
        ),
        (
            "GET",
            "/api/v1/users/carol",
            None,
            carol_and_admins(200, 200),
        ),
        ("GET", "/api/v1/users/nobody", None, admins(404)),
        (
            "PUT",
            "/api/v1/users/{me}/password",
            Some(json!({"password": "{me}-pw", "old_password": "{me}-pw"})),
            users(204),
        ),
        // Without the old password: carol must give it, an administrator need not.
        (
            "PUT",
            "/api/v1/users/carol/password",
            Some(json!({"password": "carol-pw"})),
            carol_and_admins(400, 204),
        ),
        ("DELETE", "/api/v1/users/nobody", None, admins(404)),
        ("GET", "/api/v1/namespaces", None, users(200)),
        (
            "POST",
            "/api/v1/namespaces",
            Some(json!({"name": "ns-{k}"})),
            admins(201),
        ),
        ("GET", "/api/v1/namespaces/team", None, owners(200)),
        ("GET", "/api/v1/namespaces/nowhere", None, admins(404)),
        (
            "PATCH",
            "/api/v1/namespaces/team",
            Some(json!({"public": false})),
            admins(200),
        ),
        ("DELETE", "/api/v1/namespaces/gone-{k}", None, admins(204)),
        ("GET", "/api/v1/namespaces/team/members", None, owners(200)),
        (
            "GET",
            "/api/v1/namespaces/nowhere/members",
            None,
            admins(404),
        ),
        (
            "PUT",
            "/api/v1/namespaces/team/members/u-{k}",
            Some(json!({"role": "reader"})),
            owners(200),
        ),
        (
            "DELETE",
            "/api/v1/namespaces/team/members/u-{k}",
            None,
            owners(204),
        ),
        ("GET", "/api/v1/namespaces/team/robots", None, owners(200)),
        (
            "POST",
            "/api/v1/namespaces/team/robots",
            Some(json!({"name": "r-{k}", "grants": ["team/*:pull"]})),
            owners(201),
        ),
        (
            "DELETE",
            "/api/v1/namespaces/team/robots/r-{k}",
            None,
            owners(204),
        ),
        ("GET", "/api/v1/accounts/{me}/tokens", None, users(200)),
        (
            "GET",
            "/api/v1/accounts/carol/tokens",
            None,
            carol_and_admins(200, 200),
        ),
        ("GET", "/api/v1/accounts/team+ci/tokens", None, owners(200)),
        ("GET", "/api/v1/accounts/nobody/tokens", None, admins(404)),
        (
            "POST",
            "/api/v1/accounts/{me}/tokens",
            Some(json!({})),
            users(201),
        ),
        (
            "POST",
            "/api/v1/accounts/team+ci/tokens",
            Some(json!({})),
            owners(201),
        ),
        ("DELETE", "/api/v1/tokens/{tok}", None, users(204)),
        ("DELETE", "/api/v1/tokens/{rtok}", None, owners(204)),
        ("DELETE", "/api/v1/tokens/nosuchtoken0", None, admins(404)),
        ("POST", "/api/v1/keys/rotate", None, admins(200)),
        ("GET", "/api/v1/audit", None, admins(200)),
        ("GET", "/api/v1/audit?namespace=team", None, owners(200)),
        (
            "GET",
            "/api/v1/audit?repository=team/app",
            None,
            owners(200),
        ),
        ("GET", "/api/v1/webhooks", None, users(200)),
        (
            "POST",
            "/api/v1/webhooks",
            Some(json!({"url": "http://127.0.0.1:9/", "namespace": "team"})),
            owners(201),
        ),
        (
            "POST",
            "/api/v1/webhooks",
            Some(json!({"url": "http://127.0.0.1:9/"})),
            admins(201),
        ),
        ("GET", "/api/v1/webhooks/{wh}", None, owners(200)),
        ("GET", "/api/v1/webhooks/{gwh}", None, admins(200)),
        ("GET", "/api/v1/webhooks/wh_nosuch", None, admins(404)),
        ("GET", "/api/v1/webhooks/{wh}/parked", None, owners(200)),
        ("POST", "/api/v1/webhooks/{wh}/replay", None, owners(202)),
        (
            "POST",
            "/api/v1/webhooks/wh_nosuch/replay",
            None,
            admins(404),
        ),
        ("DELETE", "/api/v1/webhooks/{wh}", None, owners(204)),
        ("GET", "/api/v1/trash", None, admins(200)),
        ("GET", "/api/v1/trash?namespace=team", None, owners(200)),
        (
            "GET",
            "/api/v1/trash?repository=team/app",
            None,
            owners(200),
        ),
        ("POST", "/api/v1/trash/999999/restore", None, admins(404)),
        ("POST", "/api/v1/gc?dry_run=true", None, admins(200)),
        ("GET", "/api/v1/quarantine", None, admins(200)),
        ("GET", "/api/v1/retention", None, users(200)),
        (
            "POST",
            "/api/v1/retention",
            Some(json!({"repositories": "team/*", "keep_last": 5})),
            owners(201),
        ),
        (
            "POST",
            "/api/v1/retention",
            Some(json!({"repositories": "*", "keep_last": 5})),
            admins(201),
        ),
        ("DELETE", "/api/v1/retention/999999", None, admins(404)),
        ("GET", "/api/v1/retention/plan", None, admins(200)),
        (
            "GET",
            "/api/v1/namespaces/team/immutability",
            None,
            owners(200),
        ),
        (
            "POST",
            "/api/v1/namespaces/team/immutability",
            Some(json!({"pattern": "p-{k}-*"})),
            owners(201),
        ),
        (
            "DELETE",
            "/api/v1/namespaces/team/immutability/p-{k}-*",
            None,
            owners(204),
        ),
        (
            "DELETE",
            "/api/v1/namespaces/team/immutability/none-{k}",
            None,
            owners(404),
        ),
        ("GET", "/api/v1/namespaces/team/quota", None, owners(200)),
        (
            "PUT",
            "/api/v1/namespaces/q-{k}/quota",
            Some(json!({"limit_bytes": 1000})),
            admins(200),
        ),
        (
            "DELETE",
            "/api/v1/namespaces/q-{k}/quota",
            None,
            admins(204),
        ),
        (
            "DELETE",
            "/api/v1/namespaces/noquota/quota",
            None,
            admins(404),
        ),
        ("DELETE", "/api/v1/users/u-{k}", None, admins(204)),
    ];
    let fill = |s: &str, vars: &HashMap<&str, String>| {
        vars.iter().fold(s.to_string(), |s, (k, v)| s.replace(k, v))
    };
    let mut failures = Vec::new();
    let mut denied_bodies = std::collections::BTreeSet::new();
    let mut covered = std::collections::BTreeSet::new();
    for (method, path, body, expected) in table {
        for ((caller, vars), want) in callers.iter().zip(&subst).zip(expected) {
            let path = fill(path, vars);
            let body = body
                .as_ref()
                .map(|b| serde_json::from_str(&fill(&b.to_string(), vars)).expect("json"));
            let reply = call(app, &caller.cred, method, &path, body.as_ref());
            covered.insert(*method);
            let case = format!("{} {method} {path}", caller.key);
            if reply.status != *want {
                failures.push(format!("{case}: want {want}, got {}", reply.describe()));
                continue;
            }
            if reply.header("cache-control") != Some("no-store") {
                failures.push(format!("{case}: no Cache-Control: no-store"));
            }
            let code = match reply.status {
                401 => Some("UNAUTHORIZED"),
                403 => Some("DENIED"),
                404 => Some("NOT_FOUND"),
                400 => Some("INVALID"),
                _ => None,
            };
            if let Some(code) = code
                && error_code(&reply.text()) != code
            {
                failures.push(format!("{case}: want {code}: {}", reply.describe()));
            }
            if reply.status == 401
                && !reply
                    .header("www-authenticate")
                    .is_some_and(|h| h.starts_with("Bearer realm="))
            {
                failures.push(format!("{case}: 401 without a Bearer challenge"));
            }
            if reply.status == 403 {
                denied_bodies.insert(reply.text());
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        table.len() * callers.len(),
        failures.join("\n")
    );
    // Every refusal reads the same, whatever the target and whether it exists.
    assert_eq!(denied_bodies.len(), 1, "{denied_bodies:?}");
    // The table covers every route the API has.
    let doc: Value = call(app, &Cred::None, "GET", "/api/v1/openapi.json", None).json();
    let mut documented = std::collections::BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("an item").keys() {
            if ["get", "put", "post", "delete", "patch"].contains(&method.as_str()) {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    let mut tested = std::collections::BTreeSet::new();
    for (method, path, _, _) in table {
        let template = documented
            .iter()
            .find(|(m, p)| m == method && template_matches(p, path))
            .unwrap_or_else(|| panic!("{method} {path} is not a documented route"));
        tested.insert(template.clone());
    }
    let untested: Vec<_> = documented.difference(&tested).collect();
    assert!(
        untested.is_empty(),
        "routes the matrix misses: {untested:?}"
    );
}

fn template_matches(template: &str, path: &str) -> bool {
    let path = path.split('?').next().unwrap_or(path);
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(t, p)| t == p || (t.starts_with('{') && t.ends_with('}')))
}

fn push_status(app: &TestApp, user: &str, password: &str) -> u16 {
    send(
        app.client()
            .get(app.url("/v2/shop/app/manifests/1"))
            .basic_auth(user, Some(password)),
    )
    .status
}

#[test]
fn an_owner_made_through_the_api_runs_a_robot_and_revokes_it() {
    let c: Cast = cast();
    let app = &c.app;
    let admin = basic("admin", "admin-pw");
    let reply = call(
        app,
        &admin,
        "POST",
        "/api/v1/users",
        Some(&json!({"name": "frank", "password": "frank-pw"})),
    );
    expect(&reply, 201, None);
    assert_eq!(reply.must_header("location"), "/api/v1/users/frank");
    assert_eq!(reply.json()["name"], "frank");
    assert_eq!(reply.json()["admin"], false);
    let reply = call(
        app,
        &admin,
        "POST",
        "/api/v1/namespaces",
        Some(&json!({"name": "shop"})),
    );
    expect(&reply, 201, None);
    assert_eq!(reply.json()["public"], false);
    let reply = call(
        app,
        &admin,
        "PUT",
        "/api/v1/namespaces/shop/members/frank",
        Some(&json!({"role": "owner"})),
    );
    expect(&reply, 200, None);
    assert_eq!(reply.json(), json!({"account": "frank", "role": "owner"}));

    // The owner sees its namespace, and only that one.
    let frank = basic("frank", "frank-pw");
    let me = call(app, &frank, "GET", "/api/v1/me", None).json();
    assert_eq!(me["roles"], json!([{"namespace": "shop", "role": "owner"}]));
    assert_eq!(me["management"], "user");
    let names: Vec<Value> = call(app, &frank, "GET", "/api/v1/namespaces", None)
        .json()
        .as_array()
        .expect("a list")
        .iter()
        .map(|n| n["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("shop")]);

    // The owner adds a robot; its secret is shown once, never cached.
    let reply = call(
        app,
        &frank,
        "POST",
        "/api/v1/namespaces/shop/robots",
        Some(&json!({"name": "ci", "grants": ["shop/*:pull,push"]})),
    );
    expect(&reply, 201, None);
    let robot = reply.json();
    assert_eq!(robot["name"], "shop+ci");
    assert_eq!(robot["grants"], json!(["shop/*:pull,push"]));
    let secret = robot["secret"].as_str().expect("a secret").to_string();
    let token_id = robot["token_id"].as_str().expect("an id").to_string();
    assert_eq!(id_of(&secret), token_id);

    // The robot pushes with it, and is identified as itself.
    push_as(app, "shop+ci", &secret, "shop/app", "1").assert_status(201);
    let me = call(app, &basic("shop+ci", &secret), "GET", "/api/v1/me", None).json();
    assert_eq!(me["kind"], "robot");
    assert_eq!(me["grants"], json!(["shop/*:pull,push"]));
    assert_eq!(me["management"], "none");

    // The owner finds the robot's secret and revokes it: refused within a second.
    let listed = call(app, &frank, "GET", "/api/v1/accounts/shop+ci/tokens", None).json();
    assert_eq!(listed[0]["id"], token_id.as_str());
    assert_eq!(listed[0]["state"], "live");
    assert!(listed[0].get("secret").is_none(), "{listed}");
    assert_eq!(push_status(app, "shop+ci", &secret), 200);
    let reply = call(
        app,
        &frank,
        "DELETE",
        &format!("/api/v1/tokens/{token_id}"),
        None,
    );
    expect(&reply, 204, None);
    within(Duration::from_secs(1), "revoked robot", 401, || {
        push_status(app, "shop+ci", &secret)
    });
    let listed = call(app, &frank, "GET", "/api/v1/accounts/shop+ci/tokens", None).json();
    assert_eq!(listed[0]["state"], "revoked");

    // A personal token made through the API is a password.
    let pat = create_token(app, &frank, "frank", json!({"description": "laptop"}));
    assert_eq!(pat["kind"], "personal");
    assert_eq!(pat["grants"], Value::Null);
    let pat = pat["secret"].as_str().expect("a secret").to_string();
    assert_eq!(push_status(app, "frank", &pat), 200);
    push_as(app, "frank", &pat, "shop/app", "2").assert_status(201);
    let me = call(app, &basic("frank", &pat), "GET", "/api/v1/me", None).json();
    assert_eq!(me["authenticated_by"], "secret");
    assert_eq!(me["credential"], id_of(&pat).as_str());
}

#[test]
fn users_change_their_own_password_only_with_the_old_one() {
    let c = cast();
    let app = &c.app;
    let carol = basic("carol", "carol-pw");
    let change = |cred: &Cred, body: Value| {
        call(
            app,
            cred,
            "PUT",
            "/api/v1/users/carol/password",
            Some(&body),
        )
    };
    let pat = create_token(app, &carol, "carol", json!({}))["secret"]
        .as_str()
        .expect("a secret")
        .to_string();
    expect(
        &change(&carol, json!({"password": "new"})),
        400,
        Some("INVALID"),
    );
    expect(
        &change(&carol, json!({"password": "new", "old_password": "wrong"})),
        403,
        Some("DENIED"),
    );
    // A personal token may not stand in for the password it would replace.
    let by_token = basic("carol", &pat);
    expect(
        &change(&by_token, json!({"password": "new", "old_password": pat})),
        403,
        Some("DENIED"),
    );
    expect(
        &change(
            &by_token,
            json!({"password": "new", "old_password": "carol-pw"}),
        ),
        204,
        None,
    );
    within(Duration::from_secs(2), "old password", 401, || {
        call(app, &carol, "GET", "/api/v1/me", None).status
    });
    let reply = call(app, &basic("carol", "new"), "GET", "/api/v1/me", None);
    expect(&reply, 200, None);
    // An administrator sets another's password without the old one.
    let reply = call(
        app,
        &basic("admin", "admin-pw"),
        "PUT",
        "/api/v1/users/carol/password",
        Some(&json!({"password": "carol-pw"})),
    );
    expect(&reply, 204, None);
    within(Duration::from_secs(2), "reset password", 200, || {
        call(app, &carol, "GET", "/api/v1/me", None).status
    });
    // Guessing the old password is throttled like logging in (10 failures a minute, the two
    // wrong ones above included).
    let guess = json!({"password": "new", "old_password": "guess"});
    let statuses: Vec<u16> = (0..10)
        .map(|_| change(&carol, guess.clone()).status)
        .collect();
    assert_eq!(statuses, [[403; 8].as_slice(), &[429; 2]].concat());
    let reply = change(
        &carol,
        json!({"password": "new", "old_password": "carol-pw"}),
    );
    expect(&reply, 429, Some("TOOMANYREQUESTS"));
    assert!(
        reply.header("retry-after").is_some(),
        "{}",
        reply.describe()
    );
}

#[test]
fn mistakes_get_the_registry_error_body() {
    let c = cast();
    let app = &c.app;
    let admin = basic("admin", "admin-pw");
    // As an administrator: `METHOD PATH`, a body (or none), `STATUS CODE`.
    let check = |request: &str, body: &str, want: &str| {
        let (method, path) = request.split_once(' ').expect("METHOD PATH");
        let mut req = app
            .client()
            .request(method.parse().expect("a method"), app.url(path))
            .basic_auth("admin", Some("admin-pw"));
        if !body.is_empty() {
            req = req.body(body.to_string());
        }
        let reply = send(req);
        let got = format!("{} {}", reply.status, error_code(&reply.text()));
        assert_eq!(got, want, "{request} {body:?}: {}", reply.describe());
    };
    check("POST /api/v1/users", "{not json", "400 INVALID");
    check(
        "POST /api/v1/users",
        r#"{"name":"x","password":"p","admn":true}"#,
        "400 INVALID",
    );
    check(
        "POST /api/v1/users",
        r#"{"name":"Bad Name","password":"p"}"#,
        "400 INVALID",
    );
    check(
        "POST /api/v1/users",
        r#"{"name":"x","password":""}"#,
        "400 INVALID",
    );
    check(
        "POST /api/v1/users",
        r#"{"name":"alice","password":"p"}"#,
        "409 CONFLICT",
    );
    check(
        "POST /api/v1/namespaces",
        r#"{"name":"team"}"#,
        "409 CONFLICT",
    );
    check(
        "POST /api/v1/namespaces",
        r#"{"name":"a/b"}"#,
        "400 INVALID",
    );
    check(
        "POST /api/v1/namespaces",
        r#"{"name":"n","owner":"nobody"}"#,
        "404 NOT_FOUND",
    );
    check("PATCH /api/v1/namespaces/team", r#"{}"#, "400 INVALID");
    check(
        "PUT /api/v1/namespaces/team/members/bob",
        r#"{"role":"king"}"#,
        "400 INVALID",
    );
    check(
        "PUT /api/v1/namespaces/team/members/nobody",
        r#"{"role":"reader"}"#,
        "404 NOT_FOUND",
    );
    check(
        "PUT /api/v1/namespaces/nowhere/members/bob",
        r#"{"role":"reader"}"#,
        "404 NOT_FOUND",
    );
    check(
        "DELETE /api/v1/namespaces/team/members/carol",
        "",
        "404 NOT_FOUND",
    );
    let robots = "POST /api/v1/namespaces/team/robots";
    check(
        robots,
        r#"{"name":"x","grants":["lib/*:pull"]}"#,
        "400 INVALID",
    );
    check(
        robots,
        r#"{"name":"x","grants":["team/*:fly"]}"#,
        "400 INVALID",
    );
    check(robots, r#"{"name":"x","grants":[]}"#, "400 INVALID");
    check(
        robots,
        r#"{"name":"ci","grants":["team/*:pull"]}"#,
        "409 CONFLICT",
    );
    check(
        robots,
        r#"{"name":"y","grants":["team/*:pull"],"expires_in_days":0}"#,
        "400 INVALID",
    );
    check(
        "DELETE /api/v1/namespaces/lib/robots/ci",
        "",
        "404 NOT_FOUND",
    );
    check(
        "POST /api/v1/accounts/team+ci/tokens",
        r#"{"grants":["team/*:pull"]}"#,
        "400 INVALID",
    );
    check(
        "POST /api/v1/accounts/alice/tokens",
        r#"{"grants":[]}"#,
        "400 INVALID",
    );
    check("DELETE /api/v1/users/team+ci", "", "404 NOT_FOUND");
    check(
        "PUT /api/v1/users/team+ci/password",
        r#"{"password":"p"}"#,
        "404 NOT_FOUND",
    );
    check("GET /api/v1/nothing", "", "404 UNSUPPORTED");
    check("GET /api/v1/users/", "", "404 UNSUPPORTED");
    check("PATCH /api/v1/users", "", "405 UNSUPPORTED");
    let reply = call(app, &admin, "PATCH", "/api/v1/users", None);
    assert_eq!(reply.header("allow"), Some("GET, POST"));
    // A revoked token is revoked once.
    let id = create_token(app, &admin, "admin", json!({}))["id"]
        .as_str()
        .expect("an id")
        .to_string();
    let path = format!("/api/v1/tokens/{id}");
    expect(&call(app, &admin, "DELETE", &path, None), 204, None);
    expect(
        &call(app, &admin, "DELETE", &path, None),
        404,
        Some("NOT_FOUND"),
    );
    // Bad credentials are refused before anything else.
    let reply = call(app, &basic("alice", "wrong"), "GET", "/api/v1/me", None);
    expect(&reply, 401, Some("UNAUTHORIZED"));
}

#[test]
fn with_access_control_off_the_api_is_open() {
    let app = TestApp::start();
    let anyone = Cred::None;
    let me = call(&app, &anyone, "GET", "/api/v1/me", None);
    expect(&me, 200, None);
    assert_eq!(me.json()["access_control"], false);
    assert_eq!(me.json()["admin"], true);
    let reply = call(
        &app,
        &anyone,
        "POST",
        "/api/v1/users",
        Some(&json!({"name": "zed", "password": "pw"})),
    );
    expect(&reply, 201, None);
    let users = call(&app, &anyone, "GET", "/api/v1/users", None).json();
    assert_eq!(users[0]["name"], "zed");
    // As on `/v2`, whatever a client sends is not even parsed.
    let reply = call(
        &app,
        &Cred::Bearer("garbage".into()),
        "GET",
        "/api/v1/me",
        None,
    );
    expect(&reply, 200, None);
}
