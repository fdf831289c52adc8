//! keygate's labelled metrics: their names as the filter defines them, and the Envoy
//! tag-extraction rules (`stats_config.stats_tags`) that turn those names into
//! Prometheus series with labels.
//!
//! Envoy has no labels for Wasm metrics: a filter defines a flat name, which Envoy puts
//! under the custom namespace `wasmcustom.` (left out of `/stats` and
//! `/stats/prometheus`). So the filter writes each label into the name, as
//! `keygate_requests_total.outcome.denied.reason.invalid_api_key.status_class.4xx.route./v1/jobs`,
//! and [`stats_tags`] gives Envoy one regular expression per label that moves it out of the
//! name into a tag; `/stats/prometheus` then shows
//! `keygate_requests_total{outcome="denied",reason="invalid_api_key",status_class="4xx",route="/v1/jobs"}`.
//! Without those rules the series still exist, under their full names (`/stats` shows them
//! as written; `/stats/prometheus` with every character outside `[A-Za-z0-9_]` made `_`).
//!
//! Values may hold dots (route prefixes, key ids), so the labels of a name come in a fixed
//! order and the one whose values may hold dots comes last: each regex is anchored at the
//! start and the last label runs to the end of the name. Every other value is a word of
//! `[a-z_]` or a status class.
//!
//! Pure and not Wasm-only: the filter builds names with it, `keygate render` prints
//! [`stats_tags`], and readers of `/stats` can split a name with [`parse_stat_name`].

use crate::decision::Reason;

/// Every decision: `{outcome, reason, status_class, route}` (a counter).
pub const REQUESTS_TOTAL: &str = "keygate_requests_total";
/// Requests per key id: `{key_id, outcome, reason}` (a counter; `per_key_metrics`).
pub const KEY_REQUESTS_TOTAL: &str = "keygate_key_requests_total";
/// The Unix second of the last request that authenticated as the key, allowed or refused
/// after authentication: `{key_id}` (a gauge; `per_key_metrics`).
pub const KEY_LAST_USED_SECONDS: &str = "keygate_key_last_used_seconds";
/// Requests of keys beyond `per_key_metrics_max`, not recorded per key (a counter).
pub const KEY_METRICS_DROPPED_TOTAL: &str = "keygate_key_metrics_dropped_total";

/// Envoy's namespace for metrics that Wasm modules define, before every name.
pub const WASM_NAMESPACE: &str = "wasmcustom";

/// The `route` of requests no rule covers (and of requests refused before their path was
/// read); route names may not take it.
pub const NO_ROUTE: &str = "none";
/// The `reason` of allowed requests.
pub const NO_REASON: &str = "none";
/// The `reason` of requests keygate refused with 500 because it failed itself.
pub const INTERNAL_ERROR: &str = "internal_error";

/// Label names, as Prometheus shows them.
pub mod label {
    /// `allowed` or `denied`.
    pub const OUTCOME: &str = "outcome";
    /// `none`, a denial code, or `internal_error`.
    pub const REASON: &str = "reason";
    /// `2xx` (forwarded), `4xx` (refused) or `5xx` (keygate failed).
    pub const STATUS_CLASS: &str = "status_class";
    /// The rule's `name`, else its prefix; `none` when no rule covers the request.
    pub const ROUTE: &str = "route";
    /// The key's id (never the key).
    pub const KEY_ID: &str = "key_id";
}

/// What a request came to, as counted: the `outcome`, `reason` and `status_class` labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forwarded upstream.
    Allowed,
    /// Refused by the decision.
    Denied(Reason),
    /// Refused with 500: keygate could not do its job (no configuration, a host failure).
    InternalError,
}

impl Verdict {
    /// Number of distinct verdicts ([`Verdict::index`] is below it).
    pub const COUNT: usize = Reason::ALL.len() + 2;

    /// A dense index, for arrays of counts: 0 allowed, then the reasons, then internal error.
    pub fn index(self) -> usize {
        match self {
            Verdict::Allowed => 0,
            Verdict::Denied(reason) => 1 + reason as usize,
            Verdict::InternalError => Verdict::COUNT - 1,
        }
    }

    /// The verdict at `index` (see [`Verdict::index`]).
    pub fn from_index(index: usize) -> Option<Verdict> {
        match index {
            0 => Some(Verdict::Allowed),
            i if i == Verdict::COUNT - 1 => Some(Verdict::InternalError),
            i => Reason::ALL.get(i - 1).copied().map(Verdict::Denied),
        }
    }

    /// Every verdict, in index order.
    pub fn all() -> impl Iterator<Item = Verdict> {
        (0..Verdict::COUNT).filter_map(Verdict::from_index)
    }

    /// `allowed` or `denied`.
    pub fn outcome(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Denied(_) | Verdict::InternalError => "denied",
        }
    }

    /// `none`, the denial code, or `internal_error`.
    pub fn reason(self) -> &'static str {
        match self {
            Verdict::Allowed => NO_REASON,
            Verdict::Denied(reason) => reason.code(),
            Verdict::InternalError => INTERNAL_ERROR,
        }
    }

    /// The class of the status keygate decided on: `2xx` for a request it forwards (what
    /// the upstream answers is Envoy's own `downstream_rq_Nxx`), else its own answer's.
    pub fn status_class(self) -> &'static str {
        match self {
            Verdict::Allowed => "2xx",
            Verdict::Denied(_) => "4xx",
            Verdict::InternalError => "5xx",
        }
    }
}

/// The name the filter defines for `keygate_requests_total{verdict's labels, route}`.
pub fn requests_name(verdict: Verdict, route: &str) -> String {
    format!(
        "{REQUESTS_TOTAL}.outcome.{}.reason.{}.status_class.{}.route.{route}",
        verdict.outcome(),
        verdict.reason(),
        verdict.status_class()
    )
}

/// The name the filter defines for `keygate_key_requests_total{key_id, outcome, reason}`.
pub fn key_requests_name(key_id: &str, verdict: Verdict) -> String {
    format!(
        "{KEY_REQUESTS_TOTAL}.outcome.{}.reason.{}.key_id.{key_id}",
        verdict.outcome(),
        verdict.reason()
    )
}

/// The name the filter defines for `keygate_key_last_used_seconds{key_id}`.
pub fn key_last_used_name(key_id: &str) -> String {
    format!("{KEY_LAST_USED_SECONDS}.key_id.{key_id}")
}

/// One tag-extraction rule: Envoy removes the regex's first group from the name and takes
/// the second as the tag's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsTag {
    /// The label.
    pub tag_name: &'static str,
    /// The regular expression (ECMAScript, as Envoy's `stats_tags` take it).
    pub regex: &'static str,
}

/// The rules, in the order they are listed in the bootstrap.
pub const STATS_TAGS: [StatsTag; 5] = [
    StatsTag {
        tag_name: label::OUTCOME,
        regex: r"^wasmcustom\.keygate_(?:key_)?requests_total(\.outcome\.([a-z]+))\.reason\.",
    },
    StatsTag {
        tag_name: label::REASON,
        regex: r"^wasmcustom\.keygate_(?:key_)?requests_total\.outcome\.[a-z]+(\.reason\.([a-z_]+))\.(?:status_class|key_id)\.",
    },
    StatsTag {
        tag_name: label::STATUS_CLASS,
        regex: r"^wasmcustom\.keygate_requests_total\.outcome\.[a-z]+\.reason\.[a-z_]+(\.status_class\.([0-9]xx))\.route\.",
    },
    StatsTag {
        tag_name: label::ROUTE,
        regex: r"^wasmcustom\.keygate_requests_total\.outcome\.[a-z]+\.reason\.[a-z_]+\.status_class\.[0-9]xx(\.route\.(.+))$",
    },
    StatsTag {
        tag_name: label::KEY_ID,
        regex: r"^wasmcustom\.keygate_key_(?:requests_total\.outcome\.[a-z]+\.reason\.[a-z_]+|last_used_seconds)(\.key_id\.(.+))$",
    },
];

/// The value of the bootstrap's `stats_config.stats_tags` (a list of
/// `{tag_name, regex}`), for Envoy to turn keygate's names into labelled series.
pub fn stats_tags() -> serde_json::Value {
    serde_json::Value::Array(
        STATS_TAGS
            .iter()
            .map(|t| serde_json::json!({"tag_name": t.tag_name, "regex": t.regex}))
            .collect(),
    )
}

/// The access log line of `envoy/envoy.yaml` (Envoy's format string): the decision
/// (`%RESPONSE_CODE_DETAILS%`: `via_upstream`, or `keygate_<code>` for keygate's refusals),
/// the key id (`x-keygate-key-id`, which keygate forwards with an allowed request and also
/// sets on a request it refuses after identifying a configured key: 401 revoked or expired,
/// 403, 429), the key's client (allowed requests) and the client address. No header that
/// can carry a key.
pub const ACCESS_LOG_FORMAT: &str = concat!(
    r#"[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" "#,
    "%RESPONSE_CODE% %RESPONSE_CODE_DETAILS% %RESPONSE_FLAGS% key_id=%REQ(X-KEYGATE-KEY-ID)% ",
    r#"client="%REQ(X-KEYGATE-CLIENT)%" ip=%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %DURATION%ms"#,
    "\n"
);

/// Splits a stat name as `/stats` prints it (the names above, with or without the
/// `wasmcustom.` namespace) into its metric and labels; `None` for other names. For
/// readers of `/stats?format=json`, which shows names whole whatever the bootstrap's
/// `stats_tags`.
pub fn parse_stat_name(name: &str) -> Option<(&'static str, Vec<(&'static str, String)>)> {
    let name = name
        .strip_prefix(WASM_NAMESPACE)
        .and_then(|n| n.strip_prefix('.'))
        .unwrap_or(name);
    // (metric, labels in order; the last one runs to the end of the name)
    let shapes: [(&'static str, &[&'static str]); 3] = [
        (
            REQUESTS_TOTAL,
            &[
                label::OUTCOME,
                label::REASON,
                label::STATUS_CLASS,
                label::ROUTE,
            ],
        ),
        (
            KEY_REQUESTS_TOTAL,
            &[label::OUTCOME, label::REASON, label::KEY_ID],
        ),
        (KEY_LAST_USED_SECONDS, &[label::KEY_ID]),
    ];
    for (metric, labels) in shapes {
        let Some(mut rest) = name.strip_prefix(metric).and_then(|r| r.strip_prefix('.')) else {
            continue;
        };
        let mut out = Vec::with_capacity(labels.len());
        for (i, &label) in labels.iter().enumerate() {
            rest = rest.strip_prefix(label)?.strip_prefix('.')?;
            let value = if i + 1 == labels.len() {
                std::mem::take(&mut rest)
            } else {
                let (value, tail) = rest.split_once('.')?;
                rest = tail;
                value
            };
            if value.is_empty() {
                return None;
            }
            out.push((label, value.to_string()));
        }
        return Some((metric, out));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_indexes_are_dense_and_round_trip() {
        let all: Vec<Verdict> = Verdict::all().collect();
        assert_eq!(all.len(), Verdict::COUNT);
        for (i, v) in all.iter().enumerate() {
            assert_eq!(v.index(), i);
            assert_eq!(Verdict::from_index(i), Some(*v));
        }
        assert_eq!(Verdict::from_index(Verdict::COUNT), None);
        assert_eq!(all[0], Verdict::Allowed);
        assert_eq!(all[Verdict::COUNT - 1], Verdict::InternalError);
    }

    #[test]
    fn labels_of_each_verdict() {
        let v = Verdict::Denied(Reason::TooManyFailedAttempts);
        assert_eq!(
            (v.outcome(), v.reason(), v.status_class()),
            ("denied", "too_many_failed_attempts", "4xx")
        );
        assert_eq!(
            (
                Verdict::Allowed.outcome(),
                Verdict::Allowed.reason(),
                Verdict::Allowed.status_class()
            ),
            ("allowed", "none", "2xx")
        );
        assert_eq!(Verdict::InternalError.status_class(), "5xx");
        // Every reason is a word the tag regexes accept.
        for v in Verdict::all() {
            assert!(v
                .reason()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_'));
            assert!(v.outcome().bytes().all(|b| b.is_ascii_lowercase()));
        }
    }

    #[test]
    fn names_carry_their_labels_and_parse_back() {
        let v = Verdict::Denied(Reason::InvalidApiKey);
        let name = requests_name(v, "/v1/file.json");
        assert_eq!(
            name,
            "keygate_requests_total.outcome.denied.reason.invalid_api_key.status_class.4xx.route./v1/file.json"
        );
        let (metric, labels) = parse_stat_name(&format!("wasmcustom.{name}")).unwrap();
        assert_eq!(metric, REQUESTS_TOTAL);
        assert_eq!(
            labels,
            vec![
                ("outcome", "denied".to_string()),
                ("reason", "invalid_api_key".to_string()),
                ("status_class", "4xx".to_string()),
                ("route", "/v1/file.json".to_string()),
            ]
        );
        let id = "set.a:0123456789abcdef@x-y_z";
        let (metric, labels) = parse_stat_name(&key_requests_name(id, Verdict::Allowed)).unwrap();
        assert_eq!(metric, KEY_REQUESTS_TOTAL);
        assert_eq!(labels[2], ("key_id", id.to_string()));
        let (metric, labels) = parse_stat_name(&key_last_used_name(id)).unwrap();
        assert_eq!(metric, KEY_LAST_USED_SECONDS);
        assert_eq!(labels, vec![("key_id", id.to_string())]);
        assert_eq!(parse_stat_name("keygate_allowed"), None);
        assert_eq!(
            parse_stat_name("keygate_key_last_used_seconds.key_id."),
            None
        );
    }

    /// The bootstraps shipped, and the test harness's, carry these rules and this format.
    #[test]
    fn shipped_bootstraps_carry_the_rules_and_the_access_log() {
        let yamls = [
            ("envoy/envoy.yaml", include_str!("../envoy/envoy.yaml")),
            (
                "envoy/docker/envoy.yaml",
                include_str!("../envoy/docker/envoy.yaml"),
            ),
            (
                "envoy/fleet/envoy.yaml",
                include_str!("../envoy/fleet/envoy.yaml"),
            ),
            (
                "envoy/fleet/docker/envoy.yaml",
                include_str!("../envoy/fleet/docker/envoy.yaml"),
            ),
        ];
        let yaml_format = ACCESS_LOG_FORMAT.replace('"', "\\\"").replace('\n', "\\n");
        for (path, text) in yamls {
            for t in STATS_TAGS {
                let entry = format!("  - tag_name: {}\n    regex: '{}'\n", t.tag_name, t.regex);
                assert!(text.contains(&entry), "{path} lacks {entry}");
            }
            assert!(
                text.contains(&format!("inline_string: \"{yaml_format}\"\n")),
                "{path} lacks the access log format"
            );
        }
        let harness = include_str!("../tests/integration/harness.py");
        for t in STATS_TAGS {
            let entry = format!(
                "{{\"tag_name\": \"{}\",\n     \"regex\": r\"{}\"}}",
                t.tag_name, t.regex
            );
            assert!(harness.contains(&entry), "harness.py lacks {entry}");
        }
    }

    #[test]
    fn stats_tags_are_one_rule_per_label() {
        let tags = stats_tags();
        let list = tags.as_array().unwrap();
        assert_eq!(list.len(), 5);
        let mut names: Vec<&str> = list
            .iter()
            .map(|t| t["tag_name"].as_str().unwrap())
            .collect();
        names.sort_unstable();
        names.dedup();
        // Envoy refuses a tag name given twice.
        assert_eq!(names.len(), 5);
        for t in list {
            assert!(t["regex"]
                .as_str()
                .unwrap()
                .starts_with(r"^wasmcustom\.keygate_"));
        }
    }
}
