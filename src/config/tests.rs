use super::*;

const HASH_A: &str = "sha256:3fdb536b7aa2eccdaec0c7162262f499b2c6af7b95096edae688f064006df729";
const HASH_B: &str = "sha256:0f276ec700df7954d9acc7556c190041248adad5c917636cd407dec90830fbea";

fn parse(json: &str) -> Result<Config, ConfigError> {
    Config::from_json(json.as_bytes())
}

fn err(json: &str) -> String {
    match parse(json) {
        Ok(_) => panic!("accepted: {json}"),
        Err(e) => e.to_string(),
    }
}

fn one_key(fields: &str) -> String {
    format!(r#"{{"keys": [{{"id": "k1", "hash": "{HASH_A}", "role": "client"{fields}}}]}}"#)
}

#[test]
fn issue_example_parses_with_every_field() {
    let c = parse(&format!(
        r#"{{
          "realm": "keygate",
          "key_sources": [{{"header": "x-api-key"}}, {{"header": "authorization", "scheme": "Bearer"}}],
          "keys": [{{
            "id": "client-1", "hash": "{HASH_A}",
            "client": "acme", "tenant": "test-tenant", "role": "client",
            "scopes": ["jobs:write"], "status": "active",
            "expires_at": "2027-01-01T00:00:00Z"
          }}],
          "routes": [
            {{"prefix": "/healthz", "public": true}},
            {{"prefix": "/v1/admin", "roles": ["admin"]}},
            {{"prefix": "/v1/jobs", "methods": ["POST"], "roles": ["client", "admin"], "scopes": ["jobs:write"]}}
          ],
          "strip_credentials": true,
          "allow_cors_preflight": false
        }}"#
    ))
    .unwrap();
    assert_eq!(c.realm, "keygate");
    assert_eq!(c.www_authenticate, "ApiKey realm=\"keygate\"");
    assert_eq!(c.keys.len(), 1);
    let k = &c.keys[0];
    assert_eq!(k.id, "client-1");
    assert_eq!(k.client.as_deref(), Some("acme"));
    assert_eq!(k.tenant.as_deref(), Some("test-tenant"));
    assert_eq!(k.scopes_header, "jobs:write");
    assert_eq!(k.status, KeyStatus::Active);
    assert_eq!(k.expires_at, Some(1_798_761_600));
    assert_eq!(c.index.find(b"test_client_key_16_chars"), Some(0));
    assert_eq!(c.routes.len(), 3);
    assert_eq!(c.routes[2].methods, vec!["POST"]);
    assert!(c.strip_credentials);
    assert!(!c.allow_cors_preflight);
}

#[test]
fn defaults() {
    let c = parse(&one_key("")).unwrap();
    assert_eq!(c.realm, "keygate");
    assert_eq!(
        c.key_sources,
        vec![
            KeySource {
                header: "x-api-key".into(),
                scheme: None
            },
            KeySource {
                header: "authorization".into(),
                scheme: Some("Bearer".into())
            },
        ]
    );
    assert_eq!(c.keys[0].status, KeyStatus::Active);
    assert!(c.keys[0].scopes.is_empty());
    assert_eq!(c.keys[0].expires_at, None);
    assert!(c.routes.is_empty());
    assert!(c.strip_credentials);
    assert!(!c.allow_cors_preflight);
}

#[test]
fn header_names_are_lowercased() {
    let c = parse(&format!(
        r#"{{"key_sources": [{{"header": "X-Custom-Key"}}], "keys": [{{"id": "k1", "hash": "{HASH_A}", "role": "r"}}]}}"#
    ))
    .unwrap();
    assert_eq!(c.key_sources[0].header, "x-custom-key");
}

#[test]
fn syntax_errors_name_the_field() {
    assert!(err("").starts_with("configuration: the plugin configuration is empty"));
    assert!(
        err("{").starts_with("configuration: EOF while parsing"),
        "{}",
        err("{")
    );
    assert!(
        err("\"x\"").starts_with("configuration: invalid type: string"),
        "{}",
        err("\"x\"")
    );
    assert!(
        err("{} x").starts_with("configuration: trailing characters"),
        "{}",
        err("{} x")
    );
    let e = err(r#"{"kes": []}"#);
    assert!(
        e.starts_with("kes: unknown field `kes`, expected one of"),
        "{e}"
    );
    let e = err(&one_key(r#", "nmae": "x""#));
    assert!(e.starts_with("keys[0].nmae: unknown field `nmae`"), "{e}");
    let e = err(r#"{"keys": [{"id": "k1", "role": "r"}]}"#);
    assert!(e.starts_with("keys[0]: missing field `hash`"), "{e}");
    let e = err(&one_key(r#", "status": "paused""#));
    assert!(e.starts_with("keys[0].status: unknown variant `paused`, expected one of `active`, `suspended`, `revoked`"), "{e}");
    let e = err(&one_key(r#", "scopes": "jobs:write""#));
    assert!(e.starts_with("keys[0].scopes: invalid type: string"), "{e}");
    let e = err(r#"{"strip_credentials": "yes", "keys": []}"#);
    assert!(
        e.starts_with("strip_credentials: invalid type: string"),
        "{e}"
    );
    let e = err(r#"{"routes": [{"prefix": "/a", "public": true, "role": "x"}], "keys": []}"#);
    assert!(e.starts_with("routes[0].role: unknown field `role`"), "{e}");
}

#[test]
fn key_errors_name_the_field() {
    let cases: &[(&str, &str)] = &[
        (r#"{"keys": []}"#, "keys: no keys configured"),
        (r#"{}"#, "keys: no keys configured"),
        (
            r#"{"keys": [{"id": "k1", "hash": "sha256:ABC", "role": "r"}]}"#,
            "keys[0].hash: expected \"sha256:\" followed by 64 lowercase hex digits",
        ),
        (
            &format!(
                r#"{{"keys": [{{"id": "k1", "hash": "{}", "role": "r"}}]}}"#,
                HASH_A.to_uppercase()
            ),
            "keys[0].hash: expected",
        ),
        (
            &format!(r#"{{"keys": [{{"id": "", "hash": "{HASH_A}", "role": "r"}}]}}"#),
            "keys[0].id: \"\" is not a valid key id",
        ),
        (
            &format!(r#"{{"keys": [{{"id": "a b", "hash": "{HASH_A}", "role": "r"}}]}}"#),
            "keys[0].id: \"a b\" is not a valid key id",
        ),
        (
            &format!(
                r#"{{"keys": [{{"id": "k1", "hash": "{HASH_A}", "role": "r"}}, {{"id": "k1", "hash": "{HASH_B}", "role": "r"}}]}}"#
            ),
            "keys[1].id: duplicate id \"k1\" (also keys[0].id)",
        ),
        (
            &format!(
                r#"{{"keys": [{{"id": "k1", "hash": "{HASH_A}", "role": "r"}}, {{"id": "k2", "hash": "{HASH_A}", "role": "r"}}]}}"#
            ),
            "keys[1].hash: duplicate hash (also keys[0].hash)",
        ),
        (
            &one_key(r#", "expires_at": "2027-01-01""#),
            "keys[0].expires_at: \"2027-01-01\" is not an RFC 3339 timestamp",
        ),
        (
            &one_key(r#", "expires_at": "tomorrow""#),
            "keys[0].expires_at: \"tomorrow\" is not an RFC 3339",
        ),
        (
            &one_key(r#", "scopes": ["a,b"]"#),
            "keys[0].scopes[0]: \"a,b\" must be 1 to 128 printable ASCII",
        ),
        (
            &one_key(r#", "scopes": ["ok", ""]"#),
            "keys[0].scopes[1]: \"\" must be",
        ),
        (
            &one_key(r#", "tenant": "bad\ntenant""#),
            "keys[0].tenant: \"bad\\ntenant\" must be 1 to 256 printable ASCII",
        ),
        (
            &one_key(r#", "client": " acme""#),
            "keys[0].client: \" acme\" must be",
        ),
        (
            &format!(r#"{{"keys": [{{"id": "k1", "hash": "{HASH_A}", "role": "a b"}}]}}"#),
            "keys[0].role: \"a b\" must be",
        ),
    ];
    for (json, want) in cases {
        let e = err(json);
        assert!(
            e.starts_with(want),
            "config {json}\n  got:  {e}\n  want: {want}..."
        );
    }
}

#[test]
fn other_field_errors() {
    let cases: &[(&str, &str)] = &[
        (r#""realm": "a\"b""#, "realm: must be non-empty printable ASCII"),
        (r#""realm": """#, "realm: must be non-empty"),
        (r#""key_sources": []"#, "key_sources: must name at least one header"),
        (r#""key_sources": [{"header": "x api"}]"#, "key_sources[0].header: \"x api\" is not a valid HTTP header name"),
        (r#""key_sources": [{"header": "X-Keygate-Key-Id"}]"#, "key_sources[0].header: x-keygate-* headers are set by keygate"),
        (r#""key_sources": [{"header": "authorization", "scheme": "Bear er"}]"#, "key_sources[0].scheme: \"Bear er\" is not a valid"),
        (
            r#""key_sources": [{"header": "x-api-key"}, {"header": "X-API-KEY"}]"#,
            "key_sources[1]: duplicate key source",
        ),
        (r#""routes": [{"prefix": "v1"}]"#, "routes[0].prefix: \"v1\" must start with \"/\""),
        (r#""routes": [{"prefix": "/a?b"}]"#, "routes[0].prefix: \"/a?b\" must start"),
        (
            r#""routes": [{"prefix": "/v1"}, {"prefix": "/v1/jobs", "roles": ["admin"]}]"#,
            "routes[1].prefix: \"/v1/jobs\" is never reached: routes[0] (\"/v1\") matches every such path first",
        ),
        (
            r#""routes": [{"prefix": "/v1/jobs"}, {"prefix": "/v1/jobs", "roles": ["admin"]}]"#,
            "routes[1].prefix: \"/v1/jobs\" is never reached",
        ),
        (r#""routes": [{"prefix": "/a", "roles": []}]"#, "routes[0].roles: must not be empty"),
        (r#""routes": [{"prefix": "/a", "methods": ["post"]}]"#, "routes[0].methods[0]: \"post\" is not an HTTP method in upper case"),
        (r#""routes": [{"prefix": "/a", "scopes": ["x y"]}]"#, "routes[0].scopes[0]: \"x y\" must be"),
        (
            r#""routes": [{"prefix": "/a", "public": true, "roles": ["admin"]}]"#,
            "routes[0]: a public route needs no key, so it cannot also require",
        ),
    ];
    for (fields, want) in cases {
        let json =
            format!(r#"{{{fields}, "keys": [{{"id": "k1", "hash": "{HASH_A}", "role": "r"}}]}}"#);
        let e = err(&json);
        assert!(
            e.starts_with(want),
            "config {json}\n  got:  {e}\n  want: {want}..."
        );
    }
}

#[test]
fn no_keys_is_fine_only_when_everything_is_public() {
    assert!(parse(r#"{"routes": [{"prefix": "/", "public": true}]}"#).is_ok());
    let e = err(
        r#"{"routes": [{"prefix": "/admin", "roles": ["admin"]}, {"prefix": "/", "public": true}]}"#,
    );
    assert!(e.starts_with("keys: no keys configured"), "{e}");
}

#[test]
fn route_matching_is_first_prefix_without_query() {
    let c = parse(&format!(
        r#"{{"keys": [{{"id": "k1", "hash": "{HASH_A}", "role": "r"}}],
            "routes": [{{"prefix": "/v1/jobs/special"}}, {{"prefix": "/v1/jobs"}}, {{"prefix": "/healthz", "public": true}}]}}"#
    ))
    .unwrap();
    let prefix = |p: &str| c.route_for(p).map(|r| r.prefix.as_str());
    assert_eq!(prefix("/v1/jobs"), Some("/v1/jobs"));
    assert_eq!(prefix("/v1/jobs/1"), Some("/v1/jobs"));
    assert_eq!(prefix("/v1/jobs/special/1"), Some("/v1/jobs/special"));
    assert_eq!(prefix("/healthz?probe=1"), Some("/healthz"));
    assert_eq!(prefix("/v1?x=/v1/jobs"), None);
    assert_eq!(prefix("/other"), None);
    // Whole segments only.
    assert_eq!(prefix("/v1/jobsearch"), None);
    assert_eq!(prefix("/healthz-internal"), None);
    assert_eq!(prefix("/v1/jobs/"), Some("/v1/jobs"));
}

#[test]
fn prefixes_ending_in_slash_cover_everything_below() {
    let c = parse(&format!(
        r#"{{"keys": [{{"id": "k1", "hash": "{HASH_A}", "role": "r"}}],
            "routes": [{{"prefix": "/static/", "public": true}}, {{"prefix": "/", "roles": ["admin"]}}]}}"#
    ))
    .unwrap();
    let prefix = |p: &str| c.route_for(p).map(|r| r.prefix.as_str());
    assert_eq!(prefix("/static/app.js"), Some("/static/"));
    assert_eq!(prefix("/static"), Some("/"));
    assert_eq!(prefix("/anything"), Some("/"));
    assert_eq!(prefix("/"), Some("/"));
}

#[test]
fn serializes_back_to_the_same_document() {
    let json = format!(
        r#"{{"keys":[{{"id":"k1","hash":"{HASH_A}","tenant":"t","role":"client","scopes":["a"],"status":"suspended","expires_at":"2027-01-01T00:00:00Z"}}],"routes":[{{"prefix":"/h","public":true}},{{"prefix":"/a","roles":["admin"]}}],"strip_credentials":false}}"#
    );
    let doc = PluginConfig::from_json(json.as_bytes()).unwrap();
    assert_eq!(serde_json::to_string(&doc).unwrap(), json);
}

/// The key-set form: the first 16 bytes of each digest, concatenated, in base64.
fn packed(keys: &[&str]) -> String {
    use base64::Engine as _;
    let bytes: Vec<u8> = keys
        .iter()
        .flat_map(|k| prefix_of(&keys::digest(k.as_bytes())))
        .collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn with_set(set_fields: &str) -> String {
    format!(
        r#"{{"keys": [{{"id": "k1", "hash": "{HASH_A}", "role": "client"}}], "key_sets": [{{{set_fields}}}]}}"#
    )
}

#[test]
fn key_sets_decode_packed_digests_and_find_members() {
    // 7 members: the base64 spans more than one 128-character decoding chunk and ends
    // with padding.
    let members: Vec<String> = (0..7)
        .map(|i| format!("legacy-member-key-{i:04}"))
        .collect();
    let refs: Vec<&str> = members.iter().map(String::as_str).collect();
    let c = parse(&with_set(&format!(
        r#""name": "legacy", "role": "miner", "client": "old", "scopes": ["jobs:read"], "plan": "pro", "digests": ["{}"]"#,
        packed(&refs)
    )))
    .unwrap();
    assert_eq!(c.key_count(), 8);
    assert_eq!(c.key_sets[0].digests.len(), 7);
    for m in &members {
        let d = keys::digest(m.as_bytes());
        let found = c.find_key(&d).unwrap();
        let hex: String = d[..8].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(found.id, format!("legacy:{hex}"));
        assert_eq!(found.bucket, format!("{BUCKET_PREFIX}legacy:{hex}"));
        assert_eq!(found.key.role, "miner");
        assert_eq!(found.key.scopes_header, "jobs:read");
        assert_eq!(found.key.limit.as_ref().unwrap().plan, "pro");
    }
    // Explicit keys are found as before; unknown digests are not found.
    let k1 = c
        .find_key(&keys::digest(b"test_client_key_16_chars"))
        .unwrap();
    assert_eq!(
        (k1.id.as_ref(), k1.bucket.as_ref()),
        ("k1", "keygate:bucket:k1")
    );
    assert!(c
        .find_key(&keys::digest(b"legacy-member-key-9999"))
        .is_none());

    // The packed form survives a round trip through serde (what the keygate tool writes).
    let doc = PluginConfig::from_json(
        with_set(&format!(
            r#""name": "legacy", "role": "miner", "digests": ["{}"]"#,
            packed(&refs)
        ))
        .as_bytes(),
    )
    .unwrap();
    let again = PluginConfig::from_json(serde_json::to_string(&doc).unwrap().as_bytes()).unwrap();
    assert_eq!(doc, again);
}

#[test]
fn key_set_errors_name_the_field() {
    let one = packed(&["legacy-member-key-0000"]);
    let cases = [
        (
            with_set(r#""name": "s", "role": "client", "digests": ["not base64!"]"#),
            "key_sets[0].digests[0]: not valid base64",
        ),
        (
            with_set(r#""name": "s", "role": "client", "digests": ["AAAA"]"#),
            "key_sets[0].digests[0]: decodes to 3 bytes, not a whole number of 16-byte digest prefixes",
        ),
        (
            with_set(r#""name": "s", "role": "client", "digests": "one string""#),
            "key_sets[0].digests: invalid type: string \"one string\", expected a list of base64 strings",
        ),
        (
            with_set(r#""name": "s", "role": "client", "digests": []"#),
            "key_sets[0].digests: no digests",
        ),
        (
            with_set(&format!(r#""name": "bad name", "role": "client", "digests": ["{one}"]"#)),
            "key_sets[0].name: \"bad name\" is not a valid key set name",
        ),
        (
            with_set(&format!(r#""name": "s", "role": "client", "plan": "gold", "digests": ["{one}"]"#)),
            "key_sets[0].plan: unknown plan \"gold\"",
        ),
        (
            with_set(&format!(r#""name": "s", "role": "client", "allowed_ips": ["10.0.0.0/33"], "digests": ["{one}"]"#)),
            "key_sets[0].allowed_ips[0]:",
        ),
        (
            with_set(&format!(r#""name": "s", "role": "client", "expires_at": "soon", "digests": ["{one}"]"#)),
            "key_sets[0].expires_at:",
        ),
        (
            with_set(&format!(r#""name": "s", "role": "client", "status": "revoked", "digests": ["{one}"]"#)),
            "key_sets[0].status: unknown field `status`",
        ),
        (
            with_set(&format!(
                r#""name": "s", "role": "client", "digests": ["{}"]"#,
                packed(&["legacy-member-key-0000", "legacy-member-key-0000"])
            )),
            "appears twice",
        ),
        (
            with_set(&format!(
                r#""name": "s", "role": "client", "digests": ["{}"]"#,
                packed(&["test_client_key_16_chars"])
            )),
            "key_sets[0].digests: the digest 3fdb536b7aa2eccdaec0c7162262f499... is also keys[0].hash",
        ),
        (
            format!(
                r#"{{"keys": [{{"id": "s:0011223344556677", "hash": "{HASH_A}", "role": "client"}}], "key_sets": [{{"name": "s", "role": "client", "digests": ["{one}"]}}]}}"#
            ),
            "key_sets[0].name: keys[0].id \"s:0011223344556677\" has the form of this set's member ids",
        ),
        (
            format!(
                r#"{{"key_sets": [{{"name": "s", "role": "client", "digests": ["{one}"]}}, {{"name": "s", "role": "client", "digests": ["{}"]}}]}}"#,
                packed(&["legacy-member-key-0001"])
            ),
            "key_sets[1].name: duplicate key set name \"s\" (also key_sets[0].name)",
        ),
        (
            format!(
                r#"{{"key_sets": [{{"name": "a", "role": "client", "digests": ["{one}"]}}, {{"name": "b", "role": "client", "digests": ["{one}"]}}]}}"#
            ),
            "is also in key_sets[0]",
        ),
    ];
    for (json, expect) in cases {
        let e = err(&json);
        assert!(e.contains(expect), "{json}\n  got: {e}\n  want: {expect}");
    }
    // Digests are bytes: two that share their first 8 bytes would give one member id.
    let mut twins = vec![0x11u8; 32];
    twins[16 + 10] = 0x12;
    use base64::Engine as _;
    let e = err(&with_set(&format!(
        r#""name": "s", "role": "client", "digests": ["{}"]"#,
        base64::engine::general_purpose::STANDARD.encode(&twins)
    )));
    assert!(
        e.starts_with(
            "key_sets[0].digests: two digests begin with the same 8 bytes (1111111111111111...)"
        ),
        "{e}"
    );
    // A configuration with only key sets is complete.
    let only = parse(&format!(
        r#"{{"key_sets": [{{"name": "s", "role": "client", "digests": ["{one}"]}}]}}"#
    ))
    .unwrap();
    assert_eq!((only.keys.len(), only.key_count()), (0, 1));
}

/// Hands out at most `step` bytes per read, as the host does with a chunked buffer.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
}

impl std::io::Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.step.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

#[test]
fn reading_in_chunks_gives_the_same_configuration_and_errors() {
    let members: Vec<String> = (0..2500)
        .map(|i| format!("chunked-member-key-{i:05}"))
        .collect();
    let refs: Vec<&str> = members.iter().map(String::as_str).collect();
    // Three strings of different lengths (whole digests each): 1000 + 1 + 1499 members.
    let json = format!(
        r#"{{"keys": [{{"id": "k1", "hash": "{HASH_A}", "role": "client"}}],
            "key_sets": [{{"name": "big", "role": "client", "digests": ["{}", "{}", "{}"]}}],
            "routes": [{{"prefix": "/healthz", "public": true}}]}}"#,
        packed(&refs[..1000]),
        packed(&refs[1000..1001]),
        packed(&refs[1001..])
    );
    let whole = parse(&json).unwrap();
    for step in [1, 7, 4096] {
        let read = Config::from_reader(
            Trickle {
                data: json.as_bytes(),
                step,
            },
            json.len(),
        )
        .unwrap();
        assert_eq!(read.key_count(), 2501);
        assert_eq!(read.key_sets, whole.key_sets);
        assert_eq!(read.routes, whole.routes);
    }
    let d = keys::digest(b"chunked-member-key-02499");
    assert!(whole.find_key(&d).is_some());

    // Written back, a large set becomes several strings of whole digests, and reads back the same.
    let doc = PluginConfig::from_json(json.as_bytes()).unwrap();
    let text = serde_json::to_string(&doc).unwrap();
    let strings = serde_json::from_str::<serde_json::Value>(&text).unwrap()["key_sets"][0]
        ["digests"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(strings, 3); // 2500 digests, 1024 per string
    assert_eq!(PluginConfig::from_json(text.as_bytes()).unwrap(), doc);

    // Errors read the same in chunks, and an empty configuration is refused by size.
    let bad = with_set(r#""name": "s", "role": "client", "digests": ["AAAA"]"#);
    let e = Config::from_reader(
        Trickle {
            data: bad.as_bytes(),
            step: 5,
        },
        bad.len(),
    )
    .unwrap_err();
    assert_eq!(e.to_string(), err(&bad));
    let e = Config::from_reader(Trickle { data: b"", step: 5 }, 0).unwrap_err();
    assert_eq!(e.path, "configuration");
    assert!(e.reason.contains("empty"), "{e}");
}

#[test]
fn per_key_metrics_are_off_unless_asked_for_and_capped() {
    let c = parse(&one_key("")).unwrap();
    assert_eq!(c.per_key_metrics, None);
    let with = |extra: &str| {
        format!(r#"{{"keys": [{{"id": "k1", "hash": "{HASH_A}", "role": "client"}}]{extra}}}"#)
    };
    assert_eq!(
        parse(&with(r#", "per_key_metrics": true"#))
            .unwrap()
            .per_key_metrics,
        Some(1000)
    );
    assert_eq!(
        parse(&with(
            r#", "per_key_metrics": true, "per_key_metrics_max": 2"#
        ))
        .unwrap()
        .per_key_metrics,
        Some(2)
    );
    assert_eq!(
        parse(&with(
            r#", "per_key_metrics": false, "per_key_metrics_max": 2"#
        ))
        .unwrap()
        .per_key_metrics,
        None
    );
    assert_eq!(
        parse(&with(
            r#", "per_key_metrics": true, "per_key_metrics_max": 100000"#
        ))
        .unwrap()
        .per_key_metrics,
        Some(100_000)
    );
    for bad in ["0", "100001"] {
        let e = err(&with(&format!(
            r#", "per_key_metrics": true, "per_key_metrics_max": {bad}"#
        )));
        assert!(
            e.starts_with("per_key_metrics_max: must be between 1 and 100000"),
            "{e}"
        );
    }
    let e = err(&with(r#", "per_key_metrics": "yes""#));
    assert!(e.starts_with("per_key_metrics:"), "{e}");
}

#[test]
fn route_names_round_trip_and_label_the_rule() {
    let json = format!(
        r#"{{"keys": [{{"id": "k1", "hash": "{HASH_A}", "role": "client"}}],
            "routes": [{{"prefix": "/v1/jobs", "name": "jobs"}}, {{"prefix": "/v1"}}]}}"#
    );
    let doc = PluginConfig::from_json(json.as_bytes()).unwrap();
    assert_eq!(doc.routes[0].name.as_deref(), Some("jobs"));
    let back = serde_json::to_string(&doc).unwrap();
    assert!(back.contains(r#""name":"jobs""#) && !back.contains(r#""name":null"#));
    let c = Config::compile(&doc).unwrap();
    assert_eq!(
        c.routes
            .iter()
            .map(|r| (r.index, r.label.as_str()))
            .collect::<Vec<_>>(),
        vec![(0, "jobs"), (1, "/v1")]
    );
}

#[test]
fn a_key_may_share_another_keys_quota_but_not_through_a_chain() {
    let h = |c: char| format!("sha256:{}", c.to_string().repeat(64));
    let doc = |a: &str, b: &str, c: &str| {
        format!(
            r#"{{"keys":[
              {{"id":"old","hash":"{}","role":"client"{a}}},
              {{"id":"new","hash":"{}","role":"client"{b}}},
              {{"id":"newer","hash":"{}","role":"client"{c}}}]}}"#,
            h('a'),
            h('b'),
            h('c')
        )
    };
    let config = parse(&doc(
        "",
        r#","shares_quota_with":"old""#,
        r#","shares_quota_with":"old""#,
    ))
    .unwrap();
    let bucket = |id: &str| {
        config
            .keys
            .iter()
            .find(|k| k.id == id)
            .map(|k| k.bucket.clone())
            .unwrap()
    };
    assert_eq!(bucket("old"), bucket("new"));
    assert_eq!(bucket("old"), bucket("newer"));
    assert_eq!(bucket("old"), format!("{BUCKET_PREFIX}old"));

    let e = err(&doc("", r#","shares_quota_with":"gone""#, ""));
    assert!(
        e.contains("keys[1].shares_quota_with") && e.contains("\"gone\" is not the id"),
        "{e}"
    );
    let e = err(&doc("", r#","shares_quota_with":"new""#, ""));
    assert!(
        e.contains("keys[1].shares_quota_with") && e.contains("own quota"),
        "{e}"
    );
    let e = err(&doc(
        "",
        r#","shares_quota_with":"old""#,
        r#","shares_quota_with":"new""#,
    ));
    assert!(
        e.contains("keys[2].shares_quota_with") && e.contains("itself shares"),
        "{e}"
    );
}

fn with_plans(plans: &str, more: &str) -> String {
    format!(
        r#"{{"keys": [{{"id": "k1", "hash": "{HASH_A}", "role": "client", "plan": "pro"}}], "plans": {plans}{more}}}"#
    )
}

#[test]
fn a_plan_may_have_several_rates_and_is_written_back_as_read() {
    let json = with_plans(
        r#"{"pro": [{"requests": 60, "per": "minute"}, {"requests": 1000, "per": "day", "burst": 100}], "solo": {"requests": 5, "per": "second"}}"#,
        "",
    );
    let c = parse(&json).unwrap();
    let limit = c.keys[0].limit.as_ref().unwrap();
    assert_eq!(limit.plan, "pro");
    assert_eq!(
        limit.rates(),
        [
            Rate {
                requests: 60,
                period_ns: 60_000_000_000,
                burst: 60
            },
            Rate {
                requests: 1000,
                period_ns: 86_400_000_000_000,
                burst: 100
            }
        ]
    );
    assert_eq!(limit.rate, limit.rates()[0]);
    assert_eq!(
        limit.limits.policy_header,
        r#""pro/minute";q=60;w=60, "pro/day";q=1000;w=86400;keygate-burst=100"#
    );
    let doc = PluginConfig::from_json(json.as_bytes()).unwrap();
    assert!(matches!(doc.plans["pro"], PlanSpec::Several(ref r) if r.len() == 2));
    assert!(matches!(doc.plans["solo"], PlanSpec::One(_)));
    let again: serde_json::Value = serde_json::to_value(&doc).unwrap();
    assert!(again["plans"]["pro"].is_array());
    assert!(again["plans"]["solo"].is_object());
    assert_eq!(
        PluginConfig::from_json(&serde_json::to_vec(&doc).unwrap()).unwrap(),
        doc
    );
    // The published plans keep their single rate.
    for name in ["free", "pro", "enterprise"] {
        assert_eq!(builtin_plans()[name].rates().len(), 1);
    }
}

#[test]
fn bad_rate_lists_are_refused_by_field() {
    for (plans, want) in [
        (r#"{"pro": []}"#, "plans.pro: an empty list of rates"),
        (
            r#"{"pro": [{"requests": 1, "per": "minute"}, {"requests": 5, "per": "minute"}]}"#,
            "plans.pro[1].per: a second rate per minute (also plans.pro[0])",
        ),
        (
            r#"{"pro": [{"requests": 1, "per": "minute"}, {"requests": 0, "per": "day"}]}"#,
            "plans.pro[1].requests: must be between 1",
        ),
        (
            r#"{"pro": [{"requests": 1, "per": "minute", "burst": 0}]}"#,
            "plans.pro[0].burst: must be between 1",
        ),
        (
            r#"{"pro": [{"requests": 1, "per": "week"}]}"#,
            "plans.pro[0].per: unknown variant `week`",
        ),
        (
            r#"{"pro": [{"requests": 1, "per": "minute", "extra": 1}]}"#,
            "plans.pro[0].extra: unknown field `extra`",
        ),
        (
            r#"{"pro": 60}"#,
            "plans.pro: invalid type: integer `60`, expected a rate",
        ),
    ] {
        let e = err(&with_plans(plans, ""));
        assert!(e.starts_with(want), "{plans}: {e}");
    }
}

#[test]
fn rate_limit_headers_take_a_switch_or_a_style() {
    for (value, style) in [
        ("true", HeaderStyle::XRateLimit),
        ("false", HeaderStyle::Off),
        (r#""x-ratelimit""#, HeaderStyle::XRateLimit),
        (r#""ietf""#, HeaderStyle::Ietf),
    ] {
        let json = format!(
            r#"{{"keys": [{{"id": "k1", "hash": "{HASH_A}", "role": "client"}}], "rate_limit_headers": {value}}}"#
        );
        assert_eq!(parse(&json).unwrap().rate_limit_headers, style, "{value}");
        let doc = PluginConfig::from_json(json.as_bytes()).unwrap();
        let written = serde_json::to_string(&doc).unwrap();
        assert!(
            written.contains(&format!("\"rate_limit_headers\":{value}")),
            "{written}"
        );
    }
    assert_eq!(
        parse(&one_key("")).unwrap().rate_limit_headers,
        HeaderStyle::XRateLimit
    );
    for bad in [r#""IETF""#, r#""draft""#, "1", "[]"] {
        let json = format!(
            r#"{{"keys": [{{"id": "k1", "hash": "{HASH_A}", "role": "client"}}], "rate_limit_headers": {bad}}}"#
        );
        let e = err(&json);
        assert!(
            e.starts_with("rate_limit_headers: ")
                && e.contains(r#"expected true, false, "x-ratelimit" or "ietf""#),
            "{bad}: {e}"
        );
    }
}

#[test]
fn problems_lists_every_error_named_by_id_prefix_and_plan() {
    let doc = PluginConfig::from_json(
        format!(
            r#"{{
              "keys": [
                {{"id": "kg_good", "hash": "{HASH_A}", "role": "client", "plan": "gold"}},
                {{"id": "kg_bad", "hash": "sha256:nope", "role": "a b", "scopes": ["x", "y,z"]}},
                {{"id": "kg_rot", "hash": "{HASH_B}", "role": "client", "shares_quota_with": "kg_gone"}}
              ],
              "routes": [
                {{"prefix": "/v1", "roles": []}},
                {{"prefix": "/v1/admin", "methods": ["get"]}}
              ],
              "plans": {{"pro": [{{"requests": 0, "per": "minute"}}, {{"requests": 5, "per": "minute"}}]}},
              "ip_rules": {{"allow": ["10.0.0.0/33"]}},
              "health_path": "no-slash"
            }}"#
        )
        .as_bytes(),
    )
    .unwrap();
    let all = problems(&doc);
    let paths: Vec<&str> = all.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            r#"routes["/v1"].roles"#,
            r#"routes["/v1/admin"].prefix"#,
            r#"plans["pro"][0].requests"#,
            r#"plans["pro"][1].per"#,
            "ip_rules.allow[0]",
            r#"keys["kg_good"].plan"#,
            r#"keys["kg_bad"].hash"#,
            r#"keys["kg_bad"].role"#,
            r#"keys["kg_bad"].scopes[1]"#,
            r#"keys["kg_rot"].shares_quota_with"#,
            "health_path",
        ],
        "{all:#?}"
    );
    assert!(all[1]
        .reason
        .contains(r#"routes["/v1"] ("/v1") matches every such path first"#));
    // compile refuses with the first of them, by position as always.
    let first = Config::compile(&doc).unwrap_err();
    assert_eq!(first.path, "routes[0].roles");
    assert_eq!(first.reason, all[0].reason);
    // A valid document has none; a policy without keys is fine on its own.
    assert!(problems(&PluginConfig::from_json(one_key("").as_bytes()).unwrap()).is_empty());
    let policy = PluginConfig::from_json(br#"{"default_plan": "free"}"#).unwrap();
    assert!(policy_problems(&policy).is_empty());
    assert_eq!(problems(&policy)[0].path, "keys");
}

#[test]
fn problems_name_by_position_when_a_name_is_not_unique() {
    let doc = PluginConfig::from_json(
        format!(
            r#"{{"keys": [
                {{"id": "same", "hash": "{HASH_A}", "role": "client"}},
                {{"id": "same", "hash": "{HASH_B}", "role": "client"}}
            ]}}"#
        )
        .as_bytes(),
    )
    .unwrap();
    let all = problems(&doc);
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].path, "keys[1].id");
    assert!(all[0].reason.contains("(also keys[0].id)"), "{}", all[0]);
    // A key with a mistake is still known by its id: a successor naming it is fine.
    let doc = PluginConfig::from_json(
        format!(
            r#"{{"keys": [
                {{"id": "old", "hash": "sha256:bad", "role": "client"}},
                {{"id": "new", "hash": "{HASH_B}", "role": "client", "shares_quota_with": "old"}}
            ]}}"#
        )
        .as_bytes(),
    )
    .unwrap();
    let all = problems(&doc);
    let paths: Vec<&str> = all.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, [r#"keys["old"].hash"#]);
}

#[test]
fn compile_stops_at_the_same_first_error_as_problems_in_every_case() {
    // Each document of the error tables above: compile's error is problems' first.
    let docs = [
        one_key(r#","expires_at":"tomorrow""#),
        one_key(r#","scopes":["a,b"],"role":"a b""#),
        r#"{"keys": [], "routes": [{"prefix": "/", "public": true}], "realm": "a\"b"}"#.to_string(),
        with_plans(r#"{"pro": []}"#, r#","default_plan": "nope""#),
    ];
    for json in docs {
        let Ok(doc) = PluginConfig::from_json(json.as_bytes()) else {
            continue;
        };
        let first = Config::compile(&doc).unwrap_err();
        let all = problems_by_position(&doc);
        assert_eq!(problems(&doc).len(), all.len(), "{json}");
        assert_eq!(all.first(), Some(&first), "{json}");
    }
}
