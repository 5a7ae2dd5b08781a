//! `GET`/`HEAD`/`DELETE /v2/<name>/blobs/<digest>`.

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use oci::{Digest, RepositoryName};

use super::error::{ApiError, ApiResult, ErrorCode};
use crate::service::{BlobBody, RangeRequest, Registry, RequestContext};

/// Parses `bytes=a-b`, `bytes=a-`, `bytes=-n`. Anything else (other units, several ranges,
/// malformed values) is ignored and the whole blob is served, as RFC 9110 allows.
fn parse_range(headers: &HeaderMap) -> Option<RangeRequest> {
    let value = headers.get(header::RANGE)?.to_str().ok()?.trim();
    let spec = value.strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (start, end) = spec.split_once('-')?;
    let num = |s: &str| s.trim().parse::<u64>().ok();
    match (start.trim(), end.trim()) {
        ("", "") => None,
        ("", n) => Some(RangeRequest::Suffix(num(n)?)),
        (s, "") => Some(RangeRequest::From {
            start: num(s)?,
            end: None,
        }),
        (s, e) => Some(RangeRequest::From {
            start: num(s)?,
            end: Some(num(e)?),
        }),
    }
}

fn unsatisfiable(size: u64) -> ApiError {
    ApiError::new(ErrorCode::Unsupported)
        .status(StatusCode::RANGE_NOT_SATISFIABLE)
        .header(header::CONTENT_RANGE, &format!("bytes */{size}"))
        .detail("requested range not satisfiable")
}

pub async fn get(
    registry: &Registry,
    ctx: &RequestContext,
    repo: &RepositoryName,
    digest: &Digest,
    request: &Parts,
    with_body: bool,
) -> ApiResult {
    let digest_str = digest.to_string();
    let etag = format!("\"{digest_str}\"");
    let common = [
        (header::CONTENT_TYPE, "application/octet-stream".to_string()),
        (
            header::HeaderName::from_static("docker-content-digest"),
            digest_str.clone(),
        ),
        (header::ETAG, etag.clone()),
        (header::ACCEPT_RANGES, "bytes".to_string()),
    ];
    if !with_body {
        let size = registry.stat_blob(ctx, repo, digest).await?;
        let mut r = (common, [(header::CONTENT_LENGTH, size.to_string())]).into_response();
        *r.body_mut() = Body::empty();
        return Ok(r);
    }
    if request
        .headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        registry.stat_blob(ctx, repo, digest).await?;
        return Ok((StatusCode::NOT_MODIFIED, common).into_response());
    }
    {
        if let Some(location) = registry.blob_redirect(ctx, repo, digest).await? {
            let mut r = (
                StatusCode::TEMPORARY_REDIRECT,
                common,
                [(header::CONTENT_LENGTH, "0".to_string())],
            )
                .into_response();
            r.headers_mut().insert(
                header::LOCATION,
                location
                    .parse()
                    .map_err(|_| ApiError::new(ErrorCode::Internal))?,
            );
            return Ok(r);
        }
    }
    let range = parse_range(&request.headers);
    let read = match registry.read_blob(ctx, repo, digest, range).await? {
        Ok(read) => read,
        Err(u) => return Err(unsatisfiable(u.size)),
    };
    let mut response = Response::new(match read.body {
        BlobBody::Whole(bytes) => Body::from(bytes),
        BlobBody::Stream(stream) => Body::from_stream(stream),
    });
    let headers = response.headers_mut();
    for (k, v) in common {
        headers.insert(
            k,
            v.parse().map_err(|_| ApiError::new(ErrorCode::Internal))?,
        );
    }
    match read.range {
        Some(r) => {
            *response.status_mut() = StatusCode::PARTIAL_CONTENT;
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_LENGTH, r.len.into());
            let content_range = format!("bytes {}-{}/{}", r.start, r.start + r.len - 1, read.size);
            headers.insert(
                header::CONTENT_RANGE,
                content_range
                    .parse()
                    .map_err(|_| ApiError::new(ErrorCode::Internal))?,
            );
        }
        None => {
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, read.size.into());
        }
    }
    Ok(response)
}

pub async fn delete(
    registry: &Registry,
    ctx: &RequestContext,
    repo: &RepositoryName,
    digest: &Digest,
) -> ApiResult {
    registry.delete_blob(ctx, repo, digest).await?;
    Ok((StatusCode::ACCEPTED, [(header::CONTENT_LENGTH, "0")]).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(value: &str, expected: Option<RangeRequest>) {
        let mut h = HeaderMap::new();
        h.insert(
            header::RANGE,
            value.parse().unwrap_or_else(|_| panic!("{value}")),
        );
        assert_eq!(parse_range(&h), expected, "{value}");
    }

    #[test]
    fn range_headers() {
        check(
            "bytes=0-9",
            Some(RangeRequest::From {
                start: 0,
                end: Some(9),
            }),
        );
        check(
            "bytes=5-",
            Some(RangeRequest::From {
                start: 5,
                end: None,
            }),
        );
        check("bytes=-5", Some(RangeRequest::Suffix(5)));
        check("bytes=0-1,4-5", None);
        check("bytes=-", None);
        check("bytes=a-b", None);
        check("items=0-1", None);
    }
}
