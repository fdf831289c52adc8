//! The `keygate` tool, driven as a user would: the built binary, a store in a temp dir
//! of each test's own, outputs and exit codes asserted.

use keygate::config::Config;
use keygate::keys;
use serde_json::Value;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const BIN: &str = env!("CARGO_BIN_EXE_keygate");

/// A temp dir with a store path in it; nothing is shared between tests.
struct Env {
    dir: tempfile::TempDir,
    store: PathBuf,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("keygate.json");
        Env { dir, store }
    }

    /// A store made by `init`, with an ECDS file in `ecds/`.
    fn init() -> Env {
        let env = Env::new();
        env.ok(&[
            "init",
            "--ecds",
            "ecds/keygate.yaml",
            "--wasm",
            "/opt/keygate.wasm",
        ]);
        env
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("--store")
            .arg(&self.store)
            .args(args)
            .env_remove("KEYGATE_STORE");
        cmd
    }

    fn run(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A command that fails before reading stdin (a usage error) closes the pipe early.
        let written = child.stdin.take().unwrap().write_all(stdin.as_bytes());
        assert!(
            written.is_ok() || written.is_err_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
        );
        child.wait_with_output().unwrap()
    }

    fn ok_in(&self, args: &[&str], stdin: &str) -> String {
        let out = self.run(args, stdin);
        assert!(
            out.status.success(),
            "keygate {args:?} failed ({:?}): {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        self.ok_in(args, "")
    }

    fn json(&self, args: &[&str]) -> Value {
        json(&self.ok(&[&["--json"], args].concat()))
    }

    /// Runs a command that must fail with `code`; returns its one-line error.
    fn fail_in(&self, args: &[&str], stdin: &str, code: i32) -> String {
        let out = self.run(args, stdin);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(code), "keygate {args:?}: {stderr}");
        assert!(
            stderr.starts_with("keygate: ")
                && stderr.ends_with('\n')
                && stderr.lines().count() == 1,
            "not one line: {stderr:?}"
        );
        stderr.trim_end().to_string()
    }

    fn fail(&self, args: &[&str], code: i32) -> String {
        self.fail_in(args, "", code)
    }

    /// `create` with the given extra arguments; returns (id, key).
    fn create(&self, extra: &[&str]) -> (String, String) {
        let out = self.json(&[&["create", "--name", "test", "--role", "client"], extra].concat());
        (str_of(&out["id"]), str_of(&out["key"]))
    }

    fn verify(&self, key: &str) -> (Option<i32>, Value) {
        let out = self.run(&["--json", "verify"], &format!("{key}\n"));
        let stdout = String::from_utf8(out.stdout).unwrap();
        if key.chars().count() > 8 {
            assert!(!stdout.contains(key), "verify printed the key: {stdout}");
        }
        (out.status.code(), json(&stdout))
    }

    fn accepted(&self, key: &str) -> Value {
        let (code, out) = self.verify(key);
        assert_eq!(
            (code, &out["accepted"]),
            (Some(0), &Value::Bool(true)),
            "{out}"
        );
        out
    }

    fn refused(&self, key: &str, error: &str) {
        let (code, out) = self.verify(key);
        assert_eq!(code, Some(1), "{out}");
        assert_eq!(out["accepted"], false);
        assert_eq!(out["error"], error, "{out}");
    }

    fn store_text(&self) -> String {
        fs::read_to_string(&self.store).unwrap()
    }

    fn store_json(&self) -> Value {
        json(&self.store_text())
    }

    fn edit_store(&self, edit: impl FnOnce(&mut Value)) {
        let mut doc = self.store_json();
        edit(&mut doc);
        fs::write(&self.store, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    }

    fn files(&self, dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.dir.path().join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn str_of(v: &Value) -> String {
    v.as_str()
        .unwrap_or_else(|| panic!("not a string: {v}"))
        .to_string()
}

fn now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

fn unix(rfc3339: &Value) -> i64 {
    keygate::time::parse_rfc3339(rfc3339.as_str().unwrap()).unwrap()
}

#[test]
fn init_writes_the_default_policy_and_refuses_to_overwrite() {
    let env = Env::init();
    let doc = env.store_json();
    assert_eq!(doc["version"], 2);
    assert_eq!(doc["revision"], 1);
    assert_eq!(doc["envoy"]["ecds"], "ecds/keygate.yaml");
    assert_eq!(doc["envoy"]["wasm"], "/opt/keygate.wasm");
    let policy = &doc["policy"];
    assert_eq!(policy["default_plan"], "free");
    assert_eq!(
        policy["key_format"],
        serde_json::json!({"prefix": "kg", "checksum": true})
    );
    assert_eq!(
        policy["failed_auth_limit"],
        serde_json::json!({"requests": 20, "per": "minute"})
    );
    assert_eq!(policy["plans"]["free"]["requests"], 60);
    assert_eq!(policy["plans"]["pro"]["requests"], 600);
    assert_eq!(policy["plans"]["enterprise"]["requests"], 6000);
    assert!(policy.get("keys").is_none() && policy.get("routes").is_none());
    assert_eq!(doc["keys"], serde_json::json!([]));

    let before = env.store_text();
    let err = env.fail(&["init"], 1);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(env.store_text(), before);

    // A prefix the filter would refuse is refused before anything is written.
    let other = Env::new();
    let err = other.fail(&["init", "--prefix", "KG"], 1);
    assert!(
        err.starts_with("keygate: invalid configuration: key_format.prefix:"),
        "{err}"
    );
    assert!(!other.store.exists());
}

#[test]
fn init_with_a_policy_file_takes_its_routes_and_refuses_a_bad_one() {
    let env = Env::new();
    let policy = env.dir.path().join("policy.json");
    fs::write(
        &policy,
        r#"{"routes": [{"prefix": "/healthz", "public": true}, {"prefix": "/v1/admin", "roles": ["admin"]}],
            "default_plan": "pro", "ip_rules": {"allow": ["127.0.0.0/8"]}}"#,
    )
    .unwrap();
    env.ok(&["init", "--policy", policy.to_str().unwrap()]);
    let doc = env.store_json();
    assert_eq!(doc["policy"]["routes"][1]["prefix"], "/v1/admin");
    assert_eq!(doc["policy"]["default_plan"], "pro");
    assert_eq!(doc["policy"]["ip_rules"]["allow"][0], "127.0.0.0/8");
    let (_, key) = env.create(&[]);
    assert_eq!(env.accepted(&key)["plan"], "pro");

    // Field errors name the field; a policy with keys in it, a plan that does not
    // exist, and a missing file are refused and no store is written.
    for (text, expect) in [
        (r#"{"routez": []}"#, "routez"),
        (r#"{"default_plan": "gold"}"#, "default_plan"),
        (
            r#"{"keys": [{"id": "a", "hash": "sha256:0000000000000000000000000000000000000000000000000000000000000000", "role": "x"}]}"#,
            "policy.keys",
        ),
    ] {
        let other = Env::new();
        let file = other.dir.path().join("policy.json");
        fs::write(&file, text).unwrap();
        let err = other.fail(&["init", "--policy", file.to_str().unwrap()], 1);
        assert!(err.contains(expect), "{text}: {err}");
        assert!(!other.store.exists());
    }
    let other = Env::new();
    let err = other.fail(&["init", "--policy", "/nonexistent/policy.json"], 1);
    assert!(err.contains("/nonexistent/policy.json"), "{err}");
}

#[test]
fn key_sets_in_the_policy_pass_through_to_render_and_verify() {
    let env = Env::new();
    let members = ["bulk-key-000001-abcdefgh", "bulk-key-000002-abcdefgh"];
    // Key sets carry the first 16 bytes of each digest.
    let packed: Vec<u8> = members
        .iter()
        .flat_map(|k| keys::digest(k.as_bytes())[..16].to_vec())
        .collect();
    let policy = env.dir.path().join("policy.json");
    fs::write(
        &policy,
        serde_json::json!({
            "key_sets": [{"name": "bulk", "role": "miner", "digests": [base64_of(&packed)]}]
        })
        .to_string(),
    )
    .unwrap();
    env.ok(&["init", "--policy", policy.to_str().unwrap()]);
    let hex: String = keys::digest(members[1].as_bytes())[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let out = env.accepted(members[1]);
    assert_eq!(
        (str_of(&out["id"]), str_of(&out["role"])),
        (format!("bulk:{hex}"), "miner".to_string())
    );
    let rendered = env.json(&["render"]);
    assert_eq!(rendered["key_sets"][0]["name"], "bulk");
    assert!(Config::from_json(rendered.to_string().as_bytes()).is_ok());
    env.refused("bulk-key-000003-abcdefgh", "invalid_api_key");
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn commands_without_a_store_say_how_to_make_one() {
    let env = Env::new();
    for args in [
        &["list"][..],
        &["show", "k_1"],
        &["check"],
        &["render"],
        &["apply"],
    ] {
        let err = env.fail(args, 1);
        assert!(err.contains("keygate init"), "{err}");
    }
    let err = env.fail(&["create", "--name", "n", "--role", "client"], 1);
    assert!(err.contains("keygate init"), "{err}");
}

#[test]
fn create_prints_the_key_once_and_stores_only_its_hash() {
    let env = Env::init();
    let out = env.ok(&[
        "create",
        "--name",
        "acme prod",
        "--description",
        "the main integration",
        "--role",
        "client",
        "--plan",
        "pro",
        "--scope",
        "jobs:write",
        "--scope",
        "jobs:read",
        "--tenant",
        "t1",
        "--client",
        "acme",
        "--allowed-ip",
        "10.0.0.0/8",
    ]);
    let key = out.lines().last().unwrap().to_string();
    assert_eq!(out.matches(key.as_str()).count(), 1, "{out}");
    assert!(key.starts_with("kg_"), "{key}");
    assert_eq!(key.len(), 3 + keys::RANDOM_CHARS + keys::CHECKSUM_CHARS);
    assert_eq!(keys::checksum_holds("kg", key.as_bytes()), Some(true));
    let hash = keys::hash_string(key.as_bytes());

    let stored = env.store_json();
    let k = &stored["keys"][0];
    let id = str_of(&k["id"]);
    assert!(
        id.starts_with("k_") && id.len() == 14 && id[2..].bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    assert!(out.contains(&id), "{out}");
    assert_eq!(k["hash"], hash.as_str());
    assert_eq!(k["prefix"], &key[..8]);
    assert_eq!(k["name"], "acme prod");
    assert_eq!(k["description"], "the main integration");
    assert_eq!(k["role"], "client");
    assert_eq!(k["plan"], "pro");
    assert_eq!(k["scopes"], serde_json::json!(["jobs:write", "jobs:read"]));
    assert_eq!((&k["tenant"], &k["client"]), (&"t1".into(), &"acme".into()));
    assert_eq!(k["allowed_ips"], serde_json::json!(["10.0.0.0/8"]));
    assert_eq!(k["status"], "active");
    assert!((unix(&k["created_at"]) - now()).abs() <= 5);
    assert_eq!(
        (&k["expires_at"], &k["revoked_at"]),
        (&Value::Null, &Value::Null)
    );
    assert!(!env.store_text().contains(&key));

    let list = env.ok(&["list"]);
    let mut lines = list.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "ID", "NAME", "PREFIX", "ROLE", "PLAN", "STATUS", "CLIENT", "TENANT", "SCOPES",
            "CREATED", "EXPIRES"
        ]
    );
    let row = lines.next().unwrap();
    for cell in [
        id.as_str(),
        "acme prod",
        &key[..8],
        "client",
        "pro",
        "active",
        "never",
    ] {
        assert!(row.contains(cell), "{cell:?} missing from {row:?}");
    }
    let listed = env.json(&["list"]);
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["status"], "active");
    let show = env.ok(&["show", &id]);
    assert!(
        show.contains("acme prod") && show.contains("jobs:write, jobs:read"),
        "{show}"
    );
    let shown = env.json(&["show", &id]);
    assert_eq!(shown["tenant"], "t1");
    assert_eq!(shown["allowed_ips"][0], "10.0.0.0/8");
    assert!(shown.get("hash").is_none());
    for output in [list, listed.to_string(), show, shown.to_string()] {
        assert!(!output.contains(&key), "key revealed: {output}");
        assert!(!output.contains(&hash), "hash revealed: {output}");
        assert!(
            !output.contains(&hash["sha256:".len()..]),
            "hash revealed: {output}"
        );
    }
}

#[test]
fn create_refuses_what_the_filter_would_refuse_and_writes_nothing() {
    let env = Env::init();
    let before = env.store_text();
    let err = env.fail(
        &[
            "create", "--name", "n", "--role", "client", "--plan", "gold",
        ],
        1,
    );
    // The new key is named by its id, as every command names keys.
    assert!(
        err.starts_with("keygate: invalid configuration: keys[\"k_"),
        "{err}"
    );
    assert!(err.contains("\"].plan: unknown plan \"gold\""), "{err}");
    let err = env.fail(&["create", "--name", "n", "--role", "two words"], 1);
    assert!(
        err.starts_with("keygate: invalid configuration: keys[\"k_") && err.contains("\"].role:"),
        "{err}"
    );
    let err = env.fail(
        &[
            "create",
            "--name",
            "n",
            "--role",
            "client",
            "--allowed-ip",
            "10.0.0.1/8",
        ],
        1,
    );
    assert!(
        err.starts_with("keygate: invalid configuration: keys[\"k_")
            && err.contains("\"].allowed_ips[0]:"),
        "{err}"
    );
    let err = env.fail(&["create", "--name", "", "--role", "client"], 1);
    assert!(err.contains("--name"), "{err}");
    // Missing required arguments are usage errors.
    let err = env.fail(&["create", "--name", "n"], 2);
    assert!(err.contains("--role"), "{err}");
    assert_eq!(env.store_text(), before);
}

#[test]
fn show_of_an_unknown_id_fails_with_one_line() {
    let env = Env::init();
    env.create(&[]);
    let out = env.run(&["show", "k_000000000000"], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        String::from_utf8(out.stderr).unwrap(),
        "keygate: no key with id \"k_000000000000\"; keygate list shows the ids\n"
    );
    for cmd in ["revoke", "suspend", "reactivate"] {
        env.fail(&[cmd, "k_000000000000"], 1);
    }
    env.fail(&["rotate", "k_000000000000", "--grace", "1h"], 1);
}

#[test]
fn suspend_reactivate_and_revoke_change_what_verify_says() {
    let env = Env::init();
    let (id, key) = env.create(&[
        "--client",
        "acme",
        "--tenant",
        "t1",
        "--scope",
        "jobs:write",
    ]);
    let ok = env.accepted(&key);
    assert_eq!(ok["id"], id.as_str());
    assert_eq!(ok["role"], "client");
    assert_eq!(ok["client"], "acme");
    assert_eq!(ok["tenant"], "t1");
    assert_eq!(ok["scopes"], serde_json::json!(["jobs:write"]));
    assert_eq!(ok["plan"], "free", "the default plan applies");
    assert_eq!(ok["prefix"], &key[..8]);
    let text = env.ok_in(&["verify"], &format!("{key}\n"));
    assert!(
        text.starts_with(&format!("accepted: {}... is key {id}", &key[..8])),
        "{text}"
    );
    assert!(!text.contains(&key));

    assert_eq!(env.ok(&["suspend", &id]).trim(), format!("suspended {id}"));
    assert_eq!(env.json(&["show", &id])["status"], "suspended");
    env.refused(&key, "key_suspended");
    assert_eq!(
        env.ok(&["suspend", &id]).trim(),
        format!("{id} was already suspended")
    );

    assert_eq!(
        env.ok(&["reactivate", &id]).trim(),
        format!("reactivated {id}")
    );
    env.accepted(&key);

    let revoked = env.json(&["revoke", &id]);
    assert_eq!(
        (&revoked["status"], &revoked["changed"]),
        (&"revoked".into(), &true.into())
    );
    assert!((unix(&revoked["revoked_at"]) - now()).abs() <= 5);
    env.refused(&key, "key_revoked");
    let (_, out) = env.verify(&key);
    assert_eq!(out["id"], id.as_str(), "a known key is named");

    let err = env.fail(&["reactivate", &id], 1);
    assert!(
        err.contains("revoked") && err.contains("permanent"),
        "{err}"
    );
    env.fail(&["suspend", &id], 1);
    assert_eq!(env.json(&["show", &id])["status"], "revoked");
    assert_eq!(
        env.ok(&["check"]).trim(),
        "ok: 1 keys (0 active, 0 suspended, 1 revoked, 0 expired)"
    );
    // Revoked keys stay in the configuration, so the edge answers key_revoked.
    let plugin = env.json(&["render"]);
    assert_eq!(plugin["keys"][0]["status"], "revoked");
}

#[test]
fn verify_refuses_unknown_mistyped_and_expired_keys() {
    let env = Env::init();
    let (id, key) = env.create(&[]);
    env.refused(
        "kg_not-a-key-that-exists-anywhere-0000000000000000",
        "invalid_api_key",
    );
    env.refused("short", "invalid_api_key");
    let mut typo = key.clone().into_bytes();
    typo[10] = if typo[10] == b'A' { b'B' } else { b'A' };
    env.refused(std::str::from_utf8(&typo).unwrap(), "invalid_api_key");
    let text = env.run(&["verify"], "nope-nope-nope-nope-nope");
    assert_eq!(text.status.code(), Some(1));
    assert_eq!(
        String::from_utf8(text.stdout).unwrap().trim(),
        "refused: invalid_api_key (Invalid API key): nope-nop...: unknown: no key in the store has its hash"
    );

    env.edit_store(|doc| doc["keys"][0]["expires_at"] = "2020-01-01T00:00:00Z".into());
    env.refused(&key, "key_expired");
    assert_eq!(env.json(&["show", &id])["status"], "expired");
    assert!(env.ok(&["list"]).contains("expired"));
    assert_eq!(
        env.ok(&["check"]).trim(),
        "ok: 1 keys (0 active, 0 suspended, 0 revoked, 1 expired)"
    );
}

#[test]
fn rotate_issues_a_twin_key_and_gives_the_old_one_a_grace_period() {
    let env = Env::init();
    let (old_id, old_key) = env.create(&[
        "--client",
        "acme",
        "--tenant",
        "t1",
        "--plan",
        "pro",
        "--scope",
        "jobs:write",
        "--allowed-ip",
        "10.0.0.0/8",
    ]);
    let rotated = env.json(&["rotate", &old_id, "--grace", "24h"]);
    let (new_id, new_key) = (str_of(&rotated["id"]), str_of(&rotated["key"]));
    assert_ne!(new_id, old_id);
    assert_ne!(new_key, old_key);
    assert_eq!(rotated["old_id"], old_id.as_str());
    let grace_end = now() + 86_400;
    assert!(
        (unix(&rotated["old_expires_at"]) - grace_end).abs() <= 5,
        "{rotated}"
    );
    assert!((unix(&env.json(&["show", &old_id])["expires_at"]) - grace_end).abs() <= 5);

    let old = env.accepted(&old_key);
    let new = env.accepted(&new_key);
    assert_eq!(new["id"], new_id.as_str());
    for field in ["role", "client", "tenant", "scopes", "plan"] {
        assert_eq!(old[field], new[field], "{field}");
    }
    assert_eq!(new["expires_at"], Value::Null);
    let shown = env.json(&["show", &new_id]);
    assert_eq!(shown["name"], "test (rotated)");
    assert_eq!(shown["allowed_ips"], serde_json::json!(["10.0.0.0/8"]));

    // A key that already expires sooner keeps its earlier expiry.
    let (soon_id, _) = env.create(&["--expires-in", "1h"]);
    let rotated = env.json(&["rotate", &soon_id, "--grace", "7d"]);
    assert!((unix(&rotated["old_expires_at"]) - (now() + 3600)).abs() <= 5);

    env.fail(&["rotate", &old_id, "--grace", "soon"], 2);
    env.fail(&["rotate", &old_id], 2);
    env.ok(&["suspend", &new_id]);
    let err = env.fail(&["rotate", &new_id, "--grace", "1h"], 1);
    assert!(err.contains("suspended"), "{err}");
}

#[test]
fn expiry_flags_parse_durations_and_instants() {
    let env = Env::init();
    for (flag, seconds) in [
        ("90d", 90 * 86_400),
        ("24h", 86_400),
        ("30m", 1800),
        ("3600s", 3600),
    ] {
        let (id, _) = env.create(&["--expires-in", flag]);
        let at = unix(&env.json(&["show", &id])["expires_at"]);
        assert!((at - (now() + seconds)).abs() <= 5, "{flag}");
    }
    let (id, _) = env.create(&["--expires-at", "2030-01-01T00:00:00+01:00"]);
    assert_eq!(
        env.json(&["show", &id])["expires_at"],
        "2029-12-31T23:00:00Z"
    );

    let before = env.store_text();
    for bad in ["90", "5x", "-1d", "1.5h", "d", "1 d", "99999999999d"] {
        let flag = format!("--expires-in={bad}");
        let err = env.fail(&["create", "--name", "n", "--role", "client", &flag], 2);
        assert!(err.contains("--expires-in"), "{err}");
    }
    for bad in ["2030-01-01", "tomorrow", "2030-13-01T00:00:00Z"] {
        let err = env.fail(
            &[
                "create",
                "--name",
                "n",
                "--role",
                "client",
                "--expires-at",
                bad,
            ],
            2,
        );
        assert!(err.contains("RFC 3339"), "{err}");
    }
    env.fail(
        &[
            "create",
            "--name",
            "n",
            "--role",
            "client",
            "--expires-in",
            "1d",
            "--expires-at",
            "2030-01-01T00:00:00Z",
        ],
        2,
    );
    let err = env.fail(
        &[
            "create",
            "--name",
            "n",
            "--role",
            "client",
            "--expires-at",
            "2020-01-01T00:00:00Z",
        ],
        1,
    );
    assert!(err.contains("not in the future"), "{err}");
    env.fail(
        &[
            "create",
            "--name",
            "n",
            "--role",
            "client",
            "--expires-in",
            "0s",
        ],
        1,
    );
    assert_eq!(env.store_text(), before);
}

#[test]
fn import_takes_legacy_key_lists_and_the_keys_then_verify() {
    let env = Env::init();
    let clients = "# from the old .env\n\
                   CLIENT_API_KEYS=test_client_key_16_chars,another_legacy_key_123\n\n";
    let out = json(&env.ok_in(
        &["--json", "import", "--role", "client", "--tenant", "t1"],
        clients,
    ));
    let imported = out["imported"].as_array().unwrap();
    assert_eq!(imported.len(), 2);
    assert_eq!(
        (&imported[0]["line"], &imported[0]["name"]),
        (&2.into(), &"legacy-1".into())
    );
    assert_eq!(imported[1]["prefix"], "another_");
    assert_eq!(out["skipped"], serde_json::json!([]));

    let miners = "MINER_API_KEYS=\"miner_key_alpha_000001, miner_key_beta_0000002\"\n\
                  miner_key_gamma_000003\n\
                  test_client_key_16_chars\n";
    let out = json(&env.ok_in(
        &[
            "--json",
            "import",
            "--role",
            "miner",
            "--plan",
            "enterprise",
            "--name-prefix",
            "miner",
        ],
        miners,
    ));
    assert_eq!(out["imported"].as_array().unwrap().len(), 3);
    assert_eq!(out["imported"][2]["name"], "miner-3");
    let skipped = &out["skipped"][0];
    assert_eq!(skipped["line"], 3);
    assert_eq!(skipped["prefix"], "test_cli");
    assert_eq!(skipped["existing_id"], imported[0]["id"]);

    for key in ["test_client_key_16_chars", "another_legacy_key_123"] {
        let ok = env.accepted(key);
        assert_eq!(
            (&ok["role"], &ok["tenant"]),
            (&"client".into(), &"t1".into())
        );
    }
    for key in [
        "miner_key_alpha_000001",
        "miner_key_beta_0000002",
        "miner_key_gamma_000003",
    ] {
        let ok = env.accepted(key);
        assert_eq!(
            (&ok["role"], &ok["plan"]),
            (&"miner".into(), &"enterprise".into())
        );
    }
    assert_eq!(env.store_json()["keys"].as_array().unwrap().len(), 5);
    let store = env.store_text();
    assert!(!store.contains("legacy_key") && !store.contains("miner_key_"));
    assert_eq!(
        env.store_json()["keys"][0]["hash"],
        "sha256:3fdb536b7aa2eccdaec0c7162262f499b2c6af7b95096edae688f064006df729"
    );

    let text = env.ok_in(
        &["import", "--role", "client"],
        "test_client_key_16_chars\n",
    );
    assert!(
        text.contains("imported 0 keys") && text.contains("skipped 1"),
        "{text}"
    );
}

#[test]
fn import_with_a_malformed_line_writes_nothing() {
    let env = Env::init();
    env.create(&[]);
    let before = env.store_text();
    let err = env.fail_in(
        &["import", "--role", "client"],
        "good_legacy_key_000001\n# fine\ntoo-short\n",
        1,
    );
    assert!(err.starts_with("keygate: line 3: "), "{err}");
    assert!(err.contains("nothing was imported"), "{err}");
    // A kg_ key whose checksum fails would be refused at the edge: refused here too.
    let err = env.fail_in(
        &["import", "--role", "client"],
        "good_legacy_key_000001\nkg_this_is_not_a_checksummed_key_at_all\n",
        1,
    );
    assert!(
        err.starts_with("keygate: line 2: ") && err.contains("checksum"),
        "{err}"
    );
    let err = env.fail_in(&["import", "--role", "client"], "\n# only comments\n", 1);
    assert!(err.contains("no keys"), "{err}");
    env.fail_in(&["import"], "good_legacy_key_000001\n", 2);
    assert_eq!(env.store_text(), before);
    env.refused("good_legacy_key_000001", "invalid_api_key");
}

#[test]
fn check_names_the_field_of_a_hand_broken_store() {
    let env = Env::init();
    let (_, key) = env.create(&[]);
    env.create(&["--plan", "pro"]);
    assert_eq!(
        env.ok(&["check"]).trim(),
        "ok: 2 keys (2 active, 0 suspended, 0 revoked, 0 expired)"
    );
    let checked = env.json(&["check"]);
    assert_eq!(
        (&checked["ok"], &checked["active"]),
        (&true.into(), &2.into())
    );

    env.edit_store(|doc| doc["keys"][0]["hash"] = "sha256:ABC".into());
    let broken = env.store_text();
    let first = str_of(&env.store_json()["keys"][0]["id"]);
    // check names the key by its id; the other commands by its position, as the filter.
    let err = env.fail(&["check"], 1);
    assert_eq!(
        err,
        format!(
            "keygate: invalid configuration: keys[\"{first}\"].hash: expected \"sha256:\" followed by 64 \
             lowercase hex digits (printf %s \"$KEY\" | sha256sum), got \"sha256:ABC\""
        )
    );
    // Nothing is rendered, verified or written from a store the filter would refuse; every
    // command names the key by its id.
    for args in [
        &["render"][..],
        &["apply"],
        &["create", "--name", "n", "--role", "client"],
    ] {
        let e = env.fail(args, 1);
        assert!(
            e.starts_with(&format!(
                "keygate: invalid configuration: keys[\"{first}\"].hash:"
            )),
            "{e}"
        );
    }
    let out = env.run(&["verify"], &key);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(env.store_text(), broken);
    assert!(!env.dir.path().join("ecds").exists());

    env.edit_store(|doc| {
        doc["keys"][0]["hash"] = keys::hash_string(key.as_bytes()).into();
        doc["keys"][1]["plan"] = "gold".into();
    });
    let err = env.fail(&["check"], 1);
    assert!(
        err.starts_with(&format!(
            "keygate: invalid configuration: keys[\"{}\"].plan: unknown plan \"gold\"",
            str_of(&env.store_json()["keys"][1]["id"])
        )),
        "{err}"
    );
    // Store-only fields and the JSON itself are checked too.
    env.edit_store(|doc| {
        doc["keys"][1]["plan"] = "pro".into();
        doc["keys"][1]["colour"] = "blue".into();
    });
    let err = env.fail(&["check"], 1);
    assert!(err.contains("keys[1]") && err.contains("colour"), "{err}");
    fs::write(&env.store, "{\"version\": 1,").unwrap();
    env.fail(&["list"], 1);
}

#[test]
fn check_file_still_validates_a_plugin_configuration() {
    let env = Env::new();
    let file = env.dir.path().join("config.json");
    let hash = keys::hash_string(b"test_client_key_16_chars");
    fs::write(
        &file,
        format!(r#"{{"keys": [{{"id": "c", "hash": "{hash}", "role": "client"}}]}}"#),
    )
    .unwrap();
    let out = env.ok(&["check", file.to_str().unwrap()]);
    assert!(out.contains("valid (1 keys, 0 routes)"), "{out}");
    fs::write(
        &file,
        r#"{"keys": [{"id": "c", "hash": "sha256:x", "role": "client"}]}"#,
    )
    .unwrap();
    let err = env.fail(&["check", file.to_str().unwrap()], 1);
    assert!(
        err.starts_with("keygate: invalid configuration: keys[\"c\"].hash:"),
        "{err}"
    );
}

#[test]
fn render_gives_the_plugin_json_and_the_ecds_resource() {
    let env = Env::init();
    let (id, key) = env.create(&["--plan", "pro", "--tenant", "t1"]);
    let (revoked_id, _) = env.create(&[]);
    env.ok(&["revoke", &revoked_id]);

    let plugin = json(&env.ok(&["render"]));
    assert_eq!(
        plugin,
        json(&env.ok(&["render", "--format", "plugin-json"]))
    );
    assert_eq!(plugin["default_plan"], "free");
    assert_eq!(plugin["key_format"]["prefix"], "kg");
    let keys_out = plugin["keys"].as_array().unwrap();
    assert_eq!(keys_out.len(), 2);
    assert_eq!(keys_out[0]["id"], id.as_str());
    assert_eq!(
        keys_out[0]["hash"],
        keys::hash_string(key.as_bytes()).as_str()
    );
    assert_eq!(
        (&keys_out[0]["plan"], &keys_out[0]["tenant"]),
        (&"pro".into(), &"t1".into())
    );
    // Only what the filter knows: no names, prefixes or timestamps.
    assert!(keys_out[0].get("name").is_none() && keys_out[0].get("created_at").is_none());
    assert_eq!(keys_out[1]["status"], "revoked");
    Config::from_json(plugin.to_string().as_bytes()).unwrap();

    let ecds = json(&env.ok(&["render", "--format", "envoy-ecds"]));
    let resource = &ecds["resources"][0];
    assert_eq!(
        resource["@type"],
        "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
    );
    assert_eq!(resource["name"], "keygate");
    let typed = &resource["typed_config"];
    assert_eq!(
        typed["@type"],
        "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
    );
    let config = &typed["config"];
    assert_eq!(
        (&config["name"], &config["root_id"]),
        (&"keygate".into(), &"keygate".into())
    );
    assert_eq!(config["fail_open"], false);
    assert_eq!(config["vm_config"]["vm_id"], "keygate");
    assert_eq!(config["vm_config"]["runtime"], "envoy.wasm.runtime.v8");
    assert_eq!(
        config["vm_config"]["code"]["local"]["filename"],
        "/opt/keygate.wasm"
    );
    let configuration = &config["configuration"];
    assert_eq!(
        configuration["@type"],
        "type.googleapis.com/google.protobuf.StringValue"
    );
    let value = configuration["value"].as_str().unwrap();
    assert!(!value.contains('\n'), "compact");
    let compiled = Config::from_json(value.as_bytes()).unwrap();
    assert_eq!(compiled.keys.len(), 2);
    assert_eq!(compiled.index.find(key.as_bytes()), Some(0));
    assert_eq!(json(value), plugin);

    env.fail(&["render", "--format", "yaml"], 2);
    // A fresh store has no keys: the filter would refuse it, so nothing renders.
    let empty = Env::init();
    let err = empty.fail(&["render"], 1);
    assert!(
        err.starts_with("keygate: invalid configuration: keys: no keys configured"),
        "{err}"
    );
    empty.fail(&["check"], 1);
}

#[test]
fn apply_replaces_the_ecds_file_atomically() {
    let env = Env::init();
    let (id, key) = env.create(&["--apply"]);
    let ecds_path = env.dir.path().join("ecds/keygate.yaml");
    let first = json(&fs::read_to_string(&ecds_path).unwrap());
    assert_eq!(first, json(&env.ok(&["render", "--format", "envoy-ecds"])));
    assert_eq!(env.files(Path::new("ecds")), ["keygate.yaml"]);

    let out = env.json(&["revoke", &id, "--apply"]);
    assert_eq!(out["applied"], ecds_path.to_str().unwrap());
    let value = json(&fs::read_to_string(&ecds_path).unwrap())["resources"][0]["typed_config"]
        ["config"]["configuration"]["value"]
        .as_str()
        .unwrap()
        .to_string();
    let config = Config::from_json(value.as_bytes()).unwrap();
    let found = config.index.find(key.as_bytes()).unwrap();
    assert_eq!(
        config.keys[found].status,
        keygate::config::KeyStatus::Revoked
    );

    let out = env.ok(&["apply"]);
    let version = str_of(&json(&fs::read_to_string(&ecds_path).unwrap())["version_info"]);
    assert_eq!(
        out.trim(),
        format!(
            "1 keys, version {version}\nwritten to {} (not confirmed: the store names no Envoy \
             admin; keygate set-admin URL)",
            ecds_path.display()
        )
    );
    // Temp files live beside their targets and never outlive a command.
    assert_eq!(env.files(Path::new("ecds")), ["keygate.yaml"]);
    assert_eq!(
        env.files(Path::new(".")),
        [
            "ecds",
            "keygate.json",
            "keygate.json.audit.jsonl",
            "keygate.json.lock"
        ]
    );
}

#[test]
fn apply_without_an_ecds_file_says_how_to_set_one() {
    let env = Env::new();
    env.ok(&["init"]);
    let (id, _) = env.create(&[]);
    let before = env.store_text();
    for args in [
        &["apply"][..],
        &["revoke", &id, "--apply"],
        &["create", "--name", "n", "--role", "client", "--apply"],
    ] {
        let err = env.fail(args, 1);
        assert!(err.contains("keygate init --ecds"), "{err}");
    }
    assert_eq!(
        env.store_text(),
        before,
        "a change that cannot be applied is not made"
    );
}

#[test]
fn concurrent_creates_lose_no_key() {
    let env = Env::init();
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let store = env.store.clone();
            std::thread::spawn(move || {
                (0..5)
                    .map(|i| {
                        let name = format!("worker {w} key {i}");
                        let out = Command::new(BIN)
                            .args(["--json", "--store"])
                            .arg(&store)
                            .args(["create", "--role", "client", "--name", &name])
                            .output()
                            .unwrap();
                        assert!(
                            out.status.success(),
                            "{}",
                            String::from_utf8_lossy(&out.stderr)
                        );
                        str_of(&json(&String::from_utf8(out.stdout).unwrap())["key"])
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let created: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert_eq!(created.len(), 40);

    let stored = env.store_json();
    let stored = stored["keys"].as_array().unwrap();
    assert_eq!(stored.len(), 40);
    let mut ids: Vec<&str> = stored.iter().map(|k| k["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 40);
    for key in &created {
        let hash = keys::hash_string(key.as_bytes());
        assert!(
            stored.iter().any(|k| k["hash"] == hash.as_str()),
            "lost {}",
            &key[..8]
        );
    }
    assert_eq!(
        env.ok(&["check"]).trim(),
        "ok: 40 keys (40 active, 0 suspended, 0 revoked, 0 expired)"
    );
    assert_eq!(
        env.files(Path::new(".")),
        [
            "keygate.json",
            "keygate.json.audit.jsonl",
            "keygate.json.lock"
        ]
    );
}

/// Not a test of its own: `lock_holder_killed_mid_change_leaves_the_store_usable` runs
/// this test binary again with KEYGATE_TEST_HOLD_LOCK set, to get a separate process
/// that holds the store lock the way a keygate writer does, and can be killed.
#[test]
fn lock_holder_helper() {
    let Some(path) = std::env::var_os("KEYGATE_TEST_HOLD_LOCK") else {
        return;
    };
    let lock = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap();
    lock.lock().unwrap();
    println!("locked");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(60));
}

fn wait_with_deadline(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

// What is simulated, and what is not. keygate replaces the store only by renaming a
// fully written, fsynced temp file over it, under an flock that the kernel drops when
// its holder dies. A writer that crashes between writing its temp file and the rename
// leaves exactly two traces: a temp file (possibly partial) and, until the kernel
// reaps it, a held lock. The two tests below reproduce those traces (a partial temp
// file planted by hand; a separate process holding the lock, killed with SIGKILL) and
// check that the store is intact and the next command works. They do not crash keygate
// itself at that instant (it has no test hook for that), and do not simulate power loss,
// where the fsyncs of the file and of the directory are what keep the rename durable.

#[test]
fn stray_temp_file_of_a_crashed_writer_leaves_the_store_intact() {
    let env = Env::init();
    let (_, key) = env.create(&[]);
    let before = env.store_text();
    let stray = env.dir.path().join(".keygate.json.tmp.4242.deadbeef");
    fs::write(&stray, &before[..before.len() / 2]).unwrap();

    assert_eq!(env.store_text(), before);
    assert!(env.ok(&["check"]).starts_with("ok: 1 keys"));
    env.accepted(&key);
    let (_, second) = env.create(&[]);
    env.accepted(&key);
    env.accepted(&second);
    assert!(
        !stray.exists(),
        "the next writer removes what a crashed one left"
    );
    assert_eq!(
        env.files(Path::new(".")),
        [
            "keygate.json",
            "keygate.json.audit.jsonl",
            "keygate.json.lock"
        ]
    );
}

#[test]
fn lock_holder_killed_mid_change_leaves_the_store_usable() {
    let env = Env::init();
    let (_, first) = env.create(&[]);
    let before = env.store_text();

    let mut holder = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "lock_holder_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            "KEYGATE_TEST_HOLD_LOCK",
            env.dir.path().join("keygate.json.lock"),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(holder.stdout.take().unwrap()).lines();
    assert!(
        lines.any(|l| l.is_ok_and(|l| l.ends_with("locked"))),
        "the helper did not take the lock"
    );

    let mut writer = env
        .command(&["--json", "create", "--name", "waiting", "--role", "client"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The writer waits for the lock rather than racing the holder.
    assert!(wait_with_deadline(&mut writer, Duration::from_millis(500)).is_none());
    assert_eq!(env.store_text(), before);
    // Readers never need the lock.
    env.accepted(&first);

    holder.kill().unwrap();
    holder.wait().unwrap();
    let status = wait_with_deadline(&mut writer, Duration::from_secs(20));
    if status.is_none() {
        writer.kill().unwrap();
    }
    let out = writer.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let second = str_of(&json(&String::from_utf8(out.stdout).unwrap())["key"]);
    env.accepted(&first);
    env.accepted(&second);
    assert_eq!(env.store_json()["keys"].as_array().unwrap().len(), 2);
}

#[test]
fn hash_store_variable_and_usage_errors() {
    let env = Env::init();
    assert_eq!(
        env.ok_in(&["hash"], "test_client_key_16_chars\n").trim(),
        "sha256:3fdb536b7aa2eccdaec0c7162262f499b2c6af7b95096edae688f064006df729"
    );
    assert_eq!(
        json(&env.ok_in(&["--json", "hash"], "test_client_key_16_chars"))["hash"],
        "sha256:3fdb536b7aa2eccdaec0c7162262f499b2c6af7b95096edae688f064006df729"
    );
    env.fail_in(&["hash"], "short\n", 1);

    // KEYGATE_STORE names the store when --store does not.
    env.create(&[]);
    let out = Command::new(BIN)
        .args(["--json", "list"])
        .env("KEYGATE_STORE", &env.store)
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        json(&String::from_utf8(out.stdout).unwrap())
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let err = env.fail(&["frobnicate"], 2);
    assert!(err.contains("frobnicate"), "{err}");
    env.fail(&["show"], 2);
    env.fail(&["list", "--bogus"], 2);
    let bare = Command::new(BIN).output().unwrap();
    assert_eq!(bare.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bare.stderr).contains("Commands:"));
    for args in [
        &["--help"][..],
        &["create", "--help"],
        &["import", "--help"],
        &["rotate", "--help"],
    ] {
        let help = env.ok(args);
        assert!(help.contains("Usage: keygate"), "{help}");
    }
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Runs keygate under `umask`; returns (stdout, stderr) of a command that must succeed.
fn under_umask(env: &Env, umask: &str, args: &[&str]) -> (String, String) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("umask {umask} && exec \"$0\" \"$@\""))
        .arg(BIN)
        .arg("--store")
        .arg(&env.store)
        .args(args)
        .env_remove("KEYGATE_STORE")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    );
    assert!(out.status.success(), "keygate {args:?}: {stderr}");
    (stdout, stderr)
}

#[test]
fn the_store_and_its_lock_are_owner_only_whatever_the_umask() {
    for umask in ["022", "000"] {
        let env = Env::new();
        let lock = env.dir.path().join("keygate.json.lock");
        let ecds = env.dir.path().join("ecds/keygate.yaml");
        let owner_only = |what: &str| {
            assert_eq!(mode(&env.store), 0o600, "umask {umask}, after {what}");
            assert_eq!(mode(&lock), 0o600, "umask {umask}, after {what}");
        };
        under_umask(&env, umask, &["init", "--ecds", "ecds/keygate.yaml"]);
        owner_only("init");
        let created = json(
            &under_umask(
                &env,
                umask,
                &["--json", "create", "--name", "a", "--role", "r"],
            )
            .0,
        );
        owner_only("create");
        let id = str_of(&created["id"]);
        for args in [
            &["suspend", &id][..],
            &["reactivate", &id],
            &["rotate", &id, "--grace", "1h", "--apply"],
            &["revoke", &id, "--apply"],
        ] {
            under_umask(&env, umask, args);
            owner_only(args[0]);
        }
        // The ECDS file stays readable: Envoy may run as another user.
        let expected = if umask == "022" { 0o644 } else { 0o666 };
        assert_eq!(mode(&ecds), expected, "umask {umask}");
    }
}

#[test]
fn a_world_readable_store_becomes_owner_only_at_its_next_change() {
    use std::os::unix::fs::PermissionsExt as _;
    let env = Env::init();
    env.create(&[]);
    let lock = env.dir.path().join("keygate.json.lock");
    for path in [&env.store, &lock] {
        fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
    }
    // Reading does not change it.
    under_umask(&env, "022", &["list"]);
    assert_eq!(mode(&env.store), 0o644);
    let before = env.store_text();
    let (_, note) = under_umask(&env, "022", &["create", "--name", "b", "--role", "r"]);
    assert_eq!((mode(&env.store), mode(&lock)), (0o600, 0o600));
    assert_eq!(
        note,
        format!(
            "keygate: note: {} was mode 644, readable by other users; keygate keeps its store \
             at 0600 (it holds the digests of imported keys), and has set it so\n",
            env.store.display()
        )
    );
    assert_ne!(env.store_text(), before);
    // Said once: the next change finds it 0600 already.
    let (_, note) = under_umask(&env, "022", &["create", "--name", "c", "--role", "r"]);
    assert_eq!(note, "");
}

// ---------------------------------------------------------------- applying to Envoy
//
// A stand-in for Envoy's admin interface, answering /stats?format=json the way Envoy
// 1.40 does (chunked) about the ECDS file the store applies to; the real Envoy is
// exercised by tests/integration/test_apply_confirm.py.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admin {
    /// Serves whatever version the ECDS file holds (Envoy accepting every update).
    Accepts,
    /// Keeps the first version it saw and counts a rejection once the file changes.
    Rejects,
    /// Keeps the first version it saw and counts nothing (Envoy watching another file).
    Ignores,
    /// An Envoy without a keygate ECDS subscription.
    NoKeygate,
    /// Not Envoy: 404 for everything.
    NotEnvoy,
}

/// Starts a stand-in admin for the ECDS file of `env`; returns its URL.
fn fake_admin(env: &Env, mode: Admin) -> String {
    use std::io::Read as _;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let ecds = env.dir.path().join("ecds/keygate.yaml");
    std::thread::spawn(move || {
        let version_of = || {
            fs::read_to_string(&ecds)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .and_then(|d| d["version_info"].as_str().map(str::to_string))
                .unwrap_or_default()
        };
        let mut first: Option<String> = None;
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match stream.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => break,
                }
            }
            let current = version_of();
            let baseline = first.get_or_insert_with(|| current.clone()).clone();
            let (version, rejected) = match mode {
                Admin::Accepts => (current, 0),
                Admin::Rejects => (baseline.clone(), u64::from(current != baseline)),
                _ => (baseline, 0),
            };
            let stat =
                |field: &str| format!("extension_config_discovery.http_filter.keygate.{field}");
            let body = if mode == Admin::NoKeygate {
                serde_json::json!({"stats": [
                    {"name": "extension_config_discovery.http_filter.other.version_text", "value": "x"},
                ]})
            } else {
                serde_json::json!({"stats": [
                    {"name": stat("version_text"), "value": version},
                    {"name": stat("config_reload"), "value": 1},
                    {"name": stat("update_failure"), "value": 0},
                    {"name": stat("update_rejected"), "value": rejected},
                    {"name": stat("update_success"), "value": 1},
                    {"histograms": {"supported_quantiles": [0, 50, 100], "computed_quantiles": []}},
                ]})
            }
            .to_string();
            let status = if mode == Admin::NotEnvoy {
                "404 Not Found"
            } else {
                "200 OK"
            };
            let (a, b) = body.split_at(body.len() / 2);
            let reply = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\nserver: envoy\r\n\
                 transfer-encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x};ext=1\r\n{b}\r\n0\r\n\r\n",
                a.len(),
                b.len()
            );
            let _ = stream.write_all(reply.as_bytes());
        }
    });
    url
}

/// An admin URL on which nothing listens.
fn closed_admin() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    url
}

impl Env {
    fn ecds_path(&self) -> PathBuf {
        self.dir.path().join("ecds/keygate.yaml")
    }

    fn ecds_bytes(&self) -> Option<Vec<u8>> {
        fs::read(self.ecds_path()).ok()
    }

    fn ecds_version(&self) -> String {
        str_of(&json(&fs::read_to_string(self.ecds_path()).unwrap())["version_info"])
    }

    fn set_wasm(&self, path: &Path) {
        let path = path.to_str().unwrap().to_string();
        self.edit_store(|doc| doc["envoy"]["wasm"] = path.into());
    }
}

#[test]
fn the_ecds_file_carries_a_version_that_names_its_content() {
    let env = Env::init();
    let (id, _) = env.create(&["--apply"]);
    let doc = json(&fs::read_to_string(env.ecds_path()).unwrap());
    let version = str_of(&doc["version_info"]);
    let digest = keys::digest(&serde_json::to_vec(&doc["resources"]).unwrap());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(version, format!("sha256:{hex}-r2"));
    assert_eq!(
        doc.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["resources", "version_info"]
    );
    // What render shows is what apply writes; the same store has the same version.
    let rendered = json(&env.ok(&["render", "--format", "envoy-ecds"]));
    assert_eq!(rendered, doc);
    env.ok(&["apply"]);
    assert_eq!(env.ecds_version(), version);
    // A change that leaves the configuration as it was: the same content, a new revision.
    env.ok(&["update", &id, "--name", "renamed"]);
    env.ok(&["apply"]);
    assert_eq!(env.ecds_version(), format!("sha256:{hex}-r3"));
    let out = env.json(&["revoke", &id, "--apply"]);
    assert_ne!(env.ecds_version(), version);
    assert_eq!(out["version"], env.ecds_version().as_str());
}

#[test]
fn without_an_admin_apply_says_the_change_is_written_not_confirmed() {
    let env = Env::init();
    let out = env.ok(&["create", "--name", "n", "--role", "client", "--apply"]);
    assert_eq!(
        out.lines().last().unwrap(),
        format!(
            "written to {} (not confirmed: the store names no Envoy admin; keygate set-admin URL)",
            env.ecds_path().display()
        )
    );
    let out = env.json(&["create", "--name", "n", "--role", "client", "--apply"]);
    assert_eq!(out["envoy"]["status"], "no_admin");
    assert_eq!(out["applied"], env.ecds_path().to_str().unwrap());
    assert_eq!(out["version"], env.ecds_version().as_str());
    // --apply-timeout only means something with --apply.
    let err = env.fail(
        &[
            "create",
            "--name",
            "n",
            "--role",
            "client",
            "--apply-timeout",
            "5s",
        ],
        2,
    );
    assert!(err.contains("--apply"), "{err}");
    env.fail(&["apply", "--apply-timeout", "0s"], 2);
}

#[test]
fn set_admin_takes_only_http_host_port_and_init_takes_it_too() {
    let env = Env::new();
    for bad in [
        "https://127.0.0.1:9901",
        "127.0.0.1:9901",
        "http://127.0.0.1",
        "http://127.0.0.1:0",
        "http://127.0.0.1:65536",
        "http://127.0.0.1:9901/stats",
        "http://user@127.0.0.1:9901",
        "http://127.0.0.1:9901?x",
        "http://[::1:9901",
        "http://[zz]:9901",
        "http://999.1.1.1:9901",
        "http://exa_mple:9901",
        "http://:9901",
    ] {
        let err = env.fail(&["init", "--envoy-admin", bad], 2);
        assert!(err.contains("expected http://HOST:PORT"), "{bad}: {err}");
        assert!(!env.store.exists());
    }
    env.ok(&[
        "init",
        "--ecds",
        "ecds/keygate.yaml",
        "--envoy-admin",
        "http://127.0.0.1:9901/",
    ]);
    assert_eq!(env.store_json()["envoy"]["admin"], "http://127.0.0.1:9901");

    let before = env.store_text();
    let err = env.fail(&["set-admin", "ftp://127.0.0.1:21"], 2);
    assert!(err.contains("must start with http://"), "{err}");
    env.fail(&["set-admin"], 2);
    env.fail(&["set-admin", "--clear", "http://127.0.0.1:1"], 2);
    assert_eq!(env.store_text(), before);

    for (url, stored) in [
        ("http://[::1]:9902", "http://[::1]:9902"),
        (
            "http://envoy-admin.internal:9901",
            "http://envoy-admin.internal:9901",
        ),
        ("http://localhost:9903/", "http://localhost:9903"),
    ] {
        let out = env.json(&["set-admin", url]);
        assert_eq!(out["admin"], stored);
        assert_eq!(env.store_json()["envoy"]["admin"], stored);
    }
    let closed = closed_admin();
    let out = env.ok(&["set-admin", &closed]);
    assert_eq!(
        out.trim(),
        format!(
            "Envoy admin: {closed}; Envoy is not reachable there now (connection refused); \
             --apply will only write the file until it is"
        )
    );
    let out = env.ok(&["set-admin", "--clear"]);
    assert!(out.starts_with("cleared the Envoy admin"), "{out}");
    // No admin: the field is left out, as in a store made before it existed.
    assert!(env.store_json()["envoy"].get("admin").is_none());

    // A hand-edited store with a bad URL is refused by name.
    env.edit_store(|doc| doc["envoy"]["admin"] = "http://127.0.0.1:9901/x".into());
    let err = env.fail(&["create", "--name", "n", "--role", "client"], 1);
    assert!(err.contains("invalid store: envoy.admin:"), "{err}");
}

#[test]
fn apply_confirms_once_envoy_serves_the_new_version() {
    let env = Env::init();
    let admin = fake_admin(&env, Admin::Accepts);
    let out = env.ok(&["set-admin", &admin]);
    assert!(out.contains("Envoy answers there and serves"), "{out}");
    let out = env.ok(&["create", "--name", "n", "--role", "client", "--apply"]);
    let version = env.ecds_version();
    let last = out.lines().last().unwrap();
    assert!(
        last.starts_with(&format!(
            "applied: Envoy at {admin} serves version {version} from {} (confirmed after ",
            env.ecds_path().display()
        )),
        "{out}"
    );
    // The key is shown once the change is confirmed.
    let key = out.lines().nth(2).unwrap();
    env.accepted(key);
    let (id, _) = env.create(&[]);
    let out = env.json(&["revoke", &id, "--apply"]);
    assert_eq!(out["envoy"]["status"], "confirmed");
    assert_eq!(out["envoy"]["admin"], admin.as_str());
    assert!(out["envoy"]["seconds"].as_f64().unwrap() < 5.0);
    let out = env.json(&["apply"]);
    assert_eq!(out["envoy"]["status"], "confirmed");
}

#[test]
fn a_rejected_apply_changes_nothing_and_prints_no_key() {
    let env = Env::init();
    let (id, key) = env.create(&["--apply"]);
    let admin = fake_admin(&env, Admin::Rejects);
    env.ok(&["set-admin", &admin]);
    let (store, ecds) = (env.store_text(), env.ecds_bytes());
    let version = env.ecds_version();

    let err = env.fail(&["revoke", &id, "--apply"], 1);
    assert!(
        err.starts_with(&format!(
            "keygate: Envoy at {admin} rejected version sha256:"
        )),
        "{err}"
    );
    assert!(
        err.contains(
            "extension_config_discovery.http_filter.keygate.update_rejected went from 0 to 1"
        ) && err.contains("keygate: invalid configuration")
            && err.contains(&format!("Envoy keeps serving version {version}"))
            && err.ends_with(&format!(
                "nothing was changed: {} and {} are as they were",
                env.store.display(),
                env.ecds_path().display()
            )),
        "{err}"
    );
    // The module the store names is not on this host: said as a likely cause.
    assert!(err.contains("the module /opt/keygate.wasm"), "{err}");
    assert_eq!(
        env.store_text(),
        store,
        "the store is byte for byte as it was"
    );
    assert_eq!(env.ecds_bytes(), ecds);
    env.accepted(&key);

    let out = env.run(
        &["create", "--name", "n", "--role", "client", "--apply"],
        "",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "a key no Envoy accepts is not shown");
    assert!(String::from_utf8_lossy(&out.stderr).contains("rejected version"));
    env.fail(&["rotate", &id, "--grace", "1h", "--apply"], 1);
    assert_eq!(env.store_text(), store);
    assert_eq!(env.ecds_bytes(), ecds);
    // Temp files do not outlive the undo either.
    assert_eq!(env.files(Path::new("ecds")), ["keygate.yaml"]);
    assert_eq!(
        env.files(Path::new(".")),
        [
            "ecds",
            "keygate.json",
            "keygate.json.audit.jsonl",
            "keygate.json.lock"
        ]
    );

    // The first apply ever: undone means no ECDS file at all.
    let fresh = Env::init();
    let admin = fake_admin(&fresh, Admin::Rejects);
    fresh.ok(&["set-admin", &admin]);
    let store = fresh.store_text();
    fresh.fail(&["create", "--name", "n", "--role", "client", "--apply"], 1);
    assert_eq!(fresh.store_text(), store);
    assert!(!fresh.ecds_path().exists());
}

#[test]
fn an_apply_envoy_does_not_take_up_in_time_changes_nothing() {
    let env = Env::init();
    let (id, _) = env.create(&["--apply"]);
    let admin = fake_admin(&env, Admin::Ignores);
    env.ok(&["set-admin", &admin]);
    let (store, ecds) = (env.store_text(), env.ecds_bytes());
    let started = Instant::now();
    let err = env.fail(&["revoke", &id, "--apply", "--apply-timeout", "1s"], 1);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(
        err.contains("did not take up version sha256:")
            && err.contains("within 1 s")
            && err.contains("is it the Envoy that watches")
            && err.contains("nothing was changed"),
        "{err}"
    );
    assert_eq!(env.store_text(), store);
    assert_eq!(env.ecds_bytes(), ecds);
    // Applying what Envoy already serves is confirmed at once (same content, same
    // version); a change made without --apply and applied later is waited for.
    assert_eq!(env.json(&["apply"])["envoy"]["status"], "confirmed");
    env.create(&[]);
    let ecds = env.ecds_bytes();
    let err = env.fail(&["apply", "--apply-timeout", "1s"], 1);
    assert!(err.contains("did not take up"), "{err}");
    assert_eq!(env.ecds_bytes(), ecds);
}

#[test]
fn an_unreachable_admin_leaves_the_change_written_and_says_so() {
    let env = Env::init();
    let admin = closed_admin();
    env.ok(&["set-admin", &admin]);
    let out = env.ok(&["create", "--name", "n", "--role", "client", "--apply"]);
    assert_eq!(
        out.lines().last().unwrap(),
        format!(
            "written to {} (not confirmed: Envoy is not reachable at {admin}: connection refused; \
             the change is only written, and Envoy takes it up when it reads the file)",
            env.ecds_path().display()
        )
    );
    env.accepted(out.lines().nth(2).unwrap());
    let out = env.json(&["apply"]);
    assert_eq!(out["envoy"]["status"], "unreachable");
    assert_eq!(out["envoy"]["reason"], "connection refused");
}

#[test]
fn an_admin_that_is_not_envoys_or_has_no_keygate_filter_changes_nothing() {
    for (mode, expect) in [
        (
            Admin::NotEnvoy,
            "did not answer as Envoy does (HTTP status 404",
        ),
        (
            Admin::NoKeygate,
            "has no ECDS subscription for the filter \"keygate\"",
        ),
    ] {
        let env = Env::init();
        let (id, _) = env.create(&["--apply"]);
        let admin = fake_admin(&env, mode);
        env.ok(&["set-admin", &admin]);
        let (store, ecds) = (env.store_text(), env.ecds_bytes());
        let err = env.fail(&["revoke", &id, "--apply"], 1);
        assert!(
            err.contains(expect) && err.contains("nothing was changed"),
            "{err}"
        );
        assert!(err.contains("keygate set-admin"), "{err}");
        assert_eq!(env.store_text(), store);
        assert_eq!(env.ecds_bytes(), ecds);
    }
}

#[test]
fn check_looks_at_the_module_and_apply_refuses_one_that_is_not_wasm() {
    let env = Env::init();
    env.create(&["--apply"]);
    // Missing: a warning (it may be a path inside Envoy's container), not an error.
    let out = env.run(&["check"], "");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8(out.stderr).unwrap(),
        "keygate: warning: the module /opt/keygate.wasm (envoy.wasm) does not exist here; fine if \
         it is a path inside Envoy's container or from Envoy's working directory, and it exists there\n"
    );
    assert_eq!(env.json(&["check"])["module"]["status"], "missing");

    let module = env.dir.path().join("keygate.wasm");
    fs::write(&module, b"\0asm\x01\0\0\0\x01\x04\x01\x60\0\0").unwrap();
    env.set_wasm(&module);
    let out = env.run(&["check"], "");
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stderr.is_empty());
    assert_eq!(env.json(&["check"])["module"]["status"], "ok");
    env.ok(&["apply"]);

    for (bytes, why) in [
        (
            &b"#!/bin/sh\necho not wasm\n"[..],
            "it does not start with \\0asm",
        ),
        (b"\0as", "it is only 3 bytes long"),
        (b"", "it is only 0 bytes long"),
        (b"\0asm\x0d\0\x01\0", "its binary version is 65549, not 1"),
    ] {
        fs::write(&module, bytes).unwrap();
        let err = env.fail(&["check"], 1);
        assert_eq!(
            err,
            format!(
                "keygate: {} (envoy.wasm) is not a Wasm module ({why}{}), and Envoy would reject \
                 the configuration; point envoy.wasm at the filter's keygate.wasm",
                module.display(),
                if why.starts_with("its binary") {
                    ": a component, not a module?"
                } else {
                    ""
                }
            )
        );
        let (store, ecds) = (env.store_text(), env.ecds_bytes());
        for args in [
            &["apply"][..],
            &["create", "--name", "n", "--role", "client", "--apply"],
        ] {
            let err = env.fail(args, 1);
            assert!(
                err.contains("is not a Wasm module") && err.ends_with("nothing was changed"),
                "{err}"
            );
        }
        assert_eq!(env.store_text(), store);
        assert_eq!(env.ecds_bytes(), ecds);
    }
    // Without --apply the module is not looked at: keys can still be managed.
    env.ok(&["create", "--name", "n", "--role", "client"]);
    fs::remove_file(&module).unwrap();
    fs::create_dir(&module).unwrap();
    assert!(env.fail(&["check"], 1).contains("(it is a directory)"));
}

#[test]
fn doctor_prints_the_report_and_exits_by_its_verdict() {
    let env = Env::new();
    let repo_yaml = Path::new(env!("CARGO_MANIFEST_DIR")).join("envoy/envoy.yaml");
    let text = fs::read_to_string(&repo_yaml).unwrap();
    let safe = env.dir.path().join("envoy.yaml");
    fs::write(&safe, &text).unwrap();
    let out = env.run(&["doctor", safe.to_str().unwrap()], "");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.trim_end().ends_with("keygate's requirements hold")
            || stdout.contains("keygate's requirements hold ("),
        "{stdout}"
    );
    assert_eq!(env.json(&["doctor", safe.to_str().unwrap()])["safe"], true);

    let risky = env.dir.path().join("risky.yaml");
    fs::write(
        &risky,
        text.replace("use_remote_address: true", "use_remote_address: false"),
    )
    .unwrap();
    let out = env.run(&["doctor", risky.to_str().unwrap()], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stdout).unwrap().contains("UNSAFE"));
    let out = env.run(&["--json", "doctor", risky.to_str().unwrap()], "");
    assert_eq!(out.status.code(), Some(1));
    let report = json(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(report["safe"], false);

    let err = env.fail(&["doctor", "/nonexistent/envoy.yaml"], 2);
    assert!(err.contains("/nonexistent/envoy.yaml"), "{err}");
}

// ---------------------------------------------------------------- a fleet of Envoys

/// envoyproxy/ratelimit's configuration, with only the keys its loader accepts.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RatelimitRoot {
    domain: String,
    descriptors: Vec<RatelimitDescriptor>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RatelimitDescriptor {
    key: String,
    value: Option<String>,
    rate_limit: Option<RatelimitLimit>,
    #[serde(default)]
    descriptors: Vec<RatelimitDescriptor>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RatelimitLimit {
    unit: String,
    requests_per_unit: u32,
}

/// A Limitador limit, as its limits file gives it.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitadorLimit {
    namespace: String,
    name: Option<String>,
    max_value: u64,
    seconds: u64,
    conditions: Vec<String>,
    variables: Vec<String>,
}

#[test]
fn render_gives_the_plans_to_envoyproxy_ratelimit_and_limitador() {
    let env = Env::new();
    let policy = env.dir.path().join("policy.json");
    fs::write(
        &policy,
        r#"{"default_plan": "free", "plans": {
            "pro": {"requests": 50, "per": "hour", "burst": 10},
            "burst": {"requests": 5, "per": "second"}}}"#,
    )
    .unwrap();
    env.ok(&["init", "--policy", policy.to_str().unwrap()]);
    // name, requests, unit, seconds: the built-in plans, pro overridden, one added.
    let want = [
        ("burst", 5, "second", 1),
        ("enterprise", 6000, "minute", 60),
        ("free", 60, "minute", 60),
        ("pro", 50, "hour", 3600),
    ];

    // No key is needed: only the plans are rendered.
    let text = env.ok(&["render", "--format", "envoy-ratelimit"]);
    assert!(
        text.starts_with('#') && text.contains("fixed windows"),
        "{text}"
    );
    assert!(
        text.contains("#   pro: burst 10 not expressed; 50 requests per hour window\n"),
        "{text}"
    );
    let root: RatelimitRoot = serde_norway::from_str(&text).unwrap();
    assert_eq!(root.domain, "keygate");
    let got: Vec<(String, u64, String)> = root
        .descriptors
        .iter()
        .map(|d| {
            assert_eq!(d.key, "plan");
            assert!(d.rate_limit.is_none());
            assert_eq!(d.descriptors.len(), 1);
            let per_key = &d.descriptors[0];
            assert_eq!((per_key.key.as_str(), &per_key.value), ("key_id", &None));
            let limit = per_key.rate_limit.as_ref().unwrap();
            (
                d.value.clone().unwrap(),
                u64::from(limit.requests_per_unit),
                limit.unit.clone(),
            )
        })
        .collect();
    let expect: Vec<(String, u64, String)> = want
        .iter()
        .map(|(n, r, u, _)| (n.to_string(), *r, u.to_string()))
        .collect();
    assert_eq!(got, expect);

    let text = env.ok(&["render", "--format", "limitador"]);
    assert!(text.contains("limitador-server 2.4.0"), "{text}");
    assert!(text.contains("fixed windows"), "{text}");
    let limits: Vec<LimitadorLimit> = serde_norway::from_str(&text).unwrap();
    let got: Vec<(String, u64, u64)> = limits
        .iter()
        .map(|l| {
            assert_eq!(l.namespace, "keygate");
            assert_eq!(l.variables, ["descriptors[0]['key_id']"]);
            assert_eq!(l.conditions.len(), 1);
            let plan = l.conditions[0]
                .strip_prefix("descriptors[0]['plan'] == '")
                .and_then(|c| c.strip_suffix('\''))
                .unwrap()
                .to_string();
            assert_eq!(l.name.clone().unwrap(), format!("keygate plan {plan}"));
            (plan, l.max_value, l.seconds)
        })
        .collect();
    let expect: Vec<(String, u64, u64)> = want
        .iter()
        .map(|(n, r, _, s)| (n.to_string(), *r, *s))
        .collect();
    assert_eq!(got, expect);

    // A store the filter would refuse renders nothing.
    env.edit_store(|doc| doc["policy"]["plans"]["pro"]["requests"] = 0.into());
    let err = env.fail(&["render", "--format", "limitador"], 1);
    // Named as every other store problem is (a store without keys is checked the same way).
    assert!(err.contains("plans[\"pro\"].requests"), "{err}");
}

/// Runs `keygate status`; returns its exit code and stdout.
fn status(env: &Env, json_out: bool) -> (Option<i32>, String) {
    let args: &[&str] = if json_out {
        &["--json", "status"]
    } else {
        &["status"]
    };
    let out = env.run(args, "");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), String::from_utf8(out.stdout).unwrap())
}

#[test]
fn set_admin_names_a_fleet_and_adds_and_removes_admins() {
    let env = Env::init();
    let (a, b, c) = (closed_admin(), closed_admin(), closed_admin());
    let out = env.ok(&["set-admin", &a, &b]);
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(out.starts_with(&format!(
        "Envoy admin: {a}; Envoy is not reachable there now"
    )));
    assert_eq!(
        env.store_json()["envoy"]["admin"],
        serde_json::json!([a, b])
    );

    let out = env.json(&["set-admin", "--add", &c, &a]);
    assert_eq!(out["admin"], serde_json::json!([a, b, c]));
    assert_eq!(out["previous"], serde_json::json!([a, b]));
    assert_eq!(out["admins"].as_array().unwrap().len(), 3);
    assert_eq!(out["admins"][2]["status"], "unreachable");
    let out = env.ok(&["set-admin", "--add", &b]);
    assert_eq!(
        out.lines().next().unwrap(),
        format!("already named: {b}; the store names 3 Envoy admins")
    );

    let out = env.ok(&["set-admin", "--remove", &b]);
    assert_eq!(
        out.lines().next().unwrap(),
        format!("removed {b}; the store names 2 Envoy admins")
    );
    assert_eq!(
        env.store_json()["envoy"]["admin"],
        serde_json::json!([a, c])
    );
    let before = env.store_text();
    let err = env.fail(&["set-admin", "--remove", &b], 1);
    assert_eq!(
        err,
        format!(
            "keygate: the store names no Envoy admin {b} (it names {a}, {c}); nothing was changed"
        )
    );
    assert_eq!(env.store_text(), before);
    // One admin left: written as a string, the form an older keygate reads.
    env.ok(&["set-admin", "--remove", &c]);
    assert_eq!(env.store_json()["envoy"]["admin"], a.as_str());
    let out = env.ok(&["set-admin", "--remove", &a]);
    assert_eq!(
        out.trim(),
        format!("removed {a}; the store names no Envoy admin: --apply now only writes the file")
    );
    assert!(env.store_json()["envoy"].get("admin").is_none());

    // The same admin twice (a trailing slash is the same URL) is named once.
    env.ok(&["set-admin", &a, &format!("{a}/")]);
    assert_eq!(env.store_json()["envoy"]["admin"], a.as_str());
    // One change at a time.
    for args in [
        &["set-admin", a.as_str(), "--add", b.as_str()][..],
        &["set-admin", "--clear", "--remove", a.as_str()],
        &["set-admin", "--add", "ftp://h:1"],
    ] {
        env.fail(args, 2);
    }

    let fleet = Env::new();
    fleet.ok(&["init", "--envoy-admin", &a, "--envoy-admin", &b]);
    assert_eq!(
        fleet.store_json()["envoy"]["admin"],
        serde_json::json!([a, b])
    );
    // A hand-edited list is checked entry by entry.
    fleet.edit_store(|doc| doc["envoy"]["admin"] = serde_json::json!([a, format!("{a}/")]));
    let err = fleet.fail(&["create", "--name", "n", "--role", "client"], 1);
    assert!(
        err.contains(&format!(
            "invalid store: envoy.admin[1]: {a} is named twice"
        )),
        "{err}"
    );
    fleet.edit_store(|doc| doc["envoy"]["admin"] = serde_json::json!(["http://h:1/x"]));
    let err = fleet.fail(&["create", "--name", "n", "--role", "client"], 1);
    assert!(err.contains("invalid store: envoy.admin:"), "{err}");
    fleet.edit_store(|doc| doc["envoy"]["admin"] = serde_json::json!(7));
    let err = fleet.fail(&["list"], 1);
    assert!(err.contains("envoy.admin: invalid type: integer"), "{err}");
}

#[test]
fn a_fleet_confirms_with_every_envoy() {
    let env = Env::init();
    env.create(&["--apply"]);
    let admins: Vec<String> = (0..3).map(|_| fake_admin(&env, Admin::Accepts)).collect();
    let out = env.ok(&["set-admin", &admins[0], &admins[1], &admins[2]]);
    assert_eq!(
        out.matches("Envoy answers there and serves version sha256:")
            .count(),
        3,
        "{out}"
    );
    let out = env.ok(&["create", "--name", "n", "--role", "client", "--apply"]);
    let last = out.lines().last().unwrap();
    let prefix = format!(
        "applied: all 3 Envoys serve version {} from {} (confirmed after ",
        env.ecds_version(),
        env.ecds_path().display()
    );
    assert!(last.starts_with(&prefix), "{last}");
    assert!(
        last.ends_with(&format!(": {})", admins.join(", "))),
        "{last}"
    );
    env.accepted(out.lines().nth(2).unwrap());

    let (id, _) = env.create(&[]);
    let out = env.json(&["revoke", &id, "--apply"]);
    let envoy = &out["envoy"];
    assert_eq!(envoy["status"], "confirmed");
    assert!(envoy["admin"].is_null());
    assert!(envoy["seconds"].as_f64().unwrap() < 5.0);
    let each = envoy["envoys"].as_array().unwrap();
    assert_eq!(each.len(), 3);
    for (e, admin) in each.iter().zip(&admins) {
        assert_eq!(
            (&e["admin"], &e["status"]),
            (&admin.as_str().into(), &"confirmed".into())
        );
    }

    let (code, text) = status(&env, false);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.ends_with("in sync: all 3 Envoys serve the store's version\n"),
        "{text}"
    );
}

#[test]
fn one_envoy_rejecting_undoes_the_change_for_the_whole_fleet() {
    let env = Env::init();
    let (id, key) = env.create(&["--apply"]);
    let rejects = fake_admin(&env, Admin::Rejects);
    let accepts = fake_admin(&env, Admin::Accepts);
    env.ok(&["set-admin", &accepts, &rejects]);
    let (store, ecds) = (env.store_text(), env.ecds_bytes());
    let version = env.ecds_version();

    let err = env.fail(&["revoke", &id, "--apply"], 1);
    assert!(
        err.starts_with(&format!(
            "keygate: Envoy at {rejects} rejected version sha256:"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("Envoy keeps serving version {version}"))
            && !err.contains(&format!("Envoy at {accepts} rejected"))
            && err.ends_with(&format!(
                "nothing was changed: {} and {} are as they were",
                env.store.display(),
                env.ecds_path().display()
            )),
        "{err}"
    );
    assert_eq!(env.store_text(), store);
    assert_eq!(env.ecds_bytes(), ecds);
    env.accepted(&key);
    let out = env.run(
        &["create", "--name", "n", "--role", "client", "--apply"],
        "",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stdout.is_empty(),
        "a key the fleet does not accept is not shown"
    );
    assert_eq!(env.store_text(), store);
}

#[test]
fn an_unreachable_envoy_in_the_fleet_is_reported_and_the_change_stays_written() {
    let env = Env::init();
    let accepts = fake_admin(&env, Admin::Accepts);
    let down = closed_admin();
    env.ok(&["set-admin", &accepts, &down]);
    let out = env.ok(&["create", "--name", "n", "--role", "client", "--apply"]);
    let last = out.lines().last().unwrap();
    let version = env.ecds_version();
    assert!(
        last.starts_with(&format!(
            "applied: 1 of 2 Envoys serve version {version} from {} (confirmed after ",
            env.ecds_path().display()
        )),
        "{last}"
    );
    assert!(
        last.ends_with(&format!(
            "s: {accepts}); not confirmed at {down} (connection refused): not reachable; the \
             change is written, and that Envoy takes it up when it reads the file"
        )),
        "{last}"
    );
    env.accepted(out.lines().nth(2).unwrap());
    let (id, _) = env.create(&[]);
    let out = env.json(&["suspend", &id, "--apply"]);
    assert_eq!(out["envoy"]["status"], "partial");
    assert_eq!(out["envoy"]["envoys"][0]["status"], "confirmed");
    assert_eq!(
        out["envoy"]["envoys"][1],
        serde_json::json!({"admin": down, "status": "unreachable", "reason": "connection refused"})
    );

    // None reachable: written only, each named.
    let other = closed_admin();
    env.ok(&["set-admin", &down, &other]);
    let out = env.ok(&["reactivate", &id, "--apply"]);
    assert_eq!(
        out.lines().last().unwrap(),
        format!(
            "written to {} (not confirmed: no Envoy is reachable: {down} (connection refused), \
             {other} (connection refused); the change is only written, and the Envoys take it up \
             when they read the file)",
            env.ecds_path().display()
        )
    );
    assert_eq!(env.json(&["apply"])["envoy"]["status"], "unreachable");
    assert_ne!(env.ecds_version(), version);
}

#[test]
fn status_compares_every_envoy_with_the_store() {
    let env = Env::init();
    let err = env.fail(&["status"], 1);
    assert!(
        err.contains("the store names no Envoy admin to ask"),
        "{err}"
    );
    env.create(&["--apply"]);
    let first = env.ecds_version();
    let accepts = fake_admin(&env, Admin::Accepts);
    // Ignores keeps serving the version it first saw: an Envoy that missed the changes.
    let stale = fake_admin(&env, Admin::Ignores);
    let down = closed_admin();
    env.ok(&["set-admin", &accepts, &stale, &down]);

    let (code, text) = status(&env, false);
    assert_eq!(code, Some(1), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    // set-admin made revision 3 of the same content: the Envoy serving the content of
    // revision 2 is current.
    let content = first.strip_suffix("-r2").unwrap();
    assert_eq!(
        lines[0],
        format!("store: revision 3, version {content}-r3 (1 key)")
    );
    assert_eq!(
        lines[1],
        format!(
            "ECDS file: {} holds version {first}",
            env.ecds_path().display()
        )
    );
    let columns = |line: &str| {
        line.split_whitespace()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        columns(lines[2]),
        [
            "ENVOY",
            "REACHABLE",
            "REVISION",
            "SERVES",
            "CURRENT",
            "NOTE"
        ]
    );
    // Each Envoy's revision against the store's.
    assert_eq!(
        columns(lines[3]),
        [accepts.as_str(), "yes", "r2", "of", "r3", &first, "yes"]
    );
    assert_eq!(
        columns(lines[4]),
        [stale.as_str(), "yes", "r2", "of", "r3", &first, "yes"]
    );
    assert_eq!(
        columns(lines[5]),
        [down.as_str(), "no", "-", "-", "no", "connection", "refused"]
    );
    assert_eq!(
        lines[6],
        "not in sync: 1 of 3 Envoys do not serve the store's version"
    );
    assert_eq!(lines.len(), 7);

    env.ok(&["set-admin", "--remove", &down]);
    let (code, text) = status(&env, false);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.ends_with("in sync: all 2 Envoys serve the store's version\n"),
        "{text}"
    );

    // A change not applied: the store is ahead of the file and of every Envoy.
    env.create(&[]);
    let (code, out) = status(&env, true);
    assert_eq!(code, Some(1));
    let out = json(&out);
    let second = str_of(&out["version"]);
    assert_ne!(second, first);
    assert_eq!(out["keys"], 2);
    assert_eq!(out["in_sync"], false);
    assert_eq!(out["ecds"]["version"], first.as_str());
    assert_eq!(
        out["envoys"][0],
        serde_json::json!({"admin": accepts, "reachable": true, "serves": [first],
                           "revisions": [2], "current": false, "rejected": 0, "error": null})
    );
    let (_, text) = status(&env, false);
    assert!(
        text.contains("holds version ")
            && text.contains("not the store's (keygate apply writes it)")
            && text.ends_with(
                "not in sync: 2 of 2 Envoys do not serve the store's version (keygate apply writes it)\n"
            ),
        "{text}"
    );

    // Applied where it is taken up; the Envoy that misses it is the one status names.
    env.ok(&["set-admin", "--remove", &stale]);
    assert_eq!(env.json(&["apply"])["envoy"]["status"], "confirmed");
    env.ok(&["set-admin", "--add", &stale]);
    let (code, out) = status(&env, true);
    assert_eq!(code, Some(1));
    let out = json(&out);
    // The same content as `second`, at the revision set-admin --remove made (--add made
    // another since).
    assert_eq!(
        keygate::store::content_of(out["ecds"]["version"].as_str().unwrap()),
        keygate::store::content_of(&second)
    );
    assert_eq!(out["revision"], 7);
    assert_eq!(out["envoys"][0]["current"], true);
    assert_eq!(out["envoys"][1]["current"], false);
    assert_eq!(out["envoys"][1]["serves"], serde_json::json!([first]));
    env.ok(&["set-admin", &accepts]);
    assert_eq!(status(&env, false).0, Some(0));

    // Something that is not Envoy's admin is reported as such.
    let env = Env::init();
    env.create(&["--apply"]);
    let not_envoy = fake_admin(&env, Admin::NotEnvoy);
    let no_keygate = fake_admin(&env, Admin::NoKeygate);
    env.ok(&["set-admin", &not_envoy, &no_keygate]);
    let (code, out) = status(&env, true);
    assert_eq!(code, Some(1));
    let out = json(&out);
    assert_eq!(out["envoys"][0]["reachable"], true);
    assert!(
        str_of(&out["envoys"][0]["error"]).starts_with("not Envoy's admin: HTTP status 404"),
        "{out}"
    );
    assert_eq!(
        out["envoys"][1]["error"],
        "no ECDS subscription for the filter \"keygate\""
    );
}

#[test]
fn policy_show_check_and_set_change_plans_in_place() {
    let env = Env::init();
    let policy = env.dir.path().join("policy.json");
    fs::write(
        &policy,
        r#"{"plans": {"tiny": {"requests": 5, "per": "minute"}}, "default_plan": "free"}"#,
    )
    .unwrap();
    env.ok(&["policy", "set", policy.to_str().unwrap()]);
    let (id, _) = env.create(&["--plan", "tiny"]);
    let shown = json(&env.ok(&["policy", "show"]));
    assert_eq!(shown["plans"]["tiny"]["requests"], 5);
    assert!(shown.get("keys").is_none(), "{shown}");

    // A policy that drops a plan a key uses is refused, naming the key's field; nothing changes.
    let before = env.store_text();
    let dropped = env.dir.path().join("dropped.json");
    fs::write(&dropped, r#"{"default_plan": "free"}"#).unwrap();
    let e = env.fail(&["policy", "check", dropped.to_str().unwrap()], 1);
    assert!(
        e.contains(&format!("keys[\"{id}\"].plan: unknown plan \"tiny\"")),
        "{e} ({id})"
    );
    let e = env.fail(&["policy", "set", dropped.to_str().unwrap()], 1);
    assert!(
        e.contains(&format!("keys[\"{id}\"].plan: unknown plan \"tiny\"")),
        "{e}"
    );
    assert_eq!(env.store_text(), before);

    // A policy file with keys is not a policy.
    let with_keys = env.dir.path().join("with-keys.json");
    fs::write(
        &with_keys,
        format!(
            r#"{{"keys": [{{"id": "x", "hash": "{}", "role": "r"}}]}}"#,
            keys::hash_string(b"some-legacy-key-123")
        ),
    )
    .unwrap();
    let e = env.fail(&["policy", "set", with_keys.to_str().unwrap()], 1);
    assert!(e.contains("keys: a policy holds no keys"), "{e}");
    assert_eq!(env.store_text(), before);

    // A changed plan goes through, and again is a no-op.
    fs::write(
        &policy,
        r#"{"plans": {"tiny": {"requests": 9, "per": "minute"}}, "default_plan": "free"}"#,
    )
    .unwrap();
    let out = env.ok(&["policy", "check", policy.to_str().unwrap()]);
    assert!(out.contains("valid with the store's 1 keys"), "{out}");
    assert_eq!(env.store_text(), before);
    let out = env.ok(&["policy", "set", policy.to_str().unwrap()]);
    assert!(out.starts_with("policy replaced from"), "{out}");
    assert_eq!(env.store_json()["policy"]["plans"]["tiny"]["requests"], 9);
    let out = env.ok(&["policy", "set", policy.to_str().unwrap()]);
    assert!(out.starts_with("the policy is already"), "{out}");
}

// ---------------------------------------------------------------- usage from Envoy's counters
//
// A stand-in for Envoy's admin answering /stats/prometheus (chunked, as Envoy 1.40 does)
// with a page of the filter's series; the real Envoy is exercised by
// tests/integration/test_usage.py.

/// Starts a stand-in admin serving `page` at /stats/prometheus (404 elsewhere); returns
/// its URL.
fn prometheus_admin(page: String) -> String {
    use std::io::Read as _;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match stream.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => break,
                }
            }
            let head = String::from_utf8_lossy(&head);
            let reply = if head.starts_with("GET /stats/prometheus") {
                let (a, b) = page.split_at(page.len() / 2);
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; charset=UTF-8\r\nserver: envoy\r\n\
                     transfer-encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                    a.len(),
                    b.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_string()
            };
            let _ = stream.write_all(reply.as_bytes());
        }
    });
    url
}

/// A key on a [`page`]: id, allowed, denied by reason, last used.
type PageKey<'a> = (&'a str, u64, &'a [(&'a str, u64)], Option<i64>);

/// A page of the filter's series: for each (key id, allowed, [(reason, denied)], last
/// used), Envoy's TYPE lines and stats of its own around them.
fn page(keys: &[PageKey], uptime: i64) -> String {
    let escape = |id: &str| id.replace('\\', r"\\").replace('"', "\\\"");
    let mut out = String::from(
        "# TYPE envoy_cluster_upstream_rq counter\n\
         envoy_cluster_upstream_rq{envoy_response_code=\"200\",envoy_cluster_name=\"upstream\"} 7\n\
         # TYPE keygate_key_requests_total counter\n",
    );
    let mut all_allowed = 0;
    for (id, allowed, denied, _) in keys {
        all_allowed += allowed;
        out += &format!(
            "keygate_key_requests_total{{key_id=\"{}\",outcome=\"allowed\",reason=\"none\"}} {allowed}\n",
            escape(id)
        );
        for (reason, n) in *denied {
            out += &format!(
                "keygate_key_requests_total{{reason=\"{reason}\",outcome=\"denied\",key_id=\"{}\"}} {n}\n",
                escape(id)
            );
        }
    }
    out += "# TYPE keygate_key_last_used_seconds gauge\n";
    for (id, _, _, last) in keys {
        if let Some(at) = last {
            out += &format!(
                "keygate_key_last_used_seconds{{key_id=\"{}\"}} {at}\n",
                escape(id)
            );
        }
    }
    out += &format!(
        "# TYPE keygate_requests_total counter\n\
         keygate_requests_total{{outcome=\"allowed\",reason=\"none\",status_class=\"2xx\",route=\"/v1\"}} {all_allowed}\n\
         keygate_requests_total{{outcome=\"denied\",reason=\"missing_api_key\",status_class=\"4xx\",route=\"/v1\"}} 2\n\
         # TYPE envoy_server_uptime gauge\n\
         envoy_server_uptime{{}} {uptime}\n"
    );
    out
}

/// Runs a command that must succeed; returns stdout and stderr.
fn ok_with_stderr(env: &Env, args: &[&str]) -> (String, String) {
    let out = env.run(args, "");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "keygate {args:?}: {stderr}");
    (String::from_utf8(out.stdout).unwrap(), stderr)
}

fn columns(line: &str) -> Vec<String> {
    line.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(String::from)
        .collect()
}

/// Three keys of which the first is renamed to an id with `.`, `:`, `@` and `-`.
fn usage_env() -> (Env, [String; 3]) {
    let env = Env::init();
    env.create(&[]);
    let (used, _) = env.create(&[]);
    let (never, _) = env.create(&[]);
    let dotted = "svc.payments:eu-1@acme-prod".to_string();
    env.edit_store(|doc| doc["keys"][0]["id"] = dotted.clone().into());
    (env, [dotted, used, never])
}

#[test]
fn usage_with_one_admin_shows_each_key_and_flags_the_unused() {
    let (env, [dotted, used, never]) = usage_env();
    let now = now();
    let admin = prometheus_admin(page(
        &[
            (
                &dotted,
                12,
                &[("rate_limited", 3), ("insufficient_permissions", 1)],
                Some(now - 180),
            ),
            (&used, 5, &[], Some(now - 40 * 86_400)),
            ("k_removed0001", 2, &[("key_revoked", 4)], Some(now - 7200)),
        ],
        7200,
    ));
    let (text, stderr) = ok_with_stderr(&env, &["usage", "--envoy-admin", &admin]);
    assert_eq!(stderr, "");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        columns(lines[0]),
        [
            "ID",
            "NAME",
            "STATUS",
            "LAST USED",
            "AT",
            "ALLOWED",
            "DENIED",
            "DENIALS",
            "FLAG"
        ]
    );
    let at = |t: i64| keygate::time::format_rfc3339(t);
    assert_eq!(
        columns(lines[1]),
        [
            dotted.as_str(),
            "test",
            "active",
            "3 min ago",
            &at(now - 180),
            "12",
            "4",
            "insufficient_permissions=1,rate_limited=3"
        ]
    );
    assert_eq!(
        columns(lines[2]),
        [
            used.as_str(),
            "test",
            "active",
            "40 days ago",
            &at(now - 40 * 86_400),
            "5",
            "0",
            "-"
        ]
    );
    assert_eq!(
        columns(lines[3]),
        [
            never.as_str(),
            "test",
            "active",
            "never",
            "-",
            "0",
            "0",
            "-",
            "never used"
        ]
    );
    assert_eq!(lines[4], "");
    assert_eq!(
        lines[5],
        "in Envoy's counters, not in the store (removed keys):"
    );
    assert_eq!(
        columns(lines[6]),
        ["ID", "LAST USED", "AT", "ALLOWED", "DENIED", "DENIALS"]
    );
    assert_eq!(
        columns(lines[7]),
        [
            "k_removed0001",
            "2 h ago",
            &at(now - 7200),
            "2",
            "4",
            "key_revoked=4"
        ]
    );
    assert_eq!(lines[8], "");
    assert_eq!(lines[9], "3 keys: 2 used, 1 never used");
    assert_eq!(
        lines[10],
        format!("never used since Envoy started 2 h ago: {never}")
    );
    assert_eq!(
        lines[11],
        "every request, with a key or not: 19 allowed, 2 denied (missing_api_key=2)"
    );
    assert_eq!(lines[12], format!("counters of Envoy {admin} (up 2 h)"));
    assert_eq!(lines.len(), 13, "{text}");
    assert!(!text.contains("kg_"), "no key, nor a prefix: {text}");

    // --unused-for flags the key last used 40 days ago too; a key used 3 min ago is not.
    let out = env.ok(&["usage", "--envoy-admin", &admin, "--unused-for", "30d"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(columns(lines[1]).len(), 8, "{out}");
    assert_eq!(columns(lines[2])[8], "not used for 30d");
    assert_eq!(columns(lines[3])[8], "never used");
    assert!(
        out.contains("\n3 keys: 2 used, 1 never used, 1 not used for 30d\n"),
        "{out}"
    );
    assert!(
        out.contains(&format!("\nnot used for 30d: {used}\n")),
        "{out}"
    );
    let out = env.ok(&["usage", "--envoy-admin", &admin, "--unused-for", "41d"]);
    assert!(out.contains(", 0 not used for 41d\n"), "{out}");
    assert!(!out.contains("not used for 41d:"), "{out}");

    // A revoked key that was never used is not flagged: it cannot be used any more.
    env.ok(&["revoke", &never]);
    let out = env.json(&["usage", "--envoy-admin", &admin]);
    assert_eq!(out["keys"][2]["status"], "revoked");
    assert_eq!(out["keys"][2]["flag"], Value::Null);
    assert_eq!(out["never_used"], serde_json::json!([]));

    // Bad durations are usage errors.
    let e = env.fail(
        &["usage", "--envoy-admin", &admin, "--unused-for", "30x"],
        2,
    );
    assert!(e.contains("not a duration"), "{e}");
    let e = env.fail(&["usage", "--envoy-admin", &admin, "--unused-for", "0d"], 2);
    assert!(e.contains("over zero"), "{e}");
}

#[test]
fn usage_json_has_every_key_the_removed_ones_and_each_envoy() {
    let (env, [dotted, used, never]) = usage_env();
    let now = now();
    let admin = prometheus_admin(page(
        &[
            (&dotted, 12, &[("rate_limited", 3)], Some(now - 180)),
            (&used, 5, &[], Some(now - 40 * 86_400)),
            ("k_removed0001", 2, &[], Some(now - 7200)),
        ],
        7200,
    ));
    let out = env.json(&["usage", "--envoy-admin", &admin, "--unused-for", "30d"]);
    let at = |t: i64| keygate::time::format_rfc3339(t);
    assert_eq!(
        out["keys"][0],
        serde_json::json!({
            "id": dotted, "name": "test", "status": "active",
            "last_used": at(now - 180), "last_used_unix": now - 180,
            "allowed": 12, "denied": 3, "denials": {"rate_limited": 3}, "flag": null,
        })
    );
    assert_eq!(out["keys"][1]["flag"], "unused");
    assert_eq!(
        out["keys"][2],
        serde_json::json!({
            "id": never, "name": "test", "status": "active", "last_used": null,
            "last_used_unix": null, "allowed": 0, "denied": 0, "denials": {},
            "flag": "never_used",
        })
    );
    assert_eq!(out["never_used"], serde_json::json!([never]));
    assert_eq!(out["unused"], serde_json::json!([used]));
    assert_eq!(out["unused_for"], "30d");
    assert_eq!(
        out["removed"],
        serde_json::json!([{
            "id": "k_removed0001", "last_used": at(now - 7200), "last_used_unix": now - 7200,
            "allowed": 2, "denied": 0, "denials": {},
        }])
    );
    assert_eq!(out["key_sets"], serde_json::json!([]));
    assert_eq!(out["per_key_series"], true);
    assert_eq!(out["dropped"], Value::Null);
    assert_eq!(
        out["totals"],
        serde_json::json!({"allowed": 19, "denied": 2, "denials": {"missing_api_key": 2}})
    );
    assert_eq!(
        out["envoys"],
        serde_json::json!([{
            "admin": admin, "reachable": true, "uptime_seconds": 7200,
            "keygate_metrics": true, "error": null,
        }])
    );
    assert!(unix(&out["now"]) >= now);
    // Without --unused-for, nothing is unused, only never used.
    let out = env.json(&["usage", "--envoy-admin", &admin]);
    assert_eq!(out["unused"], serde_json::json!([]));
    assert_eq!(out["unused_for"], Value::Null);
    assert_eq!(out["keys"][1]["flag"], Value::Null);
}

#[test]
fn usage_of_a_fleet_sums_counters_and_keeps_the_latest_use() {
    let (env, [dotted, used, never]) = usage_env();
    let now = now();
    let a = prometheus_admin(page(
        &[
            (&dotted, 10, &[("rate_limited", 1)], Some(now - 600)),
            (&used, 1, &[], Some(now - 86_400)),
        ],
        9000,
    ));
    let b = prometheus_admin(page(
        &[
            (
                &dotted,
                5,
                &[("rate_limited", 2), ("key_suspended", 1)],
                Some(now - 60),
            ),
            ("k_removed0001", 3, &[], Some(now - 100)),
        ],
        300,
    ));
    // The store names both: usage asks them without flags.
    env.ok(&["set-admin", &a, &b]);
    let out = env.json(&["usage"]);
    assert_eq!(out["keys"][0]["allowed"], 15);
    assert_eq!(out["keys"][0]["denied"], 4);
    assert_eq!(
        out["keys"][0]["denials"],
        serde_json::json!({"key_suspended": 1, "rate_limited": 3})
    );
    assert_eq!(out["keys"][0]["last_used_unix"], now - 60);
    assert_eq!(out["keys"][1]["allowed"], 1);
    assert_eq!(out["keys"][1]["last_used_unix"], now - 86_400);
    assert_eq!(out["keys"][2]["flag"], "never_used");
    assert_eq!(out["never_used"], serde_json::json!([never]));
    assert_eq!(out["removed"][0]["id"], "k_removed0001");
    assert_eq!(out["totals"]["allowed"], 11 + 8);
    assert_eq!(out["totals"]["denials"]["missing_api_key"], 4);
    let admins: Vec<&Value> = out["envoys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["admin"])
        .collect();
    assert_eq!(admins, [&Value::from(a.clone()), &Value::from(b.clone())]);

    let text = env.ok(&["usage"]);
    assert!(
        text.contains(&format!(
            "never used since the Envoys started (the last 5 min ago): {never}\n"
        )),
        "{text}"
    );
    assert!(
        text.ends_with(&format!(
            "counters of 2 Envoys, summed; last use the latest: {a} (up 2 h), {b} (up 5 min)\n"
        )),
        "{text}"
    );
    // --envoy-admin overrides the store's admins (each asked once).
    let out = env.json(&["usage", "--envoy-admin", &b, "--envoy-admin", &b]);
    assert_eq!(out["keys"][0]["allowed"], 5);
    assert_eq!(out["envoys"].as_array().unwrap().len(), 1);
}

#[test]
fn usage_reports_an_unreachable_admin_and_fails_only_when_none_answers() {
    let (env, [dotted, _, _]) = usage_env();
    let now = now();
    let up = prometheus_admin(page(&[(&dotted, 3, &[], Some(now - 5))], 60));
    let down = closed_admin();
    let not_envoy = fake_admin(&env, Admin::NotEnvoy);
    env.ok(&["set-admin", &up, &down]);
    let (text, stderr) = ok_with_stderr(&env, &["usage"]);
    assert_eq!(
        stderr,
        format!(
            "keygate: warning: Envoy admin {down} did not answer (connection refused); usage is from the other Envoy\n"
        )
    );
    assert!(
        text.contains(&format!("\ncounters of Envoy {up} (up 1 min)\n")),
        "{text}"
    );
    assert!(
        text.ends_with(&format!("\nnot answering: {down} (connection refused)\n")),
        "{text}"
    );
    let (out, _) = ok_with_stderr(&env, &["--json", "usage"]);
    let out = json(&out);
    assert_eq!(out["keys"][0]["allowed"], 3);
    assert_eq!(
        out["envoys"][1],
        serde_json::json!({
            "admin": down, "reachable": false, "uptime_seconds": null,
            "keygate_metrics": null, "error": "connection refused",
        })
    );

    // None answers: exit 1, one line naming each.
    let e = env.fail(&["usage", "--envoy-admin", &down], 1);
    assert_eq!(
        e,
        format!("keygate: no usage: the Envoy admin did not answer: {down} (connection refused)")
    );
    let e = env.fail(&["usage", "--envoy-admin", &down, &not_envoy], 1);
    assert!(
        e.starts_with(&format!(
            "keygate: no usage: no Envoy admin answered: {down} (connection refused), "
        )),
        "{e}"
    );
    assert!(
        e.contains(&format!("{not_envoy} (not Envoy's admin: HTTP status 404")),
        "{e}"
    );

    // No admin anywhere: say how to name one.
    env.ok(&["set-admin", "--clear"]);
    let e = env.fail(&["usage"], 1);
    assert!(
        e.contains("no Envoy admin to ask: give --envoy-admin"),
        "{e}"
    );
    let e = env.fail(&["usage", "--envoy-admin", "https://x:1"], 2);
    assert!(e.contains("plain HTTP"), "{e}");
}

#[test]
fn usage_without_per_key_series_says_why() {
    let (env, _) = usage_env();
    // Envoy with keygate, but no per-key series (per_key_metrics off).
    let admin = prometheus_admin(page(&[], 60));
    let (text, stderr) = ok_with_stderr(&env, &["usage", "--envoy-admin", &admin]);
    assert!(
        stderr.starts_with("keygate: note: Envoy's counters hold no per-key series: the policy's \"per_key_metrics\" is off"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1);
    assert!(text.contains("3 keys: 0 used, 3 never used"), "{text}");
    // An Envoy without keygate's stats_tags: flat names, and a warning that says so.
    let flat = prometheus_admin(
        "keygate_key_requests_total_outcome_allowed_reason_none_key_id_k_1{} 3\n".into(),
    );
    let (_, stderr) = ok_with_stderr(&env, &["usage", "--envoy-admin", &flat]);
    assert!(
        stderr.starts_with(&format!(
            "keygate: warning: Envoy at {flat} exports keygate's series without labels"
        )) && stderr.contains("stats_tags"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1);
    // Requests beyond the per-key cap: never used is not certain.
    let capped = prometheus_admin(page(&[], 60) + "keygate_key_metrics_dropped_total{} 7\n");
    let (text, _) = ok_with_stderr(&env, &["usage", "--envoy-admin", &capped]);
    assert!(
        text.contains("\n7 requests were of keys beyond the policy's per_key_metrics_max"),
        "{text}"
    );
    assert_eq!(env.json(&["usage", "--envoy-admin", &capped])["dropped"], 7);
    // Not keygate's Envoy at all.
    let bare = prometheus_admin("envoy_server_live{} 1\n".into());
    let (_, stderr) = ok_with_stderr(&env, &["usage", "--envoy-admin", &bare]);
    assert_eq!(
        stderr,
        format!("keygate: warning: Envoy at {bare} exports no keygate metrics: is the keygate filter loaded there?\n")
    );
}

#[test]
fn list_shows_last_used_when_the_store_names_admins() {
    let (env, [dotted, used, never]) = usage_env();
    // No admin: the table and JSON as before, last_used null.
    let (text, stderr) = ok_with_stderr(&env, &["list"]);
    assert_eq!(stderr, "");
    assert_eq!(
        columns(text.lines().next().unwrap()),
        [
            "ID", "NAME", "PREFIX", "ROLE", "PLAN", "STATUS", "CLIENT", "TENANT", "SCOPES",
            "CREATED", "EXPIRES"
        ]
    );
    let out = env.json(&["list"]);
    assert_eq!(out[0]["last_used"], Value::Null);

    let now = now();
    let a = prometheus_admin(page(&[(&dotted, 1, &[], Some(now - 400))], 60));
    let b = prometheus_admin(page(
        &[
            (&dotted, 1, &[], Some(now - 180)),
            (&used, 0, &[("rate_limited", 1)], None),
        ],
        60,
    ));
    env.ok(&["set-admin", &a, &b]);
    let (text, stderr) = ok_with_stderr(&env, &["list"]);
    assert_eq!(stderr, "");
    let lines: Vec<Vec<String>> = text.lines().map(columns).collect();
    assert_eq!(lines[0].last().unwrap(), "LAST USED");
    assert_eq!(lines[1].last().unwrap(), "3 min ago");
    // Counted but without a last-use time: used, when unknown.
    assert_eq!(lines[2].last().unwrap(), "?");
    assert_eq!(lines[3].last().unwrap(), "never");
    let out = env.json(&["list"]);
    assert_eq!(out[0]["id"], dotted.as_str());
    assert_eq!(unix(&out[0]["last_used"]), now - 180);
    assert_eq!(out[1]["last_used"], Value::Null);
    assert_eq!(out[2]["id"], never.as_str());
    assert_eq!(out[2]["last_used"], Value::Null);

    // One admin down: the other's answer, and one note.
    let down = closed_admin();
    env.ok(&["set-admin", &a, &down]);
    let (text, stderr) = ok_with_stderr(&env, &["list"]);
    assert_eq!(
        stderr,
        format!("keygate: note: LAST USED from 1 of 2 Envoys; not answering: {down} (connection refused)\n")
    );
    assert_eq!(
        columns(text.lines().nth(1).unwrap()).last().unwrap(),
        "6 min ago"
    );

    // Every admin down: "?" everywhere, one note, exit 0, and quickly.
    env.ok(&["set-admin", &down]);
    let started = Instant::now();
    let (text, stderr) = ok_with_stderr(&env, &["list"]);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        stderr,
        format!("keygate: note: LAST USED unknown: the Envoy admin did not answer: {down} (connection refused)\n")
    );
    for line in text.lines().skip(1) {
        assert_eq!(columns(line).last().unwrap(), "?", "{text}");
    }
    let (out, _) = ok_with_stderr(&env, &["--json", "list"]);
    assert!(json(&out)
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["last_used"].is_null()));

    // Envoy answers without per-key series, and the policy does not ask for them.
    let bare = prometheus_admin(page(&[], 60));
    env.ok(&["set-admin", &bare]);
    let (text, stderr) = ok_with_stderr(&env, &["list"]);
    assert!(
        stderr.contains("Envoy exports no per-key series"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1);
    assert_eq!(columns(text.lines().nth(1).unwrap()).last().unwrap(), "?");
}

#[test]
fn render_envoy_stats_tags_is_the_filters_own_list() {
    let env = Env::init();
    let out = json(&env.ok(&["render", "--format", "envoy-stats-tags"]));
    assert_eq!(
        out,
        serde_json::json!({"stats_config": {"stats_tags": keygate::metrics::stats_tags()}})
    );
    let tags: Vec<&str> = out["stats_config"]["stats_tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["tag_name"].as_str().unwrap())
        .collect();
    assert_eq!(
        tags,
        ["outcome", "reason", "status_class", "route", "key_id"]
    );
}

// ---------------------------------------------------------------- update, prune, audit

/// The policy of the tests below: routes that name roles and scopes, a small plan.
const ROUTED_POLICY: &str = r#"{
  "routes": [
    {"prefix": "/admin", "roles": ["admin"]},
    {"prefix": "/v1/jobs", "roles": ["client", "miner"], "scopes": ["jobs:write"]},
    {"prefix": "/v1", "roles": ["client", "miner", "admin"]}
  ],
  "plans": {"tiny": {"requests": 5, "per": "minute"}},
  "default_plan": "free",
  "key_format": {"prefix": "kg", "checksum": true}
}"#;

fn routed_env() -> Env {
    let env = Env::init();
    let policy = env.dir.path().join("policy.json");
    fs::write(&policy, ROUTED_POLICY).unwrap();
    env.ok(&["policy", "set", policy.to_str().unwrap()]);
    env
}

/// The audit log's lines, parsed.
fn audit_lines(env: &Env) -> Vec<Value> {
    let path = env.dir.path().join("keygate.json.audit.jsonl");
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(json)
        .collect()
}

fn audit_text(env: &Env) -> String {
    fs::read_to_string(env.dir.path().join("keygate.json.audit.jsonl")).unwrap_or_default()
}

/// Runs a command that must fail, and checks that it changed neither the store nor the
/// audit log; returns its stderr.
fn fails_changing_nothing(env: &Env, args: &[&str], code: i32) -> String {
    let (store, audit) = (env.store_text(), audit_text(env));
    let out = env.run(args, "");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(code), "keygate {args:?}: {stderr}");
    assert_eq!(
        env.store_text(),
        store,
        "keygate {args:?} changed the store"
    );
    assert_eq!(
        audit_text(env),
        audit,
        "keygate {args:?} wrote an audit line"
    );
    stderr.trim_end().to_string()
}

#[test]
fn update_changes_a_key_in_place_and_keeps_its_secret() {
    let env = routed_env();
    let (id, key) = env.create(&["--client", "acme", "--scope", "jobs:read"]);
    let hash = env.store_json()["keys"][0]["hash"].clone();
    let out = env.ok(&[
        "update",
        &id,
        "--remove-scope",
        "jobs:read",
        "--add-scope",
        "jobs:write",
        "--plan",
        "tiny",
        "--tenant",
        "t1",
        "--name",
        "renamed",
        "--allowed-ip",
        "10.0.0.0/8",
        "--expires-in",
        "30d",
    ]);
    let rev = env.store_json()["revision"].as_u64().unwrap();
    let mut lines = out.lines();
    assert_eq!(
        lines.next().unwrap(),
        format!("updated {id} (revision {rev}):")
    );
    let changed: Vec<&str> = lines.map(|l| l.split(':').next().unwrap().trim()).collect();
    assert_eq!(
        changed,
        [
            "allowed_ips",
            "expires_at",
            "name",
            "plan",
            "scopes",
            "tenant"
        ]
    );
    let k = env.accepted(&key);
    assert_eq!(k["scopes"], serde_json::json!(["jobs:write"]));
    assert_eq!((&k["plan"], &k["tenant"]), (&"tiny".into(), &"t1".into()));
    assert!((unix(&k["expires_at"]) - (now() + 30 * 86_400)).abs() <= 5);
    assert_eq!(
        env.store_json()["keys"][0]["hash"],
        hash,
        "the secret stays"
    );
    let shown = env.json(&["show", &id]);
    assert_eq!(shown["name"], "renamed");
    assert_eq!(shown["allowed_ips"], serde_json::json!(["10.0.0.0/8"]));

    // Clearing: expiry, tenant, own plan, addresses, scopes.
    let out = env.json(&[
        "update",
        &id,
        "--no-expiry",
        "--clear-tenant",
        "--default-plan",
        "--any-ip",
        "--clear-scopes",
    ]);
    assert_eq!(out["changed"], true);
    assert_eq!(out["revision"], rev + 1);
    assert_eq!(
        out["changes"]["scopes"],
        serde_json::json!({"old": ["jobs:write"], "new": []})
    );
    let k = env.accepted(&key);
    assert_eq!(
        (&k["expires_at"], &k["tenant"]),
        (&Value::Null, &Value::Null)
    );
    assert_eq!(k["plan"], "free");
    assert_eq!(
        env.json(&["show", &id])["allowed_ips"],
        serde_json::json!([])
    );

    // Asking for what already is changes nothing: same revision, no audit line.
    let lines = audit_lines(&env).len();
    let out = env.ok(&["update", &id, "--name", "renamed"]);
    assert_eq!(
        out.trim(),
        format!("{id}: nothing changed (it already is as asked)")
    );
    assert_eq!(env.store_json()["revision"], rev + 1);
    assert_eq!(audit_lines(&env).len(), lines);
}

#[test]
fn update_refuses_what_create_refuses_and_changes_nothing() {
    let env = routed_env();
    let (id, _) = env.create(&["--scope", "jobs:write"]);
    let e = fails_changing_nothing(&env, &["update", "k_nope", "--name", "x"], 1);
    assert_eq!(
        e,
        "keygate: no key with id \"k_nope\"; keygate list shows the ids"
    );
    let e = fails_changing_nothing(&env, &["update", &id, "--plan", "gold"], 1);
    assert_eq!(
        e,
        format!(
            "keygate: invalid configuration: keys[\"{id}\"].plan: unknown plan \"gold\"; known plans: \
             enterprise, free, pro, tiny"
        )
    );
    let e = fails_changing_nothing(&env, &["update", &id, "--remove-scope", "nope"], 1);
    assert_eq!(
        e,
        format!(
            "keygate: --remove-scope: key {id} has no scope \"nope\" (it has: jobs:write); \
             nothing was changed"
        )
    );
    let e = fails_changing_nothing(
        &env,
        &["update", &id, "--expires-at", "2020-01-01T00:00:00Z"],
        1,
    );
    assert_eq!(
        e,
        "keygate: the expiry 2020-01-01T00:00:00Z is not in the future"
    );
    let e = fails_changing_nothing(&env, &["update", &id, "--allowed-ip", "10.0.0.300/8"], 1);
    assert!(
        e.starts_with(&format!(
            "keygate: invalid configuration: keys[\"{id}\"].allowed_ips[0]:"
        )),
        "{e}"
    );
    let e = fails_changing_nothing(&env, &["update", &id, "--name", ""], 1);
    assert_eq!(
        e,
        "keygate: --name: \"\" must be 1 to 200 characters without control characters"
    );
    let e = fails_changing_nothing(&env, &["update", &id], 2);
    assert!(
        e.starts_with("keygate: the following required arguments were not provided:"),
        "{e}"
    );
    let e = fails_changing_nothing(&env, &["update", &id, "--plan", "pro", "--default-plan"], 2);
    assert!(e.contains("cannot be used with"), "{e}");
    env.ok(&["revoke", &id]);
    let e = fails_changing_nothing(&env, &["update", &id, "--name", "x"], 1);
    assert_eq!(
        e,
        format!(
            "keygate: key {id} is revoked, and revocation is permanent; nothing to update \
             (keygate prune removes it)"
        )
    );
}

#[test]
fn roles_and_scopes_no_route_uses_are_accepted_with_a_warning() {
    let env = routed_env();
    let (out, stderr) = ok_with_stderr(
        &env,
        &[
            "create",
            "--name",
            "n",
            "--role",
            "admn",
            "--scope",
            "jobs:wrte",
        ],
    );
    assert!(out.starts_with("created key "), "{out}");
    assert_eq!(
        stderr,
        "warning: role \"admn\" is not used by any route (routes use: admin, client, miner)\n\
         warning: scope \"jobs:wrte\" is not required by any route (routes require: jobs:write)\n"
    );
    let (_, stderr) = ok_with_stderr(&env, &["create", "--name", "n", "--role", "admin"]);
    assert_eq!(stderr, "");
    let (id, _) = env.create(&[]);
    let (_, stderr) = ok_with_stderr(&env, &["update", &id, "--add-scope", "jobs:writ"]);
    assert_eq!(
        stderr,
        "warning: scope \"jobs:writ\" is not required by any route (routes require: jobs:write)\n"
    );
    let (_, stderr) = ok_with_stderr(&env, &["update", &id, "--name", "other"]);
    assert_eq!(stderr, "", "only new roles and scopes are warned about");
    // A refused role is refused, not warned about first.
    let e = fails_changing_nothing(
        &env,
        &["create", "--name", "n", "--role", "client admin"],
        1,
    );
    assert!(!e.contains("warning:"), "{e}");
    assert!(e.starts_with("keygate: invalid configuration: "), "{e}");
    let e = fails_changing_nothing(&env, &["update", &id, "--role", "client admin"], 1);
    assert!(!e.contains("warning:"), "{e}");
}

#[test]
fn rotation_refuses_revoked_expired_and_rotated_keys_unless_forced() {
    let env = Env::init();
    let (id, _) = env.create(&[]);
    let next = str_of(&env.json(&["rotate", &id, "--grace", "1h"])["id"]);
    let e = fails_changing_nothing(&env, &["rotate", &id, "--grace", "1h"], 1);
    let created = str_of(&env.json(&["show", &next])["created_at"]);
    let until = str_of(&env.json(&["show", &id])["expires_at"]);
    assert_eq!(
        e,
        format!(
            "keygate: key {id} was already rotated: its successor {next} was created at \
             {created}, and {id} keeps working until {until} (its grace period); rotate {next} \
             instead, or rotate --force to issue another successor"
        )
    );
    let forced = env.json(&["rotate", &id, "--grace", "1h", "--force"]);
    assert_eq!(forced["rotated_from"], id.as_str());

    let (revoked, _) = env.create(&[]);
    env.ok(&["revoke", &revoked]);
    let e = fails_changing_nothing(&env, &["rotate", &revoked, "--grace", "1h"], 1);
    assert_eq!(
        e,
        format!(
            "keygate: key {revoked} is revoked; create a new key instead of rotating it (or \
             rotate --force to issue a successor anyway)"
        )
    );
    let out = env.json(&["rotate", &revoked, "--grace", "1h", "--force"]);
    assert_eq!(env.json(&["show", &revoked])["status"], "revoked");
    assert_eq!(
        out["old_expires_at"],
        Value::Null,
        "a forced rotation leaves it"
    );

    let (expired, _) = env.create(&[]);
    env.edit_store(|doc| {
        let keys = doc["keys"].as_array_mut().unwrap();
        let k = keys
            .iter_mut()
            .find(|k| k["id"] == expired.as_str())
            .unwrap();
        k["expires_at"] = "2020-01-01T00:00:00Z".into();
    });
    let e = fails_changing_nothing(&env, &["rotate", &expired, "--grace", "1h"], 1);
    assert_eq!(
        e,
        format!(
            "keygate: key {expired} expired at 2020-01-01T00:00:00Z; create a new key instead of \
             rotating it (or rotate --force to issue a successor anyway)"
        )
    );
}

#[test]
fn a_rotated_key_renders_sharing_the_oldest_budget_in_the_store() {
    let env = Env::init();
    let (k1, _) = env.create(&["--plan", "pro"]);
    let (other, _) = env.create(&[]);
    let k2 = str_of(&env.json(&["rotate", &k1, "--grace", "1s"])["id"]);
    std::thread::sleep(Duration::from_millis(1100));
    let k3 = str_of(&env.json(&["rotate", &k2, "--grace", "1h"])["id"]);
    let shares = |env: &Env| -> Vec<(String, Value)> {
        let plugin = json(&env.ok(&["render"]));
        plugin["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| (str_of(&k["id"]), k["shares_quota_with"].clone()))
            .collect()
    };
    assert_eq!(
        shares(&env),
        [
            (k1.clone(), Value::Null),
            (other.clone(), Value::Null),
            (k2.clone(), Value::from(k1.as_str())),
            (k3.clone(), Value::from(k1.as_str())),
        ]
    );
    let shown = env.json(&["show", &k3]);
    assert_eq!(shown["plan"], "pro");
    assert_eq!(
        (&shown["rotated_from"], &shown["shares_quota_with"]),
        (&Value::from(k2.as_str()), &Value::from(k1.as_str()))
    );
    let text = env.ok(&["show", &k3]);
    assert!(
        text.contains(&format!(
            "\nrotated_from: {k2}\nbudget:      shared with {k1}"
        )),
        "{text}"
    );
    assert!(env
        .ok(&["show", &other])
        .ends_with("budget:      its own\n"));
    // k1 expired a second after the first rotation; prune keeps it while k2 and k3 spend
    // its budget (prune_keeps_a_rotated_keys_chain_while_a_successor_spends_its_budget).
    env.ok(&["prune", "--older-than", "0s"]);
    assert_eq!(
        shares(&env),
        [
            (k1.clone(), Value::Null),
            (other, Value::Null),
            (k2.clone(), Value::from(k1.as_str())),
            (k3, Value::from(k1.as_str())),
        ]
    );
}

#[test]
fn prune_keeps_a_rotated_keys_chain_while_a_successor_spends_its_budget() {
    let env = Env::init();
    let (k1, _) = env.create(&[]);
    let rotated = env.json(&["rotate", &k1, "--grace", "0s"]);
    let k2 = str_of(&rotated["id"]);
    let rotated = env.json(&["rotate", &k2, "--grace", "0s"]);
    let k3 = str_of(&rotated["id"]);
    // k1 and k2 expired long ago; k3 is active and spends k1's budget.
    env.edit_store(|doc| {
        for k in doc["keys"].as_array_mut().unwrap() {
            if k["id"] == k1.as_str() || k["id"] == k2.as_str() {
                k["expires_at"] = "2026-01-01T00:00:00Z".into();
            }
        }
    });
    let dry = env.ok(&["prune", "--older-than", "7d", "--dry-run"]);
    assert_eq!(
        dry.trim(),
        format!(
            "would remove 0 keys (dry run; nothing was changed)\n\
             kept {k2} (expired): {k3}, rotated from it, still spends its rate-limit budget\n\
             kept {k1} (expired): {k2}, rotated from it, still spends its rate-limit budget"
        )
    );
    let out = env.json(&["prune", "--older-than", "7d"]);
    assert_eq!(out["removed"], serde_json::json!([]));
    assert_eq!(out["kept"][0]["id"], k2.as_str());
    assert_eq!(out["kept"][0]["successor"], k3.as_str());
    let rendered = env.json(&["render"]);
    let shares = rendered["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == k3.as_str())
        .map(|k| k["shares_quota_with"].clone());
    assert_eq!(shares, Some(k1.as_str().into()));
    // Once the successor is revoked and old too, the whole chain goes.
    env.ok(&["revoke", &k3]);
    env.edit_store(|doc| {
        for k in doc["keys"].as_array_mut().unwrap() {
            if k["id"] == k3.as_str() {
                k["revoked_at"] = "2026-01-01T00:00:00Z".into();
            }
        }
    });
    let out = env.json(&["prune", "--older-than", "7d"]);
    assert_eq!(out["removed"].as_array().unwrap().len(), 3, "{out}");
    assert_eq!(out["kept"], serde_json::json!([]));
}

#[test]
fn prune_lists_then_removes_old_revoked_and_expired_keys() {
    let env = Env::init();
    let (active, _) = env.create(&[]);
    let (revoked, _) = env.create(&[]);
    env.ok(&["revoke", &revoked]);
    let (recent, _) = env.create(&[]);
    let (expired, _) = env.create(&[]);
    env.edit_store(|doc| {
        for k in doc["keys"].as_array_mut().unwrap() {
            if k["id"] == revoked.as_str() {
                k["revoked_at"] = "2026-01-01T00:00:00Z".into();
            }
            if k["id"] == expired.as_str() {
                k["expires_at"] = "2026-02-01T00:00:00Z".into();
            }
        }
    });
    env.ok(&["revoke", &recent]);
    let before = env.store_text();
    let lines = audit_lines(&env).len();
    let dry = env.ok(&["prune", "--older-than", "7d", "--dry-run"]);
    assert_eq!(
        dry.trim(),
        format!(
            "would remove 2 keys (dry run; nothing was changed)\n  {revoked} \"test\": revoked at \
             2026-01-01T00:00:00Z\n  {expired} \"test\": expired at 2026-02-01T00:00:00Z"
        )
    );
    assert_eq!(env.store_text(), before);
    assert_eq!(audit_lines(&env).len(), lines);
    let out = env.json(&["prune", "--older-than", "7d"]);
    let removed: Vec<String> = out["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| str_of(&k["id"]))
        .collect();
    assert_eq!(removed, [revoked.clone(), expired.clone()]);
    let ids: Vec<String> = env
        .json(&["list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|k| str_of(&k["id"]))
        .collect();
    assert_eq!(ids, [active, recent]);
    let audit = audit_lines(&env);
    let pruned: Vec<&Value> = audit.iter().filter(|l| l["action"] == "prune").collect();
    assert_eq!(pruned.len(), 2);
    assert_eq!(pruned[0]["key"], revoked.as_str());
    assert_eq!(
        pruned[0]["changes"]["status"],
        serde_json::json!({"old": "revoked", "new": null})
    );
    assert_eq!(
        env.ok(&["prune", "--older-than", "7d"]).trim(),
        "removed 0 keys"
    );
    let e = fails_changing_nothing(&env, &["prune", "--older-than", "7x"], 2);
    assert!(e.contains("\"7x\" is not a duration such as 90d"), "{e}");
    fails_changing_nothing(&env, &["prune"], 2);
}

#[test]
fn list_shows_client_tenant_scopes_and_created_and_filters() {
    let env = Env::init();
    let (a, _) = env.create(&[
        "--client", "acme", "--tenant", "t1", "--scope", "x", "--scope", "y",
    ]);
    let b = str_of(&env.json(&["create", "--name", "m", "--role", "miner", "--plan", "pro"])["id"]);
    let (c, _) = env.create(&["--client", "acme"]);
    env.ok(&["suspend", &c]);
    let text = env.ok(&["list"]);
    let row: Vec<&str> = text.lines().nth(1).unwrap().split_whitespace().collect();
    let created = str_of(&env.json(&["show", &a])["created_at"]);
    assert_eq!(
        row,
        [
            a.as_str(),
            "test",
            row[2],
            "client",
            "free",
            "active",
            "acme",
            "t1",
            "x,y",
            &created,
            "never"
        ]
    );
    let listed = env.json(&["list"]);
    assert_eq!(listed[0]["client"], "acme");
    assert_eq!(listed[0]["tenant"], "t1");
    assert_eq!(listed[0]["scopes"], serde_json::json!(["x", "y"]));
    assert_eq!(listed[0]["created_at"], created.as_str());
    let ids = |args: &[&str]| -> Vec<String> {
        env.json(&[&["list"], args].concat())
            .as_array()
            .unwrap()
            .iter()
            .map(|k| str_of(&k["id"]))
            .collect()
    };
    assert_eq!(ids(&["--role", "miner"]), [b.as_str()]);
    assert_eq!(ids(&["--plan", "free"]), [a.clone(), c.clone()]);
    assert_eq!(ids(&["--plan", "pro"]), [b.as_str()]);
    assert_eq!(ids(&["--client", "acme"]), [a.clone(), c.clone()]);
    assert_eq!(ids(&["--status", "suspended"]), [c.as_str()]);
    assert_eq!(ids(&["--client", "acme", "--status", "active"]), [a]);
    assert!(ids(&["--role", "nobody"]).is_empty());
    assert_eq!(
        env.ok(&["list", "--role", "nobody"]).trim(),
        format!("no keys match in {}", env.store.display())
    );
    let e = env.fail(&["list", "--status", "gone"], 2);
    assert!(e.contains("invalid value 'gone' for '--status"), "{e}");
}

#[test]
fn verify_says_why_a_key_is_refused_and_what_a_request_would_get() {
    let env = routed_env();
    let (id, key) = env.create(&[
        "--client",
        "acme",
        "--tenant",
        "t1",
        "--scope",
        "jobs:write",
    ]);
    // Bad checksum: the last character changed.
    let mut typo = key.clone();
    let last = typo.pop().unwrap();
    typo.push(if last == 'A' { 'B' } else { 'A' });
    let (code, out) = env.verify(&typo);
    assert_eq!(
        (code, &out["cause"]),
        (Some(1), &"bad_checksum".into()),
        "{out}"
    );
    let text = String::from_utf8(env.run(&["verify"], &typo).stdout).unwrap();
    assert_eq!(
        text.trim(),
        format!(
            "refused: invalid_api_key (Invalid API key): {}...: bad checksum: it has the \"kg\" \
             prefix but its checksum does not hold (mistyped or cut short?)",
            &key[..8]
        )
    );
    assert_eq!(env.verify("short").1["cause"], "malformed");
    // A well-formed key in no store: unknown.
    let other = Env::init();
    other.create(&[]);
    let (_, out) = other.verify(&key);
    assert_eq!(out["cause"], "unknown");
    env.ok(&["suspend", &id]);
    assert_eq!(env.verify(&key).1["cause"], "suspended");
    env.ok(&["reactivate", &id]);

    let request = |method: &str, path: &str| {
        let out = env.run(
            &["--json", "verify", "--method", method, "--path", path],
            &format!("{key}\n"),
        );
        (
            out.status.code(),
            json(&String::from_utf8(out.stdout).unwrap()),
        )
    };
    let (code, out) = request("POST", "/v1/jobs/1");
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out["request"]["status"], 200);
    assert_eq!(
        out["request"]["headers"],
        serde_json::json!({
            "x-keygate-key-id": id, "x-keygate-role": "client", "x-keygate-client": "acme",
            "x-keygate-scopes": "jobs:write", "x-keygate-plan": "free", "x-tenant-id": "t1",
        })
    );
    let (code, out) = request("GET", "/admin/users");
    assert_eq!(code, Some(1));
    assert_eq!(out["request"]["status"], 403);
    assert_eq!(out["request"]["error"], "insufficient_permissions");
    assert_eq!(out["request"]["requirement"], "role");
    let text = env.run(
        &["verify", "--method", "GET", "--path", "/admin/users"],
        &format!("{key}\n"),
    );
    let text = String::from_utf8(text.stdout).unwrap();
    assert_eq!(
        text.lines().nth(1).unwrap(),
        "GET /admin/users: 403 insufficient_permissions (API key lacks permission for this route): role"
    );
    // Once the scope is removed, the same request is refused for it.
    env.ok(&["update", &id, "--clear-scopes"]);
    let (_, out) = request("POST", "/v1/jobs/1");
    assert_eq!(
        (&out["request"]["status"], &out["request"]["requirement"]),
        (&403.into(), &"scope".into())
    );
    // A revoked key: the request gets the 401.
    env.ok(&["revoke", &id]);
    let (code, out) = request("GET", "/v1/x");
    assert_eq!(code, Some(1));
    assert_eq!(out["cause"], "revoked");
    assert_eq!(out["request"]["status"], 401);
    assert_eq!(out["request"]["error"], "key_revoked");
    let e = env.fail_in(&["verify", "--method", "GET"], &key, 2);
    assert!(e.contains("--path"), "{e}");
}

#[test]
fn policy_check_prints_every_problem_and_set_changes_nothing() {
    let env = Env::init();
    let (id, _) = env.create(&["--plan", "pro"]);
    let file = env.dir.path().join("bad.json");
    fs::write(
        &file,
        r#"{"plans": {"tiny": {"requests": 5, "per": "minute"}}, "default_plan": "silver",
            "routes": [{"prefix": "/a"}, {"prefix": "/a"}]}"#,
    )
    .unwrap();
    let good = env.dir.path().join("good.json");
    fs::write(&good, r#"{"default_plan": "free"}"#).unwrap();
    env.ok(&["update", &id, "--plan", "free"]);
    env.edit_store(|doc| doc["keys"][0]["plan"] = "gold".into());
    let f = file.display().to_string();
    for action in ["check", "set"] {
        let e = fails_changing_nothing(&env, &["policy", action, &f], 1);
        assert_eq!(
            e,
            format!(
                "keygate: {f}: routes[1].prefix: \"/a\" is never reached: routes[0] (\"/a\") matches every such path first; put the longer prefix first\n\
                 keygate: {f}: default_plan: unknown plan \"silver\"; known plans: enterprise, free, pro, tiny\n\
                 keygate: {f}: keys[\"{id}\"].plan: unknown plan \"gold\"; known plans: enterprise, free, pro, tiny\n\
                 keygate: {f}: 3 problems; nothing was changed"
            )
        );
    }
    env.edit_store(|doc| doc["keys"][0]["plan"] = "free".into());
    // A policy whose routes do not use a key's role: accepted, with a warning per key.
    fs::write(
        &good,
        r#"{"default_plan": "free", "routes": [{"prefix": "/", "roles": ["admin"]}]}"#,
    )
    .unwrap();
    let (_, stderr) = ok_with_stderr(&env, &["policy", "check", good.to_str().unwrap()]);
    assert_eq!(
        stderr,
        format!(
            "warning: role \"client\" is not used by any route (routes use: admin) (key {id})\n"
        )
    );
    let out = env.json(&["policy", "set", good.to_str().unwrap()]);
    assert_eq!(out["changed"], true);
    let last = audit_lines(&env).pop().unwrap();
    assert_eq!(last["action"], "policy-set");
    assert_eq!(last["key"], Value::Null);
    assert_eq!(
        last["changes"]["policy.routes"]["new"],
        serde_json::json!([{"prefix": "/", "roles": ["admin"]}])
    );
}

#[test]
fn the_audit_log_has_one_line_per_change_and_no_key_material() {
    let env = Env::new();
    env.ok(&[
        "init",
        "--ecds",
        "ecds/keygate.yaml",
        "--wasm",
        "/opt/keygate.wasm",
        "--actor",
        "alice",
    ]);
    let mut keys: Vec<String> = Vec::new();
    let (a, key_a) = env.create(&["--client", "acme", "--scope", "s1"]);
    keys.push(key_a);
    env.ok(&[
        "--actor",
        "bob",
        "update",
        &a,
        "--add-scope",
        "s2",
        "--plan",
        "pro",
    ]);
    env.ok(&["suspend", &a]);
    env.ok(&["reactivate", &a]);
    let rotated = env.json(&["rotate", &a, "--grace", "1h"]);
    let b = str_of(&rotated["id"]);
    keys.push(str_of(&rotated["key"]));
    let imported = "legacy_key_0000000000001\nlegacy_key_0000000000002\n";
    env.ok_in(&["import", "--role", "client"], imported);
    keys.extend(imported.lines().map(String::from));
    env.ok(&["revoke", &b]);
    env.ok(&["apply"]);
    env.ok(&["prune", "--older-than", "0s"]);

    let lines = audit_lines(&env);
    let summary: Vec<(String, String, Option<String>)> = lines
        .iter()
        .map(|l| {
            (
                str_of(&l["actor"]),
                str_of(&l["action"]),
                l["key"].as_str().map(String::from),
            )
        })
        .collect();
    let me = summary[1].0.clone();
    assert!(!me.is_empty() && me != "bob");
    let imported_ids: Vec<String> = env
        .json(&["list"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["name"].as_str().unwrap().starts_with("legacy-"))
        .map(|k| str_of(&k["id"]))
        .collect();
    let s = |v: &str| v.to_string();
    assert_eq!(
        summary,
        [
            (s("alice"), s("init"), None),
            (me.clone(), s("create"), Some(a.clone())),
            (s("bob"), s("update"), Some(a.clone())),
            (me.clone(), s("suspend"), Some(a.clone())),
            (me.clone(), s("reactivate"), Some(a.clone())),
            (me.clone(), s("rotate"), Some(a.clone())),
            (me.clone(), s("rotate"), Some(b.clone())),
            (me.clone(), s("import"), Some(imported_ids[0].clone())),
            (me.clone(), s("import"), Some(imported_ids[1].clone())),
            (me.clone(), s("revoke"), Some(b.clone())),
            (me.clone(), s("apply"), None),
            (me.clone(), s("prune"), Some(b.clone())),
        ]
    );
    // The fields: time, revision, old and new values.
    for l in &lines {
        assert!(keygate::time::parse_rfc3339(l["time"].as_str().unwrap()).is_ok());
        assert!(l["revision"].as_u64().is_some());
    }
    let update = &lines[2];
    assert_eq!(
        update["changes"],
        serde_json::json!({
            "plan": {"old": null, "new": "pro"},
            "scopes": {"old": ["s1"], "new": ["s1", "s2"]},
        })
    );
    assert_eq!(
        update["revision"],
        lines[1]["revision"].as_u64().unwrap() + 1
    );
    let create = &lines[1]["changes"];
    assert_eq!(
        create["client"],
        serde_json::json!({"old": null, "new": "acme"})
    );
    assert_eq!(create["role"]["new"], "client");
    assert!(create.get("hash").is_none() && create.get("prefix").is_none());
    assert_eq!(
        lines[3]["changes"],
        serde_json::json!({"status": {"old": "active", "new": "suspended"}})
    );
    assert_eq!(lines[5]["changes"]["expires_at"]["old"], Value::Null);
    assert_eq!(lines[6]["changes"]["rotated_from"]["new"], a.as_str());
    let apply = &lines[10]["apply"];
    assert_eq!(apply["confirmed"], false);
    assert_eq!(
        apply["version"],
        str_of(&json(&fs::read_to_string(env.ecds_path()).unwrap())["version_info"]).as_str()
    );
    // No key material, nor any hash.
    let text = audit_text(&env);
    for key in &keys {
        assert!(!text.contains(key.as_str()), "the audit log holds a key");
        assert!(
            !text.contains(&key[..12]),
            "the audit log holds a key's start"
        );
        let hash = keys::hash_string(key.as_bytes());
        assert!(!text.contains(&hash[7..23]), "the audit log holds a hash");
    }
    assert!(!text.contains("sha256:") || !text.contains("\"hash\""));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(env.dir.path().join("keygate.json.audit.jsonl"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // keygate audit reads it back, filtered.
    let read = env.json(&["audit"]);
    assert_eq!(read.as_array().unwrap().len(), lines.len());
    let about_a = env.json(&["audit", "--key", &a]);
    assert_eq!(about_a.as_array().unwrap().len(), 5);
    assert_eq!(
        env.json(&["audit", "--action", "update"])[0]["actor"],
        "bob"
    );
    assert_eq!(
        env.json(&["audit", "--since", "1h"])
            .as_array()
            .unwrap()
            .len(),
        lines.len()
    );
    assert!(env
        .json(&["audit", "--since", "2099-01-01T00:00:00Z"])
        .as_array()
        .unwrap()
        .is_empty());
    let table = env.ok(&["audit", "--key", &a, "--action", "update"]);
    let mut rows = table.lines();
    assert_eq!(
        rows.next().unwrap().split_whitespace().collect::<Vec<_>>(),
        ["TIME", "ACTOR", "ACTION", "REV", "KEY", "CHANGES"]
    );
    assert_eq!(
        columns(rows.next().unwrap()),
        [
            str_of(&update["time"]),
            s("bob"),
            s("update"),
            format!("r{}", update["revision"]),
            a.clone(),
            s("plan: - -> pro; scopes: s1 -> s1,s2"),
        ],
        "{table}"
    );
    let e = env.fail(&["audit", "--since", "yesterday"], 1);
    assert_eq!(
        e,
        "keygate: --since: \"yesterday\" is neither a duration such as 24h or 7d nor an RFC 3339 instant"
    );
    // A failed command writes no line; a bad --actor is refused before anything.
    let n = audit_lines(&env).len();
    fails_changing_nothing(&env, &["update", "k_nope", "--name", "x"], 1);
    let e = fails_changing_nothing(
        &env,
        &["--actor", "", "create", "--name", "n", "--role", "r"],
        1,
    );
    assert_eq!(
        e,
        "keygate: --actor: \"\" must be 1 to 200 characters without control characters"
    );
    assert_eq!(audit_lines(&env).len(), n);
    // A line that is not an audit line is reported with its number.
    let path = env.dir.path().join("keygate.json.audit.jsonl");
    let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
    writeln!(f, "not json").unwrap();
    let e = env.fail(&["audit"], 1);
    assert!(
        e.starts_with(&format!(
            "keygate: {} line {}: not an audit line:",
            path.display(),
            n + 1
        )),
        "{e}"
    );
}

#[test]
fn a_version_1_store_is_upgraded_with_a_backup_and_a_newer_one_refused() {
    let env = Env::init();
    let (id, key) = env.create(&[]);
    env.edit_store(|doc| {
        doc["version"] = 1.into();
        doc.as_object_mut().unwrap().remove("revision");
    });
    let v1 = env.store_text();
    // Read as it is: nothing written.
    env.accepted(&key);
    env.ok(&["list"]);
    assert_eq!(env.store_text(), v1);
    // Fields a version 1 store cannot have are refused.
    env.edit_store(|doc| doc["revision"] = 3.into());
    let e = env.fail(&["list"], 1);
    assert_eq!(
        e,
        format!(
            "keygate: invalid store {}: revision: unknown field in a version 1 store",
            env.store.display()
        )
    );
    fs::write(&env.store, &v1).unwrap();
    // The first write upgrades, keeping the old file.
    let out = env.run(&["suspend", &id], "");
    assert!(out.status.success());
    let backup = env.dir.path().join("keygate.json.v1.bak");
    assert_eq!(
        String::from_utf8(out.stderr).unwrap(),
        format!(
            "keygate: note: upgraded the store from format version 1 to 2; the version 1 file is kept as {}\n",
            backup.display()
        )
    );
    assert_eq!(fs::read_to_string(&backup).unwrap(), v1);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(&backup).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let doc = env.store_json();
    assert_eq!((&doc["version"], &doc["revision"]), (&2.into(), &1.into()));
    let upgrade = audit_lines(&env).pop().unwrap();
    assert_eq!(
        upgrade["changes"]["version"],
        serde_json::json!({"old": 1, "new": 2})
    );
    // A newer store is refused, naming both versions, and left as it is.
    env.edit_store(|doc| {
        doc["version"] = 3.into();
        doc["future"] = true.into();
    });
    let newer = env.store_text();
    for args in [
        &["list"][..],
        &["suspend", &id],
        &["update", &id, "--name", "x"],
    ] {
        let e = env.fail(args, 1);
        assert_eq!(
            e,
            format!(
                "keygate: {} is a version 3 store, and this keygate reads versions up to 2; \
                 upgrade keygate to use it (nothing was changed)",
                env.store.display()
            )
        );
    }
    assert_eq!(env.store_text(), newer);
}

#[test]
fn update_sets_and_clears_every_field_and_a_rejected_apply_changes_nothing() {
    let env = Env::init();
    let (id, key) = env.create(&["--client", "acme", "--description", "first"]);
    env.ok(&[
        "update",
        &id,
        "--scope",
        "a",
        "--scope",
        "b",
        "--tenant",
        "t9",
        "--clear-client",
        "--description",
        "second",
        "--expires-at",
        "2099-01-01T00:00:00Z",
        "--role",
        "miner",
    ]);
    let shown = env.json(&["show", &id]);
    assert_eq!(shown["scopes"], serde_json::json!(["a", "b"]));
    assert_eq!(
        (&shown["tenant"], &shown["client"], &shown["description"]),
        (&"t9".into(), &Value::Null, &"second".into())
    );
    assert_eq!(shown["expires_at"], "2099-01-01T00:00:00Z");
    assert_eq!(env.accepted(&key)["role"], "miner");
    env.ok(&["update", &id, "--clear-description", "--client", "globex"]);
    let shown = env.json(&["show", &id]);
    assert_eq!(
        (&shown["description"], &shown["client"]),
        (&Value::Null, &"globex".into())
    );
    // The client address decides for a key bound to addresses.
    env.ok(&["update", &id, "--allowed-ip", "10.1.0.0/16"]);
    let answer = |ip: &str| {
        let out = env.run(
            &[
                "--json",
                "verify",
                "--method",
                "GET",
                "--path",
                "/x",
                "--client-ip",
                ip,
            ],
            &format!("{key}\n"),
        );
        json(&String::from_utf8(out.stdout).unwrap())["request"].clone()
    };
    assert_eq!(answer("10.1.2.3")["status"], 200);
    let refused = answer("192.0.2.1");
    assert_eq!(
        (&refused["status"], &refused["error"]),
        (&403.into(), &"ip_not_allowed".into())
    );

    // An Envoy that rejects the change: the store, the ECDS file and the audit log stay.
    env.ok(&["apply"]);
    let admin = fake_admin(&env, Admin::Rejects);
    env.ok(&["set-admin", &admin]);
    let ecds = env.ecds_bytes();
    let e = fails_changing_nothing(&env, &["update", &id, "--add-scope", "c", "--apply"], 1);
    assert!(
        e.contains("rejected version sha256:") && e.contains("nothing was changed"),
        "{e}"
    );
    assert_eq!(env.ecds_bytes(), ecds);
}

#[test]
fn an_upgrade_whose_apply_envoy_rejects_leaves_the_version_1_store_and_no_backup() {
    let env = Env::init();
    let (id, _) = env.create(&["--apply"]);
    let admin = fake_admin(&env, Admin::Rejects);
    env.ok(&["set-admin", &admin]);
    env.edit_store(|doc| {
        doc["version"] = 1.into();
        doc.as_object_mut().unwrap().remove("revision");
    });
    let e = fails_changing_nothing(&env, &["suspend", &id, "--apply"], 1);
    assert!(e.contains("rejected version"), "{e}");
    assert!(!env.dir.path().join("keygate.json.v1.bak").exists());
    assert_eq!(env.store_json()["version"], 1);
}

#[test]
fn a_store_in_a_missing_directory_is_refused_naming_the_directory() {
    let mut env = Env::new();
    env.store = env.dir.path().join("nowhere").join("keygate.json");
    let e = env.fail(&["init"], 1);
    assert_eq!(
        e.trim_end(),
        format!(
            "keygate: the store's directory {} does not exist; create it first (keygate does not make directories)",
            env.dir.path().join("nowhere").display()
        )
    );
    assert!(!env.dir.path().join("nowhere").exists());
}

#[test]
fn a_forced_rotation_of_an_expired_key_does_not_say_it_keeps_working() {
    let env = Env::init();
    let (id, _) = env.create(&[]);
    env.edit_store(|doc| doc["keys"][0]["expires_at"] = "2026-01-01T00:00:00Z".into());
    let out = env.ok(&["rotate", &id, "--grace", "1h", "--force"]);
    let first = out.lines().next().unwrap();
    assert!(
        first.ends_with(&format!(
            "; {id} stays expired (it stopped working); the two share one rate-limit budget"
        )),
        "{first}"
    );
}
