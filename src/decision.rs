//! The access decision: request facts + configuration + time → allow or deny.
//!
//! Order: client IP rules (403), CORS preflight, the failed-authentication limit (429),
//! the key (authentication, 401), then the key's state, address and permissions (403),
//! and last the key's rate limit (429). A request without a valid key never sees a 403
//! about its key, and a refused request never takes from the key's quota.

use crate::config::{self, Config, HeaderStyle, Key, KeyRef, KeyStatus, Limit, PlanLimits, Route};
use crate::credentials::{self, Credential, Header};
use crate::failedauth;
use crate::ip::{self, Peer};
use crate::keys;
use crate::path;
use crate::ratelimit::{self, Leases, LimitError, Rate, Store, Verdict};
use std::borrow::Cow;
use std::net::IpAddr;

/// The facts of a request the decision needs.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// `:method`, as sent (empty when missing).
    pub method: &'a [u8],
    /// `:path`, query string included, as sent (empty when missing).
    pub path: &'a [u8],
    /// Every request header, duplicates included.
    pub headers: &'a [Header<'a>],
    /// The peer address Envoy reports (`source.address`), when a rule needs it.
    pub peer: Peer,
}

/// Why a request is refused; each has one status, code and message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// `:method`, `:path` or a header name keygate cannot read.
    InvalidRequest,
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
    /// Client address refused by `ip_rules` or the key's `allowed_ips`.
    IpNotAllowed,
    /// A rule needs the client address and it is unknown (or came from the request).
    ClientAddressUnknown,
    /// The key's bucket is empty.
    RateLimited,
    /// Too many 401s from this client address.
    TooManyFailedAttempts,
}

impl Reason {
    /// Every reason, in declaration order (`reason as usize` is its position).
    pub const ALL: [Reason; 12] = [
        Reason::InvalidRequest,
        Reason::MissingApiKey,
        Reason::InvalidApiKey,
        Reason::KeyRevoked,
        Reason::KeyExpired,
        Reason::KeySuspended,
        Reason::InsufficientPermissions,
        Reason::TenantMismatch,
        Reason::IpNotAllowed,
        Reason::ClientAddressUnknown,
        Reason::RateLimited,
        Reason::TooManyFailedAttempts,
    ];

    /// HTTP status sent.
    pub fn status(self) -> u32 {
        match self {
            Reason::InvalidRequest => 400,
            Reason::MissingApiKey
            | Reason::InvalidApiKey
            | Reason::KeyRevoked
            | Reason::KeyExpired => 401,
            Reason::KeySuspended
            | Reason::InsufficientPermissions
            | Reason::TenantMismatch
            | Reason::IpNotAllowed
            | Reason::ClientAddressUnknown => 403,
            Reason::RateLimited | Reason::TooManyFailedAttempts => 429,
        }
    }

    /// Machine-readable code, the `error` of the body.
    pub fn code(self) -> &'static str {
        match self {
            Reason::InvalidRequest => "invalid_request",
            Reason::MissingApiKey => "missing_api_key",
            Reason::InvalidApiKey => "invalid_api_key",
            Reason::KeyRevoked => "key_revoked",
            Reason::KeyExpired => "key_expired",
            Reason::KeySuspended => "key_suspended",
            Reason::InsufficientPermissions => "insufficient_permissions",
            Reason::TenantMismatch => "tenant_mismatch",
            Reason::IpNotAllowed => "ip_not_allowed",
            Reason::ClientAddressUnknown => "client_address_unknown",
            Reason::RateLimited => "rate_limited",
            Reason::TooManyFailedAttempts => "too_many_failed_attempts",
        }
    }

    /// Human-readable text, the `message` of the body.
    pub fn message(self) -> &'static str {
        match self {
            Reason::InvalidRequest => "Request could not be parsed",
            Reason::MissingApiKey => "API key required",
            Reason::InvalidApiKey => "Invalid API key",
            Reason::KeyRevoked => "API key has been revoked",
            Reason::KeyExpired => "API key has expired",
            Reason::KeySuspended => "API key is suspended",
            Reason::InsufficientPermissions => "API key lacks permission for this route",
            Reason::TenantMismatch => "API key does not belong to this tenant",
            Reason::IpNotAllowed => "Access denied from this IP address",
            Reason::ClientAddressUnknown => "Client address could not be determined",
            Reason::RateLimited => "Rate limit exceeded",
            Reason::TooManyFailedAttempts => "Too many failed authentication attempts",
        }
    }

    /// The JSON response body, `{"error": CODE, "message": TEXT}`.
    pub fn body(self) -> String {
        // Codes and messages are fixed ASCII without quotes, so no escaping is needed;
        // a test parses every body to keep it that way. Built by hand: every refusal
        // makes one, and the formatting machinery costs more than the copy.
        let (code, message) = (self.code(), self.message());
        let mut body = String::with_capacity(code.len() + message.len() + 26);
        body.push_str("{\"error\":\"");
        body.push_str(code);
        body.push_str("\",\"message\":\"");
        body.push_str(message);
        body.push_str("\"}");
        body
    }
}

/// The requirement a refused request failed, for the log line (403s, and
/// `client_address_unknown`: the rule that needed the address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement {
    /// The route's `roles`.
    Role,
    /// The route's `scopes`.
    Scope,
    /// The route's `methods`.
    Method,
    /// The key's tenant against X-Tenant-ID.
    Tenant,
    /// The configuration's `ip_rules`.
    IpRules,
    /// The key's `allowed_ips`.
    AllowedIps,
    /// The `failed_auth_limit`, which counts per client address.
    FailedAuthLimit,
}

impl Requirement {
    /// The name in log lines: the configuration field it comes from.
    pub fn as_str(self) -> &'static str {
        match self {
            Requirement::Role => "role",
            Requirement::Scope => "scope",
            Requirement::Method => "method",
            Requirement::Tenant => "tenant",
            Requirement::IpRules => "ip_rules",
            Requirement::AllowedIps => "allowed_ips",
            Requirement::FailedAuthLimit => "failed_auth_limit",
        }
    }
}

/// Who a denial is about, for the log line: never the whole key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject<'c> {
    /// No key was sent.
    Nobody,
    /// A configured key, by id.
    Key(Cow<'c, str>),
    /// An unknown or malformed key: its first 8 characters, sanitised.
    Unknown(String),
}

/// A key's quota after a request, for the X-RateLimit-* headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// The plan's requests per period.
    pub limit: u64,
    /// Whole tokens left.
    pub remaining: u64,
    /// Seconds until the bucket is full.
    pub reset_s: u64,
}

impl Quota {
    fn of(limit: u64, v: &Verdict) -> Quota {
        Quota {
            limit,
            remaining: v.remaining,
            reset_s: v.reset_s,
        }
    }
}

/// Response headers keygate adds about a key's quota: `(name, value)`, names lowercase.
pub type QuotaHeaders = Vec<(&'static str, String)>;

/// Which of a plan's buckets the X-RateLimit-* headers report: on a refusal, the bucket
/// whose wait is longest (the one `Retry-After` is about); else the one closest to running
/// out, with the smallest share of its capacity left (`remaining / burst`; the first such
/// in plan order on a tie).
pub fn shown_limit(rates: &[Rate], verdicts: &[Verdict]) -> usize {
    let mut refusing: Option<(usize, u64)> = None;
    for (i, v) in verdicts.iter().enumerate() {
        if !v.admitted && refusing.is_none_or(|(_, wait)| v.retry_after_s > wait) {
            refusing = Some((i, v.retry_after_s));
        }
    }
    if let Some((i, _)) = refusing {
        return i;
    }
    let mut best = 0;
    for (i, (rate, v)) in rates.iter().zip(verdicts).enumerate() {
        let (br, bv) = (&rates[best], &verdicts[best]);
        // remaining_i / burst_i < remaining_best / burst_best, without division.
        if u128::from(v.remaining) * u128::from(br.burst)
            < u128::from(bv.remaining) * u128::from(rate.burst)
        {
            best = i;
        }
    }
    best
}

/// The X-RateLimit-* headers of a quota.
pub fn x_ratelimit_headers(q: &Quota) -> QuotaHeaders {
    vec![
        ("x-ratelimit-limit", q.limit.to_string()),
        ("x-ratelimit-remaining", q.remaining.to_string()),
        ("x-ratelimit-reset", q.reset_s.to_string()),
    ]
}

/// The IETF headers of draft-ietf-httpapi-ratelimit-headers-11 (sections 3 and 4), one
/// item per rate of the plan, named `"<plan>/<per>"`:
///
/// - `RateLimit-Policy: "pro/minute";q=60;w=60, "pro/day";q=1000;w=86400` (the plan, fixed;
///   `;keygate-burst=N` when the bucket holds other than `q`);
/// - `RateLimit: "pro/minute";r=59;t=1, "pro/day";r=999;t=87`: `r`, the whole tokens left;
///   `t`, the seconds until that bucket is full again, except for a bucket that refused
///   the request, whose `t` is the seconds until it holds a token (so that no `t` of a
///   refusing policy ends after `Retry-After`).
pub fn ietf_headers(limits: &PlanLimits, verdicts: &[Verdict]) -> QuotaHeaders {
    let items: Vec<String> = limits
        .policy_names
        .iter()
        .zip(verdicts)
        .map(|(name, v)| {
            let t = if v.admitted {
                v.reset_s
            } else {
                v.retry_after_s
            };
            format!("{name};r={};t={t}", v.remaining)
        })
        .collect();
    vec![
        ("ratelimit-policy", limits.policy_header.clone()),
        ("ratelimit", items.join(", ")),
    ]
}

/// The headers `style` asks for, about the buckets of `limit` after a request.
fn quota_headers(style: HeaderStyle, limit: &Limit, verdicts: &[Verdict]) -> QuotaHeaders {
    match style {
        HeaderStyle::Off => Vec::new(),
        HeaderStyle::XRateLimit => {
            let i = shown_limit(limit.rates(), verdicts);
            match (limit.rates().get(i), verdicts.get(i)) {
                (Some(rate), Some(v)) => x_ratelimit_headers(&Quota::of(rate.requests, v)),
                _ => Vec::new(),
            }
        }
        HeaderStyle::Ietf => ietf_headers(&limit.limits, verdicts),
    }
}

/// A refused request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial<'c> {
    /// Why.
    pub reason: Reason,
    /// About whom.
    pub subject: Subject<'c>,
    /// Seconds to send in Retry-After (429s).
    pub retry_after_s: Option<u64>,
    /// The key's quota (429 rate_limited): the limit X-RateLimit-* report.
    pub quota: Option<Quota>,
    /// The rate-limit headers to send (429 rate_limited), in the configured style.
    pub quota_headers: QuotaHeaders,
    /// The limiter could not be consulted (contention or a host failure): refused to stay
    /// within the limit, and counted separately.
    pub limiter_failure: Option<LimitError>,
    /// The client address, when it was needed.
    pub client_ip: Option<IpAddr>,
    /// What exactly was wrong, for the log line (never anything the client sent).
    pub detail: Option<&'static str>,
    /// Why the client address is unknown (client_address_unknown).
    pub unknown_address: Option<ip::Unknown>,
    /// The requirement that failed (403s; client_address_unknown: the rule that needed it).
    pub requirement: Option<Requirement>,
    /// The rule the request is counted under (see `Matched::label_rule`); `None` when no
    /// rule covers the path or it could not be read.
    pub route: Option<&'c Route>,
}

impl<'c> Denial<'c> {
    /// A denial with nothing but its reason and subject.
    pub fn new(reason: Reason, subject: Subject<'c>) -> Denial<'c> {
        Denial {
            reason,
            subject,
            retry_after_s: None,
            quota: None,
            quota_headers: Vec::new(),
            limiter_failure: None,
            client_ip: None,
            detail: None,
            unknown_address: None,
            requirement: None,
            route: None,
        }
    }

    /// The key id the denial is about, when the key is a configured one (never the key).
    pub fn key_id(&self) -> Option<&str> {
        match &self.subject {
            Subject::Key(id) => Some(id),
            Subject::Nobody | Subject::Unknown(_) => None,
        }
    }

    /// Whether the request authenticated as a configured key before it was refused (every
    /// refusal about a key but revoked and expired ones).
    pub fn authenticated(&self) -> bool {
        self.key_id().is_some() && !matches!(self.reason, Reason::KeyRevoked | Reason::KeyExpired)
    }

    /// The log line of the refusal of a request with this `method` and `path` (as sent):
    ///
    /// `keygate: denied STATUS CODE[ (REQUIREMENT[: WHY])] METHOD PATH[ key_id=ID |
    /// key_prefix="PREFIX"][ client_ip=IP][ (N earlier denials not logged: over R a second)]`
    ///
    /// The path without its query string, at most [`LOG_PATH_CHARS`] characters, bytes
    /// outside visible ASCII as `?` (see [`log_path`]); an unknown key by its first 8
    /// characters only; never the key. `skipped` is the number of denials left unlogged
    /// since the last line, over the budget of `per_second` lines a second.
    pub fn log_line(&self, method: &[u8], path: &[u8], skipped: u64, per_second: u32) -> String {
        let who = match &self.subject {
            Subject::Nobody => String::new(),
            Subject::Key(id) => format!(" key_id={id}"),
            Subject::Unknown(prefix) => format!(" key_prefix={prefix:?}"),
        };
        let skipped = match skipped {
            0 => String::new(),
            n => format!(" ({n} earlier denials not logged: over {per_second} a second)"),
        };
        let why = self
            .detail
            .or_else(|| self.unknown_address.map(unknown_text));
        let detail = match (self.requirement, why) {
            (Some(r), Some(why)) => format!(" ({}: {why})", r.as_str()),
            (Some(r), None) => format!(" ({})", r.as_str()),
            (None, Some(why)) => format!(" ({why})"),
            (None, None) => String::new(),
        };
        let client = self
            .client_ip
            .map(|ip| format!(" client_ip={ip}"))
            .unwrap_or_default();
        format!(
            "keygate: denied {} {}{detail} {} {}{who}{client}{skipped}",
            self.reason.status(),
            self.reason.code(),
            log_method(method),
            log_path(path),
        )
    }
}

/// Why the client address is unknown, for the log line.
fn unknown_text(why: ip::Unknown) -> &'static str {
    match why {
        ip::Unknown::NoPeer => "Envoy reported no client address",
        ip::Unknown::FromRequest => {
            "Envoy took the client address from X-Forwarded-For: set use_remote_address: true"
        }
        ip::Unknown::MalformedForwardedFor => {
            "the X-Forwarded-For entry that decides is not an address"
        }
    }
}

/// An admitted request and what to change before it goes upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission<'c> {
    /// The verified key, if one was sent (none on public routes or preflights without one).
    pub key: Option<KeyRef<'c>>,
    /// Request headers to remove: client-sent `x-keygate-*`, and the key's carriers
    /// when `strip_credentials` is on.
    pub remove: Vec<String>,
    /// The key's quota, when it has a plan and headers are on: the limit X-RateLimit-*
    /// report.
    pub quota: Option<Quota>,
    /// The rate-limit headers to add to the response, in the configured style.
    pub quota_headers: QuotaHeaders,
    /// The rule the request is counted under (see `Matched::label_rule`).
    pub route: Option<&'c Route>,
    /// With a shared limit (`shared_rate_limit`): the id of the key whose quota the request
    /// spends, forwarded as `x-keygate-quota-id` for the rate-limit descriptor: the key's
    /// own id, or for a key that `shares_quota_with` another, that key's id.
    pub quota_id: Option<Cow<'c, str>>,
}

/// Request header naming whose quota a request spends, for a shared limit.
pub const QUOTA_ID_HEADER: &str = "x-keygate-quota-id";

impl Admission<'_> {
    /// Identity headers to set upstream, after the removals.
    pub fn identity_headers(&self) -> Vec<(&'static str, &str)> {
        let Some(found) = &self.key else {
            return Vec::new();
        };
        let key = found.key;
        // At most seven headers: one allocation, never a regrowth.
        let mut out = Vec::with_capacity(7);
        out.push(("x-keygate-key-id", found.id.as_ref()));
        out.push(("x-keygate-role", key.role.as_str()));
        if let Some(client) = &key.client {
            out.push(("x-keygate-client", client));
        }
        if !key.scopes_header.is_empty() {
            out.push(("x-keygate-scopes", &key.scopes_header));
        }
        // The plan, for a shared limit: Envoy's ratelimit filter reads it with the key id
        // (or, where the quota id is sent, with that).
        if let Some(limit) = &key.limit {
            out.push(("x-keygate-plan", &limit.plan));
        }
        if let Some(quota_id) = &self.quota_id {
            out.push((QUOTA_ID_HEADER, quota_id));
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

/// Decides a request at `now_ns` (host time, nanoseconds since the Unix epoch), taking
/// from the key's bucket in `store` (through this worker's `leases`) when the request is
/// admitted.
// A denial (128 bytes) is made once per refused request and moved to the caller; boxing it
// would add an allocation to every refusal, and refusals should be the cheapest traffic.
#[allow(clippy::result_large_err)]
pub fn decide<'c, S: Store + ?Sized>(
    config: &'c Config,
    req: &Request<'_>,
    now_ns: u64,
    store: &S,
    leases: &mut Leases,
) -> Decision<'c> {
    let now_s = i64::try_from(now_ns / 1_000_000_000).unwrap_or(i64::MAX);
    let unreadable = |detail: &'static str| Denial {
        detail: Some(detail),
        ..Denial::new(Reason::InvalidRequest, Subject::Nobody)
    };

    // What keygate cannot read is refused, never matched as something else.
    let method = match std::str::from_utf8(req.method) {
        Ok(m) if path::is_method_token(req.method) => m,
        _ => return Err(unreadable(":method is not an HTTP token")),
    };
    let forms = match path::forms(req.path) {
        Ok(forms) => forms,
        Err(path::PathError::NotOriginForm) => {
            return Err(unreadable(":path does not start with /"))
        }
        Err(path::PathError::ForbiddenByte(_)) => {
            return Err(unreadable(
                ":path holds a byte outside visible ASCII, or a fragment",
            ))
        }
        Err(path::PathError::EncodedControl(_)) => {
            return Err(unreadable(":path encodes a control character"))
        }
        Err(path::PathError::DoubleEncoded) => {
            return Err(unreadable(":path is percent-encoded twice"))
        }
    };

    // The rules are chosen before anything else refuses, so that every refusal after this
    // point is counted under its route.
    let rules = config.rules_for(&forms);
    let route = rules.label_rule();
    let deny = |reason: Reason, subject: Subject<'c>, client_ip: Option<IpAddr>| Denial {
        client_ip,
        route,
        ..Denial::new(reason, subject)
    };
    let unknown_address = |why: ip::Unknown, needed_by: Requirement| Denial {
        unknown_address: Some(why),
        requirement: Some(needed_by),
        ..deny(Reason::ClientAddressUnknown, Subject::Nobody, None)
    };

    let mut remove = spoofed_identity(req.headers);

    // The client address is read only when a rule needs it; a rule that needs it and
    // finds it unknown refuses (see each use below).
    let client = if config.needs_client_ip {
        let xff: Vec<&[u8]> = header(req.headers, "x-forwarded-for").collect();
        ip::client_address(req.peer, &xff, &config.trusted_proxies)
    } else {
        Err(ip::Unknown::NoPeer)
    };
    let client_ip = client.ok();
    if !config.allow_ips.is_empty() || !config.deny_ips.is_empty() {
        let ip = client.map_err(|why| unknown_address(why, Requirement::IpRules))?;
        if config.deny_ips.contains(ip)
            || (!config.allow_ips.is_empty() && !config.allow_ips.contains(ip))
        {
            return Err(Denial {
                requirement: Some(Requirement::IpRules),
                ..deny(Reason::IpNotAllowed, Subject::Nobody, client_ip)
            });
        }
    }

    if config.allow_cors_preflight && is_cors_preflight(method, req.headers) {
        return Ok(Admission {
            key: None,
            remove,
            quota: None,
            quota_headers: Vec::new(),
            route,
            quota_id: None,
        });
    }

    let credential = credentials::extract(&config.key_sources, req.headers);
    if rules.is_public() && credential == Credential::Missing {
        return Ok(Admission {
            key: None,
            remove,
            quota: None,
            quota_headers: Vec::new(),
            route,
            quota_id: None,
        });
    }

    let failures = match config.failed_auth_limit {
        Some(rate) => Some((
            client.map_err(|why| unknown_address(why, Requirement::FailedAuthLimit))?,
            rate,
        )),
        None => None,
    };
    if let Some((ip, rate)) = &failures {
        // An exhausted budget refuses before the key is even looked at, so guessing
        // stops; a limiter failure here fails closed like every other limiter failure.
        match failedauth::check(store, *ip, rate, now_ns) {
            Ok(v) if v.admitted => {}
            Ok(v) => {
                let mut d = deny(Reason::TooManyFailedAttempts, Subject::Nobody, client_ip);
                d.retry_after_s = Some(v.retry_after_s);
                return Err(d);
            }
            Err(e) => {
                let mut d = deny(Reason::TooManyFailedAttempts, Subject::Nobody, client_ip);
                d.retry_after_s = Some(1);
                d.limiter_failure = Some(e);
                return Err(d);
            }
        }
    }

    let authenticated = authenticate(config, credential, now_s);
    let (entry, carriers) = match authenticated {
        Ok(found) => found,
        Err((reason, subject)) => {
            if let Some((ip, rate)) = &failures {
                // Counting is best effort: the 401 stands either way.
                let _ = failedauth::record_failure(store, *ip, rate, now_ns);
            }
            return Err(deny(reason, subject, client_ip));
        }
    };

    let key = entry.key;
    let who = || Subject::Key(entry.id.clone());
    if key.status == KeyStatus::Suspended {
        return Err(deny(Reason::KeySuspended, who(), client_ip));
    }
    let failed = |reason: Reason, requirement: Requirement| Denial {
        requirement: Some(requirement),
        ..deny(reason, who(), client_ip)
    };
    if !key.allowed_ips.is_empty() {
        let ip = client.map_err(|why| Denial {
            subject: who(),
            ..unknown_address(why, Requirement::AllowedIps)
        })?;
        if !key.allowed_ips.contains(ip) {
            return Err(failed(Reason::IpNotAllowed, Requirement::AllowedIps));
        }
    }
    if !tenant_matches(key, req.headers) {
        return Err(failed(Reason::TenantMismatch, Requirement::Tenant));
    }
    // Every rule any reading of the path selects must be met.
    for rule in rules.restricting() {
        if let Some(requirement) = unmet(rule, key, method) {
            return Err(failed(Reason::InsufficientPermissions, requirement));
        }
    }

    let mut quota = None;
    let mut quota_headers = Vec::new();
    if let Some(limit) = &key.limit {
        let refuse = |d: Denial<'c>| -> Decision<'c> { Err(d) };
        match take_quota(config, limit, &entry.bucket, store, leases, now_ns) {
            Ok(Taken {
                admitted: true,
                quota: q,
                headers,
            }) => {
                quota = Some(q);
                quota_headers = headers;
            }
            Ok(Taken {
                quota: q, headers, ..
            }) => {
                let mut d = deny(Reason::RateLimited, who(), client_ip);
                d.retry_after_s = Some(q.retry_after_s);
                if config.rate_limit_headers != HeaderStyle::Off {
                    d.quota = Some(q.shown);
                    d.quota_headers = headers;
                }
                return refuse(d);
            }
            Err(e) => {
                let mut d = deny(Reason::RateLimited, who(), client_ip);
                d.retry_after_s = Some(1);
                d.limiter_failure = Some(e);
                return refuse(d);
            }
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
    let quota_id = if config.shared_rate_limit && key.limit.is_some() {
        Some(quota_id(&entry.bucket))
    } else {
        None
    };
    Ok(Admission {
        quota_id,
        key: Some(entry),
        remove,
        // With a shared limit after keygate, that limit's service reports the quota.
        quota: quota
            .map(|q| q.shown)
            .filter(|_| config.rate_limit_headers != HeaderStyle::Off && !config.shared_rate_limit),
        quota_headers: if config.shared_rate_limit {
            Vec::new()
        } else {
            quota_headers
        },
        route,
    })
}

/// The key id a bucket name belongs to (`keygate:bucket:<id>`).
fn quota_id<'c>(bucket: &Cow<'c, str>) -> Cow<'c, str> {
    match bucket {
        Cow::Borrowed(b) => Cow::Borrowed(b.strip_prefix(config::BUCKET_PREFIX).unwrap_or(b)),
        Cow::Owned(b) => Cow::Owned(
            b.strip_prefix(config::BUCKET_PREFIX)
                .unwrap_or(b)
                .to_string(),
        ),
    }
}

/// A key's quota after its request took (or failed to take) from the plan's buckets.
struct Taken {
    admitted: bool,
    quota: TakenQuota,
    headers: QuotaHeaders,
}

struct TakenQuota {
    /// The limit X-RateLimit-* report.
    shown: Quota,
    /// Seconds until every bucket admits (refused requests).
    retry_after_s: u64,
}

/// Takes a token from each of the plan's buckets (`bucket` is the key's own, or the one
/// it shares). A plan with one rate takes through this worker's leases, with no more
/// shared-data calls than before plans could have several rates; one with several takes
/// from each bucket in turn, all or none ([`ratelimit::take_each`]).
fn take_quota<S: Store + ?Sized>(
    config: &Config,
    limit: &Limit,
    bucket: &str,
    store: &S,
    leases: &mut Leases,
    now_ns: u64,
) -> Result<Taken, LimitError> {
    let style = config.rate_limit_headers;
    // With a shared limit after keygate, admitted requests get that limit's headers.
    let style_if_admitted = if config.shared_rate_limit {
        HeaderStyle::Off
    } else {
        style
    };
    let rates = limit.rates();
    if rates.len() <= 1 {
        let v = ratelimit::take_leased(store, leases, bucket, &limit.rate, now_ns)?;
        let shown = Quota::of(limit.rate.requests, &v);
        let headers = match if v.admitted { style_if_admitted } else { style } {
            HeaderStyle::Off => Vec::new(),
            HeaderStyle::XRateLimit => x_ratelimit_headers(&shown),
            HeaderStyle::Ietf => ietf_headers(&limit.limits, std::slice::from_ref(&v)),
        };
        return Ok(Taken {
            admitted: v.admitted,
            quota: TakenQuota {
                shown,
                retry_after_s: v.retry_after_s,
            },
            headers,
        });
    }
    let names: Vec<std::borrow::Cow<'_, str>> = (0..rates.len())
        .map(|i| config::bucket_name(bucket, i))
        .collect();
    let names: Vec<&str> = names.iter().map(AsRef::as_ref).collect();
    let vs = ratelimit::take_each(store, &names, rates, now_ns)?;
    let i = shown_limit(rates, &vs.each);
    let shown = match (rates.get(i), vs.each.get(i)) {
        (Some(rate), Some(v)) => Quota::of(rate.requests, v),
        _ => Quota::of(
            limit.rate.requests,
            &Verdict {
                admitted: vs.admitted,
                remaining: 0,
                retry_after_s: 1,
                reset_s: 0,
            },
        ),
    };
    Ok(Taken {
        admitted: vs.admitted,
        quota: TakenQuota {
            shown,
            retry_after_s: vs.retry_after_s().max(u64::from(!vs.admitted)),
        },
        headers: quota_headers(
            if vs.admitted {
                style_if_admitted
            } else {
                style
            },
            limit,
            &vs.each,
        ),
    })
}

/// Whether keygate answers this request itself as the readiness probe (`health_path`):
/// GET or HEAD of exactly that path, query string ignored.
pub fn is_health_check(config: &Config, method: &[u8], path: &[u8]) -> bool {
    let Some(health) = &config.health_path else {
        return false;
    };
    let path = path.split(|&b| b == b'?').next().unwrap_or(path);
    matches!(method, b"GET" | b"HEAD") && path == health.as_bytes()
}

/// Offline check of one key (for `keygate verify`): the key it is, or why it would be
/// refused regardless of route, address or quota.
pub fn identify<'c>(config: &'c Config, key: &[u8], now_s: i64) -> Result<KeyRef<'c>, Reason> {
    let credential = Credential::Found {
        key,
        carriers: Vec::new(),
    };
    match authenticate(config, credential, now_s) {
        Ok((entry, _)) if entry.key.status == KeyStatus::Suspended => Err(Reason::KeySuspended),
        Ok((entry, _)) => Ok(entry),
        Err((reason, _)) => Err(reason),
    }
}

/// The key behind the credential, or why there is none (all 401s).
#[allow(clippy::type_complexity)]
fn authenticate<'c, 'h>(
    config: &'c Config,
    credential: Credential<'h>,
    now_s: i64,
) -> Result<(KeyRef<'c>, Vec<&'h str>), (Reason, Subject<'c>)> {
    let (key, carriers) = match credential {
        Credential::Missing => return Err((Reason::MissingApiKey, Subject::Nobody)),
        Credential::Conflicting { first } => {
            return Err((
                Reason::InvalidApiKey,
                Subject::Unknown(keys::log_prefix(first)),
            ))
        }
        Credential::Found { key, carriers } => (key, carriers),
    };
    let checksum_fails = config
        .checksum_prefix
        .as_deref()
        .is_some_and(|prefix| keys::checksum_holds(prefix, key) == Some(false));
    let entry = (keys::well_formed(key) && !checksum_fails)
        .then(|| config.find_key(&keys::digest(key)))
        .flatten();
    let Some(entry) = entry else {
        return Err((
            Reason::InvalidApiKey,
            Subject::Unknown(keys::log_prefix(key)),
        ));
    };
    if entry.key.status == KeyStatus::Revoked {
        return Err((Reason::KeyRevoked, Subject::Key(entry.id)));
    }
    if entry.key.expires_at.is_some_and(|t| now_s >= t) {
        return Err((Reason::KeyExpired, Subject::Key(entry.id)));
    }
    Ok((entry, carriers))
}

/// The client-sent headers that pose as keygate's identity headers (see
/// `is_spoofed_identity`), lowercase, sorted, once each: removed before forwarding, and
/// from refused requests so that access logs never show them.
pub fn spoofed_identity(headers: &[Header<'_>]) -> Vec<String> {
    let mut out: Vec<String> = headers
        .iter()
        .filter(|(name, _)| is_spoofed_identity(name))
        .map(|(name, _)| name.to_ascii_lowercase())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A header the client may not send: `x-keygate-*`, or an identity header written with
/// underscores (`x_keygate_role`, `x_tenant_id`), which CGI-style upstreams (WSGI, Rack,
/// PHP) read as the real one because they fold `-` and `_` together.
fn is_spoofed_identity(name: &str) -> bool {
    let folded = |b: u8| {
        if b == b'_' {
            b'-'
        } else {
            b.to_ascii_lowercase()
        }
    };
    let starts = name.len() >= IDENTITY_PREFIX.len()
        && name
            .bytes()
            .zip(IDENTITY_PREFIX.bytes())
            .all(|(a, b)| folded(a) == b);
    let tenant = name.contains('_')
        && name.len() == TENANT_HEADER.len()
        && name
            .bytes()
            .zip(TENANT_HEADER.bytes())
            .all(|(a, b)| folded(a) == b);
    starts || tenant
}

/// The tenant header keygate checks and sets.
const TENANT_HEADER: &str = "x-tenant-id";

fn header<'h>(headers: &'h [Header<'h>], name: &'h str) -> impl Iterator<Item = &'h [u8]> + 'h {
    headers
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
        .map(|&(_, v)| v)
}

fn is_cors_preflight(method: &str, headers: &[Header<'_>]) -> bool {
    method == "OPTIONS"
        && header(headers, "origin").next().is_some()
        && header(headers, "access-control-request-method")
            .next()
            .is_some()
}

/// A key with a tenant only serves requests that name no other tenant. A key without a
/// tenant is not bound to one: the client's X-Tenant-ID, if any, is passed on as sent.
fn tenant_matches(key: &Key, headers: &[Header<'_>]) -> bool {
    let Some(tenant) = &key.tenant else {
        return true;
    };
    header(headers, TENANT_HEADER).all(|v| v.trim_ascii() == tenant.as_bytes())
}

/// The first of the rule's requirements the key or method does not meet (roles, then
/// scopes, then methods), or `None` when all are met.
fn unmet(route: &Route, key: &Key, method: &str) -> Option<Requirement> {
    if !route.roles.is_empty() && !route.roles.contains(&key.role) {
        Some(Requirement::Role)
    } else if !route.scopes.iter().all(|s| key.scopes.contains(s)) {
        Some(Requirement::Scope)
    } else if !route.methods.is_empty() && !route.methods.iter().any(|m| m == method) {
        Some(Requirement::Method)
    } else {
        None
    }
}

/// How a path is written in a log line: the query string (and anything after a `#`)
/// left out, bytes outside visible ASCII as `?`, and at most [`LOG_PATH_CHARS`]
/// characters (a longer path ends in `...`).
pub fn log_path(path: &[u8]) -> String {
    let end = path
        .iter()
        .position(|&b| b == b'?' || b == b'#')
        .unwrap_or(path.len());
    log_text(&path[..end], LOG_PATH_CHARS)
}

/// How a method is written in a log line: as [`log_path`] does, in at most
/// [`LOG_METHOD_CHARS`] characters; `-` when empty.
pub fn log_method(method: &[u8]) -> String {
    log_text(method, LOG_METHOD_CHARS)
}

/// Most characters of a path in a log line.
pub const LOG_PATH_CHARS: usize = 200;
/// Most characters of a method in a log line.
pub const LOG_METHOD_CHARS: usize = 20;

fn log_text(bytes: &[u8], max: usize) -> String {
    if bytes.is_empty() {
        return "-".to_string();
    }
    let visible = |&b: &u8| {
        if (0x21..0x7f).contains(&b) {
            char::from(b)
        } else {
            '?'
        }
    };
    if bytes.len() <= max {
        bytes.iter().map(visible).collect()
    } else {
        let mut out: String = bytes[..max.saturating_sub(3)].iter().map(visible).collect();
        out.push_str("...");
        out
    }
}

#[cfg(test)]
mod tests;
