//! What a decision tells the metrics and the log: the route a request is counted under,
//! which requirement a refusal failed, whether the key authenticated, and the log line.

use super::*;

fn denial<'c>(d: Decision<'c>) -> Denial<'c> {
    match d {
        Err(d) => d,
        Ok(a) => panic!("admitted: {a:?}"),
    }
}

fn route_label<'c>(d: &Decision<'c>) -> Option<&'c str> {
    let route = match d {
        Ok(a) => a.route,
        Err(d) => d.route,
    };
    route.map(|r| r.label.as_str())
}

fn line(d: &Denial<'_>, method: &str, path: &str) -> String {
    d.log_line(method.as_bytes(), path.as_bytes(), 0, 100)
}

#[test]
fn requests_are_counted_under_the_rule_that_covers_them() {
    let c = config_with("");
    let cases = [
        ("POST", "/v1/jobs", CLIENT_KEY, Some("/v1/jobs")),
        ("GET", "/v1/jobs/7?x=1", CLIENT_KEY, Some("/v1/jobs")),
        ("GET", "/v1/admin/users", ADMIN_KEY, Some("/v1/admin")),
        ("GET", "/v1/admin/users", CLIENT_KEY, Some("/v1/admin")),
        ("GET", "/healthz", CLIENT_KEY, Some("/healthz")),
        ("GET", "/healthz", "", Some("/healthz")),
        ("GET", "/elsewhere", CLIENT_KEY, None),
        ("GET", "/elsewhere", "", None),
        ("GET", "/elsewhere", "not-a-key-0123456789", None),
    ];
    for (method, path, key, want) in cases {
        let hs: Vec<(&str, &str)> = if key.is_empty() {
            vec![]
        } else {
            vec![("x-api-key", key)]
        };
        let d = run(&c, method, path, &hs, NOW);
        assert_eq!(route_label(&d), want, "{method} {path} {key}");
    }
    // Unreadable requests are refused before any rule is chosen.
    let d = run(&c, "GET", "v1/jobs", &[("x-api-key", CLIENT_KEY)], NOW);
    assert_eq!(reason(&d), Some(Reason::InvalidRequest));
    assert_eq!(route_label(&d), None);
}

#[test]
fn a_named_rule_is_counted_by_its_name() {
    let c = Config::from_json(
        format!(
            r#"{{"keys": [{{"id": "k", "hash": "{}", "role": "client"}}],
                "routes": [{{"prefix": "/v1/jobs", "name": "jobs"}}, {{"prefix": "/", "public": true}}]}}"#,
            hash_string(CLIENT_KEY.as_bytes())
        )
        .as_bytes(),
    )
    .unwrap();
    let d = run(&c, "GET", "/v1/jobs/1", &[("x-api-key", CLIENT_KEY)], NOW);
    assert_eq!(route_label(&d), Some("jobs"));
    assert_eq!(c.routes[0].index, 0);
    let d = run(&c, "GET", "/v1/other", &[], NOW);
    assert_eq!(route_label(&d), Some("/"));
    assert_eq!(c.routes[1].index, 1);
}

#[test]
fn when_path_forms_select_several_rules_the_restricting_one_counts() {
    // "/Admin" is public as written, but compared ignoring case it is /admin's: the request
    // is held to /admin's rule, and counted under it.
    let c = Config::from_json(
        format!(
            r#"{{"keys": [{{"id": "k", "hash": "{}", "role": "client"}}],
                "routes": [{{"prefix": "/admin", "roles": ["admin"]}}, {{"prefix": "/", "public": true}}]}}"#,
            hash_string(CLIENT_KEY.as_bytes())
        )
        .as_bytes(),
    )
    .unwrap();
    let d = run(&c, "GET", "/Admin", &[("x-api-key", CLIENT_KEY)], NOW);
    assert_eq!(reason(&d), Some(Reason::InsufficientPermissions));
    assert_eq!(route_label(&d), Some("/admin"));
    let d = run(&c, "GET", "/%61dmin", &[("x-api-key", CLIENT_KEY)], NOW);
    assert_eq!(route_label(&d), Some("/admin"));
    let d = run(&c, "GET", "/public", &[], NOW);
    assert!(d.is_ok());
    assert_eq!(route_label(&d), Some("/"));
}

#[test]
fn each_403_names_the_requirement_that_failed() {
    let c = config_with("");
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a [(&'a str, &'a str)],
        Reason,
        Option<Requirement>,
    );
    let cases: [Case<'_>; 6] = [
        // /v1/jobs: POST, roles client or admin, scope jobs:write.
        (
            "GET",
            "/v1/admin",
            &[("x-api-key", CLIENT_KEY)],
            Reason::InsufficientPermissions,
            Some(Requirement::Role),
        ),
        (
            "POST",
            "/v1/jobs",
            &[("x-api-key", NOTENANT_KEY)],
            Reason::InsufficientPermissions,
            Some(Requirement::Role),
        ),
        (
            "GET",
            "/v1/jobs",
            &[("x-api-key", CLIENT_KEY)],
            Reason::InsufficientPermissions,
            Some(Requirement::Method),
        ),
        (
            "POST",
            "/v1/jobs",
            &[("x-api-key", ADMIN_KEY)],
            Reason::InsufficientPermissions,
            Some(Requirement::Scope),
        ),
        (
            "GET",
            "/v1/open",
            &[("x-api-key", CLIENT_KEY), ("x-tenant-id", "t2")],
            Reason::TenantMismatch,
            Some(Requirement::Tenant),
        ),
        (
            "GET",
            "/v1/open",
            &[("x-api-key", SUSPENDED_KEY)],
            Reason::KeySuspended,
            None,
        ),
    ];
    for (method, path, hs, want_reason, want_requirement) in cases {
        let d = denial(run(&c, method, path, hs, NOW));
        assert_eq!(
            (d.reason, d.requirement),
            (want_reason, want_requirement),
            "{method} {path} {hs:?}"
        );
    }
    // A GET with a key that lacks the scope: the scope is reported before the method.
    let c = config_with("");
    let d = denial(run(&c, "GET", "/v1/jobs", &[("x-api-key", ADMIN_KEY)], NOW));
    assert_eq!(d.requirement, Some(Requirement::Scope));
    assert_eq!(
        line(&d, "GET", "/v1/jobs"),
        "keygate: denied 403 insufficient_permissions (scope) GET /v1/jobs key_id=admin-1"
    );
}

fn ip_config() -> Config {
    Config::from_json(
        format!(
            r#"{{"keys": [
                  {{"id": "office", "hash": "{}", "role": "client", "allowed_ips": ["10.0.0.0/8"]}},
                  {{"id": "any", "hash": "{}", "role": "client"}}],
                "ip_rules": {{"deny": ["192.0.2.0/24"]}}}}"#,
            hash_string(CLIENT_KEY.as_bytes()),
            hash_string(ADMIN_KEY.as_bytes()),
        )
        .as_bytes(),
    )
    .unwrap()
}

fn from<'c>(c: &'c Config, peer: &str, key: &str) -> Denial<'c> {
    denial(run_from(
        c,
        &MemoryStore::default(),
        peer,
        "GET",
        "/v1/x",
        &[("x-api-key", key)],
        ns(NOW),
    ))
}

#[test]
fn address_refusals_name_the_rule_that_refused() {
    let c = ip_config();
    let d = from(&c, "192.0.2.7", ADMIN_KEY);
    assert_eq!(
        (d.reason, d.requirement),
        (Reason::IpNotAllowed, Some(Requirement::IpRules))
    );
    assert_eq!(d.key_id(), None);
    assert_eq!(
        line(&d, "GET", "/v1/x"),
        "keygate: denied 403 ip_not_allowed (ip_rules) GET /v1/x client_ip=192.0.2.7"
    );
    let d = from(&c, "203.0.113.9", CLIENT_KEY);
    assert_eq!(
        (d.reason, d.requirement),
        (Reason::IpNotAllowed, Some(Requirement::AllowedIps))
    );
    assert_eq!(
        line(&d, "GET", "/v1/x?token=secret"),
        "keygate: denied 403 ip_not_allowed (allowed_ips) GET /v1/x key_id=office client_ip=203.0.113.9"
    );
}

#[test]
fn an_unknown_address_names_the_rule_that_needed_it() {
    let c = ip_config();
    let hs = headers(&[("x-api-key", CLIENT_KEY)]);
    let req = Request {
        method: b"GET",
        path: b"/v1/x",
        headers: &hs,
        peer: Peer::Unknown,
    };
    let d = decide(
        &c,
        &req,
        ns(NOW),
        &MemoryStore::default(),
        &mut Leases::default(),
    );
    let d = denial(d);
    assert_eq!(
        (d.reason, d.requirement),
        (Reason::ClientAddressUnknown, Some(Requirement::IpRules))
    );
    assert_eq!(
        line(&d, "GET", "/v1/x"),
        "keygate: denied 403 client_address_unknown (ip_rules: Envoy reported no client address) GET /v1/x"
    );
    // Without ip_rules, the key's allowed_ips is what needs the address.
    let c = Config::from_json(
        format!(
            r#"{{"keys": [{{"id": "office", "hash": "{}", "role": "client", "allowed_ips": ["10.0.0.0/8"]}}]}}"#,
            hash_string(CLIENT_KEY.as_bytes()),
        )
        .as_bytes(),
    )
    .unwrap();
    let d = denial(decide(
        &c,
        &req,
        ns(NOW),
        &MemoryStore::default(),
        &mut Leases::default(),
    ));
    assert_eq!(d.requirement, Some(Requirement::AllowedIps));
    assert_eq!(d.key_id(), Some("office"));
    // And with a failed-authentication limit, that limit.
    let c = config_with(r#", "failed_auth_limit": {"requests": 5, "per": "minute"}"#);
    let d = denial(decide(
        &c,
        &req,
        ns(NOW),
        &MemoryStore::default(),
        &mut Leases::default(),
    ));
    assert_eq!(d.requirement, Some(Requirement::FailedAuthLimit));
}

#[test]
fn authenticated_refusals_are_those_after_the_key_was_accepted() {
    let c =
        config_with(r#", "plans": {"one": {"requests": 1, "per": "day"}}, "default_plan": "one""#);
    let store = MemoryStore::default();
    let go = |key: &str, path: &str| {
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
    assert!(go(CLIENT_KEY, "/v1/open").is_ok());
    let cases = [
        (
            CLIENT_KEY,
            "/v1/open",
            Reason::RateLimited,
            Some("client-1"),
            true,
        ),
        (
            CLIENT_KEY,
            "/v1/admin",
            Reason::InsufficientPermissions,
            Some("client-1"),
            true,
        ),
        (
            SUSPENDED_KEY,
            "/v1/open",
            Reason::KeySuspended,
            Some("suspended-1"),
            true,
        ),
        (
            REVOKED_KEY,
            "/v1/open",
            Reason::KeyRevoked,
            Some("revoked-1"),
            false,
        ),
        (
            "zz-unknown-0123456789",
            "/v1/open",
            Reason::InvalidApiKey,
            None,
            false,
        ),
    ];
    for (key, path, want, id, authenticated) in cases {
        let d = denial(go(key, path));
        assert_eq!(d.reason, want, "{key}");
        assert_eq!(d.key_id(), id, "{key}");
        assert_eq!(d.authenticated(), authenticated, "{key}");
    }
    let missing = denial(run(&c, "GET", "/v1/open", &[], NOW));
    assert_eq!((missing.key_id(), missing.authenticated()), (None, false));
    let expired = denial(run(
        &c,
        "GET",
        "/v1/open",
        &[("x-api-key", EXPIRING_KEY)],
        EXPIRY + 1,
    ));
    assert_eq!(
        (expired.reason, expired.key_id(), expired.authenticated()),
        (Reason::KeyExpired, Some("expiring-1"), false)
    );
}

#[test]
fn log_lines_carry_method_and_path_without_query_or_key() {
    let c = config_with("");
    let unknown = "kg_secret_part_of_the_key_0123456789";
    let d = denial(run(
        &c,
        "DELETE",
        "/v1/open/items?api_key=abc&x=1",
        &[("x-api-key", unknown)],
        NOW,
    ));
    let l = line(&d, "DELETE", "/v1/open/items?api_key=abc&x=1");
    assert_eq!(
        l,
        "keygate: denied 401 invalid_api_key DELETE /v1/open/items key_prefix=\"kg_secre\""
    );
    assert!(!l.contains(unknown) && !l.contains("abc"));
    let d = denial(run(&c, "GET", "/v1/open", &[], NOW));
    assert_eq!(
        d.log_line(b"GET", b"/v1/open", 12, 100),
        "keygate: denied 401 missing_api_key GET /v1/open (12 earlier denials not logged: over 100 a second)"
    );
    let d = denial(run(&c, "GET", "v1/open", &[], NOW));
    assert_eq!(
        line(&d, "GET", "v1/open"),
        "keygate: denied 400 invalid_request (:path does not start with /) GET v1/open"
    );
}

#[test]
fn logged_paths_are_cut_to_200_visible_characters() {
    assert_eq!(log_path(b"/v1/jobs?key=x"), "/v1/jobs");
    assert_eq!(log_path(b"/v1/jobs#frag?x"), "/v1/jobs");
    assert_eq!(log_path(b""), "-");
    assert_eq!(log_path(b"?only=query"), "-");
    assert_eq!(log_path(b"/a b\x00c\xffd\x7f\n"), "/a?b?c?d??");
    let long = format!("/{}", "a".repeat(500));
    let cut = log_path(long.as_bytes());
    assert_eq!(cut.chars().count(), LOG_PATH_CHARS);
    assert!(cut.ends_with("...") && cut.starts_with("/aaa"));
    let exact = format!("/{}", "b".repeat(LOG_PATH_CHARS - 1));
    assert_eq!(log_path(exact.as_bytes()), exact);
    // Non-ASCII is one `?` per byte, so the cut counts bytes and characters alike.
    let wide = "/é".repeat(300);
    assert!(log_path(wide.as_bytes()).len() <= LOG_PATH_CHARS);
    assert_eq!(log_method(b"GET"), "GET");
    assert_eq!(log_method(b""), "-");
    assert_eq!(log_method(b"G T\x01"), "G?T?");
    assert_eq!(log_method(&[b'X'; 100]).len(), LOG_METHOD_CHARS);
}

#[test]
fn spoofed_identity_headers_are_found_for_removal_on_refusals_too() {
    let hs = headers(&[
        ("X-Keygate-Key-Id", "admin-1"),
        ("x_keygate_role", "admin"),
        ("x-keygate-key-id", "again"),
        ("x_tenant_id", "t1"),
        ("x-tenant-id", "t1"),
        ("x-api-key", CLIENT_KEY),
    ]);
    assert_eq!(
        spoofed_identity(&hs),
        vec!["x-keygate-key-id", "x_keygate_role", "x_tenant_id"]
    );
}

#[test]
fn route_names_are_checked() {
    let base = |route: &str| {
        format!(
            r#"{{"keys": [{{"id": "k", "hash": "{}", "role": "client"}}], "routes": [{route}]}}"#,
            hash_string(CLIENT_KEY.as_bytes())
        )
    };
    let err = |route: &str| {
        Config::from_json(base(route).as_bytes())
            .unwrap_err()
            .to_string()
    };
    assert!(err(r#"{"prefix": "/a", "name": "a b"}"#)
        .starts_with("routes[0].name: \"a b\" is not a valid route name"));
    assert!(err(r#"{"prefix": "/a", "name": ""}"#).starts_with("routes[0].name:"));
    assert!(err(&format!(
        r#"{{"prefix": "/a", "name": "{}"}}"#,
        "n".repeat(65)
    ))
    .starts_with("routes[0].name:"));
    assert!(err(r#"{"prefix": "/a", "name": "none"}"#).contains("reserved"));
    assert!(
        err(r#"{"prefix": "/a", "name": "x"}, {"prefix": "/b", "name": "x"}"#)
            .starts_with("routes[1].name: duplicate name \"x\" (also routes[0].name)")
    );
    let ok = Config::from_json(
        base(r#"{"prefix": "/a", "name": "A-z_09"}, {"prefix": "/b"}"#).as_bytes(),
    )
    .unwrap();
    assert_eq!(ok.routes[0].label, "A-z_09");
    assert_eq!(ok.routes[1].label, "/b");
}

#[test]
fn reasons_are_listed_in_declaration_order() {
    for (i, r) in Reason::ALL.iter().enumerate() {
        assert_eq!(*r as usize, i);
    }
}
