//! The token endpoint (`/auth/token`), as distribution's token spec describes it:
//!
//! - `GET` with basic credentials (or none, for an anonymous token) and `service`, `scope`
//!   (repeatable, each space-separated), `offline_token`, `client_id` (`token.md`);
//! - `POST` with a form: `grant_type=password` (`username`, `password`) or
//!   `grant_type=refresh_token` (`refresh_token`), `service`, `client_id`, `scope`,
//!   `access_type=offline` for a refresh token (`oauth.md`);
//! - `POST` with an OAuth2 token exchange (RFC 8693): a CI job's OIDC token as
//!   `subject_token` (`subject_token_type` `...:token-type:jwt` or `...:id_token`), optionally
//!   `username` naming the robot, `service`, `client_id`, `scope`. The same token also works as
//!   the password of the other two ways (see `auth::federation`).
//!
//! The token grants what the caller may do of what it asked for, possibly nothing; the
//! registry then answers 401/403 on what it lacks. Errors carry both the OAuth2 fields
//! (`error`, `error_description`) and the registry's `errors` array, so either kind of client
//! can show them.

use axum::extract::Request;
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::Peer;
use super::access::credentials;
use crate::auth::federation;
use crate::auth::scope::{self, ResourceScope};
use crate::auth::{AuthError, Credentials, Principal};
use crate::metadata::events::NewEvent;
use crate::service::Registry;

/// Largest form body accepted by `POST`.
const MAX_FORM_BYTES: usize = 64 * 1024;

struct TokenError {
    status: StatusCode,
    /// Seconds to wait, for a 429.
    retry_after: u64,
    /// The OAuth2 error code.
    oauth: &'static str,
    description: String,
}

impl TokenError {
    fn new(status: StatusCode, oauth: &'static str, description: impl Into<String>) -> Self {
        TokenError {
            status,
            retry_after: 1,
            oauth,
            description: description.into(),
        }
    }

    fn from_auth(e: AuthError) -> TokenError {
        match e {
            AuthError::Unauthorized(why) | AuthError::Invalid(why) => {
                TokenError::new(StatusCode::UNAUTHORIZED, "invalid_grant", why)
            }
            AuthError::Expired(_) => {
                TokenError::new(StatusCode::UNAUTHORIZED, "invalid_grant", "expired")
            }
            AuthError::Throttled(wait) => TokenError {
                status: StatusCode::TOO_MANY_REQUESTS,
                retry_after: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
                oauth: "slow_down",
                description: format!(
                    "too many failed logins; retry in {} s",
                    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
                ),
            },
            AuthError::Unavailable(e) => {
                tracing::warn!(error = %e, "token endpoint: cannot check credentials");
                TokenError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "temporarily_unavailable",
                    e,
                )
            }
            AuthError::Metadata(e) => {
                tracing::warn!(error = %e, "token endpoint: metadata unavailable");
                TokenError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "temporarily_unavailable",
                    "a backend is unavailable; retry later",
                )
            }
            AuthError::Internal(e) => {
                tracing::error!(error = %e, "token endpoint: internal error (a bug)");
                TokenError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "internal error",
                )
            }
        }
    }
}

impl IntoResponse for TokenError {
    fn into_response(self) -> Response {
        let code = match self.status {
            StatusCode::UNAUTHORIZED => "UNAUTHORIZED",
            StatusCode::TOO_MANY_REQUESTS => "TOOMANYREQUESTS",
            StatusCode::SERVICE_UNAVAILABLE => "UNAVAILABLE",
            StatusCode::INTERNAL_SERVER_ERROR => "UNKNOWN",
            _ => "DENIED",
        };
        let body = json!({
            "error": self.oauth,
            "error_description": self.description,
            "errors": [{ "code": code, "message": self.description }],
        });
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, self.retry_after.max(1).into());
        }
        response
    }
}

pub async fn handle(registry: &Registry, peer: &Peer, request: Request) -> Response {
    let result = match *request.method() {
        Method::GET => get(registry, peer, request).await,
        Method::POST => post(registry, peer, request).await,
        _ => Err(TokenError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "use GET or POST",
        )),
    };
    let mut response = result.unwrap_or_else(IntoResponse::into_response);
    // Tokens must not be cached by anything between the client and us.
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    response
}

fn pairs(query: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(query).into_owned().collect()
}

fn param<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn scopes<'a>(values: impl Iterator<Item = &'a str>) -> Result<Vec<ResourceScope>, TokenError> {
    let mut out = Vec::new();
    for v in values {
        out.extend(scope::parse(v).map_err(|e| {
            TokenError::new(StatusCode::BAD_REQUEST, "invalid_scope", e.to_string())
        })?);
    }
    Ok(out)
}

fn check_service(registry: &Registry, service: Option<&str>) -> Result<(), TokenError> {
    let ours = &registry.auth().options().service;
    match service {
        Some(s) if s != ours => Err(TokenError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("unknown service {s:?}; this registry is {ours:?}"),
        )),
        _ => Ok(()),
    }
}

async fn get(registry: &Registry, peer: &Peer, request: Request) -> Result<Response, TokenError> {
    let auth = registry.auth();
    let pairs = pairs(request.uri().query().unwrap_or("").as_bytes());
    check_service(registry, param(&pairs, "service"))?;
    let scopes = scopes(
        pairs
            .iter()
            .filter(|(k, _)| k == "scope")
            .map(|(_, v)| v.as_str()),
    )?;
    let credentials = credentials(request.headers())
        .map_err(|why| TokenError::new(StatusCode::UNAUTHORIZED, "invalid_request", why))?;
    if matches!(credentials, Credentials::Bearer(_)) {
        return Err(TokenError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request",
            "the token endpoint takes basic credentials, or none",
        ));
    }
    let principal = auth
        .authenticate(
            &credentials,
            peer.client_cert_subject.as_deref(),
            Some(peer.addr.ip()),
        )
        .await
        .map_err(TokenError::from_auth)?;
    let offline = param(&pairs, "offline_token") == Some("true");
    let client_id = param(&pairs, "client_id").unwrap_or("docker");
    let refresh = if offline {
        Refresh::Issue(client_id)
    } else {
        Refresh::No
    };
    respond(registry, peer, &principal, &scopes, refresh, Answer::Docker).await
}

async fn post(registry: &Registry, peer: &Peer, request: Request) -> Result<Response, TokenError> {
    let auth = registry.auth();
    let body = axum::body::to_bytes(request.into_body(), MAX_FORM_BYTES)
        .await
        .map_err(|_| {
            TokenError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("the form must be at most {MAX_FORM_BYTES} bytes"),
            )
        })?;
    let form = pairs(&body);
    let field = |k: &str| param(&form, k);
    check_service(registry, field("service"))?;
    let client_id = field("client_id").ok_or_else(|| {
        TokenError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "client_id is required",
        )
    })?;
    let scopes = scopes(field("scope").into_iter())?;
    let offline = field("access_type") == Some("offline");
    let missing = |what: &str| {
        TokenError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("{what} is required"),
        )
    };
    match field("grant_type") {
        Some("password") => {
            let user = field("username").ok_or_else(|| missing("username"))?;
            let password = field("password").ok_or_else(|| missing("password"))?;
            let credentials = Credentials::Basic {
                user: user.to_string(),
                password: password.to_string(),
            };
            let principal = auth
                .authenticate(&credentials, None, Some(peer.addr.ip()))
                .await
                .map_err(TokenError::from_auth)?;
            let refresh = if offline {
                Refresh::Issue(client_id)
            } else {
                Refresh::No
            };
            respond(registry, peer, &principal, &scopes, refresh, Answer::OAuth2).await
        }
        Some("refresh_token") => {
            let refresh = field("refresh_token").ok_or_else(|| missing("refresh_token"))?;
            let service = field("service").unwrap_or(&auth.options().service);
            let principal = auth
                .redeem_refresh_token(refresh, service)
                .await
                .map_err(TokenError::from_auth)?;
            respond(
                registry,
                peer,
                &principal,
                &scopes,
                Refresh::Reuse(refresh),
                Answer::OAuth2,
            )
            .await
        }
        Some(federation::TOKEN_EXCHANGE_GRANT) => {
            let token = field("subject_token").ok_or_else(|| missing("subject_token"))?;
            let kind = field("subject_token_type").ok_or_else(|| missing("subject_token_type"))?;
            if !federation::SUBJECT_TOKEN_TYPES.contains(&kind) {
                return Err(TokenError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    format!(
                        "subject_token_type must be one of {}",
                        federation::SUBJECT_TOKEN_TYPES.join(", ")
                    ),
                ));
            }
            let principal = auth
                .federate(
                    field("username").unwrap_or_default(),
                    token,
                    Some(peer.addr.ip()),
                )
                .await
                .map_err(TokenError::from_auth)?;
            respond(
                registry,
                peer,
                &principal,
                &scopes,
                Refresh::No,
                Answer::TokenExchange,
            )
            .await
        }
        Some(other) => Err(TokenError::new(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            format!("grant_type {other:?} is not supported"),
        )),
        None => Err(missing("grant_type")),
    }
}

/// Whether the answer carries a refresh token.
enum Refresh<'a> {
    No,
    /// A new one, for this OAuth2 client id (`offline_token=true`, `access_type=offline`).
    Issue(&'a str),
    /// The one the client redeemed, returned as it is.
    Reuse(&'a str),
}

/// The shape of a successful answer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// `token` and `access_token` (`token.md`).
    Docker,
    /// `access_token`, `token_type`, `scope` (`oauth.md`).
    OAuth2,
    /// OAuth2, plus RFC 8693's `issued_token_type`.
    TokenExchange,
}

async fn respond(
    registry: &Registry,
    peer: &Peer,
    principal: &Principal,
    scopes: &[ResourceScope],
    refresh: Refresh<'_>,
    answer: Answer,
) -> Result<Response, TokenError> {
    let auth = registry.auth();
    let issued = auth
        .issue(principal, scopes)
        .map_err(TokenError::from_auth)?;
    if !principal.is_anonymous() {
        let granted: Vec<String> = issued
            .access
            .iter()
            .map(|a| format!("{}:{}:{}", a.resource_type, a.name, a.actions.join(",")))
            .collect();
        // Queued, not awaited: issuing a token changes nothing in the store (what is done with
        // it is recorded with the change), so its answer does not wait on a commit; a crash
        // may lose the last few milliseconds of these records.
        auth.record_later(NewEvent {
            kind: "token.issued".to_string(),
            actor: principal.actor.to_string(),
            client_addr: Some(peer.addr.ip().to_string()),
            result: "ok".to_string(),
            detail: Some(serde_json::json!({ "access": granted }).to_string()),
            ..NewEvent::default()
        });
    }
    let refresh = match refresh {
        Refresh::Reuse(r) => Some(r.to_string()),
        // Not for a CI job's identity: a refresh token would outlive it.
        Refresh::Issue(client_id)
            if !principal.is_anonymous() && principal.method.gets_refresh_tokens() =>
        {
            Some(
                auth.issue_refresh_token(principal, client_id)
                    .await
                    .map_err(TokenError::from_auth)?,
            )
        }
        Refresh::Issue(_) | Refresh::No => None,
    };
    let issued_at = crate::time::rfc3339(issued.issued_at);
    let mut body = if answer != Answer::Docker {
        let granted: Vec<String> = issued
            .access
            .iter()
            .map(|a| format!("{}:{}:{}", a.resource_type, a.name, a.actions.join(",")))
            .collect();
        json!({
            "access_token": issued.token,
            "token_type": "Bearer",
            "scope": granted.join(" "),
            "expires_in": issued.expires_in,
            "issued_at": issued_at,
        })
    } else {
        json!({
            "token": issued.token,
            "access_token": issued.token,
            "expires_in": issued.expires_in,
            "issued_at": issued_at,
        })
    };
    if let Some(r) = refresh {
        body["refresh_token"] = json!(r);
    }
    if answer == Answer::TokenExchange {
        body["issued_token_type"] = json!(federation::ISSUED_TOKEN_TYPE);
    }
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response())
}
