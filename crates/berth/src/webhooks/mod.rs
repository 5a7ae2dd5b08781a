//! Webhooks: subscriptions to the event log, delivered as signed CloudEvents.
//!
//! A subscription (global, or for one namespace; filtered by event kinds and repository globs)
//! is a row in the metadata store with a cursor into the event log. [`worker`] delivers each
//! wanted event after the cursor, in order, and moves the cursor only once the receiver said
//! 2xx (or the delivery was parked), in a transaction fenced by the subscription's lease. So
//! what is delivered is what was committed, a crash re-sends at most the delivery in flight,
//! and on several nodes one node at a time delivers for a subscription.
//!
//! This module holds what a subscription is (validation, filters, the payload and its
//! signature) and the operations the management API calls; HTTP types stay in `api` and in
//! the worker's client.

pub mod worker;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::auth::conditions::glob_match;
use crate::auth::manage::ManageError;
use crate::metadata::events::Event;
use crate::metadata::webhooks::{self as queries, NewWebhook, Parked, WebhookRow};
use crate::metadata::{Metadata, MetadataError, events};

/// Event kinds and the CloudEvents `type` each is delivered as. A kind not listed here (a
/// later version's) is delivered as `io.berth.<kind>`.
pub const TYPES: &[(&str, &str)] = &[
    ("manifest.pushed", "io.berth.push"),
    ("manifest.deleted", "io.berth.delete"),
    ("tag.deleted", "io.berth.tag.delete"),
    ("blob.deleted", "io.berth.blob.delete"),
    ("blob.mounted", "io.berth.mount"),
    ("blob.quarantined", "io.berth.blob.quarantine"),
    ("blob.released", "io.berth.blob.release"),
    ("blob.repaired", "io.berth.blob.repair"),
    ("login.succeeded", "io.berth.login"),
    ("login.failed", "io.berth.login.failed"),
    ("token.issued", "io.berth.token"),
];

/// The CloudEvents `type` of an event kind.
pub fn event_type(kind: &str) -> String {
    TYPES
        .iter()
        .find(|(k, _)| *k == kind)
        .map_or_else(|| format!("io.berth.{kind}"), |(_, t)| (*t).to_string())
}

/// Shortest and longest signing key accepted, in bytes (Standard Webhooks: 24 to 64).
const MIN_KEY_BYTES: usize = 24;
const MAX_KEY_BYTES: usize = 64;

/// The key of a `whsec_<base64>` secret.
pub fn secret_key(secret: &str) -> Result<Vec<u8>, String> {
    let encoded = secret
        .strip_prefix("whsec_")
        .ok_or("a webhook secret is whsec_ followed by base64 of the key")?;
    let key = BASE64
        .decode(encoded)
        .map_err(|e| format!("the webhook secret's key is not base64: {e}"))?;
    if !(MIN_KEY_BYTES..=MAX_KEY_BYTES).contains(&key.len()) {
        return Err(format!(
            "the webhook secret's key is {} bytes; it must be {MIN_KEY_BYTES} to {MAX_KEY_BYTES}",
            key.len()
        ));
    }
    Ok(key)
}

/// A new random secret (32 bytes of key).
pub fn generate_secret() -> String {
    let mut key = [0u8; 32];
    #[allow(clippy::expect_used)] // as for every other secret: no randomness, no registry
    aws_lc_rs::rand::fill(&mut key).expect("the system random source works");
    format!("whsec_{}", BASE64.encode(key))
}

/// `v1,<base64 of HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`, the Standard Webhooks
/// signature.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length; the error cannot happen.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
}

/// What a subscription is, as the config file and the API give it, before validation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    /// The config file's name for it (its id is `config-<name>`); the API makes ids itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub url: String,
    /// `whsec_` + base64 of the key. The API generates one when it is left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Config file only: read the secret from this file (trailing whitespace ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<std::path::PathBuf>,
    /// Only events of repositories in this namespace; none: every event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Event kinds (`manifest.pushed`) or types (`io.berth.push`); empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<String>,
    /// Repository globs (`*` any run of characters, `/` included; `?` one); empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repositories: Vec<String>,
}

/// Checks a spec into the row to store under `id`.
fn checked(spec: WebhookSpec, id: String, origin: &'static str) -> Result<NewWebhook, String> {
    let url = reqwest::Url::parse(&spec.url).map_err(|e| format!("url {:?}: {e}", spec.url))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!("url {:?} must be http:// or https://", spec.url));
    }
    let secret = match (spec.secret, spec.secret_file) {
        (Some(_), Some(_)) => return Err("set secret or secret_file, not both".to_string()),
        (Some(s), None) => s,
        (None, Some(file)) => std::fs::read_to_string(&file)
            .map_err(|e| format!("reading {}: {e}", file.display()))?
            .trim_end()
            .to_string(),
        (None, None) if origin == "api" => generate_secret(),
        (None, None) => return Err("a webhook needs a secret (or secret_file)".to_string()),
    };
    secret_key(&secret)?;
    for kind in &spec.events {
        if !TYPES.iter().any(|(k, t)| k == kind || t == kind) {
            let known: Vec<&str> = TYPES.iter().map(|(k, _)| *k).collect();
            return Err(format!(
                "unknown event {kind:?}: use one of {} or its io.berth.* type",
                known.join(", ")
            ));
        }
    }
    if let Some(ns) = &spec.namespace
        && !crate::auth::manage::valid_namespace(ns)
    {
        return Err(format!("namespace {ns:?} is not a valid namespace name"));
    }
    if spec
        .repositories
        .iter()
        .any(|p| p.is_empty() || p.len() > 255)
    {
        return Err("a repository pattern is 1 to 255 characters".to_string());
    }
    Ok(NewWebhook {
        id,
        namespace: spec.namespace,
        url: spec.url,
        secret,
        events: spec.events,
        repositories: spec.repositories,
        origin,
    })
}

/// Validates the config file's `[[webhooks]]` into rows with stable ids: `config-<name>`, or
/// `config-` and 12 hex digits of the SHA-256 of the URL and namespace when unnamed, so that a
/// subscription keeps its cursor across restarts whatever the order of the tables.
pub fn from_config(specs: Vec<WebhookSpec>) -> Result<Vec<NewWebhook>, String> {
    let mut out: Vec<NewWebhook> = Vec::with_capacity(specs.len());
    for (i, spec) in specs.into_iter().enumerate() {
        let id = match &spec.name {
            Some(name) => {
                let ok = !name.is_empty()
                    && name.len() <= 64
                    && name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
                if !ok {
                    return Err(format!(
                        "webhooks[{i}]: name {name:?} must be 1 to 64 of a-z, 0-9 and -"
                    ));
                }
                format!("config-{name}")
            }
            None => {
                let h = Sha256::digest(
                    format!("{}\n{}", spec.url, spec.namespace.as_deref().unwrap_or("")).as_bytes(),
                );
                let hex: String = h.iter().take(6).map(|b| format!("{b:02x}")).collect();
                format!("config-{hex}")
            }
        };
        if out.iter().any(|w| w.id == id) {
            return Err(format!(
                "webhooks[{i}]: two webhooks are both {id}; give them distinct names"
            ));
        }
        out.push(checked(spec, id, "config").map_err(|e| format!("webhooks[{i}]: {e}"))?);
    }
    Ok(out)
}

/// Makes the stored config subscriptions those of the config file: new ones are added (from
/// the log's head on), changed ones updated (their delivery state kept), removed ones deleted.
pub async fn sync_config(md: &Metadata, wanted: &[NewWebhook]) -> Result<(), MetadataError> {
    let now = crate::metadata::queries::now_secs();
    md.write(|tx| {
        Box::pin(async move {
            for w in wanted {
                if !queries::insert(tx, w, now).await? {
                    queries::update_definition(tx, w).await?;
                }
            }
            for row in queries::list(tx).await? {
                if row.origin == "config" && !wanted.iter().any(|w| w.id == row.id) {
                    queries::delete(tx, &row.id).await?;
                }
            }
            Ok(())
        })
    })
    .await
}

/// Whether a subscription wants an event.
pub fn wants(hook: &WebhookRow, event: &Event) -> bool {
    let e = &event.event;
    let repo = e.repository.as_deref();
    if let Some(ns) = &hook.namespace {
        let in_ns = repo.is_some_and(|r| {
            r.strip_prefix(ns.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        });
        if !in_ns {
            return false;
        }
    }
    if !hook.events.is_empty() {
        let ty = event_type(&e.kind);
        if !hook.events.iter().any(|k| *k == e.kind || *k == ty) {
            return false;
        }
    }
    if !hook.repositories.is_empty() {
        let Some(repo) = repo else { return false };
        if !hook.repositories.iter().any(|p| glob_match(p, repo)) {
            return false;
        }
    }
    true
}

/// The CloudEvents id of an event: stable across retries, nodes and restarts (the hash chain
/// makes it unique to this log), so receivers can drop duplicates.
pub fn event_id(event: &Event) -> String {
    format!("evt_{}_{}", event.seq, event.hash.get(..16).unwrap_or(""))
}

/// The event as a CloudEvents 1.0 JSON event (structured mode).
pub fn cloudevent(source: &str, event: &Event) -> serde_json::Value {
    let e = &event.event;
    let detail = e
        .detail
        .as_deref()
        .and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok());
    let media_type = detail
        .as_ref()
        .and_then(|d| d.get("media_type"))
        .and_then(|m| m.as_str());
    let mut data = serde_json::json!({
        "seq": event.seq,
        "kind": e.kind,
        "repository": e.repository,
        "digest": e.digest,
        "tag": e.tags.first(),
        "tags": e.tags,
        "actor": e.actor,
        "client_addr": e.client_addr,
        "user_agent": e.user_agent,
        "request_id": e.request_id,
        "size": e.size,
        "result": e.result,
    });
    if let Some(media_type) = media_type {
        data["media_type"] = media_type.into();
    }
    if let Some(detail) = detail {
        data["detail"] = detail;
    }
    let mut ce = serde_json::json!({
        "specversion": "1.0",
        "id": event_id(event),
        "source": source,
        "type": event_type(&e.kind),
        "time": rfc3339_ms(event.at_ms),
        "datacontenttype": "application/json",
        "data": data,
    });
    if let Some(repo) = &e.repository {
        ce["subject"] = repo.as_str().into();
    }
    ce
}

fn rfc3339_ms(at_ms: i64) -> String {
    let secs = crate::time::rfc3339(at_ms.div_euclid(1000));
    let ms = at_ms.rem_euclid(1000);
    match secs.strip_suffix('Z') {
        Some(s) => format!("{s}.{ms:03}Z"),
        None => secs,
    }
}

/// A subscription and where its delivery stands, as the management API shows it.
#[derive(Debug, Clone)]
pub struct Status {
    pub hook: WebhookRow,
    /// The last event in the log.
    pub head: i64,
    /// Parked deliveries, and how many of them are queued again.
    pub parked: i64,
    pub replay_queued: i64,
}

fn not_found(id: &str) -> ManageError {
    ManageError::NotFound(format!("no webhook {id:?}"))
}

/// Adds a subscription made through the API; it receives events from now on.
pub async fn create(md: &Metadata, spec: WebhookSpec) -> Result<NewWebhook, ManageError> {
    if spec.name.is_some() || spec.secret_file.is_some() {
        return Err(ManageError::Invalid(
            "name and secret_file are config-file keys".to_string(),
        ));
    }
    let mut raw = [0u8; 8];
    #[allow(clippy::expect_used)]
    aws_lc_rs::rand::fill(&mut raw).expect("the system random source works");
    let id = format!(
        "wh_{}",
        raw.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let new = checked(spec, id, "api").map_err(ManageError::Invalid)?;
    let now = crate::metadata::queries::now_secs();
    let new_ref = &new;
    let inserted = md
        .write(|tx| Box::pin(async move { queries::insert(tx, new_ref, now).await }))
        .await?;
    if !inserted {
        return Err(ManageError::Conflict("webhook id taken; try again".into()));
    }
    Ok(new)
}

/// The subscription, or `None`.
pub async fn get(md: &Metadata, id: &str) -> Result<Option<WebhookRow>, ManageError> {
    Ok(md.read(|tx| Box::pin(queries::get(tx, id))).await?)
}

pub async fn list(md: &Metadata) -> Result<Vec<WebhookRow>, ManageError> {
    Ok(md.read(|tx| Box::pin(queries::list(tx))).await?)
}

/// The sequence number of the last event in the log.
pub async fn head(md: &Metadata) -> Result<i64, ManageError> {
    Ok(md
        .read(|tx| Box::pin(async move { events::head(tx).await.map(|(seq, _)| seq) }))
        .await?)
}

/// The subscription with its delivery state.
pub async fn status(md: &Metadata, id: &str) -> Result<Status, ManageError> {
    md.read(|tx| {
        Box::pin(async move {
            let Some(hook) = queries::get(tx, id).await? else {
                return Ok(Err(not_found(id)));
            };
            let (head, _) = events::head(tx).await?;
            let (parked, replay_queued) = queries::parked_counts(tx, id).await?;
            Ok(Ok(Status {
                hook,
                head,
                parked,
                replay_queued,
            }))
        })
    })
    .await?
}

/// Removes a subscription made through the API (one from the config file would come back at
/// the next start: remove it there).
pub async fn delete(md: &Metadata, id: &str) -> Result<(), ManageError> {
    let Some(hook) = get(md, id).await? else {
        return Err(not_found(id));
    };
    if hook.origin == "config" {
        return Err(ManageError::Conflict(format!(
            "webhook {id} is defined in the config file; remove it there"
        )));
    }
    if md.write(|tx| Box::pin(queries::delete(tx, id))).await? {
        Ok(())
    } else {
        Err(not_found(id))
    }
}

/// Parked deliveries after `after`, at most `limit`.
pub async fn parked(
    md: &Metadata,
    id: &str,
    after: i64,
    limit: i64,
) -> Result<Vec<Parked>, ManageError> {
    Ok(md
        .read(|tx| Box::pin(queries::parked(tx, id, after, limit)))
        .await?)
}

/// Queues every parked delivery again: the worker delivers them, lowest first, before any
/// event after the cursor. How many were queued.
pub async fn replay(md: &Metadata, id: &str) -> Result<u64, ManageError> {
    Ok(md.write(|tx| Box::pin(queries::replay_all(tx, id))).await?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::metadata::events::NewEvent;
    use crate::metadata::webhooks::DeliveryState;

    /// The example of the Standard Webhooks specification (its reference test vector).
    #[test]
    fn signs_as_standard_webhooks_does() {
        let key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn secrets_must_be_whsec_base64_of_a_key() {
        assert!(secret_key("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(secret_key("whsec_!!").is_err());
        assert!(
            secret_key("whsec_c2hvcnQ=").is_err(),
            "5 bytes is too short"
        );
        assert!(secret_key(&generate_secret()).is_ok());
    }

    fn hook(namespace: Option<&str>, events: &[&str], repositories: &[&str]) -> WebhookRow {
        WebhookRow {
            id: "wh".into(),
            namespace: namespace.map(Into::into),
            url: "http://x".into(),
            secret: String::new(),
            events: events.iter().map(|s| s.to_string()).collect(),
            repositories: repositories.iter().map(|s| s.to_string()).collect(),
            origin: "api".into(),
            created_at: 0,
            state: DeliveryState::default(),
        }
    }

    fn event(kind: &str, repository: Option<&str>) -> Event {
        Event {
            seq: 7,
            at_ms: 1_764_633_600_123,
            event: NewEvent {
                kind: kind.into(),
                repository: repository.map(Into::into),
                ..NewEvent::default()
            },
            prev_hash: String::new(),
            hash: "0123456789abcdef0123".into(),
        }
    }

    #[test]
    fn filters() {
        let cases: &[(WebhookRow, &str, Option<&str>, bool)] = &[
            (hook(None, &[], &[]), "login.failed", None, true),
            (hook(None, &[], &[]), "manifest.pushed", Some("a/b"), true),
            (
                hook(Some("team"), &[], &[]),
                "manifest.pushed",
                Some("team/app"),
                true,
            ),
            (
                hook(Some("team"), &[], &[]),
                "manifest.pushed",
                Some("team"),
                true,
            ),
            (
                hook(Some("team"), &[], &[]),
                "manifest.pushed",
                Some("teams/app"),
                false,
            ),
            (hook(Some("team"), &[], &[]), "login.succeeded", None, false),
            (
                hook(None, &["io.berth.push"], &[]),
                "manifest.pushed",
                Some("a"),
                true,
            ),
            (
                hook(None, &["manifest.pushed"], &[]),
                "manifest.pushed",
                Some("a"),
                true,
            ),
            (
                hook(None, &["io.berth.push"], &[]),
                "tag.deleted",
                Some("a"),
                false,
            ),
            (
                hook(None, &[], &["prod/*"]),
                "manifest.pushed",
                Some("prod/web"),
                true,
            ),
            (
                hook(None, &[], &["prod/*"]),
                "manifest.pushed",
                Some("dev/web"),
                false,
            ),
            (hook(None, &[], &["prod/*"]), "login.failed", None, false),
            (
                hook(None, &[], &["a", "b?"]),
                "blob.mounted",
                Some("bc"),
                true,
            ),
        ];
        for (h, kind, repo, want) in cases {
            assert_eq!(
                wants(h, &event(kind, *repo)),
                *want,
                "{kind} {repo:?} for {:?} {:?} {:?}",
                h.namespace,
                h.events,
                h.repositories
            );
        }
    }

    #[test]
    fn cloudevent_fields() {
        let mut e = event("manifest.pushed", Some("team/app"));
        e.event.digest = Some("sha256:ab".into());
        e.event.tags = vec!["v1".into(), "latest".into()];
        e.event.detail =
            Some(r#"{"media_type":"application/vnd.oci.image.manifest.v1+json"}"#.into());
        let ce = cloudevent("urn:berth:test", &e);
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["id"], "evt_7_0123456789abcdef");
        assert_eq!(ce["type"], "io.berth.push");
        assert_eq!(ce["subject"], "team/app");
        assert_eq!(ce["time"], "2025-12-02T00:00:00.123Z");
        assert_eq!(ce["data"]["tag"], "v1");
        assert_eq!(ce["data"]["digest"], "sha256:ab");
        assert_eq!(
            ce["data"]["media_type"],
            "application/vnd.oci.image.manifest.v1+json"
        );
        let login = cloudevent("urn:berth:test", &event("login.failed", None));
        assert!(login.get("subject").is_none());
        assert_eq!(login["type"], "io.berth.login.failed");
        assert_eq!(event_type("quota.changed"), "io.berth.quota.changed");
    }

    #[test]
    fn config_ids_are_stable_and_distinct() {
        let spec = |name: Option<&str>, url: &str| WebhookSpec {
            name: name.map(Into::into),
            url: url.into(),
            secret: Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()),
            ..WebhookSpec::default()
        };
        let a = from_config(vec![spec(None, "http://a/"), spec(Some("b"), "http://b/")]).unwrap();
        let again =
            from_config(vec![spec(Some("b"), "http://b/"), spec(None, "http://a/")]).unwrap();
        assert_eq!(a[0].id, again[1].id);
        assert_eq!(a[1].id, "config-b");
        assert!(from_config(vec![spec(None, "http://a/"), spec(None, "http://a/")]).is_err());
        assert!(from_config(vec![spec(Some("B!"), "http://a/")]).is_err());
        assert!(from_config(vec![spec(None, "ftp://a/")]).is_err());
        let mut no_secret = spec(None, "http://a/");
        no_secret.secret = None;
        assert!(from_config(vec![no_secret]).is_err());
        let mut bad_kind = spec(None, "http://a/");
        bad_kind.events = vec!["manifest.pulled".into()];
        assert!(from_config(vec![bad_kind]).is_err());
    }
}
