//! The management API under `/api/v1`: users, namespaces, members, robots, secrets, signing
//! keys, webhooks, tag immutability rules and quotas as JSON resources, doing over HTTP what `berth user|namespace|robot|token|key` does on
//! the command line. HTTP only: each handler asks [`policy`] whether the caller may, then calls
//! the same [`crate::auth::manage`] function the command line calls.
//!
//! Routes are data: [`ROUTES`] is the table of (method, path template, endpoint) that
//! [`handle`] matches requests against and that a test holds `openapi.json` (served at
//! `/api/v1/openapi.json`) to, both ways.
//!
//! Callers authenticate as on `/v2` (basic credentials, bearer tokens, client certificates);
//! without credentials the answer is 401 with the Bearer challenge, with credentials that may
//! not, 403 `DENIED`. With access control off every caller is an administrator here, as every
//! caller may do everything on `/v2`. Every answer is `Cache-Control: no-store` (some carry a
//! secret, shown once); secrets travel only in bodies, never in paths or queries, so the
//! access log never holds one.

mod accounts;
mod audit;
mod namespace_rules;
mod namespaces;
mod retention;
mod trash;
mod webhooks;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use percent_encoding::percent_decode_str;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::access::{self, Need};
use super::error::{ApiError, ApiResult, ErrorCode};
use super::{Peer, request_context, too_many};
use crate::auth::manage;
use crate::auth::policy::{self, Authority, Op};
use crate::auth::{AuthError, Credentials, Principal};
use crate::metadata::Metadata;
use crate::service::RequestId;
use crate::service::{Registry, RequestContext};

/// The OpenAPI 3.1 description of every route in [`ROUTES`].
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Where the management API lives.
pub const PREFIX: &str = "/api/v1";

/// Largest JSON body accepted.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// What a route does; [`dispatch`] calls one handler per endpoint (the match is exhaustive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    OpenApi,
    Me,
    ListUsers,
    CreateUser,
    GetUser,
    DeleteUser,
    SetPassword,
    ListNamespaces,
    CreateNamespace,
    GetNamespace,
    UpdateNamespace,
    DeleteNamespace,
    ListMembers,
    SetMember,
    RemoveMember,
    ListRobots,
    CreateRobot,
    DeleteRobot,
    ListTokens,
    CreateToken,
    RevokeToken,
    RotateKeys,
    Audit,
    ListWebhooks,
    CreateWebhook,
    GetWebhook,
    DeleteWebhook,
    ListParked,
    ReplayParked,
    ListTrash,
    RestoreTrash,
    RunGc,
    Quarantine,
    ListRetention,
    AddRetention,
    RemoveRetention,
    RetentionPlan,
    ListImmutability,
    AddImmutability,
    RemoveImmutability,
    GetQuota,
    SetQuota,
    RemoveQuota,
}

/// One route: a method and a path template whose `{name}` segments are parameters.
#[derive(Debug)]
pub struct RouteSpec {
    pub method: Method,
    pub path: &'static str,
    pub endpoint: Endpoint,
}

const fn route(method: Method, path: &'static str, endpoint: Endpoint) -> RouteSpec {
    RouteSpec {
        method,
        path,
        endpoint,
    }
}

/// Every route of the management API.
pub static ROUTES: &[RouteSpec] = &[
    route(Method::GET, "/api/v1/openapi.json", Endpoint::OpenApi),
    route(Method::GET, "/api/v1/me", Endpoint::Me),
    route(Method::GET, "/api/v1/users", Endpoint::ListUsers),
    route(Method::POST, "/api/v1/users", Endpoint::CreateUser),
    route(Method::GET, "/api/v1/users/{name}", Endpoint::GetUser),
    route(Method::DELETE, "/api/v1/users/{name}", Endpoint::DeleteUser),
    route(
        Method::PUT,
        "/api/v1/users/{name}/password",
        Endpoint::SetPassword,
    ),
    route(Method::GET, "/api/v1/namespaces", Endpoint::ListNamespaces),
    route(
        Method::POST,
        "/api/v1/namespaces",
        Endpoint::CreateNamespace,
    ),
    route(
        Method::GET,
        "/api/v1/namespaces/{namespace}",
        Endpoint::GetNamespace,
    ),
    route(
        Method::PATCH,
        "/api/v1/namespaces/{namespace}",
        Endpoint::UpdateNamespace,
    ),
    route(
        Method::DELETE,
        "/api/v1/namespaces/{namespace}",
        Endpoint::DeleteNamespace,
    ),
    route(
        Method::GET,
        "/api/v1/namespaces/{namespace}/members",
        Endpoint::ListMembers,
    ),
    route(
        Method::PUT,
        "/api/v1/namespaces/{namespace}/members/{account}",
        Endpoint::SetMember,
    ),
    route(
        Method::DELETE,
        "/api/v1/namespaces/{namespace}/members/{account}",
        Endpoint::RemoveMember,
    ),
    route(
        Method::GET,
        "/api/v1/namespaces/{namespace}/robots",
        Endpoint::ListRobots,
    ),
    route(
        Method::POST,
        "/api/v1/namespaces/{namespace}/robots",
        Endpoint::CreateRobot,
    ),
    route(
        Method::DELETE,
        "/api/v1/namespaces/{namespace}/robots/{robot}",
        Endpoint::DeleteRobot,
    ),
    route(
        Method::GET,
        "/api/v1/accounts/{account}/tokens",
        Endpoint::ListTokens,
    ),
    route(
        Method::POST,
        "/api/v1/accounts/{account}/tokens",
        Endpoint::CreateToken,
    ),
    route(Method::DELETE, "/api/v1/tokens/{id}", Endpoint::RevokeToken),
    route(Method::POST, "/api/v1/keys/rotate", Endpoint::RotateKeys),
    route(Method::GET, "/api/v1/audit", Endpoint::Audit),
    route(Method::GET, "/api/v1/webhooks", Endpoint::ListWebhooks),
    route(Method::POST, "/api/v1/webhooks", Endpoint::CreateWebhook),
    route(Method::GET, "/api/v1/webhooks/{id}", Endpoint::GetWebhook),
    route(
        Method::DELETE,
        "/api/v1/webhooks/{id}",
        Endpoint::DeleteWebhook,
    ),
    route(
        Method::GET,
        "/api/v1/webhooks/{id}/parked",
        Endpoint::ListParked,
    ),
    route(
        Method::POST,
        "/api/v1/webhooks/{id}/replay",
        Endpoint::ReplayParked,
    ),
    route(Method::GET, "/api/v1/trash", Endpoint::ListTrash),
    route(
        Method::POST,
        "/api/v1/trash/{id}/restore",
        Endpoint::RestoreTrash,
    ),
    route(Method::POST, "/api/v1/gc", Endpoint::RunGc),
    route(Method::GET, "/api/v1/quarantine", Endpoint::Quarantine),
    route(Method::GET, "/api/v1/retention", Endpoint::ListRetention),
    route(Method::POST, "/api/v1/retention", Endpoint::AddRetention),
    route(
        Method::DELETE,
        "/api/v1/retention/{id}",
        Endpoint::RemoveRetention,
    ),
    route(
        Method::GET,
        "/api/v1/retention/plan",
        Endpoint::RetentionPlan,
    ),
    route(
        Method::GET,
        "/api/v1/namespaces/{namespace}/immutability",
        Endpoint::ListImmutability,
    ),
    route(
        Method::POST,
        "/api/v1/namespaces/{namespace}/immutability",
        Endpoint::AddImmutability,
    ),
    route(
        Method::DELETE,
        "/api/v1/namespaces/{namespace}/immutability/{pattern}",
        Endpoint::RemoveImmutability,
    ),
    route(
        Method::GET,
        "/api/v1/namespaces/{namespace}/quota",
        Endpoint::GetQuota,
    ),
    route(
        Method::PUT,
        "/api/v1/namespaces/{namespace}/quota",
        Endpoint::SetQuota,
    ),
    route(
        Method::DELETE,
        "/api/v1/namespaces/{namespace}/quota",
        Endpoint::RemoveQuota,
    ),
];

/// A route's path parameters by name, percent-decoded.
#[derive(Debug, Default, PartialEq)]
pub struct Params(Vec<(&'static str, String)>);

impl Params {
    fn get(&self, name: &str) -> &str {
        self.0
            .iter()
            .find(|(n, _)| *n == name)
            .map_or("", |(_, v)| v.as_str())
    }
}

/// Matches `path` against a template; a parameter takes one non-empty segment.
fn match_template(template: &'static str, path: &str) -> Option<Params> {
    let mut params = Vec::new();
    let mut wanted = template.split('/');
    let mut given = path.split('/');
    loop {
        match (wanted.next(), given.next()) {
            (None, None) => return Some(Params(params)),
            (Some(w), Some(g)) => {
                if let Some(name) = w.strip_prefix('{').and_then(|w| w.strip_suffix('}')) {
                    let value = percent_decode_str(g).decode_utf8().ok()?;
                    if value.is_empty() || value.contains('/') {
                        return None;
                    }
                    params.push((name, value.into_owned()));
                } else if w != g {
                    return None;
                }
            }
            _ => return None,
        }
    }
}

/// What the table says about a request.
#[derive(Debug)]
enum Found {
    Route(&'static RouteSpec, Params),
    /// The path exists, with these methods only.
    OtherMethods(Vec<&'static str>),
    Nothing,
}

fn find(method: &Method, path: &str) -> Found {
    let mut others = Vec::new();
    for spec in ROUTES {
        if let Some(params) = match_template(spec.path, path) {
            if spec.method == *method {
                return Found::Route(spec, params);
            }
            others.push(spec.method.as_str());
        }
    }
    if others.is_empty() {
        Found::Nothing
    } else {
        Found::OtherMethods(others)
    }
}

/// Answers a request under `/api/v1`.
pub async fn handle(
    registry: &Arc<Registry>,
    peer: &Peer,
    request: Request,
    request_id: RequestId,
) -> Response {
    let (method, uri) = (request.method().clone(), request.uri().clone());
    let mut response = super::error::respond(
        dispatch(registry, peer, request, request_id).await,
        &method,
        &uri,
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn dispatch(
    registry: &Arc<Registry>,
    peer: &Peer,
    request: Request,
    request_id: RequestId,
) -> ApiResult {
    let (spec, params) = match find(request.method(), request.uri().path()) {
        Found::Route(spec, params) => (spec, params),
        Found::OtherMethods(allowed) => {
            return Err(ApiError::new(ErrorCode::Unsupported)
                .header(header::ALLOW, &allowed.join(", "))
                .detail(format!(
                    "method {} is not supported here; use {}",
                    request.method(),
                    allowed.join(" or ")
                )));
        }
        Found::Nothing => return Err(super::not_found()),
    };
    // The description of the API is public: it says nothing about this registry's data.
    if spec.endpoint == Endpoint::OpenApi {
        return Ok(openapi());
    }
    let (parts, body) = request.into_parts();
    // The same request limits as on `/v2`: per address before the credentials are checked,
    // per account after.
    let limits = registry.auth().request_limits();
    if !limits.is_off() {
        limits.check_address(peer.addr.ip()).map_err(too_many)?;
    }
    let principal = authenticate(registry, peer, &parts).await?;
    if !limits.is_off()
        && let Some(account) = principal.account()
    {
        limits.check_account(account).map_err(too_many)?;
    }
    let ctx = Ctx {
        registry,
        who: Authority::of(&principal, registry.auth().enabled()),
        request: request_context(&parts, peer, principal, request_id),
        params,
        query: parts.uri.query().unwrap_or("").to_string(),
    };
    use Endpoint::*;
    match spec.endpoint {
        OpenApi => Ok(openapi()),
        Me => accounts::me(&ctx).await,
        ListUsers => accounts::list_users(&ctx).await,
        CreateUser => accounts::create_user(&ctx, body).await,
        GetUser => accounts::get_user(&ctx).await,
        DeleteUser => accounts::delete_user(&ctx).await,
        SetPassword => accounts::set_password(&ctx, body).await,
        ListNamespaces => namespaces::list(&ctx).await,
        CreateNamespace => namespaces::create(&ctx, body).await,
        GetNamespace => namespaces::get(&ctx).await,
        UpdateNamespace => namespaces::update(&ctx, body).await,
        DeleteNamespace => namespaces::delete(&ctx).await,
        ListMembers => namespaces::members(&ctx).await,
        SetMember => namespaces::set_member(&ctx, body).await,
        RemoveMember => namespaces::remove_member(&ctx).await,
        ListRobots => namespaces::robots(&ctx).await,
        CreateRobot => namespaces::create_robot(&ctx, body).await,
        DeleteRobot => namespaces::delete_robot(&ctx).await,
        ListTokens => accounts::list_tokens(&ctx).await,
        CreateToken => accounts::create_token(&ctx, body).await,
        RevokeToken => accounts::revoke_token(&ctx).await,
        RotateKeys => accounts::rotate_keys(&ctx).await,
        Audit => audit::list(&ctx).await,
        ListWebhooks => webhooks::list(&ctx).await,
        CreateWebhook => webhooks::create(&ctx, body).await,
        GetWebhook => webhooks::get(&ctx).await,
        DeleteWebhook => webhooks::delete(&ctx).await,
        ListParked => webhooks::parked(&ctx).await,
        ReplayParked => webhooks::replay(&ctx).await,
        ListTrash => trash::list(&ctx).await,
        RestoreTrash => trash::restore(&ctx).await,
        RunGc => trash::gc(&ctx).await,
        Quarantine => trash::quarantine(&ctx).await,
        ListRetention => retention::list(&ctx).await,
        AddRetention => retention::add(&ctx, body).await,
        RemoveRetention => retention::remove(&ctx).await,
        RetentionPlan => retention::plan(&ctx).await,
        ListImmutability => namespace_rules::list_rules(&ctx).await,
        AddImmutability => namespace_rules::add_rule(&ctx, body).await,
        RemoveImmutability => namespace_rules::remove_rule(&ctx).await,
        GetQuota => namespace_rules::quota(&ctx).await,
        SetQuota => namespace_rules::set_quota(&ctx, body).await,
        RemoveQuota => namespace_rules::remove_quota(&ctx).await,
    }
}

fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// Who is asking: as on `/v2`, except that every route needs an identified caller (with
/// access control on), so anonymous callers get the challenge.
async fn authenticate(
    registry: &Registry,
    peer: &Peer,
    parts: &Parts,
) -> Result<Arc<Principal>, ApiError> {
    let auth = registry.auth();
    let options = auth.options();
    let need = Need::Login;
    if !auth.enabled() {
        // As on `/v2`: an open registry lets anyone in, whatever the client sends.
        return auth
            .authenticate(&Credentials::None, None, None)
            .await
            .map_err(|e| access::refused(options, peer, parts, &need, e));
    }
    let credentials = access::credentials(&parts.headers).map_err(|why| {
        access::refused(options, peer, parts, &need, AuthError::Unauthorized(why))
    })?;
    let principal = auth
        .authenticate(
            &credentials,
            peer.client_cert_subject.as_deref(),
            Some(peer.addr.ip()),
        )
        .await
        .map_err(|e| access::refused(options, peer, parts, &need, e))?;
    access::check(options, peer, parts, &principal, &need)?;
    Ok(principal)
}

/// A request on its way through a handler.
struct Ctx<'a> {
    /// An `Arc` because GC runs as a task of its own.
    registry: &'a Arc<Registry>,
    who: Authority,
    request: RequestContext,
    params: Params,
    /// The request's query string, undecoded.
    query: String,
}

impl Ctx<'_> {
    fn md(&self) -> &Metadata {
        self.registry.auth().metadata()
    }

    fn param(&self, name: &str) -> &str {
        self.params.get(name)
    }

    /// The caller, as the event of a change names them.
    fn by(&self) -> manage::By {
        let r = &self.request;
        manage::By {
            actor: r.principal.actor.to_string(),
            client_addr: r.client_addr.map(|a| a.to_string()),
            user_agent: r.user_agent.clone(),
            request_id: Some(r.request_id.to_string()),
        }
    }

    /// Ok if the caller may do `op`; else 403, whether or not the target exists.
    fn require(&self, op: Op<'_>) -> Result<(), ApiError> {
        if policy::permits(&self.who, &op) {
            Ok(())
        } else {
            Err(ApiError::new(ErrorCode::Denied))
        }
    }

    /// One log line per change, naming who made it (never a secret).
    fn changed(&self, what: &'static str, target: &str) {
        tracing::info!(
            request.id = %self.request.request_id,
            actor = %self.request.principal.actor,
            client.addr = %self.request.client(),
            target,
            "{what}"
        );
    }
}

/// Reads a JSON body of at most [`MAX_BODY_BYTES`].
async fn read_json<T: DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| {
            ApiError::new(ErrorCode::Invalid).detail(format!(
                "the body must be JSON of at most {MAX_BODY_BYTES} bytes"
            ))
        })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::new(ErrorCode::Invalid).detail(format!("body: {e}")))
}

/// A paged listing's `before` (a cursor: the `next` of the previous page).
fn cursor_param(value: &str) -> Result<i64, ApiError> {
    value.parse().map_err(|_| {
        ApiError::new(ErrorCode::Invalid).detail(format!("before: {value:?} is not a cursor"))
    })
}

/// A paged listing's `limit`: from 1 to `max`.
fn limit_param(value: &str, max: i64) -> Result<i64, ApiError> {
    value
        .parse::<i64>()
        .ok()
        .filter(|n| (1..=max).contains(n))
        .ok_or_else(|| {
            ApiError::new(ErrorCode::Invalid).detail(format!("limit: a number from 1 to {max}"))
        })
}

fn json(status: StatusCode, value: &impl Serialize) -> ApiResult {
    let body = serde_json::to_string(value)
        .map_err(|e| ApiError::new(ErrorCode::Internal).detail(e.to_string()))?;
    Ok((status, [(header::CONTENT_TYPE, "application/json")], body).into_response())
}

fn created(location: &str, value: &impl Serialize) -> ApiResult {
    let mut response = json(StatusCode::CREATED, value)?;
    if let Ok(v) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}

fn no_content() -> ApiResult {
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Seconds since the epoch as the API shows them.
fn time(secs: i64) -> String {
    crate::time::rfc3339(secs)
}

fn opt_time(secs: Option<i64>) -> Option<String> {
    secs.map(time)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap in a test is the failure
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    use super::*;

    #[test]
    fn paths_match_the_table() {
        let check =
            |method: Method, path: &str, want: Result<(Endpoint, &[(&str, &str)]), &str>| {
                let got = match find(&method, path) {
                    Found::Route(spec, params) => Ok((spec.endpoint, params)),
                    Found::OtherMethods(m) => Err(format!("405 {}", m.join(","))),
                    Found::Nothing => Err("404".to_string()),
                };
                match (got, want) {
                    (Ok((e, p)), Ok((want_e, want_p))) => {
                        let want_p: Vec<(&str, String)> =
                            want_p.iter().map(|(k, v)| (*k, v.to_string())).collect();
                        assert_eq!((e, p.0), (want_e, want_p), "{method} {path}");
                    }
                    (Err(e), Err(want)) => assert_eq!(e, want, "{method} {path}"),
                    (got, want) => panic!("{method} {path}: got {got:?}, want {want:?}"),
                }
            };
        check(Method::GET, "/api/v1/me", Ok((Endpoint::Me, &[])));
        check(
            Method::GET,
            "/api/v1/users/alice",
            Ok((Endpoint::GetUser, &[("name", "alice")])),
        );
        check(
            Method::PUT,
            "/api/v1/namespaces/team/members/bob",
            Ok((
                Endpoint::SetMember,
                &[("namespace", "team"), ("account", "bob")],
            )),
        );
        // A robot's name keeps its `+`; percent-escapes are decoded.
        check(
            Method::GET,
            "/api/v1/accounts/team+ci/tokens",
            Ok((Endpoint::ListTokens, &[("account", "team+ci")])),
        );
        check(
            Method::GET,
            "/api/v1/accounts/team%2Bci/tokens",
            Ok((Endpoint::ListTokens, &[("account", "team+ci")])),
        );
        check(Method::GET, "/api/v1/accounts/a%2Fb/tokens", Err("404"));
        check(Method::GET, "/api/v1/users/", Err("404"));
        check(Method::GET, "/api/v1/users/alice/", Err("404"));
        check(Method::GET, "/api/v1/nothing", Err("404"));
        check(Method::GET, "/api/v1", Err("404"));
        check(Method::PATCH, "/api/v1/users", Err("405 GET,POST"));
        check(Method::GET, "/api/v1/keys/rotate", Err("405 POST"));
    }

    const METHODS: [&str; 8] = [
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];

    fn document() -> Value {
        serde_json::from_str(OPENAPI).expect("openapi.json is JSON")
    }

    /// Every (path template, method) the router has is documented, and every documented one
    /// is routed.
    #[test]
    fn the_openapi_document_describes_exactly_the_routes() {
        let doc = document();
        assert!(
            doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
            "an OpenAPI 3 document"
        );
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("a path item").keys() {
                if METHODS.contains(&method.as_str()) {
                    documented.insert((path.clone(), method.to_uppercase()));
                }
            }
        }
        let routed: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|r| (r.path.to_string(), r.method.to_string()))
            .collect();
        assert_eq!(routed.len(), ROUTES.len(), "a route is in the table twice");
        let undocumented: Vec<_> = routed.difference(&documented).collect();
        let unrouted: Vec<_> = documented.difference(&routed).collect();
        assert!(
            undocumented.is_empty() && unrouted.is_empty(),
            "routes missing from openapi.json: {undocumented:?}; documented but not routed: \
             {unrouted:?}"
        );
    }

    /// Each operation declares its path parameters, responses and an operation id; every
    /// `$ref` resolves; both security schemes are defined.
    #[test]
    fn the_openapi_document_is_complete() {
        let doc = document();
        let schemes = &doc["components"]["securitySchemes"];
        assert_eq!(schemes["basic"]["scheme"], "basic");
        assert_eq!(schemes["bearer"]["scheme"], "bearer");
        let mut ids = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            let wanted: BTreeSet<&str> = path
                .split('/')
                .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
                .collect();
            for (method, op) in item.as_object().expect("a path item") {
                if !METHODS.contains(&method.as_str()) {
                    continue;
                }
                let mut declared = BTreeSet::new();
                for list in [&item["parameters"], &op["parameters"]] {
                    for p in list.as_array().into_iter().flatten() {
                        let p = resolve(&doc, p);
                        if p["in"] == "path" {
                            assert_eq!(p["required"], true, "{method} {path}: {p}");
                            declared.insert(p["name"].as_str().expect("a name").to_string());
                        }
                    }
                }
                let declared: BTreeSet<&str> = declared.iter().map(String::as_str).collect();
                assert_eq!(declared, wanted, "{method} {path}: path parameters");
                let responses = op["responses"].as_object().expect("responses");
                assert!(
                    responses.keys().any(|c| c.starts_with('2')),
                    "{method} {path}: no success response"
                );
                let id = op["operationId"].as_str().expect("an operationId");
                assert!(ids.insert(id.to_string()), "operationId {id} twice");
            }
        }
        let mut refs = Vec::new();
        collect_refs(&doc, &mut refs);
        assert!(!refs.is_empty());
        for r in refs {
            assert!(!pointer(&doc, &r).is_null(), "$ref {r} does not resolve");
        }
    }

    fn pointer<'a>(doc: &'a Value, r: &str) -> &'a Value {
        r.strip_prefix('#')
            .and_then(|p| doc.pointer(p))
            .unwrap_or(&Value::Null)
    }

    fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
        match v["$ref"].as_str() {
            Some(r) => pointer(doc, r),
            None => v,
        }
    }

    fn collect_refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("$ref", Value::String(r)) => out.push(r.clone()),
                        _ => collect_refs(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
            _ => {}
        }
    }
}
