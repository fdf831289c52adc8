//! keygate across a fleet of Envoys: the configuration of a shared rate-limit service
//! rendered from the store's plans (`keygate render --format envoy-ratelimit|limitador`),
//! and where each Envoy the store names stands (`keygate status`).
//!
//! The descriptor contract with Envoy's `envoy.filters.http.ratelimit` filter is fixed:
//! domain [`DOMAIN`], one descriptor per request whose entries are, in order,
//! [`PLAN_ENTRY`] (the key's plan, from `x-keygate-plan`) and [`KEY_ID_ENTRY`] (from
//! `x-keygate-quota-id`: the id of the key whose budget is spent, a rotated key's
//! predecessor's for its successor; configurations from before it read
//! `x-keygate-key-id`). Each rate of a plan becomes one limit counted per key id.
//!
//! Both services count fixed windows, not keygate's token bucket; every rendering says so
//! in a comment at its top, and names the plans whose `burst` it cannot express.

use crate::config::{self, Per, PlanSpec, PluginConfig};
use crate::store::{self, admin, Error, Store};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The rate-limit service domain keygate's descriptors are sent under.
pub const DOMAIN: &str = "keygate";
/// The first descriptor entry: the key's plan (`x-keygate-plan`).
pub const PLAN_ENTRY: &str = "plan";
/// The second descriptor entry: the id of the key whose budget is spent
/// (`x-keygate-quota-id`; `x-keygate-key-id` in configurations from before it).
pub const KEY_ID_ENTRY: &str = "key_id";
/// The Limitador release whose limits file [`limitador_yaml`] writes.
pub const LIMITADOR_VERSION: &str = "2.4.0";

/// Every plan the filter knows, as `Config::compile` builds them: the built-in plans,
/// with the policy's `plans` added or overriding them by name. The policy is assumed to
/// be valid ([`Store::validate`]), so every rate is within the filter's bounds.
pub fn plans(policy: &PluginConfig) -> BTreeMap<String, PlanSpec> {
    let mut plans = config::builtin_plans();
    for (name, spec) in &policy.plans {
        plans.insert(name.clone(), spec.clone());
    }
    plans
}

/// The unit word both services (and keygate) use for a period.
fn unit(per: Per) -> &'static str {
    match per {
        Per::Second => "second",
        Per::Minute => "minute",
        Per::Hour => "hour",
        Per::Day => "day",
    }
}

/// A YAML double-quoted scalar. Plan names are printable ASCII without spaces or commas,
/// and JSON's escapes (`\"`, `\\`) are YAML's: quoting every name keeps YAML 1.1 readers
/// (Go's yaml.v2, in envoyproxy/ratelimit) from reading `yes`, `on` or `123` as another
/// type.
fn quoted(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| format!("\"{text}\""))
}

/// A CEL single-quoted string literal, with CEL's escapes for `\` and `'`.
fn cel_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('\'');
    for c in text.chars() {
        if c == '\\' || c == '\'' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// Appends `text` as `#` comment lines of at most [`COMMENT_WIDTH`] characters.
fn comment(out: &mut String, text: &str) {
    let mut line = String::from("#");
    for word in text.split_whitespace() {
        if line.len() > 1 && line.len() + 1 + word.len() > COMMENT_WIDTH {
            out.push_str(&line);
            out.push('\n');
            line = String::from("#");
        }
        line.push(' ');
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
}

/// The width of the comments at the top of a rendering.
const COMMENT_WIDTH: usize = 88;

/// The comment at the top of both renderings: where it comes from, the contract, and the
/// semantics, with the plans whose burst it cannot express.
fn preamble(
    out: &mut String,
    about: &str,
    service: &str,
    window: &str,
    plans: &BTreeMap<String, PlanSpec>,
    one_rate_per_plan: bool,
) {
    comment(out, about);
    out.push_str("#\n");
    comment(
        out,
        &format!(
            "Envoy's ratelimit filter calls {service} with domain {DOMAIN:?} and one descriptor per \
             request: ({PLAN_ENTRY}, <x-keygate-plan>), ({KEY_ID_ENTRY}, <x-keygate-quota-id>), the \
             quota id being the key's id, or for a rotated key's successor its predecessor's \
             (configurations from before keygate sent it read x-keygate-key-id). Each plan \
             below is counted per key id, and shared by every Envoy that calls this service. \
             A request without a plan (a key with none, and no default_plan) matches no limit here."
        ),
    );
    out.push_str("#\n");
    comment(
        out,
        &format!(
            "Semantics differ from keygate's own limiter: {service} counts fixed windows of the \
             plan's period ({window}), with no burst and no continuous refill, so a key may spend \
             a whole window's requests at once, and up to twice them across a window boundary. \
             keygate's filter, and keygate-ratelimit, keep a token bucket (burst tokens, refilled \
             continuously at requests per period). A plan whose burst differs from its requests \
             is approximated by requests per window. A plan with several rates needs a \
             request to fit every one of them."
        ),
    );
    let mut approximated: Vec<String> = Vec::new();
    for (name, plan) in plans {
        for (i, spec) in plan.rates().iter().enumerate() {
            if one_rate_per_plan && i > 0 {
                approximated.push(format!(
                    "#   {name}: {} requests per {} not expressed (one limit per descriptor here; only the plan's first rate is)",
                    spec.requests,
                    unit(spec.per)
                ));
                continue;
            }
            if let Some(burst) = spec.burst.filter(|&b| b != spec.requests) {
                approximated.push(format!(
                    "#   {name}: burst {burst} not expressed; {} requests per {} window",
                    spec.requests,
                    unit(spec.per)
                ));
            }
        }
    }
    if !approximated.is_empty() {
        out.push_str("# Approximated here:\n");
        for line in approximated {
            out.push_str(&line);
            out.push('\n');
        }
    }
}

/// The configuration of envoyproxy/ratelimit (github.com/envoyproxy/ratelimit, its
/// README's "Configuration"): domain [`DOMAIN`], one descriptor per plan
/// (`key: plan`, `value: <name>`) with a nested `key: key_id` without a value (one counter
/// per distinct key id) carrying `rate_limit: {unit, requests_per_unit}`. The service
/// takes one limit per descriptor, so a plan with several rates is rendered with its first
/// one, and the others are named at the top as not expressed.
pub fn envoy_ratelimit_yaml(plans: &BTreeMap<String, PlanSpec>) -> String {
    let mut out = String::new();
    preamble(
        &mut out,
        "keygate's plans as an envoyproxy/ratelimit (github.com/envoyproxy/ratelimit) \
         configuration, written by `keygate render --format envoy-ratelimit` from the store's \
         plans (the built-in ones and the policy's); render it again when the plans change. The \
         service loads it from RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/RUNTIME_APPDIRECTORY/*.yaml.",
        "envoyproxy/ratelimit",
        "each second, minute, hour or day of the clock",
        plans,
        true,
    );
    let _ = writeln!(out, "domain: {DOMAIN}");
    out.push_str("descriptors:\n");
    for (name, plan) in plans {
        let Some(spec) = plan.rates().first() else {
            continue;
        };
        let _ = write!(
            out,
            "  - key: {PLAN_ENTRY}\n    value: {}\n    descriptors:\n      - key: {KEY_ID_ENTRY}\n        \
             rate_limit:\n          unit: {}\n          requests_per_unit: {}\n",
            quoted(name),
            unit(spec.per),
            spec.requests
        );
    }
    out
}

/// The limits file of Limitador (github.com/Kuadrant/limitador) [`LIMITADOR_VERSION`],
/// for its Envoy RLS interface: one limit per plan in namespace [`DOMAIN`] (the RLS
/// domain), `max_value` requests per `seconds`, the CEL condition
/// `descriptors[0]['plan'] == '<name>'` and the variable `descriptors[0]['key_id']` (a
/// counter per key id). A plan with several rates is several limits with the same
/// condition (Limitador admits a request only when every limit it matches does), named
/// `keygate plan <name> per <unit>`.
pub fn limitador_yaml(plans: &BTreeMap<String, PlanSpec>) -> String {
    let mut out = String::new();
    preamble(
        &mut out,
        &format!(
            "keygate's plans as a Limitador (github.com/Kuadrant/limitador) limits file for \
             limitador-server {LIMITADOR_VERSION}, used through its Envoy RLS interface \
             (conditions and variables are CEL over descriptors[0], as Limitador reads them \
             since 2.0; older releases used another syntax), written by `keygate render --format \
             limitador` from the store's plans (the built-in ones and the policy's); render it \
             again when the plans change."
        ),
        "Limitador",
        "each starting with the first request counted after the previous window ended",
        plans,
        false,
    );
    out.push_str("---\n");
    for (name, plan, spec) in plans
        .iter()
        .flat_map(|(name, plan)| plan.rates().iter().map(move |spec| (name, plan, spec)))
    {
        let condition = format!("descriptors[0]['{PLAN_ENTRY}'] == {}", cel_string(name));
        let title = match plan {
            PlanSpec::One(_) => format!("keygate plan {name}"),
            PlanSpec::Several(_) => format!("keygate plan {name} per {}", unit(spec.per)),
        };
        let _ = write!(
            out,
            "- namespace: {DOMAIN}\n  name: {}\n  max_value: {}\n  seconds: {}\n  conditions:\n    - {}\n  \
             variables:\n    - {}\n",
            quoted(&title),
            spec.requests,
            spec.per.seconds(),
            quoted(&condition),
            quoted(&format!("descriptors[0]['{KEY_ID_ENTRY}']"))
        );
    }
    out
}

/// What one Envoy admin said, for `keygate status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvoyState {
    /// Envoy answered, with its keygate ECDS subscriptions (none: it does not load the
    /// filter through ECDS).
    Answered(Vec<admin::Subscription>),
    /// No answer in time.
    Unreachable(String),
    /// Something answered, but not as Envoy's admin does.
    NotEnvoy(String),
}

/// One Envoy the store names, and what it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoyStatus {
    /// Its admin URL.
    pub admin: String,
    /// What its admin said.
    pub state: EnvoyState,
}

impl EnvoyStatus {
    /// Whether its admin answered at all.
    pub fn reachable(&self) -> bool {
        !matches!(self.state, EnvoyState::Unreachable(_))
    }

    /// The versions its keygate subscriptions serve, each once ("" for a configuration
    /// without a version).
    pub fn serves(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        if let EnvoyState::Answered(subs) = &self.state {
            for sub in subs {
                if !out.contains(&sub.version.as_str()) {
                    out.push(&sub.version);
                }
            }
        }
        out
    }

    /// Whether every keygate subscription of this Envoy serves the content of `version`.
    /// Only the content counts (`sha256:<hex>`, not the `-r<revision>` after it): a change
    /// that leaves Envoy's configuration as it was (a key's name, the admins) does not put
    /// the fleet out of sync.
    pub fn is_current(&self, version: &str) -> bool {
        let content = store::content_of(version);
        matches!(&self.state, EnvoyState::Answered(subs)
            if !subs.is_empty() && subs.iter().all(|s| store::content_of(&s.version) == content))
    }

    /// The store revisions its keygate subscriptions serve, each once (`None` for a
    /// version without one).
    pub fn revisions(&self) -> Vec<Option<u64>> {
        let mut out: Vec<Option<u64>> = Vec::new();
        for v in self.serves() {
            let r = store::revision_of(v);
            if !out.contains(&r) {
                out.push(r);
            }
        }
        out
    }

    /// Updates Envoy rejected, over all its keygate subscriptions.
    pub fn rejected(&self) -> u64 {
        match &self.state {
            EnvoyState::Answered(subs) => subs.iter().map(|s| s.rejected).sum(),
            _ => 0,
        }
    }
}

/// The ECDS file the store names, and the version it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcdsFile {
    /// Its path, resolved from the store's directory.
    pub path: PathBuf,
    /// Its `version_info`; `None` when it is missing or unreadable.
    pub version: Option<String>,
}

/// Where the fleet stands against the store, for `keygate status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The `version_info` of the ECDS document the store renders now.
    pub version: String,
    /// The store's revision.
    pub revision: u64,
    /// Keys in that configuration.
    pub keys: usize,
    /// The ECDS file `apply` writes, if the store names one.
    pub ecds: Option<EcdsFile>,
    /// Every Envoy admin the store names, in its order.
    pub envoys: Vec<EnvoyStatus>,
}

impl Status {
    /// Whether every Envoy the store names serves the store's current version.
    pub fn in_sync(&self) -> bool {
        !self.envoys.is_empty() && self.envoys.iter().all(|e| e.is_current(&self.version))
    }
}

/// Asks every Envoy admin the store at `path` names, at once and for at most `timeout`,
/// which version it serves, and compares it with the version the store renders now.
pub fn status(path: &Path, store: &Store, timeout: Duration) -> Result<Status, Error> {
    if store.envoy.admins.is_empty() {
        return Err(Error::Other(
            "the store names no Envoy admin to ask; keygate set-admin URL [URL ...] names them"
                .into(),
        ));
    }
    let (doc, rendered) = store.ecds_rendering()?;
    let version = doc["version_info"].as_str().unwrap_or_default().to_string();
    let ecds = store.envoy.ecds.as_deref().map(|file| {
        let path = store::resolve(path, file);
        let version = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
            .and_then(|doc| doc["version_info"].as_str().map(str::to_string));
        EcdsFile { path, version }
    });
    let answers = admin::subscriptions_of_all(&store.envoy.admins, Instant::now() + timeout);
    let envoys = store
        .envoy
        .admins
        .iter()
        .zip(answers)
        .map(|(url, answer)| EnvoyStatus {
            admin: url.clone(),
            state: match answer {
                Ok(subs) => EnvoyState::Answered(subs),
                Err(admin::GetError::Unreachable(why)) => EnvoyState::Unreachable(why),
                Err(admin::GetError::Failed(why)) => EnvoyState::NotEnvoy(why),
            },
        })
        .collect();
    Ok(Status {
        version,
        revision: store.revision,
        keys: rendered.plugin.keys.len(),
        ecds,
        envoys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    /// envoyproxy/ratelimit's YamlRoot, with only the keys it accepts.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RatelimitRoot {
        domain: String,
        descriptors: Vec<RatelimitDescriptor>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RatelimitDescriptor {
        key: String,
        value: Option<String>,
        rate_limit: Option<RatelimitLimit>,
        #[serde(default)]
        descriptors: Vec<RatelimitDescriptor>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RatelimitLimit {
        unit: String,
        requests_per_unit: u32,
    }

    /// Limitador's `Limit`, as its limits file gives it.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct LimitadorLimit {
        namespace: String,
        name: Option<String>,
        max_value: u64,
        seconds: u64,
        conditions: Vec<String>,
        variables: Vec<String>,
    }

    /// A policy overriding a built-in plan (pro, with a burst of its own) and adding
    /// plans per second and per day.
    fn policy() -> PluginConfig {
        PluginConfig::from_json(
            br#"{"plans": {
                "pro": {"requests": 100, "per": "hour", "burst": 20},
                "per-second": {"requests": 5, "per": "second"},
                "daily": {"requests": 1000, "per": "day", "burst": 1000},
                "yes": {"requests": 7, "per": "minute"}
            }}"#,
        )
        .unwrap()
    }

    fn expected() -> Vec<(&'static str, u64, &'static str, u64)> {
        // name, requests, unit, seconds
        vec![
            ("daily", 1000, "day", 86_400),
            ("enterprise", 6000, "minute", 60),
            ("free", 60, "minute", 60),
            ("per-second", 5, "second", 1),
            ("pro", 100, "hour", 3600),
            ("yes", 7, "minute", 60),
        ]
    }

    #[test]
    fn plans_are_the_builtin_ones_with_the_policy_over_them() {
        let plans = plans(&policy());
        let names: Vec<&str> = plans.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["daily", "enterprise", "free", "per-second", "pro", "yes"]
        );
        assert_eq!(plans["pro"].rates()[0].burst, Some(20));
        assert_eq!(plans["free"], config::builtin_plans()["free"]);
        // The filter compiles the same set: every name is a plan it knows.
        let mut plugin = policy();
        plugin.keys = plans
            .keys()
            .enumerate()
            .map(|(i, plan)| config::KeySpec {
                id: format!("k{i}"),
                hash: crate::keys::hash_string(plan.as_bytes()),
                client: None,
                tenant: None,
                role: "r".into(),
                scopes: Vec::new(),
                status: None,
                expires_at: None,
                plan: Some(plan.clone()),
                allowed_ips: Vec::new(),
                shares_quota_with: None,
            })
            .collect();
        let compiled = config::Config::compile(&plugin).unwrap();
        for key in &compiled.keys {
            let limit = key.limit.as_ref().unwrap();
            let spec = plans[&limit.plan].rates()[0];
            assert_eq!(limit.rate.requests, spec.requests, "{}", limit.plan);
            assert_eq!(limit.rate.period_ns, spec.per.seconds() * 1_000_000_000);
        }
    }

    #[test]
    fn envoy_ratelimit_config_reads_back_as_the_plans() {
        let text = envoy_ratelimit_yaml(&plans(&policy()));
        let root: RatelimitRoot = serde_norway::from_str(&text).unwrap();
        assert_eq!(root.domain, "keygate");
        let got: Vec<(String, u64, String)> = root
            .descriptors
            .iter()
            .map(|d| {
                assert_eq!(d.key, "plan");
                assert!(d.rate_limit.is_none(), "the plan level only selects");
                let [nested] = &d.descriptors[..] else {
                    panic!("one nested descriptor: {d:?}")
                };
                assert_eq!(nested.key, "key_id");
                assert_eq!(nested.value, None, "a counter per distinct key id");
                assert!(nested.descriptors.is_empty());
                let limit = nested.rate_limit.as_ref().unwrap();
                (
                    d.value.clone().unwrap(),
                    u64::from(limit.requests_per_unit),
                    limit.unit.clone(),
                )
            })
            .collect();
        let want: Vec<(String, u64, String)> = expected()
            .into_iter()
            .map(|(n, r, u, _)| (n.to_string(), r, u.to_string()))
            .collect();
        assert_eq!(got, want);
        // Plan names are quoted, so a YAML 1.1 reader (Go's yaml.v2) sees "yes" as a string.
        assert!(text.contains("    value: \"yes\"\n"), "{text}");
        // The semantics comment names the burst it cannot express, and only that one.
        assert!(text.starts_with("# keygate's plans as an envoyproxy/ratelimit"));
        assert!(text.contains("fixed windows"), "{text}");
        assert!(
            text.contains("#   pro: burst 20 not expressed; 100 requests per hour window\n"),
            "{text}"
        );
        assert!(!text.contains("#   daily: burst"), "{text}");
    }

    #[test]
    fn limitador_limits_read_back_as_the_plans() {
        let text = limitador_yaml(&plans(&policy()));
        let limits: Vec<LimitadorLimit> = serde_norway::from_str(&text).unwrap();
        let got: Vec<(String, u64, u64)> = limits
            .iter()
            .map(|l| {
                assert_eq!(l.namespace, "keygate");
                assert_eq!(l.variables, ["descriptors[0]['key_id']"]);
                let [condition] = &l.conditions[..] else {
                    panic!("one condition: {l:?}")
                };
                let name = condition
                    .strip_prefix("descriptors[0]['plan'] == '")
                    .and_then(|rest| rest.strip_suffix('\''))
                    .unwrap()
                    .to_string();
                assert_eq!(
                    l.name.as_deref(),
                    Some(format!("keygate plan {name}").as_str())
                );
                (name, l.max_value, l.seconds)
            })
            .collect();
        let want: Vec<(String, u64, u64)> = expected()
            .into_iter()
            .map(|(n, r, _, s)| (n.to_string(), r, s))
            .collect();
        assert_eq!(got, want);
        assert!(text.contains("limitador-server 2.4.0"), "{text}");
        assert!(
            text.contains("#   pro: burst 20 not expressed; 100 requests per hour window\n"),
            "{text}"
        );
    }

    #[test]
    fn awkward_plan_names_survive_both_renderings() {
        let name = r#"we'ird\"plan*"#;
        let mut plugin = PluginConfig::default();
        plugin.plans.insert(
            name.into(),
            config::RateSpec {
                requests: 3,
                per: Per::Second,
                burst: None,
            }
            .into(),
        );
        let plans = plans(&plugin);
        let root: RatelimitRoot = serde_norway::from_str(&envoy_ratelimit_yaml(&plans)).unwrap();
        assert!(root
            .descriptors
            .iter()
            .any(|d| d.value.as_deref() == Some(name)));
        let limits: Vec<LimitadorLimit> = serde_norway::from_str(&limitador_yaml(&plans)).unwrap();
        let condition = limits
            .iter()
            .find(|l| l.max_value == 3)
            .map(|l| l.conditions[0].clone())
            .unwrap();
        assert_eq!(
            condition, r#"descriptors[0]['plan'] == 'we\'ird\\"plan*'"#,
            "CEL escapes for ' and \\"
        );
    }

    #[test]
    fn plans_with_several_rates_render_as_far_as_each_service_can() {
        let plugin = PluginConfig::from_json(
            br#"{"plans": {"two": [{"requests": 60, "per": "minute"}, {"requests": 1000, "per": "day"}]}}"#,
        )
        .unwrap();
        let plans = plans(&plugin);
        // Limitador: one limit per rate, both on the plan's condition.
        let limits: Vec<LimitadorLimit> = serde_norway::from_str(&limitador_yaml(&plans)).unwrap();
        let two: Vec<(Option<&str>, u64, u64)> = limits
            .iter()
            .filter(|l| l.conditions[0].ends_with("== 'two'"))
            .map(|l| (l.name.as_deref(), l.max_value, l.seconds))
            .collect();
        assert_eq!(
            two,
            [
                (Some("keygate plan two per minute"), 60, 60),
                (Some("keygate plan two per day"), 1000, 86_400)
            ]
        );
        assert!(limits
            .iter()
            .all(|l| l.variables == ["descriptors[0]['key_id']"]));
        // envoyproxy/ratelimit: one limit per descriptor; the first rate, the other named.
        let text = envoy_ratelimit_yaml(&plans);
        let root: RatelimitRoot = serde_norway::from_str(&text).unwrap();
        let d = root
            .descriptors
            .iter()
            .find(|d| d.value.as_deref() == Some("two"))
            .unwrap();
        let limit = d.descriptors[0].rate_limit.as_ref().unwrap();
        assert_eq!(
            (limit.unit.as_str(), limit.requests_per_unit),
            ("minute", 60)
        );
        assert!(
            text.contains("#   two: 1000 requests per day not expressed"),
            "{text}"
        );
        assert!(!limitador_yaml(&plans).contains("not expressed (one limit"));
    }

    #[test]
    fn status_of_an_envoy() {
        let sub = |version: &str| admin::Subscription {
            name: "extension_config_discovery.http_filter.keygate".into(),
            version: version.into(),
            rejected: 1,
            failed: 0,
        };
        let envoy = |state| EnvoyStatus {
            admin: "http://127.0.0.1:1".into(),
            state,
        };
        let current = envoy(EnvoyState::Answered(vec![sub("v1"), sub("v1")]));
        assert!(current.is_current("v1") && current.reachable());
        assert_eq!(current.serves(), ["v1"]);
        assert_eq!(current.rejected(), 2);
        let mixed = envoy(EnvoyState::Answered(vec![sub("v1"), sub("v0")]));
        assert!(!mixed.is_current("v1"));
        assert_eq!(mixed.serves(), ["v1", "v0"]);
        assert!(!envoy(EnvoyState::Answered(Vec::new())).is_current("v1"));
        let down = envoy(EnvoyState::Unreachable("connection refused".into()));
        assert!(!down.reachable() && !down.is_current("v1") && down.serves().is_empty());
        let status = Status {
            version: "v1".into(),
            revision: 1,
            keys: 1,
            ecds: None,
            envoys: vec![current.clone()],
        };
        assert!(status.in_sync());
        let status = Status {
            envoys: vec![current, down],
            ..status
        };
        assert!(!status.in_sync());

        // Only the content decides: a newer revision of the same content is in sync, an
        // Envoy serving a version from before revisions too; other content is not.
        let serving = |v: &str| envoy(EnvoyState::Answered(vec![sub(v)]));
        assert!(serving("sha256:00aa-r3").is_current("sha256:00aa-r4"));
        assert!(serving("sha256:00aa").is_current("sha256:00aa-r4"));
        assert!(!serving("sha256:00bb-r4").is_current("sha256:00aa-r4"));
        assert_eq!(serving("sha256:00aa-r3").revisions(), [Some(3)]);
        assert_eq!(serving("sha256:00aa").revisions(), [None]);
    }
}
