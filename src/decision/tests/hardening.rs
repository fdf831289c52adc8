//! What a client can send to slip past a rule: unreadable request lines, path forms that
//! upstreams route to a protected prefix, identity headers in disguise, forwarded
//! addresses. Every test generates its variants.

use super::*;
use proptest::prelude::*;

fn raw<'c>(c: &'c Config, method: &[u8], path: &[u8], hs: &[(&str, &str)]) -> Decision<'c> {
    let hs = headers(hs);
    let req = Request {
        method,
        path,
        headers: &hs,
        peer: Peer::Connection("127.0.0.1".parse().unwrap()),
    };
    decide(
        c,
        &req,
        ns(NOW),
        &MemoryStore::default(),
        &mut Leases::default(),
    )
}

/// Every byte a path may not hold raw, in the path and in the query string.
#[test]
fn unreadable_paths_are_refused_with_400() {
    let c = config_with("");
    let mut bad: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"*".to_vec(),
        b"v1/admin".to_vec(),
        b"http://host/v1/admin".to_vec(),
        b"/v1/admin#frag".to_vec(),
        b"/v1/admin%00.json".to_vec(),
        b"/v1/admin%0a".to_vec(),
        b"/v1/%7F".to_vec(),
        b"/v1/%1b/admin".to_vec(),
    ];
    for byte in (0u8..=0x20).chain(0x7f..=0xff) {
        bad.push([b"/v1/admin/".as_slice(), &[byte], b"users"].concat());
        bad.push([b"/v1/admin/users?".as_slice(), &[byte]].concat());
        bad.push([b"/".as_slice(), &[byte]].concat());
    }
    for path in &bad {
        for key in [ADMIN_KEY, CLIENT_KEY] {
            let d = raw(&c, b"GET", path, &[("x-api-key", key)]);
            assert_eq!(reason(&d), Some(Reason::InvalidRequest), "{path:?}");
            assert_eq!(Reason::InvalidRequest.status(), 400);
        }
    }
    // The same paths on a catch-all public rule are refused too, not let through.
    let open = Config::from_json(
        format!(
            r#"{{"keys": [{{"id": "k", "hash": "{}", "role": "client"}}], "routes": [{{"prefix": "/", "public": true}}]}}"#,
            hash_string(CLIENT_KEY.as_bytes())
        )
        .as_bytes(),
    )
    .unwrap();
    for path in &bad {
        assert_eq!(
            reason(&raw(&open, b"GET", path, &[])),
            Some(Reason::InvalidRequest)
        );
    }
}

#[test]
fn unreadable_methods_are_refused_with_400() {
    let c = config_with("");
    let mut bad: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"GE T".to_vec(),
        b"GET\\".to_vec(),
        b"(GET)".to_vec(),
    ];
    for byte in (0u8..=0x20).chain(0x7f..=0xff) {
        bad.push([b"PO".as_slice(), &[byte], b"ST"].concat());
    }
    for method in &bad {
        let d = raw(&c, method, b"/v1/jobs", &[("x-api-key", CLIENT_KEY)]);
        assert_eq!(reason(&d), Some(Reason::InvalidRequest), "{method:?}");
    }
    // A token that is not a known method is readable, and a route listing methods refuses it.
    let d = raw(&c, b"post", b"/v1/jobs", &[("x-api-key", CLIENT_KEY)]);
    assert_eq!(reason(&d), Some(Reason::InsufficientPermissions));
}

/// The ways upstreams read `/v1/admin/users`: servlet `;` parameters, percent-escapes
/// (any case), `\`, repeated slashes, dot segments, upper case.
fn variants_of_admin() -> Vec<String> {
    let mut out = vec![
        "/v1/admin".to_string(),
        "/v1/admin/users".into(),
        "/v1/admin;jsessionid=x".into(),
        "/v1;x=1/admin".into(),
        "/v1/admin;/users".into(),
        "/v1;/admin;/users;".into(),
        "/v1/x/..;/admin".into(),
        "/v1/ADMIN".into(),
        "/V1/Admin/users".into(),
        "/v1//admin".into(),
        "//v1///admin/users".into(),
        "/v1/./admin".into(),
        "/v1/x/../admin".into(),
        "/x/../v1/admin".into(),
        "/../../v1/admin".into(),
        "/v1\\admin".into(),
        "/v1%5cadmin".into(),
        "/v1%2fadmin".into(),
        "/v1%2Fadmin/users".into(),
        "/v1/%2e/admin".into(),
        "/v1/x/%2E%2E/admin".into(),
        "/v1/x/.%2e/admin".into(),
        "/v1/admin%3bx".into(),
        "/v1/admin%3Fx=1".into(),
        "/v1/admin%23frag".into(),
        "/v1/admin?role=client".into(),
        "/public/../v1/admin".into(),
        "/healthz/..;/v1/admin".into(),
        "/healthz;/../v1/admin".into(),
        "/healthz/%2e%2e/v1/admin".into(),
    ];
    // Every character of "admin" escaped, upper- and lower-case hex.
    for i in 0.."admin".len() {
        for upper in [false, true] {
            let escaped: String = "admin"
                .char_indices()
                .map(|(j, ch)| {
                    if j == i {
                        if upper {
                            format!("%{:02X}", ch as u8)
                        } else {
                            format!("%{:02x}", ch as u8)
                        }
                    } else {
                        ch.to_string()
                    }
                })
                .collect();
            out.push(format!("/v1/{escaped}/users"));
        }
    }
    out
}

#[test]
fn no_path_form_escapes_a_restricting_rule() {
    let c = config_with("");
    for path in variants_of_admin() {
        let d = raw(&c, b"GET", path.as_bytes(), &[("x-api-key", CLIENT_KEY)]);
        assert_eq!(
            reason(&d),
            Some(Reason::InsufficientPermissions),
            "{path} let a client key through"
        );
        let d = raw(&c, b"GET", path.as_bytes(), &[("x-api-key", ADMIN_KEY)]);
        assert_eq!(admitted_id(&d), Some("admin-1"), "{path} refused the admin");
    }
}

#[test]
fn a_catch_all_restricting_rule_holds_for_every_form() {
    // Only `/public` is open; everything else needs the admin role.
    let c = Config::from_json(
        format!(
            r#"{{"keys": [{{"id": "c", "hash": "{}", "role": "client"}}, {{"id": "a", "hash": "{}", "role": "admin"}}],
                "routes": [{{"prefix": "/public", "public": true}}, {{"prefix": "/", "roles": ["admin"]}}]}}"#,
            hash_string(CLIENT_KEY.as_bytes()),
            hash_string(ADMIN_KEY.as_bytes())
        )
        .as_bytes(),
    )
    .unwrap();
    for path in [
        "/public/../admin",
        "/public/..;/admin",
        "/public;/../admin",
        "/public/%2e%2e/admin",
        "/public%2f..%2fadmin",
        "/public\\..\\admin",
        "/PUBLIC/x",
        "/Public",
    ] {
        let d = raw(&c, b"GET", path.as_bytes(), &[]);
        assert_eq!(reason(&d), Some(Reason::MissingApiKey), "{path} was public");
        let d = raw(&c, b"GET", path.as_bytes(), &[("x-api-key", CLIENT_KEY)]);
        assert_eq!(
            reason(&d),
            Some(Reason::InsufficientPermissions),
            "{path} let a client key through"
        );
    }
    for path in ["/public", "/public/x", "/public/x/../y", "/public?x=/admin"] {
        assert!(raw(&c, b"GET", path.as_bytes(), &[]).is_ok(), "{path}");
    }
}

#[test]
fn ordinary_paths_are_not_held_to_rules_they_do_not_match() {
    let c = config_with("");
    for path in [
        "/v1/administrator",
        "/v1/open/admin",
        "/v1/open;x/admin",
        "/v2/admin",
    ] {
        let d = raw(&c, b"GET", path.as_bytes(), &[("x-api-key", CLIENT_KEY)]);
        assert!(d.is_ok(), "{path}: {d:?}");
    }
}

#[test]
fn identity_headers_in_any_disguise_are_removed() {
    let c = config_with("");
    let sent = [
        ("x-keygate-role", "admin"),
        ("x_keygate_role", "admin"),
        ("X_Keygate_Key_Id", "admin-1"),
        ("x-keygate_scopes", "all"),
        ("x_tenant_id", "t2"),
        ("X_TENANT_ID", "t2"),
        ("x-tenant_id", "t2"),
        ("x_tenant_idx", "keep"),
        ("x-keygatex", "keep"),
        ("x-api-key", CLIENT_KEY),
    ];
    for path in ["/v1/open", "/healthz"] {
        let d = raw(&c, b"GET", path.as_bytes(), &sent);
        let removed = &d.as_ref().unwrap().remove;
        for name in [
            "x-keygate-role",
            "x_keygate_role",
            "x_keygate_key_id",
            "x-keygate_scopes",
            "x_tenant_id",
            "x-tenant_id",
        ] {
            assert!(removed.iter().any(|r| r == name), "{path}: {name} kept");
        }
        for name in ["x_tenant_idx", "x-keygatex"] {
            assert!(!removed.iter().any(|r| r == name), "{path}: {name} removed");
        }
    }
}

fn ip_config() -> Config {
    config_with(
        r#", "ip_rules": {"deny": ["203.0.113.7"]}, "trusted_proxies": ["127.0.0.1"],
            "failed_auth_limit": {"requests": 5, "per": "minute"}"#,
    )
}

fn from_peer<'c>(c: &'c Config, peer: Peer, xff: &[&str], key: &str) -> Decision<'c> {
    let mut hs = vec![("x-api-key", key)];
    hs.extend(xff.iter().map(|v| ("x-forwarded-for", *v)));
    let hs = headers(&hs);
    let req = Request {
        method: b"GET",
        path: b"/v1/open",
        headers: &hs,
        peer,
    };
    decide(
        c,
        &req,
        ns(NOW),
        &MemoryStore::default(),
        &mut Leases::default(),
    )
}

#[test]
fn forwarded_addresses_fail_closed() {
    let c = ip_config();
    let proxy = Peer::Connection("127.0.0.1".parse().unwrap());
    // The client part of the header never decides.
    for xff in [
        vec!["junk, 203.0.113.7"],
        vec!["junk", "203.0.113.7"],
        vec!["\u{ff}, 203.0.113.7"],
        vec!["1.2.3.4 5.6.7.8, 203.0.113.7"],
    ] {
        let d = from_peer(&c, proxy, &xff, CLIENT_KEY);
        assert_eq!(reason(&d), Some(Reason::IpNotAllowed), "{xff:?}");
    }
    // A malformed deciding entry: the address is unknown, and address rules refuse.
    for xff in [
        vec!["203.0.113.7, junk"],
        vec!["203.0.113.7", " , "],
        vec!["203.0.113.7,"],
    ] {
        let d = from_peer(&c, proxy, &xff, CLIENT_KEY);
        let d = d.unwrap_err();
        assert_eq!(d.reason, Reason::ClientAddressUnknown, "{xff:?}");
        assert_eq!(d.unknown_address, Some(ip::Unknown::MalformedForwardedFor));
    }
    // An address Envoy took from the request (use_remote_address: false).
    let d = from_peer(
        &c,
        Peer::FromRequest("198.51.100.1".parse().unwrap()),
        &["198.51.100.1"],
        CLIENT_KEY,
    )
    .unwrap_err();
    assert_eq!(d.reason, Reason::ClientAddressUnknown);
    assert_eq!(d.unknown_address, Some(ip::Unknown::FromRequest));
    // A key's allowed_ips alone also fails closed.
    let c = Config::from_json(
        format!(
            r#"{{"keys": [{{"id": "k", "hash": "{}", "role": "client", "allowed_ips": ["10.0.0.0/8"]}},
                          {{"id": "free", "hash": "{}", "role": "client"}}]}}"#,
            hash_string(CLIENT_KEY.as_bytes()),
            hash_string(ADMIN_KEY.as_bytes())
        )
        .as_bytes(),
    )
    .unwrap();
    let from_request = Peer::FromRequest("10.0.0.1".parse().unwrap());
    let d = from_peer(&c, from_request, &["10.0.0.1"], CLIENT_KEY).unwrap_err();
    assert_eq!(d.reason, Reason::ClientAddressUnknown);
    assert_eq!(d.subject, Subject::Key("k".into()));
    // A key without allowed_ips does not need the address.
    assert!(from_peer(&c, from_request, &["10.0.0.1"], ADMIN_KEY).is_ok());
}

#[test]
fn failed_authentications_are_charged_to_the_client_not_the_proxy() {
    let c = ip_config();
    let store = MemoryStore::default();
    let proxy = Peer::Connection("127.0.0.1".parse().unwrap());
    let send = |xff: &str, key: &str| {
        let hs = headers(&[("x-api-key", key), ("x-forwarded-for", xff)]);
        let req = Request {
            method: b"GET",
            path: b"/v1/open",
            headers: &hs,
            peer: proxy,
        };
        reason(&decide(&c, &req, ns(NOW), &store, &mut Leases::default()))
    };
    for _ in 0..5 {
        assert_eq!(
            send("junk, 198.51.100.9", "wrong-key-0123456789"),
            Some(Reason::InvalidApiKey)
        );
    }
    assert_eq!(
        send("198.51.100.9", CLIENT_KEY),
        Some(Reason::TooManyFailedAttempts)
    );
    // Another client behind the same proxy is not affected.
    assert_eq!(send("198.51.100.10", CLIENT_KEY), None);
}

/// Pieces paths are made of, the tricky ones included.
const PIECES: &[&str] = &[
    "/",
    "v1",
    "admin",
    "ADMIN",
    "Admin",
    "public",
    "users",
    ";x=1",
    ";",
    "%2e",
    "%2E%2e",
    "..",
    ".",
    "%2f",
    "%5c",
    "\\",
    "//",
    "%61",
    "%3b",
    "?q=/admin",
];

const PREFIXES: &[&str] = &["/", "/v1", "/v1/admin", "/admin", "/public", "/v1/users"];

proptest! {
    /// For every path and rule set, keygate never holds a request to less than the rule
    /// of its normalised path: if the path is admitted, so is its normalised form, and if
    /// it is public, so is its normalised form.
    #[test]
    fn the_rule_applied_is_never_weaker_than_the_normalised_paths(
        pieces in proptest::collection::vec(0..PIECES.len(), 1..10),
        rules in proptest::collection::vec((0..PREFIXES.len(), 0..3u8), 1..5),
    ) {
        let path: String = std::iter::once("/")
            .chain(pieces.iter().map(|&i| PIECES[i]))
            .collect();
        let routes: Vec<String> = rules
            .iter()
            .map(|&(p, kind)| match kind {
                0 => format!(r#"{{"prefix": "{}", "public": true}}"#, PREFIXES[p]),
                1 => format!(r#"{{"prefix": "{}", "roles": ["admin"]}}"#, PREFIXES[p]),
                _ => format!(r#"{{"prefix": "{}"}}"#, PREFIXES[p]),
            })
            .collect();
        let json = format!(
            r#"{{"keys": [{{"id": "c", "hash": "{}", "role": "client"}}, {{"id": "a", "hash": "{}", "role": "admin"}}],
                "routes": [{}]}}"#,
            hash_string(CLIENT_KEY.as_bytes()),
            hash_string(ADMIN_KEY.as_bytes()),
            routes.join(",")
        );
        let Ok(c) = Config::from_json(json.as_bytes()) else {
            return Ok(()); // a shadowed rule: refused at configuration time
        };
        let Ok(forms) = crate::path::forms(path.as_bytes()) else {
            return Ok(());
        };
        let normalised = forms.normalised().to_vec();
        for key in [None, Some(CLIENT_KEY), Some(ADMIN_KEY)] {
            let hs: Vec<(&str, &str)> = key.map(|k| ("x-api-key", k)).into_iter().collect();
            let as_sent = raw(&c, b"GET", path.as_bytes(), &hs);
            let plain = raw(&c, b"GET", &normalised, &hs);
            if as_sent.is_ok() {
                prop_assert!(
                    plain.is_ok(),
                    "{} admitted with {:?} but its normalised form {:?} is not: {:?}",
                    path, key, String::from_utf8_lossy(&normalised), plain
                );
            }
        }
    }
}

#[test]
fn the_health_path_is_answered_only_as_configured() {
    let c = config_with(r#", "health_path": "/keygate/health""#);
    assert!(is_health_check(&c, b"GET", b"/keygate/health"));
    assert!(is_health_check(&c, b"HEAD", b"/keygate/health?probe=1"));
    for (m, p) in [
        (&b"POST"[..], &b"/keygate/health"[..]),
        (b"GET", b"/keygate/health/x"),
        (b"GET", b"/keygate/healthz"),
        (b"GET", b"/KEYGATE/health"),
        (b"GET", b"/keygate/./health"),
    ] {
        assert!(!is_health_check(&c, m, p), "{m:?} {p:?}");
    }
    assert!(!is_health_check(
        &config_with(""),
        b"GET",
        b"/keygate/health"
    ));
    for bad in ["keygate", "/a/../b", "/a?x", "/a b", "/a;x", "/a%20"] {
        let json = format!(
            r#"{{"keys": [{{"id": "k", "hash": "{}", "role": "r"}}], "health_path": "{bad}"}}"#,
            hash_string(CLIENT_KEY.as_bytes())
        );
        let e = Config::from_json(json.as_bytes()).unwrap_err().to_string();
        assert!(e.starts_with("health_path: "), "{bad}: {e}");
    }
}
