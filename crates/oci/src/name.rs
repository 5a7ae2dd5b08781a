//! Repository names, tags, and the `<reference>` of a manifest URL (a tag or a digest).

use std::fmt;
use std::str::FromStr;

use crate::digest::{Digest, DigestError};

/// The spec bounds the name to 255 characters including the registry host; without knowing the
/// host a client will use, Berth applies the bound to the path component alone.
pub const MAX_NAME_LEN: usize = 255;
pub const MAX_TAG_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepositoryName(String);

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("invalid repository name")]
    InvalidName,
    #[error("invalid tag")]
    InvalidTag,
    #[error(transparent)]
    InvalidDigest(#[from] DigestError),
}

/// One path component of a repository name: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
pub fn is_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__", or one or more "-".
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        match &c[start..i] {
            "." | "_" | "__" => {}
            sep if sep.bytes().all(|x| x == b'-') => {}
            _ => return false,
        }
    }
    true
}

impl FromStr for RepositoryName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_NAME_LEN || !s.split('/').all(is_path_component) {
            return Err(NameError::InvalidName);
        }
        Ok(RepositoryName(s.to_string()))
    }
}

impl RepositoryName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Its first path component: the namespace that owns it (`team` of `team/app/web`, `alpine`
    /// of `alpine`).
    pub fn namespace(&self) -> &str {
        self.0.split_once('/').map_or(&self.0, |(ns, _)| ns)
    }
}

impl fmt::Display for RepositoryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`
impl FromStr for Tag {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= MAX_TAG_LEN
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b[1..]
                .iter()
                .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'));
        if !ok {
            return Err(NameError::InvalidTag);
        }
        Ok(Tag(s.to_string()))
    }
}

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a manifest URL points at.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl FromStr for Reference {
    type Err = NameError;

    /// A reference containing `:` can only be a digest (tags never contain one).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(':') {
            Ok(Reference::Digest(s.parse()?))
        } else {
            Ok(Reference::Tag(s.parse()?))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_names_follow_the_grammar() {
        let cases = [
            ("library/ubuntu", true),
            ("a", true),
            ("a/b/c/d/e", true),
            ("my-app", true),
            ("my--app", true),
            ("my__app", true),
            ("my.app_x", true),
            ("0abc/9", true),
            ("my___app", false),
            ("my._app", false),
            ("My/app", false),
            ("-app", false),
            ("app-", false),
            ("a//b", false),
            ("/a", false),
            ("a/", false),
            ("", false),
            ("a:b", false),
        ];
        for (input, ok) in cases {
            assert_eq!(input.parse::<RepositoryName>().is_ok(), ok, "{input}");
        }
        assert!("a".repeat(256).parse::<RepositoryName>().is_err());
        assert!("a".repeat(255).parse::<RepositoryName>().is_ok());
    }

    #[test]
    fn tags_follow_the_grammar() {
        let cases = [
            ("latest", true),
            ("v1.2.3-rc_1", true),
            ("_x", true),
            ("A", true),
            (".x", false),
            ("-x", false),
            ("a/b", false),
            ("", false),
        ];
        for (input, ok) in cases {
            assert_eq!(input.parse::<Tag>().is_ok(), ok, "{input}");
        }
        assert!("a".repeat(128).parse::<Tag>().is_ok());
        assert!("a".repeat(129).parse::<Tag>().is_err());
    }

    #[test]
    fn references_are_tags_or_digests() {
        assert!(matches!("v1".parse::<Reference>(), Ok(Reference::Tag(_))));
        assert!(matches!(
            format!("sha256:{}", "0".repeat(64)).parse::<Reference>(),
            Ok(Reference::Digest(_))
        ));
        assert!(matches!(
            "sha256:zz".parse::<Reference>(),
            Err(NameError::InvalidDigest(_))
        ));
    }
}
