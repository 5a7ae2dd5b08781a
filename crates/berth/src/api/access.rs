//! Access control at the HTTP boundary: the `Authorization` header parsed into
//! [`Credentials`], what each route needs ([`Need`]), and the answers the Docker token spec
//! prescribes: 401 with a `WWW-Authenticate: Bearer realm=...,service=...,scope=...` challenge
//! when credentials are missing or bad, 403 DENIED when they are good but not enough (for a
//! token, with an `error="insufficient_scope"` challenge naming the scope it lacked). The
//! check runs before the route touches anything, so a refusal says nothing about whether the
//! repository exists.

use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use base64::Engine;

use super::Peer;
use super::Route;
use super::error::{ApiError, ErrorCode};
use crate::auth::rights::Action;
use crate::auth::{AuthError, AuthOptions, Credentials, Principal};

/// The longest `Authorization` header looked at; longer ones are refused unparsed.
const MAX_AUTHORIZATION_LEN: usize = 16 * 1024;

/// Parses the `Authorization` header. A header that is present but not understood is an
/// error (401), never silently anonymous.
pub fn credentials(headers: &HeaderMap) -> Result<Credentials, String> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(Credentials::None);
    };
    let value = value
        .to_str()
        .map_err(|_| "the Authorization header is not ASCII".to_string())?;
    parse_authorization(value)
}

pub fn parse_authorization(value: &str) -> Result<Credentials, String> {
    if value.len() > MAX_AUTHORIZATION_LEN {
        return Err("the Authorization header is too long".to_string());
    }
    let (scheme, rest) = value
        .trim()
        .split_once(' ')
        .ok_or_else(|| "the Authorization header has no credentials".to_string())?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .map_err(|_| "basic credentials are not base64".to_string())?;
        let decoded = String::from_utf8(decoded)
            .map_err(|_| "basic credentials are not UTF-8".to_string())?;
        let (user, password) = decoded
            .split_once(':')
            .ok_or_else(|| "basic credentials have no ':'".to_string())?;
        Ok(Credentials::Basic {
            user: user.to_string(),
            password: password.to_string(),
        })
    } else if scheme.eq_ignore_ascii_case("bearer") {
        if rest.is_empty() || rest.contains(char::is_whitespace) {
            return Err("malformed bearer token".to_string());
        }
        Ok(Credentials::Bearer(rest.to_string()))
    } else {
        Err(format!("unsupported authorization scheme {scheme:?}"))
    }
}

/// What a route needs of the caller.
#[derive(Debug, Clone, PartialEq)]
pub enum Need<'a> {
    /// `/v2/`: any authenticated caller (it is how clients discover the challenge).
    Login,
    /// `/v2/_catalog`: checked by the handler, which lists only what the caller may see.
    Catalog,
    Repository(&'a oci::RepositoryName, Action),
    /// An endpoint/method that does not exist: answered as such, whoever asks.
    Nothing,
}

impl<'a> Need<'a> {
    pub fn of(route: &'a Route, method: &axum::http::Method) -> Need<'a> {
        use axum::http::Method;
        let repo = |r: &'a oci::RepositoryName, a| Need::Repository(r, a);
        match (route, method) {
            (Route::Base, &Method::GET | &Method::HEAD) => Need::Login,
            (Route::Catalog, &Method::GET) => Need::Catalog,
            (Route::Tags(r) | Route::Referrers(r, _), &Method::GET) => repo(r, Action::Pull),
            (
                Route::Manifest(r, _) | Route::InvalidTag(r) | Route::Blob(r, _),
                &Method::GET | &Method::HEAD,
            ) => repo(r, Action::Pull),
            (Route::Manifest(r, _) | Route::InvalidTag(r), &Method::PUT) => repo(r, Action::Push),
            (Route::Manifest(r, _) | Route::InvalidTag(r) | Route::Blob(r, _), &Method::DELETE) => {
                repo(r, Action::Delete)
            }
            (Route::Uploads(r), &Method::POST) => repo(r, Action::Push),
            (
                Route::Upload(r, _),
                &Method::GET | &Method::PATCH | &Method::PUT | &Method::DELETE,
            ) => repo(r, Action::Push),
            _ => Need::Nothing,
        }
    }

    /// The scope a client should ask a token for.
    fn scope(&self) -> Option<String> {
        match self {
            Need::Repository(r, Action::Pull) => Some(format!("repository:{r}:pull")),
            Need::Repository(r, Action::Push) => Some(format!("repository:{r}:pull,push")),
            Need::Repository(r, Action::Delete) => Some(format!("repository:{r}:delete")),
            Need::Catalog => Some("registry:catalog:*".to_string()),
            Need::Login | Need::Nothing => None,
        }
    }
}

/// Checks `principal` against `need`: Ok, or the 401/403 to answer.
pub fn check(
    options: &AuthOptions,
    peer: &Peer,
    parts: &Parts,
    principal: &Principal,
    need: &Need,
) -> Result<(), ApiError> {
    if !options.enabled {
        return Ok(());
    }
    let allowed = match need {
        Need::Nothing => true,
        Need::Login | Need::Catalog => !principal.is_anonymous(),
        Need::Repository(repo, action) => principal.may(repo.as_str(), *action),
    };
    if allowed {
        Ok(())
    } else if principal.is_anonymous() {
        Err(challenge(options, peer, parts, need, None))
    } else if let (Ok(Credentials::Bearer(_)), Some(scope)) =
        (credentials(&parts.headers), need.scope())
    {
        // A token short of the scope: still 403, but with RFC 6750's `insufficient_scope`
        // challenge naming the scope, so a client that asks for a new token on 403 (oras-py,
        // which first gets a pull token for its blob HEAD) knows what to ask for.
        let value = format!(
            "Bearer realm=\"{}\",service=\"{}\",scope=\"{scope}\",error=\"insufficient_scope\"",
            realm(options, peer, parts),
            options.service
        );
        Err(ApiError::new(ErrorCode::Denied).header(header::WWW_AUTHENTICATE, &value))
    } else {
        Err(ApiError::new(ErrorCode::Denied))
    }
}

/// The answer to credentials that were refused.
pub fn refused(
    options: &AuthOptions,
    peer: &Peer,
    parts: &Parts,
    need: &Need,
    error: AuthError,
) -> ApiError {
    match error {
        AuthError::Unauthorized(why) => challenge(options, peer, parts, need, Some(why)),
        AuthError::Expired(_) => challenge(
            options,
            peer,
            parts,
            need,
            Some("token expired".to_string()),
        ),
        AuthError::Throttled(wait) => ApiError::new(ErrorCode::TooManyRequests)
            .header(
                header::RETRY_AFTER,
                &(wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
                    .max(1)
                    .to_string(),
            )
            .detail("too many failed logins"),
        AuthError::Invalid(why) => challenge(options, peer, parts, need, Some(why)),
        AuthError::Unavailable(why) => {
            tracing::warn!(error = %why, "cannot check credentials");
            ApiError::new(ErrorCode::Unavailable)
        }
        AuthError::Metadata(e) => crate::service::ServiceError::from(e).into(),
        AuthError::Internal(e) => ApiError::new(ErrorCode::Internal).detail(e),
    }
}

/// The token endpoint's URL as clients reach it.
pub fn realm(options: &AuthOptions, peer: &Peer, parts: &Parts) -> String {
    if let Some(base) = &options.public_url {
        return format!("{base}/auth/token");
    }
    let scheme = if peer.tls { "https" } else { "http" };
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
        .filter(|h| h.bytes().all(|b| b.is_ascii_graphic() && b != b'"'))
        .map(str::to_owned)
        .unwrap_or_else(|| peer.addr.to_string());
    format!("{scheme}://{host}/auth/token")
}

fn challenge(
    options: &AuthOptions,
    peer: &Peer,
    parts: &Parts,
    need: &Need,
    error: Option<String>,
) -> ApiError {
    let mut value = format!(
        "Bearer realm=\"{}\",service=\"{}\"",
        realm(options, peer, parts),
        options.service
    );
    if let Some(scope) = need.scope() {
        value.push_str(&format!(",scope=\"{scope}\""));
    }
    if error.is_some()
        && matches!(
            super::access::credentials(&parts.headers),
            Ok(Credentials::Bearer(_))
        )
    {
        value.push_str(",error=\"invalid_token\"");
    }
    let mut e = ApiError::new(ErrorCode::Unauthorized).header(header::WWW_AUTHENTICATE, &value);
    if let Some(why) = error {
        e = e.detail(why);
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(s: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(s)
        )
    }

    #[test]
    fn authorization_headers() {
        let cases: Vec<(String, Result<Credentials, ()>)> = vec![
            (
                basic("alice:pw:with:colons"),
                Ok(Credentials::Basic {
                    user: "alice".into(),
                    password: "pw:with:colons".into(),
                }),
            ),
            (
                basic("alice:"),
                Ok(Credentials::Basic {
                    user: "alice".into(),
                    password: String::new(),
                }),
            ),
            (
                "bearer abc.def.ghi".into(),
                Ok(Credentials::Bearer("abc.def.ghi".into())),
            ),
            ("Bearer  abc ".into(), Ok(Credentials::Bearer("abc".into()))),
            ("Basic !!!".into(), Err(())),
            (basic("no-colon"), Err(())),
            ("Bearer".into(), Err(())),
            ("Bearer a b".into(), Err(())),
            ("Digest x".into(), Err(())),
            ("".into(), Err(())),
            (
                format!("Bearer {}", "a".repeat(MAX_AUTHORIZATION_LEN)),
                Err(()),
            ),
        ];
        for (header, want) in cases {
            assert_eq!(
                parse_authorization(&header).map_err(|_| ()),
                want,
                "{header}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn the_header_parser_never_panics(s in "\\PC{0,200}") {
            let _ = parse_authorization(&s);
        }

        #[test]
        fn base64_garbage_never_panics(b in proptest::collection::vec(proptest::num::u8::ANY, 0..100)) {
            let _ = parse_authorization(&format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(b)
            ));
        }
    }
}
