//! The one table of errors the API returns: spec code, HTTP status, message. Every failure is
//! turned into a response here, with the spec's JSON body.

use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::auth::manage::ManageError;
use crate::service::ServiceError;

/// Error codes of the distribution spec, plus Berth's own: two for its failures, three for
/// the management API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    /// Docker's code for a tag outside the grammar (the OCI table has none).
    TagInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
    /// Management API (`/api/v1`): no such account, namespace, member, robot or token.
    NotFound,
    /// Management API: it exists already, or conflicts with what is there.
    Conflict,
    /// Management API: a body or parameter that is not valid.
    Invalid,
    /// A backend (storage, metadata) failed or is unreachable; the client may retry.
    Unavailable,
    /// A bug: logged, and answered with an opaque message.
    Internal,
}

impl ErrorCode {
    /// (code, default status, message)
    pub fn describe(self) -> (&'static str, StatusCode, &'static str) {
        use ErrorCode::*;
        match self {
            BlobUnknown => (
                "BLOB_UNKNOWN",
                StatusCode::NOT_FOUND,
                "blob unknown to registry",
            ),
            BlobUploadInvalid => (
                "BLOB_UPLOAD_INVALID",
                StatusCode::BAD_REQUEST,
                "blob upload invalid",
            ),
            BlobUploadUnknown => (
                "BLOB_UPLOAD_UNKNOWN",
                StatusCode::NOT_FOUND,
                "blob upload unknown to registry",
            ),
            DigestInvalid => (
                "DIGEST_INVALID",
                StatusCode::BAD_REQUEST,
                "provided digest did not match uploaded content",
            ),
            ManifestBlobUnknown => (
                "MANIFEST_BLOB_UNKNOWN",
                StatusCode::BAD_REQUEST,
                "manifest references a manifest or blob unknown to registry",
            ),
            ManifestInvalid => (
                "MANIFEST_INVALID",
                StatusCode::BAD_REQUEST,
                "manifest invalid",
            ),
            ManifestUnknown => (
                "MANIFEST_UNKNOWN",
                StatusCode::NOT_FOUND,
                "manifest unknown to registry",
            ),
            NameInvalid => (
                "NAME_INVALID",
                StatusCode::BAD_REQUEST,
                "invalid repository name",
            ),
            NameUnknown => (
                "NAME_UNKNOWN",
                StatusCode::NOT_FOUND,
                "repository name not known to registry",
            ),
            SizeInvalid => (
                "SIZE_INVALID",
                StatusCode::BAD_REQUEST,
                "provided length did not match content length",
            ),
            TagInvalid => (
                "TAG_INVALID",
                StatusCode::BAD_REQUEST,
                "manifest tag did not match URI",
            ),
            Unauthorized => (
                "UNAUTHORIZED",
                StatusCode::UNAUTHORIZED,
                "authentication required",
            ),
            Denied => (
                "DENIED",
                StatusCode::FORBIDDEN,
                "requested access to the resource is denied",
            ),
            Unsupported => (
                "UNSUPPORTED",
                StatusCode::METHOD_NOT_ALLOWED,
                "the operation is unsupported",
            ),
            TooManyRequests => (
                "TOOMANYREQUESTS",
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests",
            ),
            NotFound => ("NOT_FOUND", StatusCode::NOT_FOUND, "no such resource"),
            Conflict => (
                "CONFLICT",
                StatusCode::CONFLICT,
                "the resource exists or conflicts with the current state",
            ),
            Invalid => ("INVALID", StatusCode::BAD_REQUEST, "the request is invalid"),
            Unavailable => (
                "UNAVAILABLE",
                StatusCode::SERVICE_UNAVAILABLE,
                "a storage backend is unavailable; retry later",
            ),
            Internal => (
                "UNKNOWN",
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error",
            ),
        }
    }
}

#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub status: StatusCode,
    pub detail: Option<String>,
    /// A second error reported in the same body, after the first.
    pub also: Option<ErrorCode>,
    /// The message in place of the code's usual one: for refusals whose reason the user must
    /// see, since clients (skopeo, podman, docker) print the message and drop the detail.
    pub message: Option<String>,
    /// Extra headers, e.g. `Range` on a 416. Few and rare, so a Vec keeps the error small.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl ApiError {
    pub fn new(code: ErrorCode) -> ApiError {
        ApiError {
            code,
            status: code.describe().1,
            detail: None,
            also: None,
            message: None,
            headers: Vec::new(),
        }
    }

    pub fn detail(mut self, detail: impl Into<String>) -> ApiError {
        self.detail = Some(detail.into());
        self
    }

    pub fn status(mut self, status: StatusCode) -> ApiError {
        self.status = status;
        self
    }

    pub fn header(mut self, name: HeaderName, value: &str) -> ApiError {
        if let Ok(v) = HeaderValue::from_str(value) {
            self.headers.push((name, v));
        }
        self
    }
}

impl From<ErrorCode> for ApiError {
    fn from(code: ErrorCode) -> Self {
        ApiError::new(code)
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        use ErrorCode::*;
        let detail = e.to_string();
        let code = match &e {
            // 404 rather than 5xx: a pushing client's HEAD then sends the blob again, which
            // repairs it.
            ServiceError::BlobUnknown | ServiceError::BlobQuarantined(_) => BlobUnknown,
            ServiceError::ManifestUnknown => ManifestUnknown,
            ServiceError::NameUnknown => NameUnknown,
            ServiceError::UploadUnknown => BlobUploadUnknown,
            ServiceError::DigestInvalid(_) => DigestInvalid,
            ServiceError::RangeMismatch { size, .. } => {
                return ApiError::new(BlobUploadInvalid)
                    .status(StatusCode::RANGE_NOT_SATISFIABLE)
                    .header(header::RANGE, &super::upload_range(*size))
                    .detail(detail);
            }
            ServiceError::Body(_) => BlobUploadInvalid,
            ServiceError::ChunkOverrun { size } => {
                return ApiError::new(BlobUploadInvalid)
                    .status(StatusCode::RANGE_NOT_SATISFIABLE)
                    .header(header::RANGE, &super::upload_range(*size))
                    .detail(detail);
            }
            ServiceError::BlobTooLarge { .. } => {
                return ApiError::new(SizeInvalid)
                    .status(StatusCode::PAYLOAD_TOO_LARGE)
                    .detail(detail);
            }
            // 409: the request is valid but conflicts with what the repository holds now;
            // the detail names what to delete first.
            ServiceError::BlobReferenced { .. } | ServiceError::ManifestReferenced { .. } => {
                return ApiError::new(Denied)
                    .status(StatusCode::CONFLICT)
                    .detail(detail);
            }
            ServiceError::TagImmutable(_) | ServiceError::QuotaExceeded(_) => {
                let mut error = ApiError::new(Denied).detail(detail.clone());
                error.message = Some(detail);
                return error;
            }
            ServiceError::ManifestInvalid(_) => ManifestInvalid,
            ServiceError::InvalidRequest(_) => Invalid,
            ServiceError::ManifestTooLarge { .. } => {
                return ApiError::new(SizeInvalid)
                    .status(StatusCode::PAYLOAD_TOO_LARGE)
                    .detail(detail);
            }
            ServiceError::ManifestBlobUnknown(_) => ManifestBlobUnknown,
            ServiceError::ManifestChildUnknown(_) => {
                // The spec asks for MANIFEST_BLOB_UNKNOWN; MANIFEST_UNKNOWN follows it to say
                // precisely that the missing reference is a manifest. 400: the index is at fault.
                let mut error = ApiError::new(ManifestBlobUnknown).detail(detail);
                error.also = Some(ManifestUnknown);
                return error;
            }
            ServiceError::Busy(_) => {
                return ApiError::new(TooManyRequests)
                    .header(header::RETRY_AFTER, "1")
                    .detail(detail);
            }
            ServiceError::Unavailable(_) => Unavailable,
            ServiceError::Internal(_) => Internal,
        };
        ApiError::new(code).detail(detail)
    }
}

impl From<ManageError> for ApiError {
    fn from(e: ManageError) -> Self {
        match e {
            ManageError::NotFound(why) => ApiError::new(ErrorCode::NotFound).detail(why),
            ManageError::Conflict(why) => ApiError::new(ErrorCode::Conflict).detail(why),
            ManageError::Invalid(why) => ApiError::new(ErrorCode::Invalid).detail(why),
            ManageError::Metadata(e) => ServiceError::from(e).into(),
        }
    }
}

impl ApiError {
    /// Logs a server-side failure once, at the boundary, with its cause and the request's
    /// method and path (which name the route, repository and digest). Client errors are not
    /// logged here: the access log has their status and code.
    pub fn log(&self, method: &axum::http::Method, uri: &axum::http::Uri) {
        let code = self.code.describe().0;
        match self.code {
            ErrorCode::Internal => tracing::error!(
                http.method = %method,
                http.path = uri.path(),
                error.code = code,
                error.cause = ?self.detail,
                "request failed: internal error (a bug)"
            ),
            _ if self.status.is_server_error() => tracing::warn!(
                http.method = %method,
                http.path = uri.path(),
                error.code = code,
                error.cause = ?self.detail,
                "request failed: backend unavailable"
            ),
            _ => {}
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (code, _, usual) = self.code.describe();
        let message = self.message.as_deref().unwrap_or(usual);
        let detail = match (&self.code, self.detail) {
            // Backend and internal details name hosts, buckets, paths or queries: they are
            // logged above, and the client gets only the code and message.
            (ErrorCode::Internal | ErrorCode::Unavailable, _) | (_, None) => {
                serde_json::Value::Null
            }
            (_, Some(d)) => serde_json::Value::String(d),
        };
        let mut errors =
            vec![json!({ "code": code, "message": message, "detail": detail.clone() })];
        if let Some(also) = self.also {
            let (code, _, message) = also.describe();
            errors.push(json!({ "code": code, "message": message, "detail": detail }));
        }
        let body = json!({ "errors": errors });
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response();
        for (name, value) in self.headers {
            response.headers_mut().insert(name, value);
        }
        response
    }
}

pub type ApiResult = Result<Response, ApiError>;

/// The response for a handler's result: a failure is logged once (see [`ApiError::log`]) and
/// turned into the spec's error body.
pub fn respond(result: ApiResult, method: &axum::http::Method, uri: &axum::http::Uri) -> Response {
    result.unwrap_or_else(|e| {
        e.log(method, uri);
        e.into_response()
    })
}
