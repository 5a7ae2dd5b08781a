//! Configuration as the process sees it: out-of-range values refused at start, and the file <
//! environment < flag precedence for keys beyond the ones `lifecycle` checks.

use crate::support::{TestApp, clean_command, output_within};

/// Starts `berth serve` with one bad setting given through `how`; it must exit non-zero and
/// name the key on stderr.
fn refused(how: &str, key: &str, value: &str) -> String {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut cmd = clean_command(tmp.path());
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(tmp.path().join("data"));
    match how {
        "file" => {
            let file = tmp.path().join("berth.toml");
            std::fs::write(&file, format!("{key} = {value}\n")).expect("write config");
            cmd.arg("--config").arg(file);
        }
        "env" => {
            cmd.env(format!("BERTH_{}", key.to_uppercase()), value);
        }
        "flag" => {
            cmd.arg(format!("--{}={value}", key.replace('_', "-")));
        }
        other => panic!("unknown source {other}"),
    }
    let out = output_within(cmd, &format!("berth with {key} = {value} from {how}"));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "berth accepted {key} = {value} from {how}"
    );
    assert!(
        err.contains(key) || err.contains(&key.replace('_', "-")),
        "the error for {key} = {value} from {how} does not name the key:\n{err}"
    );
    err
}

#[test]
fn out_of_range_settings_are_refused_at_start_naming_the_key() {
    let two_to_the_63 = "9223372036854775808";
    let cases = [
        ("env", "upload_idle_timeout_secs", two_to_the_63),
        ("file", "upload_idle_timeout_secs", two_to_the_63),
        ("flag", "upload_idle_timeout_secs", two_to_the_63),
        ("env", "upload_idle_timeout_secs", "18446744073709551616"),
        ("env", "shutdown_grace_secs", "100000"),
        ("file", "header_read_timeout_secs", "0"),
        ("env", "body_idle_timeout_secs", "0"),
        ("env", "max_connections", "0"),
        ("file", "max_blob_bytes", "0"),
        ("env", "upload_purge_interval_secs", "0"),
    ];
    for (how, key, value) in cases {
        let err = refused(how, key, value);
        if value == two_to_the_63 {
            assert!(
                err.contains("at most"),
                "{how}: the error does not say what the limit is:\n{err}"
            );
        }
    }
}

/// A collector configured for a binary that cannot export must stop the start, not be ignored.
#[cfg(not(feature = "otel"))]
#[test]
fn otel_endpoint_without_the_otel_feature_is_refused_naming_the_feature() {
    let url = "http://127.0.0.1:4318";
    for (how, value) in [
        ("file", format!("{url:?}")),
        ("env", url.to_string()),
        ("flag", url.to_string()),
    ] {
        let err = refused(how, "otel_endpoint", &value);
        assert!(
            err.contains("`otel` feature"),
            "{how}: the error does not name the feature:\n{err}"
        );
    }
}

/// PUT a manifest of `size` bytes that refers to nothing: 413 when the size limit refuses it,
/// another status (it is invalid) when the limit lets it through.
fn manifest_put_status(app: &TestApp, size: usize) -> u16 {
    let mut body = br#"{"schemaVersion":2,"pad":""#.to_vec();
    body.resize(size - 2, b'x');
    body.extend_from_slice(br#""}"#);
    app.put_manifest(
        "cfg/limit",
        "v1",
        "application/vnd.oci.image.manifest.v1+json",
        &body,
    )
    .status
}

#[test]
fn a_numeric_key_follows_file_then_env_then_flag() {
    let tmp = tempfile::tempdir().expect("tmp");
    let file = tmp.path().join("berth.toml");
    std::fs::write(&file, "max_manifest_bytes = 1000\n").expect("write config");
    let file = file.display().to_string();
    let cases = [
        ("file", vec![], None, 1000),
        ("file + env", vec![], Some("2000"), 2000),
        (
            "file + env + flag",
            vec!["--max-manifest-bytes", "3000"],
            Some("2000"),
            3000,
        ),
    ];
    for (what, flags, env, limit) in cases {
        let mut builder = TestApp::builder().arg("--config").arg(&file);
        for f in flags {
            builder = builder.arg(f);
        }
        if let Some(v) = env {
            builder = builder.env("BERTH_MAX_MANIFEST_BYTES", v);
        }
        let app = builder.start();
        assert_eq!(
            manifest_put_status(&app, limit + 1),
            413,
            "{what}: a manifest one byte over {limit}"
        );
        assert_ne!(
            manifest_put_status(&app, limit),
            413,
            "{what}: a manifest of exactly {limit} bytes"
        );
    }
}
