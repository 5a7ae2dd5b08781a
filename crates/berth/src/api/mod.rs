//! HTTP only: parses each request into a typed [`Route`], dispatches it to one handler module
//! per endpoint family, and turns every failure into the spec's error body (see [`error`]).
//!
//! Repository names may contain any number of `/`, so routes are parsed from the end of the
//! path rather than matched by a router's patterns. `/auth/token` goes to [`token`] and
//! `/api/v1/` to [`manage`], the management API, whose routes are a table.

pub mod access;
mod blobs;
pub mod error;
mod listings;
pub mod manage;
mod manifests;
pub mod observe;
pub mod token;
mod uploads;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt;
use oci::{Digest, Reference, RepositoryName};

use crate::auth::limits::{ClientKey, Limited};
use crate::auth::{AuthError, Credentials, Principal};
use crate::metrics::{AuthFailure, RouteKind};
use crate::service::{BodyStream, Registry, RequestContext, RequestId};
use error::{ApiError, ApiResult, ErrorCode};

const API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");

/// Every endpoint of the distribution API, with its path parameters validated.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    Base,
    Catalog,
    Tags(RepositoryName),
    Manifest(RepositoryName, Reference),
    /// A manifest path whose reference is neither a tag nor a digest: a PUT is refused as
    /// TAG_INVALID, while a read or delete finds nothing by that name (404 MANIFEST_UNKNOWN).
    InvalidTag(RepositoryName),
    Blob(RepositoryName, Digest),
    /// `/blobs/uploads/`: starting an upload (or a mount, or a monolithic push).
    Uploads(RepositoryName),
    Upload(RepositoryName, String),
    Referrers(RepositoryName, Digest),
}

fn name(s: &str) -> Result<RepositoryName, ApiError> {
    s.parse().map_err(|_| ApiError::new(ErrorCode::NameInvalid))
}

/// The path without its last segment, and that segment (`""` and the whole path when it has
/// no `/`).
fn pop(s: &str) -> (&str, &str) {
    s.rsplit_once('/').unwrap_or(("", s))
}

fn digest(s: &str) -> Result<Digest, ApiError> {
    s.parse().map_err(|e: oci::DigestError| {
        ApiError::new(ErrorCode::DigestInvalid).detail(e.to_string())
    })
}

fn not_found() -> ApiError {
    ApiError::new(ErrorCode::Unsupported)
        .status(StatusCode::NOT_FOUND)
        .detail("no such API endpoint")
}

/// Parses the path of a request into a route.
pub fn parse_route(path: &str) -> Result<Route, ApiError> {
    let rest = match path {
        "/v2" | "/v2/" => return Ok(Route::Base),
        _ => path.strip_prefix("/v2/").ok_or_else(not_found)?,
    };
    if rest == "_catalog" {
        return Ok(Route::Catalog);
    }
    // Peeled from the end without collecting segments: this runs on every request.
    let Some((head1, last)) = rest.rsplit_once('/') else {
        return Err(not_found());
    };
    let (head2, second) = pop(head1);
    if head1.contains('/') {
        let (head3, third) = pop(head2);
        match (third, second, last) {
            ("blobs", "uploads", "") => return Ok(Route::Uploads(name(head3)?)),
            ("blobs", "uploads", id) => {
                let valid =
                    id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
                if !valid {
                    return Err(ApiError::new(ErrorCode::BlobUploadUnknown));
                }
                return Ok(Route::Upload(name(head3)?, id.to_string()));
            }
            _ => {}
        }
    }
    match (second, last) {
        ("tags", "list") => return Ok(Route::Tags(name(head2)?)),
        ("blobs", "uploads") => return Ok(Route::Uploads(name(head2)?)),
        ("manifests", reference) => {
            let repo = name(head2)?;
            return match reference.parse() {
                Ok(reference) => Ok(Route::Manifest(repo, reference)),
                Err(oci::NameError::InvalidDigest(d)) => {
                    Err(ApiError::new(ErrorCode::DigestInvalid).detail(d.to_string()))
                }
                Err(_) => Ok(Route::InvalidTag(repo)),
            };
        }
        ("blobs", d) => return Ok(Route::Blob(name(head2)?, digest(d)?)),
        ("referrers", d) => return Ok(Route::Referrers(name(head2)?, digest(d)?)),
        _ => {}
    }
    Err(not_found())
}

/// What the server knows about the connection a request came on.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// Whether the connection is TLS (the token realm's scheme follows it).
    pub tls: bool,
    /// The subject of the client certificate, when the connection presented one that the
    /// configured client CA verified.
    pub client_cert_subject: Option<String>,
}

impl Peer {
    pub fn plain(addr: SocketAddr) -> Peer {
        Peer {
            addr,
            tls: false,
            client_cert_subject: None,
        }
    }
}

/// What the API learns about a request while answering it, for the access log and the
/// metrics (see [`observe`]): filled in as routing, authentication and the handler go.
#[derive(Debug)]
pub struct Note {
    pub request_id: RequestId,
    pub route: RouteKind,
    /// Copy the repository and account names below (the access log wants them; metrics
    /// only with `metrics_per_repository`). Off, nothing is allocated for them.
    pub details: bool,
    pub repository: Option<String>,
    pub account: Option<String>,
    /// The spec code of a failure.
    pub error: Option<ErrorCode>,
    pub auth_failure: Option<AuthFailure>,
}

impl Note {
    pub fn new(request_id: RequestId, details: bool) -> Note {
        Note {
            request_id,
            route: RouteKind::Unknown,
            details,
            repository: None,
            account: None,
            error: None,
            auth_failure: None,
        }
    }
}

impl Route {
    /// The route template metrics and the access log name.
    pub fn kind(&self) -> RouteKind {
        match self {
            Route::Base => RouteKind::Base,
            Route::Catalog => RouteKind::Catalog,
            Route::Tags(_) => RouteKind::Tags,
            Route::Manifest(..) | Route::InvalidTag(_) => RouteKind::Manifest,
            Route::Blob(..) => RouteKind::Blob,
            Route::Uploads(_) => RouteKind::Uploads,
            Route::Upload(..) => RouteKind::Upload,
            Route::Referrers(..) => RouteKind::Referrers,
        }
    }

    fn repository(&self) -> Option<&RepositoryName> {
        match self {
            Route::Base | Route::Catalog => None,
            Route::Tags(r)
            | Route::Manifest(r, _)
            | Route::InvalidTag(r)
            | Route::Blob(r, _)
            | Route::Uploads(r)
            | Route::Upload(r, _)
            | Route::Referrers(r, _) => Some(r),
        }
    }
}

/// The single entry point: route, dispatch, and stamp the API version header. What it learns
/// on the way goes into `note`.
pub async fn handle(
    registry: &Arc<Registry>,
    peer: &Peer,
    request: Request,
    note: &mut Note,
) -> Response {
    let path = request.uri().path();
    if path == "/auth/token" {
        note.route = RouteKind::Token;
        return token::handle(registry, peer, request).await;
    }
    if path.starts_with("/api/v1/") {
        note.route = RouteKind::Manage;
        return manage::handle(registry, peer, request, note.request_id.clone()).await;
    }
    let (method, uri) = (request.method().clone(), request.uri().clone());
    let result = dispatch(registry, peer, request, note).await;
    if let Err(e) = &result {
        note.error = Some(e.code);
    }
    let mut response = error::respond(result, &method, &uri);
    response
        .headers_mut()
        .insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    response
}

async fn dispatch(
    registry: &Registry,
    peer: &Peer,
    request: Request,
    note: &mut Note,
) -> ApiResult {
    let route = parse_route(request.uri().path())?;
    note.route = route.kind();
    if note.details {
        note.repository = route.repository().map(|r| r.as_str().to_owned());
    }
    let (parts, body) = request.into_parts();
    let limits = registry.auth().request_limits();
    if !limits.is_off() {
        limits.check_address(peer.addr.ip()).map_err(too_many)?;
    }
    let need = access::Need::of(&route, &parts.method);
    let principal = authenticate(registry, peer, &parts, &route, &need)
        .await
        .map_err(|(e, why)| {
            note.auth_failure = why;
            e
        })?;
    if note.details {
        note.account = principal.account().map(str::to_owned);
    }
    // Held until the handler returns, which is when an upload's body has been read.
    let _upload_slot = if limits.is_off() {
        None
    } else {
        if let Some(account) = principal.account() {
            limits.check_account(account).map_err(too_many)?;
        }
        let uploading = matches!(
            (&route, &parts.method),
            (Route::Uploads(_), &Method::POST) | (Route::Upload(..), &Method::PATCH | &Method::PUT)
        );
        if uploading {
            let key = match principal.account() {
                Some(a) => ClientKey::Account(a.to_string()),
                None => ClientKey::Address(peer.addr.ip()),
            };
            limits.start_upload(key).map_err(too_many)?
        } else {
            None
        }
    };
    let ctx = &request_context(&parts, peer, principal, note.request_id.clone());
    let method = parts.method.clone();
    let request = &parts;
    match (route, method) {
        (Route::Base, Method::GET | Method::HEAD) => {
            Ok(([(header::CONTENT_TYPE, "application/json")], "{}").into_response())
        }
        (Route::Catalog, Method::GET) => {
            let Some(visible) = registry
                .auth()
                .catalog_rights(&ctx.principal)
                .await
                .map_err(|e| {
                    let need = access::Need::Catalog;
                    access::refused(registry.auth().options(), peer, request, &need, e)
                })?
            else {
                return Err(ApiError::new(ErrorCode::Denied));
            };
            listings::catalog(registry, ctx, &visible, request).await
        }
        (Route::Tags(repo), Method::GET) => listings::tags(registry, ctx, &repo, request).await,
        (Route::Referrers(repo, d), Method::GET) => {
            listings::referrers(registry, ctx, &repo, &d, request).await
        }
        (Route::Manifest(repo, r), Method::GET) => {
            manifests::get(registry, ctx, &repo, &r, true).await
        }
        (Route::Manifest(repo, r), Method::HEAD) => {
            manifests::get(registry, ctx, &repo, &r, false).await
        }
        (Route::Manifest(repo, r), Method::PUT) => {
            manifests::put(registry, ctx, &repo, &r, request, body).await
        }
        (Route::Manifest(repo, r), Method::DELETE) => {
            manifests::delete(registry, ctx, &repo, &r).await
        }
        (Route::InvalidTag(_), Method::PUT) => {
            Err(ApiError::new(ErrorCode::TagInvalid)
                .detail("tag does not match the spec's grammar"))
        }
        (Route::InvalidTag(_), Method::GET | Method::HEAD | Method::DELETE) => {
            Err(ApiError::new(ErrorCode::ManifestUnknown)
                .detail("no tag or digest by that name: it is not valid tag grammar"))
        }
        (Route::Blob(repo, d), Method::GET) => {
            blobs::get(registry, ctx, &repo, &d, request, true).await
        }
        (Route::Blob(repo, d), Method::HEAD) => {
            blobs::get(registry, ctx, &repo, &d, request, false).await
        }
        (Route::Blob(repo, d), Method::DELETE) => blobs::delete(registry, ctx, &repo, &d).await,
        (Route::Uploads(repo), Method::POST) => {
            uploads::start(registry, ctx, &repo, request, body).await
        }
        (Route::Upload(repo, id), Method::GET) => uploads::status(registry, ctx, &repo, &id).await,
        (Route::Upload(repo, id), Method::PATCH) => {
            uploads::patch(registry, ctx, &repo, &id, request, body).await
        }
        (Route::Upload(repo, id), Method::PUT) => {
            uploads::put(registry, ctx, &repo, &id, request, body).await
        }
        (Route::Upload(repo, id), Method::DELETE) => {
            uploads::cancel(registry, ctx, &repo, &id).await
        }
        (_, method) => Err(ApiError::new(ErrorCode::Unsupported)
            .detail(format!("method {method} is not supported on this endpoint"))),
    }
}

/// Who is asking, checked against what the route needs. A bearer token that expired is
/// accepted for an upload already open: the upload session is the capability (the service
/// lets only the account that opened it continue it), so a long push outlives its token.
/// A refusal, with why for `berth_auth_failures_total` (`None` when no credentials were
/// judged: the backend failed).
type Refusal = (ApiError, Option<AuthFailure>);

async fn authenticate(
    registry: &Registry,
    peer: &Peer,
    parts: &Parts,
    route: &Route,
    need: &access::Need<'_>,
) -> Result<Arc<Principal>, Refusal> {
    let auth = registry.auth();
    let options = auth.options();
    let refused = |e: AuthError, credentials: &Credentials| {
        let why = match &e {
            AuthError::Unauthorized(_) if matches!(credentials, Credentials::None) => {
                Some(AuthFailure::Missing)
            }
            AuthError::Unauthorized(_) => Some(AuthFailure::BadCredentials),
            AuthError::Expired(_) => Some(AuthFailure::ExpiredToken),
            AuthError::Invalid(_) => Some(AuthFailure::InvalidToken),
            AuthError::Throttled(_) => Some(AuthFailure::Throttled),
            AuthError::Unavailable(_) | AuthError::Metadata(_) | AuthError::Internal(_) => None,
        };
        (access::refused(options, peer, parts, need, e), why)
    };
    if !auth.enabled() {
        // Whatever the client sends, an open registry lets it in (and does not parse it).
        return auth
            .authenticate(&Credentials::None, None, None)
            .await
            .map_err(|e| refused(e, &Credentials::None));
    }
    let credentials = access::credentials(&parts.headers).map_err(|why| {
        let e = access::refused(options, peer, parts, need, AuthError::Unauthorized(why));
        (e, Some(AuthFailure::BadCredentials))
    })?;
    let principal = match auth
        .authenticate(
            &credentials,
            peer.client_cert_subject.as_deref(),
            Some(peer.addr.ip()),
        )
        .await
    {
        Ok(p) => p,
        Err(AuthError::Expired(p)) if matches!(route, Route::Upload(..)) => Arc::new(*p),
        Err(e) => return Err(refused(e, &credentials)),
    };
    access::check(options, peer, parts, &principal, need).map_err(|e| {
        let why = if principal.is_anonymous() {
            AuthFailure::Missing
        } else {
            AuthFailure::Denied
        };
        (e, Some(why))
    })?;
    Ok(principal)
}

/// 429 with the time to wait, in whole seconds.
fn too_many(limited: Limited) -> ApiError {
    let secs = limited.0.as_secs() + u64::from(limited.0.subsec_nanos() > 0);
    ApiError::new(ErrorCode::TooManyRequests)
        .header(header::RETRY_AFTER, &secs.max(1).to_string())
        .detail("rate limit reached")
}

/// Who is asking and from where, as the service sees it.
fn request_context(
    parts: &Parts,
    peer: &Peer,
    principal: Arc<Principal>,
    request_id: RequestId,
) -> RequestContext {
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    RequestContext {
        request_id,
        principal,
        client_addr: Some(peer.addr.ip()),
        user_agent: header("user-agent"),
    }
}

/// The `Range` header value describing an upload of `size` bytes (inclusive end; `0-0` when
/// empty, as clients expect).
pub fn upload_range(size: u64) -> String {
    format!("0-{}", size.saturating_sub(1))
}

/// Query parameters, decoded.
fn query_pairs(request: &Parts) -> Vec<(String, String)> {
    form_urlencoded::parse(request.uri.query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

fn query_param(pairs: &[(String, String)], key: &str) -> Option<String> {
    pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

/// The request's `Content-Length`, if it sent a valid one.
fn content_length(headers: &axum::http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn body_stream(body: Body) -> BodyStream {
    Box::pin(body.into_data_stream().map_err(|e| e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(path: &str, expected: Result<&str, &str>) {
        let got = parse_route(path)
            .map(|r| format!("{r:?}"))
            .map_err(|e| e.code.describe().0.to_string());
        match expected {
            Ok(prefix) => assert!(
                got.as_ref().is_ok_and(|g| g.starts_with(prefix)),
                "{path}: {got:?}"
            ),
            Err(code) => assert_eq!(got.err().as_deref(), Some(code), "{path}"),
        }
    }

    #[test]
    fn routes_parse_from_the_end_of_the_path() {
        let d = format!("sha256:{}", "a".repeat(64));
        check("/v2/", Ok("Base"));
        check("/v2", Ok("Base"));
        check("/v2/_catalog", Ok("Catalog"));
        check("/v2/a/tags/list", Ok("Tags"));
        check("/v2/a/b/c/tags/list", Ok("Tags(RepositoryName(\"a/b/c\"))"));
        check("/v2/a/manifests/latest", Ok("Manifest"));
        check(&format!("/v2/a/manifests/{d}"), Ok("Manifest"));
        check(
            "/v2/tags/manifests/manifests/v1",
            Ok("Manifest(RepositoryName(\"tags/manifests\")"),
        );
        check(&format!("/v2/a/b/blobs/{d}"), Ok("Blob"));
        check("/v2/a/blobs/uploads/", Ok("Uploads"));
        check("/v2/a/blobs/uploads", Ok("Uploads"));
        check("/v2/a/blobs/uploads/0b8e-11", Ok("Upload"));
        check(&format!("/v2/a/referrers/{d}"), Ok("Referrers"));
        check("/v2/A/tags/list", Err("NAME_INVALID"));
        check("/v2//tags/list", Err("NAME_INVALID"));
        check("/v2/a/manifests/-bad", Ok("InvalidTag"));
        check("/v2/a/blobs/sha256:zz", Err("DIGEST_INVALID"));
        check("/v2/a/blobs/uploads/../../x", Err("UNSUPPORTED"));
        check("/v2/a/blobs/uploads/a.b", Err("BLOB_UPLOAD_UNKNOWN"));
        check("/v2/a", Err("UNSUPPORTED"));
        check("/other", Err("UNSUPPORTED"));
    }
}
