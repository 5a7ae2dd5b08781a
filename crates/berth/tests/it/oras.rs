//! oras-py (PyPI's `oras`, the ORAS Python SDK) as a third-party client of Berth's token auth.
//! It logs in with basic credentials and then does the Docker token flow on its own (401 with a
//! `Bearer realm=...` challenge, a token from the realm, the request again with it), so these
//! tests show the token endpoint works for a client Berth's authors did not write.
//!
//! The client runs in the venv `scripts/test.sh` makes (`target/oras-venv`), named by
//! `BERTH_TEST_ORAS_PYTHON`; `oras_driver.py` (next to this file) does one push or pull per run.

use std::path::PathBuf;

use crate::auth::{admin, cast, token};
use crate::support::clients::{Ran, Tools, pseudo_random};
use crate::support::*;

const DRIVER: &str = include_str!("oras_driver.py");

/// oras-py in a sandbox of its own (HOME, where its login writes the docker config).
struct Oras {
    python: String,
    driver: PathBuf,
    host: String,
    tools: Tools,
}

impl Oras {
    fn new(app: &TestApp) -> Oras {
        let python = std::env::var("BERTH_TEST_ORAS_PYTHON").unwrap_or_else(|_| {
            panic!(
                "BERTH_TEST_ORAS_PYTHON is not set. The oras-py tests need a Python with PyPI's \
                 `oras` installed: run scripts/test.sh (it makes target/oras-venv), or set it to \
                 such a python, e.g. BERTH_TEST_ORAS_PYTHON=$PWD/target/oras-venv/bin/python"
            )
        });
        assert!(
            std::path::Path::new(&python).exists(),
            "BERTH_TEST_ORAS_PYTHON={python} does not exist; scripts/test.sh makes it"
        );
        let tools = Tools::new();
        let driver = tools.path("oras_driver.py");
        std::fs::write(&driver, DRIVER).expect("write oras_driver.py");
        Oras {
            python,
            driver,
            host: app.host.clone(),
            tools,
        }
    }

    fn run(&self, command: &str, reference: &str, path: &str, creds: Creds) -> Result<Ran, String> {
        let mut args = vec![
            self.driver.display().to_string(),
            command.to_string(),
            self.host.clone(),
            reference.to_string(),
            path.to_string(),
        ];
        if let Some((user, password)) = creds {
            args.extend([user.to_string(), password.to_string()]);
        }
        self.tools.try_run(&self.python, &args)
    }

    /// Pushes `bytes` as the artifact's one file, `name`.
    fn push(&self, reference: &str, name: &str, bytes: &[u8], creds: Creds) -> Result<Ran, String> {
        std::fs::write(self.tools.path(name), bytes).expect("write the file to push");
        self.run("push", reference, name, creds)
    }

    /// Pulls the artifact into a fresh directory; returns the bytes of its one file, `name`.
    fn pull(&self, reference: &str, name: &str, creds: Creds) -> Vec<u8> {
        let out = tempfile::tempdir_in(&self.tools.dir).expect("tempdir");
        let ran = self
            .run("pull", reference, &out.path().display().to_string(), creds)
            .unwrap_or_else(|e| panic!("pull {reference}: {e}"));
        let pulled = out.path().join(name);
        assert_eq!(
            ran.stdout.trim(),
            pulled.display().to_string(),
            "pull {reference}: {}",
            ran.stderr
        );
        std::fs::read(&pulled).expect("read the pulled file")
    }
}

type Creds<'a> = Option<(&'a str, &'a str)>;

/// The push fails, and oras-py's message shows the registry's answer: `status`, as the OCI error
/// code in the body it quotes ("Issue retrieving session url: {...}") or as the reason phrase
/// ("Issue with URL: Forbidden"), depending on the request that failed.
fn assert_refused(pushed: Result<Ran, String>, status: u16) {
    let (code, reason) = match status {
        401 => ("'UNAUTHORIZED'", ": Unauthorized\n"),
        403 => ("'DENIED'", ": Forbidden\n"),
        _ => unreachable!("a refusal is 401 or 403"),
    };
    match pushed {
        Ok(ran) => panic!("the push succeeded\n{}", ran.stderr),
        Err(e) => assert!(e.contains(code) || e.contains(reason), "not {status}: {e}"),
    }
}

#[test]
fn oras_py_pushes_and_pulls_with_a_password_a_robot_secret_and_a_personal_token() {
    let c = cast();
    let oras = Oras::new(&c.app);
    let pat = admin(c.app.data_dir(), &["token", "add", "alice"], "")
        .trim()
        .to_string();
    for (i, (kind, user, secret)) in [
        ("password", "alice", "alice-pw"),
        ("robot", "team+ci", c.robot_secret.as_str()),
        ("token", "alice", pat.as_str()),
    ]
    .into_iter()
    .enumerate()
    {
        let reference = format!("team/{kind}:1");
        let bytes = pseudo_random(i as u64, 300_000);
        if let Err(e) = oras.push(&reference, "notes.bin", &bytes, Some((user, secret))) {
            panic!("push {reference} as {user} with a {kind}: {e}");
        }
        assert!(
            oras.pull(&reference, "notes.bin", Some((user, secret))) == bytes,
            "{kind}: the pulled file differs from the pushed one"
        );
        // A reader gets what the writer pushed.
        assert!(oras.pull(&reference, "notes.bin", Some(("bob", "bob-pw"))) == bytes);
    }
}

#[test]
fn oras_py_is_refused_without_credentials_or_push_rights_and_told_the_scope_it_lacks() {
    let c = cast();
    let oras = Oras::new(&c.app);
    let push = |who: Creds| oras.push("team/app:1", "a.txt", b"not welcome\n", who);
    assert_refused(push(None), 401);
    assert_refused(push(Some(("bob", "bob-pw"))), 403);
    assert_refused(push(Some(("carol", "carol-pw"))), 403);
    // Nothing of theirs arrived.
    let reply = send(
        c.app
            .client()
            .get(c.app.url("/v2/team/app/tags/list"))
            .basic_auth("alice", Some("alice-pw")),
    );
    assert_error(&reply, 404, "NAME_UNKNOWN");

    // What lets oras-py push at all: its blob HEAD gets it a pull token, and the upload that
    // token cannot start must say which scope to ask for instead.
    let t = token(
        &c.app,
        Some(("alice", "alice-pw")),
        &["repository:team/app:pull"],
    );
    let reply = send(
        c.app
            .client()
            .post(c.app.url("/v2/team/app/blobs/uploads/"))
            .bearer_auth(t["token"].as_str().expect("token")),
    );
    assert_error(&reply, 403, "DENIED");
    assert_eq!(
        reply.must_header("www-authenticate"),
        format!(
            "Bearer realm=\"http://{}/auth/token\",service=\"berth\",\
             scope=\"repository:team/app:pull,push\",error=\"insufficient_scope\"",
            c.app.host
        )
    );
}
