//! `keygate verify`, offline: why a key is refused, and what the filter would answer a
//! request, from the filter's own decision code ([`decision::decide`]) on the store's
//! rendering, with an in-memory rate-limit store and the time passed in.

use crate::config::Config;
use crate::decision::{self, Reason, Request};
use crate::ip::Peer;
use crate::keys;
use crate::ratelimit::{Leases, MemoryStore};
use std::net::IpAddr;

/// Why a key that is refused whatever the request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Not a key at all: too short, too long, or control characters.
    Malformed,
    /// Claims the policy's key prefix, but its checksum does not hold (mistyped, cut).
    BadChecksum,
    /// Well formed, but no key in the store has its hash.
    Unknown,
    /// Revoked.
    Revoked,
    /// Past its expiry.
    Expired,
    /// Suspended.
    Suspended,
}

impl Cause {
    /// The word in `--json` (`cause`).
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Malformed => "malformed",
            Cause::BadChecksum => "bad_checksum",
            Cause::Unknown => "unknown",
            Cause::Revoked => "revoked",
            Cause::Expired => "expired",
            Cause::Suspended => "suspended",
        }
    }

    /// A sentence.
    pub fn text(self, config: &Config) -> String {
        match self {
            Cause::Malformed => format!(
                "not a key: keys are {} to {} characters without control characters",
                keys::MIN_KEY_CHARS,
                keys::MAX_KEY_CHARS
            ),
            Cause::BadChecksum => format!(
                "bad checksum: it has the {:?} prefix but its checksum does not hold (mistyped or cut short?)",
                config.checksum_prefix.as_deref().unwrap_or_default()
            ),
            Cause::Unknown => "unknown: no key in the store has its hash".into(),
            Cause::Revoked => "revoked".into(),
            Cause::Expired => "expired".into(),
            Cause::Suspended => "suspended".into(),
        }
    }
}

/// Why the filter refuses `key` whatever the request (`reason` from
/// [`decision::identify`]).
pub fn cause(config: &Config, key: &[u8], reason: Reason) -> Cause {
    match reason {
        Reason::KeyRevoked => Cause::Revoked,
        Reason::KeyExpired => Cause::Expired,
        Reason::KeySuspended => Cause::Suspended,
        _ if !keys::well_formed(key) => Cause::Malformed,
        _ if config
            .checksum_prefix
            .as_deref()
            .is_some_and(|p| keys::checksum_holds(p, key) == Some(false)) =>
        {
            Cause::BadChecksum
        }
        _ => Cause::Unknown,
    }
}

/// What the filter would answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status: 200 when the request goes upstream.
    pub status: u32,
    /// The refusal's code and message; `None` when admitted.
    pub refusal: Option<(&'static str, &'static str)>,
    /// The failed requirement (a 403's `role`, `scope`, `method`, ...), if any.
    pub requirement: Option<&'static str>,
    /// What exactly was wrong, if the filter says.
    pub detail: Option<&'static str>,
    /// The identity headers forwarded upstream (admitted requests).
    pub headers: Vec<(String, String)>,
}

/// The filter's answer to `method path` carrying `key` in the first key source the
/// policy names (with its scheme), from `client_ip` when given, at `now` (Unix seconds),
/// with a full rate-limit budget. The one place `keygate` calls the decision.
pub fn answer(
    config: &Config,
    key: &[u8],
    method: &str,
    path: &str,
    client_ip: Option<IpAddr>,
    now: i64,
) -> Answer {
    let mut value: Vec<u8> = Vec::new();
    let header = config
        .key_sources
        .first()
        .map_or("x-api-key", |s| s.header.as_str());
    if let Some(scheme) = config.key_sources.first().and_then(|s| s.scheme.as_deref()) {
        value.extend_from_slice(scheme.as_bytes());
        value.push(b' ');
    }
    value.extend_from_slice(key);
    let headers = [(header, value.as_slice())];
    let req = Request {
        method: method.as_bytes(),
        path: path.as_bytes(),
        headers: &headers,
        peer: client_ip.map_or(Peer::Unknown, Peer::Connection),
    };
    let now_ns = u64::try_from(now)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000);
    let limits = MemoryStore::default();
    let mut leases = Leases::default();
    match decision::decide(config, &req, now_ns, &limits, &mut leases) {
        Ok(admission) => Answer {
            status: 200,
            refusal: None,
            requirement: None,
            detail: None,
            headers: admission
                .identity_headers()
                .into_iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        },
        Err(denial) => Answer {
            status: denial.reason.status(),
            refusal: Some((denial.reason.code(), denial.reason.message())),
            requirement: denial.requirement.map(|r| r.as_str()),
            detail: denial.detail,
            headers: Vec::new(),
        },
    }
}
