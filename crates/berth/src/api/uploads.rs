//! Blob uploads: `POST /v2/<name>/blobs/uploads/` (start, monolithic, mount) and
//! `GET`/`PATCH`/`PUT`/`DELETE /v2/<name>/blobs/uploads/<id>`.

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::IntoResponse;
use oci::{Digest, RepositoryName};

use super::error::{ApiError, ApiResult, ErrorCode};
use super::{body_stream, content_length, digest, query_pairs, query_param, upload_range};
use crate::service::{Chunk, Registry, RequestContext, UploadState};

const UPLOAD_UUID: HeaderName = HeaderName::from_static("docker-upload-uuid");
const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");

fn upload_location(repo: &RepositoryName, id: &str) -> String {
    format!("/v2/{repo}/blobs/uploads/{id}")
}

/// 202 (or 204 for status) describing where an upload stands.
fn in_progress(status: StatusCode, repo: &RepositoryName, upload: &UploadState) -> ApiResult {
    Ok((
        status,
        [
            (header::LOCATION, upload_location(repo, &upload.id)),
            (header::RANGE, upload_range(upload.size)),
            (UPLOAD_UUID, upload.id.clone()),
            (header::CONTENT_LENGTH, "0".to_string()),
        ],
    )
        .into_response())
}

fn created(repo: &RepositoryName, digest: &Digest) -> ApiResult {
    Ok((
        StatusCode::CREATED,
        [
            (header::LOCATION, format!("/v2/{repo}/blobs/{digest}")),
            (DOCKER_CONTENT_DIGEST, digest.to_string()),
            (header::CONTENT_LENGTH, "0".to_string()),
        ],
    )
        .into_response())
}

pub async fn start(
    registry: &Registry,
    ctx: &RequestContext,
    repo: &RepositoryName,
    request: &Parts,
    body: Body,
) -> ApiResult {
    let pairs = query_pairs(request);
    if let Some(mount) = query_param(&pairs, "mount") {
        let mount = digest(&mount)?;
        // With `from`, only that repository is asked; without it, the whole registry is. A
        // mount that finds nothing (or names a repository we cannot parse) degrades to an
        // ordinary upload, as the spec asks.
        let mounted = match query_param(&pairs, "from") {
            Some(from) => match from.parse::<RepositoryName>() {
                Ok(from) => registry.mount_blob(ctx, repo, &from, &mount).await?,
                Err(_) => None,
            },
            None => registry.mount_known_blob(ctx, repo, &mount).await?,
        };
        if mounted.is_some() {
            return created(repo, &mount);
        }
        let upload = registry.start_upload(ctx, repo).await?;
        return in_progress(StatusCode::ACCEPTED, repo, &upload);
    }
    if let Some(d) = query_param(&pairs, "digest") {
        let d = digest(&d)?;
        registry
            .upload_monolithic(ctx, repo, &d, body_stream(body))
            .await?;
        return created(repo, &d);
    }
    let upload = registry.start_upload(ctx, repo).await?;
    in_progress(StatusCode::ACCEPTED, repo, &upload)
}

pub async fn status(
    registry: &Registry,
    ctx: &RequestContext,
    repo: &RepositoryName,
    id: &str,
) -> ApiResult {
    let upload = registry.upload_status(ctx, repo, id).await?;
    in_progress(StatusCode::NO_CONTENT, repo, &upload)
}

/// `Content-Range: <start>-<end>` (inclusive), with or without a `bytes ` / `bytes=` prefix.
fn parse_content_range(headers: &HeaderMap) -> Result<Option<(u64, u64)>, ApiError> {
    let Some(value) = headers.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let invalid = || {
        ApiError::new(ErrorCode::BlobUploadInvalid)
            .status(StatusCode::RANGE_NOT_SATISFIABLE)
            .detail("Content-Range must be <start>-<end>")
    };
    let text = value.to_str().map_err(|_| invalid())?.trim();
    let text = text
        .strip_prefix("bytes=")
        .or_else(|| text.strip_prefix("bytes "))
        .unwrap_or(text);
    let (start, end) = text.split_once('-').ok_or_else(invalid)?;
    let start: u64 = start.trim().parse().map_err(|_| invalid())?;
    let end: u64 = end.trim().parse().map_err(|_| invalid())?;
    if end < start {
        return Err(invalid());
    }
    Ok(Some((start, end)))
}

/// A chunk from a PATCH or closing PUT: its declared start (from Content-Range) and body.
/// A Content-Range whose length disagrees with Content-Length is refused before any byte is read.
async fn chunk(
    registry: &Registry,
    ctx: &RequestContext,
    repo: &RepositoryName,
    id: &str,
    request: &Parts,
    body: Body,
) -> Result<Chunk, ApiError> {
    let range = parse_content_range(&request.headers)?;
    if let (Some((start, end)), Some(len)) = (range, content_length(&request.headers))
        && end - start + 1 != len
    {
        let current = registry.upload_status(ctx, repo, id).await?;
        return Err(ApiError::new(ErrorCode::BlobUploadInvalid)
            .status(StatusCode::RANGE_NOT_SATISFIABLE)
            .header(header::RANGE, &upload_range(current.size))
            .header(header::LOCATION, &upload_location(repo, id))
            .detail("Content-Range does not match Content-Length"));
    }
    Ok(Chunk {
        start: range.map(|(start, _)| start),
        // With Content-Length too, the two agree (checked above); with a chunked body the
        // range is the only bound, and the service cuts the body there.
        len: range.map(|(start, end)| end - start + 1),
        body: body_stream(body),
    })
}

pub async fn patch(
    registry: &Registry,
    ctx: &RequestContext,
    repo: &RepositoryName,
    id: &str,
    request: &Parts,
    body: Body,
) -> ApiResult {
    let chunk = chunk(registry, ctx, repo, id, request, body).await?;
    let upload = registry
        .append_upload(ctx, repo, id, chunk)
        .await
        .map_err(|e| ApiError::from(e).header(header::LOCATION, &upload_location(repo, id)))?;
    in_progress(StatusCode::ACCEPTED, repo, &upload)
}

pub async fn put(
    registry: &Registry,
    ctx: &RequestContext,
    repo: &RepositoryName,
    id: &str,
    request: &Parts,
    body: Body,
) -> ApiResult {
    let pairs = query_pairs(request);
    let Some(d) = query_param(&pairs, "digest") else {
        return Err(ApiError::new(ErrorCode::DigestInvalid)
            .detail("the digest query parameter is required"));
    };
    let d = digest(&d)?;
    let chunk = chunk(registry, ctx, repo, id, request, body).await?;
    registry
        .finish_upload(ctx, repo, id, &d, chunk)
        .await
        .map_err(|e| ApiError::from(e).header(header::LOCATION, &upload_location(repo, id)))?;
    created(repo, &d)
}

pub async fn cancel(
    registry: &Registry,
    ctx: &RequestContext,
    repo: &RepositoryName,
    id: &str,
) -> ApiResult {
    registry.cancel_upload(ctx, repo, id).await?;
    Ok((StatusCode::NO_CONTENT, [(header::CONTENT_LENGTH, "0")]).into_response())
}
