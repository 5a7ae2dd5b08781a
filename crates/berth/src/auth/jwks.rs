//! Tokens signed by someone else: a CI system's OIDC identity tokens (trust rules) and the
//! registry tokens of an external token server. Their keys come from a JWKS (a file, or an
//! `http(s)://` URL as OIDC issuers publish them) or a PEM public key; [`verify`] checks a token
//! against one of them, its issuer and its audience.
//!
//! [`JwksCache`] fetches each JWKS once and keeps it. It refetches in the background when the
//! copy is older than [`REFRESH_AFTER`], and at once when a token names a key it does not hold
//! (the issuer rotated), but never more often than every [`MIN_REFETCH`] per JWKS: tokens with
//! made-up key ids cost Berth nothing and the issuer at most one request per interval. A fetch
//! is bounded by [`FETCH_TIMEOUT`] and [`MAX_JWKS_BYTES`]; when it fails the last good copy is
//! kept. Only RS256 and ES256 (P-256) keys are used: what GitHub, GitLab and Kubernetes sign
//! with; `none`, HMAC and everything else is refused.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

/// A JWKS older than this is refetched (in the background; the old copy serves meanwhile).
pub const REFRESH_AFTER: Duration = Duration::from_secs(15 * 60);
/// At most one fetch per JWKS this often, however many unknown key ids arrive.
pub const MIN_REFETCH: Duration = Duration::from_secs(5);
/// Bound on one fetch: connecting, sending, and reading the whole answer.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest JWKS read (GitHub's is about 2 KiB).
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Tolerance for issuers whose clocks run slightly ahead (`nbf`, `iat`).
pub const FOREIGN_CLOCK_SKEW_SECS: i64 = 60;

/// Where an issuer's keys are.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeySource {
    Url(String),
    File(PathBuf),
}

impl KeySource {
    /// An `http://` or `https://` URL, or an absolute file path.
    pub fn parse(text: &str) -> Result<KeySource, String> {
        if let Some(rest) = text
            .strip_prefix("https://")
            .or_else(|| text.strip_prefix("http://"))
        {
            let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
            if host.is_empty() || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!("JWKS URL {text:?} is not a valid URL"));
            }
            return Ok(KeySource::Url(text.to_string()));
        }
        let path = PathBuf::from(text);
        if path.is_absolute() {
            Ok(KeySource::File(path))
        } else {
            Err(format!(
                "JWKS {text:?} must be an http:// or https:// URL or an absolute file path"
            ))
        }
    }
}

/// A public key and the one algorithm it verifies.
#[derive(Debug, Clone)]
pub struct VerifyingKey {
    pub key: DecodingKey,
    pub alg: Algorithm,
}

impl VerifyingKey {
    /// An RSA or EC (P-256) public key in PEM (`PUBLIC KEY`, or `RSA PUBLIC KEY`).
    pub fn from_pem(pem: &[u8]) -> Result<VerifyingKey, String> {
        if let Ok(key) = DecodingKey::from_ec_pem(pem) {
            return Ok(VerifyingKey {
                key,
                alg: Algorithm::ES256,
            });
        }
        DecodingKey::from_rsa_pem(pem)
            .map(|key| VerifyingKey {
                key,
                alg: Algorithm::RS256,
            })
            .map_err(|e| format!("not an RSA or EC public key in PEM: {e}"))
    }
}

/// The usable keys of a JWKS, by key id.
#[derive(Debug, Default)]
pub struct Jwks {
    keys: HashMap<String, Arc<VerifyingKey>>,
}

impl Jwks {
    /// Reads a JWKS, keeping the RS256 and ES256 signing keys and skipping the others (an
    /// issuer may publish encryption keys or algorithms Berth does not take).
    pub fn parse(bytes: &[u8]) -> Result<Jwks, String> {
        let doc: Value =
            serde_json::from_slice(bytes).map_err(|e| format!("the JWKS is not JSON: {e}"))?;
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("the JWKS has no \"keys\" array")?;
        let mut out = Jwks::default();
        for key in keys {
            let Ok(jwk) = serde_json::from_value::<Jwk>(key.clone()) else {
                continue;
            };
            if let Some(k) = usable(&jwk) {
                let kid = jwk.common.key_id.clone().unwrap_or_default();
                out.keys.insert(kid, Arc::new(k));
            }
        }
        Ok(out)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key a token's `kid` names; a token without one may use the only key of a set.
    pub fn get(&self, kid: Option<&str>) -> Option<Arc<VerifyingKey>> {
        match kid {
            Some(kid) => self.keys.get(kid).cloned(),
            None if self.keys.len() == 1 => self.keys.values().next().cloned(),
            None => None,
        }
    }
}

fn usable(jwk: &Jwk) -> Option<VerifyingKey> {
    if matches!(&jwk.common.public_key_use, Some(u) if *u != PublicKeyUse::Signature) {
        return None;
    }
    let (alg, declared_ok) = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => (
            Algorithm::RS256,
            matches!(jwk.common.key_algorithm, None | Some(KeyAlgorithm::RS256)),
        ),
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => (
            Algorithm::ES256,
            matches!(jwk.common.key_algorithm, None | Some(KeyAlgorithm::ES256)),
        ),
        _ => return None,
    };
    if !declared_ok {
        return None;
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(VerifyingKey { key, alg })
}

/// Why a foreign token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("malformed token")]
    Malformed,
    #[error("token algorithm {0} is not accepted (RS256 or ES256)")]
    Algorithm(String),
    #[error("token signed by a key the issuer does not publish")]
    UnknownKey,
    #[error("the issuer's keys are unavailable: {0}")]
    KeysUnavailable(String),
    #[error("token signature or claims invalid: {0}")]
    Invalid(String),
    #[error("token expired")]
    Expired,
}

/// What a foreign token must be.
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    pub issuer: &'a str,
    pub audience: &'a str,
    /// OIDC identity tokens always carry `iat`; Docker registry tokens need not.
    pub require_iat: bool,
}

/// A verified token's claims; `expired` if it was genuine but is past its `exp`.
#[derive(Debug, Clone)]
pub struct Verified {
    pub claims: Value,
    pub exp: i64,
    pub expired: bool,
}

/// The algorithm and key id a token's header names, if it is one of the accepted ones.
pub fn header(token: &str) -> Result<(Algorithm, Option<String>), JwtError> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Malformed)?;
    match header.alg {
        Algorithm::RS256 | Algorithm::ES256 => Ok((header.alg, header.kid)),
        other => Err(JwtError::Algorithm(format!("{other:?}"))),
    }
}

/// Checks `token`'s signature with `key`, then its issuer, audience, `nbf` and `iat` against
/// `now`, and reports whether it has expired.
pub fn verify(
    token: &str,
    key: &VerifyingKey,
    expect: Expect<'_>,
    now: i64,
) -> Result<Verified, JwtError> {
    let (alg, _) = header(token)?;
    if alg != key.alg {
        return Err(JwtError::Algorithm(format!(
            "{alg:?} (the issuer's key is {:?})",
            key.alg
        )));
    }
    let mut validation = Validation::new(alg);
    validation.set_issuer(&[expect.issuer]);
    validation.set_audience(&[expect.audience]);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    // Times are checked below against `now`, so that expiry can be told apart.
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.leeway = 0;
    let claims = jsonwebtoken::decode::<Value>(token, &key.key, &validation)
        .map_err(|e| JwtError::Invalid(e.to_string()))?
        .claims;
    let time = |name: &str| -> Result<Option<i64>, JwtError> {
        match claims.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .or_else(|| v.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
                .map(Some)
                .ok_or_else(|| JwtError::Invalid(format!("{name} is not a number"))),
        }
    };
    let exp = time("exp")?.ok_or_else(|| JwtError::Invalid("no exp".into()))?;
    if time("nbf")?.is_some_and(|nbf| nbf > now + FOREIGN_CLOCK_SKEW_SECS) {
        return Err(JwtError::Invalid("token not yet valid (nbf)".into()));
    }
    match time("iat")? {
        Some(iat) if iat > now + FOREIGN_CLOCK_SKEW_SECS => {
            return Err(JwtError::Invalid("token issued in the future (iat)".into()));
        }
        Some(iat) if iat > exp => {
            return Err(JwtError::Invalid(
                "token expires before it was issued".into(),
            ));
        }
        None if expect.require_iat => return Err(JwtError::Invalid("no iat".into())),
        _ => {}
    }
    if !claims.get("sub").is_some_and(Value::is_string) {
        return Err(JwtError::Invalid("sub is not a string".into()));
    }
    Ok(Verified {
        claims,
        exp,
        expired: exp <= now,
    })
}

/// The `iss` of a token, read without verifying anything: only to pick which issuer's keys to
/// verify it with. `None` if it is not a JWT with a string `iss`.
pub fn unverified_issuer(token: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Iss {
        iss: String,
    }
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    if header.is_empty() {
        return None;
    }
    jsonwebtoken::dangerous::insecure_decode::<Iss>(token)
        .ok()
        .map(|t| t.claims.iss)
}

/// Every JWKS a node uses, fetched on first use and kept fresh.
#[derive(Default)]
pub struct JwksCache {
    entries: Mutex<HashMap<KeySource, Arc<Entry>>>,
    client: OnceLock<reqwest::Client>,
}

#[derive(Default)]
struct Entry {
    state: Mutex<State>,
    /// Held while fetching, so concurrent requests wait for one fetch instead of each making
    /// their own.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    keys: Option<Arc<Jwks>>,
    fetched_at: Option<Instant>,
    /// The last fetch, successful or not: the rate limit counts from here.
    attempted_at: Option<Instant>,
    last_error: Option<String>,
    refreshing: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl JwksCache {
    pub fn new() -> Arc<JwksCache> {
        Arc::new(JwksCache::default())
    }

    fn entry(&self, source: &KeySource) -> Arc<Entry> {
        lock(&self.entries)
            .entry(source.clone())
            .or_default()
            .clone()
    }

    /// The key `kid` names in `source`'s JWKS, fetching it first if it is not held (within
    /// the rate limit).
    pub async fn key(
        self: &Arc<Self>,
        source: &KeySource,
        kid: Option<&str>,
    ) -> Result<Arc<VerifyingKey>, JwtError> {
        let entry = self.entry(source);
        let seen = {
            let mut state = lock(&entry.state);
            if let Some(key) = state.keys.as_ref().and_then(|k| k.get(kid)) {
                let stale = state
                    .fetched_at
                    .is_none_or(|t| t.elapsed() >= REFRESH_AFTER);
                if stale && !state.refreshing && may_fetch(&state) {
                    state.refreshing = true;
                    // Not awaited: the copy held serves this request.
                    drop(self.refresh(&entry, source, state.attempted_at));
                }
                return Ok(key);
            }
            state.attempted_at
        };
        // A failed join (a panic in the fetch) leaves the state as it was: answered below.
        let _ = self.refresh(&entry, source, seen).await;
        let state = lock(&entry.state);
        match (&state.keys, &state.last_error) {
            (Some(keys), _) => keys.get(kid).ok_or(JwtError::UnknownKey),
            (None, Some(e)) => Err(JwtError::KeysUnavailable(e.clone())),
            (None, None) => Err(JwtError::KeysUnavailable("not fetched yet".into())),
        }
    }

    /// Fetches `source` unless the rate limit forbids it or someone else fetched since
    /// `seen` (the attempt the caller last saw). The fetch runs as a task of its own: a
    /// request that is dropped while waiting (its client hung up) neither cancels it nor gets
    /// it retried, so every fetch started counts against the rate limit.
    fn refresh(
        self: &Arc<Self>,
        entry: &Arc<Entry>,
        source: &KeySource,
        seen: Option<Instant>,
    ) -> tokio::task::JoinHandle<()> {
        let (this, entry, source) = (self.clone(), entry.clone(), source.clone());
        tokio::spawn(async move {
            let _one = entry.fetching.lock().await;
            {
                let mut state = lock(&entry.state);
                if state.attempted_at != seen || !may_fetch(&state) {
                    state.refreshing = false;
                    return;
                }
            }
            let fetched = this.fetch(&source).await;
            let mut state = lock(&entry.state);
            state.attempted_at = Some(Instant::now());
            state.refreshing = false;
            match fetched {
                Ok(jwks) => {
                    tracing::debug!(jwks = %describe(&source), keys = jwks.len(), "fetched a JWKS");
                    state.keys = Some(Arc::new(jwks));
                    state.fetched_at = Some(Instant::now());
                    state.last_error = None;
                }
                Err(e) => {
                    tracing::warn!(jwks = %describe(&source), error = %e, "cannot fetch a JWKS; keeping the last copy, if any");
                    state.last_error = Some(e);
                }
            }
        })
    }

    async fn fetch(&self, source: &KeySource) -> Result<Jwks, String> {
        let bytes = match source {
            KeySource::File(path) => read_file(path).await?,
            KeySource::Url(url) => self.get(url).await?,
        };
        Jwks::parse(&bytes)
    }

    async fn get(&self, url: &str) -> Result<Vec<u8>, String> {
        let client = match self.client.get() {
            Some(c) => c,
            None => {
                let c = reqwest::Client::builder()
                    .timeout(FETCH_TIMEOUT)
                    .connect_timeout(FETCH_TIMEOUT / 2)
                    .redirect(reqwest::redirect::Policy::limited(3))
                    .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .map_err(|e| format!("building an HTTP client: {e}"))?;
                self.client.get_or_init(|| c)
            }
        };
        let fetch = async {
            let mut response = client
                .get(url)
                .header("accept", "application/json")
                .send()
                .await
                .map_err(|e| format!("GET {url}: {e}"))?;
            if !response.status().is_success() {
                return Err(format!("GET {url}: {}", response.status()));
            }
            if response
                .content_length()
                .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
            {
                return Err(format!("GET {url}: larger than {MAX_JWKS_BYTES} bytes"));
            }
            let mut body = Vec::new();
            while let Some(chunk) = response
                .chunk()
                .await
                .map_err(|e| format!("GET {url}: {e}"))?
            {
                if body.len() + chunk.len() > MAX_JWKS_BYTES {
                    return Err(format!("GET {url}: larger than {MAX_JWKS_BYTES} bytes"));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(body)
        };
        // reqwest's timeout covers the body too; this also bounds a trickling body.
        tokio::time::timeout(FETCH_TIMEOUT, fetch)
            .await
            .map_err(|_| format!("GET {url}: no answer within {FETCH_TIMEOUT:?}"))?
    }
}

fn may_fetch(state: &State) -> bool {
    state
        .attempted_at
        .is_none_or(|t| t.elapsed() >= MIN_REFETCH)
}

/// A JWKS file's bytes, at most [`MAX_JWKS_BYTES`].
pub async fn read_file(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use tokio::io::AsyncReadExt;
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_JWKS_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    if bytes.len() > MAX_JWKS_BYTES {
        return Err(format!(
            "{} is larger than {MAX_JWKS_BYTES} bytes",
            path.display()
        ));
    }
    Ok(bytes)
}

/// A source for logs.
pub fn describe(source: &KeySource) -> String {
    match source {
        KeySource::Url(u) => u.clone(),
        KeySource::File(p) => p.display().to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap in a test is the failure
pub(crate) mod tests {
    use super::*;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    use base64::Engine;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    /// An issuer with one ES256 key, for tests.
    pub struct TestIssuer {
        pub kid: String,
        pkcs8: Vec<u8>,
        pub public: Vec<u8>,
    }

    impl TestIssuer {
        pub fn new(kid: &str) -> TestIssuer {
            let rng = aws_lc_rs::rand::SystemRandom::new();
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .unwrap()
                .as_ref()
                .to_vec();
            let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8).unwrap();
            TestIssuer {
                kid: kid.to_string(),
                public: pair.public_key().as_ref().to_vec(),
                pkcs8,
            }
        }

        pub fn jwk(&self) -> Value {
            let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
            json!({
                "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": self.kid,
                "x": b64(&self.public[1..33]), "y": b64(&self.public[33..65]),
            })
        }

        pub fn sign(&self, claims: &Value) -> String {
            let mut header = Header::new(Algorithm::ES256);
            header.kid = Some(self.kid.clone());
            jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_der(&self.pkcs8)).unwrap()
        }
    }

    pub fn now() -> i64 {
        crate::metadata::queries::now_secs()
    }

    fn claims(now: i64) -> Value {
        json!({
            "iss": "https://issuer.example", "aud": "berth", "sub": "repo:org/app",
            "iat": now, "nbf": now - 5, "exp": now + 300, "repository": "org/app",
        })
    }

    const EXPECT: Expect<'static> = Expect {
        issuer: "https://issuer.example",
        audience: "berth",
        require_iat: true,
    };

    #[test]
    fn jwks_keep_the_signing_keys_berth_can_use() {
        let a = TestIssuer::new("a");
        let mut p384 = TestIssuer::new("b").jwk();
        p384["crv"] = json!("P-384");
        let mut encryption = TestIssuer::new("c").jwk();
        encryption["use"] = json!("enc");
        let mut mislabelled = TestIssuer::new("d").jwk();
        mislabelled["alg"] = json!("RS256");
        let doc = json!({"keys": [
            a.jwk(), p384, encryption, mislabelled,
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"kty": "weird", "kid": "x"},
            {"kty": "RSA", "kid": "r", "n": "sXch", "e": "AQAB", "alg": "RS256"},
        ]});
        let jwks = Jwks::parse(doc.to_string().as_bytes()).unwrap();
        assert!(jwks.get(Some("a")).is_some());
        for kid in ["b", "c", "d", "hmac", "x"] {
            assert!(jwks.get(Some(kid)).is_none(), "{kid}");
        }
        assert_eq!(jwks.get(Some("r")).unwrap().alg, Algorithm::RS256);
        assert!(jwks.get(None).is_none(), "two keys: a token must name one");
        let one = Jwks::parse(json!({"keys": [a.jwk()]}).to_string().as_bytes()).unwrap();
        assert!(one.get(None).is_some());
        assert!(Jwks::parse(b"{}").is_err());
        assert!(Jwks::parse(b"not json").is_err());
    }

    #[test]
    fn foreign_tokens_are_checked_for_signature_issuer_audience_and_times() {
        let issuer = TestIssuer::new("k1");
        let jwks = Jwks::parse(json!({"keys": [issuer.jwk()]}).to_string().as_bytes()).unwrap();
        let key = jwks.get(Some("k1")).unwrap();
        let now = now();
        let ok = issuer.sign(&claims(now));
        let v = verify(&ok, &key, EXPECT, now).unwrap();
        assert!(!v.expired);
        assert_eq!(v.claims["repository"], "org/app");
        assert_eq!(
            unverified_issuer(&ok).as_deref(),
            Some("https://issuer.example")
        );

        let with = |k: &str, v: Value| {
            let mut c = claims(now);
            c[k] = v;
            issuer.sign(&c)
        };
        let without = |k: &str| {
            let mut c = claims(now);
            c.as_object_mut().unwrap().remove(k);
            issuer.sign(&c)
        };
        let b64 = |v: &Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string().as_bytes())
        };
        let parts: Vec<&str> = ok.split('.').collect();
        let mut more = claims(now);
        more["repository"] = json!("org/other");
        let tampered = format!("{}.{}.{}", parts[0], b64(&more), parts[2]);
        let none = format!("{}.{}.", b64(&json!({"alg": "none"})), parts[1]);
        let hs = format!(
            "{}.{}.{}",
            b64(&json!({"alg": "HS256", "kid": "k1"})),
            parts[1],
            parts[2]
        );
        let cases: Vec<(&str, String, fn(&JwtError) -> bool)> = vec![
            ("wrong audience", with("aud", json!("other")), |e| {
                matches!(e, JwtError::Invalid(_))
            }),
            ("audience list", with("aud", json!(["x", "berth"])), |_| {
                false
            }),
            ("wrong issuer", with("iss", json!("https://evil")), |e| {
                matches!(e, JwtError::Invalid(_))
            }),
            ("not yet valid", with("nbf", json!(now + 600)), |e| {
                matches!(e, JwtError::Invalid(_))
            }),
            ("issued in the future", with("iat", json!(now + 600)), |e| {
                matches!(e, JwtError::Invalid(_))
            }),
            ("no iat", without("iat"), |e| {
                matches!(e, JwtError::Invalid(_))
            }),
            ("no exp", without("exp"), |e| {
                matches!(e, JwtError::Invalid(_))
            }),
            ("no sub", without("sub"), |e| {
                matches!(e, JwtError::Invalid(_))
            }),
            ("numeric sub", with("sub", json!(7)), |e| {
                matches!(e, JwtError::Invalid(_))
            }),
            ("tampered", tampered, |e| matches!(e, JwtError::Invalid(_))),
            ("alg none", none, |e| *e == JwtError::Malformed),
            ("HS256", hs, |e| matches!(e, JwtError::Algorithm(_))),
            ("garbage", "a.b.c".into(), |e| *e == JwtError::Malformed),
        ];
        for (what, token, refused) in cases {
            match verify(&token, &key, EXPECT, now) {
                Ok(_) if what == "audience list" => {}
                Ok(_) => panic!("{what}: accepted"),
                Err(e) => assert!(refused(&e), "{what}: {e:?}"),
            }
        }
        let mut late = claims(now - 400);
        late["exp"] = json!(now - 1);
        let expired = issuer.sign(&late);
        assert!(verify(&expired, &key, EXPECT, now).unwrap().expired);
        let backwards = with("exp", json!(now - 1));
        assert!(matches!(
            verify(&backwards, &key, EXPECT, now),
            Err(JwtError::Invalid(_))
        ));
        // Another key's signature.
        let other = TestIssuer::new("k1").sign(&claims(now));
        assert!(matches!(
            verify(&other, &key, EXPECT, now),
            Err(JwtError::Invalid(_))
        ));
    }

    #[test]
    fn pem_keys() {
        let issuer = TestIssuer::new("k");
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &issuer.pkcs8).unwrap();
        let der = aws_lc_rs::encoding::AsDer::<aws_lc_rs::encoding::PublicKeyX509Der>::as_der(
            pair.public_key(),
        )
        .unwrap();
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(der.as_ref())
        );
        let key = VerifyingKey::from_pem(pem.as_bytes()).unwrap();
        assert_eq!(key.alg, Algorithm::ES256);
        let token = issuer.sign(&claims(now()));
        assert!(verify(&token, &key, EXPECT, now()).is_ok());
        assert!(VerifyingKey::from_pem(b"nonsense").is_err());
    }

    #[test]
    fn sources() {
        assert_eq!(
            KeySource::parse("https://x.example/keys"),
            Ok(KeySource::Url("https://x.example/keys".into()))
        );
        assert_eq!(
            KeySource::parse("/etc/jwks.json"),
            Ok(KeySource::File("/etc/jwks.json".into()))
        );
        for bad in [
            "jwks.json",
            "ftp://x",
            "https://",
            "https:///x",
            "http://a b",
        ] {
            assert!(KeySource::parse(bad).is_err(), "{bad}");
        }
    }

    /// Serves `body` on 127.0.0.1 after `delay`, counting requests.
    async fn slow_server(
        body: String,
        delay: Duration,
    ) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks", listener.local_addr().unwrap());
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = hits.clone();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let body = body.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = stream.read(&mut buf).await;
                    tokio::time::sleep(delay).await;
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = stream.write_all(head.as_bytes()).await;
                    let _ = stream.write_all(body.as_bytes()).await;
                });
            }
        });
        (url, hits)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_request_dropped_during_a_fetch_neither_cancels_nor_repeats_it() {
        let a = TestIssuer::new("a");
        let (url, hits) = slow_server(
            json!({"keys": [a.jwk()]}).to_string(),
            Duration::from_millis(300),
        )
        .await;
        let cache = JwksCache::new();
        let source = KeySource::Url(url);
        // The client hangs up while the fetch is in flight.
        let dropped =
            tokio::time::timeout(Duration::from_millis(50), cache.key(&source, Some("a")));
        assert!(dropped.await.is_err());
        // The next request waits for that fetch instead of starting another, and it landed.
        assert!(cache.key(&source, Some("a")).await.is_ok());
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_file_jwks_is_reread_for_an_unknown_key_at_most_every_interval() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        let (a, b) = (TestIssuer::new("a"), TestIssuer::new("b"));
        std::fs::write(&path, json!({"keys": [a.jwk()]}).to_string()).unwrap();
        let cache = JwksCache::new();
        let source = KeySource::File(path.clone());
        assert!(cache.key(&source, Some("a")).await.is_ok());
        std::fs::write(&path, json!({"keys": [a.jwk(), b.jwk()]}).to_string()).unwrap();
        // Within the interval: not reread.
        assert_eq!(
            cache.key(&source, Some("b")).await.unwrap_err(),
            JwtError::UnknownKey
        );
        let missing = KeySource::File(dir.path().join("missing.json"));
        assert!(matches!(
            cache.key(&missing, Some("a")).await,
            Err(JwtError::KeysUnavailable(_))
        ));
    }
}
