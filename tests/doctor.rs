//! `keygate::doctor` on the shipped Envoy configurations and on variants of them, each
//! with one setting back at Envoy's default (or made wrong): every variant must be
//! reported unsafe under exactly the check that setting belongs to.

use keygate::doctor::{doctor, Report, Severity};
use std::fs;
use std::path::{Path, PathBuf};

const SHIPPED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/envoy/envoy.yaml");
const SHIPPED_DOCKER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/envoy/docker/envoy.yaml");
const BUILT_WASM: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/target/wasm32-wasip1/release/keygate.wasm"
);
/// The ECDS directory each shipped file names, replaced by a temp dir in the copies.
const ECDS_DIR: &str = "envoy/ecds";
const DOCKER_ECDS_DIR: &str = "/etc/keygate/ecds";

/// The smallest module the doctor accepts: one function, exported as the proxy-wasm
/// allocator. Used when `make build` has not produced the real one.
fn minimal_module() -> Vec<u8> {
    let name = b"proxy_on_memory_allocate";
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    m.extend_from_slice(&[1, 6, 1, 0x60, 1, 0x7f, 1, 0x7f]); // type: (i32) -> i32
    m.extend_from_slice(&[3, 2, 1, 0]); // one function of that type
    m.extend_from_slice(&[7, 28, 1, name.len() as u8]);
    m.extend_from_slice(name);
    m.extend_from_slice(&[0, 0]); // a function, index 0
    m.extend_from_slice(&[10, 6, 1, 4, 0, 0x20, 0, 0x0b]); // local.get 0; end
    m
}

/// A temp dir holding a copy of a bootstrap whose ECDS file exists, with a module.
struct Setup {
    dir: tempfile::TempDir,
    bootstrap: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("ecds")).unwrap();
        let bootstrap = dir.path().join("envoy.yaml");
        Setup { dir, bootstrap }
    }

    /// The built keygate.wasm when there is one, else a minimal module in the temp dir.
    fn wasm(&self) -> PathBuf {
        if Path::new(BUILT_WASM).is_file() {
            return PathBuf::from(BUILT_WASM);
        }
        let path = self.dir.path().join("keygate.wasm");
        fs::write(&path, minimal_module()).unwrap();
        path
    }

    fn ecds_dir(&self) -> String {
        self.dir.path().join("ecds").display().to_string()
    }

    /// A copy of `shipped` reading its ECDS file from the temp dir, and that file, as
    /// `keygate apply` writes it (JSON), with `plugin_extra` merged into the plugin config.
    fn shipped(shipped: &str, ecds_dir: &str, plugin_extra: serde_json::Value) -> Setup {
        let setup = Setup::new();
        let text = fs::read_to_string(shipped).unwrap();
        assert!(
            text.contains(ecds_dir),
            "{shipped} no longer names {ecds_dir}"
        );
        setup.write_bootstrap(&text.replace(ecds_dir, &setup.ecds_dir()));
        let wasm = setup.wasm();
        setup.write_ecds(&wasm, "keygate", plugin_extra);
        setup
    }

    fn write_bootstrap(&self, text: &str) {
        fs::write(&self.bootstrap, text).unwrap();
    }

    fn write_ecds(&self, wasm: &Path, vm_id: &str, plugin_extra: serde_json::Value) {
        let mut plugin = serde_json::json!({
            "name": "keygate",
            "root_id": "keygate",
            "fail_open": false,
            "vm_config": {
                "vm_id": vm_id,
                "runtime": "envoy.wasm.runtime.v8",
                "code": {"local": {"filename": wasm.display().to_string()}},
            },
            "configuration": {
                "@type": "type.googleapis.com/google.protobuf.StringValue",
                "value": "{\"keys\": []}",
            },
        });
        if let serde_json::Value::Object(extra) = plugin_extra {
            for (k, v) in extra {
                plugin[k] = v;
            }
        }
        let doc = serde_json::json!({"resources": [{
            "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
            "name": "keygate",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": plugin,
            },
        }]});
        let path = self.dir.path().join("ecds/keygate.yaml");
        fs::write(path, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    }

    /// Rewrites the bootstrap copy.
    fn edit(&self, f: impl FnOnce(String) -> String) {
        let text = fs::read_to_string(&self.bootstrap).unwrap();
        let edited = f(text.clone());
        assert_ne!(edited, text, "the edit changed nothing");
        self.write_bootstrap(&edited);
    }

    fn report(&self) -> Report {
        doctor(&self.bootstrap).unwrap()
    }
}

fn checks(report: &Report, severity: Severity) -> Vec<&'static str> {
    report
        .findings
        .iter()
        .filter(|f| f.severity == severity)
        .map(|f| f.check)
        .collect()
}

fn unsafe_checks(report: &Report) -> Vec<&'static str> {
    checks(report, Severity::Unsafe)
}

/// Drops every line containing one of `needles` (each must match at least one line).
fn without_lines(text: &str, needles: &[&str]) -> String {
    for needle in needles {
        assert!(text.contains(needle), "no line with {needle:?}");
    }
    text.lines()
        .filter(|line| !needles.iter().any(|n| line.contains(n)))
        .map(|line| format!("{line}\n"))
        .collect()
}

fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "{from:?} is not there once");
    text.replace(from, to)
}

const EVERY_CHECK: [&str; 14] = [
    "keygate_filter",
    "filter_order",
    "use_remote_address",
    "skip_xff_append",
    "normalize_path",
    "merge_slashes",
    "path_with_escaped_slashes_action",
    "headers_with_underscores_action",
    "ecds_file",
    "fail_open",
    "wasm_module",
    "runtime",
    "vm_id",
    "node",
];

#[test]
fn shipped_file_is_safe_with_its_ecds_file() {
    let setup = Setup::shipped(SHIPPED, ECDS_DIR, serde_json::json!({}));
    let report = setup.report();
    assert!(report.is_safe(), "{}", report.render_text());
    assert_eq!(checks(&report, Severity::Warning), Vec::<&str>::new());
    let ok = checks(&report, Severity::Ok);
    for check in EVERY_CHECK.iter().chain(&["admin_address"]) {
        assert!(
            ok.contains(check),
            "no Ok {check}:\n{}",
            report.render_text()
        );
    }
    let text = report.render_text();
    assert!(
        text.trim_end().ends_with(": keygate's requirements hold"),
        "{text}"
    );
    assert!(text.contains(
        "OK      use_remote_address  listeners[0] (name: edge) http_connection_manager: "
    ));
    let json = report.to_json();
    assert_eq!(json["safe"], true);
    assert_eq!(json["unsafe"], 0);
}

#[test]
fn shipped_file_as_it_is() {
    // Relative paths are read from the current directory, the repository root here, as
    // for `envoy -c envoy/envoy.yaml` started there.
    let report = doctor(Path::new(SHIPPED)).unwrap();
    let ecds_exists = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("envoy/ecds/keygate.yaml")
        .exists();
    let unsafe_found: Vec<_> = unsafe_checks(&report)
        .into_iter()
        // A local ECDS file names whatever .wasm its store does; whether that exists is
        // not this file's business.
        .filter(|c| !(ecds_exists && *c == "wasm_module"))
        .collect();
    assert_eq!(unsafe_found, Vec::<&str>::new(), "{}", report.render_text());
    if !ecds_exists {
        let finding = report
            .findings
            .iter()
            .find(|f| f.check == "ecds_file")
            .unwrap();
        assert_eq!(finding.severity, Severity::Warning);
        assert!(
            finding.message.contains("keygate apply"),
            "{}",
            finding.message
        );
    }
}

#[test]
fn shipped_docker_file_is_safe() {
    // As it is: the container's ECDS path does not exist here, and the admin interface
    // listens on every address inside the container (published on loopback only).
    let report = doctor(Path::new(SHIPPED_DOCKER)).unwrap();
    assert!(report.is_safe(), "{}", report.render_text());
    let warnings = checks(&report, Severity::Warning);
    assert!(warnings.contains(&"admin_address"), "{warnings:?}");
    if !Path::new(DOCKER_ECDS_DIR).join("keygate.yaml").exists() {
        assert!(warnings.contains(&"ecds_file"), "{warnings:?}");
        let ecds = report
            .findings
            .iter()
            .find(|f| f.check == "ecds_file")
            .unwrap();
        assert!(ecds.message.contains("container"), "{}", ecds.message);
    }

    // With its ECDS file on this host, everything is checked.
    let setup = Setup::shipped(SHIPPED_DOCKER, DOCKER_ECDS_DIR, serde_json::json!({}));
    let report = setup.report();
    assert!(report.is_safe(), "{}", report.render_text());
    assert_eq!(checks(&report, Severity::Warning), vec!["admin_address"]);
    let ok = checks(&report, Severity::Ok);
    for check in EVERY_CHECK {
        assert!(
            ok.contains(&check),
            "no Ok {check}:\n{}",
            report.render_text()
        );
    }
    assert!(report
        .render_text()
        .trim_end()
        .ends_with(": keygate's requirements hold (1 warning)"));
}

/// Each setting keygate needs, deleted from the shipped file (Envoy's default then
/// applies) or given the value that is wrong, and the one check that must object.
#[test]
fn each_setting_at_envoys_default_is_unsafe() {
    type Edit = fn(&str) -> String;
    let variants: [(&str, Edit); 13] = [
        ("use_remote_address", |t| {
            without_lines(t, &["use_remote_address: true"])
        }),
        ("use_remote_address", |t| {
            t.replace("use_remote_address: true", "use_remote_address: false")
        }),
        ("skip_xff_append", |t| {
            without_lines(t, &["skip_xff_append: true"])
        }),
        ("normalize_path", |t| {
            without_lines(t, &["normalize_path: true"])
        }),
        ("normalize_path", |t| {
            t.replace("normalize_path: true", "normalize_path: false")
        }),
        ("merge_slashes", |t| {
            without_lines(t, &["merge_slashes: true"])
        }),
        ("path_with_escaped_slashes_action", |t| {
            without_lines(t, &["path_with_escaped_slashes_action:"])
        }),
        ("path_with_escaped_slashes_action", |t| {
            t.replace("UNESCAPE_AND_REDIRECT", "KEEP_UNCHANGED")
        }),
        ("path_with_escaped_slashes_action", |t| {
            t.replace("UNESCAPE_AND_REDIRECT", "IMPLEMENTATION_SPECIFIC_DEFAULT")
        }),
        ("headers_with_underscores_action", |t| {
            without_lines(
                t,
                &[
                    "common_http_protocol_options:",
                    "headers_with_underscores_action:",
                ],
            )
        }),
        ("headers_with_underscores_action", |t| {
            t.replace(
                "headers_with_underscores_action: DROP_HEADER",
                "headers_with_underscores_action: ALLOW",
            )
        }),
        ("node", |t| {
            without_lines(t, &["node:", "id: keygate-edge", "cluster: keygate"])
        }),
        ("node", |t| without_lines(t, &["cluster: keygate"])),
    ];
    for (shipped, dir) in [(SHIPPED, ECDS_DIR), (SHIPPED_DOCKER, DOCKER_ECDS_DIR)] {
        for (expected, edit) in variants {
            let setup = Setup::shipped(shipped, dir, serde_json::json!({}));
            setup.edit(|t| edit(&t));
            let report = setup.report();
            assert_eq!(
                unsafe_checks(&report),
                vec![expected],
                "{shipped}, {expected}:\n{}",
                report.render_text()
            );
            let finding = report
                .findings
                .iter()
                .find(|f| f.severity == Severity::Unsafe)
                .unwrap();
            let fix = finding.fix.as_deref().unwrap();
            assert!(!fix.is_empty());
            assert!(report.render_text().contains(": 1 unsafe setting"));
            assert_eq!(report.to_json()["safe"], false);
        }
    }
}

#[test]
fn fixes_are_the_yaml_to_write() {
    let setup = Setup::shipped(SHIPPED, ECDS_DIR, serde_json::json!({}));
    setup.edit(|t| {
        without_lines(
            &t,
            &[
                "use_remote_address: true",
                "common_http_protocol_options:",
                "headers_with_underscores_action:",
            ],
        )
    });
    let report = setup.report();
    assert_eq!(
        unsafe_checks(&report),
        vec!["use_remote_address", "headers_with_underscores_action"]
    );
    let fix = |check: &str| {
        report
            .findings
            .iter()
            .find(|f| f.check == check)
            .and_then(|f| f.fix.clone())
            .unwrap()
    };
    assert_eq!(fix("use_remote_address"), "use_remote_address: true");
    assert_eq!(
        fix("headers_with_underscores_action"),
        "common_http_protocol_options:\n  headers_with_underscores_action: DROP_HEADER"
    );
    let text = report.render_text();
    assert!(text.contains(
        "UNSAFE  use_remote_address  listeners[0] (name: edge) http_connection_manager: not set"
    ));
    assert!(text.contains("        fix:\n          use_remote_address: true\n"));
    assert!(text.trim_end().ends_with(": 2 unsafe settings"), "{text}");
}

const KEYGATE_ENTRY: &str = "          - name: keygate\n";

#[test]
fn a_filter_before_keygate_is_unsafe() {
    let lua = "          - name: envoy.filters.http.lua\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua\n              default_source_code: {inline_string: \"function envoy_on_request(h) end\"}\n";
    let setup = Setup::shipped(SHIPPED, ECDS_DIR, serde_json::json!({}));
    setup.edit(|t| replace_once(&t, KEYGATE_ENTRY, &format!("{lua}{KEYGATE_ENTRY}")));
    let report = setup.report();
    assert_eq!(unsafe_checks(&report), vec!["filter_order"]);
    let finding = report
        .findings
        .iter()
        .find(|f| f.check == "filter_order")
        .unwrap();
    assert!(finding
        .message
        .contains("http_filters[0] (envoy.filters.http.lua) before keygate (http_filters[1])"));
    let fix = finding.fix.as_deref().unwrap();
    let keygate = fix.find("- name: keygate").unwrap();
    let lua_at = fix.find("- name: envoy.filters.http.lua").unwrap();
    let router = fix.find("- name: envoy.filters.http.router").unwrap();
    assert!(keygate < lua_at && lua_at < router, "{fix}");
}

#[test]
fn the_router_before_keygate_is_unsafe() {
    let setup = Setup::shipped(SHIPPED, ECDS_DIR, serde_json::json!({}));
    setup.edit(|t| {
        let router = "          - name: envoy.filters.http.router\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router\n";
        let t = replace_once(&t, router, "");
        replace_once(&t, KEYGATE_ENTRY, &format!("{router}{KEYGATE_ENTRY}"))
    });
    let report = setup.report();
    assert_eq!(unsafe_checks(&report), vec!["filter_order"]);
    assert!(report.render_text().contains("the router forwards"));
}

#[test]
fn health_check_and_cors_may_come_first() {
    let first = "          - name: envoy.filters.http.health_check\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck\n              pass_through_mode: false\n          - name: cors\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors\n";
    let setup = Setup::shipped(SHIPPED, ECDS_DIR, serde_json::json!({}));
    setup.edit(|t| replace_once(&t, KEYGATE_ENTRY, &format!("{first}{KEYGATE_ENTRY}")));
    let report = setup.report();
    assert!(report.is_safe(), "{}", report.render_text());
}

#[test]
fn fail_open_is_unsafe() {
    for extra in [
        serde_json::json!({"fail_open": true}),
        serde_json::json!({"failure_policy": "FAIL_OPEN"}),
    ] {
        let setup = Setup::shipped(SHIPPED, ECDS_DIR, extra.clone());
        let report = setup.report();
        assert_eq!(unsafe_checks(&report), vec!["fail_open"], "{extra}");
        let finding = report
            .findings
            .iter()
            .find(|f| f.check == "fail_open")
            .unwrap();
        // Where: the ECDS resource, not the bootstrap.
        assert!(finding.location.contains("resources[0] (name: keygate)"));
    }
    let closed = Setup::shipped(
        SHIPPED,
        ECDS_DIR,
        serde_json::json!({"failure_policy": "FAIL_CLOSED"}),
    );
    assert!(closed.report().is_safe());
}

#[test]
fn another_runtime_is_a_warning() {
    let setup = Setup::shipped(SHIPPED, ECDS_DIR, serde_json::json!({}));
    let wasm = setup.wasm();
    setup.write_ecds(&wasm, "keygate", serde_json::json!({}));
    let path = setup.dir.path().join("ecds/keygate.yaml");
    let text = fs::read_to_string(&path).unwrap();
    fs::write(
        &path,
        text.replace("envoy.wasm.runtime.v8", "envoy.wasm.runtime.wamr"),
    )
    .unwrap();
    let report = setup.report();
    assert!(report.is_safe());
    assert_eq!(checks(&report, Severity::Warning), vec!["runtime"]);
}

#[test]
fn a_garbage_or_missing_module_is_unsafe() {
    let setup = Setup::shipped(SHIPPED, ECDS_DIR, serde_json::json!({}));
    let garbage = setup.dir.path().join("garbage.wasm");
    fs::write(&garbage, b"#!/bin/sh\necho not a module\n").unwrap();
    setup.write_ecds(&garbage, "keygate", serde_json::json!({}));
    let report = setup.report();
    assert_eq!(unsafe_checks(&report), vec!["wasm_module"]);
    assert!(report.render_text().contains("does not start with \\0asm"));

    // A Wasm module, but not a proxy-wasm filter: no allocator export.
    let mut other = minimal_module();
    let at = other.windows(8).position(|w| w == b"proxy_on").unwrap();
    other[at..at + 8].copy_from_slice(b"xxxxx_on");
    let not_proxy = setup.dir.path().join("other.wasm");
    fs::write(&not_proxy, other).unwrap();
    setup.write_ecds(&not_proxy, "keygate", serde_json::json!({}));
    let report = setup.report();
    assert_eq!(unsafe_checks(&report), vec!["wasm_module"]);
    assert!(report.render_text().contains("proxy_on_memory_allocate"));

    let missing = setup.dir.path().join("nowhere/keygate.wasm");
    setup.write_ecds(&missing, "keygate", serde_json::json!({}));
    let report = setup.report();
    assert_eq!(unsafe_checks(&report), vec!["wasm_module"]);
    let finding = report
        .findings
        .iter()
        .find(|f| f.check == "wasm_module")
        .unwrap();
    assert!(finding.message.contains("does not exist"));
    assert!(finding.message.contains("container"));
}

#[test]
fn a_missing_ecds_file_is_a_warning() {
    let setup = Setup::shipped(SHIPPED, ECDS_DIR, serde_json::json!({}));
    fs::remove_file(setup.dir.path().join("ecds/keygate.yaml")).unwrap();
    let report = setup.report();
    assert!(report.is_safe(), "{}", report.render_text());
    assert_eq!(checks(&report, Severity::Warning), vec!["ecds_file"]);
    assert!(report.render_text().contains("keygate apply"));
}

#[test]
fn ecds_without_node_is_unsafe() {
    let setup = Setup::shipped(SHIPPED, ECDS_DIR, serde_json::json!({}));
    setup.edit(|t| without_lines(&t, &["node:", "id: keygate-edge", "cluster: keygate"]));
    let report = setup.report();
    assert_eq!(unsafe_checks(&report), vec!["node"]);
    let finding = report.findings.iter().find(|f| f.check == "node").unwrap();
    assert!(finding.message.contains("config_discovery"));
    assert_eq!(
        finding.fix.as_deref(),
        Some("node:\n  id: keygate-edge\n  cluster: keygate")
    );
}

/// A bootstrap with one listener per entry of `vm_ids`, each with keygate written
/// inline (no ECDS, so no node), named as Envoy's generic Wasm filter: keygate is
/// recognised by its root_id.
fn inline_bootstrap(wasm: &Path, vm_ids: &[&str]) -> String {
    let mut out = String::from(
        "admin:\n  address:\n    socket_address: {address: \"::1\", port_value: 9901}\nstatic_resources:\n  listeners:\n",
    );
    for (i, vm_id) in vm_ids.iter().enumerate() {
        out.push_str(&format!(
            r#"  - name: l{i}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: hcm
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: l{i}
          normalize_path: true
          merge_slashes: true
          path_with_escaped_slashes_action: REJECT_REQUEST
          use_remote_address: true
          skip_xff_append: true
          common_http_protocol_options: {{headers_with_underscores_action: REJECT_REQUEST}}
          route_config: {{virtual_hosts: [{{name: a, domains: ["*"], routes: [{{match: {{prefix: /}}, direct_response: {{status: 200}}}}]}}]}}
          http_filters:
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                root_id: keygate
                vm_config:
                  vm_id: {vm_id}
                  runtime: envoy.wasm.runtime.v8
                  code: {{local: {{filename: {wasm}}}}}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#,
            port = 10000 + i,
            wasm = wasm.display(),
        ));
    }
    out
}

#[test]
fn keygate_filters_must_share_one_vm_id() {
    let setup = Setup::new();
    let wasm = setup.wasm();
    setup.write_bootstrap(&inline_bootstrap(&wasm, &["keygate", "keygate"]));
    let report = setup.report();
    assert!(report.is_safe(), "{}", report.render_text());
    assert_eq!(checks(&report, Severity::Warning), Vec::<&str>::new());
    // Two listeners, each checked: the HCM settings twice, the vm_id once.
    let ok = checks(&report, Severity::Ok);
    assert_eq!(ok.iter().filter(|c| **c == "use_remote_address").count(), 2);
    assert_eq!(ok.iter().filter(|c| **c == "vm_id").count(), 1);
    assert!(!ok.contains(&"node"), "no ECDS, so no node needed");

    setup.write_bootstrap(&inline_bootstrap(&wasm, &["keygate", "other"]));
    let report = setup.report();
    assert_eq!(unsafe_checks(&report), vec!["vm_id"]);
    assert!(report.render_text().contains("\"other\""));
}

#[test]
fn inline_and_ecds_vm_ids_are_compared_too() {
    let setup = Setup::shipped(SHIPPED, ECDS_DIR, serde_json::json!({}));
    let wasm = setup.wasm();
    setup.write_ecds(&wasm, "not-keygate", serde_json::json!({}));
    // A second listener with keygate inline, under vm_id keygate.
    let inline = inline_bootstrap(&wasm, &["keygate"]);
    let listener = &inline[inline.find("  - name: l0").unwrap()..];
    setup.edit(|t| replace_once(&t, "\n  clusters:\n", &format!("{listener}\n  clusters:\n")));
    let report = setup.report();
    assert_eq!(
        unsafe_checks(&report),
        vec!["vm_id"],
        "{}",
        report.render_text()
    );
}

#[test]
fn no_keygate_filter_is_unsafe() {
    let setup = Setup::shipped(SHIPPED, ECDS_DIR, serde_json::json!({}));
    setup.edit(|t| replace_once(&t, KEYGATE_ENTRY, "          - name: something-else\n"));
    let report = setup.report();
    assert_eq!(unsafe_checks(&report), vec!["keygate_filter"]);
    assert!(report.render_text().contains("no keygate filter found"));
}

#[test]
fn unreadable_or_unparsable_files_are_errors_naming_the_file() {
    let setup = Setup::new();
    setup.write_bootstrap("static_resources:\n  listeners: [\n    - name: x\n  : {\n");
    let err = doctor(&setup.bootstrap).unwrap_err();
    assert!(
        err.contains(&setup.bootstrap.display().to_string()),
        "{err}"
    );

    setup.write_bootstrap("just a string\n");
    let err = doctor(&setup.bootstrap).unwrap_err();
    assert!(
        err.contains(&setup.bootstrap.display().to_string()),
        "{err}"
    );

    let missing = setup.dir.path().join("missing.yaml");
    let err = doctor(&missing).unwrap_err();
    assert!(err.contains("missing.yaml"), "{err}");
}

/// Every Envoy bootstrap the repository ships (found by walking envoy/, so a new one is
/// covered without naming it here), with its ECDS file in place: nothing unsafe.
#[test]
fn every_shipped_envoy_configuration_is_safe() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("envoy");
    let mut found = Vec::new();
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml")
                && fs::read_to_string(&path)
                    .unwrap()
                    .contains("static_resources:")
            {
                found.push(path);
            }
        }
    }
    found.sort();
    assert!(found.len() >= 4, "{found:?}");
    for path in &found {
        let text = fs::read_to_string(path).unwrap();
        let dir = ["/etc/keygate/ecds", "envoy/fleet/ecds", "envoy/ecds"]
            .into_iter()
            .find(|d| text.contains(&format!("path: {d}/keygate.yaml")))
            .unwrap_or_else(|| panic!("{} names no known ECDS directory", path.display()));
        let setup = Setup::shipped(path.to_str().unwrap(), dir, serde_json::json!({}));
        let report = setup.report();
        assert!(
            report.is_safe(),
            "{}:\n{}",
            path.display(),
            report.render_text()
        );
    }
}
