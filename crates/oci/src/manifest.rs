//! Parsing pushed manifests into what the registry needs to know about them: their media type,
//! the blobs and child manifests they reference, their subject and artifact type.
//!
//! The original bytes are never re-serialised: the registry stores and serves exactly what was
//! pushed, and this module only reads them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::media_type::{self, ManifestKind};

/// A content descriptor as it appears inside manifests and the referrers index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
    /// The content itself, base64-encoded, embedded in the descriptor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

/// The fields of a manifest or index Berth reads; unknown fields are ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<i64>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
    subject: Option<Descriptor>,
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParsedManifest {
    pub media_type: String,
    pub kind: ManifestKind,
    /// Blobs that must exist in the repository: the config and every distributable layer.
    pub blobs: Vec<Digest>,
    /// Manifests an index points at; they must exist in the repository.
    pub children: Vec<Digest>,
    /// The size each descriptor of `blobs` and `children` declares, which must be the size the
    /// registry holds under that digest.
    pub declared_sizes: Vec<(Digest, u64)>,
    pub subject: Option<Digest>,
    /// What the referrers API reports: `artifactType`, else an image manifest's config type.
    pub artifact_type: Option<String>,
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not valid JSON: {0}")]
    Json(String),
    #[error("unsupported schemaVersion; expected 2")]
    SchemaVersion,
    #[error("unsupported manifest media type {0:?}")]
    UnsupportedMediaType(String),
    #[error("mediaType {body:?} in the manifest does not match Content-Type {header:?}")]
    MediaTypeMismatch { header: String, body: String },
    #[error("manifest is missing its {0}")]
    MissingField(&'static str),
    #[error("invalid digest {digest:?} in {field}")]
    BadDescriptor { field: &'static str, digest: String },
    #[error(
        "the data field of descriptor {digest} in {field} is not base64 of {size} bytes hashing to its digest"
    )]
    BadData {
        field: &'static str,
        digest: String,
        size: u64,
    },
}

/// Content types clients send when they do not name the manifest's own type.
fn is_generic_content_type(ct: &str) -> bool {
    matches!(ct, "" | "application/json" | "application/octet-stream")
}

/// The descriptor's digest, after checking that embedded `data`, if any, is the content it
/// describes: valid base64 of exactly `size` bytes that hash to `digest`.
fn descriptor_digest(field: &'static str, d: &Descriptor) -> Result<Digest, ManifestError> {
    let digest: Digest = d.digest.parse().map_err(|_| ManifestError::BadDescriptor {
        field,
        digest: d.digest.clone(),
    })?;
    if let Some(data) = &d.data {
        use base64::Engine as _;
        let bad = || ManifestError::BadData {
            field,
            digest: d.digest.clone(),
            size: d.size,
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|_| bad())?;
        if bytes.len() as u64 != d.size || Digest::of(digest.algorithm(), &bytes) != digest {
            return Err(bad());
        }
    }
    Ok(digest)
}

fn is_foreign_layer(d: &Descriptor) -> bool {
    d.media_type == media_type::DOCKER_FOREIGN_LAYER
        || d.media_type
            .starts_with(media_type::OCI_NONDISTRIBUTABLE_LAYER_PREFIX)
}

/// Parses manifest bytes pushed with the given Content-Type header (if any).
pub fn parse(content_type: Option<&str>, bytes: &[u8]) -> Result<ParsedManifest, ManifestError> {
    let raw: RawManifest =
        serde_json::from_slice(bytes).map_err(|e| ManifestError::Json(e.to_string()))?;
    if raw.schema_version != Some(2) {
        return Err(ManifestError::SchemaVersion);
    }
    let header = content_type.map(media_type::essence).unwrap_or("");
    let media_type = match (&raw.media_type, is_generic_content_type(header)) {
        (Some(body), false) if body != header => {
            return Err(ManifestError::MediaTypeMismatch {
                header: header.to_string(),
                body: body.clone(),
            });
        }
        (_, false) => header.to_string(),
        (Some(body), true) => body.clone(),
        // Neither says: infer from the shape, as the image spec allows mediaType to be absent.
        (None, true) if raw.manifests.is_some() => media_type::OCI_INDEX.to_string(),
        (None, true) => media_type::OCI_MANIFEST.to_string(),
    };
    let kind = media_type::manifest_kind(&media_type)
        .ok_or_else(|| ManifestError::UnsupportedMediaType(media_type.clone()))?;

    let mut blobs = Vec::new();
    let mut children = Vec::new();
    let mut declared_sizes = Vec::new();
    // An empty artifactType is the same as none (the referrers API then falls back).
    let mut artifact_type = raw.artifact_type.clone().filter(|t| !t.is_empty());
    match kind {
        ManifestKind::Image => {
            let config = raw
                .config
                .as_ref()
                .ok_or(ManifestError::MissingField("config"))?;
            let digest = descriptor_digest("config", config)?;
            declared_sizes.push((digest.clone(), config.size));
            blobs.push(digest);
            for layer in raw.layers.iter().flatten() {
                let digest = descriptor_digest("layers", layer)?;
                if !is_foreign_layer(layer) {
                    declared_sizes.push((digest.clone(), layer.size));
                    blobs.push(digest);
                }
            }
            if artifact_type.is_none() {
                artifact_type = Some(config.media_type.clone());
            }
        }
        ManifestKind::Index => {
            let manifests = raw
                .manifests
                .as_ref()
                .ok_or(ManifestError::MissingField("manifests"))?;
            for m in manifests {
                let digest = descriptor_digest("manifests", m)?;
                declared_sizes.push((digest.clone(), m.size));
                children.push(digest);
            }
        }
    }
    let subject = raw
        .subject
        .as_ref()
        .map(|s| descriptor_digest("subject", s))
        .transpose()?;
    Ok(ParsedManifest {
        media_type,
        kind,
        blobs,
        children,
        declared_sizes,
        subject,
        artifact_type,
        annotations: raw.annotations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media_type::*;

    fn d(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    fn image(media_type: Option<&str>) -> String {
        let mt = media_type
            .map(|m| format!(r#""mediaType":"{m}","#))
            .unwrap_or_default();
        format!(
            r#"{{"schemaVersion":2,{mt}"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":3}}]}}"#,
            d(1),
            d(2)
        )
    }

    #[test]
    fn image_manifest_lists_config_and_layers() {
        let m = parse(Some(OCI_MANIFEST), image(Some(OCI_MANIFEST)).as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.kind, ManifestKind::Image);
        let blobs: Vec<String> = m.blobs.iter().map(|b| b.to_string()).collect();
        assert_eq!(blobs, vec![d(1), d(2)]);
        assert_eq!(
            m.artifact_type.as_deref(),
            Some("application/vnd.oci.image.config.v1+json")
        );
    }

    #[test]
    fn media_type_is_resolved_from_header_and_body() {
        let cases: [(Option<&str>, Option<&str>, Result<&str, ()>); 6] = [
            (Some(OCI_MANIFEST), Some(OCI_MANIFEST), Ok(OCI_MANIFEST)),
            (Some(OCI_MANIFEST), None, Ok(OCI_MANIFEST)),
            (None, Some(DOCKER_MANIFEST), Ok(DOCKER_MANIFEST)),
            (None, None, Ok(OCI_MANIFEST)),
            (Some(DOCKER_MANIFEST), Some(OCI_MANIFEST), Err(())),
            (Some("text/plain"), None, Err(())),
        ];
        for (header, body, expected) in cases {
            let got = parse(header, image(body).as_bytes());
            assert_eq!(
                got.map(|m| m.media_type).map_err(|_| ()),
                expected.map(String::from),
                "{header:?} {body:?}"
            );
        }
    }

    #[test]
    fn index_lists_children_and_subject() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","artifactType":"x/y","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1}}],"subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1}}}}"#,
            d(3),
            d(4)
        );
        let m = parse(None, body.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.kind, ManifestKind::Index);
        assert_eq!(m.children.len(), 1);
        assert_eq!(m.subject.map(|s| s.to_string()), Some(d(4)));
        assert_eq!(m.artifact_type.as_deref(), Some("x/y"));
    }

    #[test]
    fn rejects_malformed_manifests() {
        assert!(matches!(parse(None, b"{"), Err(ManifestError::Json(_))));
        assert!(matches!(parse(None, b"[]"), Err(ManifestError::Json(_))));
        assert_eq!(
            parse(None, br#"{"schemaVersion":1}"#),
            Err(ManifestError::SchemaVersion)
        );
        assert_eq!(
            parse(Some(OCI_MANIFEST), br#"{"schemaVersion":2}"#),
            Err(ManifestError::MissingField("config"))
        );
        let bad =
            r#"{"schemaVersion":2,"config":{"mediaType":"a/b","digest":"sha256:00","size":1}}"#;
        assert!(matches!(
            parse(None, bad.as_bytes()),
            Err(ManifestError::BadDescriptor { .. })
        ));
    }

    #[test]
    fn embedded_data_must_be_the_described_content() {
        let hello = Digest::sha256_of(b"hello");
        let check = |data: &str, size: u64, digest: &Digest| {
            let body = format!(
                r#"{{"schemaVersion":2,"config":{{"mediaType":"a/b","digest":"{digest}","size":{size},"data":"{data}"}}}}"#
            );
            parse(Some(OCI_MANIFEST), body.as_bytes()).map(|m| m.declared_sizes)
        };
        // "aGVsbG8=" is base64 of "hello".
        assert_eq!(check("aGVsbG8=", 5, &hello), Ok(vec![(hello.clone(), 5)]));
        for (data, size, digest) in [
            ("aGVsbG8=", 6, hello.clone()),
            ("aGVsbG8=", 5, Digest::sha256_of(b"other")),
            ("not base64!", 5, hello.clone()),
            ("aGVsbG8", 5, hello.clone()),
        ] {
            assert!(
                matches!(
                    check(data, size, &digest),
                    Err(ManifestError::BadData { .. })
                ),
                "{data} {size}"
            );
        }
    }

    #[test]
    fn foreign_layers_are_not_required() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"a/b","digest":"{}","size":1}},"layers":[{{"mediaType":"{DOCKER_FOREIGN_LAYER}","digest":"{}","size":1,"urls":["https://example.com/x"]}}]}}"#,
            d(1),
            d(2)
        );
        let m = parse(None, body.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.blobs.len(), 1);
    }
}
