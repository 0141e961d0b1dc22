//! Bearer-token authentication of the gRPC API: the one table saying which RPC
//! needs which token ([`Rpc::access`]), and the check itself. Tokens are kept
//! only as sha256 digests and compared in constant time; they are never logged
//! and never echoed in a status message.

use crate::config::{ApiConfig, Secret};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;

/// The RPCs of `conflux.v1.Conflux`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    Deploy,
    Rollback,
    Promote,
    GetState,
    ListDeadLetters,
    Status,
    ListTypes,
    Invoke,
    ListEntities,
    StreamLogs,
    Drain,
    /// `/metrics` and the dashboard's data (HTTP only).
    Metrics,
}

/// Which token an RPC requires (when that token is configured).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Changes or reveals the node: the admin token.
    Admin,
    /// Calls entities: the invoke token (the admin token is accepted too).
    Invoke,
}

impl Rpc {
    /// The single method → required-token table.
    pub fn access(self) -> Access {
        match self {
            Rpc::Deploy
            | Rpc::Rollback
            | Rpc::Promote
            | Rpc::GetState
            | Rpc::ListDeadLetters
            | Rpc::Status
            | Rpc::ListEntities
            | Rpc::StreamLogs
            | Rpc::Drain
            | Rpc::Metrics => Access::Admin,
            Rpc::ListTypes | Rpc::Invoke => Access::Invoke,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Rpc::Deploy => "Deploy",
            Rpc::Rollback => "Rollback",
            Rpc::Promote => "Promote",
            Rpc::GetState => "GetState",
            Rpc::ListDeadLetters => "ListDeadLetters",
            Rpc::Status => "Status",
            Rpc::ListTypes => "ListTypes",
            Rpc::Invoke => "Invoke",
            Rpc::ListEntities => "ListEntities",
            Rpc::StreamLogs => "StreamLogs",
            Rpc::Drain => "Drain",
            Rpc::Metrics => "Metrics",
        }
    }
}

/// Why a call was refused; the message names the RPC and the token it needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("{rpc} needs the {token} token: send metadata `authorization: Bearer <token>`")]
    Missing { rpc: &'static str, token: &'static str },
    #[error("{rpc} needs the {token} token: the `authorization` metadata is not `Bearer <token>`")]
    Malformed { rpc: &'static str, token: &'static str },
    #[error("{rpc} needs the {token} token: the bearer token presented is not valid")]
    Wrong { rpc: &'static str, token: &'static str },
}

type TokenDigest = [u8; 32];

fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

/// Constant time: both sides are fixed-length digests, compared with `subtle`.
fn matches(presented: &TokenDigest, expected: &Option<TokenDigest>) -> bool {
    expected.as_ref().is_some_and(|e| bool::from(presented.ct_eq(e)))
}

/// The configured tokens, as digests.
#[derive(Clone)]
pub struct Authenticator {
    admin: Option<TokenDigest>,
    invoke: Option<TokenDigest>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("admin_token_set", &self.admin.is_some())
            .field("invoke_token_set", &self.invoke.is_some())
            .finish()
    }
}

impl Authenticator {
    pub fn new(cfg: &ApiConfig) -> Self {
        let d = |t: &Option<Secret>| t.as_ref().map(|s| digest(s.expose()));
        Self { admin: d(&cfg.admin_token), invoke: d(&cfg.invoke_token) }
    }

    /// No token is configured: every RPC is open.
    pub fn is_open(&self) -> bool {
        self.admin.is_none() && self.invoke.is_none()
    }

    /// Checks the `authorization` metadata of a call to `rpc`.
    ///
    /// Admin RPCs need the admin token when it is set; when only the invoke
    /// token is set they need that, so they are never less protected than
    /// Invoke. Invoke-level RPCs need the invoke or the admin token when the
    /// invoke token is set, and are open otherwise.
    pub fn check(&self, rpc: Rpc, metadata: &MetadataMap) -> Result<(), AuthError> {
        let (token, accepted): (&'static str, [&Option<TokenDigest>; 2]) = match rpc.access() {
            Access::Admin if self.admin.is_some() => ("admin", [&self.admin, &None]),
            Access::Admin if self.invoke.is_some() => ("invoke", [&self.invoke, &None]),
            Access::Invoke if self.invoke.is_some() => ("invoke", [&self.invoke, &self.admin]),
            _ => return Ok(()),
        };
        let rpc = rpc.name();
        let value = metadata.get("authorization").ok_or(AuthError::Missing { rpc, token })?;
        let presented = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Malformed { rpc, token })?;
        let presented = digest(presented);
        // Evaluate both comparisons, so timing does not tell which token matched.
        let ok = accepted.iter().fold(false, |ok, expected| matches(&presented, expected) | ok);
        if ok { Ok(()) } else { Err(AuthError::Wrong { rpc, token }) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(admin: Option<&str>, invoke: Option<&str>) -> Authenticator {
        let cfg = ApiConfig {
            admin_token: admin.map(Secret::new),
            invoke_token: invoke.map(Secret::new),
            ..ApiConfig::default()
        };
        Authenticator::new(&cfg)
    }

    fn md(value: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(v) = value {
            m.insert("authorization", v.parse().unwrap());
        }
        m
    }

    const ALL: [Rpc; 12] = [
        Rpc::Deploy,
        Rpc::Rollback,
        Rpc::Promote,
        Rpc::GetState,
        Rpc::ListDeadLetters,
        Rpc::Status,
        Rpc::ListTypes,
        Rpc::Invoke,
        Rpc::ListEntities,
        Rpc::StreamLogs,
        Rpc::Drain,
        Rpc::Metrics,
    ];

    #[test]
    fn no_tokens_means_everything_is_open() {
        let a = auth(None, None);
        for rpc in ALL {
            a.check(rpc, &md(None)).unwrap();
            a.check(rpc, &md(Some("Bearer whatever"))).unwrap();
        }
    }

    #[test]
    fn admin_token_guards_admin_rpcs_only() {
        let a = auth(Some("s3cret-admin"), None);
        for rpc in ALL.into_iter().filter(|r| r.access() == Access::Admin) {
            assert_eq!(a.check(rpc, &md(None)), Err(AuthError::Missing { rpc: rpc.name(), token: "admin" }));
            assert!(matches!(a.check(rpc, &md(Some("Bearer nope"))), Err(AuthError::Wrong { .. })));
            assert!(matches!(a.check(rpc, &md(Some("Basic s3cret-admin"))), Err(AuthError::Malformed { .. })));
            assert!(matches!(a.check(rpc, &md(Some("Bearer s3cret-admi"))), Err(AuthError::Wrong { .. })));
            a.check(rpc, &md(Some("Bearer s3cret-admin"))).unwrap();
        }
        a.check(Rpc::Invoke, &md(None)).unwrap();
        a.check(Rpc::ListTypes, &md(None)).unwrap();
    }

    #[test]
    fn invoke_token_guards_invoke_and_accepts_admin() {
        let a = auth(Some("adm"), Some("inv"));
        for rpc in [Rpc::Invoke, Rpc::ListTypes] {
            assert!(matches!(a.check(rpc, &md(None)), Err(AuthError::Missing { token: "invoke", .. })));
            assert!(matches!(a.check(rpc, &md(Some("Bearer x"))), Err(AuthError::Wrong { .. })));
            a.check(rpc, &md(Some("Bearer inv"))).unwrap();
            a.check(rpc, &md(Some("Bearer adm"))).unwrap();
        }
        // The invoke token does not open admin RPCs.
        assert!(matches!(a.check(Rpc::Deploy, &md(Some("Bearer inv"))), Err(AuthError::Wrong { .. })));
    }

    #[test]
    fn with_only_an_invoke_token_admin_rpcs_need_it_too() {
        let a = auth(None, Some("inv"));
        assert!(matches!(a.check(Rpc::Deploy, &md(None)), Err(AuthError::Missing { token: "invoke", .. })));
        a.check(Rpc::Status, &md(Some("Bearer inv"))).unwrap();
    }

    #[test]
    fn messages_and_debug_never_contain_the_token() {
        let a = auth(Some("topsecret"), Some("alsosecret"));
        let e = a.check(Rpc::Deploy, &md(Some("Bearer topsecreX"))).unwrap_err();
        assert!(e.to_string().contains("Deploy needs the admin token"), "{e}");
        assert!(!e.to_string().contains("topsecre"), "{e}");
        let dbg = format!("{a:?}");
        assert!(!dbg.contains("secret"), "{dbg}");
    }
}
