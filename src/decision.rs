//! The access decision: request facts + configuration + time → allow or deny.
//!
//! Order: CORS preflight, then route, then the key (authentication, 401), then the
//! key's state and permissions (403). A request without a valid key never sees a 403.

use crate::config::{Config, Key, KeyStatus, Route};
use crate::credentials::{self, Credential, Header};
use crate::keys;

/// The facts of a request the decision needs.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// `:method`.
    pub method: &'a str,
    /// `:path`, query string included.
    pub path: &'a str,
    /// Every request header, duplicates included.
    pub headers: &'a [Header],
}

/// Why a request is refused; each has one status, code and message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No key in any source.
    MissingApiKey,
    /// Unknown, malformed or ambiguous key.
    InvalidApiKey,
    /// Key revoked.
    KeyRevoked,
    /// Key past its expiry.
    KeyExpired,
    /// Key suspended.
    KeySuspended,
    /// Role, scope or method not allowed on the route.
    InsufficientPermissions,
    /// X-Tenant-ID differs from the key's tenant.
    TenantMismatch,
}

impl Reason {
    /// HTTP status sent.
    pub fn status(self) -> u32 {
        match self {
            Reason::MissingApiKey
            | Reason::InvalidApiKey
            | Reason::KeyRevoked
            | Reason::KeyExpired => 401,
            Reason::KeySuspended | Reason::InsufficientPermissions | Reason::TenantMismatch => 403,
        }
    }

    /// Machine-readable code, the `error` of the body.
    pub fn code(self) -> &'static str {
        match self {
            Reason::MissingApiKey => "missing_api_key",
            Reason::InvalidApiKey => "invalid_api_key",
            Reason::KeyRevoked => "key_revoked",
            Reason::KeyExpired => "key_expired",
            Reason::KeySuspended => "key_suspended",
            Reason::InsufficientPermissions => "insufficient_permissions",
            Reason::TenantMismatch => "tenant_mismatch",
        }
    }

    /// Human-readable text, the `message` of the body.
    pub fn message(self) -> &'static str {
        match self {
            Reason::MissingApiKey => "API key required",
            Reason::InvalidApiKey => "Invalid API key",
            Reason::KeyRevoked => "API key has been revoked",
            Reason::KeyExpired => "API key has expired",
            Reason::KeySuspended => "API key is suspended",
            Reason::InsufficientPermissions => "API key lacks permission for this route",
            Reason::TenantMismatch => "API key does not belong to this tenant",
        }
    }

    /// The JSON response body, `{"error": CODE, "message": TEXT}`.
    pub fn body(self) -> String {
        // Codes and messages are fixed ASCII without quotes, so no escaping is needed;
        // a test parses every body to keep it that way.
        format!(
            "{{\"error\":\"{}\",\"message\":\"{}\"}}",
            self.code(),
            self.message()
        )
    }
}

/// Who a denial is about, for the log line: never the whole key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject<'c> {
    /// No key was sent.
    Nobody,
    /// A configured key, by id.
    Key(&'c str),
    /// An unknown or malformed key: its first 8 characters, sanitised.
    Unknown(String),
}

/// A refused request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial<'c> {
    /// Why.
    pub reason: Reason,
    /// About whom.
    pub subject: Subject<'c>,
}

/// An admitted request and what to change before it goes upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission<'c> {
    /// The verified key, if one was sent (none on public routes or preflights without one).
    pub key: Option<&'c Key>,
    /// Request headers to remove: client-sent `x-keygate-*`, and the key's carriers
    /// when `strip_credentials` is on.
    pub remove: Vec<String>,
}

impl Admission<'_> {
    /// Identity headers to set upstream, after the removals.
    pub fn identity_headers(&self) -> Vec<(&'static str, &str)> {
        let Some(key) = self.key else {
            return Vec::new();
        };
        let mut out = vec![
            ("x-keygate-key-id", key.id.as_str()),
            ("x-keygate-role", key.role.as_str()),
        ];
        if let Some(client) = &key.client {
            out.push(("x-keygate-client", client));
        }
        if !key.scopes_header.is_empty() {
            out.push(("x-keygate-scopes", &key.scopes_header));
        }
        if let Some(tenant) = &key.tenant {
            out.push(("x-tenant-id", tenant));
        }
        out
    }
}

/// The outcome for one request.
pub type Decision<'c> = Result<Admission<'c>, Denial<'c>>;

/// Prefix of the headers keygate sets; client-sent ones are always removed.
pub const IDENTITY_PREFIX: &str = "x-keygate-";

/// Decides a request at `now` (Unix seconds).
pub fn decide<'c>(config: &'c Config, req: &Request<'_>, now: i64) -> Decision<'c> {
    let mut remove: Vec<String> = req
        .headers
        .iter()
        .filter(|(name, _)| starts_with_ignore_case(name, IDENTITY_PREFIX))
        .map(|(name, _)| name.to_ascii_lowercase())
        .collect();
    remove.sort();
    remove.dedup();

    if config.allow_cors_preflight && is_cors_preflight(req) {
        return Ok(Admission { key: None, remove });
    }

    let route = config.route_for(req.path);
    let public = route.is_some_and(|r| r.public);
    let (key, carriers) = match credentials::extract(&config.key_sources, req.headers) {
        Credential::Missing if public => return Ok(Admission { key: None, remove }),
        Credential::Missing => return deny(Reason::MissingApiKey, Subject::Nobody),
        Credential::Conflicting { first } => {
            return deny(
                Reason::InvalidApiKey,
                Subject::Unknown(keys::log_prefix(first)),
            )
        }
        Credential::Found { key, carriers } => (key, carriers),
    };
    let entry = match keys::well_formed(key)
        .then(|| config.index.find(key))
        .flatten()
    {
        Some(i) => config.keys.get(i),
        None => None,
    };
    let Some(entry) = entry else {
        return deny(
            Reason::InvalidApiKey,
            Subject::Unknown(keys::log_prefix(key)),
        );
    };
    let who = Subject::Key(entry.id.as_str());
    if entry.status == KeyStatus::Revoked {
        return deny(Reason::KeyRevoked, who);
    }
    if entry.expires_at.is_some_and(|t| now >= t) {
        return deny(Reason::KeyExpired, who);
    }
    if entry.status == KeyStatus::Suspended {
        return deny(Reason::KeySuspended, who);
    }
    if !tenant_matches(entry, req.headers) {
        return deny(Reason::TenantMismatch, who);
    }
    if let Some(route) = route {
        if !permitted(route, entry, req.method) {
            return deny(Reason::InsufficientPermissions, who);
        }
    }
    if config.strip_credentials {
        for carrier in carriers {
            let carrier = carrier.to_ascii_lowercase();
            if !remove.contains(&carrier) {
                remove.push(carrier);
            }
        }
    }
    Ok(Admission {
        key: Some(entry),
        remove,
    })
}

fn deny<'c>(reason: Reason, subject: Subject<'c>) -> Decision<'c> {
    Err(Denial { reason, subject })
}

fn starts_with_ignore_case(s: &str, prefix: &str) -> bool {
    s.len() >= prefix.len() && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

fn header<'h>(headers: &'h [Header], name: &'h str) -> impl Iterator<Item = &'h [u8]> + 'h {
    headers
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

fn is_cors_preflight(req: &Request<'_>) -> bool {
    req.method == "OPTIONS"
        && header(req.headers, "origin").next().is_some()
        && header(req.headers, "access-control-request-method")
            .next()
            .is_some()
}

/// A key with a tenant only serves requests that name no other tenant. A key without a
/// tenant is not bound to one: the client's X-Tenant-ID, if any, is passed on as sent.
fn tenant_matches(key: &Key, headers: &[Header]) -> bool {
    let Some(tenant) = &key.tenant else {
        return true;
    };
    header(headers, "x-tenant-id").all(|v| v.trim_ascii() == tenant.as_bytes())
}

fn permitted(route: &Route, key: &Key, method: &str) -> bool {
    (route.methods.is_empty() || route.methods.iter().any(|m| m == method))
        && (route.roles.is_empty() || route.roles.contains(&key.role))
        && route.scopes.iter().all(|s| key.scopes.contains(s))
}

#[cfg(test)]
mod tests;
