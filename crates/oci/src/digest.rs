//! Content digests (`algorithm:encoded`) as the distribution spec's grammar defines them.

use std::fmt;
use std::str::FromStr;

use sha2::Digest as _;

/// The digest algorithms Berth can verify. Other syntactically valid algorithms are refused,
/// because a registry must be able to check every digest it stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// Length of the lowercase hex encoding.
    pub fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A validated digest. The encoded part is always lowercase hex of the right length.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest must have the form algorithm:encoded")]
    Malformed,
    #[error("unsupported digest algorithm {0:?}")]
    UnsupportedAlgorithm(String),
    #[error("encoded part must be {0} lowercase hex characters")]
    BadEncoding(usize),
}

impl Digest {
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// Digest of a byte slice held in memory (manifests, small documents).
    pub fn of(algorithm: Algorithm, bytes: &[u8]) -> Digest {
        let mut hasher = Hasher::new(algorithm);
        hasher.update(bytes);
        hasher.finish()
    }

    pub fn sha256_of(bytes: &[u8]) -> Digest {
        Digest::of(Algorithm::Sha256, bytes)
    }
}

fn is_algorithm_component(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// `encoded ::= [a-zA-Z0-9=_-]+`
fn is_encoded_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'=' || b == b'_' || b == b'-'
}

impl FromStr for Digest {
    type Err = DigestError;

    /// One pass over the encoded part: digests are parsed on every pull (each stored manifest
    /// row carries one), so this is a hot path.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (algorithm, encoded) = s.split_once(':').ok_or(DigestError::Malformed)?;
        let algorithm = match algorithm {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            other => {
                // algorithm ::= component ([+._-] component)*
                let grammatical = other
                    .split(['+', '.', '_', '-'])
                    .all(is_algorithm_component);
                if !grammatical || encoded.is_empty() || !encoded.bytes().all(is_encoded_char) {
                    return Err(DigestError::Malformed);
                }
                return Err(DigestError::UnsupportedAlgorithm(other.to_string()));
            }
        };
        // One table lookup per byte: 2 = lowercase hex, 1 = other encoded characters.
        const CLASS: [u8; 256] = {
            let mut t = [0u8; 256];
            let mut b = 0;
            while b < 256 {
                let c = b as u8;
                t[b] = if c.is_ascii_digit() || (c >= b'a' && c <= b'f') {
                    2
                } else if c.is_ascii_alphanumeric() || c == b'=' || c == b'_' || c == b'-' {
                    1
                } else {
                    0
                };
                b += 1;
            }
            t
        };
        let classes = encoded
            .bytes()
            .fold(2u8, |worst, b| worst.min(CLASS[b as usize]));
        if classes == 0 {
            return Err(DigestError::Malformed);
        }
        let lower_hex = classes == 2;
        if encoded.is_empty() {
            return Err(DigestError::Malformed);
        }
        if !lower_hex || encoded.len() != algorithm.hex_len() {
            return Err(DigestError::BadEncoding(algorithm.hex_len()));
        }
        Ok(Digest {
            algorithm,
            hex: encoded.to_string(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.as_str(), self.hex)
    }
}

/// An incremental hasher for either supported algorithm, fed as bytes stream past.
#[derive(Clone)]
pub enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn new(algorithm: Algorithm) -> Hasher {
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        match self {
            Hasher::Sha256(_) => Algorithm::Sha256,
            Hasher::Sha512(_) => Algorithm::Sha512,
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Sha512(h) => h.update(bytes),
        }
    }

    pub fn finish(self) -> Digest {
        let (algorithm, hex) = match self {
            Hasher::Sha256(h) => (Algorithm::Sha256, hex::encode(h.finalize())),
            Hasher::Sha512(h) => (Algorithm::Sha512, hex::encode(h.finalize())),
        };
        Digest { algorithm, hex }
    }
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hasher({})", self.algorithm().as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str =
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn check(input: &str, expected: Result<(), DigestError>) {
        assert_eq!(input.parse::<Digest>().map(|_| ()), expected, "{input}");
    }

    #[test]
    fn parses_by_the_spec_grammar() {
        check(EMPTY_SHA256, Ok(()));
        check(&format!("sha512:{}", "a".repeat(128)), Ok(()));
        check("sha256", Err(DigestError::Malformed));
        check("sha256:", Err(DigestError::Malformed));
        check(":abc", Err(DigestError::Malformed));
        check("SHA256:abc", Err(DigestError::Malformed));
        check("sha256:abc/def", Err(DigestError::Malformed));
        check("sha256:abc", Err(DigestError::BadEncoding(64)));
        check(
            &format!("sha256:{}", "A".repeat(64)),
            Err(DigestError::BadEncoding(64)),
        );
        check(
            &format!("sha512:{}", "a".repeat(64)),
            Err(DigestError::BadEncoding(128)),
        );
        check(
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            Err(DigestError::UnsupportedAlgorithm("md5".into())),
        );
        check(
            "sha256+b64u:LCa0a2j_xo_5m0U8HTBBNBNCLXBkg7-g-YpeiGJm564",
            Err(DigestError::UnsupportedAlgorithm("sha256+b64u".into())),
        );
    }

    #[test]
    fn hashes_known_values() {
        assert_eq!(Digest::sha256_of(b"").to_string(), EMPTY_SHA256);
        let mut h = Hasher::new(Algorithm::Sha256);
        h.update(b"hello ");
        h.update(b"world");
        assert_eq!(h.finish(), Digest::sha256_of(b"hello world"));
        assert!(
            Digest::of(Algorithm::Sha512, b"")
                .to_string()
                .starts_with("sha512:cf83e135")
        );
    }

    #[test]
    fn round_trips_through_display() {
        let d: Digest = EMPTY_SHA256.parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.to_string(), EMPTY_SHA256);
    }
}
