//! Passwords and generated secrets.
//!
//! Passwords are hashed with argon2id (the `argon2` crate's defaults, OWASP's recommended
//! 19 MiB, 2 passes); bcrypt hashes imported from an htpasswd file are verified as they are and
//! replaced by argon2id at the account's next successful login. Generated secrets (robot
//! secrets, personal access tokens, refresh tokens) carry 190 bits of randomness, so a plain
//! SHA-256 is enough to store them: a slow hash protects guessable secrets, and these are not.

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use sha2::{Digest as _, Sha256};

/// Hashes a password with argon2id. Slow on purpose: call it off the async threads.
pub fn hash_password(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    aws_lc_rs::rand::fill(&mut salt).map_err(|e| format!("random salt: {e}"))?;
    argon2::Argon2::default()
        .hash_password_with_salt(password.as_bytes(), &salt)
        .map(|h: PasswordHash| h.to_string())
        .map_err(|e| format!("hashing password: {e}"))
}

/// Checks a password against a stored argon2id or bcrypt hash. Slow on purpose.
pub fn verify_password(password: &str, stored: &str) -> bool {
    if stored.starts_with("$2") {
        return bcrypt::verify(password, stored).unwrap_or(false);
    }
    match PasswordHash::new(stored) {
        Ok(hash) => argon2::Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok(),
        Err(_) => false,
    }
}

/// Whether a stored hash should be replaced by argon2id after a successful login.
pub fn needs_rehash(stored: &str) -> bool {
    !stored.starts_with("$argon2id$")
}

/// Parses an htpasswd file: `name:hash` lines with bcrypt hashes (`htpasswd -B`); other hash
/// kinds (MD5 `$apr1$`, SHA1, crypt) are refused by name, since they are too weak to keep.
pub fn parse_htpasswd(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, hash) = line
            .split_once(':')
            .ok_or_else(|| format!("line {}: expected NAME:HASH", n + 1))?;
        if !(hash.starts_with("$2y$") || hash.starts_with("$2b$") || hash.starts_with("$2a$")) {
            return Err(format!(
                "line {} ({name}): only bcrypt entries are accepted (htpasswd -B)",
                n + 1
            ));
        }
        out.push((name.to_string(), hash.to_string()));
    }
    Ok(out)
}

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

fn random_string(len: usize) -> String {
    let mut bytes = vec![0u8; len];
    // Rejection sampling would be exact; 256 % 36 = 4 biases four symbols by 1/64, which at
    // 37 symbols of secret still leaves over 185 bits.
    aws_lc_rs::rand::fill(&mut bytes).expect("the system random source works");
    bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

/// A generated secret as the client holds it: `berth_<id>_<secret>`. The id finds the row;
/// only the secret's hash is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiSecret {
    pub id: String,
    pub secret: String,
}

pub const SECRET_PREFIX: &str = "berth_";

impl ApiSecret {
    pub fn generate() -> ApiSecret {
        ApiSecret {
            id: random_string(12),
            secret: random_string(37),
        }
    }

    /// Recognises a generated secret (as a password, or a refresh token).
    pub fn parse(s: &str) -> Option<ApiSecret> {
        let rest = s.strip_prefix(SECRET_PREFIX)?;
        let (id, secret) = rest.split_once('_')?;
        let ok = |x: &str, len: usize| x.len() == len && x.bytes().all(|b| ALPHABET.contains(&b));
        (ok(id, 12) && ok(secret, 37)).then(|| ApiSecret {
            id: id.to_string(),
            secret: secret.to_string(),
        })
    }

    pub fn hash(&self) -> String {
        hex_sha256(self.secret.as_bytes())
    }

    /// Compares the secret with a stored hash in constant time.
    pub fn matches(&self, stored_hash: &str) -> bool {
        use subtle::ConstantTimeEq;
        self.hash().as_bytes().ct_eq(stored_hash.as_bytes()).into()
    }
}

impl std::fmt::Display for ApiSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{SECRET_PREFIX}{}_{}", self.id, self.secret)
    }
}

pub fn hex_sha256(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap in a test is the failure
mod tests {
    use super::*;

    #[test]
    fn passwords_round_trip_and_bcrypt_is_understood() {
        let h = hash_password("hunter2").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("hunter2", &h));
        assert!(!verify_password("hunter3", &h));
        let b = bcrypt::hash("s3cret", 4).unwrap();
        assert!(verify_password("s3cret", &b));
        assert!(!verify_password("other", &b));
        assert!(needs_rehash(&b));
        assert!(!needs_rehash(&h));
        assert!(!verify_password("x", "garbage"));
    }

    #[test]
    fn htpasswd_takes_only_bcrypt() {
        let b = bcrypt::hash("pw", 4).unwrap();
        let parsed = parse_htpasswd(&format!("# c\nalice:{b}\n\n")).unwrap();
        assert_eq!(parsed, vec![("alice".to_string(), b)]);
        assert!(parse_htpasswd("bob:$apr1$abc$def").is_err());
        assert!(parse_htpasswd("nocolon").is_err());
    }

    #[test]
    fn generated_secrets_parse_back_and_match_only_themselves() {
        let s = ApiSecret::generate();
        let text = s.to_string();
        let parsed = ApiSecret::parse(&text).unwrap();
        assert_eq!(parsed, s);
        assert!(parsed.matches(&s.hash()));
        assert!(!ApiSecret::generate().matches(&s.hash()));
        assert_eq!(ApiSecret::parse("berth_short_x"), None);
        assert_eq!(ApiSecret::parse("password"), None);
    }
}
