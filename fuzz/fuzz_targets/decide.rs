//! The whole access decision on arbitrary requests, against a fixed configuration.
//!
//! Input: `source.address` as Envoy reports it (`127.0.0.1:5000`), a `\n`, then the
//! request's header map serialized as the host hands it over (`wire::encode_pairs`);
//! `:method` and `:path` are taken from the map as the filter takes them. Each input is
//! decided against a fresh copy of a shared store in which one client address is locked
//! out after failed authentications and one key's bucket is empty. `decision::decide`
//! must never panic, and an admitted request:
//! - never carries a `client` key onto a path any reading of which (see `path::Forms`;
//!   compared ignoring ASCII case) lies under `/v1/admin`, which is for `admin` only;
//! - comes from a known client address outside the denied block;
//! - never uses a revoked, suspended or exhausted key (a single-rate plan's, a two-rate
//!   plan's whose day is spent, or a successor's whose predecessor's is), or comes from
//!   the locked address with a key;
//! - has every client-sent identity header (`x-keygate-*`, `x_tenant_id`) removed.
#![no_main]

use keygate::config::Config;
use keygate::credentials::Header;
use keygate::decision::{self, Decision, Reason, Request};
use keygate::ip::{self, Peer};
use keygate::keys;
use keygate::path;
use keygate::ratelimit::{Leases, Store, StoreError};
use keygate::wire;
use libfuzzer_sys::fuzz_target;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::LazyLock;

/// Keys of the fixed configuration: (id, key, role, extra fields).
#[rustfmt::skip]
const KEYS: &[(&str, &str, &str, &str)] = &[
    ("admin", "fuzz-admin-key-0001", "admin", ""),
    ("client", "fuzz-client-key-0001", "client", r#", "scopes": ["jobs:read"]"#),
    ("tenant", "fuzz-client-key-0002", "client", r#", "tenant": "t1""#),
    ("office", "fuzz-client-key-0003", "client", r#", "allowed_ips": ["10.1.0.0/16"]"#),
    ("drained", "fuzz-drained-key-0001", "client", r#", "plan": "tiny""#),
    ("revoked", "fuzz-revoked-key-0001", "admin", r#", "status": "revoked""#),
    ("suspended", "fuzz-suspended-key-01", "admin", r#", "status": "suspended""#),
    ("drained2", "fuzz-drained-key-0002", "client", r#", "plan": "two""#),
    ("successor", "fuzz-successor-key-01", "client", r#", "plan": "tiny", "shares_quota_with": "drained""#),
];

/// Host time of every decision: 2027-01-15T08:00:00Z.
const NOW_NS: u64 = 1_800_000_000 * 1_000_000_000;

/// The address locked out by failed authentications before any input is decided.
const LOCKED: &str = "198.51.100.66";

/// The block `ip_rules` denies.
const DENIED: &str = "203.0.113.0/24";

/// The configuration, and the store contents every input starts from.
static FIXTURE: LazyLock<(Config, Values)> = LazyLock::new(|| {
    let keys: Vec<String> = KEYS
        .iter()
        .map(|(id, key, role, extra)| {
            format!(
                r#"{{"id": "{id}", "hash": "{}", "role": "{role}"{extra}}}"#,
                keys::hash_string(key.as_bytes())
            )
        })
        .collect();
    let json = format!(
        r#"{{
          "keys": [{}],
          "routes": [
            {{"prefix": "/v1/admin", "roles": ["admin"]}},
            {{"prefix": "/v1/public", "public": true}},
            {{"prefix": "/v1/jobs", "methods": ["GET", "POST"], "scopes": ["jobs:read"]}},
            {{"prefix": "/"}}
          ],
          "plans": {{
            "tiny": {{"requests": 1, "per": "day"}},
            "two": [{{"requests": 5, "per": "minute"}}, {{"requests": 1, "per": "day"}}]
          }},
          "rate_limit_headers": "ietf",
          "ip_rules": {{"deny": ["{DENIED}"]}},
          "trusted_proxies": ["127.0.0.1/32"],
          "failed_auth_limit": {{"requests": 3, "per": "minute"}},
          "allow_cors_preflight": true,
          "health_path": "/keygate/health",
          "key_format": {{"prefix": "kg", "checksum": true}}
        }}"#,
        keys.join(", ")
    );
    let config = match Config::from_json(json.as_bytes()) {
        Ok(c) => c,
        Err(e) => panic!("the fixed configuration does not compile: {e}"),
    };

    // Lock LOCKED out, and empty the drained key's bucket, through decisions alone.
    let store = Shared::default();
    let peer = format!("{LOCKED}:4000");
    for _ in 0..3 {
        let d = run(
            &config,
            &store,
            &peer,
            &[
                (":method", "GET"),
                (":path", "/"),
                ("x-api-key", "fuzz-wrong-key-00001"),
            ],
        );
        expect(&d, Reason::InvalidApiKey);
    }
    let admin = [
        (":method", "GET"),
        (":path", "/v1/admin"),
        ("x-api-key", KEYS[0].1),
    ];
    expect(
        &run(&config, &store, &peer, &admin),
        Reason::TooManyFailedAttempts,
    );
    let drained = [(":method", "GET"), (":path", "/"), ("x-api-key", KEYS[4].1)];
    let d = run(&config, &store, "198.51.100.7:4000", &drained);
    assert!(d.is_ok(), "the drained key's one request is refused: {d:?}");
    expect(
        &run(&config, &store, "198.51.100.7:4000", &drained),
        Reason::RateLimited,
    );
    // The two-rate key's day is spent by one request, and the successor of the drained
    // key spends its predecessor's (empty) bucket.
    let drained2 = [(":method", "GET"), (":path", "/"), ("x-api-key", KEYS[7].1)];
    let d = run(&config, &store, "198.51.100.7:4000", &drained2);
    assert!(d.is_ok(), "the two-rate key's one request is refused: {d:?}");
    expect(
        &run(&config, &store, "198.51.100.7:4000", &drained2),
        Reason::RateLimited,
    );
    let successor = [(":method", "GET"), (":path", "/"), ("x-api-key", KEYS[8].1)];
    expect(
        &run(&config, &store, "198.51.100.7:4000", &successor),
        Reason::RateLimited,
    );
    let d = run(&config, &store, "198.51.100.7:4000", &admin);
    assert!(d.is_ok(), "the admin key is refused on /v1/admin: {d:?}");
    let values = store.values.into_inner();
    (config, values)
});

fuzz_target!(|data: &[u8]| {
    let (config, values) = &*FIXTURE;
    let (source, map) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    // A map that does not decode is refused by the filter before any decision, and so is
    // the health probe answered.
    let Ok(headers) = wire::decode_pairs(map) else {
        return;
    };
    if decision::is_health_check(
        config,
        pseudo(&headers, ":method"),
        pseudo(&headers, ":path"),
    ) {
        return;
    }
    let peer = ip::parse_source_address(source);
    let store = Shared::with(values.clone());
    let decision = decide(config, &store, peer, &headers);
    let Ok(admission) = decision else {
        return;
    };

    let method = pseudo(&headers, ":method");
    let raw_path = pseudo(&headers, ":path");
    let show = || {
        format!(
            "{} {} from {:?} with {:?}",
            method.escape_ascii(),
            raw_path.escape_ascii(),
            peer,
            admission.key.as_ref().map(|k| k.id.as_ref())
        )
    };

    // The client address, as the decision derives it.
    let xff: Vec<&[u8]> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("x-forwarded-for"))
        .map(|&(_, v)| v)
        .collect();
    let client = ip::client_address(peer, &xff, &config.trusted_proxies);
    let denied: ip::Cidr = ip::Cidr::parse(DENIED).unwrap_or_else(|e| panic!("{e}"));
    match client {
        Ok(addr) => assert!(
            !denied.contains(addr),
            "admitted from denied {addr}: {}",
            show()
        ),
        Err(why) => panic!("admitted from an unknown address ({why:?}): {}", show()),
    }

    // Identity headers only keygate may set: `x-keygate-*`, and `x_tenant_id`, which
    // upstreams that read `_` as `-` take for X-Tenant-ID.
    for (name, _) in headers.iter() {
        let folded = name.to_ascii_lowercase().replace('_', "-");
        let spoofed = folded.starts_with(decision::IDENTITY_PREFIX)
            || (name.contains('_') && folded == "x-tenant-id");
        if spoofed {
            assert!(
                admission.remove.contains(&name.to_ascii_lowercase()),
                "{name} is not removed: {}",
                show()
            );
        }
    }

    let Some(key) = &admission.key else {
        return;
    };
    assert!(
        !matches!(
            key.id.as_ref(),
            "revoked" | "suspended" | "drained" | "drained2" | "successor"
        ),
        "admitted with a key that must be refused: {}",
        show()
    );
    let locked: IpAddr = LOCKED.parse().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        client != Ok(locked),
        "admitted with a key from the locked address: {}",
        show()
    );

    if key.key.role == "client" {
        // Admitted, so the path reads; every reading is held to the admin rule.
        let forms = path::forms(raw_path)
            .unwrap_or_else(|e| panic!("admitted, yet the path does not read ({e}): {}", show()));
        for form in forms.iter() {
            assert!(
                !path::prefix_covers(b"/v1/admin", form, true),
                "a client key is admitted under /v1/admin (form {}): {}",
                form.escape_ascii(),
                show()
            );
        }
        assert!(!path::prefix_covers(b"/v1/admin", forms.normalised(), true));
    }
});

/// `:method` or `:path` as the filter takes it: the first header of that exact name.
fn pseudo<'h>(headers: &[Header<'h>], name: &str) -> &'h [u8] {
    headers
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(&[][..], |&(_, v)| v)
}

fn decide<'c>(
    config: &'c Config,
    store: &Shared,
    peer: Peer,
    headers: &[Header<'_>],
) -> Decision<'c> {
    let request = Request {
        method: pseudo(headers, ":method"),
        path: pseudo(headers, ":path"),
        headers,
        peer,
    };
    decision::decide(config, &request, NOW_NS, store, &mut Leases::default())
}

fn run<'c>(
    config: &'c Config,
    store: &Shared,
    source: &str,
    pairs: &[(&str, &str)],
) -> Decision<'c> {
    let map = wire::encode_pairs(pairs);
    let headers = wire::decode_pairs(&map).unwrap_or_default();
    decide(
        config,
        store,
        ip::parse_source_address(source.as_bytes()),
        &headers,
    )
}

fn expect(d: &Decision<'_>, reason: Reason) {
    match d {
        Err(denial) if denial.reason == reason => {}
        other => panic!("expected {reason:?}, got {other:?}"),
    }
}

/// Stored values by name, each with its version.
type Values = BTreeMap<String, (Vec<u8>, u32)>;

/// An in-memory shared-data double with Envoy's compare-and-swap: a write with version 0
/// is unconditional, another version must be the stored one (a name never written takes
/// any), and every write gets a new version.
#[derive(Default)]
struct Shared {
    values: RefCell<Values>,
    version: Cell<u32>,
}

impl Shared {
    fn with(values: Values) -> Shared {
        let version = values.values().map(|(_, v)| *v).max().unwrap_or(0);
        Shared {
            values: RefCell::new(values),
            version: Cell::new(version),
        }
    }
}

impl Store for Shared {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        Ok(self.values.borrow().get(key).cloned())
    }

    fn set(&self, key: &str, value: &[u8], version: u32) -> Result<(), StoreError> {
        let mut values = self.values.borrow_mut();
        if version != 0 && values.get(key).is_some_and(|(_, v)| *v != version) {
            return Err(StoreError::Conflict);
        }
        self.version.set(self.version.get().wrapping_add(1).max(1));
        values.insert(key.to_string(), (value.to_vec(), self.version.get()));
        Ok(())
    }
}
