//! Who is asking, and what they may do: accounts, credentials, registry tokens and rights.
//! Nothing here knows HTTP; `api` parses headers into [`Credentials`] and turns
//! [`AuthError`]s into 401/403/429 answers.
//!
//! - [`scope`]: the Docker token scope grammar.
//! - [`rights`]: roles, grants, and the [`rights::Rights`] a request carries.
//! - [`secrets`]: password hashing (argon2id, bcrypt imports) and generated secrets.
//! - [`token`]: registry tokens (ES256 JWTs) and the shared signing keys.
//! - [`manage`]: adding and removing users, namespaces, members, robots, tokens, keys and trust
//!   rules; shared by the command line and the management API.
//! - [`federation`]: CI identity federation: a CI job's own OIDC token, matched by a trust rule
//!   ([`conditions`] on its claims), acts with a robot's rights.
//! - [`external`]: bearer tokens of other token servers (`trusted_issuers_file`).
//! - [`jwks`]: verifying tokens signed by others, and their keys fetched and cached.
//! - [`policy`]: who may do which of those through the management API.
//!
//! Checking a credential is expensive (argon2 costs ~20 ms and 19 MiB by design; a signature
//! check ~50 us), so a verified one is cached: a bearer token until it expires, a basic-auth
//! pair for [`BASIC_CACHE`], keyed by a hash of the credentials. Every change to accounts,
//! rights, credentials or keys bumps a generation number in the metadata store; each node polls
//! it every [`GENERATION_POLL`] and drops its caches when it moves, which is how a robot
//! revoked on one node is refused by every node within a second.

pub mod conditions;
pub mod external;
pub mod federation;
pub mod jwks;
pub mod limits;
pub mod manage;
pub mod namespace_rules;
pub mod policy;
pub mod rights;
pub mod scope;
pub mod secrets;
pub mod token;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{Semaphore, watch};

use crate::metadata::access::{self as q, AccountRow};
use crate::metadata::events::{self, NewEvent};
use crate::metadata::queries::now_secs;
use crate::metadata::{Metadata, MetadataError};
use crate::service::Actor;
use external::ExternalIssuer;
use federation::{FederationError, TrustRule};
use jwks::{JwksCache, JwtError};
use rights::{Action, Basis, Grant, Rights, Role};
use secrets::ApiSecret;
use token::{AccessClaim, Claims, KeySet, TokenError};

/// How long a verified basic-auth pair is trusted without checking it again (a change to the
/// account ends it sooner: see the module doc).
pub const BASIC_CACHE: Duration = Duration::from_secs(60);
/// How often each node looks for changes made through other nodes.
pub const GENERATION_POLL: Duration = Duration::from_millis(500);
/// Most entries in each verification cache; when full it is emptied (a cold cache costs one
/// verification per client, so a simple bound is enough).
const MAX_CACHED: usize = 10_000;
/// Password hashes computed at once: each argon2 takes 19 MiB and a core for ~20 ms.
const CONCURRENT_HASHES: usize = 4;
/// The limiters forget idle keys every this many generation polls (a minute).
const PRUNE_EVERY_TICKS: u64 = 120;
/// `last_used_at` of a credential is written at most this often.
const LAST_USED_GRANULARITY_SECS: i64 = 60;

#[derive(Debug, Clone)]
pub struct AuthOptions {
    /// Access control on. Off, every request may do everything (loopback default).
    pub enabled: bool,
    /// The `service` of challenges and tokens; tokens' audience.
    pub service: String,
    /// Tokens' issuer.
    pub issuer: String,
    pub token_ttl: Duration,
    pub refresh_token_ttl: Duration,
    /// The registry's external base URL for the token realm; `None`: each request's own
    /// scheme and `Host`.
    pub public_url: Option<String>,
    pub limits: limits::LimitOptions,
    /// Other token servers whose bearer tokens are accepted (`trusted_issuers_file`).
    pub external_issuers: Vec<ExternalIssuer>,
}

impl AuthOptions {
    pub fn disabled() -> AuthOptions {
        AuthOptions {
            enabled: false,
            service: "berth".to_string(),
            issuer: "berth".to_string(),
            token_ttl: Duration::from_secs(300),
            refresh_token_ttl: Duration::from_secs(30 * 86400),
            public_url: None,
            limits: limits::LimitOptions::default(),
            external_issuers: Vec::new(),
        }
    }
}

/// What a request presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    None,
    Basic { user: String, password: String },
    Bearer(String),
}

/// An authenticated (or anonymous) identity and its rights.
#[derive(Debug, Clone)]
pub struct Principal {
    pub actor: Actor,
    pub rights: Rights,
    /// The credential it was obtained with, when not a password.
    pub credential: Option<String>,
    /// Whether it may list the catalog (authenticated accounts; a token needs the
    /// `registry:catalog:*` scope).
    pub catalog: bool,
    /// How it was proven: a refresh token is issued only for a password or a generated secret.
    pub method: Method,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    None,
    Password,
    Secret,
    Token,
    ClientCertificate,
    /// A CI identity's OIDC token, through a trust rule.
    Federation,
    /// A bearer token of an external token server.
    External,
}

impl Method {
    /// A refresh token outlives what it was obtained with, so only a credential that is itself
    /// long-lived may be traded for one (not a CI job's short-lived identity, not a token).
    pub fn gets_refresh_tokens(self) -> bool {
        matches!(
            self,
            Method::Password | Method::Secret | Method::ClientCertificate
        )
    }
}

impl Principal {
    pub fn is_anonymous(&self) -> bool {
        matches!(self.actor, Actor::Anonymous)
    }

    pub fn may(&self, repository: &str, action: Action) -> bool {
        self.rights.may(repository, action)
    }

    /// The account acting, if any.
    pub fn account(&self) -> Option<&str> {
        self.actor.account()
    }

    fn anonymous(rights: Rights) -> Principal {
        Principal {
            actor: Actor::Anonymous,
            rights,
            credential: None,
            catalog: false,
            method: Method::None,
        }
    }

    /// Berth acting on its own behalf, with every right.
    pub fn system(what: &'static str) -> Principal {
        Principal {
            actor: Actor::System(what),
            rights: Rights::all(),
            credential: None,
            catalog: true,
            method: Method::None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Credentials missing, wrong, expired or revoked: 401 with a challenge.
    #[error("{0}")]
    Unauthorized(String),
    /// A bearer token that was genuine but has expired; its principal may still finish an
    /// upload it opened.
    #[error("token expired")]
    Expired(Box<Principal>),
    /// Too many failed logins; try again after this long.
    #[error("too many failed logins; retry in {0:?}")]
    Throttled(Duration),
    #[error("{0}")]
    Invalid(String),
    /// Something needed to check the credentials is unreachable (an issuer's keys): 503.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<manage::ManageError> for AuthError {
    fn from(e: manage::ManageError) -> Self {
        match e {
            manage::ManageError::Metadata(e) => AuthError::Metadata(e),
            e => AuthError::Internal(e.to_string()),
        }
    }
}

/// What a node has loaded from the metadata store, replaced whole when the generation moves.
struct Loaded {
    generation: i64,
    keys: KeySet,
    public: Arc<HashSet<String>>,
    trust: Arc<Vec<TrustRule>>,
}

/// A verification result and when it stops being trusted (seconds since the epoch).
type Cached = (Arc<Principal>, i64);

pub struct Auth {
    metadata: Metadata,
    /// Appends login and token events with group commit.
    recorder: events::Recorder,
    options: AuthOptions,
    loaded: RwLock<Arc<Loaded>>,
    bearer_cache: Mutex<HashMap<String, Cached>>,
    basic_cache: Mutex<HashMap<String, Cached>>,
    /// The principal of every request when access control is off.
    open: Arc<Principal>,
    hashing: Semaphore,
    /// Serializes reloads, so a burst of unknown-`kid` tokens reloads once.
    reloading: tokio::sync::Mutex<()>,
    throttle: limits::LoginThrottle,
    requests: limits::RequestLimits,
    /// The keys of CI issuers and external token servers.
    jwks: Arc<JwksCache>,
}

impl Auth {
    /// Loads keys and public namespaces; with access control on, creates the first signing key
    /// if there is none.
    pub async fn open(metadata: Metadata, options: AuthOptions) -> Result<Arc<Auth>, AuthError> {
        let throttle = limits::LoginThrottle::new(&options.limits);
        let requests = limits::RequestLimits::new(&options.limits);
        let auth = Arc::new(Auth {
            recorder: events::Recorder::start(metadata.clone()),
            metadata,
            open: Arc::new(Principal {
                actor: Actor::Anonymous,
                rights: Rights::all(),
                credential: None,
                catalog: true,
                method: Method::None,
            }),
            options,
            loaded: RwLock::new(Arc::new(Loaded {
                generation: -1,
                keys: KeySet::empty(),
                public: Arc::default(),
                trust: Arc::default(),
            })),
            bearer_cache: Mutex::default(),
            basic_cache: Mutex::default(),
            hashing: Semaphore::new(CONCURRENT_HASHES),
            reloading: tokio::sync::Mutex::new(()),
            throttle,
            requests,
            jwks: JwksCache::new(),
        });
        if auth.options.enabled {
            auth.reload(true).await?;
            if !auth.loaded().keys.has_signer() {
                manage::rotate_key(&auth.metadata, &manage::By::system("first-start")).await?;
                auth.reload(true).await?;
            }
        }
        Ok(auth)
    }

    pub fn enabled(&self) -> bool {
        self.options.enabled
    }

    pub fn options(&self) -> &AuthOptions {
        &self.options
    }

    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Request rates and uploads in flight, as configured.
    pub fn request_limits(&self) -> &limits::RequestLimits {
        &self.requests
    }

    fn loaded(&self) -> Arc<Loaded> {
        self.loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reloads keys and public namespaces and drops the caches if the generation moved (or
    /// always, when `force`).
    async fn reload(&self, force: bool) -> Result<(), MetadataError> {
        let _one = self.reloading.lock().await;
        let retired_since =
            now_secs() - self.options.token_ttl.as_secs() as i64 - token::CLOCK_SKEW_SECS;
        let current = self.loaded().generation;
        let fresh = self
            .metadata
            .read(|tx| {
                Box::pin(async move {
                    let generation = q::generation(tx).await?;
                    if generation == current && !force {
                        return Ok(None);
                    }
                    let keys = q::signing_keys(tx, retired_since).await?;
                    let public = q::public_namespaces(tx).await?;
                    let trust = q::trust_rules(tx).await?;
                    Ok(Some((generation, keys, public, trust)))
                })
            })
            .await?;
        let Some((generation, keys, public, trust)) = fresh else {
            return Ok(());
        };
        let trust = trust
            .iter()
            .filter_map(|row| match TrustRule::from_row(row) {
                Ok(rule) => Some(rule),
                Err(e) => {
                    tracing::warn!(rule = %row.name, error = %e, "skipping an invalid trust rule");
                    None
                }
            })
            .collect();
        let loaded = Arc::new(Loaded {
            generation,
            keys: KeySet::from_rows(&keys),
            public: Arc::new(public.into_iter().collect()),
            trust: Arc::new(trust),
        });
        *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = loaded;
        lock(&self.bearer_cache).clear();
        lock(&self.basic_cache).clear();
        Ok(())
    }

    /// Background task: follows changes made on any node until `stop`.
    pub async fn watch(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        if !self.options.enabled {
            return;
        }
        let mut tick = tokio::time::interval(GENERATION_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        let mut ticks: u64 = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            ticks += 1;
            if ticks.is_multiple_of(PRUNE_EVERY_TICKS) {
                self.throttle.prune();
                self.requests.prune();
            }
            match self.reload(false).await {
                Ok(()) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "cannot check for access changes; caches kept");
                }
                Err(_) => {}
            }
        }
    }

    /// Who presented `credentials` (or the verified client certificate's subject).
    pub async fn authenticate(
        &self,
        credentials: &Credentials,
        client_cert_subject: Option<&str>,
        client: Option<IpAddr>,
    ) -> Result<Arc<Principal>, AuthError> {
        if !self.options.enabled {
            return Ok(self.open.clone());
        }
        match credentials {
            Credentials::None => match client_cert_subject {
                Some(subject) => self.by_certificate(subject).await,
                None => Ok(Arc::new(Principal::anonymous(Rights::anonymous(
                    self.loaded().public.clone(),
                )))),
            },
            Credentials::Basic { user, password } => self.by_password(user, password, client).await,
            Credentials::Bearer(token) => self.by_token(token).await,
        }
    }

    async fn by_certificate(&self, subject: &str) -> Result<Arc<Principal>, AuthError> {
        let key = format!("cert\0{subject}");
        if let Some(p) = cached(&self.basic_cache, &key) {
            return Ok(p);
        }
        let account = self
            .account(subject)
            .await?
            .filter(|a| a.kind == "user")
            .ok_or_else(|| {
                AuthError::Unauthorized("the client certificate names no account".to_string())
            })?;
        let principal = Arc::new(
            self.principal_of(&account, Method::ClientCertificate)
                .await?,
        );
        remember(
            &self.basic_cache,
            key,
            &principal,
            now_secs() + BASIC_CACHE.as_secs() as i64,
        );
        Ok(principal)
    }

    async fn by_password(
        &self,
        user: &str,
        password: &str,
        client: Option<IpAddr>,
    ) -> Result<Arc<Principal>, AuthError> {
        let key = secrets::hex_sha256(format!("{user}\0{password}").as_bytes());
        if let Some(p) = cached(&self.basic_cache, &key) {
            return Ok(p);
        }
        if let Some(wait) = self.throttle.wait(user, client) {
            return Err(AuthError::Throttled(wait));
        }
        // A CI job's OIDC token as the password: no user types a JWT as a password.
        let checked = if jwks::unverified_issuer(password).is_some() {
            self.check_federated(user, password).await
        } else {
            let until = now_secs() + BASIC_CACHE.as_secs() as i64;
            self.check_password(user, password)
                .await
                .map(|p| (p, until))
        };
        let (principal, until) = match checked {
            Ok((p, until)) => (Arc::new(p), until),
            Err(e @ AuthError::Unauthorized(_)) => {
                self.throttle.failed(user, client);
                self.record(login_event(user, client, "denied")).await;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        // Logged once per verification, not per request: a cached login is the same login.
        self.record(login_event(&principal.actor.to_string(), client, "ok"))
            .await;
        remember(&self.basic_cache, key, &principal, until);
        Ok(principal)
    }

    /// Appends an event of its own (a login, a token issued). The event log is the audit
    /// trail, so a failure to write it is logged loudly; the request itself goes on, since a
    /// login changes nothing that the event would have to match.
    pub async fn record(&self, event: NewEvent) {
        let (kind, actor) = (event.kind.clone(), event.actor.clone());
        if let Err(error) = self.recorder.record(event).await {
            tracing::error!(%kind, %actor, %error, "could not record an event");
        }
    }

    /// Appends an event without waiting for it: for the bulk (pulls), where a pull must not
    /// wait on a commit. A crash may lose the last few milliseconds of them; when the queue is
    /// full the event is dropped and counted (see [`events::Recorder::dropped`]).
    pub fn record_later(&self, event: NewEvent) {
        self.recorder.record_later(event);
    }

    pub fn recorder(&self) -> &events::Recorder {
        &self.recorder
    }

    /// Checks a user name and password or generated secret, uncached.
    pub async fn check_password(&self, user: &str, password: &str) -> Result<Principal, AuthError> {
        let refused = || AuthError::Unauthorized("invalid username or password".to_string());
        if let Some(secret) = ApiSecret::parse(password) {
            let (account, credential) = self.live_credential(&secret).await?.ok_or_else(refused)?;
            if account.name != user || credential.kind == "refresh" {
                return Err(refused());
            }
            let mut principal = self.principal_of(&account, Method::Secret).await?;
            if let Some(grants) = credential.grants.as_deref() {
                principal.rights.restrict = Some(parse_grants(grants)?);
            }
            principal.credential = Some(credential.id);
            return Ok(principal);
        }
        let account = self.account(user).await?;
        // A missing account costs the same hash as a wrong password, so timing does not tell
        // which names exist.
        let stored = match account.as_ref().and_then(|a| a.password_hash.clone()) {
            Some(hash) => hash,
            None => tokio::task::spawn_blocking(|| dummy_hash().to_string())
                .await
                .map_err(|e| AuthError::Internal(e.to_string()))?,
        };
        let ok = self.verify_hash(password, &stored).await?;
        let Some(account) = account.filter(|a| ok && a.kind == "user") else {
            return Err(refused());
        };
        if secrets::needs_rehash(&stored) {
            self.upgrade_hash(&account.name, password).await;
        }
        self.principal_of(&account, Method::Password).await
    }

    /// Whether `password` is the user's password: a generated secret never passes, so a
    /// personal access token cannot stand in for the password it would replace. A wrong one
    /// counts as a failed login, so guesses are throttled as at the door.
    pub async fn is_password_of(
        &self,
        user: &str,
        password: &str,
        client: Option<IpAddr>,
    ) -> Result<bool, AuthError> {
        if let Some(wait) = self.throttle.wait(user, client) {
            return Err(AuthError::Throttled(wait));
        }
        let account = self.account(user).await?;
        let right = match account
            .filter(|a| a.kind == "user")
            .and_then(|a| a.password_hash)
        {
            Some(stored) => self.verify_hash(password, &stored).await?,
            None => false,
        };
        if !right {
            self.throttle.failed(user, client);
        }
        Ok(right)
    }

    async fn verify_hash(&self, password: &str, stored: &str) -> Result<bool, AuthError> {
        let _permit = self
            .hashing
            .acquire()
            .await
            .map_err(|e| AuthError::Internal(e.to_string()))?;
        let (password, stored) = (password.to_string(), stored.to_string());
        tokio::task::spawn_blocking(move || secrets::verify_password(&password, &stored))
            .await
            .map_err(|e| AuthError::Internal(format!("password check: {e}")))
    }

    /// Replaces an imported bcrypt hash with argon2id; a failure only means it is tried again
    /// at the next login.
    async fn upgrade_hash(&self, name: &str, password: &str) {
        let password = password.to_string();
        let Ok(Ok(hash)) =
            tokio::task::spawn_blocking(move || secrets::hash_password(&password)).await
        else {
            return;
        };
        let result = self
            .metadata
            .write(|tx| Box::pin(q::set_password_hash(tx, name, &hash)))
            .await;
        if let Err(e) = result {
            tracing::warn!(account = name, error = %e, "could not upgrade a bcrypt password hash");
        }
    }

    async fn by_token(&self, token: &str) -> Result<Arc<Principal>, AuthError> {
        if let Some(p) = cached(&self.bearer_cache, token) {
            return Ok(p);
        }
        if !self.options.external_issuers.is_empty()
            && let Some(iss) = jwks::unverified_issuer(token)
            && let Some(issuer) = self
                .options
                .external_issuers
                .iter()
                .find(|i| i.issuer == iss)
        {
            return self.by_external(issuer, token).await;
        }
        let now = now_secs();
        let mut loaded = self.loaded();
        if let Some(kid) = KeySet::kid_of(token)
            && !loaded.keys.knows(&kid)
        {
            // Maybe another node rotated the key a moment ago.
            self.reload(true).await?;
            loaded = self.loaded();
        }
        let verified = loaded
            .keys
            .verify(token, &self.options.issuer, &self.options.service, now);
        let (claims, expired) = match verified {
            Ok(claims) => (claims, false),
            Err(TokenError::Expired(claims)) => (*claims, true),
            Err(e) => return Err(AuthError::Unauthorized(e.to_string())),
        };
        let principal = Arc::new(self.principal_of_claims(&claims).await?);
        if expired {
            return Err(AuthError::Expired(Box::new((*principal).clone())));
        }
        remember(
            &self.bearer_cache,
            token.to_string(),
            &principal,
            claims.exp,
        );
        Ok(principal)
    }

    /// A bearer token of an external token server: its `access` claim is what it may do, its
    /// `sub` who acts.
    async fn by_external(
        &self,
        issuer: &ExternalIssuer,
        token: &str,
    ) -> Result<Arc<Principal>, AuthError> {
        let verified = match issuer.verify(&self.jwks, token, now_secs()).await {
            Ok(v) => v,
            Err(JwtError::KeysUnavailable(e)) => {
                return Err(AuthError::Unavailable(format!(
                    "the keys of issuer {} are unavailable: {e}",
                    issuer.issuer
                )));
            }
            Err(e) => return Err(AuthError::Unauthorized(e.to_string())),
        };
        let access = external::access(&verified.claims)
            .map_err(|e| AuthError::Unauthorized(e.to_string()))?;
        let (grants, catalog) = grants_of(&access);
        let subject = verified.claims["sub"].as_str().unwrap_or_default();
        let actor = if subject.is_empty() {
            Actor::Anonymous
        } else {
            Actor::External {
                issuer: issuer.issuer.clone(),
                subject: subject.to_string(),
            }
        };
        let principal = Arc::new(Principal {
            catalog: catalog && !matches!(actor, Actor::Anonymous),
            actor,
            rights: Rights {
                basis: Basis::Grants(grants),
                restrict: None,
                public: self.loaded().public.clone(),
            },
            credential: None,
            method: Method::External,
        });
        if verified.expired {
            return Err(AuthError::Expired(Box::new((*principal).clone())));
        }
        remember(
            &self.bearer_cache,
            token.to_string(),
            &principal,
            verified.exp,
        );
        Ok(principal)
    }

    /// A CI job's OIDC token traded for its robot (the OAuth2 token exchange): checked, cached,
    /// throttled and recorded exactly like the token given as a basic-auth password.
    pub async fn federate(
        &self,
        user: &str,
        token: &str,
        client: Option<IpAddr>,
    ) -> Result<Arc<Principal>, AuthError> {
        if jwks::unverified_issuer(token).is_none() {
            return Err(AuthError::Unauthorized(
                "the subject token is not a JWT with an issuer".into(),
            ));
        }
        self.by_password(user, token, client).await
    }

    /// The robot a CI job's OIDC token acts as, through the trust rules its claims satisfy, and
    /// until when that may be cached (never past the token's expiry). `user` names the robot
    /// (only its rules are considered); any other name is ignored.
    async fn check_federated(
        &self,
        user: &str,
        token: &str,
    ) -> Result<(Principal, i64), AuthError> {
        let now = now_secs();
        let loaded = self.loaded();
        let robot = match self.account(user).await? {
            Some(a) if a.kind == "robot" => Some(a),
            _ => None,
        };
        let rules = loaded
            .trust
            .iter()
            .filter(|r| robot.as_ref().is_none_or(|a| a.id == r.robot_id));
        let matched = match federation::matching(&self.jwks, rules, token, now).await {
            Ok(m) => m,
            Err(FederationError::Refused {
                issuer,
                error: JwtError::KeysUnavailable(e),
            }) => {
                return Err(AuthError::Unavailable(format!(
                    "the keys of issuer {issuer} are unavailable: {e}"
                )));
            }
            Err(FederationError::UnknownIssuer(issuer)) if robot.is_some() => {
                return Err(AuthError::Unauthorized(format!(
                    "no trust rule of robot {user} trusts tokens of issuer {issuer}"
                )));
            }
            Err(e) => return Err(AuthError::Unauthorized(e.to_string())),
        };
        let subject = matched.subject();
        let mut robots: Vec<i64> = matched.rules.iter().map(|r| r.robot_id).collect();
        robots.sort_unstable();
        robots.dedup();
        let rule = match (matched.rules.first(), robots.len()) {
            (Some(rule), 1) => *rule,
            (None, _) => {
                tracing::info!(subject = %subject, "a CI identity token matches no trust rule");
                return Err(AuthError::Unauthorized(format!(
                    "the claims of {subject} match no trust rule"
                )));
            }
            (Some(_), _) => {
                let names: Vec<&str> = matched.rules.iter().map(|r| r.name.as_str()).collect();
                return Err(AuthError::Unauthorized(format!(
                    "{subject} matches trust rules of several robots ({}); give the robot's \
                     name as the user name",
                    names.join(", ")
                )));
            }
        };
        let gone =
            || AuthError::Unauthorized(format!("the robot of trust rule {} is gone", rule.name));
        let id = rule.robot_id;
        let account = self
            .metadata
            .read(|tx| Box::pin(q::account_by_id(tx, id)))
            .await?
            .filter(|a| a.kind == "robot" && !account_expired(a))
            .ok_or_else(gone)?;
        let mut principal = self.principal_of(&account, Method::Federation).await?;
        principal.actor = Actor::Federated {
            robot: account.name.clone(),
            subject,
        };
        principal.credential = Some(trust_credential(&rule.name));
        let until = matched.verified.exp.min(now + BASIC_CACHE.as_secs() as i64);
        Ok((principal, until))
    }

    /// The principal a verified token stands for, after checking that its account (and the
    /// credential it came from) still exist.
    async fn principal_of_claims(&self, claims: &Claims) -> Result<Principal, AuthError> {
        let gone =
            || AuthError::Unauthorized("the token's account or credential was revoked".into());
        // An anonymous token (issued without credentials) names no account.
        let account = if claims.sub.is_empty() {
            None
        } else {
            let account = self.account(&claims.sub).await?.ok_or_else(gone)?;
            if account_expired(&account) {
                return Err(gone());
            }
            Some(account)
        };
        if let Some(rule) = claims
            .cid
            .as_deref()
            .and_then(|c| c.strip_prefix(TRUST_CREDENTIAL))
        {
            // Obtained through a trust rule: ends when the rule is removed.
            let owner = account.as_ref().map(|a| a.id);
            let live = self
                .loaded()
                .trust
                .iter()
                .any(|r| r.name == rule && Some(r.robot_id) == owner);
            if !live {
                return Err(gone());
            }
        } else if let Some(cid) = &claims.cid {
            let credential = self
                .metadata
                .read(|tx| Box::pin(q::credential_by_id(tx, cid)))
                .await?
                .ok_or_else(gone)?;
            let owner = account.as_ref().map(|a| a.id);
            if credential_dead(&credential) || Some(credential.account_id) != owner {
                return Err(gone());
            }
        }
        let (grants, catalog) = grants_of(&claims.access);
        Ok(Principal {
            actor: account
                .as_ref()
                .map_or(Actor::Anonymous, |a| actor_of(a, claims.act.as_deref())),
            rights: Rights {
                basis: Basis::Grants(grants),
                restrict: None,
                // Public pulls need no token entry: anyone may make them.
                public: self.loaded().public.clone(),
            },
            credential: claims.cid.clone(),
            catalog,
            method: Method::Token,
        })
    }

    async fn account(&self, name: &str) -> Result<Option<AccountRow>, MetadataError> {
        self.metadata
            .read(|tx| Box::pin(q::account_by_name(tx, name)))
            .await
    }

    /// A generated secret's account and credential, if it is live; records its use.
    async fn live_credential(
        &self,
        secret: &ApiSecret,
    ) -> Result<Option<(AccountRow, q::CredentialRow)>, AuthError> {
        let found = self
            .metadata
            .read(|tx| {
                Box::pin(async move {
                    let Some(c) = q::credential_by_id(tx, &secret.id).await? else {
                        return Ok(None);
                    };
                    let a = q::account_by_id(tx, c.account_id).await?;
                    Ok(a.map(|a| (a, c)))
                })
            })
            .await?;
        let Some((account, credential)) = found else {
            return Ok(None);
        };
        if !secret.matches(&credential.secret_hash)
            || credential_dead(&credential)
            || account_expired(&account)
        {
            return Ok(None);
        }
        let now = now_secs();
        self.metadata
            .write(|tx| {
                Box::pin(q::touch_credential(
                    tx,
                    &credential.id,
                    now,
                    LAST_USED_GRANULARITY_SECS,
                ))
            })
            .await?;
        Ok(Some((account, credential)))
    }

    /// An account's own rights: an administrator's all, a user's roles, a robot's grants.
    pub async fn principal_of(
        &self,
        account: &AccountRow,
        method: Method,
    ) -> Result<Principal, AuthError> {
        let basis = if account.admin {
            Basis::All
        } else if account.kind == "robot" {
            Basis::Grants(parse_grants(account.grants.as_deref().unwrap_or("[]"))?)
        } else {
            let id = account.id;
            let rows = self
                .metadata
                .read(|tx| Box::pin(q::memberships(tx, id)))
                .await?;
            let mut roles = HashMap::new();
            for (namespace, role) in rows {
                let role: Role = role.parse().map_err(AuthError::Internal)?;
                roles.insert(namespace, role);
            }
            Basis::Roles(roles)
        };
        Ok(Principal {
            actor: actor_of(account, None),
            rights: Rights {
                basis,
                restrict: None,
                public: self.loaded().public.clone(),
            },
            credential: None,
            catalog: true,
            method,
        })
    }

    /// The rights to list the catalog with: a token's own rights name single repositories, so
    /// its account's rights are looked up. `None` if the principal may not list it.
    pub async fn catalog_rights(&self, principal: &Principal) -> Result<Option<Rights>, AuthError> {
        if !principal.catalog {
            return Ok(None);
        }
        if principal.method != Method::Token {
            // A password, secret, certificate or federated identity carries its account's own
            // rights; an external token carries no account, only its grants.
            return Ok(Some(principal.rights.clone()));
        }
        let Some(name) = principal.account() else {
            return Ok(None);
        };
        let Some(account) = self.account(name).await? else {
            return Ok(None);
        };
        Ok(Some(
            self.principal_of(&account, Method::Token).await?.rights,
        ))
    }

    /// Issues a registry token granting what `principal` may do of what `scopes` ask.
    pub fn issue(
        &self,
        principal: &Principal,
        scopes: &[scope::ResourceScope],
    ) -> Result<IssuedToken, AuthError> {
        let now = now_secs();
        let mut access: Vec<AccessClaim> = Vec::new();
        for s in scopes {
            let granted: Vec<String> = match (s.resource_type.as_str(), s.class.as_deref()) {
                ("repository", None | Some("plugin")) => {
                    let wanted = Action::from_scope(&s.actions);
                    // A name with a host part, or otherwise not a repository name here, can
                    // only be granted nothing.
                    if s.name.parse::<oci::RepositoryName>().is_err() {
                        Vec::new()
                    } else {
                        principal
                            .rights
                            .allowed(&s.name, &wanted)
                            .iter()
                            .map(|a| a.as_str().to_string())
                            .collect()
                    }
                }
                ("registry", None) if s.name == "catalog" => {
                    if principal.catalog
                        && !principal.is_anonymous()
                        && s.actions.iter().any(|a| a == "*")
                    {
                        vec!["*".to_string()]
                    } else {
                        Vec::new()
                    }
                }
                _ => Vec::new(),
            };
            if granted.is_empty() {
                continue;
            }
            match access
                .iter_mut()
                .find(|a| a.resource_type == s.type_with_class() && a.name == s.name)
            {
                Some(entry) => {
                    for g in granted {
                        if !entry.actions.contains(&g) {
                            entry.actions.push(g);
                        }
                    }
                }
                None => access.push(AccessClaim {
                    resource_type: s.type_with_class(),
                    name: s.name.clone(),
                    actions: granted,
                }),
            }
        }
        let ttl = self.options.token_ttl.as_secs() as i64;
        let claims = Claims {
            iss: self.options.issuer.clone(),
            sub: principal.account().unwrap_or_default().to_string(),
            aud: self.options.service.clone(),
            exp: now + ttl,
            nbf: now - token::CLOCK_SKEW_SECS,
            iat: now,
            jti: uuid::Uuid::new_v4().to_string(),
            access,
            cid: principal.credential.clone(),
            act: match &principal.actor {
                Actor::Federated { subject, .. } => Some(subject.clone()),
                _ => None,
            },
        };
        let token = self
            .loaded()
            .keys
            .sign(&claims)
            .map_err(AuthError::Internal)?;
        Ok(IssuedToken {
            token,
            expires_in: ttl,
            issued_at: now,
            access: claims.access,
        })
    }

    /// A refresh token for `principal`'s account and this service, stored hashed.
    pub async fn issue_refresh_token(
        &self,
        principal: &Principal,
        client_id: &str,
    ) -> Result<String, AuthError> {
        if !principal.method.gets_refresh_tokens() {
            return Err(AuthError::Invalid(
                "refresh tokens are issued for passwords and generated secrets only".into(),
            ));
        }
        let name = principal
            .account()
            .ok_or_else(|| AuthError::Invalid("anonymous callers get no refresh token".into()))?;
        let account = self
            .account(name)
            .await?
            .ok_or_else(|| AuthError::Unauthorized("account removed".into()))?;
        let secret = ApiSecret::generate();
        let now = now_secs();
        let row = q::CredentialRow {
            id: secret.id.clone(),
            account_id: account.id,
            kind: "refresh".to_string(),
            secret_hash: secret.hash(),
            description: format!("refresh token for {client_id}"),
            grants: principal
                .rights
                .restrict
                .as_ref()
                .map(|g| serde_json::to_string(g).unwrap_or_default()),
            service: Some(self.options.service.clone()),
            created_at: now,
            expires_at: Some(now + self.options.refresh_token_ttl.as_secs() as i64),
            last_used_at: None,
            revoked_at: None,
        };
        self.metadata
            .write(|tx| Box::pin(q::insert_credential(tx, &row)))
            .await?;
        Ok(secret.to_string())
    }

    /// The principal a refresh token stands for, if it is live and was issued for `service`.
    pub async fn redeem_refresh_token(
        &self,
        refresh_token: &str,
        service: &str,
    ) -> Result<Principal, AuthError> {
        let refused = || AuthError::Unauthorized("invalid refresh token".to_string());
        let secret = ApiSecret::parse(refresh_token).ok_or_else(refused)?;
        let (account, credential) = self.live_credential(&secret).await?.ok_or_else(refused)?;
        if credential.kind != "refresh" || credential.service.as_deref() != Some(service) {
            return Err(refused());
        }
        let mut principal = self.principal_of(&account, Method::Secret).await?;
        if let Some(grants) = credential.grants.as_deref() {
            principal.rights.restrict = Some(parse_grants(grants)?);
        }
        principal.credential = Some(credential.id);
        Ok(principal)
    }
}

/// A token as the token endpoint returns it.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub token: String,
    pub expires_in: i64,
    /// Seconds since the epoch.
    pub issued_at: i64,
    pub access: Vec<AccessClaim>,
}

/// An argon2id hash of a random password nobody knows: checked when an account does not
/// exist, so a wrong name takes as long as a wrong password.
fn dummy_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| secrets::hash_password(&ApiSecret::generate().secret).unwrap_or_default())
}

/// A login attempt; `who` is the actor on success, the name tried on failure.
fn login_event(who: &str, client: Option<IpAddr>, result: &str) -> NewEvent {
    NewEvent {
        kind: if result == "ok" {
            "login.succeeded"
        } else {
            "login.failed"
        }
        .to_string(),
        actor: if result == "ok" {
            who.to_string()
        } else {
            format!("unverified:{who}")
        },
        client_addr: client.map(|c| c.to_string()),
        result: result.to_string(),
        ..NewEvent::default()
    }
}

/// The `cid` of tokens obtained through trust rule `NAME`: `trust:NAME`.
const TRUST_CREDENTIAL: &str = "trust:";

fn trust_credential(rule: &str) -> String {
    format!("{TRUST_CREDENTIAL}{rule}")
}

/// A token's `access` claim as grants, and whether it may list the catalog.
fn grants_of(access: &[AccessClaim]) -> (Vec<Grant>, bool) {
    let mut grants = Vec::new();
    let mut catalog = false;
    for entry in access {
        match entry.resource_type.as_str() {
            "repository" => grants.push(Grant {
                repositories: entry.name.clone(),
                actions: Action::from_scope(&entry.actions),
            }),
            "registry" if entry.name == "catalog" => {
                catalog = entry.actions.iter().any(|a| a == "*");
            }
            _ => {}
        }
    }
    (grants, catalog)
}

fn parse_grants(json: &str) -> Result<Vec<Grant>, AuthError> {
    serde_json::from_str(json).map_err(|e| AuthError::Internal(format!("stored grants: {e}")))
}

fn actor_of(account: &AccountRow, federated_subject: Option<&str>) -> Actor {
    match (account.kind.as_str(), federated_subject) {
        ("robot", Some(subject)) => Actor::Federated {
            robot: account.name.clone(),
            subject: subject.to_string(),
        },
        ("robot", None) => Actor::Robot(account.name.clone()),
        _ => Actor::User(account.name.clone()),
    }
}

fn account_expired(account: &AccountRow) -> bool {
    account.expires_at.is_some_and(|e| e <= now_secs())
}

fn credential_dead(c: &q::CredentialRow) -> bool {
    c.revoked_at.is_some() || c.expires_at.is_some_and(|e| e <= now_secs())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn cached(cache: &Mutex<HashMap<String, Cached>>, key: &str) -> Option<Arc<Principal>> {
    let cache = lock(cache);
    let (principal, until) = cache.get(key)?;
    (*until > now_secs()).then(|| principal.clone())
}

fn remember(cache: &Mutex<HashMap<String, Cached>>, key: String, p: &Arc<Principal>, until: i64) {
    let mut cache = lock(cache);
    if cache.len() >= MAX_CACHED {
        cache.clear();
    }
    cache.insert(key, (p.clone(), until));
}
