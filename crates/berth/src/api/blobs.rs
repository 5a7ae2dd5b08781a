//! `GET`/`HEAD`/`DELETE /v2/<name>/blobs/<digest>`.

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
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

/// The headers every answer about a blob carries, made once per request.
struct BlobHeaders {
    digest: HeaderValue,
    etag: HeaderValue,
}

impl BlobHeaders {
    fn new(digest: &Digest) -> BlobHeaders {
        let text = digest.to_string();
        let etag = HeaderValue::try_from(format!("\"{text}\""));
        // A digest is ASCII by construction: both always convert.
        BlobHeaders {
            etag: etag.unwrap_or(HeaderValue::from_static("")),
            digest: HeaderValue::try_from(text).unwrap_or(HeaderValue::from_static("")),
        }
    }

    fn apply(self, headers: &mut HeaderMap) {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        headers.insert(DOCKER_CONTENT_DIGEST, self.digest);
        headers.insert(header::ETAG, self.etag);
        headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    }
}

const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");

pub async fn get(
    registry: &Registry,
    ctx: &RequestContext,
    repo: &RepositoryName,
    digest: &Digest,
    request: &Parts,
    with_body: bool,
) -> ApiResult {
    let common = BlobHeaders::new(digest);
    let answer = |status: StatusCode, length: Option<u64>, body: Body| {
        let mut r = Response::new(body);
        *r.status_mut() = status;
        if let Some(length) = length {
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, length.into());
        }
        r
    };
    if !with_body {
        let size = registry.stat_blob(ctx, repo, digest).await?;
        let mut r = answer(StatusCode::OK, Some(size), Body::empty());
        common.apply(r.headers_mut());
        return Ok(r);
    }
    if request
        .headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v == common.etag)
    {
        registry.stat_blob(ctx, repo, digest).await?;
        let mut r = answer(StatusCode::NOT_MODIFIED, None, Body::empty());
        common.apply(r.headers_mut());
        return Ok(r);
    }
    if let Some(location) = registry.blob_redirect(ctx, repo, digest).await? {
        let location =
            HeaderValue::try_from(location).map_err(|_| ApiError::new(ErrorCode::Internal))?;
        let mut r = answer(StatusCode::TEMPORARY_REDIRECT, Some(0), Body::empty());
        common.apply(r.headers_mut());
        r.headers_mut().insert(header::LOCATION, location);
        return Ok(r);
    }
    let range = parse_range(&request.headers);
    let read = match registry.read_blob(ctx, repo, digest, range).await? {
        Ok(read) => read,
        Err(u) => return Err(unsatisfiable(u.size)),
    };
    let body = match read.body {
        BlobBody::Whole(bytes) => Body::from(bytes),
        BlobBody::Stream(stream) => Body::from_stream(stream),
    };
    let mut response = match read.range {
        Some(r) => {
            let mut response = answer(StatusCode::PARTIAL_CONTENT, Some(r.len), body);
            let content_range = format!("bytes {}-{}/{}", r.start, r.start + r.len - 1, read.size);
            response.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::try_from(content_range)
                    .map_err(|_| ApiError::new(ErrorCode::Internal))?,
            );
            response
        }
        None => answer(StatusCode::OK, Some(read.size), body),
    };
    common.apply(response.headers_mut());
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
