//! `GET`/`HEAD`/`PUT`/`DELETE /v2/<name>/manifests/<reference>`.

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use oci::{Reference, RepositoryName};

use super::ApiResult;
use super::error::{ApiError, ErrorCode};
use crate::service::{Registry, ServiceError};

const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
const OCI_SUBJECT: HeaderName = HeaderName::from_static("oci-subject");

pub async fn get(
    registry: &Registry,
    repo: &RepositoryName,
    reference: &Reference,
    with_body: bool,
) -> ApiResult {
    let m = registry.get_manifest(repo, reference).await?;
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
    let bytes = read_limited(body, registry.max_manifest_bytes()).await?;
    let pushed = registry
        .put_manifest(repo, reference, content_type.as_deref(), bytes)
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
    Ok(response)
}

pub async fn delete(
    registry: &Registry,
    repo: &RepositoryName,
    reference: &Reference,
) -> ApiResult {
    registry.delete_manifest(repo, reference).await?;
    Ok(accepted())
}

fn accepted() -> Response {
    (StatusCode::ACCEPTED, [(header::CONTENT_LENGTH, "0")]).into_response()
}
