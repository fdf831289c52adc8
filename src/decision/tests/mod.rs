#![allow(clippy::result_large_err)]
use super::*;
use crate::config::Config;
use crate::keys::hash_string;
use crate::ratelimit::{Leases, MemoryStore};

const CLIENT_KEY: &str = "client-key-0123456789";
const ADMIN_KEY: &str = "admin-key-0123456789";
const REVOKED_KEY: &str = "revoked-key-0123456789";
const SUSPENDED_KEY: &str = "suspended-key-0123456789";
const EXPIRING_KEY: &str = "expiring-key-0123456789";
const NOTENANT_KEY: &str = "notenant-key-0123456789";
const EXPIRY: i64 = 1_798_761_600; // 2027-01-01T00:00:00Z
const NOW: i64 = EXPIRY - 3600;

fn config_with(extra: &str) -> Config {
    let json = format!(
        r#"{{
        "keys": [
          {{"id": "client-1", "hash": "{}", "client": "acme", "tenant": "t1", "role": "client", "scopes": ["jobs:write", "jobs:read"]}},
          {{"id": "admin-1", "hash": "{}", "tenant": "t1", "role": "admin"}},
          {{"id": "revoked-1", "hash": "{}", "tenant": "t1", "role": "client", "status": "revoked"}},
          {{"id": "suspended-1", "hash": "{}", "tenant": "t1", "role": "client", "status": "suspended"}},
          {{"id": "expiring-1", "hash": "{}", "role": "client", "expires_at": "2027-01-01T00:00:00Z"}},
          {{"id": "notenant-1", "hash": "{}", "role": "miner"}}
        ],
        "routes": [
          {{"prefix": "/healthz", "public": true}},
          {{"prefix": "/v1/admin", "roles": ["admin"]}},
          {{"prefix": "/v1/jobs", "methods": ["POST"], "roles": ["client", "admin"], "scopes": ["jobs:write"]}},
          {{"prefix": "/v1/open"}}
        ]{extra}
    }}"#,
        hash_string(CLIENT_KEY.as_bytes()),
        hash_string(ADMIN_KEY.as_bytes()),
        hash_string(REVOKED_KEY.as_bytes()),
        hash_string(SUSPENDED_KEY.as_bytes()),
        hash_string(EXPIRING_KEY.as_bytes()),
        hash_string(NOTENANT_KEY.as_bytes()),
    );
    Config::from_json(json.as_bytes()).unwrap()
}

fn headers<'a>(pairs: &[(&'a str, &'a str)]) -> Vec<Header<'a>> {
    pairs.iter().map(|&(n, v)| (n, v.as_bytes())).collect()
}

const SEC: u64 = 1_000_000_000;

fn ns(now_s: i64) -> u64 {
    u64::try_from(now_s).unwrap() * SEC
}

fn run<'c>(c: &'c Config, method: &str, path: &str, hs: &[(&str, &str)], now: i64) -> Decision<'c> {
    run_from(
        c,
        &MemoryStore::default(),
        "127.0.0.1",
        method,
        path,
        hs,
        ns(now),
    )
}

fn run_from<'c>(
    c: &'c Config,
    store: &MemoryStore,
    peer: &str,
    method: &str,
    path: &str,
    hs: &[(&str, &str)],
    now_ns: u64,
) -> Decision<'c> {
    let hs = headers(hs);
    let req = Request {
        method: method.as_bytes(),
        path: path.as_bytes(),
        headers: &hs,
        peer: Peer::Connection(peer.parse().unwrap()),
    };
    // The decision borrows only the configuration, never the request.
    // A worker with no leases yet: every call takes from the shared bucket.
    decide(c, &req, now_ns, store, &mut Leases::default())
}

fn reason(d: &Decision<'_>) -> Option<Reason> {
    d.as_ref().err().map(|d| d.reason)
}

fn admitted_id<'a>(d: &'a Decision<'_>) -> Option<&'a str> {
    d.as_ref()
        .ok()
        .and_then(|a| a.key.as_ref())
        .map(|k| k.id.as_ref())
}

#[test]
fn every_row_of_the_decision_table() {
    let c = config_with("");
    let key = |k: &str| ("x-api-key", k.to_string());
    type Row<'a> = (&'a str, &'a str, Vec<(&'a str, String)>, Option<Reason>);
    let rows: Vec<Row> = vec![
        ("GET", "/v1/open", vec![], Some(Reason::MissingApiKey)),
        (
            "GET",
            "/v1/open",
            vec![key("unknown-key-0123456789")],
            Some(Reason::InvalidApiKey),
        ),
        (
            "GET",
            "/v1/open",
            vec![key("short")],
            Some(Reason::InvalidApiKey),
        ),
        (
            "GET",
            "/v1/open",
            vec![key(&"x".repeat(513))],
            Some(Reason::InvalidApiKey),
        ),
        (
            "GET",
            "/v1/open",
            vec![key(&format!("{CLIENT_KEY}\u{7}"))],
            Some(Reason::InvalidApiKey),
        ),
        (
            "GET",
            "/v1/open",
            vec![key(CLIENT_KEY), key(ADMIN_KEY)],
            Some(Reason::InvalidApiKey),
        ),
        (
            "GET",
            "/v1/open",
            vec![
                key(CLIENT_KEY),
                ("authorization", format!("Bearer {ADMIN_KEY}")),
            ],
            Some(Reason::InvalidApiKey),
        ),
        (
            "GET",
            "/v1/open",
            vec![key(REVOKED_KEY)],
            Some(Reason::KeyRevoked),
        ),
        (
            "GET",
            "/v1/open",
            vec![key(SUSPENDED_KEY)],
            Some(Reason::KeySuspended),
        ),
        (
            "POST",
            "/v1/admin/users",
            vec![key(CLIENT_KEY)],
            Some(Reason::InsufficientPermissions),
        ),
        (
            "GET",
            "/v1/jobs",
            vec![key(CLIENT_KEY)],
            Some(Reason::InsufficientPermissions),
        ),
        (
            "POST",
            "/v1/jobs",
            vec![key(NOTENANT_KEY)],
            Some(Reason::InsufficientPermissions),
        ),
        (
            "GET",
            "/v1/open",
            vec![key(CLIENT_KEY), ("x-tenant-id", "t2".into())],
            Some(Reason::TenantMismatch),
        ),
        ("POST", "/v1/jobs", vec![key(CLIENT_KEY)], None),
        (
            "POST",
            "/v1/jobs",
            vec![("authorization", format!("Bearer {CLIENT_KEY}"))],
            None,
        ),
        ("GET", "/v1/admin", vec![key(ADMIN_KEY)], None),
        (
            "GET",
            "/v1/open",
            vec![key(CLIENT_KEY), ("x-tenant-id", "t1".into())],
            None,
        ),
        ("GET", "/healthz", vec![], None),
        ("GET", "/no/route/at/all", vec![key(NOTENANT_KEY)], None),
    ];
    for (method, path, hs, want) in rows {
        let hs: Vec<(&str, &str)> = hs.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let d = run(&c, method, path, &hs, NOW);
        assert_eq!(reason(&d), want, "{method} {path} {hs:?}");
    }
}

#[test]
fn status_codes_and_bodies() {
    let all = [
        (
            Reason::MissingApiKey,
            401,
            "missing_api_key",
            "API key required",
        ),
        (
            Reason::InvalidApiKey,
            401,
            "invalid_api_key",
            "Invalid API key",
        ),
        (
            Reason::KeyRevoked,
            401,
            "key_revoked",
            "API key has been revoked",
        ),
        (
            Reason::KeyExpired,
            401,
            "key_expired",
            "API key has expired",
        ),
        (
            Reason::KeySuspended,
            403,
            "key_suspended",
            "API key is suspended",
        ),
        (
            Reason::InsufficientPermissions,
            403,
            "insufficient_permissions",
            "API key lacks permission for this route",
        ),
        (
            Reason::TenantMismatch,
            403,
            "tenant_mismatch",
            "API key does not belong to this tenant",
        ),
        (
            Reason::InvalidRequest,
            400,
            "invalid_request",
            "Request could not be parsed",
        ),
        (
            Reason::ClientAddressUnknown,
            403,
            "client_address_unknown",
            "Client address could not be determined",
        ),
    ];
    for (reason, status, code, message) in all {
        assert_eq!(reason.status(), status);
        let body: serde_json::Value = serde_json::from_str(&reason.body()).unwrap();
        assert_eq!(body, serde_json::json!({"error": code, "message": message}));
    }
}

#[test]
fn expiry_with_time_passed_in() {
    let c = config_with("");
    let hs = [("x-api-key", EXPIRING_KEY)];
    assert_eq!(
        admitted_id(&run(&c, "GET", "/v1/open", &hs, EXPIRY - 1)),
        Some("expiring-1")
    );
    assert_eq!(
        reason(&run(&c, "GET", "/v1/open", &hs, EXPIRY)),
        Some(Reason::KeyExpired)
    );
    assert_eq!(
        reason(&run(&c, "GET", "/v1/open", &hs, EXPIRY + 86_400)),
        Some(Reason::KeyExpired)
    );
    // Keys without expiry never expire.
    let hs = [("x-api-key", CLIENT_KEY)];
    assert_eq!(
        admitted_id(&run(&c, "GET", "/v1/open", &hs, i64::MAX / 1_000_000_000)),
        Some("client-1")
    );
}

#[test]
fn authentication_comes_before_authorization() {
    let c = config_with("");
    // Admin route, no key: 401 not 403.
    assert_eq!(
        reason(&run(&c, "GET", "/v1/admin", &[], NOW)),
        Some(Reason::MissingApiKey)
    );
    // Revoked key on a route it also lacks permission for: 401.
    let hs = [("x-api-key", REVOKED_KEY)];
    assert_eq!(
        reason(&run(&c, "GET", "/v1/admin", &hs, NOW)),
        Some(Reason::KeyRevoked)
    );
    // Expired beats suspended? An expired key is not authenticated: 401.
    let hs = [("x-api-key", EXPIRING_KEY)];
    assert_eq!(
        reason(&run(&c, "GET", "/v1/admin", &hs, EXPIRY)),
        Some(Reason::KeyExpired)
    );
}

#[test]
fn public_routes_check_a_key_if_one_is_sent() {
    let c = config_with("");
    let d = run(&c, "GET", "/healthz", &[], NOW);
    assert_eq!(d.as_ref().map(|a| a.key.is_none()), Ok(true));
    let d = run(&c, "GET", "/healthz", &[("x-api-key", CLIENT_KEY)], NOW);
    assert_eq!(admitted_id(&d), Some("client-1"));
    let d = run(
        &c,
        "GET",
        "/healthz",
        &[("x-api-key", "unknown-key-0123456789")],
        NOW,
    );
    assert_eq!(reason(&d), Some(Reason::InvalidApiKey));
    let d = run(&c, "GET", "/healthz", &[("x-api-key", REVOKED_KEY)], NOW);
    assert_eq!(reason(&d), Some(Reason::KeyRevoked));
}

#[test]
fn denials_name_the_key_id_or_a_prefix_never_the_key() {
    let c = config_with("");
    let d = run(
        &c,
        "GET",
        "/v1/open",
        &[("x-api-key", "unknown-key-0123456789")],
        NOW,
    );
    assert_eq!(d.unwrap_err().subject, Subject::Unknown("unknown-".into()));
    let d = run(&c, "GET", "/v1/admin", &[("x-api-key", CLIENT_KEY)], NOW);
    assert_eq!(d.unwrap_err().subject, Subject::Key("client-1".into()));
    let d = run(&c, "GET", "/v1/open", &[], NOW);
    assert_eq!(d.unwrap_err().subject, Subject::Nobody);
}

#[test]
fn forwarding_strips_credentials_and_spoofed_identity() {
    let c = config_with("");
    let hs = [
        ("x-api-key", CLIENT_KEY),
        ("authorization", "Basic dXNlcjpwYXNz"),
        ("X-Keygate-Role", "admin"),
        ("x-keygate-key-id", "someone-else"),
        ("x-keygate-role", "admin"),
    ];
    let d = run(&c, "POST", "/v1/jobs", &hs, NOW);
    let admission = d.unwrap();
    assert_eq!(
        admission.remove,
        vec!["x-keygate-key-id", "x-keygate-role", "x-api-key"]
    );
    assert_eq!(
        admission.identity_headers(),
        vec![
            ("x-keygate-key-id", "client-1"),
            ("x-keygate-role", "client"),
            ("x-keygate-client", "acme"),
            ("x-keygate-scopes", "jobs:write,jobs:read"),
            ("x-tenant-id", "t1"),
        ]
    );
    // Bearer carrier is stripped too; both when both carried the same key.
    let hs = [
        ("x-api-key", CLIENT_KEY),
        ("authorization", &format!("Bearer {CLIENT_KEY}")),
    ];
    let d = run(&c, "POST", "/v1/jobs", &hs, NOW).unwrap();
    assert_eq!(d.remove, vec!["x-api-key", "authorization"]);
}

#[test]
fn strip_credentials_off_keeps_the_key_header() {
    let c = config_with(r#", "strip_credentials": false"#);
    let hs = [("x-api-key", CLIENT_KEY), ("x-keygate-client", "spoof")];
    let d = run(&c, "POST", "/v1/jobs", &hs, NOW).unwrap();
    assert_eq!(d.remove, vec!["x-keygate-client"]);
}

#[test]
fn public_route_without_key_still_removes_spoofed_identity() {
    let c = config_with("");
    let d = run(
        &c,
        "GET",
        "/healthz",
        &[("x-keygate-key-id", "admin-1")],
        NOW,
    )
    .unwrap();
    assert_eq!(d.remove, vec!["x-keygate-key-id"]);
    assert!(d.identity_headers().is_empty());
}

#[test]
fn keys_without_tenant_are_not_bound_to_one() {
    let c = config_with("");
    let hs = [("x-api-key", NOTENANT_KEY), ("x-tenant-id", "anything")];
    let d = run(&c, "GET", "/v1/open", &hs, NOW).unwrap();
    assert!(!d
        .identity_headers()
        .iter()
        .any(|(n, _)| *n == "x-tenant-id"));
    assert!(!d.remove.contains(&"x-tenant-id".to_string()));
}

#[test]
fn every_x_tenant_id_value_must_match() {
    let c = config_with("");
    let hs = [
        ("x-api-key", CLIENT_KEY),
        ("x-tenant-id", "t1"),
        ("x-tenant-id", "t2"),
    ];
    assert_eq!(
        reason(&run(&c, "GET", "/v1/open", &hs, NOW)),
        Some(Reason::TenantMismatch)
    );
}

#[test]
fn cors_preflight() {
    let preflight = [
        ("origin", "https://app.example"),
        ("access-control-request-method", "POST"),
    ];
    let off = config_with("");
    assert_eq!(
        reason(&run(&off, "OPTIONS", "/v1/jobs", &preflight, NOW)),
        Some(Reason::MissingApiKey)
    );
    let on = config_with(r#", "allow_cors_preflight": true"#);
    let d = run(&on, "OPTIONS", "/v1/jobs", &preflight, NOW).unwrap();
    assert!(d.key.is_none());
    // Not a preflight: OPTIONS without the CORS headers, or GET with them.
    let origin_only = [("origin", "https://app.example")];
    assert_eq!(
        reason(&run(&on, "OPTIONS", "/v1/jobs", &origin_only, NOW)),
        Some(Reason::MissingApiKey)
    );
    assert_eq!(
        reason(&run(&on, "GET", "/v1/jobs", &preflight, NOW)),
        Some(Reason::MissingApiKey)
    );
}

#[test]
fn route_requirements_all_hold() {
    let c = config_with("");
    // Admin passes the jobs route (role admin allowed) only if it has the scope: it has none.
    let hs = [("x-api-key", ADMIN_KEY)];
    assert_eq!(
        reason(&run(&c, "POST", "/v1/jobs", &hs, NOW)),
        Some(Reason::InsufficientPermissions)
    );
    // Methods are compared exactly.
    let hs = [("x-api-key", CLIENT_KEY)];
    assert_eq!(
        reason(&run(&c, "post", "/v1/jobs", &hs, NOW)),
        Some(Reason::InsufficientPermissions)
    );
}

#[test]
fn other_authorization_schemes_are_not_keys() {
    let c = config_with("");
    let hs = [("authorization", "Basic dXNlcjpwYXNz")];
    assert_eq!(
        reason(&run(&c, "GET", "/v1/open", &hs, NOW)),
        Some(Reason::MissingApiKey)
    );
    let hs = [
        ("authorization", "Basic dXNlcjpwYXNz"),
        ("x-api-key", CLIENT_KEY),
    ];
    let d = run(&c, "GET", "/v1/open", &hs, NOW).unwrap();
    assert_eq!(d.remove, vec!["x-api-key"]);
}

#[test]
fn key_format_checksum_refuses_typos_before_lookup() {
    let good = keys::format_key("kg", &[9u8; 32]);
    let mut typo = good.clone().into_bytes();
    typo[10] = if typo[10] == b'x' { b'y' } else { b'x' };
    let typo = String::from_utf8(typo).unwrap();
    let json = |format: &str| {
        format!(
            r#"{{"keys": [{{"id": "gen", "hash": "{}", "role": "client"}}, {{"id": "typo", "hash": "{}", "role": "client"}},
                          {{"id": "legacy", "hash": "{}", "role": "client"}}]{format}}}"#,
            hash_string(good.as_bytes()),
            hash_string(typo.as_bytes()),
            hash_string(CLIENT_KEY.as_bytes()),
        )
    };
    let checked =
        Config::from_json(json(r#", "key_format": {"prefix": "kg", "checksum": true}"#).as_bytes())
            .unwrap();
    let unchecked = Config::from_json(json("").as_bytes()).unwrap();
    fn get(c: &Config, k: &str) -> Result<Option<String>, Reason> {
        run(c, "GET", "/x", &[("x-api-key", k)], NOW)
            .map(|a| a.key.map(|k| k.id.into_owned()))
            .map_err(|d| d.reason)
    }
    assert_eq!(get(&checked, &good), Ok(Some("gen".into())));
    assert_eq!(get(&checked, CLIENT_KEY), Ok(Some("legacy".into())));
    assert_eq!(get(&checked, &typo), Err(Reason::InvalidApiKey));
    // Without checksum checking the (configured) typo key is looked up like any other.
    assert_eq!(get(&unchecked, &typo), Ok(Some("typo".into())));
    let e = Config::from_json(json(r#", "key_format": {"prefix": "KG!"}"#).as_bytes()).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("key_format.prefix: \"KG!\" must be 1 to 16 lowercase"),
        "{e}"
    );
}

#[test]
fn key_set_members_are_authenticated_limited_and_forwarded_each_with_their_own_id() {
    use base64::Engine as _;
    let members = ["set-member-key-0001", "set-member-key-0002"];
    let packed: Vec<u8> = members
        .iter()
        .flat_map(|k| crate::keys::digest(k.as_bytes()))
        .collect();
    let json = format!(
        r#"{{"key_sets": [{{"name": "legacy", "role": "client", "tenant": "t9", "scopes": ["jobs:write"],
             "plan": "two", "digests": ["{}"]}}],
            "plans": {{"two": {{"requests": 2, "per": "hour"}}}},
            "routes": [{{"prefix": "/v1/admin", "roles": ["admin"]}}]}}"#,
        base64::engine::general_purpose::STANDARD.encode(packed)
    );
    let c = Config::from_json(json.as_bytes()).unwrap();
    let store = MemoryStore::default();
    let get = |key: &str, path: &str| {
        run_from(
            &c,
            &store,
            "127.0.0.1",
            "GET",
            path,
            &[("x-api-key", key)],
            ns(NOW),
        )
    };
    let a = get(members[0], "/v1/jobs").unwrap();
    let id_a = a.key.as_ref().unwrap().id.to_string();
    assert!(
        id_a.starts_with("legacy:") && id_a.len() == "legacy:".len() + 16,
        "{id_a}"
    );
    let ids: Vec<(&str, &str)> = a.identity_headers();
    assert!(ids.contains(&("x-keygate-key-id", id_a.as_str())));
    assert!(ids.contains(&("x-tenant-id", "t9")));
    assert!(ids.contains(&("x-keygate-scopes", "jobs:write")));
    // Each member has a bucket of its own: a's second request and b's first both pass,
    // a's third is refused, naming a's id.
    assert!(get(members[0], "/v1/jobs").is_ok());
    let b = get(members[1], "/v1/jobs").unwrap();
    assert_ne!(b.key.as_ref().unwrap().id, id_a);
    let limited = get(members[0], "/v1/jobs").unwrap_err();
    assert_eq!(limited.reason, Reason::RateLimited);
    assert_eq!(limited.subject, Subject::Key(id_a.clone().into()));
    // Permissions come from the set's identity.
    let forbidden = get(members[1], "/v1/admin/x").unwrap_err();
    assert_eq!(forbidden.reason, Reason::InsufficientPermissions);
    // A key that is not a member is unknown.
    assert_eq!(
        get("set-member-key-0003", "/v1/jobs").unwrap_err().reason,
        Reason::InvalidApiKey
    );
    // identify (keygate verify) reports the member's id.
    assert_eq!(
        identify(&c, members[1].as_bytes(), NOW).unwrap().key.role,
        "client"
    );
}

mod hardening;
mod observability;

#[test]
fn keys_with_a_plan_forward_it_for_shared_limits() {
    let c = config_with(r#", "default_plan": "free""#);
    let d = run(&c, "GET", "/v1/open", &[("x-api-key", CLIENT_KEY)], NOW);
    let admission = d.unwrap();
    assert!(admission
        .identity_headers()
        .contains(&("x-keygate-plan", "free")));
    // The client cannot choose its plan: a sent one is removed like every x-keygate-*.
    let d = run(
        &c,
        "GET",
        "/v1/open",
        &[("x-api-key", CLIENT_KEY), ("x-keygate-plan", "enterprise")],
        NOW,
    );
    assert!(d.unwrap().remove.contains(&"x-keygate-plan".to_string()));
    // Keys without any plan carry none.
    let c = config_with("");
    let d = run(&c, "GET", "/v1/open", &[("x-api-key", CLIENT_KEY)], NOW);
    assert!(!d
        .unwrap()
        .identity_headers()
        .iter()
        .any(|(n, _)| *n == "x-keygate-plan"));
}

#[test]
fn with_a_shared_limit_only_local_refusals_carry_the_quota() {
    let c = config_with(
        r#", "default_plan": "tiny", "plans": {"tiny": {"requests": 1, "per": "hour"}}, "shared_rate_limit": true"#,
    );
    let store = MemoryStore::default();
    let hs = [("x-api-key", CLIENT_KEY)];
    let first = run_from(&c, &store, "127.0.0.1", "GET", "/v1/open", &hs, ns(NOW));
    assert_eq!(first.unwrap().quota, None);
    let second = run_from(&c, &store, "127.0.0.1", "GET", "/v1/open", &hs, ns(NOW));
    let d = second.unwrap_err();
    assert_eq!(d.reason, Reason::RateLimited);
    assert_eq!(d.quota.map(|q| q.limit), Some(1));
}

fn header_value<'a>(hs: &'a [(&'static str, String)], name: &str) -> Option<&'a str> {
    hs.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
}

const TWO_RATES: &str = r#", "default_plan": "two", "plans": {"two": [{"requests": 5, "per": "minute"}, {"requests": 3, "per": "hour"}]}"#;

#[test]
fn a_two_rate_plan_refuses_at_the_smaller_and_reports_it() {
    let c = config_with(TWO_RATES);
    let store = MemoryStore::default();
    let hs = [("x-api-key", CLIENT_KEY)];
    let mut remaining = Vec::new();
    for _ in 0..3 {
        let a = run_from(&c, &store, "127.0.0.1", "GET", "/v1/open", &hs, ns(NOW)).unwrap();
        let q = a.quota.unwrap();
        remaining.push((q.limit, q.remaining));
        assert_eq!(
            header_value(&a.quota_headers, "x-ratelimit-limit"),
            Some("3")
        );
    }
    // The hour's 3 is closer to running out than the minute's 5 all along.
    assert_eq!(remaining, [(3, 2), (3, 1), (3, 0)]);
    let d = run_from(&c, &store, "127.0.0.1", "GET", "/v1/open", &hs, ns(NOW)).unwrap_err();
    assert_eq!(d.reason, Reason::RateLimited);
    assert_eq!(d.quota.map(|q| (q.limit, q.remaining)), Some((3, 0)));
    // Every bucket admits again once the hour's has a token: 20 minutes.
    assert_eq!(d.retry_after_s, Some(1200));
    assert_eq!(
        header_value(&d.quota_headers, "x-ratelimit-limit"),
        Some("3")
    );
    // The refusal took nothing: the minute's bucket still holds 2 of 5.
    let minute = ratelimit::peek(
        &store,
        "keygate:bucket:client-1",
        &c.keys[0].limit.as_ref().unwrap().rates()[0],
        ns(NOW),
    )
    .unwrap();
    assert_eq!(minute.remaining, 2);
    // Another key of the plan has buckets of its own.
    let other = run_from(
        &c,
        &store,
        "127.0.0.1",
        "GET",
        "/v1/open",
        &[("x-api-key", ADMIN_KEY)],
        ns(NOW),
    );
    assert!(other.is_ok());
}

#[test]
fn the_minute_refuses_first_when_it_runs_out_first() {
    let c = config_with(
        r#", "default_plan": "two", "plans": {"two": [{"requests": 2, "per": "minute"}, {"requests": 100, "per": "day"}]}"#,
    );
    let store = MemoryStore::default();
    let hs = [("x-api-key", CLIENT_KEY)];
    for _ in 0..2 {
        assert!(run_from(&c, &store, "127.0.0.1", "GET", "/v1/open", &hs, ns(NOW)).is_ok());
    }
    let d = run_from(&c, &store, "127.0.0.1", "GET", "/v1/open", &hs, ns(NOW)).unwrap_err();
    assert_eq!(d.quota.map(|q| q.limit), Some(2));
    assert_eq!(d.retry_after_s, Some(30));
    // The day's bucket gave its token back: 98 left, not 97.
    let day = c.keys[0].limit.as_ref().unwrap().rates()[1];
    let v = ratelimit::peek(&store, "keygate:bucket:client-1#1", &day, ns(NOW)).unwrap();
    assert_eq!(v.remaining, 98);
}

#[test]
fn ietf_headers_carry_one_policy_per_rate() {
    let c = config_with(&format!(r#"{TWO_RATES}, "rate_limit_headers": "ietf""#));
    let store = MemoryStore::default();
    let hs = [("x-api-key", CLIENT_KEY)];
    let a = run_from(&c, &store, "127.0.0.1", "GET", "/v1/open", &hs, ns(NOW)).unwrap();
    assert_eq!(
        header_value(&a.quota_headers, "ratelimit-policy"),
        Some(r#""two/minute";q=5;w=60, "two/hour";q=3;w=3600"#)
    );
    assert_eq!(
        header_value(&a.quota_headers, "ratelimit"),
        Some(r#""two/minute";r=4;t=12, "two/hour";r=2;t=1200"#)
    );
    assert_eq!(header_value(&a.quota_headers, "x-ratelimit-limit"), None);
    for _ in 0..2 {
        run_from(&c, &store, "127.0.0.1", "GET", "/v1/open", &hs, ns(NOW)).unwrap();
    }
    let d = run_from(&c, &store, "127.0.0.1", "GET", "/v1/open", &hs, ns(NOW)).unwrap_err();
    assert_eq!(
        header_value(&d.quota_headers, "ratelimit"),
        Some(r#""two/minute";r=2;t=36, "two/hour";r=0;t=1200"#)
    );
    assert_eq!(d.retry_after_s, Some(1200));
    // A single-rate plan gets one item, named the same way.
    let c = config_with(r#", "default_plan": "free", "rate_limit_headers": "ietf""#);
    let a = run(&c, "GET", "/v1/open", &hs, NOW).unwrap();
    assert_eq!(
        header_value(&a.quota_headers, "ratelimit-policy"),
        Some(r#""free/minute";q=60;w=60"#)
    );
    assert_eq!(
        header_value(&a.quota_headers, "ratelimit"),
        Some(r#""free/minute";r=59;t=1"#)
    );
    // Off: none, but a refusal still says when to retry.
    let c = config_with(&format!(r#"{TWO_RATES}, "rate_limit_headers": false"#));
    let store = MemoryStore::default();
    for _ in 0..3 {
        let a = run_from(&c, &store, "127.0.0.1", "GET", "/v1/open", &hs, ns(NOW)).unwrap();
        assert!(a.quota_headers.is_empty() && a.quota.is_none());
    }
    let d = run_from(&c, &store, "127.0.0.1", "GET", "/v1/open", &hs, ns(NOW)).unwrap_err();
    assert!(d.quota_headers.is_empty());
    assert_eq!(d.retry_after_s, Some(1200));
}

#[test]
fn a_successor_spends_every_bucket_of_its_predecessor() {
    let json = format!(
        r#"{{"keys": [
            {{"id": "old", "hash": "{}", "role": "client"}},
            {{"id": "new", "hash": "{}", "role": "client", "shares_quota_with": "old"}}
        ], "shared_rate_limit": false{TWO_RATES}}}"#,
        hash_string(CLIENT_KEY.as_bytes()),
        hash_string(ADMIN_KEY.as_bytes()),
    );
    let c = Config::from_json(json.as_bytes()).unwrap();
    let store = MemoryStore::default();
    let old = [("x-api-key", CLIENT_KEY)];
    let new = [("x-api-key", ADMIN_KEY)];
    assert!(run_from(&c, &store, "127.0.0.1", "GET", "/x", &old, ns(NOW)).is_ok());
    assert!(run_from(&c, &store, "127.0.0.1", "GET", "/x", &new, ns(NOW)).is_ok());
    assert!(run_from(&c, &store, "127.0.0.1", "GET", "/x", &old, ns(NOW)).is_ok());
    // Three between them: the hour's bucket they share is empty for both.
    for hs in [&old, &new] {
        let d = run_from(&c, &store, "127.0.0.1", "GET", "/x", hs, ns(NOW)).unwrap_err();
        assert_eq!(d.reason, Reason::RateLimited);
    }
    // Only the predecessor's buckets exist.
    assert_eq!(store.len(), 2);
}

#[test]
fn with_a_shared_limit_the_quota_id_names_whose_budget_is_spent() {
    let json = format!(
        r#"{{"keys": [
            {{"id": "old", "hash": "{}", "role": "client"}},
            {{"id": "new", "hash": "{}", "role": "client", "shares_quota_with": "old"}},
            {{"id": "free-rider", "hash": "{}", "role": "client", "plan": "free"}}
        ], "default_plan": "free", "shared_rate_limit": true}}"#,
        hash_string(CLIENT_KEY.as_bytes()),
        hash_string(ADMIN_KEY.as_bytes()),
        hash_string(NOTENANT_KEY.as_bytes()),
    );
    let c = Config::from_json(json.as_bytes()).unwrap();
    let quota_id = |key: &str| {
        let d = run(&c, "GET", "/x", &[("x-api-key", key)], NOW).unwrap();
        let hs = d.identity_headers();
        let id = hs
            .iter()
            .find(|(n, _)| *n == "x-keygate-key-id")
            .map(|(_, v)| v.to_string());
        let quota = hs
            .iter()
            .find(|(n, _)| *n == QUOTA_ID_HEADER)
            .map(|(_, v)| v.to_string());
        (id, quota)
    };
    assert_eq!(
        quota_id(CLIENT_KEY),
        (Some("old".into()), Some("old".into()))
    );
    assert_eq!(
        quota_id(ADMIN_KEY),
        (Some("new".into()), Some("old".into()))
    );
    assert_eq!(
        quota_id(NOTENANT_KEY),
        (Some("free-rider".into()), Some("free-rider".into()))
    );
    // Without a shared limit nothing reads it, so it is not sent (no extra header).
    let c = config_with(r#", "default_plan": "free""#);
    let d = run(&c, "GET", "/v1/open", &[("x-api-key", CLIENT_KEY)], NOW).unwrap();
    assert!(!d
        .identity_headers()
        .iter()
        .any(|(n, _)| *n == QUOTA_ID_HEADER));
    // A client cannot send one: it is removed like every x-keygate-* header.
    let d = run(
        &c,
        "GET",
        "/v1/open",
        &[
            ("x-api-key", CLIENT_KEY),
            ("x-keygate-quota-id", "someone-else"),
        ],
        NOW,
    )
    .unwrap();
    assert!(d.remove.contains(&"x-keygate-quota-id".to_string()));
}

/// Counts shared-data calls.
#[derive(Default)]
struct Calls {
    inner: MemoryStore,
    gets: std::cell::Cell<u32>,
    sets: std::cell::Cell<u32>,
}

impl Store for Calls {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, ratelimit::StoreError> {
        self.gets.set(self.gets.get() + 1);
        self.inner.get(key)
    }

    fn set(&self, key: &str, value: &[u8], version: u32) -> Result<(), ratelimit::StoreError> {
        self.sets.set(self.sets.get() + 1);
        self.inner.set(key, value, version)
    }
}

#[test]
fn a_single_rate_plan_costs_what_it_always_did() {
    // One get and one set for a request on a small single-rate plan (no lease), and a
    // busy key on a large plan is served from its lease without any.
    let c = config_with(r#", "default_plan": "free""#);
    let store = Calls::default();
    let hs = headers(&[("x-api-key", CLIENT_KEY)]);
    let req = Request {
        method: b"GET",
        path: b"/v1/open",
        headers: &hs,
        peer: Peer::Connection("127.0.0.1".parse().unwrap()),
    };
    let mut leases = Leases::default();
    decide(&c, &req, ns(NOW), &store, &mut leases).unwrap();
    assert_eq!((store.gets.get(), store.sets.get()), (1, 1));
    let c = config_with(r#", "default_plan": "enterprise""#);
    let store = Calls::default();
    let mut leases = Leases::default();
    for i in 0..10 {
        decide(&c, &req, ns(NOW) + i, &store, &mut leases).unwrap();
    }
    assert!(
        store.sets.get() < 10,
        "{} writes for 10 requests",
        store.sets.get()
    );
    // Two rates: a get and a set for each.
    let c = config_with(TWO_RATES);
    let store = Calls::default();
    decide(&c, &req, ns(NOW), &store, &mut Leases::default()).unwrap();
    assert_eq!((store.gets.get(), store.sets.get()), (2, 2));
}
