//! Registry tokens: JWTs as the Docker token spec describes them (`jwt.md`), signed with ES256
//! by keys kept in the metadata store, so every node signs with the same live key and verifies
//! every key whose tokens may still be unexpired.

use std::collections::HashMap;

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::metadata::access::SigningKeyRow;

/// One entry of a token's `access` claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaim {
    #[serde(rename = "type")]
    pub resource_type: String,
    pub name: String,
    pub actions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    /// The account's name.
    pub sub: String,
    pub aud: String,
    pub exp: i64,
    pub nbf: i64,
    pub iat: i64,
    pub jti: String,
    #[serde(default)]
    pub access: Vec<AccessClaim>,
    /// Berth's own: the credential the token was obtained with (robot secret, personal token,
    /// refresh token), so revoking it ends the token at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cid: Option<String>,
    /// Berth's own: a federated CI identity acting as the robot `sub` (issuer and subject).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<String>,
}

/// Why a bearer token was refused. `Expired` carries the claims of a token that was otherwise
/// valid: an upload it opened may still be finished with it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("token algorithm {0} is not accepted")]
    Algorithm(String),
    #[error("token signed by an unknown key")]
    UnknownKey,
    #[error("token signature or claims invalid: {0}")]
    Invalid(String),
    #[error("token expired")]
    Expired(Box<Claims>),
}

pub const ALGORITHM: &str = "ES256";

/// A new ES256 key pair, as stored.
pub fn generate_key(now: i64) -> Result<SigningKeyRow, String> {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|e| format!("generating a signing key: {e}"))?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
        .map_err(|e| format!("reading the new signing key: {e}"))?;
    let public = pair.public_key().as_ref().to_vec();
    let kid = super::secrets::hex_sha256(&public)[..16].to_string();
    Ok(SigningKeyRow {
        kid,
        algorithm: ALGORITHM.to_string(),
        private_key: pkcs8.as_ref().to_vec(),
        public_key: public,
        created_at: now,
        retired_at: None,
    })
}

/// The keys a node signs and verifies with.
pub struct KeySet {
    signer: Option<(String, EncodingKey)>,
    verifiers: HashMap<String, DecodingKey>,
}

impl KeySet {
    pub fn empty() -> KeySet {
        KeySet {
            signer: None,
            verifiers: HashMap::new(),
        }
    }

    /// From stored keys, live key first (see `metadata::access::signing_keys`).
    pub fn from_rows(rows: &[SigningKeyRow]) -> KeySet {
        let mut set = KeySet::empty();
        for row in rows {
            if row.algorithm != ALGORITHM {
                tracing::warn!(kid = %row.kid, algorithm = %row.algorithm, "skipping a signing key of an unknown algorithm");
                continue;
            }
            if set.signer.is_none() && row.retired_at.is_none() {
                set.signer = Some((row.kid.clone(), EncodingKey::from_ec_der(&row.private_key)));
            }
            set.verifiers
                .insert(row.kid.clone(), DecodingKey::from_ec_der(&row.public_key));
        }
        set
    }

    pub fn has_signer(&self) -> bool {
        self.signer.is_some()
    }

    pub fn knows(&self, kid: &str) -> bool {
        self.verifiers.contains_key(kid)
    }

    pub fn sign(&self, claims: &Claims) -> Result<String, String> {
        let (kid, key) = self.signer.as_ref().ok_or("no live signing key")?;
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.clone());
        header.typ = Some("JWT".to_string());
        jsonwebtoken::encode(&header, claims, key).map_err(|e| format!("signing a token: {e}"))
    }

    /// The `kid` of a token, if it names one (to decide whether to reload keys first).
    pub fn kid_of(token: &str) -> Option<String> {
        jsonwebtoken::decode_header(token).ok()?.kid
    }

    /// Verifies signature, issuer, audience and `nbf`; then the expiry against `now`.
    pub fn verify(
        &self,
        token: &str,
        issuer: &str,
        audience: &str,
        now: i64,
    ) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != Algorithm::ES256 {
            return Err(TokenError::Algorithm(format!("{:?}", header.alg)));
        }
        let kid = header.kid.ok_or(TokenError::UnknownKey)?;
        let key = self.verifiers.get(&kid).ok_or(TokenError::UnknownKey)?;
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_audience(&[audience]);
        validation.set_issuer(&[issuer]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        // Expiry is checked below, so an expired but genuine token can be told apart.
        validation.validate_exp = false;
        validation.leeway = 0;
        let claims = jsonwebtoken::decode::<Claims>(token, key, &validation)
            .map_err(|e| TokenError::Invalid(e.to_string()))?
            .claims;
        if claims.nbf > now + CLOCK_SKEW_SECS {
            return Err(TokenError::Invalid("token not yet valid".to_string()));
        }
        if claims.exp <= now {
            return Err(TokenError::Expired(Box::new(claims)));
        }
        Ok(claims)
    }
}

/// Signs `text` with `key` (ES256, fixed-size signature): the key's id and the signature in
/// base64. For what is not a token: the audit trail's checkpoints.
pub fn sign_text(key: &SigningKeyRow, text: &str) -> Result<(String, String), String> {
    use base64::Engine as _;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &key.private_key)
        .map_err(|e| format!("reading signing key {}: {e}", key.kid))?;
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let signature = pair
        .sign(&rng, text.as_bytes())
        .map_err(|e| format!("signing: {e}"))?;
    Ok((
        key.kid.clone(),
        base64::engine::general_purpose::STANDARD.encode(signature.as_ref()),
    ))
}

/// Checks a signature made by [`sign_text`] against the stored key it names.
pub fn verify_text(
    keys: &[SigningKeyRow],
    kid: &str,
    text: &str,
    signature: &str,
) -> Result<(), String> {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
    use base64::Engine as _;
    let key = keys
        .iter()
        .find(|k| k.kid == kid)
        .ok_or_else(|| format!("no signing key {kid}"))?;
    let signature = base64::engine::general_purpose::STANDARD
        .decode(signature)
        .map_err(|_| "the signature is not base64".to_string())?;
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &key.public_key)
        .verify(text.as_bytes(), &signature)
        .map_err(|_| format!("the signature does not match key {kid}"))
}

/// Tolerance for nodes whose clocks differ slightly.
pub const CLOCK_SKEW_SECS: i64 = 5;

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap in a test is the failure
mod tests {
    use super::*;

    fn claims(now: i64) -> Claims {
        Claims {
            iss: "berth".into(),
            sub: "alice".into(),
            aud: "berth".into(),
            exp: now + 300,
            nbf: now - 1,
            iat: now,
            jti: "j1".into(),
            access: vec![AccessClaim {
                resource_type: "repository".into(),
                name: "team/app".into(),
                actions: vec!["pull".into()],
            }],
            cid: None,
            act: None,
        }
    }

    fn now() -> i64 {
        crate::metadata::queries::now_secs()
    }

    #[test]
    fn signed_tokens_verify_and_tampered_ones_do_not() {
        let key = generate_key(now()).unwrap();
        let keys = KeySet::from_rows(std::slice::from_ref(&key));
        let token = keys.sign(&claims(now())).unwrap();
        assert_eq!(KeySet::kid_of(&token).as_deref(), Some(key.kid.as_str()));
        assert_eq!(
            keys.verify(&token, "berth", "berth", now()),
            Ok(claims_of(&token))
        );

        // Tampered payload: same header and signature, other claims.
        let parts: Vec<&str> = token.split('.').collect();
        let mut forged = claims(now());
        forged.access[0].actions.push("push".into());
        let body = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            serde_json::to_vec(&forged).unwrap(),
        );
        let tampered = format!("{}.{body}.{}", parts[0], parts[2]);
        assert!(matches!(
            keys.verify(&tampered, "berth", "berth", now()),
            Err(TokenError::Invalid(_))
        ));
        // Unsigned (alg none).
        let none_header = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            br#"{"alg":"none","typ":"JWT"}"#,
        );
        let unsigned = format!("{none_header}.{}.", parts[1]);
        assert!(keys.verify(&unsigned, "berth", "berth", now()).is_err());
        // Wrong audience, wrong issuer.
        assert!(matches!(
            keys.verify(&token, "berth", "other", now()),
            Err(TokenError::Invalid(_))
        ));
        assert!(matches!(
            keys.verify(&token, "other", "berth", now()),
            Err(TokenError::Invalid(_))
        ));
        // Another key's token.
        let other = KeySet::from_rows(&[generate_key(now()).unwrap()]);
        assert_eq!(
            other.verify(&token, "berth", "berth", now()),
            Err(TokenError::UnknownKey)
        );
        // Expired: told apart, with its claims.
        assert!(matches!(
            keys.verify(&token, "berth", "berth", now() + 301),
            Err(TokenError::Expired(_))
        ));
        assert_eq!(
            keys.verify("garbage", "berth", "berth", now()),
            Err(TokenError::Malformed)
        );
    }

    fn claims_of(token: &str) -> Claims {
        let payload = token.split('.').nth(1).unwrap();
        let bytes =
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
                .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn a_retired_key_verifies_but_does_not_sign() {
        let old = SigningKeyRow {
            retired_at: Some(now()),
            ..generate_key(now() - 10).unwrap()
        };
        let new = generate_key(now()).unwrap();
        let before = KeySet::from_rows(&[SigningKeyRow {
            retired_at: None,
            ..old.clone()
        }]);
        let token = before.sign(&claims(now())).unwrap();
        let after = KeySet::from_rows(&[new.clone(), old.clone()]);
        assert!(after.verify(&token, "berth", "berth", now()).is_ok());
        let fresh = after.sign(&claims(now())).unwrap();
        assert_eq!(KeySet::kid_of(&fresh), Some(new.kid));
    }
}
