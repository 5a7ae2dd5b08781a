//! Paginated listings: tags, the catalog, and referrers.

use axum::http::request::Parts;
use axum::http::{HeaderName, header};
use axum::response::IntoResponse;
use oci::{Digest, RepositoryName};
use serde_json::json;

use super::error::{ApiError, ErrorCode};
use super::{ApiResult, query_pairs, query_param};
use crate::auth::rights::Rights;
use crate::service::{Listing, MAX_PAGE_SIZE, Registry, RequestContext};

/// `n` and `last` from the query.
fn page(request: &Parts) -> Result<(Option<usize>, Option<String>), ApiError> {
    let pairs = query_pairs(request);
    let n = query_param(&pairs, "n")
        .map(|n| n.parse::<u64>())
        .transpose()
        .map_err(|_| {
            ApiError::new(ErrorCode::Unsupported)
                .status(axum::http::StatusCode::BAD_REQUEST)
                .detail("n must be a non-negative integer")
        })?;
    // Larger pages are cut to the maximum; the Link header then asks for pages of that size.
    let n = n.map(|n| n.min(MAX_PAGE_SIZE as u64) as usize);
    Ok((n, query_param(&pairs, "last")))
}

/// `Link: <path?n=N&last=LAST>; rel="next"` when a full page leaves more behind.
fn link_header(path: &str, n: Option<usize>, listing: &Listing) -> Option<String> {
    let (n, last) = (n?, listing.items.last()?);
    if !listing.more {
        return None;
    }
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("n", &n.to_string())
        .append_pair("last", last)
        .finish();
    Some(format!("<{path}?{query}>; rel=\"next\""))
}

fn listing_response(
    path: &str,
    n: Option<usize>,
    listing: &Listing,
    body: serde_json::Value,
) -> ApiResult {
    let mut response = (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response();
    if let Some(link) = link_header(path, n, listing)
        && let Ok(v) = link.parse()
    {
        response.headers_mut().insert(header::LINK, v);
    }
    Ok(response)
}

pub async fn tags(
    registry: &Registry,
    ctx: &RequestContext,
    repo: &RepositoryName,
    request: &Parts,
) -> ApiResult {
    let (n, last) = page(request)?;
    let listing = registry.list_tags(ctx, repo, last.as_deref(), n).await?;
    let body = json!({ "name": repo.as_str(), "tags": listing.items });
    listing_response(&format!("/v2/{repo}/tags/list"), n, &listing, body)
}

/// The catalog as `visible` lets the caller see it.
pub async fn catalog(
    registry: &Registry,
    ctx: &RequestContext,
    visible: &Rights,
    request: &Parts,
) -> ApiResult {
    let (n, last) = page(request)?;
    let listing = registry
        .list_repositories(ctx, visible, last.as_deref(), n)
        .await?;
    let body = json!({ "repositories": listing.items });
    listing_response("/v2/_catalog", n, &listing, body)
}

pub async fn referrers(
    registry: &Registry,
    ctx: &RequestContext,
    repo: &RepositoryName,
    subject: &Digest,
    request: &Parts,
) -> ApiResult {
    let filter = query_param(&query_pairs(request), "artifactType");
    let referrers = registry
        .referrers(ctx, repo, subject, filter.as_deref())
        .await?;
    let manifests: Vec<oci::Descriptor> = referrers
        .into_iter()
        .map(|r| oci::Descriptor {
            media_type: r.media_type,
            digest: r.digest.to_string(),
            size: r.size,
            artifact_type: r.artifact_type,
            annotations: r.annotations,
            urls: None,
            data: None,
        })
        .collect();
    let body = json!({
        "schemaVersion": 2,
        "mediaType": oci::media_type::OCI_INDEX,
        "manifests": manifests,
    });
    let mut response = (
        [(header::CONTENT_TYPE, oci::media_type::OCI_INDEX)],
        body.to_string(),
    )
        .into_response();
    if filter.is_some() {
        response.headers_mut().insert(
            HeaderName::from_static("oci-filters-applied"),
            header::HeaderValue::from_static("artifactType"),
        );
    }
    Ok(response)
}
