//! `GET`/`HEAD`/`PUT`/`DELETE /v2/<name>/manifests/<reference>`.

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use oci::{Reference, RepositoryName};

use super::error::{ApiError, ErrorCode};
use super::{ApiResult, content_length, digest, query_pairs};
use crate::service::{ManifestPut, Registry, RequestContext, ServiceError};

const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
const OCI_SUBJECT: HeaderName = HeaderName::from_static("oci-subject");
const OCI_TAG: HeaderName = HeaderName::from_static("oci-tag");
/// Most `?tag=` parameters one push may carry.
const MAX_TAGS_PER_PUSH: usize = 100;

/// `?tag=` (repeatable) and `?digest=` of a manifest push.
fn push_options(request: &Parts) -> Result<ManifestPut, ApiError> {
    let mut options = ManifestPut::default();
    for (key, value) in query_pairs(request) {
        match key.as_str() {
            "tag" => {
                let tag = value.parse().map_err(|_| {
                    ApiError::new(ErrorCode::TagInvalid).detail(format!(
                        "tag parameter {value:?} does not match the grammar"
                    ))
                })?;
                options.tags.push(tag);
            }
            "digest" => options.digest = Some(digest(&value)?),
            _ => {}
        }
    }
    if options.tags.len() > MAX_TAGS_PER_PUSH {
        return Err(ApiError::new(ErrorCode::TagInvalid).detail(format!(
            "at most {MAX_TAGS_PER_PUSH} tag parameters per push"
        )));
    }
    Ok(options)
}

pub async fn get(
    registry: &Registry,
    ctx: &RequestContext,
    repo: &RepositoryName,
    reference: &Reference,
    with_body: bool,
) -> ApiResult {
    let m = registry.get_manifest(ctx, repo, reference).await?;
    if with_body {
        registry.record_pull(ctx, repo, reference, &m);
    }
    let digest = m.digest.to_string();
    let headers = [
        (header::CONTENT_TYPE, m.media_type),
        (DOCKER_CONTENT_DIGEST, digest.clone()),
        (header::ETAG, format!("\"{digest}\"")),
        (header::CONTENT_LENGTH, m.bytes.len().to_string()),
    ];
    let body = if with_body {
        Body::from(m.bytes)
    } else {
        Body::empty()
    };
    Ok((headers, body).into_response())
}

/// Reads at most `limit` bytes of a manifest body. A larger body is a 413; the rest of it is
/// read and dropped (up to a bound) so the client, still sending, gets the answer and not a reset.
async fn read_limited(body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::new(ErrorCode::ManifestInvalid).detail(e.to_string()))?;
        seen += chunk.len();
        if seen > limit.saturating_mul(4) {
            break;
        }
        if seen <= limit {
            bytes.extend_from_slice(&chunk);
        }
    }
    if seen > limit {
        return Err(ServiceError::ManifestTooLarge { size: seen, limit }.into());
    }
    Ok(bytes)
}

pub async fn put(
    registry: &Registry,
    ctx: &RequestContext,
    repo: &RepositoryName,
    reference: &Reference,
    request: &Parts,
    body: Body,
) -> ApiResult {
    let content_type = request
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let options = push_options(request)?;
    let by_digest_with_tags = matches!(reference, Reference::Digest(_)) && !options.tags.is_empty();
    let declared = content_length(&request.headers).and_then(|n| usize::try_from(n).ok());
    // Reserved before any byte is read, held until the manifest is stored.
    let _buffer = registry.reserve_manifest_buffer(declared).await?;
    let bytes = read_limited(body, registry.max_manifest_bytes()).await?;
    let pushed = registry
        .put_manifest(
            ctx,
            repo,
            reference,
            content_type.as_deref(),
            bytes,
            options,
        )
        .await?;
    let digest = pushed.digest.to_string();
    let mut response = (
        StatusCode::CREATED,
        [
            (header::LOCATION, format!("/v2/{repo}/manifests/{digest}")),
            (DOCKER_CONTENT_DIGEST, digest),
            (header::CONTENT_LENGTH, "0".to_string()),
        ],
    )
        .into_response();
    if let Some(subject) = pushed.subject
        && let Ok(v) = subject.to_string().parse()
    {
        response.headers_mut().insert(OCI_SUBJECT, v);
    }
    // A push by digest with `?tag=` names each tag it applied (distribution-spec main).
    if by_digest_with_tags {
        for tag in &pushed.tags {
            if let Ok(v) = tag.as_str().parse() {
                response.headers_mut().append(OCI_TAG, v);
            }
        }
    }
    Ok(response)
}

pub async fn delete(
    registry: &Registry,
    ctx: &RequestContext,
    repo: &RepositoryName,
    reference: &Reference,
) -> ApiResult {
    registry.delete_manifest(ctx, repo, reference).await?;
    Ok(accepted())
}

fn accepted() -> Response {
    (StatusCode::ACCEPTED, [(header::CONTENT_LENGTH, "0")]).into_response()
}
