//! `keygate doctor`: checks a user's Envoy configuration for the settings keygate relies on.
//!
//! keygate's decisions are only as good as what Envoy hands it: the client address
//! (`source.address`), a normalised path, headers a client cannot alias, a filter that
//! runs before anything trusts the request, and a Wasm module that fails closed. None of
//! that is in keygate's own configuration, so [`doctor`] reads the bootstrap (and the
//! ECDS file it names) and reports every such setting, passed or not, with the YAML to
//! write when it is wrong.
//!
//! The walk is deliberately liberal: listeners in `static_resources` only (LDS is not
//! read), filters recognised by name or by `@type`, `TypedStruct` wrappers unwrapped,
//! booleans and enums accepted in any of the spellings Envoy's JSON mapping takes.

use crate::wasm_module::check_proxy_wasm as check_wasm;
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

/// How much a finding matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// The setting is what keygate needs.
    Ok,
    /// Worth a look, but keygate's guarantees still hold (or cannot be checked from here).
    Warning,
    /// A guarantee keygate makes does not hold with this setting.
    Unsafe,
}

impl Severity {
    fn label(self) -> &'static str {
        match self {
            Severity::Ok => "OK",
            Severity::Warning => "WARNING",
            Severity::Unsafe => "UNSAFE",
        }
    }

    fn json_name(self) -> &'static str {
        match self {
            Severity::Ok => "ok",
            Severity::Warning => "warning",
            Severity::Unsafe => "unsafe",
        }
    }
}

/// One setting checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// A short, stable id (`use_remote_address`, `filter_order`, ...) for scripts.
    pub check: &'static str,
    /// Where in the configuration, e.g. `listeners[0] (name: main) http_connection_manager`.
    pub location: String,
    pub message: String,
    /// The YAML to write there, when the setting is wrong.
    pub fix: Option<String>,
}

/// Everything checked in one bootstrap file.
#[derive(Debug, Clone)]
pub struct Report {
    pub file: PathBuf,
    pub findings: Vec<Finding>,
}

impl Report {
    /// No finding is unsafe (warnings allowed).
    pub fn is_safe(&self) -> bool {
        self.count(Severity::Unsafe) == 0
    }

    fn count(&self, severity: Severity) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == severity)
            .count()
    }

    /// One line per finding, each fix indented under it, and a summary line last.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        for f in &self.findings {
            let _ = writeln!(
                out,
                "{:<7} {}  {}: {}",
                f.severity.label(),
                f.check,
                f.location,
                f.message
            );
            if let Some(fix) = &f.fix {
                out.push_str("        fix:\n");
                for line in fix.lines() {
                    let _ = writeln!(out, "          {line}");
                }
            }
        }
        let unsafe_count = self.count(Severity::Unsafe);
        let warnings = self.count(Severity::Warning);
        let file = self.file.display();
        let warning_note = match warnings {
            0 => String::new(),
            1 => " (1 warning)".to_string(),
            n => format!(" ({n} warnings)"),
        };
        let _ = match unsafe_count {
            0 => writeln!(out, "{file}: keygate's requirements hold{warning_note}"),
            1 => writeln!(out, "{file}: 1 unsafe setting{warning_note}"),
            n => writeln!(out, "{file}: {n} unsafe settings{warning_note}"),
        };
        out
    }

    /// `{"file", "safe", "unsafe", "warnings", "findings": [{severity, check, location,
    /// message, fix}]}`; `fix` is null when there is nothing to write.
    pub fn to_json(&self) -> Value {
        let findings: Vec<Value> = self
            .findings
            .iter()
            .map(|f| {
                json!({
                    "severity": f.severity.json_name(),
                    "check": f.check,
                    "location": f.location,
                    "message": f.message,
                    "fix": f.fix,
                })
            })
            .collect();
        json!({
            "file": self.file.display().to_string(),
            "safe": self.is_safe(),
            "unsafe": self.count(Severity::Unsafe),
            "warnings": self.count(Severity::Warning),
            "findings": findings,
        })
    }
}

/// Reads the Envoy bootstrap at `envoy_yaml` and checks it. `Err` (naming the file) only
/// when it cannot be read or is not a YAML mapping; everything else is a finding.
/// Relative paths inside it (the ECDS file, the `.wasm`) are taken from the current
/// directory, as Envoy started from here would take them.
pub fn doctor(envoy_yaml: &Path) -> Result<Report, String> {
    let shown = envoy_yaml.display();
    let text = fs::read_to_string(envoy_yaml).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let bootstrap = parse_yaml(&text).map_err(|e| format!("{shown} is not valid YAML: {e}"))?;
    if !bootstrap.is_object() {
        return Err(format!(
            "{shown} is not an Envoy bootstrap (its top level is not a mapping)"
        ));
    }
    let mut doc = Doctor::default();
    doc.check(&bootstrap);
    Ok(Report {
        file: envoy_yaml.to_path_buf(),
        findings: doc.findings,
    })
}

/// YAML (JSON included) into a JSON value, with `<<` merge keys applied as Envoy's own
/// YAML loader does.
fn parse_yaml(text: &str) -> Result<Value, String> {
    let mut doc: serde_norway::Value = serde_norway::from_str(text).map_err(|e| e.to_string())?;
    doc.apply_merge().map_err(|e| e.to_string())?;
    serde_json::to_value(doc).map_err(|e| e.to_string())
}

const HCM_NAME: &str = "envoy.filters.network.http_connection_manager";
const ROUTER: &str = "envoy.filters.http.router";
/// HTTP filters that may run before keygate: they answer or decorate requests without
/// trusting who sent them (a health check, a CORS preflight).
const ALLOWED_BEFORE: [&str; 2] = ["envoy.filters.http.health_check", "envoy.filters.http.cors"];
const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const V8: &str = "envoy.wasm.runtime.v8";

/// The keygate HTTP filter entry the walk found, with where its Wasm configuration is.
struct KeygateFilter {
    location: String,
    /// `(where, the Wasm PluginConfig)`: the inline one, an ECDS default, the ECDS resource.
    plugins: Vec<(String, Value)>,
}

#[derive(Default)]
struct Doctor {
    findings: Vec<Finding>,
    /// ECDS files by the path the bootstrap writes, read once.
    ecds: HashMap<String, Result<Value, EcdsError>>,
    /// `(where, vm_id)` of every keygate Wasm configuration.
    vm_ids: Vec<(String, String)>,
    keygate_filters: usize,
    uses_config_discovery: bool,
}

#[derive(Clone)]
enum EcdsError {
    Missing,
    Unreadable(String),
}

impl Doctor {
    fn push(
        &mut self,
        severity: Severity,
        check: &'static str,
        location: &str,
        message: impl Into<String>,
        fix: Option<&str>,
    ) {
        self.findings.push(Finding {
            severity,
            check,
            location: location.to_string(),
            message: message.into(),
            fix: fix.map(str::to_string),
        });
    }

    fn check(&mut self, bootstrap: &Value) {
        let listeners = array(path(bootstrap, &["static_resources", "listeners"]));
        for (i, listener) in listeners.iter().enumerate() {
            let mut label = format!("listeners[{i}]");
            if let Some(name) = str_at(listener, &["name"]) {
                let _ = write!(label, " (name: {name})");
            }
            let chains = array(listener.get("filter_chains"));
            let mut located: Vec<(String, &Value)> = chains
                .iter()
                .enumerate()
                .map(|(j, chain)| {
                    // The brief form when there is only one chain to tell apart.
                    let only = chains.len() == 1 && listener.get("default_filter_chain").is_none();
                    let where_ = if only {
                        label.clone()
                    } else {
                        format!("{label} filter_chains[{j}]")
                    };
                    (where_, chain)
                })
                .collect();
            if let Some(chain) = listener.get("default_filter_chain") {
                located.push((format!("{label} default_filter_chain"), chain));
            }
            for (where_, chain) in located {
                for filter in array(chain.get("filters")) {
                    if filter.get("config_discovery").is_some() {
                        self.uses_config_discovery = true;
                    }
                    if is_hcm(filter) {
                        let body = typed_body(filter.get("typed_config")).1;
                        self.check_hcm(&format!("{where_} http_connection_manager"), body);
                    }
                }
            }
        }

        if self.keygate_filters == 0 {
            let mut message = "no keygate filter found in any HTTP connection manager of \
                               static_resources.listeners: nothing checks API keys"
                .to_string();
            if path(bootstrap, &["dynamic_resources", "lds_config"]).is_some() {
                message.push_str(" (listeners from LDS are not read by this check)");
            }
            self.push(
                Severity::Unsafe,
                "keygate_filter",
                "static_resources.listeners",
                message,
                Some(KEYGATE_FILTER_FIX),
            );
        }
        self.check_vm_ids();
        if self.uses_config_discovery {
            self.check_node(bootstrap);
        }
        self.check_admin(bootstrap);
    }

    fn check_hcm(&mut self, hcm: &str, body: &Value) {
        let filters = array(body.get("http_filters"));
        let mut keygate_at = Vec::new();
        for (i, filter) in filters.iter().enumerate() {
            if filter.get("config_discovery").is_some() {
                self.uses_config_discovery = true;
            }
            if self.is_keygate(filter) {
                keygate_at.push(i);
            }
        }
        let Some(&first) = keygate_at.first() else {
            // An HCM without keygate is someone else's business (an internal listener,
            // say); only a file without keygate anywhere is reported.
            return;
        };
        self.keygate_filters += keygate_at.len();
        self.push(
            Severity::Ok,
            "keygate_filter",
            hcm,
            format!("keygate is http_filters[{first}]"),
            None,
        );

        self.check_order(hcm, filters, first);
        self.check_hcm_settings(hcm, body);
        self.check_upgrades(hcm, body);

        for &i in &keygate_at {
            if let Some(filter) = filters.get(i) {
                let found = self.keygate_filter(hcm, i, filter);
                for (where_, plugin) in &found.plugins {
                    self.check_plugin(where_, plugin);
                }
                if found.plugins.is_empty() && filter.get("config_discovery").is_none() {
                    self.push(
                        Severity::Warning,
                        "wasm_config",
                        &found.location,
                        "no Wasm configuration (typed_config.config) to check",
                        None,
                    );
                }
            }
        }
    }

    /// Every filter before the first keygate one must be one that trusts nobody.
    fn check_order(&mut self, hcm: &str, filters: &[Value], first: usize) {
        let before: Vec<(usize, String)> = filters
            .iter()
            .enumerate()
            .take(first)
            .filter(|(_, f)| !allowed_before(f))
            .map(|(i, f)| (i, filter_name(f)))
            .collect();
        let location = format!("{hcm} http_filters");
        if before.is_empty() {
            let message = if first == 0 {
                "keygate runs first".to_string()
            } else {
                "keygate runs first after health check / CORS filters".to_string()
            };
            self.push(Severity::Ok, "filter_order", &location, message, None);
            return;
        }
        let names: Vec<String> = before
            .iter()
            .map(|(i, name)| format!("http_filters[{i}] ({name})"))
            .collect();
        let router_first = before.iter().any(|(_, n)| n == ROUTER);
        let mut message = format!(
            "{} before keygate (http_filters[{first}]): {}",
            names.join(", "),
            if names.len() == 1 {
                "it runs"
            } else {
                "they run"
            },
        );
        message.push_str(
            " on requests keygate has not authenticated yet and could act on a spoofed \
             identity header",
        );
        if router_first {
            message.push_str("; the router forwards the request before keygate ever sees it");
        }
        // The fix: the same filters, keygate moved up to just after those allowed first.
        let mut order: Vec<String> = Vec::new();
        for f in filters.iter().take(first).filter(|f| allowed_before(f)) {
            order.push(filter_name(f));
        }
        if let Some(f) = filters.get(first) {
            order.push(format!("{}  # keygate", filter_name(f)));
        }
        for f in filters.iter().take(first).filter(|f| !allowed_before(f)) {
            order.push(filter_name(f));
        }
        for f in filters.iter().skip(first + 1) {
            order.push(filter_name(f));
        }
        let mut fix = String::from("http_filters:   # each entry unchanged, in this order\n");
        for name in order {
            let _ = writeln!(fix, "- name: {name}");
        }
        self.push(
            Severity::Unsafe,
            "filter_order",
            &location,
            message,
            Some(fix.trim_end()),
        );
    }

    fn check_hcm_settings(&mut self, hcm: &str, body: &Value) {
        let location = hcm;
        let setting = |key: &str| match body.get(key) {
            None => "not set".to_string(),
            Some(v) => compact(v),
        };

        // use_remote_address
        if flag(body.get("use_remote_address")) == Some(true) {
            self.push(
                Severity::Ok,
                "use_remote_address",
                location,
                "true: the client address is the connection's peer",
                None,
            );
        } else {
            self.push(
                Severity::Unsafe,
                "use_remote_address",
                location,
                format!(
                    "{} (Envoy's default is false): source.address would come from \
                     X-Forwarded-For, which any client can write, so IP rules, allowed_ips \
                     and per-address limits could be escaped",
                    setting("use_remote_address")
                ),
                Some("use_remote_address: true"),
            );
        }

        if flag(body.get("skip_xff_append")) == Some(true) {
            self.push(
                Severity::Ok,
                "skip_xff_append",
                location,
                "true: X-Forwarded-For reaches keygate as the client sent it",
                None,
            );
        } else {
            self.push(
                Severity::Unsafe,
                "skip_xff_append",
                location,
                format!(
                    "{}: with use_remote_address Envoy appends the peer (its own address \
                     for loopback peers) to X-Forwarded-For, so trusted_proxies no longer \
                     decide alone which entry is the client",
                    setting("skip_xff_append")
                ),
                Some("skip_xff_append: true"),
            );
        }

        if flag(body.get("normalize_path")) == Some(true) {
            self.push(
                Severity::Ok,
                "normalize_path",
                location,
                "true: route rules see /v1/admin, not /v1/./admin",
                None,
            );
        } else {
            self.push(
                Severity::Unsafe,
                "normalize_path",
                location,
                format!(
                    "{}: /v1/./admin or /v1/%61dmin would not match a route rule for \
                     /v1/admin, yet reach the same upstream path",
                    setting("normalize_path")
                ),
                Some("normalize_path: true"),
            );
        }

        if flag(body.get("merge_slashes")) == Some(true) {
            self.push(
                Severity::Ok,
                "merge_slashes",
                location,
                "true: route rules see /v1/admin, not /v1//admin",
                None,
            );
        } else {
            self.push(
                Severity::Unsafe,
                "merge_slashes",
                location,
                format!(
                    "{}: /v1//admin would not match a route rule for /v1/admin, yet many \
                     upstreams serve it as /v1/admin",
                    setting("merge_slashes")
                ),
                Some("merge_slashes: true"),
            );
        }

        let escaped = enum_name(
            body.get("path_with_escaped_slashes_action"),
            &[
                "IMPLEMENTATION_SPECIFIC_DEFAULT",
                "KEEP_UNCHANGED",
                "REJECT_REQUEST",
                "UNESCAPE_AND_REDIRECT",
                "UNESCAPE_AND_FORWARD",
            ],
        );
        match escaped.as_deref() {
            Some(a @ ("UNESCAPE_AND_REDIRECT" | "UNESCAPE_AND_FORWARD" | "REJECT_REQUEST")) => self
                .push(
                    Severity::Ok,
                    "path_with_escaped_slashes_action",
                    location,
                    format!("{a}: /v1%2Fadmin is not a different prefix from /v1/admin"),
                    None,
                ),
            other => self.push(
                Severity::Unsafe,
                "path_with_escaped_slashes_action",
                location,
                format!(
                    "{}: /v1%2Fadmin passes route rules for /v1/admin untouched, and an \
                     upstream that decodes %2F serves it as /v1/admin",
                    other.map_or_else(
                        || "not set (Envoy keeps escaped slashes by default)".to_string(),
                        str::to_string
                    )
                ),
                Some("path_with_escaped_slashes_action: UNESCAPE_AND_REDIRECT"),
            ),
        }

        let underscores = enum_name(
            path(
                body,
                &[
                    "common_http_protocol_options",
                    "headers_with_underscores_action",
                ],
            ),
            &["ALLOW", "REJECT_REQUEST", "DROP_HEADER"],
        );
        match underscores.as_deref() {
            Some(a @ ("REJECT_REQUEST" | "DROP_HEADER")) => self.push(
                Severity::Ok,
                "headers_with_underscores_action",
                location,
                format!("{a}: a client cannot send x_keygate_role"),
                None,
            ),
            other => self.push(
                Severity::Unsafe,
                "headers_with_underscores_action",
                location,
                format!(
                    "{}: a client can send header names with underscores; keygate removes \
                     its own identity headers in any spelling (x_keygate_role), but \
                     CGI/WSGI-style upstreams fold any other x_a_b into the variable of x-a-b \
                     (HTTP_X_A_B), so a header the upstream trusts from Envoy can be spoofed",
                    other.map_or_else(
                        || "not set (Envoy's default is ALLOW)".to_string(),
                        str::to_string
                    )
                ),
                Some(
                    "common_http_protocol_options:\n  headers_with_underscores_action: DROP_HEADER",
                ),
            ),
        }
    }

    /// Upgraded requests (WebSocket, CONNECT) run the upgrade's own filter list when it
    /// has one: without keygate in it they are never authenticated.
    fn check_upgrades(&mut self, hcm: &str, body: &Value) {
        for (i, upgrade) in array(body.get("upgrade_configs")).iter().enumerate() {
            let Some(filters) = upgrade.get("filters").and_then(Value::as_array) else {
                continue;
            };
            if filters.is_empty() || filters.iter().any(|f| self.is_keygate(f)) {
                continue;
            }
            let kind = str_at(upgrade, &["upgrade_type"]).unwrap_or("?");
            self.push(
                Severity::Unsafe,
                "upgrade_filters",
                &format!("{hcm} upgrade_configs[{i}] ({kind})"),
                "this upgrade has its own filter list without keygate: upgraded requests \
                 are never authenticated",
                Some("filters:   # keygate first, then the upgrade's filters\n- name: keygate\n  ..."),
            );
        }
    }

    /// A filter is keygate by its name, by its Wasm configuration (root_id, plugin name,
    /// module file name), or by what its ECDS resource holds.
    fn is_keygate(&mut self, filter: &Value) -> bool {
        if str_at(filter, &["name"]) == Some("keygate") {
            return true;
        }
        if let Some(plugin) = wasm_plugin(filter.get("typed_config")) {
            if plugin_is_keygate(plugin) {
                return true;
            }
        }
        let Some(discovery) = filter.get("config_discovery") else {
            return false;
        };
        if let Some(plugin) = wasm_plugin(discovery.get("default_config")) {
            if plugin_is_keygate(plugin) {
                return true;
            }
        }
        let name = str_at(filter, &["name"]).unwrap_or("");
        match ecds_path(discovery) {
            Some(file) => match self.load_ecds(&file) {
                Ok(doc) => ecds_resource(&doc, name)
                    .and_then(|(_, r)| wasm_plugin(r.get("typed_config")))
                    .is_some_and(plugin_is_keygate),
                Err(_) => false,
            },
            None => false,
        }
    }

    /// Finds the Wasm configurations of the keygate filter at `http_filters[index]`,
    /// reporting on the ECDS file when that is where it lives.
    fn keygate_filter(&mut self, hcm: &str, index: usize, filter: &Value) -> KeygateFilter {
        let location = format!("{hcm} http_filters[{index}] ({})", filter_name(filter));
        let mut plugins = Vec::new();
        if let Some(plugin) = wasm_plugin(filter.get("typed_config")) {
            plugins.push((location.clone(), plugin.clone()));
        }
        if let Some(discovery) = filter.get("config_discovery") {
            if let Some(plugin) = wasm_plugin(discovery.get("default_config")) {
                plugins.push((
                    format!("{location} config_discovery.default_config"),
                    plugin.clone(),
                ));
            }
            let name = str_at(filter, &["name"]).unwrap_or("");
            if let Some(found) = self.ecds_plugin(&location, discovery, name) {
                plugins.push(found);
            }
        }
        KeygateFilter { location, plugins }
    }

    /// The Wasm configuration in the ECDS file a `config_discovery` names, or a finding
    /// saying why it could not be read.
    fn ecds_plugin(
        &mut self,
        location: &str,
        discovery: &Value,
        name: &str,
    ) -> Option<(String, Value)> {
        let Some(file) = ecds_path(discovery) else {
            self.push(
                Severity::Warning,
                "ecds_file",
                location,
                "the configuration comes from a management server (not a \
                 path_config_source): its fail_open, module and vm_id are not checked here",
                None,
            );
            return None;
        };
        match self.load_ecds(&file) {
            Err(EcdsError::Missing) => {
                let mut message = format!(
                    "the ECDS file {file} does not exist{}: run `keygate apply` (or any \
                     `keygate ... --apply`) to write it; Envoy does not start without it, \
                     and its fail_open, module and vm_id are not checked",
                    relative_note(&file)
                );
                if Path::new(&file).is_absolute() {
                    message.push_str(
                        " (a path inside a container may not exist on this host: run the \
                         doctor where Envoy runs, or on a copy with host paths)",
                    );
                }
                self.push(Severity::Warning, "ecds_file", location, message, None);
                None
            }
            Err(EcdsError::Unreadable(why)) => {
                self.push(
                    Severity::Warning,
                    "ecds_file",
                    location,
                    format!(
                        "the ECDS file {file} cannot be used ({why}): Envoy refuses it too; \
                         `keygate apply` rewrites it"
                    ),
                    None,
                );
                None
            }
            Ok(doc) => match ecds_resource(&doc, name) {
                Some((k, resource)) => {
                    let where_ = format!("{file} resources[{k}] (name: {name})");
                    match wasm_plugin(resource.get("typed_config")) {
                        Some(plugin) => {
                            self.push(
                                Severity::Ok,
                                "ecds_file",
                                location,
                                format!("reads {file}, which has the resource {name:?}"),
                                None,
                            );
                            Some((where_, plugin.clone()))
                        }
                        None => {
                            self.push(
                                Severity::Warning,
                                "ecds_file",
                                &where_,
                                "the resource holds no Wasm configuration \
                                 (typed_config.config); `keygate apply` rewrites it",
                                None,
                            );
                            None
                        }
                    }
                }
                None => {
                    self.push(
                        Severity::Warning,
                        "ecds_file",
                        location,
                        format!(
                            "{file} has no resource named {name:?}: Envoy rejects it and \
                             the filter is missing (requests are refused, not let through)"
                        ),
                        None,
                    );
                    None
                }
            },
        }
    }

    fn load_ecds(&mut self, file: &str) -> Result<Value, EcdsError> {
        if let Some(cached) = self.ecds.get(file) {
            return cached.clone();
        }
        let loaded = match fs::read_to_string(file) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(EcdsError::Missing),
            Err(e) => Err(EcdsError::Unreadable(e.to_string())),
            Ok(text) => {
                parse_yaml(&text).map_err(|e| EcdsError::Unreadable(format!("not valid YAML: {e}")))
            }
        };
        self.ecds.insert(file.to_string(), loaded.clone());
        loaded
    }

    /// `fail_open`, the module, the runtime; the vm_id is collected for [`check_vm_ids`].
    fn check_plugin(&mut self, location: &str, plugin: &Value) {
        let fail_open = flag(plugin.get("fail_open")) == Some(true);
        let policy = enum_name(
            plugin.get("failure_policy"),
            &["UNSPECIFIED", "FAIL_RELOAD", "FAIL_CLOSED", "FAIL_OPEN"],
        );
        if fail_open || policy.as_deref() == Some("FAIL_OPEN") {
            let what = if fail_open {
                "fail_open: true"
            } else {
                "failure_policy: FAIL_OPEN"
            };
            self.push(
                Severity::Unsafe,
                "fail_open",
                location,
                format!(
                    "{what}: if the module crashes or fails to load, requests reach the \
                     upstream unchecked"
                ),
                Some("fail_open: false   # and no failure_policy: FAIL_OPEN"),
            );
        } else {
            self.push(
                Severity::Ok,
                "fail_open",
                location,
                "fails closed: a module that crashes or fails to load refuses requests (500), never unchecked traffic",
                None,
            );
        }

        self.check_module(location, plugin);

        match str_at(plugin, &["vm_config", "runtime"]) {
            Some(V8) => self.push(Severity::Ok, "runtime", location, V8, None),
            other => self.push(
                Severity::Warning,
                "runtime",
                location,
                format!(
                    "{}: keygate is tested with Envoy's built-in V8 runtime",
                    other.unwrap_or("not set")
                ),
                Some("vm_config:\n  runtime: envoy.wasm.runtime.v8"),
            ),
        }

        let vm_id = str_at(plugin, &["vm_config", "vm_id"])
            .unwrap_or("")
            .to_string();
        self.vm_ids.push((location.to_string(), vm_id));
    }

    fn check_module(&mut self, location: &str, plugin: &Value) {
        const FIX: &str = "vm_config:\n  code: {local: {filename: target/wasm32-wasip1/release/keygate.wasm}}   # `make build` writes it; for ECDS, the store's envoy.wasm (`keygate init --wasm PATH`), then `keygate apply`";
        let local = path(plugin, &["vm_config", "code", "local"]);
        let (source, bytes) = if let Some(file) = local.and_then(|l| str_at(l, &["filename"])) {
            match fs::read(file) {
                Ok(bytes) => (file.to_string(), bytes),
                Err(e) => {
                    let mut message = if e.kind() == std::io::ErrorKind::NotFound {
                        format!("{file} does not exist{}", relative_note(file))
                    } else {
                        format!("{file} cannot be read: {e}")
                    };
                    message.push_str(
                        ": Envoy cannot load the filter (if Envoy runs in a container, this \
                         is a path inside it and may not exist on this host)",
                    );
                    self.push(
                        Severity::Unsafe,
                        "wasm_module",
                        location,
                        message,
                        Some(FIX),
                    );
                    return;
                }
            }
        } else if let Some(encoded) = local.and_then(|l| str_at(l, &["inline_bytes"])) {
            use base64::Engine as _;
            match base64::engine::general_purpose::STANDARD.decode(encoded.trim()) {
                Ok(bytes) => ("inline_bytes".to_string(), bytes),
                Err(e) => {
                    self.push(
                        Severity::Unsafe,
                        "wasm_module",
                        location,
                        format!("inline_bytes is not base64: {e}"),
                        Some(FIX),
                    );
                    return;
                }
            }
        } else if path(plugin, &["vm_config", "code", "remote"]).is_some() {
            self.push(
                Severity::Warning,
                "wasm_module",
                location,
                "the module is fetched from a remote URI: not checked here",
                None,
            );
            return;
        } else {
            self.push(
                Severity::Unsafe,
                "wasm_module",
                location,
                "vm_config.code names no module (code.local.filename)",
                Some(FIX),
            );
            return;
        };
        match check_wasm(&bytes) {
            Ok(()) => self.push(
                Severity::Ok,
                "wasm_module",
                location,
                format!("{source} is a proxy-wasm module"),
                None,
            ),
            Err(why) => self.push(
                Severity::Unsafe,
                "wasm_module",
                location,
                format!("{source}: {why}"),
                Some(FIX),
            ),
        }
    }

    /// Rate-limit buckets, the failed-authentication limit and the key cache live in the
    /// shared data of one vm_id: filters with different ones each grant the full limit.
    fn check_vm_ids(&mut self) {
        let distinct: BTreeSet<&str> = self.vm_ids.iter().map(|(_, id)| id.as_str()).collect();
        match distinct.len() {
            0 => {}
            1 => {
                let id = distinct.iter().next().copied().unwrap_or("");
                let n = self.vm_ids.len();
                let shown = if id.is_empty() {
                    "\"\" (unset)".to_string()
                } else {
                    format!("{id:?}")
                };
                let message = if n == 1 {
                    format!("vm_id {shown}")
                } else {
                    format!("all {n} keygate configurations use vm_id {shown}: limits are shared")
                };
                self.push(Severity::Ok, "vm_id", "keygate filters", message, None);
            }
            _ => {
                let each: Vec<String> = self
                    .vm_ids
                    .iter()
                    .map(|(loc, id)| format!("{loc}: {id:?}"))
                    .collect();
                let message = format!(
                    "keygate filters use different vm_ids ({}): each VM keeps its own \
                     rate-limit and failed-authentication buckets, so a client gets every \
                     limit once per vm_id",
                    each.join("; ")
                );
                self.push(
                    Severity::Unsafe,
                    "vm_id",
                    "keygate filters",
                    message,
                    Some("vm_config:\n  vm_id: keygate   # the same in every keygate filter"),
                );
            }
        }
    }

    fn check_node(&mut self, bootstrap: &Value) {
        let id = str_at(bootstrap, &["node", "id"]).filter(|s| !s.is_empty());
        let cluster = str_at(bootstrap, &["node", "cluster"]).filter(|s| !s.is_empty());
        match (id, cluster) {
            (Some(id), Some(cluster)) => self.push(
                Severity::Ok,
                "node",
                "node",
                format!("id {id:?}, cluster {cluster:?}"),
                None,
            ),
            _ => {
                let missing: Vec<&str> = [("id", id.is_none()), ("cluster", cluster.is_none())]
                    .iter()
                    .filter(|(_, m)| *m)
                    .map(|(k, _)| *k)
                    .collect();
                self.push(
                    Severity::Unsafe,
                    "node",
                    "node",
                    format!(
                        "no node {}: a filter uses config_discovery (ECDS), which Envoy \
                         refuses without a node identity (unless started with \
                         --service-node and --service-cluster)",
                        missing.join(" or ")
                    ),
                    Some("node:\n  id: keygate-edge\n  cluster: keygate"),
                );
            }
        }
    }

    fn check_admin(&mut self, bootstrap: &Value) {
        let Some(admin) = bootstrap.get("admin") else {
            self.push(
                Severity::Ok,
                "admin_address",
                "admin",
                "no admin interface",
                None,
            );
            return;
        };
        if path(admin, &["address", "pipe"]).is_some() {
            self.push(
                Severity::Ok,
                "admin_address",
                "admin",
                "a Unix socket",
                None,
            );
            return;
        }
        let address = str_at(admin, &["address", "socket_address", "address"]);
        match address {
            Some(a) if is_loopback(a) => self.push(
                Severity::Ok,
                "admin_address",
                "admin",
                format!("{a}: loopback only"),
                None,
            ),
            None if admin.get("address").is_none() => self.push(
                Severity::Ok,
                "admin_address",
                "admin",
                "no admin address: the admin interface is not served",
                None,
            ),
            other => self.push(
                Severity::Warning,
                "admin_address",
                "admin",
                format!(
                    "{}: the admin interface (stats, config dump, /quitquitquit) is \
                     reachable from other hosts; inside a container, publish its port on \
                     the host's loopback only",
                    other.unwrap_or("unrecognised address")
                ),
                Some("admin:\n  address:\n    socket_address: {address: 127.0.0.1, port_value: 9901}"),
            ),
        }
    }
}

const KEYGATE_FILTER_FIX: &str = "http_filters:   # in the http_connection_manager's typed_config
- name: keygate                  # first, before the router
  config_discovery:
    config_source:
      path_config_source:
        path: envoy/ecds/keygate.yaml        # written by `keygate apply`
        watched_directory: {path: envoy/ecds}
    type_urls: [\"type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm\"]
- name: envoy.filters.http.router
  typed_config:
    \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";

fn is_hcm(filter: &Value) -> bool {
    if str_at(filter, &["name"]) == Some(HCM_NAME) {
        return true;
    }
    typed_body(filter.get("typed_config"))
        .0
        .is_some_and(|t| t.ends_with("HttpConnectionManager"))
}

fn allowed_before(filter: &Value) -> bool {
    let name = str_at(filter, &["name"]).unwrap_or("");
    if ALLOWED_BEFORE.contains(&name) {
        return true;
    }
    // Named otherwise, but recognisable by type.
    typed_body(filter.get("typed_config")).0.is_some_and(|t| {
        t.contains("filters.http.health_check.") || t.contains("filters.http.cors.")
    })
}

fn filter_name(filter: &Value) -> String {
    match str_at(filter, &["name"]) {
        Some(name) => name.to_string(),
        None => typed_body(filter.get("typed_config"))
            .0
            .map_or_else(|| "unnamed".to_string(), |t| format!("unnamed {t}")),
    }
}

/// A `typed_config`'s type URL and body, looking through `TypedStruct` wrappers.
fn typed_body(typed: Option<&Value>) -> (Option<&str>, &Value) {
    static NULL: Value = Value::Null;
    let Some(typed) = typed else {
        return (None, &NULL);
    };
    let ty = str_at(typed, &["@type"]);
    if ty.is_some_and(|t| t.ends_with("TypedStruct")) {
        return (
            str_at(typed, &["type_url"]),
            typed.get("value").unwrap_or(&NULL),
        );
    }
    (ty, typed)
}

/// The Wasm `PluginConfig` (`config`) in a filter's `typed_config`, when it is a Wasm one.
fn wasm_plugin(typed: Option<&Value>) -> Option<&Value> {
    let (ty, body) = typed_body(typed);
    let config = body.get("config")?;
    let is_wasm = ty.is_some_and(|t| t == WASM_TYPE || t.ends_with("wasm.v3.Wasm"))
        || config.get("vm_config").is_some();
    (is_wasm && config.is_object()).then_some(config)
}

fn plugin_is_keygate(plugin: &Value) -> bool {
    str_at(plugin, &["root_id"]) == Some("keygate")
        || str_at(plugin, &["name"]) == Some("keygate")
        || str_at(plugin, &["vm_config", "code", "local", "filename"])
            .is_some_and(|f| f.ends_with("keygate.wasm"))
}

/// The file a `config_discovery` reads, as written (relative to Envoy's working directory).
fn ecds_path(discovery: &Value) -> Option<String> {
    let source = discovery.get("config_source")?;
    str_at(source, &["path_config_source", "path"])
        .or_else(|| str_at(source, &["path"]))
        .map(str::to_string)
}

/// The resource named `name` in an ECDS file (or its only resource when `name` is empty).
fn ecds_resource<'a>(doc: &'a Value, name: &str) -> Option<(usize, &'a Value)> {
    let resources = array(doc.get("resources"));
    resources
        .iter()
        .enumerate()
        .map(|(k, r)| (k, r.get("resource").unwrap_or(r)))
        .find(|(_, r)| {
            str_at(r, &["name"]) == Some(name) || (name.is_empty() && resources.len() == 1)
        })
}

fn relative_note(file: &str) -> String {
    if Path::new(file).is_absolute() {
        return String::new();
    }
    match std::env::current_dir() {
        Ok(dir) => format!(" (relative to the working directory {})", dir.display()),
        Err(_) => " (relative to the working directory)".to_string(),
    }
}

fn is_loopback(address: &str) -> bool {
    match address.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => address.eq_ignore_ascii_case("localhost"),
    }
}

// JSON helpers: Envoy's YAML is loose, so every accessor tolerates a missing key or a
// value of another type.

fn path<'a>(v: &'a Value, keys: &[&str]) -> Option<&'a Value> {
    keys.iter().try_fold(v, |v, k| v.get(*k))
}

fn str_at<'a>(v: &'a Value, keys: &[&str]) -> Option<&'a str> {
    path(v, keys).and_then(Value::as_str)
}

fn array(v: Option<&Value>) -> &[Value] {
    v.and_then(Value::as_array).map_or(&[], Vec::as_slice)
}

/// A bool as Envoy reads one: `true`, `"true"` or a `BoolValue` written as `{value: true}`.
fn flag(v: Option<&Value>) -> Option<bool> {
    match v? {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s == "true" => Some(true),
        Value::String(s) if s == "false" => Some(false),
        Value::Object(m) => flag(m.get("value")),
        _ => None,
    }
}

/// An enum by name, or by number as protobuf's JSON mapping also allows.
fn enum_name(v: Option<&Value>, names: &[&str]) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => {
            let i = n.as_u64()?;
            names
                .get(usize::try_from(i).ok()?)
                .map(|s| s.to_string())
                .or_else(|| Some(i.to_string()))
        }
        other => Some(compact(other)),
    }
}

fn compact(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wasm_module::ALLOCATOR_EXPORT;

    /// A minimal module exporting the proxy-wasm allocator: (func (param i32) (result i32)).
    fn module(export: &str) -> Vec<u8> {
        let mut m = b"\0asm\x01\0\0\0".to_vec();
        m.extend_from_slice(&[1, 6, 1, 0x60, 1, 0x7f, 1, 0x7f]); // type section
        m.extend_from_slice(&[3, 2, 1, 0]); // function section
        let mut exp = vec![1, export.len() as u8];
        exp.extend_from_slice(export.as_bytes());
        exp.extend_from_slice(&[0, 0]);
        m.push(7);
        m.push(exp.len() as u8);
        m.extend_from_slice(&exp);
        m.extend_from_slice(&[10, 6, 1, 4, 0, 0x20, 0, 0x0b]); // code section
        m
    }

    #[test]
    fn wasm_modules() {
        assert_eq!(check_wasm(&module(ALLOCATOR_EXPORT)), Ok(()));
        assert!(check_wasm(&module("malloc"))
            .unwrap_err()
            .contains("without the export"));
        assert!(check_wasm(b"hello world").unwrap_err().contains("\\0asm"));
        assert!(check_wasm(b"\0asm\x02\0\0\0")
            .unwrap_err()
            .contains("version"));
        assert!(check_wasm(b"\0asm\x01\0\0\0")
            .unwrap_err()
            .contains("no exports"));
        // A section claiming more bytes than there are, and a truncated export.
        assert!(check_wasm(b"\0asm\x01\0\0\0\x07\x7f\x01").is_err());
        let mut cut = module(ALLOCATOR_EXPORT);
        cut.truncate(30);
        assert!(check_wasm(&cut).is_err());
        // No byte string makes it panic.
        for len in 0..module(ALLOCATOR_EXPORT).len() {
            let _ = check_wasm(&module(ALLOCATOR_EXPORT)[..len]);
        }
    }

    #[test]
    fn loose_values() {
        assert_eq!(flag(Some(&json!(true))), Some(true));
        assert_eq!(flag(Some(&json!("true"))), Some(true));
        assert_eq!(flag(Some(&json!({"value": true}))), Some(true));
        assert_eq!(flag(Some(&json!(1))), None);
        let names = ["ALLOW", "REJECT_REQUEST", "DROP_HEADER"];
        assert_eq!(
            enum_name(Some(&json!(2)), &names).as_deref(),
            Some("DROP_HEADER")
        );
        assert_eq!(enum_name(Some(&json!(9)), &names).as_deref(), Some("9"));
        assert!(is_loopback("127.0.0.2") && is_loopback("::1") && is_loopback("localhost"));
        assert!(!is_loopback("0.0.0.0") && !is_loopback("::"));
    }

    #[test]
    fn yaml_merge_keys_and_typed_structs() {
        let v = parse_yaml("base: &b {use_remote_address: true}\nhcm:\n  <<: *b\n").unwrap();
        assert_eq!(v["hcm"]["use_remote_address"], json!(true));
        let typed = json!({"@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
            "type_url": WASM_TYPE, "value": {"config": {"root_id": "keygate"}}});
        assert!(wasm_plugin(Some(&typed)).is_some_and(plugin_is_keygate));
    }

    #[test]
    fn text_report() {
        let report = Report {
            file: PathBuf::from("envoy.yaml"),
            findings: vec![
                Finding {
                    severity: Severity::Unsafe,
                    check: "merge_slashes",
                    location: "listeners[0] (name: main) http_connection_manager".into(),
                    message: "not set".into(),
                    fix: Some("merge_slashes: true".into()),
                },
                Finding {
                    severity: Severity::Ok,
                    check: "node",
                    location: "node".into(),
                    message: "fine".into(),
                    fix: None,
                },
            ],
        };
        assert_eq!(
            report.render_text(),
            "UNSAFE  merge_slashes  listeners[0] (name: main) http_connection_manager: not set\n\
             \x20       fix:\n\
             \x20         merge_slashes: true\n\
             OK      node  node: fine\n\
             envoy.yaml: 1 unsafe setting\n"
        );
        assert!(!report.is_safe());
        let j = report.to_json();
        assert_eq!(j["unsafe"], 1);
        assert_eq!(j["findings"][0]["severity"], "unsafe");
        assert_eq!(j["findings"][1]["fix"], Value::Null);
    }
}
