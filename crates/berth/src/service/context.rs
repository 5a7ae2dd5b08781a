//! Who is asking the service, and from where: passed into every entry point of the registry,
//! so that access control, audit events and quotas read it there instead of changing every
//! signature. Changes are logged with it (`log_change`); the service asks its principal what
//! the caller may read where a rule depends on it (the catalog, mounts).

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use crate::auth::Principal;
use crate::auth::rights::Action;
use crate::metadata::events::NewEvent;

use oci::{Digest, RepositoryName, Tag};

/// The identity a request acts as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// No credentials were presented (or access control is off).
    Anonymous,
    /// Berth acting on its own behalf (`berth copy`, background workers).
    System(&'static str),
    User(String),
    Robot(String),
    /// A CI job's own identity (`issuer#subject`) acting with a robot's rights through a
    /// trust rule.
    Federated {
        robot: String,
        subject: String,
    },
    /// The subject of an external token server's token (`trusted_issuers_file`): no account
    /// here, only the grants its token carries.
    External {
        issuer: String,
        subject: String,
    },
}

impl Actor {
    /// The account acting, if any.
    pub fn account(&self) -> Option<&str> {
        match self {
            Actor::User(name) | Actor::Robot(name) | Actor::Federated { robot: name, .. } => {
                Some(name)
            }
            Actor::Anonymous | Actor::System(_) | Actor::External { .. } => None,
        }
    }

    /// Who owns what this actor starts (an upload): its account, or an external identity
    /// (`issuer#subject`; account names never contain `#`).
    pub fn owner(&self) -> Option<String> {
        match self {
            Actor::External { issuer, subject } => Some(format!("{issuer}#{subject}")),
            other => other.account().map(str::to_owned),
        }
    }
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::Anonymous => f.write_str("anonymous"),
            Actor::System(what) => write!(f, "system:{what}"),
            Actor::User(name) => write!(f, "user:{name}"),
            Actor::Robot(name) => write!(f, "robot:{name}"),
            Actor::Federated { robot, subject } => write!(f, "robot:{robot}({subject})"),
            Actor::External { issuer, subject } => write!(f, "external:{issuer}#{subject}"),
        }
    }
}

/// Names a request in logs (and, later, in events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestId {
    /// The client's own `X-Request-Id`.
    Client(String),
    /// Ours: this process's random prefix and a counter. Formatted only when logged, so a
    /// request that logs nothing pays for an atomic increment.
    Generated(u64),
}

/// Tells this process's request ids from other nodes'.
fn process_prefix() -> u32 {
    static PREFIX: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PREFIX.get_or_init(|| uuid::Uuid::new_v4().as_u128() as u32)
}

impl RequestId {
    pub fn generate() -> RequestId {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        RequestId::Generated(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestId::Client(id) => f.write_str(id),
            RequestId::Generated(n) => write!(f, "{:08x}-{n}", process_prefix()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RequestContext {
    /// The client's `X-Request-Id` when it sent a usable one, else generated.
    pub request_id: RequestId,
    /// Who is asking and what they may do.
    pub principal: Arc<Principal>,
    /// The peer's address, when the request came over the network.
    pub client_addr: Option<IpAddr>,
    pub user_agent: Option<String>,
}

impl RequestContext {
    /// Berth acting on its own behalf.
    pub fn system(what: &'static str) -> RequestContext {
        RequestContext {
            request_id: RequestId::generate(),
            principal: Arc::new(Principal::system(what)),
            client_addr: None,
            user_agent: None,
        }
    }

    pub fn actor(&self) -> &Actor {
        &self.principal.actor
    }

    /// Whether the caller may do `action` on `repository`.
    pub fn may(&self, repository: &str, action: Action) -> bool {
        self.principal.may(repository, action)
    }

    /// The client address for logs: `-` when there is none.
    pub fn client(&self) -> String {
        self.client_addr
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".to_string())
    }
}

impl RequestContext {
    /// An event about `repo` by this request's caller, for the event log.
    pub(crate) fn event(
        &self,
        kind: &str,
        repo: &RepositoryName,
        digest: Option<&Digest>,
        tags: &[String],
        size: Option<u64>,
    ) -> NewEvent {
        NewEvent {
            digest: digest.map(|d| d.to_string()),
            tags: tags.to_vec(),
            size,
            ..self.event_about(kind, Some(repo.as_str()))
        }
    }

    /// An event by this request's caller about a repository, a namespace (`repository` holds
    /// its name) or the registry as a whole (`None`).
    pub(crate) fn event_about(&self, kind: &str, repository: Option<&str>) -> NewEvent {
        NewEvent {
            kind: kind.to_string(),
            actor: self.principal.actor.to_string(),
            client_addr: self.client_addr.map(|a| a.to_string()),
            user_agent: self.user_agent.clone(),
            request_id: Some(self.request_id.to_string()),
            repository: repository.map(str::to_string),
            digest: None,
            tags: Vec::new(),
            size: None,
            result: "ok".to_string(),
            detail: None,
        }
    }

    /// One log line per change the registry made, naming who made it: until the event log
    /// exists, this is how an operator answers "who pushed or deleted this".
    pub(crate) fn log_change(
        &self,
        what: &'static str,
        repo: &RepositoryName,
        digest: &Digest,
        tags: &[Tag],
    ) {
        tracing::info!(
            request.id = %self.request_id,
            actor = %self.principal.actor,
            client.addr = %self.client(),
            repository = %repo,
            digest = %digest,
            tags = ?tags.iter().map(Tag::as_str).collect::<Vec<_>>(),
            "{what}"
        );
    }

    pub(crate) fn log_tag_deleted(&self, repo: &RepositoryName, tag: &Tag) {
        tracing::info!(
            request.id = %self.request_id,
            actor = %self.principal.actor,
            client.addr = %self.client(),
            repository = %repo,
            tag = tag.as_str(),
            "tag deleted"
        );
    }
}
